//! The key-only scorers (KNorm, KeyDiff, StreamingLLM) against kvpress 0.5.5's scores, from
//! the keys kvpress saw (`shared/fixtures`, see its README). Query-based scorers need the
//! model and are checked end to end in kv-eval's `evict_conformance` tests.

use std::path::PathBuf;

use burn::prelude::*;
use kv_evict::score::{keydiff, knorm, streaming_llm, to_host};
use kv_testkit::{assert_close_slices, tensor_from, test_device};
use safetensors::{Dtype, SafeTensors};

fn fixture(rel: &str) -> Option<Vec<u8>> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures")
        .join(rel);
    match std::fs::read(&p) {
        Ok(b) => Some(b),
        Err(_) => {
            kv_testkit::missing_data(&format!("fixture {} is absent", p.display()));
            None
        }
    }
}

/// An f32 tensor of a fixture file, with its shape.
fn f32s(bytes: &[u8], name: &str) -> (Vec<usize>, Vec<f32>) {
    let st = SafeTensors::deserialize(bytes).expect("fixture parses");
    let v = st.tensor(name).expect("tensor present");
    assert_eq!(v.dtype(), Dtype::F32, "{name}");
    let data = v
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (v.shape().to_vec(), data)
}

fn keys(bytes: &[u8], name: &str) -> Tensor<4> {
    let (shape, data) = f32s(bytes, name);
    tensor_from(
        data,
        [shape[0], shape[1], shape[2], shape[3]],
        &test_device(),
    )
}

#[test]
fn tiny_key_scorers_equal_kvpress_scores() {
    for (press, f) in [
        ("knorm", knorm as fn(Tensor<4>) -> Tensor<3>),
        ("keydiff", keydiff),
    ] {
        let Some(b) = fixture(&format!("kvpress-tiny/press_{press}.safetensors")) else {
            return;
        };
        for l in 0..2 {
            let got = to_host(f(keys(&b, &format!("L{l}.keys_in")))).expect("host");
            let (_, want) = f32s(&b, &format!("L{l}.scores"));
            assert_close_slices(&got, &want, 1e-5, 1e-4);
        }
    }
}

#[test]
fn smollm2_key_scorers_equal_kvpress_scores_on_captured_keys() {
    let Some(kv) = fixture("kvpress-smollm2-pp/prefill_kv_layers_0_14_29.safetensors") else {
        return;
    };
    for (press, f) in [
        ("knorm", knorm as fn(Tensor<4>) -> Tensor<3>),
        ("keydiff", keydiff),
    ] {
        let Some(b) = fixture(&format!("kvpress-smollm2-pp/press_{press}.safetensors")) else {
            return;
        };
        for l in [0, 14, 29] {
            let got = to_host(f(keys(&kv, &format!("L{l}.keys_in")))).expect("host");
            let (_, want) = f32s(&b, &format!("L{l}.scores"));
            assert_close_slices(&got, &want, 1e-5, 1e-4);
        }
    }
}

#[test]
fn streaming_llm_scores_equal_kvpress() {
    let Some(b) = fixture("kvpress-smollm2-pp/press_streaming_llm.safetensors") else {
        return;
    };
    let (shape, want) = f32s(&b, "L0.scores");
    let got = to_host(streaming_llm(
        shape[0],
        shape[1],
        shape[2],
        4,
        0.5,
        &test_device(),
    ))
    .expect("host");
    assert_eq!(got, want);
}
