//! Loki (Singhania et al., 2024, arXiv 2406.02542): keys stored in a PCA basis from
//! calibration; approximate scores on the first `r` principal dimensions pick the top-k
//! tokens, and exact attention runs over those. Non-destructive: every key is kept.
//!
//! # What it does (hpcgroup/loki `methods/pca_topk`)
//! Keys are stored rotated, `k̃ = k P` with `P` the full orthonormal PCA basis of the layer's
//! post-RoPE keys for that KV head (so `q P · k̃ = q · k` exactly). For a query `q̃ = q P` the
//! approximate score of a held key is `q̃[..r] · k̃[..r]`; the `k` keys with the highest
//! approximate scores (among those the query may see) are selected and attention is computed
//! exactly, `softmax(q̃ · k̃ / √d)` over the selected keys only. With
//! [`LokiSelection::Group`] one selection serves the whole GQA group of a KV head (the mean of
//! the group's approximate scores), with [`LokiSelection::Head`] every query head selects its
//! own keys (the reference's behaviour for multi-head attention).
//!
//! Prefill is dense (as in the reference); selection starts after
//! [`end_prefill`](kv_core::KvCache::end_prefill). `k` is a fraction of the held slots (rounded
//! up) or a token count; when it covers every held slot, attention is exact.
//!
//! # Memory
//! The same as the dense cache (keys are rotated, not reduced), plus the basis
//! `kv_heads · d · d` fp32 floats. Loki saves compute and memory traffic, not capacity.
//!
//! # Limits
//! This implementation computes the exact scores of all keys and masks the unselected ones
//! (the reference gathers the selected keys); the result is the same, the speed-up is not
//! reproduced. Attention statistics are not available (an error asks for another method).

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::{FloatDType, IndexingUpdateOp};
use kv_core::{
    Attended, HeldBuffer, KvBlock, KvCache, KvError, KvShape, KvView, Lengths, MemoryReport, Query,
    StatsRequest, StorageDtype, StorageRole, check_query, positions_per_head,
};
use serde::{Deserialize, Serialize};

use crate::attend::{Part, attend_parts, group_query, project, project_grouped, transpose_heads};
use crate::calibration::{Activation, Calibration};
use crate::slots::{Slots, bytes, cat_tokens, empty_view, float_dtype, held_tensor};

/// How many keys Loki selects per query.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopK {
    /// A fraction of the held slots in `(0, 1]`, rounded up (the reference's `--top-k 0.25`).
    Fraction(f64),
    /// A number of tokens (at least 1).
    Tokens(usize),
}

impl TopK {
    /// The number of keys to select out of `held`.
    pub fn resolve(self, held: usize) -> usize {
        match self {
            TopK::Fraction(f) => ((f * held as f64).ceil() as usize).clamp(1, held.max(1)),
            TopK::Tokens(k) => k.min(held),
        }
    }
    fn parse(v: &str) -> kv_core::Result<Self> {
        if let Ok(k) = v.parse::<usize>() {
            return Ok(TopK::Tokens(k));
        }
        v.parse::<f64>()
            .map(TopK::Fraction)
            .map_err(|_| crate::params::bad("top_k", v, "a token count or a fraction like 0.25"))
    }
}

/// Whether the query heads of a GQA group share one selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LokiSelection {
    /// One selection per KV head from the mean approximate score of its query heads.
    #[default]
    Group,
    /// One selection per query head.
    Head,
}

/// Configuration of a [`LokiCache`]. Defaults from the reference README: `r = d/4` (16 for
/// `d = 64`), `top_k = 0.25`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LokiConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// The calibration artefact (needs [`Activation::Keys`]).
    pub calibration: PathBuf,
    /// The layer index in the artefact.
    pub layer: usize,
    /// The model's layer count, checked against the artefact when given.
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// PCA dimensions used for the approximate scores, `1..=head_dim`.
    pub rank: usize,
    /// Keys selected per query.
    pub top_k: TopK,
    /// Per-group or per-head selection.
    #[serde(default)]
    pub selection: LokiSelection,
    /// Element type of the stored keys and values.
    #[serde(default)]
    pub dtype: StorageDtype,
}

impl LokiConfig {
    /// Loki with `r = d/4`, `top_k = 0.25`, group selection, fp32 storage.
    pub fn new(shape: KvShape, calibration: impl Into<PathBuf>, layer: usize) -> Self {
        LokiConfig {
            shape,
            calibration: calibration.into(),
            layer,
            num_layers: None,
            rank: (shape.head_dim() / 4).max(1),
            top_k: TopK::Fraction(0.25),
            selection: LokiSelection::Group,
            dtype: StorageDtype::F32,
        }
    }
    /// Sets `r`.
    pub fn with_rank(mut self, rank: usize) -> Self {
        self.rank = rank;
        self
    }
    /// Sets `k`.
    pub fn with_top_k(mut self, top_k: TopK) -> Self {
        self.top_k = top_k;
        self
    }
    /// Sets per-group or per-head selection.
    pub fn with_selection(mut self, selection: LokiSelection) -> Self {
        self.selection = selection;
        self
    }
    crate::params::calibrated_setters!();

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] =
        &["calibration", "rank", "top_k", "selection", "dtype"];

    /// The default config for `layer` with `key=value` parameters applied: `calibration`
    /// (path, required), `rank`, `top_k` (a count like `64` or a fraction like `0.25`),
    /// `selection` (`group` or `head`), `dtype`. Validated at [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for an unknown name, a bad value or no `calibration`.
    pub fn from_params<'a>(
        shape: KvShape,
        layer: usize,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        use crate::params::{bad, dtype, int, path, unknown};
        let mut cfg = LokiConfig::new(shape, PathBuf::new(), layer);
        for (k, v) in params {
            match k {
                "calibration" => cfg.calibration = path(v),
                "rank" => cfg.rank = int("rank", v)?,
                "top_k" => cfg.top_k = TopK::parse(v)?,
                "selection" => {
                    cfg.selection = match v {
                        "group" => LokiSelection::Group,
                        "head" => LokiSelection::Head,
                        _ => return Err(bad("selection", v, "group or head")),
                    }
                }
                "dtype" => cfg.dtype = dtype("dtype", v)?,
                _ => return Err(unknown("Loki", k, Self::PARAMS)),
            }
        }
        if cfg.calibration.as_os_str().is_empty() {
            return Err(crate::missing_calibration("Loki"));
        }
        Ok(cfg)
    }

    fn validate(&self) -> kv_core::Result<()> {
        crate::params::check_rank("rank", self.rank, self.shape.head_dim())?;
        match self.top_k {
            TopK::Fraction(f) if !(f > 0.0 && f <= 1.0) => Err(KvError::InvalidConfig {
                field: "top_k",
                reason: format!("fraction {f} must be in (0, 1]"),
            }),
            TopK::Tokens(0) => Err(KvError::InvalidConfig {
                field: "top_k",
                reason: "must select at least one token".into(),
            }),
            _ => Ok(()),
        }
    }

    /// Loads the artefact at [`calibration`](Self::calibration) and builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a bad config, a missing or invalid artefact, or one from
    /// a model of another shape.
    pub fn init(&self, device: &Device) -> kv_core::Result<LokiCache> {
        self.validate()?;
        self.init_with(&Calibration::load(&self.calibration)?, device)
    }

    /// Builds the cache from an artefact already loaded.
    ///
    /// # Errors
    /// As [`init`](Self::init), without the file.
    pub fn init_with(
        &self,
        calibration: &Calibration,
        device: &Device,
    ) -> kv_core::Result<LokiCache> {
        if let Some(n) = self.num_layers {
            calibration.check_layers(n)?;
        }
        self.validate()?;
        let d = self.shape.head_dim();
        let basis = calibration.basis(Activation::Keys, self.layer, &self.shape, d, device)?;
        Ok(LokiCache {
            config: self.clone(),
            device: device.clone(),
            basis,
            slots: Slots::new(self.shape.batch()),
            keys: None,
            values: None,
            selecting: false,
        })
    }
}

/// A Loki cache for one layer. See the module docs.
#[derive(Debug, Clone)]
pub struct LokiCache {
    config: LokiConfig,
    device: Device,
    /// `[kv_heads, d, d]`, columns are principal directions.
    basis: Tensor<3>,
    slots: Slots,
    /// Rotated keys `K P`, `[b, h, t, d]`.
    keys: Option<Tensor<4>>,
    values: Option<Tensor<4>>,
    selecting: bool,
}

impl LokiCache {
    /// The configuration.
    pub fn config(&self) -> &LokiConfig {
        &self.config
    }
    /// The PCA basis, `[kv_heads, head_dim, head_dim]`.
    pub fn basis(&self) -> &Tensor<3> {
        &self.basis
    }
    /// Keys selected per query now (all held slots before `end_prefill`).
    pub fn selected_per_query(&self) -> usize {
        let t = self.slots.len();
        if self.selecting {
            self.config.top_k.resolve(t)
        } else {
            t
        }
    }
}

impl KvCache for LokiCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        const OP: &str = "LokiCache::append";
        let counts = self.slots.check(&self.config.shape, &block, OP)?;
        let n = block.seq_len();
        let dtype = float_dtype(self.config.dtype);
        let (k, v, pos) = block.into_parts();
        let k = project(k, &self.basis).cast(dtype);
        self.keys = Some(cat_tokens(self.keys.take(), k));
        self.values = Some(cat_tokens(self.values.take(), v.cast(dtype)));
        self.slots.push(&pos, n, &counts);
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        const OP: &str = "LokiCache::attend";
        let s = self.config.shape;
        check_query(&s, query, OP)?;
        if stats.any() {
            return Err(KvError::InvalidConfig {
                field: "stats",
                reason: "Loki attends over a per-query selection and returns no attention \
                         statistics"
                    .into(),
            });
        }
        let t = self.slots.len();
        let (Some(keys), Some(values)) = (&self.keys, &self.values) else {
            return Ok(Attended {
                output: query.tensor().zeros_like(),
                stats: Default::default(),
            });
        };
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let q = project_grouped(group_query(query.tensor().clone(), h), &self.basis);
        let [_, _, g, n, _] = q.dims();
        let keys = keys.clone().cast(FloatDType::F32);
        let k = self.config.top_k.resolve(t);
        let part = Part {
            q: q.clone(),
            keys: keys.clone(),
            values: values.clone().cast(FloatDType::F32),
            positions: self.slots.flat(0..t),
        };
        let scale = 1.0 / (d as f32).sqrt();
        let out = if !self.selecting || k >= t {
            attend_parts(&[part], query.positions(), scale, None)
        } else {
            let r = self.config.rank;
            let q_r = q.slice([0..b, 0..h, 0..g, 0..n, 0..r]);
            let k_r = keys.slice([0..b, 0..h, 0..t, 0..r]).swap_dims(2, 3);
            let selection = self.config.selection;
            let hook = move |range: core::ops::Range<usize>, causal: &Tensor<4, Bool>| {
                let rows = range.len();
                let approx = q_r
                    .clone()
                    .slice([0..b, 0..h, 0..g, range, 0..r])
                    .reshape([b, h, g * rows, r])
                    .matmul(k_r.clone())
                    .mask_fill(causal.clone(), f32::NEG_INFINITY);
                let approx = match selection {
                    LokiSelection::Head => approx,
                    LokiSelection::Group => approx
                        .reshape([b, h, g, rows, t])
                        .mean_dim(2)
                        .expand([b, h, g, rows, t])
                        .reshape([b, h, g * rows, t]),
                };
                let (_, idx) = approx.topk_with_indices(k, 3);
                let picked = Tensor::<4>::zeros([b, h, g * rows, t], &causal.device()).scatter(
                    3,
                    idx,
                    Tensor::ones([b, h, g * rows, k], &causal.device()),
                    IndexingUpdateOp::Assign,
                );
                picked.lower_elem(0.5)
            };
            attend_parts(&[part], query.positions(), scale, Some(&hook))
        };
        // Values were not rotated: the output needs no back-projection.
        Ok(Attended {
            output: out.reshape([b, s.q_heads(), n, d]),
            stats: Default::default(),
        })
    }

    fn end_prefill(&mut self) -> kv_core::Result<()> {
        self.selecting = true;
        Ok(())
    }

    fn view(&self) -> KvView {
        let s = self.config.shape;
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let positions = positions_per_head(self.slots.per_sequence(), h);
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) => KvView {
                keys: project(
                    k.clone().cast(FloatDType::F32),
                    &transpose_heads(&self.basis),
                ),
                values: v.clone().cast(FloatDType::F32),
                positions,
            },
            _ => empty_view([b, h, d], positions, &self.device),
        }
    }

    fn lengths(&self) -> Lengths {
        Lengths {
            held: vec![self.slots.len(); self.config.shape.streams()],
            logical: self.slots.logical().to_vec(),
        }
    }

    fn memory(&self) -> MemoryReport {
        let s = self.config.shape;
        MemoryReport {
            key_bytes: bytes(self.keys.as_ref()),
            value_bytes: bytes(self.values.as_ref()),
            metadata_bytes: self.slots.metadata_bytes() + bytes(Some(&self.basis)),
            logical_elements: self.slots.logical_elements(&s),
            logical_tokens: self.slots.logical_tokens(),
            held_token_slots: s.streams() * self.slots.len(),
        }
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = Vec::new();
        held_tensor(&mut out, StorageRole::Keys, self.keys.as_ref());
        held_tensor(&mut out, StorageRole::Values, self.values.as_ref());
        out.push(HeldBuffer::tensor(StorageRole::Metadata, &self.basis));
        self.slots.held(&mut out);
        out
    }

    fn reset(&mut self) {
        self.slots.reset();
        self.keys = None;
        self.values = None;
        self.selecting = false;
    }
}
