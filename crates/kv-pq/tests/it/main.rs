//! Integration tests of kv-pq through its public API (one binary, see house style).

mod clusterkv;
mod common;
mod double_sparsity;
mod kmeans;
mod pq;
mod pqcache;
mod quest;
mod rvq;
mod tokenselect;
