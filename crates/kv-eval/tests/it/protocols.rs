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

pub(crate) fn tiny() -> Option<Llama> {
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

/// The paper pipelines (MiniKV, MiKV, LeanKV, ThinK + KIVI) run end to end on the tiny model
/// from config files (TOML and JSON) and from code, through both protocols, and store fewer
/// bytes than the fp32 cache.
#[test]
fn paper_pipelines_run_from_configs_and_code() {
    let Some(model) = tiny() else { return };
    let dir = std::env::temp_dir().join(format!("kv-eval-pipelines-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let toml = dir.join("minikv.toml");
    std::fs::write(
        &toml,
        "version = 1\n[[stages]]\nname = \"minikv\"\nratio = 0.5\n[stages.params]\nresidual = 16\n",
    )
    .expect("write toml");
    let json = dir.join("mikv.json");
    std::fs::write(
        &json,
        r#"{"version": 1, "stages": [{"name": "mikv", "ratio": 0.75, "params": {"group": 16}}]}"#,
    )
    .expect("write json");
    let think_toml = dir.join("think_kivi.toml");
    std::fs::write(
        &think_toml,
        "version = 1\n[[stages]]\nname = \"think_kivi\"\nratio = 0.4\n[stages.params]\ngroup = 16\nresidual = 16\n",
    )
    .expect("write toml");
    // ThinK + KIVI from code, as its two stages (fused into one pruning KIVI cache).
    let think_from_code = PipelineSpec::new(vec![
        MethodSpec::new("think").with_ratio(0.5).with("window", 8),
        MethodSpec::new("kivi")
            .with("bits", 2)
            .with("group", 16)
            .with("residual", 16),
    ]);
    let from_code = PipelineSpec::new(vec![
        MethodSpec::new("snapkv").with_ratio(0.5).with("window", 8),
        MethodSpec::new("kivi")
            .with("bits", 4)
            .with("group", 16)
            .with("residual", 16),
    ]);
    let specs = [
        PipelineSpec::from_path(&toml).expect("toml config"),
        PipelineSpec::from_path(&json).expect("json config"),
        PipelineSpec::parse_line("leankv:group=16,residual=16").expect("one line"),
        PipelineSpec::from_path(&think_toml).expect("think_kivi config"),
        think_from_code,
        from_code,
    ];
    let shape = model.kv_shape(1).expect("shape");
    for spec in specs {
        let mut caches = build_caches(&spec, 2, shape, model.rope().config(), model.device())
            .unwrap_or_else(|e| panic!("{}: {e}", spec.to_line()));
        for stream in [false, true] {
            let w = run_window(&model, &mut caches, &ids(), 96, 32, stream, 0)
                .unwrap_or_else(|e| panic!("{}: {e}", spec.to_line()));
            assert!(w.nll.is_finite(), "{}", spec.to_line());
            // (At 96 tokens MiKV's fp16 tier is mostly 64-token growth slack: compare with
            // the fp32 cache the model computes with.)
            let m = w.memory_after_prefill;
            assert!(
                m.stored_bytes() < m.dense_fp32_bytes(),
                "{}: {:?}",
                spec.to_line(),
                w.memory_after_prefill
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Cross-layer methods build the whole container: the identity map is the full cache, a CLA
/// map halves the bytes, per-layer stages may follow a map, MiniCache stands alone.
#[test]
fn cross_layer_methods_build_from_specs() {
    let Some(model) = tiny() else { return };
    let shape = model.kv_shape(1).expect("shape");
    let build = |line: &str| {
        build_caches(
            &PipelineSpec::parse_line(line).expect("parse"),
            2,
            shape,
            model.rope().config(),
            model.device(),
        )
    };
    let run = |line: &str| {
        let mut caches = build(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        run_window(&model, &mut caches, &ids(), 96, 32, false, 0)
            .unwrap_or_else(|e| panic!("{line}: {e}"))
    };
    let full = run("full");
    let same = run("layer_map:map=0_1");
    assert_eq!(full.nll, same.nll, "the identity map is the plain model");
    let cla = run("layer_map:cla=2");
    assert_eq!(
        cla.memory_after_prefill.stored_bytes() * 2,
        full.memory_after_prefill.stored_bytes()
    );
    assert!(
        run("layer_map:cla=2|kivi:bits=4,group=16,residual=16")
            .nll
            .is_finite()
    );
    assert!(run("minicache:start=0,gamma=1").nll.is_finite());
    for bad in [
        "minicache|kivi",
        "layer_map:cla=2,mlkv=1",
        "layer_map:bits=2",
        "kvsharer",
    ] {
        assert!(build(bad).is_err(), "{bad}");
    }
}
