//! Decode-time H2O (Heavy-Hitter Oracle, Zhang et al. 2023, arXiv 2306.14048): every held
//! token accumulates the attention it receives from every query, prefill and decode; a stream
//! over budget keeps its `heavy` highest-scored older tokens plus its `recent` newest ones.

use burn::prelude::*;
use kv_core::{
    Attended, HeldBuffer, KvBlock, KvCache, KvError, KvShape, KvView, Lengths, MemoryReport, Query,
    RaggedCache, RaggedCacheConfig, Result, StatsRequest, StorageDtype, StorageRole,
};
use serde::{Deserialize, Serialize};

use crate::gqa::GqaReduce;
use crate::score::to_host;
use crate::select::top_k_sorted;

/// A token budget: an absolute count, or a fraction of the prompt resolved at
/// [`end_prefill`](KvCache::end_prefill) (`floor(ratio * prompt_tokens)`, as H2O's lm-eval
/// script turns `--heavy_ratio` into a count).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenBudget {
    /// A number of tokens.
    Tokens(usize),
    /// A fraction of the prompt's tokens, in `[0, 1]`.
    Ratio(f64),
}

impl TokenBudget {
    /// Parses an unsigned integer as tokens (`768`) and any other number as a fraction of the
    /// prompt (`0.25`, `1.0`).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming `field` for anything else, or a fraction outside
    /// `[0, 1]`.
    pub fn parse(field: &'static str, v: &str) -> Result<Self> {
        let bad = |reason: String| KvError::InvalidConfig { field, reason };
        if let Ok(n) = v.parse::<usize>() {
            return Ok(TokenBudget::Tokens(n));
        }
        let r: f64 = v.parse().map_err(|_| {
            bad(format!(
                "`{v}` is neither a token count nor a fraction of the prompt"
            ))
        })?;
        let b = TokenBudget::Ratio(r);
        b.validate(field)?;
        Ok(b)
    }

    pub(crate) fn validate(self, field: &'static str) -> Result<()> {
        match self {
            TokenBudget::Ratio(r) if !(0.0..=1.0).contains(&r) => Err(KvError::InvalidConfig {
                field,
                reason: format!("fraction {r} of the prompt is not in [0, 1]"),
            }),
            _ => Ok(()),
        }
    }

    /// The budget that keeps what a compression ratio (the fraction removed, in `[0, 1)`)
    /// keeps: `Ratio(1 - ratio)`, which resolves to kvpress's `floor(n (1 - ratio))` for a
    /// prompt of `n` tokens ([`kept_for`](crate::kept_for), the same f64 product).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming `ratio` for a ratio outside `[0, 1)`.
    pub fn from_ratio(ratio: f64) -> Result<Self> {
        crate::budget::check_ratio(ratio)?;
        Ok(TokenBudget::Ratio(1.0 - ratio))
    }

    /// The count for a prompt of `prompt` tokens.
    pub fn resolve(self, prompt: usize) -> usize {
        match self {
            TokenBudget::Tokens(n) => n,
            TokenBudget::Ratio(r) => (r * prompt as f64).floor() as usize,
        }
    }

    pub(crate) fn is_ratio(self) -> bool {
        matches!(self, TokenBudget::Ratio(_))
    }
}

/// Configuration of an [`H2oCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct H2oConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Heavy hitters kept per (sequence, KV head) (H2O's `hh_size`).
    pub heavy: TokenBudget,
    /// Most recent tokens kept per (sequence, KV head) (H2O's `recent_size`).
    pub recent: TokenBudget,
    /// Reduction of the query heads of a KV head (default mean; H2O itself is MHA).
    #[serde(default)]
    pub gqa: GqaReduce,
    /// Element type of the stored keys and values (default fp32).
    #[serde(default)]
    pub dtype: StorageDtype,
    /// Budget as a compression ratio instead of `heavy` and `recent` (which must then both be
    /// `Tokens(0)`, as [`H2oConfig::with_ratio`] sets them): the fraction of the prompt
    /// removed, in `[0, 1)`. At [`end_prefill`](KvCache::end_prefill) a sequence of `n` prompt
    /// tokens gets `B = floor(n (1 - ratio))` tokens per KV head (kvpress's count), half of
    /// them recent (`floor(B / 2)`) and the rest heavy hitters, H2O's even split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

impl H2oConfig {
    /// A budget of `floor(n (1 - ratio))` tokens per KV head for a prompt of `n` tokens, split
    /// evenly between recent tokens and heavy hitters (see [`H2oConfig::ratio`]).
    pub fn with_ratio(shape: KvShape, ratio: f64) -> Self {
        let mut cfg = H2oConfig::new(shape, TokenBudget::Tokens(0), TokenBudget::Tokens(0));
        cfg.ratio = Some(ratio);
        cfg
    }

    /// `(heavy, recent)` for a prompt of `prompt` tokens.
    pub fn resolve(&self, prompt: usize) -> (usize, usize) {
        match self.ratio {
            Some(r) => {
                let total = crate::budget::kept_for(prompt, r);
                (total - total / 2, total / 2)
            }
            None => (self.heavy.resolve(prompt), self.recent.resolve(prompt)),
        }
    }

    fn fixed_budgets(&self) -> Vec<Option<(usize, usize)>> {
        let fixed = (self.ratio.is_none() && !self.heavy.is_ratio() && !self.recent.is_ratio())
            .then(|| (self.heavy.resolve(0), self.recent.resolve(0)));
        vec![fixed; self.shape.batch()]
    }

    /// `heavy` heavy hitters plus `recent` recent tokens, mean GQA reduction, fp32 storage.
    pub fn new(shape: KvShape, heavy: TokenBudget, recent: TokenBudget) -> Self {
        H2oConfig {
            shape,
            heavy,
            recent,
            gqa: GqaReduce::Mean,
            dtype: StorageDtype::F32,
            ratio: None,
        }
    }

    /// Validates and builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`]: a fraction outside `[0, 1]`, a budget of zero tokens
    /// (`heavy + recent` must keep something), a `ratio` outside `[0, 1)` or given together
    /// with `heavy` or `recent`.
    pub fn init(&self, device: &Device) -> Result<H2oCache> {
        self.heavy.validate("heavy")?;
        self.recent.validate("recent")?;
        let unset = self.heavy == TokenBudget::Tokens(0) && self.recent == TokenBudget::Tokens(0);
        match self.ratio {
            Some(r) => {
                crate::budget::check_ratio(r)?;
                if !unset {
                    return Err(KvError::InvalidConfig {
                        field: "ratio",
                        reason: "a ratio sets the budget; it cannot be combined with explicit \
                                 heavy or recent budgets"
                            .into(),
                    });
                }
            }
            None if unset => {
                return Err(KvError::InvalidConfig {
                    field: "recent",
                    reason: "heavy + recent is 0: the cache would keep nothing".into(),
                });
            }
            None => {}
        }
        Ok(H2oCache {
            config: self.clone(),
            inner: RaggedCacheConfig::new(self.shape)
                .with_dtype(self.dtype)
                .init(device)?,
            scores: HeavyHitters::new(self.shape.streams()),
            budgets: self.fixed_budgets(),
            last_seen: vec![None; self.shape.batch()],
        })
    }
}

/// H2O's accumulated attention scores of one layer, one list per (sequence, KV head) aligned
/// with the held tokens, and its eviction rule. Pure bookkeeping, no tensors: the cache feeds
/// it the column sums of every attention call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeavyHitters {
    scores: Vec<Vec<f32>>,
}

impl HeavyHitters {
    /// Empty scores for `streams` streams.
    pub fn new(streams: usize) -> Self {
        HeavyHitters {
            scores: vec![Vec::new(); streams],
        }
    }

    /// The accumulated score of every held token of every stream.
    pub fn scores(&self) -> &[Vec<f32>] {
        &self.scores
    }

    /// New tokens arrive in stream `s` with score 0.
    pub fn push(&mut self, s: usize, count: usize) {
        self.scores[s].extend(core::iter::repeat_n(0.0, count));
    }

    /// Adds one attention call's column sums (`Σ` over its queries of the probability of each
    /// held token, after GQA reduction) to stream `s` (H2O's `_update_hh_score`). Only the
    /// first `held` entries of `col_sums` are read (ragged statistics are zero-padded).
    pub fn observe(&mut self, s: usize, col_sums: &[f32]) {
        for (acc, c) in self.scores[s].iter_mut().zip(col_sums) {
            *acc += c;
        }
    }

    /// The rows stream `s` keeps under `heavy` + `recent` (sorted): everything when it holds
    /// at most `heavy + recent`, else the `heavy` best-scored of all but the last `recent`
    /// tokens plus the last `recent` (H2O's `topk(hh_score[:, :len - recent])`; ties go to the
    /// earlier token).
    pub fn keep(&self, s: usize, heavy: usize, recent: usize) -> Vec<usize> {
        let sc = &self.scores[s];
        let n = sc.len();
        if n <= heavy + recent {
            return (0..n).collect();
        }
        let mut keep = top_k_sorted(&sc[..n - recent], heavy);
        keep.extend(n - recent..n);
        keep
    }

    /// [`HeavyHitters::keep`] for a stream whose rows hold the tokens at `positions` in any
    /// order (after in-place replacements): "recent" and "earlier" are by position. Returns
    /// sorted rows.
    pub fn keep_at(&self, s: usize, heavy: usize, recent: usize, positions: &[u32]) -> Vec<usize> {
        crate::slots::keep_by_position(&self.scores[s], positions, |sc| {
            let n = sc.len();
            if n <= heavy + recent {
                return (0..n).collect();
            }
            let mut keep = top_k_sorted(&sc[..n - recent], heavy);
            keep.extend(n - recent..n);
            keep
        })
    }

    /// New tokens took the given rows of stream `s` (in place of evicted ones): score 0.
    pub fn replace(&mut self, s: usize, rows: &[usize]) {
        for &r in rows {
            self.scores[s][r] = 0.0;
        }
    }

    /// Keeps the given rows of every stream (as [`RaggedCache::retain`] does with the tokens).
    pub fn retain(&mut self, keep: &[Vec<usize>]) {
        for (sc, idx) in self.scores.iter_mut().zip(keep) {
            if idx.len() != sc.len() {
                *sc = idx.iter().filter_map(|&j| sc.get(j).copied()).collect();
            }
        }
    }

    fn clear(&mut self) {
        self.scores.iter_mut().for_each(Vec::clear);
    }
}

/// H2O as a decode-time policy over ragged storage.
///
/// Every [`attend`](KvCache::attend), prefill and decode, adds the attention each held token
/// receives (column sums over the call's queries, reduced over the query heads of its KV head
/// by [`H2oConfig::gqa`]) to the token's score. A stream holding more than `heavy + recent`
/// tokens keeps its `recent` newest tokens and the `heavy` best-scored among the others, and
/// the kept tokens carry their scores on.
///
/// H2O evicts right after each attention; this cache evicts at the next
/// [`append`](KvCache::append) (before the new tokens are stored) or at
/// [`end_prefill`](KvCache::end_prefill), on the same scores, so every query sees exactly the
/// tokens it sees in H2O (`heavy + recent` plus its own block) and [`view`](KvCache::view)
/// always shows what the last query attended. Between a decode step and the next one a
/// stream holds `heavy + recent + 1` tokens.
///
/// Budgets given as fractions of the prompt are resolved at `end_prefill` from the tokens
/// appended so far per sequence; until then nothing is evicted. Token counts apply from the
/// first append (a chunked prefill is evicted between chunks, as H2O does between forward
/// passes). Positions are kept (no re-rotation). Scores are kept per sequence (H2O sums
/// them over the batch, which shares one cache there).
#[derive(Debug, Clone)]
pub struct H2oCache {
    config: H2oConfig,
    inner: RaggedCache,
    scores: HeavyHitters,
    /// `(heavy, recent)` per sequence, once known.
    budgets: Vec<Option<(usize, usize)>>,
    /// The last position appended per sequence (eviction may drop it when `recent` is 0).
    last_seen: Vec<Option<u32>>,
}

impl H2oCache {
    /// The configuration.
    pub fn config(&self) -> &H2oConfig {
        &self.config
    }

    /// The underlying ragged storage (per-sequence memory:
    /// [`RaggedCache::sequence_memory`]).
    pub fn storage(&self) -> &RaggedCache {
        &self.inner
    }

    /// The accumulated scores, one list per (sequence, KV head) aligned with the held tokens.
    pub fn scores(&self) -> &[Vec<f32>] {
        self.scores.scores()
    }

    /// `(heavy, recent)` of sequence `b` once known (token counts from the start, fractions
    /// after `end_prefill`).
    pub fn budget(&self, b: usize) -> Option<(usize, usize)> {
        self.budgets.get(b).copied().flatten()
    }

    /// Evicts every stream over its budget now (what H2O does after each attention).
    ///
    /// # Errors
    /// As [`RaggedCache::retain`] (not expected: the keep lists are built from the held rows).
    pub fn evict(&mut self) -> Result<()> {
        let keep = self.keep_lists();
        self.retain(&keep)
    }

    /// The rows every stream keeps under its budget (everything when it is not known yet).
    fn keep_lists(&self) -> Vec<Vec<usize>> {
        let kvh = self.config.shape.kv_heads();
        let held = self.inner.lengths().held;
        (0..held.len())
            .map(|s| match self.budgets[s / kvh] {
                Some((heavy, recent)) => {
                    let pos = self.inner.positions(s / kvh, s % kvh);
                    self.scores.keep_at(s, heavy, recent, pos)
                }
                None => (0..held[s]).collect(),
            })
            .collect()
    }

    fn retain(&mut self, keep: &[Vec<usize>]) -> Result<()> {
        let held = self.inner.lengths().held;
        if keep.iter().zip(&held).all(|(k, &n)| k.len() == n) {
            return Ok(());
        }
        self.inner.retain(keep)?;
        self.scores.retain(keep);
        Ok(())
    }
}

impl KvCache for H2oCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        self.inner.device()
    }

    fn append(&mut self, block: KvBlock) -> Result<()> {
        const OP: &str = "H2oCache::append";
        // Validate everything the storage checks before evicting, so that a bad block leaves
        // the cache unchanged.
        let s = self.config.shape;
        kv_core::check_block(&s, &block, OP)?;
        let counts = kv_core::check_positions(block.positions(), s.batch(), &self.last_seen, OP)?;
        let n = block.seq_len();
        let newest: Vec<Option<u32>> = (0..s.batch())
            .map(|b| {
                block.positions()[b * n..(b + 1) * n]
                    .iter()
                    .copied()
                    .filter(|&p| p != kv_core::PAD)
                    .max()
            })
            .collect();
        // Evict, writing the new tokens into the evicted rows where one goes per token.
        let held = self.inner.lengths().held;
        let (keep, slots) = crate::slots::plan(&held, self.keep_lists(), &counts, s.kv_heads());
        self.retain(&keep)?;
        self.inner.append_into(block, &slots)?;
        for (seen, new) in self.last_seen.iter_mut().zip(newest) {
            if new.is_some() {
                *seen = new;
            }
        }
        for (si, rows) in slots.iter().enumerate() {
            match rows {
                Some(rows) => self.scores.replace(si, rows),
                None => self.scores.push(si, counts[si / s.kv_heads()]),
            }
        }
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> Result<Attended> {
        let request = StatsRequest {
            column_sums: true,
            last_row: stats.last_row,
        };
        let mut out = self.inner.attend(query, request)?;
        let s = self.config.shape;
        if let Some(cols) = out.stats.column_sums.clone() {
            let [b, kvh, _, width] = cols.dims();
            if width > 0 {
                let reduced = to_host(self.config.gqa.reduce(cols))?;
                for bi in 0..b {
                    for h in 0..kvh {
                        let st = (bi * kvh + h) * width;
                        self.scores
                            .observe(bi * s.kv_heads() + h, &reduced[st..st + width]);
                    }
                }
            }
        }
        if !stats.column_sums {
            out.stats.column_sums = None;
        }
        Ok(out)
    }

    fn end_prefill(&mut self) -> Result<()> {
        let logical = self.inner.lengths().logical;
        let mut budgets = self.budgets.clone();
        for (b, slot) in budgets.iter_mut().enumerate() {
            if slot.is_some() || logical[b] == 0 {
                continue;
            }
            let (heavy, recent) = self.config.resolve(logical[b]);
            if heavy + recent == 0 {
                return Err(KvError::InvalidConfig {
                    field: if self.config.ratio.is_some() {
                        "ratio"
                    } else {
                        "recent"
                    },
                    reason: format!(
                        "sequence {b}: heavy + recent resolve to 0 tokens for a prompt of {}",
                        logical[b]
                    ),
                });
            }
            *slot = Some((heavy, recent));
        }
        self.budgets = budgets;
        self.evict()
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
            .scores
            .scores()
            .iter()
            .map(|s| core::mem::size_of_val(s.as_slice()))
            .sum::<usize>();
        m
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = self.inner.held_buffers();
        out.extend(
            self.scores
                .scores()
                .iter()
                .map(|s| HeldBuffer::host(StorageRole::Metadata, s)),
        );
        out
    }

    fn reset(&mut self) {
        self.inner.reset();
        self.scores.clear();
        self.budgets = self.config.fixed_budgets();
        self.last_seen = vec![None; self.config.shape.batch()];
    }
}
