//! The reference attention: causal by positions, GQA without repeating K/V, stable softmax,
//! optional statistics. It is the oracle every other cache is tested against.

use burn::prelude::*;

use crate::block::PAD;

/// Statistics an attention call can return besides its output, for methods that score tokens
/// from the attention they see (H2O column sums, TOVA's last row) without a second pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsRequest {
    /// Sum of attention probabilities over the query tokens, per query head and key.
    pub column_sums: bool,
    /// Attention probabilities of the last query token, per query head and key.
    pub last_row: bool,
}

impl StatsRequest {
    /// No statistics.
    pub const NONE: StatsRequest = StatsRequest {
        column_sums: false,
        last_row: false,
    };
    /// Column sums only.
    pub const COLUMN_SUMS: StatsRequest = StatsRequest {
        column_sums: true,
        last_row: false,
    };
    /// Whether anything is requested.
    pub fn any(&self) -> bool {
        self.column_sums || self.last_row
    }
}

/// Statistics of one attention call over one key set.
///
/// # Shapes
/// Both tensors are `[batch, kv_heads, group, keys]`: query head `h * group + j` is entry
/// `[.., h, j, ..]`. Keys are in the order the cache holds them; for ragged caches, slots past
/// a head's length are zero.
#[derive(Debug, Clone, Default)]
pub struct AttentionStats {
    /// Σ over query tokens of the attention probability of each key.
    pub column_sums: Option<Tensor<4>>,
    /// The attention probabilities of the last query token.
    pub last_row: Option<Tensor<4>>,
}

/// Key positions for [`reference_attention`]: shared by all KV heads of a sequence
/// (`batch * keys` entries) or per head (`batch * kv_heads * keys` entries). [`PAD`] slots are
/// never attended.
#[derive(Debug, Clone, Copy)]
pub enum KeyPositions<'a> {
    /// `batch * keys` positions, row-major.
    PerSequence(&'a [u32]),
    /// `batch * kv_heads * keys` positions, row-major.
    PerHead(&'a [u32]),
}

/// Query rows processed at once, bounding the score matrix to `rows x keys` per head.
const QUERY_CHUNK: usize = 512;

/// Dense attention with a causal mask given by positions.
///
/// A query at position `p` attends to every key with position `<= p`; [`PAD`] keys are never
/// attended and a [`PAD`] query (or one that sees no key) gets a zero output. Keys are grouped
/// per KV head (query head `i` reads KV head `i / group`), without materialising repeated K/V.
/// Softmax subtracts the row maximum. `scale` defaults to `1/sqrt(head_dim)`.
///
/// # Shapes
/// - `q`: `[batch, q_heads, q_len, head_dim]`, `q_pos`: `batch * q_len`
/// - `k`, `v`: `[batch, kv_heads, keys, head_dim]`
/// - output: `[batch, q_heads, q_len, head_dim]`
///
/// # Panics
/// If the shapes disagree (a programmer error): names the operation and the shapes.
pub fn reference_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    q_pos: &[u32],
    k_pos: KeyPositions<'_>,
    scale: Option<f32>,
    stats: StatsRequest,
) -> (Tensor<4>, AttentionStats) {
    let (out, stats, _) = attention_impl(q, k, v, q_pos, k_pos, scale, stats, false);
    (out, stats)
}

/// [`reference_attention`] that also returns the log-sum-exp of every query row's scaled
/// scores, `[batch, kv_heads, group, q_len]` (query head `h * group + j` is `[.., h, j, ..]`).
///
/// Two attentions of the same queries over disjoint key sets combine exactly with
/// [`merge_attention`]; rows that see no key have a log-sum-exp of `f32::MIN` (standing for
/// −∞: such a part gets weight zero in a merge, and a row that sees nothing in either part
/// stays zero).
///
/// # Panics
/// As [`reference_attention`].
pub fn reference_attention_lse(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    q_pos: &[u32],
    k_pos: KeyPositions<'_>,
    scale: Option<f32>,
) -> (Tensor<4>, Tensor<4>) {
    let (out, _, lse) = attention_impl(q, k, v, q_pos, k_pos, scale, StatsRequest::NONE, true);
    (
        out,
        lse.expect("attention_impl returns the log-sum-exp when asked"),
    )
}

/// Combines two attention outputs of the same queries over disjoint key sets, each with its
/// log-sum-exp (as [`reference_attention_lse`] returns them), into the attention over the
/// union: `out = (e^{l1} o1 + e^{l2} o2) / (e^{l1} + e^{l2})`, computed stably. Returns the
/// merged output and log-sum-exp.
///
/// # Shapes
/// `o1`, `o2`: `[batch, q_heads, q_len, head_dim]`; `l1`, `l2`: `[batch, kv_heads, group,
/// q_len]`.
pub fn merge_attention(
    o1: Tensor<4>,
    l1: Tensor<4>,
    o2: Tensor<4>,
    l2: Tensor<4>,
) -> (Tensor<4>, Tensor<4>) {
    let [b, qh, n, _] = o1.dims();
    let lse_dims = l1.dims();
    let m = l1.clone().max_pair(l2.clone());
    let w1 = (l1 - m.clone()).exp();
    let w2 = (l2 - m.clone()).exp();
    let total = w1.clone() + w2.clone();
    let lse = m + total.clone().log();
    let col = |w: Tensor<4>| (w / total.clone()).reshape([b, qh, n, 1]);
    let out = o1 * col(w1) + o2 * col(w2);
    debug_assert_eq!(lse.dims(), lse_dims);
    (out, lse)
}

#[allow(
    clippy::too_many_arguments,
    reason = "the two public entry points share one body"
)]
fn attention_impl(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    q_pos: &[u32],
    k_pos: KeyPositions<'_>,
    scale: Option<f32>,
    stats: StatsRequest,
    want_lse: bool,
) -> (Tensor<4>, AttentionStats, Option<Tensor<4>>) {
    let [b, qh, n, d] = q.dims();
    let [kb, kvh, t, kd] = k.dims();
    assert!(
        kb == b && kd == d && v.dims() == k.dims() && qh % kvh == 0 && q_pos.len() == b * n,
        "reference_attention: incompatible shapes q {:?} k {:?} v {:?} q_pos {}",
        q.dims(),
        k.dims(),
        v.dims(),
        q_pos.len()
    );
    let g = qh / kvh;
    let device = q.device();
    if t == 0 {
        // No key at all: every query sees nothing. (Also avoids Burn's reshape, which reads a
        // 0 in the target shape as "keep this dimension".)
        let zeros = || Tensor::zeros([b, kvh, g, 0], &device);
        let stats = AttentionStats {
            column_sums: stats.column_sums.then(zeros),
            last_row: stats.last_row.then(zeros),
        };
        let lse = want_lse.then(|| Tensor::full([b, kvh, g, n], f32::MIN, &device));
        return (q.zeros_like(), stats, lse);
    }
    let scale = scale.unwrap_or(1.0 / (d as f32).sqrt());

    // Key positions as i32 with PAD -> i32::MAX so that `key > query` masks them.
    let (kp_host, kp_heads) = match k_pos {
        KeyPositions::PerSequence(p) => {
            assert_eq!(
                p.len(),
                b * t,
                "reference_attention: key positions {} != {b}*{t}",
                p.len()
            );
            (p, 1)
        }
        KeyPositions::PerHead(p) => {
            assert_eq!(
                p.len(),
                b * kvh * t,
                "reference_attention: per-head key positions {} != {b}*{kvh}*{t}",
                p.len()
            );
            (p, kvh)
        }
    };
    // Causal trimming: when every row's key positions are ascending (padding last), a query
    // chunk can only see a prefix of the keys; the rest is skipped instead of masked.
    let rows_sorted = kp_host
        .chunks(t)
        .all(|r| r.windows(2).all(|w| w[0] <= w[1]));
    let visible_prefix = |qmax: u32| -> usize {
        if !rows_sorted {
            return t;
        }
        kp_host
            .chunks(t)
            .map(|r| r.partition_point(|&p| p <= qmax))
            .max()
            .unwrap_or(t)
            .max(1)
    };
    let kp: Vec<i32> = kp_host.iter().map(|&p| to_key_i32(p)).collect();
    let kp = Tensor::<1, Int>::from_data(TensorData::new(kp, [kp_host.len()]), &device)
        .reshape([b, kp_heads, 1, t])
        .cast(burn::tensor::IntDType::I32);

    let q = q.reshape([b, kvh, g, n, d]);
    let k_t = k.swap_dims(2, 3);
    let mut outs = Vec::new();
    let mut col: Option<Tensor<4>> = None;
    let mut last: Option<Tensor<4>> = None;
    let mut lses = Vec::new();
    let mut start = 0;
    while start < n {
        let rows = QUERY_CHUNK.min(n - start);
        let qc = q
            .clone()
            .slice([0..b, 0..kvh, 0..g, start..start + rows, 0..d]);
        let qc = qc.reshape([b, kvh, g * rows, d]);
        // Query positions for rows (j, i) -> q_pos[b, start + i], PAD -> -1 (sees nothing).
        let mut qp = Vec::with_capacity(b * g * rows);
        for bi in 0..b {
            for _ in 0..g {
                for i in 0..rows {
                    qp.push(to_query_i32(q_pos[bi * n + start + i]));
                }
            }
        }
        let qp = Tensor::<1, Int>::from_data(TensorData::new(qp, [b * g * rows]), &device)
            .reshape([b, 1, g * rows, 1])
            .cast(burn::tensor::IntDType::I32);
        let qmax = (0..b)
            .flat_map(|bi| q_pos[bi * n + start..bi * n + start + rows].iter().copied())
            .filter(|&p| p != PAD)
            .max()
            .unwrap_or(0);
        let te = visible_prefix(qmax);
        let (kc, vc, kpc) = if te == t {
            (k_t.clone(), v.clone(), kp.clone())
        } else {
            (
                k_t.clone().slice([0..b, 0..kvh, 0..d, 0..te]),
                v.clone().slice([0..b, 0..kvh, 0..te, 0..d]),
                kp.clone().slice([0..b, 0..kp_heads, 0..1, 0..te]),
            )
        };
        let shape = [b, kvh, g * rows, te];
        let mask = kpc.expand(shape).greater(qp.expand(shape));

        let scores = qc.matmul(kc).mul_scalar(scale);
        let scores = scores.mask_fill(mask.clone(), f32::NEG_INFINITY);
        // A row that sees no key has max -inf; clamping keeps exp(-inf - MIN) = 0, no NaN.
        let m = scores.clone().max_dim(3).clamp_min(f32::MIN);
        let e = (scores - m.clone()).exp();
        let denom = e.clone().sum_dim(3).clamp_min(f32::MIN_POSITIVE);
        if want_lse {
            // A row that sees nothing: max f32::MIN, ln(MIN_POSITIVE) ≈ -87 -> clamp to MIN.
            let l = (m.clone() + denom.clone().log()).clamp_min(f32::MIN);
            lses.push(l.reshape([b, kvh, g, rows]));
        }
        let p = e / denom;
        outs.push(p.clone().matmul(vc).reshape([b, kvh, g, rows, d]));
        let widen = |x: Tensor<4>| {
            if te == t {
                x
            } else {
                Tensor::cat(vec![x, Tensor::zeros([b, kvh, g, t - te], &device)], 3)
            }
        };

        if stats.column_sums {
            let c = p
                .clone()
                .reshape([b, kvh, g, rows, te])
                .sum_dim(3)
                .reshape([b, kvh, g, te]);
            let c = widen(c);
            col = Some(match col {
                Some(acc) => acc + c,
                None => c,
            });
        }
        if stats.last_row && start + rows == n {
            let l =
                p.reshape([b, kvh, g, rows, te])
                    .slice([0..b, 0..kvh, 0..g, rows - 1..rows, 0..te]);
            last = Some(widen(l.reshape([b, kvh, g, te])));
        }
        start += rows;
    }
    let out = Tensor::cat(outs, 3).reshape([b, qh, n, d]);
    let lse = want_lse.then(|| Tensor::cat(lses, 3));
    (
        out,
        AttentionStats {
            column_sums: col,
            last_row: last,
        },
        lse,
    )
}

fn to_key_i32(p: u32) -> i32 {
    if p == PAD {
        i32::MAX
    } else {
        i32::try_from(p).unwrap_or(i32::MAX - 1)
    }
}

fn to_query_i32(p: u32) -> i32 {
    if p == PAD {
        -1
    } else {
        i32::try_from(p).unwrap_or(i32::MAX - 1)
    }
}
