//! In-place decode-time eviction: `RaggedCache::append_into` writes new tokens into evicted
//! rows (one row per token, no growth, no gather), attention stays the attention over the
//! held set, and the policies keep the same tokens as with gather + append.

use kv_core::{
    KvBlock, KvCache, KvError, KvShape, Query, RaggedCacheConfig, StatsRequest,
    memory_matches_buffers,
};
use kv_evict::{H2oConfig, KeyformerConfig, ScissorhandsConfig, StreamingConfig, TokenBudget};
use kv_testkit::{assert_close_slices, seeded_tensor, test_device, to_vec};

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

#[test]
fn append_into_overwrites_rows_in_place_and_attention_follows_positions() {
    let s = KvShape::new(1, 2, 4, 8).expect("shape");
    let d = test_device();
    let mut c = RaggedCacheConfig::new(s).init(&d).expect("init");
    c.append(block(s, 6, 0, 1)).expect("prefill");
    let before = c.memory();
    // Head 0 replaces row 2 (position 2), head 1 appends as usual.
    let new = block(s, 1, 6, 9);
    c.append_into(new.clone(), &[Some(vec![2]), None])
        .expect("append_into");
    assert_eq!(c.positions(0, 0), [0, 1, 6, 3, 4, 5]);
    assert_eq!(c.positions(0, 1), [0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(c.lengths().held, [6, 7]);
    assert_eq!(c.lengths().logical, [7]);
    // One row written, nothing grown (both heads were within their first 64-row buffers).
    assert_eq!(c.memory().key_bytes, before.key_bytes);
    memory_matches_buffers(&c).expect("honest memory");
    // The new row holds the new token's key.
    let k0 = c.stream(0, 0).keys.expect("keys");
    let got = to_vec(&k0.slice([2..3, 0..8]));
    let want = to_vec(&new.keys().clone().slice([0..1, 0..1, 0..1, 0..8]));
    assert_eq!(got, want);
    // Attention over unordered rows equals the reference attention over the same set in
    // position order (a decode query and a causal chunk that sees only part of the set).
    for (n, start) in [(1usize, 7u32), (3, 4)] {
        let q = query(s, n, start, 21);
        let out = c.attend(&q, StatsRequest::NONE).expect("attend").output;
        let mut sorted = RaggedCacheConfig::new(s).init(&d).expect("init");
        sorted.append(block(s, 6, 0, 1)).expect("prefill");
        sorted.append(new.clone()).expect("append");
        let keep: Vec<Vec<usize>> = vec![vec![0, 1, 3, 4, 5, 6], (0..7).collect()];
        sorted.retain(&keep).expect("retain");
        let want = sorted
            .attend(&q, StatsRequest::NONE)
            .expect("attend")
            .output;
        assert_close_slices(&to_vec(&out), &to_vec(&want), 1e-6, 1e-5);
    }
}

#[test]
fn bad_slots_are_errors_and_leave_the_storage_unchanged() {
    let s = KvShape::new(1, 2, 4, 8).expect("shape");
    let d = test_device();
    let mut c = RaggedCacheConfig::new(s).init(&d).expect("init");
    c.append(block(s, 4, 0, 1)).expect("prefill");
    let snapshot = |c: &kv_core::RaggedCache| {
        (
            to_vec(&c.view().keys),
            c.view().positions,
            c.lengths(),
            c.memory(),
        )
    };
    let before = snapshot(&c);
    let cases: [(&[Option<Vec<usize>>], &str); 4] = [
        (&[Some(vec![1])], "one list per stream"),
        (&[Some(vec![4]), None], "row 4 of 4 is not held"),
        (&[Some(vec![1, 2]), None], "two slots for one token"),
        (&[Some(vec![]), None], "no slot for one token"),
    ];
    for (slots, what) in cases {
        let e = c.append_into(block(s, 1, 4, 5), slots).expect_err(what);
        assert!(
            matches!(
                e,
                KvError::ShapeMismatch { .. } | KvError::IndexOutOfRange { .. }
            ),
            "{what}: {e}"
        );
        assert_eq!(snapshot(&c), before, "{what}");
    }
    let e = c
        .append_into(block(s, 2, 4, 5), &[Some(vec![1, 1]), None])
        .expect_err("a repeated slot");
    assert!(matches!(e, KvError::BadPositions { .. }), "{e}");
    assert_eq!(snapshot(&c), before);
    // A capacity counts no growth for a stream written in place.
    let mut full = RaggedCacheConfig::new(s)
        .with_capacity(4)
        .init(&d)
        .expect("init");
    full.append(block(s, 4, 0, 1)).expect("fill");
    full.append_into(block(s, 1, 4, 5), &[Some(vec![0]), Some(vec![3])])
        .expect("in place within capacity");
    assert!(
        full.append(block(s, 1, 5, 6)).is_err(),
        "appending past it fails"
    );
}

/// What a decode run saw: the sorted held positions of every stream after each step, the
/// decode outputs, and the largest key buffer in bytes.
struct DecodeRun {
    kept: Vec<Vec<Vec<u32>>>,
    outs: Vec<Vec<f32>>,
    cap: usize,
}

/// Runs a policy through a prefill of 24 tokens and 40 decode steps.
fn decode_run(c: &mut dyn KvCache) -> DecodeRun {
    let s = c.shape();
    c.append(block(s, 24, 0, 1)).expect("prefill");
    c.attend(&query(s, 24, 0, 2), StatsRequest::COLUMN_SUMS)
        .expect("attend");
    c.end_prefill().expect("end_prefill");
    let mut kept = Vec::new();
    let mut outs = Vec::new();
    let mut cap = 0;
    for t in 0..40u32 {
        let pos = 24 + t;
        c.append(block(s, 1, pos, 100 + u64::from(t)))
            .expect("decode");
        let out = c
            .attend(&query(s, 1, pos, 300 + u64::from(t)), StatsRequest::NONE)
            .expect("attend")
            .output;
        outs.push(to_vec(&out));
        let v = c.view();
        let w = v.positions.len() / s.streams();
        kept.push(
            (0..s.streams())
                .map(|st| {
                    let mut p: Vec<u32> = v.positions[st * w..(st + 1) * w]
                        .iter()
                        .copied()
                        .filter(|&p| p != kv_core::PAD)
                        .collect();
                    p.sort_unstable();
                    p
                })
                .collect(),
        );
        cap = cap.max(c.memory().key_bytes);
        memory_matches_buffers(c).expect("honest memory");
    }
    DecodeRun { kept, outs, cap }
}

#[test]
fn streaming_in_place_is_a_ring_of_the_same_tokens_with_the_same_attention() {
    // The rolling window's kept set is known exactly: the sinks and the newest tokens. The
    // in-place cache must hold exactly those and attend like the reference over them.
    let s = KvShape::new(1, 2, 4, 8).expect("shape");
    let mut c = StreamingConfig::new(s, 2, 6)
        .init(&test_device())
        .expect("init");
    let DecodeRun { kept, outs, cap } = decode_run(&mut c);
    for (t, k) in kept.iter().enumerate() {
        let pos = 24 + t as u32;
        let want: Vec<u32> = [0, 1].into_iter().chain(pos - 5..=pos).collect();
        assert_eq!(k[0], want, "step {t}");
        assert_eq!(k[1], want, "step {t}");
    }
    // The rows are a ring (not in position order), and the buffers stayed at the 8 rows per
    // head that end_prefill left: every step wrote one row in place.
    let p = c.storage().positions(0, 0);
    assert!(p.windows(2).any(|w| w[0] > w[1]), "{p:?}");
    assert_eq!(cap, 2 * 8 * 8 * 4);
    // The last output equals the reference attention over the cache's own view.
    let q = query(s, 1, 63, 300 + 39);
    let want = c.view().attend_reference(&q, StatsRequest::NONE).output;
    assert_close_slices(outs.last().expect("outputs"), &to_vec(&want), 1e-6, 1e-5);
}

#[test]
fn policies_hold_their_budgets_in_place() {
    let s = KvShape::new(1, 2, 4, 8).expect("shape");
    let d = test_device();
    // (name, cache, tokens held after each append, buffer rows per head during decode)
    let cases: Vec<(&str, Box<dyn KvCache>, usize, usize)> = vec![
        (
            "h2o",
            Box::new(
                H2oConfig::new(s, TokenBudget::Tokens(5), TokenBudget::Tokens(3))
                    .init(&d)
                    .expect("init"),
            ),
            9,
            // H2O holds heavy + recent + 1 between steps: one growth to 64 rows at the first.
            64,
        ),
        (
            "scissorhands",
            Box::new(
                ScissorhandsConfig::new(s, TokenBudget::Tokens(20))
                    .init(&d)
                    .expect("init"),
            ),
            20,
            20,
        ),
        (
            "keyformer",
            Box::new(
                KeyformerConfig::new(s, TokenBudget::Tokens(10))
                    .init(&d)
                    .expect("init"),
            ),
            10,
            10,
        ),
    ];
    for (name, mut c, held, rows) in cases {
        let DecodeRun { kept, cap, .. } = decode_run(c.as_mut());
        for (t, k) in kept.iter().enumerate() {
            assert!(k.iter().all(|h| h.len() == held), "{name} step {t}: {k:?}");
            assert_eq!(
                k[0].last(),
                Some(&(24 + t as u32)),
                "{name}: the new token is held"
            );
        }
        // No buffer grew past `rows`: every decode step wrote its token in place.
        assert_eq!(cap, 2 * rows * 8 * 4, "{name}");
    }
}
