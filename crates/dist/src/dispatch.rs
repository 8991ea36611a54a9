//! Where a token's rows go under expert parallelism: routed expert `e` of `E` lives on rank
//! `e·R/E` (contiguous blocks, as DeepEP lays them out and the static inference placement
//! places them), and each token is sent once to every rank holding one of its experts. With the
//! experts of each node contiguous, the nodes a token reaches bound its inter-node traffic
//! (node-limited routing, report §2.1.2: DeepSeek-V3 routes over 8 groups keeping 4, so with one
//! group per node a token reaches at most 4 nodes).

/// The rank holding routed expert `e` of `experts` over `ranks`.
pub fn owner(e: usize, experts: usize, ranks: usize) -> usize {
    e * ranks / experts.max(1)
}

/// The distinct ranks each token's `k` routed experts (`experts_of [t, k]`) live on, ascending:
/// where the token is sent.
pub fn ranks_per_token(experts_of: &[usize], k: usize, experts: usize, ranks: usize) -> Vec<Vec<usize>> {
    experts_of
        .chunks(k.max(1))
        .map(|slots| {
            let mut r: Vec<usize> = slots.iter().map(|&e| owner(e, experts, ranks)).collect();
            r.sort_unstable();
            r.dedup();
            r
        })
        .collect()
}

/// How many distinct nodes each token reaches, the experts of each node a contiguous block of
/// `experts / nodes` (counted from the block index, independently of [`owner`]).
pub fn nodes_per_token(experts_of: &[usize], k: usize, experts: usize, nodes: usize) -> Vec<usize> {
    let per = (experts / nodes.max(1)).max(1);
    experts_of
        .chunks(k.max(1))
        .map(|slots| {
            let mut seen = vec![false; nodes.max(1)];
            slots.iter().for_each(|&e| seen[(e / per).min(nodes.max(1) - 1)] = true);
            seen.iter().filter(|&&s| s).count()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_blocks_and_distinct_destinations() {
        assert_eq!((0..8).map(|e| owner(e, 8, 4)).collect::<Vec<_>>(), [0, 0, 1, 1, 2, 2, 3, 3]);
        let routed = [0, 1, 6, 7, 2, 5];
        assert_eq!(ranks_per_token(&routed, 3, 8, 4), [vec![0, 3], vec![1, 2, 3]]);
        assert_eq!(nodes_per_token(&routed, 3, 8, 2), [2, 2]);
    }
}
