//! LESS (Dong, Yang, Lu, Chen, Beidi Chen, "Get More with LESS: Synthesizing Recurrence with
//! KV Cache Compression for Efficient LLM Inference", ICML 2024, arXiv 2402.09398): a sparse
//! decode-time policy (H2O heavy hitters + recent window, or Λ-shaped sinks + recent) whose
//! evicted tokens are folded into a constant-size low-rank state per (sequence, KV head).

use burn::prelude::*;
use kv_core::{
    Attended, HeldBuffer, KeyPositions, KvBlock, KvCache, KvError, KvShape, KvView, Lengths,
    MemoryReport, PAD, Query, RaggedCache, RaggedCacheConfig, Result, StatsRequest, StorageDtype,
    StorageRole, reference_attention_lse,
};
use serde::{Deserialize, Serialize};

use crate::less_maps::LessMaps;
use crate::storage::{matrix, to_host};

/// The sparse policy under LESS's state (token counts per (sequence, KV head)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LessPolicy {
    /// H2O: the `heavy` tokens with the most accumulated attention among all but the newest
    /// `recent`, plus the newest `recent` (the reference's default).
    H2o {
        /// Heavy hitters kept.
        heavy: usize,
        /// Recent tokens kept.
        recent: usize,
    },
    /// Λ-shaped: the first `sinks` tokens plus the newest `recent` (the reference's
    /// `fix_heavy_to_initial_tokens`).
    Lambda {
        /// Leading tokens kept.
        sinks: usize,
        /// Recent tokens kept.
        recent: usize,
    },
}

impl LessPolicy {
    /// Tokens kept per (sequence, KV head) after an eviction.
    pub fn budget(&self) -> usize {
        match *self {
            LessPolicy::H2o { heavy, recent } => heavy + recent,
            LessPolicy::Lambda { sinks, recent } => sinks + recent,
        }
    }

    /// The held rows (sorted) a stream of `n` tokens keeps; `scores` are H2O's accumulated
    /// attention (ignored by Λ). Ties go to the earlier token.
    pub fn keep(&self, scores: &[f32], n: usize) -> Vec<usize> {
        if n <= self.budget() {
            return (0..n).collect();
        }
        match *self {
            LessPolicy::H2o { heavy, recent } => {
                let old = n - recent;
                let mut idx: Vec<usize> = (0..old).collect();
                idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
                idx.truncate(heavy);
                idx.sort_unstable();
                idx.extend(old..n);
                idx
            }
            LessPolicy::Lambda { sinks, recent } => (0..sinks).chain(n - recent..n).collect(),
        }
    }

    fn is_h2o(&self) -> bool {
        matches!(self, LessPolicy::H2o { .. })
    }
}

/// Configuration of a [`LessCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LessConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// The sparse policy.
    pub policy: LessPolicy,
    /// The layer's learned maps ([`LessMaps::zeros`] gives the plain sparse policy).
    pub maps: LessMaps,
    /// Element type of the kept keys and values (default fp32; the state is fp32).
    #[serde(default)]
    pub dtype: StorageDtype,
}

impl LessConfig {
    /// LESS with the given policy and maps, fp32 storage.
    pub fn new(shape: KvShape, policy: LessPolicy, maps: LessMaps) -> Self {
        LessConfig {
            shape,
            policy,
            maps,
            dtype: StorageDtype::F32,
        }
    }

    /// Sets the storage dtype of the kept tokens.
    pub fn with_dtype(mut self, dtype: StorageDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &[
        "policy", "heavy", "recent", "sinks", "artefact", "maps", "dtype",
    ];

    /// A config from `key=value` parameters: `policy` (`h2o`, the default, or `lambda`),
    /// `heavy` and `recent` (H2O, both required: no budget is invented), `sinks` and `recent`
    /// (Λ, both required), `artefact` (a path handed to `load`, which returns this layer's
    /// maps) or `maps=zero` (no state: the plain sparse policy; one of the two is required),
    /// `dtype` (`f32` or `f16`). Validated by [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the parameter for an unknown name, a value that does
    /// not parse, a missing or misplaced budget, or what `load` returns.
    pub fn from_params<'a>(
        shape: KvShape,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
        load: impl FnOnce(&str) -> Result<LessMaps>,
    ) -> Result<Self> {
        let bad = |field: &'static str, reason: String| KvError::InvalidConfig { field, reason };
        let int = |field: &'static str, v: &str| {
            v.parse::<usize>()
                .map_err(|_| bad(field, format!("`{v}` is not a token count")))
        };
        let (mut policy, mut heavy, mut recent, mut sinks) = ("h2o", None, None, None);
        let (mut artefact, mut zero, mut dtype) = (None, false, StorageDtype::F32);
        for (k, v) in params {
            match k {
                "policy" => policy = v,
                "heavy" => heavy = Some(int("heavy", v)?),
                "recent" => recent = Some(int("recent", v)?),
                "sinks" => sinks = Some(int("sinks", v)?),
                "artefact" => artefact = Some(v),
                "maps" if v == "zero" => zero = true,
                "maps" => return Err(bad("maps", format!("`{v}` is not `zero`"))),
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
                            "unknown LESS parameter `{k}`; accepted: {}",
                            Self::PARAMS.join(", ")
                        ),
                    ));
                }
            }
        }
        let need = |field: &'static str, v: Option<usize>| {
            v.ok_or_else(|| bad(field, format!("the {field} budget (tokens) must be given")))
        };
        let policy = match policy {
            "h2o" => {
                if sinks.is_some() {
                    return Err(bad("sinks", "only the lambda policy takes sinks".into()));
                }
                LessPolicy::H2o {
                    heavy: need("heavy", heavy)?,
                    recent: need("recent", recent)?,
                }
            }
            "lambda" => {
                if heavy.is_some() {
                    return Err(bad("heavy", "only the h2o policy takes heavy".into()));
                }
                LessPolicy::Lambda {
                    sinks: need("sinks", sinks)?,
                    recent: need("recent", recent)?,
                }
            }
            other => {
                return Err(bad(
                    "policy",
                    format!("`{other}` is not one of h2o, lambda"),
                ));
            }
        };
        let maps = match (artefact, zero) {
            (Some(_), true) => {
                return Err(bad(
                    "maps",
                    "give either artefact=PATH or maps=zero, not both".into(),
                ));
            }
            (Some(path), false) => load(path)?,
            (None, true) => LessMaps::zeros(&shape, 1, 1),
            (None, false) => {
                return Err(bad(
                    "artefact",
                    "LESS needs artefact=PATH (trained maps; see the less_calibrate example) or \
                     maps=zero (no state: the plain sparse policy)"
                        .into(),
                ));
            }
        };
        Ok(LessConfig {
            shape,
            policy,
            maps,
            dtype,
        })
    }

    /// Validates and builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a budget of zero tokens or maps that do not fit the
    /// layer.
    pub fn init(&self, device: &Device) -> Result<LessCache> {
        if self.policy.budget() == 0 {
            return Err(KvError::InvalidConfig {
                field: "recent",
                reason: "the policy keeps 0 tokens".into(),
            });
        }
        self.maps.validate(&self.shape)?;
        let s = self.shape;
        let (r, d) = (self.maps.rank, s.head_dim());
        Ok(LessCache {
            config: self.clone(),
            inner: RaggedCacheConfig::new(s)
                .with_dtype(self.dtype)
                .init(device)?,
            scores: vec![Vec::new(); s.streams()],
            state: (0..s.streams())
                .map(|_| StreamState {
                    h: vec![0.0; r * d],
                    z: vec![0.0; r],
                    evicted: 0,
                    newest: None,
                })
                .collect(),
            last_seen: vec![None; s.batch()],
            psi_zero: self
                .maps
                .key
                .iter()
                .all(|k| k.scale.iter().all(|&x| x == 0.0)),
        })
    }
}

/// The low-rank state of one (sequence, KV head).
#[derive(Debug, Clone, PartialEq)]
struct StreamState {
    /// `H = Σ_evicted ψ(k) vᵀ`, `[rank, head_dim]` row-major.
    h: Vec<f32>,
    /// `z = Σ_evicted ψ(k)`, `[rank]`.
    z: Vec<f32>,
    /// Tokens folded in.
    evicted: usize,
    /// Position of the newest token folded in.
    newest: Option<u32>,
}

/// LESS over ragged storage: a sparse policy plus, per (sequence, KV head), the low-rank
/// state of every token it evicted.
///
/// # The rule
/// A stream over budget keeps what its [`LessPolicy`] keeps; each evicted token `(k, v)` is
/// folded into the stream's state, `H ← H + ψ(k) vᵀ`, `z ← z + ψ(k)`, and its keys and values
/// are freed. A query `q` of query head `j` then gets
///
/// ```text
/// o = (Σ_kept e^{q·k_i/√d} v_i + φ_j(q)ᵀ H) / (Σ_kept e^{q·k_i/√d} + φ_j(q)ᵀ z)
/// ```
///
/// computed in log space from the kept tokens' log-sum-exp (the reference does the same).
/// A query whose position is before the newest folded token gets the sparse output only (the
/// state would show it a future token; in decoding this never happens).
///
/// As `kv-evict`'s H2O, eviction happens at the next [`append`](KvCache::append) (before the
/// new tokens are stored) and at [`end_prefill`](KvCache::end_prefill); H2O's scores are the
/// column sums of the *sparse* softmax (over the kept tokens, mean over the query heads of a
/// KV head), as in the reference. With `ψ ≡ 0` (every key scale zero, for example
/// [`LessMaps::zeros`]) nothing is folded and the cache is its sparse policy exactly.
///
/// [`view`](KvCache::view) shows the kept tokens only; `attend` is plain attention over it
/// only while the state is empty.
#[derive(Debug, Clone)]
pub struct LessCache {
    config: LessConfig,
    inner: RaggedCache,
    /// H2O's accumulated attention per stream, aligned with the held rows (empty for Λ).
    scores: Vec<Vec<f32>>,
    state: Vec<StreamState>,
    last_seen: Vec<Option<u32>>,
    /// `ψ ≡ 0`: nothing is ever folded.
    psi_zero: bool,
}

impl LessCache {
    /// The configuration.
    pub fn config(&self) -> &LessConfig {
        &self.config
    }

    /// The state of sequence `b`, KV head `h`: `(H [rank * head_dim], z [rank], tokens
    /// folded)`.
    ///
    /// # Panics
    /// If `b` or `h` is out of range.
    pub fn state(&self, b: usize, h: usize) -> (&[f32], &[f32], usize) {
        let s = self.config.shape;
        assert!(
            b < s.batch() && h < s.kv_heads(),
            "LessCache::state({b}, {h}) out of range"
        );
        let st = &self.state[b * s.kv_heads() + h];
        (&st.h, &st.z, st.evicted)
    }

    /// H2O's accumulated scores per stream, aligned with the held rows (empty for Λ).
    pub fn scores(&self) -> &[Vec<f32>] {
        &self.scores
    }

    /// The original positions held by sequence `b`, KV head `h`.
    pub fn positions(&self, b: usize, h: usize) -> Vec<u32> {
        self.inner.stream(b, h).positions.to_vec()
    }

    /// Evicts every stream over budget now, folding the evicted tokens into the state.
    ///
    /// # Errors
    /// A failed device readback (not expected); the cache is then unchanged.
    pub fn evict(&mut self) -> Result<()> {
        let s = self.config.shape;
        let kvh = s.kv_heads();
        let held = self.inner.lengths().held;
        let policy = self.config.policy;
        let keep: Vec<Vec<usize>> = (0..held.len())
            .map(|si| policy.keep(&self.scores[si], held[si]))
            .collect();
        if keep.iter().zip(&held).all(|(k, &n)| k.len() == n) {
            return Ok(());
        }
        // Fold first (into copies), so that a failed readback leaves everything unchanged.
        let mut state = self.state.clone();
        let (d, r) = (s.head_dim(), self.config.maps.rank);
        for (si, idx) in keep.iter().enumerate() {
            let n = held[si];
            if idx.len() == n {
                continue;
            }
            let mut is_kept = vec![false; n];
            idx.iter().for_each(|&j| is_kept[j] = true);
            let gone: Vec<usize> = (0..n).filter(|&j| !is_kept[j]).collect();
            let view = self.inner.stream(si / kvh, si % kvh);
            let st = &mut state[si];
            st.evicted += gone.len();
            let newest = gone.iter().map(|&j| view.positions[j]).max();
            st.newest = st.newest.max(newest);
            if self.psi_zero {
                continue;
            }
            let (Some(k), Some(v)) = (view.keys, view.values) else {
                continue;
            };
            let ids: Vec<i32> = gone.iter().map(|&j| j as i32).collect();
            let ids = Tensor::<1, Int>::from_data(
                TensorData::new(ids, [gone.len()]),
                self.inner.device(),
            );
            let k = to_host(k.select(0, ids.clone()))?;
            let v = to_host(v.select(0, ids))?;
            for e in 0..gone.len() {
                let psi = self.config.maps.psi(si % kvh, &k[e * d..(e + 1) * d]);
                let ve = &v[e * d..(e + 1) * d];
                for (rr, &p) in psi.iter().enumerate().take(r) {
                    if p == 0.0 {
                        continue;
                    }
                    st.z[rr] += p;
                    for (hx, &vx) in st.h[rr * d..(rr + 1) * d].iter_mut().zip(ve) {
                        *hx += p * vx;
                    }
                }
            }
        }
        self.inner.retain(&keep)?;
        if policy.is_h2o() {
            for (sc, idx) in self.scores.iter_mut().zip(&keep) {
                if idx.len() != sc.len() {
                    *sc = idx.iter().map(|&j| sc[j]).collect();
                }
            }
        }
        self.state = state;
        Ok(())
    }

    /// Whether stream `si` has a state that can change an output.
    fn active(&self, si: usize) -> bool {
        !self.psi_zero && self.state[si].z.iter().any(|&z| z > 0.0)
    }

    /// Mixes the state of stream `(b, h)` into its sparse output `o` (`[1, g, n, d]`) with
    /// log-sum-exp `lse` (`[1, 1, g, n]`); returns the output and its log-sum-exp.
    fn mix(
        &self,
        b: usize,
        h: usize,
        query: &Query,
        o: Tensor<4>,
        lse: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<4>)> {
        let s = self.config.shape;
        let (g, d) = (s.group(), s.head_dim());
        let [_, _, n, _] = query.tensor().dims();
        let st = &self.state[b * s.kv_heads() + h];
        let maps = &self.config.maps;
        let r = maps.rank;
        let q = to_host(
            query
                .tensor()
                .clone()
                .slice([b..b + 1, h * g..(h + 1) * g, 0..n, 0..d]),
        )?;
        let mut out = to_host(o)?;
        let mut l = to_host(lse)?;
        let q_pos = &query.positions()[b * n..(b + 1) * n];
        for j in 0..g {
            for (i, &p) in q_pos.iter().enumerate() {
                if p == PAD || st.newest.is_some_and(|e| p < e) {
                    continue;
                }
                let row = j * n + i;
                let phi = maps.phi(h * g + j, &q[row * d..(row + 1) * d]);
                let norm: f64 = phi
                    .iter()
                    .zip(&st.z)
                    .map(|(&a, &z)| f64::from(a) * f64::from(z))
                    .sum();
                if norm <= 0.0 {
                    continue;
                }
                let sparse = if l[row] == f32::MIN {
                    f64::NEG_INFINITY
                } else {
                    f64::from(l[row])
                };
                let ln_norm = norm.ln();
                let m = sparse.max(ln_norm);
                let total = m + ((sparse - m).exp() + (ln_norm - m).exp()).ln();
                let (ws, wl) = ((sparse - total).exp(), (-total).exp());
                for c in 0..d {
                    let mut num = 0.0f64;
                    for (rr, &a) in phi.iter().enumerate().take(r) {
                        num += f64::from(a) * f64::from(st.h[rr * d + c]);
                    }
                    let x = &mut out[row * d + c];
                    *x = (ws * f64::from(*x) + wl * num) as f32;
                }
                l[row] = total as f32;
            }
        }
        let dev = self.inner.device();
        Ok((
            matrix(out, g * n, d, dev).reshape([1, g, n, d]),
            matrix(l, g, n, dev).reshape([1, 1, g, n]),
        ))
    }

    /// Sparse attention with log-sum-exp over stream `(b, h)`'s kept tokens.
    fn sparse_lse(&self, b: usize, h: usize, query: &Query) -> (Tensor<4>, Tensor<4>) {
        let s = self.config.shape;
        let (g, d) = (s.group(), s.head_dim());
        let [_, _, n, _] = query.tensor().dims();
        let q = query
            .tensor()
            .clone()
            .slice([b..b + 1, h * g..(h + 1) * g, 0..n, 0..d]);
        let view = self.inner.stream(b, h);
        let q_pos = &query.positions()[b * n..(b + 1) * n];
        match (view.keys, view.values) {
            (Some(k), Some(v)) => {
                let len = view.positions.len();
                reference_attention_lse(
                    q,
                    k.reshape([1, 1, len, d]),
                    v.reshape([1, 1, len, d]),
                    q_pos,
                    KeyPositions::PerSequence(view.positions),
                    None,
                )
            }
            _ => (
                q.zeros_like(),
                Tensor::full([1, 1, g, n], f32::MIN, self.inner.device()),
            ),
        }
    }

    fn observe(&mut self, cols: Tensor<4>) -> Result<()> {
        let [b, kvh, g, width] = cols.dims();
        if width == 0 {
            return Ok(());
        }
        let host = to_host(
            cols.sum_dim(2)
                .div_scalar(g as f32)
                .reshape([b * kvh, width]),
        )?;
        for (si, sc) in self.scores.iter_mut().enumerate() {
            let row = &host[si * width..(si + 1) * width];
            for (acc, c) in sc.iter_mut().zip(row) {
                *acc += c;
            }
        }
        Ok(())
    }
}

impl KvCache for LessCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        self.inner.device()
    }

    fn append(&mut self, block: KvBlock) -> Result<()> {
        const OP: &str = "LessCache::append";
        let s = self.config.shape;
        kv_core::check_block(&s, &block, OP)?;
        let counts = kv_core::check_positions(block.positions(), s.batch(), &self.last_seen, OP)?;
        let n = block.seq_len();
        let newest: Vec<Option<u32>> = (0..s.batch())
            .map(|b| {
                block.positions()[b * n..(b + 1) * n]
                    .iter()
                    .copied()
                    .filter(|&p| p != PAD)
                    .max()
            })
            .collect();
        self.evict()?;
        self.inner.append(block)?;
        for (seen, new) in self.last_seen.iter_mut().zip(newest) {
            if new.is_some() {
                *seen = new;
            }
        }
        if self.config.policy.is_h2o() {
            for (b, &c) in counts.iter().enumerate() {
                for h in 0..s.kv_heads() {
                    self.scores[b * s.kv_heads() + h].extend(core::iter::repeat_n(0.0, c));
                }
            }
        }
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> Result<Attended> {
        let h2o = self.config.policy.is_h2o();
        let request = StatsRequest {
            column_sums: stats.column_sums || h2o,
            last_row: stats.last_row,
        };
        let mut out = self.inner.attend(query, request)?;
        let s = self.config.shape;
        let (g, d) = (s.group(), s.head_dim());
        let n = query.tensor().dims()[2];
        for b in 0..s.batch() {
            for h in 0..s.kv_heads() {
                if !self.active(b * s.kv_heads() + h) {
                    continue;
                }
                let (o, lse) = self.sparse_lse(b, h, query);
                let (o, _) = self.mix(b, h, query, o, lse)?;
                out.output = out
                    .output
                    .slice_assign([b..b + 1, h * g..(h + 1) * g, 0..n, 0..d], o);
            }
        }
        if h2o && let Some(cols) = out.stats.column_sums.clone() {
            self.observe(cols)?;
        }
        if !stats.column_sums {
            out.stats.column_sums = None;
        }
        Ok(out)
    }

    fn attend_lse(&mut self, query: &Query) -> Result<(Tensor<4>, Tensor<4>)> {
        kv_core::check_query(&self.config.shape, query, "LessCache::attend_lse")?;
        let s = self.config.shape;
        let mut outs = Vec::with_capacity(s.batch());
        let mut lses = Vec::with_capacity(s.batch());
        for b in 0..s.batch() {
            let mut ho = Vec::with_capacity(s.kv_heads());
            let mut hl = Vec::with_capacity(s.kv_heads());
            for h in 0..s.kv_heads() {
                let (o, lse) = self.sparse_lse(b, h, query);
                let (o, lse) = if self.active(b * s.kv_heads() + h) {
                    self.mix(b, h, query, o, lse)?
                } else {
                    (o, lse)
                };
                ho.push(o);
                hl.push(lse);
            }
            outs.push(Tensor::cat(ho, 1));
            lses.push(Tensor::cat(hl, 1));
        }
        if self.config.policy.is_h2o() {
            // The scores see every attention call, this one included.
            let cols = self
                .inner
                .attend(query, StatsRequest::COLUMN_SUMS)?
                .stats
                .column_sums;
            if let Some(cols) = cols {
                self.observe(cols)?;
            }
        }
        Ok((Tensor::cat(outs, 0), Tensor::cat(lses, 0)))
    }

    fn end_prefill(&mut self) -> Result<()> {
        self.evict()
    }

    fn view(&self) -> KvView {
        self.inner.view()
    }

    fn lengths(&self) -> Lengths {
        self.inner.lengths()
    }

    fn memory(&self) -> MemoryReport {
        let mut m = self.inner.memory();
        let f = core::mem::size_of::<f32>();
        for st in &self.state {
            m.value_bytes += st.h.len() * f;
            m.key_bytes += st.z.len() * f;
        }
        m.metadata_bytes += self.scores.iter().map(|s| s.len() * f).sum::<usize>();
        m.metadata_bytes += self.config.maps.bytes();
        m
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = self.inner.held_buffers();
        for st in &self.state {
            out.push(HeldBuffer::host(StorageRole::Values, &st.h));
            out.push(HeldBuffer::host(StorageRole::Keys, &st.z));
        }
        out.extend(
            self.scores
                .iter()
                .map(|s| HeldBuffer::host(StorageRole::Metadata, s)),
        );
        out.extend(
            self.config
                .maps
                .slices()
                .into_iter()
                .map(|p| HeldBuffer::host(StorageRole::Metadata, p)),
        );
        out
    }

    fn reset(&mut self) {
        self.inner.reset();
        self.scores.iter_mut().for_each(Vec::clear);
        for st in &mut self.state {
            st.h.fill(0.0);
            st.z.fill(0.0);
            st.evicted = 0;
            st.newest = None;
        }
        self.last_seen.iter_mut().for_each(|l| *l = None);
    }
}
