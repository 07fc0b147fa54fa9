//! Model weights in host memory, in one naming-independent form, from GGUF or HF safetensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::LlamaConfig;
use crate::gguf::{GgufFile, llama_permute_to_rotate_half};
use crate::{HostTensor, ModelError, Result};

/// One decoder block's weights, PyTorch layout (`[out, in]` for matrices), Q/K rows in
/// rotate-half RoPE order.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    /// RMSNorm weight before attention, `[hidden]`.
    pub attn_norm: HostTensor,
    /// Query projection, `[q_heads * head_dim, hidden]`.
    pub q: HostTensor,
    /// Key projection, `[kv_heads * head_dim, hidden]`.
    pub k: HostTensor,
    /// Value projection, `[kv_heads * head_dim, hidden]`.
    pub v: HostTensor,
    /// Output projection, `[hidden, q_heads * head_dim]`.
    pub o: HostTensor,
    /// RMSNorm weight before the MLP, `[hidden]`.
    pub mlp_norm: HostTensor,
    /// SwiGLU gate, `[ffn, hidden]`.
    pub gate: HostTensor,
    /// SwiGLU up, `[ffn, hidden]`.
    pub up: HostTensor,
    /// SwiGLU down, `[hidden, ffn]`.
    pub down: HostTensor,
}

/// A whole Llama-family model's weights in host memory.
#[derive(Debug, Clone)]
pub struct HostWeights {
    /// The architecture.
    pub config: LlamaConfig,
    /// Token embedding, `[vocab, hidden]`.
    pub embed: HostTensor,
    /// The blocks.
    pub blocks: Vec<BlockWeights>,
    /// Final RMSNorm weight, `[hidden]`.
    pub norm: HostTensor,
    /// LM head, `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<HostTensor>,
}

impl HostWeights {
    /// Loads a GGUF file (llama architecture), dequantizing every tensor to f32 and
    /// un-permuting llama.cpp's Q/K rows to rotate-half order.
    ///
    /// # Errors
    /// I/O, malformed files, missing tensors or shapes that disagree with the metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let config = LlamaConfig::from_gguf(file)?;
        let get = |name: &str| file.tensor_f32(name);
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let t = |s: &str| get(&format!("blk.{i}.{s}.weight"));
            blocks.push(BlockWeights {
                attn_norm: t("attn_norm")?,
                q: llama_permute_to_rotate_half(&t("attn_q")?, config.num_attention_heads)?,
                k: llama_permute_to_rotate_half(&t("attn_k")?, config.num_key_value_heads)?,
                v: t("attn_v")?,
                o: t("attn_output")?,
                mlp_norm: t("ffn_norm")?,
                gate: t("ffn_gate")?,
                up: t("ffn_up")?,
                down: t("ffn_down")?,
            });
        }
        let lm_head = match file.tensor_info("output.weight") {
            Some(_) => Some(get("output.weight")?),
            None => None,
        };
        let w = HostWeights {
            embed: get("token_embd.weight")?,
            norm: get("output_norm.weight")?,
            lm_head,
            blocks,
            config,
        };
        w.validate()?;
        Ok(w)
    }

    /// Loads HF safetensors weights (`model.safetensors` or every `*.safetensors` shard of a
    /// folder) with the architecture from `config.json`.
    ///
    /// # Errors
    /// I/O, malformed files, missing tensors or shapes that disagree with the config.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let config = LlamaConfig::from_hf_json_file(dir.join("config.json"))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::Io {
                path: dir.to_path_buf(),
                source: e,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ModelError::MissingTensor(format!(
                "no .safetensors file in {}",
                dir.display()
            )));
        }
        let mut map = BTreeMap::new();
        for f in &files {
            map.append(&mut crate::safetensors_io::load_safetensors_f32(f)?);
        }
        Self::from_hf_tensors(config, map)
    }

    /// Builds the weights from HF-named tensors.
    ///
    /// # Errors
    /// Missing tensors or shapes that disagree with the config.
    pub fn from_hf_tensors(
        config: LlamaConfig,
        mut map: BTreeMap<String, HostTensor>,
    ) -> Result<Self> {
        let mut take = |name: String| map.remove(&name).ok_or(ModelError::MissingTensor(name));
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}.");
            blocks.push(BlockWeights {
                attn_norm: take(format!("{p}input_layernorm.weight"))?,
                q: take(format!("{p}self_attn.q_proj.weight"))?,
                k: take(format!("{p}self_attn.k_proj.weight"))?,
                v: take(format!("{p}self_attn.v_proj.weight"))?,
                o: take(format!("{p}self_attn.o_proj.weight"))?,
                mlp_norm: take(format!("{p}post_attention_layernorm.weight"))?,
                gate: take(format!("{p}mlp.gate_proj.weight"))?,
                up: take(format!("{p}mlp.up_proj.weight"))?,
                down: take(format!("{p}mlp.down_proj.weight"))?,
            });
        }
        let embed = take("model.embed_tokens.weight".into())?;
        let norm = take("model.norm.weight".into())?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(take("lm_head.weight".into())?)
        };
        let w = HostWeights {
            config,
            embed,
            blocks,
            norm,
            lm_head,
        };
        w.validate()?;
        Ok(w)
    }

    /// Checks every tensor's shape against the config.
    ///
    /// # Errors
    /// [`ModelError::ShapeMismatch`] naming the tensor.
    pub fn validate(&self) -> Result<()> {
        let c = &self.config;
        let (h, d, f, v) = (
            c.hidden_size,
            c.effective_head_dim(),
            c.intermediate_size,
            c.vocab_size,
        );
        let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let check = |what: &str, t: &HostTensor, want: &[usize]| {
            if t.shape == want {
                Ok(())
            } else {
                Err(ModelError::ShapeMismatch {
                    what: what.to_owned(),
                    expected: want.to_vec(),
                    found: t.shape.clone(),
                })
            }
        };
        check("token embedding", &self.embed, &[v, h])?;
        check("final norm", &self.norm, &[h])?;
        if let Some(head) = &self.lm_head {
            check("lm head", head, &[v, h])?;
        }
        if self.blocks.len() != c.num_hidden_layers {
            return Err(ModelError::ShapeMismatch {
                what: "number of blocks".into(),
                expected: vec![c.num_hidden_layers],
                found: vec![self.blocks.len()],
            });
        }
        for (i, b) in self.blocks.iter().enumerate() {
            let n = |s: &str| format!("block {i} {s}");
            check(&n("attn_norm"), &b.attn_norm, &[h])?;
            check(&n("q"), &b.q, &[q, h])?;
            check(&n("k"), &b.k, &[kv, h])?;
            check(&n("v"), &b.v, &[kv, h])?;
            check(&n("o"), &b.o, &[h, q])?;
            check(&n("mlp_norm"), &b.mlp_norm, &[h])?;
            check(&n("gate"), &b.gate, &[f, h])?;
            check(&n("up"), &b.up, &[f, h])?;
            check(&n("down"), &b.down, &[h, f])?;
        }
        Ok(())
    }

    /// Loads a model from a GGUF file or from an HF folder (config.json + safetensors).
    ///
    /// # Errors
    /// As [`HostWeights::from_gguf`] / [`HostWeights::from_hf_dir`].
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::from_hf_dir(path)
        } else {
            Self::from_gguf(&GgufFile::open(path)?)
        }
    }
}
