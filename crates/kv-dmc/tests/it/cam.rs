//! Merge-on-evict through the cache: equal to the dense cache when nothing is evicted, values
//! that stay convex combinations, the hand-computed CaM rule, configs.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvError, KvShape, Query, StatsRequest,
    memory_matches_buffers,
};
use kv_dmc::MergeEvictConfig;
use kv_testkit::{assert_close_slices, seeded_tensor, tensor_from, test_device, to_vec};

fn query(s: KvShape, n: usize, start: u32, seed: u64) -> Query {
    let q = seeded_tensor(
        [s.batch(), s.q_heads(), n, s.head_dim()],
        seed,
        2.0,
        &test_device(),
    );
    Query::contiguous(q, start).expect("query")
}

#[test]
fn budget_at_least_the_length_equals_the_dense_cache() {
    let s = KvShape::new(2, 2, 4, 8).expect("shape");
    let d = test_device();
    let mut cam = MergeEvictConfig::new(s, 2, 10, 4).init(&d).expect("init");
    let mut dense = DenseCacheConfig::new(s).init(&d).expect("init");
    let kv = |n: usize, seed: u64| seeded_tensor([2, 2, n, 8], seed, 1.0, &d);
    let mut steps = vec![(
        KvBlock::contiguous(kv(8, 1), kv(8, 2), 0).expect("b"),
        query(s, 8, 0, 3),
    )];
    for t in 0..4u32 {
        let seed = 10 + 3 * u64::from(t);
        steps.push((
            KvBlock::contiguous(kv(1, seed), kv(1, seed + 1), 8 + t).expect("b"),
            query(s, 1, 8 + t, seed + 2),
        ));
    }
    for (i, (blk, q)) in steps.into_iter().enumerate() {
        cam.append(blk.clone()).expect("append");
        dense.append(blk).expect("append");
        let a = cam.attend(&q, StatsRequest::NONE).expect("attend").output;
        let b = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
        assert_eq!(to_vec(&a), to_vec(&b), "step {i}: attention differs");
        if i == 0 {
            cam.end_prefill().expect("end_prefill");
        }
    }
    let (va, vb) = (cam.view(), dense.view());
    assert_eq!(to_vec(&va.values), to_vec(&vb.values));
    assert_eq!(va.positions, vb.positions);
}

#[test]
fn merged_values_stay_convex_combinations() {
    // Value of token t is the basis vector e_t: a held value is a convex combination of the
    // appended values exactly when its entries are >= 0 and sum to 1, and its support only
    // holds tokens at or before its own position.
    let (n, dim) = (16usize, 16usize);
    let s = KvShape::new(1, 2, 4, dim).expect("shape");
    let d = test_device();
    let mut cam = MergeEvictConfig::new(s, 1, 3, 2).init(&d).expect("init");
    let basis = |t: usize| {
        let mut v = vec![0.0f32; 2 * dim];
        v[t] = 1.0;
        v[dim + t] = 1.0;
        tensor_from(v, [1, 2, 1, dim], &d)
    };
    let keys = seeded_tensor([1, 2, n, dim], 7, 1.0, &d);
    let prefill = 6;
    let vals: Vec<Tensor<4>> = (0..prefill).map(basis).collect();
    cam.append(
        KvBlock::contiguous(
            keys.clone().slice([0..1, 0..2, 0..prefill, 0..dim]),
            Tensor::cat(vals, 2),
            0,
        )
        .expect("b"),
    )
    .expect("append");
    cam.attend(&query(s, prefill, 0, 9), StatsRequest::NONE)
        .expect("attend");
    cam.end_prefill().expect("end_prefill");
    let kh = to_vec(&keys);
    let mut merged_any = false;
    for t in prefill..n {
        let k = keys.clone().slice([0..1, 0..2, t..t + 1, 0..dim]);
        cam.append(KvBlock::contiguous(k, basis(t), t as u32).expect("b"))
            .expect("append");
        cam.attend(&query(s, 1, t as u32, 100 + t as u64), StatsRequest::NONE)
            .expect("attend");
        memory_matches_buffers(&cam).expect("memory");
        let view = cam.view();
        let (vals, ks) = (to_vec(&view.values), to_vec(&view.keys));
        let width = view.keys.dims()[2];
        assert!(width <= 1 + 3 + 1, "held {width} slots");
        for h in 0..2 {
            for j in 0..width {
                let row = &vals[(h * width + j) * dim..(h * width + j + 1) * dim];
                let p = view.positions[h * width + j] as usize;
                assert!(
                    row.iter().all(|&x| x >= -1e-6),
                    "negative weight in {row:?}"
                );
                let sum: f32 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-5, "weights sum to {sum}");
                assert!(
                    row[p + 1..].iter().all(|&x| x == 0.0),
                    "value from the future"
                );
                merged_any |= row[p] < 1.0 - 1e-6;
                // Keys are never merged.
                let kj = &ks[(h * width + j) * dim..(h * width + j + 1) * dim];
                assert_eq!(kj, &kh[(h * n + p) * dim..(h * n + p + 1) * dim]);
            }
        }
        for m in cam.masses() {
            assert!(m.iter().all(|&mu| mu >= 1.0));
        }
    }
    assert!(merged_any, "no value was merged");
}

#[test]
fn hand_computed_cam_rule() {
    // One stream, no sinks, recent 2, merge window 2, a zero query: attention is uniform, so
    // the evicted token's merge weight is p = 1 and each of the two kept tokens gets 1/2.
    let s = KvShape::new(1, 1, 1, 2).expect("shape");
    let d = test_device();
    let mut cam = MergeEvictConfig::new(s, 0, 2, 2).init(&d).expect("init");
    let k = seeded_tensor([1, 1, 3, 2], 3, 1.0, &d);
    let v = tensor_from(vec![3.0, 0.0, 0.0, 3.0, 6.0, 6.0], [1, 1, 3, 2], &d);
    cam.append(KvBlock::contiguous(k, v, 0).expect("b"))
        .expect("append");
    let q = Query::contiguous(Tensor::zeros([1, 1, 1, 2], &d), 2).expect("q");
    cam.attend(&q, StatsRequest::NONE).expect("attend");
    cam.end_prefill().expect("end_prefill");
    let want = [
        (0.0 + 0.5 * 3.0) / 1.5,
        (3.0 + 0.0) / 1.5,
        (6.0 + 0.5 * 3.0) / 1.5,
        6.0 / 1.5,
    ];
    assert_close_slices(&to_vec(&cam.view().values), &want, 1e-6, 1e-6);
    assert_eq!(cam.masses(), vec![vec![1.5, 1.5]]);
    assert_eq!(cam.view().positions, vec![1, 2]);
}

#[test]
fn unobserved_tokens_are_evicted_without_merging() {
    let s = KvShape::new(1, 1, 1, 2).expect("shape");
    let d = test_device();
    let mut cam = MergeEvictConfig::new(s, 1, 2, 2).init(&d).expect("init");
    let v = tensor_from((0..10).map(|x| x as f32).collect(), [1, 1, 5, 2], &d);
    cam.append(KvBlock::contiguous(v.clone(), v, 0).expect("b"))
        .expect("append");
    cam.end_prefill().expect("end_prefill");
    assert_eq!(
        to_vec(&cam.view().values),
        vec![0.0, 1.0, 6.0, 7.0, 8.0, 9.0]
    );
    assert_eq!(cam.view().positions, vec![0, 3, 4]);
    assert_eq!(cam.memory().held_token_slots, 3);
}

#[test]
fn config_errors_are_clear() {
    let s = KvShape::new(1, 1, 1, 2).expect("shape");
    let d = test_device();
    let err = MergeEvictConfig::new(s, 4, 0, 2).init(&d).unwrap_err();
    assert!(matches!(
        err,
        KvError::InvalidConfig {
            field: "recent",
            ..
        }
    ));
    let err = MergeEvictConfig::new(s, 4, 8, 0).init(&d).unwrap_err();
    assert!(matches!(
        err,
        KvError::InvalidConfig {
            field: "merge_window",
            ..
        }
    ));
    let err = MergeEvictConfig::from_params(s, [("sinks", "2")]).unwrap_err();
    assert!(matches!(
        err,
        KvError::InvalidConfig {
            field: "recent",
            ..
        }
    ));
    let err = MergeEvictConfig::from_params(s, [("recent", "8"), ("heavy", "2")]).unwrap_err();
    assert!(err.to_string().contains("accepted: sinks, recent"), "{err}");
    let cfg =
        MergeEvictConfig::from_params(s, [("recent", "8"), ("merge_window", "4")]).expect("params");
    assert_eq!(cfg, MergeEvictConfig::new(s, 4, 8, 4));
    let json = serde_json::to_string(&cfg).expect("json");
    assert_eq!(
        serde_json::from_str::<MergeEvictConfig>(&json).expect("parse"),
        cfg
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]
    /// Any budget, window, prefill length and queries: held values stay convex combinations of
    /// appended values at or before their position, keys stay the appended keys, the budget
    /// holds, and memory matches the buffers.
    #[test]
    fn merges_stay_convex_for_any_budget(
        sinks in 0usize..3,
        recent in 1usize..5,
        window in 1usize..4,
        prefill in 1usize..8,
        seed in 0u64..1000,
    ) {
        let (n, dim) = (12usize, 12usize);
        let s = KvShape::new(1, 1, 2, dim).expect("shape");
        let d = test_device();
        let mut cam = MergeEvictConfig::new(s, sinks, recent, window).init(&d).expect("init");
        let keys = seeded_tensor([1, 1, n, dim], seed, 1.0, &d);
        let eye: Vec<f32> = (0..n * dim)
            .map(|i| if i / dim == i % dim { 1.0 } else { 0.0 })
            .collect();
        let vals = tensor_from(eye, [1, 1, n, dim], &d);
        let part = |t: &Tensor<4>, a: usize, b: usize| {
            t.clone().slice([0..1, 0..1, a..b, 0..dim])
        };
        let blk = |a: usize, b: usize| {
            KvBlock::contiguous(part(&keys, a, b), part(&vals, a, b), a as u32).expect("block")
        };
        cam.append(blk(0, prefill)).expect("append");
        cam.attend(&query(s, prefill, 0, seed + 1), StatsRequest::NONE).expect("attend");
        cam.end_prefill().expect("end_prefill");
        let kh = to_vec(&keys);
        for t in prefill..n {
            cam.append(blk(t, t + 1)).expect("append");
            let q = query(s, 1, t as u32, seed + 2 + t as u64);
            cam.attend(&q, StatsRequest::NONE).expect("attend");
            proptest::prop_assert!(memory_matches_buffers(&cam).is_ok());
            let view = cam.view();
            let width = view.keys.dims()[2];
            proptest::prop_assert!(width <= sinks + recent + 1);
            let (v, k) = (to_vec(&view.values), to_vec(&view.keys));
            for j in 0..width {
                let p = view.positions[j] as usize;
                let row = &v[j * dim..(j + 1) * dim];
                proptest::prop_assert!(row.iter().all(|&x| x >= -1e-6));
                proptest::prop_assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                proptest::prop_assert!(row[p + 1..].iter().all(|&x| x == 0.0));
                proptest::prop_assert_eq!(&k[j * dim..(j + 1) * dim], &kh[p * dim..(p + 1) * dim]);
            }
        }
    }
}
