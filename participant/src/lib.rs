//! The library a service links in to take part in atomic multi-service
//! transactions coordinated by `twopc-coordinator`.
//!
//! A service builds one [`Participant`] with its name, its own data
//! directory, the coordinator's address, the endpoint at which the
//! coordinator reaches it, and a [`Resource`] (the ready [`KvStore`], or its
//! own implementation). It then mounts [`Participant::service`] (the
//! `twopc.v1.Participant` service the coordinator calls) next to its own
//! services, behind [`Participant::layer`], which joins the transaction a
//! request carries before the handler runs and hands the handler a
//! [`TxnScope`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use twopc_participant::{KvStore, Participant};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let kv = KvStore::default();
//! let participant = Participant::builder("wallet")
//!     .data_dir("./data/wallet")
//!     .coordinator("http://127.0.0.1:50051")
//!     .endpoint(format!("http://{}", listener.local_addr()?))
//!     .resource(kv.clone())
//!     .open()
//!     .await?;
//! tonic::transport::Server::builder()
//!     .layer(participant.layer())
//!     .add_service(participant.service())
//!     // .add_service(WalletServer::new(MyWallet { kv }))
//!     .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)))
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Initiators use [`TxnClient`]: `begin` → call services through clients
//! built with [`Transaction::interceptor`] → `commit`; or `execute`.
//!
//! Module map: [`core`] is the IO-free participant state machine; [`driver`]
//! carries out its effects; [`service`] and [`context`] are the gRPC edges;
//! [`resource`] defines what a participant commits and [`kv`] implements it
//! on RocksDB; [`client`] is the initiator API.

pub mod client;
pub mod context;
pub mod core;
#[cfg(test)]
mod core_tests;
pub mod driver;
pub mod kv;
pub mod resource;
pub mod service;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Endpoint;
use twopc_proto::logpb::BranchState;
use twopc_proto::pb::coordinator_client::CoordinatorClient;
use twopc_proto::pb::participant_server::ParticipantServer;
use twopc_proto::{ParticipantName, TxnId, UnixMillis, pb};
use twopc_storage::{LogStore, RocksStore};

pub use crate::client::{ClientError, Finished, Transaction, TxnClient};
pub use crate::context::{TxnInterceptor, TxnLayer, TxnScope};
pub use crate::kv::{KvError, KvStore, KvTxn};
pub use crate::resource::{Resource, ResourceError};
pub use crate::service::ParticipantService;
pub use tonic::async_trait;
pub use twopc_proto::{AbortCode, AbortReason, Outcome};

/// Why a participant could not open.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A builder setting is missing or invalid.
    #[error("invalid participant configuration: {0}")]
    Config(String),
    /// The participant's store could not be opened or read.
    #[error("participant store: {0}")]
    Storage(String),
    /// The resource refused to attach or recover.
    #[error("resource: {0}")]
    Resource(String),
}

/// Builds a [`Participant`]. Every setting but the retention is required.
pub struct ParticipantBuilder {
    name: String,
    data_dir: Option<PathBuf>,
    coordinator: Option<String>,
    endpoint: Option<String>,
    resource: Option<Arc<dyn Resource>>,
    config: core::CoreConfig,
    rpc_timeout: Duration,
}

impl ParticipantBuilder {
    /// The directory of this participant's RocksDB (branch log and resource
    /// data). Created if missing; must not be shared with another process.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// The coordinator's gRPC endpoint, `http://host:port`.
    pub fn coordinator(mut self, endpoint: impl Into<String>) -> Self {
        self.coordinator = Some(endpoint.into());
        self
    }

    /// Where the coordinator reaches this service's Participant service,
    /// `http://host:port`.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// What this participant commits.
    pub fn resource(mut self, resource: impl Resource) -> Self {
        self.resource = Some(Arc::new(resource));
        self
    }

    /// How long finished branches and abort tombstones are remembered;
    /// keep it above the coordinator's maximum transaction timeout.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.config.retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Opens the store, recovers prepared branches (re-taking their locks
    /// before anything is served), starts the driver, and registers with
    /// the coordinator (retried in the background until it succeeds).
    pub async fn open(self) -> Result<Participant, Error> {
        let name = ParticipantName::new(self.name).map_err(|e| Error::Config(e.to_string()))?;
        let data_dir = self.data_dir.ok_or_else(|| Error::Config("data_dir is required".into()))?;
        let coordinator = self.coordinator.ok_or_else(|| Error::Config("coordinator is required".into()))?;
        let endpoint = self.endpoint.ok_or_else(|| Error::Config("endpoint is required".into()))?;
        let resource = self.resource.ok_or_else(|| Error::Config("resource is required".into()))?;
        twopc_proto::validate_endpoint(&coordinator).map_err(|e| Error::Config(format!("coordinator: {e}")))?;
        twopc_proto::validate_endpoint(&endpoint).map_err(|e| Error::Config(format!("endpoint: {e}")))?;

        let mut cfs = vec![driver::CF_BRANCHES];
        cfs.extend(resource.column_families());
        let store: Arc<dyn LogStore> = Arc::new(RocksStore::open(&data_dir, &cfs).map_err(|e| Error::Storage(e.to_string()))?);
        resource.attach(store.clone()).map_err(|e| Error::Resource(e.0))?;

        let records = driver::load_branches(store.as_ref()).map_err(Error::Storage)?;
        let prepared: Vec<TxnId> = records.iter().filter(|(_, r)| r.state == BranchState::Prepared as i32).map(|(t, _)| *t).collect();
        resource.recover(&prepared).await.map_err(|e| Error::Resource(e.0))?;
        let mut core = core::Core::new(self.config);
        let recovery = core.recover(UnixMillis::now(), records);
        if !prepared.is_empty() {
            tracing::info!(participant = %name, in_doubt = prepared.len(), "recovered prepared transactions; asking the coordinator");
        }

        let channel = Endpoint::from_shared(coordinator.clone())
            .map_err(|e| Error::Config(format!("coordinator: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        let client = CoordinatorClient::new(channel);
        let in_flight = context::InFlight::default();
        let handle = driver::spawn(
            core,
            recovery,
            driver::Parts {
                name: name.clone(),
                endpoint: endpoint.clone(),
                coordinator: client.clone(),
                store: store.clone(),
                resource,
                rpc_timeout: self.rpc_timeout,
                incarnation: incarnation(),
                in_flight: in_flight.clone(),
            },
        );
        let registration = tokio::spawn(register(client, name.clone(), endpoint));
        Ok(Participant { name, handle, store, in_flight, registration: Arc::new(registration) })
    }
}

/// A number that differs between two starts of a participant process (the
/// coordinator uses it to notice a restart that lost unprepared work).
fn incarnation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(UnixMillis::now().0);
    h.write_u32(std::process::id());
    h.finish().max(1)
}

async fn register(mut client: CoordinatorClient<Channel>, name: ParticipantName, endpoint: String) {
    let mut delay = Duration::from_millis(50);
    loop {
        let req = pb::RegisterParticipantRequest { participant: name.as_str().to_owned(), endpoint: endpoint.clone() };
        match client.register_participant(req).await {
            Ok(_) => return,
            Err(s) => tracing::warn!(participant = %name, error = %s.message(), "cannot register with the coordinator yet; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

use tonic::transport::Channel;

/// A running participant. Cheap to clone.
#[derive(Clone)]
pub struct Participant {
    name: ParticipantName,
    handle: driver::Handle,
    store: Arc<dyn LogStore>,
    in_flight: context::InFlight,
    registration: Arc<tokio::task::JoinHandle<()>>,
}

impl Participant {
    /// Starts building a participant called `name` (1 to 64 characters of
    /// `[A-Za-z0-9._-]`, unique among the coordinator's participants).
    pub fn builder(name: impl Into<String>) -> ParticipantBuilder {
        ParticipantBuilder {
            name: name.into(),
            data_dir: None,
            coordinator: None,
            endpoint: None,
            resource: None,
            config: core::CoreConfig::default(),
            rpc_timeout: Duration::from_secs(5),
        }
    }

    /// This participant's name.
    pub fn name(&self) -> &ParticipantName {
        &self.name
    }

    /// The `twopc.v1.Participant` service to mount on the service's server.
    pub fn service(&self) -> ParticipantServer<ParticipantService> {
        ParticipantServer::new(ParticipantService::new(self.handle.clone(), self.name.clone()))
    }

    /// The server layer that joins transactions carried in request metadata.
    pub fn layer(&self) -> TxnLayer {
        TxnLayer::new(self.handle.clone(), self.in_flight.clone(), self.name.clone())
    }

    /// True once the coordinator acknowledged this participant's
    /// registration (needed before Execute can name it).
    pub fn registered(&self) -> bool {
        self.registration.is_finished()
    }

    /// Transactions this participant holds durably prepared and waiting for
    /// their outcome, read from its log (the durable truth, also across a
    /// restart).
    pub fn in_doubt(&self) -> Result<Vec<TxnId>, Error> {
        Ok(driver::load_branches(self.store.as_ref())
            .map_err(Error::Storage)?
            .into_iter()
            .filter(|(_, r)| r.state == BranchState::Prepared as i32)
            .map(|(t, _)| t)
            .collect())
    }

    /// The participant's store (branch log and resource data), for writes
    /// outside transactions — a baseline in a benchmark, say. Writes made
    /// here bypass locking and the protocol.
    pub fn store(&self) -> Arc<dyn LogStore> {
        self.store.clone()
    }

    /// Business calls under `txn` running in this service right now.
    pub fn calls_running(&self, txn: TxnId) -> usize {
        self.in_flight.running(txn)
    }

    /// Counters of the participant's log writer.
    pub fn log_stats(&self) -> twopc_storage::WriterStats {
        self.store.stats()
    }

    /// Stops the driver and background registration. The store closes once
    /// the last clone of this participant (and of its resource) is dropped.
    pub async fn shutdown(&self) {
        self.registration.abort();
        self.handle.stop().await;
    }
}

/// Compiles the code blocks of the README as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
