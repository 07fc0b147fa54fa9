//! Low-rank cache benches: `cargo bench -p kv-benches --bench lowrank`.
//!
//! - `lowrank/decode/<cache>/8192`: one decode step (append one token, attend its query) on a
//!   cache holding 8192 tokens: the dense cache and every kv-lowrank cache at its default
//!   ranks (Palu, Eigen Attention, LoRC, MatryoshkaKV, CSKV; ThinK and Loki at their
//!   defaults after a prefill attend).
//! - `lowrank/calibrate/<what>`: one layer's calibration: observing 2048 tokens of keys,
//!   pre-RoPE keys, values and queries and eigendecomposing them (per-head and joint
//!   bases), and LoRC's weight spectra of a `576 × 192` projection pair.
//!
//! On the model's layer shape (1 sequence, 3 KV heads, 9 query heads, head_dim 64), with a
//! synthetic calibration of that shape written to the temp folder (no model needed).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::prelude::*;
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use kv_benches::{bench_device, model_shape, seeded_block, seeded_query, sync};
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvShape, RopeConfig, RopeConvention, StatsRequest,
};
use kv_lowrank::{
    Activation, Calibration, CovarianceAccumulator, CskvConfig, EigenConfig, LokiConfig,
    LorcConfig, MatryoshkaConfig, PaluConfig, ThinkConfig,
};

/// Cached tokens before the timed decode steps.
const TOKENS: usize = 8192;
/// Calibration tokens per observed activation.
const CALIB_TOKENS: usize = 2048;
/// The model's hidden size (input of the K/V projections).
const HIDDEN: usize = 576;

fn rope(shape: KvShape) -> RopeConfig {
    RopeConfig::new(shape.head_dim(), 100_000.0, RopeConvention::RotateHalf)
}

/// One layer's activations and weight spectra, from seeded data.
fn calibration(shape: KvShape, device: &Device) -> Calibration {
    let mut acc = CovarianceAccumulator::new(1, shape);
    observe(&mut acc, shape, device);
    weights(&mut acc, shape);
    acc.finish("bench", "seeded")
        .expect("invariant: every basis observed")
}

fn observe(acc: &mut CovarianceAccumulator, shape: KvShape, device: &Device) {
    let b = seeded_block(shape, CALIB_TOKENS, 3, device);
    acc.observe(0, Activation::Keys, b.keys()).expect("keys");
    acc.observe(0, Activation::KeysPreRope, b.keys())
        .expect("pre-RoPE keys");
    acc.observe(0, Activation::Values, b.values())
        .expect("values");
    let q = seeded_query(shape, CALIB_TOKENS, 0, device);
    acc.observe(0, Activation::Queries, q.tensor())
        .expect("queries");
}

fn weights(acc: &mut CovarianceAccumulator, shape: KvShape) {
    let rows = shape.kv_heads() * shape.head_dim();
    for (i, act) in [Activation::KeyWeights, Activation::ValueWeights]
        .into_iter()
        .enumerate()
    {
        let w = kv_testkit::seeded_data(rows * HIDDEN, 7 + i as u64, 1.0);
        acc.observe_weights(0, act, &w, HIDDEN).expect("weights");
    }
}

fn saved(device: &Device) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "kv-benches-lowrank-{}.safetensors",
        std::process::id()
    ));
    calibration(model_shape(), device)
        .save(&path)
        .expect("writing the bench calibration");
    path
}

fn caches(path: &Path, device: &Device) -> Vec<(&'static str, Box<dyn KvCache>)> {
    let s = model_shape();
    let none: [(&str, &str); 0] = [];
    let p = [("calibration", path.to_str().expect("a UTF-8 temp path"))];
    let b = |c: kv_core::Result<Box<dyn KvCache>>| c.expect("invariant: bench configs build");
    vec![
        (
            "dense",
            b(DenseCacheConfig::new(s)
                .init(device)
                .map(|c| Box::new(c) as _)),
        ),
        (
            "think",
            b(ThinkConfig::from_params(s, none)
                .and_then(|c| c.init(device))
                .map(|c| Box::new(c) as _)),
        ),
        (
            "loki",
            b(LokiConfig::from_params(s, 0, p)
                .and_then(|c| c.init(device))
                .map(|c| Box::new(c) as _)),
        ),
        (
            "eigen",
            b(EigenConfig::from_params(s, 0, p)
                .and_then(|c| c.init(device))
                .map(|c| Box::new(c) as _)),
        ),
        (
            "palu",
            b(PaluConfig::from_params(s, 0, rope(s), p)
                .and_then(|c| c.init(device))
                .map(|c| Box::new(c) as _)),
        ),
        (
            "lorc",
            b(LorcConfig::from_params(s, 0, rope(s), p)
                .and_then(|c| c.init(device))
                .map(|c| Box::new(c) as _)),
        ),
        (
            "matryoshka",
            b(MatryoshkaConfig::from_params(s, 0, p)
                .and_then(|c| c.init(device))
                .map(|c| Box::new(c) as _)),
        ),
        (
            "cskv",
            b(CskvConfig::from_params(s, 0, rope(s), p)
                .and_then(|c| c.init(device))
                .map(|c| Box::new(c) as _)),
        ),
    ]
}

/// Fills a boxed cache with the seeded prompt; ThinK and Loki see the prompt's last queries
/// before `end_prefill`, as in a real prefill.
fn filled(mut cache: Box<dyn KvCache>, device: &Device) -> Box<dyn KvCache> {
    let s = model_shape();
    cache
        .append(seeded_block(s, TOKENS, 11, device))
        .expect("prefill append");
    let q = seeded_query(s, 32, (TOKENS - 32) as u32, device);
    cache
        .attend(&q, StatsRequest::NONE)
        .expect("prefill attend");
    cache.end_prefill().expect("end_prefill");
    sync(device);
    cache
}

fn decode(c: &mut Criterion) {
    let device = bench_device();
    let shape = model_shape();
    let path = saved(&device);
    let mut group = c.benchmark_group("lowrank/decode");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (name, cache) in caches(&path, &device) {
        let mut cache = filled(cache, &device);
        let mut pos = TOKENS as u32;
        group.bench_function(BenchmarkId::new(name, TOKENS), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let k = seeded_block(shape, 1, u64::from(pos), &device);
                    let block = KvBlock::contiguous(k.keys().clone(), k.values().clone(), pos)
                        .expect("one-token block");
                    let q = seeded_query(shape, 1, pos, &device);
                    sync(&device);
                    let t = Instant::now();
                    cache.append(block).expect("decode append");
                    std::hint::black_box(
                        cache
                            .attend(&q, StatsRequest::NONE)
                            .expect("decode attend")
                            .output,
                    );
                    sync(&device);
                    total += t.elapsed();
                    pos += 1;
                }
                total
            });
        });
    }
    group.finish();
    std::fs::remove_file(&path).ok();
}

fn calibrate(c: &mut Criterion) {
    let device = bench_device();
    let shape = model_shape();
    let mut group = c.benchmark_group("lowrank/calibrate");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    group.bench_function(BenchmarkId::new("activations", CALIB_TOKENS), |b| {
        b.iter_batched(
            || CovarianceAccumulator::new(1, shape),
            |mut acc| {
                observe(&mut acc, shape, &device);
                acc.finish("bench", "seeded").expect("finish")
            },
            BatchSize::PerIteration,
        );
    });
    group.bench_function(BenchmarkId::new("weights", HIDDEN), |b| {
        b.iter_batched(
            || CovarianceAccumulator::new(1, shape),
            |mut acc| {
                weights(&mut acc, shape);
                acc.finish("bench", "weights").expect("finish")
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

criterion_group!(benches, decode, calibrate);
criterion_main!(benches);
