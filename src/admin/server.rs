//! The admin HTTP server (axum): `/metrics`, `/healthz`, `/readyz`, `/feeds`, `/sinks`, `/tap`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use globset::GlobMatcher;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::Receiver;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::metrics::{self, snapshot_feeds};
use super::AdminConfig;
use crate::event::Event;
use crate::pipeline::FeedView;
use crate::sink::jsonl;
use crate::sse::status::ReadyState;
use crate::supervisor::Registry;
use crate::telemetry::lag::{LagTracker, SAMPLE_EVERY};

/// Concurrent `/tap` connections allowed.
const MAX_TAPS: usize = 16;

/// A tap sends what it has queued in chunks up to about this size.
const TAP_CHUNK_BYTES: usize = 64 * 1024;

/// How long stopping waits for open requests (metrics scrapes, taps ending) to finish.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Bytes of a response buffered in front of a connection's socket (a `/metrics` page of many
/// feeds is written in several rounds).
const ADMIN_BUF_BYTES: usize = 64 * 1024;

/// The connection cap, asked at every accept: `[admin] max_connections`, lowered to keep
/// descriptors for the feeds (see `open_files::admin_cap`); logged when it changes.
fn connection_cap(configured: usize, state: Arc<AdminState>) -> impl Fn() -> usize + Send {
    let limit = crate::open_files::soft_limit();
    let last = AtomicUsize::new(configured);
    move || {
        let feeds = state.feeds.load(Ordering::Relaxed);
        let cap = crate::open_files::admin_cap(configured, limit, feeds);
        if last.swap(cap, Ordering::Relaxed) != cap {
            if cap < configured {
                tracing::warn!(
                    max_connections = configured,
                    lowered_to = cap,
                    open_file_limit = limit,
                    feeds,
                    "admin endpoint: connection cap lowered to keep open-file descriptors for the feeds and sinks (`admin.max_connections`; raise the limit with LimitNOFILE= or ulimit -n)"
                );
            } else {
                tracing::info!(
                    max_connections = cap,
                    "admin endpoint: connection cap restored"
                );
            }
        }
        cap
    }
}

/// What the handlers share.
pub(super) struct AdminState {
    pub registry: Arc<Registry>,
    pub lag: LagTracker,
    pub taps: TapStats,
    /// Set once every feed and sink has started; cleared when the drain begins.
    running: AtomicBool,
    tap_enabled: bool,
    /// Cancelled when the server stops: ends the taps.
    stop: CancellationToken,
    /// Feeds running, as of the last lag sample: sizes the connection cap.
    feeds: AtomicUsize,
}

#[derive(Default)]
pub(super) struct TapStats {
    /// Live `/tap` connections.
    pub active: AtomicUsize,
    /// Events taps missed because they read too slowly.
    pub skipped: AtomicU64,
}

/// A running admin endpoint.
pub struct AdminServer {
    addr: SocketAddr,
    stop: CancellationToken,
    state: Arc<AdminState>,
    server: JoinHandle<()>,
    sampler: JoinHandle<()>,
}

impl AdminServer {
    /// Binds `config.listen` and serves `registry` until [`AdminServer::stop`]. Fails when the
    /// address cannot be bound (in use, not local, no permission).
    pub async fn start(config: &AdminConfig, registry: Arc<Registry>) -> anyhow::Result<Self> {
        let addr = config
            .addr()
            .map_err(|e| anyhow::anyhow!("key `admin.listen`: {e}"))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("admin endpoint: cannot listen on {addr} (`admin.listen`)"))?;
        let addr = listener.local_addr().unwrap_or(addr);
        if !addr.ip().is_loopback() {
            tracing::warn!(
                address = %addr,
                "the admin endpoint listens on a non-loopback address: anyone who can reach it can read metrics{}",
                if config.tap { " and tap event data" } else { "" }
            );
        }
        let stop = CancellationToken::new();
        let state = Arc::new(AdminState {
            registry,
            lag: LagTracker::default(),
            taps: TapStats::default(),
            running: AtomicBool::new(false),
            tap_enabled: config.tap,
            stop: stop.clone(),
            feeds: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .route("/", get(index))
            .route("/metrics", get(metrics_page))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/feeds", get(feeds))
            .route("/sinks", get(sinks))
            .route("/tap", get(tap))
            .with_state(state.clone());
        let limits = crate::http_server::Limits {
            name: "admin endpoint",
            header_timeout: config.header_timeout,
            max_buf_size: ADMIN_BUF_BYTES,
            retry_after_secs: 1,
            tls: None,
        };
        let cap = connection_cap(config.max_connections, state.clone());
        let server = tokio::spawn(crate::http_server::run(
            listener,
            app,
            limits,
            cap,
            stop.clone(),
        ));
        let shared = state.clone();
        let sampler = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(SAMPLE_EVERY);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let feeds = state.registry.feeds();
                state.feeds.store(feeds.len(), Ordering::Relaxed);
                let inputs: Vec<_> = feeds.iter().map(FeedView::lag_input).collect();
                state.lag.sample(&inputs, tokio::time::Instant::now());
            }
        });
        tracing::info!(
            address = %addr,
            "admin endpoint on http://{addr}/ (/metrics /healthz /readyz /feeds /sinks /tap)"
        );
        Ok(AdminServer {
            addr,
            stop,
            state: shared,
            server,
            sampler,
        })
    }

    /// Tells `/readyz` whether the bridge has started (every feed and sink) and is not
    /// draining; before and after, it is not ready whatever the feeds say.
    pub fn set_running(&self, running: bool) {
        self.state.running.store(running, Ordering::Relaxed);
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Ends the taps, lets open requests finish (briefly) and stops listening.
    pub async fn stop(mut self) {
        self.stop.cancel();
        self.sampler.abort();
        if tokio::time::timeout(STOP_GRACE, &mut self.server)
            .await
            .is_err()
        {
            self.server.abort();
        }
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    let mut body = value.to_string();
    body.push('\n');
    (status, [(CONTENT_TYPE, "application/json")], body).into_response()
}

fn text_response(status: StatusCode, text: String) -> Response {
    (status, [(CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Millis, true)
}

async fn index() -> Response {
    text_response(
        StatusCode::OK,
        concat!(
            "sse-bridge ",
            env!("CARGO_PKG_VERSION"),
            " admin endpoint\n\n",
            "/metrics   Prometheus metrics\n",
            "/healthz   200 while the process serves requests\n",
            "/readyz    200 when every feed is open (or stopped on purpose) and every sink healthy, else 503\n",
            "/feeds     the feeds as JSON\n",
            "/sinks     the sinks as JSON\n",
            "/tap       routed events live as JSON Lines (?feed=GLOB&type=GLOB)\n",
        )
        .to_string(),
    )
}

async fn metrics_page(State(state): State<Arc<AdminState>>) -> Response {
    (
        StatusCode::OK,
        [(CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(&state),
    )
        .into_response()
}

async fn healthz() -> Response {
    text_response(StatusCode::OK, "ok\n".to_string())
}

/// Whether the bridge is ready, and if not, why (one reason per feed or sink).
pub(super) fn readiness(registry: &Registry, running: bool) -> Vec<String> {
    let mut reasons = Vec::new();
    let feeds = registry.feeds();
    let fleet = registry.fleet();
    // In a fleet, an instance without feeds is a standby, ready once it has reached the
    // fleet's database; its readiness is that of the feeds it holds (ARCHITECTURE.md §9).
    let idle_is_fine = fleet.as_ref().is_some_and(|f| f.connected());
    if !running || (feeds.is_empty() && !idle_is_fine) {
        reasons.push("the bridge is starting or shutting down".to_string());
    }
    if let Some(fleet) = &fleet {
        if !fleet.connected() {
            reasons.push(format!(
                "instance `{}` cannot reach the fleet's database: it holds no lease it could renew",
                fleet.instance
            ));
        }
    }
    for f in &feeds {
        let s = f.status.get();
        if matches!(s.state, ReadyState::Open | ReadyState::Stopped) {
            continue;
        }
        let state = serde_json::to_value(s.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let name = &f.config.name;
        reasons.push(match s.last_error {
            Some(e) => {
                // Errors already name their feed.
                let prefix = format!("feed `{name}`: ");
                let e = e.strip_prefix(&prefix).unwrap_or(&e);
                format!("feed `{name}` is {state}; last error: {e}")
            }
            None => format!("feed `{name}` is {state}"),
        });
    }
    for (name, sink) in registry.sinks() {
        if !sink.gauge.health.healthy.load(Ordering::Relaxed) {
            reasons.push(match sink.gauge.health.last_error() {
                Some(e) => format!("sink `{name}` is failing: {e}"),
                None => format!("sink `{name}` is failing"),
            });
        }
    }
    reasons
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let reasons = readiness(&state.registry, state.running.load(Ordering::Relaxed));
    if reasons.is_empty() {
        json_response(StatusCode::OK, &json!({ "ready": true }))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "ready": false, "reasons": reasons }),
        )
    }
}

async fn feeds(State(state): State<Arc<AdminState>>) -> Response {
    let now = SystemTime::now();
    let fleet = state.registry.fleet();
    let leases = fleet.as_ref().map(|f| f.leases()).unwrap_or_default();
    let lease_of = |name: &str| leases.iter().find(|l| l.feed == name);
    let snapshots = snapshot_feeds(&state);
    let running: Vec<String> = snapshots
        .iter()
        .map(|f| f.view.config.name.clone())
        .collect();
    let mut feeds: Vec<Value> = snapshots
        .into_iter()
        .map(|f| {
            let st = &f.status;
            let stats = &f.view.stats;
            let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
            let url = url::Url::parse(&f.view.config.url)
                .map(|u| crate::sse::connection::display_url(&u))
                .unwrap_or_default();
            json!({
                "name": f.view.config.name,
                "url": url,
                "state": st.state,
                "last_event_id": st.last_event_id,
                "last_event_at": f.last_event_at.map(rfc3339),
                "last_event_age_seconds": f.last_event_at.map(|t| {
                    now.duration_since(t).unwrap_or_default().as_secs_f64()
                }),
                "reconnects": st.reconnects,
                "current_backoff_seconds": st.current_backoff.map(|d| d.as_secs_f64()),
                "last_error": st.last_error,
                "last_error_at": st.last_error_at.map(rfc3339),
                "open_since": st.open_since.map(rfc3339),
                "protocol": st.protocol,
                "connection": st.connection,
                "owner": fleet.as_ref().map(|f| f.instance.clone()),
                "epoch": lease_of(&f.view.config.name).map(|l| l.epoch),
                "errors": st.errors,
                "events": {
                    "received": load(&stats.received),
                    "routed": load(&stats.routed),
                    "misfit": load(&stats.misfit),
                    "dropped": load(&stats.dropped),
                    "unrouted": load(&stats.unrouted),
                },
                "data_bytes": load(&stats.data_bytes),
                "received_bytes": f.view.status.received_bytes(),
                "seq": f.head,
                "pending_events": f.pending,
                "checkpoint": {
                    "seq": f.committed,
                    "lag_events": f.head.saturating_sub(f.committed),
                    "lag_seconds": f.lag.as_secs_f64(),
                },
            })
        })
        .collect();
    // In a fleet, the feeds other instances read (or nobody does, for the moment).
    for lease in leases.iter().filter(|l| !running.contains(&l.feed)) {
        feeds.push(json!({
            "name": lease.feed,
            "state": if lease.owner.is_some() { "elsewhere" } else { "unowned" },
            "owner": lease.owner,
            "epoch": lease.epoch,
        }));
    }
    json_response(StatusCode::OK, &Value::Array(feeds))
}

async fn sinks(State(state): State<Arc<AdminState>>) -> Response {
    let sinks: Vec<Value> = state
        .registry
        .sinks()
        .into_iter()
        .map(|(name, s)| {
            let h = &s.gauge.health;
            let latency = h.write_seconds.snapshot();
            json!({
                "name": name,
                "type": s.kind,
                "healthy": h.healthy.load(Ordering::Relaxed),
                "last_error": h.last_error(),
                "queued": s.gauge.queued(),
                "capacity": s.gauge.max_events,
                "stored": h.written.load(Ordering::Relaxed),
                "dropped": h.dropped.load(Ordering::Relaxed),
                "write_errors": h.errors.load(Ordering::Relaxed),
                "writes": latency.count,
                "write_seconds_total": latency.sum_seconds,
            })
        })
        .collect();
    json_response(StatusCode::OK, &Value::Array(sinks))
}

fn glob(pattern: &str) -> Result<GlobMatcher, crate::route::PatternError> {
    crate::route::compile_pattern(pattern)
}

/// One `/tap` connection: a broadcast receiver and its filters.
struct Tap {
    rx: Receiver<Arc<Event>>,
    feed: Option<GlobMatcher>,
    event_type: Option<GlobMatcher>,
    admin: Arc<AdminState>,
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.admin.taps.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Tap {
    fn push(&self, event: &Event, buf: &mut Vec<u8>) {
        let wanted = self.feed.as_ref().is_none_or(|m| m.is_match(&*event.feed))
            && self
                .event_type
                .as_ref()
                .is_none_or(|m| m.is_match(&*event.event_type));
        if wanted {
            jsonl::encode(event, buf);
        }
    }

    /// The bridge moved on without this tap: say so in the stream and carry on.
    fn skipped(&self, n: u64, buf: &mut Vec<u8>) {
        self.admin.taps.skipped.fetch_add(n, Ordering::Relaxed);
        buf.extend_from_slice(format!("{{\"skipped\":{n}}}\n").as_bytes());
    }

    /// The next chunk of lines; `None` at shutdown.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            let first = tokio::select! {
                biased;
                _ = self.admin.stop.cancelled() => return None,
                r = self.rx.recv() => r,
            };
            let mut buf = Vec::new();
            match first {
                Ok(e) => self.push(&e, &mut buf),
                Err(RecvError::Lagged(n)) => self.skipped(n, &mut buf),
                Err(RecvError::Closed) => return None,
            }
            while buf.len() < TAP_CHUNK_BYTES {
                match self.rx.try_recv() {
                    Ok(e) => self.push(&e, &mut buf),
                    Err(TryRecvError::Lagged(n)) => self.skipped(n, &mut buf),
                    Err(_) => break,
                }
            }
            if !buf.is_empty() {
                return Some(Bytes::from(buf));
            }
        }
    }
}

async fn tap(State(state): State<Arc<AdminState>>, RawQuery(query): RawQuery) -> Response {
    if !state.tap_enabled {
        return text_response(
            StatusCode::FORBIDDEN,
            "the tap is disabled by `admin.tap = false`\n".to_string(),
        );
    }
    let mut feed = None;
    let mut event_type = None;
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let target = match &*key {
            "feed" => &mut feed,
            "type" => &mut event_type,
            other => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter `{other}`; expected `feed` and `type`\n"),
                )
            }
        };
        match glob(&value) {
            Ok(m) => *target = Some(m),
            Err(e) => return text_response(StatusCode::BAD_REQUEST, format!("{key}: {e}\n")),
        }
    }
    if state.taps.active.fetch_add(1, Ordering::Relaxed) >= MAX_TAPS {
        state.taps.active.fetch_sub(1, Ordering::Relaxed);
        return text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many taps (at most {MAX_TAPS} at once)\n"),
        );
    }
    // Subscribed before answering: every event routed from now on is in this tap.
    let tap = Tap {
        rx: state.registry.tap(),
        feed,
        event_type,
        admin: state.clone(),
    };
    let stream = futures_util::stream::unfold(tap, |mut tap| async move {
        let chunk = tap.next_chunk().await?;
        Some((Ok::<Bytes, Infallible>(chunk), tap))
    });
    (
        StatusCode::OK,
        [
            (CONTENT_TYPE, "application/x-ndjson"),
            (CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::broadcast;

    fn event(seq: u64, event_type: &str) -> Arc<Event> {
        Arc::new(Event::new(
            "f",
            event_type,
            &seq.to_string(),
            format!("d{seq}"),
            seq,
        ))
    }

    #[tokio::test]
    async fn a_slow_tap_skips_what_it_missed_says_so_and_carries_on() {
        let state = Arc::new(AdminState {
            registry: Arc::default(),
            lag: LagTracker::default(),
            taps: TapStats::default(),
            running: AtomicBool::new(true),
            tap_enabled: true,
            stop: CancellationToken::new(),
            feeds: AtomicUsize::new(0),
        });
        let (tx, rx) = broadcast::channel(4);
        state.taps.active.fetch_add(1, Ordering::Relaxed);
        let mut tap = Tap {
            rx,
            feed: Some(glob("f").expect("glob")),
            event_type: Some(glob("e*").expect("glob")),
            admin: state.clone(),
        };
        // The sender never waits: 10 events into room for 4.
        for seq in 1..=10 {
            let ty = if seq % 2 == 0 { "edit" } else { "log" };
            tx.send(event(seq, ty)).expect("send");
        }
        let chunk = tap.next_chunk().await.expect("chunk");
        let text = String::from_utf8(chunk.to_vec()).expect("UTF-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], r#"{"skipped":6}"#);
        // The file sink's format, from the oldest event still held.
        assert!(lines[1]
            .starts_with(r#"{"feed":"f","type":"edit","id":"8","data":"d8","received_at":""#));
        assert!(lines[2].contains(r#""seq":10}"#));
        assert_eq!(state.taps.skipped.load(Ordering::Relaxed), 6);
        // More events later still arrive.
        tx.send(event(11, "edit")).expect("send");
        let chunk = tap.next_chunk().await.expect("chunk");
        assert!(String::from_utf8_lossy(&chunk).contains(r#""seq":11}"#));
        // Shutdown ends the stream; dropping the tap unregisters it.
        state.stop.cancel();
        assert!(tap.next_chunk().await.is_none());
        drop(tap);
        assert_eq!(state.taps.active.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn not_ready_without_feeds_or_while_starting() {
        let registry = Registry::default();
        for running in [true, false] {
            let reasons = readiness(&registry, running);
            assert_eq!(reasons.len(), 1);
            assert!(reasons[0].contains("starting or shutting down"));
        }
    }
}
