//! The HTTP/1.1 server loop of `serve` and the admin endpoint: an accept loop with a cap on
//! concurrent connections, a header-read timeout, bounded per-connection buffers, and a way for
//! a handler to hang up on its client.
//!
//! Local clients are untrusted (ARCHITECTURE.md, "Hostile input and bounded resources"): a
//! connection that sends half a request, or never reads its response, must not pin a
//! descriptor or memory for ever. So:
//! - at most `cap()` connections are served at once; one over the cap is answered at once with
//!   `503 Service Unavailable` and `Retry-After`, then closed (never queued, never read);
//! - a request head must arrive within `header_timeout` of the connection's start, or of the
//!   end of the previous response on a kept-alive connection (so an idle keep-alive connection
//!   is closed after the same time);
//! - hyper buffers at most about `max_buf_size` bytes of a response in front of the socket;
//! - a handler can hang up ([`Hangup`]): the response gets a short grace to flush, then the
//!   socket is closed whether or not the client read it.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long a connection that was hung up on gets to flush what it was sent.
const HANGUP_GRACE: Duration = Duration::from_secs(5);

/// How long stopping waits for open responses to finish before closing their sockets.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Refusals (503 being written) in progress at once; beyond that, a connection over the cap
/// is closed without an answer.
const MAX_REFUSING: usize = 32;

/// How long a refusal may take: write the 503, then drain what the client sends until it closes.
const REFUSE_LINGER: Duration = Duration::from_secs(1);

/// Refusals and accept errors are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The settings of one server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// What the logs and the 503 call it (`serve`, `admin endpoint`).
    pub name: &'static str,
    /// Time allowed for a request head (and for the next one on a kept-alive connection).
    pub header_timeout: Duration,
    /// Bytes of a response hyper buffers in front of the socket (at least 8 KiB).
    pub max_buf_size: usize,
    /// `Retry-After` of the 503 sent over the cap, in seconds.
    pub retry_after_secs: u64,
}

/// Hangs up on the connection a request came on: the response in progress gets a short grace
/// to flush (so a stream that ended is seen to end), then the socket is closed. Every request
/// carries one in its extensions (`axum::Extension<Hangup>`).
#[derive(Clone, Debug)]
pub struct Hangup(CancellationToken);

impl Hangup {
    pub fn hang_up(&self) {
        self.0.cancel();
    }
}

/// Counts open connections; notifies when one closes.
#[derive(Default)]
struct Open {
    count: AtomicUsize,
    closed: Notify,
}

struct OpenGuard(Arc<Open>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.closed.notify_waiters();
    }
}

/// Serves `app` on `listener` until `stop` is cancelled, at most `cap()` connections at once
/// (`cap` is asked at every accept, so it may follow the descriptors in use). Then lets open
/// responses finish for a moment and returns.
pub async fn run(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    cap: impl Fn() -> usize + Send + 'static,
    stop: CancellationToken,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_buf_size.max(8 * 1024))
        .keep_alive(true);
    let open = Arc::new(Open::default());
    let refusing = Arc::new(AtomicUsize::new(0));
    let mut refused = 0u64;
    let mut refused_logged: Option<Instant> = None;
    let mut accept_error_logged: Option<Instant> = None;
    let due = |at: Option<Instant>| at.is_none_or(|t| t.elapsed() >= LOG_EVERY);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) or memory: the socket stays readable, so
                // retrying at once would spin. Connections closing will free some.
                if due(accept_error_logged) {
                    tracing::warn!("{}: cannot accept a connection: {e}", limits.name);
                    accept_error_logged = Some(Instant::now());
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
        };
        let cap = cap();
        if open.count.load(Ordering::Acquire) >= cap {
            refused += 1;
            if due(refused_logged) {
                tracing::warn!(
                    max_connections = cap,
                    refused,
                    "{}: refusing connections over the cap (503)",
                    limits.name
                );
                refused_logged = Some(Instant::now());
                refused = 0;
            }
            refuse(tcp, &refusing, &limits, cap);
            continue;
        }
        open.count.fetch_add(1, Ordering::AcqRel);
        let guard = OpenGuard(open.clone());
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let hangup = CancellationToken::new();
            let handle = Hangup(hangup.clone());
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(handle.clone());
                let mut app = app.clone();
                async move {
                    Ok::<_, Infallible>(match tower_service::Service::call(&mut app, req).await {
                        Ok(r) => r,
                        Err(never) => match never {},
                    })
                }
            });
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            let grace = tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("connection ended: {e}");
                    }
                    return;
                }
                _ = hangup.cancelled() => HANGUP_GRACE,
                _ = stop.cancelled() => STOP_GRACE,
            };
            conn.as_mut().graceful_shutdown();
            // Past the grace, dropping the connection closes the socket.
            let _ = tokio::time::timeout(grace, conn.as_mut()).await;
        });
    }
    // Stopping: every connection was told (`stop`) and closes within STOP_GRACE.
    let deadline = tokio::time::Instant::now() + STOP_GRACE + Duration::from_millis(200);
    loop {
        let closed = open.closed.notified();
        if open.count.load(Ordering::Acquire) == 0 {
            break;
        }
        if tokio::time::timeout_at(deadline, closed).await.is_err() {
            break;
        }
    }
}

/// Answers a connection over the cap with a 503 and closes it, without reading the request
/// (a bounded number at once; beyond that, it is closed without an answer).
fn refuse(mut tcp: TcpStream, refusing: &Arc<AtomicUsize>, limits: &Limits, cap: usize) {
    if refusing.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSING {
        refusing.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let body = format!(
        "{}: too many connections (at most {cap} at once); retry later\n",
        limits.name
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Retry-After: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        limits.retry_after_secs,
        body.len()
    );
    let refusing = refusing.clone();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REFUSE_LINGER, async {
            tcp.write_all(response.as_bytes()).await?;
            tcp.shutdown().await?;
            // Closing with unread bytes would reset the connection, and the client might lose
            // the answer: read (and drop) what it sends until it closes, briefly.
            let mut buf = [0u8; 1024];
            while tcp.read(&mut buf).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
        refusing.fetch_sub(1, Ordering::AcqRel);
    });
}
