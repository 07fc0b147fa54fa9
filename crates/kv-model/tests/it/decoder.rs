//! The decoder on Burn against the fixtures: post-RoPE keys/values of every layer and the
//! continuation NLL of the tiny model (kvpress protocol), and the same on the real model.

use burn::prelude::*;
use kv_core::{DenseCacheConfig, KvCache, LayerCaches};
use kv_model::safetensors_io::load_safetensors_f32;
use kv_model::{HostWeights, Llama, LlamaConfig};

use crate::{fixture_path, read_fixture, real_model};

fn device() -> Device {
    kv_testkit::test_device()
}

fn dense_caches(model: &Llama) -> LayerCaches {
    let shape = model.kv_shape(1).expect("shape");
    let d = model.device().clone();
    LayerCaches::try_from_fn(model.config().num_hidden_layers, |_| {
        Ok(Box::new(DenseCacheConfig::new(shape).init(&d)?) as Box<dyn KvCache>)
    })
    .expect("caches")
}

fn tiny_model() -> Option<Llama> {
    let cfg = fixture_path("kvpress-tiny/tiny_llama_config.json")?;
    let weights = fixture_path("kvpress-tiny/tiny_llama_weights.safetensors")?;
    let config = LlamaConfig::from_hf_json_file(cfg).expect("config");
    let w = HostWeights::from_hf_tensors(config, load_safetensors_f32(weights).expect("weights"))
        .expect("weights match config");
    Some(Llama::new(&w, &device()).expect("model"))
}

fn as_f32(t: &Tensor<4>) -> Vec<f32> {
    t.to_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32")
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// kvpress's protocol without a press: prefill `p` tokens, then score the rest teacher-forced
/// in one pass; returns the caches after prefill's end and the mean NLL of the continuation.
fn continuation_nll(model: &Llama, ids: &[u32], p: usize) -> (LayerCaches, f64, Vec<Vec<f32>>) {
    let h = model.config().hidden_size;
    let mut caches = dense_caches(model);
    let pos: Vec<u32> = (0..p as u32).collect();
    let hidden = model
        .forward_hidden(&ids[..p], &pos, 1, &mut caches)
        .expect("prefill");
    caches.end_prefill().expect("end prefill");
    let views: Vec<Vec<f32>> = caches.iter().map(|c| as_f32(&c.view().keys)).collect();
    let last = hidden.slice([0..1, p - 1..p, 0..h]).reshape([1, h]);
    let mut nll = model.nll(last, &ids[p..p + 1]);
    let rest: Vec<u32> = (p as u32..ids.len() as u32 - 1).collect();
    let hidden = model
        .forward_hidden(&ids[p..ids.len() - 1], &rest, 1, &mut caches)
        .expect("score");
    let n = ids.len() - 1 - p;
    nll.extend(model.nll(hidden.reshape([n, h]), &ids[p + 1..]));
    let mean = nll.iter().map(|&x| f64::from(x)).sum::<f64>() / nll.len() as f64;
    (caches, mean, views)
}

#[test]
fn tiny_model_reproduces_kvpress_keys_values_and_nll() {
    let (Some(model), Some(fx)) = (
        tiny_model(),
        fixture_path("kvpress-tiny/press_knorm.safetensors"),
    ) else {
        return;
    };
    let names = [
        "input_ids",
        "L0.keys_in",
        "L0.values_in",
        "L1.keys_in",
        "L1.values_in",
    ];
    let f = read_fixture(&fx, &names);
    let ids: Vec<u32> = f["input_ids"].i64().1.iter().map(|&i| i as u32).collect();
    assert_eq!(ids.len(), 128);
    let (caches, nll, _) = continuation_nll(&model, &ids, 96);
    // Keys and values of the 96-token prefill, every layer (views are taken before scoring).
    let mut caches2 = dense_caches(&model);
    let pos: Vec<u32> = (0..96).collect();
    model
        .forward_hidden(&ids[..96], &pos, 1, &mut caches2)
        .expect("prefill");
    for layer in 0..2 {
        let v = caches2.layer(layer).expect("layer").view();
        let (ks, kd) = f[&format!("L{layer}.keys_in")].f32();
        assert_eq!(ks, [1, 2, 96, 16]);
        let dk = max_abs(&as_f32(&v.keys), kd);
        let dv = max_abs(
            &as_f32(&v.values),
            f[&format!("L{layer}.values_in")].f32().1,
        );
        assert!(
            dk < 1e-4 && dv < 1e-4,
            "layer {layer}: keys diff {dk}, values diff {dv}"
        );
    }
    assert_eq!(
        caches.memory().logical_tokens,
        2 * 127,
        "summed over the 2 layers"
    );
    assert!(
        (nll - 6.9013).abs() < 1e-3,
        "continuation NLL {nll} vs kvpress 6.9013"
    );
}

#[test]
fn tiny_model_greedy_generation_matches_teacher_forcing() {
    let Some(model) = tiny_model() else { return };
    let prompt = [5u32, 17, 99, 3, 250, 7];
    let mut caches = dense_caches(&model);
    let out = model
        .generate_greedy(&prompt, 5, None, &mut caches)
        .expect("generate");
    assert_eq!(out.len(), 5);
    // Re-running the whole sequence at once must give the same argmax at every step.
    let all: Vec<u32> = prompt.iter().chain(&out[..4]).copied().collect();
    let mut fresh = dense_caches(&model);
    let pos: Vec<u32> = (0..all.len() as u32).collect();
    let h = model.config().hidden_size;
    let hidden = model
        .forward_hidden(&all, &pos, 1, &mut fresh)
        .expect("forward");
    let logits = model.logits(hidden.reshape([all.len(), h]));
    let arg: Vec<i64> = logits
        .argmax(1)
        .to_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("ids");
    let want: Vec<u32> = arg[prompt.len() - 1..].iter().map(|&x| x as u32).collect();
    assert_eq!(out, want);
}

#[test]
fn bad_tokens_are_rejected_with_caches_unchanged() {
    let Some(model) = tiny_model() else { return };
    let mut caches = dense_caches(&model);
    let err = model.forward_hidden(&[1, 5000], &[0, 1], 1, &mut caches);
    assert!(err.is_err());
    assert_eq!(caches.memory().logical_tokens, 0);
    assert!(
        model
            .forward_hidden(&[1, 2, 3], &[0, 1], 1, &mut caches)
            .is_err()
    );
}

#[test]
fn real_model_reproduces_hf_keys_values_and_nll() {
    let (Some(gguf), Some(fx), Some(press)) = (
        real_model(),
        fixture_path("kvpress-smollm2-pp/prefill_kv_layers_0_14_29.safetensors"),
        fixture_path("kvpress-smollm2-pp/press_knorm.safetensors"),
    ) else {
        return;
    };
    let w = HostWeights::from_gguf(gguf).expect("weights");
    let model = Llama::new(&w, &device()).expect("model");
    let ids: Vec<u32> = read_fixture(&press, &["input_ids"])["input_ids"]
        .i64()
        .1
        .iter()
        .map(|&i| i as u32)
        .collect();
    let names: Vec<String> = [0, 14, 29]
        .iter()
        .flat_map(|l| [format!("L{l}.keys_in"), format!("L{l}.values_in")])
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let f = read_fixture(&fx, &refs);
    let (_, nll, _) = continuation_nll(&model, &ids, 384);
    let mut caches = dense_caches(&model);
    let pos: Vec<u32> = (0..384).collect();
    model
        .forward_hidden(&ids[..384], &pos, 1, &mut caches)
        .expect("prefill");
    for layer in [0, 14, 29] {
        let v = caches.layer(layer).expect("layer").view();
        let dk = max_abs(&as_f32(&v.keys), f[&format!("L{layer}.keys_in")].f32().1);
        let dv = max_abs(
            &as_f32(&v.values),
            f[&format!("L{layer}.values_in")].f32().1,
        );
        assert!(
            dk < 1e-3 && dv < 1e-3,
            "layer {layer}: keys diff {dk}, values diff {dv}"
        );
    }
    assert!(
        (nll - 2.6174).abs() < 2e-3,
        "continuation NLL {nll} vs HF 2.6174"
    );
}

#[test]
fn batch_with_padding_equals_single_sequences() {
    let Some(model) = tiny_model() else { return };
    let h = model.config().hidden_size;
    let a: Vec<u32> = (0..9).map(|i| (i * 31 + 7) % 1000).collect();
    let b: Vec<u32> = (0..5).map(|i| (i * 17 + 3) % 1000).collect();
    // Right-pad b to 9 tokens with PAD positions; ragged caches do not store the padding.
    let mut tokens = a.clone();
    tokens.extend(b.iter().copied().chain(std::iter::repeat_n(0, 4)));
    let mut positions: Vec<u32> = (0..9).collect();
    positions.extend((0..5).chain(std::iter::repeat_n(kv_core::PAD, 4)));
    let shape = model.kv_shape(2).expect("shape");
    let d = model.device().clone();
    for ragged in [true, false] {
        let mut caches = LayerCaches::try_from_fn(2, |_| {
            Ok(if ragged {
                Box::new(kv_core::RaggedCacheConfig::new(shape).init(&d)?) as Box<dyn KvCache>
            } else {
                Box::new(DenseCacheConfig::new(shape).init(&d)?) as Box<dyn KvCache>
            })
        })
        .expect("caches");
        let hid = model
            .forward_hidden(&tokens, &positions, 2, &mut caches)
            .expect("batch");
        // One decode step each: a at position 9, b at position 5.
        let step = model
            .forward_hidden(&[11, 12], &[9, 5], 2, &mut caches)
            .expect("decode");
        for (row, seq) in [(0usize, &a), (1usize, &b)] {
            let n = seq.len();
            let mut single = dense_caches(&model);
            let pos: Vec<u32> = (0..n as u32).collect();
            let want = model
                .forward_hidden(seq, &pos, 1, &mut single)
                .expect("single");
            let got = hid.clone().slice([row..row + 1, 0..n, 0..h]);
            let diff = max_abs(
                &as_f32(&got.unsqueeze::<4>()),
                &as_f32(&want.unsqueeze::<4>()),
            );
            assert!(
                diff < 1e-4,
                "ragged={ragged} row {row}: prefill differs by {diff}"
            );
            let next = [11u32, 12][row];
            let want = model
                .forward_hidden(&[next], &[n as u32], 1, &mut single)
                .expect("single step");
            let got = step.clone().slice([row..row + 1, 0..1, 0..h]);
            let diff = max_abs(
                &as_f32(&got.unsqueeze::<4>()),
                &as_f32(&want.unsqueeze::<4>()),
            );
            assert!(
                diff < 1e-4,
                "ragged={ragged} row {row}: decode differs by {diff}"
            );
        }
    }
}
