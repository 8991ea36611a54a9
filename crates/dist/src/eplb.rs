//! EPLB (`deepseek-ai/EPLB`, parallel §2): place `P` physical expert slots over `Ng` GPUs in `Nn`
//! nodes so the per-GPU load is even, replicating the heaviest logical experts.
//!
//! Hierarchical policy (when the expert groups divide evenly among nodes): groups are packed onto
//! nodes first (so a routing group stays inside one node), then each node replicates its experts
//! greedily onto its `P/Nn` slots, then the replicas are packed onto the node's GPUs. Otherwise
//! the global policy: the same with one group and one node.

/// Where every physical slot's expert comes from, and the inverse.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Placement {
    /// `[L][P]`: the logical expert of each physical slot (slot p lives on GPU p / (P/Ng)).
    pub phy2log: Vec<Vec<usize>>,
    /// `[L][P]`: which replica of its expert each slot is.
    pub phyrank: Vec<Vec<usize>>,
    /// `[L][E][maxcnt]`: the slots of each expert's replicas, padded with −1.
    pub log2phy: Vec<Vec<Vec<i64>>>,
    /// `[L][E]`: replicas per expert.
    pub logcnt: Vec<Vec<usize>>,
}

impl Placement {
    /// Load of each GPU in layer `l`: every slot carries its expert's load divided by the replicas.
    pub fn loads(&self, l: usize, weight: &[f64], num_gpus: usize) -> Vec<f64> {
        let p = self.phy2log[l].len();
        let per = p / num_gpus.max(1);
        (0..num_gpus)
            .map(|g| {
                (g * per..(g + 1) * per)
                    .map(|s| weight[self.phy2log[l][s]] / self.logcnt[l][self.phy2log[l][s]] as f64)
                    .sum()
            })
            .collect()
    }
}

/// Max over mean of per-GPU loads (1 = perfect balance).
pub fn imbalance(loads: &[f64]) -> f64 {
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    if mean > 0.0 {
        loads.iter().copied().fold(0.0, f64::max) / mean
    } else {
        1.0
    }
}

/// `rebalance_experts(weight [L][E], P, G, Nn, Ng)` as EPLB's `eplb.py`.
pub fn rebalance_experts(
    weight: &[Vec<f64>],
    num_replicas: usize,
    num_groups: usize,
    num_nodes: usize,
    num_gpus: usize,
) -> Result<Placement, String> {
    let e = weight.first().map_or(0, |w| w.len());
    if weight.is_empty() || e == 0 || weight.iter().any(|w| w.len() != e) {
        return Err("the load must be a non-empty [layers][experts] table with rows of equal length".into());
    }
    if weight.iter().flatten().any(|w| !w.is_finite() || *w < 0.0) {
        return Err("loads must be finite and non-negative".into());
    }
    if num_nodes == 0 || num_groups == 0 || num_gpus == 0 {
        return Err("groups, nodes and GPUs must be positive".into());
    }
    // Groups that divide among the nodes: hierarchical; otherwise global (one group, one node).
    let (groups, nodes) = if num_groups.is_multiple_of(num_nodes) { (num_groups, num_nodes) } else { (1, 1) };
    for (ok, what) in [
        (e.is_multiple_of(groups), "the experts must divide into the groups"),
        (num_gpus.is_multiple_of(nodes), "the GPUs must divide among the nodes"),
        (num_replicas.is_multiple_of(num_gpus), "the replicas must divide among the GPUs"),
        (num_replicas >= e, "there must be at least one replica per expert"),
    ] {
        if !ok {
            return Err(format!(
                "{what} (E={e}, P={num_replicas}, G={num_groups}, nodes={num_nodes}, GPUs={num_gpus})"
            ));
        }
    }
    let mut out = Placement { phy2log: vec![], phyrank: vec![], log2phy: vec![], logcnt: vec![] };
    for w in weight {
        let (phy2log, phyrank, logcnt) = hierarchical(w, num_replicas, groups, nodes, num_gpus);
        out.phy2log.push(phy2log);
        out.phyrank.push(phyrank);
        out.logcnt.push(logcnt);
    }
    let maxcnt = out.logcnt.iter().flatten().copied().max().unwrap_or(1);
    for l in 0..weight.len() {
        let mut table = vec![vec![-1i64; maxcnt]; e];
        for (p, (&lg, &r)) in out.phy2log[l].iter().zip(&out.phyrank[l]).enumerate() {
            table[lg][r] = p as i64;
        }
        out.log2phy.push(table);
    }
    Ok(out)
}

/// Assigns `w.len()` items to `m` packs of exactly `w.len()/m` items each, heaviest first, each to
/// the lightest pack that still has room (ties: the lowest pack). Returns (pack, rank in pack).
fn balanced_packing(w: &[f64], m: usize) -> (Vec<usize>, Vec<usize>) {
    let n = w.len();
    let per = n / m;
    if per == 1 {
        return ((0..n).collect(), vec![0; n]);
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| w[b].total_cmp(&w[a])); // stable: equal weights keep index order
    let (mut pack, mut rank) = (vec![0; n], vec![0; n]);
    let (mut load, mut count) = (vec![0f64; m], vec![0usize; m]);
    for item in order {
        let p = (0..m).filter(|&p| count[p] < per).min_by(|&a, &b| load[a].total_cmp(&load[b])).expect("room remains");
        pack[item] = p;
        rank[item] = count[p];
        load[p] += w[item];
        count[p] += 1;
    }
    (pack, rank)
}

/// Fills `slots` physical slots: one per item, then each extra slot to the item with the largest
/// load per replica (first maximum). Returns (slot → item, replica rank, replicas per item).
fn replicate(w: &[f64], slots: usize) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let n = w.len();
    let mut phy2log: Vec<usize> = (0..n).collect();
    let mut rank = vec![0; n];
    let mut cnt = vec![1usize; n];
    for _ in n..slots {
        let mut best = 0;
        for e in 1..n {
            if w[e] / cnt[e] as f64 > w[best] / cnt[best] as f64 {
                best = e;
            }
        }
        phy2log.push(best);
        rank.push(cnt[best]);
        cnt[best] += 1;
    }
    (phy2log, rank, cnt)
}

/// One layer of the hierarchical policy: (phy2log [P], phyrank [P], logcnt [E]).
fn hierarchical(w: &[f64], p: usize, g: usize, nodes: usize, gpus: usize) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let e = w.len();
    let (gs, gpn, spg) = (e / g, g / nodes, p / gpus);
    let (e_node, p_node, gpus_node) = (e / nodes, p / nodes, gpus / nodes);
    // 1. Groups onto nodes; "mlog" numbers the experts node by node.
    let gw: Vec<f64> = (0..g).map(|i| w[i * gs..(i + 1) * gs].iter().sum()).collect();
    let (gpack, grank) = balanced_packing(&gw, nodes);
    let log2mlog: Vec<usize> = (0..e).map(|x| (gpack[x / gs] * gpn + grank[x / gs]) * gs + x % gs).collect();
    let mut mlog2log = vec![0; e];
    for (lg, &m) in log2mlog.iter().enumerate() {
        mlog2log[m] = lg;
    }
    let (mut phy2log, mut phyrank, mut mlogcnt) = (vec![0; p], vec![0; p], vec![0; e]);
    for k in 0..nodes {
        // 2. Replicate the node's experts onto its slots.
        let tw: Vec<f64> = (0..e_node).map(|i| w[mlog2log[k * e_node + i]]).collect();
        let (phy2mlog, prank, cnt) = replicate(&tw, p_node);
        mlogcnt[k * e_node..(k + 1) * e_node].copy_from_slice(&cnt);
        // 3. Pack the replicas onto the node's GPUs.
        let tpp: Vec<f64> = phy2mlog.iter().map(|&i| tw[i] / cnt[i] as f64).collect();
        let (pk, rk) = balanced_packing(&tpp, gpus_node);
        let mut slot2phy = vec![0; p_node];
        for j in 0..p_node {
            slot2phy[pk[j] * spg + rk[j]] = j;
        }
        // 4. Back to logical ids.
        for s in 0..p_node {
            let j = slot2phy[s];
            phy2log[k * p_node + s] = mlog2log[phy2mlog[j] + k * e_node];
            phyrank[k * p_node + s] = prank[j];
        }
    }
    let logcnt = (0..e).map(|x| mlogcnt[log2mlog[x]]).collect();
    (phy2log, phyrank, logcnt)
}

/// Live placement for expert-parallel serving: counts the (token, slot) pairs each logical expert
/// receives and, every `period` batches, re-places the experts over `slots` physical slots on the
/// ranks with [`rebalance_experts`] (global policy) from the window's counts. A function of the
/// routing it observes, so every process that observes the same routing agrees on the placement
/// without exchanging it; requests in flight never notice (every process can compute any expert).
#[derive(Clone, Debug)]
pub struct LiveBalancer {
    experts: usize,
    ranks: usize,
    slots: usize,
    period: usize,
    counts: Vec<f64>,
    calls: usize,
    /// Ranks holding each logical expert's replicas; pairs are split among them by token.
    replicas: Vec<Vec<usize>>,
    window_current: Vec<f64>,
    window_static: Vec<f64>,
    /// Max/mean per-rank load of the last full window: (placement in force, static placement).
    pub last_imbalance: Option<(f64, f64)>,
    pub rebalances: usize,
}

impl LiveBalancer {
    /// Starts with the static placement (expert `e` on rank `e·R/E`, one replica each).
    pub fn new(experts: usize, ranks: usize, slots: usize, period: usize) -> Result<Self, String> {
        if ranks == 0 || experts < ranks || slots < experts || !slots.is_multiple_of(ranks) {
            return Err(format!("live placement: {experts} experts, {slots} slots on {ranks} ranks (slots ≥ experts, a multiple of the ranks)"));
        }
        Ok(LiveBalancer {
            experts,
            ranks,
            slots,
            period,
            counts: vec![0.0; experts],
            calls: 0,
            replicas: (0..experts).map(|e| vec![e * ranks / experts]).collect(),
            window_current: vec![0.0; ranks],
            window_static: vec![0.0; ranks],
            last_imbalance: None,
            rebalances: 0,
        })
    }

    /// The rank that computes `token`'s pair with expert `e`.
    pub fn rank_of(&self, e: usize, token: usize) -> usize {
        let r = &self.replicas[e];
        r[token % r.len()]
    }

    /// Records one batch's routing (`experts [t, k]`); at the end of a window re-places.
    pub fn observe(&mut self, experts: &[usize], k: usize) {
        for (j, &e) in experts.iter().enumerate() {
            self.counts[e] += 1.0;
            let r = self.rank_of(e, j / k.max(1));
            self.window_current[r] += 1.0;
            self.window_static[e * self.ranks / self.experts] += 1.0;
        }
        self.calls += 1;
        if self.period > 0 && self.calls.is_multiple_of(self.period) {
            self.last_imbalance = Some((imbalance(&self.window_current), imbalance(&self.window_static)));
            if let Ok(p) = rebalance_experts(std::slice::from_ref(&self.counts), self.slots, 1, 1, self.ranks) {
                let per = self.slots / self.ranks;
                let mut replicas = vec![vec![]; self.experts];
                for (slot, &e) in p.phy2log[0].iter().enumerate() {
                    replicas[e].push(slot / per);
                }
                self.replicas = replicas;
                self.rebalances += 1;
            }
            self.counts.iter_mut().for_each(|c| *c = 0.0);
            self.window_current.iter_mut().for_each(|c| *c = 0.0);
            self.window_static.iter_mut().for_each(|c| *c = 0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w1() -> Vec<Vec<f64>> {
        vec![
            vec![90., 132., 40., 61., 104., 165., 39., 4., 73., 56., 183., 86.],
            vec![20., 107., 104., 64., 19., 197., 187., 157., 172., 86., 16., 27.],
        ]
    }

    #[test]
    fn hierarchical_policy_reproduces_the_readme_vector() {
        let p = rebalance_experts(&w1(), 16, 4, 2, 8).unwrap();
        assert_eq!(
            p.phy2log,
            vec![
                vec![5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                vec![7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]
            ]
        );
        assert_eq!(p.logcnt, vec![vec![1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], vec![1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]);
        assert_eq!(
            p.phyrank,
            vec![
                vec![0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0],
                vec![0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
            ]
        );
        let l0: Vec<Vec<i64>> = [
            [12, -1],
            [15, 13],
            [11, -1],
            [6, -1],
            [7, 5],
            [0, 2],
            [1, -1],
            [3, -1],
            [4, -1],
            [9, -1],
            [8, 10],
            [14, -1],
        ]
        .iter()
        .map(|r| r.to_vec())
        .collect();
        let l1: Vec<Vec<i64>> = [
            [13, -1],
            [15, 11],
            [8, -1],
            [14, -1],
            [9, -1],
            [10, 12],
            [2, 4],
            [0, -1],
            [6, 3],
            [7, -1],
            [1, -1],
            [5, -1],
        ]
        .iter()
        .map(|r| r.to_vec())
        .collect();
        assert_eq!(p.log2phy, vec![l0, l1]);
        assert_eq!(p.loads(0, &w1()[0], 8), [121.5, 86.5, 125., 113., 147.5, 131.5, 156., 152.]);
        assert_eq!(p.loads(1, &w1()[1], 8), [173., 179.5, 120.5, 172., 123., 152., 118.5, 117.5]);
    }

    #[test]
    fn global_policy_reproduces_the_derived_vector_and_may_put_two_replicas_on_one_gpu() {
        let w = vec![w1()[0].clone()];
        let p = rebalance_experts(&w, 16, 1, 1, 8).unwrap();
        assert_eq!(p.phy2log, vec![vec![10, 6, 10, 7, 0, 2, 11, 4, 5, 9, 5, 4, 8, 3, 1, 1]]);
        assert_eq!(p.phyrank, vec![vec![0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1]]);
        assert_eq!(p.loads(0, &w[0], 8), [130.5, 95.5, 130., 138., 138.5, 134.5, 134., 132.]);
        // Groups that do not divide among the nodes fall back to the global policy.
        assert_eq!(rebalance_experts(&w, 16, 3, 2, 8).unwrap().phy2log, p.phy2log);
    }

    #[test]
    fn live_placement_follows_skewed_routing_and_evens_the_ranks() {
        // 8 experts on 4 ranks with 4 redundant slots; experts 0 and 1 get most tokens.
        let mut b = LiveBalancer::new(8, 4, 12, 10).unwrap();
        assert_eq!((0..8).map(|e| b.rank_of(e, 0)).collect::<Vec<_>>(), [0, 0, 1, 1, 2, 2, 3, 3]);
        let batch: Vec<usize> = (0..64).flat_map(|t| [t % 2, 2 + t % 6]).collect(); // top-2
        for _ in 0..20 {
            b.observe(&batch, 2);
        }
        assert_eq!(b.rebalances, 2);
        let (current, stat) = b.last_imbalance.unwrap();
        assert!(stat > 1.5 && current < 1.2, "static {stat}, placed {current}");
        // The hot experts got replicas on different ranks, and pairs are split between them.
        let ranks0: Vec<usize> = (0..4).map(|t| b.rank_of(0, t)).collect();
        assert!(ranks0.iter().collect::<std::collections::BTreeSet<_>>().len() > 1, "{ranks0:?}");
        assert!(LiveBalancer::new(8, 4, 10, 1).is_err());
    }

    #[test]
    fn replicas_lower_the_imbalance_and_bad_shapes_are_errors() {
        let w = w1();
        // A hot expert: 12 slots on 4 GPUs (no replica) against 16 (its load split 4 ways).
        let hot = vec![vec![600., 50., 40., 60., 30., 20., 50., 40., 30., 60., 10., 10.]];
        let none = rebalance_experts(&hot, 12, 1, 1, 4).unwrap();
        let some = rebalance_experts(&hot, 16, 1, 1, 4).unwrap();
        let (a, b) = (imbalance(&none.loads(0, &hot[0], 4)), imbalance(&some.loads(0, &hot[0], 4)));
        assert!(a > 2.0 && b < 1.1, "{a} → {b}");
        assert!(rebalance_experts(&w, 8, 4, 2, 8).is_err()); // fewer slots than experts
        assert!(rebalance_experts(&w, 16, 5, 1, 8).is_err()); // 12 experts in 5 groups
        assert!(rebalance_experts(&w, 18, 4, 2, 8).is_err()); // 18 slots on 8 GPUs
        assert!(rebalance_experts(&[vec![1.0, f64::NAN]], 2, 1, 1, 1).is_err());
        assert!(rebalance_experts(&[], 2, 1, 1, 1).is_err());
    }
}
