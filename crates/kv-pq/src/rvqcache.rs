//! The residual-VQ KV cache (Kumar, *Residual vector quantization for KV cache compression in
//! large language model*, arXiv 2410.15704; iankur/vqllm): every key and value is stored as
//! code indices of per-(layer, KV head) residual codebooks learned offline, plus one fp16
//! scale per token and head. See [`crate::rvq`] for the quantizer.
//!
//! # What is held
//! Per token and KV head: `G · S` codes (`G = head_dim / sub_dim` groups, `S` stages) for the
//! key and for the value, as `u8` when the codebooks have at most 256 entries, else `u16`, and
//! one fp16 `σ` each. Per layer: the key and value codebooks of every KV head in fp16 (the
//! codes are chosen against the fp16-rounded codebooks, so what is decoded is what was
//! encoded against). Per sequence and token: a `u32` position. Nothing is kept in full
//! precision: bits per element include the codebooks, so they fall as the context grows.
//!
//! # Attention
//! Decode-sized queries (at most [`TABLE_MAX_ROWS`] query rows per KV head: `q_heads /
//! kv_heads × query tokens`) on a device whose tensors live in host memory (the CPU backends
//! `flex` and `ndarray`) never reconstruct a key or a value ([`RvqCache::attend_tables`]).
//! With `q_r` a query row scaled by `1/√d`, `q_{r,g}` its channels of group `g` and `B_s` the
//! codebooks of the KV head, the key of token `t` scores
//!
//! `q_r · k̂_t = σ_t · Σ_g Σ_s T_r[g][s][i_{t,g,s}]`,  `T_r[g][s][c] = q_{r,g} · B_s[c]`,
//!
//! so a step builds one table of `G · S · C` floats per query row (`G · S · C · d̂` multiply-adds)
//! and then costs `G · S` look-ups per token and row. The values are summed per code:
//! with `p_{r,t}` the softmax weights, `H_r[g][s][c] = Σ_{t : i_{t,g,s} = c} p_{r,t} σ_t` (one
//! scatter-add per token, group and stage) and the output on the channels of group `g` is
//! `Σ_s Σ_c H_r[g][s][c] · B_s[c]`. Softmax is exact (all scores of a row are held, a few
//! hundred kilobytes at decode sizes); scores and histograms run on rayon's pool over
//! (stream, token range) tasks.
//!
//! Larger queries (prefill chunks) and other devices take [`RvqCache::attend_chunked`]: it
//! decodes `chunk` tokens at a time (default 1024) and merges the exact attention of each
//! chunk with the online-softmax rule ([`kv_core::merge_attention`]), so it never materialises
//! more than one chunk of fp32 keys and values. Attention statistics (`StatsRequest`) and
//! [`view`](KvCache::view) decode everything: [`RvqCache::attend_decoded`] is the oracle of the
//! tests.

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::{FloatDType, IntDType};
use kv_core::{
    Attended, HeldBuffer, KeyPositions, KvBlock, KvCache, KvError, KvShape, KvView, Lengths,
    MemoryReport, PAD, Query, StatsRequest, StorageRole, check_block, check_positions, check_query,
    merge_attention, positions_per_head, reference_attention, reference_attention_lse, sum_held,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::budget;
use crate::rvq::{ResidualQuantizer, RvqArtefact, from_groups, to_groups, token_scale};

fn default_chunk() -> usize {
    1024
}

/// Configuration of an [`RvqCache`]: the artefact, the layer it serves and how many of the
/// trained stages to use (all by default). Attention that does not take the look-up tables
/// (prefill queries, non-host devices) decodes `chunk` tokens at a time (default 1024).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RvqConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Path of the [`RvqArtefact`] (JSON, from `kv-eval calibrate --rvq FILE`).
    pub calibration: PathBuf,
    /// The layer this cache serves.
    pub layer: usize,
    /// Layers of the model, checked against the artefact when set.
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Stages used (the first ones of the artefact); `None`: all.
    #[serde(default)]
    pub stages: Option<usize>,
    /// Tokens decoded at a time by the chunked path ([`RvqCache::attend_chunked`]).
    #[serde(default = "default_chunk")]
    pub chunk: usize,
}

impl RvqConfig {
    /// The cache of `layer` with the artefact at `calibration`, every stage, chunks of 1024.
    pub fn new(shape: KvShape, calibration: impl Into<PathBuf>, layer: usize) -> Self {
        RvqConfig {
            shape,
            calibration: calibration.into(),
            layer,
            num_layers: None,
            stages: None,
            chunk: default_chunk(),
        }
    }
    /// Uses the first `stages` stages only.
    pub fn with_stages(mut self, stages: usize) -> Self {
        self.stages = Some(stages);
        self
    }
    /// Checks the artefact's layer count against the model's.
    pub fn with_num_layers(mut self, num_layers: usize) -> Self {
        self.num_layers = Some(num_layers);
        self
    }
    /// Sets the chunk of the chunked path.
    pub fn with_chunk(mut self, chunk: usize) -> Self {
        self.chunk = chunk;
        self
    }

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &["calibration", "stages", "chunk"];

    /// The config of `layer` from `key=value` parameters: `calibration` (path, required),
    /// `stages` and `chunk` (integers). Validated at [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for an unknown name, a bad value or no `calibration`.
    pub fn from_params<'a>(
        shape: KvShape,
        layer: usize,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        let mut cfg = RvqConfig::new(shape, PathBuf::new(), layer);
        for (k, v) in params {
            match k {
                "calibration" => cfg.calibration = PathBuf::from(v),
                "stages" => cfg.stages = Some(budget::int("stages", v)?),
                "chunk" => cfg.chunk = budget::int("chunk", v)?,
                _ => return Err(budget::unknown("RVQ", k, Self::PARAMS)),
            }
        }
        if cfg.calibration.as_os_str().is_empty() {
            return Err(KvError::InvalidConfig {
                field: "calibration",
                reason: "required: the path of an RVQ artefact (`kv-eval calibrate --rvq FILE`)"
                    .into(),
            });
        }
        Ok(cfg)
    }

    /// Loads the artefact at [`calibration`](Self::calibration) and builds the cache.
    ///
    /// # Errors
    /// As [`init_with`](Self::init_with), and for a missing or invalid artefact.
    pub fn init(&self, device: &Device) -> kv_core::Result<RvqCache> {
        self.init_with(&RvqArtefact::load(&self.calibration)?, device)
    }

    /// Builds the cache from an artefact already loaded.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a zero chunk, an inconsistent artefact, one of another
    /// model shape (KV heads, head_dim, layer count), a layer out of range or more stages than
    /// it has.
    pub fn init_with(&self, artefact: &RvqArtefact, device: &Device) -> kv_core::Result<RvqCache> {
        if self.chunk == 0 {
            return Err(KvError::InvalidConfig {
                field: "chunk",
                reason: "attention needs at least one token per chunk".into(),
            });
        }
        artefact.validate()?;
        let s = self.shape;
        artefact.check_model(s.kv_heads(), s.head_dim(), self.num_layers, self.layer)?;
        let stages = self.stages.unwrap_or(artefact.stages);
        let (kq, vq) = artefact.quantizers(self.layer, stages, device)?;
        let code_dtype = if artefact.entries <= 256 {
            IntDType::U8
        } else {
            IntDType::U16
        };
        Ok(RvqCache {
            config: self.clone(),
            device: device.clone(),
            key_books: kq.codebooks().clone().cast(FloatDType::F16),
            value_books: vq.codebooks().clone().cast(FloatDType::F16),
            strided_keys: artefact.strided_keys,
            code_dtype,
            keys: None,
            values: None,
            len: 0,
            positions: vec![Vec::new(); s.batch()],
            logical: vec![0; s.batch()],
        })
    }
}

/// Codes and scales of one tensor (keys or values) of every held token.
#[derive(Debug, Clone)]
struct Coded {
    /// `[batch, kv_heads, len, G * S]`, `u8` or `u16`.
    codes: Tensor<4, Int>,
    /// `[batch, kv_heads, len, 1]`, fp16.
    scale: Tensor<4>,
}

/// A residual-VQ cache for one layer. See the module docs.
#[derive(Debug, Clone)]
pub struct RvqCache {
    config: RvqConfig,
    device: Device,
    /// `[kv_heads, stages, entries, sub_dim]`, fp16.
    key_books: Tensor<4>,
    value_books: Tensor<4>,
    strided_keys: bool,
    code_dtype: IntDType,
    keys: Option<Coded>,
    values: Option<Coded>,
    len: usize,
    positions: Vec<Vec<u32>>,
    logical: Vec<usize>,
}

impl RvqCache {
    /// The configuration.
    pub fn config(&self) -> &RvqConfig {
        &self.config
    }
    /// Slots held per sequence (padding included).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Stages in use.
    pub fn stages(&self) -> usize {
        self.key_books.dims()[1]
    }
    /// Codebook entries.
    pub fn entries(&self) -> usize {
        self.key_books.dims()[2]
    }
    /// Channels per quantized group.
    pub fn sub_dim(&self) -> usize {
        self.key_books.dims()[3]
    }
    /// The key codes of every held token, `[batch, kv_heads, len, G * S]` (group-major: the
    /// `S` stage codes of group 0, then of group 1, ...).
    pub fn key_codes(&self) -> Option<&Tensor<4, Int>> {
        self.keys.as_ref().map(|c| &c.codes)
    }
    /// Bytes of the key and value codebooks held (per layer, whatever the context length).
    pub fn codebook_bytes(&self) -> usize {
        let bytes = |t: &Tensor<4>| t.shape().num_elements() * t.dtype().size();
        bytes(&self.key_books) + bytes(&self.value_books)
    }

    fn quantizer(books: &Tensor<4>) -> ResidualQuantizer {
        ResidualQuantizer::from_codebooks(books.clone())
    }

    fn encode(&self, x: Tensor<4>, books: &Tensor<4>, strided: bool) -> Coded {
        let [b, h, n, _] = x.dims();
        let scale = token_scale(&x);
        let rq = Self::quantizer(books);
        let groups = to_groups(x / scale.clone(), rq.sub_dim(), strided);
        let codes = rq.encode(groups); // [h, b * n * G, S]
        let gs = codes.dims()[1] / (b * n) * rq.stages();
        Coded {
            codes: codes
                .reshape([h, b, n, gs])
                .swap_dims(0, 1)
                .cast(self.code_dtype),
            scale: scale.cast(FloatDType::F16),
        }
    }

    fn decode(
        coded: &Coded,
        books: &Tensor<4>,
        strided: bool,
        from: usize,
        to: usize,
    ) -> Tensor<4> {
        let [b, h, _, gs] = coded.codes.dims();
        let n = to - from;
        let rq = Self::quantizer(books);
        let s = rq.stages();
        let codes = coded
            .codes
            .clone()
            .slice([0..b, 0..h, from..to, 0..gs])
            .swap_dims(0, 1)
            .reshape([h, b * n * (gs / s), s]);
        let scale = coded
            .scale
            .clone()
            .slice([0..b, 0..h, from..to, 0..1])
            .cast(FloatDType::F32);
        from_groups(rq.decode(codes), b, n, strided) * scale
    }

    /// Keys and values of slots `from..to`, decoded to fp32 `[batch, kv_heads, to - from,
    /// head_dim]`.
    fn decoded(&self, from: usize, to: usize) -> Option<(Tensor<4>, Tensor<4>)> {
        let (k, v) = (self.keys.as_ref()?, self.values.as_ref()?);
        Some((
            Self::decode(k, &self.key_books, self.strided_keys, from, to),
            Self::decode(v, &self.value_books, false, from, to),
        ))
    }

    fn chunk_positions(&self, from: usize, to: usize) -> Vec<u32> {
        self.positions
            .iter()
            .flat_map(|p| p[from..to].iter().copied())
            .collect()
    }

    /// Attention streamed over chunks of decoded tokens: output and log-sum-exp.
    fn attend_streamed(&self, query: &Query) -> (Tensor<4>, Tensor<4>) {
        let q = query.tensor();
        let mut acc: Option<(Tensor<4>, Tensor<4>)> = None;
        let mut from = 0;
        while from < self.len {
            let to = (from + self.config.chunk).min(self.len);
            let (k, v) = self
                .decoded(from, to)
                .expect("invariant: a non-empty cache holds codes");
            let kp = self.chunk_positions(from, to);
            let part = reference_attention_lse(
                q.clone(),
                k,
                v,
                query.positions(),
                KeyPositions::PerSequence(&kp),
                None,
            );
            acc = Some(match acc {
                Some((o, l)) => merge_attention(o, l, part.0, part.1),
                None => part,
            });
            from = to;
        }
        acc.unwrap_or_else(|| {
            let s = self.config.shape;
            let n = q.dims()[2];
            (
                q.zeros_like(),
                Tensor::full(
                    [s.batch(), s.kv_heads(), s.group(), n],
                    f32::MIN,
                    &self.device,
                ),
            )
        })
    }

    fn append_coded(old: Option<Coded>, new: Coded) -> Coded {
        match old {
            Some(o) => Coded {
                codes: Tensor::cat(vec![o.codes, new.codes], 2),
                scale: Tensor::cat(vec![o.scale, new.scale], 2),
            },
            None => new,
        }
    }
}

impl KvCache for RvqCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        const OP: &str = "RvqCache::append";
        let shape = self.config.shape;
        check_block(&shape, &block, OP)?;
        let last: Vec<Option<u32>> = self
            .positions
            .iter()
            .map(|p| p.iter().rev().copied().find(|&x| x != PAD))
            .collect();
        let counts = check_positions(block.positions(), shape.batch(), &last, OP)?;
        let n = block.seq_len();
        let (k, v, pos) = block.into_parts();
        let kc = self.encode(k, &self.key_books, self.strided_keys);
        let vc = self.encode(v, &self.value_books, false);
        self.keys = Some(Self::append_coded(self.keys.take(), kc));
        self.values = Some(Self::append_coded(self.values.take(), vc));
        for b in 0..shape.batch() {
            self.positions[b].extend_from_slice(&pos[b * n..(b + 1) * n]);
            self.logical[b] += counts[b];
        }
        self.len += n;
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        check_query(&self.config.shape, query, "RvqCache::attend")?;
        if stats.any() {
            let view = self.view();
            return Ok(view.attend_reference(query, stats));
        }
        Ok(Attended {
            output: self.attend_fastest(query).0,
            stats: Default::default(),
        })
    }

    fn attend_lse(&mut self, query: &Query) -> kv_core::Result<(Tensor<4>, Tensor<4>)> {
        check_query(&self.config.shape, query, "RvqCache::attend_lse")?;
        Ok(self.attend_fastest(query))
    }

    fn view(&self) -> KvView {
        let s = self.config.shape;
        let (keys, values) = self.decoded(0, self.len).unwrap_or_else(|| {
            let z = Tensor::zeros([s.batch(), s.kv_heads(), 0, s.head_dim()], &self.device);
            (z.clone(), z)
        });
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
        let (key_bytes, value_bytes, metadata_bytes) = sum_held(&self.held_buffers());
        let logical_tokens: usize = self.logical.iter().sum();
        MemoryReport {
            key_bytes,
            value_bytes,
            metadata_bytes,
            logical_elements: 2 * logical_tokens * s.kv_heads() * s.head_dim(),
            logical_tokens,
            held_token_slots: s.streams() * self.len,
        }
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = vec![
            HeldBuffer::tensor(StorageRole::Keys, &self.key_books),
            HeldBuffer::tensor(StorageRole::Values, &self.value_books),
        ];
        for (role, c) in [
            (StorageRole::Keys, &self.keys),
            (StorageRole::Values, &self.values),
        ] {
            if let Some(c) = c {
                out.push(HeldBuffer::tensor(role, &c.codes));
                out.push(HeldBuffer::tensor(role, &c.scale));
            }
        }
        for p in &self.positions {
            out.push(HeldBuffer::host(StorageRole::Metadata, p));
        }
        out
    }

    fn reset(&mut self) {
        self.keys = None;
        self.values = None;
        self.len = 0;
        for p in &mut self.positions {
            *p = Vec::new();
        }
        self.logical.iter_mut().for_each(|l| *l = 0);
    }
}

/// The oracle of the tests: plain decode-then-attend over every held token.
impl RvqCache {
    /// Attention over the fully decoded cache (every key and value materialised in fp32, then
    /// [`reference_attention`]): what the streamed `attend` must equal up to rounding.
    ///
    /// # Errors
    /// Shape and finiteness problems of the query.
    pub fn attend_decoded(&self, query: &Query) -> kv_core::Result<Tensor<4>> {
        check_query(&self.config.shape, query, "RvqCache::attend_decoded")?;
        let v = self.view();
        Ok(reference_attention(
            query.tensor().clone(),
            v.keys,
            v.values,
            query.positions(),
            KeyPositions::PerHead(&v.positions),
            None,
            StatsRequest::NONE,
        )
        .0)
    }
}

/// The most query rows per KV head (`q_heads / kv_heads × query tokens`) that
/// [`RvqCache::attend`] scores through look-up tables; larger queries (prefill chunks) decode
/// chunks of keys and values, whose matmuls amortise the decoding over many rows.
pub const TABLE_MAX_ROWS: usize = 64;

/// Tokens per parallel work item of the table path: large enough that a task amortises its
/// value histogram (`G · S · C` floats per row), small enough that both cores of a small
/// machine share a few thousand tokens.
const TOKENS_PER_TASK: usize = 4096;

/// Whether tensors on `device` live in host memory, so that reading them back is a copy of
/// their bytes and the table path applies (the CPU backends `flex` and `ndarray`; the same
/// test as kv-quant's host attention).
fn host_memory(device: &Device) -> bool {
    let name = format!("{:?}", device.as_dispatch());
    name.starts_with("Flex") || name.starts_with("NdArray")
}

/// A float tensor read back as fp32.
fn host_floats<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.clone()
        .cast(FloatDType::F32)
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("invariant: a float tensor reads back as f32")
}

/// Codes of one tensor on the host, `[batch, kv_heads, len, G * S]` row-major.
enum HostCodes {
    U8(Vec<u8>),
    U16(Vec<u16>),
}

impl HostCodes {
    fn read(codes: &Tensor<4, Int>) -> Self {
        let data = codes.to_data();
        if data.dtype() == burn::tensor::DType::U8 {
            HostCodes::U8(data.try_into_vec::<u8>().expect("invariant: u8 codes"))
        } else {
            HostCodes::U16(
                data.try_into_vec_as::<u16>()
                    .expect("invariant: RVQ codes read back as u8 or u16"),
            )
        }
    }
}

/// What one stream's table attention needs: the layout of the codes and of the codebooks.
#[derive(Clone, Copy)]
struct TableLayout {
    /// Query rows per stream.
    rows: usize,
    /// Channel groups `G`.
    groups: usize,
    /// Stages `S`.
    stages: usize,
    /// Entries `C`.
    entries: usize,
    /// Channels per group `d̂`.
    sub: usize,
}

impl TableLayout {
    /// Codes per token (`G · S`).
    fn codes(&self) -> usize {
        self.groups * self.stages
    }
    /// Floats of one table or histogram of a stream: `[G · S, C, rows]`.
    fn table_len(&self) -> usize {
        self.codes() * self.entries * self.rows
    }
    /// The head channel of element `e` of group `g`.
    fn channel(&self, g: usize, e: usize, strided: bool) -> usize {
        if strided {
            e * self.groups + g
        } else {
            g * self.sub + e
        }
    }
}

/// The look-up table of one stream, `[G · S, C, rows]` (rows innermost, so the rows of one
/// code are adjacent): `T[g·S + s][c][r] = q_{r,g} · B_s[c]`. `q` holds the stream's rows
/// (`rows × d`, already scaled), `books` the KV head's codebooks `[S, C, d̂]`.
fn key_table(q: &[f32], books: &[f32], l: TableLayout, strided: bool) -> Vec<f32> {
    let d = l.groups * l.sub;
    let mut table = vec![0.0f32; l.table_len()];
    let mut qg = vec![0.0f32; l.sub];
    for r in 0..l.rows {
        for g in 0..l.groups {
            for (e, x) in qg.iter_mut().enumerate() {
                *x = q[r * d + l.channel(g, e, strided)];
            }
            for s in 0..l.stages {
                let j = g * l.stages + s;
                for c in 0..l.entries {
                    let cw = &books[(s * l.entries + c) * l.sub..][..l.sub];
                    let dot: f32 = qg.iter().zip(cw).map(|(a, b)| a * b).sum();
                    table[(j * l.entries + c) * l.rows + r] = dot;
                }
            }
        }
    }
    table
}

/// Scores of tokens `t0..t0 + out.len() / rows` of one stream (token-major, `rows` per token):
/// `σ_t · Σ_j T[j][code_{t,j}]`. The common row counts (GQA groups of one decode token) take
/// a copy with the rows known at compile time, so the row loop is unrolled.
fn table_scores<C: Copy + Into<usize>>(
    codes: &[C],
    scale: &[f32],
    table: &[f32],
    l: TableLayout,
    t0: usize,
    out: &mut [f32],
) {
    match l.rows {
        1 => scores_fixed::<C, 1>(codes, scale, table, l, t0, out),
        2 => scores_fixed::<C, 2>(codes, scale, table, l, t0, out),
        3 => scores_fixed::<C, 3>(codes, scale, table, l, t0, out),
        4 => scores_fixed::<C, 4>(codes, scale, table, l, t0, out),
        6 => scores_fixed::<C, 6>(codes, scale, table, l, t0, out),
        8 => scores_fixed::<C, 8>(codes, scale, table, l, t0, out),
        _ => scores_any(codes, scale, table, l, t0, out),
    }
}

fn scores_fixed<C: Copy + Into<usize>, const R: usize>(
    codes: &[C],
    scale: &[f32],
    table: &[f32],
    l: TableLayout,
    t0: usize,
    out: &mut [f32],
) {
    let (gs, c_n) = (l.codes(), l.entries);
    for (i, row) in out.chunks_exact_mut(R).enumerate() {
        let t = t0 + i;
        let mut acc = [0.0f32; R];
        for (j, &c) in codes[t * gs..(t + 1) * gs].iter().enumerate() {
            let at = (j * c_n + c.into()) * R;
            let entry: &[f32; R] = table[at..at + R]
                .try_into()
                .expect("invariant: R floats per code");
            for (a, x) in acc.iter_mut().zip(entry) {
                *a += x;
            }
        }
        let st = scale[t];
        for (o, a) in row.iter_mut().zip(acc) {
            *o = a * st;
        }
    }
}

fn scores_any<C: Copy + Into<usize>>(
    codes: &[C],
    scale: &[f32],
    table: &[f32],
    l: TableLayout,
    t0: usize,
    out: &mut [f32],
) {
    let (gs, c_n, rows) = (l.codes(), l.entries, l.rows);
    for (i, acc) in out.chunks_exact_mut(rows).enumerate() {
        let t = t0 + i;
        for (j, &c) in codes[t * gs..(t + 1) * gs].iter().enumerate() {
            let entry = &table[(j * c_n + c.into()) * rows..][..rows];
            for (a, x) in acc.iter_mut().zip(entry) {
                *a += x;
            }
        }
        let st = scale[t];
        acc.iter_mut().for_each(|a| *a *= st);
    }
}

/// Adds `p_{r,t} σ_t` of tokens `t0..t0 + p.len() / rows` to the value histogram `[G · S, C,
/// rows]` of one stream (common row counts unrolled, as in [`table_scores`]). Tokens with no
/// weight in any row (masked, or underflowed) are skipped.
fn value_histogram<C: Copy + Into<usize>>(
    codes: &[C],
    scale: &[f32],
    p: &[f32],
    l: TableLayout,
    t0: usize,
    hist: &mut [f32],
) {
    match l.rows {
        1 => histogram_fixed::<C, 1>(codes, scale, p, l, t0, hist),
        2 => histogram_fixed::<C, 2>(codes, scale, p, l, t0, hist),
        3 => histogram_fixed::<C, 3>(codes, scale, p, l, t0, hist),
        4 => histogram_fixed::<C, 4>(codes, scale, p, l, t0, hist),
        6 => histogram_fixed::<C, 6>(codes, scale, p, l, t0, hist),
        8 => histogram_fixed::<C, 8>(codes, scale, p, l, t0, hist),
        _ => histogram_any(codes, scale, p, l, t0, hist),
    }
}

fn histogram_fixed<C: Copy + Into<usize>, const R: usize>(
    codes: &[C],
    scale: &[f32],
    p: &[f32],
    l: TableLayout,
    t0: usize,
    hist: &mut [f32],
) {
    let (gs, c_n) = (l.codes(), l.entries);
    for (i, pt) in p.chunks_exact(R).enumerate() {
        if pt.iter().all(|&x| x == 0.0) {
            continue;
        }
        let t = t0 + i;
        let st = scale[t];
        let mut w = [0.0f32; R];
        for (wr, &x) in w.iter_mut().zip(pt) {
            *wr = x * st;
        }
        for (j, &c) in codes[t * gs..(t + 1) * gs].iter().enumerate() {
            let at = (j * c_n + c.into()) * R;
            let bin: &mut [f32; R] = (&mut hist[at..at + R])
                .try_into()
                .expect("invariant: R floats per code");
            for (h, x) in bin.iter_mut().zip(w) {
                *h += x;
            }
        }
    }
}

fn histogram_any<C: Copy + Into<usize>>(
    codes: &[C],
    scale: &[f32],
    p: &[f32],
    l: TableLayout,
    t0: usize,
    hist: &mut [f32],
) {
    let (gs, c_n, rows) = (l.codes(), l.entries, l.rows);
    let mut w = vec![0.0f32; rows];
    for (i, pt) in p.chunks_exact(rows).enumerate() {
        if pt.iter().all(|&x| x == 0.0) {
            continue;
        }
        let t = t0 + i;
        let st = scale[t];
        for (wr, &x) in w.iter_mut().zip(pt) {
            *wr = x * st;
        }
        for (j, &c) in codes[t * gs..(t + 1) * gs].iter().enumerate() {
            let bin = &mut hist[(j * c_n + c.into()) * rows..][..rows];
            for (h, x) in bin.iter_mut().zip(&w) {
                *h += x;
            }
        }
    }
}

/// Masks one stream's scores (token-major, `qrow.len()` rows) and turns them into softmax
/// numerators in place; returns the maxima and sums per row. A key after the query's position
/// or a padding slot gets no weight.
fn softmax_rows(scores: &mut [f32], qrow: &[u32], kpos: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let rows = qrow.len();
    let mut maxes = vec![f32::NEG_INFINITY; rows];
    let mut sums = vec![0.0f32; rows];
    for (row, &kp) in scores.chunks_exact_mut(rows).zip(kpos) {
        for ((s, m), &qp) in row.iter_mut().zip(maxes.iter_mut()).zip(qrow) {
            if qp == PAD || kp == PAD || kp > qp {
                *s = f32::NEG_INFINITY;
            }
            *m = m.max(*s);
        }
    }
    for row in scores.chunks_exact_mut(rows) {
        for ((s, &m), l) in row.iter_mut().zip(&maxes).zip(sums.iter_mut()) {
            *s = if m == f32::NEG_INFINITY {
                0.0
            } else {
                (*s - m).exp()
            };
            *l += *s;
        }
    }
    (maxes, sums)
}

impl RvqCache {
    /// Whether `query` takes the table path in [`attend`](KvCache::attend): a decode-sized
    /// query (at most [`TABLE_MAX_ROWS`] rows per KV head) on a host-memory device, with
    /// something held.
    pub fn uses_tables(&self, query: &Query) -> bool {
        let [_, qh, n, _] = query.tensor().dims();
        self.len > 0
            && qh / self.config.shape.kv_heads() * n <= TABLE_MAX_ROWS
            && host_memory(&self.device)
    }

    fn attend_fastest(&self, query: &Query) -> (Tensor<4>, Tensor<4>) {
        if self.uses_tables(query) {
            self.tables(query)
        } else {
            self.attend_streamed(query)
        }
    }

    /// Attention scored through look-up tables (see the module docs): output `[batch,
    /// q_heads, q_len, head_dim]` and log-sum-exp `[batch, kv_heads, group, q_len]`, without
    /// reconstructing any key or value. Runs on the host whatever the device (the codes are
    /// read back); [`attend`](KvCache::attend) takes it for decode-sized queries on the CPU.
    ///
    /// # Errors
    /// Shape and finiteness problems of the query.
    pub fn attend_tables(&self, query: &Query) -> kv_core::Result<(Tensor<4>, Tensor<4>)> {
        check_query(&self.config.shape, query, "RvqCache::attend_tables")?;
        Ok(if self.len == 0 {
            self.attend_streamed(query)
        } else {
            self.tables(query)
        })
    }

    /// Attention over chunks of decoded keys and values merged with the online-softmax rule
    /// (the path of prefill queries and of non-host devices): output and log-sum-exp.
    ///
    /// # Errors
    /// Shape and finiteness problems of the query.
    pub fn attend_chunked(&self, query: &Query) -> kv_core::Result<(Tensor<4>, Tensor<4>)> {
        check_query(&self.config.shape, query, "RvqCache::attend_chunked")?;
        Ok(self.attend_streamed(query))
    }

    fn tables(&self, query: &Query) -> (Tensor<4>, Tensor<4>) {
        let keys = self
            .keys
            .as_ref()
            .expect("invariant: a non-empty cache holds codes");
        let values = self
            .values
            .as_ref()
            .expect("invariant: a non-empty cache holds codes");
        match (HostCodes::read(&keys.codes), HostCodes::read(&values.codes)) {
            (HostCodes::U8(k), HostCodes::U8(v)) => self.tables_with(query, &k, &v),
            (HostCodes::U16(k), HostCodes::U16(v)) => self.tables_with(query, &k, &v),
            _ => unreachable!("invariant: keys and values share the code dtype"),
        }
    }

    fn tables_with<C: Copy + Into<usize> + Sync>(
        &self,
        query: &Query,
        key_codes: &[C],
        value_codes: &[C],
    ) -> (Tensor<4>, Tensor<4>) {
        let s = self.config.shape;
        let (b, kvh, len) = (s.batch(), s.kv_heads(), self.len);
        let [_, qh, n, d] = query.tensor().dims();
        let g = qh / kvh;
        let rows = g * n;
        let streams = b * kvh;
        let l = TableLayout {
            rows,
            groups: d / self.sub_dim(),
            stages: self.stages(),
            entries: self.entries(),
            sub: self.sub_dim(),
        };
        let (keys, values) = (
            self.keys.as_ref().expect("invariant: codes held"),
            self.values.as_ref().expect("invariant: codes held"),
        );
        let (key_scale, value_scale) = (host_floats(&keys.scale), host_floats(&values.scale));
        let (key_books, value_books) =
            (host_floats(&self.key_books), host_floats(&self.value_books));
        let book_len = l.stages * l.entries * l.sub;
        let attn_scale = 1.0 / (d as f32).sqrt();
        let qdata = host_floats(query.tensor());
        // Query rows per stream, row j * n + i: token i of query head h * g + j, scaled.
        let mut q = vec![0.0f32; streams * rows * d];
        for bh in 0..streams {
            let (bi, h) = (bh / kvh, bh % kvh);
            for j in 0..g {
                for i in 0..n {
                    let src = ((bi * qh + h * g + j) * n + i) * d;
                    let dst = (bh * rows + j * n + i) * d;
                    for (o, x) in q[dst..dst + d].iter_mut().zip(&qdata[src..src + d]) {
                        *o = x * attn_scale;
                    }
                }
            }
        }
        let tables: Vec<Vec<f32>> = (0..streams)
            .into_par_iter()
            .map(|bh| {
                let h = bh % kvh;
                key_table(
                    &q[bh * rows * d..(bh + 1) * rows * d],
                    &key_books[h * book_len..(h + 1) * book_len],
                    l,
                    self.strided_keys,
                )
            })
            .collect();
        let gs = l.codes();
        let tasks = len.div_ceil(TOKENS_PER_TASK);
        let task_range = |k: usize| k * TOKENS_PER_TASK..((k + 1) * TOKENS_PER_TASK).min(len);

        // Scores, token-major per stream: scores[(bh * len + t) * rows + r].
        let mut scores = vec![0.0f32; streams * len * rows];
        scores
            .par_chunks_mut(TOKENS_PER_TASK * rows)
            .enumerate()
            .for_each(|(item, out)| {
                // Chunks never straddle streams when len is a multiple of the task size;
                // otherwise split at the stream boundary.
                let mut at = item * TOKENS_PER_TASK;
                let mut out = out;
                while !out.is_empty() {
                    let (bh, t0) = (at / len, at % len);
                    let take = (len - t0).min(out.len() / rows);
                    let (now, rest) = out.split_at_mut(take * rows);
                    table_scores(
                        &key_codes[bh * len * gs..(bh + 1) * len * gs],
                        &key_scale[bh * len..(bh + 1) * len],
                        &tables[bh],
                        l,
                        t0,
                        now,
                    );
                    out = rest;
                    at += take;
                }
            });

        // Mask, then softmax numerators in place; maxima and sums per (stream, row).
        let norms: Vec<(Vec<f32>, Vec<f32>)> = scores
            .par_chunks_mut(len * rows)
            .enumerate()
            .map(|(bh, sc)| {
                let bi = bh / kvh;
                let qpos = &query.positions()[bi * n..(bi + 1) * n];
                let qrow: Vec<u32> = (0..rows).map(|r| qpos[r % n]).collect();
                softmax_rows(sc, &qrow, &self.positions[bi][..len])
            })
            .collect();

        // Value histograms per (stream, token range), summed per stream.
        let partial: Vec<Vec<f32>> = (0..streams * tasks)
            .into_par_iter()
            .map(|item| {
                let (bh, k) = (item / tasks, item % tasks);
                let range = task_range(k);
                let mut hist = vec![0.0f32; l.table_len()];
                value_histogram(
                    &value_codes[bh * len * gs..(bh + 1) * len * gs],
                    &value_scale[bh * len..(bh + 1) * len],
                    &scores[(bh * len + range.start) * rows..(bh * len + range.end) * rows],
                    l,
                    range.start,
                    &mut hist,
                );
                hist
            })
            .collect();

        let mut out = vec![0.0f32; b * qh * n * d];
        let mut lse = vec![f32::MIN; b * kvh * g * n];
        for bh in 0..streams {
            let (bi, h) = (bh / kvh, bh % kvh);
            let mut hist = partial[bh * tasks].clone();
            for p in &partial[bh * tasks + 1..(bh + 1) * tasks] {
                hist.iter_mut().zip(p).for_each(|(a, x)| *a += x);
            }
            let books = &value_books[h * book_len..(h + 1) * book_len];
            // acc[r][channel] = Σ_s Σ_c H[g·S + s][c][r] · B_s[c][e].
            let mut acc = vec![0.0f32; rows * d];
            for gi in 0..l.groups {
                for st in 0..l.stages {
                    let j = gi * l.stages + st;
                    for c in 0..l.entries {
                        let cw = &books[(st * l.entries + c) * l.sub..][..l.sub];
                        let bin = &hist[(j * l.entries + c) * rows..][..rows];
                        for (r, &w) in bin.iter().enumerate() {
                            if w == 0.0 {
                                continue;
                            }
                            let dst = &mut acc[r * d + gi * l.sub..][..l.sub];
                            dst.iter_mut().zip(cw).for_each(|(o, x)| *o += w * x);
                        }
                    }
                }
            }
            let (maxes, sums) = &norms[bh];
            for j in 0..g {
                for i in 0..n {
                    let r = j * n + i;
                    let m = maxes[r];
                    if m == f32::NEG_INFINITY {
                        continue;
                    }
                    let total = sums[r];
                    let dst = ((bi * qh + h * g + j) * n + i) * d;
                    for (o, x) in out[dst..dst + d].iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                        *o = x / total;
                    }
                    lse[((bi * kvh + h) * g + j) * n + i] = (m + total.ln()).max(f32::MIN);
                }
            }
        }
        let device = query.tensor().device();
        (
            Tensor::<4>::from_data(TensorData::new(out, [b, qh, n, d]), &device),
            Tensor::<4>::from_data(TensorData::new(lse, [b, kvh, g, n]), &device),
        )
    }
}
