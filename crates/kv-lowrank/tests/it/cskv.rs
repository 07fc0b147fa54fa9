//! CSKV (joint-channel features + full-precision window): the contract, exactness at full
//! width and inside the window, the window sliding, memory, and errors.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KeyRope, KvBlock, KvCache, KvShape, Query, RopeConfig, RopeConvention,
    StatsRequest, contiguous_positions, memory_matches_buffers,
};
use kv_lowrank::{Activation, CovarianceAccumulator, CskvConfig};
use kv_testkit::{assert_close, seeded_tensor, test_device};

use crate::{assert_invalid, saved_calibration, shape, synthetic_calibration, temp_path};

fn rope(d: usize) -> RopeConfig {
    RopeConfig::new(d, 10_000.0, RopeConvention::RotateHalf)
}

kv_testkit::kv_cache_contract!(cskv_5_7_window_3, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        CskvConfig::new(shape(), "unused", 1, 5, 7, rope(8))
            .with_window(3)
            .init_with(&synthetic_calibration(shape()), d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(cskv_no_window_from_file, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        CskvConfig::new(
            shape(),
            saved_calibration("cskv-contract"),
            0,
            16,
            16,
            rope(8),
        )
        .with_window(0)
        .init(d)
        .expect("init"),
    )
});

/// Appends `k`, `v` (pre-RoPE) in blocks of `step` tokens to `cache` and, rotated, to the
/// dense cache; returns both attention outputs for `q` over all of them.
fn compare(
    cache: &mut dyn KvCache,
    s: KvShape,
    k: Tensor<4>,
    v: Tensor<4>,
    q: Tensor<4>,
    step: usize,
) -> (Tensor<4>, Tensor<4>) {
    let device = test_device();
    let [b, h, t, d] = k.dims();
    let r = rope(d).init().expect("rope");
    let rotated = r.apply(k.clone(), &contiguous_positions(b, t, 0));
    let mut dense = DenseCacheConfig::new(s).init(&device).expect("dense");
    assert_eq!(cache.key_rope(), KeyRope::PreRope);
    let mut start = 0;
    while start < t {
        let end = (start + step).min(t);
        let cut = |x: &Tensor<4>| x.clone().slice([0..b, 0..h, start..end, 0..d]);
        cache
            .append(KvBlock::contiguous(cut(&k), cut(&v), start as u32).expect("block"))
            .expect("append");
        start = end;
    }
    dense
        .append(KvBlock::contiguous(rotated, v, 0).expect("block"))
        .expect("append");
    let q = Query::contiguous(q, 0).expect("q");
    (
        cache.attend(&q, StatsRequest::NONE).expect("attend").output,
        dense.attend(&q, StatsRequest::NONE).expect("attend").output,
    )
}

fn inputs(t: usize, device: &Device) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    (
        seeded_tensor([2, 2, t, 8], 1, 1.0, device),
        seeded_tensor([2, 2, t, 8], 2, 1.0, device),
        seeded_tensor([2, 4, t, 8], 3, 1.0, device),
    )
}

#[test]
fn full_width_reproduces_reference_attention_across_the_window() {
    let device = test_device();
    let s = shape();
    for (window, step) in [(3, 10), (3, 1), (0, 4), (16, 5)] {
        let mut cskv = CskvConfig::new(s, "unused", 0, 16, 16, rope(8))
            .with_window(window)
            .init_with(&synthetic_calibration(s), &device)
            .expect("init");
        let (k, v, q) = inputs(10, &device);
        let (a, e) = compare(&mut cskv, s, k, v, q, step);
        assert_close(&a, &e, 1e-5, 1e-4);
        assert_eq!(
            cskv.window_tokens(),
            window.min(10),
            "window {window} step {step}"
        );
        assert_eq!(cskv.compressed_tokens(), 10 - window.min(10));
    }
}

#[test]
fn the_window_holds_the_original_keys_and_values() {
    let device = test_device();
    let s = shape();
    // Width 1 loses almost everything, but a window covering every token is exact.
    let mut cskv = CskvConfig::new(s, "unused", 0, 1, 1, rope(8))
        .with_window(10)
        .init_with(&synthetic_calibration(s), &device)
        .expect("init");
    let (k, v, q) = inputs(10, &device);
    let (a, e) = compare(&mut cskv, s, k.clone(), v.clone(), q.clone(), 3);
    assert_close(&a, &e, 1e-5, 1e-4);
    // With a window of 4 the last 4 slots of the view are the originals (rotated), exactly.
    let mut cskv = CskvConfig::new(s, "unused", 0, 1, 1, rope(8))
        .with_window(4)
        .init_with(&synthetic_calibration(s), &device)
        .expect("init");
    let (a, e) = compare(&mut cskv, s, k.clone(), v.clone(), q, 1);
    assert!(
        (a - e).abs().max().into_scalar::<f32>() > 1e-3,
        "width 1 must lose something outside the window"
    );
    let view = cskv.view();
    let r = rope(8).init().expect("rope");
    let rotated = r.apply(k, &contiguous_positions(2, 10, 0));
    let last = |x: Tensor<4>| x.slice([0..2, 0..2, 6..10, 0..8]);
    assert_close(&last(view.keys), &last(rotated), 1e-6, 1e-6);
    assert_close(&last(view.values), &last(v), 0.0, 0.0);
}

#[test]
fn memory_counts_features_window_and_bases() {
    let device = test_device();
    let s = shape();
    let cal = synthetic_calibration(s);
    let t = 12;
    for (rk, rv, w) in [(2, 2, 0), (4, 12, 3), (16, 16, 5)] {
        let mut cskv = CskvConfig::new(s, "unused", 1, rk, rv, rope(8))
            .with_window(w)
            .init_with(&cal, &device)
            .expect("init");
        let (k, v, _) = inputs(t, &device);
        cskv.append(KvBlock::contiguous(k, v, 0).expect("block"))
            .expect("append");
        let m = cskv.memory();
        assert_eq!(m.key_bytes, 2 * (t - w) * rk * 4 + 2 * 2 * w * 8 * 4);
        assert_eq!(m.value_bytes, 2 * (t - w) * rv * 4 + 2 * 2 * w * 8 * 4);
        assert_eq!(m.metadata_bytes, 2 * t * 4 + 16 * (rk + rv) * 4);
        assert_eq!(cskv.config().bytes_per_token(), (rk + rv) * 4 + 4);
        memory_matches_buffers(&cskv).expect("honest memory");
    }
}

#[test]
fn bad_configs_and_artefacts_are_rejected() {
    let device = test_device();
    let s = shape();
    let cal = synthetic_calibration(s);
    assert_invalid(
        CskvConfig::new(s, "u", 0, 17, 4, rope(8)).init_with(&cal, &device),
        "kv_heads x head_dim 16",
    );
    assert_invalid(
        CskvConfig::new(s, "u", 0, 4, 0, rope(8)).init_with(&cal, &device),
        "rank_v",
    );
    assert_invalid(
        CskvConfig::new(s, "u", 0, 4, 4, rope(16)).init_with(&cal, &device),
        "RoPE",
    );
    assert_invalid(
        CskvConfig::new(s, "u", 0, 4, 4, rope(8))
            .with_num_layers(3)
            .init_with(&cal, &device),
        "this model has 3",
    );
    let other = KvShape::new(1, 3, 3, 8).expect("shape");
    assert_invalid(
        CskvConfig::new(other, "u", 0, 4, 4, rope(8)).init_with(&cal, &device),
        "calibrate this model",
    );
    assert_invalid(
        CskvConfig::new(s, temp_path("missing-cskv"), 0, 4, 4, rope(8)).init(&device),
        "kv-eval calibrate",
    );
    // An artefact without pre-RoPE keys has no joint key basis.
    let mut acc = CovarianceAccumulator::new(2, s);
    for layer in 0..2 {
        acc.observe(
            layer,
            Activation::Values,
            &seeded_tensor([1, 2, 16, 8], 9, 1.0, &device),
        )
        .expect("values");
    }
    assert_invalid(
        CskvConfig::new(s, "u", 0, 4, 4, rope(8))
            .init_with(&acc.finish("m", "t").expect("f"), &device),
        "keys_pre_rope_joint",
    );
    assert_invalid(
        CskvConfig::from_params(s, 0, rope(8), [("k_density", "0.5")]),
        "calibration",
    );
    assert_invalid(
        CskvConfig::from_params(s, 0, rope(8), [("calibration", "c"), ("v_density", "1.5")]),
        "(0, 1]",
    );
    let cfg = CskvConfig::from_params(s, 1, rope(8), [("calibration", "c")]).expect("defaults");
    assert_eq!((cfg.rank_k, cfg.rank_v, cfg.window), (4, 12, 32));
    let cfg = CskvConfig::from_params(
        s,
        1,
        rope(8),
        [
            ("calibration", "c"),
            ("k_density", "0.5"),
            ("rank_v", "3"),
            ("window", "8"),
        ],
    )
    .expect("params");
    assert_eq!((cfg.rank_k, cfg.rank_v, cfg.window), (8, 3, 8));
}
