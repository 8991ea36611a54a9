//! MPI as the [`Exchange`] of expert parallelism (rsmpi over OpenMPI): the per-destination sizes
//! go first (`MPI_Alltoall`), then the bytes (`MPI_Alltoallv`, or `MPI_Ialltoallv` with the
//! caller's work between posting and waiting, tested between its slices).

use crate::ep::Exchange;
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Count;

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

impl Exchange for MpiExchange {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn ranks(&self) -> usize {
        self.comm.size() as usize
    }

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
    /// [`Exchange::all_to_all`] for a thread with nothing else to do meanwhile: both steps (the
    /// counts, then the blocks) are posted and tested with `idle` between tests, since OpenMPI's
    /// blocking calls spin on a core that others may need.
    pub fn all_to_all_waiting(&self, send: &[u8], counts: &[usize], idle: &mut dyn FnMut()) -> (Vec<u8>, Vec<usize>) {
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
