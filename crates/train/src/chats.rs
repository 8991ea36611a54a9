//! Supervised fine-tuning data: OpenAI-style chats (`{"messages": [...], "tools": [...]}`, one per
//! line of a JSONL file) or the built-in set, rendered with the model's own chat template into
//! examples whose assistant tokens are learned ([`dsv3_model::sft::examples`]), each right-padded
//! to its own window: causal attention never crosses from one example into another, and the pads
//! are never learned.

use crate::data::Split;
use anyhow::{bail, Context, Result};
use dsv3_model::Tokenizer;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::PathBuf;

/// The chats of JSONL files (blank lines skipped); each error names the file and line.
pub fn read_chats(paths: &[PathBuf]) -> Result<Vec<Value>> {
    let mut chats = vec![];
    for p in paths {
        let text = std::fs::read_to_string(p).with_context(|| format!("--data {}", p.display()))?;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: Value =
                serde_json::from_str(line).with_context(|| format!("{}:{}: not a JSON object", p.display(), i + 1))?;
            if !v.get("messages").is_some_and(Value::is_array) {
                bail!("{}:{}: a chat is {{\"messages\": [...]}}", p.display(), i + 1);
            }
            chats.push(v);
        }
    }
    if chats.is_empty() {
        bail!("--data: no chats (JSONL lines of {{\"messages\": [...]}})");
    }
    Ok(chats)
}

/// One multi-digit addition: the built-in chats' and GRPO's verifiable task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addition {
    pub a: u32,
    pub b: u32,
}

impl Addition {
    /// `n` seeded problems with operands of 1 to `digits` digits.
    pub fn sample(n: usize, digits: u32, seed: u64) -> Vec<Addition> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let top = 10u32.pow(digits.clamp(1, 9));
        (0..n).map(|_| Addition { a: rng.gen_range(0..top), b: rng.gen_range(0..top) }).collect()
    }

    pub fn question(&self) -> String {
        format!("What is {}+{}?", self.a, self.b)
    }

    pub fn answer(&self) -> String {
        (self.a as u64 + self.b as u64).to_string()
    }

    /// Column addition from the units up, the carry said at each column: the reasoning a small
    /// model can follow.
    pub fn reasoning(&self) -> String {
        let (mut a, mut b, mut carry) = (self.a, self.b, 0);
        let mut steps = vec![];
        while a > 0 || b > 0 || steps.is_empty() {
            let s = a % 10 + b % 10 + carry;
            steps.push(format!("{}+{}+{carry}={s}", a % 10, b % 10));
            carry = s / 10;
            (a, b) = (a / 10, b / 10);
        }
        if carry > 0 {
            steps.push(format!("carry {carry}"));
        }
        steps.join(", ")
    }

    /// The problem as a chat with its worked answer.
    pub fn chat(&self) -> Value {
        json!({"messages": [
            {"role": "user", "content": self.question()},
            {"role": "assistant", "reasoning_content": self.reasoning(), "content": self.answer()},
        ]})
    }
}

/// The built-in chat set: a few conversations about dsv3, then seeded two-digit additions worked
/// in the reasoning (`reasoning_content`) with the sum as the answer.
pub fn builtin_chats() -> Vec<Value> {
    let talk = [
        ("Hello!", "Hello! I am a small DeepSeek-V3 model trained by dsv3. How can I help?"),
        ("Who are you?", "I am a small DeepSeek-V3-architecture model, trained from scratch with dsv3."),
        (
            "What is MLA?",
            "Multi-head Latent Attention: keys and values are cached as one small latent vector per token.",
        ),
        ("What is MTP?", "Multi-token prediction: an extra module predicts the token after the next one."),
    ];
    let mut chats: Vec<Value> = talk
        .iter()
        .map(|(q, a)| json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}))
        .collect();
    chats.extend(Addition::sample(2000, 2, 0x5F7).iter().map(Addition::chat));
    chats
}

/// How the chats became examples.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ExampleStats {
    pub chats: usize,
    pub examples: usize,
    /// Examples cut at the window (their learned tokens past it dropped).
    pub truncated: usize,
    /// Examples with no learned token inside the window, left out.
    pub dropped: usize,
    /// Learned tokens over all tokens of the windows (pads included).
    pub learned_share: f64,
}

/// The chats' examples, each right-padded with `pad` to a window of `seq_len + 1`; every
/// `val_every`-th example (if any) goes to validation.
pub fn pad_examples(
    tok: &Tokenizer,
    chats: &[Value],
    seq_len: usize,
    pad: u32,
    val_every: usize,
) -> Result<(Split, Split, ExampleStats)> {
    let window = seq_len + 1;
    let mut splits = [Split { window, ..Default::default() }, Split { window, ..Default::default() }];
    let mut stats = ExampleStats { chats: chats.len(), ..Default::default() };
    let mut learned = 0usize;
    for (c, chat) in chats.iter().enumerate() {
        let examples = dsv3_model::sft::examples(tok, chat).with_context(|| format!("chat {}", c + 1))?;
        for mut e in examples {
            if e.ids.len() > window {
                stats.truncated += 1;
                e.ids.truncate(window);
                e.learn.truncate(window);
            }
            // The first token is never a label.
            if !e.learn.iter().skip(1).any(|&l| l) {
                stats.dropped += 1;
                continue;
            }
            learned += e.learn.iter().skip(1).filter(|&&l| l).count();
            let pads = window - e.ids.len();
            let s = &mut splits[(val_every > 0 && stats.examples % val_every == val_every - 1) as usize];
            s.tokens.extend(e.ids.iter().copied().chain(std::iter::repeat_n(pad, pads)));
            s.learn.extend(e.learn.iter().copied().chain(std::iter::repeat_n(false, pads)));
            stats.examples += 1;
        }
    }
    let [train, val] = splits;
    if train.windows() == 0 {
        bail!("no example to learn from in {} chats (each needs an assistant turn inside --seq-len)", chats.len());
    }
    let windows = train.windows() + val.windows();
    stats.learned_share = learned as f64 / (windows * seq_len).max(1) as f64;
    Ok((train, val, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_addition_reasoning_carries() {
        let p = Addition { a: 47, b: 85 };
        assert_eq!(p.answer(), "132");
        assert_eq!(p.reasoning(), "7+5+0=12, 4+8+1=13, carry 1");
        assert_eq!(Addition { a: 0, b: 0 }.reasoning(), "0+0+0=0");
        let ps = Addition::sample(50, 2, 1);
        assert_eq!(ps, Addition::sample(50, 2, 1), "seeded");
        assert!(ps.iter().all(|p| p.a < 100 && p.b < 100));
    }
}
