//! Prefill and decode throughput of the model through a method's caches.

use std::time::Instant;

use kv_core::LayerCaches;
use kv_model::Llama;
use serde::{Deserialize, Serialize};

use crate::{EvalError, Result};

/// Throughput at one context length.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpeedResult {
    /// Prompt tokens.
    pub context: usize,
    /// Prompt tokens per second (one prefill pass).
    pub prefill_tokens_per_s: f64,
    /// Generated tokens per second (one token per step, after the prefill).
    pub decode_tokens_per_s: f64,
    /// Decode steps timed.
    pub decode_steps: usize,
    /// Bytes the caches held at the end.
    pub stored_bytes: usize,
}

/// Prefills `ids[..context]` and then decodes `steps` tokens (teacher-forced from `ids`, so
/// the work is the same as generation without sampling noise).
///
/// # Errors
/// Model and cache errors; too few tokens.
pub fn measure(
    model: &Llama,
    caches: &mut LayerCaches,
    ids: &[u32],
    context: usize,
    steps: usize,
) -> Result<SpeedResult> {
    if ids.len() < context + steps || context == 0 {
        return Err(EvalError::Text(format!(
            "need {} tokens, have {}",
            context + steps,
            ids.len()
        )));
    }
    caches.reset();
    let t = Instant::now();
    let pos: Vec<u32> = (0..context as u32).collect();
    let hidden = model.forward_hidden(&ids[..context], &pos, 1, caches)?;
    hidden.into_data();
    caches.end_prefill()?;
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in context..context + steps {
        let h = model.forward_hidden(&ids[i..i + 1], &[i as u32], 1, caches)?;
        h.into_data();
    }
    let decode = t.elapsed().as_secs_f64();
    Ok(SpeedResult {
        context,
        prefill_tokens_per_s: context as f64 / prefill.max(1e-9),
        decode_tokens_per_s: steps as f64 / decode.max(1e-9),
        decode_steps: steps,
        stored_bytes: caches.memory().stored_bytes(),
    })
}
