//! The units of data that flow into a cache: key/value blocks and queries, with positions.

use burn::prelude::*;

use crate::{KvError, Result};

/// Marks a padding slot in a position list: never stored by ragged caches, never attended.
pub const PAD: u32 = u32::MAX;

/// Keys and values for `n` new tokens of every sequence in the batch, with their positions.
///
/// # Shapes
/// - `keys`, `values`: `[batch, kv_heads, n, head_dim]`
/// - `positions`: `batch * n` entries, row-major (`positions[b * n + i]` is the original
///   position of token `i` of sequence `b`); [`PAD`] marks padding tokens, which lets batches
///   of sequences with different lengths share one block.
#[derive(Debug, Clone)]
pub struct KvBlock {
    keys: Tensor<4>,
    values: Tensor<4>,
    positions: Vec<u32>,
}

impl KvBlock {
    /// Builds a block and checks that keys, values and positions agree.
    ///
    /// # Errors
    /// [`KvError::ShapeMismatch`] if keys and values differ in shape or the position count is
    /// not `batch * n`; [`KvError::Empty`] if `n` or `head_dim` is zero.
    pub fn new(keys: Tensor<4>, values: Tensor<4>, positions: Vec<u32>) -> Result<Self> {
        let kd = keys.dims();
        let vd = values.dims();
        for (i, what) in ["batch", "kv_heads", "seq", "head_dim"]
            .into_iter()
            .enumerate()
        {
            if kd[i] != vd[i] {
                return Err(KvError::ShapeMismatch {
                    op: "KvBlock::new",
                    what,
                    expected: kd[i],
                    got: vd[i],
                });
            }
        }
        if kd[2] == 0 || kd[3] == 0 || kd[0] == 0 || kd[1] == 0 {
            return Err(KvError::Empty {
                op: "KvBlock::new",
                what: "keys/values",
            });
        }
        if positions.len() != kd[0] * kd[2] {
            return Err(KvError::ShapeMismatch {
                op: "KvBlock::new",
                what: "positions (batch * seq)",
                expected: kd[0] * kd[2],
                got: positions.len(),
            });
        }
        Ok(KvBlock {
            keys,
            values,
            positions,
        })
    }

    /// A block whose tokens sit at positions `start..start + n` in every sequence.
    ///
    /// # Errors
    /// As [`KvBlock::new`].
    pub fn contiguous(keys: Tensor<4>, values: Tensor<4>, start: u32) -> Result<Self> {
        let [b, _, n, _] = keys.dims();
        let positions = contiguous_positions(b, n, start);
        KvBlock::new(keys, values, positions)
    }

    /// Keys, `[batch, kv_heads, n, head_dim]`.
    pub fn keys(&self) -> &Tensor<4> {
        &self.keys
    }
    /// Values, `[batch, kv_heads, n, head_dim]`.
    pub fn values(&self) -> &Tensor<4> {
        &self.values
    }
    /// Positions, `batch * n` entries, row-major.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }
    /// Tokens per sequence in this block (padding included).
    pub fn seq_len(&self) -> usize {
        self.keys.dims()[2]
    }
    /// Splits the block into its parts.
    pub fn into_parts(self) -> (Tensor<4>, Tensor<4>, Vec<u32>) {
        (self.keys, self.values, self.positions)
    }
}

/// Queries of `q_len` tokens for every sequence, with their positions (for the causal mask).
///
/// # Shapes
/// - `q`: `[batch, q_heads, q_len, head_dim]`, RoPE already applied at the true positions.
/// - `positions`: `batch * q_len` entries, row-major; a query at position `p` sees every held
///   key whose original position is `<= p`. A [`PAD`] query sees nothing and gets a zero output.
#[derive(Debug, Clone)]
pub struct Query {
    q: Tensor<4>,
    positions: Vec<u32>,
}

impl Query {
    /// Builds a query and checks the position count.
    ///
    /// # Errors
    /// [`KvError::ShapeMismatch`] if `positions.len() != batch * q_len`; [`KvError::Empty`] if
    /// `q_len` is zero.
    pub fn new(q: Tensor<4>, positions: Vec<u32>) -> Result<Self> {
        let [b, h, n, d] = q.dims();
        if b == 0 || h == 0 || n == 0 || d == 0 {
            return Err(KvError::Empty {
                op: "Query::new",
                what: "query",
            });
        }
        if positions.len() != b * n {
            return Err(KvError::ShapeMismatch {
                op: "Query::new",
                what: "positions (batch * q_len)",
                expected: b * n,
                got: positions.len(),
            });
        }
        Ok(Query { q, positions })
    }

    /// Queries at positions `start..start + q_len` in every sequence.
    ///
    /// # Errors
    /// As [`Query::new`].
    pub fn contiguous(q: Tensor<4>, start: u32) -> Result<Self> {
        let [b, _, n, _] = q.dims();
        Query::new(q, contiguous_positions(b, n, start))
    }

    /// The query tensor, `[batch, q_heads, q_len, head_dim]`.
    pub fn tensor(&self) -> &Tensor<4> {
        &self.q
    }
    /// Positions, `batch * q_len` entries, row-major.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }
    /// Query tokens per sequence.
    pub fn len(&self) -> usize {
        self.q.dims()[2]
    }
    /// Always false: a query holds at least one token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `batch * n` positions `start..start + n` repeated for every sequence.
pub fn contiguous_positions(batch: usize, n: usize, start: u32) -> Vec<u32> {
    (0..batch)
        .flat_map(|_| (0..n as u32).map(move |i| start + i))
        .collect()
}

/// Per-sequence positions (one list per sequence, all of one length) repeated for each of
/// `kv_heads` heads: the `batch * kv_heads * len` layout of [`KvView::positions`](crate::KvView::positions)
/// for caches whose heads hold the same tokens.
pub fn positions_per_head(per_sequence: &[Vec<u32>], kv_heads: usize) -> Vec<u32> {
    let len = per_sequence.first().map_or(0, Vec::len);
    let mut out = Vec::with_capacity(per_sequence.len() * kv_heads * len);
    for seq in per_sequence {
        for _ in 0..kv_heads {
            out.extend_from_slice(seq);
        }
    }
    out
}

/// Returns an error if the tensor holds NaN or infinity (one device reduction and a readback).
pub(crate) fn check_finite<const D: usize>(
    t: &Tensor<D>,
    op: &'static str,
    what: &'static str,
) -> Result<()> {
    let all_finite = t.clone().is_finite().all().into_scalar::<bool>();
    if all_finite {
        Ok(())
    } else {
        Err(KvError::NonFinite { op, what })
    }
}
