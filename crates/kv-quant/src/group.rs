//! Uniform group quantization of `[batch, heads, tokens, channels]` tensors, round to nearest,
//! with bit-packed codes and fp16 or fp32 scales and zero points.
//!
//! # Math
//! Every group of `G` elements shares a scale `s` (and, asymmetric, a zero point `z`):
//!
//! - **asymmetric**: `z = min`, `s = (max - min) / (2^b - 1)`,
//!   `q = clamp(round((x - z) / s), 0, 2^b - 1)`, `x̂ = q s + z`;
//! - **symmetric** (`b >= 2`): `s = max|x| / (2^(b-1) - 1)`,
//!   `q = clamp(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1)`, `x̂ = q s` (zero is exact; one of
//!   the `2^b` codes is unused; codes are stored offset by `2^(b-1) - 1`).
//!
//! A group whose range is zero gets `s = 0` and codes 0: it reconstructs exactly.
//!
//! # Error bound
//! With scale and zero point stored in fp32, every element satisfies `|x - x̂| <= s / 2` (plus
//! fp32 rounding of the arithmetic, a few ulps of `max |x|`). Stored in fp16, `s` and `z` are
//! rounded first and the codes are computed from the rounded values, so the bound gains the
//! rounding of the extremes: `|x - x̂| <= s / 2 + 2^-10 (|z| + (2^b - 1) s) + 2^-24 2^b`
//! (fp16's relative rounding of the offset and the range, with a factor 2 of margin, and its
//! absolute resolution for subnormal scales). Both bounds are property-tested for every width,
//! group size, axis and mode. fp16 statistics also need `|x| <= F16_MAX_ABS_INPUT`.
//!
//! # Grouping
//! [`GroupAxis::Tokens`] groups `G` consecutive tokens of one channel (per-channel
//! quantization, KIVI's keys); [`GroupAxis::Channels`] groups `G` consecutive channels of one
//! token (per-token quantization, KIVI's values). `G` must divide the grouped axis: an error
//! says so (HF's quantized cache crashes instead).
//!
//! # Storage
//! Codes are packed along the channel axis whatever the grouping (see [`crate::packing`]):
//! `[batch, heads, tokens, ceil(channels / c)]` `U32` words, so that tensors concatenate along
//! tokens without repacking. Scales and zeros are `[batch, heads, tokens / G, channels]`
//! (tokens axis) or `[batch, heads, tokens, channels / G]` (channels axis).

use burn::prelude::*;
use burn::tensor::FloatDType;
use kv_core::{HeldBuffer, StorageDtype, StorageRole};
use serde::{Deserialize, Serialize};

use crate::packing::{BitWidth, pack_words, unpack_words};
use crate::{QuantError, Result};

/// The largest magnitude accepted with fp16 scales and zero points: it keeps `max - min`
/// (at most twice this) within fp16's largest finite value, 65504.
pub const F16_MAX_ABS_INPUT: f32 = 32752.0;

/// The axis along which a group of `G` elements shares its scale and zero point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupAxis {
    /// `G` consecutive tokens of one channel (per-channel statistics; KIVI keys).
    Tokens,
    /// `G` consecutive channels of one token (per-token statistics; KIVI values).
    Channels,
}

impl GroupAxis {
    fn name(self) -> &'static str {
        match self {
            GroupAxis::Tokens => "tokens",
            GroupAxis::Channels => "channels",
        }
    }
}

/// Asymmetric (min/max with a zero point) or symmetric (absmax, no zero point).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantMode {
    /// `z = min`, `s = (max - min) / (2^b - 1)`.
    #[default]
    Asymmetric,
    /// `s = max|x| / (2^(b-1) - 1)`, zero exact; needs at least 2 bits.
    Symmetric,
}

/// How to quantize: width, group size and axis, mode and the dtype of scales and zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantSpec {
    bits: BitWidth,
    group: usize,
    axis: GroupAxis,
    mode: QuantMode,
    scale_dtype: StorageDtype,
}

impl QuantSpec {
    /// An asymmetric spec with fp16 scales and zeros (KIVI's choice).
    ///
    /// # Errors
    /// [`QuantError::InvalidConfig`] for a zero group.
    pub fn new(bits: BitWidth, group: usize, axis: GroupAxis) -> Result<Self> {
        if group == 0 {
            return Err(QuantError::InvalidConfig {
                field: "group",
                reason: "must be at least 1".into(),
            });
        }
        Ok(QuantSpec {
            bits,
            group,
            axis,
            mode: QuantMode::Asymmetric,
            scale_dtype: StorageDtype::F16,
        })
    }
    /// Sets the mode.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedBits`] for symmetric 1-bit (no level besides zero).
    pub fn with_mode(mut self, mode: QuantMode) -> Result<Self> {
        if mode == QuantMode::Symmetric && self.bits.bits() < 2 {
            return Err(QuantError::UnsupportedBits {
                bits: self.bits.bits(),
                extra: " (symmetric quantization needs at least 2 bits)",
            });
        }
        self.mode = mode;
        Ok(self)
    }
    /// Sets the dtype of scales and zero points.
    pub fn with_scale_dtype(mut self, dtype: StorageDtype) -> Self {
        self.scale_dtype = dtype;
        self
    }
    /// The code width.
    pub fn bits(&self) -> BitWidth {
        self.bits
    }
    /// The group size `G`.
    pub fn group(&self) -> usize {
        self.group
    }
    /// The grouped axis.
    pub fn axis(&self) -> GroupAxis {
        self.axis
    }
    /// The mode.
    pub fn mode(&self) -> QuantMode {
        self.mode
    }
    /// The dtype of scales and zeros.
    pub fn scale_dtype(&self) -> StorageDtype {
        self.scale_dtype
    }

    /// Stored bits per element for an axis length that `G` divides and `channels` channels:
    /// `b` (plus packing padding) `+ (scale + zero bits) / G`. KIVI-2, `G = 32`, fp16: 3.0.
    pub fn bits_per_element(&self, channels: usize) -> f64 {
        let code_bits = 32.0 * self.bits.words_for(channels) as f64 / channels as f64;
        let per_group = match self.mode {
            QuantMode::Asymmetric => 2,
            QuantMode::Symmetric => 1,
        } * self.scale_dtype.size()
            * 8;
        code_bits + per_group as f64 / self.group as f64
    }

    /// Stored bytes of a `[batch, heads, tokens, channels]` tensor quantized with this spec
    /// (which must divide the grouped axis): packed words, scales and zeros.
    pub fn stored_bytes(&self, dims: [usize; 4]) -> usize {
        let [b, h, t, d] = dims;
        let codes = b * h * t * self.bits.bytes_for(d);
        let groups = b * h * t * d / self.group;
        let stats = match self.mode {
            QuantMode::Asymmetric => 2,
            QuantMode::Symmetric => 1,
        } * groups
            * self.scale_dtype.size();
        codes + stats
    }

    /// The largest code, and for symmetric mode the offset stored codes carry.
    fn levels(&self) -> (f32, f32) {
        match self.mode {
            QuantMode::Asymmetric => (self.bits.max_code() as f32, 0.0),
            QuantMode::Symmetric => {
                let half = ((1u32 << (self.bits.bits() - 1)) - 1) as f32;
                (half, half)
            }
        }
    }

    fn check_dims(&self, dims: [usize; 4]) -> Result<()> {
        if dims.contains(&0) {
            return Err(QuantError::Empty { what: "tensor" });
        }
        let len = match self.axis {
            GroupAxis::Tokens => dims[2],
            GroupAxis::Channels => dims[3],
        };
        if !len.is_multiple_of(self.group) {
            return Err(QuantError::GroupDoesNotDivide {
                group: self.group,
                axis: self.axis.name(),
                len,
            });
        }
        Ok(())
    }

    /// Quantizes `x`, `[batch, heads, tokens, channels]`, after checking its shape, that it is
    /// finite and, with fp16 scales, that its magnitude stays within [`F16_MAX_ABS_INPUT`]
    /// (device reductions and a readback).
    ///
    /// # Errors
    /// [`QuantError::Empty`], [`QuantError::GroupDoesNotDivide`], [`QuantError::NonFinite`],
    /// [`QuantError::OutOfRange`].
    pub fn quantize(&self, x: Tensor<4>) -> Result<QuantizedTensor> {
        self.check_dims(x.dims())?;
        if !x.clone().is_finite().all().into_scalar::<bool>() {
            return Err(QuantError::NonFinite { what: "tensor" });
        }
        self.check_range(&x, "tensor")?;
        Ok(self.quantize_checked(x))
    }

    /// Checks that finite data fits fp16 scales and zero points (a no-op for fp32 ones).
    ///
    /// # Errors
    /// [`QuantError::OutOfRange`] naming `what`.
    pub fn check_range(&self, x: &Tensor<4>, what: &'static str) -> Result<()> {
        if self.scale_dtype == StorageDtype::F32 {
            return Ok(());
        }
        let max = x
            .clone()
            .cast(FloatDType::F32)
            .abs()
            .max()
            .into_scalar::<f32>();
        if max > F16_MAX_ABS_INPUT {
            return Err(QuantError::OutOfRange {
                what,
                max,
                limit: F16_MAX_ABS_INPUT,
            });
        }
        Ok(())
    }

    /// [`quantize`](Self::quantize) without the finiteness readback, for callers that have
    /// already checked (the caches check every block on append).
    ///
    /// # Errors
    /// [`QuantError::Empty`] and [`QuantError::GroupDoesNotDivide`].
    pub fn quantize_finite(&self, x: Tensor<4>) -> Result<QuantizedTensor> {
        self.check_dims(x.dims())?;
        Ok(self.quantize_checked(x))
    }

    fn grouped(&self, x: Tensor<4>) -> (Tensor<5>, usize) {
        let [b, h, t, d] = x.dims();
        let g = self.group;
        match self.axis {
            GroupAxis::Tokens => (x.reshape([b, h, t / g, g, d]), 3),
            GroupAxis::Channels => (x.reshape([b, h, t, d / g, g]), 4),
        }
    }

    fn stats_dims(&self, dims: [usize; 4]) -> [usize; 4] {
        let [b, h, t, d] = dims;
        match self.axis {
            GroupAxis::Tokens => [b, h, t / self.group, d],
            GroupAxis::Channels => [b, h, t, d / self.group],
        }
    }

    /// Quantizes a tensor whose shape has been checked.
    fn quantize_checked(&self, x: Tensor<4>) -> QuantizedTensor {
        let dims = x.dims();
        let [b, h, t, d] = dims;
        let x = x.cast(FloatDType::F32);
        let (xg, dim) = self.grouped(x);
        let (top, offset) = self.levels();
        let store = |s: Tensor<5>| -> Tensor<4> {
            s.reshape(self.stats_dims(dims))
                .cast(float_dtype(self.scale_dtype))
        };
        let (scales, zeros, q) = match self.mode {
            QuantMode::Asymmetric => {
                let mn = xg.clone().min_dim(dim);
                let mx = xg.clone().max_dim(dim);
                let scales = store((mx - mn.clone()).div_scalar(top));
                let zeros = store(mn);
                // Codes come from the stored (possibly fp16-rounded) scale and zero, so that
                // dequantization reproduces exactly what the codes were chosen against.
                let s = self.expand_stats(&scales, dims);
                let z = self.expand_stats(&zeros, dims);
                let q = ((xg - z) * safe_reciprocal(s)).round().clamp(0.0, top);
                (scales, Some(zeros), q)
            }
            QuantMode::Symmetric => {
                let a = xg.clone().abs().max_dim(dim);
                let scales = store(a.div_scalar(top));
                let s = self.expand_stats(&scales, dims);
                let q = (xg * safe_reciprocal(s))
                    .round()
                    .clamp(-top, top)
                    .add_scalar(offset);
                (scales, None, q)
            }
        };
        let codes = q.reshape([b * h * t, d]).int();
        let words = pack_words(codes, self.bits).reshape([b, h, t, self.bits.words_for(d)]);
        QuantizedTensor {
            spec: *self,
            dims,
            codes: words,
            scales,
            zeros,
        }
    }

    /// Stored statistics back to fp32, shaped to broadcast over the grouped 5-D view.
    fn expand_stats(&self, stats: &Tensor<4>, dims: [usize; 4]) -> Tensor<5> {
        let [b, h, t, d] = dims;
        let g = self.group;
        let s = stats.clone().cast(FloatDType::F32);
        match self.axis {
            GroupAxis::Tokens => s.reshape([b, h, t / g, 1, d]),
            GroupAxis::Channels => s.reshape([b, h, t, d / g, 1]),
        }
    }
}

fn float_dtype(d: StorageDtype) -> FloatDType {
    match d {
        StorageDtype::F32 => FloatDType::F32,
        StorageDtype::F16 => FloatDType::F16,
    }
}

/// `1 / s`, with 0 where `s == 0` (a constant group: every code is 0 and `x̂ = z` exactly).
fn safe_reciprocal(s: Tensor<5>) -> Tensor<5> {
    let zero = s.clone().equal_elem(0.0);
    s.mask_fill(zero.clone(), 1.0).recip().mask_fill(zero, 0.0)
}

/// A quantized `[batch, heads, tokens, channels]` tensor: packed codes, scales and (asymmetric)
/// zero points. See the module docs for the layout.
#[derive(Debug, Clone)]
pub struct QuantizedTensor {
    spec: QuantSpec,
    dims: [usize; 4],
    codes: Tensor<4, Int>,
    scales: Tensor<4>,
    zeros: Option<Tensor<4>>,
}

impl QuantizedTensor {
    /// The spec it was quantized with.
    pub fn spec(&self) -> &QuantSpec {
        &self.spec
    }
    /// The shape of the tensor it stands for, `[batch, heads, tokens, channels]`.
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }
    /// Tokens held.
    pub fn tokens(&self) -> usize {
        self.dims[2]
    }
    /// Packed codes, `[batch, heads, tokens, words]` `U32`.
    pub fn codes(&self) -> &Tensor<4, Int> {
        &self.codes
    }
    /// Scales, `[batch, heads, tokens / G, channels]` or `[batch, heads, tokens, channels / G]`.
    pub fn scales(&self) -> &Tensor<4> {
        &self.scales
    }
    /// Zero points (asymmetric mode), shaped as the scales.
    pub fn zeros(&self) -> Option<&Tensor<4>> {
        self.zeros.as_ref()
    }

    /// Bytes physically held: codes, scales and zeros, measured from their tensors.
    pub fn stored_bytes(&self) -> usize {
        self.held_buffers(StorageRole::Keys)
            .iter()
            .map(|b| b.bytes)
            .sum()
    }

    /// The held buffers, all attributed to `role`.
    pub fn held_buffers(&self, role: StorageRole) -> Vec<HeldBuffer> {
        let mut out = vec![
            HeldBuffer::tensor(role, &self.codes),
            HeldBuffer::tensor(role, &self.scales),
        ];
        if let Some(z) = &self.zeros {
            out.push(HeldBuffer::tensor(role, z));
        }
        out
    }

    /// The fp32 reconstruction `x̂`, `[batch, heads, tokens, channels]`.
    pub fn dequantize(&self) -> Tensor<4> {
        let [b, h, t, d] = self.dims;
        let bits = self.spec.bits;
        let words = self.codes.clone().reshape([b * h * t, bits.words_for(d)]);
        let codes = unpack_words(words, bits, d);
        let q = codes.float().cast(FloatDType::F32).reshape([b, h, t, d]);
        let (q, _) = self.spec.grouped(q);
        let s = self.spec.expand_stats(&self.scales, self.dims);
        let (_, offset) = self.spec.levels();
        let x = match &self.zeros {
            Some(z) => q * s + self.spec.expand_stats(z, self.dims),
            None => q.sub_scalar(offset) * s,
        };
        x.reshape([b, h, t, d])
    }

    /// The tokens `range` as a quantized tensor of their own (codes and statistics sliced,
    /// nothing dequantized). With [`GroupAxis::Tokens`] both ends must fall on group
    /// boundaries (or the end on the last token).
    ///
    /// # Errors
    /// [`QuantError::Incompatible`] for an empty, out-of-range or misaligned range.
    pub fn slice_tokens(&self, range: core::ops::Range<usize>) -> Result<QuantizedTensor> {
        let t = self.dims[2];
        let g = self.spec.group;
        let aligned = |x: usize| x.is_multiple_of(g) || x == t;
        if range.start >= range.end
            || range.end > t
            || (self.spec.axis == GroupAxis::Tokens
                && !(aligned(range.start) && aligned(range.end)))
        {
            return Err(QuantError::Incompatible {
                reason: format!(
                    "token range {range:?} of {t} tokens (group {g} along {})",
                    self.spec.axis.name()
                ),
            });
        }
        Ok(self.slice_tokens_aligned(range))
    }

    /// [`slice_tokens`](Self::slice_tokens) for a range already known to be valid.
    pub(crate) fn slice_tokens_aligned(&self, range: core::ops::Range<usize>) -> QuantizedTensor {
        let [b, h, _, d] = self.dims;
        let g = self.spec.group;
        let stats = match self.spec.axis {
            GroupAxis::Tokens => range.start / g..range.end.div_ceil(g),
            GroupAxis::Channels => range.clone(),
        };
        let sd = self.scales.dims()[3];
        let w = self.codes.dims()[3];
        let slice_stats = |s: &Tensor<4>| s.clone().slice([0..b, 0..h, stats.clone(), 0..sd]);
        QuantizedTensor {
            spec: self.spec,
            dims: [b, h, range.end - range.start, d],
            codes: self.codes.clone().slice([0..b, 0..h, range.clone(), 0..w]),
            scales: slice_stats(&self.scales),
            zeros: self.zeros.as_ref().map(slice_stats),
        }
    }

    /// Appends `other` along the token axis (same spec, batch, heads and channels).
    ///
    /// # Errors
    /// [`QuantError::Incompatible`] if spec or shape differ.
    pub fn concat(self, other: QuantizedTensor) -> Result<QuantizedTensor> {
        let [b, h, t, d] = self.dims;
        let [ob, oh, ot, od] = other.dims;
        if self.spec != other.spec || (b, h, d) != (ob, oh, od) {
            return Err(QuantError::Incompatible {
                reason: format!(
                    "cannot join {:?} {:?} with {:?} {:?}",
                    self.spec, self.dims, other.spec, other.dims
                ),
            });
        }
        Ok(QuantizedTensor {
            spec: self.spec,
            dims: [b, h, t + ot, d],
            codes: Tensor::cat(vec![self.codes, other.codes], 2),
            scales: Tensor::cat(vec![self.scales, other.scales], 2),
            zeros: match (self.zeros, other.zeros) {
                (Some(a), Some(z)) => Some(Tensor::cat(vec![a, z], 2)),
                _ => None,
            },
        })
    }
}
