//! PQCache: exactness at full budget, the selection path, training, tiers, config.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvError, KvShape, Query, StatsRequest, StorageDtype,
    memory_matches_buffers,
};
use kv_pq::{Budget, PqCache, PqCacheConfig};
use kv_testkit::{
    assert_close, assert_close_slices, seeded_tensor, tensor_from, test_device, to_vec,
};

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

fn query(s: KvShape, pos: u32, seed: u64, device: &Device) -> Query {
    let q = seeded_tensor([s.batch(), s.q_heads(), 1, s.head_dim()], seed, 1.0, device);
    Query::contiguous(q, pos).expect("query")
}

fn small(s: KvShape, top_k: Budget) -> PqCacheConfig {
    PqCacheConfig::new(s, top_k)
        .with_pq(2, 2)
        .with_windows(1, 2)
}

fn filled(cfg: PqCacheConfig, len: usize) -> PqCache {
    let device = test_device();
    let mut c = cfg.init(&device).expect("init");
    c.append(block(cfg.shape, len - 1, 0, 1, &device))
        .expect("prefill");
    c.end_prefill().expect("end_prefill");
    c.append(block(cfg.shape, 1, len as u32 - 1, 9, &device))
        .expect("decode");
    c
}

kv_testkit::kv_cache_contract!(contract, |d: &Device| -> Box<dyn KvCache> {
    Box::new(small(shape(), Budget::Tokens(16)).init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(contract_f16_mqa, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        PqCacheConfig::new(
            KvShape::new(1, 1, 2, 4).expect("shape"),
            Budget::Fraction(1.0),
        )
        .with_pq(1, 1)
        .with_windows(0, 0)
        .with_dtype(StorageDtype::F16)
        .init(d)
        .expect("init"),
    )
});

#[test]
fn top_k_at_least_the_cache_size_reproduces_dense_attention_exactly() {
    let device = test_device();
    let s = shape();
    for top_k in [
        Budget::Tokens(30),
        Budget::Tokens(1000),
        Budget::Fraction(1.0),
    ] {
        let mut pq = filled(small(s, top_k), 30);
        assert!(pq.is_trained());
        let mut dense = DenseCacheConfig::new(s).init(&device).expect("dense");
        dense.append(block(s, 29, 0, 1, &device)).expect("append");
        dense.append(block(s, 1, 29, 9, &device)).expect("append");
        let q = query(s, 29, 5, &device);
        assert!(pq.selected_slots(&q).expect("slots").is_none());
        let a = pq.attend(&q, StatsRequest::NONE).expect("attend").output;
        let b = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
        assert_eq!(to_vec(&a), to_vec(&b), "{top_k:?}");
    }
}

#[test]
fn selection_keeps_sinks_and_recent_and_attends_exactly_to_the_selection() {
    let device = test_device();
    let s = shape();
    let len = 30;
    let mut c = filled(small(s, Budget::Tokens(5)), len);
    let q = query(s, len as u32 - 1, 5, &device);
    let slots = c.selected_slots(&q).expect("slots").expect("selects");
    let scores = to_vec(&c.approximate_scores(&q).expect("scores").expect("trained"));
    for (r, row) in slots.iter().enumerate() {
        assert_eq!(row.len(), 1 + 2 + 5, "row {r}: {row:?}");
        assert!(
            row.starts_with(&[0]) && row.ends_with(&[28, 29]),
            "row {r}: {row:?}"
        );
        // The other five are the best approximate scores among slots 1..28.
        let sc = &scores[r * len..(r + 1) * len];
        let mut middle: Vec<usize> = (1..28).collect();
        middle.sort_by(|&a, &b| sc[b].total_cmp(&sc[a]));
        let mut want = middle[..5].to_vec();
        want.sort_unstable();
        assert_eq!(&row[1..6], &want[..], "row {r}");
    }
    let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_close_slices(
        &to_vec(&got),
        &subset_attention(&c.view(), &q, &slots),
        1e-5,
        1e-4,
    );
    let (lse_out, _) = c.attend_lse(&q).expect("lse");
    assert_eq!(to_vec(&lse_out), to_vec(&got));
    // Prefill-style queries (several tokens) stay dense.
    let q4 = Query::contiguous(seeded_tensor([2, 4, 3, 8], 6, 1.0, &device), 27).expect("q");
    let got = c.attend(&q4, StatsRequest::NONE).expect("attend").output;
    assert_close(
        &got,
        &c.view().attend_reference(&q4, StatsRequest::NONE).output,
        1e-5,
        1e-4,
    );
}

#[test]
fn one_subspace_with_a_centroid_per_distinct_key_reproduces_keys_and_scores() {
    let device = test_device();
    let s = KvShape::new(1, 2, 2, 4).expect("shape");
    // 4 distinct keys per head, repeated: 2 bits, one subspace.
    let distinct = kv_testkit::seeded_data(2 * 4 * 4, 8, 1.0);
    let mut data = Vec::new();
    for h in 0..2 {
        for t in 0..12 {
            let i = (t * 3 + h) % 4;
            data.extend_from_slice(&distinct[(h * 4 + i) * 4..(h * 4 + i + 1) * 4]);
        }
    }
    let k = tensor_from(data.clone(), [1, 2, 12, 4], &device);
    let mut c = PqCacheConfig::new(s, Budget::Tokens(1))
        .with_pq(1, 2)
        .with_windows(0, 1)
        .init(&device)
        .expect("init");
    c.append(KvBlock::contiguous(k.clone(), k, 0).expect("block"))
        .expect("append");
    c.end_prefill().expect("train");
    assert_eq!(to_vec(&c.reconstructed_keys().expect("trained")), data);
    let q = query(s, 11, 3, &device);
    let approx = c.approximate_scores(&q).expect("scores").expect("trained");
    let exact = q
        .tensor()
        .clone()
        .reshape([1, 2, 1, 4])
        .matmul(c.view().keys.swap_dims(2, 3));
    assert_close(&approx, &exact, 1e-6, 1e-6);
}

#[test]
fn too_few_tokens_to_train_is_an_error_that_changes_nothing() {
    let device = test_device();
    let s = shape();
    let mut c = PqCacheConfig::new(s, Budget::Tokens(4))
        .init(&device)
        .expect("init"); // 64 centroids
    c.append(block(s, 20, 0, 1, &device)).expect("append");
    let before = (to_vec(&c.view().keys), c.memory());
    match c.end_prefill() {
        Err(KvError::InvalidConfig {
            field: "bits",
            reason,
        }) => {
            assert!(reason.contains("64 centroids"), "{reason}");
        }
        r => panic!("unexpected {r:?}"),
    }
    assert!(!c.is_trained());
    assert_eq!((to_vec(&c.view().keys), c.memory()), before);
    // Still a working (dense) cache.
    c.append(block(s, 1, 20, 5, &device)).expect("append");
    let q = query(s, 20, 2, &device);
    let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_close(
        &got,
        &c.view().attend_reference(&q, StatsRequest::NONE).output,
        1e-6,
        1e-5,
    );
}

#[test]
fn tiers_add_up_and_match_the_buffers() {
    let s = shape();
    let c = filled(small(s, Budget::Tokens(5)), 30);
    memory_matches_buffers(&c).expect("memory");
    let t = c.tiers();
    assert_eq!(t.total_bytes(), c.memory().stored_bytes());
    assert_eq!(t.code_bytes, s.streams() * 30 * 2); // one byte per code, 2 subspaces
    assert_eq!(t.codebook_bytes, s.streams() * 2 * 4 * 4 * 4); // m * K * d/m * fp32
    assert_eq!(t.fast_tier_bytes(), t.code_bytes + t.codebook_bytes);
    assert!(t.full_kv_bytes >= 2 * s.streams() * 30 * 8 * 4);
    assert_eq!(c.codes().expect("codes").dims(), [s.streams(), 30, 2]);
}

#[test]
fn bad_configs_are_clear_errors() {
    let device = test_device();
    let s = shape();
    let field = |cfg: PqCacheConfig| match cfg.init(&device) {
        Err(KvError::InvalidConfig { field, .. }) => field,
        Err(e) => panic!("unexpected {e:?}"),
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(
        field(small(s, Budget::Tokens(4)).with_pq(3, 2)),
        "subspaces"
    );
    assert_eq!(field(small(s, Budget::Tokens(4)).with_pq(2, 0)), "bits");
    assert_eq!(field(small(s, Budget::Tokens(4)).with_pq(2, 9)), "bits");
    assert_eq!(field(small(s, Budget::Tokens(0))), "top_k");
    assert_eq!(field(small(s, Budget::Fraction(0.0))), "top_k");
    assert_eq!(
        field(small(s, Budget::Tokens(4)).with_kmeans(5, -1.0, 0)),
        "tol"
    );
    assert!(matches!(
        PqCacheConfig::from_params(s, [("bits", "4")]),
        Err(KvError::InvalidConfig { field: "top_k", .. })
    ));
    assert!(matches!(
        PqCacheConfig::from_params(s, [("top_k", "x")]),
        Err(KvError::InvalidConfig { field: "top_k", .. })
    ));
    assert!(matches!(
        PqCacheConfig::from_params(s, [("top_k", "8"), ("m", "2")]),
        Err(KvError::InvalidConfig {
            field: "params",
            ..
        })
    ));
    let cfg = PqCacheConfig::from_params(
        s,
        [
            ("top_k", "0.2"),
            ("subspaces", "4"),
            ("bits", "3"),
            ("sinks", "4"),
            ("recent", "8"),
        ],
    )
    .expect("params");
    assert_eq!(cfg.top_k, Budget::Fraction(0.2));
    assert_eq!(
        (cfg.subspaces, cfg.bits, cfg.sinks, cfg.recent),
        (4, 3, 4, 8)
    );
    let json = serde_json::to_string(&cfg).expect("json");
    assert_eq!(
        serde_json::from_str::<PqCacheConfig>(&json).expect("back"),
        cfg
    );
}

#[test]
fn padding_is_never_selected() {
    let device = test_device();
    let s = KvShape::new(2, 1, 2, 4).expect("shape");
    let mut c = PqCacheConfig::new(s, Budget::Tokens(2))
        .with_pq(2, 1)
        .with_windows(1, 1)
        .init(&device)
        .expect("init");
    let k = seeded_tensor([2, 1, 12, 4], 3, 1.0, &device);
    let mut pos: Vec<u32> = (0..12).collect();
    pos.extend([u32::MAX; 4]);
    pos.extend(0..8);
    c.append(KvBlock::new(k.clone(), k, pos).expect("block"))
        .expect("append");
    c.end_prefill().expect("train");
    let q = Query::new(seeded_tensor([2, 2, 1, 4], 4, 1.0, &device), vec![11, 7]).expect("q");
    let slots = c.selected_slots(&q).expect("slots").expect("selects");
    assert!(slots.iter().all(|r| r.len() == 4), "{slots:?}");
    assert!(
        slots[2].iter().chain(&slots[3]).all(|&j| j >= 4),
        "{slots:?}"
    );
    assert!(
        slots[2].starts_with(&[4]) && slots[2].ends_with(&[11]),
        "{slots:?}"
    );
    let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_close_slices(
        &to_vec(&got),
        &subset_attention(&c.view(), &q, &slots),
        1e-5,
        1e-4,
    );
}

#[test]
fn budgets_parse_tokens_and_fractions() {
    assert_eq!(
        Budget::parse("top_k", "256").expect("tokens"),
        Budget::Tokens(256)
    );
    assert_eq!(
        Budget::parse("top_k", "0.5").expect("fraction"),
        Budget::Fraction(0.5)
    );
    assert_eq!(Budget::Fraction(0.25).resolve(10), 3);
    for bad in ["0", "0.0", "1.5", "-3", "x"] {
        assert!(
            matches!(
                Budget::parse("top_k", bad),
                Err(KvError::InvalidConfig { field: "top_k", .. })
            ),
            "{bad}"
        );
    }
}
