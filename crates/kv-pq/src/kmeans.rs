//! Batched k-means on any backend: k-means++ seeding from a seed, then Lloyd iterations until
//! the relative change of the objective falls below a tolerance or an iteration cap is hit.
//!
//! Many independent problems of the same size (one per head and subspace for product
//! quantization) run together as one batch of tensor ops: `points` is `[groups, n, dim]`.
//!
//! # Math
//! The objective of a group is `J = Σ_i ‖x_i − c_{a(i)}‖²`. Each iteration assigns every
//! point to its nearest centroid (distances as `‖x‖² − 2 x·c + ‖c‖²`, one matmul), then
//! moves every centroid to the mean of its points; a centroid that receives no point stays
//! where it is, so `J` never increases (up to fp32 rounding of near ties in the assignment).
//! The returned objective is measured directly as `Σ ‖x − c‖²` of the returned assignments.

use burn::prelude::*;
use kv_core::{KvError, Result};
use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

fn default_iters() -> usize {
    25
}
fn default_tol() -> f64 {
    1e-4
}

/// Configuration of [`kmeans`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KMeansConfig {
    /// Clusters per group.
    pub k: usize,
    /// The most Lloyd iterations (0: seeding only).
    #[serde(default = "default_iters")]
    pub max_iters: usize,
    /// Stop when every group's relative objective change `(J_prev − J) / J_prev` is at most
    /// this (a group with `J = 0` has converged).
    #[serde(default = "default_tol")]
    pub tol: f64,
    /// Seed of the k-means++ sampling.
    #[serde(default)]
    pub seed: u64,
}

impl KMeansConfig {
    /// `k` clusters, at most 25 iterations, tolerance `1e-4`, seed 0.
    pub fn new(k: usize) -> Self {
        KMeansConfig {
            k,
            max_iters: default_iters(),
            tol: default_tol(),
            seed: 0,
        }
    }
    /// Sets the iteration cap.
    pub fn with_max_iters(mut self, max_iters: usize) -> Self {
        self.max_iters = max_iters;
        self
    }
    /// Sets the convergence tolerance.
    pub fn with_tol(mut self, tol: f64) -> Self {
        self.tol = tol;
        self
    }
    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Checks the config against `n` points per group.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for `k = 0`, `k > n` (more centroids than points) or a
    /// negative or non-finite tolerance.
    pub fn validate(&self, n: usize) -> Result<()> {
        if self.k == 0 {
            return Err(KvError::InvalidConfig {
                field: "k",
                reason: "k-means needs at least one cluster".into(),
            });
        }
        if self.k > n {
            return Err(KvError::InvalidConfig {
                field: "k",
                reason: format!(
                    "{} clusters requested but only {n} points per group \
                     (k-means needs at least as many points as centroids)",
                    self.k
                ),
            });
        }
        if !(self.tol.is_finite() && self.tol >= 0.0) {
            return Err(KvError::InvalidConfig {
                field: "tol",
                reason: format!("{} is not a finite non-negative tolerance", self.tol),
            });
        }
        Ok(())
    }
}

/// The result of [`kmeans`].
#[derive(Debug, Clone)]
pub struct KMeans {
    /// Centroids, `[groups, k, dim]`.
    pub centroids: Tensor<3>,
    /// Index of the nearest centroid of every point, `[groups, n]`.
    pub assignments: Tensor<2, Int>,
    /// Objective `Σ ‖x − c_a‖²` per group, of the returned centroids and assignments.
    pub objective: Vec<f64>,
    /// Objective summed over groups after seeding and after every iteration (non-increasing).
    pub history: Vec<f64>,
    /// Lloyd updates performed.
    pub iterations: usize,
    /// Whether every group met the tolerance before the iteration cap.
    pub converged: bool,
}

/// Runs batched k-means over `points`, `[groups, n, dim]` (each group clustered on its own).
///
/// # Errors
/// [`KvError::InvalidConfig`] from [`KMeansConfig::validate`]; [`KvError::Empty`] for zero
/// groups, points or dimensions; [`KvError::NonFinite`] for NaN or infinite points.
pub fn kmeans(points: Tensor<3>, cfg: &KMeansConfig) -> Result<KMeans> {
    const OP: &str = "kmeans";
    let [g, n, dim] = points.dims();
    if g == 0 || n == 0 || dim == 0 {
        return Err(KvError::Empty {
            op: OP,
            what: "points",
        });
    }
    cfg.validate(n)?;
    if !points.clone().is_finite().all().into_scalar::<bool>() {
        return Err(KvError::NonFinite {
            op: OP,
            what: "points",
        });
    }
    let mut centroids = seed_plus_plus(&points, cfg.k, cfg.seed);
    let mut history = Vec::new();
    let mut prev: Option<Vec<f64>> = None;
    let mut iterations = 0;
    loop {
        let assignments = assign(&points, &centroids);
        let objective = objective(&points, &centroids, &assignments);
        history.push(objective.iter().sum());
        let converged = match &prev {
            Some(p) => p
                .iter()
                .zip(&objective)
                .all(|(&p, &j)| p <= 0.0 || j <= 0.0 || (p - j) / p <= cfg.tol),
            None => objective.iter().all(|&j| j <= 0.0),
        };
        if converged || iterations == cfg.max_iters {
            return Ok(KMeans {
                centroids,
                assignments,
                objective,
                history,
                iterations,
                converged,
            });
        }
        centroids = update(&points, centroids, &assignments);
        prev = Some(objective);
        iterations += 1;
    }
}

/// Squared distances of every point to one centroid per group: `[groups, n]`.
fn sq_dist_to(points: &Tensor<3>, c: Tensor<3>) -> Tensor<2> {
    let [g, n, _] = points.dims();
    (points.clone() - c)
        .powi_scalar(2)
        .sum_dim(2)
        .reshape([g, n])
}

/// k-means++ (Arthur and Vassilvitskii, 2007): the first centroid uniformly, each next one
/// with probability proportional to the squared distance to the nearest chosen centroid.
/// When every remaining distance is zero (duplicate points), the first unchosen point is taken.
fn seed_plus_plus(points: &Tensor<3>, k: usize, seed: u64) -> Tensor<3> {
    let [g, n, dim] = points.dims();
    let device = points.device();
    let mut rng = SplitMix64::new(seed);
    let mut chosen: Vec<Vec<usize>> = vec![Vec::with_capacity(k); g];
    let mut d2: Option<Tensor<2>> = None;
    let mut host_d2: Vec<f32> = Vec::new();
    let mut parts = Vec::with_capacity(k);
    for c in 0..k {
        let idx: Vec<i32> = (0..g)
            .map(|gi| {
                let pick = if c == 0 {
                    rng.below(n)
                } else {
                    sample(&host_d2[gi * n..(gi + 1) * n], &chosen[gi], &mut rng)
                };
                chosen[gi].push(pick);
                pick as i32
            })
            .collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [g]), &device)
            .reshape([g, 1, 1])
            .expand([g, 1, dim]);
        let centroid = points.clone().gather(1, idx);
        if c + 1 < k {
            let dist = sq_dist_to(points, centroid.clone());
            let next = match d2.take() {
                Some(d) => d.min_pair(dist),
                None => dist,
            };
            host_d2 = next
                .to_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("invariant: float tensors read back as f32");
            d2 = Some(next);
        }
        parts.push(centroid);
    }
    Tensor::cat(parts, 1)
}

fn sample(d2: &[f32], chosen: &[usize], rng: &mut SplitMix64) -> usize {
    let total: f64 = d2.iter().map(|&x| f64::from(x.max(0.0))).sum();
    if total > 0.0 {
        let r = rng.uniform() * total;
        let mut acc = 0.0;
        let mut last_positive = None;
        for (i, &x) in d2.iter().enumerate() {
            if x > 0.0 {
                acc += f64::from(x);
                last_positive = Some(i);
                if acc > r {
                    return i;
                }
            }
        }
        if let Some(i) = last_positive {
            return i;
        }
    }
    (0..d2.len()).find(|i| !chosen.contains(i)).unwrap_or(0)
}

/// The nearest centroid of every point: `[groups, n]`.
fn assign(points: &Tensor<3>, centroids: &Tensor<3>) -> Tensor<2, Int> {
    let [g, n, _] = points.dims();
    let k = centroids.dims()[1];
    let cross = points.clone().matmul(centroids.clone().swap_dims(1, 2)); // [g, n, k]
    let c2 = centroids
        .clone()
        .powi_scalar(2)
        .sum_dim(2)
        .reshape([g, 1, k]);
    // ‖x‖² is the same for every centroid of a point: it does not change the argmin.
    let dist = c2.expand([g, n, k]) - cross.mul_scalar(2.0);
    dist.argmin(2).reshape([g, n])
}

/// `Σ ‖x − c_a‖²` per group, measured directly.
fn objective(points: &Tensor<3>, centroids: &Tensor<3>, assignments: &Tensor<2, Int>) -> Vec<f64> {
    let [g, n, dim] = points.dims();
    let idx = assignments.clone().reshape([g, n, 1]).expand([g, n, dim]);
    let near = centroids.clone().gather(1, idx);
    let j = (points.clone() - near)
        .powi_scalar(2)
        .sum_dim(2)
        .sum_dim(1)
        .reshape([g]);
    j.to_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .expect("invariant: float tensors read back as f64")
}

/// One-hot `[groups, n, k]` (fp32) of the assignments.
pub(crate) fn one_hot(assignments: &Tensor<2, Int>, k: usize) -> Tensor<3> {
    let [g, n] = assignments.dims();
    let device = assignments.device();
    let ids = Tensor::<1, Int>::arange(0..k as i64, &device)
        .cast(burn::tensor::IntDType::from(assignments.dtype()))
        .reshape([1, 1, k])
        .expand([g, n, k]);
    assignments
        .clone()
        .reshape([g, n, 1])
        .expand([g, n, k])
        .equal(ids)
        .float()
}

/// Moves every centroid to the mean of its points; empty clusters keep their centroid.
fn update(points: &Tensor<3>, centroids: Tensor<3>, assignments: &Tensor<2, Int>) -> Tensor<3> {
    let [g, k, dim] = centroids.dims();
    let hot = one_hot(assignments, k); // [g, n, k]
    let counts = hot.clone().sum_dim(1).reshape([g, k, 1]); // [g, k, 1]
    let sums = hot.swap_dims(1, 2).matmul(points.clone()); // [g, k, dim]
    let means = sums / counts.clone().clamp_min(1.0);
    let empty = counts.lower_elem(0.5).expand([g, k, dim]);
    means.mask_where(empty, centroids)
}
