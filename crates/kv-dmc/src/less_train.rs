//! Layer-wise training of LESS's maps on captured activations, with the model frozen (the
//! reference's `train_kernels.py`): for every scored query the LESS output over the kept
//! tokens and the state of the evicted ones should equal the full attention output.
//!
//! Gradients are derived by hand (the maps are two small MLPs per head) and checked against
//! finite differences in the tests; the optimiser is Adam.

use std::sync::Arc;

use burn::prelude::*;
use kv_core::{
    KeyPositions, KvBlock, KvCache, KvError, KvShape, Query, Result, StatsRequest,
    reference_attention,
};

use crate::less::{LessConfig, LessPolicy};
use crate::less_maps::{KeyTrace, LessMaps, MlpTrace};
use crate::storage::to_host;

/// One calibration sequence of one layer, ready for training: the activations, when the
/// sparse policy evicts each token, and per scored query the sparse output, its log-sum-exp
/// and the full-attention target.
#[derive(Debug, Clone)]
pub struct LessSample {
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    len: usize,
    /// The first scored query (the end of the prefill).
    first: usize,
    /// `[q_heads, len, head_dim]`.
    q: Vec<f32>,
    /// `[kv_heads, len, head_dim]`.
    k: Vec<f32>,
    /// `[kv_heads, len, head_dim]`.
    v: Vec<f32>,
    /// Per KV head and token: the first scored query that no longer sees it (`usize::MAX`:
    /// never evicted).
    evicted_at: Vec<Vec<usize>>,
    /// `[q_heads, rows, head_dim]`: attention over the kept tokens.
    sparse_out: Vec<f32>,
    /// `[q_heads, rows]`: log-sum-exp of the kept tokens' scaled scores.
    sparse_lse: Vec<f32>,
    /// `[q_heads, rows, head_dim]`: attention over every token up to the query.
    target: Vec<f32>,
    /// The error metric `M` over a query's concatenated head outputs (`[w, w]`, `w = q_heads
    /// * head_dim`): the loss of a row is `eᵀ M e` (none: `eᵀ e`).
    metric: Option<Arc<[f32]>>,
}

impl LessSample {
    /// Builds a sample from one sequence's activations of one layer (post-RoPE queries
    /// `[1, q_heads, n, d]`, keys and values `[1, kv_heads, n, d]`, positions `0..n`): the
    /// first `prefill` tokens are appended and attended in one block and the prefill is
    /// ended, then every further token is appended and attended alone, through a
    /// [`LessCache`](crate::LessCache) with zero maps (the sparse policy), which records
    /// what each query keeps. The scored queries are `prefill..n`.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for shapes that disagree or `prefill` not in `1..n`; cache
    /// errors.
    pub fn collect(
        policy: LessPolicy,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        prefill: usize,
    ) -> Result<Self> {
        let [b, qh, n, d] = q.dims();
        let [kb, kvh, kn, kd] = k.dims();
        if b != 1 || kb != 1 || kn != n || kd != d || v.dims() != k.dims() || qh % kvh != 0 {
            return Err(KvError::InvalidConfig {
                field: "activations",
                reason: format!(
                    "queries {:?}, keys {:?}, values {:?} are not one sequence of one layer",
                    q.dims(),
                    k.dims(),
                    v.dims()
                ),
            });
        }
        if prefill == 0 || prefill >= n {
            return Err(KvError::InvalidConfig {
                field: "prefill",
                reason: format!("{prefill} is not in 1..{n}"),
            });
        }
        let device = q.device();
        let shape = KvShape::new(1, kvh, qh, d)?;
        let pos: Vec<u32> = (0..n as u32).collect();
        let (target, _) = reference_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            &pos,
            KeyPositions::PerSequence(&pos),
            None,
            StatsRequest::NONE,
        );
        let target = to_host(target.slice([0..1, 0..qh, prefill..n, 0..d]))?;

        let mut cache =
            LessConfig::new(shape, policy, LessMaps::zeros(&shape, 1, 1)).init(&device)?;
        let part = |t: &Tensor<4>, heads: usize, a: usize, z: usize| {
            t.clone().slice([0..1, 0..heads, a..z, 0..d])
        };
        cache.append(KvBlock::contiguous(
            part(&k, kvh, 0, prefill),
            part(&v, kvh, 0, prefill),
            0,
        )?)?;
        cache.attend(
            &Query::contiguous(part(&q, qh, 0, prefill), 0)?,
            StatsRequest::NONE,
        )?;
        cache.end_prefill()?;
        let rows = n - prefill;
        let mut evicted_at = vec![vec![usize::MAX; n]; kvh];
        let mut alive: Vec<Vec<bool>> = vec![vec![false; n]; kvh];
        for a in &mut alive {
            a[..prefill].fill(true);
        }
        let mut sparse_out = vec![0.0f32; qh * rows * d];
        let mut sparse_lse = vec![0.0f32; qh * rows];
        for t in prefill..n {
            cache.append(KvBlock::contiguous(
                part(&k, kvh, t, t + 1),
                part(&v, kvh, t, t + 1),
                t as u32,
            )?)?;
            for h in 0..kvh {
                let held = cache.positions(0, h);
                let mut now = vec![false; n];
                held.iter().for_each(|&p| now[p as usize] = true);
                for j in 0..t {
                    if alive[h][j] && !now[j] {
                        evicted_at[h][j] = t;
                        alive[h][j] = false;
                    }
                }
                alive[h][t] = now[t];
                if !now[t] {
                    evicted_at[h][t] = t;
                }
            }
            let (o, lse) =
                cache.attend_lse(&Query::contiguous(part(&q, qh, t, t + 1), t as u32)?)?;
            let o = to_host(o)?;
            let lse = to_host(lse)?;
            let i = t - prefill;
            for hq in 0..qh {
                sparse_out[(hq * rows + i) * d..(hq * rows + i + 1) * d]
                    .copy_from_slice(&o[hq * d..(hq + 1) * d]);
                sparse_lse[hq * rows + i] = lse[hq];
            }
        }
        Ok(LessSample {
            q_heads: qh,
            kv_heads: kvh,
            head_dim: d,
            len: n,
            first: prefill,
            q: to_host(q)?,
            k: to_host(k)?,
            v: to_host(v)?,
            evicted_at,
            sparse_out,
            sparse_lse,
            target,
            metric: None,
        })
    }

    /// Scored queries times query heads.
    pub fn scored_rows(&self) -> usize {
        (self.len - self.first) * self.q_heads
    }

    /// Tokens evicted per KV head by the end of the sequence.
    pub fn evicted(&self) -> Vec<usize> {
        self.evicted_at
            .iter()
            .map(|e| e.iter().filter(|&&t| t < self.len).count())
            .collect()
    }

    /// The training loss of the sparse policy alone (no state) against full attention.
    pub fn sparse_loss(&self) -> f64 {
        let (rows, d) = (self.len - self.first, self.head_dim);
        let err: Vec<f64> = self
            .sparse_out
            .iter()
            .zip(&self.target)
            .map(|(a, b)| f64::from(*a) - f64::from(*b))
            .collect();
        let sse: f64 = match &self.metric {
            None => err.iter().map(|e| e * e).sum(),
            Some(m) => {
                let w = self.q_heads * d;
                let mut sse = 0.0;
                let mut e_row = vec![0.0f64; w];
                for i in 0..rows {
                    for hq in 0..self.q_heads {
                        let base = (hq * rows + i) * d;
                        e_row[hq * d..(hq + 1) * d].copy_from_slice(&err[base..base + d]);
                    }
                    for a in 0..w {
                        let me: f64 = m[a * w..(a + 1) * w]
                            .iter()
                            .zip(&e_row)
                            .map(|(x, e)| f64::from(*x) * e)
                            .sum();
                        sse += e_row[a] * me;
                    }
                }
                sse
            }
        };
        sse / self.target.len() as f64
    }

    /// Measures errors after the layer's output projection, as the reference's loss does:
    /// `metric` from [`output_metric`] (`[w, w]`, `w = q_heads * head_dim`).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a metric of another size.
    pub fn with_metric(mut self, metric: Arc<[f32]>) -> Result<Self> {
        let w = self.q_heads * self.head_dim;
        if metric.len() != w * w {
            return Err(KvError::InvalidConfig {
                field: "metric",
                reason: format!("{} entries for a [{w}, {w}] metric", metric.len()),
            });
        }
        self.metric = Some(metric);
        Ok(self)
    }

    fn check(&self, maps: &LessMaps) -> Result<()> {
        let shape = KvShape::new(1, self.kv_heads, self.q_heads, self.head_dim)?;
        maps.validate(&shape)
    }
}

/// The training loss (mean squared error between the LESS output and full attention over
/// every scored query, head and channel of `samples`) and its gradient with respect to every
/// parameter of `maps`.
///
/// # Errors
/// [`KvError::InvalidConfig`] if the maps do not fit a sample or there is nothing to score.
pub fn loss_and_grad(maps: &LessMaps, samples: &[&LessSample]) -> Result<(f64, LessMaps)> {
    let mut grad = maps.zeros_like();
    let count: usize = samples.iter().map(|s| s.target.len()).sum();
    if count == 0 {
        return Err(KvError::InvalidConfig {
            field: "samples",
            reason: "no scored query".into(),
        });
    }
    let scale = 1.0 / count as f64;
    let mut sse = 0.0;
    for s in samples {
        s.check(maps)?;
        sse += sample_pass(maps, s, Some((&mut grad, scale)));
    }
    Ok((sse * scale, grad))
}

/// The training loss alone (see [`loss_and_grad`]).
///
/// # Errors
/// As [`loss_and_grad`].
pub fn loss(maps: &LessMaps, samples: &[&LessSample]) -> Result<f64> {
    let count: usize = samples.iter().map(|s| s.target.len()).sum();
    if count == 0 {
        return Err(KvError::InvalidConfig {
            field: "samples",
            reason: "no scored query".into(),
        });
    }
    let mut sse = 0.0;
    for s in samples {
        s.check(maps)?;
        sse += sample_pass(maps, s, None);
    }
    Ok(sse / count as f64)
}

/// One forward (and with `grad`, backward) pass over a sample; returns the sum of squared
/// errors (weighted by the sample's metric when it has one). `grad` receives `scale ·` the
/// gradient of that sum.
fn sample_pass(maps: &LessMaps, s: &LessSample, mut grad: Option<(&mut LessMaps, f64)>) -> f64 {
    let (qh, kvh, d, n, first) = (s.q_heads, s.kv_heads, s.head_dim, s.len, s.first);
    let (hid, r) = (maps.hidden, maps.rank);
    let g = qh / kvh;
    let rows = n - first;
    let key = |h: usize, j: usize| &s.k[(h * n + j) * d..(h * n + j + 1) * d];
    let val = |h: usize, j: usize| &s.v[(h * n + j) * d..(h * n + j + 1) * d];
    let sd = r * d + r;
    // Forward. Per KV head: the evicted tokens by the first scored row that misses them, with
    // their ψ traces, and the state (H, z) every row sees.
    let mut traces: Vec<Vec<Vec<(usize, KeyTrace)>>> = Vec::with_capacity(kvh);
    let mut states: Vec<Vec<f64>> = Vec::with_capacity(kvh);
    for h in 0..kvh {
        let mut by_row: Vec<Vec<(usize, KeyTrace)>> = (0..rows).map(|_| Vec::new()).collect();
        for (j, &t) in s.evicted_at[h].iter().enumerate() {
            if t < n {
                by_row[t.max(first) - first].push((j, maps.key[h].forward(key(h, j), hid, r)));
            }
        }
        let mut st = vec![0.0f64; rows * sd];
        let mut cur = vec![0.0f64; sd];
        for (i, evicted) in by_row.iter().enumerate() {
            for (j, tr) in evicted {
                let v = val(h, *j);
                for (rr, &y) in tr.y.iter().enumerate() {
                    let p = f64::from(y.abs());
                    cur[r * d + rr] += p;
                    for (hx, &vx) in cur[rr * d..(rr + 1) * d].iter_mut().zip(v) {
                        *hx += p * f64::from(vx);
                    }
                }
            }
            st[i * sd..(i + 1) * sd].copy_from_slice(&cur);
        }
        traces.push(by_row);
        states.push(st);
    }
    // Per (query head, row): φ's trace, the prediction and its denominator.
    let mut qtraces: Vec<MlpTrace> = Vec::with_capacity(qh * rows);
    let mut preds = vec![0.0f64; qh * rows * d];
    let mut denoms = vec![0.0f64; qh * rows];
    for hq in 0..qh {
        let h = hq / g;
        for i in 0..rows {
            let t = first + i;
            let qrow = &s.q[(hq * n + t) * d..(hq * n + t + 1) * d];
            let qt = maps.query[hq].mlp.forward(qrow, hid, r);
            let st = &states[h][i * sd..(i + 1) * sd];
            let norm: f64 = (0..r)
                .map(|rr| f64::from(qt.h2[rr].abs()) * st[r * d + rr])
                .sum();
            let lse = s.sparse_lse[hq * rows + i];
            let a = if lse == f32::MIN {
                0.0
            } else {
                f64::from(lse).exp()
            };
            let denom = a + norm;
            let base = (hq * rows + i) * d;
            for c in 0..d {
                let os = f64::from(s.sparse_out[base + c]);
                let mut num = a * os;
                for rr in 0..r {
                    num += f64::from(qt.h2[rr].abs()) * st[rr * d + c];
                }
                preds[base + c] = if denom > 0.0 { num / denom } else { os };
            }
            denoms[hq * rows + i] = denom;
            qtraces.push(qt);
        }
    }
    // The error and its gradient at every prediction: `e` or, with a metric, `M e` (all
    // query heads of a row at once).
    let err: Vec<f64> = preds
        .iter()
        .zip(&s.target)
        .map(|(p, t)| p - f64::from(*t))
        .collect();
    let mut sse = 0.0f64;
    let weighted: Vec<f64> = match &s.metric {
        None => {
            sse = err.iter().map(|e| e * e).sum();
            err
        }
        Some(m) => {
            let w = qh * d;
            let mut out = vec![0.0f64; err.len()];
            let mut e_row = vec![0.0f64; w];
            for i in 0..rows {
                for hq in 0..qh {
                    let base = (hq * rows + i) * d;
                    e_row[hq * d..(hq + 1) * d].copy_from_slice(&err[base..base + d]);
                }
                for a in 0..w {
                    let mrow = &m[a * w..(a + 1) * w];
                    let me: f64 = mrow
                        .iter()
                        .zip(&e_row)
                        .map(|(x, e)| f64::from(*x) * e)
                        .sum();
                    sse += e_row[a] * me;
                    let (hq, c) = (a / d, a % d);
                    out[(hq * rows + i) * d + c] = me;
                }
            }
            out
        }
    };
    let Some((gm, scale)) = grad.as_mut() else {
        return sse;
    };
    // Backward through the output formula and φ; the state gradients per KV head and row.
    let mut gstate: Vec<Vec<f64>> = (0..kvh).map(|_| vec![0.0f64; rows * sd]).collect();
    for hq in 0..qh {
        let h = hq / g;
        for i in 0..rows {
            let denom = denoms[hq * rows + i];
            if denom <= 0.0 {
                continue;
            }
            let t = first + i;
            let qrow = &s.q[(hq * n + t) * d..(hq * n + t + 1) * d];
            let qt = &qtraces[hq * rows + i];
            let base = (hq * rows + i) * d;
            let dn: Vec<f64> = weighted[base..base + d]
                .iter()
                .map(|e| 2.0 * *scale * e / denom)
                .collect();
            let dd: f64 = -dn
                .iter()
                .zip(&preds[base..base + d])
                .map(|(a, b)| a * b)
                .sum::<f64>();
            let st = &states[h][i * sd..(i + 1) * sd];
            let gs = &mut gstate[h][i * sd..(i + 1) * sd];
            let mut dh2 = vec![0.0f32; r];
            for rr in 0..r {
                let phi = f64::from(qt.h2[rr].abs());
                let mut dphi = dd * st[r * d + rr];
                for c in 0..d {
                    dphi += dn[c] * st[rr * d + c];
                    gs[rr * d + c] += phi * dn[c];
                }
                gs[r * d + rr] += phi * dd;
                let sgn = if qt.h2[rr] > 0.0 {
                    1.0
                } else if qt.h2[rr] < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                dh2[rr] = (dphi * sgn) as f32;
            }
            maps.query[hq]
                .mlp
                .backward(qrow, qt, &dh2, &mut gm.query[hq].mlp);
        }
    }
    // Back through the prefix sums: a token evicted at row i is in every later state, so its
    // ψ gets the suffix sum of the state gradients.
    for h in 0..kvh {
        let mut suffix = vec![0.0f64; sd];
        for i in (0..rows).rev() {
            for (a, b) in suffix.iter_mut().zip(&gstate[h][i * sd..(i + 1) * sd]) {
                *a += b;
            }
            for (j, tr) in &traces[h][i] {
                let v = val(h, *j);
                // The gradient at ψ = |y| (`backward` applies sign(y) itself).
                let dpsi: Vec<f32> = (0..r)
                    .map(|rr| {
                        let dot: f64 = suffix[rr * d..(rr + 1) * d]
                            .iter()
                            .zip(v)
                            .map(|(a, &b)| a * f64::from(b))
                            .sum();
                        (dot + suffix[r * d + rr]) as f32
                    })
                    .collect();
                maps.key[h].backward(key(h, *j), tr, &dpsi, &mut gm.key[h]);
            }
        }
    }
    sse
}

/// Options of [`train_layer`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainOptions {
    /// Passes over the samples (one Adam step per sample per pass).
    pub epochs: usize,
    /// Adam's learning rate.
    pub lr: f32,
}

/// What [`train_layer`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// The training loss of the sparse policy alone (no state).
    pub sparse: f64,
    /// The training loss before the first step.
    pub initial: f64,
    /// The training loss after each epoch.
    pub epochs: Vec<f64>,
}

/// Trains `maps` on `samples` with Adam (β = 0.9, 0.999, ε = 1e-8), one step per sample,
/// `epochs` passes in a fixed order.
///
/// # Errors
/// As [`loss_and_grad`].
pub fn train_layer(
    maps: &mut LessMaps,
    samples: &[LessSample],
    opts: TrainOptions,
) -> Result<TrainReport> {
    let all: Vec<&LessSample> = samples.iter().collect();
    let sparse = {
        let count: usize = all.iter().map(|s| s.target.len()).sum();
        all.iter()
            .map(|s| s.sparse_loss() * s.target.len() as f64)
            .sum::<f64>()
            / count.max(1) as f64
    };
    let initial = loss(maps, &all)?;
    let mut m = maps.zeros_like();
    let mut v = maps.zeros_like();
    let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let mut step = 0i32;
    let mut epochs = Vec::with_capacity(opts.epochs);
    for _ in 0..opts.epochs {
        for s in &all {
            let (_, g) = loss_and_grad(maps, &[*s])?;
            step += 1;
            let c1 = 1.0 - b1.powi(step);
            let c2 = 1.0 - b2.powi(step);
            for (((p, gr), mm), vv) in maps
                .slices_mut()
                .into_iter()
                .zip(g.slices())
                .zip(m.slices_mut())
                .zip(v.slices_mut())
            {
                for i in 0..p.len() {
                    let gi = gr[i];
                    mm[i] = b1 * mm[i] + (1.0 - b1) * gi;
                    vv[i] = b2 * vv[i] + (1.0 - b2) * gi * gi;
                    p[i] -= opts.lr * (mm[i] / c1) / ((vv[i] / c2).sqrt() + eps);
                }
            }
        }
        epochs.push(loss(maps, &all)?);
    }
    Ok(TrainReport {
        sparse,
        initial,
        epochs,
    })
}

/// The metric that measures a query's concatenated head outputs `e` (width `w = q_heads *
/// head_dim`) after the layer's output projection `W` (`[hidden, w]`, row-major, as PyTorch
/// and `kv-model` store it): `M = WᵀW · w / hidden`, so that the loss `eᵀ M e / w` of a row is
/// the mean squared error of `W e` over the `hidden` outputs (the reference's MSE after
/// `o_proj`).
///
/// # Errors
/// [`KvError::InvalidConfig`] if `o` is not `hidden * w` entries.
pub fn output_metric(o: &[f32], hidden: usize, w: usize) -> Result<Arc<[f32]>> {
    if o.len() != hidden * w || hidden == 0 {
        return Err(KvError::InvalidConfig {
            field: "metric",
            reason: format!("{} entries for a [{hidden}, {w}] projection", o.len()),
        });
    }
    let factor = w as f64 / hidden as f64;
    let mut m = vec![0.0f64; w * w];
    for row in o.chunks(w) {
        for a in 0..w {
            let x = f64::from(row[a]);
            if x == 0.0 {
                continue;
            }
            for (mm, &y) in m[a * w..(a + 1) * w].iter_mut().zip(row) {
                *mm += x * f64::from(y);
            }
        }
    }
    Ok(m.into_iter().map(|x| (x * factor) as f32).collect())
}
