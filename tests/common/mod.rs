//! A scripted HTTP test server for Server-Sent Events, on a real TCP socket (127.0.0.1:0).
//!
//! Each incoming request is recorded (index, arrival time, method, URI, headers; later the time
//! its response ended) and answered by a handler that sees the record and returns a [`Reply`]:
//! a status, headers, an optional delay before the headers, and a body script of chunks, waits
//! and aborts, ending with a clean close or a connection left hanging.
//!
//! ```ignore
//! let server = TestServer::scripted(vec![
//!     Reply::sse().send("id: 1\ndata: a\n\n"),          // then closes
//!     Reply::status(503).header("Retry-After", "1"),
//!     Reply::sse().send("data: b\n\n").hang(),
//! ]).await;
//! let reqs = server.wait_for_requests(3, Duration::from_secs(5)).await;
//! assert_eq!(reqs[2].header("last-event-id").as_deref(), Some("1"));
//! ```
//!
//! Shared by several test files; not every file uses every helper.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

/// One step of a response body.
#[derive(Debug, Clone)]
pub enum Step {
    /// Write these bytes (one chunk; flushed at once).
    Send(Bytes),
    /// Pause.
    Wait(Duration),
    /// Break the connection mid-body (the client sees a body error, not a clean end).
    Abort,
}

/// What happens after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// End the body cleanly: the client sees end of stream.
    Close,
    /// Keep the response open, sending nothing, until the client goes away.
    Hang,
}

/// A scripted response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Wait this long before sending the status line and headers.
    pub head_delay: Duration,
    pub steps: Vec<Step>,
    pub end: End,
}

impl Reply {
    /// `200` with `Content-Type: text/event-stream`, an empty body so far, closing at the end.
    pub fn sse() -> Reply {
        Reply::status(200).header("content-type", "text/event-stream")
    }

    /// Any status with no headers and an empty body.
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            head_delay: Duration::ZERO,
            steps: Vec::new(),
            end: End::Close,
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

    /// Writes a chunk.
    pub fn send(mut self, bytes: impl AsRef<[u8]>) -> Reply {
        self.steps
            .push(Step::Send(Bytes::copy_from_slice(bytes.as_ref())));
        self
    }

    /// Pauses the body.
    pub fn wait(mut self, d: Duration) -> Reply {
        self.steps.push(Step::Wait(d));
        self
    }

    /// Breaks the connection after the previous steps.
    pub fn abort(mut self) -> Reply {
        self.steps.push(Step::Abort);
        self
    }

    /// Keeps the connection open after the steps.
    pub fn hang(mut self) -> Reply {
        self.end = End::Hang;
        self
    }

    /// Delays the status line and headers.
    pub fn delay_headers(mut self, d: Duration) -> Reply {
        self.head_delay = d;
        self
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// 0 for the first request this server received.
    pub index: usize,
    /// When the request (its headers) arrived.
    pub at: Instant,
    /// When the server finished the response: body ended, aborted, or (for a hanging response)
    /// the client went away. `None` while it is still going.
    pub ended: Option<Instant>,
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub path: String,
    pub headers: HeaderMap,
}

impl Recorded {
    /// A header's value as text (`None` when absent or not UTF-8).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

/// Time from the end of `earlier`'s response (or its arrival, if it never ended) to the
/// arrival of `later`: the client's reconnection delay as the server can measure it.
pub fn gap(earlier: &Recorded, later: &Recorded) -> Duration {
    later
        .at
        .saturating_duration_since(earlier.ended.unwrap_or(earlier.at))
}

type Handler = dyn Fn(&Recorded) -> Reply + Send + Sync;

struct Shared {
    log: Mutex<Vec<Recorded>>,
    changed: watch::Sender<()>,
    handler: Box<Handler>,
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, Vec<Recorded>> {
        // A panicking handler must not hide the requests from the test's assertions.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark_ended(&self, index: usize) {
        if let Some(r) = self.log().get_mut(index) {
            r.ended.get_or_insert_with(Instant::now);
        }
        self.changed.send_replace(());
    }
}

/// The server; stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    /// Starts a server answering every request with `handler(record)`.
    pub async fn start(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            log: Mutex::new(Vec::new()),
            changed: watch::channel(()).0,
            handler: Box::new(handler),
        });
        let s = shared.clone();
        let app = Router::new().fallback(move |req: Request| handle(s.clone(), req));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TestServer { addr, shared, task }
    }

    /// Starts a server answering request `i` with `replies[i]`; later requests get a
    /// `text/event-stream` response that stays open and silent.
    pub async fn scripted(replies: Vec<Reply>) -> TestServer {
        TestServer::start(move |r| {
            replies
                .get(r.index)
                .cloned()
                .unwrap_or_else(|| Reply::sse().hang())
        })
        .await
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.log().len()
    }

    /// Waits until `pred(requests)` holds; panics with `what` after `within`.
    pub async fn wait_until(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&[Recorded]) -> bool,
    ) -> Vec<Recorded> {
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
                    "timed out after {within:?} waiting for {what}; requests so far: {:#?}",
                    self.requests()
                        .iter()
                        .map(|r| (r.index, r.uri.clone(), r.header("last-event-id")))
                        .collect::<Vec<_>>()
                );
            }
        }
    }

    /// Waits for at least `n` requests.
    pub async fn wait_for_requests(&self, n: usize, within: Duration) -> Vec<Recorded> {
        self.wait_until(&format!("{n} requests"), within, |log| log.len() >= n)
            .await
    }

    /// Waits until the response to request `index` has ended; returns the requests.
    pub async fn wait_for_end(&self, index: usize, within: Duration) -> Vec<Recorded> {
        self.wait_until(&format!("the end of response {index}"), within, |log| {
            log.get(index).is_some_and(|r| r.ended.is_some())
        })
        .await
    }
}

async fn handle(shared: Arc<Shared>, req: Request) -> Response {
    let record = {
        let mut log = shared.log();
        let record = Recorded {
            index: log.len(),
            at: Instant::now(),
            ended: None,
            method: req.method().to_string(),
            uri: req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            path: req.uri().path().to_string(),
            headers: req.headers().clone(),
        };
        log.push(record.clone());
        record
    };
    shared.changed.send_replace(());
    let reply = (shared.handler)(&record);
    if !reply.head_delay.is_zero() {
        tokio::time::sleep(reply.head_delay).await;
    }
    let mut builder = Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        builder = builder.header(name, value);
    }
    let index = record.index;
    let body = if reply.steps.is_empty() && reply.end == End::Close {
        shared.mark_ended(index);
        Body::empty()
    } else {
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
        let shared = shared.clone();
        tokio::spawn(async move {
            for step in reply.steps {
                match step {
                    Step::Send(bytes) => {
                        if tx.send(Ok(bytes)).await.is_err() {
                            shared.mark_ended(index);
                            return;
                        }
                    }
                    Step::Wait(d) => {
                        tokio::select! {
                            _ = tokio::time::sleep(d) => {}
                            _ = tx.closed() => {
                                shared.mark_ended(index);
                                return;
                            }
                        }
                    }
                    Step::Abort => {
                        let _ = tx.send(Err(std::io::Error::other("scripted abort"))).await;
                        shared.mark_ended(index);
                        return;
                    }
                }
            }
            if reply.end == End::Hang {
                tx.closed().await;
            }
            shared.mark_ended(index);
        });
        Body::from_stream(ReceiverStream::new(rx))
    };
    builder.body(body).unwrap_or_else(|e| {
        let mut r = Response::new(Body::from(format!("bad scripted reply: {e}")));
        *r.status_mut() = axum::http::StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}
