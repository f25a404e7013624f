//! The committer: writes the feeds' acknowledged positions to the state database every
//! `commit_interval` and at shutdown, every changed checkpoint in one transaction
//! (ARCHITECTURE.md §4). After kill -9 a feed resumes from the last commit.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::{FeedTracker, SharedState, StoreError};
use crate::state::Checkpoint;

/// A feed whose checkpoint the committer writes.
pub trait Committable {
    /// The feed's tracker (which also names the feed and its URL: the checkpoint's key).
    fn tracker(&self) -> &FeedTracker;
    /// The checkpoint now committed covers events up to `seq`.
    fn committed(&self, seq: u64);
}

/// Commits the feeds `feeds()` returns every `interval` until `stop` is cancelled.
pub async fn commit_loop<C, F>(
    feeds: F,
    state: SharedState,
    interval: Duration,
    stop: CancellationToken,
) where
    C: Committable,
    F: Fn() -> Vec<C>,
{
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if let Err(e) = commit(&feeds(), &state).await {
                    tracing::error!("committing checkpoints failed (will retry): {e}");
                }
            }
            _ = stop.cancelled() => return,
        }
    }
}

/// Commits every changed checkpoint of `feeds` in one transaction. On failure nothing is lost:
/// the positions are marked changed again, for the next attempt.
pub async fn commit<C: Committable>(feeds: &[C], state: &SharedState) -> Result<(), StoreError> {
    let now = Utc::now();
    let mut changed: Vec<(usize, Checkpoint)> = Vec::new();
    let mut epochs: Vec<Option<i64>> = Vec::new();
    for (i, feed) in feeds.iter().enumerate() {
        let tracker = feed.tracker();
        if let Some(p) = tracker.take_changed() {
            epochs.push(tracker.epoch());
            changed.push((
                i,
                Checkpoint {
                    feed: tracker.feed().to_string(),
                    url: tracker.url().to_string(),
                    last_event_id: p.last_event_id.to_string(),
                    seq: p.seq,
                    updated_at: now,
                },
            ));
        }
    }
    if changed.is_empty() {
        return Ok(());
    }
    let checkpoints: Vec<Checkpoint> = changed.iter().map(|(_, c)| c.clone()).collect();
    let result = state.save_checkpoints(checkpoints, epochs).await;
    match result {
        Ok(()) => {
            for (i, c) in changed {
                feeds[i].committed(c.seq);
            }
            Ok(())
        }
        Err(e) => {
            for (i, _) in changed {
                feeds[i].tracker().mark_changed();
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::checkpoint::Position;
    use crate::state::StateStore;

    struct Feed {
        tracker: FeedTracker,
        committed: AtomicU64,
    }

    impl Committable for Feed {
        fn tracker(&self) -> &FeedTracker {
            &self.tracker
        }
        fn committed(&self, seq: u64) {
            self.committed.store(seq, Ordering::Relaxed);
        }
    }

    fn feed(name: &str) -> Feed {
        Feed {
            tracker: FeedTracker::for_feed(
                name,
                &format!("http://127.0.0.1:9/{name}"),
                Position {
                    seq: 0,
                    last_event_id: Arc::from(""),
                },
            ),
            committed: AtomicU64::new(0),
        }
    }

    #[tokio::test]
    async fn changed_positions_are_committed_and_reported_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Mutex::new(
            StateStore::open(&dir.path().join("state.db")).expect("open"),
        ));
        let state = SharedState::Local(store.clone());
        let feeds = [feed("a"), feed("b")];
        feeds[0].tracker.register([(1, "x", 0), (2, "y", 1)]);
        feeds[0].tracker.ack([2]);
        commit(&feeds, &state).await.expect("commit");
        assert_eq!(feeds[0].committed.load(Ordering::Relaxed), 2);
        assert_eq!(feeds[1].committed.load(Ordering::Relaxed), 0, "unchanged");
        let stored = store
            .lock()
            .expect("lock")
            .checkpoint("a", "http://127.0.0.1:9/a")
            .expect("read")
            .expect("a row");
        assert_eq!((stored.seq, stored.last_event_id.as_str()), (2, "y"));
        assert!(store
            .lock()
            .expect("lock")
            .checkpoint("b", "http://127.0.0.1:9/b")
            .expect("read")
            .is_none());
        assert_eq!(feeds[0].tracker.take_changed(), None, "taken by the commit");
    }

    #[tokio::test]
    async fn a_failed_commit_keeps_the_position_for_the_next_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Mutex::new(
            StateStore::open(&dir.path().join("state.db")).expect("open"),
        ));
        let state = SharedState::Local(store.clone());
        // Poison the lock: the commit cannot reach the store.
        let poisoner = store.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock();
            panic!("poisoning the state lock on purpose");
        })
        .join();
        let feeds = [feed("a")];
        feeds[0].tracker.register([(1, "x", 0)]);
        let err = commit(&feeds, &state).await.expect_err("poisoned");
        assert!(matches!(err, StoreError::Poisoned), "{err}");
        assert_eq!(feeds[0].committed.load(Ordering::Relaxed), 0);
        let again = feeds[0].tracker.take_changed().expect("still to commit");
        assert_eq!(again.seq, 1);
    }
}
