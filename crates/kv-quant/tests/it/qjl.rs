//! QJL: the shared contract, the estimator against a host computation of the paper's formula,
//! unbiasedness over seeds (property test), the orthogonal-row bias, spill semantics, the
//! memory formula and bits per element, and config errors.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvError, KvShape, Query, StatsRequest, StorageDtype,
    memory_matches_buffers,
};
use kv_quant::qjl::orthogonal_bias;
use kv_quant::{QjlConfig, QjlSketch};
use kv_testkit::{max_diff, seeded_tensor, tensor_from, test_device, to_vec};
use proptest::prelude::*;

fn shape() -> KvShape {
    KvShape::new(2, 2, 6, 8).expect("valid")
}

/// `G = 4`, `R = 4`, `m = 16`, `m_o = 8`, 2 outlier channels: the contract's 9-token prefill
/// sketches 8 keys, and its decode steps cross a spill boundary.
fn small() -> QjlConfig {
    QjlConfig::new(shape())
        .with_sketch_dims(16, 8)
        .with_outliers(2)
        .with_group(4)
        .with_buffer(4)
}

// `attend` computes scores from the sign bits and `view()` returns `k̂`, whose dot product with
// a query is the same estimate: the two agree up to fp32 summation order.
kv_testkit::kv_cache_contract!(qjl_outliers, |d: &Device| -> Box<dyn KvCache> {
    Box::new(small().init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(qjl_no_outliers, |d: &Device| -> Box<dyn KvCache> {
    Box::new(small().with_outliers(0).init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(
    qjl_gaussian_quantized_current,
    |d: &Device| -> Box<dyn KvCache> {
        Box::new(
            small()
                .with_orthogonal(false)
                .with_current_in_full_precision(false)
                .with_scale_dtype(StorageDtype::F32)
                .with_residual_dtype(StorageDtype::F32)
                .init(d)
                .expect("init"),
        )
    }
);

fn f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// The paper's estimator computed on the host from `S`, for one key and one query:
/// outlier channels `out` (empty for none), `m_o` outlier rows.
fn host_estimate(
    s: &[f32],
    m: usize,
    mo: usize,
    d: usize,
    q: &[f32],
    k: &[f32],
    out: &[usize],
) -> f32 {
    let row = |i: usize| &s[i * d..(i + 1) * d];
    let is_out = |c: usize| out.contains(&c);
    let k_in: Vec<f32> = (0..d).map(|c| if is_out(c) { 0.0 } else { k[c] }).collect();
    let k_out: Vec<f32> = (0..d).map(|c| if is_out(c) { k[c] } else { 0.0 }).collect();
    let q_in: Vec<f32> = (0..d).map(|c| if is_out(c) { 0.0 } else { q[c] }).collect();
    let q_out: Vec<f32> = (0..d).map(|c| if is_out(c) { q[c] } else { 0.0 }).collect();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let norm = |a: &[f32]| f16(dot(a, a).sqrt());
    let term = |rows: usize, qq: &[f32], kk: &[f32]| -> f32 {
        let sum: f32 = (0..rows)
            .map(|i| {
                let sign = if dot(row(i), kk) > 0.0 { 1.0 } else { -1.0 };
                dot(row(i), qq) * sign
            })
            .sum();
        (core::f32::consts::PI / 2.0).sqrt() / rows as f32 * norm(kk) * sum
    };
    let mut e = term(m, &q_in, &k_in);
    if !out.is_empty() {
        e += term(mo, &q_out, &k_out);
    }
    e
}

#[test]
fn scores_match_the_paper_formula_computed_on_the_host() {
    let dev = test_device();
    let (d, m, mo, g) = (8, 24, 16, 2);
    let sketch = QjlSketch::new(d, m, mo, 7, true, &dev).expect("sketch");
    let s = to_vec(&sketch.projection().clone());
    // Two tokens (one group): channel 3 and 6 carry the largest norms, so they are the
    // group's two outlier channels.
    let k0 = [0.3, -0.2, 0.1, 4.0, 0.5, -0.4, -3.0, 0.2];
    let k1 = [-0.1, 0.6, -0.3, 2.5, 0.2, 0.1, 3.5, -0.7];
    let q = [0.7, -0.1, 0.4, 0.2, -0.9, 0.3, 0.5, 0.8];
    let keys = tensor_from([k0, k1].concat(), [1, 1, 2, d], &dev);
    let qt = tensor_from(q.to_vec(), [1, 1, 1, d], &dev);
    let sk = sketch.quantize(keys, 2, g).expect("quantize");
    let idx = sk
        .outlier_indices()
        .expect("outliers")
        .clone()
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("indices");
    let mut idx: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
    idx.sort_unstable();
    assert_eq!(
        idx,
        vec![3, 6],
        "the two largest-norm channels of the group"
    );
    let got = to_vec(&sk.scores(&sketch, qt.clone()));
    for (t, k) in [k0, k1].iter().enumerate() {
        let want = host_estimate(&s, m, mo, d, &q, k, &[3, 6]);
        assert!(
            (got[t] - want).abs() < 1e-4,
            "token {t}: {} vs {want}",
            got[t]
        );
    }
    // The dequantize path gives the same numbers through q · k̂.
    let khat = sk.dequantize(&sketch);
    let via_khat = to_vec(&qt.clone().matmul(khat.swap_dims(2, 3)));
    for t in 0..2 {
        assert!((via_khat[t] - got[t]).abs() < 1e-4);
    }
    // And without outliers the estimate is the plain one-term formula.
    let sketch0 = QjlSketch::new(d, m, 0, 7, true, &dev).expect("sketch");
    let keys = tensor_from([k0, k1].concat(), [1, 1, 2, d], &dev);
    let sk0 = sketch0.quantize(keys, 0, g).expect("quantize");
    assert!(sk0.outlier_indices().is_none());
    let got = to_vec(&sk0.scores(&sketch0, qt));
    for (t, k) in [k0, k1].iter().enumerate() {
        let want = host_estimate(&s, m, 0, d, &q, k, &[]);
        assert!(
            (got[t] - want).abs() < 1e-4,
            "token {t}: {} vs {want}",
            got[t]
        );
    }
}

#[test]
fn orthogonal_rows_are_orthogonal_blocks_scaled_by_sqrt_d() {
    let dev = test_device();
    let (d, m) = (8, 20);
    let s = to_vec(
        &QjlSketch::new(d, m, 0, 3, true, &dev)
            .expect("sketch")
            .projection()
            .clone(),
    );
    let row = |i: usize| &s[i * d..(i + 1) * d];
    for i in 0..m {
        for j in 0..m {
            let dot: f32 = row(i).iter().zip(row(j)).map(|(a, b)| a * b).sum();
            let same_block = i / d == j / d;
            let want = if i == j { d as f32 } else { 0.0 };
            if same_block {
                assert!((dot - want).abs() < 1e-4, "rows {i}, {j}: {dot}");
            }
        }
    }
    // Gaussian rows are not orthogonal, and a different seed gives a different S.
    let g = to_vec(
        &QjlSketch::new(d, m, 0, 3, false, &dev)
            .expect("sketch")
            .projection()
            .clone(),
    );
    let dot: f32 = g[..d].iter().zip(&g[d..2 * d]).map(|(a, b)| a * b).sum();
    assert!(dot.abs() > 1e-3);
    let other = to_vec(
        &QjlSketch::new(d, m, 0, 4, true, &dev)
            .expect("sketch")
            .projection()
            .clone(),
    );
    assert!(s.iter().zip(&other).any(|(a, b)| a != b));
}

#[test]
fn orthogonal_bias_has_its_closed_form_values() {
    // d = 1: u = ±1, the estimate is √(π/2) q k. d = 2: E|u_1| = 2/π on the circle.
    assert!((orthogonal_bias(1) - (core::f64::consts::PI / 2.0).sqrt()).abs() < 1e-12);
    assert!((orthogonal_bias(2) - 2.0 / core::f64::consts::PI.sqrt()).abs() < 1e-12);
    // 1 + 1/(4d) to first order, decreasing to 1.
    for d in [16, 64, 128] {
        let k = orthogonal_bias(d);
        assert!(
            (k - 1.0 - 0.25 / d as f64).abs() < 0.5 / (d * d) as f64,
            "d {d}: {k}"
        );
    }
}

/// Estimates of `q · k` over `seeds` independent projections: (mean, standard error).
fn estimates(
    q: &[f32],
    k: &[f32],
    m: usize,
    outliers: usize,
    orthogonal: bool,
    seeds: u64,
) -> (f64, f64) {
    let dev = test_device();
    let d = q.len();
    let qt = tensor_from(q.to_vec(), [1, 1, 1, d], &dev);
    let kt = tensor_from(k.to_vec(), [1, 1, 1, d], &dev);
    let xs: Vec<f64> = (0..seeds)
        .map(|seed| {
            let sk = QjlSketch::new(d, m, m, 1000 + seed, orthogonal, &dev).expect("sketch");
            let keys = sk.quantize(kt.clone(), outliers, 1).expect("quantize");
            f64::from(to_vec(&keys.scores(&sk, qt.clone()))[0])
        })
        .collect();
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}
fn norm(a: &[f32]) -> f64 {
    dot(a, a).sqrt()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// With Gaussian rows the estimator is unbiased: over 1000 seeds (`m = 256`) the mean lies
    /// within 4.5 standard errors of `q · k` (plus fp16 rounding of the stored norm, relative
    /// 2^-11), with and without outlier channels. Keys are `a q + r`, so `q · k` is large
    /// against `‖q‖ ‖k‖` and a wrong constant (even 2 %) is caught.
    #[test]
    fn gaussian_estimator_is_unbiased(
        q in proptest::collection::vec(-2.0f32..2.0, 16),
        r in proptest::collection::vec(-0.5f32..0.5, 16),
        a in prop_oneof![-2.0f32..-0.5, 0.5f32..2.0],
        outliers in 0usize..3,
    ) {
        prop_assume!(norm(&q) > 0.5);
        let k: Vec<f32> = q.iter().zip(&r).map(|(x, y)| a * x + y).collect();
        let (mean, se) = estimates(&q, &k, 256, outliers, false, 1000);
        let truth = dot(&q, &k);
        let slack = 4.5 * se + 1e-3 * norm(&q) * norm(&k);
        prop_assert!((mean - truth).abs() <= slack, "mean {mean} vs q·k {truth} (se {se})");
    }
}

#[test]
fn orthogonal_estimator_is_scaled_by_the_known_factor() {
    // q = k = e_1 + small noise: the estimate concentrates near κ_d q·k with orthogonal rows.
    let d = 16;
    let q: Vec<f32> = (0..d)
        .map(|i| if i == 0 { 1.0 } else { 0.05 * (i as f32).sin() })
        .collect();
    let k: Vec<f32> = (0..d)
        .map(|i| if i == 0 { 1.0 } else { 0.05 * (i as f32).cos() })
        .collect();
    let (mean, se) = estimates(&q, &k, 64, 0, true, 300);
    let want = orthogonal_bias(d) * dot(&q, &k);
    assert!(
        (mean - want).abs() <= 4.5 * se + 1e-3,
        "mean {mean} vs κ q·k {want} (se {se})"
    );
}

fn block(s: KvShape, n: usize, start: u32, seed: u64, d: &Device) -> KvBlock {
    let dims = [s.batch(), s.kv_heads(), n, s.head_dim()];
    KvBlock::contiguous(
        seeded_tensor(dims, seed, 1.0, d),
        seeded_tensor(dims, seed + 1, 1.0, d),
        start,
    )
    .expect("block")
}

#[test]
fn spill_semantics_and_memory_formula_through_decode() {
    let d = test_device();
    let s = KvShape::new(1, 2, 2, 8).expect("valid");
    let cfg = QjlConfig::new(s)
        .with_sketch_dims(40, 24)
        .with_outliers(2)
        .with_group(4)
        .with_buffer(8);
    let mut c = cfg.init(&d).expect("init");
    c.append(block(s, 13, 0, 1, &d)).expect("prefill");
    c.end_prefill().expect("end_prefill");
    assert_eq!((c.sketched_key_tokens(), c.full_key_tokens()), (8, 5));
    assert_eq!((c.quantized_value_tokens(), c.full_value_tokens()), (5, 8));
    assert_eq!(
        c.memory().stored_bytes(),
        cfg.stored_bytes(13).expect("bytes")
    );
    for step in 0..12u32 {
        c.append(block(s, 1, 13 + step, 10 + u64::from(step), &d))
            .expect("decode");
        c.end_prefill().expect("end_prefill");
        let t = 14 + step as usize;
        assert_eq!(c.sketched_key_tokens(), t - t % 8, "step {step}");
        assert_eq!(c.full_value_tokens(), 8);
        assert_eq!(
            c.memory().stored_bytes(),
            cfg.stored_bytes(t).expect("bytes")
        );
        memory_matches_buffers(&c).expect("honest memory");
    }
    // Hand count after 25 tokens, 24 of them sketched, 2 heads: 40 sign bits take 2 words
    // (8 B), 24 outlier sign bits 1 word (4 B), two fp16 norms 4 B per token, and 2 index
    // bytes per group of 4 tokens.
    assert_eq!(c.sketched_key_tokens(), 24);
    let keys = c.sketched_keys().expect("sketched").stored_bytes();
    assert_eq!(keys, 2 * (24 * (8 + 4 + 4) + 6 * 2));
}

#[test]
fn bits_per_element_with_reference_defaults() {
    let cfg = QjlConfig::new(KvShape::new(1, 8, 32, 128).expect("valid"));
    // Keys: 256 + 256 sign bits + two fp16 norms over 128 channels, 8 u8 indices per 32 tokens:
    // 4.25 + 0.015625. Values: 2-bit codes + fp16 scale and zero per 32 channels: 3.
    let bpe = cfg.bits_per_element().expect("valid");
    assert!((bpe - (4.265_625 + 3.0) / 2.0).abs() < 1e-12, "{bpe}");
    // Without outliers: 256 bits + one norm.
    let bpe = cfg
        .clone()
        .with_outliers(0)
        .bits_per_element()
        .expect("valid");
    assert!(
        (bpe - ((256.0 + 16.0) / 128.0 + 3.0) / 2.0).abs() < 1e-12,
        "{bpe}"
    );
    // The cache agrees exactly at the margin: 128 more tokens (a whole buffer) add 128 tokens
    // at that rate plus their u32 positions (buffers and S do not grow).
    let (t1, t2) = (4096, 4096 + 128);
    let delta = cfg.stored_bytes(t2).expect("bytes") - cfg.stored_bytes(t1).expect("bytes");
    let per_elt = (delta - 4 * 128) as f64 * 8.0 / (2.0 * 8.0 * 128.0 * 128.0);
    assert!(
        (per_elt - cfg.bits_per_element().expect("valid")).abs() < 1e-12,
        "{per_elt}"
    );
}

#[test]
fn attention_error_shrinks_with_the_sketch_dimension() {
    let d = test_device();
    let s = KvShape::new(1, 1, 1, 16).expect("valid");
    let blk = block(s, 64, 0, 21, &d);
    let q = Query::contiguous(seeded_tensor([1, 1, 4, 16], 5, 1.0, &d), 60).expect("query");
    let mut dense = DenseCacheConfig::new(s).init(&d).expect("init");
    dense.append(blk.clone()).expect("append");
    let want = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
    let err = |m: usize| {
        let mut c = QjlConfig::new(s)
            .with_sketch_dims(m, m)
            .with_outliers(2)
            .with_group(16)
            .with_buffer(16)
            .with_residual_dtype(StorageDtype::F32)
            .init(&d)
            .expect("init");
        c.append(blk.clone()).expect("append");
        c.end_prefill().expect("end_prefill");
        assert_eq!(c.sketched_key_tokens(), 64);
        max_diff(
            &c.attend(&q, StatsRequest::NONE).expect("attend").output,
            &want,
        )
    };
    let (coarse, fine) = (err(32), err(2048));
    assert!(
        fine < coarse && fine < 0.1,
        "m=32: {coarse}, m=2048: {fine}"
    );
}

#[test]
fn config_errors_name_the_field_and_keep_the_cache() {
    let d = test_device();
    let field = |cfg: QjlConfig| match cfg.init(&d) {
        Err(KvError::InvalidConfig { field, .. }) => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    assert_eq!(field(small().with_outliers(9)), "outliers");
    assert_eq!(
        field(small().with_sketch_dims(16, 32)),
        "outlier_sketch_dim"
    );
    assert_eq!(field(small().with_sketch_dims(0, 0)), "sketch_dim");
    assert_eq!(field(small().with_sketch_dims(16, 0)), "outlier_sketch_dim");
    assert_eq!(field(small().with_buffer(6)), "group");
    assert_eq!(field(small().with_group(3).with_buffer(6)), "group");
    assert_eq!(field(small().with_value_bits(5)), "bits");
    // No outliers: m_o is not used and may be 0.
    assert!(
        small()
            .with_outliers(0)
            .with_sketch_dims(16, 0)
            .init(&d)
            .is_ok()
    );
    let big = QjlConfig::new(KvShape::new(1, 1, 1, 512).expect("valid"));
    assert_eq!(field(big), "outliers");

    let p = QjlConfig::from_params(
        shape(),
        [
            ("sketch_dim", "64"),
            ("outliers", "0"),
            ("orthogonal", "false"),
        ],
    )
    .expect("params");
    assert_eq!((p.sketch_dim, p.outliers, p.orthogonal), (64, 0, false));
    assert!(matches!(
        QjlConfig::from_params(shape(), [("bits", "2")]),
        Err(KvError::InvalidConfig {
            field: "params",
            ..
        })
    ));
    assert!(matches!(
        QjlConfig::from_params(shape(), [("seed", "-1")]),
        Err(KvError::InvalidConfig { field: "seed", .. })
    ));

    // Data beyond the fp16 limits is refused and the cache is unchanged.
    let mut c = small().init(&d).expect("init");
    c.append(block(shape(), 5, 0, 3, &d)).expect("append");
    let before = to_vec(&c.view().keys);
    let huge = Tensor::<4>::full([2, 2, 1, 8], 40000.0, &d);
    let err = c.append(KvBlock::contiguous(huge.clone(), huge.clone() * 0.0, 5).expect("block"));
    assert!(matches!(
        err,
        Err(KvError::InvalidConfig { field: "data", .. })
    ));
    let err = c.append(KvBlock::contiguous(huge.clone() * 0.0, huge, 5).expect("block"));
    assert!(matches!(
        err,
        Err(KvError::InvalidConfig { field: "data", .. })
    ));
    assert_eq!(to_vec(&c.view().keys), before);
    assert_eq!(c.len(), 5);
}

#[test]
fn streamed_attention_matches_the_view_over_many_chunks() {
    let d = test_device();
    let s = KvShape::new(1, 2, 4, 8).expect("valid");
    let mut c = QjlConfig::new(s)
        .with_sketch_dims(32, 16)
        .with_outliers(2)
        .with_group(4)
        .with_buffer(8)
        .init(&d)
        .expect("init");
    c.append(block(s, 1203, 0, 41, &d)).expect("prefill");
    c.end_prefill().expect("end_prefill");
    assert_eq!(c.sketched_key_tokens(), 1200);
    // 1203 keys: three 512-token chunks, sketched ones and the buffer.
    let q = Query::contiguous(seeded_tensor([1, 4, 3, 8], 43, 1.0, &d), 1200).expect("query");
    let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    let want = c.view().attend_reference(&q, StatsRequest::NONE).output;
    kv_testkit::assert_close(&got, &want, 1e-5, 1e-4);
}

#[test]
fn long_query_blocks_shrink_the_chunks_and_agree_with_the_view() {
    // rows x m = 1025 x 4096 exceeds the query-sketch budget: one group per chunk.
    let d = test_device();
    let s = KvShape::new(1, 1, 1, 8).expect("valid");
    let m = 4096;
    assert!(1025 * m > kv_quant::qjl::QJL_QUERY_SKETCH_BUDGET);
    let mut c = QjlConfig::new(s)
        .with_sketch_dims(m, 64)
        .with_outliers(2)
        .with_group(4)
        .with_buffer(4)
        .init(&d)
        .expect("init");
    c.append(block(s, 24, 0, 51, &d)).expect("prefill");
    c.end_prefill().expect("end_prefill");
    assert_eq!(c.sketched_key_tokens(), 24);
    let q = Query::contiguous(seeded_tensor([1, 1, 1025, 8], 53, 1.0, &d), 10).expect("query");
    let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    let want = c.view().attend_reference(&q, StatsRequest::NONE).output;
    kv_testkit::assert_close(&got, &want, 1e-5, 1e-4);
}

#[test]
fn a_decode_step_reads_its_values_before_the_oldest_spills() {
    // The reference sums the R window values and the new one, then quantizes the oldest:
    // the step that spills still reads R + 1 exact values.
    let d = test_device();
    let s = KvShape::new(1, 2, 2, 8).expect("valid");
    let r = 8;
    let mut c = QjlConfig::new(s)
        .with_sketch_dims(40, 24)
        .with_outliers(2)
        .with_group(4)
        .with_buffer(r)
        .with_residual_dtype(StorageDtype::F32)
        .init(&d)
        .expect("init");
    let prefill = block(s, 13, 0, 1, &d);
    let mut values = vec![prefill.values().clone()];
    c.append(prefill).expect("prefill");
    c.end_prefill().expect("end_prefill");
    for step in 0..5u32 {
        let b = block(s, 1, 13 + step, 10 + u64::from(step), &d);
        values.push(b.values().clone());
        c.append(b).expect("decode");
        let t = 14 + step as usize;
        let all = Tensor::cat(values.clone(), 2);
        let window = |x: Tensor<4>| x.slice([0..1, 0..2, t - r - 1..t, 0..8]);
        assert_eq!(
            to_vec(&window(c.view().values)),
            to_vec(&window(all.clone())),
            "step {step}"
        );
        memory_matches_buffers(&c).expect("honest memory");
        c.end_prefill().expect("end_prefill");
        let v = c.view().values;
        assert!(
            max_diff(
                &v.slice([0..1, 0..2, t - r - 1..t - r, 0..8]),
                &all.slice([0..1, 0..2, t - r - 1..t - r, 0..8])
            ) > 0.0,
            "after the step the oldest value reads quantized"
        );
    }
}
