//! GEAR: the shared contract, rank 0 without outliers equal to the backbone bit for bit, full
//! rank reproducing the input, outliers round-tripping exactly, power iteration recovering a
//! low-rank residual, streaming with prefill and decode ranks, byte accounting and config
//! errors.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvError, KvShape, Query, StatsRequest, StorageDtype,
    memory_matches_buffers,
};
use kv_quant::gear::power_iteration;
use kv_quant::{BitWidth, GearConfig, GroupAxis, QuantSpec};
use kv_testkit::{max_diff, seeded_tensor, tensor_from, test_device, to_vec};

fn shape() -> KvShape {
    KvShape::new(2, 2, 6, 8).expect("valid")
}

/// `G = 4`, `n_b = 4`, ranks 2 (prefill) and 1 (decode), 10 % outliers: the contract's 9-token
/// prefill compresses 8 tokens, and its decode steps compress a block of 4.
fn small() -> GearConfig {
    GearConfig::new(shape())
        .with_group(4)
        .with_streaming_gap(4)
        .with_ranks(2, 1)
        .with_outlier_ratio(0.1)
}

// `attend` streams a softmax over exactly the reconstructions `view()` returns.
kv_testkit::kv_cache_contract!(gear, |d: &Device| -> Box<dyn KvCache> {
    Box::new(small().init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(gear_backbone_only_quantized_current, |d: &Device| -> Box<
    dyn KvCache,
> {
    Box::new(
        small()
            .with_ranks(0, 0)
            .with_outlier_ratio(0.0)
            .with_current_in_full_precision(false)
            .with_residual_dtype(StorageDtype::F32)
            .init(d)
            .expect("init"),
    )
});

fn tokens(t: &Tensor<4>, r: core::ops::Range<usize>) -> Tensor<4> {
    let [b, h, _, d] = t.dims();
    t.clone().slice([0..b, 0..h, r, 0..d])
}

fn kv(s: KvShape, n: usize, seed: u64, d: &Device) -> (Tensor<4>, Tensor<4>) {
    let dims = [s.batch(), s.kv_heads(), n, s.head_dim()];
    (
        seeded_tensor(dims, seed, 1.0, d),
        seeded_tensor(dims, seed + 1, 1.0, d),
    )
}

#[test]
fn rank_zero_without_outliers_is_the_backbone_bit_for_bit() {
    let d = test_device();
    let s = KvShape::new(1, 2, 2, 8).expect("valid");
    let mut c = GearConfig::new(s)
        .with_group(4)
        .with_streaming_gap(8)
        .with_ranks(0, 0)
        .with_outlier_ratio(0.0)
        // An fp32 buffer, so that the cache compresses exactly the tensors given below.
        .with_residual_dtype(StorageDtype::F32)
        .init(&d)
        .expect("init");
    let (k, v) = kv(s, 19, 3, &d);
    c.append(KvBlock::contiguous(k.clone(), v.clone(), 0).expect("block"))
        .expect("append");
    c.end_prefill().expect("end_prefill");
    assert_eq!((c.compressed_tokens(), c.buffered_tokens()), (16, 3));
    let bits = BitWidth::new(2).expect("width");
    let ks = QuantSpec::new(bits, 4, GroupAxis::Tokens).expect("spec");
    let vs = QuantSpec::new(bits, 4, GroupAxis::Channels).expect("spec");
    let want_k = ks.quantize(tokens(&k, 0..16)).expect("q").dequantize();
    let want_v = vs.quantize(tokens(&v, 0..16)).expect("q").dequantize();
    let view = c.view();
    assert_eq!(to_vec(&tokens(&view.keys, 0..16)), to_vec(&want_k));
    assert_eq!(to_vec(&tokens(&view.values, 0..16)), to_vec(&want_v));
    // And the block bytes are the backbone's alone.
    let (bk, bv) = c.block_stored_bytes();
    assert_eq!(bk, ks.stored_bytes([1, 2, 16, 8]));
    assert_eq!(bv, vs.stored_bytes([1, 2, 16, 8]));
}

#[test]
fn full_rank_reproduces_the_input() {
    let d = test_device();
    let s = KvShape::new(1, 2, 2, 8).expect("valid");
    let (k, v) = kv(s, 16, 5, &d);
    let run = |rank: usize| {
        let mut c = GearConfig::new(s)
            .with_group(4)
            .with_streaming_gap(16)
            .with_ranks(rank, rank)
            .with_outlier_ratio(0.0)
            .init(&d)
            .expect("init");
        c.append(KvBlock::contiguous(k.clone(), v.clone(), 0).expect("block"))
            .expect("append");
        c.end_prefill().expect("end_prefill");
        assert_eq!(c.compressed_tokens(), 16);
        let view = c.view();
        (max_diff(&view.keys, &k), max_diff(&view.values, &v))
    };
    let (k0, v0) = run(0);
    let (k2, v2) = run(2);
    let (kf, vf) = run(8);
    // Full rank (r = d = 8) leaves only the fp16 rounding of the factors.
    assert!(kf < 5e-3 && vf < 5e-3, "full rank: {kf}, {vf}");
    assert!(k0 > 0.05 && v0 > 0.05, "2-bit backbone alone: {k0}, {v0}");
    assert!(k2 < k0 && v2 < v0, "rank 2 helps: {k2} < {k0}, {v2} < {v0}");
}

#[test]
fn outliers_round_trip_exactly_and_do_not_stretch_the_ranges() {
    let d = test_device();
    let s = KvShape::new(1, 1, 1, 8).expect("valid");
    // 8 tokens x 8 channels = 64 entries; s = 1/16 keeps 2 per side.
    let (k, v) = kv(s, 8, 9, &d);
    let mut kd = to_vec(&k);
    let mut vd = to_vec(&v);
    // fp16-representable outliers: two large, two very negative.
    let planted = [(3usize, 100.5f32), (17, 250.0), (40, -120.25), (63, -300.0)];
    for &(i, x) in &planted {
        kd[i] = x;
        vd[i] = x;
    }
    let k = tensor_from(kd, [1, 1, 8, 8], &d);
    let v = tensor_from(vd, [1, 1, 8, 8], &d);
    let mut c = GearConfig::new(s)
        .with_group(4)
        .with_streaming_gap(8)
        .with_ranks(0, 0)
        .with_outlier_ratio(1.0 / 16.0)
        .init(&d)
        .expect("init");
    c.append(KvBlock::contiguous(k.clone(), v.clone(), 0).expect("block"))
        .expect("append");
    c.end_prefill().expect("end_prefill");
    let view = c.view();
    let (gk, gv) = (to_vec(&view.keys), to_vec(&view.values));
    for &(i, x) in &planted {
        assert_eq!(gk[i], x, "key outlier {i}");
        assert_eq!(gv[i], x, "value outlier {i}");
    }
    // The other entries come from a 2-bit backbone over the outlier-free data (|x| < ~3):
    // their error stays far below what a range stretched to 550 would give (~90).
    let (kd, vd) = (to_vec(&k), to_vec(&v));
    let worst = |got: &[f32], want: &[f32]| {
        (0..64)
            .filter(|i| !planted.iter().any(|p| p.0 == *i))
            .map(|i| (got[i] - want[i]).abs())
            .fold(0.0f32, f32::max)
    };
    assert!(worst(&gk, &kd) < 2.0, "keys: {}", worst(&gk, &kd));
    assert!(worst(&gv, &vd) < 2.0, "values: {}", worst(&gv, &vd));
    // Bytes: 2 + 2 outliers of 6 bytes (u32 index, fp16 value) on keys and on values.
    let spec_k = QuantSpec::new(BitWidth::new(2).expect("w"), 4, GroupAxis::Tokens).expect("s");
    assert_eq!(
        c.block_stored_bytes().0,
        spec_k.stored_bytes([1, 1, 8, 8]) + 4 * 6
    );
}

#[test]
fn power_iteration_recovers_low_rank_residuals() {
    let d = test_device();
    // R = u vᵀ + 0.5 w zᵀ per head: rank 2.
    let (n, dd) = (12, 8);
    let u = seeded_tensor([2, 3, n, 1], 1, 1.0, &d);
    let v = seeded_tensor([2, 3, 1, dd], 2, 1.0, &d);
    let w = seeded_tensor([2, 3, n, 1], 3, 1.0, &d);
    let z = seeded_tensor([2, 3, 1, dd], 4, 1.0, &d);
    let r1 = u.matmul(v);
    let r2 = r1.clone() + w.matmul(z).mul_scalar(0.5);
    let rel = |r: &Tensor<4>, rank: usize| {
        let (a, b) = power_iteration(r.clone(), rank, 3, 7).expect("power iteration");
        assert_eq!(a.dims(), [2, 3, n, rank]);
        assert_eq!(b.dims(), [2, 3, dd, rank]);
        let err = (r.clone() - a.matmul(b.swap_dims(2, 3)))
            .square()
            .sum()
            .sqrt();
        let norm = r.clone().square().sum().sqrt();
        (err / norm).into_scalar::<f32>()
    };
    assert!(rel(&r1, 1) < 1e-3, "rank 1: {}", rel(&r1, 1));
    assert!(rel(&r2, 2) < 1e-3, "rank 2: {}", rel(&r2, 2));
    assert!(rel(&r2, 1) > 1e-2, "rank 1 cannot hold a rank-2 residual");
    // A zero residual gives zero factors, not NaN.
    let zero = Tensor::<4>::zeros([1, 1, n, dd], &d);
    let (a, b) = power_iteration(zero, 2, 3, 1).expect("power iteration");
    assert!(
        to_vec(&a.matmul(b.swap_dims(2, 3)))
            .iter()
            .all(|x| *x == 0.0)
    );
    assert!(power_iteration(r1, 0, 3, 1).is_err());
}

#[test]
fn streaming_uses_prefill_then_decode_ranks_and_bytes_match_the_formula() {
    let d = test_device();
    let s = KvShape::new(1, 2, 2, 8).expect("valid");
    let cfg = GearConfig::new(s)
        .with_group(4)
        .with_streaming_gap(4)
        .with_ranks(3, 1)
        .with_outlier_ratio(0.1);
    let mut c = cfg.init(&d).expect("init");
    let (k, v) = kv(s, 10, 11, &d);
    c.append(KvBlock::contiguous(k, v, 0).expect("block"))
        .expect("prefill");
    c.end_prefill().expect("end_prefill");
    assert_eq!((c.block_tokens(), c.buffered_tokens()), (vec![8], 2));
    let prefill = cfg.block_bytes(8, 3).expect("bytes");
    let (bk, bv) = c.block_stored_bytes();
    assert_eq!(bk + bv, prefill);
    // Hand count of that block, per tensor: 2-bit codes 1 word x 8 tokens x 2 heads (64 B),
    // fp16 scale and zero per 4 tokens per channel (2 x 8 x 2 x 2 x 2 = 128 B), factors
    // 2 x 3 x (8 + 8) x 2 heads (192 B), ⌊0.1 x 64 / 2⌋ = 3 outliers per side x 6 B x 2 heads
    // (72 B) — and the same total for values (scales per token per 4 channels).
    assert_eq!(prefill, 2 * (64 + 128 + 192 + 72));
    for step in 0..6u32 {
        let (k, v) = kv(s, 1, 20 + u64::from(step), &d);
        c.append(KvBlock::contiguous(k, v, 10 + step).expect("block"))
            .expect("decode");
        memory_matches_buffers(&c).expect("honest memory");
    }
    assert_eq!((c.block_tokens(), c.buffered_tokens()), (vec![8, 4, 4], 0));
    let (bk, bv) = c.block_stored_bytes();
    assert_eq!(bk + bv, prefill + 2 * cfg.block_bytes(4, 1).expect("bytes"));
    c.end_prefill().expect("end_prefill");
    let m = c.memory();
    assert_eq!(m.stored_bytes(), bk + bv + 16 * 4);
}

#[test]
fn gear_attends_closer_than_its_backbone_on_outlier_heavy_data() {
    let d = test_device();
    let s = KvShape::new(1, 1, 2, 16).expect("valid");
    let (k, v) = kv(s, 64, 31, &d);
    // A few large entries, as real keys have.
    let spikes = seeded_tensor([1, 1, 64, 16], 33, 1.0, &d)
        .greater_elem(2.2)
        .float()
        .mul_scalar(8.0);
    let k = k + spikes;
    let blk = KvBlock::contiguous(k, v, 0).expect("block");
    let q = Query::contiguous(seeded_tensor([1, 2, 4, 16], 35, 1.0, &d), 60).expect("query");
    let mut dense = DenseCacheConfig::new(s).init(&d).expect("init");
    dense.append(blk.clone()).expect("append");
    let want = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
    let err = |cfg: GearConfig| {
        let mut c = cfg.init(&d).expect("init");
        c.append(blk.clone()).expect("append");
        c.end_prefill().expect("end_prefill");
        max_diff(
            &c.attend(&q, StatsRequest::NONE).expect("attend").output,
            &want,
        )
    };
    let base = GearConfig::new(s).with_group(16).with_streaming_gap(64);
    let backbone = err(base.clone().with_ranks(0, 0).with_outlier_ratio(0.0));
    let gear = err(base);
    assert!(gear < backbone, "GEAR {gear} vs backbone {backbone}");
}

#[test]
fn config_errors_name_the_field_and_keep_the_cache() {
    let d = test_device();
    let field = |cfg: GearConfig| match cfg.init(&d) {
        Err(KvError::InvalidConfig { field, .. }) => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    assert_eq!(field(small().with_bits(5)), "bits");
    assert_eq!(field(small().with_group(0)), "group");
    assert_eq!(field(small().with_streaming_gap(6)), "group");
    assert_eq!(field(small().with_group(3).with_streaming_gap(6)), "group");
    assert_eq!(field(small().with_outlier_ratio(1.5)), "outlier_ratio");
    assert_eq!(field(small().with_outlier_ratio(-0.1)), "outlier_ratio");
    assert_eq!(field(small().with_power_iters(0)), "power_iters");
    assert!(
        small()
            .with_ranks(0, 0)
            .with_power_iters(0)
            .init(&d)
            .is_ok()
    );
    assert!(matches!(
        small().block_bytes(6, 1),
        Err(KvError::InvalidConfig {
            field: "tokens",
            ..
        })
    ));

    let p = GearConfig::from_params(
        shape(),
        [
            ("bits", "4"),
            ("rank", "3"),
            ("left", "0.05"),
            ("gap", "32"),
            ("loop", "2"),
        ],
    )
    .expect("params");
    assert_eq!(
        (
            p.bits,
            p.decode_rank,
            p.outlier_ratio,
            p.streaming_gap,
            p.power_iters
        ),
        (4, 3, 0.05, 32, 2)
    );
    assert!(matches!(
        GearConfig::from_params(shape(), [("rankv", "2")]),
        Err(KvError::InvalidConfig {
            field: "params",
            ..
        })
    ));
    assert!(matches!(
        GearConfig::from_params(shape(), [("left", "two")]),
        Err(KvError::InvalidConfig { field: "left", .. })
    ));

    // Data beyond the fp16 limit is refused and the cache is unchanged.
    let mut c = small().init(&d).expect("init");
    let (k, v) = kv(shape(), 5, 3, &d);
    c.append(KvBlock::contiguous(k, v, 0).expect("block"))
        .expect("append");
    let before = (to_vec(&c.view().keys), c.memory());
    let huge = Tensor::<4>::full([2, 2, 1, 8], 40000.0, &d);
    let err = c.append(KvBlock::contiguous(huge.clone(), huge.clone(), 5).expect("block"));
    assert!(matches!(
        err,
        Err(KvError::InvalidConfig { field: "data", .. })
    ));
    assert_eq!((to_vec(&c.view().keys), c.memory()), before);
}

#[test]
fn streamed_attention_matches_the_view_over_many_blocks() {
    let d = test_device();
    let s = KvShape::new(1, 2, 4, 8).expect("valid");
    let mut c = GearConfig::new(s)
        .with_group(4)
        .with_streaming_gap(8)
        .with_ranks(2, 1)
        .with_outlier_ratio(0.05)
        .init(&d)
        .expect("init");
    // 75 chunks of 8 tokens: 75 blocks, streamed in chunks of 512 + 88 tokens, then the
    // buffer of 3 decode tokens.
    for i in 0..75u32 {
        let (k, v) = kv(s, 8, 100 + u64::from(i), &d);
        c.append(KvBlock::contiguous(k, v, 8 * i).expect("block"))
            .expect("append");
    }
    c.end_prefill().expect("end_prefill");
    for i in 0..3u32 {
        let (k, v) = kv(s, 1, 300 + u64::from(i), &d);
        c.append(KvBlock::contiguous(k, v, 600 + i).expect("block"))
            .expect("decode");
    }
    assert_eq!((c.block_tokens().len(), c.buffered_tokens()), (75, 3));
    let q = Query::contiguous(seeded_tensor([1, 4, 2, 8], 7, 1.0, &d), 601).expect("query");
    let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    let want = c.view().attend_reference(&q, StatsRequest::NONE).output;
    kv_testkit::assert_close(&got, &want, 1e-5, 1e-4);
    memory_matches_buffers(&c).expect("honest memory");
}
