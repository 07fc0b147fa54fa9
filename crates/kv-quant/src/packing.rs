//! Bit packing of small integer codes into `U32` words with tensor ops only (shifts, masks and
//! sums), so that it runs unchanged on every Burn backend.
//!
//! # Layout
//! Codes are packed along the last axis of a `[rows, n]` code matrix. With `c` codes per word
//! ([`BitWidth::codes_per_word`]), code `i` of a row lives in word `i / c` at bit offset
//! `(i % c) * bits` (least significant bits first). A row's tail is padded with zero codes to
//! a whole word, so a row of `n` codes takes `ceil(n / c)` words:
//!
//! | bits | codes per word | bits used per word | bytes for `n` codes |
//! |---|---|---|---|
//! | 1 | 32 | 32 | `4 * ceil(n / 32)` |
//! | 2 | 16 | 32 | `4 * ceil(n / 16)` |
//! | 3 | 10 | 30 (2 wasted) | `4 * ceil(n / 10)` |
//! | 4 | 8 | 32 | `4 * ceil(n / 8)` |
//! | 8 | 4 | 32 | `4 * ceil(n / 4)` |
//!
//! Three-bit codes use ten codes per word rather than a bitstream: no code straddles two words,
//! so unpacking stays one shift and one mask per code; the price is 2 of every 32 bits (3.2 bits
//! per code instead of 3). For a 64-channel head that is 7 words (28 bytes) per token instead of
//! 24 bytes for a bitstream.
//!
//! Words are `U32` tensors (burn-notes: sign-bit shifts on `I32` panic on some backends, `U32`
//! shifts wrap the same way everywhere). Packing shifts every code into its field and sums the
//! fields of a word; the fields are disjoint, so the sum is the bitwise or and cannot overflow.

use burn::prelude::*;
use burn::tensor::IntDType;
use serde::{Deserialize, Serialize};

use crate::{QuantError, Result};

/// A code width with a packed layout: 1, 2, 3, 4 or 8 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct BitWidth(u32);

impl BitWidth {
    /// Every supported width, narrowest first.
    pub const ALL: [BitWidth; 5] = [
        BitWidth(1),
        BitWidth(2),
        BitWidth(3),
        BitWidth(4),
        BitWidth(8),
    ];

    /// One bit per code.
    pub const ONE: BitWidth = BitWidth(1);
    /// Four bits per code.
    pub const FOUR: BitWidth = BitWidth(4);
    /// Eight bits per code.
    pub const EIGHT: BitWidth = BitWidth(8);

    /// Validates a width.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedBits`] for anything but 1, 2, 3, 4 or 8.
    pub fn new(bits: u32) -> Result<Self> {
        if matches!(bits, 1 | 2 | 3 | 4 | 8) {
            Ok(BitWidth(bits))
        } else {
            Err(QuantError::UnsupportedBits { bits, extra: "" })
        }
    }
    /// The width in bits.
    pub fn bits(self) -> u32 {
        self.0
    }
    /// The largest code, `2^bits - 1`.
    pub fn max_code(self) -> u32 {
        (1u32 << self.0) - 1
    }
    /// Codes held by one `u32` word (10 for 3 bits, `32 / bits` otherwise).
    pub fn codes_per_word(self) -> usize {
        (32 / self.0) as usize
    }
    /// Words needed for `n` codes (the tail padded to a whole word).
    pub fn words_for(self, n: usize) -> usize {
        n.div_ceil(self.codes_per_word())
    }
    /// Bytes needed for `n` codes.
    pub fn bytes_for(self, n: usize) -> usize {
        4 * self.words_for(n)
    }
}

impl TryFrom<u32> for BitWidth {
    type Error = QuantError;
    fn try_from(bits: u32) -> Result<Self> {
        BitWidth::new(bits)
    }
}

impl From<BitWidth> for u32 {
    fn from(b: BitWidth) -> u32 {
        b.0
    }
}

impl core::fmt::Display for BitWidth {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} bits", self.0)
    }
}

/// The bit offset of every code slot of a word, `[0, bits, 2 * bits, ...]`, as a `U32` tensor.
fn shifts(bits: BitWidth, device: &Device) -> Tensor<3, Int> {
    let c = bits.codes_per_word();
    let s: Vec<i32> = (0..c as i32).map(|i| i * bits.bits() as i32).collect();
    Tensor::<1, Int>::from_data(TensorData::new(s, [c]), device)
        .cast(IntDType::U32)
        .reshape([1, 1, c])
}

/// Packs a `[rows, n]` matrix of codes in `0..=bits.max_code()` into `[rows, ceil(n / c)]` `U32`
/// words (see the module docs for the layout). Bits above the width are masked off.
///
/// # Errors
/// [`QuantError::Empty`] if `rows` or `n` is zero.
pub fn pack(codes: Tensor<2, Int>, bits: BitWidth) -> Result<Tensor<2, Int>> {
    let [rows, n] = codes.dims();
    if rows == 0 || n == 0 {
        return Err(QuantError::Empty { what: "codes" });
    }
    Ok(pack_words(codes, bits))
}

/// [`pack`] for a non-empty code matrix.
pub(crate) fn pack_words(codes: Tensor<2, Int>, bits: BitWidth) -> Tensor<2, Int> {
    let [rows, n] = codes.dims();
    let device = codes.device();
    let c = bits.codes_per_word();
    let words = bits.words_for(n);
    let codes = codes
        .cast(IntDType::U32)
        .bitwise_and_scalar(bits.max_code());
    let codes = if words * c > n {
        let pad = Tensor::<2, Int>::zeros([rows, words * c - n], &device).cast(IntDType::U32);
        Tensor::cat(vec![codes, pad], 1)
    } else {
        codes
    };
    let fields = codes
        .reshape([rows, words, c])
        .bitwise_left_shift(shifts(bits, &device).expand([rows, words, c]));
    fields.sum_dim(2).reshape([rows, words])
}

/// Unpacks `[rows, words]` `U32` words into the first `n` codes of every row, `[rows, n]`, as
/// `I32` (the inverse of [`pack`]).
///
/// # Errors
/// [`QuantError::Empty`] for zero rows or `n == 0`; [`QuantError::Incompatible`] if `words`
/// is not `ceil(n / c)`.
pub fn unpack(words: Tensor<2, Int>, bits: BitWidth, n: usize) -> Result<Tensor<2, Int>> {
    let [rows, w] = words.dims();
    if rows == 0 || n == 0 {
        return Err(QuantError::Empty {
            what: "packed words",
        });
    }
    if w != bits.words_for(n) {
        return Err(QuantError::Incompatible {
            reason: format!(
                "{w} words per row cannot hold exactly {n} codes of {bits} (expected {})",
                bits.words_for(n)
            ),
        });
    }
    Ok(unpack_words(words, bits, n))
}

/// [`unpack`] for a non-empty word matrix of `ceil(n / c)` words per row.
pub(crate) fn unpack_words(words: Tensor<2, Int>, bits: BitWidth, n: usize) -> Tensor<2, Int> {
    let [rows, w] = words.dims();
    let device = words.device();
    let c = bits.codes_per_word();
    let codes = words
        .cast(IntDType::U32)
        .reshape([rows, w, 1])
        .expand([rows, w, c])
        .bitwise_right_shift(shifts(bits, &device).expand([rows, w, c]))
        .bitwise_and_scalar(bits.max_code())
        .reshape([rows, w * c]);
    let codes = if w * c > n {
        codes.slice([0..rows, 0..n])
    } else {
        codes
    };
    codes.cast(IntDType::I32)
}

/// The same layout computed on the host: packs one row of codes (the reference the tensor
/// version is tested against, and a readable statement of the layout).
pub fn pack_host(codes: &[u32], bits: BitWidth) -> Vec<u32> {
    let c = bits.codes_per_word();
    codes
        .chunks(c)
        .map(|chunk| {
            chunk.iter().enumerate().fold(0u32, |w, (i, &code)| {
                w | ((code & bits.max_code()) << (i as u32 * bits.bits()))
            })
        })
        .collect()
}

/// Unpacks the first `n` codes of one row of words on the host (inverse of [`pack_host`]).
pub fn unpack_host(words: &[u32], bits: BitWidth, n: usize) -> Vec<u32> {
    let c = bits.codes_per_word();
    (0..n)
        .map(|i| {
            let w = words.get(i / c).copied().unwrap_or(0);
            (w >> ((i % c) as u32 * bits.bits())) & bits.max_code()
        })
        .collect()
}
