//! The tiny seeded HF Llama (`shared/fixtures/kvpress-tiny`): its config, its safetensors
//! weights, and layer 0's attention inputs recomputed from them against kvpress's capture.

use kv_model::LlamaConfig;
use kv_model::safetensors_io::load_safetensors_f32;

use crate::host_math::{linear, max_abs_diff, rms_norm, rope_rotate_half, seq_heads_to_heads_seq};
use crate::{fixture_path, read_fixture};

fn tiny_config() -> Option<LlamaConfig> {
    let path = fixture_path("kvpress-tiny/tiny_llama_config.json")?;
    Some(LlamaConfig::from_hf_json_file(path).unwrap())
}

#[test]
fn tiny_config_json_parses() {
    let Some(c) = tiny_config() else { return };
    assert_eq!((c.hidden_size, c.intermediate_size), (64, 128));
    assert_eq!((c.num_attention_heads, c.num_key_value_heads), (4, 2));
    assert_eq!(c.num_hidden_layers, 2);
    assert_eq!(c.vocab_size, 1000);
    assert_eq!(c.head_dim, Some(16));
    assert_eq!(
        c.rope_theta, 10000.0,
        "read from rope_parameters (transformers 5)"
    );
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.max_position_embeddings, 2048);
}

#[test]
fn tiny_weights_have_the_config_shapes() {
    let (Some(c), Some(path)) = (
        tiny_config(),
        fixture_path("kvpress-tiny/tiny_llama_weights.safetensors"),
    ) else {
        return;
    };
    let w = load_safetensors_f32(path).unwrap();
    assert_eq!(w.len(), 3 + 9 * c.num_hidden_layers);
    let (h, d) = (c.hidden_size, c.effective_head_dim());
    let kv = c.num_key_value_heads * d;
    assert_eq!(w["model.embed_tokens.weight"].shape, [c.vocab_size, h]);
    assert_eq!(w["lm_head.weight"].shape, [c.vocab_size, h]);
    assert_eq!(w["model.norm.weight"].shape, [h]);
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        assert_eq!(
            w[&format!("{p}self_attn.q_proj.weight")].shape,
            [c.num_attention_heads * d, h]
        );
        assert_eq!(w[&format!("{p}self_attn.k_proj.weight")].shape, [kv, h]);
        assert_eq!(w[&format!("{p}self_attn.v_proj.weight")].shape, [kv, h]);
        assert_eq!(
            w[&format!("{p}self_attn.o_proj.weight")].shape,
            [h, c.num_attention_heads * d]
        );
        assert_eq!(
            w[&format!("{p}mlp.gate_proj.weight")].shape,
            [c.intermediate_size, h]
        );
        assert_eq!(
            w[&format!("{p}mlp.down_proj.weight")].shape,
            [h, c.intermediate_size]
        );
        assert_eq!(w[&format!("{p}input_layernorm.weight")].shape, [h]);
    }
}

/// Protocol: kvpress's capture of layer 0's attention inputs during the 96-token prefill
/// (`press_knorm.safetensors`: `L0.hidden_in` [1, 96, 64], `L0.keys_in` / `L0.values_in`
/// [1, 2, 96, 16]). Recomputed here from the loaded weights on the host in fp32; the tolerance
/// (1e-5 relative to the largest magnitude) covers fp32 summation-order differences.
#[test]
fn tiny_layer0_attention_inputs_match_kvpress() {
    let (Some(c), Some(weights), Some(press)) = (
        tiny_config(),
        fixture_path("kvpress-tiny/tiny_llama_weights.safetensors"),
        fixture_path("kvpress-tiny/press_knorm.safetensors"),
    ) else {
        return;
    };
    let w = load_safetensors_f32(weights).unwrap();
    let f = read_fixture(
        &press,
        &["input_ids", "L0.hidden_in", "L0.keys_in", "L0.values_in"],
    );
    let (_, ids) = f["input_ids"].i64();
    let h = c.hidden_size;
    let embed = &w["model.embed_tokens.weight"];
    let x: Vec<f32> = ids[..96]
        .iter()
        .flat_map(|&id| embed.row(id as usize).unwrap().to_vec())
        .collect();
    let hidden = rms_norm(
        &x,
        &w["model.layers.0.input_layernorm.weight"].data,
        c.rms_norm_eps as f32,
    );
    let (shape, hidden_ref) = f["L0.hidden_in"].f32();
    assert_eq!(shape, [1, 96, h]);
    let (diff, scale) = max_abs_diff(&hidden, hidden_ref);
    assert!(
        diff <= 1e-5 * scale,
        "hidden_in: max diff {diff} (scale {scale})"
    );

    let (kvh, d) = (c.num_key_value_heads, c.effective_head_dim());
    let v = linear(hidden_ref, &w["model.layers.0.self_attn.v_proj.weight"]);
    let (diff, scale) = max_abs_diff(
        &seq_heads_to_heads_seq(&v, kvh, d),
        f["L0.values_in"].f32().1,
    );
    assert!(
        diff <= 1e-5 * scale,
        "values_in: max diff {diff} (scale {scale})"
    );

    let mut k = linear(hidden_ref, &w["model.layers.0.self_attn.k_proj.weight"]);
    rope_rotate_half(&mut k, kvh, d, c.rope_theta as f32);
    let (diff, scale) = max_abs_diff(&seq_heads_to_heads_seq(&k, kvh, d), f["L0.keys_in"].f32().1);
    assert!(
        diff <= 1e-5 * scale,
        "keys_in: max diff {diff} (scale {scale})"
    );
}
