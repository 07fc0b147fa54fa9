//! KV-cache quantization for kv-compress: bit packing of small codes into `U32` words, uniform
//! group quantizers (asymmetric and symmetric, grouped along tokens or channels), the KIVI
//! cache (per-channel keys, per-token values, a full-precision window of recent tokens),
//! KVQuant (pre-RoPE keys, calibrated non-uniform codebooks, dense-and-sparse outliers),
//! QJL (1-bit sketched keys with scores estimated from the bits), GEAR (quantization plus
//! low-rank plus sparse error recovery) and serving-engine storage formats as a cache
//! (llama.cpp `q8_0` ... `iq4_nl` blocks, fp8).
//!
//! Everything is written with Burn tensor ops on `Tensor<D>` and a [`Device`](burn::prelude::Device),
//! so it runs on every backend; the crate enables no backend itself.
//!
//! # Modules
//! - [`packing`]: the packed layout (1, 2, 3, 4 and 8 bits per code) and its byte accounting.
//! - [`group`]: [`QuantSpec`] and [`QuantizedTensor`]; the math and the error bound.
//! - [`kivi`]: [`KiviCache`], a [`KvCache`](kv_core::KvCache) with KIVI's spill semantics.
//! - [`fp8`]: fp8 `e4m3`/`e5m2` codes computed with tensor ops (no fp8 dtype needed).
//! - [`blocks`]: serving-engine formats ([`BlockFormat`]: llama.cpp `q8_0`, `q4_0`, `q4_1`,
//!   `q5_0`, `q5_1`, `iq4_nl`; vLLM-style fp8) and [`EncodedBlocks`].
//! - [`block_cache`]: [`BlockQuantCache`], a [`KvCache`](kv_core::KvCache) stored in a
//!   [`BlockFormat`].
//! - [`gear`]: [`GearCache`], a quantized backbone plus a low-rank approximation of its
//!   residual plus exact sparse outliers.
//! - [`kvquant`]: [`KvQuantCache`], pre-RoPE per-channel keys and per-token values on
//!   calibrated non-uniform codebooks ([`KvQuantCalibration`]) with exact sparse outliers.
//! - [`qjl`]: [`QjlCache`], keys as sign bits of a JL sketch with scores estimated from the
//!   bits ([`QjlSketch`], [`QjlKeys`]), values per token as in KIVI.
//!
//! # Example
//! ```
//! use burn::prelude::*;
//! use kv_core::{KvBlock, KvCache, KvShape};
//! use kv_quant::KiviConfig;
//!
//! # fn main() -> Result<(), kv_core::KvError> {
//! let device = Device::default();
//! let shape = KvShape::new(1, 2, 4, 64)?;
//! let mut cache = KiviConfig::new(shape).with_residual(32).init(&device)?;
//! let k = Tensor::<4>::ones([1, 2, 70, 64], &device);
//! cache.append(KvBlock::contiguous(k.clone(), k, 0)?)?;
//! cache.end_prefill()?;
//! assert_eq!(cache.quantized_key_tokens(), 64); // 70 - 70 mod 32
//! assert_eq!(cache.full_value_tokens(), 32); // the last R values stay in full precision
//! # Ok(())
//! # }
//! ```

mod attend;
pub mod block_cache;
pub mod blocks;
mod error;
pub mod fp8;
pub mod gear;
pub mod group;
mod host;
pub mod kivi;
pub mod kvquant;
pub mod packing;
mod params;
pub mod qjl;
mod rng;

pub use block_cache::{BlockQuantCache, BlockQuantConfig, Fp8Scale};
pub use blocks::{BlockFormat, EncodedBlocks, Iq4Search};
pub use fp8::Fp8Format;
pub use gear::{GearCache, GearConfig};

pub use error::{QuantError, Result};
pub use group::{GroupAxis, QuantMode, QuantSpec, QuantizedTensor};
pub use kivi::{KiviCache, KiviConfig};
pub use kvquant::{KvQuantCache, KvQuantCalibration, KvQuantConfig};
pub use packing::BitWidth;
pub use qjl::{QjlCache, QjlConfig, QjlKeys, QjlSketch};
