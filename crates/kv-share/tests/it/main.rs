//! Integration tests of kv-share through its public API.

mod kvsharer;
mod map;
mod minicache;
mod model;
