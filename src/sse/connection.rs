//! The HTTP transport of one feed: one connection attempt (connect, request, redirects),
//! classified, and the body read with an idle timeout. No retry logic here ([`super::retry`])
//! and no parsing of the stream ([`super::parser`]); [`super::client::EventSource`] ties them
//! together. The HTTP/1.1 wire format is [`super::http1`].
//!
//! DESIGN.md §3: requests send `Accept: text/event-stream`, `Cache-Control: no-cache` and
//! `Last-Event-ID` when the last event ID is non-empty; a response is open when it is 200 with a
//! `text/event-stream` media type; redirects are followed up to `max_redirects`.
//!
//! Why its own HTTP/1.1 client rather than reqwest: an idle connection must cost next to
//! nothing (issue 5: 10 000 idle feeds in 256 MiB), and reqwest/hyper hold about 40 KiB per
//! connection whether or not bytes flow (see [`super::http1`]); reqwest stays for the admin
//! client, where a handful of short requests do not matter. This transport keeps what
//! reqwest did for the stream:
//! - redirects (301, 302, 303, 307, 308 with a usable `Location`) up to `max_redirects`, never
//!   from https to http; a redirect to another origin (scheme, host, port) drops the feed's
//!   configured headers, the bearer token and the userinfo's `Authorization` (and `Cookie`,
//!   `Cookie2`, `Proxy-Authorization`, `WWW-Authenticate`, as reqwest does) unless the feed
//!   sets `forward_headers_on_redirect`; a failure after a redirect names the target URL;
//! - `connect_timeout` over DNS, TCP, the proxy tunnel and the TLS handshake, and a bound of
//!   `connect_timeout + response_timeout` on everything up to the response headers;
//! - TLS with the shared rustls configuration (certificates always verified, no fallback);
//! - userinfo in the URL sent as `Authorization: Basic` unless another `Authorization` is set;
//! - HTTP proxies from the environment, as reqwest and curl read them (`HTTP_PROXY`,
//!   `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`, also lower case): http:// URLs through the proxy
//!   in absolute form, https:// URLs through a `CONNECT` tunnel. A proxy that is not `http://`
//!   (HTTPS or SOCKS proxies) is reported as unsupported: reqwest, as this project builds it,
//!   did not support SOCKS either.
//!
//! It speaks HTTP/1.1 only (ALPN offers `http/1.1` alone); reqwest could negotiate HTTP/2,
//! which an event stream does not need.
//!
//! Codings: the bridge asks for none (no `Accept-Encoding`) and decodes none, so a 200 with a
//! `Content-Encoding` other than `identity`, or a `Transfer-Encoding` coding other than
//! `chunked`, is a failure naming the coding instead of compressed bytes fed to the parser.
//!
//! Secrets: error messages name the feed and the URL without userinfo or query string (where
//! tokens like to hide), never a header value, and every message is scrubbed of the feed's
//! secret values ([`crate::secret::Redactor`]: userinfo in every form, the bearer token, secret
//! headers) when it is made, so that text a server echoes back (a Content-Type, a redirect
//! target) cannot carry a credential into logs or the status.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use hyper_util::client::proxy::matcher::Matcher as ProxyMatcher;
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CACHE_CONTROL, COOKIE, HOST,
    PROXY_AUTHORIZATION, USER_AGENT as USER_AGENT_HEADER, WWW_AUTHENTICATE,
};
use reqwest::{StatusCode, Url};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::http1::{self, BodyError, BodyReader, Head, Stream};
use super::retry::parse_retry_after;
use crate::config::FeedConfig;
use crate::secret::{is_secret_header, Redactor, Secret};

/// The `Last-Event-ID` request header (lower case, as `HeaderName` spells it).
pub const LAST_EVENT_ID: &str = "last-event-id";

/// The media type of an event stream.
pub const EVENT_STREAM: &str = "text/event-stream";

/// Headers the bridge sets itself; a feed's `headers` cannot override them (config validation
/// rejects them too, this keeps the transport correct on its own).
const RESERVED: [&str; 3] = ["accept", "cache-control", LAST_EVENT_ID];

/// `User-Agent` unless the feed's `headers` set one.
const USER_AGENT: &str = concat!("sse-bridge/", env!("CARGO_PKG_VERSION"));

/// TCP keepalive: notices a peer that vanished without a FIN even when idle_timeout is off.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// The TLS settings of every feed, built once: ring, TLS 1.2 and 1.3, the webpki root
/// certificates, SNI, ALPN `http/1.1` (the transport speaks nothing else). Shared: a
/// configuration per feed would hold its own root store, about 25 KiB per feed.
fn shared_tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG.get_or_init(|| tls_config(Vec::new())).clone()
}

/// The TLS settings of [`shared_tls_config`], trusting `extra` CA certificates as well as the
/// web roots.
fn tls_config(
    extra: Vec<rustls::pki_types::CertificateDer<'static>>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for (i, cert) in extra.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| format!("certificate {} is not a usable CA certificate: {e}", i + 1))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS settings of a feed with a `ca_file`: the web roots plus every certificate of that
/// PEM file, each checked to be usable as a trust anchor. The error names the file and says
/// what is wrong with it. `validate` calls it too, so a file that would fail at start is
/// reported there.
pub fn tls_config_with_ca_file(
    path: &std::path::Path,
) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM file of certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no certificate (expected PEM blocks `-----BEGIN CERTIFICATE-----`)",
            path.display()
        ));
    }
    tls_config(certs).map_err(|e| format!("{}: {e}", path.display()))
}

/// The proxy settings of the environment, read once (as reqwest read them once per client).
fn system_proxies() -> Arc<ProxyMatcher> {
    static PROXIES: OnceLock<Arc<ProxyMatcher>> = OnceLock::new();
    PROXIES
        .get_or_init(|| Arc::new(ProxyMatcher::from_env()))
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
    url: Url,
    /// The URL without userinfo, query or fragment: what messages show.
    shown_url: String,
    /// The feed's extra headers (reserved names removed), with `Authorization: Basic` from the
    /// URL's userinfo unless the feed sets `Authorization` itself.
    headers: HeaderMap,
    /// Keep `headers` and credentials on a redirect to another origin.
    forward_headers_on_redirect: bool,
    token: TokenSource,
    /// The feed's secret values known from its configuration.
    redactor: Redactor,
    /// The bearer token last read (it may change on disk between attempts), scrubbed too.
    last_token: Mutex<Option<Secret>>,
    rejected_id_statuses: Vec<u16>,
    max_redirects: usize,
    /// Bound on connecting plus waiting for the response headers.
    header_timeout: Duration,
    connect_timeout: Duration,
    response_timeout: Duration,
    idle_timeout: Option<Duration>,
    proxies: Arc<ProxyMatcher>,
    /// [`shared_tls_config`], or the feed's own with its `ca_file`.
    tls: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("feed", &self.feed)
            .field("url", &self.shown_url)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
enum TokenSource {
    None,
    Env(String),
    File(PathBuf),
}

impl Connector {
    /// Checks the feed's URL, headers and token variable, and the TLS settings.
    pub fn new(feed: &FeedConfig) -> Result<Connector, ClientError> {
        let tls = match &feed.ca_file {
            None => shared_tls_config().map_err(|e| format!("cannot set up TLS: {e}")),
            // Its own settings: only feeds with a ca_file pay for a root store of their own.
            Some(path) => tls_config_with_ca_file(path).map_err(|e| format!("`ca_file`: {e}")),
        }
        .map_err(|message| ClientError {
            feed: feed.name.clone(),
            message,
        })?;
        Connector::with_settings(feed, system_proxies(), tls)
    }

    /// [`Connector::new`] with given proxy rules and TLS settings instead of the environment's
    /// and the shared ones.
    fn with_settings(
        feed: &FeedConfig,
        proxies: Arc<ProxyMatcher>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Connector, ClientError> {
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

        let redactor = Redactor::for_feed(feed);
        redactor.remember();
        Ok(Connector {
            inner: Arc::new(Inner {
                feed: feed.name.clone(),
                shown_url: display_url(&url),
                url,
                headers,
                forward_headers_on_redirect: feed.forward_headers_on_redirect,
                token,
                redactor,
                last_token: Mutex::new(None),
                rejected_id_statuses: feed.rejected_id_statuses.clone(),
                max_redirects: feed.max_redirects,
                header_timeout: feed.connect_timeout.saturating_add(feed.response_timeout),
                connect_timeout: feed.connect_timeout,
                response_timeout: feed.response_timeout,
                idle_timeout: (!feed.idle_timeout.is_zero()).then_some(feed.idle_timeout),
                proxies,
                tls,
            }),
        })
    }

    /// The feed's URL as messages show it (no userinfo, no query string).
    pub fn shown_url(&self) -> &str {
        &self.inner.shown_url
    }

    /// `text` without any of the feed's secret values (the bearer token last read included).
    pub fn scrub(&self, text: &str) -> String {
        self.inner.scrub_text(text)
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
    let credentials = match url.password() {
        Some(password) => format!("{user}:{}", decode(password)),
        None => format!("{user}:"),
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// A response with its head read, its body not yet.
struct Response {
    /// The URL that answered (after redirects).
    url: Url,
    head: Head,
    stream: Stream,
    /// Body bytes read together with the head.
    early: Vec<u8>,
}

/// Where to open the TCP connection for a URL.
struct Route {
    /// Connect here (the server, or the proxy).
    host: String,
    port: u16,
    /// Through an HTTP proxy: the request goes to it in absolute form (http://) or through a
    /// `CONNECT` tunnel (https://), with this `Proxy-Authorization`.
    proxy: Option<Option<HeaderValue>>,
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
                "feed `{}`: GET {}: {what}",
                self.feed, self.shown_url
            )),
        }
    }

    /// `text` without the feed's secret values, nor the bearer token last read.
    fn scrub_text(&self, text: &str) -> String {
        let mut text = self.redactor.scrub(text).into_owned();
        let token = self.last_token.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(token) = token.as_ref().filter(|t| t.expose().len() >= 4) {
            if text.contains(token.expose()) {
                text = text.replace(token.expose(), crate::secret::REDACTED);
            }
        }
        text
    }

    /// A failure met after following redirects to `url`: its message names that target too
    /// (a dead or misconfigured redirect target is what the operator must look at).
    fn redirected(&self, mut failure: Failure, url: &Url) -> Failure {
        if *url != self.url {
            let prefix = format!("feed `{}`: GET {}: ", self.feed, self.shown_url);
            if let Some(rest) = failure.message.strip_prefix(&prefix) {
                failure.message = self.scrub_text(&format!(
                    "{prefix}redirected to {}: {rest}",
                    display_url(url)
                ));
            }
        }
        failure
    }

    fn network(&self, what: impl fmt::Display) -> Failure {
        self.failure(FailureKind::Network, what)
    }

    /// Removes anything secret that might have slipped into a message from a lower layer.
    fn scrub(&self, mut failure: Failure, token: Option<&str>) -> Failure {
        if let Some(token) = token.filter(|t| t.len() >= crate::secret::MIN_SECRET_LEN) {
            failure.message = failure.message.replace(token, crate::secret::REDACTED);
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

        let send = self.send(headers);
        let result = match tokio::time::timeout(self.header_timeout, send).await {
            Err(_) => Err(self.network(format_args!(
                "timed out: no response headers within {} (connect_timeout {} + response_timeout {})",
                humantime::format_duration(self.header_timeout),
                humantime::format_duration(self.connect_timeout),
                humantime::format_duration(self.response_timeout),
            ))),
            Ok(Err(failure)) => Err(failure),
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
        .inspect(|token| {
            if let Some(token) = token {
                let mut last = self.last_token.lock().unwrap_or_else(|p| p.into_inner());
                if last.as_ref().is_none_or(|t| t.expose() != token) {
                    crate::secret::remember([token.as_str()]);
                    *last = Some(Secret::new(token.as_str()));
                }
            }
        })
    }

    /// Sends the GET and follows redirects; returns the first response that is not a
    /// redirect to follow.
    async fn send(&self, mut headers: HeaderMap) -> Result<Response, Failure> {
        let mut url = self.url.clone();
        let mut followed = 0usize;
        loop {
            let (mut stream, route) = self
                .open(&url)
                .await
                .map_err(|f| self.redirected(f, &url))?;
            let request = request_head(&url, &headers, &route);
            http1::write_all(&mut stream, &request).await.map_err(|e| {
                self.redirected(
                    self.network(format_args!("request failed: sending the request: {e}")),
                    &url,
                )
            })?;
            let (head, early) = http1::read_head(&mut stream).await.map_err(|e| {
                self.redirected(self.network(format_args!("request failed: {e}")), &url)
            })?;
            let next = matches!(head.status, 301 | 302 | 303 | 307 | 308)
                .then(|| head.location.as_ref().and_then(|l| l.text()))
                .flatten()
                .and_then(|location| url.join(location).ok());
            let Some(next) = next else {
                return Ok(Response {
                    url,
                    head,
                    stream,
                    early,
                });
            };
            let cross_origin =
                redirect_policy(&url, &next, followed, self.max_redirects).map_err(|e| {
                    self.redirected(
                        self.failure(FailureKind::Client, format_args!("redirect refused: {e}")),
                        &url,
                    )
                })?;
            if cross_origin && !self.forward_headers_on_redirect {
                // Every configured header may be a credential the operator did not mark: none
                // goes to an origin the server picked.
                for name in self.headers.keys() {
                    headers.remove(name);
                }
                for name in [AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, WWW_AUTHENTICATE] {
                    headers.remove(name);
                }
                headers.remove("cookie2");
            }
            tracing::debug!(
                feed = %self.feed,
                status = head.status,
                "redirected to {}",
                self.scrub_text(&display_url(&next))
            );
            followed += 1;
            url = next;
        }
    }

    /// Where the connection for `url` goes: straight to the server or to a proxy.
    fn route(&self, url: &Url) -> Result<Route, Failure> {
        let host = url.host_str().unwrap_or_default().to_string();
        let port = url.port_or_known_default().unwrap_or(80);
        let key = format!("{}://{}:{port}/", url.scheme(), host);
        let intercept = key
            .parse::<http::Uri>()
            .ok()
            .and_then(|uri| self.proxies.intercept(&uri));
        let Some(intercept) = intercept else {
            return Ok(Route {
                host,
                port,
                proxy: None,
            });
        };
        let proxy = intercept.uri();
        let shown = format!(
            "{}://{}",
            proxy.scheme_str().unwrap_or(""),
            proxy.host().unwrap_or("")
        );
        if proxy.scheme_str() != Some("http") {
            return Err(self.network(format_args!(
                "connection failed: the proxy {shown} from the environment is not an http:// proxy, which is all the stream transport supports"
            )));
        }
        Ok(Route {
            host: proxy.host().unwrap_or_default().to_string(),
            port: proxy.port_u16().unwrap_or(80),
            proxy: Some(intercept.basic_auth().cloned()),
        })
    }

    /// Opens the connection for `url` (through a proxy if the environment says so), within
    /// `connect_timeout`.
    async fn open(&self, url: &Url) -> Result<(Stream, Route), Failure> {
        let route = self.route(url)?;
        let open = async {
            let tcp = self.tcp_connect(&route.host, route.port).await?;
            if url.scheme() != "https" {
                return Ok(Stream::Plain(tcp));
            }
            let tcp = match &route.proxy {
                Some(auth) => self.tunnel(tcp, url, auth.as_ref()).await?,
                None => tcp,
            };
            self.tls(tcp, url).await
        };
        match tokio::time::timeout(self.connect_timeout, open).await {
            Ok(Ok(stream)) => Ok((stream, route)),
            Ok(Err(failure)) => Err(failure),
            Err(_) => Err(self.network(format_args!(
                "timed out connecting (connect_timeout {}) to {}:{}",
                humantime::format_duration(self.connect_timeout),
                route.host,
                route.port
            ))),
        }
    }

    /// Resolves `host` and connects to its addresses in turn.
    async fn tcp_connect(&self, host: &str, port: u16) -> Result<TcpStream, Failure> {
        let addrs: Vec<SocketAddr> = match url::Host::parse(host) {
            Ok(url::Host::Ipv4(ip)) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
            Ok(url::Host::Ipv6(ip)) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
            _ => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| self.network(format_args!("DNS lookup failed: {host}: {e}")))?
                .collect(),
        };
        // Like hyper's connector: each address but the last gets an equal share of
        // connect_timeout, so one that drops SYNs does not use up the time for the others (the
        // caller bounds the whole).
        let share = self
            .connect_timeout
            .checked_div(u32::try_from(addrs.len()).unwrap_or(u32::MAX))
            .unwrap_or_default();
        let mut last = None;
        for (i, addr) in addrs.iter().enumerate() {
            let connect = TcpStream::connect(addr);
            let result = if i + 1 < addrs.len() {
                tokio::time::timeout(share, connect)
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            } else {
                connect.await
            };
            match result {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
                    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
                    return Ok(stream);
                }
                Err(e) => last = Some((addr, e)),
            }
        }
        Err(match last {
            Some((addr, e)) => self.network(format_args!("connection failed: {addr}: {e}")),
            None => self.network(format_args!(
                "DNS lookup failed: {host}: no addresses found"
            )),
        })
    }

    /// Opens a `CONNECT` tunnel through an HTTP proxy to the server of `url`.
    async fn tunnel(
        &self,
        mut tcp: TcpStream,
        url: &Url,
        auth: Option<&HeaderValue>,
    ) -> Result<TcpStream, Failure> {
        let authority = format!(
            "{}:{}",
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or(443)
        );
        let mut request =
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n").into_bytes();
        if let Some(auth) = auth {
            request.extend_from_slice(b"Proxy-Authorization: ");
            request.extend_from_slice(auth.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        let what = |e: &dyn fmt::Display| {
            self.network(format_args!(
                "connection failed: proxy tunnel to {authority}: {e}"
            ))
        };
        http1::write_all(&mut tcp, &request)
            .await
            .map_err(|e| what(&e))?;
        let (head, early) = http1::read_head(&mut tcp).await.map_err(|e| what(&e))?;
        if !(200..300).contains(&head.status) {
            return Err(what(&format_args!(
                "the proxy answered HTTP {}",
                head.status
            )));
        }
        if !early.is_empty() {
            return Err(what(&"the proxy sent data before the TLS handshake"));
        }
        Ok(tcp)
    }

    /// The TLS handshake with the server of `url`. Certificates are always verified; there is
    /// no insecure fallback.
    async fn tls(&self, tcp: TcpStream, url: &Url) -> Result<Stream, Failure> {
        let handshake_failed = |e: &dyn fmt::Display| {
            self.network(format_args!(
                "TLS handshake failed (the connection is not retried without TLS verification): {e}"
            ))
        };
        let name = match url.host() {
            Some(url::Host::Domain(d)) => rustls::pki_types::ServerName::try_from(d.to_string())
                .map_err(|e| handshake_failed(&e))?,
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).into(),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).into(),
            None => return Err(handshake_failed(&"the URL has no host")),
        };
        let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| handshake_failed(&e))?;
        Ok(Stream::Tls(Box::new(stream)))
    }

    fn classify(
        self: &Arc<Self>,
        response: Response,
        sent_id: bool,
    ) -> Result<Connection, Failure> {
        let Response {
            url,
            head,
            stream,
            early,
        } = response;
        let code = head.status;
        let reason = StatusCode::from_u16(code)
            .ok()
            .and_then(|s| s.canonical_reason());
        let via = if url != self.url {
            format!(" (redirected to {})", display_url(&url))
        } else {
            String::new()
        };
        let answer = match reason {
            Some(reason) => format!("HTTP {code} {reason}{via}"),
            None => format!("HTTP {code}{via}"),
        };
        let with_status = |kind, what: String| Failure {
            status: Some(code),
            ..self.failure(kind, what)
        };

        if code == 200 {
            if let Some(problem) = unreadable_coding(&head) {
                // Not a client error: a proxy or server may stop compressing; retried with backoff.
                return Err(with_status(
                    FailureKind::Network,
                    format!("{answer} with {problem}, which the bridge does not decode (it sends no Accept-Encoding); dropping the response"),
                ));
            }
            return match &head.content_type {
                Some(v) if v.text().is_some_and(is_event_stream) => Ok(Connection {
                    status: code,
                    deadline: self
                        .idle_timeout
                        .and_then(|t| Instant::now().checked_add(t)),
                    body: BodyReader::new(stream, head.framing, early),
                    sent_last_event_id: sent_id,
                    inner: self.clone(),
                }),
                Some(v) => Err(with_status(
                    FailureKind::Client,
                    format!(
                        "{answer} with Content-Type `{}`, not {EVENT_STREAM}",
                        // Scrubbed before it is shortened, which could cut a secret in two.
                        shorten(&self.scrub_text(v.text().unwrap_or("<not ASCII>")))
                    ),
                )),
                None => Err(with_status(
                    FailureKind::Client,
                    format!("{answer} without a Content-Type (expected {EVENT_STREAM})"),
                )),
            };
        }
        if code == 204 {
            return Err(with_status(
                FailureKind::NoContent,
                format!("{answer}: the server asks the client to stop reconnecting"),
            ));
        }
        if (500..600).contains(&code) || code == 408 || code == 429 {
            let retry_after = head
                .retry_after
                .as_ref()
                .and_then(|v| v.text())
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
        let what = if (400..500).contains(&code) {
            answer
        } else if (300..400).contains(&code) {
            format!("{answer}: a redirect that was not followed (no usable Location header?)")
        } else {
            format!("{answer}: unexpected status (expected 200 with {EVENT_STREAM})")
        };
        Err(with_status(FailureKind::Client, what))
    }
}

/// Whether a redirect from `from` to `to` may be followed after `followed` others: an error
/// saying why not, else whether it leaves the origin (scheme, host, port; then the feed's
/// headers and credentials are dropped).
fn redirect_policy(from: &Url, to: &Url, followed: usize, max: usize) -> Result<bool, String> {
    // As reqwest's policy counted: the URLs visited so far, the first one included.
    if followed + 1 > max {
        return Err(format!(
            "too many redirects (more than max_redirects = {max}; a redirect loop?)"
        ));
    }
    if !matches!(to.scheme(), "http" | "https") || to.host().is_none() {
        return Err(format!(
            "{} is not an http:// or https:// URL",
            display_url(to)
        ));
    }
    if from.scheme() == "https" && to.scheme() != "https" {
        return Err("redirect from https to http refused (it would drop TLS)".into());
    }
    Ok(to.scheme() != from.scheme()
        || to.host_str() != from.host_str()
        || to.port_or_known_default() != from.port_or_known_default())
}

/// The request head for `url`: origin form, or absolute form through an HTTP proxy (with its
/// `Proxy-Authorization`). `Host` and `User-Agent` unless `headers` set them.
fn request_head(url: &Url, headers: &HeaderMap, route: &Route) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"GET ");
    let through_proxy = route.proxy.is_some() && url.scheme() == "http";
    if through_proxy {
        let mut absolute = url.clone();
        let _ = absolute.set_username("");
        let _ = absolute.set_password(None);
        absolute.set_fragment(None);
        out.extend_from_slice(absolute.as_str().as_bytes());
    } else {
        let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
        out.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut field = |name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    if !headers.contains_key(HOST) {
        let host = url.host_str().unwrap_or_default();
        match url.port() {
            Some(port) => field(b"Host", format!("{host}:{port}").as_bytes()),
            None => field(b"Host", host.as_bytes()),
        }
    }
    if !headers.contains_key(USER_AGENT_HEADER) {
        field(b"User-Agent", USER_AGENT.as_bytes());
    }
    for (name, value) in headers {
        field(name.as_str().as_bytes(), value.as_bytes());
    }
    if through_proxy && !headers.contains_key(PROXY_AUTHORIZATION) {
        if let Some(Some(auth)) = &route.proxy {
            field(b"Proxy-Authorization", auth.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// An open event stream: the body, read piece by piece with the idle timeout.
pub struct Connection {
    status: u16,
    body: BodyReader,
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

    /// Whether the request that opened this connection carried `Last-Event-ID`.
    pub fn sent_last_event_id(&self) -> bool {
        self.sent_last_event_id
    }

    /// The next non-empty piece of the body; `Ok(None)` at end of stream. Any bytes (comments
    /// and chunk framing included) restart the idle timeout. Cancel-safe: dropping the future
    /// loses no bytes.
    pub async fn next_chunk(&mut self) -> Result<Option<&[u8]>, Failure> {
        loop {
            let read = match self.deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, self.body.read()).await {
                    Ok(read) => read,
                    Err(_) => {
                        let idle = self.inner.idle_timeout.unwrap_or_default();
                        return Err(self.inner.network(format_args!(
                            "idle timeout: no bytes for {} (idle_timeout); dropping the connection",
                            humantime::format_duration(idle)
                        )));
                    }
                },
                None => self.body.read().await,
            };
            match read {
                Ok(None) => return Ok(None),
                Ok(Some(n)) => {
                    self.deadline = self
                        .inner
                        .idle_timeout
                        .and_then(|t| Instant::now().checked_add(t));
                    if n > 0 {
                        return Ok(Some(self.body.data()));
                    }
                }
                Err(BodyError::Io(e) | BodyError::Truncated(e)) => {
                    let failure = self.inner.network(format_args!(
                        "connection broken while reading the stream: {e}"
                    ));
                    return Err(self.inner.scrub(failure, None));
                }
                Err(BodyError::Malformed(e)) => {
                    return Err(self
                        .inner
                        .network(format_args!("{e}; dropping the connection")));
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

/// What makes a response's body unreadable: a `Content-Encoding` other than `identity`, or a
/// `Transfer-Encoding` coding other than `chunked` (the bridge decodes neither).
fn unreadable_coding(head: &Head) -> Option<String> {
    if let Some(v) = &head.content_encoding {
        let text = v.text().unwrap_or("<not ASCII>");
        let codings: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
            .collect();
        if !codings.is_empty() || v.text().is_none() {
            return Some(format!(
                "Content-Encoding `{}`",
                shorten(&crate::text::escape_controls(text))
            ));
        }
    }
    if !head.transfer_codings.is_empty() {
        return Some(format!(
            "Transfer-Encoding `{}`",
            shorten(&head.transfer_codings.join(", "))
        ));
    }
    None
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
    fn plain_connector(f: &FeedConfig) -> Connector {
        Connector::with_settings(f, no_proxies(), shared_tls_config().unwrap()).unwrap()
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
        let mut f = FeedConfig::new("f", format!("http://us%20er:pw@{first}/start?k=v"));
        f.headers.insert("Cookie".into(), "c=1".into());
        f.headers.insert("X-Custom".into(), "kept".into());
        let connector = plain_connector(&f);
        let mut conn = connector.connect("42").outcome().await.unwrap();
        assert_eq!(conn.next_chunk().await.unwrap(), Some(&b"data: x\n\n"[..]));

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
                format!("User-Agent: {USER_AGENT}\r\n"),
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
        let mut f = FeedConfig::new("f", format!("http://u:pw@{first}/start"));
        f.headers.insert("X-Api-Key".into(), "key-1".into());
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
            let f = FeedConfig::new("f", format!("http://{addr}/"));
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
        let mut f = FeedConfig::new("f", format!("http://user:s3cretpw@{addr}/"));
        f.headers.insert("X-Api-Key".into(), "key-123456".into());
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
        let f = FeedConfig::new("f", format!("http://{first}/start"));
        let failure = plain_connector(&f).connect("").outcome().await.unwrap_err();
        assert!(
            failure.message.contains(&format!(
                "redirected to http://{dead_addr}/moved: connection failed"
            )),
            "{failure}"
        );
    }

    #[test]
    fn redirect_policy_counts_refuses_downgrades_and_spots_other_origins() {
        let u = |s: &str| Url::parse(s).unwrap();
        let https = u("https://a.example/x");
        assert_eq!(
            redirect_policy(&https, &u("https://a.example/y"), 0, 1),
            Ok(false)
        );
        assert_eq!(
            redirect_policy(&https, &u("https://a.example:443/y"), 0, 1),
            Ok(false)
        );
        assert_eq!(
            redirect_policy(&https, &u("https://b.example/y"), 0, 1),
            Ok(true)
        );
        assert_eq!(
            redirect_policy(&https, &u("https://a.example:8443/"), 0, 1),
            Ok(true)
        );
        let e = redirect_policy(&https, &u("http://a.example/y"), 0, 10).unwrap_err();
        assert!(e.contains("https to http"), "{e}");
        let e = redirect_policy(&https, &u("https://a.example/y"), 1, 1).unwrap_err();
        assert!(
            e.contains("too many redirects") && e.contains("max_redirects = 1"),
            "{e}"
        );
        assert!(redirect_policy(&https, &u("https://a.example/y"), 0, 0).is_err());
        let e = redirect_policy(&https, &u("ftp://a.example/y"), 0, 10).unwrap_err();
        assert!(e.contains("not an http"), "{e}");
        // http to https is an upgrade (and another origin: port 80 vs 443).
        assert_eq!(
            redirect_policy(&u("http://a.example/"), &https, 0, 1),
            Ok(true)
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
        let f = FeedConfig::new("f", "http://stream.example.invalid:8080/s?q=1#frag");
        let connector =
            Connector::with_settings(&f, proxies, shared_tls_config().unwrap()).unwrap();
        let mut conn = connector.connect("").outcome().await.unwrap();
        assert_eq!(conn.next_chunk().await.unwrap(), Some(&b"data: x\n\n"[..]));
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
        let f = FeedConfig::new("f", "https://stream.example.invalid/s?token=s3cret");
        let connector =
            Connector::with_settings(&f, proxies, shared_tls_config().unwrap()).unwrap();
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
        let f = FeedConfig::new("f", format!("http://{addr}/"));
        let connector = plain_connector(&f);
        let mut conn = connector.connect("").outcome().await.unwrap();
        // The chunk before the malformed size line still arrives.
        assert_eq!(conn.next_chunk().await.unwrap(), Some(&b"hello"[..]));
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
        let f = FeedConfig::new("f", format!("http://{addr}/"));
        let connector = plain_connector(&f);
        let failure = connector.connect("").outcome().await.unwrap_err();
        assert_eq!(failure.kind, FailureKind::Network);
        assert!(
            failure.message.contains("invalid HTTP response head"),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn tls_streams_are_read_with_the_given_roots_and_alpn_http_1_1() {
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
        config.alpn_protocols = shared_tls_config().unwrap().alpn_protocols.clone();
        let f = FeedConfig::new("f", format!("https://localhost:{port}/s"));
        let connector = Connector::with_settings(&f, no_proxies(), Arc::new(config)).unwrap();
        let mut conn = connector.connect("").outcome().await.unwrap();
        let mut body = Vec::new();
        while let Some(bytes) = conn.next_chunk().await.unwrap() {
            body.extend_from_slice(bytes);
        }
        assert_eq!(body, b"data: 1\n\n");
        let (alpn, head) = server.await.unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert!(
            head.starts_with("GET /s HTTP/1.1\r\nHost: localhost:"),
            "{head}"
        );
    }

    #[test]
    fn long_server_strings_are_shortened() {
        assert_eq!(shorten("abc"), "abc");
        let long = "x".repeat(500);
        assert_eq!(shorten(&long).chars().count(), 101);
    }
}
