//! Decode-time Scissorhands (Liu et al. 2023, arXiv 2305.17118, "persistence of importance"):
//! every held token remembers, over its last `history` attention calls, whether it received at
//! least the uniform share `1/t` of the attention; a stream over its budget drops the tokens
//! that were least often important, never its sinks nor its `recent` newest tokens. The rules
//! follow AnswerDotAI/cold-compress's `KVCacheHeavyHitter` (the paper has no official code).

use burn::prelude::*;
use kv_core::{
    Attended, HeldBuffer, KvBlock, KvCache, KvError, KvShape, KvView, Lengths, MemoryReport, PAD,
    Query, RaggedCache, RaggedCacheConfig, Result, StatsRequest, StorageDtype, StorageRole,
};
use serde::{Deserialize, Serialize};

use crate::gqa::GqaReduce;
use crate::h2o::TokenBudget;
use crate::score::to_host;
use crate::scorer::{parse, parse_gqa};

/// Configuration of a [`ScissorhandsCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScissorhandsConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Tokens held per (sequence, KV head) (the paper's `B`): a count, or a fraction of the
    /// prompt resolved at [`end_prefill`](KvCache::end_prefill). Must exceed `n_sink + recent`.
    pub budget: TokenBudget,
    /// Newest tokens never evicted (the paper's `r`, cold-compress's `recent_window`; default 10).
    #[serde(default = "default_recent")]
    pub recent: usize,
    /// Leading tokens never evicted (cold-compress's `global_tokens`, 4 in its Scissorhands
    /// configs; 0 for the paper's Algorithm 2 as written).
    #[serde(default = "default_sink")]
    pub n_sink: usize,
    /// Attention calls each token remembers (the paper's history window `w`; default 400).
    #[serde(default = "default_history")]
    pub history: usize,
    /// Remember one bit per call, "attention >= 1/t" (cold-compress's `attn_thresholding`;
    /// default true). When false, the raw mean attention is remembered and averaged.
    #[serde(default = "default_true")]
    pub threshold: bool,
    /// Reduction of the query heads of a KV head before thresholding (default mean, as
    /// cold-compress).
    #[serde(default)]
    pub gqa: GqaReduce,
    /// Element type of the stored keys and values (default fp32).
    #[serde(default)]
    pub dtype: StorageDtype,
}

fn default_recent() -> usize {
    10
}
fn default_sink() -> usize {
    4
}
fn default_history() -> usize {
    400
}
fn default_true() -> bool {
    true
}

impl ScissorhandsConfig {
    /// Parameter names accepted by [`ScissorhandsConfig::from_params`].
    pub const PARAMS: &'static [&'static str] =
        &["budget", "recent", "n_sink", "history", "threshold", "gqa"];

    /// A cache of `budget` tokens per stream with the reference defaults: `recent` 10,
    /// `n_sink` 4, `history` 400, thresholded bits, GQA mean, fp32 storage.
    pub fn new(shape: KvShape, budget: TokenBudget) -> Self {
        ScissorhandsConfig {
            shape,
            budget,
            recent: default_recent(),
            n_sink: default_sink(),
            history: default_history(),
            threshold: true,
            gqa: GqaReduce::Mean,
            dtype: StorageDtype::F32,
        }
    }

    /// The config from `key=value` parameters (see [`Self::PARAMS`]); `budget` is a token
    /// count or a fraction of the prompt ([`TokenBudget::parse`], default 0.5). The result is
    /// validated.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the unknown or malformed parameter, or as
    /// [`ScissorhandsConfig::validate`].
    pub fn from_params<'a>(
        shape: KvShape,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self> {
        let mut cfg = ScissorhandsConfig::new(shape, TokenBudget::Ratio(0.5));
        for (k, v) in params {
            match k {
                "budget" => cfg.budget = TokenBudget::parse("budget", v)?,
                "recent" => cfg.recent = parse("recent", v)?,
                "n_sink" => cfg.n_sink = parse("n_sink", v)?,
                "history" => cfg.history = parse("history", v)?,
                "threshold" => cfg.threshold = parse("threshold", v)?,
                "gqa" => cfg.gqa = parse_gqa(v)?,
                _ => {
                    return Err(KvError::InvalidConfig {
                        field: "param",
                        reason: format!("`{k}` is not a parameter of `scissorhands`"),
                    });
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the parameters.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`]: a zero `history`, a fraction outside `[0, 1]`, or a token
    /// budget not above `n_sink + recent` (nothing could ever be evicted).
    pub fn validate(&self) -> Result<()> {
        if self.history == 0 {
            return Err(KvError::InvalidConfig {
                field: "history",
                reason: "must remember at least 1 attention call".into(),
            });
        }
        self.budget.validate("budget")?;
        if let TokenBudget::Tokens(b) = self.budget {
            check_budget(b, self.n_sink, self.recent, None)?;
        }
        Ok(())
    }

    /// Validates and builds the cache.
    ///
    /// # Errors
    /// As [`ScissorhandsConfig::validate`].
    pub fn init(&self, device: &Device) -> Result<ScissorhandsCache> {
        self.validate()?;
        Ok(ScissorhandsCache {
            config: self.clone(),
            inner: RaggedCacheConfig::new(self.shape)
                .with_dtype(self.dtype)
                .init(device)?,
            history: ImportanceHistory::new(self.shape.streams(), self.history, self.threshold),
            budgets: self.fixed_budgets(),
            last_seen: vec![None; self.shape.batch()],
        })
    }

    fn fixed_budgets(&self) -> Vec<Option<usize>> {
        let fixed = match self.budget {
            TokenBudget::Tokens(b) => Some(b),
            TokenBudget::Ratio(_) => None,
        };
        vec![fixed; self.shape.batch()]
    }
}

fn check_budget(b: usize, n_sink: usize, recent: usize, prompt: Option<usize>) -> Result<()> {
    if b > n_sink + recent {
        return Ok(());
    }
    let of = prompt.map_or(String::new(), |p| format!(" (for a prompt of {p} tokens)"));
    Err(KvError::InvalidConfig {
        field: "budget",
        reason: format!(
            "budget {b}{of} must exceed n_sink {n_sink} + recent {recent}, or nothing could be \
             evicted"
        ),
    })
}

/// Per held token, what the last `window` attention calls said about it: one bit "mean
/// attention >= 1/t" per call (thresholded), or the mean attention itself (raw). One ring per
/// token, so a token's score is over its own last `min(observations, window)` calls.
///
/// Pure bookkeeping over `streams` lists aligned with the held tokens, no tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportanceHistory {
    window: usize,
    threshold: bool,
    /// `u64` words per token (thresholded mode).
    words: usize,
    /// Observations recorded per token.
    seen: Vec<Vec<u32>>,
    /// Thresholded: `words` words per token; raw: `window` values per token (as `f32` bits).
    rings: Vec<Vec<u64>>,
    raw: Vec<Vec<f32>>,
}

impl ImportanceHistory {
    /// Empty histories for `streams` streams remembering `window` calls (at least 1).
    pub fn new(streams: usize, window: usize, threshold: bool) -> Self {
        let window = window.max(1);
        ImportanceHistory {
            window,
            threshold,
            words: window.div_ceil(64),
            seen: vec![Vec::new(); streams],
            rings: vec![Vec::new(); streams],
            raw: vec![Vec::new(); streams],
        }
    }

    /// Tokens held by stream `s`.
    pub fn len(&self, s: usize) -> usize {
        self.seen[s].len()
    }

    /// Whether stream `s` holds no token.
    pub fn is_empty(&self, s: usize) -> bool {
        self.seen[s].is_empty()
    }

    /// `count` new tokens arrive in stream `s` with no observation.
    pub fn push(&mut self, s: usize, count: usize) {
        self.seen[s].extend(core::iter::repeat_n(0, count));
        if self.threshold {
            self.rings[s].extend(core::iter::repeat_n(0, count * self.words));
        } else {
            self.raw[s].extend(core::iter::repeat_n(0.0, count * self.window));
        }
    }

    /// Records one attention call in stream `s`: `mean[j]` is the mean attention token `j`
    /// received from the call's queries that see it (`None` when none does: no observation),
    /// `uniform` the uniform share `1/t` of the call.
    pub fn observe(&mut self, s: usize, mean: &[Option<f32>], uniform: f32) {
        let w = self.window;
        for (j, m) in mean.iter().enumerate().take(self.seen[s].len()) {
            let Some(v) = *m else { continue };
            let slot = self.seen[s][j] as usize % w;
            if self.threshold {
                let (word, bit) = (j * self.words + slot / 64, slot % 64);
                if v >= uniform {
                    self.rings[s][word] |= 1 << bit;
                } else {
                    self.rings[s][word] &= !(1 << bit);
                }
            } else {
                self.raw[s][j * w + slot] = v;
            }
            self.seen[s][j] = self.seen[s][j].saturating_add(1);
        }
    }

    /// The score of every token of stream `s`: the fraction of its last `min(observations,
    /// window)` calls in which it was important (raw mode: its mean attention over them); 0 for
    /// a token never observed.
    pub fn scores(&self, s: usize) -> Vec<f32> {
        let w = self.window;
        (0..self.seen[s].len())
            .map(|j| {
                let n = (self.seen[s][j] as usize).min(w);
                if n == 0 {
                    return 0.0;
                }
                let sum = if self.threshold {
                    self.rings[s][j * self.words..(j + 1) * self.words]
                        .iter()
                        .map(|x| x.count_ones())
                        .sum::<u32>() as f32
                } else {
                    self.raw[s][j * w..(j + 1) * w].iter().sum::<f32>()
                };
                sum / n as f32
            })
            .collect()
    }

    /// The rows stream `s` keeps when `count` tokens must go: the `count` lowest-scored among
    /// those after the first `n_sink` and before the last `recent` (ties: the earlier token
    /// goes first, as cold-compress's `argmin`), fewer if fewer are evictable. Sorted.
    pub fn keep_after_evicting(
        &self,
        s: usize,
        count: usize,
        n_sink: usize,
        recent: usize,
    ) -> Vec<usize> {
        let n = self.seen[s].len();
        let (lo, hi) = (n_sink.min(n), n.saturating_sub(recent));
        if count == 0 || lo >= hi {
            return (0..n).collect();
        }
        let scores = self.scores(s);
        let mut cand: Vec<usize> = (lo..hi).collect();
        cand.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        let mut drop = vec![false; n];
        for &j in cand.iter().take(count) {
            drop[j] = true;
        }
        (0..n).filter(|&j| !drop[j]).collect()
    }

    /// [`ImportanceHistory::keep_after_evicting`] for a stream whose rows hold the tokens at
    /// `positions` in any order (after in-place replacements): sinks, recent tokens and ties
    /// are by position. Returns sorted rows.
    pub fn keep_after_evicting_at(
        &self,
        s: usize,
        count: usize,
        n_sink: usize,
        recent: usize,
        positions: &[u32],
    ) -> Vec<usize> {
        let n = self.seen[s].len();
        let (lo, hi) = (n_sink.min(n), n.saturating_sub(recent));
        if count == 0 || lo >= hi {
            return (0..n).collect();
        }
        let scores = self.scores(s);
        crate::slots::keep_by_position(&scores, positions, |sc| {
            let mut cand: Vec<usize> = (lo..hi).collect();
            cand.sort_by(|&a, &b| sc[a].total_cmp(&sc[b]).then(a.cmp(&b)));
            let mut drop = vec![false; n];
            for &j in cand.iter().take(count) {
                drop[j] = true;
            }
            (0..n).filter(|&j| !drop[j]).collect()
        })
    }

    /// New tokens took the given rows of stream `s` (in place of evicted ones): no
    /// observation yet.
    pub fn replace(&mut self, s: usize, rows: &[usize]) {
        let (w, words) = (self.window, self.words);
        for &r in rows {
            self.seen[s][r] = 0;
            if self.threshold {
                self.rings[s][r * words..(r + 1) * words].fill(0);
            } else {
                self.raw[s][r * w..(r + 1) * w].fill(0.0);
            }
        }
    }

    /// Keeps the given rows of every stream (as [`RaggedCache::retain`] does with the tokens).
    pub fn retain(&mut self, keep: &[Vec<usize>]) {
        let (w, words) = (self.window, self.words);
        for (s, idx) in keep.iter().enumerate() {
            if idx.len() == self.seen[s].len() {
                continue;
            }
            self.seen[s] = idx.iter().map(|&j| self.seen[s][j]).collect();
            if self.threshold {
                let old = &self.rings[s];
                self.rings[s] = idx
                    .iter()
                    .flat_map(|&j| old[j * words..(j + 1) * words].iter().copied())
                    .collect();
            } else {
                let old = &self.raw[s];
                self.raw[s] = idx
                    .iter()
                    .flat_map(|&j| old[j * w..(j + 1) * w].iter().copied())
                    .collect();
            }
        }
    }

    /// Every buffer, measured from the buffer (for [`KvCache::held_buffers`]).
    pub fn buffers(&self) -> Vec<HeldBuffer> {
        let mut out = Vec::new();
        for s in 0..self.seen.len() {
            out.push(HeldBuffer::host(StorageRole::Metadata, &self.seen[s]));
            out.push(HeldBuffer::host(StorageRole::Metadata, &self.rings[s]));
            out.push(HeldBuffer::host(StorageRole::Metadata, &self.raw[s]));
        }
        out
    }

    fn clear(&mut self) {
        for s in 0..self.seen.len() {
            self.seen[s] = Vec::new();
            self.rings[s] = Vec::new();
            self.raw[s] = Vec::new();
        }
    }
}

/// For every key position, how many of the (non-padding) query positions see it (`q >= k`).
pub(crate) fn visible_counts(keys: &[u32], queries: &[u32]) -> Vec<u32> {
    let mut q: Vec<u32> = queries.iter().copied().filter(|&p| p != PAD).collect();
    q.sort_unstable();
    keys.iter()
        .map(|&k| (q.len() - q.partition_point(|&p| p < k)) as u32)
        .collect()
}

/// The newest non-padding position of every sequence of a block.
pub(crate) fn newest_positions(block: &KvBlock, batch: usize) -> Vec<Option<u32>> {
    let n = block.seq_len();
    (0..batch)
        .map(|b| {
            block.positions()[b * n..(b + 1) * n]
                .iter()
                .copied()
                .filter(|&p| p != PAD)
                .max()
        })
        .collect()
}

/// Scissorhands as a decode-time policy over ragged storage.
///
/// Every [`attend`](KvCache::attend), prefill and decode, is one observation for each held
/// token that at least one of its queries sees: the token's attention, reduced over the query
/// heads of its KV head ([`ScissorhandsConfig::gqa`], mean by default) and averaged over the
/// call's queries that see it, compared with the uniform share `1/t` (`t` = tokens the stream
/// holds; cold-compress's `attn >= 1 / cache_cts`). Each token keeps its last
/// [`history`](ScissorhandsConfig::history) observations; its score is the fraction in which
/// it was important.
///
/// Before a block of `m` tokens is stored, a stream holding `h` tokens with `h + m > B` drops
/// its `h + m - B` lowest-scored tokens, never its first `n_sink` nor its last `recent`
/// (cold-compress evicts the argmin before writing the new token), so a decode query sees
/// exactly `B` tokens, itself included. If fewer tokens are evictable the stream stays over
/// budget until they are. [`end_prefill`](KvCache::end_prefill) resolves a fractional budget
/// from the prompt length and trims every stream to `B`: a prompt processed in one pass is
/// compressed by its own attention (one observation per token), where cold-compress compresses
/// long prompts with a separate prompt compressor. Positions are kept (no re-rotation).
#[derive(Debug, Clone)]
pub struct ScissorhandsCache {
    config: ScissorhandsConfig,
    inner: RaggedCache,
    history: ImportanceHistory,
    /// `B` per sequence, once known.
    budgets: Vec<Option<usize>>,
    /// The last position appended per sequence (eviction may drop it).
    last_seen: Vec<Option<u32>>,
}

impl ScissorhandsCache {
    /// The configuration.
    pub fn config(&self) -> &ScissorhandsConfig {
        &self.config
    }

    /// The underlying ragged storage (per-sequence memory:
    /// [`RaggedCache::sequence_memory`]).
    pub fn storage(&self) -> &RaggedCache {
        &self.inner
    }

    /// The importance history of the held tokens.
    pub fn history(&self) -> &ImportanceHistory {
        &self.history
    }

    /// The budget `B` of sequence `b` once known (counts from the start, fractions after
    /// `end_prefill`).
    pub fn budget(&self, b: usize) -> Option<usize> {
        self.budgets.get(b).copied().flatten()
    }

    /// The rows every stream of a sequence with a known budget keeps for `incoming` new
    /// tokens (per sequence) to fit.
    fn keep_lists(&self, incoming: &[usize]) -> Vec<Vec<usize>> {
        let kvh = self.config.shape.kv_heads();
        let held = self.inner.lengths().held;
        (0..held.len())
            .map(|s| match self.budgets[s / kvh] {
                Some(b) => {
                    let excess = (held[s] + incoming[s / kvh]).saturating_sub(b);
                    self.history.keep_after_evicting_at(
                        s,
                        excess,
                        self.config.n_sink,
                        self.config.recent,
                        self.inner.positions(s / kvh, s % kvh),
                    )
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
        self.history.retain(keep);
        Ok(())
    }
}

impl KvCache for ScissorhandsCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        self.inner.device()
    }

    fn append(&mut self, block: KvBlock) -> Result<()> {
        const OP: &str = "ScissorhandsCache::append";
        // Validate everything the storage checks before evicting, so that a bad block leaves
        // the cache unchanged.
        let s = self.config.shape;
        kv_core::check_block(&s, &block, OP)?;
        let counts = kv_core::check_positions(block.positions(), s.batch(), &self.last_seen, OP)?;
        let newest = newest_positions(&block, s.batch());
        // Make room, writing the new tokens into the evicted rows where one goes per token.
        let held = self.inner.lengths().held;
        let keep = self.keep_lists(&counts);
        let (keep, slots) = crate::slots::plan(&held, keep, &counts, s.kv_heads());
        self.retain(&keep)?;
        self.inner.append_into(block, &slots)?;
        for (seen, new) in self.last_seen.iter_mut().zip(newest) {
            if new.is_some() {
                *seen = new;
            }
        }
        for (si, rows) in slots.iter().enumerate() {
            match rows {
                Some(rows) => self.history.replace(si, rows),
                None => self.history.push(si, counts[si / s.kv_heads()]),
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
                let n = query.len();
                for bi in 0..b {
                    let qpos = &query.positions()[bi * n..(bi + 1) * n];
                    for h in 0..kvh {
                        let si = bi * s.kv_heads() + h;
                        let st = (bi * kvh + h) * width;
                        let kpos = self.inner.stream(bi, h).positions.to_vec();
                        let held = kpos.len();
                        if held == 0 {
                            continue;
                        }
                        let vis = visible_counts(&kpos, qpos);
                        let mean: Vec<Option<f32>> = (0..held)
                            .map(|j| (vis[j] > 0).then(|| reduced[st + j] / vis[j] as f32))
                            .collect();
                        self.history.observe(si, &mean, 1.0 / held as f32);
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
            let bud = self.config.budget.resolve(logical[b]);
            check_budget(
                bud,
                self.config.n_sink,
                self.config.recent,
                Some(logical[b]),
            )?;
            *slot = Some(bud);
        }
        self.budgets = budgets;
        let keep = self.keep_lists(&vec![0; self.config.shape.batch()]);
        self.retain(&keep)
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
            .history
            .buffers()
            .iter()
            .map(|b| b.bytes)
            .sum::<usize>();
        m
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = self.inner.held_buffers();
        out.extend(self.history.buffers());
        out
    }

    fn reset(&mut self) {
        self.inner.reset();
        self.history.clear();
        self.budgets = self.config.fixed_budgets();
        self.last_seen = vec![None; self.config.shape.batch()];
    }
}
