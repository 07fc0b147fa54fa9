//! Layout and shape types.
//!
//! The canonical layout of one layer's keys and values is `[batch, kv_heads, seq, head_dim]`;
//! queries are `[batch, q_heads, q_len, head_dim]` with `q_heads` a multiple of `kv_heads`
//! (grouped-query attention; `kv_heads == 1` is multi-query attention). Storage is always at
//! KV-head granularity: keys are never repeated to query heads.

use serde::{Deserialize, Serialize};

use crate::{KvError, Result};

/// The static shape of one attention layer's cache.
///
/// The fields carry the GQA invariant (`q_heads % kv_heads == 0`), so they are private behind
/// getters and only [`KvShape::new`] builds a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "KvShapeRepr", into = "KvShapeRepr")]
pub struct KvShape {
    batch: usize,
    kv_heads: usize,
    q_heads: usize,
    head_dim: usize,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KvShapeRepr {
    batch: usize,
    kv_heads: usize,
    q_heads: usize,
    head_dim: usize,
}

impl TryFrom<KvShapeRepr> for KvShape {
    type Error = KvError;
    fn try_from(r: KvShapeRepr) -> Result<Self> {
        KvShape::new(r.batch, r.kv_heads, r.q_heads, r.head_dim)
    }
}

impl From<KvShape> for KvShapeRepr {
    fn from(s: KvShape) -> Self {
        KvShapeRepr {
            batch: s.batch,
            kv_heads: s.kv_heads,
            q_heads: s.q_heads,
            head_dim: s.head_dim,
        }
    }
}

impl KvShape {
    /// Validates and builds a shape.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] if any dimension is zero or `q_heads` is not a multiple of
    /// `kv_heads`.
    pub fn new(batch: usize, kv_heads: usize, q_heads: usize, head_dim: usize) -> Result<Self> {
        for (field, v) in [
            ("batch", batch),
            ("kv_heads", kv_heads),
            ("q_heads", q_heads),
            ("head_dim", head_dim),
        ] {
            if v == 0 {
                return Err(KvError::InvalidConfig {
                    field,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if !q_heads.is_multiple_of(kv_heads) {
            return Err(KvError::InvalidConfig {
                field: "q_heads",
                reason: format!(
                    "{q_heads} query heads cannot be grouped over {kv_heads} KV heads \
                     (GQA needs q_heads to be a multiple of kv_heads)"
                ),
            });
        }
        Ok(KvShape {
            batch,
            kv_heads,
            q_heads,
            head_dim,
        })
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Key/value heads (the storage granularity).
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }
    /// Query heads.
    pub fn q_heads(&self) -> usize {
        self.q_heads
    }
    /// Channels per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Query heads per KV head (the GQA group size).
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
    /// Number of (sequence, KV head) pairs: the unit of ragged storage.
    pub fn streams(&self) -> usize {
        self.batch * self.kv_heads
    }
    /// The same shape with another batch size.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] if `batch` is zero.
    pub fn with_batch(&self, batch: usize) -> Result<Self> {
        KvShape::new(batch, self.kv_heads, self.q_heads, self.head_dim)
    }
}
