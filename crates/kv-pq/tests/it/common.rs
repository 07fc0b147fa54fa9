//! Shared helpers: a host attention over an explicit subset of slots.

use kv_core::{KvView, PAD, Query};
use kv_testkit::to_vec;

/// Host attention of a one-token query where query head `hq` of sequence `b` attends to
/// `slots[b * q_heads + hq]` of the view (padding and later positions excluded).
pub(crate) fn subset_attention(view: &KvView, query: &Query, slots: &[Vec<usize>]) -> Vec<f32> {
    let [b, kvh, len, d] = view.keys.dims();
    let qh = query.tensor().dims()[1];
    let g = qh / kvh;
    let (k, v, q) = (
        to_vec(&view.keys),
        to_vec(&view.values),
        to_vec(query.tensor()),
    );
    let mut out = vec![0.0f32; b * qh * d];
    for bi in 0..b {
        let qp = query.positions()[bi];
        for hq in 0..qh {
            let h = hq / g;
            let row = |j: usize| ((bi * kvh + h) * len + j) * d;
            let seen: Vec<usize> = slots[bi * qh + hq]
                .iter()
                .copied()
                .filter(|&j| {
                    let p = view.positions[(bi * kvh + h) * len + j];
                    p != PAD && p <= qp
                })
                .collect();
            if seen.is_empty() {
                continue;
            }
            let qo = (bi * qh + hq) * d;
            let scores: Vec<f64> = seen
                .iter()
                .map(|&j| {
                    (0..d)
                        .map(|c| f64::from(q[qo + c]) * f64::from(k[row(j) + c]))
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..d {
                out[qo + c] = seen
                    .iter()
                    .zip(&e)
                    .map(|(&j, w)| w / z * f64::from(v[row(j) + c]))
                    .sum::<f64>() as f32;
            }
        }
    }
    out
}
