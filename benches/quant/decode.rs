//! One decode step (`KvCache::attend` of one query token, no statistics) over a quantized
//! cache against the dense fp32 cache, on the real model's layer shape.
//!
//! Every cache is filled with the same seeded prefill of `<cached tokens>` tokens and
//! `end_prefill` is called (so nothing is pending); the query sits at the next position.
//!
//! Ids: `quant::decode/<cache>/<cached tokens>`.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use kv_benches::{
    bench_device, fill_cache, filled_dense_cache, model_shape, seeded_query, time_attend,
};
use kv_core::KvCache;
use kv_quant::{BlockFormat, BlockQuantConfig, GearConfig, KiviConfig, QjlConfig};

/// Cached tokens of the decode benches.
const CACHED: [usize; 3] = [4 * 1024, 8 * 1024, 32 * 1024];

/// The caches compared, by bench name.
const CACHES: [&str; 7] = ["dense", "kivi2", "kivi4", "qjl", "gear", "q4_0", "q8_0"];

fn filled(name: &str, tokens: usize) -> Box<dyn KvCache> {
    let device = bench_device();
    let shape = model_shape();
    let kivi = |bits| KiviConfig::new(shape).with_bits(bits).init(&device);
    let block = |f| BlockQuantConfig::new(shape, f).init(&device);
    match name {
        "dense" => Box::new(filled_dense_cache(shape, tokens, &device)),
        "kivi2" => Box::new(fill_cache(kivi(2).expect("KIVI-2 config"), tokens)),
        "kivi4" => Box::new(fill_cache(kivi(4).expect("KIVI-4 config"), tokens)),
        "qjl" => Box::new(fill_cache(
            QjlConfig::new(shape).init(&device).expect("QJL config"),
            tokens,
        )),
        "gear" => Box::new(fill_cache(
            GearConfig::new(shape).init(&device).expect("GEAR config"),
            tokens,
        )),
        "q4_0" => Box::new(fill_cache(block(BlockFormat::Q4_0).expect("q4_0"), tokens)),
        "q8_0" => Box::new(fill_cache(block(BlockFormat::Q8_0).expect("q8_0"), tokens)),
        other => unreachable!("unknown bench cache {other}"),
    }
}

fn decode(c: &mut Criterion) {
    let device = bench_device();
    let shape = model_shape();
    for &cached in &CACHED {
        let mut group = c.benchmark_group(module_path!());
        group
            .throughput(Throughput::Elements(shape.batch() as u64))
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        let start = u32::try_from(cached).expect("cached token count fits a position");
        let query = seeded_query(shape, 1, start, &device);
        for name in CACHES {
            let mut cache = filled(name, cached);
            group.bench_with_input(BenchmarkId::new(name, cached), &query, |b, q| {
                b.iter_custom(|iters| time_attend(cache.as_mut(), q, iters));
            });
        }
        group.finish();
    }
}

criterion_group!(benches, decode);
