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
//! `attend` decodes `chunk` tokens at a time (default 1024) and merges the exact attention of
//! each chunk with the online-softmax rule ([`kv_core::merge_attention`]), so a decode step
//! never materialises more than one chunk of fp32 keys and values. Attention statistics
//! (`StatsRequest`) and [`view`](KvCache::view) decode everything: that is the oracle path of
//! the tests.

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::{FloatDType, IntDType};
use kv_core::{
    Attended, HeldBuffer, KeyPositions, KvBlock, KvCache, KvError, KvShape, KvView, Lengths,
    MemoryReport, PAD, Query, StatsRequest, StorageRole, check_block, check_positions, check_query,
    merge_attention, positions_per_head, reference_attention, reference_attention_lse, sum_held,
};
use serde::{Deserialize, Serialize};

use crate::budget;
use crate::rvq::{ResidualQuantizer, RvqArtefact, from_groups, to_groups, token_scale};

fn default_chunk() -> usize {
    1024
}

/// Configuration of an [`RvqCache`]: the artefact, the layer it serves and how many of the
/// trained stages to use (all by default). Attention decodes `chunk` tokens at a time
/// (default 1024).
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
    /// Tokens decoded at a time by `attend`.
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
    /// Sets the attention chunk.
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
            output: self.attend_streamed(query).0,
            stats: Default::default(),
        })
    }

    fn attend_lse(&mut self, query: &Query) -> kv_core::Result<(Tensor<4>, Tensor<4>)> {
        check_query(&self.config.shape, query, "RvqCache::attend_lse")?;
        Ok(self.attend_streamed(query))
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
