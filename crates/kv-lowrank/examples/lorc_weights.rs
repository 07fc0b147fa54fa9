//! Writes LoRC's weight spectra for a real model: per layer and KV head, the right singular
//! vectors and squared singular values of the key and value projection weights (data free,
//! no text), as a kv-lowrank calibration artefact that `lorc:calibration=FILE` loads.
//!
//! ```text
//! cargo run --release -p kv-lowrank --example lorc_weights -- [MODEL] [OUT]
//! ```
//!
//! Defaults: `assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (a GGUF file or an HF folder)
//! and `target/calib/lorc.safetensors`. LoRC factors `k_proj.weight` and `v_proj.weight` as
//! stored (PyTorch layout, key rows in the model's rotate-half order).

#![expect(
    clippy::print_stdout,
    reason = "a command-line tool reporting what it wrote"
)]

use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;

use kv_core::KvShape;
use kv_lowrank::{Activation, CovarianceAccumulator};
use kv_model::HostWeights;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into()),
    );
    let out = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "target/calib/lorc.safetensors".into()),
    );
    let t0 = Instant::now();
    let w = HostWeights::load(&model)?;
    let c = &w.config;
    let shape = KvShape::new(
        1,
        c.num_key_value_heads,
        c.num_attention_heads,
        c.effective_head_dim(),
    )?;
    let mut acc = CovarianceAccumulator::new(c.num_hidden_layers, shape);
    for (layer, block) in w.blocks.iter().enumerate() {
        acc.observe_weights(layer, Activation::KeyWeights, &block.k.data, c.hidden_size)?;
        acc.observe_weights(
            layer,
            Activation::ValueWeights,
            &block.v.data,
            c.hidden_size,
        )?;
    }
    let name = |p: &std::path::Path| {
        p.file_name()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
    };
    let cal = acc.finish(&name(&model), "projection weights (no text)")?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    cal.save(&out)?;
    println!(
        "wrote {}: {} layers x {} KV heads x head_dim {} ({:.1}s)",
        out.display(),
        c.num_hidden_layers,
        c.num_key_value_heads,
        c.effective_head_dim(),
        t0.elapsed().as_secs_f64()
    );
    for act in [Activation::KeyWeights, Activation::ValueWeights] {
        let kappa: Vec<String> = (0..c.num_hidden_layers)
            .map(|l| {
                let ev = cal.eigenvalues(act, l, 0).unwrap_or(&[]);
                match (ev.first(), ev.last()) {
                    (Some(hi), Some(lo)) if *lo > 0.0 => format!("{:.1}", (hi / lo).sqrt()),
                    _ => "inf".into(),
                }
            })
            .collect();
        println!(
            "{} condition numbers (head 0, by layer): {}",
            act.name(),
            kappa.join(" ")
        );
    }
    Ok(())
}
