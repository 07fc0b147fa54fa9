//! Quest: the page bound, exactness at full budget, the selection path, memory, config.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvError, KvShape, Query, StatsRequest, StorageDtype,
    memory_matches_buffers,
};
use kv_pq::{Budget, QuestCache, QuestConfig};
use kv_testkit::{assert_close_slices, seeded_tensor, test_device, to_vec};
use proptest::prelude::*;

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

fn filled(cfg: QuestConfig, len: usize) -> QuestCache {
    let device = test_device();
    let mut c = cfg.init(&device).expect("init");
    c.append(block(cfg.shape, len - 1, 0, 1, &device))
        .expect("prefill");
    c.end_prefill().expect("end_prefill");
    c.append(block(cfg.shape, 1, len as u32 - 1, 9, &device))
        .expect("decode");
    c
}

kv_testkit::kv_cache_contract!(contract_f32, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        QuestConfig::new(shape(), Budget::Tokens(16))
            .with_page_size(4)
            .init(d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(contract_f16, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        QuestConfig::new(
            KvShape::new(1, 1, 3, 4).expect("shape"),
            Budget::Fraction(1.0),
        )
        .with_page_size(3)
        .with_dtype(StorageDtype::F16)
        .init(d)
        .expect("init"),
    )
});

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// `U_p ≥ q·k` for every key of page `p`, with equality for a page of one token.
    #[test]
    fn page_bound_is_an_upper_bound(
        s in kv_testkit::strategies::kv_shape(),
        len in 1usize..=30,
        page in 1usize..=6,
        q_len in 1usize..=2,
        seed in any::<u64>(),
    ) {
        let device = test_device();
        let cfg = QuestConfig::new(s, Budget::Tokens(page)).with_page_size(page);
        let mut c = cfg.init(&device).expect("init");
        // Two appends, so that a partial page is recomputed.
        let first = len.div_ceil(2);
        c.append(block(s, first, 0, seed, &device)).expect("append");
        if len > first {
            c.append(block(s, len - first, first as u32, seed ^ 7, &device)).expect("append");
        }
        let q = seeded_tensor([s.batch(), s.q_heads(), q_len, s.head_dim()], seed ^ 3, 2.0, &device);
        let q = Query::contiguous(q, len as u32).expect("query");
        let bounds = to_vec(&c.page_bounds(&q).expect("bounds").expect("held"));
        let view = c.view();
        let (k, qv) = (to_vec(&view.keys), to_vec(q.tensor()));
        let (d, g, pages) = (s.head_dim(), s.group(), c.pages());
        for b in 0..s.batch() {
            for hq in 0..s.q_heads() {
                let h = hq / g;
                for i in 0..q_len {
                    let qo = ((b * s.q_heads() + hq) * q_len + i) * d;
                    for j in 0..len {
                        let ko = ((b * s.kv_heads() + h) * len + j) * d;
                        let score: f32 = (0..d).map(|c| qv[qo + c] * k[ko + c]).sum();
                        let u = bounds[((b * s.q_heads() + hq) * q_len + i) * pages + j / page];
                        prop_assert!(score <= u + 1e-4 * (1.0 + u.abs()), "score {score} > bound {u}");
                        if page == 1 {
                            prop_assert!((score - u).abs() <= 1e-4 * (1.0 + u.abs()));
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn budget_at_least_the_cache_size_reproduces_dense_attention_exactly() {
    let device = test_device();
    let s = shape();
    for budget in [
        Budget::Tokens(23),
        Budget::Tokens(1000),
        Budget::Fraction(1.0),
    ] {
        let mut quest = filled(QuestConfig::new(s, budget).with_page_size(4), 23);
        let mut dense = DenseCacheConfig::new(s).init(&device).expect("dense");
        dense.append(block(s, 22, 0, 1, &device)).expect("append");
        dense.append(block(s, 1, 22, 9, &device)).expect("append");
        let q = query(s, 22, 5, &device);
        assert!(quest.selected_slots(&q).expect("slots").is_none());
        let a = quest.attend(&q, StatsRequest::NONE).expect("attend").output;
        let b = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
        assert_eq!(to_vec(&a), to_vec(&b), "{budget:?}");
    }
}

#[test]
fn selection_attends_exactly_to_whole_pages_including_the_current_one() {
    let device = test_device();
    let s = shape();
    let (page, len) = (4, 23);
    let mut c = filled(
        QuestConfig::new(s, Budget::Tokens(9)).with_page_size(page),
        len,
    );
    let q = query(s, len as u32 - 1, 5, &device);
    let slots = c.selected_slots(&q).expect("slots").expect("selects");
    assert_eq!(slots.len(), s.batch() * s.q_heads());
    let bounds = to_vec(&c.page_bounds(&q).expect("bounds").expect("held"));
    let pages = c.pages();
    for (r, row) in slots.iter().enumerate() {
        // Two pages (9 / 4): the last page (slots 20..23, partial) and the best other one.
        let chosen: Vec<usize> = row.iter().map(|&j| j / page).collect::<Vec<_>>();
        let mut distinct = chosen.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), 2, "row {r}: {row:?}");
        assert_eq!(distinct[1], pages - 1, "row {r} misses the current page");
        assert!(row.ends_with(&[20, 21, 22]));
        let other = distinct[0];
        assert_eq!(row.iter().filter(|&&j| j / page == other).count(), page);
        let ub = &bounds[r * pages..(r + 1) * pages - 1];
        let best = (0..pages - 1)
            .max_by(|&a, &b| ub[a].total_cmp(&ub[b]))
            .expect("pages");
        assert_eq!(other, best, "row {r}: not the page with the largest bound");
    }
    let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    let want = subset_attention(&c.view(), &q, &slots);
    assert_close_slices(&to_vec(&got), &want, 1e-5, 1e-4);
    let (lse_out, lse) = c.attend_lse(&q).expect("lse");
    assert_eq!(to_vec(&lse_out), to_vec(&got));
    assert_eq!(lse.dims(), [2, 2, 2, 1]);
}

#[test]
fn a_planted_page_is_selected() {
    let device = test_device();
    let s = KvShape::new(1, 1, 1, 4).expect("shape");
    let mut c = QuestConfig::new(s, Budget::Tokens(4))
        .with_page_size(2)
        .init(&device)
        .expect("init");
    let mut keys = kv_testkit::seeded_data(20 * 4, 1, 0.1);
    keys[6 * 4..6 * 4 + 4].copy_from_slice(&[5.0, -5.0, 5.0, -5.0]); // slot 6, page 3
    let k = kv_testkit::tensor_from(keys, [1, 1, 20, 4], &device);
    c.append(KvBlock::contiguous(k.clone(), k, 0).expect("block"))
        .expect("append");
    let q = kv_testkit::tensor_from(vec![1.0, -1.0, 1.0, -1.0], [1, 1, 1, 4], &device);
    let q = Query::contiguous(q, 19).expect("query");
    let slots = c.selected_slots(&q).expect("slots").expect("selects");
    assert_eq!(slots, vec![vec![6, 7, 18, 19]]);
}

#[test]
fn metadata_is_counted_and_matches_the_buffers() {
    let s = shape();
    let c = filled(QuestConfig::new(s, Budget::Tokens(8)).with_page_size(4), 23);
    memory_matches_buffers(&c).expect("memory");
    let m = c.memory();
    let pages = 23usize.div_ceil(4);
    let meta = 2 * s.streams() * pages * s.head_dim() * 4;
    let positions = s.batch() * 23 * 4;
    assert_eq!(m.metadata_bytes, meta + positions);
    let mut c16 = QuestConfig::new(s, Budget::Tokens(8))
        .with_page_size(4)
        .with_dtype(StorageDtype::F16)
        .init(&test_device())
        .expect("init");
    c16.append(block(s, 23, 0, 1, &test_device()))
        .expect("append");
    memory_matches_buffers(&c16).expect("memory");
    assert_eq!(c16.memory().metadata_bytes, meta / 2 + positions);
}

#[test]
fn padding_is_never_selected_nor_bounds_nan() {
    let device = test_device();
    let s = KvShape::new(2, 1, 2, 4).expect("shape");
    let mut c = QuestConfig::new(s, Budget::Tokens(2))
        .with_page_size(2)
        .init(&device)
        .expect("init");
    let k = seeded_tensor([2, 1, 8, 4], 3, 1.0, &device);
    // Sequence 1 is padded for its first 4 slots (two whole pages).
    let mut pos: Vec<u32> = (0..8).collect();
    pos.extend([u32::MAX, u32::MAX, u32::MAX, u32::MAX, 0, 1, 2, 3]);
    c.append(KvBlock::new(k.clone(), k, pos).expect("block"))
        .expect("append");
    let (min, max) = c.page_min_max().expect("pages");
    assert!(
        to_vec(&min)
            .iter()
            .chain(&to_vec(&max))
            .all(|x| x.is_finite())
    );
    let q = Query::new(seeded_tensor([2, 2, 1, 4], 4, 1.0, &device), vec![7, 3]).expect("query");
    let slots = c.selected_slots(&q).expect("slots").expect("selects");
    assert!(
        slots[2].iter().chain(&slots[3]).all(|&j| j >= 4),
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
fn bad_configs_are_clear_errors() {
    let device = test_device();
    let s = shape();
    let field = |cfg: QuestConfig| match cfg.init(&device) {
        Err(KvError::InvalidConfig { field, .. }) => field,
        Err(e) => panic!("unexpected {e:?}"),
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(
        field(QuestConfig::new(s, Budget::Tokens(8)).with_page_size(0)),
        "page_size"
    );
    assert_eq!(
        field(QuestConfig::new(s, Budget::Tokens(8)).with_page_size(16)),
        "budget"
    );
    assert_eq!(field(QuestConfig::new(s, Budget::Tokens(0))), "budget");
    assert_eq!(field(QuestConfig::new(s, Budget::Fraction(1.5))), "budget");
    assert!(matches!(
        QuestConfig::from_params(s, [("page", "4")]),
        Err(KvError::InvalidConfig {
            field: "budget",
            ..
        })
    ));
    assert!(matches!(
        QuestConfig::from_params(s, [("budget", "64"), ("pages", "4")]),
        Err(KvError::InvalidConfig {
            field: "params",
            ..
        })
    ));
    let cfg = QuestConfig::from_params(s, [("budget", "0.25"), ("page", "8"), ("dtype", "f16")])
        .expect("params");
    assert_eq!(cfg.budget, Budget::Fraction(0.25));
    assert_eq!((cfg.page_size, cfg.dtype), (8, StorageDtype::F16));
    let json = serde_json::to_string(&cfg).expect("json");
    assert_eq!(
        serde_json::from_str::<QuestConfig>(&json).expect("back"),
        cfg
    );
}
