//! What one EventSource client needs to know, in its own terms: the client takes no part of the
//! application's configuration, so it can be built, tested and reused on its own. The daemon
//! builds these from a feed's configuration in one place (`impl From<&FeedConfig>` in
//! `config::feed`), where the meaning of each setting is documented for users.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::secret::Secret;

/// How the client reacts to failures (ARCHITECTURE.md §3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Policy {
    /// Reconnect with exponential backoff and jitter after server errors, network errors and
    /// the end of the stream.
    #[default]
    Daemon,
    /// What a browser's `EventSource` does: reconnect after the reconnection time, stop on
    /// answers a browser would not retry.
    Browser,
}

/// What a client error (another 4xx, a wrong content type) does under the daemon policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnClientError {
    /// Retry after `client_error_delay` (with backoff).
    #[default]
    Retry,
    /// Stop the client for good.
    Stop,
}

/// Delays between reconnection attempts under the daemon policy (see [`super::retry`]).
#[derive(Debug, Clone, PartialEq)]
pub struct BackoffOptions {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    pub jitter: f64,
    /// A connection open at least this long was healthy: the failure count starts over.
    pub reset_after: Duration,
}

impl Default for BackoffOptions {
    fn default() -> Self {
        BackoffOptions {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.3,
            reset_after: Duration::from_secs(60),
        }
    }
}

/// Where a request body comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestBodySource {
    /// This text (held as a secret: a subscription body may carry credentials).
    Inline(Secret),
    /// This file, read at every connection attempt (so an edited filter applies at the next).
    File(PathBuf),
}

/// Where a feed without a checkpoint starts, as a server's `since` query parameter says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// This instant.
    At(SystemTime),
    /// This long before the client was made.
    Ago(Duration),
}

impl Since {
    /// Parses an RFC 3339 timestamp (`2026-12-01T00:00:00Z`, any offset) or a duration (`1h`,
    /// `90min`). The error says what was expected.
    pub fn parse(text: &str) -> Result<Since, String> {
        if let Ok(at) = chrono::DateTime::parse_from_rfc3339(text.trim()) {
            return Ok(Since::At(at.with_timezone(&chrono::Utc).into()));
        }
        humantime::parse_duration(text.trim())
            .map(Since::Ago)
            .map_err(|_| {
                format!("{text:?} is neither an RFC 3339 time such as \"2026-12-01T00:00:00Z\" nor a duration such as \"1h\"")
            })
    }

    /// The query parameter value: the instant in RFC 3339 (UTC, seconds), `Ago` counted back
    /// from `now`.
    pub fn value(self, now: SystemTime) -> String {
        let at = match self {
            Since::At(at) => at,
            Since::Ago(ago) => now.checked_sub(ago).unwrap_or(SystemTime::UNIX_EPOCH),
        };
        humantime::format_rfc3339_seconds(at).to_string()
    }
}

/// The options of one client. `Debug` shows no credential: header values and the URL's
/// userinfo are [`Secret`]s.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientOptions {
    /// The name messages and logs carry (`feed `name`: ...`).
    pub name: String,
    /// The stream's URL; it may carry userinfo, sent as `Authorization: Basic`.
    pub url: Secret,
    /// The request method (`GET`, `POST`, `REPORT`...), sent on every attempt.
    pub method: String,
    /// The request body, re-sent on every attempt (with `Content-Length`; `Content-Type` comes
    /// from `headers`).
    pub body: Option<RequestBodySource>,
    /// Also send a non-empty last event ID as this query parameter (`lastEventID` for
    /// Mercure hubs), besides the `Last-Event-ID` header.
    pub last_event_id_query: Option<String>,
    /// Where a feed starting without a last event ID starts: sent as the `since_query`
    /// parameter until the first connection opens.
    pub start_since: Option<Since>,
    pub since_query: String,
    /// Ask for a gzip body (`Accept-Encoding: gzip`) and decode it.
    pub compression: bool,
    /// Which HTTP versions requests may use.
    pub http_version: super::transport::HttpVersion,
    /// Extra request headers, in order. Every value is held as a secret; `secret_headers`
    /// (and the well-known credential headers) decide which are also scrubbed from text.
    pub headers: Vec<(String, Secret)>,
    /// Header names (any case) whose values are credentials besides the well-known ones.
    pub secret_headers: Vec<String>,
    /// Keep the configured headers and credentials on a redirect to another origin.
    pub forward_headers_on_redirect: bool,
    /// The bearer token's sources, as configured (both set is refused by the client).
    pub bearer_token_env: Option<String>,
    pub bearer_token_file: Option<PathBuf>,
    /// A program (and its arguments) printing the bearer token, run at every attempt.
    pub token_command: Option<Vec<String>>,
    /// A PEM file of extra CA certificates to trust.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// Zero: no idle timeout.
    pub idle_timeout: Duration,
    pub max_event_size: usize,
    pub max_id_size: usize,
    pub max_redirects: usize,
    pub policy: Policy,
    pub on_client_error: OnClientError,
    pub client_error_delay: Duration,
    /// Statuses that, answered to a request with `Last-Event-ID`, mean the ID was rejected.
    pub rejected_id_statuses: Vec<u16>,
    /// The reconnection time until the stream sends `retry:`.
    pub default_retry: Duration,
    pub backoff: BackoffOptions,
}

impl ClientOptions {
    /// Options with the defaults the daemon documents, for `url`.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Self {
        ClientOptions {
            name: name.into(),
            url: Secret::new(url),
            method: "GET".into(),
            body: None,
            last_event_id_query: None,
            start_since: None,
            since_query: "since".into(),
            compression: false,
            http_version: super::transport::HttpVersion::Auto,
            headers: Vec::new(),
            secret_headers: Vec::new(),
            forward_headers_on_redirect: false,
            bearer_token_env: None,
            bearer_token_file: None,
            token_command: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_event_size: 1024 * 1024,
            max_id_size: 4 * 1024,
            max_redirects: 10,
            policy: Policy::Daemon,
            on_client_error: OnClientError::Retry,
            client_error_delay: Duration::from_secs(60),
            rejected_id_statuses: vec![400, 410, 412, 416],
            default_retry: Duration::from_secs(3),
            backoff: BackoffOptions::default(),
        }
    }

    /// Adds a request header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), Secret::new(value)));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_a_time_or_a_duration_back() {
        let at = Since::parse("2026-12-01T01:00:00+01:00").unwrap();
        assert_eq!(at.value(SystemTime::now()), "2026-12-01T00:00:00Z");
        let ago = Since::parse(" 90min ").unwrap();
        assert_eq!(ago, Since::Ago(Duration::from_secs(5400)));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400);
        assert_eq!(ago.value(now), "1970-01-01T22:30:00Z");
        let err = Since::parse("yesterday").unwrap_err();
        assert!(
            err.contains("RFC 3339") && err.contains("yesterday"),
            "{err}"
        );
    }
}
