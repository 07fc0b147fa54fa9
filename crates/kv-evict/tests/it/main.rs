//! Integration tests of kv-evict: the cache contract for every scorer, the catalog's
//! hand-computed cases, budget properties, bad input, memory after eviction, chunked prefill.

mod batch;
mod budgets;
mod cases;
mod contract;
mod coverage;
mod eviction;
mod fixtures;
mod h2o;
mod headkv;
mod inplace;
mod keyformer;
mod protect;
mod ratios;
mod scissorhands;
mod streaming;
