//! Where DMC's append-or-merge decisions come from: the [`MergeDecision`] trait, the
//! configured sources ([`DecisionConfig`]) and the versioned artefact of a learned decision.

use core::fmt::Debug;

use kv_core::{KvError, Result};
use serde::{Deserialize, Serialize};

/// What a decision source sees for one new token of one (sequence, KV head) stream.
#[derive(Debug, Clone, Copy)]
pub struct DecisionInput<'a> {
    /// Sequence index.
    pub batch: usize,
    /// KV head index.
    pub head: usize,
    /// The token's original position.
    pub position: u32,
    /// The token's key as the cache receives it (post-RoPE), `head_dim` entries.
    pub key: &'a [f32],
    /// The token's value, `head_dim` entries.
    pub value: &'a [f32],
    /// The key of the stream's last slot as it stands now (after the merges of earlier tokens
    /// of the same block); `None` when the stream is empty (the token is then appended
    /// whatever the decision).
    pub last_key: Option<&'a [f32]>,
    /// The value of the stream's last slot as it stands now (`None` when the stream is empty).
    pub last_value: Option<&'a [f32]>,
    /// The merge mass `z` of the last slot (0 when the stream is empty).
    pub last_mass: f32,
}

/// One token's decision: merge into the last slot (DMC's `α = 1`) or append a new slot, and
/// the token's importance weight `ω` (finite and positive).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Merge into the last slot (`α_t = 1`) instead of appending.
    pub merge: bool,
    /// Importance weight `ω_t > 0` of the token in the slot's weighted average.
    pub weight: f32,
}

/// A source of append-or-merge decisions (DMC's `α_t`, `ω_t`).
///
/// Decisions are taken token by token in position order, each seeing the last slot as the
/// previous decisions left it. A source must be deterministic for a given input: the cache
/// takes every decision of a block before it changes anything, so that a bad weight leaves it
/// unchanged.
pub trait MergeDecision: Send + Sync + Debug {
    /// Decides for one token.
    fn decide(&self, input: &DecisionInput<'_>) -> Decision;
}

/// The configured decision sources of a [`DmcConfig`](crate::DmcConfig).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DecisionConfig {
    /// Never merge (`α ≡ 0`, `ω ≡ 1`): the dense cache.
    Never,
    /// Always merge (`α ≡ 1`, `ω ≡ 1`): one slot per stream holding the mean of all tokens.
    Always,
    /// The training-free proxy: merge when the cosine similarity of the new key to the last
    /// slot's key exceeds `threshold` (in `[-1, 1]`) and, when `value_threshold` is given,
    /// that of the values exceeds it too; `ω ≡ 1`.
    Similarity {
        /// Key cosine similarity above which the token is merged.
        threshold: f32,
        /// Value cosine similarity also required (none: keys only).
        #[serde(default)]
        value_threshold: Option<f32>,
    },
    /// A learned decision: per KV head, linear heads over the key give `α` and `ω` (see
    /// [`LayerDecision`]); the artefact must come from a DMC-retrofitted checkpoint.
    Learned {
        /// The decision heads of this layer.
        layer: LayerDecision,
    },
}

impl DecisionConfig {
    /// Validates the source against the layer's `kv_heads` and `head_dim`.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a threshold outside `[-1, 1]` or an artefact that does
    /// not fit the layer.
    pub fn validate(&self, kv_heads: usize, head_dim: usize) -> Result<()> {
        match self {
            DecisionConfig::Never | DecisionConfig::Always => Ok(()),
            DecisionConfig::Similarity {
                threshold,
                value_threshold,
            } => {
                let check = |field: &'static str, t: f32| {
                    if t.is_finite() && (-1.0..=1.0).contains(&t) {
                        Ok(())
                    } else {
                        Err(KvError::InvalidConfig {
                            field,
                            reason: format!("cosine similarity threshold {t} is not in [-1, 1]"),
                        })
                    }
                };
                check("threshold", *threshold)?;
                value_threshold.map_or(Ok(()), |t| check("value_threshold", t))
            }
            DecisionConfig::Learned { layer } => layer.validate(kv_heads, head_dim),
        }
    }

    /// The decision source.
    pub fn build(&self) -> Box<dyn MergeDecision> {
        match self {
            DecisionConfig::Never => Box::new(Fixed {
                merge: false,
                weight: 1.0,
            }),
            DecisionConfig::Always => Box::new(Fixed {
                merge: true,
                weight: 1.0,
            }),
            DecisionConfig::Similarity {
                threshold,
                value_threshold,
            } => Box::new(SimilarityProxy {
                threshold: *threshold,
                value_threshold: *value_threshold,
            }),
            DecisionConfig::Learned { layer } => Box::new(layer.clone()),
        }
    }
}

/// The same decision for every token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fixed {
    /// Merge or append.
    pub merge: bool,
    /// Importance weight of every token.
    pub weight: f32,
}

impl MergeDecision for Fixed {
    fn decide(&self, _: &DecisionInput<'_>) -> Decision {
        Decision {
            merge: self.merge,
            weight: self.weight,
        }
    }
}

/// The training-free proxy: merge when `cos(k_t, k_last) > threshold` (and
/// `cos(v_t, v_last) > value_threshold` when given), weight 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimilarityProxy {
    /// Key cosine similarity above which a token merges.
    pub threshold: f32,
    /// Value cosine similarity also required (none: keys only).
    pub value_threshold: Option<f32>,
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        (ab / (aa.sqrt() * bb.sqrt())) as f32
    }
}

impl MergeDecision for SimilarityProxy {
    fn decide(&self, input: &DecisionInput<'_>) -> Decision {
        let keys = input
            .last_key
            .is_some_and(|last| cosine(input.key, last) > self.threshold);
        let values = match (self.value_threshold, input.last_value) {
            (None, _) => true,
            (Some(t), Some(last)) => cosine(input.value, last) > t,
            (Some(_), None) => false,
        };
        let merge = keys && values;
        Decision { merge, weight: 1.0 }
    }
}

/// The format tag of [`DmcArtefact`].
pub const DMC_ARTEFACT_FORMAT: &str = "kv-dmc/decision";
/// The artefact version this crate reads.
pub const DMC_ARTEFACT_VERSION: u32 = 1;

/// A linear head `w · k + bias` over a key of `head_dim` channels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearHead {
    /// Weights, `head_dim` entries.
    pub weights: Vec<f32>,
    /// Bias.
    pub bias: f32,
}

impl LinearHead {
    /// The head that reads channel `c` of a `head_dim`-channel key: DMC's decision neuron
    /// (`c = 0`).
    pub fn channel(head_dim: usize, c: usize) -> Self {
        let mut weights = vec![0.0; head_dim];
        weights[c] = 1.0;
        LinearHead { weights, bias: 0.0 }
    }

    /// `w · k + bias`.
    pub fn logit(&self, key: &[f32]) -> f32 {
        self.weights
            .iter()
            .zip(key)
            .map(|(w, k)| w * k)
            .sum::<f32>()
            + self.bias
    }

    fn validate(&self, head_dim: usize, what: &str) -> Result<()> {
        if self.weights.len() != head_dim {
            return Err(KvError::InvalidConfig {
                field: "artefact",
                reason: format!(
                    "{what} has {} weights, the layer's head_dim is {head_dim}",
                    self.weights.len()
                ),
            });
        }
        if !self.bias.is_finite() || self.weights.iter().any(|w| !w.is_finite()) {
            return Err(KvError::InvalidConfig {
                field: "artefact",
                reason: format!("{what} holds non-finite weights"),
            });
        }
        Ok(())
    }
}

/// The learned decision of one layer: per KV head, `α_t = round(σ(alpha · k_t))` (merge when
/// the logit is positive) and `ω_t = σ(omega · k_t)`.
///
/// DMC reads `α` from the first channel of the pre-RoPE key and `ω` from the first channel of
/// the query, and zeroes both channels before attention. This cache decides when keys are
/// appended, before the queries arrive, so both heads read the key as the cache receives it:
/// the model must export DMC's neurons into that form (and zero them itself).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerDecision {
    /// The merge head per KV head.
    pub alpha: Vec<LinearHead>,
    /// The importance head per KV head.
    pub omega: Vec<LinearHead>,
}

impl LayerDecision {
    /// Checks the heads against the layer.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] (field `artefact`) for a head count or width that does not
    /// match, or non-finite weights.
    pub fn validate(&self, kv_heads: usize, head_dim: usize) -> Result<()> {
        for (what, heads) in [("alpha", &self.alpha), ("omega", &self.omega)] {
            if heads.len() != kv_heads {
                return Err(KvError::InvalidConfig {
                    field: "artefact",
                    reason: format!(
                        "{} {what} heads for a layer of {kv_heads} KV heads",
                        heads.len()
                    ),
                });
            }
            for (h, head) in heads.iter().enumerate() {
                head.validate(head_dim, &format!("{what}[{h}]"))?;
            }
        }
        Ok(())
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl MergeDecision for LayerDecision {
    fn decide(&self, input: &DecisionInput<'_>) -> Decision {
        Decision {
            merge: self.alpha[input.head].logit(input.key) > 0.0,
            // σ of a finite logit can underflow to 0 for logits below about -104: keep the
            // weight positive.
            weight: sigmoid(self.omega[input.head].logit(input.key)).max(f32::MIN_POSITIVE),
        }
    }
}

/// A learned-decision artefact for a whole model: one [`LayerDecision`] per layer, exported
/// from a DMC-retrofitted checkpoint (the decision neurons of an ordinary checkpoint are
/// meaningless: DMC trains them by continued pretraining).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmcArtefact {
    /// Always [`DMC_ARTEFACT_FORMAT`].
    pub format: String,
    /// Always [`DMC_ARTEFACT_VERSION`].
    pub version: u32,
    /// The retrofitted checkpoint the heads were exported from.
    pub source: String,
    /// One entry per layer.
    pub layers: Vec<LayerDecision>,
}

impl DmcArtefact {
    /// Checks the format tag and version.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] (field `artefact`) naming what differs.
    pub fn check_version(&self) -> Result<()> {
        if self.format != DMC_ARTEFACT_FORMAT || self.version != DMC_ARTEFACT_VERSION {
            return Err(KvError::InvalidConfig {
                field: "artefact",
                reason: format!(
                    "format `{}` version {} is not `{DMC_ARTEFACT_FORMAT}` version \
                     {DMC_ARTEFACT_VERSION}",
                    self.format, self.version
                ),
            });
        }
        Ok(())
    }

    /// The decision of layer `layer`, checked against the layer's shape.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] (field `artefact`) for a wrong format or version, a missing
    /// layer or heads that do not fit.
    pub fn layer(&self, layer: usize, kv_heads: usize, head_dim: usize) -> Result<LayerDecision> {
        self.check_version()?;
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| KvError::InvalidConfig {
                field: "artefact",
                reason: format!(
                    "the artefact holds {} layers, layer {layer} was asked for",
                    self.layers.len()
                ),
            })?;
        l.validate(kv_heads, head_dim)?;
        Ok(l.clone())
    }
}
