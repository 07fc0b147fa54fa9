//! Dense and ragged caches: the shared contract, ragged-vs-reference equality, eviction frees
//! memory, batches with different lengths, bad input.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvError, KvShape, LayerCaches, PAD, Query,
    RaggedCacheConfig, StatsRequest, StorageDtype, contiguous_positions, memory_matches_buffers,
};
use kv_testkit::strategies::{kv_shape, subset};
use kv_testkit::{
    HostTensor, assert_close, assert_close_slices, naive_attention, seeded_tensor, test_device,
    to_vec,
};
use proptest::prelude::*;

fn shape() -> KvShape {
    KvShape::new(2, 2, 6, 8).expect("valid")
}

kv_testkit::kv_cache_contract!(dense_f32, |d: &Device| -> Box<dyn KvCache> {
    Box::new(DenseCacheConfig::new(shape()).init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(dense_f16, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        DenseCacheConfig::new(shape())
            .with_dtype(StorageDtype::F16)
            .init(d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(ragged_f32, |d: &Device| -> Box<dyn KvCache> {
    Box::new(RaggedCacheConfig::new(shape()).init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(ragged_f16, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        RaggedCacheConfig::new(shape())
            .with_dtype(StorageDtype::F16)
            .init(d)
            .expect("init"),
    )
});

#[test]
fn dense_cache_attention_equals_reference_and_fp16_bytes_halve() {
    let d = test_device();
    let s = KvShape::new(1, 3, 9, 64).expect("valid");
    let mut f32c = DenseCacheConfig::new(s).init(&d).expect("init");
    let mut f16c = DenseCacheConfig::new(s)
        .with_dtype(StorageDtype::F16)
        .init(&d)
        .expect("init");
    let k = seeded_tensor([1, 3, 128, 64], 1, 1.0, &d);
    let v = seeded_tensor([1, 3, 128, 64], 2, 1.0, &d);
    f32c.append(KvBlock::contiguous(k.clone(), v.clone(), 0).expect("block"))
        .expect("append");
    f16c.append(KvBlock::contiguous(k, v, 0).expect("block"))
        .expect("append");
    let m32 = f32c.memory();
    let m16 = f16c.memory();
    assert_eq!(m32.key_bytes, 3 * 128 * 64 * 4);
    assert_eq!(m16.key_bytes, 3 * 128 * 64 * 2);
    assert_eq!(m16.dense_fp16_bytes(), 2 * 3 * 128 * 64 * 2);
    assert!(
        (m16.bits_per_element() - 16.0).abs() < 0.1,
        "{}",
        m16.bits_per_element()
    );
    let q = Query::contiguous(seeded_tensor([1, 9, 1, 64], 3, 1.0, &d), 127).expect("query");
    let a = f32c.attend(&q, StatsRequest::NONE).expect("attend").output;
    let b = f16c.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_close(&b, &a, 2e-3, 1e-2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Ragged attention over per-head kept subsets equals explicit attention over exactly
    /// those tokens (gathered on the host), with GQA and any causal offset; stats come with it.
    #[test]
    fn ragged_equals_reference_on_gathered_subset(
        s in kv_shape(),
        t in 1usize..20,
        seed in any::<u64>(),
        keeps in proptest::collection::vec(subset(20), 6),
        q_len in 1usize..4,
    ) {
        let d = test_device();
        let (b, kvh, qh, hd) = (s.batch(), s.kv_heads(), s.q_heads(), s.head_dim());
        let k = seeded_tensor([b, kvh, t, hd], seed, 1.0, &d);
        let v = seeded_tensor([b, kvh, t, hd], seed ^ 7, 1.0, &d);
        let mut cache = RaggedCacheConfig::new(s).init(&d).expect("init");
        cache.append(KvBlock::contiguous(k.clone(), v.clone(), 0).expect("block")).expect("append");
        let keep: Vec<Vec<usize>> = (0..s.streams())
            .map(|i| keeps[i % keeps.len()].iter().copied().filter(|&j| j < t).collect())
            .collect();
        cache.retain(&keep).expect("retain");
        prop_assert_eq!(cache.lengths().held, keep.iter().map(Vec::len).collect::<Vec<_>>());
        prop_assert!(memory_matches_buffers(&cache).is_ok());

        // Host gather: per head, the kept rows padded to the widest head with PAD positions.
        let (kh, vh) = (HostTensor::from_tensor(&k), HostTensor::from_tensor(&v));
        let width = keep.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut gk = vec![0.0; b * kvh * width * hd];
        let mut gv = gk.clone();
        let mut gp = vec![PAD; b * kvh * width];
        for (stream, idx) in keep.iter().enumerate() {
            for (slot, &j) in idx.iter().enumerate() {
                let src = (stream * t + j) * hd;
                let dst = (stream * width + slot) * hd;
                gk[dst..dst + hd].copy_from_slice(&kh.data[src..src + hd]);
                gv[dst..dst + hd].copy_from_slice(&vh.data[src..src + hd]);
                gp[stream * width + slot] = j as u32;
            }
        }
        let dims = vec![b, kvh, width, hd];
        let q = seeded_tensor([b, qh, q_len, hd], seed ^ 9, 1.0, &d);
        let start = (t as u32).saturating_sub(q_len as u32 - 1).min(t as u32 - 1);
        let query = Query::contiguous(q.clone(), start).expect("query");
        let want = naive_attention(
            &HostTensor::from_tensor(&q),
            &HostTensor { dims: dims.clone(), data: gk },
            &HostTensor { dims, data: gv },
            query.positions(),
            &gp,
        );
        let got = cache.attend(&query, StatsRequest::COLUMN_SUMS).expect("attend");
        assert_close_slices(&to_vec(&got.output), &want.data, 1e-5, 1e-4);
        let col = got.stats.column_sums.expect("requested");
        prop_assert_eq!(col.dims()[3], keep.iter().map(Vec::len).max().unwrap_or(0));
        // The view agrees with what attention used.
        let via_view = cache.view().attend_reference(&query, StatsRequest::NONE).output;
        assert_close(&got.output, &via_view, 1e-5, 1e-4);
    }
}

#[test]
fn eviction_frees_memory() {
    let d = test_device();
    let s = KvShape::new(1, 3, 9, 64).expect("valid");
    let mut cache = RaggedCacheConfig::new(s).init(&d).expect("init");
    let k = seeded_tensor([1, 3, 256, 64], 5, 1.0, &d);
    cache
        .append(KvBlock::contiguous(k.clone(), k, 0).expect("block"))
        .expect("append");
    let before = cache.memory();
    assert_eq!(before.key_bytes, 3 * 256 * 64 * 4);
    // Head-wise budgets: 200, 100 and 10 tokens.
    let keep = vec![(0..200).collect(), (50..150).collect(), (0..10).collect()];
    cache.retain(&keep).expect("retain");
    let after = cache.memory();
    assert_eq!(
        after.key_bytes,
        (200 + 100 + 10) * 64 * 4,
        "evicted rows are freed"
    );
    assert_eq!(after.value_bytes, after.key_bytes);
    assert_eq!(after.metadata_bytes, (200 + 100 + 10) * 4);
    assert_eq!(
        after.logical_tokens, 256,
        "the dense equivalent still counts every token seen"
    );
    assert!(after.compression_ratio() > 2.0 * before.compression_ratio());
    memory_matches_buffers(&cache).expect("honest");
    assert_eq!(
        cache.stream(0, 1).positions,
        (50..150).collect::<Vec<u32>>().as_slice()
    );
    // Decode after eviction appends to every head at the next position.
    let k1 = seeded_tensor([1, 3, 1, 64], 6, 1.0, &d);
    cache
        .append(KvBlock::contiguous(k1.clone(), k1, 256).expect("block"))
        .expect("append");
    assert_eq!(cache.lengths().held, vec![201, 101, 11]);
    memory_matches_buffers(&cache).expect("honest");
    cache.shrink_to_fit();
    memory_matches_buffers(&cache).expect("honest after shrink");
    assert_eq!(cache.memory().key_bytes, (201 + 101 + 11) * 64 * 4);
}

#[test]
fn retain_rejects_bad_keep_lists_unchanged() {
    let d = test_device();
    let s = KvShape::new(1, 2, 2, 4).expect("valid");
    let mut cache = RaggedCacheConfig::new(s).init(&d).expect("init");
    let k = seeded_tensor([1, 2, 5, 4], 5, 1.0, &d);
    cache
        .append(KvBlock::contiguous(k.clone(), k, 0).expect("block"))
        .expect("append");
    let before = to_vec(&cache.view().keys);
    for keep in [
        vec![vec![0, 1]],
        vec![vec![0, 5], vec![1]],
        vec![vec![2, 1], vec![0]],
        vec![vec![1, 1], vec![0]],
    ] {
        assert!(cache.retain(&keep).is_err(), "{keep:?} accepted");
        assert_eq!(to_vec(&cache.view().keys), before);
        assert_eq!(cache.lengths().held, vec![5, 5]);
    }
}

#[test]
fn batch_with_different_lengths_matches_per_sequence_attention() {
    // Sequence 0 has 7 tokens, sequence 1 has 4 (right-padded in the block with PAD).
    let d = test_device();
    let s = KvShape::new(2, 1, 2, 8).expect("valid");
    let k = seeded_tensor([2, 1, 7, 8], 8, 1.0, &d);
    let v = seeded_tensor([2, 1, 7, 8], 9, 1.0, &d);
    let mut pos = contiguous_positions(2, 7, 0);
    for p in &mut pos[7 + 4..] {
        *p = PAD;
    }
    let mut ragged = RaggedCacheConfig::new(s).init(&d).expect("init");
    let mut dense = DenseCacheConfig::new(s).init(&d).expect("init");
    ragged
        .append(KvBlock::new(k.clone(), v.clone(), pos.clone()).expect("block"))
        .expect("append");
    dense
        .append(KvBlock::new(k.clone(), v.clone(), pos).expect("block"))
        .expect("append");
    assert_eq!(ragged.lengths().held, vec![7, 4], "padding is not stored");
    assert_eq!(ragged.lengths().logical, vec![7, 4]);
    assert_eq!(dense.lengths().logical, vec![7, 4]);
    // Next token: sequence 0 at position 7, sequence 1 at position 4.
    let kn = seeded_tensor([2, 1, 1, 8], 10, 1.0, &d);
    let step = KvBlock::new(kn.clone(), kn.clone(), vec![7, 4]).expect("block");
    ragged.append(step.clone()).expect("append");
    dense.append(step).expect("append");
    let q = Query::new(seeded_tensor([2, 2, 1, 8], 11, 1.0, &d), vec![7, 4]).expect("query");
    let out_r = ragged
        .attend(&q, StatsRequest::NONE)
        .expect("attend")
        .output;
    let out_d = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_close(&out_r, &out_d, 1e-6, 1e-5);
    // Sequence 1 alone, unbatched.
    let s1 = KvShape::new(1, 1, 2, 8).expect("valid");
    let mut single = DenseCacheConfig::new(s1).init(&d).expect("init");
    let k1 = Tensor::cat(
        vec![
            k.clone().slice([1..2, 0..1, 0..4, 0..8]),
            kn.clone().slice([1..2, 0..1, 0..1, 0..8]),
        ],
        2,
    );
    let v1 = Tensor::cat(
        vec![
            v.slice([1..2, 0..1, 0..4, 0..8]),
            kn.slice([1..2, 0..1, 0..1, 0..8]),
        ],
        2,
    );
    single
        .append(KvBlock::contiguous(k1, v1, 0).expect("block"))
        .expect("append");
    let q1 =
        Query::new(q.tensor().clone().slice([1..2, 0..2, 0..1, 0..8]), vec![4]).expect("query");
    let want = single
        .attend(&q1, StatsRequest::NONE)
        .expect("attend")
        .output;
    assert_close(&out_r.slice([1..2, 0..2, 0..1, 0..8]), &want, 1e-6, 1e-5);
}

#[test]
fn capacity_is_enforced_without_change() {
    let d = test_device();
    let s = KvShape::new(1, 1, 1, 4).expect("valid");
    let k = seeded_tensor([1, 1, 3, 4], 1, 1.0, &d);
    let caches: Vec<Box<dyn KvCache>> = vec![
        Box::new(
            DenseCacheConfig::new(s)
                .with_capacity(4)
                .init(&d)
                .expect("init"),
        ),
        Box::new(
            RaggedCacheConfig::new(s)
                .with_capacity(4)
                .init(&d)
                .expect("init"),
        ),
    ];
    for mut c in caches {
        c.append(KvBlock::contiguous(k.clone(), k.clone(), 0).expect("block"))
            .expect("fits");
        let err = c.append(KvBlock::contiguous(k.clone(), k.clone(), 3).expect("block"));
        assert!(
            matches!(
                err,
                Err(KvError::CapacityExceeded {
                    capacity: 4,
                    requested: 6,
                    ..
                })
            ),
            "{err:?}"
        );
        assert_eq!(c.lengths().logical, vec![3]);
    }
    assert!(DenseCacheConfig::new(s).with_capacity(0).init(&d).is_err());
}

#[test]
fn shape_validation() {
    assert!(KvShape::new(1, 3, 9, 64).is_ok());
    assert!(matches!(
        KvShape::new(1, 3, 8, 64),
        Err(KvError::InvalidConfig {
            field: "q_heads",
            ..
        })
    ));
    assert!(KvShape::new(0, 1, 1, 1).is_err());
    assert!(KvShape::new(1, 1, 1, 0).is_err());
    let s = KvShape::new(2, 3, 9, 64).expect("valid");
    assert_eq!((s.group(), s.streams()), (3, 6));
    let json = serde_json::to_string(&s).expect("serialize");
    assert_eq!(
        serde_json::from_str::<KvShape>(&json).expect("round trip"),
        s
    );
    let bad = r#"{"batch":1,"kv_heads":2,"q_heads":3,"head_dim":4}"#;
    assert!(
        serde_json::from_str::<KvShape>(bad).is_err(),
        "invalid GQA rejected on load"
    );
}

#[test]
fn block_and_query_validation() {
    let d = test_device();
    let k = seeded_tensor([1, 1, 2, 4], 1, 1.0, &d);
    let v = seeded_tensor([1, 1, 3, 4], 1, 1.0, &d);
    assert!(matches!(
        KvBlock::contiguous(k.clone(), v, 0),
        Err(KvError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        KvBlock::new(k.clone(), k.clone(), vec![0]),
        Err(KvError::ShapeMismatch { .. })
    ));
    let empty = Tensor::<4>::zeros([1, 1, 0, 4], &d);
    assert!(matches!(
        KvBlock::contiguous(empty.clone(), empty.clone(), 0),
        Err(KvError::Empty { .. })
    ));
    assert!(matches!(
        Query::contiguous(empty, 0),
        Err(KvError::Empty { .. })
    ));
}

#[test]
fn layer_caches_aggregate_memory() {
    let d = test_device();
    let s = KvShape::new(1, 1, 1, 4).expect("valid");
    let mut layers = LayerCaches::try_from_fn(3, |_| {
        Ok(Box::new(DenseCacheConfig::new(s).init(&d)?) as Box<dyn KvCache>)
    })
    .expect("layers");
    for i in 0..3 {
        let k = seeded_tensor([1, 1, 2 + i, 4], i as u64, 1.0, &d);
        layers
            .layer_mut(i)
            .expect("layer")
            .append(KvBlock::contiguous(k.clone(), k, 0).expect("block"))
            .expect("append");
    }
    let total = layers.memory();
    let sum: usize = layers
        .memory_per_layer()
        .iter()
        .map(|m| m.stored_bytes())
        .sum();
    assert_eq!(total.stored_bytes(), sum);
    assert_eq!(total.logical_tokens, 2 + 3 + 4);
    assert!(matches!(
        layers.layer(3),
        Err(KvError::IndexOutOfRange {
            index: 3,
            len: 3,
            ..
        })
    ));
    layers.reset();
    assert_eq!(layers.memory().logical_tokens, 0);
}

#[test]
fn shared_layer_caches_count_storage_once() {
    let d = test_device();
    let s = KvShape::new(1, 1, 1, 4).expect("valid");
    let make = |_: usize| Ok(Box::new(DenseCacheConfig::new(s).init(&d)?) as Box<dyn KvCache>);
    for bad in [&[0, 3][..], &[1, 1], &[0, 0, 1]] {
        assert!(matches!(
            LayerCaches::shared(bad, make),
            Err(KvError::InvalidConfig {
                field: "owners",
                ..
            })
        ));
    }
    let mut layers = LayerCaches::shared(&[0, 0, 2], make).expect("layers");
    assert_eq!((layers.len(), layers.storage_layers()), (3, 2));
    assert!(layers.appends(0) && !layers.appends(1) && !layers.appends(7));
    assert_eq!(layers.owner(1).expect("owner"), 0);
    for i in [0, 2] {
        let k = seeded_tensor([1, 1, 5, 4], i as u64, 1.0, &d);
        layers
            .layer_mut(i)
            .expect("layer")
            .append(KvBlock::contiguous(k.clone(), k, 0).expect("block"))
            .expect("append");
    }
    let per = layers.memory_per_layer();
    assert_eq!(per[1].stored_bytes(), 0);
    assert_eq!(per[1].logical_tokens, 5);
    assert_eq!(layers.memory().stored_bytes(), per[0].stored_bytes() * 2);
    assert_eq!(layers.memory().logical_tokens, 15);
    assert_eq!(layers.iter().count(), 3);
    layers.reset();
    assert_eq!(layers.memory().logical_tokens, 0);
    assert_eq!(layers.into_layers().len(), 2);
}
