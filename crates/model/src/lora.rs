//! LoRA adapters on the model's `Linear`s ([`crate::layers::Lora`]): attaching fresh ones by
//! target pattern, and reading and writing them in PEFT's layout — `adapter_config.json` and
//! `adapter_model.safetensors` with keys `base_model.model.{module}.lora_A.weight` /
//! `.lora_B.weight` — so that `peft` loads them onto the transformers model.
//!
//! A target names modules by their last dotted components, PEFT's rule for a list of names:
//! `q_a_proj` is every layer's; `shared_experts.gate_proj` only the shared experts'; `*` stands
//! for one component (`experts.*.down_proj`: every routed expert's). The adapter_config.json
//! written records the targets as the regular expression PEFT matches whole module names with.

use crate::error::{ModelError, Result};
use crate::layers::Lora;
use crate::model::DeepseekV3;
use crate::weights::{write_safetensors, Checkpoint};
use rand::SeedableRng;
use serde_json::{json, Value};
use std::path::Path;

/// The attention projections: the default targets.
pub const ATTENTION: [&str; 6] = ["q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"];

const PREFIX: &str = "base_model.model.";

/// How adapters are attached: rank, α and target patterns.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<String>,
}

/// Whether `module` ends with the dotted components of `target` (`*`: any one component).
pub fn matches(target: &str, module: &str) -> bool {
    let (t, m): (Vec<&str>, Vec<&str>) = (target.split('.').collect(), module.split('.').collect());
    t.len() <= m.len() && t.iter().rev().zip(m.iter().rev()).all(|(t, m)| *t == "*" || t == m)
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Input(m));
        if self.rank == 0 || self.rank > 65_536 {
            return bad(format!("--lora-rank {}: must be in 1..=65536", self.rank));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("--lora-alpha {}: must be a positive number", self.alpha));
        }
        if self.targets.is_empty() || self.targets.iter().any(|t| t.is_empty() || t.split('.').any(str::is_empty)) {
            return bad(format!("--lora-targets {:?}: module names such as q_a_proj,o_proj", self.targets.join(",")));
        }
        Ok(())
    }

    /// The targets as the regular expression PEFT matches whole module names with.
    pub fn peft_regex(&self) -> String {
        let alts: Vec<String> = self
            .targets
            .iter()
            .map(|t| {
                t.split('.')
                    .map(|c| if c == "*" { "[^.]+".to_string() } else { regex_escape(c) })
                    .collect::<Vec<_>>()
                    .join("\\.")
            })
            .collect();
        format!("(.*\\.)?({})", alts.join("|"))
    }
}

fn regex_escape(s: &str) -> String {
    s.chars().flat_map(|c| if c.is_ascii_alphanumeric() || c == '_' { vec![c] } else { vec!['\\', c] }).collect()
}

impl DeepseekV3 {
    /// Attaches fresh adapters (`B = 0`: the model's outputs do not change) to every `Linear`
    /// a target matches; returns their module names. None matched is an error.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<Vec<String>> {
        cfg.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x4C6F_5241);
        let mut names = vec![];
        for (name, l) in self.linears_mut() {
            if cfg.targets.iter().any(|t| matches(t, &name)) {
                let (out, inp) = (l.weight.rows, l.weight.cols);
                l.lora = Some(Box::new(Lora::init(out, inp, cfg.rank, cfg.alpha, &mut rng)));
                names.push(name);
            }
        }
        if names.is_empty() {
            return Err(ModelError::Input(format!(
                "--lora-targets {}: no module of this model matches (its attention projections are {})",
                cfg.targets.join(","),
                ATTENTION.join(", ")
            )));
        }
        Ok(names)
    }

    /// A LoRA parameter's name (what a LoRA run trains).
    pub fn is_lora_param(name: &str) -> bool {
        name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")
    }

    /// Writes the adapters as PEFT does into `dir` (created if missing): adapter_config.json
    /// (`base` as `base_model_name_or_path`) and adapter_model.safetensors in f32.
    pub fn write_peft(&mut self, dir: &Path, cfg: &LoraConfig, base: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let mut tensors = vec![];
        for (name, l) in self.linears_mut() {
            if let Some(a) = &l.lora {
                for (part, m) in [("lora_A", &a.a), ("lora_B", &a.b)] {
                    let bytes = m.view().to_f32().iter().flat_map(|v| v.to_le_bytes()).collect();
                    tensors.push((format!("{PREFIX}{name}.{part}.weight"), "F32", vec![m.rows, m.cols], bytes));
                }
            }
        }
        if tensors.is_empty() {
            return Err(ModelError::Input("the model has no LoRA adapter to write".into()));
        }
        write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
        let config = json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": cfg.peft_regex(), "fan_in_fan_out": false, "use_rslora": false, "use_dora": false,
            "inference_mode": true, "init_lora_weights": true, "modules_to_save": null,
            "dsv3_targets": cfg.targets,
        });
        let path = dir.join("adapter_config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap_or_default())
            .map_err(|e| ModelError::io(&path, e))?;
        Ok(())
    }

    /// Attaches the adapters of a PEFT folder (dsv3's or peft's own), replacing any there; returns
    /// their config. Each error names what does not fit.
    pub fn load_peft(&mut self, dir: &Path) -> Result<LoraConfig> {
        let path = dir.join("adapter_config.json");
        let text = crate::files::read_text(&path)?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Input(format!("{}: {e}", path.display())))?;
        let bad = |m: String| ModelError::Input(format!("{}: {m}", path.display()));
        if v["peft_type"].as_str() != Some("LORA") {
            return Err(bad(format!("peft_type {}: only LORA adapters", v["peft_type"])));
        }
        for (flag, what) in [("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out")] {
            if v[flag].as_bool() == Some(true) {
                return Err(bad(format!("{what} adapters are not supported")));
            }
        }
        if v.get("target_parameters").is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty())) {
            return Err(bad(
                "target_parameters (LoRA on fused expert tensors) is not supported: adapt routed experts as dsv3 writes them".into(),
            ));
        }
        let rank =
            v["r"].as_u64().filter(|&r| r > 0).ok_or_else(|| bad("r must be a positive integer".into()))? as usize;
        let alpha = v["lora_alpha"].as_f64().ok_or_else(|| bad("lora_alpha must be a number".into()))? as f32;
        let default_scale = match v["use_rslora"].as_bool() == Some(true) {
            true => alpha / (rank as f32).sqrt(),
            false => alpha / rank as f32,
        };
        let ranks = v.get("rank_pattern").and_then(Value::as_object).filter(|o| !o.is_empty());
        let alphas = v.get("alpha_pattern").and_then(Value::as_object).filter(|o| !o.is_empty());
        if ranks.is_some() || alphas.is_some() {
            return Err(bad("rank_pattern / alpha_pattern are not supported".into()));
        }
        let targets = match v.get("dsv3_targets").and_then(Value::as_array) {
            Some(t) => t.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
            None => match &v["target_modules"] {
                Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
                other => vec![other.as_str().unwrap_or_default().to_string()],
            },
        };
        let ck = Checkpoint::open_files(&[dir.join("adapter_model.safetensors")])?;
        let mut found: std::collections::BTreeMap<String, [Option<String>; 2]> = Default::default();
        for key in ck.names() {
            let module = key.strip_prefix(PREFIX).unwrap_or(key);
            let (module, part) = match module.rsplit_once(".lora_") {
                Some((m, rest)) => (m, rest),
                None => return Err(bad(format!("tensor {key}: not a LoRA factor (lora_A / lora_B)"))),
            };
            // PEFT names the adapter inside the key when saving several (`lora_A.default.weight`).
            let slot = match part.split('.').next() {
                Some("A") => 0,
                Some("B") => 1,
                _ => return Err(bad(format!("tensor {key}: not a LoRA factor (lora_A / lora_B)"))),
            };
            found.entry(module.to_string()).or_default()[slot] = Some(key.to_string());
        }
        let mut linears: std::collections::HashMap<String, &mut crate::layers::Linear> =
            self.linears_mut().into_iter().collect();
        for (module, [a, b]) in &found {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(bad(format!("module {module}: needs both lora_A and lora_B")));
            };
            let l =
                linears.get_mut(module.as_str()).ok_or_else(|| bad(format!("module {module}: not in this model")))?;
            let (out, inp) = (l.weight.rows, l.weight.cols);
            let ma = ck.f32s(a, &[rank, inp]).map_err(|e| bad(format!("{a}: {e} (r {rank}, in {inp})")))?;
            let mb = ck.f32s(b, &[out, rank]).map_err(|e| bad(format!("{b}: {e} (out {out}, r {rank})")))?;
            l.lora = Some(Box::new(Lora {
                a: crate::weights::Matrix::from_f32(rank, inp, ma),
                b: crate::weights::Matrix::from_f32(out, rank, mb),
                scale: default_scale,
            }));
        }
        if found.is_empty() {
            return Err(bad("adapter_model.safetensors holds no adapter".into()));
        }
        Ok(LoraConfig { rank, alpha, targets })
    }

    /// Folds every adapter into its weight (`W += scale·B·A`, as f32) and removes it.
    pub fn merge_lora(&mut self) -> usize {
        let mut merged = 0;
        for (_, l) in self.linears_mut() {
            if let Some(a) = l.lora.take() {
                let d = a.delta();
                l.weight.f32_mut().iter_mut().zip(&d).for_each(|(w, d)| *w += d);
                merged += 1;
            }
        }
        merged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_trailing_components() {
        assert!(matches("q_a_proj", "model.layers.0.self_attn.q_a_proj"));
        assert!(!matches("a_proj", "model.layers.0.self_attn.q_a_proj"));
        assert!(matches("shared_experts.gate_proj", "model.layers.1.mlp.shared_experts.gate_proj"));
        assert!(!matches("shared_experts.gate_proj", "model.layers.1.mlp.experts.3.gate_proj"));
        assert!(matches("experts.*.gate_proj", "model.layers.1.mlp.experts.3.gate_proj"));
        assert!(!matches("experts.*.gate_proj", "model.layers.1.mlp.shared_experts.gate_proj"));
        let c = LoraConfig { rank: 4, alpha: 8.0, targets: vec!["q_a_proj".into(), "experts.*.up_proj".into()] };
        assert_eq!(c.peft_regex(), "(.*\\.)?(q_a_proj|experts\\.[^.]+\\.up_proj)");
        assert!(LoraConfig { rank: 0, ..c.clone() }.validate().is_err());
        assert!(LoraConfig { targets: vec!["a..b".into()], ..c }.validate().is_err());
    }
}
