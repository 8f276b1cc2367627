//! Test harness: real coordinators and participants, in-process or as child
//! processes, on 127.0.0.1 port 0 with RocksDB in temporary directories.
//!
//! Nothing here sleeps to wait for a server: in-process servers are bound
//! before they are started, processes announce their address, and
//! [`eventually`] polls a condition with a deadline.

pub mod checker;
pub mod cluster;
pub mod proxy;
pub mod sim;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use twopc_examples::pb;
use twopc_examples::shop::{InventoryService, LedgerService, OrdersService, WalletService};
use twopc_participant::{KvStore, Participant, TxnClient};

/// A coordinator served in-process on a loopback port.
pub struct TestCoordinator {
    /// Its address.
    pub addr: SocketAddr,
    /// Its data directory (kept for restarts).
    pub dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), twopc_coordinator::Error>>>,
}

impl TestCoordinator {
    /// Starts one with a fresh data directory and `tune` applied to its
    /// configuration.
    pub async fn start(tune: impl FnOnce(&mut twopc_coordinator::Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, tune).await
    }

    /// Starts one on an existing data directory (a restart).
    pub async fn start_in(dir: TempDir, tune: impl FnOnce(&mut twopc_coordinator::Config)) -> Self {
        let mut config = twopc_coordinator::Config::for_dir(dir.path());
        tune(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(twopc_coordinator::run(config, listener, async {
            let _ = stopped.await;
        }));
        TestCoordinator { addr, dir, stop: Some(stop), task: Some(task) }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An initiator client.
    pub fn client(&self) -> TxnClient {
        TxnClient::connect_lazy(&self.url()).expect("valid url")
    }

    /// The raw generated client.
    pub fn raw(&self) -> twopc_proto::pb::coordinator_client::CoordinatorClient<Channel> {
        self.client().raw()
    }

    /// Stops it gracefully and returns the data directory.
    pub async fn stop(mut self) -> TempDir {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("coordinator task").expect("coordinator stopped cleanly");
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"))
    }
}

impl Drop for TestCoordinator {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A participant service served in-process: the Participant service, the
/// example wallet/orders/inventory services and the ledger, over one
/// [`KvStore`], behind the transaction layer.
pub struct TestParticipant {
    /// Its name.
    pub name: String,
    /// Its address.
    pub addr: SocketAddr,
    /// Its key-value store.
    pub kv: KvStore,
    /// The participant handle.
    pub participant: Participant,
    /// Its data directory.
    pub dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestParticipant {
    /// Starts participant `name` against `coordinator`, and waits (bounded)
    /// until it is registered.
    pub async fn start(name: &str, coordinator: &str) -> Self {
        Self::start_in(name, coordinator, tempfile::tempdir().expect("tempdir"), Duration::from_millis(200)).await
    }

    /// Starts it on an existing data directory with a given lock wait.
    pub async fn start_in(name: &str, coordinator: &str, dir: TempDir, lock_wait: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let kv = KvStore::new(lock_wait);
        let participant = Participant::builder(name)
            .data_dir(dir.path())
            .coordinator(coordinator)
            .endpoint(format!("http://{addr}"))
            .resource(kv.clone())
            .open()
            .await
            .expect("participant opens");
        let p = participant.clone();
        eventually("participant registered", Duration::from_secs(10), || {
            let p = p.clone();
            async move { p.registered() }
        })
        .await;
        let (stop, stopped) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .layer(participant.layer())
            .add_service(participant.service())
            .add_service(pb::ledger_server::LedgerServer::new(LedgerService { kv: kv.clone(), participant: participant.clone() }))
            .add_service(pb::wallet_server::WalletServer::new(WalletService { kv: kv.clone() }))
            .add_service(pb::orders_server::OrdersServer::new(OrdersService { kv: kv.clone() }))
            .add_service(pb::inventory_server::InventoryServer::new(InventoryService { kv: kv.clone() }));
        let task = tokio::spawn(async move {
            let _ = router
                .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), async {
                    let _ = stopped.await;
                })
                .await;
        });
        TestParticipant { name: name.to_owned(), addr, kv, participant, dir, stop: Some(stop), task: Some(task) }
    }

    /// A channel to this service.
    pub fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr)).expect("valid").connect_lazy()
    }

    /// Reads a committed key as text.
    pub fn get(&self, key: &str) -> Option<String> {
        self.kv.get(key.as_bytes()).expect("kv get").map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// Stops serving and the driver.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.participant.shutdown().await;
    }
}

impl Drop for TestParticipant {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// How long the pollers wait between looks.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Calls `check` every few milliseconds until it gives `Ok`, and returns
/// that; after `within`, the last `Err` it gave (what was seen instead).
/// The one place tests wait for something to happen.
pub async fn poll_for<T, F, Fut>(within: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let give_up = tokio::time::Instant::now() + within;
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(seen) if tokio::time::Instant::now() >= give_up => return Err(seen),
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// [`poll_for`] that fails the test on timeout, naming `what` it waited
/// for and what it saw last.
pub async fn poll<T, F, Fut>(what: &str, within: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    match poll_for(within, check).await {
        Ok(v) => v,
        Err(seen) => panic!("timed out after {within:?} waiting for {what}; last seen: {seen}"),
    }
}

/// Polls `cond` until it holds, failing the test after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll(what, within, || {
        let holds = cond();
        async move { if holds.await { Ok(()) } else { Err("not yet".to_owned()) } }
    })
    .await
}

/// A coordinator and participants named `names`, all in-process.
pub async fn cluster(names: &[&str]) -> (TestCoordinator, Vec<TestParticipant>) {
    let c = TestCoordinator::start(|_| {}).await;
    let mut ps = Vec::new();
    for n in names {
        ps.push(TestParticipant::start(n, &c.url()).await);
    }
    (c, ps)
}

/// Waits until no participant holds a lock (phase two settled).
pub async fn settled(ps: &[TestParticipant]) {
    for p in ps {
        let kv = p.kv.clone();
        eventually(&format!("{} releases every lock", p.name), Duration::from_secs(10), move || {
            let kv = kv.clone();
            async move { kv.locked_keys() == 0 }
        })
        .await;
    }
}

/// What a finished process printed, and its exit code (-1 when killed by a
/// signal).
pub struct Ran {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs the built binary `name` with `args` to its end; with `env`, in
/// exactly that environment.
pub async fn run_binary(name: &str, args: &[&str], env: Option<&[(&str, &str)]>) -> Ran {
    let mut cmd = tokio::process::Command::new(twopc_examples::procs::binary(name).expect("the binaries are built"));
    cmd.args(args);
    if let Some(env) = env {
        cmd.env_clear().envs(env.iter().copied());
    }
    let out = cmd.output().await.unwrap_or_else(|e| panic!("{name} runs: {e}"));
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The `twopc` CLI against the coordinator at `coordinator`.
pub async fn twopc_cli(coordinator: &str, args: &[&str]) -> Ran {
    let mut all = vec!["--coordinator", coordinator];
    all.extend_from_slice(args);
    run_binary("twopc", &all, None).await
}

/// The example shop services `roles` as processes (each its own RocksDB
/// under `dir`), joined to the coordinator at `coordinator`.
pub async fn shop_services(dir: &std::path::Path, coordinator: &str, roles: &[&str]) -> Vec<twopc_examples::procs::Proc> {
    let bin = twopc_examples::procs::binary("shop-service").expect("the binaries are built");
    let mut ps = Vec::new();
    for role in roles {
        let args: Vec<String> = vec![
            "--role".into(),
            (*role).into(),
            "--data-dir".into(),
            dir.join(role).display().to_string(),
            "--coordinator".into(),
            coordinator.into(),
        ];
        let log = dir.join(format!("{role}.log"));
        ps.push(twopc_examples::procs::Proc::start(role, &bin, &args, &log, Duration::from_secs(60)).await.expect("the service starts"));
    }
    ps
}
