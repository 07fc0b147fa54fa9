//! Merge-on-evict after CaM (Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs
//! Inference", ICML 2024; official code zyxxmu/cam): a sinks + recent-window eviction whose
//! evicted values are folded into the kept tokens that follow them instead of being dropped.

use burn::prelude::*;
use kv_core::{
    Attended, HeldBuffer, KvBlock, KvCache, KvError, KvShape, KvView, Lengths, MemoryReport, PAD,
    Query, Result, StatsRequest, StorageDtype, StorageRole, check_block, check_positions,
    check_query,
};
use serde::{Deserialize, Serialize};

use crate::storage::{Slots, matrix, to_host};

/// Configuration of a [`MergeEvictCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeEvictConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// First tokens always kept (attention sinks; CaM's `start_budget`).
    pub sinks: usize,
    /// Most recent tokens kept (CaM's `recent_budget`).
    pub recent: usize,
    /// Kept tokens following an evicted one that share its value (CaM's `merge_budget`,
    /// 32 in the official code).
    pub merge_window: usize,
    /// Element type of the stored keys and values (default fp32).
    #[serde(default)]
    pub dtype: StorageDtype,
}

impl MergeEvictConfig {
    /// `sinks` + `recent` kept tokens, each evicted value shared by the next `merge_window`
    /// kept tokens, fp32 storage.
    pub fn new(shape: KvShape, sinks: usize, recent: usize, merge_window: usize) -> Self {
        MergeEvictConfig {
            shape,
            sinks,
            recent,
            merge_window,
            dtype: StorageDtype::F32,
        }
    }

    /// Sets the storage dtype.
    pub fn with_dtype(mut self, dtype: StorageDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &["sinks", "recent", "merge_window", "dtype"];

    /// A config from `key=value` parameters: `sinks` (default 4), `recent` (required: a
    /// token budget is never invented), `merge_window` (default 32, as CaM's code) and
    /// `dtype` (`f32` or `f16`). Validated by [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the parameter for an unknown name, a value that does
    /// not parse or a missing `recent`.
    pub fn from_params<'a>(
        shape: KvShape,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self> {
        let bad = |field: &'static str, reason: String| KvError::InvalidConfig { field, reason };
        let int = |field: &'static str, v: &str| {
            v.parse::<usize>()
                .map_err(|_| bad(field, format!("`{v}` is not a token count")))
        };
        let (mut sinks, mut recent, mut window, mut dtype) = (4, None, 32, StorageDtype::F32);
        for (k, v) in params {
            match k {
                "sinks" => sinks = int("sinks", v)?,
                "recent" => recent = Some(int("recent", v)?),
                "merge_window" => window = int("merge_window", v)?,
                "dtype" => {
                    dtype = match v {
                        "f32" | "fp32" => StorageDtype::F32,
                        "f16" | "fp16" => StorageDtype::F16,
                        _ => return Err(bad("dtype", format!("`{v}` is not f16 or f32"))),
                    };
                }
                _ => {
                    return Err(bad(
                        "params",
                        format!(
                            "unknown merge-on-evict parameter `{k}`; accepted: {}",
                            Self::PARAMS.join(", ")
                        ),
                    ));
                }
            }
        }
        let recent = recent.ok_or_else(|| {
            bad(
                "recent",
                "the recent-window budget (tokens) must be given".into(),
            )
        })?;
        Ok(MergeEvictConfig::new(shape, sinks, recent, window).with_dtype(dtype))
    }

    /// Validates and builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for `recent == 0` (evicted values would have nowhere to
    /// go) or `merge_window == 0`.
    pub fn init(&self, device: &Device) -> Result<MergeEvictCache> {
        if self.recent == 0 {
            return Err(KvError::InvalidConfig {
                field: "recent",
                reason: "must be at least 1: evicted values are merged into recent tokens".into(),
            });
        }
        if self.merge_window == 0 {
            return Err(KvError::InvalidConfig {
                field: "merge_window",
                reason: "must be at least 1 token".into(),
            });
        }
        Ok(MergeEvictCache {
            config: self.clone(),
            slots: Slots::new(self.shape, self.dtype, device),
            attention: vec![Vec::new(); self.shape.streams()],
        })
    }
}

/// A sinks + recent-window cache (StreamingLLM's budget, as CaM's official code) that merges
/// each evicted token's value into the kept tokens after it.
///
/// # The rule
/// When a stream holds more than `sinks + recent` slots, the slots between the sinks and the
/// recent window go. For each evicted slot `e`, with `a_j` the attention that the last query
/// gave slot `j` (mean over the query heads of the KV head, from the latest
/// [`attend`](KvCache::attend)), CaM's merge probability is
/// `p_e = min(1, a_e / mean_{j kept} a_j)`; the next `m = merge_window` kept slots after `e`
/// (fewer when fewer follow) each receive `v_e` with weight `w = p_e / m`:
///
/// ```text
/// v_j ← (μ_j·v_j + w·v_e) / (μ_j + w),   μ_j ← μ_j + w
/// ```
///
/// where `μ_j` (initially 1) is the slot's accumulated mass. Keys are not merged (CaM merges
/// values only). Deviations from CaM: `p_e` is used as a weight (the expectation of CaM's
/// Bernoulli mask) so runs are deterministic, and the slot is renormalised so that every
/// value stays a convex combination of appended values (CaM adds `v_e·mask/m` without
/// renormalising). A slot whose attention was never observed is evicted without merging.
///
/// Eviction happens at the next [`append`](KvCache::append) (before the new tokens are
/// stored) and at [`end_prefill`](KvCache::end_prefill), as `kv-evict`'s H2O does, so every
/// query sees `sinks + recent` slots plus its own block. Slots evicted together in one round
/// (after a long prefill) are merged only into survivors; decode evicts one slot per step,
/// and a merged slot carries its merges on when it is evicted in turn, as in CaM.
#[derive(Debug, Clone)]
pub struct MergeEvictCache {
    config: MergeEvictConfig,
    slots: Slots,
    /// Per stream and held slot, the last query's attention (NaN: never observed).
    attention: Vec<Vec<f32>>,
}

impl MergeEvictCache {
    /// The configuration.
    pub fn config(&self) -> &MergeEvictConfig {
        &self.config
    }

    /// The accumulated mass `μ` of every held slot, one list per (sequence, KV head).
    pub fn masses(&self) -> Vec<Vec<f32>> {
        self.slots.streams.iter().map(|s| s.mass.clone()).collect()
    }

    /// Evicts every stream over budget now, merging the evicted values.
    ///
    /// # Errors
    /// A failed device readback (not expected).
    pub fn evict(&mut self) -> Result<()> {
        let (sinks, recent) = (self.config.sinks, self.config.recent);
        let m = self.config.merge_window;
        let device = self.slots.device.clone();
        for si in 0..self.slots.streams.len() {
            let len = self.slots.streams[si].len();
            if len <= sinks + recent {
                continue;
            }
            let kept: Vec<usize> = (0..sinks).chain(len - recent..len).collect();
            let st = &self.slots.streams[si];
            let att = &self.attention[si];
            let known: Vec<f32> = kept
                .iter()
                .map(|&j| att[j])
                .filter(|a| !a.is_nan())
                .collect();
            let mean = known.iter().sum::<f32>() / known.len().max(1) as f32;
            // Fold matrix [kept, held]: row r starts with the slot itself at its mass.
            let mut f = vec![0.0f32; kept.len() * len];
            let mut mass: Vec<f32> = kept.iter().map(|&j| st.mass[j]).collect();
            for (r, &j) in kept.iter().enumerate() {
                f[r * len + j] = st.mass[j];
            }
            for e in sinks..len - recent {
                let a = att[e];
                if a.is_nan() || known.is_empty() || mean <= 0.0 {
                    continue;
                }
                let p = (a / mean).clamp(0.0, 1.0);
                if p == 0.0 {
                    continue;
                }
                let w = p / m as f32;
                // The kept slots after `e` are the recent window, rows `sinks..`.
                for r in sinks..(sinks + m).min(kept.len()) {
                    f[r * len + e] += w;
                    mass[r] += w;
                }
            }
            for (r, &mu) in mass.iter().enumerate() {
                f[r * len..(r + 1) * len].iter_mut().for_each(|x| *x /= mu);
            }
            let (k, v) = st
                .held()
                .expect("invariant: a non-empty stream holds buffers");
            let ids: Vec<i32> = kept.iter().map(|&j| j as i32).collect();
            let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [kept.len()]), &device);
            let k = k.select(0, ids);
            let v = matrix(f, kept.len(), len, &device).matmul(v);
            let positions = kept.iter().map(|&j| st.positions[j]).collect();
            let kept_attention: Vec<f32> = kept.iter().map(|&j| att[j]).collect();
            self.attention[si] = kept_attention;
            self.slots.replace(si, Some((k, v)), positions, mass);
        }
        Ok(())
    }
}

impl KvCache for MergeEvictCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.slots.device
    }

    fn append(&mut self, block: KvBlock) -> Result<()> {
        const OP: &str = "MergeEvictCache::append";
        let s = self.config.shape;
        check_block(&s, &block, OP)?;
        let counts = check_positions(block.positions(), s.batch(), &self.slots.last_seen, OP)?;
        self.evict()?;
        let n = block.seq_len();
        let (kvh, d) = (s.kv_heads(), s.head_dim());
        let device = self.slots.device.clone();
        let (keys, values, positions) = block.into_parts();
        for b in 0..s.batch() {
            let row = &positions[b * n..(b + 1) * n];
            let kept: Vec<usize> = (0..n).filter(|&i| row[i] != PAD).collect();
            if kept.is_empty() {
                continue;
            }
            let ids = (kept.len() < n).then(|| {
                let ids: Vec<i32> = kept.iter().map(|&i| i as i32).collect();
                Tensor::<1, Int>::from_data(TensorData::new(ids, [kept.len()]), &device)
            });
            let pos: Vec<u32> = kept.iter().map(|&i| row[i]).collect();
            for h in 0..kvh {
                let take = |t: &Tensor<4>| {
                    let t = t
                        .clone()
                        .slice([b..b + 1, h..h + 1, 0..n, 0..d])
                        .reshape([n, d]);
                    match &ids {
                        Some(ids) => t.select(0, ids.clone()),
                        None => t,
                    }
                };
                let si = b * kvh + h;
                self.slots.write_tail(
                    si,
                    false,
                    take(&keys),
                    take(&values),
                    &pos,
                    &vec![1.0; kept.len()],
                );
                self.attention[si].extend(core::iter::repeat_n(f32::NAN, kept.len()));
            }
            self.slots.logical[b] += counts[b];
            self.slots.last_seen[b] = pos.last().copied();
        }
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> Result<Attended> {
        check_query(&self.config.shape, query, "MergeEvictCache::attend")?;
        let request = StatsRequest {
            column_sums: stats.column_sums,
            last_row: true,
        };
        let (output, mut got) = self.slots.attend(query, request, false);
        if let Some(last) = got.last_row.clone() {
            let [b, kvh, _, width] = last.dims();
            if width > 0 {
                let mean = to_host(last.mean_dim(2).reshape([b, kvh, width]))?;
                for si in 0..b * kvh {
                    let len = self.slots.streams[si].len();
                    self.attention[si] = mean[si * width..si * width + len].to_vec();
                }
            }
        }
        if !stats.last_row {
            got.last_row = None;
        }
        Ok(Attended { output, stats: got })
    }

    fn end_prefill(&mut self) -> Result<()> {
        self.evict()
    }

    fn view(&self) -> KvView {
        self.slots.view()
    }

    fn lengths(&self) -> Lengths {
        self.slots.lengths()
    }

    fn memory(&self) -> MemoryReport {
        let mut m = self.slots.memory();
        m.metadata_bytes += self
            .attention
            .iter()
            .map(|a| core::mem::size_of_val(a.as_slice()))
            .sum::<usize>();
        m
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = self.slots.held_buffers();
        out.extend(
            self.attention
                .iter()
                .map(|a| HeldBuffer::host(StorageRole::Metadata, a)),
        );
        out
    }

    fn reset(&mut self) {
        self.slots.reset();
        self.attention.iter_mut().for_each(Vec::clear);
    }
}
