//! `[sink.NAME]` with `type = "postgres"`: the settings, their checks, and where the
//! connection string comes from (never printed).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sink::BufferConfig;

/// The most events one transaction holds.
pub const MAX_BATCH_EVENTS: usize = 100_000;

/// `type = "postgres"`: events as rows of a PostgreSQL table, exactly once.
///
/// ```toml
/// [sink.pg]
/// type = "postgres"
/// url = "postgresql://bridge@db.example.org/events?sslmode=require"
/// table = "sse_events"
/// ```
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    /// The connection string, `postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?sslmode=…]`
    /// (or the `key=value` form). A password here is a secret: prefer `url_env` or `url_file`,
    /// or leave it out and set `PGPASSWORD`. `sslmode=require` encrypts and verifies the
    /// server's certificate and host name (against the web roots, or `ca_file`);
    /// `prefer` (the default) uses TLS when the server offers it; `disable` never does.
    /// Exactly one of `url`, `url_env`, `url_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// An environment variable holding the connection string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_env: Option<String>,
    /// A file holding the connection string (one line; a trailing newline is ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    /// The table the events go to, created (with its indexes) if missing: a name of
    /// lowercase letters, digits and `_`, optionally after a schema (`events.sse`).
    #[serde(default = "default_table")]
    pub table: String,
    /// Also store each event's data as `jsonb` in `data_json` when it parses as JSON (NULL
    /// otherwise), for queries such as `data_json->>'title'`. Off by default: it stores the
    /// data a second time and parses every event on the bridge.
    #[serde(default)]
    pub data_json: bool,
    /// PEM file of the certificate authorities that sign the server's certificate, for a
    /// private CA (TLS only); the web roots otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// How long connecting may take before the attempt fails (and is retried).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Most events per transaction (one `COPY`). Default 8192.
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: usize,
    /// How long to wait for more events before committing a smaller batch. Default `0s`.
    #[serde(default, with = "humantime_serde")]
    pub batch_max_wait: Duration,
    /// The in-memory queue in front of the sink (`max_events`, `max_bytes`, `when_full`).
    #[serde(default)]
    pub buffer: BufferConfig,
}

/// Shows everything but a password in `url`.
impl std::fmt::Debug for PostgresSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = self
            .url
            .as_ref()
            .map(|u| match u.parse::<tokio_postgres::Config>() {
                Ok(c) => shown(&c),
                Err(_) => "<not a connection string>".to_string(),
            });
        f.debug_struct("PostgresSinkConfig")
            .field("url", &url)
            .field("url_env", &self.url_env)
            .field("url_file", &self.url_file)
            .field("table", &self.table)
            .field("data_json", &self.data_json)
            .field("ca_file", &self.ca_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("batch_max_events", &self.batch_max_events)
            .field("batch_max_wait", &self.batch_max_wait)
            .field("buffer", &self.buffer)
            .finish()
    }
}

fn default_table() -> String {
    "sse_events".to_string()
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_batch_max_events() -> usize {
    8192
}

/// PostgreSQL's reserved key words (those that cannot name a table unquoted); the sink never
/// quotes names, so it refuses them up front instead of failing at every write.
const RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "column",
    "constraint",
    "create",
    "current_catalog",
    "current_date",
    "current_role",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "from",
    "grant",
    "group",
    "having",
    "in",
    "initially",
    "intersect",
    "into",
    "lateral",
    "leading",
    "limit",
    "localtime",
    "localtimestamp",
    "not",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "placing",
    "primary",
    "references",
    "returning",
    "select",
    "session_user",
    "some",
    "symmetric",
    "system_user",
    "table",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "when",
    "where",
    "window",
    "with",
];

/// Whether `name` is a table name this sink accepts: `[a-z_][a-z0-9_]*`, at most 63 bytes,
/// optionally `schema.table` of two such names. Never quoted, never built from data.
pub fn table_problem(name: &str) -> Option<String> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    let parts: Vec<&str> = name.split('.').collect();
    if let Some(word) = parts.iter().find(|p| RESERVED.contains(p)) {
        return Some(format!(
            "{word:?} is a reserved word in PostgreSQL; choose another table name (such as \
             `{word}_events`)"
        ));
    }
    if parts.len() > 2 || !parts.iter().all(|p| part_ok(p)) {
        return Some(format!(
            "{name:?} is not a table name this sink uses: lowercase letters, digits and `_`, \
             starting with a letter or `_`, at most 63 bytes, optionally after `schema.`"
        ));
    }
    None
}

impl PostgresSinkConfig {
    /// Offline checks; keys are relative to `[sink.NAME]`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut issues = source_issues(
            self.url.as_deref(),
            self.url_env.is_some(),
            self.url_file.is_some(),
            "the connection string, e.g. postgresql://bridge@localhost/events",
        );
        if let Some(problem) = table_problem(&self.table) {
            issues.push(("table".to_string(), problem));
        }
        if self.batch_max_events == 0 || self.batch_max_events > MAX_BATCH_EVENTS {
            issues.push((
                "batch_max_events".to_string(),
                format!("must be between 1 and {MAX_BATCH_EVENTS}"),
            ));
        }
        if self.connect_timeout.is_zero() {
            issues.push((
                "connect_timeout".to_string(),
                "must be greater than zero".to_string(),
            ));
        }
        issues
    }

    /// The connection string, read from where the config says; `PGPASSWORD` fills in a
    /// password the string leaves out. Errors name the variable or file, never a value.
    pub fn connection(&self) -> Result<tokio_postgres::Config, String> {
        let text = read_connection_string(
            self.url.as_deref(),
            self.url_env.as_deref(),
            self.url_file.as_deref(),
        )?;
        let mut config = parse_connection(&text)?;
        config.connect_timeout(self.connect_timeout);
        config.application_name("sse-bridge");
        Ok(config)
    }
}

/// The checks of `url`/`url_env`/`url_file` (exactly one; a `url` that parses), for every
/// section that takes a connection string (`postgres` sinks, `[cluster]`); `what` says what
/// the string is for.
pub fn source_issues(
    url: Option<&str>,
    url_env: bool,
    url_file: bool,
    what: &str,
) -> Vec<(String, String)> {
    let mut issues = Vec::new();
    match [url.is_some(), url_env, url_file]
        .iter()
        .filter(|s| **s)
        .count()
    {
        0 => issues.push((
            "url".to_string(),
            format!("set one of `url`, `url_env` or `url_file` ({what})"),
        )),
        1 => {}
        _ => issues.push((
            "url".to_string(),
            "set only one of `url`, `url_env` and `url_file`".to_string(),
        )),
    }
    if let Some(url) = url {
        if let Err(e) = url.parse::<tokio_postgres::Config>() {
            issues.push((
                "url".to_string(),
                format!("not a PostgreSQL connection string: {e}"),
            ));
        }
    }
    issues
}

/// The connection string from `url`, the environment variable `url_env` or the file
/// `url_file` (one line). Errors name the variable or file, never a value.
pub fn read_connection_string(
    url: Option<&str>,
    url_env: Option<&str>,
    url_file: Option<&std::path::Path>,
) -> Result<String, String> {
    match (url, url_env, url_file) {
        (Some(url), _, _) => Ok(url.to_string()),
        (_, Some(var), _) => match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
            Ok(_) => Err(format!("environment variable `{var}` is empty")),
            Err(_) => Err(format!("environment variable `{var}` is not set")),
        },
        (_, _, Some(path)) => match std::fs::read_to_string(path) {
            Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
            Ok(_) => Err(format!("{} is empty", path.display())),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        },
        _ => Err("no connection string (url, url_env or url_file)".to_string()),
    }
}

/// Parses a connection string (URL or `key=value`); `PGPASSWORD` and `PGUSER` fill in what it
/// leaves out. The error never holds the string (it may hold a password).
pub fn parse_connection(text: &str) -> Result<tokio_postgres::Config, String> {
    let mut config: tokio_postgres::Config = text
        .parse()
        .map_err(|e| format!("not a PostgreSQL connection string: {e}"))?;
    if config.get_password().is_none() {
        if let Ok(password) = std::env::var("PGPASSWORD") {
            config.password(password);
        }
    }
    if config.get_user().is_none() {
        if let Ok(user) = std::env::var("PGUSER") {
            config.user(user);
        }
    }
    Ok(config)
}

/// What log lines and errors say about a connection: user, hosts, ports and database, never
/// the password.
pub fn shown(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgresql://{}@{}:{port}/{}",
        config.get_user().unwrap_or("-"),
        if hosts.is_empty() {
            "localhost".to_string()
        } else {
            hosts.join(",")
        },
        config.get_dbname().unwrap_or("-"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> PostgresSinkConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_and_checks_name_the_key() {
        let c = parse("url = \"postgresql://bridge@localhost/events\"");
        assert_eq!(c.table, "sse_events");
        assert!(!c.data_json);
        assert_eq!(c.batch_max_events, 8192);
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        for (text, key, what) in [
            ("table = \"x\"", "url", "set one of"),
            (
                "url = \"postgresql://a@b/c\"\nurl_env = \"X\"",
                "url",
                "only one",
            ),
            (
                "url = \"postgresql://a@b/c\"\ntable = \"Events\"",
                "table",
                "lowercase",
            ),
            (
                "url = \"postgresql://a@b/c\"\ntable = \"a.b.c\"",
                "table",
                "schema",
            ),
            (
                "url = \"postgresql://a@b/c\"\ntable = \"x; drop table y\"",
                "table",
                "not a table name",
            ),
            (
                "url = \"postgresql://a@b/c\"\nbatch_max_events = 0",
                "batch_max_events",
                "between",
            ),
            (
                "url = \"postgresql://a@b:notaport/c\"",
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
        assert!(toml::from_str::<PostgresSinkConfig>("url = \"x\"\ntabel = \"y\"").is_err());
        assert!(table_problem("events.sse_2026").is_none());
        assert!(table_problem("user").unwrap().contains("reserved word"));
        assert!(table_problem("order.events")
            .unwrap()
            .contains("reserved word"));
    }

    #[test]
    fn the_password_is_never_shown() {
        let c = parse("url = \"postgresql://bridge:s3cret-pass@db.example.org:6543/events\"");
        let conn = c.connection().unwrap();
        let text = shown(&conn);
        assert_eq!(text, "postgresql://bridge@db.example.org:6543/events");
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        let from_env = PostgresSinkConfig {
            url: None,
            url_env: Some("SSE_BRIDGE_TEST_PG_URL_UNSET".into()),
            ..c.clone()
        };
        let err = from_env.connection().unwrap_err();
        assert!(err.contains("SSE_BRIDGE_TEST_PG_URL_UNSET"), "{err}");
    }
}
