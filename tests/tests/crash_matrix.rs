//! The crash-point matrix: real processes (coordinator and three
//! participants, each with its own RocksDB), one process made to die at an
//! exact step by a crash point, restarted from the same data directory;
//! then, at quiescence, the atomicity checker and the expected outcome.
//!
//! Each row names a crash point, the process it is armed in, and for the
//! commit path (every participant votes YES) and the abort path (one
//! participant votes NO) whether the point is reached and what the final
//! outcome must be. Presumed abort explains most rows: nothing decided
//! durably means abort; a durable COMMIT decision survives any crash.
//!
//! `TWOPC_CRASH_REPEATS` (default 2) repeats every case; the README gives
//! the longer command.

use std::time::Duration;

use twopc_participant::Outcome;
use twopc_tests::checker::{Bank, Told, Transfer, check};
use twopc_tests::cluster::{ClusterOptions, ProcCluster};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Coordinator,
    /// `bank-b`, which votes YES on both paths.
    Participant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// The process must die at the point.
    Yes,
    /// The path never passes the point (the process must survive).
    No,
    /// Reached or not depending on message order.
    Maybe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Final {
    Committed,
    Aborted,
}

struct Row {
    point: &'static str,
    target: Target,
    /// Commit path: reached?, outcome.
    commit: (Reach, Final),
    /// Abort path: reached?, outcome.
    abort: (Reach, Final),
    /// Arm this point instead at the first start, and `point` only on the
    /// restart that follows (for crashes during recovery).
    before: Option<&'static str>,
}

const ROWS: &[Row] = &[
    // Coordinator.
    Row {
        point: "coordinator::after_vote",
        target: Target::Coordinator,
        commit: (Reach::Yes, Final::Aborted),
        abort: (Reach::Yes, Final::Aborted),
        before: None,
    },
    Row {
        point: "coordinator::before_decision_write",
        target: Target::Coordinator,
        commit: (Reach::Yes, Final::Aborted),
        abort: (Reach::No, Final::Aborted),
        before: None,
    },
    Row {
        point: "coordinator::after_decision_durable",
        target: Target::Coordinator,
        commit: (Reach::Yes, Final::Committed),
        abort: (Reach::No, Final::Aborted),
        before: None,
    },
    Row {
        point: "coordinator::after_phase_two_ack",
        target: Target::Coordinator,
        commit: (Reach::Yes, Final::Committed),
        abort: (Reach::Yes, Final::Aborted),
        before: None,
    },
    Row {
        point: "coordinator::before_end_write",
        target: Target::Coordinator,
        commit: (Reach::Yes, Final::Committed),
        abort: (Reach::No, Final::Aborted),
        before: None,
    },
    Row {
        point: "coordinator::during_recovery",
        target: Target::Coordinator,
        commit: (Reach::Yes, Final::Committed),
        abort: (Reach::No, Final::Aborted),
        before: Some("coordinator::after_decision_durable"),
    },
    // Participant bank-b.
    Row {
        point: "participant::before_prepare_write",
        target: Target::Participant,
        commit: (Reach::Yes, Final::Aborted),
        abort: (Reach::Maybe, Final::Aborted),
        before: None,
    },
    Row {
        point: "participant::after_prepare_durable",
        target: Target::Participant,
        commit: (Reach::Yes, Final::Aborted),
        abort: (Reach::Maybe, Final::Aborted),
        before: None,
    },
    Row {
        point: "participant::before_outcome_apply",
        target: Target::Participant,
        commit: (Reach::Yes, Final::Committed),
        abort: (Reach::Maybe, Final::Aborted),
        before: None,
    },
    Row {
        point: "participant::after_outcome_apply",
        target: Target::Participant,
        commit: (Reach::Yes, Final::Committed),
        abort: (Reach::Maybe, Final::Aborted),
        before: None,
    },
];

#[derive(Default)]
struct Report {
    runs: usize,
    covered: std::collections::BTreeSet<&'static str>,
    committed: usize,
    aborted: usize,
    unknown: usize,
    violations: Vec<String>,
    longest_in_doubt: Duration,
}

const NAMES: [&str; 3] = ["bank-a", "bank-b", "bank-c"];

async fn run_case(row: &Row, abort_path: bool, seq: usize, report: &mut Report) -> anyhow::Result<()> {
    let (reach, expected) = if abort_path { row.abort } else { row.commit };
    let case = format!("{} / {} path", row.point, if abort_path { "abort" } else { "commit" });
    let bank = Bank { services: NAMES.iter().map(|s| (*s).to_owned()).collect(), accounts: 1, initial: 1000 };
    let mut cluster = ProcCluster::start(&NAMES, ClusterOptions::default()).await?;
    let client = cluster.client()?;
    let seeded = client.execute(bank.seed(), Duration::from_secs(5)).await?;
    anyhow::ensure!(seeded.outcome == Outcome::Committed, "{case}: seeding failed: {:?}", seeded.outcome);
    cluster.quiesce(Duration::from_secs(30)).await?;

    // Re-arm the target with the crash point.
    let first = row.before.unwrap_or(row.point);
    let spec = format!("{first}=return");
    match row.target {
        Target::Coordinator => {
            cluster.coordinator.stop().await?;
            cluster.coordinator.start(Some(&spec)).await?;
        }
        Target::Participant => {
            let p = cluster.participant("bank-b")?;
            p.stop().await?;
            p.start(Some(&spec)).await?;
        }
    }

    // One transfer over all three: bank-a pays bank-b and bank-c.
    let transfer = Transfer {
        id: format!("t{seq}"),
        legs: vec![(0, 0, -10), (1, 0, 5), (2, 0, 5)],
        // bank-c refuses on the abort path.
        extra: abort_path.then(|| (2, "check acct/0 >= 1000000".to_owned())),
    };
    let told = match tokio::time::timeout(Duration::from_secs(20), client.execute(bank.branches(&transfer), Duration::from_secs(3))).await {
        Ok(Ok(f)) => match f.outcome {
            Outcome::Committed => Told::Committed,
            Outcome::Aborted(r) => Told::Aborted(r.to_string()),
        },
        Ok(Err(e)) => Told::Unknown(e.to_string()),
        Err(_) => Told::Unknown("no answer in 20 s".into()),
    };

    let node = match row.target {
        Target::Coordinator => &mut cluster.coordinator,
        Target::Participant => cluster.participant("bank-b")?,
    };
    let died = match reach {
        Reach::No => false,
        Reach::Yes => node.wait_exit(Duration::from_secs(15)).await?,
        Reach::Maybe => node.wait_exit(Duration::from_secs(2)).await?,
    };
    let hit = node.crashed_at(first);
    match reach {
        Reach::Yes => anyhow::ensure!(died && hit, "{case}: the process did not die at {first} (died: {died})"),
        Reach::No => anyhow::ensure!(!hit && node.running(), "{case}: {first} must not be reached on this path"),
        Reach::Maybe => anyhow::ensure!(died == hit, "{case}: the process died without reaching {first}"),
    }
    if died {
        report.covered.insert(first);
        if let Some(_before) = row.before {
            // Crash again while recovering, then recover for good.
            let exited = node.run_until_exit(&format!("{}=return", row.point), Duration::from_secs(30)).await?;
            anyhow::ensure!(exited, "{case}: recovery did not reach {}", row.point);
            anyhow::ensure!(node.crashed_at(row.point), "{case}: recovery died elsewhere than {}", row.point);
            report.covered.insert(row.point);
        }
        node.start(None).await?;
    }
    let (in_doubt, snaps) = cluster.quiesce(Duration::from_secs(60)).await?;
    report.longest_in_doubt = report.longest_in_doubt.max(in_doubt);
    let verdict = check(&bank, &[(transfer.clone(), told.clone())], &snaps);
    report.runs += 1;
    report.committed += verdict.committed;
    report.aborted += verdict.aborted;
    report.unknown += verdict.unknown;
    for v in &verdict.violations {
        report.violations.push(format!("{case}: {v}"));
    }
    let outcome = if verdict.applied == 1 { Final::Committed } else { Final::Aborted };
    if outcome != expected {
        report.violations.push(format!("{case}: expected {expected:?}, got {outcome:?} (client told {told:?})"));
    }
    println!(
        "  {case:<58} reached={died:<5} told={:<10} final={outcome:?} settled in {in_doubt:?}",
        format!("{told:?}").split('(').next().unwrap_or("")
    );
    cluster.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_point_matrix() {
    let repeats: usize = std::env::var("TWOPC_CRASH_REPEATS").ok().and_then(|r| r.parse().ok()).unwrap_or(2);
    let mut report = Report::default();
    let mut seq = 0;
    println!("crash-point matrix: {} points x 2 paths x {repeats} repeats", ROWS.len());
    for _ in 0..repeats {
        for row in ROWS {
            for abort_path in [false, true] {
                seq += 1;
                if let Err(e) = run_case(row, abort_path, seq, &mut report).await {
                    report.violations.push(format!("{} ({} path): {e:#}", row.point, if abort_path { "abort" } else { "commit" }));
                }
            }
        }
    }
    println!(
        "crash matrix: runs {}  crash points covered {}/{}  committed {}  aborted {}  unknown {}  violations {}  longest in doubt after restart {:?}",
        report.runs,
        report.covered.len(),
        ROWS.len(),
        report.committed,
        report.aborted,
        report.unknown,
        report.violations.len(),
        report.longest_in_doubt
    );
    assert!(report.violations.is_empty(), "violations:\n{}", report.violations.join("\n"));
    assert_eq!(report.covered.len(), ROWS.len(), "every crash point must be reached at least once: {:?}", report.covered);
}

/// A participant that restarts while in doubt re-takes its locks before it
/// serves anything, stays in doubt while the coordinator is down (it never
/// decides alone), and resolves once the coordinator is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_doubt_participant_keeps_its_locks_across_a_restart_until_the_coordinator_answers() {
    let bank = Bank { services: NAMES.iter().map(|s| (*s).to_owned()).collect(), accounts: 1, initial: 1000 };
    let mut cluster = ProcCluster::start(&NAMES, ClusterOptions::default()).await.expect("cluster");
    let client = cluster.client().expect("client");
    assert_eq!(client.execute(bank.seed(), Duration::from_secs(5)).await.expect("seed").outcome, Outcome::Committed);
    cluster.quiesce(Duration::from_secs(30)).await.expect("seeded");
    // The coordinator dies after every vote, before deciding: the
    // participants are prepared and in doubt.
    cluster.coordinator.stop().await.expect("stop");
    cluster.coordinator.start(Some("coordinator::before_decision_write=return")).await.expect("arm");
    let t = Transfer { id: "d1".into(), legs: vec![(0, 0, -10), (1, 0, 5), (2, 0, 5)], extra: None };
    let told = client.execute(bank.branches(&t), Duration::from_secs(3)).await;
    assert!(told.is_err(), "the coordinator died before answering: {told:?}");
    assert!(cluster.coordinator.wait_exit(Duration::from_secs(15)).await.expect("wait"), "the coordinator died at the crash point");

    // bank-b restarts while in doubt.
    let b = cluster.participant("bank-b").expect("bank-b");
    b.kill().await.expect("kill");
    b.start(None).await.expect("restart");
    let snap = cluster.snapshot(1).await.expect("snapshot");
    assert_eq!(snap.in_doubt, 1, "the prepared transaction is still in doubt after the restart");
    assert!(snap.locked_keys >= 2, "its locks were re-taken before serving: {} locked", snap.locked_keys);
    assert_eq!(snap.entries.get("acct/0").map(String::as_str), Some("1000"), "nothing applied while in doubt");

    // The coordinator comes back: presumed abort resolves it everywhere.
    cluster.coordinator.start(None).await.expect("coordinator back");
    let (settled, snaps) = cluster.quiesce(Duration::from_secs(30)).await.expect("resolved");
    let verdict = check(&bank, &[(t, Told::Unknown("coordinator died".into()))], &snaps);
    assert!(verdict.violations.is_empty(), "{:?}", verdict.violations);
    assert_eq!(verdict.applied, 0, "a transaction never decided is aborted");
    println!("in doubt for {settled:?} after the coordinator came back");
    cluster.stop().await.expect("stop");
}

/// A participant that restarts after doing unprepared work for a
/// transaction has lost that work; when the transaction calls it again, the
/// coordinator sees a new incarnation enlist and aborts the transaction
/// instead of committing only the part done after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_lost_unprepared_work_aborts_the_transaction() {
    use twopc_examples::pb;
    let mut cluster = ProcCluster::start(&NAMES, ClusterOptions::default()).await.expect("cluster");
    let client = cluster.client().expect("client");
    let seeded = client.execute([("bank-a", b"put balance/x 100".to_vec())], Duration::from_secs(5)).await.expect("seed");
    assert_eq!(seeded.outcome, Outcome::Committed);
    cluster.quiesce(Duration::from_secs(10)).await.expect("seeded");
    let wallet = |addr: std::net::SocketAddr, txn: &twopc_participant::Transaction| {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("url").connect_lazy();
        pb::wallet_client::WalletClient::with_interceptor(ch, txn.interceptor())
    };
    let txn = client.begin(Duration::from_secs(30)).await.expect("begin");
    let addr = cluster.participants[0].addr;
    wallet(addr, &txn).debit(pb::DebitRequest { account: "x".into(), amount: 10, order_id: "o1".into() }).await.expect("first debit");
    // bank-a crashes and comes back: the first debit (unprepared) is gone.
    let a = cluster.participant("bank-a").expect("bank-a");
    a.kill().await.expect("kill");
    a.start(None).await.expect("restart");
    let second = wallet(addr, &txn).debit(pb::DebitRequest { account: "x".into(), amount: 5, order_id: "o2".into() }).await;
    let refused = second.expect_err("the restarted participant cannot join again");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    match txn.commit().await.expect("answers") {
        Outcome::Aborted(r) => assert_eq!(r.code, twopc_participant::AbortCode::ParticipantRestarted, "{r:?}"),
        other => panic!("the transaction must abort, got {other:?}"),
    }
    let (_, snaps) = cluster.quiesce(Duration::from_secs(30)).await.expect("settled");
    assert_eq!(snaps[0].entries.get("balance/x").map(String::as_str), Some("100"), "nothing applied");
    cluster.stop().await.expect("stop");
}

/// A participant that dies while applying COMMIT and comes back on another
/// address (its old one stays dead) still gets the decision from the
/// coordinator, which sends phase two to where the participant is
/// registered now: the transaction leaves the in-doubt list, and is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phase_two_follows_a_participant_that_restarts_on_a_new_address() {
    let bank = Bank { services: NAMES.iter().map(|s| (*s).to_owned()).collect(), accounts: 1, initial: 1000 };
    let mut cluster = ProcCluster::start(&NAMES, ClusterOptions { proxies: true, ..ClusterOptions::default() }).await.expect("cluster");
    let client = cluster.client().expect("client");
    assert_eq!(client.execute(bank.seed(), Duration::from_secs(5)).await.expect("seed").outcome, Outcome::Committed);
    cluster.quiesce(Duration::from_secs(30)).await.expect("seeded");

    let a = cluster.participant("bank-a").expect("bank-a");
    a.kill().await.expect("kill");
    a.start(Some("participant::before_outcome_apply=return")).await.expect("arm");
    let t = Transfer { id: "m1".into(), legs: vec![(0, 0, -10), (1, 0, 5), (2, 0, 5)], extra: None };
    let told = client.execute(bank.branches(&t), Duration::from_secs(5)).await.expect("answered");
    assert_eq!(told.outcome, Outcome::Committed, "decided before bank-a applied it");
    let a = cluster.participant("bank-a").expect("bank-a");
    assert!(a.wait_exit(Duration::from_secs(15)).await.expect("wait"), "bank-a died applying COMMIT");

    // Its old address goes dark for good; it comes back advertising its own.
    cluster.participant_proxies[0].cut();
    let a = cluster.participant("bank-a").expect("bank-a");
    let moved = a.url();
    a.set_advertise(&moved);
    a.start(None).await.expect("restart on the new address");
    let (settled, snaps) = cluster.quiesce(Duration::from_secs(30)).await.expect("the coordinator reaches bank-a at its new address");
    let verdict = check(&bank, &[(t, Told::Committed)], &snaps);
    assert!(verdict.violations.is_empty(), "{:?}", verdict.violations);
    assert_eq!(verdict.applied, 1);
    println!("settled {settled:?} after bank-a came back on {moved}");
    cluster.stop().await.expect("stop");
}

/// One-phase commit through a coordinator crash: a transaction with one
/// participant commits there in one phase, and the coordinator dies before
/// recording it (the initiator may not have heard the answer). Restarted,
/// the coordinator does not presume it aborted: Status waits
/// (OUTCOME_BEING_COLLECTED) until the participant has reported its
/// one-phase commits, then answers COMMITTED, and the participant's record
/// is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_commit_is_collected_after_the_coordinator_dies_before_recording_it() {
    use twopc_examples::pb;
    let mut cluster = ProcCluster::start(&NAMES, ClusterOptions::default()).await.expect("cluster");
    let client = cluster.client().expect("client");
    let seeded = client.execute([("bank-a", b"put balance/x 100".to_vec())], Duration::from_secs(5)).await.expect("seed");
    assert_eq!(seeded.outcome, Outcome::Committed, "the seed itself commits in one phase");
    cluster.quiesce(Duration::from_secs(10)).await.expect("seeded");

    cluster.coordinator.stop().await.expect("stop");
    cluster.coordinator.start(Some("coordinator::before_decision_write=return")).await.expect("arm");
    let txn = client.begin(Duration::from_secs(30)).await.expect("begin");
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.participants[0].addr)).expect("url").connect_lazy();
    let mut wallet = pb::wallet_client::WalletClient::with_interceptor(ch, txn.interceptor());
    wallet.debit(pb::DebitRequest { account: "x".into(), amount: 10, order_id: "o1".into() }).await.expect("debit");
    let told = txn.commit().await;
    assert!(cluster.coordinator.wait_exit(Duration::from_secs(15)).await.expect("wait"), "the coordinator died");
    assert!(cluster.coordinator.crashed_at("coordinator::before_decision_write"), "before recording the one-phase commit");
    let snap = cluster.snapshot(0).await.expect("snapshot");
    assert_eq!(snap.entries.get("balance/x").map(String::as_str), Some("90"), "bank-a committed in one phase");

    cluster.coordinator.start(None).await.expect("restart");
    // Until bank-a has reported, Status is UNAVAILABLE (transient): "not
    // known yet", never "presumed aborted".
    let state = twopc_tests::poll("Status to answer after the restart", Duration::from_secs(30), || {
        let (client, id) = (client.clone(), txn.id());
        async move {
            match client.status(id).await {
                Ok(s) => Ok(s.state),
                Err(twopc_participant::ClientError::Unavailable(m)) => Err(format!("unavailable: {m}")),
                Err(e) => panic!("Status of {id} refused: {e}"),
            }
        }
    })
    .await;
    assert_eq!(state, twopc_proto::pb::TxnState::Committed as i32, "Status after the restart (the client was told {told:?})");
    let (_, snaps) = cluster.quiesce(Duration::from_secs(30)).await.expect("settled");
    assert_eq!(snaps[0].entries.get("balance/x").map(String::as_str), Some("90"), "applied once");
    cluster.stop().await.expect("stop");
}
