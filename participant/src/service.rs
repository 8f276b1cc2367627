//! The `twopc.v1.Participant` gRPC service the coordinator calls: thin
//! handlers that validate, hand the request to the driver, and map the
//! core's answer to a response or a precise status.
//!
//! Each call runs in a span (`branch_prepare`, `branch_commit`,
//! `branch_abort`; DEBUG level) carrying the transaction id and the
//! participant's name, under the coordinator's call span when the request
//! came through the participant's layer with trace context.

use tonic::{Code, Request, Response, Status};
use tracing::Instrument;
use twopc_proto::status::error;
use twopc_proto::{ParticipantName, TxnId, UnixMillis, pb, reason};

use crate::core::{CoreError, Input, Reply};
use crate::driver::Handle;

/// The Participant service; mount it on the service's tonic server.
#[derive(Clone)]
pub struct ParticipantService {
    handle: Handle,
    name: ParticipantName,
}

impl ParticipantService {
    pub(crate) fn new(handle: Handle, name: ParticipantName) -> Self {
        ParticipantService { handle, name }
    }

    async fn call(&self, make: impl FnOnce(u64) -> Input) -> Result<Reply, Status> {
        self.handle
            .call(make)
            .await
            .map_err(|_| error(Code::Unavailable, reason::PARTICIPANT_UNAVAILABLE, "the participant is shutting down"))
    }
}

fn parse_txn(s: &str) -> Result<TxnId, Status> {
    s.parse::<TxnId>().map_err(|e| error(Code::InvalidArgument, reason::TXN_ID_MALFORMED, e.to_string()))
}

/// Maps a core refusal to its status.
pub fn core_error(e: &CoreError) -> Status {
    let (code, r) = match e {
        CoreError::JoinRefused { .. } => (Code::FailedPrecondition, reason::JOIN_REFUSED),
        CoreError::NotPrepared { .. } => (Code::FailedPrecondition, reason::BRANCH_NOT_PREPARED),
        CoreError::AlreadyCommitted(_) => (Code::FailedPrecondition, reason::BRANCH_COMMITTED),
        CoreError::Unavailable(_) => (Code::Unavailable, reason::PARTICIPANT_UNAVAILABLE),
    };
    error(code, r, e.to_string())
}

fn unexpected(r: &Reply) -> Status {
    Status::internal(format!("unexpected reply from the participant core: {r:?}"))
}

fn acked(r: Reply) -> Result<(), Status> {
    match r {
        Reply::Acked => Ok(()),
        Reply::Error(e) => Err(core_error(&e)),
        other => Err(unexpected(&other)),
    }
}

#[tonic::async_trait]
impl pb::participant_server::Participant for ParticipantService {
    async fn prepare(&self, request: Request<pb::PrepareRequest>) -> Result<Response<pb::PrepareResponse>, Status> {
        let r = request.into_inner();
        let txn = parse_txn(&r.txn_id)?;
        let (epoch, payload, deadline) = (r.coordinator_epoch, r.payload, UnixMillis(r.deadline_unix_ms));
        let span = tracing::debug_span!("branch_prepare", txn_id = %txn, participant = %self.name, vote = tracing::field::Empty);
        let reply = self.call(|req| Input::Prepare { req, txn, epoch, payload, deadline }).instrument(span.clone()).await?;
        match reply {
            Reply::Voted(v) => {
                let vote = v.vote();
                span.record("vote", tracing::field::debug(&vote));
                Ok(Response::new(pb::PrepareResponse::from(&vote)))
            }
            Reply::Error(e) => Err(core_error(&e)),
            other => Err(unexpected(&other)),
        }
    }

    async fn commit(&self, request: Request<pb::CommitBranchRequest>) -> Result<Response<pb::CommitBranchResponse>, Status> {
        let r = request.get_ref();
        let txn = parse_txn(&r.txn_id)?;
        let epoch = r.coordinator_epoch;
        let span = tracing::debug_span!("branch_commit", txn_id = %txn, participant = %self.name);
        acked(self.call(|req| Input::Commit { req, txn, epoch }).instrument(span).await?)?;
        Ok(Response::new(pb::CommitBranchResponse {}))
    }

    async fn abort(&self, request: Request<pb::AbortBranchRequest>) -> Result<Response<pb::AbortBranchResponse>, Status> {
        let r = request.get_ref();
        let txn = parse_txn(&r.txn_id)?;
        let epoch = r.coordinator_epoch;
        let span = tracing::debug_span!("branch_abort", txn_id = %txn, participant = %self.name);
        acked(self.call(|req| Input::Abort { req, txn, epoch }).instrument(span).await?)?;
        Ok(Response::new(pb::AbortBranchResponse {}))
    }
}
