//! The fused host kernels against the streamed tensor ops on the same cache and query.

use kv_core::{KvBlock, KvCache, KvShape, Query};
use kv_testkit::{assert_close, device_name, seeded_tensor, test_device};

use super::host_memory;
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
