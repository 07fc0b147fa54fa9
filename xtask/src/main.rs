//! Project automation, run as `cargo xtask <command>` (see `cargo xtask help`).
//!
//! Commands shell out to cargo with one fixed feature set, so local runs and CI build the
//! same artefacts.

mod rdata;
mod setup;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("setup") => setup::run(&args[1..]),
        _ => anyhow::bail!("usage: cargo xtask setup"),
    }
}
