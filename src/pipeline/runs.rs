//! The feed task's per-run work: counting a run of same-type events and warning, at a
//! bounded rate, about events that could not go where their route said.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::route::{Decision, Outcome};
use crate::telemetry::{FeedStats, TypeCache};

/// A run of consecutive events of one type within a read, with the router's decision for
/// them: the router and the counters are consulted once per run rather than once per event
/// (streams mostly repeat a type; per-event lookups were a visible share of the feed task).
pub(super) struct TypeRun {
    pub event_type: Arc<str>,
    pub decision: Decision,
    pub events: u64,
    pub bytes: u64,
}

impl TypeRun {
    pub fn is(&self, event_type: &Arc<str>) -> bool {
        Arc::ptr_eq(&self.event_type, event_type) || *self.event_type == **event_type
    }

    /// Adds the run to the feed's counters and to its type's; unrouted and misfit events are
    /// also reported through `warn`.
    pub fn count(
        self,
        feed: &str,
        stats: &FeedStats,
        types: &mut TypeCache,
        warn: &mut UnroutableWarning,
    ) {
        let n = self.events;
        stats.received.fetch_add(n, Ordering::Relaxed);
        stats.data_bytes.fetch_add(self.bytes, Ordering::Relaxed);
        match self.decision.outcome {
            Outcome::Routed => {}
            Outcome::Misfit => {
                stats.misfit.fetch_add(n, Ordering::Relaxed);
                warn.note(feed, &self.event_type, n, self.decision.outcome);
            }
            Outcome::Dropped => {
                stats.dropped.fetch_add(n, Ordering::Relaxed);
            }
            Outcome::Unrouted => {
                stats.unrouted.fetch_add(n, Ordering::Relaxed);
                warn.note(feed, &self.event_type, n, self.decision.outcome);
            }
        }
        let routed = !self.decision.sinks.is_empty();
        if routed {
            stats.routed.fetch_add(n, Ordering::Relaxed);
        }
        types.get(&stats.types, &self.event_type).record_many(
            n,
            self.bytes,
            self.decision.outcome,
            routed,
        );
    }
}

/// How often a feed may log that events could not go where their route said.
pub(super) const UNROUTABLE_WARN_EVERY: Duration = Duration::from_secs(10);

/// Logs unrouted events (stored nowhere) and misfits (sent to the default route because a
/// routed sink cannot name a file or topic after their type) at WARN, naming the feed and the
/// type, at most once per [`UNROUTABLE_WARN_EVERY`] per feed: the types come from the server,
/// which could otherwise fill the log. The counters (`/metrics`) count every event.
#[derive(Default)]
pub(super) struct UnroutableWarning {
    last: Option<std::time::Instant>,
    /// Events not reported since the last line.
    unreported: u64,
}

impl UnroutableWarning {
    fn note(&mut self, feed: &str, event_type: &str, events: u64, outcome: Outcome) {
        self.unreported += events;
        if self
            .last
            .is_some_and(|t| t.elapsed() < UNROUTABLE_WARN_EVERY)
        {
            return;
        }
        // Debug formatting quotes the type and escapes control characters (ARCHITECTURE.md:
        // nothing from the stream reaches a terminal raw).
        let shown = event_type;
        let total = std::mem::take(&mut self.unreported);
        self.last = Some(std::time::Instant::now());
        match outcome {
            Outcome::Unrouted => tracing::warn!(
                feed = %feed, event_type = ?shown, events = total,
                "events of type {shown:?} match no route and there is no default route that can take them: counted as unrouted and not stored (this line repeats at most every {}s)",
                UNROUTABLE_WARN_EVERY.as_secs()
            ),
            _ => tracing::warn!(
                feed = %feed, event_type = ?shown, events = total,
                "events of type {shown:?} cannot be stored by the sinks of their route (the type cannot form a file or topic name there): sent to the default route and counted as misfits (this line repeats at most every {}s)",
                UNROUTABLE_WARN_EVERY.as_secs()
            ),
        }
    }
}
