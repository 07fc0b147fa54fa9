//! Decode-time Scissorhands: the catalog's hand case (card 19), the history window, the cache
//! against an independent model of cold-compress's rules, budgets and bad input.

use std::collections::BTreeMap;

use kv_core::{KvBlock, KvCache, KvError, KvShape, Query, StatsRequest, memory_matches_buffers};
use kv_evict::{ImportanceHistory, ScissorhandsCache, ScissorhandsConfig, TokenBudget};
use kv_testkit::{seeded_tensor, test_device, to_vec};
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

/// Per-row values of stream `s` reordered by position.
fn by_position(c: &dyn KvCache, s: usize, values: &[f32]) -> Vec<f32> {
    let pos = rows_positions(c, s);
    let mut rows: Vec<usize> = (0..pos.len()).collect();
    rows.sort_unstable_by_key(|&j| pos[j]);
    rows.iter().map(|&j| values[j]).collect()
}

#[test]
fn card_19_persistent_importance_decides_and_recent_tokens_are_spared() {
    // w = 3, uniform 1/t = 0.25 (t = 4 tokens). Token 0 gets [0.5, 0.01, 0.01]: important
    // once, 1/3. Token 1 gets [0.3, 0.3, 0.3]: 3/3. Token 2 gets 0 every time but is among
    // the r = 2 most recent, token 3 too.
    let mut h = ImportanceHistory::new(1, 3, true);
    h.push(0, 4);
    for a in [0.5f32, 0.01, 0.01] {
        h.observe(0, &[Some(a), Some(0.3), Some(0.0), Some(0.0)], 0.25);
    }
    assert_eq!(h.scores(0), [1.0 / 3.0, 1.0, 0.0, 0.0]);
    // One token must go: token 0, the one most often unimportant; tokens 2 and 3 are recent.
    assert_eq!(h.keep_after_evicting(0, 1, 0, 2), [1, 2, 3]);
    // Two: tokens 0 and 1; more than the evictable two: still only those.
    assert_eq!(h.keep_after_evicting(0, 2, 0, 2), [2, 3]);
    assert_eq!(h.keep_after_evicting(0, 9, 0, 2), [2, 3]);
    // A sink is spared too.
    assert_eq!(h.keep_after_evicting(0, 9, 1, 2), [0, 2, 3]);
    // Ties go to the earlier token (cold-compress's argmin): tokens 2 and 3 both score 0.
    assert_eq!(h.keep_after_evicting(0, 1, 0, 0), [0, 1, 3]);
    // Exactly uniform attention counts as important (`attn >= 1 / t`).
    let mut u = ImportanceHistory::new(1, 3, true);
    u.push(0, 2);
    u.observe(0, &[Some(0.25), Some(0.249)], 0.25);
    assert_eq!(u.scores(0), [1.0, 0.0]);
}

#[test]
fn the_history_is_a_sliding_window_per_token() {
    // Token 0 unimportant for three calls, then important for three: with w = 3 the old calls
    // roll out. A token that arrives later is scored over its own observations only.
    let mut h = ImportanceHistory::new(1, 3, true);
    h.push(0, 1);
    for a in [0.0f32, 0.0, 0.0, 1.0, 1.0] {
        h.observe(0, &[Some(a)], 0.5);
    }
    assert_eq!(h.scores(0), [2.0 / 3.0]);
    h.push(0, 1);
    h.observe(0, &[Some(1.0), Some(0.9)], 0.5);
    assert_eq!(h.scores(0), [1.0, 1.0]);
    // Unseen (None) leaves the history as it is; a new token without observation scores 0.
    h.push(0, 1);
    h.observe(0, &[None, Some(0.0), None], 0.5);
    assert_eq!(h.scores(0), [1.0, 0.5, 0.0]);
    // A window wider than 64 calls spans several words.
    let mut h = ImportanceHistory::new(1, 100, true);
    h.push(0, 2);
    for i in 0..150 {
        h.observe(
            0,
            &[Some(if i % 3 == 0 { 1.0 } else { 0.0 }), Some(1.0)],
            0.5,
        );
    }
    // Calls 50..150: i % 3 == 0 for 33 of them.
    assert_eq!(h.scores(0), [0.33, 1.0]);
    // Raw mode: the mean attention over the window.
    let mut r = ImportanceHistory::new(1, 2, false);
    r.push(0, 1);
    for a in [0.9f32, 0.1, 0.3] {
        r.observe(0, &[Some(a)], 0.5);
    }
    assert!((r.scores(0)[0] - 0.2).abs() < 1e-6);
    // Retain keeps rings aligned.
    let mut h = ImportanceHistory::new(1, 2, true);
    h.push(0, 3);
    h.observe(0, &[Some(1.0), Some(0.0), Some(1.0)], 0.5);
    h.retain(&[vec![1, 2]]);
    assert_eq!(h.scores(0), [0.0, 1.0]);
    assert_eq!(h.len(0), 2);
}

/// An independent model of cold-compress's `KVCacheHeavyHitter` with thresholding: a list of
/// observations per held (stream, position), from the reference attention over the view.
struct Model {
    obs: Vec<BTreeMap<u32, Vec<bool>>>,
    history: usize,
}

impl Model {
    fn observe(&mut self, c: &ScissorhandsCache, q: &Query) {
        let view = c.view();
        let cols = view
            .attend_reference(q, StatsRequest::COLUMN_SUMS)
            .stats
            .column_sums
            .expect("cols");
        let [b, kvh, g, w] = cols.dims();
        let cols = to_vec(&cols);
        let n = q.len();
        for bi in 0..b {
            let qpos = &q.positions()[bi * n..(bi + 1) * n];
            for h in 0..kvh {
                let s = bi * kvh + h;
                let held = (0..w)
                    .filter(|&j| view.positions[s * w + j] != kv_core::PAD)
                    .count();
                for j in 0..held {
                    let p = view.positions[s * w + j];
                    let seen = qpos.iter().filter(|&&x| x >= p).count();
                    if seen == 0 {
                        continue;
                    }
                    let sum: f32 = (0..g).map(|i| cols[((s * g) + i) * w + j]).sum();
                    let mean = sum / g as f32 / seen as f32;
                    self.obs[s]
                        .get_mut(&p)
                        .expect("held")
                        .push(mean >= 1.0 / held as f32);
                }
            }
        }
    }

    fn score(&self, v: &[bool]) -> f32 {
        let last = &v[v.len().saturating_sub(self.history)..];
        if last.is_empty() {
            0.0
        } else {
            last.iter().filter(|&&x| x).count() as f32 / last.len() as f32
        }
    }

    /// Evicts `excess` tokens of stream `s`, sparing `n_sink` first and `recent` last.
    fn evict(&mut self, s: usize, excess: usize, n_sink: usize, recent: usize) {
        let all: Vec<(u32, f32)> = self.obs[s]
            .iter()
            .map(|(&p, v)| (p, self.score(v)))
            .collect();
        let hi = all.len().saturating_sub(recent);
        if n_sink >= hi {
            return;
        }
        let mut cand = all[n_sink..hi].to_vec();
        cand.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        for (p, _) in cand.into_iter().take(excess) {
            self.obs[s].remove(&p);
        }
    }
}

#[test]
fn cache_follows_cold_compress_rules_through_prefill_and_decode() {
    let shape = KvShape::new(2, 2, 4, 8).expect("shape");
    let (budget, n_sink, recent, history) = (8, 1, 2, 3);
    let mut cfg = ScissorhandsConfig::new(shape, TokenBudget::Tokens(budget));
    cfg.n_sink = n_sink;
    cfg.recent = recent;
    cfg.history = history;
    let mut c = cfg.init(&test_device()).expect("init");
    let mut m = Model {
        obs: vec![BTreeMap::new(); shape.streams()],
        history,
    };
    let check = |c: &ScissorhandsCache, m: &Model, when: &str| {
        for s in 0..shape.streams() {
            let want: Vec<u32> = m.obs[s].keys().copied().collect();
            assert_eq!(held_positions(c, s), want, "{when}, stream {s}");
            let sc: Vec<f32> = m.obs[s].values().map(|v| m.score(v)).collect();
            assert_eq!(
                by_position(c, s, &c.history().scores(s)),
                sc,
                "{when}, stream {s}"
            );
        }
    };
    // A prompt of 12 tokens in one pass: one observation each, then trimmed to the budget.
    c.append(block(shape, 12, 0, 1)).expect("prefill");
    for s in 0..shape.streams() {
        m.obs[s].extend((0..12).map(|p| (p, Vec::new())));
    }
    let q = query(shape, 12, 0, 3);
    m.observe(&c, &q);
    c.attend(&q, StatsRequest::NONE).expect("attend");
    c.end_prefill().expect("end_prefill");
    for s in 0..shape.streams() {
        m.evict(s, 12 - budget, n_sink, recent);
    }
    check(&c, &m, "after prefill");
    assert_eq!(c.lengths().held, vec![budget; 4]);
    for step in 12..24u32 {
        c.append(block(shape, 1, step, 10 + u64::from(step)))
            .expect("decode");
        for s in 0..shape.streams() {
            m.evict(s, 1, n_sink, recent);
            m.obs[s].insert(step, Vec::new());
        }
        assert_eq!(
            c.lengths().held,
            vec![budget; 4],
            "B held, the new token included"
        );
        let q = query(shape, 1, step, 40 + u64::from(step));
        m.observe(&c, &q);
        c.attend(&q, StatsRequest::NONE).expect("attend");
        check(&c, &m, &format!("step {step}"));
        memory_matches_buffers(&c).expect("honest memory");
        for s in 0..shape.streams() {
            let p = held_positions(&c, s);
            assert_eq!(p[0], 0, "the sink stays");
            assert_eq!(
                &p[p.len() - 3..],
                &[step - 2, step - 1, step],
                "recent + new stay"
            );
        }
    }
    assert_eq!(c.lengths().logical, vec![24, 24]);
    // History: 1 word + 4-byte count per token, 4-byte position; fp32 K and V.
    let m = c.memory();
    assert_eq!(m.held_token_slots, 4 * budget);
    assert!(m.metadata_bytes >= 4 * budget * (8 + 4 + 4));
}

#[test]
fn fractions_resolve_at_end_prefill_and_small_budgets_are_errors() {
    let shape = KvShape::new(1, 1, 2, 8).expect("shape");
    let d = test_device();
    let mut c = ScissorhandsConfig::new(shape, TokenBudget::Ratio(0.5))
        .init(&d)
        .expect("init");
    c.append(block(shape, 20, 0, 1)).expect("chunk");
    c.attend(&query(shape, 20, 0, 2), StatsRequest::NONE)
        .expect("attend");
    c.append(block(shape, 20, 20, 3)).expect("chunk");
    c.attend(&query(shape, 20, 20, 4), StatsRequest::NONE)
        .expect("attend");
    assert_eq!(
        c.lengths().held,
        vec![40],
        "nothing evicted before the prompt is known"
    );
    assert_eq!(c.budget(0), None);
    c.end_prefill().expect("end_prefill");
    assert_eq!(c.budget(0), Some(20));
    assert_eq!(c.lengths().held, vec![20]);
    let p = held_positions(&c, 0);
    assert_eq!(&p[..4], &[0, 1, 2, 3], "4 sinks");
    assert_eq!(&p[10..], &(30..40).collect::<Vec<u32>>()[..], "10 recent");
    c.reset();
    assert_eq!(c.budget(0), None);
    assert!(c.history().is_empty(0));

    // Budgets that cannot evict anything are config errors.
    let bad = ScissorhandsConfig::new(shape, TokenBudget::Tokens(14)).init(&d);
    assert!(matches!(
        bad,
        Err(KvError::InvalidConfig {
            field: "budget",
            ..
        })
    ));
    let mut cfg = ScissorhandsConfig::new(shape, TokenBudget::Tokens(20));
    cfg.history = 0;
    assert!(matches!(
        cfg.init(&d),
        Err(KvError::InvalidConfig {
            field: "history",
            ..
        })
    ));
    // A fraction resolving to too few tokens fails at end_prefill, cache unchanged.
    let mut c = ScissorhandsConfig::new(shape, TokenBudget::Ratio(0.2))
        .init(&d)
        .expect("init");
    c.append(block(shape, 30, 0, 1)).expect("append");
    assert!(matches!(
        c.end_prefill(),
        Err(KvError::InvalidConfig {
            field: "budget",
            ..
        })
    ));
    assert_eq!(c.lengths().held, vec![30]);
    assert_eq!(c.budget(0), None);
}

#[test]
fn params_parse_with_the_reference_defaults() {
    let shape = KvShape::new(1, 1, 1, 8).expect("shape");
    let c = ScissorhandsConfig::from_params(shape, []).expect("defaults");
    assert_eq!(
        (c.budget, c.recent, c.n_sink, c.history, c.threshold),
        (TokenBudget::Ratio(0.5), 10, 4, 400, true)
    );
    let c = ScissorhandsConfig::from_params(
        shape,
        [
            ("budget", "128"),
            ("recent", "3"),
            ("n_sink", "0"),
            ("history", "50"),
            ("threshold", "false"),
            ("gqa", "max"),
        ],
    )
    .expect("params");
    assert_eq!(c.budget, TokenBudget::Tokens(128));
    assert_eq!(
        (c.recent, c.n_sink, c.history, c.threshold),
        (3, 0, 50, false)
    );
    for (k, v, field) in [
        ("window", "3", "param"),
        ("recent", "x", "recent"),
        ("budget", "1.5", "budget"),
        ("gqa", "median", "gqa"),
        ("budget", "12", "budget"),
    ] {
        assert!(
            matches!(
                ScissorhandsConfig::from_params(shape, [(k, v)]),
                Err(KvError::InvalidConfig { field: f, .. }) if f == field
            ),
            "{k}={v}"
        );
    }
    // JSON round trip with defaults filled in.
    let json = serde_json::to_string(&c).expect("json");
    let back: ScissorhandsConfig = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, c);
}

#[test]
fn raw_mode_and_bad_blocks_leave_the_cache_unchanged() {
    let shape = KvShape::new(1, 1, 1, 8).expect("shape");
    let mut cfg = ScissorhandsConfig::new(shape, TokenBudget::Tokens(5));
    cfg.threshold = false;
    cfg.n_sink = 1;
    cfg.recent = 1;
    let mut c = cfg.init(&test_device()).expect("init");
    c.append(block(shape, 8, 0, 1)).expect("append");
    c.attend(&query(shape, 8, 0, 2), StatsRequest::NONE)
        .expect("attend");
    c.end_prefill().expect("evict");
    assert_eq!(c.lengths().held, vec![5]);
    // Raw scores are mean attentions: each in (0, 1].
    assert!(c.history().scores(0).iter().all(|&x| x > 0.0 && x <= 1.0));
    let before = (held_positions(&c, 0), c.history().clone(), c.memory());
    assert!(
        c.append(block(shape, 1, 7, 9)).is_err(),
        "position 7 was appended"
    );
    assert_eq!(
        (held_positions(&c, 0), c.history().clone(), c.memory()),
        before
    );
    c.append(block(shape, 1, 8, 9)).expect("position 8 is new");
    assert_eq!(c.lengths().held, vec![5]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Whatever the parameters, a decode stream holds exactly its budget after each append
    /// and keeps its sinks and its `recent` newest tokens.
    #[test]
    fn decode_holds_the_budget_and_spares_sinks_and_recent(
        n_sink in 0usize..3,
        recent in 0usize..4,
        extra in 1usize..5,
        history in 1usize..6,
        prompt in 1usize..16,
        threshold in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let shape = KvShape::new(1, 2, 4, 8).expect("shape");
        let budget = n_sink + recent + extra;
        let mut cfg = ScissorhandsConfig::new(shape, TokenBudget::Tokens(budget));
        cfg.n_sink = n_sink;
        cfg.recent = recent;
        cfg.history = history;
        cfg.threshold = threshold;
        let mut c = cfg.init(&test_device()).expect("init");
        c.append(block(shape, prompt, 0, seed)).expect("prefill");
        c.attend(&query(shape, prompt, 0, seed + 7), StatsRequest::NONE).expect("attend");
        c.end_prefill().expect("end_prefill");
        prop_assert!(c.lengths().held.iter().all(|&h| h == prompt.min(budget)));
        for step in prompt as u32..prompt as u32 + 6 {
            c.append(block(shape, 1, step, seed + u64::from(step))).expect("decode");
            let n = (step as usize + 1).min(budget);
            prop_assert_eq!(c.lengths().held.clone(), vec![n; 2]);
            c.attend(&query(shape, 1, step, seed + 50 + u64::from(step)), StatsRequest::NONE)
                .expect("attend");
            for s in 0..2 {
                let p = held_positions(&c, s);
                let sinks: Vec<u32> = (0..n_sink.min(p.len()) as u32).collect();
                prop_assert_eq!(&p[..sinks.len()], &sinks[..]);
                let r = (recent + 1).min(p.len());
                let want: Vec<u32> = (step + 1 - r as u32..=step).collect();
                prop_assert_eq!(&p[p.len() - r..], &want[..]);
            }
            prop_assert!(memory_matches_buffers(&c).is_ok());
        }
    }
}
