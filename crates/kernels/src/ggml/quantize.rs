//! f32 → ggml blocks, for writing GGUF files: Q8_0 as ggml's reference rounds it, and Q5_0, Q5_1,
//! Q4_K, Q5_K and Q6_K by a search per block for the scale (and minimum) with the least weighted
//! squared error, the weights `√mean(x²) + |x|` favouring the large values (no importance matrix).
//! The layouts are ggml's, so [`super::dequantize`] (tested bit-exact against llama.cpp) reads them.

use crate::codec::{f16_to_f32, f32_to_f16};

/// Q8_0 of `x` (a multiple of 32 values) appended to `out`, as ggml's `quantize_row_q8_0_ref`:
/// `d = max|x| / 127` stored as f16, `q = round(x / d)` (ties away from zero) with the f32 `d`.
pub fn q8_0(x: &[f32], out: &mut Vec<u8>) {
    assert!(x.len().is_multiple_of(32), "Q8_0 rows are whole 32-value blocks");
    for b in x.chunks_exact(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f32_to_f16(d).to_le_bytes());
        out.extend(b.iter().map(|&v| (v * id).round() as i8 as u8));
    }
}

/// The f16 scale Q8_0 stores for a block whose largest magnitude is `amax` (tests).
pub fn q8_0_scale(amax: f32) -> f32 {
    f16_to_f32(f32_to_f16(amax / 127.0))
}

/// `v` rounded through f16, as a block stores it.
fn via_f16(v: f32) -> f32 {
    f16_to_f32(f32_to_f16(v))
}

/// The error weights of a block: `√mean(x²) + |x|`.
fn weights(x: &[f32], w: &mut [f32]) {
    let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
    for (w, v) in w.iter_mut().zip(x) {
        *w = rms + v.abs();
    }
}

/// `x ≈ s·L + b` with levels `L ∈ 0..=nmax`, `s ≥ 0`, `b ≤ 0` (the minimum subtracted): the
/// weighted least-squares `(s, b)` for the levels of each of 21 trial scales around
/// `nmax / (max − min)`, the best kept. Returns `(s, −b)`; `levels` holds the best levels.
fn fit_affine(x: &[f32], w: &[f32], nmax: u8, levels: &mut [u8]) -> (f32, f32) {
    let lo = x.iter().fold(0f32, |m, &v| m.min(v));
    let hi = x.iter().fold(f32::MIN, |m, &v| m.max(v));
    if hi <= lo {
        levels.fill(0);
        return (0.0, -lo);
    }
    let (mut best, mut trial) = (f32::INFINITY, [0u8; 32]);
    let trial = &mut trial[..x.len()];
    let mut fit = (0.0, -lo);
    for step in -10..=10 {
        let is = (nmax as f32 + 0.1 * step as f32) / (hi - lo);
        let (mut sw, mut sl, mut sll, mut sx, mut slx) = (0f32, 0f32, 0f32, 0f32, 0f32);
        for ((t, &v), &wi) in trial.iter_mut().zip(x).zip(w) {
            let l = ((is * (v - lo)).round()).clamp(0.0, nmax as f32);
            *t = l as u8;
            sw += wi;
            sl += wi * l;
            sll += wi * l * l;
            sx += wi * v;
            slx += wi * l * v;
        }
        let det = sw * sll - sl * sl;
        if det <= 0.0 {
            continue;
        }
        let (mut s, mut b) = ((sw * slx - sl * sx) / det, (sll * sx - sl * slx) / det);
        if b > 0.0 {
            // The minimum is only ever subtracted: refit the scale alone.
            (s, b) = (slx / sll, 0.0);
        }
        if s < 0.0 {
            continue;
        }
        let err: f32 = trial.iter().zip(x).zip(w).map(|((&l, &v), &wi)| wi * (s * l as f32 + b - v).powi(2)).sum();
        if err < best {
            best = err;
            fit = (s, -b);
            levels.copy_from_slice(trial);
        }
    }
    if best.is_infinite() {
        levels.fill(0);
    }
    fit
}

/// `x ≈ s·L` with levels `L ∈ −nmax..nmax` (one more on the negative side): the trial inverse
/// scales `−(nmax ± 0.9)/v` for `v` the value of largest magnitude, each refit by weighted least
/// squares, the best kept. Returns `s` (signed).
fn fit_symmetric(x: &[f32], w: &[f32], nmax: i32) -> f32 {
    let v = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    if v.abs() < 1e-30 {
        return 0.0;
    }
    let (mut best, mut fit) = (f32::INFINITY, 0.0);
    for step in -9..=9 {
        let is = -(nmax as f32 + 0.1 * step as f32) / v;
        let (mut slx, mut sll) = (0f32, 0f32);
        for (&xi, &wi) in x.iter().zip(w) {
            let l = (is * xi).round().clamp(-nmax as f32, nmax as f32 - 1.0);
            slx += wi * l * xi;
            sll += wi * l * l;
        }
        if sll <= 0.0 {
            continue;
        }
        let s = slx / sll;
        let err: f32 = x
            .iter()
            .zip(w)
            .map(|(&xi, &wi)| {
                let l = (is * xi).round().clamp(-nmax as f32, nmax as f32 - 1.0);
                wi * (xi - s * l).powi(2)
            })
            .sum();
        if err < best {
            (best, fit) = (err, s);
        }
    }
    fit
}

/// Q5_0 (`d·(q − 16)`) and Q5_1 (`d·q + m`) of `x` (a multiple of 32 values), appended to `out`.
pub fn q5_0(x: &[f32], out: &mut Vec<u8>) {
    assert!(x.len().is_multiple_of(32), "Q5_0 rows are whole 32-value blocks");
    let mut w = [0f32; 32];
    for b in x.chunks_exact(32) {
        weights(b, &mut w);
        let d = via_f16(fit_symmetric(b, &w, 16));
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q: Vec<u8> = b.iter().map(|&v| ((v * id).round().clamp(-16.0, 15.0) + 16.0) as u8).collect();
        out.extend(f32_to_f16(d).to_le_bytes());
        push_q5(&q, out);
    }
}

pub fn q5_1(x: &[f32], out: &mut Vec<u8>) {
    assert!(x.len().is_multiple_of(32), "Q5_1 rows are whole 32-value blocks");
    let (mut w, mut l) = ([0f32; 32], [0u8; 32]);
    for b in x.chunks_exact(32) {
        weights(b, &mut w);
        let (s, m) = fit_affine(b, &w, 31, &mut l);
        let (d, m) = (via_f16(s), via_f16(-m));
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q: Vec<u8> = b.iter().map(|&v| ((v - m) * id).round().clamp(0.0, 31.0) as u8).collect();
        out.extend(f32_to_f16(d).to_le_bytes());
        out.extend(f32_to_f16(m).to_le_bytes());
        push_q5(&q, out);
    }
}

/// A 32-value block's 5-bit codes: the fifth bits as one u32, then the nibbles (value j in the
/// low half of byte j, value j + 16 in its high half).
fn push_q5(q: &[u8], out: &mut Vec<u8>) {
    let high = q.iter().enumerate().fold(0u32, |h, (j, &v)| h | (((v >> 4) & 1) as u32) << j);
    out.extend(high.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0xF) | (q[j + 16] & 0xF) << 4));
}

/// Eight (scale, minimum) pairs of a super-block as Q4_K/Q5_K store them: `d`, `dmin` (f16) and
/// twelve bytes of 6-bit codes (`get_scale_min_k4`'s layout). Returns the bytes and the f32
/// scale and minimum each sub-block decodes to.
fn k_scales(sc: &[f32; 8], mn: &[f32; 8]) -> ([u8; 16], [(f32, f32); 8]) {
    let (smax, mmax) = (sc.iter().fold(0f32, |a, &b| a.max(b)), mn.iter().fold(0f32, |a, &b| a.max(b)));
    let (d, dmin) = (via_f16(smax / 63.0), via_f16(mmax / 63.0));
    let code = |v: f32, d: f32| if d > 0.0 { (v / d).round().clamp(0.0, 63.0) as u8 } else { 0 };
    let mut b = [0u8; 16];
    b[0..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
    b[2..4].copy_from_slice(&f32_to_f16(dmin).to_le_bytes());
    let s = &mut b[4..16];
    let mut dec = [(0f32, 0f32); 8];
    for j in 0..8 {
        let (ls, lm) = (code(sc[j], d), code(mn[j], dmin));
        if j < 4 {
            s[j] = ls;
            s[j + 4] = lm;
        } else {
            s[j + 4] = (ls & 0xF) | (lm & 0xF) << 4;
            s[j - 4] |= (ls >> 4) << 6;
            s[j] |= (lm >> 4) << 6;
        }
        dec[j] = (d * ls as f32, dmin * lm as f32);
    }
    (b, dec)
}

/// Q4_K (`bits == 4`) or Q5_K (`bits == 5`) of `x` (a multiple of 256 values), appended to `out`.
fn qk_affine(x: &[f32], bits: u32, out: &mut Vec<u8>) {
    assert!(x.len().is_multiple_of(256), "K-quant rows are whole 256-value super-blocks");
    let nmax = (1u8 << bits) - 1;
    let (mut w, mut l) = ([0f32; 32], [0u8; 256]);
    for sb in x.chunks_exact(256) {
        let (mut sc, mut mn) = ([0f32; 8], [0f32; 8]);
        for j in 0..8 {
            let b = &sb[32 * j..][..32];
            weights(b, &mut w);
            (sc[j], mn[j]) = fit_affine(b, &w, nmax, &mut l[32 * j..][..32]);
        }
        let (head, dec) = k_scales(&sc, &mn);
        // The codes again for the scales as stored.
        for (j, &(d, m)) in dec.iter().enumerate() {
            for (l, &v) in l[32 * j..][..32].iter_mut().zip(&sb[32 * j..][..32]) {
                *l = if d > 0.0 { ((v + m) / d).round().clamp(0.0, nmax as f32) as u8 } else { 0 };
            }
        }
        out.extend(head);
        if bits == 5 {
            let mut qh = [0u8; 32];
            for (e, &v) in l.iter().enumerate() {
                qh[e % 32] |= ((v >> 4) & 1) << (e / 32);
            }
            out.extend(qh);
        }
        for c in 0..4 {
            out.extend((0..32).map(|i| (l[64 * c + i] & 0xF) | (l[64 * c + 32 + i] & 0xF) << 4));
        }
    }
}

pub fn q4_k(x: &[f32], out: &mut Vec<u8>) {
    qk_affine(x, 4, out)
}

pub fn q5_k(x: &[f32], out: &mut Vec<u8>) {
    qk_affine(x, 5, out)
}

/// Q6_K of `x` (a multiple of 256 values), appended to `out`: 16 signed 8-bit scales of 16 values
/// under one f16 `d`, codes `q − 32` in 6 bits.
pub fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    assert!(x.len().is_multiple_of(256), "K-quant rows are whole 256-value super-blocks");
    let mut w = [0f32; 16];
    for sb in x.chunks_exact(256) {
        let mut sc = [0f32; 16];
        for (j, s) in sc.iter_mut().enumerate() {
            let b = &sb[16 * j..][..16];
            weights(b, &mut w);
            *s = fit_symmetric(b, &w, 32);
        }
        let smax = sc.iter().fold(0f32, |a, &b| a.max(b.abs()));
        let d = via_f16(smax / 127.0);
        let codes: Vec<i8> =
            sc.iter().map(|&s| if d > 0.0 { (s / d).round().clamp(-127.0, 127.0) as i8 } else { 0 }).collect();
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for (e, &v) in sb.iter().enumerate() {
            let s = d * codes[e / 16] as f32;
            let q = if s != 0.0 { (v / s).round().clamp(-32.0, 31.0) as i32 + 32 } else { 32 } as u8;
            let (half, r) = (e / 128, e % 128);
            ql[half * 64 + r % 64] |= (q & 0xF) << (4 * (r / 64));
            qh[half * 32 + r % 32] |= (q >> 4) << (2 * (r / 32));
        }
        out.extend(ql);
        out.extend(qh);
        out.extend(codes.iter().map(|&c| c as u8));
        out.extend(f32_to_f16(d).to_le_bytes());
    }
}
