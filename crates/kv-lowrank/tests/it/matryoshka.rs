//! MatryoshkaKV (nested PCA truncations, per-head ranks): the contract, exactness at full
//! rank, the nesting (truncating a running cache equals a cache built at the lower ranks),
//! rank allocation, memory, and errors.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvShape, Query, StatsRequest, memory_matches_buffers,
};
use kv_lowrank::{Activation, CovarianceAccumulator, MatryoshkaConfig, RankAllocation};
use kv_testkit::{assert_close, seeded_data, seeded_tensor, tensor_from, test_device, to_vec};

use crate::{LAYERS, assert_invalid, saved_calibration, shape, synthetic_calibration, temp_path};

kv_testkit::kv_cache_contract!(matryoshka_uniform_3_5, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        MatryoshkaConfig::new(shape(), "unused", 1, 3, 5)
            .init_with(&synthetic_calibration(shape()), d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(matryoshka_model_allocation_from_file, |d: &Device| -> Box<
    dyn KvCache,
> {
    Box::new(
        MatryoshkaConfig::new(shape(), saved_calibration("matryoshka-contract"), 0, 4, 3)
            .with_allocation(RankAllocation::Model)
            .init(d)
            .expect("init"),
    )
});

fn block(t: usize, seed: u64, device: &Device) -> KvBlock {
    let dims = [2, 2, t, 8];
    KvBlock::contiguous(
        seeded_tensor(dims, seed, 1.0, device),
        seeded_tensor(dims, seed + 1, 1.0, device),
        0,
    )
    .expect("block")
}

fn query(t: usize, device: &Device) -> Query {
    Query::contiguous(seeded_tensor([2, 4, t, 8], 9, 1.0, device), 0).expect("query")
}

#[test]
fn full_rank_reproduces_reference_attention() {
    let device = test_device();
    let s = shape();
    for (allocation, basis) in [
        (RankAllocation::Uniform, Activation::Keys),
        (RankAllocation::Model, Activation::QueryKey),
    ] {
        let mut m = MatryoshkaConfig::new(s, "unused", 0, 8, 8)
            .with_allocation(allocation)
            .with_key_basis(basis)
            .init_with(&synthetic_calibration(s), &device)
            .expect("init");
        assert_eq!(m.key_ranks(), &[8, 8]);
        let mut dense = DenseCacheConfig::new(s).init(&device).expect("dense");
        m.append(block(10, 1, &device)).expect("append");
        dense.append(block(10, 1, &device)).expect("append");
        let q = query(10, &device);
        let a = m.attend(&q, StatsRequest::NONE).expect("attend").output;
        let e = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
        assert_close(&a, &e, 1e-5, 1e-4);
    }
}

#[test]
fn truncating_a_running_cache_equals_a_cache_built_at_the_lower_ranks() {
    let device = test_device();
    let s = shape();
    let cal = synthetic_calibration(s);
    let mut big = MatryoshkaConfig::new(s, "unused", 1, 6, 6)
        .init_with(&cal, &device)
        .expect("init");
    big.append(block(9, 3, &device)).expect("append");
    big.truncate(&[2, 5], &[4, 1]).expect("truncate");
    assert_eq!(
        (big.key_ranks(), big.value_ranks()),
        (&[2, 5][..], &[4, 1][..])
    );
    // A cache at the lower ranks from the start: the same per-head ranks through `truncate`
    // of a fresh cache, before anything is appended.
    let mut small = MatryoshkaConfig::new(s, "unused", 1, 6, 6)
        .init_with(&cal, &device)
        .expect("init");
    small.truncate(&[2, 5], &[4, 1]).expect("truncate");
    small.append(block(9, 3, &device)).expect("append");
    let q = query(9, &device);
    let a = big.attend(&q, StatsRequest::NONE).expect("attend").output;
    let e = small.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_close(&a, &e, 1e-6, 1e-5);
    assert_eq!(big.memory(), small.memory());
    memory_matches_buffers(&big).expect("honest memory");
    assert_eq!(big.memory().key_bytes, 2 * 9 * (2 + 5) * 4);
    assert_eq!(big.memory().value_bytes, 2 * 9 * (4 + 1) * 4);
    // The truncated basis is the leading columns of the full one.
    let full = MatryoshkaConfig::new(s, "unused", 1, 8, 8)
        .init_with(&cal, &device)
        .expect("init");
    let (u8, u2) = (
        to_vec(full.key_basis(0).expect("head 0")),
        to_vec(big.key_basis(0).expect("head 0")),
    );
    for i in 0..8 {
        assert_eq!(&u2[i * 2..i * 2 + 2], &u8[i * 8..i * 8 + 2]);
    }
}

#[test]
fn rank_errors_leave_the_cache_unchanged() {
    let device = test_device();
    let s = shape();
    let mut m = MatryoshkaConfig::new(s, "unused", 0, 4, 4)
        .init_with(&synthetic_calibration(s), &device)
        .expect("init");
    m.append(block(5, 1, &device)).expect("append");
    let q = query(5, &device);
    let before = (
        m.memory(),
        m.attend(&q, StatsRequest::NONE).expect("a").output,
    );
    assert_invalid(m.truncate(&[5, 4], &[4, 4]), "cannot be restored");
    assert_invalid(m.truncate(&[4, 4], &[0, 4]), "head 0");
    assert_invalid(m.truncate(&[4], &[4, 4]), "1 ranks given for 2 KV heads");
    assert_eq!(m.memory(), before.0);
    assert_eq!(m.key_ranks(), &[4, 4]);
    let after = m.attend(&q, StatsRequest::NONE).expect("a").output;
    assert_close(&after, &before.1, 0.0, 0.0);
}

#[test]
fn greedy_allocation_gives_columns_to_the_head_that_needs_them() {
    // Head 0's keys lie on one direction, head 1's spread over all eight: a layer budget of
    // 2 · 4 columns leaves head 0 at 1 and gives head 1 seven.
    let device = test_device();
    let s = KvShape::new(1, 2, 2, 8).expect("shape");
    let n = 64;
    let line = seeded_data(n, 1, 1.0);
    let spread = seeded_data(n * 8, 2, 1.0);
    let mut keys = Vec::with_capacity(2 * n * 8);
    for &c in &line {
        keys.extend((0..8).map(|i| if i == 3 { c } else { 0.0 }));
    }
    keys.extend(
        spread
            .iter()
            .enumerate()
            .map(|(i, x)| x * (1.0 + (i % 8) as f32 * 0.1)),
    );
    let keys = tensor_from(keys, [1, 2, n, 8], &device);
    let mut acc = CovarianceAccumulator::new(LAYERS, s);
    for layer in 0..LAYERS {
        acc.observe(layer, Activation::Keys, &keys).expect("keys");
        acc.observe(layer, Activation::Values, &keys)
            .expect("values");
    }
    let cal = acc.finish("planted", "seeded").expect("finish");
    for allocation in [RankAllocation::Layer, RankAllocation::Model] {
        let cfg = MatryoshkaConfig::new(s, "u", 1, 4, 4).with_allocation(allocation);
        let (rk, rv) = cfg.head_ranks(&cal).expect("ranks");
        assert_eq!(rk, vec![1, 7], "{allocation:?}");
        assert_eq!(rv, vec![1, 7], "{allocation:?}");
    }
    let (rk, _) = MatryoshkaConfig::new(s, "u", 1, 4, 4)
        .head_ranks(&cal)
        .expect("ranks");
    assert_eq!(rk, vec![4, 4]);
    // Model allocation over the real-size synthetic calibration keeps the total budget.
    let cal = synthetic_calibration(shape());
    let total: usize = (0..LAYERS)
        .map(|l| {
            let cfg =
                MatryoshkaConfig::new(shape(), "u", l, 3, 3).with_allocation(RankAllocation::Model);
            cfg.head_ranks(&cal).expect("ranks").0.iter().sum::<usize>()
        })
        .sum();
    assert_eq!(total, LAYERS * 2 * 3);
}

#[test]
fn memory_is_proportional_to_rank() {
    let device = test_device();
    let s = shape();
    let cal = synthetic_calibration(s);
    let t = 12;
    for (rk, rv) in [(1, 1), (3, 6), (8, 8)] {
        let mut m = MatryoshkaConfig::new(s, "unused", 0, rk, rv)
            .init_with(&cal, &device)
            .expect("init");
        m.append(block(t, 4, &device)).expect("append");
        let mem = m.memory();
        assert_eq!(mem.key_bytes, 2 * 2 * t * rk * 4);
        assert_eq!(mem.value_bytes, 2 * 2 * t * rv * 4);
        assert_eq!(mem.metadata_bytes, 2 * t * 4 + 2 * 8 * (rk + rv) * 4);
        assert_eq!(m.bytes_per_token(), 2 * (rk + rv) * 4 + 4);
        memory_matches_buffers(&m).expect("honest memory");
    }
}

#[test]
fn bad_configs_and_artefacts_are_rejected() {
    let device = test_device();
    let s = shape();
    let cal = synthetic_calibration(s);
    assert_invalid(
        MatryoshkaConfig::new(s, "u", 0, 9, 4).init_with(&cal, &device),
        "head_dim 8",
    );
    assert_invalid(
        MatryoshkaConfig::new(s, "u", 0, 4, 4)
            .with_num_layers(3)
            .init_with(&cal, &device),
        "this model has 3",
    );
    let other = KvShape::new(1, 3, 3, 8).expect("shape");
    assert_invalid(
        MatryoshkaConfig::new(other, "u", 0, 4, 4).init_with(&cal, &device),
        "calibrate this model",
    );
    assert_invalid(
        MatryoshkaConfig::new(s, temp_path("missing-matryoshka"), 0, 4, 4).init(&device),
        "kv-eval calibrate",
    );
    let mut acc = CovarianceAccumulator::new(1, s);
    acc.observe(
        0,
        Activation::Values,
        &seeded_tensor([1, 2, 16, 8], 9, 1.0, &device),
    )
    .expect("values");
    assert_invalid(
        MatryoshkaConfig::new(s, "u", 0, 4, 4)
            .init_with(&acc.finish("m", "t").expect("f"), &device),
        "`keys`",
    );
    assert_invalid(
        MatryoshkaConfig::from_params(s, 0, [("rank", "4")]),
        "calibration",
    );
    assert_invalid(
        MatryoshkaConfig::from_params(s, 0, [("calibration", "c"), ("allocation", "x")]),
        "uniform, layer or model",
    );
    assert_invalid(
        MatryoshkaConfig::from_params(s, 0, [("calibration", "c"), ("key_basis", "values")]),
        "keys or query_key",
    );
    assert_invalid(
        MatryoshkaConfig::new(s, "u", 0, 4, 4)
            .with_key_basis(Activation::Values)
            .init_with(&cal, &device),
        "not a key basis",
    );
    let cfg =
        MatryoshkaConfig::from_params(s, 0, [("calibration", "c"), ("key_basis", "query_key")])
            .expect("query_key");
    assert_eq!(cfg.key_basis, Activation::QueryKey);
    let cfg = MatryoshkaConfig::from_params(s, 1, [("calibration", "c")]).expect("defaults");
    assert_eq!(
        (cfg.rank_k, cfg.rank_v, cfg.allocation),
        (3, 3, RankAllocation::Model)
    );
    let cfg = MatryoshkaConfig::from_params(
        s,
        1,
        [
            ("calibration", "c"),
            ("rank_v", "5"),
            ("allocation", "uniform"),
        ],
    )
    .expect("params");
    assert_eq!(
        (cfg.rank_k, cfg.rank_v, cfg.allocation),
        (3, 5, RankAllocation::Uniform)
    );
}
