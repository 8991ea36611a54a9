//! Loading what a command runs: the model (alone, or one process's part of an expert-parallel
//! group), its tokenizer and end-of-sequence ids; and the small parsers of sizes and id lists.

use crate::args::{ActQuant, IndexerNumerics, ModelArgs};
use crate::cluster::Cluster;
use anyhow::{bail, Context, Result};
use dsv3_model::expert_service::{ExpertParallel, Placing};
use dsv3_model::{DeepseekV3, Tokenizer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A loaded model. With expert parallelism, this process's part: its expert service runs until
/// the value is dropped, serving the other processes' experts until all are done.
pub struct Loaded {
    /// The model folder or GGUF file.
    pub dir: PathBuf,
    pub model: Arc<DeepseekV3>,
    ep: Option<ExpertParallel>,
    rank: usize,
}

impl Loaded {
    /// `/metrics` lines of expert parallelism: per-rank load imbalance (max/mean pairs per rank)
    /// of the last placement window, with the placement in force and with the static one.
    pub fn metrics_hook(&self) -> Option<dsv3_serve::MetricsHook> {
        let probe = self.ep.as_ref()?.imbalance_probe();
        Some(dsv3_serve::MetricsHook(Arc::new(move || {
            let (now, stat) = probe().unwrap_or((1.0, 1.0));
            format!(
                "# HELP dsv3_ep_rank_load_imbalance Max/mean routed pairs per expert-parallel rank over the last placement window.\n\
                 # TYPE dsv3_ep_rank_load_imbalance gauge\n\
                 dsv3_ep_rank_load_imbalance{{placement=\"current\"}} {now}\n\
                 dsv3_ep_rank_load_imbalance{{placement=\"static\"}} {stat}\n"
            )
        })))
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Some(ep) = self.ep.take() {
            let (sent, calls) = ep.finish();
            if calls > 0 {
                eprintln!(
                    "expert parallel: rank {} sent {:.2} MB to other processes, {:.0} bytes per token and MoE layer of all processes' calls ({calls})",
                    self.rank,
                    sent as f64 / 1e6,
                    sent as f64 / calls as f64
                );
            }
        }
    }
}

/// `--indexer-numerics official` needs V3.2's indexer and a key width the rotation takes.
fn check_indexer_numerics(model: &DeepseekV3, n: dsv3_model::exec::Inference) -> Result<()> {
    if !n.indexer_fp8 {
        return Ok(());
    }
    match model.config.indexer {
        None => bail!("--indexer-numerics official: the model has no lightning indexer (not DeepSeek-V3.2)"),
        Some(ix) if !dsv3_model::indexer::official_numerics_fit(ix.head_dim) => bail!(
            "--indexer-numerics official: index_head_dim {} is not a power of two (the Hadamard rotation needs one)",
            ix.head_dim
        ),
        Some(_) => Ok(()),
    }
}

/// The model of `m`. Under `--expert-parallel` every process loads its part; `None` on a
/// process that only serves experts (every rank but 0, unless `every_rank_runs`) once all are
/// done — the command then has nothing more to do there. From then on the expert service alone
/// uses the world's communicator.
pub fn load(m: &ModelArgs, cluster: &Cluster, every_rank_runs: bool) -> Result<Option<Loaded>> {
    let dir = crate::hub::resolve_model(&m.model)?;
    if !dir.is_dir() && !dsv3_model::gguf::is_gguf(&dir) {
        bail!("--model {}: not a model folder (config.json and safetensors) nor a .gguf file", dir.display());
    }
    let inference = dsv3_model::exec::Inference {
        act_quant_fp8: m.act_quant == ActQuant::Fp8,
        indexer_fp8: m.indexer_numerics == IndexerNumerics::Official,
    };
    if !m.ep.expert_parallel {
        let mut model = DeepseekV3::load(&dir).with_context(|| format!("loading {}", dir.display()))?;
        check_indexer_numerics(&model, inference)?;
        model.inference = inference;
        return Ok(Some(Loaded { dir, model: Arc::new(model), ep: None, rank: 0 }));
    }
    let placing = Placing { redundant: m.ep.redundant_experts, rebalance_every: m.ep.rebalance_every };
    let (model, ep) = ExpertParallel::load(&dir, cluster.comm()?, placing, inference)
        .with_context(|| format!("loading {}", dir.display()))?;
    check_indexer_numerics(&model, inference)?;
    let rank = cluster.rank();
    if rank == 0 {
        let slots = (model.config.n_routed_experts + placing.redundant).next_multiple_of(cluster.size());
        eprintln!(
            "expert parallel: {} processes{}; {} routed experts per layer over {slots} slots{}",
            cluster.size(),
            if every_rank_runs { ", attention data-parallel" } else { "" },
            model.config.n_routed_experts,
            match placing.rebalance_every {
                0 => String::new(),
                b => format!(", re-placed by EPLB every {b} calls per layer"),
            }
        );
    }
    let loaded = Loaded { dir, model, ep: Some(ep), rank };
    Ok((rank == 0 || every_rank_runs).then_some(loaded))
}

/// The tokenizer of a model folder or GGUF file, if it has one.
pub fn tokenizer(model: &Path) -> Result<Option<Tokenizer>> {
    Ok(Tokenizer::for_model(model)?)
}

/// The tokenizer of a model that must have one.
pub fn need_tokenizer(model: &Path) -> Result<Tokenizer> {
    tokenizer(model)?.with_context(|| format!("{}: no tokenizer.json", model.display()))
}

/// End-of-sequence ids: generation_config.json, else config.json, else the tokenizer's EOS.
pub fn eos_ids(dir: &Path, model: &DeepseekV3, tok: Option<&Tokenizer>) -> Vec<u32> {
    let from_gen = dsv3_model::files::read_json(&dir.join("generation_config.json")).ok().and_then(|v| {
        match v.get("eos_token_id")? {
            serde_json::Value::Number(n) => Some(vec![u32::try_from(n.as_u64()?).ok()?]),
            serde_json::Value::Array(a) => a.iter().map(|x| x.as_u64().and_then(|v| u32::try_from(v).ok())).collect(),
            _ => None,
        }
    });
    from_gen
        .or_else(|| (!model.config.eos_token_ids.is_empty()).then(|| model.config.eos_token_ids.clone()))
        .or_else(|| tok.and_then(|t| t.eos_token.as_deref().and_then(|e| t.token_id(e))).map(|e| vec![e]))
        .unwrap_or_default()
}

/// `1,2,3` → ids. Every entry must be a token id: `1,,2` or a trailing comma is an error, not
/// `[1, 2]`.
pub fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .enumerate()
        .map(|(i, x)| match x.trim() {
            "" => bail!("token id list `{s}`: entry {} is empty", i + 1),
            x => x.parse::<u32>().with_context(|| format!("token id list: `{x}` (entry {}) is not a token id", i + 1)),
        })
        .collect()
}

/// `512M`, `2G`, `1048576` → bytes.
pub fn parse_size(s: &str) -> Result<usize> {
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

/// Prints text as ids arrive: decodes everything so far and writes what is new (byte-level BPE
/// pieces only make sense together).
pub struct Streamer<'a> {
    pub tok: &'a Tokenizer,
    pub ids: Vec<u32>,
    printed: usize,
}

impl<'a> Streamer<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        Streamer { tok, ids: vec![], printed: 0 }
    }

    pub fn push(&mut self, id: u32) {
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
