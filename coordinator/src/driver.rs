//! The coordinator's driver: one tokio task owns the [`Core`] and performs
//! its effects.
//!
//! Callers (the gRPC handlers) send an [`Input`] with a oneshot for the
//! [`Reply`] through a [`Handle`]. The driver steps the core with the wall
//! clock, then carries out each effect: replies go to their callers; decision
//! records go to the group-commit log and come back as `Durable` once synced;
//! Prepare and phase-two messages wait in one outbox per participant
//! endpoint until the end of the current turn of the event loop (the turn
//! takes every input already queued, up to [`MAX_TURN`]), then leave as one
//! `Participant.Deliver` batch per endpoint on a long-lived tonic channel,
//! from a spawned task that streams each answer back as an input the moment
//! it arrives. At low load a turn is one input and a batch one message, so
//! batching adds no wait; under load a turn holds many inputs and the
//! per-call cost (HTTP/2 stream, task, syscalls) is shared. A message that
//! fails or is not answered in time fails alone, exactly as its own RPC
//! would, and the core retries it or times it out as before;
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
use tracing::{Span, debug, error, warn};
use twopc_proto::pb::participant_client::ParticipantClient;
use twopc_proto::{AbortCode, TxnId, UnixMillis, Vote, pb};
use twopc_telemetry::propagation;

use crate::core::{Core, Effect, Input, PhaseTwo, Reply, ReqId, Timer, TxnState};
use crate::instruments;
use crate::log::DecisionLog;
use crate::service::Registry;
use crate::timeline::{Seen, Shown, Timelines, Track, vote_detail};

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
    /// How many finished transactions keep their timeline for
    /// `Admin.GetTransaction` (unfinished ones always keep theirs).
    pub finished_timelines: usize,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            prepare_rpc_timeout: Duration::from_secs(5),
            decision_rpc_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            finished_timelines: 10_000,
        }
    }
}

enum Msg {
    /// `span`: the caller's, parent of the span of a transaction the input
    /// begins.
    Call {
        req: ReqId,
        input: Input,
        reply: oneshot::Sender<Reply>,
        span: Span,
    },
    Timeline {
        txn: TxnId,
        reply: oneshot::Sender<Option<Shown>>,
    },
    /// The participant at this endpoint took in the batch sent to it (or
    /// the call failed): the next batch may go.
    Sent(String),
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
        self.tx.send(Msg::Call { req, input: make(req), reply, span: Span::current() }).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// The timeline of `txn`, oldest event first, and whether it starts at
    /// a recovery; `None` when none is held.
    pub async fn timeline(&self, txn: TxnId) -> Result<Option<Shown>, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Timeline { txn, reply }).await.map_err(|_| Stopped)?;
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
pub fn spawn(core: Core, recovery: Vec<Effect>, log: DecisionLog, registry: Registry, config: DriverConfig) -> Handle {
    let (tx, rx) = mpsc::channel(16_384);
    let (events, _) = tokio::sync::broadcast::channel(4096);
    let handle = Handle { tx: tx.clone(), next_req: Arc::new(AtomicU64::new(1)), events: events.clone() };
    let driver = Driver {
        core,
        log,
        tracks: Timelines::new(config.finished_timelines),
        registry,
        config,
        tx,
        pending: HashMap::new(),
        clients: HashMap::new(),
        timers: Default::default(),
        events,
        outboxes: HashMap::new(),
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
    /// Where participants are registered now: phase-two messages go to a
    /// participant's current address, which may differ from the one it
    /// enlisted or was logged with (it restarted elsewhere).
    registry: Registry,
    /// One long-lived channel per participant endpoint, with when it was
    /// last used: idle ones are closed after [`IDLE_CHANNEL`].
    clients: HashMap<String, (ParticipantClient<Channel>, Instant)>,
    /// Each unfinished transaction's timeline, spans and phase clock
    /// readings (for the latency histograms); and the recent finished
    /// timelines.
    tracks: Timelines,
    /// Every timer the core set, with one sleep for the earliest.
    timers: twopc_storage::timers::TimerQueue<crate::core::Timer>,
    /// Transaction events for `Admin.Watch` subscribers.
    events: tokio::sync::broadcast::Sender<pb::TxnEvent>,
    /// Messages for each participant endpoint, waiting for the end of this
    /// turn of the event loop and for the endpoint's previous batch to have
    /// been taken in.
    outboxes: HashMap<String, Lane>,
}

/// One participant endpoint's outgoing messages.
#[derive(Default)]
struct Lane {
    queue: Vec<Outgoing>,
    /// A batch is on its way and the participant has not yet taken it in
    /// (its response headers have not arrived): what queues meanwhile goes
    /// in the next batch.
    sending: bool,
}

/// How long a participant endpoint's channel stays open unused: endpoints of
/// participants that moved or went away are not kept forever.
const IDLE_CHANNEL: Duration = Duration::from_secs(600);

/// About the most bytes of messages one Deliver batch carries.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// The encoded size of a message, for sizing batches.
fn body_len(body: &pb::envelope::Body) -> usize {
    use prost::Message;
    match body {
        pb::envelope::Body::Prepare(r) => r.encoded_len(),
        pb::envelope::Body::Commit(r) => r.encoded_len(),
        pb::envelope::Body::Abort(r) => r.encoded_len(),
    }
}

/// Most messages the event loop takes in one turn before it sends the
/// batches they made.
const MAX_TURN: usize = 1024;

/// A Prepare, Commit or Abort waiting in an outbox.
struct Outgoing {
    txn: TxnId,
    participant: twopc_proto::ParticipantName,
    body: pb::envelope::Body,
    /// The call's span: its context travels with the message; it ends when
    /// the answer is in.
    span: Span,
    timeout: Duration,
}

/// Where a transaction is, as [`Core::progress`] reports it: state, phase
/// two finished, abort code.
type Progress = (TxnState, bool, Option<AbortCode>);

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

/// The transaction an effect concerns, when it names one.
fn effect_txn(effect: &Effect) -> Option<TxnId> {
    match effect {
        Effect::PersistDecision { txn, .. }
        | Effect::ForgetDecision { txn, .. }
        | Effect::SendPrepare { txn, .. }
        | Effect::SendDecision { txn, .. } => Some(*txn),
        Effect::SetTimer {
            timer: Timer::Deadline(txn) | Timer::PrepareTimeout(txn) | Timer::Retry(txn, _) | Timer::Forget(txn), ..
        } => Some(*txn),
        Effect::Reply { .. }
        | Effect::PersistMarker { .. }
        | Effect::ClearMarkers { .. }
        | Effect::Collect { .. }
        | Effect::SetTimer { timer: Timer::Collect(_), .. } => None,
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
            // Transactions that resume phase two get a timeline from here;
            // the ones only held for Status need none.
            if let Some(txn) = effect_txn(&e)
                && !matches!(
                    e,
                    Effect::SetTimer { timer: Timer::Forget(_), .. }
                        | Effect::ForgetDecision { .. }
                        | Effect::PersistDecision { synced: false, .. }
                )
            {
                self.tracks.live.entry(txn).or_insert_with(|| Track::recovered(txn));
            }
            self.perform(e);
            twopc_storage::crash_point!("coordinator::during_recovery");
        }
        self.flush();
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
                    self.close_idle_channels();
                    continue;
                }
                _ = twopc_storage::timers::sleep_until(next_timer) => {
                    for timer in self.timers.pop_due() {
                        self.handle(Input::Timer(timer), &Span::none());
                    }
                    self.flush();
                    continue;
                }
                msg = rx.recv() => match msg {
                    Some(msg) => msg,
                    None => return,
                },
            };
            let mut stop = self.dispatch(msg).err();
            // Whatever else is queued already joins this turn, so that the
            // messages its steps make travel to each participant together.
            for _ in 0..MAX_TURN {
                if stop.is_some() {
                    break;
                }
                match rx.try_recv() {
                    Ok(msg) => stop = self.dispatch(msg).err(),
                    Err(_) => break,
                }
            }
            if let Some(done) = stop {
                // What is still in the outboxes is dropped: recovery
                // resends phase two, and unsent Prepares leave their
                // transactions to be presumed aborted.
                drop(self);
                let _ = done.send(());
                return;
            }
            self.flush();
        }
    }

    /// Handles one message; `Err` with the caller to tell when it stops the
    /// driver.
    fn dispatch(&mut self, msg: Msg) -> Result<(), oneshot::Sender<()>> {
        let (input, span) = match msg {
            Msg::Call { req, input, reply, span } => {
                self.pending.insert(req, reply);
                (input, span)
            }
            Msg::Timeline { txn, reply } => {
                let _ = reply.send(self.tracks.get(txn));
                return Ok(());
            }
            Msg::Sent(endpoint) => {
                if let Some(lane) = self.outboxes.get_mut(&endpoint) {
                    lane.sending = false;
                }
                return Ok(());
            }
            Msg::Internal(input) => {
                match &input {
                    Input::Voted { .. } => twopc_storage::crash_point!("coordinator::after_vote"),
                    Input::Durable { .. } => twopc_storage::crash_point!("coordinator::after_decision_durable"),
                    Input::Delivered { result: Ok(()), .. } => twopc_storage::crash_point!("coordinator::after_phase_two_ack"),
                    _ => {}
                }
                (input, Span::none())
            }
            Msg::Stop(done) => return Err(done),
        };
        self.handle(input, &span);
        Ok(())
    }

    /// Steps the core with one input, records its metrics, timeline and
    /// spans, and performs its effects. `parent`: the caller's span.
    fn handle(&mut self, input: Input, parent: &Span) {
        let txn = input_txn(&input);
        let seen = Seen::of(&input);
        let before = txn.and_then(|t| self.core.progress(t));
        let effects = self.core.step(UnixMillis::now(), input);
        if let Some(txn) = txn.or_else(|| created(&effects)) {
            let after = self.core.progress(txn);
            self.observe(txn, &seen, &effects, before, after, parent);
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

    /// Records one transaction's step from `before` to `after`: its
    /// outcome and the latency of each phase it finished (metrics), what
    /// happened (timeline) and the phase it entered or left (spans).
    fn observe(&mut self, txn: TxnId, seen: &Seen, effects: &[Effect], before: Option<Progress>, after: Option<Progress>, parent: &Span) {
        use pb::TimelineEventKind as K;
        self.publish(txn, before, after);
        let Some((state, finished, abort)) = after else {
            // Forgotten (or never held).
            self.tracks.finish(txn);
            return;
        };
        let now = Instant::now();
        let was = before.map(|(s, _, _)| s);
        if before.is_none() {
            let mut track = Track::begun(txn, parent);
            match seen {
                Seen::Begin { timeout_ms: 0 } => track.push(K::Begun, None, "default timeout"),
                Seen::Begin { timeout_ms } => track.push(K::Begun, None, format!("timeout {timeout_ms} ms")),
                Seen::Execute { branches } => {
                    let names: Vec<&str> = branches.iter().map(|p| p.as_str()).collect();
                    track.push(K::Begun, None, format!("execute on {}", names.join(", ")));
                }
                _ => track.push(K::Begun, None, ""),
            }
            self.tracks.live.insert(txn, track);
        }
        // Transactions recovered from the log and only held for Status have
        // no track.
        let Some(track) = self.tracks.live.get_mut(&txn) else { return };
        if before.is_some() {
            match seen {
                Seen::Enlist { participant, endpoint } => {
                    let refused = effects.iter().find_map(|e| match e {
                        Effect::Reply { reply: Reply::Error(e), .. } => Some(e.to_string()),
                        _ => None,
                    });
                    match refused {
                        Some(why) => track.push(K::EnlistRefused, Some(participant), why),
                        None => track.push(K::Enlisted, Some(participant), endpoint.clone()),
                    }
                }
                Seen::Commit => track.push(K::CommitRequested, None, ""),
                Seen::Abort { detail } => track.push(K::AbortRequested, None, detail.clone()),
                Seen::Voted { participant, vote: Ok(v) } => track.push(K::Voted, Some(participant), vote_detail(v)),
                Seen::Voted { participant, vote: Err(e) } => track.push(K::PrepareFailed, Some(participant), e.clone()),
                Seen::Delivered { participant, result: Ok(()) } => track.push(K::Acknowledged, Some(participant), ""),
                Seen::Delivered { participant, result: Err(e) } => track.push(K::DeliveryFailed, Some(participant), e.clone()),
                Seen::Durable => track.write = Span::none(),
                Seen::PersistFailed { error } => {
                    track.write = Span::none();
                    track.push(K::DecisionWriteFailed, None, error.clone());
                }
                Seen::Deadline if was != Some(state) => track.push(K::DeadlineExpired, None, ""),
                Seen::PrepareTimeout if was != Some(state) => track.push(K::PrepareTimedOut, None, ""),
                _ => {}
            }
        }
        if state == TxnState::Preparing && was != Some(TxnState::Preparing) {
            if let Some(t) = track.timing.as_mut() {
                t.prepare = Some(now);
            }
            track.phase = tracing::debug_span!(parent: &track.span, "prepare", txn_id = %txn);
        }
        if was == Some(TxnState::Preparing) && state != TxnState::Preparing {
            if let Some(p) = track.timing.as_ref().and_then(|t| t.prepare) {
                metrics::histogram!(instruments::PREPARE_SECONDS).record(seconds(p, now));
            }
            track.phase = Span::none();
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
            if let Some(t) = track.timing.as_mut() {
                t.decided = Some(now);
                metrics::histogram!(instruments::TRANSACTION_SECONDS, "outcome" => outcome).record(seconds(t.begun, now));
            }
            if state == TxnState::Committed {
                match self.core.one_phase_participant(txn) {
                    Some(p) => track.push(K::Committed, None, format!("committed in one phase by {p}")),
                    None => track.push(K::Committed, None, "decision durable"),
                }
            } else {
                let why = self.core.abort_reason(txn).map(|r| r.to_string()).unwrap_or_default();
                track.push(K::Aborted, None, why);
            }
            track.span.record("outcome", outcome);
            if !finished {
                let decision = if state == TxnState::Committed { "commit" } else { "abort" };
                track.phase = tracing::debug_span!(parent: &track.span, "phase_two", txn_id = %txn, decision);
            }
        }
        if finished && !before.is_some_and(|(_, f, _)| f) {
            // Phase two took time only if the decision came in an earlier
            // step (a transaction with nobody to tell finishes at once).
            if !decided_now && let Some(d) = track.timing.as_ref().and_then(|t| t.decided) {
                let decision = if state == TxnState::Committed { "commit" } else { "abort" };
                metrics::histogram!(instruments::PHASE_TWO_SECONDS, "decision" => decision).record(seconds(d, now));
            }
            track.push(K::Finished, None, "");
            self.tracks.finish(txn);
        }
    }

    /// Closes the channels of endpoints unused for [`IDLE_CHANNEL`] (and
    /// drops their empty outboxes); a later message reopens one.
    fn close_idle_channels(&mut self) {
        let now = Instant::now();
        let outboxes = &self.outboxes;
        self.clients.retain(|endpoint, (_, used)| {
            let busy = outboxes.get(endpoint).is_some_and(|l| l.sending || !l.queue.is_empty());
            busy || now.saturating_duration_since(*used) < IDLE_CHANNEL
        });
        let clients = &self.clients;
        self.outboxes.retain(|endpoint, l| l.sending || !l.queue.is_empty() || clients.contains_key(endpoint));
    }

    /// Sets the gauges that need a scan of the core.
    fn refresh_gauges(&self) {
        let (in_doubt, oldest_ms) = self.core.in_doubt_summary(UnixMillis::now());
        metrics::gauge!(instruments::IN_FLIGHT).set(self.core.unfinished() as f64);
        metrics::gauge!(instruments::IN_DOUBT).set(in_doubt as f64);
        metrics::gauge!(instruments::OLDEST_IN_DOUBT_SECONDS).set(oldest_ms as f64 / 1000.0);
        metrics::gauge!(instruments::ONE_PHASE_UNCOLLECTED).set(self.core.uncollected_count() as f64);
    }

    fn client(&mut self, endpoint: &str) -> Result<ParticipantClient<Channel>, String> {
        if let Some((c, used)) = self.clients.get_mut(endpoint) {
            *used = Instant::now();
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| format!("invalid endpoint {endpoint:?}: {e}"))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30));
        let client = ParticipantClient::new(ep.connect_lazy());
        self.clients.insert(endpoint.to_owned(), (client.clone(), Instant::now()));
        Ok(client)
    }

    fn enqueue(&mut self, endpoint: String, message: Outgoing) {
        self.outboxes.entry(endpoint).or_default().queue.push(message);
    }

    /// Sends each outbox whose endpoint is not still taking in its previous
    /// batch as one Deliver batch (a task per batch).
    fn flush(&mut self) {
        let ready: Vec<String> =
            self.outboxes.iter().filter(|(_, lane)| !lane.sending && !lane.queue.is_empty()).map(|(e, _)| e.clone()).collect();
        for endpoint in ready {
            let client = self.client(&endpoint);
            let Some(lane) = self.outboxes.get_mut(&endpoint) else { continue };
            // At most MAX_DELIVER_BATCH messages and about MAX_BATCH_BYTES
            // (always at least one message), well inside the participant's
            // 4 MiB request limit.
            let mut take = 0;
            let mut bytes = 0;
            for m in &lane.queue {
                bytes += body_len(&m.body);
                if take > 0 && (take == twopc_proto::MAX_DELIVER_BATCH || bytes > MAX_BATCH_BYTES) {
                    break;
                }
                take += 1;
            }
            let rest = lane.queue.split_off(take);
            let batch = std::mem::replace(&mut lane.queue, rest);
            lane.sending = true;
            metrics::histogram!(instruments::DELIVER_BATCH_MESSAGES).record(batch.len() as f64);
            tokio::spawn(deliver(client, endpoint, batch, self.tx.clone()));
        }
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
                    if let Some(t) = self.tracks.live.get_mut(&txn) {
                        t.push(pb::TimelineEventKind::DecisionWriteStarted, None, "");
                        t.write = tracing::debug_span!(parent: &t.span, "decision_write", txn_id = %txn);
                    }
                    let started = Instant::now();
                    let (tx, runtime) = (self.tx.clone(), tokio::runtime::Handle::current());
                    // Straight from the log's writer thread into the driver's
                    // queue: no task between the fsync and the decision.
                    self.log.persist_then(
                        txn,
                        &record,
                        true,
                        Box::new(move |result| {
                            let input = match result {
                                Ok(()) => {
                                    metrics::histogram!(instruments::DECISION_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
                                    Input::Durable { txn }
                                }
                                Err(e) => {
                                    error!(%txn, error = %e, "decision write failed");
                                    Input::PersistFailed { txn, error: e.to_string() }
                                }
                            };
                            twopc_storage::hand_over(&tx, &runtime, Msg::Internal(input));
                        }),
                    );
                } else {
                    twopc_storage::crash_point!("coordinator::before_end_write");
                    self.log.persist_then(
                        txn,
                        &record,
                        false,
                        Box::new(move |result| {
                            if let Err(e) = result {
                                warn!(%txn, error = %e, "END record write failed; it is rewritten after a restart");
                            }
                        }),
                    );
                }
            }
            Effect::ForgetDecision { txn, horizon } => {
                self.log.forget_then(
                    txn,
                    horizon,
                    Box::new(move |result| {
                        if let Err(e) = result {
                            warn!(%txn, error = %e, "could not delete a finished decision record; it is retried after a restart");
                        }
                    }),
                );
            }
            Effect::SendPrepare { txn, participant, endpoint, payload, deadline, one_phase } => {
                let span = match self.tracks.live.get_mut(&txn) {
                    Some(t) => {
                        t.push(pb::TimelineEventKind::PrepareSent, Some(&participant), if one_phase { "one phase" } else { "" });
                        tracing::debug_span!(parent: t.call_parent(), "prepare_call", txn_id = %txn, participant = %participant, %endpoint)
                    }
                    None => Span::none(),
                };
                let body = pb::envelope::Body::Prepare(pb::PrepareRequest {
                    txn_id: txn.to_string(),
                    coordinator_epoch: self.core.epoch(),
                    payload,
                    deadline_unix_ms: deadline.0,
                    one_phase,
                });
                let timeout = self.config.prepare_rpc_timeout;
                self.enqueue(endpoint, Outgoing { txn, participant, body, span, timeout });
            }
            Effect::SendDecision { txn, participant, endpoint, decision } => {
                let what = if matches!(decision, PhaseTwo::Commit(_)) { "COMMIT" } else { "ABORT" };
                let (span, attempt) = match self.tracks.live.get_mut(&txn) {
                    Some(t) => {
                        let attempt = t.next_attempt(&participant);
                        t.push(pb::TimelineEventKind::DecisionSent, Some(&participant), format!("{what}, attempt {attempt}"));
                        let span = tracing::debug_span!(parent: t.call_parent(), "decision_call", txn_id = %txn, participant = %participant, decision = what, attempt);
                        (span, attempt)
                    }
                    None => (Span::none(), 2),
                };
                // The first attempt goes where the participant enlisted (or
                // was logged); a retry goes where it is registered now, in
                // case it restarted elsewhere.
                let endpoint = if attempt > 1 { self.registry.get(&participant).unwrap_or(endpoint) } else { endpoint };
                let (txn_id, coordinator_epoch) = (txn.to_string(), self.core.epoch());
                let body = match decision {
                    PhaseTwo::Commit(_) => pb::envelope::Body::Commit(pb::CommitBranchRequest { txn_id, coordinator_epoch }),
                    PhaseTwo::Abort => pb::envelope::Body::Abort(pb::AbortBranchRequest { txn_id, coordinator_epoch }),
                };
                let timeout = self.config.decision_rpc_timeout;
                self.enqueue(endpoint, Outgoing { txn, participant, body, span, timeout });
            }
            Effect::PersistMarker { participant } => {
                let (tx, runtime) = (self.tx.clone(), tokio::runtime::Handle::current());
                let p = participant.clone();
                self.log.persist_marker_then(
                    self.core.epoch(),
                    &participant,
                    Box::new(move |result| {
                        let input = match result {
                            Ok(()) => Input::MarkerDurable { participant: p },
                            Err(e) => {
                                error!(participant = %p, error = %e, "one-phase marker write failed");
                                Input::MarkerFailed { participant: p, error: e.to_string() }
                            }
                        };
                        twopc_storage::hand_over(&tx, &runtime, Msg::Internal(input));
                    }),
                );
            }
            Effect::ClearMarkers { participant, epochs } => {
                let p = participant.clone();
                self.log.clear_markers_then(
                    &participant,
                    &epochs,
                    Box::new(move |result| {
                        if let Err(e) = result {
                            warn!(participant = %p, error = %e, "could not delete collected one-phase markers; collected again after a restart");
                        }
                    }),
                );
            }
            Effect::Collect { participant } => {
                let endpoint = self.registry.get(&participant);
                let client = endpoint.as_deref().map(|e| self.client(e));
                let (tx, epoch, timeout) = (self.tx.clone(), self.core.epoch(), self.config.decision_rpc_timeout);
                tokio::spawn(async move {
                    let endpoint = endpoint.unwrap_or_default();
                    let result = match client {
                        None => Err("the participant is not registered".to_owned()),
                        Some(Err(e)) => Err(e),
                        Some(Ok(c)) => collect(c, epoch, timeout).await,
                    };
                    match &result {
                        Ok(txns) => {
                            tracing::info!(%participant, %endpoint, committed = txns.len(), "collected one-phase outcomes of earlier runs")
                        }
                        Err(e) => warn!(%participant, %endpoint, error = %e, "cannot collect one-phase outcomes yet; will retry"),
                    }
                    let _ = tx.send(Msg::Internal(Input::Collected { participant, endpoint, result })).await;
                });
            }
            Effect::SetTimer { at, timer } => self.timers.set(at.0, timer),
        }
    }
}

/// Asks a participant for its one-phase commits of runs before `epoch`
/// (fencing them first, at the participant).
async fn collect(mut c: ParticipantClient<Channel>, epoch: u64, timeout: Duration) -> Result<Vec<TxnId>, String> {
    let mut req = tonic::Request::new(pb::RecoverRequest { coordinator_epoch: epoch });
    req.set_timeout(timeout);
    match c.recover(req).await {
        Ok(r) => r
            .into_inner()
            .committed_one_phase
            .iter()
            .map(|t| t.parse::<TxnId>().map_err(|e| format!("the participant reported a malformed transaction id {t:?}: {e}")))
            .collect(),
        // Built before one-phase commit existed: it never committed in one
        // phase (it answered YES, and two phases followed).
        Err(s) if s.code() == tonic::Code::Unimplemented => Ok(Vec::new()),
        Err(s) => Err(format!("{}: {}", code_name(s.code()), s.message())),
    }
}

/// Sends one batch to a participant and turns each answer into the core's
/// input as it arrives; every message left unanswered when the call fails
/// (or the batch's deadline passes) fails with that error.
async fn deliver(client: Result<ParticipantClient<Channel>, String>, endpoint: String, mut batch: Vec<Outgoing>, tx: mpsc::Sender<Msg>) {
    let timeout = batch.iter().map(|m| m.timeout).max().unwrap_or_default();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut answered = vec![false; batch.len()];
    // Only the network waits are bounded by the deadline: a send into the
    // driver's queue is never cancelled, so no answer (and no `Sent`) can
    // be lost on the way.
    let failed = match client {
        Err(e) => {
            let _ = tx.send(Msg::Sent(endpoint)).await;
            e
        }
        Ok(mut c) => {
            let messages = batch
                .iter()
                .map(|m| pb::Envelope { body: Some(m.body.clone()), trace_context: propagation::to_map(&m.span) })
                .collect::<Vec<_>>();
            let mut req = tonic::Request::new(pb::DeliverRequest { messages });
            req.set_timeout(timeout);
            let taken = tokio::time::timeout_at(deadline, c.deliver(req)).await;
            // The participant has the batch (or the call failed): the next
            // one may go.
            let _ = tx.send(Msg::Sent(endpoint)).await;
            match taken {
                Err(_) => format!("DEADLINE_EXCEEDED: no answer within {timeout:?}"),
                // A participant built before Deliver existed: one call per
                // message, as it understands.
                Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => return deliver_one_by_one(c, batch, tx).await,
                Ok(Err(s)) => format!("{}: {}", code_name(s.code()), s.message()),
                Ok(Ok(r)) => {
                    let mut stream = r.into_inner();
                    loop {
                        if answered.iter().all(|a| *a) {
                            return;
                        }
                        match tokio::time::timeout_at(deadline, stream.message()).await {
                            Err(_) => break format!("DEADLINE_EXCEEDED: no answer within {timeout:?}"),
                            Ok(Err(s)) => break format!("{}: {}", code_name(s.code()), s.message()),
                            Ok(Ok(None)) => break "the participant ended the batch before answering every message".to_owned(),
                            Ok(Ok(Some(d))) => {
                                let i = d.index as usize;
                                let n = batch.len();
                                let Some(m) = batch.get_mut(i).filter(|_| !answered[i]) else {
                                    break format!("the participant answered message {i} of {n} twice or out of range");
                                };
                                let input = answer(m, d.body);
                                // The call's span ends with its answer.
                                m.span = Span::none();
                                let _ = tx.send(Msg::Internal(input)).await;
                                answered[i] = true;
                            }
                        }
                    }
                }
            }
        }
    };
    for (m, _) in batch.iter().zip(&answered).filter(|(_, a)| !**a) {
        let refused = pb::delivered::Body::Refused(pb::Refusal { code: -1, message: failed.clone(), reason: String::new() });
        let _ = tx.send(Msg::Internal(answer(m, Some(refused)))).await;
    }
}

/// `message` as the request of its own RPC: `m`'s timeout and trace context.
fn request<T>(message: T, m: &Outgoing) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(m.timeout);
    propagation::inject(&m.span, req.metadata_mut());
    req
}

/// Sends each message of `batch` as its own RPC, concurrently: for a
/// participant that does not serve `Deliver`.
async fn deliver_one_by_one(c: ParticipantClient<Channel>, batch: Vec<Outgoing>, tx: mpsc::Sender<Msg>) {
    use pb::delivered::Body as Out;
    use pb::envelope::Body as In;
    let calls = batch.into_iter().map(|m| {
        let (mut c, tx) = (c.clone(), tx.clone());
        async move {
            let refused = |s: tonic::Status| {
                Out::Refused(pb::Refusal { code: s.code() as i32, message: s.message().to_owned(), reason: String::new() })
            };
            let result = match m.body.clone() {
                In::Prepare(r) => c.prepare(request(r, &m)).await.map(|r| Out::Prepare(r.into_inner())),
                In::Commit(r) => c.commit(request(r, &m)).await.map(|r| Out::Commit(r.into_inner())),
                In::Abort(r) => c.abort(request(r, &m)).await.map(|r| Out::Abort(r.into_inner())),
            };
            let _ = tx.send(Msg::Internal(answer(&m, Some(result.unwrap_or_else(refused))))).await;
        }
    });
    futures::future::join_all(calls).await;
}

/// The core's input for the answer `body` to message `m`. A refusal with
/// code -1 is a transport failure whose text is already complete.
fn answer(m: &Outgoing, body: Option<pb::delivered::Body>) -> Input {
    use pb::delivered::Body as B;
    let refusal = |r: pb::Refusal| {
        if r.code == -1 { r.message } else { format!("{}: {}", code_name(tonic::Code::from_i32(r.code)), r.message) }
    };
    let (txn, participant) = (m.txn, m.participant.clone());
    let _entered = m.span.enter();
    match (&m.body, body) {
        (pb::envelope::Body::Prepare(_), Some(B::Prepare(r))) => {
            let vote = Vote::try_from(&r);
            debug!(%txn, %participant, ?vote, "vote");
            Input::Voted { txn, participant, vote }
        }
        (pb::envelope::Body::Prepare(_), Some(B::Refused(r))) => {
            Input::Voted { txn, participant, vote: Err(format!("prepare failed: {}", refusal(r))) }
        }
        (pb::envelope::Body::Commit(_), Some(B::Commit(_))) | (pb::envelope::Body::Abort(_), Some(B::Abort(_))) => {
            Input::Delivered { txn, participant, result: Ok(()) }
        }
        (body, other) => {
            let error = match other {
                Some(B::Refused(r)) => refusal(r),
                _ => "the participant's answer does not match the message".to_owned(),
            };
            if matches!(body, pb::envelope::Body::Prepare(_)) {
                return Input::Voted { txn, participant, vote: Err(format!("prepare failed: {error}")) };
            }
            let decision = if matches!(body, pb::envelope::Body::Commit(_)) { "commit" } else { "abort" };
            warn!(%txn, %participant, %error, "phase-two delivery failed; will retry");
            metrics::counter!(instruments::PHASE_TWO_RETRIES, "decision" => decision).increment(1);
            Input::Delivered { txn, participant, result: Err(error) }
        }
    }
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
