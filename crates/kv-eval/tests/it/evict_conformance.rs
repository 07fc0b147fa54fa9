//! kv-evict against kvpress 0.5.5 (protocol of `shared/fixtures/README.md`: prefill with the
//! press active, compress once at the end of prefill, ratio 0.5).
//!
//! For every press: the kept positions per layer and KV head must equal kvpress's
//! `kept_idx_sorted`, except for tokens whose kvpress scores tie with the k-th kept score
//! (kvpress's `topk` picks arbitrarily among ties), and our scores must equal `L{i}.scores`
//! to 1e-4 relative. The tiny seeded model (96 of 128 tokens prefilled) runs every layer
//! through the harness's own `build_caches`; SmolLM2-135M (384 of 512 tokens, 30 layers) runs
//! when the GGUF is in the assets, else prints `skipped:`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use burn::prelude::*;
use kv_core::{
    Attended, HeldBuffer, KvBlock, KvCache, KvShape, KvView, LayerCaches, Lengths, MemoryReport,
    PAD, Query, StatsRequest,
};
use kv_eval::method::{MethodSpec, build_caches};
use kv_evict::{EvictConfig, EvictingCache, ScorerConfig};
use kv_model::safetensors_io::load_safetensors_f32;
use kv_model::{HostWeights, Llama, LlamaConfig};
use safetensors::{Dtype, SafeTensors};

fn fixture(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures")
        .join(rel);
    if p.is_file() {
        Some(p)
    } else {
        kv_testkit::missing_data(&format!("fixture {} is absent", p.display()));
        None
    }
}

/// The tensors of one fixture file: f32 as f32, int64 as i64.
struct Fixture {
    f32s: BTreeMap<String, Vec<f32>>,
    i64s: BTreeMap<String, Vec<i64>>,
}

fn read_fixture(path: &Path) -> Fixture {
    let bytes = std::fs::read(path).expect("fixture readable");
    let st = SafeTensors::deserialize(&bytes).expect("fixture parses");
    let (mut f32s, mut i64s) = (BTreeMap::new(), BTreeMap::new());
    for (name, view) in st.iter() {
        match view.dtype() {
            Dtype::F32 => {
                let v = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                f32s.insert(name.to_owned(), v);
            }
            Dtype::I64 => {
                let v = view
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect();
                i64s.insert(name.to_owned(), v);
            }
            _ => {}
        }
    }
    Fixture { f32s, i64s }
}

/// A forwarding handle, so that the test can read an [`EvictingCache`]'s scores after the
/// model has driven it through `LayerCaches`.
#[derive(Debug, Clone)]
struct Shared {
    cache: Arc<Mutex<EvictingCache>>,
    device: Device,
}

impl Shared {
    fn new(cache: EvictingCache) -> Self {
        let device = cache.device().clone();
        Shared {
            cache: Arc::new(Mutex::new(cache)),
            device,
        }
    }
    fn lock(&self) -> MutexGuard<'_, EvictingCache> {
        self.cache.lock().expect("not poisoned")
    }
}

impl KvCache for Shared {
    fn shape(&self) -> KvShape {
        self.lock().shape()
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn append(&mut self, block: KvBlock) -> kv_core::Result<()> {
        self.lock().append(block)
    }
    fn attend(&mut self, query: &Query, stats: StatsRequest) -> kv_core::Result<Attended> {
        self.lock().attend(query, stats)
    }
    fn end_prefill(&mut self) -> kv_core::Result<()> {
        self.lock().end_prefill()
    }
    fn view(&self) -> KvView {
        self.lock().view()
    }
    fn lengths(&self) -> Lengths {
        self.lock().lengths()
    }
    fn memory(&self) -> MemoryReport {
        self.lock().memory()
    }
    fn held_buffers(&self) -> Vec<HeldBuffer> {
        self.lock().held_buffers()
    }
    fn reset(&mut self) {
        self.lock().reset();
    }
}

/// One press: our registry name, its `--param`s, and the fixture file's press name.
struct Press {
    name: &'static str,
    params: &'static [(&'static str, &'static str)],
}

const PRESSES: [Press; 7] = [
    Press {
        name: "knorm",
        params: &[],
    },
    Press {
        name: "streaming_llm",
        params: &[],
    },
    Press {
        name: "snapkv",
        params: &[("window", "32"), ("kernel", "5")],
    },
    Press {
        name: "tova",
        params: &[],
    },
    Press {
        name: "observed_attention",
        params: &[],
    },
    Press {
        name: "keydiff",
        params: &[],
    },
    Press {
        name: "expected_attention",
        params: &[],
    },
];

fn press(name: &str) -> &'static Press {
    PRESSES
        .iter()
        .find(|p| p.name == name)
        .expect("known press")
}

fn spec(p: &Press) -> MethodSpec {
    let mut s = MethodSpec::parse_stage(p.name).expect("spec");
    s.set_param("ratio", "0.5").expect("ratio");
    for (k, v) in p.params {
        s.set_param(k, v).expect("param");
    }
    s
}

/// Kept positions per layer and head, from every layer's view.
fn kept(caches: &LayerCaches) -> Vec<Vec<Vec<u32>>> {
    caches
        .iter()
        .map(|c| {
            let v = c.view();
            let [_, kvh, t, _] = v.keys.dims();
            (0..kvh)
                .map(|h| {
                    v.positions[h * t..(h + 1) * t]
                        .iter()
                        .copied()
                        .filter(|&p| p != PAD)
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// Compares kept sets with the fixture, allowing only ties; returns the number of tied swaps.
fn compare_kept(fx: &Fixture, layers: &[Vec<Vec<u32>>], n: usize, what: &str) -> usize {
    let mut swaps = 0;
    for (l, heads) in layers.iter().enumerate() {
        let want = &fx.i64s[&format!("L{l}.kept_idx_sorted")];
        let scores = fx.f32s.get(&format!("L{l}.scores"));
        let k = want.len() / heads.len();
        for (h, got) in heads.iter().enumerate() {
            let want: Vec<u32> = want[h * k..(h + 1) * k].iter().map(|&i| i as u32).collect();
            assert_eq!(got.len(), k, "{what} layer {l} head {h}: kept count");
            if *got == want {
                continue;
            }
            let Some(scores) = scores else {
                panic!("{what} layer {l} head {h}: kept {got:?} != kvpress {want:?}");
            };
            let s = &scores[h * n..(h + 1) * n];
            let mut sorted: Vec<f32> = s.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[k - 1];
            let only_ours: Vec<u32> = got.iter().filter(|p| !want.contains(p)).copied().collect();
            let only_theirs: Vec<u32> = want.iter().filter(|p| !got.contains(p)).copied().collect();
            for &p in only_ours.iter().chain(&only_theirs) {
                let sp = s[p as usize];
                assert!(
                    (sp - kth).abs() <= 1e-5 * kth.abs().max(1e-6),
                    "{what} layer {l} head {h}: token {p} differs (ours only {only_ours:?}, \
                     kvpress only {only_theirs:?}) with kvpress score {sp} vs k-th score {kth}: \
                     not a tie"
                );
            }
            let tied: Vec<(u32, f32)> = only_ours
                .iter()
                .chain(&only_theirs)
                .map(|&p| (p, s[p as usize]))
                .collect();
            eprintln!(
                "{what} layer {l} head {h}: tie at the k-th score {kth}: ours {only_ours:?} \
                 vs kvpress {only_theirs:?}; kvpress scores (token, score) {tied:?}"
            );
            swaps += only_ours.len();
        }
    }
    swaps
}

/// Compares our scores with the fixture's: `|a - b| <= 1e-4 * |b| + atol`, where `atol` is
/// 1e-4 of the layer's largest score (scores near zero carry no relative precision).
fn compare_scores(fx: &Fixture, caches: &[Shared], what: &str) -> f32 {
    let mut worst = 0.0f32;
    for (l, c) in caches.iter().enumerate() {
        let want = &fx.f32s[&format!("L{l}.scores")];
        let got: Vec<f32> = c.lock().last_scores().concat();
        assert_eq!(got.len(), want.len(), "{what} layer {l}: score count");
        let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            let err = (a - b).abs() / (b.abs() + scale * 1e-2).max(1e-30);
            worst = worst.max(err);
            assert!(
                (a - b).abs() <= 1e-4 * b.abs() + 1e-4 * scale,
                "{what} layer {l} entry {i}: ours {a} vs kvpress {b}"
            );
        }
    }
    worst
}

/// Shared-handle caches built like the registry builds them, keeping their scores.
fn scoring_caches(model: &Llama, p: &Press) -> (LayerCaches, Vec<Shared>) {
    let layers = model.config().num_hidden_layers;
    let scorer = ScorerConfig::from_params(p.name, p.params.iter().copied()).expect("scorer");
    let shape = model.kv_shape(1).expect("shape");
    let handles: Vec<Shared> = (0..layers)
        .map(|l| {
            let cfg = EvictConfig::new(shape, 0.5, scorer.clone())
                .with_rope(model.rope().config().clone())
                .with_layer(l, layers)
                .with_kept_scores();
            Shared::new(cfg.init(model.device()).expect("init"))
        })
        .collect();
    let boxes = handles
        .iter()
        .map(|h| Box::new(h.clone()) as Box<dyn KvCache>)
        .collect();
    (LayerCaches::new(boxes), handles)
}

fn prefill(model: &Llama, caches: &mut LayerCaches, ids: &[u32]) {
    let pos: Vec<u32> = (0..ids.len() as u32).collect();
    model.forward_hidden(ids, &pos, 1, caches).expect("prefill");
    caches.end_prefill().expect("end_prefill");
}

fn ids_of(fx: &Fixture) -> Vec<u32> {
    fx.i64s["input_ids"].iter().map(|&i| i as u32).collect()
}

fn tiny() -> Option<Llama> {
    let config = LlamaConfig::from_hf_json_file(fixture("kvpress-tiny/tiny_llama_config.json")?)
        .expect("config");
    let w = load_safetensors_f32(fixture("kvpress-tiny/tiny_llama_weights.safetensors")?)
        .expect("weights");
    let w = HostWeights::from_hf_tensors(config, w).expect("weights");
    Some(Llama::new(&w, &kv_testkit::test_device()).expect("model"))
}

fn tiny_conformance(name: &str) {
    let Some(model) = tiny() else { return };
    let Some(path) = fixture(&format!("kvpress-tiny/press_{name}.safetensors")) else {
        return;
    };
    let fx = read_fixture(&path);
    let ids = ids_of(&fx);
    let p = press(name);
    let layers = model.config().num_hidden_layers;
    // Through the harness's registry, as `kv-eval` builds it.
    let mut caches = build_caches(
        &kv_eval::method::PipelineSpec::single(spec(p)),
        layers,
        model.kv_shape(1).expect("shape"),
        model.rope().config(),
        model.device(),
    )
    .expect("caches");
    prefill(&model, &mut caches, &ids[..96]);
    let swaps = compare_kept(&fx, &kept(&caches), 96, &format!("tiny {name}"));
    // The same caches with their scores kept.
    let (mut caches, handles) = scoring_caches(&model, p);
    prefill(&model, &mut caches, &ids[..96]);
    let worst = compare_scores(&fx, &handles, &format!("tiny {name}"));
    eprintln!("tiny {name}: kept sets equal ({swaps} tied swaps), worst score error {worst:.2e}");
}

#[test]
fn tiny_knorm_matches_kvpress() {
    tiny_conformance("knorm");
}
#[test]
fn tiny_streaming_llm_matches_kvpress() {
    tiny_conformance("streaming_llm");
}
#[test]
fn tiny_snapkv_matches_kvpress() {
    tiny_conformance("snapkv");
}
#[test]
fn tiny_tova_matches_kvpress() {
    tiny_conformance("tova");
}
#[test]
fn tiny_observed_attention_matches_kvpress() {
    tiny_conformance("observed_attention");
}
#[test]
fn tiny_keydiff_matches_kvpress() {
    tiny_conformance("keydiff");
}
#[test]
fn tiny_expected_attention_matches_kvpress() {
    tiny_conformance("expected_attention");
}

fn smollm2() -> Option<Llama> {
    let dir = std::env::var_os("KV_ASSETS_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"),
        PathBuf::from,
    );
    let path = dir.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        kv_testkit::missing_data(&format!(
            "{} is absent; run cargo xtask setup",
            path.display()
        ));
        return None;
    }
    let loaded =
        kv_eval::assets::load_model(&path, None, &kv_testkit::test_device()).expect("model");
    Some(loaded.model)
}

fn smollm2_conformance(name: &str) {
    let Some(path) = fixture(&format!("kvpress-smollm2-pp/press_{name}.safetensors")) else {
        return;
    };
    let Some(model) = smollm2() else { return };
    let fx = read_fixture(&path);
    let ids = ids_of(&fx);
    let p = press(name);
    // The registry accepts the spec (the prefill below uses identically built caches whose
    // scores can be read back).
    build_caches(
        &kv_eval::method::PipelineSpec::single(spec(p)),
        model.config().num_hidden_layers,
        model.kv_shape(1).expect("shape"),
        model.rope().config(),
        model.device(),
    )
    .expect("registry builds the method");
    let (mut caches, handles) = scoring_caches(&model, p);
    prefill(&model, &mut caches, &ids[..384]);
    let what = format!("smollm2 {name}");
    let swaps = compare_kept(&fx, &kept(&caches), 384, &what);
    let worst = compare_scores(&fx, &handles, &what);
    eprintln!("{what}: kept sets equal ({swaps} tied swaps), worst score error {worst:.2e}");
}

#[test]
fn smollm2_knorm_matches_kvpress() {
    smollm2_conformance("knorm");
}
#[test]
fn smollm2_streaming_llm_matches_kvpress() {
    smollm2_conformance("streaming_llm");
}
#[test]
fn smollm2_snapkv_matches_kvpress() {
    smollm2_conformance("snapkv");
}
#[test]
fn smollm2_tova_matches_kvpress() {
    smollm2_conformance("tova");
}
#[test]
fn smollm2_observed_attention_matches_kvpress() {
    smollm2_conformance("observed_attention");
}
#[test]
fn smollm2_keydiff_matches_kvpress() {
    smollm2_conformance("keydiff");
}
#[test]
fn smollm2_expected_attention_matches_kvpress() {
    smollm2_conformance("expected_attention");
}

/// A registry spec at ratio 0.5 with SnapKV's fixture parameters (window 32, kernel 5).
fn snap_spec(name: &str) -> MethodSpec {
    let mut s = MethodSpec::parse_stage(name).expect("spec");
    for (k, v) in [("ratio", "0.5"), ("window", "32"), ("kernel", "5")] {
        s.set_param(k, v).expect("param");
    }
    s
}

/// kvpress's `AdaKVPress.compress` over kvpress's own SnapKV scores of one layer (`heads * n`,
/// row-major), written out independently of `kv_evict::AdaKvBudget`: protect the top
/// `floor(n_kept * alpha)` of every head, then prune the `heads * (n - n_kept)` lowest over the
/// layer. Returns the kept positions per head and the score at the cut (the highest pruned).
fn kvpress_adakv(
    scores: &[f32],
    heads: usize,
    n: usize,
    ratio: f64,
    alpha: f64,
) -> (Vec<Vec<u32>>, f32) {
    let n_kept = (n as f64 * (1.0 - ratio)) as usize;
    let n_safe = (n_kept as f64 * alpha) as usize;
    let mut flat: Vec<(f32, usize, usize)> = Vec::with_capacity(heads * n);
    for h in 0..heads {
        let s = &scores[h * n..(h + 1) * n];
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        let mut v = s.to_vec();
        for &j in &order[..n_safe] {
            v[j] = f32::MAX;
        }
        flat.extend(v.iter().enumerate().map(|(j, &x)| (x, h, j)));
    }
    flat.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n_pruned = heads * (n - n_kept);
    let cut = if n_pruned > 0 {
        flat[n_pruned - 1].0
    } else {
        f32::MIN
    };
    let mut kept = vec![Vec::new(); heads];
    for &(_, h, j) in &flat[n_pruned..] {
        kept[h].push(j as u32);
    }
    kept.iter_mut().for_each(|k| k.sort_unstable());
    (kept, cut)
}

/// Ada-KV over SnapKV: our registry's `adakv_snapkv` caches keep, per layer, exactly the
/// tokens kvpress's AdaKVPress keeps given kvpress's own SnapKV scores (the fixture's), except
/// for tokens whose score ties with the layer's cut; the layer total is exact.
fn adakv_conformance(model: &Llama, fx: &Fixture, n: usize, what: &str) {
    let layers = model.config().num_hidden_layers;
    let shape = model.kv_shape(1).expect("shape");
    let mut caches = build_caches(
        &kv_eval::method::PipelineSpec::single(snap_spec("adakv_snapkv")),
        layers,
        shape,
        model.rope().config(),
        model.device(),
    )
    .expect("caches");
    prefill(model, &mut caches, &ids_of(fx)[..n]);
    let heads = shape.kv_heads();
    let (mut swaps, mut uneven) = (0, 0);
    for (l, got) in kept(&caches).iter().enumerate() {
        let scores = &fx.f32s[&format!("L{l}.scores")];
        let (want, cut) = kvpress_adakv(scores, heads, n, 0.5, 0.2);
        let total: usize = got.iter().map(Vec::len).sum();
        assert_eq!(total, heads * (n / 2), "{what} layer {l}: layer total");
        if want.iter().any(|w| w.len() != n / 2) {
            uneven += 1;
        }
        for h in 0..heads {
            if got[h] == want[h] {
                continue;
            }
            let s = &scores[h * n..(h + 1) * n];
            let diff: Vec<u32> = got[h]
                .iter()
                .filter(|p| !want[h].contains(p))
                .chain(want[h].iter().filter(|p| !got[h].contains(p)))
                .copied()
                .collect();
            for &p in &diff {
                let sp = s[p as usize];
                assert!(
                    (sp - cut).abs() <= 1e-4 * cut.abs() + 1e-7,
                    "{what} layer {l} head {h}: token {p} (kvpress score {sp}) differs from \
                     kvpress's AdaKV selection and is not at the cut {cut}"
                );
            }
            eprintln!("{what} layer {l} head {h}: tie at the cut {cut}: tokens {diff:?}");
            swaps += diff.len();
        }
    }
    assert!(
        uneven > 0,
        "{what}: Ada-KV should give some heads uneven budgets"
    );
    eprintln!(
        "{what} adakv_snapkv: kept sets equal kvpress's AdaKV over kvpress's SnapKV scores \
         ({swaps} tied tokens; {uneven} of {layers} layers with uneven head budgets)"
    );
}

/// kvpress's `PyramidKVPress.get_layer_budget` (window inside the budget, Python's `round`),
/// written out independently of `kv_evict::PyramidBudget`.
fn kvpress_pyramid_budget(
    n: usize,
    window: usize,
    ratio: f64,
    layer: usize,
    layers: usize,
) -> usize {
    let (q, w) = (n as f64, window as f64);
    let mcp = w + q * (1.0 - ratio);
    let mut min = (mcp - w) / 20.0;
    let mut max = (mcp - w) * 2.0 - min;
    if max >= q - w {
        max = q - w;
        min = (mcp - w) * 2.0 - max;
    }
    if !(q >= max && max >= min && min >= w) {
        return (q * (1.0 - ratio)).round_ties_even() as usize;
    }
    let steps = (max - min) / (layers - 1) as f64;
    (max - layer as f64 * steps).round_ties_even() as usize
}

/// PyramidKV over SnapKV: every layer keeps kvpress's pyramid budget (on these prompts the
/// clamp `max = n - w` applies: tiny [64, 32], SmolLM2 352 down to 32), and each head keeps
/// the top-budget tokens of kvpress's own SnapKV scores (the fixture's), up to ties at the
/// budget's score.
fn pyramid_conformance(model: &Llama, fx: &Fixture, n: usize, what: &str) {
    let layers = model.config().num_hidden_layers;
    let shape = model.kv_shape(1).expect("shape");
    let mut caches = build_caches(
        &kv_eval::method::PipelineSpec::single(snap_spec("pyramidkv")),
        layers,
        shape,
        model.rope().config(),
        model.device(),
    )
    .expect("caches");
    prefill(model, &mut caches, &ids_of(fx)[..n]);
    let heads = shape.kv_heads();
    let mut swaps = 0;
    let mut budgets = Vec::with_capacity(layers);
    for (l, got) in kept(&caches).iter().enumerate() {
        let b = kvpress_pyramid_budget(n, 32, 0.5, l, layers);
        budgets.push(b);
        let scores = &fx.f32s[&format!("L{l}.scores")];
        for h in 0..heads {
            assert_eq!(got[h].len(), b, "{what} layer {l} head {h}: pyramid budget");
            let s = &scores[h * n..(h + 1) * n];
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &c| s[c].total_cmp(&s[a]).then(a.cmp(&c)));
            let kth = s[order[b - 1]];
            let mut want: Vec<u32> = order[..b].iter().map(|&j| j as u32).collect();
            want.sort_unstable();
            for p in got[h]
                .iter()
                .filter(|p| !want.contains(p))
                .chain(want.iter().filter(|p| !got[h].contains(p)))
            {
                let sp = s[*p as usize];
                assert!(
                    (sp - kth).abs() <= 1e-5 * kth.abs().max(1e-6),
                    "{what} layer {l} head {h}: token {p} (kvpress score {sp}) is not a tie \
                     with the budget's score {kth}"
                );
                swaps += 1;
            }
        }
    }
    assert!(budgets.windows(2).all(|w| w[0] >= w[1]) && budgets[0] > budgets[layers - 1]);
    eprintln!("{what} pyramidkv: budgets {budgets:?}, kept sets equal ({swaps} tied tokens)");
}

#[test]
fn tiny_adakv_and_pyramidkv_match_kvpress_allocation() {
    let Some(model) = tiny() else { return };
    let Some(path) = fixture("kvpress-tiny/press_snapkv.safetensors") else {
        return;
    };
    let fx = read_fixture(&path);
    adakv_conformance(&model, &fx, 96, "tiny");
    pyramid_conformance(&model, &fx, 96, "tiny");
}

#[test]
fn smollm2_adakv_and_pyramidkv_match_kvpress_allocation() {
    let Some(path) = fixture("kvpress-smollm2-pp/press_snapkv.safetensors") else {
        return;
    };
    let Some(model) = smollm2() else { return };
    let fx = read_fixture(&path);
    adakv_conformance(&model, &fx, 384, "smollm2");
    pyramid_conformance(&model, &fx, 384, "smollm2");
}
