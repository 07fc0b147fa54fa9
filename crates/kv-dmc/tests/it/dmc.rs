//! DMC through the cache: the catalog's cases (never merge = dense, always merge = ω-weighted
//! mean, the hand-computed case), the proxy and the learned decision, configs and errors.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvError, KvShape, Query, StatsRequest,
    memory_matches_buffers,
};
use kv_dmc::{
    DMC_ARTEFACT_FORMAT, DMC_ARTEFACT_VERSION, Decision, DecisionConfig, DecisionInput,
    DmcArtefact, DmcConfig, LayerDecision, LinearHead, MergeDecision,
};
use kv_testkit::{assert_close_slices, seeded_tensor, tensor_from, test_device, to_vec};
use proptest::prelude::*;

fn block(s: KvShape, n: usize, start: u32, seed: u64) -> KvBlock {
    let d = test_device();
    let kv = [s.batch(), s.kv_heads(), n, s.head_dim()];
    KvBlock::contiguous(
        seeded_tensor(kv, seed, 1.0, &d),
        seeded_tensor(kv, seed + 1, 1.0, &d),
        start,
    )
    .expect("block")
}

fn query(s: KvShape, n: usize, start: u32, seed: u64) -> Query {
    let q = seeded_tensor(
        [s.batch(), s.q_heads(), n, s.head_dim()],
        seed,
        1.0,
        &test_device(),
    );
    Query::contiguous(q, start).expect("query")
}

/// Decisions scripted per position: `merge[p]`, `weight[p]`.
#[derive(Debug, Clone)]
struct Scripted {
    merge: Vec<bool>,
    weight: Vec<f32>,
}

impl MergeDecision for Scripted {
    fn decide(&self, input: &DecisionInput<'_>) -> Decision {
        let p = input.position as usize;
        Decision {
            merge: self.merge[p],
            weight: self.weight[p],
        }
    }
}

fn scripted(s: KvShape, merge: Vec<bool>, weight: Vec<f32>) -> kv_dmc::DmcCache {
    DmcConfig::new(s, DecisionConfig::Never)
        .init_with(&test_device(), Box::new(Scripted { merge, weight }))
}

#[test]
fn never_merge_equals_the_dense_cache_exactly() {
    let s = KvShape::new(2, 2, 6, 8).expect("shape");
    let d = test_device();
    let mut dmc = DmcConfig::new(s, DecisionConfig::Never)
        .init(&d)
        .expect("init");
    let mut dense = DenseCacheConfig::new(s).init(&d).expect("init");
    let mut steps = vec![(block(s, 7, 0, 1), query(s, 7, 0, 2))];
    for t in 0..4u32 {
        steps.push((
            block(s, 1, 7 + t, 10 + u64::from(t)),
            query(s, 1, 7 + t, 20 + u64::from(t)),
        ));
    }
    for (blk, q) in steps {
        dmc.append(blk.clone()).expect("append");
        dense.append(blk).expect("append");
        let a = dmc.attend(&q, StatsRequest::NONE).expect("attend").output;
        let b = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
        assert_eq!(to_vec(&a), to_vec(&b), "attention differs");
        let (va, vb) = (dmc.view(), dense.view());
        assert_eq!(to_vec(&va.keys), to_vec(&vb.keys));
        assert_eq!(to_vec(&va.values), to_vec(&vb.values));
        assert_eq!(va.positions, vb.positions);
    }
    assert!(dmc.masses().iter().all(|m| m.iter().all(|&z| z == 1.0)));
}

#[test]
fn always_merge_keeps_one_slot_holding_the_weighted_mean() {
    let s = KvShape::new(1, 2, 2, 4).expect("shape");
    let weight: Vec<f32> = (0..8).map(|p| 0.25 + 0.5 * p as f32).collect();
    let mut c = scripted(s, vec![true; 8], weight.clone());
    let blocks = [block(s, 5, 0, 3), block(s, 1, 5, 5), block(s, 2, 6, 7)];
    let (mut ks, mut vs) = (Vec::new(), Vec::new());
    for b in &blocks {
        ks.push(b.keys().clone());
        vs.push(b.values().clone());
        c.append(b.clone()).expect("append");
    }
    let (k, v) = (to_vec(&Tensor::cat(ks, 2)), to_vec(&Tensor::cat(vs, 2)));
    assert_eq!(c.lengths().held, vec![1, 1]);
    let total: f32 = weight.iter().sum();
    let view = c.view();
    for h in 0..2 {
        for (got, all) in [(to_vec(&view.keys), &k), (to_vec(&view.values), &v)] {
            let want: Vec<f32> = (0..4)
                .map(|ch| {
                    (0..8)
                        .map(|t| weight[t] * all[(h * 8 + t) * 4 + ch])
                        .sum::<f32>()
                        / total
                })
                .collect();
            assert_close_slices(&got[h * 4..(h + 1) * 4], &want, 1e-5, 1e-5);
        }
        assert!((c.masses()[h][0] - total).abs() < 1e-5);
    }
    assert_eq!(
        c.positions(),
        vec![vec![7], vec![7]],
        "a slot carries its newest position"
    );
}

/// The catalog's hand case extended to three tokens: keys 2, 5, 8 in channel 0 with
/// ω = (0.5, 1.0, 2.0).
fn hand(merge: Vec<bool>, one_by_one: bool) -> kv_dmc::DmcCache {
    let s = KvShape::new(1, 1, 1, 2).expect("shape");
    let d = test_device();
    let mut c = scripted(s, merge, vec![0.5, 1.0, 2.0]);
    let k = tensor_from(vec![2.0, 1.0, 5.0, -1.0, 8.0, 3.0], [1, 1, 3, 2], &d);
    let v = tensor_from(vec![1.0, 0.0, 4.0, 2.0, -2.0, 6.0], [1, 1, 3, 2], &d);
    if one_by_one {
        for t in 0..3 {
            let kt = k.clone().slice([0..1, 0..1, t..t + 1, 0..2]);
            let vt = v.clone().slice([0..1, 0..1, t..t + 1, 0..2]);
            c.append(KvBlock::contiguous(kt, vt, t as u32).expect("block"))
                .expect("append");
        }
    } else {
        c.append(KvBlock::contiguous(k, v, 0).expect("block"))
            .expect("append");
    }
    c
}

#[test]
fn hand_computed_three_tokens() {
    for one_by_one in [false, true] {
        // append, merge, append: slots (0.5·2 + 1·5)/1.5 = 4 and 8.
        let c = hand(vec![false, true, false], one_by_one);
        let view = c.view();
        assert_close_slices(
            &to_vec(&view.keys),
            &[4.0, -1.0 / 3.0, 8.0, 3.0],
            1e-6,
            1e-6,
        );
        assert_close_slices(
            &to_vec(&view.values),
            &[3.0, 4.0 / 3.0, -2.0, 6.0],
            1e-6,
            1e-6,
        );
        assert_eq!(c.masses(), vec![vec![1.5, 2.0]]);
        assert_eq!(c.positions(), vec![vec![1, 2]]);
        // append, merge, merge: (1.5·4 + 2·8)/3.5 = 22/3.5.
        let c = hand(vec![false, true, true], one_by_one);
        let view = c.view();
        let k1 = (1.5 * (-1.0 / 3.0) + 2.0 * 3.0) / 3.5;
        assert_close_slices(&to_vec(&view.keys), &[22.0 / 3.5, k1], 1e-6, 1e-6);
        let v = [(0.5 + 4.0 - 4.0) / 3.5, (2.0 + 12.0) / 3.5];
        assert_close_slices(&to_vec(&view.values), &v, 1e-6, 1e-6);
        assert_eq!(c.masses(), vec![vec![3.5]]);
        assert_eq!(c.positions(), vec![vec![2]]);
        assert_eq!(c.lengths().held, vec![1]);
        assert_eq!(c.lengths().logical, vec![3]);
    }
}

#[test]
fn a_query_inside_a_run_sees_only_earlier_slots() {
    // Tokens 1 and 2 merge into one slot at position 2: the query at 1 sees slot 0 only.
    let s = KvShape::new(1, 1, 1, 2).expect("shape");
    let mut c = scripted(s, vec![false, false, true], vec![1.0; 3]);
    let d = test_device();
    let k = tensor_from(vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0], [1, 1, 3, 2], &d);
    let v = tensor_from(vec![10.0, 0.0, 0.0, 20.0, 4.0, 4.0], [1, 1, 3, 2], &d);
    c.append(KvBlock::contiguous(k, v, 0).expect("block"))
        .expect("append");
    assert_eq!(c.positions(), vec![vec![0, 2]]);
    let q = Query::contiguous(tensor_from(vec![0.0; 6], [1, 1, 3, 2], &d), 0).expect("q");
    let out = to_vec(&c.attend(&q, StatsRequest::NONE).expect("attend").output);
    // Position 0 and 1 see slot 0 only; position 2 sees both slots (uniform, zero query).
    assert_close_slices(&out, &[10.0, 0.0, 10.0, 0.0, 6.0, 6.0], 1e-6, 1e-6);
}

#[test]
fn similarity_proxy_merges_aligned_keys_and_frees_memory() {
    let s = KvShape::new(1, 1, 1, 4).expect("shape");
    let d = test_device();
    let mut c = DmcConfig::new(
        s,
        DecisionConfig::Similarity {
            threshold: 0.9,
            value_threshold: None,
        },
    )
    .init(&d)
    .expect("init");
    // 0: e0; 1: 2·e0 (cos 1, merge); 2: e1 (cos 0, append); 3: e1 + 0.1 e2 (merge).
    let k = tensor_from(
        vec![
            1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.1, 0.0,
        ],
        [1, 1, 4, 4],
        &d,
    );
    c.append(KvBlock::contiguous(k.clone(), k, 0).expect("block"))
        .expect("append");
    assert_eq!(c.lengths().held, vec![2]);
    assert_eq!(c.masses(), vec![vec![2.0, 2.0]]);
    assert_close_slices(
        &to_vec(&c.view().keys),
        &[1.5, 0.0, 0.0, 0.0, 0.0, 1.0, 0.05, 0.0],
        1e-6,
        1e-6,
    );
    memory_matches_buffers(&c).expect("memory");
    let m = c.memory();
    assert_eq!(m.held_token_slots, 2);
    assert_eq!(m.logical_tokens, 4);
}

#[test]
fn learned_decision_reads_alpha_and_omega_from_the_key() {
    let s = KvShape::new(1, 1, 1, 2).expect("shape");
    let d = test_device();
    let layer = LayerDecision {
        alpha: vec![LinearHead::channel(2, 0)],
        omega: vec![LinearHead::channel(2, 1)],
    };
    let mut c = DmcConfig::new(s, DecisionConfig::Learned { layer })
        .init(&d)
        .expect("init");
    // Token 1 has k[0] = 3 > 0: merge, ω = σ(k[1]).
    let k = tensor_from(vec![-1.0, 0.0, 3.0, 2.0], [1, 1, 2, 2], &d);
    c.append(KvBlock::contiguous(k.clone(), k, 0).expect("block"))
        .expect("append");
    let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
    let (w0, w1) = (sig(0.0), sig(2.0));
    assert_eq!(c.lengths().held, vec![1]);
    assert!((c.masses()[0][0] - (w0 + w1)).abs() < 1e-6);
    let want = [(-w0 + w1 * 3.0) / (w0 + w1), (w1 * 2.0) / (w0 + w1)];
    assert_close_slices(&to_vec(&c.view().keys), &want, 1e-6, 1e-6);
}

#[test]
fn bad_weights_leave_the_cache_unchanged() {
    let s = KvShape::new(1, 1, 1, 4).expect("shape");
    let mut c = scripted(s, vec![false, true, true, true], vec![1.0, 1.0, 0.0, 1.0]);
    c.append(block(s, 2, 0, 1)).expect("append");
    let before = (to_vec(&c.view().keys), c.masses(), c.lengths());
    let err = c.append(block(s, 2, 2, 3)).unwrap_err();
    assert!(
        matches!(
            err,
            KvError::InvalidConfig {
                field: "decision",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!((to_vec(&c.view().keys), c.masses(), c.lengths()), before);
}

#[test]
fn config_errors_are_clear() {
    let s = KvShape::new(1, 2, 2, 4).expect("shape");
    let d = test_device();
    let err = DmcConfig::new(
        s,
        DecisionConfig::Similarity {
            threshold: 1.5,
            value_threshold: None,
        },
    )
    .init(&d)
    .unwrap_err();
    assert!(matches!(
        err,
        KvError::InvalidConfig {
            field: "threshold",
            ..
        }
    ));
    let short = LayerDecision {
        alpha: vec![LinearHead::channel(4, 0)],
        omega: vec![LinearHead::channel(4, 0)],
    };
    let err = DmcConfig::new(s, DecisionConfig::Learned { layer: short })
        .init(&d)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("1 alpha heads for a layer of 2 KV heads"),
        "{err}"
    );
    let none = |_: &str| -> kv_core::Result<LayerDecision> { unreachable!("no artefact") };
    let err = DmcConfig::from_params(s, [("decision", "learned")], none).unwrap_err();
    assert!(matches!(
        err,
        KvError::InvalidConfig {
            field: "artefact",
            ..
        }
    ));
    let err = DmcConfig::from_params(s, [("threshold", "x")], none).unwrap_err();
    assert!(matches!(
        err,
        KvError::InvalidConfig {
            field: "threshold",
            ..
        }
    ));
    let err =
        DmcConfig::from_params(s, [("decision", "never"), ("threshold", "0.5")], none).unwrap_err();
    assert!(matches!(
        err,
        KvError::InvalidConfig {
            field: "threshold",
            ..
        }
    ));
    let err = DmcConfig::from_params(s, [("budget", "3")], none).unwrap_err();
    assert!(
        err.to_string().contains("accepted: decision, threshold"),
        "{err}"
    );
    let cfg =
        DmcConfig::from_params(s, [("threshold", "0.8"), ("dtype", "f16")], none).expect("params");
    assert_eq!(
        cfg.decision,
        DecisionConfig::Similarity {
            threshold: 0.8,
            value_threshold: None
        }
    );
    let json = serde_json::to_string(&cfg).expect("json");
    assert_eq!(
        serde_json::from_str::<DmcConfig>(&json).expect("parse"),
        cfg
    );
}

#[test]
fn artefact_is_versioned_and_checked_per_layer() {
    let layer = LayerDecision {
        alpha: vec![LinearHead::channel(4, 0); 2],
        omega: vec![LinearHead::channel(4, 1); 2],
    };
    let mut a = DmcArtefact {
        format: DMC_ARTEFACT_FORMAT.into(),
        version: DMC_ARTEFACT_VERSION,
        source: "test".into(),
        layers: vec![layer.clone()],
    };
    let json = serde_json::to_string(&a).expect("json");
    let back: DmcArtefact = serde_json::from_str(&json).expect("parse");
    assert_eq!(back.layer(0, 2, 4).expect("layer 0"), layer);
    assert!(
        back.layer(1, 2, 4)
            .unwrap_err()
            .to_string()
            .contains("holds 1 layers")
    );
    assert!(
        back.layer(0, 2, 8)
            .unwrap_err()
            .to_string()
            .contains("head_dim is 8")
    );
    a.version = 2;
    assert!(
        a.layer(0, 2, 4)
            .unwrap_err()
            .to_string()
            .contains("version 2")
    );
    let s = KvShape::new(1, 2, 2, 4).expect("shape");
    let cfg = DmcConfig::from_params(s, [("artefact", "x.json")], |p| {
        assert_eq!(p, "x.json");
        back.layer(0, 2, 4)
    })
    .expect("params");
    assert!(matches!(cfg.decision, DecisionConfig::Learned { .. }));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    /// Any decisions, any chunking: every slot is the ω-weighted mean of its run.
    #[test]
    fn slots_are_weighted_means_of_their_runs(
        merge in proptest::collection::vec(any::<bool>(), 10),
        weight in proptest::collection::vec(0.1f32..3.0, 10),
        cut in 1usize..10,
        seed in 0u64..1000,
    ) {
        let s = KvShape::new(1, 1, 1, 3).expect("shape");
        let d = test_device();
        let mut c = scripted(s, merge.clone(), weight.clone());
        let k = seeded_tensor([1, 1, 10, 3], seed, 1.0, &d);
        let v = seeded_tensor([1, 1, 10, 3], seed + 1, 1.0, &d);
        for (a, b) in [(0, cut), (cut, 10)] {
            let kb = k.clone().slice([0..1, 0..1, a..b, 0..3]);
            let vb = v.clone().slice([0..1, 0..1, a..b, 0..3]);
            c.append(KvBlock::contiguous(kb, vb, a as u32).expect("block")).expect("append");
        }
        // Runs: a new run at t = 0 and wherever merge[t] is false.
        let mut runs: Vec<Vec<usize>> = Vec::new();
        for t in 0..10 {
            if t == 0 || !merge[t] {
                runs.push(vec![t]);
            } else {
                runs.last_mut().expect("run").push(t);
            }
        }
        let (kh, vh) = (to_vec(&k), to_vec(&v));
        let mean = |x: &[f32], run: &[usize]| -> Vec<f32> {
            let z: f32 = run.iter().map(|&t| weight[t]).sum();
            (0..3)
                .map(|ch| run.iter().map(|&t| weight[t] * x[t * 3 + ch]).sum::<f32>() / z)
                .collect()
        };
        let want_k: Vec<f32> = runs.iter().flat_map(|r| mean(&kh, r)).collect();
        let want_v: Vec<f32> = runs.iter().flat_map(|r| mean(&vh, r)).collect();
        let view = c.view();
        assert_close_slices(&to_vec(&view.keys), &want_k, 1e-5, 1e-4);
        assert_close_slices(&to_vec(&view.values), &want_v, 1e-5, 1e-4);
        let pos: Vec<u32> = runs.iter().map(|r| *r.last().expect("run") as u32).collect();
        prop_assert_eq!(c.positions(), vec![pos]);
        prop_assert!(memory_matches_buffers(&c).is_ok());
    }
}

#[test]
fn padding_tokens_are_neither_stored_nor_merged() {
    let s = KvShape::new(2, 1, 1, 2).expect("shape");
    let d = test_device();
    let mut c = DmcConfig::new(s, DecisionConfig::Always)
        .init(&d)
        .expect("init");
    let k = tensor_from(
        vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 9.0, 9.0, 4.0, 4.0, 6.0, 6.0],
        [2, 1, 3, 2],
        &d,
    );
    let pad = kv_core::PAD;
    let blk = KvBlock::new(k.clone(), k, vec![0, 1, 2, pad, 0, 1]).expect("block");
    c.append(blk).expect("append");
    assert_eq!(c.lengths().held, vec![1, 1]);
    assert_eq!(c.lengths().logical, vec![3, 2]);
    assert_eq!(c.positions(), vec![vec![2], vec![1]]);
    assert_eq!(c.masses(), vec![vec![3.0], vec![2.0]]);
    assert_close_slices(&to_vec(&c.view().keys), &[2.0, 2.0, 5.0, 5.0], 1e-6, 1e-6);
}

#[test]
fn proportional_attention_makes_merging_duplicates_lossless() {
    // Tokens a, a, a, b, b: the proxy merges the duplicates into two slots of mass 3 and 2;
    // with `+ ln z` every query sees exactly the dense attention over the five tokens.
    let s = KvShape::new(1, 1, 2, 4).expect("shape");
    let d = test_device();
    let a = [0.3, -1.0, 0.5, 2.0];
    let b = [1.0, 0.2, -0.7, 0.1];
    let (va, vb) = ([1.0, 2.0, 3.0, 4.0], [-4.0, 0.5, 2.0, 1.0]);
    let keys: Vec<f32> = [a, a, a, b, b].concat();
    let vals: Vec<f32> = [va, va, va, vb, vb].concat();
    let blk = KvBlock::contiguous(
        tensor_from(keys, [1, 1, 5, 4], &d),
        tensor_from(vals, [1, 1, 5, 4], &d),
        0,
    )
    .expect("block");
    let mut merged = DmcConfig::new(
        s,
        DecisionConfig::Similarity {
            threshold: 0.999,
            value_threshold: None,
        },
    )
    .with_proportional(true)
    .init(&d)
    .expect("init");
    let mut dense = DenseCacheConfig::new(s).init(&d).expect("init");
    merged.append(blk.clone()).expect("append");
    dense.append(blk).expect("append");
    assert_eq!(merged.masses(), vec![vec![3.0, 2.0]]);
    let q = Query::new(seeded_tensor([1, 2, 2, 4], 5, 2.0, &d), vec![4, 4]).expect("q");
    let got = merged
        .attend(&q, StatsRequest::NONE)
        .expect("attend")
        .output;
    let want = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_close_slices(&to_vec(&got), &to_vec(&want), 1e-5, 1e-5);
    // Without it, the merged slots weigh like single tokens.
    let mut plain = DmcConfig::new(
        s,
        DecisionConfig::Similarity {
            threshold: 0.999,
            value_threshold: None,
        },
    )
    .init(&d)
    .expect("init");
    let blk = KvBlock::contiguous(
        tensor_from([a, a, a, b, b].concat(), [1, 1, 5, 4], &d),
        tensor_from([va, va, va, vb, vb].concat(), [1, 1, 5, 4], &d),
        0,
    )
    .expect("block");
    plain.append(blk).expect("append");
    let off = plain.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert!(kv_testkit::max_diff(&off, &want) > 1e-3);
}

#[test]
fn value_threshold_also_requires_similar_values() {
    let s = KvShape::new(1, 1, 1, 2).expect("shape");
    let d = test_device();
    let decision = DecisionConfig::Similarity {
        threshold: 0.9,
        value_threshold: Some(0.5),
    };
    let mut c = DmcConfig::new(s, decision).init(&d).expect("init");
    // Same key throughout; values: e0, e0 (merge), e1 (cos 0 with the slot: append), e1 + e0/10.
    let k = tensor_from(
        vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        [1, 1, 4, 2],
        &d,
    );
    let v = tensor_from(
        vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.1, 1.0],
        [1, 1, 4, 2],
        &d,
    );
    c.append(KvBlock::contiguous(k, v, 0).expect("block"))
        .expect("append");
    assert_eq!(c.masses(), vec![vec![2.0, 2.0]]);
    assert_eq!(c.positions(), vec![vec![1, 3]]);
    let none = |_: &str| -> kv_core::Result<LayerDecision> { unreachable!("no artefact") };
    let cfg = DmcConfig::from_params(s, [("value_threshold", "0.5")], none).expect("params");
    assert_eq!(
        cfg.decision,
        DecisionConfig::Similarity {
            threshold: kv_dmc::DEFAULT_THRESHOLD,
            value_threshold: Some(0.5)
        }
    );
    let err = DmcConfig::new(
        s,
        DecisionConfig::Similarity {
            threshold: 0.9,
            value_threshold: Some(-2.0),
        },
    )
    .init(&d)
    .unwrap_err();
    assert!(matches!(
        err,
        KvError::InvalidConfig {
            field: "value_threshold",
            ..
        }
    ));
}
