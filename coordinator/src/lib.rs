//! The two-phase-commit coordinator: protocol core, driver, decision log and
//! gRPC service, plus [`run`], which serves them on a listener until a
//! shutdown future resolves, and [`run_with_admin`], which also serves the
//! admin HTTP endpoints (metrics, health, readiness) on a second listener.
//!
//! Layers, from the inside out:
//! - [`core`]: the IO-free state machine (presumed-abort 2PC with dynamic
//!   enlistment). All protocol decisions are made here.
//! - [`log`]: the decision log on RocksDB (group commit, synced decisions).
//! - [`driver`]: the task that owns the core and carries out its effects.
//! - [`service`]: the `twopc.v1.Coordinator` handlers.
//!
//! Operating it: [`config`] (flags, environment, TOML file), [`instruments`]
//! (the metrics and the Prometheus recorder), [`admin_http`] (`/metrics`,
//! `/healthz`, `/readyz`).

pub mod admin_http;
pub mod config;
pub mod core;
#[cfg(test)]
mod core_tests;
pub mod driver;
pub mod instruments;
pub mod log;
pub mod service;
pub mod timeline;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
use twopc_proto::{UnixMillis, pb};

use crate::admin_http::{AdminState, Readiness};
use crate::core::{Core, CoreConfig};
use crate::driver::DriverConfig;
use crate::log::{DecisionLog, LogError};
use crate::service::{CoordinatorService, Limits, Registry};

/// The coordinator's settings. The daemon fills them from flags,
/// `TWOPC_*` environment variables, a TOML file and defaults (see
/// [`config`]); tests build them with [`Config::for_dir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Address the gRPC API listens on (the daemon binds it; [`run`] takes
    /// the bound listener).
    pub listen: SocketAddr,
    /// Address of the admin HTTP listener (the daemon binds it;
    /// [`run_with_admin`] takes the bound listener).
    pub admin_listen: SocketAddr,
    /// Directory of the decision log (RocksDB). Created if missing.
    pub data_dir: PathBuf,
    /// Timeout of a transaction whose Begin or Execute asks for none.
    pub default_timeout: Duration,
    /// Longest timeout a transaction may ask for.
    pub max_timeout: Duration,
    /// How long all votes may take after Commit before the transaction
    /// aborts with PREPARE_TIMEOUT.
    pub prepare_timeout: Duration,
    /// How long a finished transaction's details stay available to Status.
    pub retention: Duration,

    /// On shutdown, how long transactions already begun may take to reach a
    /// decision before the rest are aborted.
    pub drain_timeout: Duration,
    /// Most branches one Execute may name.
    pub max_branches: usize,
    /// Largest payload of one Execute branch, in bytes.
    pub max_payload_bytes: usize,
    /// Commit a transaction with a single participant in one phase.
    pub one_phase: bool,
}

impl Default for Config {
    /// The daemon's defaults (docs/OPERATIONS.md lists them).
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            ..Config::for_dir("./data/coordinator")
        }
    }
}

impl Config {
    /// A configuration for tests: the given data dir, loopback port 0, and
    /// the defaults otherwise.
    pub fn for_dir(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.into(),
            default_timeout: Duration::from_secs(10),
            max_timeout: Duration::from_secs(300),
            prepare_timeout: Duration::from_secs(5),
            retention: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            max_branches: 64,
            max_payload_bytes: 64 * 1024,
            one_phase: true,
        }
    }
}

/// Why the coordinator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The decision log could not be opened or read.
    #[error("decision log: {0}")]
    Log(#[from] LogError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not load the descriptors.
    #[error("reflection: {0}")]
    Reflection(String),
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Opens the log, recovers, and serves the coordinator on `listener` until
/// `shutdown` resolves. Then stops accepting requests, stops the driver and
/// closes the log. No admin listener: [`run_with_admin`] with `None`.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
    run_with_admin(config, listener, None, shutdown).await
}

/// Aborts the admin listener's task when the run ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// [`run`], and also the admin HTTP endpoints on `admin` if given
/// (`/metrics`, `/healthz`, `/readyz`: see [`admin_http`]). The admin
/// listener serves from the start, so liveness holds during recovery;
/// `/readyz` turns 200 once the log is recovered and the gRPC API serves,
/// and 503 again as soon as `shutdown` resolves. Serving `/metrics`
/// installs the process's Prometheus recorder ([`instruments::install`]).
pub async fn run_with_admin(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    run_with_admin_ready(config, listener, admin, shutdown, || {}).await
}

/// [`run_with_admin`], calling `on_ready` once the log is recovered and the
/// gRPC API is about to serve (when `/readyz` turns 200): the daemon
/// announces its addresses there, so "listening" means ready.
pub async fn run_with_admin_ready(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
    on_ready: impl FnOnce() + Send,
) -> Result<(), Error> {
    let readiness = Readiness::default();
    let _admin = admin.map(|admin| {
        let metrics = instruments::install();
        if let Err(e) = &metrics {
            tracing::warn!(error = %e, "/metrics is unavailable");
        }
        let state = AdminState { readiness: readiness.clone(), metrics };
        AbortOnDrop(tokio::spawn(admin_http::serve(admin, state, std::future::pending())))
    });
    let log = DecisionLog::open(&config.data_dir)?;
    let epoch = log.next_epoch().await?;
    let records = log.load()?;
    let registry = Registry::new(log.registry()?);
    let core_config = CoreConfig {
        default_timeout_ms: ms(config.default_timeout),
        max_timeout_ms: ms(config.max_timeout),
        prepare_timeout_ms: ms(config.prepare_timeout),
        retention_ms: ms(config.retention),
        seed: epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        one_phase: config.one_phase,
        ..CoreConfig::default()
    };
    let mut core = Core::new(epoch, core_config);
    let pending = records.iter().filter(|(_, r)| !r.ended).count();
    let mut recovery = core.recover(UnixMillis::now(), records, log.horizon()?);
    let markers = log.markers()?;
    recovery.extend(core.recover_markers(markers));
    let collecting = core.uncollected().len();
    tracing::info!(epoch, resuming = pending, collecting, data_dir = %config.data_dir.display(), "decision log recovered");
    let driver_config = DriverConfig { prepare_rpc_timeout: config.prepare_timeout, ..DriverConfig::default() };
    let handle = driver::spawn(core, recovery, log.clone(), registry.clone(), driver_config);
    let service = CoordinatorService::new(
        handle.clone(),
        registry,
        log,
        Limits { max_branches: config.max_branches, max_payload_bytes: config.max_payload_bytes },
    );

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<pb::coordinator_server::CoordinatorServer<CoordinatorService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(twopc_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Reflection(e.to_string()))?;

    readiness.set(true);
    on_ready();
    // The largest Execute the limits allow, with room for its framing:
    // anything larger is refused by tonic before it is decoded.
    let max_message =
        config.max_branches.saturating_mul(config.max_payload_bytes.saturating_add(1024)).saturating_add(64 << 10).max(4 << 20);
    let (stop_serving, serving_stopped) = tokio::sync::oneshot::channel::<()>();
    let draining = service.draining();
    let server = tonic::transport::Server::builder()
        // One span per request, child of the caller's trace context: the
        // span of a transaction a Begin or Execute starts hangs under it.
        .trace_fn(|req| {
            let span = tracing::debug_span!("grpc_request", rpc = %req.uri().path());
            twopc_telemetry::propagation::set_remote_parent(&span, req.headers());
            span
        })
        .add_service(health_service)
        .add_service(reflection)
        .add_service(pb::coordinator_server::CoordinatorServer::new(service.clone()).max_decoding_message_size(max_message))
        .add_service(pb::admin_server::AdminServer::new(service))
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), async {
            let _ = serving_stopped.await;
        });
    tokio::pin!(server);
    // Serve until the shutdown signal (or a server error), then drain while
    // still serving: report NOT_SERVING, refuse new transactions, let the
    // ones already begun reach a decision, abort what is left at the drain
    // deadline, and only then stop serving.
    let early = tokio::select! {
        r = &mut server => Some(r),
        () = shutdown => None,
    };
    if let Some(r) = early {
        handle.stop().await;
        r?;
        return Ok(());
    }
    readiness.set(false);
    draining.store(true, std::sync::atomic::Ordering::SeqCst);
    health_reporter.set_not_serving::<pb::coordinator_server::CoordinatorServer<CoordinatorService>>().await;
    // The overall status ("") too: probes that name no service ask for it.
    health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    let drained = tokio::select! {
        r = &mut server => Some(r),
        () = drain(&handle, config.drain_timeout) => None,
    };
    let _ = stop_serving.send(());
    // Serving stops once open connections close; a client that keeps one
    // open (a Watch subscriber, say) must not hold the exit forever.
    let result = match drained {
        Some(r) => r,
        None => match tokio::time::timeout(Duration::from_secs(5), server).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("connections still open 5 s after draining; closing them");
                Ok(())
            }
        },
    };
    handle.stop().await;
    result?;
    Ok(())
}

/// Waits until no transaction is undecided (Active, Preparing, Deciding),
/// up to `timeout`; then aborts those still active or preparing and waits a
/// moment for decisions being written.
async fn drain(handle: &driver::Handle, timeout: Duration) {
    use crate::core::{Input, Reply, TxnState};
    let now = tokio::time::Instant::now();
    let deadline = now.checked_add(timeout).unwrap_or(now + Duration::from_secs(86_400 * 365));
    let undecided = || async {
        match handle.call(|req| Input::List { req, in_doubt_only: false, limit: usize::MAX, filter: Default::default() }).await {
            Ok(Reply::List(l)) => l
                .transactions
                .into_iter()
                .filter(|t| matches!(t.state, TxnState::Active | TxnState::Preparing | TxnState::Deciding))
                .map(|t| (t.txn, t.state))
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        }
    };
    loop {
        let left = undecided().await;
        if left.is_empty() {
            tracing::info!("drained: every transaction is decided");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(undecided = left.len(), "drain deadline reached; aborting what is not decided");
            for (txn, state) in left {
                if matches!(state, TxnState::Active | TxnState::Preparing) {
                    let _ = handle.call(|req| Input::Shutdown { req, txn }).await;
                }
            }
            // A decision being written finishes in about an fsync.
            let settle = tokio::time::Instant::now() + Duration::from_secs(1);
            while !undecided().await.is_empty() && tokio::time::Instant::now() < settle {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            return;
        }
        // Each poll lists every held transaction on the core's task: poll
        // gently.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
