//! `[cluster]`: run the same configuration on several machines that share one PostgreSQL
//! database; each feed is read by exactly one of them (ARCHITECTURE.md §9).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sink::postgres::config::{
    parse_connection, read_connection_string, shown, source_issues,
};

/// The shortest lease: renewals go every third of it, and a database round trip must fit.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
/// The longest lease: a dead instance's feeds wait this long at most.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(600);
/// The longest instance name (it is shown in `status` and logs).
pub const MAX_INSTANCE_LEN: usize = 128;

/// `[cluster]`: a fleet of bridges coordinated through PostgreSQL.
///
/// ```toml
/// [cluster]
/// url = "postgresql://bridge@db.example.org/bridge"
/// instance = "node-a"      # default: the host name; SSE_BRIDGE_CLUSTER__INSTANCE overrides
/// lease_ttl = "10s"
/// ```
///
/// With `[cluster]`, checkpoints, gaps and leases live in that database (its tables are
/// created by the bridge's migrations); the SQLite state database is not used for them.
/// Connect every instance, and its `postgres` sinks, as one role: the instances end the
/// transactions a frozen instance left open, which PostgreSQL allows within a role (another
/// role needs `pg_signal_backend` and `pg_read_all_stats`).
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The connection string, as for the `postgres` sink: `postgresql://USER[:PASSWORD]@HOST
    /// [:PORT]/DATABASE[?sslmode=…]`. A password here is a secret: prefer `url_env` or
    /// `url_file`, or leave it out and set `PGPASSWORD`. Exactly one of `url`, `url_env`,
    /// `url_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// An environment variable holding the connection string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_env: Option<String>,
    /// A file holding the connection string (one line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    /// PEM file of the certificate authorities that sign the server's certificate (TLS only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// This instance's name in the fleet: unique per running bridge. Default: the host name.
    /// `SSE_BRIDGE_CLUSTER__INSTANCE` overrides the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// How long a lease lasts without renewal. Leases are renewed every third of it; an
    /// instance that could not renew in time stops those feeds before the lease ends, and
    /// another instance takes them over once it has ended. Between 1s and 10m; default 10s.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

/// Shows everything but a password in `url`.
impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = self.url.as_ref().map(|u| match parse_connection(u) {
            Ok(c) => shown(&c),
            Err(_) => "<not a connection string>".to_string(),
        });
        f.debug_struct("ClusterConfig")
            .field("url", &url)
            .field("url_env", &self.url_env)
            .field("url_file", &self.url_file)
            .field("ca_file", &self.ca_file)
            .field("instance", &self.instance)
            .field("lease_ttl", &self.lease_ttl)
            .finish()
    }
}

impl ClusterConfig {
    /// Offline checks; keys are relative to `[cluster]`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut issues = source_issues(
            self.url.as_deref(),
            self.url_env.is_some(),
            self.url_file.is_some(),
            "the fleet's database, e.g. postgresql://bridge@db.example.org/bridge",
        );
        if let Some(name) = &self.instance {
            if let Some(problem) = instance_problem(name) {
                issues.push(("instance".to_string(), problem));
            }
        }
        if self.lease_ttl < MIN_LEASE_TTL || self.lease_ttl > MAX_LEASE_TTL {
            issues.push((
                "lease_ttl".to_string(),
                "must be between 1s and 10m (such as \"10s\"): leases are renewed every third \
                 of it"
                    .to_string(),
            ));
        }
        issues
    }

    /// The connection string, read from where the config says (as for the `postgres` sink).
    pub fn connection(&self) -> Result<tokio_postgres::Config, String> {
        let text = read_connection_string(
            self.url.as_deref(),
            self.url_env.as_deref(),
            self.url_file.as_deref(),
        )?;
        let mut config = parse_connection(&text)?;
        // A connection that cannot be made within a lease's renewal period is no use.
        config.connect_timeout(self.renew_every().max(Duration::from_secs(1)));
        config.application_name("sse-bridge cluster");
        // A partition is noticed by the renewal deadline, but a dead peer should also free
        // the socket: TCP keepalive on the connection.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(5));
        Ok(config)
    }

    /// The instance's name: `instance`, or the host name.
    pub fn instance_name(&self) -> Result<String, String> {
        match &self.instance {
            Some(name) => Ok(name.clone()),
            None => {
                let name = host_name()?;
                match instance_problem(&name) {
                    None => Ok(name),
                    Some(problem) => Err(format!(
                        "the host name cannot name this instance ({problem}); set `cluster.instance`"
                    )),
                }
            }
        }
    }

    /// How often leases and the heartbeat are renewed.
    pub fn renew_every(&self) -> Duration {
        self.lease_ttl / 3
    }
}

/// Why `name` cannot name an instance, if it cannot.
fn instance_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_INSTANCE_LEN {
        return Some(format!(
            "must be 1 to {MAX_INSTANCE_LEN} bytes (it is {})",
            name.len()
        ));
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Some("must not hold spaces or control characters".to_string());
    }
    None
}

/// The machine's host name.
fn host_name() -> Result<String, String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(format!(
            "cannot read the host name: {}",
            std::io::Error::last_os_error()
        ));
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec())
        .map_err(|_| "the host name is not UTF-8; set `cluster.instance`".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ClusterConfig {
        toml::from_str(text).expect("parses")
    }

    #[test]
    fn defaults_and_checks_name_the_key() {
        let c = parse("url = \"postgresql://bridge@localhost/bridge\"");
        assert_eq!(c.lease_ttl, Duration::from_secs(10));
        assert_eq!(c.renew_every(), Duration::from_secs(10) / 3);
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert!(!c.instance_name().expect("host name").is_empty());
        for (text, key, what) in [
            ("lease_ttl = \"5s\"", "url", "set one of"),
            (
                "url = \"postgresql://a@b/c\"\nurl_env = \"X\"",
                "url",
                "only one",
            ),
            (
                "url = \"postgresql://a@b/c\"\nlease_ttl = \"500ms\"",
                "lease_ttl",
                "between 1s and 10m",
            ),
            (
                "url = \"postgresql://a@b/c\"\nlease_ttl = \"1h\"",
                "lease_ttl",
                "between 1s and 10m",
            ),
            (
                "url = \"postgresql://a@b/c\"\ninstance = \"node a\"",
                "instance",
                "spaces",
            ),
            (
                "url = \"postgresql://a@b/c\"\ninstance = \"\"",
                "instance",
                "1 to 128",
            ),
            (
                "url = \"postgresql://a@b:x/c\"",
                "url",
                "not a PostgreSQL connection string",
            ),
        ] {
            let issues = parse(text).validate();
            assert!(
                issues.iter().any(|(k, m)| k == key && m.contains(what)),
                "{text}: {issues:?}"
            );
        }
        assert!(toml::from_str::<ClusterConfig>("url = \"x\"\nlease = \"1s\"").is_err());
    }

    #[test]
    fn the_password_is_never_shown() {
        let c = parse("url = \"postgresql://bridge:s3cret@db.example.org/fleet\"");
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("db.example.org"), "{debug}");
    }
}
