//! `twopc`: the command-line client of the coordinator.
//!
//! Exit codes: 0 success (committed), 1 error (bad input, coordinator
//! unreachable, outcome unknown), 2 usage error, 3 the transaction aborted.
//! Every failure prints one line on stderr.

use std::time::Duration;

use clap::{Parser, Subcommand};
use tonic::Code;
use twopc_proto::pb::coordinator_client::CoordinatorClient;
use twopc_proto::{TxnId, pb, status};

/// Command-line client of the twopc coordinator.
#[derive(Debug, Parser)]
#[command(name = "twopc", version, after_help = "Exit status: 0 committed/ok, 1 error, 2 usage, 3 aborted.")]
struct Cli {
    /// The coordinator's gRPC endpoint.
    #[arg(long, short = 'c', env = "TWOPC_COORDINATOR", default_value = "http://127.0.0.1:50051", global = true)]
    coordinator: String,

    /// Output format: a table for people, JSON for scripts.
    #[arg(long, short = 'o', value_enum, default_value = "table", global = true)]
    output: Output,

    /// Same as --output json.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

/// A transaction state, as `list --state` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StateArg {
    Active,
    Preparing,
    Deciding,
    Committed,
    Aborted,
}

impl From<StateArg> for pb::TxnState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Active => pb::TxnState::Active,
            StateArg::Preparing => pb::TxnState::Preparing,
            StateArg::Deciding => pb::TxnState::Deciding,
            StateArg::Committed => pb::TxnState::Committed,
            StateArg::Aborted => pb::TxnState::Aborted,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one atomic transaction over registered participants.
    ///
    /// Each --branch is NAME=PAYLOAD; the payload goes to that participant
    /// with Prepare. For the key-value resource it is a list of operations
    /// separated by ';', for example "incr alice -30; check alice >= 0".
    Execute {
        /// A branch, NAME=PAYLOAD. Repeat for each participant.
        #[arg(long = "branch", short = 'b', required = true, value_name = "NAME=PAYLOAD")]
        branches: Vec<String>,
        /// Transaction timeout (for example 5s); the coordinator's default
        /// when omitted.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Show what the coordinator knows about a transaction.
    Status {
        /// Transaction id, tx-<epoch>-<seq>.
        txn: String,
    },
    /// Show a transaction's status and full timeline: begin, each
    /// enlistment, each Prepare and vote with its reason, the decision and
    /// its write, each phase-two attempt and acknowledgement, with times.
    Show {
        /// Transaction id, tx-<epoch>-<seq>.
        txn: String,
    },
    /// List the transactions the coordinator holds, oldest first, with the
    /// count and the age of the oldest in-doubt one (past phase one, phase
    /// two not finished).
    List {
        /// Only in-doubt transactions.
        #[arg(long)]
        in_doubt: bool,
        /// Only transactions in this state (repeat for several).
        #[arg(long, value_enum)]
        state: Vec<StateArg>,
        /// Only transactions at least this old (for example 30s).
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        older_than: Option<Duration>,
        /// Only transactions this participant is enlisted in.
        #[arg(long, value_name = "NAME")]
        participant: Option<String>,
        /// Most transactions to show.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Print transaction events as they happen (begun, committed, aborted,
    /// finished), one line each, until interrupted.
    Watch,
    /// Read a coordinator's data directory offline, for forensics.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// Begin a transaction and print its id.
    Begin {
        /// Transaction timeout.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Commit a transaction begun earlier.
    Commit {
        /// Transaction id.
        txn: String,
    },
    /// Abort a transaction that is not decided yet.
    Abort {
        /// Transaction id.
        txn: String,
        /// Recorded as the abort's detail.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum LogCommand {
    /// Print the decision log: epoch, garbage-collection horizon, the
    /// participant registry and every decision record. Opens the data
    /// directory read-only, so it may belong to a running coordinator.
    Dump {
        /// The coordinator's data directory.
        #[arg(long, env = "TWOPC_DATA_DIR", default_value = "./data/coordinator")]
        data_dir: std::path::PathBuf,
    },
}

enum Failure {
    Error(String),
    Aborted(String),
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => exit(Failure::Error(format!("cannot start the runtime: {e}"))),
    };
    match runtime.block_on(run(cli)) {
        Ok(line) => println!("{line}"),
        Err(f) => exit(f),
    }
}

fn exit(f: Failure) -> ! {
    match f {
        Failure::Error(m) => {
            eprintln!("twopc: error: {m}");
            std::process::exit(1)
        }
        Failure::Aborted(m) => {
            eprintln!("twopc: {m}");
            std::process::exit(3)
        }
    }
}

fn txn_arg(s: &str) -> Result<TxnId, Failure> {
    s.parse::<TxnId>().map_err(|e| Failure::Error(e.to_string()))
}

fn ms(d: Option<Duration>) -> u64 {
    d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)).unwrap_or(0)
}

/// Turns a status into the one line the user sees.
fn failure(s: tonic::Status, txn: Option<&str>) -> Failure {
    if status::abort_reason(&s).is_some() {
        return Failure::Aborted(s.message().to_owned());
    }
    let msg = match s.code() {
        Code::Unavailable => format!("coordinator unavailable: {}", s.message()),
        Code::DeadlineExceeded | Code::Cancelled | Code::Unknown if txn.is_some() => {
            format!("outcome unknown ({}); ask with: twopc status {}", s.message(), txn.unwrap_or_default())
        }
        _ => match status::reason(&s) {
            Some(r) => format!("{} ({r})", s.message()),
            None => s.message().to_owned(),
        },
    };
    Failure::Error(msg)
}

async fn run(cli: Cli) -> Result<String, Failure> {
    // Offline commands need no coordinator.
    if let Command::Log { command: LogCommand::Dump { data_dir } } = &cli.command {
        return dump(data_dir, cli.json || cli.output == Output::Json);
    }
    twopc_proto::validate_endpoint(&cli.coordinator).map_err(Failure::Error)?;
    let channel = tonic::transport::Endpoint::from_shared(cli.coordinator.clone())
        .map_err(|e| Failure::Error(format!("invalid coordinator address: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| Failure::Error(format!("cannot reach the coordinator at {}: {e}", cli.coordinator)))?;
    let mut c = CoordinatorClient::new(channel.clone());
    let json = cli.json || cli.output == Output::Json;
    match cli.command {
        Command::Log { command: LogCommand::Dump { data_dir } } => dump(&data_dir, json),
        Command::Watch => {
            let mut admin = twopc_proto::pb::admin_client::AdminClient::new(channel.clone());
            let mut events = admin.watch(pb::WatchRequest {}).await.map_err(|s| failure(s, None))?.into_inner();
            loop {
                match events.message().await {
                    Ok(Some(e)) => {
                        let kind = match pb::TxnEventKind::try_from(e.kind) {
                            Ok(pb::TxnEventKind::Begun) => "begun",
                            Ok(pb::TxnEventKind::Committed) => "committed",
                            Ok(pb::TxnEventKind::Aborted) => "aborted",
                            Ok(pb::TxnEventKind::Finished) => "finished",
                            _ => "unknown",
                        };
                        let line = if json {
                            format!(
                                "{{\"txn_id\":{},\"event\":\"{kind}\",\"abort_code\":{},\"at_unix_ms\":{}}}",
                                json_str(&e.txn_id),
                                json_str(&e.abort_code),
                                e.at_unix_ms
                            )
                        } else if e.abort_code.is_empty() {
                            format!("{} {} {kind}", e.at_unix_ms, e.txn_id)
                        } else {
                            format!("{} {} {kind} {}", e.at_unix_ms, e.txn_id, e.abort_code)
                        };
                        println!("{line}");
                    }
                    Ok(None) => return Ok("the coordinator ended the stream".into()),
                    Err(s) => return Err(failure(s, None)),
                }
            }
        }
        Command::Execute { branches, timeout } => {
            let mut bs = Vec::new();
            for b in branches {
                let (name, payload) = b.split_once('=').ok_or_else(|| Failure::Error(format!("branch {b:?} is not NAME=PAYLOAD")))?;
                bs.push(pb::Branch { participant: name.to_owned(), payload: payload.as_bytes().to_vec() });
            }
            let r = c.execute(pb::ExecuteRequest { branches: bs, timeout_ms: ms(timeout) }).await.map_err(|s| failure(s, None))?;
            let txn = r.into_inner().txn_id;
            Ok(if json { format!("{{\"txn_id\":\"{txn}\",\"outcome\":\"COMMITTED\"}}") } else { format!("committed {txn}") })
        }
        Command::Begin { timeout } => {
            let r = c.begin(pb::BeginRequest { timeout_ms: ms(timeout) }).await.map_err(|s| failure(s, None))?.into_inner();
            Ok(if json { format!("{{\"txn_id\":\"{}\",\"deadline_unix_ms\":{}}}", r.txn_id, r.deadline_unix_ms) } else { r.txn_id })
        }
        Command::Commit { txn } => {
            txn_arg(&txn)?;
            let r = c.commit(pb::CommitRequest { txn_id: txn.clone() }).await.map_err(|s| failure(s, Some(&txn)))?;
            Ok(format!("committed {}", r.into_inner().txn_id))
        }
        Command::Abort { txn, reason } => {
            txn_arg(&txn)?;
            c.abort(pb::AbortRequest { txn_id: txn.clone(), reason }).await.map_err(|s| failure(s, Some(&txn)))?;
            Ok(format!("aborted {txn}"))
        }
        Command::List { in_doubt, state, older_than, participant, limit } => {
            let mut admin = twopc_proto::pb::admin_client::AdminClient::new(channel.clone());
            let request = pb::ListTransactionsRequest {
                in_doubt_only: in_doubt,
                limit,
                states: state.into_iter().map(|s| pb::TxnState::from(s) as i32).collect(),
                min_age_ms: older_than.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                participant: participant.unwrap_or_default(),
            };
            let r = admin.list_transactions(request).await.map_err(|s| failure(s, None))?.into_inner();
            Ok(render_list(&r, json))
        }
        Command::Show { txn } => {
            txn_arg(&txn)?;
            let mut admin = twopc_proto::pb::admin_client::AdminClient::new(channel.clone());
            let r =
                admin.get_transaction(pb::GetTransactionRequest { txn_id: txn.clone() }).await.map_err(|s| failure(s, None))?.into_inner();
            Ok(render_show(&r, json))
        }
        Command::Status { txn } => {
            txn_arg(&txn)?;
            let s = c.status(pb::StatusRequest { txn_id: txn.clone() }).await.map_err(|s| failure(s, None))?.into_inner();
            Ok(render_status(&s, json))
        }
    }
}

fn render_list(r: &pb::ListTransactionsResponse, json: bool) -> String {
    if json {
        let items: Vec<String> = r.transactions.iter().map(|s| render_status(s, true)).collect();
        return format!(
            "{{\"in_doubt\":{},\"oldest_in_doubt_ms\":{},\"transactions\":[{}]}}",
            r.in_doubt,
            r.oldest_in_doubt_ms,
            items.join(",")
        );
    }
    let mut out = format!("{} in doubt; oldest in doubt {} ms", r.in_doubt, r.oldest_in_doubt_ms);
    out.push_str(&format!("\n{:<22} {:<10} {:>10} {:>8} {:>8}  waiting for", "TXN", "STATE", "AGE_MS", "FINISHED", "RETRIES"));
    for s in &r.transactions {
        let retries: u32 = s.participants.iter().map(|p| p.retries).sum();
        let waiting: Vec<&str> = s.participants.iter().filter(|p| !p.acknowledged).map(|p| p.name.as_str()).collect();
        out.push_str(&format!(
            "\n{:<22} {:<10} {:>10} {:>8} {:>8}  {}",
            s.txn_id,
            state_name(s.state),
            s.age_ms,
            s.finished,
            retries,
            waiting.join(",")
        ));
    }
    out
}

fn event_name(kind: i32) -> &'static str {
    pb::TimelineEventKind::try_from(kind).map(|k| k.as_str_name().trim_start_matches("TIMELINE_EVENT_KIND_")).unwrap_or("UNKNOWN")
}

fn render_show(r: &pb::GetTransactionResponse, json: bool) -> String {
    let status = r.status.as_ref().map(|s| render_status(s, json)).unwrap_or_default();
    if json {
        let events: Vec<String> = r
            .timeline
            .iter()
            .map(|e| {
                format!(
                    "{{\"at_unix_ms\":{},\"event\":\"{}\",\"participant\":{},\"detail\":{}}}",
                    e.at_unix_ms,
                    event_name(e.kind),
                    json_str(&e.participant),
                    json_str(&e.detail)
                )
            })
            .collect();
        return format!(
            "{{\"status\":{status},\"recovered\":{},\"elided\":{},\"timeline\":[{}]}}",
            r.recovered,
            r.elided,
            events.join(",")
        );
    }
    let mut out = status;
    if r.timeline.is_empty() {
        out.push_str("\nno timeline held (finished too long ago, or before the coordinator restarted)");
        return out;
    }
    out.push_str("\ntimeline:");
    if r.recovered {
        out.push_str(" (from the coordinator's restart on; earlier events are not kept)");
    }
    let start = r.timeline[0].at_unix_ms;
    for (i, e) in r.timeline.iter().enumerate() {
        if r.elided > 0 && i == twopc_coordinator::timeline::KEEP_FIRST {
            out.push_str(&format!("\n  ... {} events left out ...", r.elided));
        }
        let at = std::time::UNIX_EPOCH + Duration::from_millis(e.at_unix_ms);
        let line = format!(
            "\n  {}  +{:>6} ms  {:<22} {:<16} {}",
            humantime::format_rfc3339_millis(at),
            e.at_unix_ms.saturating_sub(start),
            event_name(e.kind),
            e.participant,
            e.detail
        );
        out.push_str(line.trim_end());
    }
    out
}

fn dump(dir: &std::path::Path, json: bool) -> Result<String, Failure> {
    let log = twopc_coordinator::log::DecisionLog::open_read_only(dir)
        .map_err(|e| Failure::Error(format!("cannot open the decision log in {}: {e}", dir.display())))?;
    let read = |e: twopc_coordinator::log::LogError| Failure::Error(format!("cannot read the decision log: {e}"));
    let epoch = log.epoch().map_err(read)?;
    let horizon = log.horizon().map_err(read)?;
    let registry = log.registry().map_err(read)?;
    let records = log.load().map_err(read)?;
    let markers = log.markers().map_err(read)?;
    if json {
        let marks: Vec<String> =
            markers.iter().map(|(e, p)| format!("{{\"epoch\":{e},\"participant\":{}}}", json_str(p.as_str()))).collect();
        let regs: Vec<String> =
            registry.iter().map(|(n, e)| format!("{{\"name\":{},\"endpoint\":{}}}", json_str(n.as_str()), json_str(e))).collect();
        let recs: Vec<String> = records
            .iter()
            .map(|(t, r)| {
                let ps: Vec<String> = r.participants.iter().map(|p| json_str(&p.name)).collect();
                format!(
                    "{{\"txn_id\":\"{t}\",\"decision\":\"commit\",\"ended\":{},\"decided_unix_ms\":{},\"participants\":[{}]}}",
                    r.ended,
                    r.decided_unix_ms,
                    ps.join(",")
                )
            })
            .collect();
        return Ok(format!(
            "{{\"epoch\":{epoch},\"gc_horizon\":{},\"participants\":[{}],\"one_phase_markers\":[{}],\"decisions\":[{}]}}",
            horizon.map(|h| format!("\"{h}\"")).unwrap_or_else(|| "null".into()),
            regs.join(","),
            marks.join(","),
            recs.join(",")
        ));
    }
    let mut out = format!(
        "decision log {}: epoch {epoch}, gc horizon {}, {} participants registered, {} decision records ({} not ended)",
        dir.display(),
        horizon.map(|h| h.to_string()).unwrap_or_else(|| "none".into()),
        registry.len(),
        records.len(),
        records.iter().filter(|(_, r)| !r.ended).count()
    );
    for (n, e) in &registry {
        out.push_str(&format!("\n  participant {n:<20} {e}"));
    }
    for (e, p) in &markers {
        out.push_str(&format!("\n  one-phase marker: run {e} used one-phase commit with {p} (collected at the next start)"));
    }
    for (t, r) in &records {
        let names: Vec<&str> = r.participants.iter().map(|p| p.name.as_str()).collect();
        out.push_str(&format!(
            "\n  {t:<22} COMMIT {:<9} decided_unix_ms={} participants={}",
            if r.ended { "ended" } else { "DELIVERING" },
            r.decided_unix_ms,
            names.join(",")
        ));
    }
    Ok(out)
}

fn state_name(state: i32) -> &'static str {
    match pb::TxnState::try_from(state) {
        Ok(pb::TxnState::Active) => "active",
        Ok(pb::TxnState::Preparing) => "preparing",
        Ok(pb::TxnState::Deciding) => "deciding",
        Ok(pb::TxnState::Committed) => "committed",
        Ok(pb::TxnState::Aborted) => "aborted",
        Ok(pb::TxnState::Forgotten) => "forgotten",
        _ => "unknown",
    }
}

fn vote_name(vote: i32) -> &'static str {
    match pb::Vote::try_from(vote) {
        Ok(pb::Vote::Yes) => "yes",
        Ok(pb::Vote::No) => "no",
        Ok(pb::Vote::ReadOnly) => "read-only",
        Ok(pb::Vote::Committed) => "committed",
        _ => "-",
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render_status(s: &pb::StatusResponse, json: bool) -> String {
    let reason = s.abort_reason.as_ref();
    if json {
        let parts: Vec<String> = s
            .participants
            .iter()
            .map(|p| {
                format!(
                    "{{\"name\":{},\"endpoint\":{},\"vote\":\"{}\",\"acknowledged\":{},\"retries\":{}}}",
                    json_str(&p.name),
                    json_str(&p.endpoint),
                    vote_name(p.vote),
                    p.acknowledged,
                    p.retries
                )
            })
            .collect();
        let reason = reason
            .map(|r| {
                format!(
                    "{{\"code\":{},\"participant\":{},\"detail\":{}}}",
                    json_str(&r.code),
                    json_str(&r.participant),
                    json_str(&r.detail)
                )
            })
            .unwrap_or_else(|| "null".into());
        return format!(
            "{{\"txn_id\":{},\"state\":\"{}\",\"finished\":{},\"presumed\":{},\"deadline_unix_ms\":{},\"abort_reason\":{},\"participants\":[{}]}}",
            json_str(&s.txn_id),
            state_name(s.state),
            s.finished,
            s.presumed,
            s.deadline_unix_ms,
            reason,
            parts.join(",")
        );
    }
    let mut out = format!("{} {}", s.txn_id, state_name(s.state));
    if s.age_ms > 0 {
        out.push_str(&format!(" age={}ms", s.age_ms));
    }
    if s.finished {
        out.push_str(" (finished)");
    }
    if s.presumed {
        out.push_str(" (no details held: answered from the log / presumed abort)");
    }
    if let Some(r) = reason {
        let who = if r.participant.is_empty() { String::new() } else { format!(" at {}", r.participant) };
        out.push_str(&format!("\n  reason: {}{who}: {}", r.code, r.detail));
    }
    for p in &s.participants {
        out.push_str(&format!(
            "\n  {:<20} vote={:<9} acknowledged={:<5} retries={} {}",
            p.name,
            vote_name(p.vote),
            p.acknowledged,
            p.retries,
            p.endpoint
        ));
    }
    out
}
