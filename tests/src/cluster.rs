//! A cluster of real processes for fault tests: one `twopc-coordinator` and
//! N participant services (`shop-service` with a key-value resource), each
//! with its own RocksDB in one temporary directory, on loopback.
//!
//! Every node keeps the port it got at its first start, so a node killed
//! (SIGKILL, or a crash point) and restarted from the same data directory is
//! found where its peers expect it. Crash points are armed per start through
//! the `FAILPOINTS` environment variable. Optional proxies (see
//! [`crate::proxy`]) sit in front of the coordinator and each participant
//! so that links can be cut and delayed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};
use twopc_examples::pb;
use twopc_examples::procs::{Proc, binary};
use twopc_participant::TxnClient;

use crate::proxy::Proxy;

/// How long a process may take to start listening.
const START_WITHIN: Duration = Duration::from_secs(60);

/// One process of the cluster.
pub struct Node {
    /// Its name (participant name, or "coordinator").
    pub name: String,
    /// Its fixed address.
    pub addr: SocketAddr,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Node {
    async fn launch(
        name: &str,
        bin: PathBuf,
        args: Vec<String>,
        log: PathBuf,
        listen: SocketAddr,
        failpoints: Option<&str>,
    ) -> anyhow::Result<Node> {
        let mut node = Node { name: name.to_owned(), addr: listen, bin, args, log, proc: None };
        node.start(failpoints).await?;
        Ok(node)
    }

    /// Starts the process (again), on its fixed address, with crash points
    /// armed by `failpoints` (a `FAILPOINTS` value) if given.
    pub async fn start(&mut self, failpoints: Option<&str>) -> anyhow::Result<()> {
        if self.proc.as_mut().is_some_and(|p| p.exited().is_none()) {
            bail!("{} is already running", self.name);
        }
        let mut args = self.args.clone();
        args.push("--listen".into());
        args.push(self.addr.to_string());
        let env: Vec<(String, String)> = failpoints.map(|f| vec![("FAILPOINTS".to_owned(), f.to_owned())]).unwrap_or_default();
        // The port may linger for a moment after a kill: start again until
        // it is free (any other failure ends the wait at once).
        let this = &*self;
        let started = crate::poll_for(Duration::from_secs(10), || async {
            match Proc::start_with_env(&this.name, &this.bin, &args, &env, &this.log, START_WITHIN).await {
                Ok(p) => Ok(Ok(p)),
                Err(e) if this.log_tail().contains("cannot listen") => Err(format!("port not free yet: {e}")),
                Err(e) => Ok(Err(e)),
            }
        })
        .await
        .map_err(anyhow::Error::msg)??;
        self.addr = started.addr;
        self.proc = Some(started);
        Ok(())
    }

    /// Starts the process with the crash points `failpoints` armed and waits
    /// up to `within` for it to exit on its own, without waiting for it to
    /// listen: a crash during recovery comes before it announces itself.
    /// True if it exited.
    pub async fn run_until_exit(&mut self, failpoints: &str, within: Duration) -> anyhow::Result<bool> {
        anyhow::ensure!(!self.running(), "{} is already running", self.name);
        self.proc = None;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut child = tokio::process::Command::new(&self.bin)
            .args(&self.args)
            .args(["--listen".to_owned(), self.addr.to_string()])
            .env("FAILPOINTS", failpoints)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        Ok(tokio::time::timeout(within, child.wait()).await.is_ok())
    }

    /// Makes the process advertise `url` as its endpoint from its next
    /// start on (a participant that moved).
    pub fn set_advertise(&mut self, url: &str) {
        match self.args.iter().position(|a| a == "--advertise") {
            Some(i) if i + 1 < self.args.len() => self.args[i + 1] = url.to_owned(),
            _ => self.args.extend(["--advertise".to_owned(), url.to_owned()]),
        }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills it at once (SIGKILL).
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(p) = self.proc.as_mut()
            && p.exited().is_none()
        {
            p.kill().await?;
        }
        Ok(())
    }

    /// Stops it gracefully (SIGTERM), killing it after 10 s.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(p) = self.proc.as_mut()
            && p.exited().is_none()
        {
            p.terminate(Duration::from_secs(10)).await?;
        }
        Ok(())
    }

    /// Sends SIGTERM without waiting (the process drains and exits).
    pub async fn signal_term(&mut self) -> anyhow::Result<()> {
        let pid = self.proc.as_ref().and_then(Proc::pid).context("not running")?;
        let status = tokio::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        Ok(())
    }

    /// The exit status once the process has exited, waiting up to `within`.
    pub async fn exit_status(&mut self, within: Duration) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match self.proc.as_mut() {
            Some(p) => p.wait_exit(within).await,
            None => Ok(None),
        }
    }

    /// Waits up to `within` for the process to exit on its own (a crash
    /// point). True if it did.
    pub async fn wait_exit(&mut self, within: Duration) -> anyhow::Result<bool> {
        match self.proc.as_mut() {
            Some(p) => Ok(p.wait_exit(within).await?.is_some()),
            None => Ok(true),
        }
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.exited().is_none())
    }

    /// The end of its log file (stderr of every start).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(64 * 1024);
        text.get(start..).unwrap_or(&text).to_owned()
    }

    /// True if a crash point named `point` fired in this node's life.
    pub fn crashed_at(&self, point: &str) -> bool {
        std::fs::read_to_string(&self.log).unwrap_or_default().contains(&format!("crash point {point} reached"))
    }
}

/// What a participant's ledger shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Committed keys and values.
    pub entries: BTreeMap<String, String>,
    /// Keys locked right now.
    pub locked_keys: u64,
    /// Durably prepared transactions waiting for an outcome.
    pub in_doubt: u64,
}

/// Options of [`ProcCluster::start`].
#[derive(Default, Clone)]
pub struct ClusterOptions {
    /// Put a proxy in front of the coordinator and of each participant;
    /// every peer (and the client) talks through them.
    pub proxies: bool,
    /// Extra coordinator flags.
    pub coordinator_args: Vec<String>,
}

/// A coordinator and participants as real processes.
pub struct ProcCluster {
    /// The coordinator.
    pub coordinator: Node,
    /// The participants, in the order of the names given.
    pub participants: Vec<Node>,
    /// Proxy in front of the coordinator (when enabled).
    pub coordinator_proxy: Option<Proxy>,
    /// Proxies in front of each participant (when enabled).
    pub participant_proxies: Vec<Proxy>,
    dir: TempDir,
}

async fn reserve_port() -> anyhow::Result<SocketAddr> {
    // Bind port 0 and release it: the node then binds that port itself and
    // keeps it for every restart.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(l.local_addr()?)
}

impl ProcCluster {
    /// Starts the coordinator and participants `names`.
    pub async fn start(names: &[&str], options: ClusterOptions) -> anyhow::Result<ProcCluster> {
        let dir = tempfile::tempdir()?;
        let coordinator_bin = binary("twopc-coordinator")?;
        let service_bin = binary("shop-service")?;
        let caddr = reserve_port().await?;
        let mut cargs = vec!["--data-dir".into(), dir.path().join("coordinator").display().to_string()];
        // Any free admin port: several clusters may run at once.
        cargs.extend(["--admin-listen".into(), "127.0.0.1:0".into()]);
        // Short retry cap: a node that comes back is found quickly.
        cargs.extend(["--prepare-timeout".into(), "3s".into()]);
        cargs.extend(options.coordinator_args.iter().cloned());
        let coordinator = Node::launch("coordinator", coordinator_bin, cargs, dir.path().join("coordinator.log"), caddr, None).await?;
        let coordinator_proxy = if options.proxies { Some(Proxy::start(coordinator.addr).await?) } else { None };
        let coordinator_url = coordinator_proxy.as_ref().map(|p| p.url()).unwrap_or_else(|| coordinator.url());
        let mut participants = Vec::new();
        let mut participant_proxies = Vec::new();
        for name in names {
            let addr = reserve_port().await?;
            let mut args = vec![
                "--role".into(),
                "wallet".into(),
                "--name".into(),
                (*name).into(),
                "--data-dir".into(),
                dir.path().join(name).display().to_string(),
                "--coordinator".into(),
                coordinator_url.clone(),
                "--lock-wait".into(),
                "100ms".into(),
            ];
            if options.proxies {
                let proxy = Proxy::start(addr).await?;
                args.extend(["--advertise".into(), proxy.url()]);
                participant_proxies.push(proxy);
            }
            let log = dir.path().join(format!("{name}.log"));
            participants.push(Node::launch(name, service_bin.clone(), args, log, addr, None).await?);
        }
        Ok(ProcCluster { coordinator, participants, coordinator_proxy, participant_proxies, dir })
    }

    /// Where the cluster keeps data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An initiator client (through the coordinator's proxy if any).
    pub fn client(&self) -> anyhow::Result<TxnClient> {
        let url = self.coordinator_proxy.as_ref().map(|p| p.url()).unwrap_or_else(|| self.coordinator.url());
        TxnClient::connect_lazy(&url).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// A participant by name.
    pub fn participant(&mut self, name: &str) -> anyhow::Result<&mut Node> {
        self.participants.iter_mut().find(|n| n.name == name).with_context(|| format!("no participant {name}"))
    }

    fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
        Ok(Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(Duration::from_secs(1)).connect_lazy())
    }

    /// Reads participant `i`'s ledger directly (not through a proxy).
    pub async fn snapshot(&self, i: usize) -> anyhow::Result<Snapshot> {
        let node = self.participants.get(i).context("no such participant")?;
        let mut c = pb::ledger_client::LedgerClient::new(Self::channel(node.addr)?);
        let mut req = tonic::Request::new(pb::SnapshotRequest {});
        req.set_timeout(Duration::from_secs(2));
        let r = c.snapshot(req).await?.into_inner();
        Ok(Snapshot {
            entries: r.entries.into_iter().map(|e| (e.key, e.value)).collect(),
            locked_keys: r.locked_keys,
            in_doubt: r.in_doubt,
        })
    }

    /// The coordinator's count of in-doubt transactions.
    pub async fn coordinator_in_doubt(&self) -> anyhow::Result<u64> {
        let mut admin = twopc_proto::pb::admin_client::AdminClient::new(Self::channel(self.coordinator.addr)?);
        let mut req = tonic::Request::new(twopc_proto::pb::ListTransactionsRequest { in_doubt_only: true, limit: 1, ..Default::default() });
        req.set_timeout(Duration::from_secs(2));
        Ok(admin.list_transactions(req).await?.into_inner().in_doubt)
    }

    /// Polls until no participant holds a lock or an in-doubt transaction
    /// and the coordinator has nothing in doubt; returns how long that took
    /// and the final snapshots. Fails after `within`.
    pub async fn quiesce(&self, within: Duration) -> anyhow::Result<(Duration, Vec<Snapshot>)> {
        let start = Instant::now();
        let snaps =
            crate::poll_for(within, || self.quiet()).await.map_err(|last| anyhow::anyhow!("not quiescent after {within:?}: {last}"))?;
        Ok((start.elapsed(), snaps))
    }

    /// Every participant's snapshot when nothing is held or in doubt
    /// anywhere; else what still is.
    async fn quiet(&self) -> Result<Vec<Snapshot>, String> {
        let mut snaps = Vec::new();
        for (i, node) in self.participants.iter().enumerate() {
            let s = self.snapshot(i).await.map_err(|e| format!("{} unreachable: {e}", node.name))?;
            if s.locked_keys + s.in_doubt > 0 {
                return Err(format!("{} holds {} locks and {} in-doubt transactions", node.name, s.locked_keys, s.in_doubt));
            }
            snaps.push(s);
        }
        match self.coordinator_in_doubt().await {
            Ok(0) => Ok(snaps),
            Ok(n) => Err(format!("coordinator holds {n} in-doubt transactions")),
            Err(e) => Err(format!("coordinator unreachable: {e}")),
        }
    }

    /// Stops every node gracefully.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for p in self.participants.iter_mut() {
            p.stop().await?;
        }
        self.coordinator.stop().await
    }
}
