//! Conformance with HF transformers' `QuantizedCache` on the quanto backend (optimum-quanto
//! 0.2.7, `q_group_size = 32`, `residual_length = 16`, axis 0 for keys and values), from the
//! shared fixtures.
//!
//! What the fixtures hold (see `shared/fixtures/README.md`): the prompt's keys and values
//! (`*_orig`) and what the cache returns for them (`*_dequant`). HF quantizes the whole prompt
//! at once (no token stays in the residual). quanto's axis-0 grouping with group size 32 splits
//! the contiguous `[batch, heads, tokens, head_dim]` tensor into runs of 32 consecutive
//! elements (half a token for head_dim 64, two tokens for head_dim 16), each with an fp32
//! scale `(max - min) / (2^b - 1)` and a float shift `min`: exactly our asymmetric quantizer
//! grouped along channels after viewing the tensor as rows of 32. Rounding ties may resolve
//! differently in fp32 (quanto divides, we multiply by the reciprocal): such elements differ by
//! one step.
//!
//! The test also prints KIVI's error on the same inputs (keys per channel in groups of 32
//! tokens, values per token in groups of 32 channels or head_dim if smaller), the numbers
//! reported in `docs/techniques/quant.md`; run with `--no-capture` to see them.

use std::path::PathBuf;

use burn::prelude::*;
use kv_core::StorageDtype;
use kv_quant::{BitWidth, GroupAxis, QuantSpec};
use kv_testkit::{tensor_from, test_device, to_vec};
use safetensors::SafeTensors;

fn fixtures() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures");
    if dir.is_dir() {
        Some(dir)
    } else {
        kv_testkit::missing_data(&format!("no fixtures at {}", dir.display()));
        None
    }
}

fn tensor(st: &SafeTensors<'_>, name: &str) -> (Vec<f32>, [usize; 4]) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let shape: [usize; 4] = t.shape().try_into().expect("rank 4");
    let data = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (data, shape)
}

struct Err {
    max: f32,
    rms: f32,
}

fn error(a: &[f32], b: &[f32]) -> Err {
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let ss: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    Err {
        max,
        rms: (ss / a.len() as f64).sqrt() as f32,
    }
}

/// Our quantizer in quanto's grouping: runs of 32 consecutive elements, fp32 scale and shift.
fn quanto_like(x: &[f32], dims: [usize; 4], bits: BitWidth, device: &Device) -> Vec<f32> {
    let [b, h, t, d] = dims;
    let rows = t * d / 32;
    let spec = QuantSpec::new(bits, 32, GroupAxis::Channels)
        .expect("spec")
        .with_scale_dtype(StorageDtype::F32);
    let q = spec
        .quantize(tensor_from(x.to_vec(), [b, h, rows, 32], device))
        .expect("quantize");
    to_vec(&q.dequantize())
}

/// KIVI's quantizers (all tokens quantized, fp16 scales as in KIVI).
fn kivi_like(x: &[f32], dims: [usize; 4], bits: BitWidth, keys: bool, device: &Device) -> Vec<f32> {
    let g = 32.min(dims[3]);
    let spec = if keys {
        QuantSpec::new(bits, 32, GroupAxis::Tokens)
    } else {
        QuantSpec::new(bits, g, GroupAxis::Channels)
    }
    .expect("spec");
    let q = spec
        .quantize(tensor_from(x.to_vec(), dims, device))
        .expect("quantize");
    to_vec(&q.dequantize())
}

#[test]
fn axis0_group32_quantizer_reproduces_quanto() {
    let Some(dir) = fixtures() else { return };
    let device = test_device();
    let files = [
        (
            "kvpress-tiny",
            "qcache_quanto_{b}bit_axisk0_axisv0.safetensors",
            vec![0, 1],
        ),
        (
            "kvpress-smollm2-pp",
            "qcache_quanto_{b}bit_axisk0_axisv0_layers_0_14.safetensors",
            vec![0, 14],
        ),
    ];
    eprintln!(
        "fixture | layer | bits | tensor | quanto max / rms | ours-vs-quanto mismatches | KIVI max / rms"
    );
    for (folder, pattern, layers) in &files {
        for bits in [2u32, 4] {
            let path = dir
                .join(folder)
                .join(pattern.replace("{b}", &bits.to_string()));
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let st = SafeTensors::deserialize(&bytes).expect("safetensors");
            let bw = BitWidth::new(bits).expect("width");
            for &l in layers {
                for what in ["keys", "values"] {
                    let (orig, dims) = tensor(&st, &format!("L{l}.{what}_orig"));
                    let (deq, _) = tensor(&st, &format!("L{l}.{what}_dequant"));
                    let ours = quanto_like(&orig, dims, bw, &device);
                    // Elements that differ from quanto must be rounding ties: one step apart.
                    let mut mismatches = 0;
                    for (g, ((o, q), x)) in ours
                        .chunks(32)
                        .zip(deq.chunks(32))
                        .zip(orig.chunks(32))
                        .enumerate()
                    {
                        let (mn, mx) = x
                            .iter()
                            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                                (a.min(v), b.max(v))
                            });
                        let step = (mx - mn) / bw.max_code() as f32;
                        for (a, b) in o.iter().zip(q) {
                            let diff = (a - b).abs();
                            if diff > 1e-5 + 1e-6 * b.abs() {
                                mismatches += 1;
                                assert!(
                                    (diff - step).abs() <= 1e-4 * (1.0 + step),
                                    "{folder} L{l} {what} {bits} bits, group {g}: {a} vs quanto {b} (step {step})"
                                );
                            }
                        }
                    }
                    assert!(
                        mismatches * 1000 <= ours.len(),
                        "{folder} L{l} {what}: {mismatches} rounding-tie mismatches of {}",
                        ours.len()
                    );
                    let eq = error(&orig, &deq);
                    let ek = error(&orig, &kivi_like(&orig, dims, bw, what == "keys", &device));
                    eprintln!(
                        "{folder} | {l} | {bits} | {what} | {:.4} / {:.4} | {mismatches} of {} | {:.4} / {:.4}",
                        eq.max,
                        eq.rms,
                        ours.len(),
                        ek.max,
                        ek.rms
                    );
                }
            }
        }
    }
}
