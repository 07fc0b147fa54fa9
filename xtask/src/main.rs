//! Project automation, run as `cargo xtask <command>` (see `cargo xtask help`).
//!
//! Commands shell out to cargo with one fixed feature set (each crate's defaults, which put
//! the CPU `flex` backend under every test, bench and binary), so local runs and CI build the
//! same artefacts. The GPU feature checks build in their own target folders.

mod ci;
mod eval;
mod rdata;
mod setup;

use anyhow::bail;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  ci [--skip-gpu] [--keep-going]
        everything CI runs, cheapest first: fmt --check, clippy, rustdoc, tests (nextest or
        cargo test, then doctests), bench compile check, kv-core tests on wgpu (when a Vulkan
        driver is installed) and a cuda type-check; --skip-gpu leaves out the last two,
        --keep-going runs every step and reports all failures at the end
  test [--wgpu] [--keep-going]
        the workspace tests (nextest when installed, else cargo test) and the doctests;
        --wgpu adds the kv-core tests on wgpu
  bench [--check] [-- CRITERION_ARGS...]
        run the criterion benches in release, passing CRITERION_ARGS through
        (e.g. `-- --warm-up-time 1 --measurement-time 3`); --check only compiles them (debug)
  setup [--check]
        fetch and verify the real model and text (see `cargo xtask setup --help`)
  eval [kv-eval compare options]
        the main job: setup if needed, then compare every registered cache method on the real
        model and text (protocol A: prefill 3072, score 1024) and print the table
  check-real
        reproduce HF's reference perplexities on the real model within 0.5%: one forward over
        4096 tokens (18.635) and protocol A with the full cache (20.742)
  help  this text";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("ci") => ci::ci(rest),
        Some("test") => ci::test(rest),
        Some("bench") => ci::bench(rest),
        Some("setup") => setup::run(rest),
        Some("eval") => eval::eval(rest),
        Some("check-real") => eval::check_real(rest),
        Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command `{other}`\n\n{USAGE}"),
        None => bail!("no command given\n\n{USAGE}"),
    }
}
