//! Training data: documents from text files or folders (or the built-in corpus), a byte-level BPE
//! tokenizer trained on them (or an existing one), documents packed end to end with an EOS between
//! them into fixed windows of `seq_len + 1` tokens (no cross-document masking, as in the report),
//! a document-level validation split, and a seeded loader whose position is saved for resume.

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::{AddedToken, Tokenizer};

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
/// The chat template's markers ([`crate::checkpoint::CHAT_TEMPLATE`]), one token each.
pub const CHAT_TOKENS: [&str; 4] = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"];

/// The project's own sources and docs, embedded at build time (see build.rs).
pub fn builtin_corpus() -> Vec<String> {
    let all = include_str!(concat!(env!("OUT_DIR"), "/corpus.txt"));
    all.split('\u{1e}').filter(|d| !d.trim().is_empty()).map(str::to_string).collect()
}

/// Every text file under `paths` (files or folders, recursively; hidden entries skipped), one
/// document per file, in sorted order.
pub fn read_documents(paths: &[PathBuf]) -> Result<Vec<String>> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|e| !e.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')))
                .collect();
            entries.sort();
            for e in entries {
                walk(&e, out)?;
            }
        } else if p.is_file() {
            out.push(p.to_path_buf());
        } else {
            bail!("--data {}: no such file or folder", p.display());
        }
        Ok(())
    }
    let mut files = vec![];
    for p in paths {
        walk(p, &mut files)?;
    }
    let mut docs = vec![];
    for f in files {
        let bytes = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        // Binary files are skipped rather than fed as mojibake.
        if let Ok(text) = String::from_utf8(bytes) {
            if !text.trim().is_empty() {
                docs.push(text);
            }
        }
    }
    if docs.is_empty() {
        bail!("--data: no UTF-8 text found");
    }
    Ok(docs)
}

/// A byte-level BPE of `vocab_size` tokens (BOS = 0, EOS = 1, then the chat's turn markers)
/// trained on `docs`, and after them `<think>` and `</think>`.
pub fn train_tokenizer(docs: &[String], vocab_size: usize) -> Result<Tokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let least = 256 + 2 + CHAT_TOKENS.len();
    if vocab_size < least {
        bail!("--vocab-size {vocab_size}: needs at least {least} (256 bytes + specials)");
    }
    let specials = [BOS, EOS].iter().chain(&CHAT_TOKENS[..2]).map(|t| AddedToken::from(*t, true)).collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = tokenizers::TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
        .with_decoder(Some(ByteLevelDecoder::default()))
        .build()
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    tok.train(&mut trainer, docs.iter()).map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    let mut t: Tokenizer = tok.into();
    // The reasoning markers stay in decoded text (as in DeepSeek's tokenizer), where servers split
    // the reasoning from the answer: single tokens, not special ones.
    let think: Vec<AddedToken> = CHAT_TOKENS[2..].iter().map(|m| AddedToken::from(*m, false)).collect();
    t.add_tokens(think).map_err(|e| anyhow::anyhow!("adding the reasoning markers: {e}"))?;
    Ok(t)
}

/// The token windows of a split: packed text (windows overlapping by one token, every label
/// learned) or padded examples (a window each, with the tokens they learn).
#[derive(Clone, Debug, Default)]
pub struct Split {
    pub tokens: Vec<u32>,
    /// Window length: `seq_len + 1` (inputs and shifted labels).
    pub window: usize,
    /// Per token whether it is learned as a label; empty: every token (packed text).
    pub learn: Vec<bool>,
}

/// A batch of windows `[batch, window]`, and its label mask `[batch, window − 1]` when not every
/// label is learned.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub labels: Option<Vec<bool>>,
}

impl Split {
    /// A split of padded examples: every window its own, no overlap.
    fn padded(&self) -> bool {
        !self.learn.is_empty()
    }

    fn stride(&self) -> usize {
        if self.padded() {
            self.window
        } else {
            self.window - 1
        }
    }

    /// Packed text: windows start every `window − 1` tokens, so each token is a label exactly once.
    pub fn windows(&self) -> usize {
        if self.tokens.len() < self.window {
            0
        } else if self.padded() {
            self.tokens.len() / self.window
        } else {
            (self.tokens.len() - 1) / (self.window - 1)
        }
    }

    pub fn window(&self, i: usize) -> &[u32] {
        let s = i * self.stride();
        &self.tokens[s..s + self.window]
    }

    /// Window `i`'s label mask (`None`: every label learned).
    pub fn labels(&self, i: usize) -> Option<&[bool]> {
        let s = i * self.stride();
        self.padded().then(|| &self.learn[s + 1..s + self.window])
    }

    /// The windows `idx` as one batch.
    pub fn batch(&self, idx: impl IntoIterator<Item = usize>) -> Batch {
        let mut b = Batch { tokens: vec![], labels: self.padded().then(Vec::new) };
        for i in idx {
            b.tokens.extend_from_slice(self.window(i));
            if let (Some(l), Some(m)) = (&mut b.labels, self.labels(i)) {
                l.extend_from_slice(m);
            }
        }
        b
    }
}

/// Tokenizes and packs documents; every `val_every`-th document (if any) goes to validation.
pub fn pack(tok: &Tokenizer, docs: &[String], seq_len: usize, val_every: usize) -> Result<(Split, Split)> {
    let eos = tok.token_to_id(EOS).context("the tokenizer has no EOS token")?;
    let enc = tok.encode_batch(docs.to_vec(), false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    let (mut train, mut val) =
        (Split { window: seq_len + 1, ..Default::default() }, Split { window: seq_len + 1, ..Default::default() });
    for (i, e) in enc.iter().enumerate() {
        let s = if val_every > 0 && i % val_every == val_every - 1 { &mut val } else { &mut train };
        s.tokens.extend_from_slice(e.get_ids());
        s.tokens.push(eos);
    }
    if train.windows() == 0 {
        bail!("the training text has {} tokens: too few for one window of {}", train.tokens.len(), seq_len + 1);
    }
    Ok((train, val))
}

/// Where the loader is: the epoch (its shuffle) and the next window of that order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    pub next: usize,
}

/// Seeded batches of windows, reshuffled each epoch.
pub struct Loader {
    seed: u64,
    order: Vec<usize>,
    pub state: LoaderState,
}

impl Loader {
    pub fn new(split: &Split, seed: u64, state: LoaderState) -> Self {
        let mut l = Loader { seed, order: vec![], state };
        l.shuffle(split.windows());
        l
    }

    fn shuffle(&mut self, n: usize) {
        self.order = (0..n).collect();
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(self.seed ^ self.state.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.order.shuffle(&mut rng);
    }

    /// The next `batch` windows, concatenated `[batch, window]`.
    pub fn next_batch(&mut self, split: &Split, batch: usize) -> Batch {
        let mut idx = Vec::with_capacity(batch);
        for _ in 0..batch {
            if self.state.next >= self.order.len() {
                self.state.epoch += 1;
                self.state.next = 0;
                self.shuffle(split.windows());
            }
            idx.push(self.order[self.state.next]);
            self.state.next += 1;
        }
        split.batch(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_corpus_tokenizes_packs_and_loads_deterministically() {
        let docs = builtin_corpus();
        assert!(docs.len() > 10, "{} documents", docs.len());
        let tok = train_tokenizer(&docs[..10], 400).unwrap();
        assert_eq!(tok.token_to_id(BOS), Some(0));
        assert_eq!(tok.token_to_id(EOS), Some(1));
        let think = tok.encode("<think>a</think>b", false).unwrap().get_ids().to_vec();
        assert_eq!(think[0], tok.token_to_id("<think>").unwrap(), "one token");
        assert_eq!(tok.decode(&think, true).unwrap(), "<think>a</think>b", "kept when specials are skipped");
        let text = "fn main() { println!(\"héllo\"); }";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "byte-level BPE round-trips");
        let (train, val) = pack(&tok, &docs[..10], 16, 5).unwrap();
        assert!(train.windows() > 0 && val.windows() > 0);
        // Each token is a label once: consecutive windows overlap by one token.
        assert_eq!(train.window(0)[16], train.window(1)[0]);
        let mut a = Loader::new(&train, 7, LoaderState::default());
        let first: Vec<Batch> = (0..5).map(|_| a.next_batch(&train, 3)).collect();
        // Resuming from a saved state continues the same sequence.
        let mut b = Loader::new(&train, 7, LoaderState::default());
        b.next_batch(&train, 3);
        b.next_batch(&train, 3);
        let mut c = Loader::new(&train, 7, b.state);
        assert_eq!(c.next_batch(&train, 3), first[2]);
    }
}
