//! Serving-engine storage formats for KV tensors: llama.cpp's GGUF blocks (`q8_0`, `q4_0`,
//! `q4_1`, `q5_0`, `q5_1`, `iq4_nl`) along `head_dim`, and vLLM-style fp8 (`e4m3`, `e5m2`) with
//! a per-tensor or per-head scale.
//!
//! # llama.cpp blocks (32 values of one token's head vector per block)
//! Each block of 32 values `x` gets an fp32 scale computed as ggml's reference quantizers
//! (`quantize_row_*_ref` in `ggml/src/ggml-quants.c`) compute it; the scale (and `m`) are
//! stored as fp16, and the codes are computed against the fp32 scale, as ggml does:
//!
//! | format | stored per block | scale | code | value |
//! |---|---|---|---|---|
//! | `q8_0` | fp16 `d`, 32 × i8 (34 B) | `d = amax / 127` | `round(x / d)` (half away from 0) | `q d` |
//! | `q4_0` | fp16 `d`, 32 × 4 bit (18 B) | `d = max / -8`, `max` the signed value of largest magnitude | `min(15, trunc(x / d + 8.5))` | `(q - 8) d` |
//! | `q4_1` | fp16 `d`, `m`, 32 × 4 bit (20 B) | `d = (max - min) / 15`, `m = min` | `min(15, trunc((x - m) / d + 0.5))` | `q d + m` |
//! | `q5_0` | fp16 `d`, 32 bit high plane, 32 × 4 bit (22 B) | `d = max / -16` | `min(31, trunc(x / d + 16.5))` | `(q - 16) d` |
//! | `q5_1` | fp16 `d`, `m`, high plane, 32 × 4 bit (24 B) | `d = (max - min) / 31` | `min(31, trunc((x - m) / d + 0.5))` | `q d + m` |
//! | `iq4_nl` | fp16 `d`, 32 × 4 bit (18 B) | see below | index into `kvalues_iq4nl` | `d · kvalues_iq4nl[q]` |
//!
//! A block with zero scale stores codes of zero (`1/d` is taken as 0, as ggml does).
//! `iq4_nl`'s table is `{-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89,
//! 113}`. Its scale follows `quantize_row_iq4_nl_impl` with importance weights `w = x²` (no
//! imatrix): start from `d0 = max / -127`, pick each code as the nearest table entry to
//! `x / d0` (ties to the upper entry, like `best_index_int8`), then refit
//! `d = Σ w q x / Σ w q²`. With `ntry = -1` (the row quantizer ggml uses when a tensor, such as
//! a KV cache, is converted to `iq4_nl`) that is all; with `ntry > 0` (what `llama-quantize`
//! uses for weights, `ntry = 7`) it starts from `d0 = max / 127`, also tries the inverse
//! scales `(t - 127) / max` for `t = -ntry..=ntry`, keeps the refit with the largest
//! `(Σ w q x)² / Σ w q²`, and recomputes the codes against the final `d`
//! ([`Iq4Search`]).
//!
//! Codes are packed with [`crate::packing`] in `U32` words along `head_dim` (4-bit codes 8 per
//! word, i8 codes 4 per word as two's complement bytes, the fifth bit of `q5_*` as a 1-bit
//! plane, one word per block), so the bytes held are exactly ggml's block sizes. The order of
//! the codes inside a block differs from ggml's byte layout (ggml puts element `j` and
//! `j + 16` in one byte); the values and sizes are the same.
//!
//! # fp8
//! vLLM's fp8 KV cache: `x / scale` is converted to fp8 with saturation
//! ([`crate::fp8`]), the scale being `amax / fp8_max` over the whole tensor or per KV head.
//! The scale is a stored fp32 tensor `[1, 1 or heads, 1, 1]`.
//!
//! # Error bounds (property-tested in `tests/it/blocks.rs`)
//! For the linear block formats every element satisfies `|x - x̂| <= |d|/2` in exact
//! arithmetic, except `q4_0`/`q5_0` elements on the opposite side of `max` that clamp to code
//! 15 / 31 (at most `|d|`: those formats' ranges are `[-8, 7]` and `[-16, 15]` steps);
//! storing `d` and `m` in fp16 adds `|q'| · |d - fp16(d)| + |m - fp16(m)|` (`q'` the signed
//! level). fp8 is exact to half a unit in the last place of the value's binade: relative
//! error `<= 2^-(m+1)` for normals, absolute `<= 2^(e_min - m - 1) · scale` for subnormals,
//! plus saturation above `fp8_max · scale`.

use burn::prelude::*;
use burn::tensor::{FloatDType, IntDType};
use kv_core::{HeldBuffer, StorageRole};
use serde::{Deserialize, Serialize};

use crate::fp8::Fp8Format;
use crate::host::{HostCodes, floats, words as host_words};
use crate::packing::{BitWidth, pack_words, unpack_words};
use crate::{QuantError, Result};

/// Values per llama.cpp block.
pub const GGML_BLOCK: usize = 32;

/// llama.cpp's non-linear 4-bit table (`kvalues_iq4nl`).
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// How `iq4_nl` searches its scale (ggml's `ntry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Iq4Search {
    /// `ntry = -1`: one weighted refit from `max / -127` (ggml's row quantizer, the KV-cache
    /// path).
    #[default]
    Refit,
    /// `ntry = 7`: 15 trial scales plus the refit, codes recomputed (what `llama-quantize`
    /// does for weights).
    Search7,
}

/// A KV storage format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockFormat {
    /// llama.cpp `q8_0`: 34 bytes per 32 values (8.5 bits).
    Q8_0,
    /// llama.cpp `q4_0`: 18 bytes per 32 values (4.5 bits).
    Q4_0,
    /// llama.cpp `q4_1`: 20 bytes per 32 values (5 bits).
    Q4_1,
    /// llama.cpp `q5_0`: 22 bytes per 32 values (5.5 bits).
    Q5_0,
    /// llama.cpp `q5_1`: 24 bytes per 32 values (6 bits).
    Q5_1,
    /// llama.cpp `iq4_nl`: 18 bytes per 32 values (4.5 bits), non-linear table.
    Iq4Nl(Iq4Search),
    /// fp8 with a scale (8 bits per value plus the scale).
    Fp8(Fp8Format),
}

impl BlockFormat {
    /// Every format with its default options, in the order of the docs.
    pub const ALL: [BlockFormat; 8] = [
        BlockFormat::Q8_0,
        BlockFormat::Q4_0,
        BlockFormat::Q4_1,
        BlockFormat::Q5_0,
        BlockFormat::Q5_1,
        BlockFormat::Iq4Nl(Iq4Search::Refit),
        BlockFormat::Fp8(Fp8Format::E4M3),
        BlockFormat::Fp8(Fp8Format::E5M2),
    ];

    /// The name kv-eval registers (`q8_0`, ..., `iq4_nl`, `fp8_e4m3`, `fp8_e5m2`).
    pub fn name(self) -> &'static str {
        match self {
            BlockFormat::Q8_0 => "q8_0",
            BlockFormat::Q4_0 => "q4_0",
            BlockFormat::Q4_1 => "q4_1",
            BlockFormat::Q5_0 => "q5_0",
            BlockFormat::Q5_1 => "q5_1",
            BlockFormat::Iq4Nl(_) => "iq4_nl",
            BlockFormat::Fp8(Fp8Format::E4M3) => "fp8_e4m3",
            BlockFormat::Fp8(Fp8Format::E5M2) => "fp8_e5m2",
        }
    }

    /// The format registered under `name` (default options).
    ///
    /// # Errors
    /// [`QuantError::InvalidConfig`] listing the known names.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| QuantError::InvalidConfig {
                field: "format",
                reason: format!(
                    "unknown format `{name}`; known: {}",
                    Self::ALL.map(BlockFormat::name).join(", ")
                ),
            })
    }

    /// Whether this is an fp8 format.
    pub fn is_fp8(self) -> bool {
        matches!(self, BlockFormat::Fp8(_))
    }

    /// Bytes per block of 32 values for the llama.cpp formats (`None` for fp8).
    pub fn block_bytes(self) -> Option<usize> {
        match self {
            BlockFormat::Q8_0 => Some(34),
            BlockFormat::Q4_0 | BlockFormat::Iq4Nl(_) => Some(18),
            BlockFormat::Q4_1 => Some(20),
            BlockFormat::Q5_0 => Some(22),
            BlockFormat::Q5_1 => Some(24),
            BlockFormat::Fp8(_) => None,
        }
    }

    /// Stored bits per element for a head of `head_dim` values, scales excluded for fp8 (whose
    /// per-tensor or per-head scale is amortised over every token): `8 · block_bytes / 32`.
    pub fn bits_per_element(self, head_dim: usize) -> f64 {
        match self.block_bytes() {
            Some(b) => b as f64 * 8.0 / GGML_BLOCK as f64,
            None => 32.0 * BitWidth::EIGHT.words_for(head_dim) as f64 / head_dim as f64,
        }
    }

    /// Checks that `head_dim` can be stored: a positive multiple of 32 for the llama.cpp
    /// formats, positive for fp8.
    ///
    /// # Errors
    /// [`QuantError::GroupDoesNotDivide`] naming the format's block size.
    pub fn check_head_dim(self, head_dim: usize) -> Result<()> {
        if head_dim == 0 || (!self.is_fp8() && !head_dim.is_multiple_of(GGML_BLOCK)) {
            return Err(QuantError::GroupDoesNotDivide {
                group: GGML_BLOCK,
                axis: "head_dim (llama.cpp blocks hold 32 values of one head vector)",
                len: head_dim,
            });
        }
        Ok(())
    }

    /// Encodes `x`, `[batch, heads, tokens, head_dim]`, with one of the llama.cpp formats.
    /// `x` must be finite with `|x| <= 65504` (fp16 scales and minima) and `head_dim` a
    /// multiple of 32.
    ///
    /// # Errors
    /// [`QuantError::Empty`], [`QuantError::GroupDoesNotDivide`], or
    /// [`QuantError::InvalidConfig`] for an fp8 format (use [`BlockFormat::encode_fp8`]).
    pub fn encode(self, x: Tensor<4>) -> Result<EncodedBlocks> {
        let dims = x.dims();
        if dims.contains(&0) {
            return Err(QuantError::Empty { what: "tensor" });
        }
        self.check_head_dim(dims[3])?;
        if self.is_fp8() {
            return Err(QuantError::InvalidConfig {
                field: "format",
                reason: "fp8 needs a scale: use BlockFormat::encode_fp8".into(),
            });
        }
        Ok(self.encode_ggml(x))
    }

    /// Encodes `x`, `[batch, heads, tokens, head_dim]`, as fp8 codes of `x / scale` with
    /// `scale` an fp32 `[1, 1 or heads, 1, 1]` tensor (held with the codes).
    ///
    /// # Errors
    /// [`QuantError::Empty`], or [`QuantError::InvalidConfig`] for a non-fp8 format or a scale
    /// of the wrong shape.
    pub fn encode_fp8(self, x: Tensor<4>, scale: Tensor<4>) -> Result<EncodedBlocks> {
        let dims = x.dims();
        if dims.contains(&0) {
            return Err(QuantError::Empty { what: "tensor" });
        }
        let BlockFormat::Fp8(f) = self else {
            return Err(QuantError::InvalidConfig {
                field: "format",
                reason: format!("{} is not an fp8 format", self.name()),
            });
        };
        let sd = scale.dims();
        if sd[0] != 1 || sd[2] != 1 || sd[3] != 1 || (sd[1] != 1 && sd[1] != dims[1]) {
            return Err(QuantError::InvalidConfig {
                field: "scale",
                reason: format!("scale shape {sd:?} is not [1, 1 or {}, 1, 1]", dims[1]),
            });
        }
        let [b, h, t, d] = dims;
        let scale = scale.cast(FloatDType::F32);
        let y = x.cast(FloatDType::F32) / scale.clone();
        let codes = f.encode(y).reshape([b * h * t, d]);
        let words = pack_words(codes, BitWidth::EIGHT);
        Ok(EncodedBlocks {
            format: self,
            dims,
            codes: words.reshape([b, h, t, BitWidth::EIGHT.words_for(d)]),
            high: None,
            scales: scale,
            mins: None,
        })
    }

    fn encode_ggml(self, x: Tensor<4>) -> EncodedBlocks {
        let dims = x.dims();
        let [b, h, t, d] = dims;
        let nb = d / GGML_BLOCK;
        let rows = b * h * t;
        let xb = x.cast(FloatDType::F32).reshape([rows * nb, GGML_BLOCK]);
        let (scale, min, q): (Tensor<2>, Option<Tensor<2>>, Tensor<2, Int>) = match self {
            BlockFormat::Q8_0 => {
                let dd = xb.clone().abs().max_dim(1).div_scalar(127.0);
                let y = xb * safe_recip(dd.clone());
                // roundf: half away from zero.
                let r = y.clone().abs().add_scalar(0.5).floor().clamp_max(127.0);
                let q = r.clone() - r.mul_scalar(2.0).mask_fill(y.greater_equal_elem(0.0), 0.0);
                // Two's complement byte.
                let q = q.clone() + q.lower_elem(0.0).float().mul_scalar(256.0);
                (dd, None, q.int())
            }
            BlockFormat::Q4_0 | BlockFormat::Q5_0 => {
                let (half, top) = if self == BlockFormat::Q4_0 {
                    (8.0, 15.0)
                } else {
                    (16.0, 31.0)
                };
                let dd = signed_max(&xb).div_scalar(-half);
                let q = (xb * safe_recip(dd.clone()))
                    .add_scalar(half + 0.5)
                    .floor()
                    .clamp(0.0, top);
                (dd, None, q.int())
            }
            BlockFormat::Q4_1 | BlockFormat::Q5_1 => {
                let top = if self == BlockFormat::Q4_1 {
                    15.0
                } else {
                    31.0
                };
                let mn = xb.clone().min_dim(1);
                let mx = xb.clone().max_dim(1);
                let dd = (mx - mn.clone()).div_scalar(top);
                let q = ((xb - mn.clone()) * safe_recip(dd.clone()))
                    .add_scalar(0.5)
                    .floor()
                    .clamp(0.0, top);
                (dd, Some(mn), q.int())
            }
            BlockFormat::Iq4Nl(search) => {
                let (dd, q) = iq4_nl(xb, search);
                (dd, None, q)
            }
            BlockFormat::Fp8(_) => unreachable!("fp8 is encoded by encode_fp8"),
        };
        let q = q.reshape([rows, d]);
        let (low, high) = match self {
            BlockFormat::Q5_0 | BlockFormat::Q5_1 => (
                q.clone().bitwise_and_scalar(15),
                Some(q.bitwise_right_shift_scalar(4)),
            ),
            _ => (q, None),
        };
        let bits = self.code_bits();
        let codes = pack_words(low, bits).reshape([b, h, t, bits.words_for(d)]);
        let high = high.map(|hq| pack_words(hq, BitWidth::ONE).reshape([b, h, t, nb]));
        let store = |s: Tensor<2>| s.reshape([b, h, t, nb]).cast(FloatDType::F16);
        EncodedBlocks {
            format: self,
            dims,
            codes,
            high,
            scales: store(scale),
            mins: min.map(store),
        }
    }

    fn code_bits(self) -> BitWidth {
        match self {
            BlockFormat::Q8_0 | BlockFormat::Fp8(_) => BitWidth::EIGHT,
            _ => BitWidth::FOUR,
        }
    }
}

/// `1/d`, and 0 where `d == 0` (ggml's `id = d ? 1/d : 0`).
fn safe_recip(d: Tensor<2>) -> Tensor<2> {
    let zero = d.clone().equal_elem(0.0);
    d.mask_fill(zero.clone(), 1.0).recip().mask_fill(zero, 0.0)
}

/// Per row of `[n, 32]`: the signed value of largest magnitude (the first one on ties, as
/// ggml's strict `>` scan), `[n, 1]`.
fn signed_max(x: &Tensor<2>) -> Tensor<2> {
    let idx = x.clone().abs().argmax(1);
    x.clone().gather(1, idx)
}

/// `iq4_nl` scale and codes for `[n, 32]` blocks (see the module docs).
fn iq4_nl(x: Tensor<2>, search: Iq4Search) -> (Tensor<2>, Tensor<2, Int>) {
    let device = x.device();
    let [n, k] = x.dims();
    let table: Vec<f32> = KVALUES_IQ4NL.iter().map(|&v| f32::from(v)).collect();
    // Midpoints between neighbours: index = #{midpoints <= al} (ties to the upper entry).
    let mids: Vec<f32> = table.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let table = Tensor::<1>::from_data(TensorData::new(table, [16]), &device);
    let mids = Tensor::<1>::from_data(TensorData::new(mids, [15]), &device).reshape([1, 1, 15]);
    let index = |id: Tensor<2>| -> Tensor<2, Int> {
        let al = (x.clone() * id).reshape([n, k, 1]).expand([n, k, 15]);
        al.greater_equal(mids.clone().expand([n, k, 15]))
            .int()
            .sum_dim(2)
            .reshape([n, k])
    };
    let value = |l: Tensor<2, Int>| -> Tensor<2> {
        table.clone().select(0, l.reshape([n * k])).reshape([n, k])
    };
    let w = x.clone() * x.clone();
    // (Σ w q x, Σ w q²) of codes `l`.
    let sums = |l: Tensor<2, Int>| -> (Tensor<2>, Tensor<2>) {
        let q = value(l);
        let sqx = (w.clone() * q.clone() * x.clone()).sum_dim(1);
        let sq2 = (w.clone() * q.clone() * q).sum_dim(1);
        (sqx, sq2)
    };
    let max = signed_max(&x);
    let zero = x.clone().abs().max_dim(1).lower_elem(1e-15);
    let v0 = f32::from(KVALUES_IQ4NL[0]);
    let (ntry, d0) = match search {
        Iq4Search::Refit => (-1i32, max.clone().div_scalar(v0)),
        Iq4Search::Search7 => (7, max.clone().div_scalar(-v0)),
    };
    let l0 = index(safe_recip(d0));
    let (sqx, sq2) = sums(l0.clone());
    let mut d = sqx.clone() * safe_recip(sq2);
    let mut best = d.clone() * sqx;
    for itry in -ntry..=ntry {
        let id = safe_recip(max.clone()).mul_scalar(itry as f32 + v0);
        let (sqx, sq2) = sums(index(id));
        let better = sq2
            .clone()
            .greater_elem(0.0)
            .bool_and((sqx.clone() * sqx.clone()).greater(best.clone() * sq2.clone()));
        let dn = sqx.clone() * safe_recip(sq2);
        best = best.mask_where(better.clone(), dn.clone() * sqx);
        d = d.mask_where(better, dn);
    }
    let d = d.mask_fill(zero.clone(), 0.0);
    let l = if ntry > 0 {
        index(safe_recip(d.clone()))
    } else {
        l0
    };
    // A zero block keeps codes of zero magnitude index 0 with d = 0 (value 0).
    let l = l.mask_fill(zero.expand([n, k]), 0);
    (d, l)
}

/// A `[batch, heads, tokens, head_dim]` tensor in one of the [`BlockFormat`]s: packed codes,
/// the `q5_*` high-bit plane, fp16 block scales `d` (or the fp8 scale) and `q*_1` minima `m`.
#[derive(Debug, Clone)]
pub struct EncodedBlocks {
    format: BlockFormat,
    dims: [usize; 4],
    codes: Tensor<4, Int>,
    high: Option<Tensor<4, Int>>,
    scales: Tensor<4>,
    mins: Option<Tensor<4>>,
}

impl EncodedBlocks {
    /// The format.
    pub fn format(&self) -> BlockFormat {
        self.format
    }
    /// The shape of the tensor it stands for.
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }
    /// Tokens held.
    pub fn tokens(&self) -> usize {
        self.dims[2]
    }
    /// Packed codes, `[batch, heads, tokens, words]` `U32` (4-bit codes 8 per word, 8-bit codes
    /// 4 per word).
    pub fn codes(&self) -> &Tensor<4, Int> {
        &self.codes
    }
    /// The `q5_*` fifth-bit plane, `[batch, heads, tokens, blocks]` `U32`.
    pub fn high_bits(&self) -> Option<&Tensor<4, Int>> {
        self.high.as_ref()
    }
    /// Block scales `d`, fp16 `[batch, heads, tokens, blocks]`; for fp8 the fp32 scale
    /// `[1, 1 or heads, 1, 1]`.
    pub fn scales(&self) -> &Tensor<4> {
        &self.scales
    }
    /// Block minima `m` of `q4_1` and `q5_1`, fp16.
    pub fn mins(&self) -> Option<&Tensor<4>> {
        self.mins.as_ref()
    }

    /// The held buffers, all attributed to `role`, measured from the tensors.
    pub fn held_buffers(&self, role: StorageRole) -> Vec<HeldBuffer> {
        let mut out = vec![
            HeldBuffer::tensor(role, &self.codes),
            HeldBuffer::tensor(role, &self.scales),
        ];
        if let Some(h) = &self.high {
            out.push(HeldBuffer::tensor(role, h));
        }
        if let Some(m) = &self.mins {
            out.push(HeldBuffer::tensor(role, m));
        }
        out
    }

    /// Bytes held (codes, planes, scales, minima).
    pub fn stored_bytes(&self) -> usize {
        self.held_buffers(StorageRole::Keys)
            .iter()
            .map(|b| b.bytes)
            .sum()
    }

    /// The fp32 reconstruction, `[batch, heads, tokens, head_dim]`.
    pub fn decode(&self) -> Tensor<4> {
        let [b, h, t, d] = self.dims;
        let rows = b * h * t;
        let bits = self.format.code_bits();
        let words = self.codes.clone().reshape([rows, bits.words_for(d)]);
        let q = unpack_words(words, bits, d);
        if let BlockFormat::Fp8(f) = self.format {
            return f.decode(q).reshape([b, h, t, d]) * self.scales.clone();
        }
        let nb = d / GGML_BLOCK;
        let q = match &self.high {
            Some(hw) => {
                let hi = unpack_words(hw.clone().reshape([rows, nb]), BitWidth::ONE, d);
                q + hi.bitwise_left_shift_scalar(4)
            }
            None => q,
        };
        let q = q
            .float()
            .cast(FloatDType::F32)
            .reshape([rows * nb, GGML_BLOCK]);
        let stat = |s: &Tensor<4>| s.clone().cast(FloatDType::F32).reshape([rows * nb, 1]);
        let s = stat(&self.scales);
        let x = match self.format {
            BlockFormat::Q8_0 => {
                let neg = q
                    .clone()
                    .greater_equal_elem(128.0)
                    .float()
                    .mul_scalar(256.0);
                (q - neg) * s
            }
            BlockFormat::Q4_0 => q.sub_scalar(8.0) * s,
            BlockFormat::Q5_0 => q.sub_scalar(16.0) * s,
            BlockFormat::Q4_1 | BlockFormat::Q5_1 => {
                let m = self.mins.as_ref().map_or_else(|| s.zeros_like(), stat);
                q * s + m
            }
            BlockFormat::Iq4Nl(_) => {
                let table: Vec<f32> = KVALUES_IQ4NL.iter().map(|&v| f32::from(v)).collect();
                let table = Tensor::<1>::from_data(TensorData::new(table, [16]), &q.device());
                let idx = q.int().cast(IntDType::I32).reshape([rows * d]);
                table.select(0, idx).reshape([rows * nb, GGML_BLOCK]) * s
            }
            BlockFormat::Fp8(_) => unreachable!("fp8 decoded above"),
        };
        x.reshape([b, h, t, d])
    }

    /// The codes and statistics read back for the fused host kernels ([`crate::host`]):
    /// `x̂ = level(code) · d + m` per block of 32 channels (fp8: the decoded code times the
    /// tensor's or head's scale, one group of `head_dim`).
    pub(crate) fn to_host(&self) -> HostCodes {
        let [b, h, t, d] = self.dims;
        let words = host_words(&self.codes);
        let high = self.high.as_ref().map(host_words);
        let levels: Vec<f32> = match self.format {
            BlockFormat::Q8_0 => (0..256).map(|c| f32::from(c as u8 as i8)).collect(),
            BlockFormat::Q4_0 => (0..16).map(|c| c as f32 - 8.0).collect(),
            BlockFormat::Q5_0 => (0..32).map(|c| c as f32 - 16.0).collect(),
            BlockFormat::Q4_1 => (0..16).map(|c| c as f32).collect(),
            BlockFormat::Q5_1 => (0..32).map(|c| c as f32).collect(),
            BlockFormat::Iq4Nl(_) => KVALUES_IQ4NL.iter().map(|&v| f32::from(v)).collect(),
            BlockFormat::Fp8(f) => f.table_host(),
        };
        let bits = self.format.code_bits();
        if self.format.is_fp8() {
            // One group of head_dim per token, scaled by the tensor's or the head's scale.
            let scale = floats(&self.scales);
            let per_head = scale.len() == h;
            let scales = (0..b * h * t)
                .map(|i| scale[if per_head { (i / t) % h } else { 0 }])
                .collect();
            return HostCodes::per_token([b, h, t, d], bits, words, None, levels, d, scales, None);
        }
        HostCodes::per_token(
            [b, h, t, d],
            bits,
            words,
            high,
            levels,
            GGML_BLOCK,
            floats(&self.scales),
            self.mins.as_ref().map(floats),
        )
    }

    /// The tokens `range` (must be non-empty and within the held tokens; checked by callers).
    pub(crate) fn slice_tokens(&self, range: core::ops::Range<usize>) -> EncodedBlocks {
        let [b, h, _, d] = self.dims;
        let cut = |t: &Tensor<4, Int>| {
            let w = t.dims()[3];
            t.clone().slice([0..b, 0..h, range.clone(), 0..w])
        };
        let cutf = |t: &Tensor<4>| {
            let w = t.dims()[3];
            t.clone().slice([0..b, 0..h, range.clone(), 0..w])
        };
        EncodedBlocks {
            format: self.format,
            dims: [b, h, range.end - range.start, d],
            codes: cut(&self.codes),
            high: self.high.as_ref().map(cut),
            scales: if self.format.is_fp8() {
                self.scales.clone()
            } else {
                cutf(&self.scales)
            },
            mins: self.mins.as_ref().map(cutf),
        }
    }

    /// Appends `other` along tokens (same format, batch, heads and head_dim; for fp8 the scale
    /// of `self` is kept, the caller guarantees both share it).
    ///
    /// # Errors
    /// [`QuantError::Incompatible`] if format or shape differ.
    pub fn concat(self, other: EncodedBlocks) -> Result<EncodedBlocks> {
        let [b, h, t, d] = self.dims;
        let [ob, oh, ot, od] = other.dims;
        if self.format != other.format || (b, h, d) != (ob, oh, od) {
            return Err(QuantError::Incompatible {
                reason: format!(
                    "cannot join {} {:?} with {} {:?}",
                    self.format.name(),
                    self.dims,
                    other.format.name(),
                    other.dims
                ),
            });
        }
        let fp8 = self.format.is_fp8();
        Ok(EncodedBlocks {
            format: self.format,
            dims: [b, h, t + ot, d],
            codes: Tensor::cat(vec![self.codes, other.codes], 2),
            high: match (self.high, other.high) {
                (Some(a), Some(z)) => Some(Tensor::cat(vec![a, z], 2)),
                _ => None,
            },
            scales: if fp8 {
                self.scales
            } else {
                Tensor::cat(vec![self.scales, other.scales], 2)
            },
            mins: match (self.mins, other.mins) {
                (Some(a), Some(z)) => Some(Tensor::cat(vec![a, z], 2)),
                _ => None,
            },
        })
    }
}
