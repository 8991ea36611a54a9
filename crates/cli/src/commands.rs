//! The subcommands that run a model: generate, chat, score, tokenize, random-model, demo.

use crate::Sampling;
use anyhow::{bail, Context, Result};
use dsv3_model::generate::{generate as run_generate, score as run_score, GenerateOptions};
use dsv3_model::init::{preset, write_random_checkpoint, StoreDtype};
use dsv3_model::sampling::{Sampler, SamplingParams};
use dsv3_model::{DeepseekV3, Tokenizer};
use serde_json::json;
use std::io::{BufRead, Write};
use std::path::Path;

/// The model of a folder; with `--expert-parallel`, its routed experts split over the processes.
pub fn load_model(dir: &Path) -> Result<std::sync::Arc<DeepseekV3>> {
    if !dir.is_dir() {
        bail!("--model {}: not a folder (a Hugging Face model folder with config.json and safetensors)", dir.display());
    }
    #[cfg(feature = "mpi")]
    if EXPERT_PARALLEL.load(std::sync::atomic::Ordering::Relaxed) {
        return crate::ep::load(dir);
    }
    let model = DeepseekV3::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    Ok(std::sync::Arc::new(model))
}

#[cfg(feature = "mpi")]
static EXPERT_PARALLEL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `/metrics` lines of expert parallelism: per-rank load imbalance (max/mean pairs per rank) of
/// the last placement window, with the placement in force and with the static one.
pub fn ep_metrics() -> Option<dsv3_serve::MetricsHook> {
    #[cfg(feature = "mpi")]
    if EXPERT_PARALLEL.load(std::sync::atomic::Ordering::Relaxed) {
        return Some(dsv3_serve::MetricsHook(std::sync::Arc::new(|| {
            let (now, stat) = crate::ep::imbalance().unwrap_or((1.0, 1.0));
            format!(
                "# HELP dsv3_ep_rank_load_imbalance Max/mean routed pairs per expert-parallel rank over the last placement window.\n\
                 # TYPE dsv3_ep_rank_load_imbalance gauge\n\
                 dsv3_ep_rank_load_imbalance{{placement=\"current\"}} {now}\n\
                 dsv3_ep_rank_load_imbalance{{placement=\"static\"}} {stat}\n"
            )
        })));
    }
    None
}

/// What a command asks of the MPI processes it runs in.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub struct Parallel<'a> {
    pub expert: bool,
    pub data: bool,
    pub pipeline: Option<&'a str>,
    pub chunks: Option<usize>,
    /// The command is `dsv3 train`, with its `--pp`.
    pub train: Option<Option<usize>>,
    /// The command is `dsv3 serve`.
    pub serve: bool,
    pub redundant: usize,
    pub rebalance_every: usize,
}

/// `--expert-parallel` / `--data-parallel` / `--pipeline`: MPI up, and every rank but 0 silent
/// on stdout.
pub fn start_parallel(p: Parallel) -> Result<()> {
    let pp = p.train.flatten();
    if pp.is_some() && p.pipeline.is_none() {
        bail!("--pp needs --pipeline");
    }
    if p.train.is_none() && p.pipeline.is_some() {
        bail!("--pipeline is for dsv3 train");
    }
    if p.train.is_none() && p.data && !(p.serve && p.expert) {
        bail!("--data-parallel is for dsv3 train, and for dsv3 serve with --expert-parallel");
    }
    #[cfg(feature = "mpi")]
    {
        use crate::ep::Training;
        let kind = match p.pipeline {
            None => None,
            Some("1f1b") => Some(dsv3_dist::schedule::Kind::OneFOneB),
            Some("dualpipe") => Some(dsv3_dist::schedule::Kind::DualPipe),
            Some("dualpipev") => Some(dsv3_dist::schedule::Kind::DualPipeV),
            Some(k) => bail!("--pipeline {k}: 1f1b, dualpipe or dualpipev"),
        };
        let (rank, ranks) = crate::ep::init(crate::ep::Options {
            inference: p.expert && p.train.is_none(),
            data_parallel: p.data,
            redundant: p.redundant,
            rebalance_every: p.rebalance_every,
        })?;
        if p.train.is_some() {
            let how = match kind {
                Some(kind) => {
                    let stages = pp.unwrap_or(ranks);
                    if stages == 0 || !ranks.is_multiple_of(stages) {
                        bail!("--pp {stages}: not a divisor of the {ranks} processes (mpirun -np D·P runs D data-parallel pipelines of P)");
                    }
                    Training::Pipeline { kind, chunks: p.chunks.unwrap_or(2 * stages), stages, experts: p.expert }
                }
                None if p.expert => Training::ExpertParallel,
                None => Training::DataParallel,
            };
            crate::ep::training(how)?;
        } else if p.expert {
            EXPERT_PARALLEL.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if rank != 0 {
            // SAFETY: plain POSIX calls on descriptors this process owns; stdout becomes /dev/null.
            unsafe {
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
                if null >= 0 {
                    libc::dup2(null, 1);
                    libc::close(null);
                }
            }
        }
        Ok(())
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = p;
        bail!("--expert-parallel, --data-parallel and --pipeline need a build with MPI: cargo build --release --features dsv3-cli/mpi (OpenMPI and clang installed)")
    }
}

/// `1,2,3` → ids. Every entry must be a token id: `1,,2` or a trailing comma is an error, not
/// `[1, 2]`.
fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .enumerate()
        .map(|(i, x)| match x.trim() {
            "" => bail!("token id list `{s}`: entry {} is empty", i + 1),
            x => x.parse::<u32>().with_context(|| format!("token id list: `{x}` (entry {}) is not a token id", i + 1)),
        })
        .collect()
}

/// End-of-sequence ids: generation_config.json, else config.json, else the tokenizer's EOS.
fn eos_ids(dir: &Path, model: &DeepseekV3, tok: Option<&Tokenizer>) -> Vec<u32> {
    let from_gen = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| match v.get("eos_token_id")? {
            serde_json::Value::Number(n) => Some(vec![n.as_u64()? as u32]),
            serde_json::Value::Array(a) => a.iter().map(|x| x.as_u64().map(|v| v as u32)).collect(),
            _ => None,
        });
    from_gen
        .or_else(|| (!model.config.eos_token_ids.is_empty()).then(|| model.config.eos_token_ids.clone()))
        .or_else(|| tok.and_then(|t| t.eos_token.as_deref().and_then(|e| t.token_id(e))).map(|e| vec![e]))
        .unwrap_or_default()
}

fn options(s: &Sampling, eos: Vec<u32>) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: s.max_new_tokens,
        sampling: SamplingParams { temperature: s.temperature, top_p: s.top_p, top_k: s.top_k, seed: s.seed },
        eos_token_ids: eos,
        ignore_eos: s.ignore_eos,
        mtp_speculative: 0,
    }
}

fn check_sampling(s: &Sampling) -> Result<()> {
    if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
        bail!("--temperature must be a finite number ≥ 0");
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    Ok(())
}

/// Prints text as ids arrive: decodes everything so far and writes what is new (byte-level BPE
/// pieces only make sense together).
struct Streamer<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl Streamer<'_> {
    fn push(&mut self, id: u32) {
        self.ids.push(id);
        if let Ok(text) = self.tok.decode(&self.ids, true) {
            // Hold back an incomplete UTF-8 sequence (shown as U+FFFD) until it completes.
            if text.len() > self.printed && !text.ends_with('\u{FFFD}') {
                print!("{}", &text[self.printed..]);
                let _ = std::io::stdout().flush();
                self.printed = text.len();
            }
        }
    }
}

pub fn generate(
    dir: &Path,
    prompt: Option<&str>,
    prompt_ids: Option<&str>,
    s: &Sampling,
    mtp_speculative: usize,
    json_out: bool,
) -> Result<()> {
    check_sampling(s)?;
    let model = load_model(dir)?;
    let tok = if dir.join("tokenizer.json").exists() { Some(Tokenizer::from_dir(dir)?) } else { None };
    let ids = match (prompt, prompt_ids) {
        (_, Some(p)) => parse_ids(p)?,
        (Some(p), None) => tok
            .as_ref()
            .context("--prompt needs tokenizer.json in the model folder (or use --prompt-ids)")?
            .encode(p, true)?,
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let opts = GenerateOptions { mtp_speculative, ..options(s, eos_ids(dir, &model, tok.as_ref())) };
    let mut streamer = tok.as_ref().filter(|_| !json_out).map(|t| Streamer { tok: t, ids: vec![], printed: 0 });
    let (out, stats) = run_generate(&model, &ids, &opts, |id| {
        if let Some(st) = streamer.as_mut() {
            st.push(id)
        }
    })?;
    let text = match &tok {
        Some(t) => t.decode(&out, true)?,
        None => String::new(),
    };
    if json_out {
        println!("{}", json!({"prompt_ids": ids, "output_ids": out, "text": text, "stats": stats}));
    } else {
        if tok.is_none() {
            println!("{}", out.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        } else {
            println!();
        }
        eprintln!(
            "[{} prompt tokens, {:.1} tok/s prefill; {} new tokens, {:.1} tok/s decode]",
            stats.prompt_tokens,
            stats.prefill_tokens_per_second,
            stats.generated_tokens,
            stats.decode_tokens_per_second
        );
        if stats.finish_reason == "length" && out.len() < s.max_new_tokens {
            eprintln!("[stopped at the context window of {} tokens]", model.config.max_position_embeddings);
        }
        if let (Some(rate), Some(len)) = (stats.acceptance_rate, stats.mean_accepted_length) {
            eprintln!(
                "[MTP speculative: {:.1}% of {} drafts accepted, {len:.2} tokens per verifying forward]",
                100.0 * rate,
                stats.draft_tokens
            );
        }
    }
    Ok(())
}

pub fn chat(dir: &Path, system: Option<&str>, s: &Sampling) -> Result<()> {
    check_sampling(s)?;
    let model = load_model(dir)?;
    let tok = Tokenizer::from_dir(dir)?;
    if !tok.has_chat_template() {
        bail!("{}: tokenizer_config.json has no chat_template", dir.display());
    }
    let opts = options(s, eos_ids(dir, &model, Some(&tok)));
    let mut messages = vec![];
    if let Some(sys) = system {
        messages.push(json!({"role": "system", "content": sys}));
    }
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut cache = model.new_cache();
    let mut cached: Vec<u32> = vec![];
    let d = model.config.hidden_size;
    eprintln!("chat: type a message and press Enter; an empty line or Ctrl-D ends.");
    let stdin = std::io::stdin();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(json!({"role": "user", "content": line.trim_end()}));
        let ids = tok.encode_chat(&serde_json::Value::Array(messages.clone()), true)?;
        // A turn that does not fit the context is refused; the conversation so far is kept.
        let budget = match dsv3_model::generate::new_token_budget(&model, ids.len(), opts.max_new_tokens) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("error: {e}; this message was not sent (shorter, or start a new chat)");
                messages.pop();
                continue;
            }
        };
        // Reuse the cache for the prefix this turn shares with what it holds.
        let common = cached.iter().zip(&ids).take_while(|(a, b)| a == b).count().min(ids.len() - 1);
        cache.truncate(common);
        cached.truncate(common);
        let h = model.forward(&ids[common..], &mut cache)?;
        cached.extend_from_slice(&ids[common..]);
        let mut logits = model.logits(&h[(ids.len() - common - 1) * d..], 1);
        let mut st = Streamer { tok: &tok, ids: vec![], printed: 0 };
        for _ in 0..budget {
            let t = sampler.sample(&logits);
            if !opts.ignore_eos && opts.eos_token_ids.contains(&t) {
                break;
            }
            st.push(t);
            let h = model.forward(&[t], &mut cache)?;
            cached.push(t);
            logits = model.logits(&h, 1);
        }
        println!();
        messages.push(json!({"role": "assistant", "content": tok.decode(&st.ids, true)?}));
    }
    Ok(())
}

pub fn score(
    dir: &Path,
    ids: Option<&str>,
    text: Option<&str>,
    file: Option<&Path>,
    top_k: usize,
    mtp: bool,
    json_out: bool,
) -> Result<()> {
    let model = load_model(dir)?;
    let toks = match (ids, text, file) {
        (Some(i), _, _) => parse_ids(i)?,
        (None, Some(t), _) => Tokenizer::from_dir(dir)?.encode(t, true)?,
        (None, None, Some(f)) => {
            let t = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            Tokenizer::from_dir(dir)?.encode(&t, true)?
        }
        _ => bail!("give --ids, --text or --file"),
    };
    let s = run_score(&model, &toks, mtp, top_k)?;
    if json_out {
        let top: Vec<Vec<serde_json::Value>> =
            s.top.iter().map(|row| row.iter().map(|(id, lp)| json!({"id": id, "logprob": lp})).collect()).collect();
        let mut out = json!({"ids": toks, "logprobs": s.logprobs, "top": top, "nll": s.nll, "ppl": s.ppl});
        if mtp {
            out["mtp_logprobs"] = json!(s.mtp_logprobs);
        }
        println!("{out}");
    } else {
        for (i, lp) in s.logprobs.iter().enumerate() {
            print!("{:>6} → {:>6}  logprob {lp:>9.4}", toks[i], toks[i + 1]);
            if let Some(m) = s.mtp_logprobs.get(i) {
                print!("   mtp(+2) {m:>9.4}");
            }
            println!();
        }
        println!("nll {:.4}  ppl {:.3}", s.nll, s.ppl);
    }
    Ok(())
}

pub fn tokenize(
    dir: &Path,
    text: Option<&str>,
    chat: Option<&Path>,
    add_generation_prompt: bool,
    json_out: bool,
) -> Result<()> {
    let tok = Tokenizer::from_dir(dir)?;
    let (ids, text) = match (text, chat) {
        (Some(t), _) => (tok.encode(t, true)?, t.to_string()),
        (None, Some(f)) => {
            let raw = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let messages: serde_json::Value =
                serde_json::from_str(&raw).with_context(|| format!("{}: not JSON", f.display()))?;
            let rendered = tok.apply_chat_template(&messages, add_generation_prompt)?;
            (tok.encode(&rendered, false)?, rendered)
        }
        _ => bail!("give --text or --chat"),
    };
    if json_out {
        println!("{}", json!({"ids": ids, "text": text}));
    } else {
        println!("{}", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" "));
    }
    Ok(())
}

fn config_for(preset_name: &str) -> Result<serde_json::Value> {
    match preset(preset_name) {
        Some(v) => Ok(v),
        None => {
            let p = Path::new(preset_name);
            let text = std::fs::read_to_string(p).with_context(|| {
                format!("`{preset_name}` is neither a preset (tiny, bench-1b) nor a readable config.json")
            })?;
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", p.display()))
        }
    }
}

pub fn random_model(preset_name: &str, dtype: &str, out: &Path, seed: u64) -> Result<()> {
    let dtype = match dtype {
        "f32" => StoreDtype::F32,
        "bf16" => StoreDtype::Bf16,
        "fp8" => StoreDtype::Fp8,
        d => bail!("--dtype {d}: expected f32, bf16 or fp8"),
    };
    write_random_checkpoint(out, &config_for(preset_name)?, dtype, seed)?;
    eprintln!("wrote a random {} ({dtype:?}) to {}", preset_name, out.display());
    Ok(())
}

/// The README's main job: a small random DeepSeek-V3 (MLA, group-limited MoE, MTP), written as an
/// FP8 checkpoint, loaded back, used to generate, then benchmarked.
/// The built-in default (the README's first command): train the tiny preset on dsv3's own sources
/// with every technique on, generate from the result, and benchmark it. No downloads.
pub fn demo() -> Result<()> {
    use clap::Parser;
    #[derive(Parser)]
    struct Defaults {
        #[command(flatten)]
        train: crate::train::TrainCli,
    }
    println!(
        "dsv3 demo: trains a tiny DeepSeek-V3 (MLA, DeepSeekMoE with aux-loss-free balancing, MTP) on dsv3's own sources, \
         then generates from it and benchmarks it (a minute or two on 2 cores)"
    );
    let d = Defaults::parse_from(["demo", "--out", "runs/demo"]);
    crate::train::run(&d.train)?;
    crate::bench::run(&crate::bench::BenchArgs {
        model: d.train.out.clone(),
        prompt_len: 64,
        gen: 32,
        mtp_speculative: 1,
        json: false,
    })
}

/// A greedy continuation and a speculative run from a trained model folder (after `dsv3 train`).
pub fn sample(dir: &Path) -> Result<()> {
    let model = load_model(dir)?;
    let tok = Tokenizer::from_dir(dir)?;
    let prompt = "fn main() {";
    let ids = tok.encode(prompt, false)?;
    let sampled = GenerateOptions {
        max_new_tokens: 48,
        sampling: SamplingParams { temperature: 0.7, top_p: 0.9, top_k: 0, seed: 0 },
        eos_token_ids: vec![1],
        ignore_eos: false,
        mtp_speculative: 0,
    };
    let (out, _) = run_generate(&model, &ids, &sampled, |_| {})?;
    println!("sample (temperature 0.7, top-p 0.9): {prompt}{}", tok.decode(&out, true)?);
    // Speculative against plain greedy decoding on the same prompt: same tokens, and the
    // acceptance of the trained MTP module.
    let mut opts = GenerateOptions { sampling: SamplingParams::default(), ..sampled };
    let (out, plain) = run_generate(&model, &ids, &opts, |_| {})?;
    if !model.mtp.is_empty() {
        opts.mtp_speculative = 1;
        let (spec_out, spec) = run_generate(&model, &ids, &opts, |_| {})?;
        println!(
            "MTP speculative decoding: {:.1}% of drafts accepted, {:.2} tokens per forward, {:.1} vs {:.1} tok/s plain (same tokens: {})",
            100.0 * spec.acceptance_rate.unwrap_or(0.0),
            spec.mean_accepted_length.unwrap_or(0.0),
            spec.decode_tokens_per_second,
            plain.decode_tokens_per_second,
            spec_out == out
        );
    }
    Ok(())
}

pub fn convert(from: &Path, to: &Path, format: &str, max_memory: &str, json: bool) -> Result<()> {
    use dsv3_kernels::quant::Fp4Kind;
    use dsv3_model::convert::Target;
    let target = match format {
        "fp8" => Target::Fp8,
        "bf16" => Target::Bf16,
        "f32" => Target::F32,
        "fp4" | "nvfp4" => Target::Fp4(Fp4Kind::Nv),
        "mxfp4" => Target::Fp4(Fp4Kind::Mx),
        f => bail!("--format {f}: fp8, bf16, f32, fp4 (NVFP4) or mxfp4"),
    };
    let budget = parse_size(max_memory).context("--max-memory")?;
    let t = std::time::Instant::now();
    let r = dsv3_model::convert::convert(from, to, target, budget)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "converted {} tensors in {} files to {format} in {:.1}s: {:.1} MB → {:.1} MB, peak buffers {:.1} MB (budget {max_memory})",
            r.tensors,
            r.files,
            t.elapsed().as_secs_f64(),
            r.bytes_in as f64 / 1e6,
            r.bytes_out as f64 / 1e6,
            r.peak_buffer_bytes as f64 / 1e6
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn schedule(kind: &str, pp: usize, chunks: usize, f: f64, b: f64, w: f64, fb: f64, json: bool) -> Result<()> {
    use dsv3_dist::schedule::{bubble_formula, generate, simulate, Kind, Timing};
    let k = match kind {
        "1f1b" => Kind::OneFOneB,
        "dualpipe" => Kind::DualPipe,
        "dualpipev" => Kind::DualPipeV,
        other => bail!("--kind {other}: 1f1b, dualpipe or dualpipev"),
    };
    if [f, b, w, fb].iter().any(|x| !x.is_finite() || *x < 0.0) || w > b {
        bail!("--f/--b/--w/--fb must be non-negative, with --w at most --b");
    }
    let t = Timing { f, b, w, fb };
    let ops = generate(k, pp, chunks).map_err(|e| anyhow::anyhow!("{e}"))?;
    let sim = simulate(k, &ops, t).map_err(|e| anyhow::anyhow!("{e}"))?;
    let stages = if k == Kind::DualPipeV { 2 * pp } else { pp };
    let ranks: Vec<Vec<String>> = ops.iter().map(|r| r.iter().map(|o| o.to_string()).collect()).collect();
    if json {
        println!(
            "{}",
            serde_json::json!({"ranks": ranks, "makespan": sim.makespan, "bubble": sim.bubble, "formula": bubble_formula(k, stages, t)})
        );
    } else {
        for (r, ops) in ranks.iter().enumerate() {
            println!("rank {r}: {}", ops.join(" "));
        }
        println!(
            "makespan {} ; bubble per rank {:?} ; formula {}",
            sim.makespan,
            sim.bubble,
            bubble_formula(k, stages, t)
        );
    }
    Ok(())
}

pub fn eplb(load: &Path, replicas: usize, groups: usize, nodes: usize, gpus: usize, json: bool) -> Result<()> {
    use dsv3_dist::eplb::{imbalance, rebalance_experts};
    let text = std::fs::read_to_string(load).with_context(|| format!("reading {}", load.display()))?;
    let weight: Vec<Vec<f64>> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected [[load per logical expert] per layer]", load.display()))?;
    let p = rebalance_experts(&weight, replicas, groups, nodes, gpus).map_err(|e| anyhow::anyhow!("eplb: {e}"))?;
    if json {
        println!("{}", serde_json::to_string(&p)?);
        return Ok(());
    }
    // Without replicas: expert e on GPU e / (E / gpus) when the experts divide evenly.
    let e = weight[0].len();
    for (l, w) in weight.iter().enumerate() {
        let before = e.is_multiple_of(gpus).then(|| {
            let per = e / gpus;
            imbalance(&(0..gpus).map(|g| w[g * per..(g + 1) * per].iter().sum()).collect::<Vec<f64>>())
        });
        let after = imbalance(&p.loads(l, w, gpus));
        match before {
            Some(b) => println!(
                "layer {l}: GPU load max/mean {b:.3} with experts in order → {after:.3} placed with {replicas} slots"
            ),
            None => println!("layer {l}: GPU load max/mean {after:.3} placed with {replicas} slots"),
        }
    }
    Ok(())
}

/// `512M`, `2G`, `1048576` → bytes.
fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let (num, mul) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num.parse().map_err(|_| anyhow::anyhow!("{s}: a size like 512M or 2G"))?;
    let bytes = v * mul as f64;
    if bytes.is_nan() || bytes < 1.0 {
        bail!("{s}: a size must be at least one byte");
    }
    if bytes > (1u64 << 60) as f64 {
        bail!("{s}: larger than any machine (at most 1024P)");
    }
    Ok(bytes as usize)
}

/// `dsv3 serve`'s connection limits from its flags.
pub fn http_limits(
    header_timeout: f64,
    body_timeout: f64,
    max_connections: usize,
) -> Result<dsv3_serve::http::HttpLimits> {
    let secs = |flag: &str, v: f64| {
        if v.is_finite() && v > 0.0 && v <= 86_400.0 {
            Ok(std::time::Duration::from_secs_f64(v))
        } else {
            bail!("{flag} {v}: seconds in (0, 86400]")
        }
    };
    if max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    Ok(dsv3_serve::http::HttpLimits {
        header_timeout: secs("--header-timeout", header_timeout)?,
        body_timeout: secs("--body-timeout", body_timeout)?,
        max_connections,
        ..Default::default()
    })
}

pub fn serve(dir: &Path, mut o: dsv3_serve::ServeOptions, kv_memory: &str) -> Result<()> {
    o.kv_memory = parse_size(kv_memory).context("--kv-memory")?;
    let mtp_speculative = o.mtp_speculative;
    let model = load_model(dir)?;
    #[cfg(feature = "mpi")]
    let front = crate::ep::data_parallel_serve(&o.host, &mut o.port)?;
    #[cfg(not(feature = "mpi"))]
    let front: Option<(u16, Vec<String>)> = None;
    if mtp_speculative > 0 && model.mtp.is_empty() {
        bail!("--mtp-speculative: {} has no MTP module", dir.display());
    }
    if mtp_speculative >= dsv3_model::mla::MAX_ABSORBED_TOKENS {
        bail!(
            "--mtp-speculative {mtp_speculative}: at most {} drafts per step",
            dsv3_model::mla::MAX_ABSORBED_TOKENS - 1
        );
    }
    let tok = if dir.join("tokenizer.json").exists() { Some(Tokenizer::from_dir(dir)?) } else { None };
    let eos = eos_ids(dir, &model, tok.as_ref());
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "dsv3".into());
    let (state, engine) = dsv3_serve::build(&name, model, tok, eos, &o);
    let addr: std::net::SocketAddr = format!("{}:{}", o.host, o.port).parse().context("--host/--port")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let c = &state.engine.config;
    eprintln!(
        "dsv3 serve: {} on http://{addr} (max batch {}, KV budget {} blocks of 64 positions = {} tokens per request at most{})",
        dir.display(),
        o.max_batch,
        c.kv_blocks,
        c.kv_tokens,
        if c.prefix_cache { ", prefix cache on" } else { "" }
    );
    if let Some((port, backends)) = front {
        let at: std::net::SocketAddr = format!("{}:{port}", o.host).parse().context("--host/--port")?;
        let listener = rt.block_on(tokio::net::TcpListener::bind(at)).with_context(|| format!("binding {at}"))?;
        eprintln!("dsv3 serve: http://{at} relays connections to {} in turn", backends.join(", "));
        rt.spawn(dsv3_serve::front::round_robin(listener, backends));
    }
    rt.block_on(dsv3_serve::serve(state, addr, async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("dsv3 serve: shutting down after in-flight requests");
    }))?;
    drop(rt);
    let _ = engine.join();
    Ok(())
}
