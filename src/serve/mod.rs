//! `sse-bridge serve`: stored events as a live Server-Sent Events endpoint.
//!
//! `GET /feeds/{feed}/events` streams the events of one feed stored in an SQLite sink
//! database: first those after the client's `Last-Event-ID` (header, or `?last_event_id=` or
//! `?lastEventId=`), read from the database, then new events as they are stored, by this
//! process or any other writing the same database. It runs inside `run` (`[serve]` in the
//! config, serving a `sqlite` sink's database) or as the standalone `sse-bridge serve DATABASE`;
//! both take the same settings ([`ServeConfig`]).
//!
//! # Who may read
//!
//! In this order, each request is checked for: its page's origin (`cors_origins`, 403;
//! [`cors`]), its token when a `token_file` is configured (401 without a valid one, 403 for a
//! feed the token may not read; [`access`]), then the feed: one that is neither configured
//! nor stored is answered 404, so a typo does not look like a quiet feed. Each client's
//! connection, resume id and end are logged at INFO (with the line of its token, never the
//! token); `/metrics` counts clients and events per feed ([`stats`]).
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
//! most [`db::PAGE_BYTES`] at a time, through a small shared pool of read-only connections.
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
//! open-file limit); the database is read through [`db::POOL`] connections, not one per client.

pub mod access;
mod client;
pub mod config;
pub mod cors;
mod db;
mod pg;
pub mod stats;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path as UrlPath, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::Extension;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use self::config::{ServeArgs, ServeConfig};
pub use self::db::{served_id, EventSource, PAGE_BYTES, POOL};
pub use self::stats::{ServeCollector, ServeStats};

use self::access::{Access, Verdict};
use self::client::{open_stream, Client};
use self::cors::Cors;
use self::db::{Frame, Store};
use self::stats::Refusal;
use crate::http_server::Hangup;
use crate::store::sqlite::open_read_only as open_event_db;

/// Bytes of a response hyper buffers in front of a client's socket.
pub const SOCKET_BUF_BYTES: usize = 64 * 1024;

/// Descriptors kept for everything that is not a client's socket (the database pool, the
/// listener, standard streams, the runtime's own).
const FD_RESERVE: u64 = 64;

/// Refusals (401, 403, 404) are logged one by one up to this many per [`LOG_WINDOW`], and
/// clients' connections and ends up to [`CONNECTIONS_LOGGED`]; past that they are counted, and
/// the count is logged with the next line.
const REFUSALS_LOGGED: u64 = 20;
const CONNECTIONS_LOGGED: u64 = 200;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// The longest `?type=` pattern a request may send.
const MAX_TYPE_PATTERN: usize = 1024;

/// Settings of a running server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub source: EventSource,
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

impl ServeOptions {
    pub fn new(source: &EventSource, c: &ServeConfig) -> ServeOptions {
        ServeOptions {
            source: source.clone(),
            heartbeat: c.heartbeat,
            retry: c.retry,
            poll_interval: c.poll_interval,
            client_buffer: c.client_buffer,
            client_buffer_bytes: c.client_buffer_bytes.as_usize(),
            max_buffered_bytes: c.max_buffered_bytes.as_usize(),
            max_lag: c.max_lag,
            max_lag_bytes: c.max_lag_bytes.as_usize(),
            max_clients: c.max_clients,
            header_timeout: c.header_timeout,
            send_timeout: c.send_timeout,
        }
    }
}

/// The feeds a server answers for besides those with stored events: the configured ones.
#[derive(Debug, Default)]
pub struct KnownFeeds(RwLock<BTreeSet<String>>);

impl KnownFeeds {
    pub fn set(&self, names: impl IntoIterator<Item = String>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = names.into_iter().collect();
    }

    fn contains(&self, name: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }
}

/// Everything the request handlers and client tasks share.
#[derive(Clone)]
struct Shared {
    options: Arc<ServeOptions>,
    live: broadcast::Sender<Arc<Frame>>,
    /// Bytes published to the ring so far.
    published: Arc<AtomicU64>,
    /// Bytes queued for all clients.
    queued: Arc<AtomicUsize>,
    store: Arc<Store>,
    shutdown: CancellationToken,
    access: Arc<Access>,
    cors: Arc<Cors>,
    feeds: Arc<KnownFeeds>,
    stats: Arc<ServeStats>,
    refusals: Arc<LogBudget>,
    /// The budget of the per-client connection lines (`client.rs`).
    connections: Arc<LogBudget>,
}

/// A running server, as `run` and the standalone command hold it.
pub struct ServeHandle {
    pub addr: SocketAddr,
    pub stats: Arc<ServeStats>,
    access: Arc<Access>,
    feeds: Arc<KnownFeeds>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ServeHandle {
    /// SIGHUP: reads the token file again (keeping the tokens in force if it cannot be
    /// read) and takes the feeds now configured.
    pub fn reload(&self, feeds: impl IntoIterator<Item = String>) {
        self.feeds.set(feeds);
        match self.access.reload() {
            Ok(Some(n)) => tracing::info!(tokens = n, "serve: token file read again"),
            Ok(None) => {}
            Err(e) => tracing::error!(
                "serve: the token file cannot be read, the tokens in force stay: {e}"
            ),
        }
    }

    /// Closes every client stream and the listener.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await.context("the serve task failed")?
    }
}

/// Starts serving `database` with `config`: checks the settings, reads the token file and
/// the TLS files, binds the listener, reads where the log ends and starts the poller (each
/// error names what to fix), then serves until [`ServeHandle::stop`]. `fd_reserve`
/// descriptors are kept for the rest of the process. `own_metrics`: answer `/metrics` with
/// serve's counters (the standalone command; under `run` the admin endpoint shows them).
pub async fn start(
    source: EventSource,
    config: &ServeConfig,
    known_feeds: impl IntoIterator<Item = String>,
    fd_reserve: u64,
    own_metrics: bool,
) -> anyhow::Result<ServeHandle> {
    let issues = config.validate(None);
    if let Some((key, message)) = issues.first() {
        anyhow::bail!("serve: `{key}`: {message}");
    }
    let access = match &config.token_file {
        Some(file) => {
            Access::from_file(file).map_err(|e| anyhow::anyhow!("serve: `token_file`: {e}"))?
        }
        None => Access::open(),
    };
    let cors = Cors::new(&config.cors_origins, config.cors_credentials)
        .map_err(|e| anyhow::anyhow!("serve: `cors_origins`: {e}"))?;
    let tls = match config.tls() {
        Some((cert, key)) => Some(
            crate::http_server::tls_config(cert, key)
                .map_err(|e| anyhow::anyhow!("serve: `tls_cert`/`tls_key`: {e}"))?,
        ),
        None => None,
    };
    if config.is_public() && !access.requires_token() {
        tracing::warn!(
            listen = %config.listen,
            "serve listens beyond this machine without a token_file: anyone who can reach the port reads every feed"
        );
    } else if config.is_public() && tls.is_none() {
        tracing::warn!(
            listen = %config.listen,
            "serve listens beyond this machine without TLS: tokens cross the network in clear text (set tls_cert and tls_key, or put a TLS proxy in front)"
        );
    }
    let mut options = ServeOptions::new(&source, config);
    // Every client holds a socket: never accept more clients than there are descriptors for.
    let limit = crate::open_files::soft_limit();
    let reserve = fd_reserve + FD_RESERVE + 3 * POOL as u64;
    options.max_clients = crate::open_files::serve_cap(config.max_clients, limit, reserve);
    if options.max_clients < config.max_clients {
        tracing::warn!(
            max_clients = config.max_clients,
            lowered_to = options.max_clients,
            open_file_limit = limit,
            "serve: max_clients lowered to fit the open-file limit (raise it with LimitNOFILE= or ulimit -n)"
        );
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("serve: cannot listen on {} (`listen`)", config.listen))?;
    let addr = listener.local_addr()?;
    let store = Store::open(&source).map_err(|e| anyhow::anyhow!("serve: {e}"))?;
    // Where the log ends now: the poller publishes what comes after.
    let end = store
        .last_pos()
        .await
        .with_context(|| format!("serve: cannot read the events of {}", source.shown()))?;
    let access = Arc::new(access);
    let feeds = Arc::new(KnownFeeds::default());
    feeds.set(known_feeds);
    let stats = Arc::new(ServeStats::default());
    let stop = CancellationToken::new();
    let (live, _) = broadcast::channel(options.max_lag.max(16));
    let shared = Shared {
        store: Arc::new(store),
        options: Arc::new(options),
        live,
        published: Arc::default(),
        queued: Arc::default(),
        shutdown: stop.clone(),
        access: access.clone(),
        cors: Arc::new(cors),
        feeds: feeds.clone(),
        stats: stats.clone(),
        refusals: Arc::new(LogBudget::new(REFUSALS_LOGGED)),
        connections: Arc::new(LogBudget::new(CONNECTIONS_LOGGED)),
    };
    let poller = match (&source, &*shared.store) {
        (EventSource::Sqlite(path), _) => {
            let (shared, path) = (shared.clone(), path.clone());
            Poller::Thread(
                std::thread::Builder::new()
                    .name("serve-poller".into())
                    .spawn(move || db::poll_loop(shared, path, end))
                    .context("serve: cannot start the poller thread")?,
            )
        }
        (_, Store::Postgres(pool)) => {
            Poller::Task(tokio::spawn(pg::tail(shared.clone(), pool.clone(), end)))
        }
        (_, Store::Sqlite(_)) => {
            anyhow::bail!("serve: internal error: the store is not the source")
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(
        database = %source.shown(),
        max_clients = shared.options.max_clients,
        tokens = shared.access.requires_token(),
        cors_origins = config.cors_origins.len(),
        "serve: listening on {scheme}://{addr} (GET /feeds/FEED/events)"
    );
    let task = tokio::spawn(serve(shared, listener, tls, own_metrics, poller));
    Ok(ServeHandle {
        addr,
        stats,
        access,
        feeds,
        stop,
        task,
    })
}

/// Serves on `listener` until `shared.shutdown` is cancelled, at most
/// `options.max_clients` connections at once; then waits for the poller to end.
async fn serve(
    shared: Shared,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    own_metrics: bool,
    poller: Poller,
) -> anyhow::Result<()> {
    let options = shared.options.clone();
    let limits = crate::http_server::Limits {
        name: "serve",
        header_timeout: options.header_timeout,
        max_buf_size: SOCKET_BUF_BYTES,
        retry_after_secs: options.retry.as_secs().max(1),
        tls,
    };
    let max_clients = options.max_clients;
    let shutdown = shared.shutdown.clone();
    let mut app = axum::Router::new()
        .route("/feeds/:feed/events", axum::routing::get(events))
        .route("/", axum::routing::get(index));
    if own_metrics {
        app = app.route("/metrics", axum::routing::get(metrics));
    }
    let app = app
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            cors_layer,
        ))
        .with_state(shared);
    crate::http_server::run(listener, app, limits, move || max_clients, shutdown.clone()).await;
    shutdown.cancel();
    match poller {
        Poller::Thread(t) => {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        Poller::Task(t) => {
            let _ = t.await;
        }
    }
    Ok(())
}

/// What publishes new rows: a thread for SQLite, a task for PostgreSQL.
enum Poller {
    Thread(std::thread::JoinHandle<()>),
    Task(JoinHandle<()>),
}

/// Answers preflights, refuses origins that are not allowed, names allowed ones on every
/// answer.
async fn cors_layer(State(shared): State<Shared>, request: Request, next: Next) -> Response {
    if request.method() == Method::OPTIONS {
        let answer = shared.cors.preflight(request.headers());
        if answer.status() == StatusCode::FORBIDDEN {
            let origin = request.headers().get("origin");
            shared.refuse(
                Refusal::Origin,
                None,
                format!("a preflight from {}", origin_text(origin)),
            );
        }
        return answer;
    }
    let origin = request.headers().get("origin").cloned();
    if !shared.cors.admits(request.headers()) {
        shared.refuse(Refusal::Origin, None, origin_text(origin.as_ref()));
        let mut r = plain(
            StatusCode::FORBIDDEN,
            "this origin may not read from this server (serve.cors_origins)\n".into(),
        );
        r.headers_mut()
            .insert("vary", HeaderValue::from_static("Origin"));
        return r;
    }
    let mut response = next.run(request).await;
    shared.cors.decorate(origin.as_ref(), &mut response);
    response
}

fn origin_text(origin: Option<&HeaderValue>) -> String {
    let text = origin.map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned());
    format!("origin {:?}", shown_name(&text.unwrap_or_default()))
}

/// A budget of log lines: up to `per_window` in each [`LOG_WINDOW`]; past that, lines are
/// counted, and the count goes with the next line logged. A client that loops on connecting,
/// or on being refused, cannot flood the log.
#[derive(Debug)]
pub(crate) struct LogBudget {
    per_window: u64,
    state: Mutex<(Instant, u64, u64)>,
}

impl LogBudget {
    fn new(per_window: u64) -> LogBudget {
        LogBudget {
            per_window,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// `Some(lines not logged before this one)` when this line may be logged.
    pub(crate) fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (since, logged, suppressed) = &mut *state;
        if since.elapsed() >= LOG_WINDOW {
            *since = Instant::now();
            *logged = 0;
        }
        if *logged >= self.per_window {
            *suppressed += 1;
            return None;
        }
        *logged += 1;
        Some(std::mem::take(suppressed))
    }
}

/// A name from a request, for a log line or an answer: at most 128 characters (then `…`),
/// control characters escaped.
fn shown_name(name: &str) -> String {
    let short: String = name.chars().take(128).collect();
    let more = if short.len() < name.len() { "…" } else { "" };
    format!("{}{more}", crate::text::escape_controls(&short))
}

impl Shared {
    /// Counts a refusal and logs it (within the refusal budget): `what` says who asked for
    /// what.
    fn refuse(&self, why: Refusal, feed: Option<&str>, what: String) {
        self.stats.refused(why);
        let Some(earlier) = self.refusals.admit() else {
            return;
        };
        let feed = feed.map_or_else(|| "-".to_string(), shown_name);
        tracing::info!(
            reason = why.label(),
            feed,
            not_logged_before = earlier,
            "serve: refused a request: {what}"
        );
    }
}

async fn index() -> &'static str {
    "sse-bridge serve: GET /feeds/{feed}/events (text/event-stream; optional ?type=GLOB, \
     resumes after the Last-Event-ID header, ?last_event_id= or ?lastEventId=; a token as \
     Authorization: Bearer or ?access_token= when the server requires one)\n"
}

async fn not_found() -> Response {
    plain(
        StatusCode::NOT_FOUND,
        "not found: streams are at /feeds/FEED/events\n".into(),
    )
}

fn plain(status: StatusCode, text: String) -> Response {
    let mut r = Response::new(Body::from(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The token a request presents: `Authorization: Bearer TOKEN`, else `?access_token=`.
fn presented_token<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    let header = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    header.or(query)
}

/// The access verdict as an answer: `Err` is the 401 or 403 to send.
fn authorize(
    shared: &Shared,
    headers: &HeaderMap,
    query_token: Option<&str>,
    feed: Option<&str>,
) -> Result<Option<usize>, Box<Response>> {
    match shared
        .access
        .check(presented_token(headers, query_token), feed)
    {
        Verdict::Allowed(grant) => Ok(grant.map(|g| g.line)),
        Verdict::Unauthenticated => {
            let what = if presented_token(headers, query_token).is_some() {
                "a token that is not in the token file"
            } else {
                "no token"
            };
            shared.refuse(Refusal::Unauthenticated, feed, what.into());
            let mut r = plain(
                StatusCode::UNAUTHORIZED,
                "a token is required: send `Authorization: Bearer TOKEN` or add \
                 `?access_token=TOKEN`\n"
                    .into(),
            );
            r.headers_mut().insert(
                "www-authenticate",
                HeaderValue::from_static("Bearer realm=\"sse-bridge serve\""),
            );
            Err(Box::new(r))
        }
        Verdict::Forbidden(grant) => {
            shared.refuse(
                Refusal::Forbidden,
                feed,
                format!("the token on line {} may not read this feed", grant.line),
            );
            Err(Box::new(plain(
                StatusCode::FORBIDDEN,
                "this token may not read this feed\n".into(),
            )))
        }
    }
}

/// `/metrics` of the server: its own counters (the admin endpoint shows the same under `run`).
async fn metrics(
    State(shared): State<Shared>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let token = query_param(query.as_deref(), "access_token");
    if let Err(refused) = authorize(&shared, &headers, token.as_deref(), None) {
        return *refused;
    }
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(ServeCollector(shared.stats.clone())));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::error!("encoding /metrics failed: {e}");
    }
    let mut r = Response::new(Body::from(out));
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static(crate::admin::metrics::CONTENT_TYPE),
    );
    r
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn events(
    State(shared): State<Shared>,
    hangup: Option<Extension<Hangup>>,
    peer: Option<ConnectInfo<SocketAddr>>,
    UrlPath(feed): UrlPath<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut type_text: Option<String> = None;
    let mut query_id: Option<String> = None;
    let mut query_token: Option<String> = None;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "type" => type_text = Some(v.into_owned()),
            // `lastEventId` is the name the EventSource API gives it, for pages that build
            // the URL themselves.
            "last_event_id" | "lastEventId" => query_id = Some(v.into_owned()),
            "access_token" => query_token = Some(v.into_owned()),
            _ => {}
        }
    }
    // Who asks comes first: nothing else is done for a request that may not read the feed.
    let token_line = match authorize(&shared, &headers, query_token.as_deref(), Some(&feed)) {
        Ok(line) => line,
        Err(refused) => return *refused,
    };
    let type_glob = match &type_text {
        Some(t) if t.len() > MAX_TYPE_PATTERN => {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("?type: longer than {MAX_TYPE_PATTERN} bytes\n"),
            )
        }
        Some(t) => match crate::route::compile_pattern(t) {
            Ok(g) => Some(g),
            Err(e) => return plain(StatusCode::BAD_REQUEST, format!("?type: {e}\n")),
        },
        None => None,
    };
    // The header is what an EventSource sends when it reconnects: it wins over the query.
    // Browsers send the id as UTF-8 (it is whatever the stream sent), not only ASCII.
    let header_id = match headers
        .get("last-event-id")
        .map(|v| std::str::from_utf8(v.as_bytes()))
    {
        Some(Ok(v)) => Some(v.to_string()),
        Some(Err(_)) => {
            return plain(
                StatusCode::BAD_REQUEST,
                "Last-Event-ID is not UTF-8 text\n".into(),
            )
        }
        None => None,
    };
    let resume = header_id.or(query_id).filter(|s| !s.is_empty());

    let configured = shared.feeds.contains(&feed);
    let found = shared
        .store
        .lookup(feed.clone(), configured, resume.clone())
        .await;
    let cursor = match (found, &resume) {
        (Err(e), _) => {
            tracing::error!(database = %shared.options.source.shown(), "{e}");
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the event database cannot be read\n".to_string(),
            );
        }
        (Ok((false, _)), _) => {
            // The name comes from the client: shortened and escaped wherever it is echoed.
            let name = shown_name(&feed);
            shared.refuse(Refusal::UnknownFeed, None, format!("no feed {name:?}"));
            return plain(
                StatusCode::NOT_FOUND,
                format!("no feed {name:?} here: it is neither configured nor stored\n"),
            );
        }
        (Ok((true, _)), None) => 0,
        (Ok((true, Some(pos))), Some(_)) => pos,
        (Ok((true, None)), Some(id)) => {
            return plain(
                StatusCode::GONE,
                format!(
                    "feed `{feed}` has no stored event with id {id:?}: reconnect without \
                     Last-Event-ID to start from the beginning of the stored log\n"
                ),
            );
        }
    };
    let client = Client {
        feed: Arc::from(feed),
        peer: peer.map(|ConnectInfo(p)| p),
        resume,
        types: type_text,
        token_line,
    };
    open_stream(
        &shared,
        client,
        type_glob,
        cursor,
        hangup.map(|Extension(h)| h),
    )
}

/// `sse-bridge serve`: serves until SIGTERM or SIGINT; SIGHUP re-reads the token file.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let source = args.source()?;
    // Settings errors name the flag, as the user wrote it.
    if let Some((key, message)) = args.config.validate(None).first() {
        let key = key.split('[').next().unwrap_or(key);
        let flag = match key {
            "cors_origins" => "cors-origin".to_string(),
            other => other.replace('_', "-"),
        };
        anyhow::bail!("--{flag}: {message}");
    }
    // Fail early, with the file named, if the database is not usable.
    if let EventSource::Sqlite(path) = &source {
        open_event_db(path)?;
    }
    // Every client holds a socket: raise the soft limit as `run` does.
    crate::open_files::raise_to_hard_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sse-bridge-serve")
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let handle = start(source, &args.config, args.feeds.clone(), 0, true).await?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => handle.reload(args.feeds.clone()),
            }
        }
        tracing::info!("stopping: closing client streams");
        handle.stop().await
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

    #[test]
    fn tokens_come_from_the_header_or_the_query() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_token(&h, None), None);
        assert_eq!(presented_token(&h, Some("q")), Some("q"));
        h.insert("authorization", HeaderValue::from_static("Bearer  abc "));
        assert_eq!(presented_token(&h, Some("q")), Some("abc"));
        h.insert("authorization", HeaderValue::from_static("bearer xyz"));
        assert_eq!(presented_token(&h, None), Some("xyz"));
        h.insert(
            "authorization",
            HeaderValue::from_static("Basic dXNlcjpwdw=="),
        );
        assert_eq!(presented_token(&h, Some("q")), Some("q"));
    }
}
