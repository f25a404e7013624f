//! The keys of a Kafka sink (their doc comments are the user reference), the secrets in
//! `options`, and the offline checks.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::producer::Settings;
use crate::sink::naming::topic::TopicTemplate;
use crate::sink::BufferConfig;

/// Options that have their own key in `[sink.NAME]`, or that the sink cannot honour.
const RESERVED_OPTIONS: &[(&str, &str)] = &[
    ("bootstrap.servers", "set `brokers` instead"),
    ("metadata.broker.list", "set `brokers` instead"),
    ("compression.type", "set `compression` instead"),
    ("compression.codec", "set `compression` instead"),
    ("enable.idempotence", "set `idempotence` instead"),
    ("acks", "set `acks` instead"),
    ("request.required.acks", "set `acks` instead"),
    ("message.timeout.ms", "set `delivery_timeout` instead"),
    ("delivery.timeout.ms", "set `delivery_timeout` instead"),
    (
        "transactional.id",
        "transactions are not used: records are confirmed one batch at a time",
    ),
];

/// `[sink.NAME]` with `type = "kafka"`: produces every event as one Kafka record.
///
/// ```toml
/// [sink.kafka]
/// type = "kafka"
/// brokers = "kafka1:9092,kafka2:9092"
/// topic = "sse.{feed}.{type}"
/// key = "id"
/// compression = "zstd"
///
/// [sink.kafka.options]
/// "security.protocol" = "SASL_SSL"
/// "sasl.mechanism" = "SCRAM-SHA-512"
/// "sasl.username" = "bridge"
/// "sasl.password" = { env = "KAFKA_PASSWORD" }
/// ```
///
/// A record's value is the event's `data`, byte for byte (UTF-8). Its headers are `sse-feed`,
/// `sse-type`, `sse-id` (the last event ID, possibly empty), `sse-seq` (the bridge's per-feed
/// sequence number, in decimal) and `received-at` (RFC 3339, UTC, microseconds, `Z`); its
/// timestamp is `received-at` in milliseconds.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// The bootstrap brokers, `host:port` separated by commas (librdkafka's
    /// `bootstrap.servers`).
    pub brokers: String,
    /// The topic: a fixed name, or a template in which `{feed}` is replaced by the feed name
    /// and `{type}` by the event type, e.g. `sse.{feed}.{type}`. A topic name is 1 to 249
    /// characters of `A-Z a-z 0-9 . _ -` and not `.` or `..`; the fixed parts are checked when
    /// the configuration is loaded. With `{type}`, event types that would make an invalid name
    /// (other characters, or longer than 249 characters with a feed name of 100) are never
    /// sent: such events go to the default route (`[routing] default`) and are counted as
    /// misfits. Topics are not created by the bridge: create them first (or let the broker
    /// create them automatically, if it does).
    pub topic: String,
    /// The record key: `feed` (default: the feed name, so each feed's events stay in one
    /// partition, in order), `id` (the event's last event ID; no key when it is empty),
    /// `none` (no key: librdkafka spreads records over partitions), or a JSON pointer into
    /// `data` such as `/meta/id` (a string value is used as is, any other value as its JSON
    /// text; when `data` is not JSON or has no such value, the record has no key and the
    /// event is counted in the `keys_missing` figure logged at shutdown).
    #[serde(default)]
    pub key: KeySource,
    /// `none`, `gzip`, `lz4` (default) or `zstd`.
    #[serde(default)]
    pub compression: Compression,
    /// The idempotent producer (default `true`): librdkafka's own retries never duplicate or
    /// reorder records. Requires `acks = "all"`.
    #[serde(default = "default_true")]
    pub idempotence: bool,
    /// `all` (default): a record is confirmed once every in-sync replica has it. `leader`:
    /// once the partition leader has it (a leader failure can then lose confirmed records;
    /// only with `idempotence = false`).
    #[serde(default)]
    pub acks: Acks,
    /// How long librdkafka tries to deliver a record (its `message.timeout.ms`). When it
    /// expires the record is not lost: the batch fails and is retried, holding the feeds back.
    /// Default `30s`.
    #[serde(default = "default_delivery_timeout", with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// What a permanent delivery error (the topic does not exist, authorization failed, a
    /// record too large for the broker) does. `block` (default): the batch is retried with
    /// backoff, the feeds routed here are held back and the error is logged, until the cause
    /// is fixed. `skip`: the records are dropped, counted (`skipped`, logged at shutdown) and
    /// treated as stored, so the checkpoint moves past them. Transient errors (broker down,
    /// timeouts) always hold the feeds back.
    #[serde(default)]
    pub on_error: OnError,
    /// Extra librdkafka settings, passed as is: TLS, SASL, batching, `client.id`, ...
    /// (<https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md>). A value is
    /// a string, number or boolean, or `{ env = "VAR" }` (read from the environment variable
    /// at start) or `{ file = "/run/secrets/x" }` (the file's content, without its trailing
    /// line break). Values of keys containing `password`, `secret`, `key`, `token` or
    /// `credential`, and values read from the environment or a file, never appear in logs or
    /// error messages. Keys that have their own setting here (`bootstrap.servers`, `acks`,
    /// `compression.type`, `enable.idempotence`, `message.timeout.ms`) are refused, and so is
    /// `transactional.id`.
    #[serde(default)]
    pub options: BTreeMap<String, OptionValue>,
    /// The in-memory queue in front of the sink (`max_events`, `when_full`).
    #[serde(default)]
    pub buffer: BufferConfig,
}

fn default_true() -> bool {
    true
}

fn default_delivery_timeout() -> Duration {
    Duration::from_secs(30)
}

/// See [`KafkaSinkConfig::key`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum KeySource {
    #[default]
    Feed,
    Id,
    None,
    /// A JSON pointer (RFC 6901) into `data`.
    Pointer(String),
}

impl Serialize for KeySource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            KeySource::Feed => "feed",
            KeySource::Id => "id",
            KeySource::None => "none",
            KeySource::Pointer(p) => p,
        })
    }
}

impl<'de> Deserialize<'de> for KeySource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "feed" => Ok(KeySource::Feed),
            "id" => Ok(KeySource::Id),
            "none" => Ok(KeySource::None),
            p if p.starts_with('/') => match pointer_problem(p) {
                None => Ok(KeySource::Pointer(s)),
                Some(problem) => Err(de::Error::custom(format!(
                    "`{p}` is not a valid JSON pointer: {problem}"
                ))),
            },
            other => Err(de::Error::custom(format!(
                "unknown key source `{other}`: expected `feed`, `id`, `none`, or a JSON pointer \
                 into the data such as `/meta/id`"
            ))),
        }
    }
}

/// What is wrong with a JSON pointer, if anything: `~` must be followed by `0` or `1`.
fn pointer_problem(p: &str) -> Option<&'static str> {
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Some("`~` must be followed by `0` (for `~`) or `1` (for `/`)");
        }
    }
    None
}

/// See [`KafkaSinkConfig::compression`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    #[default]
    Lz4,
    Zstd,
}

impl Compression {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// See [`KafkaSinkConfig::acks`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Acks {
    #[default]
    All,
    Leader,
}

/// See [`KafkaSinkConfig::on_error`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Block,
    Skip,
}

/// One value of `options`: plain text, or a secret read at start. `Debug` never shows a
/// plain value (it may be a password written in the file).
#[derive(Clone, PartialEq, Eq)]
pub enum OptionValue {
    /// Passed as is (numbers and booleans as written in TOML).
    Plain(String),
    /// The content of this environment variable.
    Env(String),
    /// The content of this file, without its trailing line break.
    File(PathBuf),
}

impl fmt::Debug for OptionValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionValue::Plain(_) => f.write_str("Plain(***)"),
            OptionValue::Env(var) => f.debug_tuple("Env").field(var).finish(),
            OptionValue::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

impl Serialize for OptionValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            OptionValue::Plain(v) => s.serialize_str(v),
            OptionValue::Env(var) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("env", var)?;
                m.end()
            }
            OptionValue::File(path) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("file", path)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for OptionValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OptionValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a string, number or boolean, or a table { env = \"VAR\" } or \
                     { file = \"/path\" }",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OptionValue, E> {
                Ok(OptionValue::Plain(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<OptionValue, E> {
                Ok(OptionValue::Plain(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<OptionValue, E> {
                Ok(OptionValue::Plain(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<OptionValue, E> {
                Ok(OptionValue::Plain(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<OptionValue, E> {
                Ok(OptionValue::Plain(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<OptionValue, E> {
                Ok(OptionValue::Plain(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OptionValue, A::Error> {
                let Some(k) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        "an empty table: expected { env = \"VAR\" } or { file = \"/path\" }",
                    ));
                };
                let value = match k.as_str() {
                    "env" => OptionValue::Env(map.next_value()?),
                    "file" => OptionValue::File(map.next_value()?),
                    other => {
                        return Err(de::Error::custom(format!(
                            "unknown key `{other}`: expected {{ env = \"VAR\" }} or \
                             {{ file = \"/path\" }}"
                        )))
                    }
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "unexpected key `{extra}`: give either `env` or `file`, alone"
                    )));
                }
                Ok(value)
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether the value of option `key` must never be shown.
fn is_sensitive_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "key", "token", "credential", "jaas"]
        .iter()
        .any(|w| k.contains(w))
        || k == "sasl.oauthbearer.config"
}

/// An option value resolved for librdkafka, with whether it may be shown.
pub(super) struct Resolved {
    pub(super) value: String,
    pub(super) secret: bool,
}

/// Why an option's value could not be read. Names the key's variable or file, never a value.
#[derive(Debug, thiserror::Error)]
pub enum OptionError {
    #[error("environment variable `{var}` is empty")]
    EnvEmpty { var: String },
    #[error("environment variable `{var}` is not set (or not UTF-8)")]
    EnvMissing {
        var: String,
        #[source]
        source: std::env::VarError,
    },
    #[error("cannot read {}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads an option's value. Errors name the key (and the variable or file), never the value.
fn resolve_option(key: &str, value: &OptionValue) -> Result<Resolved, OptionError> {
    match value {
        OptionValue::Plain(v) => Ok(Resolved {
            value: v.clone(),
            secret: is_sensitive_key(key),
        }),
        OptionValue::Env(var) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Resolved {
                value: v,
                secret: true,
            }),
            Ok(_) => Err(OptionError::EnvEmpty { var: var.clone() }),
            Err(source) => Err(OptionError::EnvMissing {
                var: var.clone(),
                source,
            }),
        },
        OptionValue::File(path) => match std::fs::read_to_string(path) {
            Ok(v) => {
                let v = v.strip_suffix('\n').unwrap_or(&v);
                let v = v.strip_suffix('\r').unwrap_or(v);
                Ok(Resolved {
                    value: v.to_string(),
                    secret: true,
                })
            }
            Err(source) => Err(OptionError::File {
                path: path.clone(),
                source,
            }),
        },
    }
}

impl KafkaSinkConfig {
    /// Offline checks; keys are relative to `[sink.NAME]`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            issues.push((
                "brokers".to_string(),
                "must name at least one broker, e.g. `localhost:9092`".to_string(),
            ));
        }
        if let Err(errors) = TopicTemplate::parse(&self.topic) {
            issues.extend(errors.into_iter().map(|m| ("topic".to_string(), m)));
        }
        if let KeySource::Pointer(p) = &self.key {
            if let Some(problem) = pointer_problem(p) {
                issues.push(("key".to_string(), problem.to_string()));
            }
        }
        if self.idempotence && self.acks != Acks::All {
            issues.push((
                "acks".to_string(),
                "the idempotent producer needs `acks = \"all\"` (or set `idempotence = false`)"
                    .to_string(),
            ));
        }
        if self.delivery_timeout < Duration::from_millis(1)
            || self.delivery_timeout.as_millis() > i32::MAX as u128
        {
            issues.push((
                "delivery_timeout".to_string(),
                "must be between 1ms and 24 days".to_string(),
            ));
        }
        match self.client_config() {
            Ok(config) => {
                // librdkafka checks every key and value without connecting anywhere.
                if let Err(e) = config.check() {
                    issues.push(e);
                }
            }
            Err(errors) => issues.extend(errors),
        }
        issues
    }

    /// Whether events of this type can be sent: always, unless the topic uses `{type}` and the
    /// type would not make a valid topic name.
    pub fn accepts_type(&self, t: &str) -> bool {
        if !self.topic.contains("{type}") {
            return true;
        }
        TopicTemplate::parse(&self.topic).is_ok_and(|tpl| tpl.accepts_type(t))
    }

    /// The librdkafka settings: the sink's own, then `options` (secrets resolved).
    pub(super) fn client_config(&self) -> Result<Settings, Vec<(String, String)>> {
        let mut settings = Settings::default();
        let mut set = |k: &str, v: String| {
            settings.entries.push((k.to_string(), v, false, None));
        };
        set("bootstrap.servers", self.brokers.clone());
        set("compression.type", self.compression.as_str().to_string());
        set("enable.idempotence", self.idempotence.to_string());
        set(
            "acks",
            match self.acks {
                Acks::All => "all".to_string(),
                Acks::Leader => "1".to_string(),
            },
        );
        set(
            "message.timeout.ms",
            self.delivery_timeout
                .as_millis()
                .min(i32::MAX as u128)
                .to_string(),
        );
        set("client.id", "sse-bridge".to_string());
        let mut errors = Vec::new();
        for (key, value) in &self.options {
            let okey = format!("options.{key}");
            if let Some((_, why)) = RESERVED_OPTIONS
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
            {
                errors.push((okey, format!("cannot be set here: {why}")));
                continue;
            }
            match resolve_option(key, value) {
                Ok(r) => {
                    // An option given here replaces the sink's default (`client.id`).
                    settings.entries.retain(|(k, ..)| k != key);
                    settings
                        .entries
                        .push((key.clone(), r.value, r.secret, Some(okey)));
                }
                Err(e) => errors.push((okey, e.to_string())),
            }
        }
        if errors.is_empty() {
            Ok(settings)
        } else {
            Err(errors)
        }
    }
}
