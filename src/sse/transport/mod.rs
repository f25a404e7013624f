//! The seam between the reconnecting client and the wire: a [`Transport`] takes one request
//! (`http::Request<()>`, the URL and headers the client chose) and answers with the response's
//! status and headers and a [`Body`] of `Bytes` chunks, following redirects on its own. The
//! client owns none of it: it is given an `Arc<dyn Transport>`, so its state machine can be
//! driven by a scripted transport in tests.
//!
//! [`client::HttpTransport`] is the client the daemon uses: split by concern into [`connect`]
//! (DNS and TCP), [`proxy`] (the environment's proxies and `CONNECT` tunnels), [`tls`] (and
//! ALPN), [`redirect`] (which redirects are followed and what they keep), [`http1`] (one
//! connection per stream: the request and response heads, chunked and length framing) and
//! [`http2`] (streams on shared connections per origin). An idle HTTP/1.1 connection holds no
//! read buffer (ARCHITECTURE.md §8: 10 000 idle feeds in 256 MiB); see [`http1::body`].

pub mod client;
pub mod connect;
pub mod http1;
pub mod http2;
pub mod proxy;
pub mod redirect;
pub mod tls;

use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;

pub use self::http1::body::BodyError;
pub use self::http1::head::HeadError;
pub use self::redirect::RedirectError;

/// The body of a response, read chunk by chunk.
pub trait Body: Send + Sync + fmt::Debug {
    /// The next chunk: `Ok(Some(bytes))` when bytes arrived, `Ok(None)` at the end of the body.
    /// An empty chunk means bytes arrived that carry no data (chunk framing): it still counts
    /// as activity for an idle timeout. Cancel-safe: a poll that returns `Pending` loses
    /// nothing, and an implementation should hold no read buffer while it waits.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, TransportError>>;
}

/// [`Body::poll_chunk`] as a future.
pub async fn next_chunk(body: &mut dyn Body) -> Result<Option<Bytes>, TransportError> {
    poll_fn(|cx| body.poll_chunk(cx)).await
}

/// A response: status and headers, the body, and in its extensions the [`FinalUrl`] that
/// answered.
pub type Response = http::Response<Box<dyn Body>>;

/// The URL that answered, after redirects (a response extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalUrl(pub url::Url);

/// The bound on connecting (DNS, TCP, proxy tunnel, TLS handshake) for one request: a
/// request extension, so that one transport serves clients with different settings. Without
/// it, [`DEFAULT_CONNECT_TIMEOUT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectTimeout(pub Duration);

/// The body of a request (a request extension, since a [`Transport`] takes `Request<()>`):
/// sent with `Content-Length` after the head, and again to a 307 or 308 redirect's target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestBody(pub Bytes);

/// Which HTTP versions a request may use (a request extension; without it, [`HttpVersion::Auto`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HttpVersion {
    /// TLS offers `h2` and `http/1.1` (ALPN) and the server chooses; `http://` is HTTP/1.1.
    #[default]
    Auto,
    /// HTTP/1.1 only: a connection per stream.
    Http1,
    /// HTTP/2 only: over TLS by ALPN, over `http://` with prior knowledge (h2c).
    Http2,
}

/// The protocol a response came over (a response extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "HTTP/1.1",
            Protocol::Http2 => "HTTP/2",
        }
    }
}

/// The connection a response came over (a response extension): feeds on the same HTTP/2
/// connection show the same `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub protocol: Protocol,
    pub id: u64,
}

/// The connect timeout of a request without [`ConnectTimeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A request in flight.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response, TransportError>> + Send>>;

/// Sends requests and follows redirects. One per client; cheap to share.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Sends `request` (its method, a [`RequestBody`] extension if any; its URI absolute) and
    /// waits for the response head, following
    /// redirects as its [`redirect::RedirectRules`] extension allows (none without it); a
    /// [`ConnectTimeout`] extension bounds each connection. The future owns everything it needs, so the
    /// client may run it as a task of its own.
    fn send(self: Arc<Self>, request: http::Request<()>) -> ResponseFuture;
}

/// Why a request or a body read failed. Messages name what failed and never a header value.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("DNS lookup failed: {host}: {source}")]
    Dns {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("DNS lookup failed: {host}: no addresses found")]
    NoAddress { host: String },
    #[error("connection failed: {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("timed out connecting (connect_timeout {}) to {host}:{port}", humantime::format_duration(*.timeout))]
    ConnectTimeout {
        timeout: Duration,
        host: String,
        port: u16,
    },
    #[error("connection failed: the proxy {proxy} from the environment is not an http:// proxy, which is all the stream transport supports")]
    UnsupportedProxy { proxy: String },
    #[error("connection failed: proxy tunnel to {authority}: {source}")]
    Tunnel {
        authority: String,
        #[source]
        source: proxy::TunnelError,
    },
    #[error(
        "TLS handshake failed (the connection is not retried without TLS verification): {source}"
    )]
    Tls {
        #[source]
        source: io::Error,
    },
    #[error("request failed: sending the request: {source}")]
    Send {
        #[source]
        source: io::Error,
    },
    #[error("request failed: {source}")]
    Head {
        #[source]
        source: HeadError,
    },
    /// A redirect the rules do not follow (too many, https to http, not http).
    #[error("redirect refused: {source}")]
    Redirect {
        #[source]
        source: RedirectError,
    },
    /// A failure met after following redirects: names the target.
    #[error("redirected to {to}: {source}")]
    Redirected {
        /// The target without userinfo, query or fragment.
        to: String,
        #[source]
        source: Box<TransportError>,
    },
    /// HTTP/2 failed: the handshake, or the stream before its response head.
    #[error("request failed: HTTP/2: {source}")]
    Http2 {
        #[source]
        source: h2::Error,
    },
    /// The server's SETTINGS allow no stream on a new connection.
    #[error(
        "request failed: HTTP/2: the server allows no streams (SETTINGS_MAX_CONCURRENT_STREAMS 0)"
    )]
    Http2NoStreams,
    /// `http_version = "2"` and the server chose HTTP/1.1 in the TLS handshake.
    #[error("the server does not offer HTTP/2 (ALPN chose {chosen}); set http_version = \"auto\" or \"1.1\" for this feed")]
    Http2NotOffered { chosen: String },
    /// The request could not be made from what the client gave (not an absolute http URI).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Reading the body failed.
    #[error(transparent)]
    Body(#[from] BodyError),
}

impl TransportError {
    /// The error itself, under any [`TransportError::Redirected`].
    pub fn innermost(&self) -> &TransportError {
        match self {
            TransportError::Redirected { source, .. } => source.innermost(),
            other => other,
        }
    }

    /// Whether a redirect was refused by the rules (not a network failure: retrying soon will
    /// not help).
    pub fn is_redirect_refused(&self) -> bool {
        matches!(self.innermost(), TransportError::Redirect { .. })
    }
}

/// A URL as messages show it: without userinfo, query string or fragment.
pub fn display_url(url: &url::Url) -> String {
    let mut url = url.clone();
    // These fail only for URLs that cannot have userinfo, which then has none to remove.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}
