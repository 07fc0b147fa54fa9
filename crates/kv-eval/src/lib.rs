//! The evaluation harness of kv-compress: perplexity under any cache method on a real model
//! and text (three protocols), the token positions a method keeps, memory and speed, prefix
//! sharing across a batch (ChunkAttention), as tables and JSON. The `kv-eval` binary is its
//! command line.
//!
//! It does not implement compression methods; it finds them by name in [`method::registry`],
//! which lists what the technique crates provide.

pub mod assets;
pub mod calibrate;
mod error;
pub mod fidelity;
pub mod fisher;
pub mod kept;
pub mod method;
pub mod needle;
pub mod plot;
pub mod ppl;
pub mod prefix;
pub mod report;
pub mod speed;

pub use error::{EvalError, Result};
