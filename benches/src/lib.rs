//! Shared helpers of the kv-compress benches (unpublished): the bench device, the model's
//! attention shape, seeded caches and queries, and a device-synced timing loop.
//!
//! Every bench family (`benches/<family>/main.rs`) builds its inputs here, so that all methods
//! are timed on the same device, shapes and data as the dense baseline.
//!
//! The device comes from [`kv_testkit::test_device`]: the CPU `flex` backend by default, or
//! wgpu with `--features kv-testkit/wgpu` and `KV_TEST_DEVICE=wgpu`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use burn::prelude::*;
use kv_core::{DenseCache, DenseCacheConfig, KvBlock, KvCache, KvShape, Query, StatsRequest};

/// Query heads of the real model.
pub const Q_HEADS: usize = 9;
/// KV heads of the real model.
pub const KV_HEADS: usize = 3;
/// Head dimension of the real model.
pub const HEAD_DIM: usize = 64;
/// Sequences per batch in the benches.
pub const BATCH: usize = 1;
/// Cached-token counts every attention bench sweeps.
pub const CACHED_TOKENS: [usize; 3] = [1024, 8 * 1024, 32 * 1024];
/// Query tokens of a prefill chunk.
pub const PREFILL_CHUNK: usize = 512;

/// Seed of the cached keys.
const KEY_SEED: u64 = 0x6b65_7973;
/// Seed of the queries.
const QUERY_SEED: u64 = 0x7175_6572;

/// The device benches run on (see the crate docs).
pub fn bench_device() -> Device {
    kv_testkit::test_device()
}

/// The layer shape of the real model: batch [`BATCH`], [`KV_HEADS`] KV heads, [`Q_HEADS`]
/// query heads, head dim [`HEAD_DIM`].
pub fn model_shape() -> KvShape {
    KvShape::new(BATCH, KV_HEADS, Q_HEADS, HEAD_DIM)
        .expect("invariant: the model shape is a valid GQA shape")
}

/// Seeded keys and values for `tokens` tokens at positions `0..tokens`, as one block.
///
/// # Panics
/// If `tokens` is zero or does not fit a `u32` position.
pub fn seeded_block(shape: KvShape, tokens: usize, seed: u64, device: &Device) -> KvBlock {
    let dims = [shape.batch(), shape.kv_heads(), tokens, shape.head_dim()];
    let k = kv_testkit::seeded_tensor(dims, seed, 1.0, device);
    let v = kv_testkit::seeded_tensor(dims, seed.wrapping_add(1), 1.0, device);
    KvBlock::contiguous(k, v, 0).expect("invariant: a seeded block is well formed")
}

/// A dense fp32 cache holding `tokens` seeded tokens (positions `0..tokens`), appended at once
/// and synced, so that the append is not part of any timed region.
///
/// # Panics
/// If the append fails or the device cannot sync.
pub fn filled_dense_cache(shape: KvShape, tokens: usize, device: &Device) -> DenseCache {
    let mut cache = DenseCacheConfig::new(shape)
        .init(device)
        .expect("invariant: an unbounded dense config is valid");
    cache
        .append(seeded_block(shape, tokens, KEY_SEED, device))
        .expect("invariant: positions start at 0 in an empty cache");
    sync(device);
    cache
}

/// A seeded query of `q_len` tokens at positions `start..start + q_len`.
///
/// # Panics
/// If `q_len` is zero.
pub fn seeded_query(shape: KvShape, q_len: usize, start: u32, device: &Device) -> Query {
    let dims = [shape.batch(), shape.q_heads(), q_len, shape.head_dim()];
    let q = kv_testkit::seeded_tensor(dims, QUERY_SEED, 1.0, device);
    Query::contiguous(q, start).expect("invariant: a seeded query is well formed")
}

/// Waits until every operation queued on `device` has run.
///
/// # Panics
/// If the device reports an execution error.
pub fn sync(device: &Device) {
    device.sync().expect("bench device failed to sync");
}

/// Runs `op` `iters` times and returns the elapsed time, syncing the device after every
/// call inside the measured region (for [`criterion::Bencher::iter_custom`]), so that
/// asynchronous backends are timed on execution rather than dispatch.
pub fn time_synced<T>(device: &Device, iters: u64, mut op: impl FnMut() -> T) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        black_box(op());
        sync(device);
    }
    start.elapsed()
}

/// `iters` calls of `cache.attend(query)` without statistics, timed by [`time_synced`].
///
/// # Panics
/// If `attend` fails.
pub fn time_attend<C: KvCache + ?Sized>(cache: &mut C, query: &Query, iters: u64) -> Duration {
    let device = cache.device().clone();
    time_synced(&device, iters, || {
        cache
            .attend(query, StatsRequest::NONE)
            .expect("attend on a filled cache")
            .output
    })
}

/// Fills `cache` with `tokens` seeded tokens (positions `0..tokens`, the same data as
/// [`filled_dense_cache`]) in one prefill append, ends prefill and syncs, so that decode
/// benches time a cache in its steady decode state.
///
/// # Panics
/// If the append or `end_prefill` fails or the device cannot sync.
pub fn fill_cache<C: KvCache>(mut cache: C, tokens: usize) -> C {
    let device = cache.device().clone();
    cache
        .append(seeded_block(cache.shape(), tokens, KEY_SEED, &device))
        .expect("invariant: positions start at 0 in an empty cache");
    cache.end_prefill().expect("end_prefill of a filled cache");
    sync(&device);
    cache
}
