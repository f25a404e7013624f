//! HTTP/2: the feeds of one origin as streams on shared connections (ARCHITECTURE.md §3).
//!
//! A [`Pool`] keeps, per [`OriginKey`] (scheme, host, port, TLS settings, proxy), the open
//! HTTP/2 connections. A request takes a stream slot on a connection that has one free; when
//! every connection is at its limit (the server's `SETTINGS_MAX_CONCURRENT_STREAMS`, at most
//! [`MAX_STREAMS_PER_CONNECTION`]) another connection is opened instead of queueing the stream.
//! Only one connection per origin is being opened at a time, so that 200 feeds starting at
//! once open two connections, not 200.
//!
//! Built on the `h2` crate (the HTTP/2 implementation under hyper's `client::conn::http2`)
//! rather than hyper's wrapper, because hyper does not expose the server's stream limit, and
//! opening another connection at that limit (instead of queueing) needs it.
//!
//! - **Flow control:** each stream's receive window is [`STREAM_WINDOW`]; the body releases
//!   window only as the feed consumes bytes ([`body::H2Body`]), so a feed whose sink is stalled
//!   stops its own stream and nothing else. The connection window is the stream window times
//!   the most streams a connection carries, so stalled streams can never use it all up.
//! - **Keepalive:** a PING every [`PING_INTERVAL`]; no answer within [`PING_TIMEOUT`] closes the
//!   connection, and its feeds reconnect with their Last-Event-ID.
//! - **GOAWAY:** the connection takes no new stream; a request the server did not process
//!   (refused, or above the GOAWAY's last stream) is retried at once on another connection, with
//!   a little jitter; streams already open run until the server ends them, and their feeds
//!   then reconnect as after any end of stream.
//! - **RST_STREAM:** an error for that stream's feed alone (a network error: it reconnects).
//! - A connection with no stream for [`IDLE_CLOSE`] is closed.

pub mod body;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};

use super::connect::Stream;
use super::TransportError;

/// The receive window of one stream: what a server may send a feed before the feed consumed
/// it. Small, so that memory stays low whatever the server does.
pub const STREAM_WINDOW: u32 = 128 * 1024;

/// At most this many streams on one connection, whatever the server allows: it sizes the
/// connection window (`STREAM_WINDOW` times this, 16 MiB).
pub const MAX_STREAMS_PER_CONNECTION: usize = 128;

/// The connection's receive window: every stream's window fits in it, so a stalled stream
/// never holds back the others (ARCHITECTURE.md §3).
const CONNECTION_WINDOW: u32 = STREAM_WINDOW * MAX_STREAMS_PER_CONNECTION as u32;

/// A PING this often on every connection.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);
/// A PING unanswered this long closes the connection.
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// A connection without streams this long is closed.
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// The stream count of a connection closed for being idle: above any limit, so no request
/// takes a slot on it.
const IDLE_CLOSED: usize = usize::MAX / 2;

/// h2 closes a connection whose buffered DATA frames are too many small ones (each frame under
/// 256 bytes costs 256 less its length until the feed reads it): enough for every stream's
/// full window in frames of 64 bytes, so that feeds stalled together (a sink down) keep their
/// connection (h2's default, half the connection window, would end it after a few). About 48
/// MiB of budget; the windows bound what it can hold anyway.
const DATA_FRAME_BUDGET: usize =
    MAX_STREAMS_PER_CONNECTION * (STREAM_WINDOW as usize / 64) * (256 - 64);

/// Largest response header list accepted (as the HTTP/1.1 head limit).
const MAX_HEADER_LIST: u32 = 64 * 1024;

/// Origins remembered without a connection (their protocol choice), at most.
const MAX_REMEMBERED_ORIGINS: usize = 4096;

/// A request the server did not process is retried this many times at once.
const UNPROCESSED_RETRIES: usize = 3;

/// What makes connections shareable: the same origin, reached the same way.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OriginKey {
    pub scheme: String,
    pub host: String,
    pub port: u16,
    /// The TLS settings' identity (a feed with a `ca_file` has its own).
    pub tls: usize,
    /// The proxy the connection goes through, if any.
    pub proxy: Option<String>,
}

impl OriginKey {
    fn shown(&self) -> String {
        format!("{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// One HTTP/2 connection of the pool.
#[derive(Debug)]
pub struct Conn {
    /// Unique in the process: `/feeds` shows which feeds share a connection.
    pub id: u64,
    send: h2::client::SendRequest<Bytes>,
    /// Streams open (or being opened) on it.
    active: AtomicUsize,
    /// Ended (failed, closed, its driver finished): nothing works on it any more.
    closed: Arc<AtomicBool>,
    /// Takes no new stream (the server sent GOAWAY, a request could not be sent on it); the
    /// streams open on it go on, and keepalive keeps checking it.
    draining: AtomicBool,
    driver: tokio::task::AbortHandle,
}

impl Conn {
    /// How many streams the connection may carry now.
    fn limit(&self) -> usize {
        self.send
            .current_max_send_streams()
            .min(MAX_STREAMS_PER_CONNECTION)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.driver.abort();
    }

    /// Whether a new stream may go on it.
    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
    }

    /// Open streams.
    pub fn streams(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// A stream slot on a connection, freed when dropped (with the stream's body).
#[derive(Debug)]
pub struct Slot {
    conn: Arc<Conn>,
}

impl Slot {
    pub fn connection(&self) -> u64 {
        self.conn.id
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conn.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Origin {
    conns: Mutex<Vec<Arc<Conn>>>,
    /// Held while a connection to this origin is being opened.
    opening: tokio::sync::Mutex<()>,
    /// The server chose HTTP/1.1 when offered both: requests with `auto` skip the wait for
    /// [`Origin::opening`].
    http1_only: AtomicBool,
}

impl Origin {
    /// A free slot on a usable connection other than `exclude`.
    fn checkout(&self, exclude: Option<u64>) -> Option<Slot> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| !c.closed.load(Ordering::Relaxed));
        conns.iter().find_map(|c| {
            if !c.usable() || Some(c.id) == exclude {
                return None;
            }
            let mut n = c.active.load(Ordering::Relaxed);
            loop {
                if n >= c.limit() {
                    return None;
                }
                match c
                    .active
                    .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
                {
                    Ok(_) => return Some(Slot { conn: c.clone() }),
                    Err(now) => n = now,
                }
            }
        })
    }
}

/// Counts connections opened, for the process's connection ids.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// The next connection id (HTTP/1.1 connections are numbered from the same counter).
pub fn next_connection_id() -> u64 {
    NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed)
}

/// The HTTP/2 connections of every origin.
#[derive(Debug, Default)]
pub struct Pool {
    origins: Mutex<HashMap<OriginKey, Arc<Origin>>>,
}

/// What opening a connection gave: HTTP/2, or (ALPN chose it) HTTP/1.1 on this stream.
pub enum Opened {
    Http2(Stream),
    Http1(Stream),
}

/// The outcome of [`Pool::request`].
pub enum Outcome {
    /// The response head, the body and the slot its stream holds.
    Http2(http::Response<h2::RecvStream>, Slot),
    /// A connection on which to speak HTTP/1.1 instead.
    Http1(Stream),
    /// The origin answers HTTP/1.1: open a connection of its own.
    UseHttp1,
}

/// A request as HTTP/2 sends it.
pub struct H2Request<'a> {
    pub method: &'a Method,
    pub url: &'a url::Url,
    pub headers: &'a HeaderMap,
    pub body: Option<&'a [u8]>,
}

impl Pool {
    fn origin(&self, key: &OriginKey) -> Arc<Origin> {
        let mut origins = self.origins.lock().unwrap_or_else(|p| p.into_inner());
        // Origins without connections are forgotten (those known to answer HTTP/1.1 too, past
        // a few thousand), so that redirects to ever new origins cannot grow the map; never one
        // a request is using (opening its first connection, say), or a second would open.
        let crowded = origins.len() > MAX_REMEMBERED_ORIGINS;
        origins.retain(|k, o| {
            // (An origin whose connections all ended is forgotten too.)
            k == key
                || Arc::strong_count(o) > 1
                || (!crowded && o.http1_only.load(Ordering::Relaxed))
                || o.conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .any(|c| !c.closed.load(Ordering::Relaxed))
        });
        origins.entry(key.clone()).or_default().clone()
    }

    /// Sends `request` as a stream on a connection to `key`'s origin, opening one with `open`
    /// when none has a free slot (one opening per origin at a time; `wait` bounds the PING
    /// after a handshake). `open` may answer that the server chose HTTP/1.1: then that
    /// connection is returned for the caller to use, and later callers are told to open their
    /// own.
    pub async fn request<F, Fut>(
        &self,
        key: &OriginKey,
        request: &H2Request<'_>,
        wait: Duration,
        open: F,
    ) -> Result<Outcome, TransportError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Opened, TransportError>>,
    {
        let origin = self.origin(key);
        if origin.http1_only.load(Ordering::Relaxed) {
            // The origin answered HTTP/1.1 when offered both: no wait for the gate.
            return Ok(Outcome::UseHttp1);
        }
        let mut retries = 0;
        // After a refusal, the connection that refused is not asked again at once.
        let mut exclude: Option<u64> = None;
        loop {
            let slot = match origin.checkout(exclude) {
                Some(slot) => slot,
                None => {
                    // One opening per origin at a time; the caller's header timeout bounds
                    // the wait.
                    let gate = origin.opening.lock().await;
                    if origin.http1_only.load(Ordering::Relaxed) {
                        // Whoever held the gate found HTTP/1.1: connect outside it.
                        return Ok(Outcome::UseHttp1);
                    }
                    match origin.checkout(exclude) {
                        Some(slot) => slot,
                        None => match open().await? {
                            Opened::Http1(stream) => {
                                origin.http1_only.store(true, Ordering::Relaxed);
                                return Ok(Outcome::Http1(stream));
                            }
                            Opened::Http2(stream) => {
                                let (conn, ping) = handshake(key, stream, wait).await?;
                                if conn.limit() == 0 {
                                    // Nothing could ever be sent on it: an error now, not a
                                    // stream queued until the header timeout.
                                    conn.close();
                                    return Err(TransportError::Http2NoStreams);
                                }
                                conn.active.fetch_add(1, Ordering::AcqRel);
                                let slot = Slot { conn: conn.clone() };
                                origin
                                    .conns
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(conn.clone());
                                tokio::spawn(keepalive(Arc::downgrade(&conn), ping));
                                drop(gate);
                                slot
                            }
                        },
                    }
                }
            };
            let retry = match send(&slot, build_request(request)?, request.body).await {
                Ok(response) => return Ok(Outcome::Http2(response, slot)),
                // It never left: the connection is broken or going away, and the request is
                // safe to send elsewhere.
                Err(Sent::Not(e)) => {
                    slot.conn.draining.store(true, Ordering::Relaxed);
                    e
                }
                // The server did not take the stream (GOAWAY, refused).
                Err(Sent::Yes(e)) if unprocessed(&e) => {
                    if e.is_go_away() {
                        slot.conn.draining.store(true, Ordering::Relaxed);
                    }
                    e
                }
                Err(Sent::Yes(e)) => {
                    if e.is_go_away() {
                        slot.conn.draining.store(true, Ordering::Relaxed);
                    }
                    if e.is_io() {
                        slot.conn.closed.store(true, Ordering::Relaxed);
                    }
                    return Err(TransportError::Http2 { source: e });
                }
            };
            if retries >= UNPROCESSED_RETRIES {
                return Err(TransportError::Http2 { source: retry });
            }
            retries += 1;
            exclude = Some(slot.conn.id);
            tracing::debug!(origin = %key.shown(), connection = slot.conn.id, "stream not processed, sent again: {retry}");
            drop(slot);
            let jitter = rand::random::<u64>() % 50;
            tokio::time::sleep(Duration::from_millis(jitter)).await;
        }
    }
}

/// Whether the server certainly did not process the request: refused, or cut by a GOAWAY
/// before the response head (RFC 9113 §8.7).
fn unprocessed(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote())
}

/// The HTTP/2 handshake on `stream`, then one PING answered: the server's SETTINGS (sent
/// first) are then applied, so the stream limit is known before the connection is shared.
async fn handshake(
    key: &OriginKey,
    stream: Stream,
    wait: Duration,
) -> Result<(Arc<Conn>, Option<h2::PingPong>), TransportError> {
    let failed = |source: h2::Error| TransportError::Http2 { source };
    let (send, mut connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(64 * 1024)
        .enable_push(false)
        .data_frame_budget(DATA_FRAME_BUDGET)
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(failed)?;
    let ping = connection.ping_pong();
    let closed = Arc::new(AtomicBool::new(false));
    let id = next_connection_id();
    let driver = {
        let closed = closed.clone();
        let origin = key.shown();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(origin, connection = id, "HTTP/2 connection ended: {e}");
            }
            closed.store(true, Ordering::Relaxed);
        })
    };
    let conn = Arc::new(Conn {
        id,
        send,
        active: AtomicUsize::new(0),
        closed,
        draining: AtomicBool::new(false),
        driver: driver.abort_handle(),
    });
    let Some(mut ping) = ping else {
        return Ok((conn, None));
    };
    match tokio::time::timeout(wait, ping.ping(h2::Ping::opaque())).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            conn.close();
            return Err(failed(e));
        }
        Err(_) => {
            conn.close();
            return Err(TransportError::ConnectTimeout {
                timeout: wait,
                host: key.host.clone(),
                port: key.port,
            });
        }
    }
    tracing::debug!(origin = %key.shown(), connection = conn.id, streams = conn.limit(), "HTTP/2 connection open");
    Ok((conn, Some(ping)))
}

/// Keeps a connection alive while it is used: PINGs, and a close once idle.
async fn keepalive(conn: Weak<Conn>, mut ping: Option<h2::PingPong>) {
    let Some(id) = conn.upgrade().map(|c| c.id) else {
        return;
    };
    let mut idle_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(PING_INTERVAL.min(IDLE_CLOSE)).await;
        let Some(c) = conn.upgrade() else { return };
        if c.closed.load(Ordering::Relaxed) {
            return;
        }
        if c.streams() == 0 {
            let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
            // Closed only if no request takes a slot meanwhile: the count is swapped for one
            // under which no request can take a slot.
            if since.elapsed() >= IDLE_CLOSE
                && c.active
                    .compare_exchange(0, IDLE_CLOSED, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                c.close();
                return;
            }
        } else {
            idle_since = None;
        }
        if let Some(p) = ping.as_mut() {
            match tokio::time::timeout(PING_TIMEOUT, p.ping(h2::Ping::opaque())).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => {
                    tracing::debug!(
                        connection = id,
                        "HTTP/2 PING unanswered: closing the connection"
                    );
                    c.close();
                    return;
                }
            }
        }
    }
}

/// The request as HTTP/2 sends it: the URI with scheme and authority, no connection-specific
/// fields.
fn build_request(request: &H2Request<'_>) -> Result<http::Request<()>, TransportError> {
    // A `Host` the feed sets is the authority, as over HTTP/1.1 it is the `Host` line.
    let host = request
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok());
    let mut builder = http::Request::builder()
        .method(request.method.clone())
        .uri(request_uri(request.url, host));
    if let Some(headers) = builder.headers_mut() {
        for (name, value) in request.headers {
            // Connection-specific fields do not exist in HTTP/2 (RFC 9113 §8.2.2); `Host` is
            // the `:authority` pseudo-header.
            if is_connection_specific(name) {
                continue;
            }
            headers.append(name.clone(), value.clone());
        }
        if !headers.contains_key(http::header::USER_AGENT) {
            headers.insert(
                http::header::USER_AGENT,
                http::HeaderValue::from_static(super::http1::head::USER_AGENT),
            );
        }
        // Its length, as over HTTP/1.1 (0 for a POST without one: some servers want it).
        if let Some(body) = request.body {
            headers.insert(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from(body.len()),
            );
        }
    }
    builder
        .body(())
        .map_err(|e| TransportError::InvalidRequest(format!("not an HTTP/2 request: {e}")))
}

/// Whether a failed request had left.
enum Sent {
    /// It never left (the connection was already broken or going away).
    Not(h2::Error),
    /// It left; the server may have seen it.
    Yes(h2::Error),
}

/// Sends the request on the slot's connection and waits for the response head.
async fn send(
    slot: &Slot,
    req: http::Request<()>,
    body: Option<&[u8]>,
) -> Result<http::Response<h2::RecvStream>, Sent> {
    let mut sender = slot.conn.send.clone().ready().await.map_err(Sent::Not)?;
    let body = body.filter(|b| !b.is_empty());
    let (response, mut stream) = sender
        .send_request(req, body.is_none())
        .map_err(Sent::Not)?;
    if let Some(body) = body {
        stream
            .send_data(Bytes::copy_from_slice(body), true)
            .map_err(Sent::Yes)?;
    }
    response.await.map_err(Sent::Yes)
}

fn is_connection_specific(name: &http::HeaderName) -> bool {
    use http::header::{CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE};
    name == CONNECTION
        || name == HOST
        || name == TE
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// The URI of an HTTP/2 request: scheme, authority (`host` when the feed set a `Host`) and
/// path with query, without userinfo.
fn request_uri(url: &url::Url, host: Option<&str>) -> String {
    let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
    let target = if target.is_empty() { "/" } else { target };
    if let Some(authority) = host {
        return format!("{}://{authority}{target}", url.scheme());
    }
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        Some(h) => h.to_string(),
        None => String::new(),
    };
    match url.port() {
        Some(port) => format!("{}://{host}:{port}{target}", url.scheme()),
        None => format!("{}://{host}{target}", url.scheme()),
    }
}
