//! Decode-time Keyformer: the catalog's budget arithmetic (card 25), seeded noise, the
//! temperature schedule, the high-temperature limit and eviction through the cache.

use kv_core::{KvBlock, KvCache, KvError, KvShape, Query, StatsRequest, memory_matches_buffers};
use kv_evict::{KeyformerCache, KeyformerConfig, TokenBudget};
use kv_testkit::{assert_close_slices, seeded_tensor, test_device};
use proptest::prelude::*;

fn block(s: KvShape, n: usize, start: u32, seed: u64) -> KvBlock {
    let d = test_device();
    let kv = [s.batch(), s.kv_heads(), n, s.head_dim()];
    KvBlock::contiguous(
        seeded_tensor(kv, seed, 1.5, &d),
        seeded_tensor(kv, seed + 1, 1.0, &d),
        start,
    )
    .expect("block")
}

fn query(s: KvShape, n: usize, start: u32, seed: u64) -> Query {
    let q = seeded_tensor(
        [s.batch(), s.q_heads(), n, s.head_dim()],
        seed,
        1.5,
        &test_device(),
    );
    Query::contiguous(q, start).expect("query")
}

/// The positions stream `s` holds, sorted.
fn held_positions(c: &dyn KvCache, s: usize) -> Vec<u32> {
    let mut p = rows_positions(c, s);
    p.sort_unstable();
    p
}

/// The positions of stream `s` in row order (the decode-time policies write new tokens into
/// evicted rows, so rows are not in position order).
fn rows_positions(c: &dyn KvCache, s: usize) -> Vec<u32> {
    let v = c.view();
    let w = v.positions.len() / c.shape().streams();
    v.positions[s * w..(s + 1) * w]
        .iter()
        .copied()
        .filter(|&p| p != kv_core::PAD)
        .collect()
}

fn prefill(cfg: &KeyformerConfig, n: usize, seed: u64) -> KeyformerCache {
    let mut c = cfg.init(&test_device()).expect("init");
    c.append(block(cfg.shape, n, 0, seed)).expect("prefill");
    c.attend(&query(cfg.shape, n, 0, seed + 2), StatsRequest::NONE)
        .expect("attend");
    c
}

#[test]
fn card_25_budget_arithmetic_prompt_100_keeps_18_recent_and_42_key_tokens() {
    let shape = KvShape::new(1, 1, 2, 8).expect("shape");
    let cfg = KeyformerConfig::new(shape, TokenBudget::Ratio(0.6));
    assert_eq!(TokenBudget::Ratio(0.6).resolve(100), 60);
    assert_eq!(cfg.split(60), (18, 42));
    let mut c = prefill(&cfg, 100, 1);
    assert_eq!(c.budget(0), None);
    c.end_prefill().expect("end_prefill");
    assert_eq!(c.budget(0), Some((18, 42)));
    assert_eq!(c.lengths().held, vec![60]);
    let p = held_positions(&c, 0);
    assert_eq!(
        &p[42..],
        &(82..100).collect::<Vec<u32>>()[..],
        "the 18 newest"
    );
    // A decode step: 17 recent + 42 key tokens + the new one = 60 seen by its query.
    c.append(block(shape, 1, 100, 9)).expect("decode");
    assert_eq!(c.lengths().held, vec![60]);
    let p = held_positions(&c, 0);
    assert_eq!(&p[42..], &(83..101).collect::<Vec<u32>>()[..]);
    memory_matches_buffers(&c).expect("honest memory");
}

#[test]
fn seeded_noise_is_reproducible_and_the_seed_matters() {
    let shape = KvShape::new(2, 2, 4, 8).expect("shape");
    let mut cfg = KeyformerConfig::new(shape, TokenBudget::Tokens(6));
    let a = prefill(&cfg, 10, 3);
    let b = prefill(&cfg, 10, 3);
    assert_eq!(
        a.scores(),
        b.scores(),
        "same seed, same inputs, same scores"
    );
    cfg.seed = 7;
    let c = prefill(&cfg, 10, 3);
    assert_ne!(a.scores(), c.scores(), "another seed, other noise");
    // reset restarts the generator.
    let mut a2 = a.clone();
    a2.reset();
    a2.append(block(shape, 10, 0, 3)).expect("append");
    a2.attend(&query(shape, 10, 0, 5), StatsRequest::NONE)
        .expect("attend");
    assert_eq!(a2.scores(), a.scores());
}

#[test]
fn a_huge_temperature_makes_every_row_uniform_and_the_schedule_rises_per_step() {
    // tau -> inf: each query spreads 1/(visible keys) uniformly, whatever the logits and
    // noise, so token j of a 6-token prompt gets sum_{i >= j} 1 / (i + 1).
    let shape = KvShape::new(1, 2, 4, 8).expect("shape");
    let mut cfg = KeyformerConfig::new(shape, TokenBudget::Tokens(4));
    cfg.tau_init = 1e7;
    let c = prefill(&cfg, 6, 11);
    let want: Vec<f32> = (0..6)
        .map(|j| (j..6).map(|i| 1.0 / (i + 1) as f32).sum())
        .collect();
    for s in 0..2 {
        assert_close_slices(&c.scores()[s], &want, 1e-4, 1e-4);
    }
    // The temperature: tau_init in prefill, + k * tau_delta at the k-th decode call.
    let cfg = KeyformerConfig::new(shape, TokenBudget::Tokens(4));
    let mut c = prefill(&cfg, 6, 1);
    assert_eq!(c.tau(), 1.0);
    c.end_prefill().expect("end_prefill");
    for k in 1..=3u32 {
        assert!((c.tau() - (1.0 + 0.01 * k as f32)).abs() < 1e-6);
        let pos = 5 + k;
        c.append(block(shape, 1, pos, 20 + u64::from(k)))
            .expect("decode");
        c.attend(&query(shape, 1, pos, 30 + u64::from(k)), StatsRequest::NONE)
            .expect("attend");
    }
    assert!((c.tau() - 1.04).abs() < 1e-6);
}

#[test]
fn bad_configs_are_rejected_and_params_parse() {
    let shape = KvShape::new(1, 1, 1, 8).expect("shape");
    let d = test_device();
    let base = KeyformerConfig::new(shape, TokenBudget::Tokens(8));
    let mut cases: Vec<(KeyformerConfig, &str)> = Vec::new();
    let mut c = base.clone();
    c.budget = TokenBudget::Tokens(0);
    cases.push((c, "budget"));
    let mut c = base.clone();
    c.recent = 1.5;
    cases.push((c, "recent"));
    let mut c = base.clone();
    c.tau_init = 0.0;
    cases.push((c, "tau_init"));
    let mut c = base.clone();
    c.tau_delta = f32::NAN;
    cases.push((c, "tau_delta"));
    for (cfg, field) in cases {
        assert!(
            matches!(cfg.init(&d), Err(KvError::InvalidConfig { field: f, .. }) if f == field),
            "{field}"
        );
    }
    let p = KeyformerConfig::from_params(shape, []).expect("defaults");
    assert_eq!(
        (p.budget, p.recent, p.tau_init, p.tau_delta, p.seed),
        (TokenBudget::Ratio(0.6), 0.3, 1.0, 0.01, 0)
    );
    let p = KeyformerConfig::from_params(
        shape,
        [
            ("budget", "64"),
            ("recent", "0.5"),
            ("seed", "3"),
            ("gqa", "sum"),
        ],
    )
    .expect("params");
    assert_eq!(
        (p.budget, p.recent, p.seed),
        (TokenBudget::Tokens(64), 0.5, 3)
    );
    assert!(KeyformerConfig::from_params(shape, [("window", "3")]).is_err());
    assert!(KeyformerConfig::from_params(shape, [("tau_init", "-1")]).is_err());
    // A fraction resolving to nothing fails at end_prefill, cache unchanged.
    let mut c = prefill(&KeyformerConfig::new(shape, TokenBudget::Ratio(0.01)), 5, 1);
    assert!(matches!(
        c.end_prefill(),
        Err(KvError::InvalidConfig {
            field: "budget",
            ..
        })
    ));
    assert_eq!(c.lengths().held, vec![5]);
    let json = serde_json::to_string(&p).expect("json");
    assert_eq!(
        serde_json::from_str::<KeyformerConfig>(&json).expect("parse"),
        p
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Every query's Gumbel softmax sums to 1, so a call adds its number of queries to the
    /// total score of a stream (GQA mean); decode streams hold at most the budget.
    #[test]
    fn each_query_adds_one_unit_of_score_and_decode_holds_the_budget(
        n in 2usize..12,
        budget in 2usize..8,
        recent in 0.0f64..1.0,
        tau in 0.05f32..5.0,
        seed in 0u64..1000,
    ) {
        let shape = KvShape::new(1, 2, 4, 8).expect("shape");
        let mut cfg = KeyformerConfig::new(shape, TokenBudget::Tokens(budget));
        cfg.recent = recent;
        cfg.tau_init = tau;
        cfg.seed = seed;
        let mut c = prefill(&cfg, n, seed);
        for s in 0..2 {
            let total: f32 = c.scores()[s].iter().sum();
            prop_assert!((total - n as f32).abs() < 1e-3 * n as f32, "{} vs {}", total, n);
        }
        c.end_prefill().expect("end_prefill");
        let (r, k) = cfg.split(budget);
        prop_assert!(c.lengths().held.iter().all(|&h| h == n.min(r + k)));
        for step in n as u32..n as u32 + 4 {
            c.append(block(shape, 1, step, seed + u64::from(step))).expect("decode");
            let cap = if r >= 1 { budget } else { budget + 1 };
            prop_assert!(c.lengths().held.iter().all(|&h| h <= cap));
            let p = held_positions(&c, 0);
            prop_assert_eq!(*p.last().expect("held"), step, "the new token is held");
            c.attend(&query(shape, 1, step, seed + 9), StatsRequest::NONE).expect("attend");
            prop_assert!(memory_matches_buffers(&c).is_ok());
        }
    }
}
