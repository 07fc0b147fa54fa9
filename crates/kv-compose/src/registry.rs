//! The method registry: every method by name, with the role it can play in a pipeline and
//! the function that builds it for one layer.

use burn::prelude::*;
use kv_core::{DenseCacheConfig, KvCache, KvShape, RopeConfig, StorageDtype};

use crate::spec::{MethodSpec, PipelineSpec, relocate};
use crate::{ComposeError, Result};

/// What a builder gets to build one layer's cache.
#[derive(Debug, Clone)]
pub struct LayerContext {
    /// Layer index.
    pub layer: usize,
    /// Number of layers of the model.
    pub num_layers: usize,
    /// The cache shape the builder must use (the layer's shape, or one stream's shape when a
    /// pipeline stores each (sequence, KV head) stream in its own codec).
    pub shape: KvShape,
    /// The device.
    pub device: Device,
    /// The model's RoPE (for caches that store pre-RoPE keys or un-rotate queries).
    pub rope: RopeConfig,
}

/// Builds one layer's cache for a spec.
pub type CacheFn = fn(&MethodSpec, &LayerContext) -> Result<Box<dyn KvCache>>;
/// Builds one layer's prefill selection for a spec.
pub type SelectFn = fn(&MethodSpec, &LayerContext) -> Result<kv_evict::EvictConfig>;
/// Expands a named pipeline from a paper into its stages.
pub type PresetFn = fn(&MethodSpec) -> Result<PipelineSpec>;

/// The role a method plays, which decides where it may stand in a pipeline.
#[derive(Debug, Clone, Copy)]
pub enum Builder {
    /// Holds tokens (the full cache, fp16, KIVI, block formats): the last stage of a pipeline,
    /// or the `evicted` tier.
    Codec(CacheFn),
    /// Scores the prompt's tokens from unquantized keys and prefill attention and evicts once
    /// at the end of prefill (the kvpress scorers, PyramidKV, Ada-KV): the first stage.
    Selection(SelectFn),
    /// Evicts while decoding from storage it owns (H2O, StreamingLLM's rolling cache): alone.
    Policy(CacheFn),
    /// A pipeline from a paper (MiniKV, MiKV, LeanKV) that expands into stages: alone.
    Preset(PresetFn),
}

impl Builder {
    /// The role's name as error messages use it.
    pub fn role(&self) -> &'static str {
        match self {
            Builder::Codec(_) => "codec",
            Builder::Selection(_) => "selection",
            Builder::Policy(_) => "decode-time policy",
            Builder::Preset(_) => "preset pipeline",
        }
    }
}

/// A registered method.
#[derive(Debug, Clone)]
pub struct MethodEntry {
    /// The name users write.
    pub name: &'static str,
    /// One line on what it is.
    pub summary: &'static str,
    /// Parameter names it accepts (besides `ratio` when `takes_ratio`).
    pub params: &'static [&'static str],
    /// Whether it takes a ratio.
    pub takes_ratio: bool,
    /// Its role and builder.
    pub builder: Builder,
}

impl MethodEntry {
    /// Builds this method alone as one layer's cache (a selection over fp32 ragged storage, a
    /// codec, a policy). A preset is expanded and built as a pipeline.
    ///
    /// # Errors
    /// Bad parameters or configs.
    pub fn build_alone(&self, spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
        match self.builder {
            Builder::Codec(f) | Builder::Policy(f) => f(spec, cx),
            Builder::Selection(f) => {
                let cfg = f(spec, cx)?;
                Ok(Box::new(cfg.init(&cx.device).map_err(bad_param(spec))?))
            }
            Builder::Preset(f) => crate::build::build_layer(&f(spec)?, cx),
        }
    }
}

/// Every registered method. Technique crates add their methods here as they land.
pub fn registry() -> Vec<MethodEntry> {
    vec![
        MethodEntry {
            name: "full",
            summary: "uncompressed dense cache, fp32 storage (what the model computes with)",
            params: &[],
            takes_ratio: false,
            builder: Builder::Codec(|_, cx| {
                Ok(Box::new(DenseCacheConfig::new(cx.shape).init(&cx.device)?) as Box<dyn KvCache>)
            }),
        },
        MethodEntry {
            name: "dense_fp16",
            summary: "uncompressed dense cache stored in fp16 (the HF/vLLM default dtype)",
            params: &[],
            takes_ratio: false,
            builder: Builder::Codec(|_, cx| {
                let cfg = DenseCacheConfig::new(cx.shape).with_dtype(StorageDtype::F16);
                Ok(Box::new(cfg.init(&cx.device)?) as Box<dyn KvCache>)
            }),
        },
        // kv-evict: prefill-time eviction, scores equal to kvpress 0.5.5 (`--ratio` is the
        // fraction removed, 0.5 when not given).
        MethodEntry {
            name: "knorm",
            summary: "evict by key norm, keep the lowest-norm keys (kvpress KnormPress)",
            params: EVICT_PARAMS,
            takes_ratio: true,
            builder: Builder::Selection(select_evict),
        },
        MethodEntry {
            name: "snapkv",
            summary: "observation-window voting, window 64, kernel 5 (kvpress SnapKVPress)",
            params: &[
                "window",
                "kernel",
                "gqa",
                "decode_every",
                "decode_target",
                "sinks",
                "recent",
            ],
            takes_ratio: true,
            builder: Builder::Selection(select_evict),
        },
        MethodEntry {
            name: "streaming_llm",
            summary: "keep 4 sink tokens and the most recent prompt tokens (StreamingLLMPress)",
            params: &["n_sink", "decode_every", "decode_target", "sinks", "recent"],
            takes_ratio: true,
            builder: Builder::Selection(select_evict),
        },
        MethodEntry {
            name: "tova",
            summary: "evict by the last prompt query's head-mean attention (kvpress TOVAPress)",
            params: EVICT_PARAMS,
            takes_ratio: true,
            builder: Builder::Selection(select_evict),
        },
        MethodEntry {
            name: "observed_attention",
            summary: "H2O at prefill: mean attention each token received (ObservedAttentionPress); \
                      recent=F always keeps the last F of the prompt (MiniKV's H2O)",
            params: &["gqa", "recent", "sinks"],
            takes_ratio: true,
            builder: Builder::Selection(select_evict),
        },
        MethodEntry {
            name: "keydiff",
            summary: "keep keys least similar to the mean key (kvpress KeyDiffPress)",
            params: EVICT_PARAMS,
            takes_ratio: true,
            builder: Builder::Selection(select_evict),
        },
        MethodEntry {
            name: "expected_attention",
            summary: "attention expected from future queries' statistics (ExpectedAttentionPress)",
            params: &[
                "n_future_positions",
                "n_sink",
                "use_covariance",
                "use_vnorm",
                "epsilon",
                "gqa",
                "decode_every",
                "decode_target",
                "sinks",
                "recent",
            ],
            takes_ratio: true,
            builder: Builder::Selection(select_evict),
        },
        MethodEntry {
            name: "streaming_llm_decode",
            summary: "StreamingLLM rolling cache: 4 sinks + 512 recent tokens (or ratio=R: \
                      floor(n (1 - R)) of the prompt's n, sinks included), evicted while decoding",
            params: &["n_sink", "recent"],
            takes_ratio: true,
            builder: Builder::Policy(|spec, cx| {
                let num = |key: &str, default: usize| -> Result<usize> {
                    spec.params.get(key).map_or(Ok(default), |v| {
                        v.parse()
                            .map_err(|_| spec.bad(key, &format!("`{v}` is not a token count")))
                    })
                };
                let cfg = match spec.ratio {
                    Some(r) => {
                        no_budget_with_ratio(spec, &["recent"])?;
                        kv_evict::StreamingConfig::with_ratio(cx.shape, num("n_sink", 4)?, r)
                    }
                    None => kv_evict::StreamingConfig::new(
                        cx.shape,
                        num("n_sink", 4)?,
                        num("recent", 512)?,
                    ),
                };
                Ok(Box::new(cfg.init(&cx.device).map_err(bad_param(spec))?) as Box<dyn KvCache>)
            }),
        },
        // kv-evict: budget allocation over the kvpress scorers.
        MethodEntry {
            name: "pyramidkv",
            summary: "SnapKV scores, layer budgets decreasing linearly with depth, beta 20 \
                      (kvpress PyramidKVPress)",
            params: &[
                "window",
                "kernel",
                "gqa",
                "beta",
                "decode_every",
                "decode_target",
                "sinks",
                "recent",
            ],
            takes_ratio: true,
            builder: Builder::Selection(select_pyramidkv),
        },
        MethodEntry {
            name: "adakv_snapkv",
            summary: "SnapKV scores, head-wise budgets by a bottom-k over the layer's heads, \
                      alpha_safeguard 0.2 (kvpress AdaKVPress(SnapKVPress))",
            params: &[
                "window",
                "kernel",
                "gqa",
                "alpha_safeguard",
                "decode_every",
                "decode_target",
                "sinks",
                "recent",
            ],
            takes_ratio: true,
            builder: Builder::Selection(select_adakv),
        },
        MethodEntry {
            name: "adakv",
            summary: "Ada-KV head-wise budgets over any scorer (`scorer=NAME`, default snapkv, \
                      with that scorer's parameters; kvpress AdaKVPress)",
            params: ADAKV_PARAMS,
            takes_ratio: true,
            builder: Builder::Selection(select_adakv),
        },
        // kv-evict: H2O, decode-time.
        MethodEntry {
            name: "h2o",
            summary: "H2O: heavy hitters by attention accumulated over prefill and decode + \
                      recent tokens, evicted while decoding (heavy, recent: counts or \
                      fractions of the prompt; default 0.1 each; or ratio=R: floor(n (1 - R)) \
                      of the prompt's n, half recent, half heavy)",
            params: &["heavy", "recent", "gqa"],
            takes_ratio: true,
            builder: Builder::Policy(build_h2o),
        },
        // kv-quant: KIVI (per-channel keys, per-token values, fp window of recent tokens).
        MethodEntry {
            name: "kivi",
            summary: "KIVI: keys per channel, values per token, b bits, groups of G, fp window R \
                      (defaults bits=2, group=32, residual=128, fp16 scales and window)",
            params: kv_quant::KiviConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_kivi),
        },
        // kv-quant: serving-engine storage formats (llama.cpp blocks, vLLM fp8), every token
        // quantized on append; every entry takes `v=FORMAT` (values in another format),
        // `scale=tensor|head|unit` (fp8) and `search=refit|ntry7` (iq4_nl).
        MethodEntry {
            name: "q8_0",
            summary: "llama.cpp q8_0 blocks along head_dim: 32 int8 codes + fp16 d = amax/127 \
                      (8.5 bits)",
            params: kv_quant::BlockQuantConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_block_quant),
        },
        MethodEntry {
            name: "q4_0",
            summary: "llama.cpp q4_0 blocks: 32 4-bit codes + fp16 d = max/-8 (4.5 bits)",
            params: kv_quant::BlockQuantConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_block_quant),
        },
        MethodEntry {
            name: "q4_1",
            summary: "llama.cpp q4_1 blocks: 32 4-bit codes + fp16 d and min (5 bits)",
            params: kv_quant::BlockQuantConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_block_quant),
        },
        MethodEntry {
            name: "q5_0",
            summary: "llama.cpp q5_0 blocks: 32 5-bit codes (4-bit + high-bit plane) + fp16 d \
                      (5.5 bits)",
            params: kv_quant::BlockQuantConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_block_quant),
        },
        MethodEntry {
            name: "q5_1",
            summary: "llama.cpp q5_1 blocks: 32 5-bit codes + fp16 d and min (6 bits)",
            params: kv_quant::BlockQuantConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_block_quant),
        },
        MethodEntry {
            name: "iq4_nl",
            summary: "llama.cpp iq4_nl blocks: 4-bit kvalues_iq4nl indices + fp16 d (4.5 bits; \
                      search=refit|ntry7)",
            params: kv_quant::BlockQuantConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_block_quant),
        },
        MethodEntry {
            name: "fp8_e4m3",
            summary: "vLLM-style fp8 e4m3, scale amax/448 of the first block \
                      (scale=tensor|head|unit)",
            params: kv_quant::BlockQuantConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_block_quant),
        },
        MethodEntry {
            name: "fp8_e5m2",
            summary: "vLLM-style fp8 e5m2, scale amax/57344 of the first block \
                      (scale=tensor|head|unit)",
            params: kv_quant::BlockQuantConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_block_quant),
        },
        // kv-evict: Scissorhands and Keyformer, decode-time (use with --protocol stream).
        MethodEntry {
            name: "scissorhands",
            summary: "Scissorhands: evict the tokens least often above uniform attention over \
                      their last 400 attention calls; budget B = tokens or a fraction of the \
                      prompt (default 0.5), 10 recent + 4 sinks never evicted \
                      (cold-compress KVCacheHeavyHitter)",
            params: kv_evict::ScissorhandsConfig::PARAMS,
            takes_ratio: true,
            builder: Builder::Policy(build_scissorhands),
        },
        MethodEntry {
            name: "keyformer",
            summary: "Keyformer: H2O-style accumulated Gumbel-softmax scores (tau 1 + 0.01 per \
                      decode step), budget = tokens or a fraction of the prompt (default 0.6), \
                      30% of it recent tokens (d-matrix-ai/keyformer-llm)",
            params: kv_evict::KeyformerConfig::PARAMS,
            takes_ratio: true,
            builder: Builder::Policy(build_keyformer),
        },
        MethodEntry {
            name: "coverage",
            summary: "per-head coverage budgets (LeanKV): each KV head keeps the fewest tokens \
                      covering `mass` (default 0.9) of its normalised scores; `scorer=NAME` \
                      (default snapkv) with that scorer's parameters; no ratio",
            params: COVERAGE_PARAMS,
            takes_ratio: false,
            builder: Builder::Selection(select_coverage),
        },
        MethodEntry {
            name: "headkv",
            summary: "HeadKV: SnapKV (window 32, kernel 7) with per-head budgets from offline \
                      retrieval-head scores (artefact=PATH, default the shipped SmolLM2-135M \
                      calibration), beta 1.01, temp 1",
            params: &[
                "window", "kernel", "gqa", "beta", "temp", "artefact", "sinks", "recent",
            ],
            takes_ratio: true,
            builder: Builder::Selection(select_headkv),
        },
        // kv-pq: non-destructive query-aware selection (every token kept, full K/V counted;
        // decode attends exactly to a query-dependent subset).
        MethodEntry {
            name: "quest",
            summary: "Quest: per-page key min/max (16-token pages); decode attends to the pages \
                      with the largest score bound (budget=N tokens or 0.x, required)",
            params: kv_pq::QuestConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_quest),
        },
        MethodEntry {
            name: "pqcache",
            summary: "PQCache: keys product-quantized at end of prefill (2 subspaces x 6 bits); \
                      decode attends to 32 sinks + 32 recent + top_k by PQ score (top_k required)",
            params: kv_pq::PqCacheConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_pqcache),
        },
        MethodEntry {
            name: "double_sparsity",
            summary: "Double Sparsity: label cache of head_dim/8 channels chosen from prefill \
                      |q|·|k| statistics; decode attends to the heavy best + current token \
                      (heavy required)",
            params: kv_pq::DoubleSparsityConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_double_sparsity),
        },
        MethodEntry {
            name: "clusterkv",
            summary: "ClusterKV: 400 k-means clusters of unit keys at end of prefill; decode \
                      attends to 16 sinks + current token + best clusters (budget required)",
            params: kv_pq::ClusterKvConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_clusterkv),
        },
        MethodEntry {
            name: "tokenselect",
            summary: "TokenSelect: per-head softmax soft votes pick the tokens all heads attend \
                      to: 128 sinks + 512 recent + top_k (required); selection reused while \
                      the query's cosine with the last selecting one is >= 0.9",
            params: kv_pq::TokenSelectConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_tokenselect),
        },
        MethodEntry {
            name: "rvq",
            summary: "residual VQ: keys and values stored as codes of per-layer, per-KV-head \
                      residual codebooks (calibration=PATH from `kv-eval calibrate --rvq`, \
                      stages=N of those trained) plus an fp16 scale per token and head",
            params: kv_pq::RvqConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_rvq),
        },
        // kv-lowrank: channel / feature-dimension reduction (docs/techniques/lowrank.md).
        MethodEntry {
            name: "think",
            summary: "ThinK: prune the key channels of the prefill that the last 32 queries use \
                      least (ratio = fraction of channels removed, default 0.4); the last \
                      `recent` (32) tokens keep all channels",
            params: kv_lowrank::ThinkConfig::PARAMS,
            takes_ratio: true,
            builder: Builder::Codec(build_think),
        },
        MethodEntry {
            name: "loki",
            summary: "Loki: keys in a calibrated PCA basis; each query keeps the top_k keys \
                      (default 0.25 of them) by scores on the first `rank` dims (default d/4) \
                      and attends exactly over them; needs calibration=PATH (kv-eval calibrate)",
            params: kv_lowrank::LokiConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_loki),
        },
        MethodEntry {
            name: "eigen",
            summary: "Eigen Attention (no fine-tuning): keys/queries and values projected on \
                      calibrated PCA bases (rank_k, rank_v, default d/2), attention in the \
                      low-rank space; needs calibration=PATH (kv-eval calibrate)",
            params: kv_lowrank::EigenConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_eigen),
        },
        MethodEntry {
            name: "palu",
            summary: "Palu (per-head, no training): pre-RoPE key and value latents on \
                      calibrated PCA bases (rank_k, rank_v, default d/2), keys rebuilt and \
                      rotated when attending; needs calibration=PATH (kv-eval calibrate)",
            params: kv_lowrank::PaluConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_palu),
        },
        MethodEntry {
            name: "lorc",
            summary: "LoRC (data free): pre-RoPE key and value latents on the right singular \
                      vectors of W_k, W_v per KV head, progressive ranks from max_rank (first \
                      layer, default d) to min_rank (last, default d/4) by cumulative condition \
                      numbers; needs calibration=PATH (example lorc_weights)",
            params: kv_lowrank::LorcConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_lorc),
        },
        MethodEntry {
            name: "matryoshka",
            summary: "MatryoshkaKV (PCA initialisation, no training): keys and values on nested \
                      PCA bases, per-head ranks averaging rank_k, rank_v (default 0.4 d) \
                      allocated over the model by eigenvalue share, key_basis=keys (default) or \
                      query_key; needs calibration=PATH (kv-eval calibrate)",
            params: kv_lowrank::MatryoshkaConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_matryoshka),
        },
        MethodEntry {
            name: "cskv",
            summary: "CSKV (closed-form, no training): old tokens as features of the joint \
                      pre-RoPE keys / values of all heads (k_density 0.25, v_density 0.75), \
                      the last `window` (32) tokens exact; needs calibration=PATH (kv-eval \
                      calibrate)",
            params: kv_lowrank::CskvConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_cskv),
        },
        // kv-quant: QJL (1-bit JL sketch of keys, scores from the bits; KIVI-style values).
        MethodEntry {
            name: "qjl",
            summary: "QJL: keys as sign bits of a seeded JL sketch (m bits) + fp16 norms, outlier \
                      channels per group sketched apart (m_o bits), scores estimated from the bits; \
                      values per token; fp buffer (defaults sketch_dim=256, outlier_sketch_dim=256, \
                      outliers=8, value_bits=2, group=32, buffer=128, seed=42)",
            params: kv_quant::QjlConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_qjl),
        },
        // kv-quant: GEAR (uniform backbone + low-rank residual + sparse fp16 outliers).
        MethodEntry {
            name: "gear",
            summary: "GEAR: KIVI-grouped b-bit backbone + rank-r power-iteration approximation of \
                      its residual + top/bottom s/2 entries in fp16, compressed every gap tokens \
                      (defaults bits=2, group=64, prefill_rank=4, rank=2, loop=3, left=0.02, gap=64)",
            params: kv_quant::GearConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_gear),
        },
        // kv-quant: KVQuant (pre-RoPE keys, calibrated non-uniform codebooks, sparse outliers).
        MethodEntry {
            name: "kvquant",
            summary: "KVQuant: pre-RoPE per-channel keys and per-token values on calibrated \
                      non-uniform codebooks, ~1% fp16 outliers (CSR), fp16 sinks; needs \
                      calibration=PATH (JSON array of per-layer KvQuantCalibration)",
            params: kv_quant::KvQuantConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Codec(build_kvquant),
        },
        // kv-dmc: token merging, decode-time.
        MethodEntry {
            name: "dmc",
            summary: "DMC: each token appended or averaged (ω-weighted) into its KV head's last \
                      slot; decision=similarity (training-free proxy: key cosine > threshold, \
                      default 0.9, optional value_threshold) or learned (artefact=PATH exported \
                      from a DMC-retrofitted checkpoint); proportional=true adds ln z per slot",
            params: kv_dmc::DmcConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Policy(build_dmc),
        },
        MethodEntry {
            name: "cam",
            summary: "CaM merge-on-evict: sinks (default 4) + recent window (required), each \
                      evicted value merged into the next merge_window (default 32) kept tokens \
                      with weight min(1, its attention / mean kept attention)",
            params: kv_dmc::MergeEvictConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Policy(build_cam),
        },
        MethodEntry {
            name: "less",
            summary: "LESS: a sparse policy (policy=h2o: heavy + recent, the default; \
                      policy=lambda: sinks + recent; token counts, required) whose evicted \
                      tokens are folded into a learned low-rank state per KV head; \
                      artefact=PATH (maps trained by kv-dmc's less_calibrate example) or \
                      maps=zero (no state: the sparse policy alone)",
            params: kv_dmc::LessConfig::PARAMS,
            takes_ratio: false,
            builder: Builder::Policy(build_less),
        },
        // kv-compose: pipelines from papers.
        MethodEntry {
            name: "minikv",
            summary: "MiniKV: H2O selection at prefill (ratio 0.5 removed; the recent half of \
                      what is kept, heavy hitters for the rest), then KIVI 2-bit, group 16, \
                      fp16 window 128 (selection=h2o|snapkv|pyramid)",
            params: crate::presets::MINIKV_PARAMS,
            takes_ratio: true,
            builder: Builder::Preset(crate::presets::minikv),
        },
        MethodEntry {
            name: "think_kivi",
            summary: "ThinK + KIVI: KIVI-2 (group 32, fp16 window 128) whose quantized keys \
                      drop the ratio (0.4) of channels with the least query-weighted energy, \
                      chosen from the last 32 prefill queries; same as think|kivi",
            params: crate::presets::THINK_KIVI_PARAMS,
            takes_ratio: true,
            builder: Builder::Preset(crate::presets::think_kivi),
        },
        MethodEntry {
            name: "mikv",
            summary: "MiKV: accumulated-attention importance; the top tokens in fp16 (or int8), \
                      the rest (ratio 0.75) kept at 2 bits instead of evicted",
            params: crate::presets::MIKV_PARAMS,
            takes_ratio: true,
            builder: Builder::Preset(crate::presets::mikv),
        },
        MethodEntry {
            name: "leankv",
            summary: "LeanKV: per-head dynamic sparsity (fewest tokens covering 90% of each \
                      head's prompt attention), then keys at 8 bits and values at 4 \
                      (precision=k8v4|k4v2)",
            params: crate::presets::LEANKV_PARAMS,
            takes_ratio: false,
            builder: Builder::Preset(crate::presets::leankv),
        },
    ]
}

/// Looks a method up and checks its parameter names and ratio.
///
/// # Errors
/// [`ComposeError::UnknownMethod`] or [`ComposeError::BadParam`] (without a location; callers
/// add it).
pub fn lookup(spec: &MethodSpec) -> Result<MethodEntry> {
    let reg = registry();
    let entry = reg
        .iter()
        .find(|e| e.name == spec.name)
        .cloned()
        .ok_or_else(|| ComposeError::UnknownMethod {
            at: String::new(),
            name: spec.name.clone(),
            known: reg.iter().map(|e| e.name).collect::<Vec<_>>().join(", "),
        })?;
    if spec.ratio.is_some() && !entry.takes_ratio {
        return Err(spec.bad("ratio", "this method takes no compression ratio"));
    }
    spec.check_ratio("")?;
    if let Some(p) = spec
        .params
        .keys()
        .find(|p| !entry.params.contains(&p.as_str()))
    {
        return Err(spec.bad(
            p,
            &format!("unknown parameter; accepted: {}", entry.params.join(", ")),
        ));
    }
    Ok(entry)
}

/// [`lookup`] with the error located at `at`.
pub(crate) fn lookup_at(spec: &MethodSpec, at: &str) -> Result<MethodEntry> {
    lookup(spec).map_err(|e| relocate(e, at))
}

/// Maps a kv-core config error to a parameter error of `spec`.
pub(crate) fn bad_param(spec: &MethodSpec) -> impl Fn(kv_core::KvError) -> ComposeError + '_ {
    move |e| match e {
        kv_core::KvError::InvalidConfig { field, reason } => spec.bad(field, &reason),
        other => ComposeError::Cache(other),
    }
}

/// Parses an optional float parameter.
pub(crate) fn float_param(spec: &MethodSpec, key: &str, default: f64) -> Result<f64> {
    spec.params.get(key).map_or(Ok(default), |v| {
        v.parse()
            .map_err(|_| spec.bad(key, &format!("`{v}` is not a number")))
    })
}

/// The kv-evict selection of every kvpress scorer entry; the ratio defaults to 0.5.
fn select_evict(spec: &MethodSpec, cx: &LayerContext) -> Result<kv_evict::EvictConfig> {
    select_budgeted(spec, cx, &spec.name, &[], kv_evict::BudgetKind::Uniform)
}

/// Parameters of the kvpress scorers without parameters of their own (knorm, tova, keydiff):
/// decode-time compression and the protected sinks and recent tokens.
const EVICT_PARAMS: &[&str] = &["decode_every", "decode_target", "sinks", "recent"];

/// Parameters of `adakv`: `scorer`, `alpha_safeguard` and every scorer's parameters (each
/// checked against the chosen scorer by [`kv_evict::ScorerConfig::from_params`]).
const ADAKV_PARAMS: &[&str] = &[
    "scorer",
    "alpha_safeguard",
    "window",
    "kernel",
    "gqa",
    "n_sink",
    "n_future_positions",
    "use_covariance",
    "use_vnorm",
    "epsilon",
    "decode_every",
    "decode_target",
    "sinks",
    "recent",
];

/// Whether `key` is a protection parameter of a selection over `scorer`
/// ([`kv_evict::EvictConfig::PROTECT_PARAMS`]) rather than one of the scorer's own
/// (`observed_attention`'s `recent` is its fraction of the prompt).
fn is_protect_param(scorer: &str, key: &str) -> bool {
    let scorer_takes = kv_evict::PARAMS
        .iter()
        .any(|(name, params)| *name == scorer && params.contains(&key));
    kv_evict::EvictConfig::PROTECT_PARAMS.contains(&key) && !scorer_takes
}

/// The protected `(sinks, recent)` token counts of a selection over `scorer` (0 when not
/// given).
fn protected(spec: &MethodSpec, scorer: &str) -> Result<(usize, usize)> {
    let count = |key: &str| -> Result<usize> {
        match spec.params.get(key) {
            Some(v) if is_protect_param(scorer, key) => v
                .parse()
                .map_err(|_| spec.bad(key, &format!("`{v}` is not a token count"))),
            _ => Ok(0),
        }
    };
    Ok((count("sinks")?, count("recent")?))
}

/// Rejects explicit budget parameters of a decode-time policy when the spec gives a ratio.
fn no_budget_with_ratio(spec: &MethodSpec, budget_params: &[&str]) -> Result<()> {
    match budget_params.iter().find(|k| spec.params.contains_key(**k)) {
        Some(k) => Err(spec.bad(
            k,
            "conflicts with the ratio, which sets the budget; give one or the other",
        )),
        None => Ok(()),
    }
}

/// A kv-evict selection with scorer `scorer` (parameters from `spec` except those in `skip`)
/// and budget `budget`.
pub(crate) fn select_budgeted(
    spec: &MethodSpec,
    cx: &LayerContext,
    scorer: &str,
    skip: &[&str],
    budget: kv_evict::BudgetKind,
) -> Result<kv_evict::EvictConfig> {
    let bad = bad_param(spec);
    let scorer = kv_evict::ScorerConfig::from_params(
        scorer,
        spec.params
            .iter()
            .filter(|(k, _)| {
                !skip.contains(&k.as_str())
                    && !kv_evict::DecodeCompression::PARAMS.contains(&k.as_str())
                    && !is_protect_param(scorer, k)
            })
            .map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .map_err(&bad)?;
    let (sinks, recent) = protected(spec, scorer.name())?;
    let decode = kv_evict::DecodeCompression::from_params(
        spec.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .map_err(&bad)?;
    let mut cfg = kv_evict::EvictConfig::new(cx.shape, spec.ratio.unwrap_or(0.5), scorer)
        .with_budget(budget)
        .with_rope(cx.rope.clone())
        .with_layer(cx.layer, cx.num_layers)
        .with_protected(sinks, recent);
    if let Some(dc) = decode {
        cfg = cfg.with_decode_compression(dc.every, dc.target);
    }
    Ok(cfg)
}

/// PyramidKV: SnapKV scores with kvpress's pyramid layer budgets.
fn select_pyramidkv(spec: &MethodSpec, cx: &LayerContext) -> Result<kv_evict::EvictConfig> {
    let beta = float_param(spec, "beta", 20.0)?;
    select_budgeted(
        spec,
        cx,
        "snapkv",
        &["beta"],
        kv_evict::BudgetKind::Pyramid { beta },
    )
}

/// Ada-KV (`adakv_snapkv`, or `adakv` with `scorer=NAME`): kvpress's head-wise budgets.
fn select_adakv(spec: &MethodSpec, cx: &LayerContext) -> Result<kv_evict::EvictConfig> {
    let alpha_safeguard = float_param(spec, "alpha_safeguard", 0.2)?;
    let scorer = match spec.name.strip_prefix("adakv_") {
        Some(s) => s,
        None => spec.params.get("scorer").map_or("snapkv", String::as_str),
    };
    select_budgeted(
        spec,
        cx,
        scorer,
        &["alpha_safeguard", "scorer"],
        kv_evict::BudgetKind::AdaKv { alpha_safeguard },
    )
}

/// H2O (decode-time): `heavy` and `recent` as token counts or fractions of the prompt.
fn build_h2o(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
    let bad = bad_param(spec);
    let budget = |key: &'static str| -> Result<kv_evict::TokenBudget> {
        spec.params
            .get(key)
            .map_or(Ok(kv_evict::TokenBudget::Ratio(0.1)), |v| {
                kv_evict::TokenBudget::parse(key, v).map_err(&bad)
            })
    };
    let mut cfg = match spec.ratio {
        Some(r) => {
            no_budget_with_ratio(spec, &["heavy", "recent"])?;
            kv_evict::H2oConfig::with_ratio(cx.shape, r)
        }
        None => kv_evict::H2oConfig::new(cx.shape, budget("heavy")?, budget("recent")?),
    };
    if let Some(g) = spec.params.get("gqa") {
        cfg.gqa = kv_evict::GqaReduce::parse(g)
            .ok_or_else(|| spec.bad("gqa", &format!("`{g}` is not one of mean, max, sum")))?;
    }
    Ok(Box::new(cfg.init(&cx.device).map_err(&bad)?))
}

/// Scissorhands (kv-evict, decode-time): `budget` as tokens or a kept fraction, or the
/// spec's ratio (the fraction removed: `floor(n (1 - ratio))` of the prompt's `n`).
fn build_scissorhands(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
    let bad = bad_param(spec);
    let mut cfg = kv_evict::ScissorhandsConfig::from_params(
        cx.shape,
        spec.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .map_err(&bad)?;
    if let Some(r) = spec.ratio {
        no_budget_with_ratio(spec, &["budget"])?;
        cfg.budget = kv_evict::TokenBudget::from_ratio(r).map_err(&bad)?;
    }
    Ok(Box::new(cfg.init(&cx.device).map_err(&bad)?))
}

/// Keyformer (kv-evict, decode-time): `budget` as tokens or a kept fraction, or the spec's
/// ratio (the fraction removed), split into recent and key tokens as the reference does.
fn build_keyformer(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
    let bad = bad_param(spec);
    let mut cfg = kv_evict::KeyformerConfig::from_params(
        cx.shape,
        spec.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .map_err(&bad)?;
    if let Some(r) = spec.ratio {
        no_budget_with_ratio(spec, &["budget"])?;
        cfg.budget = kv_evict::TokenBudget::from_ratio(r).map_err(&bad)?;
    }
    Ok(Box::new(cfg.init(&cx.device).map_err(&bad)?))
}

/// One layer's serving-engine-format cache (kv-quant); the method name is the format.
fn build_block_quant(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
    let bad = bad_param(spec);
    let cfg = kv_quant::BlockQuantConfig::from_params(
        cx.shape,
        &spec.name,
        spec.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .map_err(&bad)?;
    Ok(Box::new(cfg.init(&cx.device).map_err(&bad)?))
}

/// One layer's KVQuant cache (kv-quant): `calibration=PATH` names a JSON array of per-layer
/// [`kv_quant::KvQuantCalibration`] artefacts, indexed by the layer.
fn build_kvquant(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
    let bad = bad_param(spec);
    let cfg = kv_quant::KvQuantConfig::from_params(
        cx.shape,
        cx.rope.clone(),
        spec.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        |path| {
            let fail = |reason: String| kv_core::KvError::InvalidConfig {
                field: "calibration",
                reason,
            };
            let text = std::fs::read_to_string(path)
                .map_err(|e| fail(format!("cannot read `{path}`: {e}")))?;
            let mut layers: Vec<kv_quant::KvQuantCalibration> = serde_json::from_str(&text)
                .map_err(|e| {
                    fail(format!(
                        "`{path}` is not a JSON array of KvQuantCalibration: {e}"
                    ))
                })?;
            if cx.layer >= layers.len() {
                return Err(fail(format!(
                    "`{path}` holds {} layers, layer {} was asked for",
                    layers.len(),
                    cx.layer
                )));
            }
            Ok(layers.swap_remove(cx.layer))
        },
    )
    .map_err(&bad)?;
    Ok(Box::new(cfg.init(&cx.device).map_err(&bad)?))
}

/// Parameters of `coverage`: `scorer`, `mass` and every scorer's parameters.
const COVERAGE_PARAMS: &[&str] = &[
    "scorer",
    "mass",
    "window",
    "kernel",
    "gqa",
    "n_sink",
    "n_future_positions",
    "use_covariance",
    "use_vnorm",
    "epsilon",
    "sinks",
    "recent",
];

/// LeanKV-style coverage: per-head budgets covering a share of each head's score mass.
fn select_coverage(spec: &MethodSpec, cx: &LayerContext) -> Result<kv_evict::EvictConfig> {
    let mass = float_param(spec, "mass", 0.9)?;
    let scorer = spec.params.get("scorer").map_or("snapkv", String::as_str);
    select_budgeted(
        spec,
        cx,
        scorer,
        &["mass", "scorer"],
        kv_evict::BudgetKind::Coverage { mass },
    )
}

/// The HeadKV head-importance artefact shipped for SmolLM2-135M-Instruct (kv-evict's
/// `examples/headkv_calibrate.rs` regenerates it).
const HEADKV_SMOLLM2: &str = include_str!("../../kv-evict/data/headkv_smollm2_135m_instruct.json");

/// HeadKV: SnapKV with HeadKV's window 32 / kernel 7 and static per-head budgets from the
/// head-importance artefact (`artefact=PATH`; default the shipped SmolLM2 one).
fn select_headkv(spec: &MethodSpec, cx: &LayerContext) -> Result<kv_evict::EvictConfig> {
    let bad = bad_param(spec);
    let beta = float_param(spec, "beta", 1.01)?;
    let temp = float_param(spec, "temp", 1.0)?;
    let json = match spec.params.get("artefact") {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| spec.bad("artefact", &format!("cannot read `{path}`: {e}")))?,
        None => HEADKV_SMOLLM2.to_owned(),
    };
    let importance = kv_evict::HeadImportance::from_json(&json).map_err(&bad)?;
    let mut params: std::collections::BTreeMap<&str, &str> = spec
        .params
        .iter()
        .filter(|(k, _)| {
            !["beta", "temp", "artefact"].contains(&k.as_str()) && !is_protect_param("snapkv", k)
        })
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    params.entry("window").or_insert("32");
    params.entry("kernel").or_insert("7");
    let scorer = kv_evict::ScorerConfig::from_params("snapkv", params).map_err(&bad)?;
    let (sinks, recent) = protected(spec, "snapkv")?;
    Ok(
        kv_evict::EvictConfig::new(cx.shape, spec.ratio.unwrap_or(0.5), scorer)
            .with_budget(kv_evict::BudgetKind::HeadKv { beta, temp })
            .with_head_importance(importance)
            .with_rope(cx.rope.clone())
            .with_layer(cx.layer, cx.num_layers)
            .with_protected(sinks, recent),
    )
}

/// The `key=value` parameters of a spec as string pairs (kv-lowrank's `from_params`).
fn lowrank_params(spec: &MethodSpec) -> impl Iterator<Item = (&str, &str)> + '_ {
    spec.params.iter().map(|(k, v)| (k.as_str(), v.as_str()))
}

/// One layer's ThinK cache (kv-lowrank); the stage's ratio is `λ`, the fraction of key
/// channels removed (0.4 when not given).
fn build_think(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
    let bad = bad_param(spec);
    let mut cfg =
        kv_lowrank::ThinkConfig::from_params(cx.shape, lowrank_params(spec)).map_err(&bad)?;
    if let Some(r) = spec.ratio {
        cfg.pruning_ratio = r;
    }
    Ok(Box::new(cfg.init(&cx.device).map_err(&bad)?))
}

/// One layer's residual-VQ cache (kv-pq): `calibration=PATH` is a `kv-eval calibrate --rvq`
/// artefact whose entry for this layer holds the codebooks.
fn build_rvq(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
    let bad = bad_param(spec);
    let cfg = kv_pq::RvqConfig::from_params(
        cx.shape,
        cx.layer,
        spec.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .map_err(&bad)?
    .with_num_layers(cx.num_layers);
    Ok(Box::new(cfg.init(&cx.device).map_err(&bad)?))
}

/// Builders of kv-lowrank caches for one layer from a calibration artefact: the config is
/// `Config::from_params(shape, layer, [rope,] params)` for this layer, checked against the
/// model's layer count, then `init(device)`; config errors become parameter errors of the
/// stage. `calibration=PATH` names the artefact (`kv-eval calibrate`; LoRC's weight spectra
/// come from `cargo run -p kv-lowrank --example lorc_weights`, CSKV needs format version 2).
macro_rules! calibrated_builders {
    (@cfg $config:path, $spec:ident, $cx:ident) => {
        <$config>::from_params($cx.shape, $cx.layer, lowrank_params($spec))
    };
    (@cfg $config:path, $spec:ident, $cx:ident, rope) => {
        <$config>::from_params($cx.shape, $cx.layer, $cx.rope.clone(), lowrank_params($spec))
    };
    ($($(#[$doc:meta])* $name:ident => $config:path $(, $rope:ident)?;)*) => {$(
        $(#[$doc])*
        fn $name(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
            let bad = bad_param(spec);
            let cfg = calibrated_builders!(@cfg $config, spec, cx $(, $rope)?)
                .map_err(&bad)?
                .with_num_layers(cx.num_layers);
            Ok(Box::new(cfg.init(&cx.device).map_err(&bad)?))
        }
    )*};
}

calibrated_builders! {
    /// Loki (kv-lowrank).
    build_loki => kv_lowrank::LokiConfig;
    /// Eigen Attention (kv-lowrank).
    build_eigen => kv_lowrank::EigenConfig;
    /// Palu (kv-lowrank, pre-RoPE keys rotated when attending).
    build_palu => kv_lowrank::PaluConfig, rope;
    /// LoRC (kv-lowrank, pre-RoPE keys; weight spectra artefact).
    build_lorc => kv_lowrank::LorcConfig, rope;
    /// MatryoshkaKV (kv-lowrank).
    build_matryoshka => kv_lowrank::MatryoshkaConfig;
    /// CSKV (kv-lowrank, pre-RoPE keys; artefact format version 2).
    build_cskv => kv_lowrank::CskvConfig, rope;
}

/// One layer's DMC cache (kv-dmc); parameters map to [`kv_dmc::DmcConfig`], and
/// `artefact=PATH` names a JSON [`kv_dmc::DmcArtefact`] whose entry for this layer holds the
/// learned decision heads.
fn build_dmc(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
    let bad = bad_param(spec);
    let cfg = kv_dmc::DmcConfig::from_params(
        cx.shape,
        spec.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        |path| {
            let fail = |reason: String| kv_core::KvError::InvalidConfig {
                field: "artefact",
                reason,
            };
            let text = std::fs::read_to_string(path)
                .map_err(|e| fail(format!("cannot read `{path}`: {e}")))?;
            let artefact: kv_dmc::DmcArtefact = serde_json::from_str(&text)
                .map_err(|e| fail(format!("`{path}` is not a DmcArtefact: {e}")))?;
            artefact.layer(cx.layer, cx.shape.kv_heads(), cx.shape.head_dim())
        },
    )
    .map_err(&bad)?;
    Ok(Box::new(cfg.init(&cx.device).map_err(&bad)?))
}

/// One layer's LESS cache (kv-dmc); parameters map to [`kv_dmc::LessConfig`], and
/// `artefact=PATH` names a JSON [`kv_dmc::LessArtefact`] whose entry for this layer holds the
/// learned maps (checked against the model's layers and shape).
fn build_less(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
    let bad = bad_param(spec);
    let cfg = kv_dmc::LessConfig::from_params(
        cx.shape,
        spec.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        |path| {
            let fail = |reason: String| kv_core::KvError::InvalidConfig {
                field: "artefact",
                reason,
            };
            let text = std::fs::read_to_string(path)
                .map_err(|e| fail(format!("cannot read `{path}`: {e}")))?;
            let artefact: kv_dmc::LessArtefact = serde_json::from_str(&text)
                .map_err(|e| fail(format!("`{path}` is not a LessArtefact: {e}")))?;
            artefact.layer(cx.layer, cx.num_layers, &cx.shape)
        },
    )
    .map_err(&bad)?;
    Ok(Box::new(cfg.init(&cx.device).map_err(&bad)?))
}

/// Builders of caches whose config is `Config::from_params(shape, params)` and `init(device)`:
/// the parameters map one to one to the config's fields, and config errors become parameter
/// errors of the stage.
macro_rules! from_params_builders {
    ($($(#[$doc:meta])* $name:ident => $config:path;)*) => {$(
        $(#[$doc])*
        fn $name(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
            let bad = bad_param(spec);
            let cfg = <$config>::from_params(
                cx.shape,
                spec.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .map_err(&bad)?;
            Ok(Box::new(cfg.init(&cx.device).map_err(&bad)?))
        }
    )*};
}

from_params_builders! {
    /// KIVI (kv-quant).
    build_kivi => kv_quant::KiviConfig;
    /// QJL (kv-quant).
    build_qjl => kv_quant::QjlConfig;
    /// GEAR (kv-quant).
    build_gear => kv_quant::GearConfig;
    /// Quest (kv-pq).
    build_quest => kv_pq::QuestConfig;
    /// PQCache (kv-pq).
    build_pqcache => kv_pq::PqCacheConfig;
    /// Double Sparsity (kv-pq).
    build_double_sparsity => kv_pq::DoubleSparsityConfig;
    /// ClusterKV (kv-pq).
    build_clusterkv => kv_pq::ClusterKvConfig;
    /// TokenSelect (kv-pq).
    build_tokenselect => kv_pq::TokenSelectConfig;
    /// CaM-style merge-on-evict (kv-dmc).
    build_cam => kv_dmc::MergeEvictConfig;
}

/// The kv-evict entries: protected sinks and recent tokens on every selection, ratios on the
/// decode-time policies (public API only, so the module can move to `tests/it`).
#[cfg(test)]
mod evict_entries_tests {
    use kv_core::{KvBlock, KvCache, KvShape, Query, RopeConfig, RopeConvention, StatsRequest};
    use kv_testkit::{seeded_tensor, test_device};

    use crate::{Builder, LayerContext, PipelineSpec, build_layer, lookup};

    fn cx() -> LayerContext {
        LayerContext {
            layer: 0,
            num_layers: 2,
            shape: KvShape::new(1, 1, 2, 8).expect("shape"),
            device: test_device(),
            rope: RopeConfig::new(8, 10_000.0, RopeConvention::RotateHalf),
        }
    }

    fn selection(line: &str) -> kv_evict::EvictConfig {
        let spec = PipelineSpec::parse_line(line)
            .expect("parse")
            .stages
            .remove(0);
        match lookup(&spec).expect("lookup").builder {
            Builder::Selection(f) => f(&spec, &cx()).unwrap_or_else(|e| panic!("{line}: {e}")),
            other => panic!("{line} is a {}", other.role()),
        }
    }

    fn build(line: &str) -> crate::Result<Box<dyn KvCache>> {
        build_layer(&PipelineSpec::parse_line(line)?, &cx())
    }

    /// Held tokens after a prefill of `n` attended by its own queries.
    fn held_after_prefill(line: &str, n: usize) -> usize {
        let mut c = build(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        let d = test_device();
        let kv = [1, 1, n, 8];
        c.append(
            KvBlock::contiguous(
                seeded_tensor(kv, 1, 1.0, &d),
                seeded_tensor(kv, 2, 1.0, &d),
                0,
            )
            .expect("block"),
        )
        .expect("append");
        let q = seeded_tensor([1, 2, n, 8], 3, 1.0, &d);
        c.attend(&Query::contiguous(q, 0).expect("q"), StatsRequest::NONE)
            .expect("attend");
        c.end_prefill().expect("end_prefill");
        c.lengths().held[0]
    }

    #[test]
    fn every_selection_takes_sinks_and_recent() {
        for line in [
            "knorm",
            "snapkv",
            "streaming_llm",
            "tova",
            "keydiff",
            "expected_attention",
            "pyramidkv",
            "adakv_snapkv",
            "adakv:scorer=knorm",
            "headkv",
            "coverage",
        ] {
            let line = format!(
                "{line}{}sinks=4,recent=8",
                if line.contains(':') { "," } else { ":" }
            );
            let cfg = selection(&line);
            assert_eq!((cfg.sinks, cfg.recent), (4, 8), "{line}");
        }
        // Default: nothing protected (kvpress's selection).
        assert_eq!(
            (selection("snapkv").sinks, selection("snapkv").recent),
            (0, 0)
        );
        // observed_attention's `recent` stays its fraction of the prompt (MiniKV's H2O);
        // `sinks` is the protection.
        let cfg = selection("observed_attention:recent=0.25,sinks=2");
        assert_eq!((cfg.sinks, cfg.recent), (2, 0));
        assert!(matches!(
            cfg.scorer,
            kv_evict::ScorerConfig::ObservedAttention { recent, .. } if recent == 0.25
        ));
        assert!(build("knorm:sinks=four").is_err());
        // Through the cache: 64 tokens at ratio 0.9 keep 6, which cannot hold 4 + 8.
        assert_eq!(
            held_after_prefill("knorm:ratio=0.5,sinks=4,recent=8", 64),
            32
        );
        let mut c = build("knorm:ratio=0.9,sinks=4,recent=8").expect("build");
        let d = test_device();
        let kv = [1, 1, 64, 8];
        c.append(
            KvBlock::contiguous(
                seeded_tensor(kv, 1, 1.0, &d),
                seeded_tensor(kv, 2, 1.0, &d),
                0,
            )
            .expect("block"),
        )
        .expect("append");
        let e = c.end_prefill().expect_err("6 < 4 + 8");
        assert!(e.to_string().contains("recent"), "{e}");
    }

    #[test]
    fn decode_time_policies_take_a_ratio() {
        for name in ["h2o", "streaming_llm_decode", "scissorhands", "keyformer"] {
            let spec = PipelineSpec::parse_line(name)
                .expect("parse")
                .stages
                .remove(0);
            assert!(lookup(&spec).expect("lookup").takes_ratio, "{name}");
        }
        // floor(64 (1 - 0.75)) = 16 per KV head at the end of prefill, for every policy.
        for line in [
            "h2o:ratio=0.75",
            "streaming_llm_decode:ratio=0.75",
            "scissorhands:ratio=0.75",
            "keyformer:ratio=0.75",
        ] {
            assert_eq!(held_after_prefill(line, 64), 16, "{line}");
        }
        // Explicit budgets keep working.
        assert_eq!(held_after_prefill("h2o:heavy=5,recent=3", 64), 8);
        assert_eq!(
            held_after_prefill("streaming_llm_decode:n_sink=2,recent=6", 64),
            8
        );
        assert_eq!(held_after_prefill("scissorhands:budget=20", 64), 20);
        assert_eq!(held_after_prefill("keyformer:budget=0.25", 64), 16);
        // A ratio and an explicit budget conflict.
        for (line, param) in [
            ("h2o:ratio=0.5,heavy=8", "heavy"),
            ("h2o:ratio=0.5,recent=0.1", "recent"),
            ("streaming_llm_decode:ratio=0.5,recent=8", "recent"),
            ("scissorhands:ratio=0.5,budget=20", "budget"),
            ("keyformer:ratio=0.5,budget=0.5", "budget"),
        ] {
            let e = build(line).err().unwrap_or_else(|| panic!("{line} built"));
            let msg = e.to_string();
            assert!(
                msg.contains(param) && msg.contains("ratio"),
                "{line}: {msg}"
            );
        }
        assert!(build("h2o:ratio=1.0").is_err());
    }
}
