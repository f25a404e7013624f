//! DNS and TCP: resolving a host and connecting to its addresses in turn, with keepalive on the
//! socket; and [`Stream`], the connection a request is written to (plain TCP or TLS).
//!
//! Why not hyper-util's `HttpConnector` (Happy Eyeballs): it would not change what an idle
//! connection holds, but it brings its own resolver thread pool and error types for what is
//! twenty lines here; the sequential attempts with a shared timeout below are what hyper's
//! connector does without a second address family racing.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::TransportError;

/// TCP keepalive: notices a peer that vanished without a FIN even when idle_timeout is off.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Resolves `host` and connects to its addresses in turn. Each address but the last gets an
/// equal share of `timeout`, so one that drops SYNs does not use up the time for the others
/// (the caller bounds the whole).
pub async fn tcp_connect(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, TransportError> {
    let addrs: Vec<SocketAddr> = match url::Host::parse(host) {
        Ok(url::Host::Ipv4(ip)) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
        Ok(url::Host::Ipv6(ip)) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
        _ => tokio::net::lookup_host((host, port))
            .await
            .map_err(|source| TransportError::Dns {
                host: host.to_string(),
                source,
            })?
            .collect(),
    };
    let share = timeout
        .checked_div(u32::try_from(addrs.len()).unwrap_or(u32::MAX))
        .unwrap_or_default();
    let mut last = None;
    for (i, addr) in addrs.iter().enumerate() {
        let connect = TcpStream::connect(addr);
        let result = if i + 1 < addrs.len() {
            tokio::time::timeout(share, connect)
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
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
            Err(e) => last = Some((*addr, e)),
        }
    }
    Err(match last {
        Some((addr, source)) => TransportError::Connect { addr, source },
        None => TransportError::NoAddress {
            host: host.to_string(),
        },
    })
}

/// A connection to the server: plain TCP, or TLS over TCP (boxed: rustls' connection state is
/// about 1 KiB, which plain connections should not pay for).
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Plain(_) => "Stream::Plain",
            Stream::Tls(_) => "Stream::Tls",
        })
    }
}
