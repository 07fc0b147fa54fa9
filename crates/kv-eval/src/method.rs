//! Methods and pipelines by name. The per-layer registry, the specs and the pipeline builder
//! live in `kv-compose` (which depends on every per-layer technique crate); this module adds
//! the whole-model (cross-layer) methods of `kv-share`, which build the layer container
//! itself, and keeps the harness's one entry point, [`build_caches`].

use burn::prelude::*;
use kv_core::{DenseCacheConfig, KvCache, KvError, KvShape, LayerCaches, RopeConfig};

pub use kv_compose::{
    Builder, LayerContext, MethodEntry, MethodSpec, PipelineSpec, build_layers, lookup, plan,
    registry,
};

use crate::{EvalError, Result};

/// Cross-layer methods (kv-share), written as the first stage of a pipeline:
/// `minicache[:start=L,t=0.6,gamma=0.05,dtype=f32]` (alone), `layer_map:map=0_0_2_2` or
/// `cla=G` or `mlkv=K`, and `kvsharer:artifact=PATH`; the last two may be followed by per-layer
/// stages, which then build every layer that owns storage (`layer_map:cla=2|kivi:bits=4`).
pub const WHOLE_MODEL: [(&str, &str); 3] = [
    (
        "minicache",
        "MiniCache: from the middle layer on, adjacent layers' KV merged by SLERP with \
         per-layer magnitudes; tokens whose directions disagree kept apart (start, t, gamma)",
    ),
    (
        "layer_map",
        "cross-layer sharing map (CLA, MLKV, LCKV-style, custom): map=0_0_2_2, cla=G or \
         mlkv=K; reading layers attend over their owner's cache (needs a checkpoint trained \
         with the map)",
    ),
    (
        "kvsharer",
        "KVSharer: the layer map found by a calibration search on Emma (artifact=PATH, from \
         kv-share's `kvsharer_calibrate` example)",
    ),
];

fn whole_model(spec: &PipelineSpec) -> Option<&MethodSpec> {
    spec.stages
        .first()
        .filter(|s| WHOLE_MODEL.iter().any(|(n, _)| *n == s.name))
}

/// The pipeline after a whole-model first stage, if any stage follows.
fn rest(spec: &PipelineSpec) -> Option<PipelineSpec> {
    (spec.stages.len() > 1).then(|| PipelineSpec {
        version: spec.version,
        stages: spec.stages[1..].to_vec(),
        evicted: spec.evicted.clone(),
    })
}

/// Checks a pipeline as [`plan`] does, also accepting a whole-model first stage.
///
/// # Errors
/// As [`plan`]; a whole-model stage with a ratio, or `minicache` followed by other stages.
pub fn check(spec: &PipelineSpec) -> Result<()> {
    let Some(first) = whole_model(spec) else {
        plan(spec)?;
        return Ok(());
    };
    let bad = |reason: &str| EvalError::BadParam {
        method: first.name.clone(),
        param: "stages".into(),
        reason: reason.into(),
    };
    if first.ratio.is_some() {
        return Err(bad("a cross-layer method takes no ratio"));
    }
    match rest(spec) {
        Some(_) if first.name == "minicache" => Err(bad(
            "MiniCache owns every layer's storage; it cannot be followed by other stages",
        )),
        Some(r) => {
            plan(&r)?;
            Ok(())
        }
        None if spec.evicted.is_some() => Err(bad("an evicted tier needs a selection stage")),
        None => Ok(()),
    }
}

/// Builds the per-layer caches of a pipeline for a model with `num_layers` layers.
///
/// # Errors
/// Unknown methods, bad parameters, stages that cannot be stacked
/// ([`kv_compose::ComposeError`]), bad layer maps or artefacts.
pub fn build_caches(
    pipeline: &PipelineSpec,
    num_layers: usize,
    shape: KvShape,
    rope: &RopeConfig,
    device: &Device,
) -> Result<LayerCaches> {
    let Some(first) = whole_model(pipeline) else {
        return Ok(build_layers(pipeline, num_layers, shape, rope, device)?);
    };
    check(pipeline)?;
    let params = || first.params.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let bad = |param: &str, reason: String| EvalError::BadParam {
        method: first.name.clone(),
        param: param.into(),
        reason,
    };
    let rest = rest(pipeline);
    let owner = |layer: usize| -> kv_core::Result<Box<dyn KvCache>> {
        match &rest {
            None => Ok(Box::new(DenseCacheConfig::new(shape).init(device)?)),
            Some(r) => {
                let cx = LayerContext {
                    layer,
                    num_layers,
                    shape,
                    device: device.clone(),
                    rope: rope.clone(),
                };
                kv_compose::build_layer(r, &cx).map_err(|e| KvError::InvalidConfig {
                    field: "stages",
                    reason: e.to_string(),
                })
            }
        }
    };
    match first.name.as_str() {
        "minicache" => Ok(
            kv_share::MiniCacheConfig::from_params(shape, num_layers, params())?.init(device)?,
        ),
        "layer_map" => {
            let get = |k: &str| first.params.get(k);
            if let Some(k) = first
                .params
                .keys()
                .find(|k| !["map", "cla", "mlkv"].contains(&k.as_str()))
            {
                return Err(bad(k, "unknown parameter; accepted: map, cla, mlkv".into()));
            }
            let count = |k: &str, v: &String| {
                v.parse::<usize>()
                    .map_err(|_| bad(k, format!("`{v}` is not a count")))
            };
            let map = match (get("map"), get("cla"), get("mlkv")) {
                (Some(m), None, None) => kv_share::LayerMap::parse(m)?,
                (None, Some(g), None) => kv_share::LayerMap::cla(num_layers, count("cla", g)?)?,
                (None, None, Some(k)) => kv_share::LayerMap::mlkv(num_layers, count("mlkv", k)?)?,
                _ => {
                    return Err(bad(
                        "map",
                        "give exactly one of map=0_0_2_2, cla=G, mlkv=K".into(),
                    ));
                }
            };
            Ok(map.build_caches(owner)?)
        }
        "kvsharer" => {
            let path = first
                .params
                .get("artifact")
                .ok_or_else(|| bad("artifact", "the KVSharer artefact path is required".into()))?;
            if let Some(k) = first.params.keys().find(|k| k.as_str() != "artifact") {
                return Err(bad(k, "unknown parameter; accepted: artifact".into()));
            }
            let model = kv_share::kvsharer::ModelShape::new(num_layers, shape);
            let art = kv_share::KvSharerArtifact::load(std::path::Path::new(path), &model)
                .map_err(|e| bad("artifact", e.to_string()))?;
            Ok(art.map.build_caches(owner)?)
        }
        _ => unreachable!("whole_model() only returns WHOLE_MODEL names"),
    }
}
