//! Checkpoint lag in seconds: how long ago the bridge received the oldest event that the
//! committed checkpoint does not cover yet.
//!
//! Nothing on the hot path records times per event. Instead, once a second the admin endpoint
//! samples each feed's head (the last sequence number the feed task registered) with the time.
//! The oldest uncommitted event (`committed + 1`) arrived after the last sample whose head was
//! still at or below `committed`, so `now - that sample's time` bounds the lag from above, one
//! sampling interval too high at most. Samples are kept only while the checkpoint is behind.
//!
//! The sampler is given, per feed, its name, its tracker (which tells one instance of a feed
//! from the next after a reload) and its committed sequence number.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::checkpoint::FeedTracker;

/// How often feeds are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Samples kept per feed; beyond this (a checkpoint an hour behind) the samples in the middle
/// are thinned out, which keeps the estimate an upper bound.
const MAX_SAMPLES: usize = 3600;

struct Samples {
    /// The feed instance sampled (a reload may start a new one under the same name).
    tracker: Arc<FeedTracker>,
    /// `(head seq, when)`, oldest first, heads increasing.
    samples: VecDeque<(u64, Instant)>,
}

/// What the sampler reads of one running feed.
#[derive(Clone, Copy)]
pub struct LagInput<'a> {
    pub feed: &'a str,
    pub tracker: &'a Arc<FeedTracker>,
    /// The sequence number the committed checkpoint covers.
    pub committed: u64,
}

/// Per-feed head samples.
#[derive(Default)]
pub struct LagTracker {
    feeds: Mutex<HashMap<String, Samples>>,
}

impl LagTracker {
    /// Samples every running feed, forgets feeds that are gone.
    pub fn sample(&self, feeds: &[LagInput<'_>], now: Instant) {
        let mut map = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|name, _| feeds.iter().any(|f| f.feed == name));
        for view in feeds {
            let head = view.tracker.head_seq();
            let committed = view.committed;
            let entry = map.entry(view.feed.to_string()).or_insert_with(|| Samples {
                tracker: view.tracker.clone(),
                samples: VecDeque::new(),
            });
            let restarted = !Arc::ptr_eq(&entry.tracker, view.tracker)
                || entry.samples.back().is_some_and(|&(h, _)| head < h);
            if restarted || entry.samples.is_empty() {
                entry.tracker = view.tracker.clone();
                entry.samples.clear();
                entry.samples.push_back((committed.min(head), now));
            }
            if entry.samples.back().is_some_and(|&(h, _)| head > h) {
                entry.samples.push_back((head, now));
            }
            // Keep the last sample at or below the checkpoint, and everything after it.
            while entry.samples.len() >= 2 && entry.samples[1].0 <= committed {
                entry.samples.pop_front();
            }
            if entry.samples.len() > MAX_SAMPLES {
                entry.samples.remove(1);
            }
        }
    }

    /// The lag of `feed` whose head is `head` and whose committed checkpoint is
    /// `feed.committed`.
    pub fn lag(&self, feed: LagInput<'_>, head: u64, now: Instant) -> Duration {
        let committed = feed.committed;
        if head <= committed {
            return Duration::ZERO;
        }
        let map = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = map.get(feed.feed) else {
            return Duration::ZERO;
        };
        if !Arc::ptr_eq(&entry.tracker, feed.tracker) {
            return Duration::ZERO;
        }
        let since = entry
            .samples
            .iter()
            .take_while(|&&(h, _)| h <= committed)
            .last()
            .or(entry.samples.front())
            .map(|&(_, t)| t);
        since.map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Position;

    #[test]
    fn lag_is_the_age_of_the_oldest_uncommitted_event() {
        let lag = LagTracker::default();
        let tracker = Arc::new(FeedTracker::new(Position {
            seq: 0,
            last_event_id: Arc::from(""),
        }));
        let at = |committed| LagInput {
            feed: "f",
            tracker: &tracker,
            committed,
        };
        let t0 = Instant::now();
        lag.sample(&[at(0)], t0);
        assert_eq!(lag.lag(at(0), 0, t0), Duration::ZERO);
        // Events 1..=10 arrive; the sink stores nothing.
        tracker.register((1..=10).map(|s| (s, "x", 1)));
        let t1 = t0 + Duration::from_secs(1);
        lag.sample(&[at(0)], t1);
        let t5 = t0 + Duration::from_secs(5);
        assert_eq!(lag.lag(at(0), 10, t5), Duration::from_secs(5));
        // 11..=20 arrive later; the first ten are committed.
        tracker.register((11..=20).map(|s| (s, "x", 1)));
        lag.sample(&[at(0)], t5);
        let t6 = t0 + Duration::from_secs(6);
        lag.sample(&[at(10)], t6);
        // Event 11 arrived after the sample at t1 (head 10): at most 5 s ago.
        assert_eq!(lag.lag(at(10), 20, t6), Duration::from_secs(5));
        assert_eq!(lag.lag(at(20), 20, t6), Duration::ZERO);
        // Another instance of the feed (a reload) is not measured against these samples.
        let other = Arc::new(FeedTracker::new(Position {
            seq: 0,
            last_event_id: Arc::from(""),
        }));
        let restarted = LagInput {
            feed: "f",
            tracker: &other,
            committed: 0,
        };
        assert_eq!(lag.lag(restarted, 20, t6), Duration::ZERO);
    }
}
