//! Chaos: the bank-transfer workload runs against real processes while a
//! seeded schedule kills and restarts processes (SIGKILL) and cuts and
//! delays links through fault-injecting proxies on loopback. Then faults
//! stop, everything heals, and the atomicity checker runs at quiescence.
//!
//! The seed is printed; `TWOPC_CHAOS_SEED=<seed>` replays the same fault
//! schedule and the same transfers (thread timing still varies).
//! `TWOPC_CHAOS_SECS` (default 6) sets how long faults are injected; the
//! README gives the longer command.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;
use twopc_participant::Outcome;
use twopc_tests::checker::{Bank, Told, Transfer, check};
use twopc_tests::cluster::{ClusterOptions, ProcCluster};

const NAMES: [&str; 3] = ["bank-a", "bank-b", "bank-c"];
const CLIENTS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_run_keeps_all_or_nothing() {
    let seed: u64 = std::env::var("TWOPC_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    let secs: u64 = std::env::var("TWOPC_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    println!("chaos: seed {seed} (replay with TWOPC_CHAOS_SEED={seed}), {secs} s of faults");
    let bank = Bank { services: NAMES.iter().map(|s| (*s).to_owned()).collect(), accounts: 8, initial: 1000 };
    let cluster = ProcCluster::start(&NAMES, ClusterOptions { proxies: true, ..Default::default() }).await.expect("cluster starts");
    let client = cluster.client().expect("client");
    let seeded = client.execute(bank.seed(), Duration::from_secs(5)).await.expect("seed");
    assert_eq!(seeded.outcome, Outcome::Committed);
    let cluster = Arc::new(Mutex::new(cluster));

    // The workload: closed-loop clients, each with its own seeded stream.
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for c in 0..CLIENTS {
        let (bank, client, stop) = (bank.clone(), client.clone(), stop.clone());
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(c as u64 + 1));
        workers.push(tokio::spawn(async move {
            let mut done: Vec<(Transfer, Told)> = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let t = bank.random_transfer(format!("c{c}-{n}"), &mut rng);
                let told =
                    match tokio::time::timeout(Duration::from_secs(10), client.execute(bank.branches(&t), Duration::from_secs(2))).await {
                        Ok(Ok(f)) => match f.outcome {
                            Outcome::Committed => Told::Committed,
                            Outcome::Aborted(r) => Told::Aborted(r.to_string()),
                        },
                        Ok(Err(e)) => Told::Unknown(e.to_string()),
                        Err(_) => Told::Unknown("no answer in 10 s".into()),
                    };
                if matches!(told, Told::Unknown(_)) {
                    // The coordinator or its link is down: don't spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                done.push((t, told));
            }
            done
        }));
    }

    // The faults, from the seed. The sleeps below are the schedule itself
    // (the gap between faults and how long each lasts); nothing here waits
    // for a server by sleeping.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut faults: Vec<String> = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..500))).await;
        let mut c = cluster.lock().await;
        let which = rng.random_range(0..=NAMES.len()); // NAMES.len() = the coordinator
        let action = rng.random_range(0..3);
        let pause = Duration::from_millis(rng.random_range(50..400));
        match action {
            0 => {
                let node = if which == NAMES.len() { &mut c.coordinator } else { &mut c.participants[which] };
                node.kill().await.expect("kill");
                faults.push(format!("kill {}", node.name));
                drop(c);
                tokio::time::sleep(pause).await;
                let mut c = cluster.lock().await;
                let node = if which == NAMES.len() { &mut c.coordinator } else { &mut c.participants[which] };
                node.start(None).await.expect("restart");
            }
            1 => {
                let proxy = if which == NAMES.len() { c.coordinator_proxy.as_ref().expect("proxy") } else { &c.participant_proxies[which] };
                let ctl = proxy.control();
                ctl.cut();
                faults.push(format!("cut link to {}", if which == NAMES.len() { "coordinator" } else { NAMES[which] }));
                drop(c);
                tokio::time::sleep(pause).await;
                ctl.heal();
            }
            _ => {
                let proxy = if which == NAMES.len() { c.coordinator_proxy.as_ref().expect("proxy") } else { &c.participant_proxies[which] };
                let ctl = proxy.control();
                let delay = Duration::from_millis(rng.random_range(5..80));
                ctl.set_delay(delay);
                faults.push(format!("delay link to {} by {delay:?}", if which == NAMES.len() { "coordinator" } else { NAMES[which] }));
                drop(c);
                tokio::time::sleep(pause).await;
                ctl.heal();
            }
        }
    }

    // Faults stop; clients finish; everything heals.
    stop.store(true, Ordering::Relaxed);
    let mut history = Vec::new();
    for w in workers {
        history.extend(w.await.expect("client task"));
    }
    let cluster = Arc::try_unwrap(cluster).ok().expect("no other holder").into_inner();
    let (settle, snaps) = cluster.quiesce(Duration::from_secs(60)).await.expect("quiescence after the faults stop");
    let verdict = check(&bank, &history, &snaps);
    let kills = faults.iter().filter(|f| f.starts_with("kill")).count();
    let cuts = faults.iter().filter(|f| f.starts_with("cut")).count();
    println!(
        "chaos: runs 1  faults {} (kills {kills}, cuts {cuts}, delays {})  transfers {}  committed {}  aborted {}  unknown {}  applied {}  violations {}  in doubt after healing {:?}",
        faults.len(),
        faults.len() - kills - cuts,
        history.len(),
        verdict.committed,
        verdict.aborted,
        verdict.unknown,
        verdict.applied,
        verdict.violations.len(),
        settle
    );
    assert!(verdict.violations.is_empty(), "seed {seed}: violations:\n{}\nfaults: {faults:?}", verdict.violations.join("\n"));
    assert!(verdict.applied > 0, "seed {seed}: the workload must make progress");
    cluster.stop().await.expect("stop");
}
