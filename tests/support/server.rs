//! The one SSE test server: real TCP on 127.0.0.1, optionally behind TLS, HTTP/1.1 written by
//! hand so that each fault is exactly the bytes (or the lack of them) a test asks for. Every
//! response carries `Connection: close`; bodies end at the close (or at a reset).
//!
//! It serves a resumable event log: events `1..=total`, the event with id `n` being
//! `Options::events(n)` ([`event_text`] unless a test says otherwise), starting after the
//! request's `Last-Event-ID`, `chunk` events per write with `pause` between writes, then
//! heartbeat comments for as long as the client stays. Each request is answered as a plan
//! (`Fn(&Record) -> Fault`) says: served normally, sabotaged after some events (a TCP reset, a
//! clean EOF mid-event, injected bytes, a 100 MB line, a drip, silence), never answered, a
//! scripted [`Reply`] (status, headers, body pieces, waits, an abort, a hold), raw bytes, or
//! the messages a test pushes to every client.
//!
//! Every request is recorded: index, method, target, headers, `Last-Event-ID`, when it arrived
//! and ended, the fault applied, and the bytes the server managed to write.
//!
//! Included by `tests/support/mod.rs` and, with `#[path]`, by the benchmark; it depends on
//! nothing else in `tests/`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

/// The event with id `n` of the standard log: a few types, JSON data, about 100 bytes.
pub fn event_text(n: u64) -> String {
    let ty = event_type(n);
    format!("event: {ty}\nid: {n}\ndata: {{\"n\":{n},\"title\":\"Page {n}\",\"comment\":\"résumé ✓\"}}\n\n")
}

/// The type of event `n` of the standard log.
pub fn event_type(n: u64) -> &'static str {
    ["edit", "log", "new"][(n % 3) as usize]
}

/// Makes the body of one request's answer lazily (each item its own write).
pub type Pieces = Arc<dyn Fn() -> Box<dyn Iterator<Item = Vec<u8>> + Send> + Send + Sync>;

/// One step of a scripted body.
#[derive(Clone)]
pub enum Step {
    /// Write these bytes (one write, flushed at once).
    Send(Bytes),
    /// Write each piece the generator yields.
    Pieces(Pieces),
    /// Pause.
    Wait(Duration),
    /// Break the connection (a reset): the client sees a body error, not a clean end.
    Abort,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Send(b) => write!(f, "Send({} bytes)", b.len()),
            Step::Pieces(_) => f.write_str("Pieces"),
            Step::Wait(d) => write!(f, "Wait({d:?})"),
            Step::Abort => f.write_str("Abort"),
        }
    }
}

/// What happens after the last step of a scripted body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// End the body cleanly: the client sees end of stream.
    Close,
    /// Keep the response open, sending nothing, until the client goes away.
    Hang,
    /// Keep the response open with a `: heartbeat` comment this often; with `random_phase`,
    /// the first one comes at a random point of the first period (so that thousands of
    /// connections do not beat together).
    Heartbeat { every: Duration, random_phase: bool },
}

/// A scripted response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// The reason phrase; the standard one when `None`.
    pub reason: Option<&'static str>,
    pub headers: Vec<(String, String)>,
    /// Wait this long before sending the status line and headers.
    pub head_delay: Duration,
    pub steps: Vec<Step>,
    pub end: End,
    /// Send `Content-Length` (the length of a single `Send`) instead of a close-delimited body.
    pub sized: bool,
    /// Frame the body with `Transfer-Encoding: chunked`, in chunks of at most [`CHUNK`] bytes,
    /// [`CHUNKS_PER_WRITE`] to a write.
    pub chunked: bool,
}

/// The largest chunk of a chunked body.
pub const CHUNK: usize = 64 * 1024;
/// Chunks per write of a chunked body: a fast server, never the bottleneck.
pub const CHUNKS_PER_WRITE: usize = 16;

impl Reply {
    /// `200` with `Content-Type: text/event-stream`, an empty body so far, closing at the end.
    pub fn sse() -> Reply {
        Reply::status(200).header("content-type", "text/event-stream")
    }

    /// Any status with no headers and an empty body.
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            reason: None,
            headers: Vec::new(),
            head_delay: Duration::ZERO,
            steps: Vec::new(),
            end: End::Close,
            sized: true,
            chunked: false,
        }
    }

    /// A redirect to `location` (absolute or relative).
    pub fn redirect(status: u16, location: &str) -> Reply {
        Reply::status(status).header("location", location)
    }

    /// Sets a header, replacing one of the same name (e.g. the content type of [`Reply::sse`]).
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The whole body, with its `Content-Length`.
    pub fn body(mut self, text: &str) -> Reply {
        self.steps = vec![Step::Send(Bytes::copy_from_slice(text.as_bytes()))];
        self.sized = true;
        self
    }

    /// Writes a chunk (the body then ends at the close).
    pub fn send(self, bytes: impl AsRef<[u8]>) -> Reply {
        self.step(Step::Send(Bytes::copy_from_slice(bytes.as_ref())))
    }

    /// Writes these bytes (without a copy).
    pub fn send_bytes(self, bytes: Bytes) -> Reply {
        self.step(Step::Send(bytes))
    }

    /// Writes what `pieces` yields, generated when the request comes.
    pub fn pieces<I>(self, pieces: impl Fn() -> I + Send + Sync + 'static) -> Reply
    where
        I: Iterator<Item = Vec<u8>> + Send + 'static,
    {
        self.step(Step::Pieces(Arc::new(move || Box::new(pieces()))))
    }

    /// Pauses the body.
    pub fn wait(self, d: Duration) -> Reply {
        self.step(Step::Wait(d))
    }

    /// Breaks the connection after the previous steps.
    pub fn abort(self) -> Reply {
        self.step(Step::Abort)
    }

    /// Keeps the connection open after the steps.
    pub fn hang(self) -> Reply {
        self.ending(End::Hang)
    }

    /// Keeps the connection open after the steps, with a heartbeat comment every `every`.
    pub fn heartbeat(self, every: Duration) -> Reply {
        self.ending(End::Heartbeat {
            every,
            random_phase: false,
        })
    }

    /// [`Reply::heartbeat`], the first one at a random point of the first period.
    pub fn heartbeat_at_random_phase(self, every: Duration) -> Reply {
        self.ending(End::Heartbeat {
            every,
            random_phase: true,
        })
    }

    /// Frames the body with `Transfer-Encoding: chunked` (heartbeats included).
    pub fn chunked(mut self) -> Reply {
        self.chunked = true;
        self.sized = false;
        self
    }

    /// A body step (the body then ends at the close, not at a length).
    fn step(mut self, step: Step) -> Reply {
        self.steps.push(step);
        self.sized = false;
        self
    }

    fn ending(mut self, end: End) -> Reply {
        self.end = end;
        self.sized = false;
        self
    }

    /// Delays the status line and headers.
    pub fn delay_headers(mut self, d: Duration) -> Reply {
        self.head_delay = d;
        self
    }

    /// The status line and headers as written.
    pub fn head(&self) -> String {
        let reason = self.reason.unwrap_or_else(|| {
            axum::http::StatusCode::from_u16(self.status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Whatever")
        });
        let mut head = format!("HTTP/1.1 {} {reason}\r\n", self.status);
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if self.sized && self.status != 204 && self.status != 304 {
            let len: usize = self
                .steps
                .iter()
                .map(|s| match s {
                    Step::Send(b) => b.len(),
                    _ => 0,
                })
                .sum();
            head.push_str(&format!("Content-Length: {len}\r\n"));
        }
        if self.chunked {
            head.push_str("Transfer-Encoding: chunked\r\n\r\n");
        } else {
            head.push_str("Connection: close\r\n\r\n");
        }
        head
    }
}

/// How a request is answered.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The log from the request's `Last-Event-ID` on (after the preamble), then heartbeat
    /// comments for as long as the client stays (or until [`Server::close_all`]).
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
    /// A scripted response.
    Reply(Reply),
    /// These bytes as the whole response (head included), then a clean close.
    Raw(Vec<u8>),
    /// The preamble, then every message [`Server::push`] sends, with heartbeats between.
    Push,
}

impl Fault {
    /// A status with no body and no extra headers.
    pub fn status(code: u16, reason: &'static str) -> Fault {
        let mut reply = Reply::status(code);
        reply.reason = Some(reason);
        Fault::Reply(reply)
    }

    /// A complete response: this status line, these headers, this body.
    pub fn response(
        code: u16,
        reason: &'static str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Fault {
        let mut reply = Reply::status(code).body(body);
        reply.reason = Some(reason);
        for (name, value) in headers {
            reply = reply.header(name, value);
        }
        Fault::Reply(reply)
    }

    /// Adds a header to a [`Fault::Reply`].
    pub fn with_header(mut self, name: &str, value: &str) -> Fault {
        if let Fault::Reply(reply) = &mut self {
            reply.headers.push((name.to_string(), value.to_string()));
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
            Fault::Reply(r) => format!("status {}", r.status),
            Fault::Raw(b) => format!("{} raw bytes", b.len()),
            Fault::Push => "push".into(),
        }
    }
}

impl From<Reply> for Fault {
    fn from(reply: Reply) -> Fault {
        Fault::Reply(reply)
    }
}

/// One request as the server saw it (and as the plan sees it, `ended`/`bytes_sent` unset).
#[derive(Debug, Clone)]
pub struct Record {
    /// 0 for the first request this server received.
    pub index: usize,
    /// How many earlier requests had the same path.
    pub nth_on_path: usize,
    pub method: String,
    /// The request target (path and query).
    pub uri: String,
    /// The path, without the query.
    pub path: String,
    /// Every header, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The request body, as text (lossy UTF-8); empty without one.
    pub body: String,
    pub last_event_id: Option<String>,
    /// When the request arrived.
    pub at: Instant,
    /// When the server was done with it: the response written and closed (or reset), or, for
    /// a response that stays open, the client gone. `None` while it is still going.
    pub ended: Option<Instant>,
    pub fault: String,
    /// Response bytes written (head and body).
    pub bytes_sent: u64,
}

impl Record {
    /// A header's value (`None` when absent).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    /// The request head as text, lower-cased: the request line, then `name: value` lines.
    pub fn head(&self) -> String {
        let mut head = format!("{} {} http/1.1", self.method, self.uri);
        for (name, value) in &self.headers {
            head.push_str(&format!("\r\n{name}: {value}"));
        }
        head.to_ascii_lowercase()
    }

    /// Time from the end of `self` (its arrival if it never ended) to the arrival of `later`:
    /// the client's reconnection delay as the server can measure it.
    pub fn gap_to(&self, later: &Record) -> Duration {
        later
            .at
            .saturating_duration_since(self.ended.unwrap_or(self.at))
    }
}

/// [`Record::gap_to`] as a function.
pub fn gap(earlier: &Record, later: &Record) -> Duration {
    earlier.gap_to(later)
}

/// TLS handshakes the server saw.
#[derive(Debug, Clone, Default)]
pub struct TlsStats {
    pub completed: u64,
    pub failed: u64,
    /// The server-side error of each failed handshake.
    pub errors: Vec<String>,
}

type Plan = dyn Fn(&Record) -> Fault + Send + Sync;

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
    /// Written before the log (and before pushed messages), e.g. `retry: 100\n\n`.
    pub preamble: &'static str,
    /// The text of event `n`.
    pub events: fn(u64) -> String,
    /// Serve TLS with a freshly generated self-signed certificate (for `localhost` and
    /// `127.0.0.1`) that no client trusts.
    pub tls: bool,
    /// Start without accepting connections, with a listen backlog of 1: once
    /// [`Server::fill_accept_queue`] has filled it, the kernel drops new connection
    /// attempts (SYNs), so clients hit their connect timeout. [`Server::start_accepting`]
    /// ends that.
    pub accept_paused: bool,
}

impl Options {
    /// The standard log of `total` events, 50 per write, 10 ms apart.
    pub fn log(total: u64) -> Options {
        Options {
            total,
            chunk: 50,
            pause: Duration::from_millis(10),
            heartbeat: Duration::from_millis(100),
            preamble: "",
            events: event_text,
            tls: false,
            accept_paused: false,
        }
    }

    /// What a real server with a retained backlog does: `: hello` and `retry: 100` first,
    /// then `chunk` events per write with `pause` between, then a heartbeat every 200 ms.
    pub fn paced(total: u64, chunk: u64, pause: Duration) -> Options {
        Options {
            chunk,
            pause,
            heartbeat: Duration::from_millis(200),
            preamble: ": hello\nretry: 100\n\n",
            ..Options::log(total)
        }
    }
}

struct Shared {
    options: Options,
    plan: Box<Plan>,
    log: Mutex<Vec<Record>>,
    tls: Mutex<TlsStats>,
    changed: watch::Sender<()>,
    accepting: watch::Sender<bool>,
    /// Connections made by [`Server::fill_accept_queue`], held open.
    fillers: Mutex<Vec<TcpStream>>,
    /// Cancelled (and replaced) by [`Server::close_all`].
    close: Mutex<CancellationToken>,
    /// Cancelled by [`Server::stop`]: every connection drops at once.
    stop: Mutex<CancellationToken>,
    push: broadcast::Sender<Bytes>,
    /// Responses still being written (the client has not gone away).
    open: std::sync::atomic::AtomicUsize,
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, Vec<Record>> {
        // A panicking plan must not hide the requests from the test's assertions.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tls_stats(&self) -> MutexGuard<'_, TlsStats> {
        self.tls.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn token(token: &Mutex<CancellationToken>) -> CancellationToken {
        token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn tls_failed(&self, error: String) {
        let mut t = self.tls_stats();
        t.failed += 1;
        t.errors.push(error);
        drop(t);
        self.changed.send_replace(());
    }
}

/// The server; stops accepting when dropped.
pub struct Server {
    pub addr: SocketAddr,
    /// With TLS: the server's certificate (DER), which a client would have to trust.
    pub cert_der: Option<Vec<u8>>,
    shared: Arc<Shared>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// The standard log of `total` events served as [`Options::paced`] says to every request.
    pub async fn log(total: u64, chunk: u64, pause: Duration) -> Server {
        Server::start(Options::paced(total, chunk, pause), |_| Fault::Normal).await
    }

    /// A plain-HTTP server answering request `i` with `plan[i]`, later ones normally.
    pub async fn scripted(total: u64, plan: Vec<Fault>) -> Server {
        Server::start(Options::log(total), move |r| {
            plan.get(r.index).cloned().unwrap_or(Fault::Normal)
        })
        .await
    }

    /// Answers request `i` with `replies[i]`; later requests get a `text/event-stream`
    /// response that stays open and silent.
    pub async fn replies(replies: Vec<Reply>) -> Server {
        Server::answer(move |r| {
            replies
                .get(r.index)
                .cloned()
                .unwrap_or_else(|| Reply::sse().hang())
        })
        .await
    }

    /// Answers every request with `reply(record)`.
    pub async fn answer(reply: impl Fn(&Record) -> Reply + Send + Sync + 'static) -> Server {
        Server::start(Options::log(0), move |r| Fault::Reply(reply(r))).await
    }

    /// A server answering each request as `plan` says.
    pub async fn start(
        options: Options,
        plan: impl Fn(&Record) -> Fault + Send + Sync + 'static,
    ) -> Server {
        let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0)), options.accept_paused);
        let addr = listener.local_addr().expect("addr");
        let (acceptor, cert_der) = if options.tls {
            let (acceptor, der) = tls_acceptor();
            (Some(acceptor), Some(der))
        } else {
            (None, None)
        };
        let shared = Arc::new(Shared {
            plan: Box::new(plan),
            log: Mutex::new(Vec::new()),
            tls: Mutex::new(TlsStats::default()),
            changed: watch::channel(()).0,
            accepting: watch::channel(!options.accept_paused).0,
            fillers: Mutex::new(Vec::new()),
            close: Mutex::new(CancellationToken::new()),
            stop: Mutex::new(CancellationToken::new()),
            push: broadcast::channel(1024).0,
            open: std::sync::atomic::AtomicUsize::new(0),
            options: Options {
                chunk: options.chunk.max(1),
                ..options
            },
        });
        let task = accept_loop(shared.clone(), listener, acceptor.clone());
        Server {
            addr,
            cert_der,
            shared,
            acceptor,
            task,
        }
    }

    /// `http://127.0.0.1:PORT/stream` (`https://localhost:PORT/stream` with TLS).
    pub fn url(&self) -> String {
        self.url_for("/stream")
    }

    /// `http://127.0.0.1:PORT{path}` (`https://localhost:PORT{path}` with TLS).
    pub fn url_for(&self, path: &str) -> String {
        if self.cert_der.is_some() {
            format!("https://localhost:{}{path}", self.addr.port())
        } else {
            format!("http://{}{path}", self.addr)
        }
    }

    /// Ends every open [`Fault::Normal`] and [`Fault::Push`] stream with a clean end of the
    /// body: the client must reconnect.
    pub fn close_all(&self) {
        let mut close = self.shared.close.lock().unwrap_or_else(|e| e.into_inner());
        close.cancel();
        *close = CancellationToken::new();
    }

    /// Closes the listening socket and drops every connection: the port refuses connections.
    pub fn stop(&mut self) {
        self.task.abort();
        let mut stop = self.shared.stop.lock().unwrap_or_else(|e| e.into_inner());
        stop.cancel();
        *stop = CancellationToken::new();
    }

    /// Listens on the same port again after [`Server::stop`].
    pub async fn restart(&mut self) {
        let _ = (&mut self.task).await;
        let listener = listen(self.addr, false);
        self.task = accept_loop(self.shared.clone(), listener, self.acceptor.clone());
    }

    /// Sends `text` to every [`Fault::Push`] client connected now.
    pub fn push(&self, text: &str) {
        let _ = self
            .shared
            .push
            .send(Bytes::copy_from_slice(text.as_bytes()));
    }

    /// [`Fault::Push`] clients connected now.
    pub fn clients(&self) -> usize {
        self.shared.push.receiver_count()
    }

    /// Responses still being written (the client has not gone away).
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// With `accept_paused`: connects to the server until the kernel's accept queue is full
    /// (a connection attempt no longer completes), keeping those connections open. Returns
    /// how many it took.
    pub async fn fill_accept_queue(&self) -> usize {
        let fillers = || {
            self.shared
                .fillers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        };
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(self.addr))
                .await
            {
                Ok(Ok(stream)) => fillers().push(stream),
                Ok(Err(e)) => panic!("cannot connect to fill the accept queue: {e}"),
                Err(_) => return fillers().len(),
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

    /// Every request so far.
    pub fn requests(&self) -> Vec<Record> {
        self.shared.log().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.log().len()
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

    /// Waits until the response to request `index` has ended; returns the requests.
    pub async fn wait_for_end(&self, index: usize, within: Duration) -> Vec<Record> {
        self.wait_until(&format!("the end of response {index}"), within, |log| {
            log.get(index).is_some_and(|r| r.ended.is_some())
        })
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

/// A listening socket on `addr` (backlog 1 when `paused`, see [`Options::accept_paused`]).
fn listen(addr: SocketAddr, paused: bool) -> TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(addr).expect("bind");
    socket
        .listen(if paused { 1 } else { 1024 })
        .expect("listen")
}

fn accept_loop(
    s: Arc<Shared>,
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
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
            let stop = Shared::token(&s.stop);
            tokio::spawn(async move {
                let conn = async {
                    let Some(acceptor) = acceptor else {
                        return serve(s, tcp, true).await;
                    };
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(stream)) => {
                            s.tls_stats().completed += 1;
                            s.changed.send_replace(());
                            serve(s, stream, false).await;
                        }
                        Ok(Err(e)) => s.tls_failed(e.to_string()),
                        Err(_) => s.tls_failed("handshake timed out".into()),
                    }
                };
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    })
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

/// The request line and headers as read.
struct Head {
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
    /// The request body (as long as its `Content-Length` says, at most 1 MiB).
    body: Vec<u8>,
}

/// One read of a request, with a 10 s bound; `None` at the end of the stream, on an error or
/// on a timeout.
async fn read_some<S: AsyncRead + Unpin>(stream: &mut S, chunk: &mut [u8]) -> Option<usize> {
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(chunk))
        .await
        .ok()?
        .ok()?;
    (n > 0).then_some(n)
}

/// Reads the request head and body; `None` if the client left or sent something that is not
/// HTTP. The body is read (not left unread in the socket, which would make the close a reset).
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Option<Head> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = read_some(stream, &mut chunk).await?;
        buf.extend_from_slice(&chunk[..n]);
        if !buf[0].is_ascii_uppercase() {
            // Not HTTP (a TLS handshake, say): answered with a 400, as a real server would.
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_string();
    let uri = request_line.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim().to_ascii_lowercase(), value.trim().to_string()))
        })
        .collect();
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0)
        .min(1024 * 1024);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = read_some(stream, &mut chunk).await?;
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Some(Head {
        method,
        uri,
        headers,
        body,
    })
}

/// The write side of a response, stopping as soon as the client is gone (or the test closes
/// every stream).
struct Out<W> {
    w: W,
    gone: CancellationToken,
    close: CancellationToken,
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

    /// Sleeps; false if the client left (or the stream was closed) meanwhile.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.gone.cancelled() => false,
            _ = self.close.cancelled() => false,
        }
    }

    /// Heartbeats every `every` until the client leaves or the stream is closed.
    async fn heartbeats(&mut self, every: Duration) {
        while self.pause(every).await && self.send(b": heartbeat\n").await {}
    }

    /// Writes `data` as chunks of a chunked body; false once the client is gone.
    async fn send_chunked(&mut self, data: &[u8]) -> bool {
        let mut framed = Vec::with_capacity(data.len().min(CHUNK * CHUNKS_PER_WRITE) + 1024);
        for group in data.chunks(CHUNK * CHUNKS_PER_WRITE) {
            framed.clear();
            for chunk in group.chunks(CHUNK) {
                framed.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                framed.extend_from_slice(chunk);
                framed.extend_from_slice(b"\r\n");
            }
            if !self.send(&framed).await {
                return false;
            }
        }
        true
    }
}

const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";

/// Serves log events `from..` (at most `limit` of them) at the configured pace; returns the
/// next id to send, or `None` if the client left.
async fn send_events<W: AsyncWrite + Unpin>(
    o: &Options,
    out: &mut Out<W>,
    from: u64,
    limit: Option<u64>,
) -> Option<u64> {
    let last = match limit {
        Some(0) => return Some(from),
        Some(n) => (from + n - 1).min(o.total),
        None => o.total,
    };
    let mut n = from;
    while n <= last {
        let end = (n + o.chunk - 1).min(last);
        let buf: String = (n..=end).map(o.events).collect();
        if !out.send(buf.as_bytes()).await {
            return None;
        }
        n = end + 1;
        if !out.pause(o.pause).await {
            return None;
        }
    }
    Some(n)
}

/// The rest of the log, then heartbeats until the client leaves.
async fn send_rest<W: AsyncWrite + Unpin>(o: &Options, out: &mut Out<W>, from: u64) {
    if send_events(o, out, from, None).await.is_some() {
        out.heartbeats(o.heartbeat).await;
    }
}

/// The first half of event `n` (cut inside its data line, after its `id:` line).
fn half_event(o: &Options, n: u64) -> String {
    let text = (o.events)(n);
    let cut = text
        .find("data: ")
        .map(|p| p + 10)
        .unwrap_or(text.len() / 2);
    text[..cut.min(text.len() - 3)].to_string()
}

/// A task that ends with its handle.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts a response as open while it lives.
struct OpenGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn serve<S>(shared: Arc<Shared>, mut stream: S, plain: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + Resettable + 'static,
{
    let Some(head) = read_head(&mut stream).await else {
        let bad = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let _ = stream.write_all(bad).await;
        let _ = stream.shutdown().await;
        return;
    };
    let last_event_id = head
        .headers
        .iter()
        .find(|(n, _)| n == "last-event-id")
        .map(|(_, v)| v.clone());
    let (index, fault) = {
        let mut log = shared.log();
        let path = head.uri.split('?').next().unwrap_or_default().to_string();
        let mut record = Record {
            index: log.len(),
            nth_on_path: log.iter().filter(|r| r.path == path).count(),
            method: head.method,
            uri: head.uri,
            path,
            headers: head.headers,
            body: String::from_utf8_lossy(&head.body).into_owned(),
            last_event_id: last_event_id.clone(),
            at: Instant::now(),
            ended: None,
            fault: String::new(),
            bytes_sent: 0,
        };
        let fault = (shared.plan)(&record);
        record.fault = fault.label();
        log.push(record);
        (log.len() - 1, fault)
    };
    shared.changed.send_replace(());
    shared
        .open
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let open = OpenGuard(&shared.open);
    let o = &shared.options;
    let from = last_event_id
        .as_deref()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0)
        + 1;

    let resets = match &fault {
        Fault::Reset { .. } => true,
        Fault::Reply(r) => r.steps.iter().any(|s| matches!(s, Step::Abort)),
        _ => false,
    };
    if resets && plain {
        stream.arm_reset();
    }
    let (mut rd, wr) = tokio::io::split(stream);
    let gone = CancellationToken::new();
    // Aborted when the connection is dropped ([`Server::stop`]): it holds the socket's read half.
    let mut watcher = AbortOnDrop({
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
    });
    let mut out = Out {
        w: wr,
        gone: gone.clone(),
        close: Shared::token(&shared.close),
        sent: 0,
    };
    // Whether to end with a clean close (FIN) once the fault is played.
    let mut close = true;
    match fault {
        Fault::Normal => {
            if out.send(SSE_HEAD).await && out.send(o.preamble.as_bytes()).await {
                send_rest(o, &mut out, from).await;
            }
        }
        Fault::Reset { after } | Fault::Eof { after } => {
            let reset = matches!(fault, Fault::Reset { .. });
            if out.send(SSE_HEAD).await {
                if let Some(next) = send_events(o, &mut out, from, Some(after)).await {
                    if out.send(half_event(o, next).as_bytes()).await {
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
                if let Some(next) = send_events(o, &mut out, from, Some(after)).await {
                    let mut ok = true;
                    for w in &writes {
                        ok = ok && out.send(w).await && out.pause(Duration::from_millis(30)).await;
                    }
                    if ok {
                        send_rest(o, &mut out, next).await;
                    }
                }
            }
        }
        Fault::GiantLine { after, size } => {
            if out.send(SSE_HEAD).await {
                if let Some(next) = send_events(o, &mut out, from, Some(after)).await {
                    let block = vec![b'x'; 64 * 1024];
                    let mut ok = out.send(b"data: ").await;
                    let mut left = size;
                    while ok && left > 0 {
                        let n = left.min(block.len());
                        ok = out.send(&block[..n]).await;
                        left -= n;
                    }
                    if ok && out.send(b"\n\n").await {
                        send_rest(o, &mut out, next).await;
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
                if let Some(next) = send_events(o, &mut out, from, Some(after)).await {
                    if next <= o.total {
                        let text = (o.events)(next);
                        let bytes = bytes.min(text.len());
                        let mut ok = true;
                        for b in &text.as_bytes()[..bytes] {
                            ok = ok && out.pause(every).await && out.send(&[*b]).await;
                        }
                        if ok && out.send(&text.as_bytes()[bytes..]).await {
                            send_rest(o, &mut out, next + 1).await;
                        }
                    }
                }
            }
        }
        Fault::Silence { after } => {
            if out.send(SSE_HEAD).await
                && send_events(o, &mut out, from, Some(after)).await.is_some()
            {
                gone.cancelled().await;
            }
        }
        Fault::NeverAnswer => {
            gone.cancelled().await;
        }
        Fault::Reply(reply) => {
            close = play(&mut out, reply).await;
        }
        Fault::Raw(bytes) => {
            out.send(&bytes).await;
        }
        Fault::Push => {
            let mut rx = shared.push.subscribe();
            if out.send(SSE_HEAD).await && out.send(o.preamble.as_bytes()).await {
                loop {
                    let text = tokio::select! {
                        m = rx.recv() => match m {
                            Ok(t) => t,
                            Err(broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(_) => break,
                        },
                        _ = out.close.cancelled() => break,
                        _ = tokio::time::sleep(o.heartbeat) => Bytes::from_static(b": heartbeat\n"),
                    };
                    if !out.send(&text).await {
                        break;
                    }
                }
            }
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
    watcher.0.abort();
    drop(out);
    let _ = (&mut watcher.0).await;
    drop(open);
    {
        let mut log = shared.log();
        if let Some(r) = log.get_mut(index) {
            r.ended = Some(done_at);
            r.bytes_sent = sent;
        }
    }
    shared.changed.send_replace(());
}

/// Plays a scripted reply; returns whether to end with a clean close (false: reset).
async fn play<W: AsyncWrite + Unpin>(out: &mut Out<W>, reply: Reply) -> bool {
    if !reply.head_delay.is_zero() && !out.pause(reply.head_delay).await {
        return true;
    }
    if !out.send(reply.head().as_bytes()).await {
        return true;
    }
    let chunked = reply.chunked;
    for step in reply.steps {
        let ok = match step {
            Step::Send(bytes) if chunked => out.send_chunked(&bytes).await,
            Step::Send(bytes) => out.send(&bytes).await,
            Step::Pieces(pieces) => {
                let mut ok = true;
                for piece in pieces() {
                    ok = if chunked {
                        out.send_chunked(&piece).await
                    } else {
                        out.send(&piece).await
                    };
                    if !ok {
                        break;
                    }
                }
                ok
            }
            Step::Wait(d) => out.pause(d).await,
            Step::Abort => return false,
        };
        if !ok {
            return true;
        }
    }
    match reply.end {
        End::Close => {}
        End::Hang => out.gone.cancelled().await,
        End::Heartbeat {
            every,
            random_phase,
        } => {
            let phase = if random_phase {
                every.mul_f64(rand::random::<f64>())
            } else {
                every
            };
            let beat: &[u8] = if chunked {
                b"c\r\n: heartbeat\n\r\n"
            } else {
                b": heartbeat\n"
            };
            if out.pause(phase).await && out.send(beat).await {
                while out.pause(every).await && out.send(beat).await {}
            }
        }
    }
    true
}
