//! MiniCache (arXiv 2405.14366): merge adjacent layers' KV in the depth dimension.
//!
//! From the start layer on, layers are paired (`(S, S+1)`, `(S+2, S+3)`, …). At the end of
//! prefill each pair's prompt tokens are merged: per (sequence, KV head, token), separately
//! for keys and values, the unit directions of the two layers are interpolated by SLERP and
//! stored once, each layer keeps its own magnitude, and the tokens whose directions disagree
//! most (angular distance in the top `gamma` of the pair's range) keep both layers' original
//! vectors. Decode tokens stay unmerged in each layer's own dense tail.
//!
//! A pair's storage is owned by one shared state; each of its two layers is a
//! [`KvCache`] handle on it (side 0 or side 1), so the pair plugs into a plain
//! [`LayerCaches`] built by [`MiniCacheConfig::init`].

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use burn::prelude::*;
use burn::tensor::{FloatDType, IndexingUpdateOp};
use kv_core::{
    Attended, DenseCache, DenseCacheConfig, HeldBuffer, KeyPositions, KvBlock, KvCache, KvError,
    KvShape, KvView, LayerCaches, Lengths, MemoryReport, PAD, Query, Result, StatsRequest,
    StorageDtype, StorageRole, check_block, check_positions, check_query, positions_per_head,
    reference_attention,
};
use serde::{Deserialize, Serialize};

/// Configuration of MiniCache over a whole model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MiniCacheConfig {
    /// The cache shape of every layer.
    pub shape: KvShape,
    /// Number of layers of the model.
    pub num_layers: usize,
    /// First merged layer; `None` is the paper's middle depth, `num_layers / 2`. Layers from
    /// here on are paired `(S, S+1)`, `(S+2, S+3)`, …; an odd last layer stays unmerged.
    #[serde(default)]
    pub start_layer: Option<usize>,
    /// SLERP interpolation weight towards the deeper layer of a pair, in `[0, 1]` (paper: 0.6).
    #[serde(default = "default_t")]
    pub t: f32,
    /// Retention threshold in `[0, 1]`: a token keeps both layers' original vectors when its
    /// normalized angular distance `d = Ω/π` is at least `d_min + (1 - gamma) (d_max - d_min)` over
    /// its (sequence, KV head) stream; `0` retains nothing, `1` retains everything (paper's
    /// ablation default 0.05).
    #[serde(default = "default_gamma")]
    pub gamma: f32,
    /// Element type of everything stored (directions, magnitudes, retained vectors, tails).
    #[serde(default)]
    pub dtype: StorageDtype,
}

fn default_t() -> f32 {
    0.6
}
fn default_gamma() -> f32 {
    0.05
}

impl MiniCacheConfig {
    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &["start", "t", "gamma", "dtype"];

    /// The paper's defaults: merge from the middle layer, `t = 0.6`, `gamma = 0.05`, fp32.
    pub fn new(shape: KvShape, num_layers: usize) -> Self {
        MiniCacheConfig {
            shape,
            num_layers,
            start_layer: None,
            t: default_t(),
            gamma: default_gamma(),
            dtype: StorageDtype::F32,
        }
    }
    /// Sets the first merged layer.
    pub fn with_start_layer(mut self, start: usize) -> Self {
        self.start_layer = Some(start);
        self
    }
    /// Sets the SLERP weight.
    pub fn with_t(mut self, t: f32) -> Self {
        self.t = t;
        self
    }
    /// Sets the retention threshold.
    pub fn with_gamma(mut self, gamma: f32) -> Self {
        self.gamma = gamma;
        self
    }
    /// Sets the storage dtype.
    pub fn with_dtype(mut self, dtype: StorageDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// A config from `key=value` parameters: `start` (first merged layer, default the middle),
    /// `t` (default 0.6), `gamma` (default 0.05), `dtype` (`f32` or `f16`).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the parameter for an unknown name or a value that
    /// does not parse.
    pub fn from_params<'a>(
        shape: KvShape,
        num_layers: usize,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self> {
        let mut cfg = MiniCacheConfig::new(shape, num_layers);
        for (k, v) in params {
            let bad = |what: &str| KvError::InvalidConfig {
                field: "params",
                reason: format!("MiniCache parameter `{k}`: `{v}` is not {what}"),
            };
            match k {
                "start" => cfg.start_layer = Some(v.parse().map_err(|_| bad("a layer index"))?),
                "t" => cfg.t = v.parse().map_err(|_| bad("a number"))?,
                "gamma" => cfg.gamma = v.parse().map_err(|_| bad("a number"))?,
                "dtype" => {
                    cfg.dtype = match v {
                        "f32" => StorageDtype::F32,
                        "f16" => StorageDtype::F16,
                        _ => return Err(bad("`f32` or `f16`")),
                    }
                }
                _ => {
                    return Err(KvError::InvalidConfig {
                        field: "params",
                        reason: format!(
                            "MiniCache has no parameter `{k}` (known: {})",
                            Self::PARAMS.join(", ")
                        ),
                    });
                }
            }
        }
        Ok(cfg)
    }

    /// The first merged layer (the explicit one, or the middle depth).
    pub fn start(&self) -> usize {
        self.start_layer.unwrap_or(self.num_layers / 2)
    }

    /// The merged layer pairs `(l - 1, l)`.
    pub fn pairs(&self) -> Vec<(usize, usize)> {
        (self.start()..self.num_layers.saturating_sub(1))
            .step_by(2)
            .map(|l| (l, l + 1))
            .collect()
    }

    /// Checks the config.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for zero layers, a start layer past the model, or `t` or
    /// `gamma` outside `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if self.num_layers == 0 {
            return Err(KvError::InvalidConfig {
                field: "num_layers",
                reason: "a model has at least one layer".into(),
            });
        }
        if self.start() > self.num_layers {
            return Err(KvError::InvalidConfig {
                field: "start_layer",
                reason: format!(
                    "start layer {} is past the model's {} layers",
                    self.start(),
                    self.num_layers
                ),
            });
        }
        for (field, v) in [("t", self.t), ("gamma", self.gamma)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(KvError::InvalidConfig {
                    field,
                    reason: format!("{v} is outside [0, 1]"),
                });
            }
        }
        Ok(())
    }

    /// Builds one cache per layer: unmerged layers are [`DenseCache`]s, each merged pair two
    /// [`MiniCacheLayer`] handles on one shared storage.
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn init_layers(&self, device: &Device) -> Result<Vec<Box<dyn KvCache>>> {
        self.validate()?;
        let dense = DenseCacheConfig::new(self.shape).with_dtype(self.dtype);
        let mut out: Vec<Option<Box<dyn KvCache>>> = (0..self.num_layers).map(|_| None).collect();
        for (a, b) in self.pairs() {
            let state = Arc::new(Mutex::new(PairState {
                shape: self.shape,
                dtype: self.dtype,
                t: self.t,
                gamma: self.gamma,
                device: device.clone(),
                tails: [dense.init(device)?, dense.init(device)?],
                prefill_done: [false; 2],
                segments: Vec::new(),
            }));
            for (side, l) in [(0, a), (1, b)] {
                out[l] = Some(Box::new(MiniCacheLayer {
                    state: state.clone(),
                    side,
                    shape: self.shape,
                    device: device.clone(),
                }));
            }
        }
        out.into_iter()
            .map(|c| match c {
                Some(c) => Ok(c),
                None => Ok(Box::new(dense.init(device)?) as Box<dyn KvCache>),
            })
            .collect()
    }

    /// Builds the whole model's [`LayerCaches`].
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn init(&self, device: &Device) -> Result<LayerCaches> {
        Ok(LayerCaches::new(self.init_layers(device)?))
    }
}

/// Merged prompt tokens of one pair for one of keys or values.
#[derive(Debug)]
struct MergedTensor {
    /// Shared unit directions, `[batch, kv_heads, len, head_dim]` (held by side 1).
    direction: Tensor<4>,
    /// Per side, magnitudes `[batch, kv_heads, len, 1]`.
    magnitude: [Tensor<4>; 2],
    /// Per side, the original vectors of retained tokens, `[retained, head_dim]`.
    retained: [Option<Tensor<2>>; 2],
    /// Flat index `stream * len + slot` of every retained token (held by side 1).
    index: Vec<u32>,
}

/// One end-of-prefill merge: the tokens the two tails held then.
#[derive(Debug)]
struct Segment {
    len: usize,
    /// Positions per sequence (held by side 1).
    positions: Vec<Vec<u32>>,
    logical: Vec<usize>,
    keys: MergedTensor,
    values: MergedTensor,
}

#[derive(Debug)]
struct PairState {
    shape: KvShape,
    dtype: StorageDtype,
    t: f32,
    gamma: f32,
    device: Device,
    tails: [DenseCache; 2],
    prefill_done: [bool; 2],
    segments: Vec<Segment>,
}

/// One layer of a MiniCache pair: a handle on the pair's shared storage.
///
/// Side 0 is the shallower layer; side 1 holds (and reports) the shared directions, indices
/// and positions, each side its own magnitudes, retained vectors and decode tail, so the two
/// layers' [`MemoryReport`]s add up to the pair's storage counted once. The pair merges when
/// both layers have seen [`end_prefill`](KvCache::end_prefill); resetting either layer resets
/// the pair (a model resets all layers together).
#[derive(Debug)]
pub struct MiniCacheLayer {
    state: Arc<Mutex<PairState>>,
    side: usize,
    shape: KvShape,
    device: Device,
}

impl MiniCacheLayer {
    fn lock(&self) -> MutexGuard<'_, PairState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
    /// Which layer of the pair this is (0: shallower, 1: deeper).
    pub fn side(&self) -> usize {
        self.side
    }
    /// Merged tokens per sequence and retained tokens of this side (keys, values), summed
    /// over streams.
    pub fn merged_stats(&self) -> (usize, usize, usize) {
        let st = self.lock();
        let merged = st.segments.iter().map(|s| s.len).sum();
        let rk = st.segments.iter().map(|s| s.keys.index.len()).sum();
        let rv = st.segments.iter().map(|s| s.values.index.len()).sum();
        (merged, rk, rv)
    }
}

fn to_host(t: Tensor<4>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("invariant: float data reads back as f32")
}

/// SLERP of two unit vectors with weight `t` towards `b`, and their normalized angular
/// distance `Ω / π`. Degenerate cases (a zero vector, nearly parallel or antipodal
/// directions) fall back to the normalized linear interpolation, or `a` when that vanishes.
pub fn slerp(a: &[f32], b: &[f32], t: f32) -> (Vec<f32>, f32) {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let omega = dot.clamp(-1.0, 1.0).acos();
    let s = omega.sin();
    let out: Vec<f32> = if s > 1e-4 {
        let (wa, wb) = (((1.0 - t) * omega).sin() / s, (t * omega).sin() / s);
        a.iter().zip(b).map(|(x, y)| wa * x + wb * y).collect()
    } else {
        let l: Vec<f32> = a
            .iter()
            .zip(b)
            .map(|(x, y)| (1.0 - t) * x + t * y)
            .collect();
        let n = norm(&l);
        if n > 1e-6 {
            l.iter().map(|x| x / n).collect()
        } else {
            a.to_vec()
        }
    };
    // Renormalise against rounding so that magnitudes restore exactly.
    let n = norm(&out);
    let out = if n > 0.0 {
        out.iter().map(|x| x / n).collect()
    } else {
        out
    };
    (out, omega / core::f32::consts::PI)
}

fn norm(x: &[f32]) -> f32 {
    x.iter().map(|v| v * v).sum::<f32>().sqrt()
}

impl PairState {
    fn upload<const D: usize>(&self, data: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
        let dtype = match self.dtype {
            StorageDtype::F32 => FloatDType::F32,
            StorageDtype::F16 => FloatDType::F16,
        };
        Tensor::<D>::from_data(TensorData::new(data, shape), &self.device).cast(dtype)
    }

    /// Merges one of keys or values of the two tails (`x0`, `x1` host `[streams, len, d]`).
    fn merge_tensor(&self, x0: &[f32], x1: &[f32], len: usize) -> MergedTensor {
        let s = self.shape;
        let (streams, d) = (s.streams(), s.head_dim());
        let mut dir = vec![0f32; streams * len * d];
        let mut mags = [vec![0f32; streams * len], vec![0f32; streams * len]];
        let mut dist = vec![0f32; len];
        let mut index = Vec::new();
        let mut rows: [Vec<f32>; 2] = [Vec::new(), Vec::new()];
        for st in 0..streams {
            for i in 0..len {
                let o = (st * len + i) * d;
                let (a, b) = (&x0[o..o + d], &x1[o..o + d]);
                let (na, nb) = (norm(a), norm(b));
                let ua: Vec<f32> = a
                    .iter()
                    .map(|x| if na > 0.0 { x / na } else { 0.0 })
                    .collect();
                let ub: Vec<f32> = b
                    .iter()
                    .map(|x| if nb > 0.0 { x / nb } else { 0.0 })
                    .collect();
                let (e, di) = slerp(&ua, &ub, self.t);
                dir[o..o + d].copy_from_slice(&e);
                mags[0][st * len + i] = na;
                mags[1][st * len + i] = nb;
                dist[i] = di;
            }
            if self.gamma > 0.0 {
                let lo = dist.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = dist.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let threshold = lo + (1.0 - self.gamma) * (hi - lo);
                for i in 0..len {
                    if dist[i] >= threshold {
                        let o = (st * len + i) * d;
                        index.push((st * len + i) as u32);
                        rows[0].extend_from_slice(&x0[o..o + d]);
                        rows[1].extend_from_slice(&x1[o..o + d]);
                    }
                }
            }
        }
        let n = index.len();
        let [r0, r1] = rows;
        let retained = if n == 0 {
            [None, None]
        } else {
            [Some(self.upload(r0, [n, d])), Some(self.upload(r1, [n, d]))]
        };
        let [m0, m1] = mags;
        let shape4 = [s.batch(), s.kv_heads(), len, 1];
        MergedTensor {
            direction: self.upload(dir, [s.batch(), s.kv_heads(), len, d]),
            magnitude: [self.upload(m0, shape4), self.upload(m1, shape4)],
            retained,
            index,
        }
    }

    /// Merges what both tails hold into a new segment and empties the tails.
    fn merge(&mut self) -> Result<()> {
        let (Some((k0, v0)), Some((k1, v1))) = (self.tails[0].tensors(), self.tails[1].tensors())
        else {
            if self.tails[0].is_empty() && self.tails[1].is_empty() {
                return Ok(());
            }
            return Err(self.mismatch());
        };
        let positions = self.tails[0].flat_positions();
        if positions != self.tails[1].flat_positions() {
            return Err(self.mismatch());
        }
        let len = self.tails[0].len();
        let keys = self.merge_tensor(&to_host(k0), &to_host(k1), len);
        let values = self.merge_tensor(&to_host(v0), &to_host(v1), len);
        let b = self.shape.batch();
        let positions: Vec<Vec<u32>> = (0..b)
            .map(|i| positions[i * len..(i + 1) * len].to_vec())
            .collect();
        let logical = self.tails[0].lengths().logical;
        self.segments.push(Segment {
            len,
            positions,
            logical,
            keys,
            values,
        });
        self.tails.iter_mut().for_each(KvCache::reset);
        Ok(())
    }

    fn mismatch(&self) -> KvError {
        KvError::BadPositions {
            op: "MiniCache::end_prefill",
            reason: "the two layers of a merged pair hold different tokens; both layers must \
                     be fed the same tokens"
                .into(),
        }
    }

    /// Keys and values of `side` as attention sees them, with positions per sequence.
    fn dense(&self, side: usize) -> Option<(Tensor<4>, Tensor<4>, Vec<Vec<u32>>)> {
        let s = self.shape;
        let b = s.batch();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        let mut pos: Vec<Vec<u32>> = vec![Vec::new(); b];
        for seg in &self.segments {
            ks.push(restore(&seg.keys, side, s, seg.len));
            vs.push(restore(&seg.values, side, s, seg.len));
            for i in 0..b {
                pos[i].extend_from_slice(&seg.positions[i]);
            }
        }
        if let Some((k, v)) = self.tails[side].tensors() {
            ks.push(k);
            vs.push(v);
            let tp = self.tails[side].flat_positions();
            let n = self.tails[side].len();
            for i in 0..b {
                pos[i].extend_from_slice(&tp[i * n..(i + 1) * n]);
            }
        }
        if ks.is_empty() {
            return None;
        }
        Some((Tensor::cat(ks, 2), Tensor::cat(vs, 2), pos))
    }

    fn last_positions(&self, side: usize) -> Vec<Option<u32>> {
        let tail = self.tails[side].flat_positions();
        let n = self.tails[side].len();
        (0..self.shape.batch())
            .map(|i| {
                tail[i * n..(i + 1) * n]
                    .iter()
                    .rev()
                    .copied()
                    .find(|&p| p != PAD)
                    .or_else(|| {
                        self.segments
                            .iter()
                            .rev()
                            .find_map(|s| s.positions[i].iter().rev().copied().find(|&p| p != PAD))
                    })
            })
            .collect()
    }
}

/// `magnitude * direction` with the retained vectors written back, fp32.
fn restore(m: &MergedTensor, side: usize, s: KvShape, len: usize) -> Tensor<4> {
    let d = s.head_dim();
    let x =
        m.direction.clone().cast(FloatDType::F32) * m.magnitude[side].clone().cast(FloatDType::F32);
    match &m.retained[side] {
        None => x,
        Some(rows) => {
            let device = rows.device();
            let idx: Vec<i64> = m.index.iter().map(|&i| i64::from(i)).collect();
            let n = idx.len();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &device);
            x.reshape([s.streams() * len, d])
                .select_assign(
                    0,
                    idx,
                    rows.clone().cast(FloatDType::F32),
                    IndexingUpdateOp::Assign,
                )
                .reshape([s.batch(), s.kv_heads(), len, d])
        }
    }
}

impl KvCache for MiniCacheLayer {
    fn shape(&self) -> KvShape {
        self.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> Result<()> {
        const OP: &str = "MiniCache::append";
        check_block(&self.shape, &block, OP)?;
        let side = self.side;
        let mut st = self.lock();
        let last = st.last_positions(side);
        check_positions(block.positions(), self.shape.batch(), &last, OP)?;
        st.prefill_done[side] = false;
        st.tails[side].append(block)
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> Result<Attended> {
        check_query(&self.shape, query, "MiniCache::attend")?;
        let st = self.lock();
        let Some((k, v, pos)) = st.dense(self.side) else {
            return Ok(Attended {
                output: query.tensor().zeros_like(),
                stats: Default::default(),
            });
        };
        let kp = pos.concat();
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

    fn end_prefill(&mut self) -> Result<()> {
        let mut st = self.lock();
        st.prefill_done[self.side] = true;
        if st.prefill_done == [true, true] {
            st.prefill_done = [false, false];
            st.merge()?;
        }
        Ok(())
    }

    fn view(&self) -> KvView {
        let s = self.shape;
        let st = self.lock();
        match st.dense(self.side) {
            Some((keys, values, pos)) => KvView {
                keys,
                values,
                positions: positions_per_head(&pos, s.kv_heads()),
            },
            None => {
                let z = Tensor::zeros([s.batch(), s.kv_heads(), 0, s.head_dim()], &self.device);
                KvView {
                    keys: z.clone(),
                    values: z,
                    positions: Vec::new(),
                }
            }
        }
    }

    fn lengths(&self) -> Lengths {
        let st = self.lock();
        let tail = st.tails[self.side].lengths();
        let merged: usize = st.segments.iter().map(|s| s.len).sum();
        let mut logical = tail.logical;
        for seg in &st.segments {
            for (l, m) in logical.iter_mut().zip(&seg.logical) {
                *l += m;
            }
        }
        Lengths {
            held: tail.held.iter().map(|h| h + merged).collect(),
            logical,
        }
    }

    fn memory(&self) -> MemoryReport {
        let s = self.shape;
        let st = self.lock();
        let sz = st.dtype.size();
        let (streams, d) = (s.streams(), s.head_dim());
        let tail = st.tails[self.side].memory();
        let mut m = tail;
        for seg in &st.segments {
            let t = seg.len;
            for (bytes, mt) in [
                (&mut m.key_bytes, &seg.keys),
                (&mut m.value_bytes, &seg.values),
            ] {
                let n = mt.index.len();
                *bytes += streams * t * sz + n * d * sz;
                if self.side == 1 {
                    *bytes += streams * t * d * sz;
                }
            }
            if self.side == 1 {
                m.metadata_bytes += (seg.keys.index.len() + seg.values.index.len()) * 4
                    + s.batch() * t * core::mem::size_of::<u32>();
            }
            let logical: usize = seg.logical.iter().sum();
            m.logical_tokens += logical;
            m.logical_elements += 2 * logical * s.kv_heads() * d;
            m.held_token_slots += streams * t;
        }
        m
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let st = self.lock();
        let mut out = st.tails[self.side].held_buffers();
        for seg in &st.segments {
            for (role, mt) in [
                (StorageRole::Keys, &seg.keys),
                (StorageRole::Values, &seg.values),
            ] {
                out.push(HeldBuffer::tensor(role, &mt.magnitude[self.side]));
                if let Some(r) = &mt.retained[self.side] {
                    out.push(HeldBuffer::tensor(role, r));
                }
                if self.side == 1 {
                    out.push(HeldBuffer::tensor(role, &mt.direction));
                    out.push(HeldBuffer::host(StorageRole::Metadata, &mt.index));
                }
            }
            if self.side == 1 {
                for p in &seg.positions {
                    out.push(HeldBuffer::host(StorageRole::Metadata, p));
                }
            }
        }
        out
    }

    fn reset(&mut self) {
        let mut st = self.lock();
        st.tails.iter_mut().for_each(KvCache::reset);
        st.prefill_done = [false, false];
        st.segments.clear();
    }
}
