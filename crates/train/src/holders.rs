//! Which process holds, updates and saves each parameter in parallel training, and the
//! collective steps that follow from it.
//!
//! - Data parallelism: every process holds everything.
//! - Expert parallelism: a routed expert lives in one data-parallel replica ([`expert_owner`]).
//! - Pipelines: a process holds only the parameters of its stages' positions — its decoder
//!   layers, the embedding at the first position, the final norm, head and MTP modules (and the
//!   embedding again, for the MTP modules or a tied head) at the last.
//! - ZeRO-1: of the processes holding a parameter, one updates it and keeps its moments.
//!
//! Each gradient is summed over the processes holding that parameter, so every holder applies
//! the same update; before a checkpoint rank 0 collects whatever it does not hold.

use crate::optim::Optimizer;
use crate::parallel::Pipeline;
use dsv3_dist::comm::Comm;
use dsv3_dist::pipeline::P2p;
use dsv3_dist::schedule::stage_position;
use dsv3_model::grad::moe::{expert_owner, routed_expert};
use dsv3_model::grad::Grads;
use dsv3_model::DeepseekV3;
use std::collections::HashMap;
use std::ops::Range;

/// One trainable tensor and who has it.
struct Entry {
    name: String,
    shape: Vec<usize>,
    /// Processes holding it, ascending.
    holders: Vec<usize>,
    /// The holder that updates it and keeps its moments (ZeRO-1); `None`: every holder.
    updater: Option<usize>,
}

impl Entry {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

pub(crate) struct Holders {
    rank: usize,
    world: usize,
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
    /// The distinct holder sets, in one order every process shares, with their entries.
    sets: Vec<(Vec<usize>, Vec<usize>)>,
}

/// The decoder layers of each of `positions` pipeline positions: contiguous, at least one each,
/// split so that the costliest position costs least — by a token's multiply-adds, the last
/// position also running the head and the MTP modules (on a small model worth several layers).
/// Ties go to the earliest boundaries, so every process computes the same split.
pub(crate) fn stage_split(model: &DeepseekV3, positions: usize) -> Vec<Range<usize>> {
    let m = model.config.shape().macs_per_token(0);
    let n = m.layers.len();
    let tail = m.head + m.mtp.iter().sum::<f64>();
    // best[p][i]: the least max-cost of splitting layers i.. over positions p.. (∞ if impossible).
    let prefix: Vec<f64> = std::iter::once(0.0)
        .chain(m.layers.iter().scan(0.0, |a, &c| {
            *a += c;
            Some(*a)
        }))
        .collect();
    let cost = |i: usize, j: usize, last: bool| prefix[j] - prefix[i] + if last { tail } else { 0.0 };
    let mut best = vec![vec![f64::INFINITY; n + 1]; positions + 1];
    let mut cut = vec![vec![n; n + 1]; positions + 1];
    for (i, b) in best[positions - 1].iter_mut().enumerate().take(n) {
        *b = cost(i, n, true);
    }
    for p in (0..positions.saturating_sub(1)).rev() {
        for i in 0..n {
            for j in i + 1..n {
                let c = cost(i, j, false).max(best[p + 1][j]);
                if c < best[p][i] {
                    (best[p][i], cut[p][i]) = (c, j);
                }
            }
        }
    }
    let mut i = 0;
    cut.iter()
        .take(positions)
        .enumerate()
        .map(|(p, c)| {
            let j = if p + 1 == positions { n } else { c[i] };
            let range = i..j;
            i = j;
            range
        })
        .collect()
}

/// The positions pipeline rank `s` runs (one, or two for DualPipe and DualPipeV).
pub(crate) fn positions_of(p: Pipeline, s: usize) -> [usize; 2] {
    [0, 1].map(|dir| stage_position(p.kind, p.stages, s, dir).1)
}

/// Whether the stage at `pos` (of `split.len()`) reads parameter `name`.
fn uses(model: &DeepseekV3, name: &str, pos: usize, split: &[Range<usize>]) -> bool {
    let (layers, last) = (model.layers.len(), pos + 1 == split.len());
    if let Some(rest) = name.strip_prefix("model.layers.") {
        let l: usize = rest.split('.').next().and_then(|x| x.parse().ok()).expect("a layer index");
        return if l < layers { split[pos].contains(&l) } else { last };
    }
    if name == "model.embed_tokens.weight" {
        return pos == 0 || (last && (!model.mtp.is_empty() || model.lm_head.is_none()));
    }
    last // the final norm and the head
}

impl Holders {
    /// The placement of `model`'s parameters (call on the whole model, before dropping any).
    pub(crate) fn new(
        model: &mut DeepseekV3,
        dp: &dyn Comm,
        pipeline: Option<Pipeline>,
        expert_parallel: bool,
        zero1: bool,
    ) -> Holders {
        let (rank, world) = (dp.rank(), dp.size());
        let stages = pipeline.map_or(1, |p| p.stages);
        let replicas = world / stages;
        let experts = model.config.n_routed_experts;
        let shapes = model.param_shapes();
        let split = pipeline.map(|p| stage_split(model, dsv3_dist::pipeline::positions(p.kind, p.stages)));
        let mut entries: Vec<Entry> = shapes
            .into_iter()
            .map(|(name, shape)| {
                let groups: Vec<usize> = match routed_expert(&name) {
                    Some(e) if expert_parallel => vec![expert_owner(e, experts, replicas)],
                    _ => (0..replicas).collect(),
                };
                let in_stage: Vec<usize> = match (pipeline, &split) {
                    (Some(p), Some(split)) => (0..stages)
                        .filter(|&s| positions_of(p, s).iter().any(|&pos| uses(model, &name, pos, split)))
                        .collect(),
                    _ => vec![0],
                };
                let mut holders: Vec<usize> =
                    groups.iter().flat_map(|g| in_stage.iter().map(move |s| g * stages + s)).collect();
                holders.sort_unstable();
                Entry { name, shape, holders, updater: None }
            })
            .collect();
        let mut sets: Vec<(Vec<usize>, Vec<usize>)> = vec![];
        for (i, e) in entries.iter().enumerate() {
            match sets.iter_mut().find(|(h, _)| *h == e.holders) {
                Some((_, list)) => list.push(i),
                None => sets.push((e.holders.clone(), vec![i])),
            }
        }
        sets.sort_by(|a, b| a.0.cmp(&b.0));
        if zero1 {
            // Within each holder set: largest first to the least-loaded holder (whole tensors, so
            // an update needs nothing from another process).
            for (holders, list) in &sets {
                let mut order = list.clone();
                order.sort_by(|&a, &b| {
                    entries[b].len().cmp(&entries[a].len()).then_with(|| entries[a].name.cmp(&entries[b].name))
                });
                let mut load = vec![0usize; holders.len()];
                for i in order {
                    let h = (0..holders.len()).min_by_key(|&h| load[h]).expect("a holder");
                    load[h] += entries[i].len();
                    entries[i].updater = Some(holders[h]);
                }
            }
        }
        let index = entries.iter().enumerate().map(|(i, e)| (e.name.clone(), i)).collect();
        Holders { rank, world, entries, index, sets }
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }

    pub(crate) fn holds(&self, name: &str) -> bool {
        self.entry(name).is_some_and(|e| e.holders.contains(&self.rank))
    }

    /// Whether this process updates `name` and keeps its optimizer moments.
    pub(crate) fn updates(&self, name: &str) -> bool {
        self.entry(name).is_some_and(|e| e.holders.contains(&self.rank) && e.updater.is_none_or(|u| u == self.rank))
    }

    /// Frees what this process does not hold and the moments it does not keep.
    pub(crate) fn drop_foreign(&self, model: &mut DeepseekV3, opt: &mut Optimizer) {
        model.drop_params(|n| self.holds(n));
        opt.m.retain(|k, _| self.updates(k));
        opt.v.retain(|k, _| self.updates(k));
    }

    /// Parameters (held, total) and the values this process updates.
    pub(crate) fn sizes(&self) -> (usize, usize, usize) {
        let held = self.entries.iter().filter(|e| e.holders.contains(&self.rank));
        let total = self.entries.iter().map(Entry::len).sum();
        let updated = held.clone().filter(|e| e.updater.is_none_or(|u| u == self.rank)).map(Entry::len).sum();
        (held.map(Entry::len).sum(), total, updated)
    }

    /// Element-wise sum of `v` over the processes `set` (ascending, this one among them).
    fn sum_among(&self, dp: &dyn Comm, set: &[usize], v: &mut [f64]) {
        if set.len() == self.world {
            return dp.all_reduce_sum(v);
        }
        if set.len() < 2 {
            return;
        }
        // The lowest rank adds the others' in rank order and sends the sum back.
        const TAG: u64 = 1;
        dp.with_peers(&mut |peers: &mut dyn P2p| {
            if self.rank == set[0] {
                for &r in &set[1..] {
                    let other = peers.recv(r, TAG, v.len());
                    v.iter_mut().zip(other).for_each(|(a, b)| *a += b);
                }
                for &r in &set[1..] {
                    peers.send(r, TAG, v.to_vec());
                }
            } else {
                peers.send(set[0], TAG, v.to_vec());
                let sum = peers.recv(set[0], TAG, v.len());
                v.copy_from_slice(&sum);
            }
        });
    }

    /// Sums every gradient over the processes holding its parameter and multiplies by `scale`;
    /// returns this process's share of the squared global norm (each parameter counted at its
    /// first holder).
    pub(crate) fn reduce_grads(&self, dp: &dyn Comm, grads: &mut Grads, scale: f64) -> f64 {
        let mut norm_sq = 0f64;
        for (set, list) in self.sets.iter().filter(|(h, _)| h.contains(&self.rank)) {
            let mut flat: Vec<f64> = vec![];
            for &i in list {
                let e = &self.entries[i];
                flat.extend(grads.slot(&e.name, e.len()).iter().map(|&v| v as f64));
            }
            self.sum_among(dp, set, &mut flat);
            let mut at = 0;
            for &i in list {
                let e = &self.entries[i];
                for v in grads.slot(&e.name, e.len()) {
                    *v = (flat[at] * scale) as f32;
                    if set[0] == self.rank {
                        norm_sq += *v as f64 * *v as f64;
                    }
                    at += 1;
                }
            }
        }
        norm_sq
    }

    /// ZeRO-1, after the update: each parameter from its updater to the other holders (a sum to
    /// which only the updater contributes: exact).
    pub(crate) fn share_params(&self, dp: &dyn Comm, model: &mut DeepseekV3) {
        let mut params: HashMap<String, &mut [f32]> =
            model.params_mut().into_iter().map(|p| (p.name, p.data)).collect();
        for (set, list) in self
            .sets
            .iter()
            .filter(|(h, l)| h.len() > 1 && h.contains(&self.rank) && self.entries[l[0]].updater.is_some())
        {
            let mut flat: Vec<f64> = vec![];
            for &i in list {
                let e = &self.entries[i];
                let mine = e.updater == Some(self.rank);
                flat.extend(params[&e.name].iter().map(|&v| if mine { v as f64 } else { 0.0 }));
            }
            self.sum_among(dp, set, &mut flat);
            let mut at = 0;
            for &i in list {
                for v in params.get_mut(&self.entries[i].name).expect("a held parameter").iter_mut() {
                    *v = flat[at] as f32;
                    at += 1;
                }
            }
        }
    }

    /// Before rank 0 writes a checkpoint: every parameter it does not hold, and the moments of
    /// those it does not update (`adam`), come from a process that has them (a sum to which only
    /// that process contributes). Every process calls it; [`Holders::drop_foreign`] undoes it
    /// on rank 0 after the save.
    pub(crate) fn gather_to_rank0(&self, dp: &dyn Comm, model: &mut DeepseekV3, opt: &mut Optimizer, adam: bool) {
        let mut install = vec![];
        {
            let params: HashMap<String, &mut [f32]> =
                model.params_mut().into_iter().map(|p| (p.name, p.data)).collect();
            for e in &self.entries {
                let n = e.len();
                if !e.holders.contains(&0) {
                    let mut buf = vec![0f64; n];
                    if self.rank == e.holders[0] {
                        buf.iter_mut().zip(params[&e.name].iter()).for_each(|(b, &v)| *b = v as f64);
                    }
                    dp.all_reduce_sum(&mut buf);
                    if self.rank == 0 {
                        install.push((e.name.clone(), e.shape.clone(), buf.into_iter().map(|v| v as f32).collect()));
                    }
                }
                let updater = e.updater.unwrap_or(e.holders[0]);
                let rank0_has = e.holders.contains(&0) && e.updater.is_none_or(|u| u == 0);
                if adam && !rank0_has {
                    let mut buf = vec![0f64; 2 * n];
                    if self.rank == updater {
                        if let (Some(m), Some(v)) = (opt.m.get(&e.name), opt.v.get(&e.name)) {
                            buf.iter_mut().zip(m.iter().chain(v)).for_each(|(b, &x)| *b = x as f64);
                        }
                    }
                    dp.all_reduce_sum(&mut buf);
                    if self.rank == 0 {
                        opt.m.insert(e.name.clone(), buf[..n].iter().map(|&x| x as f32).collect());
                        opt.v.insert(e.name.clone(), buf[n..].iter().map(|&x| x as f32).collect());
                    }
                }
            }
        }
        let unknown = model.set_params(install);
        debug_assert!(unknown.is_empty(), "{unknown:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv3_dist::schedule::Kind;
    use dsv3_model::init::{preset, write_training_init};

    /// Only a process's place in the world: placement never communicates.
    struct At(usize, usize);

    impl Comm for At {
        fn rank(&self) -> usize {
            self.0
        }
        fn size(&self) -> usize {
            self.1
        }
        fn all_to_all(&self, _: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
            unreachable!("placement does not communicate")
        }
        fn all_reduce_sum(&self, _: &mut [f64]) {
            unreachable!("placement does not communicate")
        }
        fn with_peers(&self, _: &mut dyn FnMut(&mut dyn P2p)) {
            unreachable!("placement does not communicate")
        }
    }

    /// Two DualPipe pipelines of two processes (ranks 0,1 and 2,3), experts split between the
    /// pipelines, ZeRO-1: who holds and updates what.
    #[test]
    fn holders_follow_stages_replicas_and_experts() {
        let mut model = crate::testing::tiny_model("placement", 1);
        let p = Pipeline { kind: Kind::DualPipe, chunks: 4, stages: 2 };
        let mut at = |rank| Holders::new(&mut model, &At(rank, 4), Some(p), true, true);
        let pl = at(1);
        let holders = |name: &str| pl.entry(name).unwrap().holders.clone();
        // DualPipe(2): rank 0 runs positions 0 and 1, rank 1 positions 1 and 0: both hold all.
        assert_eq!(holders("model.layers.0.input_layernorm.weight"), [0, 1, 2, 3]);
        assert_eq!(holders("lm_head.weight"), [0, 1, 2, 3]);
        // Expert 3 of 16 belongs to pipeline 0, expert 12 to pipeline 1.
        assert_eq!(holders("model.layers.1.mlp.experts.3.up_proj.weight"), [0, 1]);
        assert_eq!(holders("model.layers.1.mlp.experts.12.up_proj.weight"), [2, 3]);
        // ZeRO-1: exactly one holder updates each parameter, and every process agrees on which.
        let all: Vec<Holders> = (0..4).map(at).collect();
        for e in &pl.entries {
            let updaters: Vec<usize> = (0..4).filter(|&r| all[r].updates(&e.name)).collect();
            assert_eq!(updaters.len(), 1, "{}: {updaters:?}", e.name);
            assert!(e.holders.contains(&updaters[0]));
        }
        // 1F1B over 4 ranks: each rank holds its layer; the embedding sits at both ends (the MTP
        // module embeds its input tokens), the head at the last.
        let p = Pipeline { kind: Kind::OneFOneB, chunks: 4, stages: 4 };
        let pl = Holders::new(&mut model, &At(0, 4), Some(p), false, false);
        let holders = |name: &str| pl.entry(name).unwrap().holders.clone();
        assert_eq!(holders("model.embed_tokens.weight"), [0, 3]);
        assert_eq!(holders("model.layers.2.self_attn.o_proj.weight"), [2]);
        assert_eq!(holders("model.layers.4.eh_proj.weight"), [3]);
        assert_eq!(holders("model.norm.weight"), [3]);
        assert!(pl.updates("model.layers.0.mlp.gate_proj.weight") && !pl.updates("lm_head.weight"));
    }

    /// The tiny model's head and MTP module cost more than two of its layers, so two positions
    /// split its four layers 3 + 1; with as many positions as layers each gets one.
    #[test]
    fn stages_balance_the_head_and_mtp_against_layers() {
        let dir = std::env::temp_dir().join(format!("dsv3-split-{}", std::process::id()));
        write_training_init(&dir, &preset("tiny").unwrap(), 1, None).unwrap();
        let model = DeepseekV3::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(stage_split(&model, 2), [0..3, 3..4]);
        assert_eq!(stage_split(&model, 4), [0..1, 1..2, 2..3, 3..4]);
        assert_eq!(stage_split(&model, 1), vec![Range { start: 0, end: 4 }]);
    }
}
