//! The `twopc.v1.Coordinator` gRPC service: thin handlers that validate and
//! decode each request into a domain input, hand it to the driver, and map
//! the core's reply to a response or a precise status.
//!
//! Nothing reaches the core unvalidated: malformed ids, names, endpoints,
//! oversize payloads and branch lists are refused here with
//! `INVALID_ARGUMENT` and a stable reason, and change no state.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use tonic::{Code, Request, Response, Status};
use twopc_proto::status::{aborted, error};
use twopc_proto::{Outcome, ParticipantName, TxnId, pb, reason, validate_endpoint};

use crate::core::{CoreError, ExecBranch, Input, ListFilter, Reply, TxnState, TxnStatus};
use crate::driver::Handle;
use crate::log::DecisionLog;

/// Limits on what a request may carry.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most branches in one Execute.
    pub max_branches: usize,
    /// Largest payload of one branch, in bytes.
    pub max_payload_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_branches: 64, max_payload_bytes: 64 * 1024 }
    }
}

/// Participant name → endpoint, as registered. Shared with the log so that
/// it survives restarts.
#[derive(Clone, Default)]
pub struct Registry {
    map: Arc<RwLock<HashMap<ParticipantName, String>>>,
}

impl Registry {
    /// A registry holding `entries`.
    pub fn new(entries: impl IntoIterator<Item = (ParticipantName, String)>) -> Self {
        Registry { map: Arc::new(RwLock::new(entries.into_iter().collect())) }
    }

    /// Where `name` is registered now, if it is.
    pub fn get(&self, name: &ParticipantName) -> Option<String> {
        self.map.read().ok()?.get(name).cloned()
    }

    /// True when `name` is not registered at `endpoint` yet.
    fn differs(&self, name: &ParticipantName, endpoint: &str) -> bool {
        self.get(name).as_deref() != Some(endpoint)
    }

    fn set(&self, name: &ParticipantName, endpoint: &str) {
        if let Ok(mut m) = self.map.write() {
            m.insert(name.clone(), endpoint.to_owned());
        }
    }
}

/// The Coordinator service.
#[derive(Clone)]
pub struct CoordinatorService {
    handle: Handle,
    registry: Registry,
    log: DecisionLog,
    limits: Limits,
    /// Set when the daemon drains: new transactions are refused, the ones
    /// already begun carry on.
    draining: Arc<AtomicBool>,
}

impl CoordinatorService {
    /// A service over a running driver.
    pub fn new(handle: Handle, registry: Registry, log: DecisionLog, limits: Limits) -> Self {
        CoordinatorService { handle, registry, log, limits, draining: Arc::default() }
    }

    /// The flag that makes the service refuse new transactions.
    pub fn draining(&self) -> Arc<AtomicBool> {
        self.draining.clone()
    }

    fn refuse_if_draining(&self) -> Result<(), Status> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(error(
                Code::Unavailable,
                reason::COORDINATOR_UNAVAILABLE,
                "the coordinator is draining and takes no new transactions",
            ));
        }
        Ok(())
    }

    async fn call(&self, make: impl FnOnce(u64) -> Input) -> Result<Reply, Status> {
        self.handle
            .call(make)
            .await
            .map_err(|_| error(Code::Unavailable, reason::COORDINATOR_UNAVAILABLE, "the coordinator is shutting down"))
    }
}

/// Parses a transaction id from a request field.
pub fn parse_txn(s: &str) -> Result<TxnId, Status> {
    s.parse::<TxnId>().map_err(|e| error(Code::InvalidArgument, reason::TXN_ID_MALFORMED, e.to_string()))
}

fn parse_name(s: &str) -> Result<ParticipantName, Status> {
    ParticipantName::new(s).map_err(|e| error(Code::InvalidArgument, reason::PARTICIPANT_NAME_INVALID, e.to_string()))
}

fn parse_endpoint(s: &str) -> Result<String, Status> {
    validate_endpoint(s).map_err(|e| error(Code::InvalidArgument, reason::ENDPOINT_INVALID, e))?;
    Ok(s.to_owned())
}

/// Maps a core refusal to its status.
pub fn core_error(e: &CoreError) -> Status {
    let (code, r) = match e {
        CoreError::NotFound(_) => (Code::NotFound, reason::TXN_NOT_FOUND),
        CoreError::EnlistmentClosed { .. } => (Code::FailedPrecondition, reason::ENLISTMENT_CLOSED),
        CoreError::AlreadyCommitted(_) => (Code::FailedPrecondition, reason::TXN_ALREADY_DECIDED),
        CoreError::TimeoutTooLong { .. } => (Code::InvalidArgument, reason::TIMEOUT_TOO_LONG),
        CoreError::Forgotten(_) => (Code::FailedPrecondition, reason::TXN_FORGOTTEN),
        CoreError::LogFailed(_) => (Code::Unavailable, reason::COORDINATOR_UNAVAILABLE),
        CoreError::OutcomeBeingCollected { .. } => (Code::Unavailable, reason::OUTCOME_BEING_COLLECTED),
        CoreError::OnePhaseInFlight(_) => (Code::FailedPrecondition, reason::TXN_ALREADY_DECIDED),
    };
    error(code, r, e.to_string())
}

/// A transaction's status on the wire.
/// A state named in a list filter; UNSPECIFIED and unknown values are
/// refused.
fn state_from_pb(value: i32) -> Result<TxnState, Status> {
    match pb::TxnState::try_from(value) {
        Ok(pb::TxnState::Active) => Ok(TxnState::Active),
        Ok(pb::TxnState::Preparing) => Ok(TxnState::Preparing),
        Ok(pb::TxnState::Deciding) => Ok(TxnState::Deciding),
        Ok(pb::TxnState::Committed) => Ok(TxnState::Committed),
        Ok(pb::TxnState::Aborted) => Ok(TxnState::Aborted),
        Ok(pb::TxnState::Forgotten) => Ok(TxnState::Forgotten),
        Ok(pb::TxnState::Unspecified) | Err(_) => {
            Err(error(Code::InvalidArgument, reason::STATE_INVALID, format!("no transaction state has the value {value}")))
        }
    }
}

fn status_pb(s: &TxnStatus) -> pb::StatusResponse {
    let state = match s.state {
        TxnState::Active => pb::TxnState::Active,
        TxnState::Preparing => pb::TxnState::Preparing,
        TxnState::Deciding => pb::TxnState::Deciding,
        TxnState::Committed => pb::TxnState::Committed,
        TxnState::Aborted => pb::TxnState::Aborted,
        TxnState::Forgotten => pb::TxnState::Forgotten,
    };
    pb::StatusResponse {
        txn_id: s.txn.to_string(),
        state: state as i32,
        abort_reason: s.abort_reason.as_ref().map(pb::AbortReason::from),
        participants: s
            .participants
            .iter()
            .map(|p| pb::ParticipantStatus {
                name: p.name.as_str().to_owned(),
                endpoint: p.endpoint.clone(),
                vote: match &p.vote {
                    None => pb::Vote::Unspecified,
                    Some(twopc_proto::Vote::Yes) => pb::Vote::Yes,
                    Some(twopc_proto::Vote::No(_)) => pb::Vote::No,
                    Some(twopc_proto::Vote::ReadOnly) => pb::Vote::ReadOnly,
                    Some(twopc_proto::Vote::Committed) => pb::Vote::Committed,
                } as i32,
                acknowledged: p.acknowledged,
                retries: p.retries,
            })
            .collect(),
        deadline_unix_ms: s.deadline.map(|d| d.0).unwrap_or_default(),
        finished: s.finished,
        presumed: s.presumed,
        age_ms: s.age_ms,
    }
}

fn unexpected(reply: &Reply) -> Status {
    Status::internal(format!("unexpected reply from the protocol core: {reply:?}"))
}

fn outcome(reply: Reply) -> Result<(TxnId, ()), Status> {
    match reply {
        Reply::Outcome { txn, outcome: Outcome::Committed } => Ok((txn, ())),
        Reply::Outcome { txn, outcome: Outcome::Aborted(r) } => Err(aborted(txn, &r)),
        Reply::Error(e) => Err(core_error(&e)),
        other => Err(unexpected(&other)),
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn begin(&self, request: Request<pb::BeginRequest>) -> Result<Response<pb::BeginResponse>, Status> {
        self.refuse_if_draining()?;
        let timeout_ms = request.get_ref().timeout_ms;
        match self.call(|req| Input::Begin { req, timeout_ms }).await? {
            Reply::Begun { txn, deadline } => {
                tracing::debug!(%txn, "begin");
                Ok(Response::new(pb::BeginResponse { txn_id: txn.to_string(), deadline_unix_ms: deadline.0 }))
            }
            Reply::Error(e) => Err(core_error(&e)),
            other => Err(unexpected(&other)),
        }
    }

    async fn enlist(&self, request: Request<pb::EnlistRequest>) -> Result<Response<pb::EnlistResponse>, Status> {
        let r = request.get_ref();
        let txn = parse_txn(&r.txn_id)?;
        let participant = parse_name(&r.participant)?;
        let endpoint = parse_endpoint(&r.endpoint)?;
        let (name, at) = (participant.clone(), endpoint.clone());
        let incarnation = r.incarnation;
        match self.call(|req| Input::Enlist { req, txn, participant, endpoint, incarnation }).await? {
            Reply::Enlisted { deadline } => {
                // Only an accepted enlistment updates the registry: a refused
                // one changes nothing.
                if self.registry.differs(&name, &at) {
                    match self.log.register(&name, &at).await {
                        Ok(()) => self.registry.set(&name, &at),
                        Err(e) => tracing::warn!(participant = %name, error = %e, "could not persist the participant registry entry"),
                    }
                }
                Ok(Response::new(pb::EnlistResponse { deadline_unix_ms: deadline.0 }))
            }
            Reply::Error(e) => Err(core_error(&e)),
            other => Err(unexpected(&other)),
        }
    }

    async fn commit(&self, request: Request<pb::CommitRequest>) -> Result<Response<pb::CommitResponse>, Status> {
        let txn = parse_txn(&request.get_ref().txn_id)?;
        let (txn, ()) = outcome(self.call(|req| Input::Commit { req, txn }).await?)?;
        Ok(Response::new(pb::CommitResponse { txn_id: txn.to_string(), outcome: pb::Outcome::Committed as i32 }))
    }

    async fn abort(&self, request: Request<pb::AbortRequest>) -> Result<Response<pb::AbortResponse>, Status> {
        let r = request.get_ref();
        let txn = parse_txn(&r.txn_id)?;
        let detail: String = r.reason.chars().take(512).collect();
        match self.call(|req| Input::Abort { req, txn, detail }).await? {
            Reply::Aborted { txn } => Ok(Response::new(pb::AbortResponse { txn_id: txn.to_string() })),
            Reply::Error(e) => Err(core_error(&e)),
            other => Err(unexpected(&other)),
        }
    }

    async fn execute(&self, request: Request<pb::ExecuteRequest>) -> Result<Response<pb::ExecuteResponse>, Status> {
        self.refuse_if_draining()?;
        let r = request.into_inner();
        if r.branches.is_empty() {
            return Err(error(Code::InvalidArgument, reason::BRANCHES_EMPTY, "execute needs at least one branch"));
        }
        if r.branches.len() > self.limits.max_branches {
            return Err(error(
                Code::InvalidArgument,
                reason::TOO_MANY_BRANCHES,
                format!("{} branches; at most {} are allowed", r.branches.len(), self.limits.max_branches),
            ));
        }
        let mut seen = BTreeSet::new();
        let mut branches = Vec::with_capacity(r.branches.len());
        for b in r.branches {
            let participant = parse_name(&b.participant)?;
            if b.payload.len() > self.limits.max_payload_bytes {
                return Err(error(
                    Code::InvalidArgument,
                    reason::PAYLOAD_TOO_LARGE,
                    format!(
                        "payload for {participant} has {} bytes; at most {} are allowed",
                        b.payload.len(),
                        self.limits.max_payload_bytes
                    ),
                ));
            }
            if !seen.insert(participant.clone()) {
                return Err(error(
                    Code::InvalidArgument,
                    reason::DUPLICATE_PARTICIPANT,
                    format!("participant {participant} is named twice"),
                ));
            }
            let endpoint = self.registry.get(&participant).ok_or_else(|| {
                error(
                    Code::NotFound,
                    reason::PARTICIPANT_UNKNOWN,
                    format!("no participant named {participant} has registered with this coordinator"),
                )
            })?;
            branches.push(ExecBranch { participant, endpoint, payload: b.payload });
        }
        let timeout_ms = r.timeout_ms;
        let (txn, ()) = outcome(self.call(|req| Input::Execute { req, branches, timeout_ms }).await?)?;
        Ok(Response::new(pb::ExecuteResponse { txn_id: txn.to_string(), outcome: pb::Outcome::Committed as i32 }))
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let txn = parse_txn(&request.get_ref().txn_id)?;
        match self.call(|req| Input::Status { req, txn }).await? {
            Reply::Status(s) => Ok(Response::new(status_pb(&s))),
            Reply::Error(e) => Err(core_error(&e)),
            other => Err(unexpected(&other)),
        }
    }

    async fn query_decision(&self, request: Request<pb::QueryDecisionRequest>) -> Result<Response<pb::QueryDecisionResponse>, Status> {
        let r = request.get_ref();
        let txn = parse_txn(&r.txn_id)?;
        if !r.participant.is_empty() {
            parse_name(&r.participant)?;
        }
        match self.call(|req| Input::QueryDecision { req, txn }).await? {
            Reply::Decision(d) => Ok(Response::new(pb::QueryDecisionResponse { decision: pb::Decision::from(d) as i32 })),
            Reply::Error(e) => Err(core_error(&e)),
            other => Err(unexpected(&other)),
        }
    }

    async fn register_participant(
        &self,
        request: Request<pb::RegisterParticipantRequest>,
    ) -> Result<Response<pb::RegisterParticipantResponse>, Status> {
        let r = request.get_ref();
        let name = parse_name(&r.participant)?;
        let endpoint = parse_endpoint(&r.endpoint)?;
        if self.registry.differs(&name, &endpoint) {
            self.log.register(&name, &endpoint).await.map_err(|e| {
                error(Code::Unavailable, reason::COORDINATOR_UNAVAILABLE, format!("could not persist the registration: {e}"))
            })?;
            self.registry.set(&name, &endpoint);
            tracing::info!(participant = %name, %endpoint, "participant registered");
        }
        Ok(Response::new(pb::RegisterParticipantResponse {}))
    }
}

/// The stream `Admin.Watch` answers with.
pub type EventStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::TxnEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::admin_server::Admin for CoordinatorService {
    type WatchStream = EventStream;

    async fn watch(&self, _request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        use futures::StreamExt;
        let events = tokio_stream::wrappers::BroadcastStream::new(self.handle.subscribe());
        // End the stream right after the first gap, with the error: a
        // subscriber that missed events must not believe it saw them all.
        let stream = events
            .map(|e| {
                e.map_err(|tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)| {
                    error(Code::ResourceExhausted, reason::WATCH_LAGGED, format!("the subscriber fell {n} events behind; subscribe again"))
                })
            })
            .scan(false, |ended, item| {
                let out = if *ended { None } else { Some(item) };
                *ended = out.as_ref().is_some_and(Result::is_err);
                std::future::ready(out)
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_transaction(&self, request: Request<pb::GetTransactionRequest>) -> Result<Response<pb::GetTransactionResponse>, Status> {
        let txn = parse_txn(&request.get_ref().txn_id)?;
        let status = match self.call(|req| Input::Status { req, txn }).await? {
            Reply::Status(s) => status_pb(&s),
            Reply::Error(e) => return Err(core_error(&e)),
            other => return Err(unexpected(&other)),
        };
        let unavailable = |_| error(Code::Unavailable, reason::COORDINATOR_UNAVAILABLE, "the coordinator is shutting down");
        let shown = self.handle.timeline(txn).await.map_err(unavailable)?.unwrap_or_default();
        Ok(Response::new(pb::GetTransactionResponse {
            status: Some(status),
            timeline: shown.events.iter().map(pb::TimelineEvent::from).collect(),
            recovered: shown.recovered,
            elided: shown.elided,
        }))
    }

    async fn get_log_stats(&self, _request: Request<pb::GetLogStatsRequest>) -> Result<Response<pb::LogStats>, Status> {
        let s = self.log.store().stats();
        Ok(Response::new(pb::LogStats { requests: s.requests, writes: s.writes, synced_writes: s.synced_writes }))
    }

    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        let r = request.get_ref();
        let in_doubt_only = r.in_doubt_only;
        let limit = if r.limit == 0 { 1000 } else { r.limit.min(100_000) as usize };
        let states = r.states.iter().map(|s| state_from_pb(*s)).collect::<Result<Vec<_>, _>>()?;
        let participant = if r.participant.is_empty() { None } else { Some(parse_name(&r.participant)?) };
        let filter = ListFilter { states, min_age_ms: r.min_age_ms, participant };
        match self.call(|req| Input::List { req, in_doubt_only, limit, filter }).await? {
            Reply::List(l) => Ok(Response::new(pb::ListTransactionsResponse {
                transactions: l.transactions.iter().map(status_pb).collect(),
                in_doubt: l.in_doubt as u64,
                oldest_in_doubt_ms: l.oldest_in_doubt_ms,
            })),
            Reply::Error(e) => Err(core_error(&e)),
            other => Err(unexpected(&other)),
        }
    }
}
