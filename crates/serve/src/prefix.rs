//! Prefix reuse across requests (`--prefix-cache`): the full 64-position blocks of finished
//! prompts, keyed by the exact token prefix they end, so a later prompt that starts the same way
//! takes those blocks (shared, read-only) instead of recomputing them.
//!
//! Reuse stops at a multiple of the prefill chunk, so the reused positions were computed in the
//! same chunks as the new request would have computed them alone, and every later chunk starts
//! where it would have: with the model's batch-invariant kernels the output is bit-identical
//! with or without reuse. Least recently used entries are evicted when the KV budget needs room.

use dsv3_model::paged::{LatentBlock, BLOCK_TOKENS};
use dsv3_model::KvCache;
use std::collections::HashMap;
use std::sync::Arc;

struct Entry {
    /// Block j of every main layer, for the prefix of (j+1)·64 tokens.
    blocks: Vec<Arc<LatentBlock>>,
    last_used: u64,
}

#[derive(Default)]
pub struct PrefixCache {
    entries: HashMap<Vec<u32>, Entry>,
    tick: u64,
}

impl PrefixCache {
    /// The blocks of the longest cached prefix of `prompt` that leaves at least one token to run
    /// and ends on a multiple of `chunk`: per block, one `Arc` per main layer.
    pub fn lookup(&mut self, prompt: &[u32], chunk: usize) -> Vec<Vec<Arc<LatentBlock>>> {
        self.tick += 1;
        let mut chain = vec![];
        let mut j = 0;
        while (j + 1) * BLOCK_TOKENS < prompt.len() {
            match self.entries.get_mut(&prompt[..(j + 1) * BLOCK_TOKENS]) {
                Some(e) => {
                    e.last_used = self.tick;
                    chain.push(e.blocks.clone());
                }
                None => break,
            }
            j += 1;
        }
        while !(chain.len() * BLOCK_TOKENS).is_multiple_of(chunk.max(1)) {
            chain.pop();
        }
        chain
    }

    /// Records the full blocks of a prompt that `cache` has just finished prefilling.
    pub fn insert(&mut self, prompt: &[u32], cache: &KvCache) {
        self.tick += 1;
        for j in 0..prompt.len() / BLOCK_TOKENS {
            let key = &prompt[..(j + 1) * BLOCK_TOKENS];
            if let Some(e) = self.entries.get_mut(key) {
                e.last_used = self.tick;
                continue;
            }
            let blocks: Option<Vec<Arc<LatentBlock>>> =
                cache.layers.iter().map(|l| l.blocks().get(j).cloned()).collect();
            if let Some(blocks) = blocks {
                self.entries.insert(key.to_vec(), Entry { blocks, last_used: self.tick });
            }
        }
    }

    /// Drops the least recently used entry; false when empty.
    pub fn evict_one(&mut self) -> bool {
        let Some(key) =
            self.entries.iter().min_by_key(|(k, e)| (e.last_used, std::cmp::Reverse(k.len()))).map(|(k, _)| k.clone())
        else {
            return false;
        };
        self.entries.remove(&key);
        true
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
