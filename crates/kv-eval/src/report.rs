//! The JSON documents the CLI writes and the tables it prints.

use kv_core::MemoryReport;
use serde::{Deserialize, Serialize};

use crate::method::{MethodSpec, PipelineSpec};
use crate::ppl::{Protocol, WindowResult};

/// The result of `kv-eval ppl` (documented field by field in `docs/eval-cli.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PplReport {
    /// Perplexity, `exp(nll)`.
    pub ppl: f64,
    /// Mean negative log-likelihood of the scored tokens, in nats.
    pub nll: f64,
    /// Number of scored tokens (over all windows).
    pub tokens_scored: usize,
    /// Bytes the caches physically hold after the prefill's compression, summed over layers.
    pub stored_bytes: usize,
    /// The dense fp16 cache of the same tokens.
    pub dense_fp16_bytes: usize,
    /// `dense_fp16_bytes / stored_bytes`.
    pub compression_ratio: f64,
    /// Stored bits per key/value element.
    pub bits_per_element: f64,
    /// Prefill tokens per second (mean over windows).
    pub prefill_tokens_per_s: f64,
    /// Scored tokens per second (mean over windows).
    pub decode_tokens_per_s: f64,
    /// The method or pipeline in its one-line form.
    pub method: String,
    /// The stages with all their parameters.
    pub stages: Vec<MethodSpec>,
    /// The codec of the evicted tokens, for pipelines that keep them at low precision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted: Option<MethodSpec>,
    /// The protocol.
    pub protocol: Protocol,
    /// Prefill tokens per window.
    pub prefill: usize,
    /// Scored tokens per window.
    pub score: usize,
    /// The model file or folder.
    pub model: String,
    /// The text file.
    pub text: String,
    /// Where the token stream starts.
    pub start_at: Option<String>,
    /// Whether a BOS token was prepended.
    pub bos: bool,
    /// Memory after the prefill's compression (last window).
    pub memory_after_prefill: MemoryReport,
    /// Memory after scoring (last window).
    pub memory_at_end: MemoryReport,
    /// Per-window results (one entry for protocols A and stream).
    pub windows: Vec<WindowResult>,
    /// Mean of the per-window perplexities.
    pub window_ppl_mean: f64,
    /// Standard deviation of the per-window perplexities (0 for one window).
    pub window_ppl_std: f64,
    /// The device the run used.
    pub device: String,
}

impl PplReport {
    /// Builds the report from window results.
    ///
    /// # Panics
    /// If `windows` is empty.
    #[allow(
        clippy::too_many_arguments,
        reason = "a plain record of the run's inputs"
    )]
    pub fn from_windows(
        windows: Vec<WindowResult>,
        pipeline: PipelineSpec,
        protocol: Protocol,
        prefill: usize,
        score: usize,
        model: String,
        text: String,
        start_at: Option<String>,
        bos: bool,
        device: String,
    ) -> Self {
        let last = windows.last().expect("invariant: at least one window");
        let n = windows.len() as f64;
        let nll = windows.iter().map(|w| w.nll).sum::<f64>() / n;
        let mean = windows.iter().map(|w| w.ppl).sum::<f64>() / n;
        let var = windows.iter().map(|w| (w.ppl - mean).powi(2)).sum::<f64>() / n;
        let m = last.memory_after_prefill;
        PplReport {
            ppl: nll.exp(),
            nll,
            tokens_scored: windows.len() * score,
            stored_bytes: m.stored_bytes(),
            dense_fp16_bytes: m.dense_fp16_bytes(),
            compression_ratio: m.compression_ratio(),
            bits_per_element: m.bits_per_element(),
            prefill_tokens_per_s: windows.iter().map(|w| w.prefill_tokens_per_s).sum::<f64>() / n,
            decode_tokens_per_s: windows.iter().map(|w| w.decode_tokens_per_s).sum::<f64>() / n,
            method: pipeline.to_line(),
            memory_after_prefill: m,
            memory_at_end: last.memory_at_end,
            window_ppl_mean: mean,
            window_ppl_std: var.sqrt(),
            stages: pipeline.stages,
            evicted: pipeline.evicted,
            protocol,
            prefill,
            score,
            model,
            text,
            start_at,
            bos,
            windows,
            device,
        }
    }
}

/// Formats rows as a plain-text table with a header and right-aligned numbers.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    out.push_str(
        &widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  "),
    );
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// The table row of a perplexity report.
pub fn ppl_row(r: &PplReport, full_ppl: Option<f64>) -> Vec<String> {
    vec![
        r.method.clone(),
        format!("{:.3}", r.ppl),
        full_ppl.map_or("-".into(), |f| {
            format!("{:+.2}%", (r.ppl / f - 1.0) * 100.0)
        }),
        format!("{:.2}", r.stored_bytes as f64 / (1024.0 * 1024.0)),
        format!("{:.2}", r.bits_per_element),
        format!("{:.2}x", r.compression_ratio),
        format!("{:.0}", r.prefill_tokens_per_s),
        format!("{:.0}", r.decode_tokens_per_s),
    ]
}

/// The header matching [`ppl_row`].
pub const PPL_HEADER: [&str; 8] = [
    "method",
    "ppl",
    "vs full",
    "stored MiB",
    "bits/elt",
    "vs fp16",
    "prefill tok/s",
    "score tok/s",
];
