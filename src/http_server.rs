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
//!
//! With TLS settings ([`tls_config`]) it speaks HTTPS: the handshake must also finish within
//! `header_timeout`, and a connection over the cap is closed without an answer (a plaintext
//! 503 would mean nothing to a TLS client). Every request carries the client's address
//! (`axum::extract::ConnectInfo<SocketAddr>`) for the handlers' log lines.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
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
    /// Serve HTTPS with these settings ([`tls_config`]); `None`: plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// The TLS settings of a server from a PEM certificate chain and its private key. The error
/// names the file and what is wrong with it.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |path: &Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    let cert_pem = read(cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate in it (expected -----BEGIN CERTIFICATE-----)",
            cert.display()
        ));
    }
    let key_pem = read(key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "{}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1): {e}",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            format!(
                "{} and {} do not make a usable certificate and key: {e}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
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
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
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
            if limits.tls.is_none() {
                refuse(tcp, &refusing, &limits, cap);
            }
            continue;
        }
        open.count.fetch_add(1, Ordering::AcqRel);
        let guard = OpenGuard(open.clone());
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let stop = stop.clone();
        let tls = limits.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let handshake_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _guard = guard;
            match tls {
                None => serve_connection(TokioIo::new(tcp), peer, builder, app, stop).await,
                Some(acceptor) => {
                    let tls = tokio::select! {
                        r = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)) => r,
                        _ = stop.cancelled() => return,
                    };
                    match tls {
                        Ok(Ok(stream)) => {
                            serve_connection(TokioIo::new(stream), peer, builder, app, stop).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
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

/// Serves one connection until it ends, its handler hangs up, or the server stops.
async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    builder: hyper::server::conn::http1::Builder,
    app: axum::Router,
    stop: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let hangup = CancellationToken::new();
    let handle = Hangup(hangup.clone());
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(handle.clone());
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let mut app = app.clone();
        async move {
            Ok::<_, Infallible>(match tower_service::Service::call(&mut app, req).await {
                Ok(r) => r,
                Err(never) => match never {},
            })
        }
    });
    let conn = builder.serve_connection(io, service);
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
