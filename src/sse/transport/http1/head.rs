//! HTTP/1.1 heads: the request head written, the response head read and parsed with
//! `httparse`, and how the response's body is framed (RFC 9112 §6.3).

use http::header::{HOST, PROXY_AUTHORIZATION, USER_AGENT as USER_AGENT_HEADER};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Largest response head accepted (status line and headers); hyper's default limit is larger,
/// but an event stream's head is a few hundred bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most header fields accepted in a response head (hyper's default).
const MAX_HEADERS: usize = 100;

/// `User-Agent` unless the request sets one.
pub const USER_AGENT: &str = concat!("sse-bridge/", env!("CARGO_PKG_VERSION"));

/// Why a response head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("invalid HTTP response head: {0}")]
    Invalid(String),
    #[error("reading the response: {0}")]
    Io(#[source] std::io::Error),
    #[error("the response head is larger than {} KiB", MAX_HEAD_BYTES / 1024)]
    TooLarge,
    #[error("the server closed the connection without answering")]
    NoAnswer,
    #[error("the server closed the connection in the middle of the response head")]
    Cut,
}

/// A response head: status, headers, and how the body ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub framing: Framing,
}

/// How the body of a response ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(u64),
    /// Neither: the body runs until the server closes the connection.
    Eof,
}

/// Writes a whole request head and flushes it.
pub async fn write_all<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// The request head of a `method` request for `url`: origin form, or absolute form through an
/// HTTP proxy (`proxy` set, http:// URLs only, with that `Proxy-Authorization`). `Host` and
/// `User-Agent` unless `headers` set them; `Content-Length` when a body of `body_len` bytes
/// follows.
pub fn request_head(
    method: &http::Method,
    url: &url::Url,
    headers: &HeaderMap,
    proxy: Option<Option<&HeaderValue>>,
    body_len: Option<usize>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    let through_proxy = proxy.is_some() && url.scheme() == "http";
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
    if let Some(len) = body_len {
        field(b"Content-Length", len.to_string().as_bytes());
    }
    if through_proxy && !headers.contains_key(PROXY_AUTHORIZATION) {
        if let Some(Some(auth)) = proxy {
            field(b"Proxy-Authorization", auth.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Parses a response head from the start of `buf`: `Ok(None)` when it is not complete yet,
/// else the head and its length in bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    let invalid = |what: &str| HeadError::Invalid(what.to_string());
    let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut parsed);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HeadError::Invalid(e.to_string())),
    };
    let status = StatusCode::from_u16(response.code.unwrap_or_default())
        .map_err(|_| invalid("invalid status code"))?;
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    let mut chunked = false;
    let mut transfer_encoded = false;
    let mut length: Option<u64> = None;
    for h in response.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| invalid("invalid header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| HeadError::Invalid(format!("invalid value of header {name}")))?;
        if name == http::header::TRANSFER_ENCODING {
            // The codings of every Transfer-Encoding field, in order; the last one decides
            // whether the body is chunked (RFC 9112 §6.3).
            let text = value
                .to_str()
                .map_err(|_| invalid("Transfer-Encoding is not text"))?;
            for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                transfer_encoded = true;
                chunked = coding.eq_ignore_ascii_case("chunked");
            }
        } else if name == http::header::CONTENT_LENGTH {
            let parsed = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| invalid("invalid Content-Length"))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(invalid("conflicting Content-Length headers"));
            }
            length = Some(parsed);
        }
        headers.append(name, value);
    }
    // With Transfer-Encoding, chunked as the final coding frames the body; any other final
    // coding means the body runs until the connection closes, whatever a Content-Length says.
    let framing = if chunked {
        Framing::Chunked
    } else if transfer_encoded {
        Framing::Eof
    } else if let Some(length) = length {
        Framing::Length(length)
    } else {
        Framing::Eof
    };
    Ok(Some((
        Head {
            status,
            headers,
            framing,
        },
        len,
    )))
}

/// Reads a response head from `stream`. Returns it with the bytes read after it (the start of
/// the body). Informational answers (1xx) are skipped, as hyper does.
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(Head, Vec<u8>), HeadError> {
    use tokio::io::AsyncReadExt;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        if let Some((head, len)) = parse_head(&buf)? {
            buf.drain(..len);
            if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
                continue;
            }
            // Only the bytes: the head's buffer would otherwise stay with the connection.
            let early = if buf.is_empty() {
                Vec::new()
            } else {
                buf.clone()
            };
            return Ok((head, early));
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().min(MAX_HEAD_BYTES));
        }
        let n = stream.read_buf(&mut buf).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HeadError::NoAnswer
            } else {
                HeadError::Cut
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed_with_their_framing() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\nbody";
        let (head, len) = parse_head(raw).unwrap().unwrap();
        assert_eq!(len, raw.len() - 4);
        assert_eq!(head.status, 200);
        assert_eq!(head.headers["content-type"], "text/event-stream");
        assert_eq!(head.framing, Framing::Chunked);

        // A final coding other than chunked: read until close, Content-Length ignored.
        let (head, _) = parse_head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: GZip\r\nContent-Length: 5\r\nContent-Encoding: br\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.framing, Framing::Eof);
        assert_eq!(head.headers.get_all("transfer-encoding").iter().count(), 2);

        let (head, _) =
            parse_head(b"HTTP/1.1 302 Found\r\nlocation: /next\r\ncontent-length: 0\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(head.headers["location"], "/next");
        assert_eq!(head.framing, Framing::Length(0));

        let (head, _) = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/\xffx\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(head.headers["content-type"].to_str().is_err());

        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Ty")
            .unwrap()
            .is_none());
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(parse_head(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn read_head_skips_informational_answers_and_keeps_early_body_bytes() {
        let raw: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: x\n\n";
        let mut reader = raw;
        let (head, early) = read_head(&mut reader).await.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(early, b"data: x\n\n");
        let mut cut: &[u8] = b"HTTP/1.1 200 OK\r\nContent-";
        assert!(read_head(&mut cut)
            .await
            .unwrap_err()
            .to_string()
            .contains("middle of the response head"));
    }
}
