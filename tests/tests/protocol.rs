//! Atomic commit end to end over real gRPC on loopback and real RocksDB:
//! in-process coordinator and participants (see the harness in src/lib.rs).
//! Each test names the rule of docs/ARCHITECTURE.md it shows.

use std::time::Duration;

use tonic::Code;
use twopc_examples::pb;
use twopc_participant::{AbortCode, Outcome};
use twopc_proto::{pb as tp, reason, status};
use twopc_tests::{TestCoordinator, TestParticipant, cluster, eventually, settled};

fn exec_branches<'a>(bs: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = (&'a str, Vec<u8>)> + 'a {
    bs.iter().map(|(n, p)| (*n, p.as_bytes().to_vec()))
}

/// Validity + agreement: three YES votes commit everywhere.
#[tokio::test]
async fn three_participants_commit_via_execute() {
    let (c, ps) = cluster(&["wallet", "orders", "inventory"]).await;
    let f = c
        .client()
        .execute(
            exec_branches(&[
                ("wallet", "put balance/a 70"),
                ("orders", "put order/1 x; incr revenue 30"),
                ("inventory", "put stock/lamp 9"),
            ]),
            Duration::from_secs(5),
        )
        .await
        .expect("execute");
    assert_eq!(f.outcome, Outcome::Committed);
    settled(&ps).await;
    assert_eq!(ps[0].get("balance/a").as_deref(), Some("70"));
    assert_eq!(ps[1].get("order/1").as_deref(), Some("x"));
    assert_eq!(ps[1].get("revenue").as_deref(), Some("30"));
    assert_eq!(ps[2].get("stock/lamp").as_deref(), Some("9"));
    let s = c.client().status(f.txn).await.expect("status");
    assert_eq!(s.state, tp::TxnState::Committed as i32);
    eventually("phase two finishes", Duration::from_secs(10), || {
        let client = c.client();
        async move { client.status(f.txn).await.map(|s| s.finished).unwrap_or(false) }
    })
    .await;
}

/// The code path: begin → business calls carrying the transaction in
/// metadata (each service enlists before answering) → commit.
#[tokio::test]
async fn three_services_commit_from_code() {
    let (c, ps) = cluster(&["wallet", "orders", "inventory"]).await;
    let seed = c
        .client()
        .execute(exec_branches(&[("wallet", "put balance/alice 100"), ("inventory", "put stock/lamp 5")]), Duration::from_secs(5))
        .await
        .expect("seed");
    assert_eq!(seed.outcome, Outcome::Committed);
    settled(&ps).await;

    let txn = c.client().begin(Duration::from_secs(5)).await.expect("begin");
    let mut wallet = pb::wallet_client::WalletClient::with_interceptor(ps[0].channel(), txn.interceptor());
    let mut orders = pb::orders_client::OrdersClient::with_interceptor(ps[1].channel(), txn.interceptor());
    let mut inventory = pb::inventory_client::InventoryClient::with_interceptor(ps[2].channel(), txn.interceptor());
    let left = wallet.debit(pb::DebitRequest { account: "alice".into(), amount: 30, order_id: "o1".into() }).await.expect("debit");
    assert_eq!(left.get_ref().balance, 70);
    orders
        .place(pb::PlaceRequest { order_id: "o1".into(), account: "alice".into(), sku: "lamp".into(), quantity: 2, amount: 30 })
        .await
        .expect("place");
    inventory.reserve(pb::ReserveRequest { order_id: "o1".into(), sku: "lamp".into(), quantity: 2 }).await.expect("reserve");
    // Nothing is visible before commit.
    assert_eq!(ps[0].get("balance/alice").as_deref(), Some("100"));
    assert_eq!(ps[1].get("order/o1"), None);
    assert_eq!(txn.commit().await.expect("commit"), Outcome::Committed);
    settled(&ps).await;
    assert_eq!(ps[0].get("balance/alice").as_deref(), Some("70"));
    assert_eq!(ps[0].get("debit/o1").as_deref(), Some("30"));
    assert_eq!(ps[1].get("order/o1").as_deref(), Some("alice,lamp,2,30"));
    assert_eq!(ps[2].get("stock/lamp").as_deref(), Some("3"));
    assert_eq!(ps[2].get("reserved/o1").as_deref(), Some("lamp,2"));
}

/// Validity: one NO vote aborts, and nothing is applied anywhere.
#[tokio::test]
async fn one_no_vote_aborts_everywhere() {
    let (c, ps) = cluster(&["wallet", "orders", "inventory"]).await;
    let f = c
        .client()
        .execute(
            exec_branches(&[
                ("wallet", "incr balance/bob -30; check balance/bob >= 0"),
                ("orders", "put order/2 y"),
                ("inventory", "put reserved/2 lamp,1"),
            ]),
            Duration::from_secs(5),
        )
        .await
        .expect("execute answers");
    let Outcome::Aborted(r) = f.outcome else { panic!("expected an abort, got {:?}", f.outcome) };
    assert_eq!(r.code, AbortCode::ParticipantVotedNo);
    assert_eq!(r.participant.as_ref().map(|p| p.as_str()), Some("wallet"));
    assert!(r.detail.contains("check balance/bob >= 0 failed"), "{r:?}");
    settled(&ps).await;
    assert_eq!(ps[0].get("balance/bob"), None);
    assert_eq!(ps[1].get("order/2"), None);
    assert_eq!(ps[2].get("reserved/2"), None);
    let s = c.client().status(f.txn).await.expect("status");
    assert_eq!(s.state, tp::TxnState::Aborted as i32);
    assert_eq!(s.abort_reason.map(|r| r.code).as_deref(), Some("PARTICIPANT_VOTED_NO"));
}

/// Deadline → abort: work staged under a transaction that is never
/// committed is rolled back everywhere once the deadline passes, and a late
/// Commit reports the abort.
#[tokio::test]
async fn deadline_passes_and_all_abort() {
    let (c, ps) = cluster(&["wallet", "orders"]).await;
    let txn = c.client().begin(Duration::from_millis(400)).await.expect("begin");
    let mut orders0 = pb::orders_client::OrdersClient::with_interceptor(ps[1].channel(), txn.interceptor());
    orders0
        .place(pb::PlaceRequest { order_id: "o9".into(), account: "zed".into(), sku: "mug".into(), quantity: 1, amount: 10 })
        .await
        .expect("place");
    assert!(ps[1].kv.locked_keys() > 0, "the staged order holds its locks");
    let id = txn.id();
    eventually("the coordinator aborts at the deadline", Duration::from_secs(10), || {
        let client = c.client();
        async move { client.status(id).await.map(|s| s.state == tp::TxnState::Aborted as i32).unwrap_or(false) }
    })
    .await;
    settled(&ps).await;
    assert_eq!(ps[1].get("order/o9"), None);
    match txn.commit().await.expect("commit answers") {
        Outcome::Aborted(r) => assert_eq!(r.code, AbortCode::DeadlineExceeded),
        other => panic!("late commit must report the abort, got {other:?}"),
    }
}

/// Enlistment closes at Commit: a service asked to do work afterwards
/// refuses, and a direct Enlist is refused.
#[tokio::test]
async fn late_enlistment_is_refused() {
    let (c, ps) = cluster(&["wallet", "orders"]).await;
    let txn = c.client().begin(Duration::from_secs(5)).await.expect("begin");
    let mut orders = pb::orders_client::OrdersClient::with_interceptor(ps[1].channel(), txn.interceptor());
    orders
        .place(pb::PlaceRequest { order_id: "o3".into(), account: "amy".into(), sku: "rug".into(), quantity: 1, amount: 35 })
        .await
        .expect("place");
    assert_eq!(txn.commit().await.expect("commit"), Outcome::Committed);
    let mut wallet = pb::wallet_client::WalletClient::with_interceptor(ps[0].channel(), txn.interceptor());
    let late = wallet.debit(pb::DebitRequest { account: "amy".into(), amount: 35, order_id: "o3".into() }).await.expect_err("refused");
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    assert_eq!(status::reason(&late).as_deref(), Some(reason::JOIN_REFUSED));
    let direct = c
        .raw()
        .enlist(tp::EnlistRequest {
            txn_id: txn.id().to_string(),
            participant: "wallet".into(),
            endpoint: format!("http://{}", ps[0].addr),
            incarnation: 0,
        })
        .await
        .expect_err("refused");
    assert_eq!(direct.code(), Code::FailedPrecondition);
    assert_eq!(status::reason(&direct).as_deref(), Some(reason::ENLISTMENT_CLOSED));
    settled(&ps).await;
    assert_eq!(ps[0].get("balance/amy"), None, "the refused work was never applied");
    assert_eq!(ps[1].get("order/o3").as_deref(), Some("amy,rug,1,35"));
}

/// Isolation by locks: a transaction holding a key makes a conflicting one
/// abort (its participant votes NO after the bounded wait); the holder's
/// write is the only one applied.
#[tokio::test]
async fn conflicting_transactions_one_is_refused() {
    let (c, ps) = cluster(&["wallet"]).await;
    let a = c.client().begin(Duration::from_secs(5)).await.expect("begin");
    let mut wallet = pb::wallet_client::WalletClient::with_interceptor(ps[0].channel(), a.interceptor());
    // Seed through the same transaction path: balance starts at 0, so put
    // via Execute first.
    let seeded = c.client().execute(exec_branches(&[("wallet", "put balance/kim 100")]), Duration::from_secs(5)).await.expect("seed");
    assert_eq!(seeded.outcome, Outcome::Committed);
    settled(&ps).await;
    wallet.debit(pb::DebitRequest { account: "kim".into(), amount: 10, order_id: "a".into() }).await.expect("A debits");
    let b = c.client().execute(exec_branches(&[("wallet", "incr balance/kim -20")]), Duration::from_secs(5)).await.expect("B answers");
    match &b.outcome {
        Outcome::Aborted(r) => {
            assert_eq!(r.code, AbortCode::ParticipantVotedNo);
            assert!(r.detail.contains("locked by"), "{r:?}");
        }
        other => panic!("B must be refused while A holds the key, got {other:?}"),
    }
    assert_eq!(a.commit().await.expect("commit"), Outcome::Committed);
    settled(&ps).await;
    assert_eq!(ps[0].get("balance/kim").as_deref(), Some("90"));
}

/// Idempotency: a retried Commit reports the same outcome, for commits and
/// for aborts.
#[tokio::test]
async fn commit_retried_returns_the_same_outcome() {
    let (c, ps) = cluster(&["wallet"]).await;
    let t = c.client().begin(Duration::from_secs(5)).await.expect("begin");
    let mut wallet = pb::wallet_client::WalletClient::with_interceptor(ps[0].channel(), t.interceptor());
    let seeded = c.client().execute(exec_branches(&[("wallet", "put balance/lee 50")]), Duration::from_secs(5)).await.expect("seed");
    assert_eq!(seeded.outcome, Outcome::Committed);
    settled(&ps).await;
    wallet.debit(pb::DebitRequest { account: "lee".into(), amount: 5, order_id: "x".into() }).await.expect("debit");
    let (first, second) = tokio::join!(t.commit(), t.commit());
    assert_eq!(first.expect("first"), Outcome::Committed);
    assert_eq!(second.expect("concurrent retry"), Outcome::Committed);
    assert_eq!(t.commit().await.expect("later retry"), Outcome::Committed);
    settled(&ps).await;
    assert_eq!(ps[0].get("balance/lee").as_deref(), Some("45"), "applied exactly once");

    let t2 = c.client().begin(Duration::from_secs(5)).await.expect("begin");
    t2.abort("changed my mind").await.expect("abort");
    for _ in 0..2 {
        match t2.commit().await.expect("answers") {
            Outcome::Aborted(r) => {
                assert_eq!(r.code, AbortCode::AbortedByClient);
                assert_eq!(r.detail, "changed my mind");
            }
            other => panic!("commit of an aborted transaction must report the abort, got {other:?}"),
        }
    }
}

/// Durability of the decision across a coordinator restart; ids stay
/// unique (the epoch rises); unknown transactions of the old run are
/// presumed aborted.
#[tokio::test]
async fn decisions_and_ids_survive_a_coordinator_restart() {
    let c = TestCoordinator::start(|_| {}).await;
    let p = TestParticipant::start("wallet", &c.url()).await;
    let done = c.client().execute(exec_branches(&[("wallet", "put k v")]), Duration::from_secs(5)).await.expect("execute");
    assert_eq!(done.outcome, Outcome::Committed);
    let open = c.client().begin(Duration::from_secs(5)).await.expect("begin");
    settled(std::slice::from_ref(&p)).await;
    let dir = c.stop().await;
    let c2 = TestCoordinator::start_in(dir, |_| {}).await;
    let s = c2.client().status(done.txn).await.expect("status");
    assert_eq!(s.state, tp::TxnState::Committed as i32, "a committed decision survives the restart");
    let next = c2.client().begin(Duration::from_secs(5)).await.expect("begin");
    assert!(next.id().epoch > done.txn.epoch, "new ids come from a new epoch: {} after {}", next.id(), done.txn);
    // The first run committed in one phase with wallet: until wallet has
    // reported its one-phase commits, an unknown transaction of that run is
    // "not known yet" (UNAVAILABLE), then presumed aborted.
    let presumed = twopc_tests::poll("the restarted coordinator to presume the open transaction aborted", Duration::from_secs(30), || {
        let mut raw = c2.raw();
        let id = open.id().to_string();
        async move {
            match raw.commit(tp::CommitRequest { txn_id: id }).await {
                Err(s) if s.code() == tonic::Code::Unavailable => Err(s.message().to_owned()),
                Err(s) => Ok(s),
                Ok(r) => panic!("the open transaction committed: {r:?}"),
            }
        }
    })
    .await;
    let r = status::abort_reason(&presumed).expect("an aborted outcome");
    assert_eq!(r.code, AbortCode::PresumedAbort, "a transaction the restarted coordinator never decided is presumed aborted");
    p.stop().await;
}

/// Operations: the coordinator answers gRPC health checks on its API port.
#[tokio::test]
async fn coordinator_reports_serving_to_health_checks() {
    let c = TestCoordinator::start(|_| {}).await;
    let channel = tonic::transport::Endpoint::from_shared(c.url()).expect("url").connect_lazy();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r =
        health.check(tonic_health::pb::HealthCheckRequest { service: "twopc.v1.Coordinator".into() }).await.expect("health check answers");
    assert_eq!(r.get_ref().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

/// Operations: `Admin.Watch` streams each transaction's events in order —
/// begun, decided (a commit only once durable), finished — with the abort
/// code of an abort.
#[tokio::test]
async fn watch_streams_transaction_events_in_order() {
    let (c, ps) = cluster(&["wallet", "orders"]).await;
    let channel = tonic::transport::Endpoint::from_shared(c.url()).expect("url").connect_lazy();
    let mut events = tp::admin_client::AdminClient::new(channel).watch(tp::WatchRequest {}).await.expect("watch").into_inner();
    let ok =
        c.client().execute(exec_branches(&[("wallet", "put w 1"), ("orders", "put o 1")]), Duration::from_secs(5)).await.expect("execute");
    let no = c
        .client()
        .execute(exec_branches(&[("wallet", "check w >= 5"), ("orders", "put o 2")]), Duration::from_secs(5))
        .await
        .expect("execute");
    settled(&ps).await;
    let mut seen: Vec<(String, i32, String)> = Vec::new();
    let want_ok = [tp::TxnEventKind::Begun, tp::TxnEventKind::Committed, tp::TxnEventKind::Finished];
    let done = |seen: &Vec<(String, i32, String)>| {
        seen.iter().filter(|(t, _, _)| *t == ok.txn.to_string()).count() == 3
            && seen.iter().any(|(t, k, _)| *t == no.txn.to_string() && *k == tp::TxnEventKind::Finished as i32)
    };
    while !done(&seen) {
        let e = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("events arrive")
            .expect("stream stays open")
            .expect("an event");
        seen.push((e.txn_id, e.kind, e.abort_code));
    }
    let of = |txn: &str| -> Vec<i32> { seen.iter().filter(|(t, _, _)| t == txn).map(|(_, k, _)| *k).collect() };
    assert_eq!(of(&ok.txn.to_string()), want_ok.map(|k| k as i32).to_vec(), "{seen:?}");
    let aborted: Vec<&(String, i32, String)> = seen.iter().filter(|(t, _, _)| *t == no.txn.to_string()).collect();
    assert_eq!(
        aborted.iter().map(|(_, k, _)| *k).collect::<Vec<_>>(),
        vec![tp::TxnEventKind::Begun as i32, tp::TxnEventKind::Aborted as i32, tp::TxnEventKind::Finished as i32],
        "{seen:?}"
    );
    assert_eq!(aborted[1].2, "PARTICIPANT_VOTED_NO");
}

/// Atomicity inside one participant: a Commit that arrives while a call
/// under the same transaction is still running there must not commit that
/// call's work half-done — the participant votes NO.
#[tokio::test]
async fn prepare_while_a_call_is_still_running_votes_no() {
    let c = TestCoordinator::start(|_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = TestParticipant::start_in("wallet", &c.url(), dir, Duration::from_secs(30)).await;
    let seeded = c.client().execute(exec_branches(&[("wallet", "put balance/x 100")]), Duration::from_secs(5)).await.expect("seed");
    assert_eq!(seeded.outcome, Outcome::Committed);
    settled(std::slice::from_ref(&p)).await;
    // `holder` keeps balance/x locked, so `slow`'s debit waits inside the
    // handler.
    let holder = c.client().begin(Duration::from_secs(30)).await.expect("begin");
    pb::wallet_client::WalletClient::with_interceptor(p.channel(), holder.interceptor())
        .debit(pb::DebitRequest { account: "x".into(), amount: 1, order_id: "h".into() })
        .await
        .expect("holder debits");
    let slow = c.client().begin(Duration::from_secs(30)).await.expect("begin");
    let mut w = pb::wallet_client::WalletClient::with_interceptor(p.channel(), slow.interceptor());
    let call = tokio::spawn(async move { w.debit(pb::DebitRequest { account: "x".into(), amount: 7, order_id: "s".into() }).await });
    let (participant, id) = (p.participant.clone(), slow.id());
    eventually("the slow call is running", Duration::from_secs(5), move || {
        let participant = participant.clone();
        async move { participant.calls_running(id) > 0 }
    })
    .await;
    match slow.commit().await.expect("answers") {
        Outcome::Aborted(r) => {
            assert_eq!(r.code, AbortCode::ParticipantVotedNo, "{r:?}");
            assert!(r.detail.contains("still running"), "{r:?}");
        }
        other => panic!("a commit racing a running call must not commit, got {other:?}"),
    }
    holder.abort("done").await.expect("abort holder");
    let _ = call.await;
    settled(std::slice::from_ref(&p)).await;
    assert_eq!(p.get("balance/x").as_deref(), Some("100"), "neither transaction applied anything");
}

/// A business call whose service cannot reach the coordinator to enlist is
/// answered UNAVAILABLE (COORDINATOR_UNAVAILABLE), which an initiator may
/// retry, not FAILED_PRECONDITION; nothing is left behind.
#[tokio::test]
async fn a_call_while_the_coordinator_is_down_is_retryable() {
    // A short drain: the open transaction would otherwise hold the stop.
    let c = TestCoordinator::start(|c| c.drain_timeout = Duration::from_millis(100)).await;
    let ps = [TestParticipant::start("wallet", &c.url()).await];
    let txn = c.client().begin(Duration::from_secs(30)).await.expect("begin");
    let dir = c.stop().await;
    let mut wallet = pb::wallet_client::WalletClient::with_interceptor(ps[0].channel(), txn.interceptor());
    let call = || pb::DebitRequest { account: "zed".into(), amount: 0, order_id: "o1".into() };
    let s = wallet.debit(call()).await.expect_err("cannot enlist");
    assert_eq!((s.code(), status::reason(&s).as_deref()), (Code::Unavailable, Some(reason::COORDINATOR_UNAVAILABLE)), "{s:?}");
    assert_eq!(ps[0].kv.locked_keys(), 0, "nothing was done under the transaction");
    drop(dir);
}

/// A participant that does not serve `Deliver` (built before batched
/// delivery existed) still gets every message, each as its own RPC.
#[tokio::test]
async fn a_participant_without_deliver_gets_one_rpc_per_message() {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Old {
        calls: Arc<Mutex<Vec<String>>>,
    }

    #[tonic::async_trait]
    impl tp::participant_server::Participant for Old {
        async fn prepare(&self, r: tonic::Request<tp::PrepareRequest>) -> Result<tonic::Response<tp::PrepareResponse>, tonic::Status> {
            self.calls.lock().expect("lock").push(format!("prepare {}", r.get_ref().txn_id));
            Ok(tonic::Response::new(tp::PrepareResponse { vote: tp::Vote::Yes as i32, reason: String::new() }))
        }
        async fn commit(
            &self,
            r: tonic::Request<tp::CommitBranchRequest>,
        ) -> Result<tonic::Response<tp::CommitBranchResponse>, tonic::Status> {
            self.calls.lock().expect("lock").push(format!("commit {}", r.get_ref().txn_id));
            Ok(tonic::Response::new(tp::CommitBranchResponse {}))
        }
        async fn abort(
            &self,
            r: tonic::Request<tp::AbortBranchRequest>,
        ) -> Result<tonic::Response<tp::AbortBranchResponse>, tonic::Status> {
            self.calls.lock().expect("lock").push(format!("abort {}", r.get_ref().txn_id));
            Ok(tonic::Response::new(tp::AbortBranchResponse {}))
        }
        type DeliverStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<tp::Delivered, tonic::Status>> + Send>>;
        async fn deliver(&self, _r: tonic::Request<tp::DeliverRequest>) -> Result<tonic::Response<Self::DeliverStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("an old participant"))
        }
        async fn recover(&self, _r: tonic::Request<tp::RecoverRequest>) -> Result<tonic::Response<tp::RecoverResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("an old participant"))
        }
    }

    let (c, ps) = cluster(&["wallet"]).await;
    let old = Old::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(tp::participant_server::ParticipantServer::new(old.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    c.raw().register_participant(tp::RegisterParticipantRequest { participant: "legacy".into(), endpoint }).await.expect("registered");
    let done = c
        .client()
        .execute([("wallet", b"put balance/leg 1".to_vec()), ("legacy", b"anything".to_vec())], Duration::from_secs(5))
        .await
        .expect("answered");
    assert_eq!(done.outcome, Outcome::Committed);
    let txn = done.txn.to_string();
    eventually("the old participant acknowledged COMMIT", Duration::from_secs(10), || {
        let calls = old.calls.lock().map(|c| c.clone()).unwrap_or_default();
        let want = [format!("prepare {txn}"), format!("commit {txn}")];
        std::future::ready(calls == want)
    })
    .await;
    settled(&ps).await;
    assert_eq!(ps[0].get("balance/leg").as_deref(), Some("1"));

    // Alone in a transaction, it is asked to commit in one phase; it does
    // not know how, answers YES as to any Prepare, and two phases follow.
    let done = c.client().execute([("legacy", b"anything".to_vec())], Duration::from_secs(5)).await.expect("answered");
    assert_eq!(done.outcome, Outcome::Committed);
    let single = done.txn.to_string();
    eventually("the old participant acknowledged COMMIT of the one-participant transaction", Duration::from_secs(10), || {
        let calls = old.calls.lock().map(|c| c.clone()).unwrap_or_default();
        let want = [format!("prepare {txn}"), format!("commit {txn}"), format!("prepare {single}"), format!("commit {single}")];
        std::future::ready(calls == want)
    })
    .await;
    server.abort();
}
