//! Token ids to text deltas that are safe to send: whole UTF-8 characters, and no piece of a stop
//! string before it is known not to be one.

use dsv3_model::Tokenizer;

/// Turns the engine's token events into text deltas, applying stop strings (the text up to a stop
/// string is kept, the rest dropped) with a UTF-8-safe incremental decode.
pub(super) struct Detok<'a> {
    pub(super) tok: Option<&'a Tokenizer>,
    pub(super) keep_special: bool,
    pub(super) ids: Vec<u32>,
    pub(super) sent: usize,
    pub(super) stops: Vec<String>,
    /// The stop string that ended the text, once one did.
    pub(super) stopped_by: Option<String>,
    pub(super) stopped: bool,
}

impl<'a> Detok<'a> {
    pub(super) fn new(keep_special: bool, stops: Vec<String>) -> Self {
        Detok { tok: None, keep_special, ids: vec![], sent: 0, stops, stopped_by: None, stopped: false }
    }

    fn text(&self) -> String {
        self.tok.and_then(|t| t.decode(&self.ids, !self.keep_special).ok()).unwrap_or_default()
    }

    /// The new text this token makes safe to send: a possible start of a stop string is held back
    /// until it is known not to be one.
    pub(super) fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let text = self.text();
        if text.ends_with('\u{fffd}') {
            return String::new(); // wait for the rest of a multi-byte character
        }
        let hold = self.stops.iter().map(|s| s.len()).max().unwrap_or(1).saturating_sub(1);
        let from = floor_boundary(&text, self.sent.saturating_sub(hold));
        let hit = self.stops.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| (i + from, s))).min();
        let end = match hit {
            Some((i, s)) => {
                self.stopped = true;
                self.stopped_by = Some(s.clone());
                i
            }
            None => floor_boundary(&text, text.len().saturating_sub(hold)),
        };
        let out = if end > self.sent { text[self.sent..end].to_string() } else { String::new() };
        self.sent = self.sent.max(end);
        out
    }

    /// What was held back, once generation ended without a stop string.
    pub(super) fn flush(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let text = self.text();
        let out = text.get(self.sent..).unwrap_or("").to_string();
        self.sent = text.len();
        out
    }
}

pub(super) fn floor_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
