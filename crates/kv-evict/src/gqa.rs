//! Reduction of per-query-head scores to per-KV-head scores under grouped-query attention.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// How the `group` query heads that share one KV head are combined into one score per KV
/// head. kvpress (and Ada-KV's `gqa_func`) use the mean; the official SnapKV and H2O code
/// score repeated KV per query head, which has no GQA reduction (and no memory saving).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GqaReduce {
    /// Mean over the group (kvpress).
    #[default]
    Mean,
    /// Maximum over the group.
    Max,
    /// Sum over the group (the mean times `group`: same selection, different scale).
    Sum,
}

impl GqaReduce {
    /// Parses `mean`, `max` or `sum`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "mean" => Some(GqaReduce::Mean),
            "max" => Some(GqaReduce::Max),
            "sum" => Some(GqaReduce::Sum),
            _ => None,
        }
    }

    /// Reduces `[batch, kv_heads, group, n]` to `[batch, kv_heads, n]`.
    pub fn reduce(self, t: Tensor<4>) -> Tensor<3> {
        let [b, h, _, n] = t.dims();
        let r = match self {
            GqaReduce::Mean => t.mean_dim(2),
            GqaReduce::Max => t.max_dim(2),
            GqaReduce::Sum => t.sum_dim(2),
        };
        r.reshape([b, h, n])
    }
}
