//! KVQuant (Hooper et al., 2024, arXiv 2401.18079): pre-RoPE per-channel keys, per-token
//! values, non-uniform codebooks from a calibration step, dense-and-sparse outliers and fp16
//! attention-sink tokens.
//!
//! # Calibration ([`KvQuantCalibration::calibrate`], after SqueezeAILab/KVQuant
//! `quant/kvquant/simquant_module_quantizer.py::SimQuant.quantize`)
//! From captured pre-RoPE keys and values (the first `sinks` tokens of every sequence left out):
//! - keys, per KV head and channel: the upper and lower thresholds are the `t` and `1 − t`
//!   percentiles over the calibration tokens, `t = 1 − (1 − p)/2` for the sparsity threshold
//!   `p` (0.99: 0.5 % per tail); the key codebook is a 1-D k-means with `2^b` clusters over the
//!   normalised non-outlier values `x̃ = (x − (u+l)/2) / ((u−l)/2)`, `|x̃| ≤ 1`, of all channels;
//! - values, per token (over all KV heads' channels, the reference's per-token hidden state):
//!   the same percentiles and normalisation per token, and a second codebook by k-means.
//!
//! The reference weights k-means by Fisher information (squared gradients of the loss with
//! respect to each activation, its `--fisher`): [`KvQuantCalibration::calibrate_weighted`]
//! takes those weights (`kv-eval calibrate --kvquant-fisher` computes them with Burn's
//! autodiff); [`KvQuantCalibration::calibrate`] uses uniform weights (the reference's branch
//! without `--fisher`). k-means is Lloyd's algorithm in one dimension on sorted data with
//! prefix sums (exact assignments), initialised at the `(j + ½)/2^b` quantiles and run for at
//! most 50 iterations (the reference: scikit-learn, k-means++ init, `max_iter=50`).
//!
//! # Storage and quantization
//! - The first `sinks` tokens of every sequence are kept in fp16 (keys pre-RoPE and values).
//! - Keys (pre-RoPE): per channel, offset `(u+l)/2` and half-range `(u−l)/2` from the
//!   calibration (fp16); a key entry outside `[l, u]` is an outlier; the others are normalised
//!   and rounded to the nearest codebook entry (ties to the lower entry), `b`-bit codes.
//! - Values: per token, dynamic: the `t`/`1 − t` quantiles of the token's entries (linear
//!   interpolation, as `torch.quantile`) mark outliers (`x ≥ upper` or `x ≤ lower`); the
//!   outliers are replaced by the token's (lower) median and the min and max of the result give
//!   the token's offset and half-range (fp16); codes as for keys.
//! - Outliers (dense-and-sparse): fp16 values with `u32` column indices
//!   `(batch · kv_heads + head) · head_dim + channel` in token order, and one `u32` row end per
//!   token (CSR, the reference's format for keys).
//!
//! `x̂ = LUT[code] · range + offset`, then outliers overwrite their entries. Keys are rotated
//! by RoPE at their positions after dequantization ([`KvCache::key_rope`] is
//! [`KeyRope::PreRope`]): the model appends unrotated keys and rotated queries.
//!
//! Every token is quantized on append (the reference quantizes the projections' outputs), so
//! a block attends to its own quantized keys and values.

use burn::prelude::*;
use burn::tensor::{FloatDType, IndexingUpdateOp, IntDType};
use kv_core::positions_per_head;
use kv_core::{
    Attended, HeldBuffer, KeyPositions, KeyRope, KvBlock, KvCache, KvError, KvShape, KvView,
    Lengths, MemoryReport, PAD, Query, Rope, RopeConfig, StatsRequest, StorageRole, check_block,
    check_positions, check_query, reference_attention,
};
use serde::{Deserialize, Serialize};

use crate::attend::attend_streamed;
use crate::group::F16_MAX_ABS_INPUT;
use crate::packing::{BitWidth, pack_words, unpack_words};
use crate::{QuantError, Result};

/// The k-means iterations of the calibration (the reference's `max_iter=50`).
pub const KMEANS_MAX_ITERS: usize = 50;

/// The `q`-quantile (`q` in `[0, 1]`) of sorted data with linear interpolation (numpy's
/// `percentile` and `torch.quantile` default).
fn quantile_sorted(v: &[f32], q: f64) -> f32 {
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    let frac = (pos - lo as f64) as f32;
    v[lo] + frac * (v[hi] - v[lo])
}

/// One-dimensional k-means (Lloyd's algorithm) with `k` clusters on `xs`, uniform weights:
/// sorted data and prefix sums make every assignment exact (a point goes to the nearest
/// centroid, ties to the lower one). Centroids start at the `(j + ½)/k` quantiles; at most
/// `iters` iterations; returns the centroids sorted ascending. An empty cluster keeps its
/// centroid.
///
/// # Panics
/// If `xs` is empty or `k` is zero (a programmer error).
pub fn kmeans_1d(mut xs: Vec<f32>, k: usize, iters: usize) -> Vec<f32> {
    assert!(
        !xs.is_empty() && k > 0,
        "kmeans_1d: empty data or zero clusters"
    );
    xs.sort_by(f32::total_cmp);
    let (mut pw, mut pwx) = (
        Vec::with_capacity(xs.len() + 1),
        Vec::with_capacity(xs.len() + 1),
    );
    pw.push(0.0f64);
    pwx.push(0.0f64);
    for (i, &x) in xs.iter().enumerate() {
        pw.push((i + 1) as f64);
        pwx.push(pwx[i] + f64::from(x));
    }
    let c: Vec<f32> = (0..k)
        .map(|j| quantile_sorted(&xs, (j as f64 + 0.5) / k as f64))
        .collect();
    lloyd_1d(&xs, &pw, &pwx, c, iters)
}

/// Lloyd iterations on sorted `xs` with prefix sums of the weights (`pw`) and of weight times
/// value (`pwx`), both starting at 0: each centroid moves to the weighted mean of the points
/// nearer to it than to its neighbours (ties to the lower one); a weightless cluster keeps its
/// centroid. Stops when nothing moves or after `iters` iterations.
fn lloyd_1d(xs: &[f32], pw: &[f64], pwx: &[f64], mut c: Vec<f32>, iters: usize) -> Vec<f32> {
    let k = c.len();
    for _ in 0..iters {
        let mut next = c.clone();
        let mut lo = 0;
        for j in 0..k {
            let hi = if j + 1 == k {
                xs.len()
            } else {
                let mid = (c[j] + c[j + 1]) / 2.0;
                xs.partition_point(|&x| x <= mid)
            };
            let w = pw[hi.max(lo)] - pw[lo];
            if hi > lo && w > 0.0 {
                next[j] = ((pwx[hi] - pwx[lo]) / w) as f32;
            }
            lo = hi.max(lo);
        }
        next.sort_by(f32::total_cmp);
        if next == c {
            break;
        }
        c = next;
    }
    c
}

/// One-dimensional weighted k-means (Lloyd's algorithm) with `k` clusters on `(x, w)`
/// points (`w ≥ 0`): KVQuant's Fisher-weighted codebooks (the reference fits scikit-learn's
/// k-means with `sample_weight` = the squared gradients). Assignments are exact as in
/// [`kmeans_1d`]; a centroid moves to the weighted mean of its points. Centroids start at the
/// `(j + ½)/k` quantiles of the weighted distribution (the smallest `x` whose cumulative
/// weight reaches that share); at most `iters` iterations; sorted ascending. A cluster whose
/// points weigh nothing keeps its centroid.
///
/// # Panics
/// If `points` is empty, `k` is zero, or the weights are negative, non-finite or all zero (a
/// programmer error: callers validate).
pub fn kmeans_1d_weighted(mut points: Vec<(f32, f32)>, k: usize, iters: usize) -> Vec<f32> {
    assert!(
        !points.is_empty() && k > 0,
        "kmeans_1d_weighted: empty data or zero clusters"
    );
    assert!(
        points.iter().all(|&(_, w)| w.is_finite() && w >= 0.0)
            && points.iter().any(|&(_, w)| w > 0.0),
        "kmeans_1d_weighted: weights must be finite, non-negative and not all zero"
    );
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let xs: Vec<f32> = points.iter().map(|p| p.0).collect();
    let (mut pw, mut pwx) = (vec![0.0f64], vec![0.0f64]);
    for &(x, w) in &points {
        pw.push(pw[pw.len() - 1] + f64::from(w));
        pwx.push(pwx[pwx.len() - 1] + f64::from(w) * f64::from(x));
    }
    let total = pw[pw.len() - 1];
    let c: Vec<f32> = (0..k)
        .map(|j| {
            let target = (j as f64 + 0.5) / k as f64 * total;
            let i = pw[1..].partition_point(|&cw| cw < target).min(xs.len() - 1);
            xs[i]
        })
        .collect();
    lloyd_1d(&xs, &pw, &pwx, c, iters)
}

/// The calibration artefact of a KVQuant layer: per-channel key thresholds and the two
/// non-uniform codebooks (serialisable; produced by [`calibrate`](Self::calibrate) from a real
/// model's captured keys and values, loaded at [`KvQuantConfig::init`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvQuantCalibration {
    /// Code width `b` (2, 3 or 4).
    pub bits: u32,
    /// KV heads of the layer.
    pub kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// The sparsity threshold `p` (0.99: 1 % outliers, 0.5 % per tail); 1 disables outliers.
    pub sparsity_threshold: f64,
    /// Leading tokens of every sequence kept in fp16 (left out of the calibration as well).
    pub sinks: usize,
    /// Upper key threshold per (head, channel), `kv_heads * head_dim` entries.
    pub key_upper: Vec<f32>,
    /// Lower key threshold per (head, channel).
    pub key_lower: Vec<f32>,
    /// The key codebook in normalised units, `2^b` entries ascending.
    pub key_lut: Vec<f32>,
    /// The value codebook in normalised units, `2^b` entries ascending.
    pub value_lut: Vec<f32>,
    /// Whether the codebooks come from Fisher-weighted k-means
    /// ([`calibrate_weighted`](Self::calibrate_weighted)); absent in older artefacts (false).
    #[serde(default)]
    pub fisher_weighted: bool,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> QuantError {
    QuantError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

fn check_bits(bits: u32) -> Result<BitWidth> {
    if matches!(bits, 2..=4) {
        BitWidth::new(bits)
    } else {
        Err(QuantError::UnsupportedBits {
            bits,
            extra: " (KVQuant codebooks take 2, 3 or 4 bits)",
        })
    }
}

fn check_threshold(p: f64) -> Result<()> {
    if p > 0.0 && p <= 1.0 {
        Ok(())
    } else {
        Err(invalid(
            "sparsity_threshold",
            format!("{p} is not in (0, 1] (0.99 keeps 1 % outliers, 1 none)"),
        ))
    }
}

/// `t = 1 − (1 − p)/2`, the upper percentile of a sparsity threshold `p`.
fn upper_quantile(p: f64) -> f64 {
    1.0 - (1.0 - p) / 2.0
}

fn host(t: &Tensor<4>) -> Vec<f32> {
    t.clone()
        .cast(FloatDType::F32)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default()
}

impl KvQuantCalibration {
    /// Calibrates from captured pre-RoPE `keys` and `values`, `[sequences, kv_heads, tokens,
    /// head_dim]` (each batch entry one calibration sequence), with `b = bits`, sparsity
    /// threshold `p` and `sinks` leading tokens per sequence left out. See the module docs.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedBits`] outside 2–4; [`QuantError::InvalidConfig`] for `p`
    /// outside `(0, 1]`, shapes that differ, or no token past the sinks;
    /// [`QuantError::NonFinite`] for NaN or infinity.
    pub fn calibrate(
        keys: &Tensor<4>,
        values: &Tensor<4>,
        bits: u32,
        sparsity_threshold: f64,
        sinks: usize,
    ) -> Result<Self> {
        Self::calibrate_weighted(keys, values, None, bits, sparsity_threshold, sinks)
    }

    /// [`calibrate`](Self::calibrate) with KVQuant's Fisher-information weights: `fisher`
    /// holds, for every captured key and value entry, its weight in the codebooks' k-means
    /// (the reference's `--fisher`: the squared gradient of the loss with respect to that
    /// activation), same shape as `keys` and `values`. Thresholds do not depend on the
    /// weights. `None` is the uniform calibration.
    ///
    /// # Errors
    /// As [`calibrate`](Self::calibrate), and [`QuantError::InvalidConfig`] for weights of
    /// another shape, negative or non-finite weights, or weights that are all zero on the
    /// inliers of keys or values.
    pub fn calibrate_weighted(
        keys: &Tensor<4>,
        values: &Tensor<4>,
        fisher: Option<(&Tensor<4>, &Tensor<4>)>,
        bits: u32,
        sparsity_threshold: f64,
        sinks: usize,
    ) -> Result<Self> {
        check_bits(bits)?;
        check_threshold(sparsity_threshold)?;
        let [s, h, t, d] = keys.dims();
        if values.dims() != keys.dims() {
            return Err(invalid(
                "calibration",
                format!(
                    "keys {:?} and values {:?} differ",
                    keys.dims(),
                    values.dims()
                ),
            ));
        }
        if s * h * d == 0 || t <= sinks {
            return Err(invalid(
                "calibration",
                format!("{t} tokens per sequence leave none past {sinks} sinks"),
            ));
        }
        let (kd, vd) = (host(keys), host(values));
        if kd.iter().chain(&vd).any(|x| !x.is_finite()) {
            return Err(QuantError::NonFinite {
                what: "calibration keys/values",
            });
        }
        let weights = match fisher {
            None => None,
            Some((fk, fv)) => {
                if fk.dims() != keys.dims() || fv.dims() != keys.dims() {
                    return Err(invalid(
                        "fisher",
                        format!(
                            "weights {:?} / {:?} for activations {:?}",
                            fk.dims(),
                            fv.dims(),
                            keys.dims()
                        ),
                    ));
                }
                let (wk, wv) = (host(fk), host(fv));
                if wk.iter().chain(&wv).any(|w| !w.is_finite() || *w < 0.0) {
                    return Err(invalid("fisher", "weights must be finite and non-negative"));
                }
                Some((wk, wv))
            }
        };
        let weight = |keys: bool, i: usize| -> f32 {
            weights
                .as_ref()
                .map_or(1.0, |(wk, wv)| if keys { wk[i] } else { wv[i] })
        };
        let tq = upper_quantile(sparsity_threshold);
        let idx = |si: usize, hi: usize, ti: usize, ci: usize| ((si * h + hi) * t + ti) * d + ci;
        // Keys: per (head, channel) thresholds, then one codebook over all channels.
        let (mut upper, mut lower) = (Vec::with_capacity(h * d), Vec::with_capacity(h * d));
        let mut key_points = Vec::new();
        for hi in 0..h {
            for ci in 0..d {
                let cells: Vec<usize> = (0..s)
                    .flat_map(|si| (sinks..t).map(move |ti| idx(si, hi, ti, ci)))
                    .collect();
                let raw: Vec<f32> = cells.iter().map(|&i| kd[i]).collect();
                let mut col = raw.clone();
                col.sort_by(f32::total_cmp);
                let (u, l) = (quantile_sorted(&col, tq), quantile_sorted(&col, 1.0 - tq));
                upper.push(u);
                lower.push(l);
                let w: Vec<f32> = cells.iter().map(|&i| weight(true, i)).collect();
                key_points.extend(normalised_inliers(&raw, &w, u, l));
            }
        }
        // Values: per token over all heads' channels.
        let mut value_points = Vec::new();
        for si in 0..s {
            for ti in sinks..t {
                let cells: Vec<usize> = (0..h)
                    .flat_map(|hi| (0..d).map(move |ci| idx(si, hi, ti, ci)))
                    .collect();
                let row: Vec<f32> = cells.iter().map(|&i| vd[i]).collect();
                let w: Vec<f32> = cells.iter().map(|&i| weight(false, i)).collect();
                let mut sorted = row.clone();
                sorted.sort_by(f32::total_cmp);
                let (u, l) = (
                    quantile_sorted(&sorted, tq),
                    quantile_sorted(&sorted, 1.0 - tq),
                );
                value_points.extend(normalised_inliers(&row, &w, u, l));
            }
        }
        let k = 1usize << bits;
        let weighted = weights.is_some();
        let lut = |what: &str, pts: Vec<(f32, f32)>| -> Result<Vec<f32>> {
            if pts.is_empty() {
                // Every entry was constant: a codebook at 0 reproduces it (range 0).
                Ok(vec![0.0; k])
            } else if !weighted {
                Ok(kmeans_1d(
                    pts.into_iter().map(|p| p.0).collect(),
                    k,
                    KMEANS_MAX_ITERS,
                ))
            } else if pts.iter().all(|p| p.1 == 0.0) {
                Err(invalid(
                    "fisher",
                    format!("every {what} inlier has weight 0"),
                ))
            } else {
                Ok(kmeans_1d_weighted(pts, k, KMEANS_MAX_ITERS))
            }
        };
        Ok(KvQuantCalibration {
            bits,
            kv_heads: h,
            head_dim: d,
            sparsity_threshold,
            sinks,
            key_upper: upper,
            key_lower: lower,
            key_lut: lut("key", key_points)?,
            value_lut: lut("value", value_points)?,
            fisher_weighted: weighted,
        })
    }

    fn validate(&self, shape: &KvShape) -> Result<BitWidth> {
        let bits = check_bits(self.bits)?;
        check_threshold(self.sparsity_threshold)?;
        let (h, d) = (shape.kv_heads(), shape.head_dim());
        if (self.kv_heads, self.head_dim) != (h, d) {
            return Err(invalid(
                "calibration",
                format!(
                    "calibrated for {} KV heads of {} channels, the layer has {h} of {d}",
                    self.kv_heads, self.head_dim
                ),
            ));
        }
        if self.key_upper.len() != h * d || self.key_lower.len() != h * d {
            return Err(invalid(
                "calibration",
                format!("key thresholds need {} entries each", h * d),
            ));
        }
        let k = 1usize << self.bits;
        for (name, lut) in [("key_lut", &self.key_lut), ("value_lut", &self.value_lut)] {
            if lut.len() != k || !lut.is_sorted_by(|a, b| a <= b) {
                return Err(invalid(
                    "calibration",
                    format!("{name} must hold {k} ascending entries"),
                ));
            }
        }
        let all = self
            .key_upper
            .iter()
            .chain(&self.key_lower)
            .chain(&self.key_lut)
            .chain(&self.value_lut);
        if all.clone().any(|x| !x.is_finite())
            || self
                .key_upper
                .iter()
                .zip(&self.key_lower)
                .any(|(u, l)| l > u || u.abs().max(l.abs()) > F16_MAX_ABS_INPUT)
        {
            return Err(invalid(
                "calibration",
                "thresholds and codebooks must be finite, lower <= upper, within fp16",
            ));
        }
        Ok(bits)
    }
}

/// The entries of `row` inside `[l, u]`, normalised to `[-1, 1]` (none if `u == l`).
fn normalised_inliers(row: &[f32], weights: &[f32], u: f32, l: f32) -> Vec<(f32, f32)> {
    let (off, rng) = ((u + l) / 2.0, (u - l) / 2.0);
    if rng <= 0.0 {
        return Vec::new();
    }
    row.iter()
        .zip(weights)
        .map(|(&x, &w)| ((x - off) / rng, w))
        .filter(|(x, _)| x.abs() <= 1.0)
        .collect()
}

/// Configuration of a [`KvQuantCache`]: the layer shape, the model's RoPE (keys are rotated
/// after dequantization) and the calibration artefact (which fixes `b`, the sparsity
/// threshold and the sinks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvQuantConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// The model's RoPE.
    pub rope: RopeConfig,
    /// The calibration artefact of this layer.
    pub calibration: KvQuantCalibration,
}

impl KvQuantConfig {
    /// A config from its parts.
    pub fn new(shape: KvShape, rope: RopeConfig, calibration: KvQuantCalibration) -> Self {
        KvQuantConfig {
            shape,
            rope,
            calibration,
        }
    }

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &["calibration"];

    /// The config for `key=value` parameters: `calibration` (required) names the artefact,
    /// which `load` turns into a [`KvQuantCalibration`] (the caller does the IO: a registry
    /// reads a JSON file, a test builds one in memory). Validated by [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for an unknown parameter or a missing `calibration`, and
    /// whatever `load` returns.
    pub fn from_params<'a>(
        shape: KvShape,
        rope: RopeConfig,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
        load: impl FnOnce(&str) -> kv_core::Result<KvQuantCalibration>,
    ) -> kv_core::Result<Self> {
        let mut source = None;
        for (k, v) in params {
            match k {
                "calibration" => source = Some(v),
                _ => return Err(crate::params::unknown("KVQuant", k, Self::PARAMS)),
            }
        }
        let source = source.ok_or_else(|| KvError::InvalidConfig {
            field: "calibration",
            reason: "KVQuant needs a calibration artefact (`calibration=...`): its key \
                     thresholds and codebooks come from captured keys and values"
                .into(),
        })?;
        Ok(KvQuantConfig::new(shape, rope, load(source)?))
    }

    /// Builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a calibration that does not fit the shape (heads,
    /// channels, table sizes, unsorted or non-finite entries), bits outside 2–4, a threshold
    /// outside `(0, 1]`, or a RoPE that does not fit `head_dim`.
    pub fn init(&self, device: &Device) -> kv_core::Result<KvQuantCache> {
        let bits = self
            .calibration
            .validate(&self.shape)
            .map_err(KvError::from)?;
        if self.rope.head_dim != self.shape.head_dim() {
            return Err(KvError::InvalidConfig {
                field: "rope",
                reason: format!(
                    "RoPE head_dim {} differs from the layer's {}",
                    self.rope.head_dim,
                    self.shape.head_dim()
                ),
            });
        }
        let rope = self.rope.init()?;
        let c = &self.calibration;
        let (h, d) = (self.shape.kv_heads(), self.shape.head_dim());
        let per_channel = |f: &dyn Fn(f32, f32) -> f32| -> Tensor<4> {
            let v: Vec<f32> = c
                .key_upper
                .iter()
                .zip(&c.key_lower)
                .map(|(&u, &l)| f(u, l))
                .collect();
            Tensor::<4>::from_data(TensorData::new(v, [1, h, 1, d]), device).cast(FloatDType::F16)
        };
        let lut =
            |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), device);
        Ok(KvQuantCache {
            config: self.clone(),
            device: device.clone(),
            rope,
            bits,
            key_offset: per_channel(&|u, l| (u + l) / 2.0),
            key_range: per_channel(&|u, l| (u - l) / 2.0),
            key_lut: lut(&c.key_lut),
            value_lut: lut(&c.value_lut),
            sink: None,
            keys: None,
            values: None,
            value_stats: None,
            key_sparse: Sparse::default(),
            value_sparse: Sparse::default(),
            len: 0,
            positions: vec![Vec::new(); self.shape.batch()],
            logical: vec![0; self.shape.batch()],
        })
    }

    /// Stored bytes once `t` tokens per sequence are held, `nnz` outliers in all (keys and
    /// values): sinks `2·2 B H d` per token, `2·4⌈d/c⌉ B H` codes and `2·2 B` value statistics
    /// per quantized token, 6 bytes per outlier (fp16 value, `u32` column), two `u32` row ends
    /// per quantized token, the codebooks (`2·4·2^b`), the key offsets and ranges (`2·2 H d`)
    /// and a `u32` position per token and sequence. The formula of `docs/techniques/quant.md`.
    ///
    /// # Errors
    /// As [`init`](Self::init).
    pub fn stored_bytes(&self, t: usize, nnz: usize) -> kv_core::Result<usize> {
        let bits = self
            .calibration
            .validate(&self.shape)
            .map_err(KvError::from)?;
        let s = self.shape;
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let sinks = t.min(self.calibration.sinks);
        let q = t - sinks;
        Ok(2 * 2 * b * h * d * sinks
            + q * (2 * b * h * bits.bytes_for(d) + 2 * 2 * b + 2 * 4)
            + 6 * nnz
            + 2 * 4 * (1usize << bits.bits())
            + 2 * 2 * h * d
            + b * t * 4)
    }
}

/// Outliers in CSR form over quantized tokens: fp16 values and `u32` columns in token order,
/// and the running count after every token (host).
#[derive(Debug, Clone, Default)]
struct Sparse {
    cols: Option<Tensor<1, Int>>,
    vals: Option<Tensor<1>>,
    row_end: Vec<u32>,
}

impl Sparse {
    fn nnz(&self) -> usize {
        self.row_end.last().map_or(0, |&n| n as usize)
    }

    fn held_buffers(&self, role: StorageRole) -> Vec<HeldBuffer> {
        let mut out = vec![HeldBuffer::host(StorageRole::Metadata, &self.row_end)];
        if let Some(c) = &self.cols {
            out.push(HeldBuffer::tensor(role, c));
        }
        if let Some(v) = &self.vals {
            out.push(HeldBuffer::tensor(role, v));
        }
        out
    }

    fn bytes(&self) -> (usize, usize) {
        let t = |x: Option<usize>| x.unwrap_or(0);
        (
            t(self
                .cols
                .as_ref()
                .map(|c| c.shape().num_elements() * c.dtype().size()))
                + t(self
                    .vals
                    .as_ref()
                    .map(|v| v.shape().num_elements() * v.dtype().size())),
            core::mem::size_of_val(self.row_end.as_slice()),
        )
    }

    /// `self` followed by a block of `n` tokens with outliers `(token, col, value)` in token
    /// order.
    fn extended(&self, n: usize, found: &[(usize, u32, f32)], device: &Device) -> Sparse {
        let mut row_end = self.row_end.clone();
        let base = self.nnz() as u32;
        let mut k = 0;
        for t in 0..n {
            while k < found.len() && found[k].0 == t {
                k += 1;
            }
            row_end.push(base + k as u32);
        }
        if found.is_empty() {
            return Sparse {
                cols: self.cols.clone(),
                vals: self.vals.clone(),
                row_end,
            };
        }
        let cols: Vec<i32> = found.iter().map(|f| f.1 as i32).collect();
        let vals: Vec<f32> = found.iter().map(|f| f.2).collect();
        let cols = Tensor::<1, Int>::from_data(TensorData::new(cols, [found.len()]), device)
            .cast(IntDType::U32);
        let vals = Tensor::<1>::from_data(TensorData::new(vals, [found.len()]), device)
            .cast(FloatDType::F16);
        let cat_i = |a: &Option<Tensor<1, Int>>, b| match a {
            Some(a) => Tensor::cat(vec![a.clone(), b], 0),
            None => b,
        };
        let cat_f = |a: &Option<Tensor<1>>, b| match a {
            Some(a) => Tensor::cat(vec![a.clone(), b], 0),
            None => b,
        };
        Sparse {
            cols: Some(cat_i(&self.cols, cols)),
            vals: Some(cat_f(&self.vals, vals)),
            row_end,
        }
    }

    /// Overwrites the outliers of quantized tokens `a..e` in `x`, `[b, h, e − a, d]`.
    fn apply(&self, x: Tensor<4>, a: usize, e: usize) -> Tensor<4> {
        let start = if a == 0 {
            0
        } else {
            self.row_end[a - 1] as usize
        };
        let end = self.row_end[e - 1] as usize;
        let (Some(cols), Some(vals)) = (&self.cols, &self.vals) else {
            return x;
        };
        if end == start {
            return x;
        }
        let [b, h, len, d] = x.dims();
        let device = x.device();
        // The token of every outlier in the range, local to `a`, from the row ends.
        let mut rows = Vec::with_capacity(end - start);
        for t in a..e {
            let lo = if t == 0 {
                0
            } else {
                self.row_end[t - 1] as usize
            };
            rows.extend(std::iter::repeat_n(
                (t - a) as i32,
                self.row_end[t] as usize - lo,
            ));
        }
        let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [end - start]), &device)
            .cast(IntDType::I32);
        let cols = cols
            .clone()
            .narrow(0, start, end - start)
            .cast(IntDType::I32);
        // Flat index in [b, h, len, d]: ((col / d) · len + row) · d + col % d.
        let stream = cols.clone().div_scalar(d as i32);
        let chan = cols.remainder_scalar(d as i32);
        let idx = (stream.mul_scalar(len as i32) + rows).mul_scalar(d as i32) + chan;
        let vals = vals
            .clone()
            .narrow(0, start, end - start)
            .cast(FloatDType::F32);
        let n = b * h * len * d;
        let zeros = Tensor::<1>::zeros([n], &device);
        let mask = zeros
            .clone()
            .scatter(
                0,
                idx.clone(),
                Tensor::<1>::ones([end - start], &device),
                IndexingUpdateOp::Add,
            )
            .greater_elem(0.5);
        let dense = zeros.scatter(0, idx, vals, IndexingUpdateOp::Add);
        x.reshape([n])
            .mask_where(mask, dense)
            .reshape([b, h, len, d])
    }
}

/// A KVQuant cache for one layer: see the module docs.
#[derive(Debug, Clone)]
pub struct KvQuantCache {
    config: KvQuantConfig,
    device: Device,
    rope: Rope,
    bits: BitWidth,
    /// Per-channel key offsets and half-ranges, `[1, h, 1, d]` fp16.
    key_offset: Tensor<4>,
    key_range: Tensor<4>,
    /// Codebooks, `[2^b]` fp32.
    key_lut: Tensor<1>,
    value_lut: Tensor<1>,
    /// The first `sinks` tokens, fp16 (keys pre-RoPE).
    sink: Option<(Tensor<4>, Tensor<4>)>,
    /// Packed key and value codes, `[b, h, T, ⌈d/c⌉]` `U32`.
    keys: Option<Tensor<4, Int>>,
    values: Option<Tensor<4, Int>>,
    /// Per-token value offsets and half-ranges, `[b, 1, T, 1]` fp16 each.
    value_stats: Option<(Tensor<4>, Tensor<4>)>,
    key_sparse: Sparse,
    value_sparse: Sparse,
    len: usize,
    positions: Vec<Vec<u32>>,
    logical: Vec<usize>,
}

/// Tokens per chunk of the streamed attention.
pub const KVQUANT_ATTEND_CHUNK_TOKENS: usize = 512;

fn slice_tokens(t: &Tensor<4>, r: core::ops::Range<usize>) -> Tensor<4> {
    let [b, h, _, d] = t.dims();
    t.clone().slice([0..b, 0..h, r, 0..d])
}

fn slice_codes(t: &Tensor<4, Int>, r: core::ops::Range<usize>) -> Tensor<4, Int> {
    let [b, h, _, w] = t.dims();
    t.clone().slice([0..b, 0..h, r, 0..w])
}

fn bytes<const D: usize, K: burn::tensor::kind::Basic>(t: &Tensor<D, K>) -> usize {
    t.shape().num_elements() * t.dtype().size()
}

/// Codes of normalised `x̃` against a sorted codebook: the number of midpoints below `x̃`
/// (ties go to the lower entry), `[b, h, n, d]` `I32`.
fn nearest_codes(x: Tensor<4>, lut: &[f32]) -> Tensor<4, Int> {
    let [b, h, n, d] = x.dims();
    let mids: Vec<f32> = lut.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let m = mids.len();
    let mids =
        Tensor::<1>::from_data(TensorData::new(mids, [m]), &x.device()).reshape([1, 1, 1, 1, m]);
    x.reshape([b, h, n, d, 1])
        .greater(mids.expand([b, h, n, d, m]))
        .int()
        .sum_dim(4)
        .reshape([b, h, n, d])
}

/// `1 / r` with 0 where `r == 0`.
fn safe_recip(r: Tensor<4>) -> Tensor<4> {
    let zero = r.clone().equal_elem(0.0);
    r.mask_fill(zero.clone(), 1.0).recip().mask_fill(zero, 0.0)
}

/// Quantized block: codes, optional value statistics and the outliers found.
struct Encoded {
    codes: Tensor<4, Int>,
    stats: Option<(Tensor<4>, Tensor<4>)>,
    outliers: Vec<(usize, u32, f32)>,
}

impl KvQuantCache {
    /// The configuration.
    pub fn config(&self) -> &KvQuantConfig {
        &self.config
    }
    /// Tokens held per sequence (padding included).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Sink tokens held in fp16, per sequence.
    pub fn sink_tokens(&self) -> usize {
        self.sink.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }
    /// Tokens held quantized, per sequence.
    pub fn quantized_tokens(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dims()[2])
    }
    /// Outliers kept exactly (keys, values).
    pub fn outliers(&self) -> (usize, usize) {
        (self.key_sparse.nnz(), self.value_sparse.nnz())
    }

    fn include_sparse(&self) -> bool {
        self.config.calibration.sparsity_threshold < 1.0
    }

    /// Outliers `(token, col, value)` of a block `[b, h, n, d]` under `mask`, in token order.
    fn find_outliers(x: &Tensor<4>, mask: Tensor<4, Bool>) -> Vec<(usize, u32, f32)> {
        let [b, h, n, d] = x.dims();
        let m: Vec<bool> = host(&mask.float()).iter().map(|&v| v > 0.5).collect();
        if !m.iter().any(|&v| v) {
            return Vec::new();
        }
        let xs = host(x);
        let mut out = Vec::new();
        for t in 0..n {
            for s in 0..b * h {
                for c in 0..d {
                    let i = (s * n + t) * d + c;
                    if m[i] {
                        out.push((t, (s * d + c) as u32, xs[i]));
                    }
                }
            }
        }
        out
    }

    /// Quantizes pre-RoPE keys `[b, h, n, d]` (fp32) with the calibrated thresholds.
    fn encode_keys(&self, x: &Tensor<4>) -> Encoded {
        let off = self.key_offset.clone().cast(FloatDType::F32);
        let rng = self.key_range.clone().cast(FloatDType::F32);
        let xn = (x.clone() - off) * safe_recip(rng);
        let outliers = if self.include_sparse() {
            Self::find_outliers(x, xn.clone().abs().greater_elem(1.0))
        } else {
            Vec::new()
        };
        Encoded {
            codes: self.pack(nearest_codes(xn, &self.config.calibration.key_lut)),
            stats: None,
            outliers,
        }
    }

    /// Quantizes values `[b, h, n, d]` (fp32) with per-token dynamic statistics.
    fn encode_values(&self, x: &Tensor<4>) -> Encoded {
        let [b, h, n, d] = x.dims();
        let hd = h * d;
        // Per token over all heads: [b, n, h·d].
        let rows = x.clone().swap_dims(1, 2).reshape([b, n, hd]);
        let sorted = rows.clone().sort(2);
        let pick = |i: usize| sorted.clone().slice([0..b, 0..n, i..i + 1]);
        let quantile = |q: f64| {
            let pos = q * (hd - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(hd - 1);
            let frac = (pos - lo as f64) as f32;
            pick(lo) + (pick(hi) - pick(lo)).mul_scalar(frac)
        };
        let (tmp, mask) = if self.include_sparse() {
            let tq = upper_quantile(self.config.calibration.sparsity_threshold);
            let (upper, lower) = (quantile(tq), quantile(1.0 - tq));
            let median = pick((hd - 1) / 2);
            let mask = rows
                .clone()
                .greater_equal(upper.expand([b, n, hd]))
                .bool_or(rows.clone().lower_equal(lower.expand([b, n, hd])));
            (
                rows.clone()
                    .mask_where(mask.clone(), median.expand([b, n, hd])),
                Some(mask),
            )
        } else {
            (rows.clone(), None)
        };
        let mx = tmp.clone().max_dim(2);
        let mn = tmp.min_dim(2);
        let to_stat = |s: Tensor<3>| s.reshape([b, 1, n, 1]).cast(FloatDType::F16);
        let off = to_stat((mx.clone() + mn.clone()).div_scalar(2.0));
        let rng = to_stat((mx - mn).div_scalar(2.0));
        let xn = (x.clone() - off.clone().cast(FloatDType::F32))
            * safe_recip(rng.clone().cast(FloatDType::F32));
        let outliers = match mask {
            Some(m) => Self::find_outliers(x, m.reshape([b, n, h, d]).swap_dims(1, 2)),
            None => Vec::new(),
        };
        Encoded {
            codes: self.pack(nearest_codes(xn, &self.config.calibration.value_lut)),
            stats: Some((off, rng)),
            outliers,
        }
    }

    fn pack(&self, codes: Tensor<4, Int>) -> Tensor<4, Int> {
        let [b, h, n, d] = codes.dims();
        pack_words(codes.reshape([b * h * n, d]), self.bits).reshape([
            b,
            h,
            n,
            self.bits.words_for(d),
        ])
    }

    fn lut_values(
        &self,
        codes: &Tensor<4, Int>,
        lut: &Tensor<1>,
        r: core::ops::Range<usize>,
    ) -> Tensor<4> {
        let s = self.config.shape;
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let len = r.end - r.start;
        let words = slice_codes(codes, r).reshape([b * h * len, self.bits.words_for(d)]);
        let idx = unpack_words(words, self.bits, d).reshape([b * h * len * d]);
        lut.clone().select(0, idx).reshape([b, h, len, d])
    }

    /// Keys (pre-RoPE) and values of quantized tokens `a..e` (local to the quantized store).
    fn dequantize(&self, a: usize, e: usize) -> (Tensor<4>, Tensor<4>) {
        let (Some(kc), Some(vc), Some((voff, vrng))) =
            (&self.keys, &self.values, &self.value_stats)
        else {
            unreachable!("dequantize is only called over held quantized tokens");
        };
        let k = self.lut_values(kc, &self.key_lut, a..e)
            * self.key_range.clone().cast(FloatDType::F32)
            + self.key_offset.clone().cast(FloatDType::F32);
        let stat = |s: &Tensor<4>| {
            let [b, _, _, _] = s.dims();
            s.clone()
                .slice([0..b, 0..1, a..e, 0..1])
                .cast(FloatDType::F32)
        };
        let v = self.lut_values(vc, &self.value_lut, a..e) * stat(vrng) + stat(voff);
        (
            self.key_sparse.apply(k, a, e),
            self.value_sparse.apply(v, a, e),
        )
    }

    /// Keys (post-RoPE, as attention sees them) and values of held tokens `a..e`, fp32.
    fn tokens_fp32(&self, a: usize, e: usize) -> (Tensor<4>, Tensor<4>) {
        let sh = self.sink_tokens();
        let (mut ks, mut vs) = (Vec::with_capacity(2), Vec::with_capacity(2));
        if let Some((sk, sv)) = &self.sink
            && a < sh
        {
            ks.push(slice_tokens(sk, a..e.min(sh)).cast(FloatDType::F32));
            vs.push(slice_tokens(sv, a..e.min(sh)).cast(FloatDType::F32));
        }
        if e > sh {
            let (k, v) = self.dequantize(a.max(sh) - sh, e - sh);
            ks.push(k);
            vs.push(v);
        }
        let k = Tensor::cat(ks, 2);
        let pos: Vec<u32> = self
            .positions
            .iter()
            .flat_map(|p| p[a..e].iter().copied())
            .collect();
        (self.rope.apply(k, &pos), Tensor::cat(vs, 2))
    }
}

impl KvCache for KvQuantCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn key_rope(&self) -> KeyRope {
        KeyRope::PreRope
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        const OP: &str = "KvQuantCache::append";
        let shape = self.config.shape;
        check_block(&shape, &block, OP)?;
        let last: Vec<Option<u32>> = self
            .positions
            .iter()
            .map(|p| p.iter().rev().copied().find(|&x| x != PAD))
            .collect();
        let counts = check_positions(block.positions(), shape.batch(), &last, OP)?;
        let max = Tensor::cat(
            vec![
                block.keys().clone().abs().max(),
                block.values().clone().abs().max(),
            ],
            0,
        )
        .max()
        .into_scalar::<f32>();
        if max > F16_MAX_ABS_INPUT {
            return Err(KvError::InvalidConfig {
                field: "data",
                reason: format!(
                    "{OP}: largest magnitude {max} exceeds {F16_MAX_ABS_INPUT}, the limit of the \
                     fp16 outliers, sinks and statistics"
                ),
            });
        }
        let n = block.seq_len();
        let (k, v, pos) = block.into_parts();
        let (k, v) = (k.cast(FloatDType::F32), v.cast(FloatDType::F32));

        // Everything happens on locals; the cache changes at the end.
        let take = self
            .config
            .calibration
            .sinks
            .saturating_sub(self.sink_tokens())
            .min(n);
        let mut sink = self.sink.clone();
        if take > 0 {
            let (sk, sv) = (
                slice_tokens(&k, 0..take).cast(FloatDType::F16),
                slice_tokens(&v, 0..take).cast(FloatDType::F16),
            );
            sink = Some(match sink {
                Some((ok, ov)) => (Tensor::cat(vec![ok, sk], 2), Tensor::cat(vec![ov, sv], 2)),
                None => (sk, sv),
            });
        }
        let mut next = (
            self.keys.clone(),
            self.values.clone(),
            self.value_stats.clone(),
            self.key_sparse.clone(),
            self.value_sparse.clone(),
        );
        if take < n {
            let (kq, vq) = (slice_tokens(&k, take..n), slice_tokens(&v, take..n));
            let m = n - take;
            let ek = self.encode_keys(&kq);
            let ev = self.encode_values(&vq);
            let cat_codes = |a: Option<Tensor<4, Int>>, b: Tensor<4, Int>| match a {
                Some(a) => Tensor::cat(vec![a, b], 2),
                None => b,
            };
            next.0 = Some(cat_codes(next.0, ek.codes));
            next.1 = Some(cat_codes(next.1, ev.codes));
            if let Some((off, rng)) = ev.stats {
                next.2 = Some(match next.2 {
                    Some((o, r)) => (Tensor::cat(vec![o, off], 2), Tensor::cat(vec![r, rng], 2)),
                    None => (off, rng),
                });
            }
            next.3 = next.3.extended(m, &ek.outliers, &self.device);
            next.4 = next.4.extended(m, &ev.outliers, &self.device);
        }

        self.sink = sink;
        (
            self.keys,
            self.values,
            self.value_stats,
            self.key_sparse,
            self.value_sparse,
        ) = next;
        for b in 0..shape.batch() {
            self.positions[b].extend_from_slice(&pos[b * n..(b + 1) * n]);
            self.logical[b] += counts[b];
        }
        self.len += n;
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        const OP: &str = "KvQuantCache::attend";
        check_query(&self.config.shape, query, OP)?;
        if self.len == 0 {
            return Ok(Attended {
                output: query.tensor().zeros_like(),
                stats: Default::default(),
            });
        }
        if !stats.any() {
            let (output, _) = attend_streamed(
                query,
                self.config.shape.kv_heads(),
                self.len,
                &self.positions,
                |start| start + KVQUANT_ATTEND_CHUNK_TOKENS,
                |range| self.tokens_fp32(range.start, range.end),
            );
            return Ok(Attended {
                output,
                stats: Default::default(),
            });
        }
        let (k, v) = self.tokens_fp32(0, self.len);
        let kp = self.positions.concat();
        let (output, stats) = reference_attention(
            query.tensor().clone(),
            k,
            v,
            query.positions(),
            KeyPositions::PerSequence(&kp),
            None,
            stats,
        );
        Ok(Attended { output, stats })
    }

    fn view(&self) -> KvView {
        let s = self.config.shape;
        let (keys, values) = if self.len == 0 {
            let z = Tensor::zeros([s.batch(), s.kv_heads(), 0, s.head_dim()], &self.device);
            (z.clone(), z)
        } else {
            self.tokens_fp32(0, self.len)
        };
        KvView {
            keys,
            values,
            positions: positions_per_head(&self.positions, s.kv_heads()),
        }
    }

    fn lengths(&self) -> Lengths {
        Lengths {
            held: vec![self.len; self.config.shape.streams()],
            logical: self.logical.clone(),
        }
    }

    fn memory(&self) -> MemoryReport {
        let s = self.config.shape;
        let (sk, sv) = self
            .sink
            .as_ref()
            .map_or((0, 0), |(k, v)| (bytes(k), bytes(v)));
        let (kso, kmeta) = self.key_sparse.bytes();
        let (vso, vmeta) = self.value_sparse.bytes();
        let logical_tokens: usize = self.logical.iter().sum();
        MemoryReport {
            key_bytes: sk
                + self.keys.as_ref().map_or(0, bytes)
                + kso
                + bytes(&self.key_lut)
                + bytes(&self.key_offset)
                + bytes(&self.key_range),
            value_bytes: sv
                + self.values.as_ref().map_or(0, bytes)
                + self
                    .value_stats
                    .as_ref()
                    .map_or(0, |(o, r)| bytes(o) + bytes(r))
                + vso
                + bytes(&self.value_lut),
            metadata_bytes: s.batch() * self.len * core::mem::size_of::<u32>() + kmeta + vmeta,
            logical_elements: 2 * logical_tokens * s.kv_heads() * s.head_dim(),
            logical_tokens,
            held_token_slots: s.streams() * self.len,
        }
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let (k, v) = (StorageRole::Keys, StorageRole::Values);
        let mut out = vec![
            HeldBuffer::tensor(k, &self.key_lut),
            HeldBuffer::tensor(k, &self.key_offset),
            HeldBuffer::tensor(k, &self.key_range),
            HeldBuffer::tensor(v, &self.value_lut),
        ];
        if let Some((sk, sv)) = &self.sink {
            out.push(HeldBuffer::tensor(k, sk));
            out.push(HeldBuffer::tensor(v, sv));
        }
        if let Some(c) = &self.keys {
            out.push(HeldBuffer::tensor(k, c));
        }
        if let Some(c) = &self.values {
            out.push(HeldBuffer::tensor(v, c));
        }
        if let Some((o, r)) = &self.value_stats {
            out.push(HeldBuffer::tensor(v, o));
            out.push(HeldBuffer::tensor(v, r));
        }
        out.extend(self.key_sparse.held_buffers(k));
        out.extend(self.value_sparse.held_buffers(v));
        for p in &self.positions {
            out.push(HeldBuffer::host(StorageRole::Metadata, p));
        }
        out
    }

    fn reset(&mut self) {
        self.sink = None;
        self.keys = None;
        self.values = None;
        self.value_stats = None;
        self.key_sparse = Sparse::default();
        self.value_sparse = Sparse::default();
        self.len = 0;
        for p in &mut self.positions {
            *p = Vec::new();
        }
        self.logical.iter_mut().for_each(|l| *l = 0);
    }
}
