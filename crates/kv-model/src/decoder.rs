//! The Llama-family decoder: embedding, RMSNorm, RoPE, GQA attention through a per-layer
//! [`KvCache`](kv_core::KvCache), SwiGLU MLP, tied or separate LM head.

use burn::prelude::*;
use burn::tensor::activation::{log_softmax, silu};
use kv_core::{
    KeyRope, KvBlock, LayerCaches, PAD, Query, Rope, RopeConfig, RopeConvention, StatsRequest,
};

use crate::weights::HostWeights;
use crate::{HostTensor, LlamaConfig, ModelError, Result};

/// Rows of hidden states sent through the LM head at once (bounds the logits buffer).
const HEAD_CHUNK: usize = 256;

struct Block {
    attn_norm: Tensor<1>,
    /// Fused `[hidden, q + 2 kv]` projection (Q, K, V side by side).
    qkv: Tensor<2>,
    /// `[q, hidden]`.
    o: Tensor<2>,
    mlp_norm: Tensor<1>,
    /// Fused `[hidden, 2 ffn]` projection (gate, up).
    gate_up: Tensor<2>,
    /// `[ffn, hidden]`.
    down: Tensor<2>,
}

/// A Llama-family decoder on one device, with weights in f32.
///
/// The model owns no cache: every forward pass goes through a [`LayerCaches`] the caller
/// builds (one [`KvCache`](kv_core::KvCache) per layer), so any compression method plugs in without touching
/// the model. Queries and keys are rotated with HF's rotate-half RoPE (GGUF checkpoints are
/// un-permuted on load); caches that store keys pre-RoPE get them unrotated.
pub struct Llama {
    config: LlamaConfig,
    device: Device,
    embed: Tensor<2>,
    blocks: Vec<Block>,
    norm: Tensor<1>,
    /// `[hidden, vocab]`.
    head: Tensor<2>,
    rope: Rope,
}

impl core::fmt::Debug for Llama {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

pub(crate) fn upload<const D: usize>(
    t: &HostTensor,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D> {
    Tensor::from_data(TensorData::new(t.data.clone(), shape), device)
}

/// `[out, in]` host matrices side by side, transposed to one `[in, Σ out]` device matrix.
pub(crate) fn upload_t(parts: &[&HostTensor], device: &Device) -> Tensor<2> {
    let cols = parts[0].shape[1];
    let rows: usize = parts.iter().map(|p| p.shape[0]).sum();
    let mut data = vec![0f32; rows * cols];
    let mut r0 = 0;
    for p in parts {
        let n = p.shape[0];
        for r in 0..n {
            for c in 0..cols {
                data[c * rows + r0 + r] = p.data[r * cols + c];
            }
        }
        r0 += n;
    }
    Tensor::from_data(TensorData::new(data, [cols, rows]), device)
}

pub(crate) fn rms_norm<const D: usize>(x: Tensor<D>, w: &Tensor<1>, eps: f64) -> Tensor<D> {
    let d = x.dims()[D - 1];
    let var = x.clone().powi_scalar(2).mean_dim(D - 1);
    let x = x * (var + eps).sqrt().recip();
    let mut shape = [1usize; D];
    shape[D - 1] = d;
    x * w.clone().reshape(shape)
}

/// The LM head `[hidden, vocab]` (the tied embedding when the checkpoint has no head).
pub(crate) fn upload_head(weights: &HostWeights, device: &Device) -> Tensor<2> {
    upload_t(
        &[weights.lm_head.as_ref().unwrap_or(&weights.embed)],
        device,
    )
}

/// The model's RoPE (HF rotate-half; GGUF checkpoints are un-permuted on load).
pub(crate) fn model_rope(c: &LlamaConfig) -> Result<Rope> {
    RopeConfig::new(
        c.effective_head_dim(),
        c.rope_theta as f32,
        RopeConvention::RotateHalf,
    )
    .init()
    .map_err(ModelError::Cache)
}

/// `x + down(silu(gate(h)) * up(h))` with `h = RMSNorm(x)`: the MLP half of a block.
pub(crate) fn mlp_residual(
    x: Tensor<3>,
    norm: &Tensor<1>,
    gate_up: &Tensor<2>,
    down: &Tensor<2>,
    c: &LlamaConfig,
) -> Tensor<3> {
    let [batch, n, _] = x.dims();
    let hn = rms_norm(x.clone(), norm, c.rms_norm_eps);
    let gu = hn.matmul(gate_up.clone().unsqueeze::<3>());
    let f = c.intermediate_size;
    let gate = gu.clone().slice([0..batch, 0..n, 0..f]);
    let up = gu.slice([0..batch, 0..n, f..2 * f]);
    x + (silu(gate) * up).matmul(down.clone().unsqueeze::<3>())
}

impl Llama {
    /// Uploads host weights to `device`.
    ///
    /// # Errors
    /// [`ModelError::InvalidConfig`] if the RoPE configuration is invalid.
    pub fn new(weights: &HostWeights, device: &Device) -> Result<Self> {
        weights.validate()?;
        let c = weights.config.clone();
        let (h, v) = (c.hidden_size, c.vocab_size);
        let blocks = weights
            .blocks
            .iter()
            .map(|b| Block {
                attn_norm: upload(&b.attn_norm, [h], device),
                qkv: upload_t(&[&b.q, &b.k, &b.v], device),
                o: upload_t(&[&b.o], device),
                mlp_norm: upload(&b.mlp_norm, [h], device),
                gate_up: upload_t(&[&b.gate, &b.up], device),
                down: upload_t(&[&b.down], device),
            })
            .collect();
        let head = upload_head(weights, device);
        let rope = model_rope(&c)?;
        Ok(Llama {
            embed: upload(&weights.embed, [v, h], device),
            norm: upload(&weights.norm, [h], device),
            head,
            blocks,
            rope,
            device: device.clone(),
            config: c,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The RoPE the model applies (for caches that store pre-RoPE keys).
    pub fn rope(&self) -> &Rope {
        &self.rope
    }
    /// The cache shape of every layer for a batch of `batch` sequences.
    ///
    /// # Errors
    /// [`ModelError::Cache`] if the config's heads are inconsistent.
    pub fn kv_shape(&self, batch: usize) -> Result<kv_core::KvShape> {
        let c = &self.config;
        kv_core::KvShape::new(
            batch,
            c.num_key_value_heads,
            c.num_attention_heads,
            c.effective_head_dim(),
        )
        .map_err(ModelError::Cache)
    }

    /// Runs `tokens` through the model, appending their keys and values to `caches` and
    /// attending through them, and returns the final hidden states (after the last norm).
    ///
    /// Layers that read another layer's storage ([`LayerCaches::shared`], cross-layer KV
    /// sharing) compute only their queries and attend over the owner's cache without
    /// appending; their own K/V projections are not used.
    ///
    /// # Shapes
    /// `tokens` and `positions`: `batch * n` entries, row-major. A [`PAD`] position marks a
    /// padding token: ragged caches do not store it, no query attends to it, and its hidden
    /// state is meaningless. Output: `[batch, n, hidden]`.
    ///
    /// # Errors
    /// Cache errors (shape, capacity, positions) and token ids outside the vocabulary.
    pub fn forward_hidden(
        &self,
        tokens: &[u32],
        positions: &[u32],
        batch: usize,
        caches: &mut LayerCaches,
    ) -> Result<Tensor<3>> {
        let c = &self.config;
        if batch == 0
            || tokens.is_empty()
            || !tokens.len().is_multiple_of(batch)
            || positions.len() != tokens.len()
        {
            return Err(ModelError::ShapeMismatch {
                what: "tokens / positions (batch * n)".into(),
                expected: vec![batch, tokens.len() / batch.max(1)],
                found: vec![tokens.len(), positions.len()],
            });
        }
        if caches.len() != c.num_hidden_layers {
            return Err(ModelError::ShapeMismatch {
                what: "number of layer caches".into(),
                expected: vec![c.num_hidden_layers],
                found: vec![caches.len()],
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::InvalidConfig {
                field: "tokens",
                reason: format!(
                    "token id {bad} is outside the vocabulary of {}",
                    c.vocab_size
                ),
            });
        }
        let n = tokens.len() / batch;
        let (h, d) = (c.hidden_size, c.effective_head_dim());
        let (qh, kvh) = (c.num_attention_heads, c.num_key_value_heads);
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [tokens.len()]), &self.device);
        let mut x = self.embed.clone().select(0, ids).reshape([batch, n, h]);
        // RoPE positions: padding slots rotate at 0 (their outputs are never used).
        let rope_pos: Vec<u32> = positions
            .iter()
            .map(|&p| if p == PAD { 0 } else { p })
            .collect();

        for (layer, blk) in self.blocks.iter().enumerate() {
            // A layer that reads another layer's KV (cross-layer sharing) computes only its
            // queries and attends over the owner's cache, which already holds these tokens.
            let appends = caches.appends(layer);
            let cache = caches.layer_mut(layer).map_err(ModelError::Cache)?;
            let hn = rms_norm(x.clone(), &blk.attn_norm, c.rms_norm_eps);
            let q = if appends {
                let qkv = hn.matmul(blk.qkv.clone().unsqueeze::<3>());
                let q = qkv.clone().slice([0..batch, 0..n, 0..qh * d]);
                let k = qkv.clone().slice([0..batch, 0..n, qh * d..(qh + kvh) * d]);
                let v = qkv.slice([0..batch, 0..n, (qh + kvh) * d..(qh + 2 * kvh) * d]);
                let k = k.reshape([batch, n, kvh, d]).swap_dims(1, 2);
                let v = v.reshape([batch, n, kvh, d]).swap_dims(1, 2);
                let k = match cache.key_rope() {
                    KeyRope::PostRope => self.rope.apply(k, &rope_pos),
                    KeyRope::PreRope => k,
                };
                cache
                    .append(KvBlock::new(k, v, positions.to_vec()).map_err(ModelError::Cache)?)
                    .map_err(ModelError::Cache)?;
                q
            } else {
                let wq = blk.qkv.clone().slice([0..h, 0..qh * d]);
                hn.matmul(wq.unsqueeze::<3>())
            };
            let q = q.reshape([batch, n, qh, d]).swap_dims(1, 2);
            let q = self.rope.apply(q, &rope_pos);
            let query = Query::new(q, positions.to_vec()).map_err(ModelError::Cache)?;
            let att = cache
                .attend(&query, StatsRequest::NONE)
                .map_err(ModelError::Cache)?
                .output;
            let att = att.swap_dims(1, 2).reshape([batch, n, qh * d]);
            x = x + att.matmul(blk.o.clone().unsqueeze::<3>());

            x = mlp_residual(x, &blk.mlp_norm, &blk.gate_up, &blk.down, c);
        }
        Ok(rms_norm(x, &self.norm, c.rms_norm_eps))
    }

    /// Logits of hidden states, `[rows, hidden] -> [rows, vocab]`.
    pub fn logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        hidden.matmul(self.head.clone())
    }

    /// Negative log-likelihood of `targets[i]` under the logits of `hidden[i]`, per row,
    /// computed in chunks so the full logits matrix is never held.
    ///
    /// # Shapes
    /// `hidden`: `[rows, hidden]`; `targets`: `rows` ids. Output: `rows` NLLs (nats).
    ///
    /// # Panics
    /// If `targets.len()` differs from the number of rows.
    pub fn nll(&self, hidden: Tensor<2>, targets: &[u32]) -> Vec<f32> {
        let [rows, hd] = hidden.dims();
        assert_eq!(
            rows,
            targets.len(),
            "Llama::nll: {rows} rows, {} targets",
            targets.len()
        );
        let mut out = Vec::with_capacity(rows);
        let mut start = 0;
        while start < rows {
            let m = HEAD_CHUNK.min(rows - start);
            let h = hidden.clone().slice([start..start + m, 0..hd]);
            let lp = log_softmax(self.logits(h), 1);
            let ids: Vec<i32> = targets[start..start + m]
                .iter()
                .map(|&t| t as i32)
                .collect();
            let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [m]), &self.device)
                .reshape([m, 1]);
            let picked = lp.gather(1, ids).reshape([m]);
            let v = picked
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap_or_default();
            out.extend(v.into_iter().map(|x| -x));
            start += m;
        }
        out
    }

    /// Greedy generation for one sequence: prefills `prompt` (positions from 0) and decodes
    /// `max_new` tokens one at a time, stopping early at `eos`.
    ///
    /// # Errors
    /// As [`Llama::forward_hidden`].
    pub fn generate_greedy(
        &self,
        prompt: &[u32],
        max_new: usize,
        eos: Option<u32>,
        caches: &mut LayerCaches,
    ) -> Result<Vec<u32>> {
        let h = self.config.hidden_size;
        let positions: Vec<u32> = (0..prompt.len() as u32).collect();
        let hidden = self.forward_hidden(prompt, &positions, 1, caches)?;
        caches.end_prefill().map_err(ModelError::Cache)?;
        let n = prompt.len();
        let mut last = hidden.slice([0..1, n - 1..n, 0..h]).reshape([1, h]);
        let mut out = Vec::with_capacity(max_new);
        for step in 0..max_new {
            let next = self.logits(last).argmax(1).into_scalar::<i32>() as u32;
            out.push(next);
            if Some(next) == eos || step + 1 == max_new {
                break;
            }
            let pos = (n + step) as u32;
            last = self
                .forward_hidden(&[next], &[pos], 1, caches)?
                .reshape([1, h]);
        }
        Ok(out)
    }
}
