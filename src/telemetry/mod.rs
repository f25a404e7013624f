//! The counters and histograms the pipeline and the sink runners write and the admin endpoint
//! reads (ARCHITECTURE.md, "Data flow": observers read what the pipeline writes, never a lock
//! it waits on). Nothing here knows about HTTP or the exposition format: `admin::metrics`
//! renders these values; the pipeline never imports `admin`.

mod histogram;
pub mod lag;
mod types;

use std::sync::atomic::AtomicU64;

pub use histogram::{Histogram, HistogramSnapshot, LATENCY_BUCKETS};
pub use lag::LagTracker;
pub use types::{TypeCache, TypeStats, TypeTable, MAX_TYPES, MAX_TYPE_LEN, OTHER_TYPE};

/// Counters of one feed (ARCHITECTURE.md §5: nothing is lost silently, everything is counted).
#[derive(Debug, Default)]
pub struct FeedStats {
    /// Events dispatched by the parser.
    pub received: AtomicU64,
    /// Bytes of event data received.
    pub data_bytes: AtomicU64,
    /// Events handed to at least one sink.
    pub routed: AtomicU64,
    /// Events whose type did not fit the matched route's sinks and went to the default route.
    pub misfit: AtomicU64,
    /// Events dropped by a `drop = true` route or a full `drop_newest` buffer.
    pub dropped: AtomicU64,
    /// Events that matched no route and had no default route.
    pub unrouted: AtomicU64,
    /// Unix time (ms) of the last event received; 0 before the first.
    pub last_event_at_ms: AtomicU64,
    /// The same counts per event type (bounded: see [`MAX_TYPES`]).
    pub types: TypeTable,
    /// The sequence number the last committed checkpoint covers.
    pub committed_seq: AtomicU64,
}

impl FeedStats {
    /// Counters of a feed whose committed checkpoint covers `committed_seq`.
    pub fn starting_at(committed_seq: u64) -> Self {
        FeedStats {
            committed_seq: AtomicU64::new(committed_seq),
            ..FeedStats::default()
        }
    }
}
