//! The daemon's transport: opens connections (through the environment's proxy if it says so,
//! TLS for https://), speaks HTTP/1.1 or HTTP/2 as the request's [`HttpVersion`] and the server
//! allow, and follows redirects by the [`RedirectRules`]. Everything EventSource-specific
//! (status policy, content type, Last-Event-ID, `retry:`) is above it, the same for both
//! protocols.
//!
//! - HTTP/1.1 ([`super::http1`]): a connection of its own per stream.
//! - HTTP/2 ([`super::http2`]): streams on connections shared per origin. With `auto`, TLS
//!   offers both (ALPN `h2`, `http/1.1`) and the server chooses; `http://` stays HTTP/1.1
//!   unless the feed asks for `2` (prior knowledge).

use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_ENCODING, CONTENT_LANGUAGE, CONTENT_LOCATION, CONTENT_TYPE, LOCATION};
use http::{HeaderMap, Method, StatusCode};
use hyper_util::client::proxy::matcher::Matcher;
use url::Url;

use super::connect::{tcp_connect, Stream};
use super::http2::{self, body::H2Body, H2Request, Opened, OriginKey, Outcome, Pool};
use super::proxy::{route, tunnel, Route};
use super::redirect::{self, RedirectRules};
use super::{
    display_url, Body, ConnectTimeout, ConnectionInfo, FinalUrl, HttpVersion, Protocol,
    RequestBody, Response, ResponseFuture, Transport, TransportError, DEFAULT_CONNECT_TIMEOUT,
};

/// The transport: proxy rules, TLS settings (one per ALPN offer) and the HTTP/2 connections.
/// Per-request settings (the connect timeout, the redirect rules, the HTTP version) come with
/// each request, so one transport serves every feed with the same TLS settings and an idle
/// feed holds only a pointer to it.
#[derive(Debug)]
pub struct HttpTransport {
    proxies: Arc<Matcher>,
    /// ALPN `http/1.1`.
    tls_http1: Arc<rustls::ClientConfig>,
    /// ALPN `h2`, `http/1.1`.
    tls_auto: Arc<rustls::ClientConfig>,
    /// ALPN `h2`.
    tls_http2: Arc<rustls::ClientConfig>,
    pool: Pool,
}

/// A response's status, headers and body, and the connection it came over.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Box<dyn Body>,
    connection: ConnectionInfo,
}

impl HttpTransport {
    /// A transport with these proxy rules and TLS settings (their ALPN list is replaced per
    /// request by what its HTTP version offers).
    pub fn new(proxies: Arc<Matcher>, tls: Arc<rustls::ClientConfig>) -> Self {
        let with_alpn = |protocols: &[&[u8]]| {
            let mut config = (*tls).clone();
            config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
            Arc::new(config)
        };
        HttpTransport {
            proxies,
            tls_http1: with_alpn(&[b"http/1.1"]),
            tls_auto: with_alpn(&[b"h2", b"http/1.1"]),
            tls_http2: with_alpn(&[b"h2"]),
            pool: Pool::default(),
        }
    }
}

impl Transport for HttpTransport {
    fn send(self: Arc<Self>, request: http::Request<()>) -> ResponseFuture {
        Box::pin(async move { self.request(request).await })
    }
}

impl HttpTransport {
    /// Sends the request and follows redirects; returns the first response that is not a
    /// redirect to follow. A failure after a redirect names its target.
    async fn request(&self, request: http::Request<()>) -> Result<Response, TransportError> {
        let (mut parts, ()) = request.into_parts();
        let mut method = parts.method;
        let mut body = parts.extensions.remove::<RequestBody>().map(|b| b.0);
        let rules = parts
            .extensions
            .remove::<RedirectRules>()
            .unwrap_or_default();
        let connect_timeout = parts
            .extensions
            .get::<ConnectTimeout>()
            .map_or(DEFAULT_CONNECT_TIMEOUT, |t| t.0);
        let version = parts
            .extensions
            .get::<HttpVersion>()
            .copied()
            .unwrap_or_default();
        let mut url = Url::parse(&parts.uri.to_string())
            .map_err(|e| TransportError::InvalidRequest(format!("not an absolute URL: {e}")))?;
        let mut headers = parts.headers;
        let first = url.clone();
        let mut followed = 0usize;
        loop {
            let redirected = |e: TransportError, url: &Url| {
                if *url == first {
                    e
                } else {
                    TransportError::Redirected {
                        to: display_url(url),
                        source: Box::new(e),
                    }
                }
            };
            let answer = self
                .exchange(
                    &method,
                    &url,
                    &headers,
                    body.as_deref(),
                    connect_timeout,
                    version,
                )
                .await
                .map_err(|e| redirected(e, &url))?;
            let next = matches!(answer.status.as_u16(), 301 | 302 | 303 | 307 | 308)
                .then(|| answer.headers.get(LOCATION))
                .flatten()
                .and_then(|l| l.to_str().ok())
                .and_then(|location| url.join(location.trim()).ok());
            let Some(next) = next else {
                let mut response = http::Response::new(answer.body);
                *response.status_mut() = answer.status;
                *response.headers_mut() = answer.headers;
                response.extensions_mut().insert(FinalUrl(url));
                response.extensions_mut().insert(answer.connection);
                return Ok(response);
            };
            let cross_origin = redirect::check(&url, &next, followed, rules.max)
                .map_err(|source| redirected(TransportError::Redirect { source }, &url))?;
            if cross_origin {
                redirect::cross_origin_headers(&mut headers, &rules);
            }
            // As browsers do (the Fetch standard): a 303, or a 301/302 answered to a POST,
            // turns the request into a GET without its body; 307 and 308 repeat it as it was.
            let status = answer.status.as_u16();
            if (status == 303 && method != Method::GET && method != Method::HEAD)
                || (matches!(status, 301 | 302) && method == Method::POST)
            {
                method = Method::GET;
                body = None;
                for name in [
                    CONTENT_TYPE,
                    CONTENT_ENCODING,
                    CONTENT_LANGUAGE,
                    CONTENT_LOCATION,
                ] {
                    headers.remove(name);
                }
            }
            tracing::debug!(status, "redirected to {}", display_url(&next));
            followed += 1;
            url = next;
        }
    }

    /// One request and its response head: a stream on a shared HTTP/2 connection, or HTTP/1.1
    /// on a connection of its own.
    async fn exchange(
        &self,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        body: Option<&[u8]>,
        connect_timeout: Duration,
        version: HttpVersion,
    ) -> Result<Answer, TransportError> {
        let route = route(&self.proxies, url)?;
        let https = url.scheme() == "https";
        let http1 = |tls: &Arc<rustls::ClientConfig>| {
            let tls = tls.clone();
            let route = &route;
            async move {
                let stream = self.open(url, route, connect_timeout, &tls).await?;
                self.http1(stream, method, url, headers, body, route).await
            }
        };
        match version {
            HttpVersion::Http1 => return http1(&self.tls_http1).await,
            HttpVersion::Auto if !https => return http1(&self.tls_http1).await,
            HttpVersion::Http2 if !https && route.proxy.is_some() => {
                return Err(TransportError::InvalidRequest(format!(
                    "HTTP/2 without TLS (http_version = \"2\" on an http:// URL) cannot go \
                     through the proxy {}:{} from the environment; set http_version = \"1.1\" \
                     or list the host in NO_PROXY",
                    route.host, route.port
                )))
            }
            _ => {}
        }
        let tls = match version {
            HttpVersion::Http2 => &self.tls_http2,
            _ => &self.tls_auto,
        };
        let key = OriginKey {
            scheme: url.scheme().to_string(),
            host: url.host_str().unwrap_or_default().to_string(),
            port: url.port_or_known_default().unwrap_or(443),
            tls: Arc::as_ptr(tls) as usize,
            proxy: route
                .proxy
                .as_ref()
                .map(|_| format!("{}:{}", route.host, route.port)),
        };
        let request = H2Request {
            method,
            url,
            headers,
            body,
        };
        let open = || async {
            let stream = self.open(url, &route, connect_timeout, tls).await?;
            let chosen = match &stream {
                Stream::Plain(_) => return Ok(Opened::Http2(stream)),
                Stream::Tls(tls) => tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec),
            };
            match chosen.as_deref() {
                Some(b"h2") => Ok(Opened::Http2(stream)),
                _ if version == HttpVersion::Http2 => Err(TransportError::Http2NotOffered {
                    chosen: chosen.map_or_else(
                        || "nothing".to_string(),
                        |c| String::from_utf8_lossy(&c).into_owned(),
                    ),
                }),
                _ => Ok(Opened::Http1(stream)),
            }
        };
        // Boxed: an attempt's future is as large as its largest branch, and 10 000 feeds
        // connecting at once over HTTP/1.1 should not each carry the HTTP/2 handshake's state.
        let outcome = Box::pin(self.pool.request(&key, &request, connect_timeout, open)).await?;
        match outcome {
            Outcome::Http2(response, slot) => {
                let id = slot.connection();
                let (parts, recv) = response.into_parts();
                Ok(Answer {
                    status: parts.status,
                    headers: parts.headers,
                    body: Box::new(H2Body::new(recv, slot)),
                    connection: ConnectionInfo {
                        protocol: Protocol::Http2,
                        id,
                    },
                })
            }
            Outcome::Http1(stream) => self.http1(stream, method, url, headers, body, &route).await,
            Outcome::UseHttp1 => http1(&self.tls_http1).await,
        }
    }

    /// The request as HTTP/1.1 on `stream`, a new connection.
    async fn http1(
        &self,
        stream: Stream,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        body: Option<&[u8]>,
        route: &Route,
    ) -> Result<Answer, TransportError> {
        let (head, reader) = super::http1::exchange(
            stream,
            method,
            url,
            headers,
            body,
            route.proxy.as_ref().map(Option::as_ref),
        )
        .await?;
        Ok(Answer {
            status: head.status,
            headers: head.headers,
            body: Box::new(reader),
            connection: ConnectionInfo {
                protocol: Protocol::Http1,
                id: http2::next_connection_id(),
            },
        })
    }

    /// Opens the connection for `url` by `route` (TLS with `tls` for https://), within
    /// `connect_timeout`.
    async fn open(
        &self,
        url: &Url,
        route: &Route,
        connect_timeout: Duration,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Result<Stream, TransportError> {
        let open = async {
            let tcp = tcp_connect(&route.host, route.port, connect_timeout).await?;
            if url.scheme() != "https" {
                return Ok(Stream::Plain(tcp));
            }
            let tcp = match &route.proxy {
                Some(auth) => tunnel(tcp, url, auth.as_ref()).await?,
                None => tcp,
            };
            super::tls::handshake(tls, tcp, url.host()).await
        };
        match tokio::time::timeout(connect_timeout, open).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::ConnectTimeout {
                timeout: connect_timeout,
                host: route.host.clone(),
                port: route.port,
            }),
        }
    }
}
