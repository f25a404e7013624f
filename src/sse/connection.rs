//! The HTTP transport of one feed: one connection attempt, classified, and the body read with
//! an idle timeout. No retry logic here ([`super::retry`]) and no parsing ([`super::parser`]);
//! [`super::client::EventSource`] ties them together.
//!
//! DESIGN.md §3: requests send `Accept: text/event-stream`, `Cache-Control: no-cache` and
//! `Last-Event-ID` when the last event ID is non-empty; a response is open when it is 200 with a
//! `text/event-stream` media type; redirects are followed up to `max_redirects`.
//!
//! Secrets: error messages name the feed and the URL without userinfo or query string (where
//! tokens like to hide), the `Authorization` header is marked sensitive, reqwest errors are
//! stripped of their URL before being shown, and as a last line of defence a message is
//! scrubbed of the token and of the full URL.

use std::error::Error as StdError;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, COOKIE,
    PROXY_AUTHORIZATION, RETRY_AFTER,
};
use reqwest::{redirect, StatusCode, Url};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::retry::parse_retry_after;
use crate::config::FeedConfig;

/// The `Last-Event-ID` request header (lower case, as `HeaderName` spells it).
pub const LAST_EVENT_ID: &str = "last-event-id";

/// The media type of an event stream.
pub const EVENT_STREAM: &str = "text/event-stream";

/// Headers the bridge sets itself; a feed's `headers` cannot override them (config validation
/// rejects them too, this keeps the transport correct on its own).
const RESERVED: [&str; 3] = ["accept", "cache-control", LAST_EVENT_ID];

/// `User-Agent` unless the feed's `headers` set one.
const USER_AGENT: &str = concat!("sse-bridge/", env!("CARGO_PKG_VERSION"));

/// The TLS settings of every feed: exactly what `ClientBuilder::use_rustls_tls()` builds (ring,
/// TLS 1.2 and 1.3, the webpki root certificates, SNI, ALPN `h2` then `http/1.1`), built once.
/// Clones share the root store and the session cache (both behind `Arc`), where a client built
/// by reqwest itself would hold its own copies: about 25 KiB per feed, 250 MiB for 10 000 feeds
/// (issue 5's benchmark).
fn shared_tls_config() -> Result<rustls::ClientConfig, String> {
    static CONFIG: std::sync::OnceLock<Result<rustls::ClientConfig, String>> =
        std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Ok(config)
        })
        .clone()
}

/// A feed that cannot even start: bad URL, bad header, missing token variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("feed `{feed}`: {message}")]
pub struct ClientError {
    pub feed: String,
    pub message: String,
}

/// How a connection attempt (or an open connection) failed. The client maps each kind to the
/// feed's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// 204 No Content: the server asks the client to stop reconnecting.
    NoContent,
    /// 5xx, 408 or 429: the server is (temporarily) unable; `retry_after` may be set.
    Unavailable,
    /// A status in `rejected_id_statuses` answered to a request carrying `Last-Event-ID`.
    IdRejected,
    /// Another 4xx, another non-200 answer (e.g. a 3xx that was not followed), a wrong content
    /// type, too many redirects or an https-to-http redirect: retrying soon will not help.
    Client,
    /// Connect, DNS, TLS, timeouts, a broken or silent connection, end of stream.
    Network,
    /// A problem on this side: the bearer token file or variable is unreadable or empty.
    Local,
}

/// One failure, with a message fit for logs and the status page (names the feed and the URL,
/// never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// The HTTP status, when the failure is an answer.
    pub status: Option<u16>,
    /// The server's `Retry-After`, when it sent a parseable one with a 5xx, 408 or 429.
    pub retry_after: Option<Duration>,
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A connection attempt in flight, running as its own task so the client can keep it across
/// cancelled `next()` calls instead of abandoning it (and stay `Send + Sync`, which a boxed
/// reqwest future is not). Dropping it aborts the attempt.
#[derive(Debug)]
pub struct Attempt {
    task: JoinHandle<Result<Connection, Failure>>,
    inner: Arc<Inner>,
}

impl Attempt {
    /// Waits for the outcome. Cancel-safe; must not be called again once it returned.
    pub async fn outcome(&mut self) -> Result<Connection, Failure> {
        match (&mut self.task).await {
            Ok(result) => result,
            // Only a panic inside reqwest or hyper gets here (the task is aborted only on drop).
            Err(e) => Err(self.inner.failure(
                FailureKind::Network,
                format_args!("the connection attempt failed unexpectedly: {e}"),
            )),
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Makes connection attempts for one feed. Cheap to clone (one `reqwest::Client` per feed).
#[derive(Clone)]
pub struct Connector {
    inner: Arc<Inner>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("feed", &self.inner.feed)
            .field("url", &self.inner.shown_url)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Inner {
    feed: String,
    url: Url,
    /// The URL without userinfo, query or fragment: what messages show.
    shown_url: String,
    client: reqwest::Client,
    /// The feed's extra headers (reserved names removed).
    headers: HeaderMap,
    token: TokenSource,
    rejected_id_statuses: Vec<u16>,
    /// Bound on connecting plus waiting for the response headers.
    header_timeout: Duration,
    connect_timeout: Duration,
    response_timeout: Duration,
    idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
enum TokenSource {
    None,
    Env(String),
    File(PathBuf),
}

impl Connector {
    /// Checks the feed's URL, headers and token variable and builds its HTTP client: rustls,
    /// `connect_timeout`, redirects limited to `max_redirects` (and never from https to http),
    /// and deliberately no overall request timeout, since an event stream never ends.
    pub fn new(feed: &FeedConfig) -> Result<Connector, ClientError> {
        let err = |message: String| ClientError {
            feed: feed.name.clone(),
            message,
        };
        // The URL itself may hold secrets: the parse error never repeats it.
        let url =
            Url::parse(&feed.url).map_err(|e| err(format!("`url` is not a valid URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(err(format!(
                "`url` must be an http:// or https:// URL with a host, not {}",
                display_url(&url)
            )));
        }

        let token = match (&feed.bearer_token_env, &feed.bearer_token_file) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "set either bearer_token_env or bearer_token_file, not both".into(),
                ))
            }
            (Some(var), None) => {
                // Checked now so a missing variable fails the start loudly; read again at every
                // attempt all the same.
                read_env_token(var).map_err(err)?;
                TokenSource::Env(var.clone())
            }
            (None, Some(path)) => TokenSource::File(path.clone()),
            (None, None) => TokenSource::None,
        };

        let mut headers = HeaderMap::new();
        for (name, value) in &feed.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| err(format!("header `{name}` is not a valid HTTP header name")))?;
            if RESERVED.contains(&name.as_str()) {
                return Err(err(format!(
                    "header `{name}` is set by the bridge itself and cannot be configured"
                )));
            }
            if name == AUTHORIZATION && !matches!(token, TokenSource::None) {
                return Err(err(
                    "header `Authorization` conflicts with bearer_token_env / bearer_token_file"
                        .into(),
                ));
            }
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                err(format!(
                    "header `{name}` has a value that is not valid in HTTP"
                ))
            })?;
            if [AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION].contains(&name) {
                value.set_sensitive(true);
            }
            headers.insert(name, value);
        }

        let max_redirects = feed.max_redirects;
        let policy = redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error(RedirectRefused::TooMany(max_redirects));
            }
            let from_https = attempt
                .previous()
                .last()
                .is_some_and(|u| u.scheme() == "https");
            if from_https && attempt.url().scheme() != "https" {
                return attempt.error(RedirectRefused::Downgrade);
            }
            attempt.follow()
        });
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(
                shared_tls_config()
                    .map_err(|e| err(format!("cannot build the HTTP client: {e}")))?,
            )
            .connect_timeout(feed.connect_timeout)
            .redirect(policy)
            .user_agent(USER_AGENT)
            .tcp_nodelay(true)
            // Notices a peer that vanished without a FIN even when idle_timeout is off.
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .build()
            .map_err(|e| {
                err(format!(
                    "cannot build the HTTP client: {}",
                    error_chain(&e.without_url())
                ))
            })?;

        Ok(Connector {
            inner: Arc::new(Inner {
                feed: feed.name.clone(),
                shown_url: display_url(&url),
                url,
                client,
                headers,
                token,
                rejected_id_statuses: feed.rejected_id_statuses.clone(),
                header_timeout: feed.connect_timeout.saturating_add(feed.response_timeout),
                connect_timeout: feed.connect_timeout,
                response_timeout: feed.response_timeout,
                idle_timeout: (!feed.idle_timeout.is_zero()).then_some(feed.idle_timeout),
            }),
        })
    }

    /// The feed's URL as messages show it (no userinfo, no query string).
    pub fn shown_url(&self) -> &str {
        &self.inner.shown_url
    }

    /// Starts one attempt (spawned on the current Tokio runtime): a GET sending
    /// `last_event_id` unless it is empty. An ID that is not a valid header value is not sent
    /// (the client checks [`is_sendable_last_event_id`] first and reports it; this only keeps
    /// the transport total).
    pub fn connect(&self, last_event_id: &str) -> Attempt {
        let id = last_event_id_header(last_event_id);
        Attempt {
            task: tokio::spawn(self.inner.clone().attempt(id)),
            inner: self.inner.clone(),
        }
    }
}

impl Inner {
    fn failure(&self, kind: FailureKind, what: impl fmt::Display) -> Failure {
        Failure {
            kind,
            status: None,
            retry_after: None,
            message: format!("feed `{}`: GET {}: {what}", self.feed, self.shown_url),
        }
    }

    /// Removes anything secret that might have slipped into a message from a lower layer.
    fn scrub(&self, mut failure: Failure, token: Option<&str>) -> Failure {
        if let Some(token) = token.filter(|t| t.len() >= 4) {
            failure.message = failure.message.replace(token, "[redacted]");
        }
        if self.url.as_str() != self.shown_url {
            failure.message = failure.message.replace(self.url.as_str(), &self.shown_url);
        }
        failure
    }

    async fn attempt(
        self: Arc<Self>,
        last_event_id: Option<HeaderValue>,
    ) -> Result<Connection, Failure> {
        let mut headers = self.headers.clone();
        headers.insert(ACCEPT, HeaderValue::from_static(EVENT_STREAM));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        let sent_id = last_event_id.is_some();
        if let Some(id) = last_event_id {
            headers.insert(HeaderName::from_static(LAST_EVENT_ID), id);
        }
        let token = self.read_token().await?;
        if let Some(token) = &token {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                self.failure(
                    FailureKind::Local,
                    "the bearer token contains characters that are not allowed in an HTTP header",
                )
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }

        let send = self.client.get(self.url.clone()).headers(headers).send();
        let result = match tokio::time::timeout(self.header_timeout, send).await {
            Err(_) => Err(self.failure(
                FailureKind::Network,
                format_args!(
                    "timed out: no response headers within {} (connect_timeout {} + response_timeout {})",
                    humantime::format_duration(self.header_timeout),
                    humantime::format_duration(self.connect_timeout),
                    humantime::format_duration(self.response_timeout),
                ),
            )),
            Ok(Err(e)) => Err(self.request_failure(e)),
            Ok(Ok(response)) => self.classify(response, sent_id),
        };
        result.map_err(|f| self.scrub(f, token.as_deref()))
    }

    /// The bearer token for this attempt, read afresh (a file refreshed on disk is picked up).
    async fn read_token(&self) -> Result<Option<String>, Failure> {
        match &self.token {
            TokenSource::None => Ok(None),
            TokenSource::Env(var) => read_env_token(var)
                .map(Some)
                .map_err(|m| self.failure(FailureKind::Local, m)),
            TokenSource::File(path) => {
                let text = tokio::fs::read_to_string(path).await.map_err(|e| {
                    self.failure(
                        FailureKind::Local,
                        format_args!("cannot read bearer_token_file {}: {e}", path.display()),
                    )
                })?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(self.failure(
                        FailureKind::Local,
                        format_args!("bearer_token_file {} is empty", path.display()),
                    ));
                }
                Ok(Some(token.to_string()))
            }
        }
    }

    fn request_failure(&self, e: reqwest::Error) -> Failure {
        let (redirect, timeout, connect) = (e.is_redirect(), e.is_timeout(), e.is_connect());
        let detail = error_chain(&e.without_url());
        if redirect {
            return self.failure(
                FailureKind::Client,
                format_args!("redirect refused: {detail}"),
            );
        }
        let what = if timeout && connect {
            format!(
                "timed out connecting (connect_timeout {}): {detail}",
                humantime::format_duration(self.connect_timeout)
            )
        } else if timeout {
            format!("timed out: {detail}")
        } else if connect && detail.contains("dns error") {
            format!("DNS lookup failed: {detail}")
        } else if connect
            && self.url.scheme() == "https"
            && !detail.contains("tcp connect error")
            && !detail.contains("tcp open error")
        {
            // TCP got through, so the handshake failed. Certificates are always verified;
            // there is no insecure fallback.
            format!("TLS handshake failed (the connection is not retried without TLS verification): {detail}")
        } else if connect {
            format!("connection failed: {detail}")
        } else {
            format!("request failed: {detail}")
        };
        self.failure(FailureKind::Network, what)
    }

    fn classify(
        self: &Arc<Self>,
        response: reqwest::Response,
        sent_id: bool,
    ) -> Result<Connection, Failure> {
        let status = response.status();
        let code = status.as_u16();
        let via = if response.url() != &self.url {
            format!(" (redirected to {})", display_url(response.url()))
        } else {
            String::new()
        };
        let answer = format!(
            "HTTP {code}{}{}{via}",
            if status.canonical_reason().is_some() {
                " "
            } else {
                ""
            },
            status.canonical_reason().unwrap_or("")
        );
        let with_status = |kind, what: String| Failure {
            status: Some(code),
            ..self.failure(kind, what)
        };

        if status == StatusCode::OK {
            let content_type = response.headers().get(CONTENT_TYPE);
            return match content_type {
                Some(v) if v.to_str().is_ok_and(is_event_stream) => Ok(Connection {
                    status,
                    deadline: self
                        .idle_timeout
                        .and_then(|t| Instant::now().checked_add(t)),
                    response,
                    sent_last_event_id: sent_id,
                    inner: self.clone(),
                }),
                Some(v) => Err(with_status(
                    FailureKind::Client,
                    format!(
                        "{answer} with Content-Type `{}`, not {EVENT_STREAM}",
                        shorten(v.to_str().unwrap_or("<not ASCII>"))
                    ),
                )),
                None => Err(with_status(
                    FailureKind::Client,
                    format!("{answer} without a Content-Type (expected {EVENT_STREAM})"),
                )),
            };
        }
        if status == StatusCode::NO_CONTENT {
            return Err(with_status(
                FailureKind::NoContent,
                format!("{answer}: the server asks the client to stop reconnecting"),
            ));
        }
        if status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
        {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            let what = match retry_after {
                // An HTTP date leaves a remainder down to nanoseconds: shown in milliseconds.
                Some(d) => format!(
                    "{answer}, Retry-After {}",
                    humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
                ),
                None => answer,
            };
            return Err(Failure {
                retry_after,
                ..with_status(FailureKind::Unavailable, what)
            });
        }
        if sent_id && self.rejected_id_statuses.contains(&code) {
            return Err(with_status(
                FailureKind::IdRejected,
                format!(
                    "{answer} to the request with a Last-Event-ID (listed in rejected_id_statuses)"
                ),
            ));
        }
        let what = if status.is_client_error() {
            answer
        } else if status.is_redirection() {
            format!("{answer}: a redirect that was not followed (no usable Location header?)")
        } else {
            format!("{answer}: unexpected status (expected 200 with {EVENT_STREAM})")
        };
        Err(with_status(FailureKind::Client, what))
    }
}

/// An open event stream: the body, read chunk by chunk with the idle timeout.
pub struct Connection {
    status: StatusCode,
    /// Read with `chunk()`, which is cancel-safe (it only takes a frame once it is ready).
    response: reqwest::Response,
    /// When the idle timeout fires unless bytes arrive first. Kept here rather than in a
    /// per-call timer so that a cancelled [`Connection::next_chunk`] does not extend it.
    deadline: Option<Instant>,
    sent_last_event_id: bool,
    inner: Arc<Inner>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("feed", &self.inner.feed)
            .field("status", &self.status)
            .field("sent_last_event_id", &self.sent_last_event_id)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// The status of the accepted response (200).
    pub fn status(&self) -> u16 {
        self.status.as_u16()
    }

    /// Whether the request that opened this connection carried `Last-Event-ID`.
    pub fn sent_last_event_id(&self) -> bool {
        self.sent_last_event_id
    }

    /// The next non-empty chunk of the body; `Ok(None)` at end of stream. Any bytes (comments
    /// included) restart the idle timeout. Cancel-safe: dropping the future loses no bytes.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, Failure> {
        loop {
            let next = match self.deadline {
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                        Ok(next) => next,
                        Err(_) => {
                            let idle = self.inner.idle_timeout.unwrap_or_default();
                            return Err(self.inner.failure(
                            FailureKind::Network,
                            format_args!(
                                "idle timeout: no bytes for {} (idle_timeout); dropping the connection",
                                humantime::format_duration(idle)
                            ),
                        ));
                        }
                    }
                }
                None => self.response.chunk().await,
            };
            match next {
                Ok(None) => return Ok(None),
                Ok(Some(bytes)) if bytes.is_empty() => continue,
                Ok(Some(bytes)) => {
                    self.deadline = self
                        .inner
                        .idle_timeout
                        .and_then(|t| Instant::now().checked_add(t));
                    return Ok(Some(bytes));
                }
                Err(e) => {
                    let detail = error_chain(&e.without_url());
                    let failure = self.inner.failure(
                        FailureKind::Network,
                        format_args!("connection broken while reading the stream: {detail}"),
                    );
                    return Err(self.inner.scrub(failure, None));
                }
            }
        }
    }

    /// A failure describing the end of the stream, for the client's logs and status.
    pub fn eof_failure(&self) -> Failure {
        self.inner
            .failure(FailureKind::Network, "the server ended the stream (EOF)")
    }
}

/// Why a redirect was not followed.
#[derive(Debug)]
enum RedirectRefused {
    TooMany(usize),
    Downgrade,
}

impl fmt::Display for RedirectRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedirectRefused::TooMany(max) => {
                write!(
                    f,
                    "too many redirects (more than max_redirects = {max}; a redirect loop?)"
                )
            }
            RedirectRefused::Downgrade => {
                f.write_str("redirect from https to http refused (it would drop TLS)")
            }
        }
    }
}

impl StdError for RedirectRefused {}

/// Reads a bearer token from an environment variable; the error never contains the value.
fn read_env_token(var: &str) -> Result<String, String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
        Ok(_) => Err(format!(
            "bearer_token_env: environment variable `{var}` is empty"
        )),
        Err(_) => Err(format!(
            "bearer_token_env: environment variable `{var}` is not set (or not UTF-8)"
        )),
    }
}

/// Whether a `Content-Type` value is the `text/event-stream` media type: parameters such as
/// `; charset=utf-8` allowed, case-insensitive, surrounding whitespace ignored.
pub fn is_event_stream(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|media| media.trim().eq_ignore_ascii_case(EVENT_STREAM))
}

/// Whether a last event ID can be sent as a `Last-Event-ID` header value (the parser already
/// excludes CR, LF and NUL; other control characters are possible).
pub fn is_sendable_last_event_id(id: &str) -> bool {
    HeaderValue::from_str(id).is_ok()
}

/// The header value for a last event ID: `None` when it is empty or not sendable.
pub fn last_event_id_header(id: &str) -> Option<HeaderValue> {
    if id.is_empty() {
        return None;
    }
    HeaderValue::from_str(id).ok()
}

/// A URL as messages show it: without userinfo, query string or fragment.
pub fn display_url(url: &Url) -> String {
    let mut url = url.clone();
    // These fail only for URLs that cannot have userinfo, which then has none to remove.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

/// An error and its sources, joined by `: `, skipping a source whose text its parent already
/// contains (several layers repeat their cause).
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(err);
    while let Some(e) = current {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

/// At most 100 characters of a server-provided string, for messages.
fn shorten(s: &str) -> String {
    if s.chars().count() <= 100 {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(100).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_stream_media_type() {
        for ok in [
            "text/event-stream",
            "TEXT/Event-Stream",
            "text/event-stream; charset=utf-8",
            " text/event-stream ;charset=UTF-8",
            "text/event-stream;",
        ] {
            assert!(is_event_stream(ok), "{ok:?}");
        }
        for bad in [
            "",
            "text/plain",
            "text/event-streams",
            "text/event-stream-x",
            "application/json; x=text/event-stream",
            "text/html, text/event-stream",
        ] {
            assert!(!is_event_stream(bad), "{bad:?}");
        }
    }

    #[test]
    fn shown_url_drops_userinfo_query_and_fragment() {
        let url =
            Url::parse("https://user:pa55@example.org:8443/a/b?token=s3cret&x=1#frag").unwrap();
        assert_eq!(display_url(&url), "https://example.org:8443/a/b");
        let plain = Url::parse("http://example.org/stream").unwrap();
        assert_eq!(display_url(&plain), "http://example.org/stream");
    }

    #[test]
    fn last_event_id_header_values() {
        assert_eq!(last_event_id_header(""), None);
        assert_eq!(
            last_event_id_header("42-abc"),
            Some(HeaderValue::from_static("42-abc"))
        );
        assert!(is_sendable_last_event_id("with space and\ttab"));
        assert!(!is_sendable_last_event_id("bell\u{7}"));
        assert!(!is_sendable_last_event_id("del\u{7f}"));
        assert_eq!(last_event_id_header("esc\u{1b}"), None);
    }

    #[test]
    fn new_rejects_bad_urls_without_repeating_secrets() {
        let f = FeedConfig::new("f", "ftp://user:s3cret@example.org/x?t=1");
        let e = Connector::new(&f).unwrap_err();
        assert!(e.message.contains("http"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let f = FeedConfig::new("f", "not a url s3cret");
        let e = Connector::new(&f).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("feed `f`: `url` is not a valid URL"),
            "{e}"
        );
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn new_rejects_bad_headers_and_token_conflicts() {
        let mut f = FeedConfig::new("f", "http://example.org/");
        f.headers.insert("Accept".into(), "x".into());
        let m = Connector::new(&f).unwrap_err().message;
        assert!(m.contains("`accept` is set by the bridge"), "{m}");
        let mut f = FeedConfig::new("f", "http://example.org/");
        f.headers.insert("bad header".into(), "x".into());
        assert!(Connector::new(&f).is_err());
        let mut f = FeedConfig::new("f", "http://example.org/");
        f.headers.insert("X-Ok".into(), "bad\nvalue".into());
        assert!(Connector::new(&f).is_err());
        let mut f = FeedConfig::new("f", "http://example.org/");
        f.bearer_token_file = Some("/nonexistent".into());
        f.headers.insert("Authorization".into(), "Basic x".into());
        assert!(Connector::new(&f)
            .unwrap_err()
            .message
            .contains("conflicts"));
    }

    #[test]
    fn new_requires_the_token_variable() {
        let mut f = FeedConfig::new("f", "http://example.org/");
        f.bearer_token_env = Some("SSE_BRIDGE_TEST_SURELY_UNSET_VARIABLE_3141".into());
        let e = Connector::new(&f).unwrap_err();
        assert!(
            e.message
                .contains("SSE_BRIDGE_TEST_SURELY_UNSET_VARIABLE_3141"),
            "{e}"
        );
        // A file is read at each attempt instead: a missing one is not fatal at start.
        let mut f = FeedConfig::new("f", "http://example.org/");
        f.bearer_token_file = Some("/nonexistent/token".into());
        assert!(Connector::new(&f).is_ok());
    }

    #[test]
    fn error_chain_skips_repeated_causes() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl fmt::Display for E {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0)
            }
        }
        impl StdError for E {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                self.1.as_deref().map(|e| e as &(dyn StdError + 'static))
            }
        }
        let e = E(
            "outer: inner",
            Some(Box::new(E("inner", Some(Box::new(E("root", None)))))),
        );
        assert_eq!(error_chain(&e), "outer: inner: root");
    }

    #[test]
    fn long_server_strings_are_shortened() {
        assert_eq!(shorten("abc"), "abc");
        let long = "x".repeat(500);
        assert_eq!(shorten(&long).chars().count(), 101);
    }
}
