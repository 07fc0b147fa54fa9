//! The reference attention against the naive host oracle and a hand-computed case.

use burn::prelude::*;
use kv_core::{KeyPositions, PAD, StatsRequest, contiguous_positions, reference_attention};
use kv_testkit::strategies::attention_case;
use kv_testkit::{
    HostTensor, assert_close_slices, naive_attention, seeded_tensor, tensor_from, test_device,
    to_vec,
};
use proptest::prelude::*;

#[test]
fn hand_computed_single_query() {
    // q = [1, 0], keys [1, 0] and [0, 1], values [1, 2] and [3, 4], head_dim 2:
    // scores [1/sqrt2, 0], weights [e^a, 1] / (e^a + 1) with a = 1/sqrt2.
    let d = test_device();
    let q = tensor_from(vec![1.0, 0.0], [1, 1, 1, 2], &d);
    let k = tensor_from(vec![1.0, 0.0, 0.0, 1.0], [1, 1, 2, 2], &d);
    let v = tensor_from(vec![1.0, 2.0, 3.0, 4.0], [1, 1, 2, 2], &d);
    let (out, stats) = reference_attention(
        q,
        k,
        v,
        &[1],
        KeyPositions::PerSequence(&[0, 1]),
        None,
        StatsRequest {
            column_sums: true,
            last_row: true,
        },
    );
    let a = (1.0f64 / 2f64.sqrt()).exp();
    let w0 = a / (a + 1.0);
    let w1 = 1.0 / (a + 1.0);
    let want = [w0 + 3.0 * w1, 2.0 * w0 + 4.0 * w1].map(|x| x as f32);
    assert_close_slices(&to_vec(&out), &want, 1e-6, 1e-6);
    let col = to_vec(&stats.column_sums.expect("requested"));
    assert_close_slices(&col, &[w0 as f32, w1 as f32], 1e-6, 1e-6);
    assert_close_slices(&to_vec(&stats.last_row.expect("requested")), &col, 0.0, 0.0);
}

#[test]
fn query_that_sees_nothing_outputs_zero() {
    let d = test_device();
    let q = seeded_tensor([1, 2, 2, 4], 1, 1.0, &d);
    let k = seeded_tensor([1, 1, 3, 4], 2, 1.0, &d);
    let (out, _) = reference_attention(
        q,
        k.clone(),
        k,
        &[PAD, 0],
        KeyPositions::PerSequence(&[5, 6, 7]),
        None,
        StatsRequest::NONE,
    );
    assert!(
        to_vec(&out).iter().all(|&x| x == 0.0),
        "no visible key -> zero output, no NaN"
    );
}

#[test]
fn long_query_is_chunked_consistently() {
    // 600 query rows exceed the internal 512-row chunk: results must equal the oracle.
    let d = test_device();
    let (n, t) = (600, 600);
    let q = seeded_tensor([1, 2, n, 4], 3, 1.0, &d);
    let k = seeded_tensor([1, 1, t, 4], 4, 1.0, &d);
    let v = seeded_tensor([1, 1, t, 4], 5, 1.0, &d);
    let qp = contiguous_positions(1, n, 0);
    let (out, stats) = reference_attention(
        q.clone(),
        k.clone(),
        v.clone(),
        &qp,
        KeyPositions::PerSequence(&qp),
        None,
        StatsRequest::COLUMN_SUMS,
    );
    let kp2: Vec<u32> = qp.clone();
    let want = naive_attention(
        &HostTensor::from_tensor(&q),
        &HostTensor::from_tensor(&k),
        &HostTensor::from_tensor(&v),
        &qp,
        &kp2,
    );
    assert_close_slices(&to_vec(&out), &want.data, 1e-5, 1e-4);
    // Column sums over all queries add up to the number of query rows per head.
    let col = to_vec(&stats.column_sums.expect("requested"));
    let per_head: f32 = col[..t].iter().sum();
    assert!(
        (per_head - n as f32).abs() < 1e-2,
        "column sums total {per_head}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Reference attention equals explicit-softmax attention with GQA, causal offsets,
    /// q_len > 1, per-head key positions and padding slots.
    #[test]
    fn reference_equals_naive(case in attention_case(), pad_every in 0usize..5) {
        let d = test_device();
        let s = case.shape;
        let (b, kvh, qh, hd, t, n) =
            (s.batch(), s.kv_heads(), s.q_heads(), s.head_dim(), case.keys, case.q_len);
        let q = seeded_tensor([b, qh, n, hd], case.seed, 1.5, &d);
        let k = seeded_tensor([b, kvh, t, hd], case.seed ^ 1, 1.5, &d);
        let v = seeded_tensor([b, kvh, t, hd], case.seed ^ 2, 1.5, &d);
        let q_pos = contiguous_positions(b, n, case.q_start);
        // Per-head key positions 0..t with every `pad_every`-th slot of odd heads padded.
        let mut k_pos = Vec::with_capacity(b * kvh * t);
        for _ in 0..b {
            for h in 0..kvh {
                for j in 0..t {
                    let pad = pad_every > 0 && h % 2 == 1 && j % pad_every == 0;
                    k_pos.push(if pad { PAD } else { j as u32 });
                }
            }
        }
        let stats = StatsRequest { column_sums: true, last_row: true };
        let (out, st) = reference_attention(
            q.clone(), k.clone(), v.clone(), &q_pos, KeyPositions::PerHead(&k_pos), None, stats,
        );
        let want = naive_attention(
            &HostTensor::from_tensor(&q), &HostTensor::from_tensor(&k), &HostTensor::from_tensor(&v),
            &q_pos, &k_pos,
        );
        assert_close_slices(&to_vec(&out), &want.data, 1e-5, 1e-4);
        // Column sums: every visible query row contributes probability 1 in total.
        let col = to_vec(&st.column_sums.expect("requested"));
        let g = qh / kvh;
        for bi in 0..b {
            for h in 0..kvh {
                let visible_rows = (0..n).filter(|&i| {
                    let p = q_pos[bi * n + i];
                    (0..t).any(|j| { let kp = k_pos[(bi * kvh + h) * t + j]; kp != PAD && kp <= p })
                }).count();
                for j in 0..g {
                    let row = &col[((bi * kvh + h) * g + j) * t..][..t];
                    let total: f32 = row.iter().sum();
                    prop_assert!((total - visible_rows as f32).abs() < 1e-3);
                }
            }
        }
        prop_assert_eq!(st.last_row.expect("requested").dims(), [b, kvh, g, t]);
    }

    /// Per-sequence positions are the same as the per-head form repeated over heads.
    #[test]
    fn per_sequence_equals_per_head(case in attention_case()) {
        let d = test_device();
        let s = case.shape;
        let (b, kvh, qh, hd, t, n) =
            (s.batch(), s.kv_heads(), s.q_heads(), s.head_dim(), case.keys, case.q_len);
        let q = seeded_tensor([b, qh, n, hd], case.seed, 1.0, &d);
        let k = seeded_tensor([b, kvh, t, hd], case.seed ^ 3, 1.0, &d);
        let q_pos = contiguous_positions(b, n, case.q_start);
        let kp = contiguous_positions(b, t, 0);
        let kph: Vec<u32> = (0..b).flat_map(|_| (0..kvh).flat_map(|_| 0..t as u32)).collect();
        let run = |p: KeyPositions<'_>| {
            to_vec(&reference_attention(q.clone(), k.clone(), k.clone(), &q_pos, p, None, StatsRequest::NONE).0)
        };
        prop_assert_eq!(run(KeyPositions::PerSequence(&kp)), run(KeyPositions::PerHead(&kph)));
    }
}

#[test]
fn scale_argument_is_used() {
    let d = test_device();
    let q = tensor_from(vec![1.0, 0.0], [1, 1, 1, 2], &d);
    let k = tensor_from(vec![1.0, 0.0, 0.0, 1.0], [1, 1, 2, 2], &d);
    let v = tensor_from(vec![1.0, 0.0, 0.0, 1.0], [1, 1, 2, 2], &d);
    let (out, _) = reference_attention(
        q,
        k,
        v,
        &[1],
        KeyPositions::PerSequence(&[0, 1]),
        Some(0.0),
        StatsRequest::NONE,
    );
    // Scale 0 makes every visible key equally likely.
    assert_close_slices(&to_vec(&out), &[0.5, 0.5], 1e-7, 0.0);
    let _: Tensor<4> = Tensor::zeros([1, 1, 1, 1], &d);
}

#[test]
fn log_sum_exp_of_hand_computed_case() {
    // Scores [1/sqrt2, 0] -> lse = ln(e^a + 1) with a = 1/sqrt2; a query seeing nothing: MIN.
    let d = test_device();
    let q = tensor_from(vec![1.0, 0.0, 1.0, 0.0], [1, 1, 2, 2], &d);
    let k = tensor_from(vec![1.0, 0.0, 0.0, 1.0], [1, 1, 2, 2], &d);
    let v = tensor_from(vec![1.0, 2.0, 3.0, 4.0], [1, 1, 2, 2], &d);
    let (_, lse) = kv_core::reference_attention_lse(
        q,
        k,
        v,
        &[1, PAD],
        KeyPositions::PerSequence(&[0, 1]),
        None,
    );
    assert_eq!(lse.dims(), [1, 1, 1, 2]);
    let got = to_vec(&lse);
    let a = 1.0f64 / 2f64.sqrt();
    assert_close_slices(&got[..1], &[(a.exp() + 1.0).ln() as f32], 1e-6, 1e-6);
    assert_eq!(got[1], f32::MIN);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Attention over a key set split in two, merged by log-sum-exp, equals attention over
    /// the whole set (GQA, causal positions, a part that some rows cannot see).
    #[test]
    fn merged_parts_equal_whole(seed in 0u64..1000, split in 1usize..7, n in 1usize..4) {
        let d = test_device();
        let (b, qh, kvh, t, hd) = (2, 4, 2, 7, 8);
        let q = seeded_tensor([b, qh, n, hd], seed, 1.0, &d);
        let k = seeded_tensor([b, kvh, t, hd], seed + 1, 1.0, &d);
        let v = seeded_tensor([b, kvh, t, hd], seed + 2, 1.0, &d);
        let kp = contiguous_positions(b, t, 0);
        // Queries at positions 2.. so the later part is partly invisible.
        let qp: Vec<u32> = (0..b).flat_map(|_| (0..n as u32).map(|i| i + 2)).collect();
        let (whole, whole_lse) = kv_core::reference_attention_lse(
            q.clone(), k.clone(), v.clone(), &qp, KeyPositions::PerSequence(&kp), None,
        );
        let part = |r: core::ops::Range<usize>| {
            let pos: Vec<u32> = (0..b).flat_map(|_| r.clone().map(|i| i as u32)).collect();
            kv_core::reference_attention_lse(
                q.clone(),
                k.clone().slice([0..b, 0..kvh, r.clone(), 0..hd]),
                v.clone().slice([0..b, 0..kvh, r.clone(), 0..hd]),
                &qp,
                KeyPositions::PerSequence(&pos),
                None,
            )
        };
        let (o1, l1) = part(0..split);
        let (o2, l2) = part(split..t);
        let (merged, lse) = kv_core::merge_attention(o1, l1, o2, l2);
        assert_close_slices(&to_vec(&merged), &to_vec(&whole), 1e-5, 1e-4);
        assert_close_slices(&to_vec(&lse), &to_vec(&whole_lse), 1e-5, 1e-5);
    }
}
