//! ClusterKV: one cluster per token is exact top-k, selection, training errors, config.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, KvBlock, KvCache, KvError, KvShape, Query, StatsRequest, StorageDtype,
    memory_matches_buffers,
};
use kv_pq::{Budget, ClusterKvCache, ClusterKvConfig};
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

fn filled(cfg: ClusterKvConfig, prefill: usize, decode: usize) -> ClusterKvCache {
    let device = test_device();
    let mut c = cfg.init(&device).expect("init");
    c.append(block(cfg.shape, prefill, 0, 1, &device))
        .expect("prefill");
    c.end_prefill().expect("end_prefill");
    for i in 0..decode {
        c.append(block(
            cfg.shape,
            1,
            (prefill + i) as u32,
            9 + i as u64,
            &device,
        ))
        .expect("decode");
    }
    c
}

kv_testkit::kv_cache_contract!(contract, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        ClusterKvConfig::new(shape(), Budget::Tokens(16))
            .with_clusters(3)
            .with_windows(1, 1)
            .init(d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(contract_f16, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        ClusterKvConfig::new(
            KvShape::new(1, 1, 2, 4).expect("shape"),
            Budget::Fraction(1.0),
        )
        .with_clusters(2)
        .with_windows(0, 1)
        .with_dtype(StorageDtype::F16)
        .init(d)
        .expect("init"),
    )
});

#[test]
fn one_cluster_per_token_selects_the_exact_top_scores() {
    let device = test_device();
    let s = shape();
    let len = 16;
    let mut c = filled(
        ClusterKvConfig::new(s, Budget::Tokens(6))
            .with_clusters(len)
            .with_windows(1, 0),
        len,
        0,
    );
    let members = c.memberships().expect("clustered");
    for row in &members {
        let mut m = row.clone();
        m.sort_unstable();
        m.dedup();
        assert_eq!(m.len(), len, "every token its own cluster: {row:?}");
    }
    let q = query(s, len as u32 - 1, 5, &device);
    let slots = c.selected_slots(&q).expect("slots").expect("selects");
    let view = c.view();
    let exact = to_vec(
        &q.tensor()
            .clone()
            .reshape([2, 2, 2, 8])
            .matmul(view.keys.clone().swap_dims(2, 3)),
    );
    for (r, row) in slots.iter().enumerate() {
        let sc = &exact[r * len..(r + 1) * len];
        let mut rest: Vec<usize> = (1..len).collect();
        rest.sort_by(|&a, &b| sc[b].total_cmp(&sc[a]));
        let mut want = vec![0];
        want.extend_from_slice(&rest[..5]);
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
fn selection_fills_the_budget_with_whole_clusters_first() {
    let device = test_device();
    let s = shape();
    let mut c = filled(
        ClusterKvConfig::new(s, Budget::Tokens(10))
            .with_clusters(4)
            .with_windows(2, 1),
        24,
        3,
    );
    assert_eq!(c.len(), 27);
    let members = c.memberships().expect("clustered");
    assert!(members.iter().all(|m| m.len() == 27));
    let q = query(s, 26, 5, &device);
    let slots = c.selected_slots(&q).expect("slots").expect("selects");
    let view = c.view();
    let (k, qv) = (to_vec(&view.keys), to_vec(q.tensor()));
    let (len, d, g) = (27, 8, s.group());
    for (r, row) in slots.iter().enumerate() {
        assert_eq!(row.len(), 10);
        assert!(row.starts_with(&[0, 1]) && row.ends_with(&[26]), "{row:?}");
        // Rank the clusters by q · (mean raw prefill key of the members), on the host.
        let (b, hq) = (r / s.q_heads(), r % s.q_heads());
        let stream = b * s.kv_heads() + hq / g;
        let m = &members[stream];
        let mut score = [0.0f64; 4];
        let mut count = [0usize; 4];
        // The centroids are the means over the prefill (24 tokens); decode keys only join.
        for t in 0..24 {
            let dot: f64 = (0..d)
                .map(|ch| f64::from(qv[r * d + ch]) * f64::from(k[(stream * len + t) * d + ch]))
                .sum();
            score[m[t]] += dot;
            count[m[t]] += 1;
        }
        let mean = |c: usize| score[c] / count[c].max(1) as f64;
        let mut order: Vec<usize> = (0..4).filter(|&c| count[c] > 0).collect();
        order.sort_by(|&a, &b| mean(b).total_cmp(&mean(a)));
        // Clusters are taken whole in rank order; only the last one taken may be cut.
        let forced = [0usize, 1, 26];
        let picked: Vec<usize> = row
            .iter()
            .copied()
            .filter(|t| !forced.contains(t))
            .collect();
        let worst = picked
            .iter()
            .map(|&t| order.iter().position(|&c| c == m[t]).unwrap())
            .max()
            .unwrap();
        for &c in &order[..worst] {
            for t in (0..len).filter(|&t| m[t] == c && !forced.contains(&t)) {
                assert!(
                    row.contains(&t),
                    "row {r}: cluster {c} (ranked above the cut) misses {t}"
                );
            }
        }
    }
    let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_close_slices(
        &to_vec(&got),
        &subset_attention(&c.view(), &q, &slots),
        1e-5,
        1e-4,
    );
    memory_matches_buffers(&c).expect("memory");
}

#[test]
fn budget_at_least_the_cache_size_reproduces_dense_attention_exactly() {
    let device = test_device();
    let s = shape();
    let mut ck = filled(
        ClusterKvConfig::new(s, Budget::Tokens(20))
            .with_clusters(4)
            .with_windows(1, 1),
        19,
        1,
    );
    let mut dense = DenseCacheConfig::new(s).init(&device).expect("dense");
    dense.append(block(s, 19, 0, 1, &device)).expect("append");
    dense.append(block(s, 1, 19, 9, &device)).expect("append");
    let q = query(s, 19, 5, &device);
    let a = ck.attend(&q, StatsRequest::NONE).expect("attend").output;
    let b = dense.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_eq!(to_vec(&a), to_vec(&b));
}

#[test]
fn fewer_tokens_than_clusters_is_an_error_that_changes_nothing() {
    let device = test_device();
    let s = shape();
    let mut c = ClusterKvConfig::new(s, Budget::Tokens(64))
        .init(&device)
        .expect("init"); // 400
    c.append(block(s, 30, 0, 1, &device)).expect("append");
    let before = (to_vec(&c.view().keys), c.memory());
    assert!(matches!(
        c.end_prefill(),
        Err(KvError::InvalidConfig {
            field: "clusters",
            ..
        })
    ));
    assert!(!c.is_clustered());
    assert_eq!((to_vec(&c.view().keys), c.memory()), before);
    let q = query(s, 29, 2, &device);
    let got = c.attend(&q, StatsRequest::NONE).expect("attend").output;
    assert_close(
        &got,
        &c.view().attend_reference(&q, StatsRequest::NONE).output,
        1e-6,
        1e-5,
    );
}

#[test]
fn bad_configs_are_clear_errors() {
    let device = test_device();
    let s = shape();
    let field = |cfg: ClusterKvConfig| match cfg.init(&device) {
        Err(KvError::InvalidConfig { field, .. }) => field,
        Err(e) => panic!("unexpected {e:?}"),
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(
        field(ClusterKvConfig::new(s, Budget::Tokens(64)).with_clusters(0)),
        "clusters"
    );
    assert_eq!(field(ClusterKvConfig::new(s, Budget::Tokens(17))), "budget"); // 16 sinks + 1
    assert_eq!(
        field(ClusterKvConfig::new(s, Budget::Fraction(2.0))),
        "budget"
    );
    assert_eq!(
        field(ClusterKvConfig::new(s, Budget::Tokens(64)).with_kmeans(3, f64::INFINITY, 0)),
        "tol"
    );
    assert!(matches!(
        ClusterKvConfig::from_params(s, [("clusters", "8")]),
        Err(KvError::InvalidConfig {
            field: "budget",
            ..
        })
    ));
    assert!(matches!(
        ClusterKvConfig::from_params(s, [("budget", "64"), ("nlist", "8")]),
        Err(KvError::InvalidConfig {
            field: "params",
            ..
        })
    ));
    let cfg =
        ClusterKvConfig::from_params(s, [("budget", "128"), ("clusters", "32"), ("sinks", "4")])
            .expect("params");
    assert_eq!(
        (cfg.budget, cfg.clusters, cfg.sinks),
        (Budget::Tokens(128), 32, 4)
    );
    let json = serde_json::to_string(&cfg).expect("json");
    assert_eq!(
        serde_json::from_str::<ClusterKvConfig>(&json).expect("back"),
        cfg
    );
}
