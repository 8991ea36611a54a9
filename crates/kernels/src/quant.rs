//! Fine-grained quantizers (report §3.3): FP8 E4M3 with one scale per block — 1×128 tiles for
//! activations, 128×128 blocks for weights — and FP4 E2M1 in the two block formats hardware
//! defines, MXFP4 and NVFP4. Scales are computed online from each block's max-abs; ragged edge
//! blocks cover what is left.

use crate::formats::{nibble, pack_nibbles, ue8m0_decode, ue8m0_encode_ceil, E2M1, E4M3};
use crate::matrix::MatRef;
use rayon::prelude::*;

/// How an FP8 block scale is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleFmt {
    /// `amax / 448` as it is.
    F32,
    /// Rounded up to a power of two (UE8M0, DeepSeek-V3.1's `scale_fmt`): the division by the
    /// scale becomes exact and the block max still fits.
    Ue8m0,
}

/// The floor under a block's max-abs (DeepGEMM's), so an all-zero block gets a finite scale.
pub const AMAX_FLOOR: f32 = 1e-4;

/// E4M3 codes of a `[rows, cols]` matrix with one f32 scale per `block` (row-major
/// `[ceil(rows/b0), ceil(cols/b1)]`): value = code × scale, the `weight_scale_inv` convention.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Blocks {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    pub block: [usize; 2],
}

impl Fp8Blocks {
    /// Quantizes row-major `x [rows, cols]`: per block, `scale = max(amax, 1e-4)/448`, codes =
    /// E4M3(x / scale) rounded to nearest even.
    pub fn quantize(x: &[f32], rows: usize, cols: usize, block: [usize; 2], fmt: ScaleFmt) -> Self {
        assert!(x.len() == rows * cols && block[0] > 0 && block[1] > 0, "Fp8Blocks::quantize shape mismatch");
        let nb = cols.div_ceil(block[1]);
        let mut codes = vec![0u8; rows * cols];
        let mut scales = vec![0f32; rows.div_ceil(block[0]) * nb];
        let band = |((codes, scales), x): ((&mut [u8], &mut [f32]), &[f32])| {
            for (b, s) in scales.iter_mut().enumerate() {
                let (c0, c1) = (b * block[1], ((b + 1) * block[1]).min(cols));
                let amax = x.chunks_exact(cols).flat_map(|r| &r[c0..c1]).fold(0f32, |m, v| m.max(v.abs()));
                *s = amax.max(AMAX_FLOOR) / E4M3.max();
                if fmt == ScaleFmt::Ue8m0 {
                    *s = ue8m0_decode(ue8m0_encode_ceil(*s));
                }
                let inv = 1.0 / *s;
                for (cr, xr) in codes.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
                    for (c, &v) in cr[c0..c1].iter_mut().zip(&xr[c0..c1]) {
                        // x·(1/s) rather than x/s: one rounding fewer is not worth a division per
                        // element; with UE8M0 scales both are exact.
                        *c = E4M3.encode(v * inv);
                    }
                }
            }
        };
        if cols > 0 {
            let band_len = block[0] * cols;
            if rows * cols >= 1 << 16 {
                codes
                    .par_chunks_mut(band_len)
                    .zip(scales.par_chunks_mut(nb))
                    .zip(x.par_chunks(band_len))
                    .for_each(band);
            } else {
                codes.chunks_mut(band_len).zip(scales.chunks_mut(nb)).zip(x.chunks(band_len)).for_each(band);
            }
        }
        Fp8Blocks { codes, scales, rows, cols, block }
    }

    /// The blocks as a weight matrix for the GEMV/GEMM kernels.
    pub fn view(&self) -> MatRef<'_> {
        MatRef::Fp8 { data: &self.codes, scale_inv: &self.scales, rows: self.rows, cols: self.cols, block: self.block }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        self.view().to_f32()
    }
}

/// The two FP4 block formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp4Kind {
    /// OCP MXFP4: 32 elements per UE8M0 scale.
    Mx,
    /// NVFP4: 16 elements per E4M3 scale, times one f32 scale per tensor.
    Nv,
}

impl Fp4Kind {
    pub const fn block(self) -> usize {
        match self {
            Fp4Kind::Mx => 32,
            Fp4Kind::Nv => 16,
        }
    }

    /// A stored block scale as f32 (the tensor scale applied).
    #[inline]
    pub fn scale(self, code: u8, tensor_scale: f32) -> f32 {
        match self {
            Fp4Kind::Mx => ue8m0_decode(code),
            Fp4Kind::Nv => E4M3.decode(code) * tensor_scale,
        }
    }
}

/// E2M1 codes of a `[rows, cols]` matrix, packed two per byte (each row starts on a byte), with
/// one scale code per `kind.block()` columns of a row (`[rows, ceil(cols/block)]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Fp4Blocks {
    pub packed: Vec<u8>,
    pub scales: Vec<u8>,
    /// NVFP4's per-tensor scale (`weight_scale_2`); 1 for MXFP4.
    pub tensor_scale: f32,
    pub rows: usize,
    pub cols: usize,
    pub kind: Fp4Kind,
}

impl Fp4Blocks {
    /// MXFP4: scale = amax/6 rounded up to a power of two, so no element clips (the OCP rule,
    /// `2^(floor(log2 amax) − 2)`, would clip up to a quarter of a binade). NVFP4: tensor scale =
    /// amax_tensor/(448·6); block scale = E4M3(amax_block/6 / tensor scale).
    pub fn quantize(x: &[f32], rows: usize, cols: usize, kind: Fp4Kind) -> Self {
        Self::quantize_with(x, rows, cols, kind, None)
    }

    /// [`Fp4Blocks::quantize`] with NVFP4's tensor scale given (a tensor quantized in bands shares
    /// the whole tensor's).
    pub fn quantize_with(x: &[f32], rows: usize, cols: usize, kind: Fp4Kind, tensor_scale: Option<f32>) -> Self {
        assert_eq!(x.len(), rows * cols, "Fp4Blocks::quantize shape mismatch");
        let bs = kind.block();
        let tensor_scale = match kind {
            Fp4Kind::Mx => 1.0,
            Fp4Kind::Nv => tensor_scale
                .unwrap_or_else(|| x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30) / (E4M3.max() * E2M1.max())),
        };
        let nb = cols.div_ceil(bs);
        let per_row: Vec<(Vec<u8>, Vec<u8>)> = x
            .par_chunks(cols.max(1))
            .take(rows)
            .map(|row| {
                let mut codes = vec![0u8; cols];
                let mut scales = vec![0u8; nb];
                for ((s, xb), cb) in scales.iter_mut().zip(row.chunks(bs)).zip(codes.chunks_mut(bs)) {
                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                    *s = match kind {
                        Fp4Kind::Mx => ue8m0_encode_ceil(amax / E2M1.max()),
                        Fp4Kind::Nv => E4M3.encode(amax / E2M1.max() / tensor_scale),
                    };
                    let scale = kind.scale(*s, tensor_scale);
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    cb.iter_mut().zip(xb).for_each(|(c, &v)| *c = E2M1.encode(v * inv));
                }
                (pack_nibbles(&codes), scales)
            })
            .collect();
        let (mut packed, mut scales) = (Vec::with_capacity(rows * cols.div_ceil(2)), Vec::with_capacity(rows * nb));
        for (p, s) in per_row {
            packed.extend(p);
            scales.extend(s);
        }
        Fp4Blocks { packed, scales, tensor_scale, rows, cols, kind }
    }

    pub fn view(&self) -> MatRef<'_> {
        MatRef::Fp4 {
            data: &self.packed,
            scales: &self.scales,
            tensor_scale: self.tensor_scale,
            rows: self.rows,
            cols: self.cols,
            kind: self.kind,
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        self.view().to_f32()
    }
}

/// Element `c` of row `r` of packed FP4 data, scale applied (the scalar decode the fast paths are
/// tested against).
#[inline]
pub fn fp4_element(
    data: &[u8],
    scales: &[u8],
    tensor_scale: f32,
    cols: usize,
    kind: Fp4Kind,
    r: usize,
    c: usize,
) -> f32 {
    let nb = cols.div_ceil(kind.block());
    let code = nibble(&data[r * cols.div_ceil(2)..], c);
    E2M1.decode(code) * kind.scale(scales[r * nb + c / kind.block()], tensor_scale)
}

/// E2M1's sixteen values by code (sign bit 3), as [`E2M1`] decodes them.
const E2M1_VALUES: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// Values `c0..c0 + out.len()` of one row ([`fp4_element`] for each, a block's scale decoded
/// once): `codes` and `srow` are the row's packed codes and scale codes.
pub fn fp4_decode_range(codes: &[u8], srow: &[u8], tensor_scale: f32, kind: Fp4Kind, c0: usize, out: &mut [f32]) {
    let bs = kind.block();
    let mut c = c0;
    for o in out.chunks_mut(bs) {
        // Up to the end of `c`'s block.
        let n = (bs - c % bs).min(o.len());
        let s = kind.scale(srow[c / bs], tensor_scale);
        for (j, o) in o[..n].iter_mut().enumerate() {
            *o = E2M1_VALUES[nibble(codes, c + j) as usize] * s;
        }
        c += n;
        if n < o.len() {
            let s = kind.scale(srow[c / bs], tensor_scale);
            for (j, o) in o[n..].iter_mut().enumerate() {
                *o = E2M1_VALUES[nibble(codes, c + j) as usize] * s;
            }
            c += o.len() - n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn fp4_ranges_decode_as_elements() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let (rows, cols) = (3usize, 200usize);
        for kind in [Fp4Kind::Mx, Fp4Kind::Nv] {
            let data: Vec<u8> = (0..rows * cols.div_ceil(2)).map(|_| rng.gen()).collect();
            let scales: Vec<u8> = (0..rows * cols.div_ceil(kind.block())).map(|_| rng.gen_range(0x20..0x70)).collect();
            for (c0, n) in [(0, 200), (5, 60), (31, 2), (17, 183)] {
                let mut got = vec![0f32; n];
                let nb = cols.div_ceil(kind.block());
                let (codes, srow) = (&data[2 * cols.div_ceil(2)..], &scales[2 * nb..3 * nb]);
                fp4_decode_range(codes, srow, 0.5, kind, c0, &mut got);
                for (j, g) in got.iter().enumerate() {
                    let want = fp4_element(&data, &scales, 0.5, cols, kind, 2, c0 + j);
                    assert_eq!(g.to_bits(), want.to_bits(), "{kind:?} column {}", c0 + j);
                }
            }
        }
    }

    fn random(n: usize, rng: &mut impl Rng) -> Vec<f32> {
        // Magnitudes over several binades, so blocks have different scales.
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * rng.gen_range(-6.0f32..3.0).exp2()).collect()
    }

    #[test]
    fn fp8_blocks_follow_the_definition_on_ragged_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for (rows, cols, block) in
            [(1, 300, [1, 128]), (5, 129, [1, 128]), (130, 200, [128, 128]), (7, 33, [2, 16]), (3, 0, [1, 128])]
        {
            let mut x = random(rows * cols, &mut rng);
            if cols > 0 {
                x[..cols.min(128)].iter_mut().for_each(|v| *v = 0.0); // an all-zero block (amax floor)
            }
            for fmt in [ScaleFmt::F32, ScaleFmt::Ue8m0] {
                let q = Fp8Blocks::quantize(&x, rows, cols, block, fmt);
                let nb = cols.div_ceil(block[1]);
                assert_eq!(q.scales.len(), rows.div_ceil(block[0]) * nb);
                let deq = q.dequantize();
                for r in 0..rows {
                    for c in 0..cols {
                        let (br, bc) = (r / block[0], c / block[1]);
                        let amax = (br * block[0]..((br + 1) * block[0]).min(rows))
                            .flat_map(|rr| (bc * block[1]..((bc + 1) * block[1]).min(cols)).map(move |cc| (rr, cc)))
                            .fold(0f32, |m, (rr, cc)| m.max(x[rr * cols + cc].abs()));
                        let s = q.scales[br * nb + bc];
                        let want_s = amax.max(AMAX_FLOOR) / 448.0;
                        match fmt {
                            ScaleFmt::F32 => assert_eq!(s, want_s),
                            ScaleFmt::Ue8m0 => assert!(s >= want_s && s < 2.0 * want_s && s.log2().fract() == 0.0),
                        }
                        let v = x[r * cols + c];
                        assert_eq!(q.codes[r * cols + c], E4M3.encode(v * (1.0 / s)));
                        // Within half a quantum of the block's binade.
                        assert!((deq[r * cols + c] - v).abs() <= s * 16.0 + 1e-12, "{v} vs {}", deq[r * cols + c]);
                    }
                }
            }
        }
    }

    #[test]
    fn fp4_blocks_round_trip_within_half_a_step() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for kind in [Fp4Kind::Mx, Fp4Kind::Nv] {
            for (rows, cols) in [(3, 64), (2, 45), (4, 17), (1, 1)] {
                let x = random(rows * cols, &mut rng);
                let q = Fp4Blocks::quantize(&x, rows, cols, kind);
                assert_eq!(q.packed.len(), rows * cols.div_ceil(2));
                assert_eq!(q.scales.len(), rows * cols.div_ceil(kind.block()));
                let deq = q.dequantize();
                for r in 0..rows {
                    for (b, xb) in x[r * cols..(r + 1) * cols].chunks(kind.block()).enumerate() {
                        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let s = kind.scale(q.scales[r * cols.div_ceil(kind.block()) + b], q.tensor_scale);
                        // The scale covers the block max (MX exactly; NV up to E4M3's rounding).
                        assert!(6.0 * s >= amax * if kind == Fp4Kind::Nv { 0.93 } else { 1.0 });
                        for (i, &v) in xb.iter().enumerate() {
                            let got = deq[r * cols + b * kind.block() + i];
                            // E2M1's widest step is 2 (between 4 and 6): error ≤ one step·s.
                            assert!(
                                (got - v).abs() <= s * 1.0 + (v.abs() - 6.0 * s).max(0.0) + 1e-9,
                                "{kind:?} {v} vs {got} (s={s})"
                            );
                        }
                    }
                }
            }
        }
    }
}
