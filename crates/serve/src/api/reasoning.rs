//! DeepSeek reasoning in generated text: `<think>…</think>` before the answer (R1, V3.1 and V3.2
//! in thinking mode). When the prompt itself ends in `<think>` (V3.1/V3.2 templates with
//! `thinking: true`, R1's later template) the output starts inside the reasoning and only
//! `</think>` appears; vLLM's and SGLang's parsers lost that case (vLLM #13125, SGLang #4539).
//! The splitter works on a stream and never lets part of a marker out: a suffix that could begin
//! one is held until the next piece decides.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Nothing yet: a `<think>` here opens the reasoning.
    Before,
    Inside,
    /// After `</think>` (or content first): everything is the answer.
    After,
}

/// Splits a stream of text into reasoning and answer.
#[derive(Debug)]
pub(super) struct Reasoning {
    state: State,
    held: String,
    /// Just after `</think>`: the whitespace before the answer is dropped.
    trim: bool,
}

impl Reasoning {
    /// `inside`: the prompt ended in `<think>`.
    pub(super) fn new(inside: bool) -> Self {
        Reasoning { state: if inside { State::Inside } else { State::Before }, held: String::new(), trim: false }
    }

    /// Whether a rendered prompt leaves the model inside its reasoning.
    pub(super) fn prompt_opens(prompt: &str) -> bool {
        prompt.trim_end().ends_with(OPEN)
    }

    /// The new text as (reasoning, answer) pieces that are safe to send.
    pub(super) fn push(&mut self, delta: &str) -> (String, String) {
        let mut text = std::mem::take(&mut self.held);
        text.push_str(delta);
        let (mut reasoning, mut answer) = (String::new(), String::new());
        loop {
            match self.state {
                State::Before => {
                    let lead = text.trim_start();
                    if let Some(rest) = lead.strip_prefix(OPEN) {
                        self.state = State::Inside;
                        text = rest.to_string();
                    } else if lead.is_empty() || OPEN.starts_with(lead) {
                        self.held = text; // whitespace or the start of `<think>`: wait
                        return (reasoning, answer);
                    } else {
                        self.state = State::After;
                    }
                }
                State::Inside => match text.find(CLOSE) {
                    Some(i) => {
                        reasoning.push_str(&text[..i]);
                        text = text[i + CLOSE.len()..].to_string();
                        self.state = State::After;
                        self.trim = true;
                    }
                    None => {
                        let keep = partial_suffix(&text, CLOSE);
                        reasoning.push_str(&text[..text.len() - keep]);
                        self.held = text[text.len() - keep..].to_string();
                        return (reasoning, answer);
                    }
                },
                State::After => {
                    let t = if self.trim { text.trim_start() } else { &text };
                    self.trim &= t.is_empty();
                    answer.push_str(t);
                    return (reasoning, answer);
                }
            }
        }
    }

    /// What was held back, at the end of the stream.
    pub(super) fn finish(&mut self) -> (String, String) {
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Inside => (held, String::new()),
            _ => (String::new(), held),
        }
    }

    /// Whether the stream is inside the reasoning now.
    pub(super) fn inside(&self) -> bool {
        self.state == State::Inside
    }

    /// A whole text split at once: (reasoning if any, answer), trimmed as the API shows them.
    pub(super) fn split(text: &str, inside: bool) -> (Option<String>, String) {
        let mut r = Reasoning::new(inside);
        let (mut reasoning, mut answer) = r.push(text);
        let (r2, a2) = r.finish();
        reasoning.push_str(&r2);
        answer.push_str(&a2);
        let thought = inside || text.trim_start().starts_with(OPEN);
        (thought.then(|| reasoning.trim().to_string()), answer)
    }
}

/// The length of the longest proper suffix of `text` that begins `marker`.
pub(super) fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len())
        .rev()
        .find(|&k| {
            k <= text.len() && text.is_char_boundary(text.len() - k) && marker.starts_with(&text[text.len() - k..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` in pieces of `n` bytes (on char boundaries) and joins what comes out.
    fn streamed(text: &str, inside: bool, n: usize) -> (String, String) {
        let mut r = Reasoning::new(inside);
        let (mut reasoning, mut answer) = (String::new(), String::new());
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(n) {
            let (a, b) = r.push(&piece.iter().collect::<String>());
            assert_eq!(partial_suffix(&a, CLOSE), 0, "a marker piece leaked into reasoning: {a:?}");
            assert!(!b.contains("</th"), "a marker piece leaked into the answer: {b:?}");
            reasoning.push_str(&a);
            answer.push_str(&b);
        }
        let (a, b) = r.finish();
        (reasoning + &a, answer + &b)
    }

    #[test]
    fn markers_split_whole_and_in_any_pieces() {
        for n in [1, 2, 3, 5, 100] {
            assert_eq!(
                streamed("<think>plan it</think>The answer.", false, n),
                ("plan it".into(), "The answer.".into())
            );
            // The prompt opened the reasoning: only the closing marker comes.
            assert_eq!(streamed("plan it</think>Done", true, n), ("plan it".into(), "Done".into()));
            // No reasoning at all; a later `<think>` is answer text.
            assert_eq!(streamed("Hi <think> there", false, n), (String::new(), "Hi <think> there".into()));
            // Cut off while thinking: everything is reasoning.
            assert_eq!(streamed("still going </thi", true, n), ("still going </thi".into(), String::new()));
            assert_eq!(streamed("ünï <b>cödé</b></think>ok", true, n), ("ünï <b>cödé</b>".into(), "ok".into()));
        }
        assert_eq!(Reasoning::split("<think>\nx\n</think>\n\ny", false), (Some("x".into()), "y".into()));
        assert_eq!(Reasoning::split("  y", false), (None, "  y".into()));
        assert_eq!(streamed("<think>a</think>\n\n b", false, 1), ("a".into(), "b".into()));
        assert_eq!(Reasoning::split("x</think>y", true), (Some("x".into()), "y".into()));
        assert!(Reasoning::prompt_opens("<｜Assistant｜><think>\n"));
        assert!(!Reasoning::prompt_opens("<｜Assistant｜></think>"));
    }
}
