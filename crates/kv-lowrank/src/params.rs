//! Parsers of `key=value` parameters shared by the `from_params` of the caches of this crate.

use std::path::PathBuf;

use kv_core::{KvError, StorageDtype};

/// The builder setters every calibrated config shares (`num_layers: Option<usize>` and
/// `dtype: StorageDtype` fields): `with_num_layers` and `with_dtype`.
macro_rules! calibrated_setters {
    () => {
        /// Checks the artefact against a model of `num_layers` layers at init.
        pub fn with_num_layers(mut self, num_layers: usize) -> Self {
            self.num_layers = Some(num_layers);
            self
        }
        /// Sets the storage dtype.
        pub fn with_dtype(mut self, dtype: kv_core::StorageDtype) -> Self {
            self.dtype = dtype;
            self
        }
    };
}
pub(crate) use calibrated_setters;

pub(crate) fn bad(field: &'static str, value: &str, want: &str) -> KvError {
    KvError::InvalidConfig {
        field,
        reason: format!("`{value}` is not {want}"),
    }
}

pub(crate) fn int(field: &'static str, v: &str) -> kv_core::Result<usize> {
    v.parse()
        .map_err(|_| bad(field, v, "a non-negative integer"))
}

pub(crate) fn float(field: &'static str, v: &str) -> kv_core::Result<f64> {
    v.parse().map_err(|_| bad(field, v, "a number"))
}

pub(crate) fn dtype(field: &'static str, v: &str) -> kv_core::Result<StorageDtype> {
    match v {
        "f16" | "fp16" => Ok(StorageDtype::F16),
        "f32" | "fp32" => Ok(StorageDtype::F32),
        _ => Err(bad(field, v, "f16 or f32")),
    }
}

pub(crate) fn path(v: &str) -> PathBuf {
    PathBuf::from(v)
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

/// The error for a rank outside `1..=head_dim`.
pub(crate) fn check_rank(field: &'static str, rank: usize, head_dim: usize) -> kv_core::Result<()> {
    if rank == 0 || rank > head_dim {
        return Err(KvError::InvalidConfig {
            field,
            reason: format!("rank {rank} must be between 1 and head_dim {head_dim}"),
        });
    }
    Ok(())
}

/// The error for a rank of a joint (all-KV-head) basis outside `1..=kv_heads · head_dim`.
pub(crate) fn check_joint_rank(
    field: &'static str,
    rank: usize,
    dim: usize,
) -> kv_core::Result<()> {
    if rank == 0 || rank > dim {
        return Err(KvError::InvalidConfig {
            field,
            reason: format!("rank {rank} must be between 1 and kv_heads x head_dim {dim}"),
        });
    }
    Ok(())
}
