//! An HTTP/2 front for the HTTP/1.1 test server, as a reverse proxy (nginx, a CDN) puts one in
//! front of an SSE origin: it accepts h2c (prior knowledge) and forwards each stream as an
//! HTTP/1.1 request on a connection of its own, relaying the status, the headers and the body
//! bytes as they come. The end of the origin's body ends the stream; a broken one resets it
//! (RST_STREAM); a stream the client resets closes its origin connection. Absolute redirects to
//! the origin are rewritten to the front.
//!
//! With it the EventSource behaviour tests run over HTTP/2 unchanged
//! (`SSE_BRIDGE_TEST_OVER_HTTP2=1`, see `tests/eventsource.rs`). The HTTP/1.1 side uses the
//! bridge's own HTTP/1.1 code (`sse::transport::http1`), which the same tests cover directly.

use std::future::poll_fn;
use std::net::SocketAddr;

use bytes::Bytes;
use h2::server::SendResponse;
use sse_bridge::sse::transport::connect::Stream;
use sse_bridge::sse::transport::{http1, next_chunk};
use tokio::net::{TcpListener, TcpStream};

/// Whether the tests run over HTTP/2 (through a [`start`]ed front).
pub fn over_http2() -> bool {
    std::env::var_os("SSE_BRIDGE_TEST_OVER_HTTP2").is_some_and(|v| v == "1")
}

/// Starts a front for the origin at `origin`; returns its address.
pub fn start(origin: SocketAddr) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = TcpListener::from_std(listener).expect("listener");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(connection(tcp, origin, addr));
        }
    });
    addr
}

async fn connection(tcp: TcpStream, origin: SocketAddr, front: SocketAddr) {
    let Ok(mut conn) = h2::server::handshake(tcp).await else {
        return;
    };
    while let Some(Ok((request, respond))) = conn.accept().await {
        tokio::spawn(stream(request, respond, origin, front));
    }
}

async fn stream(
    request: http::Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    origin: SocketAddr,
    front: SocketAddr,
) {
    let (parts, mut recv) = request.into_parts();
    let mut body = Vec::new();
    while let Some(Ok(chunk)) = recv.data().await {
        let _ = recv.flow_control().release_capacity(chunk.len());
        body.extend_from_slice(&chunk);
    }
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let Ok(url) = url::Url::parse(&format!("http://{origin}{target}")) else {
        respond.send_reset(h2::Reason::PROTOCOL_ERROR);
        return;
    };
    // A request with a method other than GET says its length, as the client does over
    // HTTP/1.1.
    let body = (parts.method != http::Method::GET || !body.is_empty()).then_some(body);
    let Ok(tcp) = TcpStream::connect(origin).await else {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    };
    let answer = http1::exchange(
        Stream::Plain(tcp),
        &parts.method,
        &url,
        &parts.headers,
        body.as_deref(),
        None,
    );
    let (head, mut reader) = tokio::select! {
        answer = answer => match answer {
            Ok(a) => a,
            Err(_) => {
                respond.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
        },
        _ = poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    let mut response = http::Response::builder().status(head.status);
    let origin_prefix = format!("http://{origin}");
    for (name, value) in &head.headers {
        if matches!(
            name.as_str(),
            "connection" | "keep-alive" | "transfer-encoding" | "upgrade" | "proxy-connection"
        ) {
            continue;
        }
        let value = match (name == http::header::LOCATION, value.to_str()) {
            (true, Ok(location)) if location.starts_with(&origin_prefix) => {
                http::HeaderValue::from_str(&location.replacen(
                    &origin_prefix,
                    &format!("http://{front}"),
                    1,
                ))
                .unwrap_or_else(|_| value.clone())
            }
            _ => value.clone(),
        };
        response = response.header(name, value);
    }
    let Ok(response) = response.body(()) else {
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    };
    let Ok(mut send) = respond.send_response(response, false) else {
        return;
    };
    loop {
        let chunk = tokio::select! {
            chunk = next_chunk(&mut reader) => chunk,
            _ = poll_fn(|cx| send.poll_reset(cx)) => return,
        };
        match chunk {
            Ok(Some(bytes)) if bytes.is_empty() => {}
            Ok(Some(bytes)) => {
                if super::h2::send_all(&mut send, bytes).await.is_err() {
                    return;
                }
            }
            Ok(None) => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
            Err(_) => {
                send.send_reset(h2::Reason::CANCEL);
                return;
            }
        }
    }
}
