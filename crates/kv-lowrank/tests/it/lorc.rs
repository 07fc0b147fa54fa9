//! LoRC (weight-SVD latents, progressive ranks): the contract, exactness at full rank and
//! for planted low-rank weights, the schedule, memory, and errors.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KeyRope, KvBlock, KvCache, KvShape, Query, RopeConfig, RopeConvention,
    StatsRequest, contiguous_positions, memory_matches_buffers,
};
use kv_lowrank::{Activation, CovarianceAccumulator, LorcConfig};
use kv_testkit::{assert_close, seeded_data, seeded_tensor, tensor_from, test_device};

use crate::{LAYERS, assert_invalid, shape, synthetic_calibration, synthetic_weights, temp_path};

fn rope(d: usize) -> RopeConfig {
    RopeConfig::new(d, 10_000.0, RopeConvention::RotateHalf)
}

kv_testkit::kv_cache_contract!(lorc_progressive_3_to_6, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        LorcConfig::new(shape(), "unused", 1, 3, 6, rope(8))
            .init_with(&synthetic_weights(shape(), 12), d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(lorc_full_rank_from_file, |d: &Device| -> Box<dyn KvCache> {
    let path = temp_path("lorc-contract");
    synthetic_weights(shape(), 12).save(&path).expect("save");
    Box::new(
        LorcConfig::new(shape(), path, 0, 8, 8, rope(8))
            .init(d)
            .expect("init"),
    )
});

/// Runs the same prefill and queries through a pre-RoPE cache and the dense cache (keys
/// rotated by the test).
fn compare(
    cache: &mut dyn KvCache,
    s: KvShape,
    k: Tensor<4>,
    v: Tensor<4>,
    q: Tensor<4>,
) -> (Tensor<4>, Tensor<4>) {
    let device = test_device();
    let t = k.dims()[2];
    let r = rope(s.head_dim()).init().expect("rope");
    let rotated = r.apply(k.clone(), &contiguous_positions(s.batch(), t, 0));
    let mut dense = DenseCacheConfig::new(s).init(&device).expect("dense");
    assert_eq!(cache.key_rope(), KeyRope::PreRope);
    cache
        .append(KvBlock::contiguous(k, v.clone(), 0).expect("block"))
        .expect("append");
    dense
        .append(KvBlock::contiguous(rotated, v, 0).expect("block"))
        .expect("append");
    let q = Query::contiguous(q, 0).expect("q");
    (
        cache.attend(&q, StatsRequest::NONE).expect("attend").output,
        dense.attend(&q, StatsRequest::NONE).expect("attend").output,
    )
}

#[test]
fn full_rank_reproduces_reference_attention_with_rope() {
    let device = test_device();
    let s = shape();
    let mut lorc = LorcConfig::new(s, "unused", 1, 8, 8, rope(8))
        .init_with(&synthetic_weights(s, 12), &device)
        .expect("init");
    let dims = [2, 2, 10, 8];
    let (a, e) = compare(
        &mut lorc,
        s,
        seeded_tensor(dims, 1, 1.0, &device),
        seeded_tensor(dims, 2, 1.0, &device),
        seeded_tensor([2, 4, 10, 8], 3, 1.0, &device),
    );
    assert_close(&a, &e, 1e-5, 1e-4);
}

#[test]
fn keys_from_planted_rank_2_weights_are_exact_at_rank_2() {
    // Weight rows a_i u + b_i w (rank 2): every key W x lies in span(a, b), which the two
    // leading right singular vectors span.
    let device = test_device();
    let s = KvShape::new(1, 1, 2, 8).expect("shape");
    let in_dim = 10;
    let (a, b) = (seeded_data(8, 1, 1.0), seeded_data(8, 2, 1.0));
    let (u, w) = (seeded_data(in_dim, 3, 1.0), seeded_data(in_dim, 4, 1.0));
    let rows: Vec<f32> = (0..8)
        .flat_map(|i| (0..in_dim).map(move |c| (i, c)))
        .map(|(i, c)| a[i] * u[c] + b[i] * w[c])
        .collect();
    let mut acc = CovarianceAccumulator::new(1, s);
    acc.observe_weights(0, Activation::KeyWeights, &rows, in_dim)
        .expect("k");
    acc.observe_weights(0, Activation::ValueWeights, &rows, in_dim)
        .expect("v");
    let cal = acc.finish("planted", "weights").expect("finish");
    let ev = cal.eigenvalues(Activation::KeyWeights, 0, 0).expect("ev");
    assert!(ev[2] < 1e-4 * ev[0], "rank 2 weights: {ev:?}");
    let mut lorc = LorcConfig::new(s, "unused", 0, 2, 2, rope(8))
        .init_with(&cal, &device)
        .expect("init");
    let t = 7;
    let in_span = |seed: u64| -> Vec<f32> {
        seeded_data(2 * t, seed, 1.0)
            .chunks(2)
            .flat_map(|c| {
                (0..8)
                    .map(|i| c[0] * a[i] + c[1] * b[i])
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let (out, expected) = compare(
        &mut lorc,
        s,
        tensor_from(in_span(5), [1, 1, t, 8], &device),
        tensor_from(in_span(6), [1, 1, t, 8], &device),
        seeded_tensor([1, 2, t, 8], 7, 1.0, &device),
    );
    assert_close(&out, &expected, 1e-4, 1e-3);
    assert_eq!(lorc.memory().key_bytes, t * 2 * 4);
}

#[test]
fn progressive_ranks_fall_from_max_to_min_with_depth() {
    let s = shape();
    let cal = synthetic_weights(s, 12);
    let ranks = LorcConfig::new(s, "u", 0, 2, 7, rope(8))
        .with_value_ranks(3, 5)
        .ranks(&cal)
        .expect("ranks");
    assert_eq!(ranks.len(), LAYERS);
    assert_eq!(ranks[0], (7, 5), "the first layer keeps the maximum");
    assert_eq!(ranks[LAYERS - 1], (2, 3), "the last layer gets the minimum");
    assert!(
        ranks
            .windows(2)
            .all(|w| w[0].0 >= w[1].0 && w[0].1 >= w[1].1)
    );
    let uniform = LorcConfig::new(s, "u", 0, 4, 4, rope(8))
        .ranks(&cal)
        .expect("ranks");
    assert!(uniform.iter().all(|&r| r == (4, 4)));
}

#[test]
fn memory_is_proportional_to_the_layer_rank() {
    let device = test_device();
    let s = shape();
    let cal = synthetic_weights(s, 12);
    let t = 12;
    for (lo, hi) in [(2, 2), (2, 6), (8, 8)] {
        for layer in 0..LAYERS {
            let mut lorc = LorcConfig::new(s, "unused", layer, lo, hi, rope(8))
                .init_with(&cal, &device)
                .expect("init");
            let r = if layer == 0 { hi } else { lo };
            assert_eq!((lorc.rank_k(), lorc.rank_v()), (r, r));
            let dims = [2, 2, t, 8];
            lorc.append(
                KvBlock::contiguous(
                    seeded_tensor(dims, 1, 1.0, &device),
                    seeded_tensor(dims, 2, 1.0, &device),
                    0,
                )
                .expect("block"),
            )
            .expect("append");
            let m = lorc.memory();
            assert_eq!(m.key_bytes, 2 * 2 * t * r * 4);
            assert_eq!(m.value_bytes, 2 * 2 * t * r * 4);
            assert_eq!(m.metadata_bytes, 2 * t * 4 + 2 * (2 * 8 * r * 4));
            memory_matches_buffers(&lorc).expect("honest memory");
            assert_eq!(lorc.bytes_per_token(), 2 * 2 * r * 4 + 4);
        }
    }
}

#[test]
fn bad_configs_and_artefacts_are_rejected() {
    let device = test_device();
    let s = shape();
    let cal = synthetic_weights(s, 12);
    assert_invalid(
        LorcConfig::new(s, "u", 0, 4, 9, rope(8)).init_with(&cal, &device),
        "head_dim 8",
    );
    assert_invalid(
        LorcConfig::new(s, "u", 0, 0, 4, rope(8)).init_with(&cal, &device),
        "between 1 and head_dim",
    );
    assert_invalid(
        LorcConfig::new(s, "u", 0, 6, 4, rope(8)).init_with(&cal, &device),
        "above the maximum",
    );
    assert_invalid(
        LorcConfig::new(s, "u", 0, 4, 4, rope(16)).init_with(&cal, &device),
        "RoPE",
    );
    assert_invalid(
        LorcConfig::new(s, "u", 0, 4, 4, rope(8))
            .with_num_layers(5)
            .init_with(&cal, &device),
        "this model has 5",
    );
    assert_invalid(
        LorcConfig::new(s, "u", LAYERS, 4, 4, rope(8)).init_with(&cal, &device),
        "out of range",
    );
    let other = KvShape::new(1, 3, 3, 8).expect("shape");
    assert_invalid(
        LorcConfig::new(other, "u", 0, 4, 4, rope(8)).init_with(&cal, &device),
        "calibrate this model",
    );
    assert_invalid(
        LorcConfig::new(s, "u", 0, 4, 4, rope(8)).init_with(&synthetic_calibration(s), &device),
        "lorc_weights",
    );
    assert_invalid(
        LorcConfig::new(s, temp_path("missing-lorc"), 0, 4, 4, rope(8)).init(&device),
        "kv-eval calibrate",
    );
    assert_invalid(
        LorcConfig::from_params(s, 0, rope(8), [("rank", "4")]),
        "calibration",
    );
    assert_invalid(
        LorcConfig::from_params(s, 0, rope(8), [("calibration", "c"), ("ranks", "4")]),
        "min_rank_k",
    );
    let cfg = LorcConfig::from_params(s, 1, rope(8), [("calibration", "c")]).expect("defaults");
    assert_eq!(
        (
            cfg.min_rank_k,
            cfg.max_rank_k,
            cfg.min_rank_v,
            cfg.max_rank_v
        ),
        (2, 8, 2, 8)
    );
    let cfg = LorcConfig::from_params(
        s,
        1,
        rope(8),
        [("calibration", "c"), ("rank_k", "3"), ("max_rank_v", "6")],
    )
    .expect("params");
    assert_eq!(
        (
            cfg.min_rank_k,
            cfg.max_rank_k,
            cfg.min_rank_v,
            cfg.max_rank_v
        ),
        (3, 3, 2, 6)
    );
}
