//! The admin HTTP listener: `GET /metrics` (Prometheus text), `/healthz`
//! and `/readyz`, on an address of its own (default 127.0.0.1:9464) so it
//! can stay on loopback or a private interface while the gRPC port is
//! exposed.
//!
//! - `/healthz` answers 200 as long as the process serves anything at all
//!   (liveness).
//! - `/readyz` answers 200 only while [`Readiness`] is set: from the moment
//!   the decision log is recovered and the gRPC API serves, until shutdown
//!   begins (draining, stopping); 503 before and after (readiness).
//! - `/metrics` renders the process's Prometheus recorder (see
//!   [`crate::instruments`]); 503 with the reason if none could be
//!   installed.
//!
//! HTTP/1.1 only, with hyper (already in the tree through tonic); no TLS, no
//! authentication: bind it where only the monitoring system reaches it.
//! `HEAD` is answered like `GET` without the body; other methods get 405, other paths 404.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Whether the coordinator is ready to take transactions; shared between
/// [`crate::run_with_admin`], which sets and clears it, and `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the coordinator ready (true) or not (false).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    /// Whether it is ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What the admin listener serves.
#[derive(Clone)]
pub struct AdminState {
    /// Read by `/readyz`.
    pub readiness: Readiness,
    /// Rendered by `/metrics`, or why there is no recorder.
    pub metrics: Result<PrometheusHandle, String>,
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves, then
/// closes every open connection.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: impl Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Per-connection errors (the peer reset, too many open
                    // files): keep serving the others.
                    tracing::debug!(error = %e, "admin listener: accept failed");
                    continue;
                }
            },
            // Reap finished connections so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let state = state.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "admin listener: connection ended with an error");
            }
        });
    }
    connections.shutdown().await;
}

fn respond(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
    }
    // (hyper leaves the body out of a response to HEAD itself.)
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" if state.readiness.get() => text(StatusCode::OK, "ready\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: starting, draining or stopping\n".into()),
        "/metrics" => match &state.metrics {
            Ok(handle) => {
                let mut r = text(StatusCode::OK, handle.render());
                r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
                r
            }
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found; try /metrics, /healthz or /readyz\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}
