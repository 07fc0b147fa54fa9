//! Decode-time StreamingLLM: sinks plus a rolling window, evicted as tokens arrive.

use kv_core::{KvBlock, KvCache, KvError, KvShape, Query, StatsRequest, memory_matches_buffers};
use kv_evict::StreamingConfig;
use kv_testkit::{seeded_tensor, test_device};

fn append(c: &mut dyn KvCache, n: usize, start: u32) {
    let d = test_device();
    let s = c.shape();
    let k = seeded_tensor(
        [s.batch(), s.kv_heads(), n, s.head_dim()],
        u64::from(start),
        1.0,
        &d,
    );
    c.append(KvBlock::contiguous(k.clone(), k, start).expect("block"))
        .expect("append");
}

#[test]
fn rolling_window_keeps_sinks_and_recent_during_decode() {
    let shape = KvShape::new(1, 2, 2, 8).expect("shape");
    let mut c = StreamingConfig::new(shape, 2, 3)
        .init(&test_device())
        .expect("init");
    // Card 17: len 10, start 2, recent 3 -> [0, 1, 7, 8, 9].
    append(&mut c, 10, 0);
    assert_eq!(c.lengths().held, vec![10, 10], "a block is attended whole");
    c.end_prefill().expect("trim");
    assert_eq!(&c.view().positions[..5], &[0, 1, 7, 8, 9]);
    for step in 10..20u32 {
        append(&mut c, 1, step);
        // The new token's query sees the sinks, the last recent - 1 tokens and itself.
        assert_eq!(c.lengths().held, vec![5, 5]);
        // (Sorted: the new token is written into the evicted token's row.)
        let mut p = c.view().positions[..5].to_vec();
        p.sort_unstable();
        assert_eq!(p, [0, 1, step - 2, step - 1, step]);
        let q = seeded_tensor([1, 2, 1, 8], 7, 1.0, &test_device());
        c.attend(&Query::contiguous(q, step).expect("q"), StatsRequest::NONE)
            .expect("attend");
        memory_matches_buffers(&c).expect("honest memory");
    }
    assert_eq!(c.lengths().logical, vec![20]);
    // Evicted rows are freed: 5 rows per head (plus at most one growth step).
    assert!(c.memory().key_bytes <= 2 * 64 * 8 * 4);
}

#[test]
fn bad_streaming_config_and_block_leave_cache_unchanged() {
    let shape = KvShape::new(1, 1, 1, 8).expect("shape");
    assert!(matches!(
        StreamingConfig::new(shape, 4, 0).init(&test_device()),
        Err(KvError::InvalidConfig {
            field: "recent",
            ..
        })
    ));
    let mut c = StreamingConfig::new(shape, 1, 2)
        .init(&test_device())
        .expect("init");
    append(&mut c, 6, 0);
    c.end_prefill().expect("trim");
    let before = c.view().positions;
    let k = seeded_tensor([1, 1, 1, 8], 1, 1.0, &test_device());
    // A position going back is rejected before anything is evicted.
    assert!(
        c.append(KvBlock::contiguous(k.clone(), k, 2).expect("block"))
            .is_err()
    );
    assert_eq!(c.view().positions, before);
}
