//! Integration tests of kv-quant through its public API (one binary, see house style).

mod group;
mod kivi;
mod packing;
mod quanto;
