//! The foundation of kv-compress: layouts, the per-layer KV cache trait, the reference
//! attention, dense and ragged per-head storage, prefix-shared chunked storage
//! (ChunkAttention), RoPE, memory reports and errors.
//!
//! It holds no compression technique: those live in `kv-quant`, `kv-evict`, `kv-lowrank`,
//! `kv-share`, `kv-pq`, `kv-dmc` and are stacked by `kv-compose`, all on top of this crate.
//!
//! # Layout
//! Keys and values of one layer are `[batch, kv_heads, seq, head_dim]`; queries are
//! `[batch, q_heads, q_len, head_dim]` with `q_heads` a multiple of `kv_heads`. Storage is at
//! KV-head granularity. Every held token keeps its original position, so that eviction does
//! not break causal masking or RoPE.
//!
//! # Feature flags
//! - `wgpu`, `cuda`: forward to Burn's backends. The crate enables no backend itself; tests,
//!   benches and binaries pick one (the CPU `flex` backend by default, through `kv-testkit`).
//!
//! # Example
//! ```
//! use burn::prelude::*;
//! use kv_core::{DenseCacheConfig, KvBlock, KvCache, KvShape, Query, StatsRequest};
//!
//! # fn main() -> Result<(), kv_core::KvError> {
//! let device = Device::default();
//! let shape = KvShape::new(1, 2, 4, 8)?; // batch 1, 2 KV heads, 4 query heads, head_dim 8
//! let mut cache = DenseCacheConfig::new(shape).init(&device)?;
//! let k = Tensor::<4>::ones([1, 2, 3, 8], &device);
//! cache.append(KvBlock::contiguous(k.clone(), k, 0)?)?; // positions 0, 1, 2
//! let q = Query::contiguous(Tensor::ones([1, 4, 1, 8], &device), 2)?;
//! let out = cache.attend(&q, StatsRequest::NONE)?.output;
//! assert_eq!(out.dims(), [1, 4, 1, 8]);
//! assert_eq!(cache.memory().logical_tokens, 3);
//! # Ok(())
//! # }
//! ```

mod attention;
mod block;
mod cache;
mod chunk;
mod dense;
mod error;
mod layers;
mod memory;
mod ragged;
mod rope;
mod shape;

pub use attention::{
    AttentionStats, KeyPositions, StatsRequest, merge_attention, reference_attention,
    reference_attention_lse,
};
pub use block::{KvBlock, PAD, Query, contiguous_positions, positions_per_head};
pub use cache::{
    Attended, KeyRope, KvCache, KvView, Lengths, check_block, check_positions, check_query,
};
pub use chunk::{ChunkAttention, ChunkAttentionConfig, ChunkInfo, DEFAULT_CHUNK_SIZE, SeqId};
pub use dense::{
    DenseCache, DenseCacheConfig, GROWTH_TOKENS, StorageDtype, memory_matches_buffers,
};
pub use error::{KvError, Result};
pub use layers::LayerCaches;
pub use memory::{HeldBuffer, MemoryReport, StorageRole, sum_held};
pub use ragged::{RaggedCache, RaggedCacheConfig, StreamView};
pub use rope::{Rope, RopeConfig, RopeConvention};

pub use shape::KvShape;
