//! A retrofit of DMC's learned decision heads with the model frozen: the continuous
//! relaxation of DMC's training (Nawrot et al. 2024, arXiv 2403.09636; NVIDIA Megatron-LM
//! branch `dmc`, `megatron/contrib/dmc/dmc.py`, read, not copied) as differentiable tensor
//! ops, and a small Adam trainer of the heads.
//!
//! # The relaxation
//!
//! For one (sequence, KV head) stream of `n` tokens with keys `k_t`, values `v_t`, a merge
//! logit `z_t` (noise and temperature applied) and an importance weight `ω_t > 0`, the merge
//! probability is `α_t = σ(z_t)` and, with `C_t = Σ_{l ≤ t} ln α_l`,
//!
//! ```text
//! k̃_t = Σ_{j ≤ t} e^{C_t − C_j} ω_j k_j / Σ_{j ≤ t} e^{C_t − C_j} ω_j      (same for v)
//! ```
//!
//! is the partial accumulation `k̃_t = (α_t m_{t−1} k̃_{t−1} + ω_t k_t) / (α_t m_{t−1} + ω_t)`,
//! `m_t = α_t m_{t−1} + ω_t` (the slot's mass), unrolled (the reference's `poolsum`: `x_acc[i] = b[i] x_acc[i−1] + w[i] x[i]` with
//! `b = α[1:]`), computed in parallel as one `[n, n]` weight matrix per stream. Query `i`
//! attends to every `k̃_j, j ≤ i`, with the additive mask
//!
//! ```text
//! ln(1 − α_{j+1})  for j < i,      0 for j = i,      −∞ for j > i
//! ```
//!
//! (the reference's `logsigmoid(−router_logits)` shifted by one position): a partial slot
//! that the next token merges into is hidden from later queries, the current one is always
//! visible. With hard `α ∈ {0, 1}` this is exactly what [`DmcCache`](crate::DmcCache) holds
//! when tokens are appended one at a time (each query sees the completed runs and the run it
//! has just joined); with `α ≡ 0` it is plain causal attention. GQA: query head `h` reads KV
//! head `h / (q_heads / kv_heads)`.
//!
//! During training `z_t = (logit_t + L)/τ` with logistic noise `L` (the difference of two
//! Gumbel samples, the reference's `add_noise`) and temperature `τ` (the reference's 0.1).
//! `ln α` is floored at [`LOG_ALPHA_FLOOR`] so that the differences `C_t − C_j` stay exact in
//! f32; the mask uses `ln σ(−z)` directly, so it is exact for any logit.
//!
//! # The loss
//!
//! `L = LM loss + λ · max(0, (1 − 1/CR) − mean_t d_t)` where `d_t` is the straight-through
//! hard decision (`1[α_t > 0.5]` forward, `α_t`'s gradient backward, the reference's
//! `get_decisions`), averaged over every token, KV head and layer, and `CR` rises linearly
//! from 1 to the target over the steps (`get_prior_and_cr`); the reference uses `λ = 1`
//! (its token-summed LM loss plus the DMC loss times the token count).
//!
//! # Deviations (documented in `docs/techniques/dmc.md`)
//!
//! DMC fine-tunes the whole model and repurposes one key and one query channel as the
//! decision neurons. Here the model is frozen and new linear heads over the post-RoPE key
//! (the [`LayerDecision`] form the cache reads) are trained: `α` logit `= a·k + b`, `ω =
//! σ(o·k + c)`. The reference reads `ω` from the query and accumulates over a window of 12
//! tokens in training; [`RetrofitConfig::window`] offers the window, off by default because the
//! cache accumulates without one.

use burn::prelude::*;
use burn::tensor::Gradients;
use burn::tensor::activation::{log_sigmoid, sigmoid, softmax};

use crate::decision::{
    DMC_ARTEFACT_FORMAT, DMC_ARTEFACT_VERSION, DmcArtefact, LayerDecision, LinearHead,
};
use crate::less_maps::SplitMix;

/// The floor of `ln α` in the accumulation (`α ≥ 2e-9`): keeps `C_t` small enough for exact
/// differences in f32 over thousands of tokens.
pub const LOG_ALPHA_FLOOR: f32 = -20.0;

/// Added to `ω` so that the accumulation's denominator never vanishes (the reference adds
/// the dtype's epsilon).
pub const OMEGA_EPS: f32 = 1e-6;

/// The masked entries of the attention scores (as `kv_model::grad::causal_mask`).
const MASKED: f32 = -1e30;

/// The exponent given to accumulation weights of positions a token cannot accumulate.
const NO_WEIGHT: f32 = -1e4;

/// Host `[n, n]` matrix with `f(i, j)` entries.
fn matrix(n: usize, device: &Device, f: impl Fn(usize, usize) -> f32) -> Tensor<2> {
    let data: Vec<f32> = (0..n * n).map(|e| f(e / n, e % n)).collect();
    Tensor::from_data(TensorData::new(data, [n, n]), device)
}

/// Repeats each KV head's `[.., n, m]` block for its query heads: `[b, kv, n, m]` to
/// `[b, kv · group, n, m]`.
fn expand_heads(t: Tensor<4>, group: usize) -> Tensor<4> {
    let [b, h, n, m] = t.dims();
    t.unsqueeze_dim::<5>(2)
        .expand([b, h, group, n, m])
        .reshape([b, h * group, n, m])
}

/// The partially accumulated keys and values `k̃_t`, `ṽ_t` of [`relaxed_attention`].
///
/// # Shapes
/// `keys`, `values`: `[b, kv_heads, n, d]`; `alpha_logit`, `omega`: `[b, kv_heads, n]` (`z`
/// with `α = σ(z)`, and `ω > 0`). Returns `(k̃, ṽ)` of the keys' shape. A `window` of `w`
/// accumulates only the last `w` tokens (`t − j < w`), as the reference's training does.
///
/// # Panics
/// If the shapes disagree.
pub fn accumulate(
    keys: Tensor<4>,
    values: Tensor<4>,
    alpha_logit: Tensor<3>,
    omega: Tensor<3>,
    window: Option<usize>,
) -> (Tensor<4>, Tensor<4>) {
    let [b, h, n, d] = keys.dims();
    assert_eq!(values.dims(), [b, h, n, d], "accumulate: values");
    assert_eq!(alpha_logit.dims(), [b, h, n], "accumulate: alpha logits");
    assert_eq!(omega.dims(), [b, h, n], "accumulate: omega");
    let device = keys.device();
    let w = window.unwrap_or(usize::MAX);
    let keep = matrix(
        n,
        &device,
        |t, j| {
            if j <= t && t - j < w { 1.0 } else { 0.0 }
        },
    )
    .reshape([1, 1, n, n]);
    let shut = (keep.clone() - 1.0) * (-NO_WEIGHT);
    let c = log_sigmoid(alpha_logit)
        .clamp_min(LOG_ALPHA_FLOOR)
        .cumsum(2);
    // [b, h, t, j] = C_t − C_j, kept only for the positions t accumulates.
    let diff = c.clone().unsqueeze_dim::<4>(3) - c.unsqueeze_dim::<4>(2);
    let weights = (diff * keep + shut).exp() * omega.unsqueeze_dim::<4>(2);
    let norm = weights.clone().sum_dim(3);
    let kv = Tensor::cat(vec![keys, values], 3);
    let acc = weights.matmul(kv) / norm;
    (
        acc.clone().slice([0..b, 0..h, 0..n, 0..d]),
        acc.slice([0..b, 0..h, 0..n, d..2 * d]),
    )
}

/// DMC's relaxed attention (its training-time attention, the closed form of the reference's
/// `poolsum` and mask): queries over the partially accumulated keys and values.
///
/// Per (sequence, KV head), with `α_t = σ(z_t)` (`z` = `alpha_logit`, noise and temperature
/// applied) and `C_t = Σ_{l ≤ t} ln α_l` (`ln α` floored at [`LOG_ALPHA_FLOOR`]):
///
/// ```text
/// k̃_t = Σ_{j ≤ t} e^{C_t − C_j} ω_j k_j / Σ_{j ≤ t} e^{C_t − C_j} ω_j      (same for v)
/// ```
///
/// and query `i` attends to `k̃_j` with the additive mask `ln(1 − α_{j+1})` for `j < i`, 0 for
/// `j = i`, −∞ for `j > i`. With hard `α ∈ {0, 1}` this is what
/// [`DmcCache`](crate::DmcCache) computes when tokens are appended one at a time; with
/// `α ≡ 0`, causal attention. Query head `h` reads KV head `h / (q_heads / kv_heads)`.
///
/// # Shapes
/// `queries`: `[b, q_heads, n, d]`; `keys`, `values`: `[b, kv_heads, n, d]` with `kv_heads`
/// dividing `q_heads`; `alpha_logit`, `omega`: `[b, kv_heads, n]`. Output `[b, q_heads, n,
/// d]`. `window`: see [`accumulate`].
///
/// # Panics
/// If the shapes disagree.
pub fn relaxed_attention(
    queries: Tensor<4>,
    keys: Tensor<4>,
    values: Tensor<4>,
    alpha_logit: Tensor<3>,
    omega: Tensor<3>,
    window: Option<usize>,
) -> Tensor<4> {
    let [b, hq, n, d] = queries.dims();
    let [_, hkv, _, _] = keys.dims();
    assert!(
        hkv > 0 && hq.is_multiple_of(hkv) && keys.dims() == [b, hkv, n, d],
        "relaxed_attention: queries {:?} and keys {:?} disagree",
        [b, hq, n, d],
        keys.dims()
    );
    let device = queries.device();
    // m_j = ln(1 − α_{j+1}) = ln σ(−z_{j+1}); the last position is never masked by it.
    let next = alpha_logit.clone().slice([0..b, 0..hkv, 1..n]).neg();
    let m = Tensor::cat(
        vec![log_sigmoid(next), Tensor::zeros([b, hkv, 1], &device)],
        2,
    );
    let (k, v) = accumulate(keys, values, alpha_logit, omega, window);
    let before = matrix(n, &device, |i, j| if j < i { 1.0 } else { 0.0 }).reshape([1, 1, n, n]);
    let causal = matrix(n, &device, |i, j| if j > i { MASKED } else { 0.0 }).reshape([1, 1, n, n]);
    let bias = m.unsqueeze_dim::<4>(2) * before + causal;
    let g = hq / hkv;
    let scores = queries.matmul(expand_heads(k, g).swap_dims(2, 3)) * (1.0 / (d as f64).sqrt())
        + expand_heads(bias, g);
    softmax(scores, 3).matmul(expand_heads(v, g))
}

/// DMC's straight-through decisions: `1[α > 0.5]` in the forward pass, the gradient of `α`
/// in the backward pass (the reference's `get_decisions`).
pub fn straight_through<const D: usize>(alpha: Tensor<D>) -> Tensor<D> {
    let hard = alpha.clone().greater_elem(0.5).float();
    hard - alpha.clone().detach() + alpha
}

/// The target compression ratio at `step` of `steps`: linear from 1 to `target` (the
/// reference's `get_prior_and_cr`).
pub fn target_ratio(step: usize, steps: usize, target: f32) -> f32 {
    let f = if steps == 0 {
        1.0
    } else {
        (step as f32 / steps as f32).min(1.0)
    };
    1.0 + (target - 1.0) * f
}

/// The decision heads being trained, on the host: per layer and KV head, the `α` head
/// (`a·k + b`, merge when positive) and the `ω` head (`σ(o·k + c)`), over the post-RoPE key.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionHeads {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    /// `[layers, kv_heads, head_dim]`.
    alpha_w: Vec<f32>,
    /// `[layers, kv_heads]`.
    alpha_b: Vec<f32>,
    /// `[layers, kv_heads, head_dim]`.
    omega_w: Vec<f32>,
    /// `[layers, kv_heads]`.
    omega_b: Vec<f32>,
}

impl DecisionHeads {
    /// Zero weights with the given biases (the reference starts at `α` logit `−5` and `ω`
    /// logit `+5`).
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        alpha_bias: f32,
        omega_bias: f32,
    ) -> Self {
        let (w, h) = (layers * kv_heads * head_dim, layers * kv_heads);
        DecisionHeads {
            layers,
            kv_heads,
            head_dim,
            alpha_w: vec![0.0; w],
            alpha_b: vec![alpha_bias; h],
            omega_w: vec![0.0; w],
            omega_b: vec![omega_bias; h],
        }
    }

    /// `[layers, kv_heads, head_dim]`.
    pub fn dims(&self) -> [usize; 3] {
        [self.layers, self.kv_heads, self.head_dim]
    }

    /// Every parameter, in the order `alpha_w, alpha_b, omega_w, omega_b`.
    pub fn params(&self) -> Vec<f32> {
        [&self.alpha_w, &self.alpha_b, &self.omega_w, &self.omega_b]
            .into_iter()
            .flatten()
            .copied()
            .collect()
    }

    /// Sets every parameter from [`DecisionHeads::params`]'s order.
    ///
    /// # Panics
    /// If `p` has the wrong length.
    pub fn set_params(&mut self, p: &[f32]) {
        let (w, h) = (self.alpha_w.len(), self.alpha_b.len());
        assert_eq!(p.len(), 2 * (w + h), "set_params: length");
        self.alpha_w.copy_from_slice(&p[..w]);
        self.alpha_b.copy_from_slice(&p[w..w + h]);
        self.omega_w.copy_from_slice(&p[w + h..2 * w + h]);
        self.omega_b.copy_from_slice(&p[2 * w + h..]);
    }

    /// The heads as tracked leaves on `device` (an autodiff device).
    pub fn track(&self, device: &Device) -> TrackedHeads {
        self.upload(device, true)
    }

    /// The heads on `device`, as tracked leaves when `tracked` (then `device` must be an
    /// autodiff device).
    fn upload(&self, device: &Device, tracked: bool) -> TrackedHeads {
        let [l, h, d] = self.dims();
        let up3 = |v: &[f32]| {
            let t = Tensor::<3>::from_data(TensorData::new(v.to_vec(), [l, h, d]), device);
            if tracked { t.require_grad() } else { t }
        };
        let up2 = |v: &[f32]| {
            let t = Tensor::<2>::from_data(TensorData::new(v.to_vec(), [l, h]), device);
            if tracked { t.require_grad() } else { t }
        };
        TrackedHeads {
            dims: self.dims(),
            alpha_w: up3(&self.alpha_w),
            alpha_b: up2(&self.alpha_b),
            omega_w: up3(&self.omega_w),
            omega_b: up2(&self.omega_b),
        }
    }

    /// The heads of layer `layer` in the cache's form.
    ///
    /// # Panics
    /// If `layer` is out of range.
    pub fn layer(&self, layer: usize) -> LayerDecision {
        assert!(layer < self.layers, "layer {layer} of {}", self.layers);
        let (h, d) = (self.kv_heads, self.head_dim);
        let heads = |w: &[f32], b: &[f32]| {
            (0..h)
                .map(|i| {
                    let e = layer * h + i;
                    LinearHead {
                        weights: w[e * d..(e + 1) * d].to_vec(),
                        bias: b[e],
                    }
                })
                .collect()
        };
        LayerDecision {
            alpha: heads(&self.alpha_w, &self.alpha_b),
            omega: heads(&self.omega_w, &self.omega_b),
        }
    }

    /// The artefact `dmc:artefact=PATH` loads.
    pub fn to_artefact(&self, source: impl Into<String>) -> DmcArtefact {
        DmcArtefact {
            format: DMC_ARTEFACT_FORMAT.into(),
            version: DMC_ARTEFACT_VERSION,
            source: source.into(),
            layers: (0..self.layers).map(|l| self.layer(l)).collect(),
        }
    }
}

/// [`DecisionHeads`] as tracked leaves of one forward pass.
#[derive(Debug, Clone)]
pub struct TrackedHeads {
    dims: [usize; 3],
    alpha_w: Tensor<3>,
    alpha_b: Tensor<2>,
    omega_w: Tensor<3>,
    omega_b: Tensor<2>,
}

impl TrackedHeads {
    /// The `α` logits (before noise) and `ω` logits of layer `layer` for post-RoPE keys
    /// `[b, kv_heads, n, d]`, each `[b, kv_heads, n]`.
    ///
    /// # Panics
    /// If the keys do not fit the heads.
    pub fn logits(&self, layer: usize, keys: Tensor<4>) -> (Tensor<3>, Tensor<3>) {
        let [l, h, d] = self.dims;
        let [b, hk, n, dk] = keys.dims();
        assert!(
            layer < l && hk == h && dk == d,
            "logits: layer {layer}, keys {:?}",
            [b, hk, n, dk]
        );
        let one = |w: &Tensor<3>, bias: &Tensor<2>| {
            let w = w
                .clone()
                .slice([layer..layer + 1, 0..h, 0..d])
                .reshape([1, h, d, 1]);
            let bias = bias
                .clone()
                .slice([layer..layer + 1, 0..h])
                .reshape([1, h, 1]);
            keys.clone().matmul(w).reshape([b, h, n]) + bias
        };
        (
            one(&self.alpha_w, &self.alpha_b),
            one(&self.omega_w, &self.omega_b),
        )
    }

    /// The gradients of every parameter in [`DecisionHeads::params`]'s order (zero for a
    /// leaf that did not reach the loss).
    pub fn grads(&self, grads: &Gradients) -> Vec<f32> {
        let host = |v: Option<Vec<f32>>, len: usize| v.unwrap_or_else(|| vec![0.0; len]);
        let [l, h, d] = self.dims;
        let g3 = |t: &Tensor<3>| {
            host(
                t.grad(grads)
                    .and_then(|g| g.into_data().convert::<f32>().try_into_vec().ok()),
                l * h * d,
            )
        };
        let g2 = |t: &Tensor<2>| {
            host(
                t.grad(grads)
                    .and_then(|g| g.into_data().convert::<f32>().try_into_vec().ok()),
                l * h,
            )
        };
        [
            g3(&self.alpha_w),
            g2(&self.alpha_b),
            g3(&self.omega_w),
            g2(&self.omega_b),
        ]
        .concat()
    }
}

/// How [`Retrofit`] trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrofitConfig {
    /// The compression ratio reached at the last step (`CR`, ≥ 1).
    pub target_ratio: f32,
    /// Optimiser steps over which the target rises from 1 to `target_ratio`.
    pub steps: usize,
    /// Gumbel-sigmoid temperature `τ` (the reference's `--dmc-temp`, 0.1).
    pub temperature: f32,
    /// Weight `λ` of the compression loss (the reference: 1).
    pub lambda: f32,
    /// Adam's learning rate for the biases.
    pub lr: f32,
    /// Adam's learning rate for the weights, as a multiple of `lr` (keys have `head_dim`
    /// channels of order one: `1 / head_dim` moves a logit about as much as the bias).
    pub weight_lr_scale: f32,
    /// Adam's `β1`, `β2` (the reference: 0.9, 0.95).
    pub betas: (f32, f32),
    /// Accumulation window (the reference's 12 in training); `None`: unbounded, as the cache.
    pub window: Option<usize>,
    /// Seed of the Gumbel noise.
    pub seed: u64,
}

impl RetrofitConfig {
    /// Defaults for a target ratio and a step count: `τ = 0.1`, `λ = 1`, learning rate 0.05
    /// (weights `0.05 / head_dim` via `weight_lr_scale`), `β = (0.9, 0.95)`, no window, seed 0.
    pub fn new(target_ratio: f32, steps: usize, head_dim: usize) -> Self {
        RetrofitConfig {
            target_ratio,
            steps,
            temperature: 0.1,
            lambda: 1.0,
            lr: 0.05,
            weight_lr_scale: 1.0 / head_dim.max(1) as f32,
            betas: (0.9, 0.95),
            window: None,
            seed: 0,
        }
    }
}

/// What one training step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The step index (from 0).
    pub step: usize,
    /// The forward pass's loss without the compression term (the LM loss).
    pub lm_loss: f32,
    /// `max(0, (1 − 1/CR) − merge fraction)`.
    pub compression_loss: f32,
    /// The fraction of merge decisions (hard, with the training noise) over every token, KV
    /// head and layer.
    pub merge_fraction: f32,
    /// The step's target compression ratio.
    pub target_ratio: f32,
}

impl StepReport {
    /// `lm_loss + λ · compression_loss`.
    pub fn total(&self, lambda: f32) -> f32 {
        self.lm_loss + lambda * self.compression_loss
    }
}

/// A layer's attention in a retrofit forward pass: `(layer, queries, post-RoPE keys,
/// values)` to the attention output.
pub type AttentionFn<'a> = dyn FnMut(usize, Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4> + 'a;

/// The trainer: [`DecisionHeads`], Adam's moments and the noise generator.
#[derive(Debug, Clone)]
pub struct Retrofit {
    /// The heads being trained.
    pub heads: DecisionHeads,
    config: RetrofitConfig,
    step: usize,
    m: Vec<f32>,
    v: Vec<f32>,
    rng: SplitMix,
}

/// One logistic sample (`Gumbel − Gumbel`), `ln(u / (1 − u))` with `u` uniform in `(0, 1)`.
fn logistic(rng: &mut SplitMix) -> f32 {
    let u = ((rng.next_u64() >> 40) as f64 + 0.5) / (1u64 << 24) as f64;
    (u / (1.0 - u)).ln() as f32
}

fn scalar(t: Tensor<1>) -> f32 {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f32::NAN)
}

impl Retrofit {
    /// A trainer starting from `heads`.
    pub fn new(heads: DecisionHeads, config: RetrofitConfig) -> Self {
        let len = heads.params().len();
        Retrofit {
            heads,
            config,
            step: 0,
            m: vec![0.0; len],
            v: vec![0.0; len],
            rng: SplitMix(config.seed),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RetrofitConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// One optimiser step. `forward` runs the frozen model with the attention it is given
    /// (for every layer: `attention(layer, queries, post-RoPE keys, values)`) and returns its
    /// LM loss as a one-element tensor on `device` (an autodiff device); the trainer adds the
    /// compression loss, differentiates and updates the heads with Adam.
    ///
    /// # Errors
    /// Whatever `forward` returns.
    pub fn step<E>(
        &mut self,
        device: &Device,
        forward: impl FnOnce(&mut AttentionFn<'_>) -> core::result::Result<Tensor<1>, E>,
    ) -> core::result::Result<StepReport, E> {
        let c = self.config;
        let tracked = self.heads.track(device);
        let mut decisions: Vec<Tensor<1>> = Vec::new();
        let rng = &mut self.rng;
        let mut attention = |layer: usize, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>| {
            let (a, o) = tracked.logits(layer, k.clone());
            let [b, h, n] = a.dims();
            let noise: Vec<f32> = (0..b * h * n).map(|_| logistic(rng)).collect();
            let noise = Tensor::<3>::from_data(TensorData::new(noise, [b, h, n]), device);
            let z = (a + noise) / c.temperature;
            decisions.push(straight_through(sigmoid(z.clone())).mean());
            let omega = sigmoid(o) + OMEGA_EPS;
            relaxed_attention(q, k, v, z, omega, c.window)
        };
        let lm = forward(&mut attention)?;
        let merge = Tensor::cat(decisions, 0).mean();
        let ratio = target_ratio(self.step, c.steps, c.target_ratio);
        let prior = 1.0 - 1.0 / ratio;
        let comp = (merge.clone().neg() + prior).clamp_min(0.0);
        let total = lm.clone() + comp.clone() * c.lambda;
        let grads = total.backward();
        let g = tracked.grads(&grads);
        let report = StepReport {
            step: self.step,
            lm_loss: scalar(lm),
            compression_loss: scalar(comp),
            merge_fraction: scalar(merge),
            target_ratio: ratio,
        };
        self.adam(&g);
        self.step += 1;
        Ok(report)
    }

    fn adam(&mut self, g: &[f32]) {
        let c = self.config;
        let (b1, b2) = c.betas;
        let t = (self.step + 1) as i32;
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let [l, h, d] = self.heads.dims();
        let (w, hb) = (l * h * d, l * h);
        let mut p = self.heads.params();
        for (i, (&gi, pi)) in g.iter().zip(p.iter_mut()).enumerate() {
            let gi = if gi.is_finite() { gi } else { 0.0 };
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * gi;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * gi * gi;
            let is_weight = i < w || (w + hb..2 * w + hb).contains(&i);
            let lr = if is_weight {
                c.lr * c.weight_lr_scale
            } else {
                c.lr
            };
            *pi -= lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + 1e-8);
        }
        self.heads.set_params(&p);
    }
}

/// The attention of a layer with the heads' **hard** decisions (merge when the `α` logit is
/// positive, no noise): what [`DmcCache`](crate::DmcCache) computes when tokens are appended
/// one at a time, as one parallel forward pass (for held-out evaluation of a retrofit). Also
/// returns the merge fraction of the layer (over every token and KV head).
pub fn hard_attention(
    heads: &DecisionHeads,
    layer: usize,
    queries: Tensor<4>,
    keys: Tensor<4>,
    values: Tensor<4>,
) -> (Tensor<4>, f32) {
    let device = keys.device();
    let (a, o) = heads.upload(&device, false).logits(layer, keys.clone());
    let hard = a.clone().greater_elem(0.0).float();
    let fraction = scalar(hard.clone().mean());
    // ±1e4 saturates σ and ln σ: α is 1 or e^{-1e4} = 0, ln(1 − α) is −1e4 or 0.
    let z = hard * 2e4 - 1e4;
    let omega = sigmoid(o).clamp_min(f32::MIN_POSITIVE);
    (
        relaxed_attention(queries, keys, values, z, omega, None),
        fraction,
    )
}
