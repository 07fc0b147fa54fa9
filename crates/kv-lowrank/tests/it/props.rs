//! Property tests: on random shapes, positions and data, every cache at full rank (Loki, Eigen
//! Attention, Palu, LoRC, MatryoshkaKV, CSKV with a random window; ThinK at any ratio over its
//! own view) agrees with the reference attention.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvShape, Query, RopeConfig, RopeConvention, StatsRequest,
    contiguous_positions,
};
use kv_lowrank::{
    Activation, Calibration, CovarianceAccumulator, CskvConfig, EigenConfig, LokiConfig,
    LorcConfig, MatryoshkaConfig, PaluConfig, RankAllocation, ThinkConfig, TopK,
};
use kv_testkit::strategies::{AttentionCase, attention_case};
use kv_testkit::{assert_close, seeded_data, seeded_tensor, test_device};
use proptest::prelude::*;

use crate::scaled;

fn calibration(s: KvShape, seed: u64) -> Calibration {
    let device = test_device();
    let (h, qh, d) = (s.kv_heads(), s.q_heads(), s.head_dim());
    let mut acc = CovarianceAccumulator::new(1, s);
    for (i, act) in [
        Activation::Keys,
        Activation::KeysPreRope,
        Activation::Values,
    ]
    .into_iter()
    .enumerate()
    {
        acc.observe(0, act, &scaled([1, h, 4 * d, d], seed + i as u64, &device))
            .expect("observe");
    }
    acc.observe(
        0,
        Activation::Queries,
        &scaled([1, qh, 4 * d, d], seed + 9, &device),
    )
    .expect("queries");
    let in_dim = d + 3;
    for (i, act) in [Activation::KeyWeights, Activation::ValueWeights]
        .into_iter()
        .enumerate()
    {
        let w = seeded_data(h * d * in_dim, seed + 20 + i as u64, 1.0);
        acc.observe_weights(0, act, &w, in_dim).expect("weights");
    }
    acc.finish("prop", "seeded").expect("finish")
}

/// Appends the case's keys (rotated first when `rotate`) to `cache` and attends its queries.
fn run(cache: &mut dyn KvCache, c: &AttentionCase, rotate: bool) -> Tensor<4> {
    let device = test_device();
    let s = c.shape;
    let dims = [s.batch(), s.kv_heads(), c.keys, s.head_dim()];
    let mut k = seeded_tensor(dims, c.seed, 1.0, &device);
    if rotate {
        let rope = RopeConfig::new(s.head_dim(), 10_000.0, RopeConvention::RotateHalf)
            .init()
            .expect("rope");
        k = rope.apply(k, &contiguous_positions(s.batch(), c.keys, 0));
    }
    let v = seeded_tensor(dims, c.seed ^ 1, 1.0, &device);
    cache
        .append(KvBlock::contiguous(k, v, 0).expect("block"))
        .expect("append");
    cache.end_prefill().expect("end");
    let q = seeded_tensor(
        [s.batch(), s.q_heads(), c.q_len, s.head_dim()],
        c.seed ^ 2,
        1.0,
        &device,
    );
    cache
        .attend(
            &Query::contiguous(q, c.q_start).expect("q"),
            StatsRequest::NONE,
        )
        .expect("attend")
        .output
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn full_rank_caches_equal_dense_attention(c in attention_case()) {
        let device = test_device();
        let s = c.shape;
        let d = s.head_dim();
        let cal = calibration(s, c.seed % 1000);
        let want = run(&mut DenseCacheConfig::new(s).init(&device).expect("dense"), &c, false);
        let mut loki = LokiConfig::new(s, "", 0)
            .with_rank(d)
            .with_top_k(TopK::Fraction(1.0))
            .init_with(&cal, &device)
            .expect("loki");
        assert_close(&run(&mut loki, &c, false), &want, 1e-4, 1e-3);
        let mut eigen = EigenConfig::new(s, "", 0, d, d).init_with(&cal, &device).expect("eigen");
        assert_close(&run(&mut eigen, &c, false), &want, 1e-4, 1e-3);
        let rope = RopeConfig::new(d, 10_000.0, RopeConvention::RotateHalf);
        let mut palu = PaluConfig::new(s, "", 0, d, d, rope.clone()).init_with(&cal, &device).expect("palu");
        let want_rotated =
            run(&mut DenseCacheConfig::new(s).init(&device).expect("dense"), &c, true);
        assert_close(&run(&mut palu, &c, false), &want_rotated, 1e-4, 1e-3);
        let mut lorc = LorcConfig::new(s, "", 0, d, d, rope.clone())
            .init_with(&cal, &device)
            .expect("lorc");
        assert_close(&run(&mut lorc, &c, false), &want_rotated, 1e-4, 1e-3);
        let mut matryoshka = MatryoshkaConfig::new(s, "", 0, d, d)
            .with_allocation(RankAllocation::Model)
            .init_with(&cal, &device)
            .expect("matryoshka");
        assert_close(&run(&mut matryoshka, &c, false), &want, 1e-4, 1e-3);
        let full = s.kv_heads() * d;
        let mut cskv = CskvConfig::new(s, "", 0, full, full, rope)
            .with_window((c.seed % 4) as usize)
            .init_with(&cal, &device)
            .expect("cskv");
        assert_close(&run(&mut cskv, &c, false), &want_rotated, 1e-4, 1e-3);
    }

    #[test]
    fn think_attends_as_its_view_and_keeps_its_channel_count(
        c in attention_case(),
        ratio in 0.0f64..0.9,
        recent in 0usize..4,
    ) {
        let device = test_device();
        let s = c.shape;
        let mut think = ThinkConfig::new(s)
            .with_pruning_ratio(ratio)
            .with_recent_size(recent)
            .init(&device)
            .expect("think");
        // The channels are scored from queries attended during prefill.
        let dims = [s.batch(), s.kv_heads(), c.keys, s.head_dim()];
        let k = seeded_tensor(dims, c.seed, 1.0, &device);
        think
            .append(KvBlock::contiguous(k.clone(), k, 0).expect("block"))
            .expect("append");
        let q0 = seeded_tensor([s.batch(), s.q_heads(), 2, s.head_dim()], c.seed ^ 5, 1.0, &device);
        let start = c.keys.saturating_sub(2) as u32;
        think
            .attend(&Query::contiguous(q0, start).expect("q"), StatsRequest::NONE)
            .expect("attend");
        think.end_prefill().expect("end");
        let kept = ThinkConfig::new(s).with_pruning_ratio(ratio).kept_channels();
        if c.keys > recent && kept < s.head_dim() {
            prop_assert_eq!(think.pruned_tokens(), c.keys - recent);
            prop_assert_eq!(think.kept_channels(0, 0).map(<[u32]>::len), Some(kept));
        } else {
            prop_assert_eq!(think.pruned_tokens(), 0);
        }
        let q = seeded_tensor([s.batch(), s.q_heads(), c.q_len, s.head_dim()], c.seed ^ 6, 1.0, &device);
        let q = Query::contiguous(q, c.q_start).expect("q");
        let got = think.attend(&q, StatsRequest::NONE).expect("attend").output;
        let want = think.view().attend_reference(&q, StatsRequest::NONE).output;
        assert_close(&got, &want, 1e-5, 1e-4);
    }
}
