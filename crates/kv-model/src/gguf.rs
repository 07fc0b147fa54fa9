//! GGUF (versions 2 and 3) reader: header, metadata, tensor infos, and dequantization to `f32`.
//!
//! The whole file is read into memory (the SmolLM2-135M file is 98 MB). Parsing is defensive:
//! every count and length in the header is checked against the bytes that remain before anything
//! is allocated, every tensor's byte range is checked against the file, unknown value and tensor
//! types are errors, and malformed input returns [`ModelError`] instead of panicking.
//!
//! # Layout (all little-endian)
//!
//! ```text
//! "GGUF" | version u32 | tensor_count u64 | kv_count u64
//! kv_count × { key: string, value_type u32, value }
//! tensor_count × { name: string, n_dims u32, dims u64[n_dims] (fastest first), ggml_type u32,
//!                  offset u64 (relative to the data section, a multiple of the alignment) }
//! padding to `general.alignment` (default 32) | tensor data
//! string = len u64 + UTF-8 bytes; array = elem_type u32 + count u64 + elements
//! ```
//!
//! # Dimension order
//!
//! GGUF lists dimensions fastest first; [`TensorInfo::shape`] and [`HostTensor::shape`] are
//! row-major, slowest first. The embedding stored as `[576, 49152]` is a `[49152, 576]` matrix.

use std::collections::HashMap;
use std::path::Path;

use crate::host::checked_numel;
use crate::{HostTensor, ModelError, Result};

#[cfg(test)]
pub(crate) mod tests;

/// The four magic bytes at the start of every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Most dimensions a GGML tensor can have.
pub const MAX_DIMS: usize = 4;

/// Deepest nesting of metadata arrays accepted (real files use depth 1).
const MAX_ARRAY_DEPTH: usize = 8;

/// Largest `general.alignment` accepted (1 GiB).
const MAX_ALIGNMENT: u64 = 1 << 30;

/// The type tag of a metadata value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgufValueType {
    /// `u8`, tag 0.
    U8,
    /// `i8`, tag 1.
    I8,
    /// `u16`, tag 2.
    U16,
    /// `i16`, tag 3.
    I16,
    /// `u32`, tag 4.
    U32,
    /// `i32`, tag 5.
    I32,
    /// `f32`, tag 6.
    F32,
    /// `bool` (one byte, 0 or 1), tag 7.
    Bool,
    /// UTF-8 string, tag 8.
    String,
    /// Homogeneous array, tag 9.
    Array,
    /// `u64`, tag 10.
    U64,
    /// `i64`, tag 11.
    I64,
    /// `f64`, tag 12.
    F64,
}

impl GgufValueType {
    /// The type for a tag, or `None` if the tag is unknown.
    pub fn from_tag(tag: u32) -> Option<Self> {
        Some(match tag {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }

    /// The tag written in files.
    pub fn tag(self) -> u32 {
        match self {
            Self::U8 => 0,
            Self::I8 => 1,
            Self::U16 => 2,
            Self::I16 => 3,
            Self::U32 => 4,
            Self::I32 => 5,
            Self::F32 => 6,
            Self::Bool => 7,
            Self::String => 8,
            Self::Array => 9,
            Self::U64 => 10,
            Self::I64 => 11,
            Self::F64 => 12,
        }
    }

    /// A short name such as `"u32"` or `"string"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::U8 => "u8",
            Self::I8 => "i8",
            Self::U16 => "u16",
            Self::I16 => "i16",
            Self::U32 => "u32",
            Self::I32 => "i32",
            Self::F32 => "f32",
            Self::Bool => "bool",
            Self::String => "string",
            Self::Array => "array",
            Self::U64 => "u64",
            Self::I64 => "i64",
            Self::F64 => "f64",
        }
    }

    /// The fewest bytes one value of this type occupies in a file (used to bound counts).
    fn min_encoded_len(self) -> usize {
        match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 | Self::String => 8,
            Self::Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum GgufValue {
    /// `u8`.
    U8(u8),
    /// `i8`.
    I8(i8),
    /// `u16`.
    U16(u16),
    /// `i16`.
    I16(i16),
    /// `u32`.
    U32(u32),
    /// `i32`.
    I32(i32),
    /// `f32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// A string.
    String(String),
    /// An array.
    Array(GgufArray),
    /// `u64`.
    U64(u64),
    /// `i64`.
    I64(i64),
    /// `f64`.
    F64(f64),
}

impl GgufValue {
    /// The value's type tag.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            Self::U8(_) => GgufValueType::U8,
            Self::I8(_) => GgufValueType::I8,
            Self::U16(_) => GgufValueType::U16,
            Self::I16(_) => GgufValueType::I16,
            Self::U32(_) => GgufValueType::U32,
            Self::I32(_) => GgufValueType::I32,
            Self::F32(_) => GgufValueType::F32,
            Self::Bool(_) => GgufValueType::Bool,
            Self::String(_) => GgufValueType::String,
            Self::Array(_) => GgufValueType::Array,
            Self::U64(_) => GgufValueType::U64,
            Self::I64(_) => GgufValueType::I64,
            Self::F64(_) => GgufValueType::F64,
        }
    }

    /// Any integer value as `i128` (no integer type loses information), else `None`.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// An `f32` or `f64` value as `f64`, else `None`.
    pub fn as_float(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => None,
        }
    }

    /// A string value, else `None`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// A bool value, else `None`.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// An array value, else `None`.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A homogeneous metadata array, stored with its element type.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum GgufArray {
    /// `u8` elements.
    U8(Vec<u8>),
    /// `i8` elements.
    I8(Vec<i8>),
    /// `u16` elements.
    U16(Vec<u16>),
    /// `i16` elements.
    I16(Vec<i16>),
    /// `u32` elements.
    U32(Vec<u32>),
    /// `i32` elements.
    I32(Vec<i32>),
    /// `f32` elements.
    F32(Vec<f32>),
    /// `bool` elements.
    Bool(Vec<bool>),
    /// String elements.
    String(Vec<String>),
    /// Nested arrays.
    Array(Vec<GgufArray>),
    /// `u64` elements.
    U64(Vec<u64>),
    /// `i64` elements.
    I64(Vec<i64>),
    /// `f64` elements.
    F64(Vec<f64>),
}

impl GgufArray {
    /// The element type.
    pub fn elem_type(&self) -> GgufValueType {
        match self {
            Self::U8(_) => GgufValueType::U8,
            Self::I8(_) => GgufValueType::I8,
            Self::U16(_) => GgufValueType::U16,
            Self::I16(_) => GgufValueType::I16,
            Self::U32(_) => GgufValueType::U32,
            Self::I32(_) => GgufValueType::I32,
            Self::F32(_) => GgufValueType::F32,
            Self::Bool(_) => GgufValueType::Bool,
            Self::String(_) => GgufValueType::String,
            Self::Array(_) => GgufValueType::Array,
            Self::U64(_) => GgufValueType::U64,
            Self::I64(_) => GgufValueType::I64,
            Self::F64(_) => GgufValueType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::Array(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A GGML tensor element type (the `ggml_type` enum), with its block geometry.
///
/// Every type llama.cpp currently writes is known, so a file's byte ranges can be checked even
/// for types this crate cannot dequantize; [`GgmlType::can_dequantize`] says which it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[expect(
    non_camel_case_types,
    reason = "the names follow GGML's own (Q4_1, IQ2_XXS, ...)"
)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// 4-bit, 32 per block, scale only.
    Q4_0,
    /// 4-bit, 32 per block, scale and minimum.
    Q4_1,
    /// 5-bit, 32 per block, scale only.
    Q5_0,
    /// 5-bit, 32 per block, scale and minimum.
    Q5_1,
    /// 8-bit, 32 per block, scale only.
    Q8_0,
    /// 8-bit, 32 per block, scale and sum.
    Q8_1,
    /// K-quant, 2-bit.
    Q2_K,
    /// K-quant, 3-bit.
    Q3_K,
    /// K-quant, 4-bit.
    Q4_K,
    /// K-quant, 5-bit.
    Q5_K,
    /// K-quant, 6-bit.
    Q6_K,
    /// K-quant, 8-bit.
    Q8_K,
    /// I-quant.
    IQ2_XXS,
    /// I-quant.
    IQ2_XS,
    /// I-quant.
    IQ3_XXS,
    /// I-quant.
    IQ1_S,
    /// I-quant.
    IQ4_NL,
    /// I-quant.
    IQ3_S,
    /// I-quant.
    IQ2_S,
    /// I-quant.
    IQ4_XS,
    /// 8-bit integer.
    I8,
    /// 16-bit integer.
    I16,
    /// 32-bit integer.
    I32,
    /// 64-bit integer.
    I64,
    /// 64-bit float.
    F64,
    /// I-quant.
    IQ1_M,
    /// bfloat16.
    BF16,
    /// Ternary quant.
    TQ1_0,
    /// Ternary quant.
    TQ2_0,
    /// Microscaling FP4.
    MXFP4,
}

impl GgmlType {
    /// The type for a `ggml_type` id, or `None` if unknown (or a removed id).
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            16 => Self::IQ2_XXS,
            17 => Self::IQ2_XS,
            18 => Self::IQ3_XXS,
            19 => Self::IQ1_S,
            20 => Self::IQ4_NL,
            21 => Self::IQ3_S,
            22 => Self::IQ2_S,
            23 => Self::IQ4_XS,
            24 => Self::I8,
            25 => Self::I16,
            26 => Self::I32,
            27 => Self::I64,
            28 => Self::F64,
            29 => Self::IQ1_M,
            30 => Self::BF16,
            34 => Self::TQ1_0,
            35 => Self::TQ2_0,
            39 => Self::MXFP4,
            _ => return None,
        })
    }

    /// The `ggml_type` id written in files.
    pub fn id(self) -> u32 {
        self.traits().0
    }

    /// GGML's name for the type, such as `"Q4_1"`.
    pub fn name(self) -> &'static str {
        self.traits().1
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> usize {
        self.traits().2
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.traits().3
    }

    /// Whether [`dequantize`] supports this type.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            Self::F32
                | Self::F16
                | Self::BF16
                | Self::F64
                | Self::Q4_0
                | Self::Q4_1
                | Self::Q5_0
                | Self::Q5_1
                | Self::Q8_0
        )
    }

    /// (id, name, elements per block, bytes per block), as in ggml's type traits.
    fn traits(self) -> (u32, &'static str, usize, usize) {
        match self {
            Self::F32 => (0, "F32", 1, 4),
            Self::F16 => (1, "F16", 1, 2),
            Self::Q4_0 => (2, "Q4_0", 32, 18),
            Self::Q4_1 => (3, "Q4_1", 32, 20),
            Self::Q5_0 => (6, "Q5_0", 32, 22),
            Self::Q5_1 => (7, "Q5_1", 32, 24),
            Self::Q8_0 => (8, "Q8_0", 32, 34),
            Self::Q8_1 => (9, "Q8_1", 32, 36),
            Self::Q2_K => (10, "Q2_K", 256, 84),
            Self::Q3_K => (11, "Q3_K", 256, 110),
            Self::Q4_K => (12, "Q4_K", 256, 144),
            Self::Q5_K => (13, "Q5_K", 256, 176),
            Self::Q6_K => (14, "Q6_K", 256, 210),
            Self::Q8_K => (15, "Q8_K", 256, 292),
            Self::IQ2_XXS => (16, "IQ2_XXS", 256, 66),
            Self::IQ2_XS => (17, "IQ2_XS", 256, 74),
            Self::IQ3_XXS => (18, "IQ3_XXS", 256, 98),
            Self::IQ1_S => (19, "IQ1_S", 256, 50),
            Self::IQ4_NL => (20, "IQ4_NL", 32, 18),
            Self::IQ3_S => (21, "IQ3_S", 256, 110),
            Self::IQ2_S => (22, "IQ2_S", 256, 82),
            Self::IQ4_XS => (23, "IQ4_XS", 256, 136),
            Self::I8 => (24, "I8", 1, 1),
            Self::I16 => (25, "I16", 1, 2),
            Self::I32 => (26, "I32", 1, 4),
            Self::I64 => (27, "I64", 1, 8),
            Self::F64 => (28, "F64", 1, 8),
            Self::IQ1_M => (29, "IQ1_M", 256, 56),
            Self::BF16 => (30, "BF16", 1, 2),
            Self::TQ1_0 => (34, "TQ1_0", 256, 54),
            Self::TQ2_0 => (35, "TQ2_0", 256, 66),
            Self::MXFP4 => (39, "MXFP4", 32, 17),
        }
    }
}

/// Where a tensor lives in a GGUF file and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    name: String,
    /// Dimensions as stored: fastest first.
    dims: Vec<u64>,
    ggml_type: GgmlType,
    /// Offset relative to the start of the data section.
    offset: u64,
    n_elements: usize,
    n_bytes: usize,
}

impl TensorInfo {
    /// The tensor's name, such as `"blk.0.attn_q.weight"`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Dimensions in GGUF order: **fastest first** (`[in, out]` for a linear weight).
    pub fn gguf_dims(&self) -> &[u64] {
        &self.dims
    }

    /// Row-major shape, slowest first (`[out, in]` for a linear weight).
    pub fn shape(&self) -> Vec<usize> {
        // Each dimension was checked to fit in `usize` (the element count does).
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Element type.
    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// Offset of the first byte, relative to the start of the data section.
    pub fn relative_offset(&self) -> u64 {
        self.offset
    }

    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.n_elements
    }

    /// Number of bytes the tensor occupies in the file.
    pub fn n_bytes(&self) -> usize {
        self.n_bytes
    }
}

/// A parsed GGUF file held in memory.
///
/// # Example
///
/// ```no_run
/// # fn main() -> kv_model::Result<()> {
/// use kv_model::gguf::GgufFile;
/// let file = GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
/// let layers = file.get_u32("llama.block_count")?;
/// let embedding = file.tensor_f32("token_embd.weight")?; // shape [vocab, hidden]
/// # let _ = (layers, embedding);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct GgufFile {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: usize,
    bytes: Vec<u8>,
}

impl GgufFile {
    /// Reads and parses the file at `path`.
    ///
    /// # Errors
    ///
    /// [`ModelError::Io`] if the file cannot be read, otherwise as [`GgufFile::from_bytes`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_bytes(bytes)
    }

    /// Parses a GGUF file held in memory.
    ///
    /// # Errors
    ///
    /// - [`ModelError::Malformed`] for bad magic, truncated data, counts larger than the file
    ///   could hold, invalid UTF-8 in strings, duplicate keys or tensor names, bad alignment,
    ///   unaligned tensor offsets, too many dimensions or partial quantization blocks;
    /// - [`ModelError::UnsupportedVersion`] for versions other than 2 and 3;
    /// - [`ModelError::UnsupportedTensorType`] for an unknown `ggml_type` id;
    /// - [`ModelError::TensorOutOfBounds`] when a tensor's bytes lie past the end of the file.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        let header = parse_header(&bytes)?;
        Ok(Self {
            version: header.version,
            metadata: header.metadata,
            metadata_index: header.metadata_index,
            tensors: header.tensors,
            tensor_index: header.tensor_index,
            alignment: header.alignment,
            data_offset: header.data_offset,
            bytes,
        })
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data-section alignment in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// The value stored under `key`, if any.
    pub fn metadata(&self, key: &str) -> Option<&GgufValue> {
        self.metadata_index
            .get(key)
            .and_then(|&i| self.metadata.get(i))
            .map(|(_, v)| v)
    }

    /// All metadata entries, in file order.
    pub fn metadata_entries(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn require(&self, key: &str) -> Result<&GgufValue> {
        self.metadata(key)
            .ok_or_else(|| ModelError::MissingMetadata(key.to_owned()))
    }

    fn type_error(key: &str, expected: &'static str, found: &GgufValue) -> ModelError {
        ModelError::MetadataType {
            key: key.to_owned(),
            expected,
            found: found.value_type().name(),
        }
    }

    /// An integer value under `key` that fits in `u32` (any integer type is accepted).
    ///
    /// # Errors
    ///
    /// [`ModelError::MissingMetadata`] or [`ModelError::MetadataType`].
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.require(key)?;
        v.as_integer()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| Self::type_error(key, "an integer in u32 range", v))
    }

    /// An integer value under `key` that fits in `u64` (any integer type is accepted).
    ///
    /// # Errors
    ///
    /// [`ModelError::MissingMetadata`] or [`ModelError::MetadataType`].
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_integer()
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(|| Self::type_error(key, "an integer in u64 range", v))
    }

    /// A float value under `key` (`f32`, or `f64` rounded to `f32`).
    ///
    /// # Errors
    ///
    /// [`ModelError::MissingMetadata`] or [`ModelError::MetadataType`].
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        match *v {
            GgufValue::F32(x) => Ok(x),
            GgufValue::F64(x) => Ok(x as f32),
            _ => Err(Self::type_error(key, "f32", v)),
        }
    }

    /// A bool value under `key`.
    ///
    /// # Errors
    ///
    /// [`ModelError::MissingMetadata`] or [`ModelError::MetadataType`].
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| Self::type_error(key, "bool", v))
    }

    /// A string value under `key`.
    ///
    /// # Errors
    ///
    /// [`ModelError::MissingMetadata`] or [`ModelError::MetadataType`].
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| Self::type_error(key, "string", v))
    }

    /// An array of strings under `key`.
    ///
    /// # Errors
    ///
    /// [`ModelError::MissingMetadata`] or [`ModelError::MetadataType`].
    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        let v = self.require(key)?;
        match v {
            GgufValue::Array(GgufArray::String(items)) => Ok(items),
            _ => Err(Self::type_error(key, "array of strings", v)),
        }
    }

    /// `general.architecture` (for example `"llama"`).
    ///
    /// # Errors
    ///
    /// As [`GgufFile::get_str`].
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// Tensor names, in file order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// All tensor infos, in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info for tensor `name`, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
    }

    /// The raw stored bytes of tensor `name`.
    ///
    /// # Errors
    ///
    /// [`ModelError::MissingTensor`].
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        self.bytes_of(info)
    }

    fn bytes_of(&self, info: &TensorInfo) -> Result<&[u8]> {
        // Bounds were checked at parse time; `get` keeps this panic-free regardless.
        let start = usize::try_from(info.offset)
            .ok()
            .and_then(|o| o.checked_add(self.data_offset));
        start
            .and_then(|s| Some(s..s.checked_add(info.n_bytes)?))
            .and_then(|r| self.bytes.get(r))
            .ok_or_else(|| ModelError::TensorOutOfBounds {
                name: info.name.clone(),
                start: info.offset,
                end: info.offset.saturating_add(info.n_bytes as u64),
                len: self.bytes.len() as u64,
            })
    }

    /// Tensor `name` converted to `f32`, with a row-major (slowest first) shape.
    ///
    /// # Errors
    ///
    /// [`ModelError::MissingTensor`], or [`ModelError::UnsupportedTensorType`] when the type
    /// cannot be dequantized (see [`GgmlType::can_dequantize`]).
    pub fn tensor_f32(&self, name: &str) -> Result<HostTensor> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        let bytes = self.bytes_of(info)?;
        let data = dequantize(info.ggml_type, bytes).map_err(|e| match e {
            ModelError::UnsupportedTensorType { dtype, .. } => ModelError::UnsupportedTensorType {
                name: name.to_owned(),
                dtype,
            },
            other => other,
        })?;
        HostTensor::new(info.shape(), data)
    }
}

/// Converts the stored bytes of a tensor of type `dtype` to `f32`.
///
/// The element count is `bytes.len() / dtype.type_size() * dtype.block_size()`.
///
/// # Errors
///
/// [`ModelError::UnsupportedTensorType`] when `dtype` cannot be dequantized, and
/// [`ModelError::Malformed`] when `bytes` is not a whole number of blocks.
pub fn dequantize(dtype: GgmlType, bytes: &[u8]) -> Result<Vec<f32>> {
    if !dtype.can_dequantize() {
        return Err(ModelError::UnsupportedTensorType {
            name: String::new(),
            dtype: dtype.name().to_owned(),
        });
    }
    if !bytes.len().is_multiple_of(dtype.type_size()) {
        return Err(ModelError::Malformed {
            what: "tensor data is not a whole number of blocks",
            offset: bytes.len() as u64,
        });
    }
    let n = bytes.len() / dtype.type_size() * dtype.block_size();
    let mut out = Vec::with_capacity(n);
    match dtype {
        GgmlType::F32 => {
            let (words, _) = bytes.as_chunks::<4>();
            out.extend(words.iter().map(|w| f32::from_le_bytes(*w)));
        }
        GgmlType::F64 => {
            let (words, _) = bytes.as_chunks::<8>();
            out.extend(words.iter().map(|w| f64::from_le_bytes(*w) as f32));
        }
        GgmlType::F16 => {
            let (words, _) = bytes.as_chunks::<2>();
            out.extend(words.iter().map(|w| f16_le(*w)));
        }
        GgmlType::BF16 => {
            let (words, _) = bytes.as_chunks::<2>();
            out.extend(words.iter().map(|w| bf16_le(*w)));
        }
        GgmlType::Q4_0 => bytes
            .as_chunks::<18>()
            .0
            .iter()
            .for_each(|b| deq_q4_0(b, &mut out)),
        GgmlType::Q4_1 => bytes
            .as_chunks::<20>()
            .0
            .iter()
            .for_each(|b| deq_q4_1(b, &mut out)),
        GgmlType::Q5_0 => bytes
            .as_chunks::<22>()
            .0
            .iter()
            .for_each(|b| deq_q5_0(b, &mut out)),
        GgmlType::Q5_1 => bytes
            .as_chunks::<24>()
            .0
            .iter()
            .for_each(|b| deq_q5_1(b, &mut out)),
        GgmlType::Q8_0 => bytes
            .as_chunks::<34>()
            .0
            .iter()
            .for_each(|b| deq_q8_0(b, &mut out)),
        _ => {
            return Err(ModelError::UnsupportedTensorType {
                name: String::new(),
                dtype: dtype.name().to_owned(),
            });
        }
    }
    Ok(out)
}

fn f16_le(b: [u8; 2]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes(b)).to_f32()
}

fn bf16_le(b: [u8; 2]) -> f32 {
    half::bf16::from_bits(u16::from_le_bytes(b)).to_f32()
}

/// Q4_0: `d: f16, qs: [u8; 16]`; `w[j] = (lo(qs[j]) - 8) d`, `w[j + 16] = (hi(qs[j]) - 8) d`.
fn deq_q4_0(b: &[u8; 18], out: &mut Vec<f32>) {
    let d = f16_le([b[0], b[1]]);
    let qs = &b[2..18];
    let mut w = [0f32; 32];
    for (j, &q) in qs.iter().enumerate() {
        w[j] = (i32::from(q & 0x0F) - 8) as f32 * d;
        w[j + 16] = (i32::from(q >> 4) - 8) as f32 * d;
    }
    out.extend_from_slice(&w);
}

/// Q4_1: `d: f16, m: f16, qs: [u8; 16]`; `w[j] = lo(qs[j]) d + m`, `w[j + 16] = hi(qs[j]) d + m`.
fn deq_q4_1(b: &[u8; 20], out: &mut Vec<f32>) {
    let d = f16_le([b[0], b[1]]);
    let m = f16_le([b[2], b[3]]);
    let qs = &b[4..20];
    let mut w = [0f32; 32];
    for (j, &q) in qs.iter().enumerate() {
        w[j] = f32::from(q & 0x0F) * d + m;
        w[j + 16] = f32::from(q >> 4) * d + m;
    }
    out.extend_from_slice(&w);
}

/// The 5-bit value `j` (0..32) of a Q5 block: low nibble from `qs`, fifth bit from `qh`.
fn q5_value(qh: u32, qs: &[u8], j: usize) -> u8 {
    let (nibble, bit) = if j < 16 {
        (qs[j] & 0x0F, (qh >> j) & 1)
    } else {
        (qs[j - 16] >> 4, (qh >> j) & 1)
    };
    nibble | ((bit as u8) << 4)
}

/// Q5_0: `d: f16, qh: u32, qs: [u8; 16]`; `w = (q5 - 16) d`.
fn deq_q5_0(b: &[u8; 22], out: &mut Vec<f32>) {
    let d = f16_le([b[0], b[1]]);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    out.extend((0..32).map(|j| (i32::from(q5_value(qh, qs, j)) - 16) as f32 * d));
}

/// Q5_1: `d: f16, m: f16, qh: u32, qs: [u8; 16]`; `w = q5 d + m`.
fn deq_q5_1(b: &[u8; 24], out: &mut Vec<f32>) {
    let d = f16_le([b[0], b[1]]);
    let m = f16_le([b[2], b[3]]);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    out.extend((0..32).map(|j| f32::from(q5_value(qh, qs, j)) * d + m));
}

/// Q8_0: `d: f16, qs: [i8; 32]`; `w = q d`.
fn deq_q8_0(b: &[u8; 34], out: &mut Vec<f32>) {
    let d = f16_le([b[0], b[1]]);
    out.extend(b[2..34].iter().map(|&q| f32::from(q as i8) * d));
}

/// Un-permutes a llama.cpp `attn_q` / `attn_k` weight to Hugging Face's rotate-half RoPE layout.
///
/// llama.cpp's converter permutes the rows of Q and K so that RoPE can rotate adjacent pairs
/// (`x[2i], x[2i+1]`). Hugging Face rotates halves (`x[i], x[i + d/2]`). This views the
/// `[out, in]` matrix as `[n_head, out / n_head / 2, 2, in]`, swaps axes 1 and 2 and views the
/// result as `[out, in]` again. Use `n_head` = query heads for `attn_q`, KV heads for `attn_k`.
///
/// # Errors
///
/// [`ModelError::ShapeMismatch`] unless `weight` is rank 2 with `out` divisible by
/// `2 * n_head` (and `n_head > 0`).
pub fn llama_permute_to_rotate_half(weight: &HostTensor, n_head: usize) -> Result<HostTensor> {
    let (out_dim, in_dim) = match weight.shape.as_slice() {
        &[o, i] if n_head > 0 && o % (2 * n_head) == 0 => (o, i),
        _ => {
            return Err(ModelError::ShapeMismatch {
                what: format!("llama_permute_to_rotate_half (rows must divide by 2 * {n_head})"),
                expected: vec![2 * n_head, 0],
                found: weight.shape.clone(),
            });
        }
    };
    let head_rows = out_dim / n_head;
    let half = head_rows / 2;
    let mut data = vec![0f32; weight.data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * head_rows + i * 2 + j) * in_dim;
                let dst = (h * head_rows + j * half + i) * in_dim;
                let (Some(from), Some(to)) = (
                    weight.data.get(src..src + in_dim),
                    data.get_mut(dst..dst + in_dim),
                ) else {
                    return Err(ModelError::ShapeMismatch {
                        what: "llama_permute_to_rotate_half data length".to_owned(),
                        expected: vec![out_dim, in_dim],
                        found: vec![weight.data.len()],
                    });
                };
                to.copy_from_slice(from);
            }
        }
    }
    HostTensor::new(weight.shape.clone(), data)
}

/// What the header parse produces (everything but the bytes themselves).
struct Header {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: usize,
}

fn parse_header(bytes: &[u8]) -> Result<Header> {
    let mut r = Reader { buf: bytes, pos: 0 };
    if r.take(4, "magic")? != GGUF_MAGIC {
        return Err(ModelError::Malformed {
            what: "magic (expected \"GGUF\")",
            offset: 0,
        });
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(ModelError::UnsupportedVersion { version });
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata count")?;
    // Smallest key-value: empty key (8) + type (4) + one-byte value.
    let n_kv = r.bounded_count(n_kv, 13, "metadata count")?;

    let mut metadata = Vec::with_capacity(n_kv);
    let mut metadata_index = HashMap::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key_at = r.pos as u64;
        let key = r.string("metadata key")?;
        let tag = r.u32("metadata value type")?;
        let ty = GgufValueType::from_tag(tag).ok_or(ModelError::Malformed {
            what: "unknown metadata value type",
            offset: r.pos as u64 - 4,
        })?;
        let value = r.value(ty, 0)?;
        if metadata_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(ModelError::Malformed {
                what: "duplicate metadata key",
                offset: key_at,
            });
        }
        metadata.push((key, value));
    }

    let alignment = match metadata_index
        .get("general.alignment")
        .and_then(|&i| metadata.get(i))
    {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_integer().and_then(|a| u64::try_from(a).ok()) {
            Some(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => a,
            _ => {
                return Err(ModelError::Malformed {
                    what: "general.alignment (must be a power of two)",
                    offset: 0,
                });
            }
        },
    };

    // Smallest tensor info: empty name (8) + n_dims (4) + type (4) + offset (8).
    let n_tensors = r.bounded_count(n_tensors, 24, "tensor count")?;
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut tensor_index = HashMap::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let info_at = r.pos as u64;
        let info = r.tensor_info(alignment)?;
        if tensor_index
            .insert(info.name.clone(), tensors.len())
            .is_some()
        {
            return Err(ModelError::Malformed {
                what: "duplicate tensor name",
                offset: info_at,
            });
        }
        tensors.push(info);
    }

    let end_of_infos = r.pos as u64;
    let data_offset = end_of_infos
        .checked_next_multiple_of(alignment)
        .and_then(|d| usize::try_from(d).ok())
        .ok_or(ModelError::Malformed {
            what: "data section offset",
            offset: end_of_infos,
        })?;
    let file_len = bytes.len();
    // A file without tensor data may omit the final padding.
    let data_offset = if data_offset > file_len && tensors.iter().all(|t| t.n_bytes == 0) {
        file_len
    } else {
        data_offset
    };
    let data_len = file_len
        .checked_sub(data_offset)
        .ok_or(ModelError::Malformed {
            what: "data section starts past the end of the file",
            offset: end_of_infos,
        })?;
    for t in &tensors {
        let end = t.offset.checked_add(t.n_bytes as u64);
        if end.is_none_or(|e| e > data_len as u64) {
            let abs = |x: u64| x.saturating_add(data_offset as u64);
            return Err(ModelError::TensorOutOfBounds {
                name: t.name.clone(),
                start: abs(t.offset),
                end: abs(end.unwrap_or(u64::MAX)),
                len: file_len as u64,
            });
        }
    }

    Ok(Header {
        version,
        metadata,
        metadata_index,
        tensors,
        tensor_index,
        alignment,
        data_offset,
    })
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn malformed(&self, what: &'static str) -> ModelError {
        ModelError::Malformed {
            what,
            offset: self.pos as u64,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or_else(|| self.malformed(what))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| self.malformed(what))?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        s.try_into().map_err(|_| self.malformed(what))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Checks that `count` items of at least `min_len` bytes each fit in the remaining bytes.
    fn bounded_count(&self, count: u64, min_len: usize, what: &'static str) -> Result<usize> {
        usize::try_from(count)
            .ok()
            .filter(|&c| {
                c.checked_mul(min_len)
                    .is_some_and(|b| b <= self.remaining())
            })
            .ok_or_else(|| self.malformed(what))
    }

    fn string(&mut self, what: &'static str) -> Result<String> {
        let len = self.u64(what)?;
        let len = self.bounded_count(len, 1, what)?;
        let at = self.pos;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| ModelError::Malformed {
            what: "string is not valid UTF-8",
            offset: at as u64,
        })
    }

    fn bool(&mut self) -> Result<bool> {
        match self.u8("bool")? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ModelError::Malformed {
                what: "bool value is neither 0 nor 1",
                offset: self.pos as u64 - 1,
            }),
        }
    }

    fn value(&mut self, ty: GgufValueType, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(self.u8("u8 value")?),
            GgufValueType::I8 => GgufValue::I8(i8::from_le_bytes(self.array("i8 value")?)),
            GgufValueType::U16 => GgufValue::U16(self.u16("u16 value")?),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array("i16 value")?)),
            GgufValueType::U32 => GgufValue::U32(self.u32("u32 value")?),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array("i32 value")?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array("f32 value")?)),
            GgufValueType::Bool => GgufValue::Bool(self.bool()?),
            GgufValueType::String => GgufValue::String(self.string("string value")?),
            GgufValueType::Array => GgufValue::Array(self.array_value(depth)?),
            GgufValueType::U64 => GgufValue::U64(self.u64("u64 value")?),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array("i64 value")?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array("f64 value")?)),
        })
    }

    fn array_value(&mut self, depth: usize) -> Result<GgufArray> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.malformed("metadata arrays nested too deeply"));
        }
        let tag = self.u32("array element type")?;
        let ty = GgufValueType::from_tag(tag)
            .ok_or_else(|| self.malformed("unknown array element type"))?;
        let count = self.u64("array length")?;
        let n = self.bounded_count(count, ty.min_encoded_len(), "array length")?;
        macro_rules! read_n {
            ($variant:ident, $read:expr) => {{
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push($read);
                }
                GgufArray::$variant(v)
            }};
        }
        Ok(match ty {
            GgufValueType::U8 => read_n!(U8, self.u8("u8 element")?),
            GgufValueType::I8 => read_n!(I8, i8::from_le_bytes(self.array("i8 element")?)),
            GgufValueType::U16 => read_n!(U16, self.u16("u16 element")?),
            GgufValueType::I16 => read_n!(I16, i16::from_le_bytes(self.array("i16 element")?)),
            GgufValueType::U32 => read_n!(U32, self.u32("u32 element")?),
            GgufValueType::I32 => read_n!(I32, i32::from_le_bytes(self.array("i32 element")?)),
            GgufValueType::F32 => read_n!(F32, f32::from_le_bytes(self.array("f32 element")?)),
            GgufValueType::Bool => read_n!(Bool, self.bool()?),
            GgufValueType::String => read_n!(String, self.string("string element")?),
            GgufValueType::Array => read_n!(Array, self.array_value(depth + 1)?),
            GgufValueType::U64 => read_n!(U64, self.u64("u64 element")?),
            GgufValueType::I64 => read_n!(I64, i64::from_le_bytes(self.array("i64 element")?)),
            GgufValueType::F64 => read_n!(F64, f64::from_le_bytes(self.array("f64 element")?)),
        })
    }

    fn tensor_info(&mut self, alignment: u64) -> Result<TensorInfo> {
        let name = self.string("tensor name")?;
        let n_dims_at = self.pos as u64;
        let n_dims = self.u32("tensor n_dims")?;
        if n_dims as usize > MAX_DIMS {
            return Err(ModelError::Malformed {
                what: "tensor has more than 4 dimensions",
                offset: n_dims_at,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64("tensor dimension")?);
        }
        let type_id = self.u32("tensor type")?;
        let ggml_type =
            GgmlType::from_id(type_id).ok_or_else(|| ModelError::UnsupportedTensorType {
                name: name.clone(),
                dtype: format!("unknown ggml type id {type_id}"),
            })?;
        let offset_at = self.pos as u64;
        let offset = self.u64("tensor offset")?;
        if !offset.is_multiple_of(alignment) {
            return Err(ModelError::Malformed {
                what: "tensor offset is not a multiple of the alignment",
                offset: offset_at,
            });
        }
        let shape: Option<Vec<usize>> = dims.iter().map(|&d| usize::try_from(d).ok()).collect();
        let n_elements = shape
            .as_deref()
            .and_then(checked_numel)
            .ok_or(ModelError::Malformed {
                what: "tensor element count overflows",
                offset: n_dims_at,
            })?;
        let row = shape
            .as_deref()
            .and_then(|s| s.first().copied())
            .unwrap_or(1);
        if !row.is_multiple_of(ggml_type.block_size()) {
            return Err(ModelError::Malformed {
                what: "tensor row is not a whole number of quantization blocks",
                offset: n_dims_at,
            });
        }
        let n_bytes = (n_elements / ggml_type.block_size())
            .checked_mul(ggml_type.type_size())
            .ok_or(ModelError::Malformed {
                what: "tensor byte size overflows",
                offset: n_dims_at,
            })?;
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_elements,
            n_bytes,
        })
    }
}
