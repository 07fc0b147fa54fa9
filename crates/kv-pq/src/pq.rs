//! Product quantization (Jégou, Douze and Schmid, 2011): a vector of `d` channels is split
//! into `m` contiguous subvectors of `d / m` channels, and each subvector is replaced by the
//! index of its nearest centroid in a per-subspace codebook of `K = 2^bits` centroids trained
//! with [`kmeans`](crate::kmeans()).
//!
//! Inner products with a query are computed without decoding (asymmetric distance
//! computation): the look-up table `T[s][c] = q_s · centroid_{s,c}` is built once per query,
//! and the score of a code `(c_1, …, c_m)` is `Σ_s T[s][c_s] = q · decode(code)`.
//!
//! Many independent quantizers (one per sequence and KV head) are trained and used together:
//! every tensor carries a leading `groups` axis.

use burn::prelude::*;
use kv_core::{KvError, Result};

use crate::kmeans::{KMeansConfig, kmeans};

/// The largest supported code width: codes are stored one byte each.
pub const MAX_BITS: u32 = 8;

/// Trained codebooks of `groups` product quantizers.
#[derive(Debug, Clone)]
pub struct ProductQuantizer {
    /// `[groups, m, K, d / m]`.
    codebooks: Tensor<4>,
    bits: u32,
}

impl ProductQuantizer {
    /// Checks `m` and `bits` against `head_dim` channels and `n` training points.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for `m = 0`, `m` not dividing `dim`, `bits` outside `1..=8`,
    /// or fewer points than the `2^bits` centroids.
    pub fn validate(dim: usize, m: usize, bits: u32, n: usize) -> Result<()> {
        if m == 0 || !dim.is_multiple_of(m) {
            return Err(KvError::InvalidConfig {
                field: "subspaces",
                reason: format!("{m} subspaces do not split head_dim {dim} evenly"),
            });
        }
        if !(1..=MAX_BITS).contains(&bits) {
            return Err(KvError::InvalidConfig {
                field: "bits",
                reason: format!("{bits} bits per code: supported are 1 to {MAX_BITS}"),
            });
        }
        let k = 1usize << bits;
        if k > n {
            return Err(KvError::InvalidConfig {
                field: "bits",
                reason: format!(
                    "{k} centroids (2^{bits}) but only {n} points to train them on: \
                     use fewer bits or more tokens"
                ),
            });
        }
        Ok(())
    }

    /// Trains `groups` quantizers on `x`, `[groups, n, d]`, and returns them with the codes
    /// of the training points, `[groups, n, m]`. `kmeans.k` is replaced by `2^bits`.
    ///
    /// # Errors
    /// As [`validate`](Self::validate) and [`kmeans`](crate::kmeans()).
    pub fn train(
        x: Tensor<3>,
        m: usize,
        bits: u32,
        kmeans_cfg: &KMeansConfig,
    ) -> Result<(Self, Tensor<3, Int>)> {
        let [g, n, d] = x.dims();
        Self::validate(d, m, bits, n)?;
        let sub = d / m;
        let k = 1usize << bits;
        let points = x
            .reshape([g, n, m, sub])
            .swap_dims(1, 2)
            .reshape([g * m, n, sub]);
        let cfg = KMeansConfig {
            k,
            ..kmeans_cfg.clone()
        };
        let fit = kmeans(points, &cfg)?;
        let codebooks = fit.centroids.reshape([g, m, k, sub]);
        let codes = fit.assignments.reshape([g, m, n]).swap_dims(1, 2);
        Ok((ProductQuantizer { codebooks, bits }, codes))
    }

    /// Builds quantizers from codebooks `[groups, m, 2^bits, d / m]`.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] if the codebook size is not a power of two in `2..=256`.
    pub fn from_codebooks(codebooks: Tensor<4>) -> Result<Self> {
        let k = codebooks.dims()[2];
        if !k.is_power_of_two() || !(2..=1usize << MAX_BITS).contains(&k) {
            return Err(KvError::InvalidConfig {
                field: "codebooks",
                reason: format!("{k} centroids per subspace is not 2^bits with 1 <= bits <= 8"),
            });
        }
        Ok(ProductQuantizer {
            codebooks,
            bits: k.trailing_zeros(),
        })
    }

    /// The codebooks, `[groups, m, K, d / m]`.
    pub fn codebooks(&self) -> &Tensor<4> {
        &self.codebooks
    }
    /// Bits per code.
    pub fn bits(&self) -> u32 {
        self.bits
    }
    /// Subspaces `m`.
    pub fn subspaces(&self) -> usize {
        self.codebooks.dims()[1]
    }
    /// Centroids per subspace `K = 2^bits`.
    pub fn centroids(&self) -> usize {
        self.codebooks.dims()[2]
    }

    /// Codes of `x`, `[groups, n, d]` → `[groups, n, m]`: the nearest centroid per subspace.
    ///
    /// # Panics
    /// If `x` does not match the codebooks' groups and channels.
    pub fn encode(&self, x: Tensor<3>) -> Tensor<3, Int> {
        let [g, m, k, sub] = self.codebooks.dims();
        let [xg, n, d] = x.dims();
        assert!(
            xg == g && d == m * sub,
            "ProductQuantizer::encode: x {:?} vs codebooks {:?}",
            x.dims(),
            self.codebooks.dims()
        );
        let x = x.reshape([g, n, m, sub]).swap_dims(1, 2); // [g, m, n, sub]
        let cross = x.matmul(self.codebooks.clone().swap_dims(2, 3)); // [g, m, n, k]
        let c2 = self
            .codebooks
            .clone()
            .powi_scalar(2)
            .sum_dim(3)
            .reshape([g, m, 1, k]);
        let dist = c2.expand([g, m, n, k]) - cross.mul_scalar(2.0);
        dist.argmin(3).reshape([g, m, n]).swap_dims(1, 2)
    }

    /// Vectors from codes, `[groups, n, m]` → `[groups, n, d]`.
    ///
    /// # Panics
    /// If `codes` does not match the codebooks' groups and subspaces.
    pub fn decode(&self, codes: Tensor<3, Int>) -> Tensor<3> {
        let [g, m, _, sub] = self.codebooks.dims();
        let [cg, n, cm] = codes.dims();
        assert!(
            cg == g && cm == m,
            "ProductQuantizer::decode: codes {:?} vs codebooks {:?}",
            codes.dims(),
            self.codebooks.dims()
        );
        let idx = codes
            .swap_dims(1, 2)
            .reshape([g, m, n, 1])
            .expand([g, m, n, sub]);
        self.codebooks
            .clone()
            .gather(2, idx.cast(burn::tensor::IntDType::I32))
            .swap_dims(1, 2)
            .reshape([g, n, m * sub])
    }

    /// Look-up tables `T[s][c] = q_s · centroid_{s,c}` of queries `[groups, r, d]`:
    /// `[groups, r, m, K]`.
    ///
    /// # Panics
    /// If `q` does not match the codebooks' groups and channels.
    pub fn lookup_tables(&self, q: Tensor<3>) -> Tensor<4> {
        let [g, m, _, sub] = self.codebooks.dims();
        let [qg, r, d] = q.dims();
        assert!(
            qg == g && d == m * sub,
            "ProductQuantizer::lookup_tables: q {:?} vs codebooks {:?}",
            q.dims(),
            self.codebooks.dims()
        );
        q.reshape([g, r, m, sub])
            .swap_dims(1, 2)
            .matmul(self.codebooks.clone().swap_dims(2, 3))
            .swap_dims(1, 2)
    }

    /// Approximate scores `Σ_s T[s][code_s]` of queries `[groups, r, d]` against codes
    /// `[groups, n, m]`: `[groups, r, n]`, equal to `q · decode(codes)` up to rounding.
    ///
    /// # Panics
    /// If the shapes do not match the codebooks.
    pub fn scores(&self, q: Tensor<3>, codes: Tensor<3, Int>) -> Tensor<3> {
        let lut = self.lookup_tables(q); // [g, r, m, k]
        let [g, r, m, _] = lut.dims();
        let n = codes.dims()[1];
        let idx = codes
            .swap_dims(1, 2)
            .reshape([g, 1, m, n])
            .expand([g, r, m, n])
            .cast(burn::tensor::IntDType::I32);
        lut.gather(3, idx).sum_dim(2).reshape([g, r, n])
    }

    /// Bytes of the codebooks as held.
    pub fn codebook_bytes(&self) -> usize {
        self.codebooks.shape().num_elements() * self.codebooks.dtype().size()
    }
}
