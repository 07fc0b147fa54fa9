//! The differentiable decoder (`GradLlama`) on the tiny fixture model: its loss equals the
//! cached decoder's NLL, weight gradients agree with finite differences, the KV probes'
//! gradients are the activations' gradients (chain rule back to `W_k`, `W_v`), and bad input
//! is refused.

use burn::prelude::*;
use kv_core::{DenseCacheConfig, KvCache, LayerCaches};
use kv_model::grad::{AttentionInputs, causal_attention};
use kv_model::safetensors_io::load_safetensors_f32;
use kv_model::{GradLlama, HostWeights, Llama, LlamaConfig};

use crate::fixture_path;

fn device() -> Device {
    kv_testkit::test_device()
}

fn tiny_weights() -> Option<HostWeights> {
    let cfg = fixture_path("kvpress-tiny/tiny_llama_config.json")?;
    let weights = fixture_path("kvpress-tiny/tiny_llama_weights.safetensors")?;
    let config = LlamaConfig::from_hf_json_file(cfg).expect("config");
    Some(
        HostWeights::from_hf_tensors(config, load_safetensors_f32(weights).expect("weights"))
            .expect("weights match config"),
    )
}

/// A fixed pseudo-random token sequence of the tiny vocabulary (1000 ids).
fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) >> 7) % 1000)
        .collect()
}

fn scalar(t: Tensor<1>) -> f64 {
    f64::from(
        t.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32")[0],
    )
}

fn plain(a: AttentionInputs) -> Tensor<4> {
    causal_attention(a.queries, a.keys, a.values)
}

/// The cached decoder's mean next-token NLL over `ids` (one sequence, positions from 0).
fn cached_nll(model: &Llama, ids: &[u32]) -> f64 {
    let shape = model.kv_shape(1).expect("shape");
    let d = model.device().clone();
    let mut caches = LayerCaches::try_from_fn(model.config().num_hidden_layers, |_| {
        Ok(Box::new(DenseCacheConfig::new(shape).init(&d)?) as Box<dyn KvCache>)
    })
    .expect("caches");
    let n = ids.len();
    let h = model.config().hidden_size;
    let pos: Vec<u32> = (0..n as u32).collect();
    let hidden = model
        .forward_hidden(ids, &pos, 1, &mut caches)
        .expect("forward");
    let hidden = hidden.slice([0..1, 0..n - 1, 0..h]).reshape([n - 1, h]);
    let nll = model.nll(hidden, &ids[1..]);
    nll.iter().map(|&x| f64::from(x)).sum::<f64>() / nll.len() as f64
}

#[test]
fn loss_equals_the_cached_decoders_nll() {
    let Some(w) = tiny_weights() else { return };
    let model = Llama::new(&w, &device()).expect("model");
    let grad = GradLlama::new(&w, &device()).expect("grad model");
    let (a, b) = (tokens(24, 1), tokens(24, 2));
    let (na, nb) = (cached_nll(&model, &a), cached_nll(&model, &b));
    let one = scalar(grad.loss(&a, 1, None, &mut plain).expect("loss"));
    assert!((one - na).abs() < 1e-4 * na, "loss {one} vs cached {na}");
    // Two sequences in one batch: the mean over both.
    let both: Vec<u32> = a.iter().chain(&b).copied().collect();
    let two = scalar(grad.loss(&both, 2, None, &mut plain).expect("loss"));
    assert!(
        (two - (na + nb) / 2.0).abs() < 1e-4 * na,
        "batched loss {two} vs {}",
        (na + nb) / 2.0
    );
}

#[test]
fn kv_weight_gradients_match_finite_differences() {
    let Some(w) = tiny_weights() else { return };
    let ids = tokens(16, 3);
    let mut grad = GradLlama::new(&w, &device()).expect("grad model");
    grad.track_kv_weights();
    let loss = grad.loss(&ids, 1, None, &mut plain).expect("loss");
    let grads = loss.backward();
    let g = grad.kv_weight_grads(&grads).expect("grads");
    assert_eq!(g.len(), 2);
    assert_eq!(g[1].keys.shape, w.blocks[1].k.shape);
    for (layer, values) in [(0usize, false), (1, true)] {
        let gm = if values {
            &g[layer].values
        } else {
            &g[layer].keys
        };
        // The largest-magnitude entry: finite differences in f32 resolve it well.
        let (idx, &analytic) = gm
            .data
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.abs().total_cmp(&y.1.abs()))
            .expect("entries");
        let eps = 1e-2f32;
        let at = |delta: f32| {
            let mut w2 = w.clone();
            let t = if values {
                &mut w2.blocks[layer].v
            } else {
                &mut w2.blocks[layer].k
            };
            t.data[idx] += delta;
            let m = GradLlama::new(&w2, &device()).expect("model");
            scalar(m.loss(&ids, 1, None, &mut plain).expect("loss"))
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * f64::from(eps));
        let a = f64::from(analytic);
        assert!(
            (fd - a).abs() < 0.03 * a.abs() + 1e-5,
            "layer {layer} values {values}: autodiff {a} vs finite difference {fd}"
        );
    }
}

#[test]
fn probe_gradients_are_the_activation_gradients() {
    // ∂L/∂W_k[h·d + i, c] = Σ_t x[t, c] · ∂L/∂k[h, t, i] with x the attention input: the
    // probes' gradients must reproduce the weight gradients of the same backward pass.
    let Some(w) = tiny_weights() else { return };
    let ids = tokens(12, 5);
    let n = ids.len();
    let mut grad = GradLlama::new(&w, &device()).expect("grad model");
    grad.track_kv_weights();
    let probes = grad.kv_probes(1, n);
    assert_eq!(probes.shape(), [1, 2, n, 16]);
    let mut inputs: Vec<Vec<f32>> = Vec::new();
    let loss = grad
        .loss(&ids, 1, Some(&probes), &mut |a: AttentionInputs| {
            inputs.push(
                a.hidden
                    .to_data()
                    .convert::<f32>()
                    .try_to_vec()
                    .expect("f32"),
            );
            causal_attention(a.queries, a.keys, a.values)
        })
        .expect("loss");
    let grads = loss.backward();
    let wg = grad.kv_weight_grads(&grads).expect("weight grads");
    let ag = probes.grads(&grads).expect("probe grads");
    let (hidden, d, heads) = (64, 16, 2);
    for layer in 0..2 {
        let x = &inputs[layer];
        for (act, wgt) in [
            (&ag[layer].keys, &wg[layer].keys),
            (&ag[layer].values, &wg[layer].values),
        ] {
            assert_eq!(act.shape, vec![1, heads, n, d]);
            let mut worst = 0f32;
            let scale = wgt.data.iter().fold(0f32, |m, v| m.max(v.abs()));
            for h in 0..heads {
                for i in 0..d {
                    for c in 0..hidden {
                        let s: f32 = (0..n)
                            .map(|t| x[t * hidden + c] * act.data[(h * n + t) * d + i])
                            .sum();
                        let want = wgt.data[(h * d + i) * hidden + c];
                        worst = worst.max((s - want).abs());
                    }
                }
            }
            assert!(
                worst <= 1e-4 * scale.max(1e-6),
                "layer {layer}: {worst} vs scale {scale}"
            );
        }
    }
}

#[test]
fn fisher_is_the_root_mean_square_gradient_per_head() {
    let Some(w) = tiny_weights() else { return };
    let (a, b) = (tokens(10, 7), tokens(10, 8));
    let mut grad = GradLlama::new(&w, &device()).expect("grad model");
    let mut losses = Vec::new();
    let fisher = grad
        .kv_projection_fisher(&[&a, &b], &mut |i, l| losses.push((i, l)))
        .expect("fisher");
    assert_eq!(losses.len(), 2);
    // The same from two separate backward passes.
    let per_seq: Vec<_> = [&a, &b]
        .iter()
        .map(|ids| {
            let loss = grad.loss(ids, 1, None, &mut plain).expect("loss");
            grad.kv_weight_grads(&loss.backward()).expect("grads")
        })
        .collect();
    let rows = 16 * 64;
    for layer in 0..2 {
        for h in 0..2 {
            let want: f64 = (0..rows)
                .map(|j| {
                    let e = h * rows + j;
                    let s: f64 = per_seq
                        .iter()
                        .map(|g| f64::from(g[layer].keys.data[e]).powi(2))
                        .sum();
                    (s / 2.0).sqrt()
                })
                .sum::<f64>()
                / rows as f64;
            let got = fisher[layer].keys[h];
            assert!(
                got > 0.0 && (got - want).abs() < 1e-6 * want,
                "{got} vs {want}"
            );
        }
        assert_eq!(fisher[layer].values.len(), 2);
    }
}

#[test]
fn bad_input_is_refused() {
    let Some(w) = tiny_weights() else { return };
    let mut grad = GradLlama::new(&w, &device()).expect("grad model");
    assert!(grad.loss(&[5], 1, None, &mut plain).is_err(), "one token");
    assert!(
        grad.loss(&[5, 6, 7], 2, None, &mut plain).is_err(),
        "ragged batch"
    );
    assert!(
        grad.loss(&[5, 1000], 1, None, &mut plain).is_err(),
        "id outside vocab"
    );
    let probes = grad.kv_probes(1, 4);
    assert!(
        grad.loss(&tokens(5, 1), 1, Some(&probes), &mut plain)
            .is_err(),
        "probe shape"
    );
    let wrong = |a: AttentionInputs| a.queries.slice([0..1, 0..1]);
    assert!(
        grad.loss(&tokens(5, 1), 1, None, &mut |a| wrong(a))
            .is_err(),
        "output shape"
    );
    // Probes that were not part of the differentiated pass have no gradients.
    grad.track_kv_weights();
    let loss = grad.loss(&tokens(5, 1), 1, None, &mut plain).expect("loss");
    assert!(grad.kv_probes(1, 5).grads(&loss.backward()).is_err());
    assert!(grad.kv_projection_fisher(&[], &mut |_, _| {}).is_err());
}
