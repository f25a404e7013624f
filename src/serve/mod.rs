//! `sse-bridge serve`: stored events as a live Server-Sent Events endpoint.
//!
//! `GET /feeds/{feed}/events` streams the events of one feed stored in an SQLite sink
//! database: first those after the client's `Last-Event-ID` (header, or `?last_event_id=`),
//! read from the database, then new events as they are stored, by this process or any other
//! writing the same database.
//!
//! # Ids and resuming
//!
//! Each event is sent with its original id as `id:`, so an EventSource client (a browser, or
//! another sse-bridge) sees the same ids the upstream stream sent. Resuming after an id
//! continues after the FIRST stored event of the feed with that id, as the upstream server
//! would (several events share an id when the stream omits `id:` on some of them). Events
//! stored without an id are sent with the id `@POS`, their row's `pos`, so a client can still
//! resume after them. An id that is not in the log is answered `410 Gone` (an sse-bridge
//! records a gap and reconnects without it; a browser's EventSource stops).
//!
//! # Many clients
//!
//! One poller reads new rows (`pos` greater than the last seen) every `poll_interval`,
//! renders each once, and publishes it to every client through a bounded broadcast ring of
//! `max_lag` events. A client catching up reads the database at its own pace, a page of at
//! most [`PAGE_BYTES`] at a time, through a small shared pool of read-only connections.
//! A live client whose socket does not drain falls behind the ring: once more than `max_lag`
//! events, or `max_lag_bytes` bytes, were stored since the last one it took, it is
//! disconnected, and resumes with its `Last-Event-ID` when it reconnects. Neither the other
//! clients nor the bridge ever wait for a slow client.
//!
//! # Bounded memory and descriptors
//!
//! Local clients are untrusted (ARCHITECTURE.md, "Hostile input and bounded resources"). What
//! a client can make the server hold is bounded in bytes: its queue of rendered frames in
//! front of the socket (`client_buffer_bytes`, and all queues together `max_buffered_bytes`;
//! an empty queue always takes one frame, so every client moves), the page it is catching up
//! from, and hyper's write buffer ([`SOCKET_BUF_BYTES`]). A client that takes nothing for
//! `send_timeout` is disconnected. Connections are capped (`max_clients`, lowered to fit the
//! open-file limit); the database is read through [`POOL`] connections, not one per client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use bytes::Bytes;
use globset::GlobMatcher;
use rusqlite::Connection;
use tokio::sync::{broadcast, mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::units::parse_byte_size;
use crate::http_server::Hangup;
use crate::sse::encode::encode_sse;
use crate::store::sqlite::{self as store, open_read_only as open_event_db};

/// Rows per database page.
const PAGE: usize = 500;

/// A page read from the database stops once it holds this many bytes of rendered frames (and
/// always holds at least one row): what a client catching up holds besides its queue.
pub const PAGE_BYTES: usize = 64 * 1024;

/// A client's first page is small: its first event should not wait behind a large read.
const FIRST_PAGE_BYTES: usize = 8 * 1024;

/// The poller's pages may be larger: it reads once for every client.
const POLL_PAGE_BYTES: usize = 1024 * 1024;

/// Read-only database connections shared by all clients (each holds up to three descriptors,
/// the database and its `-wal` and `-shm`, and a page cache).
pub const POOL: usize = 4;

/// Bytes of a response hyper buffers in front of a client's socket.
pub const SOCKET_BUF_BYTES: usize = 64 * 1024;

/// Descriptors kept for everything that is not a client's socket (the database pool, the
/// listener, standard streams, the runtime's own).
const FD_RESERVE: u64 = 64;

/// How often a client waiting for room in its queue checks whether it fell behind.
const WAIT_STEP: Duration = Duration::from_millis(100);

fn byte_size(s: &str) -> Result<usize, String> {
    parse_byte_size(s).map(|n| usize::try_from(n).unwrap_or(usize::MAX))
}

/// `sse-bridge serve` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The SQLite database written by a `sqlite` sink (or the state database it shares). It
    /// is opened read-only and must already exist.
    #[arg(value_name = "DATABASE")]
    pub database: PathBuf,

    /// Address and port to listen on. The default accepts connections from this machine
    /// only; use `0.0.0.0:8080` (behind a reverse proxy) to accept others.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// A comment line (`: heartbeat`) is sent this often, so proxies and clients with an idle
    /// timeout keep the connection.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,

    /// The reconnection delay sent to clients (`retry:` field).
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = humantime::parse_duration)]
    pub retry: Duration,

    /// How often the database is checked for new events.
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// Frames queued per client in front of its socket, at most.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub client_buffer: usize,

    /// Bytes of rendered frames queued per client in front of its socket, at most (an empty
    /// queue still takes one frame, however large).
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = byte_size)]
    pub client_buffer_bytes: usize,

    /// Bytes queued for all clients together, at most: a client whose queue is not empty
    /// waits while the total is reached.
    #[arg(long, value_name = "SIZE", default_value = "128MiB", value_parser = byte_size)]
    pub max_buffered_bytes: usize,

    /// A live client that has not taken an event while this many newer events were stored is
    /// disconnected (it resumes with its Last-Event-ID).
    #[arg(long, value_name = "N", default_value_t = 16384)]
    pub max_lag: usize,

    /// A live client that has not taken an event while this many bytes of newer events were
    /// stored is disconnected (it resumes with its Last-Event-ID). Bounds the memory of the
    /// ring that holds new events for the clients.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = byte_size)]
    pub max_lag_bytes: usize,

    /// Connections served at once. One over the cap is answered `503 Service Unavailable`
    /// with `Retry-After` and closed. Lowered, with a warning, to fit the open-file limit.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_clients: usize,

    /// Time a client has to send its request head; a connection that sends half a request
    /// is closed after it.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// A client whose socket takes nothing for this long while its queue is full is
    /// disconnected (it resumes with its Last-Event-ID).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub send_timeout: Duration,
}

/// Settings of a running server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub database: PathBuf,
    pub heartbeat: Duration,
    pub retry: Duration,
    pub poll_interval: Duration,
    pub client_buffer: usize,
    pub client_buffer_bytes: usize,
    pub max_buffered_bytes: usize,
    pub max_lag: usize,
    pub max_lag_bytes: usize,
    pub max_clients: usize,
    pub header_timeout: Duration,
    pub send_timeout: Duration,
}

impl From<&ServeArgs> for ServeOptions {
    fn from(a: &ServeArgs) -> Self {
        ServeOptions {
            database: a.database.clone(),
            heartbeat: a.heartbeat,
            retry: a.retry,
            poll_interval: a.poll_interval,
            client_buffer: a.client_buffer,
            client_buffer_bytes: a.client_buffer_bytes,
            max_buffered_bytes: a.max_buffered_bytes,
            max_lag: a.max_lag,
            max_lag_bytes: a.max_lag_bytes,
            max_clients: a.max_clients,
            header_timeout: a.header_timeout,
            send_timeout: a.send_timeout,
        }
    }
}

/// One stored event, rendered once for every client.
#[derive(Debug)]
struct Frame {
    pos: i64,
    feed: Arc<str>,
    event_type: String,
    bytes: Bytes,
    /// Bytes published to the ring up to and including this frame: how far behind a client
    /// is, in bytes, is `published - end` of the last frame it took.
    end: u64,
}

/// A row read from the database, rendered.
struct Row {
    pos: i64,
    feed: String,
    event_type: String,
    bytes: Bytes,
}

#[derive(Clone)]
struct Shared {
    options: Arc<ServeOptions>,
    live: broadcast::Sender<Arc<Frame>>,
    /// Bytes published to the ring so far.
    published: Arc<AtomicU64>,
    /// Bytes queued for all clients.
    queued: Arc<AtomicUsize>,
    pool: Arc<Pool>,
    shutdown: CancellationToken,
}

/// The `id:` a stored event is served with: its own id, or `@POS` when it has none.
pub fn served_id(pos: i64, id: &str) -> String {
    if id.is_empty() {
        format!("@{pos}")
    } else {
        id.to_string()
    }
}

fn render(pos: i64, id: &str, event_type: &str, data: &str) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + id.len() + event_type.len() + 32);
    encode_sse(Some(&served_id(pos, id)), event_type, data, &mut out);
    Bytes::from(out)
}

/// Why the event database could not be read for a client or the poller.
#[derive(Debug, thiserror::Error)]
enum DbError {
    #[error(transparent)]
    Open(#[from] store::OpenError),
    #[error(transparent)]
    Sql(#[from] rusqlite::Error),
    #[error(transparent)]
    Row(#[from] store::RowError),
    #[error("the database pool is closed")]
    Closed,
    #[error("a database read failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Rows after `after` (of `feed`, or of every feed), rendered, in `pos` order: at most
/// [`PAGE`] rows, and no more once `max_bytes` are reached (at least one row).
fn read_rows(
    conn: &Connection,
    feed: Option<&str>,
    after: i64,
    max_bytes: usize,
) -> Result<Vec<Row>, DbError> {
    let mut out = Vec::new();
    let mut bytes = 0;
    store::for_each_after(conn, feed, after, PAGE, |row| -> Result<bool, DbError> {
        let event_type = row.event_type()?;
        let rendered = render(row.pos, row.id()?, event_type, row.data()?);
        bytes += rendered.len();
        out.push(Row {
            pos: row.pos,
            feed: row.feed()?.to_string(),
            event_type: event_type.to_string(),
            bytes: rendered,
        });
        Ok(bytes < max_bytes)
    })?;
    Ok(out)
}

/// A few read-only connections to the database, shared by the clients.
///
/// Catching up is bulk work, taken in turns; a client's first read (finding its
/// `Last-Event-ID`, its first page) goes through a lane of its own, so that a new client gets
/// its first event at once however many others are catching up.
struct Pool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    bulk: Semaphore,
    first: Semaphore,
}

impl Pool {
    fn new(path: PathBuf) -> Pool {
        Pool {
            path,
            idle: Mutex::new(Vec::new()),
            bulk: Semaphore::new(POOL - 1),
            first: Semaphore::new(1),
        }
    }

    /// Runs `f` on a pooled connection, on a blocking thread, in the `first` lane or the bulk
    /// one. A connection that failed is dropped (the next use opens a new one).
    async fn with<T: Send + 'static>(
        self: &Arc<Self>,
        first: bool,
        f: impl FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        let lane = if first { &self.first } else { &self.bulk };
        let _permit = lane.acquire().await.map_err(|_| DbError::Closed)?;
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let conn = match idle {
                Some(c) => c,
                None => open_event_db(&pool.path)?,
            };
            let result = f(&conn);
            if result.is_ok() {
                pool.idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(conn);
            }
            result
        })
        .await?
    }
}

/// Serves `options.database` on `listener` until `shutdown` is cancelled, at most
/// `options.max_clients` connections at once.
pub async fn serve(
    options: ServeOptions,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let db = options.database.clone();
    let start = tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
        let conn = open_event_db(&db)?;
        store::last_pos(&conn)
            .with_context(|| format!("{}: cannot read the events table", db.display()))
    })
    .await??;
    let (live, _) = broadcast::channel(options.max_lag.max(16));
    let limits = crate::http_server::Limits {
        name: "serve",
        header_timeout: options.header_timeout,
        max_buf_size: SOCKET_BUF_BYTES,
        retry_after_secs: options.retry.as_secs().max(1),
    };
    let max_clients = options.max_clients;
    let shared = Shared {
        pool: Arc::new(Pool::new(options.database.clone())),
        options: Arc::new(options),
        live: live.clone(),
        published: Arc::default(),
        queued: Arc::default(),
        shutdown: shutdown.clone(),
    };
    let poller = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("serve-poller".into())
            .spawn(move || poll_loop(shared, start))
            .context("cannot start the poller thread")?
    };
    let app = axum::Router::new()
        .route("/feeds/:feed/events", axum::routing::get(events))
        .route("/", axum::routing::get(index))
        .with_state(shared);
    crate::http_server::run(listener, app, limits, move || max_clients, shutdown.clone()).await;
    shutdown.cancel();
    let _ = tokio::task::spawn_blocking(move || poller.join()).await;
    Ok(())
}

async fn index() -> &'static str {
    "sse-bridge serve: GET /feeds/{feed}/events (text/event-stream; optional ?type=GLOB, \
     resumes after the Last-Event-ID header or ?last_event_id=)\n"
}

/// Reads new rows and publishes them until shutdown.
fn poll_loop(shared: Shared, mut last: i64) {
    let path = shared.options.database.clone();
    let mut conn: Option<Connection> = None;
    let mut failing = false;
    while !shared.shutdown.is_cancelled() {
        if conn.is_none() {
            match open_event_db(&path) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    if !failing {
                        tracing::error!("cannot read new events (retrying): {e:#}");
                        failing = true;
                    }
                }
            }
        }
        if let Some(c) = &conn {
            loop {
                match read_rows(c, None, last, POLL_PAGE_BYTES) {
                    Ok(page) => {
                        if failing {
                            tracing::info!(database = %path.display(), "reading new events again");
                            failing = false;
                        }
                        let full = page.len() >= PAGE;
                        let bytes: usize = page.iter().map(|r| r.bytes.len()).sum();
                        for row in page {
                            last = row.pos;
                            let len = row.bytes.len() as u64;
                            let end = shared.published.fetch_add(len, Ordering::AcqRel) + len;
                            // No receiver is fine: nobody is live right now.
                            let _ = shared.live.send(Arc::new(Frame {
                                pos: row.pos,
                                feed: Arc::from(row.feed),
                                event_type: row.event_type,
                                bytes: row.bytes,
                                end,
                            }));
                        }
                        if !full && bytes < POLL_PAGE_BYTES {
                            break;
                        }
                    }
                    Err(e) => {
                        if !failing {
                            tracing::error!(database = %path.display(), "cannot read new events (retrying): {e}");
                            failing = true;
                        }
                        conn = None;
                        break;
                    }
                }
            }
        }
        std::thread::sleep(shared.options.poll_interval);
    }
}

fn plain(status: StatusCode, text: String) -> Response {
    let mut r = Response::new(Body::from(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        axum::http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn events(
    State(shared): State<Shared>,
    hangup: Option<Extension<Hangup>>,
    UrlPath(feed): UrlPath<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut type_glob: Option<GlobMatcher> = None;
    let mut query_id: Option<String> = None;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "type" => match crate::route::compile_pattern(&v) {
                Ok(g) => type_glob = Some(g),
                Err(e) => return plain(StatusCode::BAD_REQUEST, format!("?type: {e}\n")),
            },
            "last_event_id" => query_id = Some(v.into_owned()),
            _ => {}
        }
    }
    // The header is what an EventSource sends when it reconnects: it wins over the query.
    let header_id = match headers.get("last-event-id").map(|v| v.to_str()) {
        Some(Ok(v)) => Some(v.to_string()),
        Some(Err(_)) => {
            return plain(
                StatusCode::BAD_REQUEST,
                "Last-Event-ID is not valid text\n".into(),
            )
        }
        None => None,
    };
    let resume = header_id.or(query_id).filter(|s| !s.is_empty());

    let cursor = match resume {
        None => 0,
        Some(id) => {
            let lookup_feed = feed.clone();
            let shown_id = id.clone();
            let found = shared
                .pool
                .with(true, move |conn| {
                    if let Some(pos) = store::pos_of_id(conn, &lookup_feed, &id, i64::MAX)? {
                        return Ok(Some(pos));
                    }
                    if let Some(pos) = id.strip_prefix('@').and_then(|p| p.parse::<i64>().ok()) {
                        if store::pos_is_of_feed(conn, &lookup_feed, pos)? {
                            return Ok(Some(pos));
                        }
                    }
                    Ok(None)
                })
                .await;
            match found {
                Ok(Some(pos)) => pos,
                Ok(None) => {
                    let id = shown_id;
                    return plain(
                        StatusCode::GONE,
                        format!(
                            "feed `{feed}` has no stored event with id {id:?}: reconnect without \
                             Last-Event-ID to start from the beginning of the stored log\n"
                        ),
                    );
                }
                Err(e) => {
                    tracing::error!(database = %shared.options.database.display(), "{e}");
                    return plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the event database cannot be read\n".to_string(),
                    );
                }
            }
        }
    };

    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let state = Arc::new(QueueState {
        frames: AtomicUsize::new(0),
        bytes: AtomicUsize::new(0),
        taken: Notify::new(),
        last_taken: Mutex::new(Instant::now()),
    });
    let queue = Queue {
        tx,
        state: state.clone(),
        shared: shared.clone(),
    };
    let feed: Arc<str> = Arc::from(feed);
    tracing::debug!(feed = %feed, cursor, "client connected");
    tokio::spawn(client(
        shared.clone(),
        feed,
        type_glob,
        cursor,
        queue,
        hangup.map(|Extension(h)| h),
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
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        "cache-control",
        axum::http::HeaderValue::from_static("no-cache"),
    );
    h.insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    response
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

/// Why a client's stream ended.
enum End {
    /// The client went away, or the server is stopping.
    Gone,
    /// The client fell too far behind the live end.
    TooSlow,
    /// The client's socket took nothing for `send_timeout`.
    Stalled,
    /// Catching up from the database took so long that the ring moved on: subscribe again.
    Resubscribe,
    /// The database could not be read.
    Failed(DbError),
}

/// Feeds one client: the backlog from the database, then live frames.
async fn client(
    shared: Shared,
    feed: Arc<str>,
    type_glob: Option<GlobMatcher>,
    cursor: i64,
    queue: Queue,
    hangup: Option<Hangup>,
) {
    let end = tokio::select! {
        end = stream_to(&shared, &feed, type_glob.as_ref(), cursor, &queue) => end,
        _ = shared.shutdown.cancelled() => End::Gone,
    };
    match &end {
        End::Gone | End::Resubscribe => tracing::debug!(feed = %feed, "client disconnected"),
        End::TooSlow => tracing::warn!(
            feed = %feed,
            max_lag = shared.options.max_lag,
            max_lag_bytes = shared.options.max_lag_bytes,
            "disconnecting a client that fell too far behind; it resumes with its Last-Event-ID"
        ),
        End::Stalled => tracing::warn!(
            feed = %feed,
            send_timeout = %humantime::format_duration(shared.options.send_timeout),
            "disconnecting a client that read nothing for the send timeout; it resumes with its Last-Event-ID"
        ),
        End::Failed(e) => tracing::error!(feed = %feed, "ending a client's stream: {e}"),
    }
    // Ending the stream is not enough for a client that does not read: hyper would wait for
    // its socket for ever. Hang up (after a short grace to flush what was queued).
    if !matches!(end, End::Gone) {
        if let Some(h) = hangup {
            h.hang_up();
        }
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
            let f = feed.clone();
            let page = shared
                .pool
                .with(first_page, move |c| {
                    let max = if first_page {
                        FIRST_PAGE_BYTES
                    } else {
                        PAGE_BYTES
                    };
                    read_rows(c, Some(&f), cursor, max)
                })
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
                    match queue.push(row.bytes, behind).await {
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
                            if let Err(end) = queue.push(frame.bytes.clone(), behind).await {
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

/// `sse-bridge serve`: binds, logs the address, serves until SIGTERM or SIGINT.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    if args.client_buffer == 0 || args.max_lag == 0 || args.max_clients == 0 {
        anyhow::bail!("--client-buffer, --max-lag and --max-clients must be at least 1");
    }
    if args.client_buffer_bytes == 0 || args.max_buffered_bytes == 0 || args.max_lag_bytes == 0 {
        anyhow::bail!(
            "--client-buffer-bytes, --max-buffered-bytes and --max-lag-bytes must be at least 1 byte"
        );
    }
    if args.heartbeat.is_zero()
        || args.poll_interval.is_zero()
        || args.header_timeout.is_zero()
        || args.send_timeout.is_zero()
    {
        anyhow::bail!(
            "--heartbeat, --poll-interval, --header-timeout and --send-timeout must be greater than zero"
        );
    }
    // Fail early, with the file named, if the database is not usable.
    open_event_db(Path::new(&args.database))?;
    let mut options = ServeOptions::from(args);
    // Every client holds a socket: raise the soft limit as `run` does, and never accept more
    // clients than there are descriptors for.
    let limit = crate::open_files::raise_to_hard_limit();
    let reserve = FD_RESERVE + 3 * POOL as u64;
    options.max_clients = crate::open_files::serve_cap(args.max_clients, limit, reserve);
    if options.max_clients < args.max_clients {
        tracing::warn!(
            max_clients = args.max_clients,
            lowered_to = options.max_clients,
            open_file_limit = limit,
            "--max-clients lowered to fit the open-file limit (raise it with LimitNOFILE= or ulimit -n)"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sse-bridge-serve")
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(
            database = %args.database.display(),
            max_clients = options.max_clients,
            "listening on http://{addr} (GET /feeds/FEED/events)"
        );
        let shutdown = CancellationToken::new();
        let signals = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                use tokio::signal::unix::{signal, SignalKind};
                if let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    tracing::info!("stopping: closing client streams");
                    shutdown.cancel();
                }
            })
        };
        let result = serve(options, listener, shutdown).await;
        signals.abort();
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_without_a_value_are_served_by_position() {
        assert_eq!(served_id(7, "abc"), "abc");
        assert_eq!(served_id(7, ""), "@7");
    }
}
