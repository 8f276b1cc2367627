//! Operating the daemon end to end: the real `twopc-coordinator` binary with
//! its admin HTTP listener (`/metrics`, `/healthz`, `/readyz`) after real
//! transactions through two example services and the `twopc` CLI, and the
//! configuration precedence (flags > `TWOPC_*` environment > `--config`
//! TOML file > defaults) as `config show` reports it. Needs the binaries
//! built (`cargo build --release --workspace --bins`).
//!
//! The admin endpoints are read with a hand-written HTTP/1.1 GET over a
//! plain TCP connection, as a probe or a scraper would.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use twopc_examples::pb::DebitRequest;
use twopc_examples::pb::wallet_client::WalletClient;
use twopc_examples::procs::Proc;
use twopc_participant::TxnInterceptor;

const WITHIN: Duration = Duration::from_secs(60);

/// `GET path` on `addr`; the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the admin listener");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send the request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("the admin listener answers within 10 s")
        .expect("read the response");
    let text = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response with a header block");
    let status = head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("no status code in {head:?}"));
    (status, body.to_owned())
}

/// What of `needles` a body lacks.
fn missing<'a>(body: &str, needles: &[&'a str]) -> Vec<&'a str> {
    needles.iter().copied().filter(|n| !body.contains(n)).collect()
}

/// Polls `GET path` until the body contains every needle; returns it.
async fn scrape_until(addr: SocketAddr, path: &str, needles: &[&str]) -> String {
    twopc_tests::poll(&format!("{path} with {needles:?}"), Duration::from_secs(20), || async move {
        let (status, body) = get(addr, path).await;
        let lacks = missing(&body, needles);
        if status == 200 && lacks.is_empty() { Ok(body) } else { Err(format!("{status}, without {lacks:?}:\n{body}")) }
    })
    .await
}

/// The value of the sample line `series` (name and labels exactly as
/// rendered) in a Prometheus text body.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn twopc(coordinator: &str, args: &[&str]) -> (i32, String, String) {
    let r = twopc_tests::twopc_cli(coordinator, args).await;
    (r.code, r.stdout, r.stderr)
}

/// The daemon on free loopback ports with its data under `dir`.
async fn start_coordinator(dir: &Path) -> Proc {
    Proc::coordinator(&dir.join("c"), &dir.join("c.log"), WITHIN).await.expect("coordinator starts")
}

async fn start_services(dir: &Path, coordinator: &str) -> Vec<Proc> {
    twopc_tests::shop_services(dir, coordinator, &["wallet", "orders"]).await
}

#[tokio::test]
async fn admin_listener_serves_metrics_health_and_readiness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = start_coordinator(dir.path()).await;
    let admin: SocketAddr = c
        .next_line("admin listening on ", WITHIN)
        .await
        .expect("prints the admin address after the gRPC one")
        .parse()
        .expect("a socket address");
    assert_ne!(admin.port(), 0, "port 0 is resolved to the bound port");

    assert_eq!(get(admin, "/healthz").await.0, 200, "live while the process runs");
    scrape_until(admin, "/readyz", &["ready"]).await;
    assert_eq!(get(admin, "/nowhere").await.0, 404);

    let mut ps = start_services(dir.path(), &c.url()).await;
    let url = c.url();
    let (code, out, err) = twopc(&url, &["execute", "--branch", "wallet=put balance/m 5", "--branch", "orders=put order/m 1"]).await;
    assert_eq!(code, 0, "execute commits: {out} {err}");
    let (code, out, err) =
        twopc(&url, &["execute", "-b", "wallet=incr balance/m -10; check balance/m >= 0", "-b", "orders=put order/n 1"]).await;
    assert_eq!(code, 3, "a NO vote aborts: {out} {err}");

    // Phase two and the gauges settle just after the initiator hears the
    // outcome: poll for the final values.
    let body = scrape_until(
        admin,
        "/metrics",
        &[
            "twopc_transactions_total{outcome=\"committed\"} 1",
            "twopc_transactions_total{outcome=\"aborted\",reason=\"PARTICIPANT_VOTED_NO\"} 1",
            "twopc_transaction_seconds_count{outcome=\"committed\"} 1",
            "twopc_phase_two_seconds_count{decision=\"commit\"} 1",
            "twopc_in_doubt 0",
            "twopc_in_flight 0",
        ],
    )
    .await;
    // Real histograms (buckets, sum, count), not summaries.
    assert!(body.contains("twopc_transaction_seconds_bucket{outcome=\"committed\",le=\"+Inf\"} 1"), "{body}");
    assert!(body.contains("# TYPE twopc_transaction_seconds histogram"), "{body}");
    assert_eq!(sample(&body, "twopc_prepare_seconds_count"), Some(2.0), "both transactions prepared:\n{body}");
    assert_eq!(sample(&body, "twopc_decision_write_seconds_count"), Some(1.0), "one COMMIT decision was forced:\n{body}");
    assert!(sample(&body, "twopc_log_sync_seconds_count").is_some_and(|n| n >= 1.0), "the log writer's fsyncs:\n{body}");
    assert!(sample(&body, "twopc_log_batch_requests_count").is_some_and(|n| n >= 1.0), "group-commit batch sizes:\n{body}");
    assert_eq!(sample(&body, "twopc_oldest_in_doubt_seconds"), Some(0.0), "{body}");
    assert!(body.contains("# HELP twopc_transactions_total"), "metrics are described:\n{body}");

    for p in ps.iter_mut() {
        let s = p.terminate(Duration::from_secs(10)).await.expect("service stops on SIGTERM");
        assert!(s.success(), "{} exited with {s}", p.name);
    }
    let s = c.terminate(Duration::from_secs(10)).await.expect("coordinator stops on SIGTERM");
    assert!(s.success(), "coordinator exited with {s}");
}

/// `twopc-coordinator ARGS` with exactly the environment `env`.
async fn coordinator(args: &[&str], env: &[(&str, &str)]) -> twopc_tests::Ran {
    twopc_tests::run_binary("twopc-coordinator", args, Some(env)).await
}

#[tokio::test]
async fn config_show_applies_flags_over_env_over_file_over_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("coordinator.toml");
    std::fs::write(&file, "default_timeout = \"7s\"\nmax_branches = 10\nprepare_timeout = \"3s\"\nlog_format = \"json\"\n")
        .expect("write config");
    let file = file.display().to_string();

    let env = [("TWOPC_CONFIG", file.as_str()), ("TWOPC_RETENTION", "1m"), ("TWOPC_PREPARE_TIMEOUT", "4s"), ("TWOPC_LOG", "debug")];
    let shown = coordinator(&["--max-branches", "20", "config", "show", "--log", "warn"], &env).await;
    assert_eq!(shown.code, 0, "config show exits 0: {}", shown.stderr);
    for line in [
        "default_timeout = \"7s\"",          // the file over the default
        "max_branches = 20",                 // a flag over the file
        "retention = \"1m\"",                // the environment over the default
        "prepare_timeout = \"4s\"",          // the environment over the file
        "log = \"warn\"",                    // a flag over the environment
        "log_format = \"json\"",             // the file
        "max_timeout = \"5m\"",              // the default
        "admin_listen = \"127.0.0.1:9464\"", // the default
    ] {
        assert!(shown.stdout.lines().any(|l| l == line), "config show lacks {line:?}:\n{}", shown.stdout);
    }

    // What config show prints is itself a valid configuration file.
    let again = dir.path().join("shown.toml");
    std::fs::write(&again, &shown.stdout).expect("write");
    let round = coordinator(&["--config", &again.display().to_string(), "config", "show"], &[]).await;
    assert_eq!((round.code, round.stdout.as_str()), (0, shown.stdout.as_str()), "{}", round.stderr);

    // An unknown key, or a value that does not parse: one line, exit 2.
    for (text, needle) in [
        ("default_timeout = \"7s\"\nbogus = 1\n", "unknown field `bogus`"),
        ("retention = \"soon\"\n", "invalid duration"),
        ("max_branches = [\n", ":1:"),
    ] {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, text).expect("write");
        let r = coordinator(&["--config", &bad.display().to_string()], &[]).await;
        assert_eq!(r.code, 2, "{text:?}: exit code 2, got {} ({})", r.code, r.stderr);
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "{text:?}: one line on stderr, got {:?}", r.stderr);
        assert!(
            r.stderr.contains("bad.toml:") && r.stderr.contains(needle),
            "{text:?}: {:?} should name the file and {needle:?}",
            r.stderr
        );
        assert!(r.stdout.is_empty(), "nothing starts: {:?}", r.stdout);
    }
    // The OTLP endpoint: from the standard variable, shown; not a URL, refused.
    let otlp = coordinator(&["config", "show"], &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")]).await;
    assert!(otlp.stdout.lines().any(|l| l == "otlp_endpoint = \"http://127.0.0.1:4317\""), "{}", otlp.stdout);
    let bad = coordinator(&["--otlp-endpoint", "127.0.0.1:4317", "config", "show"], &[]).await;
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("otlp_endpoint \"127.0.0.1:4317\" must be an http:// or https:// URL"), "{}", bad.stderr);
    let missing = coordinator(&["--config", "/nonexistent/twopc.toml", "config", "show"], &[]).await;
    assert_eq!(missing.code, 2, "{}", missing.stderr);
    assert!(missing.stderr.contains("cannot read the configuration file"), "{}", missing.stderr);
}

/// The participant library records through the same facade, so a service
/// that installs an exporter (here the coordinator's, in-process) serves its
/// metrics too.
#[tokio::test]
async fn participant_metrics_reach_the_process_exporter() {
    let metrics = twopc_coordinator::instruments::install().expect("the first recorder of this test process");
    let (c, ps) = twopc_tests::cluster(&["wallet", "orders"]).await;
    let client = c.client();
    let ok = client.execute([("wallet", "put balance/p 5"), ("orders", "put order/p 1")], Duration::from_secs(5)).await.expect("execute");
    assert_eq!(ok.outcome, twopc_participant::Outcome::Committed);
    let no = client
        .execute([("wallet", "incr balance/p -10; check balance/p >= 0"), ("orders", "put order/q 1")], Duration::from_secs(5))
        .await
        .expect("execute");
    assert!(matches!(no.outcome, twopc_participant::Outcome::Aborted(_)), "{:?}", no.outcome);
    twopc_tests::settled(&ps).await;

    let needles = [
        "twopc_participant_prepares_total{participant=\"wallet\",vote=\"yes\"} 1",
        "twopc_participant_prepares_total{participant=\"wallet\",vote=\"no\"} 1",
        "twopc_participant_outcomes_applied_total{participant=\"wallet\",outcome=\"commit\"} 1",
        "twopc_participant_outcomes_applied_total{participant=\"orders\",outcome=\"commit\"} 1",
        "twopc_participant_in_doubt{participant=\"wallet\"} 0",
        "twopc_participant_in_doubt{participant=\"orders\"} 0",
    ];
    twopc_tests::poll("the participants' metrics", Duration::from_secs(20), || {
        let body = metrics.render();
        let lacks = missing(&body, &needles);
        std::future::ready(if lacks.is_empty() { Ok(()) } else { Err(format!("without {lacks:?}:\n{body}")) })
    })
    .await;
    for p in ps {
        p.stop().await;
    }
    c.stop().await;
}

/// The kinds, participants and details of `twopc --output json show TXN`.
async fn timeline(url: &str, txn: &str) -> (serde_json::Value, Vec<(String, String, String)>) {
    let (code, out, err) = twopc(url, &["--output", "json", "show", txn]).await;
    assert_eq!(code, 0, "show {txn}: {out} {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("show prints JSON ({e}): {out}"));
    let events = v["timeline"]
        .as_array()
        .unwrap_or_else(|| panic!("a timeline array: {out}"))
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (s("event"), s("participant"), s("detail"))
        })
        .collect();
    (v, events)
}

/// The timeline of `txn` once its phase two finished (polled).
async fn finished_timeline(url: &str, txn: &str) -> Vec<(String, String, String)> {
    twopc_tests::poll(&format!("phase two of {txn} to finish"), WITHIN, || async move {
        let events = timeline(url, txn).await.1;
        if events.iter().any(|(k, _, _)| k == "FINISHED") { Ok(events) } else { Err(format!("{events:?}")) }
    })
    .await
}

/// Position of the first event of `kind` (for `participant`, when given).
fn at(events: &[(String, String, String)], kind: &str, participant: &str) -> usize {
    events
        .iter()
        .position(|(k, p, _)| k == kind && (participant.is_empty() || p == participant))
        .unwrap_or_else(|| panic!("no {kind} {participant} in {events:?}"))
}

async fn listed(url: &str, filters: &[&str]) -> Vec<String> {
    let mut args = vec!["--output", "json", "list"];
    args.extend_from_slice(filters);
    let (code, out, err) = twopc(url, &args).await;
    assert_eq!(code, 0, "list {filters:?}: {out} {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("list prints JSON ({e}): {out}"));
    v["transactions"].as_array().map(|a| a.iter().filter_map(|t| t["txn_id"].as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

#[tokio::test]
async fn show_gives_the_timeline_and_list_filters_by_state_age_and_participant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = start_coordinator(dir.path()).await;
    let mut ps = start_services(dir.path(), &c.url()).await;
    let url = c.url();
    let id =
        |out: &str| out.split_whitespace().find(|w| w.starts_with("tx-")).map(str::to_owned).unwrap_or_else(|| panic!("an id in {out:?}"));

    let (code, out, err) = twopc(&url, &["execute", "-b", "wallet=put balance/t 5", "-b", "orders=put order/t 1"]).await;
    assert_eq!(code, 0, "{out} {err}");
    let committed = id(&out);
    let (code, out, err) =
        twopc(&url, &["execute", "-b", "wallet=incr balance/t -10; check balance/t >= 0", "-b", "orders=put order/u 1"]).await;
    assert_eq!(code, 3, "{out} {err}");
    let aborted = id(&err);
    let (code, out, err) = twopc(&url, &["begin", "--timeout", "5m"]).await;
    assert_eq!(code, 0, "{out} {err}");
    let active = out.trim().to_owned();

    // The committed one, once phase two is over: each participant's
    // Prepare, vote, COMMIT and acknowledgement in protocol order.
    let events = finished_timeline(&url, &committed).await;
    assert_eq!(at(&events, "BEGUN", ""), 0, "{events:?}");
    assert!(events[0].2.contains("execute on orders, wallet") || events[0].2.contains("execute on wallet, orders"), "{events:?}");
    let decided = at(&events, "COMMITTED", "");
    assert!(at(&events, "DECISION_WRITE_STARTED", "") < decided, "{events:?}");
    for p in ["wallet", "orders"] {
        assert!(at(&events, "PREPARE_SENT", p) < at(&events, "VOTED", p), "{events:?}");
        assert!(at(&events, "VOTED", p) < at(&events, "DECISION_WRITE_STARTED", ""), "{events:?}");
        assert_eq!(events[at(&events, "VOTED", p)].2, "YES");
        assert!(decided < at(&events, "DECISION_SENT", p), "{events:?}");
        assert_eq!(events[at(&events, "DECISION_SENT", p)].2, "COMMIT, attempt 1");
        assert!(at(&events, "DECISION_SENT", p) < at(&events, "ACKNOWLEDGED", p), "{events:?}");
        assert!(at(&events, "ACKNOWLEDGED", p) < at(&events, "FINISHED", ""), "{events:?}");
    }

    // The aborted one: the NO vote with the participant's reason, then the
    // decision naming it.
    let (v, events) = timeline(&url, &aborted).await;
    assert_eq!(v["status"]["state"], "aborted", "{v}");
    let no = &events[at(&events, "VOTED", "wallet")];
    assert!(no.2.starts_with("NO: ") && no.2.contains("balance/t"), "{events:?}");
    assert!(events[at(&events, "ABORTED", "")].2.contains("wallet voted no"), "{events:?}");

    // The active one has begun and nothing more.
    let (_, events) = timeline(&url, &active).await;
    assert_eq!(events.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["BEGUN"], "{events:?}");
    let (code, out, _) = twopc(&url, &["show", &active]).await;
    assert_eq!(code, 0);
    assert!(out.contains(&format!("{active} active")) && out.contains("timeline:") && out.contains("BEGUN"), "table output:\n{out}");

    assert_eq!(listed(&url, &["--state", "active"]).await, [active.as_str()]);
    assert_eq!(listed(&url, &["--state", "committed"]).await, [committed.as_str()]);
    assert_eq!(listed(&url, &["--state", "committed", "--state", "aborted"]).await, [committed.as_str(), aborted.as_str()]);
    assert_eq!(listed(&url, &["--participant", "orders"]).await, [committed.as_str(), aborted.as_str()]);
    assert_eq!(listed(&url, &["--participant", "inventory"]).await, Vec::<String>::new());
    assert_eq!(listed(&url, &["--older-than", "1h"]).await, Vec::<String>::new());
    assert_eq!(listed(&url, &["--older-than", "0s", "--state", "active"]).await, [active.as_str()]);
    let (code, _, err) = twopc(&url, &["list", "--participant", "bad name"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("twopc: error: ") && err.contains("PARTICIPANT_NAME_INVALID") && err.lines().count() == 1, "{err}");

    // Aborting the active one by hand shows in its timeline.
    let (code, _, err) = twopc(&url, &["abort", &active, "--reason", "operator"]).await;
    assert_eq!(code, 0, "{err}");
    let (_, events) = timeline(&url, &active).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(kinds, ["BEGUN", "ABORT_REQUESTED", "ABORTED", "FINISHED"], "{events:?}");
    assert_eq!(events[1].2, "operator");

    // One run from code: Begin, a business call under it (the service
    // enlists), Commit — the timeline has each step, in order.
    let (code, out, err) = twopc(&url, &["begin"]).await;
    assert_eq!(code, 0, "{err}");
    let coded = out.trim().to_owned();
    let channel = tonic::transport::Endpoint::from_shared(ps[0].url()).expect("an endpoint").connect().await.expect("connects");
    WalletClient::with_interceptor(channel, TxnInterceptor::new(coded.parse().expect("an id")))
        .debit(DebitRequest { account: "t".into(), amount: 1, order_id: "s1".into() })
        .await
        .expect("the debit runs under the transaction");
    let (code, _, err) = twopc(&url, &["commit", &coded]).await;
    assert_eq!(code, 0, "{err}");
    let events = finished_timeline(&url, &coded).await;
    let steps: Vec<(&str, &str)> = events.iter().map(|(k, p, _)| (k.as_str(), p.as_str())).collect();
    assert_eq!(
        steps,
        [
            ("BEGUN", ""),
            ("ENLISTED", "wallet"),
            ("COMMIT_REQUESTED", ""),
            ("PREPARE_SENT", "wallet"),
            ("VOTED", "wallet"),
            ("COMMITTED", ""),
            ("DECISION_WRITE_STARTED", ""),
            ("DECISION_SENT", "wallet"),
            ("ACKNOWLEDGED", "wallet"),
            ("FINISHED", ""),
        ],
        "{events:?}"
    );
    // One participant: one phase. Its durable answer is the outcome; the
    // coordinator records it afterwards, then releases the participant.
    let details: Vec<&str> = events.iter().map(|(_, _, d)| d.as_str()).collect();
    assert_eq!(
        (details[3], details[4], details[5]),
        ("one phase", "COMMITTED (one phase)", "committed in one phase by wallet"),
        "{events:?}"
    );
    assert_eq!(events[1].2, ps[0].url(), "the enlistment names the endpoint");

    for p in ps.iter_mut() {
        p.terminate(Duration::from_secs(10)).await.expect("service stops");
    }
    let s = c.terminate(Duration::from_secs(10)).await.expect("coordinator stops on SIGTERM");
    assert!(s.success(), "coordinator exited with {s}");
}
