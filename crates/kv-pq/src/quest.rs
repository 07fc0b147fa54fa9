//! Quest (Tang et al., 2024, arXiv 2406.10774): query-aware page selection. Every token is
//! kept; keys are grouped in pages of `P` consecutive slots with their elementwise minimum and
//! maximum, and a decode query attends exactly to the pages with the largest upper bound on
//! its scores.
//!
//! # Math
//! For a query `q` and a page with channel-wise minimum `m` and maximum `M` of its keys,
//! `U = Σ_c max(q_c m_c, q_c M_c) ≥ q·k` for every key `k` of the page (each term bounds
//! `q_c k_c`, since `m_c ≤ k_c ≤ M_c`). It is computed as `q⁺·M + q⁻·m` (`q⁺ = max(q, 0)`,
//! `q⁻ = min(q, 0)`): two matmuls. The selection takes `max(1, ⌊budget / P⌋)` pages per query
//! head: the page that holds the most recent visible token, then the others by decreasing
//! bound (mit-han-lab/Quest `evaluation/quest_attention.py::local_heavy_hitter_mask`).
//!
//! # When it selects
//! Only one-token queries (decode) select, as in Quest; multi-token queries (prefill), calls
//! that request attention statistics and budgets at least as large as the tokens the query
//! sees use the dense path, which is exact. Quest also keeps the first two layers dense; that
//! is a per-layer choice of the pipeline (give those layers another method), not of this cache.

use burn::prelude::*;
use burn::tensor::FloatDType;
use kv_core::{
    Attended, DenseCache, DenseCacheConfig, HeldBuffer, KvBlock, KvCache, KvError, KvShape, KvView,
    Lengths, MemoryReport, PAD, Query, StatsRequest, StorageDtype, StorageRole, check_query,
};
use serde::{Deserialize, Serialize};

use crate::budget::{self, Budget};
use crate::select::{
    attend_selected, bool_tensor, key_positions, select_unless_stats, selected_or_dense,
    selected_or_dense_lse, visibility,
};

fn default_page() -> usize {
    16
}

/// Configuration of a [`QuestCache`]. Defaults: pages of 16 tokens (Quest's `chunk_size`),
/// fp32 storage. The budget has no default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuestConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Tokens a decode query attends to, rounded down to whole pages (at least one page).
    pub budget: Budget,
    /// Tokens per page `P`.
    #[serde(default = "default_page")]
    pub page_size: usize,
    /// Element type of the stored keys, values and page minima and maxima.
    #[serde(default)]
    pub dtype: StorageDtype,
}

impl QuestConfig {
    /// Quest with `budget`, pages of 16 tokens, fp32 storage.
    pub fn new(shape: KvShape, budget: Budget) -> Self {
        QuestConfig {
            shape,
            budget,
            page_size: default_page(),
            dtype: StorageDtype::F32,
        }
    }
    /// Sets the page size `P`.
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        self.page_size = page_size;
        self
    }
    /// Sets the storage dtype.
    pub fn with_dtype(mut self, dtype: StorageDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &["budget", "page", "dtype"];

    /// A config from `key=value` parameters: `budget` (required: a token count such as `512`
    /// or a fraction such as `0.1`), `page` (tokens per page, default 16) and `dtype` (`f32`,
    /// the default, or `f16`). The result is not validated until [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the parameter for an unknown name, a value that does
    /// not parse or a missing budget.
    pub fn from_params<'a>(
        shape: KvShape,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        let mut b = None;
        let mut page = default_page();
        let mut dtype = StorageDtype::F32;
        for (k, v) in params {
            match k {
                "budget" => b = Some(Budget::parse("budget", v)?),
                "page" => page = budget::int("page", v)?,
                "dtype" => dtype = budget::dtype("dtype", v)?,
                _ => return Err(budget::unknown("Quest", k, Self::PARAMS)),
            }
        }
        let b = b.ok_or_else(|| budget::missing("budget", "tokens attended per decode query"))?;
        Ok(QuestConfig::new(shape, b)
            .with_page_size(page)
            .with_dtype(dtype))
    }

    /// Checks the config.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a zero page size, a zero or out-of-range budget, or a
    /// token budget smaller than one page.
    pub fn validate(&self) -> kv_core::Result<()> {
        if self.page_size == 0 {
            return Err(KvError::InvalidConfig {
                field: "page_size",
                reason: "a page holds at least one token".into(),
            });
        }
        self.budget.validate("budget")?;
        if let Budget::Tokens(n) = self.budget
            && n < self.page_size
        {
            return Err(KvError::InvalidConfig {
                field: "budget",
                reason: format!(
                    "{n} tokens is less than one page of {} tokens",
                    self.page_size
                ),
            });
        }
        Ok(())
    }

    /// Builds the cache.
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn init(&self, device: &Device) -> kv_core::Result<QuestCache> {
        self.validate()?;
        let inner = DenseCacheConfig::new(self.shape)
            .with_dtype(self.dtype)
            .init(device)?;
        Ok(QuestCache {
            config: self.clone(),
            device: device.clone(),
            inner,
            page_min: None,
            page_max: None,
        })
    }
}

/// A Quest cache for one layer: every token in a [`DenseCache`], plus per page and KV head
/// the channel-wise minimum and maximum of its keys (`2 · head_dim` values per page, counted
/// as metadata). See the module docs.
#[derive(Debug, Clone)]
pub struct QuestCache {
    config: QuestConfig,
    device: Device,
    inner: DenseCache,
    /// `[batch, kv_heads, pages, head_dim]` in the storage dtype.
    page_min: Option<Tensor<4>>,
    page_max: Option<Tensor<4>>,
}

impl QuestCache {
    /// The configuration.
    pub fn config(&self) -> &QuestConfig {
        &self.config
    }
    /// Slots held per sequence (padding included).
    pub fn len(&self) -> usize {
        self.inner.len()
    }
    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
    /// Pages held per (sequence, KV head).
    pub fn pages(&self) -> usize {
        self.len().div_ceil(self.config.page_size)
    }
    /// Channel-wise minima and maxima of the keys of every page in fp32,
    /// `[batch, kv_heads, pages, head_dim]` each (padding slots left out; a page of padding
    /// only holds zeros).
    pub fn page_min_max(&self) -> Option<(Tensor<4>, Tensor<4>)> {
        Some((
            self.page_min.clone()?.cast(FloatDType::F32),
            self.page_max.clone()?.cast(FloatDType::F32),
        ))
    }

    /// The upper bound `Σ_c max(q_c m_c, q_c M_c)` of every page for every query row:
    /// `[batch, q_heads, q_len, pages]` (unscaled, like `q·k`). `None` when nothing is held.
    ///
    /// # Errors
    /// Shape and finiteness problems of the query.
    pub fn page_bounds(&self, query: &Query) -> kv_core::Result<Option<Tensor<4>>> {
        check_query(&self.config.shape, query, "QuestCache::page_bounds")?;
        Ok(self.bounds(query.tensor()))
    }

    fn bounds(&self, q: &Tensor<4>) -> Option<Tensor<4>> {
        let (min, max) = self.page_min_max()?;
        let s = self.config.shape;
        let [b, qh, n, d] = q.dims();
        let (kvh, g) = (s.kv_heads(), s.group());
        let q = q.clone().reshape([b, kvh, g * n, d]);
        let pos = q.clone().clamp_min(0.0);
        let neg = q.clamp_max(0.0);
        let u = pos.matmul(max.swap_dims(2, 3)) + neg.matmul(min.swap_dims(2, 3));
        let pages = u.dims()[3];
        Some(u.reshape([b, qh, n, pages]))
    }

    /// The slots (indices into the held tokens, ascending) that a one-token query attends to,
    /// per sequence and query head (`batch * q_heads` lists), or `None` when the query takes
    /// the dense path (see the module docs).
    ///
    /// # Errors
    /// Shape and finiteness problems of the query.
    pub fn selected_slots(&self, query: &Query) -> kv_core::Result<Option<Vec<Vec<usize>>>> {
        check_query(&self.config.shape, query, "QuestCache::selected_slots")?;
        Ok(self
            .selection(query)
            .map(|(idx, ignore)| crate::select::read_selection(idx, Some(ignore))))
    }

    /// Recomputes the minima and maxima of the pages from `old_len` on.
    fn update_pages(&mut self, old_len: usize) {
        let s = self.config.shape;
        let p = self.config.page_size;
        let len = self.inner.len();
        let Some((keys, _)) = self.inner.tensors() else {
            return;
        };
        let (b, kvh, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let first = old_len / p;
        let start = first * p;
        let np = len.div_ceil(p) - first;
        let span = np * p;
        let positions = self.inner.flat_positions();
        let mut exclude = Vec::with_capacity(b * span);
        for bi in 0..b {
            for slot in start..start + span {
                exclude.push(slot >= len || positions[bi * len + slot] == PAD);
            }
        }
        let mut chunk = keys.slice([0..b, 0..kvh, start..len, 0..d]);
        if start + span > len {
            let pad = Tensor::zeros([b, kvh, start + span - len, d], &self.device);
            chunk = Tensor::cat(vec![chunk, pad], 2);
        }
        let exclude = bool_tensor(exclude, [b, 1, span, 1], &self.device).expand([b, kvh, span, d]);
        let reduce = |fill: f32, min: bool| {
            let x = chunk
                .clone()
                .mask_fill(exclude.clone(), fill)
                .reshape([b, kvh, np, p, d]);
            let r = if min { x.min_dim(3) } else { x.max_dim(3) };
            let r = r.reshape([b, kvh, np, d]);
            let infinite = r.clone().is_finite().bool_not();
            r.mask_fill(infinite, 0.0).cast(dtype_of(self.config.dtype))
        };
        let new_min = reduce(f32::INFINITY, true);
        let new_max = reduce(f32::NEG_INFINITY, false);
        let join = |old: Option<Tensor<4>>, new: Tensor<4>| match old {
            Some(old) if first > 0 => {
                Tensor::cat(vec![old.slice([0..b, 0..kvh, 0..first, 0..d]), new], 2)
            }
            _ => new,
        };
        self.page_min = Some(join(self.page_min.take(), new_min));
        self.page_max = Some(join(self.page_max.take(), new_max));
    }

    /// The selected slots `[batch, kv_heads, group, pages * P]` and the slots to ignore (past
    /// the held tokens), or `None` for the dense path.
    fn selection(&self, query: &Query) -> Option<(Tensor<4, Int>, Tensor<4, Bool>)> {
        if query.len() != 1 || self.is_empty() {
            return None;
        }
        let s = self.config.shape;
        let p = self.config.page_size;
        let len = self.len();
        let positions = self.inner.flat_positions();
        let (visible, counts) = visibility(&positions, len, query.positions());
        let most = counts.iter().copied().max().unwrap_or(0);
        let budget = self.config.budget.resolve(most);
        let pages = self.pages();
        let n_sel = (budget / p).max(1);
        if budget >= most || n_sel >= pages {
            return None;
        }
        let (b, kvh, g) = (s.batch(), s.kv_heads(), s.group());
        let mut page_visible = vec![false; b * pages];
        let mut forced = vec![false; b * pages];
        for bi in 0..b {
            let row = &visible[bi * len..(bi + 1) * len];
            for (slot, _) in row.iter().enumerate().filter(|(_, v)| **v) {
                page_visible[bi * pages + slot / p] = true;
            }
            if let Some(last) = row.iter().rposition(|&v| v) {
                forced[bi * pages + last / p] = true;
            }
        }
        let shape = [b, kvh, g, pages];
        let hidden = bool_tensor(page_visible, [b, 1, 1, pages], &self.device)
            .bool_not()
            .expand(shape);
        let forced = bool_tensor(forced, [b, 1, 1, pages], &self.device).expand(shape);
        let bounds = self
            .bounds(query.tensor())
            .expect("invariant: a non-empty cache has page bounds")
            .reshape(shape)
            .mask_fill(hidden, f32::NEG_INFINITY)
            .mask_fill(forced, f32::INFINITY);
        let (_, top) = bounds.topk_with_indices(n_sel, 3);
        let offsets = Tensor::<1, Int>::arange(0..p as i64, &self.device)
            .cast(burn::tensor::IntDType::from(top.dtype()))
            .reshape([1, 1, 1, 1, p])
            .expand([b, kvh, g, n_sel, p]);
        let slots = (top
            .reshape([b, kvh, g, n_sel, 1])
            .mul_scalar(p as i64)
            .expand([b, kvh, g, n_sel, p])
            + offsets)
            .reshape([b, kvh, g, n_sel * p]);
        let ignore = slots.clone().greater_equal_elem(len as i64);
        Some((slots.clamp_max(len as i64 - 1), ignore))
    }
}

pub(crate) fn dtype_of(d: StorageDtype) -> FloatDType {
    match d {
        StorageDtype::F32 => FloatDType::F32,
        StorageDtype::F16 => FloatDType::F16,
    }
}

impl KvCache for QuestCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        let old_len = self.inner.len();
        self.inner.append(block)?;
        self.update_pages(old_len);
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        check_query(&self.config.shape, query, "QuestCache::attend")?;
        let selected = select_unless_stats(stats, || self.attend_pages(query));
        selected_or_dense(selected, &mut self.inner, query, stats)
    }

    fn attend_lse(&mut self, query: &Query) -> kv_core::Result<(Tensor<4>, Tensor<4>)> {
        check_query(&self.config.shape, query, "QuestCache::attend_lse")?;
        selected_or_dense_lse(self.attend_pages(query), &mut self.inner, query)
    }

    fn view(&self) -> KvView {
        self.inner.view()
    }

    fn lengths(&self) -> Lengths {
        self.inner.lengths()
    }

    fn memory(&self) -> MemoryReport {
        let mut m = self.inner.memory();
        m.metadata_bytes += [&self.page_min, &self.page_max]
            .into_iter()
            .flatten()
            .map(|t| t.shape().num_elements() * t.dtype().size())
            .sum::<usize>();
        m
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = self.inner.held_buffers();
        for t in [&self.page_min, &self.page_max].into_iter().flatten() {
            out.push(HeldBuffer::tensor(StorageRole::Metadata, t));
        }
        out
    }

    fn reset(&mut self) {
        self.inner.reset();
        self.page_min = None;
        self.page_max = None;
    }
}

impl QuestCache {
    fn attend_pages(&self, query: &Query) -> Option<(Tensor<4>, Tensor<4>)> {
        let (idx, ignore) = self.selection(query)?;
        let (k, v) = self.inner.tensors()?;
        let s = self.config.shape;
        let kp = key_positions(
            &self.inner.flat_positions(),
            s.batch(),
            self.len(),
            &self.device,
        );
        Some(attend_selected(
            query.tensor(),
            query.positions(),
            k,
            v,
            kp,
            idx,
            Some(ignore),
        ))
    }
}
