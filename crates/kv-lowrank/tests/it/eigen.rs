//! Eigen Attention: the contract, exactness at full rank and on planted subspaces, memory.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvShape, Query, StatsRequest, memory_matches_buffers,
};
use kv_lowrank::{Activation, CovarianceAccumulator, EigenConfig};
use kv_testkit::{assert_close, seeded_data, seeded_tensor, tensor_from, test_device, to_vec};

use crate::{assert_invalid, saved_calibration, shape, synthetic_calibration, temp_path};

kv_testkit::kv_cache_contract!(eigen_rank_3_5, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        EigenConfig::new(shape(), "unused", 1, 3, 5)
            .init_with(&synthetic_calibration(shape()), d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(eigen_from_file, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        EigenConfig::new(shape(), saved_calibration("eigen-contract"), 0, 4, 4)
            .init(d)
            .expect("init"),
    )
});

fn run(
    cache: &mut dyn KvCache,
    s: KvShape,
    k: Tensor<4>,
    v: Tensor<4>,
    device: &Device,
) -> Tensor<4> {
    let t = k.dims()[2];
    cache
        .append(KvBlock::contiguous(k, v, 0).expect("block"))
        .expect("append");
    let q = seeded_tensor([s.batch(), s.q_heads(), t, s.head_dim()], 77, 1.0, device);
    cache
        .attend(&Query::contiguous(q, 0).expect("q"), StatsRequest::NONE)
        .expect("attend")
        .output
}

#[test]
fn full_rank_reproduces_reference_attention() {
    let device = test_device();
    let s = shape();
    let cal = synthetic_calibration(s);
    let dims = [2, 2, 11, 8];
    let (k, v) = (
        seeded_tensor(dims, 1, 1.0, &device),
        seeded_tensor(dims, 2, 1.0, &device),
    );
    let mut eigen = EigenConfig::new(s, "unused", 0, 8, 8)
        .init_with(&cal, &device)
        .expect("init");
    let mut dense = DenseCacheConfig::new(s).init(&device).expect("dense");
    let a = run(&mut eigen, s, k.clone(), v.clone(), &device);
    let e = run(&mut dense, s, k, v, &device);
    assert_close(&a, &e, 1e-5, 1e-4);
}

#[test]
fn activations_inside_the_kept_subspace_are_exact() {
    let device = test_device();
    let s = KvShape::new(1, 1, 2, 8).expect("shape");
    // Keys and queries in span(e1, e4, e6); values in span(e0 + e7, e3).
    let qk = |c: &[f32]| vec![0.0, c[0], 0.0, 0.0, 2.0 * c[1], 0.0, 0.5 * c[2], 0.0];
    let vv = |c: &[f32]| vec![c[0], 0.0, 0.0, 3.0 * c[1], 0.0, 0.0, 0.0, c[0]];
    let rows = |f: &dyn Fn(&[f32]) -> Vec<f32>, n: usize, seed: u64| -> Vec<f32> {
        seeded_data(3 * n, seed, 1.0)
            .chunks(3)
            .flat_map(f)
            .collect()
    };
    let mut acc = CovarianceAccumulator::new(1, s);
    acc.observe(
        0,
        Activation::Keys,
        &tensor_from(rows(&qk, 60, 1), [1, 1, 60, 8], &device),
    )
    .expect("keys");
    acc.observe(
        0,
        Activation::Queries,
        &tensor_from(rows(&qk, 60, 2), [1, 2, 30, 8], &device),
    )
    .expect("queries");
    acc.observe(
        0,
        Activation::Values,
        &tensor_from(rows(&vv, 60, 3), [1, 1, 60, 8], &device),
    )
    .expect("values");
    let cal = acc.finish("planted", "seeded").expect("finish");
    let t = 9;
    let k = tensor_from(rows(&qk, t, 4), [1, 1, t, 8], &device);
    let v = tensor_from(rows(&vv, t, 5), [1, 1, t, 8], &device);
    let q = tensor_from(rows(&qk, 2 * t, 6), [1, 2, t, 8], &device);
    let mut eigen = EigenConfig::new(s, "unused", 0, 3, 2)
        .init_with(&cal, &device)
        .expect("init");
    let mut dense = DenseCacheConfig::new(s).init(&device).expect("dense");
    let q = Query::contiguous(q, 0).expect("q");
    let mut outs = Vec::new();
    for c in [&mut eigen as &mut dyn KvCache, &mut dense] {
        c.append(KvBlock::contiguous(k.clone(), v.clone(), 0).expect("block"))
            .expect("append");
        outs.push(c.attend(&q, StatsRequest::NONE).expect("attend").output);
    }
    assert_close(&outs[0], &outs[1], 1e-5, 1e-4);
    assert_eq!(eigen.memory().key_bytes, t * 3 * 4);
    assert_eq!(eigen.memory().value_bytes, t * 2 * 4);
}

#[test]
fn memory_is_proportional_to_rank() {
    let device = test_device();
    let s = shape();
    let cal = synthetic_calibration(s);
    let t = 20;
    let dims = [2, 2, t, 8];
    for (rk, rv) in [(2, 2), (4, 4), (8, 8), (3, 6)] {
        let mut eigen = EigenConfig::new(s, "unused", 0, rk, rv)
            .init_with(&cal, &device)
            .expect("init");
        run(
            &mut eigen,
            s,
            seeded_tensor(dims, 3, 1.0, &device),
            seeded_tensor(dims, 4, 1.0, &device),
            &device,
        );
        let m = eigen.memory();
        assert_eq!(m.key_bytes, 2 * 2 * t * rk * 4);
        assert_eq!(m.value_bytes, 2 * 2 * t * rv * 4);
        assert_eq!(m.metadata_bytes, 2 * t * 4 + 2 * 8 * (rk + rv) * 4);
        memory_matches_buffers(&eigen).expect("honest memory");
        let cfg = eigen.config();
        assert_eq!(cfg.bytes_per_token(), 2 * (rk + rv) * 4 + 4);
    }
}

#[test]
fn the_projections_are_orthonormal() {
    let device = test_device();
    let eigen = EigenConfig::new(shape(), "unused", 1, 5, 3)
        .init_with(&synthetic_calibration(shape()), &device)
        .expect("init");
    for (basis, r) in [(eigen.key_basis(), 5), (eigen.value_basis(), 3)] {
        let [h, d, rr] = basis.dims();
        assert_eq!((h, d, rr), (2, 8, r));
        let u = to_vec(basis);
        for head in 0..h {
            let err = kv_lowrank::orthonormality_error(&u[head * d * r..(head + 1) * d * r], d, r);
            assert!(err < 1e-5, "head {head}: {err}");
        }
    }
}

#[test]
fn bad_configs_and_artefacts_are_rejected() {
    let device = test_device();
    let s = shape();
    let cal = synthetic_calibration(s);
    assert_invalid(
        EigenConfig::new(s, "u", 0, 9, 4).init_with(&cal, &device),
        "head_dim 8",
    );
    assert_invalid(
        EigenConfig::new(s, "u", 0, 4, 0).init_with(&cal, &device),
        "rank_v",
    );
    assert_invalid(
        EigenConfig::new(s, "u", 0, 4, 4)
            .with_num_layers(3)
            .init_with(&cal, &device),
        "this model has 3",
    );
    let other = KvShape::new(2, 2, 4, 16).expect("shape");
    assert_invalid(
        EigenConfig::new(other, "u", 0, 4, 4).init_with(&cal, &device),
        "calibrate this model",
    );
    assert_invalid(
        EigenConfig::new(s, "u", 5, 4, 4).init_with(&cal, &device),
        "out of range",
    );
    assert_invalid(
        EigenConfig::new(s, temp_path("missing-eigen"), 0, 4, 4).init(&device),
        "kv-eval calibrate",
    );
    // An artefact without queries has no joint query/key basis.
    let mut acc = CovarianceAccumulator::new(1, s);
    let kv = seeded_tensor([1, 2, 16, 8], 9, 1.0, &device);
    acc.observe(0, Activation::Keys, &kv).expect("keys");
    acc.observe(0, Activation::Values, &kv).expect("values");
    let keys_only = acc.finish("m", "t").expect("finish");
    assert_invalid(
        EigenConfig::new(s, "u", 0, 4, 4).init_with(&keys_only, &device),
        "query_key",
    );
    assert_invalid(
        EigenConfig::from_params(s, 0, [("rank", "4")]),
        "calibration",
    );
    let cfg =
        EigenConfig::from_params(s, 2, [("calibration", "c"), ("rank", "3"), ("rank_v", "5")])
            .expect("params");
    assert_eq!((cfg.layer, cfg.rank_k, cfg.rank_v), (2, 3, 5));
    let cfg = EigenConfig::from_params(s, 0, [("calibration", "c")]).expect("params");
    assert_eq!((cfg.rank_k, cfg.rank_v), (4, 4));
}
