//! The real SmolLM2-135M-Instruct GGUF: metadata, tensor types and shapes, and layer 0's
//! attention inputs recomputed from the dequantized weights against the kvpress capture.

use kv_model::gguf::{GgmlType, llama_permute_to_rotate_half};
use kv_model::{HostTensor, LlamaConfig};

use crate::host_math::{linear, max_abs_diff, rms_norm, rope_rotate_half, seq_heads_to_heads_seq};
use crate::{fixture_path, read_fixture, real_model};

#[test]
fn real_gguf_metadata_has_the_smollm2_architecture() {
    let Some(f) = real_model() else { return };
    assert_eq!(f.version(), 3);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_u32("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(f.get_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(f.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(f.get_u32("llama.context_length").unwrap(), 8192);
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    assert_eq!(f.get_str("tokenizer.ggml.pre").unwrap(), "smollm");

    let c = LlamaConfig::from_gguf(f).unwrap();
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!(c.hidden_size, 576);
    assert_eq!((c.num_attention_heads, c.num_key_value_heads), (9, 3));
    assert_eq!(c.effective_head_dim(), 64);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.vocab_size, 49152);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-10);
    assert!(
        c.tie_word_embeddings,
        "no output.weight: the LM head is the embedding"
    );
}

#[test]
fn real_gguf_tensor_types_and_parameter_count() {
    let Some(f) = real_model() else { return };
    let count = |t: GgmlType| {
        f.tensor_infos()
            .iter()
            .filter(|i| i.ggml_type() == t)
            .count()
    };
    assert_eq!(count(GgmlType::F32), 61);
    assert_eq!(count(GgmlType::Q8_0), 1);
    assert_eq!(count(GgmlType::Q4_1), 210);
    assert_eq!(f.tensor_infos().len(), 272);
    let params: usize = f.tensor_infos().iter().map(|i| i.n_elements()).sum();
    assert_eq!(params, 134_515_008);
    assert_eq!(
        f.tensor_info("token_embd.weight").unwrap().ggml_type(),
        GgmlType::Q8_0
    );
    assert_eq!(
        f.tensor_info("token_embd.weight").unwrap().gguf_dims(),
        [576, 49152]
    );
}

#[test]
fn real_gguf_dequantizes_embedding_and_q4_1_matrices() {
    let Some(f) = real_model() else { return };
    let embd = f.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(embd.shape, [49152, 576]);
    assert!(embd.data.iter().all(|v| v.is_finite()));
    for (name, shape) in [
        ("blk.0.attn_q.weight", [576, 576]),
        ("blk.0.attn_k.weight", [192, 576]),
        ("blk.0.attn_v.weight", [192, 576]),
        ("blk.0.attn_output.weight", [576, 576]),
        ("blk.29.ffn_gate.weight", [1536, 576]),
        ("blk.29.ffn_down.weight", [576, 1536]),
    ] {
        assert_eq!(
            f.tensor_info(name).unwrap().ggml_type(),
            GgmlType::Q4_1,
            "{name}"
        );
        let t = f.tensor_f32(name).unwrap();
        assert_eq!(t.shape, shape, "{name}");
        assert!(t.data.iter().all(|v| v.is_finite()), "{name}");
    }
    let q = f.tensor_f32("blk.0.attn_q.weight").unwrap();
    assert_eq!(
        llama_permute_to_rotate_half(&q, 9).unwrap().shape,
        [576, 576]
    );
    assert_eq!(f.tensor_f32("blk.0.attn_norm.weight").unwrap().shape, [576]);
}

/// Protocol: kvpress's capture of layer 0's attention inputs during the 384-token prefill of
/// *Pride and Prejudice* (`prefill_kv_layers_0_14_29.safetensors`: `L0.hidden_in` [1, 384, 576],
/// `L0.keys_in` / `L0.values_in` [1, 3, 384, 64], post-RoPE keys in HF rotate-half layout).
/// Recomputed from our dequantized Q8_0 embedding, F32 norm and Q4_1 K/V weights (K un-permuted)
/// in fp32 on the host. Tolerances: 1e-5 of the largest magnitude for the norm and the linear
/// layer (fp32 summation order), 1e-4 for the keys (fp32 RoPE angles up to 383 rad differ in the
/// last bits between our `sin_cos` and PyTorch's).
#[test]
fn real_layer0_attention_inputs_match_kvpress() {
    let (Some(f), Some(path)) = (
        real_model(),
        fixture_path("kvpress-smollm2-pp/prefill_kv_layers_0_14_29.safetensors"),
    ) else {
        return;
    };
    let fx = read_fixture(
        &path,
        &["input_ids", "L0.hidden_in", "L0.keys_in", "L0.values_in"],
    );
    let (_, ids) = fx["input_ids"].i64();
    let embd = f.tensor_f32("token_embd.weight").unwrap();
    let x: Vec<f32> = ids[..384]
        .iter()
        .flat_map(|&id| embd.row(id as usize).unwrap().to_vec())
        .collect();
    let norm = f.tensor_f32("blk.0.attn_norm.weight").unwrap();
    let eps = f.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap();
    let hidden = rms_norm(&x, &norm.data, eps);
    let (shape, hidden_ref) = fx["L0.hidden_in"].f32();
    assert_eq!(shape, [1, 384, 576]);
    let (diff, scale) = max_abs_diff(&hidden, hidden_ref);
    assert!(
        diff <= 1e-5 * scale,
        "hidden_in: max diff {diff} (scale {scale})"
    );

    let v = linear(hidden_ref, &f.tensor_f32("blk.0.attn_v.weight").unwrap());
    let (diff, scale) = max_abs_diff(
        &seq_heads_to_heads_seq(&v, 3, 64),
        fx["L0.values_in"].f32().1,
    );
    assert!(
        diff <= 1e-5 * scale,
        "values_in: max diff {diff} (scale {scale})"
    );

    let k_gguf = f.tensor_f32("blk.0.attn_k.weight").unwrap();
    let keys_ref = fx["L0.keys_in"].f32().1;
    let keys = |w: &HostTensor| {
        let mut k = linear(hidden_ref, w);
        rope_rotate_half(&mut k, 3, 64, 100000.0);
        seq_heads_to_heads_seq(&k, 3, 64)
    };
    let (diff, scale) = max_abs_diff(
        &keys(&llama_permute_to_rotate_half(&k_gguf, 3).unwrap()),
        keys_ref,
    );
    assert!(
        diff <= 1e-4 * scale,
        "keys_in: max diff {diff} (scale {scale})"
    );
    // Without the un-permutation the keys are far off: the helper is what makes them agree.
    let (diff, scale) = max_abs_diff(&keys(&k_gguf), keys_ref);
    assert!(
        diff > 0.1 * scale,
        "stored rows should be permuted (diff {diff}, scale {scale})"
    );
}
