//! The error type shared by every cache in the workspace.

/// Errors from data, configuration and capacity problems.
///
/// Programmer errors (a rank mismatch in an internal helper) panic instead; everything a user
/// can trigger with bad data or a bad config lands here. A cache that returns an error has not
/// changed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// A configuration value is out of range or inconsistent.
    #[error("invalid config `{field}`: {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// A tensor dimension differs from what the cache was built for.
    #[error("{op}: {what} is {got}, expected {expected}")]
    ShapeMismatch {
        /// The operation that was called.
        op: &'static str,
        /// Which dimension.
        what: &'static str,
        /// What the cache expects.
        expected: usize,
        /// What was passed.
        got: usize,
    },
    /// A tensor with zero tokens (or zero elements) was passed where data is required.
    #[error("{op}: {what} is empty")]
    Empty {
        /// The operation that was called.
        op: &'static str,
        /// Which input.
        what: &'static str,
    },
    /// Keys, values or queries hold NaN or infinite values.
    #[error("{op}: {what} holds non-finite values (NaN or infinity)")]
    NonFinite {
        /// The operation that was called.
        op: &'static str,
        /// Which input.
        what: &'static str,
    },
    /// Appending would exceed a fixed capacity.
    #[error("{op}: capacity of {capacity} tokens exceeded ({requested} requested)")]
    CapacityExceeded {
        /// The operation that was called.
        op: &'static str,
        /// The configured capacity in tokens.
        capacity: usize,
        /// Tokens the cache would hold after the call.
        requested: usize,
    },
    /// Token positions are malformed (wrong count, or not increasing within a sequence).
    #[error("{op}: bad positions: {reason}")]
    BadPositions {
        /// The operation that was called.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A token index is out of range (for example in an eviction keep-list).
    #[error("{op}: index {index} out of range for length {len}")]
    IndexOutOfRange {
        /// The operation that was called.
        op: &'static str,
        /// The offending index.
        index: usize,
        /// The valid length.
        len: usize,
    },
}

/// `Result` with [`KvError`] as the default error.
pub type Result<T, E = KvError> = core::result::Result<T, E>;
