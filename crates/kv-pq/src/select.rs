//! Exact attention of a one-token query over a query-dependent subset of the held tokens,
//! shared by the selection caches ([`QuestCache`](crate::QuestCache),
//! [`PqCache`](crate::PqCache)).
//!
//! Every query head selects its own tokens from its KV head: `idx` is
//! `[batch, kv_heads, group, k]` slot indices (query head `h * group + j` is `[.., h, j, ..]`).
//! Keys and values are gathered with one `select` on the flattened storage (no repeat of K/V
//! to query heads), scored, masked by position (a key after the query, or padding, is never
//! attended) and softmaxed with the row maximum subtracted, as in
//! [`kv_core::reference_attention`].

use burn::prelude::*;
use kv_core::{Attended, DenseCache, KvCache, PAD, Query, StatsRequest};

/// A selection cache's `attend`: the selected attention when the cache selected, else the
/// dense cache's exact attention. Statistics need every key, so a request for them always
/// takes the dense path (callers skip selecting then: see [`select_unless_stats`]).
pub(crate) fn selected_or_dense(
    selected: Option<(Tensor<4>, Tensor<4>)>,
    dense: &mut DenseCache,
    query: &Query,
    stats: StatsRequest,
) -> kv_core::Result<Attended> {
    if !stats.any()
        && let Some((output, _)) = selected
    {
        return Ok(Attended {
            output,
            stats: Default::default(),
        });
    }
    dense.attend(query, stats)
}

/// Runs `select` only when no statistics are requested.
pub(crate) fn select_unless_stats(
    stats: StatsRequest,
    select: impl FnOnce() -> Option<(Tensor<4>, Tensor<4>)>,
) -> Option<(Tensor<4>, Tensor<4>)> {
    if stats.any() { None } else { select() }
}

/// A selection cache's `attend_lse`: the selected attention with its log-sum-exp, else the
/// dense cache's.
pub(crate) fn selected_or_dense_lse(
    selected: Option<(Tensor<4>, Tensor<4>)>,
    dense: &mut DenseCache,
    query: &Query,
) -> kv_core::Result<(Tensor<4>, Tensor<4>)> {
    match selected {
        Some(r) => Ok(r),
        None => dense.attend_lse(query),
    }
}

fn to_i32(p: u32, pad: i32) -> i32 {
    if p == PAD {
        pad
    } else {
        i32::try_from(p).unwrap_or(i32::MAX - 1)
    }
}

/// Key positions per sequence as an `[batch, 1, 1, len]` i32 tensor (`PAD` → `i32::MAX`).
pub(crate) fn key_positions(
    positions: &[u32],
    b: usize,
    len: usize,
    device: &Device,
) -> Tensor<4, Int> {
    let kp: Vec<i32> = positions.iter().map(|&p| to_i32(p, i32::MAX)).collect();
    Tensor::<1, Int>::from_data(TensorData::new(kp, [b * len]), device)
        .reshape([b, 1, 1, len])
        .cast(burn::tensor::IntDType::I32)
}

/// Query positions as an `[batch, 1, 1, 1]` i32 tensor (`PAD` → −1: sees nothing).
pub(crate) fn query_positions(q_pos: &[u32], device: &Device) -> Tensor<4, Int> {
    let b = q_pos.len();
    let qp: Vec<i32> = q_pos.iter().map(|&p| to_i32(p, -1)).collect();
    Tensor::<1, Int>::from_data(TensorData::new(qp, [b]), device)
        .reshape([b, 1, 1, 1])
        .cast(burn::tensor::IntDType::I32)
}

/// A host boolean mask as a tensor of the given shape.
pub(crate) fn bool_tensor<const D: usize>(
    mask: Vec<bool>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D, Bool> {
    let n = mask.len();
    let ints: Vec<i32> = mask.into_iter().map(i32::from).collect();
    Tensor::<1, Int>::from_data(TensorData::new(ints, [n]), device)
        .reshape(shape)
        .equal_elem(1)
}

/// Per sequence: which of its `len` slots the query at `q_pos[b]` sees (not padding, position
/// not after the query), row-major `batch * len`, and how many.
pub(crate) fn visibility(positions: &[u32], len: usize, q_pos: &[u32]) -> (Vec<bool>, Vec<usize>) {
    let mut mask = Vec::with_capacity(positions.len());
    let mut counts = Vec::with_capacity(q_pos.len());
    for (b, &qp) in q_pos.iter().enumerate() {
        let row = &positions[b * len..(b + 1) * len];
        let before = mask.len();
        mask.extend(row.iter().map(|&p| p != PAD && qp != PAD && p <= qp));
        counts.push(mask[before..].iter().filter(|&&v| v).count());
    }
    (mask, counts)
}

/// Attention of a one-token query over the selected slots: returns the output
/// `[batch, q_heads, 1, head_dim]` and the log-sum-exp `[batch, kv_heads, group, 1]`
/// (`f32::MIN` for a row that sees nothing).
///
/// - `keys`, `values`: the held tokens in fp32, `[batch, kv_heads, len, head_dim]`;
/// - `key_pos`: the `[batch, 1, 1, len]` tensor of [`key_positions`];
/// - `idx`: `[batch, kv_heads, group, k]` slot indices `< len`, distinct per row;
/// - `ignore`: slots to leave out (`[batch, kv_heads, group, k]`), for example the tail of a
///   partial page.
pub(crate) fn attend_selected(
    q: &Tensor<4>,
    q_pos: &[u32],
    keys: Tensor<4>,
    values: Tensor<4>,
    key_pos: Tensor<4, Int>,
    idx: Tensor<4, Int>,
    ignore: Option<Tensor<4, Bool>>,
) -> (Tensor<4>, Tensor<4>) {
    let [b, qh, n, d] = q.dims();
    let [kb, kvh, len, kd] = keys.dims();
    let [ib, ih, g, k] = idx.dims();
    assert!(
        n == 1 && kb == b && kd == d && ib == b && ih == kvh && g * kvh == qh,
        "attend_selected: incompatible shapes q {:?} keys {:?} idx {:?}",
        q.dims(),
        keys.dims(),
        idx.dims()
    );
    let device = q.device();
    let rows = b * kvh * g;
    let offsets: Vec<i32> = (0..b * kvh).map(|s| (s * len) as i32).collect();
    let offsets = Tensor::<1, Int>::from_data(TensorData::new(offsets, [b * kvh]), &device)
        .reshape([b, kvh, 1, 1])
        .cast(burn::tensor::IntDType::from(idx.dtype()))
        .expand([b, kvh, g, k]);
    let flat = (idx.clone() + offsets).reshape([rows * k]);
    let ks = keys
        .reshape([b * kvh * len, d])
        .select(0, flat.clone())
        .reshape([rows, k, d]);
    let vs = values
        .reshape([b * kvh * len, d])
        .select(0, flat)
        .reshape([rows, k, d]);
    let kp = key_pos
        .expand([b, kvh, g, len])
        .gather(3, idx.cast(burn::tensor::IntDType::I32));
    let shape = [b, kvh, g, k];
    let mut mask = kp.greater(query_positions(q_pos, &device).expand(shape));
    if let Some(ignore) = ignore {
        mask = mask.bool_or(ignore);
    }
    let scale = 1.0 / (d as f32).sqrt();
    let scores = q
        .clone()
        .reshape([rows, 1, d])
        .matmul(ks.swap_dims(1, 2))
        .mul_scalar(scale)
        .reshape(shape)
        .mask_fill(mask, f32::NEG_INFINITY);
    let m = scores.clone().max_dim(3).clamp_min(f32::MIN);
    let e = (scores - m.clone()).exp();
    let denom = e.clone().sum_dim(3).clamp_min(f32::MIN_POSITIVE);
    let lse = (m + denom.clone().log()).clamp_min(f32::MIN);
    let p = e / denom;
    let out = p.reshape([rows, 1, k]).matmul(vs).reshape([b, qh, 1, d]);
    (out, lse)
}

/// Reads a selection back to the host: per (sequence, query head), the selected slots in
/// ascending order, without the ignored ones.
pub(crate) fn read_selection(
    idx: Tensor<4, Int>,
    ignore: Option<Tensor<4, Bool>>,
) -> Vec<Vec<usize>> {
    let [b, kvh, g, k] = idx.dims();
    let ids = idx
        .to_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("invariant: int tensors read back as i64");
    let skip = ignore.map(|m| {
        m.int()
            .to_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .expect("invariant: int tensors read back as i64")
    });
    (0..b * kvh * g)
        .map(|r| {
            let mut row: Vec<usize> = (0..k)
                .filter(|&j| skip.as_ref().is_none_or(|s| s[r * k + j] == 0))
                .map(|j| ids[r * k + j] as usize)
                .collect();
            row.sort_unstable();
            row
        })
        .collect()
}

/// Selection by per-token scores: the first `sinks` and last `recent` visible tokens of every
/// sequence, then the best-scoring visible ones, `total(visible)` tokens in all per query head.
/// Returns `None` (the dense path) when that covers every visible token.
///
/// `scores(())` is called only when a selection is needed and returns
/// `[batch, kv_heads, group, len]`.
pub(crate) fn top_tokens(
    shape: kv_core::KvShape,
    positions: &[u32],
    len: usize,
    q_pos: &[u32],
    sinks: usize,
    recent: usize,
    total: impl FnOnce(usize) -> usize,
    scores: impl FnOnce() -> Tensor<4>,
    device: &Device,
) -> Option<Tensor<4, Int>> {
    let (visible, counts) = visibility(positions, len, q_pos);
    let most = counts.iter().copied().max().unwrap_or(0);
    let total = total(most);
    if total >= most {
        return None;
    }
    let b = shape.batch();
    let mut forced = vec![false; b * len];
    for bi in 0..b {
        let row = &visible[bi * len..(bi + 1) * len];
        let seen: Vec<usize> = (0..len).filter(|&i| row[i]).collect();
        let tail = seen.len().saturating_sub(recent);
        for &i in seen.iter().take(sinks).chain(&seen[tail..]) {
            forced[bi * len + i] = true;
        }
    }
    let full = [b, shape.kv_heads(), shape.group(), len];
    let hidden = bool_tensor(visible, [b, 1, 1, len], device)
        .bool_not()
        .expand(full);
    let forced = bool_tensor(forced, [b, 1, 1, len], device).expand(full);
    let scores = scores()
        .reshape(full)
        .mask_fill(hidden, f32::NEG_INFINITY)
        .mask_fill(forced, f32::INFINITY);
    Some(scores.topk_with_indices(total, 3).1)
}
