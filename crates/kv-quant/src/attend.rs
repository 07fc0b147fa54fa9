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
/// from sign sketches): `fetch(range, q)` gets the scaled queries grouped per KV head,
/// `[batch, kv_heads, group * q_len, head_dim]` (row `j * q_len + i` is query token `i` of
/// the `j`-th query head of the group), and returns that chunk's scores `q · kᵀ`,
/// `[batch, kv_heads, group * q_len, range.len()]`, and its values in fp32.
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
    let rows = g * n;
    let device = q.device();
    let q = q
        .reshape([b, kv_heads, rows, d])
        .mul_scalar(1.0 / (d as f32).sqrt());
    let mut qp = Vec::with_capacity(b * rows);
    for bi in 0..b {
        for _ in 0..g {
            qp.extend(
                query.positions()[bi * n..(bi + 1) * n]
                    .iter()
                    .map(|&p| if p == PAD { -1 } else { to_i32(p) }),
            );
        }
    }
    let qp = int_tensor(qp, [b, 1, rows, 1], &device);
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
    let mut m = Tensor::<4>::full([b, kv_heads, rows, 1], f32::MIN, &device);
    let mut l = Tensor::<4>::zeros([b, kv_heads, rows, 1], &device);
    let mut acc = Tensor::<4>::zeros([b, kv_heads, rows, d], &device);
    let mut start = 0;
    while start < len {
        let end = next_end(start).clamp(start + 1, len);
        let c = end - start;
        let (scores, v) = fetch(start..end, &q);
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
    let lse = (m + l.clone().log())
        .clamp_min(f32::MIN)
        .reshape([b, kv_heads, g, n]);
    let out = acc / l.clamp_min(f32::MIN_POSITIVE);
    (
        out.reshape([b, kv_heads, g, n, d]).reshape([b, qh, n, d]),
        lse,
    )
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
