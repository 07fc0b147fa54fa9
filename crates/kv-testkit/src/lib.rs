//! Shared test kit of kv-compress (unpublished): the test device, seeded generators, an
//! independent host-side attention oracle, tolerances, proptest strategies and the contract
//! tests that every cache implementation stamps out.
//!
//! It is not a place for production code: nothing outside tests, benches and binaries depends
//! on it. The CPU backend of the workspace (`flex`, with `simd` and `rayon`) is enabled here
//! and in the binaries, nowhere else.
//!
//! # Feature flags
//! - `flex` (default): the pure-Rust CPU backend.
//! - `wgpu`: with `KV_TEST_DEVICE=wgpu` in the environment, [`test_device`] returns the wgpu
//!   device (a software Vulkan driver such as lavapipe is enough) when an adapter exists.

mod contract;
mod device;
mod generate;
mod oracle;
pub mod strategies;

pub use device::{device_name, test_device};
pub use generate::{seeded_data, seeded_tensor, tensor_from, to_vec};
pub use oracle::{HostTensor, naive_attention};

// The contract macros refer to these paths.
#[doc(hidden)]
pub use contract::__private;

/// Absolute tolerance for comparing two fp32 attention computations of the same math.
pub const ATOL: f32 = 1e-5;
/// Relative tolerance for comparing two fp32 attention computations of the same math.
pub const RTOL: f32 = 1e-4;

/// The largest elementwise `|a - b|` over two equally shaped tensors.
///
/// # Panics
/// If the shapes differ.
pub fn max_diff<const D: usize>(a: &burn::prelude::Tensor<D>, b: &burn::prelude::Tensor<D>) -> f32 {
    assert_eq!(a.dims(), b.dims(), "max_diff: shapes differ");
    let (a, b) = (to_vec(a), to_vec(b));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Asserts `|a - b| <= atol + rtol * |b|` elementwise, with a message naming the worst entry.
///
/// # Panics
/// If the shapes differ or any entry is out of tolerance.
#[track_caller]
pub fn assert_close<const D: usize>(
    a: &burn::prelude::Tensor<D>,
    b: &burn::prelude::Tensor<D>,
    atol: f32,
    rtol: f32,
) {
    assert_eq!(a.dims(), b.dims(), "assert_close: shapes differ");
    assert_close_slices(&to_vec(a), &to_vec(b), atol, rtol);
}

/// [`assert_close`] on host slices.
///
/// # Panics
/// If the lengths differ or any entry is out of tolerance.
#[track_caller]
pub fn assert_close_slices(a: &[f32], b: &[f32], atol: f32, rtol: f32) {
    assert_eq!(a.len(), b.len(), "assert_close: lengths differ");
    let mut worst = (0usize, 0.0f32);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let excess = match (x.is_nan(), y.is_nan()) {
            (true, true) => f32::NEG_INFINITY,
            (false, false) => (x - y).abs() - (atol + rtol * y.abs()),
            _ => f32::INFINITY,
        };
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    assert!(
        worst.1 <= 0.0,
        "assert_close: entry {} differs: {} vs {} (atol {atol}, rtol {rtol})",
        worst.0,
        a[worst.0],
        b[worst.0]
    );
}

/// Environment variable that turns missing test data (shared fixtures, the real model and
/// text) from a skip into a failure; `.ci/run` sets it, so CI cannot pass by skipping.
pub const REQUIRE_DATA_ENV: &str = "KV_REQUIRE_TEST_DATA";

/// Reports that a test's data is absent: prints a `skipped:` line, or panics when
/// [`REQUIRE_DATA_ENV`] is `1`.
///
/// # Panics
/// When [`REQUIRE_DATA_ENV`] is `1`.
#[track_caller]
pub fn missing_data(what: &str) {
    if std::env::var(REQUIRE_DATA_ENV).as_deref() == Ok("1") {
        panic!("required test data is missing ({REQUIRE_DATA_ENV}=1): {what}");
    }
    eprintln!("skipped: {what}");
}
