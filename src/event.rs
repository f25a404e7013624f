//! The event as the bridge sees it (ARCHITECTURE.md §1).

use std::sync::Arc;

use chrono::{DateTime, Utc};

/// One dispatched Server-Sent Event, stamped by the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The configured feed name.
    pub feed: Arc<str>,
    /// The SSE event type; `message` when the stream named none. Shared between the events
    /// of a feed that have the same type.
    pub event_type: Arc<str>,
    /// The data buffer as the standard builds it (lines joined by LF, one trailing LF removed).
    pub data: String,
    /// The stream's last event ID as of this event (persists across events without `id:`).
    /// Shared between the events dispatched under the same ID.
    pub id: Arc<str>,
    /// Wall clock time at which the bridge parsed the event.
    pub received_at: DateTime<Utc>,
    /// Per-feed monotonic sequence number assigned by the bridge, starting at 1.
    pub seq: u64,
}

impl Event {
    /// An event with the given fields, received now. The bridge makes its events in the
    /// pipeline (which stamps `received_at` and `seq`); this is for tests and tools.
    pub fn new(feed: &str, event_type: &str, id: &str, data: impl Into<String>, seq: u64) -> Event {
        Event {
            feed: Arc::from(feed),
            event_type: Arc::from(event_type),
            data: data.into(),
            id: Arc::from(id),
            received_at: Utc::now(),
            seq,
        }
    }
}
