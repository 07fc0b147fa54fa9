//! Cross-layer KV sharing for kv-compress: a validated layer-sharing map ([`LayerMap`]: CLA
//! pairs, LCKV's condensed layers, MLKV groups, any custom map, KVSharer's searched maps),
//! MiniCache's depth-wise merging of adjacent layers ([`MiniCacheConfig`]) and the KVSharer
//! calibration search ([`kvsharer::search`]) with its versioned artefact.
//!
//! It does not compress within a layer (see `kv-quant`, `kv-evict`, `kv-lowrank`) and does
//! not train: the architecture-level methods (CLA, LCKV, MLKV, CLLA, SwiftKV's AcrossKV, the
//! cross-layer study's configurations) need a checkpoint trained with their map; this crate
//! gives the map and the cache layout they run with.
//!
//! # How sharing plugs in
//! A map becomes a `kv_core::LayerCaches` with [`LayerMap::build_caches`]: layers that own
//! storage get a cache from the caller's factory, consumer layers attend over their owner's
//! cache and never append (the decoder in `kv-model` computes only their queries). Memory
//! reports count shared storage once. MiniCache builds a whole-model container
//! ([`MiniCacheConfig::init`]) whose merged pairs share one storage behind two per-layer
//! handles.
//!
//! # Example
//! ```
//! use burn::prelude::*;
//! use kv_core::{DenseCacheConfig, KvCache, KvShape};
//! use kv_share::LayerMap;
//!
//! # fn main() -> Result<(), kv_core::KvError> {
//! let device = Device::default();
//! let shape = KvShape::new(1, 2, 4, 8)?;
//! let map = LayerMap::cla(4, 2)?; // CLA2: 0_0_2_2
//! assert_eq!(map.to_layer_types(), "0_0_2_2");
//! let caches = map.build_caches(|_| {
//!     Ok(Box::new(DenseCacheConfig::new(shape).init(&device)?) as Box<dyn KvCache>)
//! })?;
//! assert_eq!(caches.storage_layers(), 2);
//! assert!(!caches.appends(1)); // layer 1 reads layer 0's cache
//! # Ok(())
//! # }
//! ```

mod error;
pub mod kvsharer;
pub mod map;
pub mod minicache;

pub use error::{Result, ShareError};
pub use kvsharer::{KvSharerArtifact, KvSharerConfig};
pub use map::{LayerMap, average_weights};
pub use minicache::{MiniCacheConfig, MiniCacheLayer, slerp};
