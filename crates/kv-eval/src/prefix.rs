//! Prefix sharing on the real model: several sequences with a common prefix run through one
//! [`ChunkAttention`] store, against each sequence alone with the dense cache.
//!
//! The model drives per-layer [`KvCache`]s, which see keys and values but not token ids, so
//! the store is reached through [`PrefixBatch`]: a per-layer adapter ([`ChunkLayer`]) stages
//! the block each layer appends during a forward pass and attends over the store plus that
//! staged block (merged exactly by log-sum-exp); after the pass, [`PrefixBatch::commit`]
//! moves every layer's staged block into the store together with the token ids, which is
//! where chunks are shared or allocated. The attention inside the store is ChunkAttention's
//! two-phase kernel; the staged block is the current step's own tokens.
//!
//! The protocol ([`run`]): the prefix is prefilled once with the dense cache and its per-layer
//! K/V are added to the store once per sequence (every sequence after the first finds all
//! full prefix chunks in the tree and stores nothing new for them). Each sequence's suffix is
//! then fed through the store: its first part as one batched prefill pass, the rest one
//! token per step as in decoding. The same tokens go through the model once per sequence with
//! the dense cache; the report gives the largest logit difference, both perplexities and the
//! bytes held with and without sharing.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use burn::prelude::*;
use kv_core::{
    Attended, ChunkAttention, ChunkAttentionConfig, DenseCacheConfig, HeldBuffer, KeyPositions,
    KvBlock, KvCache, KvError, KvShape, KvView, LayerCaches, Lengths, MemoryReport, PAD, Query,
    SeqId, StatsRequest, StorageRole, check_block, check_query, merge_attention,
    reference_attention_lse, sum_held,
};
use kv_model::Llama;
use serde::{Deserialize, Serialize};

use crate::{EvalError, Result};

#[derive(Debug)]
struct Shared {
    store: ChunkAttention,
    /// Batch rows of the forward pass, one sequence each.
    batch: Vec<SeqId>,
    /// Per layer, the block appended during the current pass (not yet in the store).
    staged: Vec<Option<KvBlock>>,
}

/// A [`ChunkAttention`] store driven by the model through per-layer [`ChunkLayer`] caches.
#[derive(Debug, Clone)]
pub struct PrefixBatch {
    shared: Arc<Mutex<Shared>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while holding the lock leaves the data as consistent as the panicking call did;
    // the adapters never panic while holding it, so recover the guard.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl PrefixBatch {
    /// Wraps a store; the batch is empty until [`set_batch`](Self::set_batch).
    pub fn new(store: ChunkAttention) -> Self {
        let layers = store.config().layers;
        PrefixBatch {
            shared: Arc::new(Mutex::new(Shared {
                store,
                batch: Vec::new(),
                staged: vec![None; layers],
            })),
        }
    }

    /// Sets the sequences of the next forward passes (row `b` is `seqs[b]`) and drops any
    /// staged block.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a sequence that is not in the store.
    pub fn set_batch(&self, seqs: Vec<SeqId>) -> Result<()> {
        let mut s = lock(&self.shared);
        if let Some(id) = seqs.iter().find(|&&id| !s.store.contains(id)) {
            return Err(KvError::InvalidConfig {
                field: "seq",
                reason: format!("{id} is not in the store"),
            }
            .into());
        }
        s.batch = seqs;
        s.staged.iter_mut().for_each(|b| *b = None);
        Ok(())
    }

    /// One adapter per layer for the current batch, shaped like the model's layers.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] if the batch is empty.
    pub fn layer_caches(&self, shape: KvShape) -> Result<LayerCaches> {
        let (batch, layers, device) = {
            let s = lock(&self.shared);
            (
                s.batch.len(),
                s.store.config().layers,
                s.store.device().clone(),
            )
        };
        let shape = shape.with_batch(batch)?;
        Ok(LayerCaches::new(
            (0..layers)
                .map(|layer| {
                    Box::new(ChunkLayer {
                        shared: Arc::clone(&self.shared),
                        layer,
                        shape,
                        device: device.clone(),
                    }) as Box<dyn KvCache>
                })
                .collect(),
        ))
    }

    /// Moves every layer's staged block into the store with the token ids of the pass
    /// (`batch * n`, row-major).
    ///
    /// # Errors
    /// [`KvError::Empty`] if a layer staged nothing; the store's errors for tokens that
    /// disagree with the blocks. Nothing is committed on error.
    pub fn commit(&self, tokens: &[u32]) -> Result<()> {
        let mut s = lock(&self.shared);
        let kv: Vec<(Tensor<4>, Tensor<4>)> = s
            .staged
            .iter()
            .map(|b| {
                b.as_ref()
                    .map(|b| (b.keys().clone(), b.values().clone()))
                    .ok_or(KvError::Empty {
                        op: "PrefixBatch::commit",
                        what: "staged block of a layer",
                    })
            })
            .collect::<Result<_, _>>()?;
        let batch = s.batch.clone();
        s.store.append(&batch, tokens, &kv)?;
        s.staged.iter_mut().for_each(|b| *b = None);
        Ok(())
    }

    /// Runs `f` on the store (to add or remove sequences, or read its memory).
    pub fn with_store<R>(&self, f: impl FnOnce(&mut ChunkAttention) -> R) -> R {
        f(&mut lock(&self.shared).store)
    }
}

/// One layer of a [`PrefixBatch`] as a [`KvCache`] for the model's forward pass.
///
/// `append` stages the block (positions must continue each sequence); `attend` merges the
/// store's two-phase attention with attention over the staged block; `reset` drops the staged
/// block (the store itself belongs to the [`PrefixBatch`]). Statistics are not provided.
#[derive(Debug)]
pub struct ChunkLayer {
    shared: Arc<Mutex<Shared>>,
    layer: usize,
    shape: KvShape,
    device: Device,
}

impl ChunkLayer {
    fn staged_buffers(block: &KvBlock) -> [HeldBuffer; 3] {
        [
            HeldBuffer::tensor(StorageRole::Keys, block.keys()),
            HeldBuffer::tensor(StorageRole::Values, block.values()),
            HeldBuffer::host(StorageRole::Metadata, block.positions()),
        ]
    }
}

impl KvCache for ChunkLayer {
    fn shape(&self) -> KvShape {
        self.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        const OP: &str = "ChunkLayer::append";
        check_block(&self.shape, &block, OP)?;
        let mut s = lock(&self.shared);
        if s.staged[self.layer].is_some() {
            return Err(KvError::InvalidConfig {
                field: "commit",
                reason: format!(
                    "{OP}: layer {} already staged a block; commit it first",
                    self.layer
                ),
            });
        }
        let n = block.seq_len();
        for (b, id) in s.batch.iter().enumerate() {
            let len = s.store.seq_len(*id)? as u32;
            let want: Vec<u32> = (len..len + n as u32).collect();
            if block.positions()[b * n..(b + 1) * n] != want[..] {
                return Err(KvError::BadPositions {
                    op: OP,
                    reason: format!(
                        "row {b} ({id}) holds {len} tokens; new tokens must sit at \
                         positions {len}..{} (no padding)",
                        len as usize + n
                    ),
                });
            }
        }
        s.staged[self.layer] = Some(block);
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        const OP: &str = "ChunkLayer::attend";
        check_query(&self.shape, query, OP)?;
        if stats.any() {
            return Err(KvError::InvalidConfig {
                field: "stats",
                reason: format!("{OP}: the chunked store computes no attention statistics"),
            });
        }
        let s = lock(&self.shared);
        let (o, l) = s.store.attend(self.layer, &s.batch, query)?;
        let output = match &s.staged[self.layer] {
            None => o,
            Some(block) => {
                let (o2, l2) = reference_attention_lse(
                    query.tensor().clone(),
                    block.keys().clone(),
                    block.values().clone(),
                    query.positions(),
                    KeyPositions::PerSequence(block.positions()),
                    None,
                );
                merge_attention(o, l, o2, l2).0
            }
        };
        Ok(Attended {
            output,
            stats: Default::default(),
        })
    }

    fn view(&self) -> KvView {
        let s = lock(&self.shared);
        let (kvh, d) = (self.shape.kv_heads(), self.shape.head_dim());
        let staged = s.staged[self.layer].as_ref();
        let mut rows = Vec::with_capacity(s.batch.len());
        for (b, id) in s.batch.iter().enumerate() {
            let (mut k, mut v) = s
                .store
                .seq_kv(self.layer, *id)
                .expect("invariant: batch sequences are live");
            if let Some(block) = staged {
                let n = block.seq_len();
                let r = [b..b + 1, 0..kvh, 0..n, 0..d];
                k = Tensor::cat(vec![k, block.keys().clone().slice(r.clone())], 2);
                v = Tensor::cat(vec![v, block.values().clone().slice(r)], 2);
            }
            rows.push((k, v));
        }
        let max = rows.iter().map(|(k, _)| k.dims()[2]).max().unwrap_or(0);
        let mut positions = Vec::with_capacity(rows.len() * kvh * max);
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for (k, v) in rows {
            let len = k.dims()[2];
            for _ in 0..kvh {
                positions.extend((0..len as u32).chain(core::iter::repeat_n(PAD, max - len)));
            }
            let pad = |t: Tensor<4>| {
                if len == max {
                    t
                } else {
                    Tensor::cat(
                        vec![t, Tensor::zeros([1, kvh, max - len, d], &self.device)],
                        2,
                    )
                }
            };
            ks.push(pad(k));
            vs.push(pad(v));
        }
        KvView {
            keys: Tensor::cat(ks, 0),
            values: Tensor::cat(vs, 0),
            positions,
        }
    }

    fn lengths(&self) -> Lengths {
        let s = lock(&self.shared);
        let staged = s.staged[self.layer].as_ref().map_or(0, KvBlock::seq_len);
        let logical: Vec<usize> = s
            .batch
            .iter()
            .map(|id| s.store.seq_len(*id).unwrap_or(0) + staged)
            .collect();
        let held = logical
            .iter()
            .flat_map(|&l| core::iter::repeat_n(l, self.shape.kv_heads()))
            .collect();
        Lengths { held, logical }
    }

    fn memory(&self) -> MemoryReport {
        let s = lock(&self.shared);
        let mut m = s.store.layer_memory(self.layer);
        if let Some(block) = &s.staged[self.layer] {
            let (k, v, meta) = sum_held(&Self::staged_buffers(block));
            let n = block.seq_len() * s.batch.len();
            m.key_bytes += k;
            m.value_bytes += v;
            m.metadata_bytes += meta;
            m.logical_tokens += n;
            m.held_token_slots += n * self.shape.kv_heads();
            m.logical_elements += 2 * n * self.shape.kv_heads() * self.shape.head_dim();
        }
        m
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let s = lock(&self.shared);
        let mut out = s.store.layer_held_buffers(self.layer);
        if let Some(block) = &s.staged[self.layer] {
            out.extend(Self::staged_buffers(block));
        }
        out
    }

    fn reset(&mut self) {
        lock(&self.shared).staged[self.layer] = None;
    }
}

/// What [`run`] measures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrefixReport {
    /// Sequences sharing the prefix.
    pub sequences: usize,
    /// Common prefix tokens.
    pub prefix: usize,
    /// Tokens scored per sequence after the prefix.
    pub suffix: usize,
    /// Of those, tokens fed one per step (decode) rather than in the batched prefill pass.
    pub decode_steps: usize,
    /// Tokens per chunk.
    pub chunk_size: usize,
    /// Largest |logit difference| between the chunked batch and each sequence alone with
    /// the dense cache, over every scored position and the whole vocabulary.
    pub max_abs_logit_diff: f32,
    /// The same over the decode steps only.
    pub max_abs_logit_diff_decode: f32,
    /// Perplexity of each sequence's suffix through the chunked store.
    pub ppl_chunked: Vec<f64>,
    /// Perplexity of each sequence's suffix alone with the dense cache.
    pub ppl_dense: Vec<f64>,
    /// Chunks held at the end, and those shared by two or more sequences.
    pub chunks: usize,
    /// Chunks shared by two or more sequences.
    pub shared_chunks: usize,
    /// Bytes the chunked store holds (all layers; each shared chunk once).
    pub chunked_bytes: usize,
    /// Key and value bytes the same chunks would take without sharing.
    pub chunked_unshared_kv_bytes: usize,
    /// Bytes of the dense caches of the sequences run alone, summed (all layers).
    pub dense_bytes: usize,
    /// Wall time of the chunked run (one prefix prefill, then the batch), seconds.
    pub chunked_seconds: f64,
    /// Wall time of the dense runs (each sequence prefilled in full), seconds.
    pub dense_seconds: f64,
}

/// Settings of [`run`].
#[derive(Debug, Clone, Copy)]
pub struct PrefixSettings {
    /// Sequences sharing the prefix (at least 1).
    pub sequences: usize,
    /// Common prefix tokens (at least 1).
    pub prefix: usize,
    /// Tokens scored per sequence (at least 1).
    pub suffix: usize,
    /// The last `decode` of the `suffix - 1` fed tokens go one per step.
    pub decode: usize,
    /// Tokens per chunk.
    pub chunk_size: usize,
}

/// Runs `sequences` sequences `ids[..prefix] ++ suffix_s`, where suffix `s` is
/// `ids[prefix + s * suffix..][..suffix]`, through one chunked store and each alone through
/// the dense cache; see the [module docs](self).
///
/// # Errors
/// Model and cache errors; [`EvalError::Usage`] for zero sizes; [`EvalError::Text`] if `ids`
/// is too short.
pub fn run(model: &Llama, ids: &[u32], cfg: PrefixSettings) -> Result<PrefixReport> {
    let PrefixSettings {
        sequences: nseq,
        prefix: p,
        suffix: sfx,
        decode,
        chunk_size,
    } = cfg;
    if nseq == 0 || p == 0 || sfx == 0 || chunk_size == 0 {
        return Err(EvalError::Usage(
            "prefix: --sequences, --prefix, --suffix and --chunk must be at least 1".into(),
        ));
    }
    let need = p + nseq * sfx;
    if ids.len() < need {
        return Err(EvalError::Text(format!(
            "need {need} tokens for {nseq} sequences of prefix {p} + suffix {sfx}, have {}",
            ids.len()
        )));
    }
    let c = model.config();
    let (h, layers) = (c.hidden_size, c.num_hidden_layers);
    let shape1 = model.kv_shape(1)?;
    let device = model.device();
    let prefix = &ids[..p];
    let suffix = |s: usize| &ids[p + s * sfx..p + (s + 1) * sfx];
    // Fed tokens: suffix[..sfx - 1] (the last one is only a target); the last `decode` of
    // them one per step.
    let fed = sfx - 1;
    let decode = decode.min(fed);
    let batched = fed - decode;
    let dense_caches = || -> Result<LayerCaches> {
        Ok(LayerCaches::try_from_fn(layers, |_| {
            Ok(Box::new(DenseCacheConfig::new(shape1).init(device)?) as Box<dyn KvCache>)
        })?)
    };

    // Dense: each sequence alone, in one forward pass over prefix + fed suffix tokens.
    let t0 = Instant::now();
    let mut dense_hidden = Vec::with_capacity(nseq);
    let mut dense_bytes = 0;
    let mut ppl_dense = Vec::with_capacity(nseq);
    for s in 0..nseq {
        let mut caches = dense_caches()?;
        let toks: Vec<u32> = prefix.iter().chain(&suffix(s)[..fed]).copied().collect();
        let pos: Vec<u32> = (0..toks.len() as u32).collect();
        let hid = model.forward_hidden(&toks, &pos, 1, &mut caches)?;
        let rows = hid.slice([0..1, p - 1..p + fed, 0..h]).reshape([sfx, h]);
        ppl_dense.push(ppl(&model.nll(rows.clone(), suffix(s))));
        dense_hidden.push(rows);
        dense_bytes += caches.memory().stored_bytes();
    }
    let dense_seconds = t0.elapsed().as_secs_f64();

    // Chunked: the prefix once, then all sequences through the store.
    let t0 = Instant::now();
    let store = ChunkAttentionConfig::new(
        layers,
        shape1.kv_heads(),
        shape1.q_heads(),
        shape1.head_dim(),
    )
    .with_chunk_size(chunk_size)
    .init(device)?;
    let batch = PrefixBatch::new(store);
    let mut caches = dense_caches()?;
    let pos: Vec<u32> = (0..p as u32).collect();
    let hid = model.forward_hidden(prefix, &pos, 1, &mut caches)?;
    let first_row = hid.slice([0..1, p - 1..p, 0..h]).reshape([1, h]);
    let kv: Vec<(Tensor<4>, Tensor<4>)> = caches
        .iter()
        .map(|l| {
            let v = l.view();
            (v.keys, v.values)
        })
        .collect();
    drop(caches);
    let seqs: Vec<SeqId> = (0..nseq)
        .map(|_| batch.with_store(|st| st.add_seq(prefix, &kv)))
        .collect::<Result<_, _>>()?;
    drop(kv);
    batch.set_batch(seqs)?;
    let mut tree_caches = batch.layer_caches(shape1)?;
    // Hidden rows per sequence: the prefix's last row, then one per fed token.
    let mut rows: Vec<Vec<Tensor<2>>> = vec![vec![first_row]; nseq];
    let mut feed = |start: usize, n: usize, rows: &mut Vec<Vec<Tensor<2>>>| -> Result<()> {
        let toks: Vec<u32> = (0..nseq)
            .flat_map(|s| suffix(s)[start..start + n].iter().copied())
            .collect();
        let pos: Vec<u32> = (0..nseq)
            .flat_map(|_| (p + start) as u32..(p + start + n) as u32)
            .collect();
        let hid = model.forward_hidden(&toks, &pos, nseq, &mut tree_caches)?;
        batch.commit(&toks)?;
        for (s, r) in rows.iter_mut().enumerate() {
            r.push(hid.clone().slice([s..s + 1, 0..n, 0..h]).reshape([n, h]));
        }
        Ok(())
    };
    if batched > 0 {
        feed(0, batched, &mut rows)?;
    }
    for t in batched..fed {
        feed(t, 1, &mut rows)?;
    }
    let chunked_seconds = t0.elapsed().as_secs_f64();

    let mut max_diff = 0f32;
    let mut max_diff_decode = 0f32;
    let mut ppl_chunked = Vec::with_capacity(nseq);
    for (s, r) in rows.into_iter().enumerate() {
        let chunked = Tensor::cat(r, 0);
        ppl_chunked.push(ppl(&model.nll(chunked.clone(), suffix(s))));
        let diff = (model.logits(chunked) - model.logits(dense_hidden[s].clone())).abs();
        let whole = diff.clone().max().into_scalar::<f32>();
        max_diff = max_diff.max(whole);
        if decode > 0 {
            let vocab = diff.dims()[1];
            let dec = diff
                .slice([1 + batched..sfx, 0..vocab])
                .max()
                .into_scalar::<f32>();
            max_diff_decode = max_diff_decode.max(dec);
        }
    }
    let (chunks, shared_chunks, chunked_bytes, chunked_unshared_kv_bytes) =
        batch.with_store(|st| {
            (
                st.chunk_count(),
                st.shared_chunk_count(),
                st.memory().stored_bytes(),
                st.unshared_kv_bytes(),
            )
        });
    Ok(PrefixReport {
        sequences: nseq,
        prefix: p,
        suffix: sfx,
        decode_steps: decode,
        chunk_size,
        max_abs_logit_diff: max_diff,
        max_abs_logit_diff_decode: max_diff_decode,
        ppl_chunked,
        ppl_dense,
        chunks,
        shared_chunks,
        chunked_bytes,
        chunked_unshared_kv_bytes,
        dense_bytes,
        chunked_seconds,
        dense_seconds,
    })
}

fn ppl(nll: &[f32]) -> f64 {
    (nll.iter().map(|&x| f64::from(x)).sum::<f64>() / nll.len().max(1) as f64).exp()
}
