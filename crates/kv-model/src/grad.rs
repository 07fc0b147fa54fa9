//! A differentiable forward pass of the decoder, for calibration that needs gradients of the
//! language-model loss.
//!
//! [`GradLlama`] holds the same weights as [`Llama`](crate::Llama) on an autodiff device
//! (Burn's `autodiff` decorator over the chosen backend) and runs the whole causal sequence
//! at once through plain tensor ops: no [`KvCache`](kv_core::KvCache), since caches read
//! their contents on the host and would cut the graph. It is what the papers' calibration
//! steps do with PyTorch's autograd:
//!
//! - Palu's Fisher-information rank search needs `∂L/∂W_k` and `∂L/∂W_v` of every layer
//!   ([`GradLlama::track_kv_weights`], [`GradLlama::kv_weight_grads`]);
//! - KVQuant's sensitivity-weighted codebooks need `∂L/∂k` and `∂L/∂v` for every cached
//!   activation ([`KvProbes`]: zero tensors added to the pre-RoPE keys and the values, whose
//!   gradients are those of the activations);
//! - trained decision sources (DMC) replace the attention of every layer and learn from the
//!   loss through all the layers after it ([`GradLlama::loss`]'s `attention` callback).
//!
//! The loss is the mean next-token negative log-likelihood (nats) over every position of
//! every sequence but the last, as Hugging Face's `labels = input_ids` computes it.
//!
//! It is not a trainer: no optimiser, no mixed precision, no gradient checkpointing. For the
//! 135M-parameter SmolLM2 and 512 tokens, one forward and backward pass takes about 7 s on two
//! shared CPU cores, and `kv-eval fisher` peaks at 2.4 GB of resident memory (host and device
//! weights included); the attention matrices kept for the backward pass grow with the square
//! of the sequence length.

use burn::prelude::*;
use burn::tensor::Gradients;
use burn::tensor::activation::{log_softmax, softmax};
use kv_core::Rope;

use crate::decoder::{mlp_residual, model_rope, rms_norm, upload, upload_head, upload_t};
use crate::weights::HostWeights;
use crate::{HostTensor, LlamaConfig, ModelError, Result};

struct GradBlock {
    attn_norm: Tensor<1>,
    /// `[hidden, q]`, `[hidden, kv]`, `[hidden, kv]`: separate leaves so that the key and
    /// value projections can be tracked on their own.
    q: Tensor<2>,
    k: Tensor<2>,
    v: Tensor<2>,
    /// `[q, hidden]`.
    o: Tensor<2>,
    mlp_norm: Tensor<1>,
    /// `[hidden, 2 ffn]` (gate, up).
    gate_up: Tensor<2>,
    /// `[ffn, hidden]`.
    down: Tensor<2>,
}

/// What one layer's attention sees in [`GradLlama::loss`]: the normed hidden states and the
/// projected, rotated queries and keys.
#[derive(Debug, Clone)]
pub struct AttentionInputs {
    /// The layer index.
    pub layer: usize,
    /// The attention input after the layer's RMSNorm, `[batch, n, hidden]`.
    pub hidden: Tensor<3>,
    /// Queries after RoPE, `[batch, q_heads, n, head_dim]`.
    pub queries: Tensor<4>,
    /// Keys before RoPE, `[batch, kv_heads, n, head_dim]` (with the [`KvProbes`] added).
    pub keys_pre_rope: Tensor<4>,
    /// Keys after RoPE, `[batch, kv_heads, n, head_dim]`.
    pub keys: Tensor<4>,
    /// Values, `[batch, kv_heads, n, head_dim]` (with the [`KvProbes`] added).
    pub values: Tensor<4>,
}

/// Zero tensors added to every layer's pre-RoPE keys and values in [`GradLlama::loss`]: the
/// loss does not change, and their gradients are the gradients of the loss with respect to
/// the activations a cache would store.
#[derive(Debug)]
pub struct KvProbes {
    shape: [usize; 4],
    /// Per layer: (keys, values), each `[batch, kv_heads, n, head_dim]`, tracked.
    probes: Vec<(Tensor<4>, Tensor<4>)>,
}

/// One layer's gradients with respect to its cached activations, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct KvActivationGrads {
    /// `∂L/∂k` for the pre-RoPE keys, `[batch, kv_heads, n, head_dim]`.
    pub keys: HostTensor,
    /// `∂L/∂v`, `[batch, kv_heads, n, head_dim]`.
    pub values: HostTensor,
}

/// One layer's gradients with respect to its key and value projections, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct KvWeightGrads {
    /// `∂L/∂W_k` in the checkpoint's layout, `[kv_heads * head_dim, hidden]` (row `h·d + i`
    /// is output channel `i` of KV head `h`).
    pub keys: HostTensor,
    /// `∂L/∂W_v`, `[kv_heads * head_dim, hidden]`.
    pub values: HostTensor,
}

/// The decoder on an autodiff device; see the [module docs](self).
pub struct GradLlama {
    config: LlamaConfig,
    device: Device,
    embed: Tensor<2>,
    blocks: Vec<GradBlock>,
    norm: Tensor<1>,
    /// `[hidden, vocab]`.
    head: Tensor<2>,
    rope: Rope,
}

impl core::fmt::Debug for GradLlama {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GradLlama")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn host(t: Tensor<2>) -> HostTensor {
    let [r, c] = t.dims();
    let data = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default();
    HostTensor {
        shape: vec![r, c],
        data,
    }
}

fn host4(t: Tensor<4>) -> HostTensor {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default();
    HostTensor { shape, data }
}

/// Causal softmax attention with grouped query heads, as plain (differentiable) tensor ops.
///
/// # Shapes
/// `queries`: `[batch, q_heads, n, d]`; `keys`, `values`: `[batch, kv_heads, n, d]` with
/// `kv_heads` dividing `q_heads` (query head `h` reads KV head `h / (q_heads / kv_heads)`).
/// Output: `[batch, q_heads, n, d]`.
///
/// # Panics
/// If the shapes disagree.
pub fn causal_attention(queries: Tensor<4>, keys: Tensor<4>, values: Tensor<4>) -> Tensor<4> {
    let [b, hq, n, d] = queries.dims();
    let [bk, hkv, nk, dk] = keys.dims();
    assert!(
        bk == b && nk == n && dk == d && hkv > 0 && hq.is_multiple_of(hkv),
        "causal_attention: queries {:?} and keys {:?} disagree",
        [b, hq, n, d],
        [bk, hkv, nk, dk]
    );
    let g = hq / hkv;
    let expand = |t: Tensor<4>| -> Tensor<4> {
        t.unsqueeze_dim::<5>(2)
            .expand([b, hkv, g, n, d])
            .reshape([b, hq, n, d])
    };
    let (k, v) = (expand(keys), expand(values));
    let scores = queries.matmul(k.swap_dims(2, 3)) * (1.0 / (d as f64).sqrt());
    let mask = causal_mask(n, &scores.device()).reshape([1, 1, n, n]);
    softmax(scores + mask, 3).matmul(v)
}

/// `[n, n]`: 0 on and below the diagonal, a large negative number above it.
pub fn causal_mask(n: usize, device: &Device) -> Tensor<2> {
    let mut m = vec![0f32; n * n];
    for i in 0..n {
        for j in i + 1..n {
            m[i * n + j] = -1e30;
        }
    }
    Tensor::from_data(TensorData::new(m, [n, n]), device)
}

impl GradLlama {
    /// Uploads host weights to `device` wrapped in Burn's autodiff decorator. No weight is
    /// tracked until [`GradLlama::track_kv_weights`].
    ///
    /// # Errors
    /// [`ModelError::InvalidConfig`] if the weights or the RoPE configuration are invalid.
    pub fn new(weights: &HostWeights, device: &Device) -> Result<Self> {
        weights.validate()?;
        let device = device.clone().autodiff();
        let c = weights.config.clone();
        let (h, v) = (c.hidden_size, c.vocab_size);
        let blocks = weights
            .blocks
            .iter()
            .map(|b| GradBlock {
                attn_norm: upload(&b.attn_norm, [h], &device),
                q: upload_t(&[&b.q], &device),
                k: upload_t(&[&b.k], &device),
                v: upload_t(&[&b.v], &device),
                o: upload_t(&[&b.o], &device),
                mlp_norm: upload(&b.mlp_norm, [h], &device),
                gate_up: upload_t(&[&b.gate, &b.up], &device),
                down: upload_t(&[&b.down], &device),
            })
            .collect();
        let head = upload_head(weights, &device);
        let rope = model_rope(&c)?;
        Ok(GradLlama {
            embed: upload(&weights.embed, [v, h], &device),
            norm: upload(&weights.norm, [h], &device),
            head,
            blocks,
            rope,
            device,
            config: c,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The autodiff device holding the weights (tensors built for the `attention` callback
    /// of [`GradLlama::loss`] must live here).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The RoPE the model applies.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Marks every layer's key and value projection as tracked, so that
    /// [`GradLlama::kv_weight_grads`] can read their gradients after a backward pass.
    pub fn track_kv_weights(&mut self) {
        for b in &mut self.blocks {
            b.k = b.k.clone().require_grad();
            b.v = b.v.clone().require_grad();
        }
    }

    /// The gradients of the key and value projections of every layer, in the checkpoint's
    /// `[out, in]` layout.
    ///
    /// # Errors
    /// [`ModelError::InvalidConfig`] if the weights are not tracked
    /// ([`GradLlama::track_kv_weights`]) or `grads` holds none for them.
    pub fn kv_weight_grads(&self, grads: &Gradients) -> Result<Vec<KvWeightGrads>> {
        self.blocks
            .iter()
            .map(|b| {
                let g = |w: &Tensor<2>| {
                    w.grad(grads).map(|t| host(t.transpose())).ok_or_else(|| {
                        ModelError::InvalidConfig {
                            field: "kv weights",
                            reason: "no gradient: call track_kv_weights before the forward pass"
                                .into(),
                        }
                    })
                };
                Ok(KvWeightGrads {
                    keys: g(&b.k)?,
                    values: g(&b.v)?,
                })
            })
            .collect()
    }

    /// Tracked zero probes for a forward pass over `batch` sequences of `n` tokens.
    pub fn kv_probes(&self, batch: usize, n: usize) -> KvProbes {
        let c = &self.config;
        let shape = [batch, c.num_key_value_heads, n, c.effective_head_dim()];
        let probes = (0..c.num_hidden_layers)
            .map(|_| {
                (
                    Tensor::zeros(shape, &self.device).require_grad(),
                    Tensor::zeros(shape, &self.device).require_grad(),
                )
            })
            .collect();
        KvProbes { shape, probes }
    }

    /// Runs `tokens` (`batch` sequences of equal length, row-major, positions from 0) through
    /// the model and returns the mean next-token NLL as a one-element tensor on the autodiff
    /// device (call `backward` on it).
    ///
    /// `attention` computes each layer's attention output `[batch, q_heads, n, head_dim]`
    /// from its [`AttentionInputs`]; pass [`causal_attention`] of the queries, keys and
    /// values for the unmodified model. `probes`, when given, are added to the pre-RoPE keys
    /// and the values of every layer.
    ///
    /// # Errors
    /// [`ModelError::ShapeMismatch`] for fewer than two tokens per sequence, a length that
    /// `batch` does not divide, probes of another shape, or an attention output of the wrong
    /// shape; [`ModelError::UnknownTokenId`] for ids outside the vocabulary.
    pub fn loss(
        &self,
        tokens: &[u32],
        batch: usize,
        probes: Option<&KvProbes>,
        attention: &mut dyn FnMut(AttentionInputs) -> Tensor<4>,
    ) -> Result<Tensor<1>> {
        let c = &self.config;
        if batch == 0 || !tokens.len().is_multiple_of(batch) || tokens.len() / batch < 2 {
            return Err(ModelError::ShapeMismatch {
                what: "tokens (batch sequences of at least 2 tokens)".into(),
                expected: vec![batch, 2],
                found: vec![tokens.len()],
            });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::UnknownTokenId {
                id,
                vocab_size: c.vocab_size,
            });
        }
        let n = tokens.len() / batch;
        let (h, d) = (c.hidden_size, c.effective_head_dim());
        let (qh, kvh) = (c.num_attention_heads, c.num_key_value_heads);
        if let Some(p) = probes
            && (p.shape != [batch, kvh, n, d] || p.probes.len() != self.blocks.len())
        {
            return Err(ModelError::ShapeMismatch {
                what: "kv probes".into(),
                expected: vec![batch, kvh, n, d],
                found: p.shape.to_vec(),
            });
        }
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [tokens.len()]), &self.device);
        let mut x = self.embed.clone().select(0, ids).reshape([batch, n, h]);
        let pos: Vec<u32> = (0..batch).flat_map(|_| 0..n as u32).collect::<Vec<u32>>();

        for (layer, blk) in self.blocks.iter().enumerate() {
            let hn = rms_norm(x.clone(), &blk.attn_norm, c.rms_norm_eps);
            let heads = |w: &Tensor<2>, heads: usize| {
                hn.clone()
                    .matmul(w.clone().unsqueeze::<3>())
                    .reshape([batch, n, heads, d])
                    .swap_dims(1, 2)
            };
            let q = self.rope.apply(heads(&blk.q, qh), &pos);
            let mut k = heads(&blk.k, kvh);
            let mut v = heads(&blk.v, kvh);
            if let Some(p) = probes {
                let (pk, pv) = &p.probes[layer];
                k = k + pk.clone();
                v = v + pv.clone();
            }
            let keys = self.rope.apply(k.clone(), &pos);
            let att = attention(AttentionInputs {
                layer,
                hidden: hn,
                queries: q,
                keys_pre_rope: k,
                keys,
                values: v,
            });
            if att.dims() != [batch, qh, n, d] {
                return Err(ModelError::ShapeMismatch {
                    what: "attention output".into(),
                    expected: vec![batch, qh, n, d],
                    found: att.dims().to_vec(),
                });
            }
            let att = att.swap_dims(1, 2).reshape([batch, n, qh * d]);
            x = x + att.matmul(blk.o.clone().unsqueeze::<3>());

            x = mlp_residual(x, &blk.mlp_norm, &blk.gate_up, &blk.down, c);
        }
        let x = rms_norm(x, &self.norm, c.rms_norm_eps);
        let rows = batch * (n - 1);
        let hidden = x.slice([0..batch, 0..n - 1, 0..h]).reshape([rows, h]);
        let lp = log_softmax(hidden.matmul(self.head.clone()), 1);
        let targets: Vec<i32> = tokens
            .chunks(n)
            .flat_map(|s| s[1..].iter().map(|&t| t as i32))
            .collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [rows]), &self.device)
            .reshape([rows, 1]);
        Ok(lp.gather(1, targets).mean().neg())
    }
}

impl KvProbes {
    /// The probes' shape, `[batch, kv_heads, n, head_dim]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// The gradients of the loss with respect to every layer's pre-RoPE keys and values.
    ///
    /// # Errors
    /// [`ModelError::InvalidConfig`] if `grads` holds none for the probes (they were not
    /// passed to the forward pass that was differentiated).
    pub fn grads(&self, grads: &Gradients) -> Result<Vec<KvActivationGrads>> {
        self.probes
            .iter()
            .map(|(k, v)| {
                let g = |t: &Tensor<4>| {
                    t.grad(grads)
                        .map(host4)
                        .ok_or_else(|| ModelError::InvalidConfig {
                            field: "kv probes",
                            reason: "no gradient: pass the probes to the forward pass".into(),
                        })
                };
                Ok(KvActivationGrads {
                    keys: g(k)?,
                    values: g(v)?,
                })
            })
            .collect()
    }
}

/// Palu's Fisher information of one layer's key and value projections, per KV head.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionFisher {
    /// Per KV head: the mean over the head's rows of `W_k` (all input columns) of
    /// `sqrt(mean over sequences of (∂L/∂w)²)`.
    pub keys: Vec<f64>,
    /// The same for `W_v`.
    pub values: Vec<f64>,
}

impl GradLlama {
    /// The Fisher information of every layer's key and value projections as Palu's rank
    /// search computes it (`calib_fisher_info` in shadowpa0327/Palu `palu/rank_search.py`):
    /// one forward and backward pass of the mean next-token loss per sequence, the squared
    /// gradients of `W_k` and `W_v` summed over sequences, then per weight
    /// `sqrt(sum / sequences)`, averaged over the rows of each KV head.
    ///
    /// `progress` is called after every sequence with its index and loss.
    ///
    /// # Errors
    /// No sequences, and as [`GradLlama::loss`].
    pub fn kv_projection_fisher(
        &mut self,
        sequences: &[&[u32]],
        progress: &mut dyn FnMut(usize, f32),
    ) -> Result<Vec<ProjectionFisher>> {
        if sequences.is_empty() {
            return Err(ModelError::ShapeMismatch {
                what: "Fisher calibration sequences".into(),
                expected: vec![1],
                found: vec![0],
            });
        }
        self.track_kv_weights();
        let mut sums: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
        for (i, seq) in sequences.iter().enumerate() {
            let loss = self.loss(seq, 1, None, &mut |a| {
                causal_attention(a.queries, a.keys, a.values)
            })?;
            let value = loss
                .clone()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap_or_default()
                .first()
                .copied()
                .unwrap_or(f32::NAN);
            let grads = loss.backward();
            let g = self.kv_weight_grads(&grads)?;
            if sums.is_empty() {
                sums = g
                    .iter()
                    .map(|l| (vec![0.0; l.keys.numel()], vec![0.0; l.values.numel()]))
                    .collect();
            }
            for ((sk, sv), l) in sums.iter_mut().zip(&g) {
                for (s, &x) in sk.iter_mut().zip(&l.keys.data) {
                    *s += f64::from(x) * f64::from(x);
                }
                for (s, &x) in sv.iter_mut().zip(&l.values.data) {
                    *s += f64::from(x) * f64::from(x);
                }
            }
            progress(i, value);
        }
        let n = sequences.len() as f64;
        let heads = self.config.num_key_value_heads;
        let per_head = |s: &[f64]| -> Vec<f64> {
            let rows = s.len() / heads;
            s.chunks(rows)
                .map(|h| h.iter().map(|&x| (x / n).sqrt()).sum::<f64>() / rows as f64)
                .collect()
        };
        Ok(sums
            .iter()
            .map(|(k, v)| ProjectionFisher {
                keys: per_head(k),
                values: per_head(v),
            })
            .collect())
    }
}
