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

/// A PEFT folder's adapters, by module name.
pub struct Adapters {
    pub config: LoraConfig,
    pub modules: std::collections::BTreeMap<String, Lora>,
}

/// Reads a PEFT folder (dsv3's or peft's own) for a model whose `Linear` `module` has the weight
/// shape `shape_of(module)` (`[out, in]`; `None`: no such module). Fused expert tensors become
/// each expert's projections. Each error names what does not fit.
pub fn read_peft(dir: &Path, shape_of: &dyn Fn(&str) -> Option<(usize, usize)>) -> Result<Adapters> {
    let path = dir.join("adapter_config.json");
    let text = crate::files::read_text(&path)?;
    let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Input(format!("{}: {e}", path.display())))?;
    let bad = |m: String| ModelError::Input(format!("{}: {m}", path.display()));
    if v["peft_type"].as_str() != Some("LORA") {
        return Err(bad(format!("peft_type {}: only LORA adapters", v["peft_type"])));
    }
    for (flag, what) in [("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out")] {
        if v[flag].as_bool() == Some(true) {
            return Err(bad(format!("{what} adapters are not supported")));
        }
    }
    // LoRA on transformers' fused expert tensors (`mlp.experts.gate_up_proj [E, 2I, D]`,
    // `down_proj [E, D, I]`): the last parameter's wrapper is `mlp.experts`, the one before it
    // `mlp.experts.base_layer`, and so on.
    let fused: Vec<String> = match &v["target_parameters"] {
        Value::Null => vec![],
        Value::Array(a) => {
            a.iter().filter_map(Value::as_str).map(|p| p.rsplit('.').next().unwrap_or(p).to_string()).collect()
        }
        other => return Err(bad(format!("target_parameters {other}: a list of parameter names"))),
    };
    if let Some(p) = fused.iter().find(|p| !["gate_up_proj", "down_proj"].contains(&p.as_str())) {
        return Err(bad(format!("target_parameters {p}: only the experts' gate_up_proj and down_proj")));
    }
    let rank = v["r"].as_u64().filter(|&r| r > 0).ok_or_else(|| bad("r must be a positive integer".into()))? as usize;
    let alpha = v["lora_alpha"].as_f64().ok_or_else(|| bad("lora_alpha must be a number".into()))? as f32;
    let rslora = v["use_rslora"].as_bool() == Some(true);
    // PEFT's per-module overrides: the first key `K` with `(.*\.)?(K)$` matching the module.
    let patterns = |field: &str| -> Result<Vec<(regex::Regex, f64)>> {
        let Some(o) = v.get(field).and_then(Value::as_object) else { return Ok(vec![]) };
        o.iter()
            .map(|(k, x)| {
                let re =
                    regex::Regex::new(&format!("^(.*\\.)?({k})$")).map_err(|e| bad(format!("{field} {k:?}: {e}")))?;
                Ok((re, x.as_f64().ok_or_else(|| bad(format!("{field} {k:?}: not a number")))?))
            })
            .collect()
    };
    let (ranks, alphas) = (patterns("rank_pattern")?, patterns("alpha_pattern")?);
    let lookup = |p: &[(regex::Regex, f64)], module: &str| p.iter().find(|(re, _)| re.is_match(module)).map(|x| x.1);
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
    let mut modules = std::collections::BTreeMap::new();
    for (module, [a, b]) in &found {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(bad(format!("module {module}: needs both lora_A and lora_B")));
        };
        if let Some((owner, depth)) = fused_wrapper(module) {
            let param = depth.checked_add(1).and_then(|d| fused.len().checked_sub(d)).map(|i| fused[i].as_str());
            let param = param.ok_or_else(|| bad(format!("module {module}: no target_parameters entry for it")))?;
            let key = format!("{owner}.{param}");
            let experts = (0..).take_while(|e| shape_of(&format!("{owner}.{e}.down_proj")).is_some()).count();
            let (ra, inp) = ck
                .shape(a)
                .and_then(|s| (s.len() == 2).then(|| (s[0], s[1])))
                .ok_or_else(|| bad(format!("{a}: not a matrix")))?;
            if experts == 0 || ra % experts != 0 {
                return Err(bad(format!("{a}: {ra} rows for {experts} experts of {owner}")));
            }
            let r = ra / experts;
            let alpha = lookup(&alphas, &key).map_or(alpha, |a| a as f32);
            let scale = if rslora { alpha / (r as f32).sqrt() } else { alpha / r as f32 };
            let out = ck.shape(b).map_or(0, |s| s[0]);
            let ma = ck.f32s(a, &[ra, inp]).map_err(|e| bad(format!("{a}: {e}")))?;
            let mb = ck.f32s(b, &[out, ra]).map_err(|e| bad(format!("{b}: {e} (out {out}, r·E {ra})")))?;
            // (projection, its first row of B, its rank columns k0..k0 + kr).
            let half = out / 2;
            let zero = |rows: std::ops::Range<usize>, ks: std::ops::Range<usize>| {
                rows.into_iter().all(|o| ks.clone().all(|k| (0..experts).all(|e| mb[o * ra + k * experts + e] == 0.0)))
            };
            // dsv3 writes separate gate and up adapters block-diagonally: read back as they were.
            let block_diagonal = r % 2 == 0 && zero(0..half, r / 2..r) && zero(half..out, 0..r / 2);
            let parts: Vec<(&str, usize, usize, usize)> = match (param, block_diagonal) {
                ("gate_up_proj", true) => vec![("gate_proj", 0, 0, r / 2), ("up_proj", half, r / 2, r / 2)],
                ("gate_up_proj", false) => vec![("gate_proj", 0, 0, r), ("up_proj", half, 0, r)],
                _ => vec![("down_proj", 0, 0, r)],
            };
            for e in 0..experts {
                // Expert e's A is rows e·r..(e+1)·r; its B[o, k] is B[o, k·E + e].
                for &(proj, row0, k0, kr) in &parts {
                    let name = format!("{owner}.{e}.{proj}");
                    let (o, i) = shape_of(&name).ok_or_else(|| bad(format!("{name}: not in this model")))?;
                    if i != inp || row0 + o > out {
                        return Err(bad(format!(
                            "{key}: factors [{ra}, {inp}] · [{out}, {ra}] do not fit {proj} [{o}, {i}]"
                        )));
                    }
                    let ae = ma[(e * r + k0) * inp..(e * r + k0 + kr) * inp].to_vec();
                    let be: Vec<f32> = (0..o)
                        .flat_map(|oo| (k0..k0 + kr).map(move |k| (row0 + oo, k)))
                        .map(|(oo, k)| mb[oo * ra + k * experts + e])
                        .collect();
                    let a = crate::weights::Matrix::from_f32(kr, inp, ae);
                    modules.insert(name, Lora { a, b: crate::weights::Matrix::from_f32(o, kr, be), scale });
                }
            }
            continue;
        }
        let (out, inp) = shape_of(module).ok_or_else(|| bad(format!("module {module}: not in this model")))?;
        let rank = lookup(&ranks, module).map_or(rank, |r| r as usize);
        let alpha = lookup(&alphas, module).map_or(alpha, |a| a as f32);
        let scale = if rslora { alpha / (rank as f32).sqrt() } else { alpha / rank as f32 };
        let ma = ck.f32s(a, &[rank, inp]).map_err(|e| bad(format!("{a}: {e} (r {rank}, in {inp})")))?;
        let mb = ck.f32s(b, &[out, rank]).map_err(|e| bad(format!("{b}: {e} (out {out}, r {rank})")))?;
        let a = crate::weights::Matrix::from_f32(rank, inp, ma);
        modules.insert(module.clone(), Lora { a, b: crate::weights::Matrix::from_f32(out, rank, mb), scale });
    }
    if found.is_empty() {
        return Err(bad("adapter_model.safetensors holds no adapter".into()));
    }
    Ok(Adapters { config: LoraConfig { rank, alpha, targets }, modules })
}

/// One fused expert tensor's factors in PEFT's layout: `A [r·E, in]` (expert `e`'s rows
/// `e·r..(e+1)·r`), `B [out, r·E]` (expert `e`'s column `k` at `k·E + e`).
struct FusedFactors {
    a: Vec<f32>,
    a_shape: [usize; 2],
    b: Vec<f32>,
    b_shape: [usize; 2],
    rank: usize,
    alpha: f32,
}

/// A MoE layer's routed-expert adapters as PEFT adapts transformers' fused expert tensors.
struct FusedExperts {
    owner: String,
    gate_up: FusedFactors,
    down: FusedFactors,
}

/// The MoE layers whose routed experts' adapters PEFT can hold in its fused layout: every
/// expert adapted on all three projections, alike in rank and scale. PEFT's LoRA on the fused
/// `gate_up_proj` is gate's and up's together: one `A` when they share it (as PEFT's own are
/// read back), else both `A`s stacked with a block-diagonal `B` (rank `2r`, α doubled: what
/// PEFT makes of separate gate and up adapters).
fn fused_experts(adapters: &[(&str, &Lora)]) -> Vec<FusedExperts> {
    let by_name: std::collections::HashMap<&str, &Lora> = adapters.iter().copied().collect();
    let mut owners: Vec<&str> =
        adapters.iter().filter_map(|(n, _)| n.split_once(".mlp.experts.").map(|(l, _)| l)).collect();
    owners.dedup();
    let mut out = vec![];
    'layers: for layer in owners {
        let owner = format!("{layer}.mlp.experts");
        let mut experts = vec![];
        for e in 0.. {
            let get = |p: &str| by_name.get(format!("{owner}.{e}.{p}").as_str()).copied();
            match (get("gate_proj"), get("up_proj"), get("down_proj")) {
                (None, None, None) => break,
                (Some(g), Some(u), Some(d)) => experts.push([g, u, d]),
                _ => continue 'layers,
            }
        }
        let shape = |l: &Lora| (l.rank(), l.scale);
        let [g0, _, d0] = experts[0];
        let alike =
            experts.iter().all(|[g, u, d]| shape(g) == shape(u) && shape(g) == shape(g0) && shape(d) == shape(d0));
        if !alike {
            continue;
        }
        let shared = experts.iter().all(|[g, u, _]| g.a.view().to_f32() == u.a.view().to_f32());
        // Each expert's (A_e [r, in], B_e [out, r]) of the fused tensor.
        let gate_up: Vec<(Vec<f32>, Vec<f32>)> = experts
            .iter()
            .map(|[g, u, _]| {
                let (bg, bu) = (g.b.view().to_f32(), u.b.view().to_f32());
                match shared {
                    true => (g.a.view().to_f32(), [bg, bu].concat()),
                    false => {
                        let (r, ig, iu) = (g.rank(), g.b.rows, u.b.rows);
                        let mut b = vec![0f32; (ig + iu) * 2 * r];
                        for o in 0..ig {
                            b[o * 2 * r..o * 2 * r + r].copy_from_slice(&bg[o * r..(o + 1) * r]);
                        }
                        for o in 0..iu {
                            b[(ig + o) * 2 * r + r..(ig + o + 1) * 2 * r].copy_from_slice(&bu[o * r..(o + 1) * r]);
                        }
                        ([g.a.view().to_f32(), u.a.view().to_f32()].concat(), b)
                    }
                }
            })
            .collect();
        let down: Vec<(Vec<f32>, Vec<f32>)> =
            experts.iter().map(|[_, _, d]| (d.a.view().to_f32(), d.b.view().to_f32())).collect();
        let r_gu = if shared { g0.rank() } else { 2 * g0.rank() };
        out.push(FusedExperts {
            gate_up: fuse(&gate_up, r_gu, g0.a.cols, g0.scale),
            down: fuse(&down, d0.rank(), d0.a.cols, d0.scale),
            owner,
        });
    }
    out
}

/// Experts' `(A_e [r, in], B_e [out, r])` in PEFT's fused layout: `A` stacks them, `B[o, k·E + e]`.
fn fuse(parts: &[(Vec<f32>, Vec<f32>)], r: usize, inp: usize, scale: f32) -> FusedFactors {
    let n = parts.len();
    let out = parts[0].1.len() / r;
    let a: Vec<f32> = parts.iter().flat_map(|(a, _)| a.iter().copied()).collect();
    let mut b = vec![0f32; out * r * n];
    for (e, (_, be)) in parts.iter().enumerate() {
        for o in 0..out {
            for k in 0..r {
                b[o * r * n + k * n + e] = be[o * r + k];
            }
        }
    }
    FusedFactors { a, a_shape: [r * n, inp], b, b_shape: [out, r * n], rank: r, alpha: scale * r as f32 }
}

/// For a PEFT wrapper of fused expert tensors (`….mlp.experts` or `….mlp.experts.base_layer…`):
/// the experts' module and how many `base_layer`s deep the wrapper is.
fn fused_wrapper(module: &str) -> Option<(&str, usize)> {
    let mut m = module;
    let mut depth = 0;
    while let Some(inner) = m.strip_suffix(".base_layer") {
        m = inner;
        depth += 1;
    }
    m.ends_with("mlp.experts").then_some((m, depth))
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
        let linears = self.linears_mut();
        let adapters: Vec<(&str, &Lora)> =
            linears.iter().filter_map(|(n, l)| l.lora.as_deref().map(|a| (n.as_str(), a))).collect();
        let fused = fused_experts(&adapters);
        let mut tensors = vec![];
        let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        for &(name, a) in &adapters {
            if fused.iter().any(|f| name.starts_with(&format!("{}.", f.owner))) {
                continue;
            }
            for (part, m) in [("lora_A", &a.a), ("lora_B", &a.b)] {
                let key = format!("{PREFIX}{name}.{part}.weight");
                tensors.push((key, "F32", vec![m.rows, m.cols], f32_bytes(&m.view().to_f32())));
            }
        }
        let mut patterns = (serde_json::Map::new(), serde_json::Map::new());
        for f in &fused {
            for (wrapper, t) in [(format!("{}.base_layer", f.owner), &f.gate_up), (f.owner.clone(), &f.down)] {
                tensors.push((format!("{PREFIX}{wrapper}.lora_A.weight"), "F32", t.a_shape.to_vec(), f32_bytes(&t.a)));
                tensors.push((format!("{PREFIX}{wrapper}.lora_B.weight"), "F32", t.b_shape.to_vec(), f32_bytes(&t.b)));
            }
            for (param, t) in [("gate_up_proj", &f.gate_up), ("down_proj", &f.down)] {
                if t.rank != cfg.rank || t.alpha != cfg.alpha {
                    patterns.0.insert(format!(".*\\.{param}"), t.rank.into());
                    patterns.1.insert(format!(".*\\.{param}"), t.alpha.into());
                }
            }
        }
        if tensors.is_empty() {
            return Err(ModelError::Input("the model has no LoRA adapter to write".into()));
        }
        write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
        let target_parameters = (!fused.is_empty()).then(|| json!(["gate_up_proj", "down_proj"]));
        let config = json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": cfg.peft_regex(), "target_parameters": target_parameters,
            "rank_pattern": patterns.0, "alpha_pattern": patterns.1,
            "fan_in_fan_out": false, "use_rslora": false, "use_dora": false,
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
        let config = self.attach_peft(dir, |l, a| l.lora = Some(Box::new(a)))?;
        Ok(config)
    }

    /// Reads a PEFT folder against this model's `Linear`s and hands each adapted one its adapter.
    fn attach_peft(&mut self, dir: &Path, attach: impl Fn(&mut crate::layers::Linear, Lora)) -> Result<LoraConfig> {
        let mut linears: std::collections::HashMap<String, &mut crate::layers::Linear> =
            self.linears_mut().into_iter().collect();
        let shapes: std::collections::HashMap<String, (usize, usize)> =
            linears.iter().map(|(n, l)| (n.clone(), (l.weight.rows, l.weight.cols))).collect();
        let adapters = read_peft(dir, &|m| shapes.get(m).copied())?;
        for (m, a) in adapters.modules {
            if let Some(l) = linears.get_mut(&m) {
                attach(l, a);
            }
        }
        Ok(adapters.config)
    }

    /// Adds the adapters of a PEFT folder as a served one, beside the others and the base: the
    /// sequences [`DeepseekV3::forward_batch_adapted`] gives the returned slot run through them.
    pub fn serve_adapter(&mut self, dir: &Path) -> Result<u16> {
        let slot = self.served_adapters + 1;
        if slot > u16::MAX as usize {
            return Err(ModelError::Input("too many served adapters".into()));
        }
        self.attach_peft(dir, |l, a| {
            l.served.resize_with(slot, || None);
            l.served[slot - 1] = Some(Box::new(a));
        })?;
        self.served_adapters = slot;
        Ok(slot as u16)
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
