//! Token eviction for kv-compress: which prompt tokens a layer keeps, scored exactly as
//! NVIDIA kvpress 0.5.5 scores them, with the evicted rows physically freed.
//!
//! # What it is
//! Three separate pieces:
//! - **Scorers** ([`score`], configured by [`ScorerConfig`]): KNorm, StreamingLLM, SnapKV,
//!   TOVA, ObservedAttention (H2O at prefill), KeyDiff and ExpectedAttention, each a pure
//!   function over tensors returning `[batch, kv_heads, n]` scores (higher = keep) that
//!   reproduce kvpress's `score` methods, GQA reduction explicit ([`GqaReduce`]).
//! - **Budget allocation** ([`BudgetAllocator`]): how many tokens each (sequence, KV head)
//!   keeps. kvpress's semantics: `ratio` is the fraction *removed* and a stream of `n` tokens
//!   keeps `floor(n * (1 - ratio))` ([`UniformBudget`]); [`PyramidBudget`] (PyramidKV: layer
//!   budgets decreasing linearly with depth) and [`AdaKvBudget`] (Ada-KV: head budgets from a
//!   bottom-k over every head of a layer) keep the same average with kvpress's rules;
//!   [`CoverageBudget`] (LeanKV) gives each head the fewest tokens covering a share of its
//!   score mass; [`HeadKvBudget`] (HeadKV) gives static head budgets from a calibrated
//!   [`HeadImportance`] artefact (measured with [`RetrievalProbe`] and
//!   [`retrieval_scores`]; `examples/headkv_calibrate.rs` calibrates a real model).
//! - **Execution** ([`EvictingCache`]): a [`kv_core::KvCache`] over
//!   [`kv_core::RaggedCache`] that records what its scorer needs from the attention calls
//!   the model makes during prefill (the last `window` post-RoPE queries, attention column
//!   sums, or the moments of the un-rotated queries), compresses once in
//!   [`end_prefill`](kv_core::KvCache::end_prefill) with top-k + sort +
//!   [`RaggedCache::retain`](kv_core::RaggedCache::retain), and keeps later tokens
//!   uncompressed (kvpress's protocol: compress the context once, then decode), or re-runs
//!   the scorer every few decode steps ([`DecodeCompression`], kvpress's `DecodingPress`).
//!   Any scorer can have its first `sinks` and last `recent` tokens protected
//!   ([`EvictConfig::with_protected`]): kept first, inside the same budget.
//!
//! - **Decode-time policies**: [`StreamingCache`] (StreamingLLM: sinks plus a rolling window
//!   of recent tokens), [`H2oCache`] (H2O: heavy hitters by attention accumulated over
//!   prefill and decode, plus recent tokens), [`ScissorhandsCache`] (Scissorhands: tokens
//!   least often above uniform attention over a history window go) and [`KeyformerCache`]
//!   (Keyformer: H2O's rule on accumulated Gumbel-softmax scores), evicting as tokens arrive,
//!   in place once at budget (the new token takes the evicted token's row,
//!   [`RaggedCache::append_into`](kv_core::RaggedCache::append_into)); their budgets can also
//!   be a compression ratio of the prompt ([`H2oConfig::with_ratio`],
//!   [`StreamingConfig::with_ratio`], [`TokenBudget::from_ratio`]).
//!
//! # What it is not
//! The kvpress scorers compress the prompt once (kvpress's protocol) unless decode-time
//! compression is configured; the four decode-time caches evict at every step. StreamingLLM
//! keeps original positions (no "pos-shift" RoPE re-rotation, as kvpress without
//! `KeyRerotationPress`). Not a selection method (Quest and the like keep everything and
//! attend to a subset).
//!
//! # Example
//! ```
//! use burn::prelude::*;
//! use kv_core::{KvBlock, KvCache, KvShape};
//! use kv_evict::{EvictConfig, ScorerConfig};
//!
//! # fn main() -> Result<(), kv_core::KvError> {
//! let device = Device::default();
//! let shape = KvShape::new(1, 2, 4, 8)?;
//! let mut cache = EvictConfig::new(shape, 0.5, ScorerConfig::Knorm).init(&device)?;
//! let k = Tensor::<4>::random([1, 2, 10, 8], burn::tensor::Distribution::Default, &device);
//! cache.append(KvBlock::contiguous(k.clone(), k, 0)?)?;
//! cache.end_prefill()?; // keeps floor(10 * 0.5) = 5 tokens per KV head
//! assert_eq!(cache.lengths().held, vec![5, 5]);
//! # Ok(())
//! # }
//! ```

mod budget;
mod cache;
mod gqa;
mod h2o;
mod headkv;
mod keyformer;
mod scissorhands;
pub mod score;
mod scorer;
mod select;
mod slots;
mod streaming;

pub use budget::{
    AdaKvBudget, BudgetAllocator, BudgetContext, BudgetKind, CoverageBudget, MassNorm,
    PyramidBudget, UniformBudget, check_ratio, kept_for,
};
pub use cache::{DecodeCompression, EvictConfig, EvictOutcome, EvictingCache};
pub use gqa::GqaReduce;
pub use h2o::{H2oCache, H2oConfig, HeavyHitters, TokenBudget};
pub use headkv::{
    HEAD_IMPORTANCE_FORMAT, HEAD_IMPORTANCE_VERSION, HeadImportance, HeadKvBudget, ProbeLog,
    RetrievalProbe, retrieval_scores,
};
pub use keyformer::{KeyformerCache, KeyformerConfig};
pub use scissorhands::{ImportanceHistory, ScissorhandsCache, ScissorhandsConfig};
pub use scorer::{Needs, PARAMS, ScorerConfig};
pub use select::{keep_lists, top_k_sorted};
pub use streaming::{StreamingCache, StreamingConfig};
