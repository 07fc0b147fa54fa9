//! The KIVI cache: the shared contract (KIVI-2 and KIVI-4), bit-exact windows, the reference's
//! spill semantics through decode, the memory formula and bad input.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvError, KvShape, Query, StatsRequest, StorageDtype,
    memory_matches_buffers,
};
use kv_quant::{KiviCache, KiviConfig};
use kv_testkit::{assert_close, max_diff, seeded_tensor, test_device, to_vec};

fn shape() -> KvShape {
    KvShape::new(2, 2, 6, 8).expect("valid")
}

/// G = 4, R = 4: the contract's 9-token prefill quantizes 8 keys and 5 values, and its decode
/// steps cross spill boundaries.
fn small(bits: u32) -> KiviConfig {
    KiviConfig::new(shape())
        .with_bits(bits)
        .with_group(4)
        .with_residual(4)
}

// `attend` streams a softmax over chunks of exactly the tensors `view()` returns: the same
// math as the reference up to the fp32 summation order, so the contract's default fp32
// tolerances (1e-5 + 1e-4 |x|) hold; quantization error never enters the comparison.
kv_testkit::kv_cache_contract!(kivi2, |d: &Device| -> Box<dyn KvCache> {
    Box::new(small(2).init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(kivi4, |d: &Device| -> Box<dyn KvCache> {
    Box::new(small(4).init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(kivi2_quantized_current, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        small(2)
            .with_current_in_full_precision(false)
            .with_scale_dtype(StorageDtype::F32)
            .with_residual_dtype(StorageDtype::F32)
            .init(d)
            .expect("init"),
    )
});

kv_testkit::kv_cache_contract!(kivi2_sinks, |d: &Device| -> Box<dyn KvCache> {
    Box::new(small(2).with_sinks(3).init(d).expect("init"))
});

fn block(
    s: KvShape,
    n: usize,
    start: u32,
    seed: u64,
    d: &Device,
) -> (Tensor<4>, Tensor<4>, KvBlock) {
    let dims = [s.batch(), s.kv_heads(), n, s.head_dim()];
    let k = seeded_tensor(dims, seed, 1.0, d);
    let v = seeded_tensor(dims, seed + 1, 1.0, d);
    let b = KvBlock::contiguous(k.clone(), v.clone(), start).expect("block");
    (k, v, b)
}

fn tokens(t: &Tensor<4>, r: core::ops::Range<usize>) -> Tensor<4> {
    let [b, h, _, d] = t.dims();
    t.clone().slice([0..b, 0..h, r, 0..d])
}

#[test]
fn window_tokens_round_trip_bit_exactly() {
    let d = test_device();
    let s = KvShape::new(1, 2, 4, 16).expect("valid");
    let cfg = KiviConfig::new(s)
        .with_group(4)
        .with_residual(8)
        .with_residual_dtype(StorageDtype::F32);
    let mut c = cfg.init(&d).expect("init");
    let (k, v, blk) = block(s, 21, 0, 3, &d);
    c.append(blk).expect("append");
    c.end_prefill().expect("end_prefill");
    // keys: 21 - 21 mod 8 = 16 quantized, 5 kept; values: all but the last 8 quantized.
    assert_eq!((c.quantized_key_tokens(), c.full_key_tokens()), (16, 5));
    assert_eq!((c.quantized_value_tokens(), c.full_value_tokens()), (13, 8));
    let view = c.view();
    assert_eq!(
        to_vec(&tokens(&view.keys, 16..21)),
        to_vec(&tokens(&k, 16..21))
    );
    assert_eq!(
        to_vec(&tokens(&view.values, 13..21)),
        to_vec(&tokens(&v, 13..21))
    );
    // The quantized part is close but not exact (2 bits).
    let err = max_diff(&tokens(&view.keys, 0..16), &tokens(&k, 0..16));
    assert!(err > 0.0 && err < 0.4, "key error {err}");
}

#[test]
fn current_block_is_attended_in_full_precision_until_the_next_append() {
    let d = test_device();
    let s = KvShape::new(1, 2, 4, 16).expect("valid");
    let mut c = KiviConfig::new(s)
        .with_group(4)
        .with_residual(4)
        .init(&d)
        .expect("init");
    let mut dense = DenseCacheConfig::new(s).init(&d).expect("init");
    let (_, _, blk) = block(s, 12, 0, 5, &d);
    c.append(blk.clone()).expect("append");
    dense.append(blk).expect("append");
    assert_eq!(c.pending_tokens(), 12);
    // Prefill attention sees the block as given: it equals the dense cache's.
    let q = Query::contiguous(seeded_tensor([1, 4, 12, 16], 9, 1.0, &d), 0).expect("query");
    let a = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    let b = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_close(&a, &b, 1e-5, 1e-4);
    let before = c.memory().stored_bytes();
    c.end_prefill().expect("end_prefill");
    assert_eq!(c.pending_tokens(), 0);
    assert_eq!(
        before - c.memory().stored_bytes(),
        2 * 12 * 2 * 16 * 4,
        "the fp32 copy of the block is counted while held and freed at end_prefill"
    );
    let a = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert!(
        max_diff(&a, &b) > 1e-4,
        "after end_prefill attention reads the quantized store"
    );
}

#[test]
fn spill_semantics_follow_the_reference_through_decode() {
    let d = test_device();
    let s = KvShape::new(1, 1, 2, 8).expect("valid");
    let (g, r) = (4, 8);
    let mut c = KiviConfig::new(s)
        .with_group(g)
        .with_residual(r)
        .with_residual_dtype(StorageDtype::F32)
        .init(&d)
        .expect("init");
    let (k0, v0, blk) = block(s, 13, 0, 1, &d);
    c.append(blk).expect("prefill");
    c.end_prefill().expect("end_prefill");
    let (mut qk, mut fk) = (8, 5);
    let (mut qv, mut fv) = (5, 8);
    assert_eq!((c.quantized_key_tokens(), c.full_key_tokens()), (qk, fk));
    assert_eq!(
        (c.quantized_value_tokens(), c.full_value_tokens()),
        (qv, fv)
    );
    let mut all_k = vec![k0];
    let mut all_v = vec![v0];
    for step in 0..21u32 {
        let (k, v, blk) = block(s, 1, 13 + step, 100 + u64::from(step) * 2, &d);
        all_k.push(k);
        all_v.push(v);
        c.append(blk).expect("decode");
        // As the reference attends before it quantizes, this step reads the `fk + 1` window
        // keys (a full window of R included) and the `fv + 1` window values in full precision.
        let k_all = Tensor::cat(all_k.clone(), 2);
        let v_all = Tensor::cat(all_v.clone(), 2);
        let t = qk + fk + 1;
        let view = c.view();
        assert_eq!(
            to_vec(&tokens(&view.keys, qk..t)),
            to_vec(&tokens(&k_all, qk..t)),
            "keys attended at decode step {step}"
        );
        assert_eq!(
            to_vec(&tokens(&view.values, qv..t)),
            to_vec(&tokens(&v_all, qv..t)),
            "values attended at decode step {step}"
        );
        let spills = (usize::from(fk + 1 == r) * fk, usize::from(fv + 1 > r));
        assert_eq!(c.spilled_window_tokens(), spills, "step {step}");
        memory_matches_buffers(&c).expect("memory == held buffers");
        // Keys: the fp window grows to R, then the whole block of R is quantized.
        fk += 1;
        if fk == r {
            qk += r;
            fk = 0;
        }
        // Values: once the window exceeds R, the oldest single token is quantized.
        fv += 1;
        if fv > r {
            qv += 1;
            fv = r;
        }
        assert_eq!(
            (c.quantized_key_tokens(), c.full_key_tokens()),
            (qk, fk),
            "keys after decode step {step}"
        );
        assert_eq!(
            (c.quantized_value_tokens(), c.full_value_tokens()),
            (qv, fv),
            "values after decode step {step}"
        );
        // Every window token is exact; quantized ones are within a 2-bit step.
        c.end_prefill().expect("drop the pending copy");
        assert_eq!(c.spilled_window_tokens(), (0, 0));
        let view = c.view();
        let t = qk + fk;
        assert_eq!(
            to_vec(&tokens(&view.keys, qk..t)),
            to_vec(&tokens(&k_all, qk..t))
        );
        assert_eq!(
            to_vec(&tokens(&view.values, qv..t)),
            to_vec(&tokens(&v_all, qv..t))
        );
        assert!(max_diff(&view.keys, &k_all) < 0.7);
        assert!(max_diff(&view.values, &v_all) < 0.7);
    }
}

#[test]
fn memory_follows_the_formula() {
    let d = test_device();
    let s = KvShape::new(2, 3, 9, 64).expect("valid");
    for (bits, t) in [(2, 300), (4, 300), (2, 128), (2, 50), (4, 1)] {
        let cfg = KiviConfig::new(s).with_bits(bits);
        let mut c = cfg.init(&d).expect("init");
        let (_, _, blk) = block(s, t, 0, 11, &d);
        c.append(blk).expect("append");
        c.end_prefill().expect("end_prefill");
        let m = c.memory();
        memory_matches_buffers(&c).expect("memory == held buffers");
        assert_eq!(
            m.stored_bytes(),
            cfg.stored_bytes(t).expect("formula"),
            "{bits} bits, {t} tokens"
        );
        // Hand formula per (sequence, head): quantized part (b + 32/G) bits per element,
        // fp16 window 16 bits, positions 4 bytes per token per sequence.
        let (tk, tv) = (t - t % 128, t.saturating_sub(128));
        let per_head_bits = (tk + tv) * 64 * (bits as usize + 1) + ((t - tk) + (t - tv)) * 64 * 16;
        assert_eq!(m.stored_bytes(), 2 * 3 * per_head_bits / 8 + 2 * t * 4);
    }
    // KIVI-2, long context: the quantized part is 3.0 bits per element.
    let cfg = KiviConfig::new(KvShape::new(1, 1, 1, 64).expect("valid"));
    let big =
        cfg.stored_bytes(128 * 64).expect("formula") - cfg.stored_bytes(128 * 63).expect("formula");
    assert_eq!(
        big * 8,
        2 * 128 * 64 * 3 + 128 * 32,
        "128 more tokens: 3 bits per element + positions"
    );
}

#[test]
fn bad_config_is_rejected_clearly() {
    let d = test_device();
    let s = shape();
    let e = small(5).init(&d).expect_err("5 bits");
    assert!(e.to_string().contains("unsupported bit width 5"), "{e}");
    let e = small(2)
        .with_residual(6)
        .init(&d)
        .expect_err("G=4 does not divide R=6");
    assert!(e.to_string().contains("does not divide"), "{e}");
    let e = small(2)
        .with_group(3)
        .with_residual(6)
        .init(&d)
        .expect_err("G=3 does not divide d=8");
    assert!(e.to_string().contains("head_dim"), "{e}");
    assert!(small(2).with_group(0).init(&d).is_err());
    assert!(small(2).with_residual(0).init(&d).is_err());
    assert!(
        matches!(
            KiviConfig::new(s).init(&d),
            Err(KvError::InvalidConfig { .. })
        ),
        "G = 32 does not divide head_dim 8"
    );
}

fn snapshot(c: &KiviCache) -> (Vec<f32>, Vec<f32>, usize, usize, usize) {
    let v = c.view();
    (
        to_vec(&v.keys),
        to_vec(&v.values),
        c.quantized_key_tokens(),
        c.quantized_value_tokens(),
        c.memory().stored_bytes(),
    )
}

#[test]
fn bad_data_leaves_the_cache_unchanged() {
    let d = test_device();
    let s = shape();
    let mut c = small(2).init(&d).expect("init");
    let (_, _, blk) = block(s, 7, 0, 1, &d);
    c.append(blk).expect("append");
    let before = snapshot(&c);
    let (k, v, _) = block(s, 4, 7, 2, &d);
    let nan = k.clone().slice_fill([1..2, 1..2, 3..4, 7..8], f32::NAN);
    let huge = v.clone().slice_fill([0..1, 0..1, 0..1, 0..1], 1e6);
    for (what, blk) in [
        (
            "NaN keys",
            KvBlock::contiguous(nan, v.clone(), 7).expect("block"),
        ),
        (
            "huge values for fp16 scales",
            KvBlock::contiguous(k.clone(), huge, 7).expect("block"),
        ),
        (
            "positions going back",
            KvBlock::contiguous(k, v, 2).expect("block"),
        ),
    ] {
        assert!(c.append(blk).is_err(), "{what}");
        assert_eq!(snapshot(&c), before, "{what}: cache changed");
    }
}

#[test]
fn kivi4_attention_is_close_to_dense() {
    let d = test_device();
    let s = KvShape::new(1, 2, 4, 32).expect("valid");
    let mut c = KiviConfig::new(s)
        .with_bits(4)
        .with_group(32)
        .with_residual(32)
        .init(&d)
        .expect("init");
    let mut dense = DenseCacheConfig::new(s).init(&d).expect("init");
    let (_, _, blk) = block(s, 200, 0, 21, &d);
    c.append(blk.clone()).expect("append");
    dense.append(blk).expect("append");
    c.end_prefill().expect("end_prefill");
    let q = Query::contiguous(seeded_tensor([1, 4, 1, 32], 22, 3.0, &d), 199).expect("query");
    let a = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    let b = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_close(&a, &b, 2e-2, 0.0);
}

#[test]
fn streamed_attention_equals_reference_over_many_chunks() {
    // 1300 tokens with G = 4: three chunks of 512 keys, the quantized/window boundaries of keys
    // (1296) and values (1172) inside the last one; two sequences, GQA group 3, causal queries
    // inside the keys (a few, and the whole prefill), before and after end_prefill.
    let d = test_device();
    let s = KvShape::new(2, 2, 6, 8).expect("valid");
    let mut c = KiviConfig::new(s)
        .with_group(4)
        .with_residual(128)
        .init(&d)
        .expect("init");
    let (_, _, blk) = block(s, 1300, 0, 31, &d);
    c.append(blk).expect("append");
    for prefill in [true, false] {
        let q = Query::contiguous(seeded_tensor([2, 6, 7, 8], 32, 2.0, &d), 1290).expect("query");
        let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
        let want = c.view().attend_reference(&q, StatsRequest::NONE).output;
        assert_close(&got, &want, 1e-5, 1e-4);
        let q = Query::contiguous(seeded_tensor([2, 6, 3, 8], 33, 2.0, &d), 600).expect("query");
        let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
        let want = c.view().attend_reference(&q, StatsRequest::NONE).output;
        assert_close(&got, &want, 1e-5, 1e-4);
        // The prefill's own queries: three blocks of query tokens, each over the key chunks
        // it can see (the first block skips the last two chunks).
        let q = Query::contiguous(seeded_tensor([2, 6, 1300, 8], 35, 2.0, &d), 0).expect("query");
        let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
        let want = c.view().attend_reference(&q, StatsRequest::NONE).output;
        assert_close(&got, &want, 1e-5, 1e-4);
        if prefill {
            c.end_prefill().expect("end_prefill");
        }
    }
    // With statistics requested, the dense path answers with the same output.
    let q = Query::contiguous(seeded_tensor([2, 6, 2, 8], 34, 2.0, &d), 1298).expect("query");
    let with = c.attend(&q, StatsRequest::COLUMN_SUMS).expect("attend");
    let without = c.attend(&q, StatsRequest::NONE).expect("attend");
    assert_close(&with.output, &without.output, 1e-5, 1e-4);
    assert_eq!(
        with.stats.column_sums.expect("sums").dims(),
        [2, 2, 3, 1300]
    );
}

#[test]
fn params_parse_and_reject_clearly() {
    let s = KvShape::new(1, 3, 9, 64).expect("valid");
    let cfg = KiviConfig::from_params(
        s,
        [
            ("bits", "4"),
            ("group", "16"),
            ("residual", "64"),
            ("scale_dtype", "f32"),
            ("residual_dtype", "f32"),
            ("current_full", "false"),
            ("value_bits", "2"),
        ],
    )
    .expect("params");
    assert_eq!((cfg.bits, cfg.group, cfg.residual), (4, 16, 64));
    assert_eq!((cfg.key_bits, cfg.value_bits), (None, Some(2)));
    assert_eq!(cfg.scale_dtype, StorageDtype::F32);
    assert!(!cfg.current_in_full_precision);
    let d = test_device();
    let c = cfg.init(&d).expect("init");
    assert_eq!(c.config().group, 16);
    for (k, v) in [
        ("bits", "two"),
        ("group", "-1"),
        ("scale_dtype", "bf16"),
        ("nosuch", "1"),
    ] {
        let e = KiviConfig::from_params(s, [(k, v)]).expect_err(k);
        assert!(matches!(e, KvError::InvalidConfig { .. }), "{k}: {e}");
    }
    // Mixed widths: keys 4 bits, values 2 bits (KIVI's k_bits / v_bits).
    let mixed = KiviConfig::new(s).with_key_value_bits(4, 2);
    // 384 tokens: 384 keys and 256 values quantized; 4-bit keys add 2 bits x 384 x 64 per head.
    let t = 384;
    let all2 = KiviConfig::new(s).stored_bytes(t).expect("formula");
    let m = mixed.stored_bytes(t).expect("formula");
    assert_eq!(m - all2, 3 * 384 * 64 * 2 / 8);
    assert!(
        KiviConfig::new(s)
            .with_key_value_bits(5, 2)
            .init(&d)
            .is_err()
    );
}

#[test]
fn sinks_stay_exact_and_the_rest_follows_kivi() {
    let d = test_device();
    let s = KvShape::new(1, 2, 4, 8).expect("valid");
    let cfg = KiviConfig::new(s)
        .with_group(4)
        .with_residual(8)
        .with_residual_dtype(StorageDtype::F32)
        .with_sinks(2);
    // Sinks filled across appends: one token, then a block of 14 (1 more sink, 13 for KIVI).
    let mut c = cfg.init(&d).expect("init");
    let (k0, v0, blk) = block(s, 1, 0, 41, &d);
    c.append(blk).expect("append");
    assert_eq!(
        (
            c.sink_tokens(),
            c.quantized_key_tokens(),
            c.full_key_tokens()
        ),
        (1, 0, 0)
    );
    let (k1, v1, blk) = block(s, 14, 1, 43, &d);
    c.append(blk).expect("append");
    c.end_prefill().expect("end_prefill");
    assert_eq!(c.sink_tokens(), 2);
    // 13 tokens after the sinks: keys 8 quantized + 5 fp; values 5 quantized + 8 fp.
    assert_eq!((c.quantized_key_tokens(), c.full_key_tokens()), (8, 5));
    assert_eq!((c.quantized_value_tokens(), c.full_value_tokens()), (5, 8));
    let (k, v) = (Tensor::cat(vec![k0, k1], 2), Tensor::cat(vec![v0, v1], 2));
    let view = c.view();
    assert_eq!(to_vec(&tokens(&view.keys, 0..2)), to_vec(&tokens(&k, 0..2)));
    assert_eq!(
        to_vec(&tokens(&view.values, 0..2)),
        to_vec(&tokens(&v, 0..2))
    );
    assert_eq!(
        to_vec(&tokens(&view.keys, 10..15)),
        to_vec(&tokens(&k, 10..15))
    );
    assert_eq!(
        to_vec(&tokens(&view.values, 7..15)),
        to_vec(&tokens(&v, 7..15))
    );
    memory_matches_buffers(&c).expect("memory == held buffers");
    assert_eq!(
        c.memory().stored_bytes(),
        cfg.stored_bytes(15).expect("formula")
    );
    // Streamed attention over sinks + groups equals the reference over the view.
    let q = Query::contiguous(seeded_tensor([1, 4, 3, 8], 45, 2.0, &d), 12).expect("query");
    let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    let want = c.view().attend_reference(&q, StatsRequest::NONE).output;
    assert_close(&got, &want, 1e-5, 1e-4);
}
