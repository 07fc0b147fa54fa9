//! [`EvictingCache`]: ragged storage that records what its scorer needs during prefill and
//! evicts once, in [`end_prefill`](KvCache::end_prefill).

use burn::prelude::*;
use kv_core::{
    Attended, HeldBuffer, KvBlock, KvCache, KvError, KvShape, KvView, Lengths, MemoryReport, PAD,
    Query, RaggedCache, RaggedCacheConfig, Result, Rope, RopeConfig, StatsRequest, StorageDtype,
    StorageRole,
};
use serde::{Deserialize, Serialize};

use crate::budget::{BudgetAllocator, BudgetContext, BudgetKind, CoverageBudget, check_ratio};
use crate::headkv::{HeadImportance, HeadKvBudget};
use crate::score::{self, QueryMoments, to_host};
use crate::scorer::ScorerConfig;
use crate::select::keep_lists;

/// Configuration of an [`EvictingCache`] (one layer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvictConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Fraction of the prompt's tokens removed per KV head, in `[0, 1)` (kvpress's
    /// `compression_ratio`).
    pub ratio: f64,
    /// Which tokens matter.
    pub scorer: ScorerConfig,
    /// How many tokens each layer and head keeps (default uniform).
    #[serde(default)]
    pub budget: BudgetKind,
    /// Element type of the stored keys and values (default fp32).
    #[serde(default)]
    pub dtype: StorageDtype,
    /// The model's RoPE: required by `expected_attention`, which un-rotates the queries.
    #[serde(default)]
    pub rope: Option<RopeConfig>,
    /// Layer index (for layer-wise allocators).
    #[serde(default)]
    pub layer: usize,
    /// Number of layers of the model.
    #[serde(default = "one")]
    pub num_layers: usize,
    /// Keep the scores of the last compression for inspection ([`EvictingCache::last_scores`]);
    /// they are counted as held metadata.
    #[serde(default)]
    pub keep_scores: bool,
    /// Periodic compression while decoding (kvpress's `DecodingPress`); `None` (the default):
    /// decode tokens are kept uncompressed.
    #[serde(default)]
    pub decode: Option<DecodeCompression>,
    /// Per-head importance of the model, required by [`BudgetKind::HeadKv`] (the calibration
    /// artefact, checked against `shape` and `num_layers` at `init`).
    #[serde(default)]
    pub head_importance: Option<HeadImportance>,
    /// Leading tokens of every stream kept whatever the scorer says (attention sinks), inside
    /// the budget (default 0: kvpress's selection).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sinks: usize,
    /// Most recent tokens of every stream kept whatever the scorer says, inside the budget
    /// (default 0: kvpress's selection).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recent: usize,
}

fn one() -> usize {
    1
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Periodic decode-time compression (kvpress `DecodingPress`, for long generations): every
/// `every` decode steps the scorer runs again over everything held, from the queries attended
/// since the previous compression (the observation window of the most recent queries), and
/// every stream keeps its best `target` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeCompression {
    /// Decode steps (attention calls after `end_prefill`) between compressions
    /// (`compression_interval`, kvpress default 512).
    pub every: usize,
    /// Tokens per (sequence, KV head) kept by each compression (`target_size`, kvpress
    /// default 2048).
    pub target: usize,
}

impl DecodeCompression {
    /// Parameter names accepted by [`DecodeCompression::from_params`].
    pub const PARAMS: &'static [&'static str] = &["decode_every", "decode_target"];

    /// `decode_every` and `decode_target` from `key=value` parameters; other keys are ignored
    /// (they belong to the scorer). `None` when `decode_every` is absent; `decode_target`
    /// defaults to kvpress's 2048.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a malformed value, or `decode_target` without
    /// `decode_every`.
    pub fn from_params<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Option<Self>> {
        let (mut every, mut target) = (None, None);
        for (k, v) in params {
            match k {
                "decode_every" => every = Some(crate::scorer::parse("decode_every", v)?),
                "decode_target" => target = Some(crate::scorer::parse("decode_target", v)?),
                _ => {}
            }
        }
        match (every, target) {
            (Some(every), target) => Ok(Some(DecodeCompression {
                every,
                target: target.unwrap_or(2048),
            })),
            (None, Some(_)) => Err(KvError::InvalidConfig {
                field: "decode_target",
                reason: "given without decode_every".into(),
            }),
            (None, None) => Ok(None),
        }
    }
}

impl EvictConfig {
    /// Parameter names of the protection ([`EvictConfig::sinks`], [`EvictConfig::recent`]),
    /// accepted by every selection method of the registry.
    pub const PROTECT_PARAMS: &'static [&'static str] = &["sinks", "recent"];

    /// A single-layer config with fp32 storage, a uniform budget and no RoPE.
    pub fn new(shape: KvShape, ratio: f64, scorer: ScorerConfig) -> Self {
        EvictConfig {
            shape,
            ratio,
            scorer,
            budget: BudgetKind::Uniform,
            dtype: StorageDtype::F32,
            rope: None,
            layer: 0,
            num_layers: 1,
            keep_scores: false,
            decode: None,
            head_importance: None,
            sinks: 0,
            recent: 0,
        }
    }
    /// Protects the first `sinks` and the last `recent` tokens of every stream: they are kept
    /// before the rest is chosen by score, inside the same budget.
    pub fn with_protected(mut self, sinks: usize, recent: usize) -> Self {
        self.sinks = sinks;
        self.recent = recent;
        self
    }
    /// Sets the model's RoPE.
    pub fn with_rope(mut self, rope: RopeConfig) -> Self {
        self.rope = Some(rope);
        self
    }
    /// Sets the layer index and the number of layers.
    pub fn with_layer(mut self, layer: usize, num_layers: usize) -> Self {
        self.layer = layer;
        self.num_layers = num_layers;
        self
    }
    /// Sets the budget allocation (PyramidKV layer budgets, Ada-KV head budgets).
    pub fn with_budget(mut self, budget: BudgetKind) -> Self {
        self.budget = budget;
        self
    }
    /// Sets the storage dtype.
    pub fn with_dtype(mut self, dtype: StorageDtype) -> Self {
        self.dtype = dtype;
        self
    }
    /// Keeps the scores of the last compression.
    pub fn with_kept_scores(mut self) -> Self {
        self.keep_scores = true;
        self
    }
    /// Sets the head-importance artefact (for [`BudgetKind::HeadKv`]).
    pub fn with_head_importance(mut self, importance: HeadImportance) -> Self {
        self.head_importance = Some(importance);
        self
    }
    /// Compresses again every `every` decode steps down to `target` tokens per stream.
    pub fn with_decode_compression(mut self, every: usize, target: usize) -> Self {
        self.decode = Some(DecodeCompression { every, target });
        self
    }

    /// Validates the config and builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`]: a ratio outside `[0, 1)`, bad scorer or budget parameters,
    /// a layer index not below `num_layers`, a missing or mismatched RoPE for
    /// `expected_attention`, a decode compression that cannot work (see
    /// [`DecodeCompression`]: `every` and `target` at least 1, `every` at least the scorer's
    /// window, `target` above the scorer's minimum prompt and at least `sinks + recent`, a
    /// budget that leaves every head of a sequence the same length, a scorer other than
    /// `observed_attention`). A budget smaller than `sinks + recent` is only known at
    /// `end_prefill`, which then fails with `InvalidConfig` and leaves the cache unchanged.
    pub fn init(&self, device: &Device) -> Result<EvictingCache> {
        check_ratio(self.ratio)?;
        self.scorer.validate()?;
        if self.layer >= self.num_layers {
            return Err(KvError::InvalidConfig {
                field: "layer",
                reason: format!(
                    "layer {} is not below num_layers {}",
                    self.layer, self.num_layers
                ),
            });
        }
        let rope = match &self.rope {
            Some(r) => {
                if r.head_dim != self.shape.head_dim() {
                    return Err(KvError::InvalidConfig {
                        field: "rope",
                        reason: format!(
                            "RoPE head_dim {} differs from the cache's {}",
                            r.head_dim,
                            self.shape.head_dim()
                        ),
                    });
                }
                Some(r.init()?)
            }
            None => None,
        };
        if self.scorer.needs().query_moments.is_some() && rope.is_none() {
            return Err(KvError::InvalidConfig {
                field: "rope",
                reason: format!(
                    "`{}` needs the model's RoPE to un-rotate the queries",
                    self.scorer.name()
                ),
            });
        }
        if let Some(dc) = self.decode {
            self.check_decode(dc)?;
        }
        let allocator: Box<dyn BudgetAllocator> = match self.budget {
            BudgetKind::HeadKv { beta, temp } => {
                let imp = self
                    .head_importance
                    .as_ref()
                    .ok_or(KvError::InvalidConfig {
                        field: "head_importance",
                        reason: "the headkv budget needs the model's head-importance artefact"
                            .into(),
                    })?;
                imp.check_model(self.num_layers, &self.shape)?;
                Box::new(HeadKvBudget::new(
                    imp,
                    self.layer,
                    self.ratio,
                    self.scorer.needs().window,
                    beta,
                    temp,
                )?)
            }
            BudgetKind::Coverage { mass } => {
                // The protected tokens are pinned: kept, and left out of the score mass.
                let c = CoverageBudget::for_scorer(mass, &self.scorer)?;
                let (front, back) = (c.pinned_front, c.pinned_back);
                Box::new(c.with_pinned(front.max(self.sinks), back.max(self.recent)))
            }
            other => other.allocator_for(self.ratio, &self.scorer)?,
        };
        let inner = RaggedCacheConfig::new(self.shape)
            .with_dtype(self.dtype)
            .init(device)?;
        Ok(EvictingCache {
            config: self.clone(),
            allocator,
            rope,
            inner,
            compressed: false,
            obs: Observations::default(),
            scores: Vec::new(),
            outcome: None,
            last_seen: vec![None; self.shape.batch()],
            decode_steps: 0,
            decode_compressions: 0,
        })
    }

    fn check_decode(&self, dc: DecodeCompression) -> Result<()> {
        let needs = self.scorer.needs();
        let bad =
            |field: &'static str, reason: String| Err(KvError::InvalidConfig { field, reason });
        if dc.every == 0 {
            return bad("decode_every", "must be at least 1 decode step".into());
        }
        if dc.target == 0 {
            return bad("decode_target", "must keep at least 1 token".into());
        }
        if dc.target < self.sinks + self.recent {
            return bad(
                "decode_target",
                format!(
                    "{} tokens cannot hold the protected sinks {} + recent {}",
                    dc.target, self.sinks, self.recent
                ),
            );
        }
        if dc.every < needs.window {
            return bad(
                "decode_every",
                format!(
                    "{} steps would not refill `{}`'s window of {} queries between compressions",
                    dc.every,
                    self.scorer.name(),
                    needs.window
                ),
            );
        }
        if dc.target <= needs.min_prompt {
            return bad(
                "decode_target",
                format!(
                    "`{}` needs more than {} held tokens to score; target {} is too small",
                    self.scorer.name(),
                    needs.min_prompt,
                    dc.target
                ),
            );
        }
        if needs.column_sums {
            return bad(
                "decode_every",
                format!(
                    "`{}` scores by the attention of every query since position 0; it cannot \
                     rescore a decoded cache",
                    self.scorer.name()
                ),
            );
        }
        if matches!(
            self.budget,
            BudgetKind::AdaKv { .. } | BudgetKind::Coverage { .. } | BudgetKind::HeadKv { .. }
        ) {
            return bad(
                "decode_every",
                format!(
                    "the `{}` budget leaves the heads of a sequence with different lengths; \
                     decode compression rescores whole sequences (use uniform or pyramid)",
                    self.budget.name()
                ),
            );
        }
        Ok(())
    }
}

/// What the last [`end_prefill`](KvCache::end_prefill) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvictOutcome {
    /// Tokens were scored and evicted.
    Compressed {
        /// Tokens held (summed over sequences and KV heads) before.
        before: usize,
        /// Tokens held after.
        after: usize,
    },
    /// Nothing was evicted, and why (a zero ratio, or a scorer that needs queries when no
    /// query was attended during prefill: the cache was used as storage only).
    Skipped {
        /// Why.
        reason: &'static str,
    },
}

/// Running mean and scatter of pre-RoPE queries of one sequence (Chan et al.'s merge).
#[derive(Debug, Clone)]
struct Moments {
    count: usize,
    /// `[1, q_heads, head_dim]`.
    mean: Tensor<3>,
    /// `[1, q_heads, head_dim, head_dim]`: Σ (q - mean)(q - mean)ᵀ.
    scatter: Option<Tensor<4>>,
}

/// What the cache recorded during prefill.
#[derive(Debug, Clone, Default)]
struct Observations {
    /// Per sequence, its last (at most `window`) non-padding queries, `[1, q_heads, w,
    /// head_dim]`, and their positions.
    window: Vec<Option<(Tensor<4>, Vec<u32>)>>,
    /// Column sums of the prefill attention, `[batch, kv_heads, group, width]`.
    col_sums: Option<Tensor<4>>,
    /// Query moments per sequence.
    moments: Vec<Option<Moments>>,
    /// Whether any query was attended.
    any_query: bool,
}

impl Observations {
    fn buffers(&self) -> Vec<HeldBuffer> {
        let mut out = Vec::new();
        for (q, pos) in self.window.iter().flatten() {
            out.push(HeldBuffer::tensor(StorageRole::Metadata, q));
            out.push(HeldBuffer::host(StorageRole::Metadata, pos));
        }
        if let Some(c) = &self.col_sums {
            out.push(HeldBuffer::tensor(StorageRole::Metadata, c));
        }
        for m in self.moments.iter().flatten() {
            out.push(HeldBuffer::tensor(StorageRole::Metadata, &m.mean));
            if let Some(s) = &m.scatter {
                out.push(HeldBuffer::tensor(StorageRole::Metadata, s));
            }
        }
        out
    }
}

/// A KV cache that evicts tokens once, at the end of prefill, by a kvpress scorer.
///
/// Storage is a [`RaggedCache`]: every (sequence, KV head) keeps its own tokens and evicted
/// rows are gathered away (freed, not masked). During prefill the cache records what its
/// scorer needs from the [`attend`](KvCache::attend) calls the model makes anyway: the last
/// `window` post-RoPE queries (SnapKV, TOVA: the observation-window attention is recomputed
/// from them against the full prompt keys at the end of prefill, which is what kvpress's
/// `compute_window_attention` does), the attention column sums (ObservedAttention) or the
/// running mean and covariance of the un-rotated queries (ExpectedAttention). The first
/// [`end_prefill`](KvCache::end_prefill) scores every prompt token, lets the budget allocator
/// decide how many each stream keeps, keeps the top-scored ones and drops the records; tokens
/// appended afterwards are kept uncompressed (kvpress's protocol). A later `end_prefill`
/// does nothing until [`reset`](KvCache::reset).
#[derive(Debug)]
pub struct EvictingCache {
    config: EvictConfig,
    allocator: Box<dyn BudgetAllocator>,
    rope: Option<Rope>,
    inner: RaggedCache,
    compressed: bool,
    obs: Observations,
    scores: Vec<Vec<f32>>,
    outcome: Option<EvictOutcome>,
    /// The last position appended per sequence (compression may drop it).
    last_seen: Vec<Option<u32>>,
    /// Decode attention calls since `end_prefill` or the last decode compression.
    decode_steps: usize,
    /// Decode compressions run so far.
    decode_compressions: usize,
}

impl EvictingCache {
    /// The configuration.
    pub fn config(&self) -> &EvictConfig {
        &self.config
    }

    /// The underlying ragged storage.
    pub fn storage(&self) -> &RaggedCache {
        &self.inner
    }

    /// Whether the prompt has been compressed (prefill is over).
    pub fn is_compressed(&self) -> bool {
        self.compressed
    }

    /// What the last `end_prefill` did (`None` before it).
    pub fn last_outcome(&self) -> Option<&EvictOutcome> {
        self.outcome.as_ref()
    }

    /// The scores of the last compression, one list per (sequence, KV head) over the prompt's
    /// tokens (empty unless [`EvictConfig::keep_scores`]).
    pub fn last_scores(&self) -> &[Vec<f32>] {
        &self.scores
    }

    /// Decode-time compressions run since the last [`reset`](KvCache::reset).
    pub fn decode_compressions(&self) -> usize {
        self.decode_compressions
    }

    /// Decode steps counted towards the next decode-time compression.
    pub fn decode_steps(&self) -> usize {
        self.decode_steps
    }

    /// Runs a decode-time compression now: rescores everything held from the queries recorded
    /// since the previous compression and keeps `target` tokens per stream. Returns whether
    /// anything was evicted.
    fn compress_decoded(&mut self, target: usize) -> Result<bool> {
        let held = self.inner.lengths().held;
        if held.iter().all(|&n| n <= target) {
            self.obs = Observations::default();
            return Ok(false);
        }
        let Some(scores) = self.compute_scores(&held, Some(target))? else {
            return Ok(false);
        };
        let budgets: Vec<usize> = held.iter().map(|&n| n.min(target)).collect();
        let ranked = self.protect(&scores);
        self.check_protected(&held, &budgets)?;
        let keep = keep_lists(ranked.as_ref().unwrap_or(&scores), &budgets);
        self.inner.retain(&keep)?;
        if self.config.keep_scores {
            self.scores = scores;
        }
        self.obs = Observations::default();
        self.decode_compressions += 1;
        Ok(true)
    }

    /// The scores with the protected tokens of every stream (the first `sinks`, the last
    /// `recent`) raised to `+inf`, so that allocators count them as kept and every top-k keeps
    /// them; `None` when nothing is protected (the scores are used as they are).
    fn protect(&self, scores: &[Vec<f32>]) -> Option<Vec<Vec<f32>>> {
        let (sinks, recent) = (self.config.sinks, self.config.recent);
        if sinks == 0 && recent == 0 {
            return None;
        }
        Some(
            scores
                .iter()
                .map(|s| {
                    let n = s.len();
                    let mut s = s.clone();
                    s[..sinks.min(n)].fill(f32::INFINITY);
                    s[n - recent.min(n)..].fill(f32::INFINITY);
                    s
                })
                .collect(),
        )
    }

    /// Checks that every stream's budget holds its protected tokens.
    fn check_protected(&self, held: &[usize], budgets: &[usize]) -> Result<()> {
        let (sinks, recent) = (self.config.sinks, self.config.recent);
        let kvh = self.config.shape.kv_heads();
        for (s, (&n, &b)) in held.iter().zip(budgets).enumerate() {
            let protected = (sinks + recent).min(n);
            if b < protected {
                return Err(KvError::InvalidConfig {
                    field: if recent > 0 { "recent" } else { "sinks" },
                    reason: format!(
                        "sequence {}, KV head {}: a budget of {b} of its {n} tokens is smaller \
                         than the protected sinks {sinks} + recent {recent}",
                        s / kvh,
                        s % kvh
                    ),
                });
            }
        }
        Ok(())
    }

    fn record(&mut self, query: &Query, col_sums: Option<Tensor<4>>) {
        self.obs.any_query = true;
        let needs = self.config.scorer.needs();
        let s = self.config.shape;
        let [b, qh, n, d] = query.tensor().dims();
        if needs.window > 0 {
            // Per sequence, its own last `window` real queries (padding slots skipped), so that
            // a sequence of a padded batch is scored as it would be alone.
            let w = needs.window;
            if self.obs.window.len() != b {
                self.obs.window = vec![None; b];
            }
            for bi in 0..b {
                let row = &query.positions()[bi * n..(bi + 1) * n];
                let rows: Vec<usize> = (0..n).filter(|&i| row[i] != PAD).collect();
                let rows = &rows[rows.len().saturating_sub(w)..];
                let (Some(&first), Some(&last)) = (rows.first(), rows.last()) else {
                    continue;
                };
                let q = query.tensor().clone();
                let q = if last + 1 - first == rows.len() {
                    q.slice([bi..bi + 1, 0..qh, first..last + 1, 0..d])
                } else {
                    let ids: Vec<i32> = rows.iter().map(|&i| i as i32).collect();
                    let ids = Tensor::<1, Int>::from_data(
                        TensorData::new(ids, [rows.len()]),
                        self.inner.device(),
                    );
                    q.slice([bi..bi + 1, 0..qh, 0..n, 0..d]).select(2, ids)
                };
                let pos: Vec<u32> = rows.iter().map(|&i| row[i]).collect();
                let (q, mut pos) = match self.obs.window[bi].take() {
                    Some((old, mut old_pos)) => {
                        old_pos.extend(pos);
                        (Tensor::cat(vec![old, q], 2), old_pos)
                    }
                    None => (q, pos),
                };
                let m = pos.len();
                let q = if m > w {
                    pos.drain(..m - w);
                    q.slice([0..1, 0..qh, m - w..m, 0..d])
                } else {
                    q
                };
                self.obs.window[bi] = Some((q, pos));
            }
        }
        if let Some(c) = col_sums {
            self.obs.col_sums = Some(match self.obs.col_sums.take() {
                None => c,
                Some(acc) => add_padded(acc, c),
            });
        }
        if let (Some(n_sink), Some(rope)) = (needs.query_moments, &self.rope) {
            if self.obs.moments.len() != s.batch() {
                self.obs.moments = vec![None; s.batch()];
            }
            let device = self.inner.device().clone();
            for bi in 0..b {
                let row = &query.positions()[bi * n..(bi + 1) * n];
                let rows: Vec<usize> = (0..n)
                    .filter(|&i| row[i] != PAD && row[i] as usize >= n_sink)
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                let m = rows.len();
                let mut q = query
                    .tensor()
                    .clone()
                    .slice([bi..bi + 1, 0..qh, 0..n, 0..d]);
                if m < n {
                    let ids: Vec<i32> = rows.iter().map(|&i| i as i32).collect();
                    let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [m]), &device);
                    q = q.select(2, ids);
                }
                let pos: Vec<u32> = rows.iter().map(|&i| row[i]).collect();
                let q = rope.unapply(q, &pos);
                let mean = q.clone().mean_dim(2); // [1, qh, 1, d]
                let scatter = needs.covariance.then(|| {
                    let c = q - mean.clone();
                    c.clone().swap_dims(2, 3).matmul(c)
                });
                let chunk = Moments {
                    count: m,
                    mean: mean.reshape([1, qh, d]),
                    scatter,
                };
                let merged = match self.obs.moments[bi].take() {
                    None => chunk,
                    Some(acc) => merge_moments(acc, chunk),
                };
                self.obs.moments[bi] = Some(merged);
            }
        }
    }

    /// Scores every stream; `Ok(None)` when the scorer needs queries and none were seen.
    /// `target` is the number of tokens kept per stream when known (decode compression), else
    /// the ratio's `floor(n (1 - ratio))` (StreamingLLM's scores depend on it).
    fn compute_scores(
        &mut self,
        held: &[usize],
        target: Option<usize>,
    ) -> Result<Option<Vec<Vec<f32>>>> {
        const OP: &str = "EvictingCache::end_prefill";
        let s = self.config.shape;
        let (kvh, g, d) = (s.kv_heads(), s.group(), s.head_dim());
        let needs = self.config.scorer.needs();
        let device = self.inner.device().clone();
        // Validate before touching anything.
        for bi in 0..s.batch() {
            let n = held[bi * kvh];
            if (0..kvh).any(|h| held[bi * kvh + h] != n) {
                return Err(KvError::InvalidConfig {
                    field: "scorer",
                    reason: format!(
                        "sequence {bi}: KV heads hold different numbers of tokens; \
                         prefill-time scorers need the whole prompt in every head"
                    ),
                });
            }
            if n > 0 && needs.min_prompt > 0 && n <= needs.min_prompt {
                let field = if needs.window > 0 { "window" } else { "n_sink" };
                return Err(KvError::InvalidConfig {
                    field,
                    reason: format!(
                        "`{}` needs a prompt longer than {} tokens; sequence {bi} has {n}",
                        self.config.scorer.name(),
                        needs.min_prompt
                    ),
                });
            }
        }
        let wants_queries = needs.window > 0 || needs.column_sums || needs.query_moments.is_some();
        if wants_queries && !self.obs.any_query {
            return Ok(None);
        }
        // The observation window's attention over the whole prompt, from the same cache.
        let window_cols = if needs.window > 0 {
            // One batch of queries: every sequence's own last `window` queries (padding for a
            // sequence that holds nothing).
            let w = needs.window;
            let mut qs = Vec::with_capacity(s.batch());
            let mut pos = Vec::with_capacity(s.batch() * w);
            for bi in 0..s.batch() {
                let seen = self.obs.window.get(bi).and_then(Option::as_ref);
                let got = seen.map_or(0, |(_, p)| p.len());
                match seen {
                    Some((q, p)) if got == w => {
                        qs.push(q.clone());
                        pos.extend_from_slice(p);
                    }
                    _ if held[bi * kvh] == 0 => {
                        qs.push(Tensor::zeros([1, s.q_heads(), w, d], &device));
                        pos.extend(core::iter::repeat_n(PAD, w));
                    }
                    // Decode compression: a sequence that skipped steps (padding slots) has
                    // not refilled its window yet; compress at the next interval.
                    _ if target.is_some() => return Ok(None),
                    _ => {
                        return Err(KvError::InvalidConfig {
                            field: "window",
                            reason: format!(
                                "{w} window queries needed, only {got} were attended during \
                                 prefill for sequence {bi}"
                            ),
                        });
                    }
                }
            }
            let q = Query::new(Tensor::cat(qs, 0), pos)?;
            self.inner
                .attend(&q, StatsRequest::COLUMN_SUMS)?
                .stats
                .column_sums
        } else {
            None
        };

        let mut out = vec![Vec::new(); s.streams()];
        for bi in 0..s.batch() {
            let n = held[bi * kvh];
            if n == 0 {
                continue;
            }
            let kv = || -> (Tensor<4>, Tensor<4>) {
                let (mut ks, mut vs) = (Vec::with_capacity(kvh), Vec::with_capacity(kvh));
                for h in 0..kvh {
                    let st = self.inner.stream(bi, h);
                    let zero = || Tensor::<2>::zeros([n, d], &device);
                    ks.push(st.keys.unwrap_or_else(zero).reshape([1, 1, n, d]));
                    vs.push(st.values.unwrap_or_else(zero).reshape([1, 1, n, d]));
                }
                (Tensor::cat(ks, 1), Tensor::cat(vs, 1))
            };
            let stats_of =
                |t: &Tensor<4>, cols: usize| t.clone().slice([bi..bi + 1, 0..kvh, 0..g, 0..cols]);
            let scores: Tensor<3> = match self.config.scorer {
                ScorerConfig::Knorm => score::knorm(kv().0),
                ScorerConfig::KeyDiff => score::keydiff(kv().0),
                ScorerConfig::StreamingLlm { n_sink } => match target {
                    None => score::streaming_llm(1, kvh, n, n_sink, self.config.ratio, &device),
                    Some(t) => score::streaming_llm_kept(1, kvh, n, n_sink, t, &device),
                },
                ScorerConfig::SnapKv {
                    window,
                    kernel,
                    gqa,
                } => {
                    let cols = window_cols.as_ref().ok_or(KvError::Empty {
                        op: OP,
                        what: "observation-window attention",
                    })?;
                    score::snapkv(stats_of(cols, n - window), window, kernel, gqa)
                }
                ScorerConfig::Tova => {
                    let cols = window_cols.as_ref().ok_or(KvError::Empty {
                        op: OP,
                        what: "last-query attention",
                    })?;
                    score::tova(stats_of(cols, n))
                }
                ScorerConfig::ObservedAttention { gqa, recent } => {
                    let cols = self.obs.col_sums.as_ref().ok_or(KvError::Empty {
                        op: OP,
                        what: "prefill attention column sums",
                    })?;
                    if cols.dims()[3] < n {
                        return Err(KvError::InvalidConfig {
                            field: "scorer",
                            reason: "observed_attention needs every prompt token attended \
                                     during prefill"
                                .into(),
                        });
                    }
                    let scores = score::observed_attention(stats_of(cols, n), gqa);
                    // H2O's recent window (MiniKV at prefill): always keep the last tokens.
                    let r = ((recent * n as f64) as usize).min(n);
                    if r == 0 {
                        scores
                    } else {
                        score::pad_with_max(scores.slice([0..1, 0..kvh, 0..n - r]), r, false)
                    }
                }
                ScorerConfig::ExpectedAttention {
                    n_future_positions,
                    n_sink,
                    use_vnorm,
                    epsilon,
                    gqa,
                    ..
                } => {
                    let Some(Some(m)) = self.obs.moments.get(bi) else {
                        return Err(KvError::InvalidConfig {
                            field: "n_sink",
                            reason: format!(
                                "sequence {bi}: no query after the {n_sink} sinks was attended \
                                 during prefill"
                            ),
                        });
                    };
                    let rope = self.rope.as_ref().ok_or(KvError::InvalidConfig {
                        field: "rope",
                        reason: "expected_attention needs the model's RoPE".into(),
                    })?;
                    let st = self.inner.stream(bi, 0);
                    let next = st.positions.last().map_or(n, |&p| p as usize + 1);
                    let r = score::average_rope_matrix(rope, next, n_future_positions);
                    let moments = QueryMoments {
                        mean: m.mean.clone(),
                        cov: m.scatter.clone().map(|s| s.div_scalar(m.count as f32)),
                    }
                    .rotate(&r);
                    let (k, v) = kv();
                    score::expected_attention(k, v, &moments, n_sink, use_vnorm, epsilon, gqa)
                }
            };
            let host = to_host(scores)?;
            for h in 0..kvh {
                out[bi * kvh + h] = host[h * n..(h + 1) * n].to_vec();
            }
        }
        Ok(Some(out))
    }
}

/// Adds two `[b, h, g, w]` statistics of possibly different widths (zero-padding the shorter).
fn add_padded(a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
    let (wa, wb) = (a.dims()[3], b.dims()[3]);
    let pad = |t: Tensor<4>, w: usize| {
        let [x, y, z, cur] = t.dims();
        if cur == w {
            t
        } else {
            let device = t.device();
            Tensor::cat(vec![t, Tensor::zeros([x, y, z, w - cur], &device)], 3)
        }
    };
    let w = wa.max(wb);
    pad(a, w) + pad(b, w)
}

/// Chan et al.'s parallel merge of two (count, mean, scatter) summaries.
fn merge_moments(a: Moments, b: Moments) -> Moments {
    let (na, nb) = (a.count as f32, b.count as f32);
    let n = na + nb;
    let [_, qh, d] = a.mean.dims();
    let delta = b.mean.clone() - a.mean.clone();
    let mean = a.mean + delta.clone().mul_scalar(nb / n);
    let scatter = match (a.scatter, b.scatter) {
        (Some(sa), Some(sb)) => {
            let dl = delta.reshape([1, qh, 1, d]);
            let outer = dl.clone().swap_dims(2, 3).matmul(dl);
            Some(sa + sb + outer.mul_scalar(na * nb / n))
        }
        _ => None,
    };
    Moments {
        count: a.count + b.count,
        mean,
        scatter,
    }
}

impl KvCache for EvictingCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        self.inner.device()
    }

    fn append(&mut self, block: KvBlock) -> Result<()> {
        const OP: &str = "EvictingCache::append";
        let s = self.config.shape;
        // Validate before a pending decode compression, so that a bad block leaves the cache
        // unchanged.
        kv_core::check_block(&s, &block, OP)?;
        kv_core::check_positions(block.positions(), s.batch(), &self.last_seen, OP)?;
        let newest = crate::scissorhands::newest_positions(&block, s.batch());
        if let Some(dc) = self.config.decode
            && self.compressed
            && self.decode_steps >= dc.every
        {
            self.compress_decoded(dc.target)?;
            self.decode_steps = 0;
        }
        self.inner.append(block)?;
        for (seen, new) in self.last_seen.iter_mut().zip(newest) {
            if new.is_some() {
                *seen = new;
            }
        }
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> Result<Attended> {
        let needs = self.config.scorer.needs();
        let own_cols = !self.compressed && needs.column_sums;
        let request = StatsRequest {
            column_sums: stats.column_sums || own_cols,
            last_row: stats.last_row,
        };
        let mut out = self.inner.attend(query, request)?;
        if !self.compressed {
            let cols = if own_cols {
                out.stats.column_sums.clone()
            } else {
                None
            };
            self.record(query, cols);
        } else if self.config.decode.is_some() {
            self.record(query, None);
            self.decode_steps += 1;
        }
        if !stats.column_sums {
            out.stats.column_sums = None;
        }
        Ok(out)
    }

    fn end_prefill(&mut self) -> Result<()> {
        if self.compressed {
            return Ok(());
        }
        let lengths = self.inner.lengths();
        let before = lengths.total_held();
        if before == 0 {
            return Err(KvError::Empty {
                op: "EvictingCache::end_prefill",
                what: "prompt (nothing was appended before end_prefill)",
            });
        }
        let coverage = matches!(self.config.budget, BudgetKind::Coverage { .. });
        if self.config.ratio == 0.0 && !coverage {
            self.finish(EvictOutcome::Skipped {
                reason: "ratio 0 removes nothing",
            });
            return Ok(());
        }
        let Some(scores) = self.compute_scores(&lengths.held, None)? else {
            self.finish(EvictOutcome::Skipped {
                reason: "the scorer needs prefill queries and none was attended",
            });
            return Ok(());
        };
        let ranked = self.protect(&scores);
        let ctx = BudgetContext {
            layer: self.config.layer,
            num_layers: self.config.num_layers,
            kv_heads: self.config.shape.kv_heads(),
            held: &lengths.held,
            scores: ranked.as_ref().unwrap_or(&scores),
        };
        let budgets = self.allocator.allocate(&ctx)?;
        self.check_protected(&lengths.held, &budgets)?;
        let keep = keep_lists(ranked.as_ref().unwrap_or(&scores), &budgets);
        self.inner.retain(&keep)?;
        let after = self.inner.lengths().total_held();
        if self.config.keep_scores {
            self.scores = scores;
        }
        self.finish(EvictOutcome::Compressed { before, after });
        Ok(())
    }

    fn view(&self) -> KvView {
        self.inner.view()
    }

    fn lengths(&self) -> Lengths {
        self.inner.lengths()
    }

    fn memory(&self) -> MemoryReport {
        let mut m = self.inner.memory();
        m.metadata_bytes += self
            .scratch_buffers()
            .iter()
            .map(|b| b.bytes)
            .sum::<usize>();
        m
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = self.inner.held_buffers();
        out.extend(self.scratch_buffers());
        out
    }

    fn reset(&mut self) {
        self.inner.reset();
        self.obs = Observations::default();
        self.compressed = false;
        self.scores = Vec::new();
        self.outcome = None;
        self.last_seen = vec![None; self.config.shape.batch()];
        self.decode_steps = 0;
        self.decode_compressions = 0;
    }
}

impl EvictingCache {
    fn finish(&mut self, outcome: EvictOutcome) {
        self.compressed = true;
        self.obs = Observations::default();
        self.outcome = Some(outcome);
    }

    fn scratch_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = self.obs.buffers();
        for s in &self.scores {
            out.push(HeldBuffer::host(StorageRole::Metadata, s));
        }
        out
    }
}
