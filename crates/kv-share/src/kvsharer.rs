//! KVSharer (arXiv 2410.18517): share the KV of *dissimilar* layers, found by a calibration
//! search, saved as a versioned artefact.
//!
//! The search needs the model, which this crate does not depend on: [`search`] takes the
//! per-layer averaged keys and values of the calibration text and a closure that runs the
//! model with a candidate [`LayerMap`] and returns the cosine similarity of its last hidden
//! states to the unshared model's. The runner on the real model is the example
//! `kvsharer_calibrate` of this crate.

use std::path::Path;

use kv_core::{KvError, KvShape};
use serde::{Deserialize, Serialize};

use crate::map::LayerMap;
use crate::{Result, ShareError};

/// The artefact format version this build writes and reads.
pub const ARTIFACT_VERSION: u32 = 1;

/// Configuration of the KVSharer search (defaults from yangyifei729/KVSharer's notebook).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvSharerConfig {
    /// Layers to turn into consumers (`SHARE_LAYERS`, paper default 4).
    pub share_layers: usize,
    /// A candidate is accepted while the cosine similarity of the last hidden states to the
    /// unshared model stays strictly above this (`THRESHOLD`, default 0.5).
    pub threshold: f32,
}

impl KvSharerConfig {
    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &["share_layers", "threshold"];

    /// A config (no defaults are invented: both are the caller's choice; the paper's are 4
    /// and 0.5).
    pub fn new(share_layers: usize, threshold: f32) -> Self {
        KvSharerConfig {
            share_layers,
            threshold,
        }
    }

    /// A config from `key=value` parameters `share_layers` (default 4) and `threshold`
    /// (default 0.5), the paper's values.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for an unknown name or a value that does not parse.
    pub fn from_params<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        let mut cfg = KvSharerConfig::new(4, 0.5);
        for (k, v) in params {
            let bad = |what: &str| KvError::InvalidConfig {
                field: "params",
                reason: format!("KVSharer parameter `{k}`: `{v}` is not {what}"),
            };
            match k {
                "share_layers" => cfg.share_layers = v.parse().map_err(|_| bad("a layer count"))?,
                "threshold" => cfg.threshold = v.parse().map_err(|_| bad("a number"))?,
                _ => {
                    return Err(KvError::InvalidConfig {
                        field: "params",
                        reason: format!(
                            "KVSharer has no parameter `{k}` (known: {})",
                            Self::PARAMS.join(", ")
                        ),
                    });
                }
            }
        }
        Ok(cfg)
    }

    /// Checks the config against a model of `num_layers` layers.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for zero shared layers, as many as the model has, or a
    /// threshold outside `[-1, 1]`.
    pub fn validate(&self, num_layers: usize) -> kv_core::Result<()> {
        if self.share_layers == 0 || self.share_layers >= num_layers {
            return Err(KvError::InvalidConfig {
                field: "share_layers",
                reason: format!(
                    "{} shared layers for {num_layers} layers (need 1..{num_layers}: at least \
                     one layer keeps its KV)",
                    self.share_layers
                ),
            });
        }
        if !(-1.0..=1.0).contains(&self.threshold) || self.threshold.is_nan() {
            return Err(KvError::InvalidConfig {
                field: "threshold",
                reason: format!("{} is not a cosine similarity in [-1, 1]", self.threshold),
            });
        }
        Ok(())
    }
}

/// Per-layer Euclidean distances `‖K̄_i − K̄_j‖ + ‖V̄_i − V̄_j‖` of averaged keys and values
/// (each layer's K or V averaged over the calibration samples and flattened, all of one
/// length), `[layers][layers]`.
///
/// # Errors
/// [`KvError::InvalidConfig`] if the lists are empty, differ in length, or hold vectors of
/// different lengths or non-finite values.
pub fn layer_distances(avg_k: &[Vec<f32>], avg_v: &[Vec<f32>]) -> kv_core::Result<Vec<Vec<f32>>> {
    let n = avg_k.len();
    let bad = |reason: String| KvError::InvalidConfig {
        field: "averaged_kv",
        reason,
    };
    if n == 0 || avg_v.len() != n {
        return Err(bad(format!(
            "{n} averaged key and {} averaged value layers (need the same, at least one)",
            avg_v.len()
        )));
    }
    for x in avg_k.iter().chain(avg_v) {
        if x.len() != avg_k[0].len() || x.is_empty() {
            return Err(bad(
                "averaged K/V of every layer must have one non-zero length".into(),
            ));
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(bad("averaged K/V hold non-finite values".into()));
        }
    }
    let dist = |a: &[f32], b: &[f32]| -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum::<f64>()
            .sqrt() as f32
    };
    Ok((0..n)
        .map(|i| {
            (0..n)
                .map(|j| dist(&avg_k[i], &avg_k[j]) + dist(&avg_v[i], &avg_v[j]))
                .collect()
        })
        .collect())
}

/// Candidate pairs `(i, j)` with `i > j` (layer `i` would read layer `j`), most dissimilar
/// first; ties keep the lower `(i, j)` first.
pub fn rank_pairs(distances: &[Vec<f32>]) -> Vec<(usize, usize, f32)> {
    let n = distances.len();
    let mut pairs: Vec<(usize, usize, f32)> = (0..n)
        .flat_map(|i| (0..i).map(move |j| (i, j)))
        .map(|(i, j)| (i, j, distances[i][j]))
        .collect();
    pairs.sort_by(|a, b| b.2.total_cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
    pairs
}

/// One accepted step of the search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptedPair {
    /// The layer that stopped storing KV.
    pub layer: usize,
    /// The layer of the candidate pair it was set to read (before chain resolution).
    pub reads: usize,
    /// The KV distance of the pair.
    pub distance: f32,
    /// Cosine similarity of the last hidden states with the map after this step.
    pub similarity: f32,
}

/// The model a KVSharer artefact was calibrated on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// Layers.
    pub num_layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Query heads per layer.
    pub q_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
}

impl ModelShape {
    /// The model shape from a layer shape and a layer count.
    pub fn new(num_layers: usize, shape: KvShape) -> Self {
        ModelShape {
            num_layers,
            kv_heads: shape.kv_heads(),
            q_heads: shape.q_heads(),
            head_dim: shape.head_dim(),
        }
    }
}

/// What the calibration ran on (for the record; not checked on load).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationInfo {
    /// The text (for example `emma`).
    pub text: String,
    /// Calibration samples.
    pub samples: usize,
    /// Tokens per sample.
    pub tokens: usize,
}

/// The result of a KVSharer search: a layer map with its provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvSharerArtifact {
    /// Format version ([`ARTIFACT_VERSION`]).
    pub version: u32,
    /// The model it was calibrated on.
    pub model: ModelShape,
    /// The search configuration.
    pub config: KvSharerConfig,
    /// The calibration data.
    pub calibration: CalibrationInfo,
    /// The resulting map (chains resolved).
    pub map: LayerMap,
    /// Accepted steps in order.
    pub accepted: Vec<AcceptedPair>,
    /// Candidates evaluated (accepted or not).
    pub evaluated: usize,
}

impl KvSharerArtifact {
    /// Checks the artefact against the model it is about to be used with.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] (field `artifact`) for another version or model shape, or a
    /// map of the wrong length.
    pub fn validate(&self, model: &ModelShape) -> kv_core::Result<()> {
        let bad = |reason: String| KvError::InvalidConfig {
            field: "artifact",
            reason,
        };
        if self.version != ARTIFACT_VERSION {
            return Err(bad(format!(
                "version {} (this build reads version {ARTIFACT_VERSION})",
                self.version
            )));
        }
        if self.model != *model {
            return Err(bad(format!(
                "calibrated for {:?}, used with {model:?}",
                self.model
            )));
        }
        if self.map.len() != model.num_layers {
            return Err(bad(format!(
                "the map covers {} layers, the model has {}",
                self.map.len(),
                model.num_layers
            )));
        }
        Ok(())
    }

    /// Writes the artefact as pretty JSON.
    ///
    /// # Errors
    /// [`ShareError::Io`] on a write failure.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(|e| ShareError::Format {
            path: path.into(),
            reason: e.to_string(),
        })?;
        std::fs::write(path, json).map_err(|source| ShareError::Io {
            path: path.into(),
            source,
        })
    }

    /// Reads an artefact and validates it against `model`.
    ///
    /// # Errors
    /// [`ShareError::Io`], [`ShareError::Format`] for corrupt or truncated JSON (an invalid
    /// map included), [`ShareError::Kv`] when it does not fit the model.
    pub fn load(path: &Path, model: &ModelShape) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ShareError::Io {
            path: path.into(),
            source,
        })?;
        let a: KvSharerArtifact = serde_json::from_str(&text).map_err(|e| ShareError::Format {
            path: path.into(),
            reason: e.to_string(),
        })?;
        a.validate(model)?;
        Ok(a)
    }
}

/// Runs the KVSharer search.
///
/// Candidates from [`rank_pairs`] (most dissimilar first) are tried in order: for `(i, j)`
/// with layer `i` still storing its KV, layer `i` is set to read `j` (chains resolved, so
/// layers reading `i` follow it), and `similarity(&map)` (cosine similarity of the model's
/// last hidden states with `map` against the unshared model) decides: the step is kept when
/// it is above the threshold, undone otherwise. The search stops after
/// `config.share_layers` accepted steps or when the candidates run out.
///
/// # Errors
/// The config's and the distances' validation errors; the first error of `similarity`.
pub fn search<E: From<KvError>>(
    config: &KvSharerConfig,
    model: ModelShape,
    calibration: CalibrationInfo,
    avg_k: &[Vec<f32>],
    avg_v: &[Vec<f32>],
    mut similarity: impl FnMut(&LayerMap) -> core::result::Result<f32, E>,
) -> core::result::Result<KvSharerArtifact, E> {
    let n = model.num_layers;
    config.validate(n)?;
    let distances = layer_distances(avg_k, avg_v)?;
    if distances.len() != n {
        return Err(KvError::InvalidConfig {
            field: "averaged_kv",
            reason: format!(
                "{} layers of averaged K/V for a model of {n}",
                distances.len()
            ),
        }
        .into());
    }
    let mut raw: Vec<usize> = (0..n).collect();
    let mut map = LayerMap::identity(n)?;
    let mut accepted = Vec::new();
    let mut evaluated = 0;
    for (i, j, distance) in rank_pairs(&distances) {
        if accepted.len() == config.share_layers {
            break;
        }
        if raw[i] != i {
            continue;
        }
        let mut cand = raw.clone();
        cand[i] = j;
        let cand_map = LayerMap::resolve_chains(cand.clone())?;
        evaluated += 1;
        let sim = similarity(&cand_map)?;
        if sim > config.threshold {
            raw = cand;
            map = cand_map;
            accepted.push(AcceptedPair {
                layer: i,
                reads: j,
                distance,
                similarity: sim,
            });
        }
    }
    Ok(KvSharerArtifact {
        version: ARTIFACT_VERSION,
        model,
        config: config.clone(),
        calibration,
        map,
        accepted,
        evaluated,
    })
}

/// Cosine similarity of two equally long vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
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
