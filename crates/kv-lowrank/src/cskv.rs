//! CSKV (Wang et al., 2024, arXiv 2409.10593), SVD-initialised baseline: the channels of the
//! whole key and value projections shrunk to low-dimensional features, with a bi-branch cache
//! that keeps the most recent tokens' original keys and values.
//!
//! # What it does
//! CSKV replaces `W_k ∈ R^{in × H·d}` (all `H` KV heads of a layer) by `A_k B_k` with
//! `A_k ∈ R^{in × r_k}`, `B_k ∈ R^{r_k × H·d}`, caches the feature `x A_k` of old tokens and
//! rebuilds `K̂ = (x A_k) B_k`; likewise for values. The factors are initialised by an
//! (activation-aware) SVD and then trained layer by layer to minimise the reconstruction error
//! of `K` and `V` over calibration data. The global optimum of that layer-wise objective,
//! `min ‖X W_k − X A_k B_k‖_F`, is the rank-`r_k` truncated SVD of `K = X W_k`:
//! `B_k = V_rᵀ` and `x A_k = k V_r`, with `V_r` the first `r_k` principal directions of the
//! *joint* pre-RoPE keys of all heads (`H·d`-dimensional, [`Activation::KeysPreRopeJoint`];
//! values: [`Activation::ValuesJoint`]). This cache uses that closed form, computing the
//! feature from the appended key.
//!
//! Bi-branch storage: the last `window` tokens (32 by default, the reference's
//! `q_window_size`) keep their original pre-RoPE keys and values, `[b, H, w, d]`; older
//! tokens hold only the features `[b, 1, t − w, r_k]` and `[b, 1, t − w, r_v]`. When an
//! append pushes tokens out of the window they are compressed. When attending, old keys are
//! rebuilt (`k V_r V_rᵀ`, split back into heads), every key is rotated with RoPE at its
//! position (the cache stores keys before RoPE, [`KeyRope::PreRope`]), and one softmax runs
//! over both branches.
//!
//! # Memory
//! Per token of the compressed branch `r_k + r_v` elements and a `u32` position (instead of
//! `2·H·d` elements); per token of the window `2·H·d` elements and the position; plus the
//! bases `H·d·(r_k + r_v)` fp32 floats per layer.
//!
//! # Deviations
//! No training: the factors are the closed-form optimum of the reference's layer-wise
//! reconstruction loss on the calibration text (the training starts from an activation-aware
//! SVD and minimises that loss with SGD; it is not run here). No quantization of the features
//! (the reference's optional KIVI-style QAT). The window slides token by token (the reference
//! moves the window to the compressed branch in blocks of `q_window_size`).

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::FloatDType;
use kv_core::{
    Attended, HeldBuffer, KeyRope, KvBlock, KvCache, KvError, KvShape, KvView, Lengths,
    MemoryReport, Query, Rope, RopeConfig, StatsRequest, StorageDtype, check_query,
    positions_per_head,
};
use serde::{Deserialize, Serialize};

use crate::attend::{Part, attend_parts, group_query};
use crate::calibration::{Activation, Calibration};
use crate::slots::{LatentParts, Slots, cat_tokens, empty_view, float_dtype};

/// Configuration of a [`CskvCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CskvConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// The calibration artefact (needs [`Activation::KeysPreRopeJoint`] and
    /// [`Activation::ValuesJoint`], written by `kv-eval calibrate` since format version 2).
    pub calibration: PathBuf,
    /// The layer index in the artefact.
    pub layer: usize,
    /// The model's layer count, checked against the artefact when given.
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Key feature width, `1..=kv_heads · head_dim`.
    pub rank_k: usize,
    /// Value feature width, `1..=kv_heads · head_dim`.
    pub rank_v: usize,
    /// Recent tokens kept with their original keys and values.
    pub window: usize,
    /// The model's RoPE (the cache rotates keys when attending).
    pub rope: RopeConfig,
    /// Element type of the stored features and window.
    #[serde(default)]
    pub dtype: StorageDtype,
}

impl CskvConfig {
    /// CSKV with the given feature widths and a window of 32, fp32 storage.
    pub fn new(
        shape: KvShape,
        calibration: impl Into<PathBuf>,
        layer: usize,
        rank_k: usize,
        rank_v: usize,
        rope: RopeConfig,
    ) -> Self {
        CskvConfig {
            shape,
            calibration: calibration.into(),
            layer,
            num_layers: None,
            rank_k,
            rank_v,
            window: 32,
            rope,
            dtype: StorageDtype::F32,
        }
    }
    /// Sets the full-precision window.
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window;
        self
    }
    crate::params::calibrated_setters!();

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &[
        "calibration",
        "rank_k",
        "rank_v",
        "k_density",
        "v_density",
        "window",
        "dtype",
    ];

    /// The config for `layer` from `key=value` parameters: `calibration` (path, required),
    /// `k_density`, `v_density` (fractions of `kv_heads · head_dim`; default 0.25 and 0.75,
    /// the reference training script's) or `rank_k`, `rank_v` (widths), `window` (default 32),
    /// `dtype`. Validated at [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for an unknown name, a bad value, a density outside
    /// `(0, 1]` or no `calibration`.
    pub fn from_params<'a>(
        shape: KvShape,
        layer: usize,
        rope: RopeConfig,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        use crate::params::{bad, dtype, float, int, path, unknown};
        let full = shape.kv_heads() * shape.head_dim();
        let width = |field: &'static str, v: &str| -> kv_core::Result<usize> {
            let f = float(field, v)?;
            if !(f > 0.0 && f <= 1.0) {
                return Err(bad(field, v, "a fraction in (0, 1]"));
            }
            Ok(((f * full as f64).round() as usize).max(1))
        };
        let mut cfg = CskvConfig::new(
            shape,
            PathBuf::new(),
            layer,
            width("k_density", "0.25")?,
            width("v_density", "0.75")?,
            rope,
        );
        for (k, v) in params {
            match k {
                "calibration" => cfg.calibration = path(v),
                "rank_k" => cfg.rank_k = int("rank_k", v)?,
                "rank_v" => cfg.rank_v = int("rank_v", v)?,
                "k_density" => cfg.rank_k = width("k_density", v)?,
                "v_density" => cfg.rank_v = width("v_density", v)?,
                "window" => cfg.window = int("window", v)?,
                "dtype" => cfg.dtype = dtype("dtype", v)?,
                _ => return Err(unknown("CSKV", k, Self::PARAMS)),
            }
        }
        if cfg.calibration.as_os_str().is_empty() {
            return Err(crate::missing_calibration("CSKV"));
        }
        Ok(cfg)
    }

    fn validate(&self) -> kv_core::Result<Rope> {
        let d = self.shape.head_dim();
        let full = self.shape.kv_heads() * d;
        crate::params::check_joint_rank("rank_k", self.rank_k, full)?;
        crate::params::check_joint_rank("rank_v", self.rank_v, full)?;
        if self.rope.head_dim != d {
            return Err(KvError::InvalidConfig {
                field: "rope",
                reason: format!(
                    "RoPE head_dim {} differs from the cache's {d}",
                    self.rope.head_dim
                ),
            });
        }
        self.rope.init()
    }

    /// Stored bytes per token of the compressed branch (one sequence): features and the
    /// `u32` position; bases excluded (they are per layer).
    pub fn bytes_per_token(&self) -> usize {
        (self.rank_k + self.rank_v) * self.dtype.size() + core::mem::size_of::<u32>()
    }

    /// Loads the artefact at [`calibration`](Self::calibration) and builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for widths outside `1..=kv_heads · head_dim`, a bad RoPE, a
    /// missing or invalid artefact, one without joint bases (format version 1) or one from a
    /// model of another shape.
    pub fn init(&self, device: &Device) -> kv_core::Result<CskvCache> {
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
    ) -> kv_core::Result<CskvCache> {
        if let Some(n) = self.num_layers {
            calibration.check_layers(n)?;
        }
        let rope = self.validate()?;
        let s = &self.shape;
        let pk = calibration.basis(
            Activation::KeysPreRopeJoint,
            self.layer,
            s,
            self.rank_k,
            device,
        )?;
        let pv = calibration.basis(Activation::ValuesJoint, self.layer, s, self.rank_v, device)?;
        Ok(CskvCache {
            config: self.clone(),
            device: device.clone(),
            rope,
            pk,
            pv,
            slots: Slots::new(s.batch()),
            compressed: 0,
            feat_k: None,
            feat_v: None,
            win_k: None,
            win_v: None,
        })
    }
}

/// A CSKV cache for one layer. See the module docs.
#[derive(Debug, Clone)]
pub struct CskvCache {
    config: CskvConfig,
    device: Device,
    rope: Rope,
    /// `V_r` of the joint pre-RoPE keys, `[1, H·d, r_k]`.
    pk: Tensor<3>,
    /// `V_r` of the joint values, `[1, H·d, r_v]`.
    pv: Tensor<3>,
    slots: Slots,
    /// Slots `0..compressed` are features, the rest is the window.
    compressed: usize,
    /// Key features, `[b, 1, compressed, r_k]`.
    feat_k: Option<Tensor<4>>,
    /// Value features, `[b, 1, compressed, r_v]`.
    feat_v: Option<Tensor<4>>,
    /// Original pre-RoPE keys of the window, `[b, H, w, d]`.
    win_k: Option<Tensor<4>>,
    /// Original values of the window, `[b, H, w, d]`.
    win_v: Option<Tensor<4>>,
}

impl CskvCache {
    fn parts(&self) -> LatentParts<'_> {
        LatentParts {
            slots: &self.slots,
            keys: self.feat_k.iter().chain(&self.win_k).collect(),
            values: self.feat_v.iter().chain(&self.win_v).collect(),
            bases: vec![&self.pk, &self.pv],
            extra: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CskvConfig {
        &self.config
    }
    /// Slots held as low-dimensional features.
    pub fn compressed_tokens(&self) -> usize {
        self.compressed
    }
    /// Slots held with their original keys and values.
    pub fn window_tokens(&self) -> usize {
        self.slots.len() - self.compressed
    }
    /// The key basis, `[1, kv_heads · head_dim, rank_k]`.
    pub fn key_basis(&self) -> &Tensor<3> {
        &self.pk
    }
    /// The value basis, `[1, kv_heads · head_dim, rank_v]`.
    pub fn value_basis(&self) -> &Tensor<3> {
        &self.pv
    }

    /// `[b, H, n, d]` to the features `[b, 1, n, r]` on a joint basis `[1, H·d, r]`.
    fn encode(&self, x: Tensor<4>, basis: &Tensor<3>) -> Tensor<4> {
        let [b, h, n, d] = x.dims();
        x.swap_dims(1, 2)
            .reshape([b, 1, n, h * d])
            .matmul(basis.clone().unsqueeze::<4>())
    }

    /// Features `[b, 1, n, r]` back to `[b, H, n, d]` (f32).
    fn decode(&self, f: &Tensor<4>, basis: &Tensor<3>) -> Tensor<4> {
        let s = self.config.shape;
        let [b, _, n, _] = f.dims();
        f.clone()
            .cast(FloatDType::F32)
            .matmul(basis.clone().swap_dims(1, 2).unsqueeze::<4>())
            .reshape([b, n, s.kv_heads(), s.head_dim()])
            .swap_dims(1, 2)
    }

    /// Post-RoPE keys and values of the compressed branch and of the window, each with its
    /// positions (branches that hold nothing are left out).
    fn branches(&self) -> Vec<(Tensor<4>, Tensor<4>, Vec<u32>)> {
        let t = self.slots.len();
        let c = self.compressed;
        let mut out = Vec::with_capacity(2);
        if let (Some(fk), Some(fv)) = (&self.feat_k, &self.feat_v) {
            let pos = self.slots.flat(0..c);
            let k = self.rope.apply(self.decode(fk, &self.pk), &pos);
            out.push((k, self.decode(fv, &self.pv), pos));
        }
        if let (Some(wk), Some(wv)) = (&self.win_k, &self.win_v) {
            let pos = self.slots.flat(c..t);
            let k = self.rope.apply(wk.clone().cast(FloatDType::F32), &pos);
            out.push((k, wv.clone().cast(FloatDType::F32), pos));
        }
        out
    }
}

impl KvCache for CskvCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn key_rope(&self) -> KeyRope {
        KeyRope::PreRope
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        const OP: &str = "CskvCache::append";
        let s = self.config.shape;
        let counts = self.slots.check(&s, &block, OP)?;
        let n = block.seq_len();
        let dtype = float_dtype(self.config.dtype);
        let (k, v, pos) = block.into_parts();
        let wk = cat_tokens(self.win_k.take(), k.cast(dtype));
        let wv = cat_tokens(self.win_v.take(), v.cast(dtype));
        self.slots.push(&pos, n, &counts);
        let held = self.slots.len() - self.compressed;
        let spill = held.saturating_sub(self.config.window);
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        if spill > 0 {
            let old = |t: &Tensor<4>| t.clone().slice([0..b, 0..h, 0..spill, 0..d]);
            let fk = self
                .encode(old(&wk).cast(FloatDType::F32), &self.pk)
                .cast(dtype);
            let fv = self
                .encode(old(&wv).cast(FloatDType::F32), &self.pv)
                .cast(dtype);
            self.feat_k = Some(cat_tokens(self.feat_k.take(), fk));
            self.feat_v = Some(cat_tokens(self.feat_v.take(), fv));
            self.compressed += spill;
        }
        let keep = held - spill;
        let recent = |t: Tensor<4>| (keep > 0).then(|| t.slice([0..b, 0..h, spill..held, 0..d]));
        self.win_k = recent(wk);
        self.win_v = recent(wv);
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        const OP: &str = "CskvCache::attend";
        let s = self.config.shape;
        check_query(&s, query, OP)?;
        if self.slots.len() == 0 {
            return Ok(Attended {
                output: query.tensor().zeros_like(),
                stats: Default::default(),
            });
        }
        if stats.any() {
            return Ok(self.view().attend_reference(query, stats));
        }
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let q = group_query(query.tensor().clone(), h);
        let n = q.dims()[3];
        let parts: Vec<Part> = self
            .branches()
            .into_iter()
            .map(|(keys, values, positions)| Part {
                q: q.clone(),
                keys,
                values,
                positions,
            })
            .collect();
        let o = attend_parts(&parts, query.positions(), 1.0 / (d as f32).sqrt(), None);
        Ok(Attended {
            output: o.reshape([b, s.q_heads(), n, d]),
            stats: Default::default(),
        })
    }

    fn view(&self) -> KvView {
        let s = self.config.shape;
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let positions = positions_per_head(self.slots.per_sequence(), h);
        let (keys, values): (Vec<_>, Vec<_>) =
            self.branches().into_iter().map(|(k, v, _)| (k, v)).unzip();
        if keys.is_empty() {
            return empty_view([b, h, d], positions, &self.device);
        }
        KvView {
            keys: Tensor::cat(keys, 2),
            values: Tensor::cat(values, 2),
            positions,
        }
    }

    fn lengths(&self) -> Lengths {
        self.parts().lengths(&self.config.shape)
    }

    fn memory(&self) -> MemoryReport {
        self.parts().memory(&self.config.shape)
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        self.parts().held_buffers()
    }

    fn reset(&mut self) {
        self.slots.reset();
        self.compressed = 0;
        self.feat_k = None;
        self.feat_v = None;
        self.win_k = None;
        self.win_v = None;
    }
}
