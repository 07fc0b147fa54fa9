//! The fused host kernels against the streamed tensor ops on the same cache and query.

use kv_core::{KvBlock, KvCache, KvShape, Query};
use kv_testkit::{assert_close, device_name, seeded_tensor, test_device};

use super::host_memory;
use super::kernels::{Decode, fast_layout};
use crate::{KiviConfig, QjlConfig};

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

/// Keys with spiky channels (every seventh channel ten times larger), so that outlier
/// groups pick real outliers and the outlier sketch carries weight.
fn spiky_keys(dims: [usize; 4], seed: u64, d: &burn::prelude::Device) -> burn::prelude::Tensor<4> {
    let mut data = kv_testkit::seeded_data(dims.iter().product(), seed, 1.0);
    for (i, x) in data.iter_mut().enumerate() {
        if (i % dims[3]) % 7 == 3 {
            *x *= 10.0;
        }
    }
    kv_testkit::tensor_from(data, dims, d)
}

/// Prefills `prefill` tokens, then decodes `steps` single tokens; after the prefill (the
/// pending block attended exactly), after `end_prefill` and after every decode append, the
/// fused host path must equal the streamed tensor ops on the same query.
fn check_qjl_fused(cfg: &QjlConfig, prefill: usize, steps: usize, seed: u64) {
    let d = test_device();
    let s = cfg.shape;
    let mut c = cfg.init(&d).expect("init");
    let kv = |n: usize, seed: u64| {
        let dims = [s.batch(), s.kv_heads(), n, s.head_dim()];
        (
            spiky_keys(dims, seed, &d),
            seeded_tensor(dims, seed + 1, 1.0, &d),
        )
    };
    let check = |c: &crate::QjlCache, next: u32, seed: u64| {
        let dims = [s.batch(), s.q_heads(), 1, s.head_dim()];
        let q = Query::contiguous(seeded_tensor(dims, seed, 2.0, &d), next).expect("query");
        let (fo, fl) = c.attend_fused(&q);
        let (so, sl) = c.attend_chunked(&q);
        assert_close(&fo, &so, 1e-5, 1e-4);
        assert_close(&fl, &sl, 1e-5, 1e-4);
    };
    let (k, v) = kv(prefill, seed);
    c.append(KvBlock::contiguous(k, v, 0).expect("block"))
        .expect("prefill");
    check(&c, prefill as u32, seed + 2);
    c.end_prefill().expect("end_prefill");
    check(&c, prefill as u32, seed + 3);
    for step in 0..steps {
        let p = (prefill + step) as u32;
        let (k, v) = kv(1, seed + 10 + 2 * step as u64);
        c.append(KvBlock::contiguous(k, v, p).expect("block"))
            .expect("decode");
        check(&c, p + 1, seed + 100 + step as u64);
    }
}

#[test]
fn fused_qjl_equals_streamed_tensor_ops() {
    // SmolLM2's layer (GQA 3, d 64) with the reference defaults (m = m_o = 256, 8 outliers,
    // G 32, R 128), outliers on and off: 300 tokens sketch 256 keys and keep 44 in the buffer,
    // then 90 decode steps fill the buffer to 128 and spill it once more mid-way.
    let s = KvShape::new(1, 3, 9, 64).expect("valid");
    check_qjl_fused(&QjlConfig::new(s), 300, 90, 1);
    check_qjl_fused(&QjlConfig::new(s).with_outliers(0), 300, 90, 2);
}

#[test]
fn fused_qjl_equals_streamed_tensor_ops_on_small_layouts() {
    // Two sequences, GQA 3 and 5 rows (blocks of four rows and a remainder), sketch widths
    // that leave padding bits in the last word (m = 40, m_o = 20), Gaussian rows, fp32
    // buffers, several spills of a 16-token buffer, and a cache still inside its buffer.
    let s = KvShape::new(2, 2, 6, 32).expect("valid");
    let small = QjlConfig::new(s)
        .with_sketch_dims(40, 20)
        .with_outliers(3)
        .with_group(8)
        .with_buffer(16);
    check_qjl_fused(&small, 45, 40, 3);
    check_qjl_fused(&small.clone().with_outliers(0), 45, 20, 4);
    check_qjl_fused(
        &small
            .clone()
            .with_orthogonal(false)
            .with_residual_dtype(kv_core::StorageDtype::F32),
        70,
        10,
        5,
    );
    check_qjl_fused(
        &small.clone().with_current_in_full_precision(false),
        33,
        20,
        6,
    );
    check_qjl_fused(&small, 5, 6, 7);
    let gqa5 = KvShape::new(1, 1, 5, 32).expect("valid");
    let cfg = QjlConfig::new(gqa5)
        .with_sketch_dims(64, 32)
        .with_outliers(2)
        .with_group(8)
        .with_buffer(16);
    check_qjl_fused(&cfg, 40, 20, 8);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn sign_kernel_equals_the_portable_loop() {
    use super::kernels::{SignPart, score_signs_generic};
    // Without AVX2 the portable loop is the only path (nothing to compare).
    if pulp::x86::V3::try_new().is_some() {
        let words = |n: usize, seed: u64| -> Vec<u32> {
            kv_testkit::seeded_data(n, seed, 1.0)
                .iter()
                .map(|x| (x.to_bits() ^ (x.to_bits() >> 7)).rotate_left(seed as u32))
                .collect()
        };
        let tokens = 37;
        for (win, wout) in [(8, 8), (2, 1), (1, 0), (3, 2)] {
            for rows in 1..=4 {
                let (qi, qo) = (
                    kv_testkit::seeded_data(rows * 32 * win, 1, 2.0),
                    kv_testkit::seeded_data(rows * 32 * wout, 2, 2.0),
                );
                let (wi, wo) = (words(tokens * win, 3), words(tokens * wout, 4));
                let (ni, no) = (
                    kv_testkit::seeded_data(tokens, 5, 1.0),
                    kv_testkit::seeded_data(tokens, 6, 1.0),
                );
                let mut parts = vec![SignPart {
                    words: &wi,
                    words_per_token: win,
                    query: &qi,
                    norms: &ni,
                }];
                if wout > 0 {
                    parts.push(SignPart {
                        words: &wo,
                        words_per_token: wout,
                        query: &qo,
                        norms: &no,
                    });
                }
                let stride = rows + 1;
                let mut want = vec![0.0f32; tokens * stride];
                let mut got = want.clone();
                score_signs_generic(&parts, tokens, rows, stride, &mut want);
                let kernel = match rows {
                    1 => super::kernels::score_signs::<1>,
                    2 => super::kernels::score_signs::<2>,
                    3 => super::kernels::score_signs::<3>,
                    _ => super::kernels::score_signs::<4>,
                };
                super::vectorized(KernelTask(|| kernel(&parts, tokens, stride, &mut got)));
                kv_testkit::assert_close_slices(&got, &want, 1e-4, 1e-5);
            }
        }
    }
}

/// Runs a closure inside [`super::vectorized`] (the kernels need the AVX2 context).
#[cfg(target_arch = "x86_64")]
struct KernelTask<F>(F);

#[cfg(target_arch = "x86_64")]
impl<F: FnOnce()> super::Task for KernelTask<F> {
    type Output = ();
    fn run(self) {
        (self.0)();
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
