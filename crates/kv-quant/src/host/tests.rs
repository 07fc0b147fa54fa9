//! The fused host kernels against the streamed tensor ops on the same cache and query.

use kv_core::{KvBlock, KvCache, KvShape, Query};
use kv_testkit::{assert_close, device_name, seeded_tensor, test_device};

use super::host_memory;
use super::kernels::{Decode, fast_layout};
use crate::KiviConfig;

#[test]
fn host_memory_is_detected_on_cpu_backends_only() {
    let d = test_device();
    let name = device_name(&d);
    let cpu = name.contains("Flex") || name.contains("NdArray");
    assert_eq!(host_memory(&d), cpu, "device {name}");
}

#[test]
fn fused_kivi_equals_streamed_tensor_ops() {
    let d = test_device();
    let s = KvShape::new(1, 3, 9, 64).expect("valid");
    for bits in [2, 4] {
        let mut c = KiviConfig::new(s).with_bits(bits).init(&d).expect("init");
        let dims = [1, 3, 700, 64];
        let blk = KvBlock::contiguous(
            seeded_tensor(dims, 1, 1.0, &d),
            seeded_tensor(dims, 2, 1.0, &d),
            0,
        )
        .expect("block");
        c.append(blk).expect("append");
        c.end_prefill().expect("end_prefill");
        for step in 0..3u32 {
            let dims = [1, 3, 1, 64];
            let blk = KvBlock::contiguous(
                seeded_tensor(dims, 10 + u64::from(step), 1.0, &d),
                seeded_tensor(dims, 20 + u64::from(step), 1.0, &d),
                700 + step,
            )
            .expect("block");
            c.append(blk).expect("decode");
            let q = Query::contiguous(seeded_tensor([1, 9, 1, 64], 30, 2.0, &d), 700 + step)
                .expect("query");
            let (fo, fl) = c.attend_fused(&q);
            let (so, sl) = c.attend_chunked(&q);
            assert_close(&fo, &so, 1e-5, 1e-4);
            assert_close(&fl, &sl, 1e-5, 1e-4);
        }
    }
}

#[test]
fn register_kernels_take_the_common_layouts_with_avx2_only() {
    #[cfg(target_arch = "x86_64")]
    let avx2 = pulp::x86::V3::try_new().is_some();
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    let affine =
        |bits: u32, off: f32| -> Vec<f32> { (0..1u32 << bits).map(|c| c as f32 - off).collect() };
    let signed: Vec<f32> = (0..256).map(|c| f32::from(c as u8 as i8)).collect();
    // (bits, words per token, head_dim, levels, high plane, channel group, expected decode)
    let cases = [
        (
            2,
            4,
            64,
            affine(2, 0.0),
            false,
            None,
            Some(Decode::Affine(0.0)),
        ),
        (
            4,
            8,
            64,
            affine(4, 8.0),
            false,
            Some(32),
            Some(Decode::Affine(8.0)),
        ),
        (
            8,
            16,
            64,
            signed.clone(),
            false,
            Some(32),
            Some(Decode::Signed),
        ),
        (2, 2, 32, affine(2, 0.0), false, None, None),
        (8, 32, 128, affine(8, 0.0), false, None, None),
        (4, 8, 64, affine(4, 0.0), true, Some(32), None),
        (4, 8, 64, vec![0.5; 16], false, Some(32), None),
        (4, 4, 32, affine(4, 8.0), false, Some(4), None),
    ];
    for (bits, words, d, levels, high, group, want) in cases {
        let got = fast_layout(bits, words, d, &levels, high, group).map(|f| f.decode);
        let want = want.filter(|_| avx2);
        assert_eq!(
            got, want,
            "{bits} bits, {words} words, d {d}, group {group:?}"
        );
    }
}

#[test]
fn fp16_bits_convert_exactly() {
    // Every fp16 value, NaN payloads included, against the `half` crate.
    for bits in 0..=u16::MAX {
        let want = half::f16::from_bits(bits).to_f32();
        let got = super::f16_bits_to_f32(bits);
        if want.is_nan() {
            assert!(got.is_nan(), "{bits:#06x}: {got} is not NaN");
        } else {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{bits:#06x}: {got} != {want}"
            );
        }
    }
}
