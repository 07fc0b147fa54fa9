//! Retrofits DMC's learned decision heads on a real model with the model frozen, and writes
//! the versioned JSON artefact that `dmc:artefact=PATH` loads.
//!
//! Every step runs the model (Burn's autodiff, `kv_model::GradLlama`) over a fresh sequence
//! of *Emma* (*Pride and Prejudice* is the evaluation text, never used here) with every
//! layer's attention replaced by DMC's relaxed attention (`kv_dmc::relaxed_attention`:
//! Gumbel-sigmoid merge decisions, partial accumulation, the `ln(1 − α)` mask), adds DMC's
//! one-sided compression loss with the target ratio rising from 1, and takes one Adam step
//! on the per-layer, per-KV-head linear heads (`kv_dmc::Retrofit`). At the end a held-out
//! sequence is scored with the dense attention and with the heads' hard decisions (what the
//! cache computes when tokens are appended one at a time).
//!
//! ```text
//! cargo run --release -p kv-dmc --example dmc_retrofit -- [--model GGUF] [--text TXT]
//!     [--out JSON] [--ratio R] [--steps N] [--ramp N] [--tokens N] [--lr X] [--temperature T]
//!     [--lambda X] [--alpha-bias X] [--window N] [--seed N]
//! ```
//!
//! Defaults (the runs in `docs/techniques/dmc.md`): the SmolLM2 GGUF and Emma in `assets/`,
//! target ratio 2, 160 steps of 384 tokens (one sequence per step, each step a new one from
//! "Emma Woodhouse, handsome" on), the target ratio rising from 1 over the first 3/4 of the
//! steps (`--ramp`) and held after, learning rate 0.05 (weights 0.05 / head_dim), temperature
//! 0.1, λ = 10 (DMC uses 1; a frozen model needs more, see the docs), `α` bias −3, no window,
//! seed 0, the artefact to `target/kv-dmc/dmc_retrofit_cr{R}.json`.

#![expect(
    clippy::print_stdout,
    reason = "a command-line tool reporting progress"
)]

use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;

use burn::prelude::*;
use kv_dmc::{DecisionHeads, Retrofit, RetrofitConfig, hard_attention};
use kv_model::gguf::GgufFile;
use kv_model::grad::causal_attention;
use kv_model::tokenizer::Tokenizer;
use kv_model::{GradLlama, HostWeights};

struct Options {
    model: PathBuf,
    text: PathBuf,
    out: Option<PathBuf>,
    ratio: f32,
    steps: usize,
    ramp: Option<usize>,
    tokens: usize,
    lr: f32,
    temperature: f32,
    lambda: f32,
    alpha_bias: f32,
    window: Option<usize>,
    seed: u64,
}

fn parse() -> Result<Options, Box<dyn Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut o = Options {
        model: root.join("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        text: root.join("assets/text/emma.txt"),
        out: None,
        ratio: 2.0,
        steps: 160,
        ramp: None,
        tokens: 384,
        lr: 0.05,
        temperature: 0.1,
        lambda: 10.0,
        alpha_bias: -3.0,
        window: None,
        seed: 0,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => o.model = v.into(),
            "--text" => o.text = v.into(),
            "--out" => o.out = Some(v.into()),
            "--ratio" => o.ratio = v.parse()?,
            "--steps" => o.steps = v.parse()?,
            "--ramp" => o.ramp = Some(v.parse()?),
            "--tokens" => o.tokens = v.parse()?,
            "--lr" => o.lr = v.parse()?,
            "--temperature" => o.temperature = v.parse()?,
            "--lambda" => o.lambda = v.parse()?,
            "--alpha-bias" => o.alpha_bias = v.parse()?,
            "--window" => o.window = Some(v.parse()?),
            "--seed" => o.seed = v.parse()?,
            _ => return Err(format!("unknown option {flag}").into()),
        }
    }
    if o.text.file_stem().and_then(|s| s.to_str()) == Some("prideprejudice") {
        return Err("Pride and Prejudice is the evaluation text: train on another book".into());
    }
    if o.ratio < 1.0 || o.tokens < 2 {
        return Err("--ratio must be at least 1 and --tokens at least 2".into());
    }
    Ok(o)
}

fn scalar(t: Tensor<1>) -> f32 {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f32::NAN)
}

fn main() -> Result<(), Box<dyn Error>> {
    let o = parse()?;
    let t0 = Instant::now();
    let device = kv_testkit::test_device();
    let file = GgufFile::open(&o.model)?;
    let tok = Tokenizer::from_gguf(&file)?;
    let weights = HostWeights::from_gguf(&file)?;
    let model = GradLlama::new(&weights, &device)?;
    let cfg = model.config().clone();
    let (layers, kv_heads, head_dim) = (
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        cfg.effective_head_dim(),
    );
    let text = std::fs::read_to_string(&o.text)?;
    let start = text.find("Emma Woodhouse, handsome").unwrap_or(0);
    // One sequence per step, then one held out.
    let total = (o.steps + 1) * o.tokens;
    let cut = text[start..]
        .char_indices()
        .nth(total * 8)
        .map_or(text.len(), |(i, _)| start + i);
    let ids = tok.encode(&text[start..cut]);
    if ids.len() < total {
        return Err(format!("{} tokens of text, {total} needed", ids.len()).into());
    }
    // The target ratio rises over the first three quarters of the steps and holds after.
    let ramp = o.ramp.unwrap_or(o.steps * 3 / 4);
    let mut config = RetrofitConfig::new(o.ratio, ramp, head_dim);
    config.lr = o.lr;
    config.temperature = o.temperature;
    config.lambda = o.lambda;
    config.window = o.window;
    config.seed = o.seed;
    let heads = DecisionHeads::new(layers, kv_heads, head_dim, o.alpha_bias, 0.0);
    let mut trainer = Retrofit::new(heads, config);
    println!(
        "loaded in {:.1} s; {} steps of {} tokens, target ratio {}",
        t0.elapsed().as_secs_f64(),
        o.steps,
        o.tokens,
        o.ratio
    );
    let train_start = Instant::now();
    let ad = model.device().clone();
    for (i, seq) in ids[..o.steps * o.tokens].chunks(o.tokens).enumerate() {
        let ts = Instant::now();
        let r = trainer.step(&ad, |attention| {
            model.loss(seq, 1, None, &mut |a| {
                attention(a.layer, a.queries, a.keys, a.values)
            })
        })?;
        // The mean `α` bias: where the heads stand without the keys.
        let p = trainer.heads.params();
        let w = layers * kv_heads * head_dim;
        let bias = p[w..w + layers * kv_heads].iter().sum::<f32>() / (layers * kv_heads) as f32;
        println!(
            "step {i:>4}: lm {:.4} compression {:.4} merges {:.3} (ratio {:.2}, target {:.2}) \
             alpha bias {bias:.2} {:.1} s",
            r.lm_loss,
            r.compression_loss,
            r.merge_fraction,
            1.0 / (1.0 - r.merge_fraction).max(1e-6),
            r.target_ratio,
            ts.elapsed().as_secs_f64()
        );
    }
    let train_s = train_start.elapsed().as_secs_f64();

    // Held out: the dense model against the hard decisions.
    let held = &ids[o.steps * o.tokens..total];
    let dense = scalar(model.loss(held, 1, None, &mut |a| {
        causal_attention(a.queries, a.keys, a.values)
    })?);
    let mut fractions = vec![0f32; layers];
    let hard = scalar(model.loss(held, 1, None, &mut |a| {
        let (out, f) = hard_attention(&trainer.heads, a.layer, a.queries, a.keys, a.values);
        fractions[a.layer] = f;
        out
    })?);
    let mean = fractions.iter().sum::<f32>() / layers as f32;
    println!(
        "held-out {} tokens: dense NLL {dense:.4} (ppl {:.3}), hard decisions NLL {hard:.4} \
         (ppl {:.3}), merges {mean:.3} (slots {:.3} of the tokens)",
        held.len(),
        dense.exp(),
        hard.exp(),
        1.0 - mean
    );
    println!(
        "merges per layer: {}",
        fractions
            .iter()
            .map(|f| format!("{f:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    );

    let name = o
        .model
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let source = format!(
        "{name}, frozen; kv-dmc dmc_retrofit: linear heads over the post-RoPE key, {} steps \
         x {} tokens of {}, target ratio {} (ramp {ramp} steps), lr {}, temperature {}, \
         lambda {}, alpha bias {}, window {:?}, seed {}; held-out NLL dense {dense:.4}, \
         hard {hard:.4}, merges {mean:.3}",
        o.steps,
        o.tokens,
        o.text
            .file_name()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned()),
        o.ratio,
        o.lr,
        o.temperature,
        o.lambda,
        o.alpha_bias,
        o.window,
        o.seed
    );
    let artefact = trainer.heads.to_artefact(source);
    for l in 0..layers {
        artefact.layer(l, kv_heads, head_dim)?;
    }
    let out = o.out.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(format!("target/kv-dmc/dmc_retrofit_cr{}.json", o.ratio))
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string(&artefact)? + "\n")?;
    println!(
        "wrote {} (training {train_s:.1} s, {:.1} s per step; {:.1} s in all)",
        out.display(),
        train_s / o.steps.max(1) as f64,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
