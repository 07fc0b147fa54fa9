//! The catalog's hand-computed cases (cards 16, 17, 18, 20, 21, 22) and the GQA reductions.

use burn::prelude::*;
use kv_evict::score::{avg_pool_include_pad, snapkv, streaming_llm, to_host, tova};
use kv_evict::{
    AdaKvBudget, BudgetAllocator, BudgetContext, GqaReduce, HeavyHitters, PyramidBudget, kept_for,
    top_k_sorted,
};
use kv_testkit::{assert_close_slices, tensor_from, test_device};

fn host3(t: Tensor<3>) -> Vec<f32> {
    to_host(t).expect("readback")
}

#[test]
fn streaming_llm_len10_two_sinks_keeps_sinks_and_three_recent() {
    // Card 17: len 10, start 2, recent 3 -> [0, 1, 7, 8, 9] (ratio 0.5 keeps 5).
    let d = test_device();
    let s = host3(streaming_llm(1, 1, 10, 2, 0.5, &d));
    assert_eq!(s, [1., 1., 0., 0., 0., 0., 0., 1., 1., 1.]);
    assert_eq!(top_k_sorted(&s, kept_for(10, 0.5)), [0, 1, 7, 8, 9]);
}

#[test]
fn snapkv_pooling_example_counts_padding_zeros() {
    // Card 20: window scores s = [0.1, 0.7, 0.05, 0.4] over 4 prefix tokens, window 2.
    let d = test_device();
    let s = [0.1f32, 0.7, 0.05, 0.4];
    let pooled = avg_pool_include_pad(tensor_from(s.to_vec(), [1, 1, 1, 4], &d), 3);
    assert_close_slices(
        &kv_testkit::to_vec(&pooled),
        &[0.8 / 3.0, 0.85 / 3.0, 1.15 / 3.0, 0.45 / 3.0],
        1e-6,
        1e-5,
    );
    // Column sums over the 2 window queries are 2 s; the window tokens 4, 5 get max + 1.
    let sums = tensor_from(s.iter().map(|x| 2.0 * x).collect(), [1, 1, 1, 4], &d);
    let k1 = host3(snapkv(sums.clone(), 2, 1, GqaReduce::Mean));
    assert_close_slices(&k1, &[0.1, 0.7, 0.05, 0.4, 1.7, 1.7], 1e-6, 1e-5);
    assert_eq!(top_k_sorted(&k1, 4), [1, 3, 4, 5]);
    let k3 = host3(snapkv(sums, 2, 3, GqaReduce::Mean));
    assert_eq!(top_k_sorted(&k3, 4), [1, 2, 4, 5]);
}

#[test]
fn tova_two_heads_average_and_share_indices() {
    // Card 18: rows [0.1, 0.6, 0.3] and [0.5, 0.1, 0.4] -> means [0.3, 0.35, 0.35] -> {1, 2}.
    // kvpress's TOVA also keeps the last token (the query itself, column 3 here).
    let d = test_device();
    let rows = vec![0.1f32, 0.6, 0.3, 0.0, 0.5, 0.1, 0.4, 0.0];
    let s = host3(tova(tensor_from(rows, [1, 2, 1, 4], &d)));
    assert_close_slices(
        &s,
        &[0.3, 0.35, 0.35, 1.35, 0.3, 0.35, 0.35, 1.35],
        1e-6,
        1e-5,
    );
    assert_eq!(top_k_sorted(&s[..4], 3), [1, 2, 3]);
    assert_eq!(
        top_k_sorted(&s[4..], 3),
        [1, 2, 3],
        "all heads keep the same tokens"
    );
}

#[test]
fn gqa_reductions_mean_max_sum() {
    let d = test_device();
    let t = tensor_from(vec![1.0, 4.0, 3.0, 2.0], [1, 1, 2, 2], &d);
    assert_eq!(host3(GqaReduce::Mean.reduce(t.clone())), [2.0, 3.0]);
    assert_eq!(host3(GqaReduce::Max.reduce(t.clone())), [3.0, 4.0]);
    assert_eq!(host3(GqaReduce::Sum.reduce(t)), [4.0, 6.0]);
    assert_eq!(GqaReduce::parse("max"), Some(GqaReduce::Max));
    assert_eq!(GqaReduce::parse("median"), None);
}

#[test]
fn top_k_breaks_ties_towards_earlier_tokens_and_sorts() {
    assert_eq!(top_k_sorted(&[0.5, 0.9, 0.5, 0.5, 0.1], 3), [0, 1, 2]);
    assert_eq!(top_k_sorted(&[3.0, f32::NAN, 1.0], 2), [0, 2]);
    assert_eq!(top_k_sorted(&[1.0, 2.0], 0), Vec::<usize>::new());
    assert_eq!(top_k_sorted(&[1.0, 2.0], 5), [0, 1]);
}

#[test]
fn kept_count_is_kvpress_floor() {
    assert_eq!(kept_for(384, 0.5), 192);
    assert_eq!(kept_for(96, 0.5), 48);
    assert_eq!(kept_for(10, 0.75), 2);
    assert_eq!(kept_for(3, 0.9), 0);
    assert_eq!(kept_for(7, 0.0), 7);
    // Python's int(100 * (1 - 0.7)) is 30 (0.3 * 100 = 30.000000000000004).
    assert_eq!(kept_for(100, 0.7), (100.0f64 * (1.0 - 0.7)) as usize);
}

#[test]
fn pyramid_four_layers_average_100_beta_20() {
    // Card 21: L = 4, average 100, beta 20, T large -> min 5, max 195. kvpress's steps are
    // floats (190 / 3) and each layer rounds half to even: [195, 132, 68, 5] (KVCache-Factory's
    // integer steps would give [195, 132, 69, 6]). kvpress's average is n (1 - ratio) with the
    // window inside it: n = 1000 at ratio 0.9 (99.99999999999997 in f64), window 4 <= min.
    let p = PyramidBudget::new(0.9, 4, 20.0).expect("valid");
    let (max, min) = p.range(1000).expect("feasible");
    assert!(
        (max - 195.0).abs() < 1e-9 && (min - 5.0).abs() < 1e-9,
        "{max} {min}"
    );
    let b: Vec<usize> = (0..4).map(|l| p.layer_budget(1000, l, 4)).collect();
    assert_eq!(b, [195, 132, 68, 5]);
    assert_eq!(b.iter().sum::<usize>(), 400, "sum = L * average");
    // Through the allocator: every head of a layer gets the layer's budget.
    let held = [1000, 1000];
    let scores = vec![vec![0.0; 1000]; 2];
    let ctx = BudgetContext {
        layer: 1,
        num_layers: 4,
        kv_heads: 2,
        held: &held,
        scores: &scores,
    };
    assert_eq!(p.allocate(&ctx).expect("allocate"), [132, 132]);
}

#[test]
fn pyramid_clamps_at_the_prompt_and_falls_back_when_infeasible() {
    // max >= n - w: max = n - w, min = 2 avg - max. n = 100, ratio 0.2 (avg 80), w = 8:
    // max 152 -> 92, min 68; 3 layers -> [92, 80, 68].
    let p = PyramidBudget::new(0.2, 8, 20.0).expect("valid");
    let b: Vec<usize> = (0..3).map(|l| p.layer_budget(100, l, 3)).collect();
    assert_eq!(b, [92, 80, 68]);
    // SmolLM2 on the yardstick (n = 3072, window 64, 30 layers): ratio 0.5 is a pyramid from
    // 2995 down to 77; at 0.75 min = 38.4 < window 64, so kvpress falls back to SnapKV's
    // round(n (1 - ratio)) in every layer.
    let half = PyramidBudget::new(0.5, 64, 20.0).expect("valid");
    assert_eq!(half.layer_budget(3072, 0, 30), 2995);
    assert_eq!(half.layer_budget(3072, 29, 30), 77);
    let sum: usize = (0..30).map(|l| half.layer_budget(3072, l, 30)).sum();
    assert!(sum.abs_diff(30 * 1536) <= 15, "sum {sum}");
    for ratio in [0.75, 0.9] {
        let q = PyramidBudget::new(ratio, 64, 20.0).expect("valid");
        assert!(q.range(3072).is_none(), "{ratio} is infeasible");
        for l in [0, 13, 29] {
            assert_eq!(q.layer_budget(3072, l, 30), kept_for(3072, ratio));
        }
    }
    // The fallback rounds (kvpress's `round`, half to even) where the uniform budget floors.
    let r = PyramidBudget::new(0.35, 64, 20.0).expect("valid");
    assert_eq!(r.layer_budget(10, 0, 4), 6, "round(6.5) = 6 (half to even)");
    let r = PyramidBudget::new(0.25, 64, 20.0).expect("valid");
    assert_eq!(r.layer_budget(10, 0, 4), 8, "round(7.5) = 8");
    assert_eq!(kept_for(10, 0.25), 7);
    // One layer: kvpress divides by zero; we take the fallback.
    assert_eq!(half.layer_budget(3072, 0, 1), 1536);
    assert!(PyramidBudget::new(0.5, 64, 0.5).is_err(), "beta < 1");
}

#[test]
fn adakv_two_heads_concentrated_scores_take_the_budget() {
    // Card 22: 2 heads, B = 2 (n = 4 at ratio 0.5), head 0 [0.9, 0.8, 0.7, 0.1], head 1
    // [0.05, 0.04, 0.03, 0.0]. alpha 0: the global top 4 are all in head 0 -> [4, 0].
    // alpha 0.5 (kvpress: protect floor(0.5 * 2) = 1 per head) -> [3, 1], as FFY0's
    // round(0.5 * count + 0.5 * B).
    let h0 = [0.9f32, 0.8, 0.7, 0.1];
    let h1 = [0.05f32, 0.04, 0.03, 0.0];
    let a0 = AdaKvBudget::new(0.5, 0.0).expect("valid");
    assert_eq!(a0.head_budgets(&[&h0, &h1]), [4, 0]);
    let a5 = AdaKvBudget::new(0.5, 0.5).expect("valid");
    assert_eq!(a5.head_budgets(&[&h0, &h1]), [3, 1]);
    // kvpress's default alpha 0.2 protects floor(0.4) = 0 here.
    let a2 = AdaKvBudget::new(0.5, 0.2).expect("valid");
    assert_eq!(a2.head_budgets(&[&h0, &h1]), [4, 0]);
    // Through the allocator, per sequence: a batch of two sequences with swapped heads.
    let held = [4, 4, 4, 4];
    let scores = vec![h0.to_vec(), h1.to_vec(), h1.to_vec(), h0.to_vec()];
    let ctx = BudgetContext {
        layer: 0,
        num_layers: 1,
        kv_heads: 2,
        held: &held,
        scores: &scores,
    };
    assert_eq!(a5.allocate(&ctx).expect("allocate"), [3, 1, 1, 3]);
    // The kept sets are each head's best: head 1 keeps its protected 0.05.
    assert_eq!(top_k_sorted(&h1, 1), [0]);
    assert!(AdaKvBudget::new(0.5, 1.5).is_err());
}

#[test]
fn h2o_hand_case_keeps_the_heavy_hitter_and_the_newest() {
    // Card 16: one head, token 0 gets 0.5 from every later query; hh = 1, recent = 1.
    // Step t appends token t, its query's row is added, then H2O evicts to hh + recent.
    let rows: [&[f32]; 4] = [
        &[1.0],           // token 0 attends itself
        &[0.5, 0.5],      // tokens 0, 1
        &[0.5, 0.2, 0.3], // tokens 0, 1, 2
        &[0.5, 0.1, 0.4], // held after step 3: tokens 0, 2; then 3
    ];
    let mut h = HeavyHitters::new(1);
    let mut held: Vec<u32> = Vec::new();
    for (t, row) in rows.iter().enumerate() {
        h.push(0, 1);
        held.push(t as u32);
        h.observe(0, row);
        let keep = h.keep(0, 1, 1);
        h.retain(std::slice::from_ref(&keep));
        held = keep.iter().map(|&j| held[j]).collect();
        if t == 2 {
            assert_eq!(held, [0, 2], "step 3: token 0 (2.0) beats token 1 (0.7)");
        }
    }
    assert_eq!(held, [0, 3]);
    // Token 0's score is the exact running sum 1 + 0.5 + 0.5 + 0.5; token 3 has its own 0.4.
    assert_eq!(h.scores()[0], [2.5, 0.4]);
}
