//! The scoring functions, over plain tensors: each reproduces one kvpress 0.5.5 press's
//! `score` (higher = keep), so that they can be checked against kvpress's own scores.
//!
//! Every function returns scores `[batch, kv_heads, n]` over the `n` tokens of a layer (token
//! `j` is the `j`-th held token, which at the end of a prefill from position 0 is position
//! `j`). Tokens a method always keeps (SnapKV's window, TOVA's last token, the sinks of
//! ExpectedAttention) get `max + 1` as kvpress gives them, `max` over the whole tensor.

use burn::prelude::*;
use burn::tensor::activation::softmax;
use kv_core::{KvError, Result, Rope, RopeConvention};

use crate::gqa::GqaReduce;

/// Copies a tensor to the host as `f32`s.
///
/// # Errors
/// [`KvError::ShapeMismatch`] if the backend returns a different number of elements.
pub fn to_host<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    let n = t.shape().num_elements();
    let v = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default();
    if v.len() == n {
        Ok(v)
    } else {
        Err(KvError::ShapeMismatch {
            op: "kv_evict::to_host",
            what: "elements read back",
            expected: n,
            got: v.len(),
        })
    }
}

/// Adds `count` columns valued `max + 1` (the maximum over the whole tensor) in front of or
/// after the scores, as kvpress's `F.pad(scores, ..., value=scores.max().item() + 1)`.
pub fn pad_with_max(scores: Tensor<3>, count: usize, front: bool) -> Tensor<3> {
    if count == 0 {
        return scores;
    }
    let [b, h, n] = scores.dims();
    let device = scores.device();
    let top = if n == 0 {
        0.0
    } else {
        scores.clone().max().into_scalar::<f32>()
    };
    let pad = Tensor::<3>::full([b, h, count], top + 1.0, &device);
    if n == 0 {
        pad
    } else if front {
        Tensor::cat(vec![pad, scores], 2)
    } else {
        Tensor::cat(vec![scores, pad], 2)
    }
}

/// KNorm (kvpress `KnormPress`): `-‖k_j‖₂`, so that low-norm keys are kept.
///
/// # Shapes
/// `keys`: `[batch, kv_heads, n, head_dim]` (post-RoPE, as cached). Output `[batch, kv_heads, n]`.
pub fn knorm(keys: Tensor<4>) -> Tensor<3> {
    let [b, h, n, _] = keys.dims();
    keys.square().sum_dim(3).sqrt().neg().reshape([b, h, n])
}

/// KeyDiff (kvpress `KeyDiffPress`): minus the cosine similarity of each key to the anchor,
/// the mean of the L2-normalised keys of its head (torch `F.normalize` with `eps = 1e-12`,
/// `F.cosine_similarity` with `eps = 1e-8`).
///
/// # Shapes
/// As [`knorm`].
pub fn keydiff(keys: Tensor<4>) -> Tensor<3> {
    let [b, h, n, _] = keys.dims();
    let norm = keys.clone().square().sum_dim(3).sqrt();
    let anchor = (keys.clone() / norm.clone().clamp_min(1e-12)).mean_dim(2);
    let anchor_norm = anchor.clone().square().sum_dim(3).sqrt().clamp_min(1e-8);
    let a = anchor / anchor_norm;
    let k = keys / norm.clamp_min(1e-8);
    (k * a).sum_dim(3).neg().reshape([b, h, n])
}

/// StreamingLLM (kvpress `StreamingLLMPress`): 1 everywhere except the `n_pruned = n -
/// floor(n (1 - ratio))` tokens right after the `n_sink` sinks, which get 0; top-k then keeps
/// the sinks and the most recent tokens.
pub fn streaming_llm(
    batch: usize,
    kv_heads: usize,
    n: usize,
    n_sink: usize,
    ratio: f64,
    device: &Device,
) -> Tensor<3> {
    streaming_llm_kept(
        batch,
        kv_heads,
        n,
        n_sink,
        crate::budget::kept_for(n, ratio),
        device,
    )
}

/// [`streaming_llm`] for a given number of kept tokens (`n_pruned = n - kept`), as used by
/// decode-time compression to a target size.
pub fn streaming_llm_kept(
    batch: usize,
    kv_heads: usize,
    n: usize,
    n_sink: usize,
    kept: usize,
    device: &Device,
) -> Tensor<3> {
    let n_pruned = n - kept.min(n);
    let row: Vec<f32> = (0..n)
        .map(|j| {
            if j >= n_sink && j < n_sink + n_pruned {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    Tensor::<1>::from_data(TensorData::new(row, [n]), device)
        .reshape([1, 1, n])
        .expand([batch, kv_heads, n])
}

/// One-dimensional average pooling along the last axis with stride 1 and zero padding
/// `kernel / 2` on both sides, dividing by `kernel` (torch `F.avg_pool1d` with its default
/// `count_include_pad=True`). `kernel` must be odd, so that the length is preserved.
///
/// # Panics
/// If `kernel` is even or zero.
pub fn avg_pool_include_pad(t: Tensor<4>, kernel: usize) -> Tensor<4> {
    assert!(
        kernel % 2 == 1,
        "avg_pool_include_pad: kernel {kernel} must be odd"
    );
    if kernel == 1 {
        return t;
    }
    let [b, h, g, n] = t.dims();
    let p = kernel / 2;
    let device = t.device();
    let z = Tensor::<4>::zeros([b, h, g, p], &device);
    let padded = Tensor::cat(vec![z.clone(), t, z], 3);
    let mut acc = padded.clone().slice([0..b, 0..h, 0..g, 0..n]);
    for s in 1..kernel {
        acc = acc + padded.clone().slice([0..b, 0..h, 0..g, s..s + n]);
    }
    acc.div_scalar(kernel as f32)
}

/// SnapKV (kvpress `SnapKVPress`) from the window's attention.
///
/// `window_col_sums` holds, per query head, the attention probabilities of the last `window`
/// queries summed over those queries, for the `n - window` keys before the window: `[batch,
/// kv_heads, group, n - window]`. Scores are the mean over the window queries, average-pooled
/// ([`avg_pool_include_pad`]), reduced over the group, then the `window` tokens get `max + 1`.
pub fn snapkv(
    window_col_sums: Tensor<4>,
    window: usize,
    kernel: usize,
    reduce: GqaReduce,
) -> Tensor<3> {
    let mean = window_col_sums.div_scalar(window as f32);
    let pooled = avg_pool_include_pad(mean, kernel);
    pad_with_max(reduce.reduce(pooled), window, false)
}

/// TOVA (kvpress `TOVAPress`) from the last query's attention row `[batch, kv_heads, group,
/// n]` (over all `n` tokens, itself included): the row without its last column, averaged over
/// *all* query heads of the layer, shared by every KV head; the last token gets `max + 1`.
pub fn tova(last_row: Tensor<4>) -> Tensor<3> {
    let [b, h, g, n] = last_row.dims();
    let prefix = last_row.slice([0..b, 0..h, 0..g, 0..n - 1]);
    let mean = prefix.reshape([b, h * g, n - 1]).mean_dim(1);
    pad_with_max(mean.expand([b, h, n - 1]), 1, false)
}

/// ObservedAttention (kvpress `ObservedAttentionPress`, H2O at prefill) from the column sums
/// of the full causal prefill attention `[batch, kv_heads, group, n]`: each column divided by
/// the number of queries that see it (`n - j` for token `j`), then reduced over the group.
pub fn observed_attention(col_sums: Tensor<4>, reduce: GqaReduce) -> Tensor<3> {
    let [_, _, _, n] = col_sums.dims();
    let device = col_sums.device();
    let counts: Vec<f32> = (0..n).map(|j| (n - j) as f32).collect();
    let counts =
        Tensor::<1>::from_data(TensorData::new(counts, [n]), &device).reshape([1, 1, 1, n]);
    reduce.reduce(col_sums / counts)
}

/// The RoPE rotation averaged over positions `start..start + count`, as a `head_dim x
/// head_dim` row-major matrix `R` (kvpress `ExpectedAttentionPress.apply_avg_rope`): a query
/// `q` (pre-RoPE) rotated at a random future position has mean `R q`.
pub fn average_rope_matrix(rope: &Rope, start: usize, count: usize) -> Vec<f32> {
    let cfg = rope.config();
    let d = cfg.head_dim;
    let inv = rope.inv_freq();
    let half = inv.len();
    let mut m = vec![0.0f32; d * d];
    for i in 0..d {
        m[i * d + i] = 1.0;
    }
    for (k, &f) in inv.iter().enumerate() {
        let (mut c, mut s) = (0.0f64, 0.0f64);
        for p in start..start + count {
            // As HF: the angle in f32, then cos/sin in f32.
            let a = p as f32 * f;
            c += f64::from(a.cos());
            s += f64::from(a.sin());
        }
        let (c, s) = (
            (c / count.max(1) as f64) as f32,
            (s / count.max(1) as f64) as f32,
        );
        let (i, j) = match cfg.convention {
            RopeConvention::RotateHalf => (k, k + half),
            RopeConvention::Interleaved => (2 * k, 2 * k + 1),
        };
        m[i * d + i] = c;
        m[j * d + j] = c;
        m[i * d + j] = -s;
        m[j * d + i] = s;
    }
    m
}

/// Query statistics for [`expected_attention`]: mean and (population) covariance of the
/// pre-RoPE queries of every query head, `[batch, q_heads, head_dim]` and `[batch, q_heads,
/// head_dim, head_dim]`.
#[derive(Debug, Clone)]
pub struct QueryMoments {
    /// Mean pre-RoPE query per head.
    pub mean: Tensor<3>,
    /// Covariance per head (divided by the number of queries), if used.
    pub cov: Option<Tensor<4>>,
}

impl QueryMoments {
    /// Applies the averaged rotation `r` (`head_dim x head_dim`, row-major): `mean <- mean
    /// Rᵀ`, `cov <- R cov Rᵀ`.
    pub fn rotate(self, r: &[f32]) -> QueryMoments {
        let [b, h, d] = self.mean.dims();
        let device = self.mean.device();
        let r = Tensor::<2>::from_data(TensorData::new(r.to_vec(), [d, d]), &device);
        let rt = r.clone().transpose();
        let mean = self
            .mean
            .reshape([b * h, d])
            .matmul(rt.clone())
            .reshape([b, h, d]);
        let cov = self.cov.map(|c| {
            let r4 = r.reshape([1, 1, d, d]).expand([b, h, d, d]);
            let rt4 = rt.reshape([1, 1, d, d]).expand([b, h, d, d]);
            r4.matmul(c).matmul(rt4)
        });
        QueryMoments { mean, cov }
    }
}

/// ExpectedAttention (kvpress `ExpectedAttentionPress`) with already rotated query moments.
///
/// For the keys after the `n_sink` sinks, per query head: `z_j = μ·k_j/√d (+ k_jᵀ Σ k_j /
/// (2d))`, softmax over `j`, reduced over the group, then `(· + epsilon) ‖v_j‖` when
/// `use_vnorm`; the sinks get `max + 1`.
///
/// # Shapes
/// `keys`, `values`: `[batch, kv_heads, n, head_dim]`; `moments` over `q_heads =
/// kv_heads * group`. Output `[batch, kv_heads, n]`.
pub fn expected_attention(
    keys: Tensor<4>,
    values: Tensor<4>,
    moments: &QueryMoments,
    n_sink: usize,
    use_vnorm: bool,
    epsilon: f32,
    reduce: GqaReduce,
) -> Tensor<3> {
    let [b, h, n, d] = keys.dims();
    let qh = moments.mean.dims()[1];
    let g = qh / h;
    let m = n - n_sink;
    let k = keys.slice([0..b, 0..h, n_sink..n, 0..d]);
    let v = values.slice([0..b, 0..h, n_sink..n, 0..d]);
    let mu = moments.mean.clone().reshape([b, h, g, d]);
    let mut z = mu
        .matmul(k.clone().swap_dims(2, 3))
        .div_scalar((d as f32).sqrt());
    if let Some(cov) = &moments.cov {
        let cov = cov.clone().reshape([b, h, g, d * d]);
        let mut quad = Vec::with_capacity(g);
        for j in 0..g {
            let cj = cov
                .clone()
                .slice([0..b, 0..h, j..j + 1, 0..d * d])
                .reshape([b, h, d, d]);
            let kc = k.clone().matmul(cj);
            quad.push((kc * k.clone()).sum_dim(3).reshape([b, h, 1, m]));
        }
        z = z + Tensor::cat(quad, 2).div_scalar(d as f32).div_scalar(2.0);
    }
    let p = softmax(z, 3);
    let mut s = reduce.reduce(p);
    if use_vnorm {
        let vn = v.square().sum_dim(3).sqrt().reshape([b, h, m]);
        s = s.add_scalar(epsilon) * vn;
    }
    pad_with_max(s, n_sink, true)
}
