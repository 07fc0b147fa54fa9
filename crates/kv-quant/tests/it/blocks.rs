//! Serving-engine formats: exact byte accounting, hand cases, the documented error bounds of
//! every format (property tests), fp8 scales, and the cache (contract for every format, bad
//! input, memory formula).

use burn::prelude::*;
use kv_core::{KvBlock, KvCache, KvShape, Query, StatsRequest, memory_matches_buffers};
use kv_quant::{
    BlockFormat, BlockQuantCache, BlockQuantConfig, EncodedBlocks, Fp8Format, Fp8Scale, Iq4Search,
};
use kv_testkit::{assert_close, seeded_data, seeded_tensor, tensor_from, test_device, to_vec};
use proptest::prelude::*;

fn shape() -> KvShape {
    KvShape::new(2, 2, 6, 32).expect("valid")
}

fn cache(format: BlockFormat) -> impl Fn(&Device) -> Box<dyn KvCache> {
    move |d: &Device| -> Box<dyn KvCache> {
        Box::new(
            BlockQuantConfig::new(shape(), format)
                .init(d)
                .expect("init"),
        )
    }
}

kv_testkit::kv_cache_contract!(q8_0, cache(BlockFormat::Q8_0));
kv_testkit::kv_cache_contract!(q4_0, cache(BlockFormat::Q4_0));
kv_testkit::kv_cache_contract!(q4_1, cache(BlockFormat::Q4_1));
kv_testkit::kv_cache_contract!(q5_0, cache(BlockFormat::Q5_0));
kv_testkit::kv_cache_contract!(q5_1, cache(BlockFormat::Q5_1));
kv_testkit::kv_cache_contract!(iq4_nl, cache(BlockFormat::Iq4Nl(Iq4Search::Refit)));
kv_testkit::kv_cache_contract!(
    iq4_nl_search7,
    cache(BlockFormat::Iq4Nl(Iq4Search::Search7))
);
kv_testkit::kv_cache_contract!(fp8_e4m3, cache(BlockFormat::Fp8(Fp8Format::E4M3)));
kv_testkit::kv_cache_contract!(fp8_e5m2, cache(BlockFormat::Fp8(Fp8Format::E5M2)));
kv_testkit::kv_cache_contract!(fp8_e4m3_head, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        BlockQuantConfig::new(shape(), BlockFormat::Fp8(Fp8Format::E4M3))
            .with_fp8_scale(Fp8Scale::Head)
            .init(d)
            .expect("init"),
    )
});

kv_testkit::kv_cache_contract!(keys_q8_0_values_q4_0, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        BlockQuantConfig::new(shape(), BlockFormat::Q8_0)
            .with_value_format(BlockFormat::Q4_0)
            .init(d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(keys_fp8_values_q4_1, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        BlockQuantConfig::new(shape(), BlockFormat::Fp8(Fp8Format::E4M3))
            .with_value_format(BlockFormat::Q4_1)
            .init(d)
            .expect("init"),
    )
});

const GGML: [BlockFormat; 7] = [
    BlockFormat::Q8_0,
    BlockFormat::Q4_0,
    BlockFormat::Q4_1,
    BlockFormat::Q5_0,
    BlockFormat::Q5_1,
    BlockFormat::Iq4Nl(Iq4Search::Refit),
    BlockFormat::Iq4Nl(Iq4Search::Search7),
];

#[test]
fn held_bytes_are_the_ggml_block_sizes() {
    let d = test_device();
    let x = seeded_tensor([1, 1, 1, 64], 3, 1.0, &d);
    for (f, bytes, bits) in [
        (BlockFormat::Q8_0, 34, 8.5),
        (BlockFormat::Q4_0, 18, 4.5),
        (BlockFormat::Q4_1, 20, 5.0),
        (BlockFormat::Q5_0, 22, 5.5),
        (BlockFormat::Q5_1, 24, 6.0),
        (BlockFormat::Iq4Nl(Iq4Search::Refit), 18, 4.5),
    ] {
        let e = f.encode(x.clone()).expect("encode");
        assert_eq!(e.stored_bytes(), 2 * bytes, "{}", f.name());
        assert_eq!(f.block_bytes(), Some(bytes));
        assert_eq!(f.bits_per_element(64), bits);
    }
    let scale = Tensor::<4>::ones([1, 1, 1, 1], &d);
    let e = BlockFormat::Fp8(Fp8Format::E4M3)
        .encode_fp8(x, scale)
        .expect("fp8");
    assert_eq!(
        e.stored_bytes(),
        64 + 4,
        "64 one-byte codes and the fp32 scale"
    );
}

#[test]
fn hand_blocks_on_the_grid_reconstruct_exactly() {
    let d = test_device();
    // (j mod 16 - 8) / 4: max magnitude -2 first, so q4_0 d = 0.25, q5_0 d = 0.125, q4_1
    // d = 3.75 / 15 = 0.25 with m = -2; every value sits on the grid.
    let v: Vec<f32> = (0..32).map(|j| ((j % 16) as f32 - 8.0) / 4.0).collect();
    let x = tensor_from(v.clone(), [1, 1, 1, 32], &d);
    for f in [BlockFormat::Q4_0, BlockFormat::Q5_0, BlockFormat::Q4_1] {
        let got = to_vec(&f.encode(x.clone()).expect("encode").decode());
        assert_eq!(got, v, "{}", f.name());
    }
    let s = to_vec(BlockFormat::Q4_0.encode(x.clone()).expect("q4_0").scales());
    assert_eq!(s, vec![0.25]);
    // iq4_nl: values d * table are reproduced with d = 1/127 refit exactly to the table.
    let t: Vec<f32> = (0..32)
        .map(|j| f32::from(kv_quant::blocks::KVALUES_IQ4NL[j % 16]))
        .collect();
    let x = tensor_from(t.clone(), [1, 1, 1, 32], &d);
    let got = to_vec(
        &BlockFormat::Iq4Nl(Iq4Search::Refit)
            .encode(x)
            .expect("iq4")
            .decode(),
    );
    assert_eq!(got, t, "the table itself is on the grid (d = 1)");
    // Magnitude ties: ggml keeps the first value of largest magnitude (-2 here), d = 0.25.
    let mut v = vec![0.5f32; 32];
    v[3] = -2.0;
    v[7] = 2.0;
    let x = tensor_from(v, [1, 1, 1, 32], &d);
    let s = to_vec(BlockFormat::Q4_0.encode(x).expect("q4_0").scales());
    assert_eq!(s, vec![0.25], "d = max / -8 with max the first extreme");
    // Zero blocks reconstruct as zero.
    let z = Tensor::<4>::zeros([1, 1, 2, 64], &d);
    for f in GGML {
        let got = to_vec(&f.encode(z.clone()).expect("encode").decode());
        assert!(got.iter().all(|&g| g == 0.0), "{}", f.name());
    }
}

/// Checks the documented per-element bound of a llama.cpp format on `x` (`[rows, 32]` blocks).
fn check_ggml_bound(f: BlockFormat, x: &[f32], enc: &EncodedBlocks) {
    let xhat = to_vec(&enc.decode());
    let ds = to_vec(enc.scales());
    let ms = enc.mins().map(to_vec);
    for (bi, (xb, yb)) in x.chunks(32).zip(xhat.chunks(32)).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let smax = xb
            .iter()
            .copied()
            .fold(0f32, |a, v| if v.abs() > a.abs() { v } else { a });
        let mn = xb.iter().copied().fold(f32::INFINITY, f32::min);
        let mx = xb.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let eps = 1e-5 * amax + 1e-30;
        let ds = ds[bi];
        for (j, (&xv, &yv)) in xb.iter().zip(yb).enumerate() {
            let err = (xv - yv).abs();
            let bound = match f {
                BlockFormat::Q8_0 => {
                    let dh = amax / 127.0;
                    dh / 2.0 + 127.0 * (dh - ds).abs()
                }
                BlockFormat::Q4_0 | BlockFormat::Q5_0 => {
                    let half = if f == BlockFormat::Q4_0 { 8.0 } else { 16.0 };
                    let dh = smax / -half;
                    let clamped = xv / dh > half - 0.5 - 1e-4;
                    dh.abs() * if clamped { 1.0 } else { 0.5 } + half * (dh - ds).abs()
                }
                BlockFormat::Q4_1 | BlockFormat::Q5_1 => {
                    let top = if f == BlockFormat::Q4_1 { 15.0 } else { 31.0 };
                    let dh = (mx - mn) / top;
                    let m = ms.as_ref().map_or(0.0, |m| m[bi]);
                    dh / 2.0 + top * (dh - ds).abs() + (mn - m).abs()
                }
                BlockFormat::Iq4Nl(Iq4Search::Refit) => {
                    let d0 = smax / -127.0;
                    14.0 * d0.abs() + 127.0 * (d0 - ds).abs()
                }
                // The search recomputes codes against its own scale: nearest table entry, so
                // within half the widest gap (24) or the distance past the table's ends.
                BlockFormat::Iq4Nl(Iq4Search::Search7) => {
                    let u = (xv / ds).abs();
                    ds.abs() * (12.0f32).max(u - 113.0).max(0.0) + 1e-6 * amax
                }
                BlockFormat::Fp8(_) => unreachable!("ggml formats only"),
            };
            assert!(
                err <= bound + eps,
                "{}: block {bi} elt {j}: x {xv} x̂ {yv} err {err} > bound {bound} (d {ds})",
                f.name()
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn ggml_formats_meet_their_error_bounds(
        seed in 0u64..10_000,
        tokens in 1usize..5,
        blocks in 1usize..4,
        log_scale in -6i32..10,
        outlier in proptest::bool::ANY,
    ) {
        let d = test_device();
        let scale = 2f32.powi(log_scale);
        let n = 2 * tokens * 32 * blocks;
        let mut x = seeded_data(n, seed, scale);
        if outlier {
            // One large value per block: exercises the clamped end of q4_0 and q5_0.
            for (i, v) in x.iter_mut().enumerate() {
                if i % 32 == (seed as usize) % 32 {
                    *v *= 8.0;
                }
            }
        }
        let t = tensor_from(x.clone(), [1, 2, tokens, 32 * blocks], &d);
        for f in GGML {
            let enc = f.encode(t.clone()).expect("encode");
            check_ggml_bound(f, &x, &enc);
        }
    }

    #[test]
    fn fp8_meets_its_relative_error_bound(
        seed in 0u64..10_000,
        log_scale in -8i32..12,
        per_head in proptest::bool::ANY,
    ) {
        let d = test_device();
        let scale = 2f32.powi(log_scale);
        let x = seeded_data(2 * 3 * 64, seed, scale);
        let t = tensor_from(x.clone(), [1, 2, 3, 64], &d);
        for f in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let amax = |v: &[f32]| v.iter().fold(0f32, |a, x| a.max(x.abs()));
            let scales: Vec<f32> = if per_head {
                x.chunks(3 * 64).map(|h| amax(h) / f.max_finite()).collect()
            } else {
                vec![amax(&x) / f.max_finite()]
            };
            let st = tensor_from(scales.clone(), [1, scales.len(), 1, 1], &d);
            let enc = BlockFormat::Fp8(f).encode_fp8(t.clone(), st).expect("fp8");
            let xhat = to_vec(&enc.decode());
            let m = f.mantissa_bits();
            let sub = 2f32.powi(f.min_exponent());
            for (i, (&xv, &yv)) in x.iter().zip(&xhat).enumerate() {
                let s = scales[if per_head { i / (3 * 64) } else { 0 }];
                let bound = if xv.abs() / s >= sub {
                    2f32.powi(-(m + 1)) * xv.abs()
                } else {
                    2f32.powi(f.min_exponent() - m - 1) * s
                };
                let err = (xv - yv).abs();
                prop_assert!(
                    err <= bound * (1.0 + 1e-5) + 1e-6 * xv.abs(),
                    "{f:?}: x {xv} x̂ {yv} err {err} > {bound}"
                );
            }
        }
    }
}

#[test]
fn search7_is_no_worse_than_refit_on_average() {
    let d = test_device();
    let x = seeded_tensor([1, 4, 16, 64], 5, 1.0, &d);
    let x = x.clone() * x.clone() * x; // heavier tails, as KV activations
    let mse = |f: BlockFormat| {
        let y = f.encode(x.clone()).expect("encode").decode();
        (y - x.clone()).powf_scalar(2.0).mean().into_scalar::<f32>()
    };
    let r = mse(BlockFormat::Iq4Nl(Iq4Search::Refit));
    let s = mse(BlockFormat::Iq4Nl(Iq4Search::Search7));
    assert!(s <= r * 1.02, "search7 mse {s} vs refit {r}");
    // Same bits, different grids: on uniform data the uniform q4_0 grid is the better one, but
    // iq4_nl stays within a factor 2 of it.
    let q4 = mse(BlockFormat::Q4_0);
    assert!(r < 2.0 * q4, "iq4_nl mse {r} vs q4_0 {q4}");
}

#[test]
fn head_dim_not_a_multiple_of_32_is_a_clear_error() {
    let d = test_device();
    let s = KvShape::new(1, 2, 4, 48).expect("shape");
    let err = BlockQuantConfig::new(s, BlockFormat::Q4_0)
        .init(&d)
        .expect_err("48 is not a multiple of 32");
    assert!(err.to_string().contains("48"), "{err}");
    // fp8 has no block: any head_dim.
    BlockQuantConfig::new(s, BlockFormat::Fp8(Fp8Format::E4M3))
        .init(&d)
        .expect("fp8 takes any head_dim");
}

fn block(s: KvShape, n: usize, start: u32, seed: u64, scale: f32, d: &Device) -> KvBlock {
    let dims = [s.batch(), s.kv_heads(), n, s.head_dim()];
    KvBlock::contiguous(
        seeded_tensor(dims, seed, scale, d),
        seeded_tensor(dims, seed + 1, scale, d),
        start,
    )
    .expect("block")
}

#[test]
fn out_of_fp16_range_is_rejected_and_the_cache_is_unchanged() {
    let d = test_device();
    let s = shape();
    let mut c = BlockQuantConfig::new(s, BlockFormat::Q4_1)
        .init(&d)
        .expect("init");
    c.append(block(s, 5, 0, 1, 1.0, &d)).expect("append");
    let before = to_vec(&c.view().keys);
    let err = c
        .append(block(s, 2, 5, 3, 1e6, &d))
        .expect_err("1e6 overflows fp16 scales");
    assert!(err.to_string().contains("65504"), "{err}");
    assert_eq!(c.len(), 5);
    assert_eq!(to_vec(&c.view().keys), before);
}

#[test]
fn fp8_scale_is_fixed_by_the_first_block_and_later_values_saturate() {
    let d = test_device();
    let s = shape();
    for mode in [Fp8Scale::Tensor, Fp8Scale::Head, Fp8Scale::Unit] {
        let mut c = BlockQuantConfig::new(s, BlockFormat::Fp8(Fp8Format::E4M3))
            .with_fp8_scale(mode)
            .init(&d)
            .expect("init");
        c.append(block(s, 4, 0, 1, 1.0, &d)).expect("append");
        let (k, _) = c.encoded().expect("held");
        let sc = to_vec(k.scales());
        match mode {
            Fp8Scale::Tensor => assert_eq!(sc.len(), 1),
            Fp8Scale::Head => assert_eq!(sc.len(), s.kv_heads()),
            Fp8Scale::Unit => assert_eq!(sc, vec![1.0]),
        }
        // A block 1000x larger saturates at 448 * scale.
        c.append(block(s, 1, 4, 9, 1000.0, &d)).expect("append");
        let (k2, _) = c.encoded().expect("held");
        assert_eq!(to_vec(k2.scales()), sc, "the scale does not change");
        let keys = to_vec(&c.view().keys);
        let top = sc.iter().fold(0f32, |a, v| a.max(*v)) * 448.0;
        assert!(keys.iter().all(|v| v.abs() <= top * (1.0 + 1e-6)));
        memory_matches_buffers(&c).expect("memory == held buffers");
    }
}

#[test]
fn memory_matches_the_formula_and_the_format_bits() {
    let d = test_device();
    let s = KvShape::new(1, 3, 9, 64).expect("shape");
    let mixed = [BlockQuantConfig::new(s, BlockFormat::Q8_0).with_value_format(BlockFormat::Q4_0)];
    for cfg in BlockFormat::ALL
        .map(|f| BlockQuantConfig::new(s, f))
        .into_iter()
        .chain(mixed)
    {
        let f = cfg.format;
        let mut c = cfg.init(&d).expect("init");
        c.append(block(s, 40, 0, 1, 1.0, &d)).expect("prefill");
        c.append(block(s, 1, 40, 5, 1.0, &d)).expect("decode");
        let m = c.memory();
        assert_eq!(m.stored_bytes(), cfg.stored_bytes(41), "{}", f.name());
        let bits = (m.key_bytes + m.value_bytes) as f64 * 8.0 / m.logical_elements as f64;
        let want =
            (cfg.key_format().bits_per_element(64) + cfg.value_format().bits_per_element(64)) / 2.0;
        if f.block_bytes().is_some() {
            assert_eq!(bits, want, "{}", f.name());
        }
    }
}

#[test]
fn statistics_path_agrees_with_the_streamed_path() {
    let d = test_device();
    let s = shape();
    let mut c: BlockQuantCache = BlockQuantConfig::new(s, BlockFormat::Q4_0)
        .init(&d)
        .expect("init");
    c.append(block(s, 700, 0, 1, 1.0, &d)).expect("append");
    let q = Query::contiguous(seeded_tensor([2, 6, 3, 32], 4, 1.0, &d), 697).expect("q");
    let a = c.attend(&q, StatsRequest::NONE).expect("streamed").output;
    let b = c
        .attend(&q, StatsRequest::COLUMN_SUMS)
        .expect("dense")
        .output;
    assert_close(&a, &b, 1e-5, 1e-4);
}

#[test]
fn from_params_parses_names_and_rejects_unknown_ones() {
    let s = shape();
    let c = BlockQuantConfig::from_params(s, "fp8_e5m2", [("scale", "head")]).expect("ok");
    assert_eq!(c.format, BlockFormat::Fp8(Fp8Format::E5M2));
    assert_eq!(c.fp8_scale, Fp8Scale::Head);
    let c = BlockQuantConfig::from_params(s, "iq4_nl", [("search", "ntry7")]).expect("ok");
    assert_eq!(c.format, BlockFormat::Iq4Nl(Iq4Search::Search7));
    assert!(BlockQuantConfig::from_params(s, "q4_0", [("scale", "head")]).is_err());
    let c = BlockQuantConfig::from_params(s, "q8_0", [("v", "q4_0")]).expect("ok");
    assert_eq!(
        (c.key_format(), c.value_format()),
        (BlockFormat::Q8_0, BlockFormat::Q4_0)
    );
    assert!(BlockQuantConfig::from_params(s, "q8_0", [("v", "q9_0")]).is_err());
    assert!(BlockQuantConfig::from_params(s, "q8_0", [("search", "ntry7")]).is_err());
    assert!(BlockQuantConfig::from_params(s, "q3_0", []).is_err());
    assert!(BlockQuantConfig::from_params(s, "fp8_e4m3", [("scale", "row")]).is_err());
}
