//! The coordinator's metrics: their names and what each means, and the
//! Prometheus recorder the daemon installs to serve them.
//!
//! Everything is recorded through the `metrics` facade: the driver records
//! transaction outcomes, phase latencies, retries and gauges (never the
//! core, which stays free of IO); `twopc_storage`'s log writer records
//! [`twopc_storage::METRIC_SYNC_SECONDS`] and
//! [`twopc_storage::METRIC_BATCH_REQUESTS`]. Until a recorder is installed
//! every recording is a no-op, so tests and embedders that install none pay
//! nearly nothing.
//!
//! [`install`] installs one Prometheus recorder per process (the facade has
//! one global recorder) and returns a handle that renders the text format;
//! histograms are rendered as Prometheus histograms with the fixed buckets
//! below, not as summaries, so they aggregate across instances.
//! docs/OPERATIONS.md lists every metric and which ones to alert on.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter of decided transactions, by `outcome` (`committed`, `aborted`)
/// and, for aborts, `reason` (the abort code, e.g. `PARTICIPANT_VOTED_NO`).
pub const TRANSACTIONS: &str = "twopc_transactions_total";
/// Histogram of begin → decision (the outcome the initiator is told), in
/// seconds, by `outcome`.
pub const TRANSACTION_SECONDS: &str = "twopc_transaction_seconds";
/// Histogram of the prepare phase, from Commit (Prepares sent) to the last
/// vote or the abort, in seconds.
pub const PREPARE_SECONDS: &str = "twopc_prepare_seconds";
/// Histogram of the synced write of a COMMIT decision record, in seconds
/// (submission to fsync done, including the group-commit queue).
pub const DECISION_WRITE_SECONDS: &str = "twopc_decision_write_seconds";
/// Histogram of phase two, from the decision to the last acknowledgement,
/// in seconds, by `decision` (`commit`, `abort`).
pub const PHASE_TWO_SECONDS: &str = "twopc_phase_two_seconds";
/// Counter of failed phase-two deliveries (each is retried with backoff),
/// by `decision`.
pub const PHASE_TWO_RETRIES: &str = "twopc_phase_two_retries_total";
/// Histogram: messages per `Participant.Deliver` batch sent.
pub const DELIVER_BATCH_MESSAGES: &str = "twopc_deliver_batch_messages";
/// Gauge of transactions begun and not yet finished (phase two included).
pub const IN_FLIGHT: &str = "twopc_in_flight";
/// Gauge of transactions in doubt: past phase one, phase two not finished;
/// participants may hold prepared locks until it finishes.
pub const IN_DOUBT: &str = "twopc_in_doubt";
/// Gauge of the age of the oldest in-doubt transaction, in seconds (0 when
/// none).
pub const OLDEST_IN_DOUBT_SECONDS: &str = "twopc_oldest_in_doubt_seconds";
/// Gauge: participants whose one-phase outcomes of earlier runs are not
/// collected yet (Status of those runs' unknown transactions waits).
pub const ONE_PHASE_UNCOLLECTED: &str = "twopc_one_phase_uncollected_participants";

/// How often the driver refreshes the gauges that need a scan of the core
/// ([`IN_FLIGHT`], [`IN_DOUBT`], [`OLDEST_IN_DOUBT_SECONDS`]).
pub const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// Bucket bounds (seconds) of every latency histogram: 0.5 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Bucket bounds of [`twopc_storage::METRIC_BATCH_REQUESTS`]: powers of two
/// up to the writer's largest group.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// How often histogram samples are folded into their buckets when nothing
/// scrapes, so that memory stays bounded.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the process's Prometheus recorder the first time it is called
/// and returns a handle to render its metrics; later calls return the same
/// handle. Fails (every time) if something else installed a recorder first.
pub fn install() -> Result<PrometheusHandle, String> {
    HANDLE.get_or_init(build).clone()
}

fn build() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(twopc_storage::METRIC_BATCH_REQUESTS.into()), BATCH_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(DELIVER_BATCH_MESSAGES.into()), BATCH_BUCKETS))
        .and_then(|b| b.install_recorder())
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe();
    // Series that alerts watch start at 0 rather than appearing with their
    // first increment, so that increase() sees the first one too.
    metrics::counter!(TRANSACTIONS, "outcome" => "committed").absolute(0);
    for decision in ["commit", "abort"] {
        metrics::counter!(PHASE_TWO_RETRIES, "decision" => decision).absolute(0);
    }
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new().name("twopc-metrics-upkeep".into()).spawn(move || {
        loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        }
    });
    if let Err(e) = spawned {
        // Scrapes still drain the histograms; only an unscraped process
        // grows.
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
    }
    Ok(handle)
}

/// The HELP lines of every coordinator metric.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(TRANSACTIONS, "Decided transactions by outcome and, for aborts, reason.");
    describe_histogram!(TRANSACTION_SECONDS, Unit::Seconds, "Begin to decision, by outcome.");
    describe_histogram!(PREPARE_SECONDS, Unit::Seconds, "Prepare phase: Commit to the last vote or the abort.");
    describe_histogram!(DECISION_WRITE_SECONDS, Unit::Seconds, "Synced write of a COMMIT decision record.");
    describe_histogram!(PHASE_TWO_SECONDS, Unit::Seconds, "Decision to the last phase-two acknowledgement, by decision.");
    describe_counter!(PHASE_TWO_RETRIES, "Failed phase-two deliveries (each is retried), by decision.");
    describe_histogram!(DELIVER_BATCH_MESSAGES, "Prepare/Commit/Abort messages per Deliver call to a participant (batched delivery).");
    describe_gauge!(IN_FLIGHT, "Transactions begun and not finished.");
    describe_gauge!(IN_DOUBT, "Transactions past phase one whose phase two is not finished.");
    describe_gauge!(OLDEST_IN_DOUBT_SECONDS, Unit::Seconds, "Age of the oldest in-doubt transaction.");
    describe_gauge!(ONE_PHASE_UNCOLLECTED, "Participants whose one-phase outcomes of earlier runs are not collected yet.");
    describe_histogram!(twopc_storage::METRIC_SYNC_SECONDS, Unit::Seconds, "Latency of each synced (fsync'd) log write.");
    describe_histogram!(twopc_storage::METRIC_BATCH_REQUESTS, "Requests merged into each synced log write (group commit).");
}
