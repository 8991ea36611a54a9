//! FP4 × FP4 GEMV through a 16×16 product table: with both operands E2M1, every product of two
//! codes is one of 256 values, so "multiplication is a table lookup". Twice an E2M1 value is an
//! integer (0, 1, 2, 3, 4, 6, 8, 12), so the table holds exact `i16` products ×4 and each block's
//! sum is an exact integer; the two block scales apply once per block.
//!
//! Both operands are [`Fp4Blocks`] of the same kind: the weight rows and the activation rows
//! (quantized per token with the same block size).

use crate::formats::{nibble, E2M1};
use crate::quant::Fp4Blocks;

/// `products[a·16 + b] = 4·E2M1(a)·E2M1(b)`, exact.
pub fn product_table() -> [i16; 256] {
    let mut t = [0i16; 256];
    for a in 0..16u8 {
        for b in 0..16u8 {
            t[(a as usize) * 16 + b as usize] = (4.0 * E2M1.decode(a) * E2M1.decode(b)) as i16;
        }
    }
    t
}

/// `out[j·m + t] = Σ_c W[j, c]·X[t, c]` for every weight row `j` and activation row `t`.
pub fn gemv(w: &Fp4Blocks, x: &Fp4Blocks) -> Vec<f32> {
    assert!(w.cols == x.cols && w.kind == x.kind, "fp4 lut gemv: operands need the same width and block format");
    let (k, bs) = (w.cols, w.kind.block());
    let (nb, pc) = (k.div_ceil(bs), k.div_ceil(2));
    let table = product_table();
    let mut out = vec![0f32; w.rows * x.rows];
    for j in 0..w.rows {
        let wr = &w.packed[j * pc..(j + 1) * pc];
        for t in 0..x.rows {
            let xr = &x.packed[t * pc..(t + 1) * pc];
            let mut total = 0f32;
            for b in 0..nb {
                let sum: i32 = (b * bs..((b + 1) * bs).min(k))
                    .map(|c| table[nibble(wr, c) as usize * 16 + nibble(xr, c) as usize] as i32)
                    .sum();
                let sw = w.kind.scale(w.scales[j * nb + b], w.tensor_scale);
                let sx = x.kind.scale(x.scales[t * nb + b], x.tensor_scale);
                total += sum as f32 * 0.25 * sw * sx;
            }
            out[j * x.rows + t] = total;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Fp4Kind;
    use rand::{Rng, SeedableRng};

    #[test]
    fn lut_gemv_equals_dequantize_then_multiply() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for kind in [Fp4Kind::Nv, Fp4Kind::Mx] {
            for (rows, m, k) in [(3, 1, 64), (5, 4, 100), (2, 3, 7)] {
                let wf: Vec<f32> = (0..rows * k).map(|_| rng.gen_range(-2.0..2.0)).collect();
                let xf: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-3.0..3.0)).collect();
                let (w, x) = (Fp4Blocks::quantize(&wf, rows, k, kind), Fp4Blocks::quantize(&xf, m, k, kind));
                let got = gemv(&w, &x);
                let (wd, xd) = (w.dequantize(), x.dequantize());
                for j in 0..rows {
                    for t in 0..m {
                        let want: f64 = (0..k).map(|c| wd[j * k + c] as f64 * xd[t * k + c] as f64).sum();
                        let mag: f64 = (0..k).map(|c| (wd[j * k + c] as f64 * xd[t * k + c] as f64).abs()).sum();
                        let g = got[j * m + t] as f64;
                        assert!(
                            (g - want).abs() <= 1e-6 * mag + 1e-12,
                            "{kind:?} ({rows},{m},{k}) [{j},{t}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
        assert_eq!(product_table()[7 * 16 + 7], 144); // 6·6·4
        assert_eq!(product_table()[0xf * 16 + 7], -144);
    }
}
