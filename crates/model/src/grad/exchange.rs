//! Expert-parallel training (the report's EP, attention data-parallel): the dispatcher of a
//! process that holds the routed experts it owns ([`super::moe::expert_owner`]) and the rest of
//! the model whole. In every MoE layer each token goes once to every process holding one of its
//! experts with its k slots' expert ids there and gate weights (DeepEP's normal mode); the owner
//! runs its experts over what arrived (rows in source-rank order: the batch order of one
//! process) and returns per row the weighted sum of its experts' outputs (ascending ids, one
//! process's order), which the caller adds up. The backward sends the output gradient the same
//! way and gets back the input gradient summed over that rank's experts and each pair's
//! gate-weight gradient. Every process runs the same MoE layers in the same order.

use super::layers::MlpSaved;
use super::moe::expert_owner;
use super::{add_into, Grads};
use crate::exec::Exec;
use crate::experts::{DispatchGrads, Dispatched, ExpertCall, ExpertDispatch, ExpertRun, ExpertTape};
use dsv3_dist::comm::Comm;
use std::sync::Arc;

/// The dispatcher of expert-parallel training: the forward's exchange and the backward's (the
/// same, or two channels when a forward and a backward run at the same time, as DualPipe's
/// `(F|B)`).
#[derive(Clone)]
pub struct ExchangeExperts {
    pub forward: Arc<dyn Comm>,
    pub backward: Arc<dyn Comm>,
}

impl ExchangeExperts {
    pub fn new(ex: Arc<dyn Comm>) -> Self {
        ExchangeExperts { forward: ex.clone(), backward: ex }
    }

    /// Whether the backward has a channel of its own.
    pub fn apart(&self) -> bool {
        !Arc::ptr_eq(&self.forward, &self.backward)
    }
}

/// What the exchange's backward needs.
pub struct ExchangeTape {
    /// The tokens sent to each rank (once per rank, however many of its experts they chose).
    sent: Vec<Vec<usize>>,
    /// Rows received from each rank.
    received: Vec<usize>,
    /// The experts this process ran, for whichever process sent their rows, with each run row's
    /// (source rank, row, top-k slot) and gate weight.
    runs: Vec<ExpertRun>,
    origin: Vec<Vec<(usize, usize, usize)>>,
    weights: Vec<Vec<f32>>,
    shared: Option<MlpSaved>,
}

impl ExpertDispatch for ExchangeExperts {
    fn forward(&self, cx: &Exec, call: ExpertCall, record: bool) -> crate::Result<Dispatched> {
        let (moe, routing, x) = (call.moe, call.routing, call.x);
        let (n, d, k, e) = (call.tokens(), call.width(), routing.k, moe.experts.len());
        let ranks = self.forward.size();
        let owner = |ex: usize| expert_owner(ex, e, ranks);
        let mut sent: Vec<Vec<usize>> = vec![vec![]; ranks];
        for (i, dests) in dsv3_dist::dispatch::ranks_per_token(&routing.experts, k, e, ranks).into_iter().enumerate() {
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
        let mut shared: Option<(Vec<f32>, Option<MlpSaved>)> = None;
        let recv = self.forward.all_to_all_overlapped(send, &mut || {
            shared = moe.shared_experts.as_ref().map(|s| {
                let mut saved = None;
                let y = s.forward(cx, x, n, record.then_some(&mut saved));
                (y, saved)
            });
            false
        });
        let received: Vec<usize> = recv.iter().map(|b| b.len() / row).collect();
        // The received rows as one input, and each expert's rows in arrival order.
        let mut xs = Vec::with_capacity(received.iter().sum::<usize>() * d);
        let mut rows: Vec<Vec<usize>> = vec![vec![]; e];
        let mut origin: Vec<Vec<(usize, usize, usize)>> = vec![vec![]; e];
        for (src, buf) in recv.iter().enumerate() {
            for (r, rv) in buf.chunks_exact(row).enumerate() {
                let at = xs.len() / d.max(1);
                xs.extend_from_slice(&rv[2 * k..]);
                for (slot, &id) in rv[..k].iter().enumerate().filter(|(_, &id)| id >= 0.0) {
                    rows[id as usize].push(at);
                    origin[id as usize].push((src, r, slot));
                }
            }
        }
        let (runs, _) = moe.run_experts(cx, &xs, d, rows, None, record);
        let origin: Vec<Vec<(usize, usize, usize)>> =
            runs.iter().map(|r| std::mem::take(&mut origin[r.expert])).collect();
        let weights: Vec<Vec<f32>> =
            origin.iter().map(|o| o.iter().map(|&(s, r, slot)| recv[s][r * row + k + slot]).collect()).collect();
        let mut back: Vec<Vec<f32>> = received.iter().map(|&m| vec![0f32; m * d]).collect();
        for ((run, o), w) in runs.iter().zip(&origin).zip(&weights) {
            for ((y, &(s, r, _)), &w) in run.y.chunks_exact(d).zip(o).zip(w) {
                back[s][r * d..(r + 1) * d].iter_mut().zip(y).for_each(|(o, y)| *o += w * y);
            }
        }
        let outs = self.forward.all_to_all(back);
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
        let tape = record.then(|| {
            ExpertTape::Exchange(ExchangeTape { sent, received, runs, origin, weights, shared: shared.flatten() })
        });
        Ok(Dispatched { out, tape })
    }

    fn backward(
        &self,
        cx: &Exec,
        call: ExpertCall,
        name: &str,
        tape: &ExpertTape,
        dy: &[f32],
        g: &mut Grads,
    ) -> crate::Result<DispatchGrads> {
        let ExpertTape::Exchange(s) = tape else {
            return Err(crate::ModelError::Input(
                "the expert exchange's backward got another dispatcher's tape".into(),
            ));
        };
        let (n, d, k) = (call.tokens(), call.width(), call.routing.k);
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
        let recv = self.backward.all_to_all_overlapped(send, &mut || {
            dx = match (&call.moe.shared_experts, &s.shared) {
                (Some(m), Some(saved)) => m.backward(cx, &format!("{name}.shared_experts"), saved, dy, g),
                _ => vec![0f32; n * d],
            };
            false
        });
        // A returned row: [k gate-weight gradients (0 for slots held elsewhere), dx (D)].
        let row = k + d;
        let mut back: Vec<Vec<f32>> = s.received.iter().map(|&m| vec![0f32; m * row]).collect();
        let dys: Vec<Vec<f32>> = s
            .runs
            .iter()
            .zip(&s.origin)
            .zip(&s.weights)
            .map(|((run, o), w)| {
                let mut dye = vec![0f32; run.rows.len() * d];
                for (((y, dyr), &(src, r, slot)), &w) in
                    run.y.chunks_exact(d).zip(dye.chunks_exact_mut(d)).zip(o).zip(w)
                {
                    let dyi = &recv[src][r * d..(r + 1) * d];
                    back[src][r * row + slot] = dyi.iter().zip(y).map(|(a, b)| a * b).sum();
                    dyr.iter_mut().zip(dyi).for_each(|(o, g)| *o = w * g);
                }
                dye
            })
            .collect();
        let dxs = call.moe.run_experts_backward(cx, name, &s.runs, &dys, g);
        for (dxe, o) in dxs.iter().zip(&s.origin) {
            for (dxr, &(src, r, _)) in dxe.chunks_exact(d).zip(o) {
                add_into(&mut back[src][r * row + k..(r + 1) * row], dxr);
            }
        }
        let rets = self.backward.all_to_all(back);
        let mut d_gate = vec![0f32; n * k];
        for (toks, buf) in s.sent.iter().zip(&rets) {
            for (&i, rv) in toks.iter().zip(buf.chunks_exact(row)) {
                d_gate[i * k..(i + 1) * k].iter_mut().zip(&rv[..k]).for_each(|(a, b)| *a += b);
                add_into(&mut dx[i * d..(i + 1) * d], &rv[k..]);
            }
        }
        Ok(DispatchGrads { dx, d_gate })
    }
}
