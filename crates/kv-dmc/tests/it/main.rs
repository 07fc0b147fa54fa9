//! Integration tests of kv-dmc: the cache contract, the catalog's DMC cases, merge-on-evict, LESS,
//! the DMC retrofit's relaxation.

mod cam;
mod contract;
mod dmc;
mod less;
mod retrofit;
