//! `dsv3 serve`: the OpenAI-compatible server over a model; under `--expert-parallel` rank 0
//! serves (or, with `--data-parallel`, every rank on `--port + 1 + rank`, rank 0 relaying
//! connections to `--port` to them in turn).

use crate::args::ModelArgs;
use crate::cluster::Cluster;
use crate::load::{eos_ids, load, parse_size, tokenizer};
use anyhow::{bail, Context, Result};

/// An OpenAI-compatible server (completions, chat, streaming, continuous batching).
#[derive(clap::Args)]
pub struct Serve {
    #[command(flatten)]
    pub model: ModelArgs,
    /// With --expert-parallel: attention data-parallel, each rank r serving its own requests on
    /// --port + 1 + r, rank 0 relaying connections to --port to them in turn.
    #[arg(long, requires = "expert_parallel")]
    pub data_parallel: bool,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` (`/metrics` too; `/health` stays open).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Memory for the latent KV cache across running requests (e.g. 512M, 2G).
    #[arg(long, default_value = "1G")]
    pub kv_memory: String,
    /// Requests waiting beyond the running ones before 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Prompt tokens per sequence per step (long prompts are prefilled in chunks).
    #[arg(long, default_value_t = 64)]
    pub prefill_chunk: usize,
    /// MTP speculative decoding: K drafts per step from the checkpoint's MTP module (greedy
    /// and sampled requests; requests asking for log-probs decode plainly).
    #[arg(long, default_value_t = 0)]
    pub mtp_speculative: usize,
    /// Keep the full 64-token blocks of prompts and reuse them for later prompts with the
    /// same prefix (outputs unchanged; speculative requests compute their prompt in full).
    #[arg(long)]
    pub prefix_cache: bool,
    /// Seconds a client has to send a request's headers (and an idle keep-alive connection
    /// its next request) before the connection is closed.
    #[arg(long, default_value_t = 30.0)]
    pub header_timeout: f64,
    /// Seconds a client has to send a request's body once its headers are in (408 after).
    #[arg(long, default_value_t = 30.0)]
    pub body_timeout: f64,
    /// Open connections at most; more wait until one closes.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Serve a LoRA adapter folder (PEFT's layout: dsv3's or peft's) as model NAME beside the
    /// base (repeatable); a request's `model` field picks one, and requests for different
    /// adapters and the base decode in the same batch.
    #[arg(long, value_name = "NAME=DIR")]
    pub lora: Vec<String>,
}

/// `--lora NAME=DIR` values: names non-empty, distinct, and not the base model's.
fn lora_flags(flags: &[String], base: &str) -> Result<Vec<(String, std::path::PathBuf)>> {
    let mut out: Vec<(String, std::path::PathBuf)> = vec![];
    for f in flags {
        let Some((name, dir)) = f.split_once('=').filter(|(n, d)| !n.is_empty() && !d.is_empty()) else {
            bail!("--lora {f}: NAME=DIR");
        };
        if name == base || out.iter().any(|(n, _)| n == name) {
            bail!("--lora {f}: the name {name} is taken (the base model is {base})");
        }
        out.push((name.to_string(), dir.into()));
    }
    Ok(out)
}

/// `dsv3 serve`'s connection limits from its flags.
fn http_limits(a: &Serve) -> Result<dsv3_serve::http::HttpLimits> {
    let secs = |flag: &str, v: f64| {
        if v.is_finite() && v > 0.0 && v <= 86_400.0 {
            Ok(std::time::Duration::from_secs_f64(v))
        } else {
            bail!("{flag} {v}: seconds in (0, 86400]")
        }
    };
    if a.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    Ok(dsv3_serve::http::HttpLimits {
        header_timeout: secs("--header-timeout", a.header_timeout)?,
        body_timeout: secs("--body-timeout", a.body_timeout)?,
        max_connections: a.max_connections,
        ..Default::default()
    })
}

/// Attention data-parallel: this rank's port (`port + 1 + rank`) and, on rank 0, the servers it
/// relays `port` to.
fn data_parallel_ports(a: &Serve, cluster: &Cluster) -> Result<(u16, Option<Vec<String>>)> {
    let hosts = cluster.hosts();
    let at = |r: usize| {
        u16::try_from(a.port as usize + 1 + r)
            .map_err(|_| anyhow::anyhow!("--port {}: no room for {} more ports", a.port, hosts.len()))
    };
    let mine = at(cluster.rank())?;
    if cluster.rank() != 0 {
        return Ok((mine, None));
    }
    let here = &hosts[0];
    if hosts.iter().any(|h| h != here) && a.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
        eprintln!("dsv3 serve: warning: processes on other hosts serve on --host {} (loopback); give --host 0.0.0.0 to reach them", a.host);
    }
    let servers = hosts
        .iter()
        .enumerate()
        .map(|(r, h)| Ok(format!("{}:{}", if h == here { a.host.as_str() } else { h.as_str() }, at(r)?)))
        .collect::<Result<_>>()?;
    Ok((mine, Some(servers)))
}

pub fn run(a: &Serve, cluster: &Cluster) -> Result<()> {
    let http = http_limits(a)?;
    let kv_memory = parse_size(&a.kv_memory).context("--kv-memory")?;
    // Before the model: once the expert service runs, it alone speaks on the world's
    // communicator.
    let (port, front) = if a.data_parallel { data_parallel_ports(a, cluster)? } else { (a.port, None) };
    let Some(mut l) = load(&a.model, cluster, a.data_parallel)? else { return Ok(()) };
    let name = l.dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "dsv3".into());
    let loras = lora_flags(&a.lora, &name)?;
    if !loras.is_empty() {
        let m = std::sync::Arc::get_mut(&mut l.model)
            .filter(|_| !a.model.ep.expert_parallel)
            .context("--lora with --expert-parallel is not supported yet (remote experts see no adapter)")?;
        for (n, dir) in &loras {
            let slot = m.serve_adapter(dir).with_context(|| format!("--lora {n}={}", dir.display()))?;
            eprintln!("dsv3 serve: adapter {n} ({}) as slot {slot}", dir.display());
        }
    }
    let model = l.model.clone();
    if a.mtp_speculative > 0 && model.mtp.is_empty() {
        bail!("--mtp-speculative: {} has no MTP module", l.dir.display());
    }
    if a.mtp_speculative >= dsv3_model::mla::MAX_ABSORBED_TOKENS {
        bail!(
            "--mtp-speculative {}: at most {} drafts per step",
            a.mtp_speculative,
            dsv3_model::mla::MAX_ABSORBED_TOKENS - 1
        );
    }
    let o = dsv3_serve::ServeOptions {
        host: a.host.clone(),
        port,
        api_key: a.api_key.clone(),
        max_batch: a.max_batch,
        kv_memory,
        max_queue: a.max_queue,
        prefill_chunk: a.prefill_chunk,
        mtp_speculative: a.mtp_speculative,
        prefix_cache: a.prefix_cache,
        extra_metrics: l.metrics_hook(),
        http,
        adapters: loras.into_iter().map(|(n, _)| n).collect(),
    };
    let tok = tokenizer(&l.dir)?;
    let eos = eos_ids(&l.dir, &model, tok.as_ref());
    let (state, engine) = dsv3_serve::build(&name, model, tok, eos, &o);
    let addr: std::net::SocketAddr = format!("{}:{}", o.host, o.port).parse().context("--host/--port")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let c = &state.engine.config;
    eprintln!(
        "dsv3 serve: {} on http://{addr} (max batch {}, KV budget {} blocks of 64 positions = {} tokens per request at most{})",
        l.dir.display(),
        o.max_batch,
        c.kv_blocks,
        c.kv_tokens,
        if c.prefix_cache { ", prefix cache on" } else { "" }
    );
    if let Some(backends) = front {
        let at: std::net::SocketAddr = format!("{}:{}", o.host, a.port).parse().context("--host/--port")?;
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
