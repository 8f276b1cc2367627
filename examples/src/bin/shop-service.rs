//! One example service of the demo (wallet, orders or inventory): a tonic
//! server with the role's business service, the read-only ledger, and the
//! participant library's Participant service, all behind the participant's
//! transaction layer. Prints "listening on ADDR" once registered with the
//! coordinator and serving; stops on SIGTERM or SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use twopc_examples::pb;
use twopc_examples::shop::{InventoryService, LedgerService, OrdersService, Role, WalletService};
use twopc_participant::{KvStore, Participant};

/// mimalloc: the profile showed a sixth of each process's CPU in the
/// system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An example service of the twopc demo.
#[derive(Debug, Parser)]
#[command(name = "shop-service")]
struct Args {
    /// Which service to run.
    #[arg(long, value_enum)]
    role: Role,
    /// Address to listen on; port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// This service's own RocksDB directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// The coordinator's endpoint.
    #[arg(long, env = "TWOPC_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    coordinator: String,
    /// Participant name to register under; the role's name by default.
    #[arg(long)]
    name: Option<String>,
    /// Endpoint the coordinator should call (for example a proxy in front
    /// of this service); `http://<bound address>` by default.
    #[arg(long)]
    advertise: Option<String>,
    /// Longest a transaction waits for a key another one holds.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    lock_wait: Duration,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("shop-service: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    twopc_storage::crash::arm_from_env().map_err(anyhow::Error::msg)?;
    let name = args.name.clone().unwrap_or_else(|| args.role.name().to_owned());
    // Logs as JSON lines on stderr; spans exported over OTLP when
    // OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let _telemetry = twopc_telemetry::init(&twopc_telemetry::Config {
        service_name: name.clone(),
        log_filter: std::env::var("TWOPC_LOG").unwrap_or_else(|_| "info".into()),
        log_format: twopc_telemetry::LogFormat::Json,
        otlp_endpoint: None,
    })?;
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let kv = KvStore::new(args.lock_wait);
    let endpoint = args.advertise.clone().unwrap_or_else(|| format!("http://{addr}"));
    let participant = Participant::builder(name)
        .data_dir(&args.data_dir)
        .coordinator(&args.coordinator)
        .endpoint(endpoint)
        .resource(kv.clone())
        .open()
        .await?;
    // Execute can only name registered participants: give registration a
    // moment, but serve anyway if the coordinator is down (prepared
    // transactions recovered from the log must keep their locks and ask for
    // their outcome; registration goes on in the background).
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while !participant.registered() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if !participant.registered() {
        tracing::warn!(coordinator = %args.coordinator, "not registered with the coordinator yet; serving anyway and retrying");
    }
    let mut router = tonic::transport::Server::builder()
        .layer(participant.layer())
        .add_service(participant.service())
        .add_service(pb::ledger_server::LedgerServer::new(LedgerService { kv: kv.clone(), participant: participant.clone() }));
    router = match args.role {
        Role::Wallet => router.add_service(pb::wallet_server::WalletServer::new(WalletService { kv })),
        Role::Orders => router.add_service(pb::orders_server::OrdersServer::new(OrdersService { kv })),
        Role::Inventory => router.add_service(pb::inventory_server::InventoryServer::new(InventoryService { kv })),
    };
    println!("listening on {addr}");
    std::io::stdout().flush()?;
    router.serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown()).await?;
    participant.shutdown().await;
    Ok(())
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
