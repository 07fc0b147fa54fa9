//! [`BlockQuantCache`]: a KV cache stored in one of the serving-engine [`BlockFormat`]s
//! (llama.cpp's `q8_0` ... `iq4_nl`, vLLM's fp8), every token quantized as it is appended.
//!
//! # Semantics
//! - Keys and values are encoded on `append`, each in its own format
//!   ([`BlockQuantConfig::value_format`] may differ from the key format, as llama.cpp's
//!   `--cache-type-k` and `--cache-type-v`) (llama.cpp writes the new tokens into its
//!   quantized KV tensors before attention reads them, so even the current tokens attend to
//!   their quantized keys; vLLM's fp8 cache does the same in decode). Nothing is kept in full
//!   precision.
//! - fp8 scales (keys and values separately): [`Fp8Scale::Tensor`] and [`Fp8Scale::Head`] take
//!   `amax / fp8_max` of the *first* appended block (per layer, or per layer and KV head) and
//!   keep it, as vLLM's dynamically computed `k_scale`/`v_scale` are computed on the first
//!   forward pass; later values beyond `fp8_max · scale` saturate. [`Fp8Scale::Unit`] is vLLM's
//!   default without calibration (scale 1). A zero first block gets scale 1.
//! - `attend` and `attend_lse` run on the codes for decode-sized queries on the CPU backends
//!   (the fused host kernels KIVI uses: `x̂ = level(code) · d + m` per block of 32 channels),
//!   and otherwise stream over chunks of [`BLOCK_ATTEND_CHUNK_TOKENS`] tokens, each decoded to
//!   fp32; with statistics requested `attend` decodes everything and calls
//!   [`reference_attention`]. `view()` returns the decoded tensors, so
//!   `attend == reference(view())` up to the softmax summation order.
//! - `memory()`: codes, planes, scales, minima and fp8 scales, measured from the tensors, plus
//!   a `u32` position per token and sequence.
//!
//! Appends concatenate the stored tensors (O(held codes) per decode step, as KIVI's spills).

use burn::prelude::*;
use burn::tensor::FloatDType;
use kv_core::positions_per_head;
use kv_core::{
    Attended, HeldBuffer, KeyPositions, KvBlock, KvCache, KvError, KvShape, KvView, Lengths,
    MemoryReport, PAD, Query, StatsRequest, StorageRole, check_block, check_positions, check_query,
    reference_attention,
};
use serde::{Deserialize, Serialize};

use crate::attend::{attend_streamed, empty_lse};
use crate::blocks::{BlockFormat, EncodedBlocks, Iq4Search};
use crate::host::{Source, attend_host, ordered, use_host};

/// Tokens per chunk of the streamed attention.
pub const BLOCK_ATTEND_CHUNK_TOKENS: usize = 512;

/// The largest magnitude the llama.cpp formats accept (fp16 `d` and `m` must stay finite).
pub const BLOCK_MAX_ABS_INPUT: f32 = 65504.0;

/// How fp8 scales are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fp8Scale {
    /// One scale per layer (keys and values separately): `amax / fp8_max` of the first block.
    #[default]
    Tensor,
    /// One scale per layer and KV head, from the first block.
    Head,
    /// Scale 1 (vLLM's default without calibrated scales).
    Unit,
}

/// Configuration of a [`BlockQuantCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockQuantConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// The storage format of keys (and of values unless `value_format` is set).
    pub format: BlockFormat,
    /// A different format for values (llama.cpp's separate `--cache-type-k` and
    /// `--cache-type-v`).
    #[serde(default)]
    pub value_format: Option<BlockFormat>,
    /// How fp8 scales are shared (ignored by the llama.cpp formats).
    #[serde(default)]
    pub fp8_scale: Fp8Scale,
}

impl BlockQuantConfig {
    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &["v", "scale", "search"];

    /// Keys and values in `format`, per-tensor fp8 scales.
    pub fn new(shape: KvShape, format: BlockFormat) -> Self {
        BlockQuantConfig {
            shape,
            format,
            value_format: None,
            fp8_scale: Fp8Scale::Tensor,
        }
    }
    /// Stores values in `format` (keys keep [`BlockQuantConfig::format`]).
    pub fn with_value_format(mut self, format: BlockFormat) -> Self {
        self.value_format = Some(format);
        self
    }
    /// Sets how fp8 scales are shared.
    pub fn with_fp8_scale(mut self, scale: Fp8Scale) -> Self {
        self.fp8_scale = scale;
        self
    }
    /// The key format.
    pub fn key_format(&self) -> BlockFormat {
        self.format
    }
    /// The value format.
    pub fn value_format(&self) -> BlockFormat {
        self.value_format.unwrap_or(self.format)
    }

    /// The config for the format registered as `name` with `key=value` parameters: `v` (the
    /// value format's name, keys keeping `name`), `scale` (`tensor`, `head` or `unit`; needs an
    /// fp8 format) and `search` (`refit` or `ntry7`; needs `iq4_nl`).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the parameter for an unknown name or value, or a
    /// parameter that no chosen format uses.
    pub fn from_params<'a>(
        shape: KvShape,
        name: &str,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        let bad = |field: &'static str, reason: String| KvError::InvalidConfig { field, reason };
        let mut cfg = BlockQuantConfig::new(shape, BlockFormat::from_name(name)?);
        let (mut scale, mut search) = (None, None);
        for (k, v) in params {
            match k {
                "v" => {
                    cfg.value_format =
                        Some(BlockFormat::from_name(v).map_err(|e| bad("v", e.to_string()))?);
                }
                "scale" => {
                    scale = Some(match v {
                        "tensor" => Fp8Scale::Tensor,
                        "head" => Fp8Scale::Head,
                        "unit" | "1" => Fp8Scale::Unit,
                        _ => {
                            return Err(bad("scale", format!("`{v}` is not tensor, head or unit")));
                        }
                    });
                }
                "search" => {
                    search = Some(match v {
                        "refit" => Iq4Search::Refit,
                        "ntry7" | "7" => Iq4Search::Search7,
                        _ => return Err(bad("search", format!("`{v}` is not refit or ntry7"))),
                    });
                }
                _ => {
                    return Err(bad(
                        "params",
                        format!(
                            "unknown parameter `{k}` for {name}; accepted: {}",
                            Self::PARAMS.join(", ")
                        ),
                    ));
                }
            }
        }
        let formats = [cfg.key_format(), cfg.value_format()];
        if let Some(s) = scale {
            if !formats.iter().any(|f| f.is_fp8()) {
                return Err(bad("scale", "only fp8 formats take a scale".into()));
            }
            cfg.fp8_scale = s;
        }
        if let Some(s) = search {
            if !formats.iter().any(|f| matches!(f, BlockFormat::Iq4Nl(_))) {
                return Err(bad("search", "only iq4_nl searches its scale".into()));
            }
            cfg.format = with_search(cfg.format, s);
            cfg.value_format = cfg.value_format.map(|f| with_search(f, s));
        }
        Ok(cfg)
    }

    /// Builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] if `head_dim` is not a multiple of 32 for a llama.cpp format.
    pub fn init(&self, device: &Device) -> kv_core::Result<BlockQuantCache> {
        self.key_format().check_head_dim(self.shape.head_dim())?;
        self.value_format().check_head_dim(self.shape.head_dim())?;
        Ok(BlockQuantCache {
            config: self.clone(),
            device: device.clone(),
            keys: None,
            values: None,
            len: 0,
            positions: vec![Vec::new(); self.shape.batch()],
            logical: vec![0; self.shape.batch()],
        })
    }

    /// Stored bytes once `t` tokens per sequence are held: per token, head and key or value
    /// `block_bytes · head_dim / 32` (llama.cpp formats) or `4 ⌈head_dim / 4⌉` (fp8, plus its
    /// fp32 scales once), and a `u32` position per token and sequence.
    pub fn stored_bytes(&self, t: usize) -> usize {
        let s = self.shape;
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        if t == 0 {
            return 0;
        }
        let one = |f: BlockFormat| match f.block_bytes() {
            Some(bb) => b * h * t * bb * (d / 32),
            None => {
                let scales = match self.fp8_scale {
                    Fp8Scale::Head => h,
                    _ => 1,
                };
                b * h * t * 4 * d.div_ceil(4) + 4 * scales
            }
        };
        one(self.key_format()) + one(self.value_format()) + b * t * 4
    }
}

/// `f` with its `iq4_nl` search set to `s` (other formats unchanged).
fn with_search(f: BlockFormat, s: Iq4Search) -> BlockFormat {
    match f {
        BlockFormat::Iq4Nl(_) => BlockFormat::Iq4Nl(s),
        other => other,
    }
}

/// A KV cache in a serving-engine storage format. See the module docs.
#[derive(Debug, Clone)]
pub struct BlockQuantCache {
    config: BlockQuantConfig,
    device: Device,
    keys: Option<EncodedBlocks>,
    values: Option<EncodedBlocks>,
    len: usize,
    positions: Vec<Vec<u32>>,
    logical: Vec<usize>,
}

impl BlockQuantCache {
    /// The configuration.
    pub fn config(&self) -> &BlockQuantConfig {
        &self.config
    }
    /// Tokens held per sequence (padding included).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The encoded keys and values.
    pub fn encoded(&self) -> Option<(&EncodedBlocks, &EncodedBlocks)> {
        self.keys.as_ref().zip(self.values.as_ref())
    }

    /// The fp8 scale of a first block `x`: `[1, 1 or heads, 1, 1]` fp32.
    fn fp8_scale_of(&self, x: &Tensor<4>, fp8_max: f32) -> Tensor<4> {
        let h = self.config.shape.kv_heads();
        let a = x.clone().cast(FloatDType::F32).abs();
        let amax = match self.config.fp8_scale {
            Fp8Scale::Unit => return Tensor::ones([1, 1, 1, 1], &self.device),
            Fp8Scale::Tensor => a.max().reshape([1, 1, 1, 1]),
            Fp8Scale::Head => {
                let [b, _, t, d] = a.dims();
                a.swap_dims(0, 1)
                    .reshape([h, b * t * d])
                    .max_dim(1)
                    .reshape([1, h, 1, 1])
            }
        };
        let s = amax.div_scalar(fp8_max);
        let zero = s.clone().equal_elem(0.0);
        s.mask_fill(zero, 1.0)
    }

    fn encode(
        &self,
        format: BlockFormat,
        x: Tensor<4>,
        prev: Option<&EncodedBlocks>,
    ) -> crate::Result<EncodedBlocks> {
        match format {
            BlockFormat::Fp8(f) => {
                let scale = match prev {
                    Some(p) => p.scales().clone(),
                    None => self.fp8_scale_of(&x, f.max_finite()),
                };
                format.encode_fp8(x, scale)
            }
            fmt => fmt.encode(x),
        }
    }

    /// Attention without statistics and its log-sum-exp (the cache is not empty): fused on the
    /// codes for decode-sized queries on CPU backends, otherwise streamed over chunks of
    /// [`BLOCK_ATTEND_CHUNK_TOKENS`] decoded tokens.
    fn attend_fast(&self, query: &Query) -> (Tensor<4>, Tensor<4>) {
        if let (Some(k), Some(v)) = (&self.keys, &self.values)
            && use_host(&self.device, query, self.config.shape.kv_heads())
        {
            // Fused on the codes (see `crate::host`): nothing is decoded.
            let (k, v) = (k.to_host(), v.to_host());
            let keys = ordered(&[Some(Source::Codes(&k))], None, self.len);
            let values = ordered(&[Some(Source::Codes(&v))], None, self.len);
            return attend_host(
                query,
                self.config.shape.kv_heads(),
                self.len,
                &self.positions,
                &keys,
                &values,
            );
        }
        attend_streamed(
            query,
            self.config.shape.kv_heads(),
            self.len,
            &self.positions,
            |start| start + BLOCK_ATTEND_CHUNK_TOKENS,
            |range| self.tokens_fp32(range),
        )
    }

    fn tokens_fp32(&self, range: core::ops::Range<usize>) -> (Tensor<4>, Tensor<4>) {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) => (
                k.slice_tokens(range.clone()).decode(),
                v.slice_tokens(range).decode(),
            ),
            _ => {
                let s = self.config.shape;
                let z = Tensor::zeros(
                    [
                        s.batch(),
                        s.kv_heads(),
                        range.end - range.start,
                        s.head_dim(),
                    ],
                    &self.device,
                );
                (z.clone(), z)
            }
        }
    }
}

impl KvCache for BlockQuantCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        const OP: &str = "BlockQuantCache::append";
        let shape = self.config.shape;
        check_block(&shape, &block, OP)?;
        let last: Vec<Option<u32>> = self
            .positions
            .iter()
            .map(|p| p.iter().rev().copied().find(|&x| x != PAD))
            .collect();
        let counts = check_positions(block.positions(), shape.batch(), &last, OP)?;
        let mut checked = Vec::with_capacity(2);
        if !self.config.key_format().is_fp8() {
            checked.push(block.keys().clone().abs().max());
        }
        if !self.config.value_format().is_fp8() {
            checked.push(block.values().clone().abs().max());
        }
        if !checked.is_empty() {
            let max = Tensor::cat(checked, 0).max().into_scalar::<f32>();
            if max > BLOCK_MAX_ABS_INPUT {
                return Err(KvError::InvalidConfig {
                    field: "data",
                    reason: format!(
                        "{OP}: largest magnitude {max} exceeds {BLOCK_MAX_ABS_INPUT}, \
                         the limit of fp16 block scales ({} keys, {} values)",
                        self.config.key_format().name(),
                        self.config.value_format().name()
                    ),
                });
            }
        }
        let n = block.seq_len();
        let (k, v, pos) = block.into_parts();
        // Everything fallible happens on locals; the cache changes only once all succeeded.
        let k_new = self.encode(self.config.key_format(), k, self.keys.as_ref())?;
        let v_new = self.encode(self.config.value_format(), v, self.values.as_ref())?;
        let keys = match self.keys.clone() {
            Some(old) => old.concat(k_new)?,
            None => k_new,
        };
        let values = match self.values.clone() {
            Some(old) => old.concat(v_new)?,
            None => v_new,
        };
        self.keys = Some(keys);
        self.values = Some(values);
        for b in 0..shape.batch() {
            self.positions[b].extend_from_slice(&pos[b * n..(b + 1) * n]);
            self.logical[b] += counts[b];
        }
        self.len += n;
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        const OP: &str = "BlockQuantCache::attend";
        check_query(&self.config.shape, query, OP)?;
        if self.len == 0 {
            return Ok(Attended {
                output: query.tensor().zeros_like(),
                stats: Default::default(),
            });
        }
        if !stats.any() {
            return Ok(Attended {
                output: self.attend_fast(query).0,
                stats: Default::default(),
            });
        }
        let (k, v) = self.tokens_fp32(0..self.len);
        let kp = self.positions.concat();
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

    fn attend_lse(&mut self, query: &Query) -> kv_core::Result<(Tensor<4>, Tensor<4>)> {
        check_query(&self.config.shape, query, "BlockQuantCache::attend_lse")?;
        if self.len == 0 {
            return Ok(empty_lse(query, self.config.shape.kv_heads()));
        }
        Ok(self.attend_fast(query))
    }

    fn view(&self) -> KvView {
        let s = self.config.shape;
        let (keys, values) = self.tokens_fp32(0..self.len);
        let positions = positions_per_head(&self.positions, s.kv_heads());
        KvView {
            keys,
            values,
            positions,
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
        let bytes = |e: &Option<EncodedBlocks>| e.as_ref().map_or(0, EncodedBlocks::stored_bytes);
        let logical_tokens: usize = self.logical.iter().sum();
        MemoryReport {
            key_bytes: bytes(&self.keys),
            value_bytes: bytes(&self.values),
            metadata_bytes: s.batch() * self.len * core::mem::size_of::<u32>(),
            logical_elements: 2 * logical_tokens * s.kv_heads() * s.head_dim(),
            logical_tokens,
            held_token_slots: s.streams() * self.len,
        }
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = Vec::new();
        if let Some(k) = &self.keys {
            out.extend(k.held_buffers(StorageRole::Keys));
        }
        if let Some(v) = &self.values {
            out.extend(v.held_buffers(StorageRole::Values));
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
