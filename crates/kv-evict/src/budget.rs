//! Budget allocation: how many tokens each (sequence, KV head) of a layer keeps.
//!
//! Budgets follow kvpress: `ratio` is the fraction of tokens *removed* (`compression_ratio`)
//! and a stream of `n` tokens keeps `floor(n * (1 - ratio))`. [`UniformBudget`] gives every
//! layer and head the same fraction; [`PyramidBudget`] (kvpress `PyramidKVPress`) gives the
//! lower layers more and the upper layers less with the same average; [`AdaKvBudget`]
//! (kvpress `AdaKVPress`) gives the heads of a layer different budgets with the same layer
//! total, by a bottom-k over the scores of every head; [`CoverageBudget`] (LeanKV) gives every
//! head the smallest set of tokens covering a share of its score mass.

use core::fmt::Debug;

use kv_core::{KvError, Result};
use serde::{Deserialize, Serialize};

/// Tokens kept out of `n` at compression ratio `ratio` (kvpress: `int(n * (1 - ratio))`,
/// computed in f64 as Python does).
pub fn kept_for(n: usize, ratio: f64) -> usize {
    let k = (n as f64 * (1.0 - ratio)).floor();
    if k <= 0.0 { 0 } else { (k as usize).min(n) }
}

/// Checks that a ratio is a number in `[0, 1)`.
///
/// # Errors
/// [`KvError::InvalidConfig`] naming `ratio`.
pub fn check_ratio(ratio: f64) -> Result<()> {
    if (0.0..1.0).contains(&ratio) {
        Ok(())
    } else {
        Err(KvError::InvalidConfig {
            field: "ratio",
            reason: format!("{ratio} is not in [0, 1) (the fraction of tokens removed)"),
        })
    }
}

/// What an allocator sees when a layer is compressed.
#[derive(Debug, Clone, Copy)]
pub struct BudgetContext<'a> {
    /// Layer index.
    pub layer: usize,
    /// Number of layers of the model.
    pub num_layers: usize,
    /// KV heads per sequence (`held` and `scores` are `batch * kv_heads` long, row-major).
    pub kv_heads: usize,
    /// Tokens held per (sequence, KV head) before compression.
    pub held: &'a [usize],
    /// The scores of every stream (higher = keep), one list per (sequence, KV head).
    pub scores: &'a [Vec<f32>],
}

/// Decides how many tokens every (sequence, KV head) of a layer keeps.
pub trait BudgetAllocator: Debug + Send + Sync {
    /// Tokens to keep per stream, `ctx.held.len()` entries, each at most its `held`.
    ///
    /// # Errors
    /// A budget that cannot be met.
    fn allocate(&self, ctx: &BudgetContext<'_>) -> Result<Vec<usize>>;
}

/// The same ratio for every layer and KV head: `floor(n * (1 - ratio))` kept per stream.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UniformBudget {
    /// Fraction of tokens removed, in `[0, 1)`.
    pub ratio: f64,
}

impl UniformBudget {
    /// A validated uniform budget.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a ratio outside `[0, 1)`.
    pub fn new(ratio: f64) -> Result<Self> {
        check_ratio(ratio)?;
        Ok(UniformBudget { ratio })
    }
}

impl BudgetAllocator for UniformBudget {
    fn allocate(&self, ctx: &BudgetContext<'_>) -> Result<Vec<usize>> {
        check_ratio(self.ratio)?;
        Ok(ctx.held.iter().map(|&n| kept_for(n, self.ratio)).collect())
    }
}

/// kvpress's `round`: Python's `round`, half to even.
fn py_round(x: f64) -> usize {
    let r = x.round_ties_even();
    if r.is_finite() && r > 0.0 {
        r as usize
    } else {
        0
    }
}

/// PyramidKV's layer budgets (kvpress `PyramidKVPress.get_layer_budget`): the number of
/// tokens a layer keeps decreases linearly with depth, with the same average as the uniform
/// budget.
///
/// For a stream of `n` tokens, observation window `w` (SnapKV's, which is *inside* the
/// budget: the window tokens are scored `max + 1` and kept by the same top-k) and `L` layers,
/// in f64 as kvpress computes it:
///
/// ```text
/// avg = (w + n (1 - ratio)) - w          (kvpress: max_capacity_prompt - window_size)
/// min = avg / beta,  max = 2 avg - min
/// if max >= n - w:  max = n - w,  min = 2 avg - max
/// if not (n >= max >= min >= w):  every layer keeps round(n (1 - ratio))   (fallback)
/// else layer l keeps round(max - l (max - min) / (L - 1))
/// ```
///
/// `round` is Python's (half to even). The fallback is kvpress's "fall back to SnapKV", with
/// its `round` (the uniform budget floors; they differ only when `n (1 - ratio)` has a
/// fractional part of at least one half). A single-layer model (`L = 1`, where kvpress divides by
/// zero) takes the fallback. The sum over layers is `L * avg` up to `L / 2` of rounding.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PyramidBudget {
    /// Fraction of tokens removed on average, in `[0, 1)`.
    pub ratio: f64,
    /// The observation window counted inside the budget (SnapKV's `window`).
    pub window: usize,
    /// Steepness: the top layer keeps `1 / beta` of the average (kvpress default 20; `>= 1`).
    pub beta: f64,
}

impl PyramidBudget {
    /// A validated pyramid.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a ratio outside `[0, 1)` or a `beta` below 1 or not
    /// finite.
    pub fn new(ratio: f64, window: usize, beta: f64) -> Result<Self> {
        check_ratio(ratio)?;
        check_beta(beta)?;
        Ok(PyramidBudget {
            ratio,
            window,
            beta,
        })
    }

    /// The pyramid's `(max, min)` for a stream of `n` tokens, or `None` when it is infeasible
    /// (kvpress then falls back to the uniform budget).
    pub fn range(&self, n: usize) -> Option<(f64, f64)> {
        let (q, w) = (n as f64, self.window as f64);
        let max_capacity_prompt = w + q * (1.0 - self.ratio);
        let avg = max_capacity_prompt - w;
        let mut min = avg / self.beta;
        let mut max = avg * 2.0 - min;
        if max >= q - w {
            max = q - w;
            min = avg * 2.0 - max;
        }
        (q >= max && max >= min && min >= w).then_some((max, min))
    }

    /// Tokens kept by layer `layer` of `num_layers` out of a stream of `n` tokens.
    pub fn layer_budget(&self, n: usize, layer: usize, num_layers: usize) -> usize {
        match self.range(n) {
            Some((max, min)) if num_layers >= 2 => {
                let steps = (max - min) / (num_layers - 1) as f64;
                py_round(max - layer as f64 * steps).min(n)
            }
            _ => py_round(n as f64 * (1.0 - self.ratio)).min(n),
        }
    }
}

fn check_beta(beta: f64) -> Result<()> {
    if beta.is_finite() && beta >= 1.0 {
        Ok(())
    } else {
        Err(KvError::InvalidConfig {
            field: "beta",
            reason: format!("{beta} must be a number >= 1 (kvpress asserts beta >= 1)"),
        })
    }
}

impl BudgetAllocator for PyramidBudget {
    fn allocate(&self, ctx: &BudgetContext<'_>) -> Result<Vec<usize>> {
        check_ratio(self.ratio)?;
        check_beta(self.beta)?;
        if ctx.layer >= ctx.num_layers {
            return Err(KvError::InvalidConfig {
                field: "layer",
                reason: format!(
                    "layer {} is not below num_layers {}",
                    ctx.layer, ctx.num_layers
                ),
            });
        }
        Ok(ctx
            .held
            .iter()
            .map(|&n| self.layer_budget(n, ctx.layer, ctx.num_layers))
            .collect())
    }
}

/// Ada-KV's head-wise budgets, with kvpress `AdaKVPress` semantics.
///
/// Per sequence of a layer, with `n` tokens per KV head and `H` KV heads: `n_kept =
/// floor(n (1 - ratio))` (the uniform budget) and `n_safe = floor(n_kept * alpha_safeguard)`;
/// the `n_safe` best tokens of every head are protected, then the `H * (n - n_kept)` lowest
/// scores over *all* heads of the sequence are evicted. A head keeps its protected tokens plus
/// whatever of its own survived the global cut, so heads with concentrated scores give budget
/// to heads with spread-out ones, and the layer total is exactly `H * n_kept`. The head's kept
/// set is then its `b_h` best tokens (what [`keep_lists`](crate::keep_lists) selects).
///
/// Ties are broken towards the lower (head, token) index, as [`top_k_sorted`](crate::top_k_sorted)
/// does; NaN scores rank lowest. Heads of different lengths are allowed (each gets its own
/// `n_kept`; the cut is over their sum).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaKvBudget {
    /// Fraction of tokens removed per layer, in `[0, 1)`.
    pub ratio: f64,
    /// Fraction of the uniform budget every head keeps for sure, in `[0, 1]` (kvpress 0.20).
    pub alpha_safeguard: f64,
}

impl AdaKvBudget {
    /// A validated Ada-KV allocator.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a ratio outside `[0, 1)` or `alpha_safeguard` outside
    /// `[0, 1]`.
    pub fn new(ratio: f64, alpha_safeguard: f64) -> Result<Self> {
        check_ratio(ratio)?;
        check_alpha(alpha_safeguard)?;
        Ok(AdaKvBudget {
            ratio,
            alpha_safeguard,
        })
    }

    /// Budgets of the heads of one sequence, from their scores (one list per head).
    pub fn head_budgets(&self, scores: &[&[f32]]) -> Vec<usize> {
        let key = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s };
        // (protected, score, head, token) for every entry; higher protected/score first.
        let mut entries: Vec<(bool, f32, usize, usize)> = Vec::new();
        let mut total_kept = 0;
        for (h, s) in scores.iter().enumerate() {
            let n_kept = kept_for(s.len(), self.ratio);
            let n_safe = ((n_kept as f64) * self.alpha_safeguard).floor() as usize;
            total_kept += n_kept;
            let safe = crate::select::top_k_sorted(s, n_safe.min(n_kept));
            let mut protected = vec![false; s.len()];
            for &j in &safe {
                protected[j] = true;
            }
            entries.extend(
                s.iter()
                    .enumerate()
                    .map(|(j, &x)| (protected[j], key(x), h, j)),
            );
        }
        let by_rank = |a: &(bool, f32, usize, usize), b: &(bool, f32, usize, usize)| {
            b.0.cmp(&a.0)
                .then(b.1.total_cmp(&a.1))
                .then((a.2, a.3).cmp(&(b.2, b.3)))
        };
        let mut budgets = vec![0; scores.len()];
        if total_kept == 0 {
            return budgets;
        }
        if total_kept < entries.len() {
            entries.select_nth_unstable_by(total_kept - 1, by_rank);
            entries.truncate(total_kept);
        }
        for e in &entries {
            budgets[e.2] += 1;
        }
        budgets
    }
}

fn check_alpha(alpha: f64) -> Result<()> {
    if (0.0..=1.0).contains(&alpha) {
        Ok(())
    } else {
        Err(KvError::InvalidConfig {
            field: "alpha_safeguard",
            reason: format!("{alpha} is not in [0, 1]"),
        })
    }
}

impl BudgetAllocator for AdaKvBudget {
    fn allocate(&self, ctx: &BudgetContext<'_>) -> Result<Vec<usize>> {
        check_ratio(self.ratio)?;
        check_alpha(self.alpha_safeguard)?;
        let h = ctx.kv_heads.max(1);
        if ctx.held.len() != ctx.scores.len() || !ctx.held.len().is_multiple_of(h) {
            return Err(KvError::ShapeMismatch {
                op: "AdaKvBudget::allocate",
                what: "score lists (batch * kv_heads)",
                expected: ctx.held.len(),
                got: ctx.scores.len(),
            });
        }
        if let Some(s) = (0..ctx.held.len()).find(|&s| ctx.scores[s].len() != ctx.held[s]) {
            return Err(KvError::ShapeMismatch {
                op: "AdaKvBudget::allocate",
                what: "scores of a stream",
                expected: ctx.held[s],
                got: ctx.scores[s].len(),
            });
        }
        let mut out = Vec::with_capacity(ctx.held.len());
        for seq in ctx.scores.chunks(h) {
            let lists: Vec<&[f32]> = seq.iter().map(Vec::as_slice).collect();
            out.extend(self.head_budgets(&lists));
        }
        Ok(out)
    }
}

/// How [`CoverageBudget`] turns a stream's scores into a distribution over its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MassNorm {
    /// `p_j = max(s_j, 0) / Σ max(s, 0)`: for scores that are attention masses (SnapKV, TOVA,
    /// ObservedAttention, ExpectedAttention, StreamingLLM's 0/1).
    Proportional,
    /// `p_j = exp(s_j - max s) / Σ exp(s - max s)`: for scores that are not masses and can be
    /// negative (KNorm's `-‖k‖`, KeyDiff's `-cos`), read as logits.
    Softmax,
}

impl MassNorm {
    /// The normalisation for the scores of `scorer`: softmax for the key-geometry scorers
    /// (`knorm`, `keydiff`), proportional for the attention-mass scorers.
    pub fn for_scorer(scorer: &crate::ScorerConfig) -> Self {
        match scorer {
            crate::ScorerConfig::Knorm | crate::ScorerConfig::KeyDiff => MassNorm::Softmax,
            _ => MassNorm::Proportional,
        }
    }

    /// The normalisation when the scorer is unknown: proportional when no score is negative,
    /// softmax otherwise.
    pub fn infer(scores: &[f32]) -> Self {
        if scores.iter().any(|&s| s < 0.0) {
            MassNorm::Softmax
        } else {
            MassNorm::Proportional
        }
    }

    /// Unnormalised weights (NaN scores weigh 0; all weights 0 or non-finite sums become
    /// uniform weights).
    fn weights(self, scores: &[f32]) -> Vec<f64> {
        let w: Vec<f64> = match self {
            MassNorm::Proportional => scores
                .iter()
                .map(|&s| {
                    if s.is_nan() {
                        0.0
                    } else {
                        f64::from(s.max(0.0))
                    }
                })
                .collect(),
            MassNorm::Softmax => {
                let top = scores
                    .iter()
                    .copied()
                    .filter(|s| !s.is_nan())
                    .fold(f32::NEG_INFINITY, f32::max);
                scores
                    .iter()
                    .map(|&s| {
                        if s.is_nan() {
                            0.0
                        } else {
                            (f64::from(s) - f64::from(top)).exp()
                        }
                    })
                    .collect()
            }
        };
        let total: f64 = w.iter().sum();
        if total > 0.0 && total.is_finite() {
            w
        } else {
            vec![1.0; scores.len()]
        }
    }
}

/// LeanKV's per-head dynamic sparsity: every (sequence, KV head) keeps the smallest set of its
/// tokens whose normalised scores cover `mass` of the head's total, so budgets differ per
/// head (and per sequence) and follow how concentrated each head's scores are.
///
/// Per stream of `n` tokens: the `pinned_front` first and `pinned_back` last tokens (those a
/// scorer always keeps with kvpress's `max + 1`: SnapKV's window, TOVA's last token,
/// ExpectedAttention's sinks) are kept and left out of the mass; the others' scores become a
/// distribution `p` ([`MassNorm`]); sorted by decreasing `p`, tokens are taken until their sum
/// reaches `mass` (within a relative `1e-6`, so that `0.5 + 0.3` covers `0.8` in floating
/// point). The budget is `pinned + taken`; the kept set is then the stream's best `budget`
/// tokens ([`keep_lists`](crate::keep_lists)), which are exactly the pinned and taken ones.
/// `ratio` plays no part.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoverageBudget {
    /// Share of the score mass to keep, in `(0, 1]`.
    pub mass: f64,
    /// Leading tokens always kept, outside the mass.
    pub pinned_front: usize,
    /// Trailing tokens always kept, outside the mass.
    pub pinned_back: usize,
    /// The normalisation (`None`: [`MassNorm::infer`] per stream).
    pub norm: Option<MassNorm>,
}

impl CoverageBudget {
    /// A validated coverage allocator with nothing pinned and an inferred normalisation.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a `mass` outside `(0, 1]`.
    pub fn new(mass: f64) -> Result<Self> {
        check_mass(mass)?;
        Ok(CoverageBudget {
            mass,
            pinned_front: 0,
            pinned_back: 0,
            norm: None,
        })
    }

    /// Sets the pinned tokens.
    pub fn with_pinned(mut self, front: usize, back: usize) -> Self {
        self.pinned_front = front;
        self.pinned_back = back;
        self
    }

    /// Sets the normalisation.
    pub fn with_norm(mut self, norm: MassNorm) -> Self {
        self.norm = Some(norm);
        self
    }

    /// The coverage allocator fitted to a scorer: its always-kept tokens pinned and its
    /// normalisation ([`MassNorm::for_scorer`]).
    ///
    /// # Errors
    /// As [`CoverageBudget::new`].
    pub fn for_scorer(mass: f64, scorer: &crate::ScorerConfig) -> Result<Self> {
        let (front, back) = match *scorer {
            crate::ScorerConfig::SnapKv { window, .. } => (0, window),
            crate::ScorerConfig::Tova => (0, 1),
            crate::ScorerConfig::ExpectedAttention { n_sink, .. } => (n_sink, 0),
            _ => (0, 0),
        };
        Ok(Self::new(mass)?
            .with_pinned(front, back)
            .with_norm(MassNorm::for_scorer(scorer)))
    }

    /// Tokens one stream keeps given its scores.
    pub fn stream_budget(&self, scores: &[f32]) -> usize {
        let n = scores.len();
        let front = self.pinned_front.min(n);
        let back = self.pinned_back.min(n - front);
        let cand = &scores[front..n - back];
        if cand.is_empty() {
            return n;
        }
        let norm = self.norm.unwrap_or_else(|| MassNorm::infer(cand));
        let mut w = norm.weights(cand);
        let total: f64 = w.iter().sum();
        let goal = self.mass * total * (1.0 - 1e-6);
        w.sort_unstable_by(|a, b| b.total_cmp(a));
        let mut cum = 0.0;
        let mut taken = 0;
        for x in w {
            cum += x;
            taken += 1;
            if cum >= goal {
                break;
            }
        }
        front + back + taken
    }
}

fn check_mass(mass: f64) -> Result<()> {
    if mass > 0.0 && mass <= 1.0 {
        Ok(())
    } else {
        Err(KvError::InvalidConfig {
            field: "mass",
            reason: format!("{mass} is not a share of the score mass in (0, 1]"),
        })
    }
}

impl BudgetAllocator for CoverageBudget {
    fn allocate(&self, ctx: &BudgetContext<'_>) -> Result<Vec<usize>> {
        check_mass(self.mass)?;
        if ctx.held.len() != ctx.scores.len() {
            return Err(KvError::ShapeMismatch {
                op: "CoverageBudget::allocate",
                what: "score lists (batch * kv_heads)",
                expected: ctx.held.len(),
                got: ctx.scores.len(),
            });
        }
        if let Some(s) = (0..ctx.held.len()).find(|&s| ctx.scores[s].len() != ctx.held[s]) {
            return Err(KvError::ShapeMismatch {
                op: "CoverageBudget::allocate",
                what: "scores of a stream",
                expected: ctx.held[s],
                got: ctx.scores[s].len(),
            });
        }
        Ok(ctx.scores.iter().map(|s| self.stream_budget(s)).collect())
    }
}

/// The serialisable choice of allocator.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetKind {
    /// [`UniformBudget`] (kvpress's `ScorerPress`).
    #[default]
    Uniform,
    /// [`PyramidBudget`] (kvpress's `PyramidKVPress`); the window is the scorer's.
    Pyramid {
        /// Steepness (kvpress default 20).
        #[serde(default = "default_beta")]
        beta: f64,
    },
    /// [`AdaKvBudget`] (kvpress's `AdaKVPress`).
    AdaKv {
        /// Fraction of the uniform budget every head keeps for sure (kvpress default 0.20).
        #[serde(default = "default_alpha")]
        alpha_safeguard: f64,
    },
    /// [`CoverageBudget`] (LeanKV's per-head dynamic sparsity); the compression ratio is
    /// ignored.
    Coverage {
        /// Share of each head's score mass to keep, in `(0, 1]`.
        mass: f64,
    },
    /// [`HeadKvBudget`](crate::HeadKvBudget) (HeadKV's static head budgets); needs the
    /// head-importance artefact ([`EvictConfig::head_importance`](crate::EvictConfig)).
    HeadKv {
        /// Pool steepness, `> 1` (KVCache-Factory default 1.01).
        #[serde(default = "default_headkv_beta")]
        beta: f64,
        /// Exponent applied to the head distribution (HeadKV's `temp`, default 1).
        #[serde(default = "default_temp")]
        temp: f64,
    },
}

fn default_headkv_beta() -> f64 {
    1.01
}

fn default_temp() -> f64 {
    1.0
}

fn default_beta() -> f64 {
    20.0
}

fn default_alpha() -> f64 {
    0.2
}

impl BudgetKind {
    /// PyramidKV with kvpress's `beta = 20`.
    pub const PYRAMID: BudgetKind = BudgetKind::Pyramid { beta: 20.0 };
    /// Ada-KV with kvpress's `alpha_safeguard = 0.20`.
    pub const ADAKV: BudgetKind = BudgetKind::AdaKv {
        alpha_safeguard: 0.2,
    };

    /// The registry-style name (`uniform`, `pyramid`, `adakv`).
    pub fn name(self) -> &'static str {
        match self {
            BudgetKind::Uniform => "uniform",
            BudgetKind::Pyramid { .. } => "pyramid",
            BudgetKind::AdaKv { .. } => "adakv",
            BudgetKind::Coverage { .. } => "coverage",
            BudgetKind::HeadKv { .. } => "headkv",
        }
    }

    /// The allocator for this kind at compression ratio `ratio`; `window` is the scorer's
    /// observation window (counted inside PyramidKV's budgets, as kvpress does).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a ratio outside `[0, 1)` or a bad `beta` or
    /// `alpha_safeguard`; always for [`BudgetKind::HeadKv`], which needs its artefact
    /// (built by [`EvictConfig::init`](crate::EvictConfig::init)).
    pub fn allocator(self, ratio: f64, window: usize) -> Result<Box<dyn BudgetAllocator>> {
        match self {
            BudgetKind::Uniform => Ok(Box::new(UniformBudget::new(ratio)?)),
            BudgetKind::Pyramid { beta } => Ok(Box::new(PyramidBudget::new(ratio, window, beta)?)),
            BudgetKind::AdaKv { alpha_safeguard } => {
                Ok(Box::new(AdaKvBudget::new(ratio, alpha_safeguard)?))
            }
            BudgetKind::Coverage { mass } => {
                Ok(Box::new(CoverageBudget::new(mass)?.with_pinned(0, window)))
            }
            BudgetKind::HeadKv { .. } => Err(KvError::InvalidConfig {
                field: "head_importance",
                reason: "the headkv budget needs the model's head-importance artefact \
                         (EvictConfig::with_head_importance)"
                    .into(),
            }),
        }
    }

    /// The allocator for this kind fitted to `scorer`: as [`BudgetKind::allocator`] with the
    /// scorer's window, and for [`BudgetKind::Coverage`] the scorer's always-kept tokens
    /// pinned and its normalisation ([`CoverageBudget::for_scorer`]).
    ///
    /// # Errors
    /// As [`BudgetKind::allocator`].
    pub fn allocator_for(
        self,
        ratio: f64,
        scorer: &crate::ScorerConfig,
    ) -> Result<Box<dyn BudgetAllocator>> {
        match self {
            BudgetKind::Coverage { mass } => {
                Ok(Box::new(CoverageBudget::for_scorer(mass, scorer)?))
            }
            other => other.allocator(ratio, scorer.needs().window),
        }
    }
}
