//! Bad input gets a precise status with a stable reason, never a panic,
//! and changes nothing. One table per service, run against real servers
//! (the in-process harness: real tonic servers on loopback, real RocksDB).
//!
//! Every case names the exact gRPC code and the stable reason
//! (`google.rpc.ErrorInfo.reason`, the constants of `twopc_proto::reason`
//! or an abort code). Requests that are odd but legal (duplicates,
//! presumed-abort answers, acknowledgements) name the decisive field of
//! the OK response instead. A few requests never reach a handler: tonic
//! itself refuses them, without an ErrorInfo; those say so.
//!
//! After each table: committed data and held locks of every participant
//! are exactly as before, and the coordinator holds no new in-doubt
//! transaction.
//!
//! The coordinator has no Vote or Ack RPC: votes and acknowledgements are
//! responses to its own Prepare/Commit/Abort calls. "A vote from a
//! participant that is not enlisted" and "an ack for a transaction it never
//! had" therefore show up as what each side can actually receive: a
//! participant asked to prepare or commit a transaction it never had, and
//! the coordinator asked for a decision by a participant it never enlisted.

use std::collections::BTreeSet;
use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;
use twopc_examples::pb::DebitRequest;
use twopc_examples::pb::wallet_client::WalletClient;
use twopc_participant::Outcome;
use twopc_proto::pb as tp;
use twopc_proto::reason::*;
use twopc_proto::{AbortCode, TXN_METADATA_KEY, status};
use twopc_tests::{TestCoordinator, TestParticipant, cluster, eventually, settled};

/// What a case must answer.
#[derive(Debug)]
enum Want {
    /// An error status with this code and stable reason.
    Fail(Code, &'static str),
    /// Success, whose summary (see [`Summary`]) starts with this.
    Pass(&'static str),
    /// Refused by tonic before any handler runs, so without an ErrorInfo:
    /// this code, and a message containing this.
    Tonic(Code, &'static str),
}

struct Case {
    name: &'static str,
    want: Want,
    got: Result<String, tonic::Status>,
}

/// The decisive part of a successful response, as text.
trait Summary {
    fn summary(&self) -> String;
}

impl Summary for tp::GetTransactionResponse {
    fn summary(&self) -> String {
        let state = self.status.as_ref().map_or(0, |s| s.state);
        let state = tp::TxnState::try_from(state).map_or_else(|_| format!("state {state}"), |s| s.as_str_name().to_owned());
        format!("{state}, {} events", self.timeline.len())
    }
}

impl Summary for tp::RecoverResponse {
    fn summary(&self) -> String {
        format!("recovered {:?}", self.committed_one_phase)
    }
}

impl Summary for tp::BeginResponse {
    fn summary(&self) -> String {
        format!("begun {}", self.txn_id)
    }
}

impl Summary for tp::EnlistResponse {
    fn summary(&self) -> String {
        "enlisted".into()
    }
}

impl Summary for tp::CommitResponse {
    fn summary(&self) -> String {
        tp::Outcome::try_from(self.outcome).map_or_else(|_| format!("outcome {}", self.outcome), |o| o.as_str_name().to_owned())
    }
}

impl Summary for tp::ExecuteResponse {
    fn summary(&self) -> String {
        tp::Outcome::try_from(self.outcome).map_or_else(|_| format!("outcome {}", self.outcome), |o| o.as_str_name().to_owned())
    }
}

impl Summary for tp::AbortResponse {
    fn summary(&self) -> String {
        "aborted".into()
    }
}

impl Summary for tp::StatusResponse {
    fn summary(&self) -> String {
        let state = tp::TxnState::try_from(self.state).map_or("?", |s| s.as_str_name());
        let why = self.abort_reason.as_ref().map_or("", |r| r.code.as_str());
        format!("{state} {why}{}", if self.presumed { " presumed" } else { "" })
    }
}

impl Summary for tp::QueryDecisionResponse {
    fn summary(&self) -> String {
        tp::Decision::try_from(self.decision).map_or_else(|_| format!("decision {}", self.decision), |d| d.as_str_name().to_owned())
    }
}

impl Summary for tp::RegisterParticipantResponse {
    fn summary(&self) -> String {
        "registered".into()
    }
}

impl Summary for tp::ListTransactionsResponse {
    fn summary(&self) -> String {
        format!("{} in doubt", self.in_doubt)
    }
}

impl Summary for tp::PrepareResponse {
    fn summary(&self) -> String {
        let vote = tp::Vote::try_from(self.vote).map_or("?", |v| v.as_str_name());
        if self.reason.is_empty() { vote.to_owned() } else { format!("{vote}: {}", self.reason) }
    }
}

impl Summary for tp::CommitBranchResponse {
    fn summary(&self) -> String {
        "acked".into()
    }
}

impl Summary for tp::AbortBranchResponse {
    fn summary(&self) -> String {
        "acked".into()
    }
}

impl Summary for twopc_examples::pb::DebitResponse {
    fn summary(&self) -> String {
        format!("debited, balance {}", self.balance)
    }
}

fn got<T: Summary>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<String, tonic::Status> {
    r.map(|r| r.get_ref().summary())
}

/// `fails!(name, CODE, REASON, call)`: the call must fail with exactly that.
macro_rules! fails {
    ($name:expr, $code:ident, $reason:expr, $call:expr) => {
        Case { name: $name, want: Want::Fail(Code::$code, $reason), got: got($call.await) }
    };
}

/// `passes!(name, SUMMARY, call)`: the call must succeed with that summary.
macro_rules! passes {
    ($name:expr, $summary:expr, $call:expr) => {
        Case { name: $name, want: Want::Pass($summary), got: got($call.await) }
    };
}

/// `tonic_refuses!(name, CODE, MESSAGE PART, call)`: tonic refuses it.
macro_rules! tonic_refuses {
    ($name:expr, $code:ident, $part:expr, $call:expr) => {
        Case { name: $name, want: Want::Tonic(Code::$code, $part), got: got($call.await) }
    };
}

fn check(table: &str, cases: &[Case]) {
    let mut names = BTreeSet::new();
    let mut failures = Vec::new();
    for c in cases {
        assert!(names.insert(c.name), "{table}: case {:?} is listed twice", c.name);
        let ok = match (&c.want, &c.got) {
            (Want::Fail(code, reason), Err(s)) => {
                s.code() == *code && status::reason(s).as_deref() == Some(*reason) && !s.message().is_empty()
            }
            (Want::Tonic(code, part), Err(s)) => s.code() == *code && status::reason(s).is_none() && s.message().contains(part),
            (Want::Pass(summary), Ok(got)) => got.starts_with(summary),
            _ => false,
        };
        if !ok {
            let got = match &c.got {
                Ok(summary) => format!("OK {summary:?}"),
                Err(s) => format!("{:?}/{:?}: {}", s.code(), status::reason(s), s.message()),
            };
            failures.push(format!("{}: expected {:?}, got {got}", c.name, c.want));
        }
    }
    assert!(failures.is_empty(), "{table}: {} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    println!("{table}: {} cases passed", cases.len());
}

/// What bad input must not change.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    /// Every committed key and value, per participant.
    data: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Keys locked, per participant.
    locks: Vec<usize>,
    /// The coordinator's in-doubt transactions.
    in_doubt: BTreeSet<String>,
}

async fn snapshot(c: &TestCoordinator, ps: &[TestParticipant]) -> Snapshot {
    let mut admin = tp::admin_client::AdminClient::new(channel(&c.url()));
    let list = admin
        .list_transactions(tp::ListTransactionsRequest { in_doubt_only: true, limit: 0, ..Default::default() })
        .await
        .expect("list")
        .into_inner();
    Snapshot {
        data: ps.iter().map(|p| p.kv.scan(b"").expect("scan")).collect(),
        locks: ps.iter().map(|p| p.kv.locked_keys()).collect(),
        in_doubt: list.transactions.into_iter().map(|t| t.txn_id).collect(),
    }
}

fn assert_unchanged(before: &Snapshot, after: &Snapshot) {
    assert_eq!(before.data, after.data, "no refused request changed committed data");
    assert_eq!(before.locks, after.locks, "no refused request took or released a lock");
    let new: Vec<_> = after.in_doubt.difference(&before.in_doubt).collect();
    assert!(new.is_empty(), "no refused request left a transaction in doubt: {new:?}");
}

fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned()).expect("valid url").connect_lazy()
}

/// A coordinator in its second run (so ids of epoch 1 were issued by an
/// earlier run, which presumed them aborted) with participants `names`.
async fn second_run(names: &[&str], tune: impl Fn(&mut twopc_coordinator::Config)) -> (TestCoordinator, Vec<TestParticipant>) {
    let dir = TestCoordinator::start(&tune).await.stop().await;
    let c = TestCoordinator::start_in(dir, &tune).await;
    let mut ps = Vec::new();
    for n in names {
        ps.push(TestParticipant::start(n, &c.url()).await);
    }
    (c, ps)
}

fn begin_rq(timeout_ms: u64) -> tp::BeginRequest {
    tp::BeginRequest { timeout_ms }
}

fn commit_rq(id: &str) -> tp::CommitRequest {
    tp::CommitRequest { txn_id: id.into() }
}

fn abort_rq(id: &str) -> tp::AbortRequest {
    tp::AbortRequest { txn_id: id.into(), reason: String::new() }
}

fn status_rq(id: &str) -> tp::StatusRequest {
    tp::StatusRequest { txn_id: id.into() }
}

fn query_rq(id: &str, participant: &str) -> tp::QueryDecisionRequest {
    tp::QueryDecisionRequest { txn_id: id.into(), participant: participant.into() }
}

fn enlist_rq(id: &str, participant: &str, endpoint: &str) -> tp::EnlistRequest {
    tp::EnlistRequest { txn_id: id.into(), participant: participant.into(), endpoint: endpoint.into(), incarnation: 0 }
}

fn register_rq(participant: &str, endpoint: &str) -> tp::RegisterParticipantRequest {
    tp::RegisterParticipantRequest { participant: participant.into(), endpoint: endpoint.into() }
}

fn branch(participant: &str, payload: &[u8]) -> tp::Branch {
    tp::Branch { participant: participant.into(), payload: payload.to_vec() }
}

fn exec_rq(branches: Vec<tp::Branch>) -> tp::ExecuteRequest {
    tp::ExecuteRequest { branches, timeout_ms: 0 }
}

fn list_rq(in_doubt_only: bool, limit: u32) -> tp::ListTransactionsRequest {
    tp::ListTransactionsRequest { in_doubt_only, limit, ..Default::default() }
}

fn prepare_rq(id: &str, epoch: u64, payload: Option<&[u8]>, deadline_unix_ms: u64) -> tp::PrepareRequest {
    tp::PrepareRequest {
        txn_id: id.into(),
        coordinator_epoch: epoch,
        payload: payload.map(<[u8]>::to_vec),
        deadline_unix_ms,
        one_phase: false,
    }
}

fn commit_branch_rq(id: &str, epoch: u64) -> tp::CommitBranchRequest {
    tp::CommitBranchRequest { txn_id: id.into(), coordinator_epoch: epoch }
}

fn abort_branch_rq(id: &str, epoch: u64) -> tp::AbortBranchRequest {
    tp::AbortBranchRequest { txn_id: id.into(), coordinator_epoch: epoch }
}

/// A valid business request carrying `txn` as raw `twopc-txn` metadata
/// bytes, so that the layer alone decides.
fn debit_under(txn: &[u8]) -> tonic::Request<DebitRequest> {
    let mut req = tonic::Request::new(DebitRequest { account: "q".into(), amount: 1, order_id: "bad-input".into() });
    let value = tonic::metadata::AsciiMetadataValue::try_from(txn).expect("a header value");
    req.metadata_mut().insert(TXN_METADATA_KEY, value);
    req
}

const MAX_TIMEOUT_MS: u64 = 300_000;
const MAX_PAYLOAD: usize = 64 * 1024;

#[tokio::test]
async fn coordinator_refuses_bad_input_precisely() {
    let (c, ps) = second_run(&["wallet"], |_| {}).await;
    let mut raw = c.raw();
    let mut admin = tp::admin_client::AdminClient::new(channel(&c.url()));
    let mut wrong_service = tp::participant_client::ParticipantClient::new(channel(&c.url()));
    let ep = format!("http://{}", ps[0].addr);
    // An aborted and a committed transaction to misuse.
    let aborted = c.client().begin(Duration::from_secs(5)).await.expect("begin");
    aborted.abort("test").await.expect("abort");
    let committed = c.client().execute([("wallet", b"put a 1".to_vec())], Duration::from_secs(5)).await.expect("execute");
    assert_eq!(committed.outcome, Outcome::Committed);
    settled(&ps).await;
    let (aborted, committed) = (aborted.id().to_string(), committed.txn.to_string());
    let epoch = aborted.split('-').nth(1).and_then(|e| e.parse::<u64>().ok()).expect("epoch");
    assert!(epoch >= 2, "the coordinator is in its second run");
    // Issued by the earlier run, never committed: presumed aborted.
    let earlier = format!("tx-{}-7", epoch - 1);
    // Well-formed, never issued.
    let unissued = format!("tx-{epoch}-{}", u64::MAX);
    let (name64, name65) = ("n".repeat(64), "n".repeat(65));
    let ep513 = format!("http://{}", "h".repeat(506));
    assert_eq!(ep513.len(), 513);
    // Exactly the payload limit, read-only (a check padded with empty
    // statements): it must be accepted and change nothing.
    let mut at_limit = b"check a exists".to_vec();
    at_limit.resize(MAX_PAYLOAD, b';');
    let (over_limit, over_4mib) = (vec![b';'; MAX_PAYLOAD + 1], vec![b';'; 5 << 20]);
    let same_twice = vec![branch("wallet", b"put a 2"), branch("wallet", b"put a 3")];
    let case_apart = vec![branch("wallet", b"put a 2"), branch("Wallet", b"put a 3")];
    let many = |n: usize| (0..n).map(|i| branch(&format!("p{i}"), b"put a 2")).collect::<Vec<_>>();
    let one = |payload: &[u8]| exec_rq(vec![branch("wallet", payload)]);
    let too_long = tp::ExecuteRequest { branches: vec![branch("wallet", b"put a 2")], timeout_ms: MAX_TIMEOUT_MS + 1 };
    let before = snapshot(&c, &ps).await;

    let voted_no = AbortCode::ParticipantVotedNo.as_str();
    let cases = vec![
        // Begin
        fails!("begin timeout an hour", InvalidArgument, TIMEOUT_TOO_LONG, raw.begin(begin_rq(3_600_000))),
        fails!("begin timeout max + 1 ms", InvalidArgument, TIMEOUT_TOO_LONG, raw.begin(begin_rq(MAX_TIMEOUT_MS + 1))),
        fails!("begin timeout u64::MAX", InvalidArgument, TIMEOUT_TOO_LONG, raw.begin(begin_rq(u64::MAX))),
        // Commit: malformed ids
        fails!("commit missing id", InvalidArgument, TXN_ID_MALFORMED, raw.commit(tp::CommitRequest::default())),
        fails!("commit not an id", InvalidArgument, TXN_ID_MALFORMED, raw.commit(commit_rq("not-an-id"))),
        fails!("commit whitespace id", InvalidArgument, TXN_ID_MALFORMED, raw.commit(commit_rq("   "))),
        fails!("commit id with a newline", InvalidArgument, TXN_ID_MALFORMED, raw.commit(commit_rq("tx-1-1\n"))),
        fails!("commit epoch zero", InvalidArgument, TXN_ID_MALFORMED, raw.commit(commit_rq("tx-0-1"))),
        fails!("commit seq zero", InvalidArgument, TXN_ID_MALFORMED, raw.commit(commit_rq("tx-1-0"))),
        fails!("commit leading zeros", InvalidArgument, TXN_ID_MALFORMED, raw.commit(commit_rq("tx-01-1"))),
        fails!("commit seq overflows u64", InvalidArgument, TXN_ID_MALFORMED, raw.commit(commit_rq("tx-1-18446744073709551616"))),
        fails!("commit unicode digits", InvalidArgument, TXN_ID_MALFORMED, raw.commit(commit_rq("tx-\u{661}-\u{662}"))),
        fails!("commit upper case", InvalidArgument, TXN_ID_MALFORMED, raw.commit(commit_rq("TX-1-1"))),
        // Commit: unknown ids, out of order and duplicates
        fails!("commit unknown epoch", NotFound, TXN_NOT_FOUND, raw.commit(commit_rq("tx-999-1"))),
        fails!("commit seq never issued", NotFound, TXN_NOT_FOUND, raw.commit(commit_rq(&unissued))),
        fails!("commit id of an earlier run", Aborted, AbortCode::PresumedAbort.as_str(), raw.commit(commit_rq(&earlier))),
        fails!("commit aborted", Aborted, AbortCode::AbortedByClient.as_str(), raw.commit(commit_rq(&aborted))),
        passes!("commit committed again", "OUTCOME_COMMITTED", raw.commit(commit_rq(&committed))),
        // Abort
        fails!("abort malformed id", InvalidArgument, TXN_ID_MALFORMED, raw.abort(abort_rq("tx-1-"))),
        fails!("abort unknown id", NotFound, TXN_NOT_FOUND, raw.abort(abort_rq("tx-999-1"))),
        fails!("abort committed", FailedPrecondition, TXN_ALREADY_DECIDED, raw.abort(abort_rq(&committed))),
        passes!("abort aborted again", "aborted", raw.abort(abort_rq(&aborted))),
        passes!("abort id of an earlier run", "aborted", raw.abort(abort_rq(&earlier))),
        // Status
        fails!("status missing id", InvalidArgument, TXN_ID_MALFORMED, raw.status(tp::StatusRequest::default())),
        fails!("status leading zeros", InvalidArgument, TXN_ID_MALFORMED, raw.status(status_rq("tx-01-2"))),
        fails!("status unknown id", NotFound, TXN_NOT_FOUND, raw.status(status_rq("tx-999-5"))),
        passes!("status id of an earlier run", "TXN_STATE_ABORTED PRESUMED_ABORT presumed", raw.status(status_rq(&earlier))),
        // QueryDecision (what a participant asks; the coordinator answers
        // whoever asks, enlisted or not)
        fails!("query decision malformed id", InvalidArgument, TXN_ID_MALFORMED, raw.query_decision(query_rq("tx", "wallet"))),
        fails!("query decision bad name", InvalidArgument, PARTICIPANT_NAME_INVALID, raw.query_decision(query_rq(&committed, "bad name"))),
        passes!("query decision unknown txn, never enlisted", "DECISION_ABORT", raw.query_decision(query_rq(&unissued, "ghost"))),
        passes!("query decision committed, never enlisted", "DECISION_COMMIT", raw.query_decision(query_rq(&committed, "ghost"))),
        passes!("query decision without a name", "DECISION_ABORT", raw.query_decision(query_rq(&earlier, ""))),
        // Enlist: ids and order (valid name and endpoint: wallet's own, so
        // that the registry entry they refresh stays as it was)
        fails!("enlist missing fields", InvalidArgument, TXN_ID_MALFORMED, raw.enlist(tp::EnlistRequest::default())),
        fails!("enlist malformed id", InvalidArgument, TXN_ID_MALFORMED, raw.enlist(enlist_rq("tx-1-2-3", "wallet", &ep))),
        fails!("enlist unknown id", NotFound, TXN_NOT_FOUND, raw.enlist(enlist_rq("tx-999-1", "wallet", &ep))),
        fails!("enlist after abort", FailedPrecondition, ENLISTMENT_CLOSED, raw.enlist(enlist_rq(&aborted, "wallet", &ep))),
        fails!("enlist after commit", FailedPrecondition, ENLISTMENT_CLOSED, raw.enlist(enlist_rq(&committed, "wallet", &ep))),
        fails!("enlist id of an earlier run", FailedPrecondition, ENLISTMENT_CLOSED, raw.enlist(enlist_rq(&earlier, "wallet", &ep))),
        // Enlist: names and endpoints
        fails!("enlist empty name", InvalidArgument, PARTICIPANT_NAME_INVALID, raw.enlist(enlist_rq(&aborted, "", &ep))),
        fails!("enlist name with a space", InvalidArgument, PARTICIPANT_NAME_INVALID, raw.enlist(enlist_rq(&aborted, "bad name", &ep))),
        fails!("enlist name of 65 chars", InvalidArgument, PARTICIPANT_NAME_INVALID, raw.enlist(enlist_rq(&aborted, &name65, &ep))),
        fails!("enlist unicode name", InvalidArgument, PARTICIPANT_NAME_INVALID, raw.enlist(enlist_rq(&aborted, "w\u{e4}llet", &ep))),
        fails!("enlist name starting with a dash", InvalidArgument, PARTICIPANT_NAME_INVALID, raw.enlist(enlist_rq(&aborted, "-w", &ep))),
        fails!("enlist name of 64, no endpoint", InvalidArgument, ENDPOINT_INVALID, raw.enlist(enlist_rq(&aborted, &name64, ""))),
        fails!("enlist endpoint, no scheme", InvalidArgument, ENDPOINT_INVALID, raw.enlist(enlist_rq(&aborted, "wallet", "localhost:1"))),
        fails!("enlist endpoint ftp", InvalidArgument, ENDPOINT_INVALID, raw.enlist(enlist_rq(&aborted, "wallet", "ftp://x"))),
        fails!("enlist endpoint, no host", InvalidArgument, ENDPOINT_INVALID, raw.enlist(enlist_rq(&aborted, "wallet", "http://"))),
        fails!("enlist endpoint with a space", InvalidArgument, ENDPOINT_INVALID, raw.enlist(enlist_rq(&aborted, "wallet", "http://a b"))),
        fails!("enlist endpoint of 513 chars", InvalidArgument, ENDPOINT_INVALID, raw.enlist(enlist_rq(&aborted, "wallet", &ep513))),
        // Execute
        fails!("execute no branches", InvalidArgument, BRANCHES_EMPTY, raw.execute(exec_rq(vec![]))),
        fails!("execute empty participant", InvalidArgument, PARTICIPANT_NAME_INVALID, raw.execute(exec_rq(vec![branch("", b"put a 2")]))),
        fails!("execute unknown participant", NotFound, PARTICIPANT_UNKNOWN, raw.execute(exec_rq(vec![branch("ghost", b"put a 2")]))),
        fails!("execute duplicate participant", InvalidArgument, DUPLICATE_PARTICIPANT, raw.execute(exec_rq(same_twice))),
        // Names are case-sensitive: "Wallet" is another, unregistered name.
        fails!("execute names differing in case", NotFound, PARTICIPANT_UNKNOWN, raw.execute(exec_rq(case_apart))),
        fails!("execute 64 branches (count allowed)", NotFound, PARTICIPANT_UNKNOWN, raw.execute(exec_rq(many(64)))),
        fails!("execute 65 branches", InvalidArgument, TOO_MANY_BRANCHES, raw.execute(exec_rq(many(65)))),
        passes!("execute payload of exactly the limit", "OUTCOME_COMMITTED", raw.execute(one(&at_limit))),
        fails!("execute payload one byte over", InvalidArgument, PAYLOAD_TOO_LARGE, raw.execute(one(&over_limit))),
        fails!("execute timeout max + 1 ms", InvalidArgument, TIMEOUT_TOO_LONG, raw.execute(too_long)),
        fails!("execute unparsable payload", Aborted, voted_no, raw.execute(one(b"frobnicate a"))),
        fails!("execute empty payload", Aborted, voted_no, raw.execute(one(b""))),
        // Over tonic's default 4 MiB decoding limit: refused while decoding.
        tonic_refuses!("execute message over 4 MiB", OutOfRange, "message length too large", raw.execute(one(&over_4mib))),
        // RegisterParticipant
        fails!("register missing fields", InvalidArgument, PARTICIPANT_NAME_INVALID, raw.register_participant(register_rq("", ""))),
        fails!("register name of 65 chars", InvalidArgument, PARTICIPANT_NAME_INVALID, raw.register_participant(register_rq(&name65, &ep))),
        fails!("register bad endpoint", InvalidArgument, ENDPOINT_INVALID, raw.register_participant(register_rq("x", "ftp://h"))),
        passes!("register again, same endpoint", "registered", raw.register_participant(register_rq("wallet", &ep))),
        // Admin
        passes!("list with limit 0 (default)", "0 in doubt", admin.list_transactions(list_rq(false, 0))),
        passes!("list with limit u32::MAX", "0 in doubt", admin.list_transactions(list_rq(false, u32::MAX))),
        passes!("list in doubt with limit 1", "0 in doubt", admin.list_transactions(list_rq(true, 1))),
        fails!(
            "list by state UNSPECIFIED",
            InvalidArgument,
            STATE_INVALID,
            admin.list_transactions(tp::ListTransactionsRequest { states: vec![0], ..Default::default() })
        ),
        fails!(
            "list by state 99",
            InvalidArgument,
            STATE_INVALID,
            admin.list_transactions(tp::ListTransactionsRequest { states: vec![4, 99], ..Default::default() })
        ),
        fails!(
            "list by invalid participant",
            InvalidArgument,
            PARTICIPANT_NAME_INVALID,
            admin.list_transactions(tp::ListTransactionsRequest { participant: "a b".into(), ..Default::default() })
        ),
        passes!(
            "list by unknown participant",
            "0 in doubt",
            admin.list_transactions(tp::ListTransactionsRequest { participant: "nobody".into(), ..Default::default() })
        ),
        passes!(
            "list older than u64::MAX ms",
            "0 in doubt",
            admin.list_transactions(tp::ListTransactionsRequest { min_age_ms: u64::MAX, ..Default::default() })
        ),
        fails!(
            "show empty id",
            InvalidArgument,
            TXN_ID_MALFORMED,
            admin.get_transaction(tp::GetTransactionRequest { txn_id: String::new() })
        ),
        fails!(
            "show malformed id",
            InvalidArgument,
            TXN_ID_MALFORMED,
            admin.get_transaction(tp::GetTransactionRequest { txn_id: "tx-1".into() })
        ),
        fails!(
            "show never-issued id",
            NotFound,
            TXN_NOT_FOUND,
            admin.get_transaction(tp::GetTransactionRequest { txn_id: "tx-999-1".into() })
        ),
        // A vote sent to the coordinator: it has no such RPC.
        tonic_refuses!("prepare sent to the coordinator", Unimplemented, "", wrong_service.prepare(prepare_rq(&committed, epoch, None, 0))),
    ];
    check("coordinator", &cases);
    let detail = |name: &str| match &cases.iter().find(|c| c.name == name).expect("listed").got {
        Err(s) => status::abort_reason(s).map(|r| r.detail),
        Ok(_) => None,
    };
    assert_eq!(detail("commit aborted").as_deref(), Some("test"), "Commit of an aborted transaction reports its abort reason");
    settled(&ps).await;
    assert_unchanged(&before, &snapshot(&c, &ps).await);
    assert_eq!(ps[0].get("a").as_deref(), Some("1"));
    // Still serving.
    let done = c.client().execute([("wallet", b"put a 2".to_vec())], Duration::from_secs(5)).await.expect("execute");
    assert_eq!(done.outcome, Outcome::Committed);
}

#[tokio::test]
async fn participant_refuses_bad_input_precisely() {
    // Two phases throughout, so that the committed branch below was
    // prepared (a one-phase commit answers a repeated Prepare COMMITTED;
    // the participant core's tests cover it).
    let (c, ps) = second_run(&["wallet"], |c| c.one_phase = false).await;
    let mut p = tp::participant_client::ParticipantClient::new(ps[0].channel());
    let mut wallet = WalletClient::new(ps[0].channel());
    // A committed, an aborted and an active transaction (the active one
    // holds locks here through a business call).
    let seeded = c.client().execute([("wallet", b"put balance/q 10".to_vec())], Duration::from_secs(5)).await.expect("seed");
    assert_eq!(seeded.outcome, Outcome::Committed);
    settled(&ps).await;
    let aborted = c.client().begin(Duration::from_secs(5)).await.expect("begin");
    aborted.abort("test").await.expect("abort");
    let active = c.client().begin(Duration::from_secs(10)).await.expect("begin");
    WalletClient::with_interceptor(ps[0].channel(), active.interceptor())
        .debit(DebitRequest { account: "q".into(), amount: 1, order_id: "z".into() })
        .await
        .expect("debit");
    let epoch = active.id().epoch;
    assert!(epoch >= 2, "the coordinator is in its second run");
    let (committed, aborted, active_id) = (seeded.txn.to_string(), aborted.id().to_string(), active.id().to_string());
    // Ids this participant never saw. (Of the coordinator's own epoch: a
    // newer epoch would make the participant refuse this epoch's prepares
    // as stale.)
    let never = |seq: u32| format!("tx-{epoch}-{}", 99_990 + seq);
    let earlier = format!("tx-{}-7", epoch - 1);
    let unissued = format!("tx-{epoch}-{}", u64::MAX);
    let prep = |id: &str, payload: Option<&[u8]>, deadline: u64| prepare_rq(id, epoch, payload, deadline);
    let mut wrong_service = tp::coordinator_client::CoordinatorClient::new(ps[0].channel());
    let before = snapshot(&c, &ps).await;
    assert_eq!(before.locks, vec![2], "the active transaction holds balance/q and debit/z");

    let cases = vec![
        // Malformed ids
        fails!("prepare missing fields", InvalidArgument, TXN_ID_MALFORMED, p.prepare(tp::PrepareRequest::default())),
        fails!("prepare not an id", InvalidArgument, TXN_ID_MALFORMED, p.prepare(prep("x", None, 0))),
        fails!("prepare unicode digits", InvalidArgument, TXN_ID_MALFORMED, p.prepare(prep("tx-\u{ff11}-\u{ff11}", None, 0))),
        fails!("prepare epoch overflow", InvalidArgument, TXN_ID_MALFORMED, p.prepare(prep("tx-99999999999999999999-9", None, 0))),
        fails!("commit malformed id", InvalidArgument, TXN_ID_MALFORMED, p.commit(commit_branch_rq("tx-1", epoch))),
        fails!("commit epoch zero", InvalidArgument, TXN_ID_MALFORMED, p.commit(commit_branch_rq("tx-0-1", epoch))),
        fails!("abort missing id", InvalidArgument, TXN_ID_MALFORMED, p.abort(abort_branch_rq("", epoch))),
        fails!("abort leading zeros", InvalidArgument, TXN_ID_MALFORMED, p.abort(abort_branch_rq("tx-1-01", epoch))),
        fails!("recover epoch zero", InvalidArgument, EPOCH_INVALID, p.recover(tp::RecoverRequest { coordinator_epoch: 0 })),
        // Out of order and duplicates
        fails!("commit of an unprepared branch", FailedPrecondition, BRANCH_NOT_PREPARED, p.commit(commit_branch_rq(&active_id, epoch))),
        fails!("abort of a committed branch", FailedPrecondition, BRANCH_COMMITTED, p.abort(abort_branch_rq(&committed, epoch))),
        passes!("commit of a committed branch again", "acked", p.commit(commit_branch_rq(&committed, epoch))),
        passes!("prepare of a committed branch again", "VOTE_YES", p.prepare(prep(&committed, None, 0))),
        // "A vote from a participant that is not enlisted": asked to vote on
        // a transaction it never joined and holds no work for, it votes NO.
        passes!("prepare of a txn never joined", "VOTE_NO: this participant holds no", p.prepare(prep(&never(1), None, 0))),
        passes!("prepare of an earlier run's id", "VOTE_NO: stale transaction", p.prepare(prep(&earlier, Some(b"put stale 1"), 0))),
        passes!("prepare past its deadline", "VOTE_NO: the transaction's deadline", p.prepare(prep(&never(2), Some(b"put late 1"), 1))),
        passes!("prepare, unparsable payload", "VOTE_NO: bad payload: operation 1", p.prepare(prep(&never(3), Some(b"frobnicate a"), 0))),
        // "An ack for a transaction it never had": a Commit for a branch the
        // participant does not hold is answered as a duplicate whose branch
        // was forgotten after its retention.
        passes!("commit of a transaction never seen", "acked", p.commit(commit_branch_rq(&never(4), epoch))),
        // An Abort for a transaction never seen is acknowledged and leaves a
        // tombstone, so a late Prepare is refused and takes no lock.
        passes!("abort of a transaction never seen", "acked", p.abort(abort_branch_rq(&never(5), epoch))),
        passes!(
            "prepare after abort, no hanging",
            "VOTE_NO: the transaction was aborted",
            p.prepare(prep(&never(5), Some(b"put hang 1"), 0))
        ),
        fails!("commit after abort", FailedPrecondition, BRANCH_NOT_PREPARED, p.commit(commit_branch_rq(&never(5), epoch))),
        // The transaction layer, in front of a business call
        fails!("call with malformed twopc-txn", InvalidArgument, TXN_ID_MALFORMED, wallet.debit(debit_under(b"tx-nope"))),
        fails!("call with empty twopc-txn", InvalidArgument, TXN_ID_MALFORMED, wallet.debit(debit_under(b""))),
        fails!("call with non-ASCII twopc-txn", InvalidArgument, TXN_ID_MALFORMED, wallet.debit(debit_under(b"tx-1-\xc3\xa9"))),
        fails!("call under a never-issued id", FailedPrecondition, JOIN_REFUSED, wallet.debit(debit_under(unissued.as_bytes()))),
        fails!("call under an aborted transaction", FailedPrecondition, JOIN_REFUSED, wallet.debit(debit_under(aborted.as_bytes()))),
        fails!("call under a committed transaction", FailedPrecondition, JOIN_REFUSED, wallet.debit(debit_under(committed.as_bytes()))),
        fails!("call under an earlier run's id", FailedPrecondition, JOIN_REFUSED, wallet.debit(debit_under(earlier.as_bytes()))),
        fails!("call under a branch aborted here", FailedPrecondition, JOIN_REFUSED, wallet.debit(debit_under(never(5).as_bytes()))),
        // A coordinator call sent to a participant: it has no such RPC.
        tonic_refuses!("begin sent to a participant", Unimplemented, "", wrong_service.begin(begin_rq(0))),
    ];
    check("participant", &cases);
    assert_unchanged(&before, &snapshot(&c, &ps).await);

    // The active transaction was not disturbed: it commits as usual.
    assert_eq!(active.commit().await.expect("commit"), Outcome::Committed);
    settled(&ps).await;
    assert_eq!(ps[0].get("balance/q").as_deref(), Some("9"));
    for key in ["stale", "late", "hang"] {
        assert_eq!(ps[0].get(key), None, "{key} was refused");
    }
}

/// A second Commit while the first one waits for its outcome, racing the
/// initiator's Abort. Whichever reaches the coordinator first — the Commit
/// then waits as a second caller, or it finds the transaction aborted — it
/// must report the same outcome as the first Commit; so the two are sent
/// together, with no sleep to force an order the assertion does not need.
async fn commit_while_aborting(c: &TestCoordinator, id: &str) -> Result<tonic::Response<tp::CommitResponse>, tonic::Status> {
    let (mut committer, mut aborter) = (c.raw(), c.raw());
    let abort = aborter.abort(tp::AbortRequest { txn_id: id.into(), reason: "enough".into() });
    let (commit, abort) = tokio::join!(committer.commit(commit_rq(id)), abort);
    abort.expect("abort while preparing");
    commit
}

/// Calls that arrive while a Commit is preparing: the prepare goes to a
/// participant that never answers (a socket that is never accepted, and a
/// prepare timeout far away), so the transaction stays in PREPARING until
/// the initiator aborts it. (Two phases: a one-phase commit cannot be
/// aborted by the initiator once its Prepare may have left.)
#[tokio::test]
async fn calls_during_prepare_are_refused_or_answered_as_the_first() {
    let c = TestCoordinator::start(|cfg| {
        cfg.prepare_timeout = Duration::from_secs(60);
        cfg.one_phase = false;
    })
    .await;
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hole_ep = format!("http://{}", hole.local_addr().expect("addr"));
    let mut raw = c.raw();
    let txn = c.client().begin(Duration::from_secs(60)).await.expect("begin");
    let id = txn.id().to_string();
    raw.enlist(enlist_rq(&id, "silent", &hole_ep)).await.expect("enlisted");
    let first = tokio::spawn({
        let mut raw = c.raw();
        let id = id.clone();
        async move { raw.commit(commit_rq(&id)).await }
    });
    eventually("the transaction is preparing", Duration::from_secs(5), || {
        let client = c.client();
        let txn = txn.id();
        async move { client.status(txn).await.is_ok_and(|s| s.state == tp::TxnState::Preparing as i32) }
    })
    .await;
    let cases = vec![
        fails!("enlist while preparing", FailedPrecondition, ENLISTMENT_CLOSED, raw.enlist(enlist_rq(&id, "silent", &hole_ep))),
        passes!("query decision while preparing", "DECISION_PENDING", raw.query_decision(query_rq(&id, "silent"))),
        fails!("commit again while preparing", Aborted, AbortCode::AbortedByClient.as_str(), commit_while_aborting(&c, &id)),
    ];
    check("during prepare", &cases);
    let first = first.await.expect("first commit");
    let (Err(first), Err(again)) = (&first, &cases[2].got) else { panic!("both Commits report the abort") };
    assert_eq!(status::abort_reason(first), status::abort_reason(again), "both Commits got the same outcome");
    assert_eq!(status::abort_reason(first).map(|r| r.detail).as_deref(), Some("enough"));
    // Nothing else was begun or enlisted.
    let mut admin = tp::admin_client::AdminClient::new(channel(&c.url()));
    let list = admin.list_transactions(list_rq(false, 0)).await.expect("list").into_inner();
    assert_eq!(list.transactions.len(), 1);
    assert_eq!(list.transactions[0].participants.len(), 1);
    drop(hole);
}

/// A refused Enlist must not register anything.
#[tokio::test]
async fn refused_enlist_leaves_the_registry_alone() {
    let (c, ps) = cluster(&["wallet"]).await;
    let mut raw = c.raw();
    let epoch = c.client().begin(Duration::from_secs(5)).await.expect("begin").id().epoch;
    let unissued = format!("tx-{epoch}-{}", u64::MAX);
    // Refused, as it should be...
    let s = raw.enlist(enlist_rq(&unissued, "wallet", "http://127.0.0.1:9")).await.expect_err("refused");
    check(
        "refused enlist",
        &[Case { name: "enlist unknown id, new endpoint", want: Want::Fail(Code::NotFound, TXN_NOT_FOUND), got: Err(s) }],
    );
    // ...but wallet's registry entry now points at the refused request's
    // endpoint, so Execute sends its Prepare there and aborts.
    let done = c.client().execute([("wallet", b"put a 1".to_vec())], Duration::from_secs(5)).await.expect("execute");
    assert_eq!(done.outcome, Outcome::Committed, "a refused Enlist re-pointed wallet's registry entry");
    settled(&ps).await;
}

/// A refused Prepare must not change which transactions the participant
/// accepts.
#[tokio::test]
async fn refused_prepare_with_a_future_epoch_changes_nothing() {
    let (c, ps) = cluster(&["wallet"]).await;
    let mut p = tp::participant_client::ParticipantClient::new(ps[0].channel());
    let epoch = c.client().begin(Duration::from_secs(5)).await.expect("begin").id().epoch;
    // A Prepare claiming an epoch no coordinator run has reached, for a
    // transaction the participant never saw: refused with a NO vote...
    let v = got(p.prepare(prepare_rq(&format!("tx-{epoch}-99991"), epoch + 1, None, 0)).await);
    check("future epoch", &[Case { name: "prepare with a future epoch", want: Want::Pass("VOTE_NO"), got: v }]);
    // ...and the coordinator's next transaction must still commit here.
    let done = c.client().execute([("wallet", b"put a 1".to_vec())], Duration::from_secs(5)).await.expect("execute");
    assert_eq!(done.outcome, Outcome::Committed, "a refused Prepare made the participant refuse the current epoch");
    settled(&ps).await;
}

/// The same through an Abort, which is acknowledged: the tombstone it
/// leaves records the claimed epoch, so the effect survives a restart of
/// the participant.
#[tokio::test]
async fn abort_with_a_future_epoch_changes_nothing() {
    let (c, ps) = cluster(&["wallet"]).await;
    let mut p = tp::participant_client::ParticipantClient::new(ps[0].channel());
    let epoch = c.client().begin(Duration::from_secs(5)).await.expect("begin").id().epoch;
    let acked = got(p.abort(abort_branch_rq(&format!("tx-{epoch}-99991"), epoch + 1)).await);
    check("future epoch", &[Case { name: "abort with a future epoch", want: Want::Pass("acked"), got: acked }]);
    let done = c.client().execute([("wallet", b"put a 1".to_vec())], Duration::from_secs(5)).await.expect("execute");
    assert_eq!(done.outcome, Outcome::Committed, "an Abort for a transaction never seen made the participant refuse the current epoch");
    settled(&ps).await;
}

/// `Participant.Deliver` answers each message of a batch exactly as the
/// message's own RPC does — the same status code and reason for a refusal —
/// tagged with its index; an envelope without a message and an oversize
/// batch are refused precisely; none of it changes state.
#[tokio::test]
async fn deliver_answers_each_message_as_its_own_rpc_would() {
    use tp::envelope::Body;
    let (c, ps) = second_run(&["wallet"], |_| {}).await;
    let mut p = tp::participant_client::ParticipantClient::new(ps[0].channel());
    let seeded = c.client().execute([("wallet", b"put balance/d 10".to_vec())], Duration::from_secs(5)).await.expect("seed");
    assert_eq!(seeded.outcome, Outcome::Committed);
    settled(&ps).await;
    let epoch = seeded.txn.epoch;
    let committed = seeded.txn.to_string();
    // Two ids this participant never saw: a COMMIT for one is acknowledged
    // (committed and forgotten is all it can mean), an ABORT for the other
    // leaves a tombstone; each message is answered the same both times.
    let (never, never_aborted) = (format!("tx-{epoch}-99991"), format!("tx-{epoch}-99992"));
    let before = snapshot(&c, &ps).await;

    let messages = vec![
        Body::Prepare(prepare_rq("x", epoch, None, 0)),
        Body::Commit(commit_branch_rq(&never, epoch)),
        Body::Abort(abort_branch_rq(&committed, epoch)),
        Body::Commit(commit_branch_rq(&committed, epoch)),
        Body::Abort(abort_branch_rq(&never_aborted, epoch)),
    ];
    // What each message's own RPC answers.
    let mut alone = Vec::new();
    for m in &messages {
        let r = match m.clone() {
            Body::Prepare(r) => p.prepare(r).await.map(|_| ()),
            Body::Commit(r) => p.commit(r).await.map(|_| ()),
            Body::Abort(r) => p.abort(r).await.map(|_| ()),
        };
        alone.push(r.map_err(|s| (s.code() as i32, status::reason(&s).unwrap_or_default())));
    }
    let mut envelopes: Vec<tp::Envelope> = messages.into_iter().map(|b| tp::Envelope { body: Some(b), ..Default::default() }).collect();
    envelopes.push(tp::Envelope::default());
    let mut stream = p.deliver(tp::DeliverRequest { messages: envelopes }).await.expect("deliver").into_inner();
    let mut got = vec![None; 6];
    while let Some(d) = stream.message().await.expect("answers") {
        let i = d.index as usize;
        assert!(got[i].is_none(), "message {i} answered twice");
        got[i] = Some(match d.body {
            Some(tp::delivered::Body::Refused(r)) => Err((r.code, r.reason)),
            Some(_) => Ok(()),
            None => panic!("an answer without a body"),
        });
    }
    let got: Vec<_> = got.into_iter().map(|g| g.expect("every message answered")).collect();
    assert_eq!(&got[..5], &alone[..], "batched answers match the RPCs'");
    assert_eq!(alone[0], Err((Code::InvalidArgument as i32, TXN_ID_MALFORMED.to_owned())));
    assert_eq!(alone[2], Err((Code::FailedPrecondition as i32, BRANCH_COMMITTED.to_owned())));
    assert_eq!(alone[3], Ok(()), "a repeated COMMIT is acknowledged again");
    assert_eq!(got[5], Err((Code::InvalidArgument as i32, MESSAGE_EMPTY.to_owned())));

    let too_many = vec![tp::Envelope { body: Some(Body::Abort(abort_branch_rq(&never_aborted, epoch))), ..Default::default() }; 1025];
    let Err(s) = p.deliver(tp::DeliverRequest { messages: too_many }).await else { panic!("a batch of 1025 is refused") };
    assert_eq!((s.code(), status::reason(&s).as_deref()), (Code::InvalidArgument, Some(BATCH_TOO_LARGE)), "{s:?}");

    assert_unchanged(&before, &snapshot(&c, &ps).await);
}
