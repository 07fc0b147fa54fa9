//! ThinK (Xu et al., 2024, arXiv 2407.21018): query-driven pruning of key channels at the end
//! of prefill, with the channels physically removed from storage.
//!
//! # What it does (SalesforceAIResearch/ThinK `key_pruner_query_driven`)
//! At [`end_prefill`](kv_core::KvCache::end_prefill), for every (sequence, KV head) with `t`
//! prefill slots, each channel `c` gets the score
//! `s_c = mean_{j, i}(q_{j,i,c}²) · mean_s(k_{s,c}²)`, where `i` runs over the last `window`
//! query tokens the cache attended (32 by default, as in the reference) and `j` over the query
//! heads of the KV head's GQA group (the group average), and `s` over all `t` keys. The
//! `⌊λ·d⌋` lowest-scoring channels are pruned (ties: lower channel index pruned first), so
//! `d' = d − ⌊λ·d⌋ = ⌈(1 − λ)·d⌉` stay. The keys of the first `t − recent_size` slots are
//! stored as `[t − recent_size, d']` together with the kept channel indices; the last
//! `recent_size` slots and every token appended after prefill keep all `d` channels. Values
//! are untouched.
//!
//! # Attention
//! One softmax over two parts: the pruned slots are scored with the query restricted to each
//! head's kept channels, `q[C] · k[C]`, the full slots with the whole query; scale
//! `1/√d` as before pruning. [`view`](kv_core::KvCache::view) returns the pruned keys with zeros
//! in the removed channels, so attention over the view is the same math. Before pruning (and
//! with `λ = 0`, which prunes nothing) the cache is the dense cache and attends with
//! [`kv_core::reference_attention`] itself: `λ = 0` is an exact no-op.
//!
//! # Deviations
//! kvpress zeroes channels (no memory gain); this cache removes them. Pruning happens once per
//! prefill (the first `end_prefill`); slots are shared by the sequences of a batch as in the
//! dense cache, so "the last `recent_size` slots" counts padding slots too.

use burn::prelude::*;
use burn::tensor::{FloatDType, IndexingUpdateOp, IntDType};
use kv_core::{
    Attended, HeldBuffer, KeyPositions, KvBlock, KvCache, KvError, KvShape, KvView, Lengths,
    MemoryReport, Query, StatsRequest, StorageDtype, StorageRole, check_query, positions_per_head,
    reference_attention,
};
use serde::{Deserialize, Serialize};

use crate::attend::{Part, attend_parts, group_query};
use crate::slots::{Slots, bytes, cat_tokens, empty_view, float_dtype, held_tensor};

/// Configuration of a [`ThinkCache`]. The reference defaults: `λ = 0.4`, `recent_size = 32`,
/// a query window of 32 tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThinkConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// `λ`: the fraction of key channels pruned, in `[0, 1)`.
    pub pruning_ratio: f64,
    /// Slots at the end of the prefill that keep all channels.
    pub recent_size: usize,
    /// Query tokens (the last ones attended during prefill) that score the channels.
    pub window: usize,
    /// Element type of the stored keys and values.
    #[serde(default)]
    pub dtype: StorageDtype,
}

impl ThinkConfig {
    /// ThinK with the reference defaults (`λ = 0.4`, `recent_size = 32`, window 32), fp32
    /// storage.
    pub fn new(shape: KvShape) -> Self {
        ThinkConfig {
            shape,
            pruning_ratio: 0.4,
            recent_size: 32,
            window: 32,
            dtype: StorageDtype::F32,
        }
    }
    /// Sets `λ`.
    pub fn with_pruning_ratio(mut self, ratio: f64) -> Self {
        self.pruning_ratio = ratio;
        self
    }
    /// Sets the number of recent slots that keep all channels.
    pub fn with_recent_size(mut self, recent: usize) -> Self {
        self.recent_size = recent;
        self
    }
    /// Sets the scoring query window.
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window;
        self
    }
    /// Sets the storage dtype.
    pub fn with_dtype(mut self, dtype: StorageDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// Channels kept per head: `d − ⌊λ·d⌋`.
    pub fn kept_channels(&self) -> usize {
        let d = self.shape.head_dim();
        d - ((self.pruning_ratio * d as f64).floor() as usize).min(d)
    }

    /// The parameter names [`from_params`](Self::from_params) accepts besides `ratio` (`λ`,
    /// which pipelines pass as the stage's ratio: the fraction of key channels removed).
    pub const PARAMS: &'static [&'static str] = &["recent", "window", "dtype"];

    /// The default config with `key=value` parameters applied: `ratio` (`λ`), `recent`,
    /// `window` and `dtype` (`f16` or `f32`). Validated at [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the parameter for an unknown name or a bad value.
    pub fn from_params<'a>(
        shape: KvShape,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        use crate::params::{dtype, float, int, unknown};
        let mut cfg = ThinkConfig::new(shape);
        for (k, v) in params {
            match k {
                "ratio" => cfg.pruning_ratio = float("ratio", v)?,
                "recent" => cfg.recent_size = int("recent", v)?,
                "window" => cfg.window = int("window", v)?,
                "dtype" => cfg.dtype = dtype("dtype", v)?,
                _ => {
                    let mut accepted = vec!["ratio"];
                    accepted.extend_from_slice(Self::PARAMS);
                    return Err(unknown("ThinK", k, &accepted));
                }
            }
        }
        Ok(cfg)
    }

    /// Validates and builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for `λ` outside `[0, 1)` or a zero window.
    pub fn init(&self, device: &Device) -> kv_core::Result<ThinkCache> {
        if !(0.0..1.0).contains(&self.pruning_ratio) {
            return Err(KvError::InvalidConfig {
                field: "pruning_ratio",
                reason: format!(
                    "{} must be in [0, 1) (the fraction of key channels pruned)",
                    self.pruning_ratio
                ),
            });
        }
        if self.window == 0 {
            return Err(KvError::InvalidConfig {
                field: "window",
                reason: "at least one query token must score the channels".into(),
            });
        }
        Ok(ThinkCache {
            config: self.clone(),
            device: device.clone(),
            slots: Slots::new(self.shape.batch()),
            pruned: None,
            kept: None,
            kept_host: Vec::new(),
            pruned_len: 0,
            full_keys: None,
            values: None,
            window: None,
            pruned_once: false,
        })
    }
}

/// A ThinK cache for one layer. See the module docs.
#[derive(Debug, Clone)]
pub struct ThinkCache {
    config: ThinkConfig,
    device: Device,
    slots: Slots,
    /// Keys of slots `0..pruned_len` on the kept channels, `[b, h, pruned_len, d']`.
    pruned: Option<Tensor<4>>,
    /// Kept channel indices (ascending), `[b, h, 1, d']`, i32.
    kept: Option<Tensor<4, Int>>,
    /// The same indices on the host, per (sequence, KV head).
    kept_host: Vec<Vec<u32>>,
    pruned_len: usize,
    /// Keys of slots `pruned_len..len`, all channels.
    full_keys: Option<Tensor<4>>,
    /// Values of every slot.
    values: Option<Tensor<4>>,
    /// The last `window` query tokens attended during prefill, `[b, q_heads, w, d]`.
    window: Option<Tensor<4>>,
    pruned_once: bool,
}

impl ThinkCache {
    /// The configuration.
    pub fn config(&self) -> &ThinkConfig {
        &self.config
    }
    /// Slots whose keys are stored on the kept channels only.
    pub fn pruned_tokens(&self) -> usize {
        self.pruned_len
    }
    /// The kept channels (ascending) of sequence `b`, KV head `h`; `None` before pruning.
    pub fn kept_channels(&self, b: usize, h: usize) -> Option<&[u32]> {
        self.kept_host
            .get(b * self.config.shape.kv_heads() + h)
            .map(Vec::as_slice)
    }

    fn f32(&self, t: &Tensor<4>) -> Tensor<4> {
        t.clone().cast(FloatDType::F32)
    }

    /// Values of slots `range` in fp32.
    fn values_range(&self, r: core::ops::Range<usize>) -> Tensor<4> {
        let s = self.config.shape;
        let v = self
            .values
            .as_ref()
            .expect("invariant: values exist when slots do");
        self.f32(v)
            .slice([0..s.batch(), 0..s.kv_heads(), r, 0..s.head_dim()])
    }

    /// Index tensor `[b, h, rows, d']` for gathering/scattering the kept channels.
    fn kept_index(&self, rows: usize) -> Tensor<4, Int> {
        let kept = self.kept.as_ref().expect("invariant: called after pruning");
        let [b, h, _, dk] = kept.dims();
        kept.clone().expand([b, h, rows, dk])
    }

    fn prune(&mut self) {
        let s = self.config.shape;
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let t = self.slots.len();
        let dk = self.config.kept_channels();
        let (Some(keys), Some(window)) = (self.full_keys.clone(), self.window.take()) else {
            return;
        };
        if dk == d || t <= self.config.recent_size {
            return;
        }
        let keys32 = self.f32(&keys);
        let g = s.group();
        let w = window.dims()[2];
        let qn = window.powi_scalar(2).reshape([b, h, g * w, d]).mean_dim(2); // [b, h, 1, d]
        let kn = keys32.clone().powi_scalar(2).mean_dim(2);
        let score = (qn * kn)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("invariant: f32 scores read back");
        let mut kept_host = Vec::with_capacity(b * h);
        let mut flat = Vec::with_capacity(b * h * dk);
        for stream in 0..b * h {
            let sc = &score[stream * d..(stream + 1) * d];
            let mut order: Vec<usize> = (0..d).collect();
            // Lowest score first, ties: lower channel first; the first d - dk are pruned.
            order.sort_by(|&x, &y| sc[x].total_cmp(&sc[y]).then(x.cmp(&y)));
            let mut keep: Vec<u32> = order[d - dk..].iter().map(|&c| c as u32).collect();
            keep.sort_unstable();
            flat.extend(keep.iter().map(|&c| c as i32));
            kept_host.push(keep);
        }
        let kept = Tensor::<1, Int>::from_data(TensorData::new(flat, [b * h * dk]), &self.device)
            .cast(IntDType::I32)
            .reshape([b, h, 1, dk]);
        let tp = t - self.config.recent_size;
        let old = keys.clone().slice([0..b, 0..h, 0..tp, 0..d]);
        let idx = kept.clone().expand([b, h, tp, dk]);
        self.pruned = Some(old.gather(3, idx));
        self.full_keys = Some(keys.slice([0..b, 0..h, tp..t, 0..d]));
        self.kept = Some(kept);
        self.kept_host = kept_host;
        self.pruned_len = tp;
    }

    fn record_window(&mut self, q: &Tensor<4>) {
        let [b, qh, _, d] = q.dims();
        let w = self.config.window;
        let joined = match self.window.take() {
            Some(prev) => Tensor::cat(vec![prev, q.clone()], 2),
            None => q.clone(),
        };
        let len = joined.dims()[2];
        self.window = Some(if len > w {
            joined.slice([0..b, 0..qh, len - w..len, 0..d])
        } else {
            joined
        });
    }

    fn full_keys_view(&self) -> Option<Tensor<4>> {
        self.full_keys.as_ref().map(|k| self.f32(k))
    }
}

impl KvCache for ThinkCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        const OP: &str = "ThinkCache::append";
        let counts = self.slots.check(&self.config.shape, &block, OP)?;
        let n = block.seq_len();
        let dtype = float_dtype(self.config.dtype);
        let (k, v, pos) = block.into_parts();
        self.full_keys = Some(cat_tokens(self.full_keys.take(), k.cast(dtype)));
        self.values = Some(cat_tokens(self.values.take(), v.cast(dtype)));
        self.slots.push(&pos, n, &counts);
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        const OP: &str = "ThinkCache::attend";
        let s = self.config.shape;
        check_query(&s, query, OP)?;
        if !self.pruned_once {
            self.record_window(query.tensor());
        }
        if self.slots.len() == 0 {
            return Ok(Attended {
                output: query.tensor().zeros_like(),
                stats: Default::default(),
            });
        }
        if stats.any() {
            return Ok(self.view().attend_reference(query, stats));
        }
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let t = self.slots.len();
        let Some(pruned) = &self.pruned else {
            let keys = self.full_keys_view().expect("invariant: slots imply keys");
            let kp = self.slots.flat(0..t);
            let (output, stats) = reference_attention(
                query.tensor().clone(),
                keys,
                self.values_range(0..t),
                query.positions(),
                KeyPositions::PerSequence(&kp),
                None,
                stats,
            );
            return Ok(Attended { output, stats });
        };
        let tp = self.pruned_len;
        let qg = group_query(query.tensor().clone(), h);
        let [_, _, g, n, _] = qg.dims();
        let dk = self.config.kept_channels();
        let kept = self
            .kept
            .as_ref()
            .expect("invariant: pruned implies kept")
            .clone()
            .reshape([b, h, 1, 1, dk])
            .expand([b, h, g, n, dk]);
        let mut parts = vec![Part {
            q: qg.clone().gather(4, kept),
            keys: self.f32(pruned),
            values: self.values_range(0..tp),
            positions: self.slots.flat(0..tp),
        }];
        if t > tp {
            parts.push(Part {
                q: qg,
                keys: self
                    .full_keys_view()
                    .expect("invariant: recent slots exist"),
                values: self.values_range(tp..t),
                positions: self.slots.flat(tp..t),
            });
        }
        let out = attend_parts(&parts, query.positions(), 1.0 / (d as f32).sqrt(), None);
        Ok(Attended {
            output: out.reshape([b, s.q_heads(), n, d]),
            stats: Default::default(),
        })
    }

    fn end_prefill(&mut self) -> kv_core::Result<()> {
        if !self.pruned_once && self.slots.len() > 0 {
            self.prune();
            self.pruned_once = true;
            self.window = None;
        }
        Ok(())
    }

    fn view(&self) -> KvView {
        let s = self.config.shape;
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let positions = positions_per_head(self.slots.per_sequence(), h);
        let t = self.slots.len();
        if t == 0 {
            return empty_view([b, h, d], positions, &self.device);
        }
        let mut keys = Vec::new();
        if let Some(p) = &self.pruned {
            let tp = self.pruned_len;
            let zeros = Tensor::<4>::zeros([b, h, tp, d], &self.device);
            keys.push(zeros.scatter(
                3,
                self.kept_index(tp),
                self.f32(p),
                IndexingUpdateOp::Assign,
            ));
        }
        if let Some(k) = self.full_keys_view() {
            keys.push(k);
        }
        KvView {
            keys: Tensor::cat(keys, 2),
            values: self.values_range(0..t),
            positions,
        }
    }

    fn lengths(&self) -> Lengths {
        Lengths {
            held: vec![self.slots.len(); self.config.shape.streams()],
            logical: self.slots.logical().to_vec(),
        }
    }

    fn memory(&self) -> MemoryReport {
        let s = self.config.shape;
        MemoryReport {
            key_bytes: bytes(self.pruned.as_ref()) + bytes(self.full_keys.as_ref()),
            value_bytes: bytes(self.values.as_ref()),
            metadata_bytes: self.slots.metadata_bytes()
                + self
                    .kept
                    .as_ref()
                    .map_or(0, |k| k.shape().num_elements() * k.dtype().size())
                + bytes(self.window.as_ref())
                + self
                    .kept_host
                    .iter()
                    .map(|k| core::mem::size_of_val(k.as_slice()))
                    .sum::<usize>(),
            logical_elements: self.slots.logical_elements(&s),
            logical_tokens: self.slots.logical_tokens(),
            held_token_slots: s.streams() * self.slots.len(),
        }
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = Vec::new();
        held_tensor(&mut out, StorageRole::Keys, self.pruned.as_ref());
        held_tensor(&mut out, StorageRole::Keys, self.full_keys.as_ref());
        held_tensor(&mut out, StorageRole::Values, self.values.as_ref());
        if let Some(k) = &self.kept {
            out.push(HeldBuffer::tensor(StorageRole::Metadata, k));
        }
        held_tensor(&mut out, StorageRole::Metadata, self.window.as_ref());
        for k in &self.kept_host {
            out.push(HeldBuffer::host(StorageRole::Metadata, k));
        }
        self.slots.held(&mut out);
        out
    }

    fn reset(&mut self) {
        self.slots.reset();
        self.pruned = None;
        self.kept = None;
        self.kept_host = Vec::new();
        self.pruned_len = 0;
        self.full_keys = None;
        self.values = None;
        self.window = None;
        self.pruned_once = false;
    }
}
