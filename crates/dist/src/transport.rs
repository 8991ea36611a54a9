//! MPI (rsmpi over OpenMPI) as the [`Comm`] of the parallel layouts, and the start-up of a run
//! under `mpirun` ([`World`]). All-to-alls send the per-destination sizes first
//! (`MPI_Alltoall`), then the bytes (`MPI_Alltoallv`, or `MPI_Ialltoallv` with the caller's work
//! between posting and waiting, tested between its slices).

use crate::comm::Comm;
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Count;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub struct MpiExchange {
    pub comm: SimpleCommunicator,
}

/// An empty Rust slice points at address 1, which OpenMPI reads as `MPI_IN_PLACE`: empty buffers
/// get a real address.
static EMPTY: [u8; 1] = [0];

/// Where each block starts: the running sum of the counts before it.
fn displs(counts: &[Count]) -> Vec<Count> {
    counts
        .iter()
        .scan(0, |a, &x| {
            let d = *a;
            *a += x;
            Some(d)
        })
        .collect()
}

fn real(b: &[u8]) -> &[u8] {
    if b.is_empty() {
        &EMPTY[..0]
    } else {
        b
    }
}

impl MpiExchange {
    /// Counts received from each source for `counts` sent to each destination, and the
    /// displacements of both.
    fn sizes(&self, counts: &[usize]) -> (Vec<Count>, Vec<Count>, Vec<Count>, Vec<Count>) {
        let sc: Vec<Count> = counts.iter().map(|&c| Count::try_from(c).expect("a block over 2 GiB")).collect();
        let mut rc = vec![0 as Count; sc.len()];
        self.comm.all_to_all_into(&sc[..], &mut rc[..]);
        let (sd, rd) = (displs(&sc), displs(&rc));
        (sc, sd, rc, rd)
    }
}

impl MpiExchange {
    /// Every rank's `bytes`, concatenated in rank order, and their sizes.
    pub fn all_gather(&self, bytes: &[u8]) -> (Vec<u8>, Vec<usize>) {
        let n = Count::try_from(bytes.len()).expect("a block over 2 GiB");
        let mut counts = vec![0 as Count; self.comm.size() as usize];
        self.comm.all_gather_into(&n, &mut counts[..]);
        let displs = displs(&counts);
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let mut out = vec![0u8; total + 1];
        {
            let mut p = PartitionMut::new(&mut out[..total], &counts[..], &displs[..]);
            self.comm.all_gather_varcount_into(real(bytes), &mut p);
        }
        out.truncate(total);
        (out, counts.iter().map(|&c| c as usize).collect())
    }
}

impl MpiExchange {
    fn all_to_all(&self, send: &[u8], counts: &[usize]) -> (Vec<u8>, Vec<usize>) {
        let (sc, sd, rc, rd) = self.sizes(counts);
        let total: usize = rc.iter().map(|&c| c as usize).sum();
        let mut recv = vec![0u8; total + 1];
        {
            let sp = Partition::new(real(send), &sc[..], &sd[..]);
            let mut rp = PartitionMut::new(&mut recv[..total], &rc[..], &rd[..]);
            self.comm.all_to_all_varcount_into(&sp, &mut rp);
        }
        recv.truncate(total);
        (recv, rc.iter().map(|&c| c as usize).collect())
    }

    fn all_to_all_overlapped(
        &self,
        send: &[u8],
        counts: &[usize],
        work: &mut dyn FnMut() -> bool,
    ) -> (Vec<u8>, Vec<usize>) {
        let sizes = self.sizes(counts);
        // OpenMPI progresses a non-blocking collective only inside MPI calls: test it between
        // slices of work.
        self.posted(send, sizes, &mut |_| work())
    }
}

impl MpiExchange {
    /// An all-to-all for a thread with nothing else to do meanwhile: both steps (the
    /// counts, then the blocks) are posted and tested with `idle` between tests, since OpenMPI's
    /// blocking calls spin on a core that others may need.
    fn all_to_all_waiting(&self, send: &[u8], counts: &[usize], idle: &mut dyn FnMut()) -> (Vec<u8>, Vec<usize>) {
        let sc: Vec<Count> = counts.iter().map(|&c| Count::try_from(c).expect("a block over 2 GiB")).collect();
        let mut rc = vec![0 as Count; sc.len()];
        mpi::request::scope(|scope| poll(self.comm.immediate_all_to_all_into(scope, &sc[..], &mut rc[..]), idle));
        let (sd, rd) = (displs(&sc), displs(&rc));
        self.posted(send, (sc, sd, rc, rd), &mut |done| {
            if !done {
                idle();
            }
            !done
        })
    }

    /// The blocks' all-to-all posted (`MPI_Ialltoallv`), tested after each `between(done)` until
    /// that returns false, then waited for.
    fn posted(
        &self,
        send: &[u8],
        (sc, sd, rc, rd): (Vec<Count>, Vec<Count>, Vec<Count>, Vec<Count>),
        between: &mut dyn FnMut(bool) -> bool,
    ) -> (Vec<u8>, Vec<usize>) {
        let total: usize = rc.iter().map(|&c| c as usize).sum();
        let mut recv = vec![0u8; total + 1];
        {
            let sp = Partition::new(real(send), &sc[..], &sd[..]);
            let mut rp = PartitionMut::new(&mut recv[..total], &rc[..], &rd[..]);
            mpi::request::scope(|scope| {
                let mut req = Some(self.comm.immediate_all_to_all_varcount_into(scope, &sp, &mut rp));
                while between(req.is_none()) {
                    if let Some(r) = req.take() {
                        req = r.test().err();
                    }
                }
                if let Some(r) = req {
                    r.wait();
                }
            });
        }
        recv.truncate(total);
        (recv, rc.iter().map(|&c| c as usize).collect())
    }
}

/// Tests `req` until it completes, running `idle` between tests.
fn poll<'a, D: ?Sized, S: mpi::request::Scope<'a>>(mut req: mpi::request::Request<'a, D, S>, idle: &mut dyn FnMut()) {
    loop {
        match req.test() {
            Ok(_) => return,
            Err(r) => {
                req = r;
                idle();
            }
        }
    }
}

/// Point-to-point messages for the pipeline executor: sends are posted at once (`MPI_Isend`, the
/// buffer kept alive until [`P2p::flush`]), receives block on (source, tag).
pub struct MpiPeers<'a> {
    pub comm: &'a SimpleCommunicator,
    pending: Vec<PendingSend>,
}

/// A posted send and its leaked buffer (freed once the send completes).
type PendingSend = (mpi::request::Request<'static, [f64], mpi::request::StaticScope>, *mut [f64]);

impl<'a> MpiPeers<'a> {
    pub fn new(comm: &'a SimpleCommunicator) -> Self {
        MpiPeers { comm, pending: vec![] }
    }
}

impl crate::pipeline::P2p for MpiPeers<'_> {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn send(&mut self, to: usize, tag: u64, data: Vec<f64>) {
        // The buffer must outlive the request: leaked here, reclaimed in flush after the wait.
        let buf: &'static mut [f64] = Box::leak(data.into_boxed_slice());
        let ptr: *mut [f64] = buf;
        let req =
            self.comm.process_at_rank(to as i32).immediate_send_with_tag(mpi::request::StaticScope, &*buf, tag as i32);
        self.pending.push((req, ptr));
    }

    fn recv(&mut self, from: usize, tag: u64, _len: usize) -> Vec<f64> {
        self.comm.process_at_rank(from as i32).receive_vec_with_tag::<f64>(tag as i32).0
    }

    fn flush(&mut self) {
        for (req, ptr) in self.pending.drain(..) {
            req.wait();
            // SAFETY: `ptr` came from Box::leak in `send`, and the send using it has completed.
            drop(unsafe { Box::from_raw(ptr) });
        }
    }
}

impl Drop for MpiPeers<'_> {
    fn drop(&mut self) {
        crate::pipeline::P2p::flush(self);
    }
}

/// An MPI communicator as dsv3's [`Comm`]. Calls are serialized through a lock (MPI is
/// initialized for multi-threaded use; DualPipe's `(F|B)` uses two communicators at once).
pub struct MpiComm {
    ex: Mutex<MpiExchange>,
    rank: usize,
    size: usize,
    sent: AtomicU64,
}

// SAFETY: MPI is initialized with MPI_THREAD_SERIALIZED or more, and every call on this
// communicator goes through its mutex.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl MpiComm {
    pub fn new(comm: SimpleCommunicator) -> Self {
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        MpiComm { ex: Mutex::new(MpiExchange { comm }), rank, size, sent: AtomicU64::new(0) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MpiExchange> {
        self.ex.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A communicator of the ranks with the same `color`, ordered as here.
    pub fn split(&self, color: i32) -> MpiComm {
        let c = self
            .lock()
            .comm
            .split_by_color(mpi::topology::Color::with_value(color))
            .expect("a member of its own color");
        MpiComm::new(c)
    }

    /// A second communicator over the same ranks (messages on it never meet this one's).
    pub fn duplicate(&self) -> MpiComm {
        MpiComm::new(self.lock().comm.duplicate())
    }

    /// Every rank's `bytes`, in rank order.
    pub fn all_gather(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let (all, sizes) = self.lock().all_gather(bytes);
        let mut at = 0;
        sizes
            .iter()
            .map(|&n| {
                at += n;
                all[at - n..at].to_vec()
            })
            .collect()
    }

    /// Counts the bytes of `counts` that leave this rank.
    fn count(&self, counts: &[usize]) {
        let remote: usize = counts.iter().enumerate().filter(|&(r, _)| r != self.rank).map(|(_, c)| c).sum();
        self.sent.fetch_add(remote as u64, Ordering::Relaxed);
    }
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

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        let counts: Vec<usize> = send.iter().map(|b| 4 * b.len()).collect();
        self.count(&counts);
        let (recv, sizes) = self.lock().all_to_all(&le_bytes(&send.concat()), &counts);
        f32_blocks(&recv, &sizes)
    }

    /// `MPI_Ialltoallv` posted, `work` between tests, then the wait.
    fn all_to_all_overlapped(&self, send: Vec<Vec<f32>>, work: &mut dyn FnMut() -> bool) -> Vec<Vec<f32>> {
        let counts: Vec<usize> = send.iter().map(|b| 4 * b.len()).collect();
        self.count(&counts);
        let (recv, sizes) = self.lock().all_to_all_overlapped(&le_bytes(&send.concat()), &counts, work);
        f32_blocks(&recv, &sizes)
    }

    fn all_to_all_waiting(&self, send: Vec<Vec<f32>>, idle: &mut dyn FnMut()) -> Vec<Vec<f32>> {
        let counts: Vec<usize> = send.iter().map(|b| 4 * b.len()).collect();
        self.count(&counts);
        let (recv, sizes) = self.lock().all_to_all_waiting(&le_bytes(&send.concat()), &counts, idle);
        f32_blocks(&recv, &sizes)
    }

    fn all_reduce_sum(&self, v: &mut [f64]) {
        let ex = self.lock();
        let send = v.to_vec();
        ex.comm.all_reduce_into(&send[..], v, mpi::collective::SystemOperation::sum());
    }

    fn with_peers(&self, f: &mut dyn FnMut(&mut dyn crate::pipeline::P2p)) {
        let ex = self.lock();
        let mut peers = MpiPeers::new(&ex.comm);
        f(&mut peers);
    }

    fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

/// A run under `mpirun`: MPI initialized (for multi-threaded use), the world's communicator,
/// and MPI finalized when dropped.
pub struct World {
    universe: Option<mpi::environment::Universe>,
    pub comm: std::sync::Arc<MpiComm>,
    /// MPI may be called from several threads at once (`MPI_THREAD_MULTIPLE`): DualPipe's
    /// `(F|B)` then runs a forward and a backward at once, each with its own communicator.
    pub concurrent: bool,
}

// SAFETY: the universe is only kept alive and dropped at the end.
unsafe impl Send for World {}
unsafe impl Sync for World {}

impl World {
    pub fn init() -> Result<World, String> {
        // Multiple: DualPipe's (F|B) runs a forward and a backward on two threads, each with its
        // own exchange; with less, they run one after the other.
        let (universe, threading) =
            mpi::initialize_with_threading(mpi::Threading::Multiple).ok_or("MPI is already initialized")?;
        if threading < mpi::Threading::Serialized {
            return Err("this MPI does not support serialized multi-threaded calls".into());
        }
        let comm = std::sync::Arc::new(MpiComm::new(universe.world()));
        Ok(World { universe: Some(universe), comm, concurrent: threading == mpi::Threading::Multiple })
    }

    pub fn rank(&self) -> usize {
        self.comm.rank
    }

    pub fn size(&self) -> usize {
        self.comm.size
    }

    /// Each rank's host name (MPI's processor name), in rank order.
    pub fn hosts(&self) -> Vec<String> {
        let name = mpi::environment::processor_name().unwrap_or_default();
        self.comm.all_gather(name.as_bytes()).into_iter().map(|b| String::from_utf8_lossy(&b).into_owned()).collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.universe.take();
    }
}
