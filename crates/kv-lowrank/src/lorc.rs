//! LoRC (Zhang et al., 2024, arXiv 2410.03111): low-rank compression of the KV cache from a
//! truncated SVD of the key and value projection weights, with layer-wise ranks from a
//! progressive strategy.
//!
//! # What it does
//! For each layer and KV head, the key projection `W_k ∈ R^{in×d}` (and likewise `W_v`) is
//! factored `W_k = U Σ Vᵀ`. LoRC caches `x U_r Σ_r` instead of `k = x W_k` and reconstructs
//! `k̂ = (x U_r Σ_r) V_rᵀ`. Since `x U_r Σ_r = x W_k V_r = k V_r`, the cached latent is the
//! pre-RoPE key projected on the first `r` right singular vectors of the weight, and this
//! cache computes it from the appended key (the same numbers, no weight surgery). It is data
//! free: `V` and `Σ` come from the weights only ([`Activation::KeyWeights`],
//! [`Activation::ValueWeights`]; the example `lorc_weights` writes them from a GGUF model).
//! When attending, keys are rebuilt, rotated with RoPE at their positions and attended; values
//! are held as `v V_r^{(v)}` and the output is projected back (LoRC fuses `V_rᵀ` into `W_o`).
//! The storage and attention are those of [`PaluCache`] over other bases.
//!
//! # The progressive ranks
//! Compression error made in a layer is amplified by the layers after it, so LoRC compresses
//! the layers whose errors travel furthest least. Per layer `l` and matrix (keys or values),
//! `κ_l` is the condition number `σ_max / σ_min` of the projection (geometric mean over the
//! KV heads), the cumulative condition number is `K_l = ∏_{i ≥ l} κ_i`, and with
//! `s_l = (log K_l − min_j log K_j) / (max_j log K_j − min_j log K_j)` the rank is
//! `r_l = r_min + round(s_l · (r_max − r_min))`: the first layer keeps `r_max`, the last
//! `r_min`, ranks never increase with depth. With `r_min = r_max` every layer has that rank.
//!
//! # Memory
//! `kv_heads · (r_k,l + r_v,l)` elements and a `u32` position per token in layer `l`, plus
//! the bases `kv_heads · d · (r_k,l + r_v,l)` fp32 floats per layer.
//!
//! # Deviations
//! The paper's exact normalisation of the cumulative condition numbers is not given in the
//! code we could check; the linear map of the normalised log above is our reading. Per-KV-head
//! factors (the paper's GQA variant factors each KV head group the same way). No weight
//! rewriting: the projection happens inside the cache on pre-RoPE keys.

use std::path::PathBuf;

use burn::prelude::*;
use kv_core::{
    Attended, HeldBuffer, KeyRope, KvBlock, KvCache, KvShape, KvView, Lengths, MemoryReport, Query,
    RopeConfig, StatsRequest, StorageDtype,
};
use serde::{Deserialize, Serialize};

use crate::calibration::{Activation, Calibration};
use crate::palu::{PaluCache, PaluConfig};

/// Configuration of a [`LorcCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LorcConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// The weight-spectra artefact (needs [`Activation::KeyWeights`] and
    /// [`Activation::ValueWeights`] for every layer of the model).
    pub calibration: PathBuf,
    /// The layer index in the artefact.
    pub layer: usize,
    /// The model's layer count, checked against the artefact when given.
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Key rank of the deepest layer, `1..=head_dim`.
    pub min_rank_k: usize,
    /// Key rank of the first layer, `min_rank_k..=head_dim`.
    pub max_rank_k: usize,
    /// Value rank of the deepest layer.
    pub min_rank_v: usize,
    /// Value rank of the first layer.
    pub max_rank_v: usize,
    /// The model's RoPE (the cache rotates reconstructed keys).
    pub rope: RopeConfig,
    /// Element type of the stored latents.
    #[serde(default)]
    pub dtype: StorageDtype,
}

impl LorcConfig {
    /// LoRC with progressive ranks from `max_rank` (first layer) down to `min_rank` (last
    /// layer) for both keys and values, fp32 storage.
    pub fn new(
        shape: KvShape,
        calibration: impl Into<PathBuf>,
        layer: usize,
        min_rank: usize,
        max_rank: usize,
        rope: RopeConfig,
    ) -> Self {
        LorcConfig {
            shape,
            calibration: calibration.into(),
            layer,
            num_layers: None,
            min_rank_k: min_rank,
            max_rank_k: max_rank,
            min_rank_v: min_rank,
            max_rank_v: max_rank,
            rope,
            dtype: StorageDtype::F32,
        }
    }
    /// Sets the value ranks apart from the key ranks.
    pub fn with_value_ranks(mut self, min_rank: usize, max_rank: usize) -> Self {
        self.min_rank_v = min_rank;
        self.max_rank_v = max_rank;
        self
    }
    crate::params::calibrated_setters!();

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &[
        "calibration",
        "rank",
        "rank_k",
        "rank_v",
        "min_rank",
        "max_rank",
        "min_rank_k",
        "max_rank_k",
        "min_rank_v",
        "max_rank_v",
        "dtype",
    ];

    /// The config for `layer` from `key=value` parameters: `calibration` (the weight-spectra
    /// artefact, required); `rank`, `rank_k`, `rank_v` set a uniform rank (min = max);
    /// `min_rank`, `max_rank` (both matrices) and `min_rank_k`, `max_rank_k`, `min_rank_v`,
    /// `max_rank_v` the progressive range. Defaults: `head_dim / 4` for the last layer up to
    /// `head_dim` for the first. Validated at [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`](kv_core::KvError::InvalidConfig) for an unknown name, a bad
    /// value or no `calibration`.
    pub fn from_params<'a>(
        shape: KvShape,
        layer: usize,
        rope: RopeConfig,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        use crate::params::{dtype, int, path, unknown};
        let d = shape.head_dim();
        let mut cfg = LorcConfig::new(shape, PathBuf::new(), layer, (d / 4).max(1), d, rope);
        for (k, v) in params {
            match k {
                "calibration" => cfg.calibration = path(v),
                "rank" => {
                    let r = int("rank", v)?;
                    (
                        cfg.min_rank_k,
                        cfg.max_rank_k,
                        cfg.min_rank_v,
                        cfg.max_rank_v,
                    ) = (r, r, r, r);
                }
                "rank_k" => {
                    let r = int("rank_k", v)?;
                    (cfg.min_rank_k, cfg.max_rank_k) = (r, r);
                }
                "rank_v" => {
                    let r = int("rank_v", v)?;
                    (cfg.min_rank_v, cfg.max_rank_v) = (r, r);
                }
                "min_rank" => {
                    let r = int("min_rank", v)?;
                    (cfg.min_rank_k, cfg.min_rank_v) = (r, r);
                }
                "max_rank" => {
                    let r = int("max_rank", v)?;
                    (cfg.max_rank_k, cfg.max_rank_v) = (r, r);
                }
                "min_rank_k" => cfg.min_rank_k = int("min_rank_k", v)?,
                "max_rank_k" => cfg.max_rank_k = int("max_rank_k", v)?,
                "min_rank_v" => cfg.min_rank_v = int("min_rank_v", v)?,
                "max_rank_v" => cfg.max_rank_v = int("max_rank_v", v)?,
                "dtype" => cfg.dtype = dtype("dtype", v)?,
                _ => return Err(unknown("LoRC", k, Self::PARAMS)),
            }
        }
        if cfg.calibration.as_os_str().is_empty() {
            return Err(crate::missing_calibration("LoRC"));
        }
        Ok(cfg)
    }

    fn validate(&self) -> kv_core::Result<()> {
        let d = self.shape.head_dim();
        for (field, lo, hi) in [
            ("min_rank_k", self.min_rank_k, self.max_rank_k),
            ("min_rank_v", self.min_rank_v, self.max_rank_v),
        ] {
            crate::params::check_rank(field, lo, d)?;
            crate::params::check_rank(field, hi, d)?;
            if lo > hi {
                return Err(kv_core::KvError::InvalidConfig {
                    field,
                    reason: format!("minimum rank {lo} is above the maximum rank {hi}"),
                });
            }
        }
        Ok(())
    }

    /// The progressive `(rank_k, rank_v)` of every layer of the artefact (see the module
    /// docs).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`](kv_core::KvError::InvalidConfig) for bad ranks or an
    /// artefact without the weight spectra or of another shape.
    pub fn ranks(&self, calibration: &Calibration) -> kv_core::Result<Vec<(usize, usize)>> {
        self.validate()?;
        for act in [Activation::KeyWeights, Activation::ValueWeights] {
            calibration.check(act, 0, &self.shape)?;
        }
        let rk = progressive(
            &log_condition(calibration, Activation::KeyWeights),
            self.min_rank_k,
            self.max_rank_k,
        );
        let rv = progressive(
            &log_condition(calibration, Activation::ValueWeights),
            self.min_rank_v,
            self.max_rank_v,
        );
        Ok(rk.into_iter().zip(rv).collect())
    }

    /// Loads the artefact at [`calibration`](Self::calibration) and builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`](kv_core::KvError::InvalidConfig) for ranks outside
    /// `1..=head_dim` or a minimum above a maximum, a bad RoPE, a missing or invalid artefact,
    /// one without weight spectra, or one from a model of another shape.
    pub fn init(&self, device: &Device) -> kv_core::Result<LorcCache> {
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
    ) -> kv_core::Result<LorcCache> {
        if let Some(n) = self.num_layers {
            calibration.check_layers(n)?;
        }
        let ranks = self.ranks(calibration)?;
        let s = &self.shape;
        calibration.check(Activation::KeyWeights, self.layer, s)?;
        let (rank_k, rank_v) = ranks[self.layer];
        let palu = PaluConfig {
            shape: self.shape,
            calibration: self.calibration.clone(),
            layer: self.layer,
            num_layers: self.num_layers,
            rank_k,
            rank_v,
            rope: self.rope.clone(),
            dtype: self.dtype,
            latent_bits: None,
            latent_group: 0,
            hadamard: false,
            fisher_layers: None,
        };
        let rope = palu.validate()?;
        let pk = calibration.basis(Activation::KeyWeights, self.layer, s, rank_k, device)?;
        let pv = calibration.basis(Activation::ValueWeights, self.layer, s, rank_v, device)?;
        Ok(LorcCache {
            config: self.clone(),
            inner: PaluCache::from_bases(
                palu,
                rope,
                [pk, pv],
                device,
                ["LorcCache::append", "LorcCache::attend"],
            ),
        })
    }
}

/// Per layer, the log condition number of the projection (mean of the heads' logs, i.e. the
/// log of their geometric mean), from the squared singular values.
fn log_condition(calibration: &Calibration, act: Activation) -> Vec<f64> {
    let m = calibration.meta();
    (0..m.num_layers)
        .map(|layer| {
            let per_head: f64 = (0..m.kv_heads)
                .map(|head| {
                    let ev = calibration
                        .eigenvalues(act, layer, head)
                        .expect("invariant: checked by the caller");
                    let hi = f64::from(ev[0]).max(f64::MIN_POSITIVE);
                    let lo = f64::from(ev[ev.len() - 1]).max(hi * 1e-30);
                    0.5 * (hi / lo).ln()
                })
                .sum();
            per_head / m.kv_heads as f64
        })
        .collect()
}

/// LoRC's progressive ranks from per-layer log condition numbers: the cumulative sums from
/// each layer to the last, normalised to `[0, 1]`, mapped linearly to `[min, max]`.
pub(crate) fn progressive(log_kappa: &[f64], min: usize, max: usize) -> Vec<usize> {
    let mut cum = vec![0.0; log_kappa.len()];
    let mut acc = 0.0;
    for (l, k) in log_kappa.iter().enumerate().rev() {
        acc += k.max(0.0);
        cum[l] = acc;
    }
    let lo = cum.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = cum.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    cum.iter()
        .map(|&c| {
            let s = if hi > lo { (c - lo) / (hi - lo) } else { 1.0 };
            min + (s * (max - min) as f64).round() as usize
        })
        .collect()
}

/// A LoRC cache for one layer. See the module docs.
#[derive(Debug, Clone)]
pub struct LorcCache {
    config: LorcConfig,
    inner: PaluCache,
}

impl LorcCache {
    /// The configuration.
    pub fn config(&self) -> &LorcConfig {
        &self.config
    }
    /// This layer's key rank.
    pub fn rank_k(&self) -> usize {
        self.inner.config().rank_k
    }
    /// This layer's value rank.
    pub fn rank_v(&self) -> usize {
        self.inner.config().rank_v
    }
    /// The key projection (right singular vectors of `W_k`), `[kv_heads, head_dim, rank_k]`.
    pub fn key_basis(&self) -> &Tensor<3> {
        self.inner.key_basis()
    }
    /// The value projection, `[kv_heads, head_dim, rank_v]`.
    pub fn value_basis(&self) -> &Tensor<3> {
        self.inner.value_basis()
    }
    /// Stored bytes per token in this layer (one sequence): latents and the `u32` position.
    pub fn bytes_per_token(&self) -> usize {
        self.inner.config().bytes_per_token()
    }
}

impl KvCache for LorcCache {
    fn shape(&self) -> KvShape {
        self.inner.shape()
    }
    fn device(&self) -> &Device {
        self.inner.device()
    }
    fn key_rope(&self) -> KeyRope {
        KeyRope::PreRope
    }
    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        self.inner.append(block)
    }
    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        self.inner.attend(query, stats)
    }
    fn view(&self) -> KvView {
        self.inner.view()
    }
    fn lengths(&self) -> Lengths {
        self.inner.lengths()
    }
    fn memory(&self) -> MemoryReport {
        self.inner.memory()
    }
    fn held_buffers(&self) -> Vec<HeldBuffer> {
        self.inner.held_buffers()
    }
    fn reset(&mut self) {
        self.inner.reset();
    }
}
