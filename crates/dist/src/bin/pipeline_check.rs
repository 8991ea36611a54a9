//! The pipeline executor across real MPI processes (`mpirun -np N dsv3-pipeline-check`): 1F1B,
//! DualPipe (N even) and DualPipeV run DualPipe's example model (MLP stages, MSE loss, f64); rank 0
//! checks the losses bit for bit and every stage's gradient (`1 − 2Σxy/Σ(x²+y²) < 1e-13`)
//! against the sequential run of the same micro-batches. Exits non-zero on failure.

use dsv3_dist::comm::Comm;
use dsv3_dist::pipeline::{calc_diff, reference, run, Batch, Grads, Stage};
use dsv3_dist::schedule::{generate, Kind};
use dsv3_dist::transport::World;

fn main() {
    let world = World::init().expect("MPI initializes once");
    let ranks = world.size();
    let h = 16;
    let mut kinds = vec![(Kind::OneFOneB, 2 * ranks), (Kind::DualPipeV, 2 * ranks + 1)];
    if ranks.is_multiple_of(2) {
        kinds.push((Kind::DualPipe, 2 * ranks + 2));
    }
    for (kind, chunks) in kinds {
        let n_stages = if kind == Kind::DualPipeV { 2 * ranks } else { ranks };
        let stages: Vec<Stage> = (0..n_stages).map(|s| Stage::new(h, 7 + s as u64)).collect();
        let b = Batch::synthetic(chunks, 4, h);
        let ops = generate(kind, ranks, chunks).expect("a valid shape");
        let me = world.rank();
        let mut result = None;
        world.comm.with_peers(&mut |peers| result = Some(run(peers, kind, ranks, chunks, &ops[me], &stages, &b)));
        let result = result.expect("the run");
        // Everything to rank 0: (batch index, loss) pairs and (stage, w1, w2) gradients.
        let mut bytes = vec![];
        bytes.extend((result.losses.len() as u64).to_le_bytes());
        for (i, l) in &result.losses {
            bytes.extend((*i as u64).to_le_bytes());
            bytes.extend(l.to_le_bytes());
        }
        bytes.extend((result.grads.len() as u64).to_le_bytes());
        for (s, g) in &result.grads {
            bytes.extend((*s as u64).to_le_bytes());
            bytes.extend(g.w1.iter().chain(&g.w2).flat_map(|v| v.to_le_bytes()));
        }
        let all = world.comm.duplicate().all_gather(&bytes);
        if me != 0 {
            continue;
        }
        let (ref_losses, ref_grads) = reference(&stages, &b);
        let mut losses = vec![f64::NAN; chunks];
        let mut sum = vec![Grads::default(); n_stages];
        let word = |b: &[u8], i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap());
        let g_len = 8 * h * h;
        for b in &all {
            let nl = word(b, 0) as usize;
            for k in 0..nl {
                losses[word(b, 1 + 2 * k) as usize] = f64::from_bits(word(b, 2 + 2 * k));
            }
            let mut at = 1 + 2 * nl;
            for _ in 0..word(b, at) {
                let s = word(b, at + 1) as usize;
                let vals: Vec<f64> = (0..g_len).map(|j| f64::from_bits(word(b, at + 2 + j))).collect();
                let (w1, w2) = vals.split_at(4 * h * h);
                if sum[s].w1.is_empty() {
                    sum[s] = Grads { w1: w1.to_vec(), w2: w2.to_vec() };
                } else {
                    sum[s].w1.iter_mut().zip(w1).for_each(|(a, b)| *a += b);
                    sum[s].w2.iter_mut().zip(w2).for_each(|(a, b)| *a += b);
                }
                at += 1 + g_len;
            }
        }
        let losses_equal = losses.iter().zip(&ref_losses).all(|(a, b)| a.to_bits() == b.to_bits());
        let diff = sum
            .iter()
            .zip(&ref_grads)
            .map(|(g, r)| calc_diff(&g.w1, &r.w1).max(calc_diff(&g.w2, &r.w2)))
            .fold(0.0, f64::max);
        println!("pipeline-check: {kind:?} on {ranks} ranks, {chunks} micro-batches, {n_stages} stages: losses bit-identical {losses_equal}, max gradient diff {diff:.2e}");
        // (NaN counts as a failure.)
        if !losses_equal || diff.partial_cmp(&1e-13) != Some(std::cmp::Ordering::Less) {
            eprintln!("pipeline-check: FAILED");
            std::process::exit(1);
        }
    }
    if world.rank() == 0 {
        println!("pipeline-check: ok");
    }
}
