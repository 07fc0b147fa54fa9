//! ClusterKV (Liu et al., 2024, arXiv 2412.03213): recallable selection by semantic clusters.
//! Every token is kept; at the end of prefill the keys of every (sequence, KV head) are
//! clustered with [`kmeans`](crate::kmeans()) into `clusters` groups, and a decode query ranks
//! the clusters by `q · centroid`, takes whole clusters in that order until the budget is
//! filled (the last one truncated), adds the sink tokens and attends exactly to the selection
//! (sjtu-zhao-lab/ClusterKV `accuracy/cluster_attention.py::cluster_attn_out`).
//!
//! # Deviations
//! - Metric: ClusterKV clusters by cosine similarity. Here the keys are normalised to unit
//!   length and clustered with Euclidean k-means (spherical k-means without re-normalising the
//!   centroids); the stored centroid of a cluster, which ranks it (`q · centroid`), is the
//!   mean of its members' raw keys, so that one cluster per token ranks exactly by `q · k`.
//! - Decode keys: ClusterKV buffers decode tokens and clusters them in chunks, attending to the
//!   buffer in full meanwhile. Here each appended key joins its nearest centroid at once, and
//!   the `recent` newest tokens (default 1: the current one) are always attended.
//! - Truncation inside the last cluster is by the device's top-k order, not by membership
//!   order; the cluster-level reuse cache is not implemented.
//!
//! # When it selects
//! One-token queries after the clustering, without statistics requests, when the budget is
//! below the tokens the query sees; everything else is the exact dense path. `end_prefill`
//! with fewer tokens than clusters is an [`KvError::InvalidConfig`] error that leaves the
//! cache unclustered (dense) and unchanged.

use burn::prelude::*;
use kv_core::{
    Attended, DenseCache, DenseCacheConfig, HeldBuffer, KvBlock, KvCache, KvError, KvShape, KvView,
    Lengths, MemoryReport, Query, StatsRequest, StorageDtype, StorageRole, check_query,
};
use serde::{Deserialize, Serialize};

use crate::budget::{self, Budget};
use crate::kmeans::{KMeansConfig, kmeans, one_hot};
use crate::select::{
    attend_selected, key_positions, select_unless_stats, selected_or_dense, selected_or_dense_lse,
};

fn default_clusters() -> usize {
    400
}
fn default_sinks() -> usize {
    16
}
fn default_recent() -> usize {
    1
}
fn default_iters() -> usize {
    20
}
fn default_tol() -> f64 {
    1e-4
}

/// Configuration of a [`ClusterKvCache`]. Defaults from ClusterKV's `accuracy/patch.py`: 400
/// clusters, 16 sinks, 20 k-means iterations; one recent token; k-means tolerance `1e-4`,
/// seed 0; fp32 storage. The budget has no default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterKvConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Tokens a decode query attends to, sinks and recent tokens included.
    pub budget: Budget,
    /// Clusters per (sequence, KV head) (ClusterKV's `nlist`).
    #[serde(default = "default_clusters")]
    pub clusters: usize,
    /// The first tokens of every sequence, always attended.
    #[serde(default = "default_sinks")]
    pub sinks: usize,
    /// The most recent tokens, always attended.
    #[serde(default = "default_recent")]
    pub recent: usize,
    /// The most k-means iterations (ClusterKV's `fit_iter`).
    #[serde(default = "default_iters")]
    pub kmeans_iters: usize,
    /// The k-means relative-objective tolerance.
    #[serde(default = "default_tol")]
    pub kmeans_tol: f64,
    /// The k-means++ seed.
    #[serde(default)]
    pub seed: u64,
    /// Element type of the stored keys, values and centroids.
    #[serde(default)]
    pub dtype: StorageDtype,
}

impl ClusterKvConfig {
    /// ClusterKV with `budget` and the defaults above.
    pub fn new(shape: KvShape, budget: Budget) -> Self {
        ClusterKvConfig {
            shape,
            budget,
            clusters: default_clusters(),
            sinks: default_sinks(),
            recent: default_recent(),
            kmeans_iters: default_iters(),
            kmeans_tol: default_tol(),
            seed: 0,
            dtype: StorageDtype::F32,
        }
    }
    /// Sets the number of clusters.
    pub fn with_clusters(mut self, clusters: usize) -> Self {
        self.clusters = clusters;
        self
    }
    /// Sets the sink and recent windows.
    pub fn with_windows(mut self, sinks: usize, recent: usize) -> Self {
        self.sinks = sinks;
        self.recent = recent;
        self
    }
    /// Sets the k-means iteration cap, tolerance and seed.
    pub fn with_kmeans(mut self, iters: usize, tol: f64, seed: u64) -> Self {
        self.kmeans_iters = iters;
        self.kmeans_tol = tol;
        self.seed = seed;
        self
    }
    /// Sets the storage dtype.
    pub fn with_dtype(mut self, dtype: StorageDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &[
        "budget", "clusters", "sinks", "recent", "iters", "tol", "seed", "dtype",
    ];

    /// A config from `key=value` parameters: `budget` (required: a token count such as `1024`
    /// or a fraction such as `0.1`), `clusters`, `sinks`, `recent`, `iters`, `seed`
    /// (integers), `tol` (a number) and `dtype` (`f32` or `f16`). The result is not validated
    /// until [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the parameter for an unknown name, a value that does
    /// not parse or a missing budget.
    pub fn from_params<'a>(
        shape: KvShape,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        let mut cfg = ClusterKvConfig::new(shape, Budget::Tokens(1));
        let mut b = None;
        for (k, v) in params {
            match k {
                "budget" => b = Some(Budget::parse("budget", v)?),
                "clusters" => cfg.clusters = budget::int("clusters", v)?,
                "sinks" => cfg.sinks = budget::int("sinks", v)?,
                "recent" => cfg.recent = budget::int("recent", v)?,
                "iters" => cfg.kmeans_iters = budget::int("iters", v)?,
                "tol" => cfg.kmeans_tol = budget::float("tol", v)?,
                "seed" => cfg.seed = budget::int("seed", v)? as u64,
                "dtype" => cfg.dtype = budget::dtype("dtype", v)?,
                _ => return Err(budget::unknown("ClusterKV", k, Self::PARAMS)),
            }
        }
        cfg.budget = b.ok_or_else(|| budget::missing("budget", "tokens attended per query"))?;
        Ok(cfg)
    }

    fn kmeans(&self) -> KMeansConfig {
        KMeansConfig::new(self.clusters)
            .with_max_iters(self.kmeans_iters)
            .with_tol(self.kmeans_tol)
            .with_seed(self.seed)
    }

    /// Checks the config (the token count for clustering is checked at `end_prefill`).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for zero clusters, a zero or out-of-range budget, a token
    /// budget not larger than `sinks + recent`, or a bad k-means tolerance.
    pub fn validate(&self) -> kv_core::Result<()> {
        self.kmeans().validate(usize::MAX).map_err(|e| match e {
            KvError::InvalidConfig { field: "k", reason } => KvError::InvalidConfig {
                field: "clusters",
                reason,
            },
            e => e,
        })?;
        self.budget.validate("budget")?;
        if let Budget::Tokens(n) = self.budget
            && n <= self.sinks + self.recent
        {
            return Err(KvError::InvalidConfig {
                field: "budget",
                reason: format!(
                    "{n} tokens leave nothing for clusters after {} sinks and {} recent tokens",
                    self.sinks, self.recent
                ),
            });
        }
        Ok(())
    }

    /// Builds the cache.
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn init(&self, device: &Device) -> kv_core::Result<ClusterKvCache> {
        self.validate()?;
        let inner = DenseCacheConfig::new(self.shape)
            .with_dtype(self.dtype)
            .init(device)?;
        Ok(ClusterKvCache {
            config: self.clone(),
            device: device.clone(),
            inner,
            centroids: None,
            members: None,
        })
    }
}

/// A ClusterKV cache for one layer: every token in a [`DenseCache`], plus, once the prefill
/// ends, the centroids per (sequence, KV head) and every token's cluster (counted as key
/// bytes). See the module docs.
#[derive(Debug, Clone)]
pub struct ClusterKvCache {
    config: ClusterKvConfig,
    device: Device,
    inner: DenseCache,
    /// Mean raw key per cluster, `[batch * kv_heads, clusters, head_dim]`, storage dtype.
    centroids: Option<Tensor<3>>,
    /// `[batch * kv_heads, len]`, the cluster of every token (`u16` up to 65536 clusters).
    members: Option<Tensor<2, Int>>,
}

fn member_dtype(clusters: usize) -> burn::tensor::IntDType {
    if clusters <= 1 << 16 {
        burn::tensor::IntDType::U16
    } else {
        burn::tensor::IntDType::U32
    }
}

/// Rows scaled to unit length (zero rows stay zero).
fn normalise(x: Tensor<3>) -> Tensor<3> {
    let norm = x.clone().powi_scalar(2).sum_dim(2).sqrt().clamp_min(1e-12);
    x / norm
}

impl ClusterKvCache {
    /// The configuration.
    pub fn config(&self) -> &ClusterKvConfig {
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
    /// Whether the keys are clustered.
    pub fn is_clustered(&self) -> bool {
        self.centroids.is_some()
    }
    /// The cluster of every held token per (sequence, KV head) (`batch * kv_heads` lists), once
    /// clustered.
    pub fn memberships(&self) -> Option<Vec<Vec<usize>>> {
        let m = self.members.as_ref()?;
        let len = m.dims()[1];
        let v = m
            .to_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .expect("invariant: int tensors read back as i64");
        Some(
            v.chunks(len.max(1))
                .map(|r| r.iter().map(|&x| x as usize).collect())
                .collect(),
        )
    }

    /// The slots a one-token query attends to, per sequence and query head (`batch * q_heads`
    /// lists, ascending), or `None` for the dense path.
    ///
    /// # Errors
    /// Shape and finiteness problems of the query.
    pub fn selected_slots(&self, query: &Query) -> kv_core::Result<Option<Vec<Vec<usize>>>> {
        check_query(&self.config.shape, query, "ClusterKvCache::selected_slots")?;
        Ok(self
            .selection(query)
            .map(|idx| crate::select::read_selection(idx, None)))
    }

    /// Every token scored by its cluster's `q · centroid`, `[batch, kv_heads, group, len]`.
    fn scores(&self, q: &Tensor<4>) -> Option<Tensor<4>> {
        let (c, m) = (self.centroids.clone()?, self.members.clone()?);
        let s = self.config.shape;
        let [b, _, n, d] = q.dims();
        let rows = s.group() * n;
        let len = self.len();
        let cs = q
            .clone()
            .reshape([s.streams(), rows, d])
            .matmul(c.cast(burn::tensor::FloatDType::F32).swap_dims(1, 2)); // [streams, rows, clusters]
        let idx = m
            .cast(burn::tensor::IntDType::I32)
            .reshape([s.streams(), 1, len])
            .expand([s.streams(), rows, len]);
        Some(cs.gather(2, idx).reshape([b, s.kv_heads(), rows, len]))
    }

    fn selection(&self, query: &Query) -> Option<Tensor<4, Int>> {
        if query.len() != 1 || self.centroids.is_none() || self.is_empty() {
            return None;
        }
        let c = &self.config;
        crate::select::top_tokens(
            c.shape,
            &self.inner.flat_positions(),
            self.len(),
            query.positions(),
            c.sinks,
            c.recent,
            |most| c.budget.resolve(most).max(c.sinks + c.recent),
            || {
                self.scores(query.tensor())
                    .expect("invariant: a clustered cache scores")
            },
            &self.device,
        )
    }

    fn attend_selected(&self, query: &Query) -> Option<(Tensor<4>, Tensor<4>)> {
        let idx = self.selection(query)?;
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
            None,
        ))
    }

    /// Held keys from slot `from` on, `[streams, len - from, head_dim]`.
    fn keys_from(&self, from: usize) -> Option<Tensor<3>> {
        let (k, _) = self.inner.tensors()?;
        let s = self.config.shape;
        let len = self.len();
        Some(
            k.slice([0..s.batch(), 0..s.kv_heads(), from..len, 0..s.head_dim()])
                .reshape([s.streams(), len - from, s.head_dim()]),
        )
    }
}

impl KvCache for ClusterKvCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        let old_len = self.inner.len();
        self.inner.append(block)?;
        if let Some(c) = &self.centroids {
            let x = self
                .keys_from(old_len)
                .expect("invariant: a cache that just appended holds keys");
            let [g, n, _] = x.dims();
            // The largest cosine similarity to the (normalised) centroids.
            let c = normalise(c.clone().cast(burn::tensor::FloatDType::F32));
            let new = x
                .matmul(c.swap_dims(1, 2))
                .argmax(2)
                .reshape([g, n])
                .cast(member_dtype(self.config.clusters));
            self.members = Some(match self.members.take() {
                Some(old) => Tensor::cat(vec![old, new], 1),
                None => new,
            });
        }
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        check_query(&self.config.shape, query, "ClusterKvCache::attend")?;
        let selected = select_unless_stats(stats, || self.attend_selected(query));
        selected_or_dense(selected, &mut self.inner, query, stats)
    }

    fn attend_lse(&mut self, query: &Query) -> kv_core::Result<(Tensor<4>, Tensor<4>)> {
        check_query(&self.config.shape, query, "ClusterKvCache::attend_lse")?;
        selected_or_dense_lse(self.attend_selected(query), &mut self.inner, query)
    }

    /// Clusters every held key (once; later calls do nothing).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] when fewer tokens are held than clusters; the cache is
    /// unchanged and stays unclustered (dense).
    fn end_prefill(&mut self) -> kv_core::Result<()> {
        if self.centroids.is_some() {
            return Ok(());
        }
        let Some(keys) = self.keys_from(0) else {
            return Ok(());
        };
        let fit = kmeans(normalise(keys.clone()), &self.config.kmeans()).map_err(|e| match e {
            KvError::InvalidConfig { reason, .. } => KvError::InvalidConfig {
                field: "clusters",
                reason: format!("ClusterKvCache::end_prefill: {reason}"),
            },
            e => e,
        })?;
        let [g, k, d] = fit.centroids.dims();
        let hot = one_hot(&fit.assignments, k); // [g, n, k]
        let counts = hot.clone().sum_dim(1).reshape([g, k, 1]).clamp_min(1.0);
        let means = hot.swap_dims(1, 2).matmul(keys) / counts;
        debug_assert_eq!(means.dims(), [g, k, d]);
        self.centroids = Some(means.cast(crate::quest::dtype_of(self.config.dtype)));
        self.members = Some(fit.assignments.cast(member_dtype(self.config.clusters)));
        Ok(())
    }

    fn view(&self) -> KvView {
        self.inner.view()
    }

    fn lengths(&self) -> Lengths {
        self.inner.lengths()
    }

    fn memory(&self) -> MemoryReport {
        let mut m = self.inner.memory();
        if let Some(c) = &self.centroids {
            m.key_bytes += c.shape().num_elements() * c.dtype().size();
        }
        if let Some(t) = &self.members {
            m.key_bytes += t.shape().num_elements() * t.dtype().size();
        }
        m
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = self.inner.held_buffers();
        if let Some(c) = &self.centroids {
            out.push(HeldBuffer::tensor(StorageRole::Keys, c));
        }
        if let Some(t) = &self.members {
            out.push(HeldBuffer::tensor(StorageRole::Keys, t));
        }
        out
    }

    fn reset(&mut self) {
        self.inner.reset();
        self.centroids = None;
        self.members = None;
    }
}
