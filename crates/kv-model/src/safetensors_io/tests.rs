//! Unit tests for the safetensors loader: dtype conversion and error cases.

use super::*;

/// A minimal safetensors file: header length, JSON header, data.
fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

#[test]
fn f16_bf16_and_f32_become_f32() {
    let mut data = Vec::new();
    data.extend_from_slice(&half::f16::from_f32(1.5).to_le_bytes());
    data.extend_from_slice(&half::f16::from_f32(-2.0).to_le_bytes());
    data.extend_from_slice(&half::bf16::from_f32(0.25).to_le_bytes());
    data.extend_from_slice(&3.5f32.to_le_bytes());
    let header = r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},
        "b":{"dtype":"BF16","shape":[1,1],"data_offsets":[4,6]},
        "c":{"dtype":"F32","shape":[1],"data_offsets":[6,10]}}"#;
    let map = parse_safetensors_f32(&file(header, &data)).unwrap();
    assert_eq!(map["a"], HostTensor::new(vec![2], vec![1.5, -2.0]).unwrap());
    assert_eq!(map["b"], HostTensor::new(vec![1, 1], vec![0.25]).unwrap());
    assert_eq!(map["c"].data, vec![3.5]);
}

#[test]
fn integer_tensor_is_unsupported() {
    let header = r#"{"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#;
    let err = parse_safetensors_f32(&file(header, &7i64.to_le_bytes())).unwrap_err();
    assert!(matches!(err, ModelError::UnsupportedTensorType { ref name, .. } if name == "ids"));
}

#[test]
fn truncated_file_is_an_error() {
    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    assert!(parse_safetensors_f32(&file(header, &[0u8; 8])).is_err());
    assert!(parse_safetensors_f32(&[1, 2, 3]).is_err());
}
