//! Property-based, state-machine tests of the two protocol cores against
//! small reference models.
//!
//! Each test generates a sequence of operations (a `Vec` of an operation
//! enum, shrunk by proptest when something fails) and plays it against the
//! pure core (`Core::step` / `Core::recover`) through a harness that plays
//! the rest of the world: callers, the network, the durable log and the
//! clock. After every step the harness checks the effects the core returned
//! against a reference model. A failure message names the rule of
//! docs/ARCHITECTURE.md ("Rules") it breaks and carries the whole trace
//! (operations, inputs fed, effects returned).
//!
//! # Coordinator (`coord`)
//!
//! World: three participants `p0..p2`; transactions are referred to by
//! index into the ids issued so far (one extra index names an id of a future
//! epoch, never issued). Operations: Begin, Enlist, Commit, Abort, Execute,
//! deliver a vote (YES / NO / READ_ONLY / transport error) for an
//! outstanding Prepare, deliver or fail an outstanding phase-two message,
//! make a pending synced decision write durable or fail it (the write may or
//! may not have landed), flush lazy writes, fire any pending timer, advance
//! the clock, Status, QueryDecision, List, replay an earlier input, and
//! CRASH.
//!
//! The decision log is a FIFO of submitted writes (the storage contract:
//! writes apply in submission order; a lazy write is durable by the next
//! synced one). `PersistDecision { synced: true }` is durable only when the
//! "durable" operation picks it, which also lands every write submitted
//! before it (and feeds `Durable` for each synced one, in order). The lazy
//! END rewrite and `ForgetDecision` (record deletion plus horizon, one lazy
//! batch) stay pending until a later synced write lands or a "flush lazy"
//! operation. A crash drops every pending write, every in-flight message,
//! timer and caller, and rebuilds the core with `Core::new(epoch + 1, ..)`
//! and `recover(now, durable records, durable horizon)`.
//!
//! The model keeps, per transaction and per coordinator run, the enlisted
//! participants, the votes delivered, the Prepares sent and whether Commit
//! or Abort was asked; and across runs, the first report of each outcome,
//! the acknowledgements of Commit messages and whether the record was
//! forgotten. Checked after every step:
//! - **Durability of the decision (rule 3)**: a caller is told COMMITTED, or
//!   Status / List / QueryDecision report commit, or a Commit message is
//!   sent, only while the COMMIT record is durable; the record is written
//!   once. The one exception is a transaction with no YES voter (no
//!   participant, or all READ_ONLY): nothing needs forcing, so it is
//!   reported committed at once and, in the same step right after the
//!   COMMITTED reply(ies), recorded lazily (an ended record naming nobody,
//!   written once), so that a later run still holds it as committed.
//! - **Validity (rule 2)**: a COMMIT record (or a commit with no YES voter) is made
//!   only by the run that began the transaction, after Commit was asked,
//!   when every participant enlisted in this run delivered YES or READ_ONLY
//!   in this run (votes from before a crash do not count: only a durable
//!   record survives); the record lists exactly the YES voters. Prepare goes
//!   only to enlisted participants, once, with the transaction's deadline and
//!   its Execute payload.
//! - **Agreement (rule 1) / decisions never change (rule 3)**: no transaction
//!   is reported both committed and aborted, by replies (Commit, Execute,
//!   Abort), Status, List, QueryDecision or phase-two messages, across
//!   crashes. QueryDecision for a transaction whose commit record is durable
//!   and held answers COMMIT (PENDING while the core only knows the write
//!   failed); ABORT for a committed transaction is accepted only after it was
//!   forgotten (docs: "a forgotten commit is never asked about").
//! - **No orphans (rule 4)**: a committed transaction is forgotten only after
//!   every YES voter acknowledged the Commit; the horizon only rises.
//! - **Idempotency (rule 5)**: every caller is answered at most once, with a
//!   reply of the right kind; replayed inputs are checked like fresh ones.
//! - Ids never repeat across crashes (epochs rise), Begin/Execute allocate
//!   the next id with `deadline = now + timeout`; Enlist is accepted exactly
//!   while the transaction is open (this run, before Commit/Abort, before the
//!   deadline); ids never issued are `NotFound`.
//!
//! Found by this test and fixed (`regression_empty_commit_*`,
//! `regression_read_only_commit_*`): a transaction committed with no YES
//! voter was not logged at all, so after a coordinator restart Status, a
//! retried Commit and Abort reported it ABORTED (presumed abort) although the
//! caller was told COMMITTED. It now has its lazy record. What remains is
//! the documented price of that record being lazy: a crash that loses it
//! (power-loss semantics, before any later synced write or flush made it
//! durable) leaves a later run presuming the transaction aborted. The main
//! property (`Mode::Documented`) tolerates exactly that case and counts it
//! (see `lost_lazy_record_is_the_only_tolerance`);
//! `coordinator_decisions_never_change_strict` (`Mode::Strict`) allows no
//! exception, with crashes that keep every write handed to the log (a
//! restart, or a process crash after the log's writer issued them).
//!
//! # Participant (`part`)
//!
//! World: one participant; six transaction ids, two per coordinator epoch
//! 1..=3, each with a fixed deadline. The harness plays a *consistent*
//! coordinator: it decides each transaction at most once, commits only when
//! the first answer it got to a Prepare was YES or READ_ONLY and only in the
//! transaction's own run, presumes abort for undecided transactions of
//! earlier runs when it restarts, and sends Prepare with the transaction's
//! epoch and deadline (as `SendPrepare` does). Operations: Join, answer an
//! outstanding Enlist (ok or refused), Prepare (with or without payload),
//! resource vote (YES / NO / READ_ONLY / error) for an outstanding resource
//! prepare, PersistPrepared durable or failed (landed or not), Commit and
//! Abort (with the transaction's or the current coordinator epoch),
//! Applied / ApplyFailed for an outstanding Apply, answer an outstanding
//! QueryDecision (COMMIT / ABORT / PENDING / error, bent to the
//! coordinator's decision), fire a timer, advance the clock, flush lazy
//! writes, coordinator restart, replay an earlier input, and CRASH.
//!
//! The branch log: `PersistPrepared` is durable only when its "durable"
//! operation is applied (a failed one may have landed). An `Apply` with a
//! record writes it when "applied": a synced (commit) one is durable at
//! once, a lazy (abort) one is only visible, and durable with the next
//! synced write or "flush lazy"; `Forget` is a lazy delete. `ApplyFailed` is
//! taken to mean that nothing was written. A crash loses every write that is
//! not durable and rebuilds the core with `recover(now, durable records)`.
//!
//! Checked after every step:
//! - **Persist before vote**: YES is replied only while the branch's
//!   PREPARED (or, for a late duplicate, COMMITTED) record is durable.
//! - **Validity (rule 2)**: a commit is applied only to a branch whose
//!   durable record is PREPARED and that was told Commit (Commit, or
//!   QueryDecision answered COMMIT); the commit record is synced.
//! - **Agreement (rule 1)**: never both a commit and an abort applied for one
//!   transaction (an abort whose lazy record a crash lost is undone: the
//!   branch is PREPARED again); each commit applied at most once.
//! - **A prepared branch never decides alone (rule 4)**: a branch that voted
//!   YES aborts only when told Abort; QueryDecision is only asked by a branch
//!   with a durable PREPARED record. ("Prepared" means "voted YES": a branch
//!   whose PREPARED write failed may have the record on disk, never voted
//!   YES, and aborts on its own by design.)
//! - **No hanging (rule 6)**: after an Abort for a transaction the core did
//!   not hold (`Core::phase` is `None`), every later Prepare is answered NO
//!   and asks the resource nothing, until the tombstone is forgotten
//!   (`Effect::Forget`) or a crash loses it (its lazy record was not yet
//!   durable). A first Prepare past the deadline is refused the same way.
//! - **Stale messages (rule 7)**: a first Prepare for a transaction whose
//!   epoch is below an epoch seen (in a first Prepare, a Commit or an Abort
//!   since the start, or in a durable record) is refused.
//! - **Idempotency (rule 5)**: callers are answered at most once; Commit is
//!   acknowledged only after a commit was applied (or the branch was
//!   read-only); a Commit to a branch with a durable PREPARED record is never
//!   refused, nor an Abort the consistent coordinator sends as "already
//!   committed". A branch that answered READ_ONLY (since the core's last
//!   crash: it keeps no record) never asks the resource to prepare again: a
//!   duplicate Prepare is answered READ_ONLY while the core remembers the
//!   released branch, and NO only once it is forgotten, past its deadline.
//! - **Garbage collection**: a Forget timer drops a finished branch with one
//!   `Effect::Forget` for a Committed or Aborted branch (which has a record
//!   to delete), none for a released READ_ONLY branch (which has none), and
//!   does nothing to any other phase.
//! - **Apply retries**: at most one Apply is in flight per branch; a
//!   `RetryApply` timer applies again only once after each `ApplyFailed`,
//!   and a stale or replayed one does nothing.
//!
//! Found by this test and fixed (`regression_duplicate_prepare_*`,
//! `regression_replayed_retry_apply_timer_*`): a READ_ONLY branch was
//! released and forgotten at once, so a duplicate Prepare before the
//! deadline asked the resource to prepare again; a replayed `RetryApply`
//! timer issued a second Apply while one was in flight, so a commit landed
//! twice.
//!
//! Replays ("duplicate a previous input", with a fresh request id) follow
//! what each core claims. The coordinator core claims that every input may
//! arrive twice or late, so every request, vote, phase-two result and timer
//! is replayed (not `Durable` / `PersistFailed`: the log reports a write
//! once, and a replay would make the harness lie about durability). The
//! participant core claims it for incoming requests and checks every timer
//! against the state when it fires: Join, Prepare, Commit, Abort and fired
//! timers are replayed; results of its own effects (`Enlisted`, `Decided`,
//! `ResourceVoted`, `Durable`, `Applied`...) are produced exactly once by
//! its driver.
//!
//! # Running
//!
//! 256 cases per property (CI tier), `max_shrink_iters` 10 000;
//! `TWOPC_PROPTEST_CASES=<n>` for a deeper run. Failures persist in
//! `tests/tests/proptest_cores.proptest-regressions`; minimal failing cases
//! are also kept below as explicit `#[test]` functions.

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use twopc_proto::UnixMillis;

/// A fixed "now" both harnesses start from.
const T0: UnixMillis = UnixMillis(1_700_000_000_000);

/// Returns `Err(message)` from the enclosing function when `cond` is false.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

/// Cases per property: 256 for CI, or `TWOPC_PROPTEST_CASES`.
fn proptest_config() -> ProptestConfig {
    let cases = std::env::var("TWOPC_PROPTEST_CASES").ok().and_then(|v| v.trim().parse::<u32>().ok()).unwrap_or(256);
    ProptestConfig {
        cases,
        max_shrink_iters: 10_000,
        // Failing seeds go to tests/tests/proptest_cores.proptest-regressions.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    }
}

/// A vote (or a failure to get one) the harness delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VoteKind {
    Yes,
    No,
    ReadOnly,
    Err,
}

fn vote_kind() -> impl Strategy<Value = VoteKind> {
    prop_oneof![4 => Just(VoteKind::Yes), 1 => Just(VoteKind::No), 2 => Just(VoteKind::ReadOnly), 1 => Just(VoteKind::Err)]
}

/// The text of a caught panic.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else {
        "<non-text panic>".to_owned()
    }
}

/// Milliseconds since [`T0`], for traces.
fn rel(t: UnixMillis) -> i128 {
    i128::from(t.0) - i128::from(T0.0)
}

// ===========================================================================
// Coordinator
// ===========================================================================

mod coord {
    use std::collections::{BTreeMap, BTreeSet};
    use std::panic::{AssertUnwindSafe, catch_unwind};

    use proptest::prelude::*;
    use twopc_coordinator::core::{Core, CoreConfig, CoreError, Effect, ExecBranch, Input, PhaseTwo, Reply, ReqId, Timer, TxnState};
    use twopc_proto::logpb::DecisionRecord;
    use twopc_proto::{Decision, Outcome, ParticipantName, TxnId, UnixMillis, Vote};

    use super::{T0, VoteKind, panic_text, rel, vote_kind};

    const NAMES: [&str; 3] = ["p0", "p1", "p2"];
    const DEFAULT_TIMEOUT: u64 = 4_000;
    const MAX_TIMEOUT: u64 = 20_000;
    /// Begin/Execute timeouts: default, short, long, too long.
    const TIMEOUTS: [u64; 4] = [0, 1_000, 8_000, 25_000];
    const RETENTION: u64 = 30_000;

    pub fn config() -> CoreConfig {
        CoreConfig {
            default_timeout_ms: DEFAULT_TIMEOUT,
            max_timeout_ms: MAX_TIMEOUT,
            prepare_timeout_ms: 1_500,
            retry_base_ms: 50,
            retry_max_ms: 400,
            abort_delivery_attempts: 3,
            retention_ms: RETENTION,
            seed: 42,
            // The reference model is of two-phase commit; one phase is
            // checked by the model check and the simulation.
            one_phase: false,
        }
    }

    fn pname(i: usize) -> ParticipantName {
        ParticipantName::new(NAMES[i % NAMES.len()]).expect("test participant names are valid")
    }

    fn endpoint(name: &str) -> String {
        format!("http://{name}.test:50051")
    }

    /// One generated operation. Indices are taken modulo the number of
    /// candidates; an operation with no candidate does nothing.
    #[derive(Debug, Clone)]
    pub enum Op {
        Begin { timeout: usize },
        Enlist { k: usize, p: usize },
        Commit { k: usize },
        Abort { k: usize },
        Execute { mask: u8, timeout: usize },
        Vote { i: usize, vote: VoteKind },
        Deliver { i: usize, ok: bool },
        Durable { i: usize },
        WriteFailed { i: usize, landed: bool },
        FlushLazy,
        FireTimer { i: usize },
        Advance { ms: u64 },
        Status { k: usize },
        QueryDecision { k: usize },
        List { in_doubt_only: bool, limit: usize },
        Duplicate { i: usize },
        Crash,
    }

    pub fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0usize..4).prop_map(|timeout| Op::Begin { timeout }),
            6 => (0usize..6, 0usize..3).prop_map(|(k, p)| Op::Enlist { k, p }),
            4 => (0usize..6).prop_map(|k| Op::Commit { k }),
            1 => (0usize..6).prop_map(|k| Op::Abort { k }),
            2 => (1u8..8, 0usize..4).prop_map(|(mask, timeout)| Op::Execute { mask, timeout }),
            8 => (0usize..4, vote_kind()).prop_map(|(i, vote)| Op::Vote { i, vote }),
            6 => (0usize..4, prop::bool::weighted(0.7)).prop_map(|(i, ok)| Op::Deliver { i, ok }),
            5 => (0usize..3).prop_map(|i| Op::Durable { i }),
            1 => (0usize..3, any::<bool>()).prop_map(|(i, landed)| Op::WriteFailed { i, landed }),
            1 => Just(Op::FlushLazy),
            6 => prop_oneof![3 => Just(0usize), 1 => 0usize..4].prop_map(|i| Op::FireTimer { i }),
            2 => prop_oneof![Just(100u64), Just(1_000u64), Just(5_000u64)].prop_map(|ms| Op::Advance { ms }),
            2 => (0usize..6).prop_map(|k| Op::Status { k }),
            2 => (0usize..6).prop_map(|k| Op::QueryDecision { k }),
            1 => (any::<bool>(), prop_oneof![Just(1usize), Just(10usize)]).prop_map(|(in_doubt_only, limit)| Op::List { in_doubt_only, limit }),
            2 => (0usize..64).prop_map(|i| Op::Duplicate { i }),
            2 => Just(Op::Crash),
        ]
    }

    /// What a crash keeps, and so how strictly rule 3 is judged for
    /// commits with no YES voter (see the module docs).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Mode {
        /// A crash loses every write not yet durable (power loss). A commit
        /// with no YES voter whose lazy record a crash lost may be presumed
        /// aborted by a later run (documented: it changed nothing); nothing
        /// else is tolerated.
        Documented,
        /// A crash keeps every write handed to the log (a restart, or a
        /// process crash after the log's writer issued them); decisions
        /// never change, with no exception.
        Strict,
    }

    /// What the generated cases exercised, for the coverage test.
    #[derive(Debug, Default, Clone)]
    pub struct Stats {
        pub logged_commits: usize,
        /// Commits with no YES voter (recorded lazily).
        pub lazy_commits: usize,
        pub aborts_reported: usize,
        pub crashes: usize,
        pub recovered_records: usize,
        pub commit_messages_after_recovery: usize,
        pub forgets: usize,
        pub query_commit: usize,
        /// Reports of abort tolerated because a crash lost the lazy record
        /// of a commit with no YES voter (`Mode::Documented` only).
        pub lost_lazy_records: usize,
        pub failed_writes: usize,
    }

    #[derive(Debug, Clone)]
    enum Write {
        Decision { txn: TxnId, record: DecisionRecord, synced: bool },
        Forget { txn: TxnId, horizon: TxnId },
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum EnlistExpect {
        Ok(UnixMillis),
        Closed,
        NotFound,
    }

    #[derive(Debug, Clone)]
    enum Req {
        Begin { timeout_ms: u64 },
        Enlist { txn: TxnId, participant: String, expect: EnlistExpect },
        Commit { txn: TxnId },
        Abort { txn: TxnId },
        Execute { txn: Option<TxnId>, timeout_ms: u64 },
        Status { txn: TxnId },
        Query { txn: TxnId },
        List { limit: usize },
    }

    /// What this coordinator run did with a transaction it began.
    #[derive(Debug, Default)]
    struct RunTxn {
        deadline: UnixMillis,
        enlisted: BTreeSet<String>,
        payloads: BTreeMap<String, Vec<u8>>,
        commit_requested: bool,
        abort_requested: bool,
        /// First vote delivered per participant, in this run.
        votes: BTreeMap<String, VoteKind>,
        prepared_to: BTreeSet<String>,
        persisted: bool,
    }

    /// What the world knows about a transaction, across runs.
    #[derive(Debug, Default)]
    struct TxnHist {
        committed: Option<String>,
        aborted: Option<String>,
        /// A synced COMMIT record was handed to the log.
        logged: bool,
        /// Committed with no YES voter (so recorded only lazily), by this
        /// epoch's run.
        lazy_commit_epoch: Option<u64>,
        /// Its lazy record was handed to the log.
        lazy_written: bool,
        /// A crash lost its lazy record before it became durable.
        lazy_lost: bool,
        forgotten: bool,
        forgotten_this_run: bool,
        /// Participants that acknowledged a Commit message.
        acked: BTreeSet<String>,
    }

    struct Harness {
        mode: Mode,
        core: Core,
        epoch: u64,
        now: UnixMillis,
        next_req: ReqId,
        // The decision log.
        durable: BTreeMap<TxnId, DecisionRecord>,
        durable_horizon: Option<TxnId>,
        queue: Vec<Write>,
        // In flight, this run only.
        prepares: Vec<(TxnId, ParticipantName)>,
        deliveries: Vec<(TxnId, ParticipantName, bool)>,
        timers: Vec<(UnixMillis, Timer)>,
        reqs: BTreeMap<ReqId, Req>,
        answered: BTreeSet<ReqId>,
        /// Inputs from the network or timers, for replays.
        history: Vec<Input>,
        // Model.
        next_seq: u64,
        issued: BTreeSet<TxnId>,
        run: BTreeMap<TxnId, RunTxn>,
        hist: BTreeMap<TxnId, TxnHist>,
        /// The horizon the core knows: durable at recovery, raised by
        /// ForgetDecision.
        horizon: Option<TxnId>,
        /// COMMIT records this run knows durable (Durable fed, or recovered).
        known_durable: BTreeSet<TxnId>,
        /// Commits with no YES voter reported in the current step, whose
        /// lazy record must follow in the same step.
        awaiting_lazy: BTreeSet<TxnId>,
        trace: Vec<String>,
        stats: Stats,
    }

    /// Plays `ops` and checks every step; the error carries the trace.
    pub fn run(ops: &[Op], mode: Mode) -> Result<Stats, String> {
        let mut h = Harness::new(mode);
        for (n, op) in ops.iter().enumerate() {
            h.trace.push(format!("#{n} {op:?}   (now T0+{}, epoch {})", rel(h.now), h.epoch));
            if let Err(e) = h.apply(op) {
                return Err(format!("{e}\n--- trace: operations, inputs fed (<-) and effects (->) ---\n{}", h.trace.join("\n")));
            }
        }
        Ok(h.stats)
    }

    impl Harness {
        fn new(mode: Mode) -> Self {
            Harness {
                mode,
                core: Core::new(1, config()),
                epoch: 1,
                now: T0,
                next_req: 0,
                durable: BTreeMap::new(),
                durable_horizon: None,
                queue: Vec::new(),
                prepares: Vec::new(),
                deliveries: Vec::new(),
                timers: Vec::new(),
                reqs: BTreeMap::new(),
                answered: BTreeSet::new(),
                history: Vec::new(),
                next_seq: 1,
                issued: BTreeSet::new(),
                run: BTreeMap::new(),
                hist: BTreeMap::new(),
                horizon: None,
                known_durable: BTreeSet::new(),
                awaiting_lazy: BTreeSet::new(),
                trace: Vec::new(),
                stats: Stats::default(),
            }
        }

        fn req(&mut self) -> ReqId {
            self.next_req += 1;
            self.next_req
        }

        /// Transaction `k`: an issued id, or (one slot past them) an id of a
        /// future epoch that is never issued.
        fn pick(&self, k: usize) -> TxnId {
            let ids: Vec<TxnId> = self.issued.iter().copied().collect();
            match ids.get(k % (ids.len() + 1)) {
                Some(t) => *t,
                None => TxnId { epoch: self.epoch + 1_000, seq: 1 },
            }
        }

        fn apply(&mut self, op: &Op) -> Result<(), String> {
            match *op {
                Op::Begin { timeout } => {
                    let req = self.req();
                    self.feed(Input::Begin { req, timeout_ms: TIMEOUTS[timeout % TIMEOUTS.len()] })
                }
                Op::Enlist { k, p } => {
                    let txn = self.pick(k);
                    let req = self.req();
                    let participant = pname(p);
                    let endpoint = endpoint(participant.as_str());
                    self.feed(Input::Enlist { req, txn, participant, endpoint, incarnation: 0 })
                }
                Op::Commit { k } => {
                    let txn = self.pick(k);
                    let req = self.req();
                    self.feed(Input::Commit { req, txn })
                }
                Op::Abort { k } => {
                    let txn = self.pick(k);
                    let req = self.req();
                    self.feed(Input::Abort { req, txn, detail: String::new() })
                }
                Op::Execute { mask, timeout } => {
                    let req = self.req();
                    let branches = (0..NAMES.len())
                        .filter(|i| mask & (1 << i) != 0)
                        .map(|i| {
                            let participant = pname(i);
                            let endpoint = endpoint(participant.as_str());
                            let payload = format!("work for {participant}").into_bytes();
                            ExecBranch { participant, endpoint, payload }
                        })
                        .collect();
                    self.feed(Input::Execute { req, branches, timeout_ms: TIMEOUTS[timeout % TIMEOUTS.len()] })
                }
                Op::Vote { i, vote } => {
                    if self.prepares.is_empty() {
                        return Ok(());
                    }
                    let (txn, participant) = self.prepares.remove(i % self.prepares.len());
                    let vote = match vote {
                        VoteKind::Yes => Ok(Vote::Yes),
                        VoteKind::No => Ok(Vote::No("insufficient funds".to_owned())),
                        VoteKind::ReadOnly => Ok(Vote::ReadOnly),
                        VoteKind::Err => Err("connection refused".to_owned()),
                    };
                    self.feed(Input::Voted { txn, participant, vote })
                }
                Op::Deliver { i, ok } => {
                    if self.deliveries.is_empty() {
                        return Ok(());
                    }
                    let (txn, participant, commit) = self.deliveries.remove(i % self.deliveries.len());
                    if ok && commit {
                        self.hist.entry(txn).or_default().acked.insert(participant.as_str().to_owned());
                    }
                    let result = if ok { Ok(()) } else { Err("unavailable".to_owned()) };
                    self.feed(Input::Delivered { txn, participant, result })
                }
                Op::Durable { i } => self.land(i, None),
                Op::WriteFailed { i, landed } => self.land(i, Some(landed)),
                Op::FlushLazy => {
                    let n = self.queue.iter().take_while(|w| !matches!(w, Write::Decision { synced: true, .. })).count();
                    let lazy: Vec<Write> = self.queue.drain(..n).collect();
                    self.trace.push(format!("    flushed {} lazy write(s)", lazy.len()));
                    for w in lazy {
                        self.write(w);
                    }
                    Ok(())
                }
                Op::FireTimer { i } => {
                    if self.timers.is_empty() {
                        return Ok(());
                    }
                    let (at, timer) = self.timers.remove(i % self.timers.len());
                    self.now = self.now.max(at);
                    self.feed(Input::Timer(timer))
                }
                Op::Advance { ms } => {
                    self.now = self.now.plus(ms);
                    Ok(())
                }
                Op::Status { k } => {
                    let txn = self.pick(k);
                    let req = self.req();
                    self.feed(Input::Status { req, txn })
                }
                Op::QueryDecision { k } => {
                    let txn = self.pick(k);
                    let req = self.req();
                    self.feed(Input::QueryDecision { req, txn })
                }
                Op::List { in_doubt_only, limit } => {
                    let req = self.req();
                    self.feed(Input::List { req, in_doubt_only, limit, filter: Default::default() })
                }
                Op::Duplicate { i } => {
                    if self.history.is_empty() {
                        return Ok(());
                    }
                    let mut input = self.history[i % self.history.len()].clone();
                    let fresh = self.req();
                    match &mut input {
                        Input::Begin { req, .. }
                        | Input::Enlist { req, .. }
                        | Input::Commit { req, .. }
                        | Input::Abort { req, .. }
                        | Input::Execute { req, .. }
                        | Input::Status { req, .. }
                        | Input::List { req, .. }
                        | Input::QueryDecision { req, .. } => *req = fresh,
                        _ => {}
                    }
                    self.feed(input)
                }
                Op::Crash => self.crash(),
            }
        }

        /// Lands pending synced write `i` (and every write before it) or
        /// fails it; `failed = Some(landed)`.
        fn land(&mut self, i: usize, failed: Option<bool>) -> Result<(), String> {
            let synced: Vec<usize> =
                self.queue.iter().enumerate().filter(|(_, w)| matches!(w, Write::Decision { synced: true, .. })).map(|(n, _)| n).collect();
            if synced.is_empty() {
                return Ok(());
            }
            let pos = synced[i % synced.len()];
            let target = match &self.queue[pos] {
                Write::Decision { txn, .. } | Write::Forget { txn, .. } => *txn,
            };
            if failed.is_some() {
                self.stats.failed_writes += 1;
            }
            if failed == Some(false) {
                self.queue.remove(pos);
                self.trace.push(format!("    decision write of {target} failed and did not land"));
                return self.feed(Input::PersistFailed { txn: target, error: "disk full".to_owned() });
            }
            let prefix: Vec<Write> = self.queue.drain(..=pos).collect();
            let mut earlier = Vec::new();
            for (n, w) in prefix.into_iter().enumerate() {
                if n != pos
                    && let Write::Decision { txn, synced: true, .. } = &w
                {
                    earlier.push(*txn);
                }
                self.write(w);
            }
            self.trace.push(format!("    decision write of {target} landed (with {} earlier write(s))", pos));
            for txn in earlier {
                self.feed(Input::Durable { txn })?;
            }
            match failed {
                None => self.feed(Input::Durable { txn: target }),
                Some(_) => self.feed(Input::PersistFailed { txn: target, error: "fsync reported an error (the write landed)".to_owned() }),
            }
        }

        /// Applies one write to the durable log.
        fn write(&mut self, w: Write) {
            match w {
                Write::Decision { txn, record, .. } => {
                    self.durable.insert(txn, record);
                }
                Write::Forget { txn, horizon } => {
                    self.durable.remove(&txn);
                    self.durable_horizon = Some(horizon);
                }
            }
        }

        fn crash(&mut self) -> Result<(), String> {
            self.stats.crashes += 1;
            let pending = std::mem::take(&mut self.queue);
            match self.mode {
                // Everything handed to the log survives, in order.
                Mode::Strict => {
                    self.trace.push(format!("    the crash keeps {} pending write(s)", pending.len()));
                    for w in pending {
                        self.write(w);
                    }
                }
                // Power loss: every write not yet durable is lost, lazy
                // records of commits with no YES voter among them.
                Mode::Documented => {
                    for w in &pending {
                        if let Write::Decision { txn, synced: false, .. } = w
                            && !self.durable.contains_key(txn)
                            && let Some(h) = self.hist.get_mut(txn)
                            && h.lazy_commit_epoch.is_some()
                        {
                            h.lazy_lost = true;
                            self.trace.push(format!("    the crash loses the lazy record of {txn}"));
                        }
                    }
                }
            }
            self.prepares.clear();
            self.deliveries.clear();
            self.timers.clear();
            self.reqs.clear();
            self.run.clear();
            for h in self.hist.values_mut() {
                h.forgotten_this_run = false;
            }
            self.epoch += 1;
            self.next_seq = 1;
            self.horizon = self.durable_horizon;
            self.known_durable = self.durable.keys().copied().collect();
            self.stats.recovered_records += self.durable.len();
            let records: Vec<(TxnId, DecisionRecord)> = self.durable.iter().map(|(t, r)| (*t, r.clone())).collect();
            self.trace.push(format!(
                "    CRASH: new core epoch {}, recover({} record(s): {:?}, horizon {:?})",
                self.epoch,
                records.len(),
                records.iter().map(|(t, r)| (t.to_string(), r.ended)).collect::<Vec<_>>(),
                self.durable_horizon.map(|h| h.to_string())
            ));
            self.core = Core::new(self.epoch, config());
            let (now, horizon) = (self.now, self.durable_horizon);
            let core = &mut self.core;
            let fx = catch_unwind(AssertUnwindSafe(|| core.recover(now, records, horizon)))
                .map_err(|p| format!("the coordinator core panicked in recover: {}", panic_text(p.as_ref())))?;
            self.post(None, fx)
        }

        fn feed(&mut self, input: Input) -> Result<(), String> {
            self.trace.push(format!("  <- {input:?}"));
            self.pre(&input);
            if !matches!(input, Input::Durable { .. } | Input::PersistFailed { .. }) {
                self.history.push(input.clone());
            }
            let now = self.now;
            let core = &mut self.core;
            let step_input = input.clone();
            let fx = catch_unwind(AssertUnwindSafe(|| core.step(now, step_input)))
                .map_err(|p| format!("the coordinator core panicked: {}", panic_text(p.as_ref())))?;
            self.post(Some(&input), fx)
        }

        /// Model bookkeeping before the core sees `input`.
        fn pre(&mut self, input: &Input) {
            match input {
                Input::Begin { req, timeout_ms } => {
                    self.reqs.insert(*req, Req::Begin { timeout_ms: *timeout_ms });
                }
                Input::Enlist { req, txn, participant, .. } => {
                    let expect = if !self.issued.contains(txn) {
                        EnlistExpect::NotFound
                    } else {
                        match self.run.get(txn) {
                            Some(r) if !r.commit_requested && !r.abort_requested && self.now < r.deadline => EnlistExpect::Ok(r.deadline),
                            _ => EnlistExpect::Closed,
                        }
                    };
                    self.reqs.insert(*req, Req::Enlist { txn: *txn, participant: participant.as_str().to_owned(), expect });
                }
                Input::Commit { req, txn } => {
                    self.reqs.insert(*req, Req::Commit { txn: *txn });
                    if let Some(r) = self.run.get_mut(txn) {
                        r.commit_requested = true;
                    }
                }
                Input::Abort { req, txn, .. } | Input::Shutdown { req, txn } => {
                    self.reqs.insert(*req, Req::Abort { txn: *txn });
                    if let Some(r) = self.run.get_mut(txn) {
                        r.abort_requested = true;
                    }
                }
                Input::Execute { req, timeout_ms, .. } => {
                    self.reqs.insert(*req, Req::Execute { txn: None, timeout_ms: *timeout_ms });
                }
                Input::Status { req, txn } => {
                    self.reqs.insert(*req, Req::Status { txn: *txn });
                }
                Input::QueryDecision { req, txn } => {
                    self.reqs.insert(*req, Req::Query { txn: *txn });
                }
                Input::List { req, limit, .. } => {
                    self.reqs.insert(*req, Req::List { limit: *limit });
                }
                Input::Voted { txn, participant, vote } => {
                    if let Some(r) = self.run.get_mut(txn) {
                        let kind = match vote {
                            Ok(Vote::Yes) => VoteKind::Yes,
                            Ok(Vote::No(_)) => VoteKind::No,
                            Ok(Vote::ReadOnly) => VoteKind::ReadOnly,
                            Ok(Vote::Committed) | Err(_) => VoteKind::Err,
                        };
                        r.votes.entry(participant.as_str().to_owned()).or_insert(kind);
                    }
                }
                Input::Durable { txn } => {
                    self.known_durable.insert(*txn);
                }
                Input::Delivered { .. }
                | Input::PersistFailed { .. }
                | Input::Timer(_)
                | Input::MarkerDurable { .. }
                | Input::MarkerFailed { .. }
                | Input::Collected { .. } => {}
            }
        }

        fn effective_timeout(timeout_ms: u64) -> u64 {
            if timeout_ms == 0 { DEFAULT_TIMEOUT } else { timeout_ms }
        }

        /// Checks the effects of one step (or of recovery, `input = None`).
        fn post(&mut self, input: Option<&Input>, effects: Vec<Effect>) -> Result<(), String> {
            for e in &effects {
                self.trace.push(format!("    -> {}", fx_text(e)));
            }
            // Execute: learn the new id from its deadline timer first.
            if let Some(Input::Execute { req, branches, timeout_ms }) = input {
                let created = effects.iter().find_map(|e| match e {
                    Effect::SetTimer { at, timer: Timer::Deadline(t) } if !self.issued.contains(t) => Some((*t, *at)),
                    _ => None,
                });
                if let Some((txn, deadline)) = created {
                    self.new_id(txn)?;
                    let timeout = Self::effective_timeout(*timeout_ms);
                    ensure!(timeout <= MAX_TIMEOUT, "Execute with timeout {timeout} ms > max {MAX_TIMEOUT} created {txn}");
                    ensure!(deadline == self.now.plus(timeout), "Execute {txn}: deadline T0+{} is not now + {timeout} ms", rel(deadline));
                    let mut r = RunTxn { deadline, commit_requested: true, ..RunTxn::default() };
                    for b in branches {
                        r.enlisted.insert(b.participant.as_str().to_owned());
                        r.payloads.insert(b.participant.as_str().to_owned(), b.payload.clone());
                    }
                    self.run.insert(txn, r);
                    self.reqs.insert(*req, Req::Execute { txn: Some(txn), timeout_ms: *timeout_ms });
                }
            }
            for e in effects {
                match e {
                    Effect::Reply { req, reply } => self.on_reply(req, reply)?,
                    Effect::PersistDecision { txn, record, synced: true } => {
                        let yes: BTreeSet<String> = record.participants.iter().map(|p| p.name.clone()).collect();
                        for p in &record.participants {
                            ensure!(p.endpoint == endpoint(&p.name), "COMMIT record of {txn}: endpoint {:?} of {}", p.endpoint, p.name);
                        }
                        ensure!(!yes.is_empty(), "COMMIT record of {txn} names no participant (nothing needs logging)");
                        self.check_validity(txn, &yes)?;
                        ensure!(
                            !self.durable.contains_key(&txn) && !self.hist.get(&txn).is_some_and(|h| h.logged),
                            "Rule 3: the COMMIT record of {txn} is written a second time"
                        );
                        if let Some(a) = self.hist.get(&txn).and_then(|h| h.aborted.clone()) {
                            return Err(format!(
                                "Rule 3 (a decision never changes): {txn} decided commit after it was reported aborted ({a})"
                            ));
                        }
                        ensure!(!record.ended, "the synced COMMIT record of {txn} is already ended");
                        if let Some(r) = self.run.get_mut(&txn) {
                            r.persisted = true;
                        }
                        self.hist.entry(txn).or_default().logged = true;
                        self.stats.logged_commits += 1;
                        self.queue.push(Write::Decision { txn, record, synced: true });
                    }
                    Effect::PersistDecision { txn, record, synced: false } if self.awaiting_lazy.remove(&txn) => {
                        // The record of a commit with no YES voter, right
                        // after its COMMITTED report.
                        ensure!(
                            record.ended && record.participants.is_empty() && record.decided_unix_ms == self.now.0,
                            "the lazy record of {txn}, committed with no YES voter, must be ended, name nobody and be decided now: {record:?}"
                        );
                        let h = self.hist.entry(txn).or_default();
                        ensure!(!h.lazy_written && !h.logged, "Rule 3: the record of {txn}, committed with no YES voter, is written twice");
                        h.lazy_written = true;
                        self.queue.push(Write::Decision { txn, record, synced: false });
                    }
                    Effect::PersistDecision { txn, record, synced: false } => {
                        ensure!(record.ended, "lazy decision write of {txn} that is not an END record: {record:?}");
                        let names: BTreeSet<&str> = record.participants.iter().map(|p| p.name.as_str()).collect();
                        let Some(d) = self.durable.get(&txn) else {
                            return Err(format!("END record of {txn} written without a durable COMMIT record"));
                        };
                        let durable_names: BTreeSet<&str> = d.participants.iter().map(|p| p.name.as_str()).collect();
                        ensure!(names == durable_names, "END record of {txn} names {names:?}, the COMMIT record {durable_names:?}");
                        let h = self.hist.entry(txn).or_default();
                        for n in &names {
                            ensure!(h.acked.contains(*n), "Rule 4: END record of {txn} written before {n} acknowledged the Commit");
                        }
                        self.queue.push(Write::Decision { txn, record, synced: false });
                    }
                    Effect::ForgetDecision { txn, horizon } => {
                        ensure!(horizon >= txn, "ForgetDecision of {txn} with a lower horizon {horizon}");
                        ensure!(
                            self.horizon.is_none_or(|h| horizon >= h),
                            "the garbage-collection horizon went down: {:?} -> {horizon}",
                            self.horizon.map(|h| h.to_string())
                        );
                        self.horizon = Some(horizon);
                        let recorded = self.durable.get(&txn).cloned();
                        let h = self.hist.entry(txn).or_default();
                        ensure!(h.committed.is_some(), "ForgetDecision of {txn}, which was never reported committed");
                        if let Some(d) = recorded {
                            for p in &d.participants {
                                ensure!(
                                    h.acked.contains(&p.name),
                                    "Rule 4 (no orphans): {txn} forgotten before {} acknowledged the Commit",
                                    p.name
                                );
                            }
                        }
                        h.forgotten = true;
                        h.forgotten_this_run = true;
                        self.stats.forgets += 1;
                        self.queue.push(Write::Forget { txn, horizon });
                    }
                    Effect::SendPrepare { txn, participant, endpoint: ep, payload, deadline, one_phase } => {
                        ensure!(!one_phase, "a one-phase Prepare of {txn} with one-phase commit switched off");
                        let name = participant.as_str().to_owned();
                        ensure!(txn.epoch == self.epoch, "Prepare of {txn} sent by the epoch-{} run", self.epoch);
                        let Some(r) = self.run.get_mut(&txn) else {
                            return Err(format!("Prepare of {txn} to {name}: this run never began it"));
                        };
                        ensure!(r.commit_requested, "Prepare of {txn} to {name} before Commit was asked");
                        ensure!(r.enlisted.contains(&name), "Prepare of {txn} to {name}, which is not enlisted");
                        ensure!(r.prepared_to.insert(name.clone()), "Prepare of {txn} sent to {name} twice");
                        ensure!(deadline == r.deadline, "Prepare of {txn}: deadline T0+{} is not the transaction's", rel(deadline));
                        ensure!(ep == endpoint(&name), "Prepare of {txn} to {name} at {ep}");
                        ensure!(payload == r.payloads.get(&name).cloned(), "Prepare of {txn} to {name} with the wrong payload {payload:?}");
                        self.prepares.push((txn, participant));
                    }
                    Effect::SendDecision { txn, participant, endpoint: ep, decision } => {
                        let name = participant.as_str().to_owned();
                        ensure!(ep == endpoint(&name), "phase two of {txn} to {name} at {ep}");
                        let commit = matches!(decision, PhaseTwo::Commit(_));
                        if commit {
                            let Some(d) = self.durable.get(&txn) else {
                                return Err(format!(
                                    "Persist before send (rule 3): Commit of {txn} sent to {name} but no COMMIT record is durable"
                                ));
                            };
                            ensure!(
                                d.participants.iter().any(|p| p.name == name),
                                "Commit of {txn} sent to {name}, which the COMMIT record does not name"
                            );
                            if txn.epoch < self.epoch {
                                self.stats.commit_messages_after_recovery += 1;
                            }
                            self.told_commit(txn, format!("Commit message to {name}"))?;
                        } else {
                            let enlisted = self.run.get(&txn).is_some_and(|r| r.enlisted.contains(&name));
                            ensure!(enlisted, "Abort of {txn} sent to {name}, which this run did not enlist");
                            self.told_abort(txn, format!("Abort message to {name}"), false)?;
                        }
                        self.deliveries.push((txn, participant, commit));
                    }
                    Effect::SetTimer { at, timer } => {
                        let pos = self.timers.partition_point(|(t, _)| *t <= at);
                        self.timers.insert(pos, (at, timer));
                    }
                    e @ (Effect::PersistMarker { .. } | Effect::ClearMarkers { .. } | Effect::Collect { .. }) => {
                        return Err(format!("{e:?} with one-phase commit switched off"));
                    }
                }
            }
            if let Some(txn) = self.awaiting_lazy.pop_first() {
                return Err(format!(
                    "Rule 3: {txn} was reported committed with no YES voter, but no lazy record followed in the same step (a restart would presume it aborted)"
                ));
            }
            Ok(())
        }

        fn new_id(&mut self, txn: TxnId) -> Result<(), String> {
            ensure!(!self.issued.contains(&txn), "transaction id {txn} issued twice");
            ensure!(txn.epoch == self.epoch, "id {txn} issued by the epoch-{} run", self.epoch);
            let expected = TxnId { epoch: self.epoch, seq: self.next_seq };
            ensure!(txn == expected, "issued {txn}, expected the next id {expected}");
            self.issued.insert(txn);
            self.next_seq += 1;
            Ok(())
        }

        /// Validity (rule 2) of a commit decision for `txn` with YES voters
        /// `yes`.
        fn check_validity(&self, txn: TxnId, yes: &BTreeSet<String>) -> Result<(), String> {
            ensure!(
                txn.epoch == self.epoch,
                "Validity (rule 2): {txn} decided commit by the epoch-{} run; only the run that began it can have its votes",
                self.epoch
            );
            let Some(r) = self.run.get(&txn) else {
                return Err(format!("Validity (rule 2): {txn} decided commit but this run never began it"));
            };
            ensure!(r.commit_requested, "Validity (rule 2): {txn} decided commit but nobody asked to commit");
            for p in &r.enlisted {
                match r.votes.get(p) {
                    Some(VoteKind::Yes | VoteKind::ReadOnly) => {}
                    other => {
                        return Err(format!(
                            "Validity (rule 2): {txn} decided commit but enlisted {p} delivered {other:?} in this run (votes {:?})",
                            r.votes
                        ));
                    }
                }
            }
            let model_yes: BTreeSet<String> = r.enlisted.iter().filter(|p| r.votes.get(*p) == Some(&VoteKind::Yes)).cloned().collect();
            ensure!(&model_yes == yes, "Validity (rule 2): the commit of {txn} names YES voters {yes:?}, the model has {model_yes:?}");
            Ok(())
        }

        fn told_commit(&mut self, txn: TxnId, what: String) -> Result<(), String> {
            if !self.durable.contains_key(&txn) {
                let h = self.hist.get(&txn);
                match h.and_then(|h| h.lazy_commit_epoch) {
                    Some(e) => ensure!(
                        e == self.epoch,
                        "Rule 3: {txn} reported committed ({what}) by the epoch-{} run, but it was committed with no YES voter by run {e} \
                         and its lazy record is not durable",
                        self.epoch
                    ),
                    None => {
                        ensure!(
                            !h.is_some_and(|h| h.logged),
                            "Durability of the decision (rule 3): {txn} reported committed ({what}) but its COMMIT record is not durable"
                        );
                        // Legal only with no YES voter: nothing is forced,
                        // and the lazy record must follow in this step.
                        self.check_validity(txn, &BTreeSet::new()).map_err(|e| {
                            format!("Durability of the decision (rule 3): {txn} reported committed ({what}) without a durable COMMIT record: {e}")
                        })?;
                        self.stats.lazy_commits += 1;
                        self.hist.entry(txn).or_default().lazy_commit_epoch = Some(self.epoch);
                        self.awaiting_lazy.insert(txn);
                    }
                }
            }
            let h = self.hist.entry(txn).or_default();
            if let Some(a) = &h.aborted {
                return Err(format!("Agreement (rules 1, 3): {txn} reported committed ({what}) after it was reported aborted ({a})"));
            }
            h.committed.get_or_insert(what);
            Ok(())
        }

        fn told_abort(&mut self, txn: TxnId, what: String, query: bool) -> Result<(), String> {
            let held_record = self.durable.contains_key(&txn);
            let epoch = self.epoch;
            let strict = self.mode == Mode::Strict;
            let h = self.hist.entry(txn).or_default();
            if let Some(c) = h.committed.clone() {
                let not_held = h.forgotten_this_run || !held_record;
                if query && h.forgotten && not_held {
                    // Documented: a forgotten commit is answered ABORT; no
                    // participant can still ask (all acknowledged).
                    return Ok(());
                }
                if let Some(e) = h.lazy_commit_epoch
                    && e < epoch
                    && h.lazy_lost
                    && !strict
                {
                    // Documented: the crash lost the lazy record of a commit
                    // that changed nothing.
                    self.stats.lost_lazy_records += 1;
                    return Ok(());
                }
                return Err(format!(
                    "Agreement / decisions never change (rules 1, 3): {txn} reported aborted ({what}) after it was reported committed ({c})"
                ));
            }
            if h.aborted.is_none() {
                self.stats.aborts_reported += 1;
                h.aborted = Some(what);
            }
            Ok(())
        }

        fn on_reply(&mut self, req: ReqId, reply: Reply) -> Result<(), String> {
            let Some(r) = self.reqs.get(&req).cloned() else {
                return Err(format!("reply to a request this run never received (req {req}): {reply:?}"));
            };
            ensure!(self.answered.insert(req), "Rule 5: request {req} ({r:?}) answered twice, now with {reply:?}");
            match (r, reply) {
                (Req::Begin { timeout_ms }, Reply::Begun { txn, deadline }) => {
                    let timeout = Self::effective_timeout(timeout_ms);
                    ensure!(timeout <= MAX_TIMEOUT, "Begin with timeout {timeout} ms > max {MAX_TIMEOUT} succeeded");
                    self.new_id(txn)?;
                    ensure!(deadline == self.now.plus(timeout), "Begin {txn}: deadline T0+{} is not now + {timeout} ms", rel(deadline));
                    self.run.insert(txn, RunTxn { deadline, ..RunTxn::default() });
                }
                (
                    Req::Begin { timeout_ms } | Req::Execute { txn: None, timeout_ms },
                    Reply::Error(CoreError::TimeoutTooLong { asked_ms, max_ms }),
                ) => {
                    let timeout = Self::effective_timeout(timeout_ms);
                    ensure!(
                        asked_ms == timeout && max_ms == MAX_TIMEOUT && timeout > MAX_TIMEOUT,
                        "wrong TimeoutTooLong({asked_ms}, {max_ms})"
                    );
                }
                (Req::Enlist { txn, participant, expect }, reply) => match (expect, reply) {
                    (EnlistExpect::Ok(d), Reply::Enlisted { deadline }) if d == deadline => {
                        if let Some(r) = self.run.get_mut(&txn) {
                            r.enlisted.insert(participant);
                        }
                    }
                    (EnlistExpect::Closed, Reply::Error(CoreError::EnlistmentClosed { txn: t, .. })) if t == txn => {}
                    (EnlistExpect::NotFound, Reply::Error(CoreError::NotFound(t))) if t == txn => {}
                    (expect, reply) => {
                        return Err(format!("Enlist of {participant} in {txn}: the model expects {expect:?}, the core replied {reply:?}"));
                    }
                },
                (Req::Commit { txn } | Req::Execute { txn: Some(txn), .. }, Reply::Outcome { txn: t, outcome }) => {
                    ensure!(t == txn, "the outcome of {txn} names {t}");
                    match outcome {
                        Outcome::Committed => self.told_commit(txn, format!("req {req} told COMMITTED"))?,
                        Outcome::Aborted(reason) => {
                            self.told_abort(txn, format!("req {req} told ABORTED ({})", reason.code.as_str()), false)?
                        }
                    }
                }
                (Req::Commit { txn } | Req::Execute { txn: Some(txn), .. }, Reply::Error(e)) => self.check_error(txn, &e, false)?,
                (Req::Abort { txn }, Reply::Aborted { txn: t }) => {
                    ensure!(t == txn, "the Abort reply for {txn} names {t}");
                    self.told_abort(txn, format!("req {req}: Abort acknowledged"), false)?;
                }
                (Req::Abort { txn }, Reply::Error(e)) => self.check_error(txn, &e, true)?,
                (Req::Status { txn }, Reply::Status(s)) => {
                    ensure!(s.txn == txn, "Status of {txn} describes {}", s.txn);
                    self.status_report(&s, format!("Status (req {req})"))?;
                }
                (Req::Status { txn }, Reply::Error(e)) => self.check_error(txn, &e, false)?,
                (Req::Query { txn }, Reply::Decision(d)) => {
                    if self.durable.contains_key(&txn) && !self.hist.get(&txn).is_some_and(|h| h.forgotten_this_run) {
                        if self.known_durable.contains(&txn) {
                            ensure!(
                                d == Decision::Commit,
                                "QueryDecision for {txn}, whose COMMIT record is durable and held, answered {d:?}"
                            );
                        } else {
                            ensure!(d != Decision::Abort, "QueryDecision for {txn}, whose COMMIT record is durable, answered ABORT");
                        }
                    }
                    match d {
                        Decision::Commit => {
                            self.stats.query_commit += 1;
                            self.told_commit(txn, format!("QueryDecision (req {req}) answered COMMIT"))?;
                        }
                        Decision::Abort => self.told_abort(txn, format!("QueryDecision (req {req}) answered ABORT"), true)?,
                        Decision::Pending => {
                            ensure!(self.run.contains_key(&txn), "QueryDecision answered PENDING for {txn}, which this run did not begin")
                        }
                    }
                }
                (Req::List { limit }, Reply::List(l)) => {
                    ensure!(l.transactions.len() <= limit, "List returned {} > limit {limit}", l.transactions.len());
                    ensure!(l.transactions.windows(2).all(|w| w[0].txn < w[1].txn), "List is not oldest first");
                    for s in &l.transactions {
                        self.status_report(s, format!("List (req {req})"))?;
                    }
                }
                (r, reply) => return Err(format!("request {r:?} got an unexpected reply {reply:?}")),
            }
            Ok(())
        }

        fn status_report(&mut self, s: &twopc_coordinator::core::TxnStatus, what: String) -> Result<(), String> {
            match s.state {
                TxnState::Committed => self.told_commit(s.txn, format!("{what}: COMMITTED")),
                TxnState::Aborted => self.told_abort(s.txn, format!("{what}: ABORTED"), false),
                TxnState::Forgotten => {
                    ensure!(self.horizon.is_some_and(|h| s.txn <= h), "{what}: {} FORGOTTEN above the horizon", s.txn);
                    Ok(())
                }
                TxnState::Active | TxnState::Preparing | TxnState::Deciding => {
                    ensure!(self.run.contains_key(&s.txn), "{what}: {} is {:?} but this run did not begin it", s.txn, s.state);
                    Ok(())
                }
            }
        }

        /// The errors Commit, Abort, Execute and Status may answer.
        fn check_error(&self, txn: TxnId, e: &CoreError, abort: bool) -> Result<(), String> {
            match e {
                CoreError::NotFound(t) => {
                    ensure!(*t == txn && !self.issued.contains(&txn), "{txn} (issued) reported NotFound");
                }
                CoreError::Forgotten(t) => {
                    ensure!(*t == txn && self.horizon.is_some_and(|h| txn <= h), "{txn} reported Forgotten above the horizon");
                }
                CoreError::LogFailed(_) if !abort => {}
                CoreError::AlreadyCommitted(t) if abort => {
                    let decided =
                        self.run.get(&txn).is_some_and(|r| r.persisted) || self.hist.get(&txn).is_some_and(|h| h.committed.is_some());
                    ensure!(*t == txn && decided, "Abort of {txn} refused as already committed, but no commit was decided");
                }
                other => return Err(format!("unexpected error for {txn}: {other:?}")),
            }
            Ok(())
        }
    }

    fn fx_text(e: &Effect) -> String {
        match e {
            Effect::SendDecision { txn, participant, decision, .. } => {
                let d = if matches!(decision, PhaseTwo::Commit(_)) { "Commit" } else { "Abort" };
                format!("SendDecision {d} of {txn} to {participant}")
            }
            Effect::SendPrepare { txn, participant, payload, deadline, .. } => {
                format!("SendPrepare {txn} to {participant} (payload {}, deadline T0+{})", payload.is_some(), rel(*deadline))
            }
            Effect::SetTimer { at, timer } => format!("SetTimer T0+{} {timer:?}", rel(*at)),
            Effect::PersistDecision { txn, record, synced } => format!(
                "PersistDecision {txn} synced={synced} ended={} participants={:?}",
                record.ended,
                record.participants.iter().map(|p| p.name.as_str()).collect::<Vec<_>>()
            ),
            other => format!("{other:?}"),
        }
    }
}

// ===========================================================================
// Participant
// ===========================================================================

mod part {
    use std::collections::{BTreeMap, BTreeSet};
    use std::panic::{AssertUnwindSafe, catch_unwind};

    use proptest::prelude::*;
    use twopc_participant::core::{Core, CoreConfig, CoreError, Effect, EnlistError, Input, Phase, Reply, ReqId, SentVote, Timer};
    use twopc_proto::logpb::{BranchRecord, BranchState};
    use twopc_proto::{Decision, TxnId, UnixMillis, Vote};

    use super::{T0, VoteKind, panic_text, rel, vote_kind};

    /// Two transactions per coordinator epoch 1..=3, oldest first.
    const POOL: [TxnId; 6] = [
        TxnId { epoch: 1, seq: 1 },
        TxnId { epoch: 1, seq: 2 },
        TxnId { epoch: 2, seq: 1 },
        TxnId { epoch: 2, seq: 2 },
        TxnId { epoch: 3, seq: 1 },
        TxnId { epoch: 3, seq: 2 },
    ];
    const MAX_EPOCH: u64 = 3;
    /// Longer than every deadline (as the docs require of retention).
    const RETENTION: u64 = 120_000;

    pub fn config() -> CoreConfig {
        CoreConfig { query_after_prepare_ms: 1_000, query_base_ms: 100, query_max_ms: 800, retention_ms: RETENTION, seed: 7 }
    }

    /// The fixed deadline of a pool transaction.
    fn deadline_of(txn: TxnId) -> UnixMillis {
        let i = POOL.iter().position(|t| *t == txn).unwrap_or(POOL.len());
        T0.plus(20_000 + 5_000 * i as u64)
    }

    /// An answer to QueryDecision, as generated (bent to the coordinator's
    /// decision when it disagrees).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Answer {
        Commit,
        Abort,
        Pending,
        Err,
    }

    /// One generated operation; indices are taken modulo the candidates.
    #[derive(Debug, Clone)]
    pub enum Op {
        Join { k: usize },
        Enlisted { i: usize, ok: bool },
        Prepare { k: usize, payload: bool },
        ResourceVoted { i: usize, vote: VoteKind },
        PersistDurable { i: usize },
        PersistFailed { i: usize, landed: bool },
        Commit { k: usize, current_epoch: bool },
        Abort { k: usize, current_epoch: bool },
        Applied { i: usize },
        ApplyFailed { i: usize },
        Decided { i: usize, answer: Answer },
        FireTimer { i: usize },
        Advance { ms: u64 },
        FlushLazy,
        CoordinatorRestart,
        Duplicate { i: usize },
        Crash,
    }

    pub fn op() -> impl Strategy<Value = Op> {
        let answer = prop_oneof![3 => Just(Answer::Commit), 1 => Just(Answer::Abort), 1 => Just(Answer::Pending), 1 => Just(Answer::Err)];
        prop_oneof![
            3 => (0usize..6).prop_map(|k| Op::Join { k }),
            3 => (0usize..3, prop::bool::weighted(0.8)).prop_map(|(i, ok)| Op::Enlisted { i, ok }),
            6 => (0usize..6, prop::bool::weighted(0.75)).prop_map(|(k, payload)| Op::Prepare { k, payload }),
            6 => (0usize..3, vote_kind()).prop_map(|(i, vote)| Op::ResourceVoted { i, vote }),
            5 => (0usize..3).prop_map(|i| Op::PersistDurable { i }),
            1 => (0usize..3, any::<bool>()).prop_map(|(i, landed)| Op::PersistFailed { i, landed }),
            5 => (0usize..6, any::<bool>()).prop_map(|(k, current_epoch)| Op::Commit { k, current_epoch }),
            2 => (0usize..6, any::<bool>()).prop_map(|(k, current_epoch)| Op::Abort { k, current_epoch }),
            6 => (0usize..3).prop_map(|i| Op::Applied { i }),
            1 => (0usize..3).prop_map(|i| Op::ApplyFailed { i }),
            3 => (0usize..3, answer).prop_map(|(i, answer)| Op::Decided { i, answer }),
            5 => prop_oneof![3 => Just(0usize), 1 => 0usize..4].prop_map(|i| Op::FireTimer { i }),
            2 => prop_oneof![Just(100u64), Just(1_000u64), Just(5_000u64)].prop_map(|ms| Op::Advance { ms }),
            1 => Just(Op::FlushLazy),
            1 => Just(Op::CoordinatorRestart),
            2 => (0usize..64).prop_map(|i| Op::Duplicate { i }),
            1 => Just(Op::Crash),
        ]
    }

    /// What the generated cases exercised, for the coverage test.
    #[derive(Debug, Default, Clone)]
    pub struct Stats {
        /// Duplicate Prepares answered READ_ONLY from a released branch.
        pub read_only_repeats: usize,
        /// Released READ_ONLY branches dropped by their Forget timer.
        pub released_forgotten: usize,
        /// RetryApply timers that did nothing (stale or replayed).
        pub idle_retry_timers: usize,
        pub yes_votes: usize,
        pub commits_applied: usize,
        pub aborts_applied: usize,
        pub tombstones: usize,
        pub tombstone_refusals: usize,
        pub tombstones_lost: usize,
        pub stale_refusals: usize,
        pub crashes: usize,
        pub recovered_prepared: usize,
        pub aborts_undone_by_crash: usize,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum FirstVote {
        Yes,
        ReadOnly,
        Refused,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    enum AbortApplied {
        #[default]
        No,
        /// Applied, its lazy record not yet durable.
        Visible,
        Durable,
    }

    /// The coordinator's view and the observations of one transaction.
    #[derive(Debug, Default)]
    struct Txn {
        /// The consistent coordinator's decision: `Some(true)` commit.
        decision: Option<bool>,
        /// The first answer the coordinator got to a Prepare.
        first_vote: Option<FirstVote>,
        prepare_sent: bool,
        told_commit: bool,
        told_abort: bool,
        yes_sent: bool,
        commit_applied: u32,
        abort_applied: AbortApplied,
        released: bool,
        /// The core answered READ_ONLY since its last crash (it keeps no
        /// record of a read-only branch, only memory).
        read_only_voted: bool,
        /// An Abort found the core holding nothing; still remembered.
        tombstone: bool,
    }

    impl Txn {
        fn can_commit(&self, txn: TxnId, env_epoch: u64) -> bool {
            self.decision == Some(true)
                || (self.decision.is_none()
                    && txn.epoch == env_epoch
                    && matches!(self.first_vote, Some(FirstVote::Yes | FirstVote::ReadOnly)))
        }
    }

    #[derive(Debug, Clone)]
    enum Req {
        Join { txn: TxnId },
        Prepare { txn: TxnId, must_refuse: Option<String> },
        Commit { txn: TxnId },
        Abort { txn: TxnId },
    }

    #[derive(Debug, Clone)]
    struct ApplyFx {
        txn: TxnId,
        commit: bool,
        record: Option<BranchRecord>,
    }

    struct Harness {
        core: Core,
        now: UnixMillis,
        next_req: ReqId,
        // The branch log.
        durable: BTreeMap<TxnId, BranchRecord>,
        /// Visible, not yet durable (lazy) writes, in order; `None` deletes.
        lazy: Vec<(TxnId, Option<BranchRecord>)>,
        // Outstanding effects, this run only.
        enlists: Vec<TxnId>,
        resource_prepares: Vec<TxnId>,
        persists: Vec<(TxnId, BranchRecord)>,
        applies: Vec<ApplyFx>,
        queries: Vec<TxnId>,
        timers: Vec<(UnixMillis, Timer)>,
        /// Branches whose last apply failed and whose RetryApply timer has
        /// not yet acted.
        retry_pending: BTreeSet<TxnId>,
        reqs: BTreeMap<ReqId, Req>,
        answered: BTreeSet<ReqId>,
        history: Vec<Input>,
        // Model.
        env_epoch: u64,
        /// Epochs the core has seen since its start.
        max_epoch: u64,
        txns: BTreeMap<TxnId, Txn>,
        trace: Vec<String>,
        stats: Stats,
    }

    /// Plays `ops` and checks every step; the error carries the trace.
    pub fn run(ops: &[Op]) -> Result<Stats, String> {
        let mut h = Harness::new();
        for (n, op) in ops.iter().enumerate() {
            h.trace.push(format!("#{n} {op:?}   (now T0+{}, coordinator epoch {})", rel(h.now), h.env_epoch));
            if let Err(e) = h.apply(op) {
                return Err(format!("{e}\n--- trace: operations, inputs fed (<-) and effects (->) ---\n{}", h.trace.join("\n")));
            }
        }
        Ok(h.stats)
    }

    fn state_of(r: &BranchRecord) -> Option<BranchState> {
        BranchState::try_from(r.state).ok()
    }

    impl Harness {
        fn new() -> Self {
            let mut txns = BTreeMap::new();
            for t in POOL {
                txns.insert(t, Txn::default());
            }
            Harness {
                core: Core::new(config()),
                now: T0,
                next_req: 0,
                durable: BTreeMap::new(),
                lazy: Vec::new(),
                enlists: Vec::new(),
                resource_prepares: Vec::new(),
                persists: Vec::new(),
                applies: Vec::new(),
                queries: Vec::new(),
                timers: Vec::new(),
                retry_pending: BTreeSet::new(),
                reqs: BTreeMap::new(),
                answered: BTreeSet::new(),
                history: Vec::new(),
                env_epoch: 1,
                max_epoch: 0,
                txns,
                trace: Vec::new(),
                stats: Stats::default(),
            }
        }

        fn req(&mut self) -> ReqId {
            self.next_req += 1;
            self.next_req
        }

        /// Transaction `k` among those whose coordinator run has started.
        fn pick(&self, k: usize) -> TxnId {
            let usable = usize::try_from(2 * self.env_epoch).unwrap_or(POOL.len()).min(POOL.len());
            POOL[k % usable]
        }

        fn txn(&mut self, txn: TxnId) -> &mut Txn {
            self.txns.entry(txn).or_default()
        }

        fn durable_state(&self, txn: TxnId) -> Option<BranchState> {
            self.durable.get(&txn).and_then(state_of)
        }

        fn apply(&mut self, op: &Op) -> Result<(), String> {
            match *op {
                Op::Join { k } => {
                    let txn = self.pick(k);
                    let req = self.req();
                    self.feed(Input::Join { req, txn })
                }
                Op::Enlisted { i, ok } => {
                    if self.enlists.is_empty() {
                        return Ok(());
                    }
                    let txn = self.enlists.remove(i % self.enlists.len());
                    let env_epoch = self.env_epoch;
                    let now = self.now;
                    let t = self.txn(txn);
                    let open = txn.epoch == env_epoch && t.decision.is_none() && !t.prepare_sent && now < deadline_of(txn);
                    let result = if ok && open { Ok(deadline_of(txn)) } else { Err(EnlistError::Refused("enlistment closed".to_owned())) };
                    self.feed(Input::Enlisted { txn, result })
                }
                Op::Prepare { k, payload } => {
                    let txn = self.pick(k);
                    let req = self.req();
                    let payload = payload.then(|| b"put k v".to_vec());
                    self.feed(Input::Prepare { req, txn, epoch: txn.epoch, payload, deadline: deadline_of(txn), one_phase: false })
                }
                Op::ResourceVoted { i, vote } => {
                    if self.resource_prepares.is_empty() {
                        return Ok(());
                    }
                    let txn = self.resource_prepares.remove(i % self.resource_prepares.len());
                    let vote = match vote {
                        VoteKind::Yes => Ok(Vote::Yes),
                        VoteKind::No => Ok(Vote::No("check failed".to_owned())),
                        VoteKind::ReadOnly => Ok(Vote::ReadOnly),
                        VoteKind::Err => Err("lock conflict".to_owned()),
                    };
                    self.feed(Input::ResourceVoted { txn, vote })
                }
                Op::PersistDurable { i } => {
                    if self.persists.is_empty() {
                        return Ok(());
                    }
                    let (txn, record) = self.persists.remove(i % self.persists.len());
                    self.flush_lazy();
                    self.durable.insert(txn, record);
                    self.trace.push(format!("    PREPARED record of {txn} durable"));
                    self.feed(Input::Durable { txn })
                }
                Op::PersistFailed { i, landed } => {
                    if self.persists.is_empty() {
                        return Ok(());
                    }
                    let (txn, record) = self.persists.remove(i % self.persists.len());
                    if landed {
                        self.flush_lazy();
                        self.durable.insert(txn, record);
                    }
                    self.trace.push(format!("    PREPARED write of {txn} failed (landed: {landed})"));
                    self.feed(Input::PersistFailed { txn, error: "disk full".to_owned() })
                }
                Op::Commit { k, current_epoch } => {
                    // The k-th transaction the coordinator may commit: it
                    // never sends Commit otherwise, nor any phase two to a
                    // READ_ONLY voter (acknowledged at its vote).
                    let env_epoch = self.env_epoch;
                    let candidates: Vec<TxnId> = self
                        .txns
                        .iter()
                        .filter(|(id, t)| t.can_commit(**id, env_epoch) && t.first_vote != Some(FirstVote::ReadOnly))
                        .map(|(id, _)| *id)
                        .collect();
                    let Some(&txn) = candidates.get(k % candidates.len().max(1)) else { return Ok(()) };
                    self.txn(txn).decision = Some(true);
                    let req = self.req();
                    let epoch = if current_epoch { env_epoch } else { txn.epoch };
                    self.feed(Input::Commit { req, txn, epoch })
                }
                Op::Abort { k, current_epoch } => {
                    let txn = self.pick(k);
                    let env_epoch = self.env_epoch;
                    let t = self.txn(txn);
                    if t.decision == Some(true) || t.first_vote == Some(FirstVote::ReadOnly) {
                        return Ok(());
                    }
                    t.decision = Some(false);
                    let req = self.req();
                    let epoch = if current_epoch { env_epoch } else { txn.epoch };
                    self.feed(Input::Abort { req, txn, epoch })
                }
                Op::Applied { i } => {
                    if self.applies.is_empty() {
                        return Ok(());
                    }
                    let a = self.applies.remove(i % self.applies.len());
                    let txn = a.txn;
                    match (a.commit, a.record) {
                        (true, Some(r)) => {
                            self.flush_lazy();
                            self.durable.insert(txn, r);
                            self.stats.commits_applied += 1;
                            let t = self.txn(txn);
                            t.commit_applied += 1;
                            ensure!(t.commit_applied <= 1, "Rule 5: the commit of {txn} was applied {} times", t.commit_applied);
                            ensure!(
                                t.abort_applied == AbortApplied::No,
                                "Agreement (rule 1): {txn} committed here after its abort was applied ({:?})",
                                t.abort_applied
                            );
                        }
                        (false, Some(r)) => {
                            self.lazy.push((txn, Some(r)));
                            self.stats.aborts_applied += 1;
                            let t = self.txn(txn);
                            ensure!(t.commit_applied == 0, "Agreement (rule 1): {txn} aborted here after its commit was applied");
                            if t.abort_applied == AbortApplied::No {
                                t.abort_applied = AbortApplied::Visible;
                            }
                        }
                        (true, None) => self.txn(txn).released = true,
                        (false, None) => return Err(format!("an abort of {txn} without a record")),
                    }
                    self.feed(Input::Applied { txn })
                }
                Op::ApplyFailed { i } => {
                    if self.applies.is_empty() {
                        return Ok(());
                    }
                    let a = self.applies.remove(i % self.applies.len());
                    self.feed(Input::ApplyFailed { txn: a.txn, error: "resource unavailable".to_owned() })
                }
                Op::Decided { i, answer } => {
                    if self.queries.is_empty() {
                        return Ok(());
                    }
                    let txn = self.queries.remove(i % self.queries.len());
                    let env_epoch = self.env_epoch;
                    let t = self.txn(txn);
                    let can_commit = t.can_commit(txn, env_epoch);
                    let decision = match answer {
                        _ if t.decision == Some(true) && matches!(answer, Answer::Commit | Answer::Abort) => Ok(Decision::Commit),
                        Answer::Commit if can_commit => {
                            t.decision = Some(true);
                            Ok(Decision::Commit)
                        }
                        Answer::Commit if t.decision == Some(false) => Ok(Decision::Abort),
                        Answer::Commit | Answer::Pending => Ok(Decision::Pending),
                        Answer::Abort => {
                            t.decision = Some(false);
                            Ok(Decision::Abort)
                        }
                        Answer::Err => Err("coordinator unreachable".to_owned()),
                    };
                    self.feed(Input::Decided { txn, decision })
                }
                Op::FireTimer { i } => {
                    if self.timers.is_empty() {
                        return Ok(());
                    }
                    let (at, timer) = self.timers.remove(i % self.timers.len());
                    self.now = self.now.max(at);
                    self.feed(Input::Timer(timer))
                }
                Op::Advance { ms } => {
                    self.now = self.now.plus(ms);
                    Ok(())
                }
                Op::FlushLazy => {
                    self.flush_lazy();
                    Ok(())
                }
                Op::CoordinatorRestart => {
                    if self.env_epoch < MAX_EPOCH {
                        self.env_epoch += 1;
                        let env_epoch = self.env_epoch;
                        for (id, t) in self.txns.iter_mut() {
                            if id.epoch < env_epoch && t.decision.is_none() {
                                t.decision = Some(false); // presumed abort
                            }
                        }
                    }
                    Ok(())
                }
                Op::Duplicate { i } => {
                    if self.history.is_empty() {
                        return Ok(());
                    }
                    let mut input = self.history[i % self.history.len()].clone();
                    let fresh = self.req();
                    match &mut input {
                        Input::Join { req, .. } | Input::Prepare { req, .. } | Input::Commit { req, .. } | Input::Abort { req, .. } => {
                            *req = fresh
                        }
                        _ => {}
                    }
                    self.feed(input)
                }
                Op::Crash => self.crash(),
            }
        }

        /// Makes every visible lazy write durable, in order.
        fn flush_lazy(&mut self) {
            for (txn, rec) in std::mem::take(&mut self.lazy) {
                match rec {
                    Some(r) => {
                        if state_of(&r) == Some(BranchState::Aborted) {
                            let t = self.txn(txn);
                            if t.abort_applied == AbortApplied::Visible {
                                t.abort_applied = AbortApplied::Durable;
                            }
                        }
                        self.durable.insert(txn, r);
                    }
                    None => {
                        self.durable.remove(&txn);
                    }
                }
            }
        }

        fn crash(&mut self) -> Result<(), String> {
            self.stats.crashes += 1;
            self.lazy.clear();
            self.enlists.clear();
            self.resource_prepares.clear();
            self.persists.clear();
            self.applies.clear();
            self.queries.clear();
            self.timers.clear();
            self.retry_pending.clear();
            self.reqs.clear();
            let durable = self.durable.clone();
            let mut lost = 0;
            let mut undone = 0;
            for (id, t) in self.txns.iter_mut() {
                // A read-only branch keeps no record: the new core does not
                // know it.
                t.read_only_voted = false;
                if t.abort_applied == AbortApplied::Visible {
                    t.abort_applied = AbortApplied::No;
                    undone += 1;
                }
                let aborted_record = durable.get(id).and_then(state_of) == Some(BranchState::Aborted);
                if t.tombstone && !aborted_record {
                    t.tombstone = false;
                    lost += 1;
                }
            }
            self.stats.tombstones_lost += lost;
            self.stats.aborts_undone_by_crash += undone;
            self.stats.recovered_prepared += durable.values().filter(|r| state_of(r) == Some(BranchState::Prepared)).count();
            self.max_epoch = durable.values().map(|r| r.coordinator_epoch).max().unwrap_or(0);
            let records: Vec<(TxnId, BranchRecord)> = durable.into_iter().collect();
            self.trace
                .push(format!("    CRASH: recover({:?})", records.iter().map(|(t, r)| (t.to_string(), state_of(r))).collect::<Vec<_>>()));
            self.core = Core::new(config());
            let now = self.now;
            let core = &mut self.core;
            let fx = catch_unwind(AssertUnwindSafe(|| core.recover(now, records)))
                .map_err(|p| format!("the participant core panicked in recover: {}", panic_text(p.as_ref())))?;
            self.post(None, fx)
        }

        fn feed(&mut self, input: Input) -> Result<(), String> {
            self.trace.push(format!("  <- {input:?}"));
            self.pre(&input);
            if matches!(input, Input::Join { .. } | Input::Prepare { .. } | Input::Commit { .. } | Input::Abort { .. } | Input::Timer(_)) {
                self.history.push(input.clone());
            }
            let before = match &input {
                Input::Timer(Timer::Forget(txn)) => self.core.phase(*txn),
                _ => None,
            };
            let retry = match &input {
                Input::Timer(Timer::RetryApply(txn)) => Some((*txn, self.retry_pending.remove(txn))),
                _ => None,
            };
            let now = self.now;
            let core = &mut self.core;
            let step_input = input.clone();
            let fx = catch_unwind(AssertUnwindSafe(|| core.step(now, step_input)))
                .map_err(|p| format!("the participant core panicked: {}", panic_text(p.as_ref())))?;
            if let Input::Timer(Timer::Forget(txn)) = &input {
                self.check_forget_timer(*txn, before, &fx)?;
            }
            if let Some((txn, pending)) = retry {
                if pending {
                    ensure!(
                        matches!(fx.as_slice(), [Effect::Apply { txn: t, .. }] if *t == txn),
                        "the RetryApply timer of {txn}, after a failed apply, must apply again exactly once: {fx:?}"
                    );
                } else {
                    ensure!(fx.is_empty(), "a stale or replayed RetryApply timer of {txn} (no failed apply pending) acted: {fx:?}");
                    self.stats.idle_retry_timers += 1;
                }
            }
            self.post(Some(&input), fx)
        }

        /// A Forget timer drops a finished branch: with one `Effect::Forget`
        /// when it has a record (Committed, Aborted), with none when it is a
        /// released READ_ONLY branch; any other phase is left alone.
        fn check_forget_timer(&mut self, txn: TxnId, before: Option<Phase>, fx: &[Effect]) -> Result<(), String> {
            let after = self.core.phase(txn);
            match before {
                Some(Phase::Committed | Phase::Aborted) => {
                    ensure!(
                        matches!(fx, [Effect::Forget { txn: t }] if *t == txn) && after.is_none(),
                        "the Forget timer of finished {txn} ({before:?}) must drop it with one Effect::Forget: {fx:?}, now {after:?}"
                    );
                }
                Some(Phase::Released) => {
                    ensure!(
                        fx.is_empty() && after.is_none(),
                        "the Forget timer of released read-only {txn} must drop it with no effect (it has no record): {fx:?}, now {after:?}"
                    );
                    self.stats.released_forgotten += 1;
                }
                _ => {
                    ensure!(fx.is_empty() && after == before, "the Forget timer of {txn} in phase {before:?} acted: {fx:?}, now {after:?}")
                }
            }
            Ok(())
        }

        /// Model bookkeeping before the core sees `input`.
        fn pre(&mut self, input: &Input) {
            match input {
                Input::Join { req, txn } => {
                    self.reqs.insert(*req, Req::Join { txn: *txn });
                }
                Input::Prepare { req, txn, epoch, payload, deadline, .. } => {
                    let phase = self.core.phase(*txn);
                    let fresh = matches!(phase, None | Some(Phase::Active));
                    let tombstone = self.txns.get(txn).is_some_and(|t| t.tombstone);
                    // Only a Prepare of the issuing run teaches its epoch.
                    let learned = if *epoch == txn.epoch { *epoch } else { 0 };
                    let seen = self.max_epoch;
                    let must_refuse = if tombstone {
                        Some("an Abort left a tombstone (rule 6)".to_owned())
                    } else if fresh && txn.epoch < seen {
                        Some(format!("stale: epoch {seen} was seen (rule 7)"))
                    } else if fresh && self.now >= *deadline {
                        Some("the deadline passed (rule 6)".to_owned())
                    } else if phase.is_none() && payload.is_none() {
                        Some("no work is held for it".to_owned())
                    } else {
                        None
                    };
                    if fresh {
                        self.max_epoch = seen.max(learned);
                    }
                    self.reqs.insert(*req, Req::Prepare { txn: *txn, must_refuse });
                    self.txn(*txn).prepare_sent = true;
                }
                Input::Commit { req, txn, .. } => {
                    self.reqs.insert(*req, Req::Commit { txn: *txn });
                    self.txn(*txn).told_commit = true;
                }
                Input::Abort { req, txn, .. } => {
                    self.reqs.insert(*req, Req::Abort { txn: *txn });
                    let unseen = self.core.phase(*txn).is_none();
                    let t = self.txn(*txn);
                    t.told_abort = true;
                    if unseen {
                        t.tombstone = true;
                        self.stats.tombstones += 1;
                    }
                }
                Input::Decided { txn, decision: Ok(Decision::Commit) } => self.txn(*txn).told_commit = true,
                Input::Decided { txn, decision: Ok(Decision::Abort) } => self.txn(*txn).told_abort = true,
                Input::ApplyFailed { txn, .. } => {
                    // The apply is retried (once the RetryApply timer fires)
                    // from the phases with an outcome to apply.
                    if matches!(self.core.phase(*txn), Some(Phase::Releasing | Phase::Committing | Phase::Aborting)) {
                        self.retry_pending.insert(*txn);
                    }
                }
                _ => {}
            }
        }

        fn first_vote(&mut self, txn: TxnId, v: FirstVote) {
            let t = self.txn(txn);
            if t.first_vote.is_none() {
                t.first_vote = Some(v);
                if v == FirstVote::Refused && t.decision.is_none() {
                    t.decision = Some(false); // the coordinator aborts on NO or a failed Prepare
                }
            }
        }

        /// Checks the effects of one step (or of recovery, `input = None`).
        fn post(&mut self, input: Option<&Input>, effects: Vec<Effect>) -> Result<(), String> {
            for e in &effects {
                self.trace.push(format!("    -> {e:?}"));
            }
            let refusing = match input {
                Some(Input::Prepare { req, txn, .. }) => match self.reqs.get(req) {
                    Some(Req::Prepare { must_refuse: Some(why), .. }) => Some((*req, *txn, why.clone())),
                    _ => None,
                },
                _ => None,
            };
            if let Some((req, txn, why)) = &refusing {
                let replies = effects.iter().filter(|e| matches!(e, Effect::Reply { req: r, .. } if r == req)).count();
                ensure!(replies == 1, "Prepare of {txn} must be refused at once ({why}) but got {replies} replies");
                if why.contains("tombstone") {
                    self.stats.tombstone_refusals += 1;
                } else if why.contains("stale") {
                    self.stats.stale_refusals += 1;
                }
            }
            for e in effects {
                match e {
                    Effect::Reply { req, reply } => self.on_reply(req, reply)?,
                    Effect::Enlist { txn } => self.enlists.push(txn),
                    Effect::ResourcePrepare { txn, .. } => {
                        if let Some((_, t, why)) = &refusing
                            && *t == txn
                        {
                            return Err(format!("Prepare of {txn} must be refused ({why}) but the core asked the resource to prepare"));
                        }
                        ensure!(
                            !self.txns.get(&txn).is_some_and(|t| t.read_only_voted),
                            "Idempotency (rule 5): a duplicate Prepare of {txn}, which already voted READ_ONLY, asks the resource to prepare again"
                        );
                        self.resource_prepares.push(txn);
                    }
                    Effect::PersistPrepared { txn, record } => {
                        ensure!(state_of(&record) == Some(BranchState::Prepared), "PersistPrepared of {txn} writes {record:?}");
                        self.persists.push((txn, record));
                    }
                    Effect::Apply { txn, commit, record, synced } => {
                        let t = self.txns.get(&txn);
                        let told_commit = t.is_some_and(|t| t.told_commit);
                        let told_abort = t.is_some_and(|t| t.told_abort);
                        let yes_sent = t.is_some_and(|t| t.yes_sent);
                        match (commit, &record) {
                            (true, Some(r)) => {
                                ensure!(
                                    state_of(r) == Some(BranchState::Committed) && synced,
                                    "the commit of {txn} is recorded as {r:?} (synced {synced})"
                                );
                                let st = self.durable_state(txn);
                                ensure!(
                                    st == Some(BranchState::Prepared),
                                    "Validity (rule 2): commit applied to {txn}, whose durable record is {st:?}, not PREPARED"
                                );
                                ensure!(told_commit, "Rule 4: {txn} applies a commit nobody decided (no Commit, no COMMIT answer)");
                            }
                            (false, Some(r)) => {
                                ensure!(state_of(r) == Some(BranchState::Aborted), "the abort of {txn} is recorded as {r:?}");
                                ensure!(!yes_sent || told_abort, "Rule 4: {txn} voted YES, then aborted without being told to");
                            }
                            (true, None) => ensure!(
                                t.is_some_and(|t| t.read_only_voted),
                                "a record-less apply (release) of {txn}, which did not answer READ_ONLY"
                            ),
                            (false, None) => return Err(format!("abort of {txn} without a record")),
                        }
                        ensure!(
                            !self.applies.iter().any(|a| a.txn == txn),
                            "a second Apply of {txn} while one is in flight (commit {commit}, record {record:?})"
                        );
                        self.applies.push(ApplyFx { txn, commit, record });
                    }
                    Effect::QueryDecision { txn } => {
                        let st = self.durable_state(txn);
                        ensure!(st == Some(BranchState::Prepared), "QueryDecision for {txn}, whose durable record is {st:?}, not PREPARED");
                        self.queries.push(txn);
                    }
                    Effect::Forget { txn } => {
                        let visible = match self.lazy.iter().rev().find(|(t, _)| *t == txn) {
                            Some((_, r)) => r.is_some(),
                            None => self.durable.contains_key(&txn),
                        };
                        ensure!(visible, "Effect::Forget of {txn}, which has no record to delete");
                        self.lazy.push((txn, None));
                        self.txn(txn).tombstone = false;
                        ensure!(self.core.phase(txn).is_none(), "Effect::Forget of {txn} but the core still holds it");
                    }
                    e @ (Effect::Release { .. } | Effect::PersistFence { .. }) => {
                        return Err(format!("{e:?} without any one-phase Prepare or Recover"));
                    }
                    Effect::SetTimer { at, timer } => {
                        let pos = self.timers.partition_point(|(t, _)| *t <= at);
                        self.timers.insert(pos, (at, timer));
                    }
                }
            }
            Ok(())
        }

        fn on_reply(&mut self, req: ReqId, reply: Reply) -> Result<(), String> {
            let Some(r) = self.reqs.get(&req).cloned() else {
                return Err(format!("reply to a request this core never received (req {req}): {reply:?}"));
            };
            ensure!(self.answered.insert(req), "Rule 5: request {req} ({r:?}) answered twice, now with {reply:?}");
            match (r, reply) {
                (Req::Join { txn }, Reply::Joined { deadline }) => {
                    ensure!(deadline == deadline_of(txn), "Join of {txn}: deadline T0+{} is not the coordinator's", rel(deadline));
                }
                (Req::Join { .. }, Reply::Error(CoreError::JoinRefused { .. })) => {}
                (Req::Prepare { txn, must_refuse }, Reply::Voted(v)) => {
                    if let Some(why) = must_refuse {
                        ensure!(matches!(v, SentVote::No(_)), "Prepare of {txn} must be refused ({why}) but the core voted {:?}", v.vote());
                    }
                    if self.txns.get(&txn).is_some_and(|t| t.read_only_voted) {
                        // Remembered until long past the deadline: the first
                        // answer again, or NO once forgotten.
                        let forgotten_past_deadline = matches!(v, SentVote::No(_)) && self.now >= deadline_of(txn);
                        ensure!(
                            matches!(v, SentVote::ReadOnly) || forgotten_past_deadline,
                            "Idempotency (rule 5): a duplicate Prepare of {txn}, which answered READ_ONLY, is answered {:?}",
                            v.vote()
                        );
                        if matches!(v, SentVote::ReadOnly) {
                            self.stats.read_only_repeats += 1;
                        }
                    }
                    match v {
                        SentVote::Committed(_) => return Err(format!("COMMITTED for {txn}, which was never asked to commit in one phase")),
                        SentVote::Yes(_) => {
                            let st = self.durable_state(txn);
                            ensure!(
                                matches!(st, Some(BranchState::Prepared | BranchState::Committed)),
                                "Persist before vote: YES for {txn} while its durable record is {st:?}"
                            );
                            self.stats.yes_votes += 1;
                            self.txn(txn).yes_sent = true;
                            self.first_vote(txn, FirstVote::Yes);
                        }
                        SentVote::ReadOnly => {
                            self.txn(txn).read_only_voted = true;
                            self.first_vote(txn, FirstVote::ReadOnly);
                        }
                        SentVote::No(_) => self.first_vote(txn, FirstVote::Refused),
                    }
                }
                (Req::Prepare { txn, must_refuse }, Reply::Error(CoreError::Unavailable(_))) => {
                    ensure!(must_refuse.is_none(), "Prepare of {txn} must be refused with NO, got an error");
                    self.first_vote(txn, FirstVote::Refused);
                }
                (Req::Commit { txn }, Reply::Acked) => {
                    let t = self.txn(txn);
                    ensure!(
                        t.commit_applied > 0 || t.released || t.first_vote == Some(FirstVote::ReadOnly),
                        "Commit of {txn} acknowledged before any commit was applied and recorded"
                    );
                }
                (Req::Abort { txn }, Reply::Acked) => {
                    ensure!(self.txn(txn).commit_applied == 0, "Abort of {txn} acknowledged after it committed here");
                }
                (Req::Commit { txn }, Reply::Error(CoreError::NotPrepared { .. })) => {
                    // Only a stale duplicate may be refused: a Commit to a
                    // branch with a durable PREPARED record must be applied,
                    // or the coordinator retries forever (rule 4).
                    let st = self.durable_state(txn);
                    ensure!(
                        st != Some(BranchState::Prepared),
                        "Commit of {txn} refused as not prepared, but its PREPARED record is durable"
                    );
                }
                (Req::Commit { .. } | Req::Abort { .. }, Reply::Error(CoreError::Unavailable(_))) => {}
                (r, reply) => return Err(format!("request {r:?} got an unexpected reply {reply:?}")),
            }
            Ok(())
        }
    }
}

// ===========================================================================
// The properties
// ===========================================================================

proptest! {
    #![proptest_config(proptest_config())]

    /// The coordinator core against its model, crashes losing every write
    /// not yet durable; see the module docs.
    #[test]
    fn coordinator_core_keeps_the_rules(ops in prop::collection::vec(coord::op(), 1..160)) {
        coord::run(&ops, coord::Mode::Documented).map_err(TestCaseError::fail)?;
    }

    /// The coordinator property with no exception to rule 3, crashes keeping
    /// every write handed to the log: a commit with no YES voter stays
    /// committed across restarts, like any other.
    #[test]
    fn coordinator_decisions_never_change_strict(ops in prop::collection::vec(coord::op(), 1..160)) {
        coord::run(&ops, coord::Mode::Strict).map_err(TestCaseError::fail)?;
    }

    /// The participant core against its model, fired timers replayed too;
    /// see the module docs.
    #[test]
    fn participant_core_keeps_the_rules(ops in prop::collection::vec(part::op(), 1..160)) {
        part::run(&ops).map_err(TestCaseError::fail)?;
    }
}

// ===========================================================================
// Bugs these properties found, fixed: their minimal cases
// ===========================================================================

/// Minimal case (shrunk by proptest, then by hand): Begin, Commit with no
/// participant (COMMITTED), coordinator restart, Status. With nothing logged,
/// Status said ABORTED (presumed); the commit's lazy record now survives the
/// restart and Status says COMMITTED.
#[test]
fn regression_empty_commit_stays_committed_after_restart() {
    use coord::Op;
    let ops = [Op::Begin { timeout: 0 }, Op::Commit { k: 0 }, Op::Crash, Op::Status { k: 0 }];
    let s = coord::run(&ops, coord::Mode::Strict).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((s.lazy_commits, s.recovered_records, s.lost_lazy_records), (1, 1, 0), "{s:?}");
}

/// The same with one READ_ONLY participant, seen by the initiator: the first
/// Commit is told COMMITTED; after a coordinator restart the retried Commit
/// (the client library retries on transport errors) was told ABORTED with
/// PRESUMED_ABORT. It is now told COMMITTED, and QueryDecision agrees.
#[test]
fn regression_read_only_commit_retried_after_restart_stays_committed() {
    use coord::Op;
    let ops = [
        Op::Begin { timeout: 0 },
        Op::Enlist { k: 0, p: 0 },
        Op::Commit { k: 0 },
        Op::Vote { i: 0, vote: VoteKind::ReadOnly },
        Op::Crash,
        Op::Commit { k: 0 },
        Op::QueryDecision { k: 0 },
    ];
    let s = coord::run(&ops, coord::Mode::Strict).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((s.lazy_commits, s.recovered_records, s.query_commit, s.lost_lazy_records), (1, 1, 1, 0), "{s:?}");
}

/// What `coord::Mode::Documented` still tolerates, and only that: a crash
/// with power-loss semantics losing the lazy record of a commit with no YES
/// voter before it became durable (the next run presumes it aborted; it
/// changed nothing). Once the record is durable, flushed or carried by a
/// later synced write, the restart reports COMMITTED and nothing is
/// tolerated.
#[test]
fn lost_lazy_record_is_the_only_tolerance() {
    use coord::Op;
    let documented = |ops: &[Op]| coord::run(ops, coord::Mode::Documented).unwrap_or_else(|e| panic!("{e}"));
    let tally = |s: &coord::Stats| (s.logged_commits, s.lazy_commits, s.recovered_records, s.lost_lazy_records);

    // Lost in the crash: presumed aborted by the next run, tolerated once.
    let empty = [Op::Begin { timeout: 0 }, Op::Commit { k: 0 }, Op::Crash, Op::Status { k: 0 }];
    let s = documented(&empty);
    assert_eq!(tally(&s), (0, 1, 0, 1), "{s:?}");
    let read_only = [
        Op::Begin { timeout: 0 },
        Op::Enlist { k: 0, p: 0 },
        Op::Commit { k: 0 },
        Op::Vote { i: 0, vote: VoteKind::ReadOnly },
        Op::Crash,
        Op::Commit { k: 0 },
    ];
    let s = documented(&read_only);
    assert_eq!(tally(&s), (0, 1, 0, 1), "{s:?}");

    // Flushed before the crash: recovered and COMMITTED, nothing tolerated.
    let flushed = [Op::Begin { timeout: 0 }, Op::Commit { k: 0 }, Op::FlushLazy, Op::Crash, Op::Status { k: 0 }, Op::Commit { k: 0 }];
    let s = documented(&flushed);
    assert_eq!(tally(&s), (0, 1, 1, 0), "{s:?}");
    let read_only_flushed = [
        Op::Begin { timeout: 0 },
        Op::Enlist { k: 0, p: 0 },
        Op::Commit { k: 0 },
        Op::Vote { i: 0, vote: VoteKind::ReadOnly },
        Op::FlushLazy,
        Op::Crash,
        Op::Commit { k: 0 },
        Op::QueryDecision { k: 0 },
    ];
    let s = documented(&read_only_flushed);
    assert_eq!(tally(&s), (0, 1, 1, 0), "{s:?}");

    // Carried to disk by a later synced write (the log is sequential).
    let carried = [
        Op::Begin { timeout: 0 },
        Op::Commit { k: 0 },
        Op::Begin { timeout: 0 },
        Op::Enlist { k: 1, p: 0 },
        Op::Commit { k: 1 },
        Op::Vote { i: 0, vote: VoteKind::Yes },
        Op::Durable { i: 0 },
        Op::Crash,
        Op::Status { k: 0 },
        Op::Commit { k: 0 },
    ];
    let s = documented(&carried);
    assert_eq!(tally(&s), (1, 1, 2, 0), "{s:?}");

    // With a YES voter the record is forced before anyone hears of it: the
    // retried Commit after the restart is COMMITTED in either mode.
    let logged = [
        Op::Begin { timeout: 0 },
        Op::Enlist { k: 0, p: 0 },
        Op::Commit { k: 0 },
        Op::Vote { i: 0, vote: VoteKind::Yes },
        Op::Durable { i: 0 },
        Op::Crash,
        Op::Commit { k: 0 },
        Op::Status { k: 0 },
        Op::QueryDecision { k: 0 },
    ];
    let s = documented(&logged);
    assert_eq!((tally(&s), s.query_commit), ((1, 0, 1, 0), 1), "{s:?}");
    let s = coord::run(&logged, coord::Mode::Strict).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((tally(&s), s.query_commit), ((1, 0, 1, 0), 1), "{s:?}");
}

/// Minimal case (shrunk by proptest): Prepare with a payload, the resource
/// votes READ_ONLY, the release is applied, the same Prepare again. The core
/// forgot the branch at once and asked the resource to prepare a second time
/// (which could vote YES and hold locks); the released branch is now
/// remembered and answers READ_ONLY again.
#[test]
fn regression_duplicate_prepare_after_read_only_answers_read_only() {
    use part::Op;
    let ops = [
        Op::Prepare { k: 1, payload: true },
        Op::ResourceVoted { i: 0, vote: VoteKind::ReadOnly },
        Op::Applied { i: 0 },
        Op::Prepare { k: 1, payload: true },
    ];
    let s = part::run(&ops).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.read_only_repeats, 1, "{s:?}");
}

/// Minimal case: prepared, Commit, the commit Apply fails, the RetryApply
/// timer fires (second Apply, in flight), the same timer is replayed. The
/// replay issued a third Apply while the second was in flight and the commit
/// landed twice; it now does nothing.
#[test]
fn regression_replayed_retry_apply_timer_does_nothing() {
    use part::Op;
    let ops = [
        Op::Prepare { k: 0, payload: true },
        Op::ResourceVoted { i: 0, vote: VoteKind::Yes },
        Op::PersistDurable { i: 0 },
        Op::Commit { k: 0, current_epoch: false },
        Op::ApplyFailed { i: 0 },
        Op::FireTimer { i: 0 },
        Op::Duplicate { i: 2 },
        Op::Applied { i: 0 },
        Op::Applied { i: 0 },
    ];
    let s = part::run(&ops).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((s.commits_applied, s.idle_retry_timers), (1, 1), "{s:?}");
}

/// The generators are not vacuous: over a fixed set of generated cases,
/// every interesting path is taken at least once.
#[test]
fn generated_cases_cover_the_interesting_paths() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let coord_ops = prop::collection::vec(coord::op(), 1..160);
    let part_ops = prop::collection::vec(part::op(), 1..160);
    let mut c = coord::Stats::default();
    let mut p = part::Stats::default();
    for _ in 0..256 {
        let ops = coord_ops.new_tree(&mut runner).expect("generate coordinator ops").current();
        let s = coord::run(&ops, coord::Mode::Documented).unwrap_or_else(|e| panic!("{e}"));
        c.logged_commits += s.logged_commits;
        c.lazy_commits += s.lazy_commits;
        c.aborts_reported += s.aborts_reported;
        c.crashes += s.crashes;
        c.recovered_records += s.recovered_records;
        c.commit_messages_after_recovery += s.commit_messages_after_recovery;
        c.forgets += s.forgets;
        c.query_commit += s.query_commit;
        c.lost_lazy_records += s.lost_lazy_records;
        c.failed_writes += s.failed_writes;
        let ops = part_ops.new_tree(&mut runner).expect("generate participant ops").current();
        let s = part::run(&ops).unwrap_or_else(|e| panic!("{e}"));
        p.yes_votes += s.yes_votes;
        p.read_only_repeats += s.read_only_repeats;
        p.released_forgotten += s.released_forgotten;
        p.idle_retry_timers += s.idle_retry_timers;
        p.commits_applied += s.commits_applied;
        p.aborts_applied += s.aborts_applied;
        p.tombstones += s.tombstones;
        p.tombstone_refusals += s.tombstone_refusals;
        p.tombstones_lost += s.tombstones_lost;
        p.stale_refusals += s.stale_refusals;
        p.crashes += s.crashes;
        p.recovered_prepared += s.recovered_prepared;
        p.aborts_undone_by_crash += s.aborts_undone_by_crash;
    }
    eprintln!("coordinator coverage: {c:?}");
    eprintln!("participant coverage: {p:?}");
    for (name, n) in [
        ("logged commits", c.logged_commits),
        ("commits with no YES voter (lazy records)", c.lazy_commits),
        ("aborts reported", c.aborts_reported),
        ("crashes", c.crashes),
        ("recovered records", c.recovered_records),
        ("Commit messages after recovery", c.commit_messages_after_recovery),
        ("forgets", c.forgets),
        ("QueryDecision COMMIT answers", c.query_commit),
        ("failed decision writes", c.failed_writes),
        ("YES votes", p.yes_votes),
        ("duplicate Prepares answered READ_ONLY", p.read_only_repeats),
        ("released read-only branches forgotten", p.released_forgotten),
        ("idle RetryApply timers", p.idle_retry_timers),
        ("commits applied", p.commits_applied),
        ("aborts applied", p.aborts_applied),
        ("tombstones", p.tombstones),
        ("tombstone refusals", p.tombstone_refusals),
        ("stale-epoch refusals", p.stale_refusals),
        ("participant crashes", p.crashes),
        ("recovered prepared branches", p.recovered_prepared),
    ] {
        assert!(n > 0, "no generated case exercised: {name}");
    }
}
