//! Small floating-point formats of FP8/FP4 training and inference: E4M3FN and E5M2 (FP8), E2M1
//! (FP4), and the UE8M0 power-of-two scale of MX formats and DeepSeek-V3.1's `scale_fmt`.
//!
//! Encoding rounds to nearest, ties to even, and saturates at the largest finite value (infinities
//! included), as CUDA's `__nv_cvt_float_to_fp8(…, __NV_SATFINITE, …)` and the `float8` crate do.

/// A sign–exponent–mantissa format of at most 8 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MiniFloat {
    pub exp_bits: u32,
    pub man_bits: u32,
    pub bias: i32,
    /// Code of the largest finite magnitude.
    pub max_code: u8,
    /// Code a NaN encodes to (sign added), if the format has one.
    pub nan_code: Option<u8>,
    /// Whether an all-ones exponent means ∞/NaN (IEEE style, E5M2) rather than ordinary values.
    pub ieee_specials: bool,
}

/// FP8 E4M3FN: bias 7, max 448, no infinities, `S.1111.111` is NaN.
pub const E4M3: MiniFloat =
    MiniFloat { exp_bits: 4, man_bits: 3, bias: 7, max_code: 0x7e, nan_code: Some(0x7f), ieee_specials: false };
/// FP8 E5M2: bias 15, max 57344, IEEE infinities and NaNs.
pub const E5M2: MiniFloat =
    MiniFloat { exp_bits: 5, man_bits: 2, bias: 15, max_code: 0x7b, nan_code: Some(0x7e), ieee_specials: true };
/// FP4 E2M1: values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; no NaN (NaN encodes as 0).
pub const E2M1: MiniFloat =
    MiniFloat { exp_bits: 2, man_bits: 1, bias: 1, max_code: 0x7, nan_code: None, ieee_specials: false };

/// 2^e as an f32 for e in the normal range.
#[inline]
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

impl MiniFloat {
    pub const fn bits(&self) -> u32 {
        1 + self.exp_bits + self.man_bits
    }

    const fn sign_bit(&self) -> u8 {
        1 << (self.exp_bits + self.man_bits)
    }

    /// Largest finite value.
    pub fn max(&self) -> f32 {
        self.decode(self.max_code)
    }

    /// Code → f32 (exact).
    pub fn decode(&self, code: u8) -> f32 {
        let mag = code & (self.sign_bit() - 1);
        let (e, m) = ((mag >> self.man_bits) as i32, (mag & ((1 << self.man_bits) - 1)) as u32);
        let v = if self.ieee_specials && e == (1 << self.exp_bits) - 1 {
            if m == 0 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        } else if !self.ieee_specials && Some(mag) == self.nan_code {
            f32::NAN
        } else if e == 0 {
            m as f32 * pow2(1 - self.bias - self.man_bits as i32)
        } else {
            ((1 << self.man_bits) + m) as f32 * pow2(e - self.bias - self.man_bits as i32)
        };
        if code & self.sign_bit() != 0 {
            -v
        } else {
            v
        }
    }

    /// f32 → code: round to nearest even, saturating at ±max.
    #[inline]
    pub fn encode(&self, x: f32) -> u8 {
        let sign = if x.is_sign_negative() { self.sign_bit() } else { 0 };
        if x.is_nan() {
            return self.nan_code.map_or(0, |c| c | sign);
        }
        let a = x.abs().min(self.max());
        let min_normal = pow2(1 - self.bias);
        let code = if a >= min_normal {
            // Round f32's mantissa to `man_bits` in the integer domain, ties to even (a carry moves
            // into the exponent, which is the next code), then rebias the exponent.
            let shift = 23 - self.man_bits;
            let b = a.to_bits();
            let r = b + ((1 << (shift - 1)) - 1) + ((b >> shift) & 1);
            (r >> shift) - (((127 - self.bias) as u32) << self.man_bits)
        } else {
            // Subnormal quanta: scale to units of the smallest subnormal; adding 2²³ makes the
            // FPU round to an integer (nearest even) — the code itself (the smallest normal's
            // code when it rounds up to it).
            let q = a * pow2(self.bias - 1 + self.man_bits as i32) + 8_388_608.0;
            q.to_bits() - 0x4b00_0000
        };
        code as u8 | sign
    }

    /// A 256-entry decode table (codes beyond the format's width are left 0).
    pub fn table(&self) -> [f32; 256] {
        let mut t = [0f32; 256];
        for (c, v) in t.iter_mut().enumerate().take(1 << self.bits()) {
            *v = self.decode(c as u8);
        }
        t
    }
}

/// UE8M0 (an unsigned power of two, bias 127; 0xff is NaN) → f32. Code 0 is 2⁻¹²⁷, an f32
/// subnormal.
pub fn ue8m0_decode(code: u8) -> f32 {
    match code {
        0xff => f32::NAN,
        0 => f32::from_bits(1 << 22),
        c => f32::from_bits((c as u32) << 23),
    }
}

/// The smallest UE8M0 power of two ≥ `s` (a scale rounded up never clips its block's max), for
/// positive finite `s`; clamped to the code range.
pub fn ue8m0_encode_ceil(s: f32) -> u8 {
    // (`!(s > …)` also sends NaN to the smallest code.)
    if s.partial_cmp(&f32::from_bits(1 << 22)) != Some(std::cmp::Ordering::Greater) {
        return 0;
    }
    let b = s.to_bits();
    let e = (b >> 23) as i32 - 127 + i32::from(b & 0x7f_ffff != 0);
    (e + 127).clamp(1, 0xfe) as u8
}

/// Packs FP4 codes two per byte, the first of each pair in the low nibble (the layout of NVFP4 and
/// MXFP4 checkpoints); an odd count leaves the last high nibble 0.
pub fn pack_nibbles(codes: &[u8]) -> Vec<u8> {
    codes.chunks(2).map(|p| (p[0] & 0xf) | (p.get(1).copied().unwrap_or(0) << 4)).collect()
}

/// Code `i` of a packed nibble array.
#[inline]
pub fn nibble(packed: &[u8], i: usize) -> u8 {
    (packed[i / 2] >> ((i & 1) * 4)) & 0xf
}

#[cfg(test)]
mod tests {
    use super::*;
    use float8::{F8E4M3, F8E5M2};
    use rand::{Rng, SeedableRng};

    #[test]
    fn fp8_decode_matches_the_float8_crate_for_every_code() {
        for c in 0..=255u8 {
            for (fmt, theirs) in [(E4M3, F8E4M3::from_bits(c).to_f32()), (E5M2, F8E5M2::from_bits(c).to_f32())] {
                let ours = fmt.decode(c);
                assert!(
                    ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                    "{fmt:?} {c:#x}: {ours} vs {theirs}"
                );
            }
        }
        assert_eq!(E4M3.max(), 448.0);
        assert_eq!(E5M2.max(), 57344.0);
        assert_eq!(E5M2.decode(0x7c), f32::INFINITY);
    }

    #[test]
    fn fp8_encode_matches_the_float8_crate_on_every_code_midpoints_and_random_inputs() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let mut inputs: Vec<f32> =
            vec![0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, 1e-30, f32::MAX, f32::MIN_POSITIVE];
        for fmt in [E4M3, E5M2] {
            // Every value, the midpoints between neighbours (ties) and their f32 neighbours.
            let vals: Vec<f32> = (0..=fmt.max_code).map(|c| fmt.decode(c)).collect();
            for w in vals.windows(2) {
                let mid = (w[0] + w[1]) / 2.0;
                inputs.extend([w[0], mid, f32::from_bits(mid.to_bits() + 1), f32::from_bits(mid.to_bits() - 1)]);
            }
            inputs.extend([fmt.max() * 1.03, fmt.max() * 1.1, fmt.max() * 4.0]);
        }
        for _ in 0..200_000 {
            // Log-uniform magnitudes over every binade either format can reach, both signs.
            let e: f32 = rng.gen_range(-28.0..20.0);
            inputs.push(rng.gen_range(1.0f32..2.0) * e.exp2() * if rng.gen() { -1.0 } else { 1.0 });
        }
        for &x in &inputs {
            assert_eq!(E4M3.encode(x), F8E4M3::from_f32(x).to_bits(), "E4M3 {x:e}");
            assert_eq!(E5M2.encode(x), F8E5M2::from_f32(x).to_bits(), "E5M2 {x:e}");
            assert_eq!(E4M3.encode(-x), F8E4M3::from_f32(-x).to_bits(), "E4M3 {:e}", -x);
        }
        assert_eq!(E4M3.encode(f32::NAN) & 0x7f, 0x7f);
        assert_eq!(E5M2.encode(f32::NAN) & 0x7f, 0x7e);
    }

    #[test]
    fn e2m1_values_rounding_and_saturation() {
        let vals: Vec<f32> = (0..8).map(|c| E2M1.decode(c)).collect();
        assert_eq!(vals, [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]);
        assert_eq!(E2M1.decode(0xf), -6.0);
        // Ties to the even code: 0.25 → 0, 0.75 → 1.0, 1.25 → 1.0, 1.75 → 2.0, 2.5 → 2, 3.5 → 4, 5 → 4.
        for (x, want) in [
            (0.25, 0.0),
            (0.75, 1.0),
            (1.25, 1.0),
            (1.75, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (5.0, 4.0),
            (5.1, 6.0),
            (100.0, 6.0),
        ] {
            assert_eq!(E2M1.decode(E2M1.encode(x)), want, "{x}");
            assert_eq!(E2M1.decode(E2M1.encode(-x)), -want, "{x}");
        }
        assert_eq!(E2M1.encode(f32::NAN), 0);
    }

    #[test]
    fn ue8m0_rounds_scales_up_to_powers_of_two() {
        assert_eq!(ue8m0_decode(127), 1.0);
        assert_eq!(ue8m0_encode_ceil(1.0), 127);
        assert_eq!(ue8m0_encode_ceil(1.0001), 128);
        assert_eq!(ue8m0_encode_ceil(0.75), 127);
        assert_eq!(ue8m0_decode(ue8m0_encode_ceil(3e-3)), 2f32.powi(-8));
        assert!(ue8m0_decode(255).is_nan());
        assert_eq!(ue8m0_encode_ceil(0.0), 0);
        assert_eq!(ue8m0_encode_ceil(1e38), 0xfe);
    }

    #[test]
    fn nibbles_pack_low_first() {
        let p = pack_nibbles(&[1, 2, 3]);
        assert_eq!(p, [0x21, 0x03]);
        assert_eq!((0..3).map(|i| nibble(&p, i)).collect::<Vec<_>>(), [1, 2, 3]);
    }
}
