//! What GRPO learns from: prompts (a JSONL file, or the built-in addition task) and the rule that
//! scores a completion — the exact answer after `</think>`, the reasoning format, or an external
//! command that reads the sample as JSON on stdin and prints a score.

use crate::chats::Addition;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// A prompt to sample completions for: its chat messages and, for verifiable tasks, the answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    pub messages: Value,
    pub answer: Option<String>,
}

/// The built-in task: `n` seeded additions of operands up to `digits` digits.
pub fn builtin_prompts(n: usize, digits: u32, seed: u64) -> Vec<Prompt> {
    Addition::sample(n, digits, seed)
        .iter()
        .map(|p| Prompt { messages: json!([{"role": "user", "content": p.question()}]), answer: Some(p.answer()) })
        .collect()
}

/// Prompts of a JSONL file: `{"messages": [...]}` or `{"prompt": "..."}`, with an optional
/// `"answer"` (a string or a number).
pub fn read_prompts(path: &Path) -> Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--prompts {}", path.display()))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let messages = match (v.get("messages"), v.get("prompt").and_then(Value::as_str)) {
            (Some(m), _) if m.is_array() => m.clone(),
            (None, Some(p)) => json!([{"role": "user", "content": p}]),
            _ => bail!("{}: a prompt is {{\"messages\": [...]}} or {{\"prompt\": \"...\"}}", at()),
        };
        let answer = match v.get("answer") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(n @ Value::Number(_)) => Some(n.to_string()),
            Some(other) => bail!("{}: \"answer\" must be a string or a number, not {other}", at()),
        };
        out.push(Prompt { messages, answer });
    }
    if out.is_empty() {
        bail!("--prompts {}: no prompts", path.display());
    }
    Ok(out)
}

/// `--reward`: how a completion is scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RewardKind {
    /// 1 when the text after `</think>` is the answer, else 0.
    Answer,
    /// 1 for `<think>reasoning</think>answer` ended by the end-of-sentence token, else 0.
    Format,
    /// `answer` + 0.1 × `format` (R1's accuracy and format rewards).
    AnswerFormat,
}

/// One completion as the reward sees it.
pub struct Completion<'a> {
    pub prompt: &'a Prompt,
    /// The completion's text with special tokens (the end of sentence left out).
    pub text: &'a str,
    /// Ended by an end-of-sentence token (not cut at the length limit).
    pub finished: bool,
    /// The rendered prompt ended inside reasoning (`<think>` opened by the template).
    pub opened: bool,
}

/// What a completion scored, with the rule's parts for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Score {
    pub reward: f64,
    /// The answer matched (prompts with an answer).
    pub correct: Option<bool>,
    pub formatted: bool,
}

impl Completion<'_> {
    /// The text after the reasoning, if the reasoning was closed.
    pub fn answer_text(&self) -> Option<&str> {
        self.text.rsplit_once("</think>").map(|(_, a)| a.trim())
    }

    pub fn correct(&self) -> Option<bool> {
        let want = self.prompt.answer.as_deref()?;
        Some(self.answer_text() == Some(want.trim()))
    }

    pub fn formatted(&self) -> bool {
        let body = if self.opened { self.text } else { self.text.strip_prefix("<think>").unwrap_or("") };
        self.finished
            && (self.opened || self.text.starts_with("<think>"))
            && body.matches("</think>").count() == 1
            && !body.contains("<think>")
            && self.answer_text().is_some_and(|a| !a.is_empty())
    }
}

/// Scores completions by a rule or by an external command.
pub enum Reward {
    Rule(RewardKind),
    /// `sh -c CMD` per completion: stdin `{"messages", "completion", "answer", "finished"}`,
    /// stdout a number.
    Command(String),
}

impl Reward {
    pub fn score(&self, c: &Completion) -> Result<Score> {
        let (correct, formatted) = (c.correct(), c.formatted());
        let hit = correct.unwrap_or(false) as u8 as f64;
        let reward = match self {
            Reward::Rule(RewardKind::Answer) => hit,
            Reward::Rule(RewardKind::Format) => formatted as u8 as f64,
            Reward::Rule(RewardKind::AnswerFormat) => hit + 0.1 * formatted as u8 as f64,
            Reward::Command(cmd) => run_command(cmd, c)?,
        };
        Ok(Score { reward, correct, formatted })
    }
}

fn run_command(cmd: &str, c: &Completion) -> Result<f64> {
    let input = json!({
        "messages": c.prompt.messages, "completion": c.text, "answer": c.prompt.answer, "finished": c.finished,
    });
    let mut child = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("--reward-command {cmd:?}: could not start"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that exits without reading its input is still answered by its output.
        let _ = stdin.write_all(input.to_string().as_bytes());
    }
    let out = child.wait_with_output().with_context(|| format!("--reward-command {cmd:?}"))?;
    if !out.status.success() {
        bail!("--reward-command {cmd:?} failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .trim()
        .parse()
        .with_context(|| format!("--reward-command {cmd:?} printed {:?}, not a number", text.trim()))?;
    if !score.is_finite() {
        bail!("--reward-command {cmd:?} printed {score}");
    }
    Ok(score)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion<'a>(p: &'a Prompt, text: &'a str, finished: bool) -> Completion<'a> {
        Completion { prompt: p, text, finished, opened: false }
    }

    #[test]
    fn rules_score_the_answer_after_the_reasoning_and_the_format() {
        let p = builtin_prompts(1, 2, 0).remove(0);
        let want = p.answer.clone().unwrap();
        let good = format!("<think>adding</think>{want}");
        let rule = |k, text: &str, fin| Reward::Rule(k).score(&completion(&p, text, fin)).unwrap().reward;
        assert_eq!(rule(RewardKind::AnswerFormat, &good, true), 1.1);
        assert_eq!(rule(RewardKind::Answer, &good, false), 1.0, "cut at the limit, the answer still counts");
        assert_eq!(rule(RewardKind::Format, &good, false), 0.0, "but not the format");
        assert_eq!(rule(RewardKind::Answer, &want, true), 0.0, "no reasoning closed: no answer");
        assert_eq!(rule(RewardKind::Format, "<think>a</think>b</think>c", true), 0.0);
        assert_eq!(rule(RewardKind::AnswerFormat, "<think>x</think>0", true), 0.1);
        let opened = Completion { prompt: &p, text: "x</think>1", finished: true, opened: true };
        assert!(opened.formatted());
    }

    #[test]
    fn a_command_reads_the_sample_and_prints_a_score() {
        let p = Prompt { messages: json!([{"role": "user", "content": "hi"}]), answer: Some("7".into()) };
        let c = completion(&p, "<think></think>7", true);
        let grep = Reward::Command("grep -q '\"answer\":\"7\"' && echo 0.5 || echo 0".into());
        assert_eq!(grep.score(&c).unwrap().reward, 0.5);
        let bad = Reward::Command("echo lots".into()).score(&c).unwrap_err().to_string();
        assert!(bad.contains("not a number"), "{bad}");
        assert!(Reward::Command("exit 3".into()).score(&c).is_err());
    }

    #[test]
    fn prompt_files_take_messages_or_a_prompt() {
        let f = std::env::temp_dir().join(format!("dsv3-prompts-{}.jsonl", std::process::id()));
        std::fs::write(
            &f,
            "{\"prompt\": \"2+2?\", \"answer\": 4}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
        )
        .unwrap();
        let ps = read_prompts(&f).unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].answer.as_deref(), Some("4"));
        assert_eq!(ps[1].answer, None);
        std::fs::write(&f, "{\"prompt\": 3}\n").unwrap();
        assert!(read_prompts(&f).unwrap_err().to_string().contains(":1"));
        std::fs::remove_file(&f).ok();
    }
}
