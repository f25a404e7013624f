//! `[[feed]]`: one EventSource subscription.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::units::ByteSize;
use crate::sse::options::{self as sse, ClientOptions};
use crate::sse::secret::Secret;

/// One SSE feed. Each feed runs as its own task with its own connection, parser and
/// checkpoint; one feed's failure never affects another.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// Unique name of the feed: 1 to 100 characters of `A-Z a-z 0-9 . _ -`, not starting with
    /// `.`. Used in routes, sink templates (`{feed}`), logs and the checkpoint key.
    pub name: String,

    /// The `http` or `https` URL of the event stream. The checkpoint is keyed by name and URL:
    /// changing the URL starts from an empty Last-Event-ID (and records a gap).
    pub url: String,

    /// The request method: `GET` (default), or any other a server streams in answer to, such
    /// as `POST` or `REPORT` (LLM and GraphQL-over-SSE streams, subscription APIs that take a
    /// filter). Case-sensitive; `HEAD`, `CONNECT` and `TRACE` are refused.
    #[serde(default = "defaults::method")]
    pub method: String,
    /// The request body, sent (with `Content-Length`) on every connection attempt, reconnections
    /// included, together with `Last-Event-ID`. Set its type in `headers`, for example
    /// `{ "Content-Type" = "application/json" }`. Never logged.
    #[serde(default)]
    pub body: Option<String>,
    /// A file holding the request body instead of `body`, read at every connection attempt
    /// (an edited filter applies at the next reconnection). It must be a regular file of at
    /// most 1 MiB; anything else fails the attempt with an error naming the file.
    #[serde(default)]
    pub body_file: Option<PathBuf>,
    /// Also send the last event ID as this query parameter, on every request that sends it
    /// (as `Last-Event-ID` too): `"lastEventID"` for Mercure hubs. None by default.
    #[serde(default)]
    pub last_event_id_query: Option<String>,
    /// Where a feed without a checkpoint starts: `{ since = "2026-12-01T00:00:00Z" }` (an RFC
    /// 3339 time) or `{ since = "1h" }` (that long before the feed starts), sent as the
    /// `since_query` parameter on its first connection only (until one opens). A feed with a
    /// checkpoint resumes from its last event ID instead.
    #[serde(default)]
    pub start: Option<StartConfig>,
    /// The query parameter name of `start.since` (`since`, as Wikimedia EventStreams takes).
    #[serde(default = "defaults::since_query")]
    pub since_query: String,
    /// Ask for a gzip-compressed stream (`Accept-Encoding: gzip`) and decode it; worth it for
    /// verbose JSON events over a slow or metered link. Without it a compressed answer is an
    /// error, since the bridge asked for none.
    #[serde(default)]
    pub compression: bool,
    /// Which HTTP versions the feed may use: `"auto"` (the default: over TLS the bridge offers
    /// HTTP/2 and HTTP/1.1 and the server chooses; `http://` is HTTP/1.1), `"1.1"` (a
    /// connection of its own per feed) or `"2"` (HTTP/2 only; on `http://`, with prior
    /// knowledge, h2c). Over HTTP/2 the feeds of one origin (scheme, host, port, TLS settings,
    /// proxy) are streams on shared connections: a new connection opens when the others carry
    /// as many streams as the server allows (`SETTINGS_MAX_CONCURRENT_STREAMS`, at most 128).
    #[serde(default)]
    pub http_version: HttpVersion,
    /// Extra request headers, for example `{ "User-Agent" = "my-bridge (ops@example.org)" }`.
    /// `Accept`, `Cache-Control` and `Last-Event-ID` are set by the bridge and cannot be
    /// overridden here. Put secrets in `bearer_token_env` / `bearer_token_file` instead.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,

    /// Names of `headers` whose values are credentials, for example `["X-Tenant-Key"]`.
    /// `Authorization`, `Proxy-Authorization`, `Cookie`, `X-Api-Key`, `Api-Key` and
    /// `X-Auth-Token` are secret without being listed. The value of a secret header (and the
    /// credential after its scheme, as in `Token abc…`) is removed from everything the bridge
    /// prints, even when a server echoes it back; values shorter than 4 bytes are not searched
    /// for (they would garble every message).
    #[serde(default)]
    pub secret_headers: Vec<String>,

    /// Whether a redirect to another origin (scheme, host or port) still gets the feed's
    /// `headers`. `false` (default): a cross-origin redirect drops all of them, with the
    /// URL's userinfo and the bearer token, so a server cannot hand the feed's credentials to
    /// a host of its choosing. `true` forwards them all, credentials included: set it only
    /// when the feed's redirects stay among hosts you trust with them.
    #[serde(default)]
    pub forward_headers_on_redirect: bool,

    /// Name of an environment variable holding a bearer token, sent as
    /// `Authorization: Bearer <token>`. The token never appears in logs or errors.
    #[serde(default)]
    pub bearer_token_env: Option<String>,

    /// Path of a file holding a bearer token (surrounding whitespace is trimmed). The file is
    /// re-read at every connection attempt, so a token refreshed on disk is picked up.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,

    /// A program and its arguments, for example `["/usr/local/bin/get-token", "feed-x"]`, run
    /// (without a shell) at every connection attempt, within 10 s; its stdout, trimmed, is sent
    /// as `Authorization: Bearer <token>`, and is never logged. On a `401` it runs once more and
    /// the request is repeated before backing off. A failure (exit status, first line of stderr)
    /// is an error naming the feed; the feed retries with backoff.
    #[serde(default)]
    pub token_command: Option<Vec<String>>,
    /// Path of a PEM file of CA certificates to trust for this feed, in addition to the
    /// built-in web root certificates: for an internal event API whose certificate a private
    /// CA signed. Read when the feed starts (and at a reload that changes the feed). There is
    /// no option to skip certificate verification.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,

    /// How long to wait for the TCP (and TLS) connection.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,

    /// How long to wait for the response headers once connected.
    #[serde(default = "defaults::response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,

    /// Reconnect when no bytes at all (comments included) arrived for this long.
    /// `"0s"` disables the idle timeout.
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,

    /// Largest line or event (data buffer) accepted, as bytes or `"1 MiB"`. A larger one is an
    /// error naming the feed and the size; the feed reconnects from its last event ID.
    #[serde(default = "defaults::max_event_size")]
    pub max_event_size: ByteSize,

    /// Longest `id:` value accepted, as bytes or `"4 KiB"` (default 4 KiB). The id is stored
    /// with every event until the stream changes it, so a server sending a huge id would
    /// multiply every stored event's size; a longer one is an error on that event, handled
    /// like an oversized event (the feed reconnects from its last event ID).
    #[serde(default = "defaults::max_id_size")]
    pub max_id_size: ByteSize,

    /// Redirects followed per connection attempt before giving up.
    #[serde(default = "defaults::max_redirects")]
    pub max_redirects: usize,

    /// `daemon` (default): reconnect with backoff on network errors, an end of the stream
    /// before any event, idle timeouts, 5xx and 429 (honouring `Retry-After`); a stream that
    /// delivered events and then ended is a routine close, followed after the reconnection
    /// time as a browser does; other 4xx and a wrong content type follow
    /// `on_client_error`. `browser`: exactly the WHATWG EventSource: any non-200 answer or a
    /// wrong content type closes the feed for good, and reconnects wait exactly the stream's
    /// `retry:` time with no backoff.
    #[serde(default)]
    pub policy: Policy,

    /// Under the `daemon` policy, what a 4xx answer (other than 408 and 429), a wrong content
    /// type or a redirect loop does: `retry` (default) waits at least `client_error_delay` and
    /// logs an error on every attempt; `stop` puts the feed in the stopped state.
    #[serde(default)]
    pub on_client_error: OnClientError,

    /// The least delay before retrying after a client error (see `on_client_error`).
    #[serde(default = "defaults::client_error_delay", with = "humantime_serde")]
    pub client_error_delay: Duration,

    /// Statuses that, answered to a request that carried `Last-Event-ID`, mean the server
    /// rejected the stored ID. The bridge records a gap and reconnects without the ID.
    /// An empty list disables this.
    #[serde(default = "defaults::rejected_id_statuses")]
    pub rejected_id_statuses: Vec<u16>,

    /// The reconnection time until the stream sends a `retry:` field (the standard leaves the
    /// initial value to the user agent; browsers use about 3 s). No reconnection happens sooner.
    #[serde(default = "defaults::default_retry", with = "humantime_serde")]
    pub default_retry: Duration,

    /// Reconnection backoff.
    #[serde(default)]
    pub backoff: BackoffConfig,

    /// `false` keeps the feed in the config without running it.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
}

/// Shows the URL without userinfo or query, and secret header values as `[redacted]`: a
/// config printed for debugging must not carry the feed's credentials.
impl std::fmt::Debug for FeedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::secret::{is_secret_header, REDACTED};
        let url = url::Url::parse(&self.url)
            .map(|u| crate::sse::connection::display_url(&u))
            .unwrap_or_else(|_| "<not a URL>".to_string());
        let headers: BTreeMap<&str, &str> = self
            .headers
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_header(k, &self.secret_headers) {
                    REDACTED
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("FeedConfig")
            .field("name", &self.name)
            .field("url", &url)
            .field("method", &self.method)
            .field(
                "body",
                &self.body.as_ref().map(|b| format!("<{} bytes>", b.len())),
            )
            .field("body_file", &self.body_file)
            .field("last_event_id_query", &self.last_event_id_query)
            .field("start", &self.start)
            .field("since_query", &self.since_query)
            .field("compression", &self.compression)
            .field("http_version", &self.http_version)
            .field("headers", &headers)
            .field("secret_headers", &self.secret_headers)
            .field(
                "forward_headers_on_redirect",
                &self.forward_headers_on_redirect,
            )
            .field("bearer_token_env", &self.bearer_token_env)
            .field("bearer_token_file", &self.bearer_token_file)
            .field("token_command", &self.token_command)
            .field("ca_file", &self.ca_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_event_size", &self.max_event_size)
            .field("max_redirects", &self.max_redirects)
            .field("policy", &self.policy)
            .field("on_client_error", &self.on_client_error)
            .field("client_error_delay", &self.client_error_delay)
            .field("rejected_id_statuses", &self.rejected_id_statuses)
            .field("default_retry", &self.default_retry)
            .field("backoff", &self.backoff)
            .field("enabled", &self.enabled)
            .finish()
    }
}

/// `start`: where a feed without a checkpoint starts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StartConfig {
    /// An RFC 3339 time (`"2026-12-01T00:00:00Z"`) or a duration back from the start
    /// (`"1h"`).
    pub since: String,
}

/// See `FeedConfig::http_version`. Written as a string (`"auto"`, `"1.1"`, `"2"`), or as the
/// number an operator is likely to type (`2`, `1.1`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum HttpVersion {
    #[default]
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "1.1")]
    Http1,
    #[serde(rename = "2")]
    Http2,
}

impl<'de> Deserialize<'de> for HttpVersion {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        const EXPECTED: &str = "one of `auto`, `1.1`, `2`";
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HttpVersion;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HttpVersion, E> {
                match v {
                    "auto" => Ok(HttpVersion::Auto),
                    "1.1" => Ok(HttpVersion::Http1),
                    "2" | "2.0" => Ok(HttpVersion::Http2),
                    other => Err(E::custom(format!(
                        "unknown value `{other}`; expected {EXPECTED}"
                    ))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<HttpVersion, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<HttpVersion, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<HttpVersion, E> {
                match v {
                    1.1 => Ok(HttpVersion::Http1),
                    2.0 => Ok(HttpVersion::Http2),
                    other => Err(E::custom(format!(
                        "unknown value `{other}`; expected {EXPECTED}"
                    ))),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// How a feed reacts to failures. See `FeedConfig::policy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    #[default]
    Daemon,
    Browser,
}

/// See `FeedConfig::on_client_error`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnClientError {
    #[default]
    Retry,
    Stop,
}

/// `[feed.backoff]`: delays between reconnection attempts under the `daemon` policy.
///
/// The n-th consecutive failed attempt waits
/// `max(retry, min(max, max(initial, retry) * multiplier^(n-1)))`, then adds a random
/// `0..jitter` fraction of that on top, where `retry` is the stream's `retry:` value (3 s until
/// the server sends one). So a delay is never shorter than the server asked for, and feeds that
/// fail together do not reconnect together. A `Retry-After` header raises the delay further.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    /// Delay of the first retry, before the `retry:` floor applies.
    #[serde(default = "defaults::backoff_initial", with = "humantime_serde")]
    pub initial: Duration,
    /// Cap on the exponential part of the delay.
    #[serde(default = "defaults::backoff_max", with = "humantime_serde")]
    pub max: Duration,
    /// Growth factor per consecutive failure (at least 1.0).
    #[serde(default = "defaults::backoff_multiplier")]
    pub multiplier: f64,
    /// Random extra delay as a fraction of the delay, 0.0 to 1.0.
    #[serde(default = "defaults::backoff_jitter")]
    pub jitter: f64,
    /// A connection that stayed open this long resets the failure count.
    #[serde(default = "defaults::backoff_reset_after", with = "humantime_serde")]
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: defaults::backoff_initial(),
            max: defaults::backoff_max(),
            multiplier: defaults::backoff_multiplier(),
            jitter: defaults::backoff_jitter(),
            reset_after: defaults::backoff_reset_after(),
        }
    }
}

/// The one place a feed's configuration becomes the EventSource client's options.
impl From<&FeedConfig> for ClientOptions {
    fn from(feed: &FeedConfig) -> Self {
        ClientOptions {
            name: feed.name.clone(),
            url: Secret::new(feed.url.as_str()),
            method: feed.method.clone(),
            // Both set is refused by validation; the inline body wins here.
            body: match (&feed.body, &feed.body_file) {
                (Some(text), _) => Some(sse::RequestBodySource::Inline(Secret::new(text.as_str()))),
                (None, Some(path)) => Some(sse::RequestBodySource::File(path.clone())),
                (None, None) => None,
            },
            last_event_id_query: feed.last_event_id_query.clone(),
            // Validation refuses an unparseable one.
            start_since: feed
                .start
                .as_ref()
                .and_then(|s| sse::Since::parse(&s.since).ok()),
            since_query: feed.since_query.clone(),
            compression: feed.compression,
            http_version: match feed.http_version {
                HttpVersion::Auto => crate::sse::transport::HttpVersion::Auto,
                HttpVersion::Http1 => crate::sse::transport::HttpVersion::Http1,
                HttpVersion::Http2 => crate::sse::transport::HttpVersion::Http2,
            },
            headers: feed
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), Secret::new(value.as_str())))
                .collect(),
            secret_headers: feed.secret_headers.clone(),
            forward_headers_on_redirect: feed.forward_headers_on_redirect,
            bearer_token_env: feed.bearer_token_env.clone(),
            bearer_token_file: feed.bearer_token_file.clone(),
            token_command: feed.token_command.clone(),
            ca_file: feed.ca_file.clone(),
            connect_timeout: feed.connect_timeout,
            response_timeout: feed.response_timeout,
            idle_timeout: feed.idle_timeout,
            max_event_size: feed.max_event_size.as_usize(),
            max_id_size: feed.max_id_size.as_usize(),
            max_redirects: feed.max_redirects,
            policy: match feed.policy {
                Policy::Daemon => sse::Policy::Daemon,
                Policy::Browser => sse::Policy::Browser,
            },
            on_client_error: match feed.on_client_error {
                OnClientError::Retry => sse::OnClientError::Retry,
                OnClientError::Stop => sse::OnClientError::Stop,
            },
            client_error_delay: feed.client_error_delay,
            rejected_id_statuses: feed.rejected_id_statuses.clone(),
            default_retry: feed.default_retry,
            backoff: sse::BackoffOptions {
                initial: feed.backoff.initial,
                max: feed.backoff.max,
                multiplier: feed.backoff.multiplier,
                jitter: feed.backoff.jitter,
                reset_after: feed.backoff.reset_after,
            },
        }
    }
}

impl From<std::sync::Arc<FeedConfig>> for ClientOptions {
    fn from(feed: std::sync::Arc<FeedConfig>) -> Self {
        ClientOptions::from(&*feed)
    }
}

impl From<FeedConfig> for ClientOptions {
    fn from(feed: FeedConfig) -> Self {
        ClientOptions::from(&feed)
    }
}

impl FeedConfig {
    /// A feed with every option at its default, for tests and examples.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Self {
        FeedConfig {
            name: name.into(),
            url: url.into(),
            method: defaults::method(),
            body: None,
            body_file: None,
            last_event_id_query: None,
            start: None,
            since_query: defaults::since_query(),
            compression: false,
            http_version: HttpVersion::Auto,
            headers: BTreeMap::new(),
            secret_headers: Vec::new(),
            forward_headers_on_redirect: false,
            bearer_token_env: None,
            bearer_token_file: None,
            token_command: None,
            ca_file: None,
            connect_timeout: defaults::connect_timeout(),
            response_timeout: defaults::response_timeout(),
            idle_timeout: defaults::idle_timeout(),
            max_event_size: defaults::max_event_size(),
            max_id_size: defaults::max_id_size(),
            max_redirects: defaults::max_redirects(),
            policy: Policy::default(),
            on_client_error: OnClientError::default(),
            client_error_delay: defaults::client_error_delay(),
            rejected_id_statuses: defaults::rejected_id_statuses(),
            default_retry: defaults::default_retry(),
            backoff: BackoffConfig::default(),
            enabled: true,
        }
    }
}

pub(crate) mod defaults {
    use super::*;

    pub fn yes() -> bool {
        true
    }
    pub fn since_query() -> String {
        "since".into()
    }
    pub fn method() -> String {
        "GET".into()
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn response_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn max_event_size() -> ByteSize {
        ByteSize::mib(1)
    }
    pub fn max_id_size() -> ByteSize {
        ByteSize(4 * 1024)
    }
    pub fn max_redirects() -> usize {
        10
    }
    pub fn client_error_delay() -> Duration {
        Duration::from_secs(60)
    }
    pub fn rejected_id_statuses() -> Vec<u16> {
        vec![400, 410, 412, 416]
    }
    pub fn default_retry() -> Duration {
        Duration::from_secs(3)
    }
    pub fn backoff_initial() -> Duration {
        Duration::from_secs(1)
    }
    pub fn backoff_max() -> Duration {
        Duration::from_secs(60)
    }
    pub fn backoff_multiplier() -> f64 {
        2.0
    }
    pub fn backoff_jitter() -> f64 {
        0.3
    }
    pub fn backoff_reset_after() -> Duration {
        Duration::from_secs(60)
    }
}
