//! Trains LESS's maps on a real model and writes the versioned JSON artefact that
//! `less:artefact=PATH` loads.
//!
//! The model runs over calibration sequences of *Emma* (*Pride and Prejudice* is the
//! evaluation text, never used here) with a plain cache that records every layer's post-RoPE
//! queries, keys and values. Then, layer by layer and with the model frozen, a
//! [`LessSample`] replays each sequence through the sparse policy (a prefill block, then one
//! token at a time) and the maps are trained with Adam to make the LESS output of every decode
//! query match full attention (the reference's `train_kernels.py`; the error is the MSE of
//! the head outputs, or with `--objective output` the MSE after the layer's output projection
//! `o_proj`, as the reference measures it; the former gave the better perplexity here). The
//! first sequences train, the last one is held out.
//!
//! ```text
//! cargo run --release -p kv-dmc --example less_calibrate -- [--model GGUF] [--text TXT]
//!     [--out JSON] [--policy h2o|lambda] [--heavy N] [--sinks N] [--recent N]
//!     [--sequences N] [--tokens N] [--prefill N] [--hidden N] [--rank N] [--epochs N]
//!     [--lr X] [--seed N] [--layers all|L,L,...] [--objective output|attention]
//! ```
//!
//! Defaults: the SmolLM2 GGUF and Emma in `assets/`, `target/kv-dmc/less_smollm2.json` (the
//! artefact is about 5 MB, too large to commit), H2O with 128 heavy + 128 recent, 3 training
//! sequences + 1 held out of 3584 tokens (prefill 3072, as the evaluation's, then 512 scored
//! decode steps), hidden width 16, rank 8, 20 epochs at learning rate 3e-3, seed 0, every
//! layer, the error measured on the head outputs.

#![expect(
    clippy::print_stdout,
    reason = "a command-line tool reporting progress"
)]

use std::error::Error;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use burn::prelude::*;
use kv_core::{
    Attended, DenseCache, DenseCacheConfig, HeldBuffer, KvBlock, KvCache, KvShape, KvView,
    LayerCaches, Lengths, MemoryReport, Query, StatsRequest,
};
use kv_dmc::{
    LESS_ARTEFACT_FORMAT, LESS_ARTEFACT_VERSION, LessArtefact, LessMaps, LessPolicy, LessSample,
    LessTrainingRecord, TrainOptions, loss, output_metric, train_layer,
};
use kv_model::gguf::GgufFile;
use kv_model::tokenizer::Tokenizer;
use kv_model::{HostWeights, Llama};

/// One layer's captured queries, keys and values of one sequence.
type Captured = Arc<Mutex<(Vec<Tensor<4>>, Vec<Tensor<4>>, Vec<Tensor<4>>)>>;

/// A dense cache that records what it is given.
#[derive(Debug)]
struct Capture {
    inner: DenseCache,
    seen: Captured,
}

impl KvCache for Capture {
    fn shape(&self) -> KvShape {
        self.inner.shape()
    }
    fn device(&self) -> &Device {
        self.inner.device()
    }
    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        {
            let mut s = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            s.1.push(block.keys().clone());
            s.2.push(block.values().clone());
        }
        self.inner.append(block)
    }
    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .push(query.tensor().clone());
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
    model: PathBuf,
    text: PathBuf,
    out: PathBuf,
    policy: String,
    heavy: usize,
    sinks: usize,
    recent: usize,
    sequences: usize,
    tokens: usize,
    prefill: usize,
    hidden: usize,
    rank: usize,
    epochs: usize,
    lr: f32,
    seed: u64,
    layers: Option<Vec<usize>>,
    objective: String,
}

fn parse() -> Result<Options, Box<dyn Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut o = Options {
        model: root.join("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        text: root.join("assets/text/emma.txt"),
        out: root.join("target/kv-dmc/less_smollm2.json"),
        policy: "h2o".into(),
        heavy: 128,
        sinks: 4,
        recent: 128,
        sequences: 3,
        tokens: 3584,
        prefill: 3072,
        hidden: 16,
        rank: 8,
        epochs: 20,
        lr: 3e-3,
        seed: 0,
        layers: None,
        objective: "attention".into(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => o.model = v.into(),
            "--text" => o.text = v.into(),
            "--out" => o.out = v.into(),
            "--policy" => o.policy = v.clone(),
            "--heavy" => o.heavy = v.parse()?,
            "--sinks" => o.sinks = v.parse()?,
            "--recent" => o.recent = v.parse()?,
            "--sequences" => o.sequences = v.parse()?,
            "--tokens" => o.tokens = v.parse()?,
            "--prefill" => o.prefill = v.parse()?,
            "--hidden" => o.hidden = v.parse()?,
            "--rank" => o.rank = v.parse()?,
            "--epochs" => o.epochs = v.parse()?,
            "--lr" => o.lr = v.parse()?,
            "--seed" => o.seed = v.parse()?,
            "--objective" if v == "output" || v == "attention" => o.objective = v.clone(),
            "--layers" if v == "all" => o.layers = None,
            "--layers" => {
                o.layers = Some(v.split(',').map(str::parse).collect::<Result<_, _>>()?);
            }
            _ => return Err(format!("unknown option {flag}").into()),
        }
    }
    if o.text.file_stem().and_then(|s| s.to_str()) == Some("prideprejudice") {
        return Err("Pride and Prejudice is the evaluation text: train on another book".into());
    }
    if o.sequences == 0 {
        return Err("--sequences must be at least 1".into());
    }
    Ok(o)
}

fn main() -> Result<(), Box<dyn Error>> {
    let o = parse()?;
    let policy = match o.policy.as_str() {
        "h2o" => LessPolicy::H2o {
            heavy: o.heavy,
            recent: o.recent,
        },
        "lambda" => LessPolicy::Lambda {
            sinks: o.sinks,
            recent: o.recent,
        },
        p => return Err(format!("--policy `{p}` is not h2o or lambda").into()),
    };
    let t0 = Instant::now();
    let device = kv_testkit::test_device();
    let file = GgufFile::open(&o.model)?;
    let tok = Tokenizer::from_gguf(&file)?;
    let weights = HostWeights::from_gguf(&file)?;
    let model = Llama::new(&weights, &device)?;
    let cfg = model.config().clone();
    let layers = cfg.num_hidden_layers;
    let shape = model.kv_shape(1)?;
    let text = std::fs::read_to_string(&o.text)?;
    let start = text.find("Emma Woodhouse, handsome").unwrap_or(0);
    // One more sequence than trains on: the last is held out.
    let total = (o.sequences + 1) * o.tokens;
    let cut = text[start..]
        .char_indices()
        .nth(total * 8)
        .map_or(text.len(), |(i, _)| start + i);
    let ids = tok.encode(&text[start..cut]);
    if ids.len() < total {
        return Err(format!("{} tokens of text, {total} needed", ids.len()).into());
    }

    // Capture every layer's activations, one forward pass per sequence.
    let mut captured: Vec<Vec<(Tensor<4>, Tensor<4>, Tensor<4>)>> = vec![Vec::new(); layers];
    for (si, chunk) in ids[..total].chunks(o.tokens).enumerate() {
        let seen: Vec<Captured> = (0..layers)
            .map(|_| Arc::new(Mutex::new((Vec::new(), Vec::new(), Vec::new()))))
            .collect();
        let mut caches = LayerCaches::try_from_fn(layers, |l| {
            Ok(Box::new(Capture {
                inner: DenseCacheConfig::new(shape).init(&device)?,
                seen: seen[l].clone(),
            }) as Box<dyn KvCache>)
        })?;
        let pos: Vec<u32> = (0..chunk.len() as u32).collect();
        model.forward_hidden(chunk, &pos, 1, &mut caches)?;
        drop(caches);
        for (l, s) in seen.into_iter().enumerate() {
            let (q, k, v) = std::mem::take(&mut *s.lock().unwrap_or_else(PoisonError::into_inner));
            captured[l].push((Tensor::cat(q, 2), Tensor::cat(k, 2), Tensor::cat(v, 2)));
        }
        println!(
            "captured sequence {si} ({} tokens, {:.1} s)",
            chunk.len(),
            t0.elapsed().as_secs_f64()
        );
    }

    let train: Vec<usize> = o.layers.clone().unwrap_or_else(|| (0..layers).collect());
    let mut maps_out = Vec::with_capacity(layers);
    let (mut losses, mut held_losses) = (Vec::new(), Vec::new());
    let opts = TrainOptions {
        epochs: o.epochs,
        lr: o.lr,
    };
    for (l, seqs) in captured.into_iter().enumerate() {
        if !train.contains(&l) {
            maps_out.push(LessMaps::zeros(&shape, o.hidden, o.rank));
            continue;
        }
        let tl = Instant::now();
        let metric = (o.objective == "output")
            .then(|| {
                output_metric(
                    &weights.blocks[l].o.data,
                    cfg.hidden_size,
                    shape.q_heads() * shape.head_dim(),
                )
            })
            .transpose()?;
        let mut samples = seqs
            .into_iter()
            .map(|(q, k, v)| {
                let s = LessSample::collect(policy, q, k, v, o.prefill)?;
                match &metric {
                    Some(m) => s.with_metric(m.clone()),
                    None => Ok(s),
                }
            })
            .collect::<kv_core::Result<Vec<_>>>()?;
        let held = samples.pop().ok_or("no held-out sequence")?;
        let collected = tl.elapsed().as_secs_f64();
        let mut maps = LessMaps::init(&shape, o.hidden, o.rank, o.seed + l as u64);
        let held_initial = loss(&maps, &[&held])?;
        let report = train_layer(&mut maps, &samples, opts)?;
        let last = report.epochs.last().copied().unwrap_or(report.initial);
        let held_final = loss(&maps, &[&held])?;
        println!(
            "layer {l:>2}: train sparse {:.3e} init {:.3e} -> {:.3e} ({:+.1}%), held-out \
             sparse {:.3e} -> {:.3e} ({:+.1}%); epochs {}; {:.1} s collect, {:.1} s train",
            report.sparse,
            report.initial,
            last,
            100.0 * (last / report.sparse - 1.0),
            held.sparse_loss(),
            held_final,
            100.0 * (held_final / held.sparse_loss() - 1.0),
            report
                .epochs
                .iter()
                .map(|x| format!("{x:.3e}"))
                .collect::<Vec<_>>()
                .join(" "),
            collected,
            tl.elapsed().as_secs_f64() - collected
        );
        losses.push([report.sparse, report.initial, last]);
        held_losses.push([held.sparse_loss(), held_initial, held_final]);
        maps_out.push(maps);
    }
    let artefact = LessArtefact {
        format: LESS_ARTEFACT_FORMAT.into(),
        version: LESS_ARTEFACT_VERSION,
        model: o
            .model
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned()),
        num_layers: layers,
        q_heads: shape.q_heads(),
        kv_heads: shape.kv_heads(),
        head_dim: shape.head_dim(),
        training: LessTrainingRecord {
            text: o
                .text
                .file_name()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned()),
            sequences: o.sequences,
            tokens: o.tokens,
            prefill: o.prefill,
            policy: serde_json::to_string(&policy)?,
            objective: o.objective.clone(),
            epochs: o.epochs,
            lr: o.lr,
            seed: o.seed,
            trained_layers: train,
            loss: losses,
            held_out_loss: held_losses,
        },
        layers: maps_out,
    };
    artefact.check(layers, &shape)?;
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_string(&artefact)? + "\n")?;
    println!(
        "wrote {} ({:.1} s in all)",
        o.out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
