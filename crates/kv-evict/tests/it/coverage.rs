//! LeanKV-style coverage budgets (card 61) and periodic decode-time compression (kvpress
//! `DecodingPress`) through the cache.

use kv_core::{
    KvBlock, KvCache, KvError, KvShape, Query, RopeConfig, RopeConvention, StatsRequest,
    memory_matches_buffers,
};
use kv_evict::score::{knorm, to_host};
use kv_evict::{
    BudgetKind, CoverageBudget, DecodeCompression, EvictConfig, EvictingCache, GqaReduce, MassNorm,
    ScorerConfig, top_k_sorted,
};
use kv_testkit::{seeded_tensor, test_device};
use proptest::prelude::*;

fn snap(window: usize) -> ScorerConfig {
    ScorerConfig::SnapKv {
        window,
        kernel: 3,
        gqa: GqaReduce::Mean,
    }
}

fn rope(d: usize) -> RopeConfig {
    RopeConfig::new(d, 10_000.0, RopeConvention::RotateHalf)
}

fn feed(c: &mut EvictingCache, n: usize, start: u32, seed: u64) {
    let s = c.shape();
    let d = test_device();
    let kv = [s.batch(), s.kv_heads(), n, s.head_dim()];
    let k = seeded_tensor(kv, seed, 1.0, &d);
    let v = seeded_tensor(kv, seed + 1, 1.0, &d);
    c.append(KvBlock::contiguous(k, v, start).expect("block"))
        .expect("append");
    let q = seeded_tensor([s.batch(), s.q_heads(), n, s.head_dim()], seed + 2, 1.0, &d);
    c.attend(
        &Query::contiguous(q, start).expect("query"),
        StatsRequest::NONE,
    )
    .expect("attend");
}

fn held_positions(c: &dyn KvCache, s: usize) -> Vec<u32> {
    let v = c.view();
    let w = v.positions.len() / c.shape().streams();
    v.positions[s * w..(s + 1) * w]
        .iter()
        .copied()
        .filter(|&p| p != kv_core::PAD)
        .collect()
}

#[test]
fn card_61_coverage_of_0_8_keeps_exactly_two() {
    let c = CoverageBudget::new(0.8).expect("valid");
    assert_eq!(c.stream_budget(&[0.5, 0.3, 0.1, 0.1]), 2);
    // Order does not matter; just above 0.8 needs a third token; 1.0 keeps every token with
    // mass, zeros are never needed.
    assert_eq!(c.stream_budget(&[0.1, 0.3, 0.1, 0.5]), 2);
    assert_eq!(
        CoverageBudget::new(0.81)
            .expect("valid")
            .stream_budget(&[0.5, 0.3, 0.1, 0.1]),
        3
    );
    let all = CoverageBudget::new(1.0).expect("valid");
    assert_eq!(all.stream_budget(&[0.5, 0.3, 0.1, 0.1]), 4);
    assert_eq!(all.stream_budget(&[0.6, 0.0, 0.4, 0.0]), 2);
    // Unnormalised masses are normalised per head: [5, 3, 1, 1] is the same head.
    assert_eq!(c.stream_budget(&[5.0, 3.0, 1.0, 1.0]), 2);
    // No mass at all: uniform weights, 0.8 * 5 = 4 tokens.
    assert_eq!(c.stream_budget(&[0.0; 5]), 4);
    // Pinned tokens (SnapKV's window scored max + 1) are kept and left out of the mass.
    let snap2 = CoverageBudget::new(0.8).expect("valid").with_pinned(0, 2);
    assert_eq!(snap2.stream_budget(&[0.5, 0.3, 0.1, 0.1, 1.5, 1.5]), 4);
    let sink1 = CoverageBudget::new(0.8).expect("valid").with_pinned(1, 0);
    assert_eq!(sink1.stream_budget(&[9.0, 0.5, 0.3, 0.1, 0.1]), 3);
    // Too short to have candidates: everything.
    assert_eq!(snap2.stream_budget(&[0.2, 0.1]), 2);
    for bad in [0.0, -0.1, 1.5, f64::NAN] {
        assert!(
            matches!(
                CoverageBudget::new(bad),
                Err(KvError::InvalidConfig { field: "mass", .. })
            ),
            "{bad}"
        );
    }
}

#[test]
fn negative_scores_are_read_as_logits() {
    // KNorm's -|k|: softmax([-1, -2, -3]) = [0.665, 0.245, 0.090].
    let s = [-1.0f32, -2.0, -3.0];
    assert_eq!(MassNorm::infer(&s), MassNorm::Softmax);
    assert_eq!(MassNorm::infer(&[0.0, 1.0]), MassNorm::Proportional);
    assert_eq!(
        MassNorm::for_scorer(&ScorerConfig::Knorm),
        MassNorm::Softmax
    );
    assert_eq!(
        MassNorm::for_scorer(&ScorerConfig::KeyDiff),
        MassNorm::Softmax
    );
    assert_eq!(MassNorm::for_scorer(&snap(2)), MassNorm::Proportional);
    for (mass, want) in [(0.6, 1), (0.8, 2), (0.95, 3)] {
        let c = CoverageBudget::new(mass).expect("valid");
        assert_eq!(c.stream_budget(&s), want, "inferred, mass {mass}");
        let c = c.with_norm(MassNorm::Softmax);
        assert_eq!(c.stream_budget(&s), want, "explicit, mass {mass}");
    }
    // A shift does not change a softmax: [2, 1, 0] is the same head.
    let c = CoverageBudget::new(0.8)
        .expect("valid")
        .with_norm(MassNorm::Softmax);
    assert_eq!(c.stream_budget(&[2.0, 1.0, 0.0]), 2);
    // Proportional clamps negatives to 0 (no mass).
    let p = CoverageBudget::new(1.0)
        .expect("valid")
        .with_norm(MassNorm::Proportional);
    assert_eq!(p.stream_budget(&[-1.0, 0.5, 0.5]), 2);
    // The scorer-fitted allocator pins what the scorer always keeps.
    let e = CoverageBudget::for_scorer(0.5, &snap(3)).expect("valid");
    assert_eq!((e.pinned_front, e.pinned_back), (0, 3));
    let t = CoverageBudget::for_scorer(0.5, &ScorerConfig::Tova).expect("valid");
    assert_eq!((t.pinned_front, t.pinned_back), (0, 1));
}

#[test]
fn coverage_through_the_cache_gives_heads_their_own_budgets() {
    let shape = KvShape::new(2, 3, 6, 8).expect("shape");
    for (scorer, mass) in [
        (snap(4), 0.6),
        (ScorerConfig::Knorm, 0.5),
        (ScorerConfig::Tova, 0.9),
    ] {
        let mut c = EvictConfig::new(shape, 0.0, scorer.clone())
            .with_budget(BudgetKind::Coverage { mass })
            .with_kept_scores()
            .init(&test_device())
            .expect("init");
        feed(&mut c, 40, 0, 5);
        c.end_prefill()
            .expect("compress (ratio 0 does not skip coverage)");
        let alloc = CoverageBudget::for_scorer(mass, &scorer).expect("valid");
        let held = c.lengths().held;
        for s in 0..shape.streams() {
            let sc = &c.last_scores()[s];
            assert_eq!(
                held[s],
                alloc.stream_budget(sc),
                "{} stream {s}",
                scorer.name()
            );
            let want: Vec<u32> = top_k_sorted(sc, held[s])
                .iter()
                .map(|&j| j as u32)
                .collect();
            assert_eq!(held_positions(&c, s), want);
        }
        assert!(
            held.iter().any(|&h| h < 40),
            "{}: something evicted",
            scorer.name()
        );
        memory_matches_buffers(&c).expect("honest memory");
        // Decode after compression keeps appending.
        feed(&mut c, 1, 40, 99);
        assert!(c.lengths().held.iter().zip(&held).all(|(a, b)| *a == b + 1));
    }
    // Serde: `{"coverage": {"mass": 0.9}}`.
    let json = serde_json::to_string(&BudgetKind::Coverage { mass: 0.9 }).expect("json");
    assert_eq!(json, r#"{"coverage":{"mass":0.9}}"#);
    assert!(
        EvictConfig::new(shape, 0.5, ScorerConfig::Knorm)
            .with_budget(BudgetKind::Coverage { mass: 0.0 })
            .init(&test_device())
            .is_err()
    );
}

#[test]
fn decode_compression_rescores_every_n_steps_down_to_the_target() {
    // KNorm: every 3 decode steps, back to the 6 lowest-norm keys of what is held.
    let shape = KvShape::new(1, 2, 4, 8).expect("shape");
    let mut c = EvictConfig::new(shape, 0.5, ScorerConfig::Knorm)
        .with_decode_compression(3, 6)
        .init(&test_device())
        .expect("init");
    feed(&mut c, 10, 0, 1);
    c.end_prefill().expect("end_prefill");
    assert_eq!(c.lengths().held, vec![5, 5]);
    let mut lengths = Vec::new();
    for step in 10..20u32 {
        let before = c.view();
        let pending = c.decode_steps() >= 3;
        feed(&mut c, 1, step, 100 + u64::from(step));
        lengths.push(c.lengths().held[0]);
        if pending {
            // The kept old tokens are the 6 best by KNorm over what was held.
            let w = before.positions.len() / 2;
            for s in 0..2 {
                let k = before.keys.clone().slice([0..1, s..s + 1, 0..w, 0..8]);
                let sc = to_host(knorm(k)).expect("host");
                let want: Vec<u32> = top_k_sorted(&sc, 6)
                    .iter()
                    .map(|&j| before.positions[s * w + j])
                    .chain([step])
                    .collect();
                assert_eq!(held_positions(&c, s), want, "step {step} stream {s}");
            }
        }
        memory_matches_buffers(&c).expect("honest memory");
    }
    // 5 + 1, +1, +1 = 8; at the 4th step 8 -> 6 then + 1; ...
    assert_eq!(lengths, [6, 7, 8, 7, 8, 9, 7, 8, 9, 7]);
    assert_eq!(c.decode_compressions(), 3);
    c.reset();
    assert_eq!((c.decode_compressions(), c.decode_steps()), (0, 0));
}

#[test]
fn decode_compression_with_window_scorers_keeps_the_window() {
    // SnapKV with window 2, every 2 steps, target 5: the last 2 held (the window) survive.
    let shape = KvShape::new(1, 1, 2, 8).expect("shape");
    let mut c = EvictConfig::new(shape, 0.5, snap(2))
        .with_decode_compression(2, 5)
        .init(&test_device())
        .expect("init");
    feed(&mut c, 12, 0, 1);
    c.end_prefill().expect("end_prefill");
    for step in 12..24u32 {
        feed(&mut c, 1, step, 7 + u64::from(step));
        let p = held_positions(&c, 0);
        assert!(p.len() <= 8, "{p:?}");
        assert!(p.ends_with(&[step - 1, step]), "{p:?}");
    }
    assert!(c.decode_compressions() >= 5);
    // StreamingLLM decoded: sinks + the most recent, exactly the target.
    let mut c = EvictConfig::new(shape, 0.5, ScorerConfig::StreamingLlm { n_sink: 2 })
        .with_decode_compression(1, 5)
        .init(&test_device())
        .expect("init");
    feed(&mut c, 8, 0, 1);
    c.end_prefill().expect("end_prefill");
    assert_eq!(held_positions(&c, 0), [0, 1, 6, 7]);
    feed(&mut c, 1, 8, 3);
    feed(&mut c, 1, 9, 4);
    feed(&mut c, 1, 10, 5);
    assert_eq!(
        held_positions(&c, 0),
        [0, 1, 7, 8, 9, 10],
        "5 kept, then the new one"
    );
    // ExpectedAttention rescoring from the decode queries' moments.
    let mut c = EvictConfig::new(
        shape,
        0.5,
        ScorerConfig::ExpectedAttention {
            n_future_positions: 8,
            n_sink: 1,
            use_covariance: true,
            use_vnorm: true,
            epsilon: 0.0,
            gqa: GqaReduce::Mean,
        },
    )
    .with_rope(rope(8))
    .with_decode_compression(3, 6)
    .init(&test_device())
    .expect("init");
    feed(&mut c, 12, 0, 1);
    c.end_prefill().expect("end_prefill");
    for step in 12..22u32 {
        feed(&mut c, 1, step, 50 + u64::from(step));
        assert_eq!(held_positions(&c, 0)[0], 0, "the sink stays");
    }
    assert_eq!(c.decode_compressions(), 3);
}

#[test]
fn decode_compression_configs_are_validated_and_bad_blocks_do_not_trigger_it() {
    let shape = KvShape::new(1, 1, 2, 8).expect("shape");
    let d = test_device();
    let cases: Vec<(EvictConfig, &str)> = vec![
        (
            EvictConfig::new(shape, 0.5, ScorerConfig::Knorm).with_decode_compression(0, 4),
            "decode_every",
        ),
        (
            EvictConfig::new(shape, 0.5, ScorerConfig::Knorm).with_decode_compression(4, 0),
            "decode_target",
        ),
        (
            EvictConfig::new(shape, 0.5, snap(8)).with_decode_compression(4, 16),
            "decode_every",
        ),
        (
            EvictConfig::new(shape, 0.5, snap(8)).with_decode_compression(8, 8),
            "decode_target",
        ),
        (
            EvictConfig::new(
                shape,
                0.5,
                ScorerConfig::ObservedAttention {
                    gqa: GqaReduce::Mean,
                    recent: 0.0,
                },
            )
            .with_decode_compression(8, 8),
            "decode_every",
        ),
        (
            EvictConfig::new(shape, 0.5, ScorerConfig::Knorm)
                .with_budget(BudgetKind::ADAKV)
                .with_decode_compression(8, 8),
            "decode_every",
        ),
    ];
    for (cfg, field) in cases {
        assert!(
            matches!(cfg.init(&d), Err(KvError::InvalidConfig { field: f, .. }) if f == field),
            "{field}: {:?}",
            cfg.decode
        );
    }
    // Params.
    assert_eq!(
        DecodeCompression::from_params([("window", "3")]).expect("none"),
        None
    );
    assert_eq!(
        DecodeCompression::from_params([("decode_every", "64")]).expect("default target"),
        Some(DecodeCompression {
            every: 64,
            target: 2048
        })
    );
    assert!(DecodeCompression::from_params([("decode_target", "64")]).is_err());
    assert!(DecodeCompression::from_params([("decode_every", "x")]).is_err());
    // A compression is pending; a bad block is rejected before it runs.
    let mut c = EvictConfig::new(shape, 0.5, ScorerConfig::Knorm)
        .with_decode_compression(1, 3)
        .init(&d)
        .expect("init");
    feed(&mut c, 8, 0, 1);
    c.end_prefill().expect("end_prefill");
    feed(&mut c, 1, 8, 2);
    assert_eq!(c.lengths().held, vec![5]);
    let k = seeded_tensor([1, 1, 1, 8], 3, 1.0, &d);
    let bad = KvBlock::contiguous(k.clone(), k, 8).expect("block");
    assert!(c.append(bad).is_err(), "position 8 again");
    assert_eq!(
        (c.lengths().held.clone(), c.decode_compressions()),
        (vec![5], 0)
    );
    feed(&mut c, 1, 9, 4);
    assert_eq!(
        (c.lengths().held.clone(), c.decode_compressions()),
        (vec![4], 1)
    );
    // The config round-trips through JSON.
    let cfg = EvictConfig::new(shape, 0.5, ScorerConfig::Knorm).with_decode_compression(16, 64);
    let json = serde_json::to_string(&cfg).expect("json");
    assert_eq!(
        serde_json::from_str::<EvictConfig>(&json).expect("parse"),
        cfg
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The kept set covers the mass, and is minimal: without its last (smallest) token it
    /// would not; more mass never keeps fewer tokens.
    #[test]
    fn coverage_is_sufficient_minimal_and_monotone(
        scores in proptest::collection::vec(0.0f32..1.0, 1..40),
        mass in 0.05f64..1.0,
        more in 0.0f64..0.5,
    ) {
        let c = CoverageBudget::new(mass).expect("valid").with_norm(MassNorm::Proportional);
        let k = c.stream_budget(&scores);
        let mut sorted: Vec<f64> = scores.iter().map(|&x| f64::from(x)).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let total: f64 = sorted.iter().sum();
        prop_assume!(total > 0.0);
        let cum: f64 = sorted[..k].iter().sum();
        prop_assert!(cum >= mass * total * (1.0 - 1e-6));
        let less: f64 = sorted[..k - 1].iter().sum();
        prop_assert!(less < mass * total * (1.0 - 1e-6));
        let bigger = CoverageBudget::new((mass + more).min(1.0)).expect("valid")
            .with_norm(MassNorm::Proportional);
        prop_assert!(bigger.stream_budget(&scores) >= k);
    }
}
