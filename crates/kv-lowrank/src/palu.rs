//! Palu (Chang et al., 2024, arXiv 2407.21118) without weight rewriting: keys and values held
//! as low-rank latents from calibration, keys reconstructed and rotated when attending.
//!
//! # What it does
//! Palu factors `W_k ≈ A_k B_k` with a whitened SVD (`S = chol(XᵀX)`, SVD of `S W_k`) and caches
//! the latent `h = x A_k`. That decomposition minimises `‖X W_k − X A_k B_k‖_F` over the
//! calibration inputs `X`, whose optimum is the projection of the pre-RoPE keys `K = X W_k` on
//! the top right singular vectors of `K`: `A_k B_k = W_k V_r V_rᵀ` with `V_r` the first `r`
//! eigenvectors of `KᵀK`. So the latent is `h = k V_r` with `V_r` the PCA basis of pre-RoPE
//! keys ([`Activation::KeysPreRope`]) and `B_k = V_rᵀ`; this cache computes it from the
//! appended key instead of from `x` (the same numbers, no weight surgery). At attention time
//! the keys are reconstructed, `k̂ = h V_rᵀ`, rotated with RoPE at their positions (Palu's
//! kernel does the same) and attended; values are held as `v U_v[:, :r_v]` and the output is
//! projected back (Palu fuses that into `W_o`).
//!
//! The cache stores keys **before RoPE** ([`KeyRope::PreRope`]): the model appends them
//! unrotated and the cache rotates them when it attends.
//!
//! # Latent quantization (Palu + quantization)
//! With [`PaluConfig::latent_bits`] (Palu's `--lt_bits`, `--lt_group_size`, `--lt_hadamard`
//! in shadowpa0327/Palu `run_ppl_eval.py`), every latent is quantized per token as it is
//! appended (asymmetric, round to nearest, fp16 scale and zero point per group of
//! [`PaluConfig::latent_group`] latents, by default a head's whole latent), and only the codes
//! are held. With [`PaluConfig::hadamard`] (the default) the bases are `V_r H` with `H` the
//! normalised Walsh–Hadamard matrix: Palu fuses the same rotation into its factors so that
//! the latent's few large coordinates are spread over all of them before quantization; the
//! reconstruction `h (V_r H)ᵀ` is unchanged in exact arithmetic.
//!
//! # Deviations
//! Per-KV-head decomposition only (Palu's M-LRD; the default G-LRD shares one latent across a
//! group of heads, which needs cross-head calibration statistics). Ranks are fixed per run,
//! or allocated over layers by Palu's Fisher-information rank search ([`crate::palu_ranks`],
//! `fisher=FILE`). Quantized latents are dequantized for attention (the
//! reference fuses the dequantization into its reconstruction kernel).

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::FloatDType;
use kv_core::{
    Attended, HeldBuffer, KeyRope, KvBlock, KvCache, KvShape, KvView, Lengths, MemoryReport, Query,
    Rope, RopeConfig, StatsRequest, StorageDtype, StorageRole, check_query, positions_per_head,
};
use serde::{Deserialize, Serialize};

use crate::attend::{Part, attend_parts, group_query, project, project_grouped, transpose_heads};
use crate::calibration::{Activation, Calibration};
use crate::slots::{LatentParts, Slots, cat_tokens, empty_view, float_dtype};
use kv_quant::{BitWidth, GroupAxis, QuantSpec, QuantizedTensor};

/// Configuration of a [`PaluCache`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaluConfig {
    /// The layer shape.
    pub shape: KvShape,
    /// The calibration artefact (needs [`Activation::KeysPreRope`] and
    /// [`Activation::Values`]).
    pub calibration: PathBuf,
    /// The layer index in the artefact.
    pub layer: usize,
    /// The model's layer count, checked against the artefact when given.
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Rank of the key latent, `1..=head_dim`.
    pub rank_k: usize,
    /// Rank of the value latent, `1..=head_dim`.
    pub rank_v: usize,
    /// The model's RoPE (the cache rotates reconstructed keys).
    pub rope: RopeConfig,
    /// Element type of the stored latents.
    #[serde(default)]
    pub dtype: StorageDtype,
    /// Palu's latent quantization (`--lt_bits`): every latent is quantized per token as it is
    /// appended, asymmetric, fp16 scale and zero point per group; `None` keeps `dtype` latents.
    #[serde(default)]
    pub latent_bits: Option<u32>,
    /// Latents per quantization group (`--lt_group_size`); 0, the reference's default, is the
    /// whole latent of a KV head (`rank_k` for keys, `rank_v` for values).
    #[serde(default)]
    pub latent_group: usize,
    /// Palu's `--lt_hadamard`: with quantized latents, rotate them by a normalised
    /// Walsh–Hadamard matrix folded into the bases (`V_r H`), which spreads outlier channels
    /// before quantization and is exact without it. Needs power-of-two ranks.
    #[serde(default = "default_hadamard")]
    pub hadamard: bool,
    /// The layer count of the Fisher artefact the ranks were allocated from
    /// ([`PaluFisher::allocate`](crate::PaluFisher::allocate)), checked against
    /// [`num_layers`](Self::num_layers) at init.
    #[serde(default)]
    pub fisher_layers: Option<usize>,
}

fn default_hadamard() -> bool {
    true
}

impl PaluConfig {
    /// Palu with the given ranks, fp32 storage.
    pub fn new(
        shape: KvShape,
        calibration: impl Into<PathBuf>,
        layer: usize,
        rank_k: usize,
        rank_v: usize,
        rope: RopeConfig,
    ) -> Self {
        PaluConfig {
            shape,
            calibration: calibration.into(),
            layer,
            num_layers: None,
            rank_k,
            rank_v,
            rope,
            dtype: StorageDtype::F32,
            latent_bits: None,
            latent_group: 0,
            hadamard: true,
            fisher_layers: None,
        }
    }
    /// Quantizes the latents to `bits` per element (Palu's `--lt_bits`) in groups of `group`
    /// latents (0: a head's whole latent), Hadamard-rotated unless `hadamard` is false.
    pub fn with_latent_quant(mut self, bits: u32, group: usize, hadamard: bool) -> Self {
        self.latent_bits = Some(bits);
        self.latent_group = group;
        self.hadamard = hadamard;
        self
    }
    crate::params::calibrated_setters!();

    /// The parameter names [`from_params`](Self::from_params) accepts.
    pub const PARAMS: &'static [&'static str] = &[
        "calibration",
        "rank",
        "rank_k",
        "rank_v",
        "dtype",
        "bits",
        "group",
        "hadamard",
        "fisher",
        "rank_ratio",
        "block",
    ];

    /// The config for `layer` from `key=value` parameters: `calibration` (path, required),
    /// `rank` (both ranks), `rank_k`, `rank_v` (default `head_dim / 2` each: Palu's ~50% KV
    /// compression), `dtype`; or Palu's rank search: `fisher` (a [`PaluFisher`](crate::PaluFisher)
    /// artefact from `kv-eval fisher`), `rank_ratio` (kept fraction of the full rank, default 0.5,
    /// Palu's `--param_ratio_target`) and `block` (rank rounding, default
    /// [`PALU_RANK_BLOCK`](crate::PALU_RANK_BLOCK) or `head_dim` if smaller), which set this layer's `rank_k` and
    /// `rank_v` and exclude `rank`, `rank_k` and `rank_v`. Validated at [`init`](Self::init).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`](kv_core::KvError::InvalidConfig) for an unknown name, a bad
    /// value or no `calibration`.
    pub fn from_params<'a>(
        shape: KvShape,
        layer: usize,
        rope: RopeConfig,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> kv_core::Result<Self> {
        use crate::params::{dtype, float, int, path, unknown};
        let half = (shape.head_dim() / 2).max(1);
        let mut cfg = PaluConfig::new(shape, PathBuf::new(), layer, half, half, rope);
        let (mut fisher, mut ratio, mut block, mut explicit) = (None, None, None, false);
        for (k, v) in params {
            explicit |= matches!(k, "rank" | "rank_k" | "rank_v");
            match k {
                "calibration" => cfg.calibration = path(v),
                "fisher" => fisher = Some(path(v)),
                "rank_ratio" => ratio = Some(float("rank_ratio", v)?),
                "block" => block = Some(int("block", v)?),
                "rank" => {
                    cfg.rank_k = int("rank", v)?;
                    cfg.rank_v = cfg.rank_k;
                }
                "rank_k" => cfg.rank_k = int("rank_k", v)?,
                "rank_v" => cfg.rank_v = int("rank_v", v)?,
                "dtype" => cfg.dtype = dtype("dtype", v)?,
                "bits" => cfg.latent_bits = Some(u32::try_from(int("bits", v)?).unwrap_or(0)),
                "group" => cfg.latent_group = int("group", v)?,
                "hadamard" => {
                    cfg.hadamard = v
                        .parse()
                        .map_err(|_| crate::params::bad("hadamard", v, "true or false"))?;
                }
                _ => return Err(unknown("Palu", k, Self::PARAMS)),
            }
        }
        if cfg.calibration.as_os_str().is_empty() {
            return Err(crate::missing_calibration("Palu"));
        }
        match fisher {
            Some(file) => {
                if explicit {
                    return Err(kv_core::KvError::InvalidConfig {
                        field: "fisher",
                        reason: "fisher allocates the ranks: drop rank, rank_k and rank_v".into(),
                    });
                }
                let f = crate::PaluFisher::load(&file)?;
                f.check_shape(shape)?;
                let alloc = f.allocate(
                    ratio.unwrap_or(0.5),
                    block.unwrap_or(crate::PALU_RANK_BLOCK.min(shape.head_dim())),
                )?;
                let r = alloc
                    .layers
                    .get(layer)
                    .ok_or_else(|| kv_core::KvError::InvalidConfig {
                        field: "fisher",
                        reason: format!(
                            "layer {layer} is outside the artefact's {} layers",
                            f.num_layers
                        ),
                    })?;
                cfg.rank_k = r.rank_k;
                cfg.rank_v = r.rank_v;
                cfg.fisher_layers = Some(f.num_layers);
            }
            None if ratio.is_some() || block.is_some() => {
                return Err(kv_core::KvError::InvalidConfig {
                    field: "rank_ratio",
                    reason: "rank_ratio and block need fisher=FILE (Palu's rank search)".into(),
                });
            }
            None => {}
        }
        Ok(cfg)
    }

    pub(crate) fn validate(&self) -> kv_core::Result<Rope> {
        let d = self.shape.head_dim();
        crate::params::check_rank("rank_k", self.rank_k, d)?;
        crate::params::check_rank("rank_v", self.rank_v, d)?;
        if let (Some(f), Some(n)) = (self.fisher_layers, self.num_layers)
            && f != n
        {
            return Err(kv_core::KvError::InvalidConfig {
                field: "fisher",
                reason: format!("the Fisher artefact is for {f} layers, the model has {n}"),
            });
        }
        if self.rope.head_dim != d {
            return Err(kv_core::KvError::InvalidConfig {
                field: "rope",
                reason: format!(
                    "RoPE head_dim {} differs from the cache's {d}",
                    self.rope.head_dim
                ),
            });
        }
        self.latent_specs()?;
        self.rope.init()
    }

    /// The quantizers of the key and value latents (per token, groups along the latent),
    /// `None` without latent quantization.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`](kv_core::KvError::InvalidConfig) for an unsupported width,
    /// a group that does not divide a rank, or Hadamard with a rank that is not a power of two.
    pub fn latent_specs(&self) -> kv_core::Result<Option<(QuantSpec, QuantSpec)>> {
        let Some(bits) = self.latent_bits else {
            return Ok(None);
        };
        let width = BitWidth::new(bits).map_err(kv_core::KvError::from)?;
        let spec = |field: &'static str, rank: usize| -> kv_core::Result<QuantSpec> {
            if self.hadamard && !rank.is_power_of_two() {
                return Err(kv_core::KvError::InvalidConfig {
                    field: "hadamard",
                    reason: format!(
                        "the Walsh-Hadamard rotation needs a power-of-two rank, {field} is \
                         {rank}; use hadamard=false"
                    ),
                });
            }
            let group = if self.latent_group == 0 {
                rank
            } else {
                self.latent_group
            };
            if !rank.is_multiple_of(group) {
                return Err(kv_core::KvError::InvalidConfig {
                    field: "latent_group",
                    reason: format!("group {group} does not divide {field} {rank}"),
                });
            }
            Ok(QuantSpec::new(width, group, GroupAxis::Channels)
                .map_err(kv_core::KvError::from)?
                .with_scale_dtype(StorageDtype::F16))
        };
        Ok(Some((
            spec("rank_k", self.rank_k)?,
            spec("rank_v", self.rank_v)?,
        )))
    }

    /// Stored bytes per token per layer (one sequence): the latents and the `u32` position;
    /// bases excluded (they are per layer).
    pub fn bytes_per_token(&self) -> usize {
        let h = self.shape.kv_heads();
        let latents = match self.latent_specs() {
            Ok(Some((k, v))) => {
                k.stored_bytes([1, h, 1, self.rank_k]) + v.stored_bytes([1, h, 1, self.rank_v])
            }
            _ => h * (self.rank_k + self.rank_v) * self.dtype.size(),
        };
        latents + core::mem::size_of::<u32>()
    }

    /// Loads the artefact at [`calibration`](Self::calibration) and builds the cache.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`](kv_core::KvError::InvalidConfig) for ranks outside
    /// `1..=head_dim`, a bad RoPE, a missing or invalid artefact, or one from a model of
    /// another shape.
    pub fn init(&self, device: &Device) -> kv_core::Result<PaluCache> {
        self.validate()?;
        self.init_with(&Calibration::load(&self.calibration)?, device)
    }

    /// Builds the cache from an artefact already loaded.
    ///
    /// # Errors
    /// As [`init`](Self::init), without the file.
    pub fn init_with(
        &self,
        calibration: &Calibration,
        device: &Device,
    ) -> kv_core::Result<PaluCache> {
        if let Some(n) = self.num_layers {
            calibration.check_layers(n)?;
        }
        let rope = self.validate()?;
        let s = &self.shape;
        let mut pk =
            calibration.basis(Activation::KeysPreRope, self.layer, s, self.rank_k, device)?;
        let mut pv = calibration.basis(Activation::Values, self.layer, s, self.rank_v, device)?;
        if self.latent_bits.is_some() && self.hadamard {
            pk = rotate_hadamard(pk);
            pv = rotate_hadamard(pv);
        }
        Ok(PaluCache::from_bases(
            self.clone(),
            rope,
            [pk, pv],
            device,
            ["PaluCache::append", "PaluCache::attend"],
        ))
    }
}

/// `V H` for per-head bases `V: [h, d, r]`, with `H` the normalised Sylvester
/// Walsh–Hadamard matrix of order `r` (a power of two): still orthonormal columns, so
/// reconstruction is unchanged, while each latent becomes a ±1/√r mix of all of them.
pub(crate) fn rotate_hadamard(basis: Tensor<3>) -> Tensor<3> {
    let [h, _, r] = basis.dims();
    let scale = 1.0 / (r as f32).sqrt();
    let data: Vec<f32> = (0..r * r)
        .map(|ij| {
            let (i, j) = (ij / r, ij % r);
            // Sylvester: H[i][j] = (-1)^popcount(i & j).
            if (i & j).count_ones() % 2 == 0 {
                scale
            } else {
                -scale
            }
        })
        .collect();
    let m = Tensor::<2>::from_data(TensorData::new(data, [r, r]), &basis.device())
        .unsqueeze::<3>()
        .expand([h, r, r]);
    basis.matmul(m)
}

/// A Palu cache for one layer. See the module docs.
#[derive(Debug, Clone)]
pub struct PaluCache {
    config: PaluConfig,
    device: Device,
    rope: Rope,
    /// `V_r` per KV head, `[h, d, r_k]`.
    pk: Tensor<3>,
    /// `U_v[:, :r_v]` per KV head, `[h, d, r_v]`.
    pv: Tensor<3>,
    slots: Slots,
    /// Key latents `k V_r` (pre-RoPE), `[b, h, t, r_k]`.
    keys: Option<Tensor<4>>,
    /// Value latents, `[b, h, t, r_v]`.
    values: Option<Tensor<4>>,
    /// With latent quantization: the key and value quantizers, and the quantized latents
    /// (then `keys` and `values` stay empty).
    latent: Option<(QuantSpec, QuantSpec)>,
    qkeys: Option<QuantizedTensor>,
    qvalues: Option<QuantizedTensor>,
    /// The operation names in error messages (append, attend).
    ops: [&'static str; 2],
}

impl PaluCache {
    /// An empty cache over given key and value bases, `[h, d, r_k]` and `[h, d, r_v]` (LoRC
    /// reuses it with the right singular vectors of the projection weights); `ops` names the
    /// append and attend operations in error messages.
    pub(crate) fn from_bases(
        config: PaluConfig,
        rope: Rope,
        [pk, pv]: [Tensor<3>; 2],
        device: &Device,
        ops: [&'static str; 2],
    ) -> Self {
        let latent = config
            .latent_specs()
            .expect("invariant: configs are validated before the cache is built");
        PaluCache {
            latent,
            qkeys: None,
            qvalues: None,
            slots: Slots::new(config.shape.batch()),
            config,
            device: device.clone(),
            rope,
            pk,
            pv,
            keys: None,
            values: None,
            ops,
        }
    }

    fn parts(&self) -> LatentParts<'_> {
        LatentParts {
            slots: &self.slots,
            keys: self.keys.iter().collect(),
            values: self.values.iter().collect(),
            bases: vec![&self.pk, &self.pv],
            extra: self
                .qkeys
                .iter()
                .flat_map(|q| q.held_buffers(StorageRole::Keys))
                .chain(
                    self.qvalues
                        .iter()
                        .flat_map(|q| q.held_buffers(StorageRole::Values)),
                )
                .collect(),
        }
    }

    /// The latents in fp32 (dequantized when quantized), `None` when empty.
    fn latents(&self) -> Option<(Tensor<4>, Tensor<4>)> {
        match (&self.keys, &self.values, &self.qkeys, &self.qvalues) {
            (Some(k), Some(v), _, _) => Some((
                k.clone().cast(FloatDType::F32),
                v.clone().cast(FloatDType::F32),
            )),
            (_, _, Some(k), Some(v)) => Some((k.dequantize(), v.dequantize())),
            _ => None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &PaluConfig {
        &self.config
    }
    /// The key projection, `[kv_heads, head_dim, rank_k]`.
    pub fn key_basis(&self) -> &Tensor<3> {
        &self.pk
    }
    /// The value projection, `[kv_heads, head_dim, rank_v]`.
    pub fn value_basis(&self) -> &Tensor<3> {
        &self.pv
    }

    /// Reconstructed keys rotated at their positions, `[b, h, t, d]`.
    fn keys_post_rope(&self, latent: &Tensor<4>) -> Tensor<4> {
        let k = project(
            latent.clone().cast(FloatDType::F32),
            &transpose_heads(&self.pk),
        );
        let pos = self.slots.flat(0..self.slots.len());
        self.rope.apply(k, &pos)
    }
}

impl KvCache for PaluCache {
    fn shape(&self) -> KvShape {
        self.config.shape
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn key_rope(&self) -> KeyRope {
        KeyRope::PreRope
    }

    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        let op = self.ops[0];
        let counts = self.slots.check(&self.config.shape, &block, op)?;
        let n = block.seq_len();
        let dtype = float_dtype(self.config.dtype);
        let (k, v, pos) = block.into_parts();
        let (hk, hv) = (project(k, &self.pk), project(v, &self.pv));
        if let Some((sk, sv)) = &self.latent {
            // Both quantized before anything changes: bad data leaves the cache as it was.
            let qk = sk.quantize_finite(hk).map_err(kv_core::KvError::from)?;
            let qv = sv.quantize_finite(hv).map_err(kv_core::KvError::from)?;
            let join = |a: Option<QuantizedTensor>, b: QuantizedTensor| match a {
                Some(a) => a.concat(b).map_err(kv_core::KvError::from),
                None => Ok(b),
            };
            let qk = join(self.qkeys.clone(), qk)?;
            let qv = join(self.qvalues.clone(), qv)?;
            self.qkeys = Some(qk);
            self.qvalues = Some(qv);
        } else {
            self.keys = Some(cat_tokens(self.keys.take(), hk.cast(dtype)));
            self.values = Some(cat_tokens(self.values.take(), hv.cast(dtype)));
        }
        self.slots.push(&pos, n, &counts);
        Ok(())
    }

    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        let s = self.config.shape;
        check_query(&s, query, self.ops[1])?;
        let Some((keys, values)) = self.latents() else {
            return Ok(Attended {
                output: query.tensor().zeros_like(),
                stats: Default::default(),
            });
        };
        if stats.any() {
            return Ok(self.view().attend_reference(query, stats));
        }
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let t = self.slots.len();
        let q = group_query(query.tensor().clone(), h);
        let n = q.dims()[3];
        let part = Part {
            q,
            keys: self.keys_post_rope(&keys),
            values,
            positions: self.slots.flat(0..t),
        };
        let o = attend_parts(&[part], query.positions(), 1.0 / (d as f32).sqrt(), None);
        let o = project_grouped(o, &transpose_heads(&self.pv));
        Ok(Attended {
            output: o.reshape([b, s.q_heads(), n, d]),
            stats: Default::default(),
        })
    }

    fn view(&self) -> KvView {
        let s = self.config.shape;
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());
        let positions = positions_per_head(self.slots.per_sequence(), h);
        match self.latents() {
            Some((k, v)) => KvView {
                keys: self.keys_post_rope(&k),
                values: project(v, &transpose_heads(&self.pv)),
                positions,
            },
            None => empty_view([b, h, d], positions, &self.device),
        }
    }

    fn lengths(&self) -> Lengths {
        self.parts().lengths(&self.config.shape)
    }

    fn memory(&self) -> MemoryReport {
        self.parts().memory(&self.config.shape)
    }

    fn held_buffers(&self) -> Vec<HeldBuffer> {
        self.parts().held_buffers()
    }

    fn reset(&mut self) {
        self.slots.reset();
        self.keys = None;
        self.values = None;
        self.qkeys = None;
        self.qvalues = None;
    }
}
