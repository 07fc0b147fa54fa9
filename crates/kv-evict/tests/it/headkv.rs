//! HeadKV: the catalog's budget cases (card 23), the artefact (load, validate, the shipped
//! SmolLM2 calibration), the retrieval score, the probe and the budgets through the cache.

use std::sync::{Arc, Mutex};

use kv_core::{KvBlock, KvCache, KvError, KvShape, Query, StatsRequest, memory_matches_buffers};
use kv_evict::{
    BudgetKind, EvictConfig, GqaReduce, HEAD_IMPORTANCE_FORMAT, HEAD_IMPORTANCE_VERSION,
    HeadImportance, HeadKvBudget, ProbeLog, RetrievalProbe, ScorerConfig, kept_for,
    retrieval_scores,
};
use kv_testkit::{seeded_tensor, test_device, to_vec};
use proptest::prelude::*;

const SHIPPED: &str = include_str!("../../data/headkv_smollm2_135m_instruct.json");

fn artefact(scores: Vec<Vec<f64>>, kv_heads: usize, head_dim: usize) -> HeadImportance {
    HeadImportance {
        format: HEAD_IMPORTANCE_FORMAT.into(),
        version: HEAD_IMPORTANCE_VERSION,
        model: "synthetic".into(),
        num_layers: scores.len(),
        q_heads: scores[0].len(),
        kv_heads,
        head_dim,
        method: "hand-written".into(),
        trials: 1,
        scores,
    }
}

#[test]
fn card_23_uniform_scores_give_uniform_budgets_and_zero_scores_the_floor() {
    // 4 layers x 2 KV heads (4 query heads); n = 1000 at ratio 0.9: B = 99 (kvpress's
    // int(1000 * 0.09999999999999998)), window 4, B' = 95. beta 1.01: floor(95 / 1.01) = 94
    // pooled per head, 1 kept for sure.
    let uniform = artefact(vec![vec![0.5; 4]; 4], 2, 8);
    for layer in 0..4 {
        let b = HeadKvBudget::new(&uniform, layer, 0.9, 4, 1.01, 1.0).expect("valid");
        assert_eq!(b.head_budget(1000, 0), kept_for(1000, 0.9));
        assert_eq!(b.budgets(1000), [99, 99]);
    }
    // All the importance on layer 0, KV head 0 (its two query heads).
    let mut s = vec![vec![0.0; 4]; 4];
    s[0][0] = 3.0;
    s[0][1] = 1.0;
    let one = artefact(s, 2, 8);
    let p = one.kv_head_distribution(1.0);
    assert_eq!(p[0], [1.0, 0.0]);
    let mut total = 0;
    for layer in 0..4 {
        let b = HeadKvBudget::new(&one, layer, 0.9, 4, 1.01, 1.0).expect("valid");
        for (h, &share) in b.shares().iter().enumerate() {
            let k = b.head_budget(1000, h);
            total += k;
            if share == 0.0 {
                assert_eq!(k, 95 - 94 + 4, "p = 0 keeps B' - floor(B'/beta) + window");
            } else {
                assert_eq!(k, 94 * 8 + 1 + 4);
            }
        }
    }
    assert_eq!(total, 4 * 2 * 99, "sum = L H B");
    // beta 2: floor(95 / 2) = 47 pooled, 48 for sure.
    let b = HeadKvBudget::new(&one, 1, 0.9, 4, 2.0, 1.0).expect("valid");
    assert_eq!(b.head_budget(1000, 0), 48 + 4);
    // A head cannot hold more than its stream: n = 10 at ratio 0.5, B = 5, 4 pooled per head
    // (32 in all), 1 for sure. Layer 0 head 0 would take 32 but holds 10 (9 from the pool); the
    // other 23 go evenly to the 7 heads without importance: round(1 + 23/7) = 4 each.
    let b = HeadKvBudget::new(&one, 0, 0.5, 0, 1.01, 1.0).expect("valid");
    assert_eq!(b.budgets(10), [10, 4]);
    let b = HeadKvBudget::new(&one, 3, 0.5, 0, 1.01, 1.0).expect("valid");
    assert_eq!(b.budgets(10), [4, 4]);
    // temp sharpens: q scores [1, 3] -> KV mean 2 vs [1, 1] -> 1; p = [2/3, 1/3];
    // temp 2: [4/9, 1/9] / (5/9) = [0.8, 0.2].
    let t = artefact(vec![vec![1.0, 3.0, 1.0, 1.0]], 2, 8);
    let p1 = t.kv_head_distribution(1.0);
    assert!((p1[0][0] - 2.0 / 3.0).abs() < 1e-12 && (p1[0][1] - 1.0 / 3.0).abs() < 1e-12);
    let p2 = t.kv_head_distribution(2.0);
    assert!((p2[0][0] - 0.8).abs() < 1e-12 && (p2[0][1] - 0.2).abs() < 1e-12);
    // All-zero scores: uniform.
    let z = artefact(vec![vec![0.0; 4]; 2], 2, 8);
    assert_eq!(z.kv_head_distribution(1.0), vec![vec![0.25; 2]; 2]);
    for (beta, temp, field) in [
        (1.0, 1.0, "beta"),
        (f64::NAN, 1.0, "beta"),
        (2.0, f64::INFINITY, "temp"),
    ] {
        assert!(matches!(
            HeadKvBudget::new(&uniform, 0, 0.5, 0, beta, temp),
            Err(KvError::InvalidConfig { field: f, .. }) if f == field
        ));
    }
    assert!(
        HeadKvBudget::new(&uniform, 4, 0.5, 0, 2.0, 1.0).is_err(),
        "no layer 4"
    );
}

#[test]
fn artefacts_are_validated_on_load_and_against_the_model() {
    let a = artefact(vec![vec![0.1, 0.2, 0.3, 0.4]; 3], 2, 16);
    let json = a.to_json().expect("json");
    assert_eq!(HeadImportance::from_json(&json).expect("round trip"), a);
    let shape = KvShape::new(1, 2, 4, 16).expect("shape");
    a.check_model(3, &shape).expect("same model");
    let err = |r: Result<(), KvError>| match r {
        Err(KvError::InvalidConfig {
            field: "head_importance",
            reason,
        }) => reason,
        other => panic!("expected a head_importance error, got {other:?}"),
    };
    let r = err(a.check_model(4, &shape));
    assert!(
        r.contains("(3, 4, 2, 16)") && r.contains("(4, 4, 2, 16)"),
        "{r}"
    );
    err(a.check_model(3, &KvShape::new(1, 1, 4, 16).expect("shape")));
    err(a.check_model(3, &KvShape::new(1, 2, 4, 8).expect("shape")));
    // Broken files.
    let mut v: serde_json::Value = serde_json::from_str(&json).expect("value");
    v["version"] = 2.into();
    let r = err(HeadImportance::from_json(&v.to_string()).map(|_| ()));
    assert!(r.contains("version 2"), "{r}");
    let mut v: serde_json::Value = serde_json::from_str(&json).expect("value");
    v["format"] = "something-else".into();
    err(HeadImportance::from_json(&v.to_string()).map(|_| ()));
    let mut v: serde_json::Value = serde_json::from_str(&json).expect("value");
    v["scores"][1] = serde_json::json!([0.1, 0.2]);
    let r = err(HeadImportance::from_json(&v.to_string()).map(|_| ()));
    assert!(r.contains("layer 1"), "{r}");
    let mut v: serde_json::Value = serde_json::from_str(&json).expect("value");
    v["scores"][2][0] = (-1.0).into();
    err(HeadImportance::from_json(&v.to_string()).map(|_| ()));
    let mut v: serde_json::Value = serde_json::from_str(&json).expect("value");
    v["num_layers"] = 5.into();
    err(HeadImportance::from_json(&v.to_string()).map(|_| ()));
    err(HeadImportance::from_json("{\"format\": 1").map(|_| ()));
    err(HeadImportance::from_json(&json[..json.len() / 2]).map(|_| ()));
}

#[test]
fn the_shipped_smollm2_artefact_loads_for_the_real_model_only() {
    let a = HeadImportance::from_json(SHIPPED).expect("shipped artefact parses");
    let smollm2 = KvShape::new(1, 3, 9, 64).expect("shape");
    a.check_model(30, &smollm2)
        .expect("SmolLM2-135M: 30 layers, 9 / 3 heads, 64 dims");
    assert!(a.trials > 0);
    assert!(
        a.scores.iter().flatten().any(|&x| x > 0.0),
        "some head retrieves"
    );
    assert!(a.check_model(24, &smollm2).is_err());
    // It drives HeadKV budgets for every layer: every head keeps at least the floor
    // B' - floor(B' / beta) + window, heads that never retrieve keep only that, the most
    // important are capped at the prompt, and the model total is L H B up to rounding.
    let n = 3072;
    for beta in [1.01, 2.0] {
        let (mut total, mut floor_heads, mut full_heads) = (0, 0, 0);
        let floor = 1472 - (1472.0 / beta) as usize + 64;
        for layer in 0..30 {
            let b = HeadKvBudget::new(&a, layer, 0.5, 64, beta, 1.0).expect("valid");
            for k in b.budgets(n) {
                assert!(k >= floor, "layer {layer}: {k}");
                floor_heads += usize::from(k == floor);
                full_heads += usize::from(k == n);
                total += k;
            }
        }
        let want = 30 * 3 * kept_for(n, 0.5);
        assert!(total.abs_diff(want) <= 45, "beta {beta}: {total} vs {want}");
        assert!(
            floor_heads > 0 && full_heads > 0,
            "beta {beta}: {floor_heads} {full_heads}"
        );
    }
}

#[test]
fn retrieval_score_counts_copying_hits_per_head() {
    // Prompt tokens [5, 6, 7, 8, 9], needle = positions 2..4 (tokens 7, 8); outputs [7, 8, 1].
    let prompt = [5u32, 6, 7, 8, 9];
    let log = ProbeLog {
        calls: vec![
            vec![vec![2, 0], vec![3, 2], vec![2, 3]],
            vec![vec![3, 4], vec![3, 4], vec![3, 4]],
        ],
    };
    let s = retrieval_scores(&log, &prompt, 2..4, &[7, 8, 1]).expect("scores");
    // Layer 0 head 0: hits at calls 0 (pos 2 = 7) and 1 (pos 3 = 8): 2 x 1/2. Head 1: pos 2
    // at call 1 holds 7, not 8; pos 3 at call 2 holds 8, not 1: 0. Layer 1 head 0: call 1.
    assert_eq!(s, [vec![1.0, 0.0], vec![0.5, 0.0]]);
    assert!(
        retrieval_scores(&log, &prompt, 3..3, &[7]).is_err(),
        "empty needle"
    );
    assert!(
        retrieval_scores(&log, &prompt, 4..6, &[7]).is_err(),
        "outside the prompt"
    );
    assert!(
        retrieval_scores(&log, &prompt, 2..4, &[7, 8, 1, 2]).is_err(),
        "fewer calls than outputs"
    );
}

#[test]
fn the_probe_records_each_query_heads_most_attended_position() {
    let shape = KvShape::new(1, 2, 4, 8).expect("shape");
    let d = test_device();
    let log = Arc::new(Mutex::new(ProbeLog::default()));
    let mut p = RetrievalProbe::new(1, shape, log.clone(), &d).expect("probe");
    let kv = [1, 2, 6, 8];
    p.append(
        KvBlock::contiguous(
            seeded_tensor(kv, 1, 2.0, &d),
            seeded_tensor(kv, 2, 1.0, &d),
            10,
        )
        .expect("block"),
    )
    .expect("append");
    for (n, start, seed) in [(3usize, 13u32, 5u64), (1, 15, 6)] {
        let q =
            Query::contiguous(seeded_tensor([1, 4, n, 8], seed, 2.0, &d), start).expect("query");
        let got = p.attend(&q, StatsRequest::NONE).expect("attend");
        assert!(
            got.stats.last_row.is_none(),
            "only what was asked is returned"
        );
        let rows = p
            .view()
            .attend_reference(
                &q,
                StatsRequest {
                    column_sums: false,
                    last_row: true,
                },
            )
            .stats
            .last_row
            .expect("rows");
        let rows = to_vec(&rows);
        let want: Vec<u32> = (0..4)
            .map(|qh| {
                let r = &rows[qh * 6..(qh + 1) * 6];
                let best = (0..6).fold(0, |b, i| if r[i] > r[b] { i } else { b });
                10 + best as u32
            })
            .collect();
        let log = log.lock().expect("lock");
        assert_eq!(log.calls.len(), 2, "layer 1 of a shared log");
        assert_eq!(log.calls[1].last(), Some(&want));
    }
    assert!(
        RetrievalProbe::new(0, KvShape::new(2, 2, 4, 8).expect("shape"), log, &d).is_err(),
        "batch 1 only"
    );
}

fn feed(c: &mut dyn KvCache, n: usize, start: u32, seed: u64) {
    let s = c.shape();
    let d = test_device();
    let kv = [s.batch(), s.kv_heads(), n, s.head_dim()];
    c.append(
        KvBlock::contiguous(
            seeded_tensor(kv, seed, 1.0, &d),
            seeded_tensor(kv, seed + 1, 1.0, &d),
            start,
        )
        .expect("block"),
    )
    .expect("append");
    let q = seeded_tensor([s.batch(), s.q_heads(), n, s.head_dim()], seed + 2, 1.0, &d);
    c.attend(
        &Query::contiguous(q, start).expect("query"),
        StatsRequest::NONE,
    )
    .expect("attend");
}

#[test]
fn headkv_budgets_through_the_cache() {
    // 2 layers x 2 KV heads (4 query heads): layer 1 head 1 carries most of the importance.
    let shape = KvShape::new(2, 2, 4, 8).expect("shape");
    let imp = artefact(
        vec![vec![0.1, 0.1, 0.1, 0.1], vec![0.1, 0.1, 0.4, 0.4]],
        2,
        8,
    );
    let scorer = ScorerConfig::SnapKv {
        window: 2,
        kernel: 3,
        gqa: GqaReduce::Mean,
    };
    let budget = BudgetKind::HeadKv {
        beta: 2.0,
        temp: 1.0,
    };
    let mut held = Vec::new();
    for layer in 0..2 {
        let cfg = EvictConfig::new(shape, 0.5, scorer.clone())
            .with_layer(layer, 2)
            .with_budget(budget)
            .with_head_importance(imp.clone());
        let mut c = cfg.init(&test_device()).expect("init");
        feed(&mut c, 40, 0, 3);
        c.end_prefill().expect("compress");
        let alloc = HeadKvBudget::new(&imp, layer, 0.5, 2, 2.0, 1.0).expect("valid");
        let want: Vec<usize> = (0..4).map(|s| alloc.head_budget(40, s % 2)).collect();
        assert_eq!(c.lengths().held, want, "layer {layer}");
        memory_matches_buffers(&c).expect("honest memory");
        held.extend(want);
    }
    // B = 20, B' = 18: 9 pooled per head (36 in all), 9 for sure, + the window of 2. p = 1/7
    // for three heads, 4/7 for layer 1 head 1: round(36/7 + 9) + 2 = 16, round(144/7 + 9) + 2
    // = 32; 3 x 16 + 32 = 80 = L H B per sequence.
    assert_eq!(held, [16, 16, 16, 16, 16, 32, 16, 32]);
    // Config errors: no artefact, wrong model, HeadKV with decode compression.
    let d = test_device();
    let base = EvictConfig::new(shape, 0.5, scorer.clone())
        .with_layer(0, 2)
        .with_budget(budget);
    assert!(matches!(
        base.clone().init(&d),
        Err(KvError::InvalidConfig {
            field: "head_importance",
            ..
        })
    ));
    assert!(matches!(
        base.clone()
            .with_layer(0, 3)
            .with_head_importance(imp.clone())
            .init(&d),
        Err(KvError::InvalidConfig {
            field: "head_importance",
            ..
        })
    ));
    assert!(matches!(
        base.clone()
            .with_head_importance(imp.clone())
            .with_decode_compression(4, 8)
            .init(&d),
        Err(KvError::InvalidConfig {
            field: "decode_every",
            ..
        })
    ));
    assert!(budget.allocator(0.5, 2).is_err(), "needs the artefact");
    let cfg = base.with_head_importance(imp);
    let json = serde_json::to_string(&cfg).expect("json");
    assert_eq!(
        serde_json::from_str::<EvictConfig>(&json).expect("parse"),
        cfg
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the scores, the model's budgets sum to `L H B` within `L H / 2` (water-filling
    /// keeps the total when heads are capped by their stream).
    #[test]
    fn budgets_sum_to_the_uniform_total(
        scores in proptest::collection::vec(proptest::collection::vec(0.0f64..5.0, 4), 1..6),
        n in 20usize..2000,
        ratio in 0.5f64..0.95,
        window in 0usize..16,
        beta in 1.001f64..8.0,
        temp in 0.5f64..2.0,
    ) {
        let imp = artefact(scores, 2, 8);
        let layers = imp.num_layers;
        let mut total = 0usize;
        for l in 0..layers {
            let b = HeadKvBudget::new(&imp, l, ratio, window, beta, temp).expect("valid");
            for k in b.budgets(n) {
                prop_assert!(k <= n);
                total += k;
            }
        }
        let want = layers * 2 * kept_for(n, ratio);
        prop_assert!(total.abs_diff(want) <= layers, "{} vs {}", total, want);
    }
}
