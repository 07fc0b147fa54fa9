//! ThinK + KIVI (`KiviConfig::prune_ratio`): the channel choice on a hand-built case, pruned
//! keys equal to KIVI's on the kept channels, decode spills pruned with the same channels,
//! the memory formula and bad configs.

use burn::prelude::*;
use kv_core::{
    KvBlock, KvCache, KvShape, Query, StatsRequest, StorageDtype, memory_matches_buffers,
};
use kv_quant::{BitWidth, GroupAxis, KiviConfig, QuantSpec};
use kv_testkit::{assert_close, seeded_tensor, test_device, to_vec};

fn shape() -> KvShape {
    KvShape::new(2, 2, 6, 8).expect("valid")
}

// G = 4, R = 4, half the key channels pruned, scored by the last 4 queries: the contract's
// prefill, decode and bad-input checks over the pruned store.
kv_testkit::kv_cache_contract!(think_kivi2, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        KiviConfig::new(shape())
            .with_group(4)
            .with_residual(4)
            .with_key_pruning(0.5, 4)
            .init(d)
            .expect("init"),
    )
});

fn block(s: KvShape, n: usize, start: u32, seed: u64, d: &Device) -> (Tensor<4>, KvBlock) {
    let dims = [s.batch(), s.kv_heads(), n, s.head_dim()];
    let k = seeded_tensor(dims, seed, 1.0, d);
    let v = seeded_tensor(dims, seed + 1, 1.0, d);
    (k.clone(), KvBlock::contiguous(k, v, start).expect("block"))
}

fn channel(t: &Tensor<4>, c: usize) -> Vec<f32> {
    let [b, h, n, _] = t.dims();
    to_vec(&t.clone().slice([0..b, 0..h, 0..n, c..c + 1]))
}

/// One KV head, GQA group 2, `d = 4`, `λ = 0.5`: channel scores `mean(q²) · mean(k²)` are
/// `[1·4, 9·1, 1·1, 0.25·100] = [4, 9, 1, 25]`, so channels 1 and 3 stay.
#[test]
fn kept_channels_follow_thinks_score() {
    let d = test_device();
    let s = KvShape::new(1, 1, 2, 4).expect("valid");
    let mut c = KiviConfig::new(s)
        .with_group(4)
        .with_residual(4)
        .with_key_pruning(0.5, 2)
        .init(&d)
        .expect("init");
    // Keys: |k_c| constant over the 8 tokens, signs alternating: mean(k²) = [4, 1, 1, 100].
    let mags = [2.0f32, 1.0, 1.0, 10.0];
    let keys: Vec<f32> = (0..8)
        .flat_map(|t| mags.map(|m| if t % 2 == 0 { m } else { -m }))
        .collect();
    let k = Tensor::<1>::from_floats(keys.as_slice(), &d).reshape([1, 1, 8, 4]);
    let v = seeded_tensor([1, 1, 8, 4], 3, 1.0, &d);
    c.append(KvBlock::contiguous(k, v, 0).expect("block"))
        .expect("append");
    // Before end_prefill nothing is quantized: the keys wait for the channel choice.
    assert_eq!(c.quantized_key_tokens(), 0);
    // Queries of both heads, two tokens: mean(q²) = [1, 9, 1, 0.25] (the last two tokens).
    let qm = [1.0f32, 3.0, 1.0, 0.5];
    let q: Vec<f32> = (0..2)
        .flat_map(|_| (0..2).flat_map(|i| qm.map(|m| if i == 0 { m } else { -m })))
        .collect();
    let q = Tensor::<1>::from_floats(q.as_slice(), &d).reshape([1, 2, 2, 4]);
    c.attend(&Query::contiguous(q, 6).expect("query"), StatsRequest::NONE)
        .expect("attend");
    c.end_prefill().expect("end_prefill");
    assert_eq!(c.kept_key_channels(0, 0), Some(&[1u32, 3][..]));
    assert_eq!(c.quantized_key_tokens(), 8);
    // Pruned channels read back as zeros; kept ones as KIVI's dequantized keys.
    let view = c.view();
    assert!(channel(&view.keys, 0).iter().all(|&x| x == 0.0));
    assert!(channel(&view.keys, 2).iter().all(|&x| x == 0.0));
    let k3 = channel(&view.keys, 3);
    assert!(
        k3.iter()
            .zip(&keys.iter().skip(3).step_by(4).collect::<Vec<_>>())
            .all(|(a, b)| (a - **b).abs() < 1e-2)
    );
}

#[test]
fn pruned_keys_equal_kivi_on_the_kept_channels_through_decode() {
    let d = test_device();
    let s = KvShape::new(1, 2, 6, 8).expect("valid");
    let kivi = KiviConfig::new(s)
        .with_group(4)
        .with_residual(8)
        .with_scale_dtype(StorageDtype::F32)
        .with_residual_dtype(StorageDtype::F32);
    let mut plain = kivi.clone().init(&d).expect("init");
    let mut think = kivi.with_key_pruning(0.4, 4).init(&d).expect("init");
    let (k0, blk) = block(s, 21, 0, 5, &d);
    plain.append(blk.clone()).expect("append");
    think.append(blk).expect("append");
    let q = Query::contiguous(seeded_tensor([1, 6, 3, 8], 9, 1.0, &d), 18).expect("query");
    think.attend(&q, StatsRequest::NONE).expect("attend");
    plain.attend(&q, StatsRequest::NONE).expect("attend");
    think.end_prefill().expect("end_prefill");
    plain.end_prefill().expect("end_prefill");
    let mut all = vec![k0];
    for step in 0..9u32 {
        let (k, blk) = block(s, 1, 21 + step, 40 + u64::from(step) * 2, &d);
        all.push(k);
        plain.append(blk.clone()).expect("append");
        think.append(blk).expect("append");
    }
    think.end_prefill().expect("drop pending");
    plain.end_prefill().expect("drop pending");
    // 30 tokens, R = 8: 24 quantized keys (16 at prefill, 8 in decode), 6 in the window.
    assert_eq!(think.quantized_key_tokens(), 24);
    assert_eq!(think.full_key_tokens(), 6);
    let (tv, pv) = (think.view(), plain.view());
    assert_eq!(
        to_vec(&tv.values),
        to_vec(&pv.values),
        "values are plain KIVI"
    );
    // d − ⌊0.4·8⌋ = 5 channels kept per head.
    for h in 0..2 {
        let kept = think.kept_key_channels(0, h).expect("decided").to_vec();
        assert_eq!(kept.len(), 5);
        let pick = |t: &Tensor<4>, c: usize, r: core::ops::Range<usize>| {
            to_vec(&t.clone().slice([0..1, h..h + 1, r, c..c + 1]))
        };
        for c in 0..8 {
            let quantized = pick(&tv.keys, c, 0..24);
            if kept.contains(&(c as u32)) {
                // Same groups of G tokens per channel: the same codes, scales and zeros.
                assert_eq!(quantized, pick(&pv.keys, c, 0..24), "head {h} channel {c}");
            } else {
                assert!(quantized.iter().all(|&x| x == 0.0), "head {h} channel {c}");
            }
            // The window keeps every channel exactly.
            let k_all = Tensor::cat(all.clone(), 2);
            assert_eq!(pick(&tv.keys, c, 24..30), pick(&k_all, c, 24..30));
        }
    }
    // Attention on the pruned store equals the reference over its view.
    let q = Query::contiguous(seeded_tensor([1, 6, 1, 8], 77, 2.0, &d), 30).expect("query");
    let got = think.attend(&q, StatsRequest::NONE).expect("attend").output;
    let want = think.view().attend_reference(&q, StatsRequest::NONE).output;
    assert_close(&got, &want, 1e-5, 1e-4);
}

#[test]
fn memory_follows_the_formula_with_pruning() {
    let d = test_device();
    let s = KvShape::new(2, 3, 9, 64).expect("valid");
    for (ratio, t) in [(0.4, 300), (0.5, 128), (0.25, 50)] {
        let cfg = KiviConfig::new(s).with_key_pruning(ratio, 32);
        let mut c = cfg.init(&d).expect("init");
        let (_, blk) = block(s, t, 0, 11, &d);
        c.append(blk).expect("append");
        let q = Query::contiguous(seeded_tensor([2, 9, 4, 64], 3, 1.0, &d), t as u32 - 4)
            .expect("query");
        c.attend(&q, StatsRequest::NONE).expect("attend");
        c.end_prefill().expect("end_prefill");
        memory_matches_buffers(&c).expect("memory == held buffers");
        assert_eq!(
            c.memory().stored_bytes(),
            cfg.stored_bytes(t).expect("formula"),
            "λ {ratio}, {t} tokens"
        );
    }
    // KIVI-2 keys on 64 − ⌊25.6⌋ = 39 channels (λ = 0.4): fewer bytes than plain KIVI-2.
    let plain = KiviConfig::new(s).stored_bytes(1024).expect("formula");
    let think = KiviConfig::new(s)
        .with_key_pruning(0.4, 32)
        .stored_bytes(1024)
        .expect("formula");
    let spec = QuantSpec::new(BitWidth::new(2).expect("2 bits"), 32, GroupAxis::Tokens)
        .expect("spec")
        .with_scale_dtype(StorageDtype::F16);
    let keys = |dk: usize| spec.stored_bytes([2, 3, 1024, dk]);
    assert_eq!(plain - think, keys(64) - keys(39) - 2 * 2 * 3 * 39 * 4);
}

#[test]
fn bad_pruning_configs_are_rejected_clearly() {
    let d = test_device();
    let base = KiviConfig::new(shape()).with_group(4).with_residual(4);
    let e = base
        .clone()
        .with_key_pruning(1.0, 4)
        .init(&d)
        .expect_err("λ = 1");
    assert!(e.to_string().contains("[0, 1)"), "{e}");
    let e = base
        .clone()
        .with_key_pruning(0.5, 0)
        .init(&d)
        .expect_err("no window");
    assert!(e.to_string().contains("prune_window"), "{e}");
    let e = base
        .clone()
        .with_key_pruning(0.5, 4)
        .with_sinks(2)
        .init(&d)
        .expect_err("sinks");
    assert!(e.to_string().contains("sinks"), "{e}");
    let e = KiviConfig::from_params(shape(), [("prune", "half")]).expect_err("not a number");
    assert!(e.to_string().contains("prune"), "{e}");
    let cfg = KiviConfig::from_params(shape(), [("prune", "0.4"), ("prune_window", "8")])
        .expect("parses");
    assert_eq!((cfg.prune_ratio, cfg.prune_window), (0.4, 8));
}
