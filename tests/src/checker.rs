//! The atomicity checker every fault test reuses, over a bank-transfer
//! workload spread across several participants.
//!
//! Each participant holds accounts `acct/<n>`, all starting at the same
//! balance. A transfer moves an amount from an account at one participant to
//! an account at another, as one Execute transaction with one branch each:
//! the debit side checks the balance stays non-negative (and votes NO
//! otherwise); both sides record `xfer/<id>` = `<account>:<delta>`.
//!
//! At quiescence, [`check`] verifies (docs/ARCHITECTURE.md, "Rules"):
//! - agreement: every transfer is applied at both participants or at
//!   neither;
//! - the client's answer holds: told COMMITTED ⇒ applied at both; told
//!   ABORTED ⇒ applied at neither; unknown ⇒ either, but all or nothing;
//! - nothing is applied twice: each account's balance equals its starting
//!   balance plus the deltas of the transfer records it holds;
//! - money is conserved and no balance is negative;
//! - nothing is left in doubt or locked at any participant.

use std::collections::BTreeMap;

use rand::Rng;

use crate::cluster::Snapshot;

/// The workload's shape.
#[derive(Debug, Clone)]
pub struct Bank {
    /// Participant names.
    pub services: Vec<String>,
    /// Accounts per participant.
    pub accounts: usize,
    /// Starting balance of every account.
    pub initial: i64,
}

/// One transfer: legs at distinct participants whose deltas sum to zero
/// (one leg of delta 0 touches an account in a one-participant transaction).
#[derive(Debug, Clone)]
pub struct Transfer {
    /// Unique id.
    pub id: String,
    /// (participant index, account, delta). Negative legs check that the
    /// balance stays non-negative.
    pub legs: Vec<(usize, usize, i64)>,
    /// Extra operations for one participant's branch (for example a
    /// failing check that forces a NO vote).
    pub extra: Option<(usize, String)>,
}

/// What the client was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Told {
    /// COMMITTED.
    Committed,
    /// ABORTED, with the reason.
    Aborted(String),
    /// No outcome (the coordinator was unreachable or died).
    Unknown(String),
}

/// The checker's findings.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// Transfers told committed.
    pub committed: usize,
    /// Transfers told aborted.
    pub aborted: usize,
    /// Transfers with an unknown outcome.
    pub unknown: usize,
    /// Transfers applied (at both sides).
    pub applied: usize,
    /// Every broken rule, described.
    pub violations: Vec<String>,
}

impl Bank {
    /// Payloads that set every account to its starting balance.
    pub fn seed(&self) -> Vec<(String, Vec<u8>)> {
        self.services
            .iter()
            .map(|s| {
                let ops: Vec<String> = (0..self.accounts).map(|a| format!("put acct/{a} {}", self.initial)).collect();
                (s.clone(), ops.join("; ").into_bytes())
            })
            .collect()
    }

    /// A random transfer between two different participants, or (one in
    /// five) a one-participant "touch" of an account that moves no money —
    /// a transaction with one participant, which commits in one phase.
    pub fn random_transfer(&self, id: String, rng: &mut impl Rng) -> Transfer {
        let n = self.services.len();
        if rng.random_bool(0.2) {
            return Transfer { id, legs: vec![(rng.random_range(0..n), rng.random_range(0..self.accounts), 0)], extra: None };
        }
        let from_svc = rng.random_range(0..n);
        let to_svc = (from_svc + rng.random_range(1..n)) % n;
        let amount = rng.random_range(1..=self.initial / 2);
        Transfer {
            id,
            legs: vec![(from_svc, rng.random_range(0..self.accounts), -amount), (to_svc, rng.random_range(0..self.accounts), amount)],
            extra: None,
        }
    }

    /// The Execute branches of a transfer, one per leg.
    pub fn branches(&self, t: &Transfer) -> Vec<(String, Vec<u8>)> {
        t.legs
            .iter()
            .map(|&(svc, acct, delta)| {
                let mut ops = format!("incr acct/{acct} {delta}");
                if delta < 0 {
                    ops.push_str(&format!("; check acct/{acct} >= 0"));
                }
                ops.push_str(&format!("; put xfer/{} {acct}:{delta}", t.id));
                if let Some((x, extra)) = &t.extra
                    && *x == svc
                {
                    ops.push_str("; ");
                    ops.push_str(extra);
                }
                (self.services[svc].clone(), ops.into_bytes())
            })
            .collect()
    }
}

/// Checks the rules above against the participants' final snapshots
/// (`snapshots[i]` is participant `i`'s).
pub fn check(bank: &Bank, transfers: &[(Transfer, Told)], snapshots: &[Snapshot]) -> Verdict {
    let mut v = Verdict::default();
    for (t, told) in transfers {
        match told {
            Told::Committed => v.committed += 1,
            Told::Aborted(_) => v.aborted += 1,
            Told::Unknown(_) => v.unknown += 1,
        }
        let key = format!("xfer/{}", t.id);
        let present: Vec<bool> = t.legs.iter().map(|(svc, _, _)| snapshots[*svc].entries.contains_key(&key)).collect();
        let applied = present.iter().all(|p| *p);
        if !applied && present.iter().any(|p| *p) {
            let at: Vec<&str> =
                t.legs.iter().zip(&present).filter(|(_, p)| **p).map(|((svc, _, _), _)| bank.services[*svc].as_str()).collect();
            v.violations.push(format!("agreement: transfer {} applied only at {}", t.id, at.join(", ")));
            continue;
        }
        if applied {
            v.applied += 1;
        }
        match (told, applied) {
            (Told::Committed, false) => v.violations.push(format!("transfer {} was told COMMITTED but is applied nowhere", t.id)),
            (Told::Aborted(why), true) => v.violations.push(format!("transfer {} was told ABORTED ({why}) but is applied", t.id)),
            _ => {}
        }
    }
    let mut total = 0i64;
    for (i, snap) in snapshots.iter().enumerate() {
        let name = &bank.services[i];
        let mut expected: BTreeMap<usize, i64> = (0..bank.accounts).map(|a| (a, bank.initial)).collect();
        for (k, val) in snap.entries.range("xfer/".to_owned()..) {
            if !k.starts_with("xfer/") {
                break;
            }
            let parsed = val.split_once(':').and_then(|(a, d)| Some((a.parse::<usize>().ok()?, d.parse::<i64>().ok()?)));
            match parsed {
                Some((a, d)) => *expected.entry(a).or_default() += d,
                None => v.violations.push(format!("{name}: malformed transfer record {k}={val}")),
            }
        }
        for (a, want) in expected {
            let got = snap.entries.get(&format!("acct/{a}")).and_then(|b| b.parse::<i64>().ok());
            match got {
                Some(b) => {
                    total += b;
                    if b != want {
                        v.violations.push(format!("{name}: acct/{a} is {b} but its transfer records say {want} (applied twice or lost)"));
                    }
                    if b < 0 {
                        v.violations.push(format!("{name}: acct/{a} is negative ({b})"));
                    }
                }
                None => v.violations.push(format!("{name}: acct/{a} is missing")),
            }
        }
        if snap.locked_keys > 0 {
            v.violations.push(format!("{name}: {} keys still locked", snap.locked_keys));
        }
        if snap.in_doubt > 0 {
            v.violations.push(format!("{name}: {} transactions still in doubt", snap.in_doubt));
        }
    }
    let money = bank.services.len() as i64 * bank.accounts as i64 * bank.initial;
    if total != money {
        v.violations.push(format!("money not conserved: {total} instead of {money}"));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(entries: &[(&str, &str)]) -> Snapshot {
        Snapshot { entries: entries.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(), locked_keys: 0, in_doubt: 0 }
    }

    fn bank() -> Bank {
        Bank { services: vec!["a".into(), "b".into()], accounts: 1, initial: 100 }
    }

    fn t() -> Transfer {
        Transfer { id: "1".into(), legs: vec![(0, 0, -30), (1, 0, 30)], extra: None }
    }

    #[test]
    fn a_consistent_history_passes() {
        let s = [snap(&[("acct/0", "70"), ("xfer/1", "0:-30")]), snap(&[("acct/0", "130"), ("xfer/1", "0:30")])];
        let v = check(&bank(), &[(t(), Told::Committed)], &s);
        assert!(v.violations.is_empty(), "{:?}", v.violations);
        assert_eq!((v.committed, v.applied), (1, 1));
    }

    #[test]
    fn the_checker_catches_each_kind_of_violation() {
        // Half-applied.
        let s = [snap(&[("acct/0", "70"), ("xfer/1", "0:-30")]), snap(&[("acct/0", "100")])];
        assert!(check(&bank(), &[(t(), Told::Unknown("x".into()))], &s).violations.iter().any(|m| m.contains("agreement")));
        // Told committed, applied nowhere.
        let s = [snap(&[("acct/0", "100")]), snap(&[("acct/0", "100")])];
        assert!(check(&bank(), &[(t(), Told::Committed)], &s).violations.iter().any(|m| m.contains("told COMMITTED")));
        // Told aborted, applied.
        let s = [snap(&[("acct/0", "70"), ("xfer/1", "0:-30")]), snap(&[("acct/0", "130"), ("xfer/1", "0:30")])];
        assert!(check(&bank(), &[(t(), Told::Aborted("no".into()))], &s).violations.iter().any(|m| m.contains("told ABORTED")));
        // Applied twice at one side.
        let s = [snap(&[("acct/0", "40"), ("xfer/1", "0:-30")]), snap(&[("acct/0", "130"), ("xfer/1", "0:30")])];
        let v = check(&bank(), &[(t(), Told::Committed)], &s);
        assert!(v.violations.iter().any(|m| m.contains("applied twice")), "{:?}", v.violations);
        assert!(v.violations.iter().any(|m| m.contains("money not conserved")), "{:?}", v.violations);
        // Locks and in-doubt left behind.
        let mut a = snap(&[("acct/0", "100")]);
        a.locked_keys = 1;
        a.in_doubt = 1;
        let v = check(&bank(), &[], &[a, snap(&[("acct/0", "100")])]);
        assert!(v.violations.iter().any(|m| m.contains("locked")) && v.violations.iter().any(|m| m.contains("in doubt")));
    }
}
