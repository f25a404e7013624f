//! A fault-injecting SSE server on a real TCP socket (127.0.0.1:0), optionally behind TLS.
//!
//! It serves a resumable event log like [`super::LogServer`]: events `1..=total`, the event
//! with id `n` being [`super::event_text`]`(n)`, starting after the request's `Last-Event-ID`.
//! Each request is answered according to a plan (`Fn(&ReqInfo) -> Fault`): served normally, or
//! sabotaged after some events (a TCP reset, a clean EOF mid-event, injected bytes, a 100 MB
//! line, a drip, silence), never answered, or answered with a status (500, 429, 204, a wrong
//! content type, a redirect...). HTTP/1.1 is written by hand, every response with
//! `Connection: close` (bodies end at the close), so that each fault is exactly the bytes (or
//! the lack of them) the test asks for.
//!
//! Every request is recorded: index, path, `Last-Event-ID`, when it arrived and ended, the
//! fault applied, and the body bytes the server managed to write.
//!
//! Included with `#[path = "support/faults.rs"] mod faults;` next to `mod support;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

use crate::support::event_text;

/// How a request is answered.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The log from the request's `Last-Event-ID` on, then heartbeat comments for as long as
    /// the client stays.
    Normal,
    /// `after` events, then the first half of the next event (its `id:` line included), then
    /// the connection is reset (RST, `SO_LINGER` 0): the client sees a broken connection.
    Reset { after: u64 },
    /// `after` events, then the first half of the next event (its `id:` line included), then a
    /// clean end of the body (FIN): the client sees the end of the stream mid-event.
    Eof { after: u64 },
    /// `after` events, then each of `writes` as a separate write (30 ms apart, so they arrive
    /// in separate reads), then the rest of the log as usual.
    Inject { after: u64, writes: Vec<Vec<u8>> },
    /// `after` events, then a `data:` line of `size` bytes (`x`), streamed in 64 KiB writes,
    /// then the rest of the log as usual (if the client is still there).
    GiantLine { after: u64, size: usize },
    /// `after` events, then the first `bytes` bytes of the next event one at a time, `every`
    /// apart, then the rest of the log as usual.
    Drip {
        after: u64,
        bytes: usize,
        every: Duration,
    },
    /// The response headers and `after` events, then nothing: the connection stays open and
    /// silent until the client leaves.
    Silence { after: u64 },
    /// The request is read and never answered, not even with a status line.
    NeverAnswer,
    /// A complete response: this status line, these headers, this body.
    Status {
        code: u16,
        reason: &'static str,
        headers: Vec<(String, String)>,
        body: String,
    },
}

impl Fault {
    /// A status with no body and no extra headers.
    pub fn status(code: u16, reason: &'static str) -> Fault {
        Fault::Status {
            code,
            reason,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    /// Adds a header to a [`Fault::Status`].
    pub fn with_header(mut self, name: &str, value: &str) -> Fault {
        if let Fault::Status { headers, .. } = &mut self {
            headers.push((name.to_string(), value.to_string()));
        }
        self
    }

    /// A short name for records and messages.
    fn label(&self) -> String {
        match self {
            Fault::Normal => "normal".into(),
            Fault::Reset { after } => format!("reset after {after}"),
            Fault::Eof { after } => format!("eof after {after}"),
            Fault::Inject { after, writes } => {
                format!("inject {} writes after {after}", writes.len())
            }
            Fault::GiantLine { after, size } => format!("{size}-byte line after {after}"),
            Fault::Drip {
                after,
                bytes,
                every,
            } => {
                format!("drip {bytes} bytes every {every:?} after {after}")
            }
            Fault::Silence { after } => format!("silence after {after}"),
            Fault::NeverAnswer => "never answer".into(),
            Fault::Status { code, .. } => format!("status {code}"),
        }
    }
}

/// What the plan sees of a request.
#[derive(Debug, Clone)]
pub struct ReqInfo {
    /// 0 for the first request this server received.
    pub index: usize,
    pub path: String,
    pub last_event_id: Option<String>,
    /// How many earlier requests had the same path.
    pub nth_on_path: usize,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Record {
    pub index: usize,
    pub path: String,
    pub last_event_id: Option<String>,
    /// When the request arrived.
    pub at: Instant,
    /// When the server was done with it: the response written and closed (or reset), or, for
    /// a response that stays open, the client gone.
    pub ended: Option<Instant>,
    pub fault: String,
    /// Response bytes written (head and body).
    pub bytes_sent: u64,
}

impl Record {
    /// Time from the end of `self` (its arrival if it never ended) to the arrival of `later`:
    /// the client's reconnection delay as the server can measure it.
    pub fn gap_to(&self, later: &Record) -> Duration {
        later
            .at
            .saturating_duration_since(self.ended.unwrap_or(self.at))
    }
}

/// TLS handshakes the server saw.
#[derive(Debug, Clone, Default)]
pub struct TlsStats {
    pub completed: u64,
    pub failed: u64,
    /// The server-side error of each failed handshake.
    pub errors: Vec<String>,
}

type Plan = dyn Fn(&ReqInfo) -> Fault + Send + Sync;

/// Server settings.
pub struct Options {
    /// Events in the log.
    pub total: u64,
    /// Events per write when serving normally.
    pub chunk: u64,
    /// Pause after each chunk.
    pub pause: Duration,
    /// Interval of `: heartbeat` comments once the log is served.
    pub heartbeat: Duration,
    /// Serve TLS with a freshly generated self-signed certificate (for `localhost` and
    /// `127.0.0.1`) that no client trusts.
    pub tls: bool,
    /// Start without accepting connections, with a listen backlog of 1: once
    /// [`FaultServer::fill_accept_queue`] has filled it, the kernel drops new connection
    /// attempts (SYNs), so clients hit their connect timeout. [`FaultServer::start_accepting`]
    /// ends that.
    pub accept_paused: bool,
}

impl Options {
    pub fn log(total: u64) -> Options {
        Options {
            total,
            chunk: 50,
            pause: Duration::from_millis(10),
            heartbeat: Duration::from_millis(100),
            tls: false,
            accept_paused: false,
        }
    }
}

struct Shared {
    total: u64,
    chunk: u64,
    pause: Duration,
    heartbeat: Duration,
    plan: Box<Plan>,
    log: Mutex<Vec<Record>>,
    tls: Mutex<TlsStats>,
    changed: watch::Sender<()>,
    accepting: watch::Sender<bool>,
    /// Connections made by [`FaultServer::fill_accept_queue`], held open.
    fillers: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, Vec<Record>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tls_stats(&self) -> MutexGuard<'_, TlsStats> {
        self.tls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The server; stops accepting when dropped.
pub struct FaultServer {
    pub addr: SocketAddr,
    /// With TLS: the server's certificate (DER), which a client would have to trust.
    pub cert_der: Option<Vec<u8>>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultServer {
    /// A plain-HTTP server answering request `i` with `plan[i]`, later ones normally.
    pub async fn scripted(total: u64, plan: Vec<Fault>) -> FaultServer {
        FaultServer::start(Options::log(total), move |r| {
            plan.get(r.index).cloned().unwrap_or(Fault::Normal)
        })
        .await
    }

    /// A server answering each request as `plan` says.
    pub async fn start(
        options: Options,
        plan: impl Fn(&ReqInfo) -> Fault + Send + Sync + 'static,
    ) -> FaultServer {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        let listener: TcpListener = socket
            .listen(if options.accept_paused { 1 } else { 1024 })
            .expect("listen");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            total: options.total,
            chunk: options.chunk.max(1),
            pause: options.pause,
            heartbeat: options.heartbeat,
            plan: Box::new(plan),
            log: Mutex::new(Vec::new()),
            tls: Mutex::new(TlsStats::default()),
            changed: watch::channel(()).0,
            accepting: watch::channel(!options.accept_paused).0,
            fillers: Mutex::new(Vec::new()),
        });
        let (acceptor, cert_der) = if options.tls {
            let (acceptor, der) = tls_acceptor();
            (Some(acceptor), Some(der))
        } else {
            (None, None)
        };
        let s = shared.clone();
        let task = tokio::spawn(async move {
            let mut accepting = s.accepting.subscribe();
            loop {
                if accepting.wait_for(|a| *a).await.is_err() {
                    return;
                }
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let s = s.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        None => serve_plain(s, tcp).await,
                        Some(acceptor) => {
                            let hs =
                                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                                    .await;
                            let stream = match hs {
                                Ok(Ok(stream)) => {
                                    s.tls_stats().completed += 1;
                                    stream
                                }
                                Ok(Err(e)) => {
                                    let mut t = s.tls_stats();
                                    t.failed += 1;
                                    t.errors.push(e.to_string());
                                    drop(t);
                                    s.changed.send_replace(());
                                    return;
                                }
                                Err(_) => {
                                    let mut t = s.tls_stats();
                                    t.failed += 1;
                                    t.errors.push("handshake timed out".into());
                                    drop(t);
                                    s.changed.send_replace(());
                                    return;
                                }
                            };
                            s.changed.send_replace(());
                            serve(s, stream, false).await;
                        }
                    }
                });
            }
        });
        FaultServer {
            addr,
            cert_der,
            shared,
            task,
        }
    }

    /// `http://127.0.0.1:PORT/stream` (`https://localhost:PORT/stream` with TLS).
    pub fn url(&self) -> String {
        if self.cert_der.is_some() {
            format!("https://localhost:{}/stream", self.addr.port())
        } else {
            format!("http://{}/stream", self.addr)
        }
    }

    /// With `accept_paused`: connects to the server until the kernel's accept queue is full
    /// (a connection attempt no longer completes), keeping those connections open. Returns
    /// how many it took.
    pub async fn fill_accept_queue(&self) -> usize {
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(self.addr))
                .await
            {
                Ok(Ok(stream)) => self
                    .shared
                    .fillers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(stream),
                Ok(Err(e)) => panic!("cannot connect to fill the accept queue: {e}"),
                Err(_) => {
                    return self
                        .shared
                        .fillers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .len()
                }
            }
        }
        panic!("the accept queue of {} never filled up", self.addr);
    }

    /// Closes the connections that filled the accept queue and starts accepting.
    pub fn start_accepting(&self) {
        self.shared
            .fillers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.shared.accepting.send_replace(true);
    }

    pub fn requests(&self) -> Vec<Record> {
        self.shared.log().clone()
    }

    pub fn tls_stats(&self) -> TlsStats {
        self.shared.tls_stats().clone()
    }

    /// Waits until `pred(requests)` holds; panics naming `what` after `within`.
    pub async fn wait_until(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&[Record]) -> bool,
    ) -> Vec<Record> {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            {
                let log = self.shared.log();
                if pred(&log) {
                    return log.clone();
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!(
                    "timed out after {within:?} waiting for {what}; requests: {:#?}",
                    self.requests()
                );
            }
        }
    }

    /// Waits for at least `n` requests.
    pub async fn wait_for_requests(&self, n: usize, within: Duration) -> Vec<Record> {
        self.wait_until(&format!("{n} requests"), within, |r| r.len() >= n)
            .await
    }

    /// Waits until `pred(tls stats)` holds.
    pub async fn wait_tls(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&TlsStats) -> bool,
    ) -> TlsStats {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let stats = self.tls_stats();
            if pred(&stats) {
                return stats;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!("timed out after {within:?} waiting for {what}; TLS: {stats:?}");
            }
        }
    }
}

/// A TLS acceptor with a new self-signed certificate; returns it with the certificate (DER).
fn tls_acceptor() -> (tokio_rustls::TlsAcceptor, Vec<u8>) {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("generate a self-signed certificate");
    let der = cert.der().to_vec();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        key_pair.serialize_der(),
    ));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key)
    .expect("server certificate");
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), der)
}

async fn serve_plain(shared: Arc<Shared>, tcp: TcpStream) {
    serve(shared, tcp, true).await;
}

/// Something a connection can be reset through (`SO_LINGER` 0 before the close).
trait Resettable {
    fn arm_reset(&self);
}

impl Resettable for TcpStream {
    fn arm_reset(&self) {
        let _ = self.set_zero_linger();
    }
}

impl<S> Resettable for tokio_rustls::server::TlsStream<S> {
    fn arm_reset(&self) {}
}

/// Reads the request head; `None` if the client left or sent something that is not HTTP.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Option<(String, Option<String>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next()?;
    let path = request_line.split(' ').nth(1)?.to_string();
    let mut last_event_id = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("last-event-id") {
                last_event_id = Some(value.trim().to_string());
            }
        }
    }
    Some((path, last_event_id))
}

/// The write side of a response, stopping as soon as the client is gone.
struct Out<W> {
    w: W,
    gone: CancellationToken,
    sent: u64,
}

impl<W: AsyncWrite + Unpin> Out<W> {
    /// Writes and flushes; false once the client is gone.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        let write = async {
            self.w.write_all(bytes).await?;
            self.w.flush().await
        };
        let ok = tokio::select! {
            r = write => r.is_ok(),
            _ = self.gone.cancelled() => false,
        };
        if ok {
            self.sent += bytes.len() as u64;
        }
        ok
    }

    /// Sleeps; false if the client left meanwhile.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.gone.cancelled() => false,
        }
    }
}

const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";

/// Serves log events `from..` (at most `limit` of them) at the configured pace; returns the
/// next id to send, or `None` if the client left.
async fn send_events<W: AsyncWrite + Unpin>(
    shared: &Shared,
    out: &mut Out<W>,
    from: u64,
    limit: Option<u64>,
) -> Option<u64> {
    let last = match limit {
        Some(0) => return Some(from),
        Some(n) => (from + n - 1).min(shared.total),
        None => shared.total,
    };
    let mut n = from;
    while n <= last {
        let end = (n + shared.chunk - 1).min(last);
        let mut buf = String::new();
        for i in n..=end {
            buf.push_str(&event_text(i));
        }
        if !out.send(buf.as_bytes()).await {
            return None;
        }
        n = end + 1;
        if !out.pause(shared.pause).await {
            return None;
        }
    }
    Some(n)
}

/// The rest of the log, then heartbeats until the client leaves.
async fn send_rest<W: AsyncWrite + Unpin>(shared: &Shared, out: &mut Out<W>, from: u64) {
    if send_events(shared, out, from, None).await.is_none() {
        return;
    }
    loop {
        if !out.pause(shared.heartbeat).await || !out.send(b": heartbeat\n").await {
            return;
        }
    }
}

/// The first half of event `n` (cut inside its data line, after its `id:` line).
fn half_event(n: u64) -> String {
    let text = event_text(n);
    let cut = text
        .find("data: ")
        .map(|p| p + 10)
        .unwrap_or(text.len() / 2);
    text[..cut.min(text.len() - 3)].to_string()
}

async fn serve<S>(shared: Arc<Shared>, mut stream: S, plain: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + Resettable + 'static,
{
    let Some((path, last_event_id)) = read_head(&mut stream).await else {
        return;
    };
    let (index, fault) = {
        let mut log = shared.log();
        let info = ReqInfo {
            index: log.len(),
            nth_on_path: log.iter().filter(|r| r.path == path).count(),
            path: path.clone(),
            last_event_id: last_event_id.clone(),
        };
        let fault = (shared.plan)(&info);
        log.push(Record {
            index: info.index,
            path,
            last_event_id: last_event_id.clone(),
            at: Instant::now(),
            ended: None,
            fault: fault.label(),
            bytes_sent: 0,
        });
        (info.index, fault)
    };
    shared.changed.send_replace(());
    let from = last_event_id
        .as_deref()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0)
        + 1;

    if matches!(fault, Fault::Reset { .. }) && plain {
        stream.arm_reset();
    }
    let (mut rd, wr) = tokio::io::split(stream);
    let gone = CancellationToken::new();
    let watcher = {
        let gone = gone.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            gone.cancel();
        })
    };
    let mut out = Out {
        w: wr,
        gone: gone.clone(),
        sent: 0,
    };
    // Whether to end with a clean close (FIN) once the fault is played.
    let mut close = true;
    match fault {
        Fault::Normal => {
            if out.send(SSE_HEAD).await {
                send_rest(&shared, &mut out, from).await;
            }
        }
        Fault::Reset { after } | Fault::Eof { after } => {
            let reset = matches!(fault, Fault::Reset { .. });
            if out.send(SSE_HEAD).await {
                if let Some(next) = send_events(&shared, &mut out, from, Some(after)).await {
                    if out.send(half_event(next).as_bytes()).await {
                        // Let the client read the half event before the connection ends.
                        out.pause(Duration::from_millis(50)).await;
                    }
                }
            }
            if reset {
                close = false;
            }
        }
        Fault::Inject { after, writes } => {
            if out.send(SSE_HEAD).await {
                if let Some(next) = send_events(&shared, &mut out, from, Some(after)).await {
                    let mut ok = true;
                    for w in &writes {
                        ok = ok && out.send(w).await && out.pause(Duration::from_millis(30)).await;
                    }
                    if ok {
                        send_rest(&shared, &mut out, next).await;
                    }
                }
            }
        }
        Fault::GiantLine { after, size } => {
            if out.send(SSE_HEAD).await {
                if let Some(next) = send_events(&shared, &mut out, from, Some(after)).await {
                    let block = vec![b'x'; 64 * 1024];
                    let mut ok = out.send(b"data: ").await;
                    let mut left = size;
                    while ok && left > 0 {
                        let n = left.min(block.len());
                        ok = out.send(&block[..n]).await;
                        left -= n;
                    }
                    if ok && out.send(b"\n\n").await {
                        send_rest(&shared, &mut out, next).await;
                    }
                }
            }
        }
        Fault::Drip {
            after,
            bytes,
            every,
        } => {
            if out.send(SSE_HEAD).await {
                if let Some(next) = send_events(&shared, &mut out, from, Some(after)).await {
                    if next <= shared.total {
                        let text = event_text(next);
                        let bytes = bytes.min(text.len());
                        let mut ok = true;
                        for b in &text.as_bytes()[..bytes] {
                            ok = ok && out.pause(every).await && out.send(&[*b]).await;
                        }
                        if ok && out.send(&text.as_bytes()[bytes..]).await {
                            send_rest(&shared, &mut out, next + 1).await;
                        }
                    }
                }
            }
        }
        Fault::Silence { after } => {
            if out.send(SSE_HEAD).await
                && send_events(&shared, &mut out, from, Some(after))
                    .await
                    .is_some()
            {
                gone.cancelled().await;
            }
        }
        Fault::NeverAnswer => {
            gone.cancelled().await;
        }
        Fault::Status {
            code,
            reason,
            headers,
            body,
        } => {
            let mut head = format!("HTTP/1.1 {code} {reason}\r\n");
            for (name, value) in &headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            if code != 204 && code != 304 {
                head.push_str(&format!("Content-Length: {}\r\n", body.len()));
            }
            head.push_str("Connection: close\r\n\r\n");
            head.push_str(&body);
            out.send(head.as_bytes()).await;
        }
    }
    // The response is over as far as the server is concerned (what `ended` records): the
    // client's reconnection delay starts after this.
    let mut done_at = Instant::now();
    if close {
        let _ = tokio::time::timeout(Duration::from_secs(1), out.w.shutdown()).await;
        done_at = Instant::now();
        // Give the client a moment to see the end and leave, rather than racing it.
        let _ = tokio::time::timeout(Duration::from_secs(2), gone.cancelled()).await;
    }
    let sent = out.sent;
    watcher.abort();
    drop(out);
    let _ = watcher.await;
    {
        let mut log = shared.log();
        if let Some(r) = log.get_mut(index) {
            r.ended = Some(done_at);
            r.bytes_sent = sent;
        }
    }
    shared.changed.send_replace(());
}
