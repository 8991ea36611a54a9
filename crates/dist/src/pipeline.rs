//! A pipeline executor for the schedules of [`crate::schedule`], over point-to-point messages
//! ([`P2p`]; MPI in [`crate::transport`]), on the stage model DualPipe's own examples use
//! (`Linear(h,4h) → GELU → Linear(4h,h)` per stage, MSE loss at the last stage, f64). Each rank
//! runs its op list: `F` receives its input from the previous stage (or takes the micro-batch),
//! runs the stage and sends the output on (or computes the loss); `B` receives the output
//! gradient, sends the input gradient back and computes the weight gradients — or, for `b`,
//! queues them for a later `W`; `(F|B)` runs both in one slot, at the same time on two threads
//! (DualPipe's overlap: one's communication — the expert all-to-alls inside a stage — hides
//! behind the other's computation). Losses and gradients can then be compared with the
//! sequential run of the same micro-batches ([`reference`]).

use crate::schedule::{Kind, Op};
use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{channel, Receiver, Sender};

/// Point-to-point messages between ranks: non-blocking sends, blocking receives by tag.
pub trait P2p {
    fn rank(&self) -> usize;
    fn send(&mut self, to: usize, tag: u64, data: Vec<f64>);
    fn recv(&mut self, from: usize, tag: u64, len: usize) -> Vec<f64>;
    /// Waits for every send posted so far.
    fn flush(&mut self);
}

/// The model a pipeline runs, as stage positions along each micro-batch's path (the executor
/// knows which rank and direction hold a position; the model knows what a position computes).
/// Activations and gradients travel as f64 (f32 models convert exactly).
pub trait StageCompute: Sync {
    type Saved: Send;
    type Deferred: Send;
    /// Forward of position `pos` for batch micro-batch `bi`; `input` is `None` at position 0.
    /// Returns the output (empty at the last position) and, at the last position, the loss.
    fn forward(&self, pos: usize, bi: usize, input: Option<Vec<f64>>) -> (Vec<f64>, Option<f64>, Self::Saved);
    /// Backward from the output gradient (`None` at the last position, where the loss starts
    /// it): returns the input gradient (empty at position 0) and the weight-gradient work, run
    /// now or by a later `W`.
    fn backward(&self, pos: usize, bi: usize, saved: Self::Saved, dy: Option<Vec<f64>>) -> (Vec<f64>, Self::Deferred);
    fn weight(&self, pos: usize, work: Self::Deferred);
    /// Whether a forward and a backward may run at the same time (each on its own thread; any
    /// communication inside them on separate channels). Otherwise `(F|B)` runs F, then B.
    fn overlap(&self) -> bool {
        true
    }
}

/// One stage: `y = W2·gelu(W1·x)`, rows of `h`.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    pub h: usize,
    /// `[4h, h]`
    pub w1: Vec<f64>,
    /// `[h, 4h]`
    pub w2: Vec<f64>,
}

fn gelu(z: f64) -> (f64, f64) {
    // tanh approximation and its derivative.
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let u = c * (z + 0.044715 * z * z * z);
    let t = u.tanh();
    let du = c * (1.0 + 3.0 * 0.044715 * z * z);
    (0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du)
}

/// `[m, n]` products `Σ_s A(i, s)·B(s, j)` summed in index order, with `A(i, s) = a[i·ai + s·as]`
/// and `B(s, j) = b[s·bs + j·bj]` (so one loop serves x·Wᵀ, x·W and xᵀ·y).
#[allow(clippy::too_many_arguments)]
fn mm(
    a: &[f64],
    (ai, as_): (usize, usize),
    b: &[f64],
    (bs, bj): (usize, usize),
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|s| a[i * ai + s * as_] * b[s * bs + j * bj]).sum();
        }
    }
    out
}

/// What a stage's backward needs from its forward.
#[derive(Clone, Debug)]
pub struct Saved {
    x: Vec<f64>,
    z: Vec<f64>,
    a: Vec<f64>,
    /// At the last stage: the loss gradient, for the backward.
    loss_grad: Option<Vec<f64>>,
}

/// The deferred weight-gradient work of a `b`.
#[derive(Clone, Debug)]
pub struct WeightGrad {
    x: Vec<f64>,
    a: Vec<f64>,
    dy: Vec<f64>,
    dz: Vec<f64>,
}

impl Stage {
    /// A deterministic stage (the same on every rank).
    pub fn new(h: usize, seed: u64) -> Self {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) / (h as f64).sqrt()
        };
        Stage { h, w1: (0..4 * h * h).map(|_| next()).collect(), w2: (0..4 * h * h).map(|_| next()).collect() }
    }

    pub fn forward(&self, x: &[f64]) -> (Vec<f64>, Saved) {
        let (h, m) = (self.h, x.len() / self.h);
        let z = mm(x, (h, 1), &self.w1, (1, h), m, 4 * h, h);
        let a: Vec<f64> = z.iter().map(|&v| gelu(v).0).collect();
        let y = mm(&a, (4 * h, 1), &self.w2, (1, 4 * h), m, h, 4 * h);
        (y, Saved { x: x.to_vec(), z, a, loss_grad: None })
    }

    /// Input gradient, and the inputs of the weight gradients.
    fn backward_input(&self, s: &Saved, dy: &[f64]) -> (Vec<f64>, WeightGrad) {
        let (h, m) = (self.h, dy.len() / self.h);
        let da = mm(dy, (h, 1), &self.w2, (4 * h, 1), m, 4 * h, h);
        let dz: Vec<f64> = da.iter().zip(&s.z).map(|(&g, &z)| g * gelu(z).1).collect();
        let dx = mm(&dz, (4 * h, 1), &self.w1, (h, 1), m, h, 4 * h);
        (dx, WeightGrad { x: s.x.clone(), a: s.a.clone(), dy: dy.to_vec(), dz })
    }
}

/// Gradients of one stage's weights.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Grads {
    pub w1: Vec<f64>,
    pub w2: Vec<f64>,
}

impl Grads {
    fn add(&mut self, st: &Stage, w: &WeightGrad) {
        let (h, m) = (st.h, w.dy.len() / st.h);
        let g2 = mm(&w.dy, (1, h), &w.a, (4 * h, 1), h, 4 * h, m);
        let g1 = mm(&w.dz, (1, 4 * h), &w.x, (h, 1), 4 * h, h, m);
        if self.w1.is_empty() {
            (self.w1, self.w2) = (vec![0.0; g1.len()], vec![0.0; g2.len()]);
        }
        self.w1.iter_mut().zip(&g1).for_each(|(a, b)| *a += b);
        self.w2.iter_mut().zip(&g2).for_each(|(a, b)| *a += b);
    }
}

/// MSE loss `mean((y − label)²)` and its gradient.
fn mse(y: &[f64], label: &[f64]) -> (f64, Vec<f64>) {
    let n = y.len() as f64;
    let loss = y.iter().zip(label).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / n;
    (loss, y.iter().zip(label).map(|(a, b)| 2.0 * (a - b) / n).collect())
}

/// The batch: micro-batch `i`'s input and label, `[rows, h]` each.
pub struct Batch {
    pub inputs: Vec<Vec<f64>>,
    pub labels: Vec<Vec<f64>>,
}

impl Batch {
    /// A fixed batch of `chunks` micro-batches for the checks (the same on every process).
    pub fn synthetic(chunks: usize, rows: usize, h: usize) -> Self {
        let v = |i: usize, j: usize| ((i * 131 + j * 17) % 97) as f64 / 97.0 - 0.5;
        Batch {
            inputs: (0..chunks).map(|c| (0..rows * h).map(|j| v(c, j)).collect()).collect(),
            labels: (0..chunks).map(|c| (0..rows * h).map(|j| v(c + 1000, j)).collect()).collect(),
        }
    }
}

/// The sequential reference: every micro-batch through all stages, loss, backward. Returns the
/// losses and each stage's gradients.
pub fn reference(stages: &[Stage], batch: &Batch) -> (Vec<f64>, Vec<Grads>) {
    let mut grads = vec![Grads::default(); stages.len()];
    let mut losses = vec![];
    for (x, label) in batch.inputs.iter().zip(&batch.labels) {
        let mut saved = vec![];
        let mut h = x.clone();
        for st in stages {
            let (y, s) = st.forward(&h);
            saved.push(s);
            h = y;
        }
        let (loss, mut dy) = mse(&h, label);
        losses.push(loss);
        for (i, st) in stages.iter().enumerate().rev() {
            let (dx, w) = st.backward_input(&saved[i], &dy);
            grads[i].add(st, &w);
            dy = dx;
        }
    }
    (losses, grads)
}

/// A micro-batch's path: `(rank, direction)` of each stage position, and the micro-batch's
/// index in the batch.
struct StagePath {
    kind: Kind,
    ranks: usize,
    chunks: usize,
}

impl StagePath {
    /// (flow, position) of the op `(rank, dir)`, and the number of positions of the flow.
    fn position(&self, rank: usize, dir: u8) -> (usize, usize, usize) {
        crate::schedule::stage_position(self.kind, self.ranks, rank, dir)
    }

    /// `(rank, dir)` at `pos` of `flow`.
    fn at(&self, flow: usize, pos: usize) -> (usize, u8) {
        let n = self.ranks;
        match self.kind {
            Kind::OneFOneB => (pos, 0),
            Kind::DualPipe => {
                if flow == 0 {
                    (pos, 0)
                } else {
                    (n - 1 - pos, 1)
                }
            }
            Kind::DualPipeV => {
                if pos < n {
                    (pos, 0)
                } else {
                    (2 * n - 1 - pos, 1)
                }
            }
        }
    }

    /// The batch index of micro-batch `mb` of `flow` (DualPipe: direction 0 takes the first half).
    fn batch_index(&self, flow: usize, mb: usize) -> usize {
        match self.kind {
            Kind::DualPipe => flow * (self.chunks / 2) + mb,
            _ => mb,
        }
    }
}

/// A message tag below 2³¹ (MPI's guaranteed range with OpenMPI): activation or gradient, flow,
/// micro-batch (< 2¹⁹), stage position (< 2¹⁰).
fn tag(kind: u64, flow: usize, mb: usize, pos: usize) -> u64 {
    assert!(mb < 1 << 19 && pos < 1 << 10, "pipeline: too many micro-batches or stages for a message tag");
    (kind << 30) | ((flow as u64) << 29) | ((mb as u64) << 10) | pos as u64
}

/// Stage positions along a micro-batch's path: `ranks` for 1F1B and DualPipe, `2·ranks` for
/// DualPipeV.
pub fn positions(kind: Kind, ranks: usize) -> usize {
    StagePath { kind, ranks, chunks: 0 }.position(0, 0).2
}

/// The losses this rank computed: `(batch index, loss)`.
pub type Losses = Vec<(usize, f64)>;

/// One rank's state while it runs its ops.
struct Exec<'a, M: StageCompute> {
    me: usize,
    pl: StagePath,
    model: &'a M,
    saved: HashMap<(usize, usize, usize), M::Saved>,
    /// Same-rank handoffs (DualPipeV's turn at the last rank).
    local: HashMap<u64, Vec<f64>>,
    w_queue: VecDeque<(usize, M::Deferred)>,
    losses: Losses,
}

impl<M: StageCompute> Exec<'_, M> {
    fn take(&mut self, p2p: &mut dyn P2p, from: usize, t: u64) -> Vec<f64> {
        if from == self.me {
            self.local.remove(&t).expect("a local handoff precedes its use")
        } else {
            p2p.recv(from, t, 0)
        }
    }

    fn give(&mut self, p2p: &mut dyn P2p, to: usize, t: u64, data: Vec<f64>) {
        if to == self.me {
            self.local.insert(t, data);
        } else {
            p2p.send(to, t, data);
        }
    }

    /// A forward's input, received (or the micro-batch at position 0).
    fn forward_input(&mut self, p2p: &mut dyn P2p, dir: u8, mb: usize) -> ForwardCall {
        let (flow, pos, len) = self.pl.position(self.me, dir);
        let input = (pos > 0).then(|| self.take(p2p, self.pl.at(flow, pos - 1).0, tag(0, flow, mb, pos)));
        ForwardCall { flow, pos, len, mb, bi: self.pl.batch_index(flow, mb), input }
    }

    /// A forward's output, kept and sent on.
    fn forward_output(&mut self, p2p: &mut dyn P2p, c: &ForwardCall, (y, loss, s): (Vec<f64>, Option<f64>, M::Saved)) {
        self.saved.insert((c.flow, c.mb, c.pos), s);
        if let Some(l) = loss {
            self.losses.push((c.bi, l));
        }
        if c.pos + 1 < c.len {
            self.give(p2p, self.pl.at(c.flow, c.pos + 1).0, tag(0, c.flow, c.mb, c.pos + 1), y);
        }
    }

    fn forward(&mut self, p2p: &mut dyn P2p, dir: u8, mb: usize) {
        let mut c = self.forward_input(p2p, dir, mb);
        let out = self.model.forward(c.pos, c.bi, c.input.take());
        self.forward_output(p2p, &c, out);
    }

    /// A backward's output gradient, received, and its forward's saved state.
    fn backward_input(&mut self, p2p: &mut dyn P2p, dir: u8, mb: usize) -> (BackwardCall, M::Saved) {
        let (flow, pos, len) = self.pl.position(self.me, dir);
        let dy = (pos + 1 < len).then(|| self.take(p2p, self.pl.at(flow, pos + 1).0, tag(1, flow, mb, pos)));
        let s = self.saved.remove(&(flow, mb, pos)).expect("the forward of this micro-batch");
        (BackwardCall { flow, pos, mb, bi: self.pl.batch_index(flow, mb), dy }, s)
    }

    /// A backward's input gradient, sent back; its weight gradients now or queued for `W`.
    fn backward_output(&mut self, p2p: &mut dyn P2p, c: &BackwardCall, (dx, work): (Vec<f64>, M::Deferred), zb: bool) {
        if c.pos > 0 {
            self.give(p2p, self.pl.at(c.flow, c.pos - 1).0, tag(1, c.flow, c.mb, c.pos - 1), dx);
        }
        if zb {
            self.w_queue.push_back((c.pos, work));
        } else {
            self.model.weight(c.pos, work);
        }
    }

    fn backward(&mut self, p2p: &mut dyn P2p, dir: u8, mb: usize, zb: bool) {
        let (mut c, s) = self.backward_input(p2p, dir, mb);
        let out = self.model.backward(c.pos, c.bi, s, c.dy.take());
        self.backward_output(p2p, &c, out, zb);
    }

    /// `(F|B)`: both inputs received, the forward on a second thread while the backward runs
    /// here, then both outputs sent. The two touch disjoint state (the forward its saved
    /// activations and losses, the backward its gradients), so the results equal F then B.
    fn forward_backward(&mut self, p2p: &mut dyn P2p, (fdir, fmb): (u8, usize), (bdir, bmb): (u8, usize)) {
        if !self.model.overlap() {
            self.forward(p2p, fdir, fmb);
            return self.backward(p2p, bdir, bmb, false);
        }
        let mut f = self.forward_input(p2p, fdir, fmb);
        let (mut b, s) = self.backward_input(p2p, bdir, bmb);
        let model = self.model;
        let (f_out, b_out) = std::thread::scope(|scope| {
            let input = f.input.take();
            let forward = scope.spawn(move || model.forward(f.pos, f.bi, input));
            let b_out = model.backward(b.pos, b.bi, s, b.dy.take());
            (forward.join().unwrap_or_else(|e| std::panic::resume_unwind(e)), b_out)
        });
        self.forward_output(p2p, &f, f_out);
        self.backward_output(p2p, &b, b_out, false);
    }
}

struct ForwardCall {
    flow: usize,
    pos: usize,
    len: usize,
    mb: usize,
    bi: usize,
    input: Option<Vec<f64>>,
}

struct BackwardCall {
    flow: usize,
    pos: usize,
    mb: usize,
    bi: usize,
    dy: Option<Vec<f64>>,
}

/// Runs `ops` (this rank's list of a `kind` schedule over `ranks` ranks and `chunks`
/// micro-batches) on `model`; gradients stay in the model. Returns the losses computed here.
pub fn execute<M: StageCompute>(
    p2p: &mut dyn P2p,
    kind: Kind,
    ranks: usize,
    chunks: usize,
    ops: &[Op],
    model: &M,
) -> Losses {
    let mut ex = Exec {
        me: p2p.rank(),
        pl: StagePath { kind, ranks, chunks },
        model,
        saved: HashMap::new(),
        local: HashMap::new(),
        w_queue: VecDeque::new(),
        losses: vec![],
    };
    for op in ops {
        match *op {
            Op::F { dir, mb } => ex.forward(p2p, dir, mb),
            Op::B { dir, mb, zb } => ex.backward(p2p, dir, mb, zb),
            Op::W { .. } => {
                let (pos, work) = ex.w_queue.pop_front().expect("a deferred weight gradient");
                model.weight(pos, work);
            }
            Op::FB { f, b } => ex.forward_backward(p2p, f, b),
        }
    }
    p2p.flush();
    ex.losses
}

/// DualPipe's example model as a [`StageCompute`]: MLP stages, MSE loss on the batch's labels,
/// gradients per stage position.
pub struct MlpPipeline<'a> {
    pub stages: &'a [Stage],
    pub batch: &'a Batch,
    pub grads: std::sync::Mutex<HashMap<usize, Grads>>,
}

impl StageCompute for MlpPipeline<'_> {
    type Saved = Saved;
    type Deferred = WeightGrad;

    fn forward(&self, pos: usize, bi: usize, input: Option<Vec<f64>>) -> (Vec<f64>, Option<f64>, Saved) {
        let x = input.unwrap_or_else(|| self.batch.inputs[bi].clone());
        let (y, s) = self.stages[pos].forward(&x);
        if pos + 1 == self.stages.len() {
            let (loss, dy) = mse(&y, &self.batch.labels[bi]);
            // The loss gradient rides in the saved state to the backward of this position.
            return (vec![], Some(loss), Saved { loss_grad: Some(dy), ..s });
        }
        (y, None, s)
    }

    fn backward(&self, pos: usize, _bi: usize, mut saved: Saved, dy: Option<Vec<f64>>) -> (Vec<f64>, WeightGrad) {
        let dy = dy.or_else(|| saved.loss_grad.take()).expect("an output gradient or the loss");
        let (dx, w) = self.stages[pos].backward_input(&saved, &dy);
        (if pos > 0 { dx } else { vec![] }, w)
    }

    fn weight(&self, pos: usize, work: WeightGrad) {
        self.grads.lock().expect("gradients").entry(pos).or_default().add(&self.stages[pos], &work);
    }
}

/// What a rank's part of a pipelined step of [`MlpPipeline`] produced.
#[derive(Debug, Default)]
pub struct RankResult {
    /// `(batch index, loss)` of the micro-batches whose loss this rank computed.
    pub losses: Losses,
    /// `(stage index, gradients)` of the stage copies this rank holds.
    pub grads: Vec<(usize, Grads)>,
}

/// [`execute`] on DualPipe's example model.
pub fn run(
    p2p: &mut dyn P2p,
    kind: Kind,
    ranks: usize,
    chunks: usize,
    ops: &[Op],
    stages: &[Stage],
    batch: &Batch,
) -> RankResult {
    let model = MlpPipeline { stages, batch, grads: Default::default() };
    let losses = execute(p2p, kind, ranks, chunks, ops, &model);
    let mut grads: Vec<(usize, Grads)> = model.grads.into_inner().expect("gradients").into_iter().collect();
    grads.sort_by_key(|(s, _)| *s);
    RankResult { losses, grads }
}

/// One pipeline among several: ranks `base..base + P` of `inner` seen as `0..P` (pipelines that
/// train data-parallel side by side).
pub struct Group<'a> {
    pub inner: &'a mut dyn P2p,
    pub base: usize,
}

impl P2p for Group<'_> {
    fn rank(&self) -> usize {
        self.inner.rank() - self.base
    }
    fn send(&mut self, to: usize, tag: u64, data: Vec<f64>) {
        self.inner.send(self.base + to, tag, data)
    }
    fn recv(&mut self, from: usize, tag: u64, len: usize) -> Vec<f64> {
        self.inner.recv(self.base + from, tag, len)
    }
    fn flush(&mut self) {
        self.inner.flush()
    }
}

/// Ranks as threads with channels: the executor without MPI (tests, one-machine pipelines).
pub struct ThreadPeers {
    rank: usize,
    tx: Vec<Sender<(usize, u64, Vec<f64>)>>,
    rx: Receiver<(usize, u64, Vec<f64>)>,
    early: Vec<(usize, u64, Vec<f64>)>,
}

impl ThreadPeers {
    /// One endpoint per rank.
    pub fn group(ranks: usize) -> Vec<ThreadPeers> {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..ranks).map(|_| channel()).unzip();
        rxs.into_iter().enumerate().map(|(rank, rx)| ThreadPeers { rank, tx: txs.clone(), rx, early: vec![] }).collect()
    }
}

impl P2p for ThreadPeers {
    fn rank(&self) -> usize {
        self.rank
    }
    fn send(&mut self, to: usize, tag: u64, data: Vec<f64>) {
        self.tx[to].send((self.rank, tag, data)).expect("peer alive");
    }
    fn recv(&mut self, from: usize, tag: u64, _len: usize) -> Vec<f64> {
        if let Some(i) = self.early.iter().position(|(f, t, _)| *f == from && *t == tag) {
            return self.early.remove(i).2;
        }
        loop {
            let (f, t, d) = self.rx.recv().expect("peer alive");
            if f == from && t == tag {
                return d;
            }
            self.early.push((f, t, d));
        }
    }
    fn flush(&mut self) {}
}

/// `1 − 2Σxy / Σ(x² + y²)`: 0 for equal vectors (DualPipe's gradient check).
pub fn calc_diff(x: &[f64], y: &[f64]) -> f64 {
    let xy: f64 = x.iter().zip(y).map(|(a, b)| a * b).sum();
    let sq: f64 = x.iter().zip(y).map(|(a, b)| a * a + b * b).sum();
    if sq == 0.0 {
        0.0
    } else {
        1.0 - 2.0 * xy / sq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::generate;

    #[test]
    fn every_schedule_reproduces_sequential_training() {
        let h = 8;
        for (kind, ranks, chunks) in [
            (Kind::OneFOneB, 4, 6),
            (Kind::DualPipe, 4, 8),
            (Kind::DualPipe, 2, 6),
            (Kind::DualPipeV, 2, 4),
            (Kind::DualPipeV, 3, 7),
        ] {
            let n_stages = if kind == Kind::DualPipeV { 2 * ranks } else { ranks };
            let stages: Vec<Stage> = (0..n_stages).map(|s| Stage::new(h, s as u64)).collect();
            let b = Batch::synthetic(chunks, 3, h);
            let (ref_losses, ref_grads) = reference(&stages, &b);
            let schedule = generate(kind, ranks, chunks).unwrap();
            let results: Vec<RankResult> = std::thread::scope(|s| {
                let handles: Vec<_> = ThreadPeers::group(ranks)
                    .into_iter()
                    .enumerate()
                    .map(|(r, mut peers)| {
                        let (ops, stages, b) = (&schedule[r], &stages, &b);
                        s.spawn(move || run(&mut peers, kind, ranks, chunks, ops, stages, b))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let mut losses: Vec<(usize, f64)> = results.iter().flat_map(|r| r.losses.clone()).collect();
            losses.sort_by_key(|l| l.0);
            assert_eq!(losses.iter().map(|l| l.1).collect::<Vec<_>>(), ref_losses, "{kind:?}: losses bit for bit");
            let mut sum = vec![Grads::default(); n_stages];
            for (s, g) in results.iter().flat_map(|r| r.grads.iter()) {
                if sum[*s].w1.is_empty() {
                    sum[*s] = g.clone();
                } else {
                    sum[*s].w1.iter_mut().zip(&g.w1).for_each(|(a, b)| *a += b);
                    sum[*s].w2.iter_mut().zip(&g.w2).for_each(|(a, b)| *a += b);
                }
            }
            for (s, (g, r)) in sum.iter().zip(&ref_grads).enumerate() {
                let d = calc_diff(&g.w1, &r.w1).max(calc_diff(&g.w2, &r.w2));
                assert!(d < 1e-13, "{kind:?} stage {s}: gradient diff {d}");
            }
        }
    }
}
