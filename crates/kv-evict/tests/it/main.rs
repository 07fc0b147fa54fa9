//! Integration tests of kv-evict: the cache contract for every scorer, the catalog's
//! hand-computed cases, budget properties, bad input, memory after eviction, chunked prefill.

mod budgets;
mod cases;
mod contract;
mod coverage;
mod eviction;
mod fixtures;
mod h2o;
mod headkv;
mod keyformer;
mod scissorhands;
mod streaming;
