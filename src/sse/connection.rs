//! One connection attempt of a feed, on the client's side of the [`Transport`]: the request
//! (URL, headers, credentials, `Last-Event-ID`), the bound on waiting for its response, the
//! response classified for the client's policy, and the body read with an idle timeout. No
//! retry logic here ([`super::retry`]), no parsing of the stream ([`super::parser`]) and no wire
//! format ([`super::transport`]); [`super::client::EventSource`] ties them together.
//!
//! ARCHITECTURE.md §3: requests send `Accept: text/event-stream`, `Cache-Control: no-cache` and
//! `Last-Event-ID` when the last event ID is non-empty; a response is open when it is 200 with a
//! `text/event-stream` media type; redirects are followed up to `max_redirects` (by the
//! transport, never from https to http; a redirect to another origin drops the configured
//! headers and credentials unless `forward_headers_on_redirect`).
//!
//! - a bound of `connect_timeout + response_timeout` on everything up to the response headers
//!   (the transport bounds each connection by `connect_timeout`);
//! - userinfo in the URL sent as `Authorization: Basic` unless another `Authorization` is set;
//! - the bearer token read afresh at every attempt, from a variable or a file.
//!
//! What a response means is [`super::response`]'s: the bridge asks for no coding (gzip only
//! with `compression`, decoded here by [`Gunzip`]), so any other `Content-Encoding`, or a
//! `Transfer-Encoding` other than `chunked`, is a failure naming the coding instead of
//! compressed bytes fed to the parser.
//!
//! Secrets: error messages name the feed and the URL without userinfo or query string (where
//! tokens like to hide), never a header value, and every message is scrubbed of the feed's
//! secret values ([`Redactor`]: userinfo in every form, the bearer token, secret headers) when
//! it is made, so that text a server echoes back (a Content-Type, a redirect target) cannot
//! carry a credential into logs or the status.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CACHE_CONTROL,
    CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING,
};
use http::Method;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use url::Url;

use super::options::{ClientOptions, RequestBodySource};
use super::response::{self, Verdict};
use super::secret::{is_secret_header, Redactor, Secret, MIN_SECRET_LEN, REDACTED};
use super::token_command;
use super::transport::client::HttpTransport;
use super::transport::proxy::system_proxies;
use super::transport::redirect::RedirectRules;
use super::transport::{
    self, Body, ConnectTimeout, FinalUrl, RequestBody, Transport, TransportError,
};

pub use super::transport::display_url;
pub use super::transport::tls::tls_config_with_ca_file;

/// The `Last-Event-ID` request header (lower case, as `HeaderName` spells it).
pub const LAST_EVENT_ID: &str = "last-event-id";

pub use super::response::{is_event_stream, EVENT_STREAM};

/// Headers the bridge sets itself; a feed's `headers` cannot override them (config validation
/// rejects them too, this keeps the transport correct on its own).
const RESERVED: [&str; 3] = ["accept", "cache-control", LAST_EVENT_ID];

/// Headers that frame the request body: the transport sets them from the body.
const FRAMING: [HeaderName; 2] = [CONTENT_LENGTH, TRANSFER_ENCODING];

/// What a request keeps on a redirect to another origin: the headers the bridge sets itself
/// and the body's type, which describe the request rather than who makes it.
static KEEP_ACROSS_ORIGINS: [HeaderName; 4] = [
    ACCEPT,
    CACHE_CONTROL,
    HeaderName::from_static(LAST_EVENT_ID),
    CONTENT_TYPE,
];

/// Methods a feed cannot use: no response body (`HEAD`), not a request for a resource
/// (`CONNECT`), or an echo (`TRACE`).
pub const UNUSABLE_METHODS: [&str; 3] = ["HEAD", "CONNECT", "TRACE"];

/// Checks a feed's `method`: an HTTP token, case-sensitive (`post` is not `POST`), usable for
/// a stream. The error says what to write instead.
pub fn check_method(method: &str) -> Result<Method, String> {
    let parsed = Method::from_bytes(method.as_bytes()).map_err(|_| {
        format!("`method` {method:?} is not an HTTP method (a token such as GET, POST or REPORT)")
    })?;
    let upper = method.to_ascii_uppercase();
    if UNUSABLE_METHODS.contains(&upper.as_str()) {
        return Err(format!("`method` {method} cannot open an event stream"));
    }
    if upper != method
        && [
            "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "REPORT", "SEARCH", "QUERY",
        ]
        .contains(&upper.as_str())
    {
        return Err(format!(
            "`method` {method:?}: methods are case-sensitive, write {upper:?}"
        ));
    }
    Ok(parsed)
}

/// A feed that cannot even start: bad URL, bad header, missing token variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("feed `{feed}`: {message}")]
pub struct ClientError {
    pub feed: String,
    pub message: String,
}

/// Why the bearer token could not be read. Never contains the value.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("bearer_token_env: environment variable `{0}` is empty")]
    EnvEmpty(String),
    #[error("bearer_token_env: environment variable `{0}` is not set (or not UTF-8)")]
    EnvUnset(String),
    #[error("cannot read bearer_token_file {}: {source}", .path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bearer_token_file {} is empty", .0.display())]
    FileEmpty(PathBuf),
    #[error(transparent)]
    Command(token_command::CommandError),
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
/// future is not). Dropping it aborts the attempt. The task ends when the attempt does, so an
/// open connection costs no task of its own.
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
            // Only a panic gets here (the task is aborted only on drop).
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

/// Makes connection attempts for one feed. Cheap to clone.
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

struct Inner {
    feed: String,
    method: Method,
    body: BodySource,
    /// The query parameter names of the last event ID (if configured) and of the start position.
    last_event_id_query: Option<String>,
    since_query: String,
    /// Send `Accept-Encoding: gzip` and decode a gzip body.
    compression: bool,
    url: Url,
    /// The URL without userinfo, query or fragment: what messages show.
    shown_url: String,
    /// The feed's extra headers (reserved names removed), with `Authorization: Basic` from the
    /// URL's userinfo unless the feed sets `Authorization` itself.
    headers: HeaderMap,
    token: TokenSource,
    /// The feed's secret values known from its configuration.
    redactor: Redactor,
    /// The bearer token last read (it may change on disk between attempts), scrubbed too.
    last_token: Mutex<Option<Secret>>,
    rejected_id_statuses: Vec<u16>,
    /// Bound on connecting plus waiting for the response headers.
    header_timeout: Duration,
    connect_timeout: Duration,
    response_timeout: Duration,
    idle_timeout: Option<Duration>,
    /// The URL without userinfo or fragment: what the request goes to.
    /// Sent with every request (as its [`RedirectRules`] extension), so that one transport
    /// serves every feed with the same TLS settings.
    max_redirects: usize,
    forward_headers_on_redirect: bool,
    http_version: transport::HttpVersion,
    transport: Arc<dyn Transport>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("feed", &self.feed)
            .field("url", &self.shown_url)
            .finish_non_exhaustive()
    }
}

/// The request body of every attempt.
#[derive(Debug, Clone)]
enum BodySource {
    None,
    Inline(Bytes),
    /// Read at every attempt.
    File(PathBuf),
}

#[derive(Debug, Clone)]
enum TokenSource {
    None,
    Env(String),
    File(PathBuf),
    /// Program and arguments, run at every attempt.
    Command(Vec<String>),
}

/// The transport of the feeds that trust the CA certificates of `path`: one per file and
/// content while feeds use it (a changed file gives a new one at the next reload).
fn with_ca_file(path: &std::path::Path) -> Result<Arc<HttpTransport>, String> {
    type Cache = Mutex<HashMap<(PathBuf, Vec<u8>), std::sync::Weak<HttpTransport>>>;
    static BY_FILE: OnceLock<Cache> = OnceLock::new();
    let contents = std::fs::read(path).map_err(|e| {
        format!(
            "`ca_file`: {}",
            transport::tls::TlsConfigError::Read {
                path: path.to_path_buf(),
                source: Arc::new(e),
            }
        )
    })?;
    let key = (path.to_path_buf(), contents);
    let cache = BY_FILE.get_or_init(Cache::default);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    cache.retain(|_, t| t.strong_count() > 0);
    if let Some(transport) = cache.get(&key).and_then(std::sync::Weak::upgrade) {
        return Ok(transport);
    }
    let tls = transport::tls::tls_config_with_ca_pem(path, &key.1)
        .map_err(|e| format!("`ca_file`: {e}"))?;
    let transport = Arc::new(HttpTransport::new(system_proxies(), tls));
    cache.insert(key, Arc::downgrade(&transport));
    Ok(transport)
}

impl Connector {
    /// Checks the feed's URL, headers and token variable, and the TLS settings; requests go
    /// through the HTTP transport (HTTP/1.1 or HTTP/2) with the environment's proxies, one
    /// shared by every feed without a `ca_file` (and one per `ca_file` and content).
    pub fn new(feed: &ClientOptions) -> Result<Connector, ClientError> {
        static SHARED: OnceLock<Result<Arc<HttpTransport>, String>> = OnceLock::new();
        let transport: Result<Arc<dyn Transport>, String> = match &feed.ca_file {
            None => SHARED
                .get_or_init(|| {
                    transport::tls::shared_config()
                        .map(|tls| Arc::new(HttpTransport::new(system_proxies(), tls)))
                        .map_err(|e| format!("cannot set up TLS: {e}"))
                })
                .clone()
                .map(|t| t as Arc<dyn Transport>),
            // Its own settings: only feeds with a ca_file pay for a root store of their own,
            // once per file (and content), so that feeds trusting the same CA share HTTP/2
            // connections.
            Some(path) => with_ca_file(path).map(|t| t as Arc<dyn Transport>),
        };
        let transport = transport.map_err(|message| ClientError {
            feed: feed.name.clone(),
            message,
        })?;
        Connector::with_transport(feed, transport)
    }

    /// [`Connector::new`] with given proxy rules and TLS settings instead of the environment's
    /// and the shared ones.
    pub fn with_settings(
        feed: &ClientOptions,
        proxies: Arc<hyper_util::client::proxy::matcher::Matcher>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Connector, ClientError> {
        Connector::with_transport(feed, Arc::new(HttpTransport::new(proxies, tls)))
    }

    /// A connector whose requests go through `transport` (which follows redirects itself).
    pub fn with_transport(
        feed: &ClientOptions,
        transport: Arc<dyn Transport>,
    ) -> Result<Connector, ClientError> {
        let err = |message: String| ClientError {
            feed: feed.name.clone(),
            message,
        };
        // The URL itself may hold secrets: the parse error never repeats it.
        let url = Url::parse(feed.url.expose())
            .map_err(|e| err(format!("`url` is not a valid URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(err(format!(
                "`url` must be an http:// or https:// URL with a host, not {}",
                display_url(&url)
            )));
        }
        request_target(&url).map_err(|e| {
            err(format!(
                "`url` {} cannot be requested: {e}",
                display_url(&url)
            ))
        })?;

        let token = match (&feed.bearer_token_env, &feed.bearer_token_file) {
            _ if feed.token_command.is_some()
                && (feed.bearer_token_env.is_some() || feed.bearer_token_file.is_some()) =>
            {
                return Err(err(
                    "set only one of bearer_token_env, bearer_token_file and token_command".into(),
                ))
            }
            (Some(_), Some(_)) => {
                return Err(err(
                    "set either bearer_token_env or bearer_token_file, not both".into(),
                ))
            }
            (None, None) if feed.token_command.is_some() => {
                let argv = feed.token_command.clone().unwrap_or_default();
                if argv.first().is_none_or(|p| p.is_empty()) {
                    return Err(err("`token_command` names no program".into()));
                }
                TokenSource::Command(argv)
            }
            (Some(var), None) => {
                // Checked now so a missing variable fails the start loudly; read again at every
                // attempt all the same.
                read_env_token(var).map_err(|e| err(e.to_string()))?;
                TokenSource::Env(var.clone())
            }
            (None, Some(path)) => TokenSource::File(path.clone()),
            (None, None) => TokenSource::None,
        };

        let mut headers = HeaderMap::new();
        for (name, value) in &feed.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| err(format!("header `{name}` is not a valid HTTP header name")))?;
            if RESERVED.contains(&name.as_str()) || FRAMING.contains(&name) {
                return Err(err(format!(
                    "header `{name}` is set by the bridge itself and cannot be configured"
                )));
            }
            if name == AUTHORIZATION && !matches!(token, TokenSource::None) {
                return Err(err(
                    "header `Authorization` conflicts with bearer_token_env / bearer_token_file / token_command"
                        .into(),
                ));
            }
            let mut value = HeaderValue::from_str(value.expose()).map_err(|_| {
                err(format!(
                    "header `{name}` has a value that is not valid in HTTP"
                ))
            })?;
            if is_secret_header(name.as_str(), &feed.secret_headers) {
                value.set_sensitive(true);
            }
            headers.insert(name, value);
        }
        if !headers.contains_key(AUTHORIZATION) {
            if let Some(value) = basic_auth_from_userinfo(&url) {
                headers.insert(AUTHORIZATION, value);
            }
        }

        let method = check_method(&feed.method).map_err(err)?;
        let body = match &feed.body {
            Some(RequestBodySource::Inline(text)) => {
                BodySource::Inline(Bytes::copy_from_slice(text.expose().as_bytes()))
            }
            Some(RequestBodySource::File(path)) => BodySource::File(path.clone()),
            // A request with another method says its (empty) length: servers answer 411
            // Length Required to a POST without one.
            None if method != Method::GET => BodySource::Inline(Bytes::new()),
            None => BodySource::None,
        };

        let redactor = Redactor::for_client(feed);
        redactor.remember();
        Ok(Connector {
            inner: Arc::new(Inner {
                feed: feed.name.clone(),
                method,
                body,
                last_event_id_query: feed.last_event_id_query.clone(),
                since_query: feed.since_query.clone(),
                compression: feed.compression,
                shown_url: display_url(&url),
                url,
                headers,
                token,
                redactor,
                last_token: Mutex::new(None),
                rejected_id_statuses: feed.rejected_id_statuses.clone(),
                header_timeout: feed.connect_timeout.saturating_add(feed.response_timeout),
                connect_timeout: feed.connect_timeout,
                response_timeout: feed.response_timeout,
                idle_timeout: (!feed.idle_timeout.is_zero()).then_some(feed.idle_timeout),
                max_redirects: feed.max_redirects,
                forward_headers_on_redirect: feed.forward_headers_on_redirect,
                http_version: feed.http_version,
                transport,
            }),
        })
    }

    /// The feed's URL as messages show it (no userinfo, no query string).
    pub fn shown_url(&self) -> &str {
        &self.inner.shown_url
    }

    /// The request method (what messages show before the URL).
    pub fn method(&self) -> &str {
        self.inner.method.as_str()
    }

    /// `text` without any of the feed's secret values (the bearer token last read included).
    pub fn scrub(&self, text: &str) -> String {
        self.inner.scrub_text(text)
    }

    /// Starts one attempt (spawned on the current Tokio runtime): the feed's request sending
    /// `last_event_id` unless it is empty. An ID that is not a valid header value is not sent
    /// (the client checks [`is_sendable_last_event_id`] first and reports it; this only keeps
    /// the transport total).
    pub fn connect(&self, last_event_id: &str) -> Attempt {
        self.connect_with(last_event_id, None)
    }

    /// [`Connector::connect`], also sending `since` (a feed's start position, on the attempts
    /// of a feed without a checkpoint) as the `since_query` parameter, and the last event ID
    /// as the `last_event_id_query` parameter when one is configured and the ID is sent.
    pub fn connect_with(&self, last_event_id: &str, since: Option<&str>) -> Attempt {
        let id = last_event_id_header(last_event_id);
        let mut query = Vec::new();
        if let (Some(name), Some(_)) = (&self.inner.last_event_id_query, &id) {
            query.push((name.clone(), last_event_id.to_owned()));
        }
        if let Some(since) = since {
            query.push((self.inner.since_query.clone(), since.to_owned()));
        }
        Attempt {
            task: tokio::spawn(self.inner.clone().attempt(id, query)),
            inner: self.inner.clone(),
        }
    }
}

/// Decodes a gzip body piece by piece, under any split of the compressed bytes. At most
/// [`Gunzip::STEP`] compressed bytes are decoded at a time, so one chunk of a decompression
/// bomb yields pieces of bounded size (deflate expands at most about 1 032 times) that the
/// parser's limits then judge, instead of one huge buffer (ARCHITECTURE.md, "Hostile input and
/// bounded resources").
struct Gunzip {
    decoder: flate2::write::MultiGzDecoder<Vec<u8>>,
    /// Compressed bytes received and not decoded yet.
    pending: Bytes,
}

impl Gunzip {
    const STEP: usize = 1024;

    fn new() -> Gunzip {
        Gunzip {
            decoder: flate2::write::MultiGzDecoder::new(Vec::new()),
            pending: Bytes::new(),
        }
    }

    /// Decoded bytes from what is pending (`None` once it is all decoded without output).
    fn next_piece(&mut self) -> std::io::Result<Option<Bytes>> {
        use std::io::Write as _;
        while !self.pending.is_empty() {
            let step = self.pending.split_to(self.pending.len().min(Self::STEP));
            self.decoder.write_all(&step)?;
            // The decoder keeps output back until the next write unless flushed.
            self.decoder.flush()?;
            let plain = std::mem::take(self.decoder.get_mut());
            if !plain.is_empty() {
                return Ok(Some(Bytes::from(plain)));
            }
        }
        Ok(None)
    }
}

/// `url` with these query parameters, replacing any of the same names it already has (the
/// rest of its query is kept as written).
fn with_query(url: &Url, params: &[(String, String)]) -> Url {
    if params.is_empty() {
        return url.clone();
    }
    let mut url = url.clone();
    let replaces = url
        .query_pairs()
        .any(|(name, _)| params.iter().any(|(n, _)| *n == name));
    if replaces {
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(name, _)| !params.iter().any(|(n, _)| *n == *name))
            .map(|(n, v)| (n.into_owned(), v.into_owned()))
            .collect();
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    url.query_pairs_mut().extend_pairs(params);
    url
}

/// `Authorization: Basic` for the userinfo of `url`, if it has any (what reqwest sends).
fn basic_auth_from_userinfo(url: &Url) -> Option<HeaderValue> {
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user = decode(url.username());
    let credentials = Secret::new(match url.password() {
        Some(password) => format!("{user}:{}", decode(password)),
        None => format!("{user}:"),
    });
    let encoded = base64::engine::general_purpose::STANDARD.encode(credentials.expose());
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

impl Inner {
    /// A failure naming the feed and its URL. The message is scrubbed of every secret here,
    /// where every message of the transport is made.
    fn failure(&self, kind: FailureKind, what: impl fmt::Display) -> Failure {
        Failure {
            kind,
            status: None,
            retry_after: None,
            message: self.scrub_text(&format!(
                "feed `{}`: {} {}: {what}",
                self.feed, self.method, self.shown_url
            )),
        }
    }

    /// `text` without the feed's secret values, nor the bearer token last read.
    fn scrub_text(&self, text: &str) -> String {
        let mut text = self.redactor.scrub(text).into_owned();
        let token = self.last_token.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(token) = token.as_ref().filter(|t| t.expose().len() >= 4) {
            if text.contains(token.expose()) {
                text = text.replace(token.expose(), REDACTED);
            }
        }
        text
    }

    fn network(&self, what: impl fmt::Display) -> Failure {
        self.failure(FailureKind::Network, what)
    }

    /// A failure of the transport: a refused redirect is a client error (retrying soon will
    /// not help), anything else a network failure.
    fn transport_failure(&self, e: &TransportError) -> Failure {
        let kind = if e.is_redirect_refused() {
            FailureKind::Client
        } else {
            FailureKind::Network
        };
        self.failure(kind, e)
    }

    /// Removes anything secret that might have slipped into a message from a lower layer.
    fn scrub(&self, mut failure: Failure, token: Option<&Secret>) -> Failure {
        if let Some(token) = token.filter(|t| t.expose().len() >= MIN_SECRET_LEN) {
            failure.message = failure.message.replace(token.expose(), REDACTED);
        }
        if self.url.as_str() != self.shown_url {
            failure.message = failure.message.replace(self.url.as_str(), &self.shown_url);
        }
        failure.message = self.scrub_text(&failure.message);
        failure
    }

    async fn attempt(
        self: Arc<Self>,
        last_event_id: Option<HeaderValue>,
        query: Vec<(String, String)>,
    ) -> Result<Connection, Failure> {
        let mut headers = self.headers.clone();
        headers.insert(ACCEPT, HeaderValue::from_static(EVENT_STREAM));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if self.compression {
            headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        }
        let sent_id = last_event_id.is_some();
        if let Some(id) = last_event_id {
            headers.insert(HeaderName::from_static(LAST_EVENT_ID), id);
        }
        let mut token = self.read_token().await?;
        // Checked when the connector was made: the URL does not change.
        let (uri, request_url) = request_target(&with_query(&self.url, &query))
            .map_err(|e| self.failure(FailureKind::Local, format_args!("invalid URL: {e}")))?;
        let body = match &self.body {
            BodySource::None => None,
            BodySource::Inline(bytes) => Some(bytes.clone()),
            BodySource::File(path) => Some(read_body_file(path).await.map_err(|e| {
                self.failure(
                    FailureKind::Local,
                    format_args!("cannot read body_file {}: {e}", path.display()),
                )
            })?),
        };
        let mut refetched = false;
        loop {
            let mut headers = headers.clone();
            if let Some(token) = &token {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                    .map_err(|_| {
                        self.failure(
                            FailureKind::Local,
                            "the bearer token contains characters that are not allowed in an HTTP header",
                        )
                    })?;
                value.set_sensitive(true);
                headers.insert(AUTHORIZATION, value);
            }
            let mut request = http::Request::new(());
            *request.method_mut() = self.method.clone();
            *request.uri_mut() = uri.clone();
            *request.headers_mut() = headers;
            let extensions = request.extensions_mut();
            if let Some(body) = &body {
                extensions.insert(RequestBody(body.clone()));
            }
            extensions.insert(RedirectRules {
                max: self.max_redirects,
                forward_headers: self.forward_headers_on_redirect,
                keep_across_origins: &KEEP_ACROSS_ORIGINS,
            });
            extensions.insert(ConnectTimeout(self.connect_timeout));
            extensions.insert(self.http_version);

            let send = self.transport.clone().send(request);
            let result = match tokio::time::timeout(self.header_timeout, send).await {
                Err(_) => Err(self.network(format_args!(
                    "timed out: no response headers within {} (connect_timeout {} + response_timeout {})",
                    humantime::format_duration(self.header_timeout),
                    humantime::format_duration(self.connect_timeout),
                    humantime::format_duration(self.response_timeout),
                ))),
                Ok(Err(e)) => Err(self.transport_failure(&e)),
                Ok(Ok(response)) => self.classify(response, &request_url, sent_id),
            };
            // A token from a command may have expired since it was printed: on a 401 the
            // command runs once more and the request is repeated before the policy backs off.
            let unauthorized = matches!(&result, Err(f) if f.status == Some(401));
            if unauthorized && !refetched && matches!(self.token, TokenSource::Command(_)) {
                refetched = true;
                tracing::info!(
                    feed = %self.feed,
                    "{} {}: HTTP 401 Unauthorized; running token_command again before backing off",
                    self.method,
                    self.shown_url
                );
                token = self.read_token().await?;
                continue;
            }
            return result.map_err(|f| self.scrub(f, token.as_ref()));
        }
    }

    /// The bearer token for this attempt, read afresh (a file refreshed on disk is picked up).
    async fn read_token(&self) -> Result<Option<Secret>, Failure> {
        let token = match &self.token {
            TokenSource::None => return Ok(None),
            TokenSource::Env(var) => read_env_token(var),
            TokenSource::File(path) => match tokio::fs::read_to_string(path).await {
                Err(source) => Err(TokenError::File {
                    path: path.clone(),
                    source,
                }),
                Ok(text) if text.trim().is_empty() => Err(TokenError::FileEmpty(path.clone())),
                Ok(text) => Ok(Secret::new(text.trim())),
            },
            TokenSource::Command(argv) => {
                // Its stderr may quote the token it could not refresh: the failure is scrubbed
                // of the last token (and every secret) like any message.
                token_command::run(argv, token_command::TOKEN_COMMAND_TIMEOUT)
                    .await
                    .map_err(TokenError::Command)
            }
        }
        .map_err(|e| self.failure(FailureKind::Local, e))?;
        let mut last = self.last_token.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref() != Some(&token) {
            super::secret::remember([token.expose()]);
            *last = Some(token.clone());
        }
        Ok(Some(token))
    }

    fn classify(
        self: &Arc<Self>,
        response: transport::Response,
        request_url: &Url,
        sent_id: bool,
    ) -> Result<Connection, Failure> {
        let (parts, body) = response.into_parts();
        let code = parts.status.as_u16();
        let redirected_to = match parts.extensions.get::<FinalUrl>() {
            Some(FinalUrl(url)) if url != request_url => Some(display_url(url)),
            _ => None,
        };
        let rejected = sent_id && self.rejected_id_statuses.contains(&code);
        let gzip = self.compression && response::is_gzip_encoded(&parts.headers);
        match response::classify_accepting(
            parts.status,
            &parts.headers,
            redirected_to.as_deref(),
            rejected,
            self.compression,
            |text| self.scrub_text(text),
        ) {
            Verdict::Open => Ok(Connection {
                status: code,
                info: parts.extensions.get::<transport::ConnectionInfo>().copied(),
                deadline: self
                    .idle_timeout
                    .and_then(|t| Instant::now().checked_add(t)),
                body,
                sent_last_event_id: sent_id,
                gunzip: gzip.then(|| Box::new(Gunzip::new())),
                inner: self.clone(),
            }),
            Verdict::Fail {
                kind,
                what,
                retry_after,
            } => Err(Failure {
                status: Some(code),
                retry_after,
                ..self.failure(kind, what)
            }),
        }
    }
}

/// An open event stream: the body, read piece by piece with the idle timeout.
pub struct Connection {
    status: u16,
    /// The protocol and connection it came over, when the transport said.
    info: Option<transport::ConnectionInfo>,
    body: Box<dyn Body>,
    /// Decodes a gzip body (`compression = true` and the server used it).
    gunzip: Option<Box<Gunzip>>,
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
        self.status
    }

    /// The protocol and connection the stream came over, when the transport said.
    pub fn info(&self) -> Option<transport::ConnectionInfo> {
        self.info
    }

    /// Whether the request that opened this connection carried `Last-Event-ID`.
    pub fn sent_last_event_id(&self) -> bool {
        self.sent_last_event_id
    }

    /// The next non-empty piece of the body; `Ok(None)` at end of stream. Any bytes (comments
    /// and chunk framing included) restart the idle timeout. Cancel-safe: dropping the future
    /// loses no bytes.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, Failure> {
        loop {
            if let Some(gunzip) = &mut self.gunzip {
                match gunzip.next_piece() {
                    Ok(Some(plain)) => return Ok(Some(plain)),
                    Ok(None) => {}
                    Err(e) => {
                        let failure = self.inner.network(format_args!(
                            "the gzip-encoded body cannot be decoded: {e}; dropping the connection"
                        ));
                        return Err(self.inner.scrub(failure, None));
                    }
                }
            }
            let read = match self.deadline {
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, transport::next_chunk(&mut *self.body))
                        .await
                    {
                        Ok(read) => read,
                        Err(_) => {
                            let idle = self.inner.idle_timeout.unwrap_or_default();
                            return Err(self.inner.network(format_args!(
                                "idle timeout: no bytes for {} (idle_timeout); dropping the connection",
                                humantime::format_duration(idle)
                            )));
                        }
                    }
                }
                None => transport::next_chunk(&mut *self.body).await,
            };
            match read {
                Ok(None) => return Ok(None),
                Ok(Some(bytes)) => {
                    self.deadline = self
                        .inner
                        .idle_timeout
                        .and_then(|t| Instant::now().checked_add(t));
                    if let Some(gunzip) = &mut self.gunzip {
                        gunzip.pending = bytes;
                    } else if !bytes.is_empty() {
                        return Ok(Some(bytes));
                    }
                }
                Err(e) => {
                    let failure = self.inner.network(&e);
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

/// The request target of `url`: without userinfo (sent as `Authorization` instead) or
/// fragment, as a URI and as a URL.
fn request_target(url: &Url) -> Result<(http::Uri, Url), http::uri::InvalidUri> {
    let mut target = url.clone();
    let _ = target.set_username("");
    let _ = target.set_password(None);
    target.set_fragment(None);
    Ok((target.as_str().parse()?, target))
}

/// Reads a bearer token from an environment variable; the error never contains the value.
fn read_env_token(var: &str) -> Result<Secret, TokenError> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(Secret::new(v.trim())),
        Ok(_) => Err(TokenError::EnvEmpty(var.to_string())),
        Err(_) => Err(TokenError::EnvUnset(var.to_string())),
    }
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

/// The largest request body `body_file` may hold. It is read at every connection attempt and
/// held for the attempt; a careless path (a log file, a device) must not become a huge read.
const MAX_BODY_FILE_BYTES: u64 = 1024 * 1024;

/// Reads `body_file`: a regular file (checked before opening, so a FIFO never blocks the
/// attempt) of at most [`MAX_BODY_FILE_BYTES`].
async fn read_body_file(path: &std::path::Path) -> std::io::Result<Bytes> {
    use tokio::io::AsyncReadExt;
    if !tokio::fs::metadata(path).await?.is_file() {
        return Err(std::io::Error::other("it is not a regular file"));
    }
    let mut body = Vec::new();
    tokio::fs::File::open(path)
        .await?
        .take(MAX_BODY_FILE_BYTES + 1)
        .read_to_end(&mut body)
        .await?;
    if body.len() as u64 > MAX_BODY_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "it is larger than {MAX_BODY_FILE_BYTES} bytes, the most a request body may be"
        )));
    }
    Ok(Bytes::from(body))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_tokens_case_sensitive_and_able_to_stream() {
        for ok in ["GET", "POST", "REPORT", "X-SUBSCRIBE"] {
            assert_eq!(check_method(ok).unwrap().as_str(), ok);
        }
        let err = check_method("post").unwrap_err();
        assert!(err.contains("write \"POST\""), "{err}");
        assert!(check_method("HEAD").unwrap_err().contains("cannot open"));
        assert!(check_method("GE T")
            .unwrap_err()
            .contains("not an HTTP method"));
        assert!(check_method("").is_err());
    }
    use hyper_util::client::proxy::matcher::Matcher as ProxyMatcher;
    use std::net::SocketAddr;

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
        let f = ClientOptions::new("f", "ftp://user:s3cret@example.org/x?t=1");
        let e = Connector::new(&f).unwrap_err();
        assert!(e.message.contains("http"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let f = ClientOptions::new("f", "not a url s3cret");
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
        let mut f = ClientOptions::new("f", "http://example.org/");
        f.headers.push(("Accept".into(), Secret::new("x")));
        let m = Connector::new(&f).unwrap_err().message;
        assert!(m.contains("`accept` is set by the bridge"), "{m}");
        let mut f = ClientOptions::new("f", "http://example.org/");
        f.headers.push(("bad header".into(), Secret::new("x")));
        assert!(Connector::new(&f).is_err());
        let mut f = ClientOptions::new("f", "http://example.org/");
        f.headers.push(("X-Ok".into(), Secret::new("bad\nvalue")));
        assert!(Connector::new(&f).is_err());
        let mut f = ClientOptions::new("f", "http://example.org/");
        f.bearer_token_file = Some("/nonexistent".into());
        f.headers
            .push(("Authorization".into(), Secret::new("Basic x")));
        assert!(Connector::new(&f)
            .unwrap_err()
            .message
            .contains("conflicts"));
    }

    #[test]
    fn new_requires_the_token_variable() {
        let mut f = ClientOptions::new("f", "http://example.org/");
        f.bearer_token_env = Some("SSE_BRIDGE_TEST_SURELY_UNSET_VARIABLE_3141".into());
        let e = Connector::new(&f).unwrap_err();
        assert!(
            e.message
                .contains("SSE_BRIDGE_TEST_SURELY_UNSET_VARIABLE_3141"),
            "{e}"
        );
        // A file is read at each attempt instead: a missing one is not fatal at start.
        let mut f = ClientOptions::new("f", "http://example.org/");
        f.bearer_token_file = Some("/nonexistent/token".into());
        assert!(Connector::new(&f).is_ok());
    }

    /// Answers the i-th connection to it with `replies[i]` and records each request head; the
    /// connections stay open until the test ends.
    async fn raw_server(replies: Vec<Vec<u8>>) -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = heads.clone();
        tokio::spawn(async move {
            let mut open = Vec::new();
            for reply in replies {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    if socket.read(&mut byte).await.unwrap() == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                log.lock().unwrap().push(String::from_utf8(head).unwrap());
                socket.write_all(&reply).await.unwrap();
                open.push(socket);
            }
            std::future::pending::<()>().await;
        });
        (addr, heads)
    }

    const SSE_OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: x\n\n";

    fn no_proxies() -> Arc<ProxyMatcher> {
        Arc::new(ProxyMatcher::builder().build())
    }

    /// A connector with the shared TLS settings and no proxies.
    fn plain_connector(f: &ClientOptions) -> Connector {
        Connector::with_settings(f, no_proxies(), transport::tls::shared_config().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn redirects_keep_credentials_on_the_same_origin_and_drop_them_elsewhere() {
        let (other, other_heads) = raw_server(vec![SSE_OK.to_vec()]).await;
        let (first, first_heads) = raw_server(vec![
            b"HTTP/1.1 302 Found\r\nLocation: /same\r\nContent-Length: 0\r\n\r\n".to_vec(),
            format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{other}/other?x=1\r\n\r\n"
            )
            .into_bytes(),
        ])
        .await;
        let mut f = ClientOptions::new("f", format!("http://us%20er:pw@{first}/start?k=v"));
        f.headers.push(("Cookie".into(), Secret::new("c=1")));
        f.headers.push(("X-Custom".into(), Secret::new("kept")));
        let connector = plain_connector(&f);
        let mut conn = connector.connect("42").outcome().await.unwrap();
        assert_eq!(
            conn.next_chunk().await.unwrap().as_deref(),
            Some(&b"data: x\n\n"[..])
        );

        let first_heads = first_heads.lock().unwrap().clone();
        assert!(
            first_heads[0].starts_with("GET /start?k=v HTTP/1.1\r\n"),
            "{}",
            first_heads[0]
        );
        assert!(
            first_heads[1].starts_with("GET /same HTTP/1.1\r\n"),
            "{}",
            first_heads[1]
        );
        for head in &first_heads {
            // "us er:pw", percent-decoded, in Base64.
            for line in [
                format!("Host: {first}\r\n"),
                "authorization: Basic dXMgZXI6cHc=\r\n".into(),
                "cookie: c=1\r\n".into(),
                "last-event-id: 42\r\n".into(),
                "accept: text/event-stream\r\n".into(),
                "cache-control: no-cache\r\n".into(),
                format!("User-Agent: {}\r\n", transport::http1::head::USER_AGENT),
            ] {
                assert!(head.contains(&line), "{line:?} missing from {head}");
            }
        }
        let other_head = other_heads.lock().unwrap()[0].clone();
        assert!(
            other_head.starts_with("GET /other?x=1 HTTP/1.1\r\n"),
            "{other_head}"
        );
        assert!(other_head.contains("last-event-id: 42\r\n"), "{other_head}");
        // Another origin gets none of the configured headers, secret or not.
        assert!(!other_head.contains("x-custom"), "{other_head}");
        assert!(!other_head.contains("authorization"), "{other_head}");
        assert!(!other_head.contains("cookie"), "{other_head}");
    }

    #[tokio::test]
    async fn forward_headers_on_redirect_keeps_them_on_another_origin() {
        let (other, other_heads) = raw_server(vec![SSE_OK.to_vec()]).await;
        let (first, _) = raw_server(vec![format!(
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{other}/other\r\n\r\n"
        )
        .into_bytes()])
        .await;
        let mut f = ClientOptions::new("f", format!("http://u:pw@{first}/start"));
        f.headers.push(("X-Api-Key".into(), Secret::new("key-1")));
        f.forward_headers_on_redirect = true;
        let mut conn = plain_connector(&f).connect("").outcome().await.unwrap();
        assert!(conn.next_chunk().await.unwrap().is_some());
        let other_head = other_heads.lock().unwrap()[0].clone();
        assert!(other_head.contains("x-api-key: key-1\r\n"), "{other_head}");
        assert!(other_head.contains("authorization: Basic "), "{other_head}");
    }

    #[tokio::test]
    async fn unrequested_codings_fail_naming_them_and_echoed_secrets_are_scrubbed() {
        for (head, coding) in [
            ("Content-Encoding: gzip\r\n", "Content-Encoding `gzip`"),
            (
                "Transfer-Encoding: gzip, chunked\r\n",
                "Transfer-Encoding `gzip`",
            ),
            ("Transfer-Encoding: gzip\r\n", "Transfer-Encoding `gzip`"),
        ] {
            let (addr, _) = raw_server(vec![format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{head}\r\n"
            )
            .into_bytes()])
            .await;
            let f = ClientOptions::new("f", format!("http://{addr}/"));
            let failure = plain_connector(&f).connect("").outcome().await.unwrap_err();
            assert_eq!(failure.kind, FailureKind::Network, "{failure}");
            assert!(failure.message.contains(coding), "{failure}");
        }
        // The server echoes the Basic credential into its Content-Type.
        let basic = base64::engine::general_purpose::STANDARD.encode("user:s3cretpw");
        let (addr, _) = raw_server(vec![format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; echo=Basic {basic}; k=key-123456\r\n\r\n"
        )
        .into_bytes()])
        .await;
        let mut f = ClientOptions::new("f", format!("http://user:s3cretpw@{addr}/"));
        f.headers
            .push(("X-Api-Key".into(), Secret::new("key-123456")));
        let failure = plain_connector(&f).connect("").outcome().await.unwrap_err();
        assert!(!failure.message.contains(&basic), "{failure}");
        assert!(!failure.message.contains("key-123456"), "{failure}");
        assert!(failure.message.contains("[redacted]"), "{failure}");
    }

    #[tokio::test]
    async fn a_failed_redirect_names_its_target() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let (first, _) = raw_server(vec![format!(
            "HTTP/1.1 302 Found\r\nLocation: http://{dead_addr}/moved?token=x\r\n\r\n"
        )
        .into_bytes()])
        .await;
        let f = ClientOptions::new("f", format!("http://{first}/start"));
        let failure = plain_connector(&f).connect("").outcome().await.unwrap_err();
        assert!(
            failure.message.contains(&format!(
                "redirected to http://{dead_addr}/moved: connection failed"
            )),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn http_urls_go_through_an_http_proxy_in_absolute_form() {
        let (proxy, heads) = raw_server(vec![SSE_OK.to_vec()]).await;
        let proxies = Arc::new(
            ProxyMatcher::builder()
                .http(format!("http://pu:pp@{proxy}"))
                .build(),
        );
        let f = ClientOptions::new("f", "http://stream.example.invalid:8080/s?q=1#frag");
        let connector =
            Connector::with_settings(&f, proxies, transport::tls::shared_config().unwrap())
                .unwrap();
        let mut conn = connector.connect("").outcome().await.unwrap();
        assert_eq!(
            conn.next_chunk().await.unwrap().as_deref(),
            Some(&b"data: x\n\n"[..])
        );
        let head = heads.lock().unwrap()[0].clone();
        assert!(
            head.starts_with("GET http://stream.example.invalid:8080/s?q=1 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains("Host: stream.example.invalid:8080\r\n"),
            "{head}"
        );
        // "pu:pp" in Base64.
        assert!(
            head.contains("Proxy-Authorization: Basic cHU6cHA=\r\n"),
            "{head}"
        );
        assert!(!head.contains("last-event-id"), "{head}");
    }

    #[tokio::test]
    async fn https_urls_tunnel_through_the_proxy_and_a_refused_tunnel_is_reported() {
        let (proxy, heads) = raw_server(vec![
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ])
        .await;
        let proxies = Arc::new(
            ProxyMatcher::builder()
                .all(format!("http://{proxy}"))
                .build(),
        );
        let f = ClientOptions::new("f", "https://stream.example.invalid/s?token=s3cret");
        let connector =
            Connector::with_settings(&f, proxies, transport::tls::shared_config().unwrap())
                .unwrap();
        let failure = connector.connect("").outcome().await.unwrap_err();
        assert_eq!(failure.kind, FailureKind::Network);
        assert!(
            failure
                .message
                .starts_with("feed `f`: GET https://stream.example.invalid/s: ")
                && failure
                    .message
                    .contains("proxy tunnel to stream.example.invalid:443")
                && failure.message.contains("403"),
            "{failure}"
        );
        assert!(!failure.message.contains("s3cret"), "{failure}");
        let head = heads.lock().unwrap()[0].clone();
        assert_eq!(
            head,
            "CONNECT stream.example.invalid:443 HTTP/1.1\r\nHost: stream.example.invalid:443\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_malformed_chunked_body_is_an_error_naming_the_feed() {
        let (addr, _) = raw_server(vec![b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n".to_vec()]).await;
        let f = ClientOptions::new("f", format!("http://{addr}/"));
        let connector = plain_connector(&f);
        let mut conn = connector.connect("").outcome().await.unwrap();
        // The chunk before the malformed size line still arrives.
        assert_eq!(
            conn.next_chunk().await.unwrap().as_deref(),
            Some(&b"hello"[..])
        );
        let failure = conn.next_chunk().await.unwrap_err();
        assert_eq!(failure.kind, FailureKind::Network);
        assert!(
            failure.message.starts_with(&format!(
                "feed `f`: GET http://{addr}/: malformed chunked body"
            )),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn a_non_http_answer_is_a_network_failure() {
        let (addr, _) = raw_server(vec![b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec()]).await;
        let f = ClientOptions::new("f", format!("http://{addr}/"));
        let connector = plain_connector(&f);
        let failure = connector.connect("").outcome().await.unwrap_err();
        assert_eq!(failure.kind, FailureKind::Network);
        assert!(
            failure.message.contains("invalid HTTP response head"),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn tls_streams_are_read_with_the_given_roots_and_only_alpn_http_1_1_with_version_1_1() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rcgen::CertifiedKey { cert, key_pair } =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let der = cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(key_pair.serialize_der()),
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                tls.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n8\r\ndata: 1\n\r\n")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            tls.write_all(b"1\r\n\n\r\n0\r\n\r\n").await.unwrap();
            tls.shutdown().await.unwrap();
            (alpn, String::from_utf8(head).unwrap())
        });

        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = transport::tls::shared_config()
            .unwrap()
            .alpn_protocols
            .clone();
        // A server that prefers HTTP/2 gets HTTP/1.1 from a feed with `http_version = "1.1"`
        // (with "auto" it would choose h2: tests/http2.rs).
        let mut f = ClientOptions::new("f", format!("https://localhost:{port}/s"));
        f.http_version = transport::HttpVersion::Http1;
        let connector = Connector::with_settings(&f, no_proxies(), Arc::new(config)).unwrap();
        let mut conn = connector.connect("").outcome().await.unwrap();
        let mut body = Vec::new();
        while let Some(bytes) = conn.next_chunk().await.unwrap() {
            body.extend_from_slice(&bytes);
        }
        assert_eq!(body, b"data: 1\n\n");
        let (alpn, head) = server.await.unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert!(
            head.starts_with("GET /s HTTP/1.1\r\nHost: localhost:"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn body_file_must_be_a_small_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("body.json");
        std::fs::write(&ok, "{\"q\":1}").unwrap();
        assert_eq!(&read_body_file(&ok).await.unwrap()[..], b"{\"q\":1}");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; MAX_BODY_FILE_BYTES as usize + 1]).unwrap();
        let e = read_body_file(&big).await.unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = tokio::time::timeout(std::time::Duration::from_secs(5), read_body_file(&fifo))
            .await
            .expect("a FIFO must not block")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
