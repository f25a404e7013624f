//! The reconnecting EventSource of one feed: [`Connector`] (transport), [`Parser`] (the stream
//! format) and [`Backoff`] (delays) tied into one loop, keeping the feed's [`StatusHandle`]
//! current (ARCHITECTURE.md §3).
//!
//! The loop is a small state machine stored in the struct ([`Phase`]), never in the future of
//! [`EventSource::next`]: the connection attempt in flight is a boxed future kept across calls,
//! the backoff wait is a deadline, the idle timeout is a deadline in the [`Connection`], and
//! every state change happens between awaits. So a caller may drop `next()` at any await
//! (shutdown, `select!`) and call it again later: nothing is lost or done twice.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::connection::{
    is_sendable_last_event_id, Attempt, Connection, Connector, Failure, FailureKind,
};
use super::options::{ClientOptions, OnClientError, Policy};
use super::parser::{Item, Limits, Parser};
use super::retry::{Backoff, FailureClass, MAX_SERVER_DELAY};
use super::status::{ReadyState, StatusHandle};
use super::transport::Transport;

pub use super::connection::ClientError;

/// What [`EventSource::next`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Items were appended to `out` (at least one).
    Items,
    /// The feed could not resume faithfully; record it. Returned before any item of the
    /// connection it concerns.
    Gap {
        reason: GapKind,
        detail: String,
        /// The last event ID the gap concerns: for [`GapKind::IdRejected`] the ID rejected or
        /// unsendable (the client has already dropped it), else the current one.
        last_event_id: String,
    },
    /// The feed stopped for good (204, or the policy failed the connection); `next` keeps
    /// returning this without connecting again. The status handle says `Stopped`.
    Stopped { reason: String },
}

/// Why a client could not resume faithfully (events may have been lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapKind {
    /// It reconnected while its last event ID was empty, after events were received: the
    /// stream carries no ids, so events sent while it was away are lost.
    ReconnectWithoutId,
    /// The server rejected the last event ID (a status in `rejected_id_statuses`), or the ID
    /// could not be sent as a header; the client reconnects without it.
    IdRejected,
}

/// Where the loop stands between two calls of `next`.
enum Phase {
    /// Connect now (the first connection).
    Start,
    /// Wait until the deadline, then connect.
    Waiting { until: Instant },
    /// A connection attempt in flight.
    Connecting { attempt: Attempt },
    /// Reading an accepted response.
    Open {
        conn: Connection,
        opened_at: Instant,
    },
    /// Stopped for good.
    Stopped { reason: String },
}

/// How loudly [`EventSource::failed`] logs a failure it retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    /// Client and local errors at error level (an operator must act), others at warn.
    ByKind,
    /// Error: the stream broke a limit (`max_event_size`).
    Error,
    /// Info: the server ended the stream, which servers do routinely (e.g. to rebalance).
    Info,
}

/// A reconnecting EventSource for one feed.
pub struct EventSource {
    /// The name messages carry, and the two options the loop itself applies (the rest live in
    /// the connector and the backoff): no copy of the options is kept per feed.
    name: String,
    policy: Policy,
    on_client_error: OnClientError,
    connector: Connector,
    parser: Parser,
    backoff: Backoff,
    status: StatusHandle,
    phase: Phase,
    /// Connection attempts started so far.
    attempts: u64,
    /// Events dispatched by this EventSource so far.
    events_seen: u64,
    /// `events_seen` when the current (or last) connection opened: a clean end after more
    /// events than this is a routine close, not a failure.
    events_at_open: u64,
    /// A gap (ID rejected or unsendable) was already reported for the next connection to open,
    /// so that opening it without an ID is not reported a second time.
    gap_reported: bool,
    /// The last event ID last published to the status handle.
    shown_id: String,
    /// The start position (`since` query parameter) of a feed that started without a last
    /// event ID, sent until a connection opens.
    since: Option<String>,
}

impl std::fmt::Debug for EventSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSource")
            .field("feed", &self.name)
            .field("last_event_id", &self.parser.last_event_id())
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl EventSource {
    /// A client for `options`, resuming from `start_last_event_id` (the checkpoint; may be
    /// empty), over the lean HTTP/1.1 transport. Fails on what can never work: a bad URL or
    /// header, a missing token variable. Nothing is connected until [`EventSource::next`] is
    /// polled.
    pub fn new(
        options: impl Into<ClientOptions>,
        start_last_event_id: String,
        status: StatusHandle,
    ) -> Result<Self, ClientError> {
        let options = options.into();
        let connector = Connector::new(&options)?;
        Ok(EventSource::with_connector(
            &options,
            connector,
            start_last_event_id,
            status,
        ))
    }

    /// [`EventSource::new`] over the given transport (which follows redirects itself).
    pub fn with_transport(
        options: &ClientOptions,
        transport: Arc<dyn Transport>,
        start_last_event_id: String,
        status: StatusHandle,
    ) -> Result<Self, ClientError> {
        let connector = Connector::with_transport(options, transport)?;
        Ok(EventSource::with_connector(
            options,
            connector,
            start_last_event_id,
            status,
        ))
    }

    fn with_connector(
        feed: &ClientOptions,
        connector: Connector,
        start_last_event_id: String,
        status: StatusHandle,
    ) -> Self {
        let size = feed.max_event_size;
        let mut parser = Parser::new(Limits {
            max_line_bytes: size,
            max_event_bytes: size,
            max_id_bytes: feed.max_id_size,
        });
        parser.start_stream(&start_last_event_id);
        status.update(|s| {
            s.state = ReadyState::Connecting;
            s.last_event_id.clone_from(&start_last_event_id);
            s.current_backoff = None;
            s.open_since = None;
        });
        EventSource {
            backoff: Backoff::for_feed(feed),
            name: feed.name.clone(),
            policy: feed.policy,
            on_client_error: feed.on_client_error,
            connector,
            parser,
            status,
            phase: Phase::Start,
            attempts: 0,
            events_seen: 0,
            events_at_open: 0,
            gap_reported: false,
            since: feed
                .start_since
                .filter(|_| start_last_event_id.is_empty())
                .map(|since| since.value(SystemTime::now())),
            shown_id: start_last_event_id,
        }
    }

    /// The last event ID the next reconnection would send (empty: none).
    pub fn last_event_id(&self) -> &str {
        self.parser.last_event_id()
    }

    /// The status handle this client keeps current.
    pub fn status(&self) -> &StatusHandle {
        &self.status
    }

    /// Waits for the next items (appended to `out`, at least one when [`Next::Items`]),
    /// connecting and reconnecting as needed.
    ///
    /// Cancel-safe: the caller may drop the future at any await (shutdown) without corrupting
    /// state or losing parsed items (items are appended and returned without an await between).
    pub async fn next(&mut self, out: &mut Vec<Item>) -> Next {
        loop {
            match &mut self.phase {
                Phase::Stopped { reason } => {
                    return Next::Stopped {
                        reason: reason.clone(),
                    }
                }
                Phase::Start => {
                    if let Some(gap) = self.start_attempt() {
                        return gap;
                    }
                }
                Phase::Waiting { until } => {
                    tokio::time::sleep_until(*until).await;
                    if let Some(gap) = self.start_attempt() {
                        return gap;
                    }
                }
                Phase::Connecting { attempt } => {
                    let result = attempt.outcome().await;
                    let next = match result {
                        Ok(conn) => self.opened(conn),
                        Err(failure) => self.failed(failure, None, Level::ByKind),
                    };
                    if let Some(next) = next {
                        return next;
                    }
                }
                Phase::Open { conn, opened_at } => {
                    let opened_at = *opened_at;
                    let chunk = match conn.next_chunk().await {
                        Ok(Some(bytes)) => {
                            self.status.add_received_bytes(bytes.len());
                            bytes
                        }
                        Ok(None) => {
                            // The unfinished event (if any) is discarded, as the standard says.
                            let eof = conn.eof_failure();
                            self.parser.finish();
                            self.failed(eof, Some(opened_at.elapsed()), Level::Info);
                            continue;
                        }
                        Err(failure) => {
                            self.failed(failure, Some(opened_at.elapsed()), Level::ByKind);
                            continue;
                        }
                    };
                    let before = out.len();
                    let result = self.parser.push(&chunk, out);
                    self.after_push(before, out);
                    if let Err(e) = result {
                        let failure = Failure {
                            kind: FailureKind::Network,
                            status: None,
                            retry_after: None,
                            message: format!(
                                "feed `{}`: {} {}: {e}; dropping the connection (the next one resumes from last event ID `{}`)",
                                self.name,
                                self.connector.method(),
                                self.connector.shown_url(),
                                self.parser.last_event_id()
                            ),
                        };
                        // Read-phase failures reconnect under every policy: never a Gap or a
                        // stop here, so the items dispatched before the error still go out.
                        self.failed(failure, Some(opened_at.elapsed()), Level::Error);
                    }
                    if out.len() > before {
                        return Next::Items;
                    }
                }
            }
        }
    }

    /// Starts a connection attempt with the current last event ID. Returns a gap when that ID
    /// cannot be sent as a header (it is then dropped, like a rejected one).
    fn start_attempt(&mut self) -> Option<Next> {
        let mut gap = None;
        let id = self.parser.last_event_id();
        if !id.is_empty() && !is_sendable_last_event_id(id) {
            let detail = format!(
                "the last event ID {id:?} is not a valid HTTP header value, so it cannot be sent as Last-Event-ID; connecting without it, events since then may be lost"
            );
            let message = self
                .connector
                .scrub(&format!("feed `{}`: {detail}", self.name));
            tracing::warn!(feed = %self.name, "{message}");
            let rejected = id.to_owned();
            self.parser.start_stream("");
            self.gap_reported = true;
            self.status.update(|s| {
                s.last_error = Some(message);
                s.last_error_at = Some(SystemTime::now());
            });
            gap = Some(Next::Gap {
                reason: GapKind::IdRejected,
                detail,
                last_event_id: rejected,
            });
        }
        let reconnect = self.attempts > 0;
        self.attempts += 1;
        let id = self.parser.last_event_id().to_owned();
        tracing::debug!(
            feed = %self.name,
            attempt = self.attempts,
            last_event_id = %id,
            "connecting to {}",
            self.connector.shown_url()
        );
        self.status.update(|s| {
            s.state = ReadyState::Connecting;
            s.current_backoff = None;
            s.open_since = None;
            if reconnect {
                s.reconnects += 1;
            }
            s.last_event_id.clone_from(&id);
        });
        self.shown_id = id;
        self.phase = Phase::Connecting {
            attempt: self
                .connector
                .connect_with(&self.shown_id, self.since.as_deref()),
        };
        gap
    }

    /// The response was accepted: start a new stream in the parser, publish `Open`, and report a
    /// gap if this reconnection cannot resume (no ID although events were received before).
    fn opened(&mut self, conn: Connection) -> Option<Next> {
        let id = self.parser.last_event_id().to_owned();
        self.parser.start_stream(&id);
        tracing::info!(
            feed = %self.name,
            status = conn.status(),
            protocol = conn.info().map_or("", |i| i.protocol.as_str()),
            last_event_id = %id,
            reconnects = self.attempts.saturating_sub(1),
            "connected to {}",
            self.connector.shown_url()
        );
        let info = conn.info();
        self.status.update(|s| {
            s.state = ReadyState::Open;
            s.current_backoff = None;
            s.open_since = Some(SystemTime::now());
            s.protocol = info.map(|i| i.protocol.as_str());
            s.connection = info.map(|i| i.id);
        });
        let gap = (id.is_empty() && self.events_seen > 0 && !self.gap_reported).then(|| {
            Next::Gap {
                reason: GapKind::ReconnectWithoutId,
                detail: format!(
                    "reconnected without a Last-Event-ID after {} events (the stream carries no ids): events sent while disconnected are lost",
                    self.events_seen
                ),
                last_event_id: String::new(),
            }
        });
        self.gap_reported = false;
        self.events_at_open = self.events_seen;
        // The stream started where asked; later connections resume by ID.
        self.since = None;
        self.phase = Phase::Open {
            conn,
            opened_at: Instant::now(),
        };
        gap
    }

    /// Bookkeeping after the parser appended `out[before..]`: count events, take a new `retry:`
    /// value, publish a changed last event ID.
    fn after_push(&mut self, before: usize, out: &[Item]) {
        self.events_seen += out[before..]
            .iter()
            .filter(|i| matches!(i, Item::Event(_)))
            .count() as u64;
        if let Some(ms) = self.parser.take_retry() {
            self.backoff.set_reconnection_time_ms(ms);
            tracing::debug!(
                feed = %self.name,
                "reconnection time set to {} by the stream",
                humantime::format_duration(self.backoff.reconnection_time())
            );
        }
        if self.parser.last_event_id() != self.shown_id {
            self.shown_id = self.parser.last_event_id().to_owned();
            let id = &self.shown_id;
            self.status.update(|s| s.last_event_id.clone_from(id));
        }
    }

    /// A connection attempt failed, or an open connection ended (`open_for` set). Applies the
    /// policy: stop (returns `Stopped`), or schedule the next attempt after the backoff delay
    /// (returns a `Gap` when the server rejected the ID, else nothing), logging at `level`.
    fn failed(
        &mut self,
        mut failure: Failure,
        open_for: Option<Duration>,
        level: Level,
    ) -> Option<Next> {
        // Every message reaches the logs and the status through here: scrubbed of the feed's
        // secrets whatever made it (the transport scrubs its own; the parser's may quote data).
        failure.message = self.connector.scrub(&failure.message);
        if let Some(open_for) = open_for {
            self.backoff.connection_closed(open_for);
        }
        let kind = failure.kind;
        let class = error_class(kind, level);
        self.status
            .update(|s| *s.errors.entry(class).or_default() += 1);
        let browser = self.policy == Policy::Browser;
        match kind {
            FailureKind::NoContent => return Some(self.stop(failure.message)),
            FailureKind::Unavailable | FailureKind::IdRejected | FailureKind::Client if browser => {
                return Some(self.stop(format!(
                    "{}; the browser policy does not reconnect after this",
                    failure.message
                )))
            }
            FailureKind::Client if self.on_client_error == OnClientError::Stop => {
                return Some(self.stop(format!("{}; on_client_error = \"stop\"", failure.message)))
            }
            _ => {}
        }

        let class = if kind == FailureKind::Client {
            FailureClass::ClientError
        } else {
            FailureClass::Transient
        };
        // A stream that opened, delivered events and then ended cleanly was healthy: servers
        // and proxies end responses routinely (every 30-100 s, or after a batch). It is followed
        // as a browser follows it, after the reconnection time; only failures escalate.
        let routine =
            level == Level::Info && open_for.is_some() && self.events_seen > self.events_at_open;
        let delay = if routine {
            self.backoff.routine_close()
        } else {
            self.backoff.next_delay(class, failure.retry_after)
        };
        // Rounded to milliseconds: nobody needs nanoseconds in a log line.
        let shown_delay =
            humantime::format_duration(Duration::from_millis(delay.as_millis() as u64));
        let failures = self.backoff.failures();
        let name = &self.name;
        let message = &failure.message;
        match kind {
            FailureKind::Client => tracing::error!(
                feed = %name, delay_ms = delay.as_millis() as u64, failures,
                "{message}; retrying in {shown_delay} (on_client_error = \"retry\")"
            ),
            FailureKind::Local => tracing::error!(
                feed = %name, delay_ms = delay.as_millis() as u64, failures,
                "{message}; retrying in {shown_delay}"
            ),
            _ if level == Level::Error => tracing::error!(
                feed = %name, delay_ms = delay.as_millis() as u64, failures,
                "{message}; reconnecting in {shown_delay}"
            ),
            _ if level == Level::Info => tracing::info!(
                feed = %name, delay_ms = delay.as_millis() as u64, failures,
                "{message}; reconnecting in {shown_delay}"
            ),
            _ => tracing::warn!(
                feed = %name, delay_ms = delay.as_millis() as u64, failures,
                "{message}; reconnecting in {shown_delay}"
            ),
        }

        let gap = (kind == FailureKind::IdRejected).then(|| {
            let id = self.parser.last_event_id().to_owned();
            self.parser.start_stream("");
            self.gap_reported = true;
            Next::Gap {
                reason: GapKind::IdRejected,
                detail: format!(
                    "the server answered HTTP {} to Last-Event-ID `{id}`; reconnecting without an ID, events since then may be lost",
                    failure.status.unwrap_or_default()
                ),
                last_event_id: id,
            }
        });

        let id = self.parser.last_event_id().to_owned();
        self.status.update(|s| {
            s.state = ReadyState::Connecting;
            s.last_error = Some(failure.message);
            s.last_error_at = Some(SystemTime::now());
            s.current_backoff = Some(delay);
            s.open_since = None;
            s.last_event_id.clone_from(&id);
        });
        self.shown_id = id;
        let now = Instant::now();
        let until = now
            .checked_add(delay)
            .or_else(|| now.checked_add(MAX_SERVER_DELAY))
            .unwrap_or(now);
        self.phase = Phase::Waiting { until };
        gap
    }

    /// Stops the feed for good and publishes it.
    fn stop(&mut self, reason: String) -> Next {
        let reason = self.connector.scrub(&reason);
        tracing::error!(feed = %self.name, "{reason}; the feed is stopped until restarted");
        self.status.update(|s| {
            s.state = ReadyState::Stopped;
            s.last_error = Some(reason.clone());
            s.last_error_at = Some(SystemTime::now());
            s.current_backoff = None;
            s.open_since = None;
        });
        self.phase = Phase::Stopped {
            reason: reason.clone(),
        };
        Next::Stopped { reason }
    }
}

/// The class a failure is counted under (see [`super::status::ERROR_CLASSES`]).
fn error_class(kind: FailureKind, level: Level) -> &'static str {
    match (kind, level) {
        (FailureKind::Network, Level::Info) => "eof",
        (FailureKind::Network, Level::Error) => "too_large",
        (FailureKind::Network, Level::ByKind) => "network",
        (FailureKind::Unavailable, _) => "unavailable",
        (FailureKind::Client, _) => "client",
        (FailureKind::IdRejected, _) => "id_rejected",
        (FailureKind::NoContent, _) => "no_content",
        (FailureKind::Local, _) => "local",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The supervisor holds an `EventSource` across awaits in a spawned task and shares
    /// `&FeedTask` across them: it must be `Send + Sync` (hence the attempt runs as a task
    /// rather than a stored boxed future, which is not `Sync`).
    #[test]
    fn event_source_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<EventSource>();
    }

    #[tokio::test]
    async fn new_publishes_connecting_and_the_start_id_without_connecting() {
        let status = StatusHandle::new();
        let feed = ClientOptions::new("f", "http://127.0.0.1:9/");
        let es = EventSource::new(feed, "41".into(), status.clone()).unwrap();
        assert_eq!(es.last_event_id(), "41");
        let s = status.get();
        assert_eq!(s.state, ReadyState::Connecting);
        assert_eq!(s.last_event_id, "41");
        assert_eq!(s.reconnects, 0);
        assert_eq!(es.attempts, 0);
    }

    #[test]
    fn new_rejects_a_bad_url() {
        let feed = ClientOptions::new("f", "nope");
        let err = EventSource::new(feed, String::new(), StatusHandle::new()).unwrap_err();
        assert!(err.to_string().starts_with("feed `f`:"), "{err}");
    }

    /// A transport that answers from a script and records what it was asked: the state
    /// machine without a socket.
    mod scripted {
        use std::collections::VecDeque;
        use std::sync::Mutex;
        use std::task::{Context, Poll};

        use bytes::Bytes;

        use super::super::super::transport::{
            Body, Response, ResponseFuture, Transport, TransportError,
        };

        /// One answer: a response whose body hands out `chunks` then ends (or waits forever
        /// when `end` is false), or a connection failure.
        #[derive(Debug)]
        pub enum Reply {
            Response {
                status: u16,
                headers: Vec<(&'static str, &'static str)>,
                chunks: Vec<Bytes>,
                end: bool,
            },
            Refused,
        }

        impl Reply {
            /// A 200 event stream with `chunks`, that ends after them if `end`.
            pub fn stream(chunks: Vec<Bytes>, end: bool) -> Reply {
                Reply::Response {
                    status: 200,
                    headers: vec![("content-type", "text/event-stream")],
                    chunks,
                    end,
                }
            }

            pub fn status(status: u16) -> Reply {
                Reply::Response {
                    status,
                    headers: Vec::new(),
                    chunks: Vec::new(),
                    end: true,
                }
            }
        }

        #[derive(Debug, Default)]
        pub struct Scripted {
            replies: Mutex<VecDeque<Reply>>,
            /// The requests' headers, in order.
            pub requests: Mutex<Vec<http::HeaderMap>>,
        }

        impl Scripted {
            pub fn new(replies: Vec<Reply>) -> Scripted {
                Scripted {
                    replies: Mutex::new(replies.into()),
                    requests: Mutex::default(),
                }
            }

            pub fn sent(&self) -> Vec<http::HeaderMap> {
                self.requests.lock().unwrap().clone()
            }
        }

        impl Transport for Scripted {
            fn send(self: std::sync::Arc<Self>, request: http::Request<()>) -> ResponseFuture {
                self.requests
                    .lock()
                    .unwrap()
                    .push(request.headers().clone());
                let reply = self.replies.lock().unwrap().pop_front();
                Box::pin(async move {
                    match reply {
                        // The script ran out: nobody answers.
                        None => std::future::pending().await,
                        Some(Reply::Refused) => Err(TransportError::NoAddress {
                            host: "scripted".into(),
                        }),
                        Some(Reply::Response {
                            status,
                            headers,
                            chunks,
                            end,
                        }) => {
                            let body: Box<dyn Body> = Box::new(ScriptedBody {
                                chunks: chunks.into(),
                                end,
                            });
                            let mut response = Response::new(body);
                            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            for (k, v) in headers {
                                response.headers_mut().append(k, v.parse().unwrap());
                            }
                            Ok(response)
                        }
                    }
                })
            }
        }

        #[derive(Debug)]
        struct ScriptedBody {
            chunks: VecDeque<Bytes>,
            end: bool,
        }

        impl Body for ScriptedBody {
            fn poll_chunk(
                &mut self,
                _: &mut Context<'_>,
            ) -> Poll<Result<Option<Bytes>, TransportError>> {
                match self.chunks.pop_front() {
                    Some(chunk) => Poll::Ready(Ok(Some(chunk))),
                    None if self.end => Poll::Ready(Ok(None)),
                    None => Poll::Pending,
                }
            }
        }
    }

    use bytes::Bytes;
    use scripted::{Reply, Scripted};

    /// Options with fast, jitter-free reconnections (the 100 ms floor still applies).
    fn fast() -> ClientOptions {
        let mut o = ClientOptions::new("f", "http://scripted.invalid/s");
        o.default_retry = Duration::from_millis(100);
        o.backoff.initial = Duration::from_millis(200);
        o.backoff.jitter = 0.0;
        o
    }

    fn source(o: &ClientOptions, t: &Arc<Scripted>, id: &str) -> EventSource {
        EventSource::with_transport(o, t.clone(), id.into(), StatusHandle::new()).unwrap()
    }

    /// Calls `next` until `n` items arrived (or fails after 5 s), returning them and every
    /// other `Next` seen on the way.
    async fn items(es: &mut EventSource, n: usize) -> (Vec<Item>, Vec<Next>) {
        let mut out = Vec::new();
        let mut others = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.len() < n {
            match tokio::time::timeout_at(deadline, es.next(&mut out)).await {
                Ok(Next::Items) => {}
                Ok(other) => others.push(other),
                Err(_) => panic!("only {out:?} (and {others:?}) within 5 s"),
            }
        }
        (out, others)
    }

    #[tokio::test]
    async fn an_immediate_204_stops_for_good_without_asking_again() {
        let t = Arc::new(Scripted::new(vec![Reply::status(204)]));
        let mut es = source(&fast(), &t, "");
        let mut out = Vec::new();
        match es.next(&mut out).await {
            Next::Stopped { reason } => assert!(reason.contains("HTTP 204 No Content"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(es.next(&mut out).await, Next::Stopped { .. }));
        assert!(out.is_empty());
        assert_eq!(t.sent().len(), 1);
        let s = es.status().get();
        assert_eq!(s.state, ReadyState::Stopped);
        assert_eq!(s.errors.get("no_content"), Some(&1));
    }

    #[tokio::test]
    async fn a_500_backs_off_then_reconnects_and_reads() {
        let t = Arc::new(Scripted::new(vec![
            Reply::status(500),
            Reply::stream(vec![Bytes::from_static(b"data: a\n\n")], false),
        ]));
        let mut es = source(&fast(), &t, "");
        let started = Instant::now();
        let (got, others) = items(&mut es, 1).await;
        // The first failure waits backoff.initial (no jitter), never less.
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
        assert!(others.is_empty(), "{others:?}");
        assert!(
            matches!(&got[0], Item::Event(e) if e.data == "a"),
            "{got:?}"
        );
        let s = es.status().get();
        assert_eq!(s.state, ReadyState::Open);
        assert_eq!(s.reconnects, 1);
        assert_eq!(s.errors.get("unavailable"), Some(&1));
        assert!(s
            .last_error
            .unwrap()
            .contains("HTTP 500 Internal Server Error"));
        assert_eq!(t.sent().len(), 2);
        for headers in t.sent() {
            assert_eq!(headers["accept"], "text/event-stream");
            assert_eq!(headers["cache-control"], "no-cache");
        }
    }

    #[tokio::test]
    async fn a_body_split_into_any_chunks_parses_the_same() {
        let stream: &[u8] =
            b"\xEF\xBB\xBFid: 1\r\nevent: x\r\ndata: h\xC3\xA9llo\r\ndata: world\r\n\r\n: c\nid: 2\rdata: z\n\n";
        let whole = Arc::new(Scripted::new(vec![Reply::stream(
            vec![Bytes::from_static(stream)],
            false,
        )]));
        let (want, _) = items(&mut source(&fast(), &whole, ""), 2).await;
        assert_eq!(want.len(), 2);
        assert!(
            matches!(&want[0], Item::Event(e) if e.data == "h\u{e9}llo\nworld" && &*e.id == "1")
        );
        for size in [1, 2, 3, 7] {
            // Empty chunks (framing only) between the pieces change nothing either.
            let chunks = stream
                .chunks(size)
                .flat_map(|c| [Bytes::copy_from_slice(c), Bytes::new()])
                .collect();
            let t = Arc::new(Scripted::new(vec![Reply::stream(chunks, false)]));
            let (got, _) = items(&mut source(&fast(), &t, ""), 2).await;
            assert_eq!(got, want, "chunks of {size}");
        }
    }

    /// Servers end healthy streams routinely: a stream that delivered events and then ended
    /// cleanly reconnects after the reconnection time (100 ms here) every time, where a
    /// failure would wait 200, 400, 800 ms.
    #[tokio::test]
    async fn a_routine_close_reconnects_after_the_reconnection_time_without_escalating() {
        let batch =
            |data: &'static str| Reply::stream(vec![Bytes::from_static(data.as_bytes())], true);
        let t = Arc::new(Scripted::new(vec![
            batch("data: a\n\n"),
            batch("data: b\n\n"),
            batch("data: c\n\n"),
            Reply::stream(vec![Bytes::from_static(b"data: d\n\n")], false),
        ]));
        let mut es = source(&fast(), &t, "");
        let started = Instant::now();
        let (got, others) = items(&mut es, 4).await;
        let elapsed = started.elapsed();
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(
            elapsed >= Duration::from_millis(300) && elapsed < Duration::from_millis(1000),
            "three routine closes took {elapsed:?}"
        );
        // No ids, so each reconnection is a gap, as before.
        assert_eq!(others.len(), 3, "{others:?}");
        assert_eq!(es.backoff.failures(), 0);
        assert_eq!(es.status().get().errors.get("eof"), Some(&3));
    }

    /// An end before any event is a failure: the backoff grows (200 ms, then 400 ms).
    #[tokio::test]
    async fn an_end_before_any_event_still_backs_off() {
        let t = Arc::new(Scripted::new(vec![
            Reply::stream(vec![Bytes::from_static(b"data: a\n\n")], true),
            Reply::stream(vec![Bytes::from_static(b": only a comment\n")], true),
            Reply::stream(Vec::new(), true),
            Reply::stream(vec![Bytes::from_static(b"id: 1\ndata: b\n\n")], false),
        ]));
        let mut es = source(&fast(), &t, "");
        let started = Instant::now();
        let (got, _) = items(&mut es, 2).await;
        assert_eq!(got.len(), 2, "{got:?}");
        // 100 ms (routine) + 200 ms + 400 ms (failures).
        assert!(
            started.elapsed() >= Duration::from_millis(700),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(t.sent().len(), 4);
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// With `compression`, a gzip body is decoded whatever the split of the compressed bytes
    /// (one byte at a time included), and parses exactly as the plain stream does.
    #[tokio::test]
    async fn a_gzip_body_split_into_any_chunks_parses_the_same() {
        let plain: Vec<u8> = (1..=40)
            .flat_map(|n| {
                format!("id: {n}\nevent: e\ndata: {{\"n\":{n},\"r\":\"r\u{e9}sum\u{e9}\"}}\n\n")
                    .into_bytes()
            })
            .collect();
        let packed = gzip(&plain);
        let mut o = fast();
        o.compression = true;
        let plain_t = Arc::new(Scripted::new(vec![Reply::stream(
            vec![Bytes::from(plain.clone())],
            false,
        )]));
        let (want, _) = items(&mut source(&o, &plain_t, ""), 40).await;
        for size in [1, 2, 3, 7, 100, packed.len()] {
            let chunks = packed.chunks(size).map(Bytes::copy_from_slice).collect();
            let t = Arc::new(Scripted::new(vec![Reply::Response {
                status: 200,
                headers: vec![
                    ("content-type", "text/event-stream"),
                    ("content-encoding", "gzip"),
                ],
                chunks,
                end: false,
            }]));
            let (got, others) = items(&mut source(&o, &t, ""), 40).await;
            assert_eq!(got, want, "chunks of {size}");
            assert!(others.is_empty(), "{others:?}");
            assert_eq!(t.sent()[0]["accept-encoding"], "gzip");
        }
    }

    /// Without `compression` no coding is asked for, and a gzip answer is an error as before;
    /// with it, a corrupt body drops the connection with an error that says so.
    #[tokio::test]
    async fn unrequested_or_corrupt_gzip_is_an_error() {
        let gz = |chunks: Vec<Bytes>| Reply::Response {
            status: 200,
            headers: vec![
                ("content-type", "text/event-stream"),
                ("content-encoding", "gzip"),
            ],
            chunks,
            end: true,
        };
        let t = Arc::new(Scripted::new(vec![gz(vec![Bytes::from(gzip(
            b"data: a\n\n",
        ))])]));
        let mut es = source(&fast(), &t, "");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_millis(300), es.next(&mut out)).await;
        assert!(out.is_empty());
        assert!(!t.sent()[0].contains_key("accept-encoding"));
        let err = es.status().get().last_error.unwrap_or_default();
        assert!(err.contains("Content-Encoding `gzip`"), "{err}");

        let mut o = fast();
        o.compression = true;
        let mut bad = gzip(b"data: a\n\n");
        // The gzip header, then a deflate block of the reserved type 3.
        bad.truncate(10);
        bad.extend_from_slice(&[0xff; 16]);
        let t = Arc::new(Scripted::new(vec![gz(vec![Bytes::from(bad)])]));
        let mut es = source(&o, &t, "");
        let _ = tokio::time::timeout(Duration::from_millis(300), es.next(&mut out)).await;
        assert!(out.is_empty());
        let err = es.status().get().last_error.unwrap_or_default();
        assert!(err.contains("gzip-encoded body cannot be decoded"), "{err}");
    }

    #[tokio::test]
    async fn reconnections_resume_from_the_last_id_and_a_rejected_id_is_a_gap() {
        let t = Arc::new(Scripted::new(vec![
            Reply::Refused,
            Reply::stream(vec![Bytes::from_static(b"id: 7\ndata: a\n\n")], true),
            Reply::status(410),
            Reply::stream(vec![Bytes::from_static(b"data: b\n\n")], false),
        ]));
        let mut es = source(&fast(), &t, "5");
        let (got, others) = items(&mut es, 2).await;
        assert!(
            matches!(&got[1], Item::Event(e) if e.data == "b" && e.id.is_empty()),
            "{got:?}"
        );
        match &others[..] {
            [Next::Gap {
                reason: GapKind::IdRejected,
                detail,
                last_event_id,
            }] => {
                assert_eq!(last_event_id, "7");
                assert!(
                    detail.contains("HTTP 410") && detail.contains('7'),
                    "{detail}"
                )
            }
            other => panic!("{other:?}"),
        }
        let ids: Vec<Option<String>> = t
            .sent()
            .iter()
            .map(|h| {
                h.get("last-event-id")
                    .map(|v| v.to_str().unwrap().to_owned())
            })
            .collect();
        assert_eq!(
            ids,
            [Some("5".into()), Some("5".into()), Some("7".into()), None]
        );
        assert_eq!(es.status().get().errors.get("network"), Some(&1));
    }
}
