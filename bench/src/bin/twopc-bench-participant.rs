//! A participant process for the benchmark: the participant library with
//! the key-value resource or a no-op resource (to isolate the protocol's
//! own cost), plus the `bench.v1.Direct` service for the baseline and the
//! floor. Prints "listening on ADDR" once registered and serving.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tonic::{Request, Response, Status};
use twopc_participant::{KvStore, Participant, Resource, ResourceError};
use twopc_proto::{TxnId, Vote};
use twopc_storage::{Batch, Durability, LogStore};

/// mimalloc: the profile showed a sixth of each process's CPU in the
/// system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Generated code of `proto/bench.proto`.
#[allow(missing_docs, clippy::all)]
mod pb {
    tonic::include_proto!("bench.v1");
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ResourceKind {
    /// The transactional key-value store.
    Kv,
    /// Votes YES and applies nothing: only the protocol's own records.
    Noop,
}

/// A participant for the twopc benchmark.
#[derive(Debug, Parser)]
#[command(name = "twopc-bench-participant")]
struct Args {
    /// Participant name.
    #[arg(long)]
    name: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Data directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// The coordinator's endpoint.
    #[arg(long)]
    coordinator: String,
    /// What the participant commits.
    #[arg(long, value_enum, default_value_t = ResourceKind::Kv)]
    resource: ResourceKind,
}

/// The no-op resource: a branch with nothing to stage still gets its
/// PREPARED and COMMITTED records, so only the protocol is measured.
struct Noop;

#[twopc_participant::async_trait]
impl Resource for Noop {
    fn column_families(&self) -> Vec<twopc_storage::Cf> {
        // Only for the direct-write baseline.
        vec!["kv_data"]
    }

    async fn recover(&self, _prepared: &[TxnId]) -> Result<(), ResourceError> {
        Ok(())
    }

    async fn prepare(&self, _txn: TxnId, _payload: Option<&[u8]>, _batch: &mut Batch) -> Result<Vote, ResourceError> {
        Ok(Vote::Yes)
    }

    async fn commit(&self, _txn: TxnId, _batch: &mut Batch) -> Result<(), ResourceError> {
        Ok(())
    }

    async fn abort(&self, _txn: TxnId, _batch: &mut Batch) -> Result<(), ResourceError> {
        Ok(())
    }

    fn finished(&self, _txn: TxnId, _committed: bool) {}
}

struct Direct {
    store: Arc<dyn LogStore>,
}

#[tonic::async_trait]
impl pb::direct_server::Direct for Direct {
    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let r = request.into_inner();
        let mut b = Batch::new();
        for k in &r.keys {
            b.put("kv_data", k.as_bytes().to_vec(), r.value.as_bytes().to_vec());
        }
        twopc_storage::wait(self.store.submit(b, Durability::Synced)).await.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::PutResponse {}))
    }

    async fn ping(&self, _request: Request<pb::PingRequest>) -> Result<Response<pb::PingResponse>, Status> {
        Ok(Response::new(pb::PingResponse {}))
    }

    async fn stats(&self, _request: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        let s = self.store.stats();
        Ok(Response::new(pb::StatsResponse { requests: s.requests, writes: s.writes, synced_writes: s.synced_writes }))
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("twopc-bench-participant: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _telemetry = twopc_telemetry::init(&twopc_telemetry::Config {
        service_name: args.name.clone(),
        log_filter: std::env::var("TWOPC_LOG").unwrap_or_else(|_| "warn".into()),
        log_format: twopc_telemetry::LogFormat::Text,
        otlp_endpoint: None,
    })?;
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let builder =
        Participant::builder(&args.name).data_dir(&args.data_dir).coordinator(&args.coordinator).endpoint(format!("http://{addr}"));
    let participant = match args.resource {
        ResourceKind::Kv => builder.resource(KvStore::new(Duration::from_millis(200))).open().await?,
        ResourceKind::Noop => builder.resource(Noop).open().await?,
    };
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while !participant.registered() {
        anyhow::ensure!(tokio::time::Instant::now() < until, "could not register with {}", args.coordinator);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let router = tonic::transport::Server::builder()
        .layer(participant.layer())
        .add_service(participant.service())
        .add_service(pb::direct_server::DirectServer::new(Direct { store: participant.store() }));
    println!("listening on {addr}");
    std::io::stdout().flush()?;
    router
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
