//! Uniform group quantization: the catalog's hand case, the documented error bound for every
//! width, both axes and both modes, byte accounting and bad input.

use burn::prelude::*;
use kv_core::StorageDtype;
use kv_quant::{BitWidth, GroupAxis, QuantError, QuantMode, QuantSpec};
use kv_testkit::{seeded_data, tensor_from, test_device, to_vec};
use proptest::prelude::*;

/// For every element, the index of its group (row-major `[b, h, t, d]`).
fn group_of(dims: [usize; 4], g: usize, axis: GroupAxis, i: usize) -> usize {
    let [_, _, t, d] = dims;
    let (bh, tt, c) = (i / (t * d), (i / d) % t, i % d);
    match axis {
        GroupAxis::Tokens => (bh * (t / g) + tt / g) * d + c,
        GroupAxis::Channels => (bh * t + tt) * (d / g) + c / g,
    }
}

/// Host-side per-group (min, max, absmax).
fn group_stats(x: &[f32], dims: [usize; 4], g: usize, axis: GroupAxis) -> Vec<(f32, f32, f32)> {
    let groups = x.len() / g;
    let mut st = vec![(f32::INFINITY, f32::NEG_INFINITY, 0.0f32); groups];
    for (i, &v) in x.iter().enumerate() {
        let s = &mut st[group_of(dims, g, axis, i)];
        s.0 = s.0.min(v);
        s.1 = s.1.max(v);
        s.2 = s.2.max(v.abs());
    }
    st
}

#[test]
fn catalog_hand_case_reconstructs_exactly() {
    // K = [[0,1],[2,3],[4,5],[6,7]] (4 tokens x 2 channels), G = 4 tokens, 2 bits: channel 0
    // has min 0, max 6 -> s = 2, codes 0..3; channel 1 min 1 -> s = 2, codes 0..3.
    let d = test_device();
    let k = tensor_from((0..8).map(|v| v as f32).collect(), [1, 1, 4, 2], &d);
    for dtype in [StorageDtype::F16, StorageDtype::F32] {
        let spec = QuantSpec::new(BitWidth::new(2).expect("2"), 4, GroupAxis::Tokens)
            .expect("spec")
            .with_scale_dtype(dtype);
        let q = spec.quantize(k.clone()).expect("quantize");
        assert_eq!(to_vec(q.scales()), vec![2.0, 2.0]);
        assert_eq!(to_vec(q.zeros().expect("asymmetric")), vec![0.0, 1.0]);
        assert_eq!(to_vec(&q.dequantize()), to_vec(&k), "{dtype:?}");
        // Codes per token: [0,0], [1,1], [2,2], [3,3] -> one word each, 2 bits per code.
        let words: Vec<u32> = q
            .codes()
            .clone()
            .into_data()
            .convert::<u32>()
            .try_into_vec()
            .expect("u32");
        assert_eq!(words, vec![0, 1 | 1 << 2, 2 | 2 << 2, 3 | 3 << 2]);
        // 4 words of codes + 2 scales + 2 zeros.
        assert_eq!(q.stored_bytes(), 16 + 4 * dtype.size());
        assert_eq!(spec.stored_bytes([1, 1, 4, 2]), q.stored_bytes());
    }
}

#[test]
fn kivi2_group32_fp16_is_three_bits_per_element() {
    let spec = QuantSpec::new(BitWidth::new(2).expect("2"), 32, GroupAxis::Tokens).expect("spec");
    assert!((spec.bits_per_element(64) - 3.0).abs() < 1e-12);
    let spec4 =
        QuantSpec::new(BitWidth::new(4).expect("4"), 32, GroupAxis::Channels).expect("spec");
    assert!((spec4.bits_per_element(64) - 5.0).abs() < 1e-12);
    // Stored bytes of a real KIVI-2 block: 128 tokens x 64 channels x 3 bits.
    let d = test_device();
    let x = tensor_from(seeded_data(128 * 64, 7, 2.0), [1, 1, 128, 64], &d);
    let q = spec.quantize(x).expect("quantize");
    assert_eq!(q.stored_bytes(), 128 * 64 * 3 / 8);
}

#[test]
fn constant_groups_reconstruct_exactly() {
    let d = test_device();
    let x = Tensor::<4>::full([1, 2, 8, 4], -3.25, &d);
    for mode in [QuantMode::Asymmetric, QuantMode::Symmetric] {
        let spec = QuantSpec::new(BitWidth::new(2).expect("2"), 4, GroupAxis::Channels)
            .expect("spec")
            .with_mode(mode)
            .expect("mode");
        let q = spec.quantize(x.clone()).expect("quantize");
        let err = to_vec(&q.dequantize())
            .iter()
            .map(|v| (v + 3.25).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= 1e-6, "{mode:?}: {err}");
    }
}

#[test]
fn bad_input_is_rejected_clearly() {
    let d = test_device();
    let b2 = BitWidth::new(2).expect("2");
    let x = tensor_from(seeded_data(6 * 8, 1, 1.0), [1, 1, 6, 8], &d);
    let e = QuantSpec::new(b2, 4, GroupAxis::Tokens)
        .expect("spec")
        .quantize(x.clone())
        .expect_err("4 does not divide 6 tokens");
    assert_eq!(
        e,
        QuantError::GroupDoesNotDivide {
            group: 4,
            axis: "tokens",
            len: 6
        }
    );
    assert!(e.to_string().contains("does not divide"), "{e}");
    assert!(matches!(
        QuantSpec::new(b2, 3, GroupAxis::Channels)
            .expect("spec")
            .quantize(x.clone()),
        Err(QuantError::GroupDoesNotDivide { .. })
    ));
    assert!(QuantSpec::new(b2, 0, GroupAxis::Channels).is_err());
    assert!(matches!(
        QuantSpec::new(BitWidth::new(1).expect("1"), 2, GroupAxis::Channels)
            .expect("spec")
            .with_mode(QuantMode::Symmetric),
        Err(QuantError::UnsupportedBits { .. })
    ));
    let nan = x.clone().slice_fill([0..1, 0..1, 0..1, 0..1], f32::NAN);
    let spec = QuantSpec::new(b2, 2, GroupAxis::Channels).expect("spec");
    assert!(matches!(
        spec.quantize(nan),
        Err(QuantError::NonFinite { .. })
    ));
    let huge = x.clone().slice_fill([0..1, 0..1, 0..1, 0..1], 40_000.0);
    assert!(matches!(
        spec.quantize(huge.clone()),
        Err(QuantError::OutOfRange { .. })
    ));
    assert!(
        spec.with_scale_dtype(StorageDtype::F32)
            .quantize(huge)
            .is_ok(),
        "fp32 scales take any finite magnitude"
    );
}

fn bound_case() -> impl Strategy<Value = (usize, usize, bool, bool, usize, u64, f32)> {
    // width index, group (1, 2, 4 or 8), axis, symmetric, fp16?, seed, scale
    (
        0usize..5,
        0u32..4,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
        0.01f32..50.0,
    )
        .prop_map(|(w, g, axis, sym, f16, seed, scale)| {
            (w, 1usize << g, axis, sym, usize::from(f16), seed, scale)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// |x - x̂| <= s/2 per element (fp32 scales, plus fp32 arithmetic rounding), and
    /// s/2 + 2^-10 (|z| + (2^b - 1) s) + 2^-24 (2^b) with fp16 scales, for every width, group,
    /// axis and mode.
    #[test]
    fn error_is_at_most_half_a_step((w, g, tokens_axis, sym, f16, seed, scale) in bound_case()) {
        let bits = BitWidth::ALL[w];
        prop_assume!(!(sym && bits.bits() < 2));
        let axis = if tokens_axis { GroupAxis::Tokens } else { GroupAxis::Channels };
        let mode = if sym { QuantMode::Symmetric } else { QuantMode::Asymmetric };
        let dtype = if f16 == 1 { StorageDtype::F16 } else { StorageDtype::F32 };
        let dims = [1, 2, 8, 8];
        let d = test_device();
        let data = seeded_data(dims.iter().product(), seed, scale);
        let x = tensor_from(data.clone(), dims, &d);
        let spec = QuantSpec::new(bits, g, axis).expect("spec").with_mode(mode).expect("mode")
            .with_scale_dtype(dtype);
        let q = spec.quantize(x).expect("quantize");
        let xh = to_vec(&q.dequantize());
        let stats = group_stats(&data, dims, g, axis);
        let levels = bits.max_code() as f32;
        for (i, (&a, &b)) in data.iter().zip(&xh).enumerate() {
            let (mn, mx, amax) = stats[group_of(dims, g, axis, i)];
            let (s, z) = match mode {
                QuantMode::Asymmetric => ((mx - mn) / levels, mn),
                QuantMode::Symmetric => (amax / ((1u32 << (bits.bits() - 1)) - 1) as f32, 0.0),
            };
            let arith = 8.0 * f32::EPSILON * (amax + s);
            let storage = if f16 == 1 {
                (z.abs() + levels * s + s) / 1024.0 + 2f32.powi(-24) * (levels + 1.0)
            } else {
                0.0
            };
            let bound = s / 2.0 + arith + storage;
            prop_assert!((a - b).abs() <= bound,
                "element {i}: x {a} x̂ {b} err {} > bound {bound} (s {s}, {bits}, G {g}, {axis:?}, {mode:?}, {dtype:?})",
                (a - b).abs());
        }
    }
}
