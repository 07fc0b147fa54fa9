//! MatryoshkaKV (Lin et al., 2024, arXiv 2410.14731), post-training baseline: keys and values
//! projected on nested truncations of one orthogonal PCA basis per (layer, KV head), with a
//! rank per head that can be lowered while the cache runs.
//!
//! # What it does
//! Per (layer, KV head) `U_k` is the PCA basis of post-RoPE keys ([`Activation::Keys`], the
//! reference's initialisation; optionally the joint query-key basis
//! [`Activation::QueryKey`]) and `U_v` that of values ([`Activation::Values`]), both
//! orthogonal `d × d` with columns by decreasing variance. Head `h` stores `k' = k U_k[:, :r_k,h]` and `v' = v U_v[:, :r_v,h]`;
//! a query is projected with the same `U_k`, and
//! `o_h = softmax(q' k'ᵀ / √d) v' U_v[:, :r_v,h]ᵀ`, which is attention over the
//! reconstructions `k U Uᵀ`, `v U Uᵀ` (what [`view`](kv_core::KvCache::view) returns).
//!
//! The bases are *nested*: the rank-`r` projection is the first `r` coordinates of the rank
//! `r + 1` one. So every head has its own rank ([`RankAllocation`]: uniform, or greedy by
//! eigenvalue share within the layer or over the whole model for an average rank), and
//! [`MatryoshkaCache::truncate`] lowers the ranks of a running cache by dropping trailing
//! coordinates of what it holds, without recalibration (a rank cannot grow back: the
//! dropped coordinates are gone).
//!
//! # Memory
//! `Σ_h (r_k,h + r_v,h)` elements and a `u32` position per token, plus the truncated bases
//! `d · Σ_h (r_k,h + r_v,h)` fp32 floats per layer.
//!
//! # Deviations
//! The paper trains the orthogonal projections (Cayley parameterisation, a Matryoshka
//! objective over sampled ranks and distillation to the full model) starting from PCA; **the
//! training step is not done here**: this is the PCA initialisation, which the paper reports
//! as degrading much faster with rank. The greedy allocation uses calibration eigenvalues
//! instead of the paper's search on validation loss. Heads hold separate tensors of their own
//! widths (the reference pads to the widest head when attending; this cache attends per
//! head).

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::FloatDType;
use kv_core::{
    Attended, HeldBuffer, KvBlock, KvCache, KvError, KvShape, KvView, Lengths, MemoryReport, Query,
    StatsRequest, StorageDtype, check_query, positions_per_head,
};
use serde::{Deserialize, Serialize};

use crate::attend::{Part, attend_parts, group_query, project, project_grouped, transpose_heads};
use crate::calibration::{Activation, Calibration};
use crate::slots::{LatentParts, Slots, cat_tokens, empty_view, float_dtype};

/// How the per-head ranks of a [`MatryoshkaConfig`] are chosen from its average ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RankAllocation {
    /// Every head gets the average rank.
    Uniform,
    /// The layer's `kv_heads · rank` columns go, one at a time, to the head whose next
    /// principal direction holds the largest share of that head's variance.
    Layer,
    /// As `Layer`, over every (layer, KV head) of the artefact: `num_layers · kv_heads · rank`
    /// columns, so layers differ too (the paper's heterogeneous budgets).
    Model,
}

fn keys_basis() -> Activation {
    Activation::Keys
}

/// Configuration of a [`MatryoshkaCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatryoshkaConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// The calibration artefact (needs [`Activation::Keys`] and [`Activation::Values`]).
    pub calibration: PathBuf,
    /// The layer index in the artefact.
    pub layer: usize,
    /// The model's layer count, checked against the artefact when given.
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Average key rank per head, `1..=head_dim`.
    pub rank_k: usize,
    /// Average value rank per head, `1..=head_dim`.
    pub rank_v: usize,
    /// How per-head ranks are chosen.
    pub allocation: RankAllocation,
    /// The basis keys and queries are projected on: [`Activation::Keys`] (the reference's
    /// PCA of keys) or [`Activation::QueryKey`] (the joint query-key basis of Eigen
    /// Attention, which keeps the directions queries use).
    #[serde(default = "keys_basis")]
    pub key_basis: Activation,
    /// Element type of the stored projections.
    #[serde(default)]
    pub dtype: StorageDtype,
}

impl MatryoshkaConfig {
    /// MatryoshkaKV with the given average ranks, uniform over heads, fp32 storage.
    pub fn new(
        shape: KvShape,
        calibration: impl Into<PathBuf>,
        layer: usize,
        rank_k: usize,
        rank_v: usize,
    ) -> Self {
        MatryoshkaConfig {
            shape,
            calibration: calibration.into(),
            layer,
            num_layers: None,
            rank_k,
            rank_v,
            allocation: RankAllocation::Uniform,
            key_basis: Activation::Keys,
            dtype: StorageDtype::F32,
        }
    }
    /// Sets the key basis ([`Activation::Keys`] or [`Activation::QueryKey`]).
    pub fn with_key_basis(mut self, basis: Activation) -> Self {
        self.key_basis = basis;
        self
    }
    /// Sets the rank allocation.
    pub fn with_allocation(mut self, allocation: RankAllocation) -> Self {
        self.allocation = allocation;
        self
    }
    crate::params::calibrated_setters!();

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &[
        "calibration",
        "rank",
        "rank_k",
        "rank_v",
        "allocation",
        "key_basis",
        "dtype",
    ];

    /// The config for `layer` from `key=value` parameters: `calibration` (path, required),
    /// `rank` (both average ranks), `rank_k`, `rank_v` (default `0.4 · head_dim` rounded: the
    /// paper's 60 % average compression), `allocation` (`uniform`, `layer`, `model`; default
    /// `model`, the paper's heterogeneous budgets), `key_basis` (`keys`, the default, or
    /// `query_key`), `dtype`. Validated at [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for an unknown name, a bad value or no `calibration`.
    pub fn from_params<'a>(
        shape: KvShape,
        layer: usize,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        use crate::params::{bad, dtype, int, path, unknown};
        let r = ((shape.head_dim() as f64 * 0.4).round() as usize).max(1);
        let mut cfg = MatryoshkaConfig::new(shape, PathBuf::new(), layer, r, r)
            .with_allocation(RankAllocation::Model);
        for (k, v) in params {
            match k {
                "calibration" => cfg.calibration = path(v),
                "rank" => {
                    cfg.rank_k = int("rank", v)?;
                    cfg.rank_v = cfg.rank_k;
                }
                "rank_k" => cfg.rank_k = int("rank_k", v)?,
                "rank_v" => cfg.rank_v = int("rank_v", v)?,
                "allocation" => {
                    cfg.allocation = match v {
                        "uniform" => RankAllocation::Uniform,
                        "layer" => RankAllocation::Layer,
                        "model" => RankAllocation::Model,
                        _ => return Err(bad("allocation", v, "uniform, layer or model")),
                    }
                }
                "key_basis" => {
                    cfg.key_basis = match v {
                        "keys" => Activation::Keys,
                        "query_key" => Activation::QueryKey,
                        _ => return Err(bad("key_basis", v, "keys or query_key")),
                    }
                }
                "dtype" => cfg.dtype = dtype("dtype", v)?,
                _ => return Err(unknown("MatryoshkaKV", k, Self::PARAMS)),
            }
        }
        if cfg.calibration.as_os_str().is_empty() {
            return Err(crate::missing_calibration("MatryoshkaKV"));
        }
        Ok(cfg)
    }

    fn validate(&self) -> kv_core::Result<()> {
        let d = self.shape.head_dim();
        crate::params::check_rank("rank_k", self.rank_k, d)?;
        crate::params::check_rank("rank_v", self.rank_v, d)?;
        if !matches!(self.key_basis, Activation::Keys | Activation::QueryKey) {
            return Err(KvError::InvalidConfig {
                field: "key_basis",
                reason: format!(
                    "`{}` is not a key basis (keys or query_key)",
                    self.key_basis.name()
                ),
            });
        }
        Ok(())
    }

    /// The per-KV-head `(key ranks, value ranks)` of this config's layer.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for bad ranks or an artefact without keys or values or of
    /// another shape.
    pub fn head_ranks(
        &self,
        calibration: &Calibration,
    ) -> kv_core::Result<(Vec<usize>, Vec<usize>)> {
        self.validate()?;
        let mut out = Vec::with_capacity(2);
        for (act, rank) in [
            (self.key_basis, self.rank_k),
            (Activation::Values, self.rank_v),
        ] {
            calibration.check(act, self.layer, &self.shape)?;
            let h = self.shape.kv_heads();
            let ranks = match self.allocation {
                RankAllocation::Uniform => vec![rank; h],
                RankAllocation::Layer => {
                    let spectra: Vec<&[f32]> = (0..h)
                        .map(|head| {
                            calibration
                                .eigenvalues(act, self.layer, head)
                                .expect("checked")
                        })
                        .collect();
                    greedy_ranks(&spectra, h * rank)
                }
                RankAllocation::Model => {
                    let layers = calibration.meta().num_layers;
                    let spectra: Vec<&[f32]> = (0..layers)
                        .flat_map(|l| (0..h).map(move |head| (l, head)))
                        .map(|(l, head)| calibration.eigenvalues(act, l, head).expect("checked"))
                        .collect();
                    let all = greedy_ranks(&spectra, layers * h * rank);
                    all[self.layer * h..(self.layer + 1) * h].to_vec()
                }
            };
            out.push(ranks);
        }
        let v = out.pop().expect("two");
        Ok((out.pop().expect("two"), v))
    }

    /// Loads the artefact at [`calibration`](Self::calibration) and builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for ranks outside `1..=head_dim`, a missing or invalid
    /// artefact, or one from a model of another shape.
    pub fn init(&self, device: &Device) -> kv_core::Result<MatryoshkaCache> {
        self.validate()?;
        self.init_with(&Calibration::load(&self.calibration)?, device)
    }

    /// Builds the cache from an artefact already loaded.
    ///
    /// # Errors
    /// As [`init`](Self::init), without the file.
    pub fn init_with(
        &self,
        calibration: &Calibration,
        device: &Device,
    ) -> kv_core::Result<MatryoshkaCache> {
        if let Some(n) = self.num_layers {
            calibration.check_layers(n)?;
        }
        let (rk, rv) = self.head_ranks(calibration)?;
        let d = self.shape.head_dim();
        let bases = |act: Activation, ranks: &[usize]| -> Vec<Tensor<3>> {
            calibration
                .truncated(act, self.layer, ranks)
                .into_iter()
                .zip(ranks)
                .map(|(u, &r)| Tensor::from_data(TensorData::new(u, [1, d, r]), device))
                .collect()
        };
        let h = self.shape.kv_heads();
        Ok(MatryoshkaCache {
            config: self.clone(),
            device: device.clone(),
            pk: bases(self.key_basis, &rk),
            pv: bases(Activation::Values, &rv),
            rank_k: rk,
            rank_v: rv,
            slots: Slots::new(self.shape.batch()),
            keys: vec![None; h],
            values: vec![None; h],
        })
    }
}

/// Distributes `total` principal directions over bases with the given eigenvalue spectra:
/// every basis gets one, then each next one goes to the basis whose next eigenvalue is the
/// largest share of its own trace (ties: the lower index). Ranks never exceed the dimension.
pub(crate) fn greedy_ranks(spectra: &[&[f32]], total: usize) -> Vec<usize> {
    let mut ranks = vec![1usize; spectra.len()];
    let share = |s: &[f32], i: usize| -> f64 {
        let tr: f64 = s.iter().map(|&x| f64::from(x.max(0.0))).sum();
        if tr > 0.0 {
            f64::from(s[i].max(0.0)) / tr
        } else {
            0.0
        }
    };
    let mut left = total.saturating_sub(spectra.len());
    while left > 0 {
        let best = spectra
            .iter()
            .enumerate()
            .filter(|(b, s)| ranks[*b] < s.len())
            .map(|(b, s)| (b, share(s, ranks[b])))
            .fold(None, |acc: Option<(usize, f64)>, (b, v)| match acc {
                Some((_, bv)) if bv >= v => acc,
                _ => Some((b, v)),
            });
        let Some((b, _)) = best else { break };
        ranks[b] += 1;
        left -= 1;
    }
    ranks
}

/// A MatryoshkaKV cache for one layer. See the module docs.
#[derive(Debug, Clone)]
pub struct MatryoshkaCache {
    config: MatryoshkaConfig,
    device: Device,
    /// Per KV head, `U_k[:, :r_k,h]` as `[1, d, r_k,h]`.
    pk: Vec<Tensor<3>>,
    /// Per KV head, `U_v[:, :r_v,h]` as `[1, d, r_v,h]`.
    pv: Vec<Tensor<3>>,
    rank_k: Vec<usize>,
    rank_v: Vec<usize>,
    slots: Slots,
    /// Per KV head, `[b, 1, t, r_k,h]`.
    keys: Vec<Option<Tensor<4>>>,
    /// Per KV head, `[b, 1, t, r_v,h]`.
    values: Vec<Option<Tensor<4>>>,
}

impl MatryoshkaCache {
    fn parts(&self) -> LatentParts<'_> {
        LatentParts {
            slots: &self.slots,
            keys: self.keys.iter().flatten().collect(),
            values: self.values.iter().flatten().collect(),
            bases: self.pk.iter().chain(&self.pv).collect(),
            extra: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MatryoshkaConfig {
        &self.config
    }
    /// The key rank of each KV head.
    pub fn key_ranks(&self) -> &[usize] {
        &self.rank_k
    }
    /// The value rank of each KV head.
    pub fn value_ranks(&self) -> &[usize] {
        &self.rank_v
    }
    /// The key projection of KV head `h`, `[1, head_dim, r_k,h]`.
    pub fn key_basis(&self, h: usize) -> Option<&Tensor<3>> {
        self.pk.get(h)
    }
    /// The value projection of KV head `h`, `[1, head_dim, r_v,h]`.
    pub fn value_basis(&self, h: usize) -> Option<&Tensor<3>> {
        self.pv.get(h)
    }

    /// Lowers the per-head ranks to `key_ranks` and `value_ranks` (one per KV head): the held
    /// projections and the bases keep their first columns (the nested truncation), the rest
    /// is freed.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] if a list does not have one rank per KV head, or a rank is
    /// 0 or above the head's current rank (a rank cannot grow back); the cache is unchanged.
    pub fn truncate(&mut self, key_ranks: &[usize], value_ranks: &[usize]) -> kv_core::Result<()> {
        let h = self.config.shape.kv_heads();
        for (field, new, old) in [
            ("key_ranks", key_ranks, &self.rank_k),
            ("value_ranks", value_ranks, &self.rank_v),
        ] {
            if new.len() != h {
                return Err(KvError::InvalidConfig {
                    field,
                    reason: format!("{} ranks given for {h} KV heads", new.len()),
                });
            }
            if let Some((head, (&n, &o))) = new
                .iter()
                .zip(old)
                .enumerate()
                .find(|(_, (n, o))| **n == 0 || n > o)
            {
                return Err(KvError::InvalidConfig {
                    field,
                    reason: format!(
                        "head {head}: rank {n} must be between 1 and its current rank {o} \
                         (dropped principal directions cannot be restored)"
                    ),
                });
            }
        }
        let cut3 = |t: &Tensor<3>, r: usize| t.clone().narrow(2, 0, r);
        let cut4 = |t: &Tensor<4>, r: usize| t.clone().narrow(3, 0, r);
        for head in 0..h {
            let (rk, rv) = (key_ranks[head], value_ranks[head]);
            self.pk[head] = cut3(&self.pk[head], rk);
            self.pv[head] = cut3(&self.pv[head], rv);
            self.keys[head] = self.keys[head].as_ref().map(|t| cut4(t, rk));
            self.values[head] = self.values[head].as_ref().map(|t| cut4(t, rv));
        }
        self.rank_k = key_ranks.to_vec();
        self.rank_v = value_ranks.to_vec();
        Ok(())
    }

    /// Stored bytes per token in this layer (one sequence): projections and the `u32`
    /// position; bases excluded.
    pub fn bytes_per_token(&self) -> usize {
        let cols: usize = self.rank_k.iter().chain(&self.rank_v).sum();
        cols * self.config.dtype.size() + core::mem::size_of::<u32>()
    }
}

impl KvCache for MatryoshkaCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        const OP: &str = "MatryoshkaCache::append";
        let s = self.config.shape;
        let counts = self.slots.check(&s, &block, OP)?;
        let n = block.seq_len();
        let b = s.batch();
        let dtype = float_dtype(self.config.dtype);
        let (k, v, pos) = block.into_parts();
        let d = s.head_dim();
        for head in 0..s.kv_heads() {
            let kh = k.clone().slice([0..b, head..head + 1, 0..n, 0..d]);
            let vh = v.clone().slice([0..b, head..head + 1, 0..n, 0..d]);
            self.keys[head] = Some(cat_tokens(
                self.keys[head].take(),
                project(kh, &self.pk[head]).cast(dtype),
            ));
            self.values[head] = Some(cat_tokens(
                self.values[head].take(),
                project(vh, &self.pv[head]).cast(dtype),
            ));
        }
        self.slots.push(&pos, n, &counts);
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        const OP: &str = "MatryoshkaCache::attend";
        let s = self.config.shape;
        check_query(&s, query, OP)?;
        if self.slots.len() == 0 {
            return Ok(Attended {
                output: query.tensor().zeros_like(),
                stats: Default::default(),
            });
        }
        if stats.any() {
            return Ok(self.view().attend_reference(query, stats));
        }
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let t = self.slots.len();
        let q = group_query(query.tensor().clone(), h);
        let [_, _, g, n, _] = q.dims();
        let positions = self.slots.flat(0..t);
        let mut outs = Vec::with_capacity(h);
        for head in 0..h {
            let (Some(keys), Some(values)) = (&self.keys[head], &self.values[head]) else {
                unreachable!("MatryoshkaCache::attend: every head holds the appended slots");
            };
            let qh = q.clone().slice([0..b, head..head + 1, 0..g, 0..n, 0..d]);
            let part = Part {
                q: project_grouped(qh, &self.pk[head]),
                keys: keys.clone().cast(FloatDType::F32),
                values: values.clone().cast(FloatDType::F32),
                positions: positions.clone(),
            };
            let o = attend_parts(&[part], query.positions(), 1.0 / (d as f32).sqrt(), None);
            outs.push(project_grouped(o, &transpose_heads(&self.pv[head])));
        }
        Ok(Attended {
            output: Tensor::cat(outs, 1).reshape([b, s.q_heads(), n, d]),
            stats: Default::default(),
        })
    }

    fn view(&self) -> KvView {
        let s = self.config.shape;
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let positions = positions_per_head(self.slots.per_sequence(), h);
        if self.slots.len() == 0 {
            return empty_view([b, h, d], positions, &self.device);
        }
        let rebuild = |held: &[Option<Tensor<4>>], bases: &[Tensor<3>]| -> Tensor<4> {
            let per_head = held
                .iter()
                .zip(bases)
                .map(|(t, u)| {
                    let t = t.as_ref().expect("every head holds the appended slots");
                    project(t.clone().cast(FloatDType::F32), &transpose_heads(u))
                })
                .collect();
            Tensor::cat(per_head, 1)
        };
        KvView {
            keys: rebuild(&self.keys, &self.pk),
            values: rebuild(&self.values, &self.pv),
            positions,
        }
    }

    fn lengths(&self) -> Lengths {
        self.parts().lengths(&self.config.shape)
    }

    fn memory(&self) -> MemoryReport {
        self.parts().memory(&self.config.shape)
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        self.parts().held_buffers()
    }

    fn reset(&mut self) {
        self.slots.reset();
        self.keys.iter_mut().for_each(|k| *k = None);
        self.values.iter_mut().for_each(|v| *v = None);
    }
}
