//! The drivers' timer queue: every timer a protocol core sets, in one
//! ordered map, with one sleep for the earliest — instead of a task per
//! timer. (It lives here because both drivers share this crate.)
//!
//! Times are wall-clock milliseconds since the Unix epoch, as the cores use.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Pending timers, earliest first; equal times fire in the order set.
#[derive(Debug)]
pub struct TimerQueue<T> {
    entries: BTreeMap<(u64, u64), T>,
    seq: u64,
}

impl<T> Default for TimerQueue<T> {
    fn default() -> Self {
        TimerQueue { entries: BTreeMap::new(), seq: 0 }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

impl<T> TimerQueue<T> {
    /// Sets `timer` to fire at `at_ms`.
    pub fn set(&mut self, at_ms: u64, timer: T) {
        self.seq += 1;
        self.entries.insert((at_ms, self.seq), timer);
    }

    /// When the earliest timer fires, if any.
    pub fn next_at(&self) -> Option<u64> {
        self.entries.keys().next().map(|(at, _)| *at)
    }

    /// Removes and returns every timer due now, in order.
    pub fn pop_due(&mut self) -> Vec<T> {
        let now = now_ms();
        let later = self.entries.split_off(&(now.saturating_add(1), 0));
        let due = std::mem::replace(&mut self.entries, later);
        due.into_values().collect()
    }

    /// Number of pending timers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Sleeps until `at_ms` (from [`TimerQueue::next_at`]), or forever when
/// there is no timer. Owns nothing, so it can sit in a `select!` next to
/// the driver's other inputs.
pub async fn sleep_until(at_ms: Option<u64>) {
    match at_ms {
        Some(at) => tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn timers_fire_in_order_when_due() {
        let mut q = TimerQueue::default();
        let now = now_ms();
        q.set(now + 60_000, "later");
        q.set(now.saturating_sub(5), "b");
        q.set(now.saturating_sub(10), "a");
        q.set(now.saturating_sub(5), "c");
        assert_eq!(q.next_at(), Some(now.saturating_sub(10)));
        assert_eq!(q.pop_due(), vec!["a", "b", "c"], "due timers in time order, ties in the order set");
        assert_eq!(q.len(), 1);
        assert!(q.pop_due().is_empty(), "a future timer is not due");
        q.set(now_ms() + 20, "soon");
        sleep_until(q.next_at()).await;
        assert_eq!(q.pop_due(), vec!["soon"]);
    }
}
