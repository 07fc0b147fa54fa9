//! Palu's Fisher-information rank allocation: layers whose key or value projection matters
//! more to the loss get larger latents.
//!
//! # What it does (shadowpa0327/Palu `palu/rank_search.py`, search method `fisher_uniform`)
//! Calibration (`kv-eval fisher`, autodiff through the whole model) gives, for every layer's
//! key and value projection `W`, the Fisher information `F = mean_w sqrt(mean_s (∂L/∂w)²)`
//! over the calibration sequences `s` and the weights `w` of the module ([`PaluFisher`]).
//! With `M = 2·layers` modules of `kv_heads·head_dim` output channels each and a kept-rank
//! ratio `ρ` (Palu's `--param_ratio_target`), the total rank `T = round(ρ·M·kv_heads·head_dim)`
//! is shared out in proportion to the modules' Fisher information:
//!
//! 1. `r_m = min(cap, ⌊T·F_m / Σ F⌋)`;
//! 2. the remainder `T − Σ r_m` is handed out one rank at a time, cycling over the modules
//!    in increasing order of `T·F_m/ΣF − r_m` (the reference's order) and skipping full ones;
//! 3. each module's rank is split evenly over its KV heads (`r_m / kv_heads`, Palu's
//!    `split_values` for M-LRD) and rounded to a multiple of the block size `b`
//!    (`max(1, round(r / b))·b`, ties to even as Python's `round`), at most `head_dim`.
//!
//! The rounding means the kept ratio is only approximately `ρ`; [`PaluAllocation`] reports
//! the ratio actually reached. The reference rounds to blocks of 32 for heads of 128
//! channels grouped by 4; on heads of 64 channels a block of 32 leaves only the ranks 32
//! and 64, so smaller blocks are worth trying (`block=8`, `block=16`).

use std::path::Path;

use kv_core::{KvError, KvShape};
use serde::{Deserialize, Serialize};

/// The artefact's format version.
pub const PALU_FISHER_FORMAT: u32 = 1;

/// Palu's block size for rounding ranks (`rounding_search_result(config, block_size=32)`).
pub const PALU_RANK_BLOCK: usize = 32;

/// The Fisher information of every layer's key and value projections, per KV head, as
/// `kv-eval fisher` writes it (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaluFisher {
    /// [`PALU_FISHER_FORMAT`].
    pub format: u32,
    /// The model file it was computed on.
    pub model: String,
    /// The calibration text.
    pub text: String,
    /// Calibration sequences (one forward and backward pass each).
    pub sequences: usize,
    /// Tokens per sequence.
    pub tokens_per_sequence: usize,
    /// The model's layer count.
    pub num_layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// `keys[layer][head]`: Fisher information of the head's rows of `W_k`.
    pub keys: Vec<Vec<f64>>,
    /// `values[layer][head]`: the same for `W_v`.
    pub values: Vec<Vec<f64>>,
}

/// One layer's ranks from [`PaluFisher::allocate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerRanks {
    /// Key latent rank per KV head.
    pub rank_k: usize,
    /// Value latent rank per KV head.
    pub rank_v: usize,
}

/// The ranks of every layer and the kept ratio they reach.
#[derive(Debug, Clone, PartialEq)]
pub struct PaluAllocation {
    /// Per layer.
    pub layers: Vec<LayerRanks>,
    /// `Σ ranks / (2·layers·head_dim)`: the fraction of the full KV width kept.
    pub kept_ratio: f64,
}

fn invalid(reason: String) -> KvError {
    KvError::InvalidConfig {
        field: "fisher",
        reason,
    }
}

impl PaluFisher {
    /// Checks the artefact's internal consistency: format, one entry per layer and head,
    /// finite non-negative values, not all zero.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming what is wrong.
    pub fn validate(&self) -> kv_core::Result<()> {
        if self.format != PALU_FISHER_FORMAT {
            return Err(invalid(format!(
                "format {} is not {PALU_FISHER_FORMAT}; recompute it with `kv-eval fisher`",
                self.format
            )));
        }
        if self.num_layers == 0 || self.kv_heads == 0 || self.head_dim == 0 {
            return Err(invalid("zero layers, heads or head_dim".into()));
        }
        for (what, table) in [("keys", &self.keys), ("values", &self.values)] {
            if table.len() != self.num_layers || table.iter().any(|l| l.len() != self.kv_heads) {
                return Err(invalid(format!(
                    "{what} must hold {} layers x {} heads",
                    self.num_layers, self.kv_heads
                )));
            }
            if table.iter().flatten().any(|x| !x.is_finite() || *x < 0.0) {
                return Err(invalid(format!(
                    "{what} holds a negative or non-finite value"
                )));
            }
        }
        if self
            .keys
            .iter()
            .chain(&self.values)
            .flatten()
            .all(|&x| x == 0.0)
        {
            return Err(invalid("every Fisher value is zero".into()));
        }
        Ok(())
    }

    /// Checks the artefact against a layer shape (KV heads and head_dim).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for another model's artefact.
    pub fn check_shape(&self, shape: KvShape) -> kv_core::Result<()> {
        if self.kv_heads != shape.kv_heads() || self.head_dim != shape.head_dim() {
            return Err(invalid(format!(
                "the artefact is for {} KV heads of {} channels, the cache has {} of {}",
                self.kv_heads,
                self.head_dim,
                shape.kv_heads(),
                shape.head_dim()
            )));
        }
        Ok(())
    }

    /// Writes the artefact as JSON.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] with the I/O error.
    pub fn save(&self, path: impl AsRef<Path>) -> kv_core::Result<()> {
        let path = path.as_ref();
        let json =
            serde_json::to_string_pretty(self).map_err(|e| invalid(format!("serializing: {e}")))?;
        std::fs::write(path, json)
            .map_err(|e| invalid(format!("writing `{}`: {e}", path.display())))
    }

    /// Reads and validates an artefact.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`]: a missing file (with the command that makes one), bad
    /// JSON, or what [`validate`](Self::validate) rejects.
    pub fn load(path: impl AsRef<Path>) -> kv_core::Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            invalid(format!(
                "cannot read Fisher artefact `{}` ({e}); make one with `kv-eval fisher --out {}`",
                path.display(),
                path.display()
            ))
        })?;
        let f: Self = serde_json::from_str(&text)
            .map_err(|e| invalid(format!("`{}`: {e}", path.display())))?;
        f.validate()
            .map_err(|e| invalid(format!("`{}`: {e}", path.display())))?;
        Ok(f)
    }

    /// Palu's `fisher_uniform` allocation for a kept-rank ratio `ratio` and a rounding block
    /// (see the [module docs](self)).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a ratio outside `(0, 1]`, a block of 0 or above
    /// `head_dim`, or an invalid artefact.
    pub fn allocate(&self, ratio: f64, block: usize) -> kv_core::Result<PaluAllocation> {
        self.validate()?;
        if !(ratio > 0.0 && ratio <= 1.0) {
            return Err(invalid(format!("ratio {ratio} is outside (0, 1]")));
        }
        if block == 0 || block > self.head_dim {
            return Err(invalid(format!(
                "block {block} must be in 1..={}",
                self.head_dim
            )));
        }
        let cap = self.kv_heads * self.head_dim;
        // Modules in the reference's order: layer 0 keys, layer 0 values, layer 1 keys, ...
        let fisher: Vec<f64> = (0..self.num_layers)
            .flat_map(|l| {
                let mean = |t: &[f64]| t.iter().sum::<f64>() / t.len() as f64;
                [mean(&self.keys[l]), mean(&self.values[l])]
            })
            .collect();
        let total_fisher: f64 = fisher.iter().sum();
        let target = (ratio * (fisher.len() * cap) as f64).round() as usize;
        let share: Vec<f64> = fisher
            .iter()
            .map(|f| target as f64 * f / total_fisher)
            .collect();
        let mut ranks: Vec<usize> = share
            .iter()
            .map(|&s| (s.floor() as usize).min(cap))
            .collect();
        let mut order: Vec<usize> = (0..ranks.len()).collect();
        order.sort_by(|&a, &b| {
            (share[a] - ranks[a] as f64).total_cmp(&(share[b] - ranks[b] as f64))
        });
        let mut left = target.saturating_sub(ranks.iter().sum());
        while left > 0 {
            let mut gave = false;
            for &m in &order {
                if ranks[m] == cap {
                    continue;
                }
                ranks[m] += 1;
                left -= 1;
                gave = true;
                if left == 0 {
                    break;
                }
            }
            if !gave {
                break;
            }
        }
        let per_head = |r: usize| -> usize {
            let r = r / self.kv_heads;
            let blocks = ((r as f64) / block as f64).round_ties_even().max(1.0) as usize;
            (blocks * block).min(self.head_dim)
        };
        let layers: Vec<LayerRanks> = ranks
            .chunks(2)
            .map(|kv| LayerRanks {
                rank_k: per_head(kv[0]),
                rank_v: per_head(kv[1]),
            })
            .collect();
        let kept: usize = layers.iter().map(|l| l.rank_k + l.rank_v).sum();
        Ok(PaluAllocation {
            kept_ratio: kept as f64 / (2 * self.num_layers * self.head_dim) as f64,
            layers,
        })
    }
}
