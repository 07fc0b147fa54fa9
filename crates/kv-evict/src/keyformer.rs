//! Decode-time Keyformer (Adnan et al. 2024, arXiv 2403.09054): H2O's accumulated score, but
//! of a Gumbel-noise-regularised softmax of the attention logits with a temperature that rises
//! every decode step, as d-matrix-ai/keyformer-llm computes it.

use burn::prelude::*;
use burn::tensor::IntDType;
use kv_core::{
    Attended, HeldBuffer, KvBlock, KvCache, KvError, KvShape, KvView, Lengths, MemoryReport, PAD,
    Query, RaggedCache, RaggedCacheConfig, Result, StatsRequest, StorageDtype, StorageRole,
};
use serde::{Deserialize, Serialize};

use crate::gqa::GqaReduce;
use crate::h2o::{HeavyHitters, TokenBudget};
use crate::scissorhands::newest_positions;
use crate::score::to_host;
use crate::scorer::{parse, parse_gqa};

/// Query rows whose logits are materialised at once.
const ROWS: usize = 512;

/// Configuration of a [`KeyformerCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyformerConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Tokens held per (sequence, KV head): a count, or a fraction of the prompt resolved at
    /// [`end_prefill`](KvCache::end_prefill) (the reference's `kv_cache`, 60% by default).
    pub budget: TokenBudget,
    /// Fraction of the budget given to the most recent tokens, in `[0, 1]` (the reference's
    /// `recent`, 30%); the rest are key tokens chosen by score.
    #[serde(default = "default_recent")]
    pub recent: f64,
    /// Temperature of the prompt's Gumbel softmax (`tau_init`, default 1.0).
    #[serde(default = "default_tau_init")]
    pub tau_init: f32,
    /// Temperature added per decode step (`tau_delta`, default 0.01).
    #[serde(default = "default_tau_delta")]
    pub tau_delta: f32,
    /// Seed of the Gumbel noise (default 0).
    #[serde(default)]
    pub seed: u64,
    /// Reduction of the query heads of a KV head (default mean; the reference is MHA).
    #[serde(default)]
    pub gqa: GqaReduce,
    /// Element type of the stored keys and values (default fp32).
    #[serde(default)]
    pub dtype: StorageDtype,
}

fn default_recent() -> f64 {
    0.3
}
fn default_tau_init() -> f32 {
    1.0
}
fn default_tau_delta() -> f32 {
    0.01
}

impl KeyformerConfig {
    /// Parameter names accepted by [`KeyformerConfig::from_params`].
    pub const PARAMS: &'static [&'static str] =
        &["budget", "recent", "tau_init", "tau_delta", "seed", "gqa"];

    /// A cache of `budget` tokens per stream with the reference's defaults: 30% recent,
    /// `tau_init` 1, `tau_delta` 0.01, seed 0, GQA mean, fp32 storage.
    pub fn new(shape: KvShape, budget: TokenBudget) -> Self {
        KeyformerConfig {
            shape,
            budget,
            recent: default_recent(),
            tau_init: default_tau_init(),
            tau_delta: default_tau_delta(),
            seed: 0,
            gqa: GqaReduce::Mean,
            dtype: StorageDtype::F32,
        }
    }

    /// The config from `key=value` parameters (see [`Self::PARAMS`]); `budget` is a token
    /// count or a fraction of the prompt (default 0.6, the reference's `kv_cache = 60`). The
    /// result is validated.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the unknown or malformed parameter, or as
    /// [`KeyformerConfig::validate`].
    pub fn from_params<'a>(
        shape: KvShape,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self> {
        let mut cfg = KeyformerConfig::new(shape, TokenBudget::Ratio(0.6));
        for (k, v) in params {
            match k {
                "budget" => cfg.budget = TokenBudget::parse("budget", v)?,
                "recent" => cfg.recent = parse("recent", v)?,
                "tau_init" => cfg.tau_init = parse("tau_init", v)?,
                "tau_delta" => cfg.tau_delta = parse("tau_delta", v)?,
                "seed" => cfg.seed = parse("seed", v)?,
                "gqa" => cfg.gqa = parse_gqa(v)?,
                _ => {
                    return Err(KvError::InvalidConfig {
                        field: "param",
                        reason: format!("`{k}` is not a parameter of `keyformer`"),
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
    /// [`KvError::InvalidConfig`]: a budget fraction or `recent` outside `[0, 1]`, a token
    /// budget of 0, a `tau_init` that is not a positive number, a negative or non-finite
    /// `tau_delta`.
    pub fn validate(&self) -> Result<()> {
        self.budget.validate("budget")?;
        if self.budget == TokenBudget::Tokens(0) {
            return Err(KvError::InvalidConfig {
                field: "budget",
                reason: "a budget of 0 tokens keeps nothing".into(),
            });
        }
        if !(0.0..=1.0).contains(&self.recent) {
            return Err(KvError::InvalidConfig {
                field: "recent",
                reason: format!("{} is not a fraction of the budget in [0, 1]", self.recent),
            });
        }
        if !(self.tau_init.is_finite() && self.tau_init > 0.0) {
            return Err(KvError::InvalidConfig {
                field: "tau_init",
                reason: format!("{} must be a positive temperature", self.tau_init),
            });
        }
        if !(self.tau_delta.is_finite() && self.tau_delta >= 0.0) {
            return Err(KvError::InvalidConfig {
                field: "tau_delta",
                reason: format!("{} must be a finite number >= 0", self.tau_delta),
            });
        }
        Ok(())
    }

    /// `(recent, key)` tokens for a budget of `total` tokens: `recent = floor(total *
    /// recent_fraction)`, `key = total - recent` (the reference's `req_tokens`).
    pub fn split(&self, total: usize) -> (usize, usize) {
        let recent = ((total as f64 * self.recent).floor() as usize).min(total);
        (recent, total - recent)
    }

    /// Validates and builds the cache.
    ///
    /// # Errors
    /// As [`KeyformerConfig::validate`].
    pub fn init(&self, device: &Device) -> Result<KeyformerCache> {
        self.validate()?;
        Ok(KeyformerCache {
            config: self.clone(),
            inner: RaggedCacheConfig::new(self.shape)
                .with_dtype(self.dtype)
                .init(device)?,
            scores: HeavyHitters::new(self.shape.streams()),
            budgets: self.fixed_budgets(),
            last_seen: vec![None; self.shape.batch()],
            rng: SplitMix64::new(self.seed),
            prefill_over: false,
            step: 0,
        })
    }

    fn fixed_budgets(&self) -> Vec<Option<(usize, usize)>> {
        let fixed = match self.budget {
            TokenBudget::Tokens(b) => Some(self.split(b)),
            TokenBudget::Ratio(_) => None,
        };
        vec![fixed; self.shape.batch()]
    }
}

/// SplitMix64 (Steele et al. 2014): a small, seedable generator for the Gumbel noise, so that
/// a cache's noise depends on its seed and its own calls only.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `count` uniforms in the open interval `(0, 1)` (24-bit mantissas, centred).
    fn uniforms(&mut self, count: usize) -> Vec<f32> {
        const SCALE: f32 = 1.0 / (1u32 << 24) as f32;
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let x = self.next_u64();
            out.push(((x >> 40) as f32 + 0.5) * SCALE);
            if out.len() < count {
                out.push((((x >> 16) & 0xFF_FFFF) as f32 + 0.5) * SCALE);
            }
        }
        out
    }
}

/// Column sums of the Gumbel softmax `softmax((z + g) / tau)` of one stream's causal logits
/// `z = q k^T / sqrt(d)`, per query head: `[group, len]`, row-major.
///
/// `uniforms` supplies the noise: `g = -ln(-ln(u))` (torch's `gumbel_softmax` draws `-ln(E)`
/// with `E ~ Exp(1)`, the same distribution). Keys after a query's position, and every key
/// for a padding query, get probability 0.
///
/// # Shapes
/// `q`: `[group, n, head_dim]`, `k`: `[len, head_dim]`, `q_pos`: `n`, `k_pos`: `len`.
fn gumbel_col_sums(
    q: Tensor<3>,
    k: Tensor<2>,
    q_pos: &[u32],
    k_pos: &[u32],
    tau: f32,
    rng: &mut SplitMix64,
) -> Tensor<2> {
    let [g, n, d] = q.dims();
    let len = k.dims()[0];
    let device = q.device();
    let kt = k.transpose().reshape([1, d, len]);
    let kp: Vec<i32> = k_pos
        .iter()
        .map(|&p| i32::try_from(p).unwrap_or(i32::MAX - 1))
        .collect();
    let kp = Tensor::<1, Int>::from_data(TensorData::new(kp, [len]), &device)
        .cast(IntDType::I32)
        .reshape([1, 1, len]);
    let mut acc: Option<Tensor<2>> = None;
    let mut start = 0;
    while start < n {
        let rows = ROWS.min(n - start);
        let qc = q.clone().slice([0..g, start..start + rows, 0..d]);
        let z = qc.matmul(kt.clone()).div_scalar((d as f32).sqrt()); // [g, rows, len]
        let qp: Vec<i32> = q_pos[start..start + rows]
            .iter()
            .map(|&p| {
                if p == PAD {
                    -1
                } else {
                    i32::try_from(p).unwrap_or(i32::MAX - 1)
                }
            })
            .collect();
        let qp = Tensor::<1, Int>::from_data(TensorData::new(qp, [rows]), &device)
            .cast(IntDType::I32)
            .reshape([1, rows, 1]);
        let shape = [g, rows, len];
        let mask = kp.clone().expand(shape).greater(qp.expand(shape));
        let u = Tensor::<3>::from_data(
            TensorData::new(rng.uniforms(g * rows * len), shape),
            &device,
        );
        let noise = u.log().neg().log().neg();
        let y = (z + noise)
            .div_scalar(tau)
            .mask_fill(mask, f32::NEG_INFINITY);
        // A row that sees no key has max -inf; clamping keeps exp(-inf - MIN) = 0, no NaN.
        let m = y.clone().max_dim(2).clamp_min(f32::MIN);
        let e = (y - m).exp();
        let p = e.clone() / e.sum_dim(2).clamp_min(f32::MIN_POSITIVE);
        let c = p.sum_dim(1).reshape([g, len]);
        acc = Some(match acc {
            Some(a) => a + c,
            None => c,
        });
        start += rows;
    }
    acc.unwrap_or_else(|| Tensor::zeros([g, len], &device))
}

/// Keyformer as a decode-time policy over ragged storage.
///
/// Every [`attend`](KvCache::attend) adds, to each held token's score, the column sums of the
/// Gumbel softmax `softmax((z + g) / tau)` of the call's attention logits `z` (causal; `g`
/// i.i.d. standard Gumbel noise from the cache's own seeded generator), reduced over the query
/// heads of its KV head ([`KeyformerConfig::gqa`]). The temperature is `tau_init` during the
/// prompt and `tau_init + k * tau_delta` at the `k`-th decode call (the reference's
/// `itr_count`). The attention output itself is the ordinary softmax (the noise only steers
/// eviction).
///
/// With a budget of `B` tokens split into `recent = floor(B * recent_fraction)` and `key = B -
/// recent`: before a block of `m` tokens is stored, a stream keeps its `recent - m` newest
/// tokens (0 if `m >= recent`) plus its `key` best-scored older ones, so a decode query sees
/// `B` tokens, itself included, as in the reference (whose mask covers the next token).
/// [`end_prefill`](KvCache::end_prefill) resolves a fractional budget from the prompt length
/// and trims every stream to `key + recent`. Kept tokens carry their scores on (the reference
/// zeroes the scores of masked tokens; ours are freed). Scores are kept per sequence (the
/// reference sums them over the batch).
#[derive(Debug, Clone)]
pub struct KeyformerCache {
    config: KeyformerConfig,
    inner: RaggedCache,
    scores: HeavyHitters,
    /// `(recent, key)` per sequence, once known.
    budgets: Vec<Option<(usize, usize)>>,
    last_seen: Vec<Option<u32>>,
    rng: SplitMix64,
    /// Whether `end_prefill` has run (decode calls raise the temperature).
    prefill_over: bool,
    /// Decode attention calls since `end_prefill`.
    step: u32,
}

impl KeyformerCache {
    /// The configuration.
    pub fn config(&self) -> &KeyformerConfig {
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

    /// `(recent, key)` of sequence `b` once known.
    pub fn budget(&self, b: usize) -> Option<(usize, usize)> {
        self.budgets.get(b).copied().flatten()
    }

    /// The temperature the next attention call uses.
    pub fn tau(&self) -> f32 {
        let k = if self.prefill_over { self.step + 1 } else { 0 };
        self.config.tau_init + k as f32 * self.config.tau_delta
    }

    /// The rows every stream keeps to make room for `incoming` tokens per sequence: its `key`
    /// best-scored tokens plus its newest `recent - incoming`.
    fn keep_lists(&self, incoming: &[usize]) -> Vec<Vec<usize>> {
        let kvh = self.config.shape.kv_heads();
        let held = self.inner.lengths().held;
        (0..held.len())
            .map(|s| match self.budgets[s / kvh] {
                Some((recent, key)) => {
                    let pos = self.inner.positions(s / kvh, s % kvh);
                    let r = recent.saturating_sub(incoming[s / kvh]);
                    self.scores.keep_at(s, key, r, pos)
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

impl KvCache for KeyformerCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        self.inner.device()
    }

    fn append(&mut self, block: KvBlock) -> Result<()> {
        const OP: &str = "KeyformerCache::append";
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
                Some(rows) => self.scores.replace(si, rows),
                None => self.scores.push(si, counts[si / s.kv_heads()]),
            }
        }
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> Result<Attended> {
        let out = self.inner.attend(query, stats)?;
        let s = self.config.shape;
        let (g, d) = (s.group(), s.head_dim());
        let n = query.len();
        let tau = self.tau();
        for b in 0..s.batch() {
            let qpos = &query.positions()[b * n..(b + 1) * n];
            for h in 0..s.kv_heads() {
                let st = self.inner.stream(b, h);
                let Some(k) = st.keys else { continue };
                let len = st.positions.len();
                let q = query
                    .tensor()
                    .clone()
                    .slice([b..b + 1, h * g..(h + 1) * g, 0..n, 0..d])
                    .reshape([g, n, d]);
                let cols = gumbel_col_sums(q, k, qpos, st.positions, tau, &mut self.rng);
                let reduced = to_host(self.config.gqa.reduce(cols.reshape([1, 1, g, len])))?;
                self.scores.observe(b * s.kv_heads() + h, &reduced);
            }
        }
        if self.prefill_over {
            self.step += 1;
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
            let total = self.config.budget.resolve(logical[b]);
            if total == 0 {
                return Err(KvError::InvalidConfig {
                    field: "budget",
                    reason: format!(
                        "sequence {b}: the budget resolves to 0 tokens for a prompt of {}",
                        logical[b]
                    ),
                });
            }
            *slot = Some(self.config.split(total));
        }
        self.budgets = budgets;
        self.prefill_over = true;
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
        self.scores = HeavyHitters::new(self.config.shape.streams());
        self.budgets = self.config.fixed_budgets();
        self.last_seen = vec![None; self.config.shape.batch()];
        self.rng = SplitMix64::new(self.config.seed);
        self.prefill_over = false;
        self.step = 0;
    }
}
