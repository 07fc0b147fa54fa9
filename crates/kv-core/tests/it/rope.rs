//! RoPE: norms preserved, relative-position property, conventions, re-rotation.

use burn::prelude::*;
use kv_core::{KvError, RopeConfig, RopeConvention};
use kv_testkit::strategies::position;
use kv_testkit::{
    assert_close, assert_close_slices, seeded_tensor, tensor_from, test_device, to_vec,
};
use proptest::prelude::*;

fn conv() -> impl Strategy<Value = RopeConvention> {
    prop_oneof![
        Just(RopeConvention::RotateHalf),
        Just(RopeConvention::Interleaved)
    ]
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

#[test]
fn hand_computed_rotation() {
    // head_dim 2, base irrelevant for the first pair (θ_0 = 1): angle = position.
    let d = test_device();
    for convention in [RopeConvention::RotateHalf, RopeConvention::Interleaved] {
        let rope = RopeConfig::new(2, 10_000.0, convention)
            .init()
            .expect("rope");
        let x = tensor_from(vec![1.0, 0.0], [1, 1, 1, 2], &d);
        let y = to_vec(&rope.apply(x, &[1]));
        assert_close_slices(&y, &[1f32.cos(), 1f32.sin()], 1e-6, 0.0);
    }
    // head_dim 4, rotate-half pairs (0, 2) and (1, 3); θ_1 = base^(-1/2) = 0.01 at base 1e4.
    let rope = RopeConfig::new(4, 10_000.0, RopeConvention::RotateHalf)
        .init()
        .expect("rope");
    let x = tensor_from(vec![0.0, 1.0, 0.0, 0.0], [1, 1, 1, 4], &d);
    let y = to_vec(&rope.apply(x, &[100]));
    assert_close_slices(&y, &[0.0, 1f32.cos(), 0.0, 1f32.sin()], 1e-6, 0.0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn preserves_norms(c in conv(), half in 1usize..=8, p in position(), seed in any::<u64>(), base in 2.0f32..1e6) {
        let d = test_device();
        let rope = RopeConfig::new(2 * half, base, c).init().expect("rope");
        let x = seeded_tensor([1, 2, 1, 2 * half], seed, 2.0, &d);
        let y = rope.apply(x.clone(), &[p]);
        let (xv, yv) = (to_vec(&x), to_vec(&y));
        for h in 0..2 {
            let r = h * 2 * half..(h + 1) * 2 * half;
            let (nx, ny) = (dot(&xv[r.clone()], &xv[r.clone()]), dot(&yv[r.clone()], &yv[r]));
            prop_assert!((nx - ny).abs() <= 1e-4 * nx.max(1.0), "{nx} vs {ny}");
        }
    }

    /// q(m)·k(n) depends only on m - n.
    #[test]
    fn scores_depend_on_relative_position(
        c in conv(), half in 1usize..=8, m in 0u32..4000, n in 0u32..4000, shift in 0u32..4000, seed in any::<u64>(),
    ) {
        let d = test_device();
        let rope = RopeConfig::new(2 * half, 10_000.0, c).init().expect("rope");
        let q = seeded_tensor([1, 1, 1, 2 * half], seed, 1.0, &d);
        let k = seeded_tensor([1, 1, 1, 2 * half], seed ^ 5, 1.0, &d);
        let s = |a: u32, b: u32| dot(&to_vec(&rope.apply(q.clone(), &[a])), &to_vec(&rope.apply(k.clone(), &[b])));
        let (s0, s1) = (s(m, n), s(m + shift, n + shift));
        // f32 angles at positions up to 8000 carry ~1e-3 rad of rounding.
        prop_assert!((s0 - s1).abs() < 2e-2, "{s0} vs {s1}");
    }

    #[test]
    fn rerotate_and_unapply_compose(c in conv(), half in 1usize..=8, p in 0u32..3000, p2 in 0u32..3000, seed in any::<u64>()) {
        let d = test_device();
        let rope = RopeConfig::new(2 * half, 100_000.0, c).init().expect("rope");
        let x = seeded_tensor([1, 1, 1, 2 * half], seed, 1.0, &d);
        let at_p = rope.apply(x.clone(), &[p]);
        let moved = rope.rerotate(at_p.clone(), &[p], &[p2]);
        assert_close(&moved, &rope.apply(x.clone(), &[p2]), 2e-3, 0.0);
        assert_close(&rope.unapply(at_p, &[p]), &x, 2e-3, 0.0);
    }
}

#[test]
fn conventions_differ_by_a_channel_permutation() {
    // Interleaved RoPE on x equals rotate-half RoPE on x with channels (2i, 2i+1) moved to
    // (i, i + d/2), then moved back: the un-permutation llama.cpp checkpoints need.
    let d = test_device();
    let hd = 8;
    let x = seeded_tensor([1, 2, 3, hd], 42, 1.0, &d);
    let pos = [5, 6, 7];
    let inter = RopeConfig::new(hd, 100_000.0, RopeConvention::Interleaved)
        .init()
        .expect("rope");
    let half = RopeConfig::new(hd, 100_000.0, RopeConvention::RotateHalf)
        .init()
        .expect("rope");
    let to_half: Vec<i32> = (0..hd / 2)
        .map(|i| 2 * i as i32)
        .chain((0..hd / 2).map(|i| 2 * i as i32 + 1))
        .collect();
    let mut back = vec![0i32; hd];
    for (new, &old) in to_half.iter().enumerate() {
        back[old as usize] = new as i32;
    }
    let idx = |v: Vec<i32>| Tensor::<1, Int>::from_data(TensorData::new(v, [hd]), &d);
    let via_half = half
        .apply(x.clone().select(3, idx(to_half)), &pos)
        .select(3, idx(back));
    assert_close(&inter.apply(x, &pos), &via_half, 1e-6, 1e-6);
}

#[test]
fn per_head_positions() {
    let d = test_device();
    let rope = RopeConfig::new(4, 10_000.0, RopeConvention::RotateHalf)
        .init()
        .expect("rope");
    let x = seeded_tensor([1, 2, 2, 4], 3, 1.0, &d);
    let per_head = rope.apply(x.clone(), &[1, 2, 7, 9]);
    let h0 = rope.apply(x.clone().slice([0..1, 0..1, 0..2, 0..4]), &[1, 2]);
    let h1 = rope.apply(x.slice([0..1, 1..2, 0..2, 0..4]), &[7, 9]);
    assert_close(&per_head, &Tensor::cat(vec![h0, h1], 1), 1e-7, 0.0);
}

#[test]
fn partial_rotary_leaves_the_rest() {
    let d = test_device();
    let mut cfg = RopeConfig::new(8, 10_000.0, RopeConvention::RotateHalf);
    cfg.rotary_dim = Some(4);
    let rope = cfg.init().expect("rope");
    let x = seeded_tensor([1, 1, 1, 8], 3, 1.0, &d);
    let y = to_vec(&rope.apply(x.clone(), &[9]));
    assert_eq!(&y[4..], &to_vec(&x)[4..]);
}

#[test]
fn bad_configs_are_rejected() {
    assert!(matches!(
        RopeConfig::new(7, 1e4, RopeConvention::RotateHalf).init(),
        Err(KvError::InvalidConfig { .. })
    ));
    assert!(
        RopeConfig::new(8, f32::NAN, RopeConvention::RotateHalf)
            .init()
            .is_err()
    );
    assert!(
        RopeConfig::new(8, 0.5, RopeConvention::RotateHalf)
            .init()
            .is_err()
    );
    let mut c = RopeConfig::new(8, 1e4, RopeConvention::RotateHalf);
    c.rotary_dim = Some(10);
    assert!(c.init().is_err());
}
