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
    /// Budget as a compression ratio instead of `recent` (which must then be 0, as
    /// [`StreamingConfig::with_ratio`] sets it): the fraction of the prompt removed, in
    /// `[0, 1)`. At [`end_prefill`](KvCache::end_prefill) a sequence of `n` prompt tokens gets
    /// `B = floor(n (1 - ratio))` tokens per KV head (kvpress's count): the `n_sink` sinks and
    /// `B - n_sink` recent tokens. Nothing is evicted before `end_prefill`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
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
            ratio: None,
        }
    }

    /// `n_sink` sinks and the rest of `floor(n (1 - ratio))` recent tokens for a prompt of `n`
    /// (see [`StreamingConfig::ratio`]).
    pub fn with_ratio(shape: KvShape, n_sink: usize, ratio: f64) -> Self {
        let mut cfg = StreamingConfig::new(shape, n_sink, 0);
        cfg.ratio = Some(ratio);
        cfg
    }

    /// Validates and builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for `recent == 0` without a ratio, a ratio outside `[0, 1)`
    /// or a ratio together with a `recent` count.
    pub fn init(&self, device: &Device) -> Result<StreamingCache> {
        match self.ratio {
            Some(r) => {
                crate::budget::check_ratio(r)?;
                if self.recent != 0 {
                    return Err(KvError::InvalidConfig {
                        field: "ratio",
                        reason: "a ratio sets the budget; it cannot be combined with an explicit \
                                 recent count"
                            .into(),
                    });
                }
            }
            None if self.recent == 0 => {
                return Err(KvError::InvalidConfig {
                    field: "recent",
                    reason: "must keep at least 1 recent token".into(),
                });
            }
            None => {}
        }
        Ok(StreamingCache {
            config: self.clone(),
            inner: RaggedCacheConfig::new(self.shape)
                .with_dtype(self.dtype)
                .init(device)?,
            recent: self.fixed_recent(),
        })
    }

    fn fixed_recent(&self) -> Vec<Option<usize>> {
        let fixed = self.ratio.is_none().then_some(self.recent);
        vec![fixed; self.shape.batch()]
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
    /// Recent tokens kept per sequence, once known (from the start for a count, at
    /// `end_prefill` for a ratio).
    recent: Vec<Option<usize>>,
}

impl StreamingCache {
    /// The configuration.
    pub fn config(&self) -> &StreamingConfig {
        &self.config
    }

    /// The underlying ragged storage.
    pub fn storage(&self) -> &RaggedCache {
        &self.inner
    }

    /// The recent tokens sequence `b` keeps, once known.
    pub fn recent(&self, b: usize) -> Option<usize> {
        self.recent.get(b).copied().flatten()
    }

    /// The rows every stream of a sequence with a known budget keeps for `incoming` new
    /// tokens (per sequence): all of them up to `n_sink + recent - incoming`, else the sinks
    /// and the newest `recent - incoming` (by position: rows are in position order until the
    /// in-place path writes new tokens into evicted rows, which turns each stream into a ring).
    fn keep_lists(&self, incoming: &[usize]) -> Vec<Vec<usize>> {
        let held = self.inner.lengths().held;
        let n_sink = self.config.n_sink;
        let kvh = self.config.shape.kv_heads();
        (0..held.len())
            .map(|s| {
                let n = held[s];
                match self.recent[s / kvh].map(|r| r.saturating_sub(incoming[s / kvh])) {
                    Some(r) if n > n_sink + r => {
                        let pos = self.inner.positions(s / kvh, s % kvh);
                        crate::slots::keep_by_position(pos, pos, |_| {
                            (0..n_sink).chain(n - r..n).collect()
                        })
                    }
                    _ => (0..n).collect(),
                }
            })
            .collect()
    }

    fn retain(&mut self, keep: &[Vec<usize>]) -> Result<()> {
        let held = self.inner.lengths().held;
        if keep.iter().zip(&held).all(|(k, &n)| k.len() == n) {
            return Ok(());
        }
        self.inner.retain(keep)
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
        // the cache unchanged. The newest token of a sequence is never evicted before the
        // block is validated, so the largest held position of its first head is the last
        // position appended.
        let s = self.config.shape;
        kv_core::check_block(&s, &block, OP)?;
        let last: Vec<Option<u32>> = (0..s.batch())
            .map(|b| self.inner.positions(b, 0).iter().copied().max())
            .collect();
        let counts = kv_core::check_positions(block.positions(), s.batch(), &last, OP)?;
        // Evict, writing the new tokens into the evicted rows where one goes per token.
        let held = self.inner.lengths().held;
        let keep = self.keep_lists(&counts);
        let (keep, slots) = crate::slots::plan(&held, keep, &counts, s.kv_heads());
        self.retain(&keep)?;
        self.inner.append_into(block, &slots)
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> Result<Attended> {
        self.inner.attend(query, stats)
    }

    fn end_prefill(&mut self) -> Result<()> {
        if let Some(ratio) = self.config.ratio {
            let logical = self.inner.lengths().logical;
            let mut recent = self.recent.clone();
            for (b, slot) in recent.iter_mut().enumerate() {
                if slot.is_some() || logical[b] == 0 {
                    continue;
                }
                let total = crate::budget::kept_for(logical[b], ratio);
                if total <= self.config.n_sink {
                    return Err(KvError::InvalidConfig {
                        field: "ratio",
                        reason: format!(
                            "sequence {b}: ratio {ratio} keeps {total} of {} prompt tokens, \
                             not more than the {} sinks",
                            logical[b], self.config.n_sink
                        ),
                    });
                }
                *slot = Some(total - self.config.n_sink);
            }
            self.recent = recent;
        }
        let keep = self.keep_lists(&vec![0; self.config.shape.batch()]);
        self.retain(&keep)
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
        self.recent = self.config.fixed_recent();
    }
}
