//! KVSharer calibration on the real model: averages each layer's keys and values over
//! calibration windows of *Emma*, ranks layer pairs by KV distance, and accepts sharing steps
//! while the cosine similarity of the last hidden states to the unshared model stays above
//! the threshold; writes the versioned artefact.
//!
//! ```text
//! cargo run -p kv-share --example kvsharer_calibrate -- \
//!     [--model assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] [--text assets/text/emma.txt] \
//!     [--samples 30] [--tokens 64] [--share-layers 4] [--threshold 0.5] \
//!     [--out target/kvsharer-smollm2.json]
//! ```
//!
//! Keep the evaluation text apart: calibrate on *Emma*, evaluate on *Pride and Prejudice*.

use std::path::PathBuf;
use std::time::Instant;

use burn::prelude::*;
use kv_core::{DenseCacheConfig, KvCache, LayerCaches};
use kv_model::gguf::GgufFile;
use kv_model::tokenizer::Tokenizer;
use kv_model::{HostWeights, Llama};
use kv_share::kvsharer::{CalibrationInfo, ModelShape, cosine, search};
use kv_share::{KvSharerConfig, LayerMap};

type BoxError = Box<dyn std::error::Error>;

struct Args {
    model: PathBuf,
    text: PathBuf,
    samples: usize,
    tokens: usize,
    share_layers: usize,
    threshold: f32,
    out: PathBuf,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut a = Args {
        model: "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
        text: "assets/text/emma.txt".into(),
        samples: 30,
        tokens: 64,
        share_layers: 4,
        threshold: 0.5,
        out: "target/kvsharer-smollm2.json".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => a.model = v.into(),
            "--text" => a.text = v.into(),
            "--samples" => a.samples = v.parse()?,
            "--tokens" => a.tokens = v.parse()?,
            "--share-layers" => a.share_layers = v.parse()?,
            "--threshold" => a.threshold = v.parse()?,
            "--out" => a.out = v.into(),
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    Ok(a)
}

fn host(t: Tensor<4>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("invariant: float data reads back as f32")
}

/// Runs one sample through `caches`; returns the last token's final hidden state.
fn last_hidden(
    model: &Llama,
    ids: &[u32],
    caches: &mut LayerCaches,
) -> Result<Vec<f32>, kv_model::ModelError> {
    let n = ids.len();
    let h = model.config().hidden_size;
    let pos: Vec<u32> = (0..n as u32).collect();
    let hidden = model.forward_hidden(ids, &pos, 1, caches)?;
    Ok(host(
        hidden.slice([0..1, n - 1..n, 0..h]).reshape([1, 1, 1, h]),
    ))
}

fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    let device = Device::flex();
    let start = Instant::now();
    let file = GgufFile::open(&args.model)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let model = Llama::new(&HostWeights::from_gguf(&file)?, &device)?;
    let num_layers = model.config().num_hidden_layers;
    let shape = model.kv_shape(1)?;
    let text = std::fs::read_to_string(&args.text)?;
    let body = text
        .find("Emma Woodhouse, handsome")
        .map_or(text.as_str(), |i| &text[i..]);
    // About 4 characters per token; encode a generous prefix only.
    let want = args.samples * args.tokens;
    let prefix: String = body.chars().take(want * 8).collect();
    let ids = tokenizer.encode(&prefix);
    if ids.len() < want {
        return Err(format!("{} tokens in the text, {want} needed", ids.len()).into());
    }
    let samples: Vec<&[u32]> = ids[..want].chunks(args.tokens).collect();
    let dense =
        |_: usize| Ok(Box::new(DenseCacheConfig::new(shape).init(&device)?) as Box<dyn KvCache>);

    // Baseline: last hidden states and per-layer K/V averaged over samples.
    let per_layer = shape.kv_heads() * args.tokens * shape.head_dim();
    let mut avg_k = vec![vec![0f32; per_layer]; num_layers];
    let mut avg_v = vec![vec![0f32; per_layer]; num_layers];
    let mut baseline = Vec::with_capacity(samples.len());
    for s in &samples {
        let mut caches = LayerCaches::try_from_fn(num_layers, dense)?;
        baseline.push(last_hidden(&model, s, &mut caches)?);
        for l in 0..num_layers {
            let view = caches.layer(l)?.view();
            for (acc, x) in [
                (&mut avg_k[l], host(view.keys)),
                (&mut avg_v[l], host(view.values)),
            ] {
                for (a, x) in acc.iter_mut().zip(x) {
                    *a += x / samples.len() as f32;
                }
            }
        }
    }
    eprintln!(
        "baseline: {} samples x {} tokens in {:.1}s",
        samples.len(),
        args.tokens,
        start.elapsed().as_secs_f64()
    );

    let config = KvSharerConfig::new(args.share_layers, args.threshold);
    config.validate(num_layers)?;
    let calibration = CalibrationInfo {
        text: args
            .text
            .file_stem()
            .map_or("text".into(), |s| s.to_string_lossy().into_owned()),
        samples: samples.len(),
        tokens: args.tokens,
    };
    let mut similarity = |map: &LayerMap| -> Result<f32, BoxError> {
        let mut total = 0.0;
        for (s, base) in samples.iter().zip(&baseline) {
            let mut caches = map.build_caches(dense)?;
            total += cosine(&last_hidden(&model, s, &mut caches)?, base);
        }
        let sim = total / samples.len() as f32;
        eprintln!("  {:<60} similarity {sim:.4}", map.to_layer_types());
        Ok(sim)
    };
    let artifact = search::<BoxError>(
        &config,
        ModelShape::new(num_layers, shape),
        calibration,
        &avg_k,
        &avg_v,
        &mut similarity,
    )?;
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    artifact.save(&args.out)?;
    let kept = artifact.map.storage_layers();
    println!(
        "KVSharer on {}: map {} ({} of {num_layers} layers store KV, {:.1}% of the KV memory \
         saved), {} candidates evaluated in {:.1}s; written to {}",
        args.model.display(),
        artifact.map.to_layer_types(),
        kept,
        100.0 * (num_layers - kept) as f64 / num_layers as f64,
        artifact.evaluated,
        start.elapsed().as_secs_f64(),
        args.out.display()
    );
    for p in &artifact.accepted {
        println!(
            "  layer {:>2} reads {:>2} (distance {:.2}): similarity {:.4}",
            p.layer, p.reads, p.distance, p.similarity
        );
    }
    Ok(())
}
