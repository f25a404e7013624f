//! HTTP/1.1: one request (GET, or the feed's method and body) on a connection of its own, and
//! the body read by [`body::BodyReader`], which holds no buffer while the connection is idle.
//! [`super::client::HttpTransport`] opens the connection and follows redirects.

pub mod body;
pub mod head;

use http::{HeaderMap, Method};
use url::Url;

use self::body::BodyReader;
use self::head::{read_head, request_head, write_all, Head};
use super::connect::Stream;
use super::TransportError;

/// A request sent as HTTP/1.1 on `stream` (a new connection, through `proxy` if the route goes
/// through one) and its response head; the body is left to read.
pub async fn exchange(
    mut stream: Stream,
    method: &Method,
    url: &Url,
    headers: &HeaderMap,
    body: Option<&[u8]>,
    proxy: Option<Option<&http::HeaderValue>>,
) -> Result<(Head, BodyReader), TransportError> {
    let mut request = request_head(method, url, headers, proxy, body.map(<[u8]>::len));
    // One write for head and body: a request body is small (a filter, a query).
    request.extend_from_slice(body.unwrap_or_default());
    write_all(&mut stream, &request)
        .await
        .map_err(|source| TransportError::Send { source })?;
    let (head, early) = read_head(&mut stream)
        .await
        .map_err(|source| TransportError::Head { source })?;
    let framing = head.framing;
    Ok((head, BodyReader::new(stream, framing, early)))
}
