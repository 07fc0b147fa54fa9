//! Pipelines of kv-compress methods, and the registry of every method by name.
//!
//! # What it is
//! - **Specs** ([`MethodSpec`], [`PipelineSpec`]): what users write, in code, as a versioned
//!   JSON or TOML config, or as one line (`snapkv:ratio=0.75|kivi:bits=4`).
//! - **The registry** ([`registry`]): every method of the technique crates by name, with the
//!   role it can play ([`Builder`]: codec, selection, decode-time policy, preset pipeline).
//! - **Role checks** ([`plan`]): an order that cannot work is rejected with an error naming
//!   the two stages and why (a selection after the codec that quantized its keys, two codecs
//!   of the same tensors, a decode-time policy stacked with anything).
//! - **The pipeline cache** ([`PipelineCache`]): a prefill selection (any kv-evict scorer and
//!   budget) hands every (sequence, KV head) stream's survivors, with their original
//!   positions, to a codec of its own (KIVI, llama.cpp blocks, fp8, fp16), which stores every
//!   later token too; an optional evicted tier keeps the dropped tokens in a second,
//!   low-precision codec (MiKV) and attention over both tiers is merged exactly by
//!   log-sum-exp. Memory is what the codecs hold, summed: positions, scales and windows
//!   included; the selection's fp32 prompt is freed at the hand-over.
//!
//! # What it is not
//! Not a place for algorithms: scorers live in `kv-evict`, codecs in `kv-quant`. Codecs group
//! tokens (KIVI groups 32 keys per channel), so tokens are never evicted *after* a codec:
//! decode-time policies (H2O, StreamingLLM's rolling cache) stand alone.
//!
//! # Example
//! ```
//! use kv_compose::{PipelineSpec, plan};
//!
//! # fn main() -> Result<(), kv_compose::ComposeError> {
//! let p = PipelineSpec::parse_line("snapkv:ratio=0.75|kivi:bits=4")?;
//! assert!(plan(&p).is_ok());
//! // A selection after the codec that quantized its keys cannot work:
//! let bad = PipelineSpec::parse_line("kivi:bits=4|snapkv:ratio=0.75")?;
//! let err = plan(&bad).unwrap_err().to_string();
//! assert!(err.contains("stages[0] `kivi` and stages[1] `snapkv`"), "{err}");
//! # Ok(())
//! # }
//! ```

mod build;
mod error;
mod pipeline;
mod presets;
mod registry;
mod spec;

pub use build::{Plan, build_layer, build_layers, plan};
pub use error::{ComposeError, Result};
pub use pipeline::{CodecFactory, PipelineCache, PipelineCacheConfig};
pub use registry::{
    Builder, CacheFn, LayerContext, MethodEntry, PresetFn, SelectFn, lookup, registry,
};
pub use spec::{CONFIG_VERSION, EVICTED_PREFIX, MethodSpec, PipelineSpec};
