//! The error type of the quantizers and the bit packing.

use kv_core::KvError;

/// Errors of the packing and quantization API: bad configurations and bad data.
///
/// Caches convert them to [`KvError`] (see the `From` impl) because the
/// [`KvCache`](kv_core::KvCache) trait speaks `KvError`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum QuantError {
    /// A code width that has no packed layout (supported: 1, 2, 3, 4 and 8 bits).
    #[error("unsupported bit width {bits}: supported widths are 1, 2, 3, 4 and 8 bits{extra}")]
    UnsupportedBits {
        /// The width asked for.
        bits: u32,
        /// Why a supported width is still refused here (empty when it is not supported at all).
        extra: &'static str,
    },
    /// A group size that does not divide the axis it groups.
    #[error("group size {group} does not divide the {axis} axis of length {len}")]
    GroupDoesNotDivide {
        /// The group size.
        group: usize,
        /// Which axis (`tokens`, `channels`, `residual window`).
        axis: &'static str,
        /// The axis length.
        len: usize,
    },
    /// A configuration value out of range.
    #[error("invalid config `{field}`: {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// An empty tensor where data is required.
    #[error("{what} is empty")]
    Empty {
        /// Which input.
        what: &'static str,
    },
    /// NaN or infinity in data to quantize.
    #[error("{what} holds non-finite values (NaN or infinity)")]
    NonFinite {
        /// Which input.
        what: &'static str,
    },
    /// Values too large for fp16 scales and zero points (they would overflow to infinity).
    #[error("{what}: largest magnitude {max} exceeds {limit}, the limit for fp16 scales and zeros")]
    OutOfRange {
        /// Which input.
        what: &'static str,
        /// The largest magnitude found.
        max: f32,
        /// The largest magnitude accepted.
        limit: f32,
    },
    /// Two quantized tensors that cannot be joined, or a code buffer of the wrong shape.
    #[error("incompatible quantized tensors: {reason}")]
    Incompatible {
        /// What differs.
        reason: String,
    },
}

impl From<QuantError> for KvError {
    fn from(e: QuantError) -> KvError {
        let field = match &e {
            QuantError::UnsupportedBits { .. } => "bits",
            QuantError::GroupDoesNotDivide { .. } => "group",
            QuantError::InvalidConfig { field, .. } => field,
            QuantError::Empty { .. }
            | QuantError::NonFinite { .. }
            | QuantError::OutOfRange { .. } => "data",
            QuantError::Incompatible { .. } => "quantized tensors",
        };
        KvError::InvalidConfig {
            field,
            reason: e.to_string(),
        }
    }
}

/// `Result` with [`QuantError`] as the default error.
pub type Result<T, E = QuantError> = core::result::Result<T, E>;
