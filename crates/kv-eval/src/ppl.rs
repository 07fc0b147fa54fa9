//! Perplexity under a cache method, in three protocols.
//!
//! - **A** (`a`, kvpress's): prefill `P` tokens with the method active, compress once at the
//!   end of prefill, then score the next `C` tokens teacher-forced in one pass at their true
//!   positions. Token `P` is predicted by the prefill's last logits.
//! - **B** (`windows`): protocol A repeated over consecutive windows of `P + C` tokens across
//!   the whole text; reports the pooled perplexity and the spread over windows.
//! - **C** (`stream`): prefill `P` tokens, then feed the `C` scored tokens one at a time as in
//!   decoding, so that every scored token goes through the compressed cache (StreamingLLM,
//!   H2O and KIVI's residual window act here).

use std::time::Instant;

use kv_core::{LayerCaches, MemoryReport};
use kv_model::Llama;
use serde::{Deserialize, Serialize};

use crate::{EvalError, Result};

/// Which protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Compress once after prefill; score teacher-forced in one pass.
    A,
    /// Protocol A over many windows.
    Windows,
    /// Score token by token through the cache.
    Stream,
}

impl std::str::FromStr for Protocol {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "a" | "A" => Ok(Protocol::A),
            "windows" | "b" | "B" => Ok(Protocol::Windows),
            "stream" | "c" | "C" => Ok(Protocol::Stream),
            _ => Err(EvalError::Usage(format!(
                "unknown protocol `{s}` (a | windows | stream)"
            ))),
        }
    }
}

/// One scored window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WindowResult {
    /// First token index of the window in the token stream.
    pub start: usize,
    /// Mean NLL of its scored tokens.
    pub nll: f64,
    /// `exp(nll)`.
    pub ppl: f64,
    /// Memory after the prefill's compression.
    pub memory_after_prefill: MemoryReport,
    /// Memory at the end of the window.
    pub memory_at_end: MemoryReport,
    /// Prefill tokens per second.
    pub prefill_tokens_per_s: f64,
    /// Scored tokens per second (one pass for A, one token per step for stream).
    pub decode_tokens_per_s: f64,
}

/// Runs one window: prefill `ids[..p]`, then score `ids[p..p+c]`; positions start at 0.
///
/// # Errors
/// Model and cache errors.
pub fn run_window(
    model: &Llama,
    caches: &mut LayerCaches,
    ids: &[u32],
    p: usize,
    c: usize,
    stream: bool,
    start: usize,
) -> Result<WindowResult> {
    if p == 0 || c == 0 || ids.len() < p + c {
        return Err(EvalError::Text(format!(
            "need {} tokens for prefill {p} + score {c}, have {}",
            p + c,
            ids.len()
        )));
    }
    let h = model.config().hidden_size;
    caches.reset();
    let t0 = Instant::now();
    let pos: Vec<u32> = (0..p as u32).collect();
    let hidden = model.forward_hidden(&ids[..p], &pos, 1, caches)?;
    caches.end_prefill()?;
    let last = hidden.slice([0..1, p - 1..p, 0..h]).reshape([1, h]);
    let mut nll = model.nll(last, &ids[p..p + 1]);
    let prefill_s = t0.elapsed().as_secs_f64();
    let memory_after_prefill = caches.memory();

    let t1 = Instant::now();
    if stream {
        for i in p..p + c - 1 {
            let hid = model.forward_hidden(&ids[i..i + 1], &[i as u32], 1, caches)?;
            nll.extend(model.nll(hid.reshape([1, h]), &ids[i + 1..i + 2]));
        }
    } else if c > 1 {
        let rest: Vec<u32> = (p as u32..(p + c - 1) as u32).collect();
        let hid = model.forward_hidden(&ids[p..p + c - 1], &rest, 1, caches)?;
        nll.extend(model.nll(hid.reshape([c - 1, h]), &ids[p + 1..p + c]));
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let mean = nll.iter().map(|&x| f64::from(x)).sum::<f64>() / nll.len() as f64;
    Ok(WindowResult {
        start,
        nll: mean,
        ppl: mean.exp(),
        memory_after_prefill,
        memory_at_end: caches.memory(),
        prefill_tokens_per_s: p as f64 / prefill_s.max(1e-9),
        decode_tokens_per_s: c as f64 / decode_s.max(1e-9),
    })
}

/// The NLL of one uncached forward pass over `ids` (mean over ids 1..n, each predicted from
/// the previous position): the "one forward" reference number.
///
/// # Errors
/// Model and cache errors.
pub fn full_forward_nll(model: &Llama, caches: &mut LayerCaches, ids: &[u32]) -> Result<f64> {
    let h = model.config().hidden_size;
    let n = ids.len();
    caches.reset();
    let pos: Vec<u32> = (0..n as u32).collect();
    let hid = model.forward_hidden(ids, &pos, 1, caches)?;
    let nll = model.nll(
        hid.slice([0..1, 0..n - 1, 0..h]).reshape([n - 1, h]),
        &ids[1..],
    );
    Ok(nll.iter().map(|&x| f64::from(x)).sum::<f64>() / nll.len() as f64)
}
