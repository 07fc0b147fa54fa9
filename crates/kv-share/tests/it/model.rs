//! Sharing maps and MiniCache on the tiny fixture model (skipped when the fixture is absent).

use std::path::PathBuf;

use burn::prelude::*;
use kv_core::{DenseCacheConfig, KvCache, LayerCaches, Query, StatsRequest};
use kv_model::safetensors_io::load_safetensors_f32;
use kv_model::{HostWeights, Llama, LlamaConfig};
use kv_share::{LayerMap, MiniCacheConfig};
use kv_testkit::{max_diff, test_device};

fn fixture(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures")
        .join(rel);
    if p.is_file() {
        Some(p)
    } else {
        kv_testkit::missing_data(&format!("fixture {} is absent", p.display()));
        None
    }
}

fn tiny() -> Option<Llama> {
    let config = LlamaConfig::from_hf_json_file(fixture("kvpress-tiny/tiny_llama_config.json")?)
        .expect("config");
    let w = load_safetensors_f32(fixture("kvpress-tiny/tiny_llama_weights.safetensors")?)
        .expect("weights");
    let w = HostWeights::from_hf_tensors(config, w).expect("weights");
    Some(Llama::new(&w, &test_device()).expect("model"))
}

fn ids(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 1000).collect()
}

fn dense(model: &Llama, map: &LayerMap) -> LayerCaches {
    let shape = model.kv_shape(1).expect("shape");
    let d = model.device().clone();
    map.build_caches(|_| Ok(Box::new(DenseCacheConfig::new(shape).init(&d)?) as Box<dyn KvCache>))
        .expect("caches")
}

/// Prefill 64 tokens, then decode 3 one at a time; returns every step's hidden states.
fn run(model: &Llama, caches: &mut LayerCaches) -> Vec<Tensor<3>> {
    let ids = ids(67);
    let pos: Vec<u32> = (0..67).collect();
    let mut out = vec![
        model
            .forward_hidden(&ids[..64], &pos[..64], 1, caches)
            .expect("prefill"),
    ];
    caches.end_prefill().expect("end_prefill");
    for i in 64..67 {
        out.push(
            model
                .forward_hidden(&ids[i..=i], &pos[i..=i], 1, caches)
                .expect("decode"),
        );
    }
    out
}

#[test]
fn identity_map_reproduces_the_plain_model_exactly() {
    let Some(model) = tiny() else { return };
    let n = model.config().num_hidden_layers;
    let shape = model.kv_shape(1).unwrap();
    let d = model.device().clone();
    let mut plain = LayerCaches::try_from_fn(n, |_| {
        Ok(Box::new(DenseCacheConfig::new(shape).init(&d)?) as Box<dyn KvCache>)
    })
    .unwrap();
    let mut shared = dense(&model, &LayerMap::identity(n).unwrap());
    let (a, b) = (run(&model, &mut plain), run(&model, &mut shared));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(max_diff(x, y), 0.0);
    }
    assert_eq!(plain.memory(), shared.memory());
}

#[test]
fn cla_map_halves_stored_bytes_and_consumers_read_the_owner() {
    let Some(model) = tiny() else { return };
    let n = model.config().num_hidden_layers;
    assert_eq!(n, 2, "the tiny fixture has two layers");
    let mut plain = dense(&model, &LayerMap::identity(n).unwrap());
    let mut cla = dense(&model, &LayerMap::cla(n, 2).unwrap());
    let a = run(&model, &mut plain);
    let b = run(&model, &mut cla);
    let (p, c) = (plain.memory(), cla.memory());
    assert_eq!(c.stored_bytes() * 2, p.stored_bytes());
    assert_eq!(c.logical_elements, p.logical_elements);
    assert_eq!(c.logical_tokens, p.logical_tokens);
    assert!((c.compression_ratio() / p.compression_ratio() - 2.0).abs() < 1e-9);
    // Layer 0 is unchanged, so the owner's cache equals the plain model's layer 0 ...
    let (v0, w0) = (plain.layer(0).unwrap().view(), cla.layer(1).unwrap().view());
    assert_eq!(max_diff(&v0.keys, &w0.keys), 0.0);
    assert_eq!(v0.positions, w0.positions);
    // ... and sharing changes the output (layer 1 attends over layer 0's KV).
    assert!(max_diff(&a[0], &b[0]) > 0.0);
    assert!(
        b.iter()
            .all(|h| kv_testkit::to_vec(h).iter().all(|x| x.is_finite()))
    );
}

#[test]
fn minicache_without_merged_layers_reproduces_the_plain_model() {
    let Some(model) = tiny() else { return };
    let n = model.config().num_hidden_layers;
    let shape = model.kv_shape(1).unwrap();
    let mut plain = dense(&model, &LayerMap::identity(n).unwrap());
    // The paper's start (the middle, layer 1) leaves no pair in a 2-layer model.
    let cfg = MiniCacheConfig::new(shape, n);
    assert!(cfg.pairs().is_empty());
    let mut mini = cfg.init(model.device()).unwrap();
    let (a, b) = (run(&model, &mut plain), run(&model, &mut mini));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(max_diff(x, y), 0.0);
    }
    // Merging both layers with every token retained is exact too.
    let mut keep = MiniCacheConfig::new(shape, n)
        .with_start_layer(0)
        .with_gamma(1.0)
        .init(model.device())
        .unwrap();
    let c = run(&model, &mut keep);
    for (x, y) in a.iter().zip(&c) {
        assert_eq!(max_diff(x, y), 0.0);
    }
    // Merging without retention stores less and stays close.
    let mut merged = MiniCacheConfig::new(shape, n)
        .with_start_layer(0)
        .with_gamma(0.0)
        .init(model.device())
        .unwrap();
    let m = run(&model, &mut merged);
    // Both hold the 64 prompt tokens and a decode buffer grown to 64 slots per layer.
    let (ms, ps) = (
        merged.memory().stored_bytes(),
        plain.memory().stored_bytes(),
    );
    assert!(ms < ps, "MiniCache {ms} vs plain {ps}");
    assert!(
        m.iter()
            .all(|h| kv_testkit::to_vec(h).iter().all(|x| x.is_finite()))
    );
    // Decode queries attend over the merged prompt and the unmerged decode tail.
    let q = Query::contiguous(
        kv_testkit::seeded_tensor([1, 4, 1, 16], 1, 1.0, model.device()),
        66,
    )
    .unwrap();
    let c = merged.layer_mut(1).unwrap();
    let got = c.attend(&q, StatsRequest::NONE).unwrap().output;
    let want = c.view().attend_reference(&q, StatsRequest::NONE).output;
    kv_testkit::assert_close(&got, &want, 1e-6, 1e-6);
}
