//! What happened to each transaction, as the driver saw it: the timeline
//! `Admin.GetTransaction` and `twopc show` report, and the `tracing` spans
//! of the transaction and its phases.
//!
//! The core stays free of both: the driver notes what an input was before
//! stepping the core ([`Seen`]), compares the transaction's progress before
//! and after the step, and looks at the effects it performs. Timelines are
//! memory, not log: every unfinished transaction keeps its own, and the
//! last [`DriverConfig::finished_timelines`](crate::driver::DriverConfig)
//! finished ones are kept in a ring, oldest dropped first.
//!
//! Spans (all at DEBUG level, target `twopc_coordinator::timeline`, so they
//! cost nothing unless a subscriber asks for them — an OTLP exporter does):
//! `txn` from Begin to the end of phase two, child of the Begin or Execute
//! request's span (itself a child of the initiator's trace context);
//! `prepare`, `decision_write` and `phase_two` under it; and one span per
//! participant call under its phase, whose context travels to the
//! participant in the call's metadata.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use tracing::Span;
use twopc_proto::{ParticipantName, TxnId, UnixMillis, Vote, pb};

use crate::core::{Input, Timer};

/// One entry of a timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When the driver saw it.
    pub at: UnixMillis,
    /// What happened.
    pub kind: pb::TimelineEventKind,
    /// The participant concerned, if one is.
    pub participant: Option<ParticipantName>,
    /// Particulars (a vote's reason, an error, an attempt number).
    pub detail: Cow<'static, str>,
}

impl From<&Event> for pb::TimelineEvent {
    fn from(e: &Event) -> Self {
        pb::TimelineEvent {
            at_unix_ms: e.at.0,
            kind: e.kind as i32,
            participant: e.participant.as_ref().map(|p| p.as_str().to_owned()).unwrap_or_default(),
            detail: e.detail.clone().into_owned(),
        }
    }
}

/// The driver's record of one live transaction.
pub(crate) struct Track {
    /// Clock readings for the latency histograms; `None` for a transaction
    /// recovered from the log (timed by the run that began it).
    pub timing: Option<Timing>,
    /// Everything so far, oldest first.
    pub events: Vec<Event>,
    /// Recovered from the log at startup.
    pub recovered: bool,
    /// The transaction's span.
    pub span: Span,
    /// The current phase's span (`prepare` or `phase_two`), or none.
    pub phase: Span,
    /// The decision write's span while the write is in flight.
    pub write: Span,
    /// Events left out between the first [`KEEP_FIRST`] and the latest.
    pub elided: u64,
    /// Phase-two messages sent so far, per participant.
    attempts: Vec<(ParticipantName, u32)>,
}

/// A timeline keeps its first this many events…
pub const KEEP_FIRST: usize = 128;
/// …and its latest this many; the ones between are counted, not kept.
pub const KEEP_LAST: usize = 128;

/// The driver's clock readings for one transaction.
pub(crate) struct Timing {
    /// Begin (or Execute) was stepped.
    pub begun: Instant,
    /// Commit closed enlistment and Prepares went out.
    pub prepare: Option<Instant>,
    /// The outcome was decided (COMMIT durable, or abort).
    pub decided: Option<Instant>,
}

impl Track {
    /// A transaction begun in this run, under the request span `parent`.
    pub fn begun(txn: TxnId, parent: &Span) -> Track {
        let span = tracing::debug_span!(parent: parent, "txn", txn_id = %txn, outcome = tracing::field::Empty);
        Track {
            timing: Some(Timing { begun: Instant::now(), prepare: None, decided: None }),
            events: Vec::with_capacity(12),
            recovered: false,
            span,
            phase: Span::none(),
            write: Span::none(),
            elided: 0,
            attempts: Vec::new(),
        }
    }

    /// A transaction found in the decision log at startup.
    pub fn recovered(txn: TxnId) -> Track {
        let span = tracing::debug_span!(parent: None, "txn", txn_id = %txn, recovered = true, outcome = tracing::field::Empty);
        let mut t = Track {
            timing: None,
            events: Vec::new(),
            recovered: true,
            span,
            phase: Span::none(),
            write: Span::none(),
            elided: 0,
            attempts: Vec::new(),
        };
        t.push(pb::TimelineEventKind::Recovered, None, "");
        t
    }

    /// Appends an event stamped now.
    pub fn push(&mut self, kind: pb::TimelineEventKind, participant: Option<&ParticipantName>, detail: impl Into<Cow<'static, str>>) {
        if self.events.len() >= KEEP_FIRST + KEEP_LAST {
            self.events.remove(KEEP_FIRST);
            self.elided += 1;
        }
        self.events.push(Event { at: UnixMillis::now(), kind, participant: participant.cloned(), detail: detail.into() });
    }

    /// Counts one more phase-two message to `participant`; its number.
    pub fn next_attempt(&mut self, participant: &ParticipantName) -> u32 {
        match self.attempts.iter_mut().find(|(p, _)| p == participant) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                self.attempts.push((participant.clone(), 1));
                1
            }
        }
    }

    /// The span a participant call of the current phase runs under.
    pub fn call_parent(&self) -> &Span {
        if self.phase.is_none() { &self.span } else { &self.phase }
    }
}

/// A finished transaction's timeline, kept for `show`.
pub(crate) struct Finished {
    pub txn: TxnId,
    pub events: Vec<Event>,
    pub recovered: bool,
    pub elided: u64,
}

/// A timeline as `Admin.GetTransaction` reports it.
#[derive(Debug, Clone, Default)]
pub struct Shown {
    /// Oldest first.
    pub events: Vec<Event>,
    /// It starts at a recovery.
    pub recovered: bool,
    /// Events left out in the middle.
    pub elided: u64,
}

/// Live tracks and the ring of finished timelines.
pub(crate) struct Timelines {
    pub live: HashMap<TxnId, Track>,
    finished: VecDeque<Finished>,
    keep: usize,
}

impl Timelines {
    pub fn new(keep: usize) -> Self {
        Timelines { live: HashMap::new(), finished: VecDeque::with_capacity(keep.min(1 << 16)), keep }
    }

    /// Ends `txn`'s track: its spans close and its timeline joins the ring.
    pub fn finish(&mut self, txn: TxnId) {
        let Some(track) = self.live.remove(&txn) else { return };
        if self.keep == 0 {
            return;
        }
        if self.finished.len() >= self.keep {
            self.finished.pop_front();
        }
        self.finished.push_back(Finished { txn, events: track.events, recovered: track.recovered, elided: track.elided });
    }

    /// The timeline of `txn`, live or finished, and whether it starts at a
    /// recovery.
    pub fn get(&self, txn: TxnId) -> Option<Shown> {
        if let Some(t) = self.live.get(&txn) {
            return Some(Shown { events: t.events.clone(), recovered: t.recovered, elided: t.elided });
        }
        self.finished.iter().rev().find(|f| f.txn == txn).map(|f| Shown {
            events: f.events.clone(),
            recovered: f.recovered,
            elided: f.elided,
        })
    }
}

/// What the driver keeps of an input past the step that consumes it.
pub(crate) enum Seen {
    Begin { timeout_ms: u64 },
    Execute { branches: Vec<ParticipantName> },
    Enlist { participant: ParticipantName, endpoint: String },
    Commit,
    Abort { detail: String },
    Voted { participant: ParticipantName, vote: Result<Vote, String> },
    Delivered { participant: ParticipantName, result: Result<(), String> },
    Durable,
    PersistFailed { error: String },
    Deadline,
    PrepareTimeout,
    Other,
}

impl Seen {
    pub fn of(input: &Input) -> Seen {
        match input {
            Input::Begin { timeout_ms, .. } => Seen::Begin { timeout_ms: *timeout_ms },
            Input::Execute { branches, .. } => Seen::Execute { branches: branches.iter().map(|b| b.participant.clone()).collect() },
            Input::Enlist { participant, endpoint, .. } => Seen::Enlist { participant: participant.clone(), endpoint: endpoint.clone() },
            Input::Commit { .. } => Seen::Commit,
            Input::Abort { detail, .. } => Seen::Abort { detail: detail.clone() },
            Input::Voted { participant, vote, .. } => Seen::Voted { participant: participant.clone(), vote: vote.clone() },
            Input::Delivered { participant, result, .. } => Seen::Delivered { participant: participant.clone(), result: result.clone() },
            Input::Durable { .. } => Seen::Durable,
            Input::PersistFailed { error, .. } => Seen::PersistFailed { error: error.clone() },
            Input::Timer(Timer::Deadline(_)) => Seen::Deadline,
            Input::Timer(Timer::PrepareTimeout(_)) => Seen::PrepareTimeout,
            _ => Seen::Other,
        }
    }
}

/// A vote as a timeline shows it.
pub(crate) fn vote_detail(vote: &Vote) -> Cow<'static, str> {
    match vote {
        Vote::Yes => "YES".into(),
        Vote::ReadOnly => "READ_ONLY".into(),
        Vote::Committed => "COMMITTED (one phase)".into(),
        Vote::No(why) => format!("NO: {why}").into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_timeline_keeps_its_first_and_latest_events_and_counts_the_rest() {
        let txn = TxnId { epoch: 1, seq: 1 };
        let p = ParticipantName::new("p").expect("a name");
        let mut t = Track::begun(txn, &Span::none());
        for i in 0..1000u32 {
            let n = t.next_attempt(&p);
            assert_eq!(n, i + 1, "attempts count per participant");
            t.push(pb::TimelineEventKind::DecisionSent, Some(&p), format!("attempt {n}"));
        }
        assert_eq!(t.events.len(), KEEP_FIRST + KEEP_LAST);
        assert_eq!(t.elided, 1000 - (KEEP_FIRST + KEEP_LAST) as u64);
        assert_eq!(t.events[0].detail, "attempt 1");
        assert_eq!(t.events[KEEP_FIRST - 1].detail, format!("attempt {KEEP_FIRST}"));
        assert_eq!(t.events[KEEP_FIRST].detail, format!("attempt {}", 1000 - KEEP_LAST + 1));
        assert_eq!(t.events.last().map(|e| e.detail.as_ref()), Some("attempt 1000"));
        let mut timelines = Timelines::new(2);
        timelines.live.insert(txn, t);
        timelines.finish(txn);
        let shown = timelines.get(txn).expect("kept once finished");
        assert_eq!((shown.events.len(), shown.elided), (KEEP_FIRST + KEEP_LAST, 744));
        for seq in 2..=3 {
            let other = TxnId { epoch: 1, seq };
            timelines.live.insert(other, Track::begun(other, &Span::none()));
            timelines.finish(other);
        }
        assert!(timelines.get(txn).is_none(), "the ring keeps the latest finished only");
    }
}
