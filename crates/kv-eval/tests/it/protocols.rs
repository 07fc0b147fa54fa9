//! The perplexity protocols on the tiny fixture model.

use std::path::PathBuf;

use kv_eval::kept::kept_positions;
use kv_eval::method::{MethodSpec, PipelineSpec, build_caches};
use kv_eval::ppl::{full_forward_nll, run_window};
use kv_model::safetensors_io::load_safetensors_f32;
use kv_model::{HostWeights, Llama, LlamaConfig};

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
    Some(Llama::new(&w, &kv_testkit::test_device()).expect("model"))
}

fn ids() -> Vec<u32> {
    (0..128u32).map(|i| (i * 37 + 11) % 1000).collect()
}

#[test]
fn protocols_agree_for_the_full_cache() {
    let Some(model) = tiny() else { return };
    let stages = PipelineSpec::single(MethodSpec::full());
    let mut caches = build_caches(
        &stages,
        2,
        model.kv_shape(1).expect("shape"),
        model.rope().config(),
        model.device(),
    )
    .expect("caches");
    let ids = ids();
    let a = run_window(&model, &mut caches, &ids, 96, 32, false, 0).expect("protocol A");
    let c = run_window(&model, &mut caches, &ids, 96, 32, true, 0).expect("stream");
    assert!(
        (a.nll - c.nll).abs() < 1e-4,
        "teacher-forced {} vs streamed {}",
        a.nll,
        c.nll
    );
    // With the full cache, protocol A is the one-forward NLL restricted to the scored ids.
    let whole = full_forward_nll(&model, &mut caches, &ids[..64]).expect("forward");
    assert!(whole.is_finite() && whole > 0.0);
    assert_eq!(
        a.memory_after_prefill.logical_tokens,
        2 * 96,
        "2 layers x 96 tokens"
    );
    assert_eq!(a.memory_at_end.logical_tokens, 2 * 127);
    // fp32 keys and values in buffers grown to 128 slots (64-token growth), 2 KV heads of 16
    // channels, plus a u32 position per token, per layer.
    let per_layer = 2 * (2 * 128 * 16 * 4) + 96 * 4;
    assert_eq!(a.memory_after_prefill.stored_bytes(), 2 * per_layer);
}

#[test]
fn kept_positions_of_the_full_cache_are_everything() {
    let Some(model) = tiny() else { return };
    let mut caches = build_caches(
        &PipelineSpec::single(MethodSpec::full()),
        2,
        model.kv_shape(1).expect("shape"),
        model.rope().config(),
        model.device(),
    )
    .expect("caches");
    let kept = kept_positions(&model, &mut caches, &ids()[..40], 40).expect("kept");
    assert_eq!(kept.len(), 2);
    for layer in kept {
        assert_eq!(layer.len(), 2, "two KV heads");
        for head in layer {
            assert_eq!(head, (0..40).collect::<Vec<u32>>());
        }
    }
}

#[test]
fn too_short_texts_and_multi_stage_pipelines_are_errors() {
    let Some(model) = tiny() else { return };
    let shape = model.kv_shape(1).expect("shape");
    let mut caches = build_caches(
        &PipelineSpec::single(MethodSpec::full()),
        2,
        shape,
        model.rope().config(),
        model.device(),
    )
    .expect("caches");
    assert!(run_window(&model, &mut caches, &ids()[..10], 8, 8, false, 0).is_err());
    let two = PipelineSpec::new(vec![MethodSpec::full(), MethodSpec::full()]);
    assert!(build_caches(&two, 2, shape, model.rope().config(), model.device()).is_err());
}
