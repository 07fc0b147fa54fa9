//! LESS's learned kernels (Dong et al. 2024, arXiv 2402.09398; reference code hdong920/LESS):
//! the feature maps `φ` (queries) and `ψ` (keys) of one layer, their host-side math with the
//! intermediates that training back-propagates through, and the versioned artefact.
//!
//! The parametrisation follows the reference (`KernelizedHeadAttention` in `train_kernels.py`,
//! `LlamaAttentionLESS` in `inference/generative/llama_gen.py`):
//!
//! ```text
//! φ(q) = | gelu( gelu(q W1) W2 ) |                               (per query head)
//! u    = |s| ⊙ gelu( gelu(k W1') W2' )
//! ψ(k) = | u + (u I) ⊙ s2 |                                      (per KV head)
//! ```
//!
//! with `W1: [head_dim, hidden]`, `W2: [hidden, rank]`, `I: [rank, rank]` and the scalings
//! `s`, `s2: [rank]` (initialised at `1e-4`, so that an untrained map adds almost nothing).
//! `gelu` is the exact (erf) GELU, as PyTorch's default.

use kv_core::{KvError, KvShape, Result};
use serde::{Deserialize, Serialize};

/// The format tag of [`LessArtefact`].
pub const LESS_ARTEFACT_FORMAT: &str = "kv-dmc/less";
/// The artefact version this crate reads and writes.
pub const LESS_ARTEFACT_VERSION: u32 = 1;

/// `erf(x)`, from `erfc` by Numerical Recipes' Chebyshev fit (fractional error below 1.2e-7).
pub(crate) fn erf(x: f32) -> f32 {
    let z = f64::from(x).abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    let r = 1.0 - erfc;
    (if x >= 0.0 { r } else { -r }) as f32
}

/// The exact GELU, `x Φ(x)`.
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * core::f32::consts::FRAC_1_SQRT_2))
}

/// `d gelu / dx = Φ(x) + x φ(x)`.
pub(crate) fn gelu_grad(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf(x * core::f32::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp() * 0.398_942_3;
    cdf + x * pdf
}

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// A two-layer map `gelu(gelu(x W1) W2)` of one head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mlp {
    /// `[head_dim, hidden]`, row-major.
    pub w1: Vec<f32>,
    /// `[hidden, rank]`, row-major.
    pub w2: Vec<f32>,
}

/// The intermediates of one [`Mlp`] evaluation (pre-activations), for back-propagation.
#[derive(Debug, Clone, Default)]
pub(crate) struct MlpTrace {
    pub(crate) a1: Vec<f32>,
    pub(crate) h1: Vec<f32>,
    pub(crate) a2: Vec<f32>,
    pub(crate) h2: Vec<f32>,
}

impl Mlp {
    /// All-zero weights.
    pub fn zeros(head_dim: usize, hidden: usize, rank: usize) -> Self {
        Mlp {
            w1: vec![0.0; head_dim * hidden],
            w2: vec![0.0; hidden * rank],
        }
    }

    pub(crate) fn forward(&self, x: &[f32], hidden: usize, rank: usize) -> MlpTrace {
        let mut a1 = vec![0.0f32; hidden];
        for (i, &xi) in x.iter().enumerate() {
            if xi == 0.0 {
                continue;
            }
            let row = &self.w1[i * hidden..(i + 1) * hidden];
            for (a, w) in a1.iter_mut().zip(row) {
                *a += xi * w;
            }
        }
        let h1: Vec<f32> = a1.iter().map(|&a| gelu(a)).collect();
        let mut a2 = vec![0.0f32; rank];
        for (j, &hj) in h1.iter().enumerate() {
            let row = &self.w2[j * rank..(j + 1) * rank];
            for (a, w) in a2.iter_mut().zip(row) {
                *a += hj * w;
            }
        }
        let h2 = a2.iter().map(|&a| gelu(a)).collect();
        MlpTrace { a1, h1, a2, h2 }
    }

    /// Back-propagates `dh2` (gradient at the output) into `grad` (same layout as `self`).
    pub(crate) fn backward(&self, x: &[f32], tr: &MlpTrace, dh2: &[f32], grad: &mut Mlp) {
        let (hidden, rank) = (tr.a1.len(), tr.a2.len());
        let da2: Vec<f32> = dh2
            .iter()
            .zip(&tr.a2)
            .map(|(g, &a)| g * gelu_grad(a))
            .collect();
        let mut dh1 = vec![0.0f32; hidden];
        for j in 0..hidden {
            let row = &self.w2[j * rank..(j + 1) * rank];
            let grow = &mut grad.w2[j * rank..(j + 1) * rank];
            let mut acc = 0.0;
            for c in 0..rank {
                grow[c] += tr.h1[j] * da2[c];
                acc += row[c] * da2[c];
            }
            dh1[j] = acc;
        }
        let da1: Vec<f32> = dh1
            .iter()
            .zip(&tr.a1)
            .map(|(g, &a)| g * gelu_grad(a))
            .collect();
        for (i, &xi) in x.iter().enumerate() {
            if xi == 0.0 {
                continue;
            }
            let grow = &mut grad.w1[i * hidden..(i + 1) * hidden];
            for (g, d) in grow.iter_mut().zip(&da1) {
                *g += xi * d;
            }
        }
    }
}

/// `φ` of one query head: `|gelu(gelu(q W1) W2)|`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryMap {
    /// The two-layer map.
    pub mlp: Mlp,
}

/// `ψ` of one KV head: `|u + (u I) ⊙ s2|` with `u = |s| ⊙ gelu(gelu(k W1) W2)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyMap {
    /// The two-layer map.
    pub mlp: Mlp,
    /// `s`, `[rank]` (the reference's `scalingD`).
    pub scale: Vec<f32>,
    /// `I`, `[rank, rank]` row-major (the reference's `interaction_k`).
    pub interaction: Vec<f32>,
    /// `s2`, `[rank]` (the reference's `scalingD2`).
    pub scale2: Vec<f32>,
}

/// The intermediates of one [`KeyMap`] evaluation.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyTrace {
    pub(crate) mlp: MlpTrace,
    pub(crate) u: Vec<f32>,
    pub(crate) w: Vec<f32>,
    pub(crate) y: Vec<f32>,
}

impl KeyMap {
    pub(crate) fn forward(&self, k: &[f32], hidden: usize, rank: usize) -> KeyTrace {
        let mlp = self.mlp.forward(k, hidden, rank);
        let u: Vec<f32> = mlp
            .h2
            .iter()
            .zip(&self.scale)
            .map(|(h, s)| s.abs() * h)
            .collect();
        let mut w = vec![0.0f32; rank];
        for (m, &um) in u.iter().enumerate() {
            let row = &self.interaction[m * rank..(m + 1) * rank];
            for (wr, i) in w.iter_mut().zip(row) {
                *wr += um * i;
            }
        }
        let y = (0..rank).map(|r| u[r] + w[r] * self.scale2[r]).collect();
        KeyTrace { mlp, u, w, y }
    }

    /// Back-propagates `dψ` (gradient at `ψ = |y|`) into `grad`.
    pub(crate) fn backward(&self, k: &[f32], tr: &KeyTrace, dpsi: &[f32], grad: &mut KeyMap) {
        let rank = tr.y.len();
        let dy: Vec<f32> = dpsi.iter().zip(&tr.y).map(|(g, &y)| g * sign(y)).collect();
        let mut du = dy.clone();
        for m in 0..rank {
            let row = &self.interaction[m * rank..(m + 1) * rank];
            let grow = &mut grad.interaction[m * rank..(m + 1) * rank];
            for r in 0..rank {
                let t = dy[r] * self.scale2[r];
                du[m] += row[r] * t;
                grow[r] += tr.u[m] * t;
            }
        }
        for r in 0..rank {
            grad.scale2[r] += dy[r] * tr.w[r];
        }
        let mut dh2 = vec![0.0f32; rank];
        for m in 0..rank {
            grad.scale[m] += du[m] * tr.mlp.h2[m] * sign(self.scale[m]);
            dh2[m] = du[m] * self.scale[m].abs();
        }
        self.mlp.backward(k, &tr.mlp, &dh2, &mut grad.mlp);
    }
}

/// The learned maps of one layer: `φ` per query head, `ψ` per KV head, all of the same
/// `hidden` width and `rank`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LessMaps {
    /// Channels per head.
    pub head_dim: usize,
    /// Width of the hidden layer (the reference's `ker_hid`).
    pub hidden: usize,
    /// Rank of the state (the reference's `ker_dim`).
    pub rank: usize,
    /// `φ`, one per query head.
    pub query: Vec<QueryMap>,
    /// `ψ`, one per KV head.
    pub key: Vec<KeyMap>,
}

/// A small deterministic generator (SplitMix64) for initialisation.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[-a, a]`.
    pub(crate) fn uniform(&mut self, a: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * u - 1.0) * a
    }
}

impl LessMaps {
    /// Maps that are zero everywhere: `φ ≡ ψ ≡ 0`, so the state stays zero and LESS is its
    /// sparse policy exactly.
    pub fn zeros(shape: &KvShape, hidden: usize, rank: usize) -> Self {
        let d = shape.head_dim();
        LessMaps {
            head_dim: d,
            hidden,
            rank,
            query: (0..shape.q_heads())
                .map(|_| QueryMap {
                    mlp: Mlp::zeros(d, hidden, rank),
                })
                .collect(),
            key: (0..shape.kv_heads())
                .map(|_| KeyMap {
                    mlp: Mlp::zeros(d, hidden, rank),
                    scale: vec![0.0; rank],
                    interaction: vec![0.0; rank * rank],
                    scale2: vec![0.0; rank],
                })
                .collect(),
        }
    }

    /// The reference initialisation: Xavier-uniform weights (`±√(6 / (fan_in + fan_out))`),
    /// scalings `s = s2 = 1e-4`, from a seed.
    pub fn init(shape: &KvShape, hidden: usize, rank: usize, seed: u64) -> Self {
        let mut rng = SplitMix(seed);
        let d = shape.head_dim();
        let mlp = |rng: &mut SplitMix| {
            let a1 = (6.0 / (d + hidden) as f32).sqrt();
            let a2 = (6.0 / (hidden + rank) as f32).sqrt();
            Mlp {
                w1: (0..d * hidden).map(|_| rng.uniform(a1)).collect(),
                w2: (0..hidden * rank).map(|_| rng.uniform(a2)).collect(),
            }
        };
        let query = (0..shape.q_heads())
            .map(|_| QueryMap { mlp: mlp(&mut rng) })
            .collect();
        let key = (0..shape.kv_heads())
            .map(|_| {
                let m = mlp(&mut rng);
                let ai = (6.0 / (2 * rank) as f32).sqrt();
                KeyMap {
                    mlp: m,
                    scale: vec![1e-4; rank],
                    interaction: (0..rank * rank).map(|_| rng.uniform(ai)).collect(),
                    scale2: vec![1e-4; rank],
                }
            })
            .collect();
        LessMaps {
            head_dim: d,
            hidden,
            rank,
            query,
            key,
        }
    }

    /// `φ(q)` of query head `head`, `rank` entries (non-negative).
    pub fn phi(&self, head: usize, q: &[f32]) -> Vec<f32> {
        self.query[head]
            .mlp
            .forward(q, self.hidden, self.rank)
            .h2
            .into_iter()
            .map(f32::abs)
            .collect()
    }

    /// `ψ(k)` of KV head `head`, `rank` entries (non-negative).
    pub fn psi(&self, head: usize, k: &[f32]) -> Vec<f32> {
        self.key[head]
            .forward(k, self.hidden, self.rank)
            .y
            .into_iter()
            .map(f32::abs)
            .collect()
    }

    /// Bytes of the parameters (f32).
    pub fn bytes(&self) -> usize {
        4 * self.num_params()
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.slices().iter().map(|s| s.len()).sum()
    }

    /// Every parameter vector, in a fixed order.
    pub(crate) fn slices(&self) -> Vec<&[f32]> {
        let mut out: Vec<&[f32]> = Vec::new();
        for q in &self.query {
            out.push(&q.mlp.w1);
            out.push(&q.mlp.w2);
        }
        for k in &self.key {
            out.push(&k.mlp.w1);
            out.push(&k.mlp.w2);
            out.push(&k.scale);
            out.push(&k.interaction);
            out.push(&k.scale2);
        }
        out
    }

    /// Every parameter vector, mutable, in the order of [`slices`](Self::slices).
    pub(crate) fn slices_mut(&mut self) -> Vec<&mut [f32]> {
        let mut out: Vec<&mut [f32]> = Vec::new();
        for q in &mut self.query {
            out.push(&mut q.mlp.w1);
            out.push(&mut q.mlp.w2);
        }
        for k in &mut self.key {
            out.push(&mut k.mlp.w1);
            out.push(&mut k.mlp.w2);
            out.push(&mut k.scale);
            out.push(&mut k.interaction);
            out.push(&mut k.scale2);
        }
        out
    }

    /// A zero copy of the same layout (gradients, optimiser moments).
    pub(crate) fn zeros_like(&self) -> Self {
        let mut z = self.clone();
        z.slices_mut().into_iter().for_each(|s| s.fill(0.0));
        z
    }

    /// Checks the maps against a layer: head counts, `head_dim`, every vector's length,
    /// finiteness, and a non-zero rank and width.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] (field `maps`) naming what does not fit.
    pub fn validate(&self, shape: &KvShape) -> Result<()> {
        let bad = |reason: String| KvError::InvalidConfig {
            field: "maps",
            reason,
        };
        if self.head_dim != shape.head_dim() {
            return Err(bad(format!(
                "maps for head_dim {}, the layer's head_dim is {}",
                self.head_dim,
                shape.head_dim()
            )));
        }
        if self.rank == 0 || self.hidden == 0 {
            return Err(bad(format!(
                "rank {} and hidden width {} must both be at least 1",
                self.rank, self.hidden
            )));
        }
        if self.query.len() != shape.q_heads() || self.key.len() != shape.kv_heads() {
            return Err(bad(format!(
                "{} query maps and {} key maps for a layer of {} query heads and {} KV heads",
                self.query.len(),
                self.key.len(),
                shape.q_heads(),
                shape.kv_heads()
            )));
        }
        let (d, hid, r) = (self.head_dim, self.hidden, self.rank);
        let check = |what: String, v: &[f32], n: usize| {
            if v.len() != n {
                return Err(bad(format!("{what} has {} entries, expected {n}", v.len())));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("{what} holds non-finite values")));
            }
            Ok(())
        };
        for (h, q) in self.query.iter().enumerate() {
            check(format!("query[{h}].w1"), &q.mlp.w1, d * hid)?;
            check(format!("query[{h}].w2"), &q.mlp.w2, hid * r)?;
        }
        for (h, k) in self.key.iter().enumerate() {
            check(format!("key[{h}].w1"), &k.mlp.w1, d * hid)?;
            check(format!("key[{h}].w2"), &k.mlp.w2, hid * r)?;
            check(format!("key[{h}].scale"), &k.scale, r)?;
            check(format!("key[{h}].interaction"), &k.interaction, r * r)?;
            check(format!("key[{h}].scale2"), &k.scale2, r)?;
        }
        Ok(())
    }
}

/// How a LESS artefact was trained (recorded, not interpreted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LessTrainingRecord {
    /// The calibration text (never the evaluation text).
    pub text: String,
    /// Calibration sequences per layer and their length in tokens.
    pub sequences: usize,
    /// Tokens per sequence.
    pub tokens: usize,
    /// Tokens prefilled before the scored decode steps.
    pub prefill: usize,
    /// The sparse policy the maps were trained under (as `LessPolicy`'s JSON).
    pub policy: String,
    /// What the loss measures: `attention` (the MSE of the concatenated head outputs; the
    /// default of records that do not say) or `output` (the MSE after the layer's output
    /// projection, as the reference).
    #[serde(default = "default_objective")]
    pub objective: String,
    /// Epochs (Adam, one step per sequence).
    pub epochs: usize,
    /// Adam's learning rate.
    pub lr: f32,
    /// Seed of the initialisation.
    pub seed: u64,
    /// The layers that were trained; the others hold zero maps (their sparse policy alone).
    pub trained_layers: Vec<usize>,
    /// Per layer: the loss of the sparse policy alone (no state), the loss of the initial
    /// maps and the loss after training, on the training rows.
    pub loss: Vec<[f64; 3]>,
    /// Per layer, the same on held-out sequences, when there were any.
    #[serde(default)]
    pub held_out_loss: Vec<[f64; 3]>,
}

fn default_objective() -> String {
    "attention".into()
}

/// A LESS artefact for a whole model: one [`LessMaps`] per layer with the model's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LessArtefact {
    /// Always [`LESS_ARTEFACT_FORMAT`].
    pub format: String,
    /// Always [`LESS_ARTEFACT_VERSION`].
    pub version: u32,
    /// The model the maps were trained for (for messages; shapes are what is checked).
    pub model: String,
    /// Layers of the model.
    pub num_layers: usize,
    /// Query heads per layer.
    pub q_heads: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// How the maps were trained.
    pub training: LessTrainingRecord,
    /// One entry per layer.
    pub layers: Vec<LessMaps>,
}

impl LessArtefact {
    /// Checks the format tag, the version and the model shape.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] (field `artefact`) naming what differs.
    pub fn check(&self, num_layers: usize, shape: &KvShape) -> Result<()> {
        let bad = |reason: String| KvError::InvalidConfig {
            field: "artefact",
            reason,
        };
        if self.format != LESS_ARTEFACT_FORMAT || self.version != LESS_ARTEFACT_VERSION {
            return Err(bad(format!(
                "format `{}` version {} is not `{LESS_ARTEFACT_FORMAT}` version \
                 {LESS_ARTEFACT_VERSION}",
                self.format, self.version
            )));
        }
        let want = (
            num_layers,
            shape.q_heads(),
            shape.kv_heads(),
            shape.head_dim(),
        );
        let got = (self.num_layers, self.q_heads, self.kv_heads, self.head_dim);
        if want != got || self.layers.len() != num_layers {
            return Err(bad(format!(
                "trained for {} ({} layers stored), {} layers x {} query heads x {} KV heads x \
                 head_dim {}; the model has {} layers x {} x {} x {}",
                self.model,
                self.layers.len(),
                got.0,
                got.1,
                got.2,
                got.3,
                want.0,
                want.1,
                want.2,
                want.3
            )));
        }
        Ok(())
    }

    /// The maps of layer `layer`, checked against the model.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a wrong format, version or shape, or maps that do not
    /// fit the layer.
    pub fn layer(&self, layer: usize, num_layers: usize, shape: &KvShape) -> Result<LessMaps> {
        self.check(num_layers, shape)?;
        let m = self
            .layers
            .get(layer)
            .ok_or_else(|| KvError::InvalidConfig {
                field: "artefact",
                reason: format!(
                    "layer {layer} asked of an artefact of {} layers",
                    self.layers.len()
                ),
            })?;
        m.validate(shape)?;
        Ok(m.clone())
    }
}
