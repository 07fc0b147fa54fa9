//! Pipelines from papers, expanded into stages ([`Builder::Preset`](crate::Builder::Preset)).
//! Each function documents the paper's setting it follows and where it deviates.

use crate::Result;
use crate::spec::{MethodSpec, PipelineSpec};

fn param<'a>(spec: &'a MethodSpec, key: &str, default: &'a str) -> &'a str {
    spec.params.get(key).map_or(default, String::as_str)
}

fn count(spec: &MethodSpec, key: &str, default: usize) -> Result<usize> {
    let v = param(spec, key, "");
    if v.is_empty() {
        return Ok(default);
    }
    v.parse()
        .map_err(|_| spec.bad(key, &format!("`{v}` is not a whole number")))
}

/// Parameters of `minikv`.
pub(crate) const MINIKV_PARAMS: &[&str] = &["selection", "bits", "group", "residual"];

/// MiniKV (Sharma et al., 2024, arXiv 2411.18077): select at prefill, then KIVI 2-bit with
/// group 16 and a 128-token fp16 window for everything kept and decoded.
///
/// The reference's default keeps `heavy_ratio = recent_ratio = 0.25` of the prompt, half of
/// it, so `ratio` (the fraction removed) defaults to 0.5, and its default selection
/// (`selection=h2o`) keeps the most recent `(1 − ratio) / 2` of the prompt plus the tokens with
/// the most attention accumulated over the prompt among the rest (`observed_attention` with
/// `recent`). `selection=snapkv` is the reference's `--use_snap True` mode (SnapKV scores,
/// its observation window always kept); `selection=pyramid` uses PyramidKV's layer budgets
/// over SnapKV scores.
pub(crate) fn minikv(spec: &MethodSpec) -> Result<PipelineSpec> {
    let ratio = spec.ratio.unwrap_or(0.5);
    let selection = match param(spec, "selection", "h2o") {
        "h2o" => MethodSpec::new("observed_attention").with("recent", (1.0 - ratio) / 2.0),
        "snapkv" => MethodSpec::new("snapkv"),
        "pyramid" => MethodSpec::new("pyramidkv"),
        other => {
            return Err(spec.bad(
                "selection",
                &format!("`{other}` is not one of h2o, snapkv, pyramid"),
            ));
        }
    }
    .with_ratio(ratio);
    let kivi = MethodSpec::new("kivi")
        .with("bits", count(spec, "bits", 2)?)
        .with("group", count(spec, "group", 16)?)
        .with("residual", count(spec, "residual", 128)?);
    Ok(PipelineSpec::new(vec![selection, kivi]))
}

/// Parameters of `think_kivi`.
pub(crate) const THINK_KIVI_PARAMS: &[&str] = &["window", "bits", "group", "residual"];

/// ThinK + KIVI (Xu et al., 2024, arXiv 2407.21018, `ThinK_kivi`): KIVI (2 bits, group 32,
/// fp16 window 128 by default, as in the reference's KIVI settings) whose quantized keys drop
/// the fraction `ratio` (`λ`, default 0.4) of their channels, chosen once from the last
/// `window` (32) prefill queries. Expands to `think:ratio=λ,window=W|kivi:...`, which
/// [`plan`](crate::plan) fuses into `kivi:prune=λ,prune_window=W,...`.
pub(crate) fn think_kivi(spec: &MethodSpec) -> Result<PipelineSpec> {
    let mut think = MethodSpec::new("think").with_ratio(spec.ratio.unwrap_or(0.4));
    if spec.params.contains_key("window") {
        think = think.with("window", count(spec, "window", 32)?);
    }
    let kivi = MethodSpec::new("kivi")
        .with("bits", count(spec, "bits", 2)?)
        .with("group", count(spec, "group", 32)?)
        .with("residual", count(spec, "residual", 128)?);
    Ok(PipelineSpec::new(vec![think, kivi]))
}

/// Parameters of `mikv`.
pub(crate) const MIKV_PARAMS: &[&str] = &["high", "low_bits", "group"];

/// MiKV (Yang et al., 2024, arXiv 2402.18096): tokens an H2O-style importance (attention
/// accumulated over the prompt) ranks high stay at high precision; the rest are kept at low
/// precision instead of being evicted.
///
/// `ratio` (default 0.75) is the fraction of the prompt demoted to `low_bits` (default 2);
/// `high` is `fp16` (default) or `int8` (llama.cpp `q8_0` blocks, per token). Deviation: the
/// low tier quantizes keys per channel (KIVI) instead of per token behind MiKV's channel
/// balancer; both answer the same problem (key outlier channels), KIVI's way needs no extra
/// state. Decoded tokens join the high tier.
pub(crate) fn mikv(spec: &MethodSpec) -> Result<PipelineSpec> {
    let ratio = spec.ratio.unwrap_or(0.75);
    let high = match param(spec, "high", "fp16") {
        "fp16" => MethodSpec::new("dense_fp16"),
        "int8" => MethodSpec::new("q8_0"),
        other => return Err(spec.bad("high", &format!("`{other}` is not one of fp16, int8"))),
    };
    let group = count(spec, "group", 32)?;
    let low = MethodSpec::new("kivi")
        .with("bits", count(spec, "low_bits", 2)?)
        .with("group", group)
        .with("residual", group);
    Ok(PipelineSpec::new(vec![
        MethodSpec::new("observed_attention").with_ratio(ratio),
        high,
    ])
    .with_evicted(low))
}

/// Parameters of `leankv`.
pub(crate) const LEANKV_PARAMS: &[&str] = &["precision", "mass", "scorer", "group", "residual"];

/// LeanKV (Zhang et al., 2024, arXiv 2412.03131): per-head dynamic sparsity (each KV head keeps
/// the fewest tokens covering `mass` of its attention, default 0.9) and hetero-precision with
/// keys above values (`precision=k8v4`, the default, or `k4v2`).
///
/// Importance is the attention each token received over the prompt (`scorer=observed_attention`,
/// the default; any kv-evict scorer may be named). Deviations: precision is per tensor (every
/// kept key at the key width, every value at the value width) with KIVI's grouping (keys per
/// channel, values per token, group 32, fp16 window 128) instead of LeanKV's three-tier
/// importance-driven precision and its paged memory manager.
pub(crate) fn leankv(spec: &MethodSpec) -> Result<PipelineSpec> {
    let (kb, vb) = match param(spec, "precision", "k8v4") {
        "k8v4" => (8, 4),
        "k4v2" => (4, 2),
        other => {
            return Err(spec.bad("precision", &format!("`{other}` is not one of k8v4, k4v2")));
        }
    };
    let coverage = MethodSpec::new("coverage")
        .with("scorer", param(spec, "scorer", "observed_attention"))
        .with("mass", param(spec, "mass", "0.9"));
    let kivi = MethodSpec::new("kivi")
        .with("key_bits", kb)
        .with("value_bits", vb)
        .with("group", count(spec, "group", 32)?)
        .with("residual", count(spec, "residual", 128)?);
    Ok(PipelineSpec::new(vec![coverage, kivi]))
}
