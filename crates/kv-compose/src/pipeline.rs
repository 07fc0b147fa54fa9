//! [`PipelineCache`]: a prefill selection whose survivors are handed to a storage codec, and
//! optionally the evicted tokens to a second, lower-precision codec.

use std::fmt;
use std::sync::Arc;

use burn::prelude::*;
use kv_core::{
    Attended, AttentionStats, HeldBuffer, KeyRope, KvBlock, KvCache, KvError, KvShape, KvView,
    Lengths, MemoryReport, PAD, Query, StatsRequest, check_block, check_positions, check_query,
    merge_attention,
};
use kv_evict::{EvictConfig, EvictingCache};

/// Builds a codec for a shape: the pipeline calls it once per (sequence, KV head) stream with
/// shape `[batch 1, kv_heads 1, q_heads = group, head_dim]`.
pub type CodecFactory =
    Arc<dyn Fn(KvShape, &Device) -> kv_core::Result<Box<dyn KvCache>> + Send + Sync>;

/// Configuration of a [`PipelineCache`] (one layer): a selection, the codec that stores the
/// tokens it keeps and, optionally, the codec that stores the tokens it evicts.
#[derive(Clone)]
pub struct PipelineCacheConfig {
    selection: EvictConfig,
    kept: CodecFactory,
    evicted: Option<CodecFactory>,
    label: String,
}

impl fmt::Debug for PipelineCacheConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipelineCacheConfig")
            .field("selection", &self.selection)
            .field("label", &self.label)
            .field("evicted_tier", &self.evicted.is_some())
            .finish()
    }
}

impl PipelineCacheConfig {
    /// A selection whose kept tokens are stored by `kept` and whose evicted tokens are freed.
    pub fn new(
        selection: EvictConfig,
        kept: impl Fn(KvShape, &Device) -> kv_core::Result<Box<dyn KvCache>> + Send + Sync + 'static,
    ) -> Self {
        PipelineCacheConfig {
            selection,
            kept: Arc::new(kept),
            evicted: None,
            label: "pipeline".into(),
        }
    }

    /// Stores the evicted tokens with `codec` instead of freeing them (MiKV).
    pub fn with_evicted(
        mut self,
        codec: impl Fn(KvShape, &Device) -> kv_core::Result<Box<dyn KvCache>> + Send + Sync + 'static,
    ) -> Self {
        self.evicted = Some(Arc::new(codec));
        self
    }

    /// Sets the label shown by `Debug` (the one-line form when built from a spec).
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// The selection.
    pub fn selection(&self) -> &EvictConfig {
        &self.selection
    }

    /// Validates the stages and builds the cache: the selection is initialised and each codec
    /// is built once for a stream shape to check its config.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] from the selection or a codec, or (field `codec`) a codec
    /// that takes pre-RoPE keys: a selection holds post-RoPE keys and cannot hand them over.
    pub fn init(&self, device: &Device) -> kv_core::Result<PipelineCache> {
        let shape = self.selection.shape;
        let prefill = self.selection.init(device)?;
        let stream = stream_shape(shape)?;
        for (name, f) in [
            ("kept", Some(&self.kept)),
            ("evicted", self.evicted.as_ref()),
        ] {
            let Some(f) = f else { continue };
            let probe = f(stream, device)?;
            if probe.key_rope() != KeyRope::PostRope {
                return Err(KvError::InvalidConfig {
                    field: "codec",
                    reason: format!(
                        "the {name} codec stores keys before RoPE; a selection holds \
                         post-RoPE keys and cannot hand them over"
                    ),
                });
            }
            if probe.shape() != stream {
                return Err(KvError::InvalidConfig {
                    field: "codec",
                    reason: format!(
                        "the {name} codec factory built a cache of shape {:?} for {stream:?}",
                        probe.shape()
                    ),
                });
            }
        }
        Ok(PipelineCache {
            config: self.clone(),
            device: device.clone(),
            state: State::Prefill(Box::new(prefill)),
        })
    }
}

/// One (sequence, KV head) stream's shape: batch 1, one KV head, `group` query heads.
fn stream_shape(shape: KvShape) -> kv_core::Result<KvShape> {
    KvShape::new(1, 1, shape.group(), shape.head_dim())
}

#[derive(Debug)]
enum State {
    /// Prefill: the selection holds every token in fp32 and computes attention.
    Prefill(Box<EvictingCache>),
    /// After the selection: one codec per stream (and one per stream for evicted tokens).
    Split {
        kept: Vec<Box<dyn KvCache>>,
        evicted: Vec<Box<dyn KvCache>>,
        logical: Vec<usize>,
        last: Vec<Option<u32>>,
    },
}

/// A layer cache that runs a pipeline: during prefill a kv-evict selection holds the prompt
/// in fp32 (and computes attention exactly, as MiniKV and the KIVI reference do); at
/// [`end_prefill`](KvCache::end_prefill) it scores and evicts, and every (sequence, KV head)
/// stream's survivors are appended, with their original positions, to a codec of its own
/// (KIVI, a block format, fp16...), which then stores every later token too. With an evicted
/// tier, the tokens the selection drops go to a second codec per stream instead of being
/// freed, and attention over the two tiers is merged exactly by log-sum-exp
/// ([`merge_attention`]).
///
/// Per-stream codecs let a head-wise budget (Ada-KV) keep different tokens, and different
/// numbers of tokens, in each head while every codec stays a plain rectangular cache; the
/// price is one attention call per stream and 4 bytes of position per token and stream.
#[derive(Debug)]
pub struct PipelineCache {
    config: PipelineCacheConfig,
    device: Device,
    state: State,
}

impl PipelineCache {
    /// The configuration.
    pub fn config(&self) -> &PipelineCacheConfig {
        &self.config
    }

    /// Whether the selection has run (the tokens are in the codecs).
    pub fn is_split(&self) -> bool {
        matches!(self.state, State::Split { .. })
    }

    /// The codec holding the kept tokens of stream `(b, h)`, after the selection has run.
    pub fn kept_codec(&self, b: usize, h: usize) -> Option<&dyn KvCache> {
        match &self.state {
            State::Split { kept, .. } => kept.get(b * self.shape().kv_heads() + h).map(|c| &**c),
            State::Prefill(_) => None,
        }
    }

    /// The codec holding the evicted tokens of stream `(b, h)`, with an evicted tier.
    pub fn evicted_codec(&self, b: usize, h: usize) -> Option<&dyn KvCache> {
        match &self.state {
            State::Split { evicted, .. } => {
                evicted.get(b * self.shape().kv_heads() + h).map(|c| &**c)
            }
            State::Prefill(_) => None,
        }
    }

    fn split(&mut self) -> kv_core::Result<()> {
        const OP: &str = "PipelineCache::end_prefill";
        let State::Prefill(sel) = &mut self.state else {
            return Ok(());
        };
        let shape = self.config.selection.shape;
        let (batch, kvh, d) = (shape.batch(), shape.kv_heads(), shape.head_dim());
        let stream = stream_shape(shape)?;
        let logical = sel.lengths().logical;
        // Build every codec first, so that a codec error leaves the prefill untouched.
        let mut kept = Vec::with_capacity(batch * kvh);
        let mut evicted = Vec::new();
        for _ in 0..batch * kvh {
            kept.push((self.config.kept)(stream, &self.device)?);
            if let Some(f) = &self.config.evicted {
                evicted.push(f(stream, &self.device)?);
            }
        }
        // Everything the prompt held, for the evicted tier and the last positions.
        type Snapshot = Vec<(Option<(Tensor<2>, Tensor<2>)>, Vec<u32>)>;
        let before: Snapshot = (0..batch * kvh)
            .map(|i| {
                let st = sel.storage().stream(i / kvh, i % kvh);
                let kv = st.keys.zip(st.values);
                (kv, st.positions.to_vec())
            })
            .collect();
        let last: Vec<Option<u32>> = (0..batch)
            .map(|b| {
                (0..kvh)
                    .filter_map(|h| before[b * kvh + h].1.last().copied())
                    .max()
            })
            .collect();
        sel.end_prefill()?;
        let to_block = |k: Tensor<2>, v: Tensor<2>, pos: Vec<u32>| -> kv_core::Result<KvBlock> {
            let n = pos.len();
            KvBlock::new(k.reshape([1, 1, n, d]), v.reshape([1, 1, n, d]), pos)
        };
        for i in 0..batch * kvh {
            let st = sel.storage().stream(i / kvh, i % kvh);
            let kept_pos = st.positions.to_vec();
            if let (Some(k), Some(v)) = (st.keys, st.values) {
                kept[i].append(to_block(k, v, kept_pos.clone())?)?;
                kept[i].end_prefill()?;
            }
            if let Some(tier) = evicted.get_mut(i)
                && let (Some((k, v)), all_pos) = &before[i]
            {
                // Positions ascend in both lists: a merge walk finds the dropped rows.
                let mut rows = Vec::new();
                let mut j = 0;
                for (r, p) in all_pos.iter().enumerate() {
                    if j < kept_pos.len() && kept_pos[j] == *p {
                        j += 1;
                    } else {
                        rows.push(r);
                    }
                }
                if !rows.is_empty() {
                    let pos: Vec<u32> = rows.iter().map(|&r| all_pos[r]).collect();
                    let ids: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
                    let ids = Tensor::<1, Int>::from_data(
                        TensorData::new(ids, [rows.len()]),
                        &self.device,
                    );
                    let (k, v) = (k.clone().select(0, ids.clone()), v.clone().select(0, ids));
                    tier.append(to_block(k, v, pos)?)?;
                    tier.end_prefill()?;
                }
            }
        }
        debug_assert!(kept.len() == batch * kvh, "{OP}: one codec per stream");
        self.state = State::Split {
            kept,
            evicted,
            logical,
            last,
        };
        Ok(())
    }

    /// Attention from the dense view (the oracle), for statistics over two tiers.
    fn attend_from_view(&self, query: &Query, stats: StatsRequest) -> Attended {
        self.view().attend_reference(query, stats)
    }
}

/// Pads `[1, 1, t, d]` stream tensors (or `None`) to `[1, 1, len, d]` with zeros.
fn pad_rows(t: Option<Tensor<4>>, len: usize, d: usize, device: &Device) -> Tensor<4> {
    match t {
        Some(t) if t.dims()[2] == len => t,
        Some(t) => {
            let have = t.dims()[2];
            Tensor::cat(vec![t, Tensor::zeros([1, 1, len - have, d], device)], 2)
        }
        None => Tensor::zeros([1, 1, len, d], device),
    }
}

/// Pads `[1, 1, g, t]` statistics to width `len` with zeros.
fn pad_cols(t: Tensor<4>, len: usize) -> Tensor<4> {
    let [a, b, g, have] = t.dims();
    if have == len {
        t
    } else if have == 0 {
        Tensor::zeros([a, b, g, len], &t.device())
    } else {
        let device = t.device();
        Tensor::cat(vec![t, Tensor::zeros([a, b, g, len - have], &device)], 3)
    }
}

/// Concatenates per-stream tensors (row-major over (sequence, head)) into `[batch, heads, ..]`.
fn gather_streams(parts: Vec<Tensor<4>>, batch: usize) -> Tensor<4> {
    let per = parts.len() / batch;
    let mut rows = Vec::with_capacity(batch);
    let mut it = parts.into_iter();
    for _ in 0..batch {
        let heads: Vec<Tensor<4>> = it.by_ref().take(per).collect();
        rows.push(Tensor::cat(heads, 1));
    }
    Tensor::cat(rows, 0)
}

impl KvCache for PipelineCache {
    fn shape(&self) -> KvShape {
        self.config.selection.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        const OP: &str = "PipelineCache::append";
        let shape = self.shape();
        let State::Split {
            kept,
            logical,
            last,
            ..
        } = &mut self.state
        else {
            let State::Prefill(sel) = &mut self.state else {
                unreachable!("the state is Prefill or Split")
            };
            return sel.append(block);
        };
        check_block(&shape, &block, OP)?;
        let (batch, kvh, d) = (shape.batch(), shape.kv_heads(), shape.head_dim());
        let counts = check_positions(block.positions(), batch, last, OP)?;
        let n = block.keys().dims()[2];
        for b in 0..batch {
            if counts[b] == 0 {
                continue;
            }
            let pos = block.positions()[b * n..(b + 1) * n].to_vec();
            for h in 0..kvh {
                let part = |t: &Tensor<4>| t.clone().slice([b..b + 1, h..h + 1, 0..n, 0..d]);
                let sub = KvBlock::new(part(block.keys()), part(block.values()), pos.clone())?;
                kept[b * kvh + h].append(sub)?;
            }
            logical[b] += counts[b];
            last[b] = pos.iter().rev().find(|&&p| p != PAD).copied().or(last[b]);
        }
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        const OP: &str = "PipelineCache::attend";
        let shape = self.shape();
        check_query(&shape, query, OP)?;
        let two_tiers = matches!(&self.state, State::Split { evicted, .. } if !evicted.is_empty());
        if two_tiers && stats.any() {
            // Statistics over two tiers need each row's weights: take them from the view.
            return Ok(self.attend_from_view(query, stats));
        }
        let State::Split { kept, evicted, .. } = &mut self.state else {
            let State::Prefill(sel) = &mut self.state else {
                unreachable!("the state is Prefill or Split")
            };
            return sel.attend(query, stats);
        };
        let (batch, kvh, g, d) = (
            shape.batch(),
            shape.kv_heads(),
            shape.group(),
            shape.head_dim(),
        );
        let n = query.tensor().dims()[2];
        let mut outs = Vec::with_capacity(batch * kvh);
        let mut cols = Vec::new();
        let mut lasts = Vec::new();
        for b in 0..batch {
            let pos = query.positions()[b * n..(b + 1) * n].to_vec();
            for h in 0..kvh {
                let q = query
                    .tensor()
                    .clone()
                    .slice([b..b + 1, h * g..(h + 1) * g, 0..n, 0..d]);
                let q = Query::new(q, pos.clone())?;
                let i = b * kvh + h;
                if let Some(tier) = evicted.get_mut(i) {
                    let (o1, l1) = kept[i].attend_lse(&q)?;
                    let (o2, l2) = tier.attend_lse(&q)?;
                    outs.push(merge_attention(o1, l1, o2, l2).0);
                } else {
                    let a = kept[i].attend(&q, stats)?;
                    outs.push(a.output);
                    cols.extend(a.stats.column_sums);
                    lasts.extend(a.stats.last_row);
                }
            }
        }
        let widest = |v: &[Tensor<4>]| v.iter().map(|t| t.dims()[3]).max().unwrap_or(0);
        let stack = |v: Vec<Tensor<4>>| -> Option<Tensor<4>> {
            if v.len() != batch * kvh {
                return None;
            }
            let w = widest(&v);
            Some(gather_streams(
                v.into_iter().map(|t| pad_cols(t, w)).collect(),
                batch,
            ))
        };
        Ok(Attended {
            output: gather_streams(outs, batch),
            stats: AttentionStats {
                column_sums: stack(cols),
                last_row: stack(lasts),
            },
        })
    }

    fn end_prefill(&mut self) -> kv_core::Result<()> {
        match &mut self.state {
            State::Prefill(_) => self.split(),
            State::Split { kept, evicted, .. } => {
                for c in kept.iter_mut().chain(evicted.iter_mut()) {
                    c.end_prefill()?;
                }
                Ok(())
            }
        }
    }

    fn view(&self) -> KvView {
        let shape = self.shape();
        let (batch, kvh, d) = (shape.batch(), shape.kv_heads(), shape.head_dim());
        let State::Split { kept, evicted, .. } = &self.state else {
            let State::Prefill(sel) = &self.state else {
                unreachable!("the state is Prefill or Split")
            };
            return sel.view();
        };
        // Each stream: its kept tokens, then its evicted ones.
        let streams: Vec<(Option<Tensor<4>>, Option<Tensor<4>>, Vec<u32>)> = (0..batch * kvh)
            .map(|i| {
                let mut parts = vec![kept[i].view()];
                parts.extend(evicted.get(i).map(|c| c.view()));
                let parts: Vec<KvView> =
                    parts.into_iter().filter(|v| v.keys.dims()[2] > 0).collect();
                let pos: Vec<u32> = parts
                    .iter()
                    .flat_map(|v| v.positions.iter().copied())
                    .collect();
                if parts.is_empty() {
                    return (None, None, pos);
                }
                let k = Tensor::cat(parts.iter().map(|v| v.keys.clone()).collect(), 2);
                let v = Tensor::cat(parts.iter().map(|v| v.values.clone()).collect(), 2);
                (Some(k), Some(v), pos)
            })
            .collect();
        let len = streams.iter().map(|s| s.2.len()).max().unwrap_or(0);
        if len == 0 {
            let z = Tensor::zeros([batch, kvh, 0, d], &self.device);
            return KvView {
                keys: z.clone(),
                values: z,
                positions: Vec::new(),
            };
        }
        let mut positions = Vec::with_capacity(batch * kvh * len);
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for (k, v, pos) in streams {
            positions.extend(pos.iter().copied());
            positions.extend(std::iter::repeat_n(PAD, len - pos.len()));
            ks.push(pad_rows(k, len, d, &self.device));
            vs.push(pad_rows(v, len, d, &self.device));
        }
        KvView {
            keys: gather_streams(ks, batch),
            values: gather_streams(vs, batch),
            positions,
        }
    }

    fn lengths(&self) -> Lengths {
        match &self.state {
            State::Prefill(sel) => sel.lengths(),
            State::Split {
                kept,
                evicted,
                logical,
                ..
            } => Lengths {
                held: (0..kept.len())
                    .map(|i| {
                        kept[i].lengths().total_held()
                            + evicted.get(i).map_or(0, |c| c.lengths().total_held())
                    })
                    .collect(),
                logical: logical.clone(),
            },
        }
    }

    fn memory(&self) -> MemoryReport {
        match &self.state {
            State::Prefill(sel) => sel.memory(),
            State::Split {
                kept,
                evicted,
                logical,
                ..
            } => {
                let s = self.shape();
                let parts: MemoryReport = kept.iter().chain(evicted).map(|c| c.memory()).sum();
                let tokens: usize = logical.iter().sum();
                MemoryReport {
                    logical_tokens: tokens,
                    logical_elements: tokens * s.kv_heads() * s.head_dim() * 2,
                    ..parts
                }
            }
        }
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        match &self.state {
            State::Prefill(sel) => sel.held_buffers(),
            State::Split { kept, evicted, .. } => kept
                .iter()
                .chain(evicted)
                .flat_map(|c| c.held_buffers())
                .collect(),
        }
    }

    fn reset(&mut self) {
        if let Ok(fresh) = self.config.selection.init(&self.device) {
            self.state = State::Prefill(Box::new(fresh));
        } else if let State::Prefill(sel) = &mut self.state {
            sel.reset();
        }
    }
}
