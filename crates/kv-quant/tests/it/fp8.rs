//! fp8 codes: the 256-entry tables, and decode(encode(x)) equal to the nearest representable
//! value found by enumerating every code on the host (ties to the even code, saturation).

use kv_quant::Fp8Format;
use kv_testkit::{seeded_data, tensor_from, test_device, to_vec};
use proptest::prelude::*;

const FORMATS: [Fp8Format; 2] = [Fp8Format::E4M3, Fp8Format::E5M2];

/// The nearest finite fp8 value to `x` by brute force over all codes: `x` clamped to the
/// largest finite value, distance ties broken towards the even code.
fn nearest_host(f: Fp8Format, x: f32) -> f32 {
    let x = x.clamp(-f.max_finite(), f.max_finite());
    let mut best: Option<(f64, u8, f32)> = None;
    for c in 0..=255u8 {
        let v = f.decode_host(c);
        if !v.is_finite() {
            continue;
        }
        let dist = (f64::from(x) - f64::from(v)).abs();
        let better = match best {
            None => true,
            Some((bd, bc, _)) => dist < bd || (dist == bd && bc % 2 == 1 && c % 2 == 0),
        };
        if better {
            best = Some((dist, c, v));
        }
    }
    best.map_or(0.0, |b| b.2)
}

fn round_trip(f: Fp8Format, xs: &[f32]) -> Vec<f32> {
    let d = test_device();
    let t = tensor_from(xs.to_vec(), [xs.len()], &d);
    to_vec(&f.decode(f.encode(t)))
}

fn check(f: Fp8Format, xs: &[f32]) {
    let got = round_trip(f, xs);
    for (x, g) in xs.iter().zip(&got) {
        let want = nearest_host(f, *x);
        assert!(
            g == &want,
            "{f:?}: x = {x:e} ({:#010x}) decoded to {g:e}, nearest is {want:e}",
            x.to_bits()
        );
    }
}

#[test]
fn tables_hold_the_documented_values() {
    let e4 = Fp8Format::E4M3;
    assert_eq!(e4.decode_host(0x7E), 448.0);
    assert_eq!(e4.decode_host(0xFE), -448.0);
    assert!(e4.decode_host(0x7F).is_nan() && e4.decode_host(0xFF).is_nan());
    assert_eq!(e4.decode_host(0x01), 2f32.powi(-9));
    assert_eq!(e4.decode_host(0x08), 2f32.powi(-6));
    assert_eq!(e4.decode_host(0x38), 1.0);
    let e5 = Fp8Format::E5M2;
    assert_eq!(e5.decode_host(0x7B), 57344.0);
    assert_eq!(e5.decode_host(0x7C), f32::INFINITY);
    assert_eq!(e5.decode_host(0xFC), f32::NEG_INFINITY);
    assert!(e5.decode_host(0x7D).is_nan());
    assert_eq!(e5.decode_host(0x01), 2f32.powi(-16));
    assert_eq!(e5.decode_host(0x3C), 1.0);
    // Every finite code decodes back to itself.
    for f in FORMATS {
        let table = f.table_host();
        let finite: Vec<f32> = table.iter().copied().filter(|v| v.is_finite()).collect();
        check(f, &finite);
    }
}

#[test]
fn midpoints_ties_subnormals_and_saturation_round_like_the_host_reference() {
    for f in FORMATS {
        let mut pos: Vec<f32> = f
            .table_host()
            .into_iter()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .collect();
        pos.sort_by(f32::total_cmp);
        pos.dedup();
        let mut xs = Vec::new();
        for w in pos.windows(2) {
            let mid = (w[0] + w[1]) / 2.0; // exact in f32: a tie
            for x in [
                mid,
                f32::from_bits(mid.to_bits() + 1),
                f32::from_bits(mid.to_bits() - 1),
            ] {
                xs.push(x);
                xs.push(-x);
            }
        }
        let max = f.max_finite();
        xs.extend([
            0.0,
            -0.0,
            max,
            -max,
            max * 1.03,
            max * 1.1,
            -max * 5.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            -1e-30,
        ]);
        check(f, &xs);
    }
}

#[test]
fn nan_encodes_to_the_nan_code() {
    let d = test_device();
    for f in FORMATS {
        let t = tensor_from(vec![f32::NAN, 1.0], [2], &d);
        let codes = f.encode(t).into_data().convert::<i64>();
        let codes = codes.try_into_vec::<i64>().expect("i64");
        let one = match f {
            Fp8Format::E4M3 => 0x38,
            Fp8Format::E5M2 => 0x3C,
        };
        assert_eq!(codes, vec![i64::from(f.nan_code()), one]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn decode_encode_is_the_nearest_fp8_value(seed in 0u64..10_000, log_scale in -12i32..18) {
        let scale = 2f32.powi(log_scale);
        for f in FORMATS {
            let xs = seeded_data(256, seed, scale);
            check(f, &xs);
        }
    }
}
