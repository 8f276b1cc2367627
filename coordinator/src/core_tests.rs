//! Unit tests of the coordinator's protocol core ([`crate::core`]).
//!
//! Every test drives a [`Core`] with fixed times and asserts the exact
//! effects it returns. Effects are first normalised into [`Fx`], because a
//! `PhaseTwo::Commit` carries a `DecisionDurable` witness that only the core
//! can construct (which is the point of the witness).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use twopc_proto::logpb::{DecisionRecord, LoggedParticipant};
use twopc_proto::{AbortCode, AbortReason, Decision, Outcome, ParticipantName, TxnId, UnixMillis, Vote};

use crate::core::*;

// ---------------------------------------------------------------------------
// Fixtures and helpers
// ---------------------------------------------------------------------------

/// This run's epoch in every test.
const EPOCH: u64 = 7;
/// A fixed "now" all tests count from.
const T0: UnixMillis = UnixMillis(1_700_000_000_000);

const DEFAULT_TIMEOUT: u64 = 10_000;
const MAX_TIMEOUT: u64 = 60_000;
const PREPARE_TIMEOUT: u64 = 2_000;
const RETRY_BASE: u64 = 100;
const RETRY_MAX: u64 = 1_000;
const ABORT_ATTEMPTS: u32 = 3;
const RETENTION: u64 = 50_000;

fn at(ms: u64) -> UnixMillis {
    T0.plus(ms)
}

fn config() -> CoreConfig {
    CoreConfig {
        default_timeout_ms: DEFAULT_TIMEOUT,
        max_timeout_ms: MAX_TIMEOUT,
        prepare_timeout_ms: PREPARE_TIMEOUT,
        retry_base_ms: RETRY_BASE,
        retry_max_ms: RETRY_MAX,
        abort_delivery_attempts: ABORT_ATTEMPTS,
        retention_ms: RETENTION,
        seed: 42,
        // Most tests here are of two phases; `one_phase` has its own.
        one_phase: false,
    }
}

fn p(name: &str) -> ParticipantName {
    ParticipantName::new(name).expect("test participant names are valid")
}

fn ep(name: &str) -> String {
    format!("http://{name}.test:50051")
}

fn logged(names: &[&str]) -> Vec<LoggedParticipant> {
    names.iter().map(|n| LoggedParticipant { name: (*n).to_owned(), endpoint: ep(n) }).collect()
}

fn presumed_abort() -> AbortReason {
    AbortReason::new(AbortCode::PresumedAbort, "the coordinator holds no commit decision for this transaction")
}

/// An effect with the phase-two decision reduced to a bool, so tests can
/// build expected values.
#[derive(Debug, Clone, PartialEq)]
enum Fx {
    Reply(ReqId, Reply),
    Persist { txn: TxnId, record: DecisionRecord, synced: bool },
    Prepare { txn: TxnId, to: ParticipantName, endpoint: String, payload: Option<Vec<u8>>, deadline: UnixMillis },
    Decide { txn: TxnId, to: ParticipantName, endpoint: String, commit: bool },
    Timer(UnixMillis, Timer),
    ForgetDecision { txn: TxnId, horizon: TxnId },
    OnePhase { txn: TxnId, to: ParticipantName, payload: Option<Vec<u8>> },
    Marker(ParticipantName),
    ClearMarkers(ParticipantName, Vec<u64>),
    Collect(ParticipantName),
}

fn norm(effects: Vec<Effect>) -> Vec<Fx> {
    effects
        .into_iter()
        .map(|e| match e {
            Effect::Reply { req, reply } => Fx::Reply(req, reply),
            Effect::PersistDecision { txn, record, synced } => Fx::Persist { txn, record, synced },
            Effect::SendPrepare { txn, participant, payload, one_phase: true, .. } => Fx::OnePhase { txn, to: participant, payload },
            Effect::SendPrepare { txn, participant, endpoint, payload, deadline, one_phase: false } => {
                Fx::Prepare { txn, to: participant, endpoint, payload, deadline }
            }
            Effect::PersistMarker { participant } => Fx::Marker(participant),
            Effect::ClearMarkers { participant, epochs } => Fx::ClearMarkers(participant, epochs),
            Effect::Collect { participant } => Fx::Collect(participant),
            Effect::SendDecision { txn, participant, endpoint, decision } => {
                Fx::Decide { txn, to: participant, endpoint, commit: matches!(decision, PhaseTwo::Commit(_)) }
            }
            Effect::SetTimer { at, timer } => Fx::Timer(at, timer),
            Effect::ForgetDecision { txn, horizon } => Fx::ForgetDecision { txn, horizon },
        })
        .collect()
}

fn reply_fx(req: ReqId, reply: Reply) -> Fx {
    Fx::Reply(req, reply)
}

fn committed_fx(req: ReqId, txn: TxnId) -> Fx {
    Fx::Reply(req, Reply::Outcome { txn, outcome: Outcome::Committed })
}

fn aborted_fx(req: ReqId, txn: TxnId, reason: AbortReason) -> Fx {
    Fx::Reply(req, Reply::Outcome { txn, outcome: Outcome::Aborted(reason) })
}

fn error_fx(req: ReqId, e: CoreError) -> Fx {
    Fx::Reply(req, Reply::Error(e))
}

fn prepare_fx(txn: TxnId, name: &str, deadline: UnixMillis) -> Fx {
    Fx::Prepare { txn, to: p(name), endpoint: ep(name), payload: None, deadline }
}

fn commit_to(txn: TxnId, name: &str) -> Fx {
    Fx::Decide { txn, to: p(name), endpoint: ep(name), commit: true }
}

fn abort_to(txn: TxnId, name: &str) -> Fx {
    Fx::Decide { txn, to: p(name), endpoint: ep(name), commit: false }
}

fn decision_record(names: &[&str], decided: UnixMillis, ended: bool) -> DecisionRecord {
    DecisionRecord { participants: logged(names), decided_unix_ms: decided.0, ended }
}

fn forget_fx(now: UnixMillis, txn: TxnId) -> Fx {
    Fx::Timer(now.plus(RETENTION), Timer::Forget(txn))
}

/// The only record of a commit with no YES voter (no participants, or only
/// read-only ones): nothing to force, so it is written lazily and ended from
/// the start, with no participants.
fn lazy_record_fx(txn: TxnId, decided: UnixMillis) -> Fx {
    Fx::Persist { txn, record: decision_record(&[], decided, true), synced: false }
}

/// All replies addressed to `req`.
fn replies_to(fx: &[Fx], req: ReqId) -> Vec<Reply> {
    fx.iter()
        .filter_map(|f| match f {
            Fx::Reply(r, reply) if *r == req => Some(reply.clone()),
            _ => None,
        })
        .collect()
}

/// The one reply addressed to `req`.
fn the_reply(fx: &[Fx], req: ReqId) -> Reply {
    let rs = replies_to(fx, req);
    assert_eq!(rs.len(), 1, "expected exactly one reply to req {req}, effects: {fx:#?}");
    rs.into_iter().next().expect("one reply")
}

/// Phase-two messages: (participant, commit?).
fn decisions(fx: &[Fx]) -> Vec<(String, bool)> {
    fx.iter()
        .filter_map(|f| match f {
            Fx::Decide { to, commit, .. } => Some((to.as_str().to_owned(), *commit)),
            _ => None,
        })
        .collect()
}

fn has_commit_evidence(fx: &[Fx]) -> bool {
    fx.iter().any(|f| matches!(f, Fx::Decide { commit: true, .. } | Fx::Reply(_, Reply::Outcome { outcome: Outcome::Committed, .. })))
}

/// A core and a request-id counter.
struct H {
    core: Core,
    next_req: ReqId,
}

impl H {
    fn new() -> Self {
        H { core: Core::new(EPOCH, config()), next_req: 100 }
    }

    fn req(&mut self) -> ReqId {
        self.next_req += 1;
        self.next_req
    }

    fn step(&mut self, now: UnixMillis, input: Input) -> Vec<Fx> {
        norm(self.core.step(now, input))
    }

    /// Begin that must succeed; checks its exact effects.
    fn begin_at(&mut self, now: UnixMillis, timeout_ms: u64) -> (TxnId, UnixMillis) {
        let req = self.req();
        let fx = self.step(now, Input::Begin { req, timeout_ms });
        let (txn, deadline) = match the_reply(&fx, req) {
            Reply::Begun { txn, deadline } => (txn, deadline),
            other => panic!("Begin was refused: {other:?}"),
        };
        assert_eq!(fx, vec![Fx::Timer(deadline, Timer::Deadline(txn)), reply_fx(req, Reply::Begun { txn, deadline })]);
        (txn, deadline)
    }

    fn enlist(&mut self, now: UnixMillis, txn: TxnId, name: &str) -> (ReqId, Vec<Fx>) {
        let req = self.req();
        let fx = self.step(now, Input::Enlist { req, txn, participant: p(name), endpoint: ep(name), incarnation: 0 });
        (req, fx)
    }

    /// Enlist that must succeed with exactly one Enlisted reply.
    fn enlist_ok(&mut self, now: UnixMillis, txn: TxnId, name: &str, deadline: UnixMillis) {
        let (req, fx) = self.enlist(now, txn, name);
        assert_eq!(fx, vec![reply_fx(req, Reply::Enlisted { deadline })], "enlisting {name} in {txn}");
    }

    fn commit(&mut self, now: UnixMillis, txn: TxnId) -> (ReqId, Vec<Fx>) {
        let req = self.req();
        let fx = self.step(now, Input::Commit { req, txn });
        (req, fx)
    }

    fn abort(&mut self, now: UnixMillis, txn: TxnId, detail: &str) -> (ReqId, Vec<Fx>) {
        let req = self.req();
        let fx = self.step(now, Input::Abort { req, txn, detail: detail.to_owned() });
        (req, fx)
    }

    fn vote(&mut self, now: UnixMillis, txn: TxnId, name: &str, vote: Result<Vote, String>) -> Vec<Fx> {
        self.step(now, Input::Voted { txn, participant: p(name), vote })
    }

    fn delivered(&mut self, now: UnixMillis, txn: TxnId, name: &str, result: Result<(), String>) -> Vec<Fx> {
        self.step(now, Input::Delivered { txn, participant: p(name), result })
    }

    fn durable(&mut self, now: UnixMillis, txn: TxnId) -> Vec<Fx> {
        self.step(now, Input::Durable { txn })
    }

    fn timer(&mut self, now: UnixMillis, timer: Timer) -> Vec<Fx> {
        self.step(now, Input::Timer(timer))
    }

    fn status(&mut self, now: UnixMillis, txn: TxnId) -> Reply {
        let req = self.req();
        let fx = self.step(now, Input::Status { req, txn });
        assert_eq!(fx.len(), 1, "Status has only its reply: {fx:?}");
        the_reply(&fx, req)
    }

    fn txn_status(&mut self, now: UnixMillis, txn: TxnId) -> TxnStatus {
        match self.status(now, txn) {
            Reply::Status(s) => s,
            other => panic!("Status of {txn} failed: {other:?}"),
        }
    }

    fn list(&mut self, now: UnixMillis, in_doubt_only: bool, limit: usize) -> TxnList {
        let req = self.req();
        let fx = self.step(now, Input::List { req, in_doubt_only, limit, filter: Default::default() });
        assert_eq!(fx.len(), 1, "List has only its reply: {fx:?}");
        match the_reply(&fx, req) {
            Reply::List(l) => l,
            other => panic!("List answered {other:?}"),
        }
    }

    fn query(&mut self, now: UnixMillis, txn: TxnId) -> Decision {
        let req = self.req();
        let fx = self.step(now, Input::QueryDecision { req, txn });
        assert_eq!(fx.len(), 1, "QueryDecision has only its reply: {fx:?}");
        match the_reply(&fx, req) {
            Reply::Decision(d) => d,
            other => panic!("QueryDecision of {txn} answered {other:?}"),
        }
    }

    /// Begin at T0 with the default timeout and enlist `names`.
    fn active(&mut self, names: &[&str]) -> (TxnId, UnixMillis) {
        let (txn, deadline) = self.begin_at(T0, 0);
        for n in names {
            self.enlist_ok(at(10), txn, n, deadline);
        }
        (txn, deadline)
    }

    /// [`H::active`], then Commit at `at(100)`; checks the prepare fan-out.
    fn preparing(&mut self, names: &[&str]) -> (TxnId, UnixMillis, ReqId) {
        let (txn, deadline) = self.active(names);
        let (req, fx) = self.commit(at(100), txn);
        let mut sorted: Vec<&str> = names.to_vec();
        sorted.sort();
        sorted.dedup();
        let mut expected: Vec<Fx> = sorted.iter().map(|n| prepare_fx(txn, n, deadline)).collect();
        expected.push(Fx::Timer(at(100 + PREPARE_TIMEOUT).min(deadline), Timer::PrepareTimeout(txn)));
        assert_eq!(fx, expected, "Commit of {txn} fans out prepares");
        (txn, deadline, req)
    }

    /// [`H::preparing`], then every participant votes YES at `at(200)`; checks
    /// that the decision is handed to the log and nothing else happens.
    fn deciding(&mut self, names: &[&str]) -> (TxnId, ReqId) {
        let (txn, _, req) = self.preparing(names);
        let mut sorted: Vec<&str> = names.to_vec();
        sorted.sort();
        for (i, n) in sorted.iter().enumerate() {
            let fx = self.vote(at(200), txn, n, Ok(Vote::Yes));
            if i + 1 < sorted.len() {
                assert_eq!(fx, vec![], "vote of {n} before the last one");
            } else {
                assert_eq!(fx, vec![Fx::Persist { txn, record: decision_record(&sorted, at(200), false), synced: true }]);
            }
        }
        (txn, req)
    }

    /// [`H::deciding`], then the log reports the decision durable at
    /// `at(300)`; checks the reply and the commit fan-out.
    fn committed(&mut self, names: &[&str]) -> (TxnId, ReqId) {
        let (txn, req) = self.deciding(names);
        let fx = self.durable(at(300), txn);
        let mut sorted: Vec<&str> = names.to_vec();
        sorted.sort();
        let mut expected = vec![committed_fx(req, txn)];
        expected.extend(sorted.iter().map(|n| commit_to(txn, n)));
        assert_eq!(fx, expected);
        (txn, req)
    }

    /// The Retry timer set by a failed delivery, checked to lie within the
    /// backoff window for the `retries`-th failure.
    fn expect_retry(&self, fx: &[Fx], now: UnixMillis, txn: TxnId, name: &str, retries: u32) -> UnixMillis {
        let cap = RETRY_BASE.saturating_mul(1 << retries.min(20)).min(RETRY_MAX);
        match fx {
            [Fx::Timer(when, Timer::Retry(t, n))] => {
                assert_eq!((*t, n.as_str()), (txn, name));
                let delay = now.until(*when);
                assert!((cap / 2..=cap).contains(&delay), "retry #{retries} delay {delay} ms outside [{}, {cap}]", cap / 2);
                *when
            }
            other => panic!("expected exactly one Retry timer, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Begin
// ---------------------------------------------------------------------------

#[test]
fn begin_uses_default_timeout_and_sets_deadline_timer() {
    let mut h = H::new();
    let req = h.req();
    let fx = h.step(T0, Input::Begin { req, timeout_ms: 0 });
    let txn = TxnId { epoch: EPOCH, seq: 1 };
    let deadline = at(DEFAULT_TIMEOUT);
    assert_eq!(fx, vec![Fx::Timer(deadline, Timer::Deadline(txn)), reply_fx(req, Reply::Begun { txn, deadline })]);
    assert_eq!(h.core.unfinished(), 1);
    assert_eq!(h.core.epoch(), EPOCH);
}

#[test]
fn begin_issues_increasing_ids_in_this_epoch() {
    let mut h = H::new();
    let (a, _) = h.begin_at(T0, 0);
    let (b, _) = h.begin_at(T0, 0);
    let (c, _) = h.begin_at(T0, 0);
    assert_eq!([a, b, c], [1, 2, 3].map(|seq| TxnId { epoch: EPOCH, seq }));
}

#[test]
fn begin_honours_explicit_timeout_up_to_the_maximum() {
    let mut h = H::new();
    let (_, d1) = h.begin_at(T0, 1_234);
    assert_eq!(d1, at(1_234));
    let (_, d2) = h.begin_at(T0, MAX_TIMEOUT);
    assert_eq!(d2, at(MAX_TIMEOUT));
}

#[test]
fn begin_above_maximum_is_refused_and_issues_no_id() {
    let mut h = H::new();
    let req = h.req();
    let fx = h.step(T0, Input::Begin { req, timeout_ms: MAX_TIMEOUT + 1 });
    assert_eq!(fx, vec![error_fx(req, CoreError::TimeoutTooLong { asked_ms: MAX_TIMEOUT + 1, max_ms: MAX_TIMEOUT })]);
    assert_eq!(h.core.unfinished(), 0);
    // No id was consumed: seq 1 is still unknown and is the next one issued.
    let first = TxnId { epoch: EPOCH, seq: 1 };
    assert_eq!(h.status(T0, first), Reply::Error(CoreError::NotFound(first)));
    let (txn, _) = h.begin_at(T0, 0);
    assert_eq!(txn, first);
}

#[test]
fn default_timeout_above_maximum_is_refused() {
    let mut h = H { core: Core::new(EPOCH, CoreConfig { default_timeout_ms: MAX_TIMEOUT + 5, ..config() }), next_req: 0 };
    let fx = h.step(T0, Input::Begin { req: 1, timeout_ms: 0 });
    assert_eq!(fx, vec![error_fx(1, CoreError::TimeoutTooLong { asked_ms: MAX_TIMEOUT + 5, max_ms: MAX_TIMEOUT })]);
}

#[test]
#[should_panic(expected = "epochs start at 1")]
fn epoch_zero_is_rejected() {
    let _ = Core::new(0, config());
}

// ---------------------------------------------------------------------------
// Enlist
// ---------------------------------------------------------------------------

#[test]
fn enlist_is_idempotent() {
    let mut h = H::new();
    let (txn, deadline) = h.begin_at(T0, 0);
    h.enlist_ok(at(1), txn, "a", deadline);
    h.enlist_ok(at(2), txn, "a", deadline);
    h.enlist_ok(at(3), txn, "b", deadline);
    let s = h.txn_status(at(4), txn);
    assert_eq!(s.state, TxnState::Active);
    assert_eq!(
        s.participants,
        vec![
            ParticipantStatus { name: p("a"), endpoint: ep("a"), vote: None, acknowledged: false, retries: 0 },
            ParticipantStatus { name: p("b"), endpoint: ep("b"), vote: None, acknowledged: false, retries: 0 },
        ]
    );
    // One Prepare per participant, not per Enlist.
    let (_, fx) = h.commit(at(5), txn);
    assert_eq!(
        fx,
        vec![
            prepare_fx(txn, "a", deadline),
            prepare_fx(txn, "b", deadline),
            Fx::Timer(at(5 + PREPARE_TIMEOUT), Timer::PrepareTimeout(txn))
        ]
    );
}

#[test]
fn re_enlist_updates_the_endpoint() {
    let mut h = H::new();
    let (txn, deadline) = h.begin_at(T0, 0);
    h.enlist_ok(at(1), txn, "a", deadline);
    let fx = h.step(at(2), Input::Enlist { req: 1, txn, participant: p("a"), endpoint: "http://moved.test:1".into(), incarnation: 0 });
    assert_eq!(fx, vec![reply_fx(1, Reply::Enlisted { deadline })]);
    let (_, fx) = h.commit(at(3), txn);
    assert_eq!(
        fx[0],
        Fx::Prepare { txn, to: p("a"), endpoint: "http://moved.test:1".into(), payload: None, deadline },
        "the prepare goes to the new address"
    );
}

#[test]
fn enlist_never_issued_id_is_not_found() {
    let mut h = H::new();
    let _ = h.begin_at(T0, 0);
    for txn in [TxnId { epoch: EPOCH, seq: 2 }, TxnId { epoch: EPOCH, seq: 99 }, TxnId { epoch: EPOCH + 1, seq: 1 }] {
        let (req, fx) = h.enlist(at(1), txn, "a");
        assert_eq!(fx, vec![error_fx(req, CoreError::NotFound(txn))], "{txn}");
    }
}

#[test]
fn enlist_issued_but_forgotten_is_closed() {
    let mut h = H::new();
    // An id of an earlier coordinator run.
    let old = TxnId { epoch: EPOCH - 1, seq: 3 };
    let (req, fx) = h.enlist(T0, old, "a");
    assert_eq!(fx, vec![error_fx(req, CoreError::EnlistmentClosed { txn: old, state: "finished" })]);

    // An id of this run, finished (aborted) and forgotten.
    let (txn, _) = h.begin_at(T0, 0);
    let (req, fx) = h.abort(at(1), txn, "");
    assert_eq!(fx, vec![forget_fx(at(1), txn), reply_fx(req, Reply::Aborted { txn })]);
    assert_eq!(h.timer(at(1).plus(RETENTION), Timer::Forget(txn)), vec![]);
    let (req, fx) = h.enlist(at(1).plus(RETENTION), txn, "a");
    assert_eq!(fx, vec![error_fx(req, CoreError::EnlistmentClosed { txn, state: "finished" })]);

    // And one committed (with no participants, so only a lazy record) and
    // forgotten: the record goes and the horizon rises to it.
    let (txn2, _) = h.begin_at(T0, 0);
    let (req, fx) = h.commit(at(2), txn2);
    assert_eq!(fx, vec![committed_fx(req, txn2), lazy_record_fx(txn2, at(2)), forget_fx(at(2), txn2)]);
    assert_eq!(h.timer(at(2).plus(RETENTION), Timer::Forget(txn2)), vec![Fx::ForgetDecision { txn: txn2, horizon: txn2 }]);
    let (req, fx) = h.enlist(at(3).plus(RETENTION), txn2, "a");
    assert_eq!(fx, vec![error_fx(req, CoreError::EnlistmentClosed { txn: txn2, state: "finished" })]);
}

#[test]
fn enlist_after_commit_is_refused_in_every_later_state() {
    let mut h = H::new();
    // Preparing.
    let (txn, _, _) = h.preparing(&["a"]);
    let (req, fx) = h.enlist(at(150), txn, "late");
    assert_eq!(fx, vec![error_fx(req, CoreError::EnlistmentClosed { txn, state: "committing" })]);
    // Deciding.
    assert_eq!(h.vote(at(200), txn, "a", Ok(Vote::Yes)).len(), 1);
    let (req, fx) = h.enlist(at(250), txn, "late");
    assert_eq!(fx, vec![error_fx(req, CoreError::EnlistmentClosed { txn, state: "committing" })]);
    // Committed.
    assert!(has_commit_evidence(&h.durable(at(300), txn)));
    let (req, fx) = h.enlist(at(350), txn, "late");
    assert_eq!(fx, vec![error_fx(req, CoreError::EnlistmentClosed { txn, state: "committed" })]);
    // The late participant never joined.
    assert_eq!(h.txn_status(at(400), txn).participants.len(), 1);

    // Aborted.
    let (txn, _) = h.active(&["a"]);
    let _ = h.abort(at(100), txn, "");
    let (req, fx) = h.enlist(at(150), txn, "late");
    assert_eq!(fx, vec![error_fx(req, CoreError::EnlistmentClosed { txn, state: "aborted" })]);
}

#[test]
fn enlist_after_trivial_commit_is_refused() {
    let mut h = H::new();
    let (txn, _) = h.begin_at(T0, 0);
    let (_, fx) = h.commit(at(1), txn);
    assert!(has_commit_evidence(&fx));
    let (req, fx) = h.enlist(at(2), txn, "a");
    assert_eq!(fx, vec![error_fx(req, CoreError::EnlistmentClosed { txn, state: "committed" })]);
}

#[test]
fn enlist_past_deadline_before_the_timer_aborts_and_refuses() {
    let mut h = H::new();
    let (txn, deadline) = h.active(&["a"]);
    let (req, fx) = h.enlist(deadline, txn, "b");
    assert_eq!(fx, vec![abort_to(txn, "a"), error_fx(req, CoreError::EnlistmentClosed { txn, state: "aborted" })]);
    let s = h.txn_status(deadline, txn);
    assert_eq!(s.state, TxnState::Aborted);
    assert_eq!(s.abort_reason, Some(AbortReason::new(AbortCode::DeadlineExceeded, "deadline passed before commit")));
    assert_eq!(s.participants.len(), 1, "b was not enlisted");
    // The deadline timer, when it fires, changes nothing.
    assert_eq!(h.timer(deadline, Timer::Deadline(txn)), vec![]);
}

// ---------------------------------------------------------------------------
// Commit, votes and the decision
// ---------------------------------------------------------------------------

#[test]
fn commit_with_no_participants_commits_with_only_a_lazy_record() {
    let mut h = H::new();
    let (txn, deadline) = h.begin_at(T0, 0);
    let (req, fx) = h.commit(at(5), txn);
    // Nothing is forced and nobody waits for the log: the caller hears
    // Committed first, then the ended record with no participants is written
    // lazily, so that the outcome survives a restart.
    assert_eq!(fx, vec![committed_fx(req, txn), lazy_record_fx(txn, at(5)), forget_fx(at(5), txn)]);
    assert_eq!(h.query(at(6), txn), Decision::Commit);
    assert_eq!(
        h.txn_status(at(6), txn),
        TxnStatus {
            txn,
            state: TxnState::Committed,
            abort_reason: None,
            participants: vec![],
            deadline: Some(deadline),
            finished: true,
            age_ms: 6,
            presumed: false
        }
    );
    assert_eq!(h.core.unfinished(), 0);
    // The deadline timer is stale now.
    assert_eq!(h.timer(deadline, Timer::Deadline(txn)), vec![]);
}

#[test]
fn commit_sends_prepare_to_each_participant_and_sets_prepare_timeout() {
    let mut h = H::new();
    let (txn, deadline) = h.active(&["b", "a", "c"]);
    let (req, fx) = h.commit(at(100), txn);
    assert_eq!(
        fx,
        vec![
            prepare_fx(txn, "a", deadline),
            prepare_fx(txn, "b", deadline),
            prepare_fx(txn, "c", deadline),
            Fx::Timer(at(100 + PREPARE_TIMEOUT), Timer::PrepareTimeout(txn)),
        ]
    );
    assert!(replies_to(&fx, req).is_empty(), "the caller waits for the votes");
    assert_eq!(h.txn_status(at(101), txn).state, TxnState::Preparing);
}

#[test]
fn prepare_timeout_is_capped_by_the_deadline() {
    let mut h = H::new();
    let (txn, deadline) = h.begin_at(T0, 500);
    h.enlist_ok(at(1), txn, "a", deadline);
    let (_, fx) = h.commit(at(100), txn);
    assert_eq!(fx, vec![prepare_fx(txn, "a", deadline), Fx::Timer(deadline, Timer::PrepareTimeout(txn))]);
}

#[test]
fn all_yes_persists_the_decision_and_tells_nobody_before_durable() {
    let mut h = H::new();
    let (txn, deadline, req) = h.preparing(&["a", "b"]);
    assert_eq!(h.vote(at(150), txn, "a", Ok(Vote::Yes)), vec![]);
    let fx = h.vote(at(200), txn, "b", Ok(Vote::Yes));
    assert_eq!(fx, vec![Fx::Persist { txn, record: decision_record(&["a", "b"], at(200), false), synced: true }]);

    // Until Durable: no reply, no phase two, from anything that can happen.
    let mut seen = Vec::new();
    seen.extend(h.vote(at(210), txn, "a", Ok(Vote::Yes)));
    let (req2, fx) = h.commit(at(220), txn);
    seen.extend(fx);
    seen.extend(h.timer(at(100 + PREPARE_TIMEOUT), Timer::PrepareTimeout(txn)));
    seen.extend(h.timer(deadline, Timer::Deadline(txn)));
    seen.extend(h.timer(at(240), Timer::Retry(txn, p("a"))));
    seen.extend(h.timer(at(240), Timer::Forget(txn)));
    assert_eq!(seen, vec![], "nothing may leak before the decision is durable");
    assert_eq!(h.query(at(250), txn), Decision::Pending);
    assert_eq!(h.txn_status(at(250), txn).state, TxnState::Deciding);
    let (areq, fx) = h.abort(at(250), txn, "");
    assert_eq!(fx, vec![error_fx(areq, CoreError::AlreadyCommitted(txn))]);

    // Durable: both callers hear Committed, then every YES voter hears Commit.
    let fx = h.durable(at(300), txn);
    assert_eq!(fx, vec![committed_fx(req, txn), committed_fx(req2, txn), commit_to(txn, "a"), commit_to(txn, "b")]);
    assert_eq!(h.query(at(301), txn), Decision::Commit);
}

#[test]
fn read_only_voters_get_no_phase_two_and_are_not_logged() {
    let mut h = H::new();
    let (txn, _, req) = h.preparing(&["a", "b", "c"]);
    assert_eq!(h.vote(at(150), txn, "a", Ok(Vote::ReadOnly)), vec![]);
    assert_eq!(h.vote(at(160), txn, "b", Ok(Vote::Yes)), vec![]);
    let fx = h.vote(at(170), txn, "c", Ok(Vote::ReadOnly));
    assert_eq!(fx, vec![Fx::Persist { txn, record: decision_record(&["b"], at(170), false), synced: true }]);
    let fx = h.durable(at(180), txn);
    assert_eq!(fx, vec![committed_fx(req, txn), commit_to(txn, "b")]);
    let s = h.txn_status(at(181), txn);
    assert_eq!(
        s.participants.iter().map(|ps| (ps.name.as_str(), ps.vote.clone(), ps.acknowledged)).collect::<Vec<_>>(),
        vec![("a", Some(Vote::ReadOnly), true), ("b", Some(Vote::Yes), false), ("c", Some(Vote::ReadOnly), true)]
    );
    // b's ack finishes it; the END record names only b.
    let fx = h.delivered(at(190), txn, "b", Ok(()));
    assert_eq!(fx, vec![Fx::Persist { txn, record: decision_record(&["b"], at(190), true), synced: false }, forget_fx(at(190), txn)]);
}

#[test]
fn all_read_only_commits_with_only_a_lazy_record() {
    let mut h = H::new();
    let (txn, _, req) = h.preparing(&["a", "b"]);
    let (req2, fx) = h.commit(at(120), txn);
    assert_eq!(fx, vec![]);
    assert_eq!(h.vote(at(150), txn, "a", Ok(Vote::ReadOnly)), vec![]);
    let fx = h.vote(at(160), txn, "b", Ok(Vote::ReadOnly));
    // No synced decision and no phase two: every caller hears Committed, then
    // the ended record with no participants is written lazily.
    assert_eq!(fx, vec![committed_fx(req, txn), committed_fx(req2, txn), lazy_record_fx(txn, at(160)), forget_fx(at(160), txn)]);
    assert_eq!(h.query(at(161), txn), Decision::Commit);
    let s = h.txn_status(at(161), txn);
    assert_eq!((s.state, s.finished, s.presumed), (TxnState::Committed, true, false));
    assert_eq!(h.core.unfinished(), 0);
    // Forgotten: ForgetDecision deletes the lazy record and raises the
    // horizon, so the caller, told Committed, never hears it presumed
    // aborted.
    let later = at(160).plus(RETENTION);
    assert_eq!(h.timer(later, Timer::Forget(txn)), vec![Fx::ForgetDecision { txn, horizon: txn }]);
    assert_eq!(h.txn_status(later, txn), forgotten_status(txn));
    let (req, fx) = h.commit(later, txn);
    assert_eq!(fx, vec![error_fx(req, CoreError::Forgotten(txn))]);
    // No participant can be waiting for it (read-only voters keep nothing
    // prepared), so QueryDecision may fall back to presumed abort.
    assert_eq!(h.query(later, txn), Decision::Abort);
    assert_eq!(h.list(later, false, 10), TxnList { transactions: vec![], in_doubt: 0, oldest_in_doubt_ms: 0 });
}

#[test]
fn no_vote_aborts_and_tells_the_others() {
    let mut h = H::new();
    let (txn, _, req) = h.preparing(&["a", "b", "c"]);
    assert_eq!(h.vote(at(150), txn, "a", Ok(Vote::Yes)), vec![]);
    let fx = h.vote(at(160), txn, "b", Ok(Vote::No("insufficient funds".into())));
    let reason = AbortReason::at(AbortCode::ParticipantVotedNo, &p("b"), "insufficient funds");
    assert_eq!(fx, vec![aborted_fx(req, txn, reason.clone()), abort_to(txn, "a"), abort_to(txn, "c")], "the NO voter aborted on its own");
    assert_eq!(h.query(at(161), txn), Decision::Abort);
    let s = h.txn_status(at(161), txn);
    assert_eq!((s.state, s.abort_reason.clone()), (TxnState::Aborted, Some(reason)));
    // The remaining vote is late and changes nothing (c is already being told).
    assert_eq!(h.vote(at(170), txn, "c", Ok(Vote::Yes)), vec![]);
    // Acks finish it; no log record for an abort.
    assert_eq!(h.delivered(at(180), txn, "a", Ok(())), vec![]);
    assert_eq!(h.delivered(at(190), txn, "c", Ok(())), vec![forget_fx(at(190), txn)]);
    assert_eq!(h.core.unfinished(), 0);
}

#[test]
fn prepare_rpc_error_aborts_with_prepare_failed() {
    let mut h = H::new();
    let (txn, _, req) = h.preparing(&["a", "b"]);
    let fx = h.vote(at(150), txn, "b", Err("connection refused".into()));
    let reason = AbortReason::at(AbortCode::PrepareFailed, &p("b"), "connection refused");
    // b may have prepared before the error: it is told to abort too.
    assert_eq!(fx, vec![aborted_fx(req, txn, reason), abort_to(txn, "a"), abort_to(txn, "b")]);
}

#[test]
fn prepare_timeout_timer_aborts_naming_the_silent() {
    let mut h = H::new();
    let (txn, _, req) = h.preparing(&["a", "b", "c"]);
    assert_eq!(h.vote(at(150), txn, "a", Ok(Vote::Yes)), vec![]);
    let fx = h.timer(at(100 + PREPARE_TIMEOUT), Timer::PrepareTimeout(txn));
    let reason = AbortReason::at(AbortCode::PrepareTimeout, &p("b"), "no vote in time from b, c");
    assert_eq!(fx, vec![aborted_fx(req, txn, reason), abort_to(txn, "a"), abort_to(txn, "b"), abort_to(txn, "c")]);
    // A vote after the timeout is ignored, and the timer again does nothing.
    assert_eq!(h.vote(at(2_200), txn, "b", Ok(Vote::Yes)), vec![]);
    assert_eq!(h.timer(at(2_300), Timer::PrepareTimeout(txn)), vec![]);
}

#[test]
fn deadline_timer_while_active_aborts() {
    let mut h = H::new();
    let (txn, deadline) = h.active(&["a", "b"]);
    let fx = h.timer(deadline, Timer::Deadline(txn));
    assert_eq!(fx, vec![abort_to(txn, "a"), abort_to(txn, "b")]);
    let reason = AbortReason::new(AbortCode::DeadlineExceeded, "deadline passed before a decision");
    assert_eq!(h.txn_status(deadline, txn).abort_reason, Some(reason.clone()));
    // A Commit that comes later learns the same reason.
    let (req, fx) = h.commit(deadline.plus(1), txn);
    assert_eq!(fx, vec![aborted_fx(req, txn, reason)]);
    assert_eq!(h.query(deadline.plus(1), txn), Decision::Abort);
}

#[test]
fn deadline_timer_with_no_participants_finishes_at_once() {
    let mut h = H::new();
    let (txn, deadline) = h.begin_at(T0, 0);
    assert_eq!(h.timer(deadline, Timer::Deadline(txn)), vec![forget_fx(deadline, txn)]);
    assert_eq!(h.core.unfinished(), 0);
}

#[test]
fn deadline_timer_while_preparing_aborts_the_waiters() {
    let mut h = H::new();
    let (txn, deadline) = h.begin_at(T0, 1_000);
    h.enlist_ok(at(1), txn, "a", deadline);
    let (req, _) = h.commit(at(900), txn);
    let fx = h.timer(deadline, Timer::Deadline(txn));
    let reason = AbortReason::new(AbortCode::DeadlineExceeded, "deadline passed before a decision");
    assert_eq!(fx, vec![aborted_fx(req, txn, reason), abort_to(txn, "a")]);
}

#[test]
fn commit_past_deadline_before_the_timer_aborts() {
    let mut h = H::new();
    let (txn, deadline) = h.active(&["a"]);
    let (req, fx) = h.commit(deadline, txn);
    let reason = AbortReason::new(AbortCode::DeadlineExceeded, "deadline passed before commit");
    assert_eq!(fx, vec![aborted_fx(req, txn, reason), abort_to(txn, "a")]);
}

#[test]
fn commit_of_an_empty_transaction_past_deadline_aborts() {
    let mut h = H::new();
    let (txn, deadline) = h.begin_at(T0, 0);
    let (req, fx) = h.commit(deadline.plus(1), txn);
    let reason = AbortReason::new(AbortCode::DeadlineExceeded, "deadline passed before commit");
    assert_eq!(fx, vec![aborted_fx(req, txn, reason), forget_fx(deadline.plus(1), txn)]);
}

#[test]
fn duplicate_commit_while_preparing_waits_and_both_hear_commit() {
    let mut h = H::new();
    let (txn, _, r1) = h.preparing(&["a"]);
    let (r2, fx) = h.commit(at(120), txn);
    assert_eq!(fx, vec![], "a second Commit sends no second round of prepares");
    let fx = h.vote(at(150), txn, "a", Ok(Vote::Yes));
    assert!(matches!(fx.as_slice(), [Fx::Persist { synced: true, .. }]), "{fx:?}");
    let (r3, fx) = h.commit(at(160), txn);
    assert_eq!(fx, vec![], "a Commit while deciding waits too");
    let fx = h.durable(at(200), txn);
    assert_eq!(fx, vec![committed_fx(r1, txn), committed_fx(r2, txn), committed_fx(r3, txn), commit_to(txn, "a")]);
}

#[test]
fn duplicate_commit_while_preparing_waits_and_both_hear_the_abort() {
    let mut h = H::new();
    let (txn, _, r1) = h.preparing(&["a", "b"]);
    let (r2, fx) = h.commit(at(120), txn);
    assert_eq!(fx, vec![]);
    let fx = h.vote(at(150), txn, "a", Ok(Vote::No("locked".into())));
    let reason = AbortReason::at(AbortCode::ParticipantVotedNo, &p("a"), "locked");
    assert_eq!(fx, vec![aborted_fx(r1, txn, reason.clone()), aborted_fx(r2, txn, reason), abort_to(txn, "b")]);
}

#[test]
fn commit_retried_after_the_outcome_returns_the_same_outcome() {
    let mut h = H::new();
    let (txn, _) = h.committed(&["a"]);
    let (req, fx) = h.commit(at(400), txn);
    assert_eq!(fx, vec![committed_fx(req, txn)]);

    let (txn2, _, creq) = h.preparing(&["a"]);
    let fx = h.vote(at(150), txn2, "a", Ok(Vote::No("nope".into())));
    let reason = AbortReason::at(AbortCode::ParticipantVotedNo, &p("a"), "nope");
    // The only participant aborted by itself: finished at once.
    assert_eq!(fx, vec![aborted_fx(creq, txn2, reason.clone()), forget_fx(at(150), txn2)]);
    let (req, fx) = h.commit(at(400), txn2);
    assert_eq!(fx, vec![aborted_fx(req, txn2, reason)]);
}

#[test]
fn commit_after_details_are_forgotten() {
    let mut h = H::new();
    // Of an earlier run, before anything was forgotten: presumed aborted.
    let old = TxnId { epoch: EPOCH - 1, seq: 9 };
    let (req, fx) = h.commit(T0, old);
    assert_eq!(fx, vec![aborted_fx(req, old, presumed_abort())]);

    // Committed and forgotten: the record goes, the horizon rises to it, and
    // the outcome is no longer known.
    let (txn, _) = h.committed(&["a"]);
    let fx = h.delivered(at(400), txn, "a", Ok(()));
    assert_eq!(fx, vec![Fx::Persist { txn, record: decision_record(&["a"], at(400), true), synced: false }, forget_fx(at(400), txn)]);
    assert_eq!(h.timer(at(400).plus(RETENTION), Timer::Forget(txn)), vec![Fx::ForgetDecision { txn, horizon: txn }]);
    let (req, fx) = h.commit(at(400).plus(RETENTION), txn);
    assert_eq!(fx, vec![error_fx(req, CoreError::Forgotten(txn))]);

    // Aborted and forgotten above the horizon: presumed aborted.
    let (txn2, _) = h.begin_at(T0, 0);
    assert!(txn2 > txn);
    let _ = h.abort(at(1), txn2, "");
    assert_eq!(h.timer(at(1).plus(RETENTION), Timer::Forget(txn2)), vec![]);
    let (req, fx) = h.commit(at(1).plus(RETENTION), txn2);
    assert_eq!(fx, vec![aborted_fx(req, txn2, presumed_abort())]);

    // Of an earlier run, now below the horizon: forgotten. Never issued (above
    // the horizon): not found.
    let (req, fx) = h.commit(at(1).plus(RETENTION), old);
    assert_eq!(fx, vec![error_fx(req, CoreError::Forgotten(old))]);
    let never = TxnId { epoch: EPOCH, seq: 500 };
    let (req, fx) = h.commit(T0, never);
    assert_eq!(fx, vec![error_fx(req, CoreError::NotFound(never))]);
}

// ---------------------------------------------------------------------------
// Abort
// ---------------------------------------------------------------------------

#[test]
fn abort_of_active_tells_participants_and_is_idempotent() {
    let mut h = H::new();
    let (txn, _) = h.active(&["a", "b"]);
    let (req, fx) = h.abort(at(50), txn, "user cancelled");
    assert_eq!(fx, vec![abort_to(txn, "a"), abort_to(txn, "b"), reply_fx(req, Reply::Aborted { txn })]);
    let reason = AbortReason::new(AbortCode::AbortedByClient, "user cancelled");
    assert_eq!(h.txn_status(at(51), txn).abort_reason, Some(reason.clone()));
    // Again: same answer, no second round of messages.
    let (req, fx) = h.abort(at(60), txn, "again");
    assert_eq!(fx, vec![reply_fx(req, Reply::Aborted { txn })]);
    assert_eq!(h.txn_status(at(61), txn).abort_reason, Some(reason.clone()), "the first reason stays");
    let (req, fx) = h.commit(at(70), txn);
    assert_eq!(fx, vec![aborted_fx(req, txn, reason)]);
}

#[test]
fn abort_with_empty_detail_gets_a_default_detail() {
    let mut h = H::new();
    let (txn, _) = h.active(&["a"]);
    let _ = h.abort(at(50), txn, "");
    assert_eq!(h.txn_status(at(51), txn).abort_reason, Some(AbortReason::new(AbortCode::AbortedByClient, "aborted by the initiator")));
}

#[test]
fn abort_while_preparing_answers_the_commit_callers() {
    let mut h = H::new();
    let (txn, _, creq) = h.preparing(&["a", "b"]);
    assert_eq!(h.vote(at(150), txn, "a", Ok(Vote::Yes)), vec![]);
    let (req, fx) = h.abort(at(160), txn, "stop");
    let reason = AbortReason::new(AbortCode::AbortedByClient, "stop");
    assert_eq!(fx, vec![aborted_fx(creq, txn, reason), abort_to(txn, "a"), abort_to(txn, "b"), reply_fx(req, Reply::Aborted { txn })]);
    // b's YES arrives late: b is already being told to abort.
    assert_eq!(h.vote(at(170), txn, "b", Ok(Vote::Yes)), vec![]);
    assert_eq!(h.query(at(171), txn), Decision::Abort);
}

#[test]
fn abort_after_commit_decided_is_already_committed() {
    let mut h = H::new();
    // Deciding.
    let (txn, _) = h.deciding(&["a"]);
    let (req, fx) = h.abort(at(250), txn, "");
    assert_eq!(fx, vec![error_fx(req, CoreError::AlreadyCommitted(txn))]);
    // Committed.
    assert!(has_commit_evidence(&h.durable(at(300), txn)));
    let (req, fx) = h.abort(at(350), txn, "");
    assert_eq!(fx, vec![error_fx(req, CoreError::AlreadyCommitted(txn))]);
    // Finished: still held.
    assert_eq!(h.delivered(at(400), txn, "a", Ok(())).len(), 2);
    let (req, fx) = h.abort(at(401), txn, "");
    assert_eq!(fx, vec![error_fx(req, CoreError::AlreadyCommitted(txn))]);
    // Forgotten: the outcome is no longer known, so it is neither aborted
    // nor reported committed.
    assert_eq!(h.timer(at(400).plus(RETENTION), Timer::Forget(txn)), vec![Fx::ForgetDecision { txn, horizon: txn }]);
    let (req, fx) = h.abort(at(400).plus(RETENTION), txn, "");
    assert_eq!(fx, vec![error_fx(req, CoreError::Forgotten(txn))]);
    // A trivially committed one.
    let (txn2, _) = h.begin_at(T0, 0);
    let _ = h.commit(at(1), txn2);
    let (req, fx) = h.abort(at(2), txn2, "");
    assert_eq!(fx, vec![error_fx(req, CoreError::AlreadyCommitted(txn2))]);
}

#[test]
fn abort_of_unknown_ids() {
    let mut h = H::new();
    let old = TxnId { epoch: EPOCH - 1, seq: 1 };
    let (req, fx) = h.abort(T0, old, "");
    assert_eq!(fx, vec![reply_fx(req, Reply::Aborted { txn: old })], "presumed aborted");
    let never = TxnId { epoch: EPOCH, seq: 1 };
    let (req, fx) = h.abort(T0, never, "");
    assert_eq!(fx, vec![error_fx(req, CoreError::NotFound(never))]);
}

// ---------------------------------------------------------------------------
// Phase two delivery
// ---------------------------------------------------------------------------

#[test]
fn failed_delivery_retries_with_backoff_and_resends() {
    let mut h = H::new();
    let (txn, _) = h.committed(&["a", "b"]);
    let mut now = at(400);
    for retries in 1..=6u32 {
        let fx = h.delivered(now, txn, "a", Err("unavailable".into()));
        let when = h.expect_retry(&fx, now, txn, "a", retries);
        assert_eq!(h.txn_status(now, txn).participants[0].retries, retries);
        now = when;
        let fx = h.timer(now, Timer::Retry(txn, p("a")));
        assert_eq!(fx, vec![commit_to(txn, "a")], "the retry re-sends the commit");
    }
    // Commit deliveries never give up.
    assert_eq!(h.txn_status(now, txn).state, TxnState::Committed);
    assert_eq!(h.delivered(now, txn, "a", Ok(())), vec![]);
    // A retry timer after the ack does nothing.
    assert_eq!(h.timer(now, Timer::Retry(txn, p("a"))), vec![]);
    let fx = h.delivered(now.plus(5), txn, "b", Ok(()));
    assert_eq!(
        fx,
        vec![Fx::Persist { txn, record: decision_record(&["a", "b"], now.plus(5), true), synced: false }, forget_fx(now.plus(5), txn)]
    );
}

#[test]
fn failed_abort_delivery_retries_then_gives_up() {
    let mut h = H::new();
    let (txn, _) = h.active(&["a"]);
    let (_, fx) = h.abort(at(50), txn, "");
    assert_eq!(decisions(&fx), vec![("a".to_owned(), false)]);
    let mut now = at(60);
    for retries in 1..ABORT_ATTEMPTS {
        let fx = h.delivered(now, txn, "a", Err("unavailable".into()));
        now = h.expect_retry(&fx, now, txn, "a", retries);
        assert_eq!(h.timer(now, Timer::Retry(txn, p("a"))), vec![abort_to(txn, "a")]);
    }
    // The last attempt fails: give up (presumed abort covers the rest).
    let fx = h.delivered(now, txn, "a", Err("unavailable".into()));
    assert_eq!(fx, vec![forget_fx(now, txn)]);
    let s = h.txn_status(now, txn);
    assert_eq!((s.finished, s.participants[0].acknowledged, s.participants[0].retries), (true, true, ABORT_ATTEMPTS));
    assert_eq!(h.timer(now, Timer::Retry(txn, p("a"))), vec![]);
}

#[test]
fn acks_write_the_end_record_and_forget_drops_the_decision_record() {
    let mut h = H::new();
    let (txn, _) = h.committed(&["a", "b"]);
    assert_eq!(h.core.unfinished(), 1);
    assert_eq!(h.delivered(at(400), txn, "a", Ok(())), vec![]);
    assert_eq!(h.delivered(at(401), txn, "a", Ok(())), vec![], "duplicate ack");
    let fx = h.delivered(at(410), txn, "b", Ok(()));
    assert_eq!(fx, vec![Fx::Persist { txn, record: decision_record(&["a", "b"], at(410), true), synced: false }, forget_fx(at(410), txn)]);
    assert_eq!(h.core.unfinished(), 0);
    let s = h.txn_status(at(411), txn);
    assert_eq!((s.state, s.finished, s.presumed, s.age_ms), (TxnState::Committed, true, false, 411));
    assert!(s.participants.iter().all(|ps| ps.acknowledged));
    assert_eq!(h.query(at(411), txn), Decision::Commit);
    // A late ack after finishing changes nothing.
    assert_eq!(h.delivered(at(420), txn, "b", Ok(())), vec![]);

    let later = at(410).plus(RETENTION);
    assert_eq!(h.timer(later, Timer::Forget(txn)), vec![Fx::ForgetDecision { txn, horizon: txn }]);
    assert_eq!(
        h.txn_status(later, txn),
        TxnStatus {
            txn,
            state: TxnState::Forgotten,
            abort_reason: None,
            participants: vec![],
            deadline: None,
            finished: true,
            age_ms: 0,
            presumed: true
        }
    );
    // Every participant acknowledged before it was forgotten, so none asks;
    // an unheld id is answered by presumed abort.
    assert_eq!(h.query(later, txn), Decision::Abort);
    assert_eq!(h.list(later, false, 10), TxnList { transactions: vec![], in_doubt: 0, oldest_in_doubt_ms: 0 });
    // Everything about it is now stale; the record is deleted only once.
    assert_eq!(h.timer(later, Timer::Forget(txn)), vec![]);
    assert_eq!(h.delivered(later, txn, "a", Err("x".into())), vec![]);
    assert_eq!(h.timer(later, Timer::Retry(txn, p("a"))), vec![]);
    assert_eq!(h.durable(later, txn), vec![]);
    assert_eq!(h.vote(later, txn, "a", Ok(Vote::Yes)), vec![]);
    let (req, fx) = h.enlist(later, txn, "a");
    assert_eq!(fx, vec![error_fx(req, CoreError::EnlistmentClosed { txn, state: "finished" })]);
}

#[test]
fn late_yes_after_a_finished_abort_is_told_abort() {
    let mut h = H::new();
    let (txn, _, _) = h.preparing(&["a", "b"]);
    let fx = h.vote(at(150), txn, "a", Err("timeout".into()));
    assert_eq!(decisions(&fx), vec![("a".to_owned(), false), ("b".to_owned(), false)]);
    assert_eq!(h.delivered(at(160), txn, "a", Ok(())), vec![]);
    assert_eq!(h.delivered(at(170), txn, "b", Ok(())), vec![forget_fx(at(170), txn)]);
    // b's YES, delayed in the network, comes after b acked the abort: b may
    // have prepared after the abort reached it, so it is told again.
    assert_eq!(h.vote(at(180), txn, "b", Ok(Vote::Yes)), vec![abort_to(txn, "b")]);
    // But only once.
    assert_eq!(h.vote(at(181), txn, "b", Ok(Vote::Yes)), vec![]);
    assert_eq!(h.delivered(at(190), txn, "b", Ok(())), vec![]);
    assert_eq!(h.query(at(191), txn), Decision::Abort);
}

#[test]
fn a_failed_delivery_schedules_one_retry_and_results_meanwhile_are_ignored() {
    let mut h = H::new();
    let (txn, _) = h.committed(&["a", "b"]);
    let fx = h.delivered(at(400), txn, "a", Err("unavailable".into()));
    let when = h.expect_retry(&fx, at(400), txn, "a", 1);
    // While the retry is scheduled nothing is in flight to a: a second report
    // for the failed message, failure or ack, is stale and schedules nothing.
    assert_eq!(h.delivered(at(401), txn, "a", Err("unavailable".into())), vec![]);
    assert_eq!(h.delivered(at(402), txn, "a", Ok(())), vec![]);
    let s = h.txn_status(at(403), txn);
    assert_eq!((s.participants[0].acknowledged, s.participants[0].retries, s.finished), (false, 1, false));
    // The retry re-sends once; the same timer firing again sends nothing.
    assert_eq!(h.timer(when, Timer::Retry(txn, p("a"))), vec![commit_to(txn, "a")]);
    assert_eq!(h.timer(when.plus(1), Timer::Retry(txn, p("a"))), vec![]);
    // The re-sent message's result counts.
    assert_eq!(h.delivered(when.plus(2), txn, "a", Ok(())), vec![]);
    assert!(h.txn_status(when.plus(2), txn).participants[0].acknowledged);
    let fx = h.delivered(when.plus(3), txn, "b", Ok(()));
    assert_eq!(
        fx,
        vec![Fx::Persist { txn, record: decision_record(&["a", "b"], when.plus(3), true), synced: false }, forget_fx(when.plus(3), txn)]
    );
}

#[test]
fn a_retry_timer_without_a_failed_delivery_sends_nothing() {
    let mut h = H::new();
    // The commit to a is in flight and has not failed: a Retry timer (a
    // leftover, or a duplicate) must not send a second copy.
    let (txn, _) = h.committed(&["a"]);
    assert_eq!(h.timer(at(350), Timer::Retry(txn, p("a"))), vec![]);
    assert_eq!(h.delivered(at(400), txn, "a", Ok(())).len(), 2, "the one message's ack finishes it");
    // The same for an abort.
    let (t2, _) = h.active(&["a"]);
    let (_, fx) = h.abort(at(500), t2, "");
    assert_eq!(decisions(&fx), vec![("a".to_owned(), false)]);
    assert_eq!(h.timer(at(510), Timer::Retry(t2, p("a"))), vec![]);
    assert_eq!(h.delivered(at(520), t2, "a", Ok(())), vec![forget_fx(at(520), t2)]);
}

#[test]
fn duplicate_failures_do_not_count_toward_giving_up_an_abort() {
    let mut h = H::new();
    let (txn, _) = h.active(&["a"]);
    let _ = h.abort(at(50), txn, "");
    let fx = h.delivered(at(60), txn, "a", Err("unavailable".into()));
    let when = h.expect_retry(&fx, at(60), txn, "a", 1);
    for i in 0..u64::from(ABORT_ATTEMPTS) {
        assert_eq!(h.delivered(at(61 + i), txn, "a", Err("unavailable".into())), vec![], "stale failure #{i}");
    }
    let s = h.txn_status(at(70), txn);
    assert_eq!((s.finished, s.participants[0].acknowledged, s.participants[0].retries), (false, false, 1));
    assert_eq!(h.timer(when, Timer::Retry(txn, p("a"))), vec![abort_to(txn, "a")]);
}

#[test]
fn deliveries_to_participants_never_sent_phase_two_are_ignored() {
    let mut h = H::new();
    let (txn, _, _) = h.preparing(&["a", "b", "c"]);
    assert_eq!(h.vote(at(150), txn, "a", Ok(Vote::ReadOnly)), vec![]);
    let fx = h.vote(at(160), txn, "b", Ok(Vote::No("no".into())));
    assert_eq!(decisions(&fx), vec![("c".to_owned(), false)], "read-only and NO voters are not told");
    assert_eq!(h.delivered(at(170), txn, "a", Err("x".into())), vec![]);
    assert_eq!(h.delivered(at(171), txn, "b", Err("x".into())), vec![]);
    assert_eq!(h.delivered(at(172), txn, "a", Ok(())), vec![]);
    let s = h.txn_status(at(173), txn);
    assert_eq!(s.participants.iter().map(|ps| ps.retries).collect::<Vec<_>>(), vec![0, 0, 0]);
    assert_eq!(h.delivered(at(180), txn, "c", Ok(())), vec![forget_fx(at(180), txn)]);
}

// ---------------------------------------------------------------------------
// Execute
// ---------------------------------------------------------------------------

#[test]
fn execute_prepares_with_payloads_and_commits() {
    let mut h = H::new();
    let branches = vec![
        ExecBranch { participant: p("b"), endpoint: ep("b"), payload: b"debit".to_vec() },
        ExecBranch { participant: p("a"), endpoint: ep("a"), payload: b"credit".to_vec() },
    ];
    let fx = h.step(T0, Input::Execute { req: 1, branches, timeout_ms: 0 });
    let txn = TxnId { epoch: EPOCH, seq: 1 };
    let deadline = at(DEFAULT_TIMEOUT);
    assert_eq!(
        fx,
        vec![
            Fx::Timer(deadline, Timer::Deadline(txn)),
            Fx::Prepare { txn, to: p("a"), endpoint: ep("a"), payload: Some(b"credit".to_vec()), deadline },
            Fx::Prepare { txn, to: p("b"), endpoint: ep("b"), payload: Some(b"debit".to_vec()), deadline },
            Fx::Timer(at(PREPARE_TIMEOUT), Timer::PrepareTimeout(txn)),
        ]
    );
    assert_eq!(h.vote(at(10), txn, "a", Ok(Vote::Yes)), vec![]);
    assert_eq!(
        h.vote(at(20), txn, "b", Ok(Vote::Yes)),
        vec![Fx::Persist { txn, record: decision_record(&["a", "b"], at(20), false), synced: true }]
    );
    assert_eq!(h.durable(at(30), txn), vec![committed_fx(1, txn), commit_to(txn, "a"), commit_to(txn, "b")]);
}

#[test]
fn execute_refuses_too_long_timeout_and_commits_empty() {
    let mut h = H::new();
    let fx = h.step(T0, Input::Execute { req: 1, branches: vec![], timeout_ms: MAX_TIMEOUT + 1 });
    assert_eq!(fx, vec![error_fx(1, CoreError::TimeoutTooLong { asked_ms: MAX_TIMEOUT + 1, max_ms: MAX_TIMEOUT })]);
    let fx = h.step(T0, Input::Execute { req: 2, branches: vec![], timeout_ms: 0 });
    let txn = TxnId { epoch: EPOCH, seq: 1 };
    assert_eq!(
        fx,
        vec![Fx::Timer(at(DEFAULT_TIMEOUT), Timer::Deadline(txn)), committed_fx(2, txn), lazy_record_fx(txn, T0), forget_fx(T0, txn)]
    );
}

#[test]
fn execute_no_vote_aborts() {
    let mut h = H::new();
    let branches = vec![
        ExecBranch { participant: p("a"), endpoint: ep("a"), payload: vec![1] },
        ExecBranch { participant: p("b"), endpoint: ep("b"), payload: vec![2] },
    ];
    let _ = h.step(T0, Input::Execute { req: 1, branches, timeout_ms: 0 });
    let txn = TxnId { epoch: EPOCH, seq: 1 };
    let fx = h.vote(at(10), txn, "b", Ok(Vote::No("bad payload".into())));
    let reason = AbortReason::at(AbortCode::ParticipantVotedNo, &p("b"), "bad payload");
    assert_eq!(fx, vec![aborted_fx(1, txn, reason), abort_to(txn, "a")]);
}

// ---------------------------------------------------------------------------
// QueryDecision and Status
// ---------------------------------------------------------------------------

#[test]
fn query_decision_is_pending_until_decided() {
    let mut h = H::new();
    let (txn, _) = h.active(&["a"]);
    assert_eq!(h.query(at(50), txn), Decision::Pending, "Active");
    let _ = h.commit(at(100), txn);
    assert_eq!(h.query(at(150), txn), Decision::Pending, "Preparing");
    let _ = h.vote(at(200), txn, "a", Ok(Vote::Yes));
    assert_eq!(h.query(at(250), txn), Decision::Pending, "Deciding");
    let _ = h.durable(at(300), txn);
    assert_eq!(h.query(at(350), txn), Decision::Commit, "Committed");
}

#[test]
fn query_decision_of_unknown_is_presumed_abort() {
    let mut h = H::new();
    assert_eq!(h.query(T0, TxnId { epoch: EPOCH - 1, seq: 4 }), Decision::Abort);
    assert_eq!(h.query(T0, TxnId { epoch: EPOCH, seq: 77 }), Decision::Abort);
    let (txn, _) = h.active(&["a"]);
    let _ = h.abort(at(20), txn, "");
    assert_eq!(h.query(at(21), txn), Decision::Abort);
}

#[test]
fn status_of_never_issued_is_not_found() {
    let mut h = H::new();
    let _ = h.begin_at(T0, 0);
    for txn in [TxnId { epoch: EPOCH, seq: 2 }, TxnId { epoch: EPOCH + 3, seq: 1 }] {
        assert_eq!(h.status(T0, txn), Reply::Error(CoreError::NotFound(txn)));
    }
}

#[test]
fn status_of_older_epoch_unknown_is_presumed_aborted() {
    let mut h = H::new();
    let old = TxnId { epoch: EPOCH - 1, seq: 12 };
    assert_eq!(
        h.txn_status(T0, old),
        TxnStatus {
            txn: old,
            state: TxnState::Aborted,
            abort_reason: Some(presumed_abort()),
            participants: vec![],
            deadline: None,
            finished: true,
            age_ms: 0,
            presumed: true
        }
    );
}

#[test]
fn status_reports_votes_and_retries() {
    let mut h = H::new();
    let (txn, deadline, _) = h.preparing(&["a", "b"]);
    let _ = h.vote(at(150), txn, "a", Ok(Vote::Yes));
    assert_eq!(
        h.txn_status(at(151), txn),
        TxnStatus {
            txn,
            state: TxnState::Preparing,
            abort_reason: None,
            participants: vec![
                ParticipantStatus { name: p("a"), endpoint: ep("a"), vote: Some(Vote::Yes), acknowledged: false, retries: 0 },
                ParticipantStatus { name: p("b"), endpoint: ep("b"), vote: None, acknowledged: false, retries: 0 },
            ],
            deadline: Some(deadline),
            finished: false,
            age_ms: 151,
            presumed: false,
        }
    );
}

#[test]
fn status_age_counts_from_begin() {
    let mut h = H::new();
    let (txn, _) = h.begin_at(at(100), 0);
    assert_eq!(h.txn_status(at(100), txn).age_ms, 0);
    assert_eq!(h.txn_status(at(350), txn).age_ms, 250);
    // A clock that went backwards gives 0, not an underflow.
    assert_eq!(h.txn_status(at(40), txn).age_ms, 0);
    // Unheld transactions have no age.
    let old = TxnId { epoch: EPOCH - 1, seq: 1 };
    assert_eq!(h.txn_status(at(350), old).age_ms, 0);
}

// ---------------------------------------------------------------------------
// Garbage collection: the horizon
// ---------------------------------------------------------------------------

fn forgotten_status(txn: TxnId) -> TxnStatus {
    TxnStatus {
        txn,
        state: TxnState::Forgotten,
        abort_reason: None,
        participants: vec![],
        deadline: None,
        finished: true,
        age_ms: 0,
        presumed: true,
    }
}

fn presumed_aborted_status(txn: TxnId) -> TxnStatus {
    TxnStatus {
        txn,
        state: TxnState::Aborted,
        abort_reason: Some(presumed_abort()),
        participants: vec![],
        deadline: None,
        finished: true,
        age_ms: 0,
        presumed: true,
    }
}

#[test]
fn forget_raises_the_horizon_to_the_highest_forgotten_commit() {
    let mut h = H::new();
    let (t1, _) = h.committed(&["a"]);
    let (t2, _) = h.committed(&["b"]);
    assert!(t1 < t2);
    assert_eq!(h.delivered(at(400), t1, "a", Ok(())).len(), 2);
    assert_eq!(h.delivered(at(400), t2, "b", Ok(())).len(), 2);
    let later = at(400).plus(RETENTION);
    // The newer one first.
    assert_eq!(h.timer(later, Timer::Forget(t2)), vec![Fx::ForgetDecision { txn: t2, horizon: t2 }]);
    assert_eq!(h.txn_status(later, t2), forgotten_status(t2));
    // t1 is below the horizon but still held: answered from memory.
    let s = h.txn_status(later, t1);
    assert_eq!((s.state, s.presumed), (TxnState::Committed, false));
    let (req, fx) = h.commit(later, t1);
    assert_eq!(fx, vec![committed_fx(req, t1)]);
    assert_eq!(h.query(later, t1), Decision::Commit);
    // Forgetting it afterwards does not lower the horizon.
    assert_eq!(h.timer(later, Timer::Forget(t1)), vec![Fx::ForgetDecision { txn: t1, horizon: t2 }]);
    assert_eq!(h.txn_status(later, t1), forgotten_status(t1));
    // The next id is above the horizon and not yet issued.
    let next = TxnId { epoch: EPOCH, seq: t2.seq + 1 };
    assert_eq!(h.status(later, next), Reply::Error(CoreError::NotFound(next)));
}

#[test]
fn forgotten_aborts_are_forgotten_below_the_horizon_and_presumed_aborted_above_it() {
    let mut h = H::new();
    let (below, _) = h.active(&["a"]);
    let _ = h.abort(at(50), below, "");
    assert_eq!(h.delivered(at(60), below, "a", Ok(())), vec![forget_fx(at(60), below)]);
    let (committed, _) = h.committed(&["b"]);
    assert_eq!(h.delivered(at(400), committed, "b", Ok(())).len(), 2);
    let (above, _) = h.active(&["a"]);
    let _ = h.abort(at(50), above, "");
    assert_eq!(h.delivered(at(60), above, "a", Ok(())), vec![forget_fx(at(60), above)]);
    assert!(below < committed && committed < above);

    // An abort has no record: forgetting it emits nothing and leaves the
    // horizon alone.
    let t = at(60).plus(RETENTION);
    assert_eq!(h.timer(t, Timer::Forget(below)), vec![]);
    assert_eq!(h.timer(t, Timer::Forget(above)), vec![]);
    assert_eq!(h.txn_status(t, below), presumed_aborted_status(below), "no horizon yet");

    let later = at(400).plus(RETENTION);
    assert_eq!(h.timer(later, Timer::Forget(committed)), vec![Fx::ForgetDecision { txn: committed, horizon: committed }]);
    // At or below the horizon: the outcome is no longer known.
    for txn in [below, committed] {
        assert_eq!(h.txn_status(later, txn), forgotten_status(txn));
        let (req, fx) = h.commit(later, txn);
        assert_eq!(fx, vec![error_fx(req, CoreError::Forgotten(txn))]);
        let (req, fx) = h.abort(later, txn, "");
        assert_eq!(fx, vec![error_fx(req, CoreError::Forgotten(txn))]);
        assert_eq!(h.query(later, txn), Decision::Abort);
    }
    // Above it: presumed aborted, as before.
    assert_eq!(h.txn_status(later, above), presumed_aborted_status(above));
    let (req, fx) = h.commit(later, above);
    assert_eq!(fx, vec![aborted_fx(req, above, presumed_abort())]);
    let (req, fx) = h.abort(later, above, "");
    assert_eq!(fx, vec![reply_fx(req, Reply::Aborted { txn: above })]);
    assert_eq!(h.query(later, above), Decision::Abort);
    // Never issued: not found.
    let never = TxnId { epoch: EPOCH, seq: above.seq + 1 };
    assert_eq!(h.status(later, never), Reply::Error(CoreError::NotFound(never)));
    let (req, fx) = h.commit(later, never);
    assert_eq!(fx, vec![error_fx(req, CoreError::NotFound(never))]);
    let (req, fx) = h.abort(later, never, "");
    assert_eq!(fx, vec![error_fx(req, CoreError::NotFound(never))]);
}

#[test]
fn forgotten_commit_with_only_a_lazy_record_is_never_presumed_aborted() {
    let mut h = H::new();
    let (trivial, _) = h.begin_at(T0, 0);
    let (req, fx) = h.commit(at(1), trivial);
    assert_eq!(fx, vec![committed_fx(req, trivial), lazy_record_fx(trivial, at(1)), forget_fx(at(1), trivial)]);
    let (read_only, _, req) = h.preparing(&["a"]);
    assert_eq!(
        h.vote(at(150), read_only, "a", Ok(Vote::ReadOnly)),
        vec![committed_fx(req, read_only), lazy_record_fx(read_only, at(150)), forget_fx(at(150), read_only)]
    );
    // Forgetting them deletes their lazy records and raises the horizon, so
    // the callers, told Committed, never hear aborted.
    assert!(trivial < read_only);
    assert_eq!(h.timer(at(1).plus(RETENTION), Timer::Forget(trivial)), vec![Fx::ForgetDecision { txn: trivial, horizon: trivial }]);
    let later = at(150).plus(RETENTION);
    assert_eq!(h.timer(later, Timer::Forget(read_only)), vec![Fx::ForgetDecision { txn: read_only, horizon: read_only }]);
    for txn in [trivial, read_only] {
        assert_eq!(h.txn_status(later, txn), forgotten_status(txn));
        let (req, fx) = h.commit(later, txn);
        assert_eq!(fx, vec![error_fx(req, CoreError::Forgotten(txn))]);
        let (req, fx) = h.abort(later, txn, "");
        assert_eq!(fx, vec![error_fx(req, CoreError::Forgotten(txn))]);
    }
}

// ---------------------------------------------------------------------------
// List
// ---------------------------------------------------------------------------

#[test]
fn list_is_oldest_first_and_summarises_the_in_doubt() {
    let mut h = H::new();
    assert_eq!(h.list(T0, false, 10), TxnList { transactions: vec![], in_doubt: 0, oldest_in_doubt_ms: 0 });
    // t1: Active since 0 (not in doubt: nobody prepared).
    let (t1, d1) = h.begin_at(at(0), 0);
    h.enlist_ok(at(1), t1, "a", d1);
    // t2: Preparing since 100.
    let (t2, d2) = h.begin_at(at(100), 0);
    h.enlist_ok(at(101), t2, "a", d2);
    let (r2, fx) = h.commit(at(102), t2);
    assert_eq!(fx.len(), 2);
    // t3: Deciding since 200.
    let (t3, d3) = h.begin_at(at(200), 0);
    h.enlist_ok(at(201), t3, "a", d3);
    let _ = h.commit(at(202), t3);
    assert_eq!(h.vote(at(203), t3, "a", Ok(Vote::Yes)).len(), 1);
    // t4: Aborted since 300, the abort not yet acknowledged.
    let (t4, d4) = h.begin_at(at(300), 0);
    h.enlist_ok(at(301), t4, "a", d4);
    let _ = h.abort(at(302), t4, "");
    // t5: committed at 400 with no participants: finished.
    let (t5, _) = h.begin_at(at(400), 0);
    let _ = h.commit(at(401), t5);
    // t6: Committed since 500, the commit not yet acknowledged.
    let (t6, d6) = h.begin_at(at(500), 0);
    h.enlist_ok(at(501), t6, "a", d6);
    let _ = h.commit(at(502), t6);
    let _ = h.vote(at(503), t6, "a", Ok(Vote::Yes));
    assert_eq!(h.durable(at(504), t6).len(), 2);

    let now = at(1_000);
    let all: Vec<TxnStatus> = [t1, t2, t3, t4, t5, t6].into_iter().map(|t| h.txn_status(now, t)).collect();
    assert_eq!(
        all.iter().map(|s| (s.state, s.finished, s.age_ms)).collect::<Vec<_>>(),
        vec![
            (TxnState::Active, false, 1_000),
            (TxnState::Preparing, false, 900),
            (TxnState::Deciding, false, 800),
            (TxnState::Aborted, false, 700),
            (TxnState::Committed, true, 600),
            (TxnState::Committed, false, 500),
        ]
    );
    let doubtful: Vec<TxnStatus> = [1, 2, 3, 5].into_iter().map(|i| all[i].clone()).collect();
    assert_eq!(h.list(now, false, 100), TxnList { transactions: all.clone(), in_doubt: 4, oldest_in_doubt_ms: 900 });
    assert_eq!(h.list(now, true, 100), TxnList { transactions: doubtful.clone(), in_doubt: 4, oldest_in_doubt_ms: 900 });
    // The limit keeps the oldest; the summary still covers everything.
    assert_eq!(h.list(now, false, 3), TxnList { transactions: all[..3].to_vec(), in_doubt: 4, oldest_in_doubt_ms: 900 });
    assert_eq!(h.list(now, true, 2), TxnList { transactions: doubtful[..2].to_vec(), in_doubt: 4, oldest_in_doubt_ms: 900 });
    assert_eq!(h.list(now, true, 0), TxnList { transactions: vec![], in_doubt: 4, oldest_in_doubt_ms: 900 });

    // t2 settles (its only participant votes NO): the oldest in doubt is t3.
    let fx = h.vote(at(1_050), t2, "a", Ok(Vote::No("no".into())));
    let reason = AbortReason::at(AbortCode::ParticipantVotedNo, &p("a"), "no");
    assert_eq!(fx, vec![aborted_fx(r2, t2, reason), forget_fx(at(1_050), t2)]);
    let l = h.list(at(1_050), true, 100);
    assert_eq!(l.transactions.iter().map(|s| s.txn).collect::<Vec<_>>(), vec![t3, t4, t6]);
    assert_eq!((l.in_doubt, l.oldest_in_doubt_ms), (3, 850));

    // Settle the rest. t1 stays Active: listed, never in doubt.
    assert_eq!(h.delivered(at(1_100), t4, "a", Ok(())), vec![forget_fx(at(1_100), t4)]);
    assert_eq!(h.durable(at(1_100), t3).len(), 2);
    assert_eq!(h.delivered(at(1_100), t3, "a", Ok(())).len(), 2);
    assert_eq!(h.delivered(at(1_100), t6, "a", Ok(())).len(), 2);
    assert_eq!(h.list(at(2_000), true, 100), TxnList { transactions: vec![], in_doubt: 0, oldest_in_doubt_ms: 0 });
    let l = h.list(at(2_000), false, 100);
    assert_eq!(l.transactions.iter().map(|s| (s.txn, s.finished)).collect::<Vec<_>>(), [t1, t2, t3, t4, t5, t6].map(|t| (t, t != t1)));
    assert_eq!((l.in_doubt, l.oldest_in_doubt_ms), (0, 0));
    assert!(l.transactions.iter().all(|s| !s.presumed));
}

#[test]
fn list_orders_across_epochs_ages_recovered_ones_from_their_decision_and_omits_the_forgotten() {
    let mut h = H::new();
    let old = TxnId { epoch: EPOCH - 1, seq: 50 };
    let fx = norm(h.core.recover(T0, vec![(old, decision_record(&["a"], UnixMillis(T0.0 - 5_000), false))], None));
    assert_eq!(fx, vec![commit_to(old, "a")]);
    let (txn, _) = h.active(&["a"]);
    let (t2, _, _) = h.preparing(&["b"]);
    let l = h.list(at(500), false, 10);
    assert_eq!(
        l.transactions.iter().map(|s| (s.txn, s.state, s.age_ms)).collect::<Vec<_>>(),
        vec![(old, TxnState::Committed, 5_500), (txn, TxnState::Active, 500), (t2, TxnState::Preparing, 500)]
    );
    assert_eq!((l.in_doubt, l.oldest_in_doubt_ms), (2, 5_500));
    // Once forgotten, it is no longer listed.
    assert_eq!(h.delivered(at(600), old, "a", Ok(())).len(), 2);
    let l = h.list(at(600), true, 10);
    assert_eq!(l.transactions.iter().map(|s| s.txn).collect::<Vec<_>>(), vec![t2]);
    assert_eq!((l.in_doubt, l.oldest_in_doubt_ms), (1, 600));
    assert_eq!(h.list(at(600), false, 10).transactions.len(), 3, "finished, not yet forgotten");
    assert_eq!(h.timer(at(600).plus(RETENTION), Timer::Forget(old)), vec![Fx::ForgetDecision { txn: old, horizon: old }]);
    let l = h.list(at(600).plus(RETENTION), false, 10);
    assert_eq!(l.transactions.iter().map(|s| s.txn).collect::<Vec<_>>(), vec![txn, t2]);
}

// ---------------------------------------------------------------------------
// Recovery
// ---------------------------------------------------------------------------

#[test]
fn recover_of_a_non_ended_record_resumes_commit_delivery() {
    let mut h = H::new();
    let txn = TxnId { epoch: EPOCH - 1, seq: 4 };
    let record = decision_record(&["b", "a"], UnixMillis(T0.0 - 5_000), false);
    let fx = norm(h.core.recover(T0, vec![(txn, record)], None));
    assert_eq!(fx, vec![commit_to(txn, "a"), commit_to(txn, "b")]);
    assert_eq!(h.core.unfinished(), 1);
    assert_eq!(h.query(at(1), txn), Decision::Commit);
    let s = h.txn_status(at(1), txn);
    assert_eq!((s.state, s.finished, s.presumed), (TxnState::Committed, false, false));
    // Its age and deadline count from the decision.
    assert_eq!((s.age_ms, s.deadline), (5_001, Some(UnixMillis(T0.0 - 5_000))));
    let (req, fx) = h.commit(at(2), txn);
    assert_eq!(fx, vec![committed_fx(req, txn)]);
    let (req, fx) = h.abort(at(3), txn, "");
    assert_eq!(fx, vec![error_fx(req, CoreError::AlreadyCommitted(txn))]);
    let (req, fx) = h.enlist(at(4), txn, "c");
    assert_eq!(fx, vec![error_fx(req, CoreError::EnlistmentClosed { txn, state: "committed" })]);
    // Delivery failures retry the commit.
    let fx = h.delivered(at(5), txn, "a", Err("down".into()));
    let when = h.expect_retry(&fx, at(5), txn, "a", 1);
    assert_eq!(h.timer(when, Timer::Retry(txn, p("a"))), vec![commit_to(txn, "a")]);
    // Acks end it.
    assert_eq!(h.delivered(when, txn, "a", Ok(())), vec![]);
    assert_eq!(
        h.delivered(when.plus(1), txn, "b", Ok(())),
        vec![Fx::Persist { txn, record: decision_record(&["a", "b"], when.plus(1), true), synced: false }, forget_fx(when.plus(1), txn)]
    );
    assert_eq!(h.core.unfinished(), 0);
}

#[test]
fn recover_of_an_ended_record_holds_it_until_its_retention_ends() {
    let mut h = H::new();
    let txn = TxnId { epoch: EPOCH - 2, seq: 9 };
    let decided = UnixMillis(T0.0 - 1_000);
    let fx = norm(h.core.recover(T0, vec![(txn, decision_record(&["b", "a"], decided, true))], None));
    assert_eq!(fx, vec![Fx::Timer(decided.plus(RETENTION), Timer::Forget(txn))], "no phase two: every participant acknowledged");
    assert_eq!(h.core.unfinished(), 0);
    assert_eq!(h.query(T0, txn), Decision::Commit);
    assert_eq!(
        h.txn_status(at(5), txn),
        TxnStatus {
            txn,
            state: TxnState::Committed,
            abort_reason: None,
            participants: vec![
                ParticipantStatus { name: p("a"), endpoint: ep("a"), vote: Some(Vote::Yes), acknowledged: true, retries: 0 },
                ParticipantStatus { name: p("b"), endpoint: ep("b"), vote: Some(Vote::Yes), acknowledged: true, retries: 0 },
            ],
            deadline: Some(decided),
            finished: true,
            age_ms: 1_005,
            presumed: false
        }
    );
    let (req, fx) = h.commit(T0, txn);
    assert_eq!(fx, vec![committed_fx(req, txn)]);
    let (req, fx) = h.abort(T0, txn, "");
    assert_eq!(fx, vec![error_fx(req, CoreError::AlreadyCommitted(txn))]);
    let (req, fx) = h.enlist(T0, txn, "c");
    assert_eq!(fx, vec![error_fx(req, CoreError::EnlistmentClosed { txn, state: "committed" })]);
    // Finished: listed, but not in doubt.
    let l = h.list(at(5), false, 10);
    assert_eq!((l.transactions.len(), l.in_doubt, l.oldest_in_doubt_ms), (1, 0, 0));
    // Nothing was sent, so acks, failures and retries are stale.
    assert_eq!(h.delivered(at(6), txn, "a", Ok(())), vec![]);
    assert_eq!(h.delivered(at(6), txn, "b", Err("x".into())), vec![]);
    assert_eq!(h.timer(at(7), Timer::Retry(txn, p("a"))), vec![]);
    // Its neighbours of the same old run are presumed aborted (no horizon).
    let next = TxnId { epoch: EPOCH - 2, seq: 10 };
    assert_eq!(h.query(T0, next), Decision::Abort);
    assert_eq!(h.txn_status(T0, next).state, TxnState::Aborted);

    // Retention ends: the record is deleted and the horizon rises to it.
    let end = decided.plus(RETENTION);
    assert_eq!(h.timer(end, Timer::Forget(txn)), vec![Fx::ForgetDecision { txn, horizon: txn }]);
    let s = h.txn_status(end, txn);
    assert_eq!((s.state, s.presumed, s.finished, s.age_ms), (TxnState::Forgotten, true, true, 0));
    let (req, fx) = h.commit(end, txn);
    assert_eq!(fx, vec![error_fx(req, CoreError::Forgotten(txn))]);
    let (req, fx) = h.abort(end, txn, "");
    assert_eq!(fx, vec![error_fx(req, CoreError::Forgotten(txn))]);
    // Below the horizon everything unheld is forgotten; above it, presumed
    // aborted.
    let before = TxnId { epoch: EPOCH - 2, seq: 8 };
    assert_eq!(h.txn_status(end, before).state, TxnState::Forgotten);
    assert_eq!(h.txn_status(end, next).state, TxnState::Aborted);
    assert_eq!(h.timer(end, Timer::Forget(txn)), vec![], "forgotten once");
}

#[test]
fn recover_of_an_ended_record_past_its_retention_forgets_it_at_once() {
    let mut h = H::new();
    let txn = TxnId { epoch: EPOCH - 1, seq: 3 };
    let decided = UnixMillis(T0.0 - RETENTION - 1);
    let fx = norm(h.core.recover(T0, vec![(txn, decision_record(&["a"], decided, true))], None));
    assert_eq!(fx, vec![Fx::Timer(T0, Timer::Forget(txn))], "the Forget timer is due now");
    let s = h.txn_status(T0, txn);
    assert_eq!((s.state, s.finished, s.presumed, s.age_ms), (TxnState::Committed, true, false, RETENTION + 1));
    assert_eq!(h.timer(T0, Timer::Forget(txn)), vec![Fx::ForgetDecision { txn, horizon: txn }]);
    assert_eq!(h.txn_status(T0, txn).state, TxnState::Forgotten);
}

#[test]
fn a_lazy_record_keeps_a_commit_with_no_yes_voter_committed_after_a_restart() {
    // Run 1: an empty transaction and an all-read-only one commit; the log
    // keeps what their lazy PersistDecision effects wrote.
    let mut h = H::new();
    let (trivial, _) = h.begin_at(T0, 0);
    let (_, mut fx) = h.commit(at(5), trivial);
    let (read_only, _, _) = h.preparing(&["a", "b"]);
    assert_eq!(h.vote(at(150), read_only, "a", Ok(Vote::ReadOnly)), vec![]);
    fx.extend(h.vote(at(160), read_only, "b", Ok(Vote::ReadOnly)));
    let log: Vec<(TxnId, DecisionRecord)> = fx
        .into_iter()
        .filter_map(|f| match f {
            Fx::Persist { txn, record, synced: false } => Some((txn, record)),
            Fx::Persist { synced: true, .. } => panic!("nothing is forced for a commit with no YES voter"),
            _ => None,
        })
        .collect();
    assert_eq!(log, vec![(trivial, decision_record(&[], at(5), true)), (read_only, decision_record(&[], at(160), true))]);

    // Run 2 recovers that log: both are held as finished commits, with
    // nothing to deliver, until their Forget timers.
    let mut h = H { core: Core::new(EPOCH + 1, config()), next_req: 1_000 };
    let restart = at(1_000);
    let fx = norm(h.core.recover(restart, log, None));
    assert_eq!(fx, vec![forget_fx(at(5), trivial), forget_fx(at(160), read_only)]);
    assert_eq!(h.core.unfinished(), 0);
    for (txn, decided) in [(trivial, at(5)), (read_only, at(160))] {
        assert_eq!(
            h.txn_status(restart, txn),
            TxnStatus {
                txn,
                state: TxnState::Committed,
                abort_reason: None,
                participants: vec![],
                deadline: Some(decided),
                finished: true,
                age_ms: decided.until(restart),
                presumed: false
            },
            "{txn} is committed, not presumed aborted"
        );
        let (req, fx) = h.commit(restart, txn);
        assert_eq!(fx, vec![committed_fx(req, txn)], "a retried Commit of {txn}");
        assert_eq!(h.query(restart, txn), Decision::Commit);
        let (req, fx) = h.abort(restart, txn, "");
        assert_eq!(fx, vec![error_fx(req, CoreError::AlreadyCommitted(txn))]);
        let (req, fx) = h.enlist(restart, txn, "c");
        assert_eq!(fx, vec![error_fx(req, CoreError::EnlistmentClosed { txn, state: "committed" })]);
    }
    let l = h.list(restart, false, 10);
    assert_eq!((l.transactions.len(), l.in_doubt, l.oldest_in_doubt_ms), (2, 0, 0));
    assert_eq!(h.list(restart, true, 10), TxnList { transactions: vec![], in_doubt: 0, oldest_in_doubt_ms: 0 });

    // Their retention ends: the records go, the horizon rises, and they are
    // forgotten, never presumed aborted.
    let end = at(160).plus(RETENTION);
    assert_eq!(h.timer(at(5).plus(RETENTION), Timer::Forget(trivial)), vec![Fx::ForgetDecision { txn: trivial, horizon: trivial }]);
    assert_eq!(h.timer(end, Timer::Forget(read_only)), vec![Fx::ForgetDecision { txn: read_only, horizon: read_only }]);
    for txn in [trivial, read_only] {
        assert_eq!(h.txn_status(end, txn), forgotten_status(txn));
        let (req, fx) = h.commit(end, txn);
        assert_eq!(fx, vec![error_fx(req, CoreError::Forgotten(txn))]);
    }
}

#[test]
fn recover_skips_invalid_names_and_ends_empty_records() {
    let mut h = H::new();
    let t1 = TxnId { epoch: EPOCH - 1, seq: 1 };
    let t2 = TxnId { epoch: EPOCH - 1, seq: 2 };
    let mut r1 = decision_record(&["a"], UnixMillis(5), false);
    r1.participants.push(LoggedParticipant { name: "not a name!".into(), endpoint: ep("x") });
    let r2 = decision_record(&[], UnixMillis(6), false);
    let fx = norm(h.core.recover(T0, vec![(t1, r1), (t2, r2)], None));
    assert_eq!(
        fx,
        vec![commit_to(t1, "a"), Fx::Persist { txn: t2, record: decision_record(&[], T0, true), synced: false }, forget_fx(T0, t2)]
    );
}

#[test]
fn recovered_and_new_transactions_coexist() {
    let mut h = H::new();
    let old = TxnId { epoch: EPOCH - 1, seq: 1 };
    let _ = h.core.recover(T0, vec![(old, decision_record(&["a"], UnixMillis(5), false))], None);
    // New ids start at seq 1 of this epoch.
    let (txn, _) = h.begin_at(T0, 0);
    assert_eq!(txn, TxnId { epoch: EPOCH, seq: 1 });
    assert_eq!(h.core.unfinished(), 2);
}

#[test]
fn recover_with_a_horizon_answers_forgotten_at_or_below_it() {
    let mut h = H::new();
    let horizon = TxnId { epoch: EPOCH - 1, seq: 20 };
    let live = TxnId { epoch: EPOCH - 1, seq: 15 };
    let fx = norm(h.core.recover(T0, vec![(live, decision_record(&["a"], UnixMillis(T0.0 - 100), false))], Some(horizon)));
    assert_eq!(fx, vec![commit_to(live, "a")]);
    // A held transaction is answered from memory, below the horizon or not.
    let s = h.txn_status(at(1), live);
    assert_eq!((s.state, s.presumed, s.age_ms), (TxnState::Committed, false, 101));
    assert_eq!(h.query(at(1), live), Decision::Commit);
    // At and below the horizon, in that run and earlier ones: forgotten.
    for txn in [horizon, TxnId { epoch: EPOCH - 1, seq: 1 }, TxnId { epoch: EPOCH - 3, seq: 99 }] {
        assert_eq!(h.txn_status(at(1), txn), forgotten_status(txn));
        let (req, fx) = h.commit(at(1), txn);
        assert_eq!(fx, vec![error_fx(req, CoreError::Forgotten(txn))]);
        let (req, fx) = h.abort(at(1), txn, "");
        assert_eq!(fx, vec![error_fx(req, CoreError::Forgotten(txn))]);
        assert_eq!(h.query(at(1), txn), Decision::Abort);
    }
    // Above it, of that run: presumed aborted.
    let above = TxnId { epoch: EPOCH - 1, seq: 21 };
    assert_eq!(h.txn_status(at(1), above), presumed_aborted_status(above));
    let (req, fx) = h.commit(at(1), above);
    assert_eq!(fx, vec![aborted_fx(req, above, presumed_abort())]);
    let (req, fx) = h.abort(at(1), above, "");
    assert_eq!(fx, vec![reply_fx(req, Reply::Aborted { txn: above })]);
    // This run's ids are above it: not found until issued.
    let first = TxnId { epoch: EPOCH, seq: 1 };
    assert_eq!(h.status(at(1), first), Reply::Error(CoreError::NotFound(first)));
    let (txn, _) = h.begin_at(at(2), 0);
    assert_eq!(txn, first);
    assert_eq!(h.txn_status(at(2), txn).state, TxnState::Active);
    // Forgetting the recovered one keeps the higher horizon.
    assert_eq!(
        h.delivered(at(3), live, "a", Ok(())),
        vec![Fx::Persist { txn: live, record: decision_record(&["a"], at(3), true), synced: false }, forget_fx(at(3), live)]
    );
    assert_eq!(h.timer(at(3).plus(RETENTION), Timer::Forget(live)), vec![Fx::ForgetDecision { txn: live, horizon }]);
    assert_eq!(h.txn_status(at(3).plus(RETENTION), live), forgotten_status(live));
}

#[test]
fn forget_of_a_recovered_record_without_valid_participants_deletes_it() {
    let mut h = H::new();
    // Ended, naming only an invalid participant; and not ended, naming none.
    let t1 = TxnId { epoch: EPOCH - 1, seq: 1 };
    let t2 = TxnId { epoch: EPOCH - 1, seq: 2 };
    let mut r1 = decision_record(&[], UnixMillis(T0.0 - RETENTION), true);
    r1.participants.push(LoggedParticipant { name: "not a name!".into(), endpoint: ep("x") });
    let r2 = decision_record(&[], UnixMillis(T0.0 - 10), false);
    let fx = norm(h.core.recover(T0, vec![(t1, r1), (t2, r2)], None));
    assert_eq!(
        fx,
        vec![
            Fx::Timer(T0, Timer::Forget(t1)),
            Fx::Persist { txn: t2, record: decision_record(&[], T0, true), synced: false },
            forget_fx(T0, t2)
        ]
    );
    assert_eq!(h.timer(T0, Timer::Forget(t1)), vec![Fx::ForgetDecision { txn: t1, horizon: t1 }]);
    assert_eq!(h.timer(T0.plus(RETENTION), Timer::Forget(t2)), vec![Fx::ForgetDecision { txn: t2, horizon: t2 }]);
    assert_eq!(h.txn_status(T0.plus(RETENTION), t1), forgotten_status(t1));
    assert_eq!(h.txn_status(T0.plus(RETENTION), t2), forgotten_status(t2));
}

// ---------------------------------------------------------------------------
// Stale and late inputs
// ---------------------------------------------------------------------------

#[test]
fn stale_votes_are_ignored() {
    let mut h = H::new();
    // For an unknown transaction.
    assert_eq!(h.vote(T0, TxnId { epoch: EPOCH, seq: 40 }, "a", Ok(Vote::Yes)), vec![]);
    assert_eq!(h.vote(T0, TxnId { epoch: EPOCH - 1, seq: 40 }, "a", Ok(Vote::No("x".into()))), vec![]);
    // Before Commit: not counted.
    let (txn, _) = h.active(&["a", "b"]);
    assert_eq!(h.vote(at(20), txn, "a", Ok(Vote::Yes)), vec![]);
    assert_eq!(h.vote(at(20), txn, "b", Ok(Vote::No("early".into()))), vec![]);
    assert_eq!(h.txn_status(at(21), txn).state, TxnState::Active);
    let (req, fx) = h.commit(at(100), txn);
    assert_eq!(fx.len(), 3, "{fx:?}");
    // From a participant that is not enlisted.
    assert_eq!(h.vote(at(110), txn, "stranger", Ok(Vote::No("x".into()))), vec![]);
    // Duplicates: the first vote counts.
    assert_eq!(h.vote(at(120), txn, "a", Ok(Vote::Yes)), vec![]);
    assert_eq!(h.vote(at(121), txn, "a", Ok(Vote::Yes)), vec![]);
    assert_eq!(h.vote(at(122), txn, "a", Ok(Vote::No("changed my mind".into()))), vec![]);
    assert_eq!(h.vote(at(123), txn, "a", Err("late error".into())), vec![]);
    assert_eq!(h.txn_status(at(124), txn).state, TxnState::Preparing);
    let fx = h.vote(at(130), txn, "b", Ok(Vote::Yes));
    assert_eq!(fx, vec![Fx::Persist { txn, record: decision_record(&["a", "b"], at(130), false), synced: true }]);
    // Votes while deciding.
    assert_eq!(h.vote(at(140), txn, "b", Ok(Vote::No("x".into()))), vec![]);
    assert_eq!(h.vote(at(141), txn, "b", Err("x".into())), vec![]);
    let fx = h.durable(at(150), txn);
    assert_eq!(fx, vec![committed_fx(req, txn), commit_to(txn, "a"), commit_to(txn, "b")]);
    // Votes after the decision.
    assert_eq!(h.vote(at(160), txn, "a", Ok(Vote::No("x".into()))), vec![]);
    assert_eq!(h.vote(at(160), txn, "a", Ok(Vote::Yes)), vec![]);
}

#[test]
fn durable_for_a_transaction_not_deciding_is_ignored() {
    let mut h = H::new();
    assert_eq!(h.durable(T0, TxnId { epoch: EPOCH, seq: 3 }), vec![], "unknown");
    let (txn, _) = h.active(&["a"]);
    assert_eq!(h.durable(at(50), txn), vec![], "Active");
    let _ = h.commit(at(100), txn);
    assert_eq!(h.durable(at(150), txn), vec![], "Preparing");
    assert_eq!(h.txn_status(at(151), txn).state, TxnState::Preparing);
    let _ = h.vote(at(200), txn, "a", Ok(Vote::Yes));
    assert_eq!(h.durable(at(300), txn).len(), 2, "Deciding");
    assert_eq!(h.durable(at(301), txn), vec![], "duplicate Durable");
    // Aborted.
    let (t2, _) = h.active(&["a"]);
    let _ = h.abort(at(10), t2, "");
    assert_eq!(h.durable(at(20), t2), vec![]);
}

#[test]
fn timers_for_finished_transactions_do_nothing() {
    let mut h = H::new();
    let (txn, deadline) = h.begin_at(T0, 0);
    h.enlist_ok(at(1), txn, "a", deadline);
    let _ = h.commit(at(100), txn);
    let _ = h.vote(at(200), txn, "a", Ok(Vote::Yes));
    let _ = h.durable(at(300), txn);
    for t in [Timer::Deadline(txn), Timer::PrepareTimeout(txn), Timer::Forget(txn)] {
        assert_eq!(h.timer(deadline, t.clone()), vec![], "{t:?} on a committed, unfinished transaction");
    }
    assert_eq!(h.txn_status(deadline, txn).state, TxnState::Committed, "Forget before finishing keeps it");
    let _ = h.delivered(deadline, txn, "a", Ok(()));
    for t in [Timer::Deadline(txn), Timer::PrepareTimeout(txn), Timer::Retry(txn, p("a"))] {
        assert_eq!(h.timer(deadline.plus(1), t.clone()), vec![], "{t:?} on a finished transaction");
    }
    // Aborted ones too.
    let (t2, d2) = h.active(&["a"]);
    let _ = h.abort(at(20), t2, "");
    for t in [Timer::Deadline(t2), Timer::PrepareTimeout(t2)] {
        assert_eq!(h.timer(d2, t.clone()), vec![], "{t:?} on an aborted transaction");
    }
    // Unknown ones.
    let unknown = TxnId { epoch: EPOCH, seq: 999 };
    for t in [Timer::Deadline(unknown), Timer::PrepareTimeout(unknown), Timer::Retry(unknown, p("a")), Timer::Forget(unknown)] {
        assert_eq!(h.timer(d2, t.clone()), vec![], "{t:?} on an unknown transaction");
    }
    // PrepareTimeout while Active (a stale timer of nothing) does nothing.
    let (t3, _) = h.active(&["a"]);
    assert_eq!(h.timer(at(50), Timer::PrepareTimeout(t3)), vec![]);
    assert_eq!(h.timer(at(50), Timer::Retry(t3, p("a"))), vec![]);
    assert_eq!(h.txn_status(at(50), t3).state, TxnState::Active);
}

#[test]
fn stale_deliveries_are_ignored() {
    let mut h = H::new();
    assert_eq!(h.delivered(T0, TxnId { epoch: EPOCH, seq: 5 }, "a", Ok(())), vec![]);
    let (txn, _) = h.committed(&["a"]);
    assert_eq!(h.delivered(at(400), txn, "stranger", Err("x".into())), vec![]);
    assert_eq!(h.delivered(at(400), txn, "a", Ok(())).len(), 2);
    assert_eq!(h.delivered(at(401), txn, "a", Err("late failure".into())), vec![], "after the ack");
}

/// Found by review, not reachable through a correct driver (which reports
/// `Delivered` only for a `SendDecision` it performed), but the module docs
/// promise that stale acks are ignored.
#[test]
fn ack_without_a_phase_two_in_flight_is_ignored() {
    let mut h = H::new();
    let (txn, req) = h.deciding(&["a", "b"]);
    assert_eq!(h.delivered(at(250), txn, "a", Ok(())), vec![]);
    assert!(!h.txn_status(at(251), txn).participants[0].acknowledged, "nothing was delivered to a");
    let fx = h.durable(at(300), txn);
    assert_eq!(fx, vec![committed_fx(req, txn), commit_to(txn, "a"), commit_to(txn, "b")]);
}

#[test]
fn persist_failed_answers_log_failed_and_stays_pending() {
    let mut h = H::new();
    let (txn, r1) = h.deciding(&["a", "b"]);
    let (r2, fx) = h.commit(at(210), txn);
    assert_eq!(fx, vec![]);
    let fx = h.step(at(220), Input::PersistFailed { txn, error: "disk full".into() });
    assert_eq!(fx, vec![error_fx(r1, CoreError::LogFailed("disk full".into())), error_fx(r2, CoreError::LogFailed("disk full".into()))]);
    assert!(!has_commit_evidence(&fx));
    assert_eq!(h.query(at(230), txn), Decision::Pending);
    assert_eq!(h.txn_status(at(230), txn).state, TxnState::Deciding);
    // The outcome is unknown: it cannot be aborted either.
    let (req, fx) = h.abort(at(240), txn, "");
    assert_eq!(fx, vec![error_fx(req, CoreError::AlreadyCommitted(txn))]);
    assert_eq!(h.timer(at(DEFAULT_TIMEOUT), Timer::Deadline(txn)), vec![]);
    assert_eq!(h.timer(at(DEFAULT_TIMEOUT), Timer::PrepareTimeout(txn)), vec![]);
    assert_eq!(h.step(at(250), Input::PersistFailed { txn, error: "again".into() }), vec![]);
    assert_eq!(h.core.unfinished(), 1);
}

#[test]
fn persist_failed_for_a_transaction_not_deciding_is_ignored() {
    let mut h = H::new();
    let (txn, _, _) = h.preparing(&["a"]);
    assert_eq!(h.step(at(150), Input::PersistFailed { txn, error: "x".into() }), vec![]);
    assert_eq!(h.txn_status(at(151), txn).state, TxnState::Preparing);
    let unknown = TxnId { epoch: EPOCH, seq: 50 };
    assert_eq!(h.step(at(150), Input::PersistFailed { txn: unknown, error: "x".into() }), vec![]);
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

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

/// What the test has learned about one transaction from the effects.
#[derive(Default)]
struct Seen {
    commit: Option<String>,
    abort: Option<String>,
    /// A decision record exists: a synced PersistDecision was emitted, the
    /// lazy record of a commit with no YES voter was, or the record was
    /// recovered.
    logged: bool,
    /// Durable was fed after that (or the record was recovered, or it is the
    /// lazy record of a commit with no YES voter, which nothing waits for).
    durable: bool,
    /// The END record exists: every YES voter acknowledged the commit (or
    /// there was none).
    ended: bool,
    /// This run issued it (its Deadline timer was set).
    begun: bool,
    /// Its Forget timer was set.
    forget_set: bool,
    /// Its Forget timer fired: the core no longer holds it.
    forgotten: bool,
    /// ForgetDecision was emitted for it: its decision record, if it had
    /// one, deleted, and the horizon raised to it.
    forget_decision: bool,
    /// Enlisted replies.
    enlisted: BTreeSet<String>,
    /// SendPrepare targets.
    prepared_to: BTreeSet<String>,
    /// The first vote fed after each SendPrepare.
    first_vote: BTreeMap<String, Result<Vote, String>>,
}

struct Explorer {
    rng: Rng,
    core: Core,
    now: UnixMillis,
    next_req: ReqId,
    txns: Vec<TxnId>,
    seen: BTreeMap<TxnId, Seen>,
    /// The transactions the core holds (begun or recovered, not forgotten).
    held: BTreeSet<TxnId>,
    /// The garbage-collection horizon, as the ForgetDecision effects raise it.
    horizon: Option<TxnId>,
    /// The horizon recovery started from.
    initial_horizon: Option<TxnId>,
    /// The Forget timer being handled, if any, and whether its transaction
    /// is a finished commit (so forgetting it must emit ForgetDecision).
    forgetting: Option<(TxnId, bool)>,
    /// req → (what, txn) for replies that do not name their transaction.
    reqs: BTreeMap<ReqId, (&'static str, TxnId, String)>,
    /// req → (in_doubt_only, limit) of List requests.
    lists: BTreeMap<ReqId, (bool, usize)>,
    prepares: Vec<(TxnId, String)>,
    deliveries: Vec<(TxnId, String)>,
    persists: Vec<TxnId>,
    failed_persists: Vec<TxnId>,
    timers: Vec<(UnixMillis, Timer)>,
    /// Where the run is (seed, scenario, step), for failure messages.
    prefix: String,
    /// `prefix` plus the input being handled.
    ctx: String,
}

impl Explorer {
    fn new(seed: u64) -> Self {
        let core = Core::new(EPOCH, CoreConfig { seed, ..config() });
        Explorer {
            rng: Rng::new(seed),
            core,
            now: T0,
            next_req: 0,
            txns: vec![TxnId { epoch: EPOCH - 1, seq: 1 }, TxnId { epoch: EPOCH, seq: 10_000 }],
            seen: BTreeMap::new(),
            held: BTreeSet::new(),
            horizon: None,
            initial_horizon: None,
            forgetting: None,
            reqs: BTreeMap::new(),
            lists: BTreeMap::new(),
            prepares: Vec::new(),
            deliveries: Vec::new(),
            persists: Vec::new(),
            failed_persists: Vec::new(),
            timers: Vec::new(),
            prefix: String::new(),
            ctx: String::new(),
        }
    }

    /// Recovers a random decision log of the previous run: one commit still
    /// being delivered, maybe ended ones (one past its retention, one the lazy
    /// record of a commit with no YES voter), and a random horizon (none,
    /// below them, or above them).
    fn recover(&mut self) {
        let old = |seq| TxnId { epoch: EPOCH - 1, seq };
        let mut records = vec![(old(2), decision_record(&["a", "b"], UnixMillis(T0.0 - 3_000), false))];
        if self.rng.chance(50) {
            records.push((old(3), decision_record(&["c"], UnixMillis(T0.0 - RETENTION - 5), true)));
        }
        if self.rng.chance(50) {
            records.push((old(4), decision_record(&["a", "d"], UnixMillis(T0.0 - 1_000), true)));
        }
        if self.rng.chance(50) {
            records.push((old(5), decision_record(&[], UnixMillis(T0.0 - 2_000), true)));
        }
        let horizon = match self.rng.below(3) {
            0 => None,
            1 => Some(old(1)),
            _ => Some(old(6)),
        };
        for (txn, record) in &records {
            let s = self.seen.entry(*txn).or_default();
            s.logged = true;
            s.durable = true;
            s.ended = record.ended;
            s.commit = Some("recovered decision record".into());
            self.held.insert(*txn);
            self.txns.push(*txn);
        }
        self.horizon = horizon;
        self.initial_horizon = horizon;
        self.ctx = format!("{} recovering {records:?} with horizon {horizon:?}", self.prefix);
        let effects = self.core.recover(self.now, records, horizon);
        self.observe(effects);
    }

    fn req(&mut self) -> ReqId {
        self.next_req += 1;
        self.next_req
    }

    fn txn(&mut self) -> TxnId {
        self.rng.pick(&self.txns).expect("never empty")
    }

    fn name(&mut self) -> String {
        self.rng.pick(&NAMES).expect("never empty").to_owned()
    }

    fn below_horizon(&self, txn: TxnId) -> bool {
        self.horizon.is_some_and(|h| txn <= h)
    }

    fn evidence(&mut self, txn: TxnId, commit: bool, what: String) {
        let ctx = self.ctx.clone();
        let s = self.seen.entry(txn).or_default();
        if commit {
            if let Some(a) = &s.abort {
                panic!("{ctx}: {txn} shows commit ({what}) after abort ({a})");
            }
            s.commit.get_or_insert(what);
        } else {
            if let Some(c) = &s.commit {
                panic!("{ctx}: {txn} shows abort ({what}) after commit ({c})");
            }
            s.abort.get_or_insert(what);
        }
    }

    /// Persist before send: nothing that reveals a logged commit may come
    /// before the log reported it durable.
    fn check_durable_first(&self, txn: TxnId, what: &str) {
        if let Some(s) = self.seen.get(&txn) {
            assert!(!s.logged || s.durable, "{}: {what} for {txn} before the decision was durable", self.ctx);
        }
    }

    /// Validity: a commit decision needs every enlisted participant to have
    /// voted YES or READ_ONLY, first, after its Prepare.
    fn check_valid_commit(&self, txn: TxnId, logged: Option<&DecisionRecord>) {
        let Some(s) = self.seen.get(&txn) else { return };
        assert!(
            s.enlisted.is_subset(&s.prepared_to),
            "{}: {txn} decided commit without preparing {:?} (prepared {:?})",
            self.ctx,
            s.enlisted,
            s.prepared_to
        );
        let mut yes = Vec::new();
        for p in &s.prepared_to {
            match s.first_vote.get(p) {
                Some(Ok(Vote::Yes)) => yes.push(p.clone()),
                Some(Ok(Vote::ReadOnly)) => {}
                other => panic!("{}: {txn} decided commit but {p}'s vote was {other:?}", self.ctx),
            }
        }
        if let Some(r) = logged {
            let names: Vec<String> = r.participants.iter().map(|lp| lp.name.clone()).collect();
            assert_eq!(names, yes, "{}: {txn} decision record must name exactly the YES voters", self.ctx);
        }
    }

    fn check_held(&self, txn: TxnId, what: &str) {
        assert!(self.held.contains(&txn), "{}: {what} about {txn}, which the core no longer holds", self.ctx);
    }

    /// The core answered "aborted" for a transaction it does not hold.
    fn presumed_abort(&mut self, txn: TxnId, what: String) {
        assert!(!self.held.contains(&txn), "{}: {what}: presumed abort of {txn}, which the core holds", self.ctx);
        assert!(!self.below_horizon(txn), "{}: {what}: presumed abort of {txn} at or below the horizon {:?}", self.ctx, self.horizon);
        self.evidence(txn, false, what);
    }

    /// The core answered that the outcome is no longer known.
    fn forgotten(&self, txn: TxnId, what: &str) {
        assert!(!self.held.contains(&txn), "{}: {what} for {txn}, which the core holds", self.ctx);
        assert!(self.below_horizon(txn), "{}: {what} for {txn} above the horizon {:?}", self.ctx, self.horizon);
    }

    fn check_status(&mut self, st: &TxnStatus, what: String) {
        let txn = st.txn;
        let held = self.held.contains(&txn);
        assert_eq!(st.presumed, !held, "{}: {what}: presumed answers are exactly those about unheld transactions: {st:?}", self.ctx);
        if st.presumed {
            assert!(
                st.participants.is_empty() && st.deadline.is_none() && st.finished && st.age_ms == 0,
                "{}: {what}: a presumed answer has no details: {st:?}",
                self.ctx
            );
            match st.state {
                TxnState::Forgotten => {
                    assert_eq!(st.abort_reason, None, "{}: {what}", self.ctx);
                    self.forgotten(txn, &what);
                }
                TxnState::Aborted => {
                    assert_eq!(st.abort_reason, Some(presumed_abort()), "{}: {what}", self.ctx);
                    self.presumed_abort(txn, what);
                }
                other => panic!("{}: {what}: presumed state {other:?}", self.ctx),
            }
            return;
        }
        match st.state {
            TxnState::Committed => {
                self.check_durable_first(txn, &what);
                self.evidence(txn, true, what);
            }
            TxnState::Aborted => self.evidence(txn, false, what),
            TxnState::Forgotten => panic!("{}: {what}: a held transaction reported Forgotten", self.ctx),
            TxnState::Active | TxnState::Preparing | TxnState::Deciding => {
                assert!(!st.finished, "{}: {what}: finished before a decision: {st:?}", self.ctx)
            }
        }
    }

    fn check_list(&mut self, l: &TxnList, in_doubt_only: bool, limit: usize) {
        let ctx = self.ctx.clone();
        let doubtful = |s: &TxnStatus| !s.finished && s.state != TxnState::Active;
        assert!(l.transactions.len() <= limit, "{ctx}: {} listed, limit {limit}", l.transactions.len());
        assert!(l.transactions.windows(2).all(|w| w[0].txn < w[1].txn), "{ctx}: List is not oldest first: {l:?}");
        if in_doubt_only {
            assert!(l.transactions.iter().all(doubtful), "{ctx}: in-doubt List shows a transaction not in doubt: {l:?}");
        }
        let listed_in_doubt = l.transactions.iter().filter(|s| doubtful(s)).count();
        let listed_oldest = l.transactions.iter().filter(|s| doubtful(s)).map(|s| s.age_ms).max();
        assert!(listed_in_doubt <= l.in_doubt, "{ctx}: {l:?}");
        assert!(l.in_doubt <= self.core.unfinished(), "{ctx}: more in doubt than unfinished: {l:?}");
        assert!(listed_oldest.unwrap_or(0) <= l.oldest_in_doubt_ms, "{ctx}: {l:?}");
        if l.in_doubt == 0 {
            assert_eq!(l.oldest_in_doubt_ms, 0, "{ctx}: {l:?}");
        }
        if l.transactions.len() < limit {
            // Nothing was cut off: the summary is the listed one.
            assert_eq!((listed_in_doubt, listed_oldest.unwrap_or(0)), (l.in_doubt, l.oldest_in_doubt_ms), "{ctx}: {l:?}");
            if !in_doubt_only {
                let ids: BTreeSet<TxnId> = l.transactions.iter().map(|s| s.txn).collect();
                assert_eq!(ids, self.held, "{ctx}: List must show exactly the transactions held");
            }
        }
        for st in &l.transactions {
            self.check_status(st, format!("List entry for {}", st.txn));
        }
    }

    fn apply(&mut self, input: Input) {
        let forget = match &input {
            Input::Timer(Timer::Forget(txn)) => Some(*txn),
            _ => None,
        };
        // Before a Forget timer fires, learn from the core whether it is
        // about a finished commit.
        let forgetting = forget.map(|txn| {
            self.ctx = format!("{} at {:?} before {input:?}", self.prefix, self.now);
            let st = self.status_of(txn);
            assert!(
                self.held.contains(&txn) && !st.presumed && st.finished,
                "{}: Forget timer of {txn}, which is not held and finished: {st:?}",
                self.ctx
            );
            (txn, st.state == TxnState::Committed)
        });
        self.ctx = format!("{} at {:?} after {input:?}", self.prefix, self.now);
        self.forgetting = forgetting;
        let effects = self.core.step(self.now, input);
        self.observe(effects);
        self.forgetting = None;
        if let Some((txn, commit)) = forgetting {
            self.forgot(txn, commit);
        }
    }

    /// Asks the core for `txn`'s status, checks the reply like any other, and
    /// returns it.
    fn status_of(&mut self, txn: TxnId) -> TxnStatus {
        let req = self.req();
        let effects = self.core.step(self.now, Input::Status { req, txn });
        let st = match effects.as_slice() {
            [Effect::Reply { req: r, reply: Reply::Status(st) }] if *r == req => st.clone(),
            other => panic!("{}: Status of {txn} answered {other:?}", self.ctx),
        };
        self.observe(effects);
        st
    }

    /// A Forget timer fired. It is set once, when a transaction finishes,
    /// and fires once, so the core must have dropped the transaction. It
    /// must have emitted ForgetDecision exactly when the transaction
    /// committed (record or not), and a forgotten commit is Forgotten from
    /// then on, never presumed aborted.
    fn forgot(&mut self, txn: TxnId, commit: bool) {
        let ctx = self.ctx.clone();
        let s = self.seen.entry(txn).or_default();
        assert!(s.forget_set && !s.forgotten, "{ctx}: Forget timer of {txn} never set, or fired twice");
        s.forgotten = true;
        assert_eq!(s.forget_decision, commit, "{ctx}: forgetting {txn} must emit ForgetDecision exactly when it committed");
        self.held.remove(&txn);
        let st = self.status_of(txn);
        if commit {
            assert_eq!(st.state, TxnState::Forgotten, "{ctx}: a forgotten commit must be Forgotten: {st:?}");
        }
    }

    fn query(&mut self, txn: TxnId) {
        let req = self.req();
        self.reqs.insert(req, ("query", txn, String::new()));
        self.apply(Input::QueryDecision { req, txn });
    }

    fn list(&mut self, in_doubt_only: bool, limit: usize) {
        let req = self.req();
        self.lists.insert(req, (in_doubt_only, limit));
        self.apply(Input::List { req, in_doubt_only, limit, filter: Default::default() });
    }

    fn observe(&mut self, effects: Vec<Effect>) {
        // The transaction of the Committed reply just observed, if the
        // previous effect was one.
        let mut after_committed: Option<TxnId> = None;
        for e in effects {
            let previous = after_committed.take();
            if let Effect::Reply { reply: Reply::Outcome { txn, outcome: Outcome::Committed }, .. } = &e {
                after_committed = Some(*txn);
            }
            match e {
                Effect::Reply { req, reply } => {
                    let tag = self.reqs.remove(&req);
                    let list = self.lists.remove(&req);
                    match reply {
                        // Ids are collected from the Deadline timers.
                        Reply::Begun { .. } => {}
                        Reply::Outcome { txn, outcome: Outcome::Committed } => {
                            self.check_held(txn, "Committed reply");
                            self.check_durable_first(txn, "Committed reply");
                            if !self.seen.get(&txn).is_some_and(|s| s.logged) {
                                self.check_valid_commit(txn, None);
                            }
                            self.evidence(txn, true, format!("Committed reply to {req}"));
                        }
                        Reply::Outcome { txn, outcome: Outcome::Aborted(r) } => {
                            let what = format!("Aborted({:?}) reply to {req}", r.code);
                            if r.code == AbortCode::PresumedAbort {
                                assert_eq!(r, presumed_abort(), "{}", self.ctx);
                                self.presumed_abort(txn, what);
                            } else {
                                self.check_held(txn, &what);
                                self.evidence(txn, false, what);
                            }
                        }
                        Reply::Aborted { txn } => {
                            let what = format!("Aborted reply to {req}");
                            if self.held.contains(&txn) {
                                self.evidence(txn, false, what);
                            } else {
                                self.presumed_abort(txn, what);
                            }
                        }
                        Reply::Error(CoreError::AlreadyCommitted(txn)) => {
                            self.check_held(txn, "AlreadyCommitted");
                            self.evidence(txn, true, format!("AlreadyCommitted to {req}"));
                        }
                        Reply::Error(CoreError::Forgotten(txn)) => self.forgotten(txn, &format!("Forgotten error to {req}")),
                        Reply::Error(CoreError::NotFound(txn)) => {
                            assert!(
                                txn.epoch >= EPOCH
                                    && !self.held.contains(&txn)
                                    && !self.below_horizon(txn)
                                    && !self.seen.get(&txn).is_some_and(|s| s.begun || s.logged),
                                "{}: NotFound for {txn}, which was issued",
                                self.ctx
                            );
                        }
                        Reply::Error(_) => {}
                        Reply::Decision(d) => {
                            let Some((_, txn, _)) = tag else { panic!("{}: untracked decision reply", self.ctx) };
                            let what = format!("QueryDecision {req} said {d:?}");
                            match d {
                                Decision::Commit => {
                                    self.check_held(txn, &what);
                                    self.check_durable_first(txn, &what);
                                    self.evidence(txn, true, what);
                                }
                                Decision::Abort if !self.held.contains(&txn) => match self.seen.get(&txn) {
                                    // A forgotten commit: presumed abort is
                                    // safe only because every YES voter had
                                    // acknowledged it (or there was none).
                                    Some(s) if s.commit.is_some() => assert!(
                                        s.forgotten && s.ended,
                                        "{}: {what} for committed {txn} before every YES voter acknowledged",
                                        self.ctx
                                    ),
                                    _ => self.evidence(txn, false, what),
                                },
                                Decision::Abort => self.evidence(txn, false, what),
                                Decision::Pending => self.check_held(txn, &what),
                            }
                        }
                        Reply::Enlisted { .. } => {
                            let Some(("enlist", txn, name)) = tag else { panic!("{}: untracked Enlisted reply", self.ctx) };
                            let s = self.seen.entry(txn).or_default();
                            assert!(s.prepared_to.is_empty(), "{}: {name} enlisted in {txn} after its prepares went out", self.ctx);
                            s.enlisted.insert(name);
                        }
                        Reply::Status(st) => self.check_status(&st, format!("Status reply to {req}")),
                        Reply::List(l) => {
                            let Some((in_doubt_only, limit)) = list else { panic!("{}: untracked List reply", self.ctx) };
                            self.check_list(&l, in_doubt_only, limit);
                        }
                    }
                }
                Effect::PersistDecision { txn, record, synced } => {
                    if synced {
                        assert!(!record.ended, "{}: the synced record is the decision", self.ctx);
                        self.check_valid_commit(txn, Some(&record));
                        let s = self.seen.entry(txn).or_default();
                        assert!(!s.logged, "{}: {txn} decision logged twice", self.ctx);
                        s.logged = true;
                        self.evidence(txn, true, "PersistDecision".into());
                        self.persists.push(txn);
                    } else if self.seen.get(&txn).is_some_and(|s| s.logged) {
                        assert!(record.ended, "{}: lazy records are END records", self.ctx);
                        self.check_durable_first(txn, "END record");
                        let s = self.seen.entry(txn).or_default();
                        assert!(!s.ended, "{}: END record of {txn} twice", self.ctx);
                        s.ended = true;
                        self.evidence(txn, true, "END record".into());
                    } else {
                        // A commit with no YES voter (no participants, or
                        // only read-only ones): nothing was forced, so its
                        // only record is lazy, ended, names nobody, and
                        // follows right after its Committed reply(ies).
                        let ctx = self.ctx.clone();
                        assert!(record.ended, "{ctx}: the lazy record of {txn}, which has no decision record, must be ended: {record:?}");
                        assert!(record.participants.is_empty(), "{ctx}: the lazy record of {txn} names participants: {record:?}");
                        assert_eq!(previous, Some(txn), "{ctx}: the lazy record of {txn} must follow its Committed reply");
                        assert_eq!(record.decided_unix_ms, self.now.0, "{ctx}: the lazy record of {txn} is decided now");
                        self.check_held(txn, "lazy record");
                        self.check_valid_commit(txn, Some(&record));
                        let s = self.seen.entry(txn).or_default();
                        assert!(s.commit.is_some(), "{ctx}: lazy record of {txn} before any sign of its commit");
                        assert!(!s.forget_set, "{ctx}: lazy record of {txn} after its Forget timer was set");
                        s.logged = true;
                        s.durable = true;
                        s.ended = true;
                        self.evidence(txn, true, "lazy record".into());
                    }
                }
                Effect::ForgetDecision { txn, horizon } => {
                    let ctx = self.ctx.clone();
                    assert_eq!(
                        self.forgetting,
                        Some((txn, true)),
                        "{ctx}: ForgetDecision of {txn} other than from the Forget timer of a held, finished commit"
                    );
                    let expected = self.horizon.max(Some(txn));
                    let s = self.seen.entry(txn).or_default();
                    assert!(s.commit.is_some(), "{ctx}: ForgetDecision of {txn}, which shows no commit");
                    assert!(s.logged, "{ctx}: ForgetDecision of {txn}, a commit that never had a record (not even a lazy one)");
                    assert!(s.ended, "{ctx}: ForgetDecision of {txn} before every YES voter acknowledged (no END record)");
                    assert!(!s.forget_decision, "{ctx}: ForgetDecision of {txn} twice");
                    s.forget_decision = true;
                    assert_eq!(Some(horizon), expected, "{ctx}: the horizon is the highest forgotten commit");
                    self.horizon = Some(horizon);
                }
                Effect::SendPrepare { txn, participant, .. } => {
                    let s = self.seen.entry(txn).or_default();
                    assert!(s.commit.is_none() && s.abort.is_none(), "{}: prepare of {txn} to {participant} after a decision", self.ctx);
                    s.prepared_to.insert(participant.as_str().to_owned());
                    self.prepares.push((txn, participant.as_str().to_owned()));
                }
                Effect::SendDecision { txn, participant, decision, .. } => {
                    let commit = matches!(decision, PhaseTwo::Commit(_));
                    if commit {
                        self.check_durable_first(txn, "SendDecision Commit");
                    }
                    self.check_held(txn, "SendDecision");
                    self.evidence(txn, commit, format!("SendDecision {} to {participant}", if commit { "Commit" } else { "Abort" }));
                    let key = (txn, participant.as_str().to_owned());
                    assert!(
                        !self.deliveries.contains(&key),
                        "{}: a second phase-two message to {participant} of {txn} in flight",
                        self.ctx
                    );
                    assert!(
                        !self.timers.iter().any(|(_, t)| *t == Timer::Retry(txn, participant.clone())),
                        "{}: phase-two message to {participant} of {txn} while a retry is scheduled",
                        self.ctx
                    );
                    self.deliveries.push(key);
                }
                Effect::SetTimer { at, timer } => {
                    match &timer {
                        Timer::Deadline(txn) => {
                            if !self.txns.contains(txn) {
                                self.txns.push(*txn); // Execute ids
                            }
                            self.held.insert(*txn);
                            self.seen.entry(*txn).or_default().begun = true;
                        }
                        Timer::Retry(txn, participant) => {
                            assert!(
                                !self.timers.iter().any(|(_, t)| *t == timer),
                                "{}: a second retry to {participant} of {txn} scheduled",
                                self.ctx
                            );
                            assert!(
                                !self.deliveries.contains(&(*txn, participant.as_str().to_owned())),
                                "{}: a retry to {participant} of {txn} scheduled while a message is in flight",
                                self.ctx
                            );
                        }
                        Timer::Forget(txn) => {
                            let s = self.seen.entry(*txn).or_default();
                            assert!(!s.forget_set, "{}: Forget timer of {txn} set twice", self.ctx);
                            // A finished commit has its ended record (END,
                            // recovered, or lazy) before it is scheduled to
                            // be forgotten.
                            assert!(
                                s.commit.is_none() || (s.logged && s.ended),
                                "{}: Forget timer of committed {txn} set before its ended record",
                                self.ctx
                            );
                            s.forget_set = true;
                        }
                        Timer::PrepareTimeout(_) => {}
                        Timer::Collect(p) => panic!("{}: a Collect timer for {p} with one-phase commit off", self.ctx),
                    }
                    self.timers.push((at, timer));
                }
                e @ (Effect::PersistMarker { .. } | Effect::ClearMarkers { .. } | Effect::Collect { .. }) => {
                    panic!("{}: {e:?} with one-phase commit off", self.ctx)
                }
            }
        }
    }

    fn vote(&mut self) -> Result<Vote, String> {
        match self.rng.below(10) {
            0..=5 => Ok(Vote::Yes),
            6 => Ok(Vote::ReadOnly),
            7 | 8 => Ok(Vote::No("random no".into())),
            _ => Err("random prepare error".into()),
        }
    }

    fn feed_vote(&mut self, txn: TxnId, name: String, vote: Result<Vote, String>) {
        let s = self.seen.entry(txn).or_default();
        if s.prepared_to.contains(&name) {
            s.first_vote.entry(name.clone()).or_insert_with(|| vote.clone());
        }
        let participant = ParticipantName::new(name).expect("valid");
        self.apply(Input::Voted { txn, participant, vote });
    }

    fn random_step(&mut self) {
        self.now = self.now.plus(match self.rng.below(10) {
            0..=5 => self.rng.below(50),
            6..=8 => self.rng.below(1_000),
            _ => self.rng.below(20_000),
        });
        match self.rng.below(100) {
            0..=9 => {
                let req = self.req();
                let timeout_ms = match self.rng.below(10) {
                    0..=3 => 0,
                    4 => MAX_TIMEOUT + 1,
                    _ => 500 + self.rng.below(15_000),
                };
                self.apply(Input::Begin { req, timeout_ms });
            }
            10..=21 => {
                let req = self.req();
                let txn = self.txn();
                let name = self.name();
                self.reqs.insert(req, ("enlist", txn, name.clone()));
                self.apply(Input::Enlist { req, txn, participant: p(&name), endpoint: ep(&name), incarnation: 0 });
            }
            22..=29 => {
                let req = self.req();
                let txn = self.txn();
                self.apply(Input::Commit { req, txn });
            }
            30..=33 => {
                let req = self.req();
                let txn = self.txn();
                self.apply(Input::Abort { req, txn, detail: String::new() });
            }
            34..=36 => {
                let req = self.req();
                let mut branches = Vec::new();
                for n in NAMES {
                    if self.rng.chance(50) {
                        branches.push(ExecBranch { participant: p(n), endpoint: ep(n), payload: vec![1] });
                    }
                }
                self.apply(Input::Execute { req, branches, timeout_ms: 0 });
                // The Execute participants count as enlisted.
                if let Some(&txn) = self.txns.last()
                    && let Some(s) = self.seen.get_mut(&txn)
                {
                    let prepared = s.prepared_to.clone();
                    s.enlisted.extend(prepared);
                }
            }
            37..=40 => {
                let txn = self.txn();
                self.query(txn);
            }
            41..=42 => {
                let req = self.req();
                let txn = self.txn();
                self.apply(Input::Status { req, txn });
            }
            43 => {
                let in_doubt_only = self.rng.chance(50);
                let limit = match self.rng.below(3) {
                    0 => 0,
                    1 => 1 + self.rng.below(4) as usize,
                    _ => usize::MAX,
                };
                self.list(in_doubt_only, limit);
            }
            44..=60 => {
                if let Some((txn, name)) = self.rng.take(&mut self.prepares) {
                    let vote = self.vote();
                    self.feed_vote(txn, name, vote);
                }
            }
            61..=63 => {
                // A stale or duplicate vote.
                let txn = self.txn();
                let name = self.name();
                let vote = self.vote();
                self.feed_vote(txn, name, vote);
            }
            64..=75 => {
                if let Some((txn, name)) = self.rng.take(&mut self.deliveries) {
                    let result = if self.rng.chance(70) { Ok(()) } else { Err("random delivery error".into()) };
                    self.apply(Input::Delivered { txn, participant: p(&name), result });
                }
            }
            76..=83 => {
                if let Some(txn) = self.rng.take(&mut self.persists) {
                    if self.rng.chance(85) {
                        self.seen.entry(txn).or_default().durable = true;
                        self.apply(Input::Durable { txn });
                    } else {
                        self.failed_persists.push(txn);
                        self.apply(Input::PersistFailed { txn, error: "random log error".into() });
                    }
                }
            }
            84..=85 => {
                // A stale Durable: only meaningful for a logged decision.
                let txn = self.txn();
                if self.seen.get(&txn).is_some_and(|s| s.logged) {
                    self.seen.entry(txn).or_default().durable = true;
                }
                self.apply(Input::Durable { txn });
            }
            _ => {
                if let Some((at, timer)) = self.rng.take(&mut self.timers) {
                    self.now = self.now.max(at);
                    self.apply(Input::Timer(timer));
                }
            }
        }
    }

    /// Answers everything favourably until nothing is left to do; every
    /// transaction must then be finished and forgotten, and every commit
    /// forgotten by ForgetDecision (deleting its decision record, if any).
    fn drain(&mut self) {
        for _ in 0..100_000 {
            if let Some((txn, name)) = self.prepares.pop() {
                self.feed_vote(txn, name, Ok(Vote::Yes));
            } else if let Some(txn) = self.persists.pop().or_else(|| self.failed_persists.pop()) {
                // A failed write that recovery finds on disk.
                self.seen.entry(txn).or_default().durable = true;
                self.apply(Input::Durable { txn });
            } else if let Some((txn, name)) = self.deliveries.pop() {
                self.apply(Input::Delivered { txn, participant: p(&name), result: Ok(()) });
            } else if !self.timers.is_empty() {
                let i = (0..self.timers.len()).min_by_key(|&i| self.timers[i].0).expect("non-empty");
                let (at, timer) = self.timers.swap_remove(i);
                self.now = self.now.max(at);
                self.apply(Input::Timer(timer));
            } else {
                assert_eq!(self.core.unfinished(), 0, "{}: transactions left unfinished after draining", self.ctx);
                self.check_drained();
                return;
            }
        }
        panic!("{}: draining did not terminate", self.ctx);
    }

    /// After draining: nothing is held, every commit (so every decision
    /// record) is forgotten by ForgetDecision, the horizon is the highest of
    /// them, and asking about every transaction once more contradicts
    /// nothing said before.
    fn check_drained(&mut self) {
        assert!(self.held.is_empty(), "{}: still held after every timer fired: {:?}", self.ctx, self.held);
        self.list(false, usize::MAX);
        let unforgotten: Vec<TxnId> = self.seen.iter().filter(|(_, s)| s.commit.is_some() && !s.forget_decision).map(|(t, _)| *t).collect();
        assert!(unforgotten.is_empty(), "{}: commits never forgotten by ForgetDecision: {unforgotten:?}", self.ctx);
        let highest = self.seen.iter().filter(|(_, s)| s.commit.is_some()).map(|(t, _)| *t).max();
        assert_eq!(self.horizon, self.initial_horizon.max(highest), "{}: final horizon", self.ctx);
        for txn in self.txns.clone() {
            let req = self.req();
            self.apply(Input::Status { req, txn });
            let req = self.req();
            self.apply(Input::Commit { req, txn });
            let req = self.req();
            self.apply(Input::Abort { req, txn, detail: String::new() });
            self.query(txn);
        }
    }
}

fn explore() {
    let seed = seed_from_env_or_clock();
    eprintln!("random exploration: TWOPC_SEED={seed}");
    let mut master = Rng::new(seed);
    for scenario in 0..40 {
        let sub = master.next();
        let mut x = Explorer::new(sub);
        if x.rng.chance(50) {
            x.prefix = format!("seed {seed} scenario {scenario} recovery");
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

/// Random inputs, checking after every effect that no decision changes, that
/// a commit is valid and durable before anyone learns it, that phase two has
/// at most one message or retry per participant, that every finished commit
/// (and only a commit, and only once every YES voter acknowledged it) is
/// forgotten by ForgetDecision under the right horizon and is never presumed
/// aborted afterwards, and that List and Status agree with what the core
/// holds.
#[test]
fn random_inputs_never_change_a_decision() {
    explore();
}

// ---------------------------------------------------------------------------
// One-phase commit

fn one_phase_core(epoch: u64) -> H {
    H { core: Core::new(epoch, CoreConfig { one_phase: true, ..config() }), next_req: 100 }
}

fn one_phase_fx(txn: TxnId, name: &str, payload: Option<&[u8]>) -> Fx {
    Fx::OnePhase { txn, to: p(name), payload: payload.map(<[u8]>::to_vec) }
}

#[test]
fn one_participant_commits_in_one_phase_after_the_marker_is_durable() {
    let mut h = one_phase_core(EPOCH);
    let fx = h.step(
        T0,
        Input::Execute {
            req: 1,
            branches: vec![ExecBranch { participant: p("a"), endpoint: ep("a"), payload: b"x".to_vec() }],
            timeout_ms: 0,
        },
    );
    let txn = TxnId { epoch: EPOCH, seq: 1 };
    // Nothing leaves before the marker is durable.
    assert_eq!(
        fx,
        vec![
            Fx::Timer(at(DEFAULT_TIMEOUT), Timer::Deadline(txn)),
            Fx::Timer(at(PREPARE_TIMEOUT), Timer::PrepareTimeout(txn)),
            Fx::Marker(p("a"))
        ]
    );
    assert_eq!(h.step(at(5), Input::MarkerDurable { participant: p("a") }), vec![one_phase_fx(txn, "a", Some(b"x"))]);
    // The participant's answer is the outcome: the caller hears it at once;
    // the record follows, and only once it is durable is the participant
    // told to release its own.
    let fx = h.vote(at(10), txn, "a", Ok(Vote::Committed));
    assert_eq!(fx, vec![committed_fx(1, txn), Fx::Persist { txn, record: decision_record(&["a"], at(10), false), synced: true }]);
    assert_eq!(h.txn_status(at(11), txn).state, TxnState::Committed);
    assert_eq!(h.durable(at(20), txn), vec![commit_to(txn, "a")]);
    let fx = h.delivered(at(30), txn, "a", Ok(()));
    assert_eq!(fx, vec![Fx::Persist { txn, record: decision_record(&["a"], at(30), true), synced: false }, forget_fx(at(30), txn)]);

    // A second one-phase transaction to the same participant needs no
    // second marker.
    let fx = h.step(
        at(40),
        Input::Execute {
            req: 2,
            branches: vec![ExecBranch { participant: p("a"), endpoint: ep("a"), payload: b"y".to_vec() }],
            timeout_ms: 0,
        },
    );
    let second = TxnId { epoch: EPOCH, seq: 2 };
    assert!(fx.contains(&one_phase_fx(second, "a", Some(b"y"))), "{fx:?}");
    assert!(!fx.iter().any(|f| matches!(f, Fx::Marker(_))), "{fx:?}");
}

#[test]
fn a_one_phase_no_aborts_and_a_lost_answer_is_asked_again_never_aborted() {
    let mut h = one_phase_core(EPOCH);
    let (txn, deadline) = h.active(&["a"]);
    let (req, fx) = h.commit(at(100), txn);
    assert_eq!(fx, vec![Fx::Timer(at(100 + PREPARE_TIMEOUT), Timer::PrepareTimeout(txn)), Fx::Marker(p("a"))]);
    assert_eq!(h.step(at(105), Input::MarkerDurable { participant: p("a") }), vec![one_phase_fx(txn, "a", None)]);
    // The answer is lost: whether it committed is unknown, so the
    // coordinator neither aborts nor lets the initiator abort, at the
    // prepare timeout or the deadline; it asks again.
    let fx = h.vote(at(110), txn, "a", Err("connection reset".into()));
    let retry_at = match fx.as_slice() {
        [Fx::Timer(t, Timer::Retry(x, n))] if *x == txn && *n == p("a") => *t,
        other => panic!("expected one retry timer, got {other:?}"),
    };
    assert_eq!(h.timer(retry_at, Timer::Retry(txn, p("a"))), vec![one_phase_fx(txn, "a", None)]);
    let (abort_req, fx) = h.abort(at(200), txn, "changed my mind");
    assert_eq!(fx, vec![error_fx(abort_req, CoreError::OnePhaseInFlight(txn))]);
    assert_eq!(h.timer(deadline, Timer::Deadline(txn)), vec![]);
    assert_eq!(h.txn_status(deadline, txn).state, TxnState::Preparing);
    // NO is final and needs no phase two (the participant aborted).
    let fx = h.vote(deadline.plus(1), txn, "a", Ok(Vote::No("insufficient funds".into())));
    let reason = AbortReason::at(AbortCode::ParticipantVotedNo, &p("a"), "insufficient funds");
    assert_eq!(fx, vec![aborted_fx(req, txn, reason), forget_fx(deadline.plus(1), txn)]);
}

#[test]
fn a_participant_that_answers_yes_to_one_phase_gets_two_phases() {
    let mut h = one_phase_core(EPOCH);
    let (txn, _) = h.active(&["a"]);
    let (req, _) = h.commit(at(100), txn);
    let _ = h.step(at(105), Input::MarkerDurable { participant: p("a") });
    assert_eq!(
        h.vote(at(110), txn, "a", Ok(Vote::Yes)),
        vec![Fx::Persist { txn, record: decision_record(&["a"], at(110), false), synced: true }]
    );
    assert_eq!(h.durable(at(120), txn), vec![committed_fx(req, txn), commit_to(txn, "a")]);
}

#[test]
fn a_failed_marker_write_aborts_what_waited_for_it() {
    let mut h = one_phase_core(EPOCH);
    let (txn, _) = h.active(&["a"]);
    let (req, _) = h.commit(at(100), txn);
    let fx = h.step(at(105), Input::MarkerFailed { participant: p("a"), error: "disk full".into() });
    let reason = AbortReason::at(AbortCode::PrepareFailed, &p("a"), "could not record the use of one-phase commit: disk full");
    assert_eq!(replies_to(&fx, req), vec![Reply::Outcome { txn, outcome: Outcome::Aborted(reason) }]);
    assert!(fx.iter().all(|f| !matches!(f, Fx::OnePhase { .. })), "nothing may be sent: {fx:?}");
}

#[test]
fn after_a_restart_unknown_transactions_of_a_marked_run_wait_for_collection() {
    // Run 1 used one phase with "a" and "b"; run 2 starts.
    let mut h = one_phase_core(EPOCH + 1);
    let _ = h.core.recover(T0, Vec::new(), None);
    let fx = norm(h.core.recover_markers(vec![(EPOCH, p("a")), (EPOCH, p("b"))]));
    assert_eq!(fx, vec![Fx::Collect(p("a")), Fx::Collect(p("b"))]);
    let committed = TxnId { epoch: EPOCH, seq: 7 };
    let other = TxnId { epoch: EPOCH, seq: 8 };
    let waiting = |name: &str, txn| Reply::Error(CoreError::OutcomeBeingCollected { txn, waiting: p(name) });
    assert_eq!(h.status(at(1), other), waiting("a", other));
    let (req, fx) = h.commit(at(1), other);
    assert_eq!(fx, vec![error_fx(req, CoreError::OutcomeBeingCollected { txn: other, waiting: p("a") })]);
    let (req, fx) = h.abort(at(1), other, "");
    assert_eq!(fx, vec![error_fx(req, CoreError::OutcomeBeingCollected { txn: other, waiting: p("a") })]);
    // "a" cannot be reached yet: asked again later.
    let fx = h.step(at(2), Input::Collected { participant: p("a"), endpoint: ep("a"), result: Err("unreachable".into()) });
    assert_eq!(fx, vec![Fx::Timer(at(2 + RETRY_MAX), Timer::Collect(p("a")))]);
    assert_eq!(h.timer(at(2 + RETRY_MAX), Timer::Collect(p("a"))), vec![Fx::Collect(p("a"))]);
    // "a" reports one commit: recorded; once that is durable, released,
    // and only then are the markers deleted.
    let fx = h.step(at(3), Input::Collected { participant: p("a"), endpoint: ep("a"), result: Ok(vec![committed]) });
    assert_eq!(fx, vec![Fx::Persist { txn: committed, record: decision_record(&["a"], at(3), false), synced: true }]);
    assert_eq!(h.txn_status(at(3), committed).state, TxnState::Committed);
    assert_eq!(h.status(at(3), other), waiting("b", other));
    assert_eq!(h.durable(at(4), committed), vec![commit_to(committed, "a"), Fx::ClearMarkers(p("a"), vec![EPOCH])]);
    // "b" reports nothing: the rest of run 1 is presumed aborted again.
    let fx = h.step(at(5), Input::Collected { participant: p("b"), endpoint: ep("b"), result: Ok(vec![]) });
    assert_eq!(fx, vec![Fx::ClearMarkers(p("b"), vec![EPOCH])]);
    match h.status(at(6), other) {
        Reply::Status(s) => assert_eq!((s.state, s.presumed), (TxnState::Aborted, true)),
        r => panic!("{r:?}"),
    }
    // A late timer or answer changes nothing.
    assert_eq!(h.timer(at(7), Timer::Collect(p("a"))), vec![]);
    assert_eq!(h.step(at(8), Input::Collected { participant: p("b"), endpoint: ep("b"), result: Ok(vec![other]) }), vec![]);
}

#[test]
fn a_reported_commit_already_held_and_finished_is_released_again() {
    // The participant lost its release (a lazy write) in a machine crash and
    // reports the commit again: the coordinator, which holds it as finished,
    // releases it again instead of skipping it.
    let mut h = one_phase_core(EPOCH + 1);
    let txn = TxnId { epoch: EPOCH, seq: 3 };
    let _ = h.core.recover(T0, vec![(txn, decision_record(&["a"], T0, true))], None);
    let _ = h.core.recover_markers(vec![(EPOCH, p("a"))]);
    let fx = h.step(at(1), Input::Collected { participant: p("a"), endpoint: ep("a"), result: Ok(vec![txn]) });
    assert_eq!(fx, vec![commit_to(txn, "a"), Fx::ClearMarkers(p("a"), vec![EPOCH])]);
    let fx = h.delivered(at(2), txn, "a", Ok(()));
    assert_eq!(fx, vec![Fx::Persist { txn, record: decision_record(&["a"], at(2), true), synced: false }, forget_fx(at(2), txn)]);
}

#[test]
fn a_one_phase_commit_that_cannot_be_recorded_stays_unreleased_and_its_markers_stay() {
    let mut h = one_phase_core(EPOCH);
    let (txn, _) = h.active(&["a"]);
    let _ = h.commit(at(100), txn);
    let _ = h.step(at(105), Input::MarkerDurable { participant: p("a") });
    let _ = h.vote(at(110), txn, "a", Ok(Vote::Committed));
    // Nothing is released: the participant keeps the outcome until a later
    // run collects it.
    assert_eq!(h.step(at(120), Input::PersistFailed { txn, error: "disk full".into() }), vec![]);
    assert_eq!(h.txn_status(at(121), txn).state, TxnState::Committed);
    assert_eq!(h.core.unfinished(), 1);

    // Collected after a restart, a record that fails keeps the markers.
    let mut h = one_phase_core(EPOCH + 1);
    let _ = h.core.recover_markers(vec![(EPOCH, p("a"))]);
    let fx = h.step(at(1), Input::Collected { participant: p("a"), endpoint: ep("a"), result: Ok(vec![txn]) });
    assert_eq!(fx, vec![Fx::Persist { txn, record: decision_record(&["a"], at(1), false), synced: true }]);
    assert_eq!(h.step(at(2), Input::PersistFailed { txn, error: "disk full".into() }), vec![]);
}

#[test]
fn an_answered_one_phase_prepare_drops_its_payload() {
    let mut h = one_phase_core(EPOCH);
    let branches = vec![ExecBranch { participant: p("a"), endpoint: ep("a"), payload: vec![7; 64] }];
    let _ = h.step(T0, Input::Execute { req: 1, branches, timeout_ms: 0 });
    let txn = TxnId { epoch: EPOCH, seq: 1 };
    let _ = h.step(at(5), Input::MarkerDurable { participant: p("a") });
    assert!(format!("{:?}", h.core).contains("[7, 7, 7"), "held until answered, to ask again");
    let _ = h.vote(at(10), txn, "a", Ok(Vote::Committed));
    assert!(!format!("{:?}", h.core).contains("[7, 7, 7"), "the payload is still held after the answer");
}
