//! The llama.cpp formats against a host-side statement of ggml's reference quantizers (scalar
//! loops over one block, fp16 through `half`), written from the published algorithm: the
//! decoded values must agree exactly (for `iq4_nl`'s 15-trial search, the block's squared
//! error must match within 5 %, see below).

use half::f16;
use kv_quant::blocks::KVALUES_IQ4NL;
use kv_quant::{BlockFormat, Iq4Search};
use kv_testkit::{seeded_data, tensor_from, test_device, to_vec};
use proptest::prelude::*;

fn h(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

fn inv(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

/// First value of largest magnitude.
fn signed_max(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// `best_index_int8`: nearest table entry, ties to the upper one.
fn best_index(x: f32) -> usize {
    let v = KVALUES_IQ4NL.map(f32::from);
    if x <= v[0] {
        return 0;
    }
    if x >= v[15] {
        return 15;
    }
    let (mut ml, mut mu) = (0, 15);
    while mu - ml > 1 {
        let mav = (ml + mu) / 2;
        if x < v[mav] {
            mu = mav;
        } else {
            ml = mav;
        }
    }
    if x - v[mu - 1] < v[mu] - x {
        mu - 1
    } else {
        mu
    }
}

fn iq4_host(x: &[f32], ntry: i32) -> Vec<f32> {
    let v = KVALUES_IQ4NL.map(f32::from);
    let amax = x.iter().fold(0f32, |a, y| a.max(y.abs()));
    if amax < 1e-15 {
        return vec![0.0; x.len()];
    }
    let max = signed_max(x);
    let w: Vec<f32> = x.iter().map(|y| y * y).collect();
    let sums = |id: f32| {
        let (mut sqx, mut sq2) = (0f32, 0f32);
        let mut l = Vec::with_capacity(x.len());
        for (j, &y) in x.iter().enumerate() {
            let i = best_index(id * y);
            l.push(i);
            sqx += w[j] * v[i] * y;
            sq2 += w[j] * v[i] * v[i];
        }
        (sqx, sq2, l)
    };
    let d0 = if ntry > 0 { -max / v[0] } else { max / v[0] };
    let (sqx, sq2, mut l) = sums(1.0 / d0);
    let mut d = sqx / sq2;
    let mut best = d * sqx;
    for itry in -ntry..=ntry {
        let (sqx, sq2, _) = sums((itry as f32 + v[0]) / max);
        if sq2 > 0.0 && sqx * sqx > best * sq2 {
            d = sqx / sq2;
            best = d * sqx;
        }
    }
    if ntry > 0 {
        l = sums(inv(d)).2;
    }
    let dh = h(d);
    l.iter().map(|&i| dh * v[i]).collect()
}

/// One block decoded through the ggml reference algorithm.
fn reference(f: BlockFormat, x: &[f32]) -> Vec<f32> {
    let lin = |half: f32, top: f32| {
        let d = signed_max(x) / -half;
        let id = inv(d);
        let dh = h(d);
        x.iter()
            .map(|&y| ((y * id + half + 0.5).trunc().min(top) - half) * dh)
            .collect()
    };
    let minmax = |top: f32| {
        let mn = x.iter().copied().fold(f32::MAX, f32::min);
        let mx = x.iter().copied().fold(-f32::MAX, f32::max);
        let d = (mx - mn) / top;
        let id = inv(d);
        let (dh, mh) = (h(d), h(mn));
        x.iter()
            .map(|&y| ((y - mn) * id + 0.5).trunc().min(top) * dh + mh)
            .collect()
    };
    match f {
        BlockFormat::Q8_0 => {
            let amax = x.iter().fold(0f32, |a, y| a.max(y.abs()));
            let d = amax / 127.0;
            let id = inv(d);
            x.iter().map(|&y| (y * id).round() * h(d)).collect()
        }
        BlockFormat::Q4_0 => lin(8.0, 15.0),
        BlockFormat::Q5_0 => lin(16.0, 31.0),
        BlockFormat::Q4_1 => minmax(15.0),
        BlockFormat::Q5_1 => minmax(31.0),
        BlockFormat::Iq4Nl(Iq4Search::Refit) => iq4_host(x, -1),
        BlockFormat::Iq4Nl(Iq4Search::Search7) => iq4_host(x, 7),
        BlockFormat::Fp8(_) => unreachable!("ggml formats only"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn ggml_formats_equal_the_host_reference(seed in 0u64..10_000, log_scale in -6i32..8) {
        let d = test_device();
        let n = 3 * 2 * 64;
        let x = seeded_data(n, seed, 2f32.powi(log_scale));
        let t = tensor_from(x.clone(), [1, 3, 2, 64], &d);
        for f in [
            BlockFormat::Q8_0,
            BlockFormat::Q4_0,
            BlockFormat::Q4_1,
            BlockFormat::Q5_0,
            BlockFormat::Q5_1,
            BlockFormat::Iq4Nl(Iq4Search::Refit),
            BlockFormat::Iq4Nl(Iq4Search::Search7),
        ] {
            let got = to_vec(&f.encode(t.clone()).expect("encode").decode());
            let want: Vec<f32> = x.chunks(32).flat_map(|b| reference(f, b)).collect();
            if matches!(f, BlockFormat::Iq4Nl(_)) {
                // Both iq4_nl variants refit a scale from fp32 sums and the search compares near-equal objectives whose fp32 sums are taken in a
                // different order, so a block may settle on another, equally good trial scale:
                // compare the objective the search minimises, the squared error weighted by
                // x² (ggml's weights without an importance matrix), not the values. (The plain
                // squared error is not what the search optimises and can be worse by >5%.)
                let sse = |y: &[f32], xb: &[f32]| -> f32 {
                    y.iter().zip(xb).map(|(a, b)| b * b * (a - b) * (a - b)).sum()
                };
                for ((g, w), xb) in got.chunks(32).zip(want.chunks(32)).zip(x.chunks(32)) {
                    let (sg, sw) = (sse(g, xb), sse(w, xb));
                    prop_assert!(sg <= sw * 1.05 + 1e-12, "search7 block sse {sg} vs ggml {sw}");
                }
                continue;
            }
            let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            prop_assert!(
                bad == 0,
                "{:?}: {bad} of {n} values differ from ggml's reference, e.g. {:?}",
                f,
                got.iter().zip(&want).find(|(a, b)| a != b)
            );
        }
    }
}
