//! Quantization benches: `cargo bench -p kv-benches --bench quant`.
//!
//! Each module exposes one `criterion_group!`; this file lists them.

mod decode;
mod packing;

criterion::criterion_main!(packing::benches, decode::benches);
