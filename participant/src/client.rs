//! The initiator's API: begin, run business calls under the transaction,
//! commit; or run a one-shot Execute.
//!
//! What an initiator is told is exactly one of: committed; aborted, with the
//! reason; or — only when the coordinator could not be reached to learn it —
//! [`ClientError::OutcomeUnknown`], which names the transaction so that its
//! outcome can be asked for with [`TxnClient::status`]. A timeout is never
//! reported as a failure of the transaction. Commit is idempotent at the
//! coordinator, so transport failures during Commit are retried a few times
//! before the outcome is reported unknown.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use twopc_proto::pb::coordinator_client::CoordinatorClient;
use twopc_proto::{AbortReason, Outcome, TxnId, UnixMillis, pb, status};

use crate::context::TxnInterceptor;

/// Errors of the initiator API, other than an aborted outcome (which is an
/// [`Outcome`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator refused the request (bad input, unknown id, …). The
    /// status carries the code and a stable reason.
    #[error("refused by the coordinator: {}", .0.message())]
    Refused(Status),
    /// The coordinator could not be reached; nothing was started.
    #[error("cannot reach the coordinator: {0}")]
    Unavailable(String),
    /// Commit was sent but its answer was lost; the transaction committed or
    /// aborted, and `TxnClient::status` tells which.
    #[error("the outcome of {txn} is unknown ({why}); ask with status {txn}")]
    OutcomeUnknown {
        /// The transaction to ask about.
        txn: TxnId,
        /// What went wrong.
        why: String,
    },
    /// The coordinator's answer did not parse.
    #[error("malformed answer from the coordinator: {0}")]
    Protocol(String),
}

/// A request carrying the trace context of the caller's current span, so
/// the coordinator's work for it joins the initiator's trace.
fn traced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    twopc_telemetry::propagation::inject_current(&mut request);
    request
}

fn transient(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded)
}

/// A connection to the coordinator for initiators. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TxnClient {
    inner: CoordinatorClient<Channel>,
}

/// The result of a transaction that reached an outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The transaction.
    pub txn: TxnId,
    /// What happened to it.
    pub outcome: Outcome,
}

impl TxnClient {
    /// Connects lazily to the coordinator at `endpoint` (`http://host:port`).
    pub fn connect_lazy(endpoint: &str) -> Result<Self, ClientError> {
        twopc_proto::validate_endpoint(endpoint).map_err(ClientError::Unavailable)?;
        let ep = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| ClientError::Unavailable(e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            // A silently dropped connection is noticed, so a Commit waiting
            // on it ends as "outcome unknown" instead of hanging.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(Self::new(ep.connect_lazy()))
    }

    /// A client over an existing channel.
    pub fn new(channel: Channel) -> Self {
        TxnClient { inner: CoordinatorClient::new(channel) }
    }

    /// The generated client, for calls this API does not wrap.
    pub fn raw(&self) -> CoordinatorClient<Channel> {
        self.inner.clone()
    }

    /// Begins a transaction that must be committed within `timeout`.
    pub async fn begin(&self, timeout: Duration) -> Result<Transaction, ClientError> {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1);
        let r = self
            .inner
            .clone()
            .begin(traced(pb::BeginRequest { timeout_ms: ms }))
            .await
            .map_err(|s| if transient(&s) { ClientError::Unavailable(s.message().to_owned()) } else { ClientError::Refused(s) })?;
        let r = r.into_inner();
        let id = r.txn_id.parse::<TxnId>().map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(Transaction { id, deadline: UnixMillis(r.deadline_unix_ms), client: self.clone() })
    }

    /// Runs a one-shot transaction: each branch is a registered participant
    /// and its payload.
    pub async fn execute<N: Into<String>, P: Into<Vec<u8>>>(
        &self,
        branches: impl IntoIterator<Item = (N, P)>,
        timeout: Duration,
    ) -> Result<Finished, ClientError> {
        let branches = branches.into_iter().map(|(n, p)| pb::Branch { participant: n.into(), payload: p.into() }).collect();
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1);
        match self.inner.clone().execute(traced(pb::ExecuteRequest { branches, timeout_ms: ms })).await {
            Ok(r) => {
                let txn = r.get_ref().txn_id.parse::<TxnId>().map_err(|e| ClientError::Protocol(e.to_string()))?;
                Ok(Finished { txn, outcome: Outcome::Committed })
            }
            Err(s) => match (status::aborted_txn(&s), status::abort_reason(&s)) {
                (Some(txn), Some(reason)) => Ok(Finished { txn, outcome: Outcome::Aborted(reason) }),
                // Execute has no id to ask about before it answers, so a
                // lost answer is reported as unavailable with the cause.
                _ if transient(&s) => Err(ClientError::Unavailable(format!("{} (the outcome may be unknown)", s.message()))),
                _ => Err(ClientError::Refused(s)),
            },
        }
    }

    /// What the coordinator knows about `txn`.
    pub async fn status(&self, txn: TxnId) -> Result<pb::StatusResponse, ClientError> {
        self.inner
            .clone()
            .status(traced(pb::StatusRequest { txn_id: txn.to_string() }))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| if transient(&s) { ClientError::Unavailable(s.message().to_owned()) } else { ClientError::Refused(s) })
    }
}

/// A transaction begun by this initiator.
#[derive(Debug, Clone)]
pub struct Transaction {
    id: TxnId,
    deadline: UnixMillis,
    client: TxnClient,
}

impl Transaction {
    /// Its id.
    pub fn id(&self) -> TxnId {
        self.id
    }

    /// Its deadline.
    pub fn deadline(&self) -> UnixMillis {
        self.deadline
    }

    /// An interceptor that carries this transaction to the services called
    /// through a client built with it, e.g.
    /// `WalletClient::with_interceptor(channel, txn.interceptor())`.
    pub fn interceptor(&self) -> TxnInterceptor {
        TxnInterceptor::new(self.id)
    }

    /// Commits: runs two-phase commit over every participant that joined.
    pub async fn commit(&self) -> Result<Outcome, ClientError> {
        let mut delay = Duration::from_millis(50);
        let mut last = String::new();
        for _ in 0..5 {
            match self.client.inner.clone().commit(traced(pb::CommitRequest { txn_id: self.id.to_string() })).await {
                Ok(_) => return Ok(Outcome::Committed),
                Err(s) => {
                    if let Some(reason) = status::abort_reason(&s) {
                        return Ok(Outcome::Aborted(reason));
                    }
                    if !transient(&s) {
                        return Err(ClientError::Refused(s));
                    }
                    last = s.message().to_owned();
                }
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        Err(ClientError::OutcomeUnknown { txn: self.id, why: last })
    }

    /// Aborts (allowed until the transaction is decided).
    pub async fn abort(&self, reason: &str) -> Result<(), ClientError> {
        self.client
            .inner
            .clone()
            .abort(traced(pb::AbortRequest { txn_id: self.id.to_string(), reason: reason.to_owned() }))
            .await
            .map(|_| ())
            .map_err(|s| if transient(&s) { ClientError::Unavailable(s.message().to_owned()) } else { ClientError::Refused(s) })
    }
}

/// Why an outcome aborted, for printing.
pub fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Committed => "committed".to_owned(),
        Outcome::Aborted(r) => format!("aborted: {}", AbortReason::to_string(r)),
    }
}
