//! `kv-eval fisher`: Palu's Fisher information of every layer's key and value projections,
//! from gradients of the language-model loss on a calibration text (never the evaluation
//! text), written as the JSON artefact that `palu:fisher=FILE` allocates its ranks from.
//!
//! The model runs on Burn's autodiff decorator ([`kv_model::GradLlama`]): one forward and
//! backward pass of the mean next-token loss per sequence, as Palu's `calib_fisher_info`
//! does with PyTorch. After writing the artefact the command prints the allocation at a few
//! ratios and blocks.

use std::path::{Path, PathBuf};
use std::time::Instant;

use kv_lowrank::{PALU_FISHER_FORMAT, PaluFisher};
use kv_model::GradLlama;

use crate::{EvalError, Result, assets};

/// The command's usage text.
pub const USAGE: &str = "\
kv-eval fisher: Palu's Fisher information of the key/value projections (rank allocation)

USAGE:
  kv-eval fisher --out FILE [--model PATH] [--text PATH] [--start-at STR] [--tokenizer GGUF]
                 [--sequences N] [--tokens L]

Defaults: the SmolLM2 GGUF of the asset folder, the text of Emma (calibration and evaluation
texts must differ: evaluation uses Pride and Prejudice), 16 consecutive sequences of 512 tokens.
Each sequence costs one forward and backward pass through the whole model (a few seconds on
two cores for the 135M model). Use the artefact with
`--method palu --param calibration=PCA --param fisher=FILE [--param rank_ratio=0.5] [--param block=32]`.";

struct Options {
    out: PathBuf,
    model: PathBuf,
    text: PathBuf,
    start_at: Option<String>,
    tokenizer: Option<PathBuf>,
    sequences: usize,
    tokens: usize,
}

fn parse(raw: &[String]) -> Result<Options> {
    let mut o = Options {
        out: PathBuf::new(),
        model: assets::default_model_path(),
        text: assets::book_path("emma"),
        start_at: None,
        tokenizer: None,
        sequences: 16,
        tokens: 512,
    };
    let mut it = raw.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| EvalError::Usage(format!("{flag} needs a value\n\n{USAGE}")))?;
        let count = |min: usize| {
            value
                .parse::<usize>()
                .ok()
                .filter(|&n| n >= min)
                .ok_or_else(|| {
                    EvalError::Usage(format!("{flag} `{value}` is not a count >= {min}"))
                })
        };
        match flag.as_str() {
            "--out" => o.out = PathBuf::from(value),
            "--model" => o.model = PathBuf::from(value),
            "--text" => o.text = PathBuf::from(value),
            "--start-at" => o.start_at = Some(value.clone()),
            "--tokenizer" => o.tokenizer = Some(PathBuf::from(value)),
            "--sequences" => o.sequences = count(1)?,
            "--tokens" => o.tokens = count(2)?,
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
    Ok(o)
}

/// Runs `kv-eval fisher` with the arguments after the command name.
///
/// # Errors
/// Usage errors, model and text loading, a text too short for the sequences, writing the
/// artefact.
pub fn run(raw: &[String]) -> Result<()> {
    if raw.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let o = parse(raw)?;
    let t0 = Instant::now();
    let (weights, tokenizer) = assets::load_weights(&o.model, o.tokenizer.as_deref())?;
    let text = assets::read_text(&o.text, o.start_at.as_deref())?;
    let need = o.sequences * o.tokens;
    let ids = assets::encode_prefix(&tokenizer, &text, need, &o.text)?;
    let mut model = GradLlama::new(&weights, &kv_testkit::test_device())?;
    drop(weights);
    let seqs: Vec<&[u32]> = ids[..need].chunks(o.tokens).collect();
    let fisher = model.kv_projection_fisher(&seqs, &mut |i, loss| {
        eprintln!(
            "sequence {}/{}: loss {loss:.4} ({:.1}s)",
            i + 1,
            o.sequences,
            t0.elapsed().as_secs_f64()
        );
    })?;
    let c = model.config();
    let name = |p: &Path| {
        p.file_name()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
    };
    let artefact = PaluFisher {
        format: PALU_FISHER_FORMAT,
        model: name(&o.model),
        text: name(&o.text),
        sequences: o.sequences,
        tokens_per_sequence: o.tokens,
        num_layers: c.num_hidden_layers,
        kv_heads: c.num_key_value_heads,
        head_dim: c.effective_head_dim(),
        keys: fisher.iter().map(|l| l.keys.clone()).collect(),
        values: fisher.iter().map(|l| l.values.clone()).collect(),
    };
    assets::create_parent(&o.out)?;
    artefact.save(&o.out)?;
    eprintln!(
        "wrote {} ({} sequences of {} tokens, {:.1}s)",
        o.out.display(),
        o.sequences,
        o.tokens,
        t0.elapsed().as_secs_f64()
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!("layer  fisher(W_k)  fisher(W_v)");
    for (l, (k, v)) in artefact.keys.iter().zip(&artefact.values).enumerate() {
        println!("{l:>5}  {:>11.4e}  {:>11.4e}", mean(k), mean(v));
    }
    for (ratio, block) in [(0.5, 32), (0.5, 16), (0.5, 8), (0.375, 8), (0.25, 8)] {
        let a = artefact.allocate(ratio, block)?;
        let ranks: Vec<String> = a
            .layers
            .iter()
            .map(|r| format!("{}/{}", r.rank_k, r.rank_v))
            .collect();
        println!(
            "ratio {ratio} block {block}: kept {:.3}; rank_k/rank_v per layer {}",
            a.kept_ratio,
            ranks.join(" ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn options_parse_and_bad_ones_are_refused() {
        let o = parse(&args(&[
            "--out",
            "f.json",
            "--sequences",
            "4",
            "--tokens",
            "128",
        ]))
        .expect("parse");
        assert_eq!((o.sequences, o.tokens), (4, 128));
        assert_eq!(o.text.file_stem().and_then(|s| s.to_str()), Some("emma"));
        for bad in [
            &["--sequences", "4"][..],
            &["--out", "f.json", "--sequences", "0"],
            &["--out", "f.json", "--tokens", "1"],
            &["--out", "f.json", "--tokens"],
            &["--out", "f.json", "--bogus", "1"],
            &[
                "--out",
                "f.json",
                "--text",
                "assets/text/prideprejudice.txt",
            ],
        ] {
            assert!(
                matches!(parse(&args(bad)), Err(EvalError::Usage(_))),
                "{bad:?} should be a usage error"
            );
        }
    }
}
