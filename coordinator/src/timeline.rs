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
}

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
        }
    }

    /// A transaction found in the decision log at startup.
    pub fn recovered(txn: TxnId) -> Track {
        let span = tracing::debug_span!(parent: None, "txn", txn_id = %txn, recovered = true, outcome = tracing::field::Empty);
        let mut t = Track { timing: None, events: Vec::new(), recovered: true, span, phase: Span::none(), write: Span::none() };
        t.push(pb::TimelineEventKind::Recovered, None, "");
        t
    }

    /// Appends an event stamped now.
    pub fn push(&mut self, kind: pb::TimelineEventKind, participant: Option<&ParticipantName>, detail: impl Into<Cow<'static, str>>) {
        self.events.push(Event { at: UnixMillis::now(), kind, participant: participant.cloned(), detail: detail.into() });
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
        self.finished.push_back(Finished { txn, events: track.events, recovered: track.recovered });
    }

    /// The timeline of `txn`, live or finished, and whether it starts at a
    /// recovery.
    pub fn get(&self, txn: TxnId) -> Option<(Vec<Event>, bool)> {
        if let Some(t) = self.live.get(&txn) {
            return Some((t.events.clone(), t.recovered));
        }
        self.finished.iter().rev().find(|f| f.txn == txn).map(|f| (f.events.clone(), f.recovered))
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
        Vote::No(why) => format!("NO: {why}").into(),
    }
}
