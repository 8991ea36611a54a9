//! The training loop, in the order the step runs: data → `DeepseekV3::train_step` (LM + MTP +
//! balance losses, backward) → gradients summed over the layout's processes → clip + AdamW →
//! aux-loss-free bias update → metrics, validation and checkpoints. [`Trainer`] holds a run;
//! [`run`] drives it.

use crate::args::{model_config, TrainArgs};
use crate::balance::{max_vio, update_biases};
use crate::chats;
use crate::checkpoint::{self, TrainState};
use crate::data::{self, Loader, LoaderState, Split};
use crate::holders::Holders;
use crate::optim::{OptimConfig, Optimizer, OptimizerKind};
use crate::parallel::{all_reduce_step, pipeline_step, Layout};
use anyhow::{bail, Context, Result};
use dsv3_model::grad::model::LossWeights;
use dsv3_model::grad::Grads;
use dsv3_model::init::write_training_init;
use dsv3_model::DeepseekV3;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// One logged step (a line of metrics.jsonl).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StepLog {
    pub step: u64,
    pub steps: u64,
    pub loss: f64,
    pub lm_loss: f64,
    pub mtp_losses: Vec<f64>,
    pub balance_loss: f64,
    /// V3.2: the indexers' KL loss, summed over the layers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub indexer_loss: Option<f64>,
    /// In DSA's dense warm-up (only the indexers train).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dsa_warmup: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Global MaxVio over the validation windows (mean over MoE layers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_maxvio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_mtp_top1: Option<f64>,
    pub lr: f32,
    pub grad_norm: f64,
    /// MaxVio of this batch: mean over MoE layers, and per layer.
    pub maxvio: f64,
    pub maxvio_per_layer: Vec<f64>,
    /// Tokens per expert of each MoE layer this step.
    pub expert_load: Vec<Vec<usize>>,
    /// Smallest and largest routing bias over all MoE layers.
    pub bias_range: (f32, f32),
    pub mtp_top1: Option<f64>,
    /// Supervised fine-tuning: the labels learned this step (the assistant's tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learned_tokens: Option<u64>,
    pub tokens_seen: u64,
    pub tokens_per_second: f64,
    pub elapsed_seconds: f64,
    pub eta_seconds: f64,
}

/// What a finished run reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub out: PathBuf,
    pub steps: u64,
    /// Steps this invocation ran (fewer than `steps` after a resume).
    pub steps_run: u64,
    pub final_loss: f64,
    pub final_lm_loss: f64,
    pub val_loss: Option<f64>,
    pub val_maxvio: Option<f64>,
    pub val_mtp_top1: Option<f64>,
    pub tokens_per_second: f64,
    pub parameters: usize,
    /// Model FLOPs per training token and the achieved rate (see [`train_flops_per_token`]).
    pub flops_per_token: f64,
    pub model_gflops_per_second: f64,
}

/// A run in progress: the model, its optimizer, data and place in the schedule, and how this
/// process shares the work ([`Layout`]).
pub struct Trainer<'l> {
    pub args: TrainArgs,
    layout: &'l Layout,
    pub model: DeepseekV3,
    config: Value,
    tok: tokenizers::Tokenizer,
    /// tokenizer_config.json of the model the run started from (its chat template), if any.
    tok_config: Option<Value>,
    /// Supervised fine-tuning: how the chats became examples.
    pub examples: Option<chats::ExampleStats>,
    opt: Optimizer,
    ocfg: OptimConfig,
    pub state: TrainState,
    train: Split,
    val: Split,
    loader: Loader,
    /// Who holds and updates each parameter (parallel runs).
    holders: Option<Holders>,
    grads: Grads,
    metrics: std::fs::File,
    start: Instant,
    start_step: u64,
    parameters: usize,
    flops_per_token: f64,
}

impl<'l> Trainer<'l> {
    /// A fresh run from `args`, or the run saved in `resume` (extended to `args.steps`, written to
    /// `args.out`), with this process's share of it under `layout`.
    pub fn setup(args: TrainArgs, layout: &'l Layout, resume: Option<&Path>) -> Result<Self> {
        let args = args.resolved();
        args.validate()?;
        if layout.rank() == 0 {
            // Saves interrupted before (a crash, a kill) leave their temporary folders beside the run.
            for dir in std::iter::once(args.out.as_path()).chain(resume) {
                for line in checkpoint::recover_interrupted(dir)? {
                    eprintln!("{line}");
                }
            }
        }
        // In parallel the first load reads no weight (shapes only): once it is known which tensors
        // this process holds, only those are read.
        let parallel = layout.dp.is_some();
        // Where the weights are read from: the saved run, the starting model, or a fresh init.
        let mut init_dir = None;
        let (mut model, config, tok, mut opt, state, source) = match (resume, &args.model) {
            (Some(dir), _) => {
                let mut state = checkpoint::read_state(dir)?;
                // A resume may extend the run (more steps) and write elsewhere; the rest is the run's.
                state.args.steps = args.steps.max(state.step);
                state.args.out = args.out.clone();
                // (The optimizer's moments are read below, once it is known which this process keeps.)
                match (state.args.lora(), state.args.model.clone()) {
                    // A LoRA run's checkpoint holds its adapters; the base is read where it was.
                    (Some(_), Some(base)) => {
                        let (mut model, config, tok) = start_from(&base, state.args.mtp_depth, |_| false)?;
                        model.load_peft(dir).with_context(|| format!("--resume {}", dir.display()))?;
                        (model, config, tok, Optimizer::default(), state, base)
                    }
                    _ => {
                        let r = checkpoint::load(dir, move |_| parallel)?;
                        (r.model, r.config, r.tokenizer, Optimizer::default(), state, dir.to_path_buf())
                    }
                }
            }
            (None, Some(dir)) => {
                let (mut model, config, tok) = start_from(dir, args.mtp_depth, move |_| parallel)?;
                if let Some(cfg) = args.lora() {
                    let names = model.add_lora(&cfg, args.seed)?;
                    eprintln!("LoRA rank {} (α {}) on {} modules, e.g. {}", cfg.rank, cfg.alpha, names.len(), names[0]);
                }
                let state = TrainState { step: 0, tokens_seen: 0, loader: LoaderState::default(), args: args.clone() };
                (model, config, tok, Optimizer::default(), state, dir.clone())
            }
            (None, None) => {
                let docs =
                    if args.data.is_empty() { data::builtin_corpus() } else { data::read_documents(&args.data)? };
                let tok = match &args.tokenizer {
                    Some(dir) => tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
                        .map_err(|e| anyhow::anyhow!("--tokenizer {}: {e}", dir.display()))?,
                    None => data::train_tokenizer(&docs, args.vocab_size)?,
                };
                let config = model_config(&args, tok.get_vocab_size(true))?;
                let dir = fresh_init(&config, &args, layout)?;
                let model = DeepseekV3::load_skipping(&dir.0, move |_| parallel);
                let source = dir.0.clone();
                init_dir = Some(dir);
                let state = TrainState { step: 0, tokens_seen: 0, loader: LoaderState::default(), args: args.clone() };
                (model?, config, tok, Optimizer::default(), state, source)
            }
        };
        let args = state.args.clone();
        args.validate()?;
        if args.lora_rank > 0 && layout.dp.is_some() {
            bail!("--lora-rank with a parallel layout is not supported yet: train adapters on one process");
        }
        if args.seq_len > model.config.max_position_embeddings {
            bail!(
                "--seq-len {} exceeds the model's max_position_embeddings {}",
                args.seq_len,
                model.config.max_position_embeddings
            );
        }
        // The tokenizer's settings (and chat template) travel with the run.
        let tok_config = match std::fs::read_to_string(source.join("tokenizer_config.json")) {
            Ok(text) if init_dir.is_none() => Some(
                serde_json::from_str(&text).with_context(|| format!("{}/tokenizer_config.json", source.display()))?,
            ),
            _ => None,
        };
        let (train, val, examples) = if args.chats {
            let chat_tok = dsv3_model::Tokenizer::from_dir(&source)?;
            let chats = if args.data.is_empty() { chats::builtin_chats() } else { chats::read_chats(&args.data)? };
            let pad = model.config.eos_token_ids.first().copied().unwrap_or(0);
            let (train, val, stats) = chats::pad_examples(&chat_tok, &chats, args.seq_len, pad, 20)?;
            (train, val, Some(stats))
        } else {
            let docs = if args.data.is_empty() { data::builtin_corpus() } else { data::read_documents(&args.data)? };
            let (train, val) = data::pack(&tok, &docs, args.seq_len, 20)?;
            (train, val, None)
        };
        let loader = Loader::new(&train, args.seed, state.loader);
        let parameters: usize = model.param_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        check_layout(&model, layout, &args)?;
        // Who holds and updates what; this process then reads what it holds.
        let holders = layout.dp.as_ref().map(|dp| {
            let p = Holders::new(&mut model, dp.as_ref(), layout.pipeline, layout.experts.is_some(), layout.zero1);
            let (held, total, updated) = p.sizes();
            eprintln!(
                "process {}/{}: holds {held} of the model's {total} parameters, updates (and keeps optimizer moments for) {updated}",
                dp.rank(),
                dp.size()
            );
            p
        });
        if let Some(p) = &holders {
            let held: std::collections::HashSet<String> =
                model.param_shapes().into_iter().map(|(n, _)| n).filter(|n| p.holds(n)).collect();
            model = DeepseekV3::load_skipping(&source, move |n| !held.contains(n))
                .with_context(|| format!("loading {}", source.display()))?;
            model.mtp.truncate(config["num_nextn_predict_layers"].as_u64().unwrap_or(0) as usize);
            p.drop_foreign(&mut model, &mut opt);
        }
        if let (Some(dp), Some(_)) = (&layout.dp, &init_dir) {
            // Every process has read the shared initial weights before rank 0 removes them.
            dp.all_reduce_sum(&mut [0.0]);
        }
        drop(init_dir);
        if args.dsa_warmup_steps > 0 && model.config.indexer.is_none() {
            bail!("--dsa-warmup-steps: the model has no indexer (DSA is DeepSeek-V3.2's; try --preset tiny-v32)");
        }
        model.training = args.numerics();
        if let Some(ex) = &layout.experts {
            model.set_experts(Arc::new(ex.clone()));
        }
        if let Some(dir) = resume {
            opt = checkpoint::load_optimizer(dir, &|n| holders.as_ref().is_none_or(|p| p.updates(n)))?;
        }
        let flops_per_token = model.config.shape().train_flops_per_token(args.seq_len);
        std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
        let metrics = open_metrics(&args.out)?;
        let start_step = state.step;
        let grads = match args.lora_rank > 0 {
            true => Grads::only(DeepseekV3::is_lora_param),
            false => Grads::default(),
        };
        Ok(Trainer {
            ocfg: args.optim(),
            args,
            layout,
            model,
            config,
            tok,
            tok_config,
            examples,
            opt,
            state,
            train,
            val,
            loader,
            holders,
            grads,
            metrics,
            start: Instant::now(),
            start_step,
            parameters,
            flops_per_token,
        })
    }

    /// One step of the whole batch: this process's share forward and backward, the gradients
    /// summed over the processes holding each parameter, clip and update, the bias update.
    pub fn step(&mut self) -> Result<(StepLog, LossWeights)> {
        let (args, layout) = (&self.args, self.layout);
        let step = self.state.step + 1;
        let w = args.loss_weights(step);
        let batch = self.loader.next_batch(&self.train, args.batch_size);
        let warmup = self.model.config.indexer.is_some() && args.dsa_warmup(step);
        self.model.training.dsa_warmup = warmup;
        self.grads.zero();
        let (rank, size) = (layout.rank(), layout.processes());
        let mut report = match (&layout.dp, layout.pipeline) {
            (Some(_), Some(_)) => pipeline_step(layout, &self.model, &batch, args, w, &mut self.grads)?,
            _ => {
                // This process's share of the batch: sequences rank·shard .. (rank+1)·shard.
                let (shard, row) = (args.batch_size / size, args.seq_len + 1);
                let mine = &batch.tokens[rank * shard * row..(rank + 1) * shard * row];
                let labels =
                    batch.labels.as_ref().map(|l| &l[rank * shard * args.seq_len..(rank + 1) * shard * args.seq_len]);
                self.model.train_step_masked(mine, shard, args.seq_len, w, labels, Some(&mut self.grads))?
            }
        };
        if warmup {
            // DSA's warm-up trains the indexers alone: the rest of the model is frozen.
            self.grads.map.iter_mut().filter(|(k, _)| !is_indexer(k)).for_each(|(_, g)| g.fill(0.0));
        }
        let grad_norm = match &layout.dp {
            Some(dp) => {
                let holders = self.holders.as_ref().expect("holders under data parallelism");
                let micro_batches = layout.pipeline.map(|p| p.chunks * dp.size() / p.stages);
                all_reduce_step(dp.as_ref(), holders, &mut self.grads, &mut report, micro_batches)
            }
            None => self.grads.global_norm(),
        };
        if !report.loss.is_finite() {
            bail!("step {step}: the loss is {} (lower --lr?); the last checkpoint is intact", report.loss);
        }
        let lora = args.lora_rank > 0;
        let mut params = self.model.params_mut_where(|n| !lora || DeepseekV3::is_lora_param(n));
        if let Some(p) = &self.holders {
            params.retain(|x| p.updates(&x.name));
        }
        if warmup {
            params.retain(|x| is_indexer(&x.name));
        }
        let info = self.opt.update(&self.ocfg, params, &mut self.grads, grad_norm);
        if let (Some(p), Some(dp)) = (&self.holders, &layout.dp) {
            p.share_params(dp.as_ref(), &mut self.model);
        }
        update_biases(&mut self.model, &report.load, args.bias_rate(step), args.bias_zero_mean);
        self.state.step = step;
        self.state.tokens_seen += (args.batch_size * args.seq_len) as u64;
        self.state.loader = self.loader.state;

        let elapsed = self.start.elapsed().as_secs_f64();
        let ran = (step - self.start_step) as f64;
        let tps = ran * (args.batch_size * args.seq_len) as f64 / elapsed.max(1e-9);
        let biases: Vec<f32> = self.model.routing_biases_mut().iter().flat_map(|(_, b)| b.iter().copied()).collect();
        let mut log = StepLog {
            step,
            steps: args.steps,
            loss: report.loss,
            lm_loss: report.lm_loss,
            mtp_losses: report.mtp_losses.clone(),
            balance_loss: report.balance_loss,
            indexer_loss: self.model.config.indexer.map(|_| report.indexer_loss),
            dsa_warmup: warmup,
            lr: info.lr,
            grad_norm: info.grad_norm,
            maxvio_per_layer: report.load.iter().map(|(_, c)| max_vio(c)).collect(),
            expert_load: report.load.iter().map(|(_, c)| c.clone()).collect(),
            bias_range: biases.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x))),
            mtp_top1: report.mtp_top1,
            learned_tokens: batch.labels.as_ref().map(|l| l.iter().filter(|&&x| x).count() as u64),
            tokens_seen: self.state.tokens_seen,
            tokens_per_second: tps,
            elapsed_seconds: elapsed,
            eta_seconds: (args.steps - step) as f64 * elapsed / ran,
            ..Default::default()
        };
        log.maxvio = log.maxvio_per_layer.iter().sum::<f64>() / log.maxvio_per_layer.len().max(1) as f64;
        if biases.is_empty() {
            log.bias_range = (0.0, 0.0);
        }
        Ok((log, w))
    }

    /// The validation loss, global MaxVio and MTP top-1 agreement into `log`.
    pub fn evaluate(&self, w: LossWeights, log: &mut StepLog) -> Result<()> {
        if let Some((vl, mv, top1)) = evaluate(&self.model, self.layout, &self.val, &self.args, w)? {
            log.val_loss = Some(vl);
            log.val_maxvio = Some(mv);
            log.val_mtp_top1 = top1;
        }
        Ok(())
    }

    /// Appends `log` to metrics.jsonl (rank 0).
    pub fn write_log(&mut self, log: &StepLog) -> Result<()> {
        writeln!(self.metrics, "{}", serde_json::to_string(log)?)?;
        Ok(())
    }

    /// A checkpoint of the run: rank 0 first collects what the others hold, then writes the
    /// folder (and the plots); the others drop again what they do not hold.
    pub fn save(&mut self) -> Result<()> {
        let layout = self.layout;
        if let (Some(p), Some(dp)) = (&self.holders, &layout.dp) {
            p.gather_to_rank0(dp.as_ref(), &mut self.model, &mut self.opt, self.args.optimizer == OptimizerKind::Adamw);
        }
        if layout.rank() == 0 {
            self.metrics.flush()?;
            let files = checkpoint::Files {
                config: &self.config,
                tokenizer: &self.tok,
                tokenizer_config: self.tok_config.as_ref(),
            };
            match (self.args.lora(), &self.args.model) {
                (Some(cfg), Some(base)) => {
                    let adapters = checkpoint::Adapters { lora: &cfg, base };
                    checkpoint::save_adapters(&self.args.out, &mut self.model, adapters, &self.opt, &self.state)?
                }
                _ => checkpoint::save(&self.args.out, &mut self.model, files, &self.opt, &self.state)?,
            }
            if let Err(e) = crate::plot::write_run_plots(&self.args.out) {
                eprintln!("warning: plots not written: {e:#}");
            }
            self.metrics = open_metrics(&self.args.out)?;
        }
        if let Some(p) = &self.holders {
            p.drop_foreign(&mut self.model, &mut self.opt);
        }
        Ok(())
    }

    fn summary(&self, last: &StepLog) -> Summary {
        Summary {
            out: self.args.out.clone(),
            steps: self.state.step,
            steps_run: self.state.step - self.start_step,
            final_loss: last.loss,
            final_lm_loss: last.lm_loss,
            val_loss: last.val_loss,
            val_maxvio: last.val_maxvio,
            val_mtp_top1: last.val_mtp_top1,
            tokens_per_second: last.tokens_per_second,
            parameters: self.parameters,
            flops_per_token: self.flops_per_token,
            model_gflops_per_second: self.flops_per_token * last.tokens_per_second / 1e9,
        }
    }
}

/// Trains (or resumes) a run under `layout`, calling `on_log` for every logged step. `stop_at`
/// ends it early (with a checkpoint) while the schedule still spans `args.steps`: an
/// interrupted run.
pub fn run(
    args: TrainArgs,
    layout: &Layout,
    resume: Option<&Path>,
    stop_at: Option<u64>,
    mut on_log: impl FnMut(&StepLog),
) -> Result<Summary> {
    let mut t = Trainer::setup(args, layout, resume)?;
    let end = stop_at.unwrap_or(t.args.steps).min(t.args.steps);
    let mut last = StepLog::default();
    while t.state.step < end {
        let (mut log, w) = t.step()?;
        let (step, a) = (log.step, &t.args);
        let eval_now = (a.eval_every > 0 && step % a.eval_every == 0) || step == a.steps;
        let log_now = a.log_every > 0 && (step % a.log_every == 0 || eval_now);
        let save_now = (a.save_every > 0 && step % a.save_every == 0) || step == end;
        if eval_now {
            t.evaluate(w, &mut log)?;
        }
        if layout.rank() == 0 && log_now {
            t.write_log(&log)?;
            on_log(&log);
        }
        if save_now {
            t.save()?;
        }
        last = log;
    }
    Ok(t.summary(&last))
}

/// What the layout needs of the model and the batch, checked before the first step.
fn check_layout(model: &DeepseekV3, layout: &Layout, args: &TrainArgs) -> Result<()> {
    if let Some(ex) = &layout.experts {
        let (experts, ranks) = (model.config.n_routed_experts, ex.forward.size());
        if model.moe_layers().is_empty() || experts < ranks {
            bail!(
                "--expert-parallel: {ranks} processes for {experts} routed experts in {} MoE layers",
                model.moe_layers().len()
            );
        }
    }
    // Data-parallel shares of each batch: one per process, or one per pipeline.
    let size = layout.processes();
    let shard_count = layout.pipeline.map_or(size, |p| size / p.stages);
    if !args.batch_size.is_multiple_of(shard_count) {
        bail!("--batch-size {} does not divide among {shard_count} data-parallel shares", args.batch_size);
    }
    if let Some(p) = layout.pipeline {
        if !(args.batch_size / shard_count).is_multiple_of(p.chunks) {
            bail!(
                "--batch-size {}: {} sequences per pipeline do not divide into {} micro-batches",
                args.batch_size,
                args.batch_size / shard_count,
                p.chunks
            );
        }
        dsv3_dist::schedule::generate(p.kind, p.stages, p.chunks).map_err(|e| anyhow::anyhow!("--pipeline: {e}"))?;
        let positions = dsv3_dist::pipeline::positions(p.kind, p.stages);
        if positions > model.layers.len() {
            bail!("--pipeline: {positions} stages for {} decoder layers", model.layers.len());
        }
    }
    Ok(())
}

fn open_metrics(out: &Path) -> Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new().create(true).append(true).open(out.join("metrics.jsonl"))?)
}

/// The validation loss, MTP top-1 agreement, and global MaxVio (loads summed over the windows).
fn evaluate(
    model: &DeepseekV3,
    layout: &Layout,
    val: &Split,
    args: &TrainArgs,
    w: LossWeights,
) -> Result<Option<(f64, f64, Option<f64>)>> {
    let n = val.windows().min(args.eval_windows);
    if n == 0 {
        return Ok(None);
    }
    // In parallel, each data-parallel replica (a process, or a pipeline) takes its share of every
    // batch; one with no share runs the batch's first window uncounted, since expert parallelism
    // needs every replica in every MoE layer. The sums below add up what each process computed.
    let dp = layout.dp.as_ref();
    let pipelined = dp.zip(layout.pipeline);
    let stages = pipelined.map_or(1, |(_, p)| p.stages);
    let (replica, replicas) = dp.map_or((0, 1), |dp| (dp.rank() / stages, dp.size() / stages));
    let (mut loss, mut top1, mut tops) = (0f64, 0f64, 0f64);
    let moe_layers: Vec<usize> =
        (0..model.layers.len() + model.mtp.len()).filter(|&l| model.config.is_moe_layer(l)).collect();
    let mut load: Vec<Vec<f64>> = vec![vec![0.0; model.config.n_routed_experts]; moe_layers.len()];
    for i in (0..n).step_by(args.batch_size) {
        let b = args.batch_size.min(n - i);
        let per = b.div_ceil(replicas);
        let mine = (replica * per).min(b)..((replica + 1) * per).min(b);
        let counted = !mine.is_empty();
        let windows = if counted { i + mine.start..i + mine.end } else { i..i + 1 };
        let b = windows.len();
        let batch = val.batch(windows);
        let r = match pipelined {
            Some((dp, p)) => crate::pipeline::forward_only(dp.as_ref(), p, model, &batch, b, args.seq_len, w)?,
            None => model.train_step_masked(&batch.tokens, b, args.seq_len, w, batch.labels.as_deref(), None)?,
        };
        if !counted {
            continue;
        }
        loss += r.lm_loss * b as f64;
        if let Some(t) = r.mtp_top1 {
            top1 += t * b as f64;
            tops += b as f64;
        }
        for (l, c) in r.load {
            let slot = moe_layers.iter().position(|&x| x == l).expect("a MoE layer");
            load[slot].iter_mut().zip(&c).for_each(|(a, &c)| *a += c as f64);
        }
    }
    if let Some(dp) = dp {
        let mut flat = vec![loss, top1, tops];
        flat.extend(load.iter().flatten());
        dp.all_reduce_sum(&mut flat);
        (loss, top1, tops) = (flat[0], flat[1], flat[2]);
        load.iter_mut().flatten().zip(&flat[3..]).for_each(|(a, &b)| *a = b);
    }
    let load: Vec<Vec<usize>> = load.into_iter().map(|c| c.into_iter().map(|v| v as usize).collect()).collect();
    let mv = load.iter().map(|c| max_vio(c)).sum::<f64>() / load.len().max(1) as f64;
    Ok(Some((loss / n as f64, mv, (tops > 0.0).then(|| top1 / tops))))
}

/// A folder of initial weights a fresh run loads from, removed when dropped by the process that
/// wrote it.
struct TempDir(PathBuf, bool);

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.1 {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }
}

/// Writes a fresh run's random initial weights. In parallel, rank 0 writes them and the
/// processes that see its folder (on its machine, or a shared file system) read them there; the
/// others write their own copy (the same bytes: the same seed).
fn fresh_init(config: &serde_json::Value, args: &TrainArgs, layout: &Layout) -> Result<TempDir> {
    // Named by process and by run within it (two runs in one process must not share a folder).
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = |pid: u32, run: usize| std::env::temp_dir().join(format!("dsv3-train-init-{pid}-{run}"));
    let write = || -> Result<TempDir> {
        let dir = TempDir(name(std::process::id(), run), true);
        write_training_init(&dir.0, config, args.seed, args.init_std)?;
        Ok(dir)
    };
    let Some(dp) = &layout.dp else { return write() };
    // Rank 0 writes first (and reaches the sum even when it fails, so that none waits forever),
    // then says where (its process id) and whether it succeeded.
    let first = (dp.rank() == 0).then(write);
    let mut said = [0.0, 0.0, 0.0];
    if let Some(r) = &first {
        said = [std::process::id() as f64, r.is_ok() as u8 as f64, run as f64];
    }
    dp.all_reduce_sum(&mut said);
    if let Some(r) = first {
        return r;
    }
    if said[1] == 0.0 {
        bail!("rank 0 could not write the initial weights (its error says why)");
    }
    let shared = name(said[0] as u32, said[2] as usize);
    match shared.join("model.safetensors").is_file() && shared.join("config.json").is_file() {
        true => Ok(TempDir(shared, false)),
        false => write(),
    }
}

/// The model in `dir` to start a run from: weights (f32 masters once trained), its config for
/// an f32 checkpoint with at most `mtp_depth` MTP modules, and its tokenizer.
pub(crate) fn start_from(
    dir: &Path,
    mtp_depth: usize,
    skip: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> Result<(DeepseekV3, Value, tokenizers::Tokenizer)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("--model {}", path.display()))?;
    let mut config: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let mut model =
        DeepseekV3::load_skipping(dir, skip).with_context(|| format!("loading --model {}", dir.display()))?;
    model.mtp.truncate(mtp_depth);
    model.config.num_nextn_predict_layers = model.mtp.len();
    config["num_nextn_predict_layers"] = model.mtp.len().into();
    config["torch_dtype"] = "float32".into();
    if let Some(o) = config.as_object_mut() {
        o.remove("quantization_config"); // the run saves f32 weights
    }
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("--model {}: tokenizer.json: {e}", dir.display()))?;
    Ok((model, config, tok))
}

/// A V3.2 indexer's parameter (what DSA's warm-up trains).
fn is_indexer(name: &str) -> bool {
    name.contains(".self_attn.indexer.")
}
