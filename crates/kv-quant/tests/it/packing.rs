//! Bit packing: lossless round trips for every width and length, the documented layout, and
//! the byte accounting.

use burn::prelude::*;
use burn::tensor::DType;
use kv_quant::packing::{pack, pack_host, unpack, unpack_host};
use kv_quant::{BitWidth, QuantError};
use kv_testkit::test_device;
use proptest::prelude::*;

fn codes_tensor(codes: &[u32], rows: usize, n: usize, device: &Device) -> Tensor<2, Int> {
    let data: Vec<i32> = codes.iter().map(|&c| c as i32).collect();
    Tensor::<2, Int>::from_data(TensorData::new(data, [rows, n]), device)
}

fn read_u32(t: Tensor<2, Int>) -> Vec<u32> {
    t.into_data()
        .convert::<u32>()
        .try_into_vec::<u32>()
        .expect("u32 data")
}

fn case() -> impl Strategy<Value = (BitWidth, usize, usize, Vec<u32>)> {
    (0usize..5, 1usize..=3, 1usize..=70).prop_flat_map(|(w, rows, n)| {
        let bits = BitWidth::ALL[w];
        proptest::collection::vec(0..=bits.max_code(), rows * n)
            .prop_map(move |codes| (bits, rows, n, codes))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// pack then unpack gives the codes back, for every width and any length (padded tails),
    /// and the words match the host statement of the layout.
    #[test]
    fn round_trip_every_width_any_length((bits, rows, n, codes) in case()) {
        let d = test_device();
        let words = pack(codes_tensor(&codes, rows, n, &d), bits).expect("pack");
        prop_assert_eq!(words.dims(), [rows, bits.words_for(n)]);
        prop_assert_eq!(words.dtype(), DType::U32);
        let host_words: Vec<u32> = codes.chunks(n).flat_map(|r| pack_host(r, bits)).collect();
        prop_assert_eq!(read_u32(words.clone()), host_words.clone());
        let back = unpack(words, bits, n).expect("unpack");
        prop_assert_eq!(read_u32(back), codes.clone());
        let w = bits.words_for(n);
        let host_back: Vec<u32> = host_words.chunks(w).flat_map(|r| unpack_host(r, bits, n)).collect();
        prop_assert_eq!(host_back, codes);
    }
}

#[test]
fn layout_is_lsb_first_and_widths_are_documented() {
    let b2 = BitWidth::new(2).expect("2 bits");
    // codes 1, 2, 3 -> 1 | 2 << 2 | 3 << 4
    assert_eq!(pack_host(&[1, 2, 3], b2), vec![1 | (2 << 2) | (3 << 4)]);
    let per_word: Vec<usize> = BitWidth::ALL.iter().map(|b| b.codes_per_word()).collect();
    assert_eq!(per_word, vec![32, 16, 10, 8, 4]);
    // A 64-channel head: 3 bits take 7 words (28 bytes), 2 bits 4 words, 4 bits 8 words.
    let b3 = BitWidth::new(3).expect("3 bits");
    assert_eq!(b3.bytes_for(64), 28);
    assert_eq!(b2.bytes_for(64), 16);
    assert_eq!(BitWidth::new(4).expect("4 bits").bytes_for(64), 32);
    // The top code of every width survives (no sign trouble in the top bits).
    let d = test_device();
    for bits in BitWidth::ALL {
        let n = bits.codes_per_word();
        let codes = vec![bits.max_code(); n];
        let words = pack(codes_tensor(&codes, 1, n, &d), bits).expect("pack");
        let back = read_u32(unpack(words, bits, n).expect("unpack"));
        assert_eq!(back, codes, "{bits}");
    }
}

#[test]
fn bad_widths_and_shapes_are_rejected() {
    for bits in [0, 5, 6, 7, 16, 32] {
        assert!(matches!(
            BitWidth::new(bits),
            Err(QuantError::UnsupportedBits { .. })
        ));
    }
    let d = test_device();
    let b4 = BitWidth::new(4).expect("4 bits");
    let words = pack(codes_tensor(&[1; 9], 1, 9, &d), b4).expect("pack");
    // 2 words hold 9..=16 codes; asking for 17 or 8 is an error, not garbage.
    assert!(matches!(
        unpack(words.clone(), b4, 17),
        Err(QuantError::Incompatible { .. })
    ));
    assert!(matches!(
        unpack(words, b4, 8),
        Err(QuantError::Incompatible { .. })
    ));
}
