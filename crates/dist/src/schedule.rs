//! Pipeline schedules as per-rank op lists (parallel §1): 1F1B, DualPipe and DualPipeV, the
//! latter two replaying the control flow of `deepseek-ai/DualPipe`'s `step()` (eight phases; ranks
//! in DualPipe's second half run the mirror image with the directions swapped), and a dataflow
//! simulator that times them.
//!
//! Ops: `F0.3` forward of direction 0, micro-batch 3; `B1.2` full backward; `b0.1` backward of the
//! input gradient only, its weight gradient deferred to a later `W0.1`; `(F0.3|B1.1)` a forward
//! and a backward overlapped in one slot.

use std::fmt;

/// Which schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    OneFOneB,
    DualPipe,
    DualPipeV,
}

/// One compute slot of a rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    F {
        dir: u8,
        mb: usize,
    },
    /// `zb`: input gradient only; the weight gradient waits for a `W`.
    B {
        dir: u8,
        mb: usize,
        zb: bool,
    },
    W {
        dir: u8,
        mb: usize,
    },
    /// A forward and a backward overlapped.
    FB {
        f: (u8, usize),
        b: (u8, usize),
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match *self {
            Op::F { dir, mb } => write!(f, "F{dir}.{mb}"),
            Op::B { dir, mb, zb } => write!(f, "{}{dir}.{mb}", if zb { 'b' } else { 'B' }),
            Op::W { dir, mb } => write!(f, "W{dir}.{mb}"),
            Op::FB { f: (fd, fm), b: (bd, bm) } => write!(f, "(F{fd}.{fm}|B{bd}.{bm})"),
        }
    }
}

/// The op list of every rank.
pub fn generate(kind: Kind, ranks: usize, chunks: usize) -> Result<Vec<Vec<Op>>, String> {
    match kind {
        Kind::OneFOneB => {
            if ranks == 0 || chunks == 0 {
                return Err("1F1B needs at least one rank and one micro-batch".into());
            }
            Ok((0..ranks).map(|r| one_f_one_b(r, ranks, chunks)).collect())
        }
        Kind::DualPipe => {
            if ranks == 0 || !ranks.is_multiple_of(2) || !chunks.is_multiple_of(2) || chunks < 2 * ranks {
                return Err(format!(
                    "DualPipe needs an even number of ranks and an even chunk count ≥ 2·ranks (got {ranks}, {chunks})"
                ));
            }
            Ok((0..ranks).map(|r| Dual::new(kind, r, ranks, chunks).run()).collect())
        }
        Kind::DualPipeV => {
            if ranks == 0 || chunks < 2 * ranks {
                return Err(format!("DualPipeV needs chunks ≥ 2·ranks (got {ranks}, {chunks})"));
            }
            Ok((0..ranks).map(|r| Dual::new(kind, r, ranks, chunks).run()).collect())
        }
    }
}

/// Non-interleaved 1F1B: warm-up forwards, then one forward and one backward in turn, then the
/// remaining backwards.
fn one_f_one_b(r: usize, n: usize, c: usize) -> Vec<Op> {
    let warm = (n - r - 1).min(c);
    let mut ops: Vec<Op> = (0..warm).map(|mb| Op::F { dir: 0, mb }).collect();
    for i in 0..c - warm {
        ops.push(Op::F { dir: 0, mb: warm + i });
        ops.push(Op::B { dir: 0, mb: i, zb: false });
    }
    ops.extend((c - warm..c).map(|mb| Op::B { dir: 0, mb, zb: false }));
    ops
}

/// The replay of one rank of DualPipe / DualPipeV.
struct Dual {
    ops: Vec<Op>,
    /// Next forward / backward micro-batch per physical direction.
    next_f: [usize; 2],
    next_b: [usize; 2],
    /// Deferred weight gradients, oldest first.
    w_queue: std::collections::VecDeque<(u8, usize)>,
    /// DualPipe's second-half ranks swap the directions.
    flip: u8,
    h: usize,
    n: usize,
    main_steps: usize,
    middle: bool,
}

impl Dual {
    fn new(kind: Kind, r: usize, ranks: usize, chunks: usize) -> Self {
        let (h, n, main_steps, middle, flip) = match kind {
            Kind::DualPipe => {
                let h = r.min(ranks - 1 - r);
                (
                    h,
                    ranks / 2,
                    chunks / 2 + h + 1 - ranks,
                    r + 1 == ranks / 2 || r == ranks / 2,
                    u8::from(r >= ranks / 2),
                )
            }
            _ => (r, ranks, chunks + r + 1 - 2 * ranks, r == ranks - 1, 0),
        };
        Dual {
            ops: vec![],
            next_f: [0; 2],
            next_b: [0; 2],
            w_queue: Default::default(),
            flip,
            h,
            n,
            main_steps,
            middle,
        }
    }

    fn phys(&self, logical: u8) -> u8 {
        logical ^ self.flip
    }

    fn take_f(&mut self, logical: u8) -> (u8, usize) {
        let d = self.phys(logical);
        self.next_f[d as usize] += 1;
        (d, self.next_f[d as usize] - 1)
    }

    fn take_b(&mut self, logical: u8) -> (u8, usize) {
        let d = self.phys(logical);
        self.next_b[d as usize] += 1;
        (d, self.next_b[d as usize] - 1)
    }

    fn f(&mut self, p: u8) {
        let (dir, mb) = self.take_f(p);
        self.ops.push(Op::F { dir, mb });
    }

    fn b(&mut self, p: u8, zb: bool) {
        let (dir, mb) = self.take_b(p);
        if zb {
            self.w_queue.push_back((dir, mb));
        }
        self.ops.push(Op::B { dir, mb, zb });
    }

    fn w(&mut self) {
        if let Some((dir, mb)) = self.w_queue.pop_front() {
            self.ops.push(Op::W { dir, mb });
        }
    }

    fn fb(&mut self, pf: u8, pb: u8) {
        let (f, b) = (self.take_f(pf), self.take_b(pb));
        self.ops.push(Op::FB { f, b });
    }

    fn run(mut self) -> Vec<Op> {
        let (h, n) = (self.h, self.n);
        for _ in 0..2 * (n - h - 1) {
            self.f(0);
        }
        for _ in 0..h + 1 {
            self.f(0);
            self.f(1);
        }
        for _ in 0..n - h - 1 {
            self.b(1, true);
            self.w();
            self.f(1);
        }
        for i in 0..self.main_steps {
            if i == 0 && self.middle {
                // Not overlapped, to shrink the bubble (DualPipe's own note).
                self.f(0);
                self.b(1, false);
            } else {
                self.fb(0, 1);
            }
            self.fb(1, 0);
        }
        for _ in 0..n - h - 1 {
            self.b(1, false);
            self.fb(1, 0);
        }
        let mut zb = false;
        for i in 0..h + 1 {
            if i == h.div_ceil(2) && h % 2 == 1 {
                zb = true;
            }
            self.b(1, zb);
            if i == h.div_ceil(2) && h % 2 == 0 {
                zb = true;
            }
            self.b(0, zb);
        }
        for _ in 0..n - h - 1 {
            self.w();
            self.b(0, true);
        }
        for _ in 0..h + 1 {
            self.w();
        }
        debug_assert!(self.w_queue.is_empty());
        self.ops
    }
}

/// Durations of the chunk kinds.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub f: f64,
    /// Full backward (input and weight gradients).
    pub b: f64,
    /// The weight-gradient part of a backward.
    pub w: f64,
    /// A forward and a backward overlapped.
    pub fb: f64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { f: 1.0, b: 2.0, w: 1.0, fb: 3.0 }
    }
}

/// What the simulator found.
#[derive(Clone, Debug, PartialEq)]
pub struct Simulation {
    pub makespan: f64,
    /// Idle time of each rank: the makespan minus its busy time.
    pub bubble: Vec<f64>,
    /// `(start, end)` of every op, per rank.
    pub times: Vec<Vec<(f64, f64)>>,
}

/// Where an op of `(rank, dir)` sits: its flow (a micro-batch stream: DualPipe has one per
/// direction), its position along the flow's stages, and the flow's number of positions.
/// DualPipeV's rank `r` holds positions `r` (going out) and `2N−1−r` (coming back) of one flow.
pub fn stage_position(kind: Kind, ranks: usize, rank: usize, dir: u8) -> (usize, usize, usize) {
    match kind {
        Kind::OneFOneB => (0, rank, ranks),
        Kind::DualPipe => (dir as usize, if dir == 0 { rank } else { ranks - 1 - rank }, ranks),
        Kind::DualPipeV => (0, if dir == 0 { rank } else { 2 * ranks - 1 - rank }, 2 * ranks),
    }
}

/// Times every op with zero communication latency: a rank runs its ops in order, each as soon as
/// the rank is free and its inputs exist (a forward needs the previous stage's forward of the same
/// micro-batch; a backward the next stage's backward, or at the last stage its own forward; a W
/// its b). An error if the schedule deadlocks or is inconsistent.
pub fn simulate(kind: Kind, ops: &[Vec<Op>], t: Timing) -> Result<Simulation, String> {
    let ranks = ops.len();
    use std::collections::HashMap;
    let stage_of = |rank: usize, dir: u8| stage_position(kind, ranks, rank, dir);
    // Finish times: ('F' | 'B', flow, micro-batch, stage position) and ('b', rank, dir, mb) for W.
    let mut done: HashMap<(char, usize, usize, usize), f64> = HashMap::new();
    let mut next = vec![0usize; ranks];
    let mut free = vec![0f64; ranks];
    let mut times: Vec<Vec<(f64, f64)>> = ops.iter().map(|o| Vec::with_capacity(o.len())).collect();
    let mut busy = vec![0f64; ranks];
    loop {
        let mut progressed = false;
        for r in 0..ranks {
            while next[r] < ops[r].len() {
                let op = ops[r][next[r]];
                let f_dep = |dir: u8, mb: usize| -> Option<f64> {
                    let (flow, pos, _) = stage_of(r, dir);
                    if pos == 0 {
                        Some(0.0)
                    } else {
                        done.get(&('F', flow, mb, pos - 1)).copied()
                    }
                };
                let b_dep = |dir: u8, mb: usize| -> Option<f64> {
                    let (flow, pos, len) = stage_of(r, dir);
                    if pos + 1 == len {
                        done.get(&('F', flow, mb, pos)).copied()
                    } else {
                        done.get(&('B', flow, mb, pos + 1)).copied()
                    }
                };
                let (ready, dur) = match op {
                    Op::F { dir, mb } => (f_dep(dir, mb), t.f),
                    Op::B { dir, mb, zb } => (b_dep(dir, mb), if zb { t.b - t.w } else { t.b }),
                    Op::W { dir, mb } => (done.get(&('b', r, dir as usize, mb)).copied(), t.w),
                    Op::FB { f, b } => (f_dep(f.0, f.1).zip(b_dep(b.0, b.1)).map(|(x, y)| x.max(y)), t.fb),
                };
                let Some(ready) = ready else { break };
                let start = free[r].max(ready);
                let end = start + dur;
                free[r] = end;
                busy[r] += dur;
                times[r].push((start, end));
                let mut finish = |kind: char, dir: u8, mb: usize| {
                    let (flow, pos, _) = stage_of(r, dir);
                    done.insert((kind, flow, mb, pos), end);
                };
                match op {
                    Op::F { dir, mb } => finish('F', dir, mb),
                    Op::B { dir, mb, zb } => {
                        finish('B', dir, mb);
                        if zb {
                            done.insert(('b', r, dir as usize, mb), end);
                        }
                    }
                    Op::W { .. } => {}
                    Op::FB { f, b } => {
                        finish('F', f.0, f.1);
                        finish('B', b.0, b.1);
                    }
                }
                next[r] += 1;
                progressed = true;
            }
        }
        if (0..ranks).all(|r| next[r] == ops[r].len()) {
            break;
        }
        if !progressed {
            let stuck: Vec<String> = (0..ranks)
                .filter(|&r| next[r] < ops[r].len())
                .map(|r| format!("rank {r} at {}", ops[r][next[r]]))
                .collect();
            return Err(format!("the schedule deadlocks: {}", stuck.join(", ")));
        }
    }
    let makespan = free.iter().copied().fold(0.0, f64::max);
    Ok(Simulation { makespan, bubble: busy.iter().map(|b| makespan - b).collect(), times })
}

/// The README's bubble formula for `stages` pipeline stages.
pub fn bubble_formula(kind: Kind, stages: usize, t: Timing) -> f64 {
    let pp = stages as f64;
    match kind {
        Kind::OneFOneB => (pp - 1.0) * (t.f + t.b),
        Kind::DualPipe | Kind::DualPipeV => (pp / 2.0 - 1.0) * (t.fb + t.b - 3.0 * t.w),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(ops: &[Vec<Op>]) -> Vec<String> {
        ops.iter().map(|r| r.iter().map(|o| o.to_string()).collect::<Vec<_>>().join(" ")).collect()
    }

    const DUALPIPE_4_8: [&str; 4] = [
        "F0.0 F0.1 F0.2 F1.0 b1.0 W1.0 F1.1 (F0.3|B1.1) (F1.2|B0.0) B1.2 (F1.3|B0.1) B1.3 b0.2 W0.2 b0.3 W0.3",
        "F0.0 F1.0 F0.1 F1.1 F0.2 B1.0 (F1.2|B0.0) (F0.3|B1.1) (F1.3|B0.1) B1.2 B0.2 b1.3 b0.3 W1.3 W0.3",
        "F1.0 F0.0 F1.1 F0.1 F1.2 B0.0 (F0.2|B1.0) (F1.3|B0.1) (F0.3|B1.1) B0.2 B1.2 b0.3 b1.3 W0.3 W1.3",
        "F1.0 F1.1 F1.2 F0.0 b0.0 W0.0 F0.1 (F1.3|B0.1) (F0.2|B1.0) B0.2 (F0.3|B1.1) B0.3 b1.2 W1.2 b1.3 W1.3",
    ];

    #[test]
    fn dualpipe_matches_the_spec_vector_and_dualpipev_is_its_first_half() {
        assert_eq!(text(&generate(Kind::DualPipe, 4, 8).unwrap()), DUALPIPE_4_8);
        assert_eq!(text(&generate(Kind::DualPipeV, 2, 4).unwrap()), DUALPIPE_4_8[..2]);
        // The cut-in-half identity in general: DualPipeV(N, C) = ranks 0..N of DualPipe(2N, 2C).
        for (n, c) in [(2, 6), (3, 6), (4, 8), (4, 12), (8, 16)] {
            let v = text(&generate(Kind::DualPipeV, n, c).unwrap());
            let d = text(&generate(Kind::DualPipe, 2 * n, 2 * c).unwrap());
            assert_eq!(v, d[..n], "DualPipeV({n}, {c})");
        }
    }

    #[test]
    fn every_rank_runs_each_micro_batch_once_per_direction() {
        for (kind, n, c, per_dir, dirs) in
            [(Kind::DualPipe, 8, 20, 10, 2), (Kind::DualPipeV, 4, 9, 9, 2), (Kind::OneFOneB, 4, 7, 7, 1)]
        {
            for ops in generate(kind, n, c).unwrap() {
                for dir in 0..dirs as u8 {
                    let mut f = vec![0; per_dir];
                    let mut b = vec![0; per_dir];
                    let mut w = vec![0; per_dir];
                    let mut zb = vec![0; per_dir];
                    for op in &ops {
                        match *op {
                            Op::F { dir: d, mb } if d == dir => f[mb] += 1,
                            Op::B { dir: d, mb, zb: z } if d == dir => {
                                b[mb] += 1;
                                zb[mb] += usize::from(z);
                            }
                            Op::W { dir: d, mb } if d == dir => w[mb] += 1,
                            Op::FB { f: (fd, fm), b: (bd, bm) } => {
                                if fd == dir {
                                    f[fm] += 1;
                                }
                                if bd == dir {
                                    b[bm] += 1;
                                }
                            }
                            _ => {}
                        }
                    }
                    assert!(f.iter().all(|&x| x == 1) && b.iter().all(|&x| x == 1), "{kind:?}");
                    assert_eq!(w, zb, "{kind:?}: one W per deferred backward");
                }
            }
        }
    }

    #[test]
    fn simulated_bubbles_equal_the_readme_formulas_and_the_anchors() {
        let t = Timing::default();
        for (kind, n, c, makespan, idle) in [
            (Kind::DualPipe, 4, 8, 26.0, 2.0),
            (Kind::DualPipe, 8, 20, 66.0, 6.0),
            (Kind::DualPipe, 16, 32, 110.0, 14.0),
            (Kind::DualPipeV, 4, 10, 66.0, 6.0),
            (Kind::DualPipeV, 8, 20, 134.0, 14.0),
            (Kind::DualPipeV, 4, 9, 60.0, 6.0),
        ] {
            let s = simulate(kind, &generate(kind, n, c).unwrap(), t).unwrap();
            assert_eq!(s.makespan, makespan, "{kind:?}({n}, {c})");
            assert!(s.bubble.iter().all(|&b| b == idle), "{kind:?}({n}, {c}): {:?}", s.bubble);
            let stages = if kind == Kind::DualPipeV { 2 * n } else { n };
            assert_eq!(bubble_formula(kind, stages, t), idle);
        }
        for (n, c) in [(4, 8), (8, 16)] {
            let s = simulate(Kind::OneFOneB, &generate(Kind::OneFOneB, n, c).unwrap(), t).unwrap();
            assert!(s.bubble.iter().all(|&b| b == bubble_formula(Kind::OneFOneB, n, t)), "{:?}", s.bubble);
        }
        // Other timings: the idle time stays within the formula.
        let t2 = Timing { f: 1.0, b: 2.0, w: 0.5, fb: 2.5 };
        let s = simulate(Kind::DualPipe, &generate(Kind::DualPipe, 8, 20).unwrap(), t2).unwrap();
        assert!(s.bubble.iter().all(|&b| b <= bubble_formula(Kind::DualPipe, 8, t2) + 1e-9), "{:?}", s.bubble);
    }

    #[test]
    fn bad_shapes_are_errors_and_a_broken_schedule_deadlocks_in_the_simulator() {
        assert!(generate(Kind::DualPipe, 3, 8).is_err());
        assert!(generate(Kind::DualPipe, 4, 6).is_err());
        assert!(generate(Kind::DualPipeV, 4, 7).is_err());
        let mut ops = generate(Kind::OneFOneB, 2, 2).unwrap();
        ops[1].swap(0, 1); // a backward before its forward
        assert!(simulate(Kind::OneFOneB, &ops, Timing::default()).unwrap_err().contains("deadlock"));
    }
}
