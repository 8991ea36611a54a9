//! llama.cpp's (ggml's) weight formats: the block layouts GGUF files store, read in place.
//!
//! A ggml row of `n` values is `n / block_elems` blocks of `block_bytes` bytes each; a matrix is
//! rows of blocks along its innermost dimension (`ne0`, the `Linear` input). [`dequantize`] is the
//! definition (scalar, bit for bit what llama.cpp's `dequantize_row_*` and the `gguf` package
//! give: `tests/ggml_formats.rs` compares it with fixtures from `scripts/ggml_fixtures.py`); the
//! dot products of [`dot`] are tested against it.

#[cfg(target_arch = "x86_64")]
pub mod avx2;
pub mod dequant;
pub mod dot;
pub mod grids;
mod lattice;
pub mod low_bit;
pub mod quantize;
pub mod vnni;

pub use dequant::dequantize;

/// A ggml tensor type dsv3 reads (ids as in `ggml.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Iq4Nl,
    Iq4Xs,
    Iq2Xxs,
    Iq2Xs,
    Iq2S,
    Iq3Xxs,
    Iq3S,
    Iq1S,
    Iq1M,
    Mxfp4,
}

/// Every type, in id order (tests and error messages).
pub const ALL: [GgmlType; 23] = {
    use GgmlType::*;
    [
        F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K, Iq2Xxs, Iq2Xs, Iq3Xxs, Iq1S, Iq4Nl, Iq3S,
        Iq2S, Iq4Xs, Iq1M, Bf16, Mxfp4,
    ]
};

impl GgmlType {
    /// The type with ggml id `id`, if dsv3 reads it.
    pub fn from_id(id: u32) -> Option<Self> {
        ALL.into_iter().find(|t| t.id() == id)
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Iq2Xxs => 16,
            Iq2Xs => 17,
            Iq3Xxs => 18,
            Iq1S => 19,
            Iq4Nl => 20,
            Iq3S => 21,
            Iq2S => 22,
            Iq4Xs => 23,
            Iq1M => 29,
            Bf16 => 30,
            Mxfp4 => 39,
        }
    }

    /// ggml's name (`ggml_type_name`).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "f32",
            F16 => "f16",
            Bf16 => "bf16",
            Q4_0 => "q4_0",
            Q4_1 => "q4_1",
            Q5_0 => "q5_0",
            Q5_1 => "q5_1",
            Q8_0 => "q8_0",
            Q2K => "q2_K",
            Q3K => "q3_K",
            Q4K => "q4_K",
            Q5K => "q5_K",
            Q6K => "q6_K",
            Iq4Nl => "iq4_nl",
            Iq4Xs => "iq4_xs",
            Iq2Xxs => "iq2_xxs",
            Iq2Xs => "iq2_xs",
            Iq2S => "iq2_s",
            Iq3Xxs => "iq3_xxs",
            Iq3S => "iq3_s",
            Iq1S => "iq1_s",
            Iq1M => "iq1_m",
            Mxfp4 => "mxfp4",
        }
    }

    /// Values per block.
    pub fn block_elems(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | Bf16 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Iq4Nl | Mxfp4 => 32,
            _ => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | Bf16 => 2,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q2K => 84,
            Q3K => 110,
            Q4K => 144,
            Q5K => 176,
            Q6K => 210,
            Iq4Nl => 18,
            Iq4Xs => 136,
            Iq2Xxs => 66,
            Iq2Xs => 74,
            Iq2S => 82,
            Iq3Xxs => 98,
            Iq3S => 110,
            Iq1S => 50,
            Iq1M => 56,
            Mxfp4 => 17,
        }
    }

    /// Bytes of a row of `n` values: `None` when `n` is not a whole number of blocks or the
    /// size overflows.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_elems()) {
            return None;
        }
        (n / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// Bits per weight (for reports).
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_elems() as f64
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
