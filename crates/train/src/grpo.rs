//! GRPO, Group Relative Policy Optimization (DeepSeekMath §4.1; the reinforcement learning of
//! DeepSeek-R1): for each prompt a group of `G` sampled completions, scored by a rule; each
//! completion's advantage is its reward normalized within its group (no value model); the policy
//! maximizes the clipped ratio objective with a KL penalty towards the frozen starting model,
//! per token, with the unbiased estimator `π_ref/π − log(π_ref/π) − 1`:
//!
//! `J = 1/N Σ_i 1/|o_i| Σ_t [min(r_t·A_i, clip(r_t, 1−ε, 1+ε)·A_i) − β·KL_t]`, `r_t = π/π_old`,
//!
//! over `μ` updates per batch of samples. Sampling is the inference engine's batched decode
//! (`forward_batch` over the latent caches); the update is the model's own backward
//! ([`Objective::LogProb`]).

use crate::args::{parse_choice, Precision};
use crate::checkpoint::{self, Files};
use crate::optim::{OptimConfig, Optimizer, OptimizerKind};
use crate::reward::{self, Completion, Prompt, Reward, RewardKind, Score};
use anyhow::{bail, Context, Result};
use dsv3_model::grad::model::{LossWeights, Objective};
use dsv3_model::grad::moe::Balance;
use dsv3_model::grad::Grads;
use dsv3_model::sampling::{Sampler, SamplingParams};
use dsv3_model::{DeepseekV3, Tokenizer};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

fn reward_kind(s: &str) -> std::result::Result<RewardKind, String> {
    parse_choice("--reward", s)
}

fn precision(s: &str) -> std::result::Result<Precision, String> {
    parse_choice("--precision", s)
}

/// The flags of `dsv3 grpo`.
#[derive(Clone, Debug, serde::Serialize, clap::Args)]
pub struct GrpoArgs {
    /// The policy to start from (and the frozen KL reference): a dsv3 or Hugging Face
    /// DeepSeek-architecture folder with a chat template.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "runs/grpo")]
    pub out: PathBuf,
    /// JSONL of {"messages": [...]} or {"prompt": "..."} with an optional "answer"; default: the
    /// built-in task (additions of --digits-digit numbers).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// answer (exact match after </think>), format (<think>…</think>answer, finished) or
    /// answer-format (answer + 0.1 × format).
    #[arg(long, value_parser = reward_kind, default_value = "answer-format")]
    pub reward: RewardKind,
    /// Score with `sh -c CMD` instead: a JSON object on stdin (messages, completion, answer,
    /// finished), a number on stdout.
    #[arg(long)]
    pub reward_command: Option<String>,
    /// Operand digits of the built-in addition task.
    #[arg(long, default_value_t = 2)]
    pub digits: u32,
    /// Completions per prompt (G).
    #[arg(long, default_value_t = 8)]
    pub group: usize,
    /// Prompts per step.
    #[arg(long, default_value_t = 4)]
    pub prompts_per_step: usize,
    #[arg(long, default_value_t = 50)]
    pub steps: u64,
    /// Policy updates per batch of samples (μ).
    #[arg(long, default_value_t = 2)]
    pub updates: usize,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// β of the KL penalty (0: no reference model).
    #[arg(long, default_value_t = 0.04)]
    pub beta: f32,
    /// ε of the ratio clip.
    #[arg(long, default_value_t = 0.2)]
    pub clip_eps: f32,
    /// AdamW's learning rate (constant).
    #[arg(long, default_value_t = 1e-6)]
    pub lr: f32,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Global gradient-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    #[arg(long, value_parser = precision, default_value = "bf16")]
    pub precision: Precision,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save the policy every N steps (and always at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// Greedy answers to this many prompts scored before the first step, every --eval-every
    /// steps and at the end (built-in task: problems of their own seed; --prompts: the file's
    /// first ones). 0: none.
    #[arg(long, default_value_t = 64)]
    pub eval_prompts: usize,
    #[arg(long, default_value_t = 10)]
    pub eval_every: u64,
}

impl GrpoArgs {
    pub fn validate(&self) -> Result<()> {
        let finite_in = |flag: &str, v: f32, lo: f32, hi: f32| match v.is_finite() && (lo..=hi).contains(&v) {
            true => Ok(()),
            false => Err(anyhow::anyhow!("--{flag} {v}: must be a number in [{lo}, {hi}]")),
        };
        finite_in("temperature", self.temperature, 1e-3, 100.0)?;
        finite_in("top-p", self.top_p, 1e-6, 1.0)?;
        finite_in("beta", self.beta, 0.0, 1e3)?;
        finite_in("clip-eps", self.clip_eps, 0.0, 1.0)?;
        finite_in("lr", self.lr, 0.0, 1e3)?;
        finite_in("weight-decay", self.weight_decay, 0.0, 1e3)?;
        finite_in("clip", self.clip, 0.0, f32::MAX)?;
        if self.group < 2 {
            bail!("--group {}: a group needs at least 2 completions to compare", self.group);
        }
        let samples = (self.group as u128) * self.prompts_per_step as u128;
        if self.prompts_per_step == 0 || samples > 4096 {
            bail!(
                "--group {} × --prompts-per-step {}: between 2 and 4096 samples per step",
                self.group,
                self.prompts_per_step
            );
        }
        if self.steps == 0 || self.updates == 0 || self.max_new_tokens == 0 {
            bail!("--steps, --updates and --max-new-tokens must be at least 1");
        }
        if !(1..=9).contains(&self.digits) {
            bail!("--digits {}: 1 to 9", self.digits);
        }
        Ok(())
    }
}

/// The GRPO objective over one batch of samples `[seqs, t]` (labels), given as the loss
/// `−J` and its gradient towards each label's `log π`.
pub struct GrpoLoss<'a> {
    /// Per label: a completion token (learned) or not (prompt, pads).
    pub mask: &'a [bool],
    /// Labels per sequence.
    pub t: usize,
    /// Each sequence's advantage.
    pub advantages: &'a [f64],
    /// `log π_old` per label (`None`: the current policy's, the first update).
    pub old: Option<&'a [f32]>,
    /// `log π_ref` per label (`None`: no KL penalty).
    pub reference: Option<&'a [f32]>,
    pub beta: f64,
    pub eps: f64,
}

/// Per-token statistics of the policy against the old and the reference.
#[derive(Clone, Copy, Debug, Default)]
pub struct Terms {
    pub loss: f64,
    /// Mean over completion tokens of the KL estimator.
    pub kl: f64,
    /// Share of completion tokens whose ratio was clipped.
    pub clipped: f64,
}

impl GrpoLoss<'_> {
    /// `(−J, ∂(−J)/∂log π)` at `logp`, and the statistics.
    pub fn evaluate(&self, logp: &[f32]) -> (Terms, Vec<f32>) {
        let seqs = self.advantages.len();
        let mut d = vec![0f32; logp.len()];
        let (mut j, mut kl, mut clipped, mut tokens) = (0f64, 0f64, 0usize, 0usize);
        for b in 0..seqs {
            let rows = b * self.t..(b + 1) * self.t;
            let len = rows.clone().filter(|&r| self.mask[r]).count();
            if len == 0 {
                continue;
            }
            let a = self.advantages[b];
            let w = 1.0 / (seqs as f64 * len as f64);
            for r in rows.filter(|&r| self.mask[r]) {
                let lp = logp[r] as f64;
                let ratio = (lp - self.old.map_or(lp, |o| o[r] as f64)).exp();
                let clip = ratio.clamp(1.0 - self.eps, 1.0 + self.eps);
                // min(r·A, clip(r)·A): the unclipped term carries the gradient when it is the smaller.
                let (surrogate, d_surrogate) = match ratio * a <= clip * a {
                    true => (ratio * a, ratio * a),
                    false => (clip * a, 0.0),
                };
                clipped += (clip != ratio) as usize;
                let (mut k, mut dk) = (0.0, 0.0);
                if let Some(re) = self.reference {
                    let u = re[r] as f64 - lp; // log(π_ref/π)
                    k = u.exp() - u - 1.0;
                    dk = 1.0 - u.exp(); // ∂KL/∂log π
                }
                j += w * (surrogate - self.beta * k);
                d[r] = (-w * (d_surrogate - self.beta * dk)) as f32;
                kl += k;
                tokens += 1;
            }
        }
        let n = tokens.max(1) as f64;
        (Terms { loss: -j, kl: kl / n, clipped: clipped as f64 / n }, d)
    }
}

/// Rewards normalized within each group of `g`: `(r − mean) / std` (0 where a group's rewards
/// are all equal).
pub fn group_advantages(rewards: &[f64], g: usize) -> Vec<f64> {
    rewards
        .chunks(g)
        .flat_map(|grp| {
            let n = grp.len() as f64;
            let mean = grp.iter().sum::<f64>() / n;
            let std = (grp.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / n).sqrt();
            grp.iter().map(move |r| if std > 1e-9 { (r - mean) / std } else { 0.0 })
        })
        .collect()
}

/// One sampled completion.
#[derive(Clone, Debug)]
pub struct Sample {
    pub prompt: usize,
    /// The rendered prompt's ids.
    pub prompt_ids: Vec<u32>,
    /// The completion's ids (its end-of-sentence token included when it stopped).
    pub completion: Vec<u32>,
    pub finished: bool,
}

/// `group` completions of each prompt, sampled together by the batched decode: each prompt's
/// prefill once (its cache copied to the group), then one `forward_batch` step per new token
/// over every unfinished completion.
pub fn rollout(
    model: &DeepseekV3,
    prompts: &[Vec<u32>],
    group: usize,
    params: &SamplingParams,
    max_new_tokens: usize,
) -> Result<Vec<Sample>> {
    let d = model.config.hidden_size;
    let eos = &model.config.eos_token_ids;
    let mut samples = vec![];
    let mut caches = vec![];
    let mut samplers = vec![];
    let mut logits = vec![];
    for (p, ids) in prompts.iter().enumerate() {
        let budget = dsv3_model::generate::new_token_budget(model, ids.len(), max_new_tokens)?;
        let mut cache = model.new_cache();
        let h = model.forward(ids, &mut cache)?;
        let row = model.logits(&h[(ids.len() - 1) * d..], 1);
        for k in 0..group {
            let seed = params.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((p * group + k) as u64);
            samplers.push((Sampler::new(SamplingParams { seed, ..params.clone() }), budget));
            samples.push(Sample { prompt: p, prompt_ids: ids.clone(), completion: vec![], finished: false });
            caches.push(cache.clone());
            logits.push(row.clone());
        }
    }
    let mut alive: Vec<usize> = (0..samples.len()).collect();
    while !alive.is_empty() {
        let mut next = vec![];
        for &i in &alive {
            let tok = samplers[i].0.sample(&logits[i]);
            let s = &mut samples[i];
            s.completion.push(tok);
            s.finished = eos.contains(&tok);
            if !s.finished && s.completion.len() < samplers[i].1 {
                next.push(i);
            }
        }
        alive = next;
        if alive.is_empty() {
            break;
        }
        let toks: Vec<[u32; 1]> = alive.iter().map(|&i| [*samples[i].completion.last().expect("a token")]).collect();
        let mut batch: Vec<(&[u32], &mut dsv3_model::model::KvCache)> = vec![];
        for (i, c) in caches.iter_mut().enumerate() {
            // `alive` is in ascending order.
            if let Some(k) = alive.get(batch.len()).filter(|&&a| a == i).map(|_| batch.len()) {
                batch.push((&toks[k], c));
            }
        }
        let hs = model.forward_batch(&mut batch)?;
        for (&i, h) in alive.iter().zip(&hs) {
            logits[i] = model.logits(h, 1);
        }
    }
    Ok(samples)
}

/// One logged GRPO step (a line of metrics.jsonl).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GrpoLog {
    pub step: u64,
    pub steps: u64,
    /// Mean reward of the step's samples.
    pub reward: f64,
    pub reward_std: f64,
    /// Share of samples whose answer matched (prompts with answers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Share of samples in the `<think>…</think>answer` format, finished.
    pub format: f64,
    /// Mean per-token KL estimate to the reference, at the last update.
    pub kl: f64,
    /// Share of completion tokens whose ratio was clipped, at the last update.
    pub clip_fraction: f64,
    /// Mean completion length (tokens) and the share that stopped before the limit.
    pub response_length: f64,
    pub finished: f64,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f32,
    pub samples_per_second: f64,
    pub generation_seconds: f64,
    pub update_seconds: f64,
    pub elapsed_seconds: f64,
    /// Greedy evaluation (`--eval-prompts`) after this step: mean reward and answer accuracy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_reward: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f64>,
}

/// What a finished run reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GrpoSummary {
    pub out: PathBuf,
    pub steps: u64,
    pub first_reward: f64,
    pub final_reward: f64,
    pub samples_per_second: f64,
    /// Share of the run's time in sampling (the rest: scoring, log-probs and updates).
    pub generation_share: f64,
    /// Greedy evaluation before the first step and after the last: (mean reward, accuracy).
    pub eval_before: Option<(f64, Option<f64>)>,
    pub eval_after: Option<(f64, Option<f64>)>,
}

/// Prompts rendered for the policy, with what scoring needs.
struct PromptSet {
    prompts: Vec<Prompt>,
    ids: Vec<Vec<u32>>,
    /// The rendered prompt ends inside reasoning (`<think>` opened by the template).
    opened: Vec<bool>,
}

impl PromptSet {
    fn new(tok: &Tokenizer, prompts: Vec<Prompt>) -> Result<Self> {
        let ids = prompts
            .iter()
            .map(|p| tok.encode_chat(&p.messages, true))
            .collect::<dsv3_model::Result<_>>()
            .context("rendering the prompts with the chat template")?;
        let opened = prompts
            .iter()
            .map(|p| tok.apply_chat_template(&p.messages, true).map(|t| t.trim_end().ends_with("<think>")))
            .collect::<dsv3_model::Result<_>>()?;
        Ok(PromptSet { prompts, ids, opened })
    }

    /// Each sample's score; `picked[s.prompt]` is the sample's prompt in this set.
    fn score(
        &self,
        tok: &Tokenizer,
        reward: &Reward,
        eos: &[u32],
        samples: &[Sample],
        picked: &[usize],
    ) -> Result<Vec<Score>> {
        samples
            .iter()
            .map(|s| {
                let body: Vec<u32> = s.completion.iter().copied().filter(|t| !eos.contains(t)).collect();
                let text = tok.decode(&body, false)?;
                let i = picked[s.prompt];
                reward.score(&Completion {
                    prompt: &self.prompts[i],
                    text: &text,
                    finished: s.finished,
                    opened: self.opened[i],
                })
            })
            .collect()
    }

    /// Greedy answers to every prompt: (mean reward, accuracy over those with answers).
    fn evaluate(
        &self,
        policy: &DeepseekV3,
        tok: &Tokenizer,
        reward: &Reward,
        max_new: usize,
    ) -> Result<(f64, Option<f64>)> {
        let samples = rollout(policy, &self.ids, 1, &SamplingParams::default(), max_new)?;
        let all: Vec<usize> = (0..self.ids.len()).collect();
        let scores = self.score(tok, reward, &policy.config.eos_token_ids, &samples, &all)?;
        let n = scores.len().max(1) as f64;
        let answered: Vec<bool> = scores.iter().filter_map(|s| s.correct).collect();
        let acc =
            (!answered.is_empty()).then(|| answered.iter().filter(|&&c| c).count() as f64 / answered.len() as f64);
        Ok((scores.iter().map(|s| s.reward).sum::<f64>() / n, acc))
    }
}

/// Runs GRPO from `args.model`, calling `on_log` after every step; the policy is saved into
/// `args.out` (a model folder, with metrics.jsonl and the reward/KL/length plots).
pub fn run(args: &GrpoArgs, mut on_log: impl FnMut(&GrpoLog)) -> Result<GrpoSummary> {
    args.validate()?;
    let (mut policy, config, hf_tok) = crate::trainer::start_from(&args.model, usize::MAX, |_| false)?;
    let tok = Tokenizer::from_dir(&args.model)?;
    if !tok.has_chat_template() {
        bail!("--model {}: no chat template to render the prompts with", args.model.display());
    }
    let tok_config: Option<Value> = std::fs::read_to_string(args.model.join("tokenizer_config.json"))
        .ok()
        .map(|t| serde_json::from_str(&t))
        .transpose()
        .context("tokenizer_config.json")?;
    let numerics = dsv3_model::exec::Training {
        bf16: args.precision != Precision::F32 && dsv3_kernels::gemm::bf16_available(),
        fp8: args.precision.fp8_recipe(),
        dsa_warmup: false,
    };
    policy.training = numerics;
    // The reference stays in its stored format (FP8 or bf16 weights cost no f32 copy).
    let reference = match args.beta > 0.0 {
        true => {
            let mut r = DeepseekV3::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
            r.training = numerics;
            Some(r)
        }
        false => None,
    };
    let reward = match &args.reward_command {
        Some(cmd) => Reward::Command(cmd.clone()),
        None => Reward::Rule(args.reward),
    };
    let prompts = match &args.prompts {
        Some(p) => reward::read_prompts(p)?,
        None => reward::builtin_prompts(4096, args.digits, args.seed ^ 0xADD),
    };
    let eval = match (args.eval_prompts, &args.prompts) {
        (0, _) => None,
        (n, None) => Some(PromptSet::new(&tok, reward::builtin_prompts(n, args.digits, args.seed ^ 0xE7A1))?),
        (n, Some(_)) => Some(PromptSet::new(&tok, prompts.iter().take(n).cloned().collect())?),
    };
    let set = PromptSet::new(&tok, prompts)?;
    let mut order: Vec<usize> = (0..set.prompts.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(args.seed));

    let ocfg = OptimConfig {
        kind: OptimizerKind::Adamw,
        lr: args.lr,
        min_lr_ratio: 1.0,
        warmup_steps: 0,
        total_steps: args.steps * args.updates as u64,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: args.weight_decay,
        clip: args.clip,
    };
    let mut opt = Optimizer::default();
    let mut grads = Grads::default();
    let w = LossWeights { mtp_lambda: 0.0, balance: Balance::default() };
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut metrics = std::fs::File::create(args.out.join("metrics.jsonl"))?;
    let start = Instant::now();
    let (mut gen_total, mut first_reward, mut last) = (0f64, None, GrpoLog::default());
    let evaluate =
        |policy: &DeepseekV3| eval.as_ref().map(|e| e.evaluate(policy, &tok, &reward, args.max_new_tokens)).transpose();
    let eval_before = evaluate(&policy)?;
    let p = args.prompts_per_step;
    for step in 1..=args.steps {
        // This step's prompts, cycling through the shuffled order.
        let picked: Vec<usize> = (0..p).map(|k| order[((step as usize - 1) * p + k) % order.len()]).collect();
        let ids: Vec<Vec<u32>> = picked.iter().map(|&i| set.ids[i].clone()).collect();
        let t0 = Instant::now();
        let params = SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed.wrapping_add(step),
            ..Default::default()
        };
        let samples = rollout(&policy, &ids, args.group, &params, args.max_new_tokens)?;
        let generation = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let eos = policy.config.eos_token_ids.clone();
        let scores = set.score(&tok, &reward, &eos, &samples, &picked)?;
        let rewards: Vec<f64> = scores.iter().map(|s| s.reward).collect();
        let advantages = group_advantages(&rewards, args.group);
        let (tokens, mask, t) = pack(&samples, eos.first().copied().unwrap_or(0));
        let seqs = samples.len();
        let logprobs = |m: &DeepseekV3| -> Result<Vec<f32>> {
            let zero = |lp: &[f32]| (0.0, vec![0f32; lp.len()]);
            Ok(m.train_step_for(&tokens, seqs, t, w, Objective::LogProb(&zero), None)?.label_logprobs)
        };
        let ref_lp = reference.as_ref().map(logprobs).transpose()?;
        let old = if args.updates > 1 { Some(logprobs(&policy)?) } else { None };
        let (mut terms, mut info) = (Terms::default(), None);
        for _ in 0..args.updates {
            let objective = GrpoLoss {
                mask: &mask,
                t,
                advantages: &advantages,
                old: old.as_deref(),
                reference: ref_lp.as_deref(),
                beta: args.beta as f64,
                eps: args.clip_eps as f64,
            };
            let seen = std::sync::Mutex::new(Terms::default());
            let f = |lp: &[f32]| {
                let (tm, d) = objective.evaluate(lp);
                *seen.lock().expect("terms") = tm;
                (tm.loss, d)
            };
            grads.zero();
            policy.train_step_for(&tokens, seqs, t, w, Objective::LogProb(&f), Some(&mut grads))?;
            terms = seen.into_inner().expect("terms");
            if !terms.loss.is_finite() {
                bail!("step {step}: the GRPO loss is {} (lower --lr?)", terms.loss);
            }
            let norm = grads.global_norm();
            info = Some(opt.update(&ocfg, policy.params_mut(), &mut grads, norm));
        }
        let update = t1.elapsed().as_secs_f64();
        gen_total += generation;
        let n = samples.len() as f64;
        let mean = rewards.iter().sum::<f64>() / n;
        let answered: Vec<bool> = scores.iter().filter_map(|s| s.correct).collect();
        let info = info.expect("at least one update");
        let log = GrpoLog {
            step,
            steps: args.steps,
            reward: mean,
            reward_std: (rewards.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / n).sqrt(),
            accuracy: (!answered.is_empty())
                .then(|| answered.iter().filter(|&&c| c).count() as f64 / answered.len() as f64),
            format: scores.iter().filter(|s| s.formatted).count() as f64 / n,
            kl: terms.kl,
            clip_fraction: terms.clipped,
            response_length: samples.iter().map(|s| s.completion.len()).sum::<usize>() as f64 / n,
            finished: samples.iter().filter(|s| s.finished).count() as f64 / n,
            loss: terms.loss,
            grad_norm: info.grad_norm,
            lr: info.lr,
            samples_per_second: n / (generation + update).max(1e-9),
            generation_seconds: generation,
            update_seconds: update,
            elapsed_seconds: start.elapsed().as_secs_f64(),
            ..Default::default()
        };
        let mut log = log;
        if args.eval_every > 0 && step % args.eval_every == 0 || step == args.steps {
            if let Some((r, a)) = evaluate(&policy)? {
                (log.eval_reward, log.eval_accuracy) = (Some(r), a);
            }
        }
        writeln!(metrics, "{}", serde_json::to_string(&log)?)?;
        on_log(&log);
        first_reward.get_or_insert(mean);
        if (args.save_every > 0 && step % args.save_every == 0) || step == args.steps {
            metrics.flush()?;
            let files = Files { config: &config, tokenizer: &hf_tok, tokenizer_config: tok_config.as_ref() };
            checkpoint::save_model(&args.out, &mut policy, files)?;
            if let Err(e) = crate::plot::write_run_plots(&args.out) {
                eprintln!("warning: plots not written: {e:#}");
            }
            metrics = std::fs::OpenOptions::new().append(true).open(args.out.join("metrics.jsonl"))?;
        }
        last = log;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(GrpoSummary {
        out: args.out.clone(),
        steps: args.steps,
        first_reward: first_reward.unwrap_or(0.0),
        final_reward: last.reward,
        samples_per_second: (args.steps as usize * args.group * p) as f64 / elapsed.max(1e-9),
        generation_share: gen_total / elapsed.max(1e-9),
        eval_before,
        eval_after: last.eval_reward.map(|r| (r, last.eval_accuracy)),
    })
}

/// The samples right-padded with `pad` into `[seqs, t + 1]` tokens, and per label whether it is
/// a completion token.
fn pack(samples: &[Sample], pad: u32) -> (Vec<u32>, Vec<bool>, usize) {
    let t = samples.iter().map(|s| s.prompt_ids.len() + s.completion.len()).max().unwrap_or(1).max(2) - 1;
    let mut tokens = Vec::with_capacity(samples.len() * (t + 1));
    let mut mask = Vec::with_capacity(samples.len() * t);
    for s in samples {
        let (p, len) = (s.prompt_ids.len(), s.prompt_ids.len() + s.completion.len());
        tokens.extend(s.prompt_ids.iter().chain(&s.completion).copied());
        tokens.extend(std::iter::repeat_n(pad, t + 1 - len));
        // Label i is the token at i + 1: a completion token when p ≤ i + 1 < len.
        mask.extend((0..t).map(|i| i + 1 >= p && i + 1 < len));
    }
    (tokens, mask, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_normalized_within_groups() {
        let a = group_advantages(&[1.0, 0.0, 0.0, 2.0, 2.0, 2.0], 3);
        let s = 2f64.sqrt();
        let want = [2.0 / s, -1.0 / s, -1.0 / s, 0.0, 0.0, 0.0];
        a.iter().zip(want).for_each(|(a, b)| assert!((a - b).abs() < 1e-12, "{a} vs {b}"));
    }

    /// 2 prompts × 3 samples, 2 labels each (the last sample's second a pad), worked by hand:
    /// label 0 (A = √2, ratio 1, log(π_ref/π) = −0.3) gives −(√2 − 0.1·(1 − e^−0.3))/12; label 1's
    /// ratio e^0.5 is clipped at 1.2 for A > 0 (no gradient); labels 3 and 9 (A = −1/√2, ratio
    /// e^−0.5) are clipped at 0.8; label 10 is its sequence's only token (÷6, not ÷12).
    #[test]
    fn the_grpo_loss_and_its_gradient_on_a_small_case() {
        let lp = [-1.0, -2.0, -0.5, -1.5, -3.0, -0.2, -1.0, -1.0, -2.0, -0.7, -0.4, -9.0];
        let old = [-1.0, -2.5, -0.5, -1.0, -3.0, -0.2, -1.2, -1.0, -2.0, -0.2, -0.4, -9.0];
        let re = [-1.3, -2.0, -0.5, -1.5, -2.0, -0.2, -1.0, -1.0, -2.0, -0.7, -1.1, -9.0];
        let mask: Vec<bool> = (0..12).map(|r| r != 11).collect();
        let adv = group_advantages(&[1.0, 0.0, 0.0, 0.5, 0.5, 1.5], 3);
        let l = GrpoLoss {
            mask: &mask,
            t: 2,
            advantages: &adv,
            old: Some(&old),
            reference: Some(&re),
            beta: 0.1,
            eps: 0.2,
        };
        let (terms, d) = l.evaluate(&lp);
        assert!((terms.loss - -0.024491913967368217).abs() < 1e-6, "{}", terms.loss);
        assert!((terms.kl - 0.08688048663019753).abs() < 1e-6, "{}", terms.kl);
        assert!((terms.clipped - 4.0 / 11.0).abs() < 1e-12);
        let want = [
            -0.11569128203677224,
            0.0,
            0.05892556509887895,
            0.0,
            0.044606549861720246,
            0.05892556509887895,
            0.07197184773791741,
            0.05892556509887897,
            0.05892556509887897,
            0.0,
            -0.22731201545870597,
            0.0,
        ];
        for (r, (&a, b)) in d.iter().zip(want).enumerate() {
            assert!((a as f64 - b).abs() < 1e-6, "label {r}: {a} vs {b}");
        }
        // The gradient is the loss's: central differences (clipped labels are flat there).
        for r in 0..11 {
            let at = |e: f32| {
                let mut x = lp;
                x[r] += e;
                l.evaluate(&x).0.loss
            };
            let num = (at(1e-3) - at(-1e-3)) / 2e-3;
            assert!((num - d[r] as f64).abs() < 1e-4, "label {r}: {num} vs {}", d[r]);
        }
        // The first update (old = current): every ratio is 1, the loss is −mean A (0 per group) + β·KL.
        let first = GrpoLoss { old: None, ..l };
        assert_eq!(first.evaluate(&lp).0.clipped, 0.0);
    }

    #[test]
    fn packing_learns_the_completion_tokens_only() {
        let s = |p: Vec<u32>, c: Vec<u32>| Sample { prompt: 0, prompt_ids: p, completion: c, finished: true };
        let (tokens, mask, t) = pack(&[s(vec![5, 6], vec![7, 1]), s(vec![5], vec![9])], 1);
        assert_eq!(t, 3);
        assert_eq!(tokens, [5, 6, 7, 1, 5, 9, 1, 1]);
        // Labels of row 0: 6 (prompt), 7, 1; of row 1: 9, then pads.
        assert_eq!(mask, [false, true, true, true, false, false]);
    }
}
