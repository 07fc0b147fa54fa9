//! Errors of the evaluation harness.

use std::path::PathBuf;

/// What can go wrong while evaluating.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// A command-line or config value is wrong.
    #[error("{0}")]
    Usage(String),
    /// A method name that no crate registers.
    #[error("unknown method `{name}`; known methods: {known}")]
    UnknownMethod {
        /// The name given.
        name: String,
        /// The registered names, comma-separated.
        known: String,
    },
    /// A method parameter that the method does not take or cannot parse.
    #[error("method `{method}`: bad parameter `{param}`: {reason}")]
    BadParam {
        /// The method.
        method: String,
        /// The parameter.
        param: String,
        /// Why it is rejected.
        reason: String,
    },
    /// The text is too short for the protocol, or `--start-at` was not found.
    #[error("text: {0}")]
    Text(String),
    /// A file could not be read or written.
    #[error("cannot access `{path}`: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The model failed to load or run.
    #[error(transparent)]
    Model(#[from] kv_model::ModelError),
    /// A cache rejected data or a config.
    #[error(transparent)]
    Cache(#[from] kv_core::KvError),
    /// A method or pipeline is unknown, badly configured or cannot be stacked.
    #[error(transparent)]
    Compose(#[from] kv_compose::ComposeError),
}

/// `Result` with [`EvalError`].
pub type Result<T, E = EvalError> = std::result::Result<T, E>;
