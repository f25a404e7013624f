//! The per-feed pipeline (ARCHITECTURE.md, "Data flow"): one task per feed turns what its
//! source reads into numbered events, asks the router where each run of same-type events
//! goes, copies them to live taps, registers them with the feed's checkpoint tracker and only
//! then hands one batch per sink to the sinks' bounded buffers. It writes counters
//! ([`crate::telemetry`]) that observers read; it never waits for an observer.
//!
//! The task reads through [`Source`], which the EventSource client implements and tests
//! replace with a scripted one.

mod runs;
pub mod tap;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use chrono::Utc;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{Committable, FeedTracker, SharedState};
use crate::config::FeedConfig;
use crate::event::Event;
use crate::route::Router;
use crate::sink::runner::{SendOutcome, SinkHandle};
use crate::sse::client::{EventSource, Next};
use crate::sse::parser::Item;
use crate::sse::status::StatusHandle;
use crate::state::{Gap, GapReason, Recorded};
use crate::telemetry::lag::LagInput;
use crate::telemetry::{FeedStats, TypeCache};
use runs::{TypeRun, UnroutableWarning};
use tap::for_tap;

/// What the feed task reads: items of one stream, gaps, and the end.
pub trait Source: Send {
    /// Waits for the next items and appends them to `out` (at least one when it returns
    /// [`Next::Items`]). Must be cancel-safe: the task drops the future on shutdown and on a
    /// routing change.
    fn next(&mut self, out: &mut Vec<Item>) -> impl Future<Output = Next> + Send;

    /// The last event ID a reconnection would send (empty: none); recorded with gaps.
    fn last_event_id(&self) -> &str;
}

impl Source for EventSource {
    fn next(&mut self, out: &mut Vec<Item>) -> impl Future<Output = Next> + Send {
        EventSource::next(self, out)
    }

    fn last_event_id(&self) -> &str {
        EventSource::last_event_id(self)
    }
}

/// What the rest of the process (admin endpoint, status, committer) can see of a running feed.
#[derive(Clone)]
pub struct FeedView {
    pub config: Arc<FeedConfig>,
    pub status: StatusHandle,
    pub tracker: Arc<FeedTracker>,
    pub stats: Arc<FeedStats>,
}

impl FeedView {
    /// What the checkpoint lag sampler reads of this feed.
    pub fn lag_input(&self) -> LagInput<'_> {
        LagInput {
            feed: &self.config.name,
            tracker: &self.tracker,
            committed: self.stats.committed_seq.load(Ordering::Relaxed),
        }
    }
}

impl Committable for FeedView {
    fn tracker(&self) -> &FeedTracker {
        &self.tracker
    }

    fn committed(&self, seq: u64) {
        self.stats.committed_seq.store(seq, Ordering::Relaxed);
    }
}

/// The router and the sinks its indices refer to; swapped as a whole on reload, read by every
/// feed task.
pub struct Routing {
    pub router: Router,
    pub sinks: Vec<SinkHandle>,
}

/// One feed's task: reads items from its [`Source`], numbers the events, routes them, and
/// hands per-sink batches to the sink buffers after registering them with the tracker.
pub struct FeedTask<S> {
    view: FeedView,
    source: S,
    routing: watch::Receiver<Arc<Routing>>,
    state: SharedState,
    tap: broadcast::Sender<Arc<Event>>,
    next_seq: u64,
}

impl<S: Source> FeedTask<S> {
    /// A task for the feed `view` reading `source`; its first event gets `start_seq + 1`
    /// (the committed checkpoint's sequence number, so a re-fetched event keeps its `seq`).
    pub fn new(
        view: FeedView,
        source: S,
        routing: watch::Receiver<Arc<Routing>>,
        state: SharedState,
        tap: broadcast::Sender<Arc<Event>>,
        start_seq: u64,
    ) -> Self {
        FeedTask {
            view,
            source,
            routing,
            state,
            tap,
            next_seq: start_seq + 1,
        }
    }

    /// The feed's loop. `self` is boxed: a future keeps its by-value arguments twice (as
    /// captured and as the bound local), and a `FeedTask` is about 1 KiB; with a box each copy
    /// is a pointer (1 KiB less per feed, 10 MiB for 10 000 idle feeds).
    pub async fn run(mut self: Box<Self>, stop: CancellationToken) {
        let name: Arc<str> = Arc::from(self.view.config.name.as_str());
        let mut routing = self.routing.borrow_and_update().clone();
        let mut router = routing.router.for_feed(&name);
        // These buffers start empty and keep the capacity a busy feed gives them: allocated
        // up front they would cost an idle feed about 24 KiB (10 000 feeds: 240 MiB).
        let mut items: Vec<Item> = Vec::new();
        // Events of the current read, with the number of sinks each went to, until they are
        // registered with the tracker. Each event goes straight into the batches of its sinks
        // (`per_sink`): the batches are sent only after registration, below.
        let mut events: Vec<(Arc<Event>, u32)> = Vec::new();
        let mut per_sink: Vec<Vec<Arc<Event>>> = vec![Vec::new(); routing.sinks.len()];
        let tracker = self.view.tracker.clone();
        let stats = self.view.stats.clone();
        let mut types = TypeCache::default();
        let mut unroutable = UnroutableWarning::default();
        loop {
            items.clear();
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                // A reload swapped the routing: let go of the old sinks at once, even when
                // this feed is idle, so replaced sinks can drain and close.
                changed = self.routing.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    continue;
                }
                n = self.source.next(&mut items) => n,
            };
            if self.routing.has_changed().unwrap_or(false) {
                routing = self.routing.borrow_and_update().clone();
                router = routing.router.for_feed(&name);
                per_sink = vec![Vec::new(); routing.sinks.len()];
            }
            match next {
                Next::Items => {}
                Next::Gap {
                    reason,
                    detail,
                    last_event_id,
                } => {
                    self.record_gap(reason.into(), detail, &last_event_id).await;
                    continue;
                }
                Next::Stopped { reason } => {
                    tracing::error!(feed = %name, "feed stopped: {reason}");
                    drop(routing);
                    stop.cancelled().await;
                    return;
                }
            }
            let received_at = Utc::now();
            let tapped = self.tap.receiver_count() > 0;
            // Consecutive events of one type are routed and counted once per run.
            let mut run: Option<TypeRun> = None;
            for item in items.drain(..) {
                match item {
                    Item::Event(e) => {
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        if !run.as_ref().is_some_and(|r| r.is(&e.event_type)) {
                            if let Some(done) = run.take() {
                                done.count(&name, &stats, &mut types, &mut unroutable);
                            }
                        }
                        let current = run.get_or_insert_with(|| TypeRun {
                            decision: router.route(&e.event_type).clone(),
                            event_type: e.event_type.clone(),
                            events: 0,
                            bytes: 0,
                        });
                        current.events += 1;
                        current.bytes += e.data.len() as u64;
                        let decision = &current.decision;
                        let event = Arc::new(Event {
                            feed: name.clone(),
                            event_type: e.event_type,
                            data: e.data,
                            id: e.id,
                            received_at,
                            seq,
                        });
                        if tapped {
                            let _ = self.tap.send(for_tap(&event));
                        }
                        for &index in &decision.sinks {
                            per_sink[index].push(event.clone());
                        }
                        events.push((event, decision.sinks.len() as u32));
                    }
                    Item::LastEventId(id) => {
                        register(&tracker, &mut events);
                        tracker.id_only(&id);
                    }
                }
            }
            if let Some(done) = run.take() {
                done.count(&name, &stats, &mut types, &mut unroutable);
            }
            if !events.is_empty() {
                let millis = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                stats.last_event_at_ms.store(millis, Ordering::Relaxed);
            }
            register(&tracker, &mut events);
            for (index, batch) in per_sink.iter_mut().enumerate() {
                if batch.is_empty() {
                    continue;
                }
                // The next batch starts with room for as many events as this one had.
                let capacity = batch.len();
                let batch = std::mem::replace(batch, Vec::with_capacity(capacity));
                let sink = &routing.sinks[index];
                let seqs: Vec<u64> = batch.iter().map(|e| e.seq).collect();
                let outcome = tokio::select! {
                    biased;
                    // Shutdown while a sink holds the feed back: the unsent events stay
                    // unacknowledged, so the checkpoint stays before them.
                    _ = stop.cancelled() => return,
                    o = sink.send(batch, &tracker) => o,
                };
                match outcome {
                    SendOutcome::Queued => {}
                    SendOutcome::Dropped(n) => {
                        stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
                        tracker.ack(seqs);
                    }
                    SendOutcome::Closed => return,
                }
            }
        }
    }

    /// Records a gap the source reported, with the last event ID it concerns (for a rejected
    /// ID the rejected one: the source has already dropped it).
    async fn record_gap(&self, reason: GapReason, detail: String, last_event_id: &str) {
        let p = self.view.tracker.acked();
        let name = &self.view.config.name;
        let gap = Gap::once(
            name,
            &self.view.config.url,
            reason,
            detail,
            last_event_id,
            p.seq.max(self.next_seq.saturating_sub(1)),
            Utc::now(),
        );
        let result = self.state.record_gap(gap.clone()).await.map(|r| (r, gap));
        match result {
            // A repeat of the previous gap is counted in its row; logging each one again
            // would turn a server that closes at once into a flood of identical lines.
            Ok((Recorded::New, gap)) => {
                tracing::warn!(feed = %name, reason = reason.as_str(), "gap: {}", gap.detail)
            }
            Ok((Recorded::Repeat(n), gap)) => {
                let level_warn = n.is_power_of_two();
                if level_warn {
                    tracing::warn!(feed = %name, reason = reason.as_str(), repeats = n, "gap repeated {n} times: {}", gap.detail)
                } else {
                    tracing::debug!(feed = %name, reason = reason.as_str(), repeats = n, "gap repeated: {}", gap.detail)
                }
            }
            Err(e) => tracing::error!(feed = %name, "recording a gap failed: {e}"),
        }
    }
}

/// Registers the events of the current read with the tracker, with the number of sinks each
/// went to, before any sink can see them, and forgets them.
fn register(tracker: &FeedTracker, events: &mut Vec<(Arc<Event>, u32)>) {
    if events.is_empty() {
        return;
    }
    tracker.register(events.iter().map(|(e, sinks)| (e.seq, &e.id, *sinks)));
    events.clear();
}
