//! Errors of pipeline configs and pipeline caches.

use thiserror::Error;

/// What can go wrong building a pipeline. Every variant names where the problem is: `at` is a
/// path into the config (`stages[1]`, `stages[0].params.bits`, `evicted`) or, for the
/// one-line form, the stage's text.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ComposeError {
    /// The text of a one-liner or a config file cannot be parsed.
    #[error("{at}: {reason}")]
    Syntax {
        /// Where.
        at: String,
        /// What is wrong.
        reason: String,
    },
    /// A config file of a version this library does not read.
    #[error("version: {found} is not supported (this library reads version {supported})")]
    Version {
        /// The version in the file.
        found: u32,
        /// The version this library reads.
        supported: u32,
    },
    /// A method name that no crate registers.
    #[error("{at}: unknown method `{name}`; known methods: {known}")]
    UnknownMethod {
        /// Where.
        at: String,
        /// The name given.
        name: String,
        /// The registered names, comma-separated.
        known: String,
    },
    /// A parameter the method does not take or cannot use.
    #[error("{at}: method `{method}`: bad parameter `{param}`: {reason}")]
    BadParam {
        /// Where.
        at: String,
        /// The method.
        method: String,
        /// The parameter.
        param: String,
        /// Why it is rejected.
        reason: String,
    },
    /// Stages that cannot work in this order or together.
    #[error("{stages}: {reason}")]
    Conflict {
        /// The conflicting stages, for example "stages\[0\] `kivi` and stages\[1\] `snapkv`".
        stages: String,
        /// Why they conflict.
        reason: String,
    },
    /// A cache rejected data or a config.
    #[error(transparent)]
    Cache(#[from] kv_core::KvError),
}

/// Result alias of this crate.
pub type Result<T, E = ComposeError> = core::result::Result<T, E>;
