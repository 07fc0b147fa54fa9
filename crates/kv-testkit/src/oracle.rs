//! An attention oracle written with explicit loops on the host, independent of Burn: the
//! reference attention of `kv-core` is tested against it.

/// A row-major host tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, slowest first.
    pub dims: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Reads a Burn tensor.
    pub fn from_tensor<const D: usize>(t: &burn::prelude::Tensor<D>) -> Self {
        HostTensor {
            dims: t.dims().to_vec(),
            data: crate::to_vec(t),
        }
    }
    fn at4(&self, a: usize, b: usize, c: usize, d: usize) -> f32 {
        let [_, d1, d2, d3] = [self.dims[0], self.dims[1], self.dims[2], self.dims[3]];
        self.data[((a * d1 + b) * d2 + c) * d3 + d]
    }
}

/// Explicit-softmax attention: for every query head `i` (reading KV head `i / group`) and
/// query token at position `p`, `softmax_j(q·k_j / sqrt(d))` over the keys with position
/// `<= p` (`u32::MAX` marks padding, never attended), times V. A query that sees no key
/// outputs zeros.
///
/// `k_pos` has `batch * kv_heads * keys` entries (per head), `q_pos` `batch * q_len`.
///
/// # Panics
/// If the shapes disagree.
pub fn naive_attention(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    q_pos: &[u32],
    k_pos: &[u32],
) -> HostTensor {
    let (b, qh, n, d) = (q.dims[0], q.dims[1], q.dims[2], q.dims[3]);
    let (kvh, t) = (k.dims[1], k.dims[2]);
    assert_eq!(k.dims, v.dims);
    assert_eq!(k_pos.len(), b * kvh * t);
    let g = qh / kvh;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0f32; b * qh * n * d];
    for bi in 0..b {
        for hq in 0..qh {
            let hk = hq / g;
            for i in 0..n {
                let p = q_pos[bi * n + i];
                let visible: Vec<usize> = (0..t)
                    .filter(|&j| {
                        let kp = k_pos[(bi * kvh + hk) * t + j];
                        kp != u32::MAX && p != u32::MAX && kp <= p
                    })
                    .collect();
                if visible.is_empty() {
                    continue;
                }
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        (0..d)
                            .map(|c| {
                                f64::from(q.at4(bi, hq, i, c)) * f64::from(k.at4(bi, hk, j, c))
                            })
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    let acc: f64 = visible
                        .iter()
                        .zip(&e)
                        .map(|(&j, w)| w / z * f64::from(v.at4(bi, hk, j, c)))
                        .sum();
                    out[((bi * qh + hq) * n + i) * d + c] = acc as f32;
                }
            }
        }
    }
    HostTensor {
        dims: vec![b, qh, n, d],
        data: out,
    }
}
