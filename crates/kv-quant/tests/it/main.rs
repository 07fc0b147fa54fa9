//! Integration tests of kv-quant through its public API (one binary, see house style).

mod blocks;
mod fp8;
mod ggml_ref;
mod group;
mod kivi;
mod packing;
mod quanto;
