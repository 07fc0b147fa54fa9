//! Integration tests of kv-core through its public API (one binary, see house style).

mod attention;
mod caches;
mod chunk;
mod rope;
