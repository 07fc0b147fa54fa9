//! Perplexity of cross-layer sharing on the real model, protocol-A style: prefill `--prefill`
//! tokens (each layer attends with what it stores), `end_prefill` (MiniCache merges here),
//! then the next `--score` tokens in one teacher-forced pass; the NLL is the mean over the
//! scored tokens. Compares the full cache, MiniCache, a KVSharer artefact and CLA2 (an
//! untrained map, for scale).
//!
//! ```text
//! cargo run -p kv-share --example share_ppl -- [--model GGUF] [--text assets/text/emma.txt] \
//!     [--start-char 400000] [--prefill 768] [--score 256] [--artifact target/kvsharer-smollm2.json] \
//!     [--runs full,mc,mc0,mc1,mc03,mc24,cla2]
//! ```
//!
//! The default window is far into *Emma*, away from the KVSharer calibration windows at its
//! start.

use std::path::PathBuf;
use std::time::Instant;

use burn::prelude::*;
use kv_core::{DenseCacheConfig, KvCache, LayerCaches};
use kv_model::gguf::GgufFile;
use kv_model::tokenizer::Tokenizer;
use kv_model::{HostWeights, Llama};
use kv_share::kvsharer::ModelShape;
use kv_share::{KvSharerArtifact, LayerMap, MiniCacheConfig};

type BoxError = Box<dyn std::error::Error>;

fn nll(
    model: &Llama,
    ids: &[u32],
    prefill: usize,
    caches: &mut LayerCaches,
) -> Result<f64, BoxError> {
    let h = model.config().hidden_size;
    let n = ids.len();
    let pos: Vec<u32> = (0..n as u32).collect();
    let first = model.forward_hidden(&ids[..prefill], &pos[..prefill], 1, caches)?;
    caches.end_prefill()?;
    let last = first
        .slice([0..1, prefill - 1..prefill, 0..h])
        .reshape([1, h]);
    let rest = model.forward_hidden(&ids[prefill..n - 1], &pos[prefill..n - 1], 1, caches)?;
    let rest = rest.reshape([n - 1 - prefill, h]);
    let hidden = Tensor::cat(vec![last, rest], 0);
    let v = model.nll(hidden, &ids[prefill..]);
    Ok(v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64)
}

fn main() -> Result<(), BoxError> {
    let mut model_path: PathBuf = "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into();
    let mut text_path: PathBuf = "assets/text/emma.txt".into();
    let mut artifact: Option<PathBuf> = None;
    let mut only = String::from("full,mc,mc0,mc1,mc03,mc24,cla2");
    let (mut start_char, mut prefill, mut score) = (400_000usize, 768usize, 256usize);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => model_path = v.into(),
            "--text" => text_path = v.into(),
            "--artifact" => artifact = Some(v.into()),
            "--start-char" => start_char = v.parse()?,
            "--prefill" => prefill = v.parse()?,
            "--score" => score = v.parse()?,
            "--runs" => only = v,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    let device = Device::flex();
    let file = GgufFile::open(&model_path)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let model = Llama::new(&HostWeights::from_gguf(&file)?, &device)?;
    let layers = model.config().num_hidden_layers;
    let shape = model.kv_shape(1)?;
    let text = std::fs::read_to_string(&text_path)?;
    let window: String = text
        .chars()
        .skip(start_char)
        .take((prefill + score) * 8)
        .collect();
    let mut ids = tokenizer.encode(&window);
    if ids.len() < prefill + score {
        return Err("the text window is too short".into());
    }
    ids.truncate(prefill + score);
    let dense =
        |_: usize| Ok(Box::new(DenseCacheConfig::new(shape).init(&device)?) as Box<dyn KvCache>);

    let mini = |start: Option<usize>, gamma: f32| -> kv_core::Result<LayerCaches> {
        let cfg = MiniCacheConfig::new(shape, layers).with_gamma(gamma);
        let cfg = match start {
            Some(s) => cfg.with_start_layer(s),
            None => cfg,
        };
        cfg.init(&device)
    };
    let mut runs: Vec<(String, LayerCaches)> = Vec::new();
    for name in only.split(',') {
        let caches = match name {
            "full" => LayerMap::identity(layers)?.build_caches(dense)?,
            "mc" => mini(None, 0.05)?,
            "mc0" => mini(None, 0.0)?,
            "mc1" => mini(None, 1.0)?,
            "mc03" => mini(None, 0.3)?,
            "mc24" => mini(Some(24), 0.05)?,
            "cla2" => LayerMap::cla(layers, 2)?.build_caches(dense)?,
            _ => return Err(format!("unknown run `{name}`").into()),
        };
        let label = match name {
            "full" => "full".into(),
            "cla2" => "CLA2 map, untrained".into(),
            _ => {
                let start = if name == "mc24" { "24" } else { "L/2" };
                let gamma = match name {
                    "mc0" => "0",
                    "mc1" => "1",
                    "mc03" => "0.3",
                    _ => "0.05",
                };
                format!("minicache (start {start}, t 0.6, gamma {gamma})")
            }
        };
        runs.push((label, caches));
    }
    if let Some(p) = &artifact {
        let a = KvSharerArtifact::load(p, &ModelShape::new(layers, shape))?;
        runs.push((
            format!("kvsharer {}", a.map.to_layer_types()),
            a.map.build_caches(dense)?,
        ));
    }
    println!("| cache | perplexity | stored MiB after prefill | vs full |");
    println!("|---|---|---|---|");
    let mut full_bytes = None;
    for (name, mut caches) in runs {
        let t = Instant::now();
        let h = model.config().hidden_size;
        let pos: Vec<u32> = (0..prefill as u32).collect();
        model.forward_hidden(&ids[..prefill], &pos, 1, &mut caches)?;
        caches.end_prefill()?;
        let bytes = caches.memory().stored_bytes();
        caches.reset();
        let nll = nll(&model, &ids, prefill, &mut caches)?;
        let full = *full_bytes.get_or_insert(bytes);
        println!(
            "| {name} | {:.3} | {:.2} | {:.3} |",
            nll.exp(),
            bytes as f64 / (1 << 20) as f64,
            bytes as f64 / full as f64
        );
        eprintln!("  {name}: {:.1}s (hidden {h})", t.elapsed().as_secs_f64());
    }
    Ok(())
}
