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
        self.render_labeled(name, help, "", out)
    }

    /// With `labels` (`key="value",...`, escaped) on every sample.
    fn render_labeled(&self, name: &str, help: &str, labels: &str, out: &mut String) {
        let g = self.inner.lock().expect("histogram lock");
        let (sep, braces) = if labels.is_empty() { ("", String::new()) } else { (",", format!("{{{labels}}}")) };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&g.0) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"{sep}{labels}}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"{sep}{labels}}} {}\n{name}_sum{braces} {}\n{name}_count{braces} {}",
            g.2, g.1, g.2
        );
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
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queried_tokens: AtomicU64,
    /// Requests that ended by a stop (end of sequence, stop id or string) or by their length.
    pub finished_stop: AtomicU64,
    pub finished_length: AtomicU64,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub request_seconds: Histogram,
}

impl Metrics {
    pub fn finished(&self, f: crate::engine::Finish) {
        let c = match f {
            crate::engine::Finish::Stop => &self.finished_stop,
            crate::engine::Finish::Length => &self.finished_length,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

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

    /// The same figures under the names vLLM exports (labelled `model_name`), so that dashboards
    /// and autoscalers written for vLLM read dsv3 unchanged. KV usage is the fraction of the
    /// `--kv-memory` blocks in use.
    pub fn render_vllm(&self, model_name: &str) -> String {
        let l = Ordering::Relaxed;
        let esc = model_name.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let labels = format!("model_name=\"{esc}\"");
        let mut s = String::new();
        let mut one = |name: &str, help: &str, kind: &str, v: f64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {v}");
        };
        let cap = self.kv_blocks_capacity.load(l).max(1) as f64;
        one("vllm:num_requests_running", "Requests in the running batch.", "gauge", self.batch_size.load(l) as f64);
        one("vllm:num_requests_waiting", "Requests waiting to be scheduled.", "gauge", self.queued.load(l) as f64);
        one("vllm:kv_cache_usage_perc", "KV-cache usage (1 is full).", "gauge", self.kv_blocks.load(l) as f64 / cap);
        one("vllm:prompt_tokens_total", "Prefill tokens processed.", "counter", self.prompt_tokens.load(l) as f64);
        one(
            "vllm:generation_tokens_total",
            "Generation tokens processed.",
            "counter",
            self.generated_tokens.load(l) as f64,
        );
        one(
            "vllm:num_preemptions_total",
            "Preemptions (dsv3 reserves cache at admission and never preempts).",
            "counter",
            0.0,
        );
        one(
            "vllm:prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache.",
            "counter",
            self.prefix_queried_tokens.load(l) as f64,
        );
        one(
            "vllm:prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache.",
            "counter",
            self.prefix_reused_tokens.load(l) as f64,
        );
        one(
            "vllm:spec_decode_num_draft_tokens_total",
            "Draft tokens proposed.",
            "counter",
            self.draft_tokens.load(l) as f64,
        );
        one(
            "vllm:spec_decode_num_accepted_tokens_total",
            "Draft tokens accepted.",
            "counter",
            self.accepted_tokens.load(l) as f64,
        );
        let name = "vllm:request_success_total";
        let _ = writeln!(s, "# HELP {name} Finished requests by finish reason.\n# TYPE {name} counter");
        for (reason, v) in [
            ("stop", self.finished_stop.load(l)),
            ("length", self.finished_length.load(l)),
            ("abort", self.cancelled.load(l)),
        ] {
            let _ = writeln!(s, "{name}{{finished_reason=\"{reason}\",{labels}}} {v}");
        }
        let h = [
            (&self.ttft, "vllm:time_to_first_token_seconds", "Time to first token."),
            (&self.tpot, "vllm:time_per_output_token_seconds", "Time per output token."),
            (&self.tpot, "vllm:inter_token_latency_seconds", "Time between consecutive tokens."),
            (&self.request_seconds, "vllm:e2e_request_latency_seconds", "Request latency."),
        ];
        for (hist, name, help) in h {
            hist.render_labeled(name, help, &labels, &mut s);
        }
        s
    }
}
