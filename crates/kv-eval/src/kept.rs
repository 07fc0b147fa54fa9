//! The token positions a method keeps after a prefill (for conformance with kvpress).

use kv_core::LayerCaches;
use kv_model::Llama;
use serde::{Deserialize, Serialize};

use crate::method::PipelineSpec;
use crate::{EvalError, Result};

/// The result of `kv-eval kept`: per layer and KV head, the original positions held by
/// sequence 0 after the prefill's compression, ascending.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeptReport {
    /// `layers[l][h]` = positions kept by KV head `h` of layer `l`.
    pub layers: Vec<Vec<Vec<u32>>>,
    /// The method or pipeline in its one-line form.
    pub method: String,
    /// The pipeline with every parameter.
    pub stages: PipelineSpec,
    /// Tokens taken from the text.
    pub tokens: usize,
    /// Tokens prefilled with the method active.
    pub prefill: usize,
}

/// Prefills `ids[..prefill]` and reads the kept positions from every layer's view.
///
/// # Errors
/// Model and cache errors; `prefill` of zero or beyond the tokens.
pub fn kept_positions(
    model: &Llama,
    caches: &mut LayerCaches,
    ids: &[u32],
    prefill: usize,
) -> Result<Vec<Vec<Vec<u32>>>> {
    if prefill == 0 || prefill > ids.len() {
        return Err(EvalError::Usage(format!(
            "--prefill {prefill} must be in 1..={}",
            ids.len()
        )));
    }
    caches.reset();
    let pos: Vec<u32> = (0..prefill as u32).collect();
    model.forward_hidden(&ids[..prefill], &pos, 1, caches)?;
    caches.end_prefill()?;
    let mut layers = Vec::with_capacity(caches.len());
    for cache in caches.iter() {
        let view = cache.view();
        let [_, kvh, t, _] = view.keys.dims();
        let heads = (0..kvh)
            .map(|h| {
                view.positions[h * t..(h + 1) * t]
                    .iter()
                    .copied()
                    .filter(|&p| p != kv_core::PAD)
                    .collect()
            })
            .collect();
        layers.push(heads);
    }
    Ok(layers)
}
