//! Proxies from the environment, as reqwest and curl read them (`HTTP_PROXY`, `HTTPS_PROXY`,
//! `ALL_PROXY`, `NO_PROXY`, also lower case), through hyper-util's matcher: http:// URLs go
//! through the proxy in absolute form, https:// URLs through a `CONNECT` tunnel. A proxy that
//! is not `http://` (HTTPS or SOCKS proxies) is reported as unsupported.
//!
//! hyper-util's own tunnel and SOCKS connectors are tower services around its `HttpConnector`;
//! the tunnel below is one request head written and one read, holding nothing afterwards, so it
//! stays (the idle footprint is what matters here, ARCHITECTURE.md §8).

use std::sync::{Arc, OnceLock};

use http::HeaderValue;
use hyper_util::client::proxy::matcher::Matcher;
use tokio::net::TcpStream;

use super::http1::head::{read_head, write_all, HeadError};
use super::TransportError;

/// The proxy settings of the environment, read once (as reqwest read them once per client).
pub fn system_proxies() -> Arc<Matcher> {
    static PROXIES: OnceLock<Arc<Matcher>> = OnceLock::new();
    PROXIES
        .get_or_init(|| Arc::new(Matcher::from_env()))
        .clone()
}

/// Where to open the TCP connection for a URL.
#[derive(Debug)]
pub struct Route {
    /// Connect here (the server, or the proxy).
    pub host: String,
    pub port: u16,
    /// Through an HTTP proxy: the request goes to it in absolute form (http://) or through a
    /// `CONNECT` tunnel (https://), with this `Proxy-Authorization`.
    pub proxy: Option<Option<HeaderValue>>,
}

/// Where the connection for `url` goes: straight to the server or to a proxy.
pub fn route(proxies: &Matcher, url: &url::Url) -> Result<Route, TransportError> {
    let host = url.host_str().unwrap_or_default().to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    let key = format!("{}://{}:{port}/", url.scheme(), host);
    let intercept = key
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| proxies.intercept(&uri));
    let Some(intercept) = intercept else {
        return Ok(Route {
            host,
            port,
            proxy: None,
        });
    };
    let proxy = intercept.uri();
    if proxy.scheme_str() != Some("http") {
        return Err(TransportError::UnsupportedProxy {
            proxy: format!(
                "{}://{}",
                proxy.scheme_str().unwrap_or(""),
                proxy.host().unwrap_or("")
            ),
        });
    }
    Ok(Route {
        host: proxy.host().unwrap_or_default().to_string(),
        port: proxy.port_u16().unwrap_or(80),
        proxy: Some(intercept.basic_auth().cloned()),
    })
}

/// Why a `CONNECT` tunnel failed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("{0}")]
    Io(#[source] std::io::Error),
    #[error("{0}")]
    Head(#[source] HeadError),
    #[error("the proxy answered HTTP {0}")]
    Refused(u16),
    #[error("the proxy sent data before the TLS handshake")]
    EarlyData,
}

/// Opens a `CONNECT` tunnel through an HTTP proxy to the server of `url`.
pub async fn tunnel(
    mut tcp: TcpStream,
    url: &url::Url,
    auth: Option<&HeaderValue>,
) -> Result<TcpStream, TransportError> {
    let authority = format!(
        "{}:{}",
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or(443)
    );
    let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n").into_bytes();
    if let Some(auth) = auth {
        request.extend_from_slice(b"Proxy-Authorization: ");
        request.extend_from_slice(auth.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    let result = async {
        write_all(&mut tcp, &request)
            .await
            .map_err(TunnelError::Io)?;
        let (head, early) = read_head(&mut tcp).await.map_err(TunnelError::Head)?;
        if !(200..300).contains(&head.status.as_u16()) {
            return Err(TunnelError::Refused(head.status.as_u16()));
        }
        if !early.is_empty() {
            return Err(TunnelError::EarlyData);
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok(tcp),
        Err(source) => Err(TransportError::Tunnel { authority, source }),
    }
}
