//! Plain host implementations of the few Llama pieces the fixture checks need (RMSNorm, a
//! linear layer, rotate-half RoPE), written to follow HF's fp32 arithmetic.

use kv_model::HostTensor;

/// HF `LlamaRMSNorm` on each row of `x` (`[rows, width]`): `w * x / sqrt(mean(x^2) + eps)`.
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let width = weight.len();
    x.chunks_exact(width)
        .flat_map(|row| {
            let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
            let inv = 1.0 / (mean_sq + eps).sqrt();
            row.iter().zip(weight).map(move |(v, w)| w * (v * inv))
        })
        .collect()
}

/// `x @ w^T` for `x: [rows, in]` and a PyTorch-layout weight `w: [out, in]`; returns `[rows, out]`.
pub(crate) fn linear(x: &[f32], w: &HostTensor) -> Vec<f32> {
    let (out, inn) = (w.shape[0], w.shape[1]);
    let mut y = Vec::with_capacity(x.len() / inn * out);
    for row in x.chunks_exact(inn) {
        for o in 0..out {
            let wr = &w.data[o * inn..(o + 1) * inn];
            y.push(row.iter().zip(wr).map(|(a, b)| a * b).sum());
        }
    }
    y
}

/// HF rotate-half RoPE, in place, on `x: [seq, heads, head_dim]` at positions `0..seq`.
pub(crate) fn rope_rotate_half(x: &mut [f32], heads: usize, head_dim: usize, theta: f32) {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    for (pos, token) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        for head in token.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let angle = pos as f32 * inv_freq[i];
                let (sin, cos) = angle.sin_cos();
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos - b * sin;
                head[i + half] = b * cos + a * sin;
            }
        }
    }
}

/// `[seq, heads, d]` to `[heads, seq, d]` (the fixtures' layout without the batch dimension).
pub(crate) fn seq_heads_to_heads_seq(x: &[f32], heads: usize, d: usize) -> Vec<f32> {
    let seq = x.len() / (heads * d);
    let mut y = vec![0.0; x.len()];
    for s in 0..seq {
        for h in 0..heads {
            let src = (s * heads + h) * d;
            let dst = (h * seq + s) * d;
            y[dst..dst + d].copy_from_slice(&x[src..src + d]);
        }
    }
    y
}

/// Largest absolute difference, and the largest magnitude in `reference`.
pub(crate) fn max_abs_diff(actual: &[f32], reference: &[f32]) -> (f32, f32) {
    assert_eq!(actual.len(), reference.len());
    let diff = actual
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let scale = reference.iter().map(|v| v.abs()).fold(0.0, f32::max);
    (diff, scale)
}
