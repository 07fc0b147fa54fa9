//! Decode-time StreamingLLM: attention sinks plus a rolling window of recent tokens, evicted
//! as tokens arrive (the paper's `StartRecentKVCache`), over ragged storage.

use burn::prelude::*;
use kv_core::{
    Attended, HeldBuffer, KvBlock, KvCache, KvError, KvShape, KvView, Lengths, MemoryReport, Query,
    RaggedCache, RaggedCacheConfig, Result, StatsRequest, StorageDtype,
};
use serde::{Deserialize, Serialize};

/// Configuration of a [`StreamingCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamingConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Leading tokens always kept (the attention sinks; the paper's `start_size`, default 4).
    #[serde(default = "default_sink")]
    pub n_sink: usize,
    /// Most recent tokens kept (the paper's `recent_size`; its class default is 512).
    pub recent: usize,
    /// Element type of the stored keys and values (default fp32).
    #[serde(default)]
    pub dtype: StorageDtype,
}

fn default_sink() -> usize {
    4
}

impl StreamingConfig {
    /// `n_sink` sinks and `recent` recent tokens, fp32 storage.
    pub fn new(shape: KvShape, n_sink: usize, recent: usize) -> Self {
        StreamingConfig {
            shape,
            n_sink,
            recent,
            dtype: StorageDtype::F32,
        }
    }

    /// Validates and builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for `recent == 0`.
    pub fn init(&self, device: &Device) -> Result<StreamingCache> {
        if self.recent == 0 {
            return Err(KvError::InvalidConfig {
                field: "recent",
                reason: "must keep at least 1 recent token".into(),
            });
        }
        Ok(StreamingCache {
            config: self.clone(),
            inner: RaggedCacheConfig::new(self.shape)
                .with_dtype(self.dtype)
                .init(device)?,
        })
    }
}

/// StreamingLLM as a streaming policy: at most `n_sink + recent` tokens per (sequence, KV
/// head) when a block is attended.
///
/// Before a block of `m` tokens is appended, a sequence that would exceed `n_sink + recent`
/// keeps its first `n_sink` tokens and its last `recent - m` (none if `m >= recent`), as
/// `StartRecentKVCache.evict_for_space` does, so every query of the block sees the sinks, the
/// recent tokens and the block itself; [`end_prefill`](KvCache::end_prefill) trims a long
/// prompt to `n_sink + recent`. Positions are kept as they were (no "pos-shift" re-rotation,
/// like kvpress's `StreamingLLMPress` without `KeyRerotationPress`).
#[derive(Debug, Clone)]
pub struct StreamingCache {
    config: StreamingConfig,
    inner: RaggedCache,
}

impl StreamingCache {
    /// The configuration.
    pub fn config(&self) -> &StreamingConfig {
        &self.config
    }

    /// Keeps, in every stream holding more than `n_sink + keep_recent` tokens, the sinks and
    /// the last `keep_recent` tokens.
    fn trim(&mut self, keep_recent: usize) -> Result<()> {
        let held = self.inner.lengths().held;
        let n_sink = self.config.n_sink;
        if held.iter().all(|&n| n <= n_sink + keep_recent) {
            return Ok(());
        }
        let keep: Vec<Vec<usize>> = held
            .iter()
            .map(|&n| {
                if n <= n_sink + keep_recent {
                    (0..n).collect()
                } else {
                    (0..n_sink).chain(n - keep_recent..n).collect()
                }
            })
            .collect();
        self.inner.retain(&keep)
    }
}

impl KvCache for StreamingCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        self.inner.device()
    }

    fn append(&mut self, block: KvBlock) -> Result<()> {
        const OP: &str = "StreamingCache::append";
        // Validate everything the storage checks before evicting, so that a bad block leaves
        // the cache unchanged. The newest token of a sequence is never evicted, so the last
        // held position of its first head is the last position appended.
        let s = self.config.shape;
        kv_core::check_block(&s, &block, OP)?;
        let last: Vec<Option<u32>> = (0..s.batch())
            .map(|b| self.inner.stream(b, 0).positions.last().copied())
            .collect();
        let counts = kv_core::check_positions(block.positions(), s.batch(), &last, OP)?;
        let incoming = counts.into_iter().max().unwrap_or(0);
        self.trim(self.config.recent.saturating_sub(incoming))?;
        self.inner.append(block)
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> Result<Attended> {
        self.inner.attend(query, stats)
    }

    fn end_prefill(&mut self) -> Result<()> {
        self.trim(self.config.recent)
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
