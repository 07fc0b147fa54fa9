//! QJL's sign-sketched keys on the host: scores straight from the packed sign bits and the
//! stored norms, without forming a single float key.
//!
//! For a query row `q` the estimator is (see [`crate::qjl`])
//! `c_in ‖k_in‖ ⟨S q_in, sign(S k_in)⟩ + c_out ‖k_out‖ ⟨S_o q_out, sign(S_o k_out)⟩` with
//! `c = √(π/2)/m`. `S q` is computed once per stream (for all its query rows) on first use;
//! per outlier group only the outlier channels' share `Δ = Σ_{c ∈ out} q_c S[:, c]` is formed
//! (`o` columns of `S`), giving `S q_in = S q − Δ` and `S_o q_out = Δ[..m_o]`. A token then costs
//! one pass over its `m + m_o` sign bits per query row: a `±1` fused multiply-add per bit in
//! [`kernels::score_signs`] (AVX2) or [`kernels::score_signs_generic`].

use core::ops::Range;
use std::sync::OnceLock;

use super::kernels::{self, SignPart};
use super::{dot, floats, words};
use crate::qjl::{QjlKeys, QjlSketch, SQRT_HALF_PI};

/// The outlier part of [`HostSigns`].
#[derive(Debug)]
struct HostOutliers {
    /// `sign(S_o k_out)`, `wout` words per token.
    words: Vec<u32>,
    wout: usize,
    /// `c_out ‖k_out‖` per token.
    norms: Vec<f32>,
    /// `o` channel indices per group.
    indices: Vec<u32>,
}

/// Sketched keys read back for one attention call: sign words, norms with the estimator's
/// constants folded in, outlier channels, `S` (and its transpose for the outlier columns), and
/// the query sketch of every stream once computed.
#[derive(Debug)]
pub(crate) struct HostSigns {
    dims: [usize; 4],
    group: usize,
    outliers: usize,
    m: usize,
    mo: usize,
    /// `sign(S k_in)`, `win` words per token.
    words: Vec<u32>,
    win: usize,
    /// `c_in ‖k_in‖` per token.
    norms: Vec<f32>,
    outlier: Option<HostOutliers>,
    /// `S`, `m × d` row-major.
    proj: Vec<f32>,
    /// `Sᵀ`, `d × m` row-major (empty without outliers).
    proj_t: Vec<f32>,
    /// `S q` per stream: `rows × m`, the rows of the stream's (scaled) query.
    sketched: Vec<OnceLock<Vec<f32>>>,
}

impl HostSigns {
    /// Reads back `keys` (sketched with `sketch`): a copy of the sign words, the fp16 norms
    /// widened to fp32 and the outlier channels; `S` from the sketch.
    pub(crate) fn new(keys: &QjlKeys, sketch: &QjlSketch) -> Self {
        let dims = keys.dims();
        let [b, h, _, d] = dims;
        let m = sketch.sketch_dim();
        let mo = sketch.outlier_sketch_dim();
        let scaled = |n: Vec<f32>, c: f32| n.into_iter().map(|x| x * c).collect::<Vec<_>>();
        let per_token = |w: &[u32]| w.len() / (b * h * dims[2]).max(1);
        let signs = words(keys.signs());
        let outlier = keys.outlier_signs().map(|ow| {
            let ow = words(ow);
            HostOutliers {
                wout: per_token(&ow),
                words: ow,
                norms: scaled(
                    floats(
                        keys.outlier_norms()
                            .expect("invariant: outlier signs have norms"),
                    ),
                    SQRT_HALF_PI / mo as f32,
                ),
                indices: words(
                    keys.outlier_indices()
                        .expect("invariant: outlier signs have indices"),
                ),
            }
        });
        let proj = floats(sketch.projection());
        let proj_t = if outlier.is_some() {
            (0..d * m).map(|i| proj[(i % m) * d + i / m]).collect()
        } else {
            Vec::new()
        };
        HostSigns {
            dims,
            group: keys.group(),
            outliers: keys.outliers(),
            m,
            mo,
            win: per_token(&signs),
            words: signs,
            norms: scaled(floats(keys.inlier_norms()), SQRT_HALF_PI / m as f32),
            outlier,
            proj,
            proj_t,
            sketched: (0..b * h).map(|_| OnceLock::new()).collect(),
        }
    }

    pub(crate) fn tokens(&self) -> usize {
        self.dims[2]
    }

    /// `S q` for the `rows × d` query rows `q` of stream `bh` (computed by the first caller).
    fn sketched_query(&self, bh: usize, q: &[f32]) -> &[f32] {
        self.sketched[bh].get_or_init(|| {
            let d = self.dims[3];
            q.chunks_exact(d)
                .flat_map(|qr| self.proj.chunks_exact(d).map(move |s| dot(s, qr)))
                .collect()
        })
    }
}

/// Scores of the `rows × d` query rows `q` of stream `bh` against the sketched tokens `range`
/// of `s`, token-major into `out[i * rows + r]`.
#[inline(always)]
pub(super) fn score_signs(
    s: &HostSigns,
    range: Range<usize>,
    bh: usize,
    q: &[f32],
    out: &mut [f32],
) {
    let [_, _, n, d] = s.dims;
    let rows = q.len() / d;
    let sq = s.sketched_query(bh, q);
    let (win, wout) = (s.win, s.outlier.as_ref().map_or(0, |o| o.wout));
    // Per row, the inlier query sketch padded to whole words (zeros for the padding bits).
    let mut a_in = vec![0.0f32; rows * 32 * win];
    let mut a_out = vec![0.0f32; rows * 32 * wout];
    let mut q_out = vec![0.0f32; s.outliers];
    if s.outlier.is_none() {
        // No outlier split: the query sketch is the same for every group.
        for (a, sq) in a_in.chunks_exact_mut(32 * win).zip(sq.chunks_exact(s.m)) {
            a[..s.m].copy_from_slice(sq);
        }
    }
    let g = s.group;
    let n_g = n / g;
    let mut t = range.start;
    while t < range.end {
        let group_end = ((t / g + 1) * g).min(range.end);
        if let Some(o) = &s.outlier {
            let k = s.outliers;
            let at = (bh * n_g + t / g) * k;
            let idx = &o.indices[at..at + k];
            for r in 0..rows {
                let qr = &q[r * d..(r + 1) * d];
                for (x, &c) in q_out.iter_mut().zip(idx) {
                    *x = qr[c as usize];
                }
                outlier_split(
                    s,
                    idx,
                    &q_out,
                    &sq[r * s.m..(r + 1) * s.m],
                    &mut a_in[r * 32 * win..r * 32 * win + s.m],
                    &mut a_out[r * 32 * wout..r * 32 * wout + s.mo],
                );
            }
        }
        let (a, b) = (bh * n + t, bh * n + group_end);
        let inliers = SignPart {
            words: &s.words[a * win..b * win],
            words_per_token: win,
            query: &a_in,
            norms: &s.norms[a..b],
        };
        let mut parts = [inliers; 2];
        let count = match &s.outlier {
            Some(o) => {
                parts[1] = SignPart {
                    words: &o.words[a * wout..b * wout],
                    words_per_token: wout,
                    query: &a_out,
                    norms: &o.norms[a..b],
                };
                2
            }
            None => 1,
        };
        let out = &mut out[(t - range.start) * rows..(group_end - range.start) * rows];
        score_parts(&parts[..count], group_end - t, rows, out);
        t = group_end;
    }
}

/// The parts' scores for `tokens` tokens and `rows` rows: the AVX2 kernel in blocks of up to
/// four rows when the CPU has it, the portable loop otherwise.
#[inline(always)]
fn score_parts(parts: &[SignPart<'_>], tokens: usize, rows: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if pulp::x86::V3::try_new().is_some() {
        let mut r0 = 0;
        while r0 < rows {
            let block = (rows - r0).min(4);
            let mut shifted = [parts[0]; 2];
            for (sh, p) in shifted.iter_mut().zip(parts) {
                *sh = SignPart {
                    query: &p.query[r0 * 32 * p.words_per_token..],
                    ..*p
                };
            }
            let shifted = &shifted[..parts.len()];
            let o = &mut out[r0..];
            match block {
                1 => kernels::score_signs::<1>(shifted, tokens, rows, o),
                2 => kernels::score_signs::<2>(shifted, tokens, rows, o),
                3 => kernels::score_signs::<3>(shifted, tokens, rows, o),
                _ => kernels::score_signs::<4>(shifted, tokens, rows, o),
            }
            r0 += block;
        }
        return;
    }
    kernels::score_signs_generic(parts, tokens, rows, rows, out);
}

/// One row's split of the query sketch for a group with outlier channels `idx` (query values
/// `q_out` there): `Δ = Σ_c q_c S[:, c]` accumulated in `a_out` then `a_in = S q − Δ`.
#[inline(always)]
fn outlier_split(
    s: &HostSigns,
    idx: &[u32],
    q_out: &[f32],
    sq: &[f32],
    a_in: &mut [f32],
    a_out: &mut [f32],
) {
    let m = s.m;
    a_in.copy_from_slice(sq);
    let mo = s.mo;
    a_out.iter_mut().for_each(|x| *x = 0.0);
    for (&c, &qc) in idx.iter().zip(q_out) {
        let col = &s.proj_t[c as usize * m..(c as usize + 1) * m];
        super::axpy(-qc, col, a_in);
        super::axpy(qc, &col[..mo], a_out);
    }
}
