//! Vector and product quantization and non-destructive, query-aware token selection for
//! kv-compress: batched k-means ([`kmeans()`]), product quantization ([`ProductQuantizer`]),
//! PQCache ([`PqCache`]: PQ codes of the keys score every token, exact attention over the
//! best ones), Quest ([`QuestCache`]: page minima and maxima bound the scores, exact
//! attention over the best pages), Double Sparsity ([`DoubleSparsityCache`]: scores from a
//! few label channels of every key, exact attention over the best tokens) and ClusterKV
//! ([`ClusterKvCache`]: k-means clusters of the keys ranked by their centroids, exact
//! attention over the best clusters), TokenSelect ([`TokenSelectCache`]: per-head soft votes
//! pick the tokens every head attends to exactly, with a selection reused across similar
//! queries) and residual vector quantization ([`RvqCache`]: keys and values stored as code
//! indices of per-layer codebooks learned offline, [`RvqArtefact`]).
//!
//! The selection caches keep every token and attend to a query-dependent subset; they do not
//! evict (see `kv-evict`) and do not make the stored keys and values smaller (see `kv-quant`):
//! what they save is the number of keys and values a decode step reads. The residual-VQ cache
//! is the exception: it holds codes instead of keys and values. Their
//! [`MemoryReport`](kv_core::MemoryReport) counts everything held, the full K/V included.
//!
//! Everything is written with Burn tensor ops on `Tensor<D>` and a
//! [`Device`](burn::prelude::Device); the crate enables no backend itself.
//!
//! # Example
//! ```
//! use burn::prelude::*;
//! use kv_core::{KvBlock, KvCache, KvShape, Query, StatsRequest};
//! use kv_pq::{Budget, QuestConfig};
//!
//! # fn main() -> Result<(), kv_core::KvError> {
//! let device = Device::default();
//! let shape = KvShape::new(1, 2, 4, 8)?;
//! let mut cache = QuestConfig::new(shape, Budget::Tokens(8))
//!     .with_page_size(4)
//!     .init(&device)?;
//! let k = Tensor::<4>::ones([1, 2, 20, 8], &device);
//! cache.append(KvBlock::contiguous(k.clone(), k, 0)?)?;
//! cache.end_prefill()?;
//! let q = Query::contiguous(Tensor::ones([1, 4, 1, 8], &device), 19)?;
//! let out = cache.attend(&q, StatsRequest::NONE)?.output; // over 2 pages of 4 tokens
//! assert_eq!(out.dims(), [1, 4, 1, 8]);
//! assert_eq!(cache.pages(), 5);
//! # Ok(())
//! # }
//! ```

mod budget;
pub mod clusterkv;
pub mod double_sparsity;
pub mod kmeans;
pub mod pq;
pub mod pqcache;
pub mod quest;
mod rng;
pub mod rvq;
pub mod rvqcache;
mod select;
pub mod tokenselect;

pub use budget::Budget;
pub use clusterkv::{ClusterKvCache, ClusterKvConfig};
pub use double_sparsity::{DoubleSparsityCache, DoubleSparsityConfig};
pub use kmeans::{KMeans, KMeansConfig, kmeans};
pub use pq::ProductQuantizer;
pub use pqcache::{PqCache, PqCacheConfig, PqMemory};
pub use quest::{QuestCache, QuestConfig};
pub use rvq::{RVQ_VERSION, ResidualQuantizer, RvqArtefact, RvqLayerCodebooks, RvqTrainConfig};
pub use rvqcache::{RvqCache, RvqConfig};
pub use tokenselect::{TokenSelectCache, TokenSelectConfig};
