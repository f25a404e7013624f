//! Drives one sink on its own thread: receives batches from the feeds through a bounded
//! buffer, writes them, retries failures without dropping anything, and acknowledges stored
//! events to each feed's tracker.
//!
//! Sinks do blocking I/O (files, SQLite), so each runs on a dedicated OS thread with a small
//! current-thread runtime for its timers, and never stalls the network tasks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{BufferConfig, Sink, SinkCounters, WhenFull};
use crate::checkpoint::FeedTracker;
use crate::event::Event;
use crate::state::Checkpoint;
/// How often `Sink::tick` runs.
const TICK: Duration = Duration::from_secs(1);
/// Retry delays after a failed write: doubling from the first to the second.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A failing sink logs an error at most this often.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(30);

struct Envelope {
    /// The events, until the runner moves them into its batch (no reference count traffic).
    events: Vec<Arc<Event>>,
    /// How many events the envelope brought: its share of the batch, in order.
    len: usize,
    tracker: Arc<FeedTracker>,
    /// Released when the envelope is dropped, after the events were acknowledged.
    _permit: OwnedSemaphorePermit,
    /// The envelope's share of `buffer.max_bytes`, released with it.
    _bytes: OwnedSemaphorePermit,
}

/// What an event counts against `buffer.max_bytes`: its data, plus the event itself, its
/// reference count and the sink batch's pointer to it. The type and id strings are shared
/// between events (and the id is bounded by `max_id_size`), so they are not counted per event.
pub fn event_bytes(event: &Event) -> u64 {
    event.data.len() as u64 + EVENT_OVERHEAD
}

/// Bookkeeping counted per event besides its data (see [`event_bytes`]).
const EVENT_OVERHEAD: u64 = 128;

/// Live figures of a sink, readable from anywhere.
#[derive(Default)]
pub struct SinkHealth {
    /// False while writes are failing.
    pub healthy: AtomicBool,
    pub last_error: Mutex<Option<String>>,
    /// Events stored and acknowledged.
    pub written: AtomicU64,
    /// Events dropped by `when_full = "drop_newest"`.
    pub dropped: AtomicU64,
    /// Failed write attempts.
    pub errors: AtomicU64,
    /// How long `Sink::write` calls take, failed ones included.
    pub write_seconds: crate::admin::stats::Histogram,
    /// The counters particular to the sink's kind ([`Sink::counters`]).
    pub own: Option<Arc<dyn SinkCounters>>,
}

impl std::fmt::Debug for SinkHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkHealth")
            .field("healthy", &self.healthy)
            .field("written", &self.written)
            .field("dropped", &self.dropped)
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

impl SinkHealth {
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().map(|g| g.clone()).unwrap_or(None)
    }
}

/// The feeds' end of a sink: cheap to clone. When every handle is dropped the runner drains
/// its buffer, flushes the sink and ends.
#[derive(Clone)]
pub struct SinkHandle {
    pub name: Arc<str>,
    tx: mpsc::UnboundedSender<Envelope>,
    permits: Arc<Semaphore>,
    max_events: usize,
    /// `buffer.max_bytes`, one permit per byte.
    bytes: Arc<Semaphore>,
    max_bytes: u32,
    when_full: WhenFull,
    pub health: Arc<SinkHealth>,
    /// Asks the runner to call [`Sink::reopen`] between writes.
    reopen: Arc<Notify>,
}

/// What happened to a batch handed to [`SinkHandle::send`].
#[derive(Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// Queued; the runner acknowledges the events once stored.
    Queued,
    /// The buffer was full and the sink drops what does not fit (counted). The caller
    /// acknowledges the events on the sink's behalf.
    Dropped(usize),
    /// The runner has ended (shutdown); nothing was queued.
    Closed,
}

impl SinkHandle {
    /// Queues `events` (all from the feed `tracker` belongs to). Under `when_full = "block"`
    /// this waits for room, which is how a slow sink holds its feeds back.
    ///
    /// Both bounds of the buffer apply: `max_events` and `max_bytes` (a batch larger than the
    /// whole buffer takes all of it, so it goes through alone instead of waiting for ever).
    pub async fn send(&self, events: Vec<Arc<Event>>, tracker: &Arc<FeedTracker>) -> SendOutcome {
        let n = u32::try_from(events.len().clamp(1, self.max_events)).unwrap_or(u32::MAX);
        let size: u64 = events.iter().map(|e| event_bytes(e)).sum();
        let b = u32::try_from(size.clamp(1, u64::from(self.max_bytes))).unwrap_or(u32::MAX);
        let permits = match self.when_full {
            WhenFull::Block => {
                let events = self.permits.clone().acquire_many_owned(n).await;
                let bytes = self.bytes.clone().acquire_many_owned(b).await;
                match (events, bytes) {
                    (Ok(e), Ok(b)) => (e, b),
                    _ => return SendOutcome::Closed,
                }
            }
            WhenFull::DropNewest => {
                use tokio::sync::TryAcquireError;
                let taken = self
                    .permits
                    .clone()
                    .try_acquire_many_owned(n)
                    .and_then(|e| Ok((e, self.bytes.clone().try_acquire_many_owned(b)?)));
                match taken {
                    Ok(p) => p,
                    Err(TryAcquireError::NoPermits) => {
                        self.health
                            .dropped
                            .fetch_add(events.len() as u64, Ordering::Relaxed);
                        return SendOutcome::Dropped(events.len());
                    }
                    Err(TryAcquireError::Closed) => return SendOutcome::Closed,
                }
            }
        };
        let envelope = Envelope {
            len: events.len(),
            events,
            tracker: tracker.clone(),
            _permit: permits.0,
            _bytes: permits.1,
        };
        match self.tx.send(envelope) {
            Ok(()) => SendOutcome::Queued,
            Err(_) => SendOutcome::Closed,
        }
    }

    /// Has the runner call [`Sink::reopen`] (file sink: close the files, so that the next
    /// write opens the paths again, for logrotate) between two writes. Requests made before
    /// the runner gets to it are merged into one.
    pub fn reopen(&self) {
        self.reopen.notify_one();
    }

    /// Events queued and not yet stored.
    pub fn queued(&self) -> usize {
        self.gauge().queued()
    }

    /// A read-only view of the buffer and health that does not keep the sink open.
    pub fn gauge(&self) -> SinkGauge {
        SinkGauge {
            name: self.name.clone(),
            permits: self.permits.clone(),
            max_events: self.max_events,
            bytes: self.bytes.clone(),
            max_bytes: u64::from(self.max_bytes),
            health: self.health.clone(),
        }
    }
}

/// What observers (status, metrics) see of a sink, without holding it open.
#[derive(Clone)]
pub struct SinkGauge {
    pub name: Arc<str>,
    permits: Arc<Semaphore>,
    pub max_events: usize,
    bytes: Arc<Semaphore>,
    /// `buffer.max_bytes`.
    pub max_bytes: u64,
    pub health: Arc<SinkHealth>,
}

impl SinkGauge {
    /// Events queued and not yet stored.
    pub fn queued(&self) -> usize {
        self.max_events
            .saturating_sub(self.permits.available_permits())
    }

    /// Bytes queued and not yet stored (as [`event_bytes`] counts them).
    pub fn queued_bytes(&self) -> u64 {
        self.max_bytes
            .saturating_sub(self.bytes.available_permits() as u64)
    }
}

/// The runner's end: wait for it to finish after dropping every handle.
pub struct SinkWorker {
    pub name: Arc<str>,
    done: oneshot::Receiver<()>,
}

impl SinkWorker {
    /// Resolves when the runner has drained, flushed and ended.
    pub async fn finished(self) {
        let _ = self.done.await;
    }
}

/// Starts the runner thread for `sink`. `give_up` stops retrying a failing write (at the end
/// of the shutdown deadline): whatever was not stored stays unacknowledged.
///
/// `after`: a previous instance of the same sink (replaced by a reload). The new runner
/// starts writing only once that one has drained and closed, so two instances never write
/// the same files at once; meanwhile events queue in the new buffer.
pub fn spawn(
    name: &str,
    sink: Box<dyn Sink>,
    buffer: &BufferConfig,
    give_up: CancellationToken,
    after: Option<SinkWorker>,
) -> std::io::Result<(SinkHandle, SinkWorker)> {
    let name: Arc<str> = Arc::from(name);
    let (tx, rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = oneshot::channel();
    let health = Arc::new(SinkHealth {
        healthy: AtomicBool::new(true),
        own: sink.counters(),
        ..SinkHealth::default()
    });
    let max_events = buffer.max_events.max(1);
    let max_bytes =
        u32::try_from(buffer.max_bytes.0.clamp(1, super::MAX_BUFFER_BYTES)).unwrap_or(u32::MAX);
    let handle = SinkHandle {
        name: name.clone(),
        tx,
        permits: Arc::new(Semaphore::new(max_events)),
        max_events,
        bytes: Arc::new(Semaphore::new(max_bytes as usize)),
        max_bytes,
        when_full: buffer.when_full,
        health: health.clone(),
        reopen: Arc::new(Notify::new()),
    };
    let reopen = handle.reopen.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let thread_name = name.clone();
    std::thread::Builder::new()
        .name(format!("sink-{name}"))
        .spawn(move || {
            runtime.block_on(async move {
                if let Some(previous) = after {
                    previous.finished().await;
                }
                run(thread_name, sink, rx, health, give_up, reopen).await
            });
            let _ = done_tx.send(());
        })?;
    Ok((
        handle,
        SinkWorker {
            name,
            done: done_rx,
        },
    ))
}

async fn run(
    name: Arc<str>,
    mut sink: Box<dyn Sink>,
    mut rx: mpsc::UnboundedReceiver<Envelope>,
    health: Arc<SinkHealth>,
    give_up: CancellationToken,
    reopen: Arc<Notify>,
) {
    let mut batch: Vec<Arc<Event>> = Vec::new();
    let mut envelopes: Vec<Envelope> = Vec::new();
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    // The tracker of each feed's current run: a new one means the feed (re)started.
    let mut runs: Vec<Arc<FeedTracker>> = Vec::new();
    let mut next_tick = tokio::time::Instant::now() + TICK;
    // How many events one write receives at most (queued batches are merged so an fsync or a
    // transaction covers many events: group commit), and how long to wait for more.
    let options = sink.options();
    let max_events = options.max_batch_events.max(1);
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = reopen.notified() => {
                match sink.reopen() {
                    Ok(()) => tracing::info!(sink = %name, "reopened"),
                    Err(e) => tracing::error!(sink = %name, "reopen failed: {e}"),
                }
                continue;
            }
            _ = tokio::time::sleep_until(next_tick) => {
                next_tick = tokio::time::Instant::now() + TICK;
                if let Err(e) = sink.tick() {
                    tracing::error!(sink = %name, "{e}");
                }
                continue;
            }
        };
        let Some(mut first) = first else { break };
        batch.clear();
        batch.append(&mut first.events);
        envelopes.push(first);
        let wait_until = tokio::time::Instant::now() + options.max_batch_wait;
        while batch.len() < max_events {
            let mut more = match rx.try_recv() {
                Ok(more) => more,
                Err(_) if options.max_batch_wait.is_zero() => break,
                Err(_) => match tokio::time::timeout_at(wait_until, rx.recv()).await {
                    Ok(Some(more)) => more,
                    Ok(None) | Err(_) => break,
                },
            };
            batch.append(&mut more.events);
            envelopes.push(more);
        }
        for envelope in &envelopes {
            announce_run(sink.as_mut(), &mut runs, &envelope.tracker);
        }
        // One write per `max_events` (a single send can be larger); acknowledged once all
        // are stored. The checkpoints handed with a write cover the events written so far.
        let mut start = 0;
        while start < batch.len() {
            let end = (start + max_events).min(batch.len());
            if options.checkpoints {
                checkpoints_after(&envelopes, &batch, end, &mut checkpoints);
            }
            if !write_with_retry(
                &name,
                sink.as_mut(),
                &batch[start..end],
                options.checkpoints.then_some(&checkpoints[..]),
                &health,
                &give_up,
            )
            .await
            {
                // Giving up at the end of the shutdown deadline: nothing here is acknowledged,
                // so the checkpoints stay behind these events and they are fetched again.
                return;
            }
            start = end;
        }
        health
            .written
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut offset = 0;
        for envelope in envelopes.drain(..) {
            let events = batch.get(offset..offset + envelope.len).unwrap_or_default();
            envelope.tracker.ack(events.iter().map(|e| e.seq));
            offset += envelope.len;
        }
        batch.clear();
        if tokio::time::Instant::now() >= next_tick {
            next_tick = tokio::time::Instant::now() + TICK;
            if let Err(e) = sink.tick() {
                tracing::error!(sink = %name, "{e}");
            }
        }
    }
    match sink.flush() {
        Ok(()) => tracing::debug!(sink = %name, "sink flushed and closed"),
        Err(e) => tracing::error!(sink = %name, "flush at shutdown failed: {e}"),
    }
}

/// Tells the sink when a feed's run is new (its tracker is not the one seen last for the feed).
fn announce_run(sink: &mut dyn Sink, runs: &mut Vec<Arc<FeedTracker>>, tracker: &Arc<FeedTracker>) {
    if tracker.feed().is_empty() {
        return;
    }
    match runs.iter_mut().find(|t| t.feed() == tracker.feed()) {
        Some(known) if Arc::ptr_eq(known, tracker) => return,
        Some(known) => *known = tracker.clone(),
        None => runs.push(tracker.clone()),
    }
    sink.feed_started(
        tracker.feed(),
        tracker.url(),
        tracker.start_seq(),
        tracker.start_id(),
    );
    sink.feed_epoch(tracker.feed(), tracker.epoch());
}

/// For each feed in the first `upto` events of the batch (the envelopes' events, in order), the
/// checkpoint that holds once they are acknowledged (a non-mutating preview on the tracker).
fn checkpoints_after(
    envelopes: &[Envelope],
    batch: &[Arc<Event>],
    upto: usize,
    out: &mut Vec<Checkpoint>,
) {
    out.clear();
    let now = chrono::Utc::now();
    let mut done: Vec<&Arc<FeedTracker>> = Vec::new();
    let mut seqs: Vec<u64> = Vec::new();
    for envelope in envelopes {
        let tracker = &envelope.tracker;
        if tracker.feed().is_empty() || done.iter().any(|t| Arc::ptr_eq(t, tracker)) {
            continue;
        }
        done.push(tracker);
        seqs.clear();
        let mut offset = 0;
        for same in envelopes {
            let take = same.len.min(upto.saturating_sub(offset));
            if Arc::ptr_eq(&same.tracker, tracker) {
                let events = batch.get(offset..offset + take).unwrap_or_default();
                seqs.extend(events.iter().map(|e| e.seq));
            }
            offset += same.len;
        }
        let p = tracker.position_if_acked(&seqs);
        out.push(Checkpoint {
            feed: tracker.feed().to_string(),
            url: tracker.url().to_string(),
            last_event_id: p.last_event_id.to_string(),
            seq: p.seq,
            updated_at: now,
        });
    }
}

/// Writes until it succeeds; false if told to give up first. With `checkpoints`, the sink
/// stores them in the same transaction.
async fn write_with_retry(
    name: &str,
    sink: &mut dyn Sink,
    batch: &[Arc<Event>],
    checkpoints: Option<&[Checkpoint]>,
    health: &SinkHealth,
    give_up: &CancellationToken,
) -> bool {
    let mut delay = RETRY_MIN;
    let mut last_logged: Option<Instant> = None;
    let mut failures = 0u64;
    loop {
        let started = Instant::now();
        let result = match checkpoints {
            Some(cps) => sink.write_with_checkpoints(batch, cps),
            None => sink.write(batch),
        };
        health.write_seconds.observe(started.elapsed());
        match result {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(sink = %name, failures, "sink recovered; held-back events stored");
                    health.healthy.store(true, Ordering::Relaxed);
                    if let Ok(mut g) = health.last_error.lock() {
                        *g = None;
                    }
                }
                return true;
            }
            Err(e) => {
                failures += 1;
                let message = e.to_string();
                // Unhealthy and the error first, then the count: whoever sees the error count
                // grow sees the sink unhealthy and why.
                health.healthy.store(false, Ordering::Release);
                if let Ok(mut g) = health.last_error.lock() {
                    *g = Some(message.clone());
                }
                health.errors.fetch_add(1, Ordering::Release);
                if last_logged.is_none_or(|t| t.elapsed() >= ERROR_LOG_EVERY) {
                    tracing::error!(
                        sink = %name,
                        events = batch.len(),
                        failures,
                        "write failed, holding the feeds back and retrying: {message}"
                    );
                    last_logged = Some(Instant::now());
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = give_up.cancelled() => {
                        tracing::warn!(sink = %name, events = batch.len(), "shutdown deadline reached while the sink was failing; these events stay unacknowledged and will be fetched again");
                        return false;
                    }
                }
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::SinkError;

    /// Counts `reopen` calls.
    struct Reopens(Arc<AtomicU64>);

    impl Sink for Reopens {
        fn write(&mut self, _events: &[Arc<Event>]) -> Result<(), SinkError> {
            Ok(())
        }

        fn flush(&mut self) -> Result<(), SinkError> {
            Ok(())
        }

        fn reopen(&mut self) -> Result<(), SinkError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A sink whose writes wait until the test opens the gate.
    struct Gate(Arc<AtomicBool>);

    impl Sink for Gate {
        fn write(&mut self, _events: &[Arc<Event>]) -> Result<(), SinkError> {
            while !self.0.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        }

        fn flush(&mut self) -> Result<(), SinkError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_buffer_is_bounded_in_bytes_as_well_as_in_events() {
        use crate::checkpoint::{FeedTracker, Position};
        let gate = Arc::new(AtomicBool::new(false));
        let buffer = BufferConfig {
            max_events: 1000,
            max_bytes: crate::config::units::ByteSize(100 * 1024),
            ..BufferConfig::default()
        };
        let (handle, worker) = spawn(
            "s",
            Box::new(Gate(gate.clone())),
            &buffer,
            CancellationToken::new(),
            None,
        )
        .unwrap();
        let tracker = Arc::new(FeedTracker::new(Position {
            seq: 0,
            last_event_id: Arc::from(""),
        }));
        let event = |seq: u64| {
            Arc::new(Event {
                feed: Arc::from("f"),
                event_type: Arc::from("t"),
                data: "x".repeat(30 * 1024),
                id: Arc::from(""),
                received_at: chrono::Utc::now(),
                seq,
            })
        };
        tracker.register((1..=10).map(|s| (s, "", 1u32)));
        // Three fill the 100 KiB (the one being written counts until it is acknowledged).
        for seq in 1..=3 {
            let sent = tokio::time::timeout(
                Duration::from_secs(5),
                handle.send(vec![event(seq)], &tracker),
            )
            .await;
            assert_eq!(sent, Ok(SendOutcome::Queued), "event {seq}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let gauge = handle.gauge();
        assert!(gauge.queued_bytes() > 90 * 1024, "{}", gauge.queued_bytes());
        assert!(gauge.queued() < 10, "the event bound is far away");
        let sender = handle.clone();
        let fourth_tracker = tracker.clone();
        let fourth =
            tokio::spawn(async move { sender.send(vec![event(4)], &fourth_tracker).await });
        tokio::pin!(fourth);
        let blocked = tokio::time::timeout(Duration::from_millis(300), &mut fourth).await;
        assert!(blocked.is_err(), "a full byte budget holds the feed back");
        gate.store(true, Ordering::SeqCst);
        let sent = tokio::time::timeout(Duration::from_secs(5), fourth).await;
        assert_eq!(sent.ok().and_then(|r| r.ok()), Some(SendOutcome::Queued));
        // A batch larger than the whole buffer still goes through, alone, once there is room.
        let huge: Vec<Arc<Event>> = (5..=10).map(event).collect();
        let sent = tokio::time::timeout(Duration::from_secs(5), handle.send(huge, &tracker)).await;
        assert_eq!(sent, Ok(SendOutcome::Queued));
        drop(handle);
        worker.finished().await;
        assert_eq!(tracker.acked().seq, 10);
    }

    #[tokio::test]
    async fn reopen_reaches_the_sink() {
        let count = Arc::new(AtomicU64::new(0));
        let sink = Box::new(Reopens(count.clone()));
        let (handle, worker) = spawn(
            "s",
            sink,
            &BufferConfig::default(),
            CancellationToken::new(),
            None,
        )
        .unwrap();
        for expected in [1, 2] {
            handle.reopen();
            let deadline = Instant::now() + Duration::from_secs(10);
            while count.load(Ordering::SeqCst) < expected {
                assert!(Instant::now() < deadline, "reopen not called");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        drop(handle);
        worker.finished().await;
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}
