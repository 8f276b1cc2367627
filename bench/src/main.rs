//! `twopc-bench`: how many atomic updates per second the coordinator
//! sustains with every decision durable, and how much latency it adds —
//! always next to baselines measured in the same run on the same machine.
//!
//! It starts a coordinator and N participant processes on loopback, each
//! with its own RocksDB in a temporary directory (fsync on everywhere), and
//! drives closed-loop clients: each client sends one Execute (one
//! transaction over all N participants) and waits for the answer before the
//! next. In the same run it measures:
//! - baseline (a): the same writes sent directly to the same services with
//!   the same durability (one synced group-committed write per service),
//!   without atomicity;
//! - the floor: a loopback gRPC round trip and an fsync'd RocksDB write,
//!   measured right there, and the latency a two-phase commit cannot beat at
//!   concurrency 1 (client round trip + prepare round trip + two fsyncs).
//!
//! It reports committed/s, aborted/s, latency percentiles, fsyncs per
//! transaction at the coordinator and each participant, CPU seconds per
//! 1000 transactions and peak RSS per process, as a table or `--json`;
//! `--sweep` runs concurrencies 1, 4, 16, 64, 256, 1024 and `--chart` writes
//! an SVG of throughput and p99 latency against concurrency.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use twopc_examples::procs::{Proc, binary};
use twopc_participant::{Outcome, TxnClient};
use twopc_storage::{Batch, Durability, LogStore, RocksStore};

/// mimalloc: the profile showed a sixth of each process's CPU in the
/// system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Generated code of `proto/bench.proto`.
#[allow(missing_docs, clippy::all)]
mod pb {
    tonic::include_proto!("bench.v1");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum ResourceKind {
    /// Each participant writes one key in the key-value resource.
    Kv,
    /// No-op resources: only the protocol's own records.
    Noop,
}

/// Benchmark of the twopc coordinator against its baselines.
#[derive(Debug, Parser)]
#[command(name = "twopc-bench")]
struct Args {
    /// Participant processes (1 to 8); every transaction spans all of them.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=8))]
    participants: u16,
    /// Closed-loop clients (transactions in flight).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Run concurrencies 1, 4, 16, 64, 256, 1024 instead of one.
    #[arg(long)]
    sweep: bool,
    /// Measured time per run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up before each run.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// What participants commit.
    #[arg(long, value_enum, default_value_t = ResourceKind::Kv)]
    resource: ResourceKind,
    /// Share of branches that only read (vote READ_ONLY), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    read_only_share: f64,
    /// Share of transactions a participant refuses (votes NO), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    abort_share: f64,
    /// Share of transactions that write one of 8 hot keys, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    conflict_share: f64,
    /// HTTP/2 connections from the load generator to the coordinator.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Skip the no-atomicity baseline.
    #[arg(long)]
    no_baseline: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Write an SVG chart of throughput and p99 against concurrency.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Seed of the workload's key choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Let the coordinator commit one-participant transactions in one phase
    /// (its default); `--one-phase false` measures two phases instead.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    one_phase: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Latency {
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct ProcessFigures {
    name: String,
    fsyncs_per_txn: f64,
    records_per_fsync: f64,
    cpu_s_per_1000_txn: f64,
    peak_rss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Run {
    concurrency: usize,
    committed_per_s: f64,
    aborted_per_s: f64,
    errors: u64,
    latency: Latency,
    processes: Vec<ProcessFigures>,
    load_generator_cpu_s_per_1000_txn: f64,
    baseline_direct: Option<Baseline>,
}

#[derive(Debug, Clone, Serialize)]
struct Baseline {
    writes_per_s: f64,
    latency: Latency,
}

#[derive(Debug, Clone, Serialize)]
struct Floor {
    rtt_p50_us: u64,
    fsync_p50_us: u64,
    /// Client round trip + prepare round trip + the fsyncs on the critical
    /// path: two, or one when a lone participant commits in one phase.
    two_pc_floor_us: u64,
    floor_fsyncs: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Report {
    machine: String,
    participants: u16,
    one_phase: bool,
    resource: ResourceKind,
    read_only_share: f64,
    abort_share: f64,
    conflict_share: f64,
    duration_s: f64,
    floor: Floor,
    runs: Vec<Run>,
}

struct Cluster {
    coordinator: Proc,
    participants: Vec<Proc>,
    _dir: tempfile::TempDir,
}

async fn start(args: &Args) -> anyhow::Result<Cluster> {
    let dir = tempfile::tempdir()?;
    let within = Duration::from_secs(60);
    let extra = ["--one-phase".to_owned(), args.one_phase.to_string()];
    let coordinator = Proc::coordinator_with(&dir.path().join("coordinator"), &dir.path().join("coordinator.log"), within, &extra).await?;
    let mut participants = Vec::new();
    let resource = match args.resource {
        ResourceKind::Kv => "kv",
        ResourceKind::Noop => "noop",
    };
    for i in 0..args.participants {
        let name = format!("p{i}");
        let a: Vec<String> = vec![
            "--name".into(),
            name.clone(),
            "--data-dir".into(),
            dir.path().join(&name).display().to_string(),
            "--coordinator".into(),
            coordinator.url(),
            "--resource".into(),
            resource.into(),
        ];
        participants
            .push(Proc::start(&name, &binary("twopc-bench-participant")?, &a, &dir.path().join(format!("{name}.log")), within).await?);
    }
    Ok(Cluster { coordinator, participants, _dir: dir })
}

fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?.tcp_nodelay(true).connect_timeout(Duration::from_secs(2)).connect_lazy())
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("static histogram bounds are valid")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Clock ticks per second of /proc/<pid>/stat.
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold
    // spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    get(11) + get(12)
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

#[derive(Debug, Clone, Copy, Default)]
struct LogCounters {
    requests: u64,
    synced: u64,
}

async fn log_counters(cluster: &Cluster, coordinator: &Channel, participants: &[Channel]) -> anyhow::Result<Vec<LogCounters>> {
    let mut out = Vec::new();
    let s = twopc_proto::pb::admin_client::AdminClient::new(coordinator.clone())
        .get_log_stats(twopc_proto::pb::GetLogStatsRequest {})
        .await
        .context("coordinator log stats")?
        .into_inner();
    out.push(LogCounters { requests: s.requests, synced: s.synced_writes });
    for (i, ch) in participants.iter().enumerate() {
        let s = pb::direct_client::DirectClient::new(ch.clone())
            .stats(pb::StatsRequest {})
            .await
            .with_context(|| format!("{} log stats", cluster.participants[i].name))?
            .into_inner();
        out.push(LogCounters { requests: s.requests, synced: s.synced_writes });
    }
    Ok(out)
}

/// The key one branch writes.
fn key(rng: &mut impl Rng, conflict: bool) -> String {
    if conflict { format!("hot/{}", rng.random_range(0..8)) } else { format!("k/{}", rng.random_range(0..u32::MAX)) }
}

struct Shape {
    names: Vec<String>,
    resource: ResourceKind,
    read_only_share: f64,
    abort_share: f64,
    conflict_share: f64,
}

impl Shape {
    fn branches(&self, rng: &mut impl Rng) -> Vec<(String, Vec<u8>)> {
        let conflict = rng.random_bool(self.conflict_share);
        let refuse = rng.random_bool(self.abort_share).then(|| rng.random_range(0..self.names.len()));
        self.names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let payload = match self.resource {
                    ResourceKind::Noop => "noop".to_owned(),
                    ResourceKind::Kv if refuse == Some(i) => format!("check {} exists", key(rng, false)),
                    ResourceKind::Kv if rng.random_bool(self.read_only_share) => format!("check {} absent", key(rng, false)),
                    ResourceKind::Kv => format!("put {} v", key(rng, conflict)),
                };
                (n.clone(), payload.into_bytes())
            })
            .collect()
    }
}

struct Measured {
    committed: u64,
    aborted: u64,
    errors: u64,
    hist: Histogram<u64>,
    elapsed: Duration,
}

/// Closed-loop clients: `concurrency` tasks, each running `one` until the
/// measured window ends; only operations that start inside it count.
async fn closed_loop<F, Fut>(concurrency: usize, warmup: Duration, duration: Duration, bar: &indicatif::ProgressBar, one: F) -> Measured
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<bool, String>> + Send,
{
    let start = Instant::now() + warmup;
    let end = start + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let (one, stop, bar) = (one.clone(), stop.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            let mut m = Measured { committed: 0, aborted: 0, errors: 0, hist: histogram(), elapsed: Duration::ZERO };
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let t0 = Instant::now();
                let r = one(c, n).await;
                let done = Instant::now();
                if t0 >= start && done <= end {
                    match r {
                        Ok(true) => m.committed += 1,
                        Ok(false) => m.aborted += 1,
                        Err(_) => m.errors += 1,
                    }
                    let _ = m.hist.record(micros(done - t0));
                    bar.inc(1);
                }
                if done > end {
                    break;
                }
            }
            m
        }));
    }
    tokio::time::sleep_until((end + Duration::from_millis(1)).into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Measured { committed: 0, aborted: 0, errors: 0, hist: histogram(), elapsed: duration };
    for t in tasks {
        if let Ok(m) = t.await {
            total.committed += m.committed;
            total.aborted += m.aborted;
            total.errors += m.errors;
            let _ = total.hist.add(&m.hist);
        }
    }
    total
}

async fn measure_floor(participant: &Channel, one_phase: bool) -> anyhow::Result<Floor> {
    let mut direct = pb::direct_client::DirectClient::new(participant.clone());
    let mut h = histogram();
    for i in 0..2_000 {
        let t0 = Instant::now();
        direct.ping(pb::PingRequest {}).await?;
        if i >= 200 {
            h.record(micros(t0.elapsed()))?;
        }
    }
    let rtt = h.value_at_quantile(0.5);
    let dir = tempfile::tempdir()?;
    let store = RocksStore::open(dir.path(), &["floor"])?;
    let mut f = histogram();
    for i in 0..1_000u32 {
        let mut b = Batch::new();
        b.put("floor", i.to_be_bytes().to_vec(), b"v".to_vec());
        let t0 = Instant::now();
        twopc_storage::wait(store.submit(b, Durability::Synced)).await?;
        if i >= 100 {
            f.record(micros(t0.elapsed()))?;
        }
    }
    let fsync = f.value_at_quantile(0.5);
    let floor_fsyncs = if one_phase { 1 } else { 2 };
    Ok(Floor { rtt_p50_us: rtt, fsync_p50_us: fsync, two_pc_floor_us: 2 * rtt + floor_fsyncs * fsync, floor_fsyncs })
}

async fn run_level(args: &Args, cluster: &Cluster, concurrency: usize, ticks: f64) -> anyhow::Result<Run> {
    let names: Vec<String> = (0..args.participants).map(|i| format!("p{i}")).collect();
    let shape = Arc::new(Shape {
        names,
        resource: args.resource,
        read_only_share: args.read_only_share,
        abort_share: args.abort_share,
        conflict_share: args.conflict_share,
    });
    let clients: Vec<TxnClient> =
        (0..args.connections.max(1)).map(|_| channel(&cluster.coordinator.url()).map(TxnClient::new)).collect::<Result<_, _>>()?;
    let coordinator_admin = channel(&cluster.coordinator.url())?;
    let participant_channels: Vec<Channel> = cluster.participants.iter().map(|p| channel(&p.url())).collect::<Result<_, _>>()?;
    let bar = if args.quiet || args.json {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_message(format!("concurrency {concurrency}: two-phase commit"));
        b
    };

    let pids: Vec<u32> = std::iter::once(&cluster.coordinator).chain(&cluster.participants).filter_map(Proc::pid).collect();
    let self_pid = std::process::id();
    let before_logs = log_counters(cluster, &coordinator_admin, &participant_channels).await?;
    let before_cpu: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let before_self = cpu_ticks(self_pid);
    let seed = args.seed;
    let m = {
        let clients = clients.clone();
        let shape = shape.clone();
        closed_loop(concurrency, args.warmup, args.duration, &bar, move |c, n| {
            let client = clients[c % clients.len()].clone();
            let shape = shape.clone();
            async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ ((c as u64) << 32) ^ n);
                let branches = shape.branches(&mut rng);
                match client.execute(branches, Duration::from_secs(10)).await {
                    Ok(f) => Ok(f.outcome == Outcome::Committed),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await
    };
    let after_logs = log_counters(cluster, &coordinator_admin, &participant_channels).await?;
    let after_cpu: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let after_self = cpu_ticks(self_pid);
    // The window counts only operations that started after the warm-up; the
    // counters also include the warm-up and the tail, so scale by the
    // transactions the processes handled overall.
    let txns = (m.committed + m.aborted).max(1) as f64;
    let total_window = args.warmup + args.duration;
    let scale = args.duration.as_secs_f64() / total_window.as_secs_f64();
    let mut processes = Vec::new();
    for (i, name) in std::iter::once("coordinator".to_owned()).chain(cluster.participants.iter().map(|p| p.name.clone())).enumerate() {
        let synced = after_logs[i].synced.saturating_sub(before_logs[i].synced) as f64 * scale;
        let records = after_logs[i].requests.saturating_sub(before_logs[i].requests) as f64 * scale;
        let cpu = after_cpu.get(i).zip(before_cpu.get(i)).map(|(a, b)| a.saturating_sub(*b) as f64 / ticks).unwrap_or(0.0) * scale;
        processes.push(ProcessFigures {
            name,
            fsyncs_per_txn: synced / txns,
            records_per_fsync: if synced > 0.0 { records / synced } else { 0.0 },
            cpu_s_per_1000_txn: cpu / txns * 1000.0,
            peak_rss_mib: pids.get(i).map(|p| peak_rss_mib(*p)).unwrap_or(0.0),
        });
    }
    let load_cpu = after_self.saturating_sub(before_self) as f64 / ticks * scale / txns * 1000.0;

    let baseline_direct = if args.no_baseline {
        None
    } else {
        bar.set_message(format!("concurrency {concurrency}: baseline, same writes without 2PC"));
        let shape = shape.clone();
        let chans = participant_channels.clone();
        let b = closed_loop(concurrency, args.warmup, args.duration, &bar, move |c, n| {
            let chans = chans.clone();
            let shape = shape.clone();
            async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ ((c as u64) << 32) ^ n ^ 0xBA5E);
                let conflict = rng.random_bool(shape.conflict_share);
                let calls = chans.iter().map(|ch| {
                    let k = key(&mut rng, conflict);
                    let mut d = pb::direct_client::DirectClient::new(ch.clone());
                    async move { d.put(pb::PutRequest { keys: vec![k], value: "v".into() }).await }
                });
                let rs = futures::future::join_all(calls).await;
                match rs.into_iter().find_map(Result::err) {
                    None => Ok(true),
                    Some(e) => Err(e.to_string()),
                }
            }
        })
        .await;
        Some(Baseline { writes_per_s: b.committed as f64 / b.elapsed.as_secs_f64(), latency: Latency::of(&b.hist) })
    };
    bar.finish_and_clear();
    Ok(Run {
        concurrency,
        committed_per_s: m.committed as f64 / m.elapsed.as_secs_f64(),
        aborted_per_s: m.aborted as f64 / m.elapsed.as_secs_f64(),
        errors: m.errors,
        latency: Latency::of(&m.hist),
        processes,
        load_generator_cpu_s_per_1000_txn: load_cpu,
        baseline_direct,
    })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())))
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_owned())))
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem} memory")
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn print_table(r: &Report) {
    println!("twopc-bench on {}", r.machine);
    println!(
        "{} participant{}, {} resource, read-only share {}, abort share {}, conflict share {}, {:.0} s per run",
        r.participants,
        match (r.participants, r.one_phase) {
            (1, true) => " (one-phase commit)",
            (1, false) => " (two phases)",
            _ => "s",
        },
        match r.resource {
            ResourceKind::Kv => "key-value",
            ResourceKind::Noop => "no-op",
        },
        r.read_only_share,
        r.abort_share,
        r.conflict_share,
        r.duration_s
    );
    println!(
        "floor: loopback gRPC round trip p50 {} ms, fsync'd write p50 {} ms; floor (2 round trips + {} fsync{}) {} ms",
        ms(r.floor.rtt_p50_us),
        ms(r.floor.fsync_p50_us),
        r.floor.floor_fsyncs,
        if r.floor.floor_fsyncs == 1 { ", one phase" } else { "s" },
        ms(r.floor.two_pc_floor_us)
    );
    println!();
    println!(
        "{:>6} {:>11} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} | {:>11} {:>8} {:>8} | {:>7} {:>7}",
        "conc", "commit/s", "abort/s", "p50 ms", "p90", "p99", "p99.9", "max", "direct/s", "p50 ms", "p99", "2PC/dir", "p50/flr"
    );
    for run in &r.runs {
        let l = &run.latency;
        let (dps, dp50, dp99, ratio) = match &run.baseline_direct {
            Some(b) => (
                format!("{:.0}", b.writes_per_s),
                ms(b.latency.p50_us),
                ms(b.latency.p99_us),
                format!("{:.2}", run.committed_per_s / b.writes_per_s.max(1e-9)),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:>6} {:>11.0} {:>10.0} {:>8} {:>8} {:>8} {:>8} {:>8} | {:>11} {:>8} {:>8} | {:>7} {:>7.2}",
            run.concurrency,
            run.committed_per_s,
            run.aborted_per_s,
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us),
            dps,
            dp50,
            dp99,
            ratio,
            l.p50_us as f64 / r.floor.two_pc_floor_us.max(1) as f64
        );
    }
    println!();
    println!(
        "{:>6} {:<12} {:>14} {:>16} {:>16} {:>13}",
        "conc", "process", "fsyncs/txn", "records/fsync", "CPU s/1000 txn", "peak RSS MiB"
    );
    for run in &r.runs {
        for p in &run.processes {
            println!(
                "{:>6} {:<12} {:>14.3} {:>16.1} {:>16.3} {:>13.1}",
                run.concurrency, p.name, p.fsyncs_per_txn, p.records_per_fsync, p.cpu_s_per_1000_txn, p.peak_rss_mib
            );
        }
        println!(
            "{:>6} {:<12} {:>14} {:>16} {:>16.3} {:>13}",
            run.concurrency, "load gen", "-", "-", run.load_generator_cpu_s_per_1000_txn, "-"
        );
        if run.errors > 0 {
            println!("{:>6} {} requests failed (counted in neither column)", run.concurrency, run.errors);
        }
    }
}

/// A chart panel: title, the 2PC series, the baseline series.
type Panel<'a> = (&'a str, Vec<f64>, Vec<Option<f64>>);

/// A two-panel SVG: committed/s and p99 latency against concurrency (log
/// scale), with the direct-write baseline dashed.
fn write_chart(path: &Path, r: &Report) -> anyhow::Result<()> {
    let (w, h, pad) = (900.0f64, 380.0f64, 60.0f64);
    let panel_w = (w - 3.0 * pad) / 2.0;
    let xs: Vec<f64> = r.runs.iter().map(|run| (run.concurrency as f64).log2()).collect();
    let (xmin, xmax) = (xs.iter().cloned().fold(f64::MAX, f64::min), xs.iter().cloned().fold(f64::MIN, f64::max).max(1.0));
    let x = |v: f64, left: f64| left + if xmax > xmin { (v - xmin) / (xmax - xmin) * panel_w } else { panel_w / 2.0 };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let panels: [Panel; 2] = [
        (
            "committed transactions / s",
            r.runs.iter().map(|run| run.committed_per_s).collect(),
            r.runs.iter().map(|run| run.baseline_direct.as_ref().map(|b| b.writes_per_s)).collect(),
        ),
        (
            "p99 latency (ms)",
            r.runs.iter().map(|run| run.latency.p99_us as f64 / 1000.0).collect(),
            r.runs.iter().map(|run| run.baseline_direct.as_ref().map(|b| b.latency.p99_us as f64 / 1000.0)).collect(),
        ),
    ];
    for (pi, (title, ys, base)) in panels.iter().enumerate() {
        let left = pad + pi as f64 * (panel_w + pad);
        let ymax = ys.iter().chain(base.iter().flatten()).cloned().fold(0.0, f64::max).max(1e-9) * 1.1;
        let y = |v: f64| h - pad - v / ymax * (h - 2.0 * pad);
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\">{title}</text>\n",
            left + panel_w / 2.0,
            pad - 20.0
        );
        svg += &format!("<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n", h - pad, left + panel_w, h - pad);
        svg += &format!("<line x1=\"{left}\" y1=\"{pad}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n", h - pad);
        for t in 0..=4 {
            let v = ymax * t as f64 / 4.0;
            svg += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
                left - 5.0,
                y(v) + 4.0,
                if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") }
            );
        }
        for (i, run) in r.runs.iter().enumerate() {
            svg += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", x(xs[i], left), h - pad + 18.0, run.concurrency);
        }
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">concurrency (closed-loop clients)</text>\n",
            left + panel_w / 2.0,
            h - 15.0
        );
        let line = |vals: Vec<(f64, f64)>, style: &str| {
            let pts: Vec<String> = vals.iter().map(|(a, b)| format!("{:.1},{:.1}", x(*a, left), y(*b))).collect();
            format!("<polyline fill=\"none\" {style} points=\"{}\"/>\n", pts.join(" "))
        };
        svg += &line(xs.iter().cloned().zip(ys.iter().cloned()).collect(), "stroke=\"#1f77b4\" stroke-width=\"2\"");
        let b: Vec<(f64, f64)> = xs.iter().cloned().zip(base.iter().cloned()).filter_map(|(a, b)| b.map(|b| (a, b))).collect();
        if !b.is_empty() {
            svg += &line(b, "stroke=\"#ff7f0e\" stroke-width=\"2\" stroke-dasharray=\"6,4\"");
        }
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" fill=\"#1f77b4\">two-phase commit</text><text x=\"{}\" y=\"{}\" fill=\"#ff7f0e\">direct writes (no atomicity)</text>\n",
            left + 10.0,
            pad - 2.0,
            left + 130.0,
            pad - 2.0
        );
    }
    svg += "</svg>\n";
    std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))
}

// One thread: the load generator shares the machine with the processes it
// measures, and a second runtime thread only added wake-ups (its CPU per
// transaction fell by a quarter with one).
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("twopc-bench: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    for (name, v) in [("read-only-share", args.read_only_share), ("abort-share", args.abort_share), ("conflict-share", args.conflict_share)]
    {
        if !(0.0..=1.0).contains(&v) {
            bail!("--{name} must be between 0 and 1, got {v}");
        }
    }
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let cluster = start(&args).await?;
    let floor = measure_floor(&channel(&cluster.participants[0].url())?, args.one_phase && args.participants == 1).await?;
    let ticks = clock_ticks();
    let levels: Vec<usize> = if args.sweep { vec![1, 4, 16, 64, 256, 1024] } else { vec![args.concurrency] };
    let mut runs = Vec::new();
    for c in levels {
        if !args.quiet && !args.json {
            eprintln!("running concurrency {c} ...");
        }
        runs.push(run_level(&args, &cluster, c, ticks).await?);
    }
    let report = Report {
        machine: machine(),
        participants: args.participants,
        one_phase: args.one_phase && args.participants == 1,
        resource: args.resource,
        read_only_share: args.read_only_share,
        abort_share: args.abort_share,
        conflict_share: args.conflict_share,
        duration_s: args.duration.as_secs_f64(),
        floor,
        runs,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    if let Some(path) = &args.chart {
        write_chart(path, &report)?;
        if !args.json {
            println!("\nchart written to {}", path.display());
        }
    }
    let Cluster { mut coordinator, mut participants, _dir } = cluster;
    for p in participants.iter_mut() {
        let _ = p.terminate(Duration::from_secs(5)).await;
    }
    let _ = coordinator.terminate(Duration::from_secs(5)).await;
    Ok(())
}
