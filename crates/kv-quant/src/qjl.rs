//! QJL (Zandieh, Daliri and Han, 2024, arXiv 2406.03482): keys stored as the sign bits of a
//! Johnson–Lindenstrauss sketch plus their norms; attention scores estimated from the bits
//! without reconstructing keys. Values are quantized per token as in KIVI.
//!
//! # Keys (as in amirzandieh/QJL `models/llama2_utils_qjl.py`, `qjl_kernel/csrc/*.cu`)
//! A projection `S ∈ R^{m×d}` is drawn once from a seed: Gaussian rows, by default
//! orthogonalised in blocks of `d` rows and scaled by `√d` (the reference's `rot=True`, see
//! [`QjlSketch::new`]). Keys are sketched in groups of `G` tokens: the `o` channels with the
//! largest norm over the group's tokens are that group's *outlier channels*. A key `k` splits
//! into `k_in` (outlier channels zeroed) and `k_out` (only the outlier channels) and is stored
//! as
//!
//! - `sign(S k_in)`: `m` bits, packed 32 per `U32` word;
//! - `sign(S_o k_out)`: `m_o` bits, `S_o` the first `m_o` rows of `S`;
//! - `‖k_in‖` and `‖k_out‖` in fp16;
//! - per group, the `o` outlier channel indices as `u8`.
//!
//! # Scores
//! For a query `q` (sketched in full precision, the asymmetric estimator),
//!
//! `q·k ≈ √(π/2)/m · ‖k_in‖ · ⟨S q_in, sign(S k_in)⟩ + √(π/2)/m_o · ‖k_out‖ · ⟨S_o q_out, sign(S_o k_out)⟩`
//!
//! where `q_in`, `q_out` are `q` restricted to the group's inlier and outlier channels. With
//! Gaussian rows each term is an unbiased estimate of `q_in·k_in` and `q_out·k_out`
//! (`E[⟨s,q⟩ sign⟨s,k⟩] = √(2/π) q·k/‖k‖` for `s ~ N(0, I)`). With orthogonalised rows
//! (`s = √d u`, `u` uniform on the sphere) the expectation is `κ_d q·k` with
//! `κ_d = √(π/2) √d Γ(d/2) / (√π Γ((d+1)/2)) = 1 + 1/(4d) + O(d⁻²)` ([`orthogonal_bias`]):
//! a relative bias of 0.2 % at `d = 128`, which the reference accepts for the lower variance.
//!
//! The estimator is linear in `q`: `estimate = q · k̂` with
//! `k̂ = √(π/2)/m ‖k_in‖ · mask_in ⊙ Sᵀ sign(S k_in) + √(π/2)/m_o ‖k_out‖ · mask_out ⊙ S_oᵀ sign(S_o k_out)`.
//! [`QjlKeys::dequantize`] returns `k̂` (the dequantize path), so that attention over
//! `view()` is exactly the attention QJL computes — the test oracle — while
//! [`QjlKeys::scores`] computes the same numbers from the bits without forming `k̂`.
//!
//! # Attention
//! Decode-sized queries on the CPU backends are scored on the host straight from the packed
//! sign bits and norms (`S q` once per stream, the outlier channels' share of it per group,
//! then one `±1` multiply-add per bit and query row in AVX2 registers) with the values summed
//! on their codes by KIVI's fused kernels; other queries and devices stream chunks through
//! tensor ops ([`QjlKeys::scores`] and dequantized values). Both equal attention over `view()`
//! up to fp32 summation order.

use burn::prelude::*;
use burn::tensor::{FloatDType, IndexingUpdateOp, IntDType};
use kv_core::positions_per_head;
use kv_core::{
    Attended, HeldBuffer, KeyPositions, KvBlock, KvCache, KvError, KvShape, KvView, Lengths,
    MemoryReport, PAD, Query, StatsRequest, StorageDtype, StorageRole, check_block,
    check_positions, check_query, reference_attention,
};
use serde::{Deserialize, Serialize};

use crate::attend::{attend_streamed_scores, empty_lse, overlay_tokens};
use crate::group::{F16_MAX_ABS_INPUT, GroupAxis, QuantSpec, QuantizedTensor};
use crate::host::{
    HostCodes, HostDense, HostSigns, Source, attend_host, ordered, overlay, use_host,
};
use crate::packing::{BitWidth, pack_words, unpack_words};
use crate::params as parse;
use crate::rng::SplitMix64;
use crate::{QuantError, Result};

/// `√(π/2)`, the constant of the sign estimator.
pub(crate) const SQRT_HALF_PI: f32 = 1.253_314_1;

/// The largest key norm fp16 norms can hold.
const F16_MAX: f32 = 65504.0;

/// `κ_d`, the factor by which orthogonalised sketch rows scale the expectation of the
/// estimator for head dimension `d` (1 for Gaussian rows): `√(π/2) √d Γ(d/2) / (√π Γ((d+1)/2))`.
pub fn orthogonal_bias(d: usize) -> f64 {
    // Γ(d/2) / Γ((d+1)/2) by the recurrence Γ(x+1) = x Γ(x), from d = 1 or d = 2.
    let mut ratio = if d % 2 == 1 {
        // Γ(1/2) / Γ(1) = √π.
        core::f64::consts::PI.sqrt()
    } else {
        // Γ(1) / Γ(3/2) = 2 / √π.
        2.0 / core::f64::consts::PI.sqrt()
    };
    let mut k = if d % 2 == 1 { 1 } else { 2 };
    while k < d {
        // From k to k + 2: Γ(k/2 + 1) / Γ((k+1)/2 + 1) = ratio · (k/2) / ((k+1)/2).
        ratio *= k as f64 / (k + 1) as f64;
        k += 2;
    }
    (core::f64::consts::FRAC_PI_2).sqrt() * (d as f64).sqrt() * ratio / core::f64::consts::PI.sqrt()
}

/// The random projection of a QJL cache: `S`, `[m, d]` fp32, drawn from a seed.
#[derive(Debug, Clone)]
pub struct QjlSketch {
    head_dim: usize,
    sketch_dim: usize,
    outlier_sketch_dim: usize,
    proj: Tensor<2>,
}

impl QjlSketch {
    /// Draws `S ∈ R^{m×d}` with `m = sketch_dim` from `seed` (SplitMix64 and Box–Muller on the
    /// host, so the same seed gives the same `S` on every backend). With `orthogonal`, rows come
    /// in blocks of `d` (the last block may be shorter) that are orthonormalised by modified
    /// Gram–Schmidt and scaled by `√d`, as the reference's QR of `d`-column chunks; otherwise
    /// the rows stay i.i.d. `N(0, 1)`. Outliers are sketched with the first
    /// `outlier_sketch_dim` rows.
    ///
    /// # Errors
    /// [`QuantError::InvalidConfig`] for a zero `head_dim` or `sketch_dim`, or
    /// `outlier_sketch_dim > sketch_dim`.
    pub fn new(
        head_dim: usize,
        sketch_dim: usize,
        outlier_sketch_dim: usize,
        seed: u64,
        orthogonal: bool,
        device: &Device,
    ) -> Result<Self> {
        if head_dim == 0 || sketch_dim == 0 {
            return Err(QuantError::InvalidConfig {
                field: "sketch_dim",
                reason: format!(
                    "head_dim {head_dim} and sketch_dim {sketch_dim} must both be at least 1"
                ),
            });
        }
        if outlier_sketch_dim > sketch_dim {
            return Err(QuantError::InvalidConfig {
                field: "outlier_sketch_dim",
                reason: format!(
                    "{outlier_sketch_dim} exceeds sketch_dim {sketch_dim} (outliers are \
                     sketched with the first rows of S)"
                ),
            });
        }
        let d = head_dim;
        let mut rng = SplitMix64::new(seed);
        let mut rows: Vec<Vec<f64>> = (0..sketch_dim)
            .map(|_| (0..d).map(|_| rng.normal()).collect())
            .collect();
        if orthogonal {
            for block in rows.chunks_mut(d) {
                orthonormalise(block);
                for r in block.iter_mut() {
                    r.iter_mut().for_each(|x| *x *= (d as f64).sqrt());
                }
            }
        }
        let flat: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
        let proj = Tensor::<2>::from_data(TensorData::new(flat, [sketch_dim, d]), device);
        Ok(QjlSketch {
            head_dim,
            sketch_dim,
            outlier_sketch_dim,
            proj,
        })
    }

    /// `S`, `[sketch_dim, head_dim]` fp32.
    pub fn projection(&self) -> &Tensor<2> {
        &self.proj
    }
    /// `m`, the sketch dimension (bits per inlier key).
    pub fn sketch_dim(&self) -> usize {
        self.sketch_dim
    }
    /// `m_o`, the outlier sketch dimension.
    pub fn outlier_sketch_dim(&self) -> usize {
        self.outlier_sketch_dim
    }
    /// The head dimension `d`.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// `S_o`, the first `m_o` rows of `S`.
    fn outlier_proj(&self) -> Tensor<2> {
        self.proj
            .clone()
            .slice([0..self.outlier_sketch_dim, 0..self.head_dim])
    }

    /// `x Mᵀ` for `x` of any rank `D`, `M` `[rows, d]`: `[.., d] -> [.., rows]`.
    fn project<const D: usize>(x: Tensor<D>, m: &Tensor<2>) -> Tensor<D> {
        let dims = x.dims();
        let d = dims[D - 1];
        let lead: usize = dims[..D - 1].iter().product();
        let rows = m.dims()[0];
        let mut out = dims;
        out[D - 1] = rows;
        x.reshape([lead, d])
            .matmul(m.clone().transpose())
            .reshape(out)
    }

    /// Sketches keys `[batch, heads, tokens, d]` (finite; `tokens` a multiple of `group`) with
    /// `outliers` outlier channels per group of `group` tokens.
    ///
    /// # Errors
    /// [`QuantError::Empty`]; [`QuantError::GroupDoesNotDivide`] if `group` does not divide
    /// the tokens; [`QuantError::InvalidConfig`] for a wrong `d`, `outliers > d`, outliers with
    /// `d > 256` (indices are `u8`) or outliers with `outlier_sketch_dim == 0`.
    pub fn quantize(&self, keys: Tensor<4>, outliers: usize, group: usize) -> Result<QjlKeys> {
        let [b, h, t, d] = keys.dims();
        if b * h * t * d == 0 {
            return Err(QuantError::Empty { what: "keys" });
        }
        if d != self.head_dim {
            return Err(QuantError::InvalidConfig {
                field: "head_dim",
                reason: format!("keys have {d} channels, the sketch {}", self.head_dim),
            });
        }
        check_outliers(d, outliers, self.outlier_sketch_dim)?;
        if group == 0 || !t.is_multiple_of(group) {
            return Err(QuantError::GroupDoesNotDivide {
                group,
                axis: "tokens (QJL outlier groups)",
                len: t,
            });
        }
        let x = keys.cast(FloatDType::F32);
        let pack = |s: Tensor<4>| -> Tensor<4, Int> {
            let m = s.dims()[3];
            let bits = s.greater_elem(0.0).int().reshape([b * h * t, m]);
            pack_words(bits, BitWidth::ONE).reshape([b, h, t, BitWidth::ONE.words_for(m)])
        };
        let norm = |x: Tensor<4>| x.square().sum_dim(3).sqrt().cast(FloatDType::F16);
        if outliers == 0 {
            return Ok(QjlKeys {
                dims: [b, h, t, d],
                group,
                outliers: 0,
                signs: pack(Self::project(x.clone(), &self.proj)),
                inlier_norms: norm(x),
                outlier: None,
            });
        }
        let n_g = t / group;
        let grouped = x.clone().reshape([b, h, n_g, group, d]);
        let channel_norms = grouped.square().sum_dim(3).reshape([b, h, n_g, d]);
        let (_, idx) = channel_norms.topk_with_indices(outliers, 3);
        let mask = outlier_mask(idx.clone(), [b, h, n_g, d]);
        let mask_t = expand_groups(mask, group);
        let k_out = x.clone() * mask_t.clone();
        let k_in = x - k_out.clone();
        Ok(QjlKeys {
            dims: [b, h, t, d],
            group,
            outliers,
            signs: pack(Self::project(k_in.clone(), &self.proj)),
            inlier_norms: norm(k_in),
            outlier: Some(OutlierSketch {
                signs: pack(Self::project(k_out.clone(), &self.outlier_proj())),
                norms: norm(k_out),
                indices: idx.cast(IntDType::U8),
            }),
        })
    }
}

/// Orthonormalises `rows` in place (modified Gram–Schmidt in f64); a row that is numerically
/// dependent on the previous ones (probability zero for Gaussian rows) is left at zero.
fn orthonormalise(rows: &mut [Vec<f64>]) {
    for i in 0..rows.len() {
        let (done, rest) = rows.split_at_mut(i);
        let r = &mut rest[0];
        for p in done.iter() {
            let dot: f64 = p.iter().zip(r.iter()).map(|(a, b)| a * b).sum();
            r.iter_mut().zip(p).for_each(|(x, y)| *x -= dot * y);
        }
        let n = r.iter().map(|x| x * x).sum::<f64>().sqrt();
        if n > 1e-12 {
            r.iter_mut().for_each(|x| *x /= n);
        } else {
            r.iter_mut().for_each(|x| *x = 0.0);
        }
    }
}

fn check_outliers(d: usize, outliers: usize, outlier_sketch_dim: usize) -> Result<()> {
    if outliers > d {
        return Err(QuantError::InvalidConfig {
            field: "outliers",
            reason: format!("{outliers} outlier channels exceed head_dim {d}"),
        });
    }
    if outliers > 0 && d > 256 {
        return Err(QuantError::InvalidConfig {
            field: "outliers",
            reason: format!("outlier channel indices are u8: head_dim {d} must be at most 256"),
        });
    }
    if outliers > 0 && outlier_sketch_dim == 0 {
        return Err(QuantError::InvalidConfig {
            field: "outlier_sketch_dim",
            reason: "must be at least 1 when outlier channels are kept".into(),
        });
    }
    Ok(())
}

/// `[b, h, groups, d]` fp32 mask with 1 at the `[b, h, groups, o]` channel indices.
fn outlier_mask(idx: Tensor<4, Int>, dims: [usize; 4]) -> Tensor<4> {
    let device = idx.device();
    let idx = idx.cast(IntDType::I32);
    let ones = Tensor::<4>::ones(idx.dims(), &device);
    Tensor::<4>::zeros(dims, &device).scatter(3, idx, ones, IndexingUpdateOp::Add)
}

/// A per-group `[b, h, groups, d]` tensor repeated over the `group` tokens of every group:
/// `[b, h, groups * group, d]`.
fn expand_groups(x: Tensor<4>, group: usize) -> Tensor<4> {
    let [b, h, n_g, d] = x.dims();
    x.reshape([b, h, n_g, 1, d])
        .expand([b, h, n_g, group, d])
        .reshape([b, h, n_g * group, d])
}

/// The outlier part of sketched keys.
#[derive(Debug, Clone)]
struct OutlierSketch {
    /// `sign(S_o k_out)`, `[b, h, t, ⌈m_o/32⌉]` `U32`.
    signs: Tensor<4, Int>,
    /// `‖k_out‖`, `[b, h, t, 1]` fp16.
    norms: Tensor<4>,
    /// Outlier channels per group, `[b, h, t / G, o]` `U8`.
    indices: Tensor<4, Int>,
}

/// Keys sketched by a [`QjlSketch`]: sign bits, norms and outlier channels (see the module
/// docs). Tokens concatenate and slice on group boundaries.
#[derive(Debug, Clone)]
pub struct QjlKeys {
    dims: [usize; 4],
    group: usize,
    outliers: usize,
    /// `sign(S k_in)`, `[b, h, t, ⌈m/32⌉]` `U32`.
    signs: Tensor<4, Int>,
    /// `‖k_in‖`, `[b, h, t, 1]` fp16.
    inlier_norms: Tensor<4>,
    outlier: Option<OutlierSketch>,
}

/// Sign bits `[b, h, t, words]` back to `±1` fp32, `[b, h, t, m]`.
fn signs_pm1(words: &Tensor<4, Int>, m: usize) -> Tensor<4> {
    let [b, h, t, w] = words.dims();
    let bits = unpack_words(words.clone().reshape([b * h * t, w]), BitWidth::ONE, m);
    bits.float()
        .cast(FloatDType::F32)
        .mul_scalar(2.0)
        .sub_scalar(1.0)
        .reshape([b, h, t, m])
}

impl QjlKeys {
    /// `[batch, heads, tokens, head_dim]` of the keys this stands for.
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }
    /// Tokens held.
    pub fn tokens(&self) -> usize {
        self.dims[2]
    }
    /// Tokens per outlier group.
    pub fn group(&self) -> usize {
        self.group
    }
    /// Outlier channels per group.
    pub fn outliers(&self) -> usize {
        self.outliers
    }
    /// Packed `sign(S k_in)`, `[b, h, t, ⌈m/32⌉]` `U32`.
    pub fn signs(&self) -> &Tensor<4, Int> {
        &self.signs
    }
    /// `‖k_in‖` per token, `[b, h, t, 1]` fp16.
    pub fn inlier_norms(&self) -> &Tensor<4> {
        &self.inlier_norms
    }
    /// `‖k_out‖` per token, `[b, h, t, 1]` fp16 (none without outliers).
    pub fn outlier_norms(&self) -> Option<&Tensor<4>> {
        self.outlier.as_ref().map(|o| &o.norms)
    }
    /// The outlier channels of every group, `[b, h, t / G, o]` `U8` (none without outliers).
    pub fn outlier_indices(&self) -> Option<&Tensor<4, Int>> {
        self.outlier.as_ref().map(|o| &o.indices)
    }
    /// Packed `sign(S_o k_out)`, `[b, h, t, ⌈m_o/32⌉]` `U32` (none without outliers).
    pub(crate) fn outlier_signs(&self) -> Option<&Tensor<4, Int>> {
        self.outlier.as_ref().map(|o| &o.signs)
    }

    /// The held buffers, all attributed to `role`.
    pub fn held_buffers(&self, role: StorageRole) -> Vec<HeldBuffer> {
        let mut out = vec![
            HeldBuffer::tensor(role, &self.signs),
            HeldBuffer::tensor(role, &self.inlier_norms),
        ];
        if let Some(o) = &self.outlier {
            out.push(HeldBuffer::tensor(role, &o.signs));
            out.push(HeldBuffer::tensor(role, &o.norms));
            out.push(HeldBuffer::tensor(role, &o.indices));
        }
        out
    }

    /// Bytes physically held, measured from the tensors.
    pub fn stored_bytes(&self) -> usize {
        self.held_buffers(StorageRole::Keys)
            .iter()
            .map(|b| b.bytes)
            .sum()
    }

    /// The per-token inlier/outlier channel masks, `[b, h, t, d]` fp32 (inlier, outlier).
    fn masks(&self) -> Option<(Tensor<4>, Tensor<4>)> {
        let [b, h, t, d] = self.dims;
        self.outlier.as_ref().map(|o| {
            let out = outlier_mask(o.indices.clone(), [b, h, t / self.group, d]);
            let out = expand_groups(out, self.group);
            (out.clone().neg().add_scalar(1.0), out)
        })
    }

    /// `k̂`, the keys as the estimator sees them (`q · k̂` equals [`scores`](Self::scores)):
    /// `[b, h, t, d]` fp32. Not the keys: the dequantize path that serves as the test oracle
    /// and as `view()`.
    ///
    /// # Panics
    /// If `sketch` has a different head dimension or sketch dimensions than the keys were
    /// sketched with (a programmer error).
    pub fn dequantize(&self, sketch: &QjlSketch) -> Tensor<4> {
        self.check_sketch(sketch, "QjlKeys::dequantize");
        let m = sketch.sketch_dim;
        let back = |s: Tensor<4>, p: &Tensor<2>| -> Tensor<4> {
            let [b, h, t, mm] = s.dims();
            s.reshape([b * h * t, mm])
                .matmul(p.clone())
                .reshape([b, h, t, sketch.head_dim])
        };
        let norms = |n: &Tensor<4>| n.clone().cast(FloatDType::F32);
        let inl = back(signs_pm1(&self.signs, m), &sketch.proj)
            * norms(&self.inlier_norms).mul_scalar(SQRT_HALF_PI / m as f32);
        match (&self.outlier, self.masks()) {
            (Some(o), Some((mask_in, mask_out))) => {
                let mo = sketch.outlier_sketch_dim;
                let out = back(signs_pm1(&o.signs, mo), &sketch.outlier_proj())
                    * norms(&o.norms).mul_scalar(SQRT_HALF_PI / mo as f32);
                inl * mask_in + out * mask_out
            }
            _ => inl,
        }
    }

    /// Estimated `q · kᵀ` straight from the bits, for queries `[b, h, rows, d]` (already
    /// grouped per KV head): `[b, h, rows, t]`. The keys are never reconstructed: the query is
    /// sketched (`S q_in` and `S_o q_out` per outlier group) and dotted with the `±1` signs.
    ///
    /// # Panics
    /// If `sketch` does not match, or `q` has another batch, head count or head dimension (a
    /// programmer error).
    pub fn scores(&self, sketch: &QjlSketch, q: Tensor<4>) -> Tensor<4> {
        self.check_sketch(sketch, "QjlKeys::scores");
        let [b, h, t, d] = self.dims;
        let [qb, qh, rows, qd] = q.dims();
        assert!(
            (qb, qh, qd) == (b, h, d),
            "QjlKeys::scores: query {:?} against keys {:?}",
            q.dims(),
            self.dims
        );
        let m = sketch.sketch_dim;
        let c = SQRT_HALF_PI / m as f32;
        let signs = signs_pm1(&self.signs, m);
        let n_in = self.inlier_norms.clone().cast(FloatDType::F32);
        let Some(o) = &self.outlier else {
            let sq = QjlSketch::project(q, &sketch.proj);
            return sq.matmul(signs.swap_dims(2, 3)) * n_in.reshape([b, h, 1, t]).mul_scalar(c);
        };
        let g = self.group;
        let n_g = t / g;
        let mo = sketch.outlier_sketch_dim;
        let co = SQRT_HALF_PI / mo as f32;
        // Per group: q restricted to inlier and outlier channels, [b, h, n_g, rows, d].
        let mask_out = outlier_mask(o.indices.clone(), [b, h, n_g, d]).reshape([b, h, n_g, 1, d]);
        let qg = q.reshape([b, h, 1, rows, d]).expand([b, h, n_g, rows, d]);
        let q_out = qg.clone() * mask_out;
        let q_in = qg - q_out.clone();
        let by_group = |s: Tensor<4>, mm: usize| -> Tensor<5> {
            s.reshape([b, h, n_g, g, mm]).swap_dims(3, 4)
        };
        let norms = |n: Tensor<4>| n.reshape([b, h, n_g, 1, g]);
        let inl = QjlSketch::project(q_in, &sketch.proj).matmul(by_group(signs, m))
            * norms(n_in).mul_scalar(c);
        let out = QjlSketch::project(q_out, &sketch.outlier_proj())
            .matmul(by_group(signs_pm1(&o.signs, mo), mo))
            * norms(o.norms.clone().cast(FloatDType::F32)).mul_scalar(co);
        // [b, h, n_g, rows, g] -> [b, h, rows, n_g * g].
        (inl + out).swap_dims(2, 3).reshape([b, h, rows, t])
    }

    fn check_sketch(&self, sketch: &QjlSketch, op: &str) {
        let words = self.signs.dims()[3];
        assert!(
            sketch.head_dim == self.dims[3]
                && BitWidth::ONE.words_for(sketch.sketch_dim) == words
                && self.outlier.as_ref().is_none_or(|o| {
                    o.signs.dims()[3] == BitWidth::ONE.words_for(sketch.outlier_sketch_dim)
                }),
            "{op}: sketch [{}, {}] (outliers {}) does not match keys {:?} with {words} words",
            sketch.sketch_dim,
            sketch.head_dim,
            sketch.outlier_sketch_dim,
            self.dims
        );
    }

    /// The tokens `range` (both ends on group boundaries, or the end at the last token).
    fn slice_tokens_aligned(&self, range: core::ops::Range<usize>) -> QjlKeys {
        let [b, h, _, d] = self.dims;
        let g = self.group;
        let sl = |x: &Tensor<4>, r: core::ops::Range<usize>| {
            let w = x.dims()[3];
            x.clone().slice([0..b, 0..h, r, 0..w])
        };
        let sli = |x: &Tensor<4, Int>, r: core::ops::Range<usize>| {
            let w = x.dims()[3];
            x.clone().slice([0..b, 0..h, r, 0..w])
        };
        QjlKeys {
            dims: [b, h, range.end - range.start, d],
            group: g,
            outliers: self.outliers,
            signs: sli(&self.signs, range.clone()),
            inlier_norms: sl(&self.inlier_norms, range.clone()),
            outlier: self.outlier.as_ref().map(|o| OutlierSketch {
                signs: sli(&o.signs, range.clone()),
                norms: sl(&o.norms, range.clone()),
                indices: sli(&o.indices, range.start / g..range.end.div_ceil(g)),
            }),
        }
    }

    /// Appends `other` along tokens (same sketch, group and outlier count).
    fn concat(self, other: QjlKeys) -> QjlKeys {
        let cat = |a: Tensor<4>, b: Tensor<4>| Tensor::cat(vec![a, b], 2);
        let cati = |a: Tensor<4, Int>, b: Tensor<4, Int>| Tensor::cat(vec![a, b], 2);
        let [b, h, t, d] = self.dims;
        QjlKeys {
            dims: [b, h, t + other.dims[2], d],
            group: self.group,
            outliers: self.outliers,
            signs: cati(self.signs, other.signs),
            inlier_norms: cat(self.inlier_norms, other.inlier_norms),
            outlier: match (self.outlier, other.outlier) {
                (Some(a), Some(o)) => Some(OutlierSketch {
                    signs: cati(a.signs, o.signs),
                    norms: cat(a.norms, o.norms),
                    indices: cati(a.indices, o.indices),
                }),
                _ => None,
            },
        }
    }
}

fn default_f16() -> StorageDtype {
    StorageDtype::F16
}
fn default_true() -> bool {
    true
}

/// Configuration of a [`QjlCache`]. Defaults are the reference's LongBench setting for
/// general layers: `m = 256`, `m_o = 256`, 8 outlier channels, 2-bit values, `G = 32`, a
/// 128-token full-precision buffer, seed 42, orthogonalised rows. (The reference uses
/// `m = 512`, `m_o = 128` for its first 15 layers: set them per layer.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QjlConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// `m`: sign bits per key (the reference's `key_quantization_bits`).
    pub sketch_dim: usize,
    /// `m_o`: sign bits of the outlier part (the reference's `dim_outlier`), at most `m`.
    pub outlier_sketch_dim: usize,
    /// Outlier channels per group of `group` tokens (the reference's `outlier_count`).
    pub outliers: usize,
    /// Bits of the per-token value codes (the reference's `value_quantization_bits`).
    pub value_bits: u32,
    /// `G`: tokens per key outlier group and channels per value group.
    pub group: usize,
    /// `R`: the full-precision buffer of recent tokens (a multiple of `G`).
    pub buffer: usize,
    /// Seed of the projection `S`.
    pub seed: u64,
    /// Orthogonalise the rows of `S` in blocks of `head_dim` (the reference's `rot=True`).
    #[serde(default = "default_true")]
    pub orthogonal: bool,
    /// Dtype of the value scales and zero points.
    #[serde(default = "default_f16")]
    pub scale_dtype: StorageDtype,
    /// Dtype of the full-precision buffers.
    #[serde(default = "default_f16")]
    pub residual_dtype: StorageDtype,
    /// Attend the last appended block in full precision (the reference attends prefill in
    /// full precision), and the window values its append quantized until the next append (the
    /// reference sums the values before it spills the oldest).
    #[serde(default = "default_true")]
    pub current_in_full_precision: bool,
}

impl QjlConfig {
    /// The reference defaults (see the type docs).
    pub fn new(shape: KvShape) -> Self {
        QjlConfig {
            shape,
            sketch_dim: 256,
            outlier_sketch_dim: 256,
            outliers: 8,
            value_bits: 2,
            group: 32,
            buffer: 128,
            seed: 42,
            orthogonal: true,
            scale_dtype: StorageDtype::F16,
            residual_dtype: StorageDtype::F16,
            current_in_full_precision: true,
        }
    }
    /// Sets `m` and `m_o`.
    pub fn with_sketch_dims(mut self, sketch_dim: usize, outlier_sketch_dim: usize) -> Self {
        self.sketch_dim = sketch_dim;
        self.outlier_sketch_dim = outlier_sketch_dim;
        self
    }
    /// Sets the outlier channels per group.
    pub fn with_outliers(mut self, outliers: usize) -> Self {
        self.outliers = outliers;
        self
    }
    /// Sets the value code width.
    pub fn with_value_bits(mut self, bits: u32) -> Self {
        self.value_bits = bits;
        self
    }
    /// Sets `G`.
    pub fn with_group(mut self, group: usize) -> Self {
        self.group = group;
        self
    }
    /// Sets `R`.
    pub fn with_buffer(mut self, buffer: usize) -> Self {
        self.buffer = buffer;
        self
    }
    /// Sets the seed of `S`.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Orthogonalised (`true`) or i.i.d. Gaussian (`false`) rows.
    pub fn with_orthogonal(mut self, on: bool) -> Self {
        self.orthogonal = on;
        self
    }
    /// Sets the dtype of the value scales and zeros.
    pub fn with_scale_dtype(mut self, dtype: StorageDtype) -> Self {
        self.scale_dtype = dtype;
        self
    }
    /// Sets the dtype of the full-precision buffers.
    pub fn with_residual_dtype(mut self, dtype: StorageDtype) -> Self {
        self.residual_dtype = dtype;
        self
    }
    /// Whether the last appended block is attended in full precision.
    pub fn with_current_in_full_precision(mut self, on: bool) -> Self {
        self.current_in_full_precision = on;
        self
    }

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &[
        "sketch_dim",
        "outlier_sketch_dim",
        "outliers",
        "value_bits",
        "group",
        "buffer",
        "seed",
        "orthogonal",
        "scale_dtype",
        "residual_dtype",
        "current_full",
    ];

    /// The default config with `key=value` parameters applied: `sketch_dim`,
    /// `outlier_sketch_dim`, `outliers`, `value_bits`, `group`, `buffer`, `seed` (integers),
    /// `orthogonal` and `current_full` (`true`/`false`), `scale_dtype` and `residual_dtype`
    /// (`f16`/`f32`). Validated by [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the parameter for an unknown name or a value that does
    /// not parse.
    pub fn from_params<'a>(
        shape: KvShape,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        let mut cfg = QjlConfig::new(shape);
        for (k, v) in params {
            match k {
                "sketch_dim" => cfg.sketch_dim = parse::int("sketch_dim", v)?,
                "outlier_sketch_dim" => {
                    cfg.outlier_sketch_dim = parse::int("outlier_sketch_dim", v)?;
                }
                "outliers" => cfg.outliers = parse::int("outliers", v)?,
                "value_bits" => cfg.value_bits = parse::width("value_bits", v)?,
                "group" => cfg.group = parse::int("group", v)?,
                "buffer" => cfg.buffer = parse::int("buffer", v)?,
                "seed" => {
                    cfg.seed = v
                        .parse()
                        .map_err(|_| parse::bad("seed", v, "a non-negative integer"))?;
                }
                "orthogonal" => cfg.orthogonal = parse::boolean("orthogonal", v)?,
                "scale_dtype" => cfg.scale_dtype = parse::dtype("scale_dtype", v)?,
                "residual_dtype" => cfg.residual_dtype = parse::dtype("residual_dtype", v)?,
                "current_full" => {
                    cfg.current_in_full_precision = parse::boolean("current_full", v)?;
                }
                _ => return Err(parse::unknown("QJL", k, Self::PARAMS)),
            }
        }
        Ok(cfg)
    }

    fn value_spec(&self) -> Result<QuantSpec> {
        let bits = BitWidth::new(self.value_bits)?;
        if self.group == 0 {
            return Err(QuantError::InvalidConfig {
                field: "group",
                reason: "must be at least 1".into(),
            });
        }
        if self.buffer == 0 || !self.buffer.is_multiple_of(self.group) {
            return Err(QuantError::GroupDoesNotDivide {
                group: self.group,
                axis: "buffer (R must be a positive multiple of G)",
                len: self.buffer,
            });
        }
        let d = self.shape.head_dim();
        if !d.is_multiple_of(self.group) {
            return Err(QuantError::GroupDoesNotDivide {
                group: self.group,
                axis: "head_dim (value groups run along channels)",
                len: d,
            });
        }
        if self.sketch_dim == 0 {
            return Err(QuantError::InvalidConfig {
                field: "sketch_dim",
                reason: "must be at least 1".into(),
            });
        }
        check_outliers(d, self.outliers, self.outlier_sketch_dim)?;
        Ok(QuantSpec::new(bits, self.group, GroupAxis::Channels)?
            .with_scale_dtype(self.scale_dtype))
    }

    /// Builds the cache (drawing `S`).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for an unsupported value width, `G` zero or not dividing
    /// `R` or `head_dim`, `m = 0`, `m_o > m`, more outliers than channels, outliers with
    /// `head_dim > 256` or with `m_o = 0`.
    pub fn init(&self, device: &Device) -> kv_core::Result<QjlCache> {
        let value_spec = self.value_spec().map_err(KvError::from)?;
        let sketch = QjlSketch::new(
            self.shape.head_dim(),
            self.sketch_dim,
            if self.outliers > 0 {
                self.outlier_sketch_dim
            } else {
                0
            },
            self.seed,
            self.orthogonal,
            device,
        )
        .map_err(KvError::from)?;
        Ok(QjlCache {
            config: self.clone(),
            device: device.clone(),
            sketch,
            value_spec,
            k_sketch: None,
            k_full: None,
            v_quant: None,
            v_full: None,
            pending: None,
            spilled_values: None,
            len: 0,
            positions: vec![Vec::new(); self.shape.batch()],
            logical: vec![0; self.shape.batch()],
        })
    }

    /// Stored bytes once `t` tokens per sequence are held with nothing pending: sketched keys
    /// (`4⌈m/32⌉ + 2` bytes per token, plus `4⌈m_o/32⌉ + 2` with outliers and `o` bytes per
    /// group of `G` tokens), KIVI values, the fp buffers, the projection `S` (`4 m d`) and a
    /// `u32` position per token and sequence: the formula of `docs/techniques/quant.md`.
    ///
    /// # Errors
    /// As [`init`](Self::init).
    pub fn stored_bytes(&self, t: usize) -> kv_core::Result<usize> {
        let vs = self.value_spec().map_err(KvError::from)?;
        let s = self.shape;
        let (b, h, d, r) = (s.batch(), s.kv_heads(), s.head_dim(), self.buffer);
        let fp = self.residual_dtype.size();
        let tk = t - t % r;
        let tv = t.saturating_sub(r);
        let mut per_key = BitWidth::ONE.bytes_for(self.sketch_dim) + 2;
        if self.outliers > 0 {
            per_key += BitWidth::ONE.bytes_for(self.outlier_sketch_dim) + 2;
        }
        let key_bytes = b * h * (tk * per_key + (tk / self.group) * self.outliers);
        let values = if tv == 0 {
            0
        } else {
            vs.stored_bytes([b, h, tv, d])
        };
        Ok(key_bytes
            + values
            + b * h * d * fp * ((t - tk) + (t - tv))
            + 4 * self.sketch_dim * d
            + b * t * core::mem::size_of::<u32>())
    }

    /// Asymptotic stored bits per key/value element (long sequences: buffers, `S` and positions
    /// amortised away): `((32⌈m/32⌉ + 16 [+ 32⌈m_o/32⌉ + 16]) / d + 8 o / (G d) + value bits) / 2`.
    ///
    /// # Errors
    /// As [`init`](Self::init).
    pub fn bits_per_element(&self) -> kv_core::Result<f64> {
        let vs = self.value_spec().map_err(KvError::from)?;
        let d = self.shape.head_dim() as f64;
        let mut key = (8 * BitWidth::ONE.bytes_for(self.sketch_dim) + 16) as f64;
        if self.outliers > 0 {
            key += (8 * BitWidth::ONE.bytes_for(self.outlier_sketch_dim) + 16) as f64;
        }
        let key = key / d + 8.0 * self.outliers as f64 / (self.group as f64 * d);
        Ok((key + vs.bits_per_element(self.shape.head_dim())) / 2.0)
    }
}

/// A QJL cache for one layer: see the module docs. Spill semantics as in the reference (and
/// KIVI): a first append of `n` tokens sketches `n - n mod R` keys and keeps the rest in the
/// buffer; in decode the key buffer fills to `R` and is sketched as one block. Values: all but
/// the last `R` are quantized per token; in decode the oldest value is quantized once more
/// than `R` are held.
#[derive(Debug, Clone)]
pub struct QjlCache {
    config: QjlConfig,
    device: Device,
    sketch: QjlSketch,
    value_spec: QuantSpec,
    k_sketch: Option<QjlKeys>,
    k_full: Option<Tensor<4>>,
    v_quant: Option<QuantizedTensor>,
    v_full: Option<Tensor<4>>,
    /// The last appended block as given (fp32), attended in full precision.
    pending: Option<(Tensor<4>, Tensor<4>)>,
    /// Values that the last append moved from the fp window into the quantized store, as the
    /// window held them, with the cache index of the first: attended in place of their codes
    /// until the next append (the reference sums the values before it spills the oldest).
    spilled_values: Option<(usize, Tensor<4>)>,
    len: usize,
    positions: Vec<Vec<u32>>,
    logical: Vec<usize>,
}

/// Keys per chunk of the streamed attention (rounded down to whole groups, at least one).
pub const QJL_ATTEND_CHUNK_TOKENS: usize = 512;

/// The most query-sketch floats (`groups x rows x m`, per batch entry and KV head) one chunk
/// of the streamed attention computes with outliers; chunks shrink (to one group at least)
/// for long query blocks.
pub const QJL_QUERY_SKETCH_BUDGET: usize = 1 << 22;

fn slice_tokens(t: &Tensor<4>, r: core::ops::Range<usize>) -> Tensor<4> {
    let [b, h, _, d] = t.dims();
    t.clone().slice([0..b, 0..h, r, 0..d])
}

fn cat_tokens(a: Option<Tensor<4>>, b: Tensor<4>) -> Tensor<4> {
    match a {
        Some(a) => Tensor::cat(vec![a, b], 2),
        None => b,
    }
}

fn split_at(x: Tensor<4>, q: usize) -> (Option<Tensor<4>>, Option<Tensor<4>>) {
    let n = x.dims()[2];
    match (q, n - q) {
        (0, _) => (None, Some(x)),
        (_, 0) => (Some(x), None),
        _ => (Some(slice_tokens(&x, 0..q)), Some(slice_tokens(&x, q..n))),
    }
}

fn fp_bytes(t: &Option<Tensor<4>>) -> usize {
    t.as_ref()
        .map_or(0, |t| t.shape().num_elements() * t.dtype().size())
}

impl QjlCache {
    /// The configuration.
    pub fn config(&self) -> &QjlConfig {
        &self.config
    }
    /// The projection.
    pub fn sketch(&self) -> &QjlSketch {
        &self.sketch
    }
    /// Tokens held per sequence (padding included).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Keys held as sketches, per sequence.
    pub fn sketched_key_tokens(&self) -> usize {
        self.k_sketch.as_ref().map_or(0, QjlKeys::tokens)
    }
    /// Keys held in the full-precision buffer, per sequence.
    pub fn full_key_tokens(&self) -> usize {
        self.k_full.as_ref().map_or(0, |t| t.dims()[2])
    }
    /// Values held quantized, per sequence.
    pub fn quantized_value_tokens(&self) -> usize {
        self.v_quant.as_ref().map_or(0, QuantizedTensor::tokens)
    }
    /// Values held in the full-precision buffer, per sequence.
    pub fn full_value_tokens(&self) -> usize {
        self.v_full.as_ref().map_or(0, |t| t.dims()[2])
    }
    /// Tokens of the last appended block held as given.
    pub fn pending_tokens(&self) -> usize {
        self.pending.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }
    /// The sketched keys.
    pub fn sketched_keys(&self) -> Option<&QjlKeys> {
        self.k_sketch.as_ref()
    }

    /// Attention without statistics and its log-sum-exp (the cache is not empty): the fused
    /// host path for decode-sized queries on CPU backends
    /// ([`attend_fused`](Self::attend_fused)), the streamed tensor ops otherwise
    /// ([`attend_chunked`](Self::attend_chunked)).
    fn attend_fast(&self, query: &Query) -> (Tensor<4>, Tensor<4>) {
        if use_host(&self.device, query, self.config.shape.kv_heads()) {
            self.attend_fused(query)
        } else {
            self.attend_chunked(query)
        }
    }

    /// Attention computed on the host from the sign bits (see [`crate::host`]): the query is
    /// sketched once per stream, every sketched key is scored from its packed signs and
    /// norms (and its group's outlier channels), and the quantized values are summed on their
    /// codes with the register kernels KIVI uses. Buffered and pending tokens are exact. Only
    /// the packed words, norms, statistics, buffers and `S` are read back; no key or value is
    /// dequantized.
    pub(crate) fn attend_fused(&self, query: &Query) -> (Tensor<4>, Tensor<4>) {
        let pending = self
            .pending
            .as_ref()
            .map(|(k, v)| (HostDense::new(k), HostDense::new(v)));
        let ks = self
            .k_sketch
            .as_ref()
            .map(|k| HostSigns::new(k, &self.sketch));
        let vq = self.v_quant.as_ref().map(HostCodes::from_quantized);
        let kf = self.k_full.as_ref().map(HostDense::new);
        let vf = self.v_full.as_ref().map(HostDense::new);
        let sv = self
            .spilled_values
            .as_ref()
            .map(|(start, x)| (*start, HostDense::new(x)));
        let keys = ordered(
            &[
                ks.as_ref().map(Source::Signs),
                kf.as_ref().map(Source::Dense),
            ],
            pending.as_ref().map(|p| &p.0),
            self.len,
        );
        let values = ordered(
            &[
                vq.as_ref().map(Source::Codes),
                vf.as_ref().map(Source::Dense),
            ],
            pending.as_ref().map(|p| &p.1),
            self.len,
        );
        let values = overlay(values, sv.as_ref());
        attend_host(
            query,
            self.config.shape.kv_heads(),
            self.len,
            &self.positions,
            &keys,
            &values,
        )
    }

    /// Attention without statistics and its log-sum-exp, streamed over chunks of whole
    /// groups with scores estimated from the sign bits (the cache is not empty).
    pub(crate) fn attend_chunked(&self, query: &Query) -> (Tensor<4>, Tensor<4>) {
        let g = self.config.group;
        // With outliers the query is sketched per group of every chunk
        // (`groups x rows x m` floats): long query blocks get fewer groups per chunk.
        let rows = query.tensor().dims()[1] / self.config.shape.kv_heads() * query.len();
        let groups = if self.config.outliers > 0 {
            (QJL_QUERY_SKETCH_BUDGET / (rows * self.config.sketch_dim).max(1)).max(1)
        } else {
            usize::MAX
        };
        let chunk = g * (QJL_ATTEND_CHUNK_TOKENS / g).clamp(1, groups);
        attend_streamed_scores(
            query,
            self.config.shape.kv_heads(),
            self.len,
            &self.positions,
            |start| start + chunk,
            |range, q| {
                (
                    self.scores(range.start, range.end, q),
                    self.values_fp32(range.start, range.end),
                )
            },
        )
    }

    /// Values of the held tokens `range` in fp32 (pending tokens as given).
    fn values_fp32(&self, a: usize, b: usize) -> Tensor<4> {
        if let Some(v) = self.all_pending(a, b, |(_, pv)| pv) {
            return v;
        }
        let tq = self.quantized_value_tokens();
        let mut parts = Vec::with_capacity(2);
        if let Some(q) = &self.v_quant
            && a < tq
        {
            parts.push(q.slice_tokens_aligned(a..b.min(tq)).dequantize());
        }
        if let Some(f) = &self.v_full
            && b > tq
        {
            parts.push(slice_tokens(f, a.max(tq) - tq..b - tq).cast(FloatDType::F32));
        }
        let v = self.with_pending(Tensor::cat(parts, 2), a, b, |(_, pv)| pv);
        overlay_tokens(v, a..b, self.spilled_values.as_ref())
    }

    /// Keys as attention sees them (`k̂` for sketched tokens), fp32, for `range`.
    fn keys_fp32(&self, a: usize, b: usize) -> Tensor<4> {
        if let Some(k) = self.all_pending(a, b, |(pk, _)| pk) {
            return k;
        }
        let tk = self.sketched_key_tokens();
        let mut parts = Vec::with_capacity(2);
        if let Some(s) = &self.k_sketch
            && a < tk
        {
            parts.push(
                s.slice_tokens_aligned(a..b.min(tk))
                    .dequantize(&self.sketch),
            );
        }
        if let Some(f) = &self.k_full
            && b > tk
        {
            parts.push(slice_tokens(f, a.max(tk) - tk..b - tk).cast(FloatDType::F32));
        }
        let k = Tensor::cat(parts, 2);
        self.with_pending(k, a, b, |(pk, _)| pk)
    }

    /// The tokens `a..b` from `pick` of the pending block when they are all pending (prefill
    /// attends its own block without touching the compressed store).
    fn all_pending(
        &self,
        a: usize,
        b: usize,
        pick: impl Fn(&(Tensor<4>, Tensor<4>)) -> &Tensor<4>,
    ) -> Option<Tensor<4>> {
        let p = self.pending.as_ref()?;
        let src = pick(p);
        let p0 = self.len - src.dims()[2];
        (p0 <= a).then(|| slice_tokens(src, a - p0..b - p0))
    }

    /// `x` (the tokens `a..b`) with the pending tokens in that range overwritten from `pick`.
    fn with_pending(
        &self,
        x: Tensor<4>,
        a: usize,
        b: usize,
        pick: impl Fn(&(Tensor<4>, Tensor<4>)) -> &Tensor<4>,
    ) -> Tensor<4> {
        let Some(p) = &self.pending else { return x };
        let src = pick(p);
        let p0 = self.len - src.dims()[2];
        let s = a.max(p0);
        if s >= b {
            return x;
        }
        let [bb, h, _, d] = x.dims();
        x.slice_assign(
            [0..bb, 0..h, s - a..b - a, 0..d],
            slice_tokens(src, s - p0..b - p0),
        )
    }

    /// Scores `q · kᵀ` of the tokens `a..b` for grouped, scaled queries `[b, h, rows, d]`:
    /// from the sign bits for sketched tokens, exact for buffered and pending ones.
    fn scores(&self, a: usize, b: usize, q: &Tensor<4>) -> Tensor<4> {
        if let Some(k) = self.all_pending(a, b, |(pk, _)| pk) {
            return q.clone().matmul(k.swap_dims(2, 3));
        }
        let tk = self.sketched_key_tokens();
        let mut parts = Vec::with_capacity(2);
        if let Some(s) = &self.k_sketch
            && a < tk
        {
            parts.push(
                s.slice_tokens_aligned(a..b.min(tk))
                    .scores(&self.sketch, q.clone()),
            );
        }
        if let Some(f) = &self.k_full
            && b > tk
        {
            let k = slice_tokens(f, a.max(tk) - tk..b - tk).cast(FloatDType::F32);
            parts.push(q.clone().matmul(k.swap_dims(2, 3)));
        }
        let scores = Tensor::cat(parts, 3);
        let Some((pk, _)) = &self.pending else {
            return scores;
        };
        let p0 = self.len - pk.dims()[2];
        let s = a.max(p0);
        if s >= b {
            return scores;
        }
        let exact = q
            .clone()
            .matmul(slice_tokens(pk, s - p0..b - p0).swap_dims(2, 3));
        let [bb, h, rows, _] = scores.dims();
        scores.slice_assign([0..bb, 0..h, 0..rows, s - a..b - a], exact)
    }
}

impl KvCache for QjlCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        const OP: &str = "QjlCache::append";
        let shape = self.config.shape;
        check_block(&shape, &block, OP)?;
        let last: Vec<Option<u32>> = self
            .positions
            .iter()
            .map(|p| p.iter().rev().copied().find(|&x| x != PAD))
            .collect();
        let counts = check_positions(block.positions(), shape.batch(), &last, OP)?;
        // fp16 key norms and (with fp16 scales) value statistics must stay finite.
        let key_norm = block
            .keys()
            .clone()
            .cast(FloatDType::F32)
            .square()
            .sum_dim(3)
            .sqrt()
            .max()
            .reshape([1]);
        let value_max = block
            .values()
            .clone()
            .cast(FloatDType::F32)
            .abs()
            .max()
            .reshape([1]);
        let maxes = Tensor::cat(vec![key_norm, value_max], 0)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_else(|_| vec![f32::INFINITY; 2]);
        let (kn, vm) = (maxes[0], maxes[1]);
        if kn > F16_MAX {
            return Err(KvError::InvalidConfig {
                field: "data",
                reason: format!("{OP}: a key norm of {kn} exceeds {F16_MAX}, the fp16 norm limit"),
            });
        }
        if self.config.scale_dtype == StorageDtype::F16 && vm > F16_MAX_ABS_INPUT {
            return Err(KvError::InvalidConfig {
                field: "data",
                reason: format!(
                    "{OP}: value magnitude {vm} exceeds {F16_MAX_ABS_INPUT}, the limit of fp16 \
                     scales and zeros"
                ),
            });
        }
        let n = block.seq_len();
        let r = self.config.buffer;
        let dtype = match self.config.residual_dtype {
            StorageDtype::F32 => FloatDType::F32,
            StorageDtype::F16 => FloatDType::F16,
        };
        let (k, v, pos) = block.into_parts();
        let (k, v) = (k.cast(FloatDType::F32), v.cast(FloatDType::F32));

        // Everything fallible happens on locals; the cache changes only once all succeeded.
        let kf = cat_tokens(self.k_full.clone(), k.clone().cast(dtype));
        let m = kf.dims()[2];
        let (k_spill, k_full) = split_at(kf, m - m % r);
        let k_new = k_spill
            .map(|x| {
                self.sketch.quantize(
                    x.cast(FloatDType::F32),
                    self.config.outliers,
                    self.config.group,
                )
            })
            .transpose()?;
        let k_sketch = match (self.k_sketch.clone(), k_new) {
            (Some(a), Some(b)) => Some(a.concat(b)),
            (a, b) => a.or(b),
        };
        let v_start = self.quantized_value_tokens();
        let vf = cat_tokens(self.v_full.clone(), v.clone().cast(dtype));
        let m = vf.dims()[2];
        let spill = m.saturating_sub(r);
        let old = spill.min(self.full_value_tokens());
        let spilled_values = (self.config.current_in_full_precision && old > 0).then(|| {
            let w = self.v_full.as_ref().expect("a non-empty value window");
            (v_start, slice_tokens(w, 0..old))
        });
        let (v_spill, v_full) = split_at(vf, spill);
        let v_new = v_spill
            .map(|x| self.value_spec.quantize_finite(x.cast(FloatDType::F32)))
            .transpose()?;
        let v_quant = match (self.v_quant.clone(), v_new) {
            (Some(a), Some(b)) => Some(a.concat(b)?),
            (a, b) => a.or(b),
        };

        self.k_sketch = k_sketch;
        self.k_full = k_full;
        self.v_quant = v_quant;
        self.v_full = v_full;
        self.pending = self.config.current_in_full_precision.then_some((k, v));
        self.spilled_values = spilled_values;
        for b in 0..shape.batch() {
            self.positions[b].extend_from_slice(&pos[b * n..(b + 1) * n]);
            self.logical[b] += counts[b];
        }
        self.len += n;
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        const OP: &str = "QjlCache::attend";
        check_query(&self.config.shape, query, OP)?;
        if self.len == 0 {
            return Ok(Attended {
                output: query.tensor().zeros_like(),
                stats: Default::default(),
            });
        }
        if !stats.any() {
            return Ok(Attended {
                output: self.attend_fast(query).0,
                stats: Default::default(),
            });
        }
        // Statistics need the normalised probabilities of every key: the dense path over k̂.
        let (k, v) = (self.keys_fp32(0, self.len), self.values_fp32(0, self.len));
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

    fn attend_lse(&mut self, query: &Query) -> kv_core::Result<(Tensor<4>, Tensor<4>)> {
        check_query(&self.config.shape, query, "QjlCache::attend_lse")?;
        if self.len == 0 {
            return Ok(empty_lse(query, self.config.shape.kv_heads()));
        }
        Ok(self.attend_fast(query))
    }

    fn end_prefill(&mut self) -> kv_core::Result<()> {
        self.pending = None;
        self.spilled_values = None;
        Ok(())
    }

    fn view(&self) -> KvView {
        let s = self.config.shape;
        let (keys, values) = if self.len == 0 {
            let z = Tensor::zeros([s.batch(), s.kv_heads(), 0, s.head_dim()], &self.device);
            (z.clone(), z)
        } else {
            (self.keys_fp32(0, self.len), self.values_fp32(0, self.len))
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
        let (pk, pv) = self.pending.as_ref().map_or((0, 0), |(k, v)| {
            (
                k.shape().num_elements() * k.dtype().size(),
                v.shape().num_elements() * v.dtype().size(),
            )
        });
        let spilled = self
            .spilled_values
            .as_ref()
            .map_or(0, |(_, v)| v.shape().num_elements() * v.dtype().size());
        let logical_tokens: usize = self.logical.iter().sum();
        let proj = self.sketch.proj.shape().num_elements() * self.sketch.proj.dtype().size();
        MemoryReport {
            key_bytes: self.k_sketch.as_ref().map_or(0, QjlKeys::stored_bytes)
                + fp_bytes(&self.k_full)
                + pk,
            value_bytes: self
                .v_quant
                .as_ref()
                .map_or(0, QuantizedTensor::stored_bytes)
                + fp_bytes(&self.v_full)
                + pv
                + spilled,
            metadata_bytes: s.batch() * self.len * core::mem::size_of::<u32>() + proj,
            logical_elements: 2 * logical_tokens * s.kv_heads() * s.head_dim(),
            logical_tokens,
            held_token_slots: s.streams() * self.len,
        }
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = vec![HeldBuffer::tensor(StorageRole::Metadata, &self.sketch.proj)];
        if let Some(k) = &self.k_sketch {
            out.extend(k.held_buffers(StorageRole::Keys));
        }
        if let Some(v) = &self.v_quant {
            out.extend(v.held_buffers(StorageRole::Values));
        }
        if let Some(k) = &self.k_full {
            out.push(HeldBuffer::tensor(StorageRole::Keys, k));
        }
        if let Some(v) = &self.v_full {
            out.push(HeldBuffer::tensor(StorageRole::Values, v));
        }
        if let Some((k, v)) = &self.pending {
            out.push(HeldBuffer::tensor(StorageRole::Keys, k));
            out.push(HeldBuffer::tensor(StorageRole::Values, v));
        }
        if let Some((_, v)) = &self.spilled_values {
            out.push(HeldBuffer::tensor(StorageRole::Values, v));
        }
        for p in &self.positions {
            out.push(HeldBuffer::host(StorageRole::Metadata, p));
        }
        out
    }

    fn reset(&mut self) {
        self.k_sketch = None;
        self.k_full = None;
        self.v_quant = None;
        self.v_full = None;
        self.pending = None;
        self.spilled_values = None;
        self.len = 0;
        for p in &mut self.positions {
            *p = Vec::new();
        }
        self.logical.iter_mut().for_each(|l| *l = 0);
    }
}
