//! Loading the model, its tokenizer and the text.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use kv_model::gguf::GgufFile;
use kv_model::tokenizer::Tokenizer;
use kv_model::{HostWeights, Llama};

use crate::{EvalError, Result};

/// The default asset folder: `$KV_ASSETS_DIR`, else `assets/` under the current directory
/// (what `cargo xtask setup` fills).
pub fn assets_dir() -> PathBuf {
    std::env::var_os("KV_ASSETS_DIR").map_or_else(|| PathBuf::from("assets"), PathBuf::from)
}

/// The real model's path inside the asset folder.
pub fn default_model_path() -> PathBuf {
    assets_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A book's path inside the asset folder (`prideprejudice`, `emma`, ...).
pub fn book_path(name: &str) -> PathBuf {
    assets_dir().join("text").join(format!("{name}.txt"))
}

/// A model with its tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    /// The decoder.
    pub model: Llama,
    /// The tokenizer (from the GGUF, or from `--tokenizer` for HF folders).
    pub tokenizer: Tokenizer,
}

/// Loads a GGUF file, or an HF folder (config.json + safetensors) with a tokenizer taken from
/// a GGUF file given as `tokenizer`.
///
/// # Errors
/// I/O or format errors; an HF folder without a tokenizer source.
pub fn load_model(path: &Path, tokenizer: Option<&Path>, device: &Device) -> Result<LoadedModel> {
    let (weights, tokenizer) = load_weights(path, tokenizer)?;
    Ok(LoadedModel {
        model: Llama::new(&weights, device)?,
        tokenizer,
    })
}

/// The host weights and tokenizer that [`load_model`] uploads (for models other than
/// [`Llama`], such as the differentiable [`kv_model::GradLlama`]).
///
/// # Errors
/// As [`load_model`].
pub fn load_weights(path: &Path, tokenizer: Option<&Path>) -> Result<(HostWeights, Tokenizer)> {
    if !path.exists() {
        return Err(EvalError::Usage(format!(
            "model `{}` does not exist; run `cargo xtask setup` for the real model or pass --model",
            path.display()
        )));
    }
    Ok(if path.is_dir() {
        let tok_path = tokenizer.ok_or_else(|| {
            EvalError::Usage(
                "an HF model folder needs --tokenizer FILE.gguf (a GGUF holding the BPE)".into(),
            )
        })?;
        (
            HostWeights::from_hf_dir(path)?,
            Tokenizer::from_gguf(&GgufFile::open(tok_path)?)?,
        )
    } else {
        let file = GgufFile::open(path)?;
        let tok = match tokenizer {
            Some(t) => Tokenizer::from_gguf(&GgufFile::open(t)?)?,
            None => Tokenizer::from_gguf(&file)?,
        };
        (HostWeights::from_gguf(&file)?, tok)
    })
}

/// Reads a UTF-8 text and cuts it at the first occurrence of `start_at` (if given).
///
/// # Errors
/// I/O, invalid UTF-8, or `start_at` not found.
pub fn read_text(path: &Path, start_at: Option<&str>) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| EvalError::Io {
        path: path.into(),
        source: e,
    })?;
    let text = String::from_utf8(bytes)
        .map_err(|_| EvalError::Text(format!("{} is not valid UTF-8", path.display())))?;
    match start_at {
        None => Ok(text),
        Some(s) => match text.find(s) {
            Some(i) => Ok(text[i..].to_owned()),
            None => Err(EvalError::Text(format!(
                "`{s}` does not occur in {}",
                path.display()
            ))),
        },
    }
}

/// Refuses the evaluation text (*Pride and Prejudice*) as a calibration text.
///
/// # Errors
/// [`EvalError::Usage`] naming the book to use instead.
pub fn check_calibration_text(text: &Path) -> Result<()> {
    if text.file_stem().and_then(|s| s.to_str()) == Some("prideprejudice") {
        return Err(EvalError::Usage(
            "Pride and Prejudice is the evaluation text: calibrate on another book (Emma)".into(),
        ));
    }
    Ok(())
}

/// The first `need` or more tokens of `text` (read from `source`): only a generous prefix is
/// tokenized, since BPE cost is linear in the text.
///
/// # Errors
/// [`EvalError::Text`] if the text gives fewer than `need` tokens.
pub fn encode_prefix(
    tokenizer: &Tokenizer,
    text: &str,
    need: usize,
    source: &Path,
) -> Result<Vec<u32>> {
    let cut = text
        .char_indices()
        .nth(need.saturating_mul(12))
        .map_or(text.len(), |(i, _)| i);
    let ids = tokenizer.encode(&text[..cut]);
    if ids.len() < need {
        return Err(EvalError::Text(format!(
            "{} gives {} tokens, {need} requested",
            source.display(),
            ids.len()
        )));
    }
    Ok(ids)
}

/// Creates the folder an output file goes into.
///
/// # Errors
/// [`EvalError::Io`].
pub fn create_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| EvalError::Io {
            path: dir.into(),
            source: e,
        })?;
    }
    Ok(())
}
