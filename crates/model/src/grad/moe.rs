//! DeepSeekMoE for training: the router's gradient flows through the unbiased gate weights (the
//! correction bias only selects), through the experts' outputs, and through the balance losses.
//!
//! Balance losses (spec §4, parallel §5), both `α·Σ_i f_i·P_i` with `s'_t = s_t / Σ_j s_tj`:
//! - sequence-wise (the report's complementary loss): per sequence, `f_i = N/(K·T)·Σ_t 1[i ∈
//!   TopK(s_t)]` on the plain scores (no bias, no group limit, as Megatron), `P_i = mean_t s'_ti`,
//!   averaged over the sequences;
//! - batch-wise (the classic auxiliary loss, `--balance aux-loss`): the same over all the batch's
//!   tokens, with `f_i` counting the actual selections.
//!
//! Both depend on the forward only, so their score gradients are computed there and kept.

use super::layers::MlpSaved;
use super::{add_into, Grads};
use crate::config::ScoringFunc;
use crate::moe::{top_k_indices, Moe, Routing};
use dsv3_kernels::matmul::matmul_nt;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

/// Coefficients of the balance losses (0 disables one).
#[derive(Clone, Copy, Debug, Default)]
pub struct Balance {
    pub seq_alpha: f32,
    pub batch_alpha: f32,
}

/// Expert parallelism in training (the report's EP, attention data-parallel): each process holds
/// the routed experts it owns ([`expert_owner`]) and the rest of the model whole. In every MoE
/// layer the processes send each (token, slot) row to its expert's owner and get the outputs
/// back (forward), then the output gradients out and the input gradients back (backward); every
/// process therefore runs the same MoE layers in the same order.
pub trait ExpertExchange: Send + Sync {
    fn rank(&self) -> usize;
    fn ranks(&self) -> usize;
    /// `send[r]` goes to rank `r`; returns what each rank sent here, in rank order.
    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Vec<Vec<f32>>;
    /// The same with `work` run while the transfer is in flight (called until it returns false;
    /// the transport may progress between calls). Default: not overlapped.
    fn all_to_all_overlapped(&self, send: Vec<Vec<f32>>, work: &mut dyn FnMut() -> bool) -> Vec<Vec<f32>> {
        let r = self.all_to_all(send);
        while work() {}
        r
    }
    /// The same for a thread with nothing else to do: `idle` runs between checks of the transfer
    /// (to sleep rather than spin on a core others need). Default: the blocking all-to-all.
    fn all_to_all_waiting(&self, send: Vec<Vec<f32>>, idle: &mut dyn FnMut()) -> Vec<Vec<f32>> {
        let _ = idle;
        self.all_to_all(send)
    }
}

/// An all-to-all among the threads of one process (tests, or ranks emulated in one process):
/// one FIFO channel per (source, destination).
pub struct ThreadExchange {
    rank: usize,
    to: Vec<Sender<Vec<f32>>>,
    from: Mutex<Vec<Receiver<Vec<f32>>>>,
}

impl ThreadExchange {
    pub fn group(ranks: usize) -> Vec<ThreadExchange> {
        let mut to: Vec<Vec<Sender<Vec<f32>>>> = (0..ranks).map(|_| vec![]).collect();
        let mut from: Vec<Vec<Receiver<Vec<f32>>>> = (0..ranks).map(|_| vec![]).collect();
        for tx_list in to.iter_mut() {
            for rx_list in from.iter_mut() {
                let (tx, rx) = channel();
                tx_list.push(tx);
                rx_list.push(rx);
            }
        }
        to.into_iter()
            .zip(from)
            .enumerate()
            .map(|(rank, (to, from))| ThreadExchange { rank, to, from: Mutex::new(from) })
            .collect()
    }
}

impl ExpertExchange for ThreadExchange {
    fn rank(&self) -> usize {
        self.rank
    }
    fn ranks(&self) -> usize {
        self.to.len()
    }
    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        for (tx, buf) in self.to.iter().zip(send) {
            tx.send(buf).expect("peer alive");
        }
        self.from.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|rx| rx.recv().expect("peer alive")).collect()
    }
}

/// A MoE layer's exchanges in expert-parallel training: the forward's and the backward's
/// (the same one, or two channels when a forward and a backward run at the same time).
#[derive(Clone)]
pub struct Exchanges {
    pub forward: Arc<dyn ExpertExchange>,
    pub backward: Arc<dyn ExpertExchange>,
}

/// The routed expert a checkpoint tensor belongs to (`…mlp.experts.{e}.…`).
pub fn routed_expert(name: &str) -> Option<usize> {
    name.split(".mlp.experts.").nth(1)?.split('.').next()?.parse().ok()
}

/// The process holding routed expert `e` of `experts` over `ranks`: contiguous blocks, as DeepEP
/// and the static inference placement.
pub fn expert_owner(e: usize, experts: usize, ranks: usize) -> usize {
    e * ranks / experts
}

/// An expert this process ran: its id, each input's (source rank, row, top-k slot) and gate
/// weight, its saved forward and its outputs.
struct ExpertSaved {
    id: usize,
    rows: Vec<(usize, usize, usize)>,
    weights: Vec<f32>,
    saved: MlpSaved,
    out: Vec<f32>,
}

pub struct MoeSaved {
    x: Vec<f32>,
    n: usize,
    /// `[n, E]` router scores (sigmoid or softmax of the logits).
    scores: Vec<f32>,
    routing: Routing,
    /// The tokens sent to each rank (once per rank, however many of its experts they chose).
    sent: Vec<Vec<usize>>,
    /// Rows received from each rank.
    received: Vec<usize>,
    /// The experts this process ran, for whichever process sent their rows.
    experts: Vec<ExpertSaved>,
    shared: Option<MlpSaved>,
    /// `[n, E]` gradient of the balance losses with respect to the scores.
    d_scores_balance: Vec<f32>,
}

/// What a MoE layer reports per step.
#[derive(Clone, Debug, Default)]
pub struct MoeStats {
    /// Tokens routed to each expert (the actual selections: bias and group limit applied).
    pub load: Vec<usize>,
    /// The balance losses' value (already scaled by their α).
    pub balance_loss: f64,
}

impl Moe {
    /// `x [seqs·t, D]` → `[seqs·t, D]`.
    pub fn forward_train(&self, x: &[f32], seqs: usize, t: usize, bal: Balance) -> (Vec<f32>, MoeSaved, MoeStats) {
        let n = seqs * t;
        let d = x.len() / n.max(1);
        let e = self.experts.len();
        let r = &self.gate;
        let mut logits = vec![0f32; n * e];
        matmul_nt(&r.weight.view(), 0..e, x, n, &mut logits);
        let mut scores = logits;
        for row in scores.chunks_exact_mut(e) {
            match r.scoring {
                ScoringFunc::Sigmoid => row.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
                ScoringFunc::Softmax => dsv3_kernels::attention::softmax_in_place(row),
            }
        }
        let mut routing = Routing { experts: vec![], weights: vec![], k: r.top_k };
        for row in scores.chunks_exact(e) {
            let (idx, w) = r.select(row);
            routing.experts.extend(idx);
            routing.weights.extend(w);
        }
        let k = r.top_k;
        let mut load = vec![0usize; e];
        routing.experts.iter().for_each(|&i| load[i] += 1);

        let (balance_loss, d_scores_balance) = balance_losses(&scores, &load, seqs, t, k, bal);

        // Dispatch (DeepEP's normal mode): each token once to every rank holding one of its
        // experts, with its k slots' expert ids there (−1 elsewhere) and gate weights. The owner
        // runs its experts over what arrived (rows in source-rank order: the batch order of one
        // process) and returns per row the weighted sum of its experts' outputs (ascending ids,
        // one process's order), which the combine adds up.
        let ranks = self.ep_train.as_ref().map_or(1, |x| x.forward.ranks());
        let owner = |ex: usize| expert_owner(ex, e, ranks);
        let mut sent: Vec<Vec<usize>> = vec![vec![]; ranks];
        for i in 0..n {
            let mut dests: Vec<usize> = routing.experts[i * k..(i + 1) * k].iter().map(|&ex| owner(ex)).collect();
            dests.sort_unstable();
            dests.dedup();
            dests.into_iter().for_each(|r| sent[r].push(i));
        }
        // A dispatched row: [k expert ids (−1: held elsewhere), k gate weights, x (D)].
        let row = 2 * k + d;
        let send = sent
            .iter()
            .enumerate()
            .map(|(r, toks)| {
                toks.iter()
                    .flat_map(|&i| {
                        let slots = i * k..(i + 1) * k;
                        let ids = slots.clone().map(|j| {
                            if owner(routing.experts[j]) == r {
                                routing.experts[j] as f32
                            } else {
                                -1.0
                            }
                        });
                        ids.chain(slots.map(|j| routing.weights[j])).chain(x[i * d..(i + 1) * d].iter().copied())
                    })
                    .collect()
            })
            .collect();
        // The shared expert runs while the rows travel (as the report overlaps it with dispatch).
        let mut shared = None;
        let recv = self.exchange_overlapped(false, send, &mut || {
            shared = self.shared_experts.as_ref().map(|s| s.forward_train(x, n));
            false
        });
        let received: Vec<usize> = recv.iter().map(|b| b.len() / row).collect();
        let mut per: Vec<Vec<(usize, usize, usize)>> = vec![vec![]; e];
        for (src, buf) in recv.iter().enumerate() {
            for (r, rv) in buf.chunks_exact(row).enumerate() {
                for (slot, &id) in rv[..k].iter().enumerate().filter(|(_, &id)| id >= 0.0) {
                    per[id as usize].push((src, r, slot));
                }
            }
        }
        let mut back: Vec<Vec<f32>> = received.iter().map(|&m| vec![0f32; m * d]).collect();
        let mut experts = vec![];
        for (ex, rows) in per.into_iter().enumerate().filter(|(_, v)| !v.is_empty()) {
            let xe: Vec<f32> =
                rows.iter().flat_map(|&(s, r, _)| recv[s][r * row + 2 * k..(r + 1) * row].iter().copied()).collect();
            let weights: Vec<f32> = rows.iter().map(|&(s, r, slot)| recv[s][r * row + k + slot]).collect();
            let (ye, saved) = self.experts[ex].forward_train(&xe, rows.len());
            for ((y, &(s, r, _)), &w) in ye.chunks_exact(d).zip(&rows).zip(&weights) {
                back[s][r * d..(r + 1) * d].iter_mut().zip(y).for_each(|(o, y)| *o += w * y);
            }
            experts.push(ExpertSaved { id: ex, rows, weights, saved, out: ye });
        }
        let outs = self.exchange(false, back);
        let mut out = vec![0f32; n * d];
        for (toks, buf) in sent.iter().zip(&outs) {
            for (&i, y) in toks.iter().zip(buf.chunks_exact(d)) {
                add_into(&mut out[i * d..(i + 1) * d], y);
            }
        }
        let shared = shared.map(|(ys, saved)| {
            add_into(&mut out, &ys);
            saved
        });
        let saved = MoeSaved { x: x.to_vec(), n, scores, routing, sent, received, experts, shared, d_scores_balance };
        (out, saved, MoeStats { load, balance_loss })
    }

    /// Parameter gradients under `{name}.*` (`gate.weight`, `experts.{i}.*`, `shared_experts.*`);
    /// returns `dx`.
    pub fn backward(&self, name: &str, s: &MoeSaved, dy: &[f32], g: &mut Grads) -> Vec<f32> {
        let (n, e, k) = (s.n, self.experts.len(), s.routing.k);
        let d = dy.len() / n.max(1);
        let r = &self.gate;

        // The output gradients go where the tokens went; each rank returns per row its pairs'
        // gate-weight gradients (`dy·y`, in their slots) and the input gradient summed over its
        // experts.
        let send = s
            .sent
            .iter()
            .map(|toks| toks.iter().flat_map(|&i| dy[i * d..(i + 1) * d].iter().copied()).collect())
            .collect();
        // The shared expert's backward runs while the gradients travel.
        let mut dx = vec![];
        let recv = self.exchange_overlapped(true, send, &mut || {
            dx = match (&self.shared_experts, &s.shared) {
                (Some(m), Some(saved)) => m.backward(&format!("{name}.shared_experts"), saved, dy, g),
                _ => vec![0f32; n * d],
            };
            false
        });
        // A returned row: [k gate-weight gradients (0 for slots held elsewhere), dx (D)].
        let row = k + d;
        let mut back: Vec<Vec<f32>> = s.received.iter().map(|&m| vec![0f32; m * row]).collect();
        for ExpertSaved { id: ex, rows, weights, saved, out: ye } in &s.experts {
            let mut dye = vec![0f32; rows.len() * d];
            for (((y, dyr), &(src, r, slot)), &w) in
                ye.chunks_exact(d).zip(dye.chunks_exact_mut(d)).zip(rows).zip(weights)
            {
                let dyi = &recv[src][r * d..(r + 1) * d];
                back[src][r * row + slot] = dyi.iter().zip(y).map(|(a, b)| a * b).sum();
                dyr.iter_mut().zip(dyi).for_each(|(o, g)| *o = w * g);
            }
            let dxe = self.experts[*ex].backward(&format!("{name}.experts.{ex}"), saved, &dye, g);
            for (dxr, &(src, r, _)) in dxe.chunks_exact(d).zip(rows) {
                add_into(&mut back[src][r * row + k..(r + 1) * row], dxr);
            }
        }
        let rets = self.exchange(true, back);
        let mut d_w = vec![0f32; n * k];
        for (toks, buf) in s.sent.iter().zip(&rets) {
            for (&i, rv) in toks.iter().zip(buf.chunks_exact(row)) {
                d_w[i * k..(i + 1) * k].iter_mut().zip(&rv[..k]).for_each(|(a, b)| *a += b);
                add_into(&mut dx[i * d..(i + 1) * d], &rv[k..]);
            }
        }
        // Gate weights → scores: w_k = c·s_k / Z (Z = Σ_selected s when normalized, else 1).
        let mut d_scores = s.d_scores_balance.clone();
        for i in 0..n {
            let sel = &s.routing.experts[i * k..(i + 1) * k];
            let sc = &s.scores[i * e..(i + 1) * e];
            let dwi = &d_w[i * k..(i + 1) * k];
            let ds = &mut d_scores[i * e..(i + 1) * e];
            if r.norm_topk_prob {
                let z: f32 = sel.iter().map(|&j| sc[j]).sum::<f32>() + 1e-20;
                let dot: f32 = sel.iter().zip(dwi).map(|(&j, &dw)| dw * sc[j]).sum();
                for (&j, &dw) in sel.iter().zip(dwi) {
                    ds[j] += r.scale * (dw / z - dot / (z * z));
                }
            } else {
                for (&j, &dw) in sel.iter().zip(dwi) {
                    ds[j] += r.scale * dw;
                }
            }
        }
        // Scores → logits.
        let mut d_logits = d_scores;
        for (dl, sc) in d_logits.chunks_exact_mut(e).zip(s.scores.chunks_exact(e)) {
            match r.scoring {
                ScoringFunc::Sigmoid => dl.iter_mut().zip(sc).for_each(|(g, &p)| *g *= p * (1.0 - p)),
                ScoringFunc::Softmax => {
                    let dot: f32 = dl.iter().zip(sc).map(|(g, p)| g * p).sum();
                    dl.iter_mut().zip(sc).for_each(|(g, &p)| *g = p * (*g - dot));
                }
            }
        }
        g.weight_grad(format!("{name}.gate.weight"), &d_logits, &s.x, n, e, d, None);
        add_into(&mut dx, &super::input_grad(&r.weight, &d_logits, n));
        dx
    }
}

impl Moe {
    /// The all-to-all of expert parallelism (the forward's or the backward's); with one process
    /// what is sent arrives.
    fn exchange(&self, backward: bool, send: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        self.exchange_overlapped(backward, send, &mut || false)
    }

    fn exchange_overlapped(
        &self,
        backward: bool,
        send: Vec<Vec<f32>>,
        work: &mut dyn FnMut() -> bool,
    ) -> Vec<Vec<f32>> {
        match &self.ep_train {
            Some(x) => if backward { &x.backward } else { &x.forward }.all_to_all_overlapped(send, work),
            None => {
                while work() {}
                send
            }
        }
    }
}

/// Value and score gradient of the balance losses.
fn balance_losses(scores: &[f32], load: &[usize], seqs: usize, t: usize, k: usize, bal: Balance) -> (f64, Vec<f32>) {
    let n = seqs * t;
    let e = scores.len() / n.max(1);
    let mut grad = vec![0f32; scores.len()];
    let mut loss = 0f64;
    // Adds α·Σ_i f_i·P_i over `tokens` (P over normalized scores) to loss and grad, scaled by w.
    let mut add = |tokens: std::ops::Range<usize>, f: &[f32], alpha: f32, w: f32| {
        let tt = tokens.len() as f32;
        let mut p = vec![0f32; e];
        for i in tokens.clone() {
            let row = &scores[i * e..(i + 1) * e];
            let z: f32 = row.iter().sum::<f32>() + 1e-20;
            row.iter().zip(&mut p).for_each(|(s, p)| *p += s / z / tt);
            // d/ds'_j = α·f_j/T; through s' = s/Z: (g_j − Σ_i g_i·s'_i)/Z.
            let dot: f32 = row.iter().zip(f).map(|(s, f)| alpha * f / tt * s / z).sum();
            for (j, gr) in grad[i * e..(i + 1) * e].iter_mut().enumerate() {
                *gr += w * (alpha * f[j] / tt - dot) / z;
            }
        }
        loss += (w * alpha) as f64 * f.iter().zip(&p).map(|(f, p)| (f * p) as f64).sum::<f64>();
    };
    if bal.seq_alpha > 0.0 {
        for b in 0..seqs {
            let mut f = vec![0f32; e];
            for i in b * t..(b + 1) * t {
                for j in top_k_indices(&scores[i * e..(i + 1) * e], k) {
                    f[j] += e as f32 / (k as f32 * t as f32);
                }
            }
            add(b * t..(b + 1) * t, &f, bal.seq_alpha, 1.0 / seqs as f32);
        }
    }
    if bal.batch_alpha > 0.0 {
        let f: Vec<f32> = load.iter().map(|&c| c as f32 * e as f32 / (k as f32 * n as f32)).collect();
        add(0..n, &f, bal.batch_alpha, 1.0);
    }
    (loss, grad)
}
