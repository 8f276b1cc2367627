//! Unit tests of the participant's protocol core ([`crate::core`]).
//!
//! Every test drives a [`Core`] with fixed times and asserts the exact
//! effects it returns. Effects are first normalised into [`Fx`], because a
//! `SentVote::Yes` carries a `PreparedDurable` witness that only the core can
//! construct (which is the point of the witness).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use twopc_proto::logpb::{BranchRecord, BranchState};
use twopc_proto::{Decision, TxnId, UnixMillis, Vote};

use crate::core::*;

// ---------------------------------------------------------------------------
// Fixtures and helpers
// ---------------------------------------------------------------------------

/// A fixed "now" all tests count from.
const T0: UnixMillis = UnixMillis(1_700_000_000_000);
/// The coordinator epoch of the usual transaction.
const EPOCH: u64 = 5;
/// The usual transaction.
const TX: TxnId = TxnId { epoch: EPOCH, seq: 1 };

const QUERY_AFTER_PREPARE: u64 = 1_000;
const QUERY_BASE: u64 = 100;
const QUERY_MAX: u64 = 1_000;
const RETENTION: u64 = 60_000;

fn at(ms: u64) -> UnixMillis {
    T0.plus(ms)
}

/// The usual deadline.
fn dl() -> UnixMillis {
    at(10_000)
}

fn config() -> CoreConfig {
    CoreConfig {
        query_after_prepare_ms: QUERY_AFTER_PREPARE,
        query_base_ms: QUERY_BASE,
        query_max_ms: QUERY_MAX,
        retention_ms: RETENTION,
        seed: 7,
    }
}

fn rec(state: BranchState, deadline: UnixMillis, epoch: u64, updated: UnixMillis) -> BranchRecord {
    BranchRecord {
        state: state as i32,
        deadline_unix_ms: deadline.0,
        coordinator_epoch: epoch,
        updated_unix_ms: updated.0,
        one_phase: false,
    }
}

fn payload() -> Option<Vec<u8>> {
    Some(b"transfer 10".to_vec())
}

/// A reply with the vote reduced to the plain [`Vote`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum R {
    Joined(UnixMillis),
    Voted(Vote),
    Acked,
    Recovered(Vec<TxnId>),
    Error(CoreError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Fx {
    Reply(ReqId, R),
    Enlist(TxnId),
    ResourcePrepare(TxnId, Option<Vec<u8>>),
    Persist(TxnId, BranchRecord),
    Apply { txn: TxnId, commit: bool, record: Option<BranchRecord>, synced: bool },
    Query(TxnId),
    Forget(TxnId),
    Timer(UnixMillis, Timer),
    Release(TxnId, BranchRecord),
    Fence { epoch: u64, replaces: Option<u64> },
}

fn norm(effects: Vec<Effect>) -> Vec<Fx> {
    effects
        .into_iter()
        .map(|e| match e {
            Effect::Reply { req, reply } => Fx::Reply(
                req,
                match reply {
                    Reply::Joined { deadline } => R::Joined(deadline),
                    Reply::Voted(v) => R::Voted(v.vote()),
                    Reply::Acked => R::Acked,
                    Reply::Recovered(t) => R::Recovered(t),
                    Reply::Error(e) => R::Error(e),
                },
            ),
            Effect::Enlist { txn } => Fx::Enlist(txn),
            Effect::ResourcePrepare { txn, payload } => Fx::ResourcePrepare(txn, payload),
            Effect::PersistPrepared { txn, record } => Fx::Persist(txn, record),
            Effect::Apply { txn, commit, record, synced } => Fx::Apply { txn, commit, record, synced },
            Effect::QueryDecision { txn } => Fx::Query(txn),
            Effect::Forget { txn } => Fx::Forget(txn),
            Effect::SetTimer { at, timer } => Fx::Timer(at, timer),
            Effect::Release { txn, record } => Fx::Release(txn, record),
            Effect::PersistFence { epoch, replaces, .. } => Fx::Fence { epoch, replaces },
        })
        .collect()
}

fn yes(req: ReqId) -> Fx {
    Fx::Reply(req, R::Voted(Vote::Yes))
}

fn no(req: ReqId, why: &str) -> Fx {
    Fx::Reply(req, R::Voted(Vote::No(why.to_owned())))
}

fn acked(req: ReqId) -> Fx {
    Fx::Reply(req, R::Acked)
}

fn err(req: ReqId, e: CoreError) -> Fx {
    Fx::Reply(req, R::Error(e))
}

fn apply_commit(txn: TxnId, deadline: UnixMillis, epoch: u64, now: UnixMillis) -> Fx {
    Fx::Apply { txn, commit: true, record: Some(rec(BranchState::Committed, deadline, epoch, now)), synced: true }
}

fn apply_abort(txn: TxnId, deadline: UnixMillis, epoch: u64, now: UnixMillis) -> Fx {
    Fx::Apply { txn, commit: false, record: Some(rec(BranchState::Aborted, deadline, epoch, now)), synced: false }
}

/// The Abort of a never-seen transaction: a tombstone, written durably
/// before the acknowledgement.
fn tombstone(txn: TxnId, epoch: u64, now: UnixMillis) -> Fx {
    Fx::Apply { txn, commit: false, record: Some(rec(BranchState::Aborted, UnixMillis(0), epoch, now)), synced: true }
}

fn forget(now: UnixMillis, txn: TxnId) -> Fx {
    Fx::Timer(now.plus(RETENTION), Timer::Forget(txn))
}

/// The first Query timer of a branch whose PREPARED record became durable
/// at `durable`: relative to that moment, not to the deadline.
fn first_query(durable: UnixMillis, txn: TxnId) -> Fx {
    Fx::Timer(durable.plus(QUERY_AFTER_PREPARE), Timer::Query(txn))
}

const ABORTED_HERE: &str = "the transaction was aborted here";
const ABORTED_WHILE_PREPARING: &str = "the transaction was aborted while preparing";
const NO_WORK: &str = "this participant holds no work for the transaction (it may have restarted since)";
const DEADLINE_PASSED: &str = "the transaction's deadline has passed";

fn stale(max: u64, txn_epoch: u64) -> String {
    format!("stale transaction: coordinator epoch {max} is past the transaction's epoch {txn_epoch}")
}

/// A core and a request-id counter.
struct H {
    core: Core,
    next_req: ReqId,
}

impl H {
    fn new() -> Self {
        H { core: Core::new(config()), next_req: 100 }
    }

    fn req(&mut self) -> ReqId {
        self.next_req += 1;
        self.next_req
    }

    fn step(&mut self, now: UnixMillis, input: Input) -> Vec<Fx> {
        norm(self.core.step(now, input))
    }

    fn join(&mut self, now: UnixMillis, txn: TxnId) -> (ReqId, Vec<Fx>) {
        let req = self.req();
        (req, self.step(now, Input::Join { req, txn }))
    }

    fn enlisted(&mut self, now: UnixMillis, txn: TxnId, result: Result<UnixMillis, EnlistError>) -> Vec<Fx> {
        self.step(now, Input::Enlisted { txn, result })
    }

    fn prepare_with(
        &mut self,
        now: UnixMillis,
        txn: TxnId,
        epoch: u64,
        payload: Option<Vec<u8>>,
        deadline: UnixMillis,
    ) -> (ReqId, Vec<Fx>) {
        let req = self.req();
        (req, self.step(now, Input::Prepare { req, txn, epoch, payload, deadline, one_phase: false }))
    }

    /// Prepare of TX from its own coordinator epoch with the usual deadline.
    fn prepare(&mut self, now: UnixMillis, payload: Option<Vec<u8>>) -> (ReqId, Vec<Fx>) {
        self.prepare_with(now, TX, EPOCH, payload, dl())
    }

    fn voted(&mut self, now: UnixMillis, txn: TxnId, vote: Result<Vote, String>) -> Vec<Fx> {
        self.step(now, Input::ResourceVoted { txn, vote })
    }

    fn durable(&mut self, now: UnixMillis, txn: TxnId) -> Vec<Fx> {
        self.step(now, Input::Durable { txn })
    }

    fn commit(&mut self, now: UnixMillis, txn: TxnId) -> (ReqId, Vec<Fx>) {
        let req = self.req();
        (req, self.step(now, Input::Commit { req, txn, epoch: txn.epoch }))
    }

    fn abort(&mut self, now: UnixMillis, txn: TxnId) -> (ReqId, Vec<Fx>) {
        let req = self.req();
        (req, self.step(now, Input::Abort { req, txn, epoch: txn.epoch }))
    }

    fn applied(&mut self, now: UnixMillis, txn: TxnId) -> Vec<Fx> {
        self.step(now, Input::Applied { txn })
    }

    fn apply_failed(&mut self, now: UnixMillis, txn: TxnId, error: &str) -> Vec<Fx> {
        self.step(now, Input::ApplyFailed { txn, error: error.to_owned() })
    }

    fn decided(&mut self, now: UnixMillis, txn: TxnId, decision: Result<Decision, String>) -> Vec<Fx> {
        self.step(now, Input::Decided { txn, decision })
    }

    fn timer(&mut self, now: UnixMillis, timer: Timer) -> Vec<Fx> {
        self.step(now, Input::Timer(timer))
    }

    /// Join TX at T0 and be enlisted with the usual deadline.
    fn active(&mut self) -> ReqId {
        let (req, fx) = self.join(T0, TX);
        assert_eq!(fx, vec![Fx::Enlist(TX)]);
        let fx = self.enlisted(at(5), TX, Ok(dl()));
        assert_eq!(fx, vec![Fx::Reply(req, R::Joined(dl())), Fx::Timer(dl(), Timer::Deadline(TX))]);
        assert_eq!(self.core.phase(TX), Some(Phase::Active));
        req
    }

    /// Prepare TX (with a payload) at `at(100)`; the resource is asked.
    fn preparing(&mut self) -> ReqId {
        let (req, fx) = self.prepare(at(100), payload());
        assert_eq!(fx, vec![Fx::ResourcePrepare(TX, payload())]);
        assert_eq!(self.core.phase(TX), Some(Phase::Preparing));
        req
    }

    /// [`H::preparing`], then the resource votes YES at `at(110)`.
    fn persisting(&mut self) -> ReqId {
        let req = self.preparing();
        let fx = self.voted(at(110), TX, Ok(Vote::Yes));
        assert_eq!(fx, vec![Fx::Persist(TX, rec(BranchState::Prepared, dl(), EPOCH, at(110)))]);
        assert_eq!(self.core.phase(TX), Some(Phase::Persisting));
        req
    }

    /// [`H::persisting`], then the record is durable at `at(120)`.
    fn prepared(&mut self) -> ReqId {
        let req = self.persisting();
        let fx = self.durable(at(120), TX);
        assert_eq!(fx, vec![yes(req), first_query(at(120), TX)]);
        assert_eq!(self.core.phase(TX), Some(Phase::Prepared));
        req
    }

    /// [`H::prepared`], then Commit at `at(200)`; returns the Commit req.
    fn committing(&mut self) -> ReqId {
        let _ = self.prepared();
        let (req, fx) = self.commit(at(200), TX);
        assert_eq!(fx, vec![apply_commit(TX, dl(), EPOCH, at(200))]);
        assert_eq!(self.core.phase(TX), Some(Phase::Committing));
        req
    }

    /// [`H::committing`], then the apply finishes at `at(210)`.
    fn committed(&mut self) {
        let req = self.committing();
        assert_eq!(self.applied(at(210), TX), vec![acked(req), forget(at(210), TX)]);
        assert_eq!(self.core.phase(TX), Some(Phase::Committed));
    }

    /// The Query timer set after a Pending/failed answer, checked to lie in
    /// the backoff window of the `n`-th such answer.
    fn expect_query_backoff(fx: &[Fx], now: UnixMillis, txn: TxnId, n: u32) {
        let cap = QUERY_BASE.saturating_mul(1 << n.min(16)).clamp(2, QUERY_MAX);
        match fx {
            [Fx::Timer(when, Timer::Query(t))] => {
                assert_eq!(*t, txn);
                let delay = now.until(*when);
                assert!((cap / 2..=cap).contains(&delay), "query #{n} delay {delay} ms outside [{}, {cap}]", cap / 2);
            }
            other => panic!("expected exactly one Query timer, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Join
// ---------------------------------------------------------------------------

#[test]
fn join_of_unknown_enlists() {
    let mut h = H::new();
    let (_, fx) = h.join(T0, TX);
    assert_eq!(fx, vec![Fx::Enlist(TX)]);
    assert_eq!(h.core.phase(TX), Some(Phase::Joining));
    assert!(h.core.in_doubt().is_empty());
}

#[test]
fn duplicate_join_while_joining_waits_and_all_are_joined() {
    let mut h = H::new();
    let (r1, _) = h.join(T0, TX);
    let (r2, fx) = h.join(at(1), TX);
    assert_eq!(fx, vec![], "one Enlist per transaction");
    let fx = h.enlisted(at(5), TX, Ok(dl()));
    assert_eq!(fx, vec![Fx::Reply(r1, R::Joined(dl())), Fx::Reply(r2, R::Joined(dl())), Fx::Timer(dl(), Timer::Deadline(TX))]);
    assert_eq!(h.core.phase(TX), Some(Phase::Active));
    // Joined already: answered at once.
    let (r3, fx) = h.join(at(6), TX);
    assert_eq!(fx, vec![Fx::Reply(r3, R::Joined(dl()))]);
}

#[test]
fn enlisted_with_a_past_deadline_sets_the_timer_now() {
    let mut h = H::new();
    let (r1, _) = h.join(T0, TX);
    let fx = h.enlisted(at(50), TX, Ok(at(20)));
    assert_eq!(fx, vec![Fx::Reply(r1, R::Joined(at(20))), Fx::Timer(at(50), Timer::Deadline(TX))]);
}

#[test]
fn enlisted_err_refuses_every_waiter_and_forgets_the_branch() {
    let mut h = H::new();
    let (r1, _) = h.join(T0, TX);
    let (r2, _) = h.join(at(1), TX);
    let fx = h.enlisted(at(5), TX, Err(EnlistError::Refused("transaction tx-5-1 no longer accepts participants".into())));
    let refused = CoreError::JoinRefused { txn: TX, why: "transaction tx-5-1 no longer accepts participants".into() };
    assert_eq!(fx, vec![err(r1, refused.clone()), err(r2, refused)]);
    assert_eq!(h.core.phase(TX), None);
    // A late duplicate answer changes nothing; a new Join asks again.
    assert_eq!(h.enlisted(at(6), TX, Ok(dl())), vec![]);
    assert_eq!(h.core.phase(TX), None);
    let (_, fx) = h.join(at(7), TX);
    assert_eq!(fx, vec![Fx::Enlist(TX)]);
}

#[test]
fn an_unreachable_coordinator_makes_the_join_retryable_and_forgets_the_branch() {
    let mut h = H::new();
    let (r, _) = h.join(T0, TX);
    let fx = h.enlisted(at(5), TX, Err(EnlistError::Unreachable("tcp connect error".into())));
    assert_eq!(fx, vec![err(r, CoreError::CoordinatorUnreachable { txn: TX, why: "tcp connect error".into() })]);
    assert_eq!(h.core.phase(TX), None, "nothing was done under it");
    let (_, fx) = h.join(at(7), TX);
    assert_eq!(fx, vec![Fx::Enlist(TX)], "a retried call enlists again");
}

#[test]
fn enlisted_for_unknown_or_not_joining_is_ignored() {
    let mut h = H::new();
    assert_eq!(h.enlisted(T0, TX, Ok(dl())), vec![]);
    assert_eq!(h.core.phase(TX), None);
    let _ = h.active();
    assert_eq!(h.enlisted(at(6), TX, Ok(at(99_999))), vec![], "a duplicate answer");
    assert_eq!(h.enlisted(at(6), TX, Err(EnlistError::Refused("x".into()))), vec![], "a contradicting duplicate answer");
    assert_eq!(h.core.phase(TX), Some(Phase::Active));
    let (r, fx) = h.join(at(7), TX);
    assert_eq!(fx, vec![Fx::Reply(r, R::Joined(dl()))], "the first deadline stays");
}

#[test]
fn join_is_refused_once_the_branch_is_past_active() {
    let mut h = H::new();
    let _ = h.preparing();
    let (r, fx) = h.join(at(105), TX);
    assert_eq!(fx, vec![err(r, CoreError::JoinRefused { txn: TX, why: "the transaction is preparing here".into() })]);
    let _ = h.voted(at(110), TX, Ok(Vote::Yes));
    let (r, fx) = h.join(at(111), TX);
    assert_eq!(fx, vec![err(r, CoreError::JoinRefused { txn: TX, why: "the transaction is preparing here".into() })]);
    let _ = h.durable(at(120), TX);
    let (r, fx) = h.join(at(121), TX);
    assert_eq!(fx, vec![err(r, CoreError::JoinRefused { txn: TX, why: "the transaction is prepared here".into() })]);
    let _ = h.abort(at(130), TX);
    let _ = h.applied(at(131), TX);
    let (r, fx) = h.join(at(132), TX);
    assert_eq!(fx, vec![err(r, CoreError::JoinRefused { txn: TX, why: "the transaction is aborted here".into() })]);
}

// ---------------------------------------------------------------------------
// Prepare and the vote
// ---------------------------------------------------------------------------

#[test]
fn prepare_with_payload_on_unknown_asks_the_resource() {
    let mut h = H::new();
    let (r, fx) = h.prepare(at(100), payload());
    assert_eq!(fx, vec![Fx::ResourcePrepare(TX, payload())]);
    assert!(fx.iter().all(|f| !matches!(f, Fx::Reply(q, _) if *q == r)), "no vote before the resource answers");
    assert_eq!(h.core.phase(TX), Some(Phase::Preparing));
}

#[test]
fn prepare_without_payload_on_unknown_votes_no() {
    let mut h = H::new();
    let (r, fx) = h.prepare(at(100), None);
    assert_eq!(fx, vec![no(r, NO_WORK)]);
    assert_eq!(h.core.phase(TX), None, "no branch is created");
}

#[test]
fn prepare_without_payload_on_a_joined_branch_asks_the_resource() {
    let mut h = H::new();
    let _ = h.active();
    let (_, fx) = h.prepare_with(at(100), TX, EPOCH, None, at(9_000));
    assert_eq!(fx, vec![Fx::ResourcePrepare(TX, None)]);
    // The Prepare's deadline is the one recorded.
    let fx = h.voted(at(110), TX, Ok(Vote::Yes));
    assert_eq!(fx, vec![Fx::Persist(TX, rec(BranchState::Prepared, at(9_000), EPOCH, at(110)))]);
}

#[test]
fn prepare_while_joining_votes_no() {
    let mut h = H::new();
    let _ = h.join(T0, TX);
    let (r, fx) = h.prepare(at(10), payload());
    assert_eq!(fx, vec![no(r, "enlistment is still in progress")]);
    assert_eq!(h.core.phase(TX), Some(Phase::Joining));
}

#[test]
fn resource_yes_persists_and_votes_only_once_durable() {
    let mut h = H::new();
    let r = h.preparing();
    let fx = h.voted(at(110), TX, Ok(Vote::Yes));
    assert_eq!(fx, vec![Fx::Persist(TX, rec(BranchState::Prepared, dl(), EPOCH, at(110)))], "no vote before the record is durable");
    assert!(h.core.in_doubt().is_empty(), "not prepared until durable");
    let fx = h.durable(at(120), TX);
    assert_eq!(fx, vec![yes(r), first_query(at(120), TX)]);
    assert_eq!(h.core.phase(TX), Some(Phase::Prepared));
    assert_eq!(h.core.in_doubt(), vec![TX]);
}

#[test]
fn durable_after_the_deadline_queries_from_now() {
    let mut h = H::new();
    let (r, _) = h.prepare_with(at(10), TX, EPOCH, payload(), at(50));
    let _ = h.voted(at(20), TX, Ok(Vote::Yes));
    let fx = h.durable(at(500), TX);
    assert_eq!(fx, vec![yes(r), first_query(at(500), TX)]);
}

#[test]
fn duplicate_prepare_while_preparing_waits_for_the_same_vote() {
    let mut h = H::new();
    let r1 = h.preparing();
    let (r2, fx) = h.prepare(at(105), payload());
    assert_eq!(fx, vec![], "the resource is asked once");
    let fx = h.voted(at(110), TX, Ok(Vote::No("insufficient funds".into())));
    assert_eq!(fx, vec![no(r1, "insufficient funds"), no(r2, "insufficient funds"), apply_abort(TX, dl(), EPOCH, at(110))]);
}

#[test]
fn duplicate_prepare_while_persisting_waits_for_durable() {
    let mut h = H::new();
    let r1 = h.persisting();
    let (r2, fx) = h.prepare(at(115), payload());
    assert_eq!(fx, vec![]);
    let fx = h.durable(at(120), TX);
    assert_eq!(fx, vec![yes(r1), yes(r2), first_query(at(120), TX)]);
}

#[test]
fn duplicate_prepare_once_prepared_answers_yes() {
    let mut h = H::new();
    let _ = h.prepared();
    let (r, fx) = h.prepare(at(130), payload());
    assert_eq!(fx, vec![yes(r)], "Prepared");
    let (r, fx) = h.prepare(at(130), None);
    assert_eq!(fx, vec![yes(r)], "Prepared, without payload");
    let _ = h.commit(at(200), TX);
    let (r, fx) = h.prepare(at(201), payload());
    assert_eq!(fx, vec![yes(r)], "Committing");
    let _ = h.applied(at(210), TX);
    let (r, fx) = h.prepare(at(211), payload());
    assert_eq!(fx, vec![yes(r)], "Committed");
}

#[test]
fn duplicate_prepare_after_abort_answers_no() {
    let mut h = H::new();
    let _ = h.prepared();
    let _ = h.abort(at(130), TX);
    let (r, fx) = h.prepare(at(131), payload());
    assert_eq!(fx, vec![no(r, ABORTED_HERE)], "Aborting");
    let _ = h.applied(at(140), TX);
    let (r, fx) = h.prepare(at(141), payload());
    assert_eq!(fx, vec![no(r, ABORTED_HERE)], "Aborted");
}

#[test]
fn resource_no_votes_no_and_aborts() {
    let mut h = H::new();
    let r = h.preparing();
    let fx = h.voted(at(110), TX, Ok(Vote::No("constraint violated".into())));
    assert_eq!(fx, vec![no(r, "constraint violated"), apply_abort(TX, dl(), EPOCH, at(110))]);
    assert_eq!(h.core.phase(TX), Some(Phase::Aborting));
    assert_eq!(h.applied(at(120), TX), vec![forget(at(120), TX)]);
    assert_eq!(h.core.phase(TX), Some(Phase::Aborted));
}

#[test]
fn resource_error_votes_no() {
    let mut h = H::new();
    let r = h.preparing();
    let fx = h.voted(at(110), TX, Err("disk unplugged".into()));
    assert_eq!(fx, vec![no(r, "the resource failed to prepare: disk unplugged"), apply_abort(TX, dl(), EPOCH, at(110))]);
}

#[test]
fn read_only_votes_read_only_releases_and_forgets_after_retention() {
    let mut h = H::new();
    let r = h.preparing();
    let fx = h.voted(at(110), TX, Ok(Vote::ReadOnly));
    assert_eq!(fx, vec![Fx::Reply(r, R::Voted(Vote::ReadOnly)), Fx::Apply { txn: TX, commit: true, record: None, synced: false }]);
    assert!(h.core.in_doubt().is_empty());
    assert_eq!(h.core.phase(TX), Some(Phase::Releasing));
    // Released: nothing to record, but remembered until its retention ends.
    assert_eq!(h.applied(at(120), TX), vec![forget(at(120), TX)]);
    assert_eq!(h.core.phase(TX), Some(Phase::Released));
    assert!(h.core.in_doubt().is_empty());
    assert_eq!(h.applied(at(121), TX), vec![], "a stale second report");
    // The Forget timer drops it without an Effect::Forget: it has no record.
    assert_eq!(h.timer(at(120).plus(RETENTION), Timer::Forget(TX)), vec![]);
    assert_eq!(h.core.phase(TX), None);
    assert_eq!(h.timer(at(121).plus(RETENTION), Timer::Forget(TX)), vec![], "forgotten once");
}

/// A released read-only branch answers duplicates from memory, as the first
/// time: Prepare gets READ_ONLY again without asking the resource (with or
/// without a payload, from any epoch), Commit and Abort are acknowledged,
/// Join is refused, and timers other than its Forget timer do nothing. Once
/// forgotten, long past its deadline, a Prepare is refused.
#[test]
fn released_read_only_branch_answers_duplicates_from_memory() {
    let mut h = H::new();
    let _ = h.preparing();
    let _ = h.voted(at(110), TX, Ok(Vote::ReadOnly));
    assert_eq!(h.applied(at(120), TX), vec![forget(at(120), TX)]);
    let read_only = |r| Fx::Reply(r, R::Voted(Vote::ReadOnly));
    let (r, fx) = h.prepare(at(130), payload());
    assert_eq!(fx, vec![read_only(r)], "no second ResourcePrepare");
    let (r, fx) = h.prepare(at(131), None);
    assert_eq!(fx, vec![read_only(r)]);
    let (r, fx) = h.prepare_with(at(132), TX, EPOCH + 1, payload(), dl());
    assert_eq!(fx, vec![read_only(r)], "not a first Prepare, so not judged stale");
    let (r, fx) = h.commit(at(140), TX);
    assert_eq!(fx, vec![acked(r)]);
    let (r, fx) = h.abort(at(141), TX);
    assert_eq!(fx, vec![acked(r)]);
    let (r, fx) = h.join(at(142), TX);
    assert_eq!(fx, vec![err(r, CoreError::JoinRefused { txn: TX, why: "the transaction is read-only, finished here".into() })]);
    for t in [Timer::Deadline(TX), Timer::Query(TX), Timer::RetryApply(TX)] {
        assert_eq!(h.timer(dl(), t), vec![], "{t:?}");
    }
    assert_eq!(h.core.phase(TX), Some(Phase::Released));
    assert!(h.core.in_doubt().is_empty());

    let end = at(120).plus(RETENTION);
    assert!(end > dl(), "retention outlasts the deadline");
    assert_eq!(h.timer(end, Timer::Forget(TX)), vec![]);
    assert_eq!(h.core.phase(TX), None);
    let (r, fx) = h.prepare(end, payload());
    assert_eq!(fx, vec![no(r, DEADLINE_PASSED)], "refused without asking the resource");
}

// ---------------------------------------------------------------------------
// Commit
// ---------------------------------------------------------------------------

#[test]
fn commit_on_prepared_applies_durably_and_acks_only_after_applied() {
    let mut h = H::new();
    let _ = h.prepared();
    let (r, fx) = h.commit(at(200), TX);
    assert_eq!(fx, vec![apply_commit(TX, dl(), EPOCH, at(200))], "no Acked before the apply is durable");
    assert_eq!(h.core.in_doubt(), vec![TX], "still in doubt while committing");
    assert_eq!(h.applied(at(210), TX), vec![acked(r), forget(at(210), TX)]);
    assert_eq!(h.core.phase(TX), Some(Phase::Committed));
    assert!(h.core.in_doubt().is_empty());
}

#[test]
fn duplicate_commit_waits_while_committing_and_is_acked_after() {
    let mut h = H::new();
    let r1 = h.committing();
    let (r2, fx) = h.commit(at(205), TX);
    assert_eq!(fx, vec![], "one apply");
    assert_eq!(h.applied(at(210), TX), vec![acked(r1), acked(r2), forget(at(210), TX)]);
    let (r3, fx) = h.commit(at(220), TX);
    assert_eq!(fx, vec![acked(r3)]);
    // Applied again (a stale report) changes nothing.
    assert_eq!(h.applied(at(230), TX), vec![]);
}

#[test]
fn commit_on_unknown_is_acked() {
    let mut h = H::new();
    let (r, fx) = h.commit(T0, TX);
    assert_eq!(fx, vec![acked(r)]);
    assert_eq!(h.core.phase(TX), None);
}

#[test]
fn commit_after_forget_is_acked() {
    let mut h = H::new();
    h.committed();
    assert_eq!(h.timer(at(210).plus(RETENTION), Timer::Forget(TX)), vec![Fx::Forget(TX)]);
    assert_eq!(h.core.phase(TX), None);
    let (r, fx) = h.commit(at(210).plus(RETENTION), TX);
    assert_eq!(fx, vec![acked(r)]);
}

#[test]
fn commit_on_an_unprepared_branch_is_refused() {
    let not_prepared = |state| CoreError::NotPrepared { txn: TX, state };
    // Joining.
    let mut h = H::new();
    let _ = h.join(T0, TX);
    let (r, fx) = h.commit(at(1), TX);
    assert_eq!(fx, vec![err(r, not_prepared("joining"))]);
    // Active.
    let mut h = H::new();
    let _ = h.active();
    let (r, fx) = h.commit(at(10), TX);
    assert_eq!(fx, vec![err(r, not_prepared("active, not prepared"))]);
    assert_eq!(h.core.phase(TX), Some(Phase::Active));
    // Preparing, Persisting.
    let mut h = H::new();
    let _ = h.preparing();
    let (r, fx) = h.commit(at(101), TX);
    assert_eq!(fx, vec![err(r, not_prepared("preparing"))]);
    let _ = h.voted(at(110), TX, Ok(Vote::Yes));
    let (r, fx) = h.commit(at(111), TX);
    assert_eq!(fx, vec![err(r, not_prepared("preparing"))]);
    assert_eq!(h.core.phase(TX), Some(Phase::Persisting));
    // Aborting, Aborted.
    let mut h = H::new();
    let _ = h.active();
    let _ = h.abort(at(10), TX);
    let (r, fx) = h.commit(at(11), TX);
    assert_eq!(fx, vec![err(r, not_prepared("aborting"))]);
    let _ = h.applied(at(12), TX);
    let (r, fx) = h.commit(at(13), TX);
    assert_eq!(fx, vec![err(r, not_prepared("aborted"))]);
}

// ---------------------------------------------------------------------------
// Abort
// ---------------------------------------------------------------------------

#[test]
fn abort_on_unknown_acks_and_leaves_a_tombstone() {
    let mut h = H::new();
    let (ra, fx) = h.abort(at(100), TX);
    assert_eq!(fx, vec![tombstone(TX, EPOCH, at(100))], "acknowledged only once the tombstone is durable");
    assert_eq!(h.core.phase(TX), Some(Phase::Aborting));
    // A late Prepare, even with a payload, is refused and takes no locks.
    let (r, fx) = h.prepare(at(150), payload());
    assert_eq!(fx, vec![no(r, ABORTED_HERE)]);
    assert_eq!(h.applied(at(160), TX), vec![acked(ra), forget(at(160), TX)]);
    assert_eq!(h.core.phase(TX), Some(Phase::Aborted));
    let (r, fx) = h.prepare(at(170), payload());
    assert_eq!(fx, vec![no(r, ABORTED_HERE)]);
    let (r, fx) = h.abort(at(180), TX);
    assert_eq!(fx, vec![acked(r)], "a duplicate Abort");
    let (r, fx) = h.join(at(190), TX);
    assert_eq!(fx, vec![err(r, CoreError::JoinRefused { txn: TX, why: "the transaction is aborted here".into() })]);
    // Until the retention ends; then its record is deleted too.
    assert_eq!(h.timer(at(160).plus(RETENTION), Timer::Forget(TX)), vec![Fx::Forget(TX)]);
    assert_eq!(h.core.phase(TX), None);
}

#[test]
fn abort_while_preparing_is_pending_until_the_resource_answers() {
    let mut h = H::new();
    let rp = h.preparing();
    let (ra, fx) = h.abort(at(105), TX);
    assert_eq!(fx, vec![acked(ra)]);
    assert_eq!(h.core.phase(TX), Some(Phase::Preparing));
    // The resource says YES, but the branch aborts instead of persisting.
    let fx = h.voted(at(110), TX, Ok(Vote::Yes));
    assert_eq!(fx, vec![no(rp, ABORTED_WHILE_PREPARING), apply_abort(TX, dl(), EPOCH, at(110))]);
    assert_eq!(h.applied(at(120), TX), vec![forget(at(120), TX)]);
    assert_eq!(h.core.phase(TX), Some(Phase::Aborted));
}

#[test]
fn abort_while_preparing_then_resource_no() {
    let mut h = H::new();
    let rp = h.preparing();
    let _ = h.abort(at(105), TX);
    let fx = h.voted(at(110), TX, Ok(Vote::No("conflict".into())));
    assert_eq!(fx, vec![no(rp, "conflict"), apply_abort(TX, dl(), EPOCH, at(110))]);
}

#[test]
fn abort_while_persisting_is_pending_until_durable() {
    let mut h = H::new();
    let rp = h.persisting();
    let (ra, fx) = h.abort(at(115), TX);
    assert_eq!(fx, vec![acked(ra)]);
    let (ra2, fx) = h.abort(at(116), TX);
    assert_eq!(fx, vec![acked(ra2)], "a duplicate Abort");
    let fx = h.durable(at(120), TX);
    assert_eq!(fx, vec![no(rp, ABORTED_WHILE_PREPARING), apply_abort(TX, dl(), EPOCH, at(120))], "never YES after an abort");
    assert!(h.core.in_doubt().is_empty());
    assert_eq!(h.applied(at(130), TX), vec![forget(at(130), TX)]);
}

#[test]
fn abort_while_persisting_then_persist_failed() {
    let mut h = H::new();
    let rp = h.persisting();
    let _ = h.abort(at(115), TX);
    let fx = h.step(at(120), Input::PersistFailed { txn: TX, error: "io".into() });
    assert_eq!(fx, vec![err(rp, CoreError::Unavailable("io".into())), apply_abort(TX, dl(), EPOCH, at(120))]);
}

#[test]
fn abort_on_prepared_applies_then_acks() {
    let mut h = H::new();
    let _ = h.prepared();
    let (r1, fx) = h.abort(at(200), TX);
    assert_eq!(fx, vec![apply_abort(TX, dl(), EPOCH, at(200))]);
    assert_eq!(h.core.phase(TX), Some(Phase::Aborting));
    assert!(h.core.in_doubt().is_empty());
    let (r2, fx) = h.abort(at(205), TX);
    assert_eq!(fx, vec![], "a duplicate Abort waits for the same apply");
    assert_eq!(h.applied(at(210), TX), vec![acked(r1), acked(r2), forget(at(210), TX)]);
    let (r3, fx) = h.abort(at(220), TX);
    assert_eq!(fx, vec![acked(r3)]);
    assert_eq!(h.core.phase(TX), Some(Phase::Aborted));
}

#[test]
fn abort_on_committed_is_already_committed() {
    let mut h = H::new();
    let _ = h.committing();
    let (r, fx) = h.abort(at(205), TX);
    assert_eq!(fx, vec![err(r, CoreError::AlreadyCommitted(TX))], "Committing");
    let _ = h.applied(at(210), TX);
    let (r, fx) = h.abort(at(215), TX);
    assert_eq!(fx, vec![err(r, CoreError::AlreadyCommitted(TX))], "Committed");
    assert_eq!(h.core.phase(TX), Some(Phase::Committed));
}

#[test]
fn abort_on_active_applies_then_acks() {
    let mut h = H::new();
    let _ = h.active();
    let (r, fx) = h.abort(at(50), TX);
    assert_eq!(fx, vec![apply_abort(TX, dl(), EPOCH, at(50))]);
    assert_eq!(h.applied(at(60), TX), vec![acked(r), forget(at(60), TX)]);
    // The deadline timer, later, does nothing.
    assert_eq!(h.timer(dl(), Timer::Deadline(TX)), vec![]);
}

#[test]
fn abort_on_joining_refuses_the_joiners() {
    let mut h = H::new();
    let (rj, _) = h.join(T0, TX);
    let (ra, fx) = h.abort(at(2), TX);
    assert_eq!(
        fx,
        vec![
            err(rj, CoreError::JoinRefused { txn: TX, why: "the transaction was aborted".into() }),
            apply_abort(TX, UnixMillis(0), EPOCH, at(2)),
        ]
    );
    assert_eq!(h.applied(at(3), TX), vec![acked(ra), forget(at(3), TX)]);
    // The coordinator's late answer to the Enlist is ignored.
    assert_eq!(h.enlisted(at(4), TX, Ok(dl())), vec![]);
    assert_eq!(h.core.phase(TX), Some(Phase::Aborted));
}

// ---------------------------------------------------------------------------
// Timers
// ---------------------------------------------------------------------------

#[test]
fn deadline_timer_on_active_aborts() {
    let mut h = H::new();
    let _ = h.active();
    assert_eq!(h.timer(dl(), Timer::Deadline(TX)), vec![apply_abort(TX, dl(), EPOCH, dl())]);
    assert_eq!(h.core.phase(TX), Some(Phase::Aborting));
    assert_eq!(h.applied(dl().plus(1), TX), vec![forget(dl().plus(1), TX)]);
    let (r, fx) = h.prepare(dl().plus(2), payload());
    assert_eq!(fx, vec![no(r, ABORTED_HERE)]);
}

#[test]
fn early_deadline_timer_does_nothing() {
    let mut h = H::new();
    let _ = h.active();
    assert_eq!(h.timer(at(9_999), Timer::Deadline(TX)), vec![]);
    assert_eq!(h.core.phase(TX), Some(Phase::Active));
}

#[test]
fn deadline_timer_never_decides_a_preparing_or_prepared_branch() {
    let mut h = H::new();
    let _ = h.preparing();
    assert_eq!(h.timer(dl(), Timer::Deadline(TX)), vec![], "Preparing");
    let _ = h.voted(dl(), TX, Ok(Vote::Yes));
    assert_eq!(h.timer(dl(), Timer::Deadline(TX)), vec![], "Persisting");
    let _ = h.durable(dl(), TX);
    assert_eq!(h.timer(dl().plus(50_000), Timer::Deadline(TX)), vec![], "Prepared");
    assert_eq!(h.core.phase(TX), Some(Phase::Prepared));
    assert_eq!(h.core.in_doubt(), vec![TX]);
}

#[test]
fn query_timer_on_prepared_asks_the_coordinator() {
    let mut h = H::new();
    let _ = h.prepared();
    // Durable at at(120): the first Query is due at(120) + QUERY_AFTER_PREPARE,
    // well before the deadline.
    assert!(at(120 + QUERY_AFTER_PREPARE) < dl());
    assert_eq!(h.timer(at(120 + QUERY_AFTER_PREPARE), Timer::Query(TX)), vec![Fx::Query(TX)]);
}

#[test]
fn query_timer_elsewhere_does_nothing() {
    let mut h = H::new();
    assert_eq!(h.timer(T0, Timer::Query(TX)), vec![], "unknown");
    let _ = h.active();
    assert_eq!(h.timer(at(10), Timer::Query(TX)), vec![], "Active");
    let _ = h.prepare(at(100), payload());
    assert_eq!(h.timer(at(101), Timer::Query(TX)), vec![], "Preparing");
    let _ = h.voted(at(110), TX, Ok(Vote::Yes));
    assert_eq!(h.timer(at(111), Timer::Query(TX)), vec![], "Persisting");
    let _ = h.durable(at(120), TX);
    let _ = h.commit(at(200), TX);
    assert_eq!(h.timer(at(201), Timer::Query(TX)), vec![], "Committing");
    let _ = h.applied(at(210), TX);
    assert_eq!(h.timer(at(211), Timer::Query(TX)), vec![], "Committed");
}

#[test]
fn decided_commit_applies_the_commit() {
    let mut h = H::new();
    let _ = h.prepared();
    let now = at(120 + QUERY_AFTER_PREPARE + 5);
    assert_eq!(h.decided(now, TX, Ok(Decision::Commit)), vec![apply_commit(TX, dl(), EPOCH, now)]);
    assert_eq!(h.core.phase(TX), Some(Phase::Committing));
    // A second answer while committing is ignored.
    assert_eq!(h.decided(now, TX, Ok(Decision::Commit)), vec![]);
    assert_eq!(h.applied(now.plus(1), TX), vec![forget(now.plus(1), TX)]);
    assert_eq!(h.core.phase(TX), Some(Phase::Committed));
}

#[test]
fn decided_abort_applies_the_abort() {
    let mut h = H::new();
    let _ = h.prepared();
    let now = at(120 + QUERY_AFTER_PREPARE + 5);
    assert_eq!(h.decided(now, TX, Ok(Decision::Abort)), vec![apply_abort(TX, dl(), EPOCH, now)]);
    assert_eq!(h.applied(now.plus(1), TX), vec![forget(now.plus(1), TX)]);
    assert_eq!(h.core.phase(TX), Some(Phase::Aborted));
}

#[test]
fn decided_pending_or_failed_asks_again_with_backoff() {
    let mut h = H::new();
    let _ = h.prepared();
    let mut now = at(120 + QUERY_AFTER_PREPARE);
    for n in 1..=7u32 {
        let answer = if n % 2 == 1 { Ok(Decision::Pending) } else { Err("coordinator unavailable".to_owned()) };
        let fx = h.decided(now, TX, answer);
        H::expect_query_backoff(&fx, now, TX, n);
        let Fx::Timer(when, _) = fx[0] else { unreachable!() };
        now = when;
        assert_eq!(h.timer(now, Timer::Query(TX)), vec![Fx::Query(TX)]);
    }
    assert_eq!(h.core.phase(TX), Some(Phase::Prepared), "never decides alone");
}

#[test]
fn decided_when_not_prepared_is_ignored() {
    let mut h = H::new();
    assert_eq!(h.decided(T0, TX, Ok(Decision::Commit)), vec![], "unknown");
    let _ = h.active();
    assert_eq!(h.decided(at(10), TX, Ok(Decision::Commit)), vec![], "Active");
    assert_eq!(h.decided(at(10), TX, Ok(Decision::Abort)), vec![], "Active");
    assert_eq!(h.core.phase(TX), Some(Phase::Active));
    let mut h = H::new();
    h.committed();
    assert_eq!(h.decided(at(300), TX, Ok(Decision::Abort)), vec![], "Committed");
    assert_eq!(h.core.phase(TX), Some(Phase::Committed));
}

// ---------------------------------------------------------------------------
// Stale epochs and deadlines
// ---------------------------------------------------------------------------

#[test]
fn first_prepare_of_an_older_epoch_is_refused() {
    let mut h = H::new();
    let newer = TxnId { epoch: 5, seq: 9 };
    let (_, fx) = h.prepare_with(at(1), newer, 5, payload(), dl());
    assert_eq!(fx, vec![Fx::ResourcePrepare(newer, payload())]);
    let old = TxnId { epoch: 3, seq: 1 };
    let (r, fx) = h.prepare_with(at(2), old, 3, payload(), dl());
    assert_eq!(fx, vec![no(r, &stale(5, 3))], "no ResourcePrepare");
    assert_eq!(h.core.phase(old), None);
    // Same epoch, or newer, is fine.
    let same = TxnId { epoch: 5, seq: 2 };
    let (_, fx) = h.prepare_with(at(3), same, 5, payload(), dl());
    assert_eq!(fx, vec![Fx::ResourcePrepare(same, payload())]);
}

#[test]
fn epochs_are_learned_only_from_prepares_of_their_own_run() {
    let old = TxnId { epoch: 3, seq: 1 };
    // Commit, Abort, or a Prepare claiming another run's epoch, teach
    // nothing: an unchecked epoch must not make the current run's
    // transactions look stale.
    let mut h = H::new();
    let _ = h.commit(T0, TxnId { epoch: 5, seq: 77 });
    let _ = h.abort(T0, TxnId { epoch: 5, seq: 78 });
    let (r, fx) = h.prepare_with(at(1), TxnId { epoch: 3, seq: 9 }, 9, payload(), dl());
    assert_eq!(fx, vec![Fx::ResourcePrepare(TxnId { epoch: 3, seq: 9 }, payload())], "claimed epoch 9 for a txn of epoch 3");
    let _ = r;
    let (_, fx) = h.prepare_with(at(2), old, 3, payload(), dl());
    assert_eq!(fx, vec![Fx::ResourcePrepare(old, payload())], "still not stale");

    // A Prepare of epoch 5's own run is learned: epoch 3 is then stale.
    let mut h = H::new();
    let _ = h.prepare_with(at(1), TxnId { epoch: 5, seq: 1 }, 5, payload(), dl());
    let (r, fx) = h.prepare_with(at(2), old, 3, payload(), dl());
    assert_eq!(fx, vec![no(r, &stale(5, 3))]);
}

#[test]
fn stale_prepare_aborts_a_joined_branch() {
    let mut h = H::new();
    let old = TxnId { epoch: 3, seq: 1 };
    let (rj, _) = h.join(T0, old);
    assert_eq!(h.enlisted(at(1), old, Ok(dl())), vec![Fx::Reply(rj, R::Joined(dl())), Fx::Timer(dl(), Timer::Deadline(old))]);
    let _ = h.prepare_with(at(2), TxnId { epoch: 5, seq: 1 }, 5, payload(), dl());
    let (r, fx) = h.prepare_with(at(3), old, 3, None, dl());
    assert_eq!(fx, vec![no(r, &stale(5, 3)), apply_abort(old, dl(), 3, at(3))]);
    assert_eq!(h.core.phase(old), Some(Phase::Aborting));
}

#[test]
fn a_newer_epoch_does_not_change_a_prepared_vote() {
    let mut h = H::new();
    let old = TxnId { epoch: 3, seq: 1 };
    let (r, _) = h.prepare_with(at(1), old, 3, payload(), dl());
    let _ = h.voted(at(2), old, Ok(Vote::Yes));
    assert_eq!(h.durable(at(3), old)[0], yes(r));
    let _ = h.prepare_with(at(4), TxnId { epoch: 5, seq: 1 }, 5, payload(), dl());
    let (r, fx) = h.prepare_with(at(5), old, 3, payload(), dl());
    assert_eq!(fx, vec![yes(r)], "not a first Prepare");
    // And a commit from the newer run (recovered decision) still applies.
    let req = h.req();
    let fx = h.step(at(6), Input::Commit { req, txn: old, epoch: 5 });
    assert_eq!(fx, vec![apply_commit(old, dl(), 3, at(6))]);
}

#[test]
fn prepare_after_the_deadline_is_refused() {
    let mut h = H::new();
    let (r, fx) = h.prepare_with(dl(), TX, EPOCH, payload(), dl());
    assert_eq!(fx, vec![no(r, DEADLINE_PASSED)]);
    assert_eq!(h.core.phase(TX), None);
    // A joined branch is aborted too.
    let mut h = H::new();
    let _ = h.active();
    let (r, fx) = h.prepare_with(dl().plus(5), TX, EPOCH, None, dl());
    assert_eq!(fx, vec![no(r, DEADLINE_PASSED), apply_abort(TX, dl(), EPOCH, dl().plus(5))]);
}

#[test]
fn prepare_without_a_deadline_is_not_checked_against_one() {
    let mut h = H::new();
    let (_, fx) = h.prepare_with(at(999_999), TX, EPOCH, payload(), UnixMillis(0));
    assert_eq!(fx, vec![Fx::ResourcePrepare(TX, payload())]);
}

// ---------------------------------------------------------------------------
// Log and apply failures
// ---------------------------------------------------------------------------

#[test]
fn persist_failed_answers_unavailable_and_aborts() {
    let mut h = H::new();
    let r1 = h.persisting();
    let (r2, _) = h.prepare(at(112), payload());
    let fx = h.step(at(120), Input::PersistFailed { txn: TX, error: "no space left".into() });
    assert_eq!(
        fx,
        vec![
            err(r1, CoreError::Unavailable("no space left".into())),
            err(r2, CoreError::Unavailable("no space left".into())),
            apply_abort(TX, dl(), EPOCH, at(120)),
        ]
    );
    assert_eq!(h.core.phase(TX), Some(Phase::Aborting));
    assert!(h.core.in_doubt().is_empty());
    assert_eq!(h.applied(at(130), TX), vec![forget(at(130), TX)]);
    let (r, fx) = h.prepare(at(140), payload());
    assert_eq!(fx, vec![no(r, ABORTED_HERE)], "the coordinator's retry is refused");
}

#[test]
fn persist_failed_when_not_persisting_is_ignored() {
    let mut h = H::new();
    assert_eq!(h.step(T0, Input::PersistFailed { txn: TX, error: "x".into() }), vec![], "unknown");
    let _ = h.preparing();
    assert_eq!(h.step(at(101), Input::PersistFailed { txn: TX, error: "x".into() }), vec![], "Preparing");
    let _ = h.voted(at(110), TX, Ok(Vote::Yes));
    let _ = h.durable(at(120), TX);
    assert_eq!(h.step(at(121), Input::PersistFailed { txn: TX, error: "x".into() }), vec![], "Prepared");
    assert_eq!(h.core.phase(TX), Some(Phase::Prepared));
}

/// A failed apply keeps the known outcome: the branch stays Committing and
/// applies again after a backoff; a retried Commit waits for that apply.
#[test]
fn apply_failed_on_commit_keeps_the_outcome_and_retries() {
    let mut h = H::new();
    let r = h.committing();
    let fx = h.apply_failed(at(205), TX, "resource busy");
    assert_eq!(
        fx,
        vec![err(r, CoreError::Unavailable("resource busy".into())), Fx::Timer(at(205 + 2 * QUERY_BASE), Timer::RetryApply(TX))]
    );
    assert_eq!(h.core.phase(TX), Some(Phase::Committing));
    assert_eq!(h.core.in_doubt(), vec![TX]);
    // The coordinator's retry waits for the pending apply.
    let (r2, fx) = h.commit(at(250), TX);
    assert_eq!(fx, vec![]);
    assert_eq!(h.timer(at(405), Timer::RetryApply(TX)), vec![apply_commit(TX, dl(), EPOCH, at(405))]);
    assert_eq!(h.applied(at(410), TX), vec![acked(r2), forget(at(410), TX)]);
}

/// The same for an abort of a prepared branch: it stays Aborting (it never
/// goes back to Prepared, which could vote YES again) and retries.
#[test]
fn apply_failed_on_a_prepared_abort_keeps_the_outcome_and_retries() {
    let mut h = H::new();
    let _ = h.prepared();
    let (r, _) = h.abort(at(200), TX);
    let fx = h.apply_failed(at(205), TX, "resource busy");
    assert_eq!(
        fx,
        vec![err(r, CoreError::Unavailable("resource busy".into())), Fx::Timer(at(205 + 2 * QUERY_BASE), Timer::RetryApply(TX))]
    );
    assert_eq!(h.core.phase(TX), Some(Phase::Aborting));
    let retried = Fx::Apply { txn: TX, commit: false, record: Some(rec(BranchState::Aborted, dl(), EPOCH, at(405))), synced: true };
    assert_eq!(h.timer(at(405), Timer::RetryApply(TX)), vec![retried], "a retried abort is written durably");
    assert_eq!(h.timer(at(406), Timer::RetryApply(TX)), vec![], "a replayed timer applies nothing more");
    assert_eq!(h.decided(at(406), TX, Ok(Decision::Commit)), vec![], "a decided branch ignores late answers");
}

/// A RetryApply timer applies again only after a failed apply, and only
/// once per failure: one that fires with no failure pending (stray, stale,
/// or replayed while the retried apply is in flight or after it landed)
/// issues no second Apply, so a commit is never applied twice at once.
#[test]
fn a_replayed_retry_apply_timer_does_nothing() {
    let mut h = H::new();
    let r = h.committing();
    assert_eq!(h.timer(at(201), Timer::RetryApply(TX)), vec![], "no failed apply: the first apply is in flight");
    let fx = h.apply_failed(at(205), TX, "resource busy");
    assert_eq!(
        fx,
        vec![err(r, CoreError::Unavailable("resource busy".into())), Fx::Timer(at(205 + 2 * QUERY_BASE), Timer::RetryApply(TX))]
    );
    assert_eq!(h.timer(at(405), Timer::RetryApply(TX)), vec![apply_commit(TX, dl(), EPOCH, at(405))]);
    assert_eq!(h.timer(at(406), Timer::RetryApply(TX)), vec![], "replayed while the retried apply is in flight");
    // It fails again: one more timer, backing off further, acting once.
    assert_eq!(h.apply_failed(at(410), TX, "resource busy"), vec![Fx::Timer(at(410 + 4 * QUERY_BASE), Timer::RetryApply(TX))]);
    assert_eq!(h.timer(at(810), Timer::RetryApply(TX)), vec![apply_commit(TX, dl(), EPOCH, at(810))]);
    assert_eq!(h.timer(at(811), Timer::RetryApply(TX)), vec![]);
    assert_eq!(h.timer(at(405), Timer::RetryApply(TX)), vec![], "the first timer, replayed");
    let (r2, fx) = h.commit(at(812), TX);
    assert_eq!(fx, vec![], "the coordinator's retry waits for the apply in flight");
    assert_eq!(h.applied(at(820), TX), vec![acked(r2), forget(at(820), TX)]);
    assert_eq!(h.timer(at(821), Timer::RetryApply(TX)), vec![], "after the commit landed");
    assert_eq!(h.core.phase(TX), Some(Phase::Committed));
}

/// The same for a read-only release: retried once per failure, then
/// released.
#[test]
fn a_failed_release_is_retried_once_per_failure() {
    let mut h = H::new();
    let _ = h.preparing();
    let _ = h.voted(at(110), TX, Ok(Vote::ReadOnly));
    assert_eq!(h.timer(at(111), Timer::RetryApply(TX)), vec![], "no failed release");
    assert_eq!(h.apply_failed(at(120), TX, "resource busy"), vec![Fx::Timer(at(120 + 2 * QUERY_BASE), Timer::RetryApply(TX))]);
    assert_eq!(h.core.phase(TX), Some(Phase::Releasing));
    let release = Fx::Apply { txn: TX, commit: true, record: None, synced: false };
    assert_eq!(h.timer(at(320), Timer::RetryApply(TX)), vec![release]);
    assert_eq!(h.timer(at(321), Timer::RetryApply(TX)), vec![], "replayed");
    assert_eq!(h.applied(at(330), TX), vec![forget(at(330), TX)]);
    assert_eq!(h.core.phase(TX), Some(Phase::Released));
    assert_eq!(h.timer(at(331), Timer::RetryApply(TX)), vec![], "after the release");
}

#[test]
fn apply_failed_for_unknown_is_ignored() {
    let mut h = H::new();
    assert_eq!(h.apply_failed(T0, TX, "x"), vec![]);
    assert_eq!(h.core.phase(TX), None);
}

// ---------------------------------------------------------------------------
// Recovery
// ---------------------------------------------------------------------------

#[test]
fn recover_of_prepared_records_asks_and_lists_them_in_doubt() {
    let mut h = H::new();
    let t1 = TxnId { epoch: 4, seq: 2 };
    let t2 = TxnId { epoch: 6, seq: 1 };
    let fx = norm(
        h.core.recover(T0, vec![(t2, rec(BranchState::Prepared, dl(), 6, at(1))), (t1, rec(BranchState::Prepared, at(500), 4, at(2)))]),
    );
    assert_eq!(fx, vec![Fx::Query(t2), Fx::Query(t1)]);
    assert_eq!(h.core.in_doubt(), vec![t1, t2]);
    assert_eq!(h.core.phase(t1), Some(Phase::Prepared));
    // A duplicate Prepare is answered YES from the record.
    let (r, fx) = h.prepare_with(at(10), t1, 4, None, at(500));
    assert_eq!(fx, vec![yes(r)]);
    // The recovered epoch makes older first Prepares stale.
    let (r, fx) = h.prepare_with(at(11), TX, 5, payload(), dl());
    assert_eq!(fx, vec![no(r, &stale(6, 5))]);
    // The answers settle them.
    assert_eq!(h.decided(at(20), t1, Ok(Decision::Commit)), vec![apply_commit(t1, at(500), 4, at(20))]);
    assert_eq!(h.decided(at(21), t2, Ok(Decision::Abort)), vec![apply_abort(t2, dl(), 6, at(21))]);
    assert!(h.core.in_doubt().contains(&t1), "committing is still in doubt until applied");
    let _ = h.applied(at(30), t1);
    let _ = h.applied(at(31), t2);
    assert!(h.core.in_doubt().is_empty());
}

#[test]
fn recover_of_aborted_records_leaves_tombstones() {
    let mut h = H::new();
    let t1 = TxnId { epoch: 5, seq: 3 };
    let t2 = TxnId { epoch: 5, seq: 4 };
    let t3 = TxnId { epoch: 5, seq: 5 };
    let old_update = UnixMillis(T0.0 - RETENTION - 1_000);
    let fx = norm(h.core.recover(
        T0,
        vec![
            (t1, rec(BranchState::Aborted, dl(), 5, old_update)),
            (t2, rec(BranchState::Aborted, UnixMillis(0), 5, UnixMillis(T0.0 - 10))),
            (t3, rec(BranchState::Unspecified, dl(), 5, UnixMillis(T0.0 - 10))),
        ],
    ));
    assert_eq!(
        fx,
        vec![
            Fx::Timer(T0, Timer::Forget(t1)),
            Fx::Timer(UnixMillis(T0.0 - 10 + RETENTION), Timer::Forget(t2)),
            Fx::Timer(UnixMillis(T0.0 - 10 + RETENTION), Timer::Forget(t3)),
        ]
    );
    assert!(h.core.in_doubt().is_empty());
    for t in [t1, t2, t3] {
        assert_eq!(h.core.phase(t), Some(Phase::Aborted));
        let (r, fx) = h.prepare_with(at(1), t, 5, payload(), dl());
        assert_eq!(fx, vec![no(r, ABORTED_HERE)], "{t}: no ResourcePrepare");
        let (r, fx) = h.commit(at(2), t);
        assert_eq!(fx, vec![err(r, CoreError::NotPrepared { txn: t, state: "aborted" })]);
        let (r, fx) = h.abort(at(3), t);
        assert_eq!(fx, vec![acked(r)]);
    }
    // Their retention ends: each tombstone and its record are forgotten.
    assert_eq!(h.timer(T0, Timer::Forget(t1)), vec![Fx::Forget(t1)]);
    assert_eq!(h.timer(UnixMillis(T0.0 - 10 + RETENTION), Timer::Forget(t2)), vec![Fx::Forget(t2)]);
    assert_eq!(h.timer(UnixMillis(T0.0 - 10 + RETENTION), Timer::Forget(t3)), vec![Fx::Forget(t3)]);
    for t in [t1, t2, t3] {
        assert_eq!(h.core.phase(t), None);
    }
}

#[test]
fn recover_of_committed_records() {
    let mut h = H::new();
    let fx = norm(h.core.recover(T0, vec![(TX, rec(BranchState::Committed, dl(), EPOCH, T0))]));
    assert_eq!(fx, vec![forget(T0, TX)]);
    assert_eq!(h.core.phase(TX), Some(Phase::Committed));
    assert!(h.core.in_doubt().is_empty());
    let (r, fx) = h.commit(at(1), TX);
    assert_eq!(fx, vec![acked(r)]);
    let (r, fx) = h.abort(at(2), TX);
    assert_eq!(fx, vec![err(r, CoreError::AlreadyCommitted(TX))]);
    let (r, fx) = h.prepare(at(3), payload());
    assert_eq!(fx, vec![yes(r)]);
    assert_eq!(h.timer(T0.plus(RETENTION), Timer::Forget(TX)), vec![Fx::Forget(TX)]);
    assert_eq!(h.core.phase(TX), None);
}

// ---------------------------------------------------------------------------
// Stale inputs
// ---------------------------------------------------------------------------

#[test]
fn stale_inputs_are_ignored() {
    let mut h = H::new();
    // Unknown transaction.
    assert_eq!(h.voted(T0, TX, Ok(Vote::Yes)), vec![]);
    assert_eq!(h.durable(T0, TX), vec![]);
    assert_eq!(h.applied(T0, TX), vec![]);
    for t in [Timer::Deadline(TX), Timer::Query(TX), Timer::Forget(TX)] {
        assert_eq!(h.timer(T0, t), vec![], "{t:?}");
    }
    assert_eq!(h.core.phase(TX), None, "nothing created a branch");

    // Active.
    let _ = h.active();
    assert_eq!(h.voted(at(10), TX, Ok(Vote::Yes)), vec![]);
    assert_eq!(h.durable(at(10), TX), vec![]);
    assert_eq!(h.applied(at(10), TX), vec![]);
    assert_eq!(h.timer(at(10), Timer::Forget(TX)), vec![]);
    assert_eq!(h.core.phase(TX), Some(Phase::Active));

    // Preparing: a Durable that cannot be ours.
    let _ = h.prepare(at(100), payload());
    assert_eq!(h.durable(at(101), TX), vec![]);
    assert_eq!(h.applied(at(101), TX), vec![]);
    assert_eq!(h.core.phase(TX), Some(Phase::Preparing));

    // Prepared: duplicate resource and log reports.
    let _ = h.voted(at(110), TX, Ok(Vote::Yes));
    assert_eq!(h.voted(at(111), TX, Ok(Vote::No("late".into()))), vec![], "a second resource answer");
    let _ = h.durable(at(120), TX);
    assert_eq!(h.durable(at(121), TX), vec![]);
    assert_eq!(h.voted(at(122), TX, Ok(Vote::Yes)), vec![]);
    assert_eq!(h.applied(at(123), TX), vec![]);
    assert_eq!(h.timer(at(124), Timer::Forget(TX)), vec![]);
    assert_eq!(h.core.phase(TX), Some(Phase::Prepared));
    assert_eq!(h.core.in_doubt(), vec![TX]);
}

#[test]
fn forget_timer_drops_finished_branches_only() {
    let mut h = H::new();
    let _ = h.prepared();
    assert_eq!(h.timer(at(130), Timer::Forget(TX)), vec![]);
    assert_eq!(h.core.phase(TX), Some(Phase::Prepared));
    let _ = h.abort(at(200), TX);
    assert_eq!(h.timer(at(201), Timer::Forget(TX)), vec![]);
    assert_eq!(h.core.phase(TX), Some(Phase::Aborting), "not while the abort is applied");
    let _ = h.applied(at(210), TX);
    assert_eq!(h.timer(at(210).plus(RETENTION), Timer::Forget(TX)), vec![Fx::Forget(TX)]);
    assert_eq!(h.core.phase(TX), None);
    assert_eq!(h.timer(at(211).plus(RETENTION), Timer::Forget(TX)), vec![], "forgotten once");
}

/// Garbage collection: a Forget timer for a Committed branch drops it and
/// asks the driver to delete its record; a second firing does nothing.
#[test]
fn forget_timer_on_committed_emits_forget() {
    let mut h = H::new();
    h.committed();
    assert_eq!(h.timer(at(210).plus(RETENTION), Timer::Forget(TX)), vec![Fx::Forget(TX)]);
    assert_eq!(h.core.phase(TX), None);
    assert!(h.core.in_doubt().is_empty());
    assert_eq!(h.timer(at(211).plus(RETENTION), Timer::Forget(TX)), vec![], "a stale second Forget timer");
}

/// The same for an abort tombstone (Abort of a branch never seen): once its
/// retention ends, it is dropped and its record deleted; a later Abort leaves
/// a new tombstone.
#[test]
fn forget_timer_on_an_abort_tombstone_emits_forget() {
    let mut h = H::new();
    let (r, fx) = h.abort(at(100), TX);
    assert_eq!(fx, vec![tombstone(TX, EPOCH, at(100))]);
    assert_eq!(h.applied(at(110), TX), vec![acked(r), forget(at(110), TX)]);
    assert_eq!(h.core.phase(TX), Some(Phase::Aborted));
    assert_eq!(h.timer(at(110).plus(RETENTION), Timer::Forget(TX)), vec![Fx::Forget(TX)]);
    assert_eq!(h.core.phase(TX), None);
    assert_eq!(h.timer(at(111).plus(RETENTION), Timer::Forget(TX)), vec![], "a stale second Forget timer");
    let now = at(120).plus(RETENTION);
    let (_, fx) = h.abort(now, TX);
    assert_eq!(fx, vec![tombstone(TX, EPOCH, now)]);
}

/// No Forget effect (and nothing dropped) for a branch that is not Committed
/// or Aborted, whatever its phase.
#[test]
fn forget_timer_emits_nothing_for_unfinished_branches() {
    let mut h = H::new();
    let (_, _) = h.join(T0, TX);
    assert_eq!(h.timer(at(1), Timer::Forget(TX)), vec![], "Joining");
    assert_eq!(h.core.phase(TX), Some(Phase::Joining));
    let _ = h.enlisted(at(5), TX, Ok(dl()));
    assert_eq!(h.timer(at(6), Timer::Forget(TX)), vec![], "Active");
    let _ = h.prepare(at(100), payload());
    assert_eq!(h.timer(at(101), Timer::Forget(TX)), vec![], "Preparing");
    let _ = h.voted(at(110), TX, Ok(Vote::Yes));
    assert_eq!(h.timer(at(111), Timer::Forget(TX)), vec![], "Persisting");
    let _ = h.durable(at(120), TX);
    assert_eq!(h.timer(at(121), Timer::Forget(TX)), vec![], "Prepared");
    let _ = h.commit(at(200), TX);
    assert_eq!(h.timer(at(201), Timer::Forget(TX)), vec![], "Committing");
    assert_eq!(h.core.phase(TX), Some(Phase::Committing));
    // Releasing (read-only).
    let mut h = H::new();
    let _ = h.preparing();
    let _ = h.voted(at(110), TX, Ok(Vote::ReadOnly));
    assert_eq!(h.timer(at(111), Timer::Forget(TX)), vec![], "Releasing");
    assert_eq!(h.core.phase(TX), Some(Phase::Releasing));
    // Aborting.
    let mut h = H::new();
    let _ = h.abort(at(100), TX);
    assert_eq!(h.timer(at(101), Timer::Forget(TX)), vec![], "Aborting");
    assert_eq!(h.core.phase(TX), Some(Phase::Aborting));
}

/// The first Query is due `query_after_prepare_ms` after the PREPARED record
/// became durable, even when the deadline is an hour away: a prepared branch
/// resolves as soon as the coordinator can answer.
#[test]
fn prepared_asks_after_query_after_prepare_even_with_a_far_deadline() {
    let mut h = H::new();
    let far = at(3_600_000);
    let (r, fx) = h.prepare_with(at(100), TX, EPOCH, payload(), far);
    assert_eq!(fx, vec![Fx::ResourcePrepare(TX, payload())]);
    assert_eq!(h.voted(at(110), TX, Ok(Vote::Yes)), vec![Fx::Persist(TX, rec(BranchState::Prepared, far, EPOCH, at(110)))]);
    let fx = h.durable(at(130), TX);
    assert_eq!(fx, vec![yes(r), Fx::Timer(at(130 + QUERY_AFTER_PREPARE), Timer::Query(TX))]);
    assert!(at(130 + QUERY_AFTER_PREPARE) < far);
    assert_eq!(h.timer(at(130 + QUERY_AFTER_PREPARE), Timer::Query(TX)), vec![Fx::Query(TX)]);
    let now = at(140 + QUERY_AFTER_PREPARE);
    assert_eq!(h.decided(now, TX, Ok(Decision::Commit)), vec![apply_commit(TX, far, EPOCH, now)]);
}

/// The defaults: the first Query one second after preparing; retries capped
/// at two seconds.
#[test]
fn default_config_values() {
    let c = CoreConfig::default();
    assert_eq!(c.query_after_prepare_ms, 1_000);
    assert_eq!(c.query_base_ms, 100);
    assert_eq!(c.query_max_ms, 2_000);
    assert_eq!(c.retention_ms, 600_000);
}

/// With the default config, Pending answers back off up to `query_max_ms`
/// (2 s) and no further.
#[test]
fn default_query_backoff_is_capped_at_two_seconds() {
    let mut core = Core::new(CoreConfig::default());
    let _ = core.step(at(100), Input::Prepare { req: 1, txn: TX, epoch: EPOCH, payload: payload(), deadline: dl(), one_phase: false });
    let _ = core.step(at(110), Input::ResourceVoted { txn: TX, vote: Ok(Vote::Yes) });
    let fx = norm(core.step(at(120), Input::Durable { txn: TX }));
    assert_eq!(fx, vec![yes(1), Fx::Timer(at(1_120), Timer::Query(TX))]);
    let mut now = at(1_120);
    for n in 1..=10u32 {
        let fx = norm(core.step(now, Input::Decided { txn: TX, decision: Ok(Decision::Pending) }));
        let cap = (100u64 << n).min(2_000);
        let [Fx::Timer(when, Timer::Query(t))] = fx.as_slice() else { panic!("expected one Query timer, got {fx:?}") };
        assert_eq!(*t, TX);
        let delay = now.until(*when);
        assert!((cap / 2..=cap).contains(&delay), "query #{n} delay {delay} ms outside [{}, {cap}]", cap / 2);
        now = *when;
    }
}

#[test]
fn independent_transactions_do_not_interfere() {
    let mut h = H::new();
    let t2 = TxnId { epoch: EPOCH, seq: 2 };
    let r1 = h.preparing();
    let (r2, fx) = h.prepare_with(at(101), t2, EPOCH, payload(), dl());
    assert_eq!(fx, vec![Fx::ResourcePrepare(t2, payload())]);
    assert_eq!(h.voted(at(102), t2, Ok(Vote::No("x".into()))), vec![no(r2, "x"), apply_abort(t2, dl(), EPOCH, at(102))]);
    assert_eq!(h.core.phase(TX), Some(Phase::Preparing));
    let fx = h.voted(at(110), TX, Ok(Vote::Yes));
    assert_eq!(fx, vec![Fx::Persist(TX, rec(BranchState::Prepared, dl(), EPOCH, at(110)))]);
    assert_eq!(h.durable(at(120), TX)[0], yes(r1));
}

// ---------------------------------------------------------------------------
// Bugs found and fixed, kept as regression tests
// ---------------------------------------------------------------------------

/// Persist before vote and idempotency: a read-only branch has no PREPARED
/// record, so while its release is applied a duplicate Prepare gets the
/// first answer, READ_ONLY, never YES.
#[test]
fn read_only_branch_never_answers_yes_while_releasing() {
    let mut h = H::new();
    let r1 = h.preparing();
    let fx = h.voted(at(110), TX, Ok(Vote::ReadOnly));
    assert_eq!(fx[0], Fx::Reply(r1, R::Voted(Vote::ReadOnly)));
    let (r2, fx) = h.prepare(at(111), payload());
    assert!(!fx.contains(&yes(r2)), "YES without a durable PREPARED record: {fx:?}");
    assert!(!fx.iter().any(|f| matches!(f, Fx::Persist(..))));
}

/// A failed read-only release is retried; the branch never becomes Prepared
/// (which would vote YES and record a commit it never prepared).
#[test]
fn failed_read_only_release_never_becomes_prepared() {
    let mut h = H::new();
    let _ = h.preparing();
    let _ = h.voted(at(110), TX, Ok(Vote::ReadOnly));
    let _ = h.apply_failed(at(120), TX, "resource busy");
    assert_ne!(h.core.phase(TX), Some(Phase::Prepared), "a read-only branch is not prepared");
    let (r, fx) = h.prepare(at(130), payload());
    assert!(!fx.contains(&yes(r)), "YES without a durable PREPARED record: {fx:?}");
}

/// After a PersistFailed the branch aborts; if that apply fails too, a
/// duplicate Prepare still gets NO: YES needs a record reported durable.
#[test]
fn failed_persist_never_leads_to_yes() {
    let mut h = H::new();
    let r1 = h.persisting();
    let fx = h.step(at(120), Input::PersistFailed { txn: TX, error: "io".into() });
    assert_eq!(fx[0], err(r1, CoreError::Unavailable("io".into())));
    let _ = h.apply_failed(at(130), TX, "resource busy");
    let (r2, fx) = h.prepare(at(140), payload());
    assert!(!fx.contains(&yes(r2)), "YES although the PREPARED record never became durable: {fx:?}");
}

/// No hanging: Abort of an unknown branch answers Acked at once and leaves a
/// tombstone; if applying that abort fails, the tombstone stays (the apply is
/// retried) and a late Prepare with a payload is still refused.
#[test]
fn tombstone_survives_a_failed_apply() {
    let mut h = H::new();
    let (r, fx) = h.abort(at(100), TX);
    assert_eq!(fx, vec![tombstone(TX, EPOCH, at(100))]);
    assert_eq!(
        h.apply_failed(at(110), TX, "resource busy"),
        vec![err(r, CoreError::Unavailable("resource busy".into())), Fx::Timer(at(110 + 2 * QUERY_BASE), Timer::RetryApply(TX))]
    );
    let (r, fx) = h.prepare(at(120), payload());
    assert_eq!(fx, vec![no(r, ABORTED_HERE)], "the abort was acknowledged; a late Prepare must take no locks");
}

/// After voting NO, a failed abort apply keeps the branch aborting: a
/// duplicate Prepare gets the first answer (NO) and the payload never runs
/// again.
#[test]
fn no_vote_survives_a_failed_apply() {
    let mut h = H::new();
    let r1 = h.preparing();
    let fx = h.voted(at(110), TX, Ok(Vote::No("conflict".into())));
    assert_eq!(fx[0], no(r1, "conflict"));
    let _ = h.apply_failed(at(120), TX, "resource busy");
    let (r2, fx) = h.prepare(at(130), payload());
    assert!(matches!(fx.as_slice(), [Fx::Reply(r, R::Voted(Vote::No(_)))] if *r == r2), "expected NO again, got {fx:?}");
}

/// After an Abort of a joining branch whose apply fails, a new Join is
/// refused: the abort is not forgotten.
#[test]
fn aborted_join_survives_a_failed_apply() {
    let mut h = H::new();
    let _ = h.join(T0, TX);
    let _ = h.abort(at(2), TX);
    let _ = h.apply_failed(at(3), TX, "resource busy");
    let (r, fx) = h.join(at(4), TX);
    assert!(matches!(fx.as_slice(), [Fx::Reply(q, R::Error(CoreError::JoinRefused { .. }))] if *q == r), "got {fx:?}");
}

// ---------------------------------------------------------------------------
// Seeded random exploration
// ---------------------------------------------------------------------------

/// A seeded generator (rand's `StdRng`) with the few draws the
/// exploration needs.
struct Rng(rand::rngs::StdRng);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(rand::SeedableRng::seed_from_u64(seed))
    }
    fn next(&mut self) -> u64 {
        rand::Rng::random(&mut self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { rand::Rng::random_range(&mut self.0, 0..n) }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        rand::seq::IndexedRandom::choose(items, &mut self.0).cloned()
    }
    fn take<T>(&mut self, items: &mut Vec<T>) -> Option<T> {
        if items.is_empty() { None } else { Some(items.swap_remove(self.below(items.len() as u64) as usize)) }
    }
}

fn seed_from_env_or_clock() -> u64 {
    match std::env::var("TWOPC_SEED") {
        Ok(s) => s.trim().parse().expect("TWOPC_SEED must be an unsigned integer"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0x5EED),
    }
}

fn input_txn(input: &Input) -> TxnId {
    match input {
        Input::Join { txn, .. }
        | Input::Enlisted { txn, .. }
        | Input::Prepare { txn, .. }
        | Input::ResourceVoted { txn, .. }
        | Input::Durable { txn }
        | Input::PersistFailed { txn, .. }
        | Input::Commit { txn, .. }
        | Input::Abort { txn, .. }
        | Input::Applied { txn }
        | Input::ApplyFailed { txn, .. }
        | Input::Decided { txn, .. }
        | Input::Released { txn, .. } => *txn,
        Input::Recover { epoch, .. } | Input::FenceDurable { epoch } | Input::FenceFailed { epoch, .. } => TxnId { epoch: *epoch, seq: 0 },
        Input::Timer(Timer::Deadline(txn) | Timer::Query(txn) | Timer::Forget(txn) | Timer::RetryApply(txn)) => *txn,
    }
}

struct Explorer {
    rng: Rng,
    core: Core,
    now: UnixMillis,
    next_req: ReqId,
    txns: Vec<TxnId>,
    /// Durable was reported while the branch was Persisting (or recovered
    /// prepared): the only branches that may vote YES.
    durable: BTreeSet<TxnId>,
    /// Voted READ_ONLY.
    read_only: BTreeSet<TxnId>,
    /// Had a PersistFailed.
    persist_failed: BTreeSet<TxnId>,
    prepare_reqs: BTreeMap<ReqId, TxnId>,
    enlists: Vec<TxnId>,
    resource: Vec<TxnId>,
    persists: Vec<TxnId>,
    applies: Vec<TxnId>,
    queries: Vec<TxnId>,
    timers: Vec<(UnixMillis, Timer)>,
    /// Timers already fired, for replays.
    fired: Vec<Timer>,
    /// A failed apply whose RetryApply timer has not acted yet.
    retry_pending: BTreeSet<TxnId>,
    prefix: String,
    ctx: String,
}

impl Explorer {
    fn new(seed: u64) -> Self {
        let mut txns: Vec<TxnId> = (1..=5).map(|seq| TxnId { epoch: 5, seq }).collect();
        txns.push(TxnId { epoch: 3, seq: 1 });
        txns.push(TxnId { epoch: 6, seq: 1 });
        txns.push(TxnId { epoch: 4, seq: 9 });
        Explorer {
            rng: Rng::new(seed),
            core: Core::new(CoreConfig { seed, ..config() }),
            now: T0,
            next_req: 0,
            txns,
            durable: BTreeSet::new(),
            read_only: BTreeSet::new(),
            persist_failed: BTreeSet::new(),
            prepare_reqs: BTreeMap::new(),
            enlists: Vec::new(),
            resource: Vec::new(),
            persists: Vec::new(),
            applies: Vec::new(),
            queries: Vec::new(),
            timers: Vec::new(),
            fired: Vec::new(),
            retry_pending: BTreeSet::new(),
            prefix: String::new(),
            ctx: String::new(),
        }
    }

    fn req(&mut self) -> ReqId {
        self.next_req += 1;
        self.next_req
    }

    fn recover(&mut self) {
        let prepared = TxnId { epoch: 4, seq: 9 };
        let effects = self.core.recover(self.now, vec![(prepared, rec(BranchState::Prepared, self.now.plus(5_000), 4, self.now))]);
        self.durable.insert(prepared);
        self.ctx = format!("{} recovery", self.prefix);
        self.observe(None, effects);
    }

    fn apply(&mut self, input: Input) {
        self.ctx = format!("{} at {:?} after {input:?}", self.prefix, self.now);
        let txn = input_txn(&input);
        let before = self.core.phase(txn);
        match &input {
            Input::Durable { .. } if before == Some(Phase::Persisting) => {
                self.durable.insert(txn);
            }
            Input::ResourceVoted { vote: Ok(Vote::ReadOnly), .. } if before == Some(Phase::Preparing) => {
                self.read_only.insert(txn);
            }
            Input::PersistFailed { .. } if before == Some(Phase::Persisting) => {
                self.persist_failed.insert(txn);
            }
            Input::Prepare { req, .. } => {
                self.prepare_reqs.insert(*req, txn);
            }
            Input::ApplyFailed { .. } if matches!(before, Some(Phase::Releasing | Phase::Committing | Phase::Aborting)) => {
                self.retry_pending.insert(txn);
            }
            _ => {}
        }
        let retry_pending = matches!(input, Input::Timer(Timer::RetryApply(_))) && self.retry_pending.remove(&txn);
        if let Input::Timer(t) = &input {
            self.fired.push(*t);
        }
        let effects = self.core.step(self.now, input.clone());
        let forgets = effects.iter().filter(|e| matches!(e, Effect::Forget { .. })).count();
        let drops_finished = matches!(input, Input::Timer(Timer::Forget(_))) && matches!(before, Some(Phase::Committed | Phase::Aborted));
        assert_eq!(forgets, usize::from(drops_finished), "{}: Forget effects {effects:?} for {txn} in phase {before:?}", self.ctx);
        if drops_finished {
            assert_eq!(effects, vec![Effect::Forget { txn }], "{}", self.ctx);
            assert_eq!(self.core.phase(txn), None, "{}: {txn} kept after Forget", self.ctx);
        }
        if matches!(input, Input::Timer(Timer::Forget(_))) && before == Some(Phase::Released) {
            assert_eq!(effects, vec![], "{}: a released read-only branch has no record to forget", self.ctx);
            assert_eq!(self.core.phase(txn), None, "{}: released {txn} kept after its Forget timer", self.ctx);
        }
        if matches!(input, Input::Timer(Timer::RetryApply(_))) {
            if retry_pending {
                assert!(
                    matches!(effects.as_slice(), [Effect::Apply { txn: t, .. }] if *t == txn),
                    "{}: the RetryApply timer after a failed apply must apply once: {effects:?}",
                    self.ctx
                );
            } else {
                assert_eq!(effects, vec![], "{}: a RetryApply timer with no failed apply pending acted", self.ctx);
            }
        }
        self.observe(Some((&input, before)), effects);
    }

    fn observe(&mut self, cause: Option<(&Input, Option<Phase>)>, effects: Vec<Effect>) {
        let ctx = self.ctx.clone();
        for e in effects {
            match e {
                Effect::Reply { req, reply: Reply::Voted(SentVote::Yes(_)) } => {
                    let txn = self.prepare_reqs.get(&req).copied().unwrap_or_else(|| panic!("{ctx}: YES to unknown req {req}"));
                    assert!(self.durable.contains(&txn), "{ctx}: YES for {txn} without a durable PREPARED record");
                }
                Effect::Reply { .. } => {}
                Effect::Forget { txn } => {
                    let before = cause.and_then(|(_, b)| b);
                    assert!(matches!(before, Some(Phase::Committed | Phase::Aborted)), "{ctx}: Forget of {txn} in phase {before:?}");
                }
                Effect::Enlist { txn } => self.enlists.push(txn),
                Effect::ResourcePrepare { txn, .. } => {
                    if let Some((_, before)) = cause {
                        assert!(matches!(before, None | Some(Phase::Active)), "{ctx}: ResourcePrepare for {txn} in phase {before:?}");
                    }
                    self.resource.push(txn);
                }
                Effect::PersistPrepared { txn, record } => {
                    assert_eq!(record.state, BranchState::Prepared as i32, "{ctx}");
                    assert!(
                        matches!(cause, Some((Input::ResourceVoted { vote: Ok(Vote::Yes), .. }, Some(Phase::Preparing)))),
                        "{ctx}: PersistPrepared for {txn} without a YES from the resource"
                    );
                    self.persists.push(txn);
                }
                Effect::Apply { txn, commit, record, .. } => {
                    match (&record, commit) {
                        (Some(r), true) => {
                            assert_eq!(r.state, BranchState::Committed as i32, "{ctx}");
                            assert!(self.durable.contains(&txn), "{ctx}: commit of {txn}, which was never durably prepared");
                        }
                        (Some(r), false) => assert_eq!(r.state, BranchState::Aborted as i32, "{ctx}"),
                        (None, commit) => {
                            assert!(
                                commit && self.read_only.contains(&txn),
                                "{ctx}: record-less apply of {txn} that is not a read-only release"
                            );
                        }
                    }
                    assert!(!self.applies.contains(&txn), "{ctx}: a second Apply of {txn} while one is in flight");
                    // A prepared branch never decides alone.
                    if let Some((input, Some(Phase::Prepared))) = cause {
                        let told = match input {
                            Input::Commit { .. } | Input::Decided { decision: Ok(Decision::Commit), .. } => Some(true),
                            Input::Abort { .. } | Input::Decided { decision: Ok(Decision::Abort), .. } => Some(false),
                            _ => None,
                        };
                        assert_eq!(told, Some(commit), "{ctx}: prepared {txn} applied commit={commit} without being told");
                    }
                    self.applies.push(txn);
                }
                Effect::QueryDecision { txn } => self.queries.push(txn),
                Effect::SetTimer { at, timer } => self.timers.push((at, timer)),
                e @ (Effect::Release { .. } | Effect::PersistFence { .. }) => {
                    panic!("{ctx}: {e:?} without a one-phase Prepare or a Recover")
                }
            }
        }
    }

    fn random_step(&mut self) {
        self.now = self.now.plus(match self.rng.below(10) {
            0..=6 => self.rng.below(100),
            7..=8 => self.rng.below(2_000),
            _ => self.rng.below(20_000),
        });
        let txn = self.rng.pick(&self.txns).expect("never empty");
        match self.rng.below(100) {
            0..=9 => {
                let req = self.req();
                self.apply(Input::Join { req, txn });
            }
            10..=17 => {
                if let Some(txn) = self.rng.take(&mut self.enlists) {
                    let result = if self.rng.chance(80) {
                        Ok(self.now.plus(self.rng.below(20_000)))
                    } else {
                        Err(EnlistError::Refused("enlistment closed".into()))
                    };
                    self.apply(Input::Enlisted { txn, result });
                }
            }
            18..=31 => {
                let req = self.req();
                let epoch = if self.rng.chance(85) { txn.epoch } else { 6 };
                let payload = if self.rng.chance(70) { Some(vec![1u8]) } else { None };
                let deadline = match self.rng.below(10) {
                    0 => UnixMillis(0),
                    1 => UnixMillis(self.now.0.saturating_sub(1)),
                    _ => self.now.plus(1 + self.rng.below(20_000)),
                };
                self.apply(Input::Prepare { req, txn, epoch, payload, deadline, one_phase: false });
            }
            32..=43 => {
                if let Some(txn) = self.rng.take(&mut self.resource) {
                    let vote = match self.rng.below(20) {
                        0..=11 => Ok(Vote::Yes),
                        12..=14 => Ok(Vote::No("random no".into())),
                        15..=17 => Ok(Vote::ReadOnly),
                        _ => Err("random resource error".into()),
                    };
                    self.apply(Input::ResourceVoted { txn, vote });
                }
            }
            44..=51 => {
                if let Some(txn) = self.rng.take(&mut self.persists) {
                    if self.rng.chance(85) {
                        self.apply(Input::Durable { txn });
                    } else {
                        self.apply(Input::PersistFailed { txn, error: "random log error".into() });
                    }
                }
            }
            52..=61 => {
                if let Some(txn) = self.rng.take(&mut self.applies) {
                    if self.rng.chance(20) {
                        self.apply(Input::ApplyFailed { txn, error: "random apply error".into() });
                    } else {
                        self.apply(Input::Applied { txn });
                    }
                }
            }
            62..=69 => {
                if let Some(txn) = self.rng.take(&mut self.queries) {
                    let decision = match self.rng.below(8) {
                        0..=1 => Ok(Decision::Commit),
                        2..=3 => Ok(Decision::Abort),
                        4..=5 => Ok(Decision::Pending),
                        _ => Err("coordinator unavailable".into()),
                    };
                    self.apply(Input::Decided { txn, decision });
                }
            }
            70..=76 => {
                let req = self.req();
                let epoch = txn.epoch.max(if self.rng.chance(20) { 6 } else { 0 });
                self.apply(Input::Commit { req, txn, epoch });
            }
            77..=83 => {
                let req = self.req();
                self.apply(Input::Abort { req, txn, epoch: txn.epoch });
            }
            84..=89 => {
                // A stale or replayed timer: each is checked against the
                // state when it fires.
                if let Some(timer) = self.rng.pick(&self.fired) {
                    self.apply(Input::Timer(timer));
                }
            }
            _ => {
                if let Some((at, timer)) = self.rng.take(&mut self.timers) {
                    self.now = self.now.max(at);
                    self.apply(Input::Timer(timer));
                }
            }
        }
    }

    /// Answers everything (the coordinator says abort) until nothing is left;
    /// no branch may be left in a transient phase or in doubt.
    fn drain(&mut self) {
        for _ in 0..100_000 {
            if let Some(txn) = self.enlists.pop() {
                let result = Ok(self.now.plus(1_000));
                self.apply(Input::Enlisted { txn, result });
            } else if let Some(txn) = self.resource.pop() {
                self.apply(Input::ResourceVoted { txn, vote: Ok(Vote::Yes) });
            } else if let Some(txn) = self.persists.pop() {
                self.apply(Input::Durable { txn });
            } else if let Some(txn) = self.applies.pop() {
                self.apply(Input::Applied { txn });
            } else if let Some(txn) = self.queries.pop() {
                self.apply(Input::Decided { txn, decision: Ok(Decision::Abort) });
            } else if !self.timers.is_empty() {
                let i = (0..self.timers.len()).min_by_key(|&i| self.timers[i].0).expect("non-empty");
                let (at, timer) = self.timers.swap_remove(i);
                self.now = self.now.max(at);
                self.apply(Input::Timer(timer));
            } else {
                assert!(self.core.in_doubt().is_empty(), "{}: in doubt after draining: {:?}", self.ctx, self.core.in_doubt());
                for &txn in &self.txns {
                    let phase = self.core.phase(txn);
                    // Active can remain only through the ApplyFailed bug
                    // (tombstone_survives_a_failed_apply): no timer is left.
                    assert!(
                        matches!(phase, None | Some(Phase::Active | Phase::Committed | Phase::Aborted)),
                        "{}: {txn} left in phase {phase:?} after draining",
                        self.ctx
                    );
                }
                return;
            }
        }
        panic!("{}: draining did not terminate", self.ctx);
    }
}

#[test]
fn random_inputs_keep_the_participant_invariants() {
    let seed = seed_from_env_or_clock();
    eprintln!("random_inputs_keep_the_participant_invariants: TWOPC_SEED={seed}");
    let mut master = Rng::new(seed);
    for scenario in 0..40 {
        let sub = master.next();
        let mut x = Explorer::new(sub);
        x.prefix = format!("seed {seed} scenario {scenario}");
        if x.rng.chance(50) {
            x.recover();
        }
        for step in 0..400 {
            x.prefix = format!("seed {seed} scenario {scenario} step {step}");
            x.random_step();
        }
        x.prefix = format!("seed {seed} scenario {scenario} drain");
        x.drain();
    }
}

// ---------------------------------------------------------------------------
// One-phase commit

fn one_phase_prepare(h: &mut H, now: UnixMillis, txn: TxnId, payload: Option<Vec<u8>>) -> (ReqId, Vec<Fx>) {
    let req = h.req();
    (req, h.step(now, Input::Prepare { req, txn, epoch: txn.epoch, payload, deadline: dl(), one_phase: true }))
}

fn one_phase_rec(state: BranchState, epoch: u64, now: UnixMillis, unreleased: bool) -> BranchRecord {
    BranchRecord { one_phase: unreleased, ..rec(state, dl(), epoch, now) }
}

fn committed_vote(req: ReqId) -> Fx {
    Fx::Reply(req, R::Voted(Vote::Committed))
}

#[test]
fn one_phase_commits_in_one_synced_write_and_keeps_it_until_released() {
    let mut h = H::new();
    let (req, fx) = one_phase_prepare(&mut h, at(100), TX, payload());
    assert_eq!(fx, vec![Fx::ResourcePrepare(TX, payload())]);
    // No PREPARED record: the commit itself, marked unreleased, synced.
    let committed = one_phase_rec(BranchState::Committed, EPOCH, at(110), true);
    assert_eq!(h.voted(at(110), TX, Ok(Vote::Yes)), vec![Fx::Apply { txn: TX, commit: true, record: Some(committed), synced: true }]);
    // A duplicate waits for the same answer, sent once the commit is durable.
    let (dup, fx) = one_phase_prepare(&mut h, at(115), TX, payload());
    assert_eq!(fx, vec![]);
    assert_eq!(h.applied(at(120), TX), vec![committed_vote(req), committed_vote(dup)]);
    let (again, fx) = one_phase_prepare(&mut h, at(125), TX, payload());
    assert_eq!(fx, vec![committed_vote(again)]);
    // Kept past its retention until the coordinator releases it: no Forget
    // timer was set. Release rewrites it without the mark and is
    // acknowledged once written.
    let (rel, fx) = h.commit(at(130), TX);
    assert_eq!(fx, vec![Fx::Release(TX, one_phase_rec(BranchState::Committed, EPOCH, at(130), false))]);
    let (rel2, fx) = h.commit(at(131), TX);
    assert_eq!(fx, vec![]);
    let fx = h.step(at(140), Input::Released { txn: TX, result: Ok(()) });
    assert_eq!(fx, vec![acked(rel), acked(rel2), forget(at(140), TX)]);
    let (rel3, fx) = h.commit(at(150), TX);
    assert_eq!(fx, vec![acked(rel3)]);
}

#[test]
fn one_phase_no_is_answered_only_once_the_abort_is_durable() {
    let mut h = H::new();
    let (req, _) = one_phase_prepare(&mut h, at(100), TX, payload());
    let aborted = rec(BranchState::Aborted, dl(), EPOCH, at(110));
    assert_eq!(
        h.voted(at(110), TX, Ok(Vote::No("insufficient funds".into()))),
        vec![Fx::Apply { txn: TX, commit: false, record: Some(aborted), synced: true }]
    );
    let (dup, fx) = one_phase_prepare(&mut h, at(115), TX, payload());
    assert_eq!(fx, vec![]);
    assert_eq!(h.applied(at(120), TX), vec![no(req, "insufficient funds"), no(dup, "insufficient funds"), forget(at(120), TX)]);
}

#[test]
fn a_recovered_unreleased_one_phase_commit_is_kept_and_answered() {
    let mut h = H::new();
    let fx = norm(h.core.recover(at(0), vec![(TX, one_phase_rec(BranchState::Committed, EPOCH, at(0), true))]));
    assert_eq!(fx, vec![], "no Forget timer for an unreleased one-phase commit");
    let (req, fx) = one_phase_prepare(&mut h, at(10), TX, payload());
    assert_eq!(fx, vec![committed_vote(req)]);
    assert_eq!(h.core.in_doubt(), vec![]);
}

#[test]
fn recover_fences_earlier_runs_and_reports_their_unreleased_commits() {
    let mut h = H::new();
    let old = TxnId { epoch: EPOCH, seq: 1 };
    let in_flight = TxnId { epoch: EPOCH, seq: 2 };
    let preparing = TxnId { epoch: EPOCH, seq: 3 };
    // One committed and unreleased, one being written, one preparing.
    let (_, _) = one_phase_prepare(&mut h, at(10), old, payload());
    let _ = h.voted(at(11), old, Ok(Vote::Yes));
    let _ = h.applied(at(12), old);
    let (_, _) = one_phase_prepare(&mut h, at(20), in_flight, payload());
    let _ = h.voted(at(21), in_flight, Ok(Vote::Yes));
    let (prep_req, _) = one_phase_prepare(&mut h, at(30), preparing, payload());

    // Run EPOCH + 1 collects: the fence is written first.
    let req = h.req();
    let fx = h.step(at(40), Input::Recover { req, epoch: EPOCH + 1 });
    assert_eq!(fx, vec![Fx::Fence { epoch: EPOCH + 1, replaces: None }]);
    // Durable, but a commit of the earlier run is still being written.
    assert_eq!(h.step(at(41), Input::FenceDurable { epoch: EPOCH + 1 }), vec![]);
    // The one still preparing is refused by the fence, durably.
    let fx = h.voted(at(42), preparing, Ok(Vote::Yes));
    assert_eq!(
        fx,
        vec![Fx::Apply { txn: preparing, commit: false, record: Some(rec(BranchState::Aborted, dl(), EPOCH, at(42))), synced: true }]
    );
    let fx = h.applied(at(43), preparing);
    assert_eq!(fx, vec![no(prep_req, &stale(EPOCH + 1, EPOCH)), forget(at(43), preparing)]);
    // The written one completes: both commits are reported.
    let fx = h.applied(at(44), in_flight);
    assert_eq!(fx.last(), Some(&Fx::Reply(req, R::Recovered(vec![old, in_flight]))), "{fx:?}");
    // Later one-phase Prepares of the earlier run are refused at once.
    let late = TxnId { epoch: EPOCH, seq: 9 };
    let (late_req, fx) = one_phase_prepare(&mut h, at(50), late, payload());
    assert_eq!(fx, vec![no(late_req, &stale(EPOCH + 1, EPOCH))]);
    // A second Recover of the same run answers from the durable fence; a
    // newer run's replaces it.
    let again = h.req();
    let fx = h.step(at(60), Input::Recover { req: again, epoch: EPOCH + 1 });
    assert_eq!(fx, vec![Fx::Reply(again, R::Recovered(vec![old, in_flight]))]);
    let newer = h.req();
    assert_eq!(
        h.step(at(70), Input::Recover { req: newer, epoch: EPOCH + 2 }),
        vec![Fx::Fence { epoch: EPOCH + 2, replaces: Some(EPOCH + 1) }]
    );
    let failed = h.step(at(71), Input::FenceFailed { epoch: EPOCH + 2, error: "disk full".into() });
    assert_eq!(failed, vec![err(newer, CoreError::Unavailable("disk full".into()))]);
}

#[test]
fn a_failed_fence_write_answers_its_callers_and_a_retry_writes_it_again() {
    let mut h = H::new();
    let first = h.req();
    assert_eq!(h.step(at(10), Input::Recover { req: first, epoch: EPOCH + 1 }), vec![Fx::Fence { epoch: EPOCH + 1, replaces: None }]);
    let lower = h.req();
    assert_eq!(h.step(at(11), Input::Recover { req: lower, epoch: EPOCH }), vec![]);
    let fx = h.step(at(12), Input::FenceFailed { epoch: EPOCH + 1, error: "disk full".into() });
    assert_eq!(fx, vec![err(first, CoreError::Unavailable("disk full".into())), err(lower, CoreError::Unavailable("disk full".into()))]);
    let again = h.req();
    assert_eq!(h.step(at(20), Input::Recover { req: again, epoch: EPOCH + 1 }), vec![Fx::Fence { epoch: EPOCH + 1, replaces: None }]);
    assert_eq!(h.step(at(21), Input::FenceDurable { epoch: EPOCH + 1 }), vec![Fx::Reply(again, R::Recovered(vec![]))]);
}

#[test]
fn a_finished_branch_is_kept_at_least_until_its_deadline() {
    // Retention shorter than the time left to the deadline: a duplicate
    // Prepare could still arrive, so the branch is not forgotten before it.
    let mut h = H { core: Core::new(CoreConfig { retention_ms: 10, ..config() }), next_req: 100 };
    let (req, _) = one_phase_prepare(&mut h, at(100), TX, payload());
    let _ = h.voted(at(110), TX, Ok(Vote::No("no".into())));
    assert_eq!(h.applied(at(120), TX), vec![no(req, "no"), Fx::Timer(dl(), Timer::Forget(TX))]);
}

#[test]
fn a_one_phase_prepare_while_still_joining_aborts_the_branch_before_answering_no() {
    // Found by the simulation: the initiator commits while a business call
    // is still joining. Answering NO and leaving the branch to become active
    // would let a repeated one-phase Prepare commit what the coordinator
    // already reported aborted.
    let mut h = H::new();
    let (join, fx) = h.join(T0, TX);
    assert_eq!(fx, vec![Fx::Enlist(TX)]);
    let (req, fx) = one_phase_prepare(&mut h, at(10), TX, None);
    let aborted = rec(BranchState::Aborted, UnixMillis(0), EPOCH, at(10));
    assert_eq!(
        fx,
        vec![
            err(join, CoreError::JoinRefused { txn: TX, why: "the transaction is already being committed".into() }),
            Fx::Apply { txn: TX, commit: false, record: Some(aborted), synced: true },
        ]
    );
    assert_eq!(h.enlisted(at(11), TX, Ok(dl())), vec![], "a late enlistment changes nothing");
    let fx = h.applied(at(12), TX);
    assert_eq!(fx[0], no(req, "enlistment is still in progress"));
    let (again, fx) = one_phase_prepare(&mut h, at(13), TX, None);
    assert_eq!(fx, vec![no(again, ABORTED_HERE)]);
}
