//! The DMC retrofit's relaxation: with `α ≡ 0` it is causal attention, with hard decisions it
//! is the cache appended token by token, its head gradients match finite differences, and a
//! few training steps on a tiny problem lower the loss.

use burn::prelude::*;
use kv_core::{KvBlock, KvCache, KvShape, Query, StatsRequest};
use kv_dmc::{
    DecisionConfig, DecisionHeads, DmcConfig, Retrofit, RetrofitConfig, hard_attention,
    relaxed_attention, straight_through, target_ratio,
};
use kv_model::grad::causal_attention;
use kv_testkit::{
    assert_close_slices, seeded_data, seeded_tensor, tensor_from, test_device, to_vec,
};

/// Heads with seeded weights of scale `w` and `α` biases `alpha_bias`.
fn seeded_heads(dims: [usize; 3], seed: u64, w: f32, alpha_bias: f32) -> DecisionHeads {
    let [l, h, d] = dims;
    let mut heads = DecisionHeads::new(l, h, d, alpha_bias, 0.0);
    let mut p = heads.params();
    let r = seeded_data(p.len(), seed, w);
    let (nw, nh) = (l * h * d, l * h);
    for (i, (pi, ri)) in p.iter_mut().zip(r).enumerate() {
        let is_bias = (nw..nw + nh).contains(&i) || i >= 2 * nw + nh;
        *pi = if is_bias { *pi + ri } else { ri };
    }
    heads.set_params(&p);
    heads
}

#[test]
fn no_merges_equal_causal_attention() {
    let d = test_device();
    let (b, hq, hkv, n, hd) = (2, 4, 2, 9, 8);
    let q = seeded_tensor([b, hq, n, hd], 1, 1.0, &d);
    let k = seeded_tensor([b, hkv, n, hd], 2, 1.0, &d);
    let v = seeded_tensor([b, hkv, n, hd], 3, 1.0, &d);
    let z = Tensor::<3>::full([b, hkv, n], -1e4, &d);
    let omega = seeded_tensor([b, hkv, n], 4, 1.0, &d).abs() + 0.1;
    let got = relaxed_attention(q.clone(), k.clone(), v.clone(), z, omega, None);
    let want = causal_attention(q, k, v);
    assert_close_slices(&to_vec(&got), &to_vec(&want), 1e-5, 1e-5);
}

#[test]
fn hard_decisions_equal_the_cache_appended_token_by_token() {
    let d = test_device();
    let (b, hq, hkv, n, hd) = (2, 4, 2, 12, 8);
    let shape = KvShape::new(b, hkv, hq, hd).expect("shape");
    // About half the tokens merge; ω varies.
    let heads = seeded_heads([1, hkv, hd], 7, 0.5, 0.0);
    let q = seeded_tensor([b, hq, n, hd], 11, 1.0, &d);
    let k = seeded_tensor([b, hkv, n, hd], 12, 1.0, &d);
    let v = seeded_tensor([b, hkv, n, hd], 13, 1.0, &d);
    let (relaxed, fraction) = hard_attention(&heads, 0, q.clone(), k.clone(), v.clone());
    assert!(
        (0.2..0.8).contains(&fraction),
        "merge fraction {fraction}: the case should mix appends and merges"
    );
    let relaxed = to_vec(&relaxed);
    let mut cache = DmcConfig::new(
        shape,
        DecisionConfig::Learned {
            layer: heads.layer(0),
        },
    )
    .init(&d)
    .expect("cache");
    for t in 0..n {
        let kt = k.clone().slice([0..b, 0..hkv, t..t + 1, 0..hd]);
        let vt = v.clone().slice([0..b, 0..hkv, t..t + 1, 0..hd]);
        cache
            .append(KvBlock::contiguous(kt, vt, t as u32).expect("block"))
            .expect("append");
        let qt = q.clone().slice([0..b, 0..hq, t..t + 1, 0..hd]);
        let out = cache
            .attend(
                &Query::contiguous(qt, t as u32).expect("query"),
                StatsRequest::NONE,
            )
            .expect("attend")
            .output;
        let out = to_vec(&out);
        for s in 0..b * hq {
            let want = &out[s * hd..(s + 1) * hd];
            let got = &relaxed[(s * n + t) * hd..(s * n + t + 1) * hd];
            assert_close_slices(got, want, 1e-5, 1e-4);
        }
    }
    let held: usize = cache.lengths().held.iter().sum();
    let merged = b * hkv * n - held;
    // The first token of a stream always appends, whatever its decision.
    assert!(merged > 0 && merged < b * hkv * n, "{merged} merges");
}

/// `Σ relaxed_attention ⊙ r` for heads on the autodiff device `ad`, and the heads' gradients.
fn objective(heads: &DecisionHeads, ad: &Device, with_grads: bool) -> (f64, Vec<f32>) {
    let (b, hq, hkv, n, hd) = (1, 2, 1, 7, 4);
    let q = seeded_tensor([b, hq, n, hd], 21, 1.0, ad);
    let k = seeded_tensor([b, hkv, n, hd], 22, 1.0, ad);
    let v = seeded_tensor([b, hkv, n, hd], 23, 1.0, ad);
    let r = seeded_tensor([b, hq, n, hd], 24, 1.0, ad);
    let tracked = heads.track(ad);
    let (a, o) = tracked.logits(0, k.clone());
    let omega = burn::tensor::activation::sigmoid(o);
    let out = relaxed_attention(q, k, v, a, omega, None);
    let f = (out * r).sum();
    let value = f64::from(to_vec(&f)[0]);
    let grads = if with_grads {
        tracked.grads(&f.backward())
    } else {
        Vec::new()
    };
    (value, grads)
}

#[test]
fn head_gradients_match_finite_differences() {
    let ad = test_device().autodiff();
    let heads = seeded_heads([1, 1, 4], 31, 0.7, 0.3);
    let (_, g) = objective(&heads, &ad, true);
    let p = heads.params();
    assert_eq!(g.len(), p.len());
    assert!(g.iter().any(|x| x.abs() > 1e-3), "gradients vanish: {g:?}");
    let eps = 1e-2f32;
    for (i, &gi) in g.iter().enumerate() {
        let at = |delta: f32| {
            let mut h = heads.clone();
            let mut q = p.clone();
            q[i] += delta;
            h.set_params(&q);
            objective(&h, &ad, false).0
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * f64::from(eps));
        let a = f64::from(gi);
        assert!(
            (fd - a).abs() < 0.03 * a.abs().max(fd.abs()) + 2e-4,
            "parameter {i}: autodiff {a} vs finite difference {fd}"
        );
    }
}

#[test]
fn training_lowers_the_loss_on_a_tiny_problem() {
    // A teacher's hard decisions merge about half the tokens; the student starts almost never
    // merging and learns from the output error alone (target ratio 1: no compression
    // pressure). Large values make the merges matter.
    let ad = test_device().autodiff();
    let (b, hq, hkv, n, hd) = (1, 2, 1, 16, 4);
    let steps = 150;
    let teacher = seeded_heads([1, hkv, hd], 41, 2.0, 0.0);
    let q = seeded_tensor([b, hq, n, hd], 42, 2.0, &ad);
    let k = seeded_tensor([b, hkv, n, hd], 43, 1.0, &ad);
    let v = seeded_tensor([b, hkv, n, hd], 44, 3.0, &ad);
    let (target, fraction) = hard_attention(&teacher, 0, q.clone(), k.clone(), v.clone());
    assert!((0.2..0.8).contains(&fraction), "teacher merges {fraction}");
    let target = tensor_from(to_vec(&target), [b, hq, n, hd], &ad);
    let mut config = RetrofitConfig::new(1.0, steps, hd);
    config.lr = 0.1;
    config.weight_lr_scale = 1.0;
    let mut trainer = Retrofit::new(DecisionHeads::new(1, hkv, hd, -3.0, 0.0), config);
    let mut losses = Vec::new();
    for _ in 0..steps {
        let r = trainer
            .step(&ad, |attention| {
                let out = attention(0, q.clone(), k.clone(), v.clone());
                Ok::<_, ()>((out - target.clone()).powi_scalar(2).mean())
            })
            .expect("step");
        assert!(r.lm_loss.is_finite() && r.compression_loss == 0.0);
        losses.push(r.lm_loss);
    }
    assert_eq!(trainer.steps_taken(), steps);
    let first: f32 = losses[..10].iter().sum::<f32>() / 10.0;
    let last: f32 = losses[steps - 10..].iter().sum::<f32>() / 10.0;
    // The learned hard decisions reproduce the teacher's output better than no merging does.
    let err = |t: Tensor<4>| to_vec(&(t - target.clone()).powi_scalar(2).mean())[0];
    let (student, _) = hard_attention(&trainer.heads, 0, q.clone(), k.clone(), v.clone());
    let (student, none) = (err(student), err(causal_attention(q, k, v)));
    println!("loss {first} -> {last}; hard student {student} vs no merging {none}");
    assert!(last < 0.7 * first, "loss {first} -> {last}: {losses:?}");
    assert!(
        student < 0.6 * none,
        "hard student {student} vs no merging {none}"
    );
}

#[test]
fn compression_loss_pushes_towards_the_target_ratio() {
    // Only the compression term: with target ratio 2 the merge fraction must rise to ~1/2.
    let ad = test_device().autodiff();
    let (b, hq, hkv, n, hd) = (1, 2, 1, 32, 4);
    let q = seeded_tensor([b, hq, n, hd], 51, 1.0, &ad);
    let k = seeded_tensor([b, hkv, n, hd], 52, 1.0, &ad);
    let v = seeded_tensor([b, hkv, n, hd], 53, 1.0, &ad);
    let mut trainer = Retrofit::new(
        DecisionHeads::new(1, hkv, hd, -3.0, 0.0),
        RetrofitConfig::new(2.0, 40, hd),
    );
    let mut last = None;
    for _ in 0..80 {
        let r = trainer
            .step(&ad, |attention| {
                let out = attention(0, q.clone(), k.clone(), v.clone());
                Ok::<_, ()>(out.sum() * 0.0)
            })
            .expect("step");
        last = Some(r);
    }
    let r = last.expect("steps");
    assert_eq!(r.target_ratio, 2.0);
    assert!(
        r.merge_fraction >= 0.35,
        "merge fraction {}",
        r.merge_fraction
    );
}

#[test]
fn schedule_straight_through_and_artefact() {
    assert_eq!(target_ratio(0, 10, 4.0), 1.0);
    assert_eq!(target_ratio(5, 10, 4.0), 2.5);
    assert_eq!(target_ratio(20, 10, 4.0), 4.0);
    let ad = test_device().autodiff();
    let a = Tensor::<1>::from_floats([0.2, 0.7], &ad).require_grad();
    let st = straight_through(a.clone());
    assert_eq!(to_vec(&st), vec![0.0, 1.0]);
    let g = a.grad(&(st * Tensor::from_floats([1.0, 2.0], &ad)).sum().backward());
    assert_eq!(to_vec(&g.expect("grad")), vec![1.0, 2.0]);
    let heads = seeded_heads([3, 2, 4], 61, 1.0, -1.0);
    let art = heads.to_artefact("test");
    for l in 0..3 {
        assert_eq!(art.layer(l, 2, 4).expect("layer"), heads.layer(l));
    }
    assert!(art.layer(0, 3, 4).is_err());
}
