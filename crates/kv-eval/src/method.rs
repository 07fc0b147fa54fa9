//! Cache methods by name: the spec users write (`--method NAME --ratio R --param k=v`, or a
//! one-line pipeline `name:k=v,k=v|name:...`) and the registry that turns it into caches.

use std::collections::BTreeMap;

use burn::prelude::*;
use kv_core::{DenseCacheConfig, KvCache, KvShape, LayerCaches, RopeConfig, StorageDtype};
use serde::{Deserialize, Serialize};

use crate::{EvalError, Result};

/// One method (or pipeline stage) with its parameters, as written by the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodSpec {
    /// The method's name (kvpress's name where kvpress has the method).
    pub name: String,
    /// The fraction of tokens removed (kvpress's `compression_ratio`), for methods that take it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Further parameters, `key=value`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub params: BTreeMap<String, String>,
}

impl MethodSpec {
    /// The full cache.
    pub fn full() -> Self {
        MethodSpec {
            name: "full".into(),
            ratio: None,
            params: BTreeMap::new(),
        }
    }

    /// Parses one stage of the one-line form: `name` or `name:key=value,key=value`
    /// (`ratio=R` becomes [`MethodSpec::ratio`]).
    ///
    /// # Errors
    /// [`EvalError::Usage`] for an empty name or a parameter without `=`.
    pub fn parse_stage(stage: &str) -> Result<Self> {
        let (name, rest) = match stage.split_once(':') {
            Some((n, r)) => (n.trim(), Some(r)),
            None => (stage.trim(), None),
        };
        if name.is_empty() {
            return Err(EvalError::Usage(format!(
                "pipeline stage `{stage}` has no method name"
            )));
        }
        let mut spec = MethodSpec {
            name: name.to_owned(),
            ratio: None,
            params: BTreeMap::new(),
        };
        for kv in rest
            .into_iter()
            .flat_map(|r| r.split(','))
            .filter(|s| !s.trim().is_empty())
        {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                EvalError::Usage(format!("stage `{name}`: parameter `{kv}` is not key=value"))
            })?;
            spec.set_param(k.trim(), v.trim())?;
        }
        Ok(spec)
    }

    /// Sets a parameter; `ratio` is parsed into [`MethodSpec::ratio`].
    ///
    /// # Errors
    /// [`EvalError::BadParam`] for a ratio that is not a number in `[0, 1)`.
    pub fn set_param(&mut self, key: &str, value: &str) -> Result<()> {
        if key == "ratio" {
            let r: f64 = value
                .parse()
                .map_err(|_| self.bad("ratio", "not a number"))?;
            if !(0.0..1.0).contains(&r) {
                return Err(self.bad("ratio", "must be in [0, 1): the fraction of tokens removed"));
            }
            self.ratio = Some(r);
        } else {
            self.params.insert(key.to_owned(), value.to_owned());
        }
        Ok(())
    }

    fn bad(&self, param: &str, reason: &str) -> EvalError {
        EvalError::BadParam {
            method: self.name.clone(),
            param: param.into(),
            reason: reason.into(),
        }
    }

    /// The one-line form of this stage.
    pub fn to_stage_string(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        if let Some(r) = self.ratio {
            parts.push(format!("ratio={r}"));
        }
        parts.extend(self.params.iter().map(|(k, v)| format!("{k}={v}")));
        if parts.is_empty() {
            self.name.clone()
        } else {
            format!("{}:{}", self.name, parts.join(","))
        }
    }
}

/// Parses a one-line pipeline, `stage|stage|...`.
///
/// # Errors
/// As [`MethodSpec::parse_stage`], or an empty pipeline.
pub fn parse_pipeline(line: &str) -> Result<Vec<MethodSpec>> {
    let stages: Vec<MethodSpec> = line
        .split('|')
        .filter(|s| !s.trim().is_empty())
        .map(MethodSpec::parse_stage)
        .collect::<Result<_>>()?;
    if stages.is_empty() {
        return Err(EvalError::Usage("empty pipeline".into()));
    }
    Ok(stages)
}

/// What a method factory gets to build one layer's cache.
#[derive(Debug, Clone)]
pub struct LayerContext {
    /// Layer index.
    pub layer: usize,
    /// Number of layers of the model.
    pub num_layers: usize,
    /// The layer's cache shape.
    pub shape: KvShape,
    /// The device.
    pub device: Device,
    /// The model's RoPE (for caches that store pre-RoPE keys or un-rotate queries).
    pub rope: RopeConfig,
}

/// Builds one layer's cache for a spec.
pub type Factory = fn(&MethodSpec, &LayerContext) -> Result<Box<dyn KvCache>>;

/// A registered method.
#[derive(Debug, Clone)]
pub struct MethodEntry {
    /// The name users write.
    pub name: &'static str,
    /// One line on what it is.
    pub summary: &'static str,
    /// Parameter names it accepts (besides `ratio` when `takes_ratio`).
    pub params: &'static [&'static str],
    /// Whether it takes `--ratio`.
    pub takes_ratio: bool,
    /// The factory.
    pub build: Factory,
}

/// Every method the harness knows. Technique crates add their methods here as they land.
pub fn registry() -> Vec<MethodEntry> {
    vec![
        MethodEntry {
            name: "full",
            summary: "uncompressed dense cache, fp32 storage (what the model computes with)",
            params: &[],
            takes_ratio: false,
            build: |_, cx| {
                Ok(Box::new(DenseCacheConfig::new(cx.shape).init(&cx.device)?) as Box<dyn KvCache>)
            },
        },
        MethodEntry {
            name: "dense_fp16",
            summary: "uncompressed dense cache stored in fp16 (the HF/vLLM default dtype)",
            params: &[],
            takes_ratio: false,
            build: |_, cx| {
                let cfg = DenseCacheConfig::new(cx.shape).with_dtype(StorageDtype::F16);
                Ok(Box::new(cfg.init(&cx.device)?) as Box<dyn KvCache>)
            },
        },
        // kv-evict: prefill-time eviction, scores equal to kvpress 0.5.5 (`--ratio` is the
        // fraction removed, 0.5 when not given).
        MethodEntry {
            name: "knorm",
            summary: "evict by key norm, keep the lowest-norm keys (kvpress KnormPress)",
            params: &[],
            takes_ratio: true,
            build: build_evict,
        },
        MethodEntry {
            name: "snapkv",
            summary: "observation-window voting, window 64, kernel 5 (kvpress SnapKVPress)",
            params: &["window", "kernel", "gqa"],
            takes_ratio: true,
            build: build_evict,
        },
        MethodEntry {
            name: "streaming_llm",
            summary: "keep 4 sink tokens and the most recent prompt tokens (StreamingLLMPress)",
            params: &["n_sink"],
            takes_ratio: true,
            build: build_evict,
        },
        MethodEntry {
            name: "tova",
            summary: "evict by the last prompt query's head-mean attention (kvpress TOVAPress)",
            params: &[],
            takes_ratio: true,
            build: build_evict,
        },
        MethodEntry {
            name: "observed_attention",
            summary: "H2O at prefill: mean attention each token received (ObservedAttentionPress)",
            params: &["gqa"],
            takes_ratio: true,
            build: build_evict,
        },
        MethodEntry {
            name: "keydiff",
            summary: "keep keys least similar to the mean key (kvpress KeyDiffPress)",
            params: &[],
            takes_ratio: true,
            build: build_evict,
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
            ],
            takes_ratio: true,
            build: build_evict,
        },
        MethodEntry {
            name: "streaming_llm_decode",
            summary: "StreamingLLM rolling cache: 4 sinks + 512 recent tokens, evicted while decoding",
            params: &["n_sink", "recent"],
            takes_ratio: false,
            build: |spec, cx| {
                let num = |key: &str, default: usize| -> Result<usize> {
                    spec.params.get(key).map_or(Ok(default), |v| {
                        v.parse().map_err(|_| EvalError::BadParam {
                            method: spec.name.clone(),
                            param: key.into(),
                            reason: format!("`{v}` is not a token count"),
                        })
                    })
                };
                let cfg = kv_evict::StreamingConfig::new(
                    cx.shape,
                    num("n_sink", 4)?,
                    num("recent", 512)?,
                );
                Ok(Box::new(cfg.init(&cx.device)?) as Box<dyn KvCache>)
            },
        },
        // kv-evict: budget allocation over the kvpress scorers.
        MethodEntry {
            name: "pyramidkv",
            summary: "SnapKV scores, layer budgets decreasing linearly with depth, beta 20 \
                      (kvpress PyramidKVPress)",
            params: &["window", "kernel", "gqa", "beta"],
            takes_ratio: true,
            build: build_pyramidkv,
        },
        MethodEntry {
            name: "adakv_snapkv",
            summary: "SnapKV scores, head-wise budgets by a bottom-k over the layer's heads, \
                      alpha_safeguard 0.2 (kvpress AdaKVPress(SnapKVPress))",
            params: &["window", "kernel", "gqa", "alpha_safeguard"],
            takes_ratio: true,
            build: build_adakv,
        },
        MethodEntry {
            name: "adakv",
            summary: "Ada-KV head-wise budgets over any scorer (`scorer=NAME`, default snapkv, \
                      with that scorer's parameters; kvpress AdaKVPress)",
            params: ADAKV_PARAMS,
            takes_ratio: true,
            build: build_adakv,
        },
        // kv-evict: H2O, decode-time.
        MethodEntry {
            name: "h2o",
            summary: "H2O: heavy hitters by attention accumulated over prefill and decode + \
                      recent tokens, evicted while decoding (heavy, recent: counts or \
                      fractions of the prompt; default 0.1 each)",
            params: &["heavy", "recent", "gqa"],
            takes_ratio: false,
            build: build_h2o,
        },
        // kv-quant: KIVI (per-channel keys, per-token values, fp window of recent tokens).
        MethodEntry {
            name: "kivi",
            summary: "KIVI: keys per channel, values per token, b bits, groups of G, fp window R \
                      (defaults bits=2, group=32, residual=128, fp16 scales and window)",
            params: kv_quant::KiviConfig::PARAMS,
            takes_ratio: false,
            build: build_kivi,
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
            build: build_block_quant,
        },
        MethodEntry {
            name: "q4_0",
            summary: "llama.cpp q4_0 blocks: 32 4-bit codes + fp16 d = max/-8 (4.5 bits)",
            params: kv_quant::BlockQuantConfig::PARAMS,
            takes_ratio: false,
            build: build_block_quant,
        },
        MethodEntry {
            name: "q4_1",
            summary: "llama.cpp q4_1 blocks: 32 4-bit codes + fp16 d and min (5 bits)",
            params: kv_quant::BlockQuantConfig::PARAMS,
            takes_ratio: false,
            build: build_block_quant,
        },
        MethodEntry {
            name: "q5_0",
            summary: "llama.cpp q5_0 blocks: 32 5-bit codes (4-bit + high-bit plane) + fp16 d \
                      (5.5 bits)",
            params: kv_quant::BlockQuantConfig::PARAMS,
            takes_ratio: false,
            build: build_block_quant,
        },
        MethodEntry {
            name: "q5_1",
            summary: "llama.cpp q5_1 blocks: 32 5-bit codes + fp16 d and min (6 bits)",
            params: kv_quant::BlockQuantConfig::PARAMS,
            takes_ratio: false,
            build: build_block_quant,
        },
        MethodEntry {
            name: "iq4_nl",
            summary: "llama.cpp iq4_nl blocks: 4-bit kvalues_iq4nl indices + fp16 d (4.5 bits; \
                      search=refit|ntry7)",
            params: kv_quant::BlockQuantConfig::PARAMS,
            takes_ratio: false,
            build: build_block_quant,
        },
        MethodEntry {
            name: "fp8_e4m3",
            summary: "vLLM-style fp8 e4m3, scale amax/448 of the first block \
                      (scale=tensor|head|unit)",
            params: kv_quant::BlockQuantConfig::PARAMS,
            takes_ratio: false,
            build: build_block_quant,
        },
        MethodEntry {
            name: "fp8_e5m2",
            summary: "vLLM-style fp8 e5m2, scale amax/57344 of the first block \
                      (scale=tensor|head|unit)",
            params: kv_quant::BlockQuantConfig::PARAMS,
            takes_ratio: false,
            build: build_block_quant,
        },
    ]
}

/// Looks a method up and checks its parameters.
///
/// # Errors
/// [`EvalError::UnknownMethod`] or [`EvalError::BadParam`].
pub fn lookup(spec: &MethodSpec) -> Result<MethodEntry> {
    let reg = registry();
    let entry = reg
        .iter()
        .find(|e| e.name == spec.name)
        .cloned()
        .ok_or_else(|| EvalError::UnknownMethod {
            name: spec.name.clone(),
            known: reg.iter().map(|e| e.name).collect::<Vec<_>>().join(", "),
        })?;
    if spec.ratio.is_some() && !entry.takes_ratio {
        return Err(EvalError::BadParam {
            method: spec.name.clone(),
            param: "ratio".into(),
            reason: "this method takes no compression ratio".into(),
        });
    }
    if let Some(p) = spec
        .params
        .keys()
        .find(|p| !entry.params.contains(&p.as_str()))
    {
        return Err(EvalError::BadParam {
            method: spec.name.clone(),
            param: p.clone(),
            reason: format!("unknown parameter; accepted: {}", entry.params.join(", ")),
        });
    }
    Ok(entry)
}

/// Builds the per-layer caches of a pipeline for a model with `num_layers` layers.
///
/// # Errors
/// Unknown methods, bad parameters, or pipelines of more than one stage (composition arrives
/// with `kv-compose`).
pub fn build_caches(
    stages: &[MethodSpec],
    num_layers: usize,
    shape: KvShape,
    rope: &RopeConfig,
    device: &Device,
) -> Result<LayerCaches> {
    let [spec] = stages else {
        return Err(EvalError::Usage(format!(
            "pipelines of {} stages need kv-compose, which is not built yet; \
             give a single method",
            stages.len()
        )));
    };
    let entry = lookup(spec)?;
    let mut layers: Vec<Box<dyn KvCache>> = Vec::with_capacity(num_layers);
    for layer in 0..num_layers {
        let cx = LayerContext {
            layer,
            num_layers,
            shape,
            device: device.clone(),
            rope: rope.clone(),
        };
        layers.push((entry.build)(spec, &cx)?);
    }
    Ok(LayerCaches::new(layers))
}

/// Builds one layer's kv-evict cache (every kv-evict entry of [`registry`]); the ratio
/// defaults to 0.5 when not given.
fn build_evict(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
    let bad = |e: kv_core::KvError| match e {
        kv_core::KvError::InvalidConfig { field, reason } => EvalError::BadParam {
            method: spec.name.clone(),
            param: field.into(),
            reason,
        },
        other => EvalError::Cache(other),
    };
    let scorer = kv_evict::ScorerConfig::from_params(
        &spec.name,
        spec.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .map_err(bad)?;
    let cfg = kv_evict::EvictConfig::new(cx.shape, spec.ratio.unwrap_or(0.5), scorer)
        .with_rope(cx.rope.clone())
        .with_layer(cx.layer, cx.num_layers);
    Ok(Box::new(cfg.init(&cx.device).map_err(bad)?) as Box<dyn KvCache>)
}

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
];

/// Maps a kv-core config error to the harness's parameter error of `spec`.
fn bad_param(spec: &MethodSpec) -> impl Fn(kv_core::KvError) -> EvalError + '_ {
    move |e| match e {
        kv_core::KvError::InvalidConfig { field, reason } => EvalError::BadParam {
            method: spec.name.clone(),
            param: field.into(),
            reason,
        },
        other => EvalError::Cache(other),
    }
}

/// Builds one layer's kv-evict cache with scorer `scorer` (parameters from `spec` except
/// those in `skip`) and budget `budget`.
fn build_budgeted(
    spec: &MethodSpec,
    cx: &LayerContext,
    scorer: &str,
    skip: &[&str],
    budget: kv_evict::BudgetKind,
) -> Result<Box<dyn KvCache>> {
    let bad = bad_param(spec);
    let scorer = kv_evict::ScorerConfig::from_params(
        scorer,
        spec.params
            .iter()
            .filter(|(k, _)| !skip.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .map_err(&bad)?;
    let cfg = kv_evict::EvictConfig::new(cx.shape, spec.ratio.unwrap_or(0.5), scorer)
        .with_budget(budget)
        .with_rope(cx.rope.clone())
        .with_layer(cx.layer, cx.num_layers);
    Ok(Box::new(cfg.init(&cx.device).map_err(&bad)?) as Box<dyn KvCache>)
}

/// Parses an optional float parameter.
fn float_param(spec: &MethodSpec, key: &str, default: f64) -> Result<f64> {
    spec.params.get(key).map_or(Ok(default), |v| {
        v.parse().map_err(|_| EvalError::BadParam {
            method: spec.name.clone(),
            param: key.into(),
            reason: format!("`{v}` is not a number"),
        })
    })
}

/// PyramidKV: SnapKV scores with kvpress's pyramid layer budgets.
fn build_pyramidkv(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
    let beta = float_param(spec, "beta", 20.0)?;
    build_budgeted(
        spec,
        cx,
        "snapkv",
        &["beta"],
        kv_evict::BudgetKind::Pyramid { beta },
    )
}

/// Ada-KV (`adakv_snapkv`, or `adakv` with `scorer=NAME`): kvpress's head-wise budgets.
fn build_adakv(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
    let alpha_safeguard = float_param(spec, "alpha_safeguard", 0.2)?;
    let scorer = match spec.name.strip_prefix("adakv_") {
        Some(s) => s,
        None => spec.params.get("scorer").map_or("snapkv", String::as_str),
    };
    build_budgeted(
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
    let mut cfg = kv_evict::H2oConfig::new(cx.shape, budget("heavy")?, budget("recent")?);
    if let Some(g) = spec.params.get("gqa") {
        cfg.gqa = kv_evict::GqaReduce::parse(g).ok_or_else(|| EvalError::BadParam {
            method: spec.name.clone(),
            param: "gqa".into(),
            reason: format!("`{g}` is not one of mean, max, sum"),
        })?;
    }
    Ok(Box::new(cfg.init(&cx.device).map_err(&bad)?) as Box<dyn KvCache>)
}

/// Builds one layer's KIVI cache (kv-quant); parameters map to [`kv_quant::KiviConfig`].
fn build_kivi(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
    let bad = |e: kv_core::KvError| match e {
        kv_core::KvError::InvalidConfig { field, reason } => EvalError::BadParam {
            method: spec.name.clone(),
            param: field.into(),
            reason,
        },
        other => EvalError::Cache(other),
    };
    let cfg = kv_quant::KiviConfig::from_params(
        cx.shape,
        spec.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .map_err(bad)?;
    Ok(Box::new(cfg.init(&cx.device).map_err(bad)?) as Box<dyn KvCache>)
}

/// Builds one layer's serving-engine-format cache (kv-quant); the method name is the format.
fn build_block_quant(spec: &MethodSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
    let bad = bad_param(spec);
    let cfg = kv_quant::BlockQuantConfig::from_params(
        cx.shape,
        &spec.name,
        spec.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .map_err(&bad)?;
    Ok(Box::new(cfg.init(&cx.device).map_err(bad)?) as Box<dyn KvCache>)
}
