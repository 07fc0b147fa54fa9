//! PCA calibration: second-moment matrices of keys, queries and values gathered from a real
//! model, their eigendecomposition (with `faer`, on the host) into per-(layer, KV head) bases,
//! and the versioned artefact that the low-rank caches load.
//!
//! # The artefact
//! A safetensors file. Its header metadata holds, under the key `kv_lowrank`, the JSON of
//! [`CalibrationMeta`] (format version, model name, layer count, heads, head_dim, the
//! activations it has bases for, the token count and the calibration text). For each
//! activation `a` it holds two f32 tensors: `a.basis`, `[layers, kv_heads, head_dim,
//! head_dim]` whose columns are the principal directions sorted by decreasing eigenvalue, and
//! `a.eigenvalues`, `[layers, kv_heads, head_dim]`, decreasing. The joint activations
//! ([`Activation::is_joint`], format version 2) span all KV heads of a layer at once and are
//! stored `[layers, 1, kv_heads·head_dim, kv_heads·head_dim]` and `[layers, 1,
//! kv_heads·head_dim]`. Version 1 artefacts (per-head bases only) are still read.
//!
//! # The math
//! For an activation `X ∈ R^{N×d}` of one (layer, KV head) the accumulator sums `XᵀX` over
//! every calibration token and divides by `N`: `C = XᵀX / N`, the uncentred second moment.
//! Its eigenvectors are the directions that keep the most of `‖x‖²` on average, which is what
//! preserves dot products `q·k` and value sums; no mean is subtracted (attention does not
//! subtract one either). The joint query-key basis ([`Activation::QueryKey`], Eigen
//! Attention) diagonalises `C_k / tr C_k + C_q / tr C_q`, so keys and queries weigh equally
//! whatever their scale; the queries of a KV head are those of its GQA group. The joint
//! bases (CSKV) are the same computation on the concatenation of every KV head's vector.
//! The weight spectra (LoRC, [`CovarianceAccumulator::observe_weights`]) replace `XᵀX / N` by
//! `W_hᵀ W_h` of a head's projection `W_h ∈ R^{in×d}`: eigenvectors are its right singular
//! vectors, eigenvalues its squared singular values.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::prelude::*;
use kv_core::{KvError, KvShape};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

/// The artefact format version this crate writes. Version 2 added the joint (all-KV-head)
/// bases and the weight spectra; version 1 artefacts (per-head bases only) are still read.
pub const CALIBRATION_VERSION: u32 = 2;

/// The oldest artefact format version this crate reads.
pub const MIN_CALIBRATION_VERSION: u32 = 1;

/// The safetensors metadata key holding [`CalibrationMeta`] as JSON.
pub const META_KEY: &str = "kv_lowrank";

/// Largest `|UᵀU − I|` entry accepted for a stored basis.
pub const ORTHONORMAL_TOL: f32 = 1e-3;

/// An activation the calibration has a basis for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Keys after RoPE (what the caches store; Loki's default).
    Keys,
    /// Keys before RoPE.
    KeysPreRope,
    /// Queries after RoPE, pooled over the GQA group of each KV head.
    Queries,
    /// Values.
    Values,
    /// The joint basis of post-RoPE queries and keys (Eigen Attention's shared `U_qk`);
    /// derived from [`Activation::Keys`] and [`Activation::Queries`].
    QueryKey,
    /// Pre-RoPE keys of all KV heads of a layer as one `kv_heads · head_dim` vector (CSKV
    /// shrinks the channels of the whole key projection); accumulated whenever
    /// [`Activation::KeysPreRope`] is observed.
    KeysPreRopeJoint,
    /// Values of all KV heads of a layer as one `kv_heads · head_dim` vector (CSKV);
    /// accumulated whenever [`Activation::Values`] is observed.
    ValuesJoint,
    /// The key projection weights of each KV head (LoRC): the basis holds the right singular
    /// vectors of `W_k` (eigenvectors of `W_kᵀ W_k`), the eigenvalues the squared singular
    /// values. Added with [`CovarianceAccumulator::observe_weights`], not from activations.
    KeyWeights,
    /// The value projection weights of each KV head (LoRC), as [`Activation::KeyWeights`].
    ValueWeights,
}

impl Activation {
    /// The per-(layer, KV head) activations of a forward pass and the joint query-key basis
    /// derived from them, in artefact order (`kv-eval calibrate` reports these; the joint
    /// all-head bases and the weight spectra are [`Activation::EXTRA`]).
    pub const ALL: [Activation; 5] = [
        Activation::Keys,
        Activation::KeysPreRope,
        Activation::Queries,
        Activation::Values,
        Activation::QueryKey,
    ];
    /// The name used in the artefact's tensor names.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Keys => "keys",
            Activation::KeysPreRope => "keys_pre_rope",
            Activation::Queries => "queries",
            Activation::Values => "values",
            Activation::QueryKey => "query_key",
            Activation::KeysPreRopeJoint => "keys_pre_rope_joint",
            Activation::ValuesJoint => "values_joint",
            Activation::KeyWeights => "key_weights",
            Activation::ValueWeights => "value_weights",
        }
    }

    /// The bases that are not per-(layer, KV head) activations: the joint all-head bases
    /// (CSKV) and the weight spectra (LoRC), in artefact order.
    pub const EXTRA: [Activation; 4] = [
        Activation::KeysPreRopeJoint,
        Activation::ValuesJoint,
        Activation::KeyWeights,
        Activation::ValueWeights,
    ];

    /// Whether the basis spans all KV heads of a layer at once (`kv_heads · head_dim`
    /// dimensions, one "head") instead of one head.
    pub fn is_joint(self) -> bool {
        matches!(self, Activation::KeysPreRopeJoint | Activation::ValuesJoint)
    }

    /// Whether the basis comes from projection weights (LoRC) instead of activations.
    pub fn is_weight(self) -> bool {
        matches!(self, Activation::KeyWeights | Activation::ValueWeights)
    }

    /// The joint basis accumulated alongside this activation, if any.
    fn joint(self) -> Option<Activation> {
        match self {
            Activation::KeysPreRope => Some(Activation::KeysPreRopeJoint),
            Activation::Values => Some(Activation::ValuesJoint),
            _ => None,
        }
    }

    /// `(bases per layer, dimension)` for a model with `kv_heads` heads of `head_dim`.
    pub fn layout(self, kv_heads: usize, head_dim: usize) -> (usize, usize) {
        if self.is_joint() {
            (1, kv_heads * head_dim)
        } else {
            (kv_heads, head_dim)
        }
    }
}

/// What a calibration artefact was computed from; stored in the artefact's header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationMeta {
    /// The artefact format version ([`CALIBRATION_VERSION`]).
    pub version: u32,
    /// The model the activations came from (for messages; shapes are what is checked).
    pub model: String,
    /// Layers of the model.
    pub num_layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Query heads per layer.
    pub q_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// The activations the artefact has bases for.
    pub activations: Vec<Activation>,
    /// Calibration tokens (per sequence position; every head saw each of them).
    pub tokens: usize,
    /// The calibration text (never the evaluation text).
    pub source: String,
}

fn invalid(reason: String) -> KvError {
    KvError::InvalidConfig {
        field: "calibration",
        reason,
    }
}

/// Reads a tensor back to the host as f32.
fn read_host<const D: usize>(t: Tensor<D>) -> kv_core::Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| invalid(format!("reading a covariance back: {e:?}")))
}

/// Sums of `XᵀX` per (activation, layer, KV head), in f64 on the host.
#[derive(Debug, Clone)]
pub struct CovarianceAccumulator {
    num_layers: usize,
    shape: KvShape,
    grams: BTreeMap<Activation, Vec<f64>>,
    /// Rows summed per (activation, layer), per KV head.
    rows: BTreeMap<Activation, Vec<usize>>,
    tokens: usize,
}

impl CovarianceAccumulator {
    /// An empty accumulator for a model of `num_layers` layers of `shape` (batch ignored).
    pub fn new(num_layers: usize, shape: KvShape) -> Self {
        CovarianceAccumulator {
            num_layers,
            shape,
            grams: BTreeMap::new(),
            rows: BTreeMap::new(),
            tokens: 0,
        }
    }

    /// Adds the tokens of one activation tensor of layer `layer`: keys or values
    /// `[batch, kv_heads, n, head_dim]`, queries `[batch, q_heads, n, head_dim]` (pooled over
    /// the GQA group of each KV head). Pre-RoPE keys and values also feed their joint
    /// all-head second moments ([`Activation::KeysPreRopeJoint`], [`Activation::ValuesJoint`]).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a derived activation (the joint ones, weights), a layer
    /// out of range or a tensor of another shape.
    pub fn observe(&mut self, layer: usize, act: Activation, x: &Tensor<4>) -> kv_core::Result<()> {
        let (h, d) = (self.shape.kv_heads(), self.shape.head_dim());
        if act == Activation::QueryKey || act.is_joint() || act.is_weight() {
            return Err(invalid(format!(
                "{} is derived (from other activations or from weights), not observed",
                act.name()
            )));
        }
        self.check_layer(layer)?;
        let [b, heads, n, dd] = x.dims();
        let want_heads = if act == Activation::Queries {
            self.shape.q_heads()
        } else {
            h
        };
        if heads != want_heads || dd != d {
            return Err(invalid(format!(
                "{} of layer {layer}: got [{b}, {heads}, {n}, {dd}], expected [_, {want_heads}, _, {d}]",
                act.name()
            )));
        }
        if b * n == 0 {
            return Ok(());
        }
        let g = heads / h;
        let rows = b * g * n;
        let xh = x
            .clone()
            .reshape([b, h, g * n, d])
            .swap_dims(0, 1)
            .reshape([h, rows, d]);
        let gram = xh.clone().swap_dims(1, 2).matmul(xh);
        self.add_gram(layer, act, &read_host(gram)?, rows);
        if let Some(joint) = act.joint() {
            let xj = x.clone().swap_dims(1, 2).reshape([b * n, h * d]);
            let gram = xj.clone().transpose().matmul(xj);
            self.add_gram(layer, joint, &read_host(gram)?, b * n);
        }
        Ok(())
    }

    /// Adds the projection weights of layer `layer` for LoRC: `w` is the key or value
    /// projection in PyTorch layout, `[kv_heads · head_dim, in_dim]` row-major (output
    /// channels as rows, the rows of KV head `h` at `h · head_dim ..`). Each head's
    /// `W_h W_hᵀ` (`head_dim × head_dim`) is added once, so the artefact's eigenvectors are
    /// the right singular vectors of the head's `in_dim × head_dim` projection and its
    /// eigenvalues the squared singular values.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for an activation that is not a weight, a layer out of
    /// range, a layer given twice, or a length that is not `kv_heads · head_dim · in_dim`.
    pub fn observe_weights(
        &mut self,
        layer: usize,
        act: Activation,
        w: &[f32],
        in_dim: usize,
    ) -> kv_core::Result<()> {
        let (h, d) = (self.shape.kv_heads(), self.shape.head_dim());
        if !act.is_weight() {
            return Err(invalid(format!(
                "{} is an activation, not a projection weight",
                act.name()
            )));
        }
        self.check_layer(layer)?;
        if in_dim == 0 || w.len() != h * d * in_dim {
            return Err(invalid(format!(
                "{} of layer {layer}: {} values, expected kv_heads {h} x head_dim {d} x in_dim {in_dim}",
                act.name(),
                w.len()
            )));
        }
        if !w.iter().all(|x| x.is_finite()) {
            return Err(invalid(format!(
                "{} of layer {layer} holds non-finite values",
                act.name()
            )));
        }
        if self.rows.get(&act).is_some_and(|r| r[layer] > 0) {
            return Err(invalid(format!(
                "{} of layer {layer} given twice",
                act.name()
            )));
        }
        let mut gram = vec![0f64; h * d * d];
        for head in 0..h {
            let row = |i: usize| &w[(head * d + i) * in_dim..(head * d + i + 1) * in_dim];
            for i in 0..d {
                for j in i..d {
                    let dot: f64 = row(i)
                        .iter()
                        .zip(row(j))
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    gram[head * d * d + i * d + j] = dot;
                    gram[head * d * d + j * d + i] = dot;
                }
            }
        }
        self.add_gram(layer, act, &gram, 1);
        Ok(())
    }

    fn check_layer(&self, layer: usize) -> kv_core::Result<()> {
        if layer >= self.num_layers {
            return Err(invalid(format!(
                "layer {layer} out of range for {} layers",
                self.num_layers
            )));
        }
        Ok(())
    }

    /// Adds one layer's second-moment sums (`heads × dim × dim` in the activation's layout)
    /// computed from `rows` rows.
    fn add_gram<T: Copy + Into<f64>>(
        &mut self,
        layer: usize,
        act: Activation,
        g: &[T],
        rows: usize,
    ) {
        let (heads, dim) = act.layout(self.shape.kv_heads(), self.shape.head_dim());
        let size = heads * dim * dim;
        let acc = self
            .grams
            .entry(act)
            .or_insert_with(|| vec![0.0; self.num_layers * size]);
        for (a, v) in acc[layer * size..(layer + 1) * size].iter_mut().zip(g) {
            *a += (*v).into();
        }
        self.rows
            .entry(act)
            .or_insert_with(|| vec![0; self.num_layers])[layer] += rows;
    }

    /// Records that `n` more calibration tokens went through the model (for the metadata).
    pub fn add_tokens(&mut self, n: usize) {
        self.tokens += n;
    }

    /// The activations observed so far.
    pub fn activations(&self) -> Vec<Activation> {
        self.grams.keys().copied().collect()
    }

    /// Eigendecomposes every second-moment matrix into a [`Calibration`].
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] if nothing was observed, a layer saw no tokens of an
    /// activation, or an eigendecomposition fails.
    pub fn finish(self, model: &str, source: &str) -> kv_core::Result<Calibration> {
        let (h, d, l) = (
            self.shape.kv_heads(),
            self.shape.head_dim(),
            self.num_layers,
        );
        if self.grams.is_empty() {
            return Err(invalid("no activation was observed".into()));
        }
        let mut covs: BTreeMap<Activation, Vec<f64>> = BTreeMap::new();
        for (act, gram) in &self.grams {
            let rows = &self.rows[act];
            let (heads, dim) = act.layout(h, d);
            let size = heads * dim * dim;
            let mut cov = gram.clone();
            for layer in 0..l {
                if rows[layer] == 0 {
                    return Err(invalid(format!(
                        "layer {layer} saw no {} during calibration",
                        act.name()
                    )));
                }
                let n = rows[layer] as f64;
                for v in &mut cov[layer * size..(layer + 1) * size] {
                    *v /= n;
                }
            }
            covs.insert(*act, cov);
        }
        if let (Some(ck), Some(cq)) = (covs.get(&Activation::Keys), covs.get(&Activation::Queries))
        {
            let mut joint = vec![0.0; l * h * d * d];
            for m in 0..l * h {
                let r = m * d * d..(m + 1) * d * d;
                let trace = |c: &[f64]| {
                    (0..d)
                        .map(|i| c[i * d + i])
                        .sum::<f64>()
                        .max(f64::MIN_POSITIVE)
                };
                let (tk, tq) = (trace(&ck[r.clone()]), trace(&cq[r.clone()]));
                for (i, j) in r.enumerate() {
                    joint[m * d * d + i] = ck[j] / tk + cq[j] / tq;
                }
            }
            covs.insert(Activation::QueryKey, joint);
        }
        let mut bases = BTreeMap::new();
        for (act, cov) in covs {
            let (heads, d) = act.layout(h, d);
            let mut vectors = vec![0f32; l * heads * d * d];
            let mut values = vec![0f32; l * heads * d];
            for m in 0..l * heads {
                let (u, s) =
                    eigen_descending(&cov[m * d * d..(m + 1) * d * d], d).map_err(|e| {
                        invalid(format!("{}: eigendecomposition failed: {e}", act.name()))
                    })?;
                vectors[m * d * d..(m + 1) * d * d].copy_from_slice(&u);
                values[m * d..(m + 1) * d].copy_from_slice(&s);
            }
            bases.insert(act, Bases { vectors, values });
        }
        let meta = CalibrationMeta {
            version: CALIBRATION_VERSION,
            model: model.to_owned(),
            num_layers: l,
            kv_heads: h,
            q_heads: self.shape.q_heads(),
            head_dim: d,
            activations: bases.keys().copied().collect(),
            tokens: self.tokens,
            source: source.to_owned(),
        };
        Ok(Calibration { meta, bases })
    }
}

/// Eigenvectors (row-major `d × d`, one per column, unit norm, the largest coordinate
/// positive) and eigenvalues (clamped at 0), by decreasing eigenvalue.
fn eigen_descending(c: &[f64], d: usize) -> Result<(Vec<f32>, Vec<f32>), String> {
    let m = faer::Mat::<f64>::from_fn(d, d, |i, j| 0.5 * (c[i * d + j] + c[j * d + i]));
    let evd = m
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| format!("{e:?}"))?;
    let (u, s) = (evd.U(), evd.S().column_vector());
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
    let mut vectors = vec![0f32; d * d];
    let mut values = vec![0f32; d];
    for (col, &j) in order.iter().enumerate() {
        let pivot = (0..d)
            .max_by(|&a, &b| u[(a, j)].abs().total_cmp(&u[(b, j)].abs()))
            .unwrap_or(0);
        let sign = if u[(pivot, j)] < 0.0 { -1.0 } else { 1.0 };
        for i in 0..d {
            vectors[i * d + col] = (sign * u[(i, j)]) as f32;
        }
        values[col] = s[j].max(0.0) as f32;
    }
    Ok((vectors, values))
}

#[derive(Debug, Clone, PartialEq)]
struct Bases {
    /// `[layers, kv_heads, d, d]`, columns are components.
    vectors: Vec<f32>,
    /// `[layers, kv_heads, d]`, decreasing.
    values: Vec<f32>,
}

/// Per-(layer, KV head) PCA bases of a model's activations: the artefact the low-rank caches
/// load. Build one with [`CovarianceAccumulator::finish`], write it with
/// [`save`](Calibration::save) and read it with [`load`](Calibration::load).
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    meta: CalibrationMeta,
    bases: BTreeMap<Activation, Bases>,
}

impl Calibration {
    /// What the artefact was computed from.
    pub fn meta(&self) -> &CalibrationMeta {
        &self.meta
    }

    /// Whether the artefact has bases for `act`.
    pub fn has(&self, act: Activation) -> bool {
        self.bases.contains_key(&act)
    }

    /// `(bases per layer, dimension)` of `act` in this artefact.
    pub fn layout(&self, act: Activation) -> (usize, usize) {
        act.layout(self.meta.kv_heads, self.meta.head_dim)
    }

    /// The flat index of a (layer, head) basis and its dimension.
    fn index(&self, act: Activation, layer: usize, head: usize) -> Option<(usize, usize)> {
        let (heads, dim) = self.layout(act);
        (layer < self.meta.num_layers && head < heads).then_some((layer * heads + head, dim))
    }

    /// The basis of one (layer, KV head): `dim × dim` row-major (`dim` is `head_dim`, or
    /// `kv_heads · head_dim` with head 0 for the joint bases), one principal direction per
    /// column, by decreasing eigenvalue.
    pub fn basis_host(&self, act: Activation, layer: usize, head: usize) -> Option<&[f32]> {
        let (m, d) = self.index(act, layer, head)?;
        self.bases
            .get(&act)
            .map(|b| &b.vectors[m * d * d..(m + 1) * d * d])
    }

    /// The eigenvalues of one (layer, KV head), decreasing (squared singular values for the
    /// weight spectra).
    pub fn eigenvalues(&self, act: Activation, layer: usize, head: usize) -> Option<&[f32]> {
        let (m, d) = self.index(act, layer, head)?;
        self.bases.get(&act).map(|b| &b.values[m * d..(m + 1) * d])
    }

    /// The largest `|UᵀU − I|` entry of one stored basis (0 for an exactly orthonormal one);
    /// `None` when the artefact has no such basis.
    pub fn orthonormality_error(&self, act: Activation, layer: usize, head: usize) -> Option<f32> {
        let (_, d) = self.layout(act);
        self.basis_host(act, layer, head)
            .map(|u| orthonormality_error(u, d, d))
    }

    /// Checks that the artefact fits a cache of `shape` at `layer` and has `act`.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming both shapes (an artefact from another model) or the
    /// missing activation.
    pub fn check(&self, act: Activation, layer: usize, shape: &KvShape) -> kv_core::Result<()> {
        let m = &self.meta;
        if m.kv_heads != shape.kv_heads()
            || m.head_dim != shape.head_dim()
            || m.q_heads != shape.q_heads()
        {
            return Err(invalid(format!(
                "the artefact is for model `{}` with {} query heads, {} KV heads and head_dim {}, \
                 but the cache has {} query heads, {} KV heads and head_dim {}: calibrate this model",
                m.model,
                m.q_heads,
                m.kv_heads,
                m.head_dim,
                shape.q_heads(),
                shape.kv_heads(),
                shape.head_dim()
            )));
        }
        if layer >= m.num_layers {
            return Err(invalid(format!(
                "layer {layer} is out of range: the artefact for `{}` has {} layers",
                m.model, m.num_layers
            )));
        }
        if !self.has(act) {
            return Err(invalid(format!(
                "the artefact has no `{}` bases (it has {:?}); {}",
                act.name(),
                m.activations,
                if act.is_weight() {
                    "make the weight spectra with `cargo run --release -p kv-lowrank --example \
                     lorc_weights -- MODEL OUT`"
                } else {
                    "re-run `kv-eval calibrate` with this build"
                }
            )));
        }
        Ok(())
    }

    /// Checks that the artefact was made for a model of `num_layers` layers.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming both counts.
    pub fn check_layers(&self, num_layers: usize) -> kv_core::Result<()> {
        if self.meta.num_layers == num_layers {
            Ok(())
        } else {
            Err(invalid(format!(
                "the artefact is for model `{}` with {} layers, this model has {num_layers}: \
                 calibrate this model",
                self.meta.model, self.meta.num_layers
            )))
        }
    }

    /// The first `rank` principal directions of every KV head of `layer`, `[kv_heads,
    /// head_dim, rank]` (`[1, kv_heads · head_dim, rank]` for a joint basis), on `device`.
    ///
    /// # Errors
    /// As [`check`](Self::check); a rank outside `1..=dim`.
    pub fn basis(
        &self,
        act: Activation,
        layer: usize,
        shape: &KvShape,
        rank: usize,
        device: &Device,
    ) -> kv_core::Result<Tensor<3>> {
        let ranks = vec![rank; self.layout(act).0];
        self.check(act, layer, shape)?;
        let d = self.layout(act).1;
        if act.is_joint() {
            crate::params::check_joint_rank("rank", rank, d)?;
        } else {
            crate::params::check_rank("rank", rank, d)?;
        }
        let data = self.truncated(act, layer, &ranks);
        let h = ranks.len();
        Ok(Tensor::from_data(
            TensorData::new(data.concat(), [h, d, rank]),
            device,
        ))
    }

    /// The first `ranks[h]` principal directions of each head `h` of `layer`, row-major
    /// `dim × ranks[h]` each, on the host.
    ///
    /// # Panics
    /// If the artefact lacks `act`, the layer is out of range, `ranks` does not have one
    /// entry per basis or a rank exceeds the dimension (callers check first).
    pub(crate) fn truncated(
        &self,
        act: Activation,
        layer: usize,
        ranks: &[usize],
    ) -> Vec<Vec<f32>> {
        let d = self.layout(act).1;
        assert_eq!(
            ranks.len(),
            self.layout(act).0,
            "Calibration::truncated: ranks per head"
        );
        ranks
            .iter()
            .enumerate()
            .map(|(head, &r)| {
                assert!(r <= d, "Calibration::truncated: rank {r} > {d}");
                let u = self
                    .basis_host(act, layer, head)
                    .expect("Calibration::truncated: checked by the caller");
                (0..d)
                    .flat_map(|i| u[i * d..i * d + r].iter().copied())
                    .collect()
            })
            .collect()
    }

    /// Serialises the artefact (safetensors with the metadata header).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] if serialisation fails.
    pub fn to_bytes(&self) -> kv_core::Result<Vec<u8>> {
        let m = &self.meta;
        let l = m.num_layers;
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (act, b) in &self.bases {
            let (h, d) = self.layout(*act);
            let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            owned.push((
                format!("{}.basis", act.name()),
                vec![l, h, d, d],
                le(&b.vectors),
            ));
            owned.push((
                format!("{}.eigenvalues", act.name()),
                vec![l, h, d],
                le(&b.values),
            ));
        }
        let views = owned
            .iter()
            .map(|(name, shape, bytes)| {
                TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (name.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("serialising: {e}")))?;
        let json = serde_json::to_string(m).map_err(|e| invalid(format!("serialising: {e}")))?;
        let info = HashMap::from([(META_KEY.to_owned(), json)]);
        safetensors::serialize(views, Some(info)).map_err(|e| invalid(format!("serialising: {e}")))
    }

    /// Parses and validates an artefact: version, metadata, tensor shapes, orthonormality.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] saying what is wrong (another version, a corrupt file, a
    /// missing tensor, a basis that is not orthonormal).
    pub fn from_bytes(bytes: &[u8]) -> kv_core::Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| invalid(format!("not a calibration artefact (safetensors): {e}")))?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| invalid(format!("not a calibration artefact (safetensors): {e}")))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| {
                invalid(format!(
                    "no `{META_KEY}` metadata: not a kv-lowrank calibration artefact"
                ))
            })?;
        let version = serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v.get("version").and_then(serde_json::Value::as_u64));
        if !version.is_some_and(|v| {
            (u64::from(MIN_CALIBRATION_VERSION)..=u64::from(CALIBRATION_VERSION)).contains(&v)
        }) {
            return Err(invalid(format!(
                "artefact format version {} is not supported (this build reads versions \
                 {MIN_CALIBRATION_VERSION} to {CALIBRATION_VERSION}); re-run `kv-eval calibrate`",
                version.map_or_else(|| "(missing)".to_owned(), |v| v.to_string())
            )));
        }
        let meta: CalibrationMeta =
            serde_json::from_str(json).map_err(|e| invalid(format!("bad metadata: {e}")))?;
        let (l, kv_heads, head_dim) = (meta.num_layers, meta.kv_heads, meta.head_dim);
        if l == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(invalid(
                "metadata has a zero layer, head or head_dim count".into(),
            ));
        }
        let mut bases = BTreeMap::new();
        for &act in &meta.activations {
            let (h, d) = act.layout(kv_heads, head_dim);
            let read = |suffix: &str, shape: Vec<usize>| -> kv_core::Result<Vec<f32>> {
                let name = format!("{}.{suffix}", act.name());
                let t = st
                    .tensor(&name)
                    .map_err(|e| invalid(format!("tensor `{name}`: {e}")))?;
                if t.dtype() != Dtype::F32 || t.shape() != shape.as_slice() {
                    return Err(invalid(format!(
                        "tensor `{name}` is {:?} {:?}, expected F32 {shape:?}",
                        t.dtype(),
                        t.shape()
                    )));
                }
                Ok(t.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            };
            let vectors = read("basis", vec![l, h, d, d])?;
            let values = read("eigenvalues", vec![l, h, d])?;
            if !vectors.iter().chain(&values).all(|x| x.is_finite()) {
                return Err(invalid(format!("`{}` holds non-finite values", act.name())));
            }
            for m in 0..l * h {
                let err = orthonormality_error(&vectors[m * d * d..(m + 1) * d * d], d, d);
                if err > ORTHONORMAL_TOL {
                    return Err(invalid(format!(
                        "`{}` basis of layer {}, head {} is not orthonormal (|UᵀU − I| = {err})",
                        act.name(),
                        m / h,
                        m % h
                    )));
                }
            }
            bases.insert(act, Bases { vectors, values });
        }
        Ok(Calibration { meta, bases })
    }

    /// Writes the artefact to `path`.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] with the I/O error.
    pub fn save(&self, path: impl AsRef<Path>) -> kv_core::Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_bytes()?)
            .map_err(|e| invalid(format!("writing `{}`: {e}", path.display())))
    }

    /// Reads and validates an artefact from `path`.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`]: a missing file (with the command that makes one), or what
    /// [`from_bytes`](Self::from_bytes) rejects.
    pub fn load(path: impl AsRef<Path>) -> kv_core::Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| {
            invalid(format!(
                "cannot read calibration artefact `{}` ({e}); make one with \
                 `kv-eval calibrate --out {}`",
                path.display(),
                path.display()
            ))
        })?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            KvError::InvalidConfig { field, reason } => KvError::InvalidConfig {
                field,
                reason: format!("`{}`: {reason}", path.display()),
            },
            other => other,
        })
    }
}

/// The largest `|UᵀU − I|` entry of a row-major `rows × cols` matrix.
pub fn orthonormality_error(u: &[f32], rows: usize, cols: usize) -> f32 {
    let m = faer::Mat::<f64>::from_fn(rows, cols, |i, j| f64::from(u[i * cols + j]));
    let gram = m.transpose() * &m;
    let mut worst = 0f64;
    for a in 0..cols {
        for b in a..cols {
            let want = if a == b { 1.0 } else { 0.0 };
            worst = worst.max((gram[(a, b)] - want).abs());
        }
    }
    worst as f32
}
