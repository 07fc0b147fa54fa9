//! The full-precision dense cache: the uncompressed baseline and the shape of every oracle.

use crate::block::positions_per_head;
use burn::prelude::*;
use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

use crate::attention::{KeyPositions, StatsRequest, reference_attention};
use crate::block::{KvBlock, PAD, Query};
use crate::cache::{Attended, KvCache, KvView, Lengths, check_block, check_positions, check_query};
use crate::memory::{HeldBuffer, MemoryReport, StorageRole, sum_held};
use crate::shape::KvShape;
use crate::{KvError, Result};

/// Storage growth granularity in tokens: buffers grow to the next multiple, so that decoding
/// does not copy the cache on every step. The slack is reported as held memory.
pub const GROWTH_TOKENS: usize = 64;

/// Element type of stored keys and values. Attention always computes in fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageDtype {
    /// 32-bit floats.
    #[default]
    F32,
    /// 16-bit IEEE floats (the dtype HF and vLLM caches use).
    F16,
}

impl StorageDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StorageDtype::F32 => 4,
            StorageDtype::F16 => 2,
        }
    }
    fn float_dtype(self) -> FloatDType {
        match self {
            StorageDtype::F32 => FloatDType::F32,
            StorageDtype::F16 => FloatDType::F16,
        }
    }
}

/// Configuration of a [`DenseCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseCacheConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Element type of the stored keys and values.
    #[serde(default)]
    pub dtype: StorageDtype,
    /// A fixed capacity in tokens per sequence; appending past it is an error.
    #[serde(default)]
    pub capacity: Option<usize>,
}

impl DenseCacheConfig {
    /// A dense fp32 cache without capacity limit.
    pub fn new(shape: KvShape) -> Self {
        DenseCacheConfig {
            shape,
            dtype: StorageDtype::F32,
            capacity: None,
        }
    }
    /// Sets the storage dtype.
    pub fn with_dtype(mut self, dtype: StorageDtype) -> Self {
        self.dtype = dtype;
        self
    }
    /// Sets a fixed capacity in tokens per sequence.
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity);
        self
    }
    /// Builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a zero capacity.
    pub fn init(&self, device: &Device) -> Result<DenseCache> {
        if self.capacity == Some(0) {
            return Err(KvError::InvalidConfig {
                field: "capacity",
                reason: "must be at least 1 token".into(),
            });
        }
        Ok(DenseCache {
            config: self.clone(),
            device: device.clone(),
            keys: None,
            values: None,
            len: 0,
            positions: vec![Vec::new(); self.shape.batch()],
            logical: vec![0; self.shape.batch()],
        })
    }
}

/// Every appended token's keys and values, uncompressed, in one `[batch, kv_heads, cap,
/// head_dim]` buffer per tensor (`cap` rounded up to [`GROWTH_TOKENS`]).
///
/// All sequences hold the same number of slots; sequences of different lengths share a
/// batch through [`PAD`] positions, which are stored (this is the dense cache) and never
/// attended.
#[derive(Debug, Clone)]
pub struct DenseCache {
    config: DenseCacheConfig,
    device: Device,
    keys: Option<Tensor<4>>,
    values: Option<Tensor<4>>,
    len: usize,
    /// Per sequence, the position of every slot (PAD for padding).
    positions: Vec<Vec<u32>>,
    /// Non-padding tokens appended per sequence.
    logical: Vec<usize>,
}

impl DenseCache {
    /// Slots held per sequence (padding included).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The configuration.
    pub fn config(&self) -> &DenseCacheConfig {
        &self.config
    }
    /// Allocated slots per sequence (held slots plus growth slack).
    pub fn capacity_slots(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dims()[2])
    }
    /// Keys and values of the held slots in fp32, `[batch, kv_heads, len, head_dim]`.
    pub fn tensors(&self) -> Option<(Tensor<4>, Tensor<4>)> {
        let (k, v) = (self.keys.as_ref()?, self.values.as_ref()?);
        let s = self.config.shape;
        let r = [0..s.batch(), 0..s.kv_heads(), 0..self.len, 0..s.head_dim()];
        Some((
            k.clone().slice(r.clone()).cast(FloatDType::F32),
            v.clone().slice(r).cast(FloatDType::F32),
        ))
    }
    /// Positions per sequence, `batch * len`, row-major.
    pub fn flat_positions(&self) -> Vec<u32> {
        self.positions.concat()
    }

    fn grow_and_write(buf: Option<Tensor<4>>, new: Tensor<4>, len: usize) -> Tensor<4> {
        let [b, h, n, d] = new.dims();
        match buf {
            Some(buf) if buf.dims()[2] >= len + n => {
                buf.slice_assign([0..b, 0..h, len..len + n, 0..d], new)
            }
            buf => {
                let cap = (len + n).div_ceil(GROWTH_TOKENS) * GROWTH_TOKENS;
                let dtype = new.dtype();
                let mut parts = Vec::with_capacity(3);
                if let Some(buf) = buf {
                    parts.push(buf.slice([0..b, 0..h, 0..len, 0..d]));
                }
                parts.push(new);
                if cap > len + n {
                    let device = parts[0].device();
                    parts.push(Tensor::zeros([b, h, cap - len - n, d], (&device, dtype)));
                }
                Tensor::cat(parts, 2)
            }
        }
    }
}

impl KvCache for DenseCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> Result<()> {
        const OP: &str = "DenseCache::append";
        let shape = self.config.shape;
        check_block(&shape, &block, OP)?;
        let n = block.seq_len();
        if let Some(cap) = self.config.capacity
            && self.len + n > cap
        {
            return Err(KvError::CapacityExceeded {
                op: OP,
                capacity: cap,
                requested: self.len + n,
            });
        }
        let last: Vec<Option<u32>> = self
            .positions
            .iter()
            .map(|p| p.iter().rev().copied().find(|&x| x != PAD))
            .collect();
        let counts = check_positions(block.positions(), shape.batch(), &last, OP)?;

        let dtype = self.config.dtype.float_dtype();
        let (k, v, pos) = block.into_parts();
        self.keys = Some(Self::grow_and_write(
            self.keys.take(),
            k.cast(dtype),
            self.len,
        ));
        self.values = Some(Self::grow_and_write(
            self.values.take(),
            v.cast(dtype),
            self.len,
        ));
        for b in 0..shape.batch() {
            self.positions[b].extend_from_slice(&pos[b * n..(b + 1) * n]);
            self.logical[b] += counts[b];
        }
        self.len += n;
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> Result<Attended> {
        const OP: &str = "DenseCache::attend";
        let shape = self.config.shape;
        check_query(&shape, query, OP)?;
        let Some((k, v)) = self.tensors() else {
            return Ok(Attended {
                output: query.tensor().zeros_like(),
                stats: Default::default(),
            });
        };
        let kp = self.flat_positions();
        let (output, stats) = reference_attention(
            query.tensor().clone(),
            k,
            v,
            query.positions(),
            KeyPositions::PerSequence(&kp),
            None,
            stats,
        );
        Ok(Attended { output, stats })
    }

    fn view(&self) -> KvView {
        let s = self.config.shape;
        let (keys, values) = self.tensors().unwrap_or_else(|| {
            let z = Tensor::zeros([s.batch(), s.kv_heads(), 0, s.head_dim()], &self.device);
            (z.clone(), z)
        });
        let positions = positions_per_head(&self.positions, s.kv_heads());
        KvView {
            keys,
            values,
            positions,
        }
    }

    fn lengths(&self) -> Lengths {
        let s = self.config.shape;
        Lengths {
            held: vec![self.len; s.streams()],
            logical: self.logical.clone(),
        }
    }

    fn memory(&self) -> MemoryReport {
        let s = self.config.shape;
        let slots = self.capacity_slots();
        let tensor_bytes = s.streams() * slots * s.head_dim() * self.config.dtype.size();
        let logical_tokens: usize = self.logical.iter().sum();
        MemoryReport {
            key_bytes: tensor_bytes,
            value_bytes: tensor_bytes,
            metadata_bytes: s.batch() * self.len * core::mem::size_of::<u32>(),
            logical_elements: 2 * logical_tokens * s.kv_heads() * s.head_dim(),
            logical_tokens,
            held_token_slots: s.streams() * self.len,
        }
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = Vec::new();
        if let Some(k) = &self.keys {
            out.push(HeldBuffer::tensor(StorageRole::Keys, k));
        }
        if let Some(v) = &self.values {
            out.push(HeldBuffer::tensor(StorageRole::Values, v));
        }
        for p in &self.positions {
            out.push(HeldBuffer::host(StorageRole::Metadata, p));
        }
        out
    }

    fn reset(&mut self) {
        self.keys = None;
        self.values = None;
        self.len = 0;
        for p in &mut self.positions {
            *p = Vec::new();
        }
        self.logical.iter_mut().for_each(|l| *l = 0);
    }
}

/// Checks a cache's [`MemoryReport`] against the buffers it holds; returns a description of
/// the first disagreement. Used by the contract tests of every crate.
pub fn memory_matches_buffers(cache: &dyn KvCache) -> core::result::Result<(), String> {
    let m = cache.memory();
    let (k, v, meta) = sum_held(&cache.held_buffers());
    if (m.key_bytes, m.value_bytes, m.metadata_bytes) == (k, v, meta) {
        Ok(())
    } else {
        Err(format!(
            "memory() reports keys/values/metadata {}/{}/{} bytes but the held buffers \
             measure {k}/{v}/{meta}",
            m.key_bytes, m.value_bytes, m.metadata_bytes
        ))
    }
}
