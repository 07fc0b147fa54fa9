//! `cargo xtask eval` (the README's main job) and `cargo xtask check-real` (the real-model
//! reference numbers), both thin wrappers over the `kv-eval` binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The text the reference numbers start at (real-assets.md, protocol A).
const START_AT: &str = "It is a truth universally";
/// HF transformers, fp32, one forward over the 4096 tokens from `START_AT`.
const REF_FORWARD_PPL: f64 = 18.635;
/// HF transformers, fp32, protocol A (prefill 3072, score 1024), full cache.
const REF_PROTOCOL_A_PPL: f64 = 20.742;
/// Allowed relative deviation from the references.
const TOLERANCE: f64 = 0.005;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn kv_eval(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root())
        .args(["run", "--quiet", "-p", "kv-eval", "--"])
        .args(args)
        .status()
        .context("running kv-eval through cargo")?;
    if !status.success() {
        bail!("kv-eval {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// `cargo xtask eval [kv-eval compare options]`: fetches the assets if needed, then compares
/// every registered method on protocol A and prints the table.
pub(crate) fn eval(args: &[String]) -> Result<()> {
    crate::setup::run(&[])?;
    let mut a: Vec<&str> = vec!["compare"];
    a.extend(args.iter().map(String::as_str));
    kv_eval(&a)
}

fn json_number(path: &Path, key: &str) -> Result<f64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let needle = format!("\"{key}\":");
    let at = text
        .find(&needle)
        .with_context(|| format!("no `{key}` in {}", path.display()))?;
    let rest = text[at + needle.len()..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c)))
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .with_context(|| format!("`{key}` in {} is not a number", path.display()))
}

/// `cargo xtask check-real`: reproduces the HF reference perplexities on the real model and
/// text (one forward over 4096 tokens; protocol A with the full cache) within 0.5%.
pub(crate) fn check_real(args: &[String]) -> Result<()> {
    if let Some(a) = args.first() {
        bail!("unknown argument `{a}`; usage: cargo xtask check-real");
    }
    crate::setup::run(&["--check".to_owned()])
        .context("the real model and text are missing: run `cargo xtask setup` first")?;
    let dir = std::env::temp_dir().join(format!("kv-check-real-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let fwd = dir.join("forward.json");
    let ppl = dir.join("ppl.json");
    let (fwd_s, ppl_s) = (fwd.display().to_string(), ppl.display().to_string());
    kv_eval(&[
        "forward",
        "--start-at",
        START_AT,
        "--tokens",
        "4096",
        "--json",
        &fwd_s,
    ])?;
    kv_eval(&[
        "ppl",
        "--start-at",
        START_AT,
        "--prefill",
        "3072",
        "--score",
        "1024",
        "--json",
        &ppl_s,
    ])?;
    let checks = [
        (
            "one forward over 4096 tokens",
            json_number(&fwd, "ppl")?,
            REF_FORWARD_PPL,
        ),
        (
            "protocol A, full cache",
            json_number(&ppl, "ppl")?,
            REF_PROTOCOL_A_PPL,
        ),
    ];
    let _ = std::fs::remove_dir_all(&dir);
    let mut failed = false;
    for (what, got, want) in checks {
        let dev = got / want - 1.0;
        let ok = dev.abs() <= TOLERANCE;
        failed |= !ok;
        println!(
            "{} {what}: ppl {got:.3} vs HF {want:.3} ({:+.3}%, tolerance ±{:.1}%)",
            if ok { "ok  " } else { "FAIL" },
            dev * 100.0,
            TOLERANCE * 100.0
        );
    }
    if failed {
        bail!("the real model does not reproduce the reference perplexities");
    }
    Ok(())
}
