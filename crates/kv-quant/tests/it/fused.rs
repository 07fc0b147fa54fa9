//! The fast attention paths against the plain dequantize-then-attend oracle.
//!
//! On CPU backends a decode-sized query (at most 64 query rows per KV head) is answered by the
//! fused host kernels, which score and sum the packed codes without dequantizing them; larger
//! queries stream dequantized chunks through tensor ops. Both must equal the reference
//! attention over `view()` (the dequantized cache) up to fp32 summation order, and
//! `attend_lse` must equal `reference_attention_lse` over `view()`.

use burn::prelude::*;
use kv_core::{KvBlock, KvCache, KvShape, PAD, Query, StatsRequest, StorageDtype};
use kv_quant::{BlockFormat, BlockQuantConfig, Fp8Scale, GearConfig, KiviConfig, QjlConfig};
use kv_testkit::{assert_close, seeded_tensor, test_device};

const ATOL: f32 = 1e-5;
const RTOL: f32 = 1e-4;

/// Two sequences, 2 KV heads, GQA group 3, head_dim 32.
fn shape() -> KvShape {
    KvShape::new(2, 2, 6, 32).expect("valid")
}

fn block(s: KvShape, n: usize, start: u32, seed: u64, d: &Device) -> KvBlock {
    let dims = [s.batch(), s.kv_heads(), n, s.head_dim()];
    let k = seeded_tensor(dims, seed, 1.5, d);
    let v = seeded_tensor(dims, seed + 1, 1.0, d);
    KvBlock::contiguous(k, v, start).expect("block")
}

fn query(s: KvShape, n: usize, positions: Vec<u32>, seed: u64, d: &Device) -> Query {
    let q = seeded_tensor([s.batch(), s.q_heads(), n, s.head_dim()], seed, 2.0, d);
    Query::new(q, positions).expect("query")
}

/// `attend` and `attend_lse` against the oracle over `view()` for a decode step (host
/// kernels), a two-token step with one padded query, and a 40-token causal query (tensor
/// path: 120 rows per KV head).
fn check_against_oracle(cache: &mut dyn KvCache, next: u32, seed: u64) {
    let d = test_device();
    let s = cache.shape();
    let view = cache.view();
    let base = next.saturating_sub(39);
    let queries = [
        query(s, 1, vec![next; s.batch()], seed, &d),
        query(
            s,
            2,
            vec![next, PAD, next.saturating_sub(3), next],
            seed + 1,
            &d,
        ),
        query(
            s,
            40,
            (0..s.batch())
                .flat_map(|_| (0..40).map(|i| base + i))
                .collect(),
            seed + 2,
            &d,
        ),
    ];
    for q in &queries {
        let got = cache.attend(q, StatsRequest::NONE).expect("attend").output;
        let want = view.attend_reference(q, StatsRequest::NONE).output;
        assert_close(&got, &want, ATOL, RTOL);
        let (out, lse) = cache.attend_lse(q).expect("attend_lse");
        let (want_out, want_lse) = view.attend_reference_lse(q);
        assert_close(&out, &want, ATOL, RTOL);
        assert_close(&out, &want_out, ATOL, RTOL);
        assert_close(&lse, &want_lse, ATOL, RTOL);
    }
}

/// Prefill `prefill` tokens, check, then decode `steps` single tokens, checking after each
/// append (before and after `end_prefill`).
fn run(mut cache: Box<dyn KvCache>, prefill: usize, steps: usize) {
    let d = test_device();
    let s = cache.shape();
    cache.append(block(s, prefill, 0, 3, &d)).expect("prefill");
    check_against_oracle(cache.as_mut(), prefill as u32, 50);
    cache.end_prefill().expect("end_prefill");
    check_against_oracle(cache.as_mut(), prefill as u32, 60);
    for step in 0..steps {
        let p = (prefill + step) as u32;
        cache
            .append(block(s, 1, p, 100 + step as u64, &d))
            .expect("decode append");
        check_against_oracle(cache.as_mut(), p + 1, 70 + step as u64);
    }
}

fn kivi(bits: u32) -> KiviConfig {
    KiviConfig::new(shape())
        .with_bits(bits)
        .with_group(8)
        .with_residual(16)
}

#[test]
fn kivi_fast_paths_equal_the_dequantized_oracle_for_every_width() {
    let d = test_device();
    for bits in [1, 2, 3, 4, 8] {
        run(Box::new(kivi(bits).init(&d).expect("init")), 150, 18);
    }
}

#[test]
fn kivi_fast_paths_equal_the_oracle_with_sinks_fp32_and_quantized_current() {
    let d = test_device();
    let configs = [
        kivi(2).with_sinks(5),
        kivi(4)
            .with_scale_dtype(StorageDtype::F32)
            .with_residual_dtype(StorageDtype::F32),
        kivi(2).with_current_in_full_precision(false),
        kivi(4)
            .with_key_value_bits(4, 2)
            .with_group(16)
            .with_residual(32),
    ];
    for cfg in configs {
        run(Box::new(cfg.init(&d).expect("init")), 77, 12);
    }
}

#[test]
fn kivi_fast_path_handles_a_cache_shorter_than_a_group() {
    // Everything in the window and the pending block: no quantized part at all.
    let d = test_device();
    run(Box::new(kivi(2).init(&d).expect("init")), 5, 3);
}

#[test]
fn kivi_fast_path_over_many_host_tasks() {
    // 2600 tokens: three host tasks of 1024 tokens per stream, the quantized/window
    // boundaries of keys and values inside the last one.
    let d = test_device();
    run(Box::new(kivi(4).init(&d).expect("init")), 2600, 2);
}

#[test]
fn block_formats_fast_paths_equal_the_decoded_oracle() {
    let d = test_device();
    let formats = [
        BlockFormat::Q8_0,
        BlockFormat::Q4_0,
        BlockFormat::Q4_1,
        BlockFormat::Q5_0,
        BlockFormat::Q5_1,
        BlockFormat::from_name("iq4_nl").expect("iq4_nl"),
        BlockFormat::from_name("fp8_e4m3").expect("fp8"),
        BlockFormat::from_name("fp8_e5m2").expect("fp8"),
    ];
    for f in formats {
        run(
            Box::new(BlockQuantConfig::new(shape(), f).init(&d).expect("init")),
            70,
            4,
        );
    }
    let per_head = BlockQuantConfig::new(shape(), BlockFormat::from_name("fp8_e4m3").expect("fp8"))
        .with_fp8_scale(Fp8Scale::Head);
    run(Box::new(per_head.init(&d).expect("init")), 70, 4);
    let mixed =
        BlockQuantConfig::new(shape(), BlockFormat::Q4_0).with_value_format(BlockFormat::Q8_0);
    run(Box::new(mixed.init(&d).expect("init")), 70, 4);
}

#[test]
fn register_kernels_equal_the_oracle_for_every_word_layout() {
    // The host kernels specialise on the words per token (4, 8 or 16) and the code width
    // (2, 4 or 8 bits, `q8_0`'s bytes signed): head dims 64 and 128 reach every layout, and
    // 8-bit codes at 128 channels (32 words) the generic loops.
    let d = test_device();
    for head_dim in [64, 128] {
        let s = KvShape::new(2, 2, 6, head_dim).expect("valid");
        for bits in [2, 4, 8] {
            let c = KiviConfig::new(s)
                .with_bits(bits)
                .with_group(32)
                .with_residual(32);
            run(Box::new(c.init(&d).expect("init")), 100, 2);
        }
        for f in [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1] {
            run(
                Box::new(BlockQuantConfig::new(s, f).init(&d).expect("init")),
                40,
                2,
            );
        }
    }
}

#[test]
fn qjl_and_gear_attend_lse_equal_the_oracle() {
    let d = test_device();
    let qjl = QjlConfig::new(shape())
        .with_sketch_dims(64, 32)
        .with_outliers(2)
        .with_group(8)
        .with_buffer(16);
    run(Box::new(qjl.init(&d).expect("init")), 70, 4);
    let gear = GearConfig::new(shape())
        .with_group(8)
        .with_streaming_gap(16);
    run(Box::new(gear.init(&d).expect("init")), 70, 4);
}

#[test]
fn empty_caches_give_zero_output_and_min_lse() {
    let d = test_device();
    let s = shape();
    let mut caches: Vec<Box<dyn KvCache>> = vec![
        Box::new(kivi(2).init(&d).expect("init")),
        Box::new(
            BlockQuantConfig::new(s, BlockFormat::Q4_0)
                .init(&d)
                .expect("init"),
        ),
    ];
    for cache in &mut caches {
        let q = query(s, 1, vec![0; s.batch()], 1, &d);
        let (out, lse) = cache.attend_lse(&q).expect("attend_lse");
        assert_close(&out, &q.tensor().zeros_like(), 0.0, 0.0);
        assert_close(
            &lse,
            &Tensor::full([s.batch(), s.kv_heads(), 3, 1], f32::MIN, &d),
            0.0,
            0.0,
        );
    }
}
