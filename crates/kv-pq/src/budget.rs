//! Token budgets of the selection caches and the `key=value` parameter parsers shared by the
//! `from_params` constructors.

use kv_core::{KvError, Result, StorageDtype};
use serde::{Deserialize, Serialize};

/// How many tokens a selection attends to: a fixed count or a fraction of the tokens visible
/// to the query. There is no default: the caller decides (a budget changes quality).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// A fixed number of tokens (at least 1).
    Tokens(usize),
    /// A fraction in `(0, 1]` of the tokens the query sees, rounded up.
    Fraction(f64),
}

impl Budget {
    /// Parses `"256"` (tokens) or `"0.1"` (a fraction: any value with a `.`).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming `field` when the text is neither.
    pub fn parse(field: &'static str, v: &str) -> Result<Self> {
        let b = if v.contains('.') {
            Budget::Fraction(
                v.parse()
                    .map_err(|_| bad(field, v, "a fraction such as 0.1"))?,
            )
        } else {
            Budget::Tokens(
                v.parse()
                    .map_err(|_| bad(field, v, "a token count or a fraction"))?,
            )
        };
        b.validate(field)?;
        Ok(b)
    }

    /// Checks that the budget is positive (and a fraction at most 1).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming `field`.
    pub fn validate(&self, field: &'static str) -> Result<()> {
        match *self {
            Budget::Tokens(0) => Err(KvError::InvalidConfig {
                field,
                reason: "a token budget must be at least 1".into(),
            }),
            Budget::Fraction(f) if !(f > 0.0 && f <= 1.0) => Err(KvError::InvalidConfig {
                field,
                reason: format!("fraction {f} is not in (0, 1]"),
            }),
            _ => Ok(()),
        }
    }

    /// The token count for `visible` tokens (a fraction rounds up, so it is at least 1).
    pub fn resolve(&self, visible: usize) -> usize {
        match *self {
            Budget::Tokens(n) => n,
            Budget::Fraction(f) => (f * visible as f64).ceil() as usize,
        }
    }
}

pub(crate) fn bad(field: &'static str, value: &str, want: &str) -> KvError {
    KvError::InvalidConfig {
        field,
        reason: format!("`{value}` is not {want}"),
    }
}
pub(crate) fn int(field: &'static str, v: &str) -> Result<usize> {
    v.parse()
        .map_err(|_| bad(field, v, "a non-negative integer"))
}
pub(crate) fn float(field: &'static str, v: &str) -> Result<f64> {
    v.parse().map_err(|_| bad(field, v, "a number"))
}
pub(crate) fn dtype(field: &'static str, v: &str) -> Result<StorageDtype> {
    match v {
        "f16" | "fp16" => Ok(StorageDtype::F16),
        "f32" | "fp32" => Ok(StorageDtype::F32),
        _ => Err(bad(field, v, "f16 or f32")),
    }
}
pub(crate) fn unknown(method: &str, k: &str, accepted: &[&str]) -> KvError {
    KvError::InvalidConfig {
        field: "params",
        reason: format!(
            "unknown {method} parameter `{k}`; accepted: {}",
            accepted.join(", ")
        ),
    }
}
pub(crate) fn missing(field: &'static str, what: &str) -> KvError {
    KvError::InvalidConfig {
        field,
        reason: format!("required ({what}); there is no default budget"),
    }
}
