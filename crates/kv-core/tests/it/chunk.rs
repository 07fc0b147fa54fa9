//! ChunkAttention: prefix sharing by exact token match, reference counts, freeing, two-phase
//! attention against per-sequence reference attention, bad input.

use burn::prelude::*;
use kv_core::{
    ChunkAttention, ChunkAttentionConfig, KeyPositions, KvError, Query, SeqId, StorageDtype,
    reference_attention_lse, sum_held,
};
use kv_testkit::{max_diff, seeded_tensor, tensor_from, test_device, to_vec};
use proptest::prelude::*;

/// One sequence's tokens and, per layer, its full keys and values `[1, kv_heads, len, d]`.
#[derive(Clone)]
struct Seq {
    tokens: Vec<u32>,
    kv: Vec<(Tensor<4>, Tensor<4>)>,
}

impl Seq {
    fn len(&self) -> usize {
        self.tokens.len()
    }
}

/// Per-layer K/V `[1, kv_heads, n, d]` drawn from `seed`.
fn kv(layers: usize, kvh: usize, n: usize, d: usize, seed: u64) -> Vec<(Tensor<4>, Tensor<4>)> {
    let dev = test_device();
    (0..layers as u64)
        .map(|l| {
            (
                seeded_tensor([1, kvh, n, d], seed * 1000 + 2 * l, 1.0, &dev),
                seeded_tensor([1, kvh, n, d], seed * 1000 + 2 * l + 1, 1.0, &dev),
            )
        })
        .collect()
}

/// Prefix + suffix, the prefix K/V identical for every sequence built from the same `prefix`.
fn with_suffix(prefix: &Seq, tokens: Vec<u32>, kv_suffix: Vec<(Tensor<4>, Tensor<4>)>) -> Seq {
    let mut all = prefix.tokens.clone();
    all.extend(tokens);
    let kv = if prefix.tokens.is_empty() {
        kv_suffix
    } else {
        prefix
            .kv
            .iter()
            .zip(kv_suffix)
            .map(|((pk, pv), (sk, sv))| {
                (
                    Tensor::cat(vec![pk.clone(), sk], 2),
                    Tensor::cat(vec![pv.clone(), sv], 2),
                )
            })
            .collect()
    };
    Seq { tokens: all, kv }
}

fn empty_seq() -> Seq {
    Seq {
        tokens: Vec::new(),
        kv: Vec::new(),
    }
}

/// Two-phase attention of queries at `q_pos[b]` (one list per sequence, equal lengths) for
/// all `ids` at every layer, against reference attention over each sequence's own K/V;
/// returns the largest difference of outputs and of log-sum-exps.
fn attention_error(
    store: &ChunkAttention,
    ids: &[SeqId],
    seqs: &[&Seq],
    q_pos: &[Vec<u32>],
    seed: u64,
) -> (f32, f32) {
    let dev = test_device();
    let cfg = store.config();
    let (qh, d, n) = (cfg.q_heads, cfg.head_dim, q_pos[0].len());
    let mut worst = (0.0f32, 0.0f32);
    for layer in 0..cfg.layers {
        let q = seeded_tensor([ids.len(), qh, n, d], seed + layer as u64, 1.0, &dev);
        let query = Query::new(q.clone(), q_pos.concat()).expect("query");
        let (out, lse) = store.attend(layer, ids, &query).expect("attend");
        assert_eq!(out.dims(), [ids.len(), qh, n, d]);
        for (b, s) in seqs.iter().enumerate() {
            let (k, v) = s.kv[layer].clone();
            let kp: Vec<u32> = (0..s.len() as u32).collect();
            let (ro, rl) = reference_attention_lse(
                q.clone().slice([b..b + 1, 0..qh, 0..n, 0..d]),
                k,
                v,
                &q_pos[b],
                KeyPositions::PerSequence(&kp),
                None,
            );
            let o = out.clone().slice([b..b + 1, 0..qh, 0..n, 0..d]);
            let [_, kvh, g, _] = lse.dims();
            let l = lse.clone().slice([b..b + 1, 0..kvh, 0..g, 0..n]);
            worst.0 = worst.0.max(max_diff(&o, &ro));
            worst.1 = worst.1.max(max_diff(&l, &rl));
        }
    }
    worst
}

/// `memory()` equals the buffers the store holds, measured from the buffers.
fn assert_honest(store: &ChunkAttention) {
    let m = store.memory();
    assert_eq!(
        (m.key_bytes, m.value_bytes, m.metadata_bytes),
        sum_held(&store.held_buffers()),
        "memory() vs held buffers"
    );
}

/// What a failed call must leave unchanged.
fn snapshot(store: &ChunkAttention) -> (Vec<SeqId>, usize, kv_core::MemoryReport, Vec<Vec<u32>>) {
    let ids = store.sequences();
    let tokens = ids
        .iter()
        .map(|&i| store.seq_tokens(i).expect("live"))
        .collect();
    (ids, store.chunk_count(), store.memory(), tokens)
}

const LAYERS: usize = 2;
const KVH: usize = 2;
const QH: usize = 4;
const D: usize = 8;

fn card_store() -> ChunkAttention {
    ChunkAttentionConfig::new(LAYERS, KVH, QH, D)
        .init(&test_device())
        .expect("init")
}

/// The catalog card's test: a 128-token common prefix with two different suffixes.
#[test]
fn common_prefix_of_128_tokens_is_two_shared_chunks_and_attention_is_exact() {
    let mut store = card_store();
    assert_eq!(store.config().chunk_size, 64);
    let prefix = Seq {
        tokens: (1..=128).collect(),
        kv: kv(LAYERS, KVH, 128, D, 1),
    };
    let a = with_suffix(&prefix, (1000..1040).collect(), kv(LAYERS, KVH, 40, D, 2));
    let b = with_suffix(&prefix, (2000..2070).collect(), kv(LAYERS, KVH, 70, D, 3));
    let ia = store.add_seq(&a.tokens, &a.kv).expect("add a");
    let ib = store.add_seq(&b.tokens, &b.kv).expect("add b");

    // ceil(128 / 64) = 2 shared chunks with reference count 2; private tails: 1 + 2 chunks.
    assert_eq!(store.shared_chunk_count(), 2);
    assert_eq!(store.chunk_count(), 5);
    let cb = store.seq_chunks(ib).expect("b");
    let shape: Vec<(usize, usize, usize)> = cb.iter().map(|c| (c.start, c.len, c.refs)).collect();
    assert_eq!(
        shape,
        vec![(0, 64, 2), (64, 64, 2), (128, 64, 1), (192, 6, 1)]
    );
    assert_eq!(store.seq_chunks(ia).expect("a")[..2], cb[..2]);
    assert_eq!(store.seq_tokens(ib).expect("b"), b.tokens);
    assert_eq!(store.seq_len(ia).expect("a"), 168);

    // Each shared chunk is held once: 5 chunks of 64 slots per layer, keys and values.
    let chunk_bytes = KVH * 64 * D * 4;
    let m = store.memory();
    assert_eq!(m.key_bytes, 5 * LAYERS * chunk_bytes);
    assert_eq!(m.value_bytes, 5 * LAYERS * chunk_bytes);
    assert_eq!(store.unshared_kv_bytes(), 7 * LAYERS * 2 * chunk_bytes);
    assert_eq!(m.logical_tokens, LAYERS * (168 + 198));
    assert_honest(&store);

    // Decode queries (the last position) and prefill-style queries inside the prefix, inside
    // the suffix and at chunk boundaries.
    let seqs = [&a, &b];
    let (eo, el) = attention_error(&store, &[ia, ib], &seqs, &[vec![167], vec![197]], 10);
    assert!(eo <= 1e-5 && el <= 1e-5, "decode: {eo} {el}");
    let pos = [
        vec![0, 63, 64, 127, 128, 167],
        vec![5, 64, 100, 128, 191, 192],
    ];
    let (eo, el) = attention_error(&store, &[ia, ib], &seqs, &pos, 20);
    assert!(eo <= 1e-5 && el <= 1e-5, "prefill rows: {eo} {el}");
    // The batch may list the sequences in any order, or only some of them.
    let (eo, _) = attention_error(&store, &[ib, ia], &[&b, &a], &[vec![197], vec![167]], 30);
    assert!(eo <= 1e-5, "reordered: {eo}");
    let (eo, _) = attention_error(&store, &[ib], &[&b], &[vec![150]], 40);
    assert!(eo <= 1e-5, "one sequence: {eo}");

    // Removing one sequence keeps the shared chunks alive (now private to the other).
    store.remove_seq(ia).expect("remove a");
    assert_eq!(store.chunk_count(), 4);
    assert_eq!(store.shared_chunk_count(), 0);
    let refs: Vec<usize> = store
        .seq_chunks(ib)
        .expect("b")
        .iter()
        .map(|c| c.refs)
        .collect();
    assert_eq!(refs, vec![1; 4]);
    assert_eq!(store.memory().key_bytes, 4 * LAYERS * chunk_bytes);
    let (eo, _) = attention_error(&store, &[ib], &[&b], &[vec![197]], 50);
    assert!(eo <= 1e-5, "after removing a: {eo}");
    let (k, v) = store.seq_kv(1, ib).expect("kv");
    assert_eq!(to_vec(&k), to_vec(&b.kv[1].0));
    assert_eq!(to_vec(&v), to_vec(&b.kv[1].1));

    // Removing the last sequence frees everything.
    store.remove_seq(ib).expect("remove b");
    assert_eq!(store.chunk_count(), 0);
    assert_eq!(store.memory().stored_bytes(), 0);
    assert!(store.held_buffers().is_empty());
    assert!(store.sequences().is_empty());
}

/// Appends go to a sequence's private tail and start new chunks as it fills; a full shared
/// tail is never written.
#[test]
fn append_fills_private_tails_and_never_writes_shared_chunks() {
    let dev = test_device();
    let mut store = card_store();
    let prefix = Seq {
        tokens: (1..=64).collect(),
        kv: kv(LAYERS, KVH, 64, D, 5),
    };
    // `a` is exactly the prefix: its tail is the full chunk it shares with `b`.
    let mut a = prefix.clone();
    let mut b = with_suffix(&prefix, (500..510).collect(), kv(LAYERS, KVH, 10, D, 6));
    let ia = store.add_seq(&a.tokens, &a.kv).expect("a");
    let ib = store.add_seq(&b.tokens, &b.kv).expect("b");
    assert_eq!(store.shared_chunk_count(), 1);
    assert_eq!(store.chunk_count(), 2);

    // Three steps of 25 tokens each (crossing chunk boundaries), then three decode steps.
    let steps = [25, 25, 25, 1, 1, 1];
    for (step, &n) in steps.iter().enumerate() {
        let seed = 100 + step as u64;
        let step_kv: Vec<(Tensor<4>, Tensor<4>)> = (0..LAYERS as u64)
            .map(|l| {
                (
                    seeded_tensor([2, KVH, n, D], seed * 10 + 2 * l, 1.0, &dev),
                    seeded_tensor([2, KVH, n, D], seed * 10 + 2 * l + 1, 1.0, &dev),
                )
            })
            .collect();
        let toks: Vec<u32> = (0..2 * n as u32)
            .map(|i| 10_000 * (step as u32 + 1) + i)
            .collect();
        store.append(&[ia, ib], &toks, &step_kv).expect("append");
        for (row, s) in [&mut a, &mut b].into_iter().enumerate() {
            s.tokens.extend_from_slice(&toks[row * n..(row + 1) * n]);
            s.kv =
                s.kv.iter()
                    .zip(&step_kv)
                    .map(|((k, v), (sk, sv))| {
                        let r = [row..row + 1, 0..KVH, 0..n, 0..D];
                        (
                            Tensor::cat(vec![k.clone(), sk.clone().slice(r.clone())], 2),
                            Tensor::cat(vec![v.clone(), sv.clone().slice(r)], 2),
                        )
                    })
                    .collect();
        }
        let (la, lb) = (a.len() as u32, b.len() as u32);
        let (eo, el) = attention_error(
            &store,
            &[ia, ib],
            &[&a, &b],
            &[vec![la - 1, 0], vec![lb - 1, 70]],
            seed,
        );
        assert!(eo <= 1e-5 && el <= 1e-5, "step {step}: {eo} {el}");
    }
    assert_eq!(store.seq_tokens(ia).expect("a"), a.tokens);
    assert_eq!(store.seq_tokens(ib).expect("b"), b.tokens);
    // The shared chunk kept its count and content; each sequence has its own later chunks.
    let ca = store.seq_chunks(ia).expect("a");
    assert_eq!((ca[0].refs, ca[0].len), (2, 64));
    assert!(ca[1..].iter().all(|c| c.refs == 1));
    assert_eq!(store.shared_chunk_count(), 1);
    // a: 64 + 78 = 142 tokens -> 3 chunks; b: 74 + 78 = 152 -> 3 chunks; one shared.
    assert_eq!(store.chunk_count(), 5);
    assert_honest(&store);
}

/// A later sequence shares chunks that an earlier one filled by appending; fp16 storage
/// halves the bytes and stays within fp16 rounding of the reference.
#[test]
fn chunks_filled_by_appends_are_shared_and_fp16_halves_bytes() {
    let dev = test_device();
    let mut store = ChunkAttentionConfig::new(1, 1, 2, 4)
        .with_chunk_size(4)
        .with_dtype(StorageDtype::F16)
        .init(&dev)
        .expect("init");
    let first = kv(1, 1, 6, 4, 7);
    let ia = store.add_seq(&[1, 2, 3, 4, 5, 6], &first).expect("a");
    let (k2, v2) = (
        seeded_tensor([1, 1, 2, 4], 70, 1.0, &dev),
        seeded_tensor([1, 1, 2, 4], 71, 1.0, &dev),
    );
    store
        .append(&[ia], &[7, 8], &[(k2.clone(), v2.clone())])
        .expect("append");
    // Tokens 1..=8 now fill two chunks of `a`; `b` starts with them and shares both.
    let full_k = Tensor::cat(vec![first[0].0.clone(), k2], 2);
    let full_v = Tensor::cat(vec![first[0].1.clone(), v2], 2);
    let b_kv = vec![(
        Tensor::cat(
            vec![full_k.clone(), seeded_tensor([1, 1, 1, 4], 72, 1.0, &dev)],
            2,
        ),
        Tensor::cat(
            vec![full_v.clone(), seeded_tensor([1, 1, 1, 4], 73, 1.0, &dev)],
            2,
        ),
    )];
    let ib = store
        .add_seq(&[1, 2, 3, 4, 5, 6, 7, 8, 9], &b_kv)
        .expect("b");
    assert_eq!(store.shared_chunk_count(), 2);
    assert_eq!(store.chunk_count(), 3);
    assert_eq!(store.memory().key_bytes, 3 * 4 * 4 * 2);
    let a = Seq {
        tokens: (1..=8).collect(),
        kv: vec![(full_k, full_v)],
    };
    let b = Seq {
        tokens: (1..=9).collect(),
        kv: b_kv,
    };
    let (eo, el) = attention_error(&store, &[ia, ib], &[&a, &b], &[vec![7], vec![8]], 3);
    assert!(eo <= 2e-3 && el <= 2e-3, "fp16: {eo} {el}");
}

#[test]
fn bad_input_is_rejected_and_leaves_the_store_unchanged() {
    let dev = test_device();
    let mut store = card_store();
    let s = Seq {
        tokens: (1..=70).collect(),
        kv: kv(LAYERS, KVH, 70, D, 9),
    };
    let id = store.add_seq(&s.tokens, &s.kv).expect("add");
    let before = snapshot(&store);
    let shape_err = |r: Result<SeqId, KvError>, what: &str| match r {
        Err(KvError::ShapeMismatch { what: w, .. }) => assert!(w.starts_with(what), "{w}"),
        other => panic!("expected a {what} mismatch, got {other:?}"),
    };

    // Tokens and K/V of different lengths.
    shape_err(store.add_seq(&s.tokens[..69], &s.kv), "seq");
    // One layer missing.
    shape_err(store.add_seq(&s.tokens, &s.kv[..1]), "layers");
    // Heads and head_dim that disagree with the store.
    shape_err(
        store.add_seq(&[1, 2], &kv(LAYERS, KVH + 1, 2, D, 1)),
        "kv_heads",
    );
    shape_err(
        store.add_seq(&[1, 2], &kv(LAYERS, KVH, 2, D / 2, 1)),
        "head_dim",
    );
    // Keys and values of different lengths.
    let mut uneven = kv(LAYERS, KVH, 2, D, 1);
    uneven[1].1 = seeded_tensor([1, KVH, 3, D], 1, 1.0, &dev);
    shape_err(store.add_seq(&[1, 2], &uneven), "seq");
    // Non-finite values (in the last layer, after valid ones).
    let mut nan = kv(LAYERS, KVH, 70, D, 9);
    let mut host = to_vec(&nan[1].1);
    host[3 * D] = f32::NAN;
    nan[1].1 = tensor_from(host, [1, KVH, 70, D], &dev);
    assert!(matches!(
        store.add_seq(&s.tokens, &nan),
        Err(KvError::NonFinite { what: "values", .. })
    ));
    assert!(matches!(
        store.add_seq(&[], &kv(LAYERS, KVH, 1, D, 1)),
        Err(KvError::Empty { .. })
    ));
    assert_eq!(snapshot(&store), before);

    // Unknown and repeated sequence ids.
    let gone = store
        .add_seq(&[9, 9], &kv(LAYERS, KVH, 2, D, 4))
        .expect("add");
    store.remove_seq(gone).expect("remove");
    assert_eq!(snapshot(&store), before);
    let err = store.remove_seq(gone).expect_err("removed twice");
    assert!(
        matches!(&err, KvError::InvalidConfig { field: "seq", reason } if reason.contains("not in the store")),
        "{err}"
    );
    let step = kv(LAYERS, KVH, 1, D, 8);
    assert!(store.append(&[gone], &[1], &step).is_err());
    let two = vec![
        (
            seeded_tensor([2, KVH, 1, D], 1, 1.0, &dev),
            seeded_tensor([2, KVH, 1, D], 2, 1.0, &dev),
        );
        LAYERS
    ];
    assert!(matches!(
        store.append(&[id, id], &[1, 2], &two),
        Err(KvError::InvalidConfig { field: "seq", .. })
    ));
    // Token count not a multiple of the sequences, K/V rows that disagree with the tokens.
    assert!(matches!(
        store.append(&[id], &[], &step),
        Err(KvError::Empty { .. })
    ));
    assert!(matches!(
        store.append(&[id], &[1, 2], &step),
        Err(KvError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        store.append(&[id], &[1], &two),
        Err(KvError::ShapeMismatch { what: "batch", .. })
    ));
    assert_eq!(snapshot(&store), before);

    // Attention: layer out of range, unknown sequence, query of the wrong batch or heads.
    let q = Query::contiguous(seeded_tensor([1, QH, 1, D], 3, 1.0, &dev), 69).expect("q");
    assert!(matches!(
        store.attend(LAYERS, &[id], &q),
        Err(KvError::IndexOutOfRange { index: LAYERS, .. })
    ));
    assert!(store.attend(0, &[gone], &q).is_err());
    assert!(store.attend(0, &[], &q).is_err());
    let q2 = Query::contiguous(seeded_tensor([2, QH, 1, D], 3, 1.0, &dev), 69).expect("q");
    assert!(matches!(
        store.attend(0, &[id], &q2),
        Err(KvError::ShapeMismatch { what: "batch", .. })
    ));
    let q3 = Query::contiguous(seeded_tensor([1, QH + 1, 1, D], 3, 1.0, &dev), 69).expect("q");
    assert!(matches!(
        store.attend(0, &[id], &q3),
        Err(KvError::ShapeMismatch {
            what: "q_heads",
            ..
        })
    ));
    assert!(store.seq_kv(0, gone).is_err());
    assert!(store.seq_kv(LAYERS, id).is_err());
    assert_eq!(snapshot(&store), before);
    // The store still works.
    let (eo, _) = attention_error(&store, &[id], &[&s], &[vec![69]], 1);
    assert!(eo <= 1e-5);

    // Bad configs.
    for cfg in [
        ChunkAttentionConfig::new(1, 2, 4, 8).with_chunk_size(0),
        ChunkAttentionConfig::new(0, 2, 4, 8),
        ChunkAttentionConfig::new(1, 2, 3, 8),
        ChunkAttentionConfig::new(1, 2, 4, 0),
    ] {
        assert!(
            matches!(cfg.init(&dev), Err(KvError::InvalidConfig { .. })),
            "{cfg:?}"
        );
    }
}

#[test]
fn config_round_trips_through_serde_with_the_reference_chunk_size_by_default() {
    let cfg: ChunkAttentionConfig =
        serde_json::from_str(r#"{"layers": 30, "kv_heads": 3, "q_heads": 9, "head_dim": 64}"#)
            .expect("parse");
    assert_eq!(cfg, ChunkAttentionConfig::new(30, 3, 9, 64));
    assert_eq!(cfg.chunk_size, kv_core::DEFAULT_CHUNK_SIZE);
    let back: ChunkAttentionConfig =
        serde_json::from_str(&serde_json::to_string(&cfg).expect("ser")).expect("de");
    assert_eq!(back, cfg);
    assert!(
        serde_json::from_str::<ChunkAttentionConfig>(
            r#"{"layers": 1, "kv_heads": 1, "q_heads": 1, "head_dim": 2, "chunk": 4}"#
        )
        .is_err()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random prefixes, chunk sizes, suffix lengths and decode steps: the shared chunks are
    /// exactly the full chunks of the common prefix, attention equals per-sequence reference
    /// attention, memory matches the buffers, and removing every sequence (in any order)
    /// frees everything.
    #[test]
    fn shared_prefix_store_equals_per_sequence_attention(
        chunk in 1usize..=8,
        prefix_len in 0usize..=30,
        suffixes in proptest::collection::vec(1usize..=14, 2..=3),
        layers in 1usize..=2,
        kvh in 1usize..=2,
        group in 1usize..=2,
        half_d in 1usize..=4,
        decode in 0usize..=3,
        rotate in 0usize..3,
        seed in 0u64..1_000_000,
    ) {
        let dev = test_device();
        let d = 2 * half_d;
        let mut store = ChunkAttentionConfig::new(layers, kvh, kvh * group, d)
            .with_chunk_size(chunk)
            .init(&dev)
            .expect("init");
        let prefix = if prefix_len == 0 {
            empty_seq()
        } else {
            Seq { tokens: (1..=prefix_len as u32).collect(), kv: kv(layers, kvh, prefix_len, d, seed) }
        };
        let mut seqs: Vec<Seq> = suffixes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let base = 1000 * (i as u32 + 1);
                with_suffix(&prefix, (base..base + n as u32).collect(), kv(layers, kvh, n, d, seed + 1 + i as u64))
            })
            .collect();
        let ids: Vec<SeqId> = seqs
            .iter()
            .map(|s| store.add_seq(&s.tokens, &s.kv).expect("add"))
            .collect();
        let full_prefix_chunks = prefix_len / chunk;
        prop_assert_eq!(store.shared_chunk_count(), full_prefix_chunks);
        let private: usize = seqs.iter().map(|s| (s.len() - full_prefix_chunks * chunk).div_ceil(chunk)).sum();
        prop_assert_eq!(store.chunk_count(), full_prefix_chunks + private);
        for &id in &ids {
            let c = store.seq_chunks(id).expect("live");
            prop_assert!(c[..full_prefix_chunks].iter().all(|c| c.refs == seqs.len()));
            prop_assert!(c[full_prefix_chunks..].iter().all(|c| c.refs == 1));
        }

        for step in 0..decode {
            let step_kv: Vec<(Tensor<4>, Tensor<4>)> = (0..layers as u64)
                .map(|l| {
                    let s = seed * 7 + 100 * step as u64 + 2 * l;
                    (
                        seeded_tensor([seqs.len(), kvh, 1, d], s, 1.0, &dev),
                        seeded_tensor([seqs.len(), kvh, 1, d], s + 1, 1.0, &dev),
                    )
                })
                .collect();
            let toks: Vec<u32> = (0..seqs.len() as u32).map(|i| 50_000 + 10 * step as u32 + i).collect();
            store.append(&ids, &toks, &step_kv).expect("append");
            for (row, s) in seqs.iter_mut().enumerate() {
                s.tokens.push(toks[row]);
                s.kv = s.kv.iter().zip(&step_kv).map(|((k, v), (sk, sv))| {
                    let r = [row..row + 1, 0..kvh, 0..1, 0..d];
                    (
                        Tensor::cat(vec![k.clone(), sk.clone().slice(r.clone())], 2),
                        Tensor::cat(vec![v.clone(), sv.clone().slice(r)], 2),
                    )
                }).collect();
            }
        }
        for (s, &id) in seqs.iter().zip(&ids) {
            prop_assert_eq!(store.seq_tokens(id).expect("live"), s.tokens.clone());
        }
        prop_assert_eq!(store.shared_chunk_count(), full_prefix_chunks);

        // Decode rows (last position) and two earlier rows per sequence.
        let q_pos: Vec<Vec<u32>> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let n = s.len() as u64;
                let mix = seed.wrapping_mul(6364136223846793005).wrapping_add(i as u64);
                vec![(n - 1) as u32, (mix % n) as u32, ((mix >> 20) % n) as u32]
            })
            .collect();
        let refs: Vec<&Seq> = seqs.iter().collect();
        let (eo, el) = attention_error(&store, &ids, &refs, &q_pos, seed);
        prop_assert!(eo <= 1e-5 && el <= 1e-5, "two-phase vs reference: {} {}", eo, el);
        assert_honest(&store);
        let layer_sum: kv_core::MemoryReport = (0..layers).map(|l| store.layer_memory(l)).sum();
        prop_assert_eq!(layer_sum, store.memory());

        // Remove in a rotated order; the others still attend exactly.
        let k = ids.len();
        for j in 0..k {
            let gone = (rotate + j) % k;
            store.remove_seq(ids[gone]).expect("remove");
            let live: Vec<usize> = (0..k).filter(|&i| (0..=j).all(|t| (rotate + t) % k != i)).collect();
            if let Some(&first) = live.first() {
                let live_ids: Vec<SeqId> = live.iter().map(|&i| ids[i]).collect();
                let live_seqs: Vec<&Seq> = live.iter().map(|&i| &seqs[i]).collect();
                let live_pos: Vec<Vec<u32>> = live.iter().map(|&i| q_pos[i].clone()).collect();
                let (eo, _) = attention_error(&store, &live_ids, &live_seqs, &live_pos, seed + 9);
                prop_assert!(eo <= 1e-5, "after removals: {}", eo);
                prop_assert!(store.contains(ids[first]));
            }
            assert_honest(&store);
        }
        prop_assert_eq!(store.chunk_count(), 0);
        prop_assert_eq!(store.memory().stored_bytes(), 0);
    }
}
