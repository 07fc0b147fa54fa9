//! kv-pq benches: `cargo bench -p kv-benches --bench pq`.
//!
//! `pq/decode/<method>/<tokens>`: one decode step (append one token, attend its query) on a
//! cache holding 8k or 32k seeded tokens, for the dense cache and the kv-pq methods: Quest,
//! PQCache, Double Sparsity and TokenSelect (each attending about 512 tokens), and residual VQ
//! (every token, decoded in chunks of 1024, from codebooks trained here on seeded data). The
//! fill, the training and `end_prefill` are outside the timed region.
//!
//! On the model's layer shape (1 sequence, 3 KV heads, 9 query heads, head_dim 64).

use std::time::Duration;

use burn::prelude::*;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use kv_benches::{bench_device, model_shape, seeded_block, seeded_query, sync};
use kv_compose::{LayerContext, PipelineSpec, build_layer};
use kv_core::{KvBlock, KvCache, RopeConfig, RopeConvention, StatsRequest};

/// Cached-token counts.
const TOKENS: [usize; 2] = [8 * 1024, 32 * 1024];
/// Tokens per prefill append (bounds the encoders' temporaries).
const CHUNK: usize = 2048;

fn registry_cache(line: &str, device: &Device) -> Box<dyn KvCache> {
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

/// A one-layer residual-VQ cache (groups of 8 channels, 256 entries, 4 stages) with
/// codebooks trained on seeded keys and values.
fn rvq_cache(device: &Device) -> Box<dyn KvCache> {
    let shape = model_shape();
    let block = seeded_block(shape, 1024, 99, device);
    let mut cfg = kv_pq::RvqTrainConfig::new(8, 256, 4);
    cfg.kmeans_iters = 5;
    cfg.max_points = 4096;
    let layer = kv_pq::rvq::train_layer(block.keys(), block.values(), &cfg)
        .expect("invariant: seeded training data suffices");
    let artefact = kv_pq::RvqArtefact {
        version: kv_pq::RVQ_VERSION,
        model: "seeded".into(),
        source: "seeded".into(),
        tokens: 1024,
        num_layers: 1,
        kv_heads: shape.kv_heads(),
        head_dim: shape.head_dim(),
        sub_dim: cfg.sub_dim,
        entries: cfg.entries,
        stages: cfg.stages,
        strided_keys: cfg.strided_keys,
        layers: vec![layer],
    };
    Box::new(
        kv_pq::RvqConfig::new(shape, "", 0)
            .init_with(&artefact, device)
            .expect("invariant: the artefact matches the shape"),
    )
}

/// Appends `tokens` seeded tokens in chunks, ends prefill and syncs.
fn fill(mut cache: Box<dyn KvCache>, tokens: usize, device: &Device) -> Box<dyn KvCache> {
    let shape = model_shape();
    let all = seeded_block(shape, tokens, 11, device);
    let (k, v, _) = all.into_parts();
    let dims = [shape.batch(), shape.kv_heads()];
    for start in (0..tokens).step_by(CHUNK) {
        let end = (start + CHUNK).min(tokens);
        let r = [0..dims[0], 0..dims[1], start..end, 0..shape.head_dim()];
        let block =
            KvBlock::contiguous(k.clone().slice(r.clone()), v.clone().slice(r), start as u32)
                .expect("invariant: seeded chunks are well formed");
        cache.append(block).expect("prefill append");
    }
    cache.end_prefill().expect("end_prefill");
    sync(device);
    cache
}

fn decode(c: &mut Criterion) {
    let device = bench_device();
    let shape = model_shape();
    let mut group = c.benchmark_group("pq/decode");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let methods: [(&str, Option<&str>); 6] = [
        ("dense", Some("full")),
        ("quest", Some("quest:budget=512")),
        ("pqcache", Some("pqcache:top_k=448")),
        ("double_sparsity", Some("double_sparsity:heavy=512")),
        (
            "tokenselect",
            Some("tokenselect:top_k=384,sinks=32,recent=96"),
        ),
        ("rvq", None),
    ];
    for tokens in TOKENS {
        for (name, line) in methods {
            let cache = match line {
                Some(line) => registry_cache(line, &device),
                None => rvq_cache(&device),
            };
            let mut cache = fill(cache, tokens, &device);
            let mut pos = tokens as u32;
            group.bench_function(BenchmarkId::new(name, tokens), |b| {
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
    }
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
