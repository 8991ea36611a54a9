//! A borrowed weight matrix `[rows, cols]` (row-major, `Linear` layout `[out, in]`) in its stored
//! format.

use crate::dot;
use crate::ggml::GgmlType;
use crate::quant::{fp4_decode_range, Fp4Kind};

/// Storage format of a weight matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    F32,
    Bf16,
    /// FP8 E4M3FN with an f32 multiplier per `[block_rows, block_cols]` block.
    Fp8,
    /// FP4 E2M1 packed two per byte, with block scales ([`Fp4Kind`]).
    Fp4(Fp4Kind),
    /// A llama.cpp block format, rows of whole blocks (GGUF tensors).
    Ggml(GgmlType),
}

/// A weight matrix viewed in place: f32 values, bf16 little-endian bytes, or FP8 bytes with their
/// `weight_scale_inv` (row-major `[ceil(rows/br), ceil(cols/bc)]`, multiplied on decode).
#[derive(Clone, Copy, Debug)]
pub enum MatRef<'a> {
    F32 {
        data: &'a [f32],
        rows: usize,
        cols: usize,
    },
    Bf16 {
        data: &'a [u8],
        rows: usize,
        cols: usize,
    },
    Fp8 {
        data: &'a [u8],
        scale_inv: &'a [f32],
        rows: usize,
        cols: usize,
        block: [usize; 2],
    },
    /// `data` is `[rows, ceil(cols/2)]` bytes, `scales` `[rows, ceil(cols/kind.block())]` codes.
    Fp4 {
        data: &'a [u8],
        scales: &'a [u8],
        tensor_scale: f32,
        rows: usize,
        cols: usize,
        kind: Fp4Kind,
    },
    /// `data` is `rows` rows of `cols / kind.block_elems()` ggml blocks each.
    Ggml {
        data: &'a [u8],
        rows: usize,
        cols: usize,
        kind: GgmlType,
    },
}

impl<'a> MatRef<'a> {
    pub fn rows(&self) -> usize {
        match *self {
            MatRef::F32 { rows, .. }
            | MatRef::Bf16 { rows, .. }
            | MatRef::Fp8 { rows, .. }
            | MatRef::Fp4 { rows, .. }
            | MatRef::Ggml { rows, .. } => rows,
        }
    }

    pub fn cols(&self) -> usize {
        match *self {
            MatRef::F32 { cols, .. }
            | MatRef::Bf16 { cols, .. }
            | MatRef::Fp8 { cols, .. }
            | MatRef::Fp4 { cols, .. }
            | MatRef::Ggml { cols, .. } => cols,
        }
    }

    pub fn format(&self) -> WeightFormat {
        match self {
            MatRef::F32 { .. } => WeightFormat::F32,
            MatRef::Bf16 { .. } => WeightFormat::Bf16,
            MatRef::Fp8 { .. } => WeightFormat::Fp8,
            MatRef::Fp4 { kind, .. } => WeightFormat::Fp4(*kind),
            MatRef::Ggml { kind, .. } => WeightFormat::Ggml(*kind),
        }
    }

    /// Checks that the slices hold what the shape says; every kernel relies on it.
    pub fn validate(&self) -> Result<(), String> {
        let (have, want) = match *self {
            MatRef::F32 { data, rows, cols } => (data.len(), rows * cols),
            MatRef::Bf16 { data, rows, cols } => (data.len(), rows * cols * 2),
            MatRef::Fp8 { data, scale_inv, rows, cols, block } => {
                if block[0] == 0 || block[1] == 0 {
                    return Err("FP8 block size must be positive".into());
                }
                let want_s = rows.div_ceil(block[0]) * cols.div_ceil(block[1]);
                if scale_inv.len() != want_s {
                    return Err(format!(
                        "weight_scale_inv has {} values, [{rows},{cols}] with blocks {block:?} needs {want_s}",
                        scale_inv.len()
                    ));
                }
                (data.len(), rows * cols)
            }
            MatRef::Fp4 { data, scales, rows, cols, kind, .. } => {
                let want_s = rows * cols.div_ceil(kind.block());
                if scales.len() != want_s {
                    return Err(format!("FP4 [{rows},{cols}] needs {want_s} block scales, found {}", scales.len()));
                }
                (data.len(), rows * cols.div_ceil(2))
            }
            MatRef::Ggml { data, rows, cols, kind } => {
                let row = kind.row_bytes(cols).ok_or_else(|| {
                    format!("{kind} rows hold whole blocks of {} values, not {cols}", kind.block_elems())
                })?;
                (data.len(), rows.checked_mul(row).ok_or("ggml matrix size overflows")?)
            }
        };
        if have != want {
            return Err(format!("weight data has {have} bytes/values, shape needs {want}"));
        }
        Ok(())
    }

    /// Bytes a pass over the whole matrix reads (for bandwidth figures).
    pub fn bytes(&self) -> usize {
        match *self {
            MatRef::F32 { data, .. } => data.len() * 4,
            MatRef::Bf16 { data, .. } => data.len(),
            MatRef::Fp8 { data, scale_inv, .. } => data.len() + scale_inv.len() * 4,
            MatRef::Fp4 { data, scales, .. } => data.len() + scales.len(),
            MatRef::Ggml { data, .. } => data.len(),
        }
    }

    /// Decodes row `r`, columns `c0..c0+out.len()`, into f32 (scales applied).
    pub fn decode_row(&self, r: usize, c0: usize, out: &mut [f32]) {
        match *self {
            MatRef::F32 { data, cols, .. } => out.copy_from_slice(&data[r * cols + c0..][..out.len()]),
            // Each value written, not accumulated onto zero, so −0 stays −0 (checkpoint
            // conversion compares bit for bit).
            MatRef::Bf16 { data, cols, .. } => {
                for (j, o) in out.iter_mut().enumerate() {
                    let i = 2 * (r * cols + c0 + j);
                    *o = crate::codec::bf16_to_f32(u16::from_le_bytes([data[i], data[i + 1]]));
                }
            }
            MatRef::Fp8 { data, scale_inv, cols, block, .. } => {
                let srow = &scale_inv[(r / block[0]) * cols.div_ceil(block[1])..];
                for (j, o) in out.iter_mut().enumerate() {
                    let c = c0 + j;
                    *o = crate::codec::fp8_e4m3_to_f32(data[r * cols + c]) * srow[c / block[1]];
                }
            }
            MatRef::Fp4 { data, scales, tensor_scale, cols, kind, .. } => {
                let (codes, srow) = fp4_row(data, scales, cols, kind, r);
                fp4_decode_range(codes, srow, tensor_scale, kind, c0, out)
            }
            MatRef::Ggml { data, cols, kind, .. } => {
                let rb = cols / kind.block_elems() * kind.block_bytes();
                crate::ggml::dot::decode_range(kind, &data[r * rb..][..rb], c0, out)
            }
        }
    }

    /// The whole matrix as f32 (tests and one-off conversions; never on a hot path).
    pub fn to_f32(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows(), self.cols());
        let mut out = vec![0f32; rows * cols];
        for (r, row) in out.chunks_exact_mut(cols.max(1)).enumerate().take(rows) {
            self.decode_row(r, 0, row);
        }
        out
    }

    /// `y[j] += a·W[r, c0 + j]` for `j < y.len()`.
    #[inline]
    pub fn row_axpy(&self, r: usize, c0: usize, a: f32, y: &mut [f32]) {
        let n = y.len();
        match *self {
            MatRef::F32 { data, cols, .. } => dot::axpy_f32(y, a, &data[r * cols + c0..][..n]),
            MatRef::Bf16 { data, cols, .. } => dot::axpy_bf16(y, a, &data[(r * cols + c0) * 2..][..n * 2]),
            MatRef::Fp8 { data, scale_inv, cols, block, .. } => {
                let row = &data[r * cols..][..cols];
                let srow = &scale_inv[(r / block[0]) * cols.div_ceil(block[1])..];
                let mut c = c0;
                while c < c0 + n {
                    let end = ((c / block[1] + 1) * block[1]).min(c0 + n);
                    dot::axpy_fp8(&mut y[c - c0..end - c0], a * srow[c / block[1]], &row[c..end]);
                    c = end;
                }
            }
            MatRef::Fp4 { data, scales, tensor_scale, cols, kind, .. } => {
                let (codes, srow) = fp4_row(data, scales, cols, kind, r);
                let mut buf = [0f32; 128];
                for (i, ys) in y.chunks_mut(128).enumerate() {
                    let vals = &mut buf[..ys.len()];
                    fp4_decode_range(codes, srow, tensor_scale, kind, c0 + 128 * i, vals);
                    dot::axpy_f32(ys, a, vals);
                }
            }
            MatRef::Ggml { data, cols, kind, .. } => {
                let rb = cols / kind.block_elems() * kind.block_bytes();
                crate::ggml::dot::axpy_row(kind, &data[r * rb..][..rb], c0, a, y)
            }
        }
    }
}

/// Row `r`'s packed codes and scale codes of an FP4 matrix.
fn fp4_row<'a>(data: &'a [u8], scales: &'a [u8], cols: usize, kind: Fp4Kind, r: usize) -> (&'a [u8], &'a [u8]) {
    let nb = cols.div_ceil(kind.block());
    (&data[r * cols.div_ceil(2)..][..cols.div_ceil(2)], &scales[r * nb..][..nb])
}
