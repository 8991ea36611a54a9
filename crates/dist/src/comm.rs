//! The one communicator of dsv3's parallel layouts: a group of ranks (processes under MPI, or
//! threads standing in for them) that exchange blocks all-to-all, sum vectors, and send each
//! other point-to-point messages. Expert parallelism (training and inference), data parallelism
//! and pipelines all run over it; [`ThreadComm`] here, `MpiComm` in [`crate::transport`] (feature
//! `mpi`).

use crate::pipeline::{P2p, ThreadPeers};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;

pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;

    /// `send[r]` goes to rank `r`; returns what each rank sent here, in rank order.
    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Vec<Vec<f32>>;

    /// [`Comm::all_to_all`] with `work` run while the transfer is in flight (called until it
    /// returns false; the transport may progress between calls). Default: not overlapped.
    fn all_to_all_overlapped(&self, send: Vec<Vec<f32>>, work: &mut dyn FnMut() -> bool) -> Vec<Vec<f32>> {
        let r = self.all_to_all(send);
        while work() {}
        r
    }

    /// [`Comm::all_to_all`] for a thread with nothing else to do: `idle` runs between checks of
    /// the transfer (to sleep rather than spin on a core others need). Default: blocking.
    fn all_to_all_waiting(&self, send: Vec<Vec<f32>>, idle: &mut dyn FnMut()) -> Vec<Vec<f32>> {
        let _ = idle;
        self.all_to_all(send)
    }

    /// Element-wise sum of `v` over the ranks, in place; every rank gets the same result.
    fn all_reduce_sum(&self, v: &mut [f64]);

    /// Runs `f` with point-to-point messages among the ranks (pipeline training).
    fn with_peers(&self, f: &mut dyn FnMut(&mut dyn P2p));

    /// Bytes this rank has sent to the others in all-to-alls so far (reported by the CLI).
    fn bytes_sent(&self) -> u64 {
        0
    }
}

/// Ranks as threads of one process: one FIFO channel per (source, destination) for the
/// all-to-alls and sums, and [`ThreadPeers`] for point-to-point messages.
pub struct ThreadComm {
    rank: usize,
    to: Vec<Sender<Vec<f32>>>,
    from: Mutex<Vec<Receiver<Vec<f32>>>>,
    sums_to: Vec<Sender<Vec<f64>>>,
    sums_from: Mutex<Vec<Receiver<Vec<f64>>>>,
    peers: Mutex<ThreadPeers>,
    sent: AtomicU64,
}

impl ThreadComm {
    /// One endpoint per rank.
    pub fn group(ranks: usize) -> Vec<ThreadComm> {
        type Mesh<T> = (Vec<Vec<Sender<T>>>, Vec<Vec<Receiver<T>>>);
        fn mesh<T>(ranks: usize) -> Mesh<T> {
            let mut to: Vec<Vec<Sender<T>>> = (0..ranks).map(|_| vec![]).collect();
            let mut from: Vec<Vec<Receiver<T>>> = (0..ranks).map(|_| vec![]).collect();
            for tx_list in to.iter_mut() {
                for rx_list in from.iter_mut() {
                    let (tx, rx) = channel();
                    tx_list.push(tx);
                    rx_list.push(rx);
                }
            }
            (to, from)
        }
        let (to, from) = mesh::<Vec<f32>>(ranks);
        let (sums_to, sums_from) = mesh::<Vec<f64>>(ranks);
        to.into_iter()
            .zip(from)
            .zip(sums_to.into_iter().zip(sums_from))
            .zip(ThreadPeers::group(ranks))
            .enumerate()
            .map(|(rank, (((to, from), (sums_to, sums_from)), peers))| ThreadComm {
                rank,
                to,
                from: Mutex::new(from),
                sums_to,
                sums_from: Mutex::new(sums_from),
                peers: Mutex::new(peers),
                sent: AtomicU64::new(0),
            })
            .collect()
    }
}

impl Comm for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.to.len()
    }

    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        let remote: usize = send.iter().enumerate().filter(|&(r, _)| r != self.rank).map(|(_, b)| 4 * b.len()).sum();
        self.sent.fetch_add(remote as u64, Ordering::Relaxed);
        for (tx, buf) in self.to.iter().zip(send) {
            tx.send(buf).expect("peer alive");
        }
        self.from.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|rx| rx.recv().expect("peer alive")).collect()
    }

    fn all_reduce_sum(&self, v: &mut [f64]) {
        for tx in &self.sums_to {
            tx.send(v.to_vec()).expect("peer alive");
        }
        // Summed in rank order on every rank: the same result everywhere.
        let parts: Vec<Vec<f64>> = self
            .sums_from
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|rx| rx.recv().expect("peer alive"))
            .collect();
        v.fill(0.0);
        for p in parts {
            v.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
    }

    fn with_peers(&self, f: &mut dyn FnMut(&mut dyn P2p)) {
        f(&mut *self.peers.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_exchange_sum_and_message_like_ranks() {
        let comms = ThreadComm::group(3);
        type Seen = (Vec<Vec<f32>>, Vec<f64>, Vec<f64>);
        let out: Vec<Seen> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank();
                        let got = c.all_to_all((0..3).map(|to| vec![(10 * r + to) as f32]).collect());
                        let mut v = vec![r as f64, 1.0];
                        c.all_reduce_sum(&mut v);
                        let mut msg = vec![];
                        c.with_peers(&mut |p| {
                            p.send((r + 1) % 3, 7, vec![r as f64]);
                            msg = p.recv((r + 2) % 3, 7, 1);
                        });
                        (got, v, msg)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, (got, v, msg)) in out.iter().enumerate() {
            assert_eq!(got, &(0..3).map(|from| vec![(10 * from + r) as f32]).collect::<Vec<_>>());
            assert_eq!(v, &vec![3.0, 3.0]);
            assert_eq!(msg, &vec![((r + 2) % 3) as f64]);
        }
        assert_eq!(comms[0].bytes_sent(), 8);
    }
}
