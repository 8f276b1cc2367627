//! Logs and traces for every process of the project: the coordinator
//! daemon, services that link the participant library, initiators, the
//! examples and the benchmark.
//!
//! - [`init`] installs the process's `tracing` subscriber: log lines on
//!   stderr (JSON when stderr is not a terminal, human-readable when it is),
//!   and, when an OTLP endpoint is configured, every span exported over OTLP
//!   gRPC to a collector. Without an endpoint nothing is exported and no
//!   exporter runs.
//! - [`propagation`] carries W3C trace context (`traceparent`,
//!   `tracestate`) in gRPC metadata, next to the transaction id, so one
//!   distributed transaction is one trace across the initiator, the
//!   coordinator and every participant.
//!
//! The libraries (coordinator, participant) only create `tracing` spans and
//! propagate context; whether those spans go anywhere is decided by the
//! subscriber the process installs, here or its own.

#![forbid(unsafe_code)]

pub mod propagation;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The standard environment variable naming the OTLP collector, read when
/// no endpoint is configured explicitly.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The signal-specific form of [`OTLP_ENDPOINT_ENV`]; wins over it.
pub const OTLP_TRACES_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, text when it is.
    #[default]
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// What [`init`] sets up.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `service.name` resource attribute of exported spans.
    pub service_name: String,
    /// Which log lines are written, as an `EnvFilter` directive
    /// (`info`, `twopc_coordinator=debug,info`).
    pub log_filter: String,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// The OTLP gRPC collector (`http://host:4317`). `None` falls back to
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; when none is set, spans are not
    /// exported.
    pub otlp_endpoint: Option<String>,
}

impl Config {
    /// Defaults for `service_name`: `info` logs in the automatic format,
    /// OTLP from the environment.
    pub fn new(service_name: impl Into<String>) -> Self {
        Config { service_name: service_name.into(), log_filter: "info".into(), log_format: LogFormat::Auto, otlp_endpoint: None }
    }

    /// The endpoint spans are exported to: the configured one, else the
    /// standard environment variables; empty values count as unset.
    pub fn resolved_endpoint(&self) -> Option<String> {
        let env = |name: &str| std::env::var(name).ok();
        [self.otlp_endpoint.clone(), env(OTLP_TRACES_ENDPOINT_ENV), env(OTLP_ENDPOINT_ENV)]
            .into_iter()
            .flatten()
            .map(|s| s.trim().to_owned())
            .find(|s| !s.is_empty())
    }
}

/// Why [`init`] failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log filter does not parse.
    #[error("invalid log filter {filter:?}: {reason}")]
    Filter {
        /// The filter as given.
        filter: String,
        /// The parser's complaint.
        reason: String,
    },
    /// The OTLP endpoint is not an http(s) URL.
    #[error("invalid OTLP endpoint {0:?}: expected http://host:port or https://host:port")]
    Endpoint(String),
    /// The exporter could not be built.
    #[error("cannot set up OTLP export to {endpoint}: {reason}")]
    Exporter {
        /// The endpoint.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// A global subscriber is installed already.
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the exporter running; dropping it flushes the spans not yet
/// exported (waiting at most [`FLUSH_TIMEOUT`]) and stops the exporter.
#[must_use = "dropping the guard stops span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    endpoint: Option<String>,
}

/// Longest [`Telemetry`]'s drop waits for spans to be exported.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

impl Telemetry {
    /// Where spans are exported, when they are.
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Exports the spans ended so far now.
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown_with_timeout(FLUSH_TIMEOUT);
        }
    }
}

/// Installs the global subscriber described by `config`. With OTLP export
/// it must be called inside a tokio runtime (the exporter's gRPC channel
/// lives on it); keep the returned guard until the process ends.
pub fn init(config: &Config) -> Result<Telemetry, Error> {
    let filter = |s: &str| EnvFilter::try_new(s).map_err(|e| Error::Filter { filter: s.to_owned(), reason: e.to_string() });
    let json = match config.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json { fmt.json().boxed() } else { fmt.boxed() }.with_filter(filter(&config.log_filter)?);
    let endpoint = config.resolved_endpoint();
    let (provider, otel) = match &endpoint {
        None => (None, None),
        Some(endpoint) => {
            let provider = tracer_provider(&config.service_name, endpoint)?;
            let tracer = provider.tracer("twopc");
            // Spans of the project's crates down to DEBUG (the per-call
            // spans), everything else at INFO, whatever the log filter says.
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(filter("info,twopc_coordinator=debug,twopc_participant=debug,twopc_examples=debug")?);
            (Some(provider), Some(layer))
        }
    };
    tracing_subscriber::registry().with(fmt).with(otel).try_init().map_err(|_| Error::AlreadyInstalled)?;
    Ok(Telemetry { provider, endpoint })
}

fn tracer_provider(service_name: &str, endpoint: &str) -> Result<SdkTracerProvider, Error> {
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(Error::Endpoint(endpoint.to_owned()));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| Error::Exporter { endpoint: endpoint.to_owned(), reason: e.to_string() })?;
    let resource = Resource::builder().with_service_name(service_name.to_owned()).build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_endpoint_wins_and_blank_is_unset() {
        let mut c = Config::new("t");
        c.otlp_endpoint = Some("http://127.0.0.1:1".into());
        assert_eq!(c.resolved_endpoint().as_deref(), Some("http://127.0.0.1:1"));
        c.otlp_endpoint = Some("  ".into());
        // Falls through to the environment, unset in the test runner unless
        // a collector is configured for the whole run.
        let env =
            std::env::var(OTLP_TRACES_ENDPOINT_ENV).or_else(|_| std::env::var(OTLP_ENDPOINT_ENV)).ok().filter(|s| !s.trim().is_empty());
        assert_eq!(c.resolved_endpoint(), env.map(|s| s.trim().to_owned()));
    }

    #[test]
    fn bad_endpoint_is_refused() {
        let e = tracer_provider("t", "localhost:4317").err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("invalid OTLP endpoint \"localhost:4317\": expected http://host:port or https://host:port"));
    }
}
