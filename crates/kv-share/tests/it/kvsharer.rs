//! KVSharer: distances, ranking, the search and the artefact.

use kv_core::{KvError, KvShape};
use kv_share::kvsharer::{
    CalibrationInfo, ModelShape, cosine, layer_distances, rank_pairs, search,
};
use kv_share::{KvSharerArtifact, KvSharerConfig, LayerMap, ShareError};

fn model(n: usize) -> ModelShape {
    ModelShape::new(n, KvShape::new(1, 2, 4, 8).unwrap())
}

fn info() -> CalibrationInfo {
    CalibrationInfo {
        text: "synthetic".into(),
        samples: 1,
        tokens: 1,
    }
}

/// Layer `i`'s averaged K and V are the constant `i^2` (so distances grow with the gap).
fn averaged(n: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let k: Vec<Vec<f32>> = (0..n).map(|i| vec![(i * i) as f32; 4]).collect();
    (k.clone(), k)
}

#[test]
fn pairs_rank_by_decreasing_distance() {
    let (k, v) = averaged(4);
    let d = layer_distances(&k, &v).unwrap();
    assert_eq!(d[0][0], 0.0);
    assert!((d[3][0] - 2.0 * 9.0 * 2.0).abs() < 1e-4, "{}", d[3][0]);
    let ranked = rank_pairs(&d);
    assert_eq!(ranked.len(), 6);
    assert_eq!(
        (ranked[0].0, ranked[0].1),
        (3, 0),
        "the most distant pair comes first"
    );
    assert!(ranked.windows(2).all(|w| w[0].2 >= w[1].2));
    assert!(layer_distances(&k, &v[..3]).is_err());
    assert!(layer_distances(&[vec![f32::NAN]], &[vec![0.0]]).is_err());
}

#[test]
fn search_accepts_while_similar_and_resolves_chains() {
    let (k, v) = averaged(5);
    let cfg = KvSharerConfig::new(3, 0.5);
    // A fake model: similarity drops by 0.2 for each consumer that reads layer 0.
    let mut calls = 0;
    let a = search::<KvError>(&cfg, model(5), info(), &k, &v, |m| {
        calls += 1;
        let bad = (1..m.len()).filter(|&i| m.owner(i) == Some(0)).count();
        Ok(1.0 - 0.2 * bad as f32)
    })
    .unwrap();
    assert_eq!(a.accepted.len(), 3);
    assert_eq!(a.evaluated, calls);
    // (4, 0) accepted (0.8); (4, 1), (4, 2) skipped (4 already reads); (3, 0) accepted
    // (0.6); (2, 0) rejected (0.4); (2, 1) accepted (0.6).
    assert_eq!(a.map.owners(), &[0, 1, 1, 0, 0]);
    assert!(a.accepted.iter().all(|p| p.similarity > 0.5));
    // Chains: layer 1 reads 0 first; then "2 reads 1" resolves to "2 reads 0".
    let kc = vec![vec![0.0f32; 4], vec![10.0; 4], vec![3.0; 4]];
    let a = search::<KvError>(
        &KvSharerConfig::new(2, 0.0),
        model(3),
        info(),
        &kc,
        &kc,
        |_| Ok(1.0),
    )
    .unwrap();
    assert_eq!((a.accepted[1].layer, a.accepted[1].reads), (2, 1));
    assert_eq!(a.map.owners(), &[0, 0, 0]);
    // An empty search: nothing is above a threshold of 1.
    let a = search::<KvError>(
        &KvSharerConfig::new(2, 1.0),
        model(3),
        info(),
        &k[..3],
        &v[..3],
        |_| Ok(1.0),
    )
    .unwrap();
    assert!(a.map.is_identity() && a.accepted.is_empty() && a.evaluated == 3);
}

#[test]
fn configs_are_validated() {
    let (k, v) = averaged(4);
    let run = |cfg: KvSharerConfig| search::<KvError>(&cfg, model(4), info(), &k, &v, |_| Ok(1.0));
    assert!(matches!(
        run(KvSharerConfig::new(0, 0.5)),
        Err(KvError::InvalidConfig {
            field: "share_layers",
            ..
        })
    ));
    assert!(matches!(
        run(KvSharerConfig::new(4, 0.5)),
        Err(KvError::InvalidConfig {
            field: "share_layers",
            ..
        })
    ));
    assert!(matches!(
        run(KvSharerConfig::new(1, 1.5)),
        Err(KvError::InvalidConfig {
            field: "threshold",
            ..
        })
    ));
    assert!(
        search::<KvError>(
            &KvSharerConfig::new(1, 0.5),
            model(5),
            info(),
            &k,
            &v,
            |_| Ok(1.0)
        )
        .is_err()
    );
    let p = KvSharerConfig::from_params([("share_layers", "6"), ("threshold", "0.8")]).unwrap();
    assert_eq!(p, KvSharerConfig::new(6, 0.8));
    assert!(KvSharerConfig::from_params([("layers", "6")]).is_err());
    assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-6);
    assert_eq!(cosine(&[0.0, 0.0], &[2.0, 0.0]), 0.0);
}

#[test]
fn artifacts_round_trip_and_are_validated_on_load() {
    let dir = std::env::temp_dir().join(format!("kv-share-art-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kvsharer.json");
    let (k, v) = averaged(4);
    let a = search::<KvError>(
        &KvSharerConfig::new(1, 0.5),
        model(4),
        info(),
        &k,
        &v,
        |_| Ok(0.9),
    )
    .unwrap();
    assert_eq!(a.map.owners(), &[0, 1, 2, 0]);
    a.save(&path).unwrap();
    assert_eq!(KvSharerArtifact::load(&path, &model(4)).unwrap(), a);
    // Another model shape.
    assert!(matches!(
        KvSharerArtifact::load(&path, &model(5)),
        Err(ShareError::Kv(_))
    ));
    // Another version, a truncated file, an invalid map.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"version\": 1", "\"version\": 2")).unwrap();
    assert!(matches!(
        KvSharerArtifact::load(&path, &model(4)),
        Err(ShareError::Kv(_))
    ));
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    assert!(matches!(
        KvSharerArtifact::load(&path, &model(4)),
        Err(ShareError::Format { .. })
    ));
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["map"]["owners"] = serde_json::json!([0, 0, 1, 0]); // 2 reads 1, which reads 0
    std::fs::write(&path, json.to_string()).unwrap();
    assert!(matches!(
        KvSharerArtifact::load(&path, &model(4)),
        Err(ShareError::Format { .. })
    ));
    assert!(matches!(
        KvSharerArtifact::load(&dir.join("absent.json"), &model(4)),
        Err(ShareError::Io { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let _: LayerMap = a.map;
}
