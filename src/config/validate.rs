//! Offline validation: everything about a configuration that can be checked without
//! connecting anywhere. Each problem names the key as the file spells it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};

use super::{Config, ConfigIssue, FeedConfig};
use crate::sink::SinkConfig;

/// Headers the bridge sets itself (ARCHITECTURE.md §3); a feed may not override them.
const RESERVED_HEADERS: &[&str] = &["accept", "cache-control", "last-event-id"];

/// Largest `max_event_size` accepted: beyond this a single event could exhaust memory.
const MAX_EVENT_SIZE_LIMIT: u64 = 1024 * 1024 * 1024;

/// Feed and sink names: used in file names, metric labels and logs.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

struct Issues(Vec<ConfigIssue>);

impl Issues {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigIssue {
            key: key.into(),
            message: message.into(),
        });
    }
}

/// `config_file`: the file the configuration was read from, if any; no sink may write to it.
pub(super) fn validate(cfg: &Config, config_file: Option<&Path>) -> Vec<ConfigIssue> {
    let mut issues = Issues(Vec::new());

    if cfg.state.path.as_os_str().is_empty() {
        issues.add("state.path", "must not be empty");
    }
    positive(
        &mut issues,
        "state.commit_interval",
        cfg.state.commit_interval,
    );
    if cfg.state.commit_interval > Duration::from_secs(3600) {
        issues.add(
            "state.commit_interval",
            "must be at most 1h: after a crash, everything since the last commit is fetched again",
        );
    }
    positive(&mut issues, "shutdown.timeout", cfg.shutdown.timeout);
    if let Err(e) = crate::logging::parse_filter(&cfg.log.level) {
        issues.add("log.level", format!("not a valid log filter: {e}"));
    }

    if cfg.enabled_feeds().next().is_none() {
        issues.add(
            "feed",
            "no enabled [[feed]]: add at least one feed with `name` and `url`",
        );
    }
    let mut names = HashSet::new();
    for (i, feed) in cfg.feed.iter().enumerate() {
        validate_feed(&mut issues, i, feed);
        if !names.insert(feed.name.as_str()) {
            issues.add(
                format!("feed[{i}].name"),
                format!(
                    "feed name `{}` is used twice; names must be unique",
                    feed.name
                ),
            );
        }
    }

    if cfg.sink.is_empty() {
        issues.add(
            "sink",
            "no [sink.NAME] configured: events would have nowhere to go",
        );
    }
    for (name, sink) in &cfg.sink {
        if !is_valid_name(name) {
            issues.add(
                format!("sink.{name}"),
                "sink names are 1 to 100 characters of A-Z a-z 0-9 . _ - and do not start with `.`",
            );
        }
        if sink.buffer().max_events == 0 {
            issues.add(
                format!("sink.{name}.buffer.max_events"),
                "must be at least 1",
            );
        }
        let max_bytes = sink.buffer().max_bytes.0;
        if !(1024..=crate::sink::MAX_BUFFER_BYTES).contains(&max_bytes) {
            issues.add(
                format!("sink.{name}.buffer.max_bytes"),
                "must be between 1 KiB and 4 GiB (such as \"64 MiB\")",
            );
        }
        for (key, message) in sink.validate() {
            issues.add(format!("sink.{name}.{key}"), message);
        }
    }
    validate_owned_files(&mut issues, cfg, config_file);

    let sink_names: Vec<&str> = cfg.sink.keys().map(String::as_str).collect();
    let feed_names: Vec<&str> = cfg.feed.iter().map(|f| f.name.as_str()).collect();
    for (key, message) in
        crate::route::validate_routes(&cfg.route, &cfg.routing, &sink_names, &feed_names)
    {
        issues.add(key, message);
    }
    if let Some(admin) = &cfg.admin {
        for (key, message) in admin.validate() {
            issues.add(format!("admin.{key}"), message);
        }
    }
    if let Some(cluster) = &cfg.cluster {
        for (key, message) in cluster.validate() {
            issues.add(format!("cluster.{key}"), message);
        }
        validate_fleet_sinks(&mut issues, cfg, cluster);
    }
    if let Some(serve) = &cfg.serve {
        let sqlite_sinks: Vec<&str> = cfg
            .sink
            .iter()
            .filter(|(_, s)| matches!(s, SinkConfig::Sqlite(_) | SinkConfig::Postgres(_)))
            .map(|(n, _)| n.as_str())
            .collect();
        for (key, message) in serve.validate(Some(&sqlite_sinks)) {
            issues.add(format!("serve.{key}"), message);
        }
        if let Some(admin) = &cfg.admin {
            if admin.listen.parse::<std::net::SocketAddr>().ok() == Some(serve.listen) {
                issues.add(
                    "serve.listen".to_string(),
                    format!(
                        "{} is also `admin.listen`; give serve and the admin endpoint a port each",
                        serve.listen
                    ),
                );
            }
        }
    }
    issues.0
}

/// In a fleet, a `postgres` sink checks each feed's lease in its own transaction, so its table
/// must be in the fleet's database (ARCHITECTURE.md §9). Compared where both connection
/// strings are in the file; one read from the environment or a file is checked at start.
fn validate_fleet_sinks(
    issues: &mut Issues,
    cfg: &Config,
    cluster: &crate::cluster::ClusterConfig,
) {
    let Some(Ok(fleet)) = cluster
        .url
        .as_deref()
        .map(crate::sink::postgres::config::parse_connection)
    else {
        return;
    };
    for (name, sink) in &cfg.sink {
        let SinkConfig::Postgres(pg) = sink else {
            continue;
        };
        let Some(Ok(sink_db)) = pg
            .url
            .as_deref()
            .map(crate::sink::postgres::config::parse_connection)
        else {
            continue;
        };
        if !crate::cluster::same_database(&fleet, &sink_db) {
            issues.add(
                format!("sink.{name}.url"),
                format!(
                    "in a fleet, a postgres sink must write to the fleet's database ({}), not {}:                      each batch checks the feed's lease in the same transaction, so that an                      instance that lost a lease cannot insert a row",
                    crate::sink::postgres::config::shown(&fleet),
                    crate::sink::postgres::config::shown(&sink_db),
                ),
            );
        }
    }
}

/// A file sink may only ever write its own files: no path it can render (for any feed,
/// event type or time, rotated or compressed) may be the state database, its journal files,
/// or the configuration file.
fn validate_owned_files(issues: &mut Issues, cfg: &Config, config_file: Option<&Path>) {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let mut protected: Vec<(PathBuf, &str)> = Vec::new();
    if !cfg.state.path.as_os_str().is_empty() {
        protected.push((cfg.state.path.clone(), "the state database"));
        for suffix in ["-wal", "-shm", "-journal"] {
            let mut p = cfg.state.path.clone().into_os_string();
            p.push(suffix);
            protected.push((PathBuf::from(p), "a journal file of the state database"));
        }
    }
    if let Some(file) = config_file {
        protected.push((file.to_path_buf(), "the configuration file"));
    }
    for (name, sink) in &cfg.sink {
        let SinkConfig::File(file_sink) = sink else {
            continue;
        };
        for (target, what) in &protected {
            if file_sink.can_write_to(target, &cwd) {
                issues.add(
                    format!("sink.{name}.path"),
                    format!(
                        "`{}` can name {} ({}): a file sink must never write, rotate or cut \
                         it; put the sink's files in a directory of their own, such as \
                         `data/events/{{feed}}/{{type}}.jsonl`",
                        file_sink.path,
                        target.display(),
                        what
                    ),
                );
            }
        }
    }
}

fn positive(issues: &mut Issues, key: &str, d: Duration) {
    if d.is_zero() {
        issues.add(key, "must be greater than zero");
    }
}

fn validate_feed(issues: &mut Issues, i: usize, feed: &FeedConfig) {
    let key = |k: &str| format!("feed[{i}].{k}");
    if !is_valid_name(&feed.name) {
        issues.add(
            key("name"),
            format!(
                "`{}` is not a valid feed name: use 1 to 100 characters of A-Z a-z 0-9 . _ - not starting with `.`",
                feed.name
            ),
        );
    }
    match url::Url::parse(&feed.url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
        Ok(u) => issues.add(
            key("url"),
            format!(
                "`{}` must be an http:// or https:// URL with a host",
                u.scheme()
            ),
        ),
        Err(e) => issues.add(key("url"), format!("not a valid URL: {e}")),
    }
    for (name, value) in &feed.headers {
        let hkey = key(&format!("headers.\"{name}\""));
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            issues.add(&hkey, "not a valid HTTP header name");
        } else if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            issues.add(
                &hkey,
                "is set by the bridge itself (Accept, Cache-Control and Last-Event-ID follow the EventSource standard)",
            );
        } else if name.eq_ignore_ascii_case("authorization")
            && (feed.bearer_token_env.is_some()
                || feed.bearer_token_file.is_some()
                || feed.token_command.is_some())
        {
            issues.add(
                &hkey,
                "conflicts with bearer_token_env / bearer_token_file / token_command",
            );
        }
        if HeaderValue::from_str(value).is_err() {
            issues.add(&hkey, "not a valid HTTP header value (control characters?)");
        }
    }
    if let Err(e) = crate::sse::connection::check_method(&feed.method) {
        issues.add(key("method"), e);
    }
    for name in feed.headers.keys() {
        if name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            issues.add(
                key(&format!("headers.\"{name}\"")),
                "is set by the bridge itself from `body` / `body_file`",
            );
        }
    }
    match (&feed.body, &feed.body_file) {
        (Some(_), Some(_)) => issues.add(key("body"), "set either body or body_file, not both"),
        (None, Some(path)) => {
            if let Err(e) = std::fs::metadata(path) {
                issues.add(
                    key("body_file"),
                    format!("cannot read {}: {e}", path.display()),
                );
            }
        }
        _ => {}
    }
    if let Some(argv) = &feed.token_command {
        if feed.bearer_token_env.is_some() || feed.bearer_token_file.is_some() {
            issues.add(
                key("token_command"),
                "set only one of bearer_token_env, bearer_token_file and token_command",
            );
        }
        match argv.first() {
            None => issues.add(key("token_command"), "names no program"),
            Some(program) if std::path::Path::new(program).is_absolute() => {
                if let Err(e) = std::fs::metadata(program) {
                    issues.add(key("token_command"), format!("cannot use {program}: {e}"));
                }
            }
            Some(program) if program.is_empty() => {
                issues.add(key("token_command"), "names no program")
            }
            Some(_) => {}
        }
    }
    if let Some(start) = &feed.start {
        if let Err(e) = crate::sse::options::Since::parse(&start.since) {
            issues.add(key("start.since"), e);
        }
    }
    for (k, name) in [
        ("since_query", Some(&feed.since_query)),
        ("last_event_id_query", feed.last_event_id_query.as_ref()),
    ] {
        if name.is_some_and(|n| n.trim().is_empty()) {
            issues.add(key(k), "must be a query parameter name, not empty");
        }
    }
    for (j, name) in feed.secret_headers.iter().enumerate() {
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            issues.add(
                key(&format!("secret_headers[{j}]")),
                format!("`{name}` is not a valid HTTP header name"),
            );
        }
    }
    match (&feed.bearer_token_env, &feed.bearer_token_file) {
        (Some(_), Some(_)) => issues.add(
            key("bearer_token_env"),
            "set either bearer_token_env or bearer_token_file, not both",
        ),
        (Some(var), None) => match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => {}
            Ok(_) => issues.add(
                key("bearer_token_env"),
                format!("environment variable `{var}` is empty"),
            ),
            Err(_) => issues.add(
                key("bearer_token_env"),
                format!("environment variable `{var}` is not set (or not UTF-8)"),
            ),
        },
        (None, Some(path)) => {
            if let Err(e) = std::fs::read_to_string(path) {
                issues.add(
                    key("bearer_token_file"),
                    format!("cannot read {}: {e}", path.display()),
                );
            }
        }
        (None, None) => {}
    }
    if let Some(path) = &feed.ca_file {
        if let Err(e) = crate::sse::transport::tls::tls_config_with_ca_file(path) {
            issues.add(key("ca_file"), e.to_string());
        }
    }
    positive(issues, &key("connect_timeout"), feed.connect_timeout);
    positive(issues, &key("response_timeout"), feed.response_timeout);
    positive(issues, &key("client_error_delay"), feed.client_error_delay);
    if feed.max_event_size.0 < 64 || feed.max_event_size.0 > MAX_EVENT_SIZE_LIMIT {
        issues.add(key("max_event_size"), "must be between 64 bytes and 1 GiB");
    }
    if feed.max_id_size.0 == 0 || feed.max_id_size.0 > feed.max_event_size.0 {
        issues.add(
            key("max_id_size"),
            "must be at least 1 byte and at most max_event_size",
        );
    }
    for (j, status) in feed.rejected_id_statuses.iter().enumerate() {
        if !(400..=499).contains(status) || *status == 429 || *status == 408 {
            issues.add(
                key(&format!("rejected_id_statuses[{j}]")),
                format!("{status} is not a 4xx client error other than 408 and 429"),
            );
        }
    }
    let b = &feed.backoff;
    positive(issues, &key("backoff.initial"), b.initial);
    if b.max < b.initial {
        issues.add(
            key("backoff.max"),
            "must not be smaller than backoff.initial",
        );
    }
    if !(b.multiplier.is_finite() && b.multiplier >= 1.0) {
        issues.add(
            key("backoff.multiplier"),
            "must be a number of at least 1.0",
        );
    }
    if !(0.0..=1.0).contains(&b.jitter) {
        issues.add(key("backoff.jitter"), "must be between 0.0 and 1.0");
    }
}
