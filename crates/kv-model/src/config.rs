//! `LlamaConfig`: the architecture numbers of a Llama-family model, from HF `config.json` or GGUF.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::gguf::GgufFile;
use crate::{ModelError, Result};

#[cfg(test)]
mod tests;

/// The architecture of a Llama-family decoder (RMSNorm, rotate-half RoPE, GQA, SwiGLU).
///
/// Field names follow Hugging Face's `LlamaConfig`. Build it with
/// [`LlamaConfig::from_hf_json`] / [`LlamaConfig::from_hf_json_file`] or
/// [`LlamaConfig::from_gguf`]; both call [`LlamaConfig::validate`]. The serde form is this
/// struct itself (unknown fields rejected); HF's `config.json` goes through `from_hf_json`, which
/// tolerates HF's many extra fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    /// Model width (embedding size).
    pub hidden_size: usize,
    /// Width of the SwiGLU feed-forward layer.
    pub intermediate_size: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA); divides `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Whether the LM head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Per-head width when it is not `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
}

/// The subset of an HF `config.json` that matters, with HF's defaults.
#[derive(Deserialize)]
struct HfConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    num_hidden_layers: usize,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    /// transformers < 5 writes `rope_theta` at the top level ...
    #[serde(default)]
    rope_theta: Option<f64>,
    /// ... transformers >= 5 writes it inside `rope_parameters`.
    #[serde(default)]
    rope_parameters: Option<HfRopeParameters>,
    /// The pre-5 name for non-default RoPE variants.
    #[serde(default)]
    rope_scaling: Option<HfRopeParameters>,
    vocab_size: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_max_position_embeddings")]
    max_position_embeddings: usize,
    #[serde(default)]
    hidden_act: Option<String>,
}

#[derive(Deserialize)]
struct HfRopeParameters {
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default, alias = "type")]
    rope_type: Option<String>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_max_position_embeddings() -> usize {
    2048
}

/// RoPE base llama.cpp assumes when `{arch}.rope.freq_base` is absent.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

impl LlamaConfig {
    /// Parses a Hugging Face `config.json` document.
    ///
    /// Reads `rope_theta` from the top level or from `rope_parameters` (transformers 5), and
    /// defaults `num_key_value_heads` to `num_attention_heads` as HF does.
    ///
    /// # Errors
    ///
    /// [`ModelError::Json`] for invalid JSON or missing required fields;
    /// [`ModelError::InvalidConfig`] for RoPE scaling variants other than `"default"`, an
    /// activation other than SiLU, or values [`LlamaConfig::validate`] rejects.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(json)?;
        if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(ModelError::InvalidConfig {
                field: "hidden_act",
                reason: format!("is `{act}`; only `silu` (SwiGLU) is supported"),
            });
        }
        for rope in [&hf.rope_parameters, &hf.rope_scaling]
            .into_iter()
            .flatten()
        {
            if let Some(kind) = rope.rope_type.as_deref().filter(|k| *k != "default") {
                return Err(ModelError::InvalidConfig {
                    field: "rope_type",
                    reason: format!("is `{kind}`; only plain RoPE (`default`) is supported"),
                });
            }
        }
        let rope_theta = hf
            .rope_theta
            .or_else(|| hf.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(DEFAULT_ROPE_THETA);
        let config = Self {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            num_hidden_layers: hf.num_hidden_layers,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            vocab_size: hf.vocab_size,
            tie_word_embeddings: hf.tie_word_embeddings,
            head_dim: hf.head_dim,
            max_position_embeddings: hf.max_position_embeddings,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a Hugging Face `config.json` file.
    ///
    /// # Errors
    ///
    /// [`ModelError::Io`], or as [`LlamaConfig::from_hf_json`].
    pub fn from_hf_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let json = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_hf_json(&json)
    }

    /// Reads the architecture from GGUF metadata (`{arch}.*` keys, `arch` being
    /// `general.architecture`).
    ///
    /// `vocab_size` comes from `{arch}.vocab_size`, else the length of `tokenizer.ggml.tokens`,
    /// else the rows of `token_embd.weight`; `tie_word_embeddings` is true when the file has no
    /// `output.weight`; `rope_theta` defaults to 10000 as in llama.cpp.
    ///
    /// # Errors
    ///
    /// [`ModelError::MissingMetadata`] / [`ModelError::MetadataType`] for required keys;
    /// [`ModelError::InvalidConfig`] for partial-rotary RoPE (`rope.dimension_count` smaller than
    /// the head width), RoPE scaling, or values [`LlamaConfig::validate`] rejects.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.architecture()?;
        let key = |k: &str| format!("{arch}.{k}");
        let opt_u32 = |k: &str| -> Result<Option<usize>> {
            let k = key(k);
            match file.metadata(&k) {
                None => Ok(None),
                Some(_) => file.get_u32(&k).map(|v| Some(v as usize)),
            }
        };
        let num_attention_heads = file.get_u32(&key("attention.head_count"))? as usize;
        let rope_theta = match file.metadata(&key("rope.freq_base")) {
            None => DEFAULT_ROPE_THETA,
            Some(_) => f64::from(file.get_f32(&key("rope.freq_base"))?),
        };
        if let Some(kind) = file
            .metadata(&key("rope.scaling.type"))
            .and_then(|v| v.as_str())
            && kind != "none"
        {
            return Err(ModelError::InvalidConfig {
                field: "rope_type",
                reason: format!("is `{kind}`; only plain RoPE is supported"),
            });
        }
        let vocab_size = match opt_u32("vocab_size")? {
            Some(v) => v,
            None => match file.get_str_array("tokenizer.ggml.tokens") {
                Ok(tokens) => tokens.len(),
                Err(_) => file
                    .tensor_info("token_embd.weight")
                    .and_then(|t| t.shape().first().copied())
                    .ok_or_else(|| ModelError::MissingMetadata(key("vocab_size")))?,
            },
        };
        let config = Self {
            hidden_size: file.get_u32(&key("embedding_length"))? as usize,
            intermediate_size: file.get_u32(&key("feed_forward_length"))? as usize,
            num_attention_heads,
            num_key_value_heads: opt_u32("attention.head_count_kv")?.unwrap_or(num_attention_heads),
            num_hidden_layers: file.get_u32(&key("block_count"))? as usize,
            rms_norm_eps: f64::from(file.get_f32(&key("attention.layer_norm_rms_epsilon"))?),
            rope_theta,
            vocab_size,
            tie_word_embeddings: file.tensor_info("output.weight").is_none(),
            head_dim: opt_u32("attention.key_length")?,
            max_position_embeddings: file.get_u32(&key("context_length"))? as usize,
        };
        config.validate()?;
        if let Some(rope_dims) = opt_u32("rope.dimension_count")?
            && rope_dims != config.effective_head_dim()
        {
            return Err(ModelError::InvalidConfig {
                field: "rope.dimension_count",
                reason: format!(
                    "is {rope_dims} but heads are {} wide; partial rotary RoPE is not supported",
                    config.effective_head_dim()
                ),
            });
        }
        Ok(config)
    }

    /// The per-head width: `head_dim` if set, else `hidden_size / num_attention_heads`.
    pub fn effective_head_dim(&self) -> usize {
        self.head_dim.unwrap_or_else(|| {
            self.hidden_size
                .checked_div(self.num_attention_heads)
                .unwrap_or(0)
        })
    }

    /// Query heads per KV head (the GQA group size).
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads
            .checked_div(self.num_key_value_heads)
            .unwrap_or(0)
    }

    /// Checks that the numbers describe a buildable model.
    ///
    /// # Errors
    ///
    /// [`ModelError::InvalidConfig`] naming the first bad field: a zero size, KV heads not
    /// dividing query heads, `hidden_size` not divisible by the heads (without `head_dim`), an odd
    /// head width (RoPE rotates pairs), or a non-positive / non-finite `rms_norm_eps` or
    /// `rope_theta`.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |field: &'static str, reason: String| Err(ModelError::InvalidConfig { field, reason });
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(field, "must be positive".to_owned());
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(
                "num_key_value_heads",
                format!(
                    "({}) must divide num_attention_heads ({})",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            );
        }
        match self.head_dim {
            None if !self.hidden_size.is_multiple_of(self.num_attention_heads) => {
                return bad(
                    "hidden_size",
                    format!(
                        "({}) must divide by num_attention_heads ({})",
                        self.hidden_size, self.num_attention_heads
                    ),
                );
            }
            Some(0) => return bad("head_dim", "must be positive".to_owned()),
            _ => {}
        }
        if !self.effective_head_dim().is_multiple_of(2) {
            return bad(
                "head_dim",
                format!("({}) must be even for RoPE", self.effective_head_dim()),
            );
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(
                "rms_norm_eps",
                format!("({}) must be positive and finite", self.rms_norm_eps),
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(
                "rope_theta",
                format!("({}) must be positive and finite", self.rope_theta),
            );
        }
        Ok(())
    }
}
