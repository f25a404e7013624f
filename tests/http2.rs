//! HTTP/2 (ARCHITECTURE.md §3): feeds to one origin as streams on shared connections, against
//! a real HTTP/2 server on 127.0.0.1 (`support::h2`, hyperium's `h2`), over TLS with a test CA
//! and in clear text (h2c): events and Last-Event-ID as over HTTP/1.1, two connections for 200
//! feeds when the server allows 100 streams each, GOAWAY and RST_STREAM, a stalled feed beside
//! a busy one, and the choice between HTTP/1.1 and HTTP/2. And through a real third-party
//! HTTP/2 server: Debian's nginx terminating TLS in front of the HTTP/1.1 test server (skipped
//! without nginx unless `SSE_BRIDGE_REQUIRE_NGINX=1`, which `.ci/run` sets after installing it).

mod support;

use std::sync::Arc;
use std::time::Duration;

use sse_bridge::config::{FeedConfig, HttpVersion};
use sse_bridge::sse::client::{EventSource, Next};
use sse_bridge::sse::parser::Item;
use sse_bridge::sse::status::{FeedStatus, ReadyState, StatusHandle};
use support::h2::{H2Server, Options};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

fn feed(name: &str, server: &H2Server, version: HttpVersion) -> FeedConfig {
    let mut f = FeedConfig::new(name, server.url(name));
    f.http_version = version;
    f.ca_file = server.ca_file.clone();
    f.default_retry = Duration::from_millis(100);
    f.backoff.initial = Duration::from_millis(100);
    f.backoff.max = Duration::from_millis(500);
    f.connect_timeout = Duration::from_secs(5);
    f
}

/// An EventSource polled in a task; its event ids in order.
struct Feed {
    ids: mpsc::UnboundedReceiver<u64>,
    status: StatusHandle,
    task: JoinHandle<()>,
    seen: Vec<u64>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Feed {
    fn start(config: FeedConfig) -> Feed {
        Feed::start_reading(config, usize::MAX)
    }

    /// A feed that stops reading after `events` events, and keeps its stream open (as a feed
    /// whose sink holds it back).
    fn start_reading(config: FeedConfig, events: usize) -> Feed {
        let status = StatusHandle::new();
        let mut es =
            EventSource::new(Arc::new(config), String::new(), status.clone()).expect("valid feed");
        let (tx, ids) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut read = 0;
            loop {
                if read >= events {
                    std::future::pending::<()>().await;
                }
                let mut items = Vec::new();
                match es.next(&mut items).await {
                    Next::Items => {
                        for item in items {
                            if let Item::Event(e) = item {
                                read += 1;
                                let id: u64 = e.id.parse().expect("numeric id");
                                if tx.send(id).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    Next::Gap { .. } => {}
                    Next::Stopped { reason } => panic!("stopped: {reason}"),
                }
            }
        });
        Feed {
            ids,
            status,
            task,
            seen: Vec::new(),
        }
    }

    /// Waits until the feed has received `n` events; they are `1..=n`, once each, in order.
    async fn until(&mut self, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.seen.len() < n {
            match tokio::time::timeout_at(deadline, self.ids.recv()).await {
                Ok(Some(id)) => self.seen.push(id),
                _ => panic!(
                    "{} events of {n} after {WAIT:?}; status {:?}",
                    self.seen.len(),
                    self.status.get()
                ),
            }
        }
        let want: Vec<u64> = (1..=self.seen.len() as u64).collect();
        assert_eq!(self.seen, want, "every event once, in order");
    }

    fn status(&self) -> FeedStatus {
        self.status.get()
    }

    /// Waits until the status satisfies `pred`.
    async fn status_until(&self, pred: impl FnMut(&FeedStatus) -> bool) -> FeedStatus {
        let mut rx = self.status.subscribe();
        let status = tokio::time::timeout(WAIT, rx.wait_for(pred)).await;
        match status {
            Ok(Ok(s)) => s.clone(),
            _ => panic!("timed out; status {:?}", self.status.get()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_last_event_id_over_h2c_and_tls() {
    for (tls, version) in [(false, HttpVersion::Http2), (true, HttpVersion::Auto)] {
        let server = H2Server::start(Options {
            tls,
            per_request: Some(5),
            pause: Duration::from_millis(2),
            ..Options::default()
        })
        .await;
        let mut a = Feed::start(feed("a", &server, version));
        a.until(12).await;
        let status = a.status();
        assert_eq!(status.protocol, Some("HTTP/2"), "tls {tls}");
        assert!(status.connection.is_some());
        let requests = server.requests();
        let ids: Vec<Option<&str>> = requests
            .iter()
            .take(3)
            .map(|r| r.last_event_id.as_deref())
            .collect();
        assert_eq!(ids, [None, Some("5"), Some("10")], "tls {tls}");
        assert!(requests[0]
            .user_agent
            .as_deref()
            .is_some_and(|ua| ua.starts_with("sse-bridge/")));
        // Every reconnection after a clean end went on the one connection.
        assert_eq!(server.connections(), 1, "tls {tls}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_feeds_with_a_limit_of_100_streams_use_two_connections() {
    let server = H2Server::start(Options {
        tls: true,
        max_streams: 100,
        pause: Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    let mut feeds: Vec<Feed> = (0..200)
        .map(|i| Feed::start(feed(&format!("f{i}"), &server, HttpVersion::Auto)))
        .collect();
    for f in &mut feeds {
        f.until(2).await;
    }
    assert_eq!(server.connections(), 2);
    let mut shared: Vec<u64> = feeds
        .iter()
        .map(|f| f.status().connection.expect("connection"))
        .collect();
    shared.sort_unstable();
    shared.dedup();
    assert_eq!(shared.len(), 2, "feeds show the connection they share");
    assert!(feeds
        .iter()
        .all(|f| f.status().protocol == Some("HTTP/2") && f.status().reconnects == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_mid_stream_resumes_every_feed_from_its_last_event_id() {
    let server = H2Server::start(Options {
        pause: Duration::from_millis(10),
        ..Options::default()
    })
    .await;
    let mut feeds: Vec<Feed> = (0..10)
        .map(|i| Feed::start(feed(&format!("g{i}"), &server, HttpVersion::Http2)))
        .collect();
    for f in &mut feeds {
        f.until(3).await;
    }
    assert_eq!(server.connections(), 1);
    server.goaway();
    for f in &mut feeds {
        f.until(f.seen.len() + 20).await;
    }
    // A second connection, and every feed asked for what followed its last event.
    assert_eq!(server.connections(), 2);
    let requests = server.requests();
    for i in 0..10 {
        let path = format!("/g{i}");
        let resumed: Vec<_> = requests
            .iter()
            .filter(|r| r.path == path && r.connection == 2)
            .collect();
        assert_eq!(resumed.len(), 1, "{path}: {requests:?}");
        assert!(resumed[0].last_event_id.is_some(), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rst_stream_on_one_feed_leaves_the_others_streaming() {
    let server = H2Server::start(Options {
        pause: Duration::from_millis(10),
        ..Options::default()
    })
    .await;
    let mut feeds: Vec<Feed> = ["a", "b", "c"]
        .iter()
        .map(|n| Feed::start(feed(n, &server, HttpVersion::Http2)))
        .collect();
    for f in &mut feeds {
        f.until(5).await;
    }
    server.reset("b");
    for f in &mut feeds {
        f.until(f.seen.len() + 30).await;
    }
    let requests = server.requests();
    let count = |p: &str| requests.iter().filter(|r| r.path == p).count();
    assert_eq!(count("/a"), 1, "{requests:?}");
    assert_eq!(count("/c"), 1, "{requests:?}");
    assert_eq!(count("/b"), 2, "{requests:?}");
    let again = requests.iter().rfind(|r| r.path == "/b").expect("b");
    assert!(again.last_event_id.is_some());
    assert_eq!(
        again.connection, 1,
        "the same connection carries the new stream"
    );
    let b = feeds[1].status();
    assert_eq!(b.reconnects, 1);
    assert!(
        b.last_error
            .as_deref()
            .is_some_and(|e| e.contains("HTTP/2")),
        "{b:?}"
    );
    assert_eq!(feeds[0].status().reconnects, 0);
    assert_eq!(feeds[2].status().reconnects, 0);
    assert_eq!(feeds[0].status().state, ReadyState::Open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_feed_does_not_slow_the_others_on_its_connection() {
    let server = H2Server::start(Options {
        pause: Duration::ZERO,
        data_size: 16 * 1024,
        ..Options::default()
    })
    .await;
    // `stalled` reads its first events, then never again (as a feed whose sink is stuck).
    let mut stalled = Feed::start_reading(feed("stalled", &server, HttpVersion::Http2), 1);
    stalled.until(1).await;
    let mut busy = Feed::start(feed("busy", &server, HttpVersion::Http2));
    // 2 000 events of 16 KiB: 32 MiB, twice the connection window and 256 times the stream
    // window.
    busy.until(2_000).await;
    assert_eq!(server.connections(), 1, "both on one connection");
    assert_eq!(
        stalled.status().connection,
        busy.status().connection,
        "both on one connection"
    );
    assert_eq!(stalled.status().state, ReadyState::Open);
    let held = server.sent("stalled");
    assert!(
        held < 100,
        "the stalled stream's window bounds what was sent to it: {held} events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_uses_http1_where_the_server_offers_nothing_else_and_2_says_so() {
    use support::server::{Fault, Options as H1Options, Server};
    let server = Server::start(
        H1Options {
            tls: true,
            ..H1Options::log(50)
        },
        |_| Fault::Normal,
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = support::h2::write(
        dir.path(),
        "ca.pem",
        &support::h2::pem(
            server.cert_der.as_deref().expect("certificate"),
            "CERTIFICATE",
        ),
    );
    let mut config = FeedConfig::new("h1", server.url());
    config.ca_file = Some(ca.clone());
    let mut h1 = Feed::start(config.clone());
    h1.until(50).await;
    assert_eq!(h1.status().protocol, Some("HTTP/1.1"));

    config.http_version = HttpVersion::Http2;
    config.backoff.initial = Duration::from_secs(5);
    let h2 = Feed::start(config);
    let status = h2.status_until(|s| s.last_error.is_some()).await;
    let error = status.last_error.unwrap_or_default();
    assert!(
        error.contains("does not offer HTTP/2") && error.contains("http_version"),
        "{error}"
    );
}

/// nginx (`/usr/sbin/nginx` or on PATH) as a child process; killed when dropped.
struct Nginx {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> Option<std::path::PathBuf> {
    let fixed = std::path::PathBuf::from("/usr/sbin/nginx");
    if fixed.is_file() {
        return Some(fixed);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("nginx"))
            .find(|p| p.is_file())
    })
}

impl Nginx {
    /// nginx with TLS and HTTP/2 on 127.0.0.1, proxying to `upstream` without buffering (as
    /// an SSE origin needs), its certificate from a new test CA. `None` when nginx is missing
    /// and not required.
    async fn start(upstream: std::net::SocketAddr) -> Option<(Nginx, support::h2::TestCerts)> {
        let Some(binary) = nginx_binary() else {
            assert!(
                std::env::var_os("SSE_BRIDGE_REQUIRE_NGINX").is_none_or(|v| v != "1"),
                "nginx is required (SSE_BRIDGE_REQUIRE_NGINX=1) but not installed: \
                 apt-get install nginx-light, or run .ci/run"
            );
            eprintln!("nginx is not installed: skipping the nginx test");
            return None;
        };
        let certs = support::h2::TestCerts::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = &dir.path().to_path_buf();
        support::h2::write(d, "cert.pem", &certs.cert);
        support::h2::write(d, "key.pem", &certs.key);
        std::fs::create_dir_all(d.join("tmp")).expect("tmp");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log combined;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        server_name localhost;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 1h;
        }}
    }}
}}
"#,
            d = d.display()
        );
        let conf_path = support::h2::write(d, "nginx.conf", &conf);
        let child = std::process::Command::new(binary)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(&conf_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start nginx");
        let nginx = Nginx { child, port, dir };
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx did not listen on {port}: {}",
                std::fs::read_to_string(d.join("error.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some((nginx, certs))
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_through_nginx_over_http2_get_every_event() {
    use support::server::Server;
    let upstream = Server::log(300, 50, Duration::from_millis(10)).await;
    let Some((nginx, certs)) = Nginx::start(upstream.addr).await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = support::h2::write(dir.path(), "ca.pem", &certs.ca);
    let mut feeds: Vec<Feed> = (0..20)
        .map(|i| {
            let mut f = FeedConfig::new(
                format!("n{i}"),
                format!("https://localhost:{}/stream/{i}", nginx.port),
            );
            f.ca_file = Some(ca.clone());
            Feed::start(f)
        })
        .collect();
    for f in &mut feeds {
        f.until(300).await;
    }
    let mut connections: Vec<u64> = feeds
        .iter()
        .map(|f| {
            let s = f.status();
            assert_eq!(s.protocol, Some("HTTP/2"), "{s:?}");
            s.connection.expect("connection")
        })
        .collect();
    connections.sort_unstable();
    connections.dedup();
    assert_eq!(connections.len(), 1, "20 feeds on one connection to nginx");
    // nginx logs a request when it ends: the feeds go away.
    drop(feeds);
    let logged = |log: &str| log.lines().filter(|l| l.contains("/stream/")).count();
    assert!(
        support::wait_for(WAIT, || logged(&nginx.access_log()) >= 20).await,
        "nginx's access log: {}",
        nginx.access_log()
    );
    let log = nginx.access_log();
    assert!(
        log.lines()
            .filter(|l| l.contains("/stream/"))
            .all(|l| l.contains("HTTP/2.0")),
        "nginx's access log: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_allows_no_streams_is_a_clear_error_not_a_pile_of_connections() {
    let server = H2Server::start(Options {
        max_streams: 0,
        ..Options::default()
    })
    .await;
    let f = Feed::start(feed("z", &server, HttpVersion::Http2));
    let status = f.status_until(|s| s.reconnects >= 3).await;
    let error = status.last_error.unwrap_or_default();
    assert!(error.contains("allows no streams"), "{error}");
    // One connection per attempt, each closed at once: never a request queued on one.
    assert!(server.requests().is_empty());
    assert!(server.connections() <= status.reconnects as usize + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_sent_again_at_once_not_counted_as_a_failure() {
    let server = H2Server::start(Options {
        refuse: 2,
        ..Options::default()
    })
    .await;
    let mut f = Feed::start(feed("r", &server, HttpVersion::Http2));
    f.until(5).await;
    assert_eq!(server.refused(), 2);
    let status = f.status();
    assert_eq!(status.reconnects, 0, "{status:?}");
    assert!(status.last_error.is_none(), "{status:?}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_head_past_64_kib_is_an_error_and_the_feed_retries() {
    // 1 MiB of response headers: refused by the header list limit, never buffered whole.
    let server = H2Server::start(Options {
        junk_headers: 1024 * 1024,
        ..Options::default()
    })
    .await;
    let f = Feed::start(feed("big", &server, HttpVersion::Http2));
    let status = f.status_until(|s| s.reconnects >= 2).await;
    let error = status.last_error.unwrap_or_default();
    assert!(error.contains("HTTP/2"), "{error}");
    assert_ne!(status.state, ReadyState::Open);
}
