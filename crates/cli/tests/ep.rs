//! Expert-parallel inference, and data-parallel, expert-parallel and pipelined training, under
//! `mpirun` (feature `mpi`).
//! Inference: generation and scores are
//! bit-identical to one process, with static placement and with redundant replicas re-placed
//! by EPLB while generating, and with attention data-parallel (a server per process).
#![cfg(feature = "mpi")]

use std::process::Command;

/// `mpirun`, oversubscribing the cores, under a time limit: a hang fails the test instead of the
/// whole run.
fn mpirun() -> Command {
    let mut c = Command::new("timeout");
    c.args(["600", "mpirun", "--allow-run-as-root", "--oversubscribe"]);
    c
}

fn run(np: Option<&str>, args: &[&str]) -> String {
    run_with(np, args, &[])
}

fn run_with(np: Option<&str>, args: &[&str], ep: &[&str]) -> String {
    let exe = env!("CARGO_BIN_EXE_dsv3");
    let out = match np {
        None => Command::new(exe).args(args).output().unwrap(),
        Some(n) => mpirun().args(["-np", n, exe]).args(args).arg("--expert-parallel").args(ep).output().unwrap(),
    };
    assert!(out.status.success(), "{np:?} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn experts_split_over_processes_change_no_bit() {
    let dir = std::env::temp_dir().join(format!("dsv3-ep-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    run(None, &["random-model", "--preset", "tiny", "--dtype", "fp8", "--out", d, "--seed", "5"]);
    let gen = [
        "generate",
        "--model",
        d,
        "--prompt-ids",
        "5,9,13,17,21,25,29,33,37,41",
        "--max-new-tokens",
        "10",
        "--ignore-eos",
        "--json",
    ];
    let score = ["score", "--model", d, "--ids", "3,1,4,1,5,9,2,6,5,3,5", "--mtp", "--json"];
    let (g1, s1) = (run(None, &gen), run(None, &score));
    let ids = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["output_ids"].clone();
    for n in ["2", "4"] {
        assert_eq!(ids(&run(Some(n), &gen)), ids(&g1), "{n} processes: generated tokens");
        assert_eq!(run(Some(n), &score), s1, "{n} processes: log-probs bit for bit");
        // Redundant replicas (pairs split by token) and EPLB re-placement every 2 batches while
        // generating: still the same tokens.
        let eplb = ["--redundant-experts", "4", "--rebalance-every", "2"];
        assert_eq!(ids(&run_with(Some(n), &gen, &eplb)), ids(&g1), "{n} processes with EPLB");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `serve --expert-parallel --data-parallel`: each process serves its own port (P + 1 + rank),
/// its attention on its own requests, the experts split over both; rank 0 relays connections to
/// P to them in turn. Concurrent greedy requests through P continue as one process generates,
/// both servers answer some, and both report the placement's load imbalance.
#[test]
fn data_parallel_attention_serves_from_every_process() {
    let dir = std::env::temp_dir().join(format!("dsv3-ep-serve-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    run(None, &["random-model", "--preset", "tiny", "--dtype", "fp8", "--out", d, "--seed", "6"]);
    let prompts = ["5,9,13,17,21", "3,1,4,1,5,9,2,6", "7,7,7", "100,200,300,400", "11,22"];
    let want: Vec<Vec<u64>> = prompts
        .iter()
        .map(|p| {
            let out = run(
                None,
                &["generate", "--model", d, "--prompt-ids", p, "--max-new-tokens", "12", "--ignore-eos", "--json"],
            );
            serde_json::from_str::<serde_json::Value>(&out).unwrap()["output_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect()
        })
        .collect();
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    let port = (20000 + (std::process::id() % 20000) as u16..60000).find(|&p| (p..p + 3).all(free)).unwrap();
    let exe = env!("CARGO_BIN_EXE_dsv3");
    let mut server = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            "2",
            exe,
            "serve",
            "--model",
            d,
            "--port",
            &port.to_string(),
        ])
        .args(["--expert-parallel", "--data-parallel", "--redundant-experts", "2", "--rebalance-every", "3"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Port `port + i`: the front (0), rank 0's server (1), rank 1's (2).
    let url = |i: u16, path: &str| format!("http://127.0.0.1:{}{path}", port + i);
    let up = |i| {
        (0..600).any(|_| {
            ureq::get(&url(i, "/health")).call().is_ok() || {
                std::thread::sleep(std::time::Duration::from_millis(100));
                false
            }
        })
    };
    assert!(up(1) && up(2) && up(0), "both processes serve, and the front relays");
    let got: Vec<Vec<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (url, ids) =
                    (url(0, "/v1/completions"), p.split(',').map(|x| x.parse::<u32>().unwrap()).collect::<Vec<_>>());
                s.spawn(move || {
                    let v: serde_json::Value = ureq::post(&url)
                        .send_json(serde_json::json!({"prompt": ids, "max_tokens": 12, "temperature": 0}))
                        .unwrap()
                        .into_json()
                        .unwrap();
                    v["choices"][0]["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for rank in [0, 1] {
        let m = ureq::get(&url(1 + rank, "/metrics")).call().unwrap().into_string().unwrap();
        assert!(m.contains("dsv3_ep_rank_load_imbalance{placement=\"static\"}"), "rank {rank} /metrics: {m}");
        let served: u64 =
            m.lines().find_map(|l| l.strip_prefix("dsv3_requests_total ")).and_then(|v| v.parse().ok()).unwrap();
        assert!(served >= 1, "rank {rank} served no request through the front");
    }
    // SIGINT to each server (mpirun would kill them on its own): each drains, then serves
    // experts until the other is done too, and both exit cleanly.
    Command::new("pkill").args(["-INT", "-P", &server.id().to_string()]).status().unwrap();
    let status = (0..600).find_map(|_| {
        server.try_wait().unwrap().or_else(|| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            None
        })
    });
    let Some(status) = status else {
        server.kill().ok();
        panic!("the servers did not stop within 60 s of SIGINT");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut server.stderr.take().unwrap(), &mut stderr).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        // The server stops at an end-of-sequence token; `generate --ignore-eos` goes on.
        assert!(!g.is_empty() && w.starts_with(g), "prompt {i}: served {g:?}, one process {w:?}");
    }
    assert!(status.success(), "{stderr}");
}

#[test]
fn data_parallel_training_equals_one_process_up_to_summation_order() {
    remove(parallel_training_matches("2", 4, &["--data-parallel"]));
}

fn remove((a, b): (std::path::PathBuf, std::path::PathBuf)) {
    std::fs::remove_dir_all(a).ok();
    std::fs::remove_dir_all(b).ok();
}

#[test]
fn expert_parallel_training_equals_one_process_and_saves_every_expert() {
    let (one, two) = parallel_training_matches("2", 4, &["--expert-parallel"]);
    // Rank 0 gathered the experts the other process trained: the checkpoint scores as one
    // process's does.
    let score = |d: &std::path::Path| -> f64 {
        let out = run(None, &["score", "--model", d.to_str().unwrap(), "--ids", "3,1,4,1,5,9,2,6,5,3,5", "--json"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["nll"].as_f64().unwrap()
    };
    let (a, b) = (score(&one), score(&two));
    assert!((a - b).abs() <= 1e-5 * a.abs(), "NLL {a} vs {b}");
    remove((one, two));
}

#[test]
fn pipelined_training_equals_one_process_for_every_schedule() {
    for kind in ["dualpipe", "dualpipev", "1f1b"] {
        remove(parallel_training_matches("2", 4, &["--pipeline", kind, "--chunks", "4"]));
    }
    // Two data-parallel pipelines of two processes, and the same splitting the routed experts
    // between the pipelines.
    remove(parallel_training_matches("4", 8, &["--pipeline", "dualpipe", "--pp", "2", "--chunks", "4"]));
    remove(parallel_training_matches(
        "4",
        8,
        &["--pipeline", "dualpipev", "--pp", "2", "--chunks", "4", "--expert-parallel"],
    ));
}

/// A fixed training corpus (pseudo-random words from a fixed seed): the comparisons below then
/// depend on the code alone, not on the built-in corpus (the repository's own text, which every
/// edit changes — and with it which tiny gradients AdamW's first steps turn into ±lr).
fn corpus() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(write_corpus).clone()
}

fn write_corpus() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dsv3-ep-corpus-{}", std::process::id()));
    {
        std::fs::create_dir_all(&dir).unwrap();
        let words = [
            "fn", "let", "mut", "expert", "token", "layer", "router", "latent", "cache", "(", ")", "{", "}", ";", "=",
            "+", "0", "1", "x", "y",
        ];
        let mut state = 12345u64;
        for f in 0..40 {
            let text: String = (0..3000)
                .map(|i| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let w = words[(state >> 33) as usize % words.len()];
                    if i % 12 == 11 {
                        format!("{w}\n")
                    } else {
                        format!("{w} ")
                    }
                })
                .collect();
            std::fs::write(dir.join(format!("d{f}.txt")), text).unwrap();
        }
    }
    dir
}

/// 3 steps of the tiny preset (f32 GEMMs) on `np` processes with `mode`, against one process;
/// returns both output folders.
fn parallel_training_matches(np: &str, batch: usize, mode: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let out =
        |tag: &str| std::env::temp_dir().join(format!("dsv3-dp-{tag}-{np}{}-{}", mode.join(""), std::process::id()));
    let batch = batch.to_string();
    let data = corpus();
    let args = |o: &std::path::Path| -> Vec<String> {
        [
            "train",
            "--data",
            data.to_str().unwrap(),
            "--preset",
            "tiny",
            "--steps",
            "3",
            "--batch-size",
            &batch,
            "--seq-len",
            "64",
            "--precision",
            "f32",
            "--no-sample",
            "--json",
            "--out",
            o.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (one, two) = (out("one"), out("two"));
    let a1: Vec<String> = args(&one);
    let a2: Vec<String> = args(&two);
    let single = run(None, &a1.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let exe = env!("CARGO_BIN_EXE_dsv3");
    let o = mpirun().args(["-np", np, exe]).args(&a2).args(mode).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let parallel = String::from_utf8(o.stdout).unwrap();
    let steps = |s: &str| -> Vec<serde_json::Value> {
        s.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("loss").is_some())
            .collect()
    };
    let (s1, s2) = (steps(&single), steps(&parallel));
    assert_eq!(s1.len(), 3);
    assert_eq!(s1.len(), s2.len(), "only rank 0 logs");
    // The first step's expert loads are the global counts, equal exactly.
    assert_eq!(s1[0]["expert_load"], s2[0]["expert_load"]);
    for (a, b) in s1.iter().zip(&s2) {
        for key in ["loss", "grad_norm"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-6 * x.abs(), "{mode:?} step {} {key}: {x} vs {y}", a["step"]);
        }
    }
    let (v1, v2) = (s1[2]["val_loss"].as_f64().unwrap(), s2[2]["val_loss"].as_f64().unwrap());
    // After three AdamW updates (which turn gradients a rounding apart into steps of ±lr where they
    // are tiny), validation agrees to ~1e-5; a wrong update moves it by 1e-2.
    assert!((v1 - v2).abs() <= 1e-4 * v1.abs(), "{mode:?} validation {v1} vs {v2}");
    assert!(two.join("model.safetensors").exists());
    (one, two)
}

/// ZeRO-1 updates each parameter once, on its owner, with the same arithmetic: checkpoints equal
/// plain data parallelism's byte for byte (also with expert parallelism, and across a resume
/// that gathers and re-splits the moments).
#[test]
fn zero1_is_bit_identical_to_plain_data_parallelism() {
    let dir = |tag: &str| std::env::temp_dir().join(format!("dsv3-zero1-{tag}-{}", std::process::id()));
    let train = |out: &std::path::Path, extra: &[&str]| {
        let exe = env!("CARGO_BIN_EXE_dsv3");
        let args = [
            "train",
            "--preset",
            "tiny",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--no-sample",
            "--json",
            "--out",
            out.to_str().unwrap(),
        ];
        let o = mpirun().args(["-np", "2", exe]).args(args).args(extra).output().unwrap();
        assert!(o.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let same = |a: &std::path::Path, b: &std::path::Path| {
        for f in ["model.safetensors", "optimizer.safetensors"] {
            assert!(
                std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
                "{f}: {} vs {}",
                a.display(),
                b.display()
            );
        }
    };
    for mode in ["--data-parallel", "--expert-parallel"] {
        let (plain, zero) = (dir(&format!("plain{mode}")), dir(&format!("zero{mode}")));
        train(&plain, &[mode]);
        train(&zero, &[mode, "--zero1", "--stop-at", "2"]);
        train(&zero, &[mode, "--zero1", "--resume", zero.to_str().unwrap()]);
        same(&plain, &zero);
        remove((plain, zero));
    }
}
