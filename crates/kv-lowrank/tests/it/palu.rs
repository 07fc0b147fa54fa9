//! Palu (calibrated latents, keys rotated when attending): the contract, exactness at full
//! rank and on planted subspaces, memory, and errors.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KeyRope, KvBlock, KvCache, KvShape, Query, RopeConfig, RopeConvention,
    StatsRequest, contiguous_positions, memory_matches_buffers,
};
use kv_lowrank::{Activation, CovarianceAccumulator, PaluConfig};
use kv_testkit::{assert_close, seeded_data, seeded_tensor, tensor_from, test_device, to_vec};

use crate::{assert_invalid, saved_calibration, shape, synthetic_calibration, temp_path};

fn rope(d: usize) -> RopeConfig {
    RopeConfig::new(d, 10_000.0, RopeConvention::RotateHalf)
}

kv_testkit::kv_cache_contract!(palu_rank_3_5, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        PaluConfig::new(shape(), "unused", 1, 3, 5, rope(8))
            .init_with(&synthetic_calibration(shape()), d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(palu_from_file, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        PaluConfig::new(
            shape(),
            saved_calibration("palu-contract"),
            0,
            8,
            8,
            rope(8),
        )
        .init(d)
        .expect("init"),
    )
});

/// Runs the same prefill and queries through Palu (pre-RoPE keys) and the dense cache
/// (keys rotated by the test).
fn compare(
    palu: &mut dyn KvCache,
    s: KvShape,
    k: Tensor<4>,
    v: Tensor<4>,
    q: Tensor<4>,
) -> (Tensor<4>, Tensor<4>) {
    let device = test_device();
    let t = k.dims()[2];
    let r = rope(s.head_dim()).init().expect("rope");
    let rotated = r.apply(k.clone(), &contiguous_positions(s.batch(), t, 0));
    let mut dense = DenseCacheConfig::new(s).init(&device).expect("dense");
    assert_eq!(palu.key_rope(), KeyRope::PreRope);
    palu.append(KvBlock::contiguous(k, v.clone(), 0).expect("block"))
        .expect("append");
    dense
        .append(KvBlock::contiguous(rotated, v, 0).expect("block"))
        .expect("append");
    let q = Query::contiguous(q, 0).expect("q");
    (
        palu.attend(&q, StatsRequest::NONE).expect("attend").output,
        dense.attend(&q, StatsRequest::NONE).expect("attend").output,
    )
}

#[test]
fn full_rank_reproduces_reference_attention_with_rope() {
    let device = test_device();
    let s = shape();
    let mut palu = PaluConfig::new(s, "unused", 0, 8, 8, rope(8))
        .init_with(&synthetic_calibration(s), &device)
        .expect("init");
    let dims = [2, 2, 10, 8];
    let (a, e) = compare(
        &mut palu,
        s,
        seeded_tensor(dims, 1, 1.0, &device),
        seeded_tensor(dims, 2, 1.0, &device),
        seeded_tensor([2, 4, 10, 8], 3, 1.0, &device),
    );
    assert_close(&a, &e, 1e-5, 1e-4);
}

#[test]
fn pre_rope_keys_inside_the_kept_subspace_are_exact() {
    let device = test_device();
    let s = KvShape::new(1, 1, 2, 8).expect("shape");
    let kk = |c: &[f32]| vec![c[0], 0.0, 0.0, c[1], 0.0, 0.0, 2.0 * c[0], 0.0];
    let vv = |c: &[f32]| vec![0.0, c[0], 0.0, 0.0, 0.0, c[1], 0.0, 0.0];
    let rows = |f: &dyn Fn(&[f32]) -> Vec<f32>, n: usize, seed: u64| -> Vec<f32> {
        seeded_data(2 * n, seed, 1.0)
            .chunks(2)
            .flat_map(f)
            .collect()
    };
    let mut acc = CovarianceAccumulator::new(1, s);
    acc.observe(
        0,
        Activation::KeysPreRope,
        &tensor_from(rows(&kk, 50, 1), [1, 1, 50, 8], &device),
    )
    .expect("keys");
    acc.observe(
        0,
        Activation::Values,
        &tensor_from(rows(&vv, 50, 2), [1, 1, 50, 8], &device),
    )
    .expect("values");
    let cal = acc.finish("planted", "seeded").expect("finish");
    let mut palu = PaluConfig::new(s, "unused", 0, 2, 2, rope(8))
        .init_with(&cal, &device)
        .expect("init");
    let t = 7;
    let (a, e) = compare(
        &mut palu,
        s,
        tensor_from(rows(&kk, t, 3), [1, 1, t, 8], &device),
        tensor_from(rows(&vv, t, 4), [1, 1, t, 8], &device),
        seeded_tensor([1, 2, t, 8], 5, 1.0, &device),
    );
    assert_close(&a, &e, 1e-5, 1e-4);
    assert_eq!(palu.memory().key_bytes, t * 2 * 4);
}

#[test]
fn memory_is_proportional_to_rank_and_bases_are_orthonormal() {
    let device = test_device();
    let s = shape();
    let cal = synthetic_calibration(s);
    let t = 12;
    for (rk, rv) in [(2, 2), (4, 6), (8, 8)] {
        let mut palu = PaluConfig::new(s, "unused", 0, rk, rv, rope(8))
            .init_with(&cal, &device)
            .expect("init");
        let dims = [2, 2, t, 8];
        palu.append(
            KvBlock::contiguous(
                seeded_tensor(dims, 1, 1.0, &device),
                seeded_tensor(dims, 2, 1.0, &device),
                0,
            )
            .expect("block"),
        )
        .expect("append");
        let m = palu.memory();
        assert_eq!(m.key_bytes, 2 * 2 * t * rk * 4);
        assert_eq!(m.value_bytes, 2 * 2 * t * rv * 4);
        memory_matches_buffers(&palu).expect("honest memory");
        assert_eq!(palu.config().bytes_per_token(), 2 * (rk + rv) * 4 + 4);
        for (basis, r) in [(palu.key_basis(), rk), (palu.value_basis(), rv)] {
            let u = to_vec(basis);
            for head in 0..2 {
                let err =
                    kv_lowrank::orthonormality_error(&u[head * 8 * r..(head + 1) * 8 * r], 8, r);
                assert!(err < 1e-5, "head {head}: {err}");
            }
        }
    }
}

#[test]
fn bad_configs_and_artefacts_are_rejected() {
    let device = test_device();
    let s = shape();
    let cal = synthetic_calibration(s);
    assert_invalid(
        PaluConfig::new(s, "u", 0, 9, 4, rope(8)).init_with(&cal, &device),
        "head_dim 8",
    );
    assert_invalid(
        PaluConfig::new(s, "u", 0, 4, 4, rope(16)).init_with(&cal, &device),
        "RoPE",
    );
    assert_invalid(
        PaluConfig::new(s, "u", 0, 4, 4, rope(8))
            .with_num_layers(3)
            .init_with(&cal, &device),
        "this model has 3",
    );
    let other = KvShape::new(1, 3, 3, 8).expect("shape");
    assert_invalid(
        PaluConfig::new(other, "u", 0, 4, 4, rope(8)).init_with(&cal, &device),
        "calibrate this model",
    );
    assert_invalid(
        PaluConfig::new(s, temp_path("missing-palu"), 0, 4, 4, rope(8)).init(&device),
        "kv-eval calibrate",
    );
    let mut acc = CovarianceAccumulator::new(1, s);
    let kv = seeded_tensor([1, 2, 16, 8], 9, 1.0, &device);
    acc.observe(0, Activation::Keys, &kv).expect("keys");
    acc.observe(0, Activation::Values, &kv).expect("values");
    let post_only = acc.finish("m", "t").expect("finish");
    assert_invalid(
        PaluConfig::new(s, "u", 0, 4, 4, rope(8)).init_with(&post_only, &device),
        "keys_pre_rope",
    );
    assert_invalid(
        PaluConfig::from_params(s, 0, rope(8), [("rank", "4")]),
        "calibration",
    );
    let cfg = PaluConfig::from_params(s, 1, rope(8), [("calibration", "c"), ("rank_k", "3")])
        .expect("params");
    assert_eq!((cfg.layer, cfg.rank_k, cfg.rank_v), (1, 3, 4));
}

// Palu + quantization: 4-bit latents (Hadamard-rotated, one group per head's latent).
kv_testkit::kv_cache_contract!(palu_latent_4bit, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        PaluConfig::new(shape(), "unused", 1, 4, 8, rope(8))
            .with_latent_quant(4, 0, true)
            .init_with(&synthetic_calibration(shape()), d)
            .expect("init"),
    )
});

fn filled(cfg: PaluConfig, t: usize, device: &Device) -> kv_lowrank::PaluCache {
    let mut palu = cfg
        .init_with(&synthetic_calibration(shape()), device)
        .expect("init");
    let dims = [2, 2, t, 8];
    palu.append(
        KvBlock::contiguous(
            seeded_tensor(dims, 1, 1.0, device),
            seeded_tensor(dims, 2, 1.0, device),
            0,
        )
        .expect("block"),
    )
    .expect("append");
    palu
}

/// The Hadamard rotation is folded into the bases, so it changes nothing but the latents'
/// coordinates: at 8 bits the quantized cache attends like the fp one within 8-bit error, with
/// or without it, and its bases stay orthonormal.
#[test]
fn quantized_latents_attend_like_fp_latents_within_their_error() {
    let device = test_device();
    let base = PaluConfig::new(shape(), "unused", 0, 4, 4, rope(8));
    let mut fp = filled(base.clone(), 10, &device);
    let q = Query::contiguous(seeded_tensor([2, 4, 3, 8], 5, 1.0, &device), 7).expect("q");
    let want = fp.attend(&q, StatsRequest::NONE).expect("attend").output;
    for hadamard in [true, false] {
        let mut c = filled(base.clone().with_latent_quant(8, 0, hadamard), 10, &device);
        let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
        assert_close(&got, &want, 2e-2, 0.0);
        let u = to_vec(c.key_basis());
        for head in 0..2 {
            let err = kv_lowrank::orthonormality_error(&u[head * 32..(head + 1) * 32], 8, 4);
            assert!(err < 1e-5, "hadamard {hadamard}, head {head}: {err}");
        }
    }
    // 2-bit latents are further off than 8-bit ones.
    let mut c2 = filled(base.with_latent_quant(2, 0, true), 10, &device);
    let got2 = c2.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert!(kv_testkit::max_diff(&got2, &want) > 1e-3);
}

#[test]
fn quantized_latent_memory_is_codes_and_scales() {
    let device = test_device();
    let t = 12;
    for (bits, group) in [(4, 0), (2, 2), (3, 4)] {
        let cfg = PaluConfig::new(shape(), "unused", 0, 4, 8, rope(8))
            .with_latent_quant(bits, group, true);
        let palu = filled(cfg.clone(), t, &device);
        let (sk, sv) = cfg.latent_specs().expect("specs").expect("quantized");
        let m = palu.memory();
        assert_eq!(m.key_bytes, sk.stored_bytes([2, 2, t, 4]), "{bits} bits");
        assert_eq!(m.value_bytes, sv.stored_bytes([2, 2, t, 8]), "{bits} bits");
        memory_matches_buffers(&palu).expect("honest memory");
        assert_eq!(
            cfg.bytes_per_token() * t,
            sk.stored_bytes([2, 2, t, 4]) / 2 + sv.stored_bytes([2, 2, t, 8]) / 2 + 4 * t,
            "per token per sequence"
        );
        // Fewer bytes than the fp32 latents.
        assert!(m.key_bytes + m.value_bytes < 2 * 2 * t * (4 + 8) * 4);
    }
}

#[test]
fn bad_latent_quantization_is_rejected_and_bad_data_leaves_the_cache() {
    let device = test_device();
    let s = shape();
    let cal = synthetic_calibration(s);
    let base = PaluConfig::new(s, "u", 0, 4, 6, rope(8));
    assert_invalid(
        base.clone()
            .with_latent_quant(5, 0, false)
            .init_with(&cal, &device),
        "bit width",
    );
    assert_invalid(
        base.clone()
            .with_latent_quant(4, 0, true)
            .init_with(&cal, &device),
        "power-of-two",
    );
    assert_invalid(
        base.clone()
            .with_latent_quant(4, 4, false)
            .init_with(&cal, &device),
        "does not divide",
    );
    let cfg = PaluConfig::from_params(
        s,
        0,
        rope(8),
        [
            ("calibration", "u"),
            ("rank", "4"),
            ("bits", "3"),
            ("hadamard", "false"),
        ],
    )
    .expect("params");
    assert_eq!((cfg.latent_bits, cfg.hadamard), (Some(3), false));
    let mut palu = filled(
        PaluConfig::new(s, "u", 0, 4, 4, rope(8)).with_latent_quant(4, 0, true),
        6,
        &device,
    );
    let before = palu.memory();
    let mut k = seeded_data(32, 3, 1.0);
    k[0] = f32::NAN;
    let bad = KvBlock::contiguous(
        tensor_from(k, [2, 2, 1, 8], &device),
        seeded_tensor([2, 2, 1, 8], 4, 1.0, &device),
        6,
    )
    .expect("block");
    assert!(palu.append(bad).is_err());
    assert_eq!(palu.memory(), before);
    assert_eq!(palu.lengths().held, vec![6; 4]);
}
