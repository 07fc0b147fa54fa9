//! Decode-time H2O through the cache: scores equal to the running sum of the attention each
//! held token received, the heavy-hitter + recent rule, budgets as counts or fractions.

use std::collections::BTreeMap;

use kv_core::{KvBlock, KvCache, KvError, KvShape, Query, StatsRequest, memory_matches_buffers};
use kv_evict::{GqaReduce, H2oCache, H2oConfig, TokenBudget};
use kv_testkit::{seeded_tensor, test_device, to_vec};

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

/// An independent model of H2O: per (stream, position) accumulated attention, from the
/// reference attention over the cache's own view, and the expected kept set.
struct Model {
    scores: Vec<BTreeMap<u32, f32>>,
}

impl Model {
    /// Adds the column sums of `q` over `view` (GQA mean) to every held token.
    fn observe(&mut self, c: &H2oCache, q: &Query) {
        let view = c.view();
        let cols = view
            .attend_reference(q, StatsRequest::COLUMN_SUMS)
            .stats
            .column_sums
            .expect("cols");
        let [b, kvh, g, w] = cols.dims();
        let cols = to_vec(&cols);
        for bi in 0..b {
            for h in 0..kvh {
                let s = bi * kvh + h;
                for j in 0..w {
                    let p = view.positions[s * w + j];
                    if p == kv_core::PAD {
                        continue;
                    }
                    let sum: f32 = (0..g).map(|i| cols[((s * g) + i) * w + j]).sum();
                    *self.scores[s].entry(p).or_insert(0.0) += sum / g as f32;
                }
            }
        }
    }

    /// The positions stream `s` keeps under (heavy, recent).
    fn keep(&self, s: usize, heavy: usize, recent: usize) -> Vec<u32> {
        let all: Vec<(u32, f32)> = self.scores[s].iter().map(|(&p, &v)| (p, v)).collect();
        if all.len() <= heavy + recent {
            return all.iter().map(|x| x.0).collect();
        }
        let (old, new) = all.split_at(all.len() - recent);
        let mut old = old.to_vec();
        old.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut keep: Vec<u32> = old[..heavy].iter().map(|x| x.0).collect();
        keep.sort_unstable();
        keep.extend(new.iter().map(|x| x.0));
        keep
    }

    fn retain(&mut self, s: usize, keep: &[u32]) {
        self.scores[s].retain(|p, _| keep.contains(p));
    }
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
fn scores_are_running_sums_and_eviction_keeps_heavy_plus_recent() {
    let shape = KvShape::new(2, 2, 4, 8).expect("shape");
    let (heavy, recent) = (3, 4);
    let mut c = H2oConfig::new(
        shape,
        TokenBudget::Tokens(heavy),
        TokenBudget::Tokens(recent),
    )
    .init(&test_device())
    .expect("init");
    let mut m = Model {
        scores: vec![BTreeMap::new(); shape.streams()],
    };
    // Prefill of 12 tokens in one pass, then 10 decode steps.
    let evict_model = |m: &mut Model| {
        for s in 0..shape.streams() {
            let keep = m.keep(s, heavy, recent);
            m.retain(s, &keep);
        }
    };
    c.append(block(shape, 12, 0, 1)).expect("prefill");
    let q = query(shape, 12, 0, 3);
    m.observe(&c, &q);
    c.attend(&q, StatsRequest::NONE).expect("attend");
    assert_eq!(
        c.lengths().held,
        vec![12; 4],
        "nothing evicted before end_prefill's turn"
    );
    c.end_prefill().expect("end_prefill");
    evict_model(&mut m);
    for step in 12..22u32 {
        for s in 0..shape.streams() {
            let want: Vec<u32> = m.scores[s].keys().copied().collect();
            assert_eq!(held_positions(&c, s), want, "step {step}, stream {s}");
            let sc: Vec<f32> = m.scores[s].values().copied().collect();
            kv_testkit::assert_close_slices(&by_position(&c, s, &c.scores()[s]), &sc, 1e-5, 1e-4);
        }
        c.append(block(shape, 1, step, 10 + u64::from(step)))
            .expect("decode");
        evict_model(&mut m);
        for s in 0..shape.streams() {
            m.scores[s].insert(step, 0.0);
        }
        assert_eq!(c.lengths().held, vec![heavy + recent + 1; 4]);
        let q = query(shape, 1, step, 40 + u64::from(step));
        m.observe(&c, &q);
        c.attend(&q, StatsRequest::NONE).expect("attend");
        memory_matches_buffers(&c).expect("honest memory");
    }
    assert_eq!(c.lengths().logical, vec![22, 22]);
    // Memory is bounded: 8 rows per head (one growth step at most) plus 4-byte scores.
    assert!(c.memory().key_bytes <= 4 * 64 * 8 * 4);
    // evict() applies the pending eviction now.
    c.evict().expect("evict");
    assert_eq!(c.lengths().held, vec![heavy + recent; 4]);
}

#[test]
fn fractions_of_the_prompt_resolve_at_end_prefill() {
    let shape = KvShape::new(1, 1, 2, 8).expect("shape");
    let mut c = H2oConfig::new(shape, TokenBudget::Ratio(0.25), TokenBudget::Ratio(0.25))
        .init(&test_device())
        .expect("init");
    // A chunked prefill of 20 + 20 tokens: nothing is evicted before the prompt is known.
    c.append(block(shape, 20, 0, 1)).expect("chunk");
    c.attend(&query(shape, 20, 0, 2), StatsRequest::NONE)
        .expect("attend");
    c.append(block(shape, 20, 20, 3)).expect("chunk");
    c.attend(&query(shape, 20, 20, 4), StatsRequest::NONE)
        .expect("attend");
    assert_eq!(c.lengths().held, vec![40]);
    assert_eq!(c.budget(0), None);
    c.end_prefill().expect("end_prefill");
    assert_eq!(c.budget(0), Some((10, 10)));
    assert_eq!(c.lengths().held, vec![20]);
    assert_eq!(
        &held_positions(&c, 0)[10..],
        &(30..40).collect::<Vec<u32>>()[..]
    );
    c.reset();
    assert_eq!(c.budget(0), None);
    assert_eq!(c.scores()[0].len(), 0);
}

#[test]
fn token_counts_evict_between_prefill_chunks() {
    let shape = KvShape::new(1, 1, 1, 8).expect("shape");
    let mut c = H2oConfig::new(shape, TokenBudget::Tokens(2), TokenBudget::Tokens(3))
        .init(&test_device())
        .expect("init");
    c.append(block(shape, 8, 0, 1)).expect("chunk");
    c.attend(&query(shape, 8, 0, 2), StatsRequest::NONE)
        .expect("attend");
    assert_eq!(c.lengths().held, vec![8]);
    c.append(block(shape, 4, 8, 3)).expect("chunk");
    assert_eq!(
        c.lengths().held,
        vec![5 + 4],
        "evicted to 2 + 3, then the chunk"
    );
    let p = held_positions(&c, 0);
    assert_eq!(&p[2..], &[5, 6, 7, 8, 9, 10, 11]);
}

#[test]
fn bad_configs_and_blocks_leave_the_cache_unchanged() {
    let shape = KvShape::new(1, 1, 1, 8).expect("shape");
    let d = test_device();
    assert!(matches!(
        H2oConfig::new(shape, TokenBudget::Tokens(0), TokenBudget::Tokens(0)).init(&d),
        Err(KvError::InvalidConfig {
            field: "recent",
            ..
        })
    ));
    assert!(matches!(
        TokenBudget::parse("heavy", "1.5"),
        Err(KvError::InvalidConfig { field: "heavy", .. })
    ));
    assert!(TokenBudget::parse("heavy", "x").is_err());
    assert_eq!(
        TokenBudget::parse("heavy", "768").ok(),
        Some(TokenBudget::Tokens(768))
    );
    assert_eq!(
        TokenBudget::parse("heavy", "0.25").ok(),
        Some(TokenBudget::Ratio(0.25))
    );
    // A fraction that resolves to nothing is an error at end_prefill, cache unchanged.
    let mut c = H2oConfig::new(shape, TokenBudget::Ratio(0.01), TokenBudget::Ratio(0.01))
        .init(&d)
        .expect("init");
    c.append(block(shape, 5, 0, 1)).expect("append");
    assert!(matches!(
        c.end_prefill(),
        Err(KvError::InvalidConfig {
            field: "recent",
            ..
        })
    ));
    assert_eq!(c.lengths().held, vec![5]);
    // recent = 0: the newest token can be evicted; a position going back is still rejected
    // before anything is evicted.
    let mut cfg = H2oConfig::new(shape, TokenBudget::Tokens(2), TokenBudget::Tokens(0));
    cfg.gqa = GqaReduce::Max;
    let mut c = cfg.init(&d).expect("init");
    c.append(block(shape, 6, 0, 1)).expect("append");
    c.attend(&query(shape, 6, 0, 2), StatsRequest::NONE)
        .expect("attend");
    c.end_prefill().expect("evict");
    assert_eq!(c.lengths().held, vec![2]);
    // Appending again: the eviction before the store would run, but position 5 was already
    // appended (even if it was evicted), so the block is rejected first.
    c.append(block(shape, 1, 6, 5)).expect("append");
    let before = (held_positions(&c, 0), c.scores().to_vec(), c.memory());
    assert!(
        c.append(block(shape, 1, 6, 9)).is_err(),
        "position 6 was already appended"
    );
    assert_eq!(
        (held_positions(&c, 0), c.scores().to_vec(), c.memory()),
        before
    );
    assert_eq!(c.lengths().held, vec![3]);
    c.append(block(shape, 1, 7, 9)).expect("position 7 is new");
    assert_eq!(c.lengths().held, vec![3]);
}
