//! Bit packing and group quantization throughput against a plain tensor copy.
//!
//! The input is one layer's keys at 8k cached tokens on the bench shape: `3 * 8192` rows of
//! 64 codes (or fp32 values). Throughput counts the bytes of the unpacked side (4 bytes per
//! code or value), so every row of a group is comparable with the copy of the same tensor.
//!
//! Ids: `quant::packing/{copy,pack,unpack}/<bits>` and
//! `quant::packing/{quantize,dequantize}/kivi<bits>`.

use std::hint::black_box;
use std::time::Duration;

use burn::prelude::*;
use burn::tensor::{Distribution, IntDType};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use kv_benches::{HEAD_DIM, KV_HEADS, bench_device, sync, time_synced};
use kv_quant::packing::{pack, unpack};
use kv_quant::{BitWidth, GroupAxis, QuantSpec};

/// Tokens of the packed layer.
const TOKENS: usize = 8 * 1024;

fn packing(c: &mut Criterion) {
    let device = bench_device();
    let rows = KV_HEADS * TOKENS;
    let bytes = (rows * HEAD_DIM * core::mem::size_of::<u32>()) as u64;
    let mut group = c.benchmark_group(module_path!());
    group
        .throughput(Throughput::Bytes(bytes))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    let values = Tensor::<2>::random([rows, HEAD_DIM], Distribution::Normal(0.0, 1.0), &device);
    let copied = values.clone().int().cast(IntDType::U32);
    group.bench_function(BenchmarkId::new("copy", "u32"), |b| {
        // An elementwise pass that reads and writes every word: the memory-bound floor.
        b.iter_custom(|iters| time_synced(&device, iters, || copied.clone().add_scalar(0)));
    });
    group.bench_function(BenchmarkId::new("copy", "f32"), |b| {
        b.iter_custom(|iters| time_synced(&device, iters, || values.clone().add_scalar(0.0)));
    });
    for bits in [2, 4, 8] {
        let width = BitWidth::new(bits).expect("a supported width");
        let codes = Tensor::<2>::random(
            [rows, HEAD_DIM],
            Distribution::Uniform(0.0, f64::from(width.max_code()) + 1.0),
            &device,
        )
        .int()
        .clamp(0, width.max_code() as i32);
        let words = pack(codes.clone(), width).expect("non-empty codes");
        sync(&device);
        group.bench_function(BenchmarkId::new("pack", bits), |b| {
            b.iter_custom(|iters| {
                time_synced(&device, iters, || {
                    pack(black_box(codes.clone()), width).expect("non-empty codes")
                })
            });
        });
        group.bench_function(BenchmarkId::new("unpack", bits), |b| {
            b.iter_custom(|iters| {
                time_synced(&device, iters, || {
                    unpack(black_box(words.clone()), width, HEAD_DIM).expect("packed words")
                })
            });
        });

        // KIVI's key quantizer (per channel, G = 32, fp16 statistics) on the same layer.
        let spec = QuantSpec::new(width, 32, GroupAxis::Tokens).expect("a valid spec");
        let x = values.clone().reshape([1, KV_HEADS, TOKENS, HEAD_DIM]);
        let q = spec.quantize(x.clone()).expect("finite keys");
        group.bench_function(BenchmarkId::new("quantize", format!("kivi{bits}")), |b| {
            b.iter_custom(|iters| {
                time_synced(&device, iters, || {
                    spec.quantize_finite(x.clone()).expect("keys")
                })
            });
        });
        group.bench_function(BenchmarkId::new("dequantize", format!("kivi{bits}")), |b| {
            b.iter_custom(|iters| time_synced(&device, iters, || q.dequantize()));
        });
    }
    group.finish();
}

criterion_group!(benches, packing);
