//! The coordinator daemon: resolves its configuration (flags over `TWOPC_*`
//! environment variables over the `--config` TOML file over defaults), binds
//! the gRPC port and the admin HTTP port, prints "listening on ADDR" and then
//! "admin listening on ADDR" on stdout once its decision log is recovered
//! and it serves (the admin port serves liveness from the start), and
//! serves until SIGINT or SIGTERM. `twopc-coordinator config show` prints
//! the effective configuration as TOML instead.
//!
//! Exit codes: 0 after a clean stop (or `config show`), 1 when it cannot
//! start or fails while serving, 2 for a usage error (bad flag, bad
//! environment value, unreadable or invalid configuration file).

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use twopc_coordinator::config::{DaemonConfig, LogFormat, Options};

/// mimalloc: the profile showed a sixth of each process's CPU in the
/// system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Two-phase-commit coordinator with an embedded RocksDB decision log.
///
/// Every option can also be set with the environment variable named in its
/// help (prefix TWOPC_) or as a key of the TOML file given by --config;
/// a flag wins over the environment, which wins over the file, which wins
/// over the default. docs/OPERATIONS.md describes each option.
#[derive(Debug, Parser)]
#[command(name = "twopc-coordinator", version)]
struct Cli {
    /// TOML configuration file; its keys are the long option names with
    /// underscores (default_timeout = "7s").
    #[arg(long, env = "TWOPC_CONFIG", value_name = "PATH", global = true)]
    config: Option<PathBuf>,

    #[command(flatten)]
    options: Options,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Print the effective configuration (after flags, environment, file and
    /// defaults) as TOML, usable as a --config file, and exit.
    Show,
}

fn main() {
    let cli = Cli::parse();
    let file = match &cli.config {
        Some(path) => match Options::from_file(path) {
            Ok(o) => Some(o),
            Err(e) => usage(&e.to_string()),
        },
        None => None,
    };
    let config = DaemonConfig::resolve(cli.options, file);
    if let Err(e) = config.validate() {
        usage(&format!("invalid configuration: {e}"));
    }
    if let Some(Command::Config { action: ConfigAction::Show }) = cli.command {
        let mut out = std::io::stdout();
        let _ = out.write_all(config.to_toml().as_bytes());
        let _ = out.flush();
        return;
    }
    if let Err(e) = twopc_storage::crash::arm_from_env() {
        fail(&e);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => fail(&format!("cannot start the runtime: {e}")),
    };
    let telemetry = twopc_telemetry::Config {
        service_name: "twopc-coordinator".into(),
        log_filter: config.log.clone(),
        log_format: match config.log_format {
            LogFormat::Auto => twopc_telemetry::LogFormat::Auto,
            LogFormat::Json => twopc_telemetry::LogFormat::Json,
            LogFormat::Text => twopc_telemetry::LogFormat::Text,
        },
        otlp_endpoint: config.otlp_endpoint.clone(),
    };
    // The OTLP exporter's channel lives on the runtime.
    let _telemetry = match runtime.block_on(async { twopc_telemetry::init(&telemetry) }) {
        Ok(t) => t,
        Err(e @ twopc_telemetry::Error::Filter { .. }) => usage(&e.to_string()),
        Err(e) => fail(&e.to_string()),
    };
    if let Err(e) = runtime.block_on(serve(config.coordinator)) {
        fail(&e);
    }
}

async fn serve(config: twopc_coordinator::Config) -> Result<(), String> {
    // Installed first, so that a signal during startup or recovery drains
    // instead of killing the process.
    let shutdown = shutdown_signal();
    let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| format!("cannot listen on {} (admin): {e}", config.admin_listen))?;
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
    // Announced once the decision log is recovered and the API serves; the
    // admin listener (liveness) serves from the start.
    let announce = move || {
        tracing::info!(%addr, %admin_addr, "twopc-coordinator listening");
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening on {addr}");
        let _ = writeln!(out, "admin listening on {admin_addr}");
        let _ = out.flush();
    };
    twopc_coordinator::run_with_admin_ready(config, listener, Some(admin), shutdown, announce).await.map_err(|e| e.to_string())?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called — before recovery — so a signal during a long recovery is not
/// fatal: the daemon drains as soon as it serves.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("twopc-coordinator: {msg}");
    std::process::exit(1);
}

fn usage(msg: &str) -> ! {
    eprintln!("twopc-coordinator: {msg}");
    std::process::exit(2);
}
