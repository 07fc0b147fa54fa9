//! The calibration: bases, the artefact and its validation.

use kv_core::KvShape;
use kv_lowrank::{Activation, CALIBRATION_VERSION, Calibration, CovarianceAccumulator};
use kv_testkit::{seeded_data, tensor_from, test_device};

use crate::{LAYERS, assert_invalid, scaled, shape, synthetic_calibration, temp_path};

#[test]
fn every_basis_is_orthonormal_with_decreasing_eigenvalues() {
    let cal = synthetic_calibration(shape());
    let mut expected = Activation::ALL.to_vec();
    expected.extend([Activation::KeysPreRopeJoint, Activation::ValuesJoint]);
    assert_eq!(cal.meta().activations, expected);
    for act in expected {
        let (heads, dim) = cal.layout(act);
        assert_eq!((heads, dim), if act.is_joint() { (1, 16) } else { (2, 8) });
        for layer in 0..LAYERS {
            for head in 0..heads {
                let err = cal.orthonormality_error(act, layer, head).expect("basis");
                assert!(err < 1e-5, "{act:?} {layer} {head}: |UᵀU - I| = {err}");
                let ev = cal.eigenvalues(act, layer, head).expect("eigenvalues");
                assert!(ev.windows(2).all(|w| w[0] >= w[1]), "{ev:?} not decreasing");
                assert!(ev.iter().all(|&x| x >= 0.0));
            }
        }
    }
}

/// Host second moment `XᵀX / N` of one head of a `[1, h, n, d]` row-major buffer.
fn second_moment(x: &[f32], n: usize, d: usize, head: usize) -> Vec<f64> {
    let mut c = vec![0f64; d * d];
    for t in 0..n {
        let row = &x[(head * n + t) * d..(head * n + t + 1) * d];
        for i in 0..d {
            for j in 0..d {
                c[i * d + j] += f64::from(row[i]) * f64::from(row[j]);
            }
        }
    }
    c.iter().map(|v| v / n as f64).collect()
}

#[test]
fn eigenpairs_diagonalise_the_second_moment() {
    let device = test_device();
    let s = KvShape::new(1, 2, 2, 6).expect("shape");
    let (n, d) = (40, 6);
    let data = seeded_data(2 * n * d, 7, 2.0);
    let x = tensor_from(data.clone(), [1, 2, n, d], &device);
    let mut acc = CovarianceAccumulator::new(1, s);
    acc.observe(0, Activation::Keys, &x).expect("observe");
    let cal = acc.finish("m", "t").expect("finish");
    for head in 0..2 {
        let c = second_moment(&data, n, d, head);
        let u = cal.basis_host(Activation::Keys, 0, head).expect("basis");
        let ev = cal.eigenvalues(Activation::Keys, 0, head).expect("ev");
        // C u_j = λ_j u_j for every column j.
        for j in 0..d {
            for i in 0..d {
                let cu: f64 = (0..d).map(|m| c[i * d + m] * f64::from(u[m * d + j])).sum();
                let lu = f64::from(ev[j]) * f64::from(u[i * d + j]);
                assert!(
                    (cu - lu).abs() < 1e-4,
                    "head {head} column {j}: {cu} vs {lu}"
                );
            }
        }
        let trace: f64 = (0..d).map(|i| c[i * d + i]).sum();
        let sum: f64 = ev.iter().map(|&e| f64::from(e)).sum();
        assert!((trace - sum).abs() < 1e-4 * trace);
    }
}

#[test]
fn a_planted_subspace_gets_all_the_variance() {
    let device = test_device();
    let s = KvShape::new(1, 1, 1, 8).expect("shape");
    // Keys in span(e0 + e1, e5): rank 2.
    let coeffs = seeded_data(2 * 50, 3, 1.0);
    let mut data = vec![0f32; 50 * 8];
    for t in 0..50 {
        let (a, b) = (coeffs[2 * t], coeffs[2 * t + 1]);
        data[t * 8] = a;
        data[t * 8 + 1] = a;
        data[t * 8 + 5] = 3.0 * b;
    }
    let mut acc = CovarianceAccumulator::new(1, s);
    acc.observe(
        0,
        Activation::Keys,
        &tensor_from(data, [1, 1, 50, 8], &device),
    )
    .expect("observe");
    let cal = acc.finish("m", "t").expect("finish");
    let ev = cal.eigenvalues(Activation::Keys, 0, 0).expect("ev");
    assert!(ev[1] > 0.1, "{ev:?}");
    assert!(ev[2..].iter().all(|&e| e < 1e-5), "{ev:?}");
    // The first two directions span {e5, (e0 + e1)/√2}.
    let u = cal.basis_host(Activation::Keys, 0, 0).expect("basis");
    let h = core::f32::consts::FRAC_1_SQRT_2;
    for w in [
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
        [h, h, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ] {
        let captured: f32 = (0..2)
            .map(|c| (0..8).map(|i| w[i] * u[i * 8 + c]).sum::<f32>().powi(2))
            .sum();
        assert!((captured - 1.0).abs() < 1e-4, "{w:?}: {captured}");
    }
}

#[test]
fn the_artefact_round_trips_through_a_file() {
    let cal = synthetic_calibration(shape());
    let path = temp_path("roundtrip");
    cal.save(&path).expect("save");
    let back = Calibration::load(&path).expect("load");
    assert_eq!(back, cal);
    assert_eq!(back.meta().version, CALIBRATION_VERSION);
    assert_eq!(back.meta().num_layers, LAYERS);
    assert_eq!(back.meta().tokens, 64);
    std::fs::remove_file(&path).ok();
}

#[test]
fn another_version_is_rejected() {
    let bytes = synthetic_calibration(shape()).to_bytes().expect("bytes");
    let needle = format!("\\\"version\\\":{CALIBRATION_VERSION}");
    // Search the bytes (the length prefix before the JSON header need not be UTF-8).
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .expect("version in the header");
    let mut bad = bytes.clone();
    let digit = at + needle.len() - 1;
    bad[digit] = b'9';
    assert_invalid(Calibration::from_bytes(&bad), "version 9");
}

#[test]
fn missing_and_corrupt_files_are_clear_errors() {
    assert_invalid(
        Calibration::load("/nonexistent/dir/cal.safetensors"),
        "kv-eval calibrate",
    );
    assert_invalid(
        Calibration::from_bytes(b"not a safetensors file"),
        "safetensors",
    );
    let plain = safetensors::serialize(
        Vec::<(String, safetensors::tensor::TensorView<'_>)>::new(),
        None,
    )
    .expect("empty safetensors");
    assert_invalid(Calibration::from_bytes(&plain), "kv_lowrank");
}

#[test]
fn an_artefact_of_another_model_shape_is_rejected() {
    let cal = synthetic_calibration(shape());
    let other = KvShape::new(1, 2, 4, 16).expect("shape");
    assert_invalid(
        cal.check(Activation::Keys, 0, &other),
        "calibrate this model",
    );
    let other = KvShape::new(1, 1, 4, 8).expect("shape");
    assert_invalid(cal.check(Activation::Keys, 0, &other), "KV heads");
    assert_invalid(
        cal.check(Activation::Keys, LAYERS, &shape()),
        "out of range",
    );
    assert_invalid(
        cal.basis(Activation::Keys, 0, &shape(), 9, &test_device()),
        "head_dim 8",
    );
    assert_invalid(
        cal.basis(Activation::Keys, 0, &shape(), 0, &test_device()),
        "rank 0",
    );
}

#[test]
fn observe_rejects_bad_input() {
    let device = test_device();
    let mut acc = CovarianceAccumulator::new(1, shape());
    let kv = scaled([1, 2, 4, 8], 1, &device);
    assert_invalid(acc.observe(0, Activation::QueryKey, &kv), "derived");
    assert_invalid(acc.observe(1, Activation::Keys, &kv), "out of range");
    assert_invalid(acc.observe(0, Activation::Queries, &kv), "expected");
    assert_invalid(
        CovarianceAccumulator::new(1, shape()).finish("m", "t"),
        "no activation",
    );
    let mut acc = CovarianceAccumulator::new(2, shape());
    acc.observe(0, Activation::Keys, &kv).expect("observe");
    assert_invalid(acc.finish("m", "t"), "layer 1");
}

#[test]
fn joint_bases_span_every_head_and_keep_the_total_variance() {
    // The joint second moment's diagonal blocks are the per-head second moments, so its
    // eigenvalues sum to the per-head traces.
    let cal = synthetic_calibration(shape());
    for (joint, per_head) in [
        (Activation::KeysPreRopeJoint, Activation::KeysPreRope),
        (Activation::ValuesJoint, Activation::Values),
    ] {
        for layer in 0..LAYERS {
            let total: f32 = cal
                .eigenvalues(joint, layer, 0)
                .expect("joint")
                .iter()
                .sum();
            let heads: f32 = (0..2)
                .map(|h| {
                    cal.eigenvalues(per_head, layer, h)
                        .expect("head")
                        .iter()
                        .sum::<f32>()
                })
                .sum();
            assert!(
                (total - heads).abs() < 1e-3 * heads,
                "{joint:?} {layer}: {total} vs {heads}"
            );
            assert_eq!(cal.eigenvalues(joint, layer, 1), None);
            assert_eq!(
                cal.basis_host(joint, layer, 0).expect("basis").len(),
                16 * 16
            );
        }
    }
}

#[test]
fn weight_spectra_are_the_squared_singular_values() {
    let s = shape();
    let (d, in_dim) = (s.head_dim(), 12);
    let w = seeded_data(s.kv_heads() * d * in_dim, 7, 1.0);
    let mut acc = CovarianceAccumulator::new(1, s);
    acc.observe_weights(0, Activation::KeyWeights, &w, in_dim)
        .expect("weights");
    assert_invalid(
        acc.observe_weights(0, Activation::KeyWeights, &w, in_dim),
        "given twice",
    );
    assert_invalid(
        acc.observe_weights(0, Activation::Keys, &w, in_dim),
        "not a projection weight",
    );
    assert_invalid(
        acc.observe_weights(0, Activation::ValueWeights, &w[1..], in_dim),
        "in_dim 12",
    );
    let cal = acc.finish("w", "weights").expect("finish");
    for head in 0..s.kv_heads() {
        let rows = &w[head * d * in_dim..(head + 1) * d * in_dim];
        let frob: f32 = rows.iter().map(|x| x * x).sum();
        let ev = cal
            .eigenvalues(Activation::KeyWeights, 0, head)
            .expect("ev");
        let sum: f32 = ev.iter().sum();
        assert!(
            (sum - frob).abs() < 1e-3 * frob,
            "head {head}: {sum} vs {frob}"
        );
        // W_h V = U Σ: the norm of the projection of each weight row on v_j, summed over
        // rows, is σ_j².
        let v = cal
            .basis_host(Activation::KeyWeights, 0, head)
            .expect("basis");
        for j in 0..d {
            let sq: f32 = (0..in_dim)
                .map(|c| {
                    let x: f32 = (0..d).map(|i| rows[i * in_dim + c] * v[i * d + j]).sum();
                    x * x
                })
                .sum();
            assert!(
                (sq - ev[j]).abs() < 1e-3 * ev[0],
                "σ_{j}²: {sq} vs {}",
                ev[j]
            );
        }
    }
}

#[test]
fn version_1_artefacts_are_still_read() {
    let bytes = synthetic_calibration(shape()).to_bytes().expect("bytes");
    let needle = format!("\\\"version\\\":{CALIBRATION_VERSION}");
    // Search the bytes (the length prefix before the JSON header need not be UTF-8).
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .expect("version in the header");
    let mut old = bytes.clone();
    old[at + needle.len() - 1] = b'1';
    assert_eq!(
        Calibration::from_bytes(&old)
            .expect("version 1")
            .meta()
            .version,
        1
    );
}
