//! The user's binaries end to end: `twopc-coordinator` and two example
//! services as real processes, driven by the `twopc` CLI. Needs the
//! binaries built (`cargo build --release --workspace --bins`, which the
//! test script does first).

use std::path::Path;
use std::time::Duration;

use twopc_examples::procs::Proc;

use twopc_tests::twopc_cli as twopc;

async fn start(dir: &Path) -> (Proc, Vec<Proc>) {
    let within = Duration::from_secs(60);
    let c = Proc::coordinator(&dir.join("c"), &dir.join("c.log"), within).await.expect("coordinator starts");
    let ps = twopc_tests::shop_services(dir, &c.url(), &["wallet", "orders"]).await;
    (c, ps)
}

fn one_line(s: &str) -> bool {
    s.trim_end().lines().count() == 1
}

#[tokio::test]
async fn cli_execute_status_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut c, mut ps) = start(dir.path()).await;
    let url = c.url();

    let ok = twopc(&url, &["execute", "--branch", "wallet=put balance/x 5", "--branch", "orders=put order/x 1; incr revenue 5"]).await;
    assert_eq!(ok.code, 0, "execute commits: {} {}", ok.stdout, ok.stderr);
    let txn = ok.stdout.trim().strip_prefix("committed ").expect("prints committed TXN").to_owned();
    assert!(txn.parse::<twopc_proto::TxnId>().is_ok(), "{txn}");

    let st = twopc(&url, &["status", &txn]).await;
    assert_eq!(st.code, 0, "{}", st.stderr);
    assert!(st.stdout.starts_with(&format!("{txn} committed")), "{}", st.stdout);
    let js = twopc(&url, &["--json", "status", &txn]).await;
    assert!(js.stdout.contains("\"state\":\"committed\""), "{}", js.stdout);

    // One participant: committed in one phase, its vote says so.
    let one = twopc(&url, &["execute", "--branch", "wallet=put balance/z 1"]).await;
    assert_eq!(one.code, 0, "{}", one.stderr);
    let single = one.stdout.trim().strip_prefix("committed ").expect("prints committed TXN").to_owned();
    let st = twopc(&url, &["status", &single]).await;
    assert!(st.stdout.contains("vote=committed"), "{}", st.stdout);

    let list = twopc(&url, &["list"]).await;
    assert_eq!(list.code, 0, "{}", list.stderr);
    // (Phase two may still be finishing: the in-doubt count is 0 or 1.)
    assert!(list.stdout.contains(" in doubt; oldest in doubt ") && list.stdout.contains(&txn), "{}", list.stdout);
    let doubt = twopc(&url, &["--json", "list", "--in-doubt"]).await;
    assert_eq!(doubt.code, 0, "{}", doubt.stderr);
    assert!(doubt.stdout.starts_with("{\"in_doubt\":"), "{}", doubt.stdout);

    let no = twopc(&url, &["execute", "-b", "wallet=incr balance/x -10; check balance/x >= 0", "-b", "orders=put order/y 1"]).await;
    assert_eq!(no.code, 3, "an aborted transaction exits 3: {} {}", no.stdout, no.stderr);
    assert!(one_line(&no.stderr) && no.stderr.contains("wallet voted no"), "{}", no.stderr);

    for (args, needle) in [
        (vec!["status", "garbage"], "malformed transaction id"),
        (vec!["status", "tx-999-1"], "never begun"),
        (vec!["commit", "tx-999-1"], "never begun"),
        (vec!["execute", "-b", "nobody"], "not NAME=PAYLOAD"),
        (vec!["execute", "-b", "ghost=put a 1"], "PARTICIPANT_UNKNOWN"),
        (vec!["execute", "-b", "wallet="], "voted no"),
    ] {
        let r = twopc(&url, &args).await;
        assert_ne!(r.code, 0, "{args:?} must fail");
        assert!(one_line(&r.stderr), "{args:?}: one line, got {:?}", r.stderr);
        assert!(r.stderr.contains(needle), "{args:?}: {:?} should mention {needle:?}", r.stderr);
    }
    let unreachable = twopc("http://127.0.0.1:1", &["status", "tx-1-1"]).await;
    assert_eq!(unreachable.code, 1);
    assert!(one_line(&unreachable.stderr) && unreachable.stderr.contains("cannot reach"), "{}", unreachable.stderr);

    // The daemon refuses bad flags with one line and a non-zero exit.
    let bad = twopc_tests::run_binary("twopc-coordinator", &["--listen", "nonsense"], None).await;
    assert_ne!(bad.code, 0);

    for p in ps.iter_mut() {
        let s = p.terminate(Duration::from_secs(10)).await.expect("service stops on SIGTERM");
        assert!(s.success(), "{} exited with {s}", p.name);
    }
    let s = c.terminate(Duration::from_secs(10)).await.expect("coordinator stops on SIGTERM");
    assert!(s.success(), "coordinator exited with {s}");

    // Forensics, offline: the decision log shows the committed transaction.
    let dump = twopc(&url, &["log", "dump", "--data-dir", &dir.path().join("c").display().to_string()]).await;
    assert_eq!(dump.code, 0, "{}", dump.stderr);
    assert!(dump.stdout.contains(&txn) && dump.stdout.contains("COMMIT") && dump.stdout.contains("participant wallet"), "{}", dump.stdout);
    let js = twopc(&url, &["--json", "log", "dump", "--data-dir", &dir.path().join("c").display().to_string()]).await;
    assert!(js.stdout.contains(&format!("\"txn_id\":\"{txn}\"")), "{}", js.stdout);
    // The one-participant Execute above ran in one phase: its run's marker
    // waits for the next start to collect wallet's one-phase outcomes.
    assert!(dump.stdout.contains("one-phase marker: run") && dump.stdout.contains("with wallet"), "{}", dump.stdout);
    assert!(js.stdout.contains("\"one_phase_markers\":[{\"epoch\":"), "{}", js.stdout);
    let missing = twopc(&url, &["log", "dump", "--data-dir", &dir.path().join("nothing").display().to_string()]).await;
    assert_eq!(missing.code, 1);
    assert!(one_line(&missing.stderr) && missing.stderr.contains("holds no store"), "{}", missing.stderr);
}
