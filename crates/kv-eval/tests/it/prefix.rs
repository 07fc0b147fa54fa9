//! Prefix sharing through ChunkAttention on the tiny fixture model: the batch through the
//! chunked store gives the logits of each sequence run alone with the dense cache.

use kv_eval::prefix::{PrefixSettings, run};

use crate::protocols::tiny;

#[test]
fn chunked_batch_matches_each_sequence_alone_and_shares_the_prefix() {
    let Some(model) = tiny() else { return };
    let ids: Vec<u32> = (0..200u32).map(|i| (i * 37 + 11) % 1000).collect();
    // Prefix of 40 tokens with chunks of 8: 5 full chunks shared by all 3 sequences.
    let r = run(
        &model,
        &ids,
        PrefixSettings {
            sequences: 3,
            prefix: 40,
            suffix: 20,
            decode: 5,
            chunk_size: 8,
        },
    )
    .expect("run");
    assert_eq!(r.decode_steps, 5);
    assert!(
        r.max_abs_logit_diff < 1e-4,
        "logits differ by {}",
        r.max_abs_logit_diff
    );
    for (c, d) in r.ppl_chunked.iter().zip(&r.ppl_dense) {
        assert!((c - d).abs() < 1e-3 * d, "ppl {c} vs {d}");
    }
    assert_eq!(r.shared_chunks, 5);
    // Each sequence holds 40 + 19 tokens: 5 shared chunks + ceil(19 / 8) = 3 private ones.
    assert_eq!(r.chunks, 5 + 3 * 3);
    assert_eq!(
        r.chunked_unshared_kv_bytes,
        r.chunked_unshared_kv_bytes / 24 * 24
    );
    assert!(r.chunked_bytes < r.dense_bytes);
    let kv_bytes_per_chunk = r.chunked_unshared_kv_bytes / 24;
    assert!(r.chunked_bytes >= 14 * kv_bytes_per_chunk);
}

/// The per-layer adapter the model drives: honest memory with a staged block and after the
/// commit, `attend` equal to reference attention over its `view()`, bad positions and a
/// second append before the commit rejected.
#[test]
fn chunk_layer_adapter_is_honest_and_attends_like_its_view() {
    use burn::prelude::*;
    use kv_core::{
        ChunkAttentionConfig, KvBlock, Query, StatsRequest, contiguous_positions,
        memory_matches_buffers,
    };
    use kv_eval::prefix::PrefixBatch;
    use kv_testkit::{max_diff, seeded_tensor, test_device};

    let dev = test_device();
    let (layers, kvh, qh, d) = (2, 1, 2, 4);
    let store = ChunkAttentionConfig::new(layers, kvh, qh, d)
        .with_chunk_size(4)
        .init(&dev)
        .expect("init");
    let batch = PrefixBatch::new(store);
    let kv = |n: usize, seed: u64| -> Vec<(Tensor<4>, Tensor<4>)> {
        (0..layers as u64)
            .map(|l| {
                (
                    seeded_tensor([1, kvh, n, d], seed + 2 * l, 1.0, &dev),
                    seeded_tensor([1, kvh, n, d], seed + 2 * l + 1, 1.0, &dev),
                )
            })
            .collect()
    };
    let prefix_kv = kv(9, 1);
    let a = batch
        .with_store(|s| s.add_seq(&[1, 2, 3, 4, 5, 6, 7, 8, 9], &prefix_kv))
        .expect("a");
    let b = batch
        .with_store(|s| s.add_seq(&[1, 2, 3, 4, 5, 6, 7, 8, 9], &prefix_kv))
        .expect("b");
    assert_eq!(batch.with_store(|s| s.shared_chunk_count()), 2);
    batch.set_batch(vec![a, b]).expect("batch");
    let shape = kv_core::KvShape::new(1, kvh, qh, d).expect("shape");
    let mut caches = batch.layer_caches(shape).expect("caches");

    // Two new tokens per sequence, staged in every layer.
    for l in 0..layers {
        let cache = caches.layer_mut(l).expect("layer");
        let k = seeded_tensor([2, kvh, 2, d], 50 + l as u64, 1.0, &dev);
        let v = seeded_tensor([2, kvh, 2, d], 60 + l as u64, 1.0, &dev);
        // Positions must continue each sequence (9, 10).
        let wrong = KvBlock::new(k.clone(), v.clone(), contiguous_positions(2, 2, 8)).expect("b");
        assert!(cache.append(wrong).is_err());
        let block = KvBlock::new(k, v, contiguous_positions(2, 2, 9)).expect("block");
        cache.append(block.clone()).expect("append");
        assert!(cache.append(block).is_err(), "a second block before commit");
        memory_matches_buffers(&*cache).expect("honest with a staged block");
        assert_eq!(cache.lengths().logical, vec![11, 11]);
        let q = Query::new(
            seeded_tensor([2, qh, 2, d], 70 + l as u64, 1.0, &dev),
            vec![9, 10, 4, 10],
        )
        .expect("q");
        let got = cache.attend(&q, StatsRequest::NONE).expect("attend").output;
        let want = cache.view().attend_reference(&q, StatsRequest::NONE).output;
        assert!(max_diff(&got, &want) <= 1e-5);
        assert!(cache.attend(&q, StatsRequest::COLUMN_SUMS).is_err());
    }
    batch.commit(&[10, 11, 20, 21]).expect("commit");
    assert_eq!(batch.with_store(|s| s.seq_len(a)).expect("a"), 11);
    // 2 shared chunks + one private tail per sequence (the 9th prefix token and the 2 new
    // ones: 3 of 4 slots).
    assert_eq!(batch.with_store(|s| s.chunk_count()), 4);
    for l in 0..layers {
        memory_matches_buffers(caches.layer(l).expect("layer")).expect("honest after commit");
    }
    let total = caches.memory();
    assert_eq!(
        total.stored_bytes(),
        batch.with_store(|s| s.memory().stored_bytes())
    );
    // Committing again without a staged block is an error and changes nothing.
    assert!(batch.commit(&[12, 22]).is_err());
    assert_eq!(batch.with_store(|s| s.seq_len(b)).expect("b"), 11);
}
