//! Palu (Chang et al., 2024, arXiv 2407.21118) without weight rewriting: keys and values held
//! as low-rank latents from calibration, keys reconstructed and rotated when attending.
//!
//! # What it does
//! Palu factors `W_k ≈ A_k B_k` with a whitened SVD (`S = chol(XᵀX)`, SVD of `S W_k`) and caches
//! the latent `h = x A_k`. That decomposition minimises `‖X W_k − X A_k B_k‖_F` over the
//! calibration inputs `X`, whose optimum is the projection of the pre-RoPE keys `K = X W_k` on
//! the top right singular vectors of `K`: `A_k B_k = W_k V_r V_rᵀ` with `V_r` the first `r`
//! eigenvectors of `KᵀK`. So the latent is `h = k V_r` with `V_r` the PCA basis of pre-RoPE
//! keys ([`Activation::KeysPreRope`]) and `B_k = V_rᵀ`; this cache computes it from the
//! appended key instead of from `x` (the same numbers, no weight surgery). At attention time
//! the keys are reconstructed, `k̂ = h V_rᵀ`, rotated with RoPE at their positions (Palu's
//! kernel does the same) and attended; values are held as `v U_v[:, :r_v]` and the output is
//! projected back (Palu fuses that into `W_o`).
//!
//! The cache stores keys **before RoPE** ([`KeyRope::PreRope`]): the model appends them
//! unrotated and the cache rotates them when it attends.
//!
//! # Deviations
//! Per-KV-head decomposition only (Palu's M-LRD; the default G-LRD shares one latent across a
//! group of heads, which needs cross-head calibration statistics); fixed ranks instead of the
//! Fisher-information rank search; no latent quantization.

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::FloatDType;
use kv_core::{
    Attended, HeldBuffer, KeyRope, KvBlock, KvCache, KvShape, KvView, Lengths, MemoryReport, Query,
    Rope, RopeConfig, StatsRequest, StorageDtype, check_query, positions_per_head,
};
use serde::{Deserialize, Serialize};

use crate::attend::{Part, attend_parts, group_query, project, project_grouped, transpose_heads};
use crate::calibration::{Activation, Calibration};
use crate::slots::{LatentParts, Slots, cat_tokens, float_dtype};

/// Configuration of a [`PaluCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaluConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// The calibration artefact (needs [`Activation::KeysPreRope`] and
    /// [`Activation::Values`]).
    pub calibration: PathBuf,
    /// The layer index in the artefact.
    pub layer: usize,
    /// The model's layer count, checked against the artefact when given.
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Rank of the key latent, `1..=head_dim`.
    pub rank_k: usize,
    /// Rank of the value latent, `1..=head_dim`.
    pub rank_v: usize,
    /// The model's RoPE (the cache rotates reconstructed keys).
    pub rope: RopeConfig,
    /// Element type of the stored latents.
    #[serde(default)]
    pub dtype: StorageDtype,
}

impl PaluConfig {
    /// Palu with the given ranks, fp32 storage.
    pub fn new(
        shape: KvShape,
        calibration: impl Into<PathBuf>,
        layer: usize,
        rank_k: usize,
        rank_v: usize,
        rope: RopeConfig,
    ) -> Self {
        PaluConfig {
            shape,
            calibration: calibration.into(),
            layer,
            num_layers: None,
            rank_k,
            rank_v,
            rope,
            dtype: StorageDtype::F32,
        }
    }
    /// Checks the artefact against a model of `num_layers` layers at init.
    pub fn with_num_layers(mut self, num_layers: usize) -> Self {
        self.num_layers = Some(num_layers);
        self
    }
    /// Sets the storage dtype.
    pub fn with_dtype(mut self, dtype: StorageDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] =
        &["calibration", "rank", "rank_k", "rank_v", "dtype"];

    /// The config for `layer` from `key=value` parameters: `calibration` (path, required),
    /// `rank` (both ranks), `rank_k`, `rank_v` (default `head_dim / 2` each: Palu's ~50% KV
    /// compression), `dtype`. Validated at [`init`](Self::init).
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
        let half = (shape.head_dim() / 2).max(1);
        let mut cfg = PaluConfig::new(shape, PathBuf::new(), layer, half, half, rope);
        for (k, v) in params {
            match k {
                "calibration" => cfg.calibration = path(v),
                "rank" => {
                    cfg.rank_k = int("rank", v)?;
                    cfg.rank_v = cfg.rank_k;
                }
                "rank_k" => cfg.rank_k = int("rank_k", v)?,
                "rank_v" => cfg.rank_v = int("rank_v", v)?,
                "dtype" => cfg.dtype = dtype("dtype", v)?,
                _ => return Err(unknown("Palu", k, Self::PARAMS)),
            }
        }
        if cfg.calibration.as_os_str().is_empty() {
            return Err(crate::missing_calibration("Palu"));
        }
        Ok(cfg)
    }

    pub(crate) fn validate(&self) -> kv_core::Result<Rope> {
        let d = self.shape.head_dim();
        crate::params::check_rank("rank_k", self.rank_k, d)?;
        crate::params::check_rank("rank_v", self.rank_v, d)?;
        if self.rope.head_dim != d {
            return Err(kv_core::KvError::InvalidConfig {
                field: "rope",
                reason: format!(
                    "RoPE head_dim {} differs from the cache's {d}",
                    self.rope.head_dim
                ),
            });
        }
        self.rope.init()
    }

    /// Stored bytes per token per layer (one sequence): the latents and the `u32` position;
    /// bases excluded (they are per layer).
    pub fn bytes_per_token(&self) -> usize {
        self.shape.kv_heads() * (self.rank_k + self.rank_v) * self.dtype.size()
            + core::mem::size_of::<u32>()
    }

    /// Loads the artefact at [`calibration`](Self::calibration) and builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`](kv_core::KvError::InvalidConfig) for ranks outside
    /// `1..=head_dim`, a bad RoPE, a missing or invalid artefact, or one from a model of
    /// another shape.
    pub fn init(&self, device: &Device) -> kv_core::Result<PaluCache> {
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
    ) -> kv_core::Result<PaluCache> {
        if let Some(n) = self.num_layers {
            calibration.check_layers(n)?;
        }
        let rope = self.validate()?;
        let s = &self.shape;
        let pk = calibration.basis(Activation::KeysPreRope, self.layer, s, self.rank_k, device)?;
        let pv = calibration.basis(Activation::Values, self.layer, s, self.rank_v, device)?;
        Ok(PaluCache::from_bases(
            self.clone(),
            rope,
            [pk, pv],
            device,
            ["PaluCache::append", "PaluCache::attend"],
        ))
    }
}

/// A Palu cache for one layer. See the module docs.
#[derive(Debug, Clone)]
pub struct PaluCache {
    config: PaluConfig,
    device: Device,
    rope: Rope,
    /// `V_r` per KV head, `[h, d, r_k]`.
    pk: Tensor<3>,
    /// `U_v[:, :r_v]` per KV head, `[h, d, r_v]`.
    pv: Tensor<3>,
    slots: Slots,
    /// Key latents `k V_r` (pre-RoPE), `[b, h, t, r_k]`.
    keys: Option<Tensor<4>>,
    /// Value latents, `[b, h, t, r_v]`.
    values: Option<Tensor<4>>,
    /// The operation names in error messages (append, attend).
    ops: [&'static str; 2],
}

impl PaluCache {
    /// An empty cache over given key and value bases, `[h, d, r_k]` and `[h, d, r_v]` (LoRC
    /// reuses it with the right singular vectors of the projection weights); `ops` names the
    /// append and attend operations in error messages.
    pub(crate) fn from_bases(
        config: PaluConfig,
        rope: Rope,
        [pk, pv]: [Tensor<3>; 2],
        device: &Device,
        ops: [&'static str; 2],
    ) -> Self {
        PaluCache {
            slots: Slots::new(config.shape.batch()),
            config,
            device: device.clone(),
            rope,
            pk,
            pv,
            keys: None,
            values: None,
            ops,
        }
    }

    fn parts(&self) -> LatentParts<'_> {
        LatentParts {
            slots: &self.slots,
            keys: self.keys.iter().collect(),
            values: self.values.iter().collect(),
            bases: vec![&self.pk, &self.pv],
        }
    }

    /// The configuration.
    pub fn config(&self) -> &PaluConfig {
        &self.config
    }
    /// The key projection, `[kv_heads, head_dim, rank_k]`.
    pub fn key_basis(&self) -> &Tensor<3> {
        &self.pk
    }
    /// The value projection, `[kv_heads, head_dim, rank_v]`.
    pub fn value_basis(&self) -> &Tensor<3> {
        &self.pv
    }

    /// Reconstructed keys rotated at their positions, `[b, h, t, d]`.
    fn keys_post_rope(&self, latent: &Tensor<4>) -> Tensor<4> {
        let k = project(
            latent.clone().cast(FloatDType::F32),
            &transpose_heads(&self.pk),
        );
        let pos = self.slots.flat(0..self.slots.len());
        self.rope.apply(k, &pos)
    }
}

impl KvCache for PaluCache {
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
        let op = self.ops[0];
        let counts = self.slots.check(&self.config.shape, &block, op)?;
        let n = block.seq_len();
        let dtype = float_dtype(self.config.dtype);
        let (k, v, pos) = block.into_parts();
        self.keys = Some(cat_tokens(
            self.keys.take(),
            project(k, &self.pk).cast(dtype),
        ));
        self.values = Some(cat_tokens(
            self.values.take(),
            project(v, &self.pv).cast(dtype),
        ));
        self.slots.push(&pos, n, &counts);
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        let s = self.config.shape;
        check_query(&s, query, self.ops[1])?;
        let (Some(keys), Some(values)) = (&self.keys, &self.values) else {
            return Ok(Attended {
                output: query.tensor().zeros_like(),
                stats: Default::default(),
            });
        };
        if stats.any() {
            return Ok(self.view().attend_reference(query, stats));
        }
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let t = self.slots.len();
        let q = group_query(query.tensor().clone(), h);
        let n = q.dims()[3];
        let part = Part {
            q,
            keys: self.keys_post_rope(keys),
            values: values.clone().cast(FloatDType::F32),
            positions: self.slots.flat(0..t),
        };
        let o = attend_parts(&[part], query.positions(), 1.0 / (d as f32).sqrt(), None);
        let o = project_grouped(o, &transpose_heads(&self.pv));
        Ok(Attended {
            output: o.reshape([b, s.q_heads(), n, d]),
            stats: Default::default(),
        })
    }

    fn view(&self) -> KvView {
        let s = self.config.shape;
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let positions = positions_per_head(self.slots.per_sequence(), h);
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) => KvView {
                keys: self.keys_post_rope(k),
                values: project(v.clone().cast(FloatDType::F32), &transpose_heads(&self.pv)),
                positions,
            },
            _ => {
                let z = Tensor::zeros([b, h, 0, d], &self.device);
                KvView {
                    keys: z.clone(),
                    values: z,
                    positions,
                }
            }
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
        self.keys = None;
        self.values = None;
    }
}
