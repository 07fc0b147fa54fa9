//! Unit tests for `LlamaConfig`: HF `config.json` (both RoPE spellings), GGUF metadata, and
//! validation.

use super::*;
use crate::gguf::tests::GgufWriter;

/// The fields of `shared/fixtures/kvpress-tiny/tiny_llama_config.json` that matter, in
/// transformers 5's spelling (`rope_parameters`).
const TINY: &str = r#"{
 "vocab_size": 1000, "max_position_embeddings": 2048, "hidden_size": 64,
 "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
 "num_key_value_heads": 2, "hidden_act": "silu", "rms_norm_eps": 1e-06, "head_dim": 16,
 "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
 "tie_word_embeddings": false, "pad_token_id": null, "model_type": "llama"
}"#;

#[test]
fn tiny_hf_config_parses() {
    let c = LlamaConfig::from_hf_json(TINY).unwrap();
    assert_eq!(
        c,
        LlamaConfig {
            hidden_size: 64,
            intermediate_size: 128,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            num_hidden_layers: 2,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            vocab_size: 1000,
            tie_word_embeddings: false,
            head_dim: Some(16),
            max_position_embeddings: 2048,
        }
    );
    assert_eq!(c.effective_head_dim(), 16);
    assert_eq!(c.kv_groups(), 2);
}

#[test]
fn pre_v5_top_level_rope_theta_and_hf_defaults() {
    let json = r#"{"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_hidden_layers": 30, "vocab_size": 49152, "rope_theta": 100000.0,
        "tie_word_embeddings": true, "rope_scaling": null}"#;
    let c = LlamaConfig::from_hf_json(json).unwrap();
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.num_key_value_heads, 9, "defaults to the query heads");
    assert_eq!(c.effective_head_dim(), 64);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!(c.max_position_embeddings, 2048);
    assert!(c.tie_word_embeddings);
}

#[test]
fn unsupported_rope_and_activation_are_rejected() {
    let llama3 = TINY.replace(r#""rope_type": "default""#, r#""rope_type": "llama3""#);
    assert!(matches!(
        LlamaConfig::from_hf_json(&llama3),
        Err(ModelError::InvalidConfig {
            field: "rope_type",
            ..
        })
    ));
    let gelu = TINY.replace(r#""silu""#, r#""gelu""#);
    assert!(matches!(
        LlamaConfig::from_hf_json(&gelu),
        Err(ModelError::InvalidConfig {
            field: "hidden_act",
            ..
        })
    ));
    assert!(matches!(
        LlamaConfig::from_hf_json("{}"),
        Err(ModelError::Json(_))
    ));
}

#[test]
fn validate_names_the_bad_field() {
    let good = LlamaConfig::from_hf_json(TINY).unwrap();
    let field = |c: LlamaConfig| match c.validate() {
        Err(ModelError::InvalidConfig { field, .. }) => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    assert_eq!(
        field(LlamaConfig {
            num_key_value_heads: 3,
            ..good.clone()
        }),
        "num_key_value_heads"
    );
    assert_eq!(
        field(LlamaConfig {
            head_dim: Some(15),
            ..good.clone()
        }),
        "head_dim"
    );
    assert_eq!(
        field(LlamaConfig {
            head_dim: None,
            hidden_size: 66,
            ..good.clone()
        }),
        "hidden_size"
    );
    assert_eq!(
        field(LlamaConfig {
            vocab_size: 0,
            ..good.clone()
        }),
        "vocab_size"
    );
    assert_eq!(
        field(LlamaConfig {
            rope_theta: f64::NAN,
            ..good.clone()
        }),
        "rope_theta"
    );
    assert_eq!(
        field(LlamaConfig {
            rms_norm_eps: 0.0,
            ..good
        }),
        "rms_norm_eps"
    );
}

#[test]
fn serde_form_round_trips_and_rejects_unknown_fields() {
    let c = LlamaConfig::from_hf_json(TINY).unwrap();
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<LlamaConfig>(&json).unwrap(), c);
    assert!(serde_json::from_str::<LlamaConfig>(TINY).is_err());
}

fn smol_like_gguf(with_output: bool, rope_dims: u32) -> GgufFile {
    let mut w = GgufWriter::new();
    w.kv_str("general.architecture", "llama")
        .kv_u32("llama.context_length", 8192)
        .kv_u32("llama.embedding_length", 576)
        .kv_u32("llama.feed_forward_length", 1536)
        .kv_u32("llama.block_count", 30)
        .kv_u32("llama.attention.head_count", 9)
        .kv_u32("llama.attention.head_count_kv", 3)
        .kv_f32("llama.rope.freq_base", 100000.0)
        .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .kv_u32("llama.rope.dimension_count", rope_dims)
        .kv_str_array("tokenizer.ggml.tokens", &["a", "b", "c"]);
    if with_output {
        w.tensor("output.weight", &[1], 0, &[0; 4]);
    }
    GgufFile::from_bytes(w.finish()).unwrap()
}

#[test]
fn gguf_metadata_gives_the_config() {
    let c = LlamaConfig::from_gguf(&smol_like_gguf(false, 64)).unwrap();
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!((c.num_attention_heads, c.num_key_value_heads), (9, 3));
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!(c.rope_theta, 100000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-12);
    assert_eq!(
        c.vocab_size, 3,
        "from the token list when llama.vocab_size is absent"
    );
    assert!(c.tie_word_embeddings);
    assert_eq!(c.max_position_embeddings, 8192);
    assert_eq!(c.effective_head_dim(), 64);
    assert!(
        !LlamaConfig::from_gguf(&smol_like_gguf(true, 64))
            .unwrap()
            .tie_word_embeddings
    );
    assert!(matches!(
        LlamaConfig::from_gguf(&smol_like_gguf(false, 32)),
        Err(ModelError::InvalidConfig {
            field: "rope.dimension_count",
            ..
        })
    ));
}
