//! The crate's error type: everything that can go wrong reading model files, configs and text.

use std::path::PathBuf;

/// Errors from reading model files (GGUF, safetensors, `config.json`) and from the tokenizer.
///
/// Malformed input is always reported through this type; the readers never panic on bad bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A KV cache rejected the model's data (shape, capacity, positions).
    #[error(transparent)]
    Cache(#[from] kv_core::KvError),

    /// A file could not be read.
    #[error("cannot read `{}`: {source}", path.display())]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying IO error.
        #[source]
        source: std::io::Error,
    },

    /// The bytes do not follow the file format.
    #[error("malformed file: {what} at byte offset {offset}")]
    Malformed {
        /// Which part of the format is wrong (for example `"tensor info count"`).
        what: &'static str,
        /// Byte offset in the file where the problem was found.
        offset: u64,
    },

    /// The GGUF version is not 2 or 3.
    #[error("unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion {
        /// The version found in the header.
        version: u32,
    },

    /// A tensor's element type is unknown, or known but cannot be converted to `f32`.
    #[error("tensor `{name}` has type {dtype}, which is not supported here")]
    UnsupportedTensorType {
        /// Tensor name.
        name: String,
        /// The type's name (a GGML or safetensors type name, or a raw id).
        dtype: String,
    },

    /// A tensor's byte range lies (partly) outside the file.
    #[error(
        "tensor `{name}` occupies bytes {start}..{end}, past the end of the data ({len} bytes)"
    )]
    TensorOutOfBounds {
        /// Tensor name.
        name: String,
        /// First byte (absolute file offset).
        start: u64,
        /// One past the last byte (absolute file offset).
        end: u64,
        /// Length of the file.
        len: u64,
    },

    /// A required metadata key is absent.
    #[error("missing metadata key `{0}`")]
    MissingMetadata(String),

    /// A metadata key holds a value of the wrong type (or out of the target type's range).
    #[error("metadata key `{key}` holds {found}, expected {expected}")]
    MetadataType {
        /// The key.
        key: String,
        /// What the caller asked for.
        expected: &'static str,
        /// What the file holds.
        found: &'static str,
    },

    /// A required tensor is absent.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),

    /// A tensor's shape does not fit what the caller needs.
    #[error("shape mismatch for {what}: expected {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// What was being checked.
        what: String,
        /// The expected shape (a `0` may stand for "any multiple" where documented).
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },

    /// A model configuration value is invalid.
    #[error("invalid config: `{field}` {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },

    /// The tokenizer described in the file is not supported or is inconsistent.
    #[error("tokenizer: {what}: `{detail}`")]
    Tokenizer {
        /// What is wrong (for example `"unsupported pre-tokenizer"`).
        what: &'static str,
        /// The offending value.
        detail: String,
    },

    /// A token id is not in the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    UnknownTokenId {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },

    /// Decoded bytes are not valid UTF-8 (for example a sequence cut inside a character).
    #[error("decoded bytes are not valid UTF-8: {0}")]
    InvalidUtf8(#[from] std::string::FromUtf8Error),

    /// A safetensors file could not be parsed.
    #[error("safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),

    /// A JSON document (for example `config.json`) could not be parsed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// `Result` with [`ModelError`] as the default error type.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    /// Builds [`ModelError::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
