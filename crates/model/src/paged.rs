//! The latent KV cache in pages: each layer's cache is a block table of 64-position blocks holding
//! only what MLA caches (`c_kv` and the rotated `k_pe`, `C + R` values per position; with V3.2's
//! sparse attention also the indexer's key, `index_head_dim` more). Blocks are
//! reference-counted, so sequences with the same prompt prefix can share its full blocks (the
//! server's prefix reuse); a shared block is never written — appends go to a block of one's own,
//! and a rollback into a shared block copies it first. Blocks made in a [`BlockPool`] are counted
//! there from creation to drop, which is the server's memory budget and its `/metrics` figure.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Positions per block.
pub const BLOCK_TOKENS: usize = 64;

/// Counts live blocks against a capacity.
#[derive(Debug, Default)]
pub struct BlockPool {
    in_use: AtomicUsize,
    /// Blocks the budget allows (one block = one layer's 64 positions).
    pub capacity: usize,
}

impl BlockPool {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(BlockPool { in_use: AtomicUsize::new(0), capacity })
    }

    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }
}

/// Up to [`BLOCK_TOKENS`] positions of one layer: `c_kv [n, C]`, `k_pe [n, R]` and, for sparse
/// attention, the indexer's keys `k_idx [n, d_I]` — or, with the official indexer numerics,
/// their E4M3 codes `k_idx8 [n, d_I]` and scales `k_idx_scale [n, d_I/128]`, as DeepSeek's
/// code keeps them (the unused form stays empty).
#[derive(Debug)]
pub struct LatentBlock {
    pub c_kv: Vec<f32>,
    pub k_pe: Vec<f32>,
    pub k_idx: Vec<f32>,
    pub k_idx8: Vec<u8>,
    pub k_idx_scale: Vec<f32>,
    pool: Option<Arc<BlockPool>>,
}

/// Index keys as the cache takes and gives them: one position's on [`LatentCache::push`], a
/// block's `[n, d_I]` from [`LatentCache::index_pages`].
#[derive(Clone, Copy, Debug)]
pub enum IndexKeys<'a> {
    F32(&'a [f32]),
    /// E4M3 codes and one scale per 128 values of a row (value = code × scale).
    Fp8 {
        codes: &'a [u8],
        scales: &'a [f32],
    },
}

impl<'a> IndexKeys<'a> {
    /// Values held (rows × `d_I`).
    pub fn len(&self) -> usize {
        match self {
            IndexKeys::F32(k) => k.len(),
            IndexKeys::Fp8 { codes, .. } => codes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `r0..r1` of keys `d` wide.
    pub fn rows(&self, d: usize, r0: usize, r1: usize) -> IndexKeys<'a> {
        match *self {
            IndexKeys::F32(k) => IndexKeys::F32(&k[r0 * d..r1 * d]),
            IndexKeys::Fp8 { codes, scales } => {
                let sw = d.div_ceil(128);
                IndexKeys::Fp8 { codes: &codes[r0 * d..r1 * d], scales: &scales[r0 * sw..r1 * sw] }
            }
        }
    }

    /// The keys as f32 (`Fp8`: decoded, exact).
    pub fn to_f32(&self, d: usize) -> std::borrow::Cow<'a, [f32]> {
        match *self {
            IndexKeys::F32(k) => std::borrow::Cow::Borrowed(k),
            IndexKeys::Fp8 { codes, scales } => {
                let sw = d.div_ceil(128);
                static E4M3: std::sync::LazyLock<[f32; 256]> =
                    std::sync::LazyLock::new(|| dsv3_kernels::formats::E4M3.table());
                let mut out = Vec::with_capacity(codes.len());
                for (c, s) in codes.chunks_exact(d).zip(scales.chunks_exact(sw)) {
                    out.extend(c.iter().enumerate().map(|(j, &b)| E4M3[b as usize] * s[j / 128]));
                }
                std::borrow::Cow::Owned(out)
            }
        }
    }
}

impl LatentBlock {
    fn new(pool: Option<Arc<BlockPool>>, c: usize, r: usize, k: IndexKeys) -> Self {
        if let Some(p) = &pool {
            p.in_use.fetch_add(1, Ordering::Relaxed);
        }
        let cap = |w: usize| Vec::with_capacity(BLOCK_TOKENS * w);
        let (i, i8, is) = match k {
            IndexKeys::F32(k) => (k.len(), 0, 0),
            IndexKeys::Fp8 { codes, scales } => (0, codes.len(), scales.len()),
        };
        let (k_idx8, k_idx_scale) = (Vec::with_capacity(BLOCK_TOKENS * i8), cap(is));
        LatentBlock { c_kv: cap(c), k_pe: cap(r), k_idx: cap(i), k_idx8, k_idx_scale, pool }
    }

    /// The block's index keys in the form it holds them.
    pub fn index_keys(&self) -> IndexKeys<'_> {
        if self.k_idx8.is_empty() {
            IndexKeys::F32(&self.k_idx)
        } else {
            IndexKeys::Fp8 { codes: &self.k_idx8, scales: &self.k_idx_scale }
        }
    }
}

impl Clone for LatentBlock {
    fn clone(&self) -> Self {
        if let Some(p) = &self.pool {
            p.in_use.fetch_add(1, Ordering::Relaxed);
        }
        LatentBlock {
            c_kv: self.c_kv.clone(),
            k_pe: self.k_pe.clone(),
            k_idx: self.k_idx.clone(),
            k_idx8: self.k_idx8.clone(),
            k_idx_scale: self.k_idx_scale.clone(),
            pool: self.pool.clone(),
        }
    }
}

impl Drop for LatentBlock {
    fn drop(&mut self) {
        if let Some(p) = &self.pool {
            p.in_use.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One layer's latent cache: a block table and the number of positions held.
#[derive(Clone, Debug, Default)]
pub struct LatentCache {
    blocks: Vec<Arc<LatentBlock>>,
    len: usize,
    pool: Option<Arc<BlockPool>>,
}

impl LatentCache {
    /// An empty cache whose blocks count in `pool`.
    pub fn in_pool(pool: Option<Arc<BlockPool>>) -> Self {
        LatentCache { blocks: vec![], len: 0, pool }
    }

    /// A cache that starts with shared full blocks (a reused prompt prefix).
    pub fn with_prefix(blocks: Vec<Arc<LatentBlock>>, pool: Option<Arc<BlockPool>>) -> Self {
        let len = blocks.len() * BLOCK_TOKENS;
        LatentCache { blocks, len, pool }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The block table.
    pub fn blocks(&self) -> &[Arc<LatentBlock>] {
        &self.blocks
    }

    /// Appends one position (`k_idx` empty without sparse attention). A cache holds its index
    /// keys in one form, the first position's.
    pub fn push(&mut self, c_kv: &[f32], k_pe: &[f32], k_idx: IndexKeys) {
        if self.len.is_multiple_of(BLOCK_TOKENS) {
            let b = LatentBlock::new(self.pool.clone(), c_kv.len(), k_pe.len(), k_idx);
            self.blocks.push(Arc::new(b));
        }
        // Unique unless a rollback kept a shared block partly (then it is copied here).
        let b = Arc::make_mut(self.blocks.last_mut().expect("a block was just ensured"));
        b.c_kv.extend_from_slice(c_kv);
        b.k_pe.extend_from_slice(k_pe);
        match k_idx {
            IndexKeys::F32(k) => b.k_idx.extend_from_slice(k),
            IndexKeys::Fp8 { codes, scales } => {
                b.k_idx8.extend_from_slice(codes);
                b.k_idx_scale.extend_from_slice(scales);
            }
        }
        self.len += 1;
    }

    /// Drops positions from `len` on (speculative rollback, a chat turn reusing the last one's
    /// prefix). Blocks past the end are released.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let last = len.div_ceil(BLOCK_TOKENS);
        // Positions the block that becomes the last one holds now.
        let held = if last == self.blocks.len() { self.len - (last - 1) * BLOCK_TOKENS } else { BLOCK_TOKENS };
        self.blocks.truncate(last);
        self.len = len;
        let keep = len - len.saturating_sub(1) / BLOCK_TOKENS * BLOCK_TOKENS;
        if len > 0 && keep < held {
            let b = Arc::make_mut(self.blocks.last_mut().expect("len > 0 keeps a block"));
            let (cw, rw, iw) = (b.c_kv.len() / held, b.k_pe.len() / held, b.k_idx.len() / held);
            let (i8w, isw) = (b.k_idx8.len() / held, b.k_idx_scale.len() / held);
            b.c_kv.truncate(keep * cw);
            b.k_pe.truncate(keep * rw);
            b.k_idx.truncate(keep * iw);
            b.k_idx8.truncate(keep * i8w);
            b.k_idx_scale.truncate(keep * isw);
        }
    }

    /// The pages for the attention kernel: `(c_kv pages, k_pe pages)`.
    pub fn pages(&self) -> (Vec<&[f32]>, Vec<&[f32]>) {
        (
            self.blocks.iter().map(|b| b.c_kv.as_slice()).collect(),
            self.blocks.iter().map(|b| b.k_pe.as_slice()).collect(),
        )
    }

    /// The indexer's key pages (`[n, d_I]` each; empty without sparse attention).
    pub fn index_pages(&self) -> Vec<IndexKeys<'_>> {
        self.blocks.iter().map(|b| b.index_keys()).collect()
    }

    /// The whole cache as contiguous `c_kv [len, C]` and `k_pe [len, R]` (the naive attention
    /// expands every position through `kv_b_proj` at once).
    pub fn contiguous(&self) -> (Vec<f32>, Vec<f32>) {
        (
            self.blocks.iter().flat_map(|b| b.c_kv.iter().copied()).collect(),
            self.blocks.iter().flat_map(|b| b.k_pe.iter().copied()).collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: usize, w: usize) -> Vec<f32> {
        (0..w).map(|j| (i * 100 + j) as f32).collect()
    }

    #[test]
    fn blocks_fill_truncate_share_and_count_in_the_pool() {
        let pool = BlockPool::new(100);
        let (c, r) = (3, 2);
        let mut a = LatentCache::in_pool(Some(pool.clone()));
        for i in 0..150 {
            a.push(&row(i, c), &row(i, r), IndexKeys::F32(&row(i, 1)));
        }
        assert_eq!((a.len(), a.blocks().len(), pool.in_use()), (150, 3, 3));
        let (ck, kp) = a.contiguous();
        assert_eq!(ck, (0..150).flat_map(|i| row(i, c)).collect::<Vec<_>>());
        assert_eq!(kp.len(), 150 * r);
        // Truncation inside a block and onto a block boundary.
        a.truncate(100);
        assert_eq!((a.len(), a.blocks().len(), pool.in_use()), (100, 2, 2));
        assert_eq!((a.blocks()[1].c_kv.len(), a.blocks()[1].k_idx.len()), (36 * c, 36));
        a.truncate(64);
        assert_eq!((a.blocks().len(), pool.in_use(), a.blocks()[0].c_kv.len()), (1, 1, 64 * c));
        // A second cache shares the full block: appends and rollbacks never touch the shared one.
        let mut b = LatentCache::with_prefix(a.blocks().to_vec(), Some(pool.clone()));
        assert_eq!((b.len(), pool.in_use()), (64, 1));
        b.push(&row(999, c), &row(999, r), IndexKeys::F32(&row(999, 1)));
        assert_eq!(pool.in_use(), 2);
        b.truncate(10); // into the shared block: copied first
        assert_eq!(pool.in_use(), 2);
        assert_eq!(a.blocks()[0].c_kv.len(), 64 * c, "the shared block is intact");
        assert_eq!(b.contiguous().0, (0..10).flat_map(|i| row(i, c)).collect::<Vec<_>>());
        drop(a);
        drop(b);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn fp8_index_keys_are_kept_truncated_and_decoded() {
        let d = 256; // two scales per key
        let mut a = LatentCache::in_pool(None);
        for i in 0..70u8 {
            let codes = vec![i; d];
            a.push(&[0.0], &[0.0], IndexKeys::Fp8 { codes: &codes, scales: &[1.0, 2.0] });
        }
        a.truncate(66);
        let pages = a.index_pages();
        assert_eq!((pages.len(), pages[1].len()), (2, 2 * d));
        let keys = pages[1].to_f32(d);
        let one = dsv3_kernels::formats::E4M3.decode(65);
        assert_eq!((keys[d], keys[2 * d - 1]), (one, 2.0 * one));
        assert!(a.blocks()[1].k_idx.is_empty());
    }
}
