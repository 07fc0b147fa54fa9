//! GEAR (Kang et al., 2024, arXiv 2403.05527): a low-bit quantized backbone plus a low-rank
//! approximation of its residual plus sparse outliers kept exactly,
//! `X ≈ D̂ + A Bᵀ + S`.
//!
//! # Compression of a block `X ∈ R^{T×d}` (per batch entry and KV head)
//! 1. **Outliers** `S`: the `n_o = ⌊s T d / 2⌋` largest and the `n_o` smallest entries of the
//!    block (disjoint sets) are kept exactly: their fp16 values and `u32` flat indices
//!    `t·d + c`. Before quantization they are replaced by the mean of their row (keys: the
//!    channel's mean over the block's tokens; values: the token's mean over its channels), as
//!    the reference replaces them by the row average, so that they do not stretch the ranges.
//! 2. **Backbone** `D̂`: uniform asymmetric quantization with KIVI's grouping
//!    ([`crate::group`]): keys per channel (`G` tokens share a scale and zero point), values
//!    per token (`G` channels).
//! 3. **Low rank** `A Bᵀ`: the residual `R = X − (dequant(D̂) with outliers restored)` (zero at
//!    the outliers) is approximated with rank `r` by `L` steps of subspace (power) iteration
//!    from a seeded uniform start `P ∈ [0,1)^{d×r}`: `P ← orth(P)`, `Q ← orth(R P)`,
//!    `P ← Rᵀ Q`; then `A = Q` (`T×r`), `B = P` (`d×r`), both stored in fp16. (The reference
//!    orthonormalises only in the last step; the column spans are the same, every step is just
//!    better conditioned.)
//!
//! Reconstruction: `X̂ = dequant(D̂) + A Bᵀ`, then the outliers overwrite their entries.
//!
//! # Streaming (the reference's `--streaming --streaming_gap n_b`)
//! New tokens go to a full-precision buffer; whenever it holds `n_b` or more tokens, its oldest
//! whole multiple of `n_b` tokens is compressed as one block. Blocks compressed before
//! `end_prefill` use the prefill rank (reference default 4), later ones the decode rank (2).
//! Like KIVI's cache, the last appended block is attended in full precision by default.
//!
//! # Attention
//! `attend` streams over chunks of whole blocks (about [`GEAR_ATTEND_CHUNK_TOKENS`] tokens),
//! each reconstructed to fp32, scored and merged into running softmax statistics;
//! `view()` returns the same reconstruction, so `attend == reference(view())` up to the
//! softmax summation order.

use burn::prelude::*;
use burn::tensor::{FloatDType, IndexingUpdateOp, IntDType};
use kv_core::positions_per_head;
use kv_core::{
    Attended, HeldBuffer, KeyPositions, KvBlock, KvCache, KvError, KvShape, KvView, Lengths,
    MemoryReport, PAD, Query, StatsRequest, StorageDtype, StorageRole, check_block,
    check_positions, check_query, reference_attention,
};
use serde::{Deserialize, Serialize};

use crate::attend::{attend_streamed, empty_lse};
use crate::group::{F16_MAX_ABS_INPUT, GroupAxis, QuantSpec, QuantizedTensor};
use crate::packing::BitWidth;
use crate::params as parse;
use crate::rng::SplitMix64;
use crate::{QuantError, Result};

/// Orthonormalises the `r` columns of every `[n, r]` matrix of `x`, `[b, h, n, r]`, by
/// Gram–Schmidt applied twice; a column (numerically) in the span of the previous ones becomes
/// zero.
fn orthonormalise(x: Tensor<4>) -> Tensor<4> {
    let [b, h, n, r] = x.dims();
    let mut cols: Vec<Tensor<4>> = Vec::with_capacity(r);
    for j in 0..r {
        let mut v = x.clone().slice([0..b, 0..h, 0..n, j..j + 1]);
        let scale = v.clone().square().sum_dim(2).sqrt();
        for _ in 0..2 {
            for q in &cols {
                let dot = (q.clone() * v.clone()).sum_dim(2);
                v = v - q.clone() * dot;
            }
        }
        let norm = v.clone().square().sum_dim(2).sqrt();
        // Below 1e-6 of its original length the column is noise: drop it.
        let dead = norm.clone().lower_equal(scale.mul_scalar(1e-6));
        let inv = norm
            .mask_fill(dead.clone(), 1.0)
            .recip()
            .mask_fill(dead, 0.0);
        cols.push(v * inv);
    }
    Tensor::cat(cols, 3)
}

/// Rank-`rank` approximation `R ≈ A Bᵀ` of every `[n, d]` matrix of `residual`,
/// `[b, h, n, d]`, by `iters` steps of subspace iteration from a uniform `[0, 1)` start drawn
/// from `seed` (see the module docs). Returns `A` (`[b, h, n, r]`, orthonormal columns) and
/// `B = Rᵀ A` (`[b, h, d, r]`), with `r = min(rank, n, d)`.
///
/// # Errors
/// [`QuantError::InvalidConfig`] for `rank == 0` or `iters == 0`.
pub fn power_iteration(
    residual: Tensor<4>,
    rank: usize,
    iters: usize,
    seed: u64,
) -> Result<(Tensor<4>, Tensor<4>)> {
    if rank == 0 || iters == 0 {
        return Err(QuantError::InvalidConfig {
            field: if rank == 0 { "rank" } else { "power_iters" },
            reason: "must be at least 1 for a low-rank approximation".into(),
        });
    }
    let [b, h, n, d] = residual.dims();
    let r = rank.min(n).min(d);
    let device = residual.device();
    let mut rng = SplitMix64::new(seed);
    let start: Vec<f32> = (0..b * h * d * r).map(|_| rng.uniform() as f32).collect();
    let mut p = Tensor::<4>::from_data(TensorData::new(start, [b, h, d, r]), &device);
    let rt = residual.clone().swap_dims(2, 3);
    let mut q = Tensor::<4>::zeros([b, h, n, r], &device);
    for _ in 0..iters {
        p = orthonormalise(p);
        q = orthonormalise(residual.clone().matmul(p));
        p = rt.clone().matmul(q.clone());
    }
    Ok((q, p))
}

/// One compressed tensor (keys or values) of a block: backbone codes, optional low-rank
/// factors and optional sparse outliers.
#[derive(Debug, Clone)]
struct GearTensor {
    backbone: QuantizedTensor,
    /// `A` `[b, h, T, r]` and `B` `[b, h, d, r]`, fp16.
    low_rank: Option<(Tensor<4>, Tensor<4>)>,
    /// Flat indices `t·d + c`, `[b, h, 2 n_o]` `U32`, and values, `[b, h, 2 n_o]` fp16.
    outliers: Option<(Tensor<3, Int>, Tensor<3>)>,
}

impl GearTensor {
    fn held_buffers(&self, role: StorageRole) -> Vec<HeldBuffer> {
        let mut out = self.backbone.held_buffers(role);
        if let Some((a, b)) = &self.low_rank {
            out.push(HeldBuffer::tensor(role, a));
            out.push(HeldBuffer::tensor(role, b));
        }
        if let Some((i, v)) = &self.outliers {
            out.push(HeldBuffer::tensor(role, i));
            out.push(HeldBuffer::tensor(role, v));
        }
        out
    }

    fn stored_bytes(&self) -> usize {
        self.held_buffers(StorageRole::Keys)
            .iter()
            .map(|b| b.bytes)
            .sum()
    }

    /// The reconstruction, fp32 `[b, h, T, d]`.
    fn reconstruct(&self) -> Tensor<4> {
        let x = self.backbone.dequantize();
        let x = match &self.low_rank {
            Some((a, b)) => {
                x + a
                    .clone()
                    .cast(FloatDType::F32)
                    .matmul(b.clone().cast(FloatDType::F32).swap_dims(2, 3))
            }
            None => x,
        };
        match &self.outliers {
            Some((idx, vals)) => {
                let [b, h, t, d] = x.dims();
                let (mask, dense) = scatter_dense(idx.clone(), vals.clone(), t * d);
                x.reshape([b, h, t * d])
                    .mask_where(mask, dense)
                    .reshape([b, h, t, d])
            }
            None => x,
        }
    }
}

/// A boolean mask `[b, h, n]` of the flat `idx` (unique per row) and a dense fp32 tensor
/// holding `vals` there and 0 elsewhere (`0 + v` is exact).
fn scatter_dense(idx: Tensor<3, Int>, vals: Tensor<3>, n: usize) -> (Tensor<3, Bool>, Tensor<3>) {
    let [b, h, k] = idx.dims();
    let device = idx.device();
    let idx = idx.cast(IntDType::I32);
    let ones = Tensor::<3>::ones([b, h, k], &device);
    let zeros = Tensor::<3>::zeros([b, h, n], &device);
    let mask = zeros
        .clone()
        .scatter(2, idx.clone(), ones, IndexingUpdateOp::Add)
        .greater_elem(0.5);
    let dense = zeros.scatter(2, idx, vals.cast(FloatDType::F32), IndexingUpdateOp::Add);
    (mask, dense)
}

/// The `n_o` largest and `n_o` smallest entries (disjoint) of every `[T, d]` matrix of `x`:
/// flat indices `[b, h, 2 n_o]` (`I32`).
fn select_outliers(x: &Tensor<4>, n_o: usize) -> Tensor<3, Int> {
    let [b, h, t, d] = x.dims();
    let flat = x.clone().reshape([b, h, t * d]);
    let (_, top) = flat.clone().topk_with_indices(n_o, 2);
    // The smallest among the rest: the top ones pushed to -inf in the negated copy.
    let device = x.device();
    let (taken, _) = scatter_dense(top.clone(), Tensor::<3>::zeros([b, h, n_o], &device), t * d);
    let neg = flat.neg().mask_fill(taken, f32::NEG_INFINITY);
    let (_, bottom) = neg.topk_with_indices(n_o, 2);
    Tensor::cat(vec![top, bottom], 2).cast(IntDType::I32)
}

fn float_dtype(d: StorageDtype) -> FloatDType {
    match d {
        StorageDtype::F32 => FloatDType::F32,
        StorageDtype::F16 => FloatDType::F16,
    }
}

/// Compresses `x` (`[b, h, T, d]`, finite, `T` a multiple of the spec's token group for keys).
fn compress(
    x: Tensor<4>,
    spec: &QuantSpec,
    rank: usize,
    iters: usize,
    outlier_ratio: f64,
    seed: u64,
) -> Result<GearTensor> {
    let [b, h, t, d] = x.dims();
    let x = x.cast(FloatDType::F32);
    let n_o = outliers_per_side(outlier_ratio, t, d);
    let mut mask = None;
    let (filled, outliers) = if n_o > 0 {
        let idx = select_outliers(&x, n_o);
        let flat = x.clone().reshape([b, h, t * d]);
        let vals = flat.gather(2, idx.clone()).cast(FloatDType::F16);
        let (m, _) = scatter_dense(idx.clone(), vals.clone(), t * d);
        let row_mean = match spec.axis() {
            GroupAxis::Tokens => x.clone().mean_dim(2).expand([b, h, t, d]),
            GroupAxis::Channels => x.clone().mean_dim(3).expand([b, h, t, d]),
        };
        let filled = x
            .clone()
            .reshape([b, h, t * d])
            .mask_where(m.clone(), row_mean.reshape([b, h, t * d]))
            .reshape([b, h, t, d]);
        mask = Some(m);
        (filled, Some((idx.cast(IntDType::U32), vals)))
    } else {
        (x.clone(), None)
    };
    let backbone = spec.quantize_finite(filled)?;
    let mut g = GearTensor {
        backbone,
        low_rank: None,
        outliers,
    };
    if rank > 0 {
        // The residual of the backbone, exactly zero at the outliers (kept as they are).
        let residual = x - g.backbone.dequantize();
        let residual = match mask {
            Some(m) => residual
                .reshape([b, h, t * d])
                .mask_fill(m, 0.0)
                .reshape([b, h, t, d]),
            None => residual,
        };
        let (a, bf) = power_iteration(residual, rank, iters, seed)?;
        g.low_rank = Some((a.cast(FloatDType::F16), bf.cast(FloatDType::F16)));
    }
    Ok(g)
}

/// `n_o = ⌊s T d / 2⌋`, the outliers kept per side of a `T×d` block.
fn outliers_per_side(ratio: f64, t: usize, d: usize) -> usize {
    ((ratio * (t * d) as f64) / 2.0).floor() as usize
}

/// One compressed block of tokens.
#[derive(Debug, Clone)]
struct GearBlock {
    keys: GearTensor,
    values: GearTensor,
    tokens: usize,
}

fn default_f16() -> StorageDtype {
    StorageDtype::F16
}
fn default_true() -> bool {
    true
}

/// Configuration of a [`GearCache`]. Defaults are the reference's GEAR run
/// (`run_template_llama-3-8b.sh`): 2-bit backbone, `G = 64`, 3 power iterations, prefill
/// rank 4, decode rank 2, 2 % outliers, streaming gap 64.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GearConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Backbone code width (`--quantize_bit`).
    pub bits: u32,
    /// `G`: tokens per key group, channels per value group (`--group_size`).
    pub group: usize,
    /// Rank of the residual approximation for blocks compressed during prefill
    /// (`--prefillrank`, `--prefillrankv`); 0 disables it.
    pub prefill_rank: usize,
    /// Rank for blocks compressed in decode (`--rank`, `--rankv`); 0 disables it.
    pub decode_rank: usize,
    /// Power (subspace) iteration steps (`--loop`).
    pub power_iters: usize,
    /// `s`: fraction of each block's entries kept exactly, half largest, half smallest
    /// (`--left`); 0 disables outliers.
    pub outlier_ratio: f64,
    /// `n_b`: tokens buffered in full precision before being compressed as a block
    /// (`--streaming_gap`); a multiple of `G`.
    pub streaming_gap: usize,
    /// Seed of the power-iteration starts.
    #[serde(default)]
    pub seed: u64,
    /// Dtype of the backbone scales and zero points.
    #[serde(default = "default_f16")]
    pub scale_dtype: StorageDtype,
    /// Dtype of the full-precision buffer.
    #[serde(default = "default_f16")]
    pub residual_dtype: StorageDtype,
    /// Attend the last appended block in full precision.
    #[serde(default = "default_true")]
    pub current_in_full_precision: bool,
}

impl GearConfig {
    /// The reference defaults (see the type docs).
    pub fn new(shape: KvShape) -> Self {
        GearConfig {
            shape,
            bits: 2,
            group: 64,
            prefill_rank: 4,
            decode_rank: 2,
            power_iters: 3,
            outlier_ratio: 0.02,
            streaming_gap: 64,
            seed: 0,
            scale_dtype: StorageDtype::F16,
            residual_dtype: StorageDtype::F16,
            current_in_full_precision: true,
        }
    }
    /// Sets the backbone width.
    pub fn with_bits(mut self, bits: u32) -> Self {
        self.bits = bits;
        self
    }
    /// Sets `G`.
    pub fn with_group(mut self, group: usize) -> Self {
        self.group = group;
        self
    }
    /// Sets the prefill and decode ranks.
    pub fn with_ranks(mut self, prefill_rank: usize, decode_rank: usize) -> Self {
        self.prefill_rank = prefill_rank;
        self.decode_rank = decode_rank;
        self
    }
    /// Sets the power-iteration steps.
    pub fn with_power_iters(mut self, iters: usize) -> Self {
        self.power_iters = iters;
        self
    }
    /// Sets the outlier fraction `s`.
    pub fn with_outlier_ratio(mut self, ratio: f64) -> Self {
        self.outlier_ratio = ratio;
        self
    }
    /// Sets `n_b`.
    pub fn with_streaming_gap(mut self, gap: usize) -> Self {
        self.streaming_gap = gap;
        self
    }
    /// Sets the seed of the power iteration.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Sets the dtype of scales and zeros.
    pub fn with_scale_dtype(mut self, dtype: StorageDtype) -> Self {
        self.scale_dtype = dtype;
        self
    }
    /// Sets the dtype of the full-precision buffer.
    pub fn with_residual_dtype(mut self, dtype: StorageDtype) -> Self {
        self.residual_dtype = dtype;
        self
    }
    /// Whether the last appended block is attended in full precision.
    pub fn with_current_in_full_precision(mut self, on: bool) -> Self {
        self.current_in_full_precision = on;
        self
    }

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &[
        "bits",
        "group",
        "prefill_rank",
        "rank",
        "loop",
        "left",
        "gap",
        "seed",
        "scale_dtype",
        "residual_dtype",
        "current_full",
    ];

    /// The default config with `key=value` parameters applied, named after the reference's
    /// flags: `bits`, `group`, `prefill_rank`, `rank` (decode), `loop` (power iterations),
    /// `gap` (streaming gap), `seed` (integers), `left` (outlier fraction, a number in
    /// `[0, 1]`), `scale_dtype` and `residual_dtype` (`f16`/`f32`), `current_full`
    /// (`true`/`false`). Validated by [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the parameter for an unknown name or a value that does
    /// not parse.
    pub fn from_params<'a>(
        shape: KvShape,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        let mut cfg = GearConfig::new(shape);
        for (k, v) in params {
            match k {
                "bits" => cfg.bits = parse::width("bits", v)?,
                "group" => cfg.group = parse::int("group", v)?,
                "prefill_rank" => cfg.prefill_rank = parse::int("prefill_rank", v)?,
                "rank" => cfg.decode_rank = parse::int("rank", v)?,
                "loop" => cfg.power_iters = parse::int("loop", v)?,
                "left" => cfg.outlier_ratio = parse::float("left", v)?,
                "gap" => cfg.streaming_gap = parse::int("gap", v)?,
                "seed" => {
                    cfg.seed = v
                        .parse()
                        .map_err(|_| parse::bad("seed", v, "a non-negative integer"))?;
                }
                "scale_dtype" => cfg.scale_dtype = parse::dtype("scale_dtype", v)?,
                "residual_dtype" => cfg.residual_dtype = parse::dtype("residual_dtype", v)?,
                "current_full" => {
                    cfg.current_in_full_precision = parse::boolean("current_full", v)?;
                }
                _ => return Err(parse::unknown("GEAR", k, Self::PARAMS)),
            }
        }
        Ok(cfg)
    }

    fn specs(&self) -> Result<(QuantSpec, QuantSpec)> {
        let bits = BitWidth::new(self.bits)?;
        if self.group == 0 {
            return Err(QuantError::InvalidConfig {
                field: "group",
                reason: "must be at least 1".into(),
            });
        }
        if self.streaming_gap == 0 || !self.streaming_gap.is_multiple_of(self.group) {
            return Err(QuantError::GroupDoesNotDivide {
                group: self.group,
                axis: "streaming gap (n_b must be a positive multiple of G)",
                len: self.streaming_gap,
            });
        }
        let d = self.shape.head_dim();
        if !d.is_multiple_of(self.group) {
            return Err(QuantError::GroupDoesNotDivide {
                group: self.group,
                axis: "head_dim (value groups run along channels)",
                len: d,
            });
        }
        if !(0.0..=1.0).contains(&self.outlier_ratio) {
            return Err(QuantError::InvalidConfig {
                field: "outlier_ratio",
                reason: format!("{} is not a fraction in [0, 1]", self.outlier_ratio),
            });
        }
        if (self.prefill_rank > 0 || self.decode_rank > 0) && self.power_iters == 0 {
            return Err(QuantError::InvalidConfig {
                field: "power_iters",
                reason: "must be at least 1 when a rank is set".into(),
            });
        }
        let k =
            QuantSpec::new(bits, self.group, GroupAxis::Tokens)?.with_scale_dtype(self.scale_dtype);
        let v = QuantSpec::new(bits, self.group, GroupAxis::Channels)?
            .with_scale_dtype(self.scale_dtype);
        Ok((k, v))
    }

    /// Builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for an unsupported width, `G` zero or not dividing `n_b` or
    /// `head_dim`, an outlier fraction outside `[0, 1]`, or a rank with zero power iterations.
    pub fn init(&self, device: &Device) -> kv_core::Result<GearCache> {
        let (key_spec, value_spec) = self.specs().map_err(KvError::from)?;
        Ok(GearCache {
            config: self.clone(),
            device: device.clone(),
            key_spec,
            value_spec,
            blocks: Vec::new(),
            k_full: None,
            v_full: None,
            pending: None,
            prefill_done: false,
            len: 0,
            positions: vec![Vec::new(); self.shape.batch()],
            logical: vec![0; self.shape.batch()],
        })
    }

    /// Stored bytes of one compressed block of `tokens` tokens (keys and values) at `rank`:
    /// backbone codes, scales and zeros; `2 r (T + d)` bytes per head and tensor of fp16
    /// factors (`r = min(rank, T, d)`); `2 n_o (4 + 2)` bytes per head and tensor of `u32`
    /// indices and fp16 values. The formula of `docs/techniques/quant.md`.
    ///
    /// # Errors
    /// As [`init`](Self::init), and [`KvError::InvalidConfig`] if `tokens` is not a positive
    /// multiple of `G`.
    pub fn block_bytes(&self, tokens: usize, rank: usize) -> kv_core::Result<usize> {
        let (ks, vs) = self.specs().map_err(KvError::from)?;
        if tokens == 0 || !tokens.is_multiple_of(self.group) {
            return Err(KvError::InvalidConfig {
                field: "tokens",
                reason: format!("{tokens} is not a positive multiple of G = {}", self.group),
            });
        }
        let s = self.shape;
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let r = rank.min(tokens).min(d);
        let n_o = outliers_per_side(self.outlier_ratio, tokens, d);
        let extra = b * h * (2 * r * (tokens + d) + 2 * n_o * (4 + 2));
        Ok(ks.stored_bytes([b, h, tokens, d]) + vs.stored_bytes([b, h, tokens, d]) + 2 * extra)
    }
}

/// A GEAR cache for one layer: see the module docs.
#[derive(Debug, Clone)]
pub struct GearCache {
    config: GearConfig,
    device: Device,
    key_spec: QuantSpec,
    value_spec: QuantSpec,
    blocks: Vec<GearBlock>,
    k_full: Option<Tensor<4>>,
    v_full: Option<Tensor<4>>,
    /// The last appended block as given (fp32), attended in full precision.
    pending: Option<(Tensor<4>, Tensor<4>)>,
    prefill_done: bool,
    len: usize,
    positions: Vec<Vec<u32>>,
    logical: Vec<usize>,
}

/// Tokens per chunk of the streamed attention (whole blocks are added until a chunk reaches
/// this size).
pub const GEAR_ATTEND_CHUNK_TOKENS: usize = 512;

fn slice_tokens(t: &Tensor<4>, r: core::ops::Range<usize>) -> Tensor<4> {
    let [b, h, _, d] = t.dims();
    t.clone().slice([0..b, 0..h, r, 0..d])
}

fn fp_bytes(t: &Option<Tensor<4>>) -> usize {
    t.as_ref()
        .map_or(0, |t| t.shape().num_elements() * t.dtype().size())
}

impl GearCache {
    /// The configuration.
    pub fn config(&self) -> &GearConfig {
        &self.config
    }
    /// Tokens held per sequence (padding included).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Tokens held compressed, per sequence.
    pub fn compressed_tokens(&self) -> usize {
        self.blocks.iter().map(|b| b.tokens).sum()
    }
    /// Token counts of the compressed blocks, oldest first.
    pub fn block_tokens(&self) -> Vec<usize> {
        self.blocks.iter().map(|b| b.tokens).collect()
    }
    /// Tokens in the full-precision buffer, per sequence.
    pub fn buffered_tokens(&self) -> usize {
        self.k_full.as_ref().map_or(0, |t| t.dims()[2])
    }
    /// Tokens of the last appended block held as given.
    pub fn pending_tokens(&self) -> usize {
        self.pending.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }
    /// Bytes of the compressed blocks (keys, values).
    pub fn block_stored_bytes(&self) -> (usize, usize) {
        self.blocks.iter().fold((0, 0), |(k, v), b| {
            (k + b.keys.stored_bytes(), v + b.values.stored_bytes())
        })
    }

    /// Keys and values of the held tokens `a..b` in fp32, as attention sees them.
    fn tokens_fp32(&self, a: usize, b: usize) -> (Tensor<4>, Tensor<4>) {
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        let mut start = 0;
        for blk in &self.blocks {
            let end = start + blk.tokens;
            if start < b && a < end {
                let r = a.max(start) - start..b.min(end) - start;
                ks.push(slice_tokens(&blk.keys.reconstruct(), r.clone()));
                vs.push(slice_tokens(&blk.values.reconstruct(), r));
            }
            start = end;
        }
        if let (Some(kf), Some(vf)) = (&self.k_full, &self.v_full)
            && b > start
        {
            let r = a.max(start) - start..b - start;
            ks.push(slice_tokens(kf, r.clone()).cast(FloatDType::F32));
            vs.push(slice_tokens(vf, r).cast(FloatDType::F32));
        }
        let (mut k, mut v) = (Tensor::cat(ks, 2), Tensor::cat(vs, 2));
        if let Some((pk, pv)) = &self.pending {
            let p0 = self.len - pk.dims()[2];
            let s = a.max(p0);
            if s < b {
                let [bb, h, _, d] = k.dims();
                let r = [0..bb, 0..h, s - a..b - a, 0..d];
                k = k.slice_assign(r.clone(), slice_tokens(pk, s - p0..b - p0));
                v = v.slice_assign(r, slice_tokens(pv, s - p0..b - p0));
            }
        }
        (k, v)
    }

    /// Attention without statistics and its log-sum-exp, streamed over whole blocks (the
    /// cache is not empty).
    fn attend_streamed_lse(&self, query: &Query) -> (Tensor<4>, Tensor<4>) {
        attend_streamed(
            query,
            self.config.shape.kv_heads(),
            self.len,
            &self.positions,
            |start| self.chunk_end(start),
            |range| self.tokens_fp32(range.start, range.end),
        )
    }

    /// The end of the attention chunk starting at `start` (a block boundary): whole blocks
    /// until the chunk reaches [`GEAR_ATTEND_CHUNK_TOKENS`], then the buffer.
    fn chunk_end(&self, start: usize) -> usize {
        let mut end = 0;
        for blk in &self.blocks {
            if end >= start + GEAR_ATTEND_CHUNK_TOKENS {
                return end;
            }
            end += blk.tokens;
        }
        if end > start { end } else { self.len }
    }
}

impl KvCache for GearCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        const OP: &str = "GearCache::append";
        let shape = self.config.shape;
        check_block(&shape, &block, OP)?;
        let last: Vec<Option<u32>> = self
            .positions
            .iter()
            .map(|p| p.iter().rev().copied().find(|&x| x != PAD))
            .collect();
        let counts = check_positions(block.positions(), shape.batch(), &last, OP)?;
        // fp16 outliers, factors and (by default) scales must stay finite.
        let max = Tensor::cat(
            vec![
                block.keys().clone().abs().max(),
                block.values().clone().abs().max(),
            ],
            0,
        )
        .max()
        .into_scalar::<f32>();
        if max > F16_MAX_ABS_INPUT {
            return Err(KvError::InvalidConfig {
                field: "data",
                reason: format!(
                    "{OP}: largest magnitude {max} exceeds {F16_MAX_ABS_INPUT}, the limit of the \
                     fp16 outliers, factors and scales"
                ),
            });
        }
        let n = block.seq_len();
        let gap = self.config.streaming_gap;
        let dtype = float_dtype(self.config.residual_dtype);
        let (k, v, pos) = block.into_parts();
        let (k, v) = (k.cast(FloatDType::F32), v.cast(FloatDType::F32));

        // Everything fallible happens on locals; the cache changes only once all succeeded.
        let cat = |a: &Option<Tensor<4>>, b: Tensor<4>| match a {
            Some(a) => Tensor::cat(vec![a.clone(), b], 2),
            None => b,
        };
        let kf = cat(&self.k_full, k.clone().cast(dtype));
        let vf = cat(&self.v_full, v.clone().cast(dtype));
        let m = kf.dims()[2];
        let spill = m - m % gap;
        let mut new_block = None;
        let (k_full, v_full) = if spill > 0 {
            let rank = if self.prefill_done {
                self.config.decode_rank
            } else {
                self.config.prefill_rank
            };
            let seed = self.config.seed ^ (self.blocks.len() as u64).wrapping_mul(0x9E37_79B9);
            let c = &self.config;
            let keys = compress(
                slice_tokens(&kf, 0..spill),
                &self.key_spec,
                rank,
                c.power_iters,
                c.outlier_ratio,
                seed,
            )?;
            let values = compress(
                slice_tokens(&vf, 0..spill),
                &self.value_spec,
                rank,
                c.power_iters,
                c.outlier_ratio,
                seed.wrapping_add(1),
            )?;
            new_block = Some(GearBlock {
                keys,
                values,
                tokens: spill,
            });
            if spill < m {
                (
                    Some(slice_tokens(&kf, spill..m)),
                    Some(slice_tokens(&vf, spill..m)),
                )
            } else {
                (None, None)
            }
        } else {
            (Some(kf), Some(vf))
        };

        self.blocks.extend(new_block);
        self.k_full = k_full;
        self.v_full = v_full;
        self.pending = self.config.current_in_full_precision.then_some((k, v));
        for b in 0..shape.batch() {
            self.positions[b].extend_from_slice(&pos[b * n..(b + 1) * n]);
            self.logical[b] += counts[b];
        }
        self.len += n;
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        const OP: &str = "GearCache::attend";
        check_query(&self.config.shape, query, OP)?;
        if self.len == 0 {
            return Ok(Attended {
                output: query.tensor().zeros_like(),
                stats: Default::default(),
            });
        }
        if !stats.any() {
            return Ok(Attended {
                output: self.attend_streamed_lse(query).0,
                stats: Default::default(),
            });
        }
        let (k, v) = self.tokens_fp32(0, self.len);
        let kp = self.positions.concat();
        let (output, stats) = reference_attention(
            query.tensor().clone(),
            k,
            v,
            query.positions(),
            KeyPositions::PerSequence(&kp),
            None,
            stats,
        );
        Ok(Attended { output, stats })
    }

    fn attend_lse(&mut self, query: &Query) -> kv_core::Result<(Tensor<4>, Tensor<4>)> {
        check_query(&self.config.shape, query, "GearCache::attend_lse")?;
        if self.len == 0 {
            return Ok(empty_lse(query, self.config.shape.kv_heads()));
        }
        Ok(self.attend_streamed_lse(query))
    }

    fn end_prefill(&mut self) -> kv_core::Result<()> {
        self.pending = None;
        self.prefill_done = true;
        Ok(())
    }

    fn view(&self) -> KvView {
        let s = self.config.shape;
        let (keys, values) = if self.len == 0 {
            let z = Tensor::zeros([s.batch(), s.kv_heads(), 0, s.head_dim()], &self.device);
            (z.clone(), z)
        } else {
            self.tokens_fp32(0, self.len)
        };
        KvView {
            keys,
            values,
            positions: positions_per_head(&self.positions, s.kv_heads()),
        }
    }

    fn lengths(&self) -> Lengths {
        Lengths {
            held: vec![self.len; self.config.shape.streams()],
            logical: self.logical.clone(),
        }
    }

    fn memory(&self) -> MemoryReport {
        let s = self.config.shape;
        let (pk, pv) = self.pending.as_ref().map_or((0, 0), |(k, v)| {
            (
                k.shape().num_elements() * k.dtype().size(),
                v.shape().num_elements() * v.dtype().size(),
            )
        });
        let (bk, bv) = self.block_stored_bytes();
        let logical_tokens: usize = self.logical.iter().sum();
        MemoryReport {
            key_bytes: bk + fp_bytes(&self.k_full) + pk,
            value_bytes: bv + fp_bytes(&self.v_full) + pv,
            metadata_bytes: s.batch() * self.len * core::mem::size_of::<u32>(),
            logical_elements: 2 * logical_tokens * s.kv_heads() * s.head_dim(),
            logical_tokens,
            held_token_slots: s.streams() * self.len,
        }
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = Vec::new();
        for b in &self.blocks {
            out.extend(b.keys.held_buffers(StorageRole::Keys));
            out.extend(b.values.held_buffers(StorageRole::Values));
        }
        if let Some(k) = &self.k_full {
            out.push(HeldBuffer::tensor(StorageRole::Keys, k));
        }
        if let Some(v) = &self.v_full {
            out.push(HeldBuffer::tensor(StorageRole::Values, v));
        }
        if let Some((k, v)) = &self.pending {
            out.push(HeldBuffer::tensor(StorageRole::Keys, k));
            out.push(HeldBuffer::tensor(StorageRole::Values, v));
        }
        for p in &self.positions {
            out.push(HeldBuffer::host(StorageRole::Metadata, p));
        }
        out
    }

    fn reset(&mut self) {
        self.blocks.clear();
        self.k_full = None;
        self.v_full = None;
        self.pending = None;
        self.prefill_done = false;
        self.len = 0;
        for p in &mut self.positions {
            *p = Vec::new();
        }
        self.logical.iter_mut().for_each(|l| *l = 0);
    }
}
