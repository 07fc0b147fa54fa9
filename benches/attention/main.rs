//! Attention benches: `cargo bench -p kv-benches --bench attention`.
//!
//! Each module exposes one `criterion_group!`; this file lists them.

mod dense;

criterion::criterion_main!(dense::benches);
