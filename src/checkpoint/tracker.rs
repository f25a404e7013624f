//! Per-feed acknowledgement tracking (ARCHITECTURE.md §4).
//!
//! Every event a feed hands to the router is registered here, in sequence order, with the
//! number of sinks it was sent to. Sinks acknowledge events once stored, in any order. The
//! checkpoint is the last event ID of the longest prefix of the feed whose events are all
//! acknowledged by every sink they were sent to, so it never runs ahead of storage. Dropped and
//! unrouted events are registered with zero sinks: acknowledged as soon as all before them are.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// The durable cursor of a feed: the ID to resume from and the bridge sequence number of the
/// last event covered by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub seq: u64,
    pub last_event_id: Arc<str>,
}

#[derive(Debug)]
struct Entry {
    /// Sinks that still have to acknowledge the event.
    remaining: u32,
    /// The last event ID once this event (and all before it) are stored. Usually the event's
    /// own ID; an ID-only dispatch after it replaces it (see [`FeedTracker::id_only`]).
    id: Arc<str>,
}

#[derive(Debug)]
struct Inner {
    /// Events not yet fully acknowledged, with contiguous sequence numbers from `front_seq`.
    pending: VecDeque<Entry>,
    front_seq: u64,
    /// The acknowledged prefix.
    acked: Position,
    /// Whether `acked` changed since the last [`FeedTracker::take_changed`].
    changed: bool,
}

/// An event ID as [`FeedTracker::register`] takes it: borrowed (copied when kept) or shared.
pub trait EventId {
    /// The ID as the tracker keeps it, given the ID of the entry before it.
    fn into_shared(self, previous: &Arc<str>) -> Arc<str>;
}

impl EventId for &str {
    /// Shares the previous entry's ID when unchanged, to avoid an allocation per event.
    fn into_shared(self, previous: &Arc<str>) -> Arc<str> {
        if **previous == *self {
            previous.clone()
        } else {
            Arc::from(self)
        }
    }
}

impl EventId for &Arc<str> {
    /// The event's own ID, shared: no comparison, no allocation.
    fn into_shared(self, _previous: &Arc<str>) -> Arc<str> {
        self.clone()
    }
}

/// Tracks one feed. Shared by the feed task (register) and the sink runners (ack).
#[derive(Debug)]
pub struct FeedTracker {
    /// The feed's name and URL: the key of its checkpoint (empty for an anonymous tracker).
    feed: Arc<str>,
    url: Arc<str>,
    /// The `seq` this run of the feed resumed after (0: from the beginning), and that event's
    /// id (the Last-Event-ID it resumed with).
    start_seq: u64,
    start_id: Arc<str>,
    /// In a fleet: the epoch of the lease this run reads under; every write of the run is
    /// fenced by it (ARCHITECTURE.md §9).
    epoch: Option<i64>,
    inner: Mutex<Inner>,
}

impl FeedTracker {
    /// Starts from the committed checkpoint: the next event will have sequence `start.seq + 1`.
    pub fn new(start: Position) -> Self {
        Self::for_feed("", "", start)
    }

    /// [`FeedTracker::new`] for the feed `feed` at `url`, so that a sink storing checkpoints
    /// itself knows which checkpoint row is this feed's.
    pub fn for_feed(feed: &str, url: &str, start: Position) -> Self {
        FeedTracker {
            feed: Arc::from(feed),
            url: Arc::from(url),
            start_seq: start.seq,
            start_id: start.last_event_id.clone(),
            epoch: None,
            inner: Mutex::new(Inner {
                pending: VecDeque::new(),
                front_seq: start.seq + 1,
                acked: start,
                changed: false,
            }),
        }
    }

    /// The feed's name ("" for an anonymous tracker).
    pub fn feed(&self) -> &str {
        &self.feed
    }

    /// The feed's URL ("" for an anonymous tracker).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The `seq` this run of the feed resumed after: its events are numbered from
    /// `start_seq + 1` (0: the feed started from the beginning, with nothing to resume).
    pub fn start_seq(&self) -> u64 {
        self.start_seq
    }

    /// This run under the lease epoch `epoch` (a fleet).
    pub fn with_epoch(mut self, epoch: Option<i64>) -> Self {
        self.epoch = epoch;
        self
    }

    /// The lease epoch this run reads under, in a fleet.
    pub fn epoch(&self) -> Option<i64> {
        self.epoch
    }

    /// The id of the event this run resumed after (the Last-Event-ID it resumed with).
    pub fn start_id(&self) -> &str {
        &self.start_id
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the queue half-updated in a way that
        // breaks the invariant (each update is a single push/pop/decrement), so poisoning is
        // ignored rather than turned into a second panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers events in sequence order: `(seq, last event id, number of sinks)`. Must be
    /// called before the events are handed to any sink. An ID given as `&Arc<str>` (the
    /// event's own) is shared, not copied.
    pub fn register<I: EventId>(&self, events: impl IntoIterator<Item = (u64, I, u32)>) {
        let mut inner = self.lock();
        for (seq, id, sinks) in events {
            let expected = inner.front_seq + inner.pending.len() as u64;
            debug_assert_eq!(seq, expected, "events must be registered in sequence order");
            let previous = match inner.pending.back() {
                Some(prev) => &prev.id,
                None => &inner.acked.last_event_id,
            };
            let id = id.into_shared(previous);
            inner.pending.push_back(Entry {
                remaining: sinks,
                id,
            });
        }
        advance(&mut inner);
    }

    /// An ID-only dispatch (`id: x` then a blank line, no data): the checkpoint may move to
    /// `id` once every event before it is stored.
    pub fn id_only(&self, id: &str) {
        let mut inner = self.lock();
        let id: Arc<str> = Arc::from(id);
        match inner.pending.back_mut() {
            Some(last) => last.id = id,
            None => {
                if inner.acked.last_event_id != id {
                    inner.acked.last_event_id = id;
                    inner.changed = true;
                }
            }
        }
    }

    /// One sink acknowledges these events as stored.
    pub fn ack(&self, seqs: impl IntoIterator<Item = u64>) {
        let mut inner = self.lock();
        for seq in seqs {
            let Some(index) = seq.checked_sub(inner.front_seq) else {
                continue; // already fully acknowledged
            };
            if let Some(entry) = inner.pending.get_mut(index as usize) {
                entry.remaining = entry.remaining.saturating_sub(1);
            }
        }
        advance(&mut inner);
    }

    /// The position the checkpoint would reach if one sink acknowledged `seqs` now, given
    /// what the other sinks have acknowledged so far. Changes nothing. The real position after
    /// that sink's [`FeedTracker::ack`] is this one or later (other sinks only add acks), so a
    /// sink may store it atomically with the events as a checkpoint that never runs ahead of
    /// storage.
    pub fn position_if_acked(&self, seqs: &[u64]) -> Position {
        let mut sorted;
        let seqs = if seqs.windows(2).all(|w| w[0] <= w[1]) {
            seqs
        } else {
            sorted = seqs.to_vec();
            sorted.sort_unstable();
            &sorted[..]
        };
        let inner = self.lock();
        let mut position = inner.acked.clone();
        let mut next = 0usize;
        for (offset, entry) in inner.pending.iter().enumerate() {
            let seq = inner.front_seq + offset as u64;
            while seqs.get(next).is_some_and(|&s| s < seq) {
                next += 1;
            }
            let mine = u32::from(seqs.get(next) == Some(&seq));
            if entry.remaining.saturating_sub(mine) > 0 {
                break;
            }
            position = Position {
                seq,
                last_event_id: entry.id.clone(),
            };
        }
        position
    }

    /// The acknowledged position, if it changed since the last call.
    pub fn take_changed(&self) -> Option<Position> {
        let mut inner = self.lock();
        if inner.changed {
            inner.changed = false;
            Some(inner.acked.clone())
        } else {
            None
        }
    }

    /// Marks the position as not yet committed again (after a failed commit).
    pub fn mark_changed(&self) {
        self.lock().changed = true;
    }

    /// The acknowledged position.
    pub fn acked(&self) -> Position {
        self.lock().acked.clone()
    }

    /// Events registered but not yet acknowledged by all their sinks.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// The sequence number of the last event registered (the start position's before any).
    pub fn head_seq(&self) -> u64 {
        let inner = self.lock();
        (inner.front_seq + inner.pending.len() as u64).saturating_sub(1)
    }
}

fn advance(inner: &mut Inner) {
    while inner.pending.front().is_some_and(|e| e.remaining == 0) {
        if let Some(entry) = inner.pending.pop_front() {
            inner.acked = Position {
                seq: inner.front_seq,
                last_event_id: entry.id,
            };
            inner.front_seq += 1;
            inner.changed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> FeedTracker {
        FeedTracker::new(Position {
            seq: 10,
            last_event_id: Arc::from("a"),
        })
    }

    #[test]
    fn checkpoint_waits_for_every_sink_of_every_earlier_event() {
        let t = start();
        t.register([(11, "b", 2), (12, "c", 1), (13, "d", 0)]);
        assert_eq!(t.take_changed(), None);
        t.ack([12]); // a later event stored first: the checkpoint must not move
        assert_eq!(t.take_changed(), None);
        t.ack([11]); // one of two sinks
        assert_eq!(t.take_changed(), None);
        t.ack([11]);
        let p = t.take_changed().expect("moved");
        // 11, 12 and the unrouted 13 are all acknowledged
        assert_eq!((p.seq, &*p.last_event_id), (13, "d"));
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn unrouted_events_are_acknowledged_in_order() {
        let t = start();
        t.register([(11, "b", 0)]);
        assert_eq!(t.acked().seq, 11);
        t.register([(12, "c", 1), (13, "d", 0)]);
        assert_eq!(t.acked().seq, 11);
        t.ack([12]);
        assert_eq!(t.acked().seq, 13);
    }

    #[test]
    fn id_only_dispatch_moves_after_the_events_before_it() {
        let t = start();
        t.register([(11, "b", 1)]);
        t.id_only("z");
        assert_eq!(&*t.acked().last_event_id, "a");
        t.ack([11]);
        let p = t.acked();
        assert_eq!((p.seq, &*p.last_event_id), (11, "z"));
        t.id_only("y");
        assert_eq!(&*t.acked().last_event_id, "y");
    }

    #[test]
    fn position_if_acked_previews_without_changing_anything() {
        let t = FeedTracker::for_feed(
            "f",
            "http://x",
            Position {
                seq: 10,
                last_event_id: Arc::from("a"),
            },
        );
        assert_eq!((t.feed(), t.url()), ("f", "http://x"));
        t.register([(11, "b", 2), (12, "c", 1), (13, "d", 0), (14, "e", 1)]);
        // 11 still waits for another sink: no movement.
        assert_eq!(t.position_if_acked(&[11, 12]).seq, 10);
        t.ack([11]); // the other sink
        let p = t.position_if_acked(&[11, 12]);
        assert_eq!(
            (p.seq, &*p.last_event_id),
            (13, "d"),
            "through the unrouted 13"
        );
        assert_eq!(
            t.position_if_acked(&[12, 11, 14]).seq,
            14,
            "order does not matter"
        );
        assert_eq!(t.position_if_acked(&[14]).seq, 10, "a gap stops it");
        assert_eq!(t.acked().seq, 10, "nothing changed");
        assert_eq!(t.pending(), 4);
        t.ack([11, 12]);
        assert_eq!(t.acked().seq, 13);
        assert_eq!(t.position_if_acked(&[]).seq, 13);
    }

    #[test]
    fn stale_and_unknown_acks_are_ignored() {
        let t = start();
        t.ack([3, 99]);
        assert_eq!(t.take_changed(), None);
        t.register([(11, "b", 1)]);
        t.ack([11, 11]);
        assert_eq!(t.acked().seq, 11);
    }
}
