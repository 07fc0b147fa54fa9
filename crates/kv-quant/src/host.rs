//! Fused decode attention over packed codes, computed on the host for caches whose tensors
//! live in host memory (the CPU backends `flex` and `ndarray`).
//!
//! The tensor-op path ([`crate::attend`]) dequantizes every chunk into fp32 tensors with a
//! dozen elementwise passes before a matmul reads them again; for a decode step (a handful
//! of query rows per KV head) that costs several times the dense attention. Here the packed
//! words are read once per step and every code is unpacked into a register-sized buffer that
//! is consumed immediately, so the cache is never materialised in full precision, not even a
//! chunk of it:
//!
//! - **keys grouped along tokens** (KIVI's per-channel keys, scale `s_c` and zero `z_c` per
//!   group of `G` tokens): `q · k̂ = Σ_c (q_c s_c) code_c + Σ_c q_c z_c`; the scaled query
//!   `q ⊙ s` and the constant `q · z` are formed once per group, so a token costs one unpack
//!   and one dot product per query row;
//! - **values grouped along channels** (KIVI's per-token values, `s_k`, `z_k` per group `k`
//!   of channels): `Σ_t p_t v̂_t = Σ_t Σ_k (p_t s_tk) code_tk + Σ_k (Σ_t p_t z_tk)`, one
//!   axpy per token and row, the zero term accumulated per group and added once;
//! - the other two combinations (keys along channels, values along tokens) and the
//!   full-precision parts (windows, sinks, the pending block) are handled the same way.
//!
//! QJL's keys (sign bits of a sketch, see [`crate::qjl`]) are scored by [`signs`]: the query
//! is sketched once per stream and every key is scored from its packed signs and norms.
//!
//! Codes map to levels through a table (`levels[code]`), so llama.cpp's formats (`q8_0`'s
//! signed bytes, `q4_0`'s offset, `iq4_nl`'s non-linear table, the `q5_*` high-bit plane) and
//! fp8 reuse the kernels: `x̂ = levels[code] · s + z`. The common layouts (2-, 4- and 8-bit
//! codes, 4 to 16 words per token, levels `code - offset` or `q8_0`'s signed bytes) take the
//! register kernels of [`kernels`] on CPUs with AVX2: planar 8-lane unpacking straight into
//! fused multiply-adds, no table and no buffer pass.
//!
//! Softmax is exact (not online): the scores of a query row over all held tokens are a few
//! hundred kilobytes at most for decode-sized queries, which is why callers take this path
//! only for queries of at most [`HOST_MAX_ROWS`] rows per KV head. Keys whose original position
//! is after the query's (or `PAD`) get no weight; a row that sees nothing gets a zero output
//! and a log-sum-exp of `f32::MIN`, as [`kv_core::reference_attention_lse`] gives.

use core::ops::Range;

use burn::prelude::*;
use kv_core::{PAD, Query};

use crate::group::{GroupAxis, QuantizedTensor};
use crate::packing::BitWidth;

mod kernels;
mod signs;

use kernels::{Decode, Fast};
#[cfg(target_arch = "x86_64")]
use kernels::{score_channels, score_tokens, values_channels};
pub(crate) use signs::HostSigns;

/// The most query rows per KV head (`q_heads / kv_heads × query tokens`) the host path takes;
/// larger queries (prefill chunks) go through the tensor ops, whose matmuls amortise the
/// dequantization over many rows.
pub(crate) const HOST_MAX_ROWS: usize = 64;

/// Whether tensors on `device` live in host memory, so that reading them back is a copy of
/// their bytes and the host kernels apply (the CPU backends `flex` and `ndarray`).
pub(crate) fn host_memory(device: &Device) -> bool {
    let name = format!("{:?}", device.as_dispatch());
    name.starts_with("Flex") || name.starts_with("NdArray")
}

/// Whether a query of `query` against `kv_heads` KV heads on `device` takes the host path.
pub(crate) fn use_host(device: &Device, query: &Query, kv_heads: usize) -> bool {
    let [_, qh, n, _] = query.tensor().dims();
    qh / kv_heads * n <= HOST_MAX_ROWS && host_memory(device)
}

/// A float tensor's values as fp32 on the host (fp16 converted on the host, one vectorised
/// pass).
pub(crate) fn floats<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    let data = t.to_data();
    if let Ok(h) = data.as_slice::<burn::tensor::f16>() {
        return vectorized(HalfToF32(h));
    }
    data.try_into_vec_as::<f32>()
        .expect("invariant: a float tensor reads back as f32")
}

/// fp16 to fp32, exact for every value (zero, subnormals, infinities and NaN included), on
/// the bits so that the loop vectorises (the `half` crate converts one value per call here).
struct HalfToF32<'a>(&'a [burn::tensor::f16]);

impl Task for HalfToF32<'_> {
    type Output = Vec<f32>;
    #[inline(always)]
    fn run(self) -> Vec<f32> {
        self.0
            .iter()
            .map(|h| f16_bits_to_f32(h.to_bits()))
            .collect()
    }
}

/// F. Giesen's branch-free conversion: move exponent and mantissa into place, rebias, then
/// fix up infinities and NaN (exponent 31) and renormalise zeros and subnormals through a
/// float subtraction.
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    const SHIFTED_EXP: u32 = 0x7c00 << 13;
    let h = u32::from(h);
    let mut o = (h & 0x7fff) << 13;
    let exp = o & SHIFTED_EXP;
    o += (127 - 15) << 23;
    if exp == SHIFTED_EXP {
        o += (128 - 16) << 23;
    } else if exp == 0 {
        o += 1 << 23;
        o = (f32::from_bits(o) - f32::from_bits(113 << 23)).to_bits();
    }
    f32::from_bits(o | ((h & 0x8000) << 16))
}

/// Packed `U32` words on the host.
pub(crate) fn words<const D: usize>(t: &Tensor<D, Int>) -> Vec<u32> {
    t.to_data()
        .try_into_vec_as::<u32>()
        .expect("invariant: packed words read back as u32")
}

/// A full-precision `[batch, heads, tokens, head_dim]` tensor read back as fp32.
#[derive(Debug)]
pub(crate) struct HostDense {
    dims: [usize; 4],
    data: Vec<f32>,
}

impl HostDense {
    pub(crate) fn new(t: &Tensor<4>) -> Self {
        HostDense {
            dims: t.dims(),
            data: floats(t),
        }
    }
    pub(crate) fn tokens(&self) -> usize {
        self.dims[2]
    }
    #[inline(always)]
    fn row(&self, bh: usize, t: usize) -> &[f32] {
        let [_, _, n, d] = self.dims;
        let o = (bh * n + t) * d;
        &self.data[o..o + d]
    }
}

/// Packed codes read back with fp32 statistics: `x̂[t][c] = levels[code] · s + z`, the
/// statistics grouped along `axis` in groups of `group` (see [`crate::group`]).
#[derive(Debug)]
pub(crate) struct HostCodes {
    dims: [usize; 4],
    bits: BitWidth,
    words: Vec<u32>,
    /// One word per 32 channels: bit `j` is the fifth bit of element `j` of the block.
    high: Option<Vec<u32>>,
    levels: Vec<f32>,
    /// `Some(offset)` when `levels[c] = c - offset`: unpacked arithmetically, no table.
    affine: Option<f32>,
    axis: GroupAxis,
    group: usize,
    scales: Vec<f32>,
    zeros: Option<Vec<f32>>,
    /// Words per token.
    wpt: usize,
    /// The register-sized kernels' layout, when they apply (see [`kernels`]).
    fast: Option<Fast>,
}

impl HostCodes {
    /// Fills in the derived fields.
    fn finish(mut self) -> Self {
        let [_, _, _, d] = self.dims;
        self.wpt = self.bits.words_for(d);
        let channel_group = (self.axis == GroupAxis::Channels).then_some(self.group);
        self.fast = kernels::fast_layout(
            self.bits.bits(),
            self.wpt,
            d,
            &self.levels,
            self.high.is_some(),
            channel_group,
        );
        self
    }

    /// A [`QuantizedTensor`]: levels `code - offset` (the symmetric offset, 0 asymmetric).
    pub(crate) fn from_quantized(q: &QuantizedTensor) -> Self {
        let spec = q.spec();
        let offset = match spec.mode() {
            crate::QuantMode::Asymmetric => 0.0,
            crate::QuantMode::Symmetric => ((1u32 << (spec.bits().bits() - 1)) - 1) as f32,
        };
        let levels = (0..=spec.bits().max_code())
            .map(|c| c as f32 - offset)
            .collect();
        HostCodes {
            dims: q.dims(),
            bits: spec.bits(),
            words: words(q.codes()),
            high: None,
            levels,
            affine: Some(offset),
            axis: spec.axis(),
            group: spec.group(),
            scales: floats(q.scales()),
            zeros: q.zeros().map(floats),
            wpt: 0,
            fast: None,
        }
        .finish()
    }

    /// Codes with explicit levels and per-token statistics every `group` channels
    /// (`scales`, `zeros`: `[batch, heads, tokens, head_dim / group]`).
    pub(crate) fn per_token(
        dims: [usize; 4],
        bits: BitWidth,
        words: Vec<u32>,
        high: Option<Vec<u32>>,
        levels: Vec<f32>,
        group: usize,
        scales: Vec<f32>,
        zeros: Option<Vec<f32>>,
    ) -> Self {
        let affine = levels
            .first()
            .map(|&l0| -l0)
            .filter(|&off| levels.iter().enumerate().all(|(c, &l)| l == c as f32 - off));
        HostCodes {
            dims,
            bits,
            words,
            high,
            levels,
            affine,
            axis: GroupAxis::Channels,
            group,
            scales,
            zeros,
            wpt: 0,
            fast: None,
        }
        .finish()
    }

    pub(crate) fn tokens(&self) -> usize {
        self.dims[2]
    }

    #[inline(always)]
    fn words_per_token(&self) -> usize {
        self.wpt
    }

    /// Whether the planar key kernel applies: statistics along tokens (one scale per channel,
    /// so any order of the channels works), affine levels and no high-bit plane. (Statistics
    /// along channels would need a per-word scale vector in planar order; with SSE2 only,
    /// the short per-word loops measured slower than the natural order, so they stay natural.)
    fn planar(&self) -> bool {
        self.axis == GroupAxis::Tokens && self.affine.is_some() && self.high.is_none()
    }

    /// The channel of planar slot `slot` (`None` for a word's padding).
    #[inline(always)]
    fn channel(&self, slot: usize) -> Option<usize> {
        let w = self.words_per_token();
        let c = self.bits.codes_per_word();
        let ch = (slot % w) * c + slot / w;
        (ch < self.dims[3]).then_some(ch)
    }

    /// Token `t` of stream `bh` unpacked in planar order: slot `k * W + w` holds field `k` of
    /// word `w` (channel `w * c + k`), so that every field is one constant shift over all
    /// words (vectorised). `out.len()` is `W * c`.
    #[inline(always)]
    fn unpack_planar(&self, bh: usize, t: usize, out: &mut [f32]) {
        let n = self.dims[2];
        let w = self.words_per_token();
        let o = (bh * n + t) * w;
        let words = &self.words[o..o + w];
        let off = self.affine.unwrap_or(0.0);
        match self.bits.bits() {
            1 => planar_const::<1, 32>(words, off, out),
            2 => planar_const::<2, 16>(words, off, out),
            3 => planar_const::<3, 10>(words, off, out),
            4 => planar_const::<4, 8>(words, off, out),
            _ => planar_const::<8, 4>(words, off, out),
        }
    }

    /// Levels of token `t` of stream `bh` into `out` (`head_dim` entries).
    #[inline(always)]
    fn unpack(&self, bh: usize, t: usize, out: &mut [f32]) {
        let [_, _, n, d] = self.dims;
        let w = self.words_per_token();
        let o = (bh * n + t) * w;
        let words = &self.words[o..o + w];
        match &self.high {
            None => match self.affine {
                Some(off) => unpack_affine(words, self.bits, off, out),
                None => unpack_levels(words, self.bits, &self.levels, out),
            },
            Some(high) => {
                let nb = d / 32;
                let hw = &high[(bh * n + t) * nb..(bh * n + t + 1) * nb];
                unpack_levels_high(words, hw, &self.levels, out);
            }
        }
    }

    /// The statistics of token `t` of stream `bh`: scales and zeros of its groups (a row of
    /// `head_dim` for [`GroupAxis::Tokens`], `head_dim / G` for [`GroupAxis::Channels`]).
    #[inline(always)]
    fn stats(&self, bh: usize, t: usize) -> (&[f32], Option<&[f32]>) {
        let [_, _, n, d] = self.dims;
        let (row, width) = match self.axis {
            GroupAxis::Tokens => (bh * n.div_ceil(self.group) + t / self.group, d),
            GroupAxis::Channels => (bh * n + t, d / self.group),
        };
        let r = row * width..(row + 1) * width;
        (&self.scales[r.clone()], self.zeros.as_ref().map(|z| &z[r]))
    }
}

/// Unpacks one token's codes through `levels`; `out.len()` codes.
#[inline(always)]
fn unpack_levels(words: &[u32], bits: BitWidth, levels: &[f32], out: &mut [f32]) {
    match bits.bits() {
        1 => unpack_const::<1>(words, levels, out),
        2 => unpack_const::<2>(words, levels, out),
        3 => unpack_const::<3>(words, levels, out),
        4 => unpack_const::<4>(words, levels, out),
        _ => unpack_const::<8>(words, levels, out),
    }
}

#[inline(always)]
fn unpack_const<const B: u32>(words: &[u32], levels: &[f32], out: &mut [f32]) {
    let c = (32 / B) as usize;
    let mask = (1u32 << B) - 1;
    let full = out.len() / c;
    for (chunk, &w) in out.chunks_exact_mut(c).zip(words).take(full) {
        for (k, o) in chunk.iter_mut().enumerate() {
            *o = levels[((w >> (k as u32 * B)) & mask) as usize];
        }
    }
    let rest = out.len() - full * c;
    if rest > 0 {
        let w = words[full];
        for (k, o) in out[full * c..].iter_mut().enumerate() {
            *o = levels[((w >> (k as u32 * B)) & mask) as usize];
        }
    }
}

/// Unpacks one token's codes as `code - offset`; `out.len()` codes.
#[inline(always)]
fn unpack_affine(words: &[u32], bits: BitWidth, offset: f32, out: &mut [f32]) {
    match bits.bits() {
        1 => unpack_affine_const::<1, 32>(words, offset, out),
        2 => unpack_affine_const::<2, 16>(words, offset, out),
        3 => unpack_affine_const::<3, 10>(words, offset, out),
        4 => unpack_affine_const::<4, 8>(words, offset, out),
        _ => unpack_affine_const::<8, 4>(words, offset, out),
    }
}

#[inline(always)]
fn unpack_affine_const<const B: u32, const C: usize>(words: &[u32], offset: f32, out: &mut [f32]) {
    let mask = (1u32 << B) - 1;
    let full = out.len() / C;
    let (head, tail) = out.split_at_mut(full * C);
    for (chunk, &w) in head.chunks_exact_mut(C).zip(words) {
        let chunk: &mut [f32; C] = chunk.try_into().expect("invariant: chunks of C");
        for k in 0..C {
            chunk[k] = ((w >> (k as u32 * B)) & mask) as f32 - offset;
        }
    }
    if !tail.is_empty() {
        let w = words[full];
        for (k, o) in tail.iter_mut().enumerate() {
            *o = ((w >> (k as u32 * B)) & mask) as f32 - offset;
        }
    }
}

#[inline(always)]
fn planar_const<const B: u32, const C: usize>(words: &[u32], offset: f32, out: &mut [f32]) {
    let mask = (1u32 << B) - 1;
    let w = words.len();
    for (k, plane) in out.chunks_exact_mut(w).take(C).enumerate() {
        let shift = k as u32 * B;
        for (o, &x) in plane.iter_mut().zip(words) {
            *o = ((x >> shift) & mask) as f32 - offset;
        }
    }
}

/// `q5_*`: four low bits from `words`, the fifth from the block's `high` word.
#[inline(always)]
fn unpack_levels_high(words: &[u32], high: &[u32], levels: &[f32], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        let lo = (words[i / 8] >> ((i % 8) as u32 * 4)) & 15;
        let hi = (high[i / 32] >> (i % 32) as u32) & 1;
        *o = levels[(lo | (hi << 4)) as usize];
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, ar) = a.split_at(a.len() - a.len() % 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Where a run of held tokens is stored: `range` (local to the source) holds the tokens that
/// come next in the cache's order.
#[derive(Debug, Clone)]
pub(crate) struct Segment<'a> {
    pub(crate) src: Source<'a>,
    pub(crate) range: Range<usize>,
}

/// A segment's storage.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source<'a> {
    Dense(&'a HostDense),
    Codes(&'a HostCodes),
    /// QJL's sign-sketched keys (keys only: they have no values to sum).
    Signs(&'a HostSigns),
}

impl Source<'_> {
    fn tokens(&self) -> usize {
        match self {
            Source::Dense(x) => x.tokens(),
            Source::Codes(x) => x.tokens(),
            Source::Signs(x) => x.tokens(),
        }
    }
}

/// The segments of a cache of `len` tokens held as whole `parts` in token order, except that
/// `pending` (when held) stands for the last tokens, whatever part also holds them.
pub(crate) fn ordered<'a>(
    parts: &[Option<Source<'a>>],
    pending: Option<&'a HostDense>,
    len: usize,
) -> Vec<Segment<'a>> {
    let whole = parts
        .iter()
        .flatten()
        .map(|&src| Segment {
            src,
            range: 0..src.tokens(),
        })
        .collect();
    let np = pending.map_or(0, HostDense::tokens);
    let mut out = clip(whole, len - np);
    if let Some(p) = pending {
        out.push(Segment {
            src: Source::Dense(p),
            range: 0..np,
        });
    }
    out
}

/// An ordered list of segments with the tokens `start..start + src.tokens()` read from `src`
/// instead, for `over = Some((start, src))` (window tokens that were just quantized and are
/// attended as the window held them); the list unchanged for `None`.
pub(crate) fn overlay<'a>(
    segments: Vec<Segment<'a>>,
    over: Option<&'a (usize, HostDense)>,
) -> Vec<Segment<'a>> {
    let Some((start, src)) = over else {
        return segments;
    };
    let start = *start;
    let total = segments.iter().map(|s| s.range.len()).sum();
    let end = start + src.tokens();
    let mut out = window(&segments, 0..start);
    out.push(Segment {
        src: Source::Dense(src),
        range: 0..src.tokens(),
    });
    out.extend(window(&segments, end..total));
    out
}

/// The tokens `range` (in the cache's order) of an ordered list of segments.
fn window<'a>(segments: &[Segment<'a>], range: Range<usize>) -> Vec<Segment<'a>> {
    let mut out = Vec::new();
    let mut at = 0;
    for s in segments {
        let (a, b) = (at, at + s.range.len());
        at = b;
        let (lo, hi) = (a.max(range.start), b.min(range.end));
        if lo < hi {
            out.push(Segment {
                src: s.src,
                range: s.range.start + lo - a..s.range.start + hi - a,
            });
        }
    }
    out
}

/// Keeps the first `end` tokens of an ordered list of segments.
pub(crate) fn clip(segments: Vec<Segment<'_>>, end: usize) -> Vec<Segment<'_>> {
    let mut out = Vec::with_capacity(segments.len());
    let mut at = 0;
    for mut s in segments {
        if at >= end {
            break;
        }
        let n = s.range.len().min(end - at);
        s.range.end = s.range.start + n;
        at += n;
        if n > 0 {
            out.push(s);
        }
    }
    out
}

/// Scores of the `rows` query rows `q` (`rows × d`, scaled) against the tokens of `seg` of
/// stream `bh`, written token-major to `out[t * rows + r]` for the segment's `t` (from 0).
#[inline(always)]
fn score_segment(seg: &Segment<'_>, bh: usize, q: &[f32], d: usize, out: &mut [f32]) {
    if let Source::Signs(s) = seg.src {
        return signs::score_signs(s, seg.range.clone(), bh, q, out);
    }
    if let Source::Codes(c) = seg.src
        && let Some(fast) = c.fast
    {
        return score_fast(c, fast, seg.range.clone(), bh, q, d, out);
    }
    if let Source::Codes(c) = seg.src
        && c.planar()
    {
        return score_planar(c, seg.range.clone(), bh, q, d, out);
    }
    let rows = q.len() / d;
    let mut buf = vec![0.0f32; d];
    match seg.src {
        Source::Signs(_) => unreachable!("invariant: sign sketches are scored above"),
        Source::Dense(x) => {
            for (i, t) in seg.range.clone().enumerate() {
                let k = x.row(bh, t);
                for r in 0..rows {
                    out[i * rows + r] = dot(&q[r * d..(r + 1) * d], k);
                }
            }
        }
        Source::Codes(c) => match c.axis {
            GroupAxis::Tokens => {
                // Fold the group's scale into the query and its zero into a constant.
                let g = c.group;
                let mut qs = vec![0.0f32; rows * d];
                let mut qz = vec![0.0f32; rows];
                let mut t = seg.range.start;
                while t < seg.range.end {
                    let group_end = ((t / g + 1) * g).min(seg.range.end);
                    let (s, z) = c.stats(bh, t);
                    for r in 0..rows {
                        let qr = &q[r * d..(r + 1) * d];
                        for ((o, &a), &b) in qs[r * d..(r + 1) * d].iter_mut().zip(qr).zip(s) {
                            *o = a * b;
                        }
                        qz[r] = z.map_or(0.0, |z| dot(qr, z));
                    }
                    for tt in t..group_end {
                        c.unpack(bh, tt, &mut buf);
                        let i = tt - seg.range.start;
                        for r in 0..rows {
                            out[i * rows + r] = dot(&qs[r * d..(r + 1) * d], &buf) + qz[r];
                        }
                    }
                    t = group_end;
                }
            }
            GroupAxis::Channels => {
                let g = c.group;
                let groups = d / g;
                // Σ_c∈k q_c, for the zero points.
                let qsum: Vec<f32> = (0..rows * groups)
                    .map(|rk| {
                        let (r, k) = (rk / groups, rk % groups);
                        q[r * d + k * g..r * d + (k + 1) * g].iter().sum()
                    })
                    .collect();
                for (i, t) in seg.range.clone().enumerate() {
                    c.unpack(bh, t, &mut buf);
                    let (s, z) = c.stats(bh, t);
                    for r in 0..rows {
                        let qr = &q[r * d..(r + 1) * d];
                        let mut acc = 0.0;
                        for k in 0..groups {
                            let part = dot(&qr[k * g..(k + 1) * g], &buf[k * g..(k + 1) * g]);
                            acc += s[k] * part;
                            if let Some(z) = z {
                                acc += z[k] * qsum[r * groups + k];
                            }
                        }
                        out[i * rows + r] = acc;
                    }
                }
            }
        },
    }
}

/// The query rows `q` (`rows × d`) permuted to the planar order of `fast`.
fn planar_rows(q: &[f32], d: usize, fast: Fast) -> Vec<f32> {
    let c = d / fast.words;
    let rows = q.len() / d;
    let mut out = vec![0.0f32; rows * d];
    for r in 0..rows {
        for slot in 0..d {
            out[r * d + slot] = q[r * d + kernels::channel_of_slot(slot, fast.words, c)];
        }
    }
    out
}

/// Per-token statistics grouped along channels of the tokens `range` of stream `bh`: the
/// scales and the constants `z - offset · s` (the zero points, with the affine offset folded
/// in), `d / group` per token.
fn channel_stats(c: &HostCodes, fast: Fast, range: Range<usize>, bh: usize) -> (&[f32], Vec<f32>) {
    let n = c.dims[2];
    let groups = c.dims[3] / c.group;
    let r = (bh * n + range.start) * groups..(bh * n + range.end) * groups;
    let s = &c.scales[r.clone()];
    let off = match fast.decode {
        Decode::Affine(off) => off,
        Decode::Signed => 0.0,
    };
    let zc = match &c.zeros {
        Some(z) => z[r].iter().zip(s).map(|(&z, &s)| z - off * s).collect(),
        None => s.iter().map(|&s| -off * s).collect(),
    };
    (s, zc)
}

/// [`score_segment`] for codes with a [`Fast`] layout (see [`kernels`]).
#[inline(always)]
fn score_fast(
    c: &HostCodes,
    fast: Fast,
    range: Range<usize>,
    bh: usize,
    q: &[f32],
    d: usize,
    out: &mut [f32],
) {
    let rows = q.len() / d;
    let n = c.dims[2];
    let w = fast.words;
    let words = |a: usize, b: usize| &c.words[(bh * n + a) * w..(bh * n + b) * w];
    let qv = planar_rows(q, d, fast);
    match c.axis {
        GroupAxis::Tokens => {
            // Per group of tokens: the query times the channel scales (planar order), and the
            // zero points and the affine offset folded into a constant per row.
            let off = match fast.decode {
                Decode::Affine(off) => off,
                Decode::Signed => 0.0,
            };
            let cpw = d / w;
            let perm: Vec<usize> = (0..d)
                .map(|slot| kernels::channel_of_slot(slot, w, cpw))
                .collect();
            let g = c.group;
            let mut qp = vec![0.0f32; rows * d];
            let mut qz = vec![0.0f32; rows];
            let mut t = range.start;
            while t < range.end {
                let group_end = ((t / g + 1) * g).min(range.end);
                let (s, z) = c.stats(bh, t);
                for r in 0..rows {
                    let mut sum = 0.0;
                    for ((o, &qv), &ch) in qp[r * d..(r + 1) * d]
                        .iter_mut()
                        .zip(&qv[r * d..(r + 1) * d])
                        .zip(&perm)
                    {
                        *o = qv * s[ch];
                        sum += *o;
                    }
                    qz[r] = z.map_or(0.0, |z| dot(&q[r * d..(r + 1) * d], z)) - off * sum;
                }
                let o = &mut out[(t - range.start) * rows..(group_end - range.start) * rows];
                kernels::dispatch!(fast, score_tokens(words(t, group_end), &qp, &qz, o));
                t = group_end;
            }
        }
        GroupAxis::Channels => {
            let g = c.group;
            let groups = d / g;
            let qsum: Vec<f32> = (0..rows * groups)
                .map(|rk| {
                    let (r, k) = (rk / groups, rk % groups);
                    q[r * d + k * g..r * d + (k + 1) * g].iter().sum()
                })
                .collect();
            let (s, zc) = channel_stats(c, fast, range.clone(), bh);
            kernels::dispatch!(
                fast,
                score_channels(
                    words(range.start, range.end),
                    &qv,
                    s,
                    &zc,
                    groups,
                    &qsum,
                    rows,
                    out
                )
            );
        }
    }
}

/// [`accumulate_segment`] for codes grouped along channels with a [`Fast`] layout: weighted
/// codes summed in planar order, the zero points per group, both mapped to channels once.
#[expect(
    clippy::too_many_arguments,
    reason = "the segment's operands, as in accumulate_segment"
)]
#[inline(always)]
fn accumulate_fast(
    c: &HostCodes,
    fast: Fast,
    range: Range<usize>,
    bh: usize,
    p: &[f32],
    rows: usize,
    d: usize,
    acc: &mut [f32],
) {
    let n = c.dims[2];
    let w = fast.words;
    let g = c.group;
    let groups = d / g;
    let len = range.len();
    let words = &c.words[(bh * n + range.start) * w..(bh * n + range.end) * w];
    let (s, zc) = channel_stats(c, fast, range, bh);
    let mut accp = vec![0.0f32; rows * d];
    let mut zacc = vec![0.0f32; rows * groups];
    kernels::dispatch!(
        fast,
        values_channels(
            words,
            &p[..len * rows],
            s,
            &zc,
            groups,
            rows,
            &mut accp,
            &mut zacc
        )
    );
    let cpw = d / w;
    for r in 0..rows {
        let ar = &mut acc[r * d..(r + 1) * d];
        for (slot, &x) in accp[r * d..(r + 1) * d].iter().enumerate() {
            ar[kernels::channel_of_slot(slot, w, cpw)] += x;
        }
        for (ch, a) in ar.iter_mut().enumerate() {
            *a += zacc[r * groups + ch / g];
        }
    }
}

/// [`score_segment`] for keys with [`HostCodes::planar`] (statistics along tokens): per group,
/// the scale folded into the query (permuted to the planar order once) and the zero point
/// into a constant; per token one planar unpack and one dot product per query row.
#[inline(always)]
fn score_planar(
    c: &HostCodes,
    range: Range<usize>,
    bh: usize,
    q: &[f32],
    d: usize,
    out: &mut [f32],
) {
    let rows = q.len() / d;
    let slots = c.words_per_token() * c.bits.codes_per_word();
    let mut buf = vec![0.0f32; slots];
    let mut qp = vec![0.0f32; rows * slots];
    let mut qz = vec![0.0f32; rows];
    let g = c.group;
    let chan: Vec<Option<usize>> = (0..slots).map(|slot| c.channel(slot)).collect();
    let mut t = range.start;
    while t < range.end {
        let group_end = ((t / g + 1) * g).min(range.end);
        let (s, z) = c.stats(bh, t);
        for r in 0..rows {
            let qr = &q[r * d..(r + 1) * d];
            for (slot, ch) in chan.iter().enumerate() {
                qp[r * slots + slot] = ch.map_or(0.0, |ch| qr[ch] * s[ch]);
            }
            qz[r] = z.map_or(0.0, |z| dot(qr, z));
        }
        for tt in t..group_end {
            c.unpack_planar(bh, tt, &mut buf);
            let i = tt - range.start;
            for r in 0..rows {
                out[i * rows + r] = dot(&qp[r * slots..(r + 1) * slots], &buf) + qz[r];
            }
        }
        t = group_end;
    }
}

/// Adds `Σ_t p[t * rows + r] v̂_t` over the tokens of `seg` of stream `bh` to `acc`
/// (`rows × d`).
#[inline(always)]
fn accumulate_segment(
    seg: &Segment<'_>,
    bh: usize,
    p: &[f32],
    rows: usize,
    d: usize,
    acc: &mut [f32],
) {
    if let Source::Codes(c) = seg.src
        && c.axis == GroupAxis::Channels
        && let Some(fast) = c.fast
    {
        return accumulate_fast(c, fast, seg.range.clone(), bh, p, rows, d, acc);
    }
    let mut buf = vec![0.0f32; d];
    let weight = |r: usize, i: usize| p[i * rows + r];
    let skip = |i: usize| (0..rows).all(|r| weight(r, i) == 0.0);
    match seg.src {
        Source::Signs(_) => unreachable!("invariant: sign sketches hold keys, never values"),
        Source::Dense(x) => {
            for (i, t) in seg.range.clone().enumerate() {
                if skip(i) {
                    continue;
                }
                let v = x.row(bh, t);
                for r in 0..rows {
                    axpy(weight(r, i), v, &mut acc[r * d..(r + 1) * d]);
                }
            }
        }
        Source::Codes(c) => match c.axis {
            GroupAxis::Channels => {
                // Σ_t (p_t s_tk) code_t per group k, plus (Σ_t p_t z_tk) added once.
                let g = c.group;
                let groups = d / g;
                let mut zacc = vec![0.0f32; rows * groups];
                for (i, t) in seg.range.clone().enumerate() {
                    if skip(i) {
                        continue;
                    }
                    c.unpack(bh, t, &mut buf);
                    let (s, z) = c.stats(bh, t);
                    for r in 0..rows {
                        let w = weight(r, i);
                        let ar = &mut acc[r * d..(r + 1) * d];
                        for k in 0..groups {
                            axpy(
                                w * s[k],
                                &buf[k * g..(k + 1) * g],
                                &mut ar[k * g..(k + 1) * g],
                            );
                            if let Some(z) = z {
                                zacc[r * groups + k] += w * z[k];
                            }
                        }
                    }
                }
                for r in 0..rows {
                    for (c, a) in acc[r * d..(r + 1) * d].iter_mut().enumerate() {
                        *a += zacc[r * groups + c / g];
                    }
                }
            }
            GroupAxis::Tokens => {
                // Per group of tokens: Σ_t p_t code_t, then scale and zero per channel.
                let g = c.group;
                let mut tmp = vec![0.0f32; rows * d];
                let mut psum = vec![0.0f32; rows];
                let mut t = seg.range.start;
                while t < seg.range.end {
                    let group_end = ((t / g + 1) * g).min(seg.range.end);
                    tmp.iter_mut().for_each(|x| *x = 0.0);
                    psum.iter_mut().for_each(|x| *x = 0.0);
                    for tt in t..group_end {
                        let i = tt - seg.range.start;
                        if skip(i) {
                            continue;
                        }
                        c.unpack(bh, tt, &mut buf);
                        for r in 0..rows {
                            let w = weight(r, i);
                            axpy(w, &buf, &mut tmp[r * d..(r + 1) * d]);
                            psum[r] += w;
                        }
                    }
                    let (s, z) = c.stats(bh, t);
                    for r in 0..rows {
                        for ch in 0..d {
                            acc[r * d + ch] +=
                                s[ch] * tmp[r * d + ch] + z.map_or(0.0, |z| z[ch] * psum[r]);
                        }
                    }
                    t = group_end;
                }
            }
        },
    }
}

/// Runs `task` with AVX2 and FMA enabled when the CPU has them (pulp's safe runtime
/// dispatch: the kernels, all `#[inline(always)]`, are compiled a second time for x86-64-v3
/// and auto-vectorised 8 lanes wide), with the baseline instruction set otherwise.
#[inline(always)]
fn vectorized<T: Task>(task: T) -> T::Output {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        return pulp::Simd::vectorize(simd, Dispatch(task));
    }
    task.run()
}

/// A kernel run by [`vectorized`].
trait Task {
    type Output;
    fn run(self) -> Self::Output;
}

struct Dispatch<T>(T);

impl<T: Task> pulp::WithSimd for Dispatch<T> {
    type Output = T::Output;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> T::Output {
        self.0.run()
    }
}

/// Scores of one stream over a token range (see [`score_segment`]).
struct ScoreTask<'a, 'b> {
    segments: Vec<Segment<'a>>,
    bh: usize,
    q: &'b [f32],
    d: usize,
    out: &'b mut [f32],
}

impl Task for ScoreTask<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let rows = self.q.len() / self.d;
        let mut at = 0;
        for seg in &self.segments {
            score_segment(seg, self.bh, self.q, self.d, &mut self.out[at * rows..]);
            at += seg.range.len();
        }
    }
}

/// Weighted values of one stream over a token range (see [`accumulate_segment`]).
struct ValueTask<'a, 'b> {
    segments: Vec<Segment<'a>>,
    bh: usize,
    p: &'b [f32],
    rows: usize,
    d: usize,
}

impl Task for ValueTask<'_, '_> {
    type Output = Vec<f32>;
    #[inline(always)]
    fn run(self) -> Vec<f32> {
        let mut acc = vec![0.0f32; self.rows * self.d];
        let mut at = 0;
        for seg in &self.segments {
            accumulate_segment(
                seg,
                self.bh,
                &self.p[at * self.rows..],
                self.rows,
                self.d,
                &mut acc,
            );
            at += seg.range.len();
        }
        acc
    }
}

/// Masks the scores of one stream (token-major, `qrow.len()` rows) and turns them into
/// softmax numerators in place, with the maxima and sums per row.
struct SoftmaxTask<'a> {
    scores: &'a mut [f32],
    qrow: &'a [u32],
    kpos: &'a [u32],
    maxes: &'a mut [f32],
    sums: &'a mut [f32],
}

impl Task for SoftmaxTask<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let rows = self.qrow.len();
        for (row, &kp) in self.scores.chunks_exact_mut(rows).zip(self.kpos) {
            for ((s, m), &qp) in row.iter_mut().zip(self.maxes.iter_mut()).zip(self.qrow) {
                if qp == PAD || kp == PAD || kp > qp {
                    *s = f32::NEG_INFINITY;
                }
                *m = m.max(*s);
            }
        }
        for row in self.scores.chunks_exact_mut(rows) {
            for ((s, &m), l) in row
                .iter_mut()
                .zip(self.maxes.iter())
                .zip(self.sums.iter_mut())
            {
                *s = if m == f32::NEG_INFINITY {
                    0.0
                } else {
                    (*s - m).exp()
                };
                *l += *s;
            }
        }
    }
}

/// Tokens per parallel work item: large enough that a rayon task amortises its overhead,
/// small enough that both cores share a few thousand tokens.
const TOKENS_PER_TASK: usize = 1024;

/// Attention of `query` over `len` held tokens stored in `keys` and `values` (ordered
/// segments covering tokens `0..len` of every stream), with original positions `positions`
/// (one list of `len` per sequence). Returns the output `[batch, q_heads, q_len, head_dim]`
/// and the log-sum-exp `[batch, kv_heads, group, q_len]`. The scale is `1/sqrt(head_dim)`.
///
/// Scores and the weighted sum of values run in parallel over (stream, token range) tasks
/// on rayon's pool (the one the CPU backend uses).
///
/// # Panics
/// If the segments do not cover `len` tokens (a programmer error).
pub(crate) fn attend_host(
    query: &Query,
    kv_heads: usize,
    len: usize,
    positions: &[Vec<u32>],
    keys: &[Segment<'_>],
    values: &[Segment<'_>],
) -> (Tensor<4>, Tensor<4>) {
    use rayon::prelude::*;

    let covered = |s: &[Segment<'_>]| s.iter().map(|s| s.range.len()).sum::<usize>();
    assert!(
        covered(keys) == len && covered(values) == len,
        "attend_host: segments cover {} keys and {} values, expected {len}",
        covered(keys),
        covered(values)
    );
    let [b, qh, n, d] = query.tensor().dims();
    let g = qh / kv_heads;
    let rows = g * n;
    let streams = b * kv_heads;
    let device = query.tensor().device();
    let scale = 1.0 / (d as f32).sqrt();
    let qdata = floats(query.tensor());
    // Query rows per stream, row j * n + i: token i of query head h * g + j, scaled.
    let mut q = vec![0.0f32; streams * rows * d];
    for bh in 0..streams {
        let (bi, h) = (bh / kv_heads, bh % kv_heads);
        for j in 0..g {
            for i in 0..n {
                let src = ((bi * qh + h * g + j) * n + i) * d;
                let dst = ((bh * rows) + j * n + i) * d;
                for (o, x) in q[dst..dst + d].iter_mut().zip(&qdata[src..src + d]) {
                    *o = x * scale;
                }
            }
        }
    }
    let tasks = len.div_ceil(TOKENS_PER_TASK);
    let task_range = |k: usize| k * TOKENS_PER_TASK..((k + 1) * TOKENS_PER_TASK).min(len);

    // Scores, token-major per stream: scores[(bh * len + t) * rows + r].
    let mut scores = vec![0.0f32; streams * len * rows];
    scores
        .par_chunks_mut(len * rows)
        .enumerate()
        .for_each(|(bh, stream)| {
            stream
                .par_chunks_mut(TOKENS_PER_TASK * rows)
                .enumerate()
                .for_each(|(k, out)| {
                    vectorized(ScoreTask {
                        segments: window(keys, task_range(k)),
                        bh,
                        q: &q[bh * rows * d..(bh + 1) * rows * d],
                        d,
                        out,
                    });
                });
        });

    // Mask, then softmax numerators in place; maxima and sums per (stream, row).
    let mut maxes = vec![f32::NEG_INFINITY; streams * rows];
    let mut sums = vec![0.0f32; streams * rows];
    scores
        .par_chunks_mut(len * rows)
        .zip(maxes.par_chunks_mut(rows).zip(sums.par_chunks_mut(rows)))
        .enumerate()
        .for_each(|(bh, (sc, (mx, sm)))| {
            let bi = bh / kv_heads;
            let qpos = &query.positions()[bi * n..(bi + 1) * n];
            // The query position of every row (row j * n + i is query token i).
            let qrow: Vec<u32> = (0..rows).map(|r| qpos[r % n]).collect();
            vectorized(SoftmaxTask {
                scores: sc,
                qrow: &qrow,
                kpos: &positions[bi][..len],
                maxes: mx,
                sums: sm,
            });
        });

    // Weighted values per (stream, token range), summed per stream.
    let partial: Vec<Vec<f32>> = (0..streams * tasks)
        .into_par_iter()
        .map(|item| {
            let (bh, k) = (item / tasks, item % tasks);
            let r0 = task_range(k).start;
            vectorized(ValueTask {
                segments: window(values, task_range(k)),
                bh,
                p: &scores[(bh * len + r0) * rows..(bh + 1) * len * rows],
                rows,
                d,
            })
        })
        .collect();

    let mut out = vec![0.0f32; b * qh * n * d];
    let mut lse = vec![f32::MIN; b * kv_heads * g * n];
    for bh in 0..streams {
        let (bi, h) = (bh / kv_heads, bh % kv_heads);
        for j in 0..g {
            for i in 0..n {
                let r = j * n + i;
                let m = maxes[bh * rows + r];
                if m == f32::NEG_INFINITY {
                    continue;
                }
                let l = sums[bh * rows + r];
                let dst = ((bi * qh + h * g + j) * n + i) * d;
                for (c, o) in out[dst..dst + d].iter_mut().enumerate() {
                    let a: f32 = (0..tasks).map(|k| partial[bh * tasks + k][r * d + c]).sum();
                    *o = a / l;
                }
                lse[((bi * kv_heads + h) * g + j) * n + i] = (m + l.ln()).max(f32::MIN);
            }
        }
    }
    (
        Tensor::<4>::from_data(TensorData::new(out, [b, qh, n, d]), &device),
        Tensor::<4>::from_data(TensorData::new(lse, [b, kv_heads, g, n]), &device),
    )
}

#[cfg(test)]
mod tests;
