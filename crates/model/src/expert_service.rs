//! Expert-parallel inference in rounds, so that processes need not run the same layer at the same
//! time: each process serves its own requests (data-parallel attention) or none (an idle process
//! still serves its experts to the others).
//!
//! Every process runs a service thread taking part in a stream of rounds over an
//! [`Comm`]. In a round each process contributes the MoE layer call its model is
//! waiting on, if any:
//! 1. an all-to-all sends every process a header — done?, the call's MoE layer and its routing
//!    `experts [t, k]` — and, to each process placed one of a token's experts, that token's row
//!    once (DeepEP's normal mode);
//! 2. each process runs the pairs placed on it, for every caller with the caller's layer;
//! 3. an all-to-all returns each pair's output row, in pair order; the caller sums them as one
//!    process does ([`crate::experts::Local`]: ascending expert ids, then the shared expert), so
//!    outputs are bit-identical.
//!
//! Every process sees every header in rank order and observes them into its [`PlacementPolicy`] after
//! the round, so all processes agree on the placement without exchanging it. Rounds go on until
//! every process is done. A process with nothing to send waits between polls of the transfer
//! ([`Comm::all_to_all_waiting`]) instead of spinning on cores the model needs.

use crate::exec::Exec;
use crate::experts::{DispatchGrads, Dispatched, ExpertCall, ExpertDispatch, ExpertTape};
use crate::grad::{add_into, Grads};
use crate::moe::Moe;
use crate::DeepseekV3;
use dsv3_dist::comm::Comm;
use dsv3_dist::eplb::LiveBalancer;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Where each (token, expert) pair of a MoE layer runs; every process must hold the same one.
pub trait PlacementPolicy: Send {
    /// The process that runs `token`'s pair with expert `e` in MoE layer `moe`.
    fn rank_of(&self, moe: usize, e: usize, token: usize) -> usize;
    /// Records one call's routing `experts [t, k]` (every process, every call, in round order).
    fn observe(&mut self, moe: usize, experts: &[usize], k: usize);
}

/// A MoE layer call waiting for its routed experts.
struct Call {
    moe: usize,
    x: Vec<f32>, // [t, D]
    d: usize,
    experts: Vec<usize>, // [t, k]
    k: usize,
}

#[derive(Default)]
struct State {
    call: Option<Call>,
    result: Option<Vec<f32>>,
    /// This process will make no more calls.
    done: bool,
    /// The service thread has ended.
    stopped: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The model's side: hands each MoE layer call to the service thread.
struct Rounds {
    shared: Arc<Shared>,
    one_call: Mutex<()>,
}

impl Rounds {
    /// Each (token, slot) pair's routed-expert output `[t·k, D]`, in pair order, with `during`
    /// run while they are computed.
    fn pair_outputs(&self, call: &ExpertCall, during: &mut dyn FnMut()) -> crate::Result<Vec<f32>> {
        let _one = self.one_call.lock().unwrap_or_else(|e| e.into_inner());
        let (d, k) = (call.width(), call.routing.k);
        let experts = call.routing.experts.clone();
        self.shared.lock().call = Some(Call { moe: call.layer, x: call.x.to_vec(), d, experts, k });
        self.shared.changed.notify_all();
        during();
        let mut s = self.shared.lock();
        loop {
            if let Some(r) = s.result.take() {
                return Ok(r);
            }
            if s.stopped {
                return Err(crate::ModelError::Input("the expert service stopped during a call".into()));
            }
            s = self.shared.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl ExpertDispatch for Rounds {
    fn forward(&self, cx: &Exec, call: ExpertCall, record: bool) -> crate::Result<Dispatched> {
        if record {
            return Err(crate::ModelError::Input("expert-parallel inference does not train".into()));
        }
        let (t, d, k) = (call.tokens(), call.width(), call.routing.k);
        // The shared expert runs while the routed pairs travel.
        let mut shared = None;
        let all = self.pair_outputs(&call, &mut || {
            shared = call.moe.shared_experts.as_ref().map(|s| s.forward(cx, call.x, t, None));
        })?;
        // Each token's experts in ascending id, then the shared expert: the local order.
        let mut out = vec![0f32; t * d];
        for i in 0..t {
            let mut js: Vec<usize> = (i * k..(i + 1) * k).collect();
            js.sort_by_key(|&j| call.routing.experts[j]);
            for j in js {
                let w = call.routing.weights[j];
                out[i * d..(i + 1) * d].iter_mut().zip(&all[j * d..(j + 1) * d]).for_each(|(o, y)| *o += w * y);
            }
        }
        if let Some(y) = &shared {
            add_into(&mut out, y);
        }
        Ok(Dispatched { out, tape: None })
    }

    fn backward(
        &self,
        _: &Exec,
        _: ExpertCall,
        _: &str,
        _: &ExpertTape,
        _: &[f32],
        _: &mut Grads,
    ) -> crate::Result<DispatchGrads> {
        Err(crate::ModelError::Input("expert-parallel inference does not train".into()))
    }
}

/// The outputs of the pairs `pairs` (indices into `experts [t, k]`) of tokens `x [t, D]`, in
/// `pairs` order: each expert runs once over its pairs' tokens.
fn pair_rows(cx: &Exec, moe: &Moe, x: &[f32], d: usize, experts: &[usize], k: usize, pairs: &[usize]) -> Vec<f32> {
    let mut rows: Vec<Vec<usize>> = vec![vec![]; moe.experts.len()];
    let mut which: Vec<Vec<usize>> = vec![vec![]; moe.experts.len()];
    for (i, &j) in pairs.iter().enumerate() {
        rows[experts[j]].push(j / k);
        which[experts[j]].push(i);
    }
    let (runs, _) = moe.run_experts(cx, x, d, rows, None, false);
    let mut out = vec![0f32; pairs.len() * d];
    for r in &runs {
        for (&i, y) in which[r.expert].iter().zip(r.y.chunks_exact(d)) {
            out[i * d..(i + 1) * d].copy_from_slice(y);
        }
    }
    out
}

/// The running service thread of one process.
pub struct ExpertService {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ExpertService {
    /// Routes `model`'s experts through rounds over `ex` and starts the service thread, which
    /// keeps the model alive until every process is [`finish`](ExpertService::finish)ed.
    pub fn start(
        mut model: DeepseekV3,
        ex: Arc<dyn Comm>,
        mut placement: Box<dyn PlacementPolicy>,
    ) -> (Arc<DeepseekV3>, ExpertService) {
        let shared = Arc::new(Shared::default());
        model.set_experts(Arc::new(Rounds { shared: shared.clone(), one_call: Mutex::new(()) }));
        let model = Arc::new(model);
        let (m, s) = (model.clone(), shared.clone());
        let thread = std::thread::spawn(move || {
            // Marks the end, so a waiting caller fails instead of hanging. A panic here is a bug;
            // the other processes would wait for this one's rounds forever, so the process ends
            // (and `mpirun` ends the job).
            struct Stopped(Arc<Shared>);
            impl Drop for Stopped {
                fn drop(&mut self) {
                    if std::thread::panicking() {
                        eprintln!(
                            "error: the expert service failed; ending this process so the others do not wait for it"
                        );
                        std::process::abort();
                    }
                    self.0.lock().stopped = true;
                    self.0.changed.notify_all();
                }
            }
            let _stopped = Stopped(s.clone());
            serve(&m, ex.as_ref(), placement.as_mut(), &s);
        });
        (model, ExpertService { shared, thread: Some(thread) })
    }

    /// This process makes no more calls: serves the others' until all are done, then returns.
    pub fn finish(mut self) {
        self.shared.lock().done = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Header fields, each an f32 carrying a u32's bits: flags, MoE layer, D, k, t; then `experts`.
const HEADER: usize = 5;
const DONE: u32 = 1;
const CALLING: u32 = 2;

fn word(v: usize) -> f32 {
    f32::from_bits(u32::try_from(v).expect("a header field over 2^32"))
}

fn unword(v: f32) -> usize {
    v.to_bits() as usize
}

/// One process's call as seen by the others.
struct Header<'a> {
    moe: usize,
    d: usize,
    k: usize,
    experts: Vec<usize>,
    rows: &'a [f32],
}

fn parse(block: &[f32]) -> (bool, Option<Header<'_>>) {
    let flags = unword(block[0]) as u32;
    if flags & CALLING == 0 {
        return (flags & DONE != 0, None);
    }
    let (moe, d, k, t) = (unword(block[1]), unword(block[2]), unword(block[3]), unword(block[4]));
    let experts = block[HEADER..HEADER + t * k].iter().map(|&v| unword(v)).collect();
    (false, Some(Header { moe, d, k, experts, rows: &block[HEADER + t * k..] }))
}

/// How long a process without a call sleeps between polls of a round, after `quiet` rounds in a
/// row without any call: none at first (yield), then short, then idle-server long.
fn poll_pause(quiet: usize, polls: usize) -> Option<Duration> {
    match (quiet, polls) {
        (q, _) if q > 2000 => Some(Duration::from_millis(1)),
        (_, p) if p < 200 => None,
        _ => Some(Duration::from_micros(50)),
    }
}

fn serve(model: &DeepseekV3, ex: &dyn Comm, placement: &mut dyn PlacementPolicy, shared: &Shared) {
    let (me, ranks) = (ex.rank(), ex.size());
    // Its own threads: the model's forward waits for this service on a thread of the global
    // pool, which may have no other.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .build()
        .expect("the expert service's threads");
    let moes = model.moe_layers();
    // The pairs placed here run as this process's own would (its numerics; the dispatcher is
    // not used by an expert's own computation).
    let cx = model.with_scale_fmt(Exec::inference(model.inference, &crate::experts::LOCAL));
    let mut quiet = 0usize;
    loop {
        let (call, done) = {
            let mut s = shared.lock();
            if s.call.is_none() && !s.done && quiet > 2000 {
                // An idle server: a call here wakes the round at once; the others join within
                // their pause.
                s = shared.changed.wait_timeout(s, Duration::from_millis(1)).unwrap_or_else(|e| e.into_inner()).0;
            }
            (s.call.take(), s.done)
        };
        // 1. Headers everywhere, each token's row to the processes placed one of its pairs.
        let mut send: Vec<Vec<f32>> = vec![vec![]; ranks];
        let mut dest = vec![];
        match &call {
            None => send.iter_mut().for_each(|b| b.push(word(if done { DONE as usize } else { 0 }))),
            Some(c) => {
                let t = c.experts.len() / c.k.max(1);
                dest =
                    (0..c.experts.len()).map(|j| placement.rank_of(c.moe, c.experts[j], j / c.k)).collect::<Vec<_>>();
                for (r, b) in send.iter_mut().enumerate() {
                    b.extend([word(CALLING as usize), word(c.moe), word(c.d), word(c.k), word(t)]);
                    b.extend(c.experts.iter().map(|&e| word(e)));
                    for i in (0..t).filter(|&i| dest[i * c.k..(i + 1) * c.k].contains(&r)) {
                        b.extend_from_slice(&c.x[i * c.d..(i + 1) * c.d]);
                    }
                }
            }
        }
        let mut polls = 0;
        let recv = ex.all_to_all_waiting(send, &mut || {
            polls += 1;
            match poll_pause(if call.is_some() { 0 } else { quiet }, polls) {
                Some(p) => std::thread::sleep(p),
                None => std::thread::yield_now(),
            }
        });
        let parsed: Vec<(bool, Option<Header>)> = recv.iter().map(|b| parse(b)).collect();
        if parsed.iter().all(|(_, h)| h.is_none()) {
            if parsed.iter().all(|&(done, _)| done) {
                return;
            }
            quiet += 1;
            continue;
        }
        quiet = 0;
        // 2. The pairs placed here, for each caller.
        let outputs: Vec<Vec<f32>> = parsed
            .iter()
            .map(|(_, h)| match h {
                None => vec![],
                Some(h) => {
                    let t = h.experts.len() / h.k.max(1);
                    let here: Vec<bool> =
                        (0..t * h.k).map(|j| placement.rank_of(h.moe, h.experts[j], j / h.k) == me).collect();
                    let tokens: Vec<usize> = (0..t).filter(|&i| here[i * h.k..(i + 1) * h.k].contains(&true)).collect();
                    // The received tokens' rows and routing, with this process's pairs among them.
                    let experts: Vec<usize> =
                        tokens.iter().flat_map(|&i| h.experts[i * h.k..(i + 1) * h.k].iter().copied()).collect();
                    let (here, k) = (&here, h.k);
                    let pairs: Vec<usize> = tokens
                        .iter()
                        .enumerate()
                        .flat_map(|(n, &i)| (0..k).filter(move |&s| here[i * k + s]).map(move |s| n * k + s))
                        .collect();
                    pool.install(|| pair_rows(&cx, moes[h.moe], h.rows, h.d, &experts, h.k, &pairs))
                }
            })
            .collect();
        for h in parsed.iter().filter_map(|(_, h)| h.as_ref()) {
            placement.observe(h.moe, &h.experts, h.k);
        }
        // 3. Each pair's row back to its caller, in pair order.
        let back = ex.all_to_all_waiting(outputs, &mut || std::thread::yield_now());
        if let Some(c) = call {
            let mut out = vec![0f32; c.experts.len() * c.d];
            let mut next = vec![0usize; ranks];
            for (j, &r) in dest.iter().enumerate() {
                out[j * c.d..(j + 1) * c.d].copy_from_slice(&back[r][next[r] * c.d..(next[r] + 1) * c.d]);
                next[r] += 1;
            }
            shared.lock().result = Some(out);
            shared.changed.notify_all();
        }
    }
}

/// How expert-parallel inference places the routed experts (`--redundant-experts`,
/// `--rebalance-every`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Placing {
    /// Extra expert replicas (EPLB's redundant experts) per MoE layer.
    pub redundant: usize,
    /// Re-place with EPLB every this many calls per layer from the routing counts (0: static).
    pub rebalance_every: usize,
}

/// Per MoE layer EPLB placement, identical on every process (each observes every call).
struct Eplb {
    layers: Vec<LiveBalancer>,
    /// Tokens × MoE layers called, over all processes.
    token_layers: u64,
}

/// The service's view of the placement, shared with [`ExpertParallel::imbalance`].
struct Live(Arc<Mutex<Eplb>>);

impl PlacementPolicy for Live {
    fn rank_of(&self, moe: usize, e: usize, token: usize) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).layers[moe].rank_of(e, token)
    }
    fn observe(&mut self, moe: usize, experts: &[usize], k: usize) {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        p.layers[moe].observe(experts, k);
        p.token_layers += (experts.len() / k.max(1)) as u64;
    }
}

/// Expert-parallel inference on one process of `comm`: its model (routed experts computed by
/// whichever process the placement gives them) and its expert service.
pub struct ExpertParallel {
    service: ExpertService,
    placement: Arc<Mutex<Eplb>>,
    comm: Arc<dyn Comm>,
}

impl ExpertParallel {
    /// Loads the model folder `dir` on this process and starts its expert service. With the
    /// static placement each process loads only its own routed experts (`e·N/E`), so the
    /// experts' memory is split too; with EPLB any expert may be placed anywhere, so each loads
    /// them all. Every process of `comm` must call this: they agree that all loaded (an error on
    /// one is an error on all) before any serves.
    pub fn load(
        dir: &std::path::Path,
        comm: Arc<dyn Comm>,
        o: Placing,
        inference: crate::exec::Inference,
    ) -> crate::Result<(Arc<DeepseekV3>, ExpertParallel)> {
        use crate::grad::moe::{expert_owner, routed_expert};
        let (rank, ranks) = (comm.rank(), comm.size());
        let loaded = (|| {
            let mut model = if o.redundant == 0 && o.rebalance_every == 0 {
                let experts = DeepseekV3::config_at(dir)?.n_routed_experts;
                DeepseekV3::load_skipping(dir, move |name| {
                    routed_expert(name).is_some_and(|e| expert_owner(e, experts, ranks) != rank)
                })?
            } else {
                DeepseekV3::load(dir)?
            };
            model.inference = inference;
            let placement = Self::placement(&model, ranks, o)?;
            Ok::<_, crate::ModelError>((model, placement))
        })();
        // How many processes have their model: each says whether it has (a sum over all).
        let mut ready = [loaded.is_ok() as u8 as f64];
        comm.all_reduce_sum(&mut ready);
        let (model, placement) = loaded?;
        if (ready[0] as usize) < ranks {
            return Err(crate::ModelError::Input(format!(
                "--expert-parallel: {} of {ranks} processes could not load the model (their errors say why)",
                ranks - ready[0] as usize
            )));
        }
        let placement = Arc::new(Mutex::new(placement));
        let (model, service) = ExpertService::start(model, comm.clone(), Box::new(Live(placement.clone())));
        Ok((model, ExpertParallel { service, placement, comm }))
    }

    fn placement(model: &DeepseekV3, ranks: usize, o: Placing) -> crate::Result<Eplb> {
        let experts = model.config.n_routed_experts;
        let layers = model.moe_layers().len();
        let bad = |msg: String| crate::ModelError::Input(format!("--expert-parallel: {msg}"));
        if layers == 0 || experts < ranks {
            return Err(bad(format!("{ranks} processes for {experts} routed experts in {layers} MoE layers")));
        }
        if o.redundant > experts * (ranks - 1) {
            return Err(bad(format!(
                "--redundant-experts {}: at most {} for {experts} experts on {ranks} processes (every expert on every process)",
                o.redundant,
                experts * (ranks - 1)
            )));
        }
        let slots = (experts + o.redundant).next_multiple_of(ranks);
        let b = LiveBalancer::new(experts, ranks, slots, o.rebalance_every).map_err(bad)?;
        Ok(Eplb { layers: vec![b; layers], token_layers: 0 })
    }

    /// Per-rank load imbalance (max/mean pairs per rank) of the last full window, averaged over
    /// the MoE layers: (placement in force, static placement). None before a window completes.
    pub fn imbalance(&self) -> Option<(f64, f64)> {
        Self::imbalance_of(&self.placement)
    }

    /// [`ExpertParallel::imbalance`] from a handle that outlives `self` (`/metrics`).
    pub fn imbalance_probe(&self) -> impl Fn() -> Option<(f64, f64)> + Send + Sync + 'static {
        let p = self.placement.clone();
        move || Self::imbalance_of(&p)
    }

    fn imbalance_of(p: &Mutex<Eplb>) -> Option<(f64, f64)> {
        let p = p.lock().ok()?;
        let v: Vec<(f64, f64)> = p.layers.iter().filter_map(|b| b.last_imbalance).collect();
        (!v.is_empty()).then(|| {
            let n = v.len() as f64;
            (v.iter().map(|x| x.0).sum::<f64>() / n, v.iter().map(|x| x.1).sum::<f64>() / n)
        })
    }

    /// This process makes no more calls: serves the others' until all are done. Returns the
    /// bytes this process sent to others and the MoE layer calls (× tokens) of all processes.
    pub fn finish(self) -> (u64, u64) {
        self.service.finish();
        let calls = self.placement.lock().map_or(0, |p| p.token_layers);
        (self.comm.bytes_sent(), calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{generate, GenerateOptions};
    use crate::init::{preset, write_random_checkpoint, StoreDtype};
    use dsv3_dist::comm::ThreadComm;

    /// Static placement with the experts of one process on another: pair (token, e) on
    /// `(e + token) % ranks`, so tokens split across processes too.
    struct Spread(usize);

    impl PlacementPolicy for Spread {
        fn rank_of(&self, _moe: usize, e: usize, token: usize) -> usize {
            (e + token) % self.0
        }
        fn observe(&mut self, _moe: usize, _experts: &[usize], _k: usize) {}
    }

    /// Three processes, each generating its own prompt at its own pace (one finishes early and
    /// serves the others' experts): every sequence equals one process's, token for token.
    #[test]
    fn data_parallel_attention_generates_as_one_process() {
        let dir = std::env::temp_dir().join(format!("dsv3-expert-service-{}", std::process::id()));
        write_random_checkpoint(&dir, &preset("tiny").unwrap(), StoreDtype::Fp8, 3).unwrap();
        let opts = |n| GenerateOptions {
            max_new_tokens: n,
            sampling: Default::default(),
            eos_token_ids: vec![],
            ignore_eos: true,
            mtp_speculative: 0,
        };
        let prompts: Vec<(Vec<u32>, usize)> =
            vec![(vec![5, 9, 13, 17], 12), (vec![2, 4], 3), (vec![7, 7, 7, 7, 7, 7, 7, 7, 1], 8)];
        let one = DeepseekV3::load(&dir).unwrap();
        let want: Vec<Vec<u32>> =
            prompts.iter().map(|(p, n)| generate(&one, p, &opts(*n), |_| {}).unwrap().0).collect();
        let got: Vec<Vec<u32>> = std::thread::scope(|s| {
            let handles: Vec<_> = ThreadComm::group(3)
                .into_iter()
                .zip(&prompts)
                .map(|(ex, (p, n))| {
                    let dir = &dir;
                    s.spawn(move || {
                        let (model, service) =
                            ExpertService::start(DeepseekV3::load(dir).unwrap(), Arc::new(ex), Box::new(Spread(3)));
                        let out = generate(&model, p, &opts(*n), |_| {}).unwrap().0;
                        service.finish();
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(got, want);
    }
}
