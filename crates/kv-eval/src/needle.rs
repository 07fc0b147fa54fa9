//! Passkey retrieval ("needle in a haystack") in real text.
//!
//! A haystack of book text is cut to a target length in tokens; a sentence holding a random
//! five-digit pass key is inserted at a relative depth; the prompt ends with a question. The
//! model greedily generates a few tokens through the method's caches (prefill compressed at
//! its end, then decoding), and the trial succeeds if the generated text contains the key.

use kv_core::LayerCaches;
use kv_model::Llama;
use kv_model::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::{EvalError, Result};

/// One retrieval trial.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NeedleTrial {
    /// Prompt length in tokens.
    pub length: usize,
    /// Relative depth of the needle in the haystack (0 = start, 1 = end).
    pub depth: f64,
    /// The pass key.
    pub key: u32,
    /// What the model generated.
    pub answer: String,
    /// Whether the answer contains the key.
    pub found: bool,
    /// Bytes the caches held after the prefill's compression.
    pub stored_bytes: usize,
    /// Compression ratio against the fp16 cache, after prefill.
    pub compression_ratio: f64,
}

/// Deterministic pass key for a trial.
pub fn pass_key(length: usize, depth: f64, seed: u64) -> u32 {
    let mut x = seed ^ (length as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (depth * 1e6) as u64;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    10_000 + (x % 90_000) as u32
}

/// Builds the prompt ids: haystack tokens with the needle at `depth`, then the question, in
/// `length` tokens in total.
///
/// # Errors
/// [`EvalError::Text`] if the haystack is too short.
pub fn build_prompt(
    tok: &Tokenizer,
    haystack: &[u32],
    length: usize,
    depth: f64,
    key: u32,
) -> Result<Vec<u32>> {
    let needle = tok.encode(&format!(
        " The pass key is {key}. Remember it. {key} is the pass key. "
    ));
    // With the instruct model's chat markers when the vocabulary has them (SmolLM2 does):
    // `<|im_start|>user\n{text}\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\n...`.
    let (head, question) = match (
        tok.token_to_id("<|im_start|>"),
        tok.token_to_id("<|im_end|>"),
    ) {
        (Some(start), Some(end)) => {
            let mut head = vec![start];
            head.extend(tok.encode("user\nThere is a pass key hidden in this text. Find it.\n"));
            let mut q = tok.encode("\n\nWhat is the pass key?");
            q.push(end);
            q.extend(tok.encode("\n"));
            q.push(start);
            q.extend(tok.encode("assistant\nThe pass key is"));
            (head, q)
        }
        _ => (
            Vec::new(),
            tok.encode("\n\nWhat is the pass key? The pass key is"),
        ),
    };
    let fill = length
        .checked_sub(head.len() + needle.len() + question.len())
        .ok_or_else(|| {
            EvalError::Text(format!(
                "length {length} is too short for the needle and question"
            ))
        })?;
    if haystack.len() < fill {
        return Err(EvalError::Text(format!(
            "haystack of {} tokens is shorter than {fill}",
            haystack.len()
        )));
    }
    let at = ((fill as f64) * depth.clamp(0.0, 1.0)) as usize;
    let mut ids = Vec::with_capacity(length);
    ids.extend_from_slice(&head);
    ids.extend_from_slice(&haystack[..at]);
    ids.extend_from_slice(&needle);
    ids.extend_from_slice(&haystack[at..fill]);
    ids.extend_from_slice(&question);
    Ok(ids)
}

/// Runs one trial with fresh caches.
///
/// # Errors
/// Model and cache errors.
pub fn run_trial(
    model: &Llama,
    tok: &Tokenizer,
    caches: &mut LayerCaches,
    haystack: &[u32],
    length: usize,
    depth: f64,
    seed: u64,
) -> Result<NeedleTrial> {
    let key = pass_key(length, depth, seed);
    let prompt = build_prompt(tok, haystack, length, depth, key)?;
    caches.reset();
    // Generation ends prefill itself; memory is read after the first decode step's append,
    // which adds one token to what the compressed prefill holds.
    let out = model.generate_greedy(&prompt, 8, tok.eos_id(), caches)?;
    let m = caches.memory();
    let answer = tok.decode_lossy(&out)?;
    Ok(NeedleTrial {
        length,
        depth,
        key,
        found: answer.contains(&key.to_string()),
        answer,
        stored_bytes: m.stored_bytes(),
        compression_ratio: m.compression_ratio(),
    })
}
