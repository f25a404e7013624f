//! Per-type event counts of a feed: bounded cardinality, no lock per event.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::route::Outcome;

/// Distinct event types counted separately per feed. Event types come from the stream
/// (untrusted data): past this many, further types are counted under [`OTHER_TYPE`].
pub const MAX_TYPES: usize = 1000;

/// Event types longer than this (in bytes) are counted under [`OTHER_TYPE`], so one absurd
/// type cannot bloat memory or the metrics page.
pub const MAX_TYPE_LEN: usize = 128;

/// The `type` label of events whose type is not counted on its own.
pub const OTHER_TYPE: &str = "_other";

/// What happened to the events of one type of one feed.
#[derive(Debug, Default)]
pub struct TypeStats {
    /// Events dispatched by the parser.
    pub received: AtomicU64,
    /// Bytes of their data.
    pub data_bytes: AtomicU64,
    /// Handed to at least one sink (misfits sent to the default route included).
    pub routed: AtomicU64,
    /// Sent to the default route because the matched route's sinks cannot store the type.
    pub misfit: AtomicU64,
    /// Dropped by a `drop = true` route.
    pub dropped: AtomicU64,
    /// Matched no route and had no usable default route.
    pub unrouted: AtomicU64,
}

impl TypeStats {
    /// Counts one event with `bytes` of data and the router's decision about it.
    #[inline]
    pub fn record(&self, bytes: usize, outcome: Outcome, routed: bool) {
        self.record_many(1, bytes as u64, outcome, routed);
    }

    /// Counts `events` events of this type, with `bytes` of data in all, that got the same
    /// decision (the feed task counts a run of same-type events at once).
    #[inline]
    pub fn record_many(&self, events: u64, bytes: u64, outcome: Outcome, routed: bool) {
        self.received.fetch_add(events, Ordering::Relaxed);
        self.data_bytes.fetch_add(bytes, Ordering::Relaxed);
        if routed {
            self.routed.fetch_add(events, Ordering::Relaxed);
        }
        let counter = match outcome {
            Outcome::Routed => return,
            Outcome::Misfit => &self.misfit,
            Outcome::Dropped => &self.dropped,
            Outcome::Unrouted => &self.unrouted,
        };
        counter.fetch_add(events, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct TableInner {
    types: BTreeMap<String, Arc<TypeStats>>,
    other: Option<Arc<TypeStats>>,
}

/// The per-type counters of one feed, shared with observers. The feed task reaches it through
/// a [`TypeCache`], so the lock is taken once per new type, never per event.
#[derive(Debug, Default)]
pub struct TypeTable {
    inner: Mutex<TableInner>,
}

impl TypeTable {
    /// The counters of `event_type`; `None` when the type is counted under [`OTHER_TYPE`]
    /// (too long, or the table is full), with the shared `_other` counters.
    fn lookup(&self, event_type: &str) -> (Option<Arc<TypeStats>>, Arc<TypeStats>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let other = inner.other.get_or_insert_with(Default::default).clone();
        if event_type.len() > MAX_TYPE_LEN || event_type == OTHER_TYPE {
            return (None, other);
        }
        if let Some(s) = inner.types.get(event_type) {
            return (Some(s.clone()), other);
        }
        if inner.types.len() >= MAX_TYPES {
            return (None, other);
        }
        let s: Arc<TypeStats> = Arc::default();
        inner.types.insert(event_type.to_string(), s.clone());
        (Some(s), other)
    }

    /// Whether no more types get their own counters.
    fn is_full(&self) -> bool {
        self.inner
            .lock()
            .map(|i| i.types.len() >= MAX_TYPES)
            .unwrap_or(true)
    }

    /// Every counted type with its counters, `_other` last (when used).
    pub fn snapshot(&self) -> Vec<(String, Arc<TypeStats>)> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(String, Arc<TypeStats>)> = inner
            .types
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(other) = &inner.other {
            if other.received.load(Ordering::Relaxed) > 0 {
                out.push((OTHER_TYPE.to_string(), other.clone()));
            }
        }
        out
    }
}

/// The feed task's private index into its [`TypeTable`]: a plain map, bounded like the table.
#[derive(Debug, Default)]
pub struct TypeCache {
    map: HashMap<String, Arc<TypeStats>>,
    other: Option<Arc<TypeStats>>,
    full: bool,
}

impl TypeCache {
    /// The counters for events of `event_type`.
    #[inline]
    pub fn get(&mut self, table: &TypeTable, event_type: &str) -> &TypeStats {
        if !self.map.contains_key(event_type) {
            let shared = self.full || event_type.len() > MAX_TYPE_LEN || event_type == OTHER_TYPE;
            if self.other.is_none() || !shared {
                let (own, other) = table.lookup(event_type);
                self.other.get_or_insert(other);
                match own {
                    Some(s) => {
                        self.map.insert(event_type.to_string(), s);
                    }
                    None => self.full = self.full || table.is_full(),
                }
            }
        }
        match (self.map.get(event_type), &self.other) {
            (Some(s), _) => s,
            (None, Some(other)) => other,
            // `other` is set by the lookup above whenever it was missing.
            (None, None) => &UNCOUNTED,
        }
    }
}

/// Never reached (see [`TypeCache::get`]); keeps the lookup total without a panic.
static UNCOUNTED: TypeStats = TypeStats {
    received: AtomicU64::new(0),
    data_bytes: AtomicU64::new(0),
    routed: AtomicU64::new(0),
    misfit: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
    unrouted: AtomicU64::new(0),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_counted_and_bounded() {
        let table = TypeTable::default();
        let mut cache = TypeCache::default();
        for i in 0..(MAX_TYPES + 50) {
            cache
                .get(&table, &format!("t{i}"))
                .record(3, Outcome::Routed, true);
        }
        cache.get(&table, "t0").record(3, Outcome::Dropped, false);
        cache
            .get(&table, &"x".repeat(MAX_TYPE_LEN + 1))
            .record(1, Outcome::Unrouted, false);
        let snap = table.snapshot();
        assert_eq!(snap.len(), MAX_TYPES + 1);
        let (name, other) = snap.last().expect("other");
        assert_eq!(name, OTHER_TYPE);
        assert_eq!(other.received.load(Ordering::Relaxed), 51);
        assert_eq!(other.unrouted.load(Ordering::Relaxed), 1);
        let t0 = &snap.iter().find(|(n, _)| n == "t0").expect("t0").1;
        assert_eq!(t0.received.load(Ordering::Relaxed), 2);
        assert_eq!(t0.routed.load(Ordering::Relaxed), 1);
        assert_eq!(t0.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(t0.data_bytes.load(Ordering::Relaxed), 6);
        assert!(cache.map.len() <= MAX_TYPES);
        let total: u64 = snap
            .iter()
            .map(|(_, s)| s.received.load(Ordering::Relaxed))
            .sum();
        assert_eq!(total, (MAX_TYPES + 50 + 2) as u64);
    }

    #[test]
    fn a_type_named_like_the_overflow_bucket_shares_it() {
        let table = TypeTable::default();
        let mut cache = TypeCache::default();
        cache
            .get(&table, OTHER_TYPE)
            .record(0, Outcome::Routed, true);
        let snap = table.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].0, OTHER_TYPE);
    }
}
