//! The settings of `serve`, in one struct for both places they are written: the `[serve]`
//! section of the daemon's config (so that `run` serves what it stores) and the flags of the
//! standalone `sse-bridge serve DATABASE` command. The doc comments are the user docs of both;
//! the defaults are the command line's, stated once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::units::{parse_byte_size, ByteSize};

fn byte_size(s: &str) -> Result<ByteSize, String> {
    parse_byte_size(s).map(ByteSize)
}

/// `[serve]`: serve stored events to EventSource clients (browsers, services, another
/// sse-bridge) over Server-Sent Events, with resume by `Last-Event-ID`.
///
/// ```toml
/// [serve]
/// listen = "127.0.0.1:8090"
/// cors_origins = ["https://dashboard.example.org"]
/// token_file = "/etc/sse-bridge/serve-tokens"
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Address and port to listen on. The default accepts connections from this machine
    /// only; use `0.0.0.0:8080` to accept others (with `token_file`, and TLS or a reverse
    /// proxy in front).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// (`[serve]` only) The `sqlite` or `postgres` sink whose events are served. May be left
    /// out when there is exactly one such sink.
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,

    /// Web page origins allowed to read streams across origins (CORS), exactly as browsers
    /// send them: `https://dashboard.example.org`, `http://localhost:3000`; `*` for any page.
    /// None by default: only same-origin pages (through a reverse proxy) and clients that are
    /// not browsers. A request from another origin is answered 403.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,

    /// Answer allowed origins with `Access-Control-Allow-Credentials: true`, for pages that
    /// open `new EventSource(url, {withCredentials: true})` because a proxy in front checks
    /// cookies. Cannot be combined with the origin `*`.
    #[arg(long)]
    pub cors_credentials: bool,

    /// A file of access tokens: one per line (at least 16 characters), optionally followed by
    /// the feeds it may read, as globs (`wiki-* orders`); `#` starts a comment line. With it,
    /// every request needs a token, as `Authorization: Bearer TOKEN` or, for a browser's
    /// EventSource, the `access_token` query parameter: 401 without a valid one, 403 for a
    /// feed the token may not read. Re-read on SIGHUP. Without it, anyone who can reach the
    /// port reads every feed.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,

    /// A PEM certificate chain: serve HTTPS instead of HTTP (with `tls_key`).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of `tls_cert` (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,

    /// A comment line (`: heartbeat`) is sent this often, so proxies and clients with an idle
    /// timeout keep the connection.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,

    /// The reconnection delay sent to clients (`retry:` field).
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub retry: Duration,

    /// How often the database is checked for new events.
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,

    /// Frames queued per client in front of its socket, at most.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub client_buffer: usize,

    /// Bytes of rendered frames queued per client in front of its socket, at most (an empty
    /// queue still takes one frame, however large).
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = byte_size)]
    pub client_buffer_bytes: ByteSize,

    /// Bytes queued for all clients together, at most: a client whose queue is not empty
    /// waits while the total is reached.
    #[arg(long, value_name = "SIZE", default_value = "128MiB", value_parser = byte_size)]
    pub max_buffered_bytes: ByteSize,

    /// A live client that has not taken an event while this many newer events were stored is
    /// disconnected (it resumes with its Last-Event-ID).
    #[arg(long, value_name = "N", default_value_t = 16384)]
    pub max_lag: usize,

    /// A live client that has not taken an event while this many bytes of newer events were
    /// stored is disconnected (it resumes with its Last-Event-ID). Bounds the memory of the
    /// ring that holds new events for the clients.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = byte_size)]
    pub max_lag_bytes: ByteSize,

    /// Connections served at once. One over the cap is answered `503 Service Unavailable`
    /// with `Retry-After` and closed. Lowered, with a warning, to fit the open-file limit.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_clients: usize,

    /// Time a client has to send its request head (and to finish the TLS handshake); a
    /// connection that sends half a request is closed after it.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,

    /// A client whose socket takes nothing for this long while its queue is full is
    /// disconnected (it resumes with its Last-Event-ID).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        // The defaults are the command line's: parse an empty command line.
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            config: ServeConfig,
        }
        <Defaults as clap::Parser>::try_parse_from(["serve"])
            .map(|d| d.config)
            .expect("the built-in defaults of [serve] parse")
    }
}

impl ServeConfig {
    /// Offline checks, as `(key, message)` with keys relative to the section (`listen`,
    /// `cors_origins[1]`). `sqlite_sinks` are the names of the configured `sqlite` sinks, when
    /// checked as part of a daemon config (`None` for the standalone command).
    pub fn validate(&self, sqlite_sinks: Option<&[&str]>) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        let mut issue = |key: &str, message: String| issues.push((key.to_string(), message));
        for (key, zero) in [
            ("client_buffer", self.client_buffer == 0),
            ("max_lag", self.max_lag == 0),
            ("max_clients", self.max_clients == 0),
            ("client_buffer_bytes", self.client_buffer_bytes.0 == 0),
            ("max_buffered_bytes", self.max_buffered_bytes.0 == 0),
            ("max_lag_bytes", self.max_lag_bytes.0 == 0),
        ] {
            if zero {
                issue(key, "must be at least 1".into());
            }
        }
        for (key, d) in [
            ("heartbeat", self.heartbeat),
            ("poll_interval", self.poll_interval),
            ("header_timeout", self.header_timeout),
            ("send_timeout", self.send_timeout),
        ] {
            if d.is_zero() {
                issue(key, "must be greater than zero".into());
            }
        }
        for (i, origin) in self.cors_origins.iter().enumerate() {
            if let Err(e) = super::cors::check_origin(origin) {
                issue(&format!("cors_origins[{i}]"), e);
            }
        }
        if self.cors_credentials && self.cors_origins.iter().any(|o| o == "*") {
            issue(
                "cors_credentials",
                "cannot be combined with the origin `*` (browsers refuse it); list the origins"
                    .into(),
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            issue(
                if self.tls_cert.is_some() {
                    "tls_key"
                } else {
                    "tls_cert"
                },
                "`tls_cert` and `tls_key` go together: set both to serve HTTPS, or neither".into(),
            );
        }
        if let Some(sinks) = sqlite_sinks {
            match (&self.sink, sinks) {
                (Some(name), _) if !sinks.contains(&name.as_str()) => issue(
                    "sink",
                    format!(
                        "`{name}` is not a sqlite or postgres sink; serve reads what one of \
                         those stores (such sinks: {})",
                        list(sinks)
                    ),
                ),
                (None, []) => issue(
                    "sink",
                    "serve reads what a sqlite or postgres sink stores, and there is none: \
                     add a `type = \"sqlite\"` or `type = \"postgres\"` sink"
                        .into(),
                ),
                (None, [_, _, ..]) => issue(
                    "sink",
                    format!(
                        "there are several sqlite and postgres sinks ({}); name the one to serve",
                        list(sinks)
                    ),
                ),
                _ => {}
            }
        }
        issues
    }

    /// Whether the server speaks HTTPS.
    pub fn tls(&self) -> Option<(&Path, &Path)> {
        self.tls_cert.as_deref().zip(self.tls_key.as_deref())
    }

    /// Whether `listen` accepts connections from other machines.
    pub fn is_public(&self) -> bool {
        !self.listen.ip().is_loopback()
    }
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        return "none".into();
    }
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `sse-bridge serve` arguments: the database, then the same settings as `[serve]`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The SQLite database written by a `sqlite` sink (or the state database it shares),
    /// opened read-only, which must already exist; or a PostgreSQL database written by a
    /// `postgres` sink, `postgresql://USER@HOST/DB` (its table named by --table; the
    /// password from `PGPASSWORD`, never on the command line).
    #[arg(value_name = "DATABASE")]
    pub database: PathBuf,

    /// The table of a PostgreSQL database.
    #[arg(long, value_name = "NAME", default_value = "sse_events")]
    pub table: String,

    /// A feed that may be asked for before it has stored events (repeatable). Feeds with
    /// stored events are always served; any other name is answered 404.
    #[arg(long = "feed", value_name = "NAME")]
    pub feeds: Vec<String>,

    #[command(flatten)]
    pub config: ServeConfig,
}

impl ServeArgs {
    /// Where the events are: the file, or the PostgreSQL URL and --table.
    pub fn source(&self) -> anyhow::Result<super::EventSource> {
        let Some(url) = self
            .database
            .to_str()
            .filter(|u| crate::replay::postgres::is_postgres_url(u))
        else {
            return Ok(super::EventSource::Sqlite(self.database.clone()));
        };
        if let Some(problem) = crate::sink::postgres::config::table_problem(&self.table) {
            anyhow::bail!("--table: {problem}");
        }
        let connection = crate::sink::postgres::config::parse_connection(url)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(super::EventSource::Postgres {
            connection: Box::new(connection),
            table: self.table.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_command_lines() {
        let d = ServeConfig::default();
        assert_eq!(d.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(d.heartbeat, Duration::from_secs(15));
        assert_eq!(d.client_buffer_bytes, ByteSize::mib(1));
        assert_eq!(d.max_clients, 1024);
        assert!(d.cors_origins.is_empty() && d.token_file.is_none() && d.tls().is_none());
        let parsed: ServeConfig = toml::from_str("").unwrap();
        assert_eq!(parsed, d);
        assert!(d.validate(Some(&["db"])).is_empty());
    }

    #[test]
    fn the_section_is_checked_key_by_key() {
        let c: ServeConfig = toml::from_str(
            r#"
            listen = "0.0.0.0:8090"
            cors_origins = ["https://a.example", "https://b.example/"]
            cors_credentials = true
            tls_cert = "cert.pem"
            heartbeat = "0s"
            max_lag_bytes = "0"
            "#,
        )
        .unwrap();
        assert!(c.is_public());
        let issues = c.validate(Some(&["one", "two"]));
        let keys: Vec<&str> = issues.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "max_lag_bytes",
                "heartbeat",
                "cors_origins[1]",
                "tls_key",
                "sink"
            ],
            "{issues:?}"
        );
        assert!(issues[4].1.contains("`one`, `two`"), "{issues:?}");
        let err = toml::from_str::<ServeConfig>("listen = \"localhost\"").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        let err = toml::from_str::<ServeConfig>("cors = []").unwrap_err();
        assert!(err.to_string().contains("unknown field `cors`"), "{err}");

        let named: ServeConfig = toml::from_str("sink = \"nope\"").unwrap();
        assert!(named.validate(Some(&["db"]))[0]
            .1
            .contains("not a sqlite or postgres sink"));
        assert!(ServeConfig::default().validate(Some(&[]))[0]
            .1
            .contains("there is none"));
    }
}
