//! Register kernels for the common packed layouts: every token's `W` words
//! (`W ∈ {4, 8, 16}`) hold `C = 32 / B` codes each (`B ∈ {2, 4, 8}`), with no padding, and
//! the codes decode arithmetically (`code - offset`, or a sign-extended byte for `q8_0`).
//!
//! A token is unpacked in *planar* order: slot `k * W + j` holds field `k` of word `j`
//! (channel `j * C + k`), cut into 8-lane chunks, so that a chunk is one variable shift, one
//! mask (or a shift pair that sign-extends) and one int-to-float conversion of 8 codes, held
//! in registers and consumed by fused multiply-adds at once. Lane `i` of chunk `m` stands for
//! word `(8m + i) % W`, and the dot products keep their lanes (even and odd chunks in two
//! accumulators) until the end of the token, so statistics grouped along channels (one scale
//! per word when `C` divides the group) apply per lane:
//! `q · x̂ = Σ_j s_j Σ_k q_{jC+k} code_{jC+k} + const`. The query rows are permuted to the
//! planar order once per segment by the caller.
//!
//! The kernels are written with `pulp`'s safe AVX2/FMA intrinsics and run inside
//! [`crate::host::vectorized`]; [`fast_layout`] chooses them only when the CPU has AVX2 and
//! FMA (on other CPUs and architectures the generic loops of [`crate::host`] run).

/// How codes decode to levels (before the scale and zero point).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Decode {
    /// `code - offset`.
    Affine(f32),
    /// The code read as a signed `B`-bit integer (`q8_0`'s bytes).
    Signed,
}

/// The layout a [`Fast`] kernel takes, decided once per packed store.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Fast {
    pub(super) bits: u32,
    pub(super) words: usize,
    pub(super) decode: Decode,
}

#[cfg(target_arch = "x86_64")]
pub(super) use avx2::{score_channels, score_signs, score_tokens, values_channels};

/// One part of QJL's sign-sketched keys for [`score_signs`]: `words_per_token` packed words of
/// sign bits per token (bit `j` of word `w` is sketch coordinate `32w + j`, set for `+1`), the
/// matching query sketch of every row (`32 · words_per_token` floats per row, zero beyond the
/// sketch dimension, so that padding bits add nothing) and a coefficient per token.
#[derive(Debug, Clone, Copy)]
pub(super) struct SignPart<'a> {
    pub(super) words: &'a [u32],
    pub(super) words_per_token: usize,
    pub(super) query: &'a [f32],
    pub(super) norms: &'a [f32],
}

/// `Σ_parts norms[i] · Σ_j query[r][j] · (±1)_ij` for token `i` of the parts and row `r` of
/// `rows`, written to `out[i * stride + r]`: the portable loop the AVX2 kernel is tested
/// against, and the path on CPUs without AVX2.
#[inline(always)]
pub(super) fn score_signs_generic(
    parts: &[SignPart<'_>],
    tokens: usize,
    rows: usize,
    stride: usize,
    out: &mut [f32],
) {
    for i in 0..tokens {
        for r in 0..rows {
            let mut total = 0.0f32;
            for p in parts {
                let w = p.words_per_token;
                let q = &p.query[r * 32 * w..(r + 1) * 32 * w];
                let mut acc = [0.0f32; 32];
                for (&word, qw) in p.words[i * w..(i + 1) * w].iter().zip(q.chunks_exact(32)) {
                    for (j, (a, &x)) in acc.iter_mut().zip(qw).enumerate() {
                        *a += if (word >> j) & 1 == 1 { x } else { -x };
                    }
                }
                total += p.norms[i] * acc.iter().sum::<f32>();
            }
            out[i * stride + r] = total;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use pulp::x86::V3;
    use pulp::{cast, f32x8, i32x8, u32x8};

    /// The most 8-lane chunks a token unpacks to (`W = 16` words of 2-bit codes).
    const MAX_CHUNKS: usize = 32;

    /// The AVX2 token (the kernels run inside `host::vectorized`, which found it).
    #[inline(always)]
    fn avx2() -> V3 {
        V3::try_new().expect("invariant: Fast layouts are only chosen with AVX2 and FMA")
    }

    /// How a token's words become 8-lane chunks: lane `i` of chunk `m` is planar slot
    /// `8m + i`, i.e. field `(8m + i) / W` of word `(8m + i) % W` (for `W = 4` a chunk holds two
    /// planes, for `W = 16` half of one). `shifts[m]` holds the lanes' shifts (for signed codes,
    /// the left shifts that put the field's top bit at bit 31).
    struct Chunks<const B: u32, const C: usize, const W: usize, const S: bool> {
        shifts: [u32x8; MAX_CHUNKS],
    }

    impl<const B: u32, const C: usize, const W: usize, const S: bool> Chunks<B, C, W, S> {
        const COUNT: usize = W * C / 8;

        #[inline(always)]
        fn new() -> Self {
            let mut shifts = [cast([0u32; 8]); MAX_CHUNKS];
            for (m, sh) in shifts.iter_mut().enumerate().take(Self::COUNT) {
                let mut lanes = [0u32; 8];
                for (i, l) in lanes.iter_mut().enumerate() {
                    let shift = ((8 * m + i) / W) as u32 * B;
                    *l = if S { 32 - B - shift } else { shift };
                }
                *sh = cast(lanes);
            }
            Chunks { shifts }
        }

        /// The token's words as the 8-lane word vectors the chunks read: `W / 8` loads, or for
        /// `W = 4` the four words twice.
        #[inline(always)]
        fn words(w: &[u32; W]) -> [u32x8; 2] {
            let mut v = [[0u32; 8]; 2];
            for (a, va) in v.iter_mut().enumerate() {
                for (i, x) in va.iter_mut().enumerate() {
                    *x = w[(8 * a + i) % W];
                }
            }
            [cast(v[0]), cast(v[1])]
        }

        /// Unpacks one token into `out[..COUNT]`.
        #[inline(always)]
        fn unpack(&self, simd: V3, w: &[u32; W], out: &mut [f32x8; MAX_CHUNKS]) {
            let v = Self::words(w);
            let mask = simd.splat_u32x8((1u32 << B) - 1);
            for (m, (o, &sh)) in out
                .iter_mut()
                .zip(&self.shifts)
                .enumerate()
                .take(Self::COUNT)
            {
                let x = v[m % 2];
                let code: i32x8 = if S {
                    let up: i32x8 = cast(simd.shl_dyn_u32x8(x, sh));
                    // Arithmetic shift: sign-extends the B-bit field.
                    simd.shr_const_i32x8::<24>(up)
                } else {
                    cast(simd.and_u32x8(simd.shr_dyn_u32x8(x, sh), mask))
                };
                *o = simd.convert_i32x8_to_f32x8(code);
            }
        }
    }

    /// The per-lane factors `f[(8a + i) % W]` matching the chunks' lanes (chunk `m` uses `a = m % 2`).
    #[inline(always)]
    fn lane_factors<const W: usize>(per_word: impl Fn(usize) -> f32) -> [f32x8; 2] {
        let mut f = [[0.0f32; 8]; 2];
        for (a, fa) in f.iter_mut().enumerate() {
            for (i, x) in fa.iter_mut().enumerate() {
                *x = per_word((8 * a + i) % W);
            }
        }
        [cast(f[0]), cast(f[1])]
    }

    /// `Σ_m q[m] x[m]` lane by lane, even chunks into the first accumulator, odd into the second.
    #[inline(always)]
    fn lane_dot(simd: V3, q: &[f32x8], x: &[f32x8]) -> [f32x8; 2] {
        let zero = simd.splat_f32x8(0.0);
        let mut a = [zero, zero];
        let (q, _) = pulp::as_arrays::<2, _>(q);
        let (x, _) = pulp::as_arrays::<2, _>(x);
        for (q, x) in q.iter().zip(x) {
            a[0] = simd.mul_add_f32x8(q[0], x[0], a[0]);
            a[1] = simd.mul_add_f32x8(q[1], x[1], a[1]);
        }
        a
    }

    #[inline(always)]
    fn hsum(a: f32x8) -> f32 {
        let a: [f32; 8] = cast(a);
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
    }

    /// The left shifts that move bit `8k + i` of a word to bit 31 in lane `i` of chunk `k`.
    const SIGN_SHIFTS: [[u32; 8]; 4] = {
        let mut s = [[0u32; 8]; 4];
        let mut k = 0;
        while k < 4 {
            let mut i = 0;
            while i < 8 {
                s[k][i] = 31 - (8 * k + i) as u32;
                i += 1;
            }
            k += 1;
        }
        s
    };

    /// [`super::score_signs_generic`] for `R` rows: every word is broadcast once, each 8-bit
    /// chunk becomes eight `±1.0` lanes with one variable shift, one and-not of the sign bit and
    /// one or with `1.0`'s bits, shared by the `R` rows' fused multiply-adds (two accumulators
    /// per row and part). `out[i * stride + r]` for `r < R`.
    #[inline(always)]
    pub(in crate::host) fn score_signs<const R: usize>(
        parts: &[super::SignPart<'_>],
        tokens: usize,
        stride: usize,
        out: &mut [f32],
    ) {
        let simd = avx2();
        let sign = simd.splat_u32x8(0x8000_0000);
        let one = simd.splat_u32x8(1.0f32.to_bits());
        let shifts: [u32x8; 4] = SIGN_SHIFTS.map(cast);
        let zero = simd.splat_f32x8(0.0);
        for i in 0..tokens {
            // Per row, the parts' lane sums scaled by their norms: one reduction per row.
            let mut total = [zero; R];
            for p in parts {
                let w = p.words_per_token;
                let words = &p.words[i * w..(i + 1) * w];
                let q = chunks(&p.query[..R * 32 * w]);
                let (q, _) = q.as_chunks::<4>();
                let qr: [&[[f32x8; 4]]; R] = core::array::from_fn(|r| &q[r * w..(r + 1) * w]);
                let mut acc = [[zero; 2]; R];
                for (j, &word) in words.iter().enumerate() {
                    let x = simd.splat_u32x8(word);
                    for (k, &sh) in shifts.iter().enumerate() {
                        // Bit set: +1.0; clear: the sign bit joins 1.0's bits, -1.0.
                        let pm: f32x8 = cast(
                            simd.or_u32x8(simd.andnot_u32x8(simd.shl_dyn_u32x8(x, sh), sign), one),
                        );
                        for (a, q) in acc.iter_mut().zip(&qr) {
                            a[k % 2] = simd.mul_add_f32x8(q[j][k], pm, a[k % 2]);
                        }
                    }
                }
                let norm = simd.splat_f32x8(p.norms[i]);
                for (t, a) in total.iter_mut().zip(&acc) {
                    *t = simd.mul_add_f32x8(simd.add_f32x8(a[0], a[1]), norm, *t);
                }
            }
            for (o, t) in out[i * stride..i * stride + R].iter_mut().zip(total) {
                *o = hsum(t);
            }
        }
    }

    /// A planar row of `W * C` floats as 8-lane chunks.
    #[inline(always)]
    fn chunks(x: &[f32]) -> &[f32x8] {
        pulp::bytemuck::cast_slice(x)
    }

    /// Scores of keys grouped along tokens, one group: `out[i * rows + r] = qp_r · levels_i + qz[r]`
    /// for the tokens `words` (`W` words each). `qp` holds `rows` planar rows of `W * C` (the query
    /// times the group's scales, permuted to planar order).
    #[inline(always)]
    pub(in crate::host) fn score_tokens<
        const B: u32,
        const C: usize,
        const W: usize,
        const S: bool,
    >(
        words: &[u32],
        qp: &[f32],
        qz: &[f32],
        out: &mut [f32],
    ) {
        let simd = avx2();
        let ch = Chunks::<B, C, W, S>::new();
        let m = Chunks::<B, C, W, S>::COUNT;
        let rows = qz.len();
        let qp = chunks(qp);
        let mut xs = [simd.splat_f32x8(0.0); MAX_CHUNKS];
        let (tok, _) = words.as_chunks::<W>();
        for (w, o) in tok.iter().zip(out.chunks_exact_mut(rows)) {
            ch.unpack(simd, w, &mut xs);
            for (r, o) in o.iter_mut().enumerate() {
                let a = lane_dot(simd, &qp[r * m..(r + 1) * m], &xs[..m]);
                *o = hsum(simd.add_f32x8(a[0], a[1])) + qz[r];
            }
        }
    }

    /// Scores of keys grouped along channels (groups of `g` channels, `C` dividing `g`):
    /// `out[i * rows + r] = Σ_j s_{i,j/(g/C)} (qv_r · levels_i)_j + Σ_k zc_{i,k} qsum[r][k]` with
    /// `qv` the query rows permuted to planar order, `s` and `zc` the per-token statistics rows
    /// (`zc = z - offset · s`, `groups` per token) and `qsum[r][k]` the query's sum over group `k`.
    #[expect(
        clippy::too_many_arguments,
        reason = "one kernel's operands; a struct would only rename them"
    )]
    #[inline(always)]
    pub(in crate::host) fn score_channels<
        const B: u32,
        const C: usize,
        const W: usize,
        const S: bool,
    >(
        words: &[u32],
        qv: &[f32],
        scales: &[f32],
        zc: &[f32],
        groups: usize,
        qsum: &[f32],
        rows: usize,
        out: &mut [f32],
    ) {
        let simd = avx2();
        let ch = Chunks::<B, C, W, S>::new();
        let m = Chunks::<B, C, W, S>::COUNT;
        let per = W / groups;
        let qv = chunks(qv);
        let mut xs = [simd.splat_f32x8(0.0); MAX_CHUNKS];
        let (tok, _) = words.as_chunks::<W>();
        for (i, (w, o)) in tok.iter().zip(out.chunks_exact_mut(rows)).enumerate() {
            ch.unpack(simd, w, &mut xs);
            let s = &scales[i * groups..(i + 1) * groups];
            let sw = lane_factors::<W>(|j| s[j / per]);
            let z = &zc[i * groups..(i + 1) * groups];
            for (r, o) in o.iter_mut().enumerate() {
                let a = lane_dot(simd, &qv[r * m..(r + 1) * m], &xs[..m]);
                let t = simd.mul_add_f32x8(a[1], sw[1], simd.mul_f32x8(a[0], sw[0]));
                let mut acc = hsum(t);
                for (zk, qk) in z.iter().zip(&qsum[r * groups..(r + 1) * groups]) {
                    acc += zk * qk;
                }
                *o = acc;
            }
        }
    }

    /// Weighted values grouped along channels: for every token `i` and row `r` with weight
    /// `p[i * rows + r]`, adds `p · s` times the levels to `accp[r]` (planar, `W * C`) and
    /// `p · zc` to `zacc[r]` (`groups` per row). Tokens whose weights are all zero are skipped.
    #[expect(
        clippy::too_many_arguments,
        reason = "one kernel's operands; a struct would only rename them"
    )]
    #[inline(always)]
    pub(in crate::host) fn values_channels<
        const B: u32,
        const C: usize,
        const W: usize,
        const S: bool,
    >(
        words: &[u32],
        p: &[f32],
        scales: &[f32],
        zc: &[f32],
        groups: usize,
        rows: usize,
        accp: &mut [f32],
        zacc: &mut [f32],
    ) {
        let simd = avx2();
        let ch = Chunks::<B, C, W, S>::new();
        let m = Chunks::<B, C, W, S>::COUNT;
        let per = W / groups;
        let accp: &mut [f32x8] = pulp::bytemuck::cast_slice_mut(accp);
        let mut xs = [simd.splat_f32x8(0.0); MAX_CHUNKS];
        let (tok, _) = words.as_chunks::<W>();
        for (i, (w, pr)) in tok.iter().zip(p.chunks_exact(rows)).enumerate() {
            if pr.iter().all(|&x| x == 0.0) {
                continue;
            }
            ch.unpack(simd, w, &mut xs);
            let s = &scales[i * groups..(i + 1) * groups];
            let sw = lane_factors::<W>(|j| s[j / per]);
            let z = &zc[i * groups..(i + 1) * groups];
            for (r, &wr) in pr.iter().enumerate() {
                let wv = simd.splat_f32x8(wr);
                let ps = [simd.mul_f32x8(wv, sw[0]), simd.mul_f32x8(wv, sw[1])];
                let (acc2, _) = pulp::as_arrays_mut::<2, _>(&mut accp[r * m..(r + 1) * m]);
                let (x2, _) = pulp::as_arrays::<2, _>(&xs[..m]);
                for (a, x) in acc2.iter_mut().zip(x2) {
                    a[0] = simd.mul_add_f32x8(ps[0], x[0], a[0]);
                    a[1] = simd.mul_add_f32x8(ps[1], x[1], a[1]);
                }
                for (za, zk) in zacc[r * groups..(r + 1) * groups].iter_mut().zip(z) {
                    *za += wr * zk;
                }
            }
        }
    }
}

/// Calls `$f::<B, C, W, S>($args)` for the layout `$fast` (a [`Fast`]).
#[cfg(target_arch = "x86_64")]
macro_rules! dispatch {
    ($fast:expr, $f:ident($($arg:expr),* $(,)?)) => {{
        use $crate::host::kernels::Decode;
        let fast = $fast;
        let signed = fast.decode == Decode::Signed;
        match (fast.bits, fast.words, signed) {
            (2, 4, false) => $f::<2, 16, 4, false>($($arg),*),
            (2, 8, false) => $f::<2, 16, 8, false>($($arg),*),
            (2, 16, false) => $f::<2, 16, 16, false>($($arg),*),
            (4, 4, false) => $f::<4, 8, 4, false>($($arg),*),
            (4, 8, false) => $f::<4, 8, 8, false>($($arg),*),
            (4, 16, false) => $f::<4, 8, 16, false>($($arg),*),
            (8, 4, false) => $f::<8, 4, 4, false>($($arg),*),
            (8, 8, false) => $f::<8, 4, 8, false>($($arg),*),
            (8, 16, false) => $f::<8, 4, 16, false>($($arg),*),
            (8, 4, true) => $f::<8, 4, 4, true>($($arg),*),
            (8, 8, true) => $f::<8, 4, 8, true>($($arg),*),
            (8, 16, true) => $f::<8, 4, 16, true>($($arg),*),
            _ => unreachable!("invariant: Fast layouts are checked when the store is read"),
        }
    }};
}
/// Without AVX2 no layout is [`Fast`] (see [`fast_layout`]).
#[cfg(not(target_arch = "x86_64"))]
macro_rules! dispatch {
    ($fast:expr, $f:ident($($arg:expr),* $(,)?)) => {{
        let _ = $fast;
        $(let _ = $arg;)*
        unreachable!("invariant: no Fast layouts without AVX2")
    }};
}
pub(super) use dispatch;

/// The [`Fast`] layout of a store with `bits`-bit codes, `words` words per token of `d`
/// channels, levels `levels` and statistics grouped every `group` channels (`None`: grouped
/// along tokens), if the kernels take it.
pub(super) fn fast_layout(
    bits: u32,
    words: usize,
    d: usize,
    levels: &[f32],
    has_high: bool,
    channel_group: Option<usize>,
) -> Option<Fast> {
    let c = (32 / bits) as usize;
    let decode = if let Some(&l0) = levels.first()
        && levels
            .iter()
            .enumerate()
            .all(|(code, &l)| l == code as f32 + l0)
    {
        Decode::Affine(-l0)
    } else if bits == 8
        && levels
            .iter()
            .enumerate()
            .all(|(code, &l)| l == f32::from(code as u8 as i8))
    {
        Decode::Signed
    } else {
        return None;
    };
    let layout_ok = matches!(bits, 2 | 4 | 8) && matches!(words, 4 | 8 | 16) && d == words * c;
    let groups_ok = channel_group
        .is_none_or(|g| g.is_multiple_of(c) && d.is_multiple_of(g) && words.is_multiple_of(d / g));
    #[cfg(target_arch = "x86_64")]
    let simd = pulp::x86::V3::try_new().is_some();
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    (simd && layout_ok && groups_ok && !has_high).then_some(Fast {
        bits,
        words,
        decode,
    })
}

/// The channel held by planar slot `k * W + j` (plane `k`, word `j`).
#[inline(always)]
pub(super) fn channel_of_slot(slot: usize, words: usize, c: usize) -> usize {
    (slot % words) * c + slot / words
}
