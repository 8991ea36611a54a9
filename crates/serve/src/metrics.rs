//! Counters, gauges and histograms shared by the engine and the HTTP side, rendered in the
//! Prometheus text format at `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// A histogram over fixed bucket bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

const LATENCY: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

impl Default for Histogram {
    fn default() -> Self {
        Histogram { bounds: LATENCY, inner: Mutex::new((vec![0; LATENCY.len()], 0.0, 0)) }
    }
}

impl Histogram {
    pub fn observe(&self, v: f64) {
        let mut g = self.inner.lock().expect("histogram lock");
        for (b, c) in self.bounds.iter().zip(g.0.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        g.1 += v;
        g.2 += 1;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let g = self.inner.lock().expect("histogram lock");
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&g.0) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", g.2, g.1, g.2);
    }
}

#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub draft_tokens: AtomicU64,
    pub accepted_tokens: AtomicU64,
    pub queued: AtomicUsize,
    pub batch_size: AtomicUsize,
    pub kv_tokens: AtomicUsize,
    pub kv_blocks: AtomicUsize,
    pub kv_blocks_capacity: AtomicUsize,
    pub prefix_entries: AtomicUsize,
    pub prefix_reused_tokens: AtomicU64,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub request_seconds: Histogram,
}

impl Metrics {
    pub fn render(&self, kv_bytes_per_token: usize) -> String {
        let mut s = String::new();
        let c = |s: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let l = Ordering::Relaxed;
        c(&mut s, "dsv3_requests_total", "Requests accepted.", "counter", self.requests.load(l));
        c(&mut s, "dsv3_request_errors_total", "Requests answered with an error.", "counter", self.errors.load(l));
        c(
            &mut s,
            "dsv3_requests_cancelled_total",
            "Requests whose client went away mid-generation.",
            "counter",
            self.cancelled.load(l),
        );
        c(&mut s, "dsv3_prompt_tokens_total", "Prompt tokens processed.", "counter", self.prompt_tokens.load(l));
        c(&mut s, "dsv3_generation_tokens_total", "Tokens generated.", "counter", self.generated_tokens.load(l));
        c(&mut s, "dsv3_queue_depth", "Requests waiting for a slot.", "gauge", self.queued.load(l) as u64);
        c(&mut s, "dsv3_batch_size", "Sequences in the last step.", "gauge", self.batch_size.load(l) as u64);
        c(
            &mut s,
            "dsv3_kv_cache_tokens",
            "Tokens held in the latent KV cache.",
            "gauge",
            self.kv_tokens.load(l) as u64,
        );
        c(
            &mut s,
            "dsv3_kv_cache_bytes",
            "Bytes held in the latent KV cache.",
            "gauge",
            (self.kv_tokens.load(l) * kv_bytes_per_token) as u64,
        );
        c(
            &mut s,
            "dsv3_kv_blocks_in_use",
            "64-position latent-cache blocks alive (one per layer), shared prefixes included.",
            "gauge",
            self.kv_blocks.load(l) as u64,
        );
        c(
            &mut s,
            "dsv3_kv_blocks_capacity",
            "Blocks the --kv-memory budget allows.",
            "gauge",
            self.kv_blocks_capacity.load(l) as u64,
        );
        c(
            &mut s,
            "dsv3_prefix_cache_entries",
            "Prompt-prefix blocks kept for reuse.",
            "gauge",
            self.prefix_entries.load(l) as u64,
        );
        c(
            &mut s,
            "dsv3_prefix_reused_tokens_total",
            "Prompt tokens taken from the prefix cache instead of computed.",
            "counter",
            self.prefix_reused_tokens.load(l),
        );
        c(&mut s, "dsv3_mtp_draft_tokens_total", "MTP draft tokens proposed.", "counter", self.draft_tokens.load(l));
        c(
            &mut s,
            "dsv3_mtp_accepted_tokens_total",
            "MTP draft tokens accepted.",
            "counter",
            self.accepted_tokens.load(l),
        );
        let (d, a) = (self.draft_tokens.load(l), self.accepted_tokens.load(l));
        let _ = writeln!(
            s,
            "# HELP dsv3_mtp_acceptance_rate Accepted / proposed MTP drafts.\n# TYPE dsv3_mtp_acceptance_rate gauge\ndsv3_mtp_acceptance_rate {}",
            if d > 0 { a as f64 / d as f64 } else { 0.0 }
        );
        self.ttft.render("dsv3_time_to_first_token_seconds", "Queueing plus prefill until the first token.", &mut s);
        self.tpot.render("dsv3_time_per_output_token_seconds", "Time between consecutive tokens of a request.", &mut s);
        self.request_seconds.render("dsv3_request_seconds", "Time a request spent running.", &mut s);
        s
    }
}
