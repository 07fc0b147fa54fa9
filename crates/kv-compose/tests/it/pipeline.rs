//! The pipeline cache against its oracles: the dense cache, each stage alone, and the
//! reference attention over its own view; the shared cache contract; honest memory.

use burn::prelude::*;
use kv_compose::{LayerContext, PipelineCacheConfig, PipelineSpec, build_layer};
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvShape, Query, RopeConfig, RopeConvention, StatsRequest,
    contiguous_positions, memory_matches_buffers,
};
use kv_evict::{EvictConfig, ScorerConfig};
use kv_quant::KiviConfig;
use kv_testkit::{assert_close, seeded_tensor, test_device, to_vec};

fn shape() -> KvShape {
    KvShape::new(2, 2, 6, 8).expect("valid")
}

fn cx(device: &Device) -> LayerContext {
    LayerContext {
        layer: 0,
        num_layers: 1,
        shape: shape(),
        device: device.clone(),
        rope: RopeConfig::new(8, 10_000.0, RopeConvention::RotateHalf),
    }
}

fn make(line: &str, device: &Device) -> Box<dyn KvCache> {
    build_layer(&PipelineSpec::parse_line(line).expect("parse"), &cx(device))
        .unwrap_or_else(|e| panic!("{line}: {e}"))
}

fn block(n: usize, start: u32, seed: u64, device: &Device) -> KvBlock {
    let s = shape();
    let dims = [s.batch(), s.kv_heads(), n, s.head_dim()];
    KvBlock::contiguous(
        seeded_tensor(dims, seed, 1.0, device),
        seeded_tensor(dims, seed + 1, 1.0, device),
        start,
    )
    .expect("block")
}

fn query(n: usize, start: u32, seed: u64, device: &Device) -> Query {
    let s = shape();
    Query::new(
        seeded_tensor([s.batch(), s.q_heads(), n, s.head_dim()], seed, 1.0, device),
        contiguous_positions(s.batch(), n, start),
    )
    .expect("query")
}

/// Prefill of `p` tokens (attended by their own queries), end of prefill, then `steps` decode
/// steps; returns every attention output (prefill and each step), flattened.
fn run(cache: &mut dyn KvCache, p: usize, steps: usize, device: &Device) -> Vec<Vec<f32>> {
    let mut outs = Vec::new();
    cache.append(block(p, 0, 10, device)).expect("prefill");
    let a = cache
        .attend(&query(p, 0, 20, device), StatsRequest::COLUMN_SUMS)
        .expect("attend");
    outs.push(to_vec(&a.output));
    cache.end_prefill().expect("end_prefill");
    for i in 0..steps {
        let pos = (p + i) as u32;
        cache
            .append(block(1, pos, 100 + 2 * i as u64, device))
            .expect("decode append");
        let a = cache
            .attend(&query(1, pos, 300 + i as u64, device), StatsRequest::NONE)
            .expect("decode attend");
        outs.push(to_vec(&a.output));
    }
    outs
}

fn assert_runs_close(a: &[Vec<f32>], b: &[Vec<f32>], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= tol, "{what}: call {i} differs by {worst}");
    }
}

kv_testkit::kv_cache_contract!(knorm_then_full, |d: &Device| make("knorm|full", d));
kv_testkit::kv_cache_contract!(
    snapkv_then_kivi,
    |d: &Device| make("snapkv:window=2,kernel=3|kivi:bits=4,group=4,residual=4", d),
    atol = 1e-4,
    rtol = 1e-3
);
kv_testkit::kv_cache_contract!(adakv_then_fp16, |d: &Device| make(
    "adakv:scorer=knorm,ratio=0.5|dense_fp16",
    d
));
kv_testkit::kv_cache_contract!(
    knorm_with_evicted_tier,
    |d: &Device| make("knorm|dense_fp16|evicted=kivi:bits=2,group=4,residual=4", d),
    atol = 1e-4,
    rtol = 1e-3
);

/// Nothing evicted and an fp32 codec: the pipeline is the dense cache.
#[test]
fn keep_all_with_full_codec_equals_dense_cache() {
    let d = test_device();
    let mut p = make("knorm:ratio=0|full", &d);
    let mut dense = DenseCacheConfig::new(shape()).init(&d).expect("dense");
    assert_runs_close(
        &run(p.as_mut(), 9, 4, &d),
        &run(&mut dense, 9, 4, &d),
        1e-6,
        "dense",
    );
    assert_eq!(p.lengths(), dense.lengths());
}

/// A selection with an fp32 codec is the selection alone (MiniKV at 16 bits is H2O-prefill
/// eviction exactly).
#[test]
fn selection_with_full_codec_equals_selection_alone() {
    let d = test_device();
    for line in [
        "observed_attention:ratio=0.5",
        "knorm:ratio=0.5",
        "snapkv:ratio=0.5,window=2",
    ] {
        let mut p = make(&format!("{line}|full"), &d);
        let mut alone = make(line, &d);
        assert_runs_close(
            &run(p.as_mut(), 10, 3, &d),
            &run(alone.as_mut(), 10, 3, &d),
            1e-6,
            line,
        );
        assert_eq!(p.lengths(), alone.lengths(), "{line}");
        assert_eq!(p.view().positions, alone.view().positions, "{line}");
    }
}

/// Nothing evicted and a KIVI codec: the pipeline is KIVI (MiniKV keeping every token is
/// KIVI-2 exactly; KIVI's groups never cross KV heads, so per-stream codecs change nothing).
#[test]
fn keep_all_with_kivi_equals_kivi_alone() {
    let d = test_device();
    let params = "bits=2,group=4,residual=4";
    let mut p = make(&format!("knorm:ratio=0|kivi:{params}"), &d);
    let mut kivi = KiviConfig::new(shape())
        .with_group(4)
        .with_residual(4)
        .init(&d)
        .expect("kivi");
    assert_runs_close(
        &run(p.as_mut(), 11, 6, &d),
        &run(&mut kivi, 11, 6, &d),
        1e-5,
        "kivi",
    );
    let (a, b) = (p.memory(), kivi.memory());
    assert_eq!(a.logical_tokens, b.logical_tokens);
    // Same codes, scales and windows; per-stream codecs hold one position list per head.
    let s = shape();
    let positions = a.held_token_slots * 4 - b.logical_tokens * 4;
    assert_eq!(a.key_bytes + a.value_bytes, b.key_bytes + b.value_bytes);
    assert_eq!(
        a.metadata_bytes,
        b.metadata_bytes + positions,
        "{a:?} {b:?} {s:?}"
    );
}

/// Evicted tokens kept in a second fp32 tier: attention over both tiers, merged by
/// log-sum-exp, is the dense attention over every token.
#[test]
fn evicted_tier_at_full_precision_equals_dense_cache() {
    let d = test_device();
    let mut p = make("knorm:ratio=0.5|full|evicted=full", &d);
    let mut dense = DenseCacheConfig::new(shape()).init(&d).expect("dense");
    assert_runs_close(
        &run(p.as_mut(), 10, 3, &d),
        &run(&mut dense, 10, 3, &d),
        1e-5,
        "tiers",
    );
    assert_eq!(p.lengths().held, vec![13; 4]);
    // Statistics over two tiers come from the view, in its slot order.
    let q = query(1, 13, 7, &d);
    let a = p.attend(&q, StatsRequest::COLUMN_SUMS).expect("stats");
    let r = p.view().attend_reference(&q, StatsRequest::COLUMN_SUMS);
    assert_close(&a.output, &r.output, 1e-6, 1e-6);
    let (c1, c2) = (
        a.stats.column_sums.expect("cols"),
        r.stats.column_sums.expect("cols"),
    );
    assert_close(&c1, &c2, 1e-6, 1e-6);
}

/// After the hand-over the selection's fp32 prompt is freed: the pipeline holds only what its
/// codecs hold, and the evicted tokens are gone.
#[test]
fn memory_after_hand_over_is_the_codecs() {
    let d = test_device();
    let mut p = PipelineCacheConfig::new(
        EvictConfig::new(shape(), 0.5, ScorerConfig::Knorm),
        |s: KvShape, d: &Device| {
            Ok(
                Box::new(KiviConfig::new(s).with_group(4).with_residual(4).init(d)?)
                    as Box<dyn KvCache>,
            )
        },
    )
    .init(&d)
    .expect("init");
    p.append(block(16, 0, 1, &d)).expect("append");
    let before = p.memory();
    assert_eq!(before.held_token_slots, 2 * 2 * 16);
    p.end_prefill().expect("end_prefill");
    assert!(p.is_split());
    let m = p.memory();
    memory_matches_buffers(&p).expect("memory equals the held buffers");
    assert_eq!(
        m.held_token_slots,
        2 * 2 * 8,
        "half of every stream evicted"
    );
    assert_eq!(
        m.logical_tokens,
        2 * 16,
        "logical tokens are the tokens given"
    );
    let codecs: usize = (0..2)
        .flat_map(|b| (0..2).map(move |h| (b, h)))
        .map(|(b, h)| p.kept_codec(b, h).expect("codec").memory().stored_bytes())
        .sum();
    assert_eq!(m.stored_bytes(), codecs);
    // 8 tokens of 2-bit KIVI (G=4, R=4) per stream are far below the fp32 prompt.
    assert!(
        m.stored_bytes() * 6 < before.stored_bytes(),
        "{m:?} vs {before:?}"
    );
}

/// Ada-KV gives heads different budgets: every stream keeps its own tokens, and attention
/// still equals the reference over the view.
#[test]
fn ragged_heads_keep_their_own_tokens() {
    let d = test_device();
    let mut p = make(
        "adakv:scorer=knorm,ratio=0.6|kivi:bits=4,group=4,residual=4",
        &d,
    );
    run(p.as_mut(), 12, 2, &d);
    let held = p.lengths().held;
    // Ada-KV keeps the layer's total: floor(12 * 0.4) per stream on average, plus 2 decoded.
    assert_eq!(held.iter().sum::<usize>(), 4 * 4 + 4 * 2);
    assert!(
        held.iter().any(|&h| h != held[0]),
        "budgets differ per head: {held:?}"
    );
    let q = query(2, 14, 9, &d);
    let a = p.attend(&q, StatsRequest::NONE).expect("attend");
    let r = p.view().attend_reference(&q, StatsRequest::NONE);
    assert_close(&a.output, &r.output, 1e-5, 1e-4);
}

/// A codec that takes pre-RoPE keys cannot receive a selection's post-RoPE keys.
#[test]
fn bad_hand_over_is_rejected_at_init() {
    let d = test_device();
    let err = PipelineCacheConfig::new(
        EvictConfig::new(shape(), 0.5, ScorerConfig::Knorm),
        |_s: KvShape, d: &Device| {
            Ok(Box::new(DenseCacheConfig::new(shape()).init(d)?) as Box<dyn KvCache>)
        },
    )
    .init(&d)
    .expect_err("wrong shape");
    assert!(err.to_string().contains("shape"), "{err}");
}

/// MiKV with every token important is the high-precision cache.
#[test]
fn mikv_keeping_everything_important_is_the_fp16_cache() {
    let d = test_device();
    let mut p = make("mikv:ratio=0,group=4", &d);
    let mut fp16 = make("dense_fp16", &d);
    // Prefill attends the selection's fp32 copy; after the hand-over both hold fp16.
    let (a, b) = (run(p.as_mut(), 9, 3, &d), run(fp16.as_mut(), 9, 3, &d));
    assert_runs_close(&a[1..], &b[1..], 1e-6, "mikv");
}

/// The presets run end to end on a small shape.
#[test]
fn presets_run() {
    let d = test_device();
    for line in [
        "minikv:group=4,residual=8",
        "mikv:group=8",
        "mikv:high=int8,group=8",
        "think_kivi:group=8,residual=16",
        "think:ratio=0.5|kivi:group=8,residual=16,bits=4",
    ] {
        let shape = KvShape::new(1, 2, 4, 32).expect("shape");
        let mut c = cx(&d);
        c.shape = shape;
        c.rope = RopeConfig::new(32, 10_000.0, RopeConvention::RotateHalf);
        let mut cache = build_layer(&PipelineSpec::parse_line(line).expect("parse"), &c)
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        let dims = [1, 2, 80, 32];
        cache
            .append(
                KvBlock::contiguous(
                    seeded_tensor(dims, 1, 1.0, &d),
                    seeded_tensor(dims, 2, 1.0, &d),
                    0,
                )
                .expect("block"),
            )
            .expect("append");
        let q = Query::new(
            seeded_tensor([1, 4, 80, 32], 3, 1.0, &d),
            contiguous_positions(1, 80, 0),
        )
        .expect("query");
        cache.attend(&q, StatsRequest::NONE).expect("attend");
        cache.end_prefill().expect("end_prefill");
        let q = Query::new(seeded_tensor([1, 4, 1, 32], 4, 1.0, &d), vec![80]).expect("query");
        let a = cache.attend(&q, StatsRequest::NONE).expect("decode attend");
        let r = cache.view().attend_reference(&q, StatsRequest::NONE);
        assert_close(&a.output, &r.output, 1e-5, 1e-4);
        memory_matches_buffers(cache.as_ref()).expect("memory");
        let m = cache.memory();
        // (At 80 tokens the fp16 tier's 64-token growth slack weighs; stay below fp32.)
        assert!(m.stored_bytes() < m.dense_fp32_bytes(), "{line}: {m:?}");
    }
}

/// H2O at prefill with a recent window (MiniKV's selection): the last `recent` share of the
/// prompt is always kept, the rest of the budget goes to the heaviest hitters.
#[test]
fn h2o_selection_keeps_the_recent_window() {
    let d = test_device();
    let mut p = make("observed_attention:ratio=0.5,recent=0.25|full", &d);
    run(p.as_mut(), 16, 0, &d);
    let view = p.view();
    let held = p.lengths().held;
    assert_eq!(held, vec![8; 4], "floor(16 * 0.5) per stream");
    for stream in view.positions.chunks(8) {
        for pos in 12..16 {
            assert!(stream.contains(&pos), "recent token {pos} kept: {stream:?}");
        }
    }
    let e = build_layer(
        &PipelineSpec::parse_line("observed_attention:recent=1.5").expect("parse"),
        &cx(&d),
    )
    .expect_err("recent is a fraction");
    assert!(e.to_string().contains("recent"), "{e}");
}
