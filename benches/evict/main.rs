//! Eviction benches: `cargo bench -p kv-benches --bench evict`.
//!
//! - `evict/compress/<scorer>/4096`: one prefill compression (`end_prefill`: score every
//!   prompt token, allocate budgets, top-k, gather the kept rows into new buffers) of a
//!   4096-token prompt at ratio 0.5, after the prompt's last 64 queries were attended (what
//!   SnapKV's window needs). The fill is outside the timed region.
//! - `evict/decode/<cache>/4096`: one decode step (append one token, attend its query) on a
//!   cache holding 4096 tokens: the dense cache (which grows), and the decode-time policies
//!   held at that budget, which evict one token per step.
//!
//! On the model's layer shape (1 sequence, 3 KV heads, 9 query heads, head_dim 64).

use std::time::Duration;

use burn::prelude::*;
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use kv_benches::{bench_device, model_shape, seeded_block, seeded_query, sync};
use kv_compose::{LayerContext, PipelineSpec, build_layer};
use kv_core::{KvBlock, KvCache, RopeConfig, RopeConvention, StatsRequest};

/// Prompt tokens.
const TOKENS: usize = 4096;
/// Queries attended at the end of the prompt (SnapKV's window).
const WINDOW: usize = 64;

fn cache(line: &str, device: &Device) -> Box<dyn KvCache> {
    let shape = model_shape();
    let cx = LayerContext {
        layer: 0,
        num_layers: 1,
        shape,
        device: device.clone(),
        rope: RopeConfig::new(shape.head_dim(), 10_000.0, RopeConvention::RotateHalf),
    };
    let spec = PipelineSpec::parse_line(line).expect("invariant: the bench specs parse");
    build_layer(&spec, &cx).expect("invariant: the bench specs build")
}

/// A cache holding the seeded prompt, its last queries attended.
fn prefilled(line: &str, device: &Device) -> Box<dyn KvCache> {
    let shape = model_shape();
    let mut c = cache(line, device);
    c.append(seeded_block(shape, TOKENS, 11, device))
        .expect("prefill append");
    let q = seeded_query(shape, WINDOW, (TOKENS - WINDOW) as u32, device);
    c.attend(&q, StatsRequest::COLUMN_SUMS)
        .expect("prefill attend");
    sync(device);
    c
}

fn compress(c: &mut Criterion) {
    let device = bench_device();
    let mut group = c.benchmark_group("evict/compress");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for scorer in ["knorm", "snapkv", "tova", "keydiff", "adakv_snapkv"] {
        let line = format!("{scorer}:ratio=0.5");
        group.bench_function(BenchmarkId::new(scorer, TOKENS), |b| {
            b.iter_batched(
                || prefilled(&line, &device),
                |mut cache| {
                    cache.end_prefill().expect("compression");
                    sync(&device);
                    cache
                },
                BatchSize::PerIteration,
            );
        });
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let device = bench_device();
    let shape = model_shape();
    let mut group = c.benchmark_group("evict/decode");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let budget = TOKENS.to_string();
    let half = (TOKENS / 2).to_string();
    for (name, line) in [
        ("dense", "full".to_owned()),
        (
            "streaming_llm_decode",
            format!("streaming_llm_decode:n_sink=4,recent={}", TOKENS - 4),
        ),
        ("h2o", format!("h2o:heavy={half},recent={half}")),
        ("scissorhands", format!("scissorhands:budget={budget}")),
    ] {
        let mut cache = prefilled(&line, &device);
        cache.end_prefill().expect("end_prefill");
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
                    let t = std::time::Instant::now();
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
}

criterion_group!(benches, compress, decode);
criterion_main!(benches);
