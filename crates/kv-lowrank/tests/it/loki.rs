//! Loki: the contract, exactness at full rank, exact top-k, and config errors.

use burn::prelude::*;
use kv_core::{DenseCacheConfig, KvBlock, KvCache, KvShape, Query, StatsRequest};
use kv_lowrank::{Activation, CovarianceAccumulator, LokiConfig, LokiSelection, TopK};
use kv_testkit::{assert_close, seeded_data, seeded_tensor, tensor_from, test_device, to_vec};

use crate::{assert_invalid, saved_calibration, shape, synthetic_calibration, temp_path};

// `k` covers every held slot: selection selects everything, attention is exact.
kv_testkit::kv_cache_contract!(loki_all_tokens, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        LokiConfig::new(shape(), "unused", 0)
            .with_rank(2)
            .with_top_k(TopK::Tokens(64))
            .init_with(&synthetic_calibration(shape()), d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(
    loki_from_file_fraction_one,
    |d: &Device| -> Box<dyn KvCache> {
        Box::new(
            LokiConfig::new(shape(), saved_calibration("loki-contract"), 1)
                .with_top_k(TopK::Fraction(1.0))
                .init(d)
                .expect("init"),
        )
    }
);

fn prefill(cache: &mut dyn KvCache, s: KvShape, t: usize, device: &Device) -> (Vec<f32>, Vec<f32>) {
    let dims = [s.batch(), s.kv_heads(), t, s.head_dim()];
    let k = seeded_tensor(dims, 31, 1.0, device);
    let v = seeded_tensor(dims, 32, 1.0, device);
    let host = (to_vec(&k), to_vec(&v));
    cache
        .append(KvBlock::contiguous(k, v, 0).expect("block"))
        .expect("append");
    cache.end_prefill().expect("end");
    host
}

/// Attention of one decode query over the top-`k` keys by exact score (per query head, or
/// per KV head from the group's mean score), on the host.
fn exact_topk(
    s: KvShape,
    (k, v): (&[f32], &[f32]),
    t: usize,
    q: &[f32],
    top: usize,
    mode: LokiSelection,
) -> Vec<f32> {
    let (b, h, qh, d, g) = (
        s.batch(),
        s.kv_heads(),
        s.q_heads(),
        s.head_dim(),
        s.group(),
    );
    let scale = 1.0 / (d as f64).sqrt();
    let key = |bi: usize, hi: usize, j: usize| &k[((bi * h + hi) * t + j) * d..][..d];
    let val = |bi: usize, hi: usize, j: usize| &v[((bi * h + hi) * t + j) * d..][..d];
    let qv = |bi: usize, hq: usize| &q[(bi * qh + hq) * d..][..d];
    let dot = |a: &[f32], c: &[f32]| {
        a.iter()
            .zip(c)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum::<f64>()
    };
    let mut out = vec![0f32; b * qh * d];
    for bi in 0..b {
        for hq in 0..qh {
            let hk = hq / g;
            let scores: Vec<f64> = (0..t)
                .map(|j| dot(qv(bi, hq), key(bi, hk, j)) * scale)
                .collect();
            let sel_scores: Vec<f64> = match mode {
                LokiSelection::Head => scores.clone(),
                LokiSelection::Group => (0..t)
                    .map(|j| {
                        (0..g)
                            .map(|m| dot(qv(bi, hk * g + m), key(bi, hk, j)))
                            .sum::<f64>()
                    })
                    .collect(),
            };
            let mut order: Vec<usize> = (0..t).collect();
            order.sort_by(|&a, &c| sel_scores[c].total_cmp(&sel_scores[a]));
            let chosen = &order[..top];
            let m = chosen
                .iter()
                .map(|&j| scores[j])
                .fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = chosen.iter().map(|&j| (scores[j] - m).exp()).sum();
            for c in 0..d {
                let acc: f64 = chosen
                    .iter()
                    .map(|&j| (scores[j] - m).exp() / z * f64::from(val(bi, hk, j)[c]))
                    .sum();
                out[(bi * qh + hq) * d + c] = acc as f32;
            }
        }
    }
    out
}

#[test]
fn full_rank_and_all_tokens_equal_dense_attention() {
    let device = test_device();
    let s = shape();
    let cal = synthetic_calibration(s);
    let mut loki = LokiConfig::new(s, "unused", 0)
        .with_rank(s.head_dim())
        .with_top_k(TopK::Fraction(1.0))
        .init_with(&cal, &device)
        .expect("init");
    let mut dense = DenseCacheConfig::new(s).init(&device).expect("dense");
    prefill(&mut loki, s, 10, &device);
    prefill(&mut dense, s, 10, &device);
    let q = Query::contiguous(seeded_tensor([2, 4, 3, 8], 40, 1.0, &device), 10).expect("q");
    let a = loki.attend(&q, StatsRequest::NONE).expect("attend").output;
    let e = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_close(&a, &e, 1e-5, 1e-4);
    // The keys kept in the PCA basis come back exactly (orthonormal basis).
    assert_close(&loki.view().keys, &dense.view().keys, 1e-5, 1e-4);
}

#[test]
fn top_k_at_full_rank_equals_exact_top_k() {
    let device = test_device();
    let s = shape();
    let cal = synthetic_calibration(s);
    let t = 12;
    for mode in [LokiSelection::Head, LokiSelection::Group] {
        for top in [1, 3, 7] {
            let mut loki = LokiConfig::new(s, "unused", 1)
                .with_rank(s.head_dim())
                .with_top_k(TopK::Tokens(top))
                .with_selection(mode)
                .init_with(&cal, &device)
                .expect("init");
            let (k, v) = prefill(&mut loki, s, t, &device);
            assert_eq!(loki.selected_per_query(), top);
            let qd = [s.batch(), s.q_heads(), 1, s.head_dim()];
            let q = seeded_tensor(qd, 50 + top as u64, 1.0, &device);
            let want = exact_topk(s, (&k, &v), t, &to_vec(&q), top, mode);
            let got = loki
                .attend(&Query::contiguous(q, 12).expect("q"), StatsRequest::NONE)
                .expect("attend")
                .output;
            kv_testkit::assert_close_slices(&to_vec(&got), &want, 1e-5, 1e-4);
        }
    }
}

#[test]
fn a_low_rank_that_holds_the_keys_selects_exactly() {
    let device = test_device();
    let s = KvShape::new(1, 1, 2, 8).expect("shape");
    // Keys in a 2-dim subspace: rank 2 scores are exact scores.
    let dir = |t: usize, c: &[f32]| -> Vec<f32> {
        let (a, b) = (c[2 * t], c[2 * t + 1]);
        vec![a, 0.5 * a, 0.0, 2.0 * b, 0.0, -b, 0.0, 0.0]
    };
    let cal_c = seeded_data(200, 61, 1.0);
    let cal_keys: Vec<f32> = (0..100).flat_map(|t| dir(t, &cal_c)).collect();
    let mut acc = CovarianceAccumulator::new(1, s);
    acc.observe(
        0,
        Activation::Keys,
        &tensor_from(cal_keys, [1, 1, 100, 8], &device),
    )
    .expect("observe");
    let cal = acc.finish("planted", "seeded").expect("finish");
    let t = 20;
    let kc = seeded_data(2 * t, 62, 1.0);
    let keys: Vec<f32> = (0..t).flat_map(|j| dir(j, &kc)).collect();
    let values = seeded_data(t * 8, 63, 1.0);
    let mut loki = LokiConfig::new(s, "unused", 0)
        .with_rank(2)
        .with_top_k(TopK::Tokens(4))
        .with_selection(LokiSelection::Head)
        .init_with(&cal, &device)
        .expect("init");
    loki.append(
        KvBlock::contiguous(
            tensor_from(keys.clone(), [1, 1, t, 8], &device),
            tensor_from(values.clone(), [1, 1, t, 8], &device),
            0,
        )
        .expect("block"),
    )
    .expect("append");
    loki.end_prefill().expect("end");
    let q = seeded_tensor([1, 2, 1, 8], 64, 1.0, &device);
    let want = exact_topk(s, (&keys, &values), t, &to_vec(&q), 4, LokiSelection::Head);
    let got = loki
        .attend(&Query::contiguous(q, 20).expect("q"), StatsRequest::NONE)
        .expect("attend")
        .output;
    kv_testkit::assert_close_slices(&to_vec(&got), &want, 1e-5, 1e-4);
}

#[test]
fn the_basis_is_orthonormal() {
    let device = test_device();
    let loki = LokiConfig::new(shape(), "unused", 0)
        .init_with(&synthetic_calibration(shape()), &device)
        .expect("init");
    let [h, d, r] = loki.basis().dims();
    assert_eq!((h, d, r), (2, 8, 8));
    let u = to_vec(loki.basis());
    for head in 0..h {
        let err = kv_lowrank::orthonormality_error(&u[head * d * r..(head + 1) * d * r], d, r);
        assert!(err < 1e-5, "head {head}: {err}");
    }
}

#[test]
fn bad_configs_and_artefacts_are_rejected() {
    let device = test_device();
    let cal = synthetic_calibration(shape());
    let cfg = || LokiConfig::new(shape(), "unused", 0);
    assert_invalid(cfg().with_rank(9).init_with(&cal, &device), "head_dim 8");
    assert_invalid(cfg().with_rank(0).init_with(&cal, &device), "rank 0");
    assert_invalid(
        cfg().with_top_k(TopK::Tokens(0)).init_with(&cal, &device),
        "top_k",
    );
    assert_invalid(
        cfg()
            .with_top_k(TopK::Fraction(1.5))
            .init_with(&cal, &device),
        "top_k",
    );
    let other = KvShape::new(2, 2, 4, 16).expect("shape");
    assert_invalid(
        LokiConfig::new(other, "unused", 0).init_with(&cal, &device),
        "calibrate this model",
    );
    assert_invalid(
        cfg().with_num_layers(30).init_with(&cal, &device),
        "2 layers",
    );
    cfg()
        .with_num_layers(2)
        .init_with(&cal, &device)
        .expect("same layer count");
    assert_invalid(
        LokiConfig::new(shape(), temp_path("missing-loki"), 0).init(&device),
        "kv-eval calibrate",
    );
    assert_invalid(
        LokiConfig::from_params(shape(), 0, [("rank", "4")]),
        "calibration",
    );
    assert_invalid(
        LokiConfig::from_params(shape(), 0, [("calibration", "x"), ("bits", "4")]),
        "unknown Loki parameter",
    );
    let cfg = LokiConfig::from_params(
        shape(),
        1,
        [
            ("calibration", "c.safetensors"),
            ("rank", "4"),
            ("top_k", "0.125"),
            ("selection", "head"),
        ],
    )
    .expect("params");
    assert_eq!(cfg.layer, 1);
    assert_eq!(cfg.rank, 4);
    assert_eq!(cfg.top_k, TopK::Fraction(0.125));
    assert_eq!(cfg.selection, LokiSelection::Head);
    assert_eq!(
        LokiConfig::from_params(shape(), 0, [("calibration", "c"), ("top_k", "32")])
            .expect("params")
            .top_k,
        TopK::Tokens(32)
    );
    let mut loki = cfg
        .with_top_k(TopK::Fraction(1.0))
        .init_with(&cal, &device)
        .expect("init");
    let q = Query::contiguous(seeded_tensor([2, 4, 1, 8], 1, 1.0, &device), 0).expect("q");
    assert_invalid(loki.attend(&q, StatsRequest::COLUMN_SUMS), "statistics");
}
