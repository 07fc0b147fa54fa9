//! TokenSelect (Wu et al., 2024, arXiv 2411.02886): per-head soft-vote token selection with a
//! selection cache. Every token is kept; a one-token (decode) query scores every candidate
//! token per query head (`q_h · k`), normalises the scores with a softmax per head, sums the
//! probabilities over all heads of the layer (the "soft vote", so that no single head
//! dominates), and attends exactly to the first `sinks` tokens, the last `recent` tokens and
//! the `top_k` candidates with the largest vote, the same tokens for every head of a sequence
//! (pzs19/TokenSelect `patcher/token_retrieval.py::get_topk_tokens`, `retrieval_indices`).
//!
//! # Selection cache
//! Consecutive queries are often alike. Each sequence remembers the query of its last
//! selection (its "fingerprint": every query head's vector, concatenated) and the top-k slots
//! it chose; when the cosine similarity of a new query with that fingerprint is at least
//! `similarity` (default 0.9), the remembered top-k slots are reused without scoring, with the
//! sinks and the recent window taken afresh. The fingerprint is replaced only when a selection
//! is recomputed (as in the reference).
//!
//! # When it selects
//! As the other selection caches of this crate: one-token queries without statistics requests,
//! when `sinks + recent + top_k` is below the tokens the query sees; everything else (prefill,
//! statistics, short contexts, a budget at least the length) is the exact dense path.
//!
//! Scores are raw dot products `q · k` without `1/√d`, as the reference feeds its softmax; the
//! reference's optional max-pooling of the votes (`KERNEL_SIZE`, off by default) and query
//! re-rotation (`QUERY_ROTATE`, off by default) are not implemented.

use burn::prelude::*;
use kv_core::{
    Attended, DenseCache, DenseCacheConfig, HeldBuffer, KvBlock, KvCache, KvShape, KvView, Lengths,
    MemoryReport, Query, StatsRequest, StorageDtype, StorageRole, check_query,
};
use serde::{Deserialize, Serialize};

use crate::budget::{self, Budget};
use crate::select::{attend_selected, bool_tensor, key_positions, visibility};

fn default_sinks() -> usize {
    128
}
fn default_recent() -> usize {
    512
}
fn default_similarity() -> f64 {
    0.9
}

/// Configuration of a [`TokenSelectCache`]. Defaults from TokenSelect's
/// `config/qwen-token-retrieval.yaml`: 128 sink tokens (`n_init`), 512 recent tokens
/// (`n_local`), selection reuse at cosine similarity 0.9; fp32 storage. `top_k` has no default
/// (the reference's is 2048).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSelectConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Tokens selected by soft vote per decode query, besides the sinks and recent tokens.
    pub top_k: Budget,
    /// The first tokens of every sequence, always attended (`n_init`).
    #[serde(default = "default_sinks")]
    pub sinks: usize,
    /// The most recent tokens, always attended (`n_local`).
    #[serde(default = "default_recent")]
    pub recent: usize,
    /// Reuse the last selection when the query's cosine similarity with the last selecting
    /// query is at least this (in `[-1, 1]`; above 1 never reuses).
    #[serde(default = "default_similarity")]
    pub similarity: f64,
    /// Element type of the stored keys and values.
    #[serde(default)]
    pub dtype: StorageDtype,
}

impl TokenSelectConfig {
    /// TokenSelect with `top_k` selected tokens and the defaults above.
    pub fn new(shape: KvShape, top_k: Budget) -> Self {
        TokenSelectConfig {
            shape,
            top_k,
            sinks: default_sinks(),
            recent: default_recent(),
            similarity: default_similarity(),
            dtype: StorageDtype::F32,
        }
    }
    /// Sets the sink and recent windows.
    pub fn with_windows(mut self, sinks: usize, recent: usize) -> Self {
        self.sinks = sinks;
        self.recent = recent;
        self
    }
    /// Sets the reuse threshold.
    pub fn with_similarity(mut self, similarity: f64) -> Self {
        self.similarity = similarity;
        self
    }
    /// Sets the storage dtype.
    pub fn with_dtype(mut self, dtype: StorageDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] =
        &["top_k", "sinks", "recent", "similarity", "dtype"];

    /// A config from `key=value` parameters: `top_k` (required: a token count such as `256` or
    /// a fraction such as `0.1`), `sinks`, `recent` (integers), `similarity` (a number) and
    /// `dtype` (`f32` or `f16`). Validated at [`init`](Self::init).
    ///
    /// # Errors
    /// [`kv_core::KvError::InvalidConfig`] naming the parameter for an unknown name, a value
    /// that does not parse or a missing `top_k`.
    pub fn from_params<'a>(
        shape: KvShape,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        let mut cfg = TokenSelectConfig::new(shape, Budget::Tokens(1));
        let mut top_k = None;
        for (k, v) in params {
            match k {
                "top_k" => top_k = Some(Budget::parse("top_k", v)?),
                "sinks" => cfg.sinks = budget::int("sinks", v)?,
                "recent" => cfg.recent = budget::int("recent", v)?,
                "similarity" => cfg.similarity = budget::float("similarity", v)?,
                "dtype" => cfg.dtype = budget::dtype("dtype", v)?,
                _ => return Err(budget::unknown("TokenSelect", k, Self::PARAMS)),
            }
        }
        cfg.top_k = top_k.ok_or_else(|| budget::missing("top_k", "tokens selected per query"))?;
        Ok(cfg)
    }

    /// Checks the config.
    ///
    /// # Errors
    /// [`kv_core::KvError::InvalidConfig`] for a zero or out-of-range `top_k` and a similarity
    /// that is NaN or below −1.
    pub fn validate(&self) -> kv_core::Result<()> {
        self.top_k.validate("top_k")?;
        if self.similarity.is_nan() || self.similarity < -1.0 {
            return Err(kv_core::KvError::InvalidConfig {
                field: "similarity",
                reason: format!(
                    "{} is not a cosine threshold (at least -1; above 1 disables reuse)",
                    self.similarity
                ),
            });
        }
        Ok(())
    }

    /// Builds the cache.
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn init(&self, device: &Device) -> kv_core::Result<TokenSelectCache> {
        self.validate()?;
        let inner = DenseCacheConfig::new(self.shape)
            .with_dtype(self.dtype)
            .init(device)?;
        Ok(TokenSelectCache {
            config: self.clone(),
            device: device.clone(),
            inner,
            memo: vec![None; self.shape.batch()],
            reused: 0,
            computed: 0,
        })
    }
}

/// One sequence's remembered selection.
#[derive(Debug, Clone, PartialEq)]
struct Memo {
    /// The query that selected, `q_heads * head_dim`.
    fingerprint: Vec<f32>,
    /// The top-k slots it chose (sinks and recent tokens excluded), ascending.
    slots: Vec<u32>,
}

/// One decode query's selection, per sequence.
#[derive(Debug, Clone)]
struct Selection {
    /// Every attended slot, ascending.
    slots: Vec<Vec<usize>>,
    /// The memo to keep (a recomputed selection), or `None` where the memo was reused.
    fresh: Vec<Option<Memo>>,
}

/// A TokenSelect cache for one layer: every token in a [`DenseCache`], plus per sequence the
/// remembered query and top-k slots of the selection cache (host metadata). See the module
/// docs.
#[derive(Debug, Clone)]
pub struct TokenSelectCache {
    config: TokenSelectConfig,
    device: Device,
    inner: DenseCache,
    memo: Vec<Option<Memo>>,
    reused: usize,
    computed: usize,
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

impl TokenSelectCache {
    /// The configuration.
    pub fn config(&self) -> &TokenSelectConfig {
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
    /// Selections reused from the selection cache and selections computed, per sequence,
    /// summed since the cache was built or reset.
    pub fn reuse_counts(&self) -> (usize, usize) {
        (self.reused, self.computed)
    }

    /// The slots a one-token query would attend to per sequence (shared by all its heads,
    /// ascending), the selection cache included, or `None` for the dense path. Does not
    /// change the selection cache (`attend` does).
    ///
    /// # Errors
    /// Shape and finiteness problems of the query.
    pub fn selected_slots(&self, query: &Query) -> kv_core::Result<Option<Vec<Vec<usize>>>> {
        check_query(
            &self.config.shape,
            query,
            "TokenSelectCache::selected_slots",
        )?;
        Ok(self.selection(query).map(|s| s.slots))
    }

    /// The soft votes `Σ_h softmax_h(q_h · k)` of every held slot per sequence (`batch`
    /// rows of `len`), the softmax of each head taken over `candidates` (`batch * len`
    /// booleans; a slot outside them gets vote 0).
    fn votes(&self, q: &Tensor<4>, candidates: Vec<bool>) -> Vec<f32> {
        let s = self.config.shape;
        let len = self.len();
        let (b, kvh, g, d) = (s.batch(), s.kv_heads(), s.group(), s.head_dim());
        let (k, _) = self
            .inner
            .tensors()
            .expect("invariant: a selecting cache holds keys");
        let full = [b, kvh, g, len];
        let scores = q.clone().reshape([b, kvh, g, d]).matmul(k.swap_dims(2, 3));
        let outside = bool_tensor(candidates, [b, 1, 1, len], &self.device)
            .bool_not()
            .expand(full);
        let scores = scores.mask_fill(outside, f32::NEG_INFINITY);
        let m = scores.clone().max_dim(3).clamp_min(f32::MIN);
        let e = (scores - m).exp();
        let p = e.clone() / e.sum_dim(3).clamp_min(f32::MIN_POSITIVE);
        p.sum_dim(2)
            .sum_dim(1)
            .reshape([b * len])
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("invariant: float tensors read back as f32")
    }

    fn selection(&self, query: &Query) -> Option<Selection> {
        if query.len() != 1 || self.is_empty() {
            return None;
        }
        let c = &self.config;
        let s = c.shape;
        let len = self.len();
        let positions = self.inner.flat_positions();
        let (visible, counts) = visibility(&positions, len, query.positions());
        let most = counts.iter().copied().max().unwrap_or(0);
        let top_k = c.top_k.resolve(most);
        if c.sinks + c.recent + top_k >= most {
            return None;
        }
        let b = s.batch();
        let width = s.q_heads() * s.head_dim();
        let q_host = query
            .tensor()
            .to_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("invariant: float tensors read back as f32");
        // Per sequence: forced slots, candidate slots, and whether the memo is reused.
        let mut forced = Vec::with_capacity(b);
        let mut candidates = vec![false; b * len];
        let mut reuse = Vec::with_capacity(b);
        for bi in 0..b {
            let row = &visible[bi * len..(bi + 1) * len];
            let seen: Vec<usize> = (0..len).filter(|&i| row[i]).collect();
            let head = c.sinks.min(seen.len());
            let tail = seen.len().saturating_sub(c.recent).max(head);
            let mut f: Vec<usize> = seen[..head].to_vec();
            f.extend_from_slice(&seen[tail..]);
            for &i in &seen[head..tail] {
                candidates[bi * len + i] = true;
            }
            let fp = &q_host[bi * width..(bi + 1) * width];
            let hit = self.memo[bi]
                .as_ref()
                .is_some_and(|m| cosine(&m.fingerprint, fp) >= c.similarity);
            reuse.push(hit);
            forced.push(f);
        }
        let votes =
            (!reuse.iter().all(|&r| r)).then(|| self.votes(query.tensor(), candidates.clone()));
        let mut slots = Vec::with_capacity(b);
        let mut fresh = Vec::with_capacity(b);
        for bi in 0..b {
            let cand: Vec<usize> = (0..len).filter(|&i| candidates[bi * len + i]).collect();
            let top: Vec<u32> = if reuse[bi] {
                let memo = self.memo[bi]
                    .as_ref()
                    .expect("invariant: reuse needs a memo");
                fresh.push(None);
                memo.slots
                    .iter()
                    .copied()
                    .filter(|&i| candidates[bi * len + i as usize])
                    .collect()
            } else {
                let v = &votes
                    .as_ref()
                    .expect("invariant: votes computed when not reused")[bi * len..(bi + 1) * len];
                let mut order = cand.clone();
                order.sort_by(|&x, &y| v[y].total_cmp(&v[x]).then(x.cmp(&y)));
                order.truncate(top_k);
                let mut top: Vec<u32> = order.into_iter().map(|i| i as u32).collect();
                top.sort_unstable();
                fresh.push(Some(Memo {
                    fingerprint: q_host[bi * width..(bi + 1) * width].to_vec(),
                    slots: top.clone(),
                }));
                top
            };
            let mut all = forced[bi].clone();
            all.extend(top.iter().map(|&i| i as usize));
            all.sort_unstable();
            all.dedup();
            slots.push(all);
        }
        Some(Selection { slots, fresh })
    }

    /// Exact attention over the selected slots, shared by every head of a sequence.
    fn attend_selection(&self, query: &Query, sel: &Selection) -> (Tensor<4>, Tensor<4>) {
        let s = self.config.shape;
        let (b, kvh, g) = (s.batch(), s.kv_heads(), s.group());
        let k = sel.slots.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut idx = Vec::with_capacity(b * k);
        let mut pad = Vec::with_capacity(b * k);
        for row in &sel.slots {
            for j in 0..k {
                idx.push(row.get(j).map_or(0, |&i| i as i32));
                pad.push(j >= row.len());
            }
        }
        let full = [b, kvh, g, k];
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [b * k]), &self.device)
            .reshape([b, 1, 1, k])
            .expand(full);
        let ignore = bool_tensor(pad, [b, 1, 1, k], &self.device).expand(full);
        let (keys, values) = self
            .inner
            .tensors()
            .expect("invariant: a selecting cache holds keys");
        let kp = key_positions(&self.inner.flat_positions(), b, self.len(), &self.device);
        attend_selected(
            query.tensor(),
            query.positions(),
            keys,
            values,
            kp,
            idx,
            Some(ignore),
        )
    }

    /// Selects (remembering fresh selections) and attends; `None` for the dense path.
    fn select_and_attend(&mut self, query: &Query) -> Option<(Tensor<4>, Tensor<4>)> {
        let sel = self.selection(query)?;
        let out = self.attend_selection(query, &sel);
        for (bi, fresh) in sel.fresh.into_iter().enumerate() {
            match fresh {
                Some(m) => {
                    self.memo[bi] = Some(m);
                    self.computed += 1;
                }
                None => self.reused += 1,
            }
        }
        Some(out)
    }
}

impl KvCache for TokenSelectCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        self.inner.append(block)
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        check_query(&self.config.shape, query, "TokenSelectCache::attend")?;
        if !stats.any()
            && let Some((output, _)) = self.select_and_attend(query)
        {
            return Ok(Attended {
                output,
                stats: Default::default(),
            });
        }
        self.inner.attend(query, stats)
    }

    fn attend_lse(&mut self, query: &Query) -> kv_core::Result<(Tensor<4>, Tensor<4>)> {
        check_query(&self.config.shape, query, "TokenSelectCache::attend_lse")?;
        match self.select_and_attend(query) {
            Some(r) => Ok(r),
            None => self.inner.attend_lse(query),
        }
    }

    fn view(&self) -> KvView {
        self.inner.view()
    }

    fn lengths(&self) -> Lengths {
        self.inner.lengths()
    }

    fn memory(&self) -> MemoryReport {
        let mut m = self.inner.memory();
        for memo in self.memo.iter().flatten() {
            m.metadata_bytes += core::mem::size_of_val(memo.fingerprint.as_slice())
                + core::mem::size_of_val(memo.slots.as_slice());
        }
        m
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = self.inner.held_buffers();
        for memo in self.memo.iter().flatten() {
            out.push(HeldBuffer::host(StorageRole::Metadata, &memo.fingerprint));
            out.push(HeldBuffer::host(StorageRole::Metadata, &memo.slots));
        }
        out
    }

    fn reset(&mut self) {
        self.inner.reset();
        self.memo.iter_mut().for_each(|m| *m = None);
        self.reused = 0;
        self.computed = 0;
    }
}
