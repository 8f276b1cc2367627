//! Bad input gets a precise status with a stable reason, never a panic,
//! and changes nothing. One table per service, run against real servers.

use std::time::Duration;

use tonic::Code;
use twopc_proto::pb as tp;
use twopc_proto::{reason, status};
use twopc_tests::{cluster, settled};

struct Case {
    name: &'static str,
    code: Code,
    reason: Option<&'static str>,
    status: tonic::Status,
}

/// The status of a call that must fail; a success becomes an OK status,
/// which no case expects.
fn e<T>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
    match r {
        Ok(_) => tonic::Status::ok("unexpected success"),
        Err(s) => s,
    }
}

fn check(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for c in &cases {
        let got_reason = status::reason(&c.status);
        if c.status.code() != c.code || (c.reason.is_some() && got_reason.as_deref() != c.reason) {
            failures.push(format!(
                "{}: expected {:?}/{:?}, got {:?}/{:?}: {}",
                c.name,
                c.code,
                c.reason,
                c.status.code(),
                got_reason,
                c.status.message()
            ));
        }
        assert!(!c.status.message().is_empty(), "{}: the status must say why", c.name);
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[tokio::test]
async fn coordinator_refuses_bad_input_precisely() {
    let (c, ps) = cluster(&["wallet"]).await;
    let mut raw = c.raw();
    let ep = format!("http://{}", ps[0].addr);
    // An aborted and a committed transaction to misuse.
    let aborted = c.client().begin(Duration::from_secs(5)).await.expect("begin");
    aborted.abort("test").await.expect("abort");
    let committed = c.client().execute([("wallet", b"put a 1".to_vec())], Duration::from_secs(5)).await.expect("execute");
    settled(&ps).await;
    let before = ps[0].get("a");

    let branch = |p: &str, payload: &[u8]| tp::Branch { participant: p.into(), payload: payload.to_vec() };
    let cases = vec![
        Case {
            name: "commit unknown id",
            code: Code::NotFound,
            reason: Some(reason::TXN_NOT_FOUND),
            status: e(raw.commit(tp::CommitRequest { txn_id: "tx-999-1".into() }).await),
        },
        Case {
            name: "commit malformed id",
            code: Code::InvalidArgument,
            reason: Some(reason::TXN_ID_MALFORMED),
            status: e(raw.commit(tp::CommitRequest { txn_id: "not-an-id".into() }).await),
        },
        Case {
            name: "commit empty id",
            code: Code::InvalidArgument,
            reason: Some(reason::TXN_ID_MALFORMED),
            status: e(raw.commit(tp::CommitRequest { txn_id: String::new() }).await),
        },
        Case {
            name: "status unknown id",
            code: Code::NotFound,
            reason: Some(reason::TXN_NOT_FOUND),
            status: e(raw.status(tp::StatusRequest { txn_id: "tx-999-5".into() }).await),
        },
        Case {
            name: "status malformed id",
            code: Code::InvalidArgument,
            reason: Some(reason::TXN_ID_MALFORMED),
            status: e(raw.status(tp::StatusRequest { txn_id: "tx-01-2".into() }).await),
        },
        Case {
            name: "abort unknown id",
            code: Code::NotFound,
            reason: Some(reason::TXN_NOT_FOUND),
            status: e(raw.abort(tp::AbortRequest { txn_id: "tx-999-1".into(), reason: String::new() }).await),
        },
        Case {
            name: "abort committed",
            code: Code::FailedPrecondition,
            reason: Some(reason::TXN_ALREADY_DECIDED),
            status: e(raw.abort(tp::AbortRequest { txn_id: committed.txn.to_string(), reason: String::new() }).await),
        },
        Case {
            name: "commit aborted",
            code: Code::Aborted,
            reason: Some("ABORTED_BY_CLIENT"),
            status: e(raw.commit(tp::CommitRequest { txn_id: aborted.id().to_string() }).await),
        },
        Case {
            name: "enlist aborted",
            code: Code::FailedPrecondition,
            reason: Some(reason::ENLISTMENT_CLOSED),
            status: e(raw
                .enlist(tp::EnlistRequest { txn_id: aborted.id().to_string(), participant: "wallet".into(), endpoint: ep.clone() })
                .await),
        },
        Case {
            name: "enlist unknown id",
            code: Code::NotFound,
            reason: Some(reason::TXN_NOT_FOUND),
            status: e(raw
                .enlist(tp::EnlistRequest { txn_id: "tx-999-1".into(), participant: "wallet".into(), endpoint: ep.clone() })
                .await),
        },
        Case {
            name: "enlist bad name",
            code: Code::InvalidArgument,
            reason: Some(reason::PARTICIPANT_NAME_INVALID),
            status: e(raw
                .enlist(tp::EnlistRequest { txn_id: aborted.id().to_string(), participant: "bad name".into(), endpoint: ep.clone() })
                .await),
        },
        Case {
            name: "enlist bad endpoint",
            code: Code::InvalidArgument,
            reason: Some(reason::ENDPOINT_INVALID),
            status: e(raw
                .enlist(tp::EnlistRequest {
                    txn_id: aborted.id().to_string(),
                    participant: "wallet".into(),
                    endpoint: "localhost:1".into(),
                })
                .await),
        },
        Case {
            name: "execute no branches",
            code: Code::InvalidArgument,
            reason: Some(reason::BRANCHES_EMPTY),
            status: e(raw.execute(tp::ExecuteRequest { branches: vec![], timeout_ms: 0 }).await),
        },
        Case {
            name: "execute unknown participant",
            code: Code::NotFound,
            reason: Some(reason::PARTICIPANT_UNKNOWN),
            status: e(raw.execute(tp::ExecuteRequest { branches: vec![branch("ghost", b"put a 1")], timeout_ms: 0 }).await),
        },
        Case {
            name: "execute duplicate participant",
            code: Code::InvalidArgument,
            reason: Some(reason::DUPLICATE_PARTICIPANT),
            status: e(raw
                .execute(tp::ExecuteRequest { branches: vec![branch("wallet", b"put a 2"), branch("wallet", b"put a 3")], timeout_ms: 0 })
                .await),
        },
        Case {
            name: "execute oversize payload",
            code: Code::InvalidArgument,
            reason: Some(reason::PAYLOAD_TOO_LARGE),
            status: e(raw
                .execute(tp::ExecuteRequest { branches: vec![branch("wallet", &vec![b'x'; 64 * 1024 + 1])], timeout_ms: 0 })
                .await),
        },
        Case {
            name: "execute too many branches",
            code: Code::InvalidArgument,
            reason: Some(reason::TOO_MANY_BRANCHES),
            status: e(raw
                .execute(tp::ExecuteRequest { branches: (0..65).map(|i| branch(&format!("p{i}"), b"put a 1")).collect(), timeout_ms: 0 })
                .await),
        },
        Case {
            name: "execute bad participant name",
            code: Code::InvalidArgument,
            reason: Some(reason::PARTICIPANT_NAME_INVALID),
            status: e(raw.execute(tp::ExecuteRequest { branches: vec![branch("", b"put a 1")], timeout_ms: 0 }).await),
        },
        Case {
            name: "execute unparsable payload",
            code: Code::Aborted,
            reason: Some("PARTICIPANT_VOTED_NO"),
            status: e(raw.execute(tp::ExecuteRequest { branches: vec![branch("wallet", b"frobnicate a")], timeout_ms: 0 }).await),
        },
        Case {
            name: "begin timeout too long",
            code: Code::InvalidArgument,
            reason: Some(reason::TIMEOUT_TOO_LONG),
            status: e(raw.begin(tp::BeginRequest { timeout_ms: 3_600_000 }).await),
        },
        Case {
            name: "register bad endpoint",
            code: Code::InvalidArgument,
            reason: Some(reason::ENDPOINT_INVALID),
            status: e(raw
                .register_participant(tp::RegisterParticipantRequest { participant: "x".into(), endpoint: "ftp://h".into() })
                .await),
        },
        Case {
            name: "query decision malformed id",
            code: Code::InvalidArgument,
            reason: Some(reason::TXN_ID_MALFORMED),
            status: e(raw.query_decision(tp::QueryDecisionRequest { txn_id: "tx".into(), participant: "wallet".into() }).await),
        },
    ];
    check(cases);
    assert_eq!(ps[0].get("a"), before, "no refused request changed data");
    assert_eq!(ps[0].kv.locked_keys(), 0, "no refused request left a lock");
}

#[tokio::test]
async fn participant_refuses_bad_input_precisely() {
    let (c, ps) = cluster(&["wallet"]).await;
    let mut p = tp::participant_client::ParticipantClient::new(ps[0].channel());
    let active = c.client().begin(Duration::from_secs(5)).await.expect("begin");
    let mut wallet = twopc_examples::pb::wallet_client::WalletClient::with_interceptor(ps[0].channel(), active.interceptor());
    let seeded = c.client().execute([("wallet", b"put balance/q 10".to_vec())], Duration::from_secs(5)).await.expect("seed");
    assert_eq!(seeded.outcome, twopc_participant::Outcome::Committed);
    settled(&ps).await;
    wallet.debit(twopc_examples::pb::DebitRequest { account: "q".into(), amount: 1, order_id: "z".into() }).await.expect("debit");

    let cases = vec![
        Case {
            name: "prepare malformed id",
            code: Code::InvalidArgument,
            reason: Some(reason::TXN_ID_MALFORMED),
            status: e(p.prepare(tp::PrepareRequest { txn_id: "x".into(), ..Default::default() }).await),
        },
        Case {
            name: "commit malformed id",
            code: Code::InvalidArgument,
            reason: Some(reason::TXN_ID_MALFORMED),
            status: e(p.commit(tp::CommitBranchRequest { txn_id: "tx-1".into(), coordinator_epoch: 1 }).await),
        },
        Case {
            name: "abort malformed id",
            code: Code::InvalidArgument,
            reason: Some(reason::TXN_ID_MALFORMED),
            status: e(p.abort(tp::AbortBranchRequest { txn_id: "".into(), coordinator_epoch: 1 }).await),
        },
        Case {
            name: "commit unprepared branch",
            code: Code::FailedPrecondition,
            reason: Some(reason::BRANCH_NOT_PREPARED),
            status: e(p.commit(tp::CommitBranchRequest { txn_id: active.id().to_string(), coordinator_epoch: active.id().epoch }).await),
        },
    ];
    check(cases);
    // A business call carrying a malformed transaction id is refused by the
    // layer before the handler runs.
    let mut bad = twopc_examples::pb::wallet_client::WalletClient::new(ps[0].channel());
    let mut req = tonic::Request::new(twopc_examples::pb::DebitRequest { account: "q".into(), amount: 1, order_id: "y".into() });
    req.metadata_mut().insert(twopc_proto::TXN_METADATA_KEY, "tx-nope".parse().expect("ascii"));
    let s = bad.debit(req).await.expect_err("refused");
    check(vec![Case {
        name: "business call with malformed twopc-txn",
        code: Code::InvalidArgument,
        reason: Some(reason::TXN_ID_MALFORMED),
        status: s,
    }]);

    // Prepare of a transaction the participant never saw and has no payload
    // for: a NO vote, not an error.
    // (Ids of the coordinator's own epoch: a newer epoch would make the
    // participant refuse this epoch's prepares as stale.)
    let epoch = active.id().epoch;
    let never = format!("tx-{epoch}-99991");
    let hung = format!("tx-{epoch}-99992");
    let v =
        p.prepare(tp::PrepareRequest { txn_id: never, coordinator_epoch: epoch, payload: None, deadline_unix_ms: 0 }).await.expect("votes");
    assert_eq!(v.get_ref().vote, tp::Vote::No as i32);
    // Abort of an unknown transaction is acknowledged, and a late Prepare
    // with a payload for it is then refused and takes no lock.
    p.abort(tp::AbortBranchRequest { txn_id: hung.clone(), coordinator_epoch: epoch }).await.expect("acknowledged");
    let v = p
        .prepare(tp::PrepareRequest { txn_id: hung, coordinator_epoch: epoch, payload: Some(b"put hang 1".to_vec()), deadline_unix_ms: 0 })
        .await
        .expect("votes");
    assert_eq!(v.get_ref().vote, tp::Vote::No as i32, "no hanging: a Prepare after an Abort is refused");
    assert_eq!(active.commit().await.expect("commit"), twopc_participant::Outcome::Committed);
    settled(&ps).await;
    assert_eq!(ps[0].get("hang"), None);
    assert_eq!(ps[0].get("balance/q").as_deref(), Some("9"));
}
