//! Dynamic Memory Compression (Nawrot et al. 2024, arXiv 2403.09636): every new token either
//! appends a slot or is folded into the last slot of its (sequence, KV head) stream as a
//! weighted running average.

use burn::prelude::*;
use kv_core::{
    Attended, HeldBuffer, KvBlock, KvCache, KvError, KvShape, KvView, Lengths, MemoryReport, PAD,
    Query, Result, StatsRequest, StorageDtype, check_block, check_positions, check_query,
};
use serde::{Deserialize, Serialize};

use crate::decision::{DecisionConfig, DecisionInput, LayerDecision, MergeDecision};
use crate::storage::{Slots, matrix, to_host};

/// Configuration of a [`DmcCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmcConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// Where the append-or-merge decisions come from.
    pub decision: DecisionConfig,
    /// Element type of the stored slots (default fp32; merges are computed in fp32).
    #[serde(default)]
    pub dtype: StorageDtype,
    /// Proportional attention (ToMe, Bolya et al. 2023): each slot's score gets `+ ln z`, so
    /// a slot of `z` merged tokens weighs like `z` tokens (merging identical tokens is then
    /// lossless). Not part of DMC, whose retrofitted model learns to attend to plain slots;
    /// meant for the training-free proxy. Default off.
    #[serde(default)]
    pub proportional: bool,
}

/// The threshold of the similarity proxy when `from_params` is given none.
pub const DEFAULT_THRESHOLD: f32 = 0.9;

impl DmcConfig {
    /// DMC with the given decision source and fp32 storage.
    pub fn new(shape: KvShape, decision: DecisionConfig) -> Self {
        DmcConfig {
            shape,
            decision,
            dtype: StorageDtype::F32,
            proportional: false,
        }
    }

    /// Sets the storage dtype.
    pub fn with_dtype(mut self, dtype: StorageDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// Turns proportional attention (`+ ln z` per slot) on or off.
    pub fn with_proportional(mut self, on: bool) -> Self {
        self.proportional = on;
        self
    }

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &[
        "decision",
        "threshold",
        "value_threshold",
        "artefact",
        "proportional",
        "dtype",
    ];

    /// A config from `key=value` parameters: `decision` (`similarity`, `learned`, `never`,
    /// `always`; default `learned` when `artefact` is given, else `similarity`), `threshold`
    /// (the proxy's key cosine threshold, default [`DEFAULT_THRESHOLD`]), `value_threshold`
    /// (the proxy's value cosine threshold, default none), `artefact` (a path handed to
    /// `load`, which returns this layer's learned heads; required by `learned`),
    /// `proportional` (`true` or `false`, default `false`: see
    /// [`proportional`](Self::proportional)) and `dtype` (`f32` or `f16`). The result is
    /// validated by [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the parameter for an unknown name, a value that does
    /// not parse, a parameter that does not fit the decision, or what `load` returns.
    pub fn from_params<'a>(
        shape: KvShape,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
        load: impl FnOnce(&str) -> Result<LayerDecision>,
    ) -> Result<Self> {
        let bad = |field: &'static str, reason: String| KvError::InvalidConfig { field, reason };
        let (mut decision, mut threshold, mut artefact, mut dtype) = (None, None, None, None);
        let (mut proportional, mut value_threshold) = (false, None);
        for (k, v) in params {
            match k {
                "decision" => decision = Some(v),
                "threshold" => {
                    threshold = Some(
                        v.parse::<f32>()
                            .map_err(|_| bad("threshold", format!("`{v}` is not a number")))?,
                    );
                }
                "value_threshold" => {
                    value_threshold =
                        Some(v.parse::<f32>().map_err(|_| {
                            bad("value_threshold", format!("`{v}` is not a number"))
                        })?);
                }
                "artefact" => artefact = Some(v),
                "proportional" => {
                    proportional = v
                        .parse()
                        .map_err(|_| bad("proportional", format!("`{v}` is not true or false")))?;
                }
                "dtype" => {
                    dtype = Some(match v {
                        "f32" | "fp32" => StorageDtype::F32,
                        "f16" | "fp16" => StorageDtype::F16,
                        _ => return Err(bad("dtype", format!("`{v}` is not f16 or f32"))),
                    });
                }
                _ => {
                    return Err(bad(
                        "params",
                        format!(
                            "unknown DMC parameter `{k}`; accepted: {}",
                            Self::PARAMS.join(", ")
                        ),
                    ));
                }
            }
        }
        let kind = decision.unwrap_or(if artefact.is_some() {
            "learned"
        } else {
            "similarity"
        });
        if value_threshold.is_some() && kind != "similarity" {
            return Err(bad(
                "value_threshold",
                format!("only the similarity proxy takes a value threshold, not `{kind}`"),
            ));
        }
        if threshold.is_some() && kind != "similarity" {
            return Err(bad(
                "threshold",
                format!("only the similarity proxy takes a threshold, not `{kind}`"),
            ));
        }
        if artefact.is_some() && kind != "learned" {
            return Err(bad(
                "artefact",
                format!("only the learned decision reads an artefact, not `{kind}`"),
            ));
        }
        let decision = match kind {
            "never" => DecisionConfig::Never,
            "always" => DecisionConfig::Always,
            "similarity" => DecisionConfig::Similarity {
                threshold: threshold.unwrap_or(DEFAULT_THRESHOLD),
                value_threshold,
            },
            "learned" => {
                let path = artefact.ok_or_else(|| {
                    bad(
                        "artefact",
                        "the learned decision needs artefact=PATH (heads exported from a \
                         DMC-retrofitted checkpoint)"
                            .into(),
                    )
                })?;
                DecisionConfig::Learned { layer: load(path)? }
            }
            other => {
                return Err(bad(
                    "decision",
                    format!("`{other}` is not one of similarity, learned, never, always"),
                ));
            }
        };
        Ok(DmcConfig {
            shape,
            decision,
            dtype: dtype.unwrap_or_default(),
            proportional,
        })
    }

    /// Validates and builds the cache with the configured decision source.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a threshold outside `[-1, 1]` or an artefact that does
    /// not fit the layer.
    pub fn init(&self, device: &Device) -> Result<DmcCache> {
        self.decision
            .validate(self.shape.kv_heads(), self.shape.head_dim())?;
        Ok(self.init_with(device, self.decision.build()))
    }

    /// Builds the cache with another decision source (for example decisions the model
    /// computes itself); [`decision`](Self::decision) is then only descriptive.
    pub fn init_with(&self, device: &Device, decision: Box<dyn MergeDecision>) -> DmcCache {
        DmcCache {
            config: self.clone(),
            decision,
            slots: Slots::new(self.shape, self.dtype, device),
        }
    }
}

/// DMC's variable-length cache: per (sequence, KV head) stream, each new token either appends
/// a slot (`α_t = 0`, mass `z = ω_t`) or is merged into the last slot (`α_t = 1`):
///
/// ```text
/// k_last ← (z·k_last + ω_t·k_t) / (z + ω_t),   v_last likewise,   z ← z + ω_t
/// ```
///
/// so that a slot holds the ω-weighted mean of a run of consecutive tokens and the stream
/// physically shrinks by one slot per merge.
///
/// # Positions and causality
/// Keys are merged post-RoPE (DMC accumulates rotated keys). A slot carries the position of
/// its most recent token: in DMC's inference the query of step `t` attends to the slot that
/// `t` was just merged into, and a slot only ever holds tokens up to that position, so no
/// query sees a token after its own. Within a multi-token (prefill) block, a query inside a
/// run does not see the run's slot until its last token (DMC runs prefill token by token;
/// append one token at a time for DMC's exact prefill).
///
/// # Attention
/// Plain softmax attention over the slots, as DMC; with
/// [`proportional`](DmcConfig::proportional) each slot's score gets `+ ln z` (ToMe's
/// proportional attention), and `attend` is then no longer plain attention over
/// [`view`](KvCache::view).
///
/// # Memory
/// Per held slot: keys and values (`2 · head_dim · bytes(dtype)`, buffers grown in steps of
/// 64 slots), a `u32` position and an `f32` mass.
#[derive(Debug)]
pub struct DmcCache {
    config: DmcConfig,
    decision: Box<dyn MergeDecision>,
    slots: Slots,
}

/// One output slot of an append: the tokens (indices into the block) merged into it with
/// their weights, and whether it continues the stream's existing last slot.
#[derive(Debug, Default)]
struct Group {
    extends_last: bool,
    /// Mass of the existing last slot when `extends_last`.
    base: f32,
    members: Vec<(usize, f32)>,
    position: u32,
}

impl Group {
    fn mass(&self) -> f32 {
        self.base + self.members.iter().map(|m| m.1).sum::<f32>()
    }
}

impl DmcCache {
    /// The configuration.
    pub fn config(&self) -> &DmcConfig {
        &self.config
    }

    /// The merge mass `z` of every held slot, one list per (sequence, KV head), row-major.
    pub fn masses(&self) -> Vec<Vec<f32>> {
        self.slots.streams.iter().map(|s| s.mass.clone()).collect()
    }

    /// The position of every held slot (its most recent token), one list per stream.
    pub fn positions(&self) -> Vec<Vec<u32>> {
        self.slots
            .streams
            .iter()
            .map(|s| s.positions.clone())
            .collect()
    }

    /// Takes every decision of stream `s` for the block's tokens (`keys`, `values`:
    /// `n * head_dim` host values, `row`: the block's positions of this sequence).
    fn plan_stream(
        &self,
        s: usize,
        keys: &[f32],
        values: &[f32],
        row: &[u32],
        op: &'static str,
    ) -> Result<Vec<Group>> {
        let kvh = self.slots.shape.kv_heads();
        let d = self.slots.shape.head_dim();
        let (mut last, mut last_v) = match self.slots.last_row(s)? {
            Some((k, v)) => (Some(k), Some(v)),
            None => (None, None),
        };
        let mut z = self.slots.streams[s].mass.last().copied().unwrap_or(0.0);
        let mut groups: Vec<Group> = Vec::new();
        for (i, &p) in row.iter().enumerate() {
            if p == PAD {
                continue;
            }
            let key = &keys[i * d..(i + 1) * d];
            let value = &values[i * d..(i + 1) * d];
            let dec = self.decision.decide(&DecisionInput {
                batch: s / kvh,
                head: s % kvh,
                position: p,
                key,
                value,
                last_key: last.as_deref(),
                last_value: last_v.as_deref(),
                last_mass: z,
            });
            let w = dec.weight;
            if !(w.is_finite() && w > 0.0) {
                return Err(KvError::InvalidConfig {
                    field: "decision",
                    reason: format!(
                        "{op}: importance weight {w} for position {p} is not finite and positive"
                    ),
                });
            }
            match (last.as_mut(), last_v.as_mut()) {
                (Some(lk), Some(lv)) if dec.merge => {
                    for (a, b) in lk.iter_mut().zip(key) {
                        *a = (z * *a + w * b) / (z + w);
                    }
                    for (a, b) in lv.iter_mut().zip(value) {
                        *a = (z * *a + w * b) / (z + w);
                    }
                    match groups.last_mut() {
                        Some(g) => g.members.push((i, w)),
                        None => groups.push(Group {
                            extends_last: true,
                            base: z,
                            members: vec![(i, w)],
                            position: p,
                        }),
                    }
                    if let Some(g) = groups.last_mut() {
                        g.position = p;
                    }
                    z += w;
                }
                _ => {
                    last = Some(key.to_vec());
                    last_v = Some(value.to_vec());
                    z = w;
                    groups.push(Group {
                        members: vec![(i, w)],
                        position: p,
                        ..Group::default()
                    });
                }
            }
        }
        Ok(groups)
    }
}

impl KvCache for DmcCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.slots.device
    }

    fn append(&mut self, block: KvBlock) -> Result<()> {
        const OP: &str = "DmcCache::append";
        let s = self.config.shape;
        check_block(&s, &block, OP)?;
        let counts = check_positions(block.positions(), s.batch(), &self.slots.last_seen, OP)?;
        let n = block.seq_len();
        let (kvh, d) = (s.kv_heads(), s.head_dim());
        let keys_host = to_host(block.keys().clone())?;
        let values_host = to_host(block.values().clone())?;
        // Every decision first, so that a bad weight leaves the cache unchanged.
        let mut plans = Vec::with_capacity(s.streams());
        for b in 0..s.batch() {
            let row = &block.positions()[b * n..(b + 1) * n];
            for h in 0..kvh {
                let st = (b * kvh + h) * n * d;
                plans.push(self.plan_stream(
                    b * kvh + h,
                    &keys_host[st..st + n * d],
                    &values_host[st..st + n * d],
                    row,
                    OP,
                )?);
            }
        }
        let (keys, values, positions) = block.into_parts();
        let device = self.slots.device.clone();
        for (si, groups) in plans.into_iter().enumerate() {
            if groups.is_empty() {
                continue;
            }
            let (b, h) = (si / kvh, si % kvh);
            let kb = keys
                .clone()
                .slice([b..b + 1, h..h + 1, 0..n, 0..d])
                .reshape([n, d]);
            let vb = values
                .clone()
                .slice([b..b + 1, h..h + 1, 0..n, 0..d])
                .reshape([n, d]);
            let pos: Vec<u32> = groups.iter().map(|g| g.position).collect();
            let mass: Vec<f32> = groups.iter().map(Group::mass).collect();
            let extends = groups[0].extends_last;
            let plain = !extends && groups.iter().all(|g| g.members.len() == 1);
            let (k_rows, v_rows) = if plain {
                // No merge: the tokens themselves, bit for bit.
                let ids: Vec<i32> = groups.iter().map(|g| g.members[0].0 as i32).collect();
                if ids.len() == n {
                    (kb, vb)
                } else {
                    let ids =
                        Tensor::<1, Int>::from_data(TensorData::new(ids, [groups.len()]), &device);
                    (kb.select(0, ids.clone()), vb.select(0, ids))
                }
            } else {
                // Fold matrix over [last slot; block tokens]: row g holds the normalised
                // weights of group g's members.
                let cols = n + 1;
                let mut m = vec![0.0f32; groups.len() * cols];
                for (gi, g) in groups.iter().enumerate() {
                    let total = g.mass();
                    if g.extends_last {
                        m[gi * cols] = g.base / total;
                    }
                    for &(i, w) in &g.members {
                        m[gi * cols + 1 + i] = w / total;
                    }
                }
                let m = matrix(m, groups.len(), cols, &device);
                let (lk, lv) = match (extends, self.slots.streams[si].held()) {
                    (true, Some((k, v))) => {
                        let len = k.dims()[0];
                        (k.slice([len - 1..len, 0..d]), v.slice([len - 1..len, 0..d]))
                    }
                    _ => (
                        Tensor::zeros([1, d], &device),
                        Tensor::zeros([1, d], &device),
                    ),
                };
                let xk = Tensor::cat(vec![lk, kb], 0);
                let xv = Tensor::cat(vec![lv, vb], 0);
                (m.clone().matmul(xk), m.matmul(xv))
            };
            self.slots
                .write_tail(si, extends, k_rows, v_rows, &pos, &mass);
        }
        for b in 0..s.batch() {
            self.slots.logical[b] += counts[b];
            if let Some(p) = positions[b * n..(b + 1) * n]
                .iter()
                .rev()
                .copied()
                .find(|&p| p != PAD)
            {
                self.slots.last_seen[b] = Some(p);
            }
        }
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> Result<Attended> {
        check_query(&self.config.shape, query, "DmcCache::attend")?;
        let (output, stats) = self.slots.attend(query, stats, self.config.proportional);
        Ok(Attended { output, stats })
    }

    fn view(&self) -> KvView {
        self.slots.view()
    }

    fn lengths(&self) -> Lengths {
        self.slots.lengths()
    }

    fn memory(&self) -> MemoryReport {
        self.slots.memory()
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        self.slots.held_buffers()
    }

    fn reset(&mut self) {
        self.slots.reset();
    }
}
