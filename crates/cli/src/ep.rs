//! `--expert-parallel` (feature `mpi`): under `mpirun -np N` the routed experts are split over
//! the processes. Inference (generate, score, chat, bench, serve): every process loads the model
//! and runs an expert service ([`dsv3_model::expert_service`]): rounds of all-to-alls in which
//! each process sends each of its MoE layer calls' tokens to the processes placed their experts.
//! Rank 0 runs the command; the others serve experts — or, with `serve --data-parallel`, each
//! process serves its own requests on port `P + 1 + rank` (attention data-parallel), rank 0
//! relaying connections to `P` to them in turn. Placement starts
//! static (expert `e` on rank `e·N/E`) and, with `--rebalance-every B`, is redone every B calls
//! per layer by EPLB from the routing counts, with `--redundant-experts R` extra replicas whose
//! pairs are split by token. Every process observes every call, so all agree on the placement
//! without exchanging it. Expert outputs do not depend on where they run, so results equal one
//! process's bit for bit. Training: see [`training`].

use dsv3_dist::eplb::LiveBalancer;
use dsv3_dist::transport::MpiExchange;
use dsv3_model::expert_service::{ExpertService, Placement};
use dsv3_model::DeepseekV3;
use mpi::traits::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Options from the command line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Expert-parallel inference (not `dsv3 train`).
    pub inference: bool,
    /// Inference: every process runs the command on its own requests (`serve --data-parallel`).
    pub data_parallel: bool,
    pub redundant: usize,
    pub rebalance_every: usize,
}

struct Ep {
    /// Dropped by [`finish`] (MPI_Finalize) before the process exits.
    universe: Mutex<Option<mpi::environment::Universe>>,
    rank: usize,
    ranks: usize,
    exchange: Mutex<Option<MpiExchange>>,
    options: Options,
    /// MPI may be called from several threads at once.
    concurrent: bool,
    /// Inference: this process's expert service, and the placement it keeps.
    service: Mutex<Option<ExpertService>>,
    placements: Mutex<Option<Arc<Mutex<Placements>>>>,
    /// Inference: this process has told the others whether it loaded its model.
    reported: AtomicBool,
    /// `serve --data-parallel`: each process's host name (MPI's processor name).
    hosts: Mutex<Vec<String>>,
}

// SAFETY: MPI is initialized for serialized multi-threaded use, and every MPI call goes through
// a mutex-guarded communicator; the universe is only kept alive and dropped at the end.
unsafe impl Send for Ep {}
unsafe impl Sync for Ep {}

static EP: OnceLock<Ep> = OnceLock::new();

/// Per MoE layer placement, identical on every process.
struct Placements {
    layers: Vec<LiveBalancer>,
    /// Tokens × MoE layers called, over all processes.
    token_layers: u64,
}

impl Placements {
    fn new(layers: usize, experts: usize, ranks: usize, o: Options) -> anyhow::Result<Self> {
        if o.redundant > experts * (ranks - 1) {
            anyhow::bail!("--redundant-experts {}: at most {} for {experts} experts on {ranks} processes (every expert on every process)", o.redundant, experts * (ranks - 1));
        }
        let slots = (experts + o.redundant).next_multiple_of(ranks);
        let b = LiveBalancer::new(experts, ranks, slots, o.rebalance_every)
            .map_err(|e| anyhow::anyhow!("--expert-parallel: {e}"))?;
        Ok(Placements { layers: vec![b; layers], token_layers: 0 })
    }
}

/// The service's view of the placement, shared with `/metrics`.
struct Live(Arc<Mutex<Placements>>);

impl Placement for Live {
    fn rank_of(&self, moe: usize, e: usize, token: usize) -> usize {
        self.0.lock().expect("placement lock").layers[moe].rank_of(e, token)
    }
    fn observe(&mut self, moe: usize, experts: &[usize], k: usize) {
        let mut p = self.0.lock().expect("placement lock");
        p.layers[moe].observe(experts, k);
        p.token_layers += (experts.len() / k.max(1)) as u64;
    }
}

/// Initializes MPI; returns (rank, ranks).
pub fn init(options: Options) -> anyhow::Result<(usize, usize)> {
    // Multiple: DualPipe's (F|B) runs a forward and a backward on two threads, each with its own
    // expert exchange; with less, they run one after the other.
    let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Multiple)
        .ok_or_else(|| anyhow::anyhow!("MPI is already initialized"))?;
    if threading < mpi::Threading::Serialized {
        anyhow::bail!("--expert-parallel: this MPI does not support serialized multi-threaded calls");
    }
    let world = universe.world();
    let (rank, ranks) = (world.rank() as usize, world.size() as usize);
    let _ = EP.set(Ep {
        universe: Mutex::new(Some(universe)),
        rank,
        ranks,
        exchange: Mutex::new(Some(MpiExchange { comm: world })),
        options,
        concurrent: threading == mpi::Threading::Multiple,
        service: Mutex::new(None),
        placements: Mutex::new(None),
        reported: AtomicBool::new(false),
        hosts: Mutex::new(vec![]),
    });
    Ok((rank, ranks))
}

/// How many processes have their model: each says whether it has (a sum over all).
fn report(ex: &MpiExchange, loaded: bool) -> usize {
    let mut n = 0i32;
    ex.comm.all_reduce_into(&(loaded as i32), &mut n, mpi::collective::SystemOperation::sum());
    n as usize
}

/// Loads a model folder for expert-parallel inference and [`attach`]es it. With the static
/// placement (no `--redundant-experts`, no `--rebalance-every`) a process loads only its own
/// routed experts (`e·N/E`), so the experts' memory is split too; with EPLB any expert may be
/// placed anywhere, so each process loads them all.
pub fn load(dir: &std::path::Path) -> anyhow::Result<Arc<DeepseekV3>> {
    use anyhow::Context;
    use dsv3_model::grad::moe::{expert_owner, routed_expert};
    let ep = EP.get().ok_or_else(|| anyhow::anyhow!("--expert-parallel: MPI not initialized"))?;
    let model = if ep.options.redundant == 0 && ep.options.rebalance_every == 0 {
        let experts = dsv3_model::Config::from_file(&dir.join("config.json"))?.n_routed_experts;
        let (rank, ranks) = (ep.rank, ep.ranks);
        DeepseekV3::load_skipping(dir, move |name| {
            routed_expert(name).is_some_and(|e| expert_owner(e, experts, ranks) != rank)
        })
    } else {
        DeepseekV3::load(dir)
    };
    attach(model.with_context(|| format!("loading {}", dir.display()))?)
}

/// Splits the model's routed experts over the processes and starts this process's expert
/// service. Rank 0 (every rank with `serve --data-parallel`) goes on to run the command with the
/// model returned; the others serve experts until the command is done everywhere, then exit.
fn attach(model: DeepseekV3) -> anyhow::Result<Arc<DeepseekV3>> {
    let ep = EP.get().ok_or_else(|| anyhow::anyhow!("--expert-parallel: MPI not initialized"))?;
    let ex = ep
        .exchange
        .lock()
        .expect("lock")
        .take()
        .ok_or_else(|| anyhow::anyhow!("--expert-parallel: one model per process"))?;
    let experts = model.config.n_routed_experts;
    let layers = model.moe_layers().len();
    let placements = match layers == 0 || experts < ep.ranks {
        true => Err(anyhow::anyhow!(
            "--expert-parallel: {} processes for {experts} routed experts in {layers} MoE layers",
            ep.ranks
        )),
        false => Placements::new(layers, experts, ep.ranks, ep.options),
    };
    let ready = report(&ex, placements.is_ok());
    ep.reported.store(true, Ordering::Relaxed);
    let placements = placements?;
    if ready < ep.ranks {
        anyhow::bail!(
            "--expert-parallel: {} of {} processes could not load the model (their errors say why)",
            ep.ranks - ready,
            ep.ranks
        );
    }
    if ep.options.data_parallel {
        let name = mpi::environment::processor_name().unwrap_or_default();
        let (all, sizes) = ex.all_gather(name.as_bytes());
        let mut at = 0;
        *ep.hosts.lock().expect("lock") = sizes
            .iter()
            .map(|&n| {
                at += n;
                String::from_utf8_lossy(&all[at - n..at]).into_owned()
            })
            .collect();
    }
    if ep.rank == 0 {
        eprintln!(
            "expert parallel: {} processes{}; {experts} routed experts per layer over {} slots{}",
            ep.ranks,
            if ep.options.data_parallel { ", attention data-parallel" } else { "" },
            (experts + ep.options.redundant).next_multiple_of(ep.ranks),
            match ep.options.rebalance_every {
                0 => String::new(),
                b => format!(", re-placed by EPLB every {b} calls per layer"),
            }
        );
    }
    let placements = Arc::new(Mutex::new(placements));
    let exchange = Arc::new(MpiSum { ex: Mutex::new(ex), rank: ep.rank, size: ep.ranks });
    let (model, service) = ExpertService::start(model, exchange, Box::new(Live(placements.clone())));
    *ep.service.lock().expect("lock") = Some(service);
    *ep.placements.lock().expect("lock") = Some(placements);
    if ep.rank != 0 && !ep.options.data_parallel {
        finish();
        std::process::exit(0);
    }
    Ok(model)
}

/// `serve --data-parallel` (attention data-parallel), after the model is loaded: moves this
/// process's server to `port + 1 + rank`; on rank 0 returns the front's port and the servers'
/// addresses, to which it relays the connections made to `port` in turn.
pub fn data_parallel_serve(host: &str, port: &mut u16) -> anyhow::Result<Option<(u16, Vec<String>)>> {
    let Some(ep) = EP.get().filter(|ep| ep.options.inference && ep.options.data_parallel) else { return Ok(None) };
    let hosts = ep.hosts.lock().expect("lock").clone();
    let front = *port;
    let at = |r: usize| {
        u16::try_from(front as usize + 1 + r)
            .map_err(|_| anyhow::anyhow!("--port {front}: no room for {} more ports", hosts.len()))
    };
    *port = at(ep.rank)?;
    if ep.rank != 0 {
        return Ok(None);
    }
    let here = &hosts[0];
    if hosts.iter().any(|h| h != here) && host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
        eprintln!("dsv3 serve: warning: processes on other hosts serve on --host {host} (loopback); give --host 0.0.0.0 to reach them");
    }
    let servers = hosts
        .iter()
        .enumerate()
        .map(|(r, h)| Ok(format!("{}:{}", if h == here { host } else { h.as_str() }, at(r)?)))
        .collect::<anyhow::Result<_>>()?;
    Ok(Some((front, servers)))
}

/// Per-rank load imbalance (max/mean pairs per rank) of the last full window, averaged over the
/// MoE layers: (placement in force, static placement). None before a window completes.
pub fn imbalance() -> Option<(f64, f64)> {
    let p = EP.get()?.placements.lock().ok()?.clone()?;
    let p = p.lock().ok()?;
    let v: Vec<(f64, f64)> = p.layers.iter().filter_map(|b| b.last_imbalance).collect();
    (!v.is_empty()).then(|| {
        (v.iter().map(|x| x.0).sum::<f64>() / v.len() as f64, v.iter().map(|x| x.1).sum::<f64>() / v.len() as f64)
    })
}

/// Ends this process's part: serves the other processes' experts until all are done (a
/// process that never loaded its model tells the others so), then finalizes MPI.
pub fn finish() {
    let Some(ep) = EP.get() else { return };
    if ep.options.inference {
        let service = ep.service.lock().ok().and_then(|mut s| s.take());
        if let Some(service) = service {
            service.finish();
            let calls =
                ep.placements.lock().ok().and_then(|p| p.clone()).map_or(0, |p| p.lock().map_or(0, |p| p.token_layers));
            if calls > 0 {
                let sent = EXPERT_BYTES.load(Ordering::Relaxed);
                eprintln!("expert parallel: rank {} sent {:.2} MB to other processes, {:.0} bytes per token and MoE layer of all processes' calls ({calls})", ep.rank, sent as f64 / 1e6, sent as f64 / calls as f64);
            }
        } else if !ep.reported.swap(true, Ordering::Relaxed) {
            if let Some(ex) = ep.exchange.lock().ok().and_then(|mut e| e.take()) {
                report(&ex, false);
            }
        }
    }
    if let Ok(mut u) = ep.universe.lock() {
        u.take();
    }
}

/// The data-parallel sum of `dsv3 train --data-parallel`.
struct MpiSum {
    ex: Mutex<MpiExchange>,
    rank: usize,
    size: usize,
}

// SAFETY: see `Ep`.
unsafe impl Send for MpiSum {}
unsafe impl Sync for MpiSum {}

impl dsv3_train::parallel::AllReduce for MpiSum {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn sum_f64(&self, v: &mut [f64]) {
        let ex = self.ex.lock().expect("MPI lock");
        let send = v.to_vec();
        ex.comm.all_reduce_into(&send[..], v, mpi::collective::SystemOperation::sum());
    }
    fn with_peers(&self, f: &mut dyn FnMut(&mut dyn dsv3_dist::pipeline::P2p)) {
        let ex = self.ex.lock().expect("MPI lock");
        let mut peers = dsv3_dist::transport::MpiPeers::new(&ex.comm);
        f(&mut peers);
    }
}

impl dsv3_model::grad::moe::ExpertExchange for MpiSum {
    fn rank(&self) -> usize {
        self.rank
    }
    fn ranks(&self) -> usize {
        self.size
    }
    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        self.all_to_all_overlapped(send, &mut || false)
    }
    /// `MPI_Ialltoallv` posted, `work` between tests, then the wait.
    fn all_to_all_overlapped(&self, send: Vec<Vec<f32>>, work: &mut dyn FnMut() -> bool) -> Vec<Vec<f32>> {
        use dsv3_dist::ep::Exchange;
        let counts: Vec<usize> = send.iter().map(|b| 4 * b.len()).collect();
        let remote: usize = counts.iter().enumerate().filter(|&(r, _)| r != self.rank).map(|(_, c)| c).sum();
        EXPERT_BYTES.fetch_add(remote as u64, std::sync::atomic::Ordering::Relaxed);
        let (recv, sizes) =
            self.ex.lock().expect("MPI lock").all_to_all_overlapped(&le_bytes(&send.concat()), &counts, work);
        f32_blocks(&recv, &sizes)
    }
    fn all_to_all_waiting(&self, send: Vec<Vec<f32>>, idle: &mut dyn FnMut()) -> Vec<Vec<f32>> {
        let counts: Vec<usize> = send.iter().map(|b| 4 * b.len()).collect();
        let remote: usize = counts.iter().enumerate().filter(|&(r, _)| r != self.rank).map(|(_, c)| c).sum();
        EXPERT_BYTES.fetch_add(remote as u64, std::sync::atomic::Ordering::Relaxed);
        let (recv, sizes) =
            self.ex.lock().expect("MPI lock").all_to_all_waiting(&le_bytes(&send.concat()), &counts, idle);
        f32_blocks(&recv, &sizes)
    }
}

/// Bytes this process sent to others in expert-parallel exchanges.
static EXPERT_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes this process sent to other processes in expert-parallel training's exchanges.
pub fn expert_exchange_bytes() -> u64 {
    EXPERT_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Received bytes, `sizes[r]` from rank `r`, as f32 blocks per rank.
fn f32_blocks(bytes: &[u8], sizes: &[usize]) -> Vec<Vec<f32>> {
    let mut at = 0;
    sizes
        .iter()
        .map(|&n| {
            let block = &bytes[at..at + n];
            at += n;
            block.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        })
        .collect()
}

/// How `dsv3 train` runs over the MPI processes.
pub enum Training {
    /// Each process trains on its share of every batch.
    DataParallel,
    /// Data parallelism with the routed experts split over the processes.
    ExpertParallel,
    /// Pipeline groups of `stages` processes running the schedule; the groups are data-parallel,
    /// and with `experts` they split the routed experts among them.
    Pipeline { kind: dsv3_dist::schedule::Kind, chunks: usize, stages: usize, experts: bool },
}

/// Makes the trainer parallel over the MPI processes.
pub fn training(how: Training) -> anyhow::Result<()> {
    let ep = EP.get().ok_or_else(|| anyhow::anyhow!("parallel training: MPI not initialized"))?;
    let ex = ep
        .exchange
        .lock()
        .expect("lock")
        .take()
        .ok_or_else(|| anyhow::anyhow!("parallel training: one trainer per process"))?;
    let sum = Arc::new(MpiSum { ex: Mutex::new(ex), rank: ep.rank, size: ep.ranks });
    match how {
        Training::DataParallel => dsv3_train::parallel::set_data_parallel(sum),
        Training::ExpertParallel => dsv3_train::parallel::set_expert_parallel(sum.clone(), sum),
        Training::Pipeline { kind, chunks, stages, experts } => {
            let experts = experts.then(|| {
                // The processes at the same pipeline rank exchange expert rows (ranks ordered as
                // in the world: the pipeline index), the backward's on a duplicate communicator
                // when a forward and a backward may run at once.
                let world = &sum.ex.lock().expect("MPI lock").comm;
                let (g, s) = (ep.rank / stages, ep.rank % stages);
                let comm = world
                    .split_by_color(mpi::topology::Color::with_value(s as i32))
                    .expect("a member of its own color");
                let exchange = |comm| {
                    Arc::new(MpiSum { ex: Mutex::new(MpiExchange { comm }), rank: g, size: ep.ranks / stages })
                        as Arc<dyn dsv3_model::grad::moe::ExpertExchange>
                };
                let backward = ep.concurrent.then(|| exchange(comm.duplicate()));
                let forward = exchange(comm);
                dsv3_model::grad::moe::Exchanges { backward: backward.unwrap_or_else(|| forward.clone()), forward }
            });
            dsv3_train::parallel::set_pipeline(sum, kind, chunks, stages, experts)
        }
    }
    Ok(())
}
