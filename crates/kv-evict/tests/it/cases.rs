//! The catalog's hand-computed cases (cards 17, 18, 20) and the GQA reductions.

use burn::prelude::*;
use kv_evict::score::{avg_pool_include_pad, snapkv, streaming_llm, to_host, tova};
use kv_evict::{GqaReduce, kept_for, top_k_sorted};
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
