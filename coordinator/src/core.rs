//! The coordinator's protocol core: presumed-abort two-phase commit with
//! dynamic enlistment, as a deterministic state machine.
//!
//! [`Core::step`] takes the time and one [`Input`] and returns [`Effect`]s as
//! data. It never touches a socket, a clock or a disk; the driver performs the
//! effects in order and feeds their results back as inputs.
//!
//! Invariants kept here (numbers refer to docs/ARCHITECTURE.md, "Rules"):
//! - Validity: a transaction is decided COMMIT only when every enlisted
//!   participant voted YES or READ_ONLY, within the deadline.
//! - Durability of the decision, persist before send: the COMMIT decision is
//!   handed to the log as [`Effect::PersistDecision`]; nobody is told about it
//!   until the log reports it durable ([`Input::Durable`]). This is visible in
//!   the types: [`PhaseTwo::Commit`] needs a [`DecisionDurable`] witness that
//!   only this module can make, and only in the durable path or at recovery.
//! - Enlistment closes when Commit, Abort or the deadline arrives; a
//!   participant that enlists later is refused, so the decision always covers
//!   every participant that did work.
//! - Presumed abort: aborts are never logged. A transaction the core does not
//!   hold and the log does not hold is aborted.
//! - Idempotency: every input may arrive twice or late and has one effect;
//!   stale inputs (votes, acks, timers for a transaction in another state)
//!   are ignored.
//! - One-phase commit: a transaction with one participant sends it a
//!   one-phase Prepare, and the participant's durable answer is the
//!   outcome: COMMITTED (or NO) — the coordinator never aborts such a
//!   transaction on its own once the message may have left, it asks again.
//!   Before the first one-phase Prepare of this run to a participant, a
//!   marker (this epoch, that participant) is made durable
//!   ([`Effect::PersistMarker`]). After a restart, the outcome of an
//!   unknown transaction of a marked run is not presumed: Status answers
//!   [`CoreError::OutcomeBeingCollected`] until every marked participant has
//!   answered [`Effect::Collect`] (it fences that run's one-phase Prepares
//!   and reports what it committed), and the reported commits are recorded.
//!   A one-phase commit is recorded (synced, off the caller's path) before
//!   the participant is told to release its own record.

use std::collections::{BTreeMap, BTreeSet};

use twopc_proto::logpb::{DecisionRecord, LoggedParticipant};
use twopc_proto::{AbortCode, AbortReason, Decision, Outcome, ParticipantName, TxnId, UnixMillis, Vote};

/// Identifies a caller waiting for a [`Reply`]; chosen by the driver.
pub type ReqId = u64;

/// Tunables of the protocol. Times are in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CoreConfig {
    /// Timeout of a transaction whose Begin did not ask for one.
    pub default_timeout_ms: u64,
    /// Longest timeout a Begin may ask for.
    pub max_timeout_ms: u64,
    /// How long votes may take after Commit before the transaction aborts.
    pub prepare_timeout_ms: u64,
    /// First phase-two retry delay; doubles per failure up to `retry_max_ms`.
    pub retry_base_ms: u64,
    /// Longest phase-two retry delay.
    pub retry_max_ms: u64,
    /// Abort deliveries are attempted this many times; after that the
    /// participant's own QueryDecision (presumed abort) or deadline cleans up.
    pub abort_delivery_attempts: u32,
    /// How long a finished transaction's details stay in memory for Status
    /// and retried Commits; then it is forgotten (its decision record
    /// deleted and the garbage-collection horizon raised).
    pub retention_ms: u64,
    /// Seed of the retry jitter, so that runs replay.
    pub seed: u64,
    /// Commit a transaction with a single participant in one phase.
    pub one_phase: bool,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            default_timeout_ms: 10_000,
            max_timeout_ms: 300_000,
            prepare_timeout_ms: 5_000,
            retry_base_ms: 50,
            retry_max_ms: 5_000,
            abort_delivery_attempts: 8,
            retention_ms: 600_000,
            seed: 0x9E37_79B9_7F4A_7C15,
            one_phase: true,
        }
    }
}

/// Where a transaction is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxnState {
    /// Accepting participants.
    Active,
    /// Prepares sent; collecting votes.
    Preparing,
    /// Every vote is YES; the COMMIT decision is being made durable.
    Deciding,
    /// Decided commit (durable); phase two may be in progress.
    Committed,
    /// Decided abort.
    Aborted,
    /// Finished longer ago than the retention period; the outcome is no
    /// longer held.
    Forgotten,
}

/// Proof that a transaction's COMMIT decision is durable. Only this module
/// constructs it: when the log reports the decision durable, or when the
/// decision was read back from the log at recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecisionDurable {
    _private: (),
}

/// The phase-two message to deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PhaseTwo {
    /// Commit; only sendable with proof that the decision is durable.
    Commit(DecisionDurable),
    /// Abort; needs no durable record (presumed abort).
    Abort,
}

/// Something that happens to the core.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input {
    /// Start a transaction. `timeout_ms` 0 means the default.
    Begin {
        /// Caller to answer.
        req: ReqId,
        /// Requested timeout.
        timeout_ms: u64,
    },
    /// A participant joins a transaction.
    Enlist {
        /// Caller to answer.
        req: ReqId,
        /// The transaction.
        txn: TxnId,
        /// Who joins.
        participant: ParticipantName,
        /// Where to reach it.
        endpoint: String,
        /// The participant process's incarnation (0: unknown).
        incarnation: u64,
    },
    /// The initiator asks to commit.
    Commit {
        /// Caller to answer once the outcome is known.
        req: ReqId,
        /// The transaction.
        txn: TxnId,
    },
    /// The initiator asks to abort.
    Abort {
        /// Caller to answer.
        req: ReqId,
        /// The transaction.
        txn: TxnId,
        /// Recorded as the abort detail.
        detail: String,
    },
    /// One-shot transaction over known participants with payloads.
    Execute {
        /// Caller to answer once the outcome is known.
        req: ReqId,
        /// Participants, their endpoints and payloads; names are distinct.
        branches: Vec<ExecBranch>,
        /// Requested timeout, 0 for the default.
        timeout_ms: u64,
    },
    /// Someone asks what the core knows.
    Status {
        /// Caller to answer.
        req: ReqId,
        /// The transaction.
        txn: TxnId,
    },
    /// The coordinator is shutting down: abort `txn` if it is not decided.
    Shutdown {
        /// Caller to answer.
        req: ReqId,
        /// The transaction.
        txn: TxnId,
    },
    /// An operator lists transactions.
    List {
        /// Caller to answer.
        req: ReqId,
        /// Only transactions past phase one and not finished.
        in_doubt_only: bool,
        /// Most transactions to return (oldest first).
        limit: usize,
        /// What else a listed transaction must match.
        filter: ListFilter,
    },
    /// A prepared participant asks for the outcome.
    QueryDecision {
        /// Caller to answer.
        req: ReqId,
        /// The transaction.
        txn: TxnId,
    },
    /// A Prepare came back: the vote, or why no vote could be had.
    Voted {
        /// The transaction.
        txn: TxnId,
        /// Who voted.
        participant: ParticipantName,
        /// The vote, or the delivery/participant error.
        vote: Result<Vote, String>,
    },
    /// A phase-two message was acknowledged, or failed.
    Delivered {
        /// The transaction.
        txn: TxnId,
        /// To whom.
        participant: ParticipantName,
        /// Ok when acknowledged.
        result: Result<(), String>,
    },
    /// The COMMIT decision of `txn` is durable.
    Durable {
        /// The transaction.
        txn: TxnId,
    },
    /// Writing the decision of `txn` failed; its durability is unknown.
    PersistFailed {
        /// The transaction.
        txn: TxnId,
        /// The storage error.
        error: String,
    },
    /// The one-phase marker of `participant` for this run is durable.
    MarkerDurable {
        /// The participant.
        participant: ParticipantName,
    },
    /// Writing the one-phase marker of `participant` failed.
    MarkerFailed {
        /// The participant.
        participant: ParticipantName,
        /// The storage error.
        error: String,
    },
    /// A participant answered [`Effect::Collect`]: the transactions of
    /// earlier runs it committed in one phase and holds unreleased, or why
    /// it could not be asked.
    Collected {
        /// The participant.
        participant: ParticipantName,
        /// Where it was asked.
        endpoint: String,
        /// Its answer.
        result: Result<Vec<TxnId>, String>,
    },
    /// A timer set by [`Effect::SetTimer`] fired.
    Timer(Timer),
}

/// Conditions a transaction must meet to be listed; the default lists all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ListFilter {
    /// In one of these states (empty: any).
    pub states: Vec<TxnState>,
    /// At least this old, in milliseconds.
    pub min_age_ms: u64,
    /// With this participant enlisted.
    pub participant: Option<ParticipantName>,
}

impl ListFilter {
    fn matches(&self, now: UnixMillis, t: &Txn) -> bool {
        (self.states.is_empty() || self.states.contains(&t.state))
            && now.0.saturating_sub(t.created.0) >= self.min_age_ms
            && self.participant.as_ref().is_none_or(|p| t.participants.contains_key(p))
    }
}

/// A branch of an Execute call, resolved by the driver.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExecBranch {
    /// The registered participant.
    pub participant: ParticipantName,
    /// Its endpoint, from the registry.
    pub endpoint: String,
    /// Delivered with Prepare.
    pub payload: Vec<u8>,
}

/// Timers the core sets. Each is checked against the current state when it
/// fires, so a timer that outlived its purpose does nothing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// The transaction's deadline.
    Deadline(TxnId),
    /// The end of the prepare window started by Commit.
    PrepareTimeout(TxnId),
    /// Retry phase two to a participant.
    Retry(TxnId, ParticipantName),
    /// Drop the finished transaction's details from memory.
    Forget(TxnId),
    /// Ask a participant again for one-phase outcomes of earlier runs.
    Collect(ParticipantName),
}

/// What the core asks the driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Answer a caller.
    Reply {
        /// The caller.
        req: ReqId,
        /// The answer.
        reply: Reply,
    },
    /// Write the decision record; report [`Input::Durable`] (when `synced`)
    /// or nothing (lazy END records) back.
    PersistDecision {
        /// The transaction.
        txn: TxnId,
        /// The record.
        record: DecisionRecord,
        /// fsync before reporting.
        synced: bool,
    },
    /// Delete a finished transaction's decision record and persist the
    /// garbage-collection horizon (lazily: losing it only keeps a record
    /// longer).
    ForgetDecision {
        /// The transaction.
        txn: TxnId,
        /// The new horizon.
        horizon: TxnId,
    },
    /// Send Prepare and report [`Input::Voted`].
    SendPrepare {
        /// The transaction.
        txn: TxnId,
        /// To whom.
        participant: ParticipantName,
        /// Where.
        endpoint: String,
        /// Execute payload, if any.
        payload: Option<Vec<u8>>,
        /// The transaction's deadline, for the participant.
        deadline: UnixMillis,
        /// Prepare and commit in one step; the answer is the outcome.
        one_phase: bool,
    },
    /// Durably note that this run sends one-phase Prepares to
    /// `participant`; report [`Input::MarkerDurable`] or
    /// [`Input::MarkerFailed`].
    PersistMarker {
        /// The participant.
        participant: ParticipantName,
    },
    /// Delete the one-phase markers of `participant` for runs `epochs`
    /// (synced, after every record submitted before it).
    ClearMarkers {
        /// The participant.
        participant: ParticipantName,
        /// The earlier runs collected.
        epochs: Vec<u64>,
    },
    /// Ask `participant` (at its registered endpoint) for the one-phase
    /// commits of runs before this one (`Recover`); report
    /// [`Input::Collected`].
    Collect {
        /// The participant.
        participant: ParticipantName,
    },
    /// Send a phase-two message and report [`Input::Delivered`].
    SendDecision {
        /// The transaction.
        txn: TxnId,
        /// To whom.
        participant: ParticipantName,
        /// Where.
        endpoint: String,
        /// Commit or abort.
        decision: PhaseTwo,
    },
    /// Feed [`Input::Timer`] back at `at`.
    SetTimer {
        /// When.
        at: UnixMillis,
        /// Which.
        timer: Timer,
    },
}

/// Answers to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Begin succeeded.
    Begun {
        /// The new id.
        txn: TxnId,
        /// Its deadline.
        deadline: UnixMillis,
    },
    /// Enlist succeeded (also for a repeat).
    Enlisted {
        /// The transaction's deadline.
        deadline: UnixMillis,
    },
    /// The outcome of Commit or Execute.
    Outcome {
        /// The transaction.
        txn: TxnId,
        /// Committed or aborted with the reason.
        outcome: Outcome,
    },
    /// Abort succeeded (also when it was already aborted).
    Aborted {
        /// The transaction.
        txn: TxnId,
    },
    /// Status.
    Status(TxnStatus),
    /// QueryDecision.
    Decision(Decision),
    /// List.
    List(TxnList),
    /// The request cannot be carried out.
    Error(CoreError),
}

/// Why a request was refused. Each maps to one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// The id was never issued by this coordinator.
    #[error("transaction {0} was never begun by this coordinator")]
    NotFound(TxnId),
    /// Enlistment after Commit, Abort or the deadline.
    #[error("transaction {txn} no longer accepts participants: it is {state}")]
    EnlistmentClosed {
        /// The transaction.
        txn: TxnId,
        /// Where it is, in words.
        state: &'static str,
    },
    /// Abort after a commit decision.
    #[error("transaction {0} is already decided commit")]
    AlreadyCommitted(TxnId),
    /// A timeout above the configured maximum.
    #[error("timeout {asked_ms} ms is above the maximum {max_ms} ms")]
    TimeoutTooLong {
        /// Asked.
        asked_ms: u64,
        /// Allowed.
        max_ms: u64,
    },
    /// The transaction finished longer ago than the retention period.
    #[error("transaction {0} finished longer ago than the retention period; its outcome is no longer held")]
    Forgotten(TxnId),
    /// The decision log failed; the outcome is unknown until recovery.
    #[error("the decision log failed ({0}); the outcome is unknown until the coordinator recovers")]
    LogFailed(String),
    /// The transaction belongs to an earlier run that committed in one
    /// phase with participants not yet asked for their outcomes.
    #[error(
        "the outcome of transaction {txn} is not known yet: its coordinator run used one-phase commit, and {waiting} has not reported its one-phase outcomes since the restart; retry"
    )]
    OutcomeBeingCollected {
        /// The transaction.
        txn: TxnId,
        /// A participant still to answer.
        waiting: ParticipantName,
    },
    /// Abort of a transaction being committed in one phase: its outcome is
    /// its only participant's to report.
    #[error("transaction {0} is being committed in one phase; its participant decides the outcome")]
    OnePhaseInFlight(TxnId),
}

/// A participant as Status reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParticipantStatus {
    /// Name.
    pub name: ParticipantName,
    /// Endpoint.
    pub endpoint: String,
    /// Its vote, once known.
    pub vote: Option<Vote>,
    /// Phase two acknowledged (or not needed).
    pub acknowledged: bool,
    /// Failed deliveries so far.
    pub retries: u32,
}

/// What List reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnList {
    /// The transactions, oldest first.
    pub transactions: Vec<TxnStatus>,
    /// Transactions past phase one whose phase two is not finished.
    pub in_doubt: usize,
    /// Age of the oldest of those, in milliseconds (0 when none).
    pub oldest_in_doubt_ms: u64,
}

/// What Status reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnStatus {
    /// The transaction.
    pub txn: TxnId,
    /// Its state.
    pub state: TxnState,
    /// Why it aborted, when it did.
    pub abort_reason: Option<AbortReason>,
    /// Participants, when the details are still held.
    pub participants: Vec<ParticipantStatus>,
    /// The deadline, when known.
    pub deadline: Option<UnixMillis>,
    /// Phase two finished everywhere.
    pub finished: bool,
    /// Milliseconds since it began (or was decided, if recovered); 0 when
    /// not held.
    pub age_ms: u64,
    /// Answered from the presumed-abort rule or the horizon (forgotten),
    /// without details.
    pub presumed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Branch {
    endpoint: String,
    payload: Option<Vec<u8>>,
    vote: Option<Vote>,
    acked: bool,
    retries: u32,
    /// A phase-two message is in flight or a retry timer is set.
    delivering: bool,
    /// A retry timer is set (the last attempt failed).
    retry_scheduled: bool,
    /// The participant process that enlisted (0: unknown, or not enlisted
    /// by Enlist).
    incarnation: u64,
}

/// A transaction's participants, by name: a sorted vector, since a
/// transaction has few and is held (finished) for the whole retention
/// period, where a map's nodes would cost several times the entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct Branches(Vec<(ParticipantName, Branch)>);

impl Branches {
    fn position(&self, name: &ParticipantName) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.cmp(name))
    }

    fn insert(&mut self, name: ParticipantName, branch: Branch) {
        match self.position(&name) {
            Ok(i) => self.0[i].1 = branch,
            Err(i) => self.0.insert(i, (name, branch)),
        }
    }

    fn get(&self, name: &ParticipantName) -> Option<&Branch> {
        self.position(name).ok().map(|i| &self.0[i].1)
    }

    fn get_mut(&mut self, name: &ParticipantName) -> Option<&mut Branch> {
        self.position(name).ok().map(move |i| &mut self.0[i].1)
    }

    fn get_or_insert_with(&mut self, name: ParticipantName, make: impl FnOnce() -> Branch) -> &mut Branch {
        let i = match self.position(&name) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (name, make()));
                i
            }
        };
        &mut self.0[i].1
    }

    fn contains_key(&self, name: &ParticipantName) -> bool {
        self.position(name).is_ok()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (&ParticipantName, &Branch)> {
        self.0.iter().map(|(n, b)| (n, b))
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (&ParticipantName, &mut Branch)> {
        self.0.iter_mut().map(|(n, b)| (&*n, b))
    }

    fn values(&self) -> impl Iterator<Item = &Branch> {
        self.0.iter().map(|(_, b)| b)
    }
}

impl FromIterator<(ParticipantName, Branch)> for Branches {
    fn from_iter<I: IntoIterator<Item = (ParticipantName, Branch)>>(items: I) -> Self {
        let mut b = Branches::default();
        for (name, branch) in items {
            b.insert(name, branch);
        }
        b
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Txn {
    state: TxnState,
    deadline: UnixMillis,
    /// When it began (or, recovered, when it was decided).
    created: UnixMillis,
    participants: Branches,
    /// Commit/Execute callers waiting for the outcome.
    waiters: Vec<ReqId>,
    abort_reason: Option<AbortReason>,
    /// Phase two complete; the details are kept until the Forget timer.
    finished: bool,
    /// Writing the decision failed with this error: the outcome is unknown
    /// until a restart recovers it.
    log_failed: Option<String>,
    /// Committed (or being committed) in one phase.
    one_phase: bool,
    /// One phase: the commit is being recorded; the participant is released
    /// once the record is durable.
    recording: bool,
}

/// The coordinator's state machine. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Core {
    config: CoreConfig,
    epoch: u64,
    next_seq: u64,
    txns: BTreeMap<TxnId, Txn>,
    /// The highest id whose decision record was garbage-collected. A
    /// transaction at or below it that the core no longer holds may have
    /// committed long ago; one above it that the core does not hold never
    /// committed (presumed abort).
    horizon: Option<TxnId>,
    rng: u64,
    /// One-phase markers of this run, by participant.
    markers: BTreeMap<ParticipantName, Marker>,
    /// Earlier runs' one-phase markers not yet collected, by participant.
    uncollected: BTreeMap<ParticipantName, Vec<u64>>,
    /// Collected participants whose markers are deleted once the commits
    /// they reported are durably recorded: those transactions, and the
    /// markers' runs.
    clearing: BTreeMap<ParticipantName, (BTreeSet<TxnId>, Vec<u64>)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct Marker {
    durable: bool,
    /// One-phase transactions waiting for the marker.
    waiting: Vec<TxnId>,
}

impl Core {
    /// A core for coordinator run `epoch` (persisted by the driver, higher
    /// than every earlier run's).
    pub fn new(epoch: u64, config: CoreConfig) -> Self {
        assert!(epoch > 0, "epochs start at 1");
        let rng = config.seed | 1;
        Core {
            config,
            epoch,
            next_seq: 1,
            txns: BTreeMap::new(),
            horizon: None,
            rng,
            markers: BTreeMap::new(),
            uncollected: BTreeMap::new(),
            clearing: BTreeMap::new(),
        }
    }

    /// Loads the one-phase markers of earlier runs at start (after
    /// [`Core::recover`]): until each marked participant has reported its
    /// one-phase commits, the outcome of an unknown transaction of a marked
    /// run is not presumed. Returns the effects that ask them.
    pub fn recover_markers(&mut self, markers: Vec<(u64, ParticipantName)>) -> Vec<Effect> {
        for (epoch, participant) in markers {
            if epoch < self.epoch {
                self.uncollected.entry(participant).or_default().push(epoch);
            }
        }
        self.uncollected.keys().map(|p| Effect::Collect { participant: p.clone() }).collect()
    }

    /// How many participants [`Core::uncollected`] lists, without copying.
    pub fn uncollected_count(&self) -> usize {
        self.uncollected.len()
    }

    /// Participants whose one-phase outcomes of earlier runs are not yet
    /// collected. Read-only, for metrics and tests.
    pub fn uncollected(&self) -> Vec<ParticipantName> {
        self.uncollected.keys().cloned().collect()
    }

    /// This run's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Number of transactions not yet finished (for metrics and drain).
    pub fn unfinished(&self) -> usize {
        self.txns.values().filter(|t| !t.finished).count()
    }

    /// Where `txn` is, whether its phase two is finished, and its abort code
    /// if it aborted; `None` when not held. Read-only, for the driver's
    /// metrics.
    pub fn progress(&self, txn: TxnId) -> Option<(TxnState, bool, Option<AbortCode>)> {
        self.txns.get(&txn).map(|t| (t.state, t.finished, t.abort_reason.as_ref().map(|r| r.code)))
    }

    /// Why `txn` aborted, when it did and is held. Read-only, for the
    /// driver's timelines.
    pub fn abort_reason(&self, txn: TxnId) -> Option<&AbortReason> {
        self.txns.get(&txn).and_then(|t| t.abort_reason.as_ref())
    }

    /// The participant of `txn` if it is committed, or being committed, in
    /// one phase. Read-only, for the driver's timelines.
    pub fn one_phase_participant(&self, txn: TxnId) -> Option<&ParticipantName> {
        self.txns.get(&txn).filter(|t| t.one_phase).and_then(|t| t.participants.0.first()).map(|(n, _)| n)
    }

    /// How many transactions are in doubt (as [`Reply::List`] counts them)
    /// and the age of the oldest in milliseconds (0 when none). Read-only,
    /// for the driver's metrics.
    pub fn in_doubt_summary(&self, now: UnixMillis) -> (usize, u64) {
        self.txns.values().filter(|t| in_doubt(t)).fold((0, 0), |(n, oldest), t| (n + 1, oldest.max(now.0.saturating_sub(t.created.0))))
    }

    /// Loads the decision log at start. Every COMMIT not ended resumes
    /// delivery; ended ones are held (answering Status and QueryDecision)
    /// until their retention ends and they are forgotten. `horizon` is the
    /// persisted garbage-collection horizon. Returns the effects that resume
    /// phase two and schedule forgetting.
    pub fn recover(&mut self, now: UnixMillis, records: Vec<(TxnId, DecisionRecord)>, horizon: Option<TxnId>) -> Vec<Effect> {
        let mut out = Vec::new();
        self.horizon = horizon;
        for (txn, record) in records {
            let mut participants = Branches::default();
            for p in record.participants {
                let Ok(name) = ParticipantName::new(p.name) else { continue };
                let branch = Branch {
                    endpoint: p.endpoint,
                    payload: None,
                    vote: Some(Vote::Yes),
                    acked: record.ended,
                    retries: 0,
                    delivering: false,
                    retry_scheduled: false,
                    incarnation: 0,
                };
                participants.insert(name, branch);
            }
            let decided = UnixMillis(record.decided_unix_ms);
            let t = Txn {
                state: TxnState::Committed,
                deadline: decided,
                created: decided,
                participants,
                waiters: Vec::new(),
                abort_reason: None,
                finished: record.ended,
                log_failed: None,
                one_phase: false,
                recording: false,
            };
            self.txns.insert(txn, t);
            if record.ended {
                let at = decided.plus(self.config.retention_ms).max(now);
                out.push(Effect::SetTimer { at, timer: Timer::Forget(txn) });
            } else {
                // The record was read back from the log: it is durable.
                self.send_phase_two(&mut out, now, txn, PhaseTwo::Commit(DecisionDurable { _private: () }));
            }
        }
        out
    }

    /// Advances the state machine by one input.
    pub fn step(&mut self, now: UnixMillis, input: Input) -> Vec<Effect> {
        let mut out = Vec::new();
        match input {
            Input::Begin { req, timeout_ms } => match self.begin(now, timeout_ms, Branches::default()) {
                Ok((txn, deadline, timer)) => {
                    out.push(timer);
                    out.push(reply(req, Reply::Begun { txn, deadline }));
                }
                Err(e) => out.push(reply(req, Reply::Error(e))),
            },
            Input::Enlist { req, txn, participant, endpoint, incarnation } => {
                self.enlist(&mut out, now, req, txn, participant, endpoint, incarnation)
            }
            Input::Commit { req, txn } => self.commit(&mut out, now, req, txn),
            Input::Abort { req, txn, detail } => {
                let detail = if detail.is_empty() { "aborted by the initiator".to_owned() } else { detail };
                self.abort_request(&mut out, now, req, txn, AbortReason::new(AbortCode::AbortedByClient, detail))
            }
            Input::Shutdown { req, txn } => {
                let reason = AbortReason::new(AbortCode::CoordinatorShutdown, "not decided when the coordinator's drain ended");
                self.abort_request(&mut out, now, req, txn, reason)
            }
            Input::Execute { req, branches, timeout_ms } => {
                let parts = branches
                    .into_iter()
                    .map(|b| {
                        let branch = Branch {
                            endpoint: b.endpoint,
                            payload: Some(b.payload),
                            vote: None,
                            acked: false,
                            retries: 0,
                            delivering: false,
                            retry_scheduled: false,
                            incarnation: 0,
                        };
                        (b.participant, branch)
                    })
                    .collect();
                match self.begin(now, timeout_ms, parts) {
                    Ok((txn, _, timer)) => {
                        out.push(timer);
                        self.commit(&mut out, now, req, txn);
                    }
                    Err(e) => out.push(reply(req, Reply::Error(e))),
                }
            }
            Input::Status { req, txn } => {
                let r = self.status(now, txn);
                out.push(reply(req, r));
            }
            Input::List { req, in_doubt_only, limit, filter } => {
                let doubtful: Vec<TxnId> = self.txns.iter().filter(|(_, t)| in_doubt(t)).map(|(id, _)| *id).collect();
                let oldest_in_doubt_ms =
                    doubtful.iter().filter_map(|id| self.txns.get(id)).map(|t| now.0.saturating_sub(t.created.0)).max().unwrap_or(0);
                let transactions = self
                    .txns
                    .iter()
                    .filter(|(_, t)| (!in_doubt_only || in_doubt(t)) && filter.matches(now, t))
                    .take(limit)
                    .filter_map(|(id, _)| match self.status(now, *id) {
                        Reply::Status(s) => Some(s),
                        _ => None,
                    })
                    .collect();
                out.push(reply(req, Reply::List(TxnList { transactions, in_doubt: doubtful.len(), oldest_in_doubt_ms })));
            }
            Input::QueryDecision { req, txn } => {
                let d = match self.txns.get(&txn) {
                    Some(t) => match t.state {
                        TxnState::Active | TxnState::Preparing | TxnState::Deciding => Decision::Pending,
                        TxnState::Committed => Decision::Commit,
                        TxnState::Aborted | TxnState::Forgotten => Decision::Abort,
                    },
                    // Presumed abort: no record of a commit means abort. (A
                    // forgotten commit is never asked about: every
                    // participant acknowledged it before it was forgotten.)
                    None => Decision::Abort,
                };
                out.push(reply(req, Reply::Decision(d)));
            }
            Input::Voted { txn, participant, vote } => self.voted(&mut out, now, txn, participant, vote),
            Input::Delivered { txn, participant, result } => self.delivered(&mut out, now, txn, participant, result),
            Input::Durable { txn } => self.durable(&mut out, now, txn),
            Input::PersistFailed { txn, error } => {
                if let Some(t) = self.txns.get_mut(&txn)
                    && t.state == TxnState::Committed
                    && t.recording
                {
                    // A one-phase commit (the participant's, durable) could
                    // not be recorded here. The participant keeps its record
                    // unreleased, and the marker stays: the next start
                    // collects it again. Until then it stays in doubt.
                    t.log_failed = Some(error);
                } else if let Some(t) = self.txns.get_mut(&txn)
                    && t.state == TxnState::Deciding
                {
                    // The decision may or may not be on disk. Stay in
                    // Deciding (QueryDecision answers Pending) and tell the
                    // callers — and any later Commit — that the outcome is
                    // unknown; recovery settles it.
                    t.log_failed = Some(error.clone());
                    for w in std::mem::take(&mut t.waiters) {
                        out.push(reply(w, Reply::Error(CoreError::LogFailed(error.clone()))));
                    }
                }
            }
            Input::MarkerDurable { participant } => {
                let Some(m) = self.markers.get_mut(&participant) else { return out };
                m.durable = true;
                for txn in std::mem::take(&mut m.waiting) {
                    self.send_one_phase(&mut out, txn);
                }
            }
            Input::MarkerFailed { participant, error } => {
                // Nothing was sent to the waiting transactions: abort them.
                // The next one-phase transaction writes the marker again.
                let Some(m) = self.markers.remove(&participant) else { return out };
                for txn in m.waiting {
                    if self.txns.get(&txn).is_some_and(|t| t.state == TxnState::Preparing) {
                        let reason = AbortReason::at(
                            AbortCode::PrepareFailed,
                            &participant,
                            format!("could not record the use of one-phase commit: {error}"),
                        );
                        self.abort(&mut out, now, txn, reason);
                    }
                }
            }
            Input::Collected { participant, endpoint, result } => self.collected(&mut out, now, participant, endpoint, result),
            Input::Timer(timer) => self.timer(&mut out, now, timer),
        }
        out
    }

    /// Sends the one-phase Prepare of `txn` (its marker is durable), unless
    /// it was answered meanwhile.
    fn send_one_phase(&mut self, out: &mut Vec<Effect>, txn: TxnId) {
        let Some(t) = self.txns.get_mut(&txn) else { return };
        if t.state != TxnState::Preparing || !t.one_phase {
            return;
        }
        let deadline = t.deadline;
        if let Some((name, b)) = t.participants.0.first_mut()
            && b.vote.is_none()
        {
            b.delivering = true;
            out.push(Effect::SendPrepare {
                txn,
                participant: name.clone(),
                endpoint: b.endpoint.clone(),
                // Kept: a one-phase Prepare is sent again until answered.
                payload: b.payload.clone(),
                deadline,
                one_phase: true,
            });
        }
    }

    fn collected(
        &mut self,
        out: &mut Vec<Effect>,
        now: UnixMillis,
        participant: ParticipantName,
        endpoint: String,
        result: Result<Vec<TxnId>, String>,
    ) {
        if !self.uncollected.contains_key(&participant) {
            return;
        }
        let txns = match result {
            Ok(txns) => txns,
            Err(_) => {
                let at = now.plus(self.config.retry_max_ms);
                out.push(Effect::SetTimer { at, timer: Timer::Collect(participant) });
                return;
            }
        };
        let epochs = self.uncollected.remove(&participant).unwrap_or_default();
        let mut recording = BTreeSet::new();
        for txn in txns {
            if txn.epoch >= self.epoch {
                continue;
            }
            if let Some(t) = self.txns.get_mut(&txn) {
                // Held: recorded already. If it was released and finished,
                // the participant lost the release (a lazy write, in a
                // machine crash): release it again.
                if t.state == TxnState::Committed
                    && t.finished
                    && let Some(b) = t.participants.get_mut(&participant)
                {
                    t.finished = false;
                    b.acked = false;
                    b.delivering = false;
                    b.retry_scheduled = false;
                    self.send_phase_two(out, now, txn, PhaseTwo::Commit(DecisionDurable { _private: () }));
                }
                continue;
            }
            // An unreleased one-phase commit is committed, whatever run it
            // belongs to (also one whose markers were collected before).
            recording.insert(txn);
            let branch = Branch {
                endpoint: endpoint.clone(),
                payload: None,
                vote: Some(Vote::Committed),
                acked: false,
                retries: 0,
                delivering: false,
                retry_scheduled: false,
                incarnation: 0,
            };
            self.txns.insert(
                txn,
                Txn {
                    state: TxnState::Committed,
                    deadline: now,
                    created: now,
                    participants: std::iter::once((participant.clone(), branch)).collect(),
                    waiters: Vec::new(),
                    abort_reason: None,
                    finished: false,
                    log_failed: None,
                    one_phase: true,
                    recording: true,
                },
            );
            out.push(Effect::PersistDecision {
                txn,
                record: DecisionRecord {
                    participants: vec![LoggedParticipant { name: participant.as_str().to_owned(), endpoint: endpoint.clone() }],
                    decided_unix_ms: now.0,
                    ended: false,
                },
                synced: true,
            });
        }
        // Deleted once the records above are durable, so that a crash or
        // a failed write in between only collects again.
        if recording.is_empty() {
            out.push(Effect::ClearMarkers { participant, epochs });
        } else {
            self.clearing.insert(participant, (recording, epochs));
        }
    }

    /// Not held, and at or below the horizon: it may have committed and been
    /// garbage-collected, so its outcome is no longer known.
    fn forgotten(&self, txn: TxnId) -> bool {
        !self.txns.contains_key(&txn) && self.horizon.is_some_and(|h| txn <= h)
    }

    /// Not held, of an earlier run that used one-phase commit with a
    /// participant not collected yet: it may have committed there.
    fn collecting(&self, txn: TxnId) -> Option<CoreError> {
        if self.txns.contains_key(&txn) || txn.epoch >= self.epoch {
            return None;
        }
        let (waiting, _) = self.uncollected.iter().find(|(_, epochs)| epochs.contains(&txn.epoch))?;
        Some(CoreError::OutcomeBeingCollected { txn, waiting: waiting.clone() })
    }

    fn issued(&self, txn: TxnId) -> bool {
        txn.epoch < self.epoch || (txn.epoch == self.epoch && txn.seq < self.next_seq)
    }

    fn begin(&mut self, now: UnixMillis, timeout_ms: u64, participants: Branches) -> Result<(TxnId, UnixMillis, Effect), CoreError> {
        let timeout = if timeout_ms == 0 { self.config.default_timeout_ms } else { timeout_ms };
        if timeout > self.config.max_timeout_ms {
            return Err(CoreError::TimeoutTooLong { asked_ms: timeout, max_ms: self.config.max_timeout_ms });
        }
        let txn = TxnId { epoch: self.epoch, seq: self.next_seq };
        self.next_seq += 1;
        let deadline = now.plus(timeout);
        self.txns.insert(
            txn,
            Txn {
                state: TxnState::Active,
                deadline,
                created: now,
                participants,
                waiters: Vec::new(),
                abort_reason: None,
                finished: false,
                log_failed: None,
                one_phase: false,
                recording: false,
            },
        );
        Ok((txn, deadline, Effect::SetTimer { at: deadline, timer: Timer::Deadline(txn) }))
    }

    #[allow(clippy::too_many_arguments)]
    fn enlist(
        &mut self,
        out: &mut Vec<Effect>,
        now: UnixMillis,
        req: ReqId,
        txn: TxnId,
        participant: ParticipantName,
        endpoint: String,
        incarnation: u64,
    ) {
        let Some(t) = self.txns.get_mut(&txn) else {
            let e = if self.issued(txn) { CoreError::EnlistmentClosed { txn, state: "finished" } } else { CoreError::NotFound(txn) };
            out.push(reply(req, Reply::Error(e)));
            return;
        };
        if t.state == TxnState::Active && now >= t.deadline {
            // The deadline timer has not fired yet; act as if it had.
            self.abort(out, now, txn, AbortReason::new(AbortCode::DeadlineExceeded, "deadline passed before commit"));
            out.push(reply(req, Reply::Error(CoreError::EnlistmentClosed { txn, state: "aborted" })));
            return;
        }
        let Some(t) = self.txns.get_mut(&txn) else { return };
        if t.state == TxnState::Active
            && let Some(b) = t.participants.get(&participant)
            && b.incarnation != 0
            && incarnation != 0
            && b.incarnation != incarnation
        {
            // The participant restarted since it enlisted: the work it did
            // for this transaction before the restart (unprepared, so only
            // in its memory) is gone. Committing would apply only part of it.
            let reason = AbortReason::at(
                AbortCode::ParticipantRestarted,
                &participant,
                "the participant restarted after doing work for the transaction; that work is lost",
            );
            self.abort(out, now, txn, reason);
            out.push(reply(req, Reply::Error(CoreError::EnlistmentClosed { txn, state: "aborted" })));
            return;
        }
        let Some(t) = self.txns.get_mut(&txn) else { return };
        match t.state {
            TxnState::Active => {
                let b = t.participants.get_or_insert_with(participant, || Branch {
                    incarnation,
                    endpoint: endpoint.clone(),
                    payload: None,
                    vote: None,
                    acked: false,
                    retries: 0,
                    delivering: false,
                    retry_scheduled: false,
                });
                // A participant that moved re-enlists with its new address.
                b.endpoint = endpoint;
                if b.incarnation == 0 {
                    b.incarnation = incarnation;
                }
                out.push(reply(req, Reply::Enlisted { deadline: t.deadline }));
            }
            state => {
                let state = match state {
                    TxnState::Preparing | TxnState::Deciding => "committing",
                    TxnState::Committed => "committed",
                    _ => "aborted",
                };
                out.push(reply(req, Reply::Error(CoreError::EnlistmentClosed { txn, state })));
            }
        }
    }

    fn commit(&mut self, out: &mut Vec<Effect>, now: UnixMillis, req: ReqId, txn: TxnId) {
        let Some(t) = self.txns.get_mut(&txn) else {
            let r = if self.forgotten(txn) {
                Reply::Error(CoreError::Forgotten(txn))
            } else if let Some(e) = self.collecting(txn) {
                Reply::Error(e)
            } else if self.issued(txn) {
                Reply::Outcome { txn, outcome: Outcome::Aborted(presumed_reason()) }
            } else {
                Reply::Error(CoreError::NotFound(txn))
            };
            out.push(reply(req, r));
            return;
        };
        match t.state {
            TxnState::Active if now >= t.deadline => {
                t.waiters.push(req);
                self.abort(out, now, txn, AbortReason::new(AbortCode::DeadlineExceeded, "deadline passed before commit"));
            }
            TxnState::Active if t.participants.is_empty() => {
                // Nothing to commit anywhere: trivially committed. The
                // outcome is recorded lazily (an ended record with no
                // participants), so that Status and retried Commits still
                // say COMMITTED after a restart; losing it in a machine crash
                // only changes what Status says about a transaction that
                // changed nothing.
                t.state = TxnState::Committed;
                t.finished = true;
                out.push(reply(req, Reply::Outcome { txn, outcome: Outcome::Committed }));
                out.push(Effect::PersistDecision {
                    txn,
                    record: DecisionRecord { participants: Vec::new(), decided_unix_ms: now.0, ended: true },
                    synced: false,
                });
                out.push(Effect::SetTimer { at: now.plus(self.config.retention_ms), timer: Timer::Forget(txn) });
            }
            TxnState::Active if self.config.one_phase && t.participants.0.len() == 1 => {
                t.state = TxnState::Preparing;
                t.one_phase = true;
                t.waiters.push(req);
                let at = now.plus(self.config.prepare_timeout_ms).min(t.deadline);
                out.push(Effect::SetTimer { at, timer: Timer::PrepareTimeout(txn) });
                let name = t.participants.0[0].0.clone();
                match self.markers.get_mut(&name) {
                    Some(m) if m.durable => self.send_one_phase(out, txn),
                    Some(m) => m.waiting.push(txn),
                    None => {
                        self.markers.insert(name.clone(), Marker { durable: false, waiting: vec![txn] });
                        out.push(Effect::PersistMarker { participant: name });
                    }
                }
            }
            TxnState::Active => {
                t.state = TxnState::Preparing;
                t.waiters.push(req);
                // The payloads leave with their Prepares: a Prepare is never
                // sent twice, and a transaction is held long after.
                for (name, b) in t.participants.iter_mut() {
                    out.push(Effect::SendPrepare {
                        txn,
                        participant: name.clone(),
                        endpoint: b.endpoint.clone(),
                        payload: b.payload.take(),
                        deadline: t.deadline,
                        one_phase: false,
                    });
                }
                let at = now.plus(self.config.prepare_timeout_ms).min(t.deadline);
                out.push(Effect::SetTimer { at, timer: Timer::PrepareTimeout(txn) });
            }
            TxnState::Deciding if t.log_failed.is_some() => {
                let error = t.log_failed.clone().unwrap_or_default();
                out.push(reply(req, Reply::Error(CoreError::LogFailed(error))));
            }
            TxnState::Preparing | TxnState::Deciding => t.waiters.push(req),
            TxnState::Committed => out.push(reply(req, Reply::Outcome { txn, outcome: Outcome::Committed })),
            TxnState::Aborted | TxnState::Forgotten => {
                let reason = t.abort_reason.clone().unwrap_or_else(presumed_reason);
                out.push(reply(req, Reply::Outcome { txn, outcome: Outcome::Aborted(reason) }));
            }
        }
    }

    fn abort_request(&mut self, out: &mut Vec<Effect>, now: UnixMillis, req: ReqId, txn: TxnId, reason: AbortReason) {
        let r = match self.txns.get(&txn).map(|t| (t.state, t.one_phase)) {
            Some((TxnState::Preparing, true)) => Reply::Error(CoreError::OnePhaseInFlight(txn)),
            Some((TxnState::Active | TxnState::Preparing, _)) => {
                self.abort(out, now, txn, reason);
                Reply::Aborted { txn }
            }
            // (Forgotten is only ever reported, never held.)
            Some((TxnState::Aborted | TxnState::Forgotten, _)) => Reply::Aborted { txn },
            Some((TxnState::Deciding | TxnState::Committed, _)) => Reply::Error(CoreError::AlreadyCommitted(txn)),
            None if self.forgotten(txn) => Reply::Error(CoreError::Forgotten(txn)),
            None if let Some(e) = self.collecting(txn) => Reply::Error(e),
            None if self.issued(txn) => Reply::Aborted { txn },
            None => Reply::Error(CoreError::NotFound(txn)),
        };
        out.push(reply(req, r));
    }

    fn voted(&mut self, out: &mut Vec<Effect>, now: UnixMillis, txn: TxnId, participant: ParticipantName, vote: Result<Vote, String>) {
        let Some(t) = self.txns.get_mut(&txn) else { return };
        let Some(b) = t.participants.get_mut(&participant) else { return };
        if t.state != TxnState::Preparing {
            // A late vote. If the transaction aborted meanwhile and this
            // participant did prepare, make sure it hears the abort.
            if t.state == TxnState::Aborted && vote == Ok(Vote::Yes) && b.vote.is_none() {
                b.vote = Some(Vote::Yes);
                b.acked = false;
                b.retries = 0;
                if !b.delivering {
                    b.delivering = true;
                    out.push(Effect::SendDecision { txn, participant, endpoint: b.endpoint.clone(), decision: PhaseTwo::Abort });
                }
            }
            return;
        }
        if b.vote.is_some() {
            return; // duplicate
        }
        if t.one_phase {
            b.delivering = false;
            if vote.is_ok() {
                // Answered: the payload is never sent again.
                b.payload = None;
            }
            match vote {
                Ok(Vote::Committed) => {
                    // The participant's durable commit is the decision.
                    // Record it (off the callers' path); release the
                    // participant's record once ours is durable.
                    b.vote = Some(Vote::Committed);
                    t.state = TxnState::Committed;
                    t.recording = true;
                    for w in std::mem::take(&mut t.waiters) {
                        out.push(reply(w, Reply::Outcome { txn, outcome: Outcome::Committed }));
                    }
                    let record = DecisionRecord {
                        participants: vec![LoggedParticipant { name: participant.as_str().to_owned(), endpoint: b.endpoint.clone() }],
                        decided_unix_ms: now.0,
                        ended: false,
                    };
                    out.push(Effect::PersistDecision { txn, record, synced: true });
                    return;
                }
                Err(_) => {
                    // Unknown whether it committed: ask again (the same
                    // Prepare is answered with the same outcome).
                    b.retries += 1;
                    if !b.retry_scheduled {
                        b.retry_scheduled = true;
                        let delay = backoff(&mut self.rng, b.retries, self.config.retry_base_ms, self.config.retry_max_ms);
                        out.push(Effect::SetTimer { at: now.plus(delay), timer: Timer::Retry(txn, participant) });
                    }
                    return;
                }
                // A participant that does not know one-phase commit answers
                // YES: carry on with two phases. NO and READ_ONLY mean the
                // same in both.
                Ok(_) => t.one_phase = false,
            }
        }
        match vote {
            Ok(Vote::No(detail)) => {
                b.vote = Some(Vote::No(detail.clone()));
                // A NO voter has aborted its branch already.
                b.acked = true;
                self.abort(out, now, txn, AbortReason::at(AbortCode::ParticipantVotedNo, &participant, detail));
            }
            Err(e) => self.abort(out, now, txn, AbortReason::at(AbortCode::PrepareFailed, &participant, e)),
            Ok(Vote::Committed) => {
                let e = "answered COMMITTED to a two-phase prepare".to_owned();
                self.abort(out, now, txn, AbortReason::at(AbortCode::PrepareFailed, &participant, e))
            }
            Ok(v) => {
                if v == Vote::ReadOnly {
                    b.acked = true;
                }
                b.vote = Some(v);
                if t.participants.values().all(|b| b.vote.is_some()) {
                    let yes: Vec<LoggedParticipant> = t
                        .participants
                        .iter()
                        .filter(|(_, b)| b.vote == Some(Vote::Yes))
                        .map(|(n, b)| LoggedParticipant { name: n.as_str().to_owned(), endpoint: b.endpoint.clone() })
                        .collect();
                    if yes.is_empty() {
                        // Every participant is read-only: nothing to force
                        // or deliver. Recorded lazily, as for an empty
                        // transaction (see `commit`).
                        t.state = TxnState::Committed;
                        t.finished = true;
                        for w in std::mem::take(&mut t.waiters) {
                            out.push(reply(w, Reply::Outcome { txn, outcome: Outcome::Committed }));
                        }
                        out.push(Effect::PersistDecision {
                            txn,
                            record: DecisionRecord { participants: Vec::new(), decided_unix_ms: now.0, ended: true },
                            synced: false,
                        });
                        out.push(Effect::SetTimer { at: now.plus(self.config.retention_ms), timer: Timer::Forget(txn) });
                    } else {
                        t.state = TxnState::Deciding;
                        out.push(Effect::PersistDecision {
                            txn,
                            record: DecisionRecord { participants: yes, decided_unix_ms: now.0, ended: false },
                            synced: true,
                        });
                    }
                }
            }
        }
    }

    fn durable(&mut self, out: &mut Vec<Effect>, now: UnixMillis, txn: TxnId) {
        let Some(t) = self.txns.get_mut(&txn) else { return };
        if t.state == TxnState::Committed && t.recording {
            // A one-phase commit is recorded: the participant may release.
            t.recording = false;
            self.send_phase_two(out, now, txn, PhaseTwo::Commit(DecisionDurable { _private: () }));
            let done: Vec<ParticipantName> = self
                .clearing
                .iter_mut()
                .filter_map(|(p, (pending, _))| (pending.remove(&txn) && pending.is_empty()).then(|| p.clone()))
                .collect();
            for participant in done {
                if let Some((_, epochs)) = self.clearing.remove(&participant) {
                    out.push(Effect::ClearMarkers { participant, epochs });
                }
            }
            return;
        }
        if t.state != TxnState::Deciding {
            return;
        }
        t.state = TxnState::Committed;
        for w in std::mem::take(&mut t.waiters) {
            out.push(reply(w, Reply::Outcome { txn, outcome: Outcome::Committed }));
        }
        self.send_phase_two(out, now, txn, PhaseTwo::Commit(DecisionDurable { _private: () }));
    }

    /// Decides abort (never logged: presumed abort) and tells everyone who
    /// may hold work for the transaction.
    fn abort(&mut self, out: &mut Vec<Effect>, now: UnixMillis, txn: TxnId, reason: AbortReason) {
        let Some(t) = self.txns.get_mut(&txn) else { return };
        assert!(
            matches!(t.state, TxnState::Active | TxnState::Preparing),
            "abort of {txn} in state {:?}: a decision never changes",
            t.state
        );
        t.state = TxnState::Aborted;
        for w in std::mem::take(&mut t.waiters) {
            out.push(reply(w, Reply::Outcome { txn, outcome: Outcome::Aborted(reason.clone()) }));
        }
        t.abort_reason = Some(reason);
        self.send_phase_two(out, now, txn, PhaseTwo::Abort);
    }

    fn send_phase_two(&mut self, out: &mut Vec<Effect>, now: UnixMillis, txn: TxnId, decision: PhaseTwo) {
        let Some(t) = self.txns.get_mut(&txn) else { return };
        for (name, b) in t.participants.iter_mut() {
            if b.acked || b.delivering {
                continue;
            }
            b.delivering = true;
            out.push(Effect::SendDecision { txn, participant: name.clone(), endpoint: b.endpoint.clone(), decision });
        }
        self.maybe_finish(out, now, txn);
    }

    fn delivered(&mut self, out: &mut Vec<Effect>, now: UnixMillis, txn: TxnId, participant: ParticipantName, result: Result<(), String>) {
        let base = self.config.retry_base_ms;
        let max = self.config.retry_max_ms;
        let attempts = self.config.abort_delivery_attempts;
        let Some(t) = self.txns.get_mut(&txn) else { return };
        let state = t.state;
        let Some(b) = t.participants.get_mut(&participant) else { return };
        // Only a result for a phase-two message this core sent counts: an
        // ack before the decision, or a second result for one message, is
        // stale.
        if b.acked || !b.delivering || b.retry_scheduled || !matches!(state, TxnState::Committed | TxnState::Aborted) {
            return;
        }
        match result {
            Ok(()) => {
                b.acked = true;
                b.delivering = false;
                self.maybe_finish(out, now, txn);
            }
            Err(_) => {
                b.retries += 1;
                if state == TxnState::Aborted && b.retries >= attempts {
                    // Give up on abort delivery: a prepared participant asks
                    // (and is told abort); an unprepared one aborts at its
                    // deadline.
                    b.acked = true;
                    b.delivering = false;
                    self.maybe_finish(out, now, txn);
                    return;
                }
                b.retry_scheduled = true;
                let delay = backoff(&mut self.rng, b.retries, base, max);
                out.push(Effect::SetTimer { at: now.plus(delay), timer: Timer::Retry(txn, participant) });
            }
        }
    }

    fn maybe_finish(&mut self, out: &mut Vec<Effect>, now: UnixMillis, txn: TxnId) {
        let Some(t) = self.txns.get_mut(&txn) else { return };
        if t.finished || !matches!(t.state, TxnState::Committed | TxnState::Aborted) || !t.participants.values().all(|b| b.acked) {
            return;
        }
        t.finished = true;
        if t.state == TxnState::Committed {
            let participants = t
                .participants
                .iter()
                .filter(|(_, b)| matches!(b.vote, Some(Vote::Yes | Vote::Committed)))
                .map(|(n, b)| LoggedParticipant { name: n.as_str().to_owned(), endpoint: b.endpoint.clone() })
                .collect();
            out.push(Effect::PersistDecision {
                txn,
                record: DecisionRecord { participants, decided_unix_ms: now.0, ended: true },
                synced: false,
            });
        }
        out.push(Effect::SetTimer { at: now.plus(self.config.retention_ms), timer: Timer::Forget(txn) });
    }

    fn timer(&mut self, out: &mut Vec<Effect>, now: UnixMillis, timer: Timer) {
        match timer {
            Timer::Deadline(txn) => {
                // A one-phase Prepare may have committed: its participant
                // decides (and refuses it once the deadline has passed).
                if let Some(t) = self.txns.get(&txn)
                    && matches!(t.state, TxnState::Active | TxnState::Preparing)
                    && !(t.one_phase && t.state == TxnState::Preparing)
                {
                    self.abort(out, now, txn, AbortReason::new(AbortCode::DeadlineExceeded, "deadline passed before a decision"));
                }
            }
            Timer::PrepareTimeout(txn) => {
                if let Some(t) = self.txns.get_mut(&txn)
                    && t.state == TxnState::Preparing
                    && t.one_phase
                {
                    // No answer yet: ask again (unless a retry is set or the
                    // marker is still being written), and keep waiting.
                    let at = now.plus(self.config.prepare_timeout_ms);
                    out.push(Effect::SetTimer { at, timer: Timer::PrepareTimeout(txn) });
                    let name = t.participants.0.first().map(|(n, _)| n.clone());
                    let idle = t.participants.values().all(|b| !b.retry_scheduled);
                    if idle && name.and_then(|n| self.markers.get(&n)).is_some_and(|m| m.durable) {
                        self.send_one_phase(out, txn);
                    }
                } else if let Some(t) = self.txns.get(&txn)
                    && t.state == TxnState::Preparing
                {
                    let silent: Vec<&str> = t.participants.iter().filter(|(_, b)| b.vote.is_none()).map(|(n, _)| n.as_str()).collect();
                    let reason = match t.participants.iter().find(|(_, b)| b.vote.is_none()) {
                        Some((first, _)) => {
                            AbortReason::at(AbortCode::PrepareTimeout, first, format!("no vote in time from {}", silent.join(", ")))
                        }
                        None => AbortReason::new(AbortCode::PrepareTimeout, "votes came too late"),
                    };
                    self.abort(out, now, txn, reason);
                }
            }
            Timer::Retry(txn, participant) => {
                let Some(t) = self.txns.get_mut(&txn) else { return };
                if t.state == TxnState::Preparing && t.one_phase {
                    if let Some(b) = t.participants.get_mut(&participant)
                        && std::mem::take(&mut b.retry_scheduled)
                    {
                        self.send_one_phase(out, txn);
                    }
                    return;
                }
                let decision = match t.state {
                    // Only reachable after durable(): recovery or the
                    // Durable input made the decision, so the proof holds.
                    TxnState::Committed => PhaseTwo::Commit(DecisionDurable { _private: () }),
                    TxnState::Aborted => PhaseTwo::Abort,
                    _ => return,
                };
                if let Some(b) = t.participants.get_mut(&participant)
                    && !b.acked
                    && b.retry_scheduled
                {
                    b.retry_scheduled = false;
                    out.push(Effect::SendDecision { txn, participant, endpoint: b.endpoint.clone(), decision });
                }
            }
            Timer::Collect(participant) => {
                if self.uncollected.contains_key(&participant) {
                    out.push(Effect::Collect { participant });
                }
            }
            Timer::Forget(txn) => {
                if let Some(t) = self.txns.get(&txn)
                    && t.finished
                {
                    if t.state == TxnState::Committed {
                        // Its decision record (if it has one) goes too;
                        // raise the horizon so Status never presumes a
                        // commit aborted.
                        let horizon = self.horizon.map_or(txn, |h| h.max(txn));
                        self.horizon = Some(horizon);
                        out.push(Effect::ForgetDecision { txn, horizon });
                    }
                    self.txns.remove(&txn);
                }
            }
        }
    }

    fn status(&self, now: UnixMillis, txn: TxnId) -> Reply {
        if let Some(t) = self.txns.get(&txn) {
            return Reply::Status(TxnStatus {
                txn,
                state: t.state,
                abort_reason: t.abort_reason.clone(),
                participants: t
                    .participants
                    .iter()
                    .map(|(n, b)| ParticipantStatus {
                        name: n.clone(),
                        endpoint: b.endpoint.clone(),
                        vote: b.vote.clone(),
                        acknowledged: b.acked,
                        retries: b.retries,
                    })
                    .collect(),
                deadline: Some(t.deadline),
                finished: t.finished,
                age_ms: now.0.saturating_sub(t.created.0),
                presumed: false,
            });
        }
        let brief = |state, abort_reason| TxnStatus {
            txn,
            state,
            abort_reason,
            participants: Vec::new(),
            deadline: None,
            finished: true,
            age_ms: 0,
            presumed: true,
        };
        if self.forgotten(txn) {
            Reply::Status(brief(TxnState::Forgotten, None))
        } else if let Some(e) = self.collecting(txn) {
            Reply::Error(e)
        } else if self.issued(txn) {
            Reply::Status(brief(TxnState::Aborted, Some(presumed_reason())))
        } else {
            Reply::Error(CoreError::NotFound(txn))
        }
    }
}

/// Past phase one and not finished: participants may be prepared and
/// waiting for the outcome.
fn in_doubt(t: &Txn) -> bool {
    !t.finished && t.state != TxnState::Active
}

/// Exponential backoff with full jitter in [cap/2, cap].
fn backoff(rng: &mut u64, retries: u32, base: u64, max: u64) -> u64 {
    let cap = base.saturating_mul(1u64 << retries.min(20)).min(max).max(1);
    cap / 2 + twopc_proto::jitter(rng) % (cap / 2 + 1)
}

fn reply(req: ReqId, reply: Reply) -> Effect {
    Effect::Reply { req, reply }
}

fn presumed_reason() -> AbortReason {
    AbortReason::new(AbortCode::PresumedAbort, "the coordinator holds no commit decision for this transaction")
}
