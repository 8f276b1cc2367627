//! A whole cluster — the project's real coordinator and participant cores —
//! as one deterministic value, for the model checker and the random
//! simulation.
//!
//! [`World`] holds the cores, each process's durable log (what survives a
//! crash), the writes it asked for that are not durable yet, its timers, and
//! the network (a multiset of messages). [`World::actions`] lists what can
//! happen next; [`World::step`] makes one of them happen:
//!
//! - the client starts one of its transactions: an Execute over the
//!   configured participants, or (with [`SimConfig::enlist`]) a Begin, a
//!   business call to each participant (which joins: Enlist with the
//!   coordinator before it answers), and Commit once every call answered;
//! - a message is delivered, dropped (the caller's RPC fails), or duplicated;
//! - the oldest pending write of a process becomes durable — its own step,
//!   separate from the request to write, so that acting on a record before
//!   it is durable is a reachable bug;
//! - a resource answers a pending prepare;
//! - the earliest pending timer fires (time jumps to it);
//! - a process crashes and restarts: everything not durable is lost, the core
//!   is rebuilt from its durable records (`recover`), the RPCs it was serving
//!   fail at their callers;
//! - a client whose Execute was cut off by a coordinator crash asks Status,
//!   and takes the answer as what it was told.
//!
//! A transaction over one participant commits in one phase (the
//! coordinator's default), with its one-phase markers, the participant's
//! fences and the coordinator's collection after a restart.
//!
//! Budgets bound drops, duplicates, crashes and timer firings, so the state
//! space is finite. [`Mutation`] plants a deliberate bug in the glue (a
//! "durable" acknowledgement before the write lands) to show that the checks
//! catch it.
//!
//! [`World::violations`] checks the safety rules of docs/ARCHITECTURE.md in
//! every state; [`World::fair_drain`] delivers everything, lands every write
//! and fires every timer without faults, after which every transaction must
//! be finished everywhere (liveness under fair delivery).

use std::collections::{BTreeMap, BTreeSet};

use twopc_coordinator::core as cc;
use twopc_participant::core as pc;
use twopc_proto::logpb::{BranchRecord, BranchState, DecisionRecord, LoggedParticipant};
use twopc_proto::{Decision, Outcome, ParticipantName, TxnId, UnixMillis, Vote};

/// A deliberate bug, for mutation tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mutation {
    /// The real glue.
    None,
    /// The coordinator is told its COMMIT decision is durable as soon as it
    /// asks for the write (so it replies and sends Commit before the record
    /// is on disk).
    CoordinatorCommitsBeforeDurable,
    /// A participant is told its PREPARED record is durable as soon as it
    /// asks for the write (so it votes YES before the record is on disk).
    ParticipantVotesBeforeDurable,
    /// The coordinator's one-phase marker is reported durable at once and
    /// never written (so a restarted coordinator does not know it must
    /// collect one-phase outcomes before presuming abort).
    OnePhaseWithoutMarker,
}

/// The shape of the simulated cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SimConfig {
    /// Number of participants (p0, p1, …).
    pub participants: usize,
    /// Transactions the client runs: for each, the participants it spans
    /// and the one (if any) whose resource votes NO.
    pub txns: Vec<(Vec<usize>, Option<usize>)>,
    /// Most messages dropped.
    pub drops: u8,
    /// Most messages duplicated.
    pub dups: u8,
    /// Most process crashes.
    pub crashes: u8,
    /// Most timer firings.
    pub timers: u8,
    /// Planted bug.
    pub mutation: Mutation,
    /// Transactions are Begin, business calls (each participant enlists)
    /// and Commit, instead of Execute.
    pub enlist: bool,
}

/// A message on the simulated network.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Msg {
    /// Coordinator → participant request.
    Prepare {
        /// Participant index.
        to: usize,
        /// Transaction.
        txn: TxnId,
        /// Sender's epoch.
        epoch: u64,
        /// Execute payload.
        payload: Option<Vec<u8>>,
        /// Deadline.
        deadline: u64,
        /// One-phase Prepare.
        one_phase: bool,
    },
    /// Its response.
    Vote {
        /// Participant index.
        from: usize,
        /// Transaction.
        txn: TxnId,
        /// The vote or the failure.
        vote: Result<Vote, String>,
    },
    /// Coordinator → participant request (phase two).
    Decision {
        /// Participant index.
        to: usize,
        /// Transaction.
        txn: TxnId,
        /// Sender's epoch.
        epoch: u64,
        /// Commit or abort.
        commit: bool,
    },
    /// Its response.
    Ack {
        /// Participant index.
        from: usize,
        /// Transaction.
        txn: TxnId,
        /// Acknowledged, or the failure.
        ok: Result<(), String>,
    },
    /// Participant → coordinator request.
    Query {
        /// Participant index.
        from: usize,
        /// Transaction.
        txn: TxnId,
    },
    /// Its response.
    QueryReply {
        /// Participant index.
        to: usize,
        /// Transaction.
        txn: TxnId,
        /// The answer or the failure.
        decision: Result<Decision, String>,
    },
    /// Client → participant: a business call under the transaction.
    Call {
        /// Participant index.
        to: usize,
        /// Configured transaction.
        k: usize,
        /// Transaction.
        txn: TxnId,
    },
    /// Its response.
    CallReply {
        /// Participant index.
        from: usize,
        /// Configured transaction.
        k: usize,
        /// Answered (joined), or refused / failed.
        ok: bool,
    },
    /// Participant → coordinator: Enlist.
    Enlist {
        /// Participant index.
        from: usize,
        /// Transaction.
        txn: TxnId,
        /// The participant process's incarnation.
        incarnation: u64,
    },
    /// Its response (to the participant process that asked: one restarted
    /// since never sees it, as a reply on a dead process's connection).
    EnlistReply {
        /// Participant index.
        to: usize,
        /// The incarnation that asked.
        incarnation: u64,
        /// Transaction.
        txn: TxnId,
        /// The deadline, or the refusal / failure.
        result: Result<u64, String>,
    },
    /// Coordinator → participant: collect one-phase outcomes.
    Recover {
        /// Participant index.
        to: usize,
        /// The collecting run.
        epoch: u64,
    },
    /// Its response (to the coordinator run that asked: a later run never
    /// sees it, as a reply on a dead process's connection).
    Recovered {
        /// Participant index.
        from: usize,
        /// The run that asked.
        epoch: u64,
        /// The unreleased one-phase commits, or the failure.
        result: Result<Vec<TxnId>, String>,
    },
}

/// What can happen next.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// The client starts transaction `k` of the configuration.
    Start(usize),
    /// Deliver a message (removing it).
    Deliver(Msg),
    /// Drop a message; its RPC fails at the caller.
    Drop(Msg),
    /// Deliver a copy of a message and keep it in flight.
    Duplicate(Msg),
    /// The oldest pending write of the coordinator becomes durable.
    LandCoordinator,
    /// The oldest pending write of participant `i` becomes durable.
    LandParticipant(usize),
    /// Participant `i`'s resource answers its pending prepare of `txn`.
    Resource(usize, TxnId),
    /// The earliest pending timer fires.
    Timer,
    /// The coordinator crashes and restarts.
    CrashCoordinator,
    /// Participant `i` crashes and restarts.
    CrashParticipant(usize),
    /// The client of transaction `k`, cut off, asks Status.
    Status(usize),
}

/// What the client was told about a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Told {
    /// COMMITTED.
    Committed,
    /// ABORTED.
    Aborted,
    /// The coordinator crashed before answering.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CWrite {
    Decision { txn: TxnId, participants: Vec<String>, ended: bool, synced: bool, fed: bool },
    Forget { txn: TxnId, horizon: TxnId },
    Marker { participant: String },
    ClearMarkers { participant: String, epochs: Vec<u64> },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CServing {
    Client(usize),
    Query { from: usize, txn: TxnId },
    Status(usize),
    Begin(usize),
    Enlist { from: usize, txn: TxnId, incarnation: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Coord {
    core: cc::Core,
    epoch: u64,
    /// txn → (YES participants, ended)
    durable: BTreeMap<TxnId, (Vec<String>, bool)>,
    horizon: Option<TxnId>,
    /// Durable one-phase markers: (run epoch, participant).
    markers: BTreeSet<(u64, String)>,
    pending: Vec<CWrite>,
    timers: BTreeSet<(u64, cc::Timer)>,
    serving: BTreeMap<u64, CServing>,
    next_req: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PWrite {
    Prepared { txn: TxnId, record: Rec, fed: bool },
    Apply { txn: TxnId, commit: bool, record: Option<Rec> },
    Release { txn: TxnId, record: Rec },
    Fence { epoch: u64, replaces: Option<u64>, record: Rec },
    Forget { txn: TxnId },
}

/// A branch record: (state, deadline, epoch, updated, one-phase mark).
type Rec = (i32, u64, u64, u64, bool);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PServing {
    Prepare(TxnId),
    Decision { txn: TxnId, unknown: bool },
    Recover(u64),
    Join(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Part {
    core: pc::Core,
    /// txn → record (fences under (epoch, 0))
    durable: BTreeMap<TxnId, Rec>,
    pending: Vec<PWrite>,
    timers: BTreeSet<(u64, pc::Timer)>,
    serving: BTreeMap<u64, PServing>,
    next_req: u64,
    resource: BTreeSet<(TxnId, bool)>,
    /// Changes at every restart (Enlist carries it).
    incarnation: u64,
}

/// Facts recorded as they happen, for the properties.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Observed {
    /// Commit applications that landed, per (participant, txn).
    pub applied: BTreeMap<(usize, TxnId), u8>,
    /// Abort outcomes that landed, per (participant, txn).
    pub aborted: BTreeSet<(usize, TxnId)>,
    /// PREPARED records that landed.
    pub prepared: BTreeSet<(usize, TxnId)>,
    /// Aborts of never-seen transactions that a participant acknowledged.
    pub tombstoned: BTreeSet<(usize, TxnId)>,
    /// COMMIT decision records that landed.
    pub commit_durable: BTreeSet<TxnId>,
    /// Participants of each transaction (from its Prepares).
    pub spans: BTreeMap<TxnId, BTreeSet<usize>>,
    /// A PREPARED record landed for a tombstoned transaction.
    pub hanging: bool,
    /// Transactions committed in one phase (the commit landed).
    pub one_phase: BTreeSet<TxnId>,
}

/// The simulated cluster. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct World {
    now: u64,
    coord: Coord,
    parts: Vec<Part>,
    net: Vec<Msg>,
    /// Per configured transaction: its id once the coordinator issued it
    /// (learned from the first Prepare or the answer) and what the client
    /// was told.
    client: Vec<(bool, Option<TxnId>, Option<Told>)>,
    /// Per configured transaction (enlist mode): business calls not
    /// answered yet.
    calls: Vec<u8>,
    budget: (u8, u8, u8, u8),
    /// Facts for the properties.
    pub obs: Observed,
}

const T0: u64 = 1_000;

fn name(i: usize) -> String {
    format!("p{i}")
}

fn endpoint(i: usize) -> String {
    format!("http://p{i}")
}

fn index(n: &ParticipantName) -> usize {
    n.as_str().trim_start_matches('p').parse().unwrap_or(usize::MAX)
}

fn coord_config() -> cc::CoreConfig {
    cc::CoreConfig {
        default_timeout_ms: 1_000,
        max_timeout_ms: 10_000,
        prepare_timeout_ms: 500,
        retry_base_ms: 10,
        retry_max_ms: 40,
        abort_delivery_attempts: 2,
        retention_ms: 50_000,
        seed: 7,
        one_phase: true,
    }
}

fn part_config() -> pc::CoreConfig {
    pc::CoreConfig { query_after_prepare_ms: 100, query_base_ms: 10, query_max_ms: 40, retention_ms: 50_000, seed: 11 }
}

fn to_record((state, deadline, epoch, updated, one_phase): Rec) -> BranchRecord {
    BranchRecord { state, deadline_unix_ms: deadline, coordinator_epoch: epoch, updated_unix_ms: updated, one_phase }
}

fn from_record(r: &BranchRecord) -> Rec {
    (r.state, r.deadline_unix_ms, r.coordinator_epoch, r.updated_unix_ms, r.one_phase)
}

impl World {
    /// The initial state for `cfg`.
    pub fn new(cfg: &SimConfig) -> World {
        let mut coord = Coord {
            core: cc::Core::new(1, coord_config()),
            epoch: 1,
            durable: BTreeMap::new(),
            horizon: None,
            markers: BTreeSet::new(),
            pending: Vec::new(),
            timers: BTreeSet::new(),
            serving: BTreeMap::new(),
            next_req: 1,
        };
        let _ = coord.core.recover(UnixMillis(T0), Vec::new(), None);
        let parts = (0..cfg.participants)
            .map(|_| Part {
                core: pc::Core::new(part_config()),
                durable: BTreeMap::new(),
                pending: Vec::new(),
                timers: BTreeSet::new(),
                serving: BTreeMap::new(),
                next_req: 1,
                resource: BTreeSet::new(),
                incarnation: 1,
            })
            .collect();
        World {
            now: T0,
            coord,
            parts,
            net: Vec::new(),
            client: vec![(false, None, None); cfg.txns.len()],
            calls: vec![0; cfg.txns.len()],
            budget: (cfg.drops, cfg.dups, cfg.crashes, cfg.timers),
            obs: Observed::default(),
        }
    }

    /// What the client was told about configured transaction `k`.
    pub fn told(&self, k: usize) -> Option<Told> {
        self.client.get(k).and_then(|c| c.2)
    }

    /// Every action possible now (budgets respected when `faults`).
    pub fn actions(&self, cfg: &SimConfig, faults: bool, out: &mut Vec<Action>) {
        for (k, c) in self.client.iter().enumerate() {
            if !c.0 {
                out.push(Action::Start(k));
            }
            if faults && c.1.is_some() && c.2 == Some(Told::Unknown) {
                out.push(Action::Status(k));
            }
        }
        let mut seen = BTreeSet::new();
        for m in &self.net {
            if !seen.insert(m) {
                continue;
            }
            out.push(Action::Deliver(m.clone()));
            if faults && self.budget.0 > 0 {
                out.push(Action::Drop(m.clone()));
            }
            if faults && self.budget.1 > 0 {
                out.push(Action::Duplicate(m.clone()));
            }
        }
        if !self.coord.pending.is_empty() {
            out.push(Action::LandCoordinator);
        }
        for (i, p) in self.parts.iter().enumerate() {
            if !p.pending.is_empty() {
                out.push(Action::LandParticipant(i));
            }
            for (txn, _) in &p.resource {
                out.push(Action::Resource(i, *txn));
            }
        }
        if self.earliest_timer().is_some() && (!faults || self.budget.3 > 0) {
            out.push(Action::Timer);
        }
        if faults && self.budget.2 > 0 {
            out.push(Action::CrashCoordinator);
            for i in 0..cfg.participants {
                out.push(Action::CrashParticipant(i));
            }
        }
    }

    fn earliest_timer(&self) -> Option<u64> {
        let c = self.coord.timers.iter().next().map(|(at, _)| *at);
        let p = self.parts.iter().filter_map(|p| p.timers.iter().next().map(|(at, _)| *at)).min();
        match (c, p) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn take_msg(&mut self, m: &Msg) -> bool {
        match self.net.iter().position(|x| x == m) {
            Some(i) => {
                self.net.remove(i);
                true
            }
            None => false,
        }
    }

    fn send(&mut self, m: Msg) {
        let at = self.net.binary_search(&m).unwrap_or_else(|e| e);
        self.net.insert(at, m);
    }

    /// Makes `action` happen. Returns false if it is not possible.
    pub fn step(&mut self, cfg: &SimConfig, action: &Action) -> bool {
        match action {
            Action::Start(k) => {
                let Some((parts, _)) = cfg.txns.get(*k) else { return false };
                if self.client[*k].0 {
                    return false;
                }
                self.client[*k].0 = true;
                if cfg.enlist {
                    let req = self.coord.next_req;
                    self.coord.next_req += 1;
                    self.coord.serving.insert(req, CServing::Begin(*k));
                    self.coord_input(cfg, cc::Input::Begin { req, timeout_ms: 1_000 });
                    return true;
                }
                let branches = parts
                    .iter()
                    .map(|i| cc::ExecBranch {
                        participant: ParticipantName::new(name(*i)).expect("valid name"),
                        endpoint: endpoint(*i),
                        payload: format!("txn{k}").into_bytes(),
                    })
                    .collect();
                let req = self.coord.next_req;
                self.coord.next_req += 1;
                self.coord.serving.insert(req, CServing::Client(*k));
                self.coord_input(cfg, cc::Input::Execute { req, branches, timeout_ms: 1_000 });
            }
            Action::Deliver(m) | Action::Duplicate(m) => {
                let dup = matches!(action, Action::Duplicate(_));
                if dup {
                    if self.budget.1 == 0 || !self.net.contains(m) {
                        return false;
                    }
                    self.budget.1 -= 1;
                } else if !self.take_msg(m) {
                    return false;
                }
                self.deliver(cfg, m.clone());
            }
            Action::Drop(m) => {
                if self.budget.0 == 0 || !self.take_msg(m) {
                    return false;
                }
                self.budget.0 -= 1;
                self.fail_rpc(cfg, m.clone(), "message lost");
            }
            Action::LandCoordinator => {
                if self.coord.pending.is_empty() {
                    return false;
                }
                let w = self.coord.pending.remove(0);
                match w {
                    CWrite::Decision { txn, participants, ended, synced, fed } => {
                        if !ended {
                            self.obs.commit_durable.insert(txn);
                        }
                        self.coord.durable.insert(txn, (participants, ended));
                        if synced && !fed {
                            self.coord_input(cfg, cc::Input::Durable { txn });
                        }
                    }
                    CWrite::Forget { txn, horizon } => {
                        self.coord.durable.remove(&txn);
                        self.coord.horizon = Some(horizon);
                    }
                    CWrite::Marker { participant } => {
                        self.coord.markers.insert((self.coord.epoch, participant.clone()));
                        let participant = ParticipantName::new(participant).expect("valid");
                        self.coord_input(cfg, cc::Input::MarkerDurable { participant });
                    }
                    CWrite::ClearMarkers { participant, epochs } => {
                        for e in epochs {
                            self.coord.markers.remove(&(e, participant.clone()));
                        }
                    }
                }
            }
            Action::LandParticipant(i) => {
                let i = *i;
                if self.parts.get(i).is_none_or(|p| p.pending.is_empty()) {
                    return false;
                }
                let w = self.parts[i].pending.remove(0);
                match w {
                    PWrite::Prepared { txn, record, fed } => {
                        self.parts[i].durable.insert(txn, record);
                        self.obs.prepared.insert((i, txn));
                        if self.obs.tombstoned.contains(&(i, txn)) {
                            self.obs.hanging = true;
                        }
                        if !fed {
                            self.part_input(cfg, i, pc::Input::Durable { txn });
                        }
                    }
                    PWrite::Apply { txn, commit, record } => {
                        if let Some(r) = record {
                            self.parts[i].durable.insert(txn, r);
                            if commit {
                                *self.obs.applied.entry((i, txn)).or_default() += 1;
                                if r.4 {
                                    // A one-phase commit: its own prepare,
                                    // and the transaction's decision.
                                    self.obs.prepared.insert((i, txn));
                                    self.obs.commit_durable.insert(txn);
                                    self.obs.one_phase.insert(txn);
                                }
                            } else {
                                self.obs.aborted.insert((i, txn));
                            }
                        }
                        self.part_input(cfg, i, pc::Input::Applied { txn });
                    }
                    PWrite::Release { txn, record } => {
                        self.parts[i].durable.insert(txn, record);
                        self.part_input(cfg, i, pc::Input::Released { txn, result: Ok(()) });
                    }
                    PWrite::Fence { epoch, replaces, record } => {
                        if let Some(old) = replaces {
                            self.parts[i].durable.remove(&TxnId { epoch: old, seq: 0 });
                        }
                        self.parts[i].durable.insert(TxnId { epoch, seq: 0 }, record);
                        self.part_input(cfg, i, pc::Input::FenceDurable { epoch });
                    }
                    PWrite::Forget { txn } => {
                        self.parts[i].durable.remove(&txn);
                    }
                }
            }
            Action::Resource(i, txn) => {
                let i = *i;
                let Some(entry) = self.parts.get(i).and_then(|p| p.resource.iter().find(|(t, _)| t == txn).cloned()) else {
                    return false;
                };
                self.parts[i].resource.remove(&entry);
                let vote = if entry.1 { Vote::No("the resource refuses".into()) } else { Vote::Yes };
                self.part_input(cfg, i, pc::Input::ResourceVoted { txn: *txn, vote: Ok(vote) });
            }
            Action::Timer => {
                let Some(at) = self.earliest_timer() else { return false };
                if self.budget.3 > 0 {
                    self.budget.3 -= 1;
                }
                self.now = self.now.max(at);
                if let Some((t_at, t)) = self.coord.timers.iter().next().cloned()
                    && t_at == at
                {
                    self.coord.timers.remove(&(t_at, t.clone()));
                    self.coord_input(cfg, cc::Input::Timer(t));
                    return true;
                }
                for i in 0..self.parts.len() {
                    if let Some((t_at, t)) = self.parts[i].timers.iter().next().cloned()
                        && t_at == at
                    {
                        self.parts[i].timers.remove(&(t_at, t));
                        self.part_input(cfg, i, pc::Input::Timer(t));
                        return true;
                    }
                }
            }
            Action::CrashCoordinator => {
                if self.budget.2 == 0 {
                    return false;
                }
                self.budget.2 -= 1;
                self.crash_coordinator(cfg);
            }
            Action::CrashParticipant(i) => {
                if self.budget.2 == 0 || *i >= self.parts.len() {
                    return false;
                }
                self.budget.2 -= 1;
                self.crash_participant(cfg, *i);
            }
            Action::Status(k) => {
                let Some((_, Some(txn), Some(Told::Unknown))) = self.client.get(*k).cloned() else { return false };
                // Answered in this step: a fixed request id, so that an
                // answer that changes nothing leaves the state as it was.
                let req = u64::MAX - *k as u64;
                self.coord.serving.insert(req, CServing::Status(*k));
                self.coord_input(cfg, cc::Input::Status { req, txn });
            }
        }
        true
    }

    fn deliver(&mut self, cfg: &SimConfig, m: Msg) {
        match m {
            Msg::Prepare { to, txn, epoch, payload, deadline, one_phase } => {
                let req = self.parts[to].next_req;
                self.parts[to].next_req += 1;
                self.parts[to].serving.insert(req, PServing::Prepare(txn));
                self.part_input(cfg, to, pc::Input::Prepare { req, txn, epoch, payload, deadline: UnixMillis(deadline), one_phase });
            }
            Msg::Call { to, k, txn } => {
                let req = self.parts[to].next_req;
                self.parts[to].next_req += 1;
                self.parts[to].serving.insert(req, PServing::Join(k));
                self.part_input(cfg, to, pc::Input::Join { req, txn });
            }
            Msg::CallReply { k, .. } => self.call_answered(cfg, k),
            Msg::Enlist { from, txn, incarnation } => {
                let req = self.coord.next_req;
                self.coord.next_req += 1;
                self.coord.serving.insert(req, CServing::Enlist { from, txn, incarnation });
                let participant = ParticipantName::new(name(from)).expect("valid");
                self.coord_input(cfg, cc::Input::Enlist { req, txn, participant, endpoint: endpoint(from), incarnation });
            }
            Msg::EnlistReply { to, incarnation, txn, result } => {
                if incarnation != self.parts[to].incarnation {
                    return;
                }
                let result = result.map(UnixMillis).map_err(twopc_participant::core::EnlistError::Refused);
                self.part_input(cfg, to, pc::Input::Enlisted { txn, result })
            }
            Msg::Recover { to, epoch } => {
                let req = self.parts[to].next_req;
                self.parts[to].next_req += 1;
                self.parts[to].serving.insert(req, PServing::Recover(epoch));
                self.part_input(cfg, to, pc::Input::Recover { req, epoch });
            }
            Msg::Recovered { from, epoch, result } => {
                if epoch != self.coord.epoch {
                    return;
                }
                let participant = ParticipantName::new(name(from)).expect("valid");
                self.coord_input(cfg, cc::Input::Collected { participant, endpoint: endpoint(from), result })
            }
            Msg::Decision { to, txn, epoch, commit } => {
                let req = self.parts[to].next_req;
                self.parts[to].next_req += 1;
                let unknown = self.parts[to].core.phase(txn).is_none();
                self.parts[to].serving.insert(req, PServing::Decision { txn, unknown });
                let input = if commit { pc::Input::Commit { req, txn, epoch } } else { pc::Input::Abort { req, txn, epoch } };
                self.part_input(cfg, to, input);
            }
            Msg::Query { from, txn } => {
                let req = self.coord.next_req;
                self.coord.next_req += 1;
                self.coord.serving.insert(req, CServing::Query { from, txn });
                self.coord_input(cfg, cc::Input::QueryDecision { req, txn });
            }
            Msg::Vote { from, txn, vote } => {
                self.coord_input(cfg, cc::Input::Voted { txn, participant: ParticipantName::new(name(from)).expect("valid"), vote })
            }
            Msg::Ack { from, txn, ok } => self
                .coord_input(cfg, cc::Input::Delivered { txn, participant: ParticipantName::new(name(from)).expect("valid"), result: ok }),
            Msg::QueryReply { to, txn, decision } => self.part_input(cfg, to, pc::Input::Decided { txn, decision }),
        }
    }

    /// A request or its response was lost: the caller's RPC fails.
    fn fail_rpc(&mut self, cfg: &SimConfig, m: Msg, why: &str) {
        match m {
            Msg::Prepare { to, txn, .. } | Msg::Vote { from: to, txn, .. } => self.coord_input(
                cfg,
                cc::Input::Voted { txn, participant: ParticipantName::new(name(to)).expect("valid"), vote: Err(why.into()) },
            ),
            Msg::Decision { to, txn, .. } | Msg::Ack { from: to, txn, .. } => self.coord_input(
                cfg,
                cc::Input::Delivered { txn, participant: ParticipantName::new(name(to)).expect("valid"), result: Err(why.into()) },
            ),
            Msg::Query { from, txn } | Msg::QueryReply { to: from, txn, .. } => {
                self.part_input(cfg, from, pc::Input::Decided { txn, decision: Err(why.into()) })
            }
            Msg::Call { k, .. } | Msg::CallReply { k, .. } => self.call_answered(cfg, k),
            Msg::Enlist { from, txn, incarnation } | Msg::EnlistReply { to: from, txn, incarnation, .. } => {
                if incarnation != self.parts[from].incarnation {
                    return;
                }
                let result = Err(twopc_participant::core::EnlistError::Unreachable(why.into()));
                self.part_input(cfg, from, pc::Input::Enlisted { txn, result })
            }
            Msg::Recover { to: from, epoch } | Msg::Recovered { from, epoch, .. } => {
                if epoch != self.coord.epoch {
                    return;
                }
                let participant = ParticipantName::new(name(from)).expect("valid");
                self.coord_input(cfg, cc::Input::Collected { participant, endpoint: endpoint(from), result: Err(why.into()) })
            }
        }
    }

    /// A business call of configured transaction `k` was answered (or
    /// failed); once all were, the client commits.
    fn call_answered(&mut self, cfg: &SimConfig, k: usize) {
        let Some(left) = self.calls.get_mut(k) else { return };
        if *left == 0 {
            return;
        }
        *left -= 1;
        if *left == 0
            && let Some(txn) = self.client[k].1
        {
            let req = self.coord.next_req;
            self.coord.next_req += 1;
            self.coord.serving.insert(req, CServing::Client(k));
            self.coord_input(cfg, cc::Input::Commit { req, txn });
        }
    }

    fn coord_input(&mut self, cfg: &SimConfig, input: cc::Input) {
        let effects = self.coord.core.step(UnixMillis(self.now), input);
        self.coord_effects(cfg, effects);
    }

    fn coord_effects(&mut self, cfg: &SimConfig, effects: Vec<cc::Effect>) {
        for e in effects {
            match e {
                cc::Effect::Reply { req, reply } => match self.coord.serving.remove(&req) {
                    Some(CServing::Client(k)) => {
                        let told = match reply {
                            cc::Reply::Outcome { txn, outcome } => {
                                self.client[k].1 = Some(txn);
                                match outcome {
                                    Outcome::Committed => Told::Committed,
                                    Outcome::Aborted(_) => Told::Aborted,
                                }
                            }
                            _ => Told::Unknown,
                        };
                        self.client[k].2 = Some(told);
                    }
                    Some(CServing::Query { from, txn }) => {
                        let decision = match reply {
                            cc::Reply::Decision(d) => Ok(d),
                            other => Err(format!("{other:?}")),
                        };
                        self.send(Msg::QueryReply { to: from, txn, decision });
                    }
                    Some(CServing::Begin(k)) => match reply {
                        cc::Reply::Begun { txn, .. } => {
                            self.client[k].1 = Some(txn);
                            let span = cfg.txns.get(k).map(|t| t.0.clone()).unwrap_or_default();
                            self.calls[k] = u8::try_from(span.len()).unwrap_or(u8::MAX);
                            for to in span {
                                self.send(Msg::Call { to, k, txn });
                            }
                        }
                        _ => self.client[k].2 = Some(Told::Unknown),
                    },
                    Some(CServing::Enlist { from, txn, incarnation }) => {
                        let result = match reply {
                            cc::Reply::Enlisted { deadline } => Ok(deadline.0),
                            other => Err(format!("{other:?}")),
                        };
                        self.send(Msg::EnlistReply { to: from, incarnation, txn, result });
                    }
                    Some(CServing::Status(k)) => {
                        // What Status says is what the client now believes.
                        if let cc::Reply::Status(s) = reply {
                            match s.state {
                                cc::TxnState::Committed => self.client[k].2 = Some(Told::Committed),
                                cc::TxnState::Aborted => self.client[k].2 = Some(Told::Aborted),
                                _ => {}
                            }
                        }
                    }
                    None => {}
                },
                cc::Effect::PersistDecision { txn, record, synced } => {
                    let participants = record.participants.iter().map(|p| p.name.clone()).collect();
                    let fed = synced && cfg.mutation == Mutation::CoordinatorCommitsBeforeDurable;
                    self.coord.pending.push(CWrite::Decision { txn, participants, ended: record.ended, synced, fed });
                    if fed {
                        self.coord_input(cfg, cc::Input::Durable { txn });
                    }
                }
                cc::Effect::ForgetDecision { txn, horizon } => self.coord.pending.push(CWrite::Forget { txn, horizon }),
                cc::Effect::SendPrepare { txn, participant, payload, deadline, one_phase, .. } => {
                    let to = index(&participant);
                    self.obs.spans.entry(txn).or_default().insert(to);
                    if let Some(k) = payload.as_deref().and_then(txn_index) {
                        self.client[k].1 = Some(txn);
                    }
                    self.send(Msg::Prepare { to, txn, epoch: self.coord.epoch, payload, deadline: deadline.0, one_phase });
                }
                cc::Effect::PersistMarker { participant } => {
                    if cfg.mutation == Mutation::OnePhaseWithoutMarker {
                        self.coord_input(cfg, cc::Input::MarkerDurable { participant });
                    } else {
                        self.coord.pending.push(CWrite::Marker { participant: participant.as_str().to_owned() })
                    }
                }
                cc::Effect::ClearMarkers { participant, epochs } => {
                    self.coord.pending.push(CWrite::ClearMarkers { participant: participant.as_str().to_owned(), epochs })
                }
                cc::Effect::Collect { participant } => self.send(Msg::Recover { to: index(&participant), epoch: self.coord.epoch }),
                cc::Effect::SendDecision { txn, participant, decision, .. } => {
                    let commit = matches!(decision, cc::PhaseTwo::Commit(_));
                    self.send(Msg::Decision { to: index(&participant), txn, epoch: self.coord.epoch, commit });
                }
                cc::Effect::SetTimer { at, timer } => {
                    self.coord.timers.insert((at.0, timer));
                }
            }
        }
    }

    fn part_input(&mut self, cfg: &SimConfig, i: usize, input: pc::Input) {
        let effects = self.parts[i].core.step(UnixMillis(self.now), input);
        self.part_effects(cfg, i, effects);
    }

    fn part_effects(&mut self, cfg: &SimConfig, i: usize, effects: Vec<pc::Effect>) {
        for e in effects {
            match e {
                pc::Effect::Reply { req, reply } => match self.parts[i].serving.remove(&req) {
                    Some(PServing::Prepare(txn)) => {
                        let vote = match reply {
                            pc::Reply::Voted(v) => Ok(v.vote()),
                            other => Err(format!("{other:?}")),
                        };
                        self.send(Msg::Vote { from: i, txn, vote });
                    }
                    Some(PServing::Join(k)) => {
                        self.send(Msg::CallReply { from: i, k, ok: matches!(reply, pc::Reply::Joined { .. }) });
                    }
                    Some(PServing::Recover(epoch)) => {
                        let result = match reply {
                            pc::Reply::Recovered(txns) => Ok(txns),
                            other => Err(format!("{other:?}")),
                        };
                        self.send(Msg::Recovered { from: i, epoch, result });
                    }
                    Some(PServing::Decision { txn, unknown }) => {
                        let ok = match reply {
                            pc::Reply::Acked => Ok(()),
                            other => Err(format!("{other:?}")),
                        };
                        if unknown && ok.is_ok() && !self.obs.applied.contains_key(&(i, txn)) {
                            self.obs.tombstoned.insert((i, txn));
                        }
                        self.send(Msg::Ack { from: i, txn, ok });
                    }
                    None => {}
                },
                pc::Effect::Enlist { txn } => {
                    let incarnation = self.parts[i].incarnation;
                    self.send(Msg::Enlist { from: i, txn, incarnation })
                }
                pc::Effect::ResourcePrepare { txn, payload } => {
                    // The payload (or, for enlisted work, the id) names the
                    // configured transaction, which says whose resource
                    // refuses.
                    let k = payload.as_deref().and_then(txn_index).or_else(|| self.client.iter().position(|c| c.1 == Some(txn)));
                    let no = k.and_then(|k| cfg.txns.get(k)).and_then(|(_, no)| *no) == Some(i);
                    self.parts[i].resource.insert((txn, no));
                }
                pc::Effect::PersistPrepared { txn, record } => {
                    let fed = cfg.mutation == Mutation::ParticipantVotesBeforeDurable;
                    self.parts[i].pending.push(PWrite::Prepared { txn, record: from_record(&record), fed });
                    if fed {
                        self.part_input(cfg, i, pc::Input::Durable { txn });
                    }
                }
                pc::Effect::Apply { txn, commit, record, .. } => {
                    self.parts[i].pending.push(PWrite::Apply { txn, commit, record: record.as_ref().map(from_record) });
                }
                pc::Effect::QueryDecision { txn } => self.send(Msg::Query { from: i, txn }),
                pc::Effect::Forget { txn } => self.parts[i].pending.push(PWrite::Forget { txn }),
                pc::Effect::Release { txn, record } => self.parts[i].pending.push(PWrite::Release { txn, record: from_record(&record) }),
                pc::Effect::PersistFence { epoch, replaces, record } => {
                    self.parts[i].pending.push(PWrite::Fence { epoch, replaces, record: from_record(&record) })
                }
                pc::Effect::SetTimer { at, timer } => {
                    self.parts[i].timers.insert((at.0, timer));
                }
            }
        }
    }

    fn crash_coordinator(&mut self, cfg: &SimConfig) {
        // Callers of RPCs it was serving see them fail.
        let serving = std::mem::take(&mut self.coord.serving);
        for (_, s) in serving {
            match s {
                CServing::Client(k) => self.client[k].2 = Some(Told::Unknown),
                CServing::Query { from, txn } => self.send(Msg::QueryReply { to: from, txn, decision: Err("coordinator crashed".into()) }),
                CServing::Status(_) => {}
                CServing::Begin(k) => self.client[k].2 = Some(Told::Unknown),
                CServing::Enlist { from, txn, incarnation } => {
                    self.send(Msg::EnlistReply { to: from, incarnation, txn, result: Err("coordinator crashed".into()) })
                }
            }
        }
        self.coord.pending.clear();
        self.coord.timers.clear();
        self.coord.epoch += 1;
        let records: Vec<(TxnId, DecisionRecord)> = self
            .coord
            .durable
            .iter()
            .map(|(txn, (ps, ended))| {
                let participants = ps.iter().map(|n| LoggedParticipant { name: n.clone(), endpoint: endpoint(index_of(n)) }).collect();
                (*txn, DecisionRecord { participants, decided_unix_ms: self.now, ended: *ended })
            })
            .collect();
        self.coord.core = cc::Core::new(self.coord.epoch, coord_config());
        let mut effects = self.coord.core.recover(UnixMillis(self.now), records, self.coord.horizon);
        let markers = self.coord.markers.iter().map(|(e, p)| (*e, ParticipantName::new(p.clone()).expect("valid"))).collect();
        effects.extend(self.coord.core.recover_markers(markers));
        self.coord_effects(cfg, effects);
    }

    fn crash_participant(&mut self, cfg: &SimConfig, i: usize) {
        let serving = std::mem::take(&mut self.parts[i].serving);
        for (_, s) in serving {
            match s {
                PServing::Prepare(txn) => self.send(Msg::Vote { from: i, txn, vote: Err("participant crashed".into()) }),
                PServing::Decision { txn, .. } => self.send(Msg::Ack { from: i, txn, ok: Err("participant crashed".into()) }),
                PServing::Recover(epoch) => self.send(Msg::Recovered { from: i, epoch, result: Err("participant crashed".into()) }),
                PServing::Join(k) => self.send(Msg::CallReply { from: i, k, ok: false }),
            }
        }
        let p = &mut self.parts[i];
        p.pending.clear();
        p.timers.clear();
        p.resource.clear();
        p.core = pc::Core::new(part_config());
        p.incarnation += 1;
        let records = p.durable.iter().map(|(t, r)| (*t, to_record(*r))).collect();
        let effects = p.core.recover(UnixMillis(self.now), records);
        self.part_effects(cfg, i, effects);
    }

    /// The safety rules that hold in every state; each broken one is named.
    pub fn violations(&self) -> Vec<String> {
        let mut v = self.damage();
        let o = &self.obs;
        for (p, txn) in o.applied.keys() {
            // Validity: commit only if every participant durably prepared.
            if let Some(span) = o.spans.get(txn) {
                for q in span {
                    if !o.prepared.contains(&(*q, *txn)) {
                        v.push(format!("validity: {txn} committed at p{p} but p{q} never durably prepared"));
                    }
                }
            }
            // Durability of the decision: nothing commits without a durable
            // COMMIT record.
            if !o.commit_durable.contains(txn) {
                v.push(format!("durability: {txn} committed at p{p} without a durable decision"));
            }
        }
        for (k, (_, txn, told)) in self.client.iter().enumerate() {
            // (A transaction no participant joined commits with nothing to
            // force: no Prepare, no record to wait for.)
            if let (Some(txn), Some(Told::Committed)) = (txn, told)
                && !o.commit_durable.contains(txn)
                && o.spans.contains_key(txn)
            {
                v.push(format!("durability: client told txn{k} ({txn}) COMMITTED before the decision was durable"));
            }
        }
        v
    }

    /// The rules whose breach users would see — half-applied transactions,
    /// double applies, answers contradicted by the data, hanging prepares —
    /// without the bookkeeping rules (validity, durability) that
    /// [`World::violations`] adds. Mutation tests use these alone to show the
    /// damage a planted bug does, not just the broken precondition.
    pub fn damage(&self) -> Vec<String> {
        let mut v = Vec::new();
        let o = &self.obs;
        for ((p, txn), n) in &o.applied {
            // Idempotency: each transaction is applied at most once.
            if *n > 1 {
                v.push(format!("idempotency: {txn} applied {n} times at p{p}"));
            }
            // Agreement: no participant aborts what another committed.
            if let Some((q, _)) = o.aborted.iter().find(|(q, t)| t == txn && q != p) {
                v.push(format!("agreement: {txn} committed at p{p} and aborted at p{q}"));
            }
        }
        // What the client was told holds.
        for (k, (_, txn, told)) in self.client.iter().enumerate() {
            let (Some(txn), Some(told)) = (txn, told) else { continue };
            match told {
                Told::Committed if o.aborted.iter().any(|(_, t)| t == txn) => {
                    v.push(format!("stability: client told txn{k} ({txn}) COMMITTED but a participant aborted it"))
                }
                Told::Aborted if o.applied.keys().any(|(_, t)| t == txn) => {
                    v.push(format!("stability: client told txn{k} ({txn}) ABORTED but a participant committed it"))
                }
                _ => {}
            }
        }
        // No hanging: a Prepare after an acknowledged Abort takes no effect.
        if o.hanging {
            v.push("no hanging: a participant prepared a transaction after acknowledging its abort".into());
        }
        v
    }

    /// Delivers every message, lands every write, answers every resource
    /// and fires every timer — no faults — for at most `max_steps` steps.
    /// Returns the drained world and whether it ran out of work.
    pub fn fair_drain(&self, cfg: &SimConfig, max_steps: usize) -> (World, bool) {
        let mut w = self.clone();
        for _ in 0..max_steps {
            let mut acts = Vec::new();
            w.actions(cfg, false, &mut acts);
            // Prefer progress that is not a timer; start nothing new.
            let next = acts
                .iter()
                .find(|a| matches!(a, Action::LandCoordinator | Action::LandParticipant(_) | Action::Resource(..)))
                .or_else(|| acts.iter().find(|a| matches!(a, Action::Deliver(_))))
                .or_else(|| acts.iter().find(|a| matches!(a, Action::Timer)))
                .cloned();
            match next {
                Some(a) => {
                    w.step(cfg, &a);
                }
                None => return (w, true),
            }
        }
        (w, false)
    }

    /// After a fair drain: what is still unfinished (empty when every
    /// transaction ended everywhere).
    pub fn unfinished(&self, cfg: &SimConfig) -> Vec<String> {
        let mut v = Vec::new();
        if self.coord.core.unfinished() > 0 {
            v.push(format!("the coordinator holds {} unfinished transactions", self.coord.core.unfinished()));
        }
        for p in self.coord.core.uncollected() {
            v.push(format!("the coordinator never collected the one-phase outcomes of {p}"));
        }
        for (i, p) in self.parts.iter().enumerate() {
            let doubt = p.core.in_doubt();
            if !doubt.is_empty() {
                v.push(format!("p{i} is in doubt about {doubt:?}"));
            }
            for (txn, (state, .., one_phase)) in &p.durable {
                if *state == BranchState::Prepared as i32 {
                    v.push(format!("p{i} holds a PREPARED record of {txn}"));
                }
                if *one_phase {
                    v.push(format!("p{i} holds an unreleased one-phase commit of {txn}"));
                }
            }
        }
        // Every durable commit is applied by every participant of it.
        for txn in &self.obs.commit_durable {
            for q in self.obs.spans.get(txn).into_iter().flatten() {
                if !self.obs.applied.contains_key(&(*q, *txn)) {
                    v.push(format!("{txn} is decided commit but p{q} never applied it"));
                }
            }
        }
        let _ = cfg;
        v
    }

    /// True if some transaction committed at every participant.
    pub fn some_committed(&self) -> bool {
        self.obs.spans.iter().any(|(txn, span)| span.iter().all(|p| self.obs.applied.contains_key(&(*p, *txn))))
    }

    /// True if the client was told some transaction aborted.
    pub fn some_aborted(&self) -> bool {
        self.client.iter().any(|c| c.2 == Some(Told::Aborted))
    }
}

fn index_of(n: &str) -> usize {
    n.trim_start_matches('p').parse().unwrap_or(usize::MAX)
}

/// The configured transaction a payload ("txn<k>") belongs to.
fn txn_index(payload: &[u8]) -> Option<usize> {
    std::str::from_utf8(payload).ok()?.strip_prefix("txn")?.parse().ok()
}
