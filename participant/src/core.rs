//! The participant's protocol core: one branch of each transaction, as a
//! deterministic state machine.
//!
//! [`Core::step`] takes the time and one [`Input`] and returns [`Effect`]s as
//! data; the driver performs them (enlist with the coordinator, ask the
//! resource to prepare, write the prepared log, apply the outcome, ask the
//! coordinator for a decision) and feeds the results back.
//!
//! Invariants kept here:
//! - Persist before vote: YES is only ever sent as [`SentVote::Yes`], which
//!   needs a [`PreparedDurable`] witness that this module makes only when the
//!   log reports the PREPARED record durable, or at recovery from that
//!   record.
//! - A prepared branch never decides alone: it commits or aborts only when
//!   the coordinator says so (Commit, Abort, or a QueryDecision answer). An
//!   unprepared branch aborts by itself once its deadline passes.
//! - No hanging: an Abort for a branch never seen leaves a tombstone, so a
//!   late Prepare for it is refused and takes no locks.
//! - Idempotency: duplicate and late Prepare/Commit/Abort get the answer of
//!   the first; Commit is acknowledged only after the apply is durable.
//! - Stale messages: a first Prepare for a transaction of a coordinator epoch
//!   older than one already seen is refused (that coordinator run is gone and
//!   has presumed it aborted).
//! - One-phase commit: a one-phase Prepare (the transaction has this
//!   participant alone) commits in one synced write and answers
//!   [`SentVote::Committed`], which needs a [`CommitDurable`] witness; a NO
//!   answer to it is sent only once the abort is durable, since the
//!   coordinator takes either answer as the outcome. The COMMITTED record
//!   is kept, marked unreleased, until the coordinator releases it with
//!   Commit: until then the coordinator may hold no record of the outcome.
//!   A Recover from a newer coordinator run fences (durably refuses
//!   one-phase Prepares of earlier runs) and then reports the unreleased
//!   ones.

use std::collections::BTreeMap;

use twopc_proto::logpb::{BranchRecord, BranchState};
use twopc_proto::{Decision, TxnId, UnixMillis, Vote};

/// Identifies a caller waiting for a [`Reply`]; chosen by the driver.
pub type ReqId = u64;

/// Tunables. Times in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CoreConfig {
    /// How long after preparing a branch first asks the coordinator for the
    /// outcome, if phase two has not arrived (it normally does within
    /// milliseconds). Not tied to the deadline: a prepared branch must
    /// resolve as soon as the coordinator can answer.
    pub query_after_prepare_ms: u64,
    /// First QueryDecision retry delay; doubles up to `query_max_ms`.
    pub query_base_ms: u64,
    /// Longest delay between QueryDecision attempts.
    pub query_max_ms: u64,
    /// How long finished branches (and abort tombstones) are remembered.
    /// Must exceed the longest transaction timeout, so a Prepare that arrives
    /// late still finds the tombstone.
    pub retention_ms: u64,
    /// Seed of the retry jitter.
    pub seed: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            query_after_prepare_ms: 1_000,
            query_base_ms: 100,
            query_max_ms: 2_000,
            retention_ms: 600_000,
            seed: 0x5DEE_CE66_D1CE_4E5B,
        }
    }
}

/// Proof that this branch's PREPARED record is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PreparedDurable {
    _private: (),
}

/// Proof that this branch's one-phase commit is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CommitDurable {
    _private: (),
}

/// A vote as it may be sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SentVote {
    /// Only with proof of a durable PREPARED record.
    Yes(PreparedDurable),
    /// Refusal, with the reason.
    No(String),
    /// Nothing to commit here.
    ReadOnly,
    /// One-phase: committed; only with proof that the commit is durable.
    Committed(CommitDurable),
}

impl SentVote {
    /// The plain vote for the wire.
    pub fn vote(&self) -> Vote {
        match self {
            SentVote::Yes(_) => Vote::Yes,
            SentVote::No(r) => Vote::No(r.clone()),
            SentVote::ReadOnly => Vote::ReadOnly,
            SentVote::Committed(_) => Vote::Committed,
        }
    }
}

/// Something that happens to the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A business request under `txn` arrived; join before handling it.
    Join {
        /// Caller.
        req: ReqId,
        /// The transaction.
        txn: TxnId,
    },
    /// The coordinator answered our Enlist: the deadline, or why not.
    Enlisted {
        /// The transaction.
        txn: TxnId,
        /// Deadline, or why not.
        result: Result<UnixMillis, EnlistError>,
    },
    /// Phase one from the coordinator.
    Prepare {
        /// Caller.
        req: ReqId,
        /// The transaction.
        txn: TxnId,
        /// The sender's epoch.
        epoch: u64,
        /// Execute payload.
        payload: Option<Vec<u8>>,
        /// The transaction's deadline.
        deadline: UnixMillis,
        /// Prepare and commit in one step (this participant is the
        /// transaction's only one).
        one_phase: bool,
    },
    /// A newer coordinator run collects one-phase outcomes of earlier runs.
    Recover {
        /// Caller.
        req: ReqId,
        /// The collecting run's epoch.
        epoch: u64,
    },
    /// The release of a one-phase commit is written, or failed to be.
    Released {
        /// The transaction.
        txn: TxnId,
        /// Written, or why not.
        result: Result<(), String>,
    },
    /// The fence record of `epoch` is durable.
    FenceDurable {
        /// The fence's epoch.
        epoch: u64,
    },
    /// Writing the fence record failed.
    FenceFailed {
        /// The fence's epoch.
        epoch: u64,
        /// Why.
        error: String,
    },
    /// The resource finished preparing: its vote, or its error.
    ResourceVoted {
        /// The transaction.
        txn: TxnId,
        /// Vote or failure.
        vote: Result<Vote, String>,
    },
    /// The PREPARED record is durable.
    Durable {
        /// The transaction.
        txn: TxnId,
    },
    /// Writing the PREPARED record failed.
    PersistFailed {
        /// The transaction.
        txn: TxnId,
        /// Why.
        error: String,
    },
    /// Phase two: commit.
    Commit {
        /// Caller.
        req: ReqId,
        /// The transaction.
        txn: TxnId,
        /// The sender's epoch.
        epoch: u64,
    },
    /// Phase two: abort.
    Abort {
        /// Caller.
        req: ReqId,
        /// The transaction.
        txn: TxnId,
        /// The sender's epoch.
        epoch: u64,
    },
    /// The outcome was applied and recorded (durably for commits).
    Applied {
        /// The transaction.
        txn: TxnId,
    },
    /// Applying the outcome failed; it will be retried.
    ApplyFailed {
        /// The transaction.
        txn: TxnId,
        /// Why.
        error: String,
    },
    /// The coordinator answered QueryDecision (or could not be asked).
    Decided {
        /// The transaction.
        txn: TxnId,
        /// The answer.
        decision: Result<Decision, String>,
    },
    /// A timer fired.
    Timer(Timer),
}

/// Timers; each is checked against the state when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// The transaction's deadline (+ grace for prepared branches).
    Deadline(TxnId),
    /// Ask the coordinator again.
    Query(TxnId),
    /// Forget a finished branch.
    Forget(TxnId),
    /// Apply the known outcome again after a failed attempt.
    RetryApply(TxnId),
}

/// What the core asks the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Answer a caller.
    Reply {
        /// Caller.
        req: ReqId,
        /// Answer.
        reply: Reply,
    },
    /// Call the coordinator's Enlist; report [`Input::Enlisted`].
    Enlist {
        /// The transaction.
        txn: TxnId,
    },
    /// Ask the resource to prepare (run the payload, check, stage the
    /// durable part); report [`Input::ResourceVoted`].
    ResourcePrepare {
        /// The transaction.
        txn: TxnId,
        /// Execute payload.
        payload: Option<Vec<u8>>,
    },
    /// Write the PREPARED record together with what the resource staged,
    /// synced; report [`Input::Durable`] or [`Input::PersistFailed`].
    PersistPrepared {
        /// The transaction.
        txn: TxnId,
        /// The record.
        record: BranchRecord,
    },
    /// Apply the outcome at the resource and write `record` in the same
    /// atomic batch (synced when `synced`), then release the resource;
    /// report [`Input::Applied`] or [`Input::ApplyFailed`]. With no record
    /// (read-only), only release.
    Apply {
        /// The transaction.
        txn: TxnId,
        /// Commit or abort.
        commit: bool,
        /// The outcome record, if one is kept.
        record: Option<BranchRecord>,
        /// fsync before reporting.
        synced: bool,
    },
    /// Ask the coordinator for the outcome; report [`Input::Decided`].
    QueryDecision {
        /// The transaction.
        txn: TxnId,
    },
    /// Rewrite the branch's record (a one-phase commit the coordinator
    /// released) without the one-phase mark, lazily; report
    /// [`Input::Released`] once written.
    Release {
        /// The transaction.
        txn: TxnId,
        /// The record.
        record: BranchRecord,
    },
    /// Write the fence record `record` under the id (`epoch`, 0), deleting
    /// the one of `replaces` in the same batch, synced; report
    /// [`Input::FenceDurable`] or [`Input::FenceFailed`].
    PersistFence {
        /// The collecting run's epoch.
        epoch: u64,
        /// The earlier fence, if any.
        replaces: Option<u64>,
        /// The record.
        record: BranchRecord,
    },
    /// Delete the finished branch's record from the log (lazily): its
    /// retention has ended.
    Forget {
        /// The transaction.
        txn: TxnId,
    },
    /// Feed the timer back at `at`.
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
    /// Join succeeded; the business handler may run.
    Joined {
        /// The transaction's deadline.
        deadline: UnixMillis,
    },
    /// The answer to Prepare.
    Voted(SentVote),
    /// Commit or Abort acknowledged.
    Acked,
    /// The answer to Recover: transactions of earlier coordinator runs
    /// committed here in one phase and not yet released.
    Recovered(Vec<TxnId>),
    /// Refused.
    Error(CoreError),
}

/// Why an Enlist did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EnlistError {
    /// The coordinator answered no (enlistment closed, unknown
    /// transaction, …).
    Refused(String),
    /// The coordinator could not be reached, or its answer was lost: the
    /// caller may retry.
    Unreachable(String),
}

/// Refusals. Each maps to one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// Join refused (coordinator refused enlistment, or the branch is past
    /// accepting work).
    #[error("cannot join transaction {txn}: {why}")]
    JoinRefused {
        /// The transaction.
        txn: TxnId,
        /// Why.
        why: String,
    },
    /// The coordinator could not be reached to enlist: retry later.
    #[error("cannot join transaction {txn}: the coordinator is unreachable ({why})")]
    CoordinatorUnreachable {
        /// The transaction.
        txn: TxnId,
        /// The transport error.
        why: String,
    },
    /// Commit for a branch that is not prepared here.
    #[error("transaction {txn} is not prepared here ({state})")]
    NotPrepared {
        /// The transaction.
        txn: TxnId,
        /// Its state here.
        state: &'static str,
    },
    /// Abort for a branch committed here.
    #[error("transaction {0} is already committed here")]
    AlreadyCommitted(TxnId),
    /// The participant's log failed; the caller should retry.
    #[error("the participant's log failed: {0}")]
    Unavailable(String),
}

/// Where a branch is. Public for Status-like inspection and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Enlisting with the coordinator.
    Joining,
    /// Doing work; not prepared.
    Active,
    /// The resource is preparing.
    Preparing,
    /// The PREPARED record is being written.
    Persisting,
    /// Durably prepared; waiting for the outcome.
    Prepared,
    /// Releasing a read-only branch (nothing to commit or record).
    Releasing,
    /// A released read-only branch, remembered until its retention ends so
    /// that a duplicate Prepare gets the same answer.
    Released,
    /// Applying commit.
    Committing,
    /// Committed.
    Committed,
    /// Applying abort.
    Aborting,
    /// Aborted (or tombstone).
    Aborted,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Branch {
    phase: Phase,
    deadline: UnixMillis,
    epoch: u64,
    /// Join callers, Prepare callers, or Commit/Abort callers, by phase.
    waiters: Vec<ReqId>,
    /// An Abort arrived while preparing; abort once the prepare settles.
    abort_pending: bool,
    /// The branch has a durable PREPARED record (so abort must be recorded).
    prepared: bool,
    queries: u32,
    /// Failed attempts to apply the outcome.
    apply_failures: u32,
    /// A RetryApply timer is set (the last apply failed).
    retry_pending: bool,
    /// Asked to prepare and commit in one phase.
    one_phase: bool,
    /// Committed in one phase and not yet released by the coordinator.
    unreleased: bool,
    /// One-phase: why the branch aborted, for the NO answer sent once the
    /// abort is durable.
    no_reason: Option<String>,
}

impl Branch {
    fn new(phase: Phase, deadline: UnixMillis, epoch: u64) -> Self {
        Branch {
            phase,
            deadline,
            epoch,
            waiters: Vec::new(),
            abort_pending: false,
            prepared: false,
            queries: 0,
            apply_failures: 0,
            retry_pending: false,
            one_phase: false,
            unreleased: false,
            no_reason: None,
        }
    }
}

/// The participant's state machine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Core {
    config: CoreConfig,
    branches: BTreeMap<TxnId, Branch>,
    max_epoch: u64,
    /// The newest fence written (or being written), by epoch.
    fence: Option<u64>,
    /// The newest fence known durable.
    durable_fence: Option<u64>,
    /// Recover callers, with their epoch and whether its fence is durable.
    fences: Vec<(ReqId, u64, bool)>,
    rng: u64,
}

fn reply(req: ReqId, reply: Reply) -> Effect {
    Effect::Reply { req, reply }
}

fn record(state: BranchState, b: &Branch, now: UnixMillis) -> BranchRecord {
    BranchRecord {
        state: state as i32,
        deadline_unix_ms: b.deadline.0,
        coordinator_epoch: b.epoch,
        updated_unix_ms: now.0,
        one_phase: b.unreleased,
    }
}

impl Core {
    /// A core with no branches.
    pub fn new(config: CoreConfig) -> Self {
        let rng = config.seed | 1;
        Core { config, branches: BTreeMap::new(), max_epoch: 0, fence: None, durable_fence: None, fences: Vec::new(), rng }
    }

    /// The phase of a branch, if held.
    pub fn phase(&self, txn: TxnId) -> Option<Phase> {
        self.branches.get(&txn).map(|b| b.phase)
    }

    /// Branches that are prepared and waiting for the outcome.
    pub fn in_doubt(&self) -> Vec<TxnId> {
        self.branches
            .iter()
            .filter(|(_, b)| b.prepared && matches!(b.phase, Phase::Prepared | Phase::Committing))
            .map(|(t, _)| *t)
            .collect()
    }

    /// Loads the prepared log at start. Prepared branches ask the
    /// coordinator for their outcome right away; finished ones are
    /// remembered until their retention ends.
    pub fn recover(&mut self, now: UnixMillis, records: Vec<(TxnId, BranchRecord)>) -> Vec<Effect> {
        let mut out = Vec::new();
        for (txn, r) in records {
            self.max_epoch = self.max_epoch.max(r.coordinator_epoch);
            if r.state == BranchState::Fence as i32 {
                self.fence = self.fence.max(Some(r.coordinator_epoch));
                self.durable_fence = self.fence;
                continue;
            }
            let mut b = Branch::new(Phase::Aborted, UnixMillis(r.deadline_unix_ms), r.coordinator_epoch);
            match BranchState::try_from(r.state) {
                Ok(BranchState::Prepared) => {
                    b.phase = Phase::Prepared;
                    b.prepared = true;
                    out.push(Effect::QueryDecision { txn });
                }
                Ok(BranchState::Committed) if r.one_phase => {
                    // Kept until the coordinator releases it.
                    b.phase = Phase::Committed;
                    b.one_phase = true;
                    b.unreleased = true;
                }
                Ok(BranchState::Committed) => {
                    b.phase = Phase::Committed;
                    b.prepared = true;
                    out.push(Effect::SetTimer {
                        at: UnixMillis(r.updated_unix_ms).plus(self.config.retention_ms),
                        timer: Timer::Forget(txn),
                    });
                }
                _ => {
                    out.push(Effect::SetTimer {
                        at: UnixMillis(r.updated_unix_ms).plus(self.config.retention_ms).max(now),
                        timer: Timer::Forget(txn),
                    });
                }
            }
            self.branches.insert(txn, b);
        }
        out
    }

    /// Advances the state machine by one input.
    pub fn step(&mut self, now: UnixMillis, input: Input) -> Vec<Effect> {
        let mut out = Vec::new();
        match input {
            Input::Join { req, txn } => self.join(&mut out, req, txn),
            Input::Enlisted { txn, result } => self.enlisted(&mut out, now, txn, result),
            Input::Prepare { req, txn, epoch, payload, deadline, one_phase } => {
                self.prepare(&mut out, now, req, txn, epoch, payload, deadline, one_phase)
            }
            Input::Recover { req, epoch } => self.recover_request(&mut out, now, req, epoch),
            Input::Released { txn, result } => {
                if let Some(b) = self.branches.get_mut(&txn)
                    && b.unreleased
                    && b.phase == Phase::Committed
                {
                    match result {
                        Ok(()) => {
                            b.unreleased = false;
                            for w in std::mem::take(&mut b.waiters) {
                                out.push(reply(w, Reply::Acked));
                            }
                            let at = forget_at(now, b.deadline, self.config.retention_ms);
                            out.push(Effect::SetTimer { at, timer: Timer::Forget(txn) });
                        }
                        // Unacknowledged: the coordinator asks again.
                        Err(e) => {
                            for w in std::mem::take(&mut b.waiters) {
                                out.push(reply(w, Reply::Error(CoreError::Unavailable(e.clone()))));
                            }
                        }
                    }
                }
            }
            Input::FenceDurable { epoch } => {
                self.durable_fence = self.durable_fence.max(Some(epoch));
                for f in self.fences.iter_mut().filter(|f| f.1 <= epoch) {
                    f.2 = true;
                }
                self.answer_fences(&mut out);
            }
            Input::FenceFailed { epoch, error } => {
                // Only the newest fence's failure matters: a newer one in
                // flight covers every earlier caller. The fence falls back
                // to the newest durable one, so that a retried Recover
                // writes it again; every caller not yet covered hears the
                // error and may retry. (The in-memory epoch stays raised:
                // refusing more is safe.)
                if self.fence == Some(epoch) {
                    self.fence = self.durable_fence;
                    let (failed, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.fences).into_iter().partition(|f| !f.2);
                    self.fences = kept;
                    for (req, ..) in failed {
                        out.push(reply(req, Reply::Error(CoreError::Unavailable(error.clone()))));
                    }
                }
            }
            Input::ResourceVoted { txn, vote } => self.resource_voted(&mut out, now, txn, vote),
            Input::Durable { txn } => self.durable(&mut out, now, txn),
            Input::PersistFailed { txn, error } => {
                if let Some(b) = self.branches.get_mut(&txn)
                    && b.phase == Phase::Persisting
                {
                    // Never voted YES, so the coordinator will abort. The
                    // record may be on disk: record the abort over it.
                    for w in std::mem::take(&mut b.waiters) {
                        out.push(reply(w, Reply::Error(CoreError::Unavailable(error.clone()))));
                    }
                    b.prepared = true;
                    self.start_abort(&mut out, now, txn, None, false);
                }
            }
            Input::Commit { req, txn, epoch } => self.commit(&mut out, now, req, txn, epoch),
            Input::Abort { req, txn, epoch } => self.abort(&mut out, now, req, txn, epoch),
            Input::Applied { txn } => self.applied(&mut out, now, txn),
            Input::ApplyFailed { txn, error } => {
                if let Some(b) = self.branches.get_mut(&txn)
                    && matches!(b.phase, Phase::Releasing | Phase::Committing | Phase::Aborting)
                {
                    // The outcome is known and never forgotten: keep the
                    // phase and apply again after a backoff. Callers waiting
                    // now hear "unavailable" and may retry.
                    for w in std::mem::take(&mut b.waiters) {
                        out.push(reply(w, Reply::Error(CoreError::Unavailable(error.clone()))));
                    }
                    b.apply_failures += 1;
                    b.retry_pending = true;
                    let shift = b.apply_failures.min(16);
                    let delay = self.config.query_base_ms.saturating_mul(1u64 << shift).min(self.config.query_max_ms);
                    out.push(Effect::SetTimer { at: now.plus(delay), timer: Timer::RetryApply(txn) });
                }
            }
            Input::Decided { txn, decision } => self.decided(&mut out, now, txn, decision),
            Input::Timer(t) => self.timer(&mut out, now, t),
        }
        out
    }

    fn join(&mut self, out: &mut Vec<Effect>, req: ReqId, txn: TxnId) {
        match self.branches.get_mut(&txn) {
            None => {
                let mut b = Branch::new(Phase::Joining, UnixMillis(0), txn.epoch);
                b.waiters.push(req);
                self.branches.insert(txn, b);
                out.push(Effect::Enlist { txn });
            }
            Some(b) => match b.phase {
                Phase::Joining => b.waiters.push(req),
                Phase::Active => out.push(reply(req, Reply::Joined { deadline: b.deadline })),
                p => out.push(reply(
                    req,
                    Reply::Error(CoreError::JoinRefused { txn, why: format!("the transaction is {} here", phase_name(p)) }),
                )),
            },
        }
    }

    fn enlisted(&mut self, out: &mut Vec<Effect>, now: UnixMillis, txn: TxnId, result: Result<UnixMillis, EnlistError>) {
        let Some(b) = self.branches.get_mut(&txn) else { return };
        if b.phase != Phase::Joining {
            return;
        }
        let waiters = std::mem::take(&mut b.waiters);
        match result {
            Ok(deadline) => {
                b.phase = Phase::Active;
                b.deadline = deadline;
                for w in waiters {
                    out.push(reply(w, Reply::Joined { deadline }));
                }
                out.push(Effect::SetTimer { at: deadline.max(now), timer: Timer::Deadline(txn) });
            }
            Err(e) => {
                // Nothing was done under the transaction yet: forget it. (If
                // an unanswered Enlist did reach the coordinator, this
                // participant votes NO on the Prepare of work it does not
                // hold; a retried call enlists again.)
                self.branches.remove(&txn);
                let error = match e {
                    EnlistError::Refused(why) => CoreError::JoinRefused { txn, why },
                    EnlistError::Unreachable(why) => CoreError::CoordinatorUnreachable { txn, why },
                };
                for w in waiters {
                    out.push(reply(w, Reply::Error(error.clone())));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn prepare(
        &mut self,
        out: &mut Vec<Effect>,
        now: UnixMillis,
        req: ReqId,
        txn: TxnId,
        epoch: u64,
        payload: Option<Vec<u8>>,
        deadline: UnixMillis,
        one_phase: bool,
    ) {
        let fresh = match self.branches.get(&txn).map(|b| b.phase) {
            None | Some(Phase::Active) => true,
            Some(_) => false,
        };
        if fresh {
            // Epochs are learned only from a Prepare of the coordinator run
            // that issued the transaction (the only kind a coordinator
            // sends): an unchecked epoch on any other request must not make
            // this participant refuse the current run's transactions.
            let learned = if epoch == txn.epoch { epoch } else { 0 };
            let refuse = if txn.epoch < self.max_epoch {
                Some(format!("stale transaction: coordinator epoch {} is past the transaction's epoch {}", self.max_epoch, txn.epoch))
            } else if deadline.0 != 0 && now >= deadline {
                Some("the transaction's deadline has passed".to_owned())
            } else if payload.is_none() && !self.branches.contains_key(&txn) {
                Some("this participant holds no work for the transaction (it may have restarted since)".to_owned())
            } else {
                None
            };
            self.max_epoch = self.max_epoch.max(learned);
            if let Some(why) = refuse {
                out.push(reply(req, Reply::Voted(SentVote::No(why))));
                if self.branches.contains_key(&txn) {
                    self.start_abort(out, now, txn, None, false);
                }
                return;
            }
            let b = self.branches.entry(txn).or_insert_with(|| Branch::new(Phase::Active, deadline, txn.epoch));
            b.phase = Phase::Preparing;
            b.epoch = txn.epoch;
            b.one_phase = one_phase;
            if deadline.0 != 0 {
                b.deadline = deadline;
            }
            b.waiters.push(req);
            out.push(Effect::ResourcePrepare { txn, payload });
            return;
        }
        let Some(b) = self.branches.get_mut(&txn) else { return };
        match b.phase {
            Phase::Preparing | Phase::Persisting => b.waiters.push(req),
            // One phase: the answer waits for the commit, or the abort, to
            // be durable.
            Phase::Committing if b.one_phase && !b.prepared => b.waiters.push(req),
            Phase::Aborting if b.one_phase && b.no_reason.is_some() => b.waiters.push(req),
            Phase::Committed if b.one_phase && !b.prepared => {
                out.push(reply(req, Reply::Voted(SentVote::Committed(CommitDurable { _private: () }))))
            }
            Phase::Prepared | Phase::Committing | Phase::Committed if b.prepared => {
                out.push(reply(req, Reply::Voted(SentVote::Yes(PreparedDurable { _private: () }))))
            }
            Phase::Releasing | Phase::Released => out.push(reply(req, Reply::Voted(SentVote::ReadOnly))),
            Phase::Prepared | Phase::Committing | Phase::Committed => {
                // Unreachable by construction (these phases follow a durable
                // PREPARED record); refuse rather than vote YES unproven.
                out.push(reply(req, Reply::Voted(SentVote::No("the branch has no durable prepared record".into()))))
            }
            Phase::Joining if one_phase => {
                // One phase: the NO is the outcome, so it must be final.
                // Still joining, the branch could become active and commit
                // on a repeated one-phase Prepare: abort it (refusing the
                // business call that joins) and answer once that is durable.
                for w in std::mem::take(&mut b.waiters) {
                    out.push(reply(
                        w,
                        Reply::Error(CoreError::JoinRefused { txn, why: "the transaction is already being committed".into() }),
                    ));
                }
                b.one_phase = true;
                b.no_reason = Some("enlistment is still in progress".into());
                self.start_abort(out, now, txn, Some(req), true);
            }
            Phase::Aborting | Phase::Aborted => out.push(reply(req, Reply::Voted(SentVote::No("the transaction was aborted here".into())))),
            Phase::Joining | Phase::Active => out.push(reply(req, Reply::Voted(SentVote::No("enlistment is still in progress".into())))),
        }
    }

    fn resource_voted(&mut self, out: &mut Vec<Effect>, now: UnixMillis, txn: TxnId, vote: Result<Vote, String>) {
        let Some(b) = self.branches.get_mut(&txn) else { return };
        if b.phase != Phase::Preparing {
            return;
        }
        let vote = match vote {
            Ok(v) => v,
            Err(e) => Vote::No(format!("the resource failed to prepare: {e}")),
        };
        if b.one_phase {
            match vote {
                Vote::Yes if !b.abort_pending && txn.epoch >= self.max_epoch => {
                    // Prepare and commit in one synced write; the record is
                    // kept until the coordinator releases it.
                    b.phase = Phase::Committing;
                    b.unreleased = true;
                    out.push(Effect::Apply { txn, commit: true, record: Some(record(BranchState::Committed, b, now)), synced: true });
                }
                Vote::ReadOnly if !b.abort_pending => {
                    for w in std::mem::take(&mut b.waiters) {
                        out.push(reply(w, Reply::Voted(SentVote::ReadOnly)));
                    }
                    b.phase = Phase::Releasing;
                    out.push(Effect::Apply { txn, commit: true, record: None, synced: false });
                }
                vote => {
                    // The coordinator takes NO as the outcome: answer once
                    // the abort is durable, so that a repeated Prepare
                    // cannot commit what was answered NO.
                    b.no_reason = Some(match vote {
                        Vote::No(why) => why,
                        _ if b.abort_pending => "the transaction was aborted while preparing".to_owned(),
                        Vote::Yes => {
                            format!("stale transaction: coordinator epoch {} is past the transaction's epoch {}", self.max_epoch, txn.epoch)
                        }
                        _ => "the resource answered COMMITTED to a prepare".to_owned(),
                    });
                    self.start_abort(out, now, txn, None, true);
                }
            }
            return;
        }
        match vote {
            Vote::Yes if !b.abort_pending => {
                b.phase = Phase::Persisting;
                out.push(Effect::PersistPrepared { txn, record: record(BranchState::Prepared, b, now) });
            }
            Vote::Yes => {
                for w in std::mem::take(&mut b.waiters) {
                    out.push(reply(w, Reply::Voted(SentVote::No("the transaction was aborted while preparing".into()))));
                }
                self.start_abort(out, now, txn, None, false);
            }
            Vote::No(why) => {
                for w in std::mem::take(&mut b.waiters) {
                    out.push(reply(w, Reply::Voted(SentVote::No(why.clone()))));
                }
                self.start_abort(out, now, txn, None, false);
            }
            Vote::Committed => {
                // Only a one-phase Prepare commits in the resource's
                // place; a resource never answers this.
                for w in std::mem::take(&mut b.waiters) {
                    out.push(reply(w, Reply::Voted(SentVote::No("the resource answered COMMITTED to a prepare".into()))));
                }
                self.start_abort(out, now, txn, None, false);
            }
            Vote::ReadOnly if b.abort_pending => {
                for w in std::mem::take(&mut b.waiters) {
                    out.push(reply(w, Reply::Voted(SentVote::No("the transaction was aborted while preparing".into()))));
                }
                self.start_abort(out, now, txn, None, false);
            }
            Vote::ReadOnly => {
                for w in std::mem::take(&mut b.waiters) {
                    out.push(reply(w, Reply::Voted(SentVote::ReadOnly)));
                }
                // Nothing to keep: release the resource and forget.
                b.phase = Phase::Releasing;
                out.push(Effect::Apply { txn, commit: true, record: None, synced: false });
            }
        }
    }

    fn durable(&mut self, out: &mut Vec<Effect>, now: UnixMillis, txn: TxnId) {
        let Some(b) = self.branches.get_mut(&txn) else { return };
        if b.phase != Phase::Persisting {
            return;
        }
        b.prepared = true;
        if b.abort_pending {
            for w in std::mem::take(&mut b.waiters) {
                out.push(reply(w, Reply::Voted(SentVote::No("the transaction was aborted while preparing".into()))));
            }
            self.start_abort(out, now, txn, None, false);
            return;
        }
        b.phase = Phase::Prepared;
        for w in std::mem::take(&mut b.waiters) {
            out.push(reply(w, Reply::Voted(SentVote::Yes(PreparedDurable { _private: () }))));
        }
        // If phase two does not arrive, ask.
        let at = now.plus(self.config.query_after_prepare_ms);
        out.push(Effect::SetTimer { at, timer: Timer::Query(txn) });
    }

    fn commit(&mut self, out: &mut Vec<Effect>, now: UnixMillis, req: ReqId, txn: TxnId, _epoch: u64) {
        let Some(b) = self.branches.get_mut(&txn) else {
            // Committed and forgotten: a duplicate after retention.
            out.push(reply(req, Reply::Acked));
            return;
        };
        match b.phase {
            Phase::Committed if b.unreleased => {
                // The coordinator holds the outcome now: drop the one-phase
                // mark (lazily: if the rewrite is lost in a machine crash,
                // the next Recover reports the commit again) and
                // acknowledge once it is written.
                b.waiters.push(req);
                if b.waiters.len() == 1 {
                    let mut r = record(BranchState::Committed, b, now);
                    r.one_phase = false;
                    out.push(Effect::Release { txn, record: r });
                }
            }
            Phase::Committing if b.one_phase && !b.prepared => {
                out.push(reply(req, Reply::Error(CoreError::Unavailable("the one-phase commit is still being written".into()))))
            }
            Phase::Prepared => {
                b.phase = Phase::Committing;
                b.waiters.push(req);
                out.push(Effect::Apply { txn, commit: true, record: Some(record(BranchState::Committed, b, now)), synced: true });
            }
            Phase::Committing => b.waiters.push(req),
            Phase::Committed | Phase::Releasing | Phase::Released => out.push(reply(req, Reply::Acked)),
            p => out.push(reply(req, Reply::Error(CoreError::NotPrepared { txn, state: phase_name(p) }))),
        }
    }

    fn abort(&mut self, out: &mut Vec<Effect>, now: UnixMillis, req: ReqId, txn: TxnId, _epoch: u64) {
        let Some(b) = self.branches.get_mut(&txn) else {
            // Never seen: leave a tombstone so that a late Prepare is
            // refused (no empty rollback, no hanging), and acknowledge once
            // the tombstone is durable — the coordinator stops telling us
            // after the acknowledgement, so it must survive a crash.
            let mut b = Branch::new(Phase::Aborting, UnixMillis(0), txn.epoch);
            b.waiters.push(req);
            out.push(Effect::Apply { txn, commit: false, record: Some(record(BranchState::Aborted, &b, now)), synced: true });
            self.branches.insert(txn, b);
            return;
        };
        match b.phase {
            Phase::Joining => {
                for w in std::mem::take(&mut b.waiters) {
                    out.push(reply(w, Reply::Error(CoreError::JoinRefused { txn, why: "the transaction was aborted".into() })));
                }
                self.start_abort(out, now, txn, Some(req), false);
            }
            Phase::Active | Phase::Prepared => self.start_abort(out, now, txn, Some(req), false),
            Phase::Preparing | Phase::Persisting => {
                b.abort_pending = true;
                out.push(reply(req, Reply::Acked));
            }
            Phase::Aborting => b.waiters.push(req),
            Phase::Aborted | Phase::Releasing | Phase::Released => out.push(reply(req, Reply::Acked)),
            Phase::Committing | Phase::Committed => out.push(reply(req, Reply::Error(CoreError::AlreadyCommitted(txn)))),
        }
    }

    /// Aborts the branch: release the resource and record the abort (lazily:
    /// under presumed abort a lost abort record only means asking again).
    /// With `synced`, the abort is durable before it is reported applied
    /// (one phase: the NO answer waits for it).
    fn start_abort(&mut self, out: &mut Vec<Effect>, now: UnixMillis, txn: TxnId, req: Option<ReqId>, synced: bool) {
        let Some(b) = self.branches.get_mut(&txn) else { return };
        b.phase = Phase::Aborting;
        b.abort_pending = false;
        if let Some(r) = req {
            b.waiters.push(r);
        }
        out.push(Effect::Apply { txn, commit: false, record: Some(record(BranchState::Aborted, b, now)), synced });
    }

    /// Recover from a coordinator run `epoch`: refuse one-phase Prepares of
    /// earlier runs from now on (durably: a fence record), then answer with
    /// the unreleased one-phase commits of earlier runs.
    fn recover_request(&mut self, out: &mut Vec<Effect>, now: UnixMillis, req: ReqId, epoch: u64) {
        self.max_epoch = self.max_epoch.max(epoch);
        match self.fence {
            _ if self.durable_fence.is_some_and(|f| f >= epoch) => self.fences.push((req, epoch, true)),
            Some(f) if f >= epoch => self.fences.push((req, epoch, false)),
            replaces => {
                let record = BranchRecord {
                    state: BranchState::Fence as i32,
                    deadline_unix_ms: 0,
                    coordinator_epoch: epoch,
                    updated_unix_ms: now.0,
                    one_phase: false,
                };
                out.push(Effect::PersistFence { epoch, replaces, record });
                self.fence = Some(epoch);
                self.fences.push((req, epoch, false));
            }
        }
        self.answer_fences(out);
    }

    /// Answers every Recover whose fence is durable, once no one-phase
    /// commit of an earlier run is still being written (those are
    /// reported too; one still preparing is refused by the fence).
    fn answer_fences(&mut self, out: &mut Vec<Effect>) {
        if self.fences.is_empty() {
            return;
        }
        let branches = &self.branches;
        self.fences.retain(|&(req, epoch, durable)| {
            let earlier = || branches.iter().filter(move |(t, b)| t.epoch < epoch && b.one_phase && !b.prepared);
            if !durable || earlier().any(|(_, b)| b.phase == Phase::Committing) {
                return true;
            }
            let committed = earlier().filter(|(_, b)| b.unreleased && b.phase == Phase::Committed).map(|(t, _)| *t).collect();
            out.push(reply(req, Reply::Recovered(committed)));
            false
        });
    }

    fn applied(&mut self, out: &mut Vec<Effect>, now: UnixMillis, txn: TxnId) {
        let Some(b) = self.branches.get_mut(&txn) else { return };
        let done = match b.phase {
            Phase::Releasing => Phase::Released,
            Phase::Committing => Phase::Committed,
            Phase::Aborting => Phase::Aborted,
            _ => return,
        };
        b.phase = done;
        let answer = match done {
            Phase::Committed if b.unreleased => Reply::Voted(SentVote::Committed(CommitDurable { _private: () })),
            Phase::Aborted if b.one_phase && b.no_reason.is_some() => Reply::Voted(SentVote::No(b.no_reason.clone().unwrap_or_default())),
            _ => Reply::Acked,
        };
        for w in std::mem::take(&mut b.waiters) {
            out.push(reply(w, answer.clone()));
        }
        if !b.unreleased {
            let at = forget_at(now, b.deadline, self.config.retention_ms);
            out.push(Effect::SetTimer { at, timer: Timer::Forget(txn) });
        }
        self.answer_fences(out);
    }

    fn decided(&mut self, out: &mut Vec<Effect>, now: UnixMillis, txn: TxnId, decision: Result<Decision, String>) {
        let Some(b) = self.branches.get_mut(&txn) else { return };
        if b.phase != Phase::Prepared {
            return;
        }
        match decision {
            Ok(Decision::Commit) => {
                b.phase = Phase::Committing;
                out.push(Effect::Apply { txn, commit: true, record: Some(record(BranchState::Committed, b, now)), synced: true });
            }
            Ok(Decision::Abort) => self.start_abort(out, now, txn, None, false),
            Ok(Decision::Pending) | Err(_) => {
                b.queries += 1;
                let shift = b.queries.min(16);
                let cap = self.config.query_base_ms.saturating_mul(1u64 << shift).min(self.config.query_max_ms).max(2);
                let delay = cap / 2 + twopc_proto::jitter(&mut self.rng) % (cap / 2 + 1);
                out.push(Effect::SetTimer { at: now.plus(delay), timer: Timer::Query(txn) });
            }
        }
    }

    fn timer(&mut self, out: &mut Vec<Effect>, now: UnixMillis, t: Timer) {
        match t {
            Timer::Deadline(txn) => {
                if let Some(b) = self.branches.get(&txn)
                    && b.phase == Phase::Active
                    && now >= b.deadline
                {
                    // Unprepared work past its deadline: the coordinator has
                    // aborted (or will); release it.
                    self.start_abort(out, now, txn, None, false);
                }
            }
            Timer::Query(txn) => {
                if self.branches.get(&txn).is_some_and(|b| b.phase == Phase::Prepared) {
                    out.push(Effect::QueryDecision { txn });
                }
            }
            Timer::Forget(txn) => {
                match self.branches.get(&txn).map(|b| (b.phase, b.unreleased)) {
                    // An unreleased one-phase commit stays until released.
                    Some((Phase::Committed, true)) => {}
                    Some((Phase::Committed | Phase::Aborted, _)) => {
                        self.branches.remove(&txn);
                        out.push(Effect::Forget { txn });
                    }
                    // A read-only branch has no record to delete.
                    Some((Phase::Released, _)) => {
                        self.branches.remove(&txn);
                    }
                    _ => {}
                }
            }
            Timer::RetryApply(txn) => {
                // Only the timer set after a failed apply retries, once: a
                // stale or replayed timer must not issue a second apply.
                let Some(b) = self.branches.get_mut(&txn) else { return };
                if !std::mem::take(&mut b.retry_pending) {
                    return;
                }
                let b = &*b;
                let effect = match b.phase {
                    Phase::Releasing => Effect::Apply { txn, commit: true, record: None, synced: false },
                    Phase::Committing => {
                        Effect::Apply { txn, commit: true, record: Some(record(BranchState::Committed, b, now)), synced: true }
                    }
                    // Synced on retry: it may be a tombstone, whose Abort
                    // is acknowledged only once it is durable.
                    Phase::Aborting => {
                        Effect::Apply { txn, commit: false, record: Some(record(BranchState::Aborted, b, now)), synced: true }
                    }
                    _ => return,
                };
                out.push(effect);
            }
        }
    }
}

/// When a finished branch may be forgotten: after its retention, and never
/// before its deadline — until then a delayed or duplicated Prepare could
/// arrive, and only the branch's memory (or, past the deadline, the
/// deadline check) refuses it.
fn forget_at(now: UnixMillis, deadline: UnixMillis, retention_ms: u64) -> UnixMillis {
    now.plus(retention_ms).max(deadline)
}

/// A branch phase in words, for errors.
pub fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Joining => "joining",
        Phase::Active => "active, not prepared",
        Phase::Preparing | Phase::Persisting => "preparing",
        Phase::Prepared => "prepared",
        Phase::Releasing => "read-only, releasing",
        Phase::Released => "read-only, finished",
        Phase::Committing => "committing",
        Phase::Committed => "committed",
        Phase::Aborting => "aborting",
        Phase::Aborted => "aborted",
    }
}
