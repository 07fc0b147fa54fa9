//! ChunkAttention (Ye et al., arXiv 2402.15220): prefix-aware KV storage shared across the
//! sequences of a batch, and two-phase attention over it.
//!
//! The storage, the two attention phases and why this is not a
//! [`KvCache`](crate::KvCache) are described on [`ChunkAttention`].

use std::collections::{BTreeMap, BTreeSet};

use burn::prelude::*;
use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

use crate::attention::{KeyPositions, merge_attention, reference_attention_lse};
use crate::block::{Query, check_finite};
use crate::cache::check_query;
use crate::dense::StorageDtype;
use crate::memory::{HeldBuffer, MemoryReport, StorageRole, sum_held};
use crate::shape::KvShape;
use crate::{KvError, Result};

/// The chunk size of microsoft/chunk-attention (`chunk_size=64` in its Llama integration).
pub const DEFAULT_CHUNK_SIZE: usize = 64;

fn default_chunk_size() -> usize {
    DEFAULT_CHUNK_SIZE
}

/// Configuration of a [`ChunkAttention`] store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkAttentionConfig {
    /// Attention layers whose K/V every chunk holds.
    pub layers: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Query heads per layer (a multiple of `kv_heads`).
    pub q_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Tokens per chunk; only full chunks are shared.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: usize,
    /// Element type of the stored keys and values (attention computes in fp32).
    #[serde(default)]
    pub dtype: StorageDtype,
}

impl ChunkAttentionConfig {
    /// A store of fp32 chunks of [`DEFAULT_CHUNK_SIZE`] tokens.
    pub fn new(layers: usize, kv_heads: usize, q_heads: usize, head_dim: usize) -> Self {
        ChunkAttentionConfig {
            layers,
            kv_heads,
            q_heads,
            head_dim,
            chunk_size: DEFAULT_CHUNK_SIZE,
            dtype: StorageDtype::F32,
        }
    }
    /// Sets the chunk size in tokens.
    pub fn with_chunk_size(mut self, chunk_size: usize) -> Self {
        self.chunk_size = chunk_size;
        self
    }
    /// Sets the storage dtype.
    pub fn with_dtype(mut self, dtype: StorageDtype) -> Self {
        self.dtype = dtype;
        self
    }
    /// Builds an empty store.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for zero layers, heads, head_dim or chunk size, or query
    /// heads that are not a multiple of the KV heads.
    pub fn init(&self, device: &Device) -> Result<ChunkAttention> {
        let shape = KvShape::new(1, self.kv_heads, self.q_heads, self.head_dim)?;
        for (field, v) in [("layers", self.layers), ("chunk_size", self.chunk_size)] {
            if v == 0 {
                return Err(KvError::InvalidConfig {
                    field,
                    reason: "must be at least 1".into(),
                });
            }
        }
        Ok(ChunkAttention {
            config: self.clone(),
            shape,
            device: device.clone(),
            chunks: Vec::new(),
            free: Vec::new(),
            roots: Vec::new(),
            seqs: BTreeMap::new(),
            next_id: 0,
        })
    }
}

/// A handle to one sequence in a [`ChunkAttention`] store; ids are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(u64);

impl SeqId {
    /// The number behind the handle (for printing).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl core::fmt::Display for SeqId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "seq#{}", self.0)
    }
}

/// One chunk as a sequence sees it (see [`ChunkAttention::seq_chunks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// The chunk's slot in the store (slots of freed chunks are reused).
    pub slot: usize,
    /// Position of the chunk's first token in every sequence that contains it.
    pub start: usize,
    /// Tokens held (at most the chunk size).
    pub len: usize,
    /// Sequences that go through the chunk (its reference count).
    pub refs: usize,
}

#[derive(Debug, Clone)]
struct Chunk {
    parent: Option<usize>,
    children: Vec<usize>,
    start: usize,
    tokens: Vec<u32>,
    refs: usize,
    /// Per layer, `[1, kv_heads, chunk_size, head_dim]` in the storage dtype.
    keys: Vec<Tensor<4>>,
    values: Vec<Tensor<4>>,
}

#[derive(Debug, Clone)]
struct Sequence {
    /// Chunk slots from the root to the tail.
    path: Vec<usize>,
    len: usize,
}

/// Prefix-shared chunked K/V for a batch of sequences, with two-phase attention.
///
/// # Storage
/// Keys and values are cut into fixed-size chunks (default [`DEFAULT_CHUNK_SIZE`] = 64
/// tokens, as in microsoft/chunk-attention) organised as a prefix tree keyed by token ids.
/// A chunk holds the K/V of its tokens for *every* layer, so the tree (token ids, reference
/// counts, parent and children) exists once per batch while the tensors are per layer.
/// [`ChunkAttention::add_seq`] walks the tree from the root and reuses every *full* chunk
/// whose token ids equal the next `chunk_size` tokens of the new sequence exactly; the rest
/// of the sequence goes into new chunks. Only full chunks are shared: a partially filled
/// chunk is the private tail of one sequence and is where that sequence's
/// [`append`](ChunkAttention::append)s go (the reference reaches the same state by never
/// sharing a leaf and giving every sequence an empty tail chunk once its last chunk fills;
/// here a sequence's path is explicit, so no empty tail is needed). Every chunk counts the
/// sequences that go through it; [`remove_seq`](ChunkAttention::remove_seq) decrements the
/// counts along the sequence's path and drops the tensors of chunks that reach zero, so
/// memory is released, and [`memory`](ChunkAttention::memory) counts each shared chunk once.
/// Chunks are allocated at full size (`chunk_size` slots; the slack of a partial tail is
/// reported as held memory), like the reference allocator's fixed-size pages.
///
/// # Attention
/// [`attend`](ChunkAttention::attend) computes attention for a batch of sequences in the
/// paper's two phases:
/// 1. **chunk-first**: chunks that several of the requested sequences share are attended once
///    with the queries of all those sequences stacked as rows of one matrix product, giving a
///    partial output and the log-sum-exp of each query row. Chunks with the same set of
///    sequences (a run of shared chunks, such as a whole system prompt) go through one call:
///    they see the same queries, so this is the same computation batched.
/// 2. **sequence-first**: every sequence attends over its private chunks and merges the result
///    with its partials from phase 1 by the online-softmax merge
///    ([`merge_attention`](crate::merge_attention)).
///
/// The result equals [`reference_attention`](crate::reference_attention) over each
/// sequence's own keys and values (the tests check 1e-5). Queries are causal by position: a
/// sequence's token `i` sits at position `i`, and a query at position `p` sees the tokens at
/// positions `<= p`.
///
/// # Why this is not a [`KvCache`](crate::KvCache)
/// `KvCache::append` receives keys and values without the token ids they came from, for a
/// fixed batch of rows; prefix sharing needs the ids (sharing is decided by exact token
/// match, never by comparing floats) and a batch of sequences that come and go. So the store
/// has its own API keyed by [`SeqId`]s, and a model drives it through a thin per-layer
/// adapter that stages each layer's new K/V during a forward pass and commits them together
/// with the token ids afterwards (`kv-eval`'s `prefix` command does this on the real model).
#[derive(Debug, Clone)]
pub struct ChunkAttention {
    config: ChunkAttentionConfig,
    /// Heads and head_dim (batch 1) for query checks.
    shape: KvShape,
    device: Device,
    chunks: Vec<Option<Chunk>>,
    free: Vec<usize>,
    roots: Vec<usize>,
    seqs: BTreeMap<SeqId, Sequence>,
    next_id: u64,
}

impl ChunkAttention {
    /// The configuration.
    pub fn config(&self) -> &ChunkAttentionConfig {
        &self.config
    }
    /// The device holding the chunks.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// Live sequences, in the order they were added.
    pub fn sequences(&self) -> Vec<SeqId> {
        self.seqs.keys().copied().collect()
    }
    /// Whether `id` is a live sequence.
    pub fn contains(&self, id: SeqId) -> bool {
        self.seqs.contains_key(&id)
    }
    /// Tokens held by sequence `id`.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] (field `seq`) if `id` is not in the store.
    pub fn seq_len(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id, "ChunkAttention::seq_len")?.len)
    }
    /// The token ids of sequence `id`.
    ///
    /// # Errors
    /// As [`seq_len`](Self::seq_len).
    pub fn seq_tokens(&self, id: SeqId) -> Result<Vec<u32>> {
        let s = self.seq(id, "ChunkAttention::seq_tokens")?;
        Ok(s.path
            .iter()
            .flat_map(|&c| self.chunk(c).tokens.iter().copied())
            .collect())
    }
    /// The chunks of sequence `id` from the root to its tail.
    ///
    /// # Errors
    /// As [`seq_len`](Self::seq_len).
    pub fn seq_chunks(&self, id: SeqId) -> Result<Vec<ChunkInfo>> {
        let s = self.seq(id, "ChunkAttention::seq_chunks")?;
        Ok(s.path.iter().map(|&c| self.info(c)).collect())
    }
    /// Chunks held.
    pub fn chunk_count(&self) -> usize {
        self.chunks.iter().flatten().count()
    }
    /// Chunks that two or more sequences go through.
    pub fn shared_chunk_count(&self) -> usize {
        self.chunks.iter().flatten().filter(|c| c.refs > 1).count()
    }

    /// Adds a sequence with the keys and values of all its tokens, reusing every full chunk
    /// of the tree whose token ids match the sequence's next `chunk_size` tokens exactly.
    /// The K/V of reused tokens are not stored again (the store keeps the ones it holds).
    ///
    /// # Shapes
    /// `kv`: one `(keys, values)` pair per layer, each `[1, kv_heads, tokens.len(),
    /// head_dim]`, keys post-RoPE at positions `0..tokens.len()`.
    ///
    /// # Errors
    /// [`KvError::Empty`] for no tokens; [`KvError::ShapeMismatch`] for the wrong number of
    /// layers or a K/V shape that disagrees with the store or with `tokens.len()`;
    /// [`KvError::NonFinite`]. The store is unchanged on error.
    pub fn add_seq(&mut self, tokens: &[u32], kv: &[(Tensor<4>, Tensor<4>)]) -> Result<SeqId> {
        const OP: &str = "ChunkAttention::add_seq";
        if tokens.is_empty() {
            return Err(KvError::Empty {
                op: OP,
                what: "tokens",
            });
        }
        self.check_kv(kv, 1, tokens.len(), OP)?;
        let c = self.config.chunk_size;
        // Walk the tree over full chunks that match exactly.
        let mut path = Vec::new();
        let mut start = 0;
        while start + c <= tokens.len() {
            let want = &tokens[start..start + c];
            let siblings = match path.last() {
                None => &self.roots,
                Some(&p) => &self.chunk(p).children,
            };
            let found = siblings.iter().copied().find(|&ch| {
                let ch = self.chunk(ch);
                ch.tokens.len() == c && ch.tokens == want
            });
            match found {
                Some(ch) => {
                    path.push(ch);
                    start += c;
                }
                None => break,
            }
        }
        for &ch in &path {
            self.chunk_mut(ch).refs += 1;
        }
        // The rest goes into new private chunks.
        while start < tokens.len() {
            let end = (start + c).min(tokens.len());
            let parent = path.last().copied();
            let slot = self.new_chunk(parent, start);
            for (layer, (k, v)) in kv.iter().enumerate() {
                self.write(slot, layer, 0, k, v, 0, start..end);
            }
            self.chunk_mut(slot)
                .tokens
                .extend_from_slice(&tokens[start..end]);
            path.push(slot);
            start = end;
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(
            id,
            Sequence {
                path,
                len: tokens.len(),
            },
        );
        Ok(id)
    }

    /// Appends `n` tokens to each of `seqs` (decode: `n = 1`), filling each sequence's
    /// private tail chunk and starting new chunks as they fill.
    ///
    /// # Shapes
    /// `tokens`: `seqs.len() * n` ids, row-major; `kv`: one pair per layer, each
    /// `[seqs.len(), kv_heads, n, head_dim]` (row `b` belongs to `seqs[b]`, at positions
    /// `seq_len(seqs[b])..+n`).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] (field `seq`) for an unknown or repeated sequence;
    /// [`KvError::Empty`], [`KvError::ShapeMismatch`] and [`KvError::NonFinite`] as
    /// [`add_seq`](Self::add_seq). The store is unchanged on error.
    pub fn append(
        &mut self,
        seqs: &[SeqId],
        tokens: &[u32],
        kv: &[(Tensor<4>, Tensor<4>)],
    ) -> Result<()> {
        const OP: &str = "ChunkAttention::append";
        self.check_seqs(seqs, OP)?;
        if tokens.is_empty() {
            return Err(KvError::Empty {
                op: OP,
                what: "tokens",
            });
        }
        if !tokens.len().is_multiple_of(seqs.len()) {
            return Err(KvError::ShapeMismatch {
                op: OP,
                what: "tokens (a multiple of the number of sequences)",
                expected: seqs.len() * tokens.len().div_ceil(seqs.len()),
                got: tokens.len(),
            });
        }
        let n = tokens.len() / seqs.len();
        self.check_kv(kv, seqs.len(), n, OP)?;
        let c = self.config.chunk_size;
        for (b, id) in seqs.iter().enumerate() {
            let mut done = 0;
            while done < n {
                let seq = &self.seqs[id];
                let pos = seq.len;
                // The tail takes tokens while it is private and not full.
                let tail = seq.path.last().copied().filter(|&t| {
                    let t = self.chunk(t);
                    t.tokens.len() < c && t.refs == 1
                });
                let slot = match tail {
                    Some(t) => t,
                    None => {
                        let parent = seq.path.last().copied();
                        let s = self.new_chunk(parent, pos);
                        self.seqs
                            .get_mut(id)
                            .expect("invariant: checked above")
                            .path
                            .push(s);
                        s
                    }
                };
                let offset = self.chunk(slot).tokens.len();
                let take = (c - offset).min(n - done);
                for (layer, (k, v)) in kv.iter().enumerate() {
                    self.write(slot, layer, offset, k, v, b, done..done + take);
                }
                self.chunk_mut(slot)
                    .tokens
                    .extend_from_slice(&tokens[b * n + done..b * n + done + take]);
                self.seqs.get_mut(id).expect("invariant: checked above").len += take;
                done += take;
            }
        }
        Ok(())
    }

    /// Removes a sequence: the reference count of every chunk on its path drops by one, and
    /// chunks that no sequence goes through any more are freed (their tensors dropped).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] (field `seq`) if `id` is not in the store; the store is
    /// unchanged.
    pub fn remove_seq(&mut self, id: SeqId) -> Result<()> {
        self.seq(id, "ChunkAttention::remove_seq")?;
        let seq = self.seqs.remove(&id).expect("invariant: checked above");
        // From the tail up: a chunk's count is never above its parent's, so children are
        // freed before their parents.
        for &slot in seq.path.iter().rev() {
            let ch = self.chunk_mut(slot);
            ch.refs -= 1;
            if ch.refs == 0 {
                let parent = ch.parent;
                let siblings = match parent {
                    Some(p) => &mut self.chunk_mut(p).children,
                    None => &mut self.roots,
                };
                siblings.retain(|&s| s != slot);
                self.chunks[slot] = None;
                self.free.push(slot);
            }
        }
        Ok(())
    }

    /// Removes every sequence and frees every chunk.
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.free.clear();
        self.roots.clear();
        self.seqs.clear();
    }

    /// Two-phase attention of `query` for the sequences `seqs` at `layer` (see
    /// [`ChunkAttention`]): row `b` of the query belongs to `seqs[b]`. Returns the output,
    /// `[seqs.len(), q_heads, q_len, head_dim]`, and the log-sum-exp of each query row,
    /// `[seqs.len(), kv_heads, group, q_len]` (as
    /// [`reference_attention_lse`](crate::reference_attention_lse), so that the result merges
    /// with attention over keys held elsewhere).
    ///
    /// # Errors
    /// [`KvError::IndexOutOfRange`] for a layer out of range; [`KvError::InvalidConfig`]
    /// (field `seq`) for an unknown or repeated sequence; [`KvError::ShapeMismatch`] if the
    /// query's batch, heads or head_dim disagree; [`KvError::NonFinite`].
    pub fn attend(
        &self,
        layer: usize,
        seqs: &[SeqId],
        query: &Query,
    ) -> Result<(Tensor<4>, Tensor<4>)> {
        const OP: &str = "ChunkAttention::attend";
        self.check_layer(layer, OP)?;
        self.check_seqs(seqs, OP)?;
        let shape = self.shape.with_batch(seqs.len())?;
        check_query(&shape, query, OP)?;
        let [_, qh, n, d] = query.tensor().dims();
        let (kvh, g) = (shape.kv_heads(), shape.group());

        // Which requested sequences go through each chunk; chunks with the same set form one
        // group (their sets are equal, so they lie on one path: sort by position).
        let mut members: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (b, id) in seqs.iter().enumerate() {
            for &slot in &self.seqs[id].path {
                members.entry(slot).or_default().push(b);
            }
        }
        let mut groups: BTreeMap<Vec<usize>, Vec<usize>> = BTreeMap::new();
        for (slot, m) in members {
            groups.entry(m).or_default().push(slot);
        }
        let mut groups: Vec<(Vec<usize>, Vec<usize>)> = groups.into_iter().collect();
        for (_, slots) in &mut groups {
            slots.sort_by_key(|&s| self.chunk(s).start);
        }

        // Phase 1, chunk-first: groups shared by several sequences, their queries stacked.
        let q = query.tensor();
        let mut partials: Vec<Vec<(usize, Tensor<4>, Tensor<4>)>> = vec![Vec::new(); seqs.len()];
        for (seq_set, slots) in groups.iter().filter(|(m, _)| m.len() > 1) {
            let (o, l) = self.group_attention(layer, slots, seq_set, q, query.positions());
            let m = seq_set.len();
            let o = o.reshape([qh, m, n, d]);
            let l = l.reshape([kvh, g, m, n]);
            let start = self.chunk(slots[0]).start;
            for (j, &b) in seq_set.iter().enumerate() {
                let oj = o.clone().slice([0..qh, j..j + 1, 0..n, 0..d]);
                let lj = l.clone().slice([0..kvh, 0..g, j..j + 1, 0..n]);
                partials[b].push((start, oj.reshape([1, qh, n, d]), lj.reshape([1, kvh, g, n])));
            }
        }
        // Phase 2, sequence-first: each sequence's private chunks, then the online-softmax
        // merge of all its partials (in position order).
        let mut outs = Vec::with_capacity(seqs.len());
        let mut lses = Vec::with_capacity(seqs.len());
        for (b, mut parts) in partials.into_iter().enumerate() {
            if let Some((_, slots)) = groups.iter().find(|(m, _)| m.as_slice() == [b]) {
                let (o, l) = self.group_attention(layer, slots, &[b], q, query.positions());
                parts.push((self.chunk(slots[0]).start, o, l));
            }
            parts.sort_by_key(|p| p.0);
            let mut it = parts.into_iter();
            let (_, mut o, mut l) = it.next().expect("invariant: every sequence holds a chunk");
            for (_, o2, l2) in it {
                (o, l) = merge_attention(o, l, o2, l2);
            }
            outs.push(o);
            lses.push(l);
        }
        Ok((Tensor::cat(outs, 0), Tensor::cat(lses, 0)))
    }

    /// Keys and values of sequence `id` at `layer` in fp32, `[1, kv_heads, len, head_dim]`
    /// (a dense copy, for tests and debugging).
    ///
    /// # Errors
    /// [`KvError::IndexOutOfRange`] for a layer out of range; [`KvError::InvalidConfig`]
    /// (field `seq`) for an unknown sequence.
    pub fn seq_kv(&self, layer: usize, id: SeqId) -> Result<(Tensor<4>, Tensor<4>)> {
        const OP: &str = "ChunkAttention::seq_kv";
        self.check_layer(layer, OP)?;
        let path = &self.seq(id, OP)?.path;
        let (k, v, _) = self.gather(layer, path);
        Ok((k, v))
    }

    /// Bytes held over all layers, each chunk counted once however many sequences share it.
    /// The dense equivalents count every token of every sequence (a shared token once per
    /// sequence), so the compression ratio shows the saving from sharing.
    pub fn memory(&self) -> MemoryReport {
        (0..self.config.layers).map(|l| self.layer_memory(l)).sum()
    }

    /// [`memory`](Self::memory) of one layer: that layer's key and value chunks; the tree's
    /// host metadata (token ids, paths) is attributed to layer 0, so that the layers sum to
    /// the whole. Like a per-layer cache, every layer reports the tokens of all sequences as
    /// `logical_tokens` (so the sum over layers counts them once per layer, as
    /// [`LayerCaches::memory`](crate::LayerCaches::memory) does). An out-of-range layer holds
    /// nothing.
    pub fn layer_memory(&self, layer: usize) -> MemoryReport {
        let (key_bytes, value_bytes, metadata_bytes) = sum_held(&self.layer_held_buffers(layer));
        let s = self.shape;
        let logical_tokens: usize = self.seqs.values().map(|q| q.len).sum();
        let held: usize = self.chunks.iter().flatten().map(|c| c.tokens.len()).sum();
        let in_range = layer < self.config.layers;
        MemoryReport {
            key_bytes,
            value_bytes,
            metadata_bytes,
            logical_elements: if in_range {
                2 * logical_tokens * s.kv_heads() * s.head_dim()
            } else {
                0
            },
            logical_tokens: if in_range { logical_tokens } else { 0 },
            held_token_slots: if in_range { held * s.kv_heads() } else { 0 },
        }
    }

    /// Key and value bytes the same sequences would hold without sharing (every sequence
    /// with its own chunks): each chunk's bytes times its reference count, over all layers.
    pub fn unshared_kv_bytes(&self) -> usize {
        self.chunks
            .iter()
            .flatten()
            .map(|c| {
                c.refs
                    * c.keys
                        .iter()
                        .chain(&c.values)
                        .map(|t| HeldBuffer::tensor(StorageRole::Keys, t).bytes)
                        .sum::<usize>()
            })
            .sum()
    }

    /// Every buffer held over all layers, measured from the buffers.
    pub fn held_buffers(&self) -> Vec<HeldBuffer> {
        (0..self.config.layers)
            .flat_map(|l| self.layer_held_buffers(l))
            .collect()
    }

    /// The buffers of one layer (metadata with layer 0), as [`layer_memory`](Self::layer_memory).
    pub fn layer_held_buffers(&self, layer: usize) -> Vec<HeldBuffer> {
        let mut out = Vec::new();
        if layer >= self.config.layers {
            return out;
        }
        for c in self.chunks.iter().flatten() {
            out.push(HeldBuffer::tensor(StorageRole::Keys, &c.keys[layer]));
            out.push(HeldBuffer::tensor(StorageRole::Values, &c.values[layer]));
            if layer == 0 {
                out.push(HeldBuffer::host(StorageRole::Metadata, &c.tokens));
            }
        }
        if layer == 0 {
            for s in self.seqs.values() {
                out.push(HeldBuffer::host(StorageRole::Metadata, &s.path));
            }
        }
        out
    }

    // ---- internals ----

    fn chunk(&self, slot: usize) -> &Chunk {
        self.chunks[slot]
            .as_ref()
            .expect("invariant: paths and children name live chunks")
    }

    fn chunk_mut(&mut self, slot: usize) -> &mut Chunk {
        self.chunks[slot]
            .as_mut()
            .expect("invariant: paths and children name live chunks")
    }

    fn info(&self, slot: usize) -> ChunkInfo {
        let c = self.chunk(slot);
        ChunkInfo {
            slot,
            start: c.start,
            len: c.tokens.len(),
            refs: c.refs,
        }
    }

    fn seq(&self, id: SeqId, op: &'static str) -> Result<&Sequence> {
        self.seqs.get(&id).ok_or_else(|| KvError::InvalidConfig {
            field: "seq",
            reason: format!("{op}: {id} is not in the store (never added, or removed)"),
        })
    }

    fn check_seqs(&self, seqs: &[SeqId], op: &'static str) -> Result<()> {
        if seqs.is_empty() {
            return Err(KvError::Empty {
                op,
                what: "sequence list",
            });
        }
        let mut seen = BTreeSet::new();
        for &id in seqs {
            self.seq(id, op)?;
            if !seen.insert(id) {
                return Err(KvError::InvalidConfig {
                    field: "seq",
                    reason: format!("{op}: {id} is listed twice"),
                });
            }
        }
        Ok(())
    }

    fn check_layer(&self, layer: usize, op: &'static str) -> Result<()> {
        if layer < self.config.layers {
            Ok(())
        } else {
            Err(KvError::IndexOutOfRange {
                op,
                index: layer,
                len: self.config.layers,
            })
        }
    }

    /// Checks one `(keys, values)` pair per layer, each `[batch, kv_heads, n, head_dim]`.
    fn check_kv(
        &self,
        kv: &[(Tensor<4>, Tensor<4>)],
        batch: usize,
        n: usize,
        op: &'static str,
    ) -> Result<()> {
        let mismatch = |what, expected, got| KvError::ShapeMismatch {
            op,
            what,
            expected,
            got,
        };
        if kv.len() != self.config.layers {
            return Err(mismatch(
                "layers (one keys/values pair per layer)",
                self.config.layers,
                kv.len(),
            ));
        }
        let s = self.shape;
        let want = [batch, s.kv_heads(), n, s.head_dim()];
        let names = ["batch", "kv_heads", "seq (tokens per sequence)", "head_dim"];
        for (k, v) in kv {
            for t in [k, v] {
                for ((name, w), got) in names.iter().zip(want).zip(t.dims()) {
                    if got != w {
                        return Err(mismatch(name, w, got));
                    }
                }
            }
        }
        for (k, v) in kv {
            check_finite(k, op, "keys")?;
            check_finite(v, op, "values")?;
        }
        Ok(())
    }

    fn storage_dtype(&self) -> FloatDType {
        match self.config.dtype {
            StorageDtype::F32 => FloatDType::F32,
            StorageDtype::F16 => FloatDType::F16,
        }
    }

    /// Allocates an empty full-size chunk under `parent` for tokens starting at `start`.
    fn new_chunk(&mut self, parent: Option<usize>, start: usize) -> usize {
        let s = self.shape;
        let dims = [1, s.kv_heads(), self.config.chunk_size, s.head_dim()];
        let zeros = Tensor::<4>::zeros(dims, &self.device).cast(self.storage_dtype());
        let chunk = Chunk {
            parent,
            children: Vec::new(),
            start,
            tokens: Vec::with_capacity(self.config.chunk_size),
            refs: 1,
            keys: vec![zeros.clone(); self.config.layers],
            values: vec![zeros; self.config.layers],
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.chunks[s] = Some(chunk);
                s
            }
            None => {
                self.chunks.push(Some(chunk));
                self.chunks.len() - 1
            }
        };
        match parent {
            Some(p) => self.chunk_mut(p).children.push(slot),
            None => self.roots.push(slot),
        }
        slot
    }

    /// Writes rows `rows` of batch row `b` of `k`/`v` into chunk `slot` at `offset`.
    #[allow(
        clippy::too_many_arguments,
        reason = "a private helper of add_seq and append"
    )]
    fn write(
        &mut self,
        slot: usize,
        layer: usize,
        offset: usize,
        k: &Tensor<4>,
        v: &Tensor<4>,
        b: usize,
        rows: core::ops::Range<usize>,
    ) {
        let (kvh, d) = (self.shape.kv_heads(), self.shape.head_dim());
        let dtype = self.storage_dtype();
        let dst = [0..1, 0..kvh, offset..offset + rows.len(), 0..d];
        let src = [b..b + 1, 0..kvh, rows, 0..d];
        let ch = self.chunk_mut(slot);
        let kc = ch.keys[layer].clone();
        ch.keys[layer] = kc.slice_assign(dst.clone(), k.clone().slice(src.clone()).cast(dtype));
        let vc = ch.values[layer].clone();
        ch.values[layer] = vc.slice_assign(dst, v.clone().slice(src).cast(dtype));
    }

    /// The held rows of `slots` (on one path, in order) at `layer`, in fp32, with their
    /// positions: `[1, kv_heads, Σ len, head_dim]`.
    fn gather(&self, layer: usize, slots: &[usize]) -> (Tensor<4>, Tensor<4>, Vec<u32>) {
        let (kvh, d) = (self.shape.kv_heads(), self.shape.head_dim());
        let mut ks = Vec::with_capacity(slots.len());
        let mut vs = Vec::with_capacity(slots.len());
        let mut pos = Vec::new();
        for &s in slots {
            let c = self.chunk(s);
            let len = c.tokens.len();
            if len == 0 {
                continue;
            }
            let r = [0..1, 0..kvh, 0..len, 0..d];
            ks.push(c.keys[layer].clone().slice(r.clone()));
            vs.push(c.values[layer].clone().slice(r));
            pos.extend((c.start..c.start + len).map(|p| p as u32));
        }
        if ks.is_empty() {
            let z = Tensor::zeros([1, kvh, 0, d], &self.device);
            return (z.clone(), z, pos);
        }
        (
            Tensor::cat(ks, 2).cast(FloatDType::F32),
            Tensor::cat(vs, 2).cast(FloatDType::F32),
            pos,
        )
    }

    /// Attention of the queries of batch rows `seq_set` over the chunks `slots`, the rows
    /// stacked: returns `[1, q_heads, m * q_len, head_dim]` and `[1, kv_heads, group, m *
    /// q_len]` (row `j * q_len + i` is token `i` of `seq_set[j]`).
    fn group_attention(
        &self,
        layer: usize,
        slots: &[usize],
        seq_set: &[usize],
        q: &Tensor<4>,
        q_pos: &[u32],
    ) -> (Tensor<4>, Tensor<4>) {
        let [_, qh, n, d] = q.dims();
        let m = seq_set.len();
        let (k, v, k_pos) = self.gather(layer, slots);
        let idx: Vec<i32> = seq_set.iter().map(|&b| b as i32).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [m]), &self.device);
        let qg = q
            .clone()
            .select(0, idx)
            .swap_dims(0, 1)
            .reshape([1, qh, m * n, d]);
        let qp: Vec<u32> = seq_set
            .iter()
            .flat_map(|&b| q_pos[b * n..(b + 1) * n].iter().copied())
            .collect();
        reference_attention_lse(qg, k, v, &qp, KeyPositions::PerSequence(&k_pos), None)
    }
}
