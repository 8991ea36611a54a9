//! `dsv3 score`: log-probabilities of a token sequence (and the MTP module's predictions).

use crate::args::ModelArgs;
use crate::cluster::Cluster;
use crate::load::{load, parse_ids};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::PathBuf;

/// Log-probabilities of a token sequence (and of the MTP module's predictions).
#[derive(clap::Args)]
pub struct Score {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, group = "input")]
    pub ids: Option<String>,
    #[arg(long, group = "input")]
    pub text: Option<String>,
    /// A text file.
    #[arg(long, group = "input")]
    pub file: Option<PathBuf>,
    /// Also list the K most likely next tokens at each position.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Also score ids[i+2] with MTP module 0 at each position i.
    #[arg(long)]
    pub mtp: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &Score, cluster: &Cluster) -> Result<()> {
    let Some(l) = load(&a.model, cluster, false)? else { return Ok(()) };
    let toks = match (&a.ids, &a.text, &a.file) {
        (Some(i), _, _) => parse_ids(i)?,
        (None, Some(t), _) => crate::load::need_tokenizer(&l.dir)?.encode(t, true)?,
        (None, None, Some(f)) => {
            let t = dsv3_model::files::read_text(f).with_context(|| format!("reading {}", f.display()))?;
            crate::load::need_tokenizer(&l.dir)?.encode(&t, true)?
        }
        _ => bail!("give --ids, --text or --file"),
    };
    let s = dsv3_model::generate::score(&l.model, &toks, a.mtp, a.top_k)?;
    if a.json {
        let top: Vec<Vec<serde_json::Value>> =
            s.top.iter().map(|row| row.iter().map(|(id, lp)| json!({"id": id, "logprob": lp})).collect()).collect();
        let mut out = json!({"ids": toks, "logprobs": s.logprobs, "top": top, "nll": s.nll, "ppl": s.ppl});
        if a.mtp {
            out["mtp_logprobs"] = json!(s.mtp_logprobs);
        }
        println!("{out}");
        return Ok(());
    }
    for (i, lp) in s.logprobs.iter().enumerate() {
        print!("{:>6} → {:>6}  logprob {lp:>9.4}", toks[i], toks[i + 1]);
        if let Some(m) = s.mtp_logprobs.get(i) {
            print!("   mtp(+2) {m:>9.4}");
        }
        println!();
    }
    println!("nll {:.4}  ppl {:.3}", s.nll, s.ppl);
    Ok(())
}
