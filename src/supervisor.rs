//! The supervisor: one task per feed, one runner thread per sink, a checkpoint committer,
//! and the drain on shutdown.
//!
//! Data flows one way: feed task (socket -> parser -> event) -> router -> sink buffers ->
//! runner threads -> acknowledgements -> [`FeedTracker`] -> committer -> state store.
//! One feed's failure never touches another: each feed owns its connection, parser, router
//! cache and tracker; they share only the sinks' bounded buffers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{FeedTracker, Position};
use crate::config::{FeedConfig, LoadedConfig};
use crate::event::Event;
use crate::route::{Outcome, Router};
use crate::sink::runner::{self, SendOutcome, SinkHandle, SinkWorker};
use crate::sse::client::{EventSource, Next};
use crate::sse::parser::Item;
use crate::sse::status::{ReadyState, StatusHandle};
use crate::state::{Checkpoint, Gap, GapReason, StateStore};

/// Counters of one feed (DESIGN.md §5: nothing is lost silently, everything is counted).
#[derive(Debug, Default)]
pub struct FeedStats {
    /// Events dispatched by the parser.
    pub received: AtomicU64,
    /// Events handed to at least one sink.
    pub routed: AtomicU64,
    /// Events whose type did not fit the matched route's sinks and went to the default route.
    pub misfit: AtomicU64,
    /// Events dropped by a `drop = true` route or a full `drop_newest` buffer.
    pub dropped: AtomicU64,
    /// Events that matched no route and had no default route.
    pub unrouted: AtomicU64,
}

/// What the rest of the process (and later the admin endpoint) can see of a running feed.
#[derive(Clone)]
pub struct FeedView {
    pub config: Arc<FeedConfig>,
    pub status: StatusHandle,
    pub tracker: Arc<FeedTracker>,
    pub stats: Arc<FeedStats>,
}

type SharedState = Arc<Mutex<StateStore>>;

/// Runs the bridge until `shutdown` is cancelled, then drains within the configured deadline.
pub async fn run(loaded: LoadedConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = &loaded.config;
    let state_path = cfg.state.path.clone();
    let store = tokio::task::spawn_blocking(move || StateStore::open(&state_path))
        .await
        .context("opening the state database")??;
    let state: SharedState = Arc::new(Mutex::new(store));

    // Sinks, in the order the router numbers them.
    let sink_configs: Vec<(String, crate::sink::SinkConfig)> = cfg
        .sink
        .iter()
        .map(|(n, c)| (n.clone(), c.clone()))
        .collect();
    let router = Router::new(&cfg.route, &cfg.routing, &sink_configs)
        .map_err(|e| anyhow::anyhow!("{}: {e}", loaded.source))?;
    let give_up = CancellationToken::new();
    let mut handles: Vec<SinkHandle> = Vec::new();
    let mut workers: Vec<SinkWorker> = Vec::new();
    for (name, sink_cfg) in &sink_configs {
        let sink = sink_cfg
            .build(name)
            .with_context(|| format!("starting sink `{name}`"))?;
        let (handle, worker) = runner::spawn(name, sink, sink_cfg.buffer(), give_up.clone())
            .with_context(|| format!("starting the thread of sink `{name}`"))?;
        handles.push(handle);
        workers.push(worker);
    }
    let handles = Arc::new(handles);
    let router = Arc::new(router);

    // Feeds.
    let stop_feeds = CancellationToken::new();
    let mut views = Vec::new();
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    for feed in cfg.enabled_feeds() {
        let feed = Arc::new(feed.clone());
        let start = start_position(&state, &feed).await?;
        let tracker = Arc::new(FeedTracker::new(start.clone()));
        let status = StatusHandle::new();
        let stats = Arc::new(FeedStats::default());
        let source = EventSource::new(
            feed.clone(),
            start.last_event_id.to_string(),
            status.clone(),
        )
        .with_context(|| format!("feed `{}`", feed.name))?;
        tracing::info!(
            feed = %feed.name,
            last_event_id = %start.last_event_id,
            seq = start.seq,
            "starting feed"
        );
        let view = FeedView {
            config: feed.clone(),
            status: status.clone(),
            tracker: tracker.clone(),
            stats: stats.clone(),
        };
        let task = FeedTask {
            view: view.clone(),
            source,
            router: router.clone(),
            sinks: handles.clone(),
            state: state.clone(),
            next_seq: start.seq + 1,
        };
        tasks.push(tokio::spawn(task.run(stop_feeds.clone())));
        views.push(view);
    }
    drop(handles);

    // Checkpoint committer.
    let stop_committer = CancellationToken::new();
    let committer = tokio::spawn(commit_loop(
        views.clone(),
        state.clone(),
        cfg.state.commit_interval,
        stop_committer.clone(),
    ));

    tracing::info!(
        feeds = views.len(),
        sinks = workers.len(),
        config = %loaded.source,
        "sse-bridge running"
    );
    shutdown.cancelled().await;

    // Drain: stop reading, let the sinks store what they hold, commit, exit.
    let deadline = tokio::time::Instant::now() + cfg.shutdown.timeout;
    tracing::info!(timeout = ?cfg.shutdown.timeout, "shutting down: draining feeds and sinks");
    stop_feeds.cancel();
    for task in tasks {
        if tokio::time::timeout_at(deadline, task).await.is_err() {
            tracing::warn!("a feed task did not stop before the shutdown deadline");
        }
    }
    for view in &views {
        view.status.update(|s| {
            if s.state != ReadyState::Stopped {
                s.state = ReadyState::Closed;
            }
        });
    }
    let mut drained = true;
    for worker in workers {
        let name = worker.name.clone();
        if tokio::time::timeout_at(deadline, worker.finished())
            .await
            .is_err()
        {
            drained = false;
            tracing::warn!(sink = %name, "sink did not drain before the shutdown deadline");
        }
    }
    give_up.cancel();
    stop_committer.cancel();
    let _ = committer.await;
    commit(&views, &state).await;
    for view in &views {
        let p = view.tracker.acked();
        let s = &view.stats;
        tracing::info!(
            feed = %view.config.name,
            checkpoint = %p.last_event_id,
            seq = p.seq,
            received = s.received.load(Ordering::Relaxed),
            routed = s.routed.load(Ordering::Relaxed),
            dropped = s.dropped.load(Ordering::Relaxed),
            unrouted = s.unrouted.load(Ordering::Relaxed),
            misfit = s.misfit.load(Ordering::Relaxed),
            "feed closed"
        );
    }
    if drained {
        tracing::info!("shutdown complete");
    } else {
        tracing::warn!("shutdown deadline reached; unstored events stay behind the checkpoint and will be fetched again");
    }
    Ok(())
}

/// Where a feed resumes, recording the gaps a restart implies.
async fn start_position(state: &SharedState, feed: &FeedConfig) -> anyhow::Result<Position> {
    let state = state.clone();
    let name = feed.name.clone();
    let url = feed.url.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Position> {
        let mut store = state
            .lock()
            .map_err(|_| anyhow::anyhow!("state store lock poisoned"))?;
        let checkpoint = store.checkpoint(&name, &url)?;
        let gap = |reason, detail: String, id: &str, seq| Gap {
            feed: name.clone(),
            url: url.clone(),
            reason,
            detail,
            last_event_id: id.to_string(),
            seq,
            at: Utc::now(),
        };
        match checkpoint {
            Some(cp) => {
                if cp.last_event_id.is_empty() && cp.seq > 0 {
                    store.record_gap(&gap(
                        GapReason::RestartWithoutId,
                        "restarted without a Last-Event-ID: the stream carries no ids, so events sent while the bridge was down are lost".into(),
                        "",
                        cp.seq,
                    ))?;
                }
                Ok(Position {
                    seq: cp.seq,
                    last_event_id: Arc::from(cp.last_event_id.as_str()),
                })
            }
            None => {
                if store.has_checkpoint_for_other_url(&name, &url)? {
                    store.record_gap(&gap(
                        GapReason::UrlChanged,
                        format!("the feed's URL changed to {url}; starting without a Last-Event-ID"),
                        "",
                        0,
                    ))?;
                }
                Ok(Position {
                    seq: 0,
                    last_event_id: Arc::from(""),
                })
            }
        }
    })
    .await?
}

struct FeedTask {
    view: FeedView,
    source: EventSource,
    router: Arc<Router>,
    sinks: Arc<Vec<SinkHandle>>,
    state: SharedState,
    next_seq: u64,
}

impl FeedTask {
    async fn run(mut self, stop: CancellationToken) {
        let name: Arc<str> = Arc::from(self.view.config.name.as_str());
        let mut router = self.router.for_feed(&name);
        let mut items: Vec<Item> = Vec::with_capacity(256);
        let mut events: Vec<(Arc<Event>, Vec<usize>)> = Vec::with_capacity(256);
        let mut per_sink: Vec<Vec<Arc<Event>>> = vec![Vec::new(); self.sinks.len()];
        let tracker = self.view.tracker.clone();
        let stats = self.view.stats.clone();
        loop {
            items.clear();
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                n = self.source.next(&mut items) => n,
            };
            match next {
                Next::Items => {}
                Next::Gap { reason, detail } => {
                    self.record_gap(reason, detail).await;
                    continue;
                }
                Next::Stopped { reason } => {
                    tracing::error!(feed = %name, "feed stopped: {reason}");
                    stop.cancelled().await;
                    break;
                }
            }
            let received_at = Utc::now();
            for item in items.drain(..) {
                match item {
                    Item::Event(e) => {
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        stats.received.fetch_add(1, Ordering::Relaxed);
                        let decision = router.route(&e.event_type);
                        match decision.outcome {
                            Outcome::Routed => {}
                            Outcome::Misfit => {
                                stats.misfit.fetch_add(1, Ordering::Relaxed);
                            }
                            Outcome::Dropped => {
                                stats.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                            Outcome::Unrouted => {
                                stats.unrouted.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(feed = %name, event_type = %e.event_type, "event matches no route and there is no default route");
                            }
                        }
                        if !decision.sinks.is_empty() {
                            stats.routed.fetch_add(1, Ordering::Relaxed);
                        }
                        let sinks = decision.sinks.clone();
                        let event = Arc::new(Event {
                            feed: name.clone(),
                            event_type: e.event_type,
                            data: e.data,
                            id: e.id,
                            received_at,
                            seq,
                        });
                        events.push((event, sinks));
                    }
                    Item::LastEventId(id) => {
                        register(&tracker, &events);
                        distribute(&mut events, &mut per_sink);
                        tracker.id_only(&id);
                    }
                }
            }
            register(&tracker, &events);
            distribute(&mut events, &mut per_sink);
            for (index, batch) in per_sink.iter_mut().enumerate() {
                if batch.is_empty() {
                    continue;
                }
                let batch = std::mem::take(batch);
                let sink = &self.sinks[index];
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

    async fn record_gap(&self, reason: GapReason, detail: String) {
        let p = self.view.tracker.acked();
        tracing::warn!(feed = %self.view.config.name, reason = reason.as_str(), "gap: {detail}");
        let gap = Gap {
            feed: self.view.config.name.clone(),
            url: self.view.config.url.clone(),
            reason,
            detail,
            last_event_id: self.source.last_event_id().to_string(),
            seq: p.seq.max(self.next_seq.saturating_sub(1)),
            at: Utc::now(),
        };
        let state = self.state.clone();
        let result = tokio::task::spawn_blocking(move || match state.lock() {
            Ok(mut s) => s.record_gap(&gap).map_err(|e| e.to_string()),
            Err(_) => Err("state store lock poisoned".to_string()),
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(feed = %self.view.config.name, "recording a gap failed: {e}")
            }
            Err(e) => tracing::error!(feed = %self.view.config.name, "recording a gap failed: {e}"),
        }
    }
}

/// Registers the pending events with the tracker (before any sink can see them).
fn register(tracker: &FeedTracker, events: &[(Arc<Event>, Vec<usize>)]) {
    if events.is_empty() {
        return;
    }
    tracker.register(
        events
            .iter()
            .map(|(e, sinks)| (e.seq, e.id.as_str(), sinks.len() as u32)),
    );
}

/// Moves registered events into per-sink batches.
fn distribute(events: &mut Vec<(Arc<Event>, Vec<usize>)>, per_sink: &mut [Vec<Arc<Event>>]) {
    for (event, sinks) in events.drain(..) {
        for index in sinks {
            per_sink[index].push(event.clone());
        }
    }
}

async fn commit_loop(
    views: Vec<FeedView>,
    state: SharedState,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => commit(&views, &state).await,
            _ = stop.cancelled() => return,
        }
    }
}

/// Commits every changed checkpoint in one transaction.
async fn commit(views: &[FeedView], state: &SharedState) {
    let mut changed: Vec<(usize, Checkpoint)> = Vec::new();
    let now = Utc::now();
    for (i, view) in views.iter().enumerate() {
        if let Some(p) = view.tracker.take_changed() {
            changed.push((
                i,
                Checkpoint {
                    feed: view.config.name.clone(),
                    url: view.config.url.clone(),
                    last_event_id: p.last_event_id.to_string(),
                    seq: p.seq,
                    updated_at: now,
                },
            ));
        }
    }
    if changed.is_empty() {
        return;
    }
    let checkpoints: Vec<Checkpoint> = changed.iter().map(|(_, c)| c.clone()).collect();
    let state = state.clone();
    let result = tokio::task::spawn_blocking(move || match state.lock() {
        Ok(mut s) => s.save_checkpoints(&checkpoints).map_err(|e| e.to_string()),
        Err(_) => Err("state store lock poisoned".to_string()),
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    if let Err(e) = result {
        tracing::error!("committing checkpoints failed (will retry): {e}");
        for (i, _) in changed {
            views[i].tracker.mark_changed();
        }
    }
}
