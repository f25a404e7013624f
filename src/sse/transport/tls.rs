//! TLS: the shared rustls settings (certificates always verified, no insecure fallback), a
//! feed's own with its `ca_file`, and the handshake.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use tokio::net::TcpStream;

use super::connect::Stream;
use super::TransportError;

/// Why TLS settings could not be made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("{} is not a PEM file of certificates: {source}", .path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: Arc<rustls::pki_types::pem::Error>,
    },
    #[error("{} holds no certificate (expected PEM blocks `-----BEGIN CERTIFICATE-----`)", .path.display())]
    Empty { path: PathBuf },
    #[error("certificate {index} is not a usable CA certificate: {source}")]
    NotCa {
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("{}: {source}", .path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<TlsConfigError>,
    },
    #[error("TLS: {0}")]
    Rustls(#[source] rustls::Error),
}

/// The TLS settings of every feed, built once: ring, TLS 1.2 and 1.3, the webpki root
/// certificates, SNI, ALPN `http/1.1` (`HttpTransport` makes one copy per HTTP version it offers). Shared: a
/// configuration per feed would hold its own root store, about 25 KiB per feed.
pub fn shared_config() -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, TlsConfigError>> = OnceLock::new();
    CONFIG.get_or_init(|| config(Vec::new())).clone()
}

/// The TLS settings of [`shared_config`], trusting `extra` CA certificates as well as the web
/// roots.
fn config(
    extra: Vec<rustls::pki_types::CertificateDer<'static>>,
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for (i, cert) in extra.into_iter().enumerate() {
        roots.add(cert).map_err(|source| TlsConfigError::NotCa {
            index: i + 1,
            source,
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::Rustls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS settings of a feed with a `ca_file`: the web roots plus every certificate of that
/// PEM file, each checked to be usable as a trust anchor. The error names the file and says
/// what is wrong with it. `validate` calls it too, so a file that would fail at start is
/// reported there.
pub fn tls_config_with_ca_file(path: &Path) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let bytes = std::fs::read(path).map_err(|source| TlsConfigError::Read {
        path: path.to_path_buf(),
        source: Arc::new(source),
    })?;
    tls_config_with_ca_pem(path, &bytes)
}

/// [`tls_config_with_ca_file`] for the contents `bytes` already read from `path`.
pub fn tls_config_with_ca_pem(
    path: &Path,
    bytes: &[u8],
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsConfigError::Pem {
            path: path.to_path_buf(),
            source: Arc::new(source),
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::Empty {
            path: path.to_path_buf(),
        });
    }
    config(certs).map_err(|e| TlsConfigError::InFile {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

/// The TLS handshake with `host` over `tcp`. Certificates are always verified; there is no
/// insecure fallback.
pub async fn handshake(
    config: &Arc<rustls::ClientConfig>,
    tcp: TcpStream,
    host: Option<url::Host<&str>>,
) -> Result<Stream, TransportError> {
    let failed = |e: std::io::Error| TransportError::Tls { source: e };
    let name = match host {
        Some(url::Host::Domain(d)) => rustls::pki_types::ServerName::try_from(d.to_string())
            .map_err(|e| failed(std::io::Error::other(e)))?,
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).into(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).into(),
        None => return Err(failed(std::io::Error::other("the URL has no host"))),
    };
    let stream = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(failed)?;
    Ok(Stream::Tls(Box::new(stream)))
}
