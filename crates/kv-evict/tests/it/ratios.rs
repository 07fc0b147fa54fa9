//! Compression ratios for the decode-time policies: `floor(n (1 - ratio))` tokens per KV head
//! at the end of prefill, split as each paper does, equal to the explicit budgets it stands for.

use kv_core::{KvBlock, KvCache, KvError, KvShape, Query, StatsRequest};
use kv_evict::{
    H2oConfig, KeyformerConfig, ScissorhandsConfig, StreamingConfig, TokenBudget, kept_for,
};
use kv_testkit::{seeded_tensor, test_device};
use proptest::prelude::*;

fn shape() -> KvShape {
    KvShape::new(1, 2, 4, 8).expect("shape")
}

fn step(c: &mut dyn KvCache, n: usize, start: u32, seed: u64) {
    let s = c.shape();
    let d = test_device();
    let kv = [1, s.kv_heads(), n, s.head_dim()];
    c.append(
        KvBlock::contiguous(
            seeded_tensor(kv, seed, 1.5, &d),
            seeded_tensor(kv, seed + 1, 1.0, &d),
            start,
        )
        .expect("block"),
    )
    .expect("append");
    let q = seeded_tensor([1, s.q_heads(), n, s.head_dim()], seed + 2, 1.5, &d);
    c.attend(&Query::contiguous(q, start).expect("q"), StatsRequest::NONE)
        .expect("attend");
}

/// Held positions of every KV head after a prefill of `n` and `decode` steps.
fn trace(c: &mut dyn KvCache, n: usize, decode: usize) -> Vec<Vec<u32>> {
    step(c, n, 0, 1);
    c.end_prefill().expect("end_prefill");
    let mut out = vec![c.view().positions];
    for t in 0..decode {
        step(c, 1, (n + t) as u32, 100 + 3 * t as u64);
        out.push(c.view().positions);
    }
    out
}

#[test]
fn h2o_ratio_is_half_heavy_half_recent_of_the_kvpress_count() {
    let d = test_device();
    // 21 tokens at ratio 0.5 keep floor(10.5) = 10: 5 recent, 5 heavy.
    let mut c = H2oConfig::with_ratio(shape(), 0.5).init(&d).expect("init");
    let got = trace(&mut c, 21, 5);
    assert_eq!(c.budget(0), Some((5, 5)));
    assert_eq!(c.lengths().held[0], 11, "heavy + recent + the newest token");
    let mut explicit = H2oConfig::new(shape(), TokenBudget::Tokens(5), TokenBudget::Tokens(5))
        .init(&d)
        .expect("init");
    assert_eq!(
        got,
        trace(&mut explicit, 21, 5),
        "same as heavy=5, recent=5"
    );
    // An odd count gives the extra token to the heavy hitters: 15 at 0.4 keeps 9 = 5 + 4.
    let mut c = H2oConfig::with_ratio(shape(), 0.4).init(&d).expect("init");
    step(&mut c, 15, 0, 1);
    c.end_prefill().expect("end_prefill");
    assert_eq!(c.budget(0), Some((5, 4)));
    assert_eq!(c.lengths().held, [9, 9]);
}

#[test]
fn h2o_ratio_conflicts_and_bad_values_are_errors() {
    let d = test_device();
    let mut cfg = H2oConfig::with_ratio(shape(), 0.5);
    cfg.heavy = TokenBudget::Tokens(3);
    let e = cfg.init(&d).expect_err("ratio + heavy");
    assert!(
        matches!(e, KvError::InvalidConfig { field: "ratio", .. }),
        "{e}"
    );
    for r in [1.0, -0.1, f64::NAN] {
        let e = H2oConfig::with_ratio(shape(), r)
            .init(&d)
            .expect_err("ratio outside [0, 1)");
        assert!(
            matches!(e, KvError::InvalidConfig { field: "ratio", .. }),
            "{e}"
        );
    }
    // A 1-token prompt at ratio 0.5 keeps nothing: an error, the cache unchanged.
    let mut c = H2oConfig::with_ratio(shape(), 0.5).init(&d).expect("init");
    step(&mut c, 1, 0, 1);
    let e = c.end_prefill().expect_err("budget 0");
    assert!(
        matches!(e, KvError::InvalidConfig { field: "ratio", .. }),
        "{e}"
    );
    assert_eq!(c.lengths().held, [1, 1]);
    // The JSON of a ratio config round-trips; the count configs serialise as before.
    let json = serde_json::to_string(&H2oConfig::with_ratio(shape(), 0.75)).expect("json");
    let back: H2oConfig = serde_json::from_str(&json).expect("parse");
    assert_eq!(back.ratio, Some(0.75));
    let plain = H2oConfig::new(shape(), TokenBudget::Tokens(3), TokenBudget::Tokens(3));
    assert!(
        !serde_json::to_string(&plain)
            .expect("json")
            .contains("ratio")
    );
}

#[test]
fn streaming_ratio_keeps_the_sinks_and_the_rest_recent() {
    let d = test_device();
    // 20 tokens at ratio 0.5 keep 10: 2 sinks + 8 recent, then a rolling window of 10.
    let mut c = StreamingConfig::with_ratio(shape(), 2, 0.5)
        .init(&d)
        .expect("init");
    let got = trace(&mut c, 20, 4);
    assert_eq!(c.recent(0), Some(8));
    let head0 = |p: &Vec<u32>| {
        let mut h = p[..p.len() / 2].to_vec();
        h.sort_unstable();
        h
    };
    assert_eq!(head0(&got[0]), [0, 1, 12, 13, 14, 15, 16, 17, 18, 19]);
    assert_eq!(head0(&got[4]), [0, 1, 16, 17, 18, 19, 20, 21, 22, 23]);
    let mut explicit = StreamingConfig::new(shape(), 2, 8).init(&d).expect("init");
    assert_eq!(
        got,
        trace(&mut explicit, 20, 4),
        "same as n_sink=2, recent=8"
    );

    let mut cfg = StreamingConfig::with_ratio(shape(), 2, 0.5);
    cfg.recent = 8;
    let e = cfg.init(&d).expect_err("ratio + recent");
    assert!(
        matches!(e, KvError::InvalidConfig { field: "ratio", .. }),
        "{e}"
    );
    // 5 tokens at 0.5 keep 2: no room beside 2 sinks.
    let mut c = StreamingConfig::with_ratio(shape(), 2, 0.5)
        .init(&d)
        .expect("init");
    step(&mut c, 5, 0, 1);
    let e = c.end_prefill().expect_err("2 kept <= 2 sinks");
    assert!(
        matches!(e, KvError::InvalidConfig { field: "ratio", .. }),
        "{e}"
    );
    assert_eq!(c.lengths().held, [5, 5]);
    // Nothing is trimmed before end_prefill with a ratio (the budget is not known yet).
    let mut c = StreamingConfig::with_ratio(shape(), 2, 0.9)
        .init(&d)
        .expect("init");
    step(&mut c, 30, 0, 1);
    step(&mut c, 30, 30, 5);
    assert_eq!(c.lengths().held, [60, 60]);
}

#[test]
fn scissorhands_and_keyformer_ratios_are_their_kept_fraction() {
    let d = test_device();
    let b = TokenBudget::from_ratio(0.9).expect("ratio");
    assert_eq!(b.resolve(3072), kept_for(3072, 0.9));
    assert_eq!(b.resolve(3072), 307);
    assert!(TokenBudget::from_ratio(1.0).is_err());
    // Scissorhands: B = floor(n (1 - ratio)) after the prompt.
    let mut cfg = ScissorhandsConfig::new(shape(), TokenBudget::from_ratio(0.6).expect("r"));
    cfg.recent = 2;
    cfg.n_sink = 1;
    let mut c = cfg.init(&d).expect("init");
    step(&mut c, 25, 0, 1);
    c.end_prefill().expect("end_prefill");
    assert_eq!(c.budget(0), Some(kept_for(25, 0.6)));
    assert_eq!(c.lengths().held, [10, 10]);
    // Keyformer: B split 30% recent, 70% key: 40 at 0.5 keeps 20 = 6 + 14.
    let mut c = KeyformerConfig::new(shape(), TokenBudget::from_ratio(0.5).expect("r"))
        .init(&d)
        .expect("init");
    step(&mut c, 40, 0, 1);
    c.end_prefill().expect("end_prefill");
    assert_eq!(c.budget(0), Some((6, 14)));
    assert_eq!(c.lengths().held, [20, 20]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_ratio_budget_resolves_to_the_kvpress_count(n in 0usize..100_000, r in 0.0f64..1.0) {
        let b = TokenBudget::from_ratio(r).expect("ratio in [0, 1)");
        prop_assert_eq!(b.resolve(n), kept_for(n, r));
        let h2o = H2oConfig::with_ratio(shape(), r);
        let (heavy, recent) = h2o.resolve(n);
        prop_assert_eq!(heavy + recent, kept_for(n, r));
        prop_assert!(heavy == recent || heavy == recent + 1);
    }
}
