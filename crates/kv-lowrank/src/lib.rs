//! Channel and feature-dimension reduction of the KV cache: PCA calibration from a real
//! model, ThinK (query-driven key channel pruning), Loki (top-k selection from low-rank key
//! scores), Eigen Attention (attention in low-rank PCA spaces), Palu (low-rank key and
//! value latents, keys reconstructed and rotated when attending), LoRC (latents from the SVD
//! of the projection weights, progressive ranks), MatryoshkaKV (nested per-head ranks) and
//! CSKV (channel-shrunk features with a full-precision recent window).
//!
//! It does not drop tokens (see `kv-evict`) nor quantize (see `kv-quant`); pipelines stack
//! those with these caches in `kv-compose`.
//!
//! # Modules
//! - [`calibration`]: [`CovarianceAccumulator`] (second moments of captured activations and
//!   of projection weights), [`Calibration`] (per-(layer, KV head) and joint all-head PCA
//!   bases and weight spectra from `faer`'s eigendecomposition) and its versioned safetensors
//!   artefact. The model-side capture is `kv-eval calibrate`; the weight spectra come from the
//!   example `lorc_weights`.
//! - [`think`]: [`ThinkCache`], keys of the prefill stored on the kept channels only.
//! - [`loki`]: [`LokiCache`], keys in a PCA basis, top-k selection from the first `r` dims.
//! - [`eigen`]: [`EigenCache`], keys and values stored as rank-`r` projections.
//! - [`palu`]: [`PaluCache`], pre-RoPE key latents and value latents (Palu's decomposition
//!   from calibration, without weight rewriting), keys rotated when attending;
//!   [`palu_ranks`]: [`PaluFisher`], Palu's Fisher-information rank allocation over layers
//!   (the gradients come from `kv-eval fisher`).
//! - [`lorc`]: [`LorcCache`], pre-RoPE key and value latents on the right singular vectors
//!   of the projection weights (data free), with LoRC's progressive layer-wise ranks.
//! - [`matryoshka`]: [`MatryoshkaCache`], keys and values on nested truncations of one PCA
//!   basis per head, per-head ranks that can be lowered while running (PCA initialisation of
//!   MatryoshkaKV, without its training).
//! - [`cskv`]: [`CskvCache`], old tokens as low-dimensional features of the joint keys and
//!   values of all heads, a recent window of original keys and values (CSKV's closed-form
//!   initialisation, without its training).
//!
//! Every cache computes attention itself ([`KvCache::attend`](kv_core::KvCache::attend)),
//! reports the bytes it physically holds, and rejects bad configs with
//! [`KvError::InvalidConfig`](kv_core::KvError::InvalidConfig): ranks outside
//! `1..=head_dim`, a missing artefact, an artefact from a model of another shape.
//!
//! # Example
//! ```
//! use burn::prelude::*;
//! use kv_core::{KvBlock, KvCache, KvShape};
//! use kv_lowrank::ThinkConfig;
//!
//! # fn main() -> Result<(), kv_core::KvError> {
//! let device = Device::default();
//! let shape = KvShape::new(1, 2, 4, 10)?;
//! let mut cache = ThinkConfig::new(shape).with_recent_size(4).init(&device)?;
//! let k = Tensor::<4>::ones([1, 2, 12, 10], &device);
//! cache.append(KvBlock::contiguous(k.clone(), k, 0)?)?;
//! let q = kv_core::Query::contiguous(Tensor::ones([1, 4, 12, 10], &device), 0)?;
//! cache.attend(&q, kv_core::StatsRequest::NONE)?;
//! cache.end_prefill()?;
//! assert_eq!(cache.pruned_tokens(), 8); // 12 - recent 4
//! assert_eq!(cache.kept_channels(0, 0).map(<[u32]>::len), Some(6)); // 10 - floor(0.4 * 10)
//! # Ok(())
//! # }
//! ```

mod attend;
pub mod calibration;
pub mod cskv;
pub mod eigen;
pub mod loki;
pub mod lorc;
pub mod matryoshka;
pub mod palu;
pub mod palu_ranks;
mod params;
mod slots;
pub mod think;

pub use calibration::{
    Activation, CALIBRATION_VERSION, Calibration, CalibrationMeta, CovarianceAccumulator,
    MIN_CALIBRATION_VERSION, orthonormality_error,
};
pub use cskv::{CskvCache, CskvConfig};
pub use eigen::{EigenCache, EigenConfig};
pub use loki::{LokiCache, LokiConfig, LokiSelection, TopK};
pub use lorc::{LorcCache, LorcConfig};
pub use matryoshka::{MatryoshkaCache, MatryoshkaConfig, RankAllocation};
pub use palu::{PaluCache, PaluConfig};
pub use palu_ranks::{LayerRanks, PALU_FISHER_FORMAT, PALU_RANK_BLOCK, PaluAllocation, PaluFisher};
pub use think::{ThinkCache, ThinkConfig};

/// The error for a method built without its calibration artefact.
fn missing_calibration(method: &str) -> kv_core::KvError {
    kv_core::KvError::InvalidConfig {
        field: "calibration",
        reason: format!(
            "{method} needs a calibration artefact: run `kv-eval calibrate --out FILE` on a \
             calibration text and pass calibration=FILE"
        ),
    }
}
