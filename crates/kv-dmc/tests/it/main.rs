//! Integration tests of kv-dmc: the cache contract, the catalog's DMC cases, merge-on-evict.

mod cam;
mod contract;
mod dmc;
