//! `dsv3 serve`: an OpenAI-compatible server over the model crate (issue 5).
//!
//! One engine thread owns the model and runs continuous batching over `forward_batch`
//! ([`engine`]); axum handles HTTP on a tokio runtime and talks to the engine through a bounded
//! queue and per-request event channels ([`api`]); [`metrics`] renders Prometheus text.

pub mod api;
pub mod engine;
pub mod error;
pub mod front;
pub mod grammar;
pub mod http;
pub mod metrics;
pub mod prefix;
pub mod tools;

use anyhow::{Context, Result};
use dsv3_model::{DeepseekV3, Tokenizer};
use engine::EngineConfig;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    pub max_batch: usize,
    /// Bytes the latent KV cache may use across running requests.
    pub kv_memory: usize,
    pub max_queue: usize,
    pub prefill_chunk: usize,
    /// MTP drafts per step (0: plain decoding).
    pub mtp_speculative: usize,
    /// Reuse full 64-token prompt blocks across requests with the same prefix.
    pub prefix_cache: bool,
    pub extra_metrics: Option<MetricsHook>,
    /// Connection limits and deadlines.
    pub http: http::HttpLimits,
    /// Names of the LoRA adapters the model serves (its slots 1, 2, …), selected by `model`.
    pub adapters: Vec<String>,
}

/// Extra Prometheus lines appended to `/metrics`.
#[derive(Clone)]
pub struct MetricsHook(pub Arc<dyn Fn() -> String + Send + Sync>);

impl std::fmt::Debug for MetricsHook {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("MetricsHook")
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            max_batch: 16,
            kv_memory: 1 << 30,
            max_queue: 64,
            prefill_chunk: 64,
            mtp_speculative: 0,
            prefix_cache: false,
            extra_metrics: None,
            http: http::HttpLimits::default(),
            adapters: vec![],
        }
    }
}

/// Builds the app state and starts the engine for a loaded model.
pub fn build(
    name: &str,
    model: impl Into<Arc<DeepseekV3>>,
    tokenizer: Option<Tokenizer>,
    eos_ids: Vec<u32>,
    o: &ServeOptions,
) -> (Arc<api::AppState>, std::thread::JoinHandle<()>) {
    let model = model.into();
    let mtp_speculative = if model.mtp.is_empty() { 0 } else { o.mtp_speculative };
    // One block: 64 positions of one layer's latent cache.
    let block_bytes = dsv3_model::paged::BLOCK_TOKENS * model.latent_bytes_per_token_layer();
    let kv_blocks = (o.kv_memory / block_bytes.max(1)).max(1);
    let cache_layers = model.layers.len() + if mtp_speculative > 0 { model.mtp.len() } else { 0 };
    let cfg = EngineConfig {
        max_batch: o.max_batch.max(1),
        prefill_chunk: o.prefill_chunk.max(1),
        kv_blocks,
        cache_layers,
        kv_tokens: (kv_blocks / cache_layers.max(1) * dsv3_model::paged::BLOCK_TOKENS).max(1),
        prefix_cache: o.prefix_cache,
        max_queue: o.max_queue,
        mtp_speculative,
    };
    let (engine, thread) = engine::start(model.clone(), cfg);
    let format = tools::ChatFormat::of(tokenizer.as_ref());
    let state = Arc::new(api::AppState {
        engine,
        model,
        tokenizer,
        model_name: name.to_string(),
        api_key: o.api_key.clone(),
        eos_ids,
        extra_metrics: o.extra_metrics.clone(),
        http: o.http.clone(),
        grammars: Default::default(),
        format,
        adapters: o.adapters.clone(),
    });
    if state.tokenizer.is_some() {
        // The grammar engine's token trie (~0.7 s for a 129K vocabulary), built off the request
        // path so the first structured-output request does not wait for it.
        let s = state.clone();
        let _ = std::thread::Builder::new().name("dsv3-grammar-init".into()).spawn(move || {
            let _ = s.grammars();
        });
    }
    (state, thread)
}

/// Serves until `shutdown` resolves; in-flight requests finish first.
pub async fn serve(
    state: Arc<api::AppState>,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    serve_on(state, listener, shutdown).await
}

pub async fn serve_on(
    state: Arc<api::AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let limits = state.http.clone();
    http::serve_on(api::router(state), listener, &limits, shutdown).await.context("serving")
}
