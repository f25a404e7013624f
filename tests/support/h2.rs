//! An HTTP/2 event-stream server on 127.0.0.1 for the HTTP/2 tests: hyperium's `h2` server (the
//! one under hyper's), over TLS with a test CA (ALPN `h2`) or in clear text with prior knowledge
//! (h2c). Every path is a feed: `/NAME` streams `id: N` / `data: NAME N` events after the
//! request's `Last-Event-ID`, `per_request` of them (then ends the stream) or without end.
//! The test can count connections, send GOAWAY, reset one feed's stream, and make a feed send
//! large events as fast as flow control lets it.

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::SendStream;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// TLS with a certificate from a test CA (ALPN `h2`); otherwise h2c.
    pub tls: bool,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub max_streams: u32,
    /// Events per response before the stream ends; `None`: without end.
    pub per_request: Option<u64>,
    /// Pause between events.
    pub pause: Duration,
    /// The size of each event's data (at least the `NAME N` text).
    pub data_size: usize,
    /// No events: a `: connected` comment, then one every so often (an idle feed).
    pub heartbeat: Option<Duration>,
    /// A fixed body instead of generated events: sent in 64 KiB pieces as flow control allows,
    /// then a heartbeat every second (the benchmark's stream).
    pub body: Option<Bytes>,
    /// Bytes of junk response header (`x-junk-N` fields of 1 KiB), as a hostile server sends.
    pub junk_headers: usize,
    /// The first this many streams are refused (RST_STREAM REFUSED_STREAM, before any
    /// response): not processed, so a client may send them again at once.
    pub refuse: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tls: false,
            max_streams: 100,
            per_request: None,
            pause: Duration::from_millis(20),
            data_size: 0,
            heartbeat: None,
            refuse: 0,
            junk_headers: 0,
            body: None,
        }
    }
}

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Record {
    /// When the request arrived.
    pub at: std::time::Instant,
    pub path: String,
    pub last_event_id: Option<String>,
    /// Which connection (numbered from 1 in accept order).
    pub connection: usize,
    pub user_agent: Option<String>,
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<Record>>,
    connections: AtomicUsize,
    /// Streams refused so far.
    refused: AtomicUsize,
    /// Per path: reset its stream(s) now.
    resets: Mutex<HashMap<String, Arc<Notify>>>,
    /// Events sent, per path.
    sent: Mutex<HashMap<String, u64>>,
}

pub struct H2Server {
    pub addr: SocketAddr,
    tls: bool,
    refuse: usize,
    shared: Arc<Shared>,
    goaway: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
    /// The test CA's certificate (PEM), for a feed's `ca_file`.
    pub ca_file: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Drop for H2Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl H2Server {
    pub async fn start(options: Options) -> H2Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let dir = tempfile::tempdir().expect("tempdir");
        let (acceptor, ca_file) = if options.tls {
            let (acceptor, ca_pem) = tls_acceptor();
            let path = dir.path().join("ca.pem");
            std::fs::write(&path, ca_pem).expect("write the CA");
            (Some(acceptor), Some(path))
        } else {
            (None, None)
        };
        let tls = options.tls;
        let refuse = options.refuse;
        let shared = Arc::new(Shared::default());
        let (goaway, goaway_rx) = watch::channel(0u64);
        let task = {
            let shared = shared.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let n = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
                    let shared = shared.clone();
                    let options = options.clone();
                    let acceptor = acceptor.clone();
                    let goaway = goaway_rx.clone();
                    tokio::spawn(async move {
                        match acceptor {
                            Some(a) => {
                                if let Ok(tls) = a.accept(tcp).await {
                                    serve(tls, n, shared, options, goaway).await;
                                }
                            }
                            None => serve(tcp, n, shared, options, goaway).await,
                        }
                    });
                }
            })
        };
        H2Server {
            addr,
            tls,
            refuse,
            shared,
            goaway,
            task,
            ca_file,
            _dir: dir,
        }
    }

    /// The URL of feed `name`.
    pub fn url(&self, name: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        let host = if self.tls {
            "localhost".to_string()
        } else {
            "127.0.0.1".to_string()
        };
        format!("{scheme}://{host}:{}/{name}", self.addr.port())
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Streams refused so far (see [`Options::refuse`]).
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst).min(self.refuse)
    }

    /// Requests received so far.
    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().expect("lock").len()
    }

    pub fn requests(&self) -> Vec<Record> {
        self.shared.requests.lock().expect("lock").clone()
    }

    /// Events sent on `path` so far.
    pub fn sent(&self, name: &str) -> u64 {
        let path = format!("/{name}");
        *self
            .shared
            .sent
            .lock()
            .expect("lock")
            .get(&path)
            .unwrap_or(&0)
    }

    /// Every open connection sends GOAWAY and ends its streams (cleanly) soon after.
    pub fn goaway(&self) {
        self.goaway.send_modify(|n| *n += 1);
    }

    /// Resets (RST_STREAM CANCEL) the open stream of feed `name`.
    pub fn reset(&self, name: &str) {
        let path = format!("/{name}");
        let notify = self
            .shared
            .resets
            .lock()
            .expect("lock")
            .entry(path)
            .or_default()
            .clone();
        notify.notify_waiters();
    }
}

async fn serve<S>(
    io: S,
    n: usize,
    shared: Arc<Shared>,
    options: Options,
    goaway: watch::Receiver<u64>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(mut conn) = h2::server::Builder::new()
        .max_concurrent_streams(options.max_streams)
        .handshake::<_, Bytes>(io)
        .await
    else {
        return;
    };
    let mut going_away = goaway.clone();
    let seen = *going_away.borrow_and_update();
    let mut shutting = false;
    loop {
        tokio::select! {
            next = conn.accept() => {
                let Some(Ok((request, respond))) = next else { return };
                let shared = shared.clone();
                let options = options.clone();
                let goaway = goaway.clone();
                tokio::spawn(async move {
                    stream(request, respond, n, shared, options, seen, goaway).await;
                });
            }
            changed = going_away.changed(), if !shutting => {
                if changed.is_ok() {
                    shutting = true;
                    conn.graceful_shutdown();
                }
            }
        }
    }
}

async fn stream(
    request: http::Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    connection: usize,
    shared: Arc<Shared>,
    options: Options,
    goaway_seen: u64,
    mut goaway: watch::Receiver<u64>,
) {
    if shared.refused.fetch_add(1, Ordering::SeqCst) < options.refuse {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    }
    let path = request.uri().path().to_string();
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let last_event_id = header("last-event-id");
    shared.requests.lock().expect("lock").push(Record {
        at: std::time::Instant::now(),
        path: path.clone(),
        last_event_id: last_event_id.clone(),
        connection,
        user_agent: header("user-agent"),
    });
    let mut response = http::Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache");
    for i in 0..options.junk_headers / 1024 {
        response = response.header(format!("x-junk-{i}"), "j".repeat(1000));
    }
    let response = response.body(()).expect("response");
    let Ok(mut send) = respond.send_response(response, false) else {
        return;
    };
    let reset = shared
        .resets
        .lock()
        .expect("lock")
        .entry(path.clone())
        .or_default()
        .clone();
    if let Some(body) = &options.body {
        let mut rest = body.clone();
        while !rest.is_empty() {
            let piece = rest.split_to(rest.len().min(64 * 1024));
            if send_all(&mut send, piece).await.is_err() {
                return;
            }
        }
    }
    let heartbeat = options
        .heartbeat
        .or(options.body.as_ref().map(|_| Duration::from_secs(1)));
    if let Some(every) = heartbeat {
        // At a random phase, so that many idle streams do not beat together.
        let phase = Duration::from_millis(rand::random::<u64>() % every.as_millis().max(1) as u64);
        let mut text = Bytes::from_static(b": connected\n\n");
        let mut wait = phase;
        loop {
            if send_all(&mut send, text).await.is_err() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = reset.notified() => {
                    send.send_reset(h2::Reason::CANCEL);
                    return;
                }
            }
            text = Bytes::from_static(b": heartbeat\n\n");
            wait = every;
        }
    }
    let mut next: u64 = last_event_id.and_then(|id| id.parse().ok()).unwrap_or(0) + 1;
    let name = path.trim_start_matches('/').to_string();
    let mut count = 0u64;
    loop {
        if options.per_request.is_some_and(|max| count >= max) || *goaway.borrow() != goaway_seen {
            let _ = send.send_data(Bytes::new(), true);
            return;
        }
        let mut data = format!("{name} {next}");
        if data.len() < options.data_size {
            data.push_str(&"x".repeat(options.data_size - data.len()));
        }
        let text = format!("id: {next}\ndata: {data}\n\n");
        tokio::select! {
            sent = send_all(&mut send, Bytes::from(text)) => {
                if sent.is_err() {
                    return;
                }
            }
            _ = reset.notified() => {
                send.send_reset(h2::Reason::CANCEL);
                return;
            }
        }
        *shared
            .sent
            .lock()
            .expect("lock")
            .entry(path.clone())
            .or_default() += 1;
        next += 1;
        count += 1;
        if !options.pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(options.pause) => {}
                _ = reset.notified() => {
                    send.send_reset(h2::Reason::CANCEL);
                    return;
                }
                _ = goaway.changed() => {}
            }
        }
    }
}

/// Sends `bytes` as flow control allows; fails when the client resets the stream meanwhile.
pub async fn send_all(send: &mut SendStream<Bytes>, mut bytes: Bytes) -> Result<(), h2::Error> {
    while !bytes.is_empty() {
        send.reserve_capacity(bytes.len());
        let granted = poll_fn(|cx| {
            if let std::task::Poll::Ready(reason) = send.poll_reset(cx) {
                let reason = reason.unwrap_or(h2::Reason::CANCEL);
                return std::task::Poll::Ready(Some(Err(h2::Error::from(reason))));
            }
            send.poll_capacity(cx)
        })
        .await
        .ok_or_else(|| h2::Error::from(h2::Reason::CANCEL))??;
        if granted == 0 {
            continue;
        }
        let chunk = bytes.split_to(granted.min(bytes.len()));
        send.send_data(chunk, false)?;
    }
    Ok(())
}

/// A new test CA and a certificate for `localhost` it signed, all PEM.
pub struct TestCerts {
    pub ca: String,
    pub cert: String,
    pub key: String,
    cert_der: rustls::pki_types::CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl TestCerts {
    pub fn new() -> TestCerts {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sse-bridge test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("certificate");
        let key_der = key.serialize_der();
        TestCerts {
            ca: pem(ca.der(), "CERTIFICATE"),
            cert: pem(cert.der(), "CERTIFICATE"),
            key: pem(&key_der, "PRIVATE KEY"),
            cert_der: cert.der().clone(),
            key_der,
        }
    }
}

/// A TLS acceptor (ALPN `h2`) with a certificate for `localhost` signed by a new test CA;
/// returns it with the CA's certificate (PEM).
fn tls_acceptor() -> (tokio_rustls::TlsAcceptor, String) {
    let certs = TestCerts::new();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        certs.key_der.clone(),
    ));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(vec![certs.cert_der.clone()], key)
    .expect("server certificate");
    config.alpn_protocols = vec![b"h2".to_vec()];
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), certs.ca)
}

/// Writes `text` to `dir/name`.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// DER as a PEM block labelled `label`.
pub fn pem(der: &[u8], label: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).expect("ascii"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}
