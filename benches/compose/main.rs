//! Pipeline benches: `cargo bench -p kv-benches --bench compose`.
//!
//! What a pipeline costs per decode step over its slowest stage alone. A pipeline stores each
//! (sequence, KV head) stream in a codec of its own after the selection, so a decode step is
//! one attention call per stream instead of one per layer; this bench measures that overhead
//! with a selection that evicts nothing (`knorm:ratio=0`), so that both hold the same tokens
//! in the same format, and, for scale, the evicting pipeline that meets the ≥ 10× target
//! (`snapkv:ratio=0.75|kivi:bits=4`, holding a quarter of the tokens) and the dense cache.
//!
//! Ids: `compose/decode/<cache>/<cached tokens>`; `<cached tokens>` is what was prefilled.

use std::time::Duration;

use burn::prelude::*;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kv_benches::{bench_device, model_shape, seeded_block, seeded_query, sync, time_synced};
use kv_compose::{LayerContext, PipelineSpec, build_layer};
use kv_core::{KvCache, RopeConfig, RopeConvention, StatsRequest};

/// Prefilled tokens per bench.
const CACHED: [usize; 2] = [4 * 1024, 8 * 1024];

/// The caches compared: the slowest stage alone, the same stage behind a no-op selection, the
/// ≥ 10× pipeline, and the dense fp32 cache.
const CACHES: [(&str, &str); 4] = [
    ("kivi4", "kivi:bits=4"),
    ("keep_all_then_kivi4", "knorm:ratio=0|kivi:bits=4"),
    ("snapkv0.75_then_kivi4", "snapkv:ratio=0.75|kivi:bits=4"),
    ("dense", "full"),
];

fn filled(line: &str, tokens: usize, device: &Device) -> Box<dyn KvCache> {
    let shape = model_shape();
    let cx = LayerContext {
        layer: 0,
        num_layers: 1,
        shape,
        device: device.clone(),
        rope: RopeConfig::new(shape.head_dim(), 10_000.0, RopeConvention::RotateHalf),
    };
    let spec = PipelineSpec::parse_line(line).expect("invariant: the bench pipelines parse");
    let mut cache = build_layer(&spec, &cx).expect("invariant: the bench pipelines build");
    cache
        .append(seeded_block(shape, tokens, 7, device))
        .expect("prefill append");
    // The selections score from the last prompt queries (SnapKV's window of 64).
    let window = 64;
    let q = seeded_query(shape, window, (tokens - window) as u32, device);
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
    for &cached in &CACHED {
        let mut group = c.benchmark_group("compose/decode");
        group
            .throughput(Throughput::Elements(shape.batch() as u64))
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        for (name, line) in CACHES {
            let mut cache = filled(line, cached, &device);
            let q = seeded_query(shape, 1, cached as u32, &device);
            group.bench_with_input(BenchmarkId::new(name, cached), &q, |b, q| {
                b.iter_custom(|iters| {
                    time_synced(&device, iters, || {
                        cache
                            .attend(q, StatsRequest::NONE)
                            .expect("attend on a filled cache")
                            .output
                    })
                });
            });
        }
        group.finish();
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
