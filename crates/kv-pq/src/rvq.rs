//! Residual vector quantization (RVQ) and its calibration artefact.
//!
//! A vector `x` of `sub_dim` channels is replaced by `S` code indices, one per stage: stage 1
//! picks the nearest of `C` centroids of codebook 1, stage `s` the nearest centroid of
//! codebook `s` to what the earlier stages left (the residual), and the reconstruction is the
//! sum of the chosen centroids. Every codebook is trained with [`kmeans`](crate::kmeans()) on
//! the residuals of the training points after the earlier stages.
//!
//! For the KV cache ([`RvqCache`](crate::RvqCache), after Kumar, arXiv 2410.15704, and
//! iankur/vqllm `vqllm/quantizer/utils.py`), each token of each KV head is first divided by
//! its standard deviation `σ` over the head's channels; the `head_dim` channels are cut into
//! `G = head_dim / sub_dim` groups of `sub_dim` channels (keys: channel `j` goes to group
//! `j mod G`, "reorder_channel"; values: contiguous groups), and every group is quantized with
//! the same per-(layer, KV head) residual quantizer: `x̂ = σ · Σ_s codebook_s[idx_s]`.
//!
//! The codebooks are learned offline from a real model's keys and values
//! ([`train_layer`], driven by `kv-eval calibrate --rvq FILE`) and saved as a versioned JSON
//! [`RvqArtefact`] that caches load and check against the model's shape.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::{FloatDType, IntDType};
use kv_core::{KvError, Result};
use serde::{Deserialize, Serialize};

use crate::kmeans::{KMeansConfig, kmeans};

/// The artefact format version this crate writes and reads.
pub const RVQ_VERSION: u32 = 1;

/// The largest codebook: codes are stored as `u16`.
pub const MAX_ENTRIES: usize = 1 << 16;

/// Trained residual codebooks of `groups` independent quantizers (one per KV head, say).
#[derive(Debug, Clone)]
pub struct ResidualQuantizer {
    /// `[groups, stages, entries, sub_dim]`, fp32.
    codebooks: Tensor<4>,
}

impl ResidualQuantizer {
    /// Trains `stages` codebooks of `cfg.k` entries for each group of `points`,
    /// `[groups, n, sub_dim]`: stage `s` runs k-means (seed `cfg.seed + s`) on the residuals
    /// left by stages `1..s`.
    ///
    /// With at least one Lloyd iteration per stage, the training error `Σ ‖x − x̂‖²` never
    /// increases from one stage to the next: k-means moves each centroid to the mean of its
    /// residuals, which is never farther from them than the zero vector is.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for zero stages and from [`KMeansConfig::validate`] (more
    /// centroids than points, say); [`KvError::Empty`] and [`KvError::NonFinite`] from
    /// [`kmeans`](crate::kmeans()).
    pub fn train(points: Tensor<3>, stages: usize, cfg: &KMeansConfig) -> Result<Self> {
        if stages == 0 {
            return Err(KvError::InvalidConfig {
                field: "stages",
                reason: "residual quantization needs at least one stage".into(),
            });
        }
        if cfg.k > MAX_ENTRIES {
            return Err(KvError::InvalidConfig {
                field: "entries",
                reason: format!("{} codebook entries: at most {MAX_ENTRIES}", cfg.k),
            });
        }
        let [g, n, sub] = points.dims();
        let mut residual = points;
        let mut books = Vec::with_capacity(stages);
        for s in 0..stages {
            let fit = kmeans(
                residual.clone(),
                &KMeansConfig {
                    seed: cfg.seed.wrapping_add(s as u64),
                    ..cfg.clone()
                },
            )?;
            let idx = fit.assignments.reshape([g, n, 1]).expand([g, n, sub]);
            residual = residual - fit.centroids.clone().gather(1, idx);
            books.push(fit.centroids.reshape([g, 1, cfg.k, sub]));
        }
        Ok(ResidualQuantizer {
            codebooks: Tensor::cat(books, 1),
        })
    }

    /// Quantizers from codebooks `[groups, stages, entries, sub_dim]` (cast to fp32).
    ///
    /// # Panics
    /// If a dimension is zero.
    pub fn from_codebooks(codebooks: Tensor<4>) -> Self {
        assert!(
            codebooks.dims().iter().all(|&x| x > 0),
            "ResidualQuantizer::from_codebooks: empty codebooks {:?}",
            codebooks.dims()
        );
        ResidualQuantizer {
            codebooks: codebooks.cast(FloatDType::F32),
        }
    }

    /// The codebooks, `[groups, stages, entries, sub_dim]`.
    pub fn codebooks(&self) -> &Tensor<4> {
        &self.codebooks
    }
    /// Independent quantizers.
    pub fn groups(&self) -> usize {
        self.codebooks.dims()[0]
    }
    /// Stages `S`.
    pub fn stages(&self) -> usize {
        self.codebooks.dims()[1]
    }
    /// Entries `C` per codebook.
    pub fn entries(&self) -> usize {
        self.codebooks.dims()[2]
    }
    /// Channels per quantized vector.
    pub fn sub_dim(&self) -> usize {
        self.codebooks.dims()[3]
    }

    /// The first `stages` stages (a residual quantizer truncated is one with fewer stages).
    ///
    /// # Panics
    /// If `stages` is zero or more than [`stages`](Self::stages).
    pub fn truncate(&self, stages: usize) -> Self {
        let [g, s, c, d] = self.codebooks.dims();
        assert!(
            (1..=s).contains(&stages),
            "ResidualQuantizer::truncate: {stages} of {s} stages"
        );
        ResidualQuantizer {
            codebooks: self.codebooks.clone().slice([0..g, 0..stages, 0..c, 0..d]),
        }
    }

    /// Codes of `x`, `[groups, n, sub_dim]` → `[groups, n, stages]`: at every stage the
    /// nearest centroid (L2) to the residual of the earlier stages.
    ///
    /// # Panics
    /// If `x` does not match the codebooks' groups and channels.
    pub fn encode(&self, x: Tensor<3>) -> Tensor<3, Int> {
        let [g, s, c, sub] = self.codebooks.dims();
        let [xg, n, xd] = x.dims();
        assert!(
            xg == g && xd == sub,
            "ResidualQuantizer::encode: x {:?} vs codebooks {:?}",
            x.dims(),
            self.codebooks.dims()
        );
        let mut residual = x;
        let mut codes = Vec::with_capacity(s);
        for stage in 0..s {
            let book = self
                .codebooks
                .clone()
                .slice([0..g, stage..stage + 1, 0..c, 0..sub])
                .reshape([g, c, sub]);
            let cross = residual.clone().matmul(book.clone().swap_dims(1, 2)); // [g, n, c]
            let c2 = book.clone().powi_scalar(2).sum_dim(2).reshape([g, 1, c]);
            let idx = (c2.expand([g, n, c]) - cross.mul_scalar(2.0))
                .argmin(2)
                .reshape([g, n, 1]);
            residual = residual - book.gather(1, idx.clone().expand([g, n, sub]));
            codes.push(idx);
        }
        Tensor::cat(codes, 2)
    }

    /// Vectors from codes, `[groups, n, stages]` → `[groups, n, sub_dim]`: the sum over stages
    /// of the chosen centroids. Codes may have fewer stages than the codebooks (the first
    /// ones are used).
    ///
    /// # Panics
    /// If `codes` does not match the codebooks' groups, or has more stages.
    pub fn decode(&self, codes: Tensor<3, Int>) -> Tensor<3> {
        let [g, s, c, sub] = self.codebooks.dims();
        let [cg, n, cs] = codes.dims();
        assert!(
            cg == g && cs <= s,
            "ResidualQuantizer::decode: codes {:?} vs codebooks {:?}",
            codes.dims(),
            self.codebooks.dims()
        );
        let codes = codes.cast(IntDType::I32);
        let mut out: Option<Tensor<3>> = None;
        for stage in 0..cs {
            let book = self
                .codebooks
                .clone()
                .slice([0..g, stage..stage + 1, 0..c, 0..sub])
                .reshape([g, c, sub]);
            let idx = codes
                .clone()
                .slice([0..g, 0..n, stage..stage + 1])
                .expand([g, n, sub]);
            let part = book.gather(1, idx);
            out = Some(match out {
                Some(o) => o + part,
                None => part,
            });
        }
        out.expect("invariant: codes have at least one stage")
    }

    /// Bytes of the codebooks as held.
    pub fn codebook_bytes(&self) -> usize {
        self.codebooks.shape().num_elements() * self.codebooks.dtype().size()
    }
}

/// Per-token scale `σ` of `[b, h, n, d]` over channels (the unbiased standard deviation, as
/// `torch.std`), rounded to fp16 (how it is stored), with 0 replaced by 1: `[b, h, n, 1]`.
pub(crate) fn token_scale(x: &Tensor<4>) -> Tensor<4> {
    let d = x.dims()[3];
    let mean = x.clone().mean_dim(3);
    let var = (x.clone() - mean)
        .powi_scalar(2)
        .sum_dim(3)
        .div_scalar((d.max(2) - 1) as f32);
    let sigma = var
        .sqrt()
        .clamp_max(65504.0)
        .cast(FloatDType::F16)
        .cast(FloatDType::F32);
    let zero = sigma.clone().lower_equal_elem(0.0);
    sigma.mask_fill(zero, 1.0)
}

/// `[b, h, n, d]` → `[h, b * n * G, sub]`: the channel groups of every token of every head,
/// head first (keys `strided`: channel `j` in group `j mod G`).
pub(crate) fn to_groups(x: Tensor<4>, sub: usize, strided: bool) -> Tensor<3> {
    let [b, h, n, d] = x.dims();
    let g = d / sub;
    let grouped = if strided {
        x.reshape([b, h, n, sub, g]).swap_dims(3, 4)
    } else {
        x.reshape([b, h, n, g, sub])
    };
    grouped.swap_dims(0, 1).reshape([h, b * n * g, sub])
}

/// The inverse of [`to_groups`]: `[h, b * n * G, sub]` → `[b, h, n, d]`.
pub(crate) fn from_groups(x: Tensor<3>, b: usize, n: usize, strided: bool) -> Tensor<4> {
    let [h, rows, sub] = x.dims();
    let g = rows / (b * n);
    let x = x.reshape([h, b, n, g, sub]).swap_dims(0, 1);
    if strided {
        x.swap_dims(3, 4).reshape([b, h, n, g * sub])
    } else {
        x.reshape([b, h, n, g * sub])
    }
}

/// How [`train_layer`] trains one layer's codebooks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RvqTrainConfig {
    /// Channels per quantized group `d̂` (divides `head_dim`).
    pub sub_dim: usize,
    /// Entries `C` per codebook (at most 65536).
    pub entries: usize,
    /// Stages `S`.
    pub stages: usize,
    /// Keys grouped with stride (`j mod G`, the reference's `reorder_channel`).
    pub strided_keys: bool,
    /// The most groups per KV head used for training (evenly spaced over what was captured).
    pub max_points: usize,
    /// k-means iterations per stage (at least 1).
    pub kmeans_iters: usize,
    /// k-means tolerance.
    pub kmeans_tol: f64,
    /// k-means seed (stage `s` uses `seed + s`).
    pub seed: u64,
}

impl RvqTrainConfig {
    /// `sub_dim`, `entries` and `stages` with strided keys, at most 16384 training groups per
    /// KV head and k-means of 20 iterations, tolerance `1e-4`, seed 0.
    pub fn new(sub_dim: usize, entries: usize, stages: usize) -> Self {
        RvqTrainConfig {
            sub_dim,
            entries,
            stages,
            strided_keys: true,
            max_points: 16384,
            kmeans_iters: 20,
            kmeans_tol: 1e-4,
            seed: 0,
        }
    }

    /// Checks the config against `head_dim`.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the field.
    pub fn validate(&self, head_dim: usize) -> Result<()> {
        check_layout(head_dim, self.sub_dim, self.entries, self.stages)?;
        if self.kmeans_iters == 0 {
            return Err(invalid(
                "kmeans_iters",
                "at least one k-means iteration per stage".into(),
            ));
        }
        if self.max_points < self.entries {
            return Err(invalid(
                "max_points",
                format!(
                    "{} training groups for {} entries",
                    self.max_points, self.entries
                ),
            ));
        }
        Ok(())
    }
}

fn invalid(field: &'static str, reason: String) -> KvError {
    KvError::InvalidConfig { field, reason }
}

fn check_layout(head_dim: usize, sub_dim: usize, entries: usize, stages: usize) -> Result<()> {
    if sub_dim == 0 || !head_dim.is_multiple_of(sub_dim) {
        return Err(invalid(
            "sub_dim",
            format!("{sub_dim} does not divide head_dim {head_dim}"),
        ));
    }
    if !(1..=MAX_ENTRIES).contains(&entries) {
        return Err(invalid(
            "entries",
            format!("{entries} codebook entries: supported are 1 to {MAX_ENTRIES}"),
        ));
    }
    if stages == 0 {
        return Err(invalid("stages", "at least one stage".into()));
    }
    Ok(())
}

/// One layer's codebooks in an [`RvqArtefact`]: keys and values, each
/// `[kv_heads, stages, entries, sub_dim]` row-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RvqLayerCodebooks {
    /// Key codebooks.
    pub keys: Vec<f32>,
    /// Value codebooks.
    pub values: Vec<f32>,
}

/// Trains one layer's key and value codebooks from captured keys and values
/// `[sequences, kv_heads, n, head_dim]` (keys as the cache receives them, post-RoPE): every
/// token is divided by its `σ` and cut into `G = head_dim / sub_dim` groups; evenly spaced
/// tokens, at most `max_points / G` of them (all their groups, so at most `max_points`
/// groups per KV head), train the per-head residual quantizers.
///
/// # Errors
/// [`KvError::InvalidConfig`] from [`RvqTrainConfig::validate`], for keys and values of
/// different shapes and for fewer captured groups than codebook entries;
/// [`KvError::NonFinite`] for NaN or infinite activations.
pub fn train_layer(
    keys: &Tensor<4>,
    values: &Tensor<4>,
    cfg: &RvqTrainConfig,
) -> Result<RvqLayerCodebooks> {
    let [b, h, n, d] = keys.dims();
    cfg.validate(d)?;
    if values.dims() != keys.dims() {
        return Err(invalid(
            "values",
            format!(
                "keys {:?} and values {:?} differ",
                keys.dims(),
                values.dims()
            ),
        ));
    }
    // Whole tokens are subsampled (evenly spaced), so that every channel group of a kept
    // token trains the codebooks: spacing over the flattened groups would alias with `G`.
    let groups_per_token = d / cfg.sub_dim;
    let total = b * n;
    let keep = (cfg.max_points / groups_per_token).max(1).min(total);
    let picks: Vec<i32> = (0..keep).map(|i| (i * total / keep) as i32).collect();
    let picks = Tensor::<1, Int>::from_data(TensorData::new(picks, [keep]), &keys.device());
    let prepare = |x: &Tensor<4>, strided: bool| {
        let scaled = (x.clone() / token_scale(x))
            .swap_dims(0, 1)
            .reshape([h, total, d])
            .select(1, picks.clone())
            .reshape([1, h, keep, d]);
        to_groups(scaled, cfg.sub_dim, strided)
    };
    let points = Tensor::cat(
        vec![prepare(keys, cfg.strided_keys), prepare(values, false)],
        0,
    );
    let available = points.dims()[1];
    if available < cfg.entries {
        return Err(invalid(
            "entries",
            format!(
                "{} codebook entries but only {available} groups of {} channels captured \
                 per KV head ({b} x {n} tokens): more centroids than points",
                cfg.entries, cfg.sub_dim
            ),
        ));
    }
    let km = KMeansConfig::new(cfg.entries)
        .with_max_iters(cfg.kmeans_iters)
        .with_tol(cfg.kmeans_tol)
        .with_seed(cfg.seed);
    let rq = ResidualQuantizer::train(points, cfg.stages, &km)?;
    let [_, s, c, sub] = rq.codebooks().dims();
    let host = |from: usize| -> Vec<f32> {
        rq.codebooks()
            .clone()
            .slice([from..from + h, 0..s, 0..c, 0..sub])
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("invariant: float tensors read back as f32")
    };
    Ok(RvqLayerCodebooks {
        keys: host(0),
        values: host(h),
    })
}

/// A calibration artefact: per-layer residual codebooks of keys and values, learned from a
/// real model, with what they were learned from. Saved as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RvqArtefact {
    /// The format version ([`RVQ_VERSION`]).
    pub version: u32,
    /// The model the activations came from (for messages; shapes are what is checked).
    pub model: String,
    /// The calibration text (never the evaluation text).
    pub source: String,
    /// Calibration tokens per layer.
    pub tokens: usize,
    /// Layers of the model.
    pub num_layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Channels per quantized group `d̂`.
    pub sub_dim: usize,
    /// Entries `C` per codebook.
    pub entries: usize,
    /// Stages `S` trained.
    pub stages: usize,
    /// Whether keys are grouped with stride (`j mod G`).
    pub strided_keys: bool,
    /// One entry per layer.
    pub layers: Vec<RvqLayerCodebooks>,
}

fn artefact_err(reason: String) -> KvError {
    invalid("calibration", reason)
}

impl RvqArtefact {
    /// Checks the artefact's own consistency: version, layout, codebook lengths, finiteness.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] with field `calibration`.
    pub fn validate(&self) -> Result<()> {
        if self.version != RVQ_VERSION {
            return Err(artefact_err(format!(
                "RVQ artefact version {} but this build reads version {RVQ_VERSION}: \
                 re-run `kv-eval calibrate --rvq`",
                self.version
            )));
        }
        check_layout(self.head_dim, self.sub_dim, self.entries, self.stages)
            .map_err(|e| artefact_err(format!("bad artefact layout: {e}")))?;
        if self.layers.len() != self.num_layers || self.kv_heads == 0 {
            return Err(artefact_err(format!(
                "artefact says {} layers of {} KV heads but holds {} layers",
                self.num_layers,
                self.kv_heads,
                self.layers.len()
            )));
        }
        let want = self.kv_heads * self.stages * self.entries * self.sub_dim;
        for (l, layer) in self.layers.iter().enumerate() {
            for (what, v) in [("keys", &layer.keys), ("values", &layer.values)] {
                if v.len() != want {
                    return Err(artefact_err(format!(
                        "layer {l} {what}: {} codebook values, expected {want} \
                         ({} heads x {} stages x {} entries x {} channels)",
                        v.len(),
                        self.kv_heads,
                        self.stages,
                        self.entries,
                        self.sub_dim
                    )));
                }
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(artefact_err(format!(
                        "layer {l} {what}: non-finite codebook values"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks the artefact against a model: KV heads, head_dim and (when given) the layer
    /// count, and that `layer` exists.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] with field `calibration`, naming both shapes.
    pub fn check_model(
        &self,
        kv_heads: usize,
        head_dim: usize,
        num_layers: Option<usize>,
        layer: usize,
    ) -> Result<()> {
        if self.kv_heads != kv_heads || self.head_dim != head_dim {
            return Err(artefact_err(format!(
                "RVQ artefact from {} has {} KV heads of head_dim {}, the cache {} of {}: \
                 calibrate this model",
                self.model, self.kv_heads, self.head_dim, kv_heads, head_dim
            )));
        }
        if let Some(n) = num_layers
            && n != self.num_layers
        {
            return Err(artefact_err(format!(
                "RVQ artefact from {} has {} layers, the model {n}: calibrate this model",
                self.model, self.num_layers
            )));
        }
        if layer >= self.num_layers {
            return Err(artefact_err(format!(
                "layer {layer} out of range for an artefact of {} layers",
                self.num_layers
            )));
        }
        Ok(())
    }

    /// The key and value quantizers of `layer` with their first `stages` stages, on `device`
    /// (groups are KV heads).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a layer out of range or more stages than trained.
    pub fn quantizers(
        &self,
        layer: usize,
        stages: usize,
        device: &Device,
    ) -> Result<(ResidualQuantizer, ResidualQuantizer)> {
        let l = self.layers.get(layer).ok_or_else(|| {
            artefact_err(format!(
                "layer {layer} out of range for an artefact of {} layers",
                self.num_layers
            ))
        })?;
        if !(1..=self.stages).contains(&stages) {
            return Err(invalid(
                "stages",
                format!(
                    "{stages} stages requested, the artefact has 1 to {}",
                    self.stages
                ),
            ));
        }
        let dims = [self.kv_heads, self.stages, self.entries, self.sub_dim];
        let make = |v: &Vec<f32>| {
            ResidualQuantizer::from_codebooks(Tensor::<4>::from_data(
                TensorData::new(v.clone(), dims),
                device,
            ))
            .truncate(stages)
        };
        Ok((make(&l.keys), make(&l.values)))
    }

    /// Writes the artefact as JSON.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] (field `calibration`) when the file cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = serde_json::to_string(self)
            .map_err(|e| artefact_err(format!("serialising the RVQ artefact: {e}")))?;
        std::fs::write(path, json)
            .map_err(|e| artefact_err(format!("cannot write `{}`: {e}", path.display())))
    }

    /// Reads and validates an artefact.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] (field `calibration`) for a missing file, bad JSON or an
    /// inconsistent artefact (see [`validate`](Self::validate)).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            artefact_err(format!(
                "cannot read `{}` ({e}); create it with `kv-eval calibrate --rvq FILE`",
                path.display()
            ))
        })?;
        let a: RvqArtefact = serde_json::from_str(&text).map_err(|e| {
            artefact_err(format!("`{}` is not an RVQ artefact: {e}", path.display()))
        })?;
        a.validate()?;
        Ok(a)
    }
}
