//! The error type of kv-share's artefact I/O.

use std::path::PathBuf;

/// Errors of reading and writing KVSharer artefacts; everything else is a
/// [`KvError`](kv_core::KvError).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShareError {
    /// A config or validation error.
    #[error(transparent)]
    Kv(#[from] kv_core::KvError),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not a valid artefact (corrupt, truncated, unknown fields, an invalid map).
    #[error("{}: not a valid KVSharer artefact: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// `Result` with [`ShareError`].
pub type Result<T, E = ShareError> = core::result::Result<T, E>;
