//! The dense reference attention (`DenseCache::attend`), the baseline every compression
//! method is compared with: one decode step and one causal prefill chunk of
//! [`PREFILL_CHUNK`] tokens at each of [`CACHED_TOKENS`], on the real model's layer shape.
//!
//! Ids: `attention::dense/{decode,prefill}/<cached tokens>`. Throughput is query tokens.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group};
use kv_benches::{
    CACHED_TOKENS, PREFILL_CHUNK, bench_device, filled_dense_cache, model_shape, seeded_query,
    time_attend,
};

/// Query tokens of one decode step.
const DECODE_TOKENS: usize = 1;

fn attention(c: &mut Criterion) {
    let device = bench_device();
    let shape = model_shape();
    for &cached in &CACHED_TOKENS {
        let mut cache = filled_dense_cache(shape, cached, &device);
        let start = u32::try_from(cached).expect("cached token count fits a position");

        // A decode step is fast: the default linear sampling and sample count apply.
        let mut group = c.benchmark_group(module_path!());
        group.throughput(Throughput::Elements((shape.batch() * DECODE_TOKENS) as u64));
        let query = seeded_query(shape, DECODE_TOKENS, start, &device);
        group.bench_with_input(BenchmarkId::new("decode", cached), &query, |b, q| {
            b.iter_custom(|iters| time_attend(&mut cache, q, iters));
        });
        group.finish();

        // A prefill chunk at 32k takes on the order of a second on 2 CPU cores: flat
        // sampling with 10 samples keeps the run to about 10-20 iterations.
        let mut group = c.benchmark_group(module_path!());
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Elements((shape.batch() * PREFILL_CHUNK) as u64));
        let query = seeded_query(shape, PREFILL_CHUNK, start, &device);
        group.bench_with_input(BenchmarkId::new("prefill", cached), &query, |b, q| {
            b.iter_custom(|iters| time_attend(&mut cache, q, iters));
        });
        group.finish();
    }
}

criterion_group!(benches, attention);
