//! The EventSource client against a real HTTP server on 127.0.0.1 (ARCHITECTURE.md §3): what it
//! sends, what it produces, and when it reconnects. Delays are measured at the server, from the
//! end of one response to the arrival of the next request, so they are lower bounds the client
//! must respect whatever the scheduling noise. Nothing waits by sleeping and hoping: every wait
//! is on an observable condition with a deadline (the only sleeps are windows in which something
//! must NOT happen).
//!
//! The same tests run over HTTP/2 too: `every_test_here_passes_over_http2` runs this binary
//! again with `SSE_BRIDGE_TEST_OVER_HTTP2=1`, where every feed goes through an h2c front
//! (`support::gateway`) to the same server, with `http_version = "2"`.

mod support;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sse_bridge::config::units::ByteSize;
use sse_bridge::config::{BackoffConfig, FeedConfig, OnClientError, Policy, StartConfig};
use sse_bridge::sse::client::{EventSource, Next};
use sse_bridge::sse::parser::{Item, SseEvent};
use sse_bridge::sse::status::{FeedStatus, ReadyState, StatusHandle};
use sse_bridge::state::GapReason;
use support::server::{event_text, gap, Reply, Server};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Deadline for anything that should happen promptly.
const WAIT: Duration = Duration::from_secs(5);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A feed tuned for fast tests: 150 ms reconnection time, backoff 150 ms doubling to 1 s, no
/// jitter (so the delays are exact lower bounds), client errors wait 400 ms.
fn feed(url: String) -> FeedConfig {
    let mut f = FeedConfig::new("test-feed", url);
    f.default_retry = ms(150);
    f.backoff = BackoffConfig {
        initial: ms(150),
        max: ms(1000),
        multiplier: 2.0,
        jitter: 0.0,
        reset_after: Duration::from_secs(60),
    };
    f.client_error_delay = ms(400);
    f.connect_timeout = ms(1000);
    f.response_timeout = ms(2000);
    f.idle_timeout = Duration::from_secs(10);
    f
}

fn ev(event_type: &str, data: &str, id: &str) -> SseEvent {
    SseEvent {
        event_type: event_type.into(),
        data: data.into(),
        id: id.into(),
    }
}

/// What the EventSource produced, forwarded by the driver task.
#[derive(Debug)]
enum Out {
    Items(Vec<Item>),
    Gap(GapReason, String),
    Stopped(String),
}

/// Polls an EventSource in a task (as the supervisor does) and forwards what it produces. After
/// a `Stopped` it calls `next` once more and forwards that too, then ends.
struct Driver {
    rx: mpsc::UnboundedReceiver<Out>,
    status: StatusHandle,
    task: JoinHandle<()>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The feed as the run's transport needs it: unchanged, or (over HTTP/2) through an h2c front.
fn transported(mut feed: FeedConfig) -> FeedConfig {
    if !support::gateway::over_http2() {
        return feed;
    }
    let Ok(mut url) = url::Url::parse(&feed.url) else {
        return feed;
    };
    let origin = match (url.scheme(), url.host_str(), url.port()) {
        ("http", Some("127.0.0.1"), Some(port)) => {
            std::net::SocketAddr::from(([127, 0, 0, 1], port))
        }
        _ => return feed,
    };
    let front = support::gateway::start(origin);
    let _ = url.set_port(Some(front.port()));
    feed.url = url.to_string();
    feed.http_version = sse_bridge::config::HttpVersion::Http2;
    feed
}

/// Whether `err` names `url` (over HTTP/2 the feed's URL is the front's: then its path).
fn names_url(err: &str, url: &str) -> bool {
    if !support::gateway::over_http2() {
        return err.contains(url);
    }
    let path = url::Url::parse(url)
        .map(|u| u.path().to_string())
        .unwrap_or_default();
    err.contains("http://127.0.0.1:") && err.contains(&path)
}

fn drive(feed: FeedConfig, start_id: &str) -> Driver {
    let feed = transported(feed);
    let status = StatusHandle::new();
    let mut es =
        EventSource::new(Arc::new(feed), start_id.to_string(), status.clone()).expect("valid feed");
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut stops = 0;
        loop {
            let mut items = Vec::new();
            let out = match es.next(&mut items).await {
                Next::Items => {
                    assert!(!items.is_empty(), "Next::Items without items");
                    Out::Items(items)
                }
                Next::Gap { reason, detail, .. } => Out::Gap(reason.into(), detail),
                Next::Stopped { reason } => {
                    stops += 1;
                    Out::Stopped(reason)
                }
            };
            if tx.send(out).is_err() || stops == 2 {
                return;
            }
        }
    });
    Driver { rx, status, task }
}

impl Driver {
    async fn next(&mut self) -> Out {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("timed out waiting for the EventSource")
            .expect("the driver task ended")
    }

    /// The next `n` events (LastEventId items skipped); panics on a gap or a stop.
    async fn events(&mut self, n: usize) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while events.len() < n {
            match self.next().await {
                Out::Items(items) => events.extend(items.into_iter().filter_map(|i| match i {
                    Item::Event(e) => Some(e),
                    Item::LastEventId(_) => None,
                })),
                other => panic!("expected events, got {other:?} after {events:?}"),
            }
        }
        assert_eq!(events.len(), n, "more events than expected: {events:?}");
        events
    }

    async fn stopped(&mut self) -> String {
        match self.next().await {
            Out::Stopped(reason) => reason,
            other => panic!("expected Stopped, got {other:?}"),
        }
    }

    /// Waits until the status satisfies `pred`.
    async fn status_until(&self, what: &str, pred: impl FnMut(&FeedStatus) -> bool) -> FeedStatus {
        let mut rx = self.status.subscribe();
        let result = match tokio::time::timeout(WAIT, rx.wait_for(pred)).await {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        };
        result.unwrap_or_else(|| {
            panic!(
                "timed out waiting for status: {what}; now {:?}",
                self.status.get()
            )
        })
    }

    /// Asserts nothing was produced.
    fn assert_nothing_produced(&mut self) {
        if let Ok(out) = self.rx.try_recv() {
            panic!("expected nothing from the EventSource, got {out:?}");
        }
    }
}

fn last_error(d: &Driver) -> String {
    d.status.get().last_error.unwrap_or_default()
}

#[tokio::test]
async fn multi_event_stream_with_standard_and_custom_headers() {
    let server = Server::replies(vec![Reply::sse()
        .send("event: greet\nid: 1\ndata: hello\n\n")
        .send("data: line1\ndata: line2\n\n")
        .send("id: 3\nevent: bye\ndata: x\n\n")
        .hang()])
    .await;
    let mut f = feed(server.url_for("/stream"));
    f.headers.insert("X-Custom".into(), "yes".into());
    let mut d = drive(f, "");
    assert_eq!(
        d.events(3).await,
        vec![
            ev("greet", "hello", "1"),
            ev("message", "line1\nline2", "1"),
            ev("bye", "x", "3"),
        ]
    );
    let req = &server.requests()[0];
    assert_eq!(req.method, "GET");
    assert_eq!(req.uri, "/stream");
    assert_eq!(req.header("accept").as_deref(), Some("text/event-stream"));
    assert_eq!(req.header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(req.header("x-custom").as_deref(), Some("yes"));
    assert_eq!(
        req.header("last-event-id"),
        None,
        "empty ID must not be sent"
    );
    assert_eq!(req.header("authorization"), None);
    assert!(req
        .header("user-agent")
        .is_some_and(|ua| ua.starts_with("sse-bridge/")));
    let s = d
        .status_until("last event id 3", |s| s.last_event_id == "3")
        .await;
    assert_eq!(s.state, ReadyState::Open);
    assert!(s.open_since.is_some());
    assert_eq!(s.reconnects, 0);
    assert_eq!(s.last_error, None);
}

/// A stream that needs a POST with a body (an LLM or GraphQL-over-SSE stream, a subscription
/// taking a filter) gets the same method, body and Content-Type on every request, the
/// reconnection adding Last-Event-ID.
#[tokio::test]
async fn post_with_a_body_is_resent_on_every_reconnection_with_last_event_id() {
    let server = Server::replies(vec![
        Reply::sse().send("id: 1\ndata: a\n\n"),
        Reply::status(503),
        Reply::sse().send("id: 2\ndata: b\n\n").hang(),
    ])
    .await;
    let mut f = feed(server.url_for("/subscribe"));
    f.method = "POST".into();
    f.body = Some(r#"{"query":"subscription { edits }"}"#.into());
    f.headers
        .insert("Content-Type".into(), "application/json".into());
    let mut d = drive(f, "");
    assert_eq!(d.events(2).await.len(), 2);
    let r = server.requests();
    assert_eq!(r.len(), 3, "{r:?}");
    for req in &r {
        assert_eq!(req.method, "POST");
        assert_eq!(req.uri, "/subscribe");
        assert_eq!(req.body, r#"{"query":"subscription { edits }"}"#);
        assert_eq!(req.header("content-length").as_deref(), Some("34"));
        assert_eq!(
            req.header("content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(req.header("accept").as_deref(), Some("text/event-stream"));
    }
    assert_eq!(r[0].header("last-event-id"), None);
    assert_eq!(r[1].header("last-event-id").as_deref(), Some("1"));
    assert_eq!(r[2].header("last-event-id").as_deref(), Some("1"));
    // Failures name the method.
    assert!(
        last_error(&d).contains("POST http://"),
        "{}",
        last_error(&d)
    );
}

/// Redirects treat the method and body as browsers do: 307 and 308 repeat them, 303 turns the
/// request into a GET without a body (and without its Content-Type).
#[tokio::test]
async fn redirects_keep_the_body_on_307_and_drop_it_on_303() {
    let server = Server::answer(|r| match r.path.as_str() {
        "/a" => Reply::redirect(307, "/b"),
        "/b" => Reply::redirect(303, "/c"),
        _ => Reply::sse().send("data: a\n\n").hang(),
    })
    .await;
    let mut f = feed(server.url_for("/a"));
    f.method = "POST".into();
    f.body = Some("filter".into());
    f.headers.insert("Content-Type".into(), "text/plain".into());
    let mut d = drive(f, "");
    assert_eq!(d.events(1).await.len(), 1);
    let r = server.requests();
    let seen: Vec<(&str, &str, &str, Option<String>)> = r
        .iter()
        .map(|r| {
            (
                r.path.as_str(),
                r.method.as_str(),
                r.body.as_str(),
                r.header("content-type"),
            )
        })
        .collect();
    let text = Some("text/plain".to_string());
    assert_eq!(
        seen,
        [
            ("/a", "POST", "filter", text.clone()),
            ("/b", "POST", "filter", text),
            ("/c", "GET", "", None),
        ]
    );
}

/// The query parameters of a request target, in order.
fn query(uri: &str) -> Vec<(String, String)> {
    url::Url::parse(&format!("http://h{uri}"))
        .expect("request target")
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `start.since` goes on the attempts of a feed without a checkpoint until one opens, never
/// after; `last_event_id_query` repeats the ID as a query parameter on exactly the requests
/// that send `Last-Event-ID`; the URL's own query is kept.
#[tokio::test]
async fn since_and_the_id_query_parameter_go_on_the_right_requests_only() {
    let server = Server::replies(vec![
        Reply::status(503),
        Reply::sse().send("id: 9\ndata: a\n\n"),
        Reply::sse().send("id: 10\ndata: b\n\n").hang(),
    ])
    .await;
    let mut f = feed(server.url_for("/.well-known/mercure?topic=https://example.org/books/1"));
    f.last_event_id_query = Some("lastEventID".into());
    f.start = Some(StartConfig {
        since: "2026-12-01T00:00:00Z".into(),
    });
    let mut d = drive(f.clone(), "");
    assert_eq!(d.events(2).await.len(), 2);
    let r = server.requests();
    let topic = ("topic", "https://example.org/books/1");
    let since = ("since", "2026-12-01T00:00:00Z");
    assert_eq!(query(&r[0].uri), pairs(&[topic, since]));
    assert_eq!(query(&r[1].uri), pairs(&[topic, since]), "not open yet");
    assert_eq!(query(&r[2].uri), pairs(&[topic, ("lastEventID", "9")]));
    assert_eq!(r[2].header("last-event-id").as_deref(), Some("9"));
    drop(d);

    // From a checkpoint: the ID from the first request on, no start position.
    let server = Server::replies(vec![Reply::sse().send("data: a\n\n").hang()]).await;
    f.url = server.url_for("/s?lastEventID=stale");
    let mut d = drive(f.clone(), "5");
    assert_eq!(d.events(1).await.len(), 1);
    assert_eq!(
        query(&server.requests()[0].uri),
        pairs(&[("lastEventID", "5")])
    );
    drop(d);

    // A duration counts back from the start; the parameter name is configurable.
    let server = Server::replies(vec![Reply::sse().send("data: a\n\n").hang()]).await;
    f.url = server.url_for("/v2/stream/recentchange");
    f.start = Some(StartConfig { since: "1h".into() });
    f.since_query = "from".into();
    let before = SystemTime::now();
    let mut d = drive(f, "");
    assert_eq!(d.events(1).await.len(), 1);
    let q = query(&server.requests()[0].uri);
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].0, "from");
    let at = humantime::parse_rfc3339(&q[0].1).expect("an RFC 3339 time");
    let ago = before.duration_since(at).expect("in the past");
    assert!(
        ago >= Duration::from_secs(3599) && ago <= Duration::from_secs(3601),
        "{ago:?}"
    );
}

/// `body_file` is read at every attempt (an edited filter applies at the next reconnection);
/// another method without a body says its length is 0; an unreadable file is an error naming
/// it, retried.
#[tokio::test]
async fn body_file_is_read_at_every_attempt_and_methods_without_a_body_send_length_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("filter.json");
    std::fs::write(&path, "one").expect("write body");
    let file = path.clone();
    let server = Server::answer(move |r| match r.index {
        0 => {
            std::fs::write(&file, "two").expect("rewrite body");
            Reply::sse().send("id: 5\ndata: a\n\n")
        }
        _ => Reply::sse().send("data: b\n\n").hang(),
    })
    .await;
    let mut f = feed(server.url_for("/"));
    f.method = "REPORT".into();
    f.body_file = Some(path.clone());
    let mut d = drive(f, "");
    assert_eq!(d.events(2).await.len(), 2);
    let r = server.requests();
    assert_eq!(
        (r[0].method.as_str(), r[0].body.as_str()),
        ("REPORT", "one")
    );
    assert_eq!(
        (r[1].method.as_str(), r[1].body.as_str()),
        ("REPORT", "two")
    );
    assert_eq!(r[1].header("last-event-id").as_deref(), Some("5"));
    drop(d);

    let server = Server::replies(vec![Reply::sse().send("data: a\n\n").hang()]).await;
    let mut f = feed(server.url_for("/"));
    f.method = "POST".into();
    let mut d = drive(f, "");
    assert_eq!(d.events(1).await.len(), 1);
    let req = &server.requests()[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.header("content-length").as_deref(), Some("0"));
    drop(d);

    let mut f = feed(server.url_for("/"));
    f.method = "POST".into();
    f.body_file = Some(dir.path().join("missing.json"));
    let d = drive(f, "");
    let s = d
        .status_until("a local error", |s| s.errors.contains_key("local"))
        .await;
    let err = s.last_error.unwrap_or_default();
    assert!(
        err.contains("cannot read body_file") && err.contains("missing.json"),
        "{err}"
    );
    assert_eq!(server.count(), 1, "nothing is sent without its body");
}

#[tokio::test]
async fn comments_produce_nothing() {
    let server = Server::replies(vec![Reply::sse()
        .send(": hello\n\n:\ndata: a\n\n: between\n")
        .wait(ms(50))
        .send(":x\n\ndata: b\n\n")
        .hang()])
    .await;
    let mut d = drive(feed(server.url_for("/")), "");
    assert_eq!(
        d.events(2).await,
        vec![ev("message", "a", ""), ev("message", "b", "")]
    );
    d.assert_nothing_produced();
}

#[tokio::test]
async fn retry_field_sets_the_next_delays() {
    let server = Server::replies(vec![
        Reply::sse().send("retry: 400\nid: 1\ndata: a\n\n"),
        Reply::sse().send("retry: 100\nid: 2\ndata: b\n\n"),
        Reply::sse().send("data: c\n\n").hang(),
    ])
    .await;
    let mut f = feed(server.url_for("/"));
    // No growth, so each delay is exactly the reconnection time in force.
    f.backoff.multiplier = 1.0;
    f.backoff.initial = ms(50);
    let mut d = drive(f, "");
    assert_eq!(d.events(3).await.len(), 3);
    let r = server.requests();
    assert!(gap(&r[0], &r[1]) >= ms(400), "{:?}", gap(&r[0], &r[1]));
    let g2 = gap(&r[1], &r[2]);
    assert!(
        g2 >= ms(100) && g2 < ms(400),
        "retry: 100 should shorten the delay: {g2:?}"
    );
}

/// A server that ends every response after a batch (50 events, `retry: 500`), as many servers
/// and proxies do routinely, is followed as a browser follows it: each reconnection waits the
/// reconnection time, not an escalating backoff (with the default backoff the delays used to
/// grow 1.3, 2.1, 4.6, 9.4 s...). The count must reach 80 % of a browser's: events per
/// connection x (window / (500 ms + connection time)).
#[tokio::test]
async fn a_server_closing_every_50_events_is_followed_like_a_browser() {
    const BATCH: u64 = 50;
    let server = Server::answer(|r| {
        let after: u64 = r
            .last_event_id
            .as_deref()
            .and_then(|id| id.parse().ok())
            .unwrap_or(0);
        let mut body = String::from("retry: 500\n\n");
        for n in after + 1..=after + BATCH {
            body.push_str(&event_text(n));
        }
        Reply::sse().send(body)
    })
    .await;
    // The documented defaults (backoff from 1 s doubling to 60 s, with jitter).
    let f = FeedConfig::new("routine", server.url_for("/"));
    let window = Duration::from_secs(20);
    let started = std::time::Instant::now();
    let mut d = drive(f, "");
    let mut events = 0u64;
    let mut last_id = String::new();
    while let Some(left) = window.checked_sub(started.elapsed()) {
        match tokio::time::timeout(left, d.rx.recv()).await {
            Ok(Some(Out::Items(items))) => {
                for item in items {
                    if let Item::Event(e) = item {
                        events += 1;
                        last_id = e.id.to_string();
                    }
                }
            }
            Ok(other) => panic!("expected events, got {other:?}"),
            Err(_) => break,
        }
    }
    // Resumed every time: no event twice, none skipped.
    assert_eq!(last_id, events.to_string());
    let requests = server.requests();
    let done: Vec<_> = requests.iter().filter(|r| r.ended.is_some()).collect();
    assert!(done.len() >= 2, "{requests:?}");
    let connection_time = done
        .iter()
        .map(|r| r.ended.unwrap_or(r.at).saturating_duration_since(r.at))
        .sum::<Duration>()
        / done.len() as u32;
    let browser = BATCH as f64 * window.as_secs_f64() / (0.5 + connection_time.as_secs_f64());
    println!(
        "routine close: {events} events in {window:?} over {} requests (a browser: {browser:.0}; connection time {connection_time:?})",
        requests.len()
    );
    assert!(
        events as f64 >= 0.8 * browser,
        "{events} events, a browser gets {browser:.0}"
    );
    for pair in requests.windows(2) {
        let delay = gap(&pair[0], &pair[1]);
        assert!(
            delay >= ms(500) && delay < ms(1000),
            "the delays must stay at the reconnection time (500 ms): {delay:?} before request {}",
            pair[1].index
        );
    }
}

#[tokio::test]
async fn disconnect_mid_event_discards_it_and_resumes_from_last_id() {
    let server = Server::replies(vec![
        Reply::sse().send("id: 1\ndata: a\n\nid: 2\ndata: partial"),
        Reply::sse().send("data: b\n\n").hang(),
    ])
    .await;
    let mut d = drive(feed(server.url_for("/")), "");
    // "partial" is never dispatched; the ID persists onto b.
    assert_eq!(
        d.events(2).await,
        vec![ev("message", "a", "1"), ev("message", "b", "1")]
    );
    let r = server.requests();
    assert_eq!(r[1].header("last-event-id").as_deref(), Some("1"));
    assert!(gap(&r[0], &r[1]) >= ms(150));
    assert!(last_error(&d).contains("EOF"), "{}", last_error(&d));
}

#[tokio::test]
async fn aborted_connection_reconnects() {
    let server = Server::replies(vec![
        // The wait lets the server flush the event before it breaks the connection.
        Reply::sse().send("id: 7\ndata: a\n\n").wait(ms(50)).abort(),
        Reply::sse().send("data: b\n\n").hang(),
    ])
    .await;
    let mut d = drive(feed(server.url_for("/")), "");
    assert_eq!(
        d.events(2).await,
        vec![ev("message", "a", "7"), ev("message", "b", "7")]
    );
    assert_eq!(
        server.requests()[1].header("last-event-id").as_deref(),
        Some("7")
    );
    let err = last_error(&d);
    assert!(err.contains("connection broken"), "{err}");
}

#[tokio::test]
async fn no_content_stops_the_feed_for_good() {
    let server = Server::replies(vec![
        Reply::sse().send("id: 5\ndata: a\n\n"),
        Reply::status(204),
    ])
    .await;
    let mut d = drive(feed(server.url_for("/")), "");
    assert_eq!(d.events(1).await, vec![ev("message", "a", "5")]);
    let reason = d.stopped().await;
    assert!(reason.contains("204"), "{reason}");
    // Called again: still stopped, without connecting.
    assert_eq!(d.stopped().await, reason);
    let s = d.status.get();
    assert_eq!(s.state, ReadyState::Stopped);
    assert!(s.last_error.as_deref().is_some_and(|e| e.contains("204")));
    assert_eq!(
        server.requests()[1].header("last-event-id").as_deref(),
        Some("5")
    );
    // Longer than any delay the feed could use: no further request.
    tokio::time::sleep(ms(600)).await;
    assert_eq!(server.count(), 2);
}

#[tokio::test]
async fn server_errors_back_off_exponentially_then_recover() {
    let server = Server::replies(vec![
        Reply::status(500),
        Reply::status(500),
        Reply::status(500),
        Reply::sse().send("data: ok\n\n").hang(),
    ])
    .await;
    let mut d = drive(feed(server.url_for("/events")), "");
    // While waiting after the second failure: connecting, backing off 300 ms.
    let s = d
        .status_until("second backoff", |s| s.current_backoff == Some(ms(300)))
        .await;
    assert_eq!(s.state, ReadyState::Connecting);
    assert_eq!(s.reconnects, 1);
    let err = s.last_error.unwrap_or_default();
    assert!(
        err.contains("test-feed") && err.contains("HTTP 500"),
        "{err}"
    );
    assert!(names_url(&err, &server.url_for("/events")), "{err}");

    assert_eq!(d.events(1).await, vec![ev("message", "ok", "")]);
    let r = server.requests();
    for (i, want) in [150, 300, 600].into_iter().enumerate() {
        let g = gap(&r[i], &r[i + 1]);
        assert!(
            g >= ms(want),
            "delay {} was {g:?}, want >= {want} ms",
            i + 1
        );
    }
    let s = d
        .status_until("open", |s| s.state == ReadyState::Open)
        .await;
    assert_eq!(s.reconnects, 3);
    assert_eq!(s.current_backoff, None);
}

#[tokio::test]
async fn a_storm_of_server_errors_is_not_a_hot_loop() {
    let server = Server::answer(|_| Reply::status(500)).await;
    let mut f = feed(server.url_for("/"));
    f.default_retry = ms(50);
    f.backoff.initial = ms(50);
    f.backoff.max = ms(400);
    let _d = drive(f, "");
    server.wait_for_requests(1, WAIT).await;
    // Attempts at about 0, 50, 150, 350, 750, 1150, 1550, 1950 ms: at most 8 in 2 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = server.requests();
    assert!((4..=8).contains(&r.len()), "{} requests in 2 s", r.len());
    for i in 1..r.len() {
        let want = ms((50u64 << (i - 1)).min(400));
        assert!(
            gap(&r[i - 1], &r[i]) >= want,
            "delay {i}: {:?}",
            gap(&r[i - 1], &r[i])
        );
    }
}

#[tokio::test]
async fn retry_after_seconds_is_honoured_on_503() {
    let server = Server::replies(vec![
        Reply::status(503).header("retry-after", "1"),
        Reply::sse().send("data: a\n\n").hang(),
    ])
    .await;
    let mut d = drive(feed(server.url_for("/")), "");
    assert_eq!(d.events(1).await.len(), 1);
    let r = server.requests();
    assert!(gap(&r[0], &r[1]) >= ms(1000), "{:?}", gap(&r[0], &r[1]));
    assert!(last_error(&d).contains("Retry-After"), "{}", last_error(&d));
}

#[tokio::test]
async fn retry_after_http_date_is_honoured_on_429() {
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(2));
    let server = Server::replies(vec![
        Reply::status(429).header("retry-after", &date),
        Reply::sse().send("data: a\n\n").hang(),
    ])
    .await;
    let mut d = drive(feed(server.url_for("/")), "");
    assert_eq!(d.events(1).await.len(), 1);
    let r = server.requests();
    // The date has whole seconds: at least 1 s of the 2 s remain.
    assert!(gap(&r[0], &r[1]) >= ms(900), "{:?}", gap(&r[0], &r[1]));
    assert!(last_error(&d).contains("429"), "{}", last_error(&d));
}

#[tokio::test]
async fn redirects_are_followed_keeping_last_event_id() {
    let stream_visits = Arc::new(AtomicUsize::new(0));
    let visits = stream_visits.clone();
    let server = Server::answer(move |r| match r.path.as_str() {
        "/start" => Reply::redirect(301, "/moved"),
        "/moved" => Reply::redirect(307, "/stream"),
        "/stream" if visits.fetch_add(1, Ordering::SeqCst) == 0 => {
            Reply::sse().send("id: 2\ndata: a\n\n")
        }
        "/stream" => Reply::sse().send("data: b\n\n").hang(),
        _ => Reply::status(404),
    })
    .await;
    let mut d = drive(feed(server.url_for("/start")), "1");
    assert_eq!(
        d.events(2).await,
        vec![ev("message", "a", "2"), ev("message", "b", "2")]
    );
    let r = server.requests();
    let seen: Vec<(String, Option<String>)> = r
        .iter()
        .map(|r| (r.path.clone(), r.header("last-event-id")))
        .collect();
    let want = |id: &str| {
        ["/start", "/moved", "/stream"]
            .map(|p| (p.to_string(), Some(id.to_string())))
            .to_vec()
    };
    assert_eq!(seen, [want("1"), want("2")].concat());
    assert!(r
        .iter()
        .all(|r| r.header("accept").as_deref() == Some("text/event-stream")));
}

#[tokio::test]
async fn redirect_loop_is_a_client_error_retried_slowly() {
    let server = Server::answer(|_| Reply::redirect(302, "/loop")).await;
    let mut f = feed(server.url_for("/loop"));
    f.max_redirects = 3;
    let d = drive(f, "");
    // Two attempts of 1 + 3 requests each.
    let r = server.wait_for_requests(8, WAIT).await;
    assert!(
        gap(&r[3], &r[4]) >= ms(400),
        "client errors wait client_error_delay: {:?}",
        gap(&r[3], &r[4])
    );
    for burst in [&r[0..4], &r[4..8]] {
        let span = burst[3].at - burst[0].at;
        assert!(
            span < ms(400),
            "one attempt follows its redirects at once: {span:?}"
        );
    }
    let s = d.status.get();
    assert_eq!(s.state, ReadyState::Connecting);
    let err = s.last_error.unwrap_or_default();
    assert!(
        err.contains("too many redirects") && err.contains("test-feed"),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_content_type_is_a_client_error_retried_slowly() {
    let server = Server::answer(|_| {
        Reply::status(200)
            .header("content-type", "text/plain")
            .send("data: not an event stream\n\n")
    })
    .await;
    let mut d = drive(feed(server.url_for("/")), "");
    let r = server.wait_for_requests(2, WAIT).await;
    assert!(gap(&r[0], &r[1]) >= ms(400), "{:?}", gap(&r[0], &r[1]));
    let err = last_error(&d);
    assert!(
        err.contains("text/plain") && err.contains("text/event-stream"),
        "{err}"
    );
    assert_eq!(d.status.state(), ReadyState::Connecting);
    d.assert_nothing_produced();
}

#[tokio::test]
async fn content_type_parameters_and_case_are_accepted() {
    let server = Server::replies(vec![Reply::sse()
        .header("content-type", "Text/Event-Stream; charset=UTF-8")
        .send("data: a\n\n")
        .hang()])
    .await;
    let mut d = drive(feed(server.url_for("/")), "");
    assert_eq!(d.events(1).await.len(), 1);
}

#[tokio::test]
async fn wrong_content_type_with_stop_policy_stops() {
    let server =
        Server::answer(|_| Reply::status(200).header("content-type", "application/json")).await;
    let mut f = feed(server.url_for("/"));
    f.on_client_error = OnClientError::Stop;
    let mut d = drive(f, "");
    let reason = d.stopped().await;
    assert!(
        reason.contains("application/json") && reason.contains("stop"),
        "{reason}"
    );
    assert_eq!(d.status.state(), ReadyState::Stopped);
    tokio::time::sleep(ms(600)).await;
    assert_eq!(server.count(), 1);
}

#[tokio::test]
async fn client_error_status_retries_slowly_and_stops_with_stop_policy() {
    let server = Server::answer(|_| Reply::status(404)).await;
    let d = drive(feed(server.url_for("/")), "");
    let r = server.wait_for_requests(2, WAIT).await;
    assert!(gap(&r[0], &r[1]) >= ms(400));
    assert!(last_error(&d).contains("HTTP 404"), "{}", last_error(&d));
    drop(d);

    let server = Server::answer(|_| Reply::status(401)).await;
    let mut f = feed(server.url_for("/"));
    f.on_client_error = OnClientError::Stop;
    let mut d = drive(f, "");
    assert!(d.stopped().await.contains("401"));
}

#[tokio::test]
async fn browser_policy_stops_on_a_server_error() {
    let server = Server::answer(|_| Reply::status(500)).await;
    let mut f = feed(server.url_for("/"));
    f.policy = Policy::Browser;
    let mut d = drive(f, "");
    let reason = d.stopped().await;
    assert!(
        reason.contains("500") && reason.contains("browser"),
        "{reason}"
    );
    assert_eq!(d.status.state(), ReadyState::Stopped);
    tokio::time::sleep(ms(400)).await;
    assert_eq!(server.count(), 1);
}

#[tokio::test]
async fn browser_policy_reconnects_after_exactly_the_reconnection_time() {
    let server = Server::replies(vec![
        Reply::sse().send("data: 1\n\n"),
        Reply::sse().send("data: 2\n\n"),
        Reply::sse().send("data: 3\n\n"),
        Reply::sse().send("data: 4\n\n").hang(),
    ])
    .await;
    let mut f = feed(server.url_for("/"));
    f.policy = Policy::Browser;
    // Ignored by the browser policy; the daemon policy would wait 150, 600, 2400 ms + jitter.
    f.backoff.multiplier = 4.0;
    f.backoff.max = Duration::from_secs(10);
    f.backoff.jitter = 1.0;
    let mut d = drive(f, "");
    let mut gaps_seen = 0;
    while gaps_seen < 3 {
        match d.next().await {
            Out::Items(_) => {}
            // An id-less stream reconnecting: the browser policy reports it like the daemon one.
            Out::Gap(GapReason::ReconnectWithoutId, _) => gaps_seen += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    let r = server.wait_for_requests(4, WAIT).await;
    for i in 1..4 {
        let g = gap(&r[i - 1], &r[i]);
        assert!(g >= ms(150) && g < ms(500), "delay {i}: {g:?}");
    }
}

#[tokio::test]
async fn silent_connection_hits_the_idle_timeout() {
    let server = Server::replies(vec![
        Reply::sse().send("id: 1\ndata: a\n\n").hang(),
        Reply::sse().send("data: b\n\n").hang(),
    ])
    .await;
    let mut f = feed(server.url_for("/"));
    f.idle_timeout = ms(300);
    let mut d = drive(f, "");
    assert_eq!(d.events(2).await.len(), 2);
    let r = server.requests();
    assert_eq!(r[1].header("last-event-id").as_deref(), Some("1"));
    assert!(
        r[1].at - r[0].at >= ms(300 + 150),
        "{:?}",
        r[1].at - r[0].at
    );
    let err = last_error(&d);
    assert!(err.contains("idle") && err.contains("test-feed"), "{err}");
}

#[tokio::test]
async fn slow_drip_of_comments_keeps_the_connection_alive() {
    let mut reply = Reply::sse();
    for _ in 0..12 {
        reply = reply.send(":\n").wait(ms(100));
    }
    let server = Server::replies(vec![reply.send("data: done\n\n").hang()]).await;
    let mut f = feed(server.url_for("/"));
    f.idle_timeout = ms(300);
    let mut d = drive(f, "");
    assert_eq!(d.events(1).await, vec![ev("message", "done", "")]);
    assert_eq!(server.count(), 1);
    assert_eq!(d.status.get().last_error, None);
}

#[tokio::test]
async fn response_timeout_when_headers_never_come() {
    let server = Server::replies(vec![
        Reply::sse().delay_headers(Duration::from_secs(3)),
        Reply::sse().send("data: a\n\n").hang(),
    ])
    .await;
    let mut f = feed(server.url_for("/"));
    f.connect_timeout = ms(200);
    f.response_timeout = ms(300);
    let mut d = drive(f, "");
    assert_eq!(d.events(1).await.len(), 1);
    let r = server.requests();
    assert!(
        r[1].at - r[0].at >= ms(500 + 150),
        "{:?}",
        r[1].at - r[0].at
    );
    let err = last_error(&d);
    assert!(err.contains("no response headers"), "{err}");
}

#[tokio::test]
async fn oversized_event_is_an_error_naming_feed_and_size_then_reconnects() {
    let big = format!("data: {}\n\n", "x".repeat(200));
    let server = Server::replies(vec![
        Reply::sse().send("id: 1\ndata: ok\n\n").send(big).hang(),
        Reply::sse().send("data: after\n\n").hang(),
    ])
    .await;
    let mut f = feed(server.url_for("/"));
    f.max_event_size = ByteSize(64);
    let mut d = drive(f, "");
    assert_eq!(
        d.events(2).await,
        vec![ev("message", "ok", "1"), ev("message", "after", "1")]
    );
    let r = server.requests();
    assert_eq!(r[1].header("last-event-id").as_deref(), Some("1"));
    assert!(r[1].at - r[0].at >= ms(150), "{:?}", r[1].at - r[0].at);
    let err = last_error(&d);
    assert!(
        err.contains("test-feed") && err.contains("limit of 64 bytes"),
        "{err}"
    );
}

#[tokio::test]
async fn rejected_id_records_a_gap_and_reconnects_without_it() {
    let server = Server::answer(|r| {
        if r.header("last-event-id").is_some() {
            Reply::status(410)
        } else {
            Reply::sse().send("id: 10\ndata: fresh\n\n").hang()
        }
    })
    .await;
    let mut d = drive(feed(server.url_for("/")), "stale");
    match d.next().await {
        Out::Gap(GapReason::IdRejected, detail) => {
            assert!(
                detail.contains("410") && detail.contains("stale"),
                "{detail}"
            )
        }
        other => panic!("expected an id-rejected gap, got {other:?}"),
    }
    assert_eq!(d.events(1).await, vec![ev("message", "fresh", "10")]);
    let r = server.requests();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].header("last-event-id").as_deref(), Some("stale"));
    assert_eq!(r[1].header("last-event-id"), None);
    assert!(
        gap(&r[0], &r[1]) >= ms(150),
        "through the backoff, not a hot loop"
    );
    d.status_until("new id", |s| s.last_event_id == "10").await;
    d.assert_nothing_produced();
}

#[tokio::test]
async fn an_id_that_cannot_be_a_header_is_not_sent_and_reported() {
    let server = Server::replies(vec![Reply::sse().send("data: a\n\n").hang()]).await;
    let mut d = drive(feed(server.url_for("/")), "bad\u{1}id");
    match d.next().await {
        Out::Gap(GapReason::IdRejected, detail) => {
            assert!(detail.contains("not a valid HTTP header value"), "{detail}")
        }
        other => panic!("expected a gap, got {other:?}"),
    }
    assert_eq!(d.events(1).await.len(), 1);
    assert_eq!(server.requests()[0].header("last-event-id"), None);
}

#[tokio::test]
async fn reconnecting_without_an_id_after_events_is_a_gap() {
    let server = Server::replies(vec![
        Reply::sse().send("data: a\n\n"),
        Reply::sse().send("data: b\n\n").hang(),
    ])
    .await;
    let mut d = drive(feed(server.url_for("/")), "");
    assert_eq!(d.events(1).await, vec![ev("message", "a", "")]);
    match d.next().await {
        Out::Gap(GapReason::ReconnectWithoutId, detail) => {
            assert!(detail.contains("1 events"), "{detail}")
        }
        other => panic!("expected a reconnect-without-id gap, got {other:?}"),
    }
    assert_eq!(d.events(1).await, vec![ev("message", "b", "")]);
    assert_eq!(server.requests()[1].header("last-event-id"), None);
}

#[tokio::test]
async fn bearer_token_from_env() {
    // A variable every test process has: setting one would race with other threads reading
    // the environment. The value is just an opaque token here.
    let token = std::env::var("PATH").expect("PATH is set");
    let server = Server::replies(vec![
        Reply::status(500),
        Reply::sse().send("data: a\n\n").hang(),
    ])
    .await;
    let mut f = feed(server.url_for("/"));
    f.bearer_token_env = Some("PATH".into());
    let mut d = drive(f, "");
    assert_eq!(d.events(1).await.len(), 1);
    let want = format!("Bearer {}", token.trim());
    for r in server.requests() {
        assert_eq!(r.header("authorization").as_deref(), Some(want.as_str()));
    }
    assert!(!last_error(&d).contains(token.trim()));
}

#[tokio::test]
async fn missing_token_variable_fails_at_creation() {
    let mut f = feed("http://127.0.0.1:9/".into());
    f.bearer_token_env = Some("SSE_BRIDGE_TEST_NO_SUCH_TOKEN_VARIABLE".into());
    let err = EventSource::new(Arc::new(f), String::new(), StatusHandle::new())
        .expect_err("missing variable");
    let msg = err.to_string();
    assert!(
        msg.contains("test-feed") && msg.contains("SSE_BRIDGE_TEST_NO_SUCH_TOKEN_VARIABLE"),
        "{msg}"
    );
}

#[tokio::test]
async fn bearer_token_file_is_reread_at_every_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token");
    std::fs::write(&path, "tok-one\n").expect("write token");
    let file = path.clone();
    let server = Server::answer(move |r| {
        if r.index == 0 {
            // Rotate the token before the client's next attempt.
            std::fs::write(&file, "  tok-two  \n").expect("rewrite token");
            Reply::status(503)
        } else {
            Reply::sse().send("data: a\n\n").hang()
        }
    })
    .await;
    let mut f = feed(server.url_for("/"));
    f.bearer_token_file = Some(path);
    let mut d = drive(f, "");
    assert_eq!(d.events(1).await.len(), 1);
    let r = server.requests();
    assert_eq!(
        r[0].header("authorization").as_deref(),
        Some("Bearer tok-one")
    );
    assert_eq!(
        r[1].header("authorization").as_deref(),
        Some("Bearer tok-two")
    );
    assert!(!last_error(&d).contains("tok-"), "{}", last_error(&d));
}

/// `compression = true` asks for gzip and reads a gzip stream written in small, separately
/// flushed pieces (the splits fall anywhere, the gzip header included) as the plain stream.
#[tokio::test]
async fn compression_asks_for_gzip_and_decodes_it_in_any_pieces() {
    use std::io::Write as _;
    let plain: String = (1..=30).map(event_text).collect();
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(plain.as_bytes()).expect("gzip");
    let packed = e.finish().expect("gzip");
    let mut reply = Reply::sse().header("content-encoding", "gzip");
    for piece in packed.chunks(5) {
        reply = reply.send(piece).wait(ms(2));
    }
    let server = Server::replies(vec![reply.hang()]).await;
    let mut f = feed(server.url_for("/"));
    f.compression = true;
    let mut d = drive(f, "");
    let events = d.events(30).await;
    assert_eq!(events[29].id.to_string(), "30");
    assert!(events[0].data.contains("résumé ✓"), "{:?}", events[0]);
    let req = &server.requests()[0];
    assert_eq!(req.header("accept-encoding").as_deref(), Some("gzip"));
    assert!(server.requests()[0].bytes_sent < plain.len() as u64);
}

/// A token helper script counting its runs in `dir/count` and printing `tok-<run>`
/// (or, when `dir/fail` exists, failing with its content on stderr).
fn token_script(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("get-token");
    std::fs::write(
        &script,
        "#!/bin/sh\nd=\"$1\"\nn=$(cat \"$d/count\" 2>/dev/null || echo 0)\nn=$((n+1))\necho $n > \"$d/count\"\nif [ -f \"$d/fail\" ]; then cat \"$d/fail\" >&2; exit 3; fi\necho \"  tok-$n  \"\n",
    )
    .expect("write script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script
}

fn runs(dir: &std::path::Path) -> u32 {
    std::fs::read_to_string(dir.join("count"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// `token_command` runs at every attempt and its trimmed stdout is the bearer token; a 401
/// runs it once more and repeats the request at once (no reconnection, no backoff); a
/// second 401 then backs off like any client error.
#[tokio::test]
async fn token_command_output_is_the_token_and_a_401_fetches_it_again_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = token_script(dir.path());
    let server = Server::answer(|r| match r.header("authorization").as_deref() {
        Some("Bearer tok-1") => Reply::status(401),
        _ => Reply::sse().send("id: 1\ndata: a\n\n").hang(),
    })
    .await;
    let mut f = feed(server.url_for("/"));
    f.token_command = Some(vec![
        script.display().to_string(),
        dir.path().display().to_string(),
    ]);
    let mut d = drive(f.clone(), "");
    assert_eq!(d.events(1).await.len(), 1);
    let r = server.requests();
    let auth: Vec<Option<String>> = r.iter().map(|r| r.header("authorization")).collect();
    assert_eq!(
        auth,
        [Some("Bearer tok-1".into()), Some("Bearer tok-2".into())]
    );
    assert_eq!(runs(dir.path()), 2);
    let s = d.status.get();
    assert_eq!(s.reconnects, 0, "the 401 was retried within the attempt");
    assert_eq!(s.last_error, None);
    drop(d);

    // Always 401: two runs and two requests per attempt, then the client-error delay.
    std::fs::remove_file(dir.path().join("count")).expect("reset count");
    let server = Server::answer(|_| Reply::status(401)).await;
    f.url = server.url_for("/");
    let d = drive(f, "");
    let s = d
        .status_until("a client error", |s| s.errors.contains_key("client"))
        .await;
    assert_eq!(server.count(), 2);
    assert_eq!(runs(dir.path()), 2);
    assert!(
        s.last_error.as_deref().is_some_and(|e| e.contains("401")),
        "{s:?}"
    );
    assert!(!s.last_error.unwrap_or_default().contains("tok-"));
}

/// A failing `token_command` is an error naming the feed, how the program ended and its
/// stderr's first line (scrubbed), and nothing is sent; the feed retries.
#[tokio::test]
async fn a_failing_token_command_is_reported_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = token_script(dir.path());
    std::fs::write(
        dir.path().join("fail"),
        "grant refused for client 42\nmore\n",
    )
    .expect("fail");
    let server = Server::answer(|_| Reply::sse().send("data: a\n\n").hang()).await;
    let mut f = feed(server.url_for("/"));
    f.token_command = Some(vec![
        script.display().to_string(),
        dir.path().display().to_string(),
    ]);
    let mut d = drive(f, "");
    let s = d
        .status_until("a local error", |s| s.errors.contains_key("local"))
        .await;
    let err = s.last_error.unwrap_or_default();
    assert!(
        err.starts_with("feed `test-feed`: GET http://")
            && err.contains(&format!(
                "token_command `{}` failed (exit status: 3): grant refused for client 42",
                script.display()
            ))
            && !err.contains("more"),
        "{err}"
    );
    assert_eq!(server.count(), 0);
    // Fixed: the next attempt (after the backoff) connects.
    std::fs::remove_file(dir.path().join("fail")).expect("unfail");
    assert_eq!(d.events(1).await.len(), 1);
    assert!(server.requests()[0]
        .header("authorization")
        .is_some_and(|a| a.starts_with("Bearer tok-")));
}

/// Collects everything the `tracing` macros write, for one current-thread test.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn secrets_never_appear_in_errors_or_logs() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // Current-thread runtime: every task of this test logs through this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "t0ken-s3cret-value").expect("write token");
    let server = Server::replies(vec![
        Reply::status(500),
        Reply::status(403),
        Reply::sse().send("data: a\n\n"),
    ])
    .await;
    let url = format!(
        "http://user:pa55word@{}/path?apikey=qu3ry-s3cret",
        server.addr
    );
    let mut f = feed(url);
    f.bearer_token_file = Some(token_file);
    f.client_error_delay = ms(150);
    let mut d = drive(f, "");
    assert_eq!(d.events(1).await.len(), 1);
    let err = last_error(&d);
    let shown = server.url_for("/path");
    assert!(names_url(&err, &shown), "{err}");
    let logs = logs.text();
    assert!(
        logs.contains("HTTP 500") && logs.contains("HTTP 403"),
        "{logs}"
    );
    assert!(
        logs.contains("test-feed") && names_url(&logs, &shown),
        "{logs}"
    );
    for secret in ["pa55word", "qu3ry-s3cret", "t0ken-s3cret-value", "apikey"] {
        assert!(!err.contains(secret), "{secret} in {err}");
        assert!(!logs.contains(secret), "{secret} in logs:\n{logs}");
    }
    assert_eq!(
        server.requests()[0].header("authorization").as_deref(),
        Some("Bearer t0ken-s3cret-value")
    );
}

#[tokio::test]
async fn tls_failure_says_tls_and_never_falls_back_to_plain_http() {
    // A plain-HTTP server behind an https:// URL: the TLS handshake cannot succeed.
    let server = Server::answer(|_| Reply::sse().send("data: insecure\n\n").hang()).await;
    let d = drive(feed(format!("https://{}/", server.addr)), "");
    let s = d.status_until("an error", |s| s.last_error.is_some()).await;
    let err = s.last_error.unwrap_or_default();
    assert!(err.contains("TLS") && err.contains("test-feed"), "{err}");
    assert_eq!(s.state, ReadyState::Connecting);
    assert_eq!(server.count(), 0, "no plain HTTP request may be made");
}

#[tokio::test]
async fn next_is_cancel_safe() {
    // Events every 20 ms after a failed first attempt: the caller drops `next()` every 7 ms,
    // during the backoff wait, the connection attempt and the reads. Every event must still
    // arrive exactly once, in order.
    let mut reply = Reply::sse();
    for i in 0..20 {
        reply = reply.send(format!("id: {i}\ndata: {i}\n\n")).wait(ms(20));
    }
    let server = Server::replies(vec![Reply::status(500), reply.hang()]).await;
    let status = StatusHandle::new();
    let mut es = EventSource::new(
        Arc::new(transported(feed(server.url_for("/")))),
        String::new(),
        status,
    )
    .expect("valid feed");
    let mut got = Vec::new();
    let mut cancelled = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < 20 {
        assert!(tokio::time::Instant::now() < deadline, "only {got:?}");
        let mut out = Vec::new();
        match tokio::time::timeout(ms(7), es.next(&mut out)).await {
            Err(_) => {
                assert!(out.is_empty());
                cancelled += 1;
            }
            Ok(Next::Items) => got.extend(out.into_iter().filter_map(|i| match i {
                Item::Event(e) => Some(e.data),
                Item::LastEventId(_) => None,
            })),
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    let want: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
    assert!(cancelled > 20, "the test should cancel often: {cancelled}");
    assert_eq!(
        server.count(),
        2,
        "cancelling must not start extra attempts"
    );
    assert_eq!(es.last_event_id(), "19");
}

/// Every test above, over HTTP/2: this binary again, each feed through an h2c front.
#[test]
fn every_test_here_passes_over_http2() {
    if support::gateway::over_http2() {
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let output = std::process::Command::new(exe)
        .args([
            "--skip",
            "every_test_here_passes_over_http2",
            "--test-threads",
            "4",
        ])
        .env("SSE_BRIDGE_TEST_OVER_HTTP2", "1")
        .output()
        .expect("run the tests over HTTP/2");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "over HTTP/2:\n{stdout}\n{stderr}");
    assert!(stdout.contains("test result: ok."), "{stdout}");
}
