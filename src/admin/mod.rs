//! The admin HTTP endpoint (off unless `[admin]` is configured): Prometheus metrics, health and
//! readiness probes, the feeds and sinks as JSON, and a live tap of routed events; and the
//! client side of it (`sse-bridge status`, `sse-bridge tap`).
//!
//! The endpoint only reads the [`Registry`](crate::supervisor::Registry): atomics, short locks
//! and the tap broadcast, which never waits for a slow reader. Nothing it does can hold a feed
//! back.

pub mod client;
pub(crate) mod metrics;
mod server;
pub mod stats;

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use server::AdminServer;

/// The default `[admin] listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9187";

/// `[admin]`: the admin HTTP endpoint. Off when the section is absent; `[admin]` alone turns
/// it on at `127.0.0.1:9187`.
///
/// ```toml
/// [admin]
/// listen = "127.0.0.1:9187"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The address and port to listen on, `IP:PORT` (`[::1]:9187` for IPv6). The endpoint has
    /// no authentication and `/tap` shows event data, so keep it on a loopback address unless
    /// the network in front of it is trusted; any other address is allowed (and logged as a
    /// warning at start). Changing it takes effect at the next start, not on reload.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `true` (default): `GET /tap` streams routed events (what `sse-bridge tap` reads).
    /// `false`: `/tap` answers 403, for bridges whose event data the people who can reach the
    /// endpoint must not see.
    #[serde(default = "default_tap")]
    pub tap: bool,
    /// Connections served at once (default 64). One over the cap is answered at once with
    /// `503 Service Unavailable` and `Retry-After: 1`, then closed. The cap is lowered, with a
    /// warning in the log, so that the endpoint never takes more than half of the open-file
    /// descriptors left once every feed has two and 128 are kept for the state database, sinks
    /// and the rest (it never goes below 4, so that a health probe gets through).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a client has to send a complete request head (default 10 s), counted from the
    /// connection's start or, on a kept-alive connection, from the end of the previous
    /// response: a connection that sends half a request, or sits idle between requests, is
    /// closed after it.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
}

fn default_max_connections() -> usize {
    64
}

fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_string()
}

fn default_tap() -> bool {
    true
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_listen(),
            tap: default_tap(),
            max_connections: default_max_connections(),
            header_timeout: default_header_timeout(),
        }
    }
}

impl AdminConfig {
    /// The socket address in `listen`.
    pub fn addr(&self) -> Result<SocketAddr, String> {
        self.listen.trim().parse::<SocketAddr>().map_err(|_| {
            format!(
                "`{}` is not an IP address and port such as \"127.0.0.1:9187\" or \"[::1]:9187\" (host names are not resolved)",
                self.listen
            )
        })
    }

    /// Offline checks: `(key relative to [admin], message)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        if let Err(e) = self.addr() {
            issues.push(("listen".to_string(), e));
        }
        if self.max_connections == 0 {
            issues.push((
                "max_connections".to_string(),
                "must be at least 1 (remove the `[admin]` section to turn the endpoint off)"
                    .to_string(),
            ));
        }
        if self.header_timeout.is_zero() {
            issues.push((
                "header_timeout".to_string(),
                "must be greater than zero, such as \"10s\"".to_string(),
            ));
        }
        issues
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn absent_section_is_off_and_empty_section_uses_the_default() {
        let base = "[[feed]]\nname = \"f\"\nurl = \"http://127.0.0.1:9/\"\n";
        let c = Config::from_toml_str(base).expect("parses");
        assert_eq!(c.admin, None);
        let c = Config::from_toml_str(&format!("{base}[admin]\n")).expect("parses");
        assert_eq!(c.admin, Some(AdminConfig::default()));
        let err = Config::from_toml_str(&format!("{base}[admin]\nlisten = \"x\"\nport = 1\n"))
            .expect_err("unknown key");
        assert!(err.to_string().contains("admin.port"), "{err}");
    }

    #[test]
    fn listen_must_be_a_socket_address() {
        let mut c = AdminConfig::default();
        assert!(c.validate().is_empty());
        c.listen = "[::1]:80".into();
        assert!(c.validate().is_empty());
        c.listen = "localhost:9187".into();
        let issues = c.validate();
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].0, "listen");
        assert!(issues[0].1.contains("localhost:9187"));
        c.listen = "127.0.0.1".into();
        assert_eq!(c.validate().len(), 1);
    }

    #[test]
    fn connection_limits_have_defaults_and_are_checked() {
        let base = "[[feed]]\nname = \"f\"\nurl = \"http://127.0.0.1:9/\"\n";
        let c = Config::from_toml_str(&format!(
            "{base}[admin]\nmax_connections = 8\nheader_timeout = \"2s\"\n"
        ))
        .expect("parses");
        let admin = c.admin.expect("admin");
        assert_eq!(admin.max_connections, 8);
        assert_eq!(admin.header_timeout, Duration::from_secs(2));
        assert_eq!(AdminConfig::default().max_connections, 64);
        assert_eq!(
            AdminConfig::default().header_timeout,
            Duration::from_secs(10)
        );
        let zero = AdminConfig {
            max_connections: 0,
            header_timeout: Duration::ZERO,
            ..AdminConfig::default()
        };
        let keys: Vec<String> = zero.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["max_connections", "header_timeout"]);
    }
}
