//! LESS: the sparse policy under the state, the state's sums, the mixed attention, training,
//! memory, errors and the artefact.

use burn::prelude::*;
use kv_core::{
    KeyPositions, KvBlock, KvCache, KvError, KvShape, Query, StatsRequest, memory_matches_buffers,
    reference_attention,
};
use kv_dmc::{
    LESS_ARTEFACT_FORMAT, LESS_ARTEFACT_VERSION, LessArtefact, LessCache, LessConfig, LessMaps,
    LessPolicy, LessSample, LessTrainingRecord, TrainOptions, loss, loss_and_grad, output_metric,
    train_layer,
};
use kv_testkit::{assert_close, assert_close_slices, seeded_tensor, test_device, to_vec};

fn shape() -> KvShape {
    KvShape::new(1, 2, 4, 8).expect("valid")
}

/// Maps whose state is far from negligible (key scales 0.5), so that a wrong fold shows.
fn strong_maps(shape: &KvShape, seed: u64) -> LessMaps {
    let mut m = LessMaps::init(shape, 6, 3, seed);
    for k in &mut m.key {
        k.scale.fill(0.5);
        k.scale2.fill(0.3);
    }
    m
}

fn less(policy: LessPolicy, maps: LessMaps, d: &Device) -> LessCache {
    LessConfig::new(shape(), policy, maps)
        .init(d)
        .expect("init")
}

fn block(n: usize, start: u32, seed: u64, d: &Device) -> KvBlock {
    let s = shape();
    let dims = [s.batch(), s.kv_heads(), n, s.head_dim()];
    KvBlock::contiguous(
        seeded_tensor(dims, seed, 1.0, d),
        seeded_tensor(dims, seed + 1, 1.0, d),
        start,
    )
    .expect("block")
}

fn query(n: usize, start: u32, seed: u64, d: &Device) -> Query {
    let s = shape();
    Query::contiguous(
        seeded_tensor([s.batch(), s.q_heads(), n, s.head_dim()], seed, 1.5, d),
        start,
    )
    .expect("query")
}

kv_testkit::kv_cache_contract!(less_h2o_zero_maps, |d: &Device| -> Box<dyn KvCache> {
    Box::new(less(
        LessPolicy::H2o {
            heavy: 2,
            recent: 2,
        },
        LessMaps::zeros(&shape(), 1, 1),
        d,
    ))
});
kv_testkit::kv_cache_contract!(less_lambda_zero_maps, |d: &Device| -> Box<dyn KvCache> {
    Box::new(less(
        LessPolicy::Lambda {
            sinks: 1,
            recent: 3,
        },
        LessMaps::zeros(&shape(), 1, 1),
        d,
    ))
});
// With room for every token nothing is evicted, the state stays empty and `attend` is plain
// attention over `view()`, whatever the maps.
kv_testkit::kv_cache_contract!(less_roomy_strong_maps, |d: &Device| -> Box<dyn KvCache> {
    Box::new(less(
        LessPolicy::H2o {
            heavy: 32,
            recent: 32,
        },
        strong_maps(&shape(), 3),
        d,
    ))
});

#[test]
fn budget_at_least_length_equals_reference_attention() {
    let d = test_device();
    let mut cache = less(
        LessPolicy::H2o {
            heavy: 10,
            recent: 10,
        },
        strong_maps(&shape(), 1),
        &d,
    );
    let s = shape();
    let dims = |n| [1, s.kv_heads(), n, s.head_dim()];
    let k = seeded_tensor(dims(20), 5, 1.0, &d);
    let v = seeded_tensor(dims(20), 6, 1.0, &d);
    let q = seeded_tensor([1, s.q_heads(), 20, s.head_dim()], 7, 1.5, &d);
    let part = |t: &Tensor<4>, a: usize, z: usize| {
        let [b, h, _, dd] = t.dims();
        t.clone().slice([0..b, 0..h, a..z, 0..dd])
    };
    let pos: Vec<u32> = (0..20).collect();
    let (want, _) = reference_attention(
        q.clone(),
        k.clone(),
        v.clone(),
        &pos,
        KeyPositions::PerSequence(&pos),
        None,
        StatsRequest::NONE,
    );
    cache
        .append(KvBlock::contiguous(part(&k, 0, 12), part(&v, 0, 12), 0).expect("block"))
        .expect("append");
    let got = cache
        .attend(
            &Query::contiguous(part(&q, 0, 12), 0).expect("q"),
            StatsRequest::NONE,
        )
        .expect("attend")
        .output;
    assert_close(&got, &part(&want, 0, 12), 1e-5, 1e-5);
    cache.end_prefill().expect("end_prefill");
    for t in 12..20 {
        cache
            .append(
                KvBlock::contiguous(part(&k, t, t + 1), part(&v, t, t + 1), t as u32).expect("b"),
            )
            .expect("append");
        let got = cache
            .attend(
                &Query::contiguous(part(&q, t, t + 1), t as u32).expect("q"),
                StatsRequest::NONE,
            )
            .expect("attend")
            .output;
        assert_close(&got, &part(&want, t, t + 1), 1e-5, 1e-5);
    }
    for h in 0..s.kv_heads() {
        let (hs, z, n) = cache.state(0, h);
        assert_eq!(n, 0, "nothing evicted");
        assert!(hs.iter().chain(z).all(|&x| x == 0.0));
    }
}

#[test]
fn zero_maps_equal_plain_h2o() {
    let d = test_device();
    let (heavy, recent) = (3, 2);
    let mut ours = less(
        LessPolicy::H2o { heavy, recent },
        LessMaps::zeros(&shape(), 1, 1),
        &d,
    );
    let mut h2o = kv_evict::H2oConfig::new(
        shape(),
        kv_evict::TokenBudget::Tokens(heavy),
        kv_evict::TokenBudget::Tokens(recent),
    )
    .init(&d)
    .expect("h2o");
    let run = |c: &mut dyn KvCache, b: KvBlock, q: &Query| {
        c.append(b).expect("append");
        c.attend(q, StatsRequest::NONE).expect("attend").output
    };
    // (The backend's threaded reductions may differ in the last ulp between runs.)
    let a = run(&mut ours, block(9, 0, 1, &d), &query(9, 0, 2, &d));
    let b = run(&mut h2o, block(9, 0, 1, &d), &query(9, 0, 2, &d));
    assert_close(&a, &b, 1e-6, 1e-6);
    ours.end_prefill().expect("end");
    h2o.end_prefill().expect("end");
    for t in 9..20u32 {
        let seed = u64::from(t) * 7;
        let a = run(&mut ours, block(1, t, seed, &d), &query(1, t, seed + 3, &d));
        let b = run(&mut h2o, block(1, t, seed, &d), &query(1, t, seed + 3, &d));
        assert_close(&a, &b, 1e-6, 1e-6);
        // The same tokens with the same scores (kv-evict may store its rows in another order).
        let by_position = |c: &dyn KvCache, scores: &[Vec<f32>]| {
            let v = c.view();
            let width = v.keys.dims()[2];
            scores
                .iter()
                .enumerate()
                .map(|(si, sc)| {
                    let mut rows: Vec<(u32, f32)> = v.positions[si * width..(si + 1) * width]
                        .iter()
                        .copied()
                        .zip(sc.iter().copied())
                        .collect();
                    rows.sort_by_key(|r| r.0);
                    rows
                })
                .collect::<Vec<_>>()
        };
        let (x, y) = (
            by_position(&ours, ours.scores()),
            by_position(&h2o, h2o.scores()),
        );
        for (x, y) in x.iter().zip(&y) {
            let (px, sx): (Vec<u32>, Vec<f32>) = x.iter().copied().unzip();
            let (py, sy): (Vec<u32>, Vec<f32>) = y.iter().copied().unzip();
            assert_eq!(px, py, "step {t}");
            assert_close_slices(&sx, &sy, 1e-6, 1e-6);
        }
    }
    let (hs, z, n) = ours.state(0, 0);
    assert!(n > 0, "tokens were evicted");
    assert!(hs.iter().chain(z).all(|&x| x == 0.0), "ψ ≡ 0 folds nothing");
}

#[test]
fn lambda_keeps_sinks_and_recent() {
    let d = test_device();
    let mut cache = less(
        LessPolicy::Lambda {
            sinks: 2,
            recent: 3,
        },
        LessMaps::zeros(&shape(), 1, 1),
        &d,
    );
    cache.append(block(8, 0, 1, &d)).expect("append");
    cache.end_prefill().expect("end");
    assert_eq!(cache.positions(0, 1), vec![0, 1, 5, 6, 7]);
    // The budget is met before each new token is stored: the query sees budget + 1.
    cache.append(block(1, 8, 3, &d)).expect("append");
    assert_eq!(cache.positions(0, 0), vec![0, 1, 5, 6, 7, 8]);
    assert_eq!(cache.state(0, 0).2, 3, "positions 2, 3, 4 folded");
    cache.append(block(1, 9, 5, &d)).expect("append");
    assert_eq!(cache.positions(0, 0), vec![0, 1, 6, 7, 8, 9]);
    assert_eq!(cache.state(0, 0).2, 4, "then 5");
}

/// `H = Σ ψ(k) vᵀ`, `z = Σ ψ(k)` over the evicted tokens, recomputed from scratch.
#[test]
fn state_equals_hand_computed_sums() {
    let d = test_device();
    let s = shape();
    let maps = strong_maps(&s, 9);
    let mut cache = less(
        LessPolicy::Lambda {
            sinks: 1,
            recent: 2,
        },
        maps.clone(),
        &d,
    );
    let dims = [1, s.kv_heads(), 13, s.head_dim()];
    let k = seeded_tensor(dims, 21, 1.0, &d);
    let v = seeded_tensor(dims, 22, 1.0, &d);
    let (kh, vh) = (to_vec(&k), to_vec(&v));
    let part = |t: &Tensor<4>, a: usize, z: usize| t.clone().slice([0..1, 0..2, a..z, 0..8]);
    cache
        .append(KvBlock::contiguous(part(&k, 0, 5), part(&v, 0, 5), 0).expect("b"))
        .expect("append");
    cache.end_prefill().expect("end");
    for t in 5..13 {
        cache
            .append(
                KvBlock::contiguous(part(&k, t, t + 1), part(&v, t, t + 1), t as u32).expect("b"),
            )
            .expect("append");
    }
    // Held: sink 0 and the last two before 12 plus 12 itself: 0, 10, 11, 12; folded 1..=9.
    assert_eq!(cache.positions(0, 0), vec![0, 10, 11, 12]);
    for h in 0..2 {
        let (hs, z, n) = cache.state(0, h);
        assert_eq!(n, 9);
        let mut want_h = vec![0.0f32; 3 * 8];
        let mut want_z = vec![0.0f32; 3];
        for j in 1..=9 {
            let row = (h * 13 + j) * 8;
            let psi = maps.psi(h, &kh[row..row + 8]);
            for r in 0..3 {
                want_z[r] += psi[r];
                for c in 0..8 {
                    want_h[r * 8 + c] += psi[r] * vh[row + c];
                }
            }
        }
        assert!(want_z.iter().all(|&x| x > 0.0));
        assert_close_slices(z, &want_z, 1e-5, 1e-5);
        assert_close_slices(hs, &want_h, 1e-5, 1e-5);
    }
}

/// `ψ` by hand: rank 1, hidden 1, reading channel 0 with unit weights, `s = 1`, no interaction:
/// `ψ(k) = |gelu(gelu(k₀))|`; gelu(gelu(1)) = 0.673010664 and gelu(gelu(2)) = 1.905009706.
#[test]
fn psi_by_hand() {
    let s = KvShape::new(1, 1, 1, 2).expect("valid");
    let mut maps = LessMaps::zeros(&s, 1, 1);
    maps.key[0].mlp.w1 = vec![1.0, 0.0];
    maps.key[0].mlp.w2 = vec![1.0];
    maps.key[0].scale = vec![1.0];
    assert!((maps.psi(0, &[1.0, 5.0])[0] - 0.673_010_7).abs() < 1e-6);
    assert!((maps.psi(0, &[2.0, -5.0])[0] - 1.905_009_7).abs() < 1e-6);
    maps.key[0].scale = vec![-2.0];
    assert!(
        (maps.psi(0, &[1.0, 0.0])[0] - 2.0 * 0.673_010_7).abs() < 1e-6,
        "|s| is used"
    );
}

/// The output after evictions is `(Σ_kept e^{q·k/√d} v + φ(q)ᵀH) / (Σ_kept e^{q·k/√d} + φ(q)ᵀz)`.
#[test]
fn attend_mixes_state_by_the_formula() {
    let d = test_device();
    let s = shape();
    let maps = strong_maps(&s, 4);
    let mut cache = less(
        LessPolicy::H2o {
            heavy: 2,
            recent: 2,
        },
        maps.clone(),
        &d,
    );
    cache.append(block(8, 0, 31, &d)).expect("append");
    cache
        .attend(&query(8, 0, 32, &d), StatsRequest::NONE)
        .expect("attend");
    cache.end_prefill().expect("end");
    cache.append(block(1, 8, 33, &d)).expect("append");
    let q = query(1, 8, 34, &d);
    let got = to_vec(&cache.attend(&q, StatsRequest::NONE).expect("attend").output);
    let view = cache.view();
    let (kv, vv) = (to_vec(&view.keys), to_vec(&view.values));
    let qh = to_vec(q.tensor());
    let width = view.keys.dims()[2];
    let dim = s.head_dim();
    for hq in 0..s.q_heads() {
        let h = hq / s.group();
        let (hs, z, n) = cache.state(0, h);
        assert_eq!(n, 4);
        let qrow = &qh[hq * dim..(hq + 1) * dim];
        let mut num = vec![0.0f64; dim];
        let mut den = 0.0f64;
        for j in 0..width {
            let base = (h * width + j) * dim;
            let score: f64 = (0..dim)
                .map(|c| f64::from(qrow[c]) * f64::from(kv[base + c]))
                .sum::<f64>()
                / (dim as f64).sqrt();
            let e = score.exp();
            den += e;
            for c in 0..dim {
                num[c] += e * f64::from(vv[base + c]);
            }
        }
        let phi = maps.phi(hq, qrow);
        for r in 0..3 {
            den += f64::from(phi[r]) * f64::from(z[r]);
            for c in 0..dim {
                num[c] += f64::from(phi[r]) * f64::from(hs[r * dim + c]);
            }
        }
        let want: Vec<f32> = num.iter().map(|x| (x / den) as f32).collect();
        assert_close_slices(&got[hq * dim..(hq + 1) * dim], &want, 1e-5, 1e-4);
    }
    // The state changed the output: the sparse policy alone differs.
    let sparse = to_vec(&view.attend_reference(&q, StatsRequest::NONE).output);
    let gap = got
        .iter()
        .zip(&sparse)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(gap > 1e-3, "state had no effect ({gap})");
    // attend_lse agrees with attend.
    let mut again = cache.clone();
    let (o, _) = again.attend_lse(&q).expect("attend_lse");
    assert_close_slices(&to_vec(&o), &got, 1e-5, 1e-5);
}

#[test]
fn memory_equals_held_buffers_with_a_state() {
    let d = test_device();
    let mut cache = less(
        LessPolicy::H2o {
            heavy: 2,
            recent: 2,
        },
        strong_maps(&shape(), 5),
        &d,
    );
    cache.append(block(10, 0, 1, &d)).expect("append");
    cache
        .attend(&query(10, 0, 2, &d), StatsRequest::NONE)
        .expect("attend");
    cache.end_prefill().expect("end");
    cache.append(block(1, 10, 3, &d)).expect("append");
    memory_matches_buffers(&cache).expect("memory matches buffers");
    let m = cache.memory();
    let maps = strong_maps(&shape(), 5);
    // Kept rows (4 + 1 per head, buffers of 64 rows after the append), the state (3x8 + 3 per
    // head), the scores (5 per head) and the maps.
    assert_eq!(maps.bytes(), 4 * maps.num_params());
    assert_eq!(m.held_token_slots, 10);
    let state = 2 * (3 * 8 + 3) * 4;
    assert_eq!(
        m.stored_bytes(),
        2 * 2 * 64 * 8 * 4 + 2 * 5 * 4 + state + 2 * 5 * 4 + maps.bytes()
    );
}

#[test]
fn bad_block_after_evictions_leaves_everything_unchanged() {
    let d = test_device();
    let mut cache = less(
        LessPolicy::Lambda {
            sinks: 1,
            recent: 2,
        },
        strong_maps(&shape(), 6),
        &d,
    );
    cache.append(block(6, 0, 1, &d)).expect("append");
    cache.end_prefill().expect("end");
    // A pending eviction (4 held after this append) must not happen on a bad block.
    cache.append(block(1, 6, 2, &d)).expect("append");
    let before = (
        cache.state(0, 0).0.to_vec(),
        cache.state(0, 0).2,
        cache.lengths(),
        to_vec(&cache.view().keys),
    );
    let k = seeded_tensor([1, 2, 1, 8], 3, 1.0, &d).slice_fill([0..1, 0..1, 0..1, 0..1], f32::NAN);
    let err = cache.append(KvBlock::contiguous(k.clone(), k, 7).expect("block"));
    assert!(matches!(err, Err(KvError::NonFinite { .. })), "{err:?}");
    let err = cache.append(block(1, 3, 4, &d));
    assert!(matches!(err, Err(KvError::BadPositions { .. })), "{err:?}");
    let after = (
        cache.state(0, 0).0.to_vec(),
        cache.state(0, 0).2,
        cache.lengths(),
        to_vec(&cache.view().keys),
    );
    assert_eq!(before, after);
}

#[test]
fn config_errors() {
    let s = shape();
    let d = test_device();
    let p = |kv: &[(&'static str, &'static str)]| {
        LessConfig::from_params(s, kv.iter().copied(), |_| {
            Ok(LessMaps::zeros(&shape(), 2, 2))
        })
    };
    let field = |r: Result<LessConfig, KvError>| match r {
        Err(KvError::InvalidConfig { field, .. }) => field,
        other => panic!("expected an InvalidConfig, got {other:?}"),
    };
    assert_eq!(field(p(&[("heavy", "4"), ("maps", "zero")])), "recent");
    assert_eq!(field(p(&[("heavy", "4"), ("recent", "4")])), "artefact");
    assert_eq!(
        field(p(&[
            ("heavy", "4"),
            ("recent", "4"),
            ("maps", "zero"),
            ("artefact", "x")
        ])),
        "maps"
    );
    assert_eq!(
        field(p(&[
            ("policy", "lambda"),
            ("heavy", "4"),
            ("recent", "4"),
            ("maps", "zero")
        ])),
        "heavy"
    );
    assert_eq!(field(p(&[("policy", "tova"), ("maps", "zero")])), "policy");
    assert_eq!(field(p(&[("bogus", "1")])), "params");
    let ok = p(&[
        ("policy", "lambda"),
        ("sinks", "4"),
        ("recent", "8"),
        ("artefact", "x"),
    ])
    .expect("lambda");
    assert_eq!(
        ok.policy,
        LessPolicy::Lambda {
            sinks: 4,
            recent: 8
        }
    );
    assert_eq!(ok.maps.rank, 2);
    // A zero budget, and maps of the wrong shape.
    let zero = LessConfig::new(
        s,
        LessPolicy::Lambda {
            sinks: 0,
            recent: 0,
        },
        LessMaps::zeros(&s, 1, 1),
    );
    assert!(zero.init(&d).is_err());
    let other = KvShape::new(1, 1, 4, 8).expect("valid");
    let wrong = LessConfig::new(
        s,
        LessPolicy::H2o {
            heavy: 1,
            recent: 1,
        },
        LessMaps::zeros(&other, 1, 1),
    );
    assert_eq!(field(wrong.init(&d).map(|_| wrong.clone())), "maps");
    let mut nan = LessMaps::zeros(&s, 2, 2);
    nan.query[1].mlp.w2[3] = f32::NAN;
    let cfg = LessConfig::new(
        s,
        LessPolicy::H2o {
            heavy: 1,
            recent: 1,
        },
        nan,
    );
    assert_eq!(field(cfg.init(&d).map(|_| cfg.clone())), "maps");
}

fn artefact(layers: usize, shape: &KvShape) -> LessArtefact {
    LessArtefact {
        format: LESS_ARTEFACT_FORMAT.into(),
        version: LESS_ARTEFACT_VERSION,
        model: "test".into(),
        num_layers: layers,
        q_heads: shape.q_heads(),
        kv_heads: shape.kv_heads(),
        head_dim: shape.head_dim(),
        training: LessTrainingRecord {
            text: "synthetic".into(),
            sequences: 1,
            tokens: 8,
            prefill: 4,
            policy: "h2o".into(),
            objective: "output".into(),
            epochs: 1,
            lr: 1e-3,
            seed: 0,
            trained_layers: (0..layers).collect(),
            loss: vec![[1.0, 1.0, 0.5]; layers],
            held_out_loss: Vec::new(),
        },
        layers: (0..layers)
            .map(|l| LessMaps::init(shape, 4, 2, l as u64))
            .collect(),
    }
}

#[test]
fn artefact_round_trips_and_checks_the_model() {
    let s = shape();
    let a = artefact(3, &s);
    let json = serde_json::to_string(&a).expect("json");
    let back: LessArtefact = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, a);
    assert_eq!(back.layer(2, 3, &s).expect("layer 2"), a.layers[2]);
    let msg = |r: Result<LessMaps, KvError>| match r {
        Err(KvError::InvalidConfig { reason, .. }) => reason,
        other => panic!("expected an error, got {other:?}"),
    };
    assert!(msg(a.layer(0, 4, &s)).contains("3 layers"));
    let other = KvShape::new(1, 2, 4, 16).expect("valid");
    assert!(msg(a.layer(0, 3, &other)).contains("head_dim 8"));
    let mut v2 = a.clone();
    v2.version = 2;
    assert!(msg(v2.layer(0, 3, &s)).contains("version 2"));
    let mut short = a.clone();
    short.layers[1].key[0].scale.pop();
    assert!(msg(short.layer(1, 3, &s)).contains("key[0].scale"));
}

/// A synthetic problem: one KV head, two query heads, Λ policy, random activations.
fn synthetic(seed: u64, d: &Device) -> LessSample {
    let n = 40;
    let q = seeded_tensor([1, 2, n, 8], seed, 1.5, d);
    let k = seeded_tensor([1, 1, n, 8], seed + 1, 1.5, d);
    let v = seeded_tensor([1, 1, n, 8], seed + 2, 1.0, d);
    LessSample::collect(
        LessPolicy::Lambda {
            sinks: 1,
            recent: 4,
        },
        q,
        k,
        v,
        12,
    )
    .expect("sample")
}

#[test]
fn gradient_matches_finite_differences() {
    check_gradient(&synthetic(70, &test_device()));
}

/// With the metric of an output projection (the reference's loss after `o_proj`), the loss of
/// the sparse policy is `|W e|² / hidden` and the gradient still matches.
#[test]
fn gradient_matches_finite_differences_with_an_output_projection() {
    let d = test_device();
    let (hidden, w) = (6, 16);
    let o = to_vec(&seeded_tensor([hidden, w], 90, 1.0, &d));
    let metric = output_metric(&o, hidden, w).expect("metric");
    let plain = synthetic(71, &d);
    let sample = plain.clone().with_metric(metric).expect("fits");
    // The metric changes what the sparse policy's error measures.
    let err = |s: &LessSample| s.sparse_loss();
    assert!(err(&sample) > 0.0 && (err(&sample) - err(&plain)).abs() > 1e-9);
    check_gradient(&sample);
    assert!(output_metric(&o[1..], hidden, w).is_err());
    assert!(plain.with_metric(vec![0.0; 4].into()).is_err());
}

fn check_gradient(sample: &LessSample) {
    let s = KvShape::new(1, 1, 2, 8).expect("valid");
    let mut maps = LessMaps::init(&s, 5, 3, 11);
    for k in &mut maps.key {
        k.scale.fill(0.4);
        k.scale2.fill(0.2);
    }
    let (_, grad) = loss_and_grad(&maps, &[sample]).expect("grad");
    let at = |m: &LessMaps| loss(m, &[sample]).expect("loss");
    let eps = 1e-3f32;
    // (which parameter, index): query w1 and w2, key w1, w2, scale, interaction, scale2.
    type Pick = fn(&mut LessMaps) -> &mut Vec<f32>;
    let picks: [(Pick, Pick, usize); 7] = [
        (|m| &mut m.query[1].mlp.w1, |m| &mut m.query[1].mlp.w1, 7),
        (|m| &mut m.query[0].mlp.w2, |m| &mut m.query[0].mlp.w2, 4),
        (|m| &mut m.key[0].mlp.w1, |m| &mut m.key[0].mlp.w1, 12),
        (|m| &mut m.key[0].mlp.w2, |m| &mut m.key[0].mlp.w2, 5),
        (|m| &mut m.key[0].scale, |m| &mut m.key[0].scale, 1),
        (
            |m| &mut m.key[0].interaction,
            |m| &mut m.key[0].interaction,
            5,
        ),
        (|m| &mut m.key[0].scale2, |m| &mut m.key[0].scale2, 2),
    ];
    for (i, (param, gparam, idx)) in picks.into_iter().enumerate() {
        let mut plus = maps.clone();
        param(&mut plus)[idx] += eps;
        let mut minus = maps.clone();
        param(&mut minus)[idx] -= eps;
        let numeric = (at(&plus) - at(&minus)) / (2.0 * f64::from(eps));
        let mut g = grad.clone();
        let analytic = f64::from(gparam(&mut g)[idx]);
        let tol = 1e-3 * numeric.abs().max(analytic.abs()) + 1e-7;
        assert!(
            (numeric - analytic).abs() <= tol.max(0.02 * numeric.abs()),
            "parameter {i}: numeric {numeric:e} vs analytic {analytic:e}"
        );
        assert!(analytic.abs() > 0.0, "parameter {i} has a zero gradient");
    }
}

#[test]
fn training_lowers_the_loss_on_a_synthetic_problem() {
    let d = test_device();
    let samples: Vec<LessSample> = (0..3).map(|i| synthetic(100 + 10 * i, &d)).collect();
    let s = KvShape::new(1, 1, 2, 8).expect("valid");
    // 40 tokens, 1 sink + 4 recent + the newest held at the end.
    assert_eq!(samples[0].evicted(), vec![34]);
    let mut maps = LessMaps::init(&s, 8, 4, 1);
    let report = train_layer(
        &mut maps,
        &samples,
        TrainOptions {
            epochs: 40,
            lr: 1e-2,
        },
    )
    .expect("train");
    let last = *report.epochs.last().expect("epochs");
    // The initial maps barely touch the output (scales 1e-4): it starts at the sparse loss.
    assert!((report.initial - report.sparse).abs() < 0.01 * report.sparse);
    assert!(
        last < 0.8 * report.sparse,
        "loss {:.5} -> {last:.5} (sparse {:.5})",
        report.initial,
        report.sparse
    );
    // And it carries to a held-out sequence.
    let held = synthetic(500, &d);
    assert!(loss(&maps, &[&held]).expect("loss") < held.sparse_loss());
}

/// The training objective is what the cache does: replaying a sample's sequence through a
/// `LessCache` with the same maps gives outputs whose error against full attention is the
/// training loss.
#[test]
fn training_loss_is_the_cache_error() {
    let d = test_device();
    let n = 30;
    let (prefill, policy) = (
        10,
        LessPolicy::H2o {
            heavy: 3,
            recent: 2,
        },
    );
    let q = seeded_tensor([1, 4, n, 8], 81, 1.5, &d);
    let k = seeded_tensor([1, 2, n, 8], 82, 1.5, &d);
    let v = seeded_tensor([1, 2, n, 8], 83, 1.0, &d);
    let sample =
        LessSample::collect(policy, q.clone(), k.clone(), v.clone(), prefill).expect("sample");
    let maps = strong_maps(&shape(), 12);
    let mut cache = less(policy, maps.clone(), &d);
    let part = |t: &Tensor<4>, a: usize, z: usize| {
        let [b, h, _, dd] = t.dims();
        t.clone().slice([0..b, 0..h, a..z, 0..dd])
    };
    let pos: Vec<u32> = (0..n as u32).collect();
    let (full, _) = reference_attention(
        q.clone(),
        k.clone(),
        v.clone(),
        &pos,
        KeyPositions::PerSequence(&pos),
        None,
        StatsRequest::NONE,
    );
    cache
        .append(KvBlock::contiguous(part(&k, 0, prefill), part(&v, 0, prefill), 0).expect("b"))
        .expect("append");
    cache
        .attend(
            &Query::contiguous(part(&q, 0, prefill), 0).expect("q"),
            StatsRequest::NONE,
        )
        .expect("attend");
    cache.end_prefill().expect("end");
    let mut sse = 0.0f64;
    for t in prefill..n {
        cache
            .append(
                KvBlock::contiguous(part(&k, t, t + 1), part(&v, t, t + 1), t as u32).expect("b"),
            )
            .expect("append");
        let got = cache
            .attend(
                &Query::contiguous(part(&q, t, t + 1), t as u32).expect("q"),
                StatsRequest::NONE,
            )
            .expect("attend")
            .output;
        let want = part(&full, t, t + 1);
        sse += to_vec(&got)
            .iter()
            .zip(to_vec(&want))
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>();
    }
    let mse = sse / ((n - prefill) * 4 * 8) as f64;
    let trained = loss(&maps, &[&sample]).expect("loss");
    assert!(
        (mse - trained).abs() <= 1e-4 * trained,
        "cache {mse:e} vs training loss {trained:e}"
    );
    assert!(
        (trained - sample.sparse_loss()).abs() > 0.01 * sample.sparse_loss(),
        "the maps matter"
    );
}
