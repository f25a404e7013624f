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
    /// Closed, failed, or told to go away: takes no new stream.
    closed: Arc<AtomicBool>,
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
    /// A free slot on an open connection.
    fn checkout(&self) -> Option<Slot> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| !c.closed.load(Ordering::Relaxed));
        conns.iter().find_map(|c| {
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
            k == key
                || Arc::strong_count(o) > 1
                || (!crowded && o.http1_only.load(Ordering::Relaxed))
                || !o.conns.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
        });
        origins.entry(key.clone()).or_default().clone()
    }

    /// Whether the origin answered HTTP/1.1 when offered both (a request with `auto` then goes
    /// straight to a connection of its own).
    pub fn prefers_http1(&self, key: &OriginKey) -> bool {
        self.origin(key).http1_only.load(Ordering::Relaxed)
    }

    /// Sends `request` as a stream on a connection to `key`'s origin, opening one with `open`
    /// when none has a free slot (one opening per origin at a time; waiting for it is bounded by
    /// `wait`). `open` may answer that the server chose HTTP/1.1: then that connection is
    /// returned for the caller to use.
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
        let mut retries = 0;
        loop {
            let slot = match origin.checkout() {
                Some(slot) => slot,
                None => {
                    let gate = tokio::time::timeout(wait, origin.opening.lock())
                        .await
                        .map_err(|_| TransportError::ConnectTimeout {
                            timeout: wait,
                            host: key.host.clone(),
                            port: key.port,
                        })?;
                    match origin.checkout() {
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
                                origin.http1_only.store(false, Ordering::Relaxed);
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
            match send(&slot, build_request(request)?, request.body).await {
                Ok(response) => return Ok(Outcome::Http2(response, slot)),
                Err(e) if unprocessed(&e) && retries < UNPROCESSED_RETRIES => {
                    // The server did not take the stream (GOAWAY, refused): the connection
                    // takes no more, and the request goes again at once, to another one.
                    retries += 1;
                    if e.is_go_away() {
                        slot.conn.closed.store(true, Ordering::Relaxed);
                    }
                    tracing::debug!(origin = %key.shown(), connection = slot.conn.id, "stream not processed, sent again: {e}");
                    drop(slot);
                    let jitter = rand::random::<u64>() % 50;
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(e) => {
                    if e.is_go_away() || e.is_io() {
                        slot.conn.closed.store(true, Ordering::Relaxed);
                    }
                    return Err(TransportError::Http2 { source: e });
                }
            }
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
            if since.elapsed() >= IDLE_CLOSE {
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
    let mut builder = http::Request::builder()
        .method(request.method.clone())
        .uri(request_uri(request.url));
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
    }
    builder
        .body(())
        .map_err(|e| TransportError::InvalidRequest(format!("not an HTTP/2 request: {e}")))
}

/// Sends the request on the slot's connection and waits for the response head.
async fn send(
    slot: &Slot,
    req: http::Request<()>,
    body: Option<&[u8]>,
) -> Result<http::Response<h2::RecvStream>, h2::Error> {
    let mut sender = slot.conn.send.clone().ready().await?;
    let body = body.filter(|b| !b.is_empty());
    let (response, mut stream) = sender.send_request(req, body.is_none())?;
    if let Some(body) = body {
        stream.send_data(Bytes::copy_from_slice(body), true)?;
    }
    response.await
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

/// The URI of an HTTP/2 request: scheme, authority and path with query, without userinfo.
fn request_uri(url: &url::Url) -> String {
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        Some(h) => h.to_string(),
        None => String::new(),
    };
    let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
    let target = if target.is_empty() { "/" } else { target };
    match url.port() {
        Some(port) => format!("{}://{host}:{port}{target}", url.scheme()),
        None => format!("{}://{host}{target}", url.scheme()),
    }
}
