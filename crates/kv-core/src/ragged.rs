//! Ragged per-head storage: every (sequence, KV head) holds its own number of tokens,
//! physically compact, so that per-head budgets free real memory.

use burn::prelude::*;
use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

use crate::attention::{AttentionStats, KeyPositions, StatsRequest, reference_attention};
use crate::block::{KvBlock, PAD, Query};
use crate::cache::{Attended, KvCache, KvView, Lengths, check_block, check_positions, check_query};
use crate::dense::{GROWTH_TOKENS, StorageDtype};
use crate::memory::{HeldBuffer, MemoryReport, StorageRole};
use crate::shape::KvShape;
use crate::{KvError, Result};

/// Configuration of a [`RaggedCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaggedCacheConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Element type of the stored keys and values.
    #[serde(default)]
    pub dtype: StorageDtype,
    /// A fixed capacity in tokens per (sequence, KV head); appending past it is an error.
    #[serde(default)]
    pub capacity: Option<usize>,
}

impl RaggedCacheConfig {
    /// An fp32 ragged cache without capacity limit.
    pub fn new(shape: KvShape) -> Self {
        RaggedCacheConfig {
            shape,
            dtype: StorageDtype::F32,
            capacity: None,
        }
    }
    /// Sets the storage dtype.
    pub fn with_dtype(mut self, dtype: StorageDtype) -> Self {
        self.dtype = dtype;
        self
    }
    /// Sets a fixed capacity in tokens per (sequence, KV head).
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity);
        self
    }
    /// Builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a zero capacity.
    pub fn init(&self, device: &Device) -> Result<RaggedCache> {
        if self.capacity == Some(0) {
            return Err(KvError::InvalidConfig {
                field: "capacity",
                reason: "must be at least 1 token".into(),
            });
        }
        Ok(RaggedCache {
            config: self.clone(),
            device: device.clone(),
            streams: (0..self.shape.streams())
                .map(|_| Stream::default())
                .collect(),
            logical: vec![0; self.shape.batch()],
            last_seen: vec![None; self.shape.batch()],
        })
    }
}

/// One (sequence, KV head): keys and values `[cap, head_dim]` of which `len` rows are held.
#[derive(Debug, Clone, Default)]
struct Stream {
    keys: Option<Tensor<2>>,
    values: Option<Tensor<2>>,
    len: usize,
    positions: Vec<u32>,
}

impl Stream {
    fn cap(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dims()[0])
    }

    fn held(&self) -> Option<(Tensor<2>, Tensor<2>)> {
        if self.len == 0 {
            return None;
        }
        let k = self.keys.as_ref()?;
        let d = k.dims()[1];
        let v = self.values.as_ref()?;
        Some((
            k.clone().slice([0..self.len, 0..d]),
            v.clone().slice([0..self.len, 0..d]),
        ))
    }
}

fn write_rows(buf: Option<Tensor<2>>, new: Tensor<2>, len: usize) -> Tensor<2> {
    let [n, d] = new.dims();
    match buf {
        Some(buf) if buf.dims()[0] >= len + n => buf.slice_assign([len..len + n, 0..d], new),
        buf => {
            let cap = (len + n).div_ceil(GROWTH_TOKENS) * GROWTH_TOKENS;
            let dtype = new.dtype();
            let device = new.device();
            let mut parts = Vec::with_capacity(3);
            if let Some(buf) = buf
                && len > 0
            {
                parts.push(buf.slice([0..len, 0..d]));
            }
            parts.push(new);
            if cap > len + n {
                parts.push(Tensor::zeros([cap - len - n, d], (&device, dtype)));
            }
            Tensor::cat(parts, 0)
        }
    }
}

/// A borrowed view of one (sequence, KV head) stream.
#[derive(Debug, Clone)]
pub struct StreamView<'a> {
    /// Held keys in fp32, `[len, head_dim]` (`None` when the stream is empty).
    pub keys: Option<Tensor<2>>,
    /// Held values in fp32, `[len, head_dim]`.
    pub values: Option<Tensor<2>>,
    /// Original positions of the held tokens, in row order: ascending, unless
    /// [`RaggedCache::append_into`] wrote new tokens into the rows of evicted ones.
    pub positions: &'a [u32],
}

/// Keys and values stored per (sequence, KV head), each stream compact and of its own length.
///
/// # Storage design
/// Each stream owns two `[cap, head_dim]` buffers with `cap` rounded up to
/// [`GROWTH_TOKENS`](crate::GROWTH_TOKENS) and a host list of original positions. Appends write
/// in place while capacity lasts; [`retain`](RaggedCache::retain) gathers the kept rows into
/// exactly-sized new buffers, so evicted tokens are freed, not masked. Attention runs per
/// stream over its held rows (no padding to a common length), which is what lets per-head
/// budgets (Ada-KV, HeadKV) save real memory and time.
#[derive(Debug, Clone)]
pub struct RaggedCache {
    config: RaggedCacheConfig,
    device: Device,
    streams: Vec<Stream>,
    logical: Vec<usize>,
    /// The last position appended per sequence (kept across evictions).
    last_seen: Vec<Option<u32>>,
}

impl RaggedCache {
    /// The configuration.
    pub fn config(&self) -> &RaggedCacheConfig {
        &self.config
    }

    /// The stream of sequence `b`, KV head `h`.
    ///
    /// # Panics
    /// If `b` or `h` is out of range.
    pub fn stream(&self, b: usize, h: usize) -> StreamView<'_> {
        let s = self.config.shape;
        assert!(
            b < s.batch() && h < s.kv_heads(),
            "RaggedCache::stream({b}, {h}) out of range"
        );
        let st = &self.streams[b * s.kv_heads() + h];
        let held = st.held();
        StreamView {
            keys: held.as_ref().map(|(k, _)| k.clone().cast(FloatDType::F32)),
            values: held.map(|(_, v)| v.cast(FloatDType::F32)),
            positions: &st.positions,
        }
    }

    /// Keeps, in every stream, only the rows at the given indices (into the held rows, sorted
    /// ascending and unique), gathering them into exactly-sized buffers; evicted rows are
    /// freed. `keep` has one list per (sequence, KV head), row-major.
    ///
    /// # Errors
    /// [`KvError::ShapeMismatch`] if `keep` has the wrong number of lists,
    /// [`KvError::IndexOutOfRange`] or [`KvError::BadPositions`] for an index that is out of
    /// range, repeated or unsorted. The cache is unchanged on error.
    pub fn retain(&mut self, keep: &[Vec<usize>]) -> Result<()> {
        const OP: &str = "RaggedCache::retain";
        if keep.len() != self.streams.len() {
            return Err(KvError::ShapeMismatch {
                op: OP,
                what: "keep lists (batch * kv_heads)",
                expected: self.streams.len(),
                got: keep.len(),
            });
        }
        for (st, idx) in self.streams.iter().zip(keep) {
            for (i, &j) in idx.iter().enumerate() {
                if j >= st.len {
                    return Err(KvError::IndexOutOfRange {
                        op: OP,
                        index: j,
                        len: st.len,
                    });
                }
                if i > 0 && idx[i - 1] >= j {
                    return Err(KvError::BadPositions {
                        op: OP,
                        reason: "keep indices must be sorted ascending and unique".into(),
                    });
                }
            }
        }
        for (st, idx) in self.streams.iter_mut().zip(keep) {
            if idx.len() == st.len {
                continue;
            }
            if idx.is_empty() {
                *st = Stream::default();
                continue;
            }
            let (k, v) = st
                .held()
                .expect("invariant: a non-empty stream holds buffers");
            let ids: Vec<i32> = idx.iter().map(|&j| j as i32).collect();
            let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [idx.len()]), &self.device);
            st.keys = Some(k.select(0, ids.clone()));
            st.values = Some(v.select(0, ids));
            st.positions = idx.iter().map(|&j| st.positions[j]).collect();
            st.len = idx.len();
        }
        Ok(())
    }

    /// The original positions of the tokens held by stream (`b`, `h`), in row order (see
    /// [`StreamView::positions`]); cheaper than [`stream`](RaggedCache::stream), which also
    /// hands out the keys and values.
    ///
    /// # Panics
    /// If `b` or `h` is out of range.
    pub fn positions(&self, b: usize, h: usize) -> &[u32] {
        let s = self.config.shape;
        assert!(
            b < s.batch() && h < s.kv_heads(),
            "RaggedCache::positions({b}, {h}) out of range"
        );
        &self.streams[b * s.kv_heads() + h].positions
    }

    /// The memory of sequence `b` alone: its streams' buffers and positions and its logical
    /// tokens. Summed over the sequences it is [`memory`](KvCache::memory), so that the bytes
    /// an eviction frees can be read per sequence of a batch.
    ///
    /// # Panics
    /// If `b` is out of range.
    pub fn sequence_memory(&self, b: usize) -> MemoryReport {
        let s = self.config.shape;
        assert!(
            b < s.batch(),
            "RaggedCache::sequence_memory({b}) out of range for batch {}",
            s.batch()
        );
        let row = s.head_dim() * self.config.dtype.size();
        let streams = &self.streams[b * s.kv_heads()..(b + 1) * s.kv_heads()];
        let cap: usize = streams.iter().map(Stream::cap).sum();
        let held: usize = streams.iter().map(|st| st.len).sum();
        let logical_tokens = self.logical[b];
        MemoryReport {
            key_bytes: cap * row,
            value_bytes: cap * row,
            metadata_bytes: held * core::mem::size_of::<u32>(),
            logical_elements: 2 * logical_tokens * s.kv_heads() * s.head_dim(),
            logical_tokens,
            held_token_slots: held,
        }
    }

    /// Shrinks every stream's buffers to exactly the held rows (drops growth slack).
    pub fn shrink_to_fit(&mut self) {
        for st in &mut self.streams {
            if st.cap() > st.len {
                let held = st.held();
                st.keys = held.as_ref().map(|(k, _)| k.clone());
                st.values = held.map(|(_, v)| v);
            }
            st.positions.shrink_to_fit();
        }
    }

    /// Appends a block as [`append`](KvCache::append) does, except that a stream given
    /// `Some(rows)` in `slots` (one entry per (sequence, KV head), row-major) writes its
    /// sequence's new tokens, in order, into those held rows, overwriting the tokens there
    /// (evicting them), instead of after its held rows: one row written per token and no copy
    /// of the others, the cheap path of a decode-time policy that evicts one token per new one.
    /// Such a stream's positions are then no longer in row order (see [`StreamView`]);
    /// attention masks by position, so its result is the same up to the summation order.
    /// A `None` stream appends as usual.
    ///
    /// # Errors
    /// As [`append`](KvCache::append); [`KvError::ShapeMismatch`] for a wrong number of slot
    /// lists or a list whose length is not the sequence's number of new tokens,
    /// [`KvError::IndexOutOfRange`] or [`KvError::BadPositions`] for a row that is not held or
    /// repeated. The cache is unchanged on error.
    pub fn append_into(&mut self, block: KvBlock, slots: &[Option<Vec<usize>>]) -> Result<()> {
        self.append_slots(block, Some(slots), "RaggedCache::append_into")
    }

    fn check_slots(
        &self,
        slots: &[Option<Vec<usize>>],
        counts: &[usize],
        op: &'static str,
    ) -> Result<()> {
        let kvh = self.config.shape.kv_heads();
        if slots.len() != self.streams.len() {
            return Err(KvError::ShapeMismatch {
                op,
                what: "slot lists (batch * kv_heads)",
                expected: self.streams.len(),
                got: slots.len(),
            });
        }
        for (si, rows) in slots.iter().enumerate() {
            let Some(rows) = rows else { continue };
            if rows.len() != counts[si / kvh] {
                return Err(KvError::ShapeMismatch {
                    op,
                    what: "slots of a stream (its sequence's new tokens)",
                    expected: counts[si / kvh],
                    got: rows.len(),
                });
            }
            let len = self.streams[si].len;
            for (i, &r) in rows.iter().enumerate() {
                if r >= len {
                    return Err(KvError::IndexOutOfRange { op, index: r, len });
                }
                if rows[..i].contains(&r) {
                    return Err(KvError::BadPositions {
                        op,
                        reason: format!("slot {r} given twice"),
                    });
                }
            }
        }
        Ok(())
    }

    /// [`append`](KvCache::append), writing the new tokens of the streams given a `Some`
    /// in `slots` into those rows instead of after the held ones.
    fn append_slots(
        &mut self,
        block: KvBlock,
        slots: Option<&[Option<Vec<usize>>]>,
        op: &'static str,
    ) -> Result<()> {
        let s = self.config.shape;
        check_block(&s, &block, op)?;
        let n = block.seq_len();
        let counts = check_positions(block.positions(), s.batch(), &self.last_seen, op)?;
        if let Some(slots) = slots {
            self.check_slots(slots, &counts, op)?;
        }
        let slot = |si: usize| slots.and_then(|sl| sl[si].as_deref());
        if let Some(cap) = self.config.capacity {
            for b in 0..s.batch() {
                for h in 0..s.kv_heads() {
                    let si = b * s.kv_heads() + h;
                    let grows = if slot(si).is_some() { 0 } else { counts[b] };
                    let requested = self.streams[si].len + grows;
                    if requested > cap {
                        return Err(KvError::CapacityExceeded {
                            op,
                            capacity: cap,
                            requested,
                        });
                    }
                }
            }
        }

        let dtype = match self.config.dtype {
            StorageDtype::F32 => FloatDType::F32,
            StorageDtype::F16 => FloatDType::F16,
        };
        let (keys, values, pos) = block.into_parts();
        let d = s.head_dim();
        for b in 0..s.batch() {
            if counts[b] == 0 {
                continue;
            }
            let row = &pos[b * n..(b + 1) * n];
            let kept: Vec<usize> = (0..n).filter(|&i| row[i] != PAD).collect();
            let mut kb = keys.clone().slice([b..b + 1, 0..s.kv_heads(), 0..n, 0..d]);
            let mut vb = values
                .clone()
                .slice([b..b + 1, 0..s.kv_heads(), 0..n, 0..d]);
            if kept.len() < n {
                let ids: Vec<i32> = kept.iter().map(|&i| i as i32).collect();
                let ids =
                    Tensor::<1, Int>::from_data(TensorData::new(ids, [kept.len()]), &self.device);
                kb = kb.select(2, ids.clone());
                vb = vb.select(2, ids);
            }
            let m = kept.len();
            for h in 0..s.kv_heads() {
                let rows = slot(b * s.kv_heads() + h).map(<[usize]>::to_vec);
                let st = &mut self.streams[b * s.kv_heads() + h];
                let kh = kb
                    .clone()
                    .slice([0..1, h..h + 1, 0..m, 0..d])
                    .reshape([m, d]);
                let vh = vb
                    .clone()
                    .slice([0..1, h..h + 1, 0..m, 0..d])
                    .reshape([m, d]);
                if let Some(rows) = rows {
                    // One row written per new token, in place: the rows of evicted tokens.
                    let (kh, vh) = (kh.cast(dtype), vh.cast(dtype));
                    let (mut keys, mut values) = (
                        st.keys
                            .take()
                            .expect("invariant: checked slots are held rows"),
                        st.values
                            .take()
                            .expect("invariant: checked slots are held rows"),
                    );
                    for (i, &r) in rows.iter().enumerate() {
                        let (k, v) = (kh.clone(), vh.clone());
                        keys = keys.slice_assign([r..r + 1, 0..d], k.slice([i..i + 1, 0..d]));
                        values = values.slice_assign([r..r + 1, 0..d], v.slice([i..i + 1, 0..d]));
                        st.positions[r] = row[kept[i]];
                    }
                    st.keys = Some(keys);
                    st.values = Some(values);
                    continue;
                }
                st.keys = Some(write_rows(st.keys.take(), kh.cast(dtype), st.len));
                st.values = Some(write_rows(st.values.take(), vh.cast(dtype), st.len));
                st.positions.extend(kept.iter().map(|&i| row[i]));
                st.len += m;
            }
            self.logical[b] += counts[b];
            self.last_seen[b] = kept.last().map(|&i| row[i]);
        }
        Ok(())
    }

    fn attend_stream(
        &self,
        b: usize,
        h: usize,
        query: &Query,
        stats: StatsRequest,
    ) -> (Tensor<4>, AttentionStats) {
        let s = self.config.shape;
        let g = s.group();
        let [_, _, n, d] = query.tensor().dims();
        let q = query
            .tensor()
            .clone()
            .slice([b..b + 1, h * g..(h + 1) * g, 0..n, 0..d]);
        let st = &self.streams[b * s.kv_heads() + h];
        match st.held() {
            None => (q.zeros_like(), AttentionStats::default()),
            Some((k, v)) => {
                let len = st.len;
                let k = k.cast(FloatDType::F32).reshape([1, 1, len, d]);
                let v = v.cast(FloatDType::F32).reshape([1, 1, len, d]);
                reference_attention(
                    q,
                    k,
                    v,
                    &query.positions()[b * n..(b + 1) * n],
                    KeyPositions::PerSequence(&st.positions),
                    None,
                    stats,
                )
            }
        }
    }
}

/// Pads `[1, 1, g, len]` statistics to `[1, 1, g, width]` with zeros.
fn pad_stats(t: Option<Tensor<4>>, g: usize, width: usize, device: &Device) -> Tensor<4> {
    match t {
        None => Tensor::zeros([1, 1, g, width], device),
        Some(t) => {
            let len = t.dims()[3];
            if len == width {
                t
            } else {
                Tensor::cat(vec![t, Tensor::zeros([1, 1, g, width - len], device)], 3)
            }
        }
    }
}

impl KvCache for RaggedCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> Result<()> {
        self.append_slots(block, None, "RaggedCache::append")
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> Result<Attended> {
        const OP: &str = "RaggedCache::attend";
        let s = self.config.shape;
        check_query(&s, query, OP)?;
        let width = self.streams.iter().map(|st| st.len).max().unwrap_or(0);
        let g = s.group();
        let mut batch_out = Vec::with_capacity(s.batch());
        let (mut col_b, mut last_b) = (Vec::new(), Vec::new());
        for b in 0..s.batch() {
            let mut head_out = Vec::with_capacity(s.kv_heads());
            let (mut col_h, mut last_h) = (Vec::new(), Vec::new());
            for h in 0..s.kv_heads() {
                let (out, st) = self.attend_stream(b, h, query, stats);
                head_out.push(out);
                if stats.column_sums {
                    col_h.push(pad_stats(st.column_sums, g, width, &self.device));
                }
                if stats.last_row {
                    last_h.push(pad_stats(st.last_row, g, width, &self.device));
                }
            }
            batch_out.push(Tensor::cat(head_out, 1));
            if stats.column_sums {
                col_b.push(Tensor::cat(col_h, 1));
            }
            if stats.last_row {
                last_b.push(Tensor::cat(last_h, 1));
            }
        }
        let stats = AttentionStats {
            column_sums: stats.column_sums.then(|| Tensor::cat(col_b, 0)),
            last_row: stats.last_row.then(|| Tensor::cat(last_b, 0)),
        };
        Ok(Attended {
            output: Tensor::cat(batch_out, 0),
            stats,
        })
    }

    fn view(&self) -> KvView {
        let s = self.config.shape;
        let (d, width) = (
            s.head_dim(),
            self.streams.iter().map(|st| st.len).max().unwrap_or(0),
        );
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
            let zeros = || Tensor::<2>::zeros([pad, d], &self.device);
            let (k, v) = match st.held() {
                Some((k, v)) => (k.cast(FloatDType::F32), v.cast(FloatDType::F32)),
                None => (zeros(), zeros()),
            };
            let (k, v) = if pad > 0 && st.len > 0 {
                (
                    Tensor::cat(vec![k, zeros()], 0),
                    Tensor::cat(vec![v, zeros()], 0),
                )
            } else {
                (k, v)
            };
            ks.push(k.reshape([1, width, d]));
            vs.push(v.reshape([1, width, d]));
            positions.extend_from_slice(&st.positions);
            positions.extend(core::iter::repeat_n(PAD, pad));
        }
        let shape = [s.batch(), s.kv_heads(), width, d];
        KvView {
            keys: Tensor::cat(ks, 0).reshape(shape),
            values: Tensor::cat(vs, 0).reshape(shape),
            positions,
        }
    }

    fn lengths(&self) -> Lengths {
        Lengths {
            held: self.streams.iter().map(|st| st.len).collect(),
            logical: self.logical.clone(),
        }
    }

    fn memory(&self) -> MemoryReport {
        let s = self.config.shape;
        let row = s.head_dim() * self.config.dtype.size();
        let cap: usize = self.streams.iter().map(Stream::cap).sum();
        let held: usize = self.streams.iter().map(|st| st.len).sum();
        let logical_tokens: usize = self.logical.iter().sum();
        MemoryReport {
            key_bytes: cap * row,
            value_bytes: cap * row,
            metadata_bytes: held * core::mem::size_of::<u32>(),
            logical_elements: 2 * logical_tokens * s.kv_heads() * s.head_dim(),
            logical_tokens,
            held_token_slots: held,
        }
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = Vec::new();
        for st in &self.streams {
            if let Some(k) = &st.keys {
                out.push(HeldBuffer::tensor(StorageRole::Keys, k));
            }
            if let Some(v) = &st.values {
                out.push(HeldBuffer::tensor(StorageRole::Values, v));
            }
            out.push(HeldBuffer::host(StorageRole::Metadata, &st.positions));
        }
        out
    }

    fn reset(&mut self) {
        self.streams
            .iter_mut()
            .for_each(|st| *st = Stream::default());
        self.logical.iter_mut().for_each(|l| *l = 0);
        self.last_seen.iter_mut().for_each(|l| *l = None);
    }
}
