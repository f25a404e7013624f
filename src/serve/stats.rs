//! What `serve` counts, for `/metrics` (the admin endpoint's under `run`, the server's own
//! under the standalone command): clients connected and events served per feed, and the
//! requests refused by reason. Only feeds the server knows get a label (an unknown feed is
//! answered 404 before anything is counted for it), so the label set is bounded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::admin::metrics::{counters, gauges};

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No valid token (401).
    Unauthenticated,
    /// The token may not read the feed (403).
    Forbidden,
    /// A page from an origin not in `cors_origins` (403).
    Origin,
    /// No such feed (404).
    UnknownFeed,
}

impl Refusal {
    const ALL: [Refusal; 4] = [
        Refusal::Unauthenticated,
        Refusal::Forbidden,
        Refusal::Origin,
        Refusal::UnknownFeed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::Forbidden => "forbidden",
            Refusal::Origin => "origin",
            Refusal::UnknownFeed => "unknown_feed",
        }
    }
}

/// The counters of one feed.
#[derive(Debug, Default)]
pub struct FeedCounters {
    /// Streams open now.
    pub clients: AtomicI64,
    /// Streams opened so far.
    pub connections: AtomicU64,
    /// Events queued to clients so far.
    pub events: AtomicU64,
}

/// The counters of a server.
#[derive(Debug, Default)]
pub struct ServeStats {
    feeds: Mutex<BTreeMap<String, Arc<FeedCounters>>>,
    refused: [AtomicU64; 4],
}

impl ServeStats {
    /// The counters of `feed`, created on first use.
    pub fn feed(&self, feed: &str) -> Arc<FeedCounters> {
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = feeds.get(feed) {
            return c.clone();
        }
        let c = Arc::new(FeedCounters::default());
        feeds.insert(feed.to_string(), c.clone());
        c
    }

    pub fn refused(&self, why: Refusal) {
        self.refused[refusal_index(why)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused_count(&self, why: Refusal) -> u64 {
        self.refused[refusal_index(why)].load(Ordering::Relaxed)
    }

    fn snapshot(&self) -> Vec<(String, Arc<FeedCounters>)> {
        self.feeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

fn refusal_index(why: Refusal) -> usize {
    Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0)
}

/// One scrape's view of the counters, for `prometheus-client`.
#[derive(Debug)]
pub struct ServeCollector(pub Arc<ServeStats>);

impl Collector for ServeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let feeds = self.0.snapshot();
        gauges(
            &mut enc,
            "sse_bridge_serve_clients",
            "Clients streaming from serve now, by feed.",
            feeds.iter().map(|(f, c)| {
                (
                    vec![("feed", f.as_str())],
                    c.clients.load(Ordering::Relaxed),
                )
            }),
        )?;
        counters(
            &mut enc,
            "sse_bridge_serve_connections_total",
            "Streams serve opened, by feed.",
            feeds.iter().map(|(f, c)| {
                (
                    vec![("feed", f.as_str())],
                    c.connections.load(Ordering::Relaxed),
                )
            }),
        )?;
        counters(
            &mut enc,
            "sse_bridge_serve_events_total",
            "Events serve sent to clients, by feed (each client counts).",
            feeds
                .iter()
                .map(|(f, c)| (vec![("feed", f.as_str())], c.events.load(Ordering::Relaxed))),
        )?;
        counters(
            &mut enc,
            "sse_bridge_serve_refused_total",
            "Requests serve refused, by reason (unauthenticated 401, forbidden and origin 403, unknown_feed 404).",
            Refusal::ALL
                .iter()
                .map(|r| (vec![("reason", r.label())], self.0.refused_count(*r))),
        )
    }
}
