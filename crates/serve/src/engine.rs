//! The scheduler: one thread owns the model and runs continuous batching. Every step it admits
//! queued requests (within the batch limit and the KV-cache budget), takes one chunk of each
//! prefilling prompt (so a long prompt does not stall the others) and the last token of each
//! decoding sequence, runs them in one `forward_batch` (weights read once for all), samples, and
//! streams each new token to its request. A request leaves as soon as it finishes, hits a stop,
//! or its client goes away; its cache blocks are freed at once (shared prefix blocks live on in
//! the prefix cache).

use crate::grammar::{Constraint, Mask};
use crate::metrics::Metrics;
use crate::prefix::PrefixCache;
use dsv3_model::paged::{BlockPool, LatentCache, BLOCK_TOKENS};
use dsv3_model::sampling::{log_prob, top_k_logprobs, Sampler, SamplingParams};
use dsv3_model::speculative::Speculator;
use dsv3_model::{DeepseekV3, KvCache};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a request asks the engine for (already tokenized and validated).
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_ids: Vec<u32>,
    /// Log-probs of the chosen token and this many alternatives per step (None: off).
    pub logprobs: Option<usize>,
    /// Log-probs of each prompt token after the first, with this many alternatives (None: off);
    /// sent as [`Event::Prompt`] while the prompt runs (`echo` and vLLM's `prompt_logprobs`).
    pub prompt_logprobs: Option<usize>,
    /// The stop ids are masked until this many tokens were generated.
    pub min_tokens: usize,
    /// A grammar the output must follow (structured output, forced tool calls).
    pub constraint: Option<Constraint>,
    /// The served LoRA adapter (`--lora`) the request runs through: 0 for the base model.
    pub adapter: u16,
}

impl GenRequest {
    /// Whether MTP speculation can serve this request: it draws from the plain distribution and
    /// reports no log-probs.
    fn plain(&self) -> bool {
        self.logprobs.is_none()
            && self.prompt_logprobs.is_none()
            && self.min_tokens == 0
            && self.sampling.penalties.is_neutral()
            && self.constraint.is_none()
            && self.adapter == 0
    }
}

/// One generated token.
#[derive(Clone, Debug)]
pub struct TokenOut {
    pub id: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
    /// The token's rank in its distribution (1: the most likely), for prompt tokens.
    pub rank: Option<usize>,
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

/// What the engine sends back, in order: the prompt's log-probs when asked (in pieces, in order),
/// tokens, then one `Done`.
#[derive(Clone, Debug)]
pub enum Event {
    /// Prompt tokens (positions 1.. of the prompt) with their log-probs.
    Prompt(Vec<TokenOut>),
    Token(TokenOut),
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

/// A request on its way in: the work and where its events go.
pub struct Job {
    pub req: GenRequest,
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
    pub queued_at: Instant,
}

#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Most sequences in one step.
    pub max_batch: usize,
    /// Prompt tokens of one sequence per step.
    pub prefill_chunk: usize,
    /// 64-position blocks (of one layer) the latent cache may hold: `--kv-memory` ÷ block bytes.
    pub kv_blocks: usize,
    /// Layer caches per sequence (main layers, plus the MTP modules when speculating).
    pub cache_layers: usize,
    /// The longest prompt + completion one request can have within the budget.
    pub kv_tokens: usize,
    /// Share full prompt blocks across requests with the same prefix (`--prefix-cache`).
    pub prefix_cache: bool,
    /// Requests waiting beyond the running ones; more are refused (HTTP 429).
    pub max_queue: usize,
    /// MTP drafts per step for each decoding sequence (0: off). Requests that ask for log-probs,
    /// penalties or `min_tokens` decode plainly.
    pub mtp_speculative: usize,
}

/// The handle HTTP handlers submit through.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    pub metrics: Arc<Metrics>,
    pub config: EngineConfig,
}

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull,
    ShuttingDown,
}

impl EngineHandle {
    pub fn submit(&self, req: GenRequest) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>, SubmitError> {
        let (etx, erx) = tokio::sync::mpsc::unbounded_channel();
        match self.tx.try_send(Job { req, events: etx, queued_at: Instant::now() }) {
            Ok(()) => {
                self.metrics.queued.fetch_add(1, Ordering::Relaxed);
                Ok(erx)
            }
            Err(TrySendError::Full(_)) => Err(SubmitError::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::ShuttingDown),
        }
    }
}

struct Seq {
    job: Job,
    cache: KvCache,
    sampler: Sampler,
    /// Prompt tokens already run.
    prefilled: usize,
    /// The last chosen token, not yet run (decoding).
    pending: Option<u32>,
    generated: usize,
    started: Instant,
    last_token_at: Option<Instant>,
    /// Speculative decoding: the prompt's states gathered over its chunks, then the drafter.
    prompt_h: Vec<f32>,
    spec: Option<Speculator>,
    /// The request's grammar, following the chosen tokens.
    constraint: Option<Constraint>,
}

/// What emitting a token decided.
enum Emit {
    Continue,
    /// Finished, or the client went away: drop the sequence.
    End,
}

impl Seq {
    fn speculative(&self, k: usize) -> bool {
        k > 0 && self.job.req.plain()
    }

    fn emit(&mut self, tok: TokenOut, metrics: &Metrics) -> Emit {
        let now = Instant::now();
        match self.last_token_at {
            None => metrics.ttft.observe(now.duration_since(self.job.queued_at).as_secs_f64()),
            Some(t) => metrics.tpot.observe(now.duration_since(t).as_secs_f64()),
        }
        self.last_token_at = Some(now);
        self.generated += 1;
        metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let id = tok.id;
        let sent = self.job.events.send(Event::Token(tok)).is_ok();
        let finish = if self.job.req.stop_ids.contains(&id) {
            Some(Finish::Stop)
        } else if self.generated >= self.job.req.max_tokens {
            Some(Finish::Length)
        } else {
            None
        };
        self.pending = Some(id);
        if let Some(finish) = finish {
            metrics.finished(finish);
            let _ = self.job.events.send(Event::Done {
                finish,
                prompt_tokens: self.job.req.prompt.len(),
                completion_tokens: self.generated,
            });
            return Emit::End;
        }
        if !sent {
            // The client went away: free its cache now.
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            return Emit::End;
        }
        Emit::Continue
    }

    /// What this sequence runs next: its pending token (decoding), or its prompt's next chunk.
    fn next_input(&self, chunk: usize) -> Vec<u32> {
        match self.pending {
            Some(t) => vec![t],
            None => {
                let p = &self.job.req.prompt;
                p[self.prefilled..(self.prefilled + chunk).min(p.len())].to_vec()
            }
        }
    }

    /// Ends the request after a failure inside the engine (inputs were validated; this is a bug or
    /// a resource error): the client gets what was generated and a clean end.
    fn end_early(&self) {
        self.end_early_with(Finish::Stop)
    }

    fn end_early_with(&self, finish: Finish) {
        let (prompt_tokens, completion_tokens) = (self.job.req.prompt.len(), self.generated);
        let _ = self.job.events.send(Event::Done { finish, prompt_tokens, completion_tokens });
    }

    /// Whether this step ends with a token chosen for this sequence: it decodes, or its prompt's
    /// last chunk runs and it generates.
    fn samples_after(&self, chunk: usize) -> bool {
        let p = self.job.req.prompt.len();
        self.pending.is_some() || (self.prefilled + chunk >= p && self.job.req.max_tokens > 0)
    }

    /// Blocks this sequence may still allocate before it ends.
    fn growth(&self, cfg: &EngineConfig) -> usize {
        blocks_for(self.job.req.prompt.len() + self.job.req.max_tokens, cfg).saturating_sub(self.cache.blocks())
    }
}

/// Blocks a sequence of `tokens` positions holds over all its layer caches.
fn blocks_for(tokens: usize, cfg: &EngineConfig) -> usize {
    tokens.div_ceil(BLOCK_TOKENS) * cfg.cache_layers
}

/// Starts the engine thread. It runs until every handle is dropped and the running sequences end.
pub fn start(model: Arc<DeepseekV3>, config: EngineConfig) -> (EngineHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(config.max_queue.max(1));
    let metrics = Arc::new(Metrics::default());
    let m = metrics.clone();
    let thread = std::thread::Builder::new()
        .name("dsv3-engine".into())
        .spawn(move || run(&model, config, rx, &m, BlockPool::new(config.kv_blocks)))
        .expect("spawning the engine thread");
    (EngineHandle { tx, metrics, config }, thread)
}

fn run(model: &DeepseekV3, config: EngineConfig, rx: Receiver<Job>, metrics: &Metrics, pool: Arc<BlockPool>) {
    let mut sched = Scheduler {
        model,
        config,
        metrics,
        pool,
        waiting: Default::default(),
        running: vec![],
        prefixes: PrefixCache::default(),
        closed: false,
    };
    metrics.kv_blocks_capacity.store(config.kv_blocks, Ordering::Relaxed);
    loop {
        sched.take_in(&rx);
        if sched.closed && sched.running.is_empty() && sched.waiting.is_empty() {
            return;
        }
        sched.admit();
        if sched.running.is_empty() {
            continue;
        }
        sched.publish_gauges();
        let mut keep = vec![true; sched.running.len()];
        sched.step_speculative(&mut keep);
        sched.step_batched(&mut keep);
        sched.retire(&keep);
    }
}

/// The engine's state between steps: what waits, what runs, the shared prefixes.
struct Scheduler<'a> {
    model: &'a DeepseekV3,
    config: EngineConfig,
    metrics: &'a Metrics,
    pool: Arc<BlockPool>,
    waiting: std::collections::VecDeque<Job>,
    running: Vec<Seq>,
    prefixes: PrefixCache,
    /// Every handle is gone: finish what runs, take nothing new.
    closed: bool,
}

impl Scheduler<'_> {
    /// Takes in what arrived, but no more than the batch can admit: the rest waits in the bounded
    /// channel, which is what makes a flood answer 429 instead of queueing without limit. Blocks
    /// (briefly) only when there is nothing to do.
    fn take_in(&mut self, rx: &Receiver<Job>) {
        while self.running.len() + self.waiting.len() < self.config.max_batch {
            let idle = self.running.is_empty() && self.waiting.is_empty() && !self.closed;
            let next = if idle {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(j) => Some(j),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        self.closed = true;
                        None
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => Some(j),
                    Err(std::sync::mpsc::TryRecvError::Empty) => None,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        self.closed = true;
                        None
                    }
                }
            };
            match next {
                Some(j) => self.waiting.push_back(j),
                None => break,
            }
        }
    }

    /// Admits in arrival order while the batch and the cache budget allow: blocks alive now
    /// (running sequences and cached prefixes) plus what the running ones may still allocate plus
    /// what the newcomer needs beyond the prefix it reuses. Cached prefixes are evicted, least
    /// recently used first, to make room.
    fn admit(&mut self) {
        let (config, model) = (self.config, self.model);
        while self.running.len() < config.max_batch {
            let Some(job) = self.waiting.front() else { break };
            let speculative = config.mtp_speculative > 0 && job.req.plain();
            // Prompt log-probs need every prompt position run, so nothing is reused for them.
            // Cached prefixes hold the base model's latents: an adapter's differ.
            let looked =
                config.prefix_cache && !speculative && job.req.prompt_logprobs.is_none() && job.req.adapter == 0;
            let reuse = if looked { self.prefixes.lookup(&job.req.prompt, config.prefill_chunk) } else { vec![] };
            let need = blocks_for(job.req.prompt.len() + job.req.max_tokens, &config)
                .saturating_sub(reuse.len() * model.layers.len());
            let growth: usize = self.running.iter().map(|s| s.growth(&config)).sum();
            if self.pool.in_use() + growth + need > config.kv_blocks && !self.running.is_empty() {
                if !self.prefixes.evict_one() {
                    break;
                }
                continue;
            }
            let job = self.waiting.pop_front().expect("front exists");
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            if looked {
                self.metrics.prefix_queried_tokens.fetch_add(job.req.prompt.len() as u64, Ordering::Relaxed);
            }
            let mut cache = model.new_cache_in(Some(self.pool.clone()));
            let prefilled = reuse.len() * BLOCK_TOKENS;
            if prefilled > 0 {
                for (l, layer) in cache.layers.iter_mut().enumerate() {
                    *layer =
                        LatentCache::with_prefix(reuse.iter().map(|b| b[l].clone()).collect(), Some(self.pool.clone()));
                }
                self.metrics.prefix_reused_tokens.fetch_add(prefilled as u64, Ordering::Relaxed);
            }
            let sampler = Sampler::new(job.req.sampling.clone()).with_prompt(&job.req.prompt);
            let mut job = job;
            let constraint = job.req.constraint.take();
            self.running.push(Seq {
                job,
                cache,
                sampler,
                prefilled,
                pending: None,
                generated: 0,
                started: Instant::now(),
                last_token_at: None,
                prompt_h: vec![],
                spec: None,
                constraint,
            });
        }
    }

    fn publish_gauges(&self) {
        let m = self.metrics;
        m.batch_size.store(self.running.len(), Ordering::Relaxed);
        m.kv_tokens.store(self.running.iter().map(|s| s.cache.len()).sum(), Ordering::Relaxed);
        m.kv_blocks.store(self.pool.in_use(), Ordering::Relaxed);
        m.prefix_entries.store(self.prefixes.len(), Ordering::Relaxed);
    }

    /// Speculative decoders verify their drafts alone (their forward is their own).
    fn step_speculative(&mut self, keep: &mut [bool]) {
        let (model, metrics, k) = (self.model, self.metrics, self.config.mtp_speculative);
        for (i, s) in self.running.iter_mut().enumerate() {
            let Some(spec) = s.spec.as_mut() else { continue };
            match spec.step(model, &mut s.cache, k, &mut s.sampler) {
                Ok(step) => {
                    metrics.draft_tokens.fetch_add(k as u64, Ordering::Relaxed);
                    metrics.accepted_tokens.fetch_add(step.accepted as u64, Ordering::Relaxed);
                    for &id in step.drafts[..step.accepted].iter().chain([&step.next]) {
                        if let Emit::End = s.emit(TokenOut { id, logprob: None, top: vec![], rank: None }, metrics) {
                            keep[i] = false;
                            break;
                        }
                    }
                }
                Err(e) => {
                    eprintln!("engine: speculative step failed: {e}");
                    s.end_early();
                    keep[i] = false;
                }
            }
        }
    }

    /// Everything else in one pass: a chunk of each prefilling prompt, the last token of each
    /// plain decoder; then each sequence's next token from its last row.
    fn step_batched(&mut self, keep: &mut [bool]) {
        let (model, config, metrics, k) = (self.model, self.config, self.metrics, self.config.mtp_speculative);
        let batched: Vec<usize> =
            (0..self.running.len()).filter(|&i| self.running[i].spec.is_none() && keep[i]).collect();
        let chunks: Vec<Vec<u32>> = batched.iter().map(|&i| self.running[i].next_input(config.prefill_chunk)).collect();
        // Grammar masks for the sequences that choose a token this step, computed on another
        // thread while the forward runs: they depend only on the tokens chosen so far, and an
        // unconstrained request in the batch waits for no grammar.
        let mut grammars: Vec<(usize, Constraint)> = vec![];
        for (&i, c) in batched.iter().zip(&chunks) {
            if self.running[i].samples_after(c.len()) {
                if let Some(g) = self.running[i].constraint.take() {
                    grammars.push((i, g));
                }
            }
        }
        let adapters: Vec<u16> = batched.iter().map(|&i| self.running[i].job.req.adapter).collect();
        let (states, masks) = std::thread::scope(|scope| {
            let masking = (!grammars.is_empty())
                .then(|| scope.spawn(|| grammars.iter_mut().map(|(i, c)| (*i, c.mask())).collect::<Vec<_>>()));
            let mut caches = disjoint_caches(&mut self.running, &batched);
            let mut batch: Vec<(&[u32], &mut KvCache)> =
                chunks.iter().map(|c| c.as_slice()).zip(caches.drain(..)).collect();
            let adapted = adapters.iter().any(|&a| a > 0).then_some(adapters.as_slice());
            let states = if batch.is_empty() { Ok(vec![]) } else { model.forward_batch_adapted(&mut batch, adapted) };
            let masks = masking.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
            (states, masks)
        });
        let mut masks: std::collections::HashMap<usize, Result<Option<Mask>, String>> = masks.into_iter().collect();
        for (i, c) in grammars {
            self.running[i].constraint = Some(c);
            masks.entry(i).or_insert_with(|| Err("the grammar thread failed".into()));
        }
        let states = match states {
            Ok(s) => s,
            Err(e) => {
                // Inputs were validated; an error here ends the batched sequences cleanly.
                eprintln!("engine: forward failed: {e}");
                for &i in &batched {
                    self.running[i].end_early();
                    keep[i] = false;
                }
                return;
            }
        };
        let d = model.config.hidden_size;
        for ((&i, h), chunk) in batched.iter().zip(&states).zip(&chunks) {
            let s = &mut self.running[i];
            let prefilling = s.pending.is_none();
            if prefilling {
                if let Some(k) = s.job.req.prompt_logprobs {
                    let _ =
                        s.job.events.send(Event::Prompt(prompt_logprobs(model, h, &s.job.req.prompt, s.prefilled, k)));
                }
                s.prefilled += chunk.len();
                if s.speculative(k) {
                    s.prompt_h.extend_from_slice(h);
                }
                if s.prefilled < s.job.req.prompt.len() {
                    continue; // more prompt to go
                }
                if config.prefix_cache && !s.speculative(k) && s.job.req.adapter == 0 {
                    self.prefixes.insert(&s.job.req.prompt, &s.cache);
                }
                if s.job.req.max_tokens == 0 {
                    // Scoring only (`echo` with `max_tokens: 0`): the prompt was the work.
                    metrics.finished(Finish::Length);
                    s.end_early_with(Finish::Length);
                    keep[i] = false;
                    continue;
                }
            }
            let rows = h.len() / d;
            let logits = model.logits(&h[(rows - 1) * d..], 1);
            let mask = match masks.remove(&i) {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    eprintln!("engine: grammar mask failed: {e}");
                    s.end_early();
                    keep[i] = false;
                    continue;
                }
                None => None,
            };
            let id = choose(s, &logits, mask.as_ref());
            // A stop id ends the sequence: the grammar (complete, or accepting) need not follow it.
            if let Some(c) = s.constraint.as_mut().filter(|_| !s.job.req.stop_ids.contains(&id)) {
                if let Err(e) = c.consume(id) {
                    eprintln!("engine: the grammar refused token {id}: {e}");
                    s.end_early();
                    keep[i] = false;
                    continue;
                }
            }
            let (logprob, top) = match s.job.req.logprobs {
                Some(n) => (Some(log_prob(&logits, id as usize)), top_k_logprobs(&logits, n)),
                None => (None, vec![]),
            };
            if let Emit::End = s.emit(TokenOut { id, logprob, top, rank: None }, metrics) {
                keep[i] = false;
                continue;
            }
            if prefilling && s.speculative(k) && !model.mtp.is_empty() {
                s.spec = Some(Speculator::new(&s.job.req.prompt, std::mem::take(&mut s.prompt_h), id));
            }
        }
    }

    /// Drops the sequences that ended; their blocks are gone now, and the gauges say so even if
    /// nothing runs next.
    fn retire(&mut self, keep: &[bool]) {
        let metrics = self.metrics;
        let mut i = 0;
        self.running.retain(|s| {
            let k = keep[i];
            i += 1;
            if !k {
                metrics.request_seconds.observe(s.started.elapsed().as_secs_f64());
            }
            k
        });
        metrics.batch_size.store(self.running.len(), Ordering::Relaxed);
        metrics.kv_tokens.store(self.running.iter().map(|s| s.cache.len()).sum(), Ordering::Relaxed);
        metrics.kv_blocks.store(self.pool.in_use(), Ordering::Relaxed);
    }
}

/// The next token of `s` from its logits: stop ids masked until `min_tokens`, the grammar's mask,
/// then the request's penalties and sampling.
fn choose(s: &mut Seq, logits: &[f32], mask: Option<&Mask>) -> u32 {
    let early = s.generated < s.job.req.min_tokens;
    if !early && mask.is_none() {
        return s.sampler.sample_adjusted(logits);
    }
    let mut l = logits.to_vec();
    if let Some(m) = mask {
        m.apply(&mut l);
    }
    if early {
        for &t in &s.job.req.stop_ids {
            if let Some(x) = l.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    if l.iter().all(|x| *x == f32::NEG_INFINITY) {
        // min_tokens and a finished grammar leave nothing: the grammar wins.
        l = logits.to_vec();
        if let Some(m) = mask {
            m.apply(&mut l);
        }
    }
    s.sampler.sample_adjusted(&l)
}

/// The log-probs of the prompt tokens a chunk's states predict: row `r` (position `from + r`)
/// scores prompt token `from + r + 1`; the last prompt position predicts the first new token and
/// is not part of this.
fn prompt_logprobs(model: &DeepseekV3, h: &[f32], prompt: &[u32], from: usize, k: usize) -> Vec<TokenOut> {
    let d = model.config.hidden_size;
    let rows = (h.len() / d).min(prompt.len().saturating_sub(from + 1));
    if rows == 0 {
        return vec![];
    }
    let logits = model.logits(&h[..rows * d], rows);
    let vocab = logits.len() / rows;
    (0..rows)
        .map(|r| {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let id = prompt[from + r + 1];
            let rank = 1 + row.iter().filter(|&&l| l > row[id as usize]).count();
            TokenOut { id, logprob: Some(log_prob(row, id as usize)), top: top_k_logprobs(row, k), rank: Some(rank) }
        })
        .collect()
}

/// The caches of `running[i]` for each `i` of `which` (ascending), borrowed at once.
fn disjoint_caches<'s>(running: &'s mut [Seq], which: &[usize]) -> Vec<&'s mut KvCache> {
    let mut caches = Vec::with_capacity(which.len());
    let mut rest = running;
    let mut offset = 0;
    for &i in which {
        let (_, tail) = rest.split_at_mut(i - offset);
        let (one, tail) = tail.split_at_mut(1);
        caches.push(&mut one[0].cache);
        rest = tail;
        offset = i + 1;
    }
    caches
}
