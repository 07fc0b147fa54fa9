//! Token merging for kv-compress: Dynamic Memory Compression (DMC: each new token is appended
//! or averaged into the last slot of its KV head, decided by a learned head or a training-free
//! similarity proxy), CaM-style merge-on-evict (evicted values folded into kept tokens) and
//! LESS (evicted tokens folded into a learned low-rank state).
//!
//! It does not score or select tokens for plain eviction (that is `kv-evict`). DMC's learned
//! decisions come from a [`DmcArtefact`]: exported from a DMC-retrofitted checkpoint, or
//! trained here by a frozen-model retrofit of linear decision heads ([`Retrofit`]: DMC's
//! Gumbel-sigmoid relaxation, partial accumulation and compression loss through Burn's
//! autodiff). LESS's small maps are trained here too, layer by layer on captured activations
//! with the model frozen.
//!
//! # What it is
//! - [`DmcCache`] ([`DmcConfig`]): per (sequence, KV head), a variable-length list of slots,
//!   each the ω-weighted mean of a run of consecutive tokens with its mass `z`; decisions come
//!   from a [`MergeDecision`] ([`DecisionConfig`]: never, always, the cosine-similarity
//!   proxy, or learned linear heads from an artefact). Merges free memory for real.
//! - [`Retrofit`] ([`RetrofitConfig`], [`DecisionHeads`]): trains the learned heads with the
//!   model frozen: [`relaxed_attention`] is DMC's training-time attention (continuous `α`,
//!   partial accumulation in closed form, the `ln(1 − α)` mask), equal to the cache appended
//!   token by token for hard decisions; the example `dmc_retrofit` runs it on the real model.
//! - [`MergeEvictCache`] ([`MergeEvictConfig`]): sinks + recent window (StreamingLLM's budget,
//!   as CaM's code); each evicted value is merged into the next kept tokens with a weight
//!   proportional to its attention (CaM), and every value stays a convex combination.
//! - [`LessCache`] ([`LessConfig`]): LESS, a sparse policy ([`LessPolicy`]: H2O or Λ-shaped)
//!   whose evicted tokens are folded into a constant-size low-rank state per (sequence, KV
//!   head), `H = Σ ψ(k) vᵀ`, `z = Σ ψ(k)`, read back through `φ(q)`; the maps ([`LessMaps`],
//!   a [`LessArtefact`] per model) are trained by [`train_layer`] on [`LessSample`]s.
//!
//! # Example
//! ```
//! use burn::prelude::*;
//! use kv_core::{KvBlock, KvCache, KvShape};
//! use kv_dmc::{DecisionConfig, DmcConfig};
//!
//! # fn main() -> Result<(), kv_core::KvError> {
//! let device = Device::default();
//! let shape = KvShape::new(1, 2, 4, 8)?;
//! let mut cache = DmcConfig::new(shape, DecisionConfig::Always).init(&device)?;
//! let k = Tensor::<4>::ones([1, 2, 3, 8], &device);
//! cache.append(KvBlock::contiguous(k.clone(), k, 0)?)?;
//! assert_eq!(cache.lengths().held, vec![1, 1]); // three tokens merged into one slot per head
//! # Ok(())
//! # }
//! ```

mod cam;
mod decision;
mod dmc;
mod less;
mod less_maps;
mod less_train;
mod retrofit;
mod storage;

pub use cam::{MergeEvictCache, MergeEvictConfig};
pub use decision::{
    DMC_ARTEFACT_FORMAT, DMC_ARTEFACT_VERSION, Decision, DecisionConfig, DecisionInput,
    DmcArtefact, Fixed, LayerDecision, LinearHead, MergeDecision, SimilarityProxy, cosine,
};
pub use dmc::{DEFAULT_THRESHOLD, DmcCache, DmcConfig};
pub use less::{LessCache, LessConfig, LessPolicy};
pub use less_maps::{
    KeyMap, LESS_ARTEFACT_FORMAT, LESS_ARTEFACT_VERSION, LessArtefact, LessMaps,
    LessTrainingRecord, Mlp, QueryMap,
};
pub use less_train::{
    LessSample, TrainOptions, TrainReport, loss, loss_and_grad, output_metric, train_layer,
};
pub use retrofit::{
    AttentionFn, DecisionHeads, LOG_ALPHA_FLOOR, OMEGA_EPS, Retrofit, RetrofitConfig, StepReport,
    TrackedHeads, accumulate, hard_attention, relaxed_attention, straight_through, target_ratio,
};
