//! The layer-sharing map: constructors, validation, and the container it builds.

use kv_core::{DenseCacheConfig, KvBlock, KvCache, KvError, KvShape, memory_matches_buffers};
use kv_share::{LayerMap, average_weights};
use kv_testkit::{seeded_tensor, test_device};
use proptest::prelude::*;

fn invalid(r: kv_core::Result<LayerMap>) -> String {
    match r {
        Err(KvError::InvalidConfig { reason, .. }) => reason,
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn named_maps_match_the_papers_layouts() {
    assert_eq!(LayerMap::identity(3).unwrap().owners(), &[0, 1, 2]);
    assert_eq!(LayerMap::cla(5, 2).unwrap().to_layer_types(), "0_0_2_2_4");
    assert_eq!(LayerMap::cla(6, 3).unwrap().to_layer_types(), "0_0_0_3_3_3");
    // MLKV-6 over 12 layers and an uneven split.
    assert_eq!(LayerMap::mlkv(12, 6).unwrap().storage_layers(), 6);
    assert_eq!(LayerMap::mlkv(5, 2).unwrap().owners(), &[0, 0, 0, 3, 3]);
    assert_eq!(LayerMap::mlkv(4, 1).unwrap().owners(), &[0, 0, 0, 0]);
    // whyNLP/LCKV's `0_20_20…_20_21` for 22 layers.
    let lckv = LayerMap::lckv(22, 1, 2).unwrap();
    let mut want = vec![0];
    want.extend(std::iter::repeat_n(20, 20));
    want.push(21);
    assert_eq!(lckv.owners(), &want[..]);
    assert_eq!(lckv.forward_references(), (1..20).collect::<Vec<_>>());
    assert_eq!(lckv.storage_layers(), 3);
}

#[test]
fn parse_round_trips_and_flags_forward_references() {
    let m = LayerMap::parse("0_3_3_3").unwrap();
    assert_eq!(m.owners(), &[0, 3, 3, 3]);
    assert_eq!(m.forward_references(), vec![1, 2]);
    assert_eq!(LayerMap::parse(&m.to_layer_types()).unwrap(), m);
    assert_eq!(
        LayerMap::parse("0,0,2,2").unwrap(),
        LayerMap::cla(4, 2).unwrap()
    );
    let json = serde_json::to_string(&m).unwrap();
    assert_eq!(json, r#"{"owners":[0,3,3,3]}"#);
    assert_eq!(serde_json::from_str::<LayerMap>(&json).unwrap(), m);
    assert!(serde_json::from_str::<LayerMap>(r#"{"owners":[0,5]}"#).is_err());
}

#[test]
fn bad_maps_are_rejected_with_reasons() {
    assert!(invalid(LayerMap::new(vec![0, 4])).contains("reads layer 4"));
    assert!(invalid(LayerMap::parse("0_x")).contains("not a layer index"));
    assert!(invalid(LayerMap::new(vec![])).contains("at least one layer"));
    // A chain: 2 reads 1, which reads 0.
    assert!(invalid(LayerMap::new(vec![0, 0, 1])).contains("does not own storage"));
    // A cycle.
    assert!(invalid(LayerMap::new(vec![1, 0])).contains("cycle"));
    assert!(invalid(LayerMap::resolve_chains(vec![0, 2, 3, 1])).contains("cycle"));
    assert!(LayerMap::cla(4, 0).is_err());
    assert!(LayerMap::mlkv(4, 5).is_err());
    assert!(LayerMap::lckv(4, 2, 3).is_err());
}

#[test]
fn mlkv_initializer_averages_weights() {
    let w = [0.5f32, -1.0, 2.0];
    assert_eq!(average_weights(&[&w, &w]).unwrap(), w.to_vec());
    assert_eq!(
        average_weights(&[&[1.0, 2.0], &[3.0, 4.0]]).unwrap(),
        vec![2.0, 3.0]
    );
    assert!(average_weights(&[]).is_err());
    assert!(average_weights(&[&[1.0], &[1.0, 2.0]]).is_err());
    assert!(average_weights(&[&[f32::NAN]]).is_err());
    // MLKV-6 over 12 layers keeps 6 layers of KV heads.
    let m = LayerMap::mlkv(12, 6).unwrap();
    assert_eq!(m.storage_layers() * 3, 18, "6 KV layers x 3 KV heads");
}

#[test]
fn chains_resolve_to_owners() {
    // KVSharer's card: {3 → 2, 2 → 0} resolves to {3 → 0, 2 → 0}.
    let m = LayerMap::resolve_chains(vec![0, 1, 0, 2]).unwrap();
    assert_eq!(m.owners(), &[0, 1, 0, 0]);
}

#[test]
fn forward_references_cannot_build_caches() {
    let shape = KvShape::new(1, 1, 1, 4).unwrap();
    let d = test_device();
    let err = LayerMap::parse("0_3_3_3")
        .unwrap()
        .build_caches(|_| Ok(Box::new(DenseCacheConfig::new(shape).init(&d)?) as Box<dyn KvCache>))
        .unwrap_err();
    assert!(
        matches!(
            err,
            KvError::InvalidConfig {
                field: "owners",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn consumers_share_storage_counted_once() {
    let shape = KvShape::new(2, 2, 4, 8).unwrap();
    let d = test_device();
    let make = |_: usize| Ok(Box::new(DenseCacheConfig::new(shape).init(&d)?) as Box<dyn KvCache>);
    let mut plain = LayerMap::identity(4).unwrap().build_caches(make).unwrap();
    let mut cla = LayerMap::cla(4, 2).unwrap().build_caches(make).unwrap();
    assert_eq!(cla.len(), 4);
    assert_eq!(cla.storage_layers(), 2);
    assert_eq!(cla.owner(3).unwrap(), 2);
    let k = seeded_tensor([2, 2, 10, 8], 1, 1.0, &d);
    for caches in [&mut plain, &mut cla] {
        for l in 0..4 {
            if caches.appends(l) {
                let blk = KvBlock::contiguous(k.clone(), k.clone(), 0).unwrap();
                caches.layer_mut(l).unwrap().append(blk).unwrap();
            }
        }
    }
    let (p, c) = (plain.memory(), cla.memory());
    assert_eq!(
        c.stored_bytes() * 2,
        p.stored_bytes(),
        "CLA2 halves the stored bytes"
    );
    assert_eq!(
        c.logical_elements, p.logical_elements,
        "same dense equivalent"
    );
    assert_eq!(c.logical_tokens, p.logical_tokens);
    let per_layer = cla.memory_per_layer();
    assert_eq!(per_layer[1].stored_bytes(), 0);
    assert_eq!(per_layer[1].logical_tokens, 20);
    for l in 0..4 {
        memory_matches_buffers(cla.layer(l).unwrap()).unwrap();
    }
    // A consumer's cache is its owner's.
    let v1 = cla.layer(1).unwrap().view();
    let v0 = cla.layer(0).unwrap().view();
    assert_eq!(kv_testkit::max_diff(&v1.keys, &v0.keys), 0.0);
    cla.reset();
    assert_eq!(cla.memory().logical_tokens, 0);
    assert_eq!(cla.into_layers().len(), 2);
}

fn owners_strategy() -> impl Strategy<Value = Vec<usize>> {
    (1usize..10).prop_flat_map(|n| proptest::collection::vec(0..n, n))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any map either validates (then every consumer reads a producer) or is rejected;
    /// chain resolution of an acyclic map always validates.
    #[test]
    fn validation_is_consistent(owners in owners_strategy()) {
        match LayerMap::new(owners.clone()) {
            Ok(m) => {
                for i in 0..m.len() {
                    let o = m.owner(i).unwrap();
                    prop_assert!(m.owns(o));
                }
            }
            Err(e) => {
                let ok = matches!(e, KvError::InvalidConfig { .. });
                prop_assert!(ok, "unexpected error {:?}", e);
            }
        }
        // Pointing every layer at a lower (or its own) layer is acyclic.
        let lower: Vec<usize> = owners.iter().enumerate().map(|(i, &o)| o.min(i)).collect();
        let m = LayerMap::resolve_chains(lower).unwrap();
        prop_assert!(m.forward_references().is_empty());
        prop_assert_eq!(LayerMap::parse(&m.to_layer_types()).unwrap(), m);
    }
}
