//! Carrying the transaction from an initiator to the services it calls.
//!
//! Client side: [`TxnInterceptor`] puts the transaction id in the
//! `twopc-txn` gRPC metadata of every request made through a client built
//! with it (`Transaction::interceptor`).
//!
//! Server side: [`TxnLayer`] reads that metadata on every incoming request.
//! A request that carries a transaction is held until this participant has
//! joined it — enlisted with the coordinator and been acknowledged — and only
//! then reaches the handler, with a [`TxnScope`] in its extensions. So a
//! service can never answer its caller for work the coordinator does not
//! know about. A request whose transaction cannot be joined is answered
//! FAILED_PRECONDITION (JOIN_REFUSED) without running the handler; a
//! malformed id is INVALID_ARGUMENT (TXN_ID_MALFORMED). Requests without the
//! metadata pass through untouched.
//!
//! Both sides carry W3C trace context too: the interceptor injects the
//! caller's current span, and the layer runs each request that carries a
//! transaction or a `traceparent` in a `grpc_request` span (DEBUG level)
//! whose parent is the caller's, so the work a transaction does here is part
//! of the initiator's trace.

use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tracing::Instrument;
use twopc_proto::status::error;
use twopc_proto::{ParticipantName, TXN_METADATA_KEY, TxnId, UnixMillis, reason};
use twopc_telemetry::propagation::{self, TRACEPARENT};

use crate::core::{Input, Reply};
use crate::driver::Handle;
use crate::service::core_error;

/// The transaction a request runs under, as a handler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnScope {
    /// The transaction.
    pub txn: TxnId,
    /// Its deadline: the work is aborted if not committed by then.
    pub deadline: UnixMillis,
}

impl TxnScope {
    /// The scope of a request that arrived through [`TxnLayer`], if it
    /// carried a transaction.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<TxnScope> {
        request.extensions().get::<TxnScope>().copied()
    }
}

/// Client-side interceptor that tags requests with a transaction id.
#[derive(Debug, Clone)]
pub struct TxnInterceptor {
    value: MetadataValue<tonic::metadata::Ascii>,
}

impl TxnInterceptor {
    /// An interceptor for `txn`.
    pub fn new(txn: TxnId) -> Self {
        // A TxnId renders as ASCII digits, dashes and "tx".
        let value = MetadataValue::try_from(txn.to_string()).unwrap_or_else(|_| MetadataValue::from_static("invalid"));
        TxnInterceptor { value }
    }
}

impl Interceptor for TxnInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert(TXN_METADATA_KEY, self.value.clone());
        propagation::inject_current(&mut request);
        Ok(request)
    }
}

/// Server-side layer that joins transactions named in request metadata.
#[derive(Clone)]
pub struct TxnLayer {
    handle: Handle,
    in_flight: InFlight,
    name: ParticipantName,
}

impl TxnLayer {
    pub(crate) fn new(handle: Handle, in_flight: InFlight, name: ParticipantName) -> Self {
        TxnLayer { handle, in_flight, name }
    }
}

/// Business calls running right now, per transaction. A Prepare that
/// arrives while one is still running votes NO: the call's work would be
/// only partly staged (the initiator committed before every call returned).
#[derive(Clone, Default)]
pub struct InFlight {
    calls: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<TxnId, usize>>>,
}

impl InFlight {
    /// Number of calls under `txn` running now.
    pub fn running(&self, txn: TxnId) -> usize {
        self.calls.lock().map(|m| m.get(&txn).copied().unwrap_or(0)).unwrap_or(0)
    }

    fn enter(&self, txn: TxnId) -> CallGuard {
        if let Ok(mut m) = self.calls.lock() {
            *m.entry(txn).or_default() += 1;
        }
        CallGuard { in_flight: self.clone(), txn }
    }
}

/// Counts one running call; uncounts it when dropped (also when the call is
/// cancelled).
struct CallGuard {
    in_flight: InFlight,
    txn: TxnId,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.in_flight.calls.lock()
            && let Some(n) = m.get_mut(&self.txn)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.txn);
            }
        }
    }
}

impl<S> tower::Layer<S> for TxnLayer {
    type Service = TxnService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TxnService { inner, handle: self.handle.clone(), in_flight: self.in_flight.clone(), name: self.name.clone() }
    }
}

/// The service [`TxnLayer`] wraps around each inner service.
#[derive(Clone)]
pub struct TxnService<S> {
    inner: S,
    handle: Handle,
    in_flight: InFlight,
    name: ParticipantName,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for TxnService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let raw = req.headers().get(TXN_METADATA_KEY).cloned();
        if raw.is_none() && !req.headers().contains_key(TRACEPARENT) {
            return Box::pin(self.inner.call(req));
        }
        let span = tracing::debug_span!("grpc_request", rpc = %req.uri().path(), participant = %self.name, txn_id = tracing::field::Empty);
        propagation::set_remote_parent(&span, req.headers());
        let Some(raw) = raw else {
            let _entered = span.enter();
            let fut = self.inner.call(req);
            drop(_entered);
            return Box::pin(fut.instrument(span));
        };
        let call_span = span.clone();
        // The clone is ready-checked as tower requires: swap it in.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let handle = self.handle.clone();
        let in_flight = self.in_flight.clone();
        Box::pin(
            async move {
                let txn = match raw.to_str().ok().map(str::parse::<TxnId>) {
                    Some(Ok(t)) => t,
                    _ => {
                        let text = String::from_utf8_lossy(raw.as_bytes()).chars().take(64).collect::<String>();
                        let s = error(
                            Code::InvalidArgument,
                            reason::TXN_ID_MALFORMED,
                            format!("malformed {TXN_METADATA_KEY} metadata {text:?}"),
                        );
                        return Ok(s.into_http());
                    }
                };
                call_span.record("txn_id", tracing::field::display(txn));
                match handle.call(|r| Input::Join { req: r, txn }).await {
                    Ok(Reply::Joined { deadline }) => {
                        req.extensions_mut().insert(TxnScope { txn, deadline });
                        let _running = in_flight.enter(txn);
                        inner.call(req).await
                    }
                    Ok(Reply::Error(e)) => Ok(core_error(&e).into_http()),
                    Ok(other) => Ok(tonic::Status::internal(format!("unexpected reply {other:?}")).into_http()),
                    Err(_) => Ok(error(Code::Unavailable, reason::PARTICIPANT_UNAVAILABLE, "the participant is shutting down").into_http()),
                }
            }
            .instrument(span),
        )
    }
}
