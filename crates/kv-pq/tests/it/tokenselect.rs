//! TokenSelect: exactness at full budget, soft-vote selection, the selection cache, config.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KeyPositions, KvBlock, KvCache, KvError, KvShape, Query, StatsRequest,
    StorageDtype, memory_matches_buffers, reference_attention,
};
use kv_pq::{Budget, TokenSelectCache, TokenSelectConfig};
use kv_testkit::{assert_close, assert_close_slices, seeded_tensor, test_device, to_vec};

use crate::common::subset_attention;

fn shape() -> KvShape {
    KvShape::new(2, 2, 4, 8).expect("shape")
}

fn block(s: KvShape, n: usize, start: u32, seed: u64, device: &Device) -> KvBlock {
    let dims = [s.batch(), s.kv_heads(), n, s.head_dim()];
    KvBlock::contiguous(
        seeded_tensor(dims, seed, 1.0, device),
        seeded_tensor(dims, seed + 1, 1.0, device),
        start,
    )
    .expect("block")
}

fn query_from(q: Tensor<4>, pos: u32) -> Query {
    Query::contiguous(q, pos).expect("query")
}

fn filled(cfg: TokenSelectConfig, len: usize) -> TokenSelectCache {
    let device = test_device();
    let mut c = cfg.init(&device).expect("init");
    c.append(block(cfg.shape, len, 0, 1, &device))
        .expect("prefill");
    c.end_prefill().expect("end_prefill");
    c
}

kv_testkit::kv_cache_contract!(contract, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        TokenSelectConfig::new(shape(), Budget::Tokens(16))
            .init(d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(contract_f16_mqa, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        TokenSelectConfig::new(
            KvShape::new(1, 1, 3, 4).expect("shape"),
            Budget::Fraction(1.0),
        )
        .with_windows(0, 0)
        .with_dtype(StorageDtype::F16)
        .init(d)
        .expect("init"),
    )
});

#[test]
fn top_k_covering_the_cache_equals_dense_attention_exactly() {
    let device = test_device();
    let s = shape();
    let len = 20;
    let mut ts = filled(
        TokenSelectConfig::new(s, Budget::Tokens(len)).with_windows(2, 2),
        len,
    );
    let mut dense = DenseCacheConfig::new(s).init(&device).expect("dense");
    dense.append(block(s, len, 0, 1, &device)).expect("append");
    let q = query_from(seeded_tensor([2, 4, 1, 8], 5, 1.0, &device), len as u32 - 1);
    assert!(ts.selected_slots(&q).expect("slots").is_none());
    let a = ts.attend(&q, StatsRequest::NONE).expect("attend").output;
    let b = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_eq!(to_vec(&a), to_vec(&b));
    let v = ts.view();
    let (want, _) = reference_attention(
        q.tensor().clone(),
        v.keys,
        v.values,
        q.positions(),
        KeyPositions::PerHead(&v.positions),
        None,
        StatsRequest::NONE,
    );
    assert_eq!(to_vec(&a), to_vec(&want));
    assert_eq!(ts.reuse_counts(), (0, 0));
}

/// Host soft votes: per query head, softmax of raw `q·k` over `cand`, summed over heads.
fn host_votes(q: &[f32], k: &[f32], s: KvShape, b: usize, len: usize, cand: &[usize]) -> Vec<f64> {
    let (qh, kvh, d) = (s.q_heads(), s.kv_heads(), s.head_dim());
    let mut votes = vec![0.0f64; len];
    for h in 0..qh {
        let kh = h / s.group();
        let qo = (b * qh + h) * d;
        let sc: Vec<f64> = cand
            .iter()
            .map(|&j| {
                let ko = ((b * kvh + kh) * len + j) * d;
                (0..d)
                    .map(|c| f64::from(q[qo + c]) * f64::from(k[ko + c]))
                    .sum()
            })
            .collect();
        let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
        for (&j, x) in cand.iter().zip(&sc) {
            votes[j] += (x - m).exp() / z;
        }
    }
    votes
}

#[test]
fn selection_is_sinks_recent_and_the_best_soft_votes() {
    let device = test_device();
    let s = shape();
    let len = 30;
    let (sinks, recent, top_k) = (2, 3, 5);
    let mut c = filled(
        TokenSelectConfig::new(s, Budget::Tokens(top_k)).with_windows(sinks, recent),
        len,
    );
    let q = query_from(seeded_tensor([2, 4, 1, 8], 7, 2.0, &device), len as u32 - 1);
    let slots = c.selected_slots(&q).expect("slots").expect("selects");
    let view = c.view();
    let (qv, kv) = (to_vec(q.tensor()), to_vec(&view.keys));
    let cand: Vec<usize> = (sinks..len - recent).collect();
    for (b, row) in slots.iter().enumerate() {
        let votes = host_votes(&qv, &kv, s, b, len, &cand);
        let mut order = cand.clone();
        order.sort_by(|&x, &y| votes[y].total_cmp(&votes[x]));
        let mut want: Vec<usize> = (0..sinks).chain(len - recent..len).collect();
        want.extend_from_slice(&order[..top_k]);
        want.sort_unstable();
        assert_eq!(row, &want, "sequence {b}");
    }
    let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    // Every head of a sequence attends to the sequence's selection.
    let per_head: Vec<Vec<usize>> = slots
        .iter()
        .flat_map(|row| std::iter::repeat_n(row.clone(), s.q_heads()))
        .collect();
    assert_close_slices(
        &to_vec(&got),
        &subset_attention(&view, &q, &per_head),
        1e-5,
        1e-4,
    );
    let (lse_out, _) = c.attend_lse(&q).expect("lse");
    assert_close(&lse_out, &got, 1e-6, 1e-6);
    memory_matches_buffers(&c).expect("memory");
}

#[test]
fn soft_vote_differs_from_a_hard_vote() {
    // One KV head, two query heads, head_dim 2, three candidates (no sinks or recent tokens
    // besides the query's own position). Head A is almost indifferent with a slight
    // preference for token 0; head B strongly prefers token 1. A per-head argmax vote ties
    // 0 and 1; the soft vote picks 1.
    let device = test_device();
    let s = KvShape::new(1, 1, 2, 2).expect("shape");
    let keys = Tensor::<1>::from_floats([1.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0], &device)
        .reshape([1, 1, 4, 2]);
    let mut c = TokenSelectConfig::new(s, Budget::Tokens(1))
        .with_windows(0, 1)
        .init(&device)
        .expect("init");
    c.append(KvBlock::contiguous(keys.clone(), keys, 0).expect("block"))
        .expect("append");
    let q = Tensor::<1>::from_floats([0.05, 0.0, 0.0, 4.0], &device).reshape([1, 2, 1, 2]);
    let slots = c
        .selected_slots(&query_from(q, 3))
        .expect("slots")
        .expect("selects");
    assert_eq!(slots, vec![vec![1, 3]]);
}

#[test]
fn the_selection_cache_reuses_similar_queries_only() {
    let device = test_device();
    let s = shape();
    let len = 40;
    let mut c = filled(
        TokenSelectConfig::new(s, Budget::Tokens(4)).with_windows(2, 2),
        len,
    );
    let q1 = seeded_tensor([2, 4, 1, 8], 21, 1.0, &device);
    let first = c
        .selected_slots(&query_from(q1.clone(), 39))
        .expect("slots")
        .expect("selects");
    assert_eq!(c.reuse_counts(), (0, 0), "selected_slots changes nothing");
    c.attend(&query_from(q1.clone(), 39), StatsRequest::NONE)
        .expect("attend");
    assert_eq!(c.reuse_counts(), (0, 2), "one fresh selection per sequence");
    // The same query again: reused, same slots.
    let q = query_from(q1.clone(), 39);
    assert_eq!(
        c.selected_slots(&q).expect("slots").expect("selects"),
        first
    );
    c.attend(&q, StatsRequest::NONE).expect("attend");
    assert_eq!(c.reuse_counts(), (2, 2));
    // One more token; a scaled copy of the query (cosine 1): the remembered top-k slots with
    // the sinks and the new recent window.
    c.append(block(s, 1, 40, 77, &device)).expect("append");
    let q = query_from(q1.clone().mul_scalar(3.0), 40);
    let reused = c.selected_slots(&q).expect("slots").expect("selects");
    for (row, old) in reused.iter().zip(&first) {
        let mut want: Vec<usize> = old
            .iter()
            .copied()
            .filter(|i| (2..38).contains(i))
            .chain([0, 1, 39, 40])
            .collect();
        want.sort_unstable();
        assert_eq!(row, &want);
    }
    let out = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_eq!(c.reuse_counts(), (4, 2));
    let view = c.view();
    let per_head: Vec<Vec<usize>> = reused
        .iter()
        .flat_map(|row| std::iter::repeat_n(row.clone(), s.q_heads()))
        .collect();
    assert_close_slices(
        &to_vec(&out),
        &subset_attention(&view, &q, &per_head),
        1e-5,
        1e-4,
    );
    // The opposite query (cosine −1) is scored afresh.
    c.attend(&query_from(q1.clone().neg(), 40), StatsRequest::NONE)
        .expect("attend");
    assert_eq!(c.reuse_counts(), (4, 4));
    memory_matches_buffers(&c).expect("memory");
    // A threshold above 1 never reuses.
    let mut never = filled(
        TokenSelectConfig::new(s, Budget::Tokens(4))
            .with_windows(2, 2)
            .with_similarity(1.5),
        len,
    );
    for _ in 0..2 {
        never
            .attend(&query_from(q1.clone(), 39), StatsRequest::NONE)
            .expect("attend");
    }
    assert_eq!(never.reuse_counts(), (0, 4));
    never.reset();
    assert_eq!(never.reuse_counts(), (0, 0));
    memory_matches_buffers(&never).expect("memory");
}

#[test]
fn bad_configs_are_clear_errors_and_large_budgets_are_dense() {
    let device = test_device();
    let s = shape();
    let field = |cfg: TokenSelectConfig| match cfg.init(&device) {
        Err(KvError::InvalidConfig { field, .. }) => field,
        Err(e) => panic!("unexpected {e:?}"),
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(field(TokenSelectConfig::new(s, Budget::Tokens(0))), "top_k");
    assert_eq!(
        field(TokenSelectConfig::new(s, Budget::Fraction(1.5))),
        "top_k"
    );
    assert_eq!(
        field(TokenSelectConfig::new(s, Budget::Tokens(4)).with_similarity(f64::NAN)),
        "similarity"
    );
    assert_eq!(
        field(TokenSelectConfig::new(s, Budget::Tokens(4)).with_similarity(-2.0)),
        "similarity"
    );
    assert!(matches!(
        TokenSelectConfig::from_params(s, [("sinks", "4")]),
        Err(KvError::InvalidConfig { field: "top_k", .. })
    ));
    assert!(matches!(
        TokenSelectConfig::from_params(s, [("top_k", "4"), ("kernel", "3")]),
        Err(KvError::InvalidConfig {
            field: "params",
            ..
        })
    ));
    let cfg = TokenSelectConfig::from_params(
        s,
        [("top_k", "0.25"), ("similarity", "0.8"), ("recent", "16")],
    )
    .expect("params");
    assert_eq!(
        (cfg.top_k, cfg.similarity, cfg.sinks, cfg.recent),
        (Budget::Fraction(0.25), 0.8, 128, 16)
    );
    let json = serde_json::to_string(&cfg).expect("json");
    assert_eq!(
        serde_json::from_str::<TokenSelectConfig>(&json).expect("back"),
        cfg
    );
    // A budget above the length is not an error: the query attends to everything.
    let mut c = filled(TokenSelectConfig::new(s, Budget::Tokens(4096)), 10);
    let q = query_from(seeded_tensor([2, 4, 1, 8], 3, 1.0, &device), 9);
    assert!(c.selected_slots(&q).expect("slots").is_none());
    c.attend(&q, StatsRequest::NONE).expect("attend");
}
