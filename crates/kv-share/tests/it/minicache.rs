//! MiniCache: SLERP, exact zero-merge, magnitudes, memory and the cache contract.

use burn::prelude::*;
use kv_core::{
    DenseCacheConfig, HeldBuffer, KvBlock, KvCache, KvError, KvShape, KvView, LayerCaches, Lengths,
    MemoryReport, Query, StatsRequest, memory_matches_buffers,
};
use kv_share::{MiniCacheConfig, slerp};
use kv_testkit::{assert_close, kv_cache_contract, max_diff, seeded_tensor, test_device, to_vec};

fn shape() -> KvShape {
    KvShape::new(2, 2, 4, 8).expect("shape")
}

/// Feeds `n` tokens to every layer: layer `l` gets its own keys and values (seeded), with
/// layer 1 a noisy copy of layer 0 so that directions mostly agree.
fn feed(caches: &mut LayerCaches, n: usize, start: u32, seed: u64) -> Vec<(Tensor<4>, Tensor<4>)> {
    let d = test_device();
    let s = shape();
    let dims = [s.batch(), s.kv_heads(), n, s.head_dim()];
    let base_k = seeded_tensor(dims, seed, 1.0, &d);
    let base_v = seeded_tensor(dims, seed + 1, 1.0, &d);
    let mut out = Vec::new();
    for l in 0..caches.len() {
        let k =
            base_k.clone() * (1.0 + l as f32) + seeded_tensor(dims, seed + 10 + l as u64, 0.2, &d);
        let v = base_v.clone() + seeded_tensor(dims, seed + 20 + l as u64, 0.2, &d);
        let blk = KvBlock::contiguous(k.clone(), v.clone(), start).expect("block");
        caches
            .layer_mut(l)
            .expect("layer")
            .append(blk)
            .expect("append");
        out.push((k, v));
    }
    out
}

fn norms(t: &Tensor<4>) -> Vec<f32> {
    let d = t.dims()[3];
    to_vec(t)
        .chunks(d)
        .map(|c| c.iter().map(|x| x * x).sum::<f32>().sqrt())
        .collect()
}

#[test]
fn slerp_of_identical_and_orthogonal_directions() {
    let a = [0.6f32, 0.8, 0.0];
    let (e, d) = slerp(&a, &a, 0.6);
    assert!(d.abs() < 1e-3);
    for (x, y) in e.iter().zip(a) {
        assert!((x - y).abs() < 1e-6);
    }
    let (e, d) = slerp(&[1.0, 0.0], &[0.0, 1.0], 0.5);
    assert!((d - 0.5).abs() < 1e-6, "orthogonal is half of pi");
    let h = core::f32::consts::FRAC_1_SQRT_2;
    assert!((e[0] - h).abs() < 1e-6 && (e[1] - h).abs() < 1e-6);
    // t = 0 and t = 1 return the ends; antipodal input still gives a unit vector.
    let (e, _) = slerp(&[1.0, 0.0], &[0.0, 1.0], 1.0);
    assert!((e[1] - 1.0).abs() < 1e-6);
    let (e, d) = slerp(&[1.0, 0.0], &[-1.0, 0.0], 0.5);
    assert!((d - 1.0).abs() < 1e-6);
    assert!((e.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
}

/// Runs a 64-token prefill + end_prefill + one decode step on MiniCache and on dense caches
/// fed the same data; returns (MiniCache, dense) and their memory after prefill.
fn run_mem(cfg: &MiniCacheConfig) -> (LayerCaches, LayerCaches, MemoryReport, MemoryReport) {
    let d = test_device();
    let mut mini = cfg.init(&d).expect("init");
    let s = cfg.shape;
    let mut dense = LayerCaches::try_from_fn(cfg.num_layers, |_| {
        Ok(Box::new(DenseCacheConfig::new(s).init(&d)?) as Box<dyn KvCache>)
    })
    .expect("dense");
    let mut mem = Vec::new();
    for c in [&mut mini, &mut dense] {
        feed(c, 64, 0, 7);
        c.end_prefill().expect("end_prefill");
        mem.push(c.memory());
        feed(c, 1, 64, 70);
    }
    (mini, dense, mem[0], mem[1])
}

fn run(cfg: &MiniCacheConfig) -> (LayerCaches, LayerCaches) {
    let (a, b, _, _) = run_mem(cfg);
    (a, b)
}

#[test]
fn zero_merge_reproduces_the_cache_exactly() {
    // No layer merged: the start layer is past the model.
    let (mini, dense) = run(&MiniCacheConfig::new(shape(), 3).with_start_layer(3));
    for l in 0..3 {
        let (a, b) = (
            mini.layer(l).unwrap().view(),
            dense.layer(l).unwrap().view(),
        );
        assert_eq!(max_diff(&a.keys, &b.keys), 0.0);
        assert_eq!(a.positions, b.positions);
    }
    // Merged, but gamma = 1 retains every token: the views are the originals.
    let (mini, dense) = run(&MiniCacheConfig::new(shape(), 2)
        .with_start_layer(0)
        .with_gamma(1.0));
    assert_eq!(
        mini.layer(1).unwrap().memory().logical_tokens,
        dense.layer(1).unwrap().memory().logical_tokens
    );
    for l in 0..2 {
        let (a, b) = (
            mini.layer(l).unwrap().view(),
            dense.layer(l).unwrap().view(),
        );
        assert_eq!(max_diff(&a.keys, &b.keys), 0.0, "layer {l} keys");
        assert_eq!(max_diff(&a.values, &b.values), 0.0, "layer {l} values");
        assert_eq!(a.positions, b.positions);
    }
}

#[test]
fn magnitudes_are_restored_and_memory_shrinks() {
    let cfg = MiniCacheConfig::new(shape(), 2)
        .with_start_layer(0)
        .with_gamma(0.0);
    let (mini, dense, m, dn) = run_mem(&cfg);
    for l in 0..2 {
        let (a, b) = (
            mini.layer(l).unwrap().view(),
            dense.layer(l).unwrap().view(),
        );
        let (na, nb) = (norms(&a.keys), norms(&b.keys));
        for (x, y) in na.iter().zip(&nb) {
            assert!((x - y).abs() <= 1e-5 * y.max(1.0), "norm {x} vs {y}");
        }
        let (na, nb) = (norms(&a.values), norms(&b.values));
        for (x, y) in na.iter().zip(&nb) {
            assert!((x - y).abs() <= 1e-5 * y.max(1.0), "norm {x} vs {y}");
        }
        // Merged, so not identical (the layers differ by noise).
        assert!(max_diff(&a.keys, &b.keys) > 0.0);
        memory_matches_buffers(mini.layer(l).unwrap()).unwrap();
    }
    assert_eq!(m.logical_elements, dn.logical_elements);
    // Per merged token and stream: d + 2 magnitudes instead of 2 d, for K and V.
    assert!(
        (m.stored_bytes() as f64) < 0.7 * dn.stored_bytes() as f64,
        "MiniCache {} vs dense {}",
        m.stored_bytes(),
        dn.stored_bytes()
    );
    // gamma > 0 retains some tokens (more memory than gamma = 0, still less than dense).
    let (_, _, m5, _) = run_mem(&cfg.clone().with_gamma(0.3));
    let s5 = m5.stored_bytes();
    assert!(s5 > m.stored_bytes() && s5 < dn.stored_bytes());
}

#[test]
fn identical_layers_merge_losslessly_and_attention_matches() {
    let d = test_device();
    let cfg = MiniCacheConfig::new(shape(), 2)
        .with_start_layer(0)
        .with_gamma(0.0);
    let mut mini = cfg.init(&d).unwrap();
    let k = seeded_tensor([2, 2, 9, 8], 3, 1.0, &d);
    let v = seeded_tensor([2, 2, 9, 8], 4, 1.0, &d);
    for l in 0..2 {
        let blk = KvBlock::contiguous(k.clone() * (l as f32 + 1.0), v.clone(), 0).unwrap();
        mini.layer_mut(l).unwrap().append(blk).unwrap();
    }
    mini.end_prefill().unwrap();
    let q = Query::contiguous(seeded_tensor([2, 4, 2, 8], 5, 1.0, &d), 7).unwrap();
    for l in 0..2 {
        let c = mini.layer_mut(l).unwrap();
        let view = c.view();
        assert_close(&view.keys, &(k.clone() * (l as f32 + 1.0)), 1e-5, 1e-5);
        assert_close(&view.values, &v, 1e-5, 1e-5);
        let got = c.attend(&q, StatsRequest::NONE).unwrap().output;
        let want = view.attend_reference(&q, StatsRequest::NONE).output;
        assert_close(&got, &want, 1e-6, 1e-6);
    }
}

#[test]
fn configs_are_validated() {
    let s = shape();
    let bad = |c: MiniCacheConfig| match c.init(&test_device()) {
        Err(KvError::InvalidConfig { field, .. }) => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    assert_eq!(bad(MiniCacheConfig::new(s, 4).with_t(1.5)), "t");
    assert_eq!(bad(MiniCacheConfig::new(s, 4).with_gamma(-0.1)), "gamma");
    assert_eq!(
        bad(MiniCacheConfig::new(s, 4).with_start_layer(5)),
        "start_layer"
    );
    assert_eq!(bad(MiniCacheConfig::new(s, 0)), "num_layers");
    assert_eq!(MiniCacheConfig::new(s, 30).pairs().first(), Some(&(15, 16)));
    assert_eq!(MiniCacheConfig::new(s, 30).pairs().len(), 7);
    let cfg =
        MiniCacheConfig::from_params(s, 30, [("start", "10"), ("gamma", "0.1"), ("dtype", "f16")])
            .unwrap();
    assert_eq!((cfg.start(), cfg.gamma), (10, 0.1));
    assert!(MiniCacheConfig::from_params(s, 30, [("nope", "1")]).is_err());
    assert!(MiniCacheConfig::from_params(s, 30, [("t", "x")]).is_err());
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(serde_json::from_str::<MiniCacheConfig>(&json).unwrap(), cfg);
}

/// One layer of a merged pair, driven with its partner: every call goes to both layers
/// (the partner gets keys scaled by 2 and values halved), reports come from side 1.
#[derive(Debug)]
struct Pair(Vec<Box<dyn KvCache>>);

impl KvCache for Pair {
    fn shape(&self) -> KvShape {
        self.0[1].shape()
    }
    fn device(&self) -> &Device {
        self.0[1].device()
    }
    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        let (k, v, p) = block.clone().into_parts();
        self.0[1].append(block)?;
        self.0[0].append(KvBlock::new(k * 2.0, v * 0.5, p)?)
    }
    fn attend(&mut self, q: &Query, stats: StatsRequest) -> kv_core::Result<kv_core::Attended> {
        self.0[1].attend(q, stats)
    }
    fn end_prefill(&mut self) -> kv_core::Result<()> {
        self.0[0].end_prefill()?;
        self.0[1].end_prefill()
    }
    fn view(&self) -> KvView {
        self.0[1].view()
    }
    fn lengths(&self) -> Lengths {
        self.0[1].lengths()
    }
    fn memory(&self) -> MemoryReport {
        self.0[1].memory()
    }
    fn held_buffers(&self) -> Vec<HeldBuffer> {
        self.0[1].held_buffers()
    }
    fn reset(&mut self) {
        self.0[0].reset();
        self.0[1].reset();
    }
}

fn pair(d: &Device, gamma: f32) -> Box<dyn KvCache> {
    let cfg = MiniCacheConfig::new(KvShape::new(2, 2, 4, 4).unwrap(), 2)
        .with_start_layer(0)
        .with_gamma(gamma);
    Box::new(Pair(cfg.init_layers(d).expect("init")))
}

kv_cache_contract!(minicache_pair, |d: &Device| pair(d, 0.0));
kv_cache_contract!(minicache_pair_retaining, |d: &Device| pair(d, 0.5));
