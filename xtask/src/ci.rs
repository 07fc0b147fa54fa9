//! `cargo xtask ci | test | bench`: the checks CI runs, as a sequence of cargo invocations.
//!
//! `ci` runs, cheapest first and stopping at the first failure unless `--keep-going`:
//!
//! | step | command |
//! | --- | --- |
//! | fmt | `cargo fmt --all -- --check` |
//! | clippy | `cargo clippy --workspace --all-targets -- -D warnings` |
//! | doc | `RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps` |
//! | test | `cargo nextest run --workspace` (or `cargo test --workspace` without nextest) |
//! | doctest | `cargo test --workspace --doc` (nextest does not run doctests) |
//! | bench-check | `cargo check -p kv-benches --all-targets` (debug; benches are never run in CI) |
//! | check-real | `cargo xtask check-real`: HF's reference perplexities on the real model (when set up) |
//! | wgpu-test | `KV_TEST_DEVICE=wgpu cargo nextest run -p kv-core --features kv-testkit/wgpu` |
//! | cuda-check | `DOCS_RS=1 cargo check -p kv-core --features cuda` |
//!
//! The first six use each crate's default features, one fixed feature set, so they share one
//! build. `wgpu-test` runs only when a Vulkan driver is installed (lavapipe from
//! `mesa-vulkan-drivers` is enough) and `cuda-check` only type-checks (the CUDA runtime's LLVM
//! bundle cannot be downloaded offline, and `DOCS_RS` skips it; linking would fail). Both build
//! in their own folders, `<target>/wgpu` and `<target>/cuda` (`<target>` is
//! `$CARGO_TARGET_DIR` or `target/`), so that their feature sets do not churn the main build.
//! `--skip-gpu` leaves them out.
//!
//! Every step gets the environment of the shell that started `cargo xtask`, less what
//! `cargo run` adds for the xtask binary, so that running a step by hand and through xtask
//! reuse the same build.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const CI_USAGE: &str = "usage: cargo xtask ci [--skip-gpu] [--keep-going]";
const TEST_USAGE: &str = "usage: cargo xtask test [--wgpu] [--keep-going]";
const BENCH_USAGE: &str = "usage: cargo xtask bench [--check] [-- CRITERION_ARGS...]";

/// Where the Vulkan loader looks for installable client drivers (ICDs) on Linux.
const ICD_DIRS: [&str; 3] = [
    "/usr/share/vulkan/icd.d",
    "/etc/vulkan/icd.d",
    "/usr/local/share/vulkan/icd.d",
];
/// Environment variables that point the Vulkan loader at explicit ICD files.
const ICD_ENV: [&str; 2] = ["VK_DRIVER_FILES", "VK_ICD_FILENAMES"];

/// `cargo xtask ci`.
pub(crate) fn ci(args: &[String]) -> Result<()> {
    let mut skip_gpu = false;
    let mut keep_going = false;
    for arg in args {
        match arg.as_str() {
            "--skip-gpu" => skip_gpu = true,
            "--keep-going" => keep_going = true,
            "-h" | "--help" => {
                println!("{CI_USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n{CI_USAGE}"),
        }
    }
    let ws = Workspace::locate()?;
    let nextest = has_nextest(&ws);
    let mut steps = vec![fmt(), clippy(), doc()];
    steps.extend(tests(nextest));
    steps.push(bench_check());
    steps.push(check_real());
    if skip_gpu {
        steps.push(Step::skipped("wgpu-test", "--skip-gpu"));
        steps.push(Step::skipped("cuda-check", "--skip-gpu"));
    } else {
        steps.push(wgpu_tests(&ws, nextest));
        steps.push(cuda_check(&ws));
    }
    ws.run_all("ci", steps, keep_going)
}

/// `cargo xtask test`.
pub(crate) fn test(args: &[String]) -> Result<()> {
    let mut wgpu = false;
    let mut keep_going = false;
    for arg in args {
        match arg.as_str() {
            "--wgpu" => wgpu = true,
            "--keep-going" => keep_going = true,
            "-h" | "--help" => {
                println!("{TEST_USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n{TEST_USAGE}"),
        }
    }
    let ws = Workspace::locate()?;
    let nextest = has_nextest(&ws);
    let mut steps = tests(nextest);
    if wgpu {
        steps.push(wgpu_tests(&ws, nextest));
    }
    ws.run_all("test", steps, keep_going)
}

/// `cargo xtask bench`.
pub(crate) fn bench(args: &[String]) -> Result<()> {
    let (ours, passed) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    let mut check = false;
    for arg in ours {
        match arg.as_str() {
            "--check" => check = true,
            "-h" | "--help" => {
                println!("{BENCH_USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n{BENCH_USAGE}"),
        }
    }
    let ws = Workspace::locate()?;
    let step = if check {
        if !passed.is_empty() {
            bail!("criterion arguments make no sense with --check\n{BENCH_USAGE}");
        }
        bench_check()
    } else {
        let mut args = vec!["bench", "-p", "kv-benches"];
        if !passed.is_empty() {
            args.push("--");
            args.extend(passed.iter().map(String::as_str));
        }
        Step::cargo("bench", &args)
    };
    ws.run_all("bench", vec![step], false)
}

fn fmt() -> Step {
    Step::cargo("fmt", &["fmt", "--all", "--", "--check"])
}

fn clippy() -> Step {
    Step::cargo(
        "clippy",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )
}

fn doc() -> Step {
    let flags = match std::env::var("RUSTDOCFLAGS") {
        Ok(f) if !f.trim().is_empty() => format!("{f} -D warnings"),
        _ => "-D warnings".to_owned(),
    };
    Step::cargo("doc", &["doc", "--workspace", "--no-deps"]).env("RUSTDOCFLAGS", flags)
}

/// The workspace tests, then the doctests (which nextest does not run).
fn tests(nextest: bool) -> Vec<Step> {
    let test = if nextest {
        Step::cargo("test", &["nextest", "run", "--workspace"])
    } else {
        Step::cargo("test", &["test", "--workspace"])
    };
    if nextest {
        vec![
            test,
            Step::cargo("doctest", &["test", "--workspace", "--doc"]),
        ]
    } else {
        // `cargo test` already ran the doctests.
        vec![test]
    }
}

fn bench_check() -> Step {
    Step::cargo(
        "bench-check",
        &["check", "-p", "kv-benches", "--all-targets"],
    )
}

/// The real-model reference perplexities (`cargo xtask check-real`), when the assets are in
/// place (`cargo xtask setup`; `.ci/run` runs it first).
fn check_real() -> Step {
    if crate::setup::assets_present() {
        Step::cargo("check-real", &["xtask", "check-real"])
    } else {
        Step::skipped(
            "check-real",
            "the real model and text are missing: run cargo xtask setup",
        )
    }
}

/// Builds the wgpu step's dependencies without optimisation. The wgpu/CubeCL stack (wgpu,
/// naga, cubecl, cubek: about a hundred crates the CPU build does not need) is built only for
/// these 48 small tests; on 2 cores, from an empty target folder, the step took 10 min 30 s
/// with the workspace's `opt-level = 3` for dependencies lowered to 1 (11 min 21 s at 3) and
/// 3 min 27 s at 0, its tests running 50 s instead of 28 s.
const WGPU_DEPS_OPT: &str = "profile.dev.package.\"*\".opt-level=0";

/// The kv-core tests on wgpu, in `<target>/wgpu`, when a Vulkan driver is installed.
fn wgpu_tests(ws: &Workspace, nextest: bool) -> Step {
    const NAME: &str = "wgpu-test";
    if let Err(why) = vulkan_present() {
        return Step::skipped(
            NAME,
            &format!(
                "{why}; install a Vulkan driver (e.g. `apt-get install mesa-vulkan-drivers \
                 libvulkan1` for the lavapipe software driver) to run it"
            ),
        );
    }
    let args: &[&str] = if nextest {
        &[
            "nextest",
            "run",
            "-p",
            "kv-core",
            "--features",
            "kv-testkit/wgpu",
            "--config",
            WGPU_DEPS_OPT,
        ]
    } else {
        &[
            "test",
            "-p",
            "kv-core",
            "--tests",
            "--features",
            "kv-testkit/wgpu",
            "--config",
            WGPU_DEPS_OPT,
        ]
    };
    Step::cargo(NAME, args)
        .env("KV_TEST_DEVICE", "wgpu")
        .env("CARGO_TARGET_DIR", ws.target.join("wgpu"))
}

/// Type-checks the CUDA backend path in `<target>/cuda`. `DOCS_RS=1` makes the build script
/// of `tracel-llvm-bundler` skip its download; nothing of this build can be linked.
fn cuda_check(ws: &Workspace) -> Step {
    Step::cargo(
        "cuda-check",
        &["check", "-p", "kv-core", "--features", "cuda"],
    )
    .env("DOCS_RS", "1")
    .env("CARGO_TARGET_DIR", ws.target.join("cuda"))
}

/// Whether a Vulkan driver seems installed: `Ok` with a description, or `Err` saying why not.
///
/// On Linux this looks for the loader library and an ICD manifest; elsewhere wgpu uses the
/// platform's own API, so the step always runs. The kit falls back to flex when no adapter
/// initialises, so a driver that is found but unusable costs a build, not a failure.
fn vulkan_present() -> std::result::Result<String, String> {
    if !cfg!(target_os = "linux") {
        return Ok("not Linux: wgpu picks the platform API".to_owned());
    }
    let loader = vulkan_loader().ok_or("no Vulkan loader (libvulkan.so.1) found")?;
    let mut icds: Vec<String> = Vec::new();
    for var in ICD_ENV {
        if let Some(files) = std::env::var_os(var) {
            icds.extend(
                std::env::split_paths(&files)
                    .filter(|p| p.is_file())
                    .map(|p| p.display().to_string()),
            );
        }
    }
    for dir in ICD_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        icds.extend(
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .map(|p| p.display().to_string()),
        );
    }
    if icds.is_empty() {
        return Err(format!(
            "no Vulkan ICD manifest found in {} or ${}",
            ICD_DIRS.join(", "),
            ICD_ENV.join(", $")
        ));
    }
    icds.sort();
    Ok(format!(
        "loader {}; ICDs {}",
        loader.display(),
        icds.join(", ")
    ))
}

/// The first `libvulkan.so.1` in the usual library folders.
fn vulkan_loader() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["/usr/lib", "/usr/lib64", "/usr/local/lib", "/lib"]
        .iter()
        .map(PathBuf::from)
        .collect();
    // Debian-style multiarch folders, e.g. /usr/lib/x86_64-linux-gnu.
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        dirs.extend(
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with("-linux-gnu")),
        );
    }
    dirs.into_iter()
        .map(|d| d.join("libvulkan.so.1"))
        .find(|p| p.exists())
}

/// Whether `cargo nextest` is installed.
fn has_nextest(ws: &Workspace) -> bool {
    let found = Command::new("cargo")
        .args(["nextest", "--version"])
        .current_dir(&ws.root)
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        println!("cargo-nextest not installed: tests run with `cargo test`");
    }
    found
}

/// One cargo invocation, or a step skipped for a reason.
struct Step {
    name: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, OsString)>,
    skip: Option<String>,
}

impl Step {
    fn cargo(name: &'static str, args: &[&str]) -> Self {
        Step {
            name,
            args: args.iter().map(|&a| a.to_owned()).collect(),
            env: Vec::new(),
            skip: None,
        }
    }

    fn skipped(name: &'static str, why: &str) -> Self {
        Step {
            name,
            args: Vec::new(),
            env: Vec::new(),
            skip: Some(why.to_owned()),
        }
    }

    fn env(mut self, key: &'static str, value: impl Into<OsString>) -> Self {
        self.env.push((key, value.into()));
        self
    }

    /// The command as a shell line, for the log.
    fn display(&self) -> String {
        let mut line = String::new();
        for (k, v) in &self.env {
            let v = v.to_string_lossy();
            if v.contains(char::is_whitespace) {
                let _ = write!(line, "{k}=\"{v}\" ");
            } else {
                let _ = write!(line, "{k}={v} ");
            }
        }
        line.push_str("cargo");
        for a in &self.args {
            line.push(' ');
            line.push_str(a);
        }
        line
    }
}

/// What happened to a step.
enum Outcome {
    Passed(Duration),
    Failed(Duration, String),
    Skipped(String),
}

/// The workspace root (where every command runs) and the main target folder.
struct Workspace {
    root: PathBuf,
    target: PathBuf,
}

impl Workspace {
    fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent folder")?
            .to_path_buf();
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            // Relative to where cargo was started, as cargo reads it.
            Some(dir) if !dir.is_empty() => std::path::absolute(&dir)
                .with_context(|| format!("resolving CARGO_TARGET_DIR={}", dir.display()))?,
            _ => root.join("target"),
        };
        Ok(Workspace { root, target })
    }

    /// Runs `steps` in order, printing each one's name, command and wall time, then a summary.
    /// Stops at the first failure unless `keep_going`.
    fn run_all(&self, what: &str, steps: Vec<Step>, keep_going: bool) -> Result<()> {
        let started = Instant::now();
        let total = steps.len();
        let mut done: Vec<(&'static str, Outcome)> = Vec::new();
        for (i, step) in steps.into_iter().enumerate() {
            let outcome = self.run_step(&step, i + 1, total);
            let failed = matches!(outcome, Outcome::Failed(..));
            done.push((step.name, outcome));
            if failed && !keep_going {
                break;
            }
        }

        println!("\n{what} summary:");
        let mut failures = Vec::new();
        for (name, outcome) in &done {
            match outcome {
                Outcome::Passed(t) => println!("  ok       {name:<12} {:>9}", human(*t)),
                Outcome::Failed(t, why) => {
                    println!("  FAILED   {name:<12} {:>9}  {why}", human(*t));
                    failures.push(*name);
                }
                Outcome::Skipped(why) => println!("  skipped  {name:<12} {:>9}  {why}", "-"),
            }
        }
        if done.len() < total {
            println!(
                "  ({} later step(s) not run; --keep-going runs them all)",
                total - done.len()
            );
        }
        println!("  total    {:>22}", human(started.elapsed()));
        if !failures.is_empty() {
            bail!("{what} failed: {}", failures.join(", "));
        }
        Ok(())
    }

    /// `LD_LIBRARY_PATH` without the folders `cargo run` put in front of it (the target
    /// folder's and the toolchain's; empty when nothing else is left), or `None` when nothing
    /// needs removing.
    fn dylib_path_without_cargo_run(&self) -> Option<OsString> {
        let current = std::env::var_os(DYLIB_PATH)?;
        // `$CARGO` is `<toolchain>/bin/cargo`; the toolchain's libraries live below it.
        let toolchain = std::env::var_os("CARGO")
            .map(PathBuf::from)
            .and_then(|c| Some(c.parent()?.parent()?.to_path_buf()));
        let added = |p: &Path| {
            p.starts_with(&self.target) || toolchain.as_deref().is_some_and(|t| p.starts_with(t))
        };
        let all: Vec<PathBuf> = std::env::split_paths(&current).collect();
        let kept: Vec<&PathBuf> = all.iter().filter(|p| !added(p)).collect();
        if kept.len() == all.len() {
            return None;
        }
        std::env::join_paths(kept).ok()
    }

    fn run_step(&self, step: &Step, index: usize, total: usize) -> Outcome {
        if let Some(why) = &step.skip {
            println!("\n==> [{index}/{total}] {}: skipped ({why})", step.name);
            return Outcome::Skipped(why.clone());
        }
        println!("\n==> [{index}/{total}] {}: {}", step.name, step.display());
        let started = Instant::now();
        let mut cmd = Command::new("cargo");
        for key in inherited_run_env() {
            cmd.env_remove(key);
        }
        match self.dylib_path_without_cargo_run() {
            Some(path) if path.is_empty() => {
                cmd.env_remove(DYLIB_PATH);
            }
            Some(path) => {
                cmd.env(DYLIB_PATH, path);
            }
            None => {}
        }
        let status = cmd
            .args(&step.args)
            .envs(step.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.root)
            .status();
        let took = started.elapsed();
        match status {
            Ok(s) if s.success() => {
                println!("<== {} ok in {}", step.name, human(took));
                Outcome::Passed(took)
            }
            Ok(s) => {
                println!("<== {} FAILED ({s}) in {}", step.name, human(took));
                Outcome::Failed(took, s.to_string())
            }
            Err(e) => {
                println!("<== {} FAILED: cannot start cargo: {e}", step.name);
                Outcome::Failed(took, format!("cannot start cargo: {e}"))
            }
        }
    }
}

/// The variable `cargo run` extends with the target and toolchain library folders.
const DYLIB_PATH: &str = "LD_LIBRARY_PATH";

/// Variables `cargo run` sets for the xtask binary itself, which must not reach the cargo
/// commands it starts: build scripts may track them (`ring` tracks `CARGO_MANIFEST_DIR`),
/// and cargo then rebuilds them, and everything above them, whenever a step alternates
/// between `cargo xtask` and a plain shell.
fn inherited_run_env() -> Vec<OsString> {
    const EXACT: [&str; 7] = [
        "CARGO",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_RUSTC_CURRENT_DIR",
    ];
    std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| {
            let k = k.to_string_lossy();
            EXACT.contains(&k.as_ref()) || k.starts_with("CARGO_PKG_")
        })
        .collect()
}

/// `12.3s` or `4m 05s`.
fn human(t: Duration) -> String {
    let s = t.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        let whole = t.as_secs();
        format!("{}m {:02}s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_millis(12_345)), "12.3s");
        assert_eq!(human(Duration::from_secs(245)), "4m 05s");
    }

    #[test]
    fn commands_display_with_their_environment() {
        let step = Step::cargo("doc", &["doc", "--no-deps"]).env("RUSTDOCFLAGS", "-D warnings");
        assert_eq!(
            step.display(),
            "RUSTDOCFLAGS=\"-D warnings\" cargo doc --no-deps"
        );
    }

    #[test]
    fn gpu_steps_build_in_their_own_target_folders() {
        let ws = Workspace {
            root: PathBuf::from("ws"),
            target: PathBuf::from("t"),
        };
        let cuda = cuda_check(&ws);
        assert!(
            cuda.env
                .iter()
                .any(|(k, v)| *k == "CARGO_TARGET_DIR" && Path::new(v) == Path::new("t/cuda"))
        );
        assert!(cuda.env.iter().any(|(k, _)| *k == "DOCS_RS"));
    }
}
