//! MoE dispatch and combine with DeepEP's semantics (parallel §3), over any all-to-all
//! ([`Exchange`]; MPI in [`crate::transport`]).
//!
//! Experts are spread evenly: rank `e / (E/R)` owns expert `e`; `-1` marks an empty top-k slot.
//! - **Normal mode** (training, prefill): a token goes once to each rank holding one of its
//!   experts; receivers see sources in rank order, then tokens in index order (deterministic),
//!   with top-k ids made local (`e − r·E/R`, `-1` elsewhere, weight 0 there). Combine is the
//!   exact inverse: each source gets back one row per destination and sums them in rank order
//!   (unweighted; the caller has already weighted its local experts).
//! - **Low-latency mode** (decode): one message per (token, slot), a fixed capacity of `M` tokens
//!   per source rank in each local expert's `[R·M, H]` block, and a weighted combine.
//! - Payloads optionally in FP8 (E4M3, 1×128 tiles with their scales), as DeepEP sends dispatch.

use dsv3_kernels::quant::{Fp8Blocks, ScaleFmt};

/// An all-to-all among `ranks()` processes: `send` holds one byte block per destination, sized by
/// `counts`; returns the blocks received, concatenated in source-rank order, and their sizes.
pub trait Exchange {
    fn rank(&self) -> usize;
    fn ranks(&self) -> usize;
    fn all_to_all(&self, send: &[u8], counts: &[usize]) -> (Vec<u8>, Vec<usize>);
    /// The same, with computation between posting the transfer and waiting for it: `work` runs
    /// one slice per call and returns whether more remains; the transport can make progress
    /// between slices. Default: not overlapped.
    fn all_to_all_overlapped(
        &self,
        send: &[u8],
        counts: &[usize],
        work: &mut dyn FnMut() -> bool,
    ) -> (Vec<u8>, Vec<usize>) {
        let r = self.all_to_all(send, counts);
        while work() {}
        r
    }
}

/// `get_dispatch_layout`.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub num_tokens_per_rank: Vec<usize>,
    pub num_tokens_per_expert: Vec<usize>,
    /// `[T, R]` row-major.
    pub is_token_in_rank: Vec<bool>,
}

pub fn layout(topk_idx: &[i64], k: usize, experts: usize, ranks: usize) -> Result<Layout, String> {
    if k == 0 || ranks == 0 || !experts.is_multiple_of(ranks) || !topk_idx.len().is_multiple_of(k) {
        return Err(format!(
            "layout: {experts} experts over {ranks} ranks with top-{k} ids ({} of them)",
            topk_idx.len()
        ));
    }
    let per = experts / ranks;
    let t = topk_idx.len() / k;
    let mut l = Layout {
        num_tokens_per_rank: vec![0; ranks],
        num_tokens_per_expert: vec![0; experts],
        is_token_in_rank: vec![false; t * ranks],
    };
    for (j, &e) in topk_idx.iter().enumerate() {
        if e < -1 || e >= experts as i64 {
            return Err(format!("expert id {e} out of range"));
        }
        if e >= 0 {
            l.num_tokens_per_expert[e as usize] += 1;
            l.is_token_in_rank[(j / k) * ranks + e as usize / per] = true;
        }
    }
    for ti in 0..t {
        for r in 0..ranks {
            l.num_tokens_per_rank[r] += usize::from(l.is_token_in_rank[ti * ranks + r]);
        }
    }
    Ok(l)
}

/// Node-limited routing (report §2.1.2): with the experts of each node contiguous (`nodes` equal
/// ranges), the number of distinct nodes each token's top-k slots reach — what bounds its
/// inter-node traffic. DeepSeek-V3 routes over `n_group` = 8 groups keeping `topk_group` = 4, so
/// with one group per node a token reaches at most 4 nodes.
pub fn nodes_per_token(topk_idx: &[i64], k: usize, experts: usize, nodes: usize) -> Vec<usize> {
    topk_idx
        .chunks(k.max(1))
        .map(|slots| {
            let mut seen: Vec<usize> =
                slots.iter().filter(|&&e| e >= 0).map(|&e| e as usize * nodes / experts.max(1)).collect();
            seen.sort_unstable();
            seen.dedup();
            seen.len()
        })
        .collect()
}

/// Rows of `h` values as bytes: f32, or FP8 codes then one f32 scale per 128 values of each row.
fn encode_rows(x: &[f32], h: usize, fp8: bool) -> Vec<u8> {
    if !fp8 {
        return x.iter().flat_map(|v| v.to_le_bytes()).collect();
    }
    let q = Fp8Blocks::quantize(x, x.len() / h.max(1), h, [1, 128], ScaleFmt::F32);
    let nb = h.div_ceil(128);
    let mut out = Vec::with_capacity(q.codes.len() + q.scales.len() * 4);
    for (codes, scales) in q.codes.chunks(h.max(1)).zip(q.scales.chunks(nb.max(1))) {
        out.extend_from_slice(codes);
        out.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
    }
    out
}

fn row_bytes(h: usize, fp8: bool) -> usize {
    if fp8 {
        h + 4 * h.div_ceil(128)
    } else {
        4 * h
    }
}

fn decode_rows(b: &[u8], h: usize, fp8: bool) -> Vec<f32> {
    if !fp8 {
        return b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    }
    let nb = h.div_ceil(128);
    let mut out = Vec::with_capacity(b.len() / row_bytes(h, true) * h);
    for row in b.chunks_exact(row_bytes(h, true)) {
        let (codes, scales) = row.split_at(h);
        let s: Vec<f32> = scales.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let q = Fp8Blocks { codes: codes.to_vec(), scales: s, rows: 1, cols: h, block: [1, 128] };
        debug_assert_eq!(q.scales.len(), nb);
        out.extend(q.dequantize());
    }
    out
}

fn i64s(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}

/// What combine needs to reverse a normal dispatch.
#[derive(Clone, Debug, PartialEq)]
pub struct Handle {
    /// Tokens sent to each destination rank, ascending.
    pub sent: Vec<Vec<usize>>,
    /// Rows received from each source rank.
    pub recv_per_rank: Vec<usize>,
    /// Source token index of each received row.
    pub recv_src_idx: Vec<usize>,
    pub tokens: usize,
}

/// The result of a normal dispatch on this rank.
#[derive(Clone, Debug)]
pub struct Dispatched {
    /// `[N, H]` rows, sources in rank order, tokens in index order.
    pub x: Vec<f32>,
    /// `[N, K]`: local expert ids, −1 where the slot's expert is elsewhere (or empty).
    pub topk_idx: Vec<i64>,
    /// `[N, K]`: 0 where the id is −1.
    pub topk_weights: Vec<f32>,
    /// Received (token, slot) pairs per local expert, rounded up to `alignment`.
    pub num_recv_tokens_per_expert: Vec<usize>,
    pub handle: Handle,
}

/// Normal-mode dispatch of this rank's `x [T, H]` with `topk_idx`/`topk_weights [T, K]`.
#[allow(clippy::too_many_arguments)]
pub fn dispatch(
    ex: &dyn Exchange,
    x: &[f32],
    h: usize,
    topk_idx: &[i64],
    topk_weights: &[f32],
    k: usize,
    experts: usize,
    alignment: usize,
    fp8: bool,
) -> Result<Dispatched, String> {
    let ranks = ex.ranks();
    let l = layout(topk_idx, k, experts, ranks)?;
    let t = topk_idx.len() / k;
    if x.len() != t * h || topk_weights.len() != t * k {
        return Err(format!(
            "dispatch: x has {} values and weights {} for {t} tokens of {h} × top-{k}",
            x.len(),
            topk_weights.len()
        ));
    }
    let per = experts / ranks;
    let sent: Vec<Vec<usize>> =
        (0..ranks).map(|r| (0..t).filter(|&ti| l.is_token_in_rank[ti * ranks + r]).collect()).collect();
    // Three exchanges with the same per-destination row order: rows, ids + source index, weights.
    let mut rows = vec![];
    let mut meta = vec![];
    let mut wts = vec![];
    let (mut c_rows, mut c_meta, mut c_w) = (vec![], vec![], vec![]);
    for (r, toks) in sent.iter().enumerate() {
        let xr: Vec<f32> = toks.iter().flat_map(|&ti| x[ti * h..(ti + 1) * h].iter().copied()).collect();
        let enc = encode_rows(&xr, h, fp8);
        c_rows.push(enc.len());
        rows.extend(enc);
        let before = (meta.len(), wts.len());
        for &ti in toks {
            meta.extend((ti as i64).to_le_bytes());
            for j in 0..k {
                let e = topk_idx[ti * k + j];
                let local = e >= 0 && e as usize / per == r;
                meta.extend((if local { e - (r * per) as i64 } else { -1 }).to_le_bytes());
                wts.extend((if local { topk_weights[ti * k + j] } else { 0.0 }).to_le_bytes());
            }
        }
        c_meta.push(meta.len() - before.0);
        c_w.push(wts.len() - before.1);
    }
    let (rx, rc) = ex.all_to_all(&rows, &c_rows);
    let (rm, _) = ex.all_to_all(&meta, &c_meta);
    let (rw, _) = ex.all_to_all(&wts, &c_w);
    let recv_per_rank: Vec<usize> = rc.iter().map(|&b| b / row_bytes(h, fp8)).collect();
    let m = i64s(&rm);
    let n: usize = recv_per_rank.iter().sum();
    let mut recv_src_idx = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n * k);
    for row in m.chunks_exact(k + 1) {
        recv_src_idx.push(row[0] as usize);
        ids.extend_from_slice(&row[1..]);
    }
    let mut counts = vec![0usize; per];
    for &e in &ids {
        if e >= 0 {
            counts[e as usize] += 1;
        }
    }
    let a = alignment.max(1);
    Ok(Dispatched {
        x: decode_rows(&rx, h, fp8),
        topk_idx: ids,
        topk_weights: f32s(&rw),
        num_recv_tokens_per_expert: counts.iter().map(|c| c.div_ceil(a) * a).collect(),
        handle: Handle { sent, recv_per_rank, recv_src_idx, tokens: t },
    })
}

/// Normal-mode combine: `y [N, H]` rows (one per received row, in receive order) go back to their
/// sources, which sum each token's rows over the destination ranks in rank order. Returns `[T, H]`.
pub fn combine(ex: &dyn Exchange, y: &[f32], h: usize, handle: &Handle) -> Vec<f32> {
    combine_overlapped(ex, y, h, handle, &mut || false)
}

/// [`combine`] with `work` (in slices, see [`Exchange::all_to_all_overlapped`]) overlapping the
/// transfer.
pub fn combine_overlapped(
    ex: &dyn Exchange,
    y: &[f32],
    h: usize,
    handle: &Handle,
    work: &mut dyn FnMut() -> bool,
) -> Vec<f32> {
    let counts: Vec<usize> = handle.recv_per_rank.iter().map(|&n| n * h * 4).collect();
    let bytes: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (back, _) = ex.all_to_all_overlapped(&bytes, &counts, work);
    let rows = f32s(&back);
    let mut out = vec![0f32; handle.tokens * h];
    let mut i = 0;
    for toks in &handle.sent {
        for &ti in toks {
            out[ti * h..(ti + 1) * h].iter_mut().zip(&rows[i * h..(i + 1) * h]).for_each(|(o, v)| *o += v);
            i += 1;
        }
    }
    out
}

/// What a low-latency dispatch delivered to this rank.
#[derive(Clone, Debug)]
pub struct LlDispatched {
    /// `[E/R, R·M, H]`: local expert `e`'s rows from source `s` at `s·M..s·M + count`.
    pub x: Vec<f32>,
    /// Valid rows per local expert.
    pub recv_count: Vec<usize>,
    /// `[E/R][R·M]`: the source token of each valid row (−1 beyond).
    pub src_info: Vec<Vec<i64>>,
    /// `[E/R][R]`: `(begin << 32) | count` of each source's rows.
    pub layout_range: Vec<Vec<u64>>,
    pub max_tokens: usize,
}

/// Low-latency dispatch: one message per (token, slot); at most `max_tokens` tokens of this rank
/// per expert.
#[allow(clippy::too_many_arguments)]
pub fn ll_dispatch(
    ex: &dyn Exchange,
    x: &[f32],
    h: usize,
    topk_idx: &[i64],
    k: usize,
    experts: usize,
    max_tokens: usize,
    fp8: bool,
) -> Result<LlDispatched, String> {
    let ranks = ex.ranks();
    layout(topk_idx, k, experts, ranks)?;
    let per = experts / ranks;
    let t = topk_idx.len() / k;
    if x.len() != t * h {
        return Err("ll_dispatch: x does not hold T rows of H".into());
    }
    // Per destination: (local expert, token) messages in (token, slot) order.
    let mut msgs: Vec<Vec<(usize, usize)>> = vec![vec![]; ranks];
    let mut per_expert = vec![0usize; experts];
    for (j, &e) in topk_idx.iter().enumerate() {
        if e >= 0 {
            let e = e as usize;
            per_expert[e] += 1;
            if per_expert[e] > max_tokens {
                return Err(format!(
                    "expert {e} gets more than {max_tokens} tokens from this rank (the low-latency capacity)"
                ));
            }
            msgs[e / per].push((e % per, j / k));
        }
    }
    let (mut rows, mut meta, mut c_rows, mut c_meta) = (vec![], vec![], vec![], vec![]);
    for m in &msgs {
        let xr: Vec<f32> = m.iter().flat_map(|&(_, ti)| x[ti * h..(ti + 1) * h].iter().copied()).collect();
        let enc = encode_rows(&xr, h, fp8);
        c_rows.push(enc.len());
        rows.extend(enc);
        c_meta.push(m.len() * 16);
        for &(le, ti) in m {
            meta.extend((le as i64).to_le_bytes());
            meta.extend((ti as i64).to_le_bytes());
        }
    }
    let (rx, _) = ex.all_to_all(&rows, &c_rows);
    let (rm, mc) = ex.all_to_all(&meta, &c_meta);
    let vals = decode_rows(&rx, h, fp8);
    let m = i64s(&rm);
    let cap = ranks * max_tokens;
    let mut out = LlDispatched {
        x: vec![0f32; per * cap * h],
        recv_count: vec![0; per],
        src_info: vec![vec![-1; cap]; per],
        layout_range: vec![vec![0; ranks]; per],
        max_tokens,
    };
    let mut row = 0;
    for (src, &bytes) in mc.iter().enumerate() {
        let mut fill = vec![0usize; per];
        for _ in 0..bytes / 16 {
            let (le, ti) = (m[2 * row] as usize, m[2 * row + 1]);
            let slot = src * max_tokens + fill[le];
            out.x[(le * cap + slot) * h..(le * cap + slot + 1) * h].copy_from_slice(&vals[row * h..(row + 1) * h]);
            out.src_info[le][slot] = ti;
            fill[le] += 1;
            row += 1;
        }
        for (le, &n) in fill.iter().enumerate() {
            out.layout_range[le][src] = (((src * max_tokens) as u64) << 32) | n as u64;
            out.recv_count[le] += n;
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
/// Low-latency combine: `y [E/R, R·M, H]` (the experts' outputs in the dispatch layout) back to
/// the sources, which return `out[t] = Σ_{k: idx ≠ −1} w[t,k]·y_{idx}[t]`, summed in slot order.
pub fn ll_combine(
    ex: &dyn Exchange,
    y: &[f32],
    h: usize,
    d: &LlDispatched,
    topk_idx: &[i64],
    topk_weights: &[f32],
    k: usize,
    experts: usize,
) -> Vec<f32> {
    let ranks = ex.ranks();
    let per = experts / ranks;
    let cap = ranks * d.max_tokens;
    // Back to each source: its rows of every local expert, in the order it sent them.
    let (mut bytes, mut counts) = (vec![], vec![]);
    for src in 0..ranks {
        let before = bytes.len();
        for le in 0..per {
            let r = d.layout_range[le][src];
            let (begin, n) = ((r >> 32) as usize, (r & 0xffff_ffff) as usize);
            for slot in begin..begin + n {
                bytes.extend(y[(le * cap + slot) * h..(le * cap + slot + 1) * h].iter().flat_map(|v| v.to_le_bytes()));
            }
        }
        counts.push(bytes.len() - before);
    }
    let (back, _) = ex.all_to_all(&bytes, &counts);
    let rows = f32s(&back);
    // Rows arrive by destination rank, then local expert — together, ascending expert id — then
    // in (token, slot) order.
    let t = topk_idx.len() / k;
    let mut order: Vec<usize> = (0..t * k).filter(|&j| topk_idx[j] >= 0).collect();
    order.sort_by_key(|&j| (topk_idx[j], j));
    let mut at = vec![usize::MAX; t * k];
    for (i, &j) in order.iter().enumerate() {
        at[j] = i;
    }
    let mut out = vec![0f32; t * h];
    for (j, &row) in at.iter().enumerate() {
        if row != usize::MAX {
            let w = topk_weights[j];
            let ti = j / k;
            out[ti * h..(ti + 1) * h].iter_mut().zip(&rows[row * h..(row + 1) * h]).for_each(|(o, v)| *o += w * v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_equals_a_brute_force_count() {
        // 5 tokens, top-3 of 8 experts on 4 ranks (2 each); −1 slots are skipped.
        let idx = [0, 1, 7, 2, 3, -1, -1, -1, -1, 6, 7, 5, 4, 0, 2];
        let l = layout(&idx, 3, 8, 4).unwrap();
        assert_eq!(l.num_tokens_per_expert, [2, 1, 2, 1, 1, 1, 1, 2]);
        let in_rank: Vec<Vec<bool>> = l.is_token_in_rank.chunks(4).map(|c| c.to_vec()).collect();
        assert_eq!(in_rank[0], [true, false, false, true]);
        assert_eq!(in_rank[1], [false, true, false, false]);
        assert_eq!(in_rank[2], [false, false, false, false]);
        assert_eq!(in_rank[3], [false, false, true, true]);
        assert_eq!(in_rank[4], [true, true, true, false]);
        assert_eq!(l.num_tokens_per_rank, [2, 2, 2, 2]);
        assert!(layout(&idx, 3, 8, 3).is_err());
        assert!(layout(&[9, 0, 1], 3, 8, 4).is_err());
    }

    #[test]
    fn fp8_rows_round_trip_within_e4m3_rounding() {
        let h = 300;
        let x: Vec<f32> = (0..2 * h).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.07).collect();
        let enc = encode_rows(&x, h, true);
        assert_eq!(enc.len(), 2 * row_bytes(h, true));
        let back = decode_rows(&enc, h, true);
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() / 16.0 + 1e-3, "{a} vs {b}");
        }
        assert_eq!(decode_rows(&encode_rows(&x, h, false), h, false), x);
    }
}
