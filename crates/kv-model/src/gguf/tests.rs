//! Unit tests for the GGUF reader: an in-memory writer, metadata and dequantization round trips
//! against hand-computed values, malformed-input errors, and a seeded no-panic fuzz loop.

use super::*;

/// Builds GGUF files in memory (test-only; the crate does not write GGUF).
pub(crate) struct GgufWriter {
    version: u32,
    alignment: usize,
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl GgufWriter {
    pub(crate) fn new() -> Self {
        Self {
            version: 3,
            alignment: 32,
            kv: Vec::new(),
            n_kv: 0,
            infos: Vec::new(),
            n_tensors: 0,
            data: Vec::new(),
        }
    }

    /// A key with a raw value: type tag plus already-encoded bytes.
    pub(crate) fn kv_raw(&mut self, key: &str, tag: u32, value: &[u8]) -> &mut Self {
        put_str(&mut self.kv, key);
        self.kv.extend_from_slice(&tag.to_le_bytes());
        self.kv.extend_from_slice(value);
        self.n_kv += 1;
        self
    }

    pub(crate) fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv_raw(key, 4, &v.to_le_bytes())
    }

    pub(crate) fn kv_f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.kv_raw(key, 6, &v.to_le_bytes())
    }

    pub(crate) fn kv_bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.kv_raw(key, 7, &[u8::from(v)])
    }

    pub(crate) fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
        let mut b = Vec::new();
        put_str(&mut b, v);
        self.kv_raw(key, 8, &b)
    }

    pub(crate) fn kv_str_array<S: AsRef<str>>(&mut self, key: &str, items: &[S]) -> &mut Self {
        let mut b = 8u32.to_le_bytes().to_vec();
        b.extend_from_slice(&(items.len() as u64).to_le_bytes());
        for s in items {
            put_str(&mut b, s.as_ref());
        }
        self.kv_raw(key, 9, &b)
    }

    /// Sets `general.alignment` and uses it for the data section.
    pub(crate) fn alignment(&mut self, a: u32) -> &mut Self {
        self.alignment = a as usize;
        self.kv_u32("general.alignment", a)
    }

    /// A tensor with dimensions in GGUF order (fastest first) and its stored bytes.
    pub(crate) fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, bytes: &[u8]) -> &mut Self {
        while !self.data.len().is_multiple_of(self.alignment) {
            self.data.push(0);
        }
        put_str(&mut self.infos, name);
        self.infos
            .extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend_from_slice(&d.to_le_bytes());
        }
        self.infos.extend_from_slice(&ty.to_le_bytes());
        self.infos
            .extend_from_slice(&(self.data.len() as u64).to_le_bytes());
        self.data.extend_from_slice(bytes);
        self.n_tensors += 1;
        self
    }

    pub(crate) fn finish(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.n_tensors.to_le_bytes());
        out.extend_from_slice(&self.n_kv.to_le_bytes());
        out.extend_from_slice(&self.kv);
        out.extend_from_slice(&self.infos);
        while !out.len().is_multiple_of(self.alignment) {
            out.push(0);
        }
        out.extend_from_slice(&self.data);
        out
    }
}

fn f16_bytes(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A small file with metadata of every kind and one tensor of each dequantizable type.
fn sample_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.kv_str("general.architecture", "llama")
        .kv_u32("llama.block_count", 2)
        .kv_f32("llama.rope.freq_base", 100000.0)
        .kv_bool("tokenizer.ggml.add_bos_token", false)
        .kv_str_array("tokenizer.ggml.tokens", &["a", "b", "Ġc"]);
    w.tensor("f32", &[3, 2], 0, &f32_bytes(&[0., 1., 2., 3., 4., 5.]));
    w.tensor("q4_1", &[32], 3, &q4_1_block());
    w.tensor(
        "q8_0",
        &[32, 2],
        8,
        &[q8_0_block(0.25), q8_0_block(-1.0)].concat(),
    );
    w.finish()
}

/// Q4_1 block with d = 0.5, m = -1, low nibbles 0..16 and high nibbles 15..=0.
fn q4_1_block() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&f16_bytes(0.5));
    b.extend_from_slice(&f16_bytes(-1.0));
    b.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
    b
}

/// Q8_0 block with scale `d` and quants -16..16.
fn q8_0_block(d: f32) -> Vec<u8> {
    let mut b = f16_bytes(d).to_vec();
    b.extend((-16i8..16).map(|q| q as u8));
    b
}

#[test]
fn metadata_round_trips_with_typed_getters() {
    let f = GgufFile::from_bytes(sample_file()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), DEFAULT_ALIGNMENT);
    assert_eq!(f.data_offset() % 32, 0);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 2);
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert!(!f.get_bool("tokenizer.ggml.add_bos_token").unwrap());
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap(),
        ["a", "b", "Ġc"]
    );
    let keys: Vec<_> = f.metadata_entries().map(|(k, _)| k).collect();
    assert_eq!(keys[0], "general.architecture");
    assert_eq!(keys.len(), 5);
    assert!(matches!(
        f.get_u32("general.architecture"),
        Err(ModelError::MetadataType {
            found: "string",
            ..
        })
    ));
    assert!(matches!(f.get_str("nope"), Err(ModelError::MissingMetadata(k)) if k == "nope"));
    assert_eq!(
        f.tensor_names().collect::<Vec<_>>(),
        ["f32", "q4_1", "q8_0"]
    );
}

#[test]
fn every_scalar_and_array_type_parses() {
    let mut w = GgufWriter::new();
    w.kv_raw("u8", 0, &[200])
        .kv_raw("i8", 1, &[0xFF])
        .kv_raw("u16", 2, &700u16.to_le_bytes())
        .kv_raw("i16", 3, &(-700i16).to_le_bytes())
        .kv_raw("i32", 5, &(-5i32).to_le_bytes())
        .kv_raw("u64", 10, &(1u64 << 40).to_le_bytes())
        .kv_raw("i64", 11, &(-3i64).to_le_bytes())
        .kv_raw("f64", 12, &0.125f64.to_le_bytes());
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&3u64.to_le_bytes());
    for v in [7u32, 8, 9] {
        arr.extend_from_slice(&v.to_le_bytes());
    }
    w.kv_raw("u32s", 9, &arr);
    // An array of two arrays of i8.
    let mut nested = 9u32.to_le_bytes().to_vec();
    nested.extend_from_slice(&2u64.to_le_bytes());
    for inner in [[1u8, 2].as_slice(), &[0xFE]] {
        nested.extend_from_slice(&1u32.to_le_bytes());
        nested.extend_from_slice(&(inner.len() as u64).to_le_bytes());
        nested.extend_from_slice(inner);
    }
    w.kv_raw("nested", 9, &nested);
    let f = GgufFile::from_bytes(w.finish()).unwrap();
    assert_eq!(f.metadata("u8"), Some(&GgufValue::U8(200)));
    assert_eq!(f.metadata("i8"), Some(&GgufValue::I8(-1)));
    assert_eq!(f.metadata("u16"), Some(&GgufValue::U16(700)));
    assert_eq!(f.metadata("i16"), Some(&GgufValue::I16(-700)));
    assert_eq!(f.metadata("i32"), Some(&GgufValue::I32(-5)));
    assert_eq!(f.get_u64("u64").unwrap(), 1 << 40);
    assert!(f.get_u32("u64").is_err(), "2^40 does not fit in u32");
    assert!(f.get_u32("i64").is_err(), "negative does not fit in u32");
    assert_eq!(f.get_f32("f64").unwrap(), 0.125);
    assert_eq!(
        f.metadata("u32s"),
        Some(&GgufValue::Array(GgufArray::U32(vec![7, 8, 9])))
    );
    let expected = GgufArray::Array(vec![GgufArray::I8(vec![1, 2]), GgufArray::I8(vec![-2])]);
    assert_eq!(
        f.metadata("nested").and_then(GgufValue::as_array),
        Some(&expected)
    );
    assert_eq!(expected.len(), 2);
    assert_eq!(expected.elem_type(), GgufValueType::Array);
}

#[test]
fn f32_tensor_shape_is_reversed_to_row_major() {
    let f = GgufFile::from_bytes(sample_file()).unwrap();
    let info = f.tensor_info("f32").unwrap();
    assert_eq!(info.gguf_dims(), [3, 2]);
    assert_eq!(info.shape(), [2, 3]);
    assert_eq!(info.n_bytes(), 24);
    let t = f.tensor_f32("f32").unwrap();
    assert_eq!(t.shape, [2, 3]);
    assert_eq!(t.row(1).unwrap(), [3., 4., 5.]);
    assert!(matches!(
        f.tensor_f32("missing"),
        Err(ModelError::MissingTensor(_))
    ));
}

#[test]
fn q4_1_block_dequantizes_to_hand_computed_weights() {
    let f = GgufFile::from_bytes(sample_file()).unwrap();
    let t = f.tensor_f32("q4_1").unwrap();
    assert_eq!(t.shape, [32]);
    // w[j] = (qs[j] & 15) * 0.5 - 1 = j / 2 - 1; w[j + 16] = (qs[j] >> 4) * 0.5 - 1.
    for j in 0..16 {
        assert_eq!(t.data[j], j as f32 * 0.5 - 1.0, "low nibble {j}");
        assert_eq!(
            t.data[j + 16],
            (15 - j) as f32 * 0.5 - 1.0,
            "high nibble {j}"
        );
    }
    assert_eq!(t.data[0], -1.0);
    assert_eq!(t.data[15], 6.5);
    assert_eq!(t.data[16], 6.5);
}

#[test]
fn q8_0_blocks_dequantize_per_block_scale() {
    let f = GgufFile::from_bytes(sample_file()).unwrap();
    let t = f.tensor_f32("q8_0").unwrap();
    assert_eq!(t.shape, [2, 32]);
    assert_eq!(t.data[0], -4.0);
    assert_eq!(t.data[31], 15.0 * 0.25);
    assert_eq!(t.row(1).unwrap()[0], 16.0);
    assert_eq!(t.row(1).unwrap()[17], -1.0);
}

#[test]
fn q4_0_block() {
    let mut b = f16_bytes(2.0).to_vec();
    b.extend((0u8..16).map(|j| j | (15 << 4)));
    let w = dequantize(GgmlType::Q4_0, &b).unwrap();
    assert_eq!(w.len(), 32);
    assert_eq!(w[0], -16.0); // (0 - 8) * 2
    assert_eq!(w[8], 0.0);
    assert_eq!(w[15], 14.0);
    assert!(w[16..].iter().all(|&x| x == 14.0)); // (15 - 8) * 2
}

/// Packs 32 five-bit values into a Q5 payload: `qh` bit k holds value k's fifth bit; `qs[j]`
/// holds values j (low nibble) and j + 16 (high nibble).
fn pack_q5(v: &[u8; 32]) -> ([u8; 4], [u8; 16]) {
    let mut qh = 0u32;
    let mut qs = [0u8; 16];
    for k in 0..32 {
        qh |= u32::from(v[k] >> 4) << k;
    }
    for j in 0..16 {
        qs[j] = (v[j] & 15) | ((v[j + 16] & 15) << 4);
    }
    (qh.to_le_bytes(), qs)
}

#[test]
fn q5_0_block() {
    let v: [u8; 32] = std::array::from_fn(|k| k as u8);
    let (qh, qs) = pack_q5(&v);
    let b = [f16_bytes(1.5).as_slice(), &qh, &qs].concat();
    let w = dequantize(GgmlType::Q5_0, &b).unwrap();
    for k in 0..32 {
        assert_eq!(w[k], (k as f32 - 16.0) * 1.5, "element {k}");
    }
    // A hand-packed block: only element 16 has its fifth bit (qh bit 16) and nibble 1.
    let mut b = f16_bytes(1.0).to_vec();
    b.extend_from_slice(&(1u32 << 16).to_le_bytes());
    b.extend_from_slice(&[0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let w = dequantize(GgmlType::Q5_0, &b).unwrap();
    assert_eq!(w[0], -16.0);
    assert_eq!(w[16], 1.0); // (16 | 1) - 16
}

#[test]
fn q5_1_block() {
    let v: [u8; 32] = std::array::from_fn(|k| 31 - k as u8);
    let (qh, qs) = pack_q5(&v);
    let b = [f16_bytes(0.5).as_slice(), &f16_bytes(0.25), &qh, &qs].concat();
    let w = dequantize(GgmlType::Q5_1, &b).unwrap();
    for k in 0..32 {
        assert_eq!(w[k], (31 - k) as f32 * 0.5 + 0.25, "element {k}");
    }
}

#[test]
fn f16_bf16_f64_plain_types() {
    let b: Vec<u8> = [1.5f32, -0.25].iter().flat_map(|&x| f16_bytes(x)).collect();
    assert_eq!(dequantize(GgmlType::F16, &b).unwrap(), [1.5, -0.25]);
    let b: Vec<u8> = [3.0f32, -2.0]
        .iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect();
    assert_eq!(dequantize(GgmlType::BF16, &b).unwrap(), [3.0, -2.0]);
    assert_eq!(
        dequantize(GgmlType::F64, &0.5f64.to_le_bytes()).unwrap(),
        [0.5]
    );
    assert!(matches!(
        dequantize(GgmlType::Q6_K, &[0; 210]),
        Err(ModelError::UnsupportedTensorType { .. })
    ));
    assert!(matches!(
        dequantize(GgmlType::Q8_0, &[0; 33]),
        Err(ModelError::Malformed { .. })
    ));
}

#[test]
fn ggml_type_ids_round_trip() {
    let mut known = 0;
    for id in 0..64 {
        if let Some(t) = GgmlType::from_id(id) {
            assert_eq!(t.id(), id);
            assert!(t.block_size() >= 1 && t.type_size() >= 1);
            known += 1;
        }
    }
    assert_eq!(known, 32);
    assert_eq!(GgmlType::Q4_1.name(), "Q4_1");
}

#[test]
fn custom_alignment_is_honoured() {
    let mut w = GgufWriter::new();
    w.alignment(64);
    w.tensor("a", &[1], 0, &f32_bytes(&[1.0]));
    w.tensor("b", &[2], 0, &f32_bytes(&[2.0, 3.0]));
    let f = GgufFile::from_bytes(w.finish()).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.tensor_info("b").unwrap().relative_offset(), 64);
    assert_eq!(f.tensor_f32("b").unwrap().data, [2.0, 3.0]);

    let mut w = GgufWriter::new();
    w.kv_u32("general.alignment", 48);
    assert!(matches!(
        GgufFile::from_bytes(w.finish()),
        Err(ModelError::Malformed { .. })
    ));
}

#[test]
fn version_2_is_read_and_others_are_rejected() {
    let mut w = GgufWriter::new();
    w.version = 2;
    w.kv_u32("x", 1);
    assert_eq!(GgufFile::from_bytes(w.finish()).unwrap().version(), 2);
    for v in [1u32, 4, 0x0300_0000] {
        w.version = v;
        assert!(matches!(
            GgufFile::from_bytes(w.finish()),
            Err(ModelError::UnsupportedVersion { version }) if version == v
        ));
    }
}

#[test]
fn malformed_headers_are_errors() {
    let malformed = |bytes: Vec<u8>| match GgufFile::from_bytes(bytes) {
        Err(ModelError::Malformed { .. }) => {}
        other => panic!("expected Malformed, got {other:?}"),
    };
    let mut bad_magic = sample_file();
    bad_magic[0] = b'X';
    malformed(bad_magic);
    malformed(Vec::new());
    // Counts far beyond the file.
    let mut huge = b"GGUF".to_vec();
    huge.extend_from_slice(&3u32.to_le_bytes());
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    huge.extend_from_slice(&0u64.to_le_bytes());
    malformed(huge.clone());
    huge[8..16].copy_from_slice(&0u64.to_le_bytes());
    huge[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    malformed(huge);
    // A string longer than the file.
    let mut w = GgufWriter::new();
    w.kv_raw("s", 8, &(1u64 << 40).to_le_bytes());
    malformed(w.finish());
    // An unknown value type and an array of them.
    let mut w = GgufWriter::new();
    w.kv_raw("t", 13, &[0; 8]);
    malformed(w.finish());
    let mut w = GgufWriter::new();
    w.kv_raw("t", 9, &[99, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    malformed(w.finish());
    // Duplicate key; invalid UTF-8 key; bool that is 2.
    let mut w = GgufWriter::new();
    w.kv_u32("k", 1).kv_u32("k", 2);
    malformed(w.finish());
    let mut w = GgufWriter::new();
    w.kv_raw("\u{80}", 7, &[1]);
    let mut bytes = w.finish();
    let at = 24 + 8; // the key's first byte
    bytes[at] = 0xFF;
    malformed(bytes);
    let mut w = GgufWriter::new();
    w.kv_raw("b", 7, &[2]);
    malformed(w.finish());
    // Too many dimensions; a partial quantization block; duplicate tensor names.
    let mut w = GgufWriter::new();
    w.tensor("t", &[1, 1, 1, 1, 1], 0, &[0; 4]);
    malformed(w.finish());
    let mut w = GgufWriter::new();
    w.tensor("t", &[16], 8, &[0; 34]);
    malformed(w.finish());
    let mut w = GgufWriter::new();
    w.tensor("t", &[1], 0, &[0; 4])
        .tensor("t", &[1], 0, &[0; 4]);
    malformed(w.finish());
}

#[test]
fn tensor_errors_name_the_tensor() {
    // Unknown ggml type id.
    let mut w = GgufWriter::new();
    w.tensor("weird", &[4], 5, &[0; 4]);
    assert!(matches!(
        GgufFile::from_bytes(w.finish()),
        Err(ModelError::UnsupportedTensorType { name, .. }) if name == "weird"
    ));
    // Data past the end of the file.
    let mut w = GgufWriter::new();
    w.tensor("big", &[4, 4], 0, &[0; 16]);
    assert!(matches!(
        GgufFile::from_bytes(w.finish()),
        Err(ModelError::TensorOutOfBounds { name, .. }) if name == "big"
    ));
    // Known but not dequantizable.
    let mut w = GgufWriter::new();
    w.tensor("k", &[256], 14, &[0; 210]);
    let f = GgufFile::from_bytes(w.finish()).unwrap();
    assert_eq!(f.tensor_bytes("k").unwrap().len(), 210);
    assert!(matches!(
        f.tensor_f32("k"),
        Err(ModelError::UnsupportedTensorType { name, dtype }) if name == "k" && dtype == "Q6_K"
    ));
}

#[test]
fn unaligned_tensor_offset_is_rejected() {
    let mut w = GgufWriter::new();
    w.tensor("a", &[1], 0, &[0; 4]);
    let mut bytes = w.finish();
    // The offset is the last u64 of the tensor info, just before the padding.
    let info_end = 24 + 8 + 1 + 4 + 8 + 4 + 8;
    bytes[info_end - 8] = 4;
    assert!(matches!(
        GgufFile::from_bytes(bytes),
        Err(ModelError::Malformed { .. })
    ));
}

#[test]
fn permute_to_rotate_half_on_a_tiny_matrix() {
    // One head, 4 rows, 1 column: interleaved pairs (0,1), (2,3) become halves [0,2 | 1,3].
    let t = HostTensor::new(vec![4, 1], vec![0., 1., 2., 3.]).unwrap();
    let p = llama_permute_to_rotate_half(&t, 1).unwrap();
    assert_eq!(p.data, [0., 2., 1., 3.]);
    // Two heads of 4 rows, 2 columns: each head is permuted on its own, columns move with rows.
    let t = HostTensor::new(vec![8, 2], (0..16).map(|x| x as f32).collect()).unwrap();
    let p = llama_permute_to_rotate_half(&t, 2).unwrap();
    let rows: Vec<f32> = p.data.chunks(2).map(|r| r[0] / 2.0).collect();
    assert_eq!(rows, [0., 2., 1., 3., 4., 6., 5., 7.]);
    assert!(p.data.chunks(2).all(|r| r[1] == r[0] + 1.0));
}

/// llama.cpp's conversion, HF -> GGUF: view `[h, 2, half, in]`, swap axes 1 and 2.
fn hf_to_llama_permute(t: &HostTensor, n_head: usize) -> HostTensor {
    let (out, inn) = (t.shape[0], t.shape[1]);
    let half = out / n_head / 2;
    let mut data = vec![0.; t.data.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let src = (h * out / n_head + j * half + i) * inn;
                let dst = (h * out / n_head + i * 2 + j) * inn;
                data[dst..dst + inn].copy_from_slice(&t.data[src..src + inn]);
            }
        }
    }
    HostTensor::new(t.shape.clone(), data).unwrap()
}

#[test]
fn permute_undoes_llama_cpp_conversion() {
    let hf = HostTensor::new(vec![24, 3], (0..72).map(|x| (x * 7 % 11) as f32).collect()).unwrap();
    for n_head in [1, 2, 3, 6] {
        let gguf = hf_to_llama_permute(&hf, n_head);
        assert_eq!(
            llama_permute_to_rotate_half(&gguf, n_head).unwrap(),
            hf,
            "n_head {n_head}"
        );
    }
    let bad = HostTensor::new(vec![6, 1], vec![0.; 6]).unwrap();
    assert!(matches!(
        llama_permute_to_rotate_half(&bad, 2),
        Err(ModelError::ShapeMismatch { .. })
    ));
    assert!(llama_permute_to_rotate_half(&bad, 0).is_err());
}

/// xorshift64: a tiny seeded generator for the fuzz loop.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Parses `bytes` and, when that succeeds, reads every tensor and key: none of it may panic.
fn exercise(bytes: Vec<u8>) -> bool {
    let Ok(f) = GgufFile::from_bytes(bytes) else {
        return false;
    };
    let names: Vec<String> = f.tensor_names().map(str::to_owned).collect();
    for n in &names {
        let _ = f.tensor_f32(n);
    }
    let keys: Vec<String> = f.metadata_entries().map(|(k, _)| k.to_owned()).collect();
    for k in &keys {
        let _ = (f.get_u32(k), f.get_f32(k), f.get_str(k), f.get_str_array(k));
    }
    true
}

#[test]
fn fuzz_truncations_and_mutations_never_panic() {
    let base = sample_file();
    // Every truncation.
    for len in 0..base.len() {
        // The last tensor's data runs to the end, so every truncation must fail.
        assert!(!exercise(base[..len].to_vec()), "truncated at {len} parsed");
    }
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut parsed = 0;
    // Random byte mutations (1-8 bytes), with a bias towards the header.
    for _ in 0..3000 {
        let mut bytes = base.clone();
        for _ in 0..1 + rng.below(8) {
            let limit = if rng.below(2) == 0 { 64 } else { bytes.len() };
            let at = rng.below(limit.min(bytes.len()));
            bytes[at] = match rng.below(4) {
                0 => 0xFF,
                1 => 0,
                _ => rng.next() as u8,
            };
        }
        parsed += usize::from(exercise(bytes));
    }
    assert!(
        parsed > 0,
        "some mutations (in tensor data) must still parse"
    );
    // Random bytes behind a valid magic and version.
    for _ in 0..2000 {
        let mut bytes = b"GGUF\x03\0\0\0".to_vec();
        let n = rng.below(200);
        bytes.extend((0..n).map(|_| {
            // Mostly small numbers so counts and lengths are sometimes plausible.
            if rng.below(3) == 0 {
                rng.next() as u8
            } else {
                rng.below(4) as u8
            }
        }));
        exercise(bytes);
    }
}
