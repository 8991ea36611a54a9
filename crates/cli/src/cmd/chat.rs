//! `dsv3 chat`: an interactive chat with the model's template, replies streamed, the cache kept
//! across turns for the prefix they share.

use crate::args::{ModelArgs, Sampling};
use crate::cluster::Cluster;
use crate::load::{eos_ids, load, Streamer};
use anyhow::{bail, Result};
use dsv3_model::sampling::Sampler;
use serde_json::json;
use std::io::{BufRead, Write};

/// Chat interactively with the model's chat template, streaming replies.
#[derive(clap::Args)]
pub struct Chat {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A system prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Thinking mode of hybrid models (DeepSeek-V3.1, V3.2): the template's `thinking` set, the
    /// reply's reasoning (before `</think>`) kept apart from its answer in the history.
    #[arg(long)]
    pub thinking: bool,
    #[command(flatten)]
    pub sampling: Sampling,
}

pub fn run(a: &Chat, cluster: &Cluster) -> Result<()> {
    a.sampling.check()?;
    let Some(l) = load(&a.model, cluster, false)? else { return Ok(()) };
    let model = &l.model;
    let tok = crate::load::need_tokenizer(&l.dir)?;
    if !tok.has_chat_template() {
        bail!("{}: tokenizer_config.json has no chat_template", l.dir.display());
    }
    let opts = a.sampling.options(eos_ids(&l.dir, model, Some(&tok)));
    let mut messages = vec![];
    if let Some(sys) = &a.system {
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
        let kwargs = json!({"thinking": a.thinking});
        let text = tok.render_chat(&serde_json::Value::Array(messages.clone()), None, true, Some(&kwargs))?;
        let ids = tok.encode(&text, false)?;
        // A turn that does not fit the context is refused; the conversation so far is kept.
        let budget = match dsv3_model::generate::new_token_budget(model, ids.len(), opts.max_new_tokens) {
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
        let mut st = Streamer::new(&tok);
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
        let reply = tok.decode(&st.ids, false)?;
        let reply = tok.eos_token.as_deref().map_or(reply.as_str(), |e| reply.trim_end_matches(e)).to_string();
        messages.push(match reply.split_once("</think>") {
            Some((reasoning, answer)) => json!({"role": "assistant", "content": answer.trim_start(),
                "reasoning_content": reasoning.trim_start_matches("<think>").trim()}),
            None => json!({"role": "assistant", "content": reply}),
        });
    }
    Ok(())
}
