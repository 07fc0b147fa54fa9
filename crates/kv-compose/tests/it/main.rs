//! Integration tests of kv-compose.

mod pipeline;
mod spec;
