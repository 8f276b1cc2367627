//! The benchmark runs end to end and reports what it promises (no speed is
//! asserted: the figures are for docs/BENCHMARKS.md, not for tests).

use twopc_examples::procs::binary;

#[tokio::test]
async fn bench_reports_runs_baselines_and_process_figures() {
    let out = tokio::process::Command::new(binary("twopc-bench").expect("twopc-bench is built"))
        .args(["--participants", "2", "--concurrency", "4", "--duration", "500ms", "--warmup", "100ms", "--json", "--quiet"])
        .output()
        .await
        .expect("runs");
    assert!(out.status.success(), "twopc-bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let run = &r["runs"][0];
    assert_eq!(run["concurrency"], 4);
    assert!(run["committed_per_s"].as_f64().is_some_and(|v| v > 0.0), "{run}");
    assert!(run["latency"]["p99_us"].as_u64().is_some(), "{run}");
    assert!(run["baseline_direct"]["writes_per_s"].as_f64().is_some_and(|v| v > 0.0), "{run}");
    assert_eq!(run["processes"].as_array().map(Vec::len), Some(3), "coordinator and two participants: {run}");
    assert!(r["floor"]["fsync_p50_us"].as_u64().is_some_and(|v| v > 0), "{r}");
    // Bad input: one line, non-zero exit.
    let bad =
        tokio::process::Command::new(binary("twopc-bench").expect("built")).args(["--abort-share", "2"]).output().await.expect("runs");
    assert!(!bad.status.success());
    assert_eq!(String::from_utf8_lossy(&bad.stderr).trim().lines().count(), 1, "{}", String::from_utf8_lossy(&bad.stderr));
}
