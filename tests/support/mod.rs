//! Test support shared by the process-level tests: a resumable SSE server backed by an
//! in-memory event log (real HTTP over TCP on 127.0.0.1), and helpers to run the real binary.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub last_event_id: Option<String>,
    pub at: Instant,
}

/// Serves events `1..=total` with `id: N`, resuming after the request's `Last-Event-ID`,
/// `chunk` events at a time with `pause` between chunks, then holds the connection open with
/// heartbeat comments. This is what a real server with a retained backlog does.
#[derive(Clone)]
pub struct LogServer {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<SeenRequest>>>,
    /// Responses still streaming (the client has not gone away).
    pub open: Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(Clone)]
struct LogState {
    total: u64,
    chunk: u64,
    pause: Duration,
    requests: Arc<Mutex<Vec<SeenRequest>>>,
    open: Arc<std::sync::atomic::AtomicUsize>,
}

/// The event with id `n`: a few types, JSON data, about 100 bytes.
pub fn event_text(n: u64) -> String {
    let ty = ["edit", "log", "new"][(n % 3) as usize];
    format!("event: {ty}\nid: {n}\ndata: {{\"n\":{n},\"title\":\"Page {n}\",\"comment\":\"résumé ✓\"}}\n\n")
}

pub fn event_type(n: u64) -> &'static str {
    ["edit", "log", "new"][(n % 3) as usize]
}

impl LogServer {
    pub async fn start(total: u64, chunk: u64, pause: Duration) -> LogServer {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let state = LogState {
            total,
            chunk,
            pause,
            requests: requests.clone(),
            open: open.clone(),
        };
        let app = axum::Router::new()
            .route("/stream", axum::routing::get(serve_log))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        LogServer {
            addr,
            requests,
            open,
        }
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}/stream", self.addr)
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        self.requests.lock().expect("lock").clone()
    }
}

async fn serve_log(State(state): State<LogState>, headers: HeaderMap) -> Response {
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    state.requests.lock().expect("lock").push(SeenRequest {
        last_event_id: last.clone(),
        at: Instant::now(),
    });
    let start = last.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) + 1;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(4);
    state.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    tokio::spawn(async move {
        // Counts the response as open until the generator ends (the client went away).
        struct Open(Arc<std::sync::atomic::AtomicUsize>);
        impl Drop for Open {
            fn drop(&mut self) {
                self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let _open = Open(state.open.clone());
        let mut n = start;
        if tx
            .send(Ok(Bytes::from_static(b": hello\nretry: 100\n\n")))
            .await
            .is_err()
        {
            return;
        }
        while n <= state.total {
            let end = (n + state.chunk - 1).min(state.total);
            let mut buf = String::new();
            for i in n..=end {
                buf.push_str(&event_text(i));
            }
            if tx.send(Ok(Bytes::from(buf))).await.is_err() {
                return;
            }
            n = end + 1;
            tokio::time::sleep(state.pause).await;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if tx
                .send(Ok(Bytes::from_static(b": heartbeat\n")))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .expect("response")
}

/// Path of the real binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sse-bridge"))
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    p
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}
