//! Where a MoE layer's routed experts run: the one dispatch interface that local execution,
//! expert-parallel inference ([`crate::expert_service`]) and expert-parallel training
//! ([`crate::grad::exchange`]) implement. The model calls it and does not know which it has.
//!
//! A dispatcher returns the layer's FFN output: each token's routed experts' outputs weighted by
//! their gates and summed, plus the shared expert's, which it runs alongside (in the same kernel
//! job here, or while rows travel to other processes). The backward, for training, returns the
//! input gradient of both and each (token, slot) pair's gate-weight gradient.

use crate::exec::Exec;
use crate::grad::layers::MlpSaved;
use crate::grad::{add_into, Grads};
use crate::layers::Mlp;
use crate::moe::{Moe, Routing};

/// One MoE layer call.
#[derive(Clone, Copy)]
pub struct ExpertCall<'a> {
    pub moe: &'a Moe,
    /// This layer's index among the model's MoE layers (main layers first, then MTP blocks).
    pub layer: usize,
    /// `[t, D]`
    pub x: &'a [f32],
    pub routing: &'a Routing,
}

impl ExpertCall<'_> {
    pub fn tokens(&self) -> usize {
        self.routing.experts.len() / self.routing.k.max(1)
    }

    pub fn width(&self) -> usize {
        self.x.len() / self.tokens().max(1)
    }
}

/// What a dispatcher's forward gives: the layer's output `[t, D]` (routed + shared), and for
/// training what its backward needs.
pub struct Dispatched {
    pub out: Vec<f32>,
    pub tape: Option<ExpertTape>,
}

/// What a dispatcher's backward gives: the input gradient of the experts (routed and shared)
/// `[t, D]`, and each pair's gate-weight gradient `[t·k]`.
pub struct DispatchGrads {
    pub dx: Vec<f32>,
    pub d_gate: Vec<f32>,
}

/// A dispatcher's saved forward.
pub enum ExpertTape {
    Local(LocalTape),
    Exchange(crate::grad::exchange::ExchangeTape),
}

pub trait ExpertDispatch: Send + Sync {
    /// The layer's FFN output for `call` (with `record`, keeping what the backward needs).
    fn forward(&self, cx: &Exec, call: ExpertCall, record: bool) -> crate::Result<Dispatched>;

    /// The backward of [`ExpertDispatch::forward`] for the output gradient `dy [t, D]`; the
    /// experts' parameter gradients go into `g` under `{name}.experts.{e}.*` and
    /// `{name}.shared_experts.*`.
    fn backward(
        &self,
        cx: &Exec,
        call: ExpertCall,
        name: &str,
        tape: &ExpertTape,
        dy: &[f32],
        g: &mut Grads,
    ) -> crate::Result<DispatchGrads>;
}

/// Every expert in this process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Local;

pub static LOCAL: Local = Local;

/// One routed expert's share of a call: the rows of the input it ran on (in order), its outputs
/// and, for training, its saved forward.
pub struct ExpertRun {
    pub expert: usize,
    pub rows: Vec<usize>,
    /// `[rows, D]`
    pub y: Vec<f32>,
    pub saved: Option<MlpSaved>,
}

/// The shared expert's output and, for training, its saved forward.
pub type SharedRun = (Vec<f32>, Option<MlpSaved>);

/// The local dispatcher's saved forward: each expert's run and the shared expert's.
pub struct LocalTape {
    runs: Vec<ExpertRun>,
    shared: Option<MlpSaved>,
}

impl Moe {
    /// Runs each routed expert once over the rows assigned to it (`rows[e]`: indices into
    /// `x [., D]`), and the shared expert over `shared_x [m, D]` when given, all as one kernel job
    /// (gate and up of every expert, then down of every expert). Runs come in ascending expert
    /// order.
    pub fn run_experts(
        &self,
        cx: &Exec,
        x: &[f32],
        d: usize,
        rows: Vec<Vec<usize>>,
        shared_x: Option<(&[f32], usize)>,
        record: bool,
    ) -> (Vec<ExpertRun>, Option<SharedRun>) {
        let active: Vec<(usize, Vec<usize>)> = rows.into_iter().enumerate().filter(|(_, r)| !r.is_empty()).collect();
        let inputs: Vec<Vec<f32>> = active
            .iter()
            .map(|(_, rs)| rs.iter().flat_map(|&r| x[r * d..(r + 1) * d].iter().copied()).collect())
            .collect();
        let mut calls: Vec<(&Mlp, &[f32], usize)> =
            active.iter().zip(&inputs).map(|((e, rs), xe)| (&self.experts[*e], xe.as_slice(), rs.len())).collect();
        let shared = self.shared_experts.as_ref().zip(shared_x);
        if let Some((s, (xs, m))) = shared {
            calls.push((s, xs, m));
        }
        let mut saved = record.then(Vec::new);
        // Served adapters: each expert's rows keep the adapter of the token they came from (the
        // rows are this process's tokens; expert parallelism serves no adapter).
        let gathered: Vec<Vec<u16>> = match cx.adapters {
            Some(a) => active.iter().map(|(_, rs)| rs.iter().map(|&r| a[r]).collect()).collect(),
            None => vec![],
        };
        let mut rows: Vec<Option<&[u16]>> = gathered.iter().map(|g| Some(g.as_slice())).collect();
        rows.resize(active.len(), None);
        if shared.is_some() {
            rows.push(cx.adapters);
        }
        let mut ys = Mlp::forward_many_rows(cx, &calls, &rows, saved.as_mut());
        let mut saved = saved.map(|v| v.into_iter().map(Some).collect::<Vec<_>>()).unwrap_or_default();
        let shared_out = shared.map(|_| {
            let s = if record { saved.pop().flatten() } else { None };
            (ys.pop().unwrap_or_default(), s)
        });
        saved.resize_with(active.len(), || None);
        let runs = active
            .into_iter()
            .zip(ys)
            .zip(saved)
            .map(|(((expert, rows), y), saved)| ExpertRun { expert, rows, y, saved })
            .collect();
        (runs, shared_out)
    }

    /// The backward of [`Moe::run_experts`]' routed part: `dy[i]` is run `i`'s output gradient;
    /// returns each run's input gradient.
    pub fn run_experts_backward(
        &self,
        cx: &Exec,
        name: &str,
        runs: &[ExpertRun],
        dy: &[Vec<f32>],
        g: &mut Grads,
    ) -> Vec<Vec<f32>> {
        runs.iter()
            .zip(dy)
            .map(|(r, dy)| {
                let saved = r.saved.as_ref().expect("a recorded forward");
                self.experts[r.expert].backward(cx, &format!("{name}.experts.{}", r.expert), saved, dy, g)
            })
            .collect()
    }
}

/// Each token's rows per expert: `rows[e]` lists the tokens routed to `e`, ascending.
pub fn rows_per_expert(routing: &Routing, experts: usize) -> Vec<Vec<usize>> {
    let mut rows = vec![vec![]; experts];
    for (j, &e) in routing.experts.iter().enumerate() {
        rows[e].push(j / routing.k);
    }
    rows
}

/// The gate weight of `token`'s slot with expert `e`.
fn gate_weight(routing: &Routing, token: usize, e: usize) -> f32 {
    let k = routing.k;
    let slot = routing.experts[token * k..(token + 1) * k].iter().position(|&x| x == e).expect("routed");
    routing.weights[token * k + slot]
}

impl ExpertDispatch for Local {
    fn forward(&self, cx: &Exec, call: ExpertCall, record: bool) -> crate::Result<Dispatched> {
        let (t, d) = (call.tokens(), call.width());
        let rows = rows_per_expert(call.routing, call.moe.experts.len());
        let (runs, shared) = call.moe.run_experts(cx, call.x, d, rows, Some((call.x, t)), record);
        // Experts in ascending id, so each token's sum runs in that order; the shared expert last.
        let mut out = vec![0f32; t * d];
        for r in &runs {
            for (&i, y) in r.rows.iter().zip(r.y.chunks_exact(d)) {
                let w = gate_weight(call.routing, i, r.expert);
                out[i * d..(i + 1) * d].iter_mut().zip(y).for_each(|(o, y)| *o += w * y);
            }
        }
        let (shared_y, shared_saved) = shared.map_or((None, None), |(y, s)| (Some(y), s));
        if let Some(y) = &shared_y {
            add_into(&mut out, y);
        }
        let tape = record.then_some(ExpertTape::Local(LocalTape { runs, shared: shared_saved }));
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
        let ExpertTape::Local(tape) = tape else {
            return Err(crate::ModelError::Input("the local experts' backward got another dispatcher's tape".into()));
        };
        let (t, d, k) = (call.tokens(), call.width(), call.routing.k);
        let mut dx = match (&call.moe.shared_experts, &tape.shared) {
            (Some(m), Some(saved)) => m.backward(cx, &format!("{name}.shared_experts"), saved, dy, g),
            _ => vec![0f32; t * d],
        };
        // Per run: its rows' output gradients scaled by their gates; each pair's gate gradient.
        let mut d_gate = vec![0f32; t * k];
        let dys: Vec<Vec<f32>> = tape
            .runs
            .iter()
            .map(|r| {
                let mut dye = vec![0f32; r.rows.len() * d];
                for ((&i, y), dyr) in r.rows.iter().zip(r.y.chunks_exact(d)).zip(dye.chunks_exact_mut(d)) {
                    let dyi = &dy[i * d..(i + 1) * d];
                    let slot =
                        call.routing.experts[i * k..(i + 1) * k].iter().position(|&x| x == r.expert).expect("routed");
                    d_gate[i * k + slot] += dyi.iter().zip(y).map(|(a, b)| a * b).sum::<f32>();
                    let w = call.routing.weights[i * k + slot];
                    dyr.iter_mut().zip(dyi).for_each(|(o, g)| *o = w * g);
                }
                dye
            })
            .collect();
        let dxs = call.moe.run_experts_backward(cx, name, &tape.runs, &dys, g);
        // Each token's routed input gradient summed over its experts in ascending id, then added.
        let mut routed = vec![0f32; t * d];
        for (r, dxe) in tape.runs.iter().zip(&dxs) {
            for (&i, row) in r.rows.iter().zip(dxe.chunks_exact(d)) {
                add_into(&mut routed[i * d..(i + 1) * d], row);
            }
        }
        add_into(&mut dx, &routed);
        Ok(DispatchGrads { dx, d_gate })
    }
}
