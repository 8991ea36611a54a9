//! Training checkpoints: the model in the Hugging Face layout (config.json, f32 model.safetensors
//! with the MTP module as layer `num_hidden_layers` and the routing biases as
//! `e_score_correction_bias`, tokenizer files), and beside it the optimizer moments
//! (`optimizer.safetensors`) and the run state (`train_state.json`: step, loader position,
//! arguments). The folder is written whole under a temporary name and swapped in by rename, so a
//! crash or a full disk mid-save leaves the previous checkpoint intact.

use crate::args::TrainArgs;
use crate::data::{LoaderState, BOS, EOS};
use crate::optim::Optimizer;
use anyhow::{bail, Context, Result};
use dsv3_model::weights::{write_safetensors, Checkpoint};
use dsv3_model::DeepseekV3;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Where a run is, beside its weights.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    pub step: u64,
    pub tokens_seen: u64,
    pub loader: LoaderState,
    pub args: TrainArgs,
}

/// Files of the run that live in the output folder but are not part of a checkpoint (carried over
/// when the folder is swapped).
const CARRIED: [&str; 13] = [
    "metrics.jsonl",
    "loss.svg",
    "loss.png",
    "expert_load.svg",
    "expert_load.png",
    "maxvio.svg",
    "maxvio.png",
    "reward.svg",
    "reward.png",
    "kl.svg",
    "kl.png",
    "response_length.svg",
    "response_length.png",
];

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The files of a checkpoint beside the weights and the run's state.
#[derive(Clone, Copy)]
pub struct Files<'a> {
    pub config: &'a Value,
    pub tokenizer: &'a Tokenizer,
    /// The starting model's tokenizer_config.json (its chat template); `None`: a run's own
    /// tokenizer, with [`CHAT_TEMPLATE`].
    pub tokenizer_config: Option<&'a Value>,
}

/// The chat template of models dsv3 pre-trains: DeepSeek-V3's turns (`<｜User｜>`,
/// `<｜Assistant｜>`, the end-of-sentence token closing each reply), the system prompt first, and a
/// reply's `reasoning_content` in `<think>…</think>` as R1 writes it.
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% elif m['role'] == 'assistant' %}<｜Assistant｜>{% if m.get('reasoning_content') %}<think>{{ m['reasoning_content'] }}</think>{% endif %}{{ m['content'] or '' }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}";

/// Writes the checkpoint into `dir` (replacing what is there).
pub fn save(dir: &Path, model: &mut DeepseekV3, files: Files, opt: &Optimizer, state: &TrainState) -> Result<()> {
    swap_in(dir, |tmp| {
        write_model(tmp, model, files)?;
        write_run(tmp, opt, state)
    })
}

/// A LoRA run's adapters and the base they adapt.
#[derive(Clone, Copy)]
pub struct Adapters<'a> {
    pub lora: &'a dsv3_model::lora::LoraConfig,
    pub base: &'a Path,
}

/// A LoRA run's checkpoint into `dir` (replacing what is there): the adapters in PEFT's layout
/// (adapter_config.json naming the base, adapter_model.safetensors), the optimizer and the state.
pub fn save_adapters(
    dir: &Path,
    model: &mut DeepseekV3,
    a: Adapters,
    opt: &Optimizer,
    state: &TrainState,
) -> Result<()> {
    let base = std::fs::canonicalize(a.base).unwrap_or_else(|_| a.base.to_path_buf());
    swap_in(dir, |tmp| {
        model.write_peft(tmp, a.lora, &base.to_string_lossy())?;
        write_run(tmp, opt, state)
    })
}

/// Writes the model alone into `dir` (replacing what is there): a Hugging Face folder with no
/// run state (reinforcement learning's output).
pub fn save_model(dir: &Path, model: &mut DeepseekV3, files: Files) -> Result<()> {
    swap_in(dir, |tmp| write_model(tmp, model, files))
}

/// Fills a temporary folder beside `dir` with `fill` and the run's carried files, then swaps it
/// in for `dir`: a failure at any point leaves the previous `dir` as it was.
fn swap_in(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dir.file_name().context("--out needs a folder name")?.to_string_lossy().to_string();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp)?;
        fill(&tmp)?;
        for f in CARRIED {
            if dir.join(f).exists() {
                std::fs::copy(dir.join(f), tmp.join(f))?;
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing the checkpoint {} (the previous one is untouched)", dir.display())));
    }
    if dir.exists() {
        std::fs::rename(dir, &old).with_context(|| format!("moving the previous {} aside", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("moving the new checkpoint into {}", dir.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Finishes or undoes saves of `dir` that a dead process left half done, and says what it did.
/// [`save`] writes `.{name}.tmp-PID` whole, then moves `dir` to `.{name}.old-PID`, then the
/// temporary folder to `dir`, then removes the old one; so:
/// - an `old` folder with `dir` present: the swap finished; the old copy goes;
/// - an `old` folder without `dir`: the new copy (if its `tmp` is there) was complete and moves
///   in, else the old one moves back;
/// - a `tmp` folder otherwise: a save that died while writing; it goes (the checkpoint in `dir`,
///   if any, is the one before it).
pub fn recover_interrupted(dir: &Path) -> Result<Vec<String>> {
    let stale = dsv3_model::files::stale_siblings(dir, &["tmp", "old"]);
    let mut said = vec![];
    for (old, _) in stale.iter().filter(|(_, tag)| tag == "old") {
        let tmp = stale.iter().find(|(p, t)| t == "tmp" && pid_of(p) == pid_of(old)).map(|(p, _)| p.clone());
        if dir.exists() {
            std::fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
            said.push(format!("removed {}: an interrupted save had already finished", old.display()));
        } else if let Some(tmp) = tmp {
            std::fs::rename(&tmp, dir).with_context(|| format!("moving {} to {}", tmp.display(), dir.display()))?;
            std::fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
            said.push(format!("{}: completed a save interrupted between its renames", dir.display()));
        } else {
            std::fs::rename(old, dir).with_context(|| format!("moving {} back to {}", old.display(), dir.display()))?;
            said.push(format!("{}: restored the checkpoint an interrupted save had moved aside", dir.display()));
        }
    }
    for (tmp, _) in stale.iter().filter(|(p, tag)| tag == "tmp" && p.exists()) {
        std::fs::remove_dir_all(tmp).with_context(|| format!("removing {}", tmp.display()))?;
        said.push(format!(
            "removed {}: a save interrupted while writing (the checkpoint before it is intact)",
            tmp.display()
        ));
    }
    Ok(said)
}

/// The process id in a `.{name}.{tag}-PID` name.
fn pid_of(p: &Path) -> String {
    p.to_string_lossy().rsplit_once('-').map(|(_, pid)| pid.to_string()).unwrap_or_default()
}

fn write_model(dir: &Path, model: &mut DeepseekV3, files: Files) -> Result<()> {
    let Files { config, tokenizer: tok, tokenizer_config } = files;
    let n_layers = model.config.num_hidden_layers;
    let n_mtp = model.mtp.len();
    let mut tensors: Vec<(String, &str, Vec<usize>, Vec<u8>)> = vec![];
    let mut embed = None;
    let mut head = None;
    for p in model.params_mut() {
        if p.name == "model.embed_tokens.weight" {
            embed = Some((p.shape.clone(), f32_bytes(p.data)));
        }
        if p.name == "lm_head.weight" {
            head = Some((p.shape.clone(), f32_bytes(p.data)));
        }
        tensors.push((p.name, "F32", p.shape, f32_bytes(p.data)));
    }
    for (layer, bias) in model.routing_biases_mut() {
        tensors.push((
            format!("model.layers.{layer}.mlp.gate.e_score_correction_bias"),
            "F32",
            vec![bias.len()],
            f32_bytes(bias),
        ));
    }
    // The official layout repeats the shared embedding and head inside each MTP layer (vLLM and
    // SGLang read them there); dsv3 and transformers skip them.
    let embed = embed.context("no embedding")?;
    let head = head.unwrap_or_else(|| embed.clone());
    for j in 0..n_mtp {
        let p = format!("model.layers.{}", n_layers + j);
        tensors.push((format!("{p}.embed_tokens.weight"), "F32", embed.0.clone(), embed.1.clone()));
        tensors.push((format!("{p}.shared_head.head.weight"), "F32", head.0.clone(), head.1.clone()));
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    let config = dsv3_model::config::with_architectures(config);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    tok.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("saving the tokenizer: {e}"))?;
    let tc = tokenizer_config.cloned().unwrap_or_else(|| {
        json!({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
            "add_bos_token": false, "add_eos_token": false, "model_max_length": config["max_position_embeddings"],
            "chat_template": CHAT_TEMPLATE,
        })
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&tc)?)?;
    Ok(())
}

/// The optimizer's moments and the run's state.
fn write_run(dir: &Path, opt: &Optimizer, state: &TrainState) -> Result<()> {
    let mut moments: Vec<(String, &str, Vec<usize>, Vec<u8>)> = vec![];
    for (k, v) in &opt.m {
        moments.push((format!("m.{k}"), "F32", vec![v.len()], f32_bytes(v)));
    }
    for (k, v) in &opt.v {
        moments.push((format!("v.{k}"), "F32", vec![v.len()], f32_bytes(v)));
    }
    write_safetensors(&dir.join("optimizer.safetensors"), &moments)?;
    std::fs::write(
        dir.join("train_state.json"),
        serde_json::to_string_pretty(&json!({"optimizer_step": opt.step, "state": state}))?,
    )?;
    Ok(())
}

/// A saved run: model, config JSON, tokenizer and state ([`load_optimizer`] reads the moments).
pub struct Resumed {
    pub model: DeepseekV3,
    pub config: Value,
    pub tokenizer: Tokenizer,
    pub state: TrainState,
}

/// The state of the run saved in `dir`, with a clear error when it is not a dsv3 training
/// checkpoint.
pub fn read_state(dir: &Path) -> Result<TrainState> {
    let st = dir.join("train_state.json");
    if !st.exists() {
        let hint = dir.parent().map(|p| p.to_path_buf()).unwrap_or_else(|| PathBuf::from("."));
        bail!("--resume {}: no train_state.json (not a dsv3 training checkpoint; look for a .*.old-* folder in {} if a save was interrupted)", dir.display(), hint.display());
    }
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&st)?).with_context(|| format!("reading {}", st.display()))?;
    serde_json::from_value(v["state"].clone()).context("train_state.json: state")
}

/// The run saved in `dir` ([`read_state`]); the weights `skip` names stay on disk
/// ([`DeepseekV3::load_skipping`]).
pub fn load(dir: &Path, skip: impl Fn(&str) -> bool + Send + Sync + 'static) -> Result<Resumed> {
    let state = read_state(dir)?;
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let model = DeepseekV3::load_skipping(dir, skip).with_context(|| format!("loading {}", dir.display()))?;
    let tokenizer =
        Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    Ok(Resumed { model, config, tokenizer, state })
}

/// The optimizer state of the checkpoint in `dir`, with the moments of the parameters `keep`
/// accepts (in parallel training, those this process updates: the rest is never read).
pub fn load_optimizer(dir: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Optimizer> {
    let st = dir.join("train_state.json");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&st)?).with_context(|| format!("reading {}", st.display()))?;
    let ck = Checkpoint::open_files(&[dir.join("optimizer.safetensors")])?;
    let mut optimizer =
        Optimizer { step: v["optimizer_step"].as_u64().context("optimizer_step")?, ..Default::default() };
    for name in ck.names().map(str::to_string).collect::<Vec<_>>() {
        let (kind, param) = name.split_once('.').context("optimizer tensor name")?;
        if !keep(param) {
            continue;
        }
        let len = ck.shape(&name).and_then(|s| s.first().copied()).context("optimizer tensor shape")?;
        let data = ck.f32s(&name, &[len])?;
        match kind {
            "m" => optimizer.m.insert(param.to_string(), data),
            "v" => optimizer.v.insert(param.to_string(), data),
            _ => bail!("optimizer.safetensors: unexpected tensor {name}"),
        };
    }
    Ok(optimizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process id no live process has (above Linux's largest pid_max).
    const DEAD: u32 = 99_999_999;

    fn folder(p: &Path, marker: &str) {
        std::fs::create_dir_all(p).unwrap();
        std::fs::write(p.join("marker"), marker).unwrap();
    }

    fn marker(p: &Path) -> String {
        std::fs::read_to_string(p.join("marker")).unwrap()
    }

    #[test]
    fn interrupted_saves_are_finished_or_undone() {
        let root = std::env::temp_dir().join(format!("dsv3-recover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (run, old, tmp) =
            (root.join("run"), root.join(format!(".run.old-{DEAD}")), root.join(format!(".run.tmp-{DEAD}")));
        // Killed after the swap, before the old copy was removed.
        folder(&run, "new");
        folder(&old, "old");
        assert_eq!(recover_interrupted(&run).unwrap().len(), 1);
        assert!(!old.exists() && marker(&run) == "new");
        // Killed between the two renames: the complete new copy moves in.
        std::fs::rename(&run, &old).unwrap();
        folder(&tmp, "newer");
        recover_interrupted(&run).unwrap();
        assert!(!old.exists() && !tmp.exists() && marker(&run) == "newer");
        // The old copy moved aside and the new one gone: the old one comes back.
        std::fs::rename(&run, &old).unwrap();
        recover_interrupted(&run).unwrap();
        assert_eq!(marker(&run), "newer");
        // Killed while writing: the partial copy goes, the checkpoint stays.
        folder(&tmp, "partial");
        recover_interrupted(&run).unwrap();
        assert!(!tmp.exists() && marker(&run) == "newer");
        // A live process's temporary folder is its own.
        let live = root.join(format!(".run.tmp-{}", std::process::id()));
        folder(&live, "mine");
        assert!(recover_interrupted(&run).unwrap().is_empty() && live.exists());
        std::fs::remove_dir_all(&root).ok();
    }
}
