//! Integration tests of kv-eval: spec parsing, the registry, and the perplexity protocols on
//! the tiny fixture model (no network, no assets needed).

mod evict_conformance;
mod plot;
mod prefix;
mod protocols;
