//! PyramidKV and Ada-KV through the cache: per-layer and per-head budgets, the memory they
//! free, decode after compression, and the layer totals.

use kv_core::{KvBlock, KvCache, KvError, KvShape, Query, StatsRequest, memory_matches_buffers};
use kv_evict::{
    AdaKvBudget, BudgetKind, EvictConfig, EvictingCache, GqaReduce, PyramidBudget, ScorerConfig,
    kept_for,
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

fn cache(
    shape: KvShape,
    ratio: f64,
    scorer: ScorerConfig,
    budget: BudgetKind,
    layer: usize,
    layers: usize,
) -> EvictingCache {
    EvictConfig::new(shape, ratio, scorer)
        .with_budget(budget)
        .with_layer(layer, layers)
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

#[test]
fn pyramid_layers_hold_their_budgets_and_free_the_rest() {
    // 4 layers, 200 tokens, ratio 0.5, window 8, beta 10: average 100, min 10, max 190
    // (below n - w = 192, no clamp), steps 60: budgets [190, 130, 70, 10].
    let shape = KvShape::new(1, 2, 4, 16).expect("shape");
    let (n, layers) = (200, 4);
    let p = PyramidBudget::new(0.5, 8, 10.0).expect("valid");
    let want: Vec<usize> = (0..layers).map(|l| p.layer_budget(n, l, layers)).collect();
    assert_eq!(want, [190, 130, 70, 10]);
    let mut total = 0;
    for (l, &b) in want.iter().enumerate() {
        let mut c = cache(
            shape,
            0.5,
            snap(8),
            BudgetKind::Pyramid { beta: 10.0 },
            l,
            layers,
        );
        feed(&mut c, n, 0, 7);
        let before = c.memory();
        c.end_prefill().expect("compress");
        assert_eq!(c.lengths().held, vec![b, b], "layer {l}");
        // Physically freed: exactly-sized buffers, 2 heads x b rows x 16 channels x 4 bytes.
        let m = c.memory();
        assert_eq!(m.key_bytes, 2 * b * 16 * 4, "layer {l}");
        assert_eq!(m.value_bytes, 2 * b * 16 * 4, "layer {l}");
        assert!(m.stored_bytes() < before.stored_bytes());
        memory_matches_buffers(&c).expect("honest memory");
        // SnapKV's window (the last 8 prompt tokens) is inside the budget and kept.
        let p = c.view().positions;
        assert_eq!(&p[b - 8..b], &[192, 193, 194, 195, 196, 197, 198, 199]);
        total += m.key_bytes + m.value_bytes;
        // Decode tokens are appended to every layer uncompressed.
        feed(&mut c, 2, n as u32, 9);
        assert_eq!(c.lengths().held, vec![b + 2, b + 2]);
    }
    // The model as a whole holds what the uniform budget holds (same average).
    assert_eq!(total, layers * 2 * 2 * 100 * 16 * 4);
}

#[test]
fn pyramid_falls_back_to_the_rounded_uniform_budget() {
    let shape = KvShape::new(1, 1, 2, 8).expect("shape");
    // n = 40, window 8, ratio 0.8: avg 8, min 0.4 < window -> fallback round(8) = 8.
    for l in 0..3 {
        let mut c = cache(shape, 0.8, snap(8), BudgetKind::PYRAMID, l, 3);
        feed(&mut c, 40, 0, 3);
        c.end_prefill().expect("compress");
        assert_eq!(c.lengths().held, vec![8]);
    }
}

#[test]
fn adakv_heads_hold_different_lengths_and_free_memory() {
    // Three KV heads whose keys differ in scale, so that attention concentrates differently.
    let shape = KvShape::new(1, 3, 6, 16).expect("shape");
    let d = test_device();
    let n = 96;
    let mut c = cache(shape, 0.75, snap(8), BudgetKind::ADAKV, 0, 1);
    let k = seeded_tensor([1, 3, n, 16], 1, 1.0, &d);
    let scale = kv_testkit::tensor_from(vec![4.0, 1.0, 0.1], [1, 3, 1, 1], &d);
    let k = k * scale;
    let v = seeded_tensor([1, 3, n, 16], 2, 1.0, &d);
    c.append(KvBlock::contiguous(k, v, 0).expect("block"))
        .expect("append");
    let q = seeded_tensor([1, 6, n, 16], 3, 1.0, &d);
    c.attend(&Query::contiguous(q, 0).expect("q"), StatsRequest::NONE)
        .expect("attend");
    c.end_prefill().expect("compress");
    let held = c.lengths().held;
    let k_uniform = kept_for(n, 0.75);
    assert_eq!(
        held.iter().sum::<usize>(),
        3 * k_uniform,
        "layer total {held:?}"
    );
    assert!(
        held.iter().any(|&h| h != k_uniform),
        "the heads should differ: {held:?}"
    );
    let n_safe = (k_uniform as f64 * 0.2) as usize;
    assert!(held.iter().all(|&h| h >= n_safe), "{held:?}");
    // Physically freed per head: Σ b_h rows of 16 fp32 channels.
    let m = c.memory();
    assert_eq!(m.key_bytes, 3 * k_uniform * 16 * 4);
    memory_matches_buffers(&c).expect("honest memory");
    // Each head keeps its own best tokens.
    let scores = c.last_scores().to_vec();
    let pos = c.view().positions;
    let width = *held.iter().max().expect("heads");
    for h in 0..3 {
        let kept: Vec<usize> = pos[h * width..h * width + held[h]]
            .iter()
            .map(|&p| p as usize)
            .collect();
        assert_eq!(
            kept,
            kv_evict::top_k_sorted(&scores[h], held[h]),
            "head {h}"
        );
    }
    // Decode: every head grows by one and attention still matches the reference.
    c.append(
        KvBlock::contiguous(
            seeded_tensor([1, 3, 1, 16], 8, 1.0, &d),
            seeded_tensor([1, 3, 1, 16], 9, 1.0, &d),
            n as u32,
        )
        .expect("block"),
    )
    .expect("decode");
    let after: Vec<usize> = held.iter().map(|h| h + 1).collect();
    assert_eq!(c.lengths().held, after);
    let q = Query::contiguous(seeded_tensor([1, 6, 1, 16], 10, 1.0, &d), n as u32).expect("q");
    let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    let want = c.view().attend_reference(&q, StatsRequest::NONE).output;
    kv_testkit::assert_close(&got, &want, 1e-5, 1e-4);
}

#[test]
fn bad_budget_configs_are_rejected() {
    let shape = KvShape::new(1, 1, 1, 8).expect("shape");
    let d = test_device();
    let e = EvictConfig::new(shape, 0.5, snap(4))
        .with_budget(BudgetKind::Pyramid { beta: 0.0 })
        .init(&d);
    assert!(
        matches!(e, Err(KvError::InvalidConfig { field: "beta", .. })),
        "{e:?}"
    );
    let e = EvictConfig::new(shape, 0.5, snap(4))
        .with_budget(BudgetKind::AdaKv {
            alpha_safeguard: -0.1,
        })
        .init(&d);
    assert!(
        matches!(
            e,
            Err(KvError::InvalidConfig {
                field: "alpha_safeguard",
                ..
            })
        ),
        "{e:?}"
    );
    // Budgets serialise with kvpress's defaults.
    let b: BudgetKind = serde_json::from_str(r#"{"pyramid": {}}"#).expect("defaults");
    assert_eq!(b, BudgetKind::PYRAMID);
    let b: BudgetKind = serde_json::from_str(r#"{"ada_kv": {}}"#).expect("defaults");
    assert_eq!(b, BudgetKind::ADAKV);
    let cfg = EvictConfig::new(shape, 0.5, snap(4)).with_budget(BudgetKind::ADAKV);
    let back: EvictConfig =
        serde_json::from_str(&serde_json::to_string(&cfg).expect("ser")).expect("de");
    assert_eq!(back, cfg);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Ada-KV keeps exactly H * floor(n (1 - ratio)) tokens per sequence of a layer, every
    /// head at least floor(alpha * n_kept) and at most n, whatever the scores.
    #[test]
    fn adakv_layer_total_is_exact(
        heads in 1usize..6,
        n in 1usize..60,
        ratio in 0.0f64..0.99,
        alpha in 0.0f64..=1.0,
        seed in 0u64..10_000,
        ties in any::<bool>(),
    ) {
        let data = kv_testkit::seeded_data(heads * n, seed, 1.0);
        let data: Vec<f32> = if ties { data.iter().map(|x| (x * 2.0).round()).collect() } else { data };
        let lists: Vec<&[f32]> = data.chunks(n).collect();
        let a = AdaKvBudget::new(ratio, alpha).expect("valid");
        let b = a.head_budgets(&lists);
        let k = kept_for(n, ratio);
        prop_assert_eq!(b.iter().sum::<usize>(), heads * k);
        let safe = (k as f64 * alpha).floor() as usize;
        prop_assert!(b.iter().all(|&x| x >= safe && x <= n), "{:?}", b);
    }

    /// PyramidKV's layer budgets sum to L * n (1 - ratio) up to the rounding of each layer,
    /// decrease with depth, and never exceed the prompt.
    #[test]
    fn pyramid_sums_to_the_average(
        layers in 1usize..40,
        n in 1usize..5000,
        ratio in 0.0f64..0.99,
        window in 0usize..80,
        beta in 1.0f64..40.0,
    ) {
        let p = PyramidBudget::new(ratio, window, beta).expect("valid");
        let b: Vec<usize> = (0..layers).map(|l| p.layer_budget(n, l, layers)).collect();
        let avg = n as f64 * (1.0 - ratio);
        let sum = b.iter().sum::<usize>() as f64;
        prop_assert!((sum - layers as f64 * avg).abs() <= layers as f64 / 2.0 + 1e-6,
            "{:?} sum {} vs {}", b, sum, layers as f64 * avg);
        prop_assert!(b.windows(2).all(|w| w[0] >= w[1]));
        prop_assert!(b.iter().all(|&x| x <= n));
    }

    /// Through the cache, for any shape: each sequence of the layer keeps exactly
    /// `kv_heads * floor(n (1 - ratio))` tokens, memory is honest, positions sorted.
    #[test]
    fn adakv_cache_keeps_the_layer_total(
        shape in kv_testkit::strategies::kv_shape(),
        n in 4usize..40,
        ratio in 0.0f64..0.99,
        seed in 0u64..1000,
    ) {
        let mut c = cache(shape, ratio, snap(2), BudgetKind::ADAKV, 0, 1);
        feed(&mut c, n, 0, seed);
        c.end_prefill().expect("compress");
        let held = c.lengths().held;
        let k = kept_for(n, ratio);
        for seq in held.chunks(shape.kv_heads()) {
            prop_assert_eq!(seq.iter().sum::<usize>(), shape.kv_heads() * k, "{:?}", held);
        }
        prop_assert!(memory_matches_buffers(&c).is_ok());
        let v = c.view();
        let w = v.keys.dims()[2];
        for (s, &h) in held.iter().enumerate() {
            let p = &v.positions[s * w..s * w + h];
            prop_assert!(p.windows(2).all(|x| x[0] < x[1]), "{:?}", p);
        }
    }
}
