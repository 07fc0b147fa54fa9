//! Integration tests of kv-dmc: the cache contract, the catalog's DMC cases, merge-on-evict, LESS.

mod cam;
mod contract;
mod dmc;
mod less;
