//! The i-quant lattices expanded from their packed form ([`super::grids`]) at compile time:
//! one u64 (8 coordinates, a byte each) or u32 (4 coordinates) per point, as ggml keeps them.

use super::grids::*;

const fn expand8<const N: usize>(packed: &[u16; N], map: &[i8], bits: u32) -> [u64; N] {
    let mut out = [0u64; N];
    let mask = (1u16 << bits) - 1;
    let mut i = 0;
    while i < N {
        let mut j = 0;
        while j < 8 {
            let v = map[((packed[i] >> (bits * j)) & mask) as usize] as u8;
            out[i] |= (v as u64) << (8 * j);
            j += 1;
        }
        i += 1;
    }
    out
}

const fn expand4<const N: usize>(packed: &[u16; N], map: &[i8]) -> [u32; N] {
    let mut out = [0u32; N];
    let mut i = 0;
    while i < N {
        let mut j = 0;
        while j < 4 {
            let v = map[((packed[i] >> (3 * j)) & 7) as usize] as u8;
            out[i] |= (v as u32) << (8 * j);
            j += 1;
        }
        i += 1;
    }
    out
}

/// `ksigns_iq2xs`: 7 sign bits and an eighth that makes their count even.
const fn ksigns() -> [u8; 128] {
    let mut out = [0u8; 128];
    let mut i = 0;
    while i < 128 {
        out[i] = i as u8 | (((i as u32).count_ones() as u8 & 1) << 7);
        i += 1;
    }
    out
}

pub static IQ2XXS_GRID: [u64; 256] = expand8(&IQ2XXS_PACKED, &IQ2XXS_MAP, 2);
pub static IQ2XS_GRID: [u64; 512] = expand8(&IQ2XS_PACKED, &IQ2XS_MAP, 2);
pub static IQ2S_GRID: [u64; 1024] = expand8(&IQ2S_PACKED, &IQ2S_MAP, 2);
pub static IQ3XXS_GRID: [u32; 256] = expand4(&IQ3XXS_PACKED, &IQ3XXS_MAP);
pub static IQ3S_GRID: [u32; 512] = expand4(&IQ3S_PACKED, &IQ3S_MAP);
/// Coordinates are −1, 0, 1 as signed bytes.
pub static IQ1S_GRID: [u64; 2048] = expand8(&IQ1S_PACKED, &IQ1S_MAP, 2);
pub static KSIGNS: [u8; 128] = ksigns();

/// Coordinate `j` of an 8-wide lattice point, as ggml reads it (unsigned for IQ2, signed for IQ1).
#[inline]
pub fn coord8(p: u64, j: usize) -> u8 {
    (p >> (8 * j)) as u8
}

#[inline]
pub fn coord4(p: u32, j: usize) -> u8 {
    (p >> (8 * j)) as u8
}
