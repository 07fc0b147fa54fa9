//! Streamed attention over a cache that is decoded chunk by chunk: each chunk of keys and
//! values is materialised in fp32, scored under the positional causal mask and merged into
//! running softmax statistics (row max, row sum, weighted values), so that a quantized cache
//! is never held in full precision at once. Shared by every cache of this crate; on CPU
//! backends decode-sized queries take the fused host kernels of [`crate::host`] instead.

use core::ops::Range;

use burn::prelude::*;
use burn::tensor::FloatDType;
use kv_core::{PAD, Query};

fn to_i32(p: u32) -> i32 {
    i32::try_from(p).unwrap_or(i32::MAX - 1)
}

fn int_tensor(data: Vec<i32>, shape: [usize; 4], device: &Device) -> Tensor<4, Int> {
    Tensor::<1, Int>::from_data(
        TensorData::new(data, [shape.iter().product::<usize>()]),
        device,
    )
    .reshape(shape)
    .cast(burn::tensor::IntDType::I32)
}

/// Attention of `query` over `len` held tokens whose original positions are `positions`
/// (one list per sequence, `len` entries each, [`PAD`] never attended).
///
/// `next_end(start)` gives the end of the chunk that starts at `start` (it must be greater
/// than `start`); `fetch(range)` returns that chunk's keys and values in fp32,
/// `[batch, kv_heads, range.len(), head_dim]`. The scale is `1/sqrt(head_dim)`. A query that
/// sees no key gets a zero output, as in [`kv_core::reference_attention`].
///
/// Returns the output `[batch, q_heads, q_len, head_dim]` and the log-sum-exp of every query
/// row's scaled scores, `m + ln(l)` from the running max `m` and sum `l`,
/// `[batch, kv_heads, group, q_len]` (`f32::MIN` for rows that see nothing), as
/// [`kv_core::reference_attention_lse`] returns them.
pub(crate) fn attend_streamed(
    query: &Query,
    kv_heads: usize,
    len: usize,
    positions: &[Vec<u32>],
    next_end: impl FnMut(usize) -> usize,
    mut fetch: impl FnMut(Range<usize>) -> (Tensor<4>, Tensor<4>),
) -> (Tensor<4>, Tensor<4>) {
    attend_streamed_scores(query, kv_heads, len, positions, next_end, |range, q| {
        let (k, v) = fetch(range);
        (q.clone().matmul(k.swap_dims(2, 3)), v)
    })
}

/// [`attend_streamed`] for caches that compute scores without materialising keys (QJL scores
/// from sign sketches): `fetch(range, q)` gets the scaled queries of one block of at most
/// [`QUERY_CHUNK`] query tokens grouped per KV head, `[batch, kv_heads, group * nq,
/// head_dim]` (row `j * nq + i` is the block's query token `i` of the `j`-th query head of
/// the group), and returns that chunk's scores `q · kᵀ`, `[batch, kv_heads, group * nq,
/// range.len()]`, and its values in fp32.
///
/// Query tokens go in blocks of [`QUERY_CHUNK`], each over the key chunks up to the last key
/// it can see (when key positions ascend), so a prefill scores about half the key chunks and
/// a key chunk may be fetched once per block.
pub(crate) fn attend_streamed_scores(
    query: &Query,
    kv_heads: usize,
    len: usize,
    positions: &[Vec<u32>],
    mut next_end: impl FnMut(usize) -> usize,
    mut fetch: impl FnMut(Range<usize>, &Tensor<4>) -> (Tensor<4>, Tensor<4>),
) -> (Tensor<4>, Tensor<4>) {
    let q = query.tensor().clone();
    let [b, qh, n, d] = q.dims();
    let g = qh / kv_heads;
    let device = q.device();
    let q = q
        .reshape([b, kv_heads, g, n, d])
        .mul_scalar(1.0 / (d as f32).sqrt());
    // Key positions of every held token, sent to the device once and sliced per chunk.
    let mut kp = Vec::with_capacity(b * len);
    for p in positions {
        kp.extend(
            p[..len]
                .iter()
                .map(|&p| if p == PAD { i32::MAX } else { to_i32(p) }),
        );
    }
    let kp = int_tensor(kp, [b, 1, 1, len], &device);
    let visible = VisiblePrefix::new(positions, len);
    let mut outs = Vec::with_capacity(n.div_ceil(QUERY_CHUNK));
    let mut lses = Vec::with_capacity(n.div_ceil(QUERY_CHUNK));
    let mut q0 = 0;
    while q0 < n {
        let q1 = (q0 + QUERY_CHUNK).min(n);
        let nq = q1 - q0;
        let rows = g * nq;
        let qc = q
            .clone()
            .slice([0..b, 0..kv_heads, 0..g, q0..q1, 0..d])
            .reshape([b, kv_heads, rows, d]);
        let mut qp = Vec::with_capacity(b * rows);
        let mut qmax = None;
        for bi in 0..b {
            let ps = &query.positions()[bi * n + q0..bi * n + q1];
            qmax = ps.iter().copied().filter(|&p| p != PAD).chain(qmax).max();
            for _ in 0..g {
                qp.extend(ps.iter().map(|&p| if p == PAD { -1 } else { to_i32(p) }));
            }
        }
        let qp = int_tensor(qp, [b, 1, rows, 1], &device);
        // Key chunks past the last key any query of this block can see contribute exactly
        // nothing (every score is masked): they are skipped, which halves a prefill's work.
        let te = qmax.map_or(0, |m| visible.end(m));
        let mut m = Tensor::<4>::full([b, kv_heads, rows, 1], f32::MIN, &device);
        let mut l = Tensor::<4>::zeros([b, kv_heads, rows, 1], &device);
        let mut acc = Tensor::<4>::zeros([b, kv_heads, rows, d], &device);
        let mut start = 0;
        while start < te {
            let end = next_end(start).clamp(start + 1, len);
            let c = end - start;
            let (scores, v) = fetch(start..end, &qc);
            let kpc = kp.clone().slice([0..b, 0..1, 0..1, start..end]);
            let shape = [b, kv_heads, rows, c];
            let mask = kpc.expand(shape).greater(qp.clone().expand(shape));
            let scores = scores.mask_fill(mask, f32::NEG_INFINITY);
            let m_new = m.clone().max_pair(scores.clone().max_dim(3));
            let corr = (m - m_new.clone()).exp();
            let p = (scores - m_new.clone()).exp();
            l = l * corr.clone() + p.clone().sum_dim(3);
            acc = acc * corr + p.matmul(v);
            m = m_new;
            start = end;
        }
        // A row that sees nothing keeps m = f32::MIN and l = 0: ln gives -inf, clamped to MIN.
        lses.push(
            (m + l.clone().log())
                .clamp_min(f32::MIN)
                .reshape([b, kv_heads, g, nq]),
        );
        outs.push((acc / l.clamp_min(f32::MIN_POSITIVE)).reshape([b, kv_heads, g, nq, d]));
        q0 = q1;
    }
    (
        Tensor::cat(outs, 3).reshape([b, qh, n, d]),
        Tensor::cat(lses, 3),
    )
}

/// Query tokens attended per block by [`attend_streamed_scores`]: bounds the score tensor of
/// one key chunk and lets each block stop at the last key it can see.
const QUERY_CHUNK: usize = 512;

/// The end of the key prefix that queries up to a position can see, when every sequence's
/// key positions ascend (padding, [`PAD`] = `u32::MAX`, sorts last); otherwise every key.
struct VisiblePrefix<'a> {
    positions: Option<&'a [Vec<u32>]>,
    len: usize,
}

impl<'a> VisiblePrefix<'a> {
    fn new(positions: &'a [Vec<u32>], len: usize) -> Self {
        let sorted = positions
            .iter()
            .all(|p| p[..len].windows(2).all(|w| w[0] <= w[1]));
        Self {
            positions: sorted.then_some(positions),
            len,
        }
    }

    /// One past the last key whose position is at most `qmax` in any sequence.
    fn end(&self, qmax: u32) -> usize {
        match self.positions {
            Some(ps) => ps
                .iter()
                .map(|p| p[..self.len].partition_point(|&x| x <= qmax))
                .max()
                .unwrap_or(self.len),
            None => self.len,
        }
    }
}

/// Attention over an empty cache: zero output and a log-sum-exp of `f32::MIN` for every row.
pub(crate) fn empty_lse(query: &Query, kv_heads: usize) -> (Tensor<4>, Tensor<4>) {
    let [b, qh, n, _] = query.tensor().dims();
    let device = query.tensor().device();
    (
        query.tensor().zeros_like(),
        Tensor::full([b, kv_heads, qh / kv_heads, n], f32::MIN, &device),
    )
}

/// `t`, the held tokens `range` in fp32, with the tokens that `over` covers (the cache index
/// of its first token and the tokens as the window held them) read from `over` instead: the
/// window tokens an append just quantized, which the reference still attends in full precision.
pub(crate) fn overlay_tokens(
    t: Tensor<4>,
    range: Range<usize>,
    over: Option<&(usize, Tensor<4>)>,
) -> Tensor<4> {
    let Some((p0, x)) = over else { return t };
    let (s, e) = (range.start.max(*p0), range.end.min(p0 + x.dims()[2]));
    if s >= e {
        return t;
    }
    let [b, h, _, d] = x.dims();
    let part = x
        .clone()
        .slice([0..b, 0..h, s - p0..e - p0, 0..d])
        .cast(FloatDType::F32);
    t.slice_assign([0..b, 0..h, s - range.start..e - range.start, 0..d], part)
}

#[cfg(test)]
mod tests {
    use core::cell::RefCell;

    use kv_core::{KeyPositions, reference_attention_lse};
    use kv_testkit::{assert_close, seeded_tensor, test_device};

    use super::*;

    /// Streams `q` over dense `k`/`v` in chunks of `chunk` keys, checks the output and the
    /// log-sum-exp against the reference attention and returns the key ranges fetched.
    fn streamed_equals_reference(
        q: &Query,
        k: &Tensor<4>,
        v: &Tensor<4>,
        positions: &[Vec<u32>],
        chunk: usize,
    ) -> Vec<Range<usize>> {
        let [b, h, len, d] = k.dims();
        let fetched = RefCell::new(Vec::new());
        let (out, lse) = attend_streamed(
            q,
            h,
            len,
            positions,
            |s| s + chunk,
            |r| {
                fetched.borrow_mut().push(r.clone());
                (
                    k.clone().slice([0..b, 0..h, r.clone(), 0..d]),
                    v.clone().slice([0..b, 0..h, r, 0..d]),
                )
            },
        );
        let kp = positions.concat();
        let (want, want_lse) = reference_attention_lse(
            q.tensor().clone(),
            k.clone(),
            v.clone(),
            q.positions(),
            KeyPositions::PerSequence(&kp),
            None,
        );
        assert_close(&out, &want, 1e-5, 1e-4);
        assert_close(&lse, &want_lse, 1e-5, 1e-4);
        fetched.into_inner()
    }

    #[test]
    fn query_blocks_skip_unseen_chunks_and_equal_the_reference() {
        let d = test_device();
        let len = 1200;
        let k = seeded_tensor([2, 2, len, 8], 1, 1.0, &d);
        let v = seeded_tensor([2, 2, len, 8], 2, 1.0, &d);
        // Sequence 1 is padded at the end: its last 50 keys and queries are PAD.
        let mut positions = vec![(0..len as u32).collect::<Vec<_>>(); 2];
        positions[1][len - 50..].fill(PAD);
        let q = Query::new(
            seeded_tensor([2, 4, len, 8], 3, 2.0, &d),
            positions.concat(),
        )
        .expect("query");
        let fetched = streamed_equals_reference(&q, &k, &v, &positions, 100);
        // Query blocks 0..512, 512..1024, 1024..1200 see 6, 11 and 12 chunks of 100 keys.
        assert_eq!(fetched.len(), 6 + 11 + 12, "{fetched:?}");
        assert!(fetched[..6].iter().all(|r| r.start < 512));
    }

    #[test]
    fn unsorted_positions_stream_every_chunk() {
        let d = test_device();
        let (len, chunk) = (700, 128);
        let k = seeded_tensor([1, 1, len, 4], 4, 1.0, &d);
        let v = seeded_tensor([1, 1, len, 4], 5, 1.0, &d);
        // Keys held newest first: no prefix bound holds, so every block reads every chunk.
        let positions = vec![(0..len as u32).rev().collect::<Vec<_>>()];
        let q = Query::contiguous(seeded_tensor([1, 2, 600, 4], 6, 2.0, &d), 0).expect("query");
        let fetched = streamed_equals_reference(&q, &k, &v, &positions, chunk);
        assert_eq!(fetched.len(), 2 * len.div_ceil(chunk));
    }
}
