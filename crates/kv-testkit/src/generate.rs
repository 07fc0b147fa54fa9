//! Seeded, backend-independent data: values are drawn on the host, so every backend sees
//! the same numbers.

use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// `n` values uniform in `[-scale, scale)` from `seed`.
pub fn seeded_data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A tensor of the given shape with values uniform in `[-scale, scale)` from `seed`.
pub fn seeded_tensor<const D: usize>(
    shape: [usize; D],
    seed: u64,
    scale: f32,
    device: &Device,
) -> Tensor<D> {
    tensor_from(
        seeded_data(shape.iter().product(), seed, scale),
        shape,
        device,
    )
}

/// A tensor from host data.
///
/// # Panics
/// If `data.len()` is not the product of `shape`.
pub fn tensor_from<const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D> {
    assert_eq!(
        data.len(),
        shape.iter().product::<usize>(),
        "tensor_from: length vs shape"
    );
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// Reads a float tensor back as `Vec<f32>` (any float dtype).
pub fn to_vec<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.to_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("invariant: converted float data reads back as f32")
}
