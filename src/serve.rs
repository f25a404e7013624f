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
//! `max_lag` events. Each client has its own bounded buffer of `client_buffer` frames in front
//! of its socket. A client catching up reads the database at its own pace. A live client
//! whose socket does not drain falls behind the ring: once more than `max_lag` events were
//! stored since the last one it took, it is disconnected, and resumes with its
//! `Last-Event-ID` when it reconnects. Neither the other clients nor the bridge ever wait for
//! a slow client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use globset::{GlobBuilder, GlobMatcher};
use rusqlite::Connection;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::event::Event;
use crate::replay::{encode_sse, open_event_db, pos_of_id, read_after};

/// Events per database page.
const PAGE: usize = 500;

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

    /// Frames buffered per client in front of its socket.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub client_buffer: usize,

    /// A live client that has not taken an event while this many newer events were stored is
    /// disconnected (it resumes with its Last-Event-ID).
    #[arg(long, value_name = "N", default_value_t = 16384)]
    pub max_lag: usize,
}

/// Settings of a running server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub database: PathBuf,
    pub heartbeat: Duration,
    pub retry: Duration,
    pub poll_interval: Duration,
    pub client_buffer: usize,
    pub max_lag: usize,
}

impl From<&ServeArgs> for ServeOptions {
    fn from(a: &ServeArgs) -> Self {
        ServeOptions {
            database: a.database.clone(),
            heartbeat: a.heartbeat,
            retry: a.retry,
            poll_interval: a.poll_interval,
            client_buffer: a.client_buffer,
            max_lag: a.max_lag,
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
}

#[derive(Clone)]
struct Shared {
    options: Arc<ServeOptions>,
    live: broadcast::Sender<Arc<Frame>>,
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

fn render(pos: i64, e: &Event) -> Bytes {
    let mut out = Vec::with_capacity(e.data.len() + e.id.len() + e.event_type.len() + 32);
    encode_sse(
        Some(&served_id(pos, &e.id)),
        &e.event_type,
        &e.data,
        &mut out,
    );
    Bytes::from(out)
}

/// Serves `options.database` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    options: ServeOptions,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let db = options.database.clone();
    let start = tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
        let conn = open_event_db(&db)?;
        conn.query_row("SELECT COALESCE(MAX(pos), 0) FROM events", [], |r| r.get(0))
            .with_context(|| format!("{}: cannot read the events table", db.display()))
    })
    .await??;
    let (live, _) = broadcast::channel(options.max_lag.max(16));
    let shared = Shared {
        options: Arc::new(options),
        live: live.clone(),
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
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .context("the HTTP server failed");
    shutdown.cancel();
    let _ = tokio::task::spawn_blocking(move || poller.join()).await;
    result
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
                match read_after(c, None, last, PAGE) {
                    Ok(page) => {
                        if failing {
                            tracing::info!(database = %path.display(), "reading new events again");
                            failing = false;
                        }
                        let n = page.len();
                        for (pos, event) in page {
                            last = pos;
                            // No receiver is fine: nobody is live right now.
                            let _ = shared.live.send(Arc::new(Frame {
                                pos,
                                bytes: render(pos, &event),
                                feed: event.feed,
                                event_type: event.event_type.to_string(),
                            }));
                        }
                        if n < PAGE {
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
    UrlPath(feed): UrlPath<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut type_glob: Option<GlobMatcher> = None;
    let mut query_id: Option<String> = None;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "type" => match GlobBuilder::new(&v).backslash_escape(true).build() {
                Ok(g) => type_glob = Some(g.compile_matcher()),
                Err(e) => {
                    return plain(
                        StatusCode::BAD_REQUEST,
                        format!("?type={v}: not a valid glob: {e}\n"),
                    )
                }
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

    let db = shared.options.database.clone();
    let lookup_feed = feed.clone();
    let opened =
        tokio::task::spawn_blocking(move || -> Result<(Connection, i64), (StatusCode, String)> {
            let conn = open_event_db(&db).map_err(|e| {
                tracing::error!("{e:#}");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the event database cannot be read\n".to_string(),
                )
            })?;
            let Some(id) = resume else {
                return Ok((conn, 0));
            };
            let unavailable = |e: String| {
                tracing::error!(database = %db.display(), "{e}");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the event database cannot be read\n".to_string(),
                )
            };
            if let Some(pos) = pos_of_id(&conn, &lookup_feed, &id).map_err(unavailable)? {
                return Ok((conn, pos));
            }
            if let Some(pos) = id.strip_prefix('@').and_then(|p| p.parse::<i64>().ok()) {
                let exists = conn
                    .query_row(
                        "SELECT EXISTS (SELECT 1 FROM events WHERE pos = ?1 AND feed = ?2)",
                        (pos, &lookup_feed),
                        |r| r.get::<_, bool>(0),
                    )
                    .map_err(|e| unavailable(e.to_string()))?;
                if exists {
                    return Ok((conn, pos));
                }
            }
            Err((
                StatusCode::GONE,
                format!(
                    "feed `{lookup_feed}` has no stored event with id {id:?}: reconnect without \
                 Last-Event-ID to start from the beginning of the stored log\n"
                ),
            ))
        })
        .await;
    let (conn, cursor) = match opened {
        Ok(Ok(v)) => v,
        Ok(Err((status, text))) => return plain(status, text),
        Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    };

    let (tx, rx) = mpsc::channel::<Bytes>(shared.options.client_buffer.max(1));
    let feed: Arc<str> = Arc::from(feed);
    tracing::debug!(feed = %feed, cursor, "client connected");
    tokio::spawn(client(shared.clone(), feed, type_glob, conn, cursor, tx));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
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

/// Why a client's stream ended.
enum End {
    /// The client went away, or the server is stopping.
    Gone,
    /// The client fell too far behind.
    TooSlow,
    /// The database could not be read.
    Failed(String),
}

/// Feeds one client: the backlog from the database, then live frames.
async fn client(
    shared: Shared,
    feed: Arc<str>,
    type_glob: Option<GlobMatcher>,
    conn: Connection,
    cursor: i64,
    tx: mpsc::Sender<Bytes>,
) {
    let end = tokio::select! {
        end = stream_to(&shared, &feed, type_glob.as_ref(), conn, cursor, &tx) => end,
        _ = shared.shutdown.cancelled() => End::Gone,
    };
    match end {
        End::Gone => tracing::debug!(feed = %feed, "client disconnected"),
        End::TooSlow => tracing::warn!(
            feed = %feed,
            max_lag = shared.options.max_lag,
            "disconnecting a client that fell too far behind; it resumes with its Last-Event-ID"
        ),
        End::Failed(e) => tracing::error!(feed = %feed, "ending a client's stream: {e}"),
    }
}

async fn stream_to(
    shared: &Shared,
    feed: &Arc<str>,
    type_glob: Option<&GlobMatcher>,
    conn: Connection,
    mut cursor: i64,
    tx: &mpsc::Sender<Bytes>,
) -> End {
    let opening = format!(
        ": sse-bridge serve, feed {feed}\nretry: {}\n\n",
        shared.options.retry.as_millis()
    );
    if tx.send(Bytes::from(opening)).await.is_err() {
        return End::Gone;
    }
    let wanted = |t: &str| type_glob.is_none_or(|g| g.is_match(t));
    let mut conn = Some(conn);
    loop {
        // Subscribe first, then catch up from the database: nothing stored in between is
        // missed, and frames already sent from the database are skipped by `pos`.
        let mut live = shared.live.subscribe();
        loop {
            let Some(c) = conn.take() else {
                return End::Failed("lost the database connection".into());
            };
            let f = feed.clone();
            let page = tokio::task::spawn_blocking(move || {
                let page = read_after(&c, Some(&f), cursor, PAGE);
                (c, page)
            })
            .await;
            let page = match page {
                Ok((c, Ok(page))) => {
                    conn = Some(c);
                    page
                }
                Ok((_, Err(e))) => return End::Failed(e),
                Err(e) => return End::Failed(e.to_string()),
            };
            if page.is_empty() {
                break;
            }
            for (pos, event) in page {
                cursor = pos;
                if wanted(&event.event_type) && tx.send(render(pos, &event)).await.is_err() {
                    return End::Gone;
                }
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
                        if frame.pos <= cursor || frame.feed != *feed {
                            continue;
                        }
                        cursor = frame.pos;
                        if wanted(&frame.event_type) {
                            if let Err(end) = send_live(tx, frame.bytes.clone(), &live, shared.options.max_lag).await {
                                return end;
                            }
                        }
                    }
                    // Missed frames while catching up from the database: catch up again.
                    Err(broadcast::error::RecvError::Lagged(_)) if !took_live => break,
                    Err(broadcast::error::RecvError::Lagged(_)) => return End::TooSlow,
                    Err(broadcast::error::RecvError::Closed) => return End::Gone,
                },
                _ = heartbeat.tick() => {
                    match tx.try_send(Bytes::from_static(b": heartbeat\n\n")) {
                        Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                        Err(mpsc::error::TrySendError::Closed(_)) => return End::Gone,
                    }
                }
                _ = tx.closed() => return End::Gone,
            }
        }
    }
}

/// Queues a live frame for the client, waiting while its buffer is full, but not past the
/// point where it has fallen `max_lag` events behind the live end.
async fn send_live(
    tx: &mpsc::Sender<Bytes>,
    frame: Bytes,
    live: &broadcast::Receiver<Arc<Frame>>,
    max_lag: usize,
) -> Result<(), End> {
    loop {
        match tokio::time::timeout(Duration::from_millis(50), tx.reserve()).await {
            Ok(Ok(permit)) => {
                permit.send(frame);
                return Ok(());
            }
            Ok(Err(_)) => return Err(End::Gone),
            Err(_) if live.len() >= max_lag => return Err(End::TooSlow),
            Err(_) => {}
        }
    }
}

/// `sse-bridge serve`: binds, logs the address, serves until SIGTERM or SIGINT.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    if args.client_buffer == 0 || args.max_lag == 0 {
        anyhow::bail!("--client-buffer and --max-lag must be at least 1");
    }
    if args.heartbeat.is_zero() || args.poll_interval.is_zero() {
        anyhow::bail!("--heartbeat and --poll-interval must be greater than zero");
    }
    // Fail early, with the file named, if the database is not usable.
    open_event_db(Path::new(&args.database))?;
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
        let result = serve(ServeOptions::from(args), listener, shutdown).await;
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
