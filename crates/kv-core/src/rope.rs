//! Rotary position embeddings in both conventions, at any base, plus re-rotation.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{KvError, Result};

/// How channel pairs are formed for rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeConvention {
    /// Channel `i` pairs with `i + rot/2` (HF transformers' `rotate_half`).
    RotateHalf,
    /// Channel `2i` pairs with `2i + 1` (llama.cpp, the original GPT-J/Meta layout).
    Interleaved,
}

/// Configuration of [`Rope`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeConfig {
    /// Channels per head.
    pub head_dim: usize,
    /// The frequency base θ (10 000 in Llama 2, 100 000 in SmolLM2).
    pub base: f32,
    /// Pairing convention.
    pub convention: RopeConvention,
    /// Rotate only the first `rotary_dim` channels (partial rotary); `None` rotates all.
    #[serde(default)]
    pub rotary_dim: Option<usize>,
}

impl RopeConfig {
    /// Full-width RoPE.
    pub fn new(head_dim: usize, base: f32, convention: RopeConvention) -> Self {
        RopeConfig {
            head_dim,
            base,
            convention,
            rotary_dim: None,
        }
    }
    /// Validates and builds the rotation.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] if the rotated width is zero, odd or above `head_dim`, or the
    /// base is not a finite number above 1.
    pub fn init(&self) -> Result<Rope> {
        let rot = self.rotary_dim.unwrap_or(self.head_dim);
        if rot == 0 || !rot.is_multiple_of(2) || rot > self.head_dim {
            return Err(KvError::InvalidConfig {
                field: "rotary_dim",
                reason: format!(
                    "rotated width {rot} must be even, non-zero and at most head_dim {}",
                    self.head_dim
                ),
            });
        }
        if !(self.base.is_finite() && self.base > 1.0) {
            return Err(KvError::InvalidConfig {
                field: "base",
                reason: format!("{} is not a finite base above 1", self.base),
            });
        }
        // As HF computes it, in f32: 1 / base^(2i / rot).
        let inv_freq = (0..rot / 2)
            .map(|i| 1.0f32 / self.base.powf((2 * i) as f32 / rot as f32))
            .collect();
        Ok(Rope {
            config: self.clone(),
            rot,
            inv_freq,
        })
    }
}

/// Rotary position embedding: rotates channel pairs of queries or keys by `position * θ_i`.
///
/// Angles are computed in f32 as HF transformers does (`position as f32 * inv_freq`), so that
/// post-RoPE keys match HF's to float rounding.
#[derive(Debug, Clone)]
pub struct Rope {
    config: RopeConfig,
    rot: usize,
    inv_freq: Vec<f32>,
}

impl Rope {
    /// The configuration.
    pub fn config(&self) -> &RopeConfig {
        &self.config
    }

    /// The per-pair inverse frequencies `θ_i = base^(-2i/rot)`.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Rotates `x` at the given positions.
    ///
    /// # Shapes
    /// `x`: `[batch, heads, seq, head_dim]`; `positions`: `batch * seq` entries (shared by all
    /// heads) or `batch * heads * seq` (per head), row-major.
    ///
    /// # Panics
    /// If `head_dim` or the number of positions does not match.
    pub fn apply(&self, x: Tensor<4>, positions: &[u32]) -> Tensor<4> {
        let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
        self.apply_at(x, &pos)
    }

    /// Re-rotates `x` from positions `from` to positions `to` (for example after eviction
    /// shifts positions): RoPE composes, so this rotates by `to - from`.
    ///
    /// # Panics
    /// As [`Rope::apply`], or if `from` and `to` differ in length.
    pub fn rerotate(&self, x: Tensor<4>, from: &[u32], to: &[u32]) -> Tensor<4> {
        assert_eq!(
            from.len(),
            to.len(),
            "Rope::rerotate: from and to differ in length"
        );
        let delta: Vec<f32> = from
            .iter()
            .zip(to)
            .map(|(&f, &t)| (i64::from(t) - i64::from(f)) as f32)
            .collect();
        self.apply_at(x, &delta)
    }

    /// Undoes [`Rope::apply`] at the given positions (rotation by the negated angles).
    ///
    /// # Panics
    /// As [`Rope::apply`].
    pub fn unapply(&self, x: Tensor<4>, positions: &[u32]) -> Tensor<4> {
        let pos: Vec<f32> = positions.iter().map(|&p| -(p as f32)).collect();
        self.apply_at(x, &pos)
    }

    fn apply_at(&self, x: Tensor<4>, pos: &[f32]) -> Tensor<4> {
        let [b, h, s, d] = x.dims();
        assert_eq!(
            d, self.config.head_dim,
            "Rope::apply: head_dim {d} != {}",
            self.config.head_dim
        );
        let hp = if pos.len() == b * s {
            1
        } else {
            assert_eq!(
                pos.len(),
                b * h * s,
                "Rope::apply: {} positions for x {:?} (need batch*seq or batch*heads*seq)",
                pos.len(),
                [b, h, s, d]
            );
            h
        };
        let half = self.rot / 2;
        let mut cos = Vec::with_capacity(pos.len() * half);
        let mut sin = Vec::with_capacity(pos.len() * half);
        for &p in pos {
            for &f in &self.inv_freq {
                let a = p * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let device = x.device();
        let table = |v: Vec<f32>| {
            Tensor::<1>::from_data(TensorData::new(v, [pos.len() * half]), &device)
                .reshape([b, hp, s, half])
                .expand([b, h, s, half])
        };
        let (cos, sin) = (table(cos), table(sin));
        let rest = (self.rot < d).then(|| x.clone().slice([0..b, 0..h, 0..s, self.rot..d]));
        let rotated = match self.config.convention {
            RopeConvention::RotateHalf => {
                let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
                let x2 = x.slice([0..b, 0..h, 0..s, half..self.rot]);
                let o1 = x1.clone() * cos.clone() - x2.clone() * sin.clone();
                let o2 = x2 * cos + x1 * sin;
                Tensor::cat(vec![o1, o2], 3)
            }
            RopeConvention::Interleaved => {
                let xr = x
                    .slice([0..b, 0..h, 0..s, 0..self.rot])
                    .reshape([b, h, s, half, 2]);
                let even = xr
                    .clone()
                    .slice([0..b, 0..h, 0..s, 0..half, 0..1])
                    .reshape([b, h, s, half]);
                let odd = xr
                    .slice([0..b, 0..h, 0..s, 0..half, 1..2])
                    .reshape([b, h, s, half]);
                let oe = even.clone() * cos.clone() - odd.clone() * sin.clone();
                let oo = odd * cos + even * sin;
                Tensor::stack::<5>(vec![oe, oo], 4).reshape([b, h, s, self.rot])
            }
        };
        match rest {
            Some(rest) => Tensor::cat(vec![rotated, rest], 3),
            None => rotated,
        }
    }
}
