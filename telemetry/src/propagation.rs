//! W3C trace context (`traceparent`, `tracestate`) in gRPC metadata.
//!
//! Client side, [`inject`] writes the context of a `tracing` span into an
//! outgoing request's metadata. Server side, [`extract`] reads it from the
//! request's HTTP/2 headers and [`set_remote_parent`] makes it the parent of
//! the span that handles the request. When the process exports no traces
//! (no OpenTelemetry layer in its subscriber) the span has no trace context:
//! nothing is injected and setting a parent does nothing, so the calls cost
//! a lookup and are always safe.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The metadata key of the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";

/// Writes the trace context of `span` into `metadata`; does nothing when the
/// span has none (traces are not exported, or the span is disabled).
pub fn inject(span: &tracing::Span, metadata: &mut MetadataMap) {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
}

/// Writes the trace context of the current span into `request`.
pub fn inject_current<T>(request: &mut tonic::Request<T>) {
    inject(&tracing::Span::current(), request.metadata_mut());
}

/// The remote trace context an incoming request carries, if any.
pub fn extract(headers: &http::HeaderMap) -> Option<Context> {
    headers.get(TRACEPARENT)?;
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes the trace context `headers` carry the parent of `span`, which must
/// be new (not yet entered). A malformed `traceparent` is ignored: the span
/// then starts a trace of its own.
pub fn set_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    if let Some(cx) = extract(headers) {
        let _ = span.set_parent(cx);
    }
}

/// The trace context of `span` as key/value pairs, for messages that carry
/// it in a field (batched messages): empty, without allocating, when the
/// span has none.
pub fn to_map(span: &tracing::Span) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut map);
    }
    map
}

/// Makes the trace context in `map` (from [`to_map`]) the parent of the new
/// `span`; does nothing when there is none or it is malformed.
pub fn set_parent_from_map(span: &tracing::Span, map: &HashMap<String, String>) {
    if !map.contains_key(TRACEPARENT) {
        return;
    }
    let cx = TraceContextPropagator::new().extract(map);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The trace id of `span` as 32 hex digits, when it has trace context.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_or_missing_traceparent_is_no_context() {
        let mut h = http::HeaderMap::new();
        assert!(extract(&h).is_none());
        h.insert(TRACEPARENT, http::HeaderValue::from_static("00-zz-1-01"));
        assert!(extract(&h).is_none());
        h.insert(TRACEPARENT, http::HeaderValue::from_static("00-00000000000000000000000000000000-0000000000000000-01"));
        assert!(extract(&h).is_none());
    }

    #[test]
    fn well_formed_traceparent_is_extracted() {
        let mut h = http::HeaderMap::new();
        h.insert(TRACEPARENT, http::HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let cx = extract(&h).map(|c| c.span().span_context().trace_id().to_string());
        assert_eq!(cx.as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    #[test]
    fn a_span_without_trace_context_injects_nothing() {
        let mut m = MetadataMap::new();
        inject(&tracing::info_span!("no subscriber"), &mut m);
        assert!(m.is_empty());
    }
}
