//! Budget allocation: how many tokens each (sequence, KV head) of a layer keeps.
//!
//! Budgets follow kvpress: `ratio` is the fraction of tokens *removed* (`compression_ratio`)
//! and a stream of `n` tokens keeps `floor(n * (1 - ratio))`. [`UniformBudget`] gives every
//! layer and head the same fraction; the [`BudgetAllocator`] trait also receives the layer
//! index and the scores, which is what layer-wise (PyramidKV) and head-wise (Ada-KV, HeadKV)
//! allocators need.

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

/// The serialisable choice of allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetKind {
    /// [`UniformBudget`] (kvpress's `ScorerPress`).
    #[default]
    Uniform,
}

impl BudgetKind {
    /// The allocator for this kind at compression ratio `ratio`.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a ratio outside `[0, 1)`.
    pub fn allocator(self, ratio: f64) -> Result<Box<dyn BudgetAllocator>> {
        match self {
            BudgetKind::Uniform => Ok(Box::new(UniformBudget::new(ratio)?)),
        }
    }
}
