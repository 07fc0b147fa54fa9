//! Protected sinks and recent tokens in the execution step, for every scorer and allocator:
//! kept whatever the scores, inside the same budget, and an error when they do not fit.

use kv_core::{
    KvBlock, KvCache, KvError, KvShape, Query, RopeConfig, RopeConvention, StatsRequest,
};
use kv_evict::{
    BudgetKind, EvictConfig, EvictOutcome, EvictingCache, GqaReduce, PyramidBudget, ScorerConfig,
    kept_for, top_k_sorted,
};
use kv_testkit::{seeded_tensor, test_device, to_vec};

fn scorers() -> Vec<ScorerConfig> {
    vec![
        ScorerConfig::Knorm,
        ScorerConfig::StreamingLlm { n_sink: 2 },
        ScorerConfig::SnapKv {
            window: 4,
            kernel: 3,
            gqa: GqaReduce::Mean,
        },
        ScorerConfig::Tova,
        ScorerConfig::ObservedAttention {
            gqa: GqaReduce::Mean,
            recent: 0.0,
        },
        ScorerConfig::KeyDiff,
        ScorerConfig::ExpectedAttention {
            n_future_positions: 16,
            n_sink: 2,
            use_covariance: true,
            use_vnorm: true,
            epsilon: 0.0,
            gqa: GqaReduce::Mean,
        },
    ]
}

fn config(shape: KvShape, ratio: f64, scorer: ScorerConfig) -> EvictConfig {
    EvictConfig::new(shape, ratio, scorer)
        .with_rope(RopeConfig::new(
            shape.head_dim(),
            10_000.0,
            RopeConvention::RotateHalf,
        ))
        .with_kept_scores()
}

/// Appends `n` tokens from position 0 and attends their queries (a prefill).
fn prefill(c: &mut EvictingCache, n: usize, seed: u64) {
    let s = c.shape();
    let d = test_device();
    let kv = [s.batch(), s.kv_heads(), n, s.head_dim()];
    let k = seeded_tensor(kv, seed, 1.5, &d);
    let v = seeded_tensor(kv, seed + 1, 1.0, &d);
    c.append(KvBlock::contiguous(k, v, 0).expect("block"))
        .expect("append");
    let q = seeded_tensor([s.batch(), s.q_heads(), n, s.head_dim()], seed + 2, 1.5, &d);
    c.attend(&Query::contiguous(q, 0).expect("query"), StatsRequest::NONE)
        .expect("attend");
}

fn held(c: &EvictingCache, b: usize, h: usize) -> Vec<u32> {
    c.storage().stream(b, h).positions.to_vec()
}

#[test]
fn protected_tokens_are_kept_by_every_scorer_and_allocator_within_the_budget() {
    let shape = KvShape::new(1, 2, 4, 16).expect("shape");
    let (n, ratio, sinks, recent) = (40usize, 0.7, 3usize, 5usize);
    let k = kept_for(n, ratio); // 12
    let budgets = [
        BudgetKind::Uniform,
        BudgetKind::PYRAMID,
        BudgetKind::ADAKV,
        BudgetKind::Coverage { mass: 0.5 },
    ];
    for scorer in scorers() {
        for budget in budgets {
            let what = format!("{} / {}", scorer.name(), budget.name());
            let mut c = config(shape, ratio, scorer.clone())
                .with_budget(budget)
                .with_layer(0, 2)
                .with_protected(sinks, recent)
                .init(&test_device())
                .expect("init");
            prefill(&mut c, n, 7);
            c.end_prefill().expect(&what);
            let lens = c.lengths().held;
            for h in 0..2 {
                let pos = held(&c, 0, h);
                for p in (0..sinks as u32).chain((n - recent) as u32..n as u32) {
                    assert!(
                        pos.contains(&p),
                        "{what}: head {h} lost protected {p}: {pos:?}"
                    );
                }
            }
            match budget {
                BudgetKind::Uniform => {
                    assert_eq!(lens, [k, k], "{what}: kept = floor(n (1 - ratio))");
                }
                // Layer 0 of 2: PyramidKV's budget for the layer, protection inside it.
                BudgetKind::Pyramid { beta } => {
                    let b = PyramidBudget::new(ratio, scorer.needs().window, beta)
                        .expect("pyramid")
                        .layer_budget(n, 0, 2);
                    assert_eq!(lens, [b, b], "{what}");
                }
                BudgetKind::AdaKv { .. } => {
                    assert_eq!(lens.iter().sum::<usize>(), 2 * k, "{what}: layer total");
                }
                _ => assert!(
                    lens.iter().all(|&l| l >= sinks + recent),
                    "{what}: {lens:?}"
                ),
            }
        }
    }
}

#[test]
fn the_rest_of_the_budget_goes_to_the_best_unprotected_scores() {
    let shape = KvShape::new(1, 2, 4, 16).expect("shape");
    let (n, ratio, sinks, recent) = (32usize, 0.5, 2usize, 4usize);
    for scorer in [ScorerConfig::Knorm, ScorerConfig::Tova] {
        let mut c = config(shape, ratio, scorer.clone())
            .with_protected(sinks, recent)
            .init(&test_device())
            .expect("init");
        prefill(&mut c, n, 3);
        c.end_prefill().expect("compress");
        // The kept scores are the raw ones: the protected tokens are chosen first, the other
        // kept_for(n) - sinks - recent by score among the rest.
        for (s, scores) in c.last_scores().iter().enumerate() {
            assert!(scores.iter().all(|x| x.is_finite()), "raw scores kept");
            let rest: Vec<usize> = (sinks..n - recent).collect();
            let rest_scores: Vec<f32> = rest.iter().map(|&j| scores[j]).collect();
            let best = top_k_sorted(&rest_scores, kept_for(n, ratio) - sinks - recent);
            let mut want: Vec<u32> = (0..sinks as u32).collect();
            want.extend(best.iter().map(|&i| rest[i] as u32));
            want.extend((n - recent) as u32..n as u32);
            assert_eq!(held(&c, 0, s), want, "{} head {s}", scorer.name());
        }
        // Without protection the same scorer keeps its plain top-k (kvpress's selection),
        // which here differs from the protected set.
        let mut plain = config(shape, ratio, scorer.clone())
            .init(&test_device())
            .expect("init");
        prefill(&mut plain, n, 3);
        plain.end_prefill().expect("compress");
        for (s, scores) in plain.last_scores().iter().enumerate() {
            let want: Vec<u32> = top_k_sorted(scores, kept_for(n, ratio))
                .into_iter()
                .map(|j| j as u32)
                .collect();
            assert_eq!(held(&plain, 0, s), want);
        }
        assert_ne!(
            (0..2).map(|h| held(&plain, 0, h)).collect::<Vec<_>>(),
            (0..2).map(|h| held(&c, 0, h)).collect::<Vec<_>>(),
            "{}: protection changed nothing on this data, the test would not see it",
            scorer.name()
        );
    }
}

#[test]
fn a_budget_below_sinks_plus_recent_is_an_error_and_the_cache_is_unchanged() {
    let shape = KvShape::new(1, 2, 4, 16).expect("shape");
    // 40 tokens at ratio 0.9 keep floor(40 * (1 - 0.9)) = floor(3.99...) = 3 < 3 + 2.
    let mut c = config(shape, 0.9, ScorerConfig::Knorm)
        .with_protected(3, 2)
        .init(&test_device())
        .expect("init");
    prefill(&mut c, 40, 5);
    let (before, view) = (c.memory(), to_vec(&c.view().keys));
    let e = c.end_prefill().expect_err("budget 3 < 5 protected");
    assert!(
        matches!(&e, KvError::InvalidConfig { field: "recent", reason } if reason.contains("budget of 3")),
        "{e}"
    );
    assert_eq!(c.lengths().held, [40, 40]);
    assert_eq!(c.memory(), before);
    assert_eq!(to_vec(&c.view().keys), view);
    assert!(!c.is_compressed());
    // Sinks alone name `sinks`.
    let mut c = config(shape, 0.9, ScorerConfig::Knorm)
        .with_protected(5, 0)
        .init(&test_device())
        .expect("init");
    prefill(&mut c, 40, 5);
    let e = c.end_prefill().expect_err("budget 3 < 5 sinks");
    assert!(
        matches!(e, KvError::InvalidConfig { field: "sinks", .. }),
        "{e}"
    );
    // Exactly enough budget is fine: 40 at 0.9 keeps 3 = 2 + 1.
    let mut c = config(shape, 0.9, ScorerConfig::Knorm)
        .with_protected(2, 1)
        .init(&test_device())
        .expect("init");
    prefill(&mut c, 40, 5);
    c.end_prefill().expect("fits");
    assert_eq!(held(&c, 0, 1), [0, 1, 39]);
    assert_eq!(
        c.last_outcome(),
        Some(&EvictOutcome::Compressed {
            before: 80,
            after: 6
        })
    );
}

#[test]
fn decode_compression_protects_too_and_checks_its_target() {
    let shape = KvShape::new(1, 1, 2, 8).expect("shape");
    let e = config(shape, 0.5, ScorerConfig::Knorm)
        .with_protected(3, 3)
        .with_decode_compression(2, 5)
        .init(&test_device())
        .expect_err("target 5 < 6 protected");
    assert!(
        matches!(
            e,
            KvError::InvalidConfig {
                field: "decode_target",
                ..
            }
        ),
        "{e}"
    );
    let mut c = config(shape, 0.5, ScorerConfig::Knorm)
        .with_protected(2, 2)
        .with_decode_compression(2, 6)
        .init(&test_device())
        .expect("init");
    prefill(&mut c, 16, 11);
    c.end_prefill().expect("compress");
    let d = test_device();
    for step in 0..6u32 {
        let pos = 16 + step;
        let kv = [1, 1, 1, 8];
        let blk = KvBlock::contiguous(
            seeded_tensor(kv, 100 + u64::from(step), 3.0, &d),
            seeded_tensor(kv, 200 + u64::from(step), 1.0, &d),
            pos,
        )
        .expect("block");
        c.append(blk).expect("decode append");
        let q = seeded_tensor([1, 2, 1, 8], 300 + u64::from(step), 1.0, &d);
        c.attend(&Query::contiguous(q, pos).expect("q"), StatsRequest::NONE)
            .expect("attend");
        let p = held(&c, 0, 0);
        assert_eq!(&p[..2], &[0, 1], "sinks kept at step {step}: {p:?}");
        let last = p.len() - 2;
        assert_eq!(
            &p[last..],
            &[pos - 1, pos],
            "recent kept at step {step}: {p:?}"
        );
    }
    assert!(c.decode_compressions() >= 2);
}

#[test]
fn protection_round_trips_and_defaults_serialise_as_before() {
    let shape = KvShape::new(1, 2, 4, 16).expect("shape");
    let plain = EvictConfig::new(shape, 0.5, ScorerConfig::Knorm);
    let json = serde_json::to_string(&plain).expect("json");
    assert!(
        !json.contains("sinks") && !json.contains("recent"),
        "{json}"
    );
    let back: EvictConfig = serde_json::from_str(&json).expect("parse");
    assert_eq!((back.sinks, back.recent), (0, 0));
    let cfg = plain.with_protected(4, 16);
    let back: EvictConfig =
        serde_json::from_str(&serde_json::to_string(&cfg).expect("json")).expect("parse");
    assert_eq!(back, cfg);
}
