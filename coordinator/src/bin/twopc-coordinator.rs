//! The coordinator daemon: parses its configuration, binds the gRPC port,
//! prints "listening on ADDR" on stdout once it accepts connections, and
//! serves until SIGINT or SIGTERM.

use std::io::{IsTerminal, Write};

use clap::{Parser, ValueEnum};

/// Two-phase-commit coordinator with an embedded RocksDB decision log.
///
/// Every option can also be set with the environment variable named in its
/// help (prefix TWOPC_); a flag wins over the environment.
#[derive(Debug, Parser)]
#[command(name = "twopc-coordinator", version)]
struct Cli {
    #[command(flatten)]
    config: twopc_coordinator::Config,

    /// Log format on stderr: JSON lines, human-readable text, or auto (text
    /// on a terminal, JSON otherwise).
    #[arg(long, env = "TWOPC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (for example "info" or
    /// "twopc_coordinator=debug").
    #[arg(long, env = "TWOPC_LOG", default_value = "info")]
    log: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Auto,
    Json,
    Text,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = twopc_storage::crash::arm_from_env() {
        fail(&e);
    }
    let json = match cli.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => fail(&format!("cannot start the runtime: {e}")),
    };
    if let Err(e) = runtime.block_on(serve(cli.config)) {
        fail(&e);
    }
}

async fn serve(config: twopc_coordinator::Config) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, "twopc-coordinator listening");
    let mut out = std::io::stdout();
    let _ = writeln!(out, "listening on {addr}");
    let _ = out.flush();
    twopc_coordinator::run(config, listener, shutdown_signal()).await.map_err(|e| e.to_string())?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn fail(msg: &str) -> ! {
    eprintln!("twopc-coordinator: {msg}");
    std::process::exit(1);
}
