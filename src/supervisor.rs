//! The supervisor: one task per feed, one runner thread per sink, a checkpoint committer,
//! reload (SIGHUP) and the drain on shutdown.
//!
//! Data flows one way: feed task (socket -> parser -> event) -> router -> sink buffers ->
//! runner threads -> acknowledgements -> [`FeedTracker`] -> committer -> state store.
//! One feed's failure never touches another: each feed owns its connection, parser, router
//! cache and tracker; they share only the sinks' bounded buffers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use chrono::Utc;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{FeedTracker, Position};
use crate::config::{Config, FeedConfig, LoadedConfig};
use crate::event::Event;
use crate::notify::Notifier;
use crate::route::{Decision, Outcome, Router};
use crate::sink::runner::{self, SendOutcome, SinkGauge, SinkHandle, SinkWorker};
use crate::sink::SinkConfig;
use crate::sse::client::{EventSource, Next};
use crate::sse::parser::Item;
use crate::sse::status::{ReadyState, StatusHandle};
use crate::state::{Checkpoint, Gap, GapReason, Recorded, StateStore};

/// Events kept for live observers (`tap`) that fall behind before they miss some.
const TAP_CAPACITY: usize = 4096;

/// Data shown to taps per event: the broadcast ring keeps its last [`TAP_CAPACITY`] events
/// while any tap is connected, so with events of up to `max_event_size` it could hold
/// gigabytes; larger data is cut (with a note) in the tap's copy only, which bounds the ring to
/// 64 MiB (ARCHITECTURE.md, "Hostile input and bounded resources"). Sinks get the whole event.
const TAP_MAX_DATA: usize = 16 * 1024;

/// The event as taps see it: itself, or a copy with its data cut to [`TAP_MAX_DATA`].
fn for_tap(event: &Arc<Event>) -> Arc<Event> {
    if event.data.len() <= TAP_MAX_DATA {
        return event.clone();
    }
    let mut cut = TAP_MAX_DATA;
    while !event.data.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut data = String::with_capacity(cut + 64);
    data.push_str(&event.data[..cut]);
    let _ = std::fmt::Write::write_fmt(
        &mut data,
        format_args!("…[tap: {} more bytes not shown]", event.data.len() - cut),
    );
    Arc::new(Event {
        feed: event.feed.clone(),
        event_type: event.event_type.clone(),
        data,
        id: event.id.clone(),
        received_at: event.received_at,
        seq: event.seq,
    })
}

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
    /// The same counts per event type (bounded: see [`crate::admin::stats::MAX_TYPES`]).
    pub types: crate::admin::stats::TypeTable,
    /// The sequence number the last committed checkpoint covers.
    pub committed_seq: AtomicU64,
}

/// What the rest of the process (admin endpoint, status, committer) can see of a running feed.
#[derive(Clone)]
pub struct FeedView {
    pub config: Arc<FeedConfig>,
    pub status: StatusHandle,
    pub tracker: Arc<FeedTracker>,
    pub stats: Arc<FeedStats>,
}

/// What observers can see of a running sink.
#[derive(Clone)]
pub struct SinkView {
    pub kind: &'static str,
    pub gauge: SinkGauge,
}

/// The live view of the bridge: feeds and sinks as they are after the last (re)load, and the
/// stream of routed events for live observers. Shared with the admin endpoint.
pub struct Registry {
    feeds: RwLock<BTreeMap<String, FeedView>>,
    sinks: RwLock<BTreeMap<String, SinkView>>,
    tap: broadcast::Sender<Arc<Event>>,
    pub started_at: SystemTime,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            feeds: RwLock::new(BTreeMap::new()),
            sinks: RwLock::new(BTreeMap::new()),
            tap: broadcast::channel(TAP_CAPACITY).0,
            started_at: SystemTime::now(),
        }
    }
}

impl Registry {
    /// The running feeds, by name.
    pub fn feeds(&self) -> Vec<FeedView> {
        self.feeds
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The running sinks, by name.
    pub fn sinks(&self) -> Vec<(String, SinkView)> {
        self.sinks
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Receives every routed event from now on. A receiver that falls more than a few
    /// thousand events behind misses events (it gets `Lagged`); the bridge never waits for it.
    pub fn tap(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tap.subscribe()
    }

    fn set_feed(&self, view: FeedView) {
        if let Ok(mut m) = self.feeds.write() {
            m.insert(view.config.name.clone(), view);
        }
    }

    fn remove_feed(&self, name: &str) {
        if let Ok(mut m) = self.feeds.write() {
            m.remove(name);
        }
    }

    fn set_sinks(&self, sinks: BTreeMap<String, SinkView>) {
        if let Ok(mut m) = self.sinks.write() {
            *m = sinks;
        }
    }
}

/// The router and the sinks its indices refer to; swapped as a whole on reload.
struct Routing {
    router: Router,
    sinks: Vec<SinkHandle>,
}

type SharedState = Arc<Mutex<StateStore>>;

struct RunningSink {
    config: SinkConfig,
    handle: SinkHandle,
    worker: SinkWorker,
}

struct RunningFeed {
    view: FeedView,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// A running bridge.
pub struct Supervisor {
    loaded: LoadedConfig,
    state: SharedState,
    registry: Arc<Registry>,
    sinks: BTreeMap<String, RunningSink>,
    feeds: BTreeMap<String, RunningFeed>,
    routing: watch::Sender<Arc<Routing>>,
    give_up: CancellationToken,
    stop_committer: CancellationToken,
    committer: Option<JoinHandle<()>>,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub feeds_kept: Vec<String>,
    pub feeds_restarted: Vec<String>,
    pub feeds_removed: Vec<String>,
    pub feeds_added: Vec<String>,
    pub sinks_replaced: Vec<String>,
}

impl Supervisor {
    /// Opens the state store, starts every sink and every enabled feed.
    pub async fn start(loaded: LoadedConfig, registry: Arc<Registry>) -> anyhow::Result<Self> {
        let state_path = loaded.config.state.path.clone();
        let store = tokio::task::spawn_blocking(move || StateStore::open(&state_path))
            .await
            .context("opening the state database")??;
        let state: SharedState = Arc::new(Mutex::new(store));
        let give_up = CancellationToken::new();
        let mut sinks = BTreeMap::new();
        for (name, config) in &loaded.config.sink {
            sinks.insert(
                name.clone(),
                start_sink(name, config, &loaded.config.state.path, &give_up, None)?,
            );
        }
        let routing = build_routing(&loaded, &sinks)?;
        let (routing, _) = watch::channel(Arc::new(routing));
        let mut supervisor = Supervisor {
            loaded,
            state,
            registry,
            sinks,
            feeds: BTreeMap::new(),
            routing,
            give_up,
            stop_committer: CancellationToken::new(),
            committer: None,
        };
        supervisor.publish_sinks();
        let feeds: Vec<FeedConfig> = supervisor.loaded.config.enabled_feeds().cloned().collect();
        for feed in feeds {
            supervisor.start_feed(feed).await?;
        }
        supervisor.committer = Some(tokio::spawn(commit_loop(
            supervisor.registry.clone(),
            supervisor.state.clone(),
            supervisor.loaded.config.state.commit_interval,
            supervisor.stop_committer.clone(),
        )));
        tracing::info!(
            feeds = supervisor.feeds.len(),
            sinks = supervisor.sinks.len(),
            config = %supervisor.loaded.source,
            "sse-bridge running"
        );
        Ok(supervisor)
    }

    /// Asks every sink to close and reopen its files (after an external logrotate).
    pub fn reopen_sinks(&self) {
        for sink in self.sinks.values() {
            sink.handle.reopen();
        }
    }

    pub fn config(&self) -> &Config {
        &self.loaded.config
    }

    pub fn loaded(&self) -> &LoadedConfig {
        &self.loaded
    }

    fn publish_sinks(&self) {
        self.registry.set_sinks(
            self.sinks
                .iter()
                .map(|(name, s)| {
                    (
                        name.clone(),
                        SinkView {
                            kind: s.config.kind(),
                            gauge: s.handle.gauge(),
                        },
                    )
                })
                .collect(),
        );
    }

    async fn start_feed(&mut self, feed: FeedConfig) -> anyhow::Result<()> {
        let feed = Arc::new(feed);
        let start = start_position(&self.state, &feed).await?;
        let tracker = Arc::new(FeedTracker::for_feed(&feed.name, &feed.url, start.clone()));
        let status = StatusHandle::new();
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
            status,
            tracker,
            stats: Arc::new(FeedStats {
                committed_seq: AtomicU64::new(start.seq),
                ..FeedStats::default()
            }),
        };
        let stop = CancellationToken::new();
        let task = FeedTask {
            view: view.clone(),
            source,
            routing: self.routing.subscribe(),
            state: self.state.clone(),
            tap: self.registry.tap.clone(),
            next_seq: start.seq + 1,
        };
        let task = tokio::spawn(Box::new(task).run(stop.clone()));
        self.registry.set_feed(view.clone());
        self.feeds
            .insert(feed.name.clone(), RunningFeed { view, stop, task });
        Ok(())
    }

    /// Stops a feed: stop reading, wait (up to the shutdown timeout) until the sinks stored
    /// what it sent, commit its checkpoint.
    async fn stop_feed(&mut self, name: &str) {
        let Some(feed) = self.feeds.remove(name) else {
            return;
        };
        feed.stop.cancel();
        let timeout = self.loaded.config.shutdown.timeout;
        if tokio::time::timeout(timeout, feed.task).await.is_err() {
            tracing::warn!(feed = %name, "feed task did not stop in time");
        }
        let tracker = feed.view.tracker.clone();
        let drained = tokio::time::timeout(timeout, async move {
            while tracker.pending() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .is_ok();
        if !drained {
            tracing::warn!(feed = %name, pending = feed.view.tracker.pending(), "sinks did not store everything this feed sent in time; the rest is fetched again");
        }
        feed.view.status.update(|s| {
            if s.state != ReadyState::Stopped {
                s.state = ReadyState::Closed;
            }
        });
        commit(std::slice::from_ref(&feed.view), &self.state).await;
        self.registry.remove_feed(name);
        log_feed_summary(&feed.view);
    }

    /// Applies a new, already validated configuration. Feeds whose config did not change keep
    /// their connection; changed feeds drain, commit and reconnect from their checkpoint;
    /// removed feeds drain and stop; new feeds start. Changed sinks are replaced once the old
    /// instance has stored what it holds. `[state]` cannot change without a restart.
    pub async fn reload(&mut self, new: LoadedConfig) -> anyhow::Result<ReloadSummary> {
        if new.config.state.path != self.loaded.config.state.path {
            anyhow::bail!(
                "{}: key `state.path` cannot change while running (restart sse-bridge to move the state database)",
                new.source
            );
        }
        let mut summary = ReloadSummary::default();

        // Sinks: keep unchanged ones, start replacements (which wait for the old instance).
        let mut sinks = BTreeMap::new();
        let mut old_sinks = std::mem::take(&mut self.sinks);
        for (name, config) in &new.config.sink {
            match old_sinks.remove(name) {
                Some(old) if &old.config == config => {
                    sinks.insert(name.clone(), old);
                }
                previous => {
                    let after = previous.map(|p| {
                        summary.sinks_replaced.push(name.clone());
                        p.worker
                    });
                    match start_sink(
                        name,
                        config,
                        &self.loaded.config.state.path,
                        &self.give_up,
                        after,
                    ) {
                        Ok(s) => {
                            sinks.insert(name.clone(), s);
                        }
                        Err(e) => {
                            // Building failed after validation (e.g. a directory cannot be
                            // created): keep everything as it was is no longer possible for
                            // this sink, so report and carry on without it.
                            tracing::error!(sink = %name, "cannot start sink after reload: {e:#}");
                        }
                    }
                }
            }
        }
        // Removed sinks: their handles go away with the old routing; they drain and close.
        drop(old_sinks);
        let routing = build_routing(&new, &sinks)?;
        self.sinks = sinks;
        self.routing.send_replace(Arc::new(routing));
        self.publish_sinks();

        // Feeds.
        let new_feeds: BTreeMap<String, FeedConfig> = new
            .config
            .enabled_feeds()
            .map(|f| (f.name.clone(), f.clone()))
            .collect();
        let old_names: Vec<String> = self.feeds.keys().cloned().collect();
        for name in old_names {
            match new_feeds.get(&name) {
                Some(cfg)
                    if self
                        .feeds
                        .get(&name)
                        .is_some_and(|f| *f.view.config == *cfg) =>
                {
                    summary.feeds_kept.push(name);
                }
                Some(_) => {
                    self.stop_feed(&name).await;
                    summary.feeds_restarted.push(name);
                }
                None => {
                    self.stop_feed(&name).await;
                    summary.feeds_removed.push(name);
                }
            }
        }
        self.loaded = new;
        for (name, cfg) in new_feeds {
            if !self.feeds.contains_key(&name) {
                if !summary.feeds_restarted.contains(&name) {
                    summary.feeds_added.push(name.clone());
                }
                if let Err(e) = self.start_feed(cfg).await {
                    tracing::error!(feed = %name, "cannot start feed after reload: {e:#}");
                }
            }
        }
        tracing::info!(
            kept = ?summary.feeds_kept,
            restarted = ?summary.feeds_restarted,
            removed = ?summary.feeds_removed,
            added = ?summary.feeds_added,
            sinks_replaced = ?summary.sinks_replaced,
            "configuration reloaded"
        );
        Ok(summary)
    }

    /// Drain and stop: stop reading, let the sinks store what they hold, commit, within the
    /// configured deadline. Returns whether everything drained in time.
    pub async fn shutdown(mut self) -> bool {
        let deadline = tokio::time::Instant::now() + self.loaded.config.shutdown.timeout;
        tracing::info!(timeout = ?self.loaded.config.shutdown.timeout, "shutting down: draining feeds and sinks");
        let feeds = std::mem::take(&mut self.feeds);
        for feed in feeds.values() {
            feed.stop.cancel();
        }
        let mut views = Vec::new();
        for (name, feed) in feeds {
            if tokio::time::timeout_at(deadline, feed.task).await.is_err() {
                tracing::warn!(feed = %name, "feed task did not stop before the shutdown deadline");
            }
            feed.view.status.update(|s| {
                if s.state != ReadyState::Stopped {
                    s.state = ReadyState::Closed;
                }
            });
            views.push(feed.view);
        }
        // Let go of every sink handle so the runners drain and end.
        self.routing.send_replace(Arc::new(Routing {
            router: Router::empty(),
            sinks: Vec::new(),
        }));
        let mut drained = true;
        for (name, sink) in std::mem::take(&mut self.sinks) {
            drop(sink.handle);
            if tokio::time::timeout_at(deadline, sink.worker.finished())
                .await
                .is_err()
            {
                drained = false;
                tracing::warn!(sink = %name, "sink did not drain before the shutdown deadline");
            }
        }
        self.give_up.cancel();
        self.stop_committer.cancel();
        if let Some(c) = self.committer.take() {
            let _ = c.await;
        }
        commit(&views, &self.state).await;
        for view in &views {
            log_feed_summary(view);
        }
        if drained {
            tracing::info!("shutdown complete");
        } else {
            tracing::warn!("shutdown deadline reached; unstored events stay behind the checkpoint and will be fetched again");
        }
        drained
    }
}

fn log_feed_summary(view: &FeedView) {
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

fn start_sink(
    name: &str,
    config: &SinkConfig,
    state_path: &std::path::Path,
    give_up: &CancellationToken,
    after: Option<SinkWorker>,
) -> anyhow::Result<RunningSink> {
    let sink = config
        .build_with_state(name, Some(state_path))
        .with_context(|| format!("starting sink `{name}`"))?;
    let (handle, worker) = runner::spawn(name, sink, config.buffer(), give_up.clone(), after)
        .with_context(|| format!("starting the thread of sink `{name}`"))?;
    Ok(RunningSink {
        config: config.clone(),
        handle,
        worker,
    })
}

fn build_routing(
    loaded: &LoadedConfig,
    sinks: &BTreeMap<String, RunningSink>,
) -> anyhow::Result<Routing> {
    let configs: Vec<(String, SinkConfig)> = sinks
        .iter()
        .map(|(n, s)| (n.clone(), s.config.clone()))
        .collect();
    let router = Router::new(&loaded.config.route, &loaded.config.routing, &configs)
        .map_err(|e| anyhow::anyhow!("{}: {e}", loaded.source))?;
    Ok(Routing {
        router,
        sinks: sinks.values().map(|s| s.handle.clone()).collect(),
    })
}

/// Runs the bridge until `shutdown` is cancelled, reloading the configuration whenever
/// `reload` yields, then drains within the configured deadline.
pub async fn run(
    loaded: LoadedConfig,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    mut reload: mpsc::Receiver<()>,
    notifier: Arc<Notifier>,
) -> anyhow::Result<()> {
    // Bound before the feeds start: a port in use fails the start instead of going unnoticed.
    let admin = match &loaded.config.admin {
        Some(config) => Some(crate::admin::AdminServer::start(config, registry.clone()).await?),
        None => None,
    };
    let mut supervisor = Supervisor::start(loaded, registry.clone()).await?;
    notifier.ready();
    if let Some(admin) = &admin {
        admin.set_running(true);
    }
    let watchdog = crate::notify::watchdog_interval().map(|every| {
        let notifier = notifier.clone();
        // Runs on the same runtime as the feeds: if the runtime is wedged, the petting stops
        // and systemd restarts the service.
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            loop {
                ticker.tick().await;
                notifier.watchdog();
            }
        })
    });
    let status = tokio::spawn(status_loop(registry.clone(), notifier.clone()));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(()) = reload.recv() => {
                notifier.reloading();
                match supervisor.loaded().reload() {
                    Ok(new) => {
                        if new.config.admin != supervisor.config().admin {
                            tracing::warn!("`[admin]` changed: the admin endpoint keeps its settings until the bridge restarts");
                        }
                        if let Err(e) = supervisor.reload(new).await {
                            tracing::error!("reload rejected, the running configuration stays: {e:#}");
                        }
                    }
                    Err(e) => {
                        tracing::error!("reload rejected, the running configuration stays: invalid configuration: {e}");
                    }
                }
                // SIGHUP is also logrotate's signal: sinks close and reopen their files,
                // whether or not the configuration changed.
                supervisor.reopen_sinks();
                notifier.ready();
            }
        }
    }
    notifier.stopping();
    if let Some(admin) = &admin {
        admin.set_running(false);
    }
    status.abort();
    supervisor.shutdown().await;
    if let Some(admin) = admin {
        admin.stop().await;
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    Ok(())
}

/// Tells systemd how the bridge is doing, every few seconds: feeds open and events/s.
async fn status_loop(registry: Arc<Registry>, notifier: Arc<Notifier>) {
    if !notifier.enabled() {
        return;
    }
    const EVERY: Duration = Duration::from_secs(5);
    let mut last_total = 0u64;
    let mut ticker = tokio::time::interval(EVERY);
    loop {
        ticker.tick().await;
        let feeds = registry.feeds();
        let open = feeds
            .iter()
            .filter(|f| f.status.state() == ReadyState::Open)
            .count();
        let total: u64 = feeds
            .iter()
            .map(|f| f.stats.received.load(Ordering::Relaxed))
            .sum();
        let rate = total.saturating_sub(last_total) as f64 / EVERY.as_secs_f64();
        last_total = total;
        notifier.status(&format!(
            "{open}/{} feeds open, {rate:.0} events/s, {total} events",
            feeds.len()
        ));
    }
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
        let gap = |reason, detail: String, id: &str, seq| {
            Gap::once(&name, &url, reason, detail, id, seq, Utc::now())
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
                        format!(
                            "the feed's URL changed to {}; starting without a Last-Event-ID",
                            url::Url::parse(&url)
                                .map(|u| crate::sse::connection::display_url(&u))
                                .unwrap_or_else(|_| "a new URL".to_string())
                        ),
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
    routing: watch::Receiver<Arc<Routing>>,
    state: SharedState,
    tap: broadcast::Sender<Arc<Event>>,
    next_seq: u64,
}

impl FeedTask {
    /// The feed's loop. `self` is boxed: a future keeps its by-value arguments twice (as
    /// captured and as the bound local), and a `FeedTask` is about 1 KiB; with a box each copy
    /// is a pointer (1 KiB less per feed, 10 MiB for 10 000 idle feeds).
    async fn run(mut self: Box<Self>, stop: CancellationToken) {
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
        let mut types = crate::admin::stats::TypeCache::default();
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
                Next::Gap { reason, detail } => {
                    self.record_gap(reason.into(), detail).await;
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

    async fn record_gap(&self, reason: GapReason, detail: String) {
        let p = self.view.tracker.acked();
        let name = &self.view.config.name;
        let gap = Gap::once(
            name,
            &self.view.config.url,
            reason,
            detail,
            self.source.last_event_id(),
            p.seq.max(self.next_seq.saturating_sub(1)),
            Utc::now(),
        );
        let state = self.state.clone();
        let result = tokio::task::spawn_blocking(move || match state.lock() {
            Ok(mut s) => s
                .record_gap(&gap)
                .map(|r| (r, gap))
                .map_err(|e| e.to_string()),
            Err(_) => Err("state store lock poisoned".to_string()),
        })
        .await;
        match result {
            // A repeat of the previous gap is counted in its row; logging each one again
            // would turn a server that closes at once into a flood of identical lines.
            Ok(Ok((Recorded::New, gap))) => {
                tracing::warn!(feed = %name, reason = reason.as_str(), "gap: {}", gap.detail)
            }
            Ok(Ok((Recorded::Repeat(n), gap))) => {
                let level_warn = n.is_power_of_two();
                if level_warn {
                    tracing::warn!(feed = %name, reason = reason.as_str(), repeats = n, "gap repeated {n} times: {}", gap.detail)
                } else {
                    tracing::debug!(feed = %name, reason = reason.as_str(), repeats = n, "gap repeated: {}", gap.detail)
                }
            }
            Ok(Err(e)) => tracing::error!(feed = %name, "recording a gap failed: {e}"),
            Err(e) => tracing::error!(feed = %name, "recording a gap failed: {e}"),
        }
    }
}

/// A run of consecutive events of one type within a read, with the router's decision for
/// them: the router and the counters are consulted once per run rather than once per event
/// (streams mostly repeat a type; per-event lookups were a visible share of the feed task).
struct TypeRun {
    event_type: Arc<str>,
    decision: Decision,
    events: u64,
    bytes: u64,
}

impl TypeRun {
    fn is(&self, event_type: &Arc<str>) -> bool {
        Arc::ptr_eq(&self.event_type, event_type) || *self.event_type == **event_type
    }

    /// Adds the run to the feed's counters and to its type's; unrouted and misfit events are
    /// also reported through `warn`.
    fn count(
        self,
        feed: &str,
        stats: &FeedStats,
        types: &mut crate::admin::stats::TypeCache,
        warn: &mut UnroutableWarning,
    ) {
        let n = self.events;
        stats.received.fetch_add(n, Ordering::Relaxed);
        stats.data_bytes.fetch_add(self.bytes, Ordering::Relaxed);
        match self.decision.outcome {
            Outcome::Routed => {}
            Outcome::Misfit => {
                stats.misfit.fetch_add(n, Ordering::Relaxed);
                warn.note(feed, &self.event_type, n, self.decision.outcome);
            }
            Outcome::Dropped => {
                stats.dropped.fetch_add(n, Ordering::Relaxed);
            }
            Outcome::Unrouted => {
                stats.unrouted.fetch_add(n, Ordering::Relaxed);
                warn.note(feed, &self.event_type, n, self.decision.outcome);
            }
        }
        let routed = !self.decision.sinks.is_empty();
        if routed {
            stats.routed.fetch_add(n, Ordering::Relaxed);
        }
        types.get(&stats.types, &self.event_type).record_many(
            n,
            self.bytes,
            self.decision.outcome,
            routed,
        );
    }
}

/// How often a feed may log that events could not go where their route said.
const UNROUTABLE_WARN_EVERY: Duration = Duration::from_secs(10);

/// Logs unrouted events (stored nowhere) and misfits (sent to the default route because a
/// routed sink cannot name a file or topic after their type) at WARN, naming the feed and the
/// type, at most once per [`UNROUTABLE_WARN_EVERY`] per feed: the types come from the server,
/// which could otherwise fill the log. The counters (`/metrics`) count every event.
#[derive(Default)]
struct UnroutableWarning {
    last: Option<std::time::Instant>,
    /// Events not reported since the last line.
    unreported: u64,
}

impl UnroutableWarning {
    fn note(&mut self, feed: &str, event_type: &str, events: u64, outcome: Outcome) {
        self.unreported += events;
        if self
            .last
            .is_some_and(|t| t.elapsed() < UNROUTABLE_WARN_EVERY)
        {
            return;
        }
        // Debug formatting quotes the type and escapes control characters (ARCHITECTURE.md:
        // nothing from the stream reaches a terminal raw).
        let shown = event_type;
        let total = std::mem::take(&mut self.unreported);
        self.last = Some(std::time::Instant::now());
        match outcome {
            Outcome::Unrouted => tracing::warn!(
                feed = %feed, event_type = ?shown, events = total,
                "events of type {shown:?} match no route and there is no default route that can take them: counted as unrouted and not stored (this line repeats at most every {}s)",
                UNROUTABLE_WARN_EVERY.as_secs()
            ),
            _ => tracing::warn!(
                feed = %feed, event_type = ?shown, events = total,
                "events of type {shown:?} cannot be stored by the sinks of their route (the type cannot form a file or topic name there): sent to the default route and counted as misfits (this line repeats at most every {}s)",
                UNROUTABLE_WARN_EVERY.as_secs()
            ),
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

async fn commit_loop(
    registry: Arc<Registry>,
    state: SharedState,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => commit(&registry.feeds(), &state).await,
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
    } else {
        for (i, c) in changed {
            views[i].stats.committed_seq.store(c.seq, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_see_at_most_tap_max_data_of_an_event() {
        let event = |data: String| {
            Arc::new(Event {
                feed: Arc::from("f"),
                event_type: Arc::from("t"),
                data,
                id: Arc::from("7"),
                received_at: Utc::now(),
                seq: 7,
            })
        };
        let small = event("x".repeat(TAP_MAX_DATA));
        assert!(Arc::ptr_eq(&for_tap(&small), &small), "shared, not copied");
        // A multi-byte character across the cut is not split.
        let big = event(format!(
            "{}é{}",
            "x".repeat(TAP_MAX_DATA - 1),
            "y".repeat(100_000)
        ));
        let shown = for_tap(&big);
        assert!(shown.data.starts_with(&"x".repeat(TAP_MAX_DATA - 1)));
        assert!(shown.data.len() < TAP_MAX_DATA + 64, "{}", shown.data.len());
        assert!(
            shown.data.ends_with("…[tap: 100002 more bytes not shown]"),
            "{}",
            &shown.data[TAP_MAX_DATA - 8..]
        );
        assert_eq!((shown.seq, &*shown.id), (7, "7"));
    }
}
