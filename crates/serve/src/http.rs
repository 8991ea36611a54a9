//! The connection layer under the API. What a slow or careless client can hold is bounded: a limit
//! on open connections, a deadline for each request's headers (and for an idle keep-alive
//! connection's next request) and for its body, caps on the URI, headers and body. Every refusal,
//! as every other error, carries an OpenAI-shaped JSON body — including the ones the framework
//! answers by itself (404, 405) and the ones the connection layer would answer bare (408, 413,
//! 414, 431).

use crate::error::ApiError;
use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;

/// Bounds on what one client can hold.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// For a request's headers to arrive, and for an idle keep-alive connection's next request.
    pub header_timeout: Duration,
    /// For a request's body to arrive once its headers have.
    pub body_timeout: Duration,
    /// Open connections; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    pub max_body_bytes: usize,
    pub max_uri_bytes: usize,
    /// The request line and headers together.
    pub max_header_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            max_connections: 512,
            max_body_bytes: 4 << 20,
            max_uri_bytes: 8 << 10,
            max_header_bytes: 32 << 10,
        }
    }
}

/// The connection layer's own header cap, above [`HttpLimits::max_header_bytes`] so that a large
/// request reaches [`edge`] and gets a JSON 431; only a larger one still gets hyper's bare 431.
const CONNECTION_HEADER_BYTES: usize = 256 << 10;

/// Checks a request against the limits and reads its body under the body deadline before any
/// handler runs; counts error responses.
pub async fn edge(State(st): State<Arc<EdgeState>>, req: Request, next: Next) -> Response {
    // Anthropic's clients read their own error shape.
    let anthropic = req.uri().path().starts_with("/v1/messages");
    let response = match read_within_limits(&st.limits, req).await {
        Ok(req) => next.run(req).await,
        Err(e) if anthropic => e.into_anthropic_response(),
        Err(e) => e.into_response(),
    };
    if response.status().is_client_error() || response.status().is_server_error() {
        st.metrics.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    response
}

/// What [`edge`] needs: the limits and the error counter of `/metrics`.
pub struct EdgeState {
    pub limits: HttpLimits,
    pub metrics: Arc<crate::metrics::Metrics>,
}

async fn read_within_limits(l: &HttpLimits, req: Request) -> Result<Request, ApiError> {
    let uri_len = req.uri().to_string().len();
    if uri_len > l.max_uri_bytes {
        let msg = format!("the URI is {uri_len} bytes; at most {}", l.max_uri_bytes);
        return Err(ApiError::new(StatusCode::URI_TOO_LONG, "invalid_request_error", msg));
    }
    let header_len: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if header_len > l.max_header_bytes {
        let msg = format!("the headers are {header_len} bytes; at most {}", l.max_header_bytes);
        return Err(ApiError::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "invalid_request_error", msg));
    }
    let (parts, body) = req.into_parts();
    let too_large = || {
        let msg = format!("the body is over {} bytes", l.max_body_bytes);
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", msg)
    };
    let declared =
        parts.headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > l.max_body_bytes as u64) {
        return Err(too_large());
    }
    let bytes = match tokio::time::timeout(l.body_timeout, Limited::new(body, l.max_body_bytes).collect()).await {
        Err(_) => {
            let msg = format!("the request body did not arrive within {} s", l.body_timeout.as_secs_f64());
            return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", msg));
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Ok(Err(e)) => return Err(ApiError::bad(format!("the request body could not be read: {e}"), None)),
        Ok(Ok(c)) => c.to_bytes(),
    };
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// 404 for paths the API does not have.
pub async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found_error",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

/// 405 for a known path with the wrong method.
pub async fn method_not_allowed(req: Request) -> ApiError {
    let msg = format!("{} is not allowed on {}", req.method(), req.uri().path());
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", msg)
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets in-flight requests finish
/// (idle connections are closed at once).
pub async fn serve_on(
    router: Router,
    listener: tokio::net::TcpListener,
    limits: &HttpLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(CONNECTION_HEADER_BYTES.max(limits.max_header_bytes + (16 << 10)));
    tokio::pin!(shutdown);
    loop {
        // A slot first: at the limit, new connections wait in the kernel's backlog.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.context("connection slots")?,
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors and the like: wait a moment rather than spin.
                    eprintln!("dsv3 serve: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
