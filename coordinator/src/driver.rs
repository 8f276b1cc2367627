//! The coordinator's driver: one tokio task owns the [`Core`] and performs
//! its effects.
//!
//! Callers (the gRPC handlers) send an [`Input`] with a oneshot for the
//! [`Reply`] through a [`Handle`]. The driver steps the core with the wall
//! clock, then carries out each effect: replies go to their callers; decision
//! records go to the group-commit log and come back as `Durable` once synced;
//! Prepare and phase-two messages go out on long-lived tonic channels (one per
//! participant endpoint) from spawned tasks whose results come back as inputs;
//! timers wait in one queue, with a single sleep for the earliest
//! (`twopc_storage::timers`), and come back as `Timer` inputs.
//!
//! Persist before send holds because the core only emits a Commit message
//! after the `Durable` input, which this driver sends only after the log's
//! synced write resolved `Ok`.
//!
//! Metrics (names and meanings in [`crate::instruments`]) are recorded here,
//! never in the core: after each step the driver compares the transaction's
//! [`Core::progress`] before and after, and times each phase on its own
//! monotonic clock. Gauges that need a scan of the core (in flight, in
//! doubt, oldest in doubt) are refreshed every
//! [`instruments::GAUGE_INTERVAL`](crate::instruments::GAUGE_INTERVAL).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, error, warn};
use twopc_proto::pb::participant_client::ParticipantClient;
use twopc_proto::{AbortCode, TxnId, UnixMillis, Vote, pb};

use crate::core::{Core, Effect, Input, PhaseTwo, Reply, ReqId, Timer, TxnState};
use crate::instruments;
use crate::log::DecisionLog;

/// Per-call limits of the driver's outgoing RPCs.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Longest a Prepare RPC may take (the core's prepare timeout also
    /// bounds the phase as a whole).
    pub prepare_rpc_timeout: Duration,
    /// Longest a Commit/Abort RPC may take before it counts as failed and is
    /// retried.
    pub decision_rpc_timeout: Duration,
    /// Connect timeout of participant channels.
    pub connect_timeout: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            prepare_rpc_timeout: Duration::from_secs(5),
            decision_rpc_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

enum Msg {
    Call { req: ReqId, input: Input, reply: oneshot::Sender<Reply> },
    Internal(Input),
    Stop(oneshot::Sender<()>),
}

/// The driver stopped (shutdown, or its log failed).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the coordinator is shutting down")]
pub struct Stopped;

/// A cheap, cloneable way to talk to the driver.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Msg>,
    next_req: Arc<AtomicU64>,
    events: tokio::sync::broadcast::Sender<pb::TxnEvent>,
}

impl Handle {
    /// Subscribes to transaction events (see `Admin.Watch`).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<pb::TxnEvent> {
        self.events.subscribe()
    }

    /// Sends the input that `make` builds for a fresh request id and waits
    /// for the core's reply.
    pub async fn call(&self, make: impl FnOnce(ReqId) -> Input) -> Result<Reply, Stopped> {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Call { req, input: make(req), reply }).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Stops the driver after the inputs already queued; closes the log.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts the driver for `core`, replaying `recovery` effects first.
pub fn spawn(core: Core, recovery: Vec<Effect>, log: DecisionLog, config: DriverConfig) -> Handle {
    let (tx, rx) = mpsc::channel(16_384);
    let (events, _) = tokio::sync::broadcast::channel(4096);
    let handle = Handle { tx: tx.clone(), next_req: Arc::new(AtomicU64::new(1)), events: events.clone() };
    let driver = Driver {
        core,
        log,
        config,
        tx,
        pending: HashMap::new(),
        clients: HashMap::new(),
        timings: HashMap::new(),
        timers: Default::default(),
        events,
    };
    tokio::spawn(driver.run(rx, recovery));
    handle
}

struct Driver {
    core: Core,
    log: DecisionLog,
    config: DriverConfig,
    tx: mpsc::Sender<Msg>,
    pending: HashMap<ReqId, oneshot::Sender<Reply>>,
    clients: HashMap<String, ParticipantClient<Channel>>,
    /// When each phase of a transaction of this run began, for the latency
    /// histograms; dropped when its phase two finishes or it is forgotten.
    timings: HashMap<TxnId, Timing>,
    /// Every timer the core set, with one sleep for the earliest.
    timers: twopc_storage::timers::TimerQueue<crate::core::Timer>,
    /// Transaction events for `Admin.Watch` subscribers.
    events: tokio::sync::broadcast::Sender<pb::TxnEvent>,
}

/// Where a transaction is, as [`Core::progress`] reports it: state, phase
/// two finished, abort code.
type Progress = (TxnState, bool, Option<AbortCode>);

/// The driver's clock readings for one transaction.
struct Timing {
    /// Begin (or Execute) was stepped.
    begun: Instant,
    /// Commit closed enlistment and Prepares went out.
    prepare: Option<Instant>,
    /// The outcome was decided (COMMIT durable, or abort).
    decided: Option<Instant>,
}

/// The transaction an input concerns, when it names one (Begin and Execute
/// create theirs: see [`created`]).
fn input_txn(input: &Input) -> Option<TxnId> {
    match input {
        Input::Enlist { txn, .. }
        | Input::Commit { txn, .. }
        | Input::Abort { txn, .. }
        | Input::Shutdown { txn, .. }
        | Input::Status { txn, .. }
        | Input::QueryDecision { txn, .. }
        | Input::Voted { txn, .. }
        | Input::Delivered { txn, .. }
        | Input::Durable { txn }
        | Input::PersistFailed { txn, .. } => Some(*txn),
        Input::Timer(Timer::Deadline(txn) | Timer::PrepareTimeout(txn) | Timer::Retry(txn, _) | Timer::Forget(txn)) => Some(*txn),
        // Begin, Execute (see `created`), List, and any other query that
        // changes no transaction.
        _ => None,
    }
}

/// The transaction a step created: every Begin and Execute sets its deadline
/// timer in the step that creates it, and nothing else sets one.
fn created(effects: &[Effect]) -> Option<TxnId> {
    effects.iter().find_map(|e| match e {
        Effect::SetTimer { timer: Timer::Deadline(txn), .. } => Some(*txn),
        _ => None,
    })
}

fn seconds(since: Instant, now: Instant) -> f64 {
    now.saturating_duration_since(since).as_secs_f64()
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, recovery: Vec<Effect>) {
        for e in recovery {
            self.perform(e);
            twopc_storage::crash_point!("coordinator::during_recovery");
        }
        let mut gauges = tokio::time::interval(instruments::GAUGE_INTERVAL);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            // The gauge tick first: it is ready once a second, so it never
            // starves the inputs, and a steady stream of inputs cannot starve
            // it.
            let next_timer = self.timers.next_at();
            let msg = tokio::select! {
                biased;
                _ = gauges.tick() => {
                    self.refresh_gauges();
                    continue;
                }
                _ = twopc_storage::timers::sleep_until(next_timer) => {
                    for timer in self.timers.pop_due() {
                        self.handle(Input::Timer(timer));
                    }
                    continue;
                }
                msg = rx.recv() => match msg {
                    Some(msg) => msg,
                    None => return,
                },
            };
            let input = match msg {
                Msg::Call { req, input, reply } => {
                    self.pending.insert(req, reply);
                    input
                }
                Msg::Internal(input) => {
                    match &input {
                        Input::Voted { .. } => twopc_storage::crash_point!("coordinator::after_vote"),
                        Input::Durable { .. } => twopc_storage::crash_point!("coordinator::after_decision_durable"),
                        Input::Delivered { result: Ok(()), .. } => twopc_storage::crash_point!("coordinator::after_phase_two_ack"),
                        _ => {}
                    }
                    input
                }
                Msg::Stop(done) => {
                    drop(self);
                    let _ = done.send(());
                    return;
                }
            };
            self.handle(input);
        }
    }

    /// Steps the core with one input, records its metrics and performs its
    /// effects.
    fn handle(&mut self, input: Input) {
        let txn = input_txn(&input);
        let before = txn.and_then(|t| self.core.progress(t));
        let effects = self.core.step(UnixMillis::now(), input);
        if let Some(txn) = txn.or_else(|| created(&effects)) {
            let after = self.core.progress(txn);
            self.observe(txn, before, after);
        }
        for e in effects {
            self.perform(e);
        }
    }

    /// Publishes the events of one step to `Watch` subscribers. The core
    /// reaches Committed only once the decision is durable, so a COMMITTED
    /// event is never ahead of the log.
    fn publish(&self, txn: TxnId, before: Option<Progress>, after: Option<Progress>) {
        if self.events.receiver_count() == 0 {
            return;
        }
        let Some((state, finished, abort)) = after else { return };
        let at_unix_ms = UnixMillis::now().0;
        let send = |kind: pb::TxnEventKind, abort_code: String| {
            let _ = self.events.send(pb::TxnEvent { txn_id: txn.to_string(), kind: kind as i32, abort_code, at_unix_ms });
        };
        if before.is_none() {
            // Begin, or Execute (which begins and starts committing at once).
            send(pb::TxnEventKind::Begun, String::new());
        }
        let was = before.map(|(s, _, _)| s);
        if was != Some(state) {
            match state {
                TxnState::Committed => send(pb::TxnEventKind::Committed, String::new()),
                TxnState::Aborted => send(pb::TxnEventKind::Aborted, abort.map(|c| c.as_str().to_owned()).unwrap_or_default()),
                _ => {}
            }
        }
        if finished && !before.is_some_and(|(_, f, _)| f) {
            send(pb::TxnEventKind::Finished, String::new());
        }
    }

    /// Records the metrics of one transaction's step from `before` to
    /// `after`: its outcome and the latency of each phase it finished.
    fn observe(&mut self, txn: TxnId, before: Option<Progress>, after: Option<Progress>) {
        self.publish(txn, before, after);
        let Some((state, finished, abort)) = after else {
            // Forgotten (or never held): nothing more to time.
            self.timings.remove(&txn);
            return;
        };
        let now = Instant::now();
        let was = before.map(|(s, _, _)| s);
        if before.is_none() {
            self.timings.insert(txn, Timing { begun: now, prepare: None, decided: None });
        }
        // Transactions recovered from the log have no timing: they are
        // counted and timed by the run that began them.
        let mut timing = self.timings.get_mut(&txn);
        if state == TxnState::Preparing
            && was != Some(TxnState::Preparing)
            && let Some(t) = timing.as_deref_mut()
        {
            t.prepare = Some(now);
        }
        if was == Some(TxnState::Preparing)
            && state != TxnState::Preparing
            && let Some(p) = timing.as_ref().and_then(|t| t.prepare)
        {
            metrics::histogram!(instruments::PREPARE_SECONDS).record(seconds(p, now));
        }
        let decided_now = matches!(state, TxnState::Committed | TxnState::Aborted)
            && !matches!(was, Some(TxnState::Committed | TxnState::Aborted | TxnState::Forgotten));
        if decided_now {
            let outcome = if state == TxnState::Committed { "committed" } else { "aborted" };
            match abort {
                Some(code) if state == TxnState::Aborted => {
                    metrics::counter!(instruments::TRANSACTIONS, "outcome" => outcome, "reason" => code.as_str()).increment(1);
                }
                _ => metrics::counter!(instruments::TRANSACTIONS, "outcome" => outcome).increment(1),
            }
            if let Some(t) = timing.as_deref_mut() {
                t.decided = Some(now);
                metrics::histogram!(instruments::TRANSACTION_SECONDS, "outcome" => outcome).record(seconds(t.begun, now));
            }
        }
        if finished && !before.is_some_and(|(_, f, _)| f) {
            // Phase two took time only if the decision came in an earlier
            // step (a transaction with nobody to tell finishes at once).
            if !decided_now && let Some(d) = timing.as_ref().and_then(|t| t.decided) {
                let decision = if state == TxnState::Committed { "commit" } else { "abort" };
                metrics::histogram!(instruments::PHASE_TWO_SECONDS, "decision" => decision).record(seconds(d, now));
            }
            self.timings.remove(&txn);
        }
    }

    /// Sets the gauges that need a scan of the core.
    fn refresh_gauges(&self) {
        let (in_doubt, oldest_ms) = self.core.in_doubt_summary(UnixMillis::now());
        metrics::gauge!(instruments::IN_FLIGHT).set(self.core.unfinished() as f64);
        metrics::gauge!(instruments::IN_DOUBT).set(in_doubt as f64);
        metrics::gauge!(instruments::OLDEST_IN_DOUBT_SECONDS).set(oldest_ms as f64 / 1000.0);
    }

    fn client(&mut self, endpoint: &str) -> Result<ParticipantClient<Channel>, String> {
        if let Some(c) = self.clients.get(endpoint) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| format!("invalid endpoint {endpoint:?}: {e}"))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30));
        let client = ParticipantClient::new(ep.connect_lazy());
        self.clients.insert(endpoint.to_owned(), client.clone());
        Ok(client)
    }

    fn internal(&self, fut: impl Future<Output = Input> + Send + 'static) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let input = fut.await;
            let _ = tx.send(Msg::Internal(input)).await;
        });
    }

    fn perform(&mut self, effect: Effect) {
        match effect {
            Effect::Reply { req, reply } => {
                if let Some(tx) = self.pending.remove(&req) {
                    let _ = tx.send(reply);
                }
            }
            Effect::PersistDecision { txn, record, synced } => {
                if synced {
                    twopc_storage::crash_point!("coordinator::before_decision_write");
                    let ticket = self.log.persist(txn, &record, true);
                    let started = Instant::now();
                    self.internal(async move {
                        match twopc_storage::wait(ticket).await {
                            Ok(()) => {
                                metrics::histogram!(instruments::DECISION_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
                                Input::Durable { txn }
                            }
                            Err(e) => {
                                error!(%txn, error = %e, "decision write failed");
                                Input::PersistFailed { txn, error: e.to_string() }
                            }
                        }
                    });
                } else {
                    twopc_storage::crash_point!("coordinator::before_end_write");
                    let ticket = self.log.persist(txn, &record, false);
                    tokio::spawn(async move {
                        if let Err(e) = twopc_storage::wait(ticket).await {
                            warn!(%txn, error = %e, "END record write failed; it is rewritten after a restart");
                        }
                    });
                }
            }
            Effect::ForgetDecision { txn, horizon } => {
                let ticket = self.log.forget(txn, horizon);
                tokio::spawn(async move {
                    if let Err(e) = twopc_storage::wait(ticket).await {
                        warn!(%txn, error = %e, "could not delete a finished decision record; it is retried after a restart");
                    }
                });
            }
            Effect::SendPrepare { txn, participant, endpoint, payload, deadline } => {
                let client = self.client(&endpoint);
                let epoch = self.core.epoch();
                let timeout = self.config.prepare_rpc_timeout;
                self.internal(async move {
                    let vote = match client {
                        Err(e) => Err(e),
                        Ok(mut c) => {
                            let mut req = tonic::Request::new(pb::PrepareRequest {
                                txn_id: txn.to_string(),
                                coordinator_epoch: epoch,
                                payload,
                                deadline_unix_ms: deadline.0,
                            });
                            req.set_timeout(timeout);
                            match c.prepare(req).await {
                                Ok(r) => Vote::try_from(r.get_ref()),
                                Err(s) => Err(format!("prepare failed: {}: {}", code_name(s.code()), s.message())),
                            }
                        }
                    };
                    debug!(%txn, %participant, ?vote, "vote");
                    Input::Voted { txn, participant, vote }
                });
            }
            Effect::SendDecision { txn, participant, endpoint, decision } => {
                let client = self.client(&endpoint);
                let epoch = self.core.epoch();
                let timeout = self.config.decision_rpc_timeout;
                self.internal(async move {
                    let result = match client {
                        Err(e) => Err(e),
                        Ok(c) => send_decision(c, txn, epoch, decision, timeout).await,
                    };
                    if let Err(e) = &result {
                        warn!(%txn, %participant, error = %e, "phase-two delivery failed; will retry");
                        let decision = match decision {
                            PhaseTwo::Commit(_) => "commit",
                            PhaseTwo::Abort => "abort",
                        };
                        metrics::counter!(instruments::PHASE_TWO_RETRIES, "decision" => decision).increment(1);
                    }
                    Input::Delivered { txn, participant, result }
                });
            }
            Effect::SetTimer { at, timer } => self.timers.set(at.0, timer),
        }
    }
}

async fn send_decision(
    mut c: ParticipantClient<Channel>,
    txn: TxnId,
    epoch: u64,
    decision: PhaseTwo,
    timeout: Duration,
) -> Result<(), String> {
    let r = match decision {
        PhaseTwo::Commit(_) => {
            let mut req = tonic::Request::new(pb::CommitBranchRequest { txn_id: txn.to_string(), coordinator_epoch: epoch });
            req.set_timeout(timeout);
            c.commit(req).await.map(|_| ())
        }
        PhaseTwo::Abort => {
            let mut req = tonic::Request::new(pb::AbortBranchRequest { txn_id: txn.to_string(), coordinator_epoch: epoch });
            req.set_timeout(timeout);
            c.abort(req).await.map(|_| ())
        }
    };
    r.map_err(|s| format!("{}: {}", code_name(s.code()), s.message()))
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
