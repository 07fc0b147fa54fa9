//! Integration tests of kv-quant through its public API (one binary, see house style).

mod blocks;
mod fp8;
mod fused;
mod gear;
mod ggml_ref;
mod group;
mod kivi;
mod kvquant;
mod packing;
mod qjl;
mod quanto;
mod think_kivi;
