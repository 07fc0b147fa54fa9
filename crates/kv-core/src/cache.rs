//! The per-layer cache trait and the dense view every cache can produce.

use core::fmt::Debug;

use burn::prelude::*;

use crate::attention::{
    AttentionStats, KeyPositions, StatsRequest, reference_attention, reference_attention_lse,
};
use crate::block::{KvBlock, Query, check_finite};
use crate::memory::{HeldBuffer, MemoryReport};
use crate::shape::KvShape;
use crate::{KvError, Result};

/// Whether a cache stores keys before or after RoPE.
///
/// The model asks the cache with [`KvCache::key_rope`] and appends keys accordingly. Queries
/// always arrive rotated at their true positions; a [`KeyRope::PreRope`] cache rotates keys
/// itself when it attends (KVQuant quantizes pre-RoPE keys; StreamingLLM re-positions them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyRope {
    /// Keys are appended already rotated at their original positions (the common case).
    #[default]
    PostRope,
    /// Keys are appended unrotated; the cache applies RoPE when it attends.
    PreRope,
}

/// The output of [`KvCache::attend`].
#[derive(Debug, Clone)]
pub struct Attended {
    /// Attention output, `[batch, q_heads, q_len, head_dim]`.
    pub output: Tensor<4>,
    /// The statistics that were requested, over the keys the cache holds (see
    /// [`AttentionStats`] for the layout).
    pub stats: AttentionStats,
}

/// Tokens held and seen by a cache.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lengths {
    /// Tokens held per (sequence, KV head), `batch * kv_heads` entries, row-major.
    pub held: Vec<usize>,
    /// Tokens appended per sequence (padding excluded), `batch` entries.
    pub logical: Vec<usize>,
}

impl Lengths {
    /// The largest number of tokens any (sequence, KV head) holds.
    pub fn max_held(&self) -> usize {
        self.held.iter().copied().max().unwrap_or(0)
    }
    /// Tokens held summed over sequences and heads.
    pub fn total_held(&self) -> usize {
        self.held.iter().sum()
    }
}

/// A dense materialisation of what a cache holds, for tests, debugging and methods that need
/// plain tensors.
///
/// # Shapes
/// `keys`, `values`: `[batch, kv_heads, max_held, head_dim]` with keys post-RoPE (as attention
/// sees them); `positions`: `batch * kv_heads * max_held`, row-major, with
/// [`PAD`](crate::PAD) in slots a head does not fill (their keys and values are zero).
#[derive(Debug, Clone)]
pub struct KvView {
    /// Keys, post-RoPE, `[batch, kv_heads, max_held, head_dim]`.
    pub keys: Tensor<4>,
    /// Values, `[batch, kv_heads, max_held, head_dim]`.
    pub values: Tensor<4>,
    /// Original positions per (sequence, head, slot); `PAD` marks unfilled slots.
    pub positions: Vec<u32>,
}

impl KvView {
    /// Runs [`reference_attention`] over this view: the oracle for [`KvCache::attend`].
    pub fn attend_reference(&self, query: &Query, stats: StatsRequest) -> Attended {
        let (output, stats) = reference_attention(
            query.tensor().clone(),
            self.keys.clone(),
            self.values.clone(),
            query.positions(),
            KeyPositions::PerHead(&self.positions),
            None,
            stats,
        );
        Attended { output, stats }
    }

    /// Runs [`reference_attention_lse`] over this view: output and log-sum-exp.
    pub fn attend_reference_lse(&self, query: &Query) -> (Tensor<4>, Tensor<4>) {
        reference_attention_lse(
            query.tensor().clone(),
            self.keys.clone(),
            self.values.clone(),
            query.positions(),
            KeyPositions::PerHead(&self.positions),
            None,
        )
    }
}

/// One attention layer's KV store.
///
/// A cache owns its storage and computes attention itself, so that methods can use their own
/// fast paths and gather the statistics that eviction needs in the same pass. Prefill (many
/// tokens, possibly in chunks) and decode (one token per step) go through the same calls:
///
/// 1. [`append`](KvCache::append) the new tokens' keys and values (post-RoPE unless
///    [`key_rope`](KvCache::key_rope) says otherwise);
/// 2. [`attend`](KvCache::attend) with the new tokens' queries (a query sees every held key
///    whose original position is not after its own);
/// 3. after the last prefill chunk, [`end_prefill`](KvCache::end_prefill) (methods that
///    compress once after prefill do it here).
///
/// Every method that takes data returns an error for bad input (wrong heads or head_dim,
/// empty or non-finite tensors, capacity) and leaves the cache unchanged when it does.
pub trait KvCache: Send + Debug {
    /// The layer shape the cache was built for.
    fn shape(&self) -> KvShape;
    /// The device holding the storage.
    fn device(&self) -> &Device;
    /// Whether keys are appended pre- or post-RoPE.
    fn key_rope(&self) -> KeyRope {
        KeyRope::PostRope
    }
    /// Appends keys and values of new tokens.
    ///
    /// # Errors
    /// Shape, emptiness, finiteness, position and capacity problems; the cache is unchanged.
    fn append(&mut self, block: KvBlock) -> Result<()>;
    /// Attention of `query` over the held tokens, with the statistics `stats` asks for.
    ///
    /// # Errors
    /// Shape and finiteness problems of the query; the cache is unchanged.
    fn attend(&mut self, query: &Query, stats: StatsRequest) -> Result<Attended>;
    /// Signals the end of prefill: methods that compress once after prefill act here.
    ///
    /// # Errors
    /// Method-specific (for example a budget that cannot be met).
    fn end_prefill(&mut self) -> Result<()> {
        Ok(())
    }
    /// Attention of `query` over the held tokens together with the log-sum-exp of each query
    /// row's scaled scores (`[batch, kv_heads, group, q_len]`, `f32::MIN` for rows that see
    /// nothing), so that attention over several caches holding disjoint tokens can be merged
    /// exactly with [`merge_attention`](crate::merge_attention).
    ///
    /// The default runs [`reference_attention_lse`](crate::reference_attention_lse) over
    /// [`view`](KvCache::view), which materialises the cache; caches with a streamed path
    /// override it.
    ///
    /// # Errors
    /// Shape and finiteness problems of the query; the cache is unchanged.
    fn attend_lse(&mut self, query: &Query) -> Result<(Tensor<4>, Tensor<4>)> {
        check_query(&self.shape(), query, "KvCache::attend_lse")?;
        Ok(self.view().attend_reference_lse(query))
    }
    /// A dense view of what is held (post-RoPE keys).
    fn view(&self) -> KvView;
    /// Tokens held per (sequence, KV head) and seen per sequence.
    fn lengths(&self) -> Lengths;
    /// Bytes physically held against the dense equivalent.
    fn memory(&self) -> MemoryReport;
    /// Every buffer held, measured from the buffer itself (for the honest-memory contract).
    fn held_buffers(&self) -> Vec<HeldBuffer>;
    /// Drops everything held; the cache is as new.
    fn reset(&mut self);
}

/// Validates a block against a cache shape (shared by the caches of this crate and others).
///
/// # Errors
/// [`KvError::ShapeMismatch`] on batch, heads or head_dim; [`KvError::NonFinite`] on NaN/inf.
pub fn check_block(shape: &KvShape, block: &KvBlock, op: &'static str) -> Result<()> {
    let [b, h, _, d] = block.keys().dims();
    check_dim(op, "batch", shape.batch(), b)?;
    check_dim(op, "kv_heads", shape.kv_heads(), h)?;
    check_dim(op, "head_dim", shape.head_dim(), d)?;
    check_finite(block.keys(), op, "keys")?;
    check_finite(block.values(), op, "values")
}

/// Validates a query against a cache shape.
///
/// # Errors
/// [`KvError::ShapeMismatch`] on batch, heads or head_dim; [`KvError::NonFinite`] on NaN/inf.
pub fn check_query(shape: &KvShape, query: &Query, op: &'static str) -> Result<()> {
    let [b, h, _, d] = query.tensor().dims();
    check_dim(op, "batch", shape.batch(), b)?;
    check_dim(op, "q_heads", shape.q_heads(), h)?;
    check_dim(op, "head_dim", shape.head_dim(), d)?;
    check_finite(query.tensor(), op, "query")
}

fn check_dim(op: &'static str, what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(KvError::ShapeMismatch {
            op,
            what,
            expected,
            got,
        })
    }
}

/// Checks that the non-padding positions of each sequence in a block increase strictly and
/// come after `last[b]`, the last position already held for sequence `b`. Returns the number
/// of non-padding tokens per sequence.
///
/// # Errors
/// [`KvError::BadPositions`] naming the sequence and the offending positions.
pub fn check_positions(
    positions: &[u32],
    batch: usize,
    last: &[Option<u32>],
    op: &'static str,
) -> Result<Vec<usize>> {
    let n = positions.len() / batch.max(1);
    let mut counts = Vec::with_capacity(batch);
    for b in 0..batch {
        let mut prev = last[b];
        let mut count = 0;
        for &p in &positions[b * n..(b + 1) * n] {
            if p == crate::PAD {
                continue;
            }
            if let Some(q) = prev
                && p <= q
            {
                return Err(KvError::BadPositions {
                    op,
                    reason: format!(
                        "sequence {b}: position {p} does not come after {q} \
                         (positions must increase strictly)"
                    ),
                });
            }
            prev = Some(p);
            count += 1;
        }
        counts.push(count);
    }
    Ok(counts)
}
