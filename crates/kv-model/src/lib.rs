//! A Llama-family decoder on Burn with pluggable per-layer KV caches, plus GGUF/safetensors loaders and the GGUF BPE tokenizer.
//!
//! It is not a general inference engine: no sampling, batching server or chat templates, and
//! the loaders convert weights to `f32` on the host rather than running quantized kernels.
//!
//! The file-format modules work on the host without Burn:
//!
//! - [`gguf`]: a GGUF v2/v3 reader with dequantization (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
//!   Q8_0) and the llama.cpp Q/K row un-permutation;
//! - [`safetensors_io`]: Hugging Face safetensors weights to `f32`;
//! - [`config`]: [`LlamaConfig`] from a Hugging Face `config.json` or from GGUF metadata;
//! - [`tokenizer`]: the GPT-2-style byte-level BPE stored in a GGUF file.
//!
//! [`grad`] holds the same decoder on an autodiff device ([`GradLlama`]) for calibration that
//! needs gradients of the language-model loss (Fisher information, trained decision heads).
//!
//! All of them return [`HostTensor`]s (row-major, slowest dimension first) and report malformed
//! input as [`ModelError`], never by panicking.

pub mod config;
pub mod decoder;
pub mod gguf;
pub mod grad;
pub mod safetensors_io;
pub mod tokenizer;
pub mod weights;

mod error;
mod host;

pub use config::LlamaConfig;
pub use decoder::Llama;
pub use error::{ModelError, Result};
pub use grad::GradLlama;
pub use host::HostTensor;
pub use weights::{BlockWeights, HostWeights};
