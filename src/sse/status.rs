//! The observable state of a feed, mirroring the EventSource `readyState`.

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
        }
    }
}

/// The writer's end: the client updates it, anyone may subscribe to it.
#[derive(Debug, Clone)]
pub struct StatusHandle(Arc<watch::Sender<FeedStatus>>);

impl Default for StatusHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl StatusHandle {
    pub fn new() -> Self {
        StatusHandle(Arc::new(watch::channel(FeedStatus::default()).0))
    }

    /// Changes the status in place and notifies subscribers.
    pub fn update(&self, f: impl FnOnce(&mut FeedStatus)) {
        self.0.send_modify(f);
    }

    pub fn get(&self) -> FeedStatus {
        self.0.borrow().clone()
    }

    pub fn state(&self) -> ReadyState {
        self.0.borrow().state
    }

    pub fn subscribe(&self) -> watch::Receiver<FeedStatus> {
        self.0.subscribe()
    }
}
