//! Residual VQ: the quantizer, the artefact and the cache.

use burn::prelude::*;
use kv_core::{
    KvBlock, KvCache, KvError, KvShape, PAD, Query, StatsRequest, memory_matches_buffers,
    reference_attention,
};
use kv_pq::{
    KMeansConfig, RVQ_VERSION, ResidualQuantizer, RvqArtefact, RvqCache, RvqConfig, RvqTrainConfig,
    rvq::train_layer,
};
use kv_testkit::{assert_close, seeded_tensor, test_device, to_vec};

fn shape() -> KvShape {
    KvShape::new(2, 2, 4, 8).expect("shape")
}

/// An artefact of `layers` layers for `s`, trained on seeded keys and values.
fn artefact(
    s: KvShape,
    layers: usize,
    sub_dim: usize,
    entries: usize,
    stages: usize,
) -> RvqArtefact {
    let device = test_device();
    let mut cfg = RvqTrainConfig::new(sub_dim, entries, stages);
    cfg.kmeans_iters = 5;
    // Enough tokens for every entry to have a training point.
    let dims = [2, s.kv_heads(), entries.max(24), s.head_dim()];
    let layers = (0..layers)
        .map(|l| {
            let k = seeded_tensor(dims, 100 + l as u64, 1.0, &device);
            let v = seeded_tensor(dims, 200 + l as u64, 1.0, &device);
            train_layer(&k, &v, &cfg).expect("train")
        })
        .collect::<Vec<_>>();
    RvqArtefact {
        version: RVQ_VERSION,
        model: "synthetic".into(),
        source: "seeded".into(),
        tokens: 48,
        num_layers: layers.len(),
        kv_heads: s.kv_heads(),
        head_dim: s.head_dim(),
        sub_dim,
        entries,
        stages,
        strided_keys: true,
        layers,
    }
}

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("kv-pq-{name}-{}.json", std::process::id()))
}

kv_testkit::kv_cache_contract!(
    contract,
    |d: &Device| -> Box<dyn KvCache> {
        let s = shape();
        Box::new(
            RvqConfig::new(s, "", 0)
                .with_chunk(5)
                .init_with(&artefact(s, 1, 4, 16, 2), d)
                .expect("init"),
        )
    },
    atol = 1e-5,
    rtol = 1e-4
);
kv_testkit::kv_cache_contract!(
    contract_mqa_u16,
    |d: &Device| -> Box<dyn KvCache> {
        let s = KvShape::new(1, 1, 3, 4).expect("shape");
        let a = artefact(s, 2, 2, 300, 1);
        Box::new(
            RvqConfig::new(s, "", 1)
                .with_num_layers(2)
                .init_with(&a, d)
                .expect("init"),
        )
    },
    atol = 1e-5,
    rtol = 1e-4
);

#[test]
fn one_stage_with_a_centroid_per_distinct_point_reproduces_the_points() {
    let device = test_device();
    let x = seeded_tensor([2, 12, 4], 7, 1.0, &device);
    let rq = ResidualQuantizer::train(x.clone(), 1, &KMeansConfig::new(12)).expect("train");
    let back = rq.decode(rq.encode(x.clone()));
    assert_close(&back, &x, 1e-6, 1e-6);
}

#[test]
fn one_stage_with_a_centroid_per_distinct_key_reproduces_the_keys_in_the_cache() {
    let device = test_device();
    let s = KvShape::new(1, 2, 2, 8).expect("shape");
    let k = seeded_tensor([1, 2, 10, 8], 3, 1.0, &device);
    let v = seeded_tensor([1, 2, 10, 8], 4, 1.0, &device);
    // One group per head (sub_dim = head_dim): ten distinct vectors, ten entries.
    let mut cfg = RvqTrainConfig::new(8, 10, 1);
    cfg.kmeans_iters = 3;
    let layer = train_layer(&k, &v, &cfg).expect("train");
    let a = RvqArtefact {
        version: RVQ_VERSION,
        model: "synthetic".into(),
        source: "seeded".into(),
        tokens: 10,
        num_layers: 1,
        kv_heads: 2,
        head_dim: 8,
        sub_dim: 8,
        entries: 10,
        stages: 1,
        strided_keys: true,
        layers: vec![layer],
    };
    let mut c = RvqConfig::new(s, "", 0)
        .init_with(&a, &device)
        .expect("init");
    c.append(KvBlock::contiguous(k.clone(), v.clone(), 0).expect("block"))
        .expect("append");
    let view = c.view();
    // Codebooks and scales are held in fp16: the keys come back to fp16 precision.
    assert_close(&view.keys, &k, 2e-3, 2e-3);
    assert_close(&view.values, &v, 2e-3, 2e-3);
}

#[test]
fn more_stages_never_increase_the_training_error() {
    let device = test_device();
    let x = seeded_tensor([3, 200, 4], 11, 1.0, &device);
    let rq = ResidualQuantizer::train(x.clone(), 5, &KMeansConfig::new(8).with_max_iters(10))
        .expect("train");
    let mut last = f32::INFINITY;
    for stages in 1..=5 {
        let q = rq.truncate(stages);
        let err: f32 = (q.decode(q.encode(x.clone())) - x.clone())
            .powi_scalar(2)
            .sum()
            .into_scalar();
        assert!(
            err <= last * (1.0 + 1e-5),
            "{stages} stages: error {err} after {last}"
        );
        last = err;
    }
    let first: f32 = (rq.truncate(1).decode(rq.truncate(1).encode(x.clone())) - x.clone())
        .powi_scalar(2)
        .sum()
        .into_scalar();
    assert!(last < 0.5 * first, "5 stages {last} vs 1 stage {first}");
}

#[test]
fn strided_key_groups_round_trip_and_streamed_attention_equals_the_oracle() {
    let device = test_device();
    let s = shape();
    let a = artefact(s, 1, 4, 16, 3);
    let mut c = RvqConfig::new(s, "", 0)
        .with_chunk(3)
        .init_with(&a, &device)
        .expect("init");
    c.append(
        KvBlock::contiguous(
            seeded_tensor([2, 2, 11, 8], 1, 1.0, &device),
            seeded_tensor([2, 2, 11, 8], 2, 1.0, &device),
            0,
        )
        .expect("block"),
    )
    .expect("append");
    for (n, pos) in [(4usize, 7u32), (1, 10)] {
        let q =
            Query::contiguous(seeded_tensor([2, 4, n, 8], 9, 1.0, &device), pos).expect("query");
        let oracle = c.attend_decoded(&q).expect("oracle");
        let (chunked, _) = c.attend_chunked(&q).expect("chunked");
        assert_close(&chunked, &oracle, 1e-5, 1e-4);
        let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
        assert_close(&got, &oracle, 1e-5, 1e-4);
        let (lse_out, _) = c.attend_lse(&q).expect("lse");
        assert_close(&lse_out, &oracle, 1e-5, 1e-4);
    }
    // A quantized cache is close to, not equal to, the keys it was given.
    let v = c.view();
    let k = seeded_tensor([2, 2, 11, 8], 1, 1.0, &device);
    let rel = (v.keys - k.clone())
        .powi_scalar(2)
        .sum()
        .into_scalar::<f32>()
        / k.powi_scalar(2).sum().into_scalar::<f32>();
    assert!(rel > 0.0 && rel < 1.0, "relative key error {rel}");
}

#[test]
fn bytes_equal_the_held_tensors_and_the_formula() {
    let device = test_device();
    let s = shape(); // batch 2, 2 KV heads, head_dim 8
    let (sub, entries, stages) = (4, 16, 2);
    let mut c = RvqConfig::new(s, "", 0)
        .init_with(&artefact(s, 1, sub, entries, stages), &device)
        .expect("init");
    let books = 2 * s.kv_heads() * stages * entries * sub * 2; // keys + values, fp16
    assert_eq!(c.memory().stored_bytes(), books);
    assert_eq!(c.codebook_bytes(), books);
    let n = 13;
    c.append(
        KvBlock::contiguous(
            seeded_tensor([2, 2, n, 8], 1, 1.0, &device),
            seeded_tensor([2, 2, n, 8], 2, 1.0, &device),
            0,
        )
        .expect("block"),
    )
    .expect("append");
    memory_matches_buffers(&c).expect("memory");
    let groups = 8 / sub;
    // Per token and head: G * S one-byte codes and a 2-byte scale, for keys and for values;
    // per token and sequence a u32 position.
    let per_stream = n * (groups * stages + 2);
    let m = c.memory();
    assert_eq!(m.key_bytes, books / 2 + s.streams() * per_stream);
    assert_eq!(m.value_bytes, books / 2 + s.streams() * per_stream);
    assert_eq!(m.metadata_bytes, 2 * n * 4);
    assert_eq!(
        c.key_codes().expect("codes").dtype(),
        burn::tensor::DType::U8
    );
    let elements = 2 * 2 * n * 2 * 8;
    assert_eq!(m.logical_elements, elements);
    let bits = m.bits_per_element();
    assert!((bits - m.stored_bytes() as f64 * 8.0 / elements as f64).abs() < 1e-12);
}

#[test]
fn artefact_round_trips_and_mismatches_are_clear_errors() {
    let device = test_device();
    let s = shape();
    let a = artefact(s, 2, 4, 16, 2);
    let path = temp_path("roundtrip");
    a.save(&path).expect("save");
    assert_eq!(RvqArtefact::load(&path).expect("load"), a);
    let cfg = RvqConfig::from_params(
        s,
        1,
        [
            ("calibration", path.to_str().expect("utf-8")),
            ("stages", "1"),
        ],
    )
    .expect("params")
    .with_num_layers(2);
    let c = cfg.init(&device).expect("init from file");
    assert_eq!((c.stages(), c.entries(), c.sub_dim()), (1, 16, 4));

    let reason = |r: kv_core::Result<kv_pq::RvqCache>, field: &str| match r {
        Err(KvError::InvalidConfig { field: f, reason }) => {
            assert_eq!(f, field, "{reason}");
            reason
        }
        Err(e) => panic!("unexpected {e:?}"),
        Ok(_) => panic!("accepted"),
    };
    let other = KvShape::new(2, 3, 6, 8).expect("shape");
    let r = reason(
        RvqConfig::new(other, "", 0).init_with(&a, &device),
        "calibration",
    );
    assert!(r.contains("3 of 8"), "{r}");
    let other = KvShape::new(2, 2, 4, 16).expect("shape");
    reason(
        RvqConfig::new(other, "", 0).init_with(&a, &device),
        "calibration",
    );
    reason(
        RvqConfig::new(s, "", 0)
            .with_num_layers(30)
            .init_with(&a, &device),
        "calibration",
    );
    reason(
        RvqConfig::new(s, "", 2).init_with(&a, &device),
        "calibration",
    );
    reason(
        RvqConfig::new(s, "", 0)
            .with_stages(3)
            .init_with(&a, &device),
        "stages",
    );
    reason(
        RvqConfig::new(s, "", 0)
            .with_chunk(0)
            .init_with(&a, &device),
        "chunk",
    );
    let mut bad = a.clone();
    bad.version = RVQ_VERSION + 1;
    reason(
        RvqConfig::new(s, "", 0).init_with(&bad, &device),
        "calibration",
    );
    let mut bad = a.clone();
    bad.layers[1].values.pop();
    let r = reason(
        RvqConfig::new(s, "", 0).init_with(&bad, &device),
        "calibration",
    );
    assert!(r.contains("layer 1 values"), "{r}");
    let mut bad = a.clone();
    bad.layers[0].keys[3] = f32::NAN;
    reason(
        RvqConfig::new(s, "", 0).init_with(&bad, &device),
        "calibration",
    );
    let missing = temp_path("missing");
    let r = reason(RvqConfig::new(s, &missing, 0).init(&device), "calibration");
    assert!(r.contains("kv-eval calibrate"), "{r}");
    std::fs::write(&path, "{\"version\": 1}").expect("write");
    reason(RvqConfig::new(s, &path, 0).init(&device), "calibration");
    std::fs::remove_file(&path).ok();
    assert!(matches!(
        RvqConfig::from_params(s, 0, [("stages", "2")]),
        Err(KvError::InvalidConfig {
            field: "calibration",
            ..
        })
    ));
    assert!(matches!(
        RvqConfig::from_params(s, 0, [("calibration", "x"), ("bits", "2")]),
        Err(KvError::InvalidConfig {
            field: "params",
            ..
        })
    ));
}

#[test]
fn bad_training_input_is_a_clear_error() {
    let device = test_device();
    let k = seeded_tensor([1, 2, 3, 8], 1, 1.0, &device);
    // 3 tokens x 2 groups of 4 channels = 6 points per head, 16 entries requested.
    let err = train_layer(&k, &k, &RvqTrainConfig::new(4, 16, 1)).expect_err("too few points");
    match err {
        KvError::InvalidConfig { field, reason } => {
            assert_eq!(field, "entries");
            assert!(reason.contains("more centroids than points"), "{reason}");
        }
        e => panic!("unexpected {e:?}"),
    }
    let field = |cfg: RvqTrainConfig| match train_layer(&k, &k, &cfg) {
        Err(KvError::InvalidConfig { field, .. }) => field,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(field(RvqTrainConfig::new(3, 2, 1)), "sub_dim");
    assert_eq!(field(RvqTrainConfig::new(4, 0, 1)), "entries");
    assert_eq!(field(RvqTrainConfig::new(4, 2, 0)), "stages");
    let v = seeded_tensor([1, 2, 4, 8], 1, 1.0, &device);
    assert_eq!(
        match train_layer(&k, &v, &RvqTrainConfig::new(4, 2, 1)) {
            Err(KvError::InvalidConfig { field, .. }) => field,
            other => panic!("unexpected {other:?}"),
        },
        "values"
    );
    let nan = k.clone().slice_fill([0..1, 0..1, 0..1, 0..1], f32::NAN);
    assert!(matches!(
        train_layer(&nan, &k, &RvqTrainConfig::new(4, 2, 1)),
        Err(KvError::NonFinite { .. })
    ));
}

#[test]
fn statistics_use_the_decoded_oracle() {
    let device = test_device();
    let s = shape();
    let mut c = RvqConfig::new(s, "", 0)
        .init_with(&artefact(s, 1, 4, 16, 2), &device)
        .expect("init");
    c.append(
        KvBlock::contiguous(
            seeded_tensor([2, 2, 6, 8], 1, 1.0, &device),
            seeded_tensor([2, 2, 6, 8], 2, 1.0, &device),
            0,
        )
        .expect("block"),
    )
    .expect("append");
    let q = Query::contiguous(seeded_tensor([2, 4, 2, 8], 3, 1.0, &device), 4).expect("q");
    let got = c.attend(&q, StatsRequest::COLUMN_SUMS).expect("attend");
    let v = c.view();
    let (want, stats) = reference_attention(
        q.tensor().clone(),
        v.keys,
        v.values,
        q.positions(),
        kv_core::KeyPositions::PerHead(&v.positions),
        None,
        StatsRequest::COLUMN_SUMS,
    );
    assert_eq!(to_vec(&got.output), to_vec(&want));
    assert_eq!(
        to_vec(&got.stats.column_sums.expect("sums")),
        to_vec(&stats.column_sums.expect("sums"))
    );
}

#[test]
fn subsampled_training_sees_every_channel_group() {
    // Every token is the same vector, whose two channel groups differ. Training on a subsample
    // of 4 groups must see both groups (whole tokens are kept), so two entries reproduce it.
    let device = test_device();
    let s = KvShape::new(1, 1, 1, 4).expect("shape");
    let x = Tensor::<1>::from_floats([3.0, -1.0, 1.0, 5.0], &device)
        .reshape([1, 1, 1, 4])
        .expand([1, 1, 8, 4]);
    let mut cfg = RvqTrainConfig::new(2, 2, 1);
    cfg.max_points = 4;
    let layer = train_layer(&x, &x, &cfg).expect("train");
    let a = RvqArtefact {
        version: RVQ_VERSION,
        model: "synthetic".into(),
        source: "constant".into(),
        tokens: 8,
        num_layers: 1,
        kv_heads: 1,
        head_dim: 4,
        sub_dim: 2,
        entries: 2,
        stages: 1,
        strided_keys: true,
        layers: vec![layer],
    };
    let mut c = RvqConfig::new(s, "", 0)
        .init_with(&a, &device)
        .expect("init");
    c.append(KvBlock::contiguous(x.clone(), x.clone(), 0).expect("block"))
        .expect("append");
    let v = c.view();
    assert_close(&v.keys, &x, 2e-3, 2e-3);
    assert_close(&v.values, &x, 2e-3, 2e-3);
}

/// Appends `n` seeded tokens to a two-sequence cache: sequence `b` from position `starts[b]`,
/// sequence 1 after `pad` padding slots.
fn append_padded(c: &mut RvqCache, s: KvShape, n: usize, starts: [u32; 2], pad: usize, seed: u64) {
    let device = test_device();
    let dims = [s.batch(), s.kv_heads(), n, s.head_dim()];
    let mut positions: Vec<u32> = (starts[0]..starts[0] + n as u32).collect();
    positions.extend((0..n).map(|i| {
        if i < pad {
            PAD
        } else {
            starts[1] + (i - pad) as u32
        }
    }));
    c.append(
        KvBlock::new(
            seeded_tensor(dims, seed, 1.5, &device),
            seeded_tensor(dims, seed + 1, 1.0, &device),
            positions,
        )
        .expect("block"),
    )
    .expect("append");
}

/// Output and log-sum-exp of the table path against the decode-then-attend oracle and the
/// chunked path.
fn check_tables(c: &mut RvqCache, q: &Query) {
    let oracle = c.attend_decoded(q).expect("oracle");
    let (out, lse) = c.attend_tables(q).expect("tables");
    assert_close(&out, &oracle, 1e-5, 1e-4);
    let (_, chunked_lse) = c.attend_chunked(q).expect("chunked");
    assert_close(&lse, &chunked_lse, 1e-5, 1e-5);
    if c.uses_tables(q) {
        let got = c.attend(q, StatsRequest::NONE).expect("attend").output;
        assert_eq!(to_vec(&got), to_vec(&out), "attend takes the table path");
        let (lo, ll) = c.attend_lse(q).expect("attend_lse");
        assert_eq!(to_vec(&lo), to_vec(&out));
        assert_eq!(to_vec(&ll), to_vec(&lse));
    }
}

#[test]
fn table_attention_equals_the_decoded_oracle() {
    let device = test_device();
    // GQA: 6 query heads on 2 KV heads; head_dim 16 in 4 strided key groups of 4 channels; 3
    // stages of 16 entries; sequence 1 left-padded by 3 slots.
    let s = KvShape::new(2, 2, 6, 16).expect("shape");
    let a = artefact(s, 1, 4, 16, 3);
    let mut c = RvqConfig::new(s, "", 0)
        .with_chunk(7)
        .init_with(&a, &device)
        .expect("init");
    append_padded(&mut c, s, 23, [0, 0], 3, 1);
    c.end_prefill().expect("end_prefill");
    for step in 0..4u32 {
        append_padded(
            &mut c,
            s,
            1,
            [23 + step, 20 + step],
            0,
            10 + u64::from(step),
        );
        let pos = vec![23 + step, 20 + step];
        let q = Query::new(
            seeded_tensor([2, 6, 1, 16], 30 + u64::from(step), 2.0, &device),
            pos,
        )
        .expect("query");
        let name = kv_testkit::device_name(&device);
        if name.contains("Flex") || name.contains("NdArray") {
            assert!(
                c.uses_tables(&q),
                "a decode query on the CPU takes the tables"
            );
        }
        check_tables(&mut c, &q);
    }
    // A multi-token query inside the cache (causal mask, rows 3 × 3 ≤ 64) and one whose
    // first token sees nothing of sequence 1 (output zero, log-sum-exp f32::MIN).
    for start in [5u32, 0] {
        let q = Query::new(
            seeded_tensor([2, 6, 3, 16], 40 + u64::from(start), 1.0, &device),
            vec![start, start + 1, start + 2, start, start + 1, start + 2],
        )
        .expect("query");
        check_tables(&mut c, &q);
    }
    // A prefill-sized query takes the chunked path.
    let q = Query::contiguous(seeded_tensor([2, 6, 30, 16], 50, 1.0, &device), 0).expect("q");
    assert!(!c.uses_tables(&q));
    check_tables(&mut c, &q);
}

#[test]
fn table_attention_handles_u16_codes_and_several_work_items() {
    let device = test_device();
    // MQA, 300 entries (u16 codes), 2 stages, enough tokens to cross the 4096-token task
    // boundary inside a stream and at the stream boundary (2 sequences).
    let s = KvShape::new(2, 1, 2, 4).expect("shape");
    let a = artefact(s, 1, 2, 300, 2);
    let mut c = RvqConfig::new(s, "", 0)
        .init_with(&a, &device)
        .expect("init");
    append_padded(&mut c, s, 4100, [0, 0], 5, 3);
    append_padded(&mut c, s, 1, [4100, 4095], 0, 4);
    assert_eq!(
        c.key_codes().expect("codes").dtype(),
        burn::tensor::DType::U16
    );
    let q = Query::new(
        seeded_tensor([2, 2, 1, 4], 5, 1.0, &device),
        vec![4100, 4095],
    )
    .expect("query");
    check_tables(&mut c, &q);
}

#[test]
fn table_attention_at_the_model_shape_equals_the_oracle() {
    let device = test_device();
    // SmolLM2's layer: 3 KV heads, 9 query heads, head_dim 64 in groups of 8, 256 entries, 2
    // of 3 trained stages; a prompt shorter than one task of 4096 tokens, so one work item
    // covers all three streams.
    let s = KvShape::new(1, 3, 9, 64).expect("shape");
    let a = artefact(s, 1, 8, 256, 3);
    let mut c = RvqConfig::new(s, "", 0)
        .with_stages(2)
        .init_with(&a, &device)
        .expect("init");
    let n = 1500;
    c.append(
        KvBlock::contiguous(
            seeded_tensor([1, 3, n, 64], 7, 1.0, &device),
            seeded_tensor([1, 3, n, 64], 8, 1.0, &device),
            0,
        )
        .expect("block"),
    )
    .expect("append");
    for step in 0..3u32 {
        let pos = n as u32 + step;
        c.append(
            KvBlock::contiguous(
                seeded_tensor([1, 3, 1, 64], 20 + u64::from(step), 1.0, &device),
                seeded_tensor([1, 3, 1, 64], 30 + u64::from(step), 1.0, &device),
                pos,
            )
            .expect("block"),
        )
        .expect("append");
        // Sharp queries (scale 3) so that a few keys dominate.
        let q = Query::contiguous(
            seeded_tensor([1, 9, 1, 64], 40 + u64::from(step), 3.0, &device),
            pos,
        )
        .expect("query");
        check_tables(&mut c, &q);
    }
}
