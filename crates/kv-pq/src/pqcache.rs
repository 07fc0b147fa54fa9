//! PQCache (Zhang et al., 2024, arXiv 2407.12820): product-quantized keys for maximum
//! inner-product search over the cache. Every token is kept; at the end of prefill the keys of
//! every (sequence, KV head) are product-quantized (`m` subspaces, `2^bits` centroids each,
//! trained with [`kmeans`](crate::kmeans())), later keys are encoded on append with the same
//! codebooks, and a decode query scores every token from a look-up table of query–centroid
//! inner products, then attends exactly to the sink tokens, the most recent tokens and the
//! `top_k` best-scoring others (HugoZHL/PQCache, `vq_method/`).
//!
//! # Memory: two tiers
//! The paper keeps the full keys and values in CPU memory and only the codes, codebooks and
//! the few fetched tokens on the GPU. This cache holds both tiers on one device, and its
//! [`MemoryReport`] counts **everything held**: the full K/V (in the inner
//! [`DenseCache`]), plus codes (one byte per code, even below 8 bits) and codebooks as key
//! bytes. It is therefore larger than a dense cache; [`PqCache::tiers`] splits the bytes
//! into the fast tier (codes + codebooks) and the full K/V.
//!
//! # When it selects
//! Only one-token queries (decode) after the codebooks are trained select; prefill queries,
//! calls that request attention statistics, an untrained cache and a budget
//! (`sinks + recent + top_k`) at least as large as the tokens the query sees use the dense
//! path, which is exact. Training needs at least `2^bits` tokens: `end_prefill` on fewer is an
//! [`KvError::InvalidConfig`] error that leaves the cache untrained (and dense) and unchanged.
//! Padding slots take part in the clustering (they are stored) but are never attended.

use burn::prelude::*;
use kv_core::{
    Attended, DenseCache, DenseCacheConfig, HeldBuffer, KvBlock, KvCache, KvError, KvShape, KvView,
    Lengths, MemoryReport, Query, StatsRequest, StorageDtype, StorageRole, check_query,
};
use serde::{Deserialize, Serialize};

use crate::budget::{self, Budget};
use crate::kmeans::KMeansConfig;
use crate::pq::ProductQuantizer;
use crate::select::{
    attend_selected, key_positions, select_unless_stats, selected_or_dense, selected_or_dense_lse,
};

fn default_subspaces() -> usize {
    2
}
fn default_bits() -> u32 {
    6
}
fn default_window() -> usize {
    32
}
fn default_iters() -> usize {
    25
}
fn default_tol() -> f64 {
    1e-4
}

/// Configuration of a [`PqCache`]. Defaults from PQCache's `run_llama.sh`: 2 subspaces per
/// head, 6 bits (64 centroids), 32 sink and 32 recent tokens; k-means with at most 25
/// iterations, tolerance `1e-4`, seed 0; fp32 storage. `top_k` has no default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PqCacheConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Tokens retrieved by PQ score per decode query, besides the sinks and recent tokens.
    pub top_k: Budget,
    /// Subspaces `m` per head (must divide `head_dim`).
    #[serde(default = "default_subspaces")]
    pub subspaces: usize,
    /// Bits per code: `2^bits` centroids per subspace (1 to 8).
    #[serde(default = "default_bits")]
    pub bits: u32,
    /// The first tokens of every sequence, always attended.
    #[serde(default = "default_window")]
    pub sinks: usize,
    /// The most recent tokens, always attended.
    #[serde(default = "default_window")]
    pub recent: usize,
    /// The most k-means iterations.
    #[serde(default = "default_iters")]
    pub kmeans_iters: usize,
    /// The k-means relative-objective tolerance.
    #[serde(default = "default_tol")]
    pub kmeans_tol: f64,
    /// The k-means++ seed.
    #[serde(default)]
    pub seed: u64,
    /// Element type of the stored keys and values.
    #[serde(default)]
    pub dtype: StorageDtype,
}

impl PqCacheConfig {
    /// PQCache with `top_k` retrieved tokens and the defaults above.
    pub fn new(shape: KvShape, top_k: Budget) -> Self {
        PqCacheConfig {
            shape,
            top_k,
            subspaces: default_subspaces(),
            bits: default_bits(),
            sinks: default_window(),
            recent: default_window(),
            kmeans_iters: default_iters(),
            kmeans_tol: default_tol(),
            seed: 0,
            dtype: StorageDtype::F32,
        }
    }
    /// Sets the subspaces `m` and bits per code.
    pub fn with_pq(mut self, subspaces: usize, bits: u32) -> Self {
        self.subspaces = subspaces;
        self.bits = bits;
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
        "top_k",
        "subspaces",
        "bits",
        "sinks",
        "recent",
        "iters",
        "tol",
        "seed",
        "dtype",
    ];

    /// A config from `key=value` parameters: `top_k` (required: a token count such as `256` or
    /// a fraction such as `0.1` of the tokens a query sees), `subspaces`, `bits`, `sinks`,
    /// `recent`, `iters`, `seed` (integers), `tol` (a number) and `dtype` (`f32` or `f16`).
    /// The result is not validated until [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the parameter for an unknown name, a value that does
    /// not parse or a missing `top_k`.
    pub fn from_params<'a>(
        shape: KvShape,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        let mut cfg = PqCacheConfig::new(shape, Budget::Tokens(1));
        let mut top_k = None;
        for (k, v) in params {
            match k {
                "top_k" => top_k = Some(Budget::parse("top_k", v)?),
                "subspaces" => cfg.subspaces = budget::int("subspaces", v)?,
                "bits" => {
                    cfg.bits = v
                        .parse()
                        .map_err(|_| budget::bad("bits", v, "a bit width (1 to 8)"))?;
                }
                "sinks" => cfg.sinks = budget::int("sinks", v)?,
                "recent" => cfg.recent = budget::int("recent", v)?,
                "iters" => cfg.kmeans_iters = budget::int("iters", v)?,
                "tol" => cfg.kmeans_tol = budget::float("tol", v)?,
                "seed" => cfg.seed = budget::int("seed", v)? as u64,
                "dtype" => cfg.dtype = budget::dtype("dtype", v)?,
                _ => return Err(budget::unknown("PQCache", k, Self::PARAMS)),
            }
        }
        cfg.top_k = top_k.ok_or_else(|| budget::missing("top_k", "tokens retrieved per query"))?;
        Ok(cfg)
    }

    fn kmeans(&self) -> KMeansConfig {
        KMeansConfig::new(1usize << self.bits.min(crate::pq::MAX_BITS))
            .with_max_iters(self.kmeans_iters)
            .with_tol(self.kmeans_tol)
            .with_seed(self.seed)
    }

    /// Checks the config (the token count for training is checked at `end_prefill`).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for subspaces that do not divide `head_dim`, bits outside
    /// 1 to 8, a zero or out-of-range `top_k` or a bad k-means tolerance.
    pub fn validate(&self) -> kv_core::Result<()> {
        ProductQuantizer::validate(self.shape.head_dim(), self.subspaces, self.bits, usize::MAX)?;
        self.top_k.validate("top_k")?;
        self.kmeans().validate(usize::MAX)
    }

    /// Builds the cache.
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn init(&self, device: &Device) -> kv_core::Result<PqCache> {
        self.validate()?;
        let inner = DenseCacheConfig::new(self.shape)
            .with_dtype(self.dtype)
            .init(device)?;
        Ok(PqCache {
            config: self.clone(),
            device: device.clone(),
            inner,
            pq: None,
            codes: None,
        })
    }
}

/// Bytes of a [`PqCache`] by tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PqMemory {
    /// PQ codes of every held key (one byte per code).
    pub code_bytes: usize,
    /// The codebooks.
    pub codebook_bytes: usize,
    /// The full keys and values (growth slack included).
    pub full_kv_bytes: usize,
    /// Positions.
    pub metadata_bytes: usize,
}

impl PqMemory {
    /// What PQCache keeps on the accelerator besides the fetched tokens: codes + codebooks.
    pub fn fast_tier_bytes(&self) -> usize {
        self.code_bytes + self.codebook_bytes
    }
    /// Everything held (what [`MemoryReport::stored_bytes`] reports).
    pub fn total_bytes(&self) -> usize {
        self.code_bytes + self.codebook_bytes + self.full_kv_bytes + self.metadata_bytes
    }
}

/// A PQCache cache for one layer. See the module docs.
#[derive(Debug, Clone)]
pub struct PqCache {
    config: PqCacheConfig,
    device: Device,
    inner: DenseCache,
    pq: Option<ProductQuantizer>,
    /// `[batch * kv_heads, len, m]`, `u8`.
    codes: Option<Tensor<3, Int>>,
}

impl PqCache {
    /// The configuration.
    pub fn config(&self) -> &PqCacheConfig {
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
    /// Whether the codebooks are trained.
    pub fn is_trained(&self) -> bool {
        self.pq.is_some()
    }
    /// The quantizers (one per sequence and KV head, row-major), once trained.
    pub fn quantizer(&self) -> Option<&ProductQuantizer> {
        self.pq.as_ref()
    }
    /// The codes of every held key, `[batch * kv_heads, len, m]`, once trained.
    pub fn codes(&self) -> Option<&Tensor<3, Int>> {
        self.codes.as_ref()
    }
    /// The keys as the codes reconstruct them, `[batch, kv_heads, len, head_dim]`.
    pub fn reconstructed_keys(&self) -> Option<Tensor<4>> {
        let (pq, codes) = (self.pq.as_ref()?, self.codes.clone()?);
        let s = self.config.shape;
        Some(
            pq.decode(codes)
                .reshape([s.batch(), s.kv_heads(), self.len(), s.head_dim()]),
        )
    }
    /// Bytes by tier.
    pub fn tiers(&self) -> PqMemory {
        let m = self.inner.memory();
        PqMemory {
            code_bytes: self
                .codes
                .as_ref()
                .map_or(0, |c| c.shape().num_elements() * c.dtype().size()),
            codebook_bytes: self.pq.as_ref().map_or(0, ProductQuantizer::codebook_bytes),
            full_kv_bytes: m.key_bytes + m.value_bytes,
            metadata_bytes: m.metadata_bytes,
        }
    }

    /// The slots (indices into the held tokens, ascending) that a one-token query attends to,
    /// per sequence and query head (`batch * q_heads` lists), or `None` when the query takes
    /// the dense path (see the module docs).
    ///
    /// # Errors
    /// Shape and finiteness problems of the query.
    pub fn selected_slots(&self, query: &Query) -> kv_core::Result<Option<Vec<Vec<usize>>>> {
        check_query(&self.config.shape, query, "PqCache::selected_slots")?;
        Ok(self
            .selection(query)
            .map(|idx| crate::select::read_selection(idx, None)))
    }

    /// Approximate scores `q · k̂` of every held token from the look-up tables,
    /// `[batch, q_heads, q_len, len]`, once trained.
    ///
    /// # Errors
    /// Shape and finiteness problems of the query.
    pub fn approximate_scores(&self, query: &Query) -> kv_core::Result<Option<Tensor<4>>> {
        check_query(&self.config.shape, query, "PqCache::approximate_scores")?;
        Ok(self.scores(query.tensor()))
    }

    fn scores(&self, q: &Tensor<4>) -> Option<Tensor<4>> {
        let (pq, codes) = (self.pq.as_ref()?, self.codes.clone()?);
        let s = self.config.shape;
        let [b, qh, n, d] = q.dims();
        let q = q.clone().reshape([s.streams(), s.group() * n, d]);
        Some(pq.scores(q, codes).reshape([b, qh, n, self.len()]))
    }

    fn selection(&self, query: &Query) -> Option<Tensor<4, Int>> {
        if query.len() != 1 || self.pq.is_none() || self.is_empty() {
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
            |most| c.sinks + c.recent + c.top_k.resolve(most),
            || {
                self.scores(query.tensor())
                    .expect("invariant: a ready cache scores")
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

    /// The held keys in fp32 as `[streams, len, head_dim]`, from slot `from` on.
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

fn to_u8(codes: Tensor<3, Int>) -> Tensor<3, Int> {
    codes.cast(burn::tensor::IntDType::U8)
}

impl KvCache for PqCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        let old_len = self.inner.len();
        self.inner.append(block)?;
        if let Some(pq) = &self.pq {
            let new = self
                .keys_from(old_len)
                .expect("invariant: a cache that just appended holds keys");
            let codes = to_u8(pq.encode(new));
            self.codes = Some(match self.codes.take() {
                Some(old) => Tensor::cat(vec![old, codes], 1),
                None => codes,
            });
        }
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        check_query(&self.config.shape, query, "PqCache::attend")?;
        let selected = select_unless_stats(stats, || self.attend_selected(query));
        selected_or_dense(selected, &mut self.inner, query, stats)
    }

    fn attend_lse(&mut self, query: &Query) -> kv_core::Result<(Tensor<4>, Tensor<4>)> {
        check_query(&self.config.shape, query, "PqCache::attend_lse")?;
        selected_or_dense_lse(self.attend_selected(query), &mut self.inner, query)
    }

    /// Trains the codebooks on every held key (once; later calls do nothing).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] when fewer tokens are held than `2^bits` centroids; the
    /// cache is unchanged and stays untrained (dense).
    fn end_prefill(&mut self) -> kv_core::Result<()> {
        if self.pq.is_some() {
            return Ok(());
        }
        let Some(keys) = self.keys_from(0) else {
            return Ok(());
        };
        let c = &self.config;
        let (pq, codes) = ProductQuantizer::train(keys, c.subspaces, c.bits, &c.kmeans()).map_err(
            |e| match e {
                KvError::InvalidConfig { field, reason } => KvError::InvalidConfig {
                    field,
                    reason: format!("PqCache::end_prefill: {reason}"),
                },
                e => e,
            },
        )?;
        self.pq = Some(pq);
        self.codes = Some(to_u8(codes));
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
        let t = self.tiers();
        m.key_bytes += t.code_bytes + t.codebook_bytes;
        m
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = self.inner.held_buffers();
        if let Some(c) = &self.codes {
            out.push(HeldBuffer::tensor(StorageRole::Keys, c));
        }
        if let Some(pq) = &self.pq {
            out.push(HeldBuffer::tensor(StorageRole::Keys, pq.codebooks()));
        }
        out
    }

    fn reset(&mut self) {
        self.inner.reset();
        self.pq = None;
        self.codes = None;
    }
}
