//! Integration tests of kv-lowrank: calibration artefacts, ThinK, Loki, Eigen Attention,
//! Palu, LoRC, MatryoshkaKV and CSKV, all on small synthetic shapes with synthetic
//! calibration (no model, no network).

mod calibration;
mod cskv;
mod eigen;
mod loki;
mod lorc;
mod matryoshka;
mod palu;
mod palu_ranks;
mod props;
mod think;

use burn::prelude::*;
use kv_core::KvShape;
use kv_lowrank::{Activation, Calibration, CovarianceAccumulator};
use kv_testkit::{seeded_data, tensor_from, test_device};

/// Batch 2, 2 KV heads, 4 query heads (GQA group 2), head_dim 8.
pub(crate) fn shape() -> KvShape {
    KvShape::new(2, 2, 4, 8).expect("valid")
}

pub(crate) const LAYERS: usize = 2;

/// Activations `[b, heads, n, d]` whose channel `c` has scale `1 + c` (distinct eigenvalues).
pub(crate) fn scaled(dims: [usize; 4], seed: u64, device: &Device) -> Tensor<4> {
    let d = dims[3];
    let mut data = seeded_data(dims.iter().product(), seed, 1.0);
    for (i, x) in data.iter_mut().enumerate() {
        *x *= 1.0 + (i % d) as f32;
    }
    tensor_from(data, dims, device)
}

/// A synthetic calibration of every activation for [`shape`] and [`LAYERS`] layers.
pub(crate) fn synthetic_calibration(shape: KvShape) -> Calibration {
    let device = test_device();
    let (h, qh, d) = (shape.kv_heads(), shape.q_heads(), shape.head_dim());
    let mut acc = CovarianceAccumulator::new(LAYERS, shape);
    for layer in 0..LAYERS {
        let seed = 100 * layer as u64;
        let kv = [1, h, 64, d];
        acc.observe(layer, Activation::Keys, &scaled(kv, seed + 1, &device))
            .expect("keys");
        acc.observe(
            layer,
            Activation::KeysPreRope,
            &scaled(kv, seed + 2, &device),
        )
        .expect("pre-rope keys");
        acc.observe(layer, Activation::Values, &scaled(kv, seed + 3, &device))
            .expect("values");
        acc.observe(
            layer,
            Activation::Queries,
            &scaled([1, qh, 64, d], seed + 4, &device),
        )
        .expect("queries");
    }
    acc.add_tokens(64);
    acc.finish("synthetic", "seeded").expect("finish")
}

/// Synthetic LoRC weight spectra for [`LAYERS`] layers of `shape`: seeded projections
/// `[kv_heads · head_dim, in_dim]` whose rows in layer `l` are scaled by `1 + l · row`, so
/// condition numbers grow with depth.
pub(crate) fn synthetic_weights(shape: KvShape, in_dim: usize) -> Calibration {
    let rows = shape.kv_heads() * shape.head_dim();
    let mut acc = CovarianceAccumulator::new(LAYERS, shape);
    for layer in 0..LAYERS {
        for (i, act) in [Activation::KeyWeights, Activation::ValueWeights]
            .into_iter()
            .enumerate()
        {
            let mut w = seeded_data(rows * in_dim, 500 + 10 * layer as u64 + i as u64, 1.0);
            for (j, x) in w.iter_mut().enumerate() {
                *x *= 1.0 + (layer * ((j / in_dim) % shape.head_dim())) as f32;
            }
            acc.observe_weights(layer, act, &w, in_dim)
                .expect("weights");
        }
    }
    acc.finish("synthetic", "weights").expect("finish")
}

/// A fresh path in the temp folder for an artefact.
pub(crate) fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "kv-lowrank-{name}-{}.safetensors",
        std::process::id()
    ))
}

/// Saves the synthetic calibration of [`shape`] under `name` and returns its path.
pub(crate) fn saved_calibration(name: &str) -> std::path::PathBuf {
    let path = temp_path(name);
    synthetic_calibration(shape()).save(&path).expect("save");
    path
}

/// Asserts an `InvalidConfig` error whose message contains `needle`.
#[track_caller]
pub(crate) fn assert_invalid<T: core::fmt::Debug>(r: kv_core::Result<T>, needle: &str) {
    match r {
        Err(kv_core::KvError::InvalidConfig { field, reason }) => assert!(
            reason.contains(needle) || field.contains(needle),
            "error `{field}: {reason}` does not mention `{needle}`"
        ),
        other => panic!("expected InvalidConfig mentioning `{needle}`, got {other:?}"),
    }
}
