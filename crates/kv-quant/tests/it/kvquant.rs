//! KVQuant: the shared contract, 1-D k-means, calibration percentiles, codebook rounding (hand
//! cases with a deterministic tie), dense-and-sparse outliers, pre-RoPE keys rotated after
//! dequantization, sinks, memory and config errors.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KeyRope, KvBlock, KvCache, KvError, KvShape, Query, RopeConfig,
    RopeConvention, StatsRequest, memory_matches_buffers,
};
use kv_quant::kvquant::{kmeans_1d, kmeans_1d_weighted};
use kv_quant::{KvQuantCalibration, KvQuantConfig};
use kv_testkit::{assert_close, max_diff, seeded_tensor, tensor_from, test_device, to_vec};

fn shape() -> KvShape {
    KvShape::new(2, 2, 6, 8).expect("valid")
}

fn rope(d: usize) -> RopeConfig {
    RopeConfig::new(d, 10_000.0, RopeConvention::RotateHalf)
}

/// A calibration from 4 seeded sequences of 64 tokens.
fn calibrated(s: KvShape, bits: u32, p: f64, sinks: usize) -> KvQuantCalibration {
    let d = test_device();
    let dims = [4, s.kv_heads(), 64, s.head_dim()];
    KvQuantCalibration::calibrate(
        &seeded_tensor(dims, 90, 1.0, &d),
        &seeded_tensor(dims, 91, 1.0, &d),
        bits,
        p,
        sinks,
    )
    .expect("calibrate")
}

fn small(bits: u32, sinks: usize) -> KvQuantConfig {
    KvQuantConfig::new(shape(), rope(8), calibrated(shape(), bits, 0.99, sinks))
}

// `attend` streams a softmax over exactly the tensors `view()` returns (dequantized, outliers
// restored, keys rotated at their positions).
kv_testkit::kv_cache_contract!(kvquant4, |d: &Device| -> Box<dyn KvCache> {
    Box::new(small(4, 0).init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(kvquant2_sinks, |d: &Device| -> Box<dyn KvCache> {
    Box::new(small(2, 2).init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(kvquant3_dense_only, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        KvQuantConfig::new(shape(), rope(8), calibrated(shape(), 3, 1.0, 0))
            .init(d)
            .expect("init"),
    )
});

#[test]
fn kmeans_finds_separated_clusters_and_keeps_ties_deterministic() {
    let xs = vec![0.0, 0.1, 0.2, 5.0, 5.1, 5.2, 9.9, 10.0, 10.1];
    let c = kmeans_1d(xs, 3, 50);
    let want = [0.1f32, 5.1, 10.0];
    for (a, b) in c.iter().zip(want) {
        assert!((a - b).abs() < 1e-5, "{c:?}");
    }
    // Two clusters over a symmetric set: -1 and 1.
    let c = kmeans_1d(vec![-1.5, -1.0, -0.5, 0.5, 1.0, 1.5], 2, 50);
    assert!(
        (c[0] + 1.0).abs() < 1e-6 && (c[1] - 1.0).abs() < 1e-6,
        "{c:?}"
    );
    // Fewer distinct points than clusters: duplicates, still sorted.
    let c = kmeans_1d(vec![2.0, 2.0, 2.0], 4, 50);
    assert_eq!(c, vec![2.0; 4]);
}

#[test]
fn calibration_takes_the_reference_percentiles() {
    let d = test_device();
    // One sequence, one head, 201 tokens; channel 0 holds 0, 1, ..., 200, channel 1 the
    // negatives. t = 1 - 0.01/2 = 0.995: numpy's percentile at 0.995 * 200 = 199, at
    // 0.005 * 200 = 1.
    let ch0: Vec<f32> = (0..201).map(|i| i as f32).collect();
    let data: Vec<f32> = ch0.iter().flat_map(|&x| [x, -x]).collect();
    let k = tensor_from(data.clone(), [1, 1, 201, 2], &d);
    let c = KvQuantCalibration::calibrate(&k, &k, 2, 0.99, 0).expect("calibrate");
    assert_eq!(c.key_upper, vec![199.0, -1.0]);
    assert_eq!(c.key_lower, vec![1.0, -199.0]);
    assert_eq!(c.key_lut.len(), 4);
    assert!(c.key_lut.is_sorted() && c.key_lut.iter().all(|x| x.abs() <= 1.0));
    // With one sink the first token is left out: 1..=200, positions 198.005 and 0.995.
    let c = KvQuantCalibration::calibrate(&k, &k, 2, 0.99, 1).expect("calibrate");
    assert!((c.key_upper[0] - 199.005).abs() < 1e-3 && (c.key_lower[0] - 1.995).abs() < 1e-3);
    // Uniform data fills [-1, 1] evenly: the 2-bit codebook lands near ±0.25, ±0.75.
    for (a, b) in c.key_lut.iter().zip([-0.75f32, -0.25, 0.25, 0.75]) {
        assert!((a - b).abs() < 0.02, "{:?}", c.key_lut);
    }
}

fn hand_calibration(lut: Vec<f32>) -> KvQuantCalibration {
    KvQuantCalibration {
        bits: 2,
        kv_heads: 1,
        head_dim: 4,
        sparsity_threshold: 0.99,
        sinks: 0,
        key_upper: vec![1.0; 4],
        key_lower: vec![-1.0; 4],
        key_lut: lut.clone(),
        value_lut: lut,
        fisher_weighted: false,
    }
}

#[test]
fn keys_round_to_the_nearest_codebook_entry_with_ties_to_the_lower() {
    let d = test_device();
    let s = KvShape::new(1, 1, 1, 4).expect("valid");
    let cfg = KvQuantConfig::new(s, rope(4), hand_calibration(vec![-1.0, -0.2, 0.3, 1.0]));
    let mut c = cfg.init(&d).expect("init");
    // Offset 0 and range 1: x̃ = x. 0.1 -> 0.3; -0.6 is equidistant from -1 and -0.2 -> -1;
    // 0.9 -> 1; -0.05 -> -0.2. Position 0: RoPE is the identity.
    let k = tensor_from(vec![0.1, -0.6, 0.9, -0.05], [1, 1, 1, 4], &d);
    c.append(KvBlock::contiguous(k.clone(), k, 0).expect("block"))
        .expect("append");
    assert_eq!(c.outliers().0, 0);
    assert_eq!(to_vec(&c.view().keys), vec![0.3, -1.0, 1.0, -0.2]);
}

#[test]
fn outliers_are_kept_exactly_and_leave_the_rest_on_the_codebook() {
    let d = test_device();
    let s = KvShape::new(1, 1, 1, 4).expect("valid");
    let lut = vec![-0.75, -0.25, 0.25, 0.75];
    let mut c = KvQuantConfig::new(s, rope(4), hand_calibration(lut))
        .init(&d)
        .expect("init");
    // Keys outside [-1, 1] are outliers (static thresholds): 100 and -37.5 stay exact.
    let k = tensor_from(vec![0.3, 100.0, -0.8, -37.5], [1, 1, 1, 4], &d);
    // Values: per token over 4 entries with t = 0.995 the quantiles sit between the two
    // largest (smallest) entries, so the max and the min are outliers (x ≥ upper, x ≤ lower);
    // the rest is normalised by its own min and max after the outliers take the median.
    let v = tensor_from(vec![250.0, 0.5, -0.5, -300.0], [1, 1, 1, 4], &d);
    c.append(KvBlock::contiguous(k, v, 0).expect("block"))
        .expect("append");
    assert_eq!(c.outliers(), (2, 2));
    let view = c.view();
    assert_eq!(to_vec(&view.keys), vec![0.25, 100.0, -0.75, -37.5]);
    // Values: median (lower) = -0.5; the rest {-0.5, 0.5} spans offset 0, range 0.5:
    // 0.5 -> 1 -> 0.75 * 0.5, -0.5 -> -1 -> -0.75 * 0.5.
    assert_eq!(to_vec(&view.values), vec![250.0, 0.375, -0.375, -300.0]);
    // Bytes: 4 outliers of 6 bytes, and one u32 row end per token for keys and values.
    memory_matches_buffers(&c).expect("honest memory");
}

#[test]
fn pre_rope_keys_are_rotated_after_dequantization() {
    let d = test_device();
    let s = KvShape::new(1, 2, 2, 8).expect("valid");
    let cal = calibrated(s, 4, 0.99, 3);
    let cfg = KvQuantConfig::new(s, rope(8), cal);
    let mut c = cfg.init(&d).expect("init");
    assert_eq!(c.key_rope(), KeyRope::PreRope);
    let r = rope(8).init().expect("rope");
    let k = seeded_tensor([1, 2, 10, 8], 5, 1.0, &d);
    let v = seeded_tensor([1, 2, 10, 8], 6, 1.0, &d);
    let pos: Vec<u32> = (5..15).collect();
    c.append(KvBlock::new(k.clone(), v.clone(), pos.clone()).expect("block"))
        .expect("append");
    assert_eq!((c.sink_tokens(), c.quantized_tokens()), (3, 7));
    let view = c.view();
    let rotated = r.apply(k.clone(), &pos);
    // The sinks are fp16: RoPE of the fp16-rounded keys, at their positions.
    let f16 = k
        .clone()
        .cast(burn::tensor::FloatDType::F16)
        .cast(burn::tensor::FloatDType::F32);
    let slice = |t: &Tensor<4>, a, b| t.clone().slice([0..1, 0..2, a..b, 0..8]);
    assert_close(
        &slice(&view.keys, 0, 3),
        &slice(&r.apply(f16, &pos), 0, 3),
        1e-6,
        1e-6,
    );
    // Quantized keys: RoPE(dequantized) is within the quantization error of RoPE(k), and
    // rotating at the wrong positions would be far off.
    let err = max_diff(&slice(&view.keys, 3, 10), &slice(&rotated, 3, 10));
    assert!(err < 0.15, "4-bit error after rotation {err}");
    let unrotated = max_diff(&slice(&view.keys, 3, 10), &slice(&k, 3, 10));
    assert!(
        unrotated > 4.0 * err,
        "keys must be rotated ({unrotated} vs {err})"
    );
    // Un-rotating the view gives the pre-RoPE dequantized keys.
    let back = r.unapply(view.keys, &pos);
    assert!(max_diff(&slice(&back, 3, 10), &slice(&k, 3, 10)) < 0.15);
}

#[test]
fn attention_over_pre_rope_keys_matches_dense_attention_closely() {
    let d = test_device();
    let s = KvShape::new(1, 2, 4, 16).expect("valid");
    let r = rope(16).init().expect("rope");
    let cal = calibrated(s, 4, 0.99, 1);
    let mut c = KvQuantConfig::new(s, rope(16), cal).init(&d).expect("init");
    let mut dense = DenseCacheConfig::new(s).init(&d).expect("init");
    let k = seeded_tensor([1, 2, 48, 16], 61, 1.0, &d);
    let v = seeded_tensor([1, 2, 48, 16], 62, 1.0, &d);
    let pos: Vec<u32> = (0..48).collect();
    c.append(KvBlock::new(k.clone(), v.clone(), pos.clone()).expect("block"))
        .expect("append");
    dense
        .append(KvBlock::new(r.apply(k, &pos), v, pos).expect("block"))
        .expect("append");
    let q = r.apply(seeded_tensor([1, 4, 3, 16], 63, 1.0, &d), &[45, 46, 47]);
    let q = Query::new(q, vec![45, 46, 47]).expect("query");
    let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    let want = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
    let err = max_diff(&got, &want);
    assert!(err < 0.05, "4-bit KVQuant vs dense: {err}");
}

#[test]
fn memory_matches_the_formula_through_decode() {
    let d = test_device();
    let cfg = small(3, 2);
    let mut c = cfg.init(&d).expect("init");
    let block = |n: usize, start: u32, seed: u64| {
        let dims = [2, 2, n, 8];
        KvBlock::contiguous(
            seeded_tensor(dims, seed, 1.0, &d),
            seeded_tensor(dims, seed + 1, 1.0, &d),
            start,
        )
        .expect("block")
    };
    c.append(block(9, 0, 1)).expect("prefill");
    for step in 0..5u32 {
        let t = 9 + step as usize;
        let (ko, vo) = c.outliers();
        assert_eq!(
            c.memory().stored_bytes(),
            cfg.stored_bytes(t, ko + vo).expect("bytes"),
            "after {t} tokens"
        );
        memory_matches_buffers(&c).expect("honest memory");
        c.append(block(1, 9 + step, 10 + u64::from(step)))
            .expect("decode");
    }
    assert_eq!((c.sink_tokens(), c.quantized_tokens()), (2, 12));
    // Every quantized value token has at least one outlier on each side (2 x 2 x 8 = 32
    // entries per token, t = 0.995 puts the quantiles inside the two extreme pairs).
    assert!(c.outliers().1 >= 2 * 12, "{:?}", c.outliers());
}

#[test]
fn config_and_calibration_errors() {
    let d = test_device();
    let field = |cfg: KvQuantConfig| match cfg.init(&d) {
        Err(KvError::InvalidConfig { field, .. }) => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    let s = KvShape::new(1, 1, 1, 4).expect("valid");
    let good = hand_calibration(vec![-1.0, -0.2, 0.3, 1.0]);
    let with = |f: &dyn Fn(&mut KvQuantCalibration)| {
        let mut c = good.clone();
        f(&mut c);
        KvQuantConfig::new(s, rope(4), c)
    };
    assert_eq!(field(with(&|c| c.bits = 5)), "bits");
    assert_eq!(
        field(with(&|c| c.sparsity_threshold = 0.0)),
        "sparsity_threshold"
    );
    assert_eq!(field(with(&|c| c.kv_heads = 2)), "calibration");
    assert_eq!(
        field(with(&|c| c.key_lut = vec![1.0, 0.0, 0.5, 0.7])),
        "calibration"
    );
    assert_eq!(field(with(&|c| c.value_lut.truncate(3))), "calibration");
    assert_eq!(field(with(&|c| c.key_lower[0] = 2.0)), "calibration");
    assert_eq!(field(with(&|c| c.key_upper[1] = f32::NAN)), "calibration");
    assert_eq!(field(KvQuantConfig::new(s, rope(8), good.clone())), "rope");

    let ok = KvQuantConfig::from_params(s, rope(4), [("calibration", "mem")], |src| {
        assert_eq!(src, "mem");
        Ok(good.clone())
    })
    .expect("params");
    assert_eq!(ok.calibration, good);
    assert!(matches!(
        KvQuantConfig::from_params(s, rope(4), [], |_| Ok(good.clone())),
        Err(KvError::InvalidConfig {
            field: "calibration",
            ..
        })
    ));
    assert!(matches!(
        KvQuantConfig::from_params(s, rope(4), [("bits", "4")], |_| Ok(good.clone())),
        Err(KvError::InvalidConfig {
            field: "params",
            ..
        })
    ));

    let k = seeded_tensor([1, 1, 8, 4], 1, 1.0, &d);
    assert!(KvQuantCalibration::calibrate(&k, &k, 1, 0.99, 0).is_err());
    assert!(KvQuantCalibration::calibrate(&k, &k, 2, 1.5, 0).is_err());
    assert!(KvQuantCalibration::calibrate(&k, &k, 2, 0.99, 8).is_err());
    let other = seeded_tensor([1, 1, 9, 4], 1, 1.0, &d);
    assert!(KvQuantCalibration::calibrate(&k, &other, 2, 0.99, 0).is_err());
    let nan = k.clone().slice_fill([0..1, 0..1, 0..1, 0..1], f32::NAN);
    assert!(KvQuantCalibration::calibrate(&nan, &k, 2, 0.99, 0).is_err());

    // Data beyond fp16 is refused and the cache is unchanged.
    let mut c = KvQuantConfig::new(s, rope(4), good).init(&d).expect("init");
    let x = seeded_tensor([1, 1, 3, 4], 2, 1.0, &d);
    c.append(KvBlock::contiguous(x.clone(), x, 0).expect("block"))
        .expect("append");
    let before = (to_vec(&c.view().keys), c.memory());
    let huge = Tensor::<4>::full([1, 1, 1, 4], 40000.0, &d);
    let err = c.append(KvBlock::contiguous(huge.clone(), huge, 3).expect("block"));
    assert!(matches!(
        err,
        Err(KvError::InvalidConfig { field: "data", .. })
    ));
    assert_eq!((to_vec(&c.view().keys), c.memory()), before);
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    assert!(
        a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol),
        "{a:?} vs {b:?} (tolerance {tol})"
    );
}

/// Weighted sum of squared distances to the nearest centroid.
fn weighted_sse(points: &[(f32, f32)], c: &[f32]) -> f64 {
    points
        .iter()
        .map(|&(x, w)| {
            let d = c
                .iter()
                .map(|&m| (x - m).abs())
                .fold(f32::INFINITY, f32::min);
            f64::from(w) * f64::from(d) * f64::from(d)
        })
        .sum()
}

#[test]
fn weighted_kmeans_moves_centroids_to_weighted_means() {
    // Two separated clusters: each centroid is its cluster's weighted mean.
    let pts = vec![(0.0, 1.0), (1.0, 3.0), (10.0, 1.0), (11.0, 1.0)];
    assert_eq!(kmeans_1d_weighted(pts, 2, 50), vec![0.75, 10.5]);
    // One cluster: the weighted mean; a weightless point does not pull it.
    let c = kmeans_1d_weighted(vec![(-4.0, 0.0), (1.0, 1.0), (2.0, 1.0)], 1, 50);
    assert_eq!(c, vec![1.5]);
    // Uniform weights on separated clusters agree with the unweighted k-means.
    let xs = vec![-3.0, -2.9, -3.1, 0.0, 0.1, -0.1, 4.0, 4.2, 3.8];
    let w: Vec<(f32, f32)> = xs.iter().map(|&x| (x, 1.0)).collect();
    close(&kmeans_1d_weighted(w, 3, 50), &kmeans_1d(xs, 3, 50), 1e-6);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
    #[test]
    fn weighted_kmeans_never_increases_its_objective(
        pts in proptest::collection::vec((-10.0f32..10.0, 0.0f32..5.0), 2..60),
        k in 1usize..6,
    ) {
        proptest::prop_assume!(pts.iter().any(|p| p.1 > 0.0));
        let one = kmeans_1d_weighted(pts.clone(), k, 1);
        let many = kmeans_1d_weighted(pts.clone(), k, 50);
        proptest::prop_assert!(many.is_sorted_by(|a, b| a <= b));
        proptest::prop_assert!(
            weighted_sse(&pts, &many) <= weighted_sse(&pts, &one) * (1.0 + 1e-5) + 1e-9
        );
    }
}

#[test]
fn fisher_weights_shape_the_codebooks_not_the_thresholds() {
    let d = test_device();
    let shape = [2, 1, 40, 4];
    let keys = seeded_tensor(shape, 11, 1.0, &d);
    let values = seeded_tensor(shape, 12, 1.0, &d);
    let plain = KvQuantCalibration::calibrate(&keys, &values, 2, 0.99, 0).expect("plain");
    assert!(!plain.fisher_weighted);
    // Weight only the positive entries: the codebooks move up, the thresholds stay.
    let pos = |t: &Tensor<4>| t.clone().greater_elem(0.0).float() + 1e-6;
    let (wk, wv) = (pos(&keys), pos(&values));
    let w = KvQuantCalibration::calibrate_weighted(&keys, &values, Some((&wk, &wv)), 2, 0.99, 0)
        .expect("weighted");
    assert!(w.fisher_weighted);
    assert_eq!(
        (w.key_upper.clone(), w.key_lower.clone()),
        (plain.key_upper.clone(), plain.key_lower.clone())
    );
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    assert!(
        mean(&w.key_lut) > mean(&plain.key_lut) + 0.1,
        "{:?} vs {:?}",
        w.key_lut,
        plain.key_lut
    );
    assert!(mean(&w.value_lut) > mean(&plain.value_lut) + 0.1);
    // Unit weights reproduce the thresholds and give a codebook close to the plain one.
    let ones = Tensor::<4>::ones(shape, &d);
    let u =
        KvQuantCalibration::calibrate_weighted(&keys, &values, Some((&ones, &ones)), 2, 0.99, 0)
            .expect("unit weights");
    close(&u.key_lut, &plain.key_lut, 0.05);
    // An artefact written before the field existed still loads (uniform).
    let mut json: serde_json::Value = serde_json::to_value(&plain).expect("json");
    json.as_object_mut()
        .expect("object")
        .remove("fisher_weighted");
    let old: KvQuantCalibration = serde_json::from_value(json).expect("old artefact");
    assert!(!old.fisher_weighted);
}

#[test]
fn bad_fisher_weights_are_refused() {
    let d = test_device();
    let shape = [1, 1, 20, 4];
    let keys = seeded_tensor(shape, 3, 1.0, &d);
    let values = seeded_tensor(shape, 4, 1.0, &d);
    let ones = Tensor::<4>::ones(shape, &d);
    let short = Tensor::<4>::ones([1, 1, 19, 4], &d);
    let calib = |fk: &Tensor<4>, fv: &Tensor<4>| {
        KvQuantCalibration::calibrate_weighted(&keys, &values, Some((fk, fv)), 2, 0.99, 0)
    };
    for (what, fk, fv) in [
        ("shape", short.clone(), ones.clone()),
        ("negative", ones.clone().neg(), ones.clone()),
        ("nan", ones.clone(), ones.clone() * f32::NAN),
        ("zero", ones.clone() * 0.0, ones.clone()),
    ] {
        match calib(&fk, &fv) {
            Err(kv_quant::QuantError::InvalidConfig { field, .. }) => {
                assert_eq!(field, "fisher", "{what}")
            }
            other => panic!("{what}: expected an error on fisher, got {other:?}"),
        }
    }
}
