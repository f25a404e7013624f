//! The supervisor: the lifecycle of the bridge. It starts one [`pipeline`](crate::pipeline)
//! task per feed, one runner thread per sink and the checkpoint
//! [`committer`](crate::checkpoint::committer); reloads (SIGHUP); drains on shutdown; and keeps
//! the [`Registry`] observers read.
//!
//! Data flows one way: feed task (socket -> parser -> event) -> router -> sink buffers ->
//! runner threads -> acknowledgements -> [`FeedTracker`] -> committer -> state store.
//! One feed's failure never touches another: each feed owns its connection, parser, router
//! cache and tracker; they share only the sinks' bounded buffers.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use chrono::Utc;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{commit, commit_loop, FeedTracker, Position, SharedState};
use crate::cluster::fence::Fence;
use crate::cluster::{Command, Fleet, StopReason};
use crate::config::{Config, FeedConfig, LoadedConfig};
use crate::event::Event;
use crate::notify::Notifier;
use crate::pipeline::tap::TAP_CAPACITY;
use crate::pipeline::{FeedTask, Routing};
use crate::route::Router;
use crate::sink::runner::{self, SinkGauge, SinkHandle, SinkWorker};
use crate::sink::SinkConfig;
use crate::sse::client::EventSource;
use crate::sse::status::{ReadyState, StatusHandle};
use crate::state::{Gap, GapReason, StateStore};

// Moved to the pipeline and telemetry modules; kept here for code that names them this way.
pub use crate::pipeline::FeedView;
pub use crate::telemetry::FeedStats;

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
    fleet: RwLock<Option<Arc<crate::cluster::FleetStats>>>,
    sinks: RwLock<BTreeMap<String, SinkView>>,
    tap: broadcast::Sender<Arc<Event>>,
    serve: RwLock<Option<Arc<crate::serve::ServeStats>>>,
    pub started_at: SystemTime,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            feeds: RwLock::new(BTreeMap::new()),
            fleet: RwLock::default(),
            sinks: RwLock::new(BTreeMap::new()),
            tap: broadcast::channel(TAP_CAPACITY).0,
            serve: RwLock::default(),
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

    /// The fleet this instance belongs to (`[cluster]`): its leases and counters.
    pub fn fleet(&self) -> Option<Arc<crate::cluster::FleetStats>> {
        self.fleet.read().ok().and_then(|f| f.clone())
    }

    fn set_fleet(&self, stats: Option<Arc<crate::cluster::FleetStats>>) {
        if let Ok(mut f) = self.fleet.write() {
            *f = stats;
        }
    }

    /// The counters of `[serve]`, when it runs.
    pub fn serve_stats(&self) -> Option<Arc<crate::serve::ServeStats>> {
        self.serve.read().ok().and_then(|s| s.clone())
    }

    fn set_serve_stats(&self, stats: Option<Arc<crate::serve::ServeStats>>) {
        if let Ok(mut s) = self.serve.write() {
            *s = stats;
        }
    }

    fn set_sinks(&self, sinks: BTreeMap<String, SinkView>) {
        if let Ok(mut m) = self.sinks.write() {
            *m = sinks;
        }
    }
}

struct RunningSink {
    config: SinkConfig,
    handle: SinkHandle,
    worker: SinkWorker,
    /// What the sink's own storage said each feed holds when it started, where that may be
    /// behind the checkpoint ([`crate::sink::Sink::cursor`]).
    cursors: BTreeMap<String, crate::sink::Cursor>,
}

struct RunningFeed {
    view: FeedView,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// In a fleet: the epoch of the lease the feed runs under.
    epoch: Option<i64>,
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
    /// With `[cluster]`: the leases decide which feeds run here (ARCHITECTURE.md §9).
    fleet: Option<Fleet>,
    /// Feeds stopping here (a lost lease or a hand-over), drained by tasks of their own.
    stopping: Vec<JoinHandle<()>>,
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
        let (state, fleet) = match &loaded.config.cluster {
            Some(cluster) => {
                let fleet = Fleet::start(cluster, enabled_feed_names(&loaded.config))
                    .await
                    .with_context(|| format!("{}: [cluster]", loaded.source))?;
                (SharedState::Fleet(fleet.store.clone()), Some(fleet))
            }
            None => {
                let state_path = loaded.config.state.path.clone();
                let store = tokio::task::spawn_blocking(move || StateStore::open(&state_path))
                    .await
                    .context("opening the state database")??;
                (SharedState::local(store), None)
            }
        };
        registry.set_fleet(fleet.as_ref().map(|f| f.stats.clone()));
        let give_up = CancellationToken::new();
        let started = (|| {
            let mut sinks = BTreeMap::new();
            for (name, config) in &loaded.config.sink {
                sinks.insert(
                    name.clone(),
                    start_sink(
                        name,
                        config,
                        state_path_for_sinks(&loaded.config),
                        fleet.as_ref().map(|f| &f.fence),
                        &give_up,
                        None,
                        &feed_names(&loaded.config),
                    )?,
                );
            }
            let routing = build_routing(&loaded, &sinks)?;
            anyhow::Ok((sinks, routing))
        })();
        let (sinks, routing) = match started {
            Ok(started) => started,
            Err(e) => {
                // Joined already: leave, so that the others do not wait for this instance's
                // share or its leases.
                if let Some(fleet) = fleet {
                    fleet.leave().await;
                }
                return Err(e);
            }
        };
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
            fleet,
            stopping: Vec::new(),
        };
        supervisor.publish_sinks();
        // In a fleet, feeds start when their lease is claimed.
        if supervisor.fleet.is_none() {
            let feeds: Vec<FeedConfig> =
                supervisor.loaded.config.enabled_feeds().cloned().collect();
            for feed in feeds {
                supervisor.start_feed(feed, None).await?;
            }
        }
        let registry = supervisor.registry.clone();
        supervisor.committer = Some(tokio::spawn(commit_loop(
            move || registry.feeds(),
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

    /// Starts `feed` (in a fleet, under the lease `epoch`).
    async fn start_feed(&mut self, feed: FeedConfig, epoch: Option<i64>) -> anyhow::Result<()> {
        let feed = Arc::new(feed);
        // The lowest of the sinks' own cursors: where the stored data of some sink ends, when
        // that is behind the checkpoint (a file that lost an unsynced tail).
        // Asked when the sinks started, so used for the feed's first start only (taken out):
        // a feed restarted later by a reload resumes from its checkpoint.
        // In a fleet the sinks' own cursors are not used: a file or SQLite sink is this
        // machine's, and what it held when this instance started says nothing of where the
        // fleet's checkpoint is now (ARCHITECTURE.md §9).
        let lowest = self
            .sinks
            .iter_mut()
            .filter_map(|(sink, s)| Some((sink.clone(), s.cursors.remove(&feed.name)?)))
            .min_by_key(|(_, c)| c.seq)
            .filter(|_| self.fleet.is_none());
        let start = start_position(&self.state, &feed, lowest).await?;
        let tracker =
            Arc::new(FeedTracker::for_feed(&feed.name, &feed.url, start.clone()).with_epoch(epoch));
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
            stats: Arc::new(FeedStats::starting_at(start.seq)),
        };
        let stop = CancellationToken::new();
        let task = FeedTask::new(
            view.clone(),
            source,
            self.routing.subscribe(),
            self.state.clone(),
            self.registry.tap.clone(),
            start.seq,
        );
        let task = tokio::spawn(Box::new(task).run(stop.clone()));
        if let (Some(fleet), Some(epoch)) = (&self.fleet, epoch) {
            fleet.fence.register_run(&feed.name, epoch, stop.clone());
        }
        self.registry.set_feed(view.clone());
        self.feeds.insert(
            feed.name.clone(),
            RunningFeed {
                view,
                stop,
                task,
                epoch,
            },
        );
        Ok(())
    }

    /// The coordinator's requests, when this instance is part of a fleet (taken once).
    pub fn take_fleet_commands(&mut self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Command>> {
        self.fleet.as_mut().and_then(Fleet::take_commands)
    }

    /// Does what the fleet's coordinator asks: start a feed whose lease was claimed, stop one
    /// whose lease was lost (at once) or is handed over (drained and committed first, in a
    /// task of its own so that the supervisor goes on).
    pub async fn on_fleet_command(&mut self, command: Command) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        match command {
            Command::Start { feed: name, epoch } => {
                if self.feeds.contains_key(&name) {
                    return;
                }
                let config = self
                    .loaded
                    .config
                    .enabled_feeds()
                    .find(|f| f.name == name)
                    .cloned();
                let Some(config) = config else {
                    fleet.stopped(&name, epoch, false);
                    return;
                };
                // Lost already (its Stop is queued behind this): not started at all.
                if fleet.fence.epoch(&name) != Some(epoch) {
                    return;
                }
                match self.start_feed(config, Some(epoch)).await {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::error!(feed = %name, "cannot start the feed; its lease is released: {e:#}");
                        if let Some(fleet) = &self.fleet {
                            fleet.stopped(&name, epoch, true);
                        }
                    }
                }
            }
            Command::Stop {
                feed: name,
                epoch,
                why,
            } => {
                let running = self
                    .feeds
                    .get(&name)
                    .is_some_and(|f| f.epoch == Some(epoch));
                let Some(feed) = running.then(|| self.feeds.remove(&name)).flatten() else {
                    fleet.stopped(&name, epoch, false);
                    return;
                };
                self.registry.remove_feed(&name);
                feed.stop.cancel();
                let state = self.state.clone();
                let timeout = self.loaded.config.shutdown.timeout;
                let fleet_stopped = fleet.stopped_sender();
                self.stopping.retain(|t| !t.is_finished());
                self.stopping.push(tokio::spawn(async move {
                    // Lost or not, what the sinks still hold of this run is written (or, for
                    // a fenced sink, refused) before the feed may run here again.
                    let drained = wait_stopped(&name, feed.task, &feed.view, timeout).await;
                    if why == StopReason::HandOver {
                        if !drained {
                            tracing::warn!(feed = %name, pending = feed.view.tracker.pending(), "sinks did not store everything this feed sent in time; the next holder fetches the rest again");
                        }
                        // Written whether or not the committer took the change already: its
                        // transaction may come after the release, and be refused.
                        feed.view.tracker.mark_changed();
                        if let Err(e) = commit(std::slice::from_ref(&feed.view), &state).await {
                            tracing::error!(feed = %name, "committing the checkpoint of a handed-over feed failed: {e}");
                        }
                    }
                    feed.view.status.update(|s| s.state = ReadyState::Closed);
                    log_feed_summary(&feed.view);
                    let _ = fleet_stopped.send(crate::cluster::Stopped {
                        feed: name,
                        epoch,
                        failed: false,
                    });
                }));
            }
        }
    }

    /// Stops a feed: stop reading, wait (up to the shutdown timeout) until the sinks stored
    /// what it sent, commit its checkpoint.
    async fn stop_feed(&mut self, name: &str) {
        let Some(feed) = self.feeds.remove(name) else {
            return;
        };
        feed.stop.cancel();
        let timeout = self.loaded.config.shutdown.timeout;
        let drained = wait_stopped(name, feed.task, &feed.view, timeout).await;
        if !drained {
            tracing::warn!(feed = %name, pending = feed.view.tracker.pending(), "sinks did not store everything this feed sent in time; the rest is fetched again");
        }
        feed.view.status.update(|s| {
            if s.state != ReadyState::Stopped {
                s.state = ReadyState::Closed;
            }
        });
        if let Err(e) = commit(std::slice::from_ref(&feed.view), &self.state).await {
            tracing::error!(feed = %name, "committing the checkpoint of a stopped feed failed: {e}");
        }
        self.registry.remove_feed(name);
        log_feed_summary(&feed.view);
    }

    /// Applies a new, already validated configuration. Feeds whose config did not change keep
    /// their connection; changed feeds drain, commit and reconnect from their checkpoint;
    /// removed feeds drain and stop; new feeds start. Changed sinks are replaced once the old
    /// instance has stored what it holds. `[state]` cannot change without a restart.
    pub async fn reload(&mut self, new: LoadedConfig) -> anyhow::Result<ReloadSummary> {
        if new.config.cluster != self.loaded.config.cluster {
            anyhow::bail!(
                "{}: `[cluster]` cannot change while running (restart sse-bridge to join, leave or move a fleet)",
                new.source
            );
        }
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
                        state_path_for_sinks(&self.loaded.config),
                        self.fleet.as_ref().map(|f| &f.fence),
                        &self.give_up,
                        after,
                        &feed_names(&new.config),
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
        let mut restarted_epochs: BTreeMap<String, i64> = BTreeMap::new();
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
                    // In a fleet it restarts under the lease it holds.
                    if let Some(epoch) = self.feeds.get(&name).and_then(|f| f.epoch) {
                        restarted_epochs.insert(name.clone(), epoch);
                    }
                    self.stop_feed(&name).await;
                    summary.feeds_restarted.push(name);
                }
                None => {
                    let epoch = self.feeds.get(&name).and_then(|f| f.epoch);
                    self.stop_feed(&name).await;
                    if let (Some(fleet), Some(epoch)) = (&self.fleet, epoch) {
                        // Its lease is released (the feed is no longer configured).
                        fleet.stopped(&name, epoch, false);
                    }
                    summary.feeds_removed.push(name);
                }
            }
        }
        self.loaded = new;
        if let Some(fleet) = &self.fleet {
            fleet.set_feeds(enabled_feed_names(&self.loaded.config));
        }
        for (name, cfg) in new_feeds {
            // In a fleet, a feed starts here only under a lease this instance holds: a
            // restarted one (its lease is still held), or one claimed later.
            if self.fleet.is_some() && !summary.feeds_restarted.contains(&name) {
                if !self.feeds.contains_key(&name) {
                    summary.feeds_added.push(name);
                }
                continue;
            }
            if !self.feeds.contains_key(&name) {
                if !summary.feeds_restarted.contains(&name) {
                    summary.feeds_added.push(name.clone());
                }
                match self
                    .start_feed(cfg, restarted_epochs.get(&name).copied())
                    .await
                {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::error!(feed = %name, "cannot start feed after reload: {e:#}");
                        if let (Some(fleet), Some(epoch)) =
                            (&self.fleet, restarted_epochs.get(&name))
                        {
                            fleet.stopped(&name, *epoch, true);
                        }
                    }
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
        if let Some(fleet) = &self.fleet {
            fleet.stop_claiming();
        }
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
        for task in std::mem::take(&mut self.stopping) {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
        if let Err(e) = commit(&views, &self.state).await {
            tracing::error!("committing checkpoints at shutdown failed: {e}");
        }
        // After the last commit: the leases go, and the other instances take the feeds over.
        if let Some(fleet) = self.fleet.take() {
            fleet.leave().await;
        }
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

/// Waits (each step up to `timeout`) for a cancelled feed's task to end, then for the sinks to
/// store (or refuse) what it sent; whether they did.
async fn wait_stopped(
    name: &str,
    task: JoinHandle<()>,
    view: &FeedView,
    timeout: Duration,
) -> bool {
    if tokio::time::timeout(timeout, task).await.is_err() {
        tracing::warn!(feed = %name, "feed task did not stop in time");
    }
    let tracker = view.tracker.clone();
    tokio::time::timeout(timeout, async move {
        while tracker.pending() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .is_ok()
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

/// The state database sinks may share (an SQLite sink that writes into it commits the
/// checkpoints with its events): none in a fleet, whose checkpoints are in PostgreSQL.
fn state_path_for_sinks(config: &Config) -> Option<&std::path::Path> {
    match config.cluster {
        Some(_) => None,
        None => Some(&config.state.path),
    }
}

/// The names of the enabled feeds: what a fleet holds leases for.
fn enabled_feed_names(config: &Config) -> Vec<String> {
    config.enabled_feeds().map(|f| f.name.clone()).collect()
}

fn start_sink(
    name: &str,
    config: &SinkConfig,
    state_path: Option<&std::path::Path>,
    fence: Option<&Arc<Fence>>,
    give_up: &CancellationToken,
    after: Option<SinkWorker>,
    feeds: &[String],
) -> anyhow::Result<RunningSink> {
    let mut sink = config
        .build_for_bridge(name, state_path, fence.cloned())
        .with_context(|| format!("starting sink `{name}`"))?;
    // Asked before the sink writes anything: what its own storage holds of each feed.
    let mut cursors = BTreeMap::new();
    for feed in feeds {
        match sink.cursor(feed) {
            Ok(Some(cursor)) => {
                cursors.insert(feed.clone(), cursor);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(sink = %name, feed = %feed, "cannot read where the sink's own data ends; the feed resumes from its checkpoint: {e}")
            }
        }
    }
    let (handle, worker) = runner::spawn(name, sink, config.buffer(), give_up.clone(), after)
        .with_context(|| format!("starting the thread of sink `{name}`"))?;
    Ok(RunningSink {
        config: config.clone(),
        handle,
        worker,
        cursors,
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
    // After the sinks started: the served database exists and has its schema.
    let serve = match start_serve(supervisor.config()).await {
        Ok(serve) => serve,
        Err(e) => {
            supervisor.shutdown().await;
            return Err(e);
        }
    };
    registry.set_serve_stats(serve.as_ref().map(|s| s.stats.clone()));
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
    let mut fleet_commands = supervisor.take_fleet_commands();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(command) = async {
                match fleet_commands.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => supervisor.on_fleet_command(command).await,
            Some(()) = reload.recv() => {
                notifier.reloading();
                match supervisor.loaded().reload() {
                    Ok(new) => {
                        if new.config.admin != supervisor.config().admin {
                            tracing::warn!("`[admin]` changed: the admin endpoint keeps its settings until the bridge restarts");
                        }
                        if new.config.serve != supervisor.config().serve {
                            tracing::warn!("`[serve]` changed: serve keeps its settings until the bridge restarts (the token file is read again now)");
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
                if let Some(serve) = &serve {
                    serve.reload(feed_names(supervisor.config()));
                }
                notifier.ready();
            }
        }
    }
    notifier.stopping();
    if let Some(admin) = &admin {
        admin.set_running(false);
    }
    status.abort();
    // Clients are closed while the bridge drains (they resume with their Last-Event-ID from
    // whatever serves next); closing them never delays the drain's own deadline.
    let stop_serve = async {
        if let Some(serve) = serve {
            if let Err(e) = serve.stop().await {
                tracing::error!("serve: {e:#}");
            }
        }
    };
    tokio::join!(stop_serve, supervisor.shutdown());
    if let Some(admin) = admin {
        admin.stop().await;
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    Ok(())
}

/// The names of the configured feeds (what `serve` answers for before they store events).
fn feed_names(config: &crate::config::Config) -> Vec<String> {
    config.feed.iter().map(|f| f.name.clone()).collect()
}

/// Starts `[serve]`, if configured, on the database of its `sqlite` sink.
async fn start_serve(
    config: &crate::config::Config,
) -> anyhow::Result<Option<crate::serve::ServeHandle>> {
    let Some(serve) = &config.serve else {
        return Ok(None);
    };
    let source = config.sink.iter().find_map(|(name, sink)| {
        if serve.sink.as_ref().is_some_and(|n| n != name) {
            return None;
        }
        match sink {
            SinkConfig::Sqlite(s) => Some(Ok(crate::serve::EventSource::Sqlite(s.path.clone()))),
            SinkConfig::Postgres(p) => Some(
                p.connection()
                    .map(|connection| crate::serve::EventSource::Postgres {
                        connection: Box::new(connection),
                        table: p.table.clone(),
                    })
                    .map_err(|e| anyhow::anyhow!("serve: sink `{name}`: {e}")),
            ),
            _ => None,
        }
    });
    let Some(source) = source else {
        anyhow::bail!("serve: `serve.sink`: no sqlite or postgres sink to serve");
    };
    let source = source?;
    // What the feeds and sinks need: two sockets a feed, and the state database, sinks and
    // admin endpoint besides.
    let reserve = 2 * config.feed.len() as u64 + crate::open_files::BRIDGE_RESERVE;
    let handle = crate::serve::start(source, serve, feed_names(config), reserve, false).await?;
    Ok(Some(handle))
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
/// Where a feed resumes: its checkpoint, or the lowest sink cursor when that is behind it
/// (ARCHITECTURE.md §4). Records the gaps a restart implies.
async fn start_position(
    state: &SharedState,
    feed: &FeedConfig,
    lowest_cursor: Option<(String, crate::sink::Cursor)>,
) -> anyhow::Result<Position> {
    let name = feed.name.clone();
    let url = feed.url.clone();
    let (checkpoint, other_url) = state.checkpoint(&name, &url).await?;
    let gap = |reason, detail: String, id: &str, seq| {
        Gap::once(&name, &url, reason, detail, id, seq, Utc::now())
    };
    match checkpoint {
        Some(cp) => {
            if cp.last_event_id.is_empty() && cp.seq > 0 {
                state
                    .record_gap(gap(
                        GapReason::RestartWithoutId,
                        "restarted without a Last-Event-ID: the stream carries no ids, so events sent while the bridge was down are lost".into(),
                        "",
                        cp.seq,
                    ))
                    .await?;
            }
            match lowest_cursor {
                Some((sink, cursor)) if cursor.seq < cp.seq => {
                    tracing::warn!(
                        feed = %name,
                        sink = %sink,
                        checkpoint_seq = cp.seq,
                        stored_seq = cursor.seq,
                        "the sink's data ends before the checkpoint (an unsynced tail was lost): resuming from what it holds"
                    );
                    Ok(Position {
                        seq: cursor.seq,
                        last_event_id: cursor.id.clone(),
                    })
                }
                _ => Ok(Position {
                    seq: cp.seq,
                    last_event_id: Arc::from(cp.last_event_id.as_str()),
                }),
            }
        }
        None => {
            if other_url {
                state
                    .record_gap(gap(
                        GapReason::UrlChanged,
                        format!(
                            "the feed's URL changed to {}; starting without a Last-Event-ID",
                            url::Url::parse(&url)
                                .map(|u| crate::sse::connection::display_url(&u))
                                .unwrap_or_else(|_| "a new URL".to_string())
                        ),
                        "",
                        0,
                    ))
                    .await?;
            }
            Ok(Position {
                seq: 0,
                last_event_id: Arc::from(""),
            })
        }
    }
}
