//! Per-layer fidelity of a method against the full cache: relative error of attention outputs
//! and of the keys/values it holds, on the model's own trajectory.
//!
//! Every layer runs a [`Probe`]: the method's cache and a full [`DenseCache`] receive the same
//! keys and values; both answer every query; the probe records the relative error and passes
//! the *full* cache's output on, so each layer's error is measured on identical inputs (errors
//! do not compound across layers).

use std::sync::{Arc, Mutex, PoisonError};

use burn::prelude::*;
use kv_core::{
    Attended, DenseCache, DenseCacheConfig, HeldBuffer, KvBlock, KvCache, KvShape, KvView,
    LayerCaches, Lengths, MemoryReport, PAD, Query, StatsRequest,
};
use kv_model::Llama;
use serde::{Deserialize, Serialize};

use crate::{EvalError, Result};

/// What one layer's probe measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LayerFidelity {
    /// Layer index.
    pub layer: usize,
    /// `‖o_method − o_full‖ / ‖o_full‖` over the prefill's attention calls.
    pub attn_rel_err_prefill: f64,
    /// The same over the scored tokens (after the prefill's compression).
    pub attn_rel_err_score: f64,
    /// `‖K_held − K_full‖ / ‖K_full‖` over the held tokens (at their positions), after prefill.
    pub key_rel_err: f64,
    /// The same for values.
    pub value_rel_err: f64,
    /// Held token slots over appended tokens × KV heads, after prefill.
    pub kept_fraction: f64,
    /// The method's memory after prefill.
    pub memory_after_prefill: MemoryReport,
}

#[derive(Debug, Default)]
struct Acc {
    /// (Σ‖diff‖², Σ‖ref‖²) before and after end_prefill.
    prefill: (f64, f64),
    score: (f64, f64),
    after_prefill: bool,
    kv: Option<(f64, f64, f64)>,
    memory: MemoryReport,
}

/// A cache that runs a method next to the full cache and measures the difference.
#[derive(Debug)]
pub struct Probe {
    method: Box<dyn KvCache>,
    reference: DenseCache,
    acc: Arc<Mutex<Acc>>,
}

fn sq_norm<const D: usize>(t: Tensor<D>) -> f64 {
    f64::from(t.powi_scalar(2).sum().into_scalar::<f32>())
}

impl Probe {
    fn kv_errors(&self) -> (f64, f64, f64) {
        let view = self.method.view();
        let full = self.reference.view();
        let s = self.method.shape();
        let [_, _, t, d] = view.keys.dims();
        let ft = full.keys.dims()[2];
        let read = |x: &Tensor<4>| {
            x.to_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap_or_default()
        };
        let (mk, mv, fk, fv) = (
            read(&view.keys),
            read(&view.values),
            read(&full.keys),
            read(&full.values),
        );
        let (mut dk, mut nk, mut dv, mut nv, mut held) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0usize);
        for stream in 0..s.streams() {
            // Map positions of the full cache (one stream) to its slots.
            let fpos = &full.positions[stream * ft..(stream + 1) * ft];
            for slot in 0..t {
                let p = view.positions[stream * t + slot];
                if p == PAD {
                    continue;
                }
                let Some(fslot) = fpos.iter().position(|&q| q == p) else {
                    continue;
                };
                held += 1;
                for c in 0..d {
                    let (a, b) = (
                        mk[(stream * t + slot) * d + c],
                        fk[(stream * ft + fslot) * d + c],
                    );
                    dk += f64::from(a - b).powi(2);
                    nk += f64::from(b).powi(2);
                    let (a, b) = (
                        mv[(stream * t + slot) * d + c],
                        fv[(stream * ft + fslot) * d + c],
                    );
                    dv += f64::from(a - b).powi(2);
                    nv += f64::from(b).powi(2);
                }
            }
        }
        let logical: usize = self.method.lengths().logical.iter().sum::<usize>() * s.kv_heads();
        (
            (dk / nk.max(f64::MIN_POSITIVE)).sqrt(),
            (dv / nv.max(f64::MIN_POSITIVE)).sqrt(),
            held as f64 / logical.max(1) as f64,
        )
    }
}

impl KvCache for Probe {
    fn shape(&self) -> KvShape {
        self.method.shape()
    }
    fn device(&self) -> &Device {
        self.method.device()
    }
    fn key_rope(&self) -> kv_core::KeyRope {
        // The reference stores post-RoPE keys; methods storing pre-RoPE keys cannot be probed
        // side by side with it from one append.
        self.method.key_rope()
    }
    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        self.method.append(block.clone())?;
        self.reference.append(block)
    }
    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        let got = self.method.attend(query, StatsRequest::NONE)?;
        let want = self.reference.attend(query, stats)?;
        let diff = sq_norm(got.output - want.output.clone());
        let norm = sq_norm(want.output.clone());
        let mut acc = self.acc.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = if acc.after_prefill {
            &mut acc.score
        } else {
            &mut acc.prefill
        };
        slot.0 += diff;
        slot.1 += norm;
        Ok(want)
    }
    fn end_prefill(&mut self) -> kv_core::Result<()> {
        self.method.end_prefill()?;
        let kv = self.kv_errors();
        let mut acc = self.acc.lock().unwrap_or_else(PoisonError::into_inner);
        acc.after_prefill = true;
        acc.kv = Some(kv);
        acc.memory = self.method.memory();
        Ok(())
    }
    fn view(&self) -> KvView {
        self.method.view()
    }
    fn lengths(&self) -> Lengths {
        self.method.lengths()
    }
    fn memory(&self) -> MemoryReport {
        self.method.memory()
    }
    fn held_buffers(&self) -> Vec<HeldBuffer> {
        self.method.held_buffers()
    }
    fn reset(&mut self) {
        self.method.reset();
        self.reference.reset();
        *self.acc.lock().unwrap_or_else(PoisonError::into_inner) = Acc::default();
    }
}

/// Wraps every layer of `method` in a [`Probe`], runs prefill `ids[..p]` and scores
/// `ids[p..p + c]` teacher-forced, and returns the per-layer fidelity.
///
/// # Errors
/// Model and cache errors; texts shorter than `p + c`; methods storing pre-RoPE keys.
pub fn measure(
    model: &Llama,
    method: LayerCaches,
    ids: &[u32],
    p: usize,
    c: usize,
) -> Result<Vec<LayerFidelity>> {
    if p == 0 || c == 0 || ids.len() < p + c {
        return Err(EvalError::Text(format!(
            "need {} tokens, have {}",
            p + c,
            ids.len()
        )));
    }
    let shape = model.kv_shape(1)?;
    let mut accs = Vec::new();
    let mut layers: Vec<Box<dyn KvCache>> = Vec::new();
    for (i, m) in method.into_layers().into_iter().enumerate() {
        if m.key_rope() == kv_core::KeyRope::PreRope {
            return Err(EvalError::Usage(format!(
                "layer {i}: fidelity cannot probe a pre-RoPE cache"
            )));
        }
        let acc = Arc::new(Mutex::new(Acc::default()));
        accs.push(acc.clone());
        let reference = DenseCacheConfig::new(shape).init(model.device())?;
        layers.push(Box::new(Probe {
            method: m,
            reference,
            acc,
        }));
    }
    let mut caches = LayerCaches::new(layers);
    let pos: Vec<u32> = (0..p as u32).collect();
    model.forward_hidden(&ids[..p], &pos, 1, &mut caches)?;
    caches.end_prefill()?;
    let rest: Vec<u32> = (p as u32..(p + c) as u32).collect();
    model.forward_hidden(&ids[p..p + c], &rest, 1, &mut caches)?;
    let rel = |(d, n): (f64, f64)| (d / n.max(f64::MIN_POSITIVE)).sqrt();
    Ok(accs
        .iter()
        .enumerate()
        .map(|(layer, acc)| {
            let a = acc.lock().unwrap_or_else(PoisonError::into_inner);
            let (k, v, kept) = a.kv.unwrap_or_default();
            LayerFidelity {
                layer,
                attn_rel_err_prefill: rel(a.prefill),
                attn_rel_err_score: rel(a.score),
                key_rel_err: k,
                value_rel_err: v,
                kept_fraction: kept,
                memory_after_prefill: a.memory,
            }
        })
        .collect())
}
