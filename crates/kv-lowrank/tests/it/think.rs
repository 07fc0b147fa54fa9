//! ThinK: the contract, the card's tests and honest memory.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvShape, Query, StatsRequest, memory_matches_buffers,
};
use kv_lowrank::ThinkConfig;
use kv_testkit::{assert_close, seeded_data, seeded_tensor, tensor_from, test_device, to_vec};

use crate::{assert_invalid, shape};

// Prefill 7 (contract) with recent 3: 4 slots pruned at end_prefill, then decode in full.
kv_testkit::kv_cache_contract!(think_half, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        ThinkConfig::new(shape())
            .with_pruning_ratio(0.5)
            .with_recent_size(3)
            .with_window(4)
            .init(d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(think_no_recent, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        ThinkConfig::new(shape())
            .with_recent_size(0)
            .init(d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(think_noop, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        ThinkConfig::new(shape())
            .with_pruning_ratio(0.0)
            .init(d)
            .expect("init"),
    )
});

fn block(s: KvShape, n: usize, start: u32, seed: u64, device: &Device) -> KvBlock {
    let dims = [s.batch(), s.kv_heads(), n, s.head_dim()];
    KvBlock::contiguous(
        seeded_tensor(dims, seed, 1.0, device),
        seeded_tensor(dims, seed + 1, 1.0, device),
        start,
    )
    .expect("block")
}

fn query(s: KvShape, n: usize, start: u32, seed: u64, device: &Device) -> Query {
    let dims = [s.batch(), s.q_heads(), n, s.head_dim()];
    Query::contiguous(seeded_tensor(dims, seed, 1.0, device), start).expect("query")
}

#[test]
fn a_channel_without_query_energy_is_pruned_first() {
    let device = test_device();
    let s = shape();
    let (b, h, qh, d) = (s.batch(), s.kv_heads(), s.q_heads(), s.head_dim());
    // Channel 2 has huge keys but every query is 0 there.
    let n = 10;
    let mut k = seeded_data(b * h * n * d, 1, 1.0);
    for (i, x) in k.iter_mut().enumerate() {
        if i % d == 2 {
            *x = 100.0;
        }
    }
    let k = tensor_from(k, [b, h, n, d], &device);
    let mut q = seeded_data(b * qh * n * d, 2, 1.0);
    for (i, x) in q.iter_mut().enumerate() {
        if i % d == 2 {
            *x = 0.0;
        }
    }
    let q = tensor_from(q, [b, qh, n, d], &device);
    // ⌊0.125 · 8⌋ = 1 channel pruned.
    let mut cache = ThinkConfig::new(s)
        .with_pruning_ratio(0.125)
        .with_recent_size(2)
        .init(&device)
        .expect("init");
    cache
        .append(KvBlock::contiguous(k.clone(), k, 0).expect("block"))
        .expect("append");
    cache
        .attend(&Query::contiguous(q, 0).expect("q"), StatsRequest::NONE)
        .expect("attend");
    cache.end_prefill().expect("end_prefill");
    for bi in 0..b {
        for hi in 0..h {
            let kept = cache.kept_channels(bi, hi).expect("pruned");
            assert_eq!(kept, &[0, 1, 3, 4, 5, 6, 7], "sequence {bi} head {hi}");
        }
    }
}

#[test]
fn zero_ratio_is_an_exact_no_op() {
    let device = test_device();
    let s = shape();
    let mut think = ThinkConfig::new(s)
        .with_pruning_ratio(0.0)
        .with_recent_size(2)
        .init(&device)
        .expect("init");
    let mut dense = DenseCacheConfig::new(s).init(&device).expect("dense");
    for c in [&mut think as &mut dyn KvCache, &mut dense] {
        c.append(block(s, 9, 0, 3, &device)).expect("append");
    }
    let q = query(s, 9, 0, 5, &device);
    let a = think.attend(&q, StatsRequest::NONE).expect("attend").output;
    let e = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_eq!(to_vec(&a), to_vec(&e));
    think.end_prefill().expect("end");
    assert_eq!(think.pruned_tokens(), 0);
    for step in 0..3u32 {
        for c in [&mut think as &mut dyn KvCache, &mut dense] {
            c.append(block(s, 1, 9 + step, 10 + u64::from(step), &device))
                .expect("decode");
        }
        let q = query(s, 1, 9 + step, 20 + u64::from(step), &device);
        let a = think.attend(&q, StatsRequest::NONE).expect("attend").output;
        let e = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
        assert_eq!(to_vec(&a), to_vec(&e), "decode step {step}");
    }
    assert_eq!(think.memory().key_bytes, think.memory().value_bytes);
}

#[test]
fn recent_tokens_keep_all_channels_and_pruned_ones_keep_theirs() {
    let device = test_device();
    let s = shape();
    let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
    let mut cache = ThinkConfig::new(s)
        .with_pruning_ratio(0.5)
        .with_recent_size(4)
        .init(&device)
        .expect("init");
    let blk = block(s, 12, 0, 7, &device);
    let keys = to_vec(blk.keys());
    cache.append(blk).expect("append");
    cache
        .attend(&query(s, 12, 0, 9, &device), StatsRequest::NONE)
        .expect("attend");
    cache.end_prefill().expect("end");
    assert_eq!(cache.pruned_tokens(), 8);
    let view = to_vec(&cache.view().keys);
    for bi in 0..b {
        for hi in 0..h {
            let kept = cache.kept_channels(bi, hi).expect("kept");
            assert_eq!(kept.len(), 4);
            for t in 0..12 {
                for c in 0..d {
                    let i = ((bi * h + hi) * 12 + t) * d + c;
                    let want = if t >= 8 || kept.contains(&(c as u32)) {
                        keys[i]
                    } else {
                        0.0
                    };
                    assert_eq!(view[i], want, "b {bi} h {hi} t {t} c {c}");
                }
            }
        }
    }
}

#[test]
fn pruning_channels_that_carry_nothing_is_lossless() {
    let device = test_device();
    let s = shape();
    let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
    let n = 16;
    // Keys are zero on channels 0 and 5: their scores are 0, ⌊0.25 · 8⌋ = 2 go.
    let mut k = seeded_data(b * h * n * d, 11, 1.0);
    for (i, x) in k.iter_mut().enumerate() {
        if i % d == 0 || i % d == 5 {
            *x = 0.0;
        }
    }
    let k = tensor_from(k, [b, h, n, d], &device);
    let v = seeded_tensor([b, h, n, d], 12, 1.0, &device);
    let mut think = ThinkConfig::new(s)
        .with_pruning_ratio(0.25)
        .with_recent_size(4)
        .init(&device)
        .expect("init");
    let mut dense = DenseCacheConfig::new(s).init(&device).expect("dense");
    for c in [&mut think as &mut dyn KvCache, &mut dense] {
        c.append(KvBlock::contiguous(k.clone(), v.clone(), 0).expect("block"))
            .expect("append");
        c.attend(&query(s, n, 0, 13, &device), StatsRequest::NONE)
            .expect("attend");
        c.end_prefill().expect("end");
    }
    assert_eq!(
        think.kept_channels(0, 0).expect("kept"),
        &[1, 2, 3, 4, 6, 7]
    );
    let q = query(s, 3, 14, 14, &device);
    let a = think.attend(&q, StatsRequest::NONE).expect("attend").output;
    let e = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_close(&a, &e, 1e-5, 1e-4);
}

#[test]
fn key_memory_shrinks_in_proportion() {
    let device = test_device();
    let s = KvShape::new(1, 2, 4, 16).expect("shape");
    let (t, recent) = (40, 8);
    for (ratio, kept) in [(0.0, 16), (0.25, 12), (0.5, 8), (0.75, 4)] {
        let mut cache = ThinkConfig::new(s)
            .with_pruning_ratio(ratio)
            .with_recent_size(recent)
            .init(&device)
            .expect("init");
        cache.append(block(s, t, 0, 21, &device)).expect("append");
        cache
            .attend(&query(s, 4, 36, 22, &device), StatsRequest::NONE)
            .expect("attend");
        cache.end_prefill().expect("end");
        let m = cache.memory();
        let want_keys = 2 * ((t - recent) * kept + recent * 16) * 4;
        assert_eq!(m.key_bytes, want_keys, "ratio {ratio}");
        assert_eq!(m.value_bytes, 2 * t * 16 * 4);
        memory_matches_buffers(&cache).expect("honest memory");
        assert_eq!(
            ThinkConfig::new(s)
                .with_pruning_ratio(ratio)
                .kept_channels(),
            kept
        );
    }
}

#[test]
fn bad_configs_are_rejected() {
    let device = test_device();
    assert_invalid(
        ThinkConfig::new(shape())
            .with_pruning_ratio(1.0)
            .init(&device),
        "pruning_ratio",
    );
    assert_invalid(
        ThinkConfig::new(shape())
            .with_pruning_ratio(-0.1)
            .init(&device),
        "pruning_ratio",
    );
    assert_invalid(
        ThinkConfig::new(shape()).with_window(0).init(&device),
        "window",
    );
    assert_invalid(
        ThinkConfig::from_params(shape(), [("rank", "3")]),
        "unknown ThinK parameter",
    );
    assert_invalid(ThinkConfig::from_params(shape(), [("ratio", "x")]), "ratio");
    let cfg = ThinkConfig::from_params(
        shape(),
        [
            ("ratio", "0.25"),
            ("recent", "16"),
            ("window", "8"),
            ("dtype", "f16"),
        ],
    )
    .expect("params");
    assert_eq!(cfg.pruning_ratio, 0.25);
    assert_eq!(cfg.recent_size, 16);
    assert_eq!(cfg.window, 8);
    assert_eq!(cfg.dtype, kv_core::StorageDtype::F16);
}
