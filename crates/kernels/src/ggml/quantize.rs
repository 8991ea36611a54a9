//! f32 → ggml blocks, for writing GGUF files.

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
