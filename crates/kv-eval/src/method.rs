//! Methods and pipelines by name. The registry, the specs and the pipeline builder live in
//! `kv-compose` (which depends on every technique crate); this module re-exports them for the
//! harness and keeps its one entry point, [`build_caches`].

use burn::prelude::*;
use kv_core::{KvShape, LayerCaches, RopeConfig};

pub use kv_compose::{
    Builder, LayerContext, MethodEntry, MethodSpec, PipelineSpec, build_layers, lookup, plan,
    registry,
};

use crate::Result;

/// Builds the per-layer caches of a pipeline for a model with `num_layers` layers.
///
/// # Errors
/// Unknown methods, bad parameters, stages that cannot be stacked
/// ([`kv_compose::ComposeError`]).
pub fn build_caches(
    pipeline: &PipelineSpec,
    num_layers: usize,
    shape: KvShape,
    rope: &RopeConfig,
    device: &Device,
) -> Result<LayerCaches> {
    Ok(build_layers(pipeline, num_layers, shape, rope, device)?)
}
