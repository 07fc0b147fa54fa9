//! Eigen Attention (Saxena et al., 2024, arXiv 2408.05646): attention computed in low-rank
//! PCA spaces of the queries/keys and of the values, from calibration.
//!
//! # What it does
//! Per (layer, KV head), `U_qk` is the joint PCA basis of post-RoPE queries and keys
//! ([`Activation::QueryKey`]) and `U_v` the PCA basis of values ([`Activation::Values`]). The
//! cache stores `k' = k U_qk[:, :r_k]` and `v' = v U_v[:, :r_v]`; a query is projected the same
//! way, `q' = q U_qk[:, :r_k]`, attention runs in the reduced space,
//! `o' = softmax(q' k'ᵀ / √d) v'`, and the output is projected back, `o = o' U_v[:, :r_v]ᵀ`
//! (the paper folds this into `W_o`). Because the bases are orthonormal this equals attention
//! over the reconstructions `k U Uᵀ` and `v U Uᵀ`, which is what [`view`](kv_core::KvCache::view)
//! returns; at full rank it is exact.
//!
//! # Memory
//! `(r_k + r_v)` elements per token and KV head instead of `2 d`, plus the bases
//! `kv_heads · d · (r_k + r_v)` fp32 floats per layer.
//!
//! # Deviations
//! No fine-tuning and no weight rewriting: the projection is applied inside the cache to
//! post-RoPE keys and queries (the model's weights are untouched). Ranks are fixed per
//! config (the paper searches per-layer ranks under an error budget).

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::FloatDType;
use kv_core::{
    Attended, HeldBuffer, KvBlock, KvCache, KvShape, KvView, Lengths, MemoryReport, Query,
    StatsRequest, StorageDtype, check_query, positions_per_head,
};
use serde::{Deserialize, Serialize};

use crate::attend::{Part, attend_parts, group_query, project, project_grouped, transpose_heads};
use crate::calibration::{Activation, Calibration};
use crate::slots::{LatentParts, Slots, cat_tokens, empty_view, float_dtype};

/// Configuration of an [`EigenCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EigenConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// The calibration artefact (needs [`Activation::QueryKey`] and [`Activation::Values`]).
    pub calibration: PathBuf,
    /// The layer index in the artefact.
    pub layer: usize,
    /// The model's layer count, checked against the artefact when given.
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Rank of the query/key space, `1..=head_dim`.
    pub rank_k: usize,
    /// Rank of the value space, `1..=head_dim`.
    pub rank_v: usize,
    /// Element type of the stored projections.
    #[serde(default)]
    pub dtype: StorageDtype,
}

impl EigenConfig {
    /// Eigen Attention with the given ranks, fp32 storage.
    pub fn new(
        shape: KvShape,
        calibration: impl Into<PathBuf>,
        layer: usize,
        rank_k: usize,
        rank_v: usize,
    ) -> Self {
        EigenConfig {
            shape,
            calibration: calibration.into(),
            layer,
            num_layers: None,
            rank_k,
            rank_v,
            dtype: StorageDtype::F32,
        }
    }
    crate::params::calibrated_setters!();

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] =
        &["calibration", "rank", "rank_k", "rank_v", "dtype"];

    /// The config for `layer` from `key=value` parameters: `calibration` (path, required),
    /// `rank` (both ranks), `rank_k`, `rank_v` (default `head_dim / 2` each, as the paper's
    /// ~40-50% KV reduction), `dtype`. Validated at [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`](kv_core::KvError::InvalidConfig) for an unknown name, a bad
    /// value or no `calibration`.
    pub fn from_params<'a>(
        shape: KvShape,
        layer: usize,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        use crate::params::{dtype, int, path, unknown};
        let half = (shape.head_dim() / 2).max(1);
        let mut cfg = EigenConfig::new(shape, PathBuf::new(), layer, half, half);
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
                _ => return Err(unknown("Eigen Attention", k, Self::PARAMS)),
            }
        }
        if cfg.calibration.as_os_str().is_empty() {
            return Err(crate::missing_calibration("Eigen Attention"));
        }
        Ok(cfg)
    }

    fn validate(&self) -> kv_core::Result<()> {
        let d = self.shape.head_dim();
        crate::params::check_rank("rank_k", self.rank_k, d)?;
        crate::params::check_rank("rank_v", self.rank_v, d)
    }

    /// Stored bytes per token per layer (one sequence): the projections and the `u32`
    /// position; bases excluded (they are per layer).
    pub fn bytes_per_token(&self) -> usize {
        self.shape.kv_heads() * (self.rank_k + self.rank_v) * self.dtype.size()
            + core::mem::size_of::<u32>()
    }

    /// Loads the artefact at [`calibration`](Self::calibration) and builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`](kv_core::KvError::InvalidConfig) for ranks outside
    /// `1..=head_dim`, a missing or invalid artefact, or one from a model of another shape.
    pub fn init(&self, device: &Device) -> kv_core::Result<EigenCache> {
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
    ) -> kv_core::Result<EigenCache> {
        if let Some(n) = self.num_layers {
            calibration.check_layers(n)?;
        }
        self.validate()?;
        let pk = calibration.basis(
            Activation::QueryKey,
            self.layer,
            &self.shape,
            self.rank_k,
            device,
        )?;
        let pv = calibration.basis(
            Activation::Values,
            self.layer,
            &self.shape,
            self.rank_v,
            device,
        )?;
        Ok(EigenCache {
            config: self.clone(),
            device: device.clone(),
            pk,
            pv,
            slots: Slots::new(self.shape.batch()),
            keys: None,
            values: None,
        })
    }
}

/// An Eigen Attention cache for one layer. See the module docs.
#[derive(Debug, Clone)]
pub struct EigenCache {
    config: EigenConfig,
    device: Device,
    /// `U_qk[:, :r_k]` per KV head, `[h, d, r_k]`.
    pk: Tensor<3>,
    /// `U_v[:, :r_v]` per KV head, `[h, d, r_v]`.
    pv: Tensor<3>,
    slots: Slots,
    /// `K U_qk`, `[b, h, t, r_k]`.
    keys: Option<Tensor<4>>,
    /// `V U_v`, `[b, h, t, r_v]`.
    values: Option<Tensor<4>>,
}

impl EigenCache {
    fn parts(&self) -> LatentParts<'_> {
        LatentParts {
            slots: &self.slots,
            keys: self.keys.iter().collect(),
            values: self.values.iter().collect(),
            bases: vec![&self.pk, &self.pv],
            extra: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EigenConfig {
        &self.config
    }
    /// The query/key projection, `[kv_heads, head_dim, rank_k]`.
    pub fn key_basis(&self) -> &Tensor<3> {
        &self.pk
    }
    /// The value projection, `[kv_heads, head_dim, rank_v]`.
    pub fn value_basis(&self) -> &Tensor<3> {
        &self.pv
    }
}

impl KvCache for EigenCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        const OP: &str = "EigenCache::append";
        let counts = self.slots.check(&self.config.shape, &block, OP)?;
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
        const OP: &str = "EigenCache::attend";
        let s = self.config.shape;
        check_query(&s, query, OP)?;
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
        let q = project_grouped(group_query(query.tensor().clone(), h), &self.pk);
        let n = q.dims()[3];
        let part = Part {
            q,
            keys: keys.clone().cast(FloatDType::F32),
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
                keys: project(k.clone().cast(FloatDType::F32), &transpose_heads(&self.pk)),
                values: project(v.clone().cast(FloatDType::F32), &transpose_heads(&self.pv)),
                positions,
            },
            _ => empty_view([b, h, d], positions, &self.device),
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
