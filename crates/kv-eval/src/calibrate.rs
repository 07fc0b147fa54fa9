//! `kv-eval calibrate`: runs the model over a calibration text (never the evaluation text),
//! captures every layer's keys (after and before RoPE), queries and values, and writes the
//! PCA artefact that the low-rank caches of `kv-lowrank` load (Loki, Eigen Attention), and
//! with `--kvquant FILE` the per-layer KVQuant calibration (thresholds and non-uniform
//! codebooks from the pre-RoPE keys and the values, Fisher-weighted with `--kvquant-fisher`)
//! that `kvquant:calibration=FILE` loads,
//! and with `--rvq FILE` the residual-VQ codebooks of `kv-pq` (from the post-RoPE keys and the
//! values, as the cache receives them) that `rvq:calibration=FILE` loads.
//!
//! Each layer's cache is a `Capture`: a full dense cache that feeds what it is given to a
//! shared [`CovarianceAccumulator`]. The text is cut into windows that run as independent
//! sequences (positions from 0), so activations come from every context length up to the
//! window.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use burn::prelude::*;
use kv_core::{
    Attended, DenseCache, DenseCacheConfig, HeldBuffer, KvBlock, KvCache, KvShape, KvView,
    LayerCaches, Lengths, MemoryReport, Query, Rope, StatsRequest,
};
use kv_lowrank::{Activation, CovarianceAccumulator};

use crate::{EvalError, Result, assets};

/// The command's usage text.
pub const USAGE: &str = "\
kv-eval calibrate: PCA bases of keys, queries and values for kv-lowrank (Loki, Eigen Attention)

USAGE:
  kv-eval calibrate --out FILE [--model PATH] [--text PATH] [--start-at STR]
                    [--tokens N] [--window N] [--tokenizer GGUF]
                    [--kvquant FILE [--kvquant-bits B] [--kvquant-sinks N] [--kvquant-fisher L]]
                    [--rvq FILE [--rvq-sub-dim D] [--rvq-entries C] [--rvq-stages S]]

Defaults: the SmolLM2 GGUF of the asset folder, the text of Emma (calibration and evaluation
texts must differ: evaluation uses Pride and Prejudice), 8192 tokens in windows of 2048.
--kvquant also writes KVQuant's calibration (JSON, one entry per layer) for B-bit codebooks
(default 4), sparsity threshold 0.99 (1% outliers) and N fp16 sink tokens (default 0).
--kvquant-fisher L weights its k-means by Fisher information (KVQuant's --fisher): the squared
gradients of the loss with respect to every pre-RoPE key and value, from one forward and
backward pass (Burn autodiff) per window of L tokens of the same calibration tokens (512 is a
few seconds per window for the 135M model); the activations then come from those windows.
--rvq also writes residual-VQ codebooks (JSON) per layer and KV head for keys and values:
groups of D channels (default 8), C entries per codebook (default 256), S stages (default 4),
k-means of 20 iterations on at most 16384 groups per KV head.";

/// One layer's captured windows of pre-RoPE keys and values (for KVQuant's calibration).
type Windows = Arc<Mutex<Vec<(Tensor<4>, Tensor<4>)>>>;

/// One layer's capture: a dense cache whose appended keys/values and attended queries are
/// added to the accumulator.
#[derive(Debug)]
struct Capture {
    inner: DenseCache,
    layer: usize,
    rope: Rope,
    acc: Arc<Mutex<CovarianceAccumulator>>,
    /// Pre-RoPE keys and values of this window, kept for KVQuant's calibration.
    keep: Option<Windows>,
    /// Post-RoPE keys and values of this window, kept for the residual-VQ calibration.
    keep_post: Option<Windows>,
}

impl Capture {
    fn observe(&self, act: Activation, x: &Tensor<4>) -> kv_core::Result<()> {
        self.acc
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(self.layer, act, x)
    }
}

impl KvCache for Capture {
    fn shape(&self) -> KvShape {
        self.inner.shape()
    }
    fn device(&self) -> &Device {
        self.inner.device()
    }
    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        self.observe(Activation::Keys, block.keys())?;
        if let Some(keep) = &self.keep_post {
            keep.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((block.keys().clone(), block.values().clone()));
        }
        let pre = self.rope.unapply(block.keys().clone(), block.positions());
        self.observe(Activation::KeysPreRope, &pre)?;
        if let Some(keep) = &self.keep {
            keep.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((pre.clone(), block.values().clone()));
        }
        self.observe(Activation::Values, block.values())?;
        self.inner.append(block)
    }
    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        self.observe(Activation::Queries, query.tensor())?;
        self.inner.attend(query, stats)
    }
    fn view(&self) -> KvView {
        self.inner.view()
    }
    fn lengths(&self) -> Lengths {
        self.inner.lengths()
    }
    fn memory(&self) -> MemoryReport {
        self.inner.memory()
    }
    fn held_buffers(&self) -> Vec<HeldBuffer> {
        self.inner.held_buffers()
    }
    fn reset(&mut self) {
        self.inner.reset();
    }
}

struct Options {
    out: PathBuf,
    model: PathBuf,
    text: PathBuf,
    start_at: Option<String>,
    tokenizer: Option<PathBuf>,
    tokens: usize,
    window: usize,
    kvquant: Option<PathBuf>,
    kvquant_bits: u32,
    kvquant_sinks: usize,
    kvquant_fisher: Option<usize>,
    rvq: Option<PathBuf>,
    rvq_sub_dim: usize,
    rvq_entries: usize,
    rvq_stages: usize,
}

fn parse(raw: &[String]) -> Result<Options> {
    let mut o = Options {
        out: PathBuf::new(),
        model: assets::default_model_path(),
        text: assets::book_path("emma"),
        start_at: None,
        tokenizer: None,
        tokens: 8192,
        window: 2048,
        kvquant: None,
        kvquant_bits: 4,
        kvquant_sinks: 0,
        kvquant_fisher: None,
        rvq: None,
        rvq_sub_dim: 8,
        rvq_entries: 256,
        rvq_stages: 4,
    };
    let mut it = raw.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| EvalError::Usage(format!("{flag} needs a value\n\n{USAGE}")))?;
        let count = |v: &str| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| EvalError::Usage(format!("{flag} `{v}` is not a positive count")))
        };
        match flag.as_str() {
            "--out" => o.out = PathBuf::from(value),
            "--model" => o.model = PathBuf::from(value),
            "--text" => o.text = PathBuf::from(value),
            "--start-at" => o.start_at = Some(value.clone()),
            "--tokenizer" => o.tokenizer = Some(PathBuf::from(value)),
            "--tokens" => o.tokens = count(value)?,
            "--window" => o.window = count(value)?,
            "--kvquant" => o.kvquant = Some(PathBuf::from(value)),
            "--rvq" => o.rvq = Some(PathBuf::from(value)),
            "--kvquant-fisher" => {
                o.kvquant_fisher = Some(
                    value
                        .parse::<usize>()
                        .ok()
                        .filter(|&n| n >= 2)
                        .ok_or_else(|| {
                            EvalError::Usage(format!(
                                "--kvquant-fisher `{value}` is not a window of at least 2 tokens"
                            ))
                        })?,
                );
            }
            "--rvq-sub-dim" => o.rvq_sub_dim = count(value)?,
            "--rvq-entries" => o.rvq_entries = count(value)?,
            "--rvq-stages" => o.rvq_stages = count(value)?,
            "--kvquant-bits" => {
                o.kvquant_bits = value
                    .parse()
                    .ok()
                    .filter(|b| (2..=4).contains(b))
                    .ok_or_else(|| {
                        EvalError::Usage(format!("--kvquant-bits `{value}` is not 2, 3 or 4"))
                    })?;
            }
            "--kvquant-sinks" => {
                o.kvquant_sinks = value.parse().map_err(|_| {
                    EvalError::Usage(format!("--kvquant-sinks `{value}` is not a count"))
                })?;
            }
            _ => {
                return Err(EvalError::Usage(format!(
                    "unknown option {flag}\n\n{USAGE}"
                )));
            }
        }
    }
    if o.out.as_os_str().is_empty() {
        return Err(EvalError::Usage(format!("--out is required\n\n{USAGE}")));
    }
    assets::check_calibration_text(&o.text)?;
    if o.kvquant_fisher.is_some() && o.kvquant.is_none() {
        return Err(EvalError::Usage(
            "--kvquant-fisher weights KVQuant's calibration: add --kvquant FILE".into(),
        ));
    }
    Ok(o)
}

/// Runs `kv-eval calibrate` with the arguments after the command name.
///
/// # Errors
/// Usage errors, model and text loading, cache errors, writing the artefact.
pub fn run(raw: &[String]) -> Result<()> {
    if raw.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let o = parse(raw)?;
    let device = kv_testkit::test_device();
    let t0 = Instant::now();
    let (weights, tokenizer) = assets::load_weights(&o.model, o.tokenizer.as_deref())?;
    let loaded = assets::LoadedModel {
        model: kv_model::Llama::new(&weights, &device)?,
        tokenizer,
    };
    // The host weights are only needed again for KVQuant's Fisher pass.
    let weights = o.kvquant_fisher.is_some().then_some(weights);
    let text = assets::read_text(&o.text, o.start_at.as_deref())?;
    let ids = assets::encode_prefix(&loaded.tokenizer, &text, o.tokens, &o.text)?;
    let model = &loaded.model;
    let shape = model.kv_shape(1)?;
    let layers = model.config().num_hidden_layers;
    let acc = Arc::new(Mutex::new(CovarianceAccumulator::new(layers, shape)));
    // Per layer, the pre-RoPE keys and values of every whole window (KVQuant).
    let kept: Vec<Windows> = (0..layers)
        .map(|_| Arc::new(Mutex::new(Vec::new())))
        .collect();
    // Per layer, the post-RoPE keys and values of every whole window (residual VQ).
    let kept_post: Vec<Windows> = (0..layers)
        .map(|_| Arc::new(Mutex::new(Vec::new())))
        .collect();
    for (w, chunk) in ids[..o.tokens].chunks(o.window).enumerate() {
        let whole = chunk.len() == o.window;
        let caches = (0..layers)
            .map(|layer| {
                Ok(Box::new(Capture {
                    inner: DenseCacheConfig::new(shape).init(&device)?,
                    layer,
                    rope: model.rope().clone(),
                    acc: acc.clone(),
                    keep: (o.kvquant.is_some() && o.kvquant_fisher.is_none() && whole)
                        .then(|| kept[layer].clone()),
                    keep_post: (o.rvq.is_some() && whole).then(|| kept_post[layer].clone()),
                }) as Box<dyn KvCache>)
            })
            .collect::<kv_core::Result<Vec<_>>>()?;
        let mut caches = LayerCaches::new(caches);
        let pos: Vec<u32> = (0..chunk.len() as u32).collect();
        model.forward_hidden(chunk, &pos, 1, &mut caches)?;
        acc.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add_tokens(chunk.len());
        eprintln!(
            "window {w}: {} tokens ({:.1}s)",
            chunk.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    let acc = Arc::try_unwrap(acc)
        .map_err(|_| EvalError::Usage("capture caches still alive".into()))?
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    let name = |p: &Path| {
        p.file_name()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
    };
    let cal = acc.finish(&name(&o.model), &name(&o.text))?;
    assets::create_parent(&o.out)?;
    cal.save(&o.out)?;
    if let Some(path) = &o.kvquant {
        let windows = match (&weights, o.kvquant_fisher) {
            (Some(w), Some(len)) => fisher_windows(w, &ids[..o.tokens], len, &device)?,
            _ => kept
                .iter()
                .map(|w| {
                    std::mem::take(&mut *w.lock().unwrap_or_else(PoisonError::into_inner))
                        .into_iter()
                        .map(|(k, v)| (k, v, None))
                        .collect()
                })
                .collect(),
        };
        write_kvquant(path, windows, &o)?;
    }
    if let Some(path) = &o.rvq {
        write_rvq(path, &kept_post, &o, &name(&o.model), &name(&o.text))?;
    }
    let m = cal.meta();
    eprintln!(
        "wrote {}: {} layers x {} KV heads x head_dim {}, {} tokens of {}, {:?} ({:.1}s)",
        o.out.display(),
        m.num_layers,
        m.kv_heads,
        m.head_dim,
        m.tokens,
        m.source,
        m.activations,
        t0.elapsed().as_secs_f64()
    );
    // The share of variance in the first quarter of the dimensions, per activation (layer 0 and
    // the mean over layers): how low-rank the activations are.
    for act in Activation::ALL {
        let share = |layer: usize| -> f64 {
            let mut s = 0.0;
            for head in 0..m.kv_heads {
                let ev = cal.eigenvalues(act, layer, head).unwrap_or(&[]);
                let total: f32 = ev.iter().sum();
                let top: f32 = ev.iter().take(m.head_dim / 4).sum();
                s += f64::from(top / total.max(f32::MIN_POSITIVE));
            }
            s / m.kv_heads as f64
        };
        let mean = (0..m.num_layers).map(share).sum::<f64>() / m.num_layers as f64;
        println!(
            "{:>14}: variance in the top {} of {} dims: layer 0 {:.3}, mean over layers {:.3}",
            act.name(),
            m.head_dim / 4,
            m.head_dim,
            share(0),
            mean
        );
    }
    Ok(())
}

/// Calibrates KVQuant per layer from the captured windows (each window one sequence) and
/// writes the JSON array `kvquant:calibration=FILE` reads.
/// One window of a layer for KVQuant: pre-RoPE keys, values, and optionally the Fisher
/// weights (squared gradients) of both, each `[1, kv_heads, tokens, head_dim]`.
type KvQuantWindow = (Tensor<4>, Tensor<4>, Option<(Tensor<4>, Tensor<4>)>);

/// KVQuant's Fisher pass: per layer, the pre-RoPE keys and values of every whole window of
/// `len` tokens and the squared gradients of the mean next-token loss with respect to them
/// (zero probes added to the activations in [`kv_model::GradLlama::loss`]).
fn fisher_windows(
    weights: &kv_model::HostWeights,
    ids: &[u32],
    len: usize,
    device: &Device,
) -> Result<Vec<Vec<KvQuantWindow>>> {
    let t0 = Instant::now();
    let model = kv_model::GradLlama::new(weights, device)?;
    let layers = model.config().num_hidden_layers;
    let mut out: Vec<Vec<KvQuantWindow>> = (0..layers).map(|_| Vec::new()).collect();
    let plain = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data(), device);
    let upload = |h: &kv_model::HostTensor, square: bool| {
        let data: Vec<f32> = if square {
            h.data.iter().map(|g| g * g).collect()
        } else {
            h.data.clone()
        };
        let s = &h.shape;
        Tensor::<4>::from_data(TensorData::new(data, [s[0], s[1], s[2], s[3]]), device)
    };
    let whole: Vec<&[u32]> = ids.chunks(len).filter(|c| c.len() == len).collect();
    if whole.is_empty() {
        return Err(EvalError::Usage(format!(
            "--kvquant-fisher {len} leaves no whole window in {} tokens",
            ids.len()
        )));
    }
    for (w, chunk) in whole.iter().enumerate() {
        let probes = model.kv_probes(1, len);
        let mut acts: Vec<(Tensor<4>, Tensor<4>)> = Vec::with_capacity(layers);
        let loss = model.loss(chunk, 1, Some(&probes), &mut |a| {
            acts.push((plain(&a.keys_pre_rope), plain(&a.values)));
            kv_model::grad::causal_attention(a.queries, a.keys, a.values)
        })?;
        let grads = probes.grads(&loss.backward())?;
        for (layer, ((k, v), g)) in acts.into_iter().zip(grads).enumerate() {
            let fisher = (upload(&g.keys, true), upload(&g.values, true));
            out[layer].push((k, v, Some(fisher)));
        }
        eprintln!(
            "fisher window {}/{}: {len} tokens ({:.1}s)",
            w + 1,
            whole.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(out)
}

fn write_kvquant(path: &Path, windows: Vec<Vec<KvQuantWindow>>, o: &Options) -> Result<()> {
    let t0 = Instant::now();
    let mut layers = Vec::with_capacity(windows.len());
    for (layer, windows) in windows.into_iter().enumerate() {
        if windows.is_empty() {
            return Err(EvalError::Usage(format!(
                "--kvquant needs at least one whole window of {} tokens",
                o.kvquant_fisher.unwrap_or(o.window)
            )));
        }
        let weighted = windows.iter().all(|w| w.2.is_some());
        let (mut ks, mut vs, mut fks, mut fvs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (k, v, f) in windows {
            ks.push(k);
            vs.push(v);
            if let Some((fk, fv)) = f {
                fks.push(fk);
                fvs.push(fv);
            }
        }
        let (k, v) = (Tensor::cat(ks, 0), Tensor::cat(vs, 0));
        let fisher = weighted.then(|| (Tensor::cat(fks, 0), Tensor::cat(fvs, 0)));
        let cal = kv_quant::KvQuantCalibration::calibrate_weighted(
            &k,
            &v,
            fisher.as_ref().map(|(a, b)| (a, b)),
            o.kvquant_bits,
            0.99,
            o.kvquant_sinks,
        )
        .map_err(|e| EvalError::Usage(format!("KVQuant calibration of layer {layer}: {e}")))?;
        layers.push(cal);
    }
    let json = serde_json::to_string(&layers).map_err(|e| EvalError::Usage(e.to_string()))?;
    std::fs::write(path, json).map_err(|e| EvalError::Io {
        path: path.into(),
        source: e,
    })?;
    eprintln!(
        "wrote {}: KVQuant {}-bit calibration of {} layers{} ({:.1}s)",
        path.display(),
        o.kvquant_bits,
        layers.len(),
        if o.kvquant_fisher.is_some() {
            ", Fisher-weighted"
        } else {
            ""
        },
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Trains the residual-VQ codebooks of every layer from the captured post-RoPE keys and values
/// (each window one sequence) and writes the JSON artefact `rvq:calibration=FILE` reads.
fn write_rvq(path: &Path, kept: &[Windows], o: &Options, model: &str, source: &str) -> Result<()> {
    let t0 = Instant::now();
    let cfg = kv_pq::RvqTrainConfig::new(o.rvq_sub_dim, o.rvq_entries, o.rvq_stages);
    let mut layers = Vec::with_capacity(kept.len());
    let mut shape = (0, 0, 0);
    for (layer, windows) in kept.iter().enumerate() {
        let windows = std::mem::take(&mut *windows.lock().unwrap_or_else(PoisonError::into_inner));
        if windows.is_empty() {
            return Err(EvalError::Usage(format!(
                "--rvq needs at least one whole window of {} tokens",
                o.window
            )));
        }
        let (ks, vs): (Vec<_>, Vec<_>) = windows.into_iter().unzip();
        let (k, v) = (Tensor::cat(ks, 0), Tensor::cat(vs, 0));
        let [w, h, n, d] = k.dims();
        shape = (h, d, w * n);
        let books = kv_pq::rvq::train_layer(&k, &v, &cfg)
            .map_err(|e| EvalError::Usage(format!("RVQ calibration of layer {layer}: {e}")))?;
        layers.push(books);
        eprintln!(
            "RVQ layer {layer}: {} stages x {} entries ({:.1}s)",
            cfg.stages,
            cfg.entries,
            t0.elapsed().as_secs_f64()
        );
    }
    let (kv_heads, head_dim, tokens) = shape;
    let artefact = kv_pq::RvqArtefact {
        version: kv_pq::RVQ_VERSION,
        model: model.to_owned(),
        source: source.to_owned(),
        tokens,
        num_layers: layers.len(),
        kv_heads,
        head_dim,
        sub_dim: cfg.sub_dim,
        entries: cfg.entries,
        stages: cfg.stages,
        strided_keys: cfg.strided_keys,
        layers,
    };
    artefact
        .validate()
        .map_err(|e| EvalError::Usage(e.to_string()))?;
    artefact
        .save(path)
        .map_err(|e| EvalError::Usage(e.to_string()))?;
    eprintln!(
        "wrote {}: RVQ of {} layers, groups of {} channels, {} stages x {} entries ({:.1}s)",
        path.display(),
        artefact.num_layers,
        cfg.sub_dim,
        cfg.stages,
        cfg.entries,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn kvquant_fisher_needs_kvquant_and_a_window() {
        let o = parse(&args(&[
            "--out",
            "p",
            "--kvquant",
            "k.json",
            "--kvquant-fisher",
            "512",
        ]))
        .expect("parse");
        assert_eq!(o.kvquant_fisher, Some(512));
        for bad in [
            &["--out", "p", "--kvquant-fisher", "512"][..],
            &["--out", "p", "--kvquant", "k.json", "--kvquant-fisher", "1"],
            &["--out", "p", "--kvquant", "k.json", "--kvquant-fisher", "x"],
        ] {
            assert!(
                matches!(parse(&args(bad)), Err(EvalError::Usage(_))),
                "{bad:?} should be a usage error"
            );
        }
    }
}
