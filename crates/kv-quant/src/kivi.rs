//! KIVI (Liu et al., 2024, arXiv 2402.02750): keys quantized per channel, values per token,
//! with a full-precision window of the most recent tokens.
//!
//! # Storage and spill semantics (as in jy-yuan/KIVI `models/llama_kivi.py`)
//! - Keys: `G` consecutive tokens of one channel share a scale and zero point. New keys go to
//!   a full-precision key window; whenever the window holds `R` or more tokens, its oldest whole
//!   multiple of `R` tokens is quantized and moved to the quantized store. A first append of
//!   `n` tokens therefore quantizes `n - (n mod R)` keys and keeps `n mod R`; in decode, the
//!   window fills to `R` and is then quantized as one block.
//! - Values: `G` consecutive channels of one token share a scale and zero point. New values go
//!   to a full-precision value window; whenever it holds more than `R` tokens, the oldest ones
//!   are quantized until `R` remain. A first append quantizes all but the last `R`; in decode,
//!   the oldest single token is quantized once the window exceeds `R`.
//!
//! `R` must be a multiple of `G` (so that every key block splits into whole groups) and `G`
//! must divide `head_dim` (value groups run along channels).
//!
//! An extension that is not KIVI, off by default: [`KiviConfig::sinks`] keeps the first tokens
//! of every sequence in full precision for good (attention sinks); the tokens after them follow
//! the rules above as if the sequence started there.
//!
//! # ThinK + KIVI ([`KiviConfig::prune_ratio`] `λ > 0`)
//! ThinK's query-driven key-channel pruning applied to KIVI's quantized keys, as in
//! SalesforceAIResearch/ThinK `ThinK_kivi/models/llama_kivi_think.py`: at the first
//! [`end_prefill`](KvCache::end_prefill) each (sequence, KV head) keeps the `d − ⌊λ·d⌋` key
//! channels with the highest `mean(q_c²) · mean(k_c²)` (the last [`KiviConfig::prune_window`]
//! prefill queries of the head's GQA group, the keys about to be quantized), and from then on
//! every key that spills into the quantized store, at prefill and in decode, is stored on
//! those channels only (codes, scales and zero points shrink by `d'/d`). The full-precision
//! window keeps all channels; values are plain KIVI. Attention scores a quantized key with the
//! query's kept channels (`q[C] · k[C]`, scale `1/√d`). Until the channels are decided, keys do
//! not spill (the prefill's keys wait in the window, as the reference quantizes them only at
//! the end of its prefill forward). Deviations: the reference asserts no GQA
//! (`num_key_value_groups == 1`); here the group's queries are averaged, as kv-lowrank's ThinK
//! does. `λ = 0` is plain KIVI. With pruning, attention takes the streamed path (the fused
//! host kernels read whole-width codes).
//!
//! # Attention
//! The reference computes each forward's attention with the *current* call's keys and values
//! in full precision (prefill uses the fp tensors; a decode token is in the fp window when it
//! attends) and quantizes afterwards: the decode step whose key fills the window to `R`
//! attends all `R` window keys in full precision and spills them after, and each decode step
//! attends `R + 1` full-precision values before the oldest spills. This cache quantizes on
//! `append`, before attention, and reproduces that order: with
//! [`KiviConfig::current_in_full_precision`] (the default) the last appended block is kept as
//! given (fp32), and the window tokens that this append moved into the quantized store are
//! kept as the window held them, both until the next `append`, `end_prefill` or `reset`;
//! `attend` and `view` use them for those tokens, and they are counted in `memory()` while
//! held.
//!
//! Without statistics, `attend` and `attend_lse` take one of two paths, neither of which
//! materialises the cache in full precision:
//! - decode-sized queries on the CPU backends run on the packed codes (`crate::host`): the
//!   group's key scale is folded into the query and its zero point into a constant
//!   (`q · k̂ = Σ_c (q_c s_c) code_c + Σ_c q_c z_c`), the probabilities into the per-token value
//!   scales (`Σ_t p_t v̂_t = Σ_t (p_t s_t) code_t + Σ_t p_t z_t`);
//! - other queries stream over chunks of [`ATTEND_CHUNK_TOKENS`] keys: each chunk is
//!   dequantized (window and pending tokens taken as they are), scored, and merged into
//!   running softmax statistics (row max, row sum, weighted values).
//!
//! When attention statistics are requested it falls back to dequantizing everything and
//! calling [`reference_attention`]. `view()` returns the same dequantized tensors, so
//! `attend == reference(view())` up to the summation order of the softmax (fp32 rounding, well
//! inside the contract's `1e-5 + 1e-4 |x|`); that dequantize-then-attend oracle is what the
//! tests compare both paths with.

use burn::prelude::*;
use burn::tensor::{FloatDType, IndexingUpdateOp, IntDType};
use kv_core::positions_per_head;
use kv_core::{
    Attended, HeldBuffer, KeyPositions, KvBlock, KvCache, KvError, KvShape, KvView, Lengths,
    MemoryReport, PAD, Query, StatsRequest, StorageDtype, StorageRole, check_block,
    check_positions, check_query, reference_attention,
};
use serde::{Deserialize, Serialize};

use crate::attend::{attend_streamed, empty_lse, overlay_tokens};
use crate::group::{GroupAxis, QuantSpec, QuantizedTensor};
use crate::host::{HostCodes, HostDense, Source, attend_host, ordered, overlay, use_host};
use crate::packing::BitWidth;
use crate::{QuantError, Result};

fn default_f16() -> StorageDtype {
    StorageDtype::F16
}
fn default_true() -> bool {
    true
}

/// Configuration of a [`KiviCache`]. Defaults: 2 bits, `G = 32`, `R = 128`, fp16 scales, zero
/// points and full-precision window (KIVI's LongBench setting).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KiviConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Bits per code for keys and values (KIVI uses 2 or 4; 1, 3 and 8 are accepted too).
    pub bits: u32,
    /// Bits for keys only, overriding `bits` (the reference's `k_bits`).
    #[serde(default)]
    pub key_bits: Option<u32>,
    /// Bits for values only, overriding `bits` (the reference's `v_bits`).
    #[serde(default)]
    pub value_bits: Option<u32>,
    /// Group size `G`: tokens per key group, channels per value group.
    pub group: usize,
    /// Residual length `R`: the full-precision window (a multiple of `G`).
    pub residual: usize,
    /// Dtype of scales and zero points.
    #[serde(default = "default_f16")]
    pub scale_dtype: StorageDtype,
    /// Dtype of the full-precision window (fp16 in KIVI; fp32 keeps appended tokens bit-exact).
    #[serde(default = "default_f16")]
    pub residual_dtype: StorageDtype,
    /// Attend the last appended block, and the window tokens its append quantized, in full
    /// precision until the next append, as the reference does (it quantizes after attending).
    #[serde(default = "default_true")]
    pub current_in_full_precision: bool,
    /// The first `sinks` tokens of every sequence stay in full precision (window dtype) for
    /// good: attention sinks. Not part of KIVI (default 0, which is KIVI); an extension in the
    /// spirit of KVQuant's `first_few_fp16`, measured in `docs/techniques/quant.md`.
    #[serde(default)]
    pub sinks: usize,
    /// ThinK + KIVI (Xu et al. 2024, `ThinK_kivi`): the fraction `λ` of key channels pruned
    /// from every *quantized* key, `[0, 1)`; 0 (the default) is plain KIVI. See the module
    /// docs, "ThinK + KIVI".
    #[serde(default)]
    pub prune_ratio: f64,
    /// ThinK + KIVI: the last prefill query tokens that score the key channels (32 in the
    /// reference).
    #[serde(default = "default_prune_window")]
    pub prune_window: usize,
}

fn default_prune_window() -> usize {
    32
}

impl KiviConfig {
    /// KIVI-2 with `G = 32`, `R = 128`, fp16 scales, zeros and window.
    pub fn new(shape: KvShape) -> Self {
        KiviConfig {
            shape,
            bits: 2,
            key_bits: None,
            value_bits: None,
            group: 32,
            residual: 128,
            scale_dtype: StorageDtype::F16,
            residual_dtype: StorageDtype::F16,
            current_in_full_precision: true,
            sinks: 0,
            prune_ratio: 0.0,
            prune_window: 32,
        }
    }
    /// Sets the code width.
    pub fn with_bits(mut self, bits: u32) -> Self {
        self.bits = bits;
        self
    }
    /// Sets different widths for keys and values (KIVI's `k_bits`, `v_bits`).
    pub fn with_key_value_bits(mut self, key_bits: u32, value_bits: u32) -> Self {
        self.key_bits = Some(key_bits);
        self.value_bits = Some(value_bits);
        self
    }
    /// Sets the group size `G`.
    pub fn with_group(mut self, group: usize) -> Self {
        self.group = group;
        self
    }
    /// Sets the residual length `R`.
    pub fn with_residual(mut self, residual: usize) -> Self {
        self.residual = residual;
        self
    }
    /// Sets the dtype of scales and zero points.
    pub fn with_scale_dtype(mut self, dtype: StorageDtype) -> Self {
        self.scale_dtype = dtype;
        self
    }
    /// Sets the dtype of the full-precision window.
    pub fn with_residual_dtype(mut self, dtype: StorageDtype) -> Self {
        self.residual_dtype = dtype;
        self
    }
    /// Keeps the first `sinks` tokens in full precision (0: plain KIVI).
    pub fn with_sinks(mut self, sinks: usize) -> Self {
        self.sinks = sinks;
        self
    }
    /// Whether the last appended block is attended in full precision.
    pub fn with_current_in_full_precision(mut self, on: bool) -> Self {
        self.current_in_full_precision = on;
        self
    }
    /// ThinK + KIVI: prunes the fraction `ratio` of key channels from the quantized keys,
    /// scored by the last `window` prefill queries (0: plain KIVI).
    pub fn with_key_pruning(mut self, ratio: f64, window: usize) -> Self {
        self.prune_ratio = ratio;
        self.prune_window = window;
        self
    }
    /// Key channels kept in the quantized store: `d − ⌊λ·d⌋` (`d` without pruning).
    pub fn kept_key_channels(&self) -> usize {
        let d = self.shape.head_dim();
        if !(0.0..1.0).contains(&self.prune_ratio) {
            return d;
        }
        d - ((self.prune_ratio * d as f64).floor() as usize).min(d)
    }

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &[
        "bits",
        "key_bits",
        "value_bits",
        "group",
        "residual",
        "scale_dtype",
        "residual_dtype",
        "current_full",
        "sinks",
        "prune",
        "prune_window",
    ];

    /// The default config with `key=value` parameters applied: `bits`, `key_bits`,
    /// `value_bits`, `group`, `residual`, `sinks` (integers), `scale_dtype` and `residual_dtype`
    /// (`f16` or `f32`) and `current_full`
    /// (`true` or `false`: [`current_in_full_precision`](Self::current_in_full_precision)).
    /// The result is not validated until [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the parameter for an unknown name or a value that does
    /// not parse.
    pub fn from_params<'a>(
        shape: KvShape,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        fn bad(field: &'static str, value: &str, want: &str) -> KvError {
            KvError::InvalidConfig {
                field,
                reason: format!("`{value}` is not {want}"),
            }
        }
        fn int(field: &'static str, v: &str) -> kv_core::Result<usize> {
            v.parse()
                .map_err(|_| bad(field, v, "a non-negative integer"))
        }
        fn width(field: &'static str, v: &str) -> kv_core::Result<u32> {
            v.parse().map_err(|_| bad(field, v, "a bit width (2 or 4)"))
        }
        fn dtype(field: &'static str, v: &str) -> kv_core::Result<StorageDtype> {
            match v {
                "f16" | "fp16" => Ok(StorageDtype::F16),
                "f32" | "fp32" => Ok(StorageDtype::F32),
                _ => Err(bad(field, v, "f16 or f32")),
            }
        }
        let mut cfg = KiviConfig::new(shape);
        for (k, v) in params {
            match k {
                "bits" => cfg.bits = width("bits", v)?,
                "key_bits" => cfg.key_bits = Some(width("key_bits", v)?),
                "value_bits" => cfg.value_bits = Some(width("value_bits", v)?),
                "group" => cfg.group = int("group", v)?,
                "residual" => cfg.residual = int("residual", v)?,
                "sinks" => cfg.sinks = int("sinks", v)?,
                "prune" => {
                    cfg.prune_ratio = v
                        .parse()
                        .map_err(|_| bad("prune", v, "a fraction in [0, 1)"))?;
                }
                "prune_window" => cfg.prune_window = int("prune_window", v)?,
                "scale_dtype" => cfg.scale_dtype = dtype("scale_dtype", v)?,
                "residual_dtype" => cfg.residual_dtype = dtype("residual_dtype", v)?,
                "current_full" => {
                    cfg.current_in_full_precision = v
                        .parse()
                        .map_err(|_| bad("current_full", v, "true or false"))?;
                }
                _ => {
                    return Err(KvError::InvalidConfig {
                        field: "params",
                        reason: format!(
                            "unknown KIVI parameter `{k}`; accepted: {}",
                            Self::PARAMS.join(", ")
                        ),
                    });
                }
            }
        }
        Ok(cfg)
    }

    fn specs(&self) -> Result<(QuantSpec, QuantSpec)> {
        let key_bits = BitWidth::new(self.key_bits.unwrap_or(self.bits))?;
        let value_bits = BitWidth::new(self.value_bits.unwrap_or(self.bits))?;
        if self.group == 0 {
            return Err(QuantError::InvalidConfig {
                field: "group",
                reason: "must be at least 1".into(),
            });
        }
        if self.residual == 0 || !self.residual.is_multiple_of(self.group) {
            return Err(QuantError::GroupDoesNotDivide {
                group: self.group,
                axis: "residual window (R must be a positive multiple of G)",
                len: self.residual,
            });
        }
        if !(0.0..1.0).contains(&self.prune_ratio) {
            return Err(QuantError::InvalidConfig {
                field: "prune_ratio",
                reason: format!(
                    "{} must be in [0, 1) (the fraction of key channels ThinK prunes)",
                    self.prune_ratio
                ),
            });
        }
        if self.prune_ratio > 0.0 && self.prune_window == 0 {
            return Err(QuantError::InvalidConfig {
                field: "prune_window",
                reason: "at least one prefill query must score the key channels".into(),
            });
        }
        if self.prune_ratio > 0.0 && self.sinks > 0 {
            return Err(QuantError::InvalidConfig {
                field: "prune_ratio",
                reason: "ThinK key pruning and fp sinks cannot be combined".into(),
            });
        }
        let d = self.shape.head_dim();
        if !d.is_multiple_of(self.group) {
            return Err(QuantError::GroupDoesNotDivide {
                group: self.group,
                axis: "head_dim (value groups run along channels)",
                len: d,
            });
        }
        let k = QuantSpec::new(key_bits, self.group, GroupAxis::Tokens)?
            .with_scale_dtype(self.scale_dtype);
        let v = QuantSpec::new(value_bits, self.group, GroupAxis::Channels)?
            .with_scale_dtype(self.scale_dtype);
        Ok((k, v))
    }

    /// Builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for an unsupported width, a zero group, `R` not a positive
    /// multiple of `G`, or `G` not dividing `head_dim`.
    pub fn init(&self, device: &Device) -> kv_core::Result<KiviCache> {
        let (key_spec, value_spec) = self.specs().map_err(KvError::from)?;
        Ok(KiviCache {
            config: self.clone(),
            device: device.clone(),
            key_spec,
            value_spec,
            k_quant: None,
            k_full: None,
            v_quant: None,
            v_full: None,
            pending: None,
            spilled_keys: None,
            spilled_values: None,
            sink: None,
            len: 0,
            positions: vec![Vec::new(); self.shape.batch()],
            logical: vec![0; self.shape.batch()],
            kept: None,
            kept_host: Vec::new(),
            queries: None,
        })
    }

    /// Stored bytes per token per layer once `t` tokens (per sequence) are held with nothing
    /// pending, counting codes, scales, zeros, the fp windows and the `u32` position of every
    /// sequence: the formula of `docs/techniques/quant.md`, for tests and tables.
    pub fn stored_bytes(&self, t: usize) -> kv_core::Result<usize> {
        let (ks, vs) = self.specs().map_err(KvError::from)?;
        let s = self.shape;
        let (b, h, d, r) = (s.batch(), s.kv_heads(), s.head_dim(), self.residual);
        let fp = self.residual_dtype.size();
        let sinks = t.min(self.sinks);
        let sink_bytes = 2 * b * h * d * fp * sinks;
        let positions = b * t * core::mem::size_of::<u32>();
        let t = t - sinks;
        let tk = t - t % r;
        let tv = t.saturating_sub(r);
        let quant = |spec: &QuantSpec, n: usize, d: usize| {
            if n == 0 {
                0
            } else {
                spec.stored_bytes([b, h, n, d])
            }
        };
        // ThinK + KIVI: the kept channel indices, on the device (i32) and the host (u32).
        let dk = self.kept_key_channels();
        let mask = if dk < d { 2 * b * h * dk * 4 } else { 0 };
        Ok(quant(&ks, tk, dk)
            + quant(&vs, tv, d)
            + mask
            + b * h * d * fp * ((t - tk) + (t - tv))
            + sink_bytes
            + positions)
    }
}

/// A KIVI cache for one layer. See the module docs for the storage and spill semantics.
#[derive(Debug, Clone)]
pub struct KiviCache {
    config: KiviConfig,
    device: Device,
    key_spec: QuantSpec,
    value_spec: QuantSpec,
    k_quant: Option<QuantizedTensor>,
    k_full: Option<Tensor<4>>,
    v_quant: Option<QuantizedTensor>,
    v_full: Option<Tensor<4>>,
    /// The last appended block as given (fp32), attended in full precision.
    pending: Option<(Tensor<4>, Tensor<4>)>,
    /// Keys that the last append moved from the fp window into the quantized store, as the
    /// window held them, with the cache index of the first: attended in place of their codes
    /// until the next append (the reference attends with the window and quantizes afterwards).
    spilled_keys: Option<(usize, Tensor<4>)>,
    /// The same for values.
    spilled_values: Option<(usize, Tensor<4>)>,
    /// The first `sinks` tokens, full precision, never quantized.
    sink: Option<(Tensor<4>, Tensor<4>)>,
    len: usize,
    positions: Vec<Vec<u32>>,
    logical: Vec<usize>,
    /// ThinK + KIVI: kept key channels (ascending) per (sequence, KV head), `[b, h, 1, d']`
    /// i32, decided at the first `end_prefill`.
    kept: Option<Tensor<4, Int>>,
    /// The same indices on the host.
    kept_host: Vec<Vec<u32>>,
    /// ThinK + KIVI: the last `prune_window` queries attended before the channels are decided.
    queries: Option<Tensor<4>>,
}

/// Keys per chunk of the streamed attention (rounded down to whole groups, at least one).
pub const ATTEND_CHUNK_TOKENS: usize = 512;

fn tokens(t: Option<&Tensor<4>>) -> usize {
    t.map_or(0, |t| t.dims()[2])
}

fn cat_tokens(a: Option<Tensor<4>>, b: Tensor<4>) -> Tensor<4> {
    match a {
        Some(a) => Tensor::cat(vec![a, b], 2),
        None => b,
    }
}

fn slice_tokens(t: &Tensor<4>, r: core::ops::Range<usize>) -> Tensor<4> {
    let [b, h, _, d] = t.dims();
    t.clone().slice([0..b, 0..h, r, 0..d])
}

/// Splits `x` into its first `q >= 1` tokens and the rest (`None` when empty).
fn split_front(x: Tensor<4>, q: usize) -> (Tensor<4>, Option<Tensor<4>>) {
    let n = x.dims()[2];
    if q >= n {
        (x, None)
    } else {
        (slice_tokens(&x, 0..q), Some(slice_tokens(&x, q..n)))
    }
}

/// Splits `x` into its first `q` tokens (to quantize) and the rest (to keep), the rest `None`
/// when empty.
fn split_at(x: Tensor<4>, q: usize) -> (Option<Tensor<4>>, Option<Tensor<4>>) {
    let n = x.dims()[2];
    match (q, n - q) {
        (0, _) => (None, Some(x)),
        (_, 0) => (Some(x), None),
        _ => (Some(slice_tokens(&x, 0..q)), Some(slice_tokens(&x, q..n))),
    }
}

fn join(a: Option<QuantizedTensor>, b: Option<QuantizedTensor>) -> Result<Option<QuantizedTensor>> {
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some(a.concat(b)?),
        (a, b) => a.or(b),
    })
}

impl KiviCache {
    /// The configuration.
    pub fn config(&self) -> &KiviConfig {
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
    /// Keys held quantized, per sequence.
    pub fn quantized_key_tokens(&self) -> usize {
        self.k_quant.as_ref().map_or(0, QuantizedTensor::tokens)
    }
    /// Keys held in the full-precision window, per sequence.
    pub fn full_key_tokens(&self) -> usize {
        tokens(self.k_full.as_ref())
    }
    /// Values held quantized, per sequence.
    pub fn quantized_value_tokens(&self) -> usize {
        self.v_quant.as_ref().map_or(0, QuantizedTensor::tokens)
    }
    /// Values held in the full-precision window, per sequence.
    pub fn full_value_tokens(&self) -> usize {
        tokens(self.v_full.as_ref())
    }
    /// Sink tokens held in full precision, per sequence (at most [`KiviConfig::sinks`]).
    pub fn sink_tokens(&self) -> usize {
        self.sink.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }
    /// Tokens of the last appended block held as given (0 once `end_prefill` or the next
    /// append has dropped them, or when [`KiviConfig::current_in_full_precision`] is off).
    pub fn pending_tokens(&self) -> usize {
        self.pending.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Keys and values that the last append moved from the fp window into the quantized store
    /// and that are still attended as the window held them (until the next append,
    /// `end_prefill` or `reset`; always 0 without
    /// [`KiviConfig::current_in_full_precision`]).
    pub fn spilled_window_tokens(&self) -> (usize, usize) {
        (
            tokens(self.spilled_keys.as_ref().map(|(_, k)| k)),
            tokens(self.spilled_values.as_ref().map(|(_, v)| v)),
        )
    }

    /// ThinK + KIVI: the key channels kept in the quantized store for sequence `b`, KV head
    /// `h` (ascending); `None` without pruning or before they are decided.
    pub fn kept_key_channels(&self, b: usize, h: usize) -> Option<&[u32]> {
        self.kept_host
            .get(b * self.config.shape.kv_heads() + h)
            .map(Vec::as_slice)
    }

    /// Whether quantized keys drop channels (ThinK + KIVI with `⌊λ·d⌋ ≥ 1`).
    fn prunes(&self) -> bool {
        self.config.kept_key_channels() < self.config.shape.head_dim()
    }

    /// Whether key spills wait for the channels to be decided at `end_prefill`.
    fn awaiting_channels(&self) -> bool {
        self.prunes() && self.kept.is_none()
    }

    /// Quantizes keys `[b, h, n, d]` per channel, on the kept channels when pruning.
    fn quantize_keys(&self, x: Tensor<4>) -> Result<QuantizedTensor> {
        let x = x.cast(FloatDType::F32);
        let x = match &self.kept {
            Some(kept) => {
                let [b, h, n, _] = x.dims();
                let dk = kept.dims()[3];
                x.gather(3, kept.clone().expand([b, h, n, dk]))
            }
            None => x,
        };
        self.key_spec.quantize_finite(x)
    }

    /// Dequantized keys on the kept channels `[b, h, n, d']` back to `[b, h, n, d]` with zeros
    /// in the pruned channels, so that `q · k` over all channels is `q[C] · k[C]`.
    fn widen_keys(&self, x: Tensor<4>) -> Tensor<4> {
        match &self.kept {
            Some(kept) => {
                let [b, h, n, dk] = x.dims();
                let d = self.config.shape.head_dim();
                Tensor::<4>::zeros([b, h, n, d], &self.device).scatter(
                    3,
                    kept.clone().expand([b, h, n, dk]),
                    x,
                    IndexingUpdateOp::Assign,
                )
            }
            None => x,
        }
    }

    /// ThinK + KIVI: keeps the last `prune_window` query tokens seen before the channels are
    /// decided.
    fn record_queries(&mut self, q: &Tensor<4>) {
        if !self.awaiting_channels() {
            return;
        }
        let [b, qh, _, d] = q.dims();
        let w = self.config.prune_window;
        let joined = match self.queries.take() {
            Some(prev) => Tensor::cat(vec![prev, q.clone()], 2),
            None => q.clone(),
        };
        let len = joined.dims()[2];
        self.queries = Some(if len > w {
            joined.slice([0..b, 0..qh, len - w..len, 0..d])
        } else {
            joined
        });
    }

    /// ThinK's query-driven channel choice (`key_pruner_query_driven`), then the key spill
    /// that waited for it. Channel `c` of KV head `h` scores `mean(q_c²) · mean(k_c²)` over the
    /// recorded queries of the head's GQA group and over the keys about to be quantized (all
    /// window keys when fewer than `R`); the `⌊λ·d⌋` lowest are pruned, ties pruning the lower
    /// channel first. Without recorded queries the key energy alone scores.
    fn decide_channels(&mut self) -> Result<()> {
        let Some(kf) = self.k_full.clone() else {
            return Ok(());
        };
        let s = self.config.shape;
        let (b, h, d, r) = (s.batch(), s.kv_heads(), s.head_dim(), self.config.residual);
        let dk = self.config.kept_key_channels();
        let m = kf.dims()[2];
        let spill = m - m % r;
        let scored = if spill > 0 { spill } else { m };
        let keys = slice_tokens(&kf, 0..scored).cast(FloatDType::F32);
        let kn = keys.powi_scalar(2).mean_dim(2); // [b, h, 1, d]
        let score = match self.queries.take() {
            Some(q) => {
                let [_, qh, w, _] = q.dims();
                let qn = q
                    .cast(FloatDType::F32)
                    .powi_scalar(2)
                    .reshape([b, h, (qh / h) * w, d])
                    .mean_dim(2);
                qn * kn
            }
            None => kn,
        };
        let score = score
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("invariant: f32 scores read back");
        let mut kept_host = Vec::with_capacity(b * h);
        let mut flat = Vec::with_capacity(b * h * dk);
        for stream in 0..b * h {
            let sc = &score[stream * d..(stream + 1) * d];
            let mut order: Vec<usize> = (0..d).collect();
            order.sort_by(|&x, &y| sc[x].total_cmp(&sc[y]).then(x.cmp(&y)));
            let mut keep: Vec<u32> = order[d - dk..].iter().map(|&c| c as u32).collect();
            keep.sort_unstable();
            flat.extend(keep.iter().map(|&c| c as i32));
            kept_host.push(keep);
        }
        let kept = Tensor::<1, Int>::from_data(TensorData::new(flat, [b * h * dk]), &self.device)
            .cast(IntDType::I32)
            .reshape([b, h, 1, dk]);
        self.kept = Some(kept);
        self.kept_host = kept_host;
        if spill > 0 {
            let (k_spill, k_full) = split_at(kf, spill);
            let k_new = k_spill.map(|x| self.quantize_keys(x)).transpose()?;
            self.k_quant = join(self.k_quant.take(), k_new)?;
            self.k_full = k_full;
        }
        Ok(())
    }

    /// Keys and values as attention sees them, fp32 `[batch, kv_heads, len, head_dim]`:
    /// dequantized store, then the window, with the pending block as given.
    pub fn dequantized(&self) -> Option<(Tensor<4>, Tensor<4>)> {
        (self.len > 0).then(|| self.tokens_fp32(0..self.len))
    }

    /// Keys and values of the held tokens `range` in fp32, as attention sees them. A range that
    /// starts inside the sinks must start at 0; past the sinks its start must be a multiple of
    /// `G` (or past the quantized keys) for the key groups to split.
    fn tokens_fp32(&self, range: core::ops::Range<usize>) -> (Tensor<4>, Tensor<4>) {
        let (a, b) = (range.start, range.end);
        // A range inside the block just appended (a prefill's own tokens) is read as given,
        // without dequantizing what the pending block overwrites anyway.
        if let Some((pk, pv)) = &self.pending {
            let p0 = self.len - pk.dims()[2];
            if p0 <= a {
                let r = a - p0..b - p0;
                return (slice_tokens(pk, r.clone()), slice_tokens(pv, r));
            }
        }
        let sh = self.sink_tokens();
        let part = |q: &Option<QuantizedTensor>,
                    f: &Option<Tensor<4>>,
                    sink: Option<&Tensor<4>>,
                    keys: bool| {
            let mut parts = Vec::with_capacity(3);
            if let Some(sk) = sink
                && a < sh
            {
                parts.push(slice_tokens(sk, a..b.min(sh)).cast(FloatDType::F32));
            }
            if b <= sh {
                return Tensor::cat(parts, 2);
            }
            // Indices past the sinks, local to the quantized store and window.
            let (a, b) = (a.max(sh) - sh, b - sh);
            let tq = q.as_ref().map_or(0, QuantizedTensor::tokens);
            if let Some(q) = q
                && a < tq
            {
                // Chunk starts are multiples of G and `tq` is a multiple of R for keys: the
                // slice falls on group boundaries.
                let x = q.slice_tokens_aligned(a..b.min(tq)).dequantize();
                parts.push(if keys { self.widen_keys(x) } else { x });
            }
            if let Some(f) = f
                && b > tq
            {
                parts.push(slice_tokens(f, a.max(tq) - tq..b - tq).cast(FloatDType::F32));
            }
            Tensor::cat(parts, 2)
        };
        let sink = self.sink.as_ref();
        let mut k = part(&self.k_quant, &self.k_full, sink.map(|(k, _)| k), true);
        let mut v = part(&self.v_quant, &self.v_full, sink.map(|(_, v)| v), false);
        if let Some((pk, pv)) = &self.pending {
            let np = pk.dims()[2];
            let p0 = self.len - np;
            let s = a.max(p0);
            if s < b {
                let [bb, h, _, d] = k.dims();
                let r = [0..bb, 0..h, s - a..b - a, 0..d];
                k = k.slice_assign(r.clone(), slice_tokens(pk, s - p0..b - p0));
                v = v.slice_assign(r, slice_tokens(pv, s - p0..b - p0));
            }
        }
        (
            overlay_tokens(k, a..b, self.spilled_keys.as_ref()),
            overlay_tokens(v, a..b, self.spilled_values.as_ref()),
        )
    }

    /// Attention without statistics and its log-sum-exp: the fused host kernels for
    /// decode-sized queries on CPU backends ([`attend_fused`](Self::attend_fused)), the
    /// streamed tensor ops otherwise ([`attend_chunked`](Self::attend_chunked)).
    fn attend_fast(&self, query: &Query) -> (Tensor<4>, Tensor<4>) {
        // The fused kernels read whole-width key codes; pruned keys take the streamed path.
        if self.kept.is_none() && use_host(&self.device, query, self.config.shape.kv_heads()) {
            self.attend_fused(query)
        } else {
            self.attend_chunked(query)
        }
    }

    /// Attention computed on the packed codes (see [`crate::host`]): keys scored with the
    /// group's scale folded into the query and its zero point into a constant, values summed
    /// with the probabilities folded into the per-token scales. Only the packed store, the
    /// statistics and the full-precision windows are read back; nothing is dequantized.
    pub(crate) fn attend_fused(&self, query: &Query) -> (Tensor<4>, Tensor<4>) {
        let pair = |p: &Option<(Tensor<4>, Tensor<4>)>| {
            p.as_ref()
                .map(|(k, v)| (HostDense::new(k), HostDense::new(v)))
        };
        let sink = pair(&self.sink);
        let pending = pair(&self.pending);
        let spilled = |s: &Option<(usize, Tensor<4>)>| {
            s.as_ref().map(|(start, x)| (*start, HostDense::new(x)))
        };
        let (sk, sv) = (spilled(&self.spilled_keys), spilled(&self.spilled_values));
        let kq = self.k_quant.as_ref().map(HostCodes::from_quantized);
        let vq = self.v_quant.as_ref().map(HostCodes::from_quantized);
        let kf = self.k_full.as_ref().map(HostDense::new);
        let vf = self.v_full.as_ref().map(HostDense::new);
        let keys = ordered(
            &[
                sink.as_ref().map(|p| Source::Dense(&p.0)),
                kq.as_ref().map(Source::Codes),
                kf.as_ref().map(Source::Dense),
            ],
            pending.as_ref().map(|p| &p.0),
            self.len,
        );
        let keys = overlay(keys, sk.as_ref());
        let values = ordered(
            &[
                sink.as_ref().map(|p| Source::Dense(&p.1)),
                vq.as_ref().map(Source::Codes),
                vf.as_ref().map(Source::Dense),
            ],
            pending.as_ref().map(|p| &p.1),
            self.len,
        );
        let values = overlay(values, sv.as_ref());
        attend_host(
            query,
            self.config.shape.kv_heads(),
            self.len,
            &self.positions,
            &keys,
            &values,
        )
    }

    /// Attention streamed over chunks of [`ATTEND_CHUNK_TOKENS`] keys (rounded to whole
    /// groups): each chunk is dequantized, scored and merged into running softmax statistics
    /// (max, sum, weighted values), so the full-precision cache is never materialised.
    /// Returns the output and the log-sum-exp.
    pub(crate) fn attend_chunked(&self, query: &Query) -> (Tensor<4>, Tensor<4>) {
        let chunk = self.config.group * (ATTEND_CHUNK_TOKENS / self.config.group).max(1);
        // The sinks form their own first chunk, so that later chunks start on key groups.
        let sh = self.sink_tokens();
        attend_streamed(
            query,
            self.config.shape.kv_heads(),
            self.len,
            &self.positions,
            |start| if start < sh { sh } else { start + chunk },
            |range| self.tokens_fp32(range),
        )
    }

    fn flat_positions(&self) -> Vec<u32> {
        self.positions.concat()
    }
}

impl KvCache for KiviCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        const OP: &str = "KiviCache::append";
        let shape = self.config.shape;
        check_block(&shape, &block, OP)?;
        let last: Vec<Option<u32>> = self
            .positions
            .iter()
            .map(|p| p.iter().rev().copied().find(|&x| x != PAD))
            .collect();
        let counts = check_positions(block.positions(), shape.batch(), &last, OP)?;
        if self.config.scale_dtype == StorageDtype::F16 {
            let both = Tensor::cat(
                vec![
                    block.keys().clone().abs().max(),
                    block.values().clone().abs().max(),
                ],
                0,
            );
            self.key_spec
                .check_range(&both.reshape([1, 1, 1, 2]), "keys/values")
                .map_err(|_| KvError::NonFinite {
                    op: OP,
                    what: "keys/values beyond 32752 in magnitude (fp16 scales would overflow)",
                })?;
        }
        let n = block.seq_len();
        let r = self.config.residual;
        let dtype = match self.config.residual_dtype {
            StorageDtype::F32 => FloatDType::F32,
            StorageDtype::F16 => FloatDType::F16,
        };
        let (k, v, pos) = block.into_parts();
        let (k, v) = (k.cast(FloatDType::F32), v.cast(FloatDType::F32));
        let keep = self.config.current_in_full_precision;
        // Cache indices of the first window key and value before this append.
        let k_start = self.sink_tokens() + self.quantized_key_tokens();
        let v_start = self.sink_tokens() + self.quantized_value_tokens();
        let (mut spilled_keys, mut spilled_values) = (None, None);

        // Everything fallible happens on locals; the cache changes only once all succeeded.
        // Sinks first: the block's leading tokens while fewer than `sinks` are held.
        let take = self.config.sinks.saturating_sub(self.sink_tokens()).min(n);
        let mut sink = self.sink.clone();
        let (mut k_rest, mut v_rest) = (Some(k.clone()), Some(v.clone()));
        if take > 0 {
            let (sk, rk) = split_front(k.clone(), take);
            let (sv, rv) = split_front(v.clone(), take);
            sink = Some(match sink {
                Some((ok, ov)) => (
                    Tensor::cat(vec![ok, sk.cast(dtype)], 2),
                    Tensor::cat(vec![ov, sv.cast(dtype)], 2),
                ),
                None => (sk.cast(dtype), sv.cast(dtype)),
            });
            (k_rest, v_rest) = (rk, rv);
        }
        let (k_quant, k_full) = match k_rest {
            Some(kr) => {
                let kf = cat_tokens(self.k_full.clone(), kr.cast(dtype));
                let m = kf.dims()[2];
                // ThinK + KIVI: nothing spills until `end_prefill` has chosen the channels.
                let spill = if self.awaiting_channels() {
                    0
                } else {
                    m - m % r
                };
                let old = spill.min(tokens(self.k_full.as_ref()));
                if keep && old > 0 {
                    let w = self.k_full.as_ref().expect("a non-empty key window");
                    spilled_keys = Some((k_start, slice_tokens(w, 0..old)));
                }
                let (k_spill, k_full) = split_at(kf, spill);
                let k_new = k_spill.map(|x| self.quantize_keys(x)).transpose()?;
                (join(self.k_quant.clone(), k_new)?, k_full)
            }
            None => (self.k_quant.clone(), self.k_full.clone()),
        };
        let (v_quant, v_full) = match v_rest {
            Some(vr) => {
                let vf = cat_tokens(self.v_full.clone(), vr.cast(dtype));
                let m = vf.dims()[2];
                let spill = m.saturating_sub(r);
                let old = spill.min(tokens(self.v_full.as_ref()));
                if keep && old > 0 {
                    let w = self.v_full.as_ref().expect("a non-empty value window");
                    spilled_values = Some((v_start, slice_tokens(w, 0..old)));
                }
                let (v_spill, v_full) = split_at(vf, spill);
                let v_new = v_spill
                    .map(|x| self.value_spec.quantize_finite(x.cast(FloatDType::F32)))
                    .transpose()?;
                (join(self.v_quant.clone(), v_new)?, v_full)
            }
            None => (self.v_quant.clone(), self.v_full.clone()),
        };

        self.sink = sink;
        self.k_quant = k_quant;
        self.k_full = k_full;
        self.v_quant = v_quant;
        self.v_full = v_full;
        self.pending = keep.then_some((k, v));
        self.spilled_keys = spilled_keys;
        self.spilled_values = spilled_values;
        for b in 0..shape.batch() {
            self.positions[b].extend_from_slice(&pos[b * n..(b + 1) * n]);
            self.logical[b] += counts[b];
        }
        self.len += n;
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        const OP: &str = "KiviCache::attend";
        check_query(&self.config.shape, query, OP)?;
        self.record_queries(query.tensor());
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
        // Statistics need the normalised probabilities of every key: the dense path.
        let (k, v) = self.tokens_fp32(0..self.len);
        let kp = self.flat_positions();
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
        check_query(&self.config.shape, query, "KiviCache::attend_lse")?;
        self.record_queries(query.tensor());
        if self.len == 0 {
            return Ok(empty_lse(query, self.config.shape.kv_heads()));
        }
        Ok(self.attend_fast(query))
    }

    fn end_prefill(&mut self) -> kv_core::Result<()> {
        self.pending = None;
        self.spilled_keys = None;
        self.spilled_values = None;
        if self.awaiting_channels() {
            self.decide_channels()?;
        }
        Ok(())
    }

    fn view(&self) -> KvView {
        let s = self.config.shape;
        let (keys, values) = self.dequantized().unwrap_or_else(|| {
            let z = Tensor::zeros([s.batch(), s.kv_heads(), 0, s.head_dim()], &self.device);
            (z.clone(), z)
        });
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
        let fp = |t: &Option<Tensor<4>>| {
            t.as_ref()
                .map_or(0, |t| t.shape().num_elements() * t.dtype().size())
        };
        let q = |t: &Option<QuantizedTensor>| t.as_ref().map_or(0, QuantizedTensor::stored_bytes);
        let pair = |p: &Option<(Tensor<4>, Tensor<4>)>| {
            p.as_ref().map_or((0, 0), |(k, v)| {
                (
                    k.shape().num_elements() * k.dtype().size(),
                    v.shape().num_elements() * v.dtype().size(),
                )
            })
        };
        let (pk, pv) = pair(&self.pending);
        let (sk, sv) = pair(&self.sink);
        let spilled = |s: &Option<(usize, Tensor<4>)>| {
            s.as_ref()
                .map_or(0, |(_, t)| t.shape().num_elements() * t.dtype().size())
        };
        let (ok, ov) = (spilled(&self.spilled_keys), spilled(&self.spilled_values));
        let logical_tokens: usize = self.logical.iter().sum();
        MemoryReport {
            key_bytes: q(&self.k_quant) + fp(&self.k_full) + pk + sk + ok,
            value_bytes: q(&self.v_quant) + fp(&self.v_full) + pv + sv + ov,
            metadata_bytes: s.batch() * self.len * core::mem::size_of::<u32>()
                + fp(&self.queries)
                + self
                    .kept
                    .as_ref()
                    .map_or(0, |k| k.shape().num_elements() * k.dtype().size())
                + self
                    .kept_host
                    .iter()
                    .map(|k| core::mem::size_of_val(k.as_slice()))
                    .sum::<usize>(),
            logical_elements: 2 * logical_tokens * s.kv_heads() * s.head_dim(),
            logical_tokens,
            held_token_slots: s.streams() * self.len,
        }
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        let mut out = Vec::new();
        if let Some(q) = &self.k_quant {
            out.extend(q.held_buffers(StorageRole::Keys));
        }
        if let Some(q) = &self.v_quant {
            out.extend(q.held_buffers(StorageRole::Values));
        }
        if let Some(k) = &self.k_full {
            out.push(HeldBuffer::tensor(StorageRole::Keys, k));
        }
        if let Some(v) = &self.v_full {
            out.push(HeldBuffer::tensor(StorageRole::Values, v));
        }
        for (k, v) in self.pending.iter().chain(&self.sink) {
            out.push(HeldBuffer::tensor(StorageRole::Keys, k));
            out.push(HeldBuffer::tensor(StorageRole::Values, v));
        }
        if let Some((_, k)) = &self.spilled_keys {
            out.push(HeldBuffer::tensor(StorageRole::Keys, k));
        }
        if let Some((_, v)) = &self.spilled_values {
            out.push(HeldBuffer::tensor(StorageRole::Values, v));
        }
        for p in &self.positions {
            out.push(HeldBuffer::host(StorageRole::Metadata, p));
        }
        if let Some(q) = &self.queries {
            out.push(HeldBuffer::tensor(StorageRole::Metadata, q));
        }
        if let Some(k) = &self.kept {
            out.push(HeldBuffer::tensor(StorageRole::Metadata, k));
        }
        for k in &self.kept_host {
            out.push(HeldBuffer::host(StorageRole::Metadata, k));
        }
        out
    }

    fn reset(&mut self) {
        self.k_quant = None;
        self.k_full = None;
        self.v_quant = None;
        self.v_full = None;
        self.pending = None;
        self.spilled_keys = None;
        self.spilled_values = None;
        self.sink = None;
        self.kept = None;
        self.kept_host = Vec::new();
        self.queries = None;
        self.len = 0;
        for p in &mut self.positions {
            *p = Vec::new();
        }
        self.logical.iter_mut().for_each(|l| *l = 0);
    }
}
