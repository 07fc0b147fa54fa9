//! From a [`PipelineSpec`] to caches: role checks (which stage may follow which) and the
//! per-layer build.

use burn::prelude::*;
use kv_core::{KvCache, KvError, KvShape, LayerCaches, RopeConfig};

use crate::pipeline::PipelineCacheConfig;
use crate::registry::{Builder, CacheFn, LayerContext, MethodEntry, SelectFn, lookup_at};
use crate::spec::{MethodSpec, PipelineSpec, relocate};
use crate::{ComposeError, Result};

/// A checked pipeline: what each stage does.
#[derive(Debug, Clone)]
pub enum Plan {
    /// One method alone (any role).
    Alone {
        /// The stage.
        spec: MethodSpec,
        /// Its registry entry.
        entry: MethodEntry,
    },
    /// A selection whose kept tokens go to a codec, and evicted ones to another or nowhere.
    Stack {
        /// The selection stage.
        selection: (MethodSpec, SelectFn),
        /// The codec of the kept tokens.
        kept: (MethodSpec, CacheFn),
        /// The codec of the evicted tokens.
        evicted: Option<(MethodSpec, CacheFn)>,
    },
}

/// Codecs whose storage layout is decided by the queries attended during prefill (ThinK's
/// channel scores, Double Sparsity's label channels).
const NEEDS_PREFILL_QUERIES: &[&str] = &["think", "double_sparsity"];

fn name_at(i: usize, spec: &MethodSpec) -> String {
    format!("stages[{i}] `{}`", spec.name)
}

/// Checks a pipeline: every method known with valid parameter names, presets expanded, and
/// the stages in an order that can work.
///
/// # Errors
/// [`ComposeError::UnknownMethod`], [`ComposeError::BadParam`] (located at the stage), or
/// [`ComposeError::Conflict`] naming the two stages and why they cannot be stacked: a codec
/// before a selection (the selection needs unquantized keys), two codecs or two selections,
/// a decode-time policy or a preset with other stages, an evicted tier without a selection or
/// that is not a codec.
pub fn plan(spec: &PipelineSpec) -> Result<Plan> {
    if let Some(fused) = fuse_think_kivi(spec)? {
        return plan(&fused);
    }
    let entries: Vec<MethodEntry> = spec
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| lookup_at(s, &format!("stages[{i}]")))
        .collect::<Result<_>>()?;
    let evicted = match &spec.evicted {
        Some(s) => Some((s.clone(), lookup_at(s, "evicted")?)),
        None => None,
    };
    // Presets and policies stand alone.
    for (i, (s, e)) in spec.stages.iter().zip(&entries).enumerate() {
        if let Builder::Preset(expand) = e.builder {
            if spec.stages.len() > 1 || evicted.is_some() {
                return Err(ComposeError::Conflict {
                    stages: name_at(i, s),
                    reason: "a preset pipeline stands alone; write its stages out to add others"
                        .into(),
                });
            }
            let inner = expand(s).map_err(|e| relocate(e, &format!("stages[{i}]")))?;
            return plan(&inner);
        }
        if matches!(e.builder, Builder::Policy(_)) && (spec.stages.len() > 1 || evicted.is_some()) {
            return Err(ComposeError::Conflict {
                stages: name_at(i, s),
                reason: "a decode-time policy evicts from storage it owns while decoding; it \
                         cannot be stacked with other stages (a codec cannot drop single tokens \
                         from its groups)"
                    .into(),
            });
        }
    }
    // Pairwise order rules.
    for i in 0..entries.len() {
        for j in i + 1..entries.len() {
            let (a, b) = (&spec.stages[i], &spec.stages[j]);
            let pair = format!("{} and {}", name_at(i, a), name_at(j, b));
            let reason = match (&entries[i].builder, &entries[j].builder) {
                (Builder::Codec(_), Builder::Selection(_)) => format!(
                    "`{}` scores tokens from unquantized keys and prefill attention, but `{}` \
                     stores them in its own format before it; put the selection first",
                    b.name, a.name
                ),
                (Builder::Codec(_), Builder::Codec(_)) => "both are codecs of the same keys and \
                    values; a pipeline has one (different key and value formats: kivi's \
                    key_bits/value_bits, the block formats' v=FORMAT)"
                    .into(),
                (Builder::Selection(_), Builder::Selection(_)) => "both select the prompt's \
                    tokens at the end of prefill; a pipeline has one selection (head-wise budgets \
                    over another scorer: adakv:scorer=NAME)"
                    .into(),
                _ => continue,
            };
            return Err(ComposeError::Conflict {
                stages: pair,
                reason,
            });
        }
    }
    let evicted = match evicted {
        Some((s, e)) => match e.builder {
            Builder::Codec(f) => Some((s, f)),
            other => {
                return Err(ComposeError::Conflict {
                    stages: format!("evicted `{}`", s.name),
                    reason: format!(
                        "the evicted tier stores tokens, so it must be a codec, not a {}",
                        other.role()
                    ),
                });
            }
        },
        None => None,
    };
    let full = || -> Result<(MethodSpec, CacheFn)> {
        let s = MethodSpec::full();
        match lookup_at(&s, "stages")?.builder {
            Builder::Codec(f) => Ok((s, f)),
            _ => unreachable!("`full` is a codec"),
        }
    };
    // Codecs that choose their layout from the prompt's queries see none after a hand-over.
    let after_selection = spec.stages.len() == 2 || evicted.is_some();
    for (at, s) in spec
        .stages
        .iter()
        .enumerate()
        .skip(1)
        .map(|(i, s)| (format!("stages[{i}]"), s))
        .chain(spec.evicted.iter().map(|s| ("evicted".to_owned(), s)))
    {
        let prunes = s.name == "kivi"
            && s.params
                .get("prune")
                .is_some_and(|v| v.parse::<f64>().map_or(true, |r| r > 0.0));
        if after_selection && (prunes || NEEDS_PREFILL_QUERIES.contains(&s.name.as_str())) {
            return Err(ComposeError::Conflict {
                stages: format!("stages[0] `{}` and {at} `{}`", spec.stages[0].name, s.name),
                reason: format!(
                    "`{}` chooses what to store from the prompt's queries, which it never sees \
                     when it receives a selection's survivors at the end of prefill; use it alone",
                    s.name
                ),
            });
        }
    }
    match (spec.stages.as_slice(), entries.as_slice()) {
        ([s], [e]) => match (e.builder, evicted) {
            (Builder::Selection(f), Some(ev)) => Ok(Plan::Stack {
                selection: (s.clone(), f),
                kept: full()?,
                evicted: Some(ev),
            }),
            (_, Some((ev, _))) => Err(ComposeError::Conflict {
                stages: format!("{} and evicted `{}`", name_at(0, s), ev.name),
                reason: "an evicted tier needs a selection stage that evicts tokens".into(),
            }),
            (_, None) => Ok(Plan::Alone {
                spec: s.clone(),
                entry: e.clone(),
            }),
        },
        ([s0, s1], [e0, e1]) => match (e0.builder, e1.builder) {
            (Builder::Selection(sel), Builder::Codec(codec)) => Ok(Plan::Stack {
                selection: (s0.clone(), sel),
                kept: (s1.clone(), codec),
                evicted,
            }),
            _ => unreachable!("every other pair of roles was rejected above"),
        },
        _ => unreachable!("three stages always contain a conflicting pair"),
    }
}

/// ThinK + KIVI written as two stages, `think[:ratio=λ,window=W]|kivi[:...]`, is one KIVI
/// cache whose quantized keys drop ThinK's channels (`kivi:prune=λ,prune_window=W`, see
/// `kv_quant::KiviConfig::prune_ratio`), as the ThinK reference's `ThinK_kivi` does: the two
/// are not separate storage stages (ThinK decides which channels KIVI quantizes).
fn fuse_think_kivi(spec: &PipelineSpec) -> Result<Option<PipelineSpec>> {
    let [think, kivi] = spec.stages.as_slice() else {
        return Ok(None);
    };
    if think.name != "think" || kivi.name != "kivi" {
        return Ok(None);
    }
    let pair = || "stages[0] `think` and stages[1] `kivi`".to_owned();
    if let Some(ev) = &spec.evicted {
        return Err(ComposeError::Conflict {
            stages: format!("{} and evicted `{}`", pair(), ev.name),
            reason: "ThinK + KIVI evicts no token; an evicted tier needs a selection".into(),
        });
    }
    if kivi.params.contains_key("prune") || kivi.params.contains_key("prune_window") {
        return Err(ComposeError::Conflict {
            stages: pair(),
            reason: "`think` already sets KIVI's key pruning (prune, prune_window); give λ as                      think's ratio and the query window as think's window"
                .into(),
        });
    }
    let mut fused = kivi.clone();
    let mut ratio = think.ratio;
    for (k, v) in &think.params {
        match k.as_str() {
            "ratio" => {
                ratio = Some(
                    v.parse()
                        .map_err(|_| think.bad("ratio", &format!("`{v}` is not a number")))?,
                );
            }
            "window" => {
                fused.params.insert("prune_window".into(), v.clone());
            }
            other => {
                return Err(ComposeError::Conflict {
                    stages: pair(),
                    reason: format!(
                        "think's `{other}` does not apply in ThinK + KIVI: recent tokens keep all                          channels in KIVI's full-precision window (kivi's residual), and the                          storage is KIVI's"
                    ),
                });
            }
        }
    }
    fused
        .params
        .insert("prune".into(), ratio.unwrap_or(0.4).to_string());
    Ok(Some(PipelineSpec::single(fused)))
}

/// Maps a build error of a codec factory into the cache error a factory returns.
fn to_kv(e: ComposeError) -> KvError {
    match e {
        ComposeError::Cache(e) => e,
        other => KvError::InvalidConfig {
            field: "codec",
            reason: other.to_string(),
        },
    }
}

/// A codec factory for [`PipelineCacheConfig`] from a registry builder.
fn factory(
    spec: MethodSpec,
    f: CacheFn,
    cx: &LayerContext,
) -> impl Fn(KvShape, &Device) -> kv_core::Result<Box<dyn KvCache>> + Send + Sync + 'static {
    let cx = cx.clone();
    move |shape, device| {
        let mut c = cx.clone();
        c.shape = shape;
        c.device = device.clone();
        f(&spec, &c).map_err(to_kv)
    }
}

/// Builds one layer's cache for a pipeline.
///
/// # Errors
/// As [`plan`], and bad parameter values (located at their stage).
pub fn build_layer(spec: &PipelineSpec, cx: &LayerContext) -> Result<Box<dyn KvCache>> {
    match plan(spec)? {
        Plan::Alone { spec: s, entry } => entry
            .build_alone(&s, cx)
            .map_err(|e| relocate(e, "stages[0]")),
        Plan::Stack {
            selection: (sel_spec, sel),
            kept: (kept_spec, kept),
            evicted,
        } => {
            let selection = sel(&sel_spec, cx).map_err(|e| relocate(e, "stages[0]"))?;
            if selection.decode.is_some() {
                return Err(ComposeError::Conflict {
                    stages: format!(
                        "stages[0] `{}` and stages[1] `{}`",
                        sel_spec.name, kept_spec.name
                    ),
                    reason: "decode-time compression (decode_every) re-scores the selection's \
                             own storage, which the codec takes over at the end of prefill; use \
                             it without a codec"
                        .into(),
                });
            }
            // Build each codec once for a stream shape so that parameter errors carry their
            // stage's location.
            let mut stream = cx.clone();
            stream.shape = KvShape::new(1, 1, cx.shape.group(), cx.shape.head_dim())?;
            let probe = kept(&kept_spec, &stream).map_err(|e| relocate(e, "stages[1]"))?;
            if probe.key_rope() != kv_core::KeyRope::PostRope {
                return Err(ComposeError::Conflict {
                    stages: format!(
                        "stages[0] `{}` and stages[1] `{}`",
                        sel_spec.name, kept_spec.name
                    ),
                    reason: format!(
                        "`{}` stores keys before RoPE, but the selection holds post-RoPE keys and \
                         cannot hand them over",
                        kept_spec.name
                    ),
                });
            }
            let mut cfg = PipelineCacheConfig::new(selection, factory(kept_spec, kept, cx))
                .with_label(spec.to_line());
            if let Some((ev_spec, ev)) = evicted {
                ev(&ev_spec, &stream).map_err(|e| relocate(e, "evicted"))?;
                cfg = cfg.with_evicted(factory(ev_spec, ev, cx));
            }
            Ok(Box::new(cfg.init(&cx.device)?))
        }
    }
}

/// Builds the per-layer caches of a pipeline for a model with `num_layers` layers.
///
/// # Errors
/// As [`build_layer`].
pub fn build_layers(
    spec: &PipelineSpec,
    num_layers: usize,
    shape: KvShape,
    rope: &RopeConfig,
    device: &Device,
) -> Result<LayerCaches> {
    let mut layers: Vec<Box<dyn KvCache>> = Vec::with_capacity(num_layers);
    for layer in 0..num_layers {
        let cx = LayerContext {
            layer,
            num_layers,
            shape,
            device: device.clone(),
            rope: rope.clone(),
        };
        layers.push(build_layer(spec, &cx)?);
    }
    Ok(LayerCaches::new(layers))
}
