//! One client's stream: its bounded queue in front of the socket, the backlog read from the
//! database, then live frames from the poller's ring; the log lines and counters of its
//! connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::HeaderValue;
use axum::response::Response;
use bytes::Bytes;
use globset::GlobMatcher;
use tokio::sync::{broadcast, mpsc, Notify};

use super::db::{DbError, Frame, FIRST_PAGE_BYTES, PAGE_BYTES};
use super::stats::FeedCounters;
use super::Shared;
use crate::http_server::Hangup;

/// How often a client waiting for room in its queue checks whether it fell behind.
const WAIT_STEP: Duration = Duration::from_millis(100);

/// Who a stream is for, as its log lines name it (never by its token).
#[derive(Debug)]
pub(super) struct Client {
    pub feed: Arc<str>,
    pub peer: Option<SocketAddr>,
    /// The id it resumes after, as sent (shortened and escaped for the log).
    pub resume: Option<String>,
    /// The `?type=` filter, as sent.
    pub types: Option<String>,
    /// The line of its token in the token file.
    pub token_line: Option<usize>,
}

/// Opens the stream of `client` from `cursor` (the `pos` it resumes after): starts the task
/// that feeds its queue, and returns the response whose body drains it.
pub(super) fn open_stream(
    shared: &Shared,
    client: Client,
    type_glob: Option<GlobMatcher>,
    cursor: i64,
    hangup: Option<Hangup>,
) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let state = Arc::new(QueueState {
        frames: AtomicUsize::new(0),
        bytes: AtomicUsize::new(0),
        taken: Notify::new(),
        last_taken: Mutex::new(Instant::now()),
    });
    let counters = shared.stats.feed(&client.feed);
    let queue = Queue {
        tx,
        state: state.clone(),
        shared: shared.clone(),
        counters: counters.clone(),
        sent: AtomicU64::new(0),
    };
    tokio::spawn(run_client(
        shared.clone(),
        client,
        type_glob,
        cursor,
        queue,
        hangup,
    ));
    let body = Drain {
        rx,
        state,
        queued: shared.queued.clone(),
    };
    let body = futures_util::stream::unfold(body, |mut body| async move {
        let frame = body.rx.recv().await?;
        body.took(frame.len());
        Some((Ok::<Bytes, Infallible>(frame), body))
    });
    let mut response = Response::new(Body::from_stream(body));
    let h = response.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Counts a client as connected for as long as it lives.
struct Connected(Arc<FeedCounters>);

impl Connected {
    fn new(c: Arc<FeedCounters>) -> Connected {
        c.clients.fetch_add(1, Ordering::Relaxed);
        c.connections.fetch_add(1, Ordering::Relaxed);
        Connected(c)
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client's resume id or type filter as a log line shows it (`-` when absent).
fn shown(s: &Option<String>) -> String {
    match s {
        None => "-".into(),
        Some(s) => format!("{:?}", super::shown_name(s)),
    }
}

/// A client's queue as both ends see it.
struct QueueState {
    frames: AtomicUsize,
    bytes: AtomicUsize,
    /// Notified whenever the socket side takes a frame.
    taken: Notify,
    /// When the socket side last took a frame (or the client connected).
    last_taken: Mutex<Instant>,
}

/// The socket side of a client's queue: hands frames to hyper, gives back their bytes, and
/// gives back what is left when the connection ends.
struct Drain {
    rx: mpsc::UnboundedReceiver<Bytes>,
    state: Arc<QueueState>,
    queued: Arc<AtomicUsize>,
}

impl Drain {
    fn took(&self, len: usize) {
        self.state.frames.fetch_sub(1, Ordering::AcqRel);
        self.state.bytes.fetch_sub(len, Ordering::AcqRel);
        self.queued.fetch_sub(len, Ordering::AcqRel);
        *self
            .state
            .last_taken
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.state.taken.notify_waiters();
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(frame) = self.rx.try_recv() {
            self.took(frame.len());
        }
    }
}

/// The client side of its queue: bounded in frames and bytes, per client and in total.
struct Queue {
    tx: mpsc::UnboundedSender<Bytes>,
    state: Arc<QueueState>,
    shared: Shared,
    counters: Arc<FeedCounters>,
    /// Events queued to this client.
    sent: AtomicU64,
}

impl Queue {
    /// Queues `frame` if there is room (an empty queue always has room); gives it back if not.
    fn try_push(&self, frame: Bytes) -> Result<Result<(), Bytes>, End> {
        let o = &self.shared.options;
        let len = frame.len();
        let frames = self.state.frames.load(Ordering::Acquire);
        if frames > 0 {
            let bytes = self.state.bytes.load(Ordering::Acquire);
            if frames >= o.client_buffer || bytes + len > o.client_buffer_bytes {
                return Ok(Err(frame));
            }
            let total = &self.shared.queued;
            let mut now = total.load(Ordering::Acquire);
            loop {
                if now + len > o.max_buffered_bytes {
                    return Ok(Err(frame));
                }
                match total.compare_exchange_weak(
                    now,
                    now + len,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(seen) => now = seen,
                }
            }
        } else {
            self.shared.queued.fetch_add(len, Ordering::AcqRel);
        }
        self.state.frames.fetch_add(1, Ordering::AcqRel);
        self.state.bytes.fetch_add(len, Ordering::AcqRel);
        if self.tx.send(frame).is_err() {
            // The connection is gone; its Drain gave back what it held, this is ours.
            self.state.frames.fetch_sub(1, Ordering::AcqRel);
            self.state.bytes.fetch_sub(len, Ordering::AcqRel);
            self.shared.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(End::Gone);
        }
        Ok(Ok(()))
    }

    /// Queues `frame`, waiting for room while the socket drains. Gives up when the socket
    /// took nothing for `send_timeout` (`Stalled`), or when `behind` says the client fell too
    /// far behind (its `End`).
    async fn push(&self, mut frame: Bytes, behind: impl Fn() -> Option<End>) -> Result<(), End> {
        loop {
            let taken = self.state.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            match self.try_push(frame)? {
                Ok(()) => return Ok(()),
                Err(f) => frame = f,
            }
            let idle = self
                .state
                .last_taken
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed();
            if idle >= self.shared.options.send_timeout {
                return Err(End::Stalled);
            }
            if let Some(end) = behind() {
                return Err(end);
            }
            tokio::select! {
                _ = taken => {}
                _ = tokio::time::sleep(WAIT_STEP) => {}
                _ = self.tx.closed() => return Err(End::Gone),
            }
        }
    }
}

impl Queue {
    /// [`Queue::push`] for an event's frame: counts it.
    async fn push_event(&self, frame: Bytes, behind: impl Fn() -> Option<End>) -> Result<(), End> {
        self.push(frame, behind).await?;
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.counters.events.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Why a client's stream ended.
enum End {
    /// The client went away.
    Gone,
    /// The server is stopping.
    Stopping,
    /// The client fell too far behind the live end.
    TooSlow,
    /// The client's socket took nothing for `send_timeout`.
    Stalled,
    /// Catching up from the database took so long that the ring moved on: subscribe again.
    Resubscribe,
    /// The database could not be read.
    Failed(DbError),
}

/// Feeds one client: the backlog from the database, then live frames; logs its connection
/// and its end.
async fn run_client(
    shared: Shared,
    client: Client,
    type_glob: Option<GlobMatcher>,
    cursor: i64,
    queue: Queue,
    hangup: Option<Hangup>,
) {
    let _connected = Connected::new(queue.counters.clone());
    let started = Instant::now();
    let peer = client
        .peer
        .map_or_else(|| "-".to_string(), |p| p.to_string());
    let token = client
        .token_line
        .map_or_else(|| "-".to_string(), |l| format!("line {l}"));
    let feed = &client.feed;
    // Per-client lines are an access log: within a budget, so that a client looping on
    // connecting cannot flood it (the count of lines left out goes with the next one).
    if let Some(earlier) = shared.connections.admit() {
        tracing::info!(
            feed = %feed,
            client = %peer,
            resume_after = %shown(&client.resume),
            types = %shown(&client.types),
            token,
            not_logged_before = earlier,
            "client connected"
        );
    }
    let end = tokio::select! {
        end = stream_to(&shared, feed, type_glob.as_ref(), cursor, &queue) => end,
        _ = shared.shutdown.cancelled() => End::Stopping,
    };
    let sent = queue.sent.load(Ordering::Relaxed);
    let secs = format!("{:.1}", started.elapsed().as_secs_f64());
    if let Some(earlier) = shared.connections.admit() {
        log_end(&shared, &end, feed, &peer, sent, &secs, earlier);
    }
    // Ending the stream is not enough for a client that does not read: hyper would wait for
    // its socket for ever. Hang up (after a short grace to flush what was queued).
    if !matches!(end, End::Gone | End::Stopping) {
        if let Some(h) = hangup {
            h.hang_up();
        }
    }
}

/// The line that says how a client's stream ended.
fn log_end(
    shared: &Shared,
    end: &End,
    feed: &str,
    peer: &str,
    sent: u64,
    secs: &str,
    earlier: u64,
) {
    match end {
        End::Gone | End::Resubscribe => tracing::info!(
            feed,
            client = peer,
            events = sent,
            seconds = secs,
            not_logged_before = earlier,
            "client disconnected"
        ),
        End::Stopping => tracing::info!(
            feed,
            client = peer,
            events = sent,
            seconds = secs,
            not_logged_before = earlier,
            "client disconnected: the server is stopping"
        ),
        End::TooSlow => tracing::warn!(
            feed,
            client = peer,
            events = sent,
            max_lag = shared.options.max_lag,
            max_lag_bytes = shared.options.max_lag_bytes,
            not_logged_before = earlier,
            "disconnecting a client that fell too far behind; it resumes with its Last-Event-ID"
        ),
        End::Stalled => tracing::warn!(
            feed,
            client = peer,
            events = sent,
            send_timeout = %humantime::format_duration(shared.options.send_timeout),
            not_logged_before = earlier,
            "disconnecting a client that read nothing for the send timeout; it resumes with its Last-Event-ID"
        ),
        End::Failed(e) => tracing::error!(
            feed,
            client = peer,
            events = sent,
            not_logged_before = earlier,
            "ending a client's stream: {e}"
        ),
    }
}

/// Whether a client holding `live` (which last took the frame ending at `took_end`) is too
/// far behind the live end: more than `max_lag` events or `max_lag_bytes` bytes.
fn lagging(shared: &Shared, live: &broadcast::Receiver<Arc<Frame>>, took_end: u64) -> bool {
    let o = &shared.options;
    live.len() >= o.max_lag
        || shared
            .published
            .load(Ordering::Acquire)
            .saturating_sub(took_end)
            > o.max_lag_bytes as u64
}

async fn stream_to(
    shared: &Shared,
    feed: &Arc<str>,
    type_glob: Option<&GlobMatcher>,
    mut cursor: i64,
    queue: &Queue,
) -> End {
    let opening = format!(
        ": sse-bridge serve, feed {feed}\nretry: {}\n\n",
        shared.options.retry.as_millis()
    );
    if let Err(end) = queue.push(Bytes::from(opening), || None).await {
        return end;
    }
    let wanted = |t: &str| type_glob.is_none_or(|g| g.is_match(t));
    let mut first_page = true;
    'subscribe: loop {
        // Subscribe first, then catch up from the database: nothing stored in between is
        // missed, and frames already sent from the database are skipped by `pos`.
        let mut took_end = shared.published.load(Ordering::Acquire);
        let mut live = shared.live.subscribe();
        loop {
            let max = if first_page {
                FIRST_PAGE_BYTES
            } else {
                PAGE_BYTES
            };
            let page = shared
                .store
                .page(first_page, Some(feed.clone()), cursor, max)
                .await;
            first_page = false;
            let page = match page {
                Ok(page) => page,
                Err(e) => return End::Failed(e),
            };
            if page.is_empty() {
                break;
            }
            for row in page {
                if wanted(&row.event_type) {
                    // The frames published meanwhile wait in the ring for this client: when
                    // they are too many, let them go and subscribe again later.
                    let behind = || lagging(shared, &live, took_end).then_some(End::Resubscribe);
                    match queue.push_event(row.bytes, behind).await {
                        Ok(()) => {}
                        Err(End::Resubscribe) => {
                            drop(live);
                            continue 'subscribe;
                        }
                        Err(end) => return end,
                    }
                }
                cursor = row.pos;
            }
        }
        // Live.
        let mut heartbeat = tokio::time::interval(shared.options.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.reset();
        let mut took_live = false;
        loop {
            tokio::select! {
                r = live.recv() => match r {
                    Ok(frame) => {
                        took_live = true;
                        took_end = frame.end;
                        if frame.pos <= cursor || frame.feed != *feed {
                            continue;
                        }
                        cursor = frame.pos;
                        if wanted(&frame.event_type) {
                            let behind = || lagging(shared, &live, took_end).then_some(End::TooSlow);
                            if let Err(end) = queue.push_event(frame.bytes.clone(), behind).await {
                                return end;
                            }
                        }
                    }
                    // Missed frames while catching up from the database: catch up again.
                    Err(broadcast::error::RecvError::Lagged(_)) if !took_live => continue 'subscribe,
                    Err(broadcast::error::RecvError::Lagged(_)) => return End::TooSlow,
                    Err(broadcast::error::RecvError::Closed) => return End::Gone,
                },
                _ = heartbeat.tick() => {
                    // A full queue already has something for the client to read.
                    if let Err(end) = queue.try_push(Bytes::from_static(b": heartbeat\n\n")) {
                        return end;
                    }
                }
                _ = queue.tx.closed() => return End::Gone,
            }
        }
    }
}
