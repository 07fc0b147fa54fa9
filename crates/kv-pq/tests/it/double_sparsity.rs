//! Double Sparsity: channel choice, exactness at full budget, the selection path, config.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvError, KvShape, Query, StatsRequest, StorageDtype,
    memory_matches_buffers,
};
use kv_pq::{Budget, DoubleSparsityCache, DoubleSparsityConfig};
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

fn query(s: KvShape, pos: u32, seed: u64, device: &Device) -> Query {
    let q = seeded_tensor([s.batch(), s.q_heads(), 1, s.head_dim()], seed, 1.0, device);
    Query::contiguous(q, pos).expect("query")
}

fn filled(cfg: DoubleSparsityConfig, len: usize) -> DoubleSparsityCache {
    let device = test_device();
    let mut c = cfg.init(&device).expect("init");
    c.append(block(cfg.shape, len - 1, 0, 1, &device))
        .expect("prefill");
    let q = Query::contiguous(seeded_tensor([2, 4, len - 1, 8], 2, 1.0, &device), 0).expect("q");
    c.attend(&q, StatsRequest::NONE).expect("prefill attention");
    c.end_prefill().expect("end_prefill");
    c.append(block(cfg.shape, 1, len as u32 - 1, 9, &device))
        .expect("decode");
    c
}

kv_testkit::kv_cache_contract!(contract, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        DoubleSparsityConfig::new(shape(), Budget::Tokens(16))
            .with_group_factor(4)
            .init(d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(contract_f16, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        DoubleSparsityConfig::new(
            KvShape::new(1, 1, 3, 4).expect("shape"),
            Budget::Fraction(1.0),
        )
        .with_dtype(StorageDtype::F16)
        .with_group_factor(2)
        .init(d)
        .expect("init"),
    )
});

#[test]
fn a_planted_outlier_channel_is_chosen() {
    let device = test_device();
    let s = KvShape::new(1, 2, 2, 8).expect("shape");
    let k = seeded_tensor([1, 2, 10, 8], 1, 1.0, &device);
    let k = k.clone().slice_assign(
        [0..1, 0..2, 0..10, 5..6],
        k.clone().slice([0..1, 0..2, 0..10, 5..6]).mul_scalar(100.0),
    );
    let mut c = DoubleSparsityConfig::new(s, Budget::Tokens(2))
        .with_group_factor(8)
        .init(&device)
        .expect("init");
    c.append(KvBlock::contiguous(k.clone(), k, 0).expect("block"))
        .expect("append");
    c.end_prefill().expect("end_prefill");
    assert_eq!(c.channels().expect("chosen"), vec![vec![5], vec![5]]);
    memory_matches_buffers(&c).expect("memory");
}

#[test]
fn heavy_at_least_the_cache_size_reproduces_dense_attention_exactly() {
    let device = test_device();
    let s = shape();
    let mut ds = filled(DoubleSparsityConfig::new(s, Budget::Tokens(20)), 20);
    let mut dense = DenseCacheConfig::new(s).init(&device).expect("dense");
    dense.append(block(s, 19, 0, 1, &device)).expect("append");
    dense.append(block(s, 1, 19, 9, &device)).expect("append");
    let q = query(s, 19, 5, &device);
    assert!(ds.selected_slots(&q).expect("slots").is_none());
    let a = ds.attend(&q, StatsRequest::NONE).expect("attend").output;
    let b = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_eq!(to_vec(&a), to_vec(&b));
}

#[test]
fn all_channels_select_the_exact_top_scores() {
    let device = test_device();
    let s = shape();
    let len = 20;
    let mut c = filled(
        DoubleSparsityConfig::new(s, Budget::Tokens(4))
            .with_group_factor(1)
            .with_windows(1, 1),
        len,
    );
    let q = query(s, len as u32 - 1, 5, &device);
    let labels = c.label_scores(&q).expect("scores").expect("chosen");
    let view = c.view();
    let exact = q
        .tensor()
        .clone()
        .reshape([2, 2, 2, 8])
        .matmul(view.keys.clone().swap_dims(2, 3))
        .reshape([2, 4, 1, len]);
    assert_close(&labels, &exact, 1e-5, 1e-5);
    let slots = c.selected_slots(&q).expect("slots").expect("selects");
    let sc = to_vec(&exact);
    for (r, row) in slots.iter().enumerate() {
        let mut middle: Vec<usize> = (1..len - 1).collect();
        middle.sort_by(|&a, &b| sc[r * len + b].total_cmp(&sc[r * len + a]));
        let mut want = vec![0, len - 1];
        want.extend_from_slice(&middle[..4]);
        want.sort_unstable();
        assert_eq!(row, &want, "row {r}");
    }
    let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_close_slices(
        &to_vec(&got),
        &subset_attention(&view, &q, &slots),
        1e-5,
        1e-4,
    );
}

#[test]
fn bad_configs_are_clear_errors() {
    let device = test_device();
    let s = shape();
    let field = |cfg: DoubleSparsityConfig| match cfg.init(&device) {
        Err(KvError::InvalidConfig { field, .. }) => field,
        Err(e) => panic!("unexpected {e:?}"),
        Ok(_) => panic!("accepted"),
    };
    let cfg = || DoubleSparsityConfig::new(s, Budget::Tokens(4));
    assert_eq!(field(cfg().with_group_factor(0)), "group_factor");
    assert_eq!(field(cfg().with_group_factor(3)), "group_factor");
    assert_eq!(field(cfg().with_group_factor(16)), "group_factor");
    assert_eq!(
        field(DoubleSparsityConfig::new(s, Budget::Tokens(0))),
        "heavy"
    );
    assert!(matches!(
        DoubleSparsityConfig::from_params(s, [("recent", "4")]),
        Err(KvError::InvalidConfig { field: "heavy", .. })
    ));
    assert!(matches!(
        DoubleSparsityConfig::from_params(s, [("heavy", "4"), ("label_bits", "4")]),
        Err(KvError::InvalidConfig {
            field: "params",
            ..
        })
    ));
    let cfg = DoubleSparsityConfig::from_params(s, [("heavy", "64"), ("group_factor", "2")])
        .expect("params");
    assert_eq!((cfg.heavy, cfg.label_channels()), (Budget::Tokens(64), 4));
    let json = serde_json::to_string(&cfg).expect("json");
    assert_eq!(
        serde_json::from_str::<DoubleSparsityConfig>(&json).expect("back"),
        cfg
    );
}
