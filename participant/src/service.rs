//! The `twopc.v1.Participant` gRPC service the coordinator calls: thin
//! handlers that validate, hand the request to the driver, and map the
//! core's answer to a response or a precise status.
//!
//! `Deliver` carries many of those messages in one call (the coordinator
//! batches what it sends to one participant); each is handled exactly as
//! its own RPC would be, concurrently, and answered in order, a refusal as
//! the status its own RPC would have returned.
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
        CoreError::CoordinatorUnreachable { .. } => (Code::Unavailable, reason::COORDINATOR_UNAVAILABLE),
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

impl ParticipantService {
    async fn prepare_one(&self, r: pb::PrepareRequest) -> Result<pb::PrepareResponse, Status> {
        let txn = parse_txn(&r.txn_id)?;
        let (epoch, payload, deadline, one_phase) = (r.coordinator_epoch, r.payload, UnixMillis(r.deadline_unix_ms), r.one_phase);
        let span = tracing::debug_span!("branch_prepare", txn_id = %txn, participant = %self.name, one_phase, vote = tracing::field::Empty);
        let reply = self.call(|req| Input::Prepare { req, txn, epoch, payload, deadline, one_phase }).instrument(span.clone()).await?;
        match reply {
            Reply::Voted(v) => {
                let vote = v.vote();
                span.record("vote", tracing::field::debug(&vote));
                Ok(pb::PrepareResponse::from(&vote))
            }
            Reply::Error(e) => Err(core_error(&e)),
            other => Err(unexpected(&other)),
        }
    }

    async fn commit_one(&self, r: &pb::CommitBranchRequest) -> Result<pb::CommitBranchResponse, Status> {
        let txn = parse_txn(&r.txn_id)?;
        let epoch = r.coordinator_epoch;
        let span = tracing::debug_span!("branch_commit", txn_id = %txn, participant = %self.name);
        acked(self.call(|req| Input::Commit { req, txn, epoch }).instrument(span).await?)?;
        Ok(pb::CommitBranchResponse {})
    }

    async fn abort_one(&self, r: &pb::AbortBranchRequest) -> Result<pb::AbortBranchResponse, Status> {
        let txn = parse_txn(&r.txn_id)?;
        let epoch = r.coordinator_epoch;
        let span = tracing::debug_span!("branch_abort", txn_id = %txn, participant = %self.name);
        acked(self.call(|req| Input::Abort { req, txn, epoch }).instrument(span).await?)?;
        Ok(pb::AbortBranchResponse {})
    }

    /// One message of a Deliver batch, under the sender's trace context.
    async fn deliver_one(&self, envelope: pb::Envelope) -> pb::Delivered {
        use pb::delivered::Body as Out;
        use pb::envelope::Body as In;
        let span = tracing::debug_span!("delivered_message", participant = %self.name);
        twopc_telemetry::propagation::set_parent_from_map(&span, &envelope.trace_context);
        let result = async {
            match envelope.body {
                Some(In::Prepare(r)) => self.prepare_one(r).await.map(Out::Prepare),
                Some(In::Commit(r)) => self.commit_one(&r).await.map(Out::Commit),
                Some(In::Abort(r)) => self.abort_one(&r).await.map(Out::Abort),
                None => Err(error(Code::InvalidArgument, reason::MESSAGE_EMPTY, "an envelope carried no Prepare, Commit or Abort")),
            }
        }
        .instrument(span)
        .await;
        let body = result.unwrap_or_else(|s| {
            Out::Refused(pb::Refusal {
                code: s.code() as i32,
                message: s.message().to_owned(),
                reason: twopc_proto::status::reason(&s).unwrap_or_default(),
            })
        });
        pb::Delivered { index: 0, body: Some(body) }
    }
}

#[tonic::async_trait]
impl pb::participant_server::Participant for ParticipantService {
    async fn prepare(&self, request: Request<pb::PrepareRequest>) -> Result<Response<pb::PrepareResponse>, Status> {
        self.prepare_one(request.into_inner()).await.map(Response::new)
    }

    async fn commit(&self, request: Request<pb::CommitBranchRequest>) -> Result<Response<pb::CommitBranchResponse>, Status> {
        self.commit_one(request.get_ref()).await.map(Response::new)
    }

    async fn abort(&self, request: Request<pb::AbortBranchRequest>) -> Result<Response<pb::AbortBranchResponse>, Status> {
        self.abort_one(request.get_ref()).await.map(Response::new)
    }

    async fn recover(&self, request: Request<pb::RecoverRequest>) -> Result<Response<pb::RecoverResponse>, Status> {
        let epoch = request.get_ref().coordinator_epoch;
        if epoch == 0 {
            return Err(error(Code::InvalidArgument, reason::EPOCH_INVALID, "coordinator_epoch must be at least 1"));
        }
        let span = tracing::info_span!("branch_recover", participant = %self.name, coordinator_epoch = epoch);
        match self.call(|req| Input::Recover { req, epoch }).instrument(span).await? {
            Reply::Recovered(txns) => {
                Ok(Response::new(pb::RecoverResponse { committed_one_phase: txns.iter().map(|t| t.to_string()).collect() }))
            }
            Reply::Error(e) => Err(core_error(&e)),
            other => Err(unexpected(&other)),
        }
    }

    type DeliverStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::Delivered, Status>> + Send>>;

    async fn deliver(&self, request: Request<pb::DeliverRequest>) -> Result<Response<Self::DeliverStream>, Status> {
        use futures::StreamExt;
        let messages = request.into_inner().messages;
        if messages.len() > twopc_proto::MAX_DELIVER_BATCH {
            return Err(error(
                Code::InvalidArgument,
                reason::BATCH_TOO_LARGE,
                format!("{} messages in one Deliver; at most {}", messages.len(), twopc_proto::MAX_DELIVER_BATCH),
            ));
        }
        // All at once, as separate calls would run (a batch of Prepares
        // shares one group-commit fsync); each answer goes back as soon as
        // it is ready.
        let n = messages.len().max(1);
        let this = self.clone();
        let answers = futures::stream::iter(messages.into_iter().enumerate())
            .map(move |(index, m)| {
                let this = this.clone();
                async move {
                    let mut d = this.deliver_one(m).await;
                    d.index = u32::try_from(index).unwrap_or(u32::MAX);
                    Ok(d)
                }
            })
            .buffer_unordered(n);
        Ok(Response::new(Box::pin(answers)))
    }
}
