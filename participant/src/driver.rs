//! The participant's driver: one tokio task owns the [`Core`] and performs
//! its effects against the resource, the branch log and the coordinator.
//!
//! The branch log is a column family (`branches`: transaction id →
//! `BranchRecord`) in the same RocksDB as the resource's data, so that the
//! resource's staged writes and the PREPARED record, and the resource's
//! applied writes and the COMMITTED record, each land in one atomic batch.
//!
//! Metrics: the driver records the participant's own metrics through the
//! `metrics` facade, labelled with the participant's name, so whatever
//! exporter the service installs picks them up (nothing is recorded when it
//! installs none): [`METRIC_PREPARES`], [`METRIC_APPLIED`],
//! [`METRIC_IN_DOUBT`] (refreshed every [`GAUGE_INTERVAL`]) and
//! [`METRIC_QUERY_RETRIES`]. The log writer adds `twopc_log_sync_seconds`
//! and `twopc_log_batch_requests` (see `twopc_storage`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tracing::{Instrument, debug, warn};
use twopc_proto::logpb::BranchRecord;
use twopc_proto::pb::coordinator_client::CoordinatorClient;
use twopc_proto::{Decision, ParticipantName, TxnId, UnixMillis, pb};
use twopc_storage::{Batch, Durability, LogStore, wait};

use crate::core::{Core, Effect, EnlistError, Input, Reply, ReqId, SentVote};
use crate::resource::Resource;

/// Column family of the branch log.
pub const CF_BRANCHES: &str = "branches";

/// Counter of Prepare requests answered, by `vote` (`yes`, `no`,
/// `read_only`) and `participant`. Duplicates of a Prepare are answered (and
/// counted) again.
pub const METRIC_PREPARES: &str = "twopc_participant_prepares_total";
/// Counter of outcomes applied to the resource and recorded, by `outcome`
/// (`commit`, `abort`) and `participant`. Read-only releases are not counted.
pub const METRIC_APPLIED: &str = "twopc_participant_outcomes_applied_total";
/// Gauge of branches durably prepared and waiting for the outcome, by
/// `participant`. They hold their locks until the outcome arrives.
pub const METRIC_IN_DOUBT: &str = "twopc_participant_in_doubt";
/// Counter of QueryDecision answers that left a prepared branch in doubt, so
/// that it asks again after a backoff, by `reason` (`pending`: the
/// coordinator has not decided yet; `unreachable`: it could not be asked)
/// and `participant`.
pub const METRIC_QUERY_RETRIES: &str = "twopc_participant_decision_query_retries_total";
/// How often the driver refreshes [`METRIC_IN_DOUBT`].
pub const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

enum Msg {
    Call { req: ReqId, input: Input, reply: oneshot::Sender<Reply>, span: tracing::Span },
    Internal(Input),
    Voted { txn: TxnId, vote: Result<twopc_proto::Vote, String>, batch: Batch },
    Stop(oneshot::Sender<()>),
}

/// The driver stopped.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the participant is shutting down")]
pub struct Stopped;

/// A cloneable way to talk to the driver.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Msg>,
    next_req: Arc<AtomicU64>,
}

impl Handle {
    /// Sends the input that `make` builds and waits for the reply.
    pub async fn call(&self, make: impl FnOnce(ReqId) -> Input) -> Result<Reply, Stopped> {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Call { req, input: make(req), reply, span: tracing::Span::current() }).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Stops the driver; the store closes once every handle to it is gone.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Everything the driver needs besides the core.
pub struct Parts {
    /// This participant's name.
    pub name: ParticipantName,
    /// Where the coordinator reaches this participant.
    pub endpoint: String,
    /// The coordinator.
    pub coordinator: CoordinatorClient<Channel>,
    /// The store shared by the branch log and the resource.
    pub store: Arc<dyn LogStore>,
    /// The resource.
    pub resource: Arc<dyn Resource>,
    /// Timeout of calls to the coordinator.
    pub rpc_timeout: Duration,
    /// This process's incarnation, sent with Enlist (random at each start).
    pub incarnation: u64,
    /// Business calls running now, per transaction (from the layer).
    pub in_flight: crate::context::InFlight,
}

/// Reads the branch log.
pub fn load_branches(store: &dyn LogStore) -> Result<Vec<(TxnId, BranchRecord)>, String> {
    store
        .scan_prefix(CF_BRANCHES, b"")
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(k, v)| {
            let txn = TxnId::from_key(&k).ok_or_else(|| format!("corrupt branch log key of {} bytes", k.len()))?;
            let r = BranchRecord::decode(v.as_slice()).map_err(|e| format!("corrupt branch record for {txn}: {e}"))?;
            Ok((txn, r))
        })
        .collect()
}

/// Starts the driver, performing `recovery` effects first.
pub fn spawn(core: Core, recovery: Vec<Effect>, parts: Parts) -> Handle {
    let (tx, rx) = mpsc::channel(16_384);
    let handle = Handle { tx: tx.clone(), next_req: Arc::new(AtomicU64::new(1)) };
    let driver = Driver {
        core,
        parts: Arc::new(parts),
        tx,
        pending: HashMap::new(),
        staged: HashMap::new(),
        timers: Default::default(),
        caller: tracing::Span::none(),
        ready: Default::default(),
    };
    tokio::spawn(driver.run(rx, recovery));
    handle
}

struct Driver {
    core: Core,
    parts: Arc<Parts>,
    tx: mpsc::Sender<Msg>,
    pending: HashMap<ReqId, oneshot::Sender<Reply>>,
    /// What each resource prepare staged, until the PREPARED record is
    /// written with it.
    staged: HashMap<TxnId, Batch>,
    /// Every timer the core set, with one sleep for the earliest.
    timers: twopc_storage::timers::TimerQueue<crate::core::Timer>,
    /// The span of the caller whose input is being stepped (none for
    /// internal inputs): the parent of the Enlist call a Join makes.
    caller: tracing::Span,
    /// Messages produced inline while performing effects (a resource
    /// prepare that finished without waiting), handled before any other.
    ready: std::collections::VecDeque<Msg>,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, recovery: Vec<Effect>) {
        for e in recovery {
            self.perform(e);
        }
        let mut gauges = tokio::time::interval(GAUGE_INTERVAL);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            // The gauge tick first: it is ready once a second, so it never
            // starves the inputs, and a steady stream of inputs cannot starve
            // it.
            // Results produced inline by the last step come first.
            if let Some(msg) = self.ready.pop_front() {
                if let Err(done) = self.dispatch(msg) {
                    drop(self);
                    let _ = done.send(());
                    return;
                }
                continue;
            }
            let next_timer = self.timers.next_at();
            let msg = tokio::select! {
                biased;
                _ = gauges.tick() => {
                    self.refresh_gauges();
                    continue;
                }
                _ = twopc_storage::timers::sleep_until(next_timer) => {
                    for timer in self.timers.pop_due() {
                        for e in self.core.step(UnixMillis::now(), Input::Timer(timer)) {
                            self.perform(e);
                        }
                    }
                    continue;
                }
                msg = rx.recv() => match msg {
                    Some(msg) => msg,
                    None => return,
                },
            };
            if let Err(done) = self.dispatch(msg) {
                drop(self);
                let _ = done.send(());
                return;
            }
        }
    }

    /// Steps the core with one message's input and performs its effects;
    /// `Err` with the caller to tell when the message stops the driver.
    fn dispatch(&mut self, msg: Msg) -> Result<(), oneshot::Sender<()>> {
        let input = match msg {
            Msg::Call { req, input, reply, span } => {
                self.pending.insert(req, reply);
                self.caller = span;
                input
            }
            Msg::Internal(input) => {
                if let Input::Durable { .. } = input {
                    twopc_storage::crash_point!("participant::after_prepare_durable");
                }
                input
            }
            Msg::Voted { txn, vote, batch } => {
                // Only a YES keeps what was staged (NO and READ_ONLY write
                // nothing).
                if matches!(vote, Ok(twopc_proto::Vote::Yes)) {
                    self.staged.insert(txn, batch);
                }
                Input::ResourceVoted { txn, vote }
            }
            Msg::Stop(done) => return Err(done),
        };
        for e in self.core.step(UnixMillis::now(), input) {
            self.perform(e);
        }
        self.caller = tracing::Span::none();
        Ok(())
    }

    /// Sets the gauges from the core (a scan of the branches, so it runs on
    /// a timer rather than after every step).
    fn refresh_gauges(&self) {
        let in_doubt = self.core.in_doubt().len();
        metrics::gauge!(METRIC_IN_DOUBT, "participant" => self.parts.name.as_str().to_owned()).set(in_doubt as f64);
    }

    fn internal(&self, fut: impl Future<Output = Input> + Send + 'static) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let input = fut.await;
            let _ = tx.send(Msg::Internal(input)).await;
        });
    }

    /// Writes `batch`; `input` turns the outcome into the core's input,
    /// which goes straight from the log's writer thread into the driver's
    /// queue (no task between the fsync and what depends on it).
    fn write_then(&self, batch: Batch, durability: Durability, input: impl FnOnce(Result<(), String>) -> Input + Send + 'static) {
        let (tx, runtime) = (self.tx.clone(), tokio::runtime::Handle::current());
        self.parts.store.submit_then(
            batch,
            durability,
            Box::new(move |result| twopc_storage::hand_over(&tx, &runtime, Msg::Internal(input(result.map_err(|e| e.to_string()))))),
        );
    }

    fn perform(&mut self, effect: Effect) {
        let parts = self.parts.clone();
        match effect {
            Effect::Reply { req, reply } => {
                if let Reply::Voted(v) = &reply {
                    let vote = match v {
                        SentVote::Yes(_) => "yes",
                        SentVote::No(_) => "no",
                        SentVote::ReadOnly => "read_only",
                        SentVote::Committed(_) => "committed",
                    };
                    metrics::counter!(METRIC_PREPARES, "participant" => parts.name.as_str().to_owned(), "vote" => vote).increment(1);
                }
                if let Some(tx) = self.pending.remove(&req) {
                    let _ = tx.send(reply);
                }
            }
            Effect::Enlist { txn } => {
                let span = tracing::debug_span!(parent: &self.caller, "enlist_call", txn_id = %txn, participant = %parts.name);
                let call_span = span.clone();
                self.internal(
                    async move {
                        let mut c = parts.coordinator.clone();
                        let mut req = tonic::Request::new(pb::EnlistRequest {
                            txn_id: txn.to_string(),
                            participant: parts.name.as_str().to_owned(),
                            endpoint: parts.endpoint.clone(),
                            incarnation: parts.incarnation,
                        });
                        req.set_timeout(parts.rpc_timeout);
                        twopc_telemetry::propagation::inject(&call_span, req.metadata_mut());
                        let result = match c.enlist(req).await {
                            Ok(r) => Ok(UnixMillis(r.get_ref().deadline_unix_ms)),
                            Err(s)
                                if matches!(
                                    s.code(),
                                    tonic::Code::Unavailable
                                        | tonic::Code::DeadlineExceeded
                                        | tonic::Code::Cancelled
                                        | tonic::Code::Unknown
                                ) =>
                            {
                                Err(EnlistError::Unreachable(s.message().to_owned()))
                            }
                            Err(s) => Err(EnlistError::Refused(format!("the coordinator refused enlistment: {}", s.message()))),
                        };
                        Input::Enlisted { txn, result }
                    }
                    .instrument(span),
                )
            }
            Effect::ResourcePrepare { txn, payload } => {
                let mut prepare = Box::pin(async move {
                    let mut batch = Batch::new();
                    let running = parts.in_flight.running(txn);
                    let vote = if running > 0 {
                        // Preparing now would stage only part of that call's
                        // work.
                        Ok(twopc_proto::Vote::No(format!(
                            "{running} call(s) under the transaction are still running here: commit only after every call has returned"
                        )))
                    } else {
                        parts.resource.prepare(txn, payload.as_deref(), &mut batch).await.map_err(|e| e.0)
                    };
                    (vote, batch)
                });
                // Most prepares never wait (no lock to wait for): run them
                // here, saving a task and a wake-up on the way to the vote.
                // One that waits carries on, the same future, in a task of
                // its own (its next poll registers the real waker).
                // A resource that panics votes NO instead of taking the
                // driver (or the vote) with it.
                let panicked = || (Err("the resource's prepare panicked".to_owned()), Batch::new());
                let waker = futures::task::noop_waker();
                let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    prepare.as_mut().poll(&mut std::task::Context::from_waker(&waker))
                }));
                match first {
                    Ok(std::task::Poll::Ready((vote, batch))) => self.ready.push_back(Msg::Voted { txn, vote, batch }),
                    Err(_) => {
                        let (vote, batch) = panicked();
                        self.ready.push_back(Msg::Voted { txn, vote, batch });
                    }
                    Ok(std::task::Poll::Pending) => {
                        let tx = self.tx.clone();
                        tokio::spawn(async move {
                            use futures::FutureExt;
                            let (vote, batch) = std::panic::AssertUnwindSafe(prepare).catch_unwind().await.unwrap_or_else(|_| panicked());
                            let _ = tx.send(Msg::Voted { txn, vote, batch }).await;
                        });
                    }
                }
            }
            Effect::PersistPrepared { txn, record } => {
                twopc_storage::crash_point!("participant::before_prepare_write");
                let mut batch = self.staged.remove(&txn).unwrap_or_default();
                batch.put(CF_BRANCHES, txn.to_key().to_vec(), record.encode_to_vec());
                self.write_then(batch, Durability::Synced, move |result| match result {
                    Ok(()) => Input::Durable { txn },
                    Err(error) => Input::PersistFailed { txn, error },
                });
            }
            Effect::Apply { txn, commit, record, synced } => {
                // What the resource's prepare staged is still here only for
                // a one-phase commit (a PREPARED write took it otherwise):
                // it is written with the commit, as the Resource contract
                // says; an abort drops it.
                let staged = self.staged.remove(&txn).filter(|_| commit);
                let recorded = record.is_some();
                self.internal(async move {
                    if recorded {
                        twopc_storage::crash_point!("participant::before_outcome_apply");
                    }
                    let mut batch = staged.unwrap_or_default();
                    let r = if commit { parts.resource.commit(txn, &mut batch).await } else { parts.resource.abort(txn, &mut batch).await };
                    if let Err(e) = r {
                        return Input::ApplyFailed { txn, error: e.0 };
                    }
                    if let Some(rec) = record {
                        batch.put(CF_BRANCHES, txn.to_key().to_vec(), rec.encode_to_vec());
                    }
                    if !batch.is_empty() {
                        let d = if synced { Durability::Synced } else { Durability::Lazy };
                        if let Err(e) = wait(parts.store.submit(batch, d)).await {
                            return Input::ApplyFailed { txn, error: e.to_string() };
                        }
                    }
                    if recorded {
                        twopc_storage::crash_point!("participant::after_outcome_apply");
                        let outcome = if commit { "commit" } else { "abort" };
                        metrics::counter!(METRIC_APPLIED, "participant" => parts.name.as_str().to_owned(), "outcome" => outcome)
                            .increment(1);
                    }
                    parts.resource.finished(txn, commit);
                    Input::Applied { txn }
                });
            }
            Effect::QueryDecision { txn } => self.internal(async move {
                let mut c = parts.coordinator.clone();
                let mut req =
                    tonic::Request::new(pb::QueryDecisionRequest { txn_id: txn.to_string(), participant: parts.name.as_str().to_owned() });
                req.set_timeout(parts.rpc_timeout);
                let decision = match c.query_decision(req).await {
                    Ok(r) => match pb::Decision::try_from(r.get_ref().decision) {
                        Ok(pb::Decision::Commit) => Ok(Decision::Commit),
                        Ok(pb::Decision::Abort) => Ok(Decision::Abort),
                        Ok(pb::Decision::Pending) => Ok(Decision::Pending),
                        _ => Err("the coordinator sent an unknown decision".to_owned()),
                    },
                    Err(s) => Err(s.message().to_owned()),
                };
                match &decision {
                    Ok(d) => debug!(%txn, ?d, "decision queried"),
                    Err(e) => warn!(%txn, error = %e, "cannot ask the coordinator for the outcome; will retry"),
                }
                let retry = match &decision {
                    Ok(Decision::Pending) => Some("pending"),
                    Err(_) => Some("unreachable"),
                    Ok(_) => None,
                };
                if let Some(reason) = retry {
                    metrics::counter!(METRIC_QUERY_RETRIES, "participant" => parts.name.as_str().to_owned(), "reason" => reason)
                        .increment(1);
                }
                Input::Decided { txn, decision }
            }),
            Effect::Release { txn, record } => {
                let mut batch = Batch::new();
                batch.put(CF_BRANCHES, txn.to_key().to_vec(), record.encode_to_vec());
                self.write_then(batch, Durability::Lazy, move |result| {
                    if let Err(e) = &result {
                        warn!(%txn, error = %e, "could not record the release of a one-phase commit");
                    }
                    Input::Released { txn, result }
                });
            }
            Effect::PersistFence { epoch, replaces, record } => {
                let mut batch = Batch::new();
                if let Some(old) = replaces {
                    batch.delete(CF_BRANCHES, TxnId { epoch: old, seq: 0 }.to_key().to_vec());
                }
                batch.put(CF_BRANCHES, TxnId { epoch, seq: 0 }.to_key().to_vec(), record.encode_to_vec());
                self.write_then(batch, Durability::Synced, move |result| match result {
                    Ok(()) => Input::FenceDurable { epoch },
                    Err(error) => Input::FenceFailed { epoch, error },
                });
            }
            Effect::Forget { txn } => {
                let mut batch = Batch::new();
                batch.delete(CF_BRANCHES, txn.to_key().to_vec());
                let ticket = parts.store.submit(batch, Durability::Lazy);
                tokio::spawn(async move {
                    if let Err(e) = wait(ticket).await {
                        warn!(%txn, error = %e, "could not delete a finished branch record; it is retried after a restart");
                    }
                });
            }
            Effect::SetTimer { at, timer } => self.timers.set(at.0, timer),
        }
    }
}
