//! Eviction through the cache: budgets per head, memory freed, decode after eviction, chunked
//! prefill, configs and bad input.

use burn::prelude::*;
use kv_core::{
    KvBlock, KvCache, KvError, KvShape, Query, RopeConfig, RopeConvention, StatsRequest,
    memory_matches_buffers,
};
use kv_evict::{EvictConfig, EvictOutcome, EvictingCache, GqaReduce, ScorerConfig, kept_for};
use kv_testkit::{assert_close_slices, seeded_tensor, test_device, to_vec};
use proptest::prelude::*;

fn rope(d: usize) -> RopeConfig {
    RopeConfig::new(d, 10_000.0, RopeConvention::RotateHalf)
}

fn expected() -> ScorerConfig {
    ScorerConfig::ExpectedAttention {
        n_future_positions: 32,
        n_sink: 2,
        use_covariance: true,
        use_vnorm: true,
        epsilon: 0.0,
        gqa: GqaReduce::Mean,
    }
}

fn snap(window: usize) -> ScorerConfig {
    ScorerConfig::SnapKv {
        window,
        kernel: 5,
        gqa: GqaReduce::Mean,
    }
}

fn cache(shape: KvShape, ratio: f64, scorer: ScorerConfig) -> EvictingCache {
    EvictConfig::new(shape, ratio, scorer)
        .with_rope(rope(shape.head_dim()))
        .with_kept_scores()
        .init(&test_device())
        .expect("init")
}

/// Appends `n` tokens at `start` and attends their queries (as the model does in prefill).
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

fn positions(c: &EvictingCache) -> Vec<u32> {
    c.view().positions
}

#[test]
fn eviction_frees_memory_and_keeps_decode_tokens() {
    let shape = KvShape::new(1, 2, 4, 16).expect("shape");
    let mut c = cache(shape, 0.75, ScorerConfig::Knorm);
    feed(&mut c, 64, 0, 1);
    let before = c.memory();
    c.end_prefill().expect("compress");
    let after = c.memory();
    assert_eq!(c.lengths().held, vec![16, 16]);
    assert_eq!(
        c.last_outcome(),
        Some(&EvictOutcome::Compressed {
            before: 128,
            after: 32
        })
    );
    // Exactly-sized buffers: 2 heads x 16 rows x 16 channels x 4 bytes, for K and for V.
    assert_eq!(after.key_bytes, 2 * 16 * 16 * 4);
    assert_eq!(after.value_bytes, 2 * 16 * 16 * 4);
    assert!(
        after.stored_bytes() < before.stored_bytes() / 3,
        "{after:?} vs {before:?}"
    );
    memory_matches_buffers(&c).expect("honest memory");
    // Decode tokens are appended uncompressed; a second end_prefill does nothing.
    feed(&mut c, 3, 64, 9);
    c.end_prefill().expect("no-op");
    assert_eq!(c.lengths().held, vec![19, 19]);
    assert_eq!(c.lengths().logical, vec![67]);
    let p = positions(&c);
    assert_eq!(&p[16..19], &[64, 65, 66]);
    // Reset starts over.
    c.reset();
    assert!(!c.is_compressed() && c.last_outcome().is_none());
    feed(&mut c, 8, 0, 3);
    c.end_prefill().expect("compress again");
    assert_eq!(c.lengths().held, vec![2, 2]);
}

#[test]
fn snapkv_keeps_the_window_and_tova_the_last_token() {
    let shape = KvShape::new(1, 2, 6, 8).expect("shape");
    let mut c = cache(shape, 0.5, snap(4));
    feed(&mut c, 20, 0, 5);
    c.end_prefill().expect("compress");
    let p = positions(&c);
    for h in 0..2 {
        let head = &p[h * 10..(h + 1) * 10];
        assert_eq!(&head[6..], &[16, 17, 18, 19], "window kept in head {h}");
    }
    let mut t = cache(shape, 0.5, ScorerConfig::Tova);
    feed(&mut t, 20, 0, 5);
    t.end_prefill().expect("compress");
    let p = positions(&t);
    assert_eq!(p[9], 19);
    assert_eq!(&p[..10], &p[10..], "TOVA heads keep the same tokens");
}

/// Prefill in one chunk and in three gives the same scores (window, column sums and query
/// moments are accumulated across attend calls).
#[test]
fn chunked_prefill_scores_equal_single_pass() {
    let shape = KvShape::new(1, 2, 4, 8).expect("shape");
    let d = test_device();
    let n = 30;
    let kv = [1, 2, n, 8];
    let k = seeded_tensor(kv, 11, 1.0, &d);
    let v = seeded_tensor(kv, 12, 1.0, &d);
    let q = seeded_tensor([1, 4, n, 8], 13, 1.0, &d);
    let scorers = [
        snap(6),
        ScorerConfig::Tova,
        ScorerConfig::ObservedAttention {
            gqa: GqaReduce::Mean,
            recent: 0.0,
        },
        expected(),
    ];
    for scorer in scorers {
        let run = |cuts: &[usize]| {
            let mut c = cache(shape, 0.5, scorer.clone());
            for w in cuts.windows(2) {
                let (a, b) = (w[0], w[1]);
                let sl = |t: &Tensor<4>, h: usize| t.clone().slice([0..1, 0..h, a..b, 0..8]);
                c.append(KvBlock::contiguous(sl(&k, 2), sl(&v, 2), a as u32).expect("block"))
                    .expect("append");
                c.attend(
                    &Query::contiguous(sl(&q, 4), a as u32).expect("q"),
                    StatsRequest::NONE,
                )
                .expect("attend");
            }
            c.end_prefill().expect("compress");
            (c.last_scores().concat(), positions(&c))
        };
        let (s1, p1) = run(&[0, n]);
        let (s3, p3) = run(&[0, 7, 19, n]);
        assert_close_slices(&s3, &s1, 1e-5, 1e-4);
        assert_eq!(p3, p1, "{}", scorer.name());
    }
}

#[test]
fn scorers_without_queries_skip_and_key_scorers_do_not_need_them() {
    let shape = KvShape::new(1, 1, 2, 8).expect("shape");
    let d = test_device();
    let k = seeded_tensor([1, 1, 12, 8], 1, 1.0, &d);
    let mut c = cache(shape, 0.5, snap(2));
    c.append(KvBlock::contiguous(k.clone(), k.clone(), 0).expect("block"))
        .expect("append");
    c.end_prefill().expect("storage only");
    assert!(matches!(
        c.last_outcome(),
        Some(EvictOutcome::Skipped { .. })
    ));
    assert_eq!(c.lengths().held, vec![12]);
    let mut c = cache(shape, 0.5, ScorerConfig::KeyDiff);
    c.append(KvBlock::contiguous(k.clone(), k, 0).expect("block"))
        .expect("append");
    c.end_prefill().expect("compress");
    assert_eq!(c.lengths().held, vec![6]);
}

#[test]
fn expected_attention_variants_run_and_keep_sinks() {
    let shape = KvShape::new(1, 2, 4, 8).expect("shape");
    for (cov, vnorm) in [(true, true), (false, true), (true, false), (false, false)] {
        let scorer = ScorerConfig::ExpectedAttention {
            n_future_positions: 8,
            n_sink: 3,
            use_covariance: cov,
            use_vnorm: vnorm,
            epsilon: 0.0,
            gqa: GqaReduce::Max,
        };
        let mut c = cache(shape, 0.75, scorer);
        feed(&mut c, 20, 0, 21);
        c.end_prefill().expect("compress");
        let p = positions(&c);
        assert_eq!(&p[..3], &[0, 1, 2], "sinks kept ({cov}, {vnorm})");
        assert_eq!(&p[5..8], &[0, 1, 2]);
    }
}

#[test]
fn bad_configs_are_rejected() {
    let shape = KvShape::new(1, 1, 1, 8).expect("shape");
    let d = test_device();
    for ratio in [1.0, -0.1, 1.5, f64::NAN] {
        let e = EvictConfig::new(shape, ratio, ScorerConfig::Knorm).init(&d);
        assert!(
            matches!(e, Err(KvError::InvalidConfig { field: "ratio", .. })),
            "ratio {ratio}: {e:?}"
        );
    }
    let even = ScorerConfig::SnapKv {
        window: 4,
        kernel: 4,
        gqa: GqaReduce::Mean,
    };
    assert!(matches!(
        EvictConfig::new(shape, 0.5, even).init(&d),
        Err(KvError::InvalidConfig {
            field: "kernel",
            ..
        })
    ));
    assert!(matches!(
        EvictConfig::new(shape, 0.5, expected()).init(&d),
        Err(KvError::InvalidConfig { field: "rope", .. })
    ));
    assert!(matches!(
        EvictConfig::new(shape, 0.5, ScorerConfig::Knorm)
            .with_layer(3, 2)
            .init(&d),
        Err(KvError::InvalidConfig { field: "layer", .. })
    ));
    assert!(ScorerConfig::from_params("snapkv", [("window", "32"), ("kernel", "7")]).is_ok());
    assert!(ScorerConfig::from_params("snapkv", [("n_sink", "3")]).is_err());
    assert!(ScorerConfig::from_params("snapkv", [("window", "x")]).is_err());
    assert!(ScorerConfig::from_params("nope", []).is_err());
    assert!(ScorerConfig::from_params("observed_attention", [("gqa", "max")]).is_ok());
}

fn snapshot(c: &EvictingCache) -> (Vec<f32>, Vec<u32>, kv_core::MemoryReport) {
    let v = c.view();
    (to_vec(&v.keys), v.positions, c.memory())
}

#[test]
fn window_longer_than_prompt_and_empty_prompt_are_errors_leaving_cache_unchanged() {
    let shape = KvShape::new(1, 2, 4, 8).expect("shape");
    let mut c = cache(shape, 0.5, snap(64));
    feed(&mut c, 40, 0, 3);
    let before = snapshot(&c);
    let e = c.end_prefill();
    assert!(
        matches!(
            e,
            Err(KvError::InvalidConfig {
                field: "window",
                ..
            })
        ),
        "{e:?}"
    );
    assert_eq!(snapshot(&c), before, "unchanged after the error");
    assert!(!c.is_compressed());

    let mut s = cache(shape, 0.5, ScorerConfig::StreamingLlm { n_sink: 4 });
    feed(&mut s, 4, 0, 3);
    assert!(matches!(
        s.end_prefill(),
        Err(KvError::InvalidConfig {
            field: "n_sink",
            ..
        })
    ));
    assert_eq!(s.lengths().held, vec![4, 4]);

    let mut e = cache(shape, 0.5, ScorerConfig::Knorm);
    assert!(matches!(e.end_prefill(), Err(KvError::Empty { .. })));
    assert_eq!(e.memory().stored_bytes(), 0);
}

#[test]
fn config_round_trips_through_json_with_defaults() {
    let shape = KvShape::new(1, 3, 9, 64).expect("shape");
    let cfg = EvictConfig::new(shape, 0.5, snap(32)).with_rope(rope(64));
    let json = serde_json::to_string(&cfg).expect("serialise");
    let back: EvictConfig = serde_json::from_str(&json).expect("deserialise");
    assert_eq!(back, cfg);
    let s: ScorerConfig = serde_json::from_str(r#"{"method": "snapkv"}"#).expect("defaults");
    assert_eq!(s, snap(64));
    let s: ScorerConfig =
        serde_json::from_str(r#"{"method": "expected_attention"}"#).expect("defaults");
    assert_eq!(
        s,
        ScorerConfig::default_for("expected_attention").expect("known")
    );
    // Every registry name is its serde tag.
    for (name, _) in kv_evict::PARAMS {
        let s: ScorerConfig =
            serde_json::from_str(&format!(r#"{{"method": "{name}"}}"#)).expect("tag");
        assert_eq!(s.name(), *name);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Every (sequence, KV head) keeps exactly floor(n (1 - ratio)) tokens, sorted and unique,
    /// for any prompt length, ratio and scorer.
    #[test]
    fn kept_count_is_floor_and_positions_sorted_unique(
        shape in kv_testkit::strategies::kv_shape(),
        n in 7usize..40,
        ratio in 0.0f64..0.99,
        which in 0usize..5,
        seed in 0u64..1000,
    ) {
        let scorer = match which {
            0 => ScorerConfig::Knorm,
            1 => ScorerConfig::StreamingLlm { n_sink: 2 },
            2 => snap(3),
            3 => ScorerConfig::ObservedAttention { gqa: GqaReduce::Sum, recent: 0.0 },
            _ => expected(),
        };
        let mut c = cache(shape, ratio, scorer);
        feed(&mut c, n, 0, seed);
        c.end_prefill().expect("compress");
        let k = kept_for(n, ratio);
        prop_assert_eq!(c.lengths().held, vec![k; shape.streams()]);
        let p = positions(&c);
        for s in 0..shape.streams() {
            let head = &p[s * k..(s + 1) * k];
            prop_assert!(head.windows(2).all(|w| w[0] < w[1]), "{:?}", head);
            prop_assert!(head.iter().all(|&x| (x as usize) < n));
        }
        prop_assert!(memory_matches_buffers(&c).is_ok());
    }
}
