//! HeadKV (Fu et al. 2024, arXiv 2410.19258): static per-head budgets from head importance
//! scores measured offline, here by the retrieval (copy) test of FYYFU/HeadKV's
//! `retrieval_head_detection.py`, stored as a versioned JSON artefact.
//!
//! Three pieces: [`HeadImportance`] (the artefact: load, validate against the model, the
//! per-KV-head distribution), [`HeadKvBudget`] (the allocator) and the calibration
//! ([`RetrievalProbe`] records which token every query head attends most while the model
//! generates; [`retrieval_scores`] turns one needle trial into per-head scores).

use std::sync::{Arc, Mutex};

use burn::prelude::*;
use kv_core::{
    Attended, HeldBuffer, KvBlock, KvCache, KvError, KvShape, KvView, Lengths, MemoryReport, Query,
    RaggedCache, RaggedCacheConfig, Result, StatsRequest,
};
use serde::{Deserialize, Serialize};

use crate::budget::{BudgetAllocator, BudgetContext, check_ratio, kept_for};
use crate::score::to_host;

/// The `format` tag of a [`HeadImportance`] artefact.
pub const HEAD_IMPORTANCE_FORMAT: &str = "kv-evict/head-importance";
/// The artefact version this crate reads and writes.
pub const HEAD_IMPORTANCE_VERSION: u32 = 1;

/// Per-head importance scores of one model, measured offline (HeadKV's head scores): a
/// versioned, serialisable calibration artefact.
///
/// Scores are per **query head** (`scores[layer][q_head]`, HeadKV's layout); budgets are per
/// KV head, so [`kv_head_distribution`](HeadImportance::kv_head_distribution) averages the
/// query heads of each group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadImportance {
    /// Always [`HEAD_IMPORTANCE_FORMAT`].
    pub format: String,
    /// Always [`HEAD_IMPORTANCE_VERSION`] for this crate.
    pub version: u32,
    /// The model the scores were measured on.
    pub model: String,
    /// Layers of the model.
    pub num_layers: usize,
    /// Query heads per layer.
    pub q_heads: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// How the scores were measured (free text: method, data, trials).
    pub method: String,
    /// Calibration trials the scores average (successful retrievals).
    pub trials: usize,
    /// Mean score per layer and query head, `num_layers` rows of `q_heads`, each `>= 0`.
    pub scores: Vec<Vec<f64>>,
}

impl HeadImportance {
    /// Parses and checks an artefact.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] (field `head_importance`) for malformed JSON, another format
    /// or version, a table whose shape disagrees with its own header, or scores that are
    /// negative or not finite.
    pub fn from_json(json: &str) -> Result<Self> {
        let a: HeadImportance = serde_json::from_str(json)
            .map_err(|e| bad(format!("not a head-importance artefact: {e}")))?;
        a.check()?;
        Ok(a)
    }

    /// The artefact as pretty JSON.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] if serialisation fails (not expected).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| bad(format!("serialising: {e}")))
    }

    /// Checks the header and the table.
    ///
    /// # Errors
    /// As [`HeadImportance::from_json`].
    pub fn check(&self) -> Result<()> {
        if self.format != HEAD_IMPORTANCE_FORMAT {
            return Err(bad(format!(
                "format `{}`, expected `{HEAD_IMPORTANCE_FORMAT}`",
                self.format
            )));
        }
        if self.version != HEAD_IMPORTANCE_VERSION {
            return Err(bad(format!(
                "version {} is not supported (this build reads version {HEAD_IMPORTANCE_VERSION})",
                self.version
            )));
        }
        if self.kv_heads == 0 || !self.q_heads.is_multiple_of(self.kv_heads) || self.num_layers == 0
        {
            return Err(bad(format!(
                "header: {} layers, {} query heads, {} KV heads",
                self.num_layers, self.q_heads, self.kv_heads
            )));
        }
        if self.scores.len() != self.num_layers {
            return Err(bad(format!(
                "{} score rows for {} layers",
                self.scores.len(),
                self.num_layers
            )));
        }
        for (l, row) in self.scores.iter().enumerate() {
            if row.len() != self.q_heads {
                return Err(bad(format!(
                    "layer {l}: {} scores for {} query heads",
                    row.len(),
                    self.q_heads
                )));
            }
            if let Some(x) = row.iter().find(|x| !(x.is_finite() && **x >= 0.0)) {
                return Err(bad(format!(
                    "layer {l}: score {x} is not a finite number >= 0"
                )));
            }
        }
        Ok(())
    }

    /// Checks that the artefact was measured on a model of this shape.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] (field `head_importance`) naming what differs.
    pub fn check_model(&self, num_layers: usize, shape: &KvShape) -> Result<()> {
        self.check()?;
        let want = (
            num_layers,
            shape.q_heads(),
            shape.kv_heads(),
            shape.head_dim(),
        );
        let got = (self.num_layers, self.q_heads, self.kv_heads, self.head_dim);
        if want != got {
            return Err(bad(format!(
                "the artefact of `{}` has (layers, query heads, KV heads, head_dim) = {got:?}, \
                 the model {want:?}",
                self.model
            )));
        }
        Ok(())
    }

    /// HeadKV's head distribution per layer and KV head: the scores of each KV head's query
    /// heads averaged, normalised over all layers and heads, raised to `temp` and normalised
    /// again (`p = s / Σ s; p = p^temp / Σ p^temp`). All zeros give the uniform distribution.
    pub fn kv_head_distribution(&self, temp: f64) -> Vec<Vec<f64>> {
        let g = self.q_heads / self.kv_heads.max(1);
        let s: Vec<Vec<f64>> = self
            .scores
            .iter()
            .map(|row| {
                row.chunks(g.max(1))
                    .map(|c| c.iter().sum::<f64>() / c.len() as f64)
                    .collect()
            })
            .collect();
        let cells = (self.num_layers * self.kv_heads).max(1) as f64;
        let total: f64 = s.iter().flatten().sum();
        let p: Vec<Vec<f64>> = if total > 0.0 {
            s.iter()
                .map(|r| r.iter().map(|x| (x / total).powf(temp)).collect())
                .collect()
        } else {
            vec![vec![1.0 / cells; self.kv_heads]; self.num_layers]
        };
        let total: f64 = p.iter().flatten().sum();
        p.into_iter()
            .map(|r| r.into_iter().map(|x| x / total).collect())
            .collect()
    }
}

fn bad(reason: String) -> KvError {
    KvError::InvalidConfig {
        field: "head_importance",
        reason,
    }
}

/// Torch's `round` (half to even) of a non-negative value.
fn round_even(x: f64) -> usize {
    let r = x.round_ties_even();
    if r.is_finite() && r > 0.0 {
        r as usize
    } else {
        0
    }
}

/// HeadKV's static head budgets (FYYFU/HeadKV `ReasonSnapKVCluster`, with Ada-KV's and
/// kvpress's convention that the observation window is inside the budget).
///
/// For a stream of `n` tokens at compression ratio `ratio`, the uniform budget is `B =
/// floor(n (1 - ratio))` and `B' = B - window` the part outside the window (HeadKV's
/// `base_capacity - window_size`). A share `floor(B' / beta)` of every head's budget goes into
/// a pool shared by all `L` layers and `H` KV heads, redistributed by the head distribution
/// `p` ([`HeadImportance::kv_head_distribution`]):
///
/// ```text
/// b_{l,h} = round(p_{l,h} * floor(B' / beta) * L * H + B' - floor(B' / beta)) + window
/// ```
///
/// (`round` half to even, as torch). Uniform `p` gives every head `B`; a head with `p = 0`
/// keeps `B' - floor(B' / beta)` plus the window; the sum over the model is `L H B` up to
/// rounding. A head cannot hold more than its `n` tokens: where the formula asks for more,
/// the head is capped and its excess pool share goes to the uncapped heads in proportion to
/// their `p` (evenly if theirs are all 0), repeated until no head overflows (water-filling),
/// so the total stays `L H B`. The reference slices instead and loses the excess; at its
/// budgets (a few hundred tokens of 8k+ contexts) no head overflows and the two agree.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadKvBudget {
    /// Fraction of tokens removed on average, in `[0, 1)`.
    pub ratio: f64,
    /// The observation window counted inside the budget (the scorer's).
    pub window: usize,
    /// Pool steepness (`beta > 1`; KVCache-Factory's default 1.01, HeadKV sweeps 1.005 to 10).
    pub beta: f64,
    /// The layer this allocator serves.
    pub layer: usize,
    /// `p` of every layer and KV head.
    pub distribution: Vec<Vec<f64>>,
}

impl HeadKvBudget {
    /// The allocator of layer `layer` from an artefact.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a ratio outside `[0, 1)`, `beta <= 1` or not finite,
    /// `temp` not finite, or a layer outside the artefact.
    pub fn new(
        importance: &HeadImportance,
        layer: usize,
        ratio: f64,
        window: usize,
        beta: f64,
        temp: f64,
    ) -> Result<Self> {
        check_ratio(ratio)?;
        check_headkv(beta, temp)?;
        importance.check()?;
        if layer >= importance.num_layers {
            return Err(bad(format!(
                "layer {layer} is not among the artefact's {} layers",
                importance.num_layers
            )));
        }
        Ok(HeadKvBudget {
            ratio,
            window,
            beta,
            layer,
            distribution: importance.kv_head_distribution(temp),
        })
    }

    /// This layer's `p` per KV head.
    pub fn shares(&self) -> &[f64] {
        &self.distribution[self.layer]
    }

    /// The budgets of this layer's KV heads for streams of `n` tokens.
    pub fn budgets(&self, n: usize) -> Vec<usize> {
        let b = kept_for(n, self.ratio);
        let w = self.window.min(b);
        let base = (b - w) as f64;
        let pool_per = (base / self.beta).floor();
        let floor = base - pool_per;
        let cells: Vec<f64> = self.distribution.iter().flatten().copied().collect();
        let pool = pool_per * cells.len() as f64;
        // The most a head can take from the pool.
        let cap = ((n - w) as f64 - floor).max(0.0);
        let mut capped = vec![false; cells.len()];
        let extra = loop {
            let free: Vec<usize> = (0..cells.len()).filter(|&i| !capped[i]).collect();
            let left = pool - cap * (cells.len() - free.len()) as f64;
            let mass: f64 = free.iter().map(|&i| cells[i]).sum();
            let weight = |i: usize| {
                if mass > 0.0 {
                    cells[i] / mass
                } else {
                    1.0 / free.len().max(1) as f64
                }
            };
            let over: Vec<usize> = free
                .iter()
                .copied()
                .filter(|&i| weight(i) * left > cap)
                .collect();
            if over.is_empty() {
                let mut e = vec![cap; cells.len()];
                for &i in &free {
                    e[i] = weight(i) * left.max(0.0);
                }
                break e;
            }
            for i in over {
                capped[i] = true;
            }
        };
        let h = self.shares().len();
        extra[self.layer * h..(self.layer + 1) * h]
            .iter()
            .map(|&x| (round_even(x + floor) + w).min(n))
            .collect()
    }

    /// The budget of this layer's KV head `head` for a stream of `n` tokens.
    ///
    /// # Panics
    /// If `head` is not below the number of KV heads.
    pub fn head_budget(&self, n: usize, head: usize) -> usize {
        self.budgets(n)[head]
    }
}

pub(crate) fn check_headkv(beta: f64, temp: f64) -> Result<()> {
    if !(beta.is_finite() && beta > 1.0) {
        return Err(KvError::InvalidConfig {
            field: "beta",
            reason: format!("{beta} must be a number > 1 (HeadKV's pool is floor(B / beta))"),
        });
    }
    if !temp.is_finite() {
        return Err(KvError::InvalidConfig {
            field: "temp",
            reason: format!("{temp} is not finite"),
        });
    }
    Ok(())
}

impl BudgetAllocator for HeadKvBudget {
    fn allocate(&self, ctx: &BudgetContext<'_>) -> Result<Vec<usize>> {
        let h = ctx.kv_heads.max(1);
        if h != self.shares().len() || ctx.layer != self.layer {
            return Err(bad(format!(
                "layer {} with {h} KV heads does not match the allocator (layer {}, {} KV heads)",
                ctx.layer,
                self.layer,
                self.shares().len()
            )));
        }
        Ok(ctx
            .held
            .iter()
            .enumerate()
            .map(|(s, &n)| self.budgets(n)[s % h])
            .collect())
    }
}

/// What a [`RetrievalProbe`] records: for every layer and attention call, the position of the
/// held token each query head's last query attends most (ties: the earlier), one entry per
/// query head.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProbeLog {
    /// `calls[layer][call][q_head]`.
    pub calls: Vec<Vec<Vec<u32>>>,
}

/// A plain ragged cache that records, for every [`attend`](KvCache::attend), the top-1
/// attended position of each query head's last query (HeadKV's `attentions[l][0][h][-1]
/// .topk(1)`), into a log shared by all layers of a model. Calibration only: batch 1.
#[derive(Debug)]
pub struct RetrievalProbe {
    layer: usize,
    inner: RaggedCache,
    log: Arc<Mutex<ProbeLog>>,
}

impl RetrievalProbe {
    /// A probe for layer `layer` of a model with `shape`, writing into `log`.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a batch other than 1.
    pub fn new(
        layer: usize,
        shape: KvShape,
        log: Arc<Mutex<ProbeLog>>,
        device: &Device,
    ) -> Result<Self> {
        if shape.batch() != 1 {
            return Err(KvError::InvalidConfig {
                field: "batch",
                reason: format!(
                    "the retrieval probe records one sequence, not {}",
                    shape.batch()
                ),
            });
        }
        Ok(RetrievalProbe {
            layer,
            inner: RaggedCacheConfig::new(shape).init(device)?,
            log,
        })
    }
}

impl KvCache for RetrievalProbe {
    fn shape(&self) -> KvShape {
        self.inner.shape()
    }

    fn device(&self) -> &Device {
        self.inner.device()
    }

    fn append(&mut self, block: KvBlock) -> Result<()> {
        self.inner.append(block)
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> Result<Attended> {
        let request = StatsRequest {
            column_sums: stats.column_sums,
            last_row: true,
        };
        let mut out = self.inner.attend(query, request)?;
        if let Some(rows) = out.stats.last_row.clone() {
            let [_, kvh, g, width] = rows.dims();
            let host = to_host(rows)?;
            let mut top = Vec::with_capacity(kvh * g);
            for h in 0..kvh {
                let pos = self.inner.stream(0, h).positions.to_vec();
                for j in 0..g {
                    let row = &host[(h * g + j) * width..(h * g + j + 1) * width];
                    let best = (0..pos.len())
                        .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
                        .map_or(kv_core::PAD, |i| pos[i]);
                    top.push(best);
                }
            }
            let mut log = self
                .log
                .lock()
                .map_err(|_| bad("the probe log's lock is poisoned".into()))?;
            if log.calls.len() <= self.layer {
                log.calls.resize(self.layer + 1, Vec::new());
            }
            log.calls[self.layer].push(top);
        }
        if !stats.last_row {
            out.stats.last_row = None;
        }
        Ok(out)
    }

    fn view(&self) -> KvView {
        self.inner.view()
    }

    fn lengths(&self) -> Lengths {
        self.inner.lengths()
    }

    fn memory(&self) -> MemoryReport {
        self.inner.memory()
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        self.inner.held_buffers()
    }

    fn reset(&mut self) {
        self.inner.reset();
    }
}

/// HeadKV's retrieval score of one needle trial, per layer and query head
/// (`retrieval_calculate`): call `k` of the log is the query whose prediction is `output[k]`
/// (the prefill's last row, then each decode step); a head scores `1 / needle_len` at call `k`
/// when its top-1 position lies in the needle span and the prompt token there equals `output[k]`
/// (the head copies the needle).
///
/// # Errors
/// [`KvError::InvalidConfig`] (field `head_importance`) if the log's layers have fewer calls
/// than outputs, or the needle span is empty or outside the prompt.
pub fn retrieval_scores(
    log: &ProbeLog,
    prompt: &[u32],
    needle: core::ops::Range<usize>,
    output: &[u32],
) -> Result<Vec<Vec<f64>>> {
    if needle.is_empty() || needle.end > prompt.len() {
        return Err(bad(format!(
            "needle span {needle:?} is empty or outside the prompt of {}",
            prompt.len()
        )));
    }
    let unit = 1.0 / needle.len() as f64;
    let mut out = Vec::with_capacity(log.calls.len());
    for (l, calls) in log.calls.iter().enumerate() {
        if calls.len() < output.len() {
            return Err(bad(format!(
                "layer {l} logged {} calls for {} generated tokens",
                calls.len(),
                output.len()
            )));
        }
        let heads = calls.first().map_or(0, Vec::len);
        let mut row = vec![0.0; heads];
        for (k, &tok) in output.iter().enumerate() {
            for (h, &p) in calls[k].iter().enumerate() {
                let p = p as usize;
                if needle.contains(&p) && prompt[p] == tok {
                    row[h] += unit;
                }
            }
        }
        out.push(row);
    }
    Ok(out)
}
