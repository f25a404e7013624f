//! The configuration: a TOML file (or the built-in default) plus `SSE_BRIDGE_…` environment
//! overrides, loaded with figment, then validated offline. Every error names the file (or the
//! environment variable) and the key.

pub mod feed;
pub mod units;
mod validate;

#[cfg(test)]
mod proptests;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub use feed::{BackoffConfig, FeedConfig, HttpVersion, OnClientError, Policy, StartConfig};

use crate::route::{RouteConfig, RoutingConfig};
use crate::sink::SinkConfig;

/// The built-in configuration used when no `-c FILE` is given: Wikimedia's `recentchange`
/// stream into JSON Lines files under `data/`, state in `data/state.db`.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/sse-bridge.toml");

/// Name used in errors for the built-in configuration.
pub const DEFAULT_CONFIG_NAME: &str = "<built-in default config (config/sse-bridge.toml)>";

/// Prefix of environment variables that override config keys; nested keys are joined by `__`,
/// e.g. `SSE_BRIDGE_STATE__PATH=/var/lib/sse-bridge/state.db`.
pub const ENV_PREFIX: &str = "SSE_BRIDGE_";

/// Top-level sections that environment variables may override. Other `SSE_BRIDGE_*` variables
/// (such as a token named in `bearer_token_env`) are left alone.
const ENV_SECTIONS: &[&str] = &[
    "state", "log", "shutdown", "routing", "admin", "serve", "cluster",
];

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[state]`: where checkpoints and gaps are kept.
    #[serde(default)]
    pub state: StateConfig,
    /// `[log]`: logging defaults (the command line and `RUST_LOG` take precedence).
    #[serde(default)]
    pub log: LogConfig,
    /// `[shutdown]`: how SIGTERM/SIGINT drain the bridge.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// `[[feed]]`: the SSE feeds, one subscription each.
    #[serde(default)]
    pub feed: Vec<FeedConfig>,
    /// `[sink.NAME]`: where events are stored.
    #[serde(default)]
    pub sink: BTreeMap<String, SinkConfig>,
    /// `[[route]]`: which events go to which sinks; the first matching route decides.
    #[serde(default)]
    pub route: Vec<RouteConfig>,
    /// `[routing]`: the default route for events no `[[route]]` matches.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// `[admin]`: the admin HTTP endpoint (metrics, health, status, tap); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<crate::admin::AdminConfig>,
    /// `[serve]`: serve a `sqlite` sink's stored events over SSE to browsers and services
    /// (CORS, tokens, TLS); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve: Option<crate::serve::ServeConfig>,
    /// `[cluster]`: run as one instance of a fleet that shares this configuration through a
    /// PostgreSQL database; each feed is read by exactly one instance. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// `[state]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// SQLite database holding each feed's checkpoint (the Last-Event-ID sent after a
    /// restart) and the recorded gaps. Created with its directory if missing. Relative paths
    /// are relative to the working directory.
    #[serde(default = "default_state_path")]
    pub path: PathBuf,
    /// How often acknowledged checkpoints are committed. After a crash (kill -9) a feed
    /// resumes from the last commit, so at most this much of the stream is stored twice.
    /// Checkpoints are also committed at shutdown.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            path: default_state_path(),
            commit_interval: default_commit_interval(),
        }
    }
}

fn default_state_path() -> PathBuf {
    PathBuf::from("data/state.db")
}

fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `info,sse_bridge=debug`. `RUST_LOG` and
    /// `--log-level` override it.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `human` (default) or `json` (one JSON object per line). `--log-format` overrides it.
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: LogFormat::Human,
        }
    }
}

fn default_log_level() -> String {
    "info".to_string()
}

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// `[shutdown]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// On SIGTERM or SIGINT the bridge stops reading, lets the sinks store what they hold,
    /// commits the checkpoints and exits 0. If that takes longer than this, it commits what
    /// was acknowledged and exits anyway; nothing is lost, the rest is fetched again on start.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            timeout: default_shutdown_timeout(),
        }
    }
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}

/// A configuration together with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: Config,
    /// The file it was read from, or [`DEFAULT_CONFIG_NAME`].
    pub source: String,
    /// The file, for reloading; `None` for the built-in default.
    pub path: Option<PathBuf>,
}

/// One problem with the configuration, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The key as written in the file, e.g. `feed[0].url` (or the environment variable).
    pub key: String,
    pub message: String,
}

/// Everything wrong with a configuration, naming where it came from.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub source: String,
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let [only] = self.issues.as_slice() {
            return write!(f, "{}: key `{}`: {}", self.source, only.key, only.message);
        }
        write!(f, "{}: {} problems:", self.source, self.issues.len())?;
        for issue in &self.issues {
            write!(f, "\n  key `{}`: {}", issue.key, issue.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn one(source: &str, key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            source: source.to_string(),
            issues: vec![ConfigIssue {
                key: key.into(),
                message: message.into(),
            }],
        }
    }
}

impl LoadedConfig {
    /// Loads `path` (or the built-in default when `None`), applies environment overrides and
    /// validates the result.
    pub fn load(path: Option<&Path>) -> Result<LoadedConfig, ConfigError> {
        let loaded = Self::parse(path)?;
        let issues = loaded.config.validate_from(loaded.path.as_deref());
        if issues.is_empty() {
            Ok(loaded)
        } else {
            Err(ConfigError {
                source: loaded.source,
                issues,
            })
        }
    }

    /// Loads the same source again (for a reload).
    pub fn reload(&self) -> Result<LoadedConfig, ConfigError> {
        Self::load(self.path.as_deref())
    }

    /// Loads without the semantic validation: syntax, types and unknown keys only.
    pub fn parse(path: Option<&Path>) -> Result<LoadedConfig, ConfigError> {
        let (figment, source) = match path {
            Some(p) => {
                let source = p.display().to_string();
                match std::fs::metadata(p) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => {
                        return Err(ConfigError::one(&source, "-", "not a regular file"));
                    }
                    Err(e) => {
                        return Err(ConfigError::one(&source, "-", format!("cannot read: {e}")));
                    }
                }
                (Figment::from(Toml::file(p)), source)
            }
            None => (
                Figment::from(Toml::string(DEFAULT_CONFIG)),
                DEFAULT_CONFIG_NAME.to_string(),
            ),
        };
        let env = Env::prefixed(ENV_PREFIX)
            .filter(|key| {
                let key = key.as_str().to_ascii_lowercase();
                ENV_SECTIONS.iter().any(|s| {
                    key.strip_prefix(s)
                        .is_some_and(|rest| rest.starts_with("__"))
                })
            })
            .split("__");
        let figment = figment.merge(env);
        match figment.extract::<Config>() {
            Ok(config) => Ok(LoadedConfig {
                config,
                source,
                path: path.map(Path::to_path_buf),
            }),
            Err(err) => Err(ConfigError {
                source: source.clone(),
                issues: err.into_iter().map(figment_issue).collect(),
            }),
        }
    }
}

/// Turns one figment error into an issue whose key reads like the file (`feed[0].url`) and
/// whose message names an environment variable when the value came from one.
fn figment_issue(e: figment::Error) -> ConfigIssue {
    use figment::error::Kind;
    let mut path: Vec<String> = e.path.clone();
    let message = match &e.kind {
        Kind::UnknownField(field, expected) => {
            // figment's path already ends with the unknown field in most cases.
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            let expected: Vec<String> = expected.iter().map(|s| format!("`{s}`")).collect();
            format!(
                "unknown key `{field}`; expected one of {}",
                expected.join(", ")
            )
        }
        Kind::MissingField(field) => {
            if path.last().map(String::as_str) != Some(field.as_ref()) {
                path.push(field.to_string());
            }
            format!("missing required key `{field}`")
        }
        Kind::UnknownVariant(v, expected) => {
            let expected: Vec<String> = expected.iter().map(|s| format!("`{s}`")).collect();
            format!(
                "unknown value `{v}`; expected one of {}",
                expected.join(", ")
            )
        }
        Kind::InvalidType(_, expected) if expected.contains("duration") => {
            format!(
                "{}; write durations as strings such as \"500ms\", \"30s\" or \"5m\"",
                e.kind
            )
        }
        other => other.to_string(),
    };
    let key = display_key(&path);
    let message = match &e.metadata {
        Some(meta) if meta.name.contains("environment") => format!(
            "{message} (set by environment variable {ENV_PREFIX}{})",
            e.path.join("__").to_ascii_uppercase()
        ),
        _ => message,
    };
    ConfigIssue { key, message }
}

/// `["feed", "0", "url"]` -> `feed[0].url`.
pub fn display_key(path: &[String]) -> String {
    let mut out = String::new();
    for part in path {
        if part.chars().all(|c| c.is_ascii_digit()) && !part.is_empty() && !out.is_empty() {
            out.push('[');
            out.push_str(part);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    if out.is_empty() {
        out.push_str("(top level)");
    }
    out
}

impl Config {
    /// Parses a TOML string (for tests and tools); no environment overrides, no validation.
    pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
        Figment::from(Toml::string(s))
            .extract::<Config>()
            .map_err(|err| ConfigError {
                source: "<string>".into(),
                issues: err.into_iter().map(figment_issue).collect(),
            })
    }

    /// Everything that can be checked offline.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        validate::validate(self, None)
    }

    /// Everything that can be checked offline, for a configuration read from `file`: no sink
    /// may write to that file either.
    pub fn validate_from(&self, file: Option<&Path>) -> Vec<ConfigIssue> {
        validate::validate(self, file)
    }

    /// The feeds that run.
    pub fn enabled_feeds(&self) -> impl Iterator<Item = &FeedConfig> {
        self.feed.iter().filter(|f| f.enabled)
    }
}
