//! Incremental parser for `text/event-stream` (WHATWG HTML, "Parsing an event stream" and
//! "Interpreting an event stream"). OWNED BY THE PARSER HELPER: replace the stubs.

/// One dispatched event, before the bridge stamps it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The event type buffer, or `message` when it was empty.
    pub event_type: String,
    /// The data buffer with its one trailing LF removed.
    pub data: String,
    /// The last event ID string as of this event.
    pub id: String,
}

/// What the parser hands out, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A dispatched event.
    Event(SseEvent),
    /// A blank line dispatched with an empty data buffer, but the last event ID string changed
    /// (e.g. `id: 42` followed by a blank line). Nothing is dispatched, yet a reconnection
    /// would now send this ID.
    LastEventId(String),
}

/// Limits that keep memory bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest line accepted, in bytes (the line terminator not counted).
    pub max_line_bytes: usize,
    /// Largest data buffer accepted, in bytes.
    pub max_event_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: 1024 * 1024,
            max_event_bytes: 1024 * 1024,
        }
    }
}

/// A stream that broke a limit. The stream cannot be resumed mid-line: reconnect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("a line of at least {size} bytes exceeds the limit of {limit} bytes (max_event_size)")]
    LineTooLong { size: usize, limit: usize },
    #[error("an event of at least {size} bytes exceeds the limit of {limit} bytes (max_event_size)")]
    EventTooLarge { size: usize, limit: usize },
}
