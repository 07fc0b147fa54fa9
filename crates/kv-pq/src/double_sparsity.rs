//! Double Sparsity (Yang et al., 2024, arXiv 2408.07092): token sparsity chosen with channel
//! sparsity. Every token is kept; a small "label cache" holds, for every key, only `r` of its
//! `head_dim` channels, and a decode query scores every token on those channels
//! (`ŝ = q_C · k_C`), then attends exactly to the best `heavy` tokens plus the most recent
//! ones (andy-yang-1/DoubleSparse `LongBench/modify_llama.py::LlamaAttention_heavy_hitter`).
//!
//! # Deviation: channels from the prefill, not from offline calibration
//! The paper picks the label channels offline per layer and head from calibration activations
//! (`config/<model>.json`, modes `q`, `k`, `qk`). This cache picks them at the end of prefill
//! from the request itself, per (sequence, KV head): the `r` channels with the largest
//! `mean |q_c| · mean |k_c|` over the prefill queries it attended and its held keys (the
//! `qk` mode's magnitude statistic; keys alone when no query was seen). This needs no
//! calibration run and adapts per request, but it is not the paper's offline outlier list.
//! The label cache is kept in the storage dtype (the paper optionally quantizes it to
//! `label_bits`; not done here).
//!
//! # When it selects
//! As [`PqCache`](crate::PqCache): one-token queries after the channels are chosen, without
//! statistics requests, and only when `sinks + recent + heavy` is below the tokens the query
//! sees; everything else is the exact dense path.

use burn::prelude::*;
use kv_core::{
    Attended, DenseCache, DenseCacheConfig, HeldBuffer, KvBlock, KvCache, KvError, KvShape, KvView,
    Lengths, MemoryReport, Query, StatsRequest, StorageDtype, StorageRole, check_query,
};
use serde::{Deserialize, Serialize};

use crate::budget::{self, Budget};
use crate::quest::dtype_of;
use crate::select::{attend_selected, key_positions};

fn default_group_factor() -> usize {
    8
}
fn default_recent() -> usize {
    1
}

/// Configuration of a [`DoubleSparsityCache`]. Defaults: `group_factor` 8 (`r = head_dim / 8`
/// label channels, DoubleSparse's `convert_kvcache_llama_heavy_recent` default), no sinks, one
/// recent token (the current one), fp32 storage. `heavy` has no default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoubleSparsityConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Tokens retrieved by label score per decode query (DoubleSparse's `heavy_const`),
    /// besides the sinks and recent tokens.
    pub heavy: Budget,
    /// `head_dim / group_factor` label channels (must divide `head_dim`).
    #[serde(default = "default_group_factor")]
    pub group_factor: usize,
    /// The first tokens of every sequence, always attended.
    #[serde(default)]
    pub sinks: usize,
    /// The most recent tokens, always attended.
    #[serde(default = "default_recent")]
    pub recent: usize,
    /// Element type of the stored keys, values and labels.
    #[serde(default)]
    pub dtype: StorageDtype,
}

impl DoubleSparsityConfig {
    /// Double Sparsity with `heavy` retrieved tokens and the defaults above.
    pub fn new(shape: KvShape, heavy: Budget) -> Self {
        DoubleSparsityConfig {
            shape,
            heavy,
            group_factor: default_group_factor(),
            sinks: 0,
            recent: default_recent(),
            dtype: StorageDtype::F32,
        }
    }
    /// Sets the group factor (`head_dim / group_factor` label channels).
    pub fn with_group_factor(mut self, group_factor: usize) -> Self {
        self.group_factor = group_factor;
        self
    }
    /// Sets the sink and recent windows.
    pub fn with_windows(mut self, sinks: usize, recent: usize) -> Self {
        self.sinks = sinks;
        self.recent = recent;
        self
    }
    /// Sets the storage dtype.
    pub fn with_dtype(mut self, dtype: StorageDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] =
        &["heavy", "group_factor", "sinks", "recent", "dtype"];

    /// A config from `key=value` parameters: `heavy` (required: a token count such as `256` or
    /// a fraction such as `0.1`), `group_factor`, `sinks`, `recent` (integers) and `dtype`
    /// (`f32` or `f16`). The result is not validated until [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the parameter for an unknown name, a value that does
    /// not parse or a missing `heavy`.
    pub fn from_params<'a>(
        shape: KvShape,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        let mut cfg = DoubleSparsityConfig::new(shape, Budget::Tokens(1));
        let mut heavy = None;
        for (k, v) in params {
            match k {
                "heavy" => heavy = Some(Budget::parse("heavy", v)?),
                "group_factor" => cfg.group_factor = budget::int("group_factor", v)?,
                "sinks" => cfg.sinks = budget::int("sinks", v)?,
                "recent" => cfg.recent = budget::int("recent", v)?,
                "dtype" => cfg.dtype = budget::dtype("dtype", v)?,
                _ => return Err(budget::unknown("Double Sparsity", k, Self::PARAMS)),
            }
        }
        cfg.heavy = heavy.ok_or_else(|| budget::missing("heavy", "tokens retrieved per query"))?;
        Ok(cfg)
    }

    /// Label channels `r = head_dim / group_factor`.
    pub fn label_channels(&self) -> usize {
        self.shape.head_dim() / self.group_factor.max(1)
    }

    /// Checks the config.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a group factor that does not divide `head_dim` and a zero
    /// or out-of-range `heavy`.
    pub fn validate(&self) -> kv_core::Result<()> {
        let d = self.shape.head_dim();
        if self.group_factor == 0 || !d.is_multiple_of(self.group_factor) {
            return Err(KvError::InvalidConfig {
                field: "group_factor",
                reason: format!(
                    "{} does not divide head_dim {d} into label channels",
                    self.group_factor
                ),
            });
        }
        self.heavy.validate("heavy")
    }

    /// Builds the cache.
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn init(&self, device: &Device) -> kv_core::Result<DoubleSparsityCache> {
        self.validate()?;
        let inner = DenseCacheConfig::new(self.shape)
            .with_dtype(self.dtype)
            .init(device)?;
        Ok(DoubleSparsityCache {
            config: self.clone(),
            device: device.clone(),
            inner,
            query_abs: None,
            channels: None,
            labels: None,
        })
    }
}

/// A Double Sparsity cache for one layer: every token in a [`DenseCache`], plus, once the
/// prefill ends, the chosen channels per (sequence, KV head) and every key's values on them
/// (the label cache, counted as key bytes; the channel lists are metadata). See the module
/// docs.
#[derive(Debug, Clone)]
pub struct DoubleSparsityCache {
    config: DoubleSparsityConfig,
    device: Device,
    inner: DenseCache,
    /// Σ |q| per (sequence, KV head, channel) over the prefill queries, `[batch, kv_heads, d]`.
    query_abs: Option<Tensor<3>>,
    /// `[batch, kv_heads, 1, r]` channel indices.
    channels: Option<Tensor<4, Int>>,
    /// `[batch, kv_heads, len, r]` in the storage dtype.
    labels: Option<Tensor<4>>,
}

impl DoubleSparsityCache {
    /// The configuration.
    pub fn config(&self) -> &DoubleSparsityConfig {
        &self.config
    }
    /// Slots held per sequence (padding included).
    pub fn len(&self) -> usize {
        self.inner.len()
    }
    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
    /// The label channels per (sequence, KV head), ascending, once chosen (`batch * kv_heads`
    /// lists).
    pub fn channels(&self) -> Option<Vec<Vec<usize>>> {
        let c = self.channels.as_ref()?;
        let r = c.dims()[3];
        let v = c
            .to_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .expect("invariant: int tensors read back as i64");
        Some(
            v.chunks(r)
                .map(|row| {
                    let mut row: Vec<usize> = row.iter().map(|&x| x as usize).collect();
                    row.sort_unstable();
                    row
                })
                .collect(),
        )
    }

    /// The slots a one-token query attends to, per sequence and query head (`batch * q_heads`
    /// lists, ascending), or `None` for the dense path.
    ///
    /// # Errors
    /// Shape and finiteness problems of the query.
    pub fn selected_slots(&self, query: &Query) -> kv_core::Result<Option<Vec<Vec<usize>>>> {
        check_query(
            &self.config.shape,
            query,
            "DoubleSparsityCache::selected_slots",
        )?;
        Ok(self
            .selection(query)
            .map(|idx| crate::select::read_selection(idx, None)))
    }

    /// Label scores `q_C · k_C` of every held token, `[batch, q_heads, q_len, len]`, once the
    /// channels are chosen.
    ///
    /// # Errors
    /// Shape and finiteness problems of the query.
    pub fn label_scores(&self, query: &Query) -> kv_core::Result<Option<Tensor<4>>> {
        check_query(
            &self.config.shape,
            query,
            "DoubleSparsityCache::label_scores",
        )?;
        Ok(self.scores(query.tensor()))
    }

    fn scores(&self, q: &Tensor<4>) -> Option<Tensor<4>> {
        let (ch, labels) = (self.channels.clone()?, self.labels.clone()?);
        let s = self.config.shape;
        let [b, qh, n, d] = q.dims();
        let (kvh, rows) = (s.kv_heads(), s.group() * n);
        let r = ch.dims()[3];
        let qc = q
            .clone()
            .reshape([b, kvh, rows, d])
            .gather(3, ch.expand([b, kvh, rows, r]));
        let sc = qc.matmul(labels.cast(burn::tensor::FloatDType::F32).swap_dims(2, 3));
        Some(sc.reshape([b, qh, n, self.len()]))
    }

    fn selection(&self, query: &Query) -> Option<Tensor<4, Int>> {
        if query.len() != 1 || self.channels.is_none() || self.is_empty() {
            return None;
        }
        let c = &self.config;
        crate::select::top_tokens(
            c.shape,
            &self.inner.flat_positions(),
            self.len(),
            query.positions(),
            c.sinks,
            c.recent,
            |most| c.sinks + c.recent + c.heavy.resolve(most),
            || {
                self.scores(query.tensor())
                    .expect("invariant: a ready cache scores")
            },
            &self.device,
        )
    }

    fn attend_selected(&self, query: &Query) -> Option<(Tensor<4>, Tensor<4>)> {
        let idx = self.selection(query)?;
        let (k, v) = self.inner.tensors()?;
        let s = self.config.shape;
        let kp = key_positions(
            &self.inner.flat_positions(),
            s.batch(),
            self.len(),
            &self.device,
        );
        Some(attend_selected(
            query.tensor(),
            query.positions(),
            k,
            v,
            kp,
            idx,
            None,
        ))
    }

    /// Labels of the held keys from slot `from` on, `[batch, kv_heads, len - from, r]`.
    fn labels_from(&self, channels: &Tensor<4, Int>, from: usize) -> Option<Tensor<4>> {
        let (k, _) = self.inner.tensors()?;
        let s = self.config.shape;
        let len = self.len();
        let r = channels.dims()[3];
        let k = k.slice([0..s.batch(), 0..s.kv_heads(), from..len, 0..s.head_dim()]);
        Some(
            k.gather(
                3,
                channels
                    .clone()
                    .expand([s.batch(), s.kv_heads(), len - from, r]),
            )
            .cast(dtype_of(self.config.dtype)),
        )
    }

    /// Records `Σ |q|` per (sequence, KV head, channel) of a prefill query.
    fn record_query(&mut self, q: &Tensor<4>) {
        let s = self.config.shape;
        let [b, _, n, d] = q.dims();
        let a = q
            .clone()
            .abs()
            .reshape([b, s.kv_heads(), s.group() * n, d])
            .sum_dim(2)
            .reshape([b, s.kv_heads(), d]);
        self.query_abs = Some(match self.query_abs.take() {
            Some(old) => old + a,
            None => a,
        });
    }
}

impl KvCache for DoubleSparsityCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        let old_len = self.inner.len();
        self.inner.append(block)?;
        if let Some(ch) = &self.channels {
            let new = self
                .labels_from(ch, old_len)
                .expect("invariant: a cache that just appended holds keys");
            self.labels = Some(match self.labels.take() {
                Some(old) => Tensor::cat(vec![old, new], 2),
                None => new,
            });
        }
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        check_query(&self.config.shape, query, "DoubleSparsityCache::attend")?;
        if self.channels.is_none() {
            self.record_query(query.tensor());
        } else if !stats.any()
            && let Some((out, _)) = self.attend_selected(query)
        {
            return Ok(Attended {
                output: out,
                stats: Default::default(),
            });
        }
        self.inner.attend(query, stats)
    }

    fn attend_lse(&mut self, query: &Query) -> kv_core::Result<(Tensor<4>, Tensor<4>)> {
        check_query(&self.config.shape, query, "DoubleSparsityCache::attend_lse")?;
        if self.channels.is_none() {
            self.record_query(query.tensor());
        } else if let Some(r) = self.attend_selected(query) {
            return Ok(r);
        }
        self.inner.attend_lse(query)
    }

    /// Chooses the label channels from the prefill's query and key magnitudes and builds the
    /// label cache (once; later calls do nothing). The query statistics are dropped.
    fn end_prefill(&mut self) -> kv_core::Result<()> {
        if self.channels.is_some() {
            return Ok(());
        }
        let Some((k, _)) = self.inner.tensors() else {
            return Ok(());
        };
        let s = self.config.shape;
        let (b, kvh, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let mut importance = k.abs().sum_dim(2).reshape([b, kvh, d]);
        if let Some(q) = self.query_abs.take() {
            importance = importance * q;
        }
        let r = self.config.label_channels();
        let (_, ch) = importance.topk_with_indices(r, 2);
        let ch = ch.reshape([b, kvh, 1, r]);
        self.labels = self.labels_from(&ch, 0);
        self.channels = Some(ch);
        Ok(())
    }

    fn view(&self) -> KvView {
        self.inner.view()
    }

    fn lengths(&self) -> Lengths {
        self.inner.lengths()
    }

    fn memory(&self) -> MemoryReport {
        let bytes = |n: usize, size: usize| n * size;
        let mut m = self.inner.memory();
        if let Some(l) = &self.labels {
            m.key_bytes += bytes(l.shape().num_elements(), l.dtype().size());
        }
        if let Some(c) = &self.channels {
            m.metadata_bytes += bytes(c.shape().num_elements(), c.dtype().size());
        }
        if let Some(q) = &self.query_abs {
            m.metadata_bytes += bytes(q.shape().num_elements(), q.dtype().size());
        }
        m
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = self.inner.held_buffers();
        if let Some(l) = &self.labels {
            out.push(HeldBuffer::tensor(StorageRole::Keys, l));
        }
        if let Some(c) = &self.channels {
            out.push(HeldBuffer::tensor(StorageRole::Metadata, c));
        }
        if let Some(q) = &self.query_abs {
            out.push(HeldBuffer::tensor(StorageRole::Metadata, q));
        }
        out
    }

    fn reset(&mut self) {
        self.inner.reset();
        self.query_abs = None;
        self.channels = None;
        self.labels = None;
    }
}
