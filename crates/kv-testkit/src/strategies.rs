//! Proptest strategies: shapes first, then seeds for bounded finite values (never arbitrary
//! floats, which would be NaN, infinite or huge).

use kv_core::KvShape;
use proptest::prelude::*;

/// Small valid layer shapes: batch 1–2, KV heads 1–3, GQA group 1–3, even head_dim 2–16.
pub fn kv_shape() -> impl Strategy<Value = KvShape> {
    (1usize..=2, 1usize..=3, 1usize..=3, 1usize..=8).prop_map(|(b, kvh, g, half)| {
        KvShape::new(b, kvh, kvh * g, 2 * half).expect("invariant: strategy builds valid shapes")
    })
}

/// An attention problem: a shape, `past` cached tokens, `q_len` new query tokens placed at the
/// end (positions `past + keys_after..`), and a seed for the values.
#[derive(Debug, Clone)]
pub struct AttentionCase {
    /// The layer shape.
    pub shape: KvShape,
    /// Keys and values held.
    pub keys: usize,
    /// Query tokens.
    pub q_len: usize,
    /// Position of the first query token (`<= keys` puts queries inside the keys: causal).
    pub q_start: u32,
    /// Seed for the values.
    pub seed: u64,
}

/// Attention problems with 1–24 keys, 1–6 queries and any causal offset.
pub fn attention_case() -> impl Strategy<Value = AttentionCase> {
    (kv_shape(), 1usize..=24, 1usize..=6, any::<u64>()).prop_flat_map(
        |(shape, keys, q_len, seed)| {
            (0..=keys as u32).prop_map(move |q_start| AttentionCase {
                shape,
                keys,
                q_len,
                q_start,
                seed,
            })
        },
    )
}

/// A sorted, unique subset of `0..len` (possibly empty).
pub fn subset(len: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(any::<bool>(), len).prop_map(|mask| {
        mask.iter()
            .enumerate()
            .filter(|(_, k)| **k)
            .map(|(i, _)| i)
            .collect()
    })
}

/// Positions for RoPE checks.
pub fn position() -> impl Strategy<Value = u32> {
    0u32..9000
}
