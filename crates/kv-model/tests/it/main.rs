//! Integration tests for kv-model through its public API: the tiny HF fixture model, and the
//! real SmolLM2 GGUF and Austen text when `cargo xtask setup` has fetched them.
//!
//! Files outside the repository are found relative to `CARGO_MANIFEST_DIR`: the shared fixtures
//! at `../../../shared/fixtures` (the repository is cloned next to `shared/`), the assets at
//! `$KV_ASSETS_DIR` or `../../assets`. A test whose file is absent prints a `skipped:` line and
//! returns.

mod decoder;
mod grad;
mod host_math;
mod real_model;
mod tiny;
mod tokenizer;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use kv_model::gguf::GgufFile;
use safetensors::{Dtype, SafeTensors};

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `$KV_ASSETS_DIR`, else `<workspace>/assets`.
fn assets_dir() -> PathBuf {
    std::env::var_os("KV_ASSETS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("../../assets"))
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF, if `cargo xtask setup` has put it in the assets.
fn real_model_path() -> Option<PathBuf> {
    let path = assets_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        Some(path)
    } else {
        kv_testkit::missing_data(&format!(
            "{} is absent; run cargo xtask setup",
            path.display()
        ));
        None
    }
}

/// The real GGUF, parsed once for all tests of this binary (each caller that finds it absent
/// prints its own `skipped:` line).
fn real_model() -> Option<&'static GgufFile> {
    static MODEL: OnceLock<Option<GgufFile>> = OnceLock::new();
    if MODEL.get().is_some_and(Option::is_none) {
        real_model_path();
    }
    MODEL
        .get_or_init(|| {
            real_model_path().map(|p| GgufFile::open(&p).expect("the real GGUF parses"))
        })
        .as_ref()
}

/// A file under `shared/fixtures`, if present.
fn fixture_path(relative: &str) -> Option<PathBuf> {
    let path = manifest_dir()
        .join("../../../shared/fixtures")
        .join(relative);
    if path.is_file() {
        Some(path)
    } else {
        kv_testkit::missing_data(&format!("fixture {} is absent", path.display()));
        None
    }
}

/// A fixture tensor read with the `safetensors` crate.
#[derive(Debug, Clone)]
enum Fixture {
    F32(Vec<usize>, Vec<f32>),
    I64(Vec<usize>, Vec<i64>),
}

impl Fixture {
    fn f32(&self) -> (&[usize], &[f32]) {
        match self {
            Fixture::F32(s, d) => (s, d),
            Fixture::I64(..) => panic!("expected an F32 fixture tensor"),
        }
    }

    fn i64(&self) -> (&[usize], &[i64]) {
        match self {
            Fixture::I64(s, d) => (s, d),
            Fixture::F32(..) => panic!("expected an I64 fixture tensor"),
        }
    }
}

/// Reads the named tensors of a fixture file.
fn read_fixture(path: &std::path::Path, names: &[&str]) -> BTreeMap<String, Fixture> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    names
        .iter()
        .map(|&name| {
            let view = st.tensor(name).unwrap();
            let shape = view.shape().to_vec();
            let t = match view.dtype() {
                Dtype::F32 => Fixture::F32(
                    shape,
                    view.data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                ),
                Dtype::I64 => Fixture::I64(
                    shape,
                    view.data()
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                ),
                other => panic!("unexpected fixture dtype {other}"),
            };
            (name.to_owned(), t)
        })
        .collect()
}

/// The 512 token ids of *Pride and Prejudice* that the kvpress fixtures were made from.
fn pride_and_prejudice_ids() -> Option<Vec<u32>> {
    let path = fixture_path("kvpress-smollm2-pp/press_knorm.safetensors")?;
    let f = read_fixture(&path, &["input_ids"]);
    let (shape, ids) = f["input_ids"].i64();
    assert_eq!(shape, [1, 512]);
    Some(ids.iter().map(|&i| u32::try_from(i).unwrap()).collect())
}
