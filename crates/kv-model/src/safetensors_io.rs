//! Hugging Face safetensors weights read into host `f32` tensors (F32, F16, BF16 and F64).
//!
//! Names are kept as stored (`model.layers.0.self_attn.q_proj.weight`), shapes are row-major as
//! stored (`[out, in]` for a linear weight, PyTorch's convention). Integer tensors are rejected;
//! read those with the `safetensors` crate directly.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::{HostTensor, ModelError, Result};

#[cfg(test)]
mod tests;

/// Reads every tensor of the safetensors file at `path` as `f32`.
///
/// # Errors
///
/// [`ModelError::Io`] if the file cannot be read; otherwise as [`parse_safetensors_f32`].
pub fn load_safetensors_f32(path: impl AsRef<Path>) -> Result<BTreeMap<String, HostTensor>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    parse_safetensors_f32(&bytes)
}

/// Parses a safetensors file held in memory and converts every tensor to `f32`.
///
/// # Errors
///
/// [`ModelError::Safetensors`] if the header or offsets are invalid, and
/// [`ModelError::UnsupportedTensorType`] for any tensor whose dtype is not F32, F16, BF16 or F64.
pub fn parse_safetensors_f32(bytes: &[u8]) -> Result<BTreeMap<String, HostTensor>> {
    let st = SafeTensors::deserialize(bytes)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        let data = view_to_f32(view.dtype(), view.data()).ok_or_else(|| {
            ModelError::UnsupportedTensorType {
                name: name.to_owned(),
                dtype: view.dtype().to_string(),
            }
        })?;
        out.insert(
            name.to_owned(),
            HostTensor::new(view.shape().to_vec(), data)?,
        );
    }
    Ok(out)
}

/// Little-endian bytes of `dtype` to `f32`, or `None` for a dtype that is not a float type.
fn view_to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data
            .as_chunks::<4>()
            .0
            .iter()
            .map(|b| f32::from_le_bytes(*b))
            .collect(),
        Dtype::F16 => data
            .as_chunks::<2>()
            .0
            .iter()
            .map(|b| half::f16::from_le_bytes(*b).to_f32())
            .collect(),
        Dtype::BF16 => data
            .as_chunks::<2>()
            .0
            .iter()
            .map(|b| half::bf16::from_le_bytes(*b).to_f32())
            .collect(),
        Dtype::F64 => data
            .as_chunks::<8>()
            .0
            .iter()
            .map(|b| f64::from_le_bytes(*b) as f32)
            .collect(),
        _ => return None,
    })
}
