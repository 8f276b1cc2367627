//! The `twopc.v1` wire contract and the protocol's domain types.
//!
//! This crate does no IO. It holds:
//! - the code generated from `proto/twopc/v1/*.proto` ([`pb`] for the gRPC
//!   services, [`logpb`] for the records both roles keep in their logs);
//! - the domain types the protocol cores speak ([`TxnId`],
//!   [`ParticipantName`], [`Vote`], [`Outcome`], [`AbortReason`],
//!   [`Decision`]) and their conversions to and from the wire;
//! - the stable error reasons ([`reason`]) every gRPC status carries.
//!
//! Invariant kept here: every value that crosses a process boundary is parsed
//! into a domain type with a precise error before any core sees it.

use std::fmt;
use std::str::FromStr;

/// Generated messages and tonic clients/servers of package `twopc.v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("twopc.v1");
}

/// Generated log records of package `twopc.log.v1`.
#[allow(missing_docs, clippy::all)]
pub mod logpb {
    tonic::include_proto!("twopc.log.v1");
}

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("twopc_descriptor");

/// The `google.rpc.ErrorInfo` domain of every error this project returns.
pub const ERROR_DOMAIN: &str = "twopc.v1";

/// gRPC metadata key that carries the transaction id from an initiator to the
/// services it calls.
pub const TXN_METADATA_KEY: &str = "twopc-txn";

/// Stable `ErrorInfo.reason` strings. Clients match on these, so they never
/// change meaning.
pub mod reason {
    /// The transaction id is not of the form `tx-<epoch>-<seq>`.
    pub const TXN_ID_MALFORMED: &str = "TXN_ID_MALFORMED";
    /// The coordinator never issued this id.
    pub const TXN_NOT_FOUND: &str = "TXN_NOT_FOUND";
    /// The transaction no longer accepts participants.
    pub const ENLISTMENT_CLOSED: &str = "ENLISTMENT_CLOSED";
    /// The transaction is already decided the other way.
    pub const TXN_ALREADY_DECIDED: &str = "TXN_ALREADY_DECIDED";
    /// A participant name is empty, too long or has characters outside
    /// `[A-Za-z0-9._-]`.
    pub const PARTICIPANT_NAME_INVALID: &str = "PARTICIPANT_NAME_INVALID";
    /// An endpoint is not an `http://` or `https://` URL.
    pub const ENDPOINT_INVALID: &str = "ENDPOINT_INVALID";
    /// Execute named a participant the coordinator does not know.
    pub const PARTICIPANT_UNKNOWN: &str = "PARTICIPANT_UNKNOWN";
    /// Execute had no branches.
    pub const BRANCHES_EMPTY: &str = "BRANCHES_EMPTY";
    /// Execute had more branches than allowed.
    pub const TOO_MANY_BRANCHES: &str = "TOO_MANY_BRANCHES";
    /// Execute named the same participant twice.
    pub const DUPLICATE_PARTICIPANT: &str = "DUPLICATE_PARTICIPANT";
    /// A branch payload is larger than allowed.
    pub const PAYLOAD_TOO_LARGE: &str = "PAYLOAD_TOO_LARGE";
    /// The requested timeout is above the coordinator's maximum.
    pub const TIMEOUT_TOO_LONG: &str = "TIMEOUT_TOO_LONG";
    /// The transaction finished longer ago than the retention period.
    pub const TXN_FORGOTTEN: &str = "TXN_FORGOTTEN";
    /// A `Watch` subscriber fell too far behind and missed events.
    pub const WATCH_LAGGED: &str = "WATCH_LAGGED";
    /// The coordinator is shutting down or its log failed.
    pub const COORDINATOR_UNAVAILABLE: &str = "COORDINATOR_UNAVAILABLE";
    /// A participant was asked to commit a branch it never prepared or
    /// already aborted.
    pub const BRANCH_NOT_PREPARED: &str = "BRANCH_NOT_PREPARED";
    /// A participant was asked to abort a branch it already committed.
    pub const BRANCH_COMMITTED: &str = "BRANCH_COMMITTED";
    /// The participant's own log failed; retry later.
    pub const PARTICIPANT_UNAVAILABLE: &str = "PARTICIPANT_UNAVAILABLE";
    /// A business request named a transaction the participant refuses to
    /// join (finished here, or enlistment refused by the coordinator).
    pub const JOIN_REFUSED: &str = "JOIN_REFUSED";
    /// A key is locked by another transaction past the wait bound.
    pub const LOCK_CONFLICT: &str = "LOCK_CONFLICT";
    /// A list filter names a transaction state that does not exist.
    pub const STATE_INVALID: &str = "STATE_INVALID";
    /// A Deliver batch carried more messages than allowed.
    pub const BATCH_TOO_LARGE: &str = "BATCH_TOO_LARGE";
    /// A Deliver envelope carried no message.
    pub const MESSAGE_EMPTY: &str = "MESSAGE_EMPTY";
    /// The coordinator restarted and is still collecting one-phase outcomes
    /// of its earlier runs from a participant: the outcome of a transaction
    /// of such a run is not known yet. Retry.
    pub const OUTCOME_BEING_COLLECTED: &str = "OUTCOME_BEING_COLLECTED";
    /// A coordinator epoch of 0 (epochs start at 1).
    pub const EPOCH_INVALID: &str = "EPOCH_INVALID";
}

/// Most messages one `Participant.Deliver` call may carry.
pub const MAX_DELIVER_BATCH: usize = 1024;

/// Milliseconds since the Unix epoch: the one clock that crosses processes
/// (deadlines), and the time the protocol cores are told in every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// The wall clock now.
    pub fn now() -> Self {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        UnixMillis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// This instant plus `ms`, saturating.
    pub fn plus(self, ms: u64) -> Self {
        UnixMillis(self.0.saturating_add(ms))
    }

    /// Milliseconds from `self` until `later`, zero if `later` is not later.
    pub fn until(self, later: UnixMillis) -> u64 {
        later.0.saturating_sub(self.0)
    }
}

/// A transaction id: the coordinator's epoch (persisted, raised at every
/// start) and a sequence number within it. Unique across coordinator
/// restarts; orders by creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxnId {
    /// The coordinator run that issued the id.
    pub epoch: u64,
    /// Position within that run, from 1.
    pub seq: u64,
}

/// Why a string is not a transaction id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed transaction id {0:?}: expected tx-<epoch>-<seq>")]
pub struct MalformedTxnId(pub String);

impl TxnId {
    /// The 16-byte key under which logs store the transaction: big-endian,
    /// so keys sort by creation.
    pub fn to_key(self) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&self.epoch.to_be_bytes());
        k[8..].copy_from_slice(&self.seq.to_be_bytes());
        k
    }

    /// Inverse of [`TxnId::to_key`]; `None` for a key of the wrong length.
    pub fn from_key(key: &[u8]) -> Option<Self> {
        let epoch = u64::from_be_bytes(key.get(..8)?.try_into().ok()?);
        let seq = u64::from_be_bytes(key.get(8..16)?.try_into().ok()?);
        (key.len() == 16).then_some(TxnId { epoch, seq })
    }
}

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tx-{}-{}", self.epoch, self.seq)
    }
}

impl FromStr for TxnId {
    type Err = MalformedTxnId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MalformedTxnId(s.chars().take(64).collect());
        let rest = s.strip_prefix("tx-").ok_or_else(bad)?;
        let (e, q) = rest.split_once('-').ok_or_else(bad)?;
        let num = |p: &str| -> Result<u64, MalformedTxnId> {
            // Canonical decimal only, so each id has exactly one spelling.
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || (p.len() > 1 && p.starts_with('0')) {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        let id = TxnId { epoch: num(e)?, seq: num(q)? };
        if id.epoch == 0 || id.seq == 0 {
            return Err(bad());
        }
        Ok(id)
    }
}

/// A participant's stable name: what Execute branches and logs refer to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ParticipantName(String);

/// Why a string is not a participant name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid participant name {0:?}: 1 to 64 characters of [A-Za-z0-9._-], starting with a letter or digit")]
pub struct InvalidParticipantName(pub String);

impl ParticipantName {
    /// Longest accepted name.
    pub const MAX_LEN: usize = 64;

    /// Validates and wraps a name.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidParticipantName> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            && name.as_bytes()[0].is_ascii_alphanumeric();
        if ok { Ok(ParticipantName(name)) } else { Err(InvalidParticipantName(name.chars().take(80).collect())) }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ParticipantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks that an endpoint is an absolute http(s) URL with a host, which is
/// all a tonic channel needs.
pub fn validate_endpoint(endpoint: &str) -> Result<(), String> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(|| format!("invalid endpoint {endpoint:?}: expected http://host:port"))?;
    if rest.is_empty() || rest.starts_with('/') || endpoint.len() > 512 || endpoint.chars().any(char::is_whitespace) {
        return Err(format!("invalid endpoint {endpoint:?}: expected http://host:port"));
    }
    Ok(())
}

/// A participant's answer to Prepare.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Vote {
    /// Durably prepared; will commit or abort as told.
    Yes,
    /// Refuses; the transaction must abort. Carries the reason.
    No(String),
    /// Changed nothing; needs no phase two.
    ReadOnly,
    /// The answer to a one-phase Prepare: prepared and committed in one
    /// durable write.
    Committed,
}

/// Why a transaction aborted, in a form initiators can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AbortCode {
    /// A participant voted NO.
    ParticipantVotedNo,
    /// A Prepare could not be delivered or failed at the participant.
    PrepareFailed,
    /// Not every vote arrived within the prepare timeout.
    PrepareTimeout,
    /// The transaction's deadline passed before it was decided.
    DeadlineExceeded,
    /// The initiator called Abort.
    AbortedByClient,
    /// The coordinator holds no record: it never decided commit (presumed
    /// abort), for example because it restarted first.
    PresumedAbort,
    /// A participant restarted after doing unprepared work for the
    /// transaction, so that work is lost.
    ParticipantRestarted,
    /// The coordinator was shutting down and the transaction was not decided
    /// by the end of its drain.
    CoordinatorShutdown,
}

impl AbortCode {
    /// The stable text form used on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            AbortCode::ParticipantVotedNo => "PARTICIPANT_VOTED_NO",
            AbortCode::PrepareFailed => "PREPARE_FAILED",
            AbortCode::PrepareTimeout => "PREPARE_TIMEOUT",
            AbortCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            AbortCode::AbortedByClient => "ABORTED_BY_CLIENT",
            AbortCode::PresumedAbort => "PRESUMED_ABORT",
            AbortCode::ParticipantRestarted => "PARTICIPANT_RESTARTED",
            AbortCode::CoordinatorShutdown => "COORDINATOR_SHUTDOWN",
        }
    }

    /// Inverse of [`AbortCode::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            AbortCode::ParticipantVotedNo,
            AbortCode::PrepareFailed,
            AbortCode::PrepareTimeout,
            AbortCode::DeadlineExceeded,
            AbortCode::AbortedByClient,
            AbortCode::PresumedAbort,
            AbortCode::ParticipantRestarted,
            AbortCode::CoordinatorShutdown,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// Why a transaction aborted: the code, the participant concerned and a
/// readable detail.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AbortReason {
    /// What kind of failure.
    pub code: AbortCode,
    /// The participant it concerns, if one.
    pub participant: Option<ParticipantName>,
    /// Free text for people.
    pub detail: String,
}

impl AbortReason {
    /// Longest detail kept: the reason travels in gRPC headers, which
    /// clients limit (16 KiB by default).
    pub const MAX_DETAIL: usize = 1024;

    /// A reason with no participant.
    pub fn new(code: AbortCode, detail: impl Into<String>) -> Self {
        AbortReason { code, participant: None, detail: bounded(detail.into()) }
    }

    /// A reason that concerns `participant`.
    pub fn at(code: AbortCode, participant: &ParticipantName, detail: impl Into<String>) -> Self {
        AbortReason { code, participant: Some(participant.clone()), detail: bounded(detail.into()) }
    }
}

fn bounded(mut detail: String) -> String {
    if detail.len() > AbortReason::MAX_DETAIL {
        let mut cut = AbortReason::MAX_DETAIL;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
        detail.push('…');
    }
    detail
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.participant, self.code) {
            (Some(p), AbortCode::ParticipantVotedNo) => write!(f, "{p} voted no: {}", self.detail),
            (Some(p), _) => write!(f, "{} at {p}: {}", self.code.as_str(), self.detail),
            (None, _) => write!(f, "{}: {}", self.code.as_str(), self.detail),
        }
    }
}

impl From<&AbortReason> for pb::AbortReason {
    fn from(r: &AbortReason) -> Self {
        pb::AbortReason {
            code: r.code.as_str().to_owned(),
            participant: r.participant.as_ref().map(|p| p.as_str().to_owned()).unwrap_or_default(),
            detail: r.detail.clone(),
        }
    }
}

impl TryFrom<&pb::AbortReason> for AbortReason {
    type Error = String;

    fn try_from(r: &pb::AbortReason) -> Result<Self, Self::Error> {
        let code = AbortCode::parse(&r.code).ok_or_else(|| format!("unknown abort code {:?}", r.code))?;
        let participant =
            if r.participant.is_empty() { None } else { Some(ParticipantName::new(r.participant.clone()).map_err(|e| e.to_string())?) };
        Ok(AbortReason { code, participant, detail: r.detail.clone() })
    }
}

/// The outcome of a transaction as an initiator learns it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Every participant will apply its work.
    Committed,
    /// No participant applies anything.
    Aborted(AbortReason),
}

/// What the coordinator answers a participant's QueryDecision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Decision {
    /// Not decided yet.
    Pending,
    /// Decided commit (durably).
    Commit,
    /// Decided abort, or presumed aborted.
    Abort,
}

impl From<Decision> for pb::Decision {
    fn from(d: Decision) -> Self {
        match d {
            Decision::Pending => pb::Decision::Pending,
            Decision::Commit => pb::Decision::Commit,
            Decision::Abort => pb::Decision::Abort,
        }
    }
}

impl From<&Vote> for pb::PrepareResponse {
    fn from(v: &Vote) -> Self {
        match v {
            Vote::Yes => pb::PrepareResponse { vote: pb::Vote::Yes as i32, reason: String::new() },
            Vote::No(r) => pb::PrepareResponse { vote: pb::Vote::No as i32, reason: r.clone() },
            Vote::ReadOnly => pb::PrepareResponse { vote: pb::Vote::ReadOnly as i32, reason: String::new() },
            Vote::Committed => pb::PrepareResponse { vote: pb::Vote::Committed as i32, reason: String::new() },
        }
    }
}

impl TryFrom<&pb::PrepareResponse> for Vote {
    type Error = String;

    fn try_from(r: &pb::PrepareResponse) -> Result<Self, Self::Error> {
        match pb::Vote::try_from(r.vote) {
            Ok(pb::Vote::Yes) => Ok(Vote::Yes),
            Ok(pb::Vote::No) => Ok(Vote::No(r.reason.clone())),
            Ok(pb::Vote::ReadOnly) => Ok(Vote::ReadOnly),
            Ok(pb::Vote::Committed) => Ok(Vote::Committed),
            _ => Err(format!("participant sent an unknown vote {}", r.vote)),
        }
    }
}

/// gRPC statuses with stable reasons, and the one status that is not an
/// error: ABORTED, which carries a transaction's abort reason.
pub mod status {
    use std::collections::HashMap;

    use tonic::{Code, Status};
    use tonic_types::{ErrorDetails, StatusExt};

    use crate::{AbortCode, AbortReason, ERROR_DOMAIN, ParticipantName, TxnId};

    /// A status with `code`, a readable message and an ErrorInfo carrying the
    /// stable `reason`.
    pub fn error(code: Code, reason: &str, message: impl Into<String>) -> Status {
        let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::<String, String>::new());
        Status::with_error_details(code, message, details)
    }

    /// The stable reason of a status made by [`error`] or [`aborted`].
    pub fn reason(status: &Status) -> Option<String> {
        status.get_error_details().error_info().map(|i| i.reason.clone())
    }

    /// The status that reports an aborted outcome of Commit or Execute.
    pub fn aborted(txn: TxnId, reason: &AbortReason) -> Status {
        let mut meta = HashMap::new();
        meta.insert("txn_id".to_owned(), txn.to_string());
        meta.insert("detail".to_owned(), reason.detail.clone());
        if let Some(p) = &reason.participant {
            meta.insert("participant".to_owned(), p.as_str().to_owned());
        }
        let details = ErrorDetails::with_error_info(reason.code.as_str(), ERROR_DOMAIN, meta);
        Status::with_error_details(Code::Aborted, format!("transaction {txn} aborted: {reason}"), details)
    }

    /// The transaction an aborted-outcome status is about.
    pub fn aborted_txn(status: &Status) -> Option<TxnId> {
        if status.code() != Code::Aborted {
            return None;
        }
        status.get_error_details().error_info()?.metadata.get("txn_id")?.parse().ok()
    }

    /// Reads an aborted outcome back from a status made by [`aborted`].
    /// `None` when the status is not such an outcome (a real error).
    pub fn abort_reason(status: &Status) -> Option<AbortReason> {
        if status.code() != Code::Aborted {
            return None;
        }
        let details = status.get_error_details();
        let info = details.error_info()?;
        if info.domain != ERROR_DOMAIN {
            return None;
        }
        let code = AbortCode::parse(&info.reason)?;
        let participant = info.metadata.get("participant").and_then(|p| ParticipantName::new(p.clone()).ok());
        let detail = info.metadata.get("detail").cloned().unwrap_or_default();
        Some(AbortReason { code, participant, detail })
    }
}

/// The next value of a deterministic pseudo-random sequence (xorshift64*):
/// the protocol cores' retry jitter, seeded, so that runs replay. `state`
/// must not be 0.
pub fn jitter(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_id_round_trips_text_and_key() {
        let id = TxnId { epoch: 7, seq: 1234 };
        assert_eq!(id.to_string(), "tx-7-1234");
        assert_eq!("tx-7-1234".parse::<TxnId>(), Ok(id));
        assert_eq!(TxnId::from_key(&id.to_key()), Some(id));
        assert!(TxnId { epoch: 1, seq: 2 }.to_key() < TxnId { epoch: 2, seq: 1 }.to_key());
    }

    #[test]
    fn txn_id_rejects_every_non_canonical_spelling() {
        for bad in [
            "",
            "tx-",
            "tx-1",
            "tx-1-",
            "tx--1",
            "tx-01-2",
            "tx-1-02",
            "tx-0-1",
            "tx-1-0",
            "TX-1-2",
            "tx-1-2-3",
            "tx-+1-2",
            "tx-1-99999999999999999999",
            " tx-1-2",
        ] {
            assert!(bad.parse::<TxnId>().is_err(), "{bad:?} must be rejected");
        }
        assert_eq!(TxnId::from_key(&[0; 15]), None);
    }

    #[test]
    fn participant_names_are_validated() {
        assert!(ParticipantName::new("wallet").is_ok());
        assert!(ParticipantName::new("svc-1.eu_west").is_ok());
        for bad in ["", "-x", "a b", "é", &"x".repeat(65)] {
            assert!(ParticipantName::new(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn endpoints_are_validated() {
        assert!(validate_endpoint("http://127.0.0.1:5000").is_ok());
        for bad in ["", "127.0.0.1:5000", "http://", "http:///x", "ftp://h", "http://a b"] {
            assert!(validate_endpoint(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn aborted_status_round_trips() {
        let txn = TxnId { epoch: 1, seq: 2 };
        let p = ParticipantName::new("wallet").expect("valid");
        let r = AbortReason::at(AbortCode::ParticipantVotedNo, &p, "balance too low");
        let s = status::aborted(txn, &r);
        assert_eq!(s.code(), tonic::Code::Aborted);
        assert_eq!(status::abort_reason(&s), Some(r));
        assert_eq!(status::aborted_txn(&s), Some(txn));
        let e = status::error(tonic::Code::NotFound, reason::TXN_NOT_FOUND, "nope");
        assert_eq!(status::reason(&e).as_deref(), Some(reason::TXN_NOT_FOUND));
        assert_eq!(status::abort_reason(&e), None);
    }

    #[test]
    fn abort_codes_round_trip() {
        let r = AbortReason::new(AbortCode::PrepareTimeout, "x");
        let back = AbortReason::try_from(&pb::AbortReason::from(&r));
        assert_eq!(back, Ok(r));
    }
}
