//! Slot bookkeeping shared by the caches of this crate: every sequence holds the same number
//! of slots (padding included, as in the dense cache), each with its original position.

use burn::prelude::*;
use burn::tensor::FloatDType;
use kv_core::{
    HeldBuffer, KvBlock, KvShape, KvView, Lengths, MemoryReport, PAD, StorageDtype, StorageRole,
    check_block, check_positions,
};

/// Positions and logical counts of the slots a cache holds.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    /// Per sequence, the position of every slot (PAD for padding).
    positions: Vec<Vec<u32>>,
    /// Non-padding tokens appended per sequence.
    logical: Vec<usize>,
    len: usize,
}

impl Slots {
    pub(crate) fn new(batch: usize) -> Self {
        Slots {
            positions: vec![Vec::new(); batch],
            logical: vec![0; batch],
            len: 0,
        }
    }

    /// Slots held per sequence.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Validates a block against the shape and the positions held; returns the non-padding
    /// token count per sequence.
    pub(crate) fn check(
        &self,
        shape: &KvShape,
        block: &KvBlock,
        op: &'static str,
    ) -> kv_core::Result<Vec<usize>> {
        check_block(shape, block, op)?;
        let last: Vec<Option<u32>> = self
            .positions
            .iter()
            .map(|p| p.iter().rev().copied().find(|&x| x != PAD))
            .collect();
        check_positions(block.positions(), shape.batch(), &last, op)
    }

    /// Records the positions of a checked block of `n` slots per sequence.
    pub(crate) fn push(&mut self, positions: &[u32], n: usize, counts: &[usize]) {
        for (b, p) in self.positions.iter_mut().enumerate() {
            p.extend_from_slice(&positions[b * n..(b + 1) * n]);
            self.logical[b] += counts[b];
        }
        self.len += n;
    }

    /// Positions of slots `range` of every sequence, `batch * range.len()`, row-major.
    pub(crate) fn flat(&self, range: core::ops::Range<usize>) -> Vec<u32> {
        self.positions
            .iter()
            .flat_map(|p| p[range.clone()].iter().copied())
            .collect()
    }

    /// Positions of every slot per sequence.
    pub(crate) fn per_sequence(&self) -> &[Vec<u32>] {
        &self.positions
    }

    pub(crate) fn logical(&self) -> &[usize] {
        &self.logical
    }

    pub(crate) fn logical_tokens(&self) -> usize {
        self.logical.iter().sum()
    }

    /// The dense key+value element count of the appended tokens.
    pub(crate) fn logical_elements(&self, shape: &KvShape) -> usize {
        2 * self.logical_tokens() * shape.kv_heads() * shape.head_dim()
    }

    pub(crate) fn metadata_bytes(&self) -> usize {
        self.positions.len() * self.len * core::mem::size_of::<u32>()
    }

    pub(crate) fn held(&self, out: &mut Vec<HeldBuffer>) {
        for p in &self.positions {
            out.push(HeldBuffer::host(StorageRole::Metadata, p));
        }
    }

    pub(crate) fn reset(&mut self) {
        for p in &mut self.positions {
            *p = Vec::new();
        }
        self.logical.iter_mut().for_each(|l| *l = 0);
        self.len = 0;
    }
}

/// The Burn dtype of a storage dtype.
pub(crate) fn float_dtype(d: StorageDtype) -> FloatDType {
    match d {
        StorageDtype::F32 => FloatDType::F32,
        StorageDtype::F16 => FloatDType::F16,
    }
}

/// Appends `new` along the token axis (2) of an optional buffer.
pub(crate) fn cat_tokens(buf: Option<Tensor<4>>, new: Tensor<4>) -> Tensor<4> {
    match buf {
        Some(b) => Tensor::cat(vec![b, new], 2),
        None => new,
    }
}

/// Bytes of an optional tensor.
pub(crate) fn bytes<const D: usize>(t: Option<&Tensor<D>>) -> usize {
    t.map_or(0, |t| t.shape().num_elements() * t.dtype().size())
}

/// Pushes a held tensor buffer, if any.
pub(crate) fn held_tensor<const D: usize>(
    out: &mut Vec<HeldBuffer>,
    role: StorageRole,
    t: Option<&Tensor<D>>,
) {
    if let Some(t) = t {
        out.push(HeldBuffer::tensor(role, t));
    }
}

/// What a latent cache (Eigen Attention, Palu, LoRC, MatryoshkaKV, CSKV) holds: key and
/// value tensors of every slot (latents, per-head latents, full-precision windows) and the
/// projection bases, which are counted as metadata.
#[derive(Debug, Clone)]
pub(crate) struct LatentParts<'a> {
    pub(crate) slots: &'a Slots,
    pub(crate) keys: Vec<&'a Tensor<4>>,
    pub(crate) values: Vec<&'a Tensor<4>>,
    pub(crate) bases: Vec<&'a Tensor<3>>,
    /// Further buffers held (quantized latents: codes, scales, zero points), by role.
    pub(crate) extra: Vec<HeldBuffer>,
}

impl LatentParts<'_> {
    /// Slots held per stream and tokens given per sequence.
    pub(crate) fn lengths(&self, shape: &KvShape) -> Lengths {
        Lengths {
            held: vec![self.slots.len(); shape.streams()],
            logical: self.slots.logical().to_vec(),
        }
    }

    /// The bytes held: latents as keys and values, positions and bases as metadata.
    pub(crate) fn memory(&self, shape: &KvShape) -> MemoryReport {
        let sum4 = |ts: &[&Tensor<4>]| ts.iter().map(|t| bytes(Some(*t))).sum::<usize>();
        let extra = |role: StorageRole| {
            self.extra
                .iter()
                .filter(|b| b.role == role)
                .map(|b| b.bytes)
                .sum::<usize>()
        };
        MemoryReport {
            key_bytes: sum4(&self.keys) + extra(StorageRole::Keys),
            value_bytes: sum4(&self.values) + extra(StorageRole::Values),
            metadata_bytes: self.slots.metadata_bytes()
                + self.bases.iter().map(|b| bytes(Some(*b))).sum::<usize>()
                + extra(StorageRole::Metadata),
            logical_elements: self.slots.logical_elements(shape),
            logical_tokens: self.slots.logical_tokens(),
            held_token_slots: shape.streams() * self.slots.len(),
        }
    }

    /// Every buffer held, in the order [`LatentParts::memory`] counts them.
    pub(crate) fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = Vec::new();
        for k in &self.keys {
            out.push(HeldBuffer::tensor(StorageRole::Keys, *k));
        }
        for v in &self.values {
            out.push(HeldBuffer::tensor(StorageRole::Values, *v));
        }
        for b in &self.bases {
            out.push(HeldBuffer::tensor(StorageRole::Metadata, *b));
        }
        out.extend(self.extra.iter().cloned());
        self.slots.held(&mut out);
        out
    }
}

/// The view of a cache that holds nothing: zero-length keys and values `[b, h, 0, d]`.
pub(crate) fn empty_view([b, h, d]: [usize; 3], positions: Vec<u32>, device: &Device) -> KvView {
    let z = Tensor::zeros([b, h, 0, d], device);
    KvView {
        keys: z.clone(),
        values: z,
        positions,
    }
}
