//! The observable state of a feed, mirroring the EventSource `readyState`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

/// Where a feed's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadyState {
    /// Connecting, or waiting to reconnect (the browser's CONNECTING).
    Connecting,
    /// The response was accepted and events are flowing (the browser's OPEN).
    Open,
    /// Closed by the bridge itself (shutdown or reload); not an error.
    Closed,
    /// The feed will not reconnect until an operator restarts it: the server answered 204,
    /// or the policy (`browser`, `on_client_error = "stop"`) failed the connection.
    Stopped,
}

/// The classes of failures counted in [`FeedStatus::errors`]: `network` (connect, DNS, TLS,
/// timeouts, a broken connection), `eof` (the server ended the stream), `too_large` (a line or
/// event over `max_event_size`), `unavailable` (5xx, 408, 429), `client` (other 4xx, a wrong
/// content type, redirect trouble), `id_rejected` (the server refused the Last-Event-ID),
/// `no_content` (204: stop), `local` (the bearer token is unreadable).
pub const ERROR_CLASSES: [&str; 8] = [
    "network",
    "eof",
    "too_large",
    "unavailable",
    "client",
    "id_rejected",
    "no_content",
    "local",
];

/// A snapshot of one feed's health, kept current by the client.
#[derive(Debug, Clone, Serialize)]
pub struct FeedStatus {
    pub state: ReadyState,
    /// The last error, human readable, already naming the feed. Never holds secrets.
    pub last_error: Option<String>,
    /// When `last_error` happened.
    pub last_error_at: Option<SystemTime>,
    /// The last event ID the client would send on its next reconnection.
    pub last_event_id: String,
    /// Connection attempts after the first one.
    pub reconnects: u64,
    /// The delay the client is waiting out before its next attempt, if any.
    pub current_backoff: Option<Duration>,
    /// When the current connection opened.
    pub open_since: Option<SystemTime>,
    /// The protocol of the current (or last) connection: `HTTP/1.1` or `HTTP/2`.
    pub protocol: Option<&'static str>,
    /// The id of that connection: feeds on one shared HTTP/2 connection show the same id.
    pub connection: Option<u64>,
    /// Failures so far, by class (one of [`ERROR_CLASSES`]).
    pub errors: BTreeMap<&'static str, u64>,
}

impl Default for FeedStatus {
    fn default() -> Self {
        FeedStatus {
            state: ReadyState::Connecting,
            last_error: None,
            last_error_at: None,
            last_event_id: String::new(),
            reconnects: 0,
            current_backoff: None,
            open_since: None,
            protocol: None,
            connection: None,
            errors: BTreeMap::new(),
        }
    }
}

/// The writer's end: the client updates it, anyone may subscribe to it.
#[derive(Debug, Clone)]
pub struct StatusHandle {
    tx: Arc<watch::Sender<FeedStatus>>,
    /// Bytes read from response bodies: counted per read, so kept out of the watched status.
    bytes: Arc<AtomicU64>,
}

impl Default for StatusHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl StatusHandle {
    pub fn new() -> Self {
        StatusHandle {
            tx: Arc::new(watch::channel(FeedStatus::default()).0),
            bytes: Arc::default(),
        }
    }

    /// Changes the status in place and notifies subscribers.
    pub fn update(&self, f: impl FnOnce(&mut FeedStatus)) {
        self.tx.send_modify(f);
    }

    pub fn get(&self) -> FeedStatus {
        self.tx.borrow().clone()
    }

    pub fn state(&self) -> ReadyState {
        self.tx.borrow().state
    }

    pub fn subscribe(&self) -> watch::Receiver<FeedStatus> {
        self.tx.subscribe()
    }

    /// Counts a chunk read from the response body.
    pub fn add_received_bytes(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes read from response bodies so far.
    pub fn received_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}
