//! Seeded deterministic simulation of a whole cluster: the real coordinator
//! and participant cores over the simulated network, logs and clock of
//! `twopc_tests::sim`, driven by thousands of random schedules with message
//! loss, duplication, crashes and partitions (every message to and from one
//! process dropped at once). After every step the safety rules are checked;
//! at the end of each run a fair, fault-free continuation must finish every
//! transaction everywhere.
//!
//! Each run is a function of its seed. A failure prints the seed and the
//! schedule; `TWOPC_SIM_SEED=<seed>` replays that one run, and
//! `TWOPC_SIM_RUNS=<n>` changes how many runs (default 20000).

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use twopc_tests::sim::{Action, Msg, Mutation, SimConfig, World};

fn config(rng: &mut StdRng, mutation: Mutation) -> SimConfig {
    let participants = rng.random_range(2..=3);
    let txns = (0..rng.random_range(1..=3))
        .map(|_| {
            // A third of the transactions have one participant, and so
            // commit in one phase.
            let mut span: Vec<usize> =
                if rng.random_bool(0.3) { Vec::new() } else { (0..participants).filter(|_| rng.random_bool(0.8)).collect() };
            if span.is_empty() {
                span.push(rng.random_range(0..participants));
            }
            let no = if rng.random_bool(0.3) { Some(span[rng.random_range(0..span.len())]) } else { None };
            (span, no)
        })
        .collect();
    SimConfig { participants, txns, drops: 6, dups: 4, crashes: 3, timers: 60, mutation, enlist: rng.random_bool(0.5) }
}

fn involves(m: &Msg, node: Option<usize>) -> bool {
    let p = match m {
        Msg::Prepare { to, .. } | Msg::Decision { to, .. } | Msg::QueryReply { to, .. } => *to,
        Msg::Vote { from, .. } | Msg::Ack { from, .. } | Msg::Query { from, .. } => *from,
        Msg::Recover { to, .. } | Msg::Call { to, .. } | Msg::EnlistReply { to, .. } => *to,
        Msg::Recovered { from, .. } | Msg::CallReply { from, .. } | Msg::Enlist { from, .. } => *from,
    };
    // Every message has the coordinator (or, for business calls, the
    // client) at one end.
    node.is_none_or(|n| n == p)
}

/// One run; `Err` carries the schedule and what broke.
fn run(seed: u64, mutation: Mutation) -> Result<(usize, bool, usize, bool), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let cfg = config(&mut rng, mutation);
    let mut w = World::new(&cfg);
    let mut schedule: Vec<Action> = Vec::new();
    let steps = rng.random_range(20..300);
    for _ in 0..steps {
        let mut acts = Vec::new();
        w.actions(&cfg, true, &mut acts);
        if acts.is_empty() {
            break;
        }
        if rng.random_bool(0.02) {
            // A partition: every message to and from one process (or the
            // coordinator: all of them) is lost at once.
            let node = if rng.random_bool(0.3) { None } else { Some(rng.random_range(0..cfg.participants)) };
            let lost: Vec<Action> =
                acts.iter().filter_map(|a| if let Action::Drop(m) = a { involves(m, node).then(|| a.clone()) } else { None }).collect();
            for a in lost {
                if w.step(&cfg, &a) {
                    schedule.push(a);
                }
            }
            continue;
        }
        // Faults and timers (time jumping ahead) are about one step in ten
        // each, so that runs also get far.
        let (faults, rest): (Vec<Action>, Vec<Action>) = acts
            .into_iter()
            .partition(|a| matches!(a, Action::Drop(_) | Action::Duplicate(_) | Action::CrashCoordinator | Action::CrashParticipant(_)));
        let (timers, normal): (Vec<Action>, Vec<Action>) = rest.into_iter().partition(|a| matches!(a, Action::Timer));
        let roll = rng.random_range(0..10);
        let pool = if !faults.is_empty() && (roll == 0 || (normal.is_empty() && timers.is_empty())) {
            &faults
        } else if !timers.is_empty() && (roll == 1 || normal.is_empty()) {
            &timers
        } else {
            &normal
        };
        let a = pool[rng.random_range(0..pool.len())].clone();
        w.step(&cfg, &a);
        schedule.push(a);
        let broken = w.violations();
        if !broken.is_empty() {
            return Err(format!("{broken:?}\nconfig {cfg:?}\nschedule {schedule:#?}"));
        }
    }
    let (drained, done) = w.fair_drain(&cfg, 20_000);
    let mut broken = drained.violations();
    broken.extend(drained.unfinished(&cfg));
    if !done {
        broken.push("the fair continuation did not finish within 20000 steps".into());
    }
    if !broken.is_empty() {
        return Err(format!("after the fair continuation: {broken:?}\nconfig {cfg:?}\nschedule {schedule:#?}"));
    }
    Ok((schedule.len(), drained.some_committed(), drained.obs.one_phase.len(), cfg.enlist))
}

#[test]
fn random_schedules_keep_every_rule() {
    if let Some(seed) = std::env::var("TWOPC_SIM_SEED").ok().and_then(|s| s.parse::<u64>().ok()) {
        println!("replaying seed {seed}");
        if let Err(e) = run(seed, Mutation::None) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let runs: u64 = std::env::var("TWOPC_SIM_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let base: u64 = rand::rng().random();
    println!("simulation: {runs} runs from seed {base} (replay one with TWOPC_SIM_SEED=<seed>)");
    let started = Instant::now();
    let (mut steps, mut committed, mut one_phase, mut enlisted) = (0usize, 0usize, 0usize, 0usize);
    for i in 0..runs {
        let seed = base.wrapping_add(i);
        match run(seed, Mutation::None) {
            Ok((n, c, o, e)) => {
                steps += n;
                committed += usize::from(c);
                one_phase += o;
                enlisted += usize::from(c && e);
            }
            Err(e) => panic!("seed {seed} failed (replay with TWOPC_SIM_SEED={seed}): {e}"),
        }
    }
    println!(
        "simulation: {runs} runs, {steps} steps, {committed} runs with a commit ({enlisted} of them Begin/Enlist/Commit), {one_phase} one-phase commits, 0 violations, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(committed > 0, "no run committed anything: the simulation is vacuous");
    assert!(one_phase > 0 || runs < 100, "no one-phase commit in {runs} runs: one phase went unchecked");
    assert!(enlisted > 0 || runs < 100, "no enlisted transaction committed in {runs} runs: that path went unchecked");
}

/// The simulation has teeth: with a planted bug (a participant votes YES
/// before its prepare is durable; the coordinator commits before its
/// decision is durable; the one-phase marker is never written) some
/// schedule breaks a rule.
#[test]
fn random_schedules_catch_planted_bugs() {
    let base: u64 = rand::rng().random();
    for mutation in [Mutation::ParticipantVotesBeforeDurable, Mutation::CoordinatorCommitsBeforeDurable, Mutation::OnePhaseWithoutMarker] {
        let found = (0..20_000u64).map(|i| base.wrapping_add(i)).find_map(|seed| run(seed, mutation).err().map(|e| (seed, e)));
        let (seed, e) = found.unwrap_or_else(|| panic!("no schedule from seed {base} caught {mutation:?}"));
        println!("{mutation:?} caught by seed {seed}: {}", e.lines().next().unwrap_or_default());
    }
}
