//! `HostTensor`: a dense row-major `f32` array in host memory, the loaders' common output.

use crate::{ModelError, Result};

/// A dense `f32` tensor in host memory, row-major (C order): the **last** dimension is contiguous.
///
/// This is the order PyTorch, safetensors and Burn use. GGUF lists dimensions the other way round
/// (fastest first); the GGUF reader reverses them, so a GGUF tensor with dimensions `[576, 49152]`
/// becomes a `HostTensor` with `shape == [49152, 576]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, slowest first. An empty shape is a scalar (one element).
    pub shape: Vec<usize>,
    /// The elements, `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Makes a tensor, checking that `data` has exactly as many elements as `shape` describes.
    ///
    /// # Errors
    ///
    /// [`ModelError::ShapeMismatch`] when the element count differs (or the product overflows).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        match checked_numel(&shape) {
            Some(n) if n == data.len() => Ok(Self { shape, data }),
            _ => Err(ModelError::ShapeMismatch {
                what: "host tensor data length".to_owned(),
                expected: shape,
                found: vec![data.len()],
            }),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Row `r` of a rank-2 tensor, or `None` if the tensor is not rank 2 or `r` is out of range.
    pub fn row(&self, r: usize) -> Option<&[f32]> {
        match self.shape.as_slice() {
            &[rows, cols] if r < rows => self.data.get(r * cols..(r + 1) * cols),
            _ => None,
        }
    }
}

/// The product of `shape`, or `None` on overflow.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}
