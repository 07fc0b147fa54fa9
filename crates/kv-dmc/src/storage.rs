//! Per-(sequence, KV head) slot storage shared by the merging caches: keys and values in
//! device buffers, one original position and one merge mass per slot on the host, and slots
//! that can be rewritten in place (a merge changes a held slot, unlike eviction).

use burn::prelude::*;
use burn::tensor::FloatDType;
use kv_core::{
    AttentionStats, GROWTH_TOKENS, HeldBuffer, KeyPositions, KvError, KvShape, KvView, Lengths,
    PAD, Query, Result, StatsRequest, StorageDtype, StorageRole, reference_attention,
};

/// One (sequence, KV head): `len` held slots of `[cap, head_dim]` buffers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stream {
    keys: Option<Tensor<2>>,
    values: Option<Tensor<2>>,
    len: usize,
    /// Position of every slot (for a merged slot: its most recent token).
    pub(crate) positions: Vec<u32>,
    /// Merge mass of every slot (DMC's `z`, CaM's accumulated weight).
    pub(crate) mass: Vec<f32>,
}

impl Stream {
    fn cap(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dims()[0])
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Held keys and values (storage dtype), `[len, head_dim]`.
    fn held_raw(&self) -> Option<(Tensor<2>, Tensor<2>)> {
        if self.len == 0 {
            return None;
        }
        let (k, v) = (self.keys.as_ref()?, self.values.as_ref()?);
        let d = k.dims()[1];
        Some((
            k.clone().slice([0..self.len, 0..d]),
            v.clone().slice([0..self.len, 0..d]),
        ))
    }

    /// Held keys and values in fp32, `[len, head_dim]`.
    pub(crate) fn held(&self) -> Option<(Tensor<2>, Tensor<2>)> {
        self.held_raw()
            .map(|(k, v)| (k.cast(FloatDType::F32), v.cast(FloatDType::F32)))
    }
}

fn write_rows(buf: Option<Tensor<2>>, new: Tensor<2>, at: usize) -> Tensor<2> {
    let [n, d] = new.dims();
    match buf {
        Some(buf) if buf.dims()[0] >= at + n => buf.slice_assign([at..at + n, 0..d], new),
        buf => {
            let cap = (at + n).div_ceil(GROWTH_TOKENS) * GROWTH_TOKENS;
            let (dtype, device) = (new.dtype(), new.device());
            let mut parts = Vec::with_capacity(3);
            if let Some(buf) = buf
                && at > 0
            {
                parts.push(buf.slice([0..at, 0..d]));
            }
            parts.push(new);
            if cap > at + n {
                parts.push(Tensor::zeros([cap - at - n, d], (&device, dtype)));
            }
            Tensor::cat(parts, 0)
        }
    }
}

/// Reads a float tensor back to the host as `f32`.
///
/// # Errors
/// [`KvError::ShapeMismatch`] if the backend returns a different number of elements.
pub(crate) fn to_host<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    let n = t.shape().num_elements();
    let v = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default();
    if v.len() == n {
        Ok(v)
    } else {
        Err(KvError::ShapeMismatch {
            op: "kv_dmc::to_host",
            what: "elements read back",
            expected: n,
            got: v.len(),
        })
    }
}

/// A `[rows, cols]` host matrix as a device tensor.
pub(crate) fn matrix(data: Vec<f32>, rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(data, [rows, cols]), device)
}

/// Slot storage of one layer: one [`Stream`] per (sequence, KV head), row-major.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    pub(crate) shape: KvShape,
    dtype: StorageDtype,
    pub(crate) device: Device,
    pub(crate) streams: Vec<Stream>,
    /// Tokens appended per sequence (padding excluded).
    pub(crate) logical: Vec<usize>,
    /// The last position appended per sequence.
    pub(crate) last_seen: Vec<Option<u32>>,
}

impl Slots {
    pub(crate) fn new(shape: KvShape, dtype: StorageDtype, device: &Device) -> Self {
        Slots {
            shape,
            dtype,
            device: device.clone(),
            streams: vec![Stream::default(); shape.streams()],
            logical: vec![0; shape.batch()],
            last_seen: vec![None; shape.batch()],
        }
    }

    fn float_dtype(&self) -> FloatDType {
        match self.dtype {
            StorageDtype::F32 => FloatDType::F32,
            StorageDtype::F16 => FloatDType::F16,
        }
    }

    /// The last held key and value of stream `s` in fp32 on the host.
    pub(crate) fn last_row(&self, s: usize) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let st = &self.streams[s];
        match (&st.keys, &st.values, st.len) {
            (Some(k), Some(v), len) if len > 0 => {
                let d = self.shape.head_dim();
                let row = |t: &Tensor<2>| {
                    to_host(t.clone().slice([len - 1..len, 0..d]).cast(FloatDType::F32))
                };
                Ok(Some((row(k)?, row(v)?)))
            }
            _ => Ok(None),
        }
    }

    /// Writes `keys`/`values` (`[rows, head_dim]`, fp32) at the tail of stream `s`: the first
    /// row overwrites the last held slot when `replace_last`, the others are appended.
    pub(crate) fn write_tail(
        &mut self,
        s: usize,
        replace_last: bool,
        keys: Tensor<2>,
        values: Tensor<2>,
        positions: &[u32],
        mass: &[f32],
    ) {
        let dtype = self.float_dtype();
        let st = &mut self.streams[s];
        let rows = keys.dims()[0];
        debug_assert!(positions.len() == rows && mass.len() == rows);
        debug_assert!(!replace_last || st.len > 0);
        let at = if replace_last { st.len - 1 } else { st.len };
        st.keys = Some(write_rows(st.keys.take(), keys.cast(dtype), at));
        st.values = Some(write_rows(st.values.take(), values.cast(dtype), at));
        st.positions.truncate(at);
        st.positions.extend_from_slice(positions);
        st.mass.truncate(at);
        st.mass.extend_from_slice(mass);
        st.len = at + rows;
    }

    /// Replaces stream `s` by exactly-sized buffers holding `keys`/`values` (fp32, `[rows,
    /// head_dim]`); `None` empties it.
    pub(crate) fn replace(
        &mut self,
        s: usize,
        kv: Option<(Tensor<2>, Tensor<2>)>,
        positions: Vec<u32>,
        mass: Vec<f32>,
    ) {
        let dtype = self.float_dtype();
        let st = &mut self.streams[s];
        match kv {
            None => *st = Stream::default(),
            Some((k, v)) => {
                st.len = k.dims()[0];
                debug_assert!(positions.len() == st.len && mass.len() == st.len);
                st.keys = Some(k.cast(dtype));
                st.values = Some(v.cast(dtype));
                st.positions = positions;
                st.mass = mass;
            }
        }
    }

    fn attend_stream(
        &self,
        b: usize,
        h: usize,
        query: &Query,
        stats: StatsRequest,
        mass_bias: bool,
    ) -> (Tensor<4>, AttentionStats) {
        let g = self.shape.group();
        let [_, _, n, d] = query.tensor().dims();
        let q = query
            .tensor()
            .clone()
            .slice([b..b + 1, h * g..(h + 1) * g, 0..n, 0..d]);
        let st = &self.streams[b * self.shape.kv_heads() + h];
        let Some((k, v)) = st.held() else {
            return (q.zeros_like(), AttentionStats::default());
        };
        let len = st.len;
        let q_pos = &query.positions()[b * n..(b + 1) * n];
        let k_pos = KeyPositions::PerSequence(&st.positions);
        if !mass_bias {
            return reference_attention(
                q,
                k.reshape([1, 1, len, d]),
                v.reshape([1, 1, len, d]),
                q_pos,
                k_pos,
                None,
                stats,
            );
        }
        // Proportional attention: `q·k/√d + ln z` through one extra channel (1 in the query,
        // `√d·ln z` in the key, 0 in the value), at the original scale.
        let sqrt_d = (d as f32).sqrt();
        let bias: Vec<f32> = st.mass.iter().map(|z| sqrt_d * z.ln()).collect();
        let bias = matrix(bias, len, 1, &self.device);
        let k = Tensor::cat(vec![k, bias], 1).reshape([1, 1, len, d + 1]);
        let v = Tensor::cat(vec![v, Tensor::zeros([len, 1], &self.device)], 1).reshape([
            1,
            1,
            len,
            d + 1,
        ]);
        let q = Tensor::cat(vec![q, Tensor::ones([1, g, n, 1], &self.device)], 3);
        let (out, stats) = reference_attention(q, k, v, q_pos, k_pos, Some(1.0 / sqrt_d), stats);
        (out.slice([0..1, 0..g, 0..n, 0..d]), stats)
    }

    /// Attention per stream over its held slots (slot positions give the causal mask), with
    /// statistics zero-padded to the longest stream.
    /// With `mass_bias`, each slot's score gets `+ ln z` (its mass), ToMe's proportional
    /// attention.
    pub(crate) fn attend(
        &self,
        query: &Query,
        stats: StatsRequest,
        mass_bias: bool,
    ) -> (Tensor<4>, AttentionStats) {
        let s = self.shape;
        let width = self.streams.iter().map(|st| st.len).max().unwrap_or(0);
        let g = s.group();
        let pad = |t: Option<Tensor<4>>| match t {
            None => Tensor::zeros([1, 1, g, width], &self.device),
            Some(t) if t.dims()[3] == width => t,
            Some(t) => {
                let len = t.dims()[3];
                Tensor::cat(
                    vec![t, Tensor::zeros([1, 1, g, width - len], &self.device)],
                    3,
                )
            }
        };
        let mut outs = Vec::with_capacity(s.batch());
        let (mut cols, mut lasts) = (Vec::new(), Vec::new());
        for b in 0..s.batch() {
            let mut head_out = Vec::with_capacity(s.kv_heads());
            let (mut col_h, mut last_h) = (Vec::new(), Vec::new());
            for h in 0..s.kv_heads() {
                let (out, st) = self.attend_stream(b, h, query, stats, mass_bias);
                head_out.push(out);
                if stats.column_sums {
                    col_h.push(pad(st.column_sums));
                }
                if stats.last_row {
                    last_h.push(pad(st.last_row));
                }
            }
            outs.push(Tensor::cat(head_out, 1));
            if stats.column_sums {
                cols.push(Tensor::cat(col_h, 1));
            }
            if stats.last_row {
                lasts.push(Tensor::cat(last_h, 1));
            }
        }
        (
            Tensor::cat(outs, 0),
            AttentionStats {
                column_sums: stats.column_sums.then(|| Tensor::cat(cols, 0)),
                last_row: stats.last_row.then(|| Tensor::cat(lasts, 0)),
            },
        )
    }

    pub(crate) fn view(&self) -> KvView {
        let s = self.shape;
        let d = s.head_dim();
        let width = self.streams.iter().map(|st| st.len).max().unwrap_or(0);
        if width == 0 {
            // (Burn's reshape reads a 0 as "keep this dimension", so build empty views directly.)
            let z = Tensor::zeros([s.batch(), s.kv_heads(), 0, d], &self.device);
            return KvView {
                keys: z.clone(),
                values: z,
                positions: Vec::new(),
            };
        }
        let mut ks = Vec::with_capacity(self.streams.len());
        let mut vs = Vec::with_capacity(self.streams.len());
        let mut positions = Vec::with_capacity(self.streams.len() * width);
        for st in &self.streams {
            let pad = width - st.len;
            let zeros = |n: usize| Tensor::<2>::zeros([n, d], &self.device);
            let (k, v) = match st.held() {
                Some((k, v)) if pad > 0 => (
                    Tensor::cat(vec![k, zeros(pad)], 0),
                    Tensor::cat(vec![v, zeros(pad)], 0),
                ),
                Some(kv) => kv,
                None => (zeros(width), zeros(width)),
            };
            ks.push(k.reshape([1, width, d]));
            vs.push(v.reshape([1, width, d]));
            positions.extend_from_slice(&st.positions);
            positions.extend(core::iter::repeat_n(PAD, pad));
        }
        let dims = [s.batch(), s.kv_heads(), width, d];
        KvView {
            keys: Tensor::cat(ks, 0).reshape(dims),
            values: Tensor::cat(vs, 0).reshape(dims),
            positions,
        }
    }

    pub(crate) fn lengths(&self) -> Lengths {
        Lengths {
            held: self.streams.iter().map(|st| st.len).collect(),
            logical: self.logical.clone(),
        }
    }

    /// Key/value buffer bytes (capacity, slack included) and per-slot metadata (position and
    /// mass, 4 bytes each).
    pub(crate) fn memory(&self) -> kv_core::MemoryReport {
        let s = self.shape;
        let row = s.head_dim() * self.dtype.size();
        let cap: usize = self.streams.iter().map(Stream::cap).sum();
        let held: usize = self.streams.iter().map(|st| st.len).sum();
        let logical_tokens: usize = self.logical.iter().sum();
        kv_core::MemoryReport {
            key_bytes: cap * row,
            value_bytes: cap * row,
            metadata_bytes: self
                .streams
                .iter()
                .map(|st| {
                    core::mem::size_of_val(st.positions.as_slice())
                        + core::mem::size_of_val(st.mass.as_slice())
                })
                .sum(),
            logical_elements: 2 * logical_tokens * s.kv_heads() * s.head_dim(),
            logical_tokens,
            held_token_slots: held,
        }
    }

    pub(crate) fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = Vec::new();
        for st in &self.streams {
            if let Some(k) = &st.keys {
                out.push(HeldBuffer::tensor(StorageRole::Keys, k));
            }
            if let Some(v) = &st.values {
                out.push(HeldBuffer::tensor(StorageRole::Values, v));
            }
            out.push(HeldBuffer::host(StorageRole::Metadata, &st.positions));
            out.push(HeldBuffer::host(StorageRole::Metadata, &st.mass));
        }
        out
    }

    pub(crate) fn reset(&mut self) {
        self.streams
            .iter_mut()
            .for_each(|st| *st = Stream::default());
        self.logical.iter_mut().for_each(|l| *l = 0);
        self.last_seen.iter_mut().for_each(|l| *l = None);
    }
}
