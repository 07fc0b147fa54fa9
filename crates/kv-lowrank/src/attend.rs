//! Attention over key parts of different widths: each part has its own transformed query
//! (channels kept by ThinK, a PCA space for Loki and Eigen Attention) and its own keys, all
//! parts share one softmax. Causal by positions as in `kv_core::reference_attention`, chunked
//! over query rows so the score matrix stays bounded.

use burn::prelude::*;
use burn::tensor::IntDType;
use kv_core::PAD;

/// Query tokens processed at once (times the GQA group in rows).
pub(crate) const QUERY_CHUNK: usize = 256;

/// The keys of some slots with the query they are scored against.
pub(crate) struct Part {
    /// The query transformed for this part, grouped: `[batch, kv_heads, group, q_len, dk]`.
    pub(crate) q: Tensor<5>,
    /// `[batch, kv_heads, t, dk]`, `t > 0`.
    pub(crate) keys: Tensor<4>,
    /// `[batch, kv_heads, t, dv]` (the same `dv` for every part).
    pub(crate) values: Tensor<4>,
    /// Per-sequence positions of the slots, `batch * t`, row-major.
    pub(crate) positions: Vec<u32>,
}

/// `[batch, q_heads, n, d]` to `[batch, kv_heads, group, n, d]` (query head `h * group + j`).
pub(crate) fn group_query(q: Tensor<4>, kv_heads: usize) -> Tensor<5> {
    let [b, qh, n, d] = q.dims();
    q.reshape([b, kv_heads, qh / kv_heads, n, d])
}

/// Multiplies a grouped query (or output) `[b, h, g, n, d]` by one matrix per KV head
/// `[h, d, r]`, giving `[b, h, g, n, r]`.
pub(crate) fn project_grouped(x: Tensor<5>, m: &Tensor<3>) -> Tensor<5> {
    let [b, h, g, n, d] = x.dims();
    let r = m.dims()[2];
    x.reshape([b, h, g * n, d])
        .matmul(m.clone().unsqueeze::<4>())
        .reshape([b, h, g, n, r])
}

/// Multiplies keys or values `[b, h, t, d]` by one matrix per KV head `[h, d, r]`.
pub(crate) fn project(x: Tensor<4>, m: &Tensor<3>) -> Tensor<4> {
    x.matmul(m.clone().unsqueeze::<4>())
}

/// A `[b, h, d, r]`-broadcastable transpose of per-head matrices `[h, d, r]` -> `[h, r, d]`.
pub(crate) fn transpose_heads(m: &Tensor<3>) -> Tensor<3> {
    m.clone().swap_dims(1, 2)
}

fn key_i32(p: u32) -> i32 {
    if p == PAD {
        i32::MAX
    } else {
        i32::try_from(p).unwrap_or(i32::MAX - 1)
    }
}

fn query_i32(p: u32) -> i32 {
    if p == PAD {
        -1
    } else {
        i32::try_from(p).unwrap_or(i32::MAX - 1)
    }
}

/// `true` where key `j` must not be seen by query row `(group j, token i)` of the chunk:
/// `[b, h, g * rows, t]`.
fn causal_mask(
    q_pos: &[u32],
    n: usize,
    range: core::ops::Range<usize>,
    k_pos: &[u32],
    [b, h, g, t]: [usize; 4],
    device: &Device,
) -> Tensor<4, Bool> {
    let rows = range.len();
    let kp: Vec<i32> = k_pos.iter().map(|&p| key_i32(p)).collect();
    let kp = Tensor::<1, Int>::from_data(TensorData::new(kp, [b * t]), device)
        .cast(IntDType::I32)
        .reshape([b, 1, 1, t]);
    let mut qp = Vec::with_capacity(b * g * rows);
    for bi in 0..b {
        for _ in 0..g {
            for i in range.clone() {
                qp.push(query_i32(q_pos[bi * n + i]));
            }
        }
    }
    let qp = Tensor::<1, Int>::from_data(TensorData::new(qp, [b * g * rows]), device)
        .cast(IntDType::I32)
        .reshape([b, 1, g * rows, 1]);
    let shape = [b, h, g * rows, t];
    kp.expand(shape).greater(qp.expand(shape))
}

/// A hook that masks more keys of the first part for a chunk of query tokens: it gets the
/// chunk's token range and the causal mask `[b, h, g * rows, t]` and returns the keys to drop
/// (`true`), of the same shape.
pub(crate) type DropHook<'a> =
    &'a dyn Fn(core::ops::Range<usize>, &Tensor<4, Bool>) -> Tensor<4, Bool>;

/// Softmax attention of every part's query over its keys, one softmax over all parts, scaled
/// by `scale`; returns `[batch, kv_heads, group, q_len, dv]`. Query rows that see no key get
/// zeros.
///
/// # Panics
/// If no part is given or the shapes of the parts disagree (programmer errors).
pub(crate) fn attend_parts(
    parts: &[Part],
    q_pos: &[u32],
    scale: f32,
    hook: Option<DropHook<'_>>,
) -> Tensor<5> {
    assert!(!parts.is_empty(), "attend_parts: no key part");
    let [b, h, g, n, _] = parts[0].q.dims();
    let dv = parts[0].values.dims()[3];
    let device = parts[0].q.device();
    let mut outs = Vec::new();
    let mut start = 0;
    while start < n {
        let end = (start + QUERY_CHUNK).min(n);
        let rows = end - start;
        let mut scores = Vec::with_capacity(parts.len());
        let mut widths = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let dk = part.q.dims()[4];
            let t = part.keys.dims()[2];
            assert!(
                part.keys.dims()[3] == dk
                    && part.values.dims()[2] == t
                    && part.positions.len() == b * t,
                "attend_parts: part {i}: q {:?} keys {:?} values {:?} positions {}",
                part.q.dims(),
                part.keys.dims(),
                part.values.dims(),
                part.positions.len()
            );
            let qc = part
                .q
                .clone()
                .slice([0..b, 0..h, 0..g, start..end, 0..dk])
                .reshape([b, h, g * rows, dk]);
            let s = qc
                .matmul(part.keys.clone().swap_dims(2, 3))
                .mul_scalar(scale);
            let mask = causal_mask(q_pos, n, start..end, &part.positions, [b, h, g, t], &device);
            let s = match (i, hook) {
                (0, Some(hook)) => {
                    let extra = hook(start..end, &mask);
                    s.mask_fill(extra, f32::NEG_INFINITY)
                }
                _ => s,
            };
            scores.push(s.mask_fill(mask, f32::NEG_INFINITY));
            widths.push(t);
        }
        let s = if scores.len() == 1 {
            scores.pop().expect("one part")
        } else {
            Tensor::cat(scores, 3)
        };
        // A row that sees nothing has max -inf; clamping keeps exp(-inf - MIN) = 0, no NaN.
        let m = s.clone().max_dim(3).clamp_min(f32::MIN);
        let e = (s - m).exp();
        let denom = e.clone().sum_dim(3).clamp_min(f32::MIN_POSITIVE);
        let p = e / denom;
        let total: usize = widths.iter().sum();
        let mut out: Option<Tensor<4>> = None;
        let mut off = 0;
        for (part, &t) in parts.iter().zip(&widths) {
            let pp = if t == total {
                p.clone()
            } else {
                p.clone().slice([0..b, 0..h, 0..g * rows, off..off + t])
            };
            let o = pp.matmul(part.values.clone());
            out = Some(match out {
                Some(acc) => acc + o,
                None => o,
            });
            off += t;
        }
        let out = out.expect("at least one part");
        outs.push(out.reshape([b, h, g, rows, dv]));
        start = end;
    }
    if outs.len() == 1 {
        outs.pop().expect("one chunk")
    } else {
        Tensor::cat(outs, 3)
    }
}
