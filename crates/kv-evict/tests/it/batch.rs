//! Batches of sequences of different (padded) lengths: every sequence of the batch keeps the
//! same tokens and gets the same attention as when it runs alone, with prefill-time scorers
//! and decode-time policies, and the freed bytes can be read per sequence.

use burn::prelude::*;
use kv_core::{KvBlock, KvCache, KvShape, PAD, Query, RopeConfig, RopeConvention, StatsRequest};
use kv_evict::{
    BudgetKind, EvictConfig, GqaReduce, H2oConfig, ScissorhandsConfig, ScorerConfig,
    StreamingConfig, TokenBudget,
};
use kv_testkit::{assert_close_slices, seeded_tensor, test_device, to_vec};

const KV_HEADS: usize = 2;
const Q_HEADS: usize = 4;
const HEAD_DIM: usize = 8;
/// Prompt lengths of the two sequences (the second is right-padded in the batch).
const LENS: [usize; 2] = [20, 13];
/// Decode steps; the second sequence skips step 2 (a padding slot), as a finished or paused
/// sequence of a batch does.
const STEPS: usize = 4;

fn shape(batch: usize) -> KvShape {
    KvShape::new(batch, KV_HEADS, Q_HEADS, HEAD_DIM).expect("shape")
}

fn active(seq: usize, step: usize) -> bool {
    !(seq == 1 && step == 2)
}

/// Sequence `seq`'s own data: keys, values `[1, kv_heads, n, d]` and queries `[1, q_heads, n,
/// d]` for its tokens `from..from + n`, the same whether it runs alone or in a batch.
fn data(seq: usize, from: usize, n: usize) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    let d = test_device();
    let one = |t: usize, what: u64, heads: usize, scale: f32| {
        let seed = 1000 * seq as u64 + 10 * t as u64 + what;
        seeded_tensor([1, heads, 1, HEAD_DIM], seed, scale, &d)
    };
    let cat = |what: u64, heads: usize, scale: f32| {
        Tensor::cat(
            (from..from + n)
                .map(|t| one(t, what, heads, scale))
                .collect(),
            2,
        )
    };
    (
        cat(1, KV_HEADS, 1.5),
        cat(2, KV_HEADS, 1.0),
        cat(3, Q_HEADS, 1.5),
    )
}

/// Pads `[1, h, n, d]` to `[1, h, width, d]` with zeros after the rows.
fn pad(t: Tensor<4>, width: usize) -> Tensor<4> {
    let [_, h, n, d] = t.dims();
    if n == width {
        return t;
    }
    let z = Tensor::zeros([1, h, width - n, d], &t.device());
    Tensor::cat(vec![t, z], 2)
}

/// What one sequence saw: the real rows of every attention output, and the positions each KV
/// head held after every call (prefill, end of prefill, each active decode step).
#[derive(Debug, Default)]
struct Trace {
    outputs: Vec<Vec<f32>>,
    kept: Vec<Vec<Vec<u32>>>,
}

/// The positions each KV head of sequence `b` holds, sorted (the decode-time policies write
/// new tokens into evicted rows, so row order is not position order).
fn held(c: &dyn KvCache, b: usize) -> Vec<Vec<u32>> {
    let view = c.view();
    let width = view.keys.dims()[2];
    (0..KV_HEADS)
        .map(|h| {
            let st = (b * KV_HEADS + h) * width;
            let mut p: Vec<u32> = view.positions[st..st + width]
                .iter()
                .copied()
                .filter(|&p| p != PAD)
                .collect();
            p.sort_unstable();
            p
        })
        .collect()
}

/// Runs the sequences `seqs` together in one cache of batch `seqs.len()`: a padded prefill,
/// `end_prefill`, then the decode steps (padding for an inactive sequence).
fn run(c: &mut dyn KvCache, seqs: &[usize]) -> Vec<Trace> {
    let width = seqs.iter().map(|&s| LENS[s]).max().unwrap_or(0);
    let mut traces: Vec<Trace> = seqs.iter().map(|_| Trace::default()).collect();
    // Prefill.
    let (mut ks, mut vs, mut qs, mut pos) = (vec![], vec![], vec![], vec![]);
    for &s in seqs {
        let (k, v, q) = data(s, 0, LENS[s]);
        ks.push(pad(k, width));
        vs.push(pad(v, width));
        qs.push(pad(q, width));
        pos.extend((0..width).map(|i| if i < LENS[s] { i as u32 } else { PAD }));
    }
    c.append(KvBlock::new(Tensor::cat(ks, 0), Tensor::cat(vs, 0), pos.clone()).expect("block"))
        .expect("prefill append");
    let out = c
        .attend(
            &Query::new(Tensor::cat(qs, 0), pos).expect("query"),
            StatsRequest::NONE,
        )
        .expect("prefill attend")
        .output;
    for (b, &s) in seqs.iter().enumerate() {
        let rows = out
            .clone()
            .slice([b..b + 1, 0..Q_HEADS, 0..LENS[s], 0..HEAD_DIM]);
        traces[b].outputs.push(to_vec(&rows));
        traces[b].kept.push(held(c, b));
    }
    c.end_prefill().expect("end_prefill");
    for (b, t) in traces.iter_mut().enumerate() {
        t.kept.push(held(c, b));
    }
    // Decode.
    let mut next: Vec<usize> = seqs.iter().map(|&s| LENS[s]).collect();
    for step in 0..STEPS {
        if !seqs.iter().any(|&s| active(s, step)) {
            continue;
        }
        let (mut ks, mut vs, mut qs, mut pos) = (vec![], vec![], vec![], vec![]);
        for (b, &s) in seqs.iter().enumerate() {
            let (k, v, q) = data(s, next[b], 1);
            if active(s, step) {
                pos.push(next[b] as u32);
                ks.push(k);
                vs.push(v);
                qs.push(q);
            } else {
                pos.push(PAD);
                ks.push(k.zeros_like());
                vs.push(v.zeros_like());
                qs.push(q.zeros_like());
            }
        }
        c.append(KvBlock::new(Tensor::cat(ks, 0), Tensor::cat(vs, 0), pos.clone()).expect("block"))
            .expect("decode append");
        let out = c
            .attend(
                &Query::new(Tensor::cat(qs, 0), pos).expect("query"),
                StatsRequest::NONE,
            )
            .expect("decode attend")
            .output;
        for (b, &s) in seqs.iter().enumerate() {
            if active(s, step) {
                let row = out.clone().slice([b..b + 1, 0..Q_HEADS, 0..1, 0..HEAD_DIM]);
                traces[b].outputs.push(to_vec(&row));
                traces[b].kept.push(held(c, b));
                next[b] += 1;
            }
        }
    }
    traces
}

/// The batch of both sequences against each sequence alone, for caches made by `make`.
fn batch_equals_alone(name: &str, make: &dyn Fn(KvShape) -> Box<dyn KvCache>) {
    let mut batch = make(shape(2));
    let together = run(batch.as_mut(), &[0, 1]);
    for (s, got) in together.iter().enumerate() {
        let mut alone = make(shape(1));
        let want = run(alone.as_mut(), &[s]).remove(0);
        assert_eq!(
            got.kept, want.kept,
            "{name}: sequence {s} kept other tokens"
        );
        assert_eq!(got.outputs.len(), want.outputs.len());
        for (i, (a, b)) in got.outputs.iter().zip(&want.outputs).enumerate() {
            assert_close_slices(a, b, 1e-6, 1e-5);
            assert!(!a.is_empty(), "{name}: call {i} compared nothing");
        }
        // Something was evicted, so the comparison covers eviction.
        let after_prefill = &got.kept[1];
        assert!(
            after_prefill.iter().all(|h| h.len() < LENS[s]),
            "{name}: sequence {s} evicted nothing: {after_prefill:?}"
        );
    }
}

fn rope() -> RopeConfig {
    RopeConfig::new(HEAD_DIM, 10_000.0, RopeConvention::RotateHalf)
}

fn prefill_configs() -> Vec<(String, ScorerConfig, BudgetKind)> {
    let snap = ScorerConfig::SnapKv {
        window: 4,
        kernel: 3,
        gqa: GqaReduce::Mean,
    };
    vec![
        ("snapkv".into(), snap.clone(), BudgetKind::Uniform),
        ("adakv_snapkv".into(), snap, BudgetKind::ADAKV),
        ("tova".into(), ScorerConfig::Tova, BudgetKind::Uniform),
        ("knorm".into(), ScorerConfig::Knorm, BudgetKind::Uniform),
        (
            "observed_attention".into(),
            ScorerConfig::default_for("observed_attention").expect("scorer"),
            BudgetKind::Uniform,
        ),
        (
            "expected_attention".into(),
            ScorerConfig::ExpectedAttention {
                n_future_positions: 16,
                n_sink: 2,
                use_covariance: true,
                use_vnorm: true,
                epsilon: 0.0,
                gqa: GqaReduce::Mean,
            },
            BudgetKind::Uniform,
        ),
        (
            "streaming_llm".into(),
            ScorerConfig::StreamingLlm { n_sink: 2 },
            BudgetKind::Uniform,
        ),
    ]
}

#[test]
fn prefill_scorers_treat_each_padded_sequence_as_if_alone() {
    for (name, scorer, budget) in prefill_configs() {
        batch_equals_alone(&name, &|s| {
            Box::new(
                EvictConfig::new(s, 0.5, scorer.clone())
                    .with_budget(budget)
                    .with_rope(rope())
                    .with_protected(1, 1)
                    .init(&test_device())
                    .expect("init"),
            )
        });
    }
}

#[test]
fn decode_time_policies_treat_each_padded_sequence_as_if_alone() {
    batch_equals_alone("h2o ratio 0.5", &|s| {
        Box::new(
            H2oConfig::with_ratio(s, 0.5)
                .init(&test_device())
                .expect("init"),
        )
    });
    batch_equals_alone("h2o counts", &|s| {
        Box::new(
            H2oConfig::new(s, TokenBudget::Tokens(3), TokenBudget::Tokens(2))
                .init(&test_device())
                .expect("init"),
        )
    });
    batch_equals_alone("streaming_llm_decode ratio 0.5", &|s| {
        Box::new(
            StreamingConfig::with_ratio(s, 2, 0.5)
                .init(&test_device())
                .expect("init"),
        )
    });
    batch_equals_alone("streaming_llm_decode counts", &|s| {
        Box::new(
            StreamingConfig::new(s, 2, 4)
                .init(&test_device())
                .expect("init"),
        )
    });
    batch_equals_alone("scissorhands ratio 0.5", &|s| {
        let mut cfg = ScissorhandsConfig::new(s, TokenBudget::from_ratio(0.5).expect("ratio"));
        cfg.recent = 2;
        cfg.n_sink = 1;
        Box::new(cfg.init(&test_device()).expect("init"))
    });
}

#[test]
fn freed_bytes_are_reported_per_sequence() {
    let d = test_device();
    // Prefill-time SnapKV and decode-time H2O: each sequence of the batch holds and frees
    // what it holds and frees alone, and the per-sequence reports add up to the cache's.
    let snap = |s: KvShape| {
        EvictConfig::new(
            s,
            0.5,
            ScorerConfig::SnapKv {
                window: 4,
                kernel: 3,
                gqa: GqaReduce::Mean,
            },
        )
        .init(&d)
        .expect("init")
    };
    let h2o = |s: KvShape| H2oConfig::with_ratio(s, 0.75).init(&d).expect("init");
    let prefill = |c: &mut dyn KvCache, seqs: &[usize]| {
        let width = seqs.iter().map(|&s| LENS[s]).max().unwrap_or(0);
        let (mut ks, mut vs, mut qs, mut pos) = (vec![], vec![], vec![], vec![]);
        for &s in seqs {
            let (k, v, q) = data(s, 0, LENS[s]);
            ks.push(pad(k, width));
            vs.push(pad(v, width));
            qs.push(pad(q, width));
            pos.extend((0..width).map(|i| if i < LENS[s] { i as u32 } else { PAD }));
        }
        c.append(KvBlock::new(Tensor::cat(ks, 0), Tensor::cat(vs, 0), pos.clone()).expect("b"))
            .expect("append");
        c.attend(
            &Query::new(Tensor::cat(qs, 0), pos).expect("q"),
            StatsRequest::NONE,
        )
        .expect("attend");
    };

    let mut batch = snap(shape(2));
    prefill(&mut batch, &[0, 1]);
    let before: Vec<_> = (0..2).map(|b| batch.storage().sequence_memory(b)).collect();
    batch.end_prefill().expect("compress");
    let after: Vec<_> = (0..2).map(|b| batch.storage().sequence_memory(b)).collect();
    let total = batch.storage().memory();
    assert_eq!(
        after.iter().map(|m| m.stored_bytes()).sum::<usize>(),
        total.stored_bytes()
    );
    for s in 0..2 {
        let mut alone = snap(shape(1));
        prefill(&mut alone, &[s]);
        assert_eq!(before[s], alone.storage().memory(), "snapkv seq {s} before");
        alone.end_prefill().expect("compress");
        assert_eq!(after[s], alone.storage().memory(), "snapkv seq {s} after");
        // floor(n / 2) rows per head, K and V, fp32, plus 4-byte positions.
        let kept = LENS[s] / 2;
        assert_eq!(after[s].key_bytes, KV_HEADS * kept * HEAD_DIM * 4);
        assert_eq!(after[s].held_token_slots, KV_HEADS * kept);
        assert!(after[s].stored_bytes() < before[s].stored_bytes());
    }
    // The freed bytes differ per sequence (different lengths, different budgets).
    let freed: Vec<usize> = (0..2)
        .map(|b| before[b].stored_bytes() - after[b].stored_bytes())
        .collect();
    assert_ne!(freed[0], freed[1], "{freed:?}");

    let mut batch = h2o(shape(2));
    prefill(&mut batch, &[0, 1]);
    batch.end_prefill().expect("evict");
    for s in 0..2 {
        let mut alone = h2o(shape(1));
        prefill(&mut alone, &[s]);
        alone.end_prefill().expect("evict");
        let m = batch.storage().sequence_memory(s);
        assert_eq!(m, alone.storage().memory(), "h2o seq {s}");
        assert_eq!(m.held_token_slots, KV_HEADS * (LENS[s] / 4));
    }
}

#[test]
fn the_rolling_cache_makes_room_per_sequence() {
    // A block that brings 2 tokens to sequence 0 and 1 (plus a padding slot) to sequence 1:
    // sequence 1 must keep its sinks and recent window as if it had received its 1 token alone.
    let d = test_device();
    let s2 = shape(2);
    let mut batch = StreamingConfig::new(s2, 1, 3).init(&d).expect("init");
    let mut alone = StreamingConfig::new(shape(1), 1, 3).init(&d).expect("init");
    let (k, v, _) = data(1, 0, 6);
    let (k0, v0, _) = data(0, 0, 6);
    batch
        .append(
            KvBlock::contiguous(
                Tensor::cat(vec![k0, k.clone()], 0),
                Tensor::cat(vec![v0, v.clone()], 0),
                0,
            )
            .expect("block"),
        )
        .expect("prefill");
    alone
        .append(KvBlock::contiguous(k, v, 0).expect("block"))
        .expect("prefill");
    batch.end_prefill().expect("trim");
    alone.end_prefill().expect("trim");
    let (k0, v0, _) = data(0, 6, 2);
    let (k1, v1, _) = data(1, 6, 1);
    batch
        .append(
            KvBlock::new(
                Tensor::cat(vec![k0, pad(k1.clone(), 2)], 0),
                Tensor::cat(vec![v0, pad(v1.clone(), 2)], 0),
                vec![6, 7, 6, PAD],
            )
            .expect("block"),
        )
        .expect("decode");
    alone
        .append(KvBlock::contiguous(k1, v1, 6).expect("block"))
        .expect("decode");
    assert_eq!(held(&batch, 1), held(&alone, 0));
    assert_eq!(held(&batch, 1)[0], [0, 4, 5, 6]);
    assert_eq!(held(&batch, 0)[0], [0, 5, 6, 7]);
}

#[test]
fn decode_compression_waits_for_a_paused_sequence_to_refill_its_window() {
    // SnapKV (window 2) recompressed every 2 decode steps to 8 tokens; sequence 1 skips
    // steps, so at the first interval its window holds 1 decode query: no error, no
    // compression yet; once both windows are full the batch compresses.
    let d = test_device();
    let mut c = EvictConfig::new(
        shape(2),
        0.5,
        ScorerConfig::SnapKv {
            window: 2,
            kernel: 1,
            gqa: GqaReduce::Mean,
        },
    )
    .with_decode_compression(2, 8)
    .init(&d)
    .expect("init");
    let (k0, v0, q0) = data(0, 0, 20);
    let (k1, v1, q1) = data(1, 0, 20);
    c.append(
        KvBlock::contiguous(
            Tensor::cat(vec![k0, k1], 0),
            Tensor::cat(vec![v0, v1], 0),
            0,
        )
        .expect("block"),
    )
    .expect("prefill");
    c.attend(
        &Query::contiguous(Tensor::cat(vec![q0, q1], 0), 0).expect("q"),
        StatsRequest::NONE,
    )
    .expect("attend");
    c.end_prefill().expect("compress");
    assert_eq!(c.lengths().held, [10, 10, 10, 10]);
    let mut next = [20u32, 20];
    // Sequence 1 is active at steps 0, 3 and 4 only.
    let active = |b: usize, t: usize| b == 0 || t == 0 || t >= 3;
    for t in 0..6 {
        let (mut ks, mut vs, mut qs, mut pos) = (vec![], vec![], vec![], vec![]);
        for b in 0..2 {
            let (k, v, q) = data(b, next[b] as usize, 1);
            if active(b, t) {
                pos.push(next[b]);
                ks.push(k);
                vs.push(v);
                qs.push(q);
                next[b] += 1;
            } else {
                pos.push(PAD);
                ks.push(k.zeros_like());
                vs.push(v.zeros_like());
                qs.push(q.zeros_like());
            }
        }
        c.append(KvBlock::new(Tensor::cat(ks, 0), Tensor::cat(vs, 0), pos.clone()).expect("b"))
            .expect("decode append never fails on a paused sequence");
        c.attend(
            &Query::new(Tensor::cat(qs, 0), pos).expect("q"),
            StatsRequest::NONE,
        )
        .expect("attend");
    }
    assert!(
        c.decode_compressions() >= 1,
        "compressed once both windows refilled"
    );
    assert!(
        c.lengths().held.iter().all(|&n| n <= 8 + 2),
        "{:?}",
        c.lengths().held
    );
}
