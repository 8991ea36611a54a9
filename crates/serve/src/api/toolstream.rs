//! The content of a streamed tool-calling answer: sent as it comes up to the first tool-call
//! marker (or end-of-sequence text), never a piece of one — a suffix that could begin a marker is
//! held, and so is trailing whitespace (the whole answer's content is trimmed before its calls).
//! The calls themselves go out once the answer is complete and parsed.

use super::reasoning::partial_suffix;

pub(super) struct ToolStream {
    markers: Vec<String>,
    held: String,
    /// A marker came: nothing more is content.
    closed: bool,
}

impl ToolStream {
    pub(super) fn new(markers: Vec<String>) -> Self {
        ToolStream {
            markers: markers.into_iter().filter(|m| !m.is_empty()).collect(),
            held: String::new(),
            closed: false,
        }
    }

    /// A stream that sends no content (a forced call's JSON is the call, not content).
    pub(super) fn closed(mut self) -> Self {
        self.closed = true;
        self
    }

    /// The content this text makes safe to send.
    pub(super) fn push(&mut self, text: &str) -> String {
        if self.closed {
            return String::new();
        }
        let mut t = std::mem::take(&mut self.held);
        t.push_str(text);
        if let Some(i) = self.markers.iter().filter_map(|m| t.find(m.as_str())).min() {
            self.closed = true;
            return t[..i].trim_end().to_string();
        }
        let marker = self.markers.iter().map(|m| partial_suffix(&t, m)).max().unwrap_or(0);
        let rest = &t[..t.len() - marker];
        let keep = marker + (rest.len() - rest.trim_end().len());
        self.held = t[t.len() - keep..].to_string();
        t.truncate(t.len() - keep);
        t
    }

    /// What was held, at the end of an answer without a marker.
    pub(super) fn finish(&mut self) -> String {
        if self.closed {
            String::new()
        } else {
            std::mem::take(&mut self.held)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_stops_at_the_marker_in_any_pieces() {
        let markers = || vec!["<｜tool▁calls▁begin｜>".to_string(), "<｜end▁of▁sentence｜>".to_string()];
        let text = "Let me check. <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{}";
        for n in [1, 2, 3, 7, 200] {
            let mut s = ToolStream::new(markers());
            let chars: Vec<char> = text.chars().collect();
            let mut out = String::new();
            for piece in chars.chunks(n) {
                let d = s.push(&piece.iter().collect::<String>());
                assert!(!d.contains('<'), "a marker piece went out: {d:?}");
                out.push_str(&d);
            }
            out.push_str(&s.finish());
            assert_eq!(out, "Let me check.");
        }
        let mut s = ToolStream::new(markers());
        let mut out = s.push("a < b ");
        out.push_str(&s.push("and c"));
        out.push_str(&s.finish());
        assert_eq!(out, "a < b and c");
    }
}
