//! fp8 codes computed with tensor ops: `e4m3` (OCP E4M3FN, as `torch.float8_e4m3fn`) and `e5m2`
//! (IEEE-like E5M2, as `torch.float8_e5m2`), one `u8` code per element, packed four per `U32`
//! word by [`crate::packing`].
//!
//! Burn 0.22 has no fp8 dtype on the CPU backend, so the conversion is written out:
//!
//! - **Encode** (round to nearest, ties to even, saturating): `|x|` is clamped to the largest
//!   finite value (448 for e4m3, 57344 for e5m2; ±infinity saturates too, as vLLM's scaled
//!   conversion does); its binade `e = max(floor(log2 |x|), e_min)` is found by comparing
//!   against the exact powers of two `2^(e_min+1) ..= 2^e_max`; the quantum is
//!   `2^(e - m)` (`m` mantissa bits), `n = rne(|x| / 2^(e - m))` is exact integer arithmetic in
//!   fp32, and the magnitude code is `(e - e_min) 2^m + n`. This covers subnormals (`e = e_min`,
//!   `n < 2^m`) and a mantissa that rounds up into the next binade (`n = 2^(m+1)`) with the same
//!   formula. The sign bit is set for `x < 0`. NaN encodes to the canonical NaN code (`0x7F`
//!   for e4m3, `0x7E` for e5m2).
//! - **Decode** is a lookup in the 256-entry table of [`Fp8Format::decode_host`] (a `select`).
//!
//! `tests/it/fp8.rs` checks decode(encode(x)) against the nearest representable value found by
//! enumerating all 256 codes on the host, over random, tie, subnormal and saturating inputs.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// An fp8 format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fp8Format {
    /// 4 exponent bits (bias 7), 3 mantissa bits, no infinities, NaN `S.1111.111`; max 448.
    E4M3,
    /// 5 exponent bits (bias 15), 2 mantissa bits, infinities and NaNs; max 57344.
    E5M2,
}

impl Fp8Format {
    /// Mantissa bits.
    pub fn mantissa_bits(self) -> i32 {
        match self {
            Fp8Format::E4M3 => 3,
            Fp8Format::E5M2 => 2,
        }
    }
    /// Exponent bias.
    pub fn bias(self) -> i32 {
        match self {
            Fp8Format::E4M3 => 7,
            Fp8Format::E5M2 => 15,
        }
    }
    /// The exponent of the smallest normal binade, `1 - bias`.
    pub fn min_exponent(self) -> i32 {
        1 - self.bias()
    }
    /// The exponent of the largest finite binade.
    pub fn max_exponent(self) -> i32 {
        match self {
            Fp8Format::E4M3 => 8,
            Fp8Format::E5M2 => 15,
        }
    }
    /// The largest finite value: 448 (e4m3) or 57344 (e5m2).
    pub fn max_finite(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }
    /// The code NaN encodes to.
    pub fn nan_code(self) -> u8 {
        match self {
            Fp8Format::E4M3 => 0x7F,
            Fp8Format::E5M2 => 0x7E,
        }
    }
    /// The value of a code: ±0, subnormals, normals, and for the special codes NaN (e4m3
    /// `0x7F`, `0xFF`; e5m2 exponent 31 with a non-zero mantissa) or ±infinity (e5m2 `0x7C`,
    /// `0xFC`).
    pub fn decode_host(self, code: u8) -> f32 {
        let m = self.mantissa_bits();
        let mag = i32::from(code & 0x7F);
        let e = mag >> m;
        let f = mag & ((1 << m) - 1);
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let top = (1 << (7 - m)) - 1;
        match self {
            Fp8Format::E4M3 if e == top && f == (1 << m) - 1 => return f32::NAN,
            Fp8Format::E5M2 if e == top => {
                return if f == 0 {
                    sign * f32::INFINITY
                } else {
                    f32::NAN
                };
            }
            _ => {}
        }
        let v = if e == 0 {
            f as f32 * pow2(self.min_exponent() - m)
        } else {
            ((1 << m) + f) as f32 * pow2(e - self.bias() - m)
        };
        sign * v
    }

    /// The 256 code values in code order (NaN and infinities included).
    pub fn table_host(self) -> Vec<f32> {
        (0..=255u8).map(|c| self.decode_host(c)).collect()
    }

    /// Encodes `x` (already divided by its scale) into codes `0..=255`, `I32`, same shape: round
    /// to nearest even, saturating at [`max_finite`](Self::max_finite) (see the module docs).
    pub fn encode<const D: usize>(self, x: Tensor<D>) -> Tensor<D, Int> {
        let m = self.mantissa_bits();
        let emin = self.min_exponent();
        let nan = x.clone().is_nan();
        let x = x.mask_fill(nan.clone(), 0.0);
        let neg = x.clone().lower_elem(0.0).float();
        let a = x.abs().clamp_max(self.max_finite());
        let mut binade = a.zeros_like();
        let mut quantum = a.ones_like().mul_scalar(pow2(emin - m));
        for k in emin + 1..=self.max_exponent() {
            let ge = a.clone().greater_equal_elem(pow2(k)).float();
            binade = binade + ge.clone();
            quantum = quantum * ge.add_scalar(1.0);
        }
        let n = round_half_even(a / quantum);
        let code = binade.mul_scalar(pow2(m)) + n + neg.mul_scalar(128.0);
        code.mask_fill(nan, f32::from(self.nan_code())).int()
    }

    /// Decodes codes `0..=255` (any int dtype) to fp32 values by table lookup.
    pub fn decode<const D: usize>(self, codes: Tensor<D, Int>) -> Tensor<D> {
        let dims = codes.dims();
        let device = codes.device();
        let n: usize = dims.iter().product();
        let table = Tensor::<1>::from_data(TensorData::new(self.table_host(), [256]), &device);
        let idx = codes.cast(burn::tensor::IntDType::I32).reshape([n]);
        table.select(0, idx).reshape(dims)
    }
}

/// `2^k` for the small exponents used here (exact).
fn pow2(k: i32) -> f32 {
    2f32.powi(k)
}

/// Round half to even of non-negative values below `2^23`, written out so that it does not
/// depend on a backend's `round` semantics.
fn round_half_even<const D: usize>(y: Tensor<D>) -> Tensor<D> {
    let r = y.clone().floor();
    let frac = y - r.clone();
    let odd = (r.clone() - r.clone().div_scalar(2.0).floor().mul_scalar(2.0)).equal_elem(1.0);
    let up = frac
        .clone()
        .greater_elem(0.5)
        .bool_or(frac.equal_elem(0.5).bool_and(odd));
    r + up.float()
}
