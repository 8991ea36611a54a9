//! Scalar codecs between f32 and the storage formats of checkpoints: bf16, f16 and FP8 E4M3FN.

/// bf16 bits → f32 (exact).
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 → bf16 bits, round to nearest even (NaN stays NaN).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    ((b + round) >> 16) as u16
}

/// f16 bits → f32 (exact, subnormals included).
#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exp = ((bits >> 10) & 0x1f) as u32;
    let mant = (bits & 0x3ff) as u32;
    let mag = match exp {
        0 => (mant as f32) * (2f32).powi(-24),
        0x1f if mant == 0 => f32::INFINITY,
        0x1f => f32::NAN,
        _ => f32::from_bits(((exp + 112) << 23) | (mant << 13)),
    };
    f32::from_bits(mag.to_bits() | sign)
}

/// f32 → f16 bits, round to nearest even (subnormals, overflow to ±inf, NaN stays NaN), as the
/// F16C instruction and numpy's `astype(float16)` do.
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let a = b & 0x7fff_ffff;
    if a > 0x7f80_0000 {
        return sign | 0x7e00;
    }
    if a >= 0x477f_f000 {
        // ≥ 65520 rounds past the largest f16 (65504).
        return sign | 0x7c00;
    }
    if a < 0x3880_0000 {
        // Below 2⁻¹⁴: a subnormal (or zero); adding 0.5 makes the FPU round to 2⁻²⁴ steps.
        let v = f32::from_bits(a) + 0.5;
        return sign | (v.to_bits() - 0.5f32.to_bits()) as u16;
    }
    let mant_odd = (a >> 13) & 1;
    let r = a.wrapping_add(0xc800_0fff).wrapping_add(mant_odd);
    sign | (r >> 13) as u16
}

/// Largest finite E4M3FN value.
pub const FP8_E4M3_MAX: f32 = 448.0;

/// FP8 E4M3FN byte → f32: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, 0x7f/0xff
/// are NaN.
#[inline]
pub fn fp8_e4m3_to_f32(b: u8) -> f32 {
    let mag = b & 0x7f;
    let v = if mag == 0x7f {
        f32::NAN
    } else if mag < 8 {
        mag as f32 * (2f32).powi(-9)
    } else {
        let e = (mag >> 3) as i32;
        let m = (mag & 7) as f32;
        (1.0 + m / 8.0) * (2f32).powi(e - 7)
    };
    if b & 0x80 != 0 {
        -v
    } else {
        v
    }
}

/// f32 → FP8 E4M3FN byte, round to nearest even, saturating at ±448 (see [`crate::formats`]).
#[inline]
pub fn f32_to_fp8_e4m3(x: f32) -> u8 {
    crate::formats::E4M3.encode(x)
}

#[cfg(test)]
mod tests {
    #[test]
    fn f32_to_f16_rounds_as_ieee() {
        for bits in (0..=u32::MAX).step_by(65_521).chain((0..=0xffffu32).map(|h| (h << 13) + 0x3800_0000 + 0x1000)) {
            let x = f32::from_bits(bits);
            let want = half::f16::from_f32(x).to_bits();
            let got = super::f32_to_f16(x);
            if x.is_nan() {
                assert!(got & 0x7c00 == 0x7c00 && got & 0x3ff != 0, "{bits:#x}");
            } else {
                assert_eq!(got, want, "{x:e} ({bits:#x})");
            }
        }
        for h in 0..=0xffffu16 {
            let x = super::f16_to_f32(h);
            if !x.is_nan() {
                assert_eq!(super::f32_to_f16(x), h);
            }
        }
    }

    use super::*;

    #[test]
    fn fp8_round_trips_every_code() {
        for b in 0u8..=255 {
            if b & 0x7f == 0x7f {
                assert!(fp8_e4m3_to_f32(b).is_nan());
                continue;
            }
            let v = fp8_e4m3_to_f32(b);
            let back = f32_to_fp8_e4m3(v);
            // -0 encodes as 0x80 and +0 as 0x00; both decode to zero.
            assert_eq!(fp8_e4m3_to_f32(back), v, "code {b:#x}");
        }
        assert_eq!(fp8_e4m3_to_f32(0x7e), 448.0);
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(fp8_e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(f32_to_fp8_e4m3(1000.0), 0x7e);
        assert_eq!(f32_to_fp8_e4m3(-1000.0), 0xfe);
    }

    #[test]
    fn fp8_rounds_to_nearest_even() {
        // 1.0 = 0x38, next is 1.125 = 0x39; 1.0625 is a tie → even code 0x38.
        assert_eq!(f32_to_fp8_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_fp8_e4m3(1.07), 0x39);
        // 1.1875 ties between 0x39 (1.125) and 0x3a (1.25) → even 0x3a.
        assert_eq!(f32_to_fp8_e4m3(1.1875), 0x3a);
    }

    #[test]
    fn bf16_and_f16() {
        assert_eq!(bf16_to_f32(f32_to_bf16(1.5)), 1.5);
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80); // tie to even
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
    }
}
