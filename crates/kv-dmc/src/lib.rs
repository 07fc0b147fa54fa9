//! Token merging for kv-compress: Dynamic Memory Compression (DMC: each new token is appended
//! or averaged into the last slot of its KV head, decided by a learned head or a training-free
//! similarity proxy) and CaM-style merge-on-evict (evicted values folded into kept tokens).
//!
//! It does not score or select tokens for plain eviction (that is `kv-evict`), and it does not
//! train anything: DMC's learned decisions need a DMC-retrofitted checkpoint, exported as a
//! [`DmcArtefact`].
//!
//! # What it is
//! - [`DmcCache`] ([`DmcConfig`]): per (sequence, KV head), a variable-length list of slots,
//!   each the ω-weighted mean of a run of consecutive tokens with its mass `z`; decisions come
//!   from a [`MergeDecision`] ([`DecisionConfig`]: never, always, the cosine-similarity
//!   proxy, or learned linear heads from an artefact). Merges free memory for real.
//! - [`MergeEvictCache`] ([`MergeEvictConfig`]): sinks + recent window (StreamingLLM's budget,
//!   as CaM's code); each evicted value is merged into the next kept tokens with a weight
//!   proportional to its attention (CaM), and every value stays a convex combination.
//!
//! LESS (a learned low-rank state of evicted tokens) is not here: its kernels must be trained
//! against the model.
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
mod storage;

pub use cam::{MergeEvictCache, MergeEvictConfig};
pub use decision::{
    DMC_ARTEFACT_FORMAT, DMC_ARTEFACT_VERSION, Decision, DecisionConfig, DecisionInput,
    DmcArtefact, Fixed, LayerDecision, LinearHead, MergeDecision, SimilarityProxy, cosine,
};
pub use dmc::{DEFAULT_THRESHOLD, DmcCache, DmcConfig};
