//! Honest memory accounting: what a cache physically holds against the dense equivalent.

use core::ops::{Add, AddAssign};

use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// What a cache holds, in bytes, against the dense cache of the same tokens.
///
/// `*_bytes` fields count what is physically held: packed codes, scales, zero points, outlier
/// lists, codebooks, full-precision windows, index and position tables and capacity slack.
/// The dense equivalents count keys and values of every token the cache was *given*
/// (`logical_tokens` per sequence, over all KV heads) at 2 and 4 bytes per element.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Bytes holding key data (codes, full-precision keys, their scales).
    pub key_bytes: usize,
    /// Bytes holding value data.
    pub value_bytes: usize,
    /// Bytes of metadata: positions, offsets, per-token statistics kept by a method.
    pub metadata_bytes: usize,
    /// Key/value elements the dense cache of the same tokens would hold (keys plus values).
    pub logical_elements: usize,
    /// Tokens appended so far, summed over sequences (not over heads).
    pub logical_tokens: usize,
    /// Tokens held, summed over sequences and KV heads.
    pub held_token_slots: usize,
}

impl MemoryReport {
    /// Everything physically held.
    pub fn stored_bytes(&self) -> usize {
        self.key_bytes + self.value_bytes + self.metadata_bytes
    }
    /// The dense fp16 cache of the same tokens.
    pub fn dense_fp16_bytes(&self) -> usize {
        self.logical_elements * 2
    }
    /// The dense fp32 cache of the same tokens.
    pub fn dense_fp32_bytes(&self) -> usize {
        self.logical_elements * 4
    }
    /// Dense fp16 bytes over stored bytes (higher is smaller); `0.0` for an empty cache.
    pub fn compression_ratio(&self) -> f64 {
        match self.stored_bytes() {
            0 => 0.0,
            s => self.dense_fp16_bytes() as f64 / s as f64,
        }
    }
    /// Stored bits per logical key/value element (16 for a dense fp16 cache, 32 for fp32).
    pub fn bits_per_element(&self) -> f64 {
        match self.logical_elements {
            0 => 0.0,
            n => self.stored_bytes() as f64 * 8.0 / n as f64,
        }
    }
}

impl Add for MemoryReport {
    type Output = MemoryReport;
    fn add(self, o: MemoryReport) -> MemoryReport {
        MemoryReport {
            key_bytes: self.key_bytes + o.key_bytes,
            value_bytes: self.value_bytes + o.value_bytes,
            metadata_bytes: self.metadata_bytes + o.metadata_bytes,
            logical_elements: self.logical_elements + o.logical_elements,
            logical_tokens: self.logical_tokens + o.logical_tokens,
            held_token_slots: self.held_token_slots + o.held_token_slots,
        }
    }
}

impl AddAssign for MemoryReport {
    fn add_assign(&mut self, o: MemoryReport) {
        *self = *self + o;
    }
}

impl core::iter::Sum for MemoryReport {
    fn sum<I: Iterator<Item = MemoryReport>>(iter: I) -> Self {
        iter.fold(MemoryReport::default(), Add::add)
    }
}

/// Which part of a cache a held buffer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageRole {
    /// Key data.
    Keys,
    /// Value data.
    Values,
    /// Metadata (positions, offsets, statistics).
    Metadata,
}

/// One buffer a cache holds, measured from the buffer itself (tensor dtype and shape, or host
/// vector length), never from a formula. Contract tests compare the sum of these with
/// [`MemoryReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldBuffer {
    /// What the buffer stores.
    pub role: StorageRole,
    /// Its size in bytes.
    pub bytes: usize,
}

impl HeldBuffer {
    /// Measures a tensor: elements times the size of its dtype.
    pub fn tensor<const D: usize, K: burn::tensor::kind::Basic>(
        role: StorageRole,
        t: &Tensor<D, K>,
    ) -> Self {
        HeldBuffer {
            role,
            bytes: t.shape().num_elements() * t.dtype().size(),
        }
    }
    /// Measures a host vector by its length (not its spare capacity, which callers shrink).
    pub fn host<T>(role: StorageRole, v: &[T]) -> Self {
        HeldBuffer {
            role,
            bytes: core::mem::size_of_val(v),
        }
    }
}

/// Sums held buffers by role into `(keys, values, metadata)`.
pub fn sum_held(buffers: &[HeldBuffer]) -> (usize, usize, usize) {
    let mut out = (0, 0, 0);
    for b in buffers {
        match b.role {
            StorageRole::Keys => out.0 += b.bytes,
            StorageRole::Values => out.1 += b.bytes,
            StorageRole::Metadata => out.2 += b.bytes,
        }
    }
    out
}
