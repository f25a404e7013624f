//! The lean HTTP/1.1 transport: one request (GET, or the feed's method and body) on a new connection (through the
//! environment's proxy if it says so, TLS for https://), redirects followed by the
//! [`RedirectRules`], and the body read by [`body::BodyReader`], which holds no buffer while the
//! connection is idle.
//!
//! HTTP/1.1 only: an event stream is one long response, which HTTP/2 would not make faster,
//! and TLS offers ALPN `http/1.1` alone so that servers never pick HTTP/2.

pub mod body;
pub mod head;

use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_ENCODING, CONTENT_LANGUAGE, CONTENT_LOCATION, CONTENT_TYPE, LOCATION};
use http::{HeaderMap, Method};
use hyper_util::client::proxy::matcher::Matcher;
use url::Url;

use self::body::BodyReader;
use self::head::{read_head, request_head, write_all, Head};
use super::connect::{tcp_connect, Stream};
use super::proxy::{route, tunnel, Route};
use super::redirect::{self, RedirectRules};
use super::{
    display_url, Body, ConnectTimeout, FinalUrl, RequestBody, Response, ResponseFuture, Transport,
    TransportError, DEFAULT_CONNECT_TIMEOUT,
};

/// The HTTP/1.1 transport: proxy rules and TLS settings. Per-request settings (the connect
/// timeout, the redirect rules) come with each request, so one transport serves every feed
/// with the same TLS settings and an idle feed holds only a pointer to it.
#[derive(Debug)]
pub struct Http1Transport {
    proxies: Arc<Matcher>,
    tls: Arc<rustls::ClientConfig>,
}

impl Http1Transport {
    pub fn new(proxies: Arc<Matcher>, tls: Arc<rustls::ClientConfig>) -> Self {
        Http1Transport { proxies, tls }
    }
}

impl Transport for Http1Transport {
    fn send(self: Arc<Self>, request: http::Request<()>) -> ResponseFuture {
        Box::pin(async move { self.request(request).await })
    }
}

/// A response with its head read, its body not yet.
struct Answer {
    head: Head,
    stream: Stream,
    early: Vec<u8>,
}

impl Http1Transport {
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
                .exchange(&method, &url, &headers, body.as_deref(), connect_timeout)
                .await
                .map_err(|e| redirected(e, &url))?;
            let next = matches!(answer.head.status.as_u16(), 301 | 302 | 303 | 307 | 308)
                .then(|| answer.head.headers.get(LOCATION))
                .flatten()
                .and_then(|l| l.to_str().ok())
                .and_then(|location| url.join(location.trim()).ok());
            let Some(next) = next else {
                let Answer {
                    head,
                    stream,
                    early,
                } = answer;
                let body: Box<dyn Body> = Box::new(BodyReader::new(stream, head.framing, early));
                let mut response = http::Response::new(body);
                *response.status_mut() = head.status;
                *response.headers_mut() = head.headers;
                response.extensions_mut().insert(FinalUrl(url));
                return Ok(response);
            };
            let cross_origin = redirect::check(&url, &next, followed, rules.max)
                .map_err(|source| redirected(TransportError::Redirect { source }, &url))?;
            if cross_origin {
                redirect::cross_origin_headers(&mut headers, &rules);
            }
            // As browsers do (the Fetch standard): a 303, or a 301/302 answered to a POST,
            // turns the request into a GET without its body; 307 and 308 repeat it as it was.
            let status = answer.head.status.as_u16();
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
            tracing::debug!(
                status = answer.head.status.as_u16(),
                "redirected to {}",
                display_url(&next)
            );
            followed += 1;
            url = next;
        }
    }

    /// One request and its response head on a new connection.
    async fn exchange(
        &self,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        body: Option<&[u8]>,
        connect_timeout: Duration,
    ) -> Result<Answer, TransportError> {
        let (mut stream, route) = self.open(url, connect_timeout).await?;
        let mut request = request_head(
            method,
            url,
            headers,
            route.proxy.as_ref().map(Option::as_ref),
            body.map(<[u8]>::len),
        );
        // One write for head and body: a request body is small (a filter, a query).
        request.extend_from_slice(body.unwrap_or_default());
        write_all(&mut stream, &request)
            .await
            .map_err(|source| TransportError::Send { source })?;
        let (head, early) = read_head(&mut stream)
            .await
            .map_err(|source| TransportError::Head { source })?;
        Ok(Answer {
            head,
            stream,
            early,
        })
    }

    /// Opens the connection for `url` (through a proxy if the environment says so), within
    /// `connect_timeout`.
    async fn open(
        &self,
        url: &Url,
        connect_timeout: Duration,
    ) -> Result<(Stream, Route), TransportError> {
        let route = route(&self.proxies, url)?;
        let open = async {
            let tcp = tcp_connect(&route.host, route.port, connect_timeout).await?;
            if url.scheme() != "https" {
                return Ok(Stream::Plain(tcp));
            }
            let tcp = match &route.proxy {
                Some(auth) => tunnel(tcp, url, auth.as_ref()).await?,
                None => tcp,
            };
            super::tls::handshake(&self.tls, tcp, url.host()).await
        };
        match tokio::time::timeout(connect_timeout, open).await {
            Ok(Ok(stream)) => Ok((stream, route)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TransportError::ConnectTimeout {
                timeout: connect_timeout,
                host: route.host,
                port: route.port,
            }),
        }
    }
}
