//! `type = "kafka"`: every event becomes one Kafka record, produced with librdkafka (through
//! rdkafka, with the bundled library).
//!
//! - **Acknowledged after the broker confirmed.** `write` enqueues the whole batch, then waits
//!   for the delivery report of every record before it returns `Ok`; only then does the runner
//!   acknowledge the events and may the checkpoint move past them (DESIGN.md §4). So the
//!   records in flight are bounded by one batch (the runner merges at most 8192 events), and
//!   a slow or unreachable broker fills the sink's buffer and holds the feeds back.
//! - **Nothing is lost on a timeout.** A record that librdkafka could not deliver within
//!   `delivery_timeout` fails the batch: the runner retries it, and this sink then sends again
//!   only the records of that batch that were not confirmed. A record that timed out may still
//!   have been written (the answer was lost), so a retry can duplicate it; every copy carries
//!   the same `sse-id` and `sse-seq` headers, so consumers can drop duplicates.
//! - **Permanent errors** (the topic does not exist, authorization, a record too large)
//!   hold the batch back too (`on_error = "block"`, the default) until the operator fixes the
//!   cause, or are counted and skipped (`on_error = "skip"`).
//! - **Names built from event data are checked** (DESIGN.md §7): a topic rendered from
//!   `{type}` is 1 to 249 characters of `A-Z a-z 0-9 . _ -`; other types are refused at
//!   routing time ([`KafkaSinkConfig::accepts_type`]) and never sent.
//! - **Secrets** in `options` can come from the environment or a file; option values never
//!   appear in logs or error messages for keys that look secret, nor for values read from the
//!   environment or a file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::SecondsFormat;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{BufferConfig, SinkError};
use crate::event::Event;
use crate::secret::Secret;

/// Kafka's limit on topic names.
pub const MAX_TOPIC_LEN: usize = 249;
/// Longest feed name (the config loader enforces it); bounds topics rendered from `{feed}`.
const MAX_FEED_LEN: usize = 100;
/// How long `write` waits for delivery reports beyond `delivery_timeout` before it gives up
/// on a batch (librdkafka reports every record within `delivery_timeout`; this is a backstop).
const REPORT_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for the broker's view of a topic whose records timed out.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);
/// A sink that skips records logs at most this often.
const SKIP_LOG_EVERY: Duration = Duration::from_secs(30);
/// librdkafka's own errors (connection refused, ...) are logged at most this often.
const CLIENT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);
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
    fn as_str(self) -> &'static str {
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
struct Resolved {
    value: String,
    secret: bool,
}

/// Reads an option's value. Errors name the key (and the variable or file), never the value.
fn resolve_option(key: &str, value: &OptionValue) -> Result<Resolved, String> {
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
            Ok(_) => Err(format!("environment variable `{var}` is empty")),
            Err(_) => Err(format!(
                "environment variable `{var}` is not set (or not UTF-8)"
            )),
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
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
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
    fn client_config(&self) -> Result<Settings, Vec<(String, String)>> {
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
                Err(e) => errors.push((okey, e)),
            }
        }
        if errors.is_empty() {
            Ok(settings)
        } else {
            Err(errors)
        }
    }
}

/// Resolved librdkafka settings: `(key, value, secret, config key)`.
#[derive(Default)]
struct Settings {
    entries: Vec<(String, String, bool, Option<String>)>,
}

impl Settings {
    fn to_client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (k, v, ..) in &self.entries {
            config.set(k, v);
        }
        config
    }

    /// Lets librdkafka check every setting; the error names the config key and never shows a
    /// secret value.
    fn check(&self) -> Result<(), (String, String)> {
        let native = self
            .to_client_config()
            .create_native_config()
            .map_err(|e| self.describe(&e))?;
        // A SASL mechanism is only checked by librdkafka when the client starts.
        let builtin = native.get("builtin.features").unwrap_or_default();
        if let Some((_, mechanism, _, okey)) = self
            .entries
            .iter()
            .find(|(k, ..)| k.eq_ignore_ascii_case("sasl.mechanism") || k == "sasl.mechanisms")
        {
            let feature = match mechanism.to_ascii_uppercase().as_str() {
                m if m.starts_with("SCRAM-") => Some("sasl_scram"),
                "GSSAPI" => Some("sasl_gssapi"),
                "OAUTHBEARER" => Some("sasl_oauthbearer"),
                "PLAIN" => Some("sasl_plain"),
                _ => None,
            };
            if let Some(feature) = feature {
                if !builtin.split(',').any(|f| f == feature) {
                    return Err((
                        okey.clone().unwrap_or_else(|| "options".to_string()),
                        format!(
                            "SASL mechanism {mechanism} is not available in this build of \
                             librdkafka (built in: {builtin})"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `(config key, message)` for an error from librdkafka about these settings.
    fn describe(&self, e: &KafkaError) -> (String, String) {
        if let KafkaError::ClientConfig(_, desc, key, _) = e {
            if let Some((_, value, secret, okey)) = self.entries.iter().find(|(k, ..)| k == key) {
                let mut message = desc.clone();
                if *secret && !value.is_empty() {
                    message = message.replace(value.as_str(), "***");
                }
                let okey = okey.clone().unwrap_or_else(|| "options".to_string());
                return (okey, message);
            }
        }
        ("options".to_string(), redact_all(&e.to_string(), self))
    }
}

/// `message` with every secret value of `settings` replaced by `***`.
fn redact_all(message: &str, settings: &Settings) -> String {
    redact_values(message, &settings.secret_values())
}

/// `message` with every one of `values` replaced by `***`, longest first (a value that holds
/// another is replaced whole).
fn redact_values(message: &str, values: &[Secret]) -> String {
    let mut out = message.to_string();
    for value in values {
        if out.contains(value.expose()) {
            out = out.replace(value.expose(), "***");
        }
    }
    out
}

impl Settings {
    /// The secret option values, longest first.
    fn secret_values(&self) -> Vec<Secret> {
        let mut values: Vec<&str> = self
            .entries
            .iter()
            .filter(|(_, value, secret, _)| *secret && !value.is_empty())
            .map(|(_, value, ..)| value.as_str())
            .collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.into_iter().map(Secret::new).collect()
    }
}

/// Whether `c` may appear in a topic name.
fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Kafka's rules for a topic name.
pub fn is_valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= MAX_TOPIC_LEN
        && t != "."
        && t != ".."
        && t.chars().all(is_topic_char)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Feed,
    Type,
}

/// A parsed `topic`.
#[derive(Debug, Clone)]
struct TopicTemplate {
    pieces: Vec<Piece>,
    literal_len: usize,
    feeds: usize,
    types: usize,
}

impl TopicTemplate {
    /// Parses and checks a template; the errors are complete sentences for `topic`.
    fn parse(s: &str) -> Result<TopicTemplate, Vec<String>> {
        if s.is_empty() {
            return Err(vec![
                "must not be empty; for example `sse.{feed}` or `events`".into(),
            ]);
        }
        let mut pieces = Vec::new();
        let mut rest = s;
        let unbalanced = |brace: &str| {
            format!(
                "unbalanced `{brace}` in `{s}`: braces are only allowed around the placeholders \
                 {{feed}} and {{type}}"
            )
        };
        loop {
            let Some(open) = rest.find(['{', '}']) else {
                if !rest.is_empty() {
                    pieces.push(Piece::Lit(rest.to_string()));
                }
                break;
            };
            if rest[open..].starts_with('}') {
                return Err(vec![unbalanced("}")]);
            }
            if open > 0 {
                pieces.push(Piece::Lit(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = match after.find(['{', '}']) {
                Some(close) if after[close..].starts_with('}') => close,
                _ => return Err(vec![unbalanced("{")]),
            };
            match &after[..close] {
                "feed" => pieces.push(Piece::Feed),
                "type" => pieces.push(Piece::Type),
                other => {
                    return Err(vec![format!(
                        "unknown placeholder `{{{other}}}`: only {{feed}} and {{type}} are allowed"
                    )])
                }
            }
            rest = &after[close + 1..];
        }
        let mut errors = Vec::new();
        let mut literal_len = 0;
        for piece in &pieces {
            if let Piece::Lit(l) = piece {
                literal_len += l.len();
                if let Some(bad) = l.chars().find(|c| !is_topic_char(*c)) {
                    errors.push(format!(
                        "{bad:?} cannot be part of a Kafka topic name: only A-Z a-z 0-9 . _ - \
                         are allowed"
                    ));
                }
            }
        }
        let feeds = pieces.iter().filter(|p| **p == Piece::Feed).count();
        let types = pieces.iter().filter(|p| **p == Piece::Type).count();
        if feeds == 0 && types == 0 && (s == "." || s == "..") {
            errors.push(format!("`{s}` is not a valid Kafka topic name"));
        }
        let longest = literal_len + feeds * MAX_FEED_LEN + types;
        if longest > MAX_TOPIC_LEN {
            errors.push(format!(
                "too long: Kafka topic names have at most {MAX_TOPIC_LEN} characters, and this \
                 one can reach {longest} (counting {MAX_FEED_LEN} for a feed name and at least \
                 1 for a type)"
            ));
        }
        if errors.is_empty() {
            Ok(TopicTemplate {
                pieces,
                literal_len,
                feeds,
                types,
            })
        } else {
            Err(errors)
        }
    }

    /// Whether `t` can be rendered into this template: see [`KafkaSinkConfig::accepts_type`].
    fn accepts_type(&self, t: &str) -> bool {
        if self.types == 0 {
            return true;
        }
        let fits = !t.is_empty()
            && t.chars().all(is_topic_char)
            && self.literal_len + self.feeds * MAX_FEED_LEN + self.types * t.len() <= MAX_TOPIC_LEN;
        if !fits {
            return false;
        }
        if self.feeds == 0 {
            // A name made of the type alone must not be `.` or `..`.
            let mut out = String::new();
            self.render("", t, &mut out);
            return is_valid_topic(&out);
        }
        true
    }

    /// Renders the topic for (`feed`, `event_type`) into `out` (unchecked).
    fn render(&self, feed: &str, event_type: &str, out: &mut String) {
        out.clear();
        for piece in &self.pieces {
            match piece {
                Piece::Lit(l) => out.push_str(l),
                Piece::Feed => out.push_str(feed),
                Piece::Type => out.push_str(event_type),
            }
        }
    }
}

/// Figures of a Kafka sink, logged when it closes.
#[derive(Debug, Default)]
pub struct KafkaCounters {
    /// Records confirmed by the broker.
    pub delivered: AtomicU64,
    /// Records given up on a permanent error with `on_error = "skip"`.
    pub skipped: AtomicU64,
    /// Delivery failures (each failed record of each attempt).
    pub failed: AtomicU64,
    /// Records sent again after a failed batch.
    pub resent: AtomicU64,
    /// Records sent without a key because the JSON pointer found nothing.
    pub keys_missing: AtomicU64,
}

impl super::SinkCounters for KafkaCounters {
    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "sse_bridge_kafka_records_delivered_total",
                "Records the Kafka broker confirmed.",
                get(&self.delivered),
            ),
            (
                "sse_bridge_kafka_records_skipped_total",
                "Records given up after a permanent delivery error with on_error = \"skip\" (acknowledged, not stored).",
                get(&self.skipped),
            ),
            (
                "sse_bridge_kafka_delivery_failures_total",
                "Failed deliveries, each failed record of each attempt (retried unless skipped).",
                get(&self.failed),
            ),
            (
                "sse_bridge_kafka_records_resent_total",
                "Records sent again after a failed batch (the topic may hold them twice).",
                get(&self.resent),
            ),
            (
                "sse_bridge_kafka_keys_missing_total",
                "Records sent without a key because the key's JSON pointer found nothing.",
                get(&self.keys_missing),
            ),
        ]
    }
}

/// A delivery report as the sink thread sees it.
struct Report {
    tag: usize,
    result: Result<(), RDKafkaErrorCode>,
}

/// Delivery reports handed from librdkafka's polling thread to the sink thread.
#[derive(Default)]
struct Reports {
    list: Mutex<Vec<Report>>,
    ready: Condvar,
}

impl Reports {
    fn lock(&self) -> MutexGuard<'_, Vec<Report>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The producer's context: receives delivery reports, logs librdkafka through tracing.
struct Context {
    sink: String,
    reports: Arc<Reports>,
    last_error_log: Mutex<Option<Instant>>,
    /// Secret option values: librdkafka's own lines quote settings (`debug=all` prints the
    /// whole configuration), so every line is scrubbed of them before it is logged.
    secrets: Vec<Secret>,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if fac == "FAIL" {
            // A connection failure: also an error event, logged (rate-limited) by `error`.
            return;
        }
        let sink = &self.sink;
        let message = redact_values(message, &self.secrets);
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", sink = %sink, "librdkafka {fac}: {message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", sink = %sink, "librdkafka {fac}: {message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", sink = %sink, "librdkafka {fac}: {message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", sink = %sink, "librdkafka {fac}: {message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Connection problems repeat at every reconnection attempt: log them now and then.
        let mut last = self
            .last_error_log
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= CLIENT_ERROR_LOG_EVERY) {
            *last = Some(Instant::now());
            let code = error
                .rdkafka_error_code()
                .map(|c| c.to_string())
                .unwrap_or_else(|| error.to_string());
            let reason = redact_values(reason, &self.secrets);
            let code = redact_values(&code, &self.secrets);
            tracing::warn!(sink = %self.sink, "Kafka client: {code}: {reason}");
        }
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: usize) {
        let result = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail)),
        };
        self.reports.lock().push(Report { tag, result });
        self.reports.ready.notify_one();
    }
}

/// Whether a delivery error will not go away by itself.
fn is_permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::UnknownTopicOrPartition
            | C::UnknownTopic
            | C::UnknownPartition
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
            | C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::MessageBatchTooLarge
            | C::InvalidTopic
            | C::InvalidRecord
            | C::InvalidRequiredAcks
            | C::InvalidTimestamp
            | C::PolicyViolation
            | C::UnsupportedForMessageFormat
            | C::UnsupportedCompressionType
            | C::InvalidArgument
            | C::BadMessage
    )
}

/// Whether a delivery error means the producer's ID or epoch is no longer accepted.
fn needs_new_producer(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::ProducerFenced
            | C::InvalidProducerEpoch
            | C::InvalidProducerIdMapping
            | C::UnknownProducerId
            | C::OutOfOrderSequenceNumber
            | C::Fenced
            | C::Fatal
    )
}

/// Why a record of the current batch was not delivered.
#[derive(Debug, Clone, PartialEq)]
enum Failure {
    /// librdkafka's error code.
    Code(RDKafkaErrorCode),
    /// The rendered topic name breaks Kafka's rules: never sent.
    InvalidTopic,
    /// No delivery report arrived in time.
    NoReport,
}

impl Failure {
    fn is_permanent(&self) -> bool {
        match self {
            Failure::Code(c) => is_permanent(*c),
            Failure::InvalidTopic => true,
            Failure::NoReport => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            Failure::Code(c) => format!("{c}"),
            Failure::InvalidTopic => "the rendered name is not a valid Kafka topic name".into(),
            Failure::NoReport => "no delivery report in time".into(),
        }
    }
}

/// State of one record of the batch being written.
#[derive(Debug, Clone, PartialEq)]
enum Slot {
    /// Confirmed by the broker (or skipped): not sent again on a retry.
    Done,
    /// Enqueued, waiting for its delivery report.
    InFlight,
    /// Failed in this attempt.
    Failed(Failure),
}

/// The last batch that failed: when the runner retries it, only the records not confirmed
/// are sent again.
struct Retry {
    events: Vec<Arc<Event>>,
    done: Vec<bool>,
}

impl Retry {
    fn matches(&self, events: &[Arc<Event>]) -> bool {
        self.events.len() == events.len()
            && self
                .events
                .iter()
                .zip(events)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// A built Kafka sink.
pub struct KafkaSink {
    name: String,
    settings: Settings,
    producer: ThreadedProducer<Context>,
    reports: Arc<Reports>,
    template: TopicTemplate,
    key: KeySource,
    on_error: OnError,
    delivery_timeout: Duration,
    retry: Option<Retry>,
    /// Tag of the next record produced; reports with older tags belong to earlier attempts.
    next_tag: usize,
    counters: Arc<KafkaCounters>,
    last_skip_log: Option<Instant>,
    /// Reused buffers.
    topic: String,
    key_buf: String,
}

impl KafkaSink {
    pub fn build(name: &str, c: &KafkaSinkConfig) -> Result<Self, SinkError> {
        let config_error = |message: String| SinkError::Config {
            sink: name.to_string(),
            message,
        };
        let template = TopicTemplate::parse(&c.topic).map_err(|errors| {
            config_error(format!("topic `{}`: {}", c.topic, errors.join("; ")))
        })?;
        let settings = c.client_config().map_err(|errors| {
            config_error(
                errors
                    .iter()
                    .map(|(k, m)| format!("{k}: {m}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        let reports = Arc::new(Reports::default());
        let producer = create_producer(name, &settings, &reports)?;
        Ok(KafkaSink {
            name: name.to_string(),
            settings,
            producer,
            reports,
            template,
            key: c.key.clone(),
            on_error: c.on_error,
            delivery_timeout: c.delivery_timeout,
            retry: None,
            next_tag: 0,
            counters: Arc::new(KafkaCounters::default()),
            last_skip_log: None,
            topic: String::new(),
            key_buf: String::new(),
        })
    }

    /// The sink's figures.
    pub fn counters(&self) -> Arc<KafkaCounters> {
        self.counters.clone()
    }

    fn error(&self, message: String) -> SinkError {
        SinkError::Delivery {
            sink: self.name.clone(),
            message,
        }
    }

    /// The key of `event`'s record, in `self.key_buf`; false for no key.
    fn render_key(&mut self, event: &Event) -> bool {
        self.key_buf.clear();
        match &self.key {
            KeySource::Feed => self.key_buf.push_str(&event.feed),
            KeySource::Id if event.id.is_empty() => return false,
            KeySource::Id => self.key_buf.push_str(&event.id),
            KeySource::None => return false,
            KeySource::Pointer(p) => {
                let found = serde_json::from_str::<serde_json::Value>(&event.data)
                    .ok()
                    .and_then(|v| match v.pointer(p) {
                        Some(serde_json::Value::String(s)) => Some(s.clone()),
                        Some(other) => Some(other.to_string()),
                        None => None,
                    });
                match found {
                    Some(k) => self.key_buf = k,
                    None => {
                        self.counters.keys_missing.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Enqueues `events[i]` tagged `tag`; `Err` when it cannot be sent at all. Waits while
    /// librdkafka's queue is full, collecting reports meanwhile.
    fn enqueue(
        &mut self,
        event: &Event,
        tag: usize,
        on_report: &mut dyn FnMut(Report),
    ) -> Result<(), Failure> {
        self.template
            .render(&event.feed, &event.event_type, &mut self.topic);
        if !is_valid_topic(&self.topic) {
            return Err(Failure::InvalidTopic);
        }
        let has_key = self.render_key(event);
        let seq = event.seq.to_string();
        let received_at = event
            .received_at
            .to_rfc3339_opts(SecondsFormat::Micros, true);
        let headers = OwnedHeaders::new_with_capacity(5)
            .insert(Header {
                key: "sse-feed",
                value: Some(&*event.feed),
            })
            .insert(Header {
                key: "sse-type",
                value: Some(&*event.event_type),
            })
            .insert(Header {
                key: "sse-id",
                value: Some(&*event.id),
            })
            .insert(Header {
                key: "sse-seq",
                value: Some(seq.as_str()),
            })
            .insert(Header {
                key: "received-at",
                value: Some(received_at.as_str()),
            });
        let mut record = BaseRecord::with_opaque_to(&self.topic, tag)
            .payload(event.data.as_bytes())
            .headers(headers)
            .timestamp(event.received_at.timestamp_millis());
        if has_key {
            record = record.key(self.key_buf.as_bytes());
        }
        let started = Instant::now();
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if started.elapsed() < self.delivery_timeout =>
                {
                    // librdkafka's queue is full (`queue.buffering.max.*`): wait for reports.
                    record = back;
                    let mut list = self.reports.lock();
                    if list.is_empty() {
                        list = self
                            .reports
                            .ready
                            .wait_timeout(list, Duration::from_millis(50))
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    let drained: Vec<Report> = list.drain(..).collect();
                    drop(list);
                    drained.into_iter().for_each(&mut *on_report);
                }
                Err((e, _)) => {
                    return Err(Failure::Code(
                        e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail),
                    ))
                }
            }
        }
    }

    /// Looks up topics whose records timed out: a topic the broker does not know is a
    /// permanent error (some brokers let records for unknown topics time out).
    fn missing_topics(&self, topics: &[String]) -> Vec<String> {
        let mut missing = Vec::new();
        for topic in topics {
            let Ok(metadata) = self
                .producer
                .client()
                .fetch_metadata(Some(topic), METADATA_TIMEOUT.min(self.delivery_timeout))
            else {
                break; // the broker does not answer: nothing to learn now
            };
            let unknown = metadata.topics().iter().any(|t| {
                t.name() == topic
                    && (t.partitions().is_empty()
                        || t.error().is_some_and(|e| {
                            RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition
                        }))
            });
            if unknown {
                missing.push(topic.clone());
            }
        }
        missing
    }

    /// Replaces the producer when its producer ID is no longer usable: after a fatal error
    /// (it refuses every record afterwards), or when the broker rejects its ID or epoch (some
    /// brokers fence an idempotent producer whose epoch librdkafka bumped after a timeout).
    /// The records not confirmed are sent again by the new producer.
    fn renew_producer_if_needed(&mut self, slots: &[Slot]) {
        let reason = match self.producer.client().fatal_error() {
            Some((code, reason)) => Some(format!(
                "fatal error {code}: {}",
                redact_all(&reason, &self.settings)
            )),
            None => slots.iter().find_map(|s| match s {
                Slot::Failed(Failure::Code(c)) if needs_new_producer(*c) => {
                    Some(format!("the broker answered {c}"))
                }
                _ => None,
            }),
        };
        let Some(reason) = reason else { return };
        tracing::warn!(sink = %self.name, "starting a new Kafka producer: {reason}");
        match create_producer(&self.name, &self.settings, &self.reports) {
            Ok(p) => self.producer = p,
            Err(e) => tracing::error!(sink = %self.name, "cannot start a new Kafka producer: {e}"),
        }
    }

    fn write_batch(&mut self, events: &[Arc<Event>]) -> Result<(), SinkError> {
        // A retry of the batch that failed last time sends only what was not confirmed.
        let retry = self.retry.take().filter(|r| r.matches(events));
        let mut slots: Vec<Slot> = match &retry {
            Some(r) => r
                .done
                .iter()
                .map(|&d| if d { Slot::Done } else { Slot::InFlight })
                .collect(),
            None => vec![Slot::InFlight; events.len()],
        };
        let attempt: Vec<usize> = (0..events.len())
            .filter(|&i| slots[i] == Slot::InFlight)
            .collect();
        if retry.is_some() {
            self.counters
                .resent
                .fetch_add(attempt.len() as u64, Ordering::Relaxed);
        }
        // Stale reports (of an attempt given up on) are dropped by their tag.
        self.reports.lock().clear();
        let base = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(attempt.len());
        let mut in_flight = 0usize;
        let apply = |slots: &mut [Slot], in_flight: &mut usize, r: Report| {
            let Some(j) = r.tag.checked_sub(base).filter(|j| *j < attempt.len()) else {
                return;
            };
            let i = attempt[j];
            if slots[i] != Slot::InFlight {
                return;
            }
            slots[i] = match r.result {
                Ok(()) => Slot::Done,
                Err(code) => Slot::Failed(Failure::Code(code)),
            };
            *in_flight = in_flight.saturating_sub(1);
        };
        for (j, &i) in attempt.iter().enumerate() {
            let mut early = Vec::new();
            let sent = self.enqueue(&events[i], base.wrapping_add(j), &mut |r| early.push(r));
            for r in early {
                apply(&mut slots, &mut in_flight, r);
            }
            match sent {
                Ok(()) => in_flight += 1,
                Err(f) => slots[i] = Slot::Failed(f),
            }
        }
        // Wait for every report of this attempt.
        let deadline = Instant::now() + self.delivery_timeout + REPORT_GRACE;
        while in_flight > 0 {
            let mut list = self.reports.lock();
            while list.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                list = self
                    .reports
                    .ready
                    .wait_timeout(list, left.min(Duration::from_secs(1)))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            if list.is_empty() {
                break;
            }
            let drained: Vec<Report> = list.drain(..).collect();
            drop(list);
            for r in drained {
                apply(&mut slots, &mut in_flight, r);
            }
        }
        for slot in &mut slots {
            if *slot == Slot::InFlight {
                *slot = Slot::Failed(Failure::NoReport);
            }
        }
        let delivered = attempt.iter().filter(|&&i| slots[i] == Slot::Done).count();
        self.counters
            .delivered
            .fetch_add(delivered as u64, Ordering::Relaxed);
        if slots.iter().all(|s| *s == Slot::Done) {
            return Ok(());
        }

        // Some records failed. Timed-out records of a topic the broker does not know are a
        // permanent error.
        let mut timed_out_topics: Vec<String> = Vec::new();
        for (i, slot) in slots.iter().enumerate() {
            if *slot == Slot::Failed(Failure::Code(RDKafkaErrorCode::MessageTimedOut)) {
                self.template
                    .render(&events[i].feed, &events[i].event_type, &mut self.topic);
                if !timed_out_topics.contains(&self.topic) && timed_out_topics.len() < 16 {
                    timed_out_topics.push(self.topic.clone());
                }
            }
        }
        let missing = self.missing_topics(&timed_out_topics);
        // Group the failures by (topic, error) for one readable message.
        let mut groups: BTreeMap<(String, String), (usize, bool)> = BTreeMap::new();
        let mut skipped = 0usize;
        let mut failed = 0usize;
        for (i, slot) in slots.iter_mut().enumerate() {
            let Slot::Failed(f) = slot else { continue };
            self.template
                .render(&events[i].feed, &events[i].event_type, &mut self.topic);
            let topic_missing = *f == Failure::Code(RDKafkaErrorCode::MessageTimedOut)
                && missing.contains(&self.topic);
            let permanent = f.is_permanent() || topic_missing;
            let what = if topic_missing {
                "the topic does not exist (records timed out)".to_string()
            } else {
                f.describe()
            };
            failed += 1;
            let entry = groups
                .entry((self.topic.clone(), what))
                .or_insert((0, permanent));
            entry.0 += 1;
            if permanent && self.on_error == OnError::Skip {
                skipped += 1;
                *slot = Slot::Done;
            }
        }
        self.counters
            .failed
            .fetch_add(failed as u64, Ordering::Relaxed);
        self.renew_producer_if_needed(&slots);
        let summary = groups
            .iter()
            .map(|((topic, what), (n, permanent))| {
                let kind = if *permanent { "permanent" } else { "transient" };
                format!("{n} to topic `{topic}`: {what} ({kind})")
            })
            .collect::<Vec<_>>()
            .join("; ");
        if skipped > 0 {
            let total = self
                .counters
                .skipped
                .fetch_add(skipped as u64, Ordering::Relaxed)
                + skipped as u64;
            if self
                .last_skip_log
                .is_none_or(|t| t.elapsed() >= SKIP_LOG_EVERY)
            {
                self.last_skip_log = Some(Instant::now());
                tracing::warn!(
                    sink = %self.name,
                    skipped,
                    skipped_total = total,
                    "on_error = \"skip\": records dropped after a permanent delivery error: {summary}"
                );
            }
        }
        if slots.iter().all(|s| *s == Slot::Done) {
            return Ok(());
        }
        let pending = slots.iter().filter(|s| **s != Slot::Done).count();
        let advice = if groups.values().any(|(_, permanent)| *permanent) {
            if self.on_error == OnError::Block {
                " A permanent error holds the feeds back until it is fixed (or set on_error = \"skip\")."
            } else {
                ""
            }
        } else {
            " Retrying; the feeds are held back meanwhile."
        };
        self.retry = Some(Retry {
            events: events.to_vec(),
            done: slots.iter().map(|s| *s == Slot::Done).collect(),
        });
        Err(self.error(format!(
            "{pending} of {} records not delivered: {summary}.{advice}",
            events.len()
        )))
    }
}

/// Starts a producer for `settings` whose reports go to `reports`.
fn create_producer(
    name: &str,
    settings: &Settings,
    reports: &Arc<Reports>,
) -> Result<ThreadedProducer<Context>, SinkError> {
    let mut config = settings.to_client_config();
    let secrets = settings.secret_values();
    crate::secret::remember(secrets.iter().map(Secret::expose));
    config.set_log_level(
        if tracing::enabled!(target: "librdkafka", tracing::Level::DEBUG) {
            RDKafkaLogLevel::Debug
        } else {
            RDKafkaLogLevel::Warning
        },
    );
    let context = Context {
        sink: name.to_string(),
        reports: reports.clone(),
        last_error_log: Mutex::new(None),
        secrets,
    };
    config.create_with_context(context).map_err(|e| {
        let (key, message) = settings.describe(&e);
        SinkError::Config {
            sink: name.to_string(),
            message: format!("{key}: {message}"),
        }
    })
}

impl super::Sink for KafkaSink {
    fn counters(&self) -> Option<Arc<dyn super::SinkCounters>> {
        Some(self.counters.clone())
    }

    fn write(&mut self, events: &[Arc<Event>]) -> Result<(), SinkError> {
        if events.is_empty() {
            return Ok(());
        }
        self.write_batch(events)
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        // Every `write` waited for its reports: nothing is in flight here.
        let c = &self.counters;
        tracing::info!(
            sink = %self.name,
            delivered = c.delivered.load(Ordering::Relaxed),
            skipped = c.skipped.load(Ordering::Relaxed),
            failed = c.failed.load(Ordering::Relaxed),
            resent = c.resent.load(Ordering::Relaxed),
            keys_missing = c.keys_missing.load(Ordering::Relaxed),
            "kafka sink closed"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{FeedTracker, Position};
    use crate::sink::{runner, Sink, SinkConfig};
    use chrono::Utc;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use rdkafka::{Offset, TopicPartitionList};

    fn event(feed: &str, event_type: &str, seq: u64, data: &str) -> Arc<Event> {
        Arc::new(Event {
            feed: Arc::from(feed),
            event_type: event_type.into(),
            data: data.into(),
            id: format!("id-{seq}").into(),
            received_at: Utc::now(),
            seq,
        })
    }

    fn events(feed: &str, range: std::ops::RangeInclusive<u64>) -> Vec<Arc<Event>> {
        range
            .map(|n| {
                event(
                    feed,
                    "edit",
                    n,
                    &format!("{{\"n\":{n},\"meta\":{{\"id\":\"m{n}\"}}}}"),
                )
            })
            .collect()
    }

    fn parse(toml_text: &str) -> KafkaSinkConfig {
        match toml::from_str::<SinkConfig>(toml_text) {
            Ok(SinkConfig::Kafka(c)) => c,
            other => panic!("not a kafka sink: {other:?}"),
        }
    }

    fn base(extra: &str) -> String {
        format!("type = \"kafka\"\nbrokers = \"localhost:9092\"\ntopic = \"events\"\n{extra}")
    }

    fn errors(c: &KafkaSinkConfig) -> Vec<(String, String)> {
        c.validate()
    }

    // --- configuration ---------------------------------------------------------------------

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c = parse(&base(""));
        assert_eq!(c.key, KeySource::Feed);
        assert_eq!(c.compression, Compression::Lz4);
        assert!(c.idempotence);
        assert_eq!(c.acks, Acks::All);
        assert_eq!(c.on_error, OnError::Block);
        assert_eq!(c.delivery_timeout, Duration::from_secs(30));
        assert!(c.options.is_empty());
        assert!(errors(&c).is_empty(), "{:?}", errors(&c));
        assert!(toml::from_str::<SinkConfig>(&base("topik = \"x\"")).is_err());
        assert!(toml::from_str::<SinkConfig>(&base("compression = \"snappy2\"")).is_err());
        assert!(toml::from_str::<SinkConfig>(&base("on_error = \"ignore\"")).is_err());
        let c = parse(&base(
            "compression = \"zstd\"\non_error = \"skip\"\ndelivery_timeout = \"5s\"\nkey = \"id\"",
        ));
        assert_eq!(
            (c.compression, c.on_error, c.delivery_timeout, c.key.clone()),
            (
                Compression::Zstd,
                OnError::Skip,
                Duration::from_secs(5),
                KeySource::Id
            )
        );
        assert!(errors(&c).is_empty(), "zstd is built in: {:?}", errors(&c));
    }

    #[test]
    fn key_sources() {
        for (text, expected) in [
            ("feed", KeySource::Feed),
            ("id", KeySource::Id),
            ("none", KeySource::None),
            ("/meta/id", KeySource::Pointer("/meta/id".into())),
            ("/a~1b/~0c", KeySource::Pointer("/a~1b/~0c".into())),
        ] {
            assert_eq!(parse(&base(&format!("key = \"{text}\""))).key, expected);
        }
        for bad in ["ID", "meta/id", "", "/a~2"] {
            let err = toml::from_str::<SinkConfig>(&base(&format!("key = \"{bad}\"")))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("key source") || err.contains("JSON pointer"),
                "{err}"
            );
        }
    }

    #[test]
    fn options_take_text_numbers_booleans_env_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "from-file\n").unwrap();
        std::env::set_var("SSE_BRIDGE_TEST_KAFKA_PW", "from-env");
        let c = parse(&base(&format!(
            "[options]\n\"client.id\" = \"me\"\n\"linger.ms\" = 20\n\"socket.nagle.disable\" = true\n\
             \"sasl.password\" = {{ env = \"SSE_BRIDGE_TEST_KAFKA_PW\" }}\n\
             \"sasl.username\" = {{ file = \"{}\" }}\n",
            secret.display()
        )));
        assert_eq!(c.options["client.id"], OptionValue::Plain("me".into()));
        assert_eq!(c.options["linger.ms"], OptionValue::Plain("20".into()));
        assert_eq!(
            c.options["socket.nagle.disable"],
            OptionValue::Plain("true".into())
        );
        assert_eq!(
            c.options["sasl.password"],
            OptionValue::Env("SSE_BRIDGE_TEST_KAFKA_PW".into())
        );
        assert!(errors(&c).is_empty(), "{:?}", errors(&c));
        let settings = c.client_config().unwrap();
        let get = |k: &str| {
            settings
                .entries
                .iter()
                .find(|(key, ..)| key == k)
                .map(|(_, v, secret, _)| (v.clone(), *secret))
        };
        assert_eq!(get("sasl.password"), Some(("from-env".into(), true)));
        assert_eq!(get("sasl.username"), Some(("from-file".into(), true)));
        assert_eq!(
            get("client.id"),
            Some(("me".into(), false)),
            "replaces the default"
        );
        assert_eq!(get("acks"), Some(("all".into(), false)));
        assert_eq!(get("enable.idempotence"), Some(("true".into(), false)));
        assert_eq!(get("message.timeout.ms"), Some(("30000".into(), false)));

        for bad in [
            "[options]\nx = { env = \"A\", file = \"b\" }",
            "[options]\nx = { path = \"b\" }",
            "[options]\nx = {}",
            "[options]\nx = [1]",
        ] {
            assert!(toml::from_str::<SinkConfig>(&base(bad)).is_err(), "{bad}");
        }
    }

    /// librdkafka's own log lines (with `debug = "all"` it prints the configuration) go
    /// through the context, which scrubs every secret value, a file's content included.
    #[test]
    fn librdkafka_log_lines_never_show_secret_values() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "file-secret-42\n").unwrap();
        let c = parse(&base(&format!(
            "[options]\n\"sasl.username\" = {{ file = \"{}\" }}\n\"sasl.password\" = \"pw\"\n",
            file.display()
        )));
        let settings = c.client_config().unwrap();
        let context = Context {
            sink: "k".into(),
            reports: Arc::default(),
            last_error_log: Mutex::new(None),
            secrets: settings.secret_values(),
        };
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let writer = {
            let out = out.clone();
            move || WriteTo(out.clone())
        };
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(writer)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            context.log(
                RDKafkaLogLevel::Debug,
                "CONF",
                "Client configuration: sasl.username = file-secret-42, sasl.password = pw",
            );
            context.error(
                KafkaError::ClientCreation("x".into()),
                "auth failed for file-secret-42",
            );
        });
        let logged = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert!(logged.contains("sasl.username = ***"), "{logged}");
        assert!(logged.contains("sasl.password = ***"), "{logged}");
        assert!(!logged.contains("file-secret-42"), "{logged}");
    }

    struct WriteTo(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for WriteTo {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn secrets_never_show() {
        std::env::set_var("SSE_BRIDGE_TEST_KAFKA_SECRET", "hunter2-env");
        let c = parse(&base(
            "[options]\n\"sasl.password\" = \"hunter2-plain\"\n\
             \"sasl.oauthbearer.client.secret\" = { env = \"SSE_BRIDGE_TEST_KAFKA_SECRET\" }\n",
        ));
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        // librdkafka refuses the value of a property: the message names the key, not the value.
        std::env::set_var("SSE_BRIDGE_TEST_KAFKA_BAD", "sekrit-value");
        let c = parse(&base(
            "[options]\n\"sasl.username\" = \"ok\"\n\"sasl.mechanism\" = \"PLAIN\"\n\
             \"security.protocol\" = { env = \"SSE_BRIDGE_TEST_KAFKA_BAD\" }\n",
        ));
        let errs = errors(&c);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].0, "options.security.protocol");
        assert!(!errs[0].1.contains("sekrit"), "{errs:?}");
        assert!(errs[0].1.contains("***"), "{errs:?}");
        let Err(e) = KafkaSink::build("k", &c) else {
            panic!("built with a bad option")
        };
        assert!(!e.to_string().contains("sekrit"), "{e}");
        // A plain value of a harmless key is shown, which helps.
        let c = parse(&base(
            "[options]\n\"security.protocol\" = \"carrier-pigeon\"",
        ));
        let errs = errors(&c);
        assert!(errs[0].1.contains("carrier-pigeon"), "{errs:?}");
    }

    #[test]
    fn invalid_settings_name_their_key() {
        let cases = [
            ("brokers = \"\"", "brokers", "at least one broker"),
            ("topic = \"\"", "topic", "must not be empty"),
            (
                "topic = \"a b\"",
                "topic",
                "cannot be part of a Kafka topic name",
            ),
            ("topic = \"a/{feed}\"", "topic", "cannot be part"),
            (
                "topic = \"{feed}.{kind}\"",
                "topic",
                "unknown placeholder `{kind}`",
            ),
            ("topic = \"{feed\"", "topic", "unbalanced `{`"),
            ("topic = \"x}\"", "topic", "unbalanced `}`"),
            ("topic = \"..\"", "topic", "not a valid Kafka topic name"),
            ("acks = \"leader\"", "acks", "idempotent producer"),
            ("delivery_timeout = \"0s\"", "delivery_timeout", "between"),
            (
                "[options]\n\"bootstrap.servers\" = \"x\"",
                "options.bootstrap.servers",
                "`brokers`",
            ),
            ("[options]\n\"ACKS\" = \"0\"", "options.ACKS", "`acks`"),
            (
                "[options]\n\"transactional.id\" = \"t\"",
                "options.transactional.id",
                "transactions",
            ),
            (
                "[options]\n\"no.such.property\" = \"1\"",
                "options.no.such.property",
                "No such configuration property",
            ),
            (
                "[options]\n\"linger.ms\" = \"soon\"",
                "options.linger.ms",
                "Invalid value",
            ),
            (
                "[options]\n\"sasl.password\" = { env = \"SSE_BRIDGE_TEST_NO_SUCH_VAR\" }",
                "options.sasl.password",
                "`SSE_BRIDGE_TEST_NO_SUCH_VAR` is not set",
            ),
            (
                "[options]\n\"sasl.password\" = { file = \"/nonexistent/secret\" }",
                "options.sasl.password",
                "cannot read /nonexistent/secret",
            ),
        ];
        for (extra, key, words) in cases {
            let text = if extra.starts_with("brokers") || extra.starts_with("topic") {
                let field = extra.split(' ').next().unwrap_or_default();
                base("")
                    .lines()
                    .filter(|l| !l.starts_with(field))
                    .chain([extra])
                    .collect::<Vec<_>>()
                    .join("\n")
            } else {
                base(extra)
            };
            let c = parse(&text);
            let errs = errors(&c);
            assert!(
                errs.iter().any(|(k, m)| k == key && m.contains(words)),
                "{extra}: expected `{key}`: {words:?} in {errs:?}"
            );
        }
        let long = format!("topic = \"{}\"", "x".repeat(250));
        assert!(
            errors(&parse(&base("").replace("topic = \"events\"", &long)))
                .iter()
                .any(|(k, m)| k == "topic" && m.contains("too long"))
        );
        // With {feed}, room is kept for a feed name of 100 characters.
        let feedy = format!("topic = \"{}.{{feed}}\"", "x".repeat(148));
        assert!(errors(&parse(&base("").replace("topic = \"events\"", &feedy))).is_empty());
        let feedy = format!("topic = \"{}.{{feed}}\"", "x".repeat(149));
        assert!(!errors(&parse(&base("").replace("topic = \"events\"", &feedy))).is_empty());
        // Kerberos is not built in; SCRAM is (with OpenSSL).
        let c = parse(&base("[options]\n\"sasl.mechanism\" = \"GSSAPI\""));
        let errs = errors(&c);
        assert!(
            errs.iter()
                .any(|(k, m)| k == "options.sasl.mechanism" && m.contains("not available")),
            "{errs:?}"
        );
        let c = parse(&base("[options]\n\"sasl.mechanism\" = \"SCRAM-SHA-512\""));
        assert!(errors(&c).is_empty(), "{:?}", errors(&c));
        let c = parse(&base("[options]\n\"sasl.mechanism\" = \"PLAIN\""));
        assert!(errors(&c).is_empty(), "{:?}", errors(&c));
        let c = parse(&base("acks = \"leader\"\nidempotence = false"));
        assert!(errors(&c).is_empty(), "{:?}", errors(&c));
    }

    #[test]
    fn accepted_types() {
        let typed = parse(&base("").replace("\"events\"", "\"sse.{feed}.{type}\""));
        for ok in ["message", "edit", "log.v2", "a-b_c", "A9", &"x".repeat(144)] {
            assert!(typed.accepts_type(ok), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            "sp ace",
            "caf\u{e9}",
            "a:b",
            "{feed}",
            &"x".repeat(145),
        ] {
            assert!(!typed.accepts_type(bad), "{bad:?}");
        }
        let alone = parse(&base("").replace("\"events\"", "\"{type}\""));
        assert!(alone.accepts_type("x"));
        assert!(alone.accepts_type(".x"));
        assert!(!alone.accepts_type("."));
        assert!(!alone.accepts_type(".."));
        assert!(alone.accepts_type(&"x".repeat(249)));
        assert!(!alone.accepts_type(&"x".repeat(250)));
        let untyped = parse(&base("").replace("\"events\"", "\"{feed}\""));
        assert!(untyped.accepts_type("../../anything at all"));
        assert!(SinkConfig::Kafka(typed).accepts_type("edit"));
    }

    // --- against librdkafka's mock cluster ---------------------------------------------------

    fn mock() -> MockCluster<'static, DefaultProducerContext> {
        MockCluster::new(1).expect("mock cluster")
    }

    /// `security.protocol = "SSL"` with a private CA: librdkafka (built with OpenSSL) verifies
    /// the broker's certificate and sends its first Kafka request inside the TLS session. The
    /// broker here is a TLS listener that reads that request; Kafka tests over plaintext cover
    /// the rest (tansu has no TLS).
    #[test]
    fn ssl_reaches_the_broker_through_a_verified_tls_session() {
        let rcgen::CertifiedKey { cert, key_pair } =
            rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let b64 = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(cert.der())
        };
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|l| std::str::from_utf8(l).unwrap())
            .collect();
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        );
        std::fs::write(&ca, pem).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(key_pair.serialize_der()),
        );
        let server = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut tls =
                rustls::StreamOwned::new(rustls::ServerConnection::new(server).unwrap(), tcp);
            let mut head = [0u8; 6];
            let read = std::io::Read::read_exact(&mut tls, &mut head).map(|()| head);
            let _ = tx.send(read.map_err(|e| e.to_string()));
        });
        let c = parse(&format!(
            "type = \"kafka\"\nbrokers = \"127.0.0.1:{port}\"\ntopic = \"t\"\n\
             [options]\n\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = {:?}\n",
            ca.display().to_string()
        ));
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        let sink = KafkaSink::build("k", &c).unwrap();
        let head = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("librdkafka connected")
            .expect("a verified TLS session carrying a request");
        // A Kafka request: its size (4 bytes), then the API key; a client starts with
        // ApiVersions (18).
        assert_eq!(i16::from_be_bytes([head[4], head[5]]), 18, "{head:?}");
        drop(sink);
    }

    fn mock_config(mock: &MockCluster<'_, DefaultProducerContext>, extra: &str) -> KafkaSinkConfig {
        let timeout = if extra.contains("delivery_timeout") {
            ""
        } else {
            "delivery_timeout = \"3s\"\n"
        };
        let text = format!(
            "type = \"kafka\"\nbrokers = \"{}\"\ntopic = \"t-{{type}}\"\n{timeout}{extra}",
            mock.bootstrap_servers()
        );
        let c = parse(&text);
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        c
    }

    /// Every record of `topic` (partition 0), read until nothing new arrives.
    fn read(
        mock: &MockCluster<'_, DefaultProducerContext>,
        topic: &str,
    ) -> Vec<rdkafka::message::OwnedMessage> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("group.id", "test")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&list).unwrap();
        let mut out = Vec::new();
        let mut idle = Instant::now();
        while idle.elapsed() < Duration::from_millis(1500) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                out.push(m.detach());
                idle = Instant::now();
            }
        }
        out
    }

    fn seqs(records: &[rdkafka::message::OwnedMessage]) -> Vec<u64> {
        records
            .iter()
            .map(|m| {
                let h = m.headers().expect("headers");
                let seq = h
                    .iter()
                    .find(|h| h.key == "sse-seq")
                    .and_then(|h| h.value)
                    .expect("sse-seq");
                String::from_utf8_lossy(seq).parse().expect("numeric seq")
            })
            .collect()
    }

    #[test]
    fn records_carry_data_key_headers_and_timestamp() {
        let mock = mock();
        mock.create_topic("t-edit", 1, 1).unwrap();
        let mut sink = KafkaSink::build("k", &mock_config(&mock, "key = \"/meta/id\"")).unwrap();
        let mut batch = events("wiki", 1..=3);
        batch.push(event("wiki", "edit", 4, "not json"));
        sink.write(&batch).unwrap();
        let records = read(&mock, "t-edit");
        assert_eq!(seqs(&records), [1, 2, 3, 4]);
        let first = &records[0];
        assert_eq!(first.payload(), Some(batch[0].data.as_bytes()));
        assert_eq!(first.key(), Some(&b"m1"[..]));
        assert_eq!(
            records[3].key(),
            None,
            "no key when the pointer finds nothing"
        );
        assert_eq!(sink.counters().keys_missing.load(Ordering::Relaxed), 1);
        let headers: Vec<(String, String)> = first
            .headers()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h.key.to_string(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        let at = batch[0].received_at;
        assert_eq!(
            headers,
            [
                ("sse-feed".to_string(), "wiki".to_string()),
                ("sse-type".into(), "edit".into()),
                ("sse-id".into(), "id-1".into()),
                ("sse-seq".into(), "1".into()),
                (
                    "received-at".into(),
                    at.to_rfc3339_opts(SecondsFormat::Micros, true)
                ),
            ]
        );
        assert_eq!(
            first.timestamp(),
            rdkafka::Timestamp::CreateTime(at.timestamp_millis())
        );
        assert_eq!(sink.counters().delivered.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn every_compression_round_trips() {
        let mock = mock();
        mock.create_topic("t-edit", 1, 1).unwrap();
        let mut expected = Vec::new();
        for (i, compression) in ["none", "gzip", "lz4", "zstd"].iter().enumerate() {
            let config = mock_config(&mock, &format!("compression = \"{compression}\""));
            let mut sink = KafkaSink::build("k", &config).unwrap();
            let first = 10 * i as u64 + 1;
            sink.write(&events("wiki", first..=first + 2)).unwrap();
            expected.extend(first..=first + 2);
        }
        let records = read(&mock, "t-edit");
        assert_eq!(seqs(&records), expected);
        assert!(records
            .iter()
            .all(|m| m.payload().is_some_and(|p| p.starts_with(b"{\"n\":"))));
    }

    #[test]
    fn keys_by_feed_by_id_or_none() {
        let mock = mock();
        mock.create_topic("t-edit", 1, 1).unwrap();
        for (key, expected) in [
            ("feed", Some(&b"wiki"[..])),
            ("id", Some(&b"id-1"[..])),
            ("none", None),
        ] {
            let mut sink =
                KafkaSink::build("k", &mock_config(&mock, &format!("key = \"{key}\""))).unwrap();
            let e = event("wiki", "edit", 1, "x");
            assert!(sink.render_key(&e) == expected.is_some());
            if let Some(k) = expected {
                assert_eq!(sink.key_buf.as_bytes(), k);
            }
        }
        let mut sink = KafkaSink::build("k", &mock_config(&mock, "key = \"id\"")).unwrap();
        let mut e = (*event("wiki", "edit", 1, "x")).clone();
        e.id = Arc::from("");
        assert!(!sink.render_key(&e), "an empty id means no key");
    }

    #[test]
    fn a_permanent_error_blocks_then_the_retry_succeeds() {
        let mock = mock();
        mock.create_topic("t-edit", 1, 1).unwrap();
        let mut sink = KafkaSink::build("k", &mock_config(&mock, "")).unwrap();
        sink.write(&events("wiki", 1..=2)).unwrap();
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        );
        let batch = events("wiki", 3..=7);
        let err = sink.write(&batch).unwrap_err().to_string();
        assert!(
            err.contains("sink `k`")
                && err.contains("5 of 5 records not delivered")
                && err.contains("topic `t-edit`")
                && err.contains("authorization")
                && err.contains("(permanent)")
                && err.contains("on_error"),
            "{err}"
        );
        assert_eq!(sink.counters().failed.load(Ordering::Relaxed), 5);
        // The runner retries the same batch (librdkafka remembers the topic's error until
        // its next metadata refresh, so the first retries may fail too): it goes through, once.
        let mut attempts = 0;
        while let Err(e) = sink.write(&batch) {
            attempts += 1;
            assert!(attempts < 20, "still failing: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            sink.counters().resent.load(Ordering::Relaxed),
            5 * (attempts + 1)
        );
        assert_eq!(seqs(&read(&mock, "t-edit")), [1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn transient_produce_errors_are_retried_by_librdkafka() {
        let mock = mock();
        mock.create_topic("t-edit", 1, 1).unwrap();
        let mut sink = KafkaSink::build("k", &mock_config(&mock, "")).unwrap();
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            ],
        );
        sink.write(&events("wiki", 1..=50)).unwrap();
        assert_eq!(sink.counters().failed.load(Ordering::Relaxed), 0);
        let got = seqs(&read(&mock, "t-edit"));
        assert_eq!(
            got,
            (1..=50).collect::<Vec<_>>(),
            "idempotence: no duplicate"
        );
    }

    #[test]
    fn skip_counts_permanent_errors_and_moves_on() {
        let mock = mock();
        mock.create_topic("t-edit", 1, 1).unwrap();
        let mut sink = KafkaSink::build("k", &mock_config(&mock, "on_error = \"skip\"")).unwrap();
        sink.write(&events("wiki", 1..=2)).unwrap();
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
        );
        sink.write(&events("wiki", 3..=5)).unwrap();
        sink.write(&events("wiki", 6..=6)).unwrap();
        let c = sink.counters();
        assert_eq!(c.skipped.load(Ordering::Relaxed), 3);
        assert_eq!(c.delivered.load(Ordering::Relaxed), 3);
        assert_eq!(seqs(&read(&mock, "t-edit")), [1, 2, 6]);
    }

    #[test]
    fn an_invalid_rendered_topic_is_never_sent() {
        let mock = mock();
        mock.create_topic("t-edit", 1, 1).unwrap();
        let batch = vec![
            event("wiki", "edit", 1, "a"),
            event("wiki", "bad/type", 2, "b"),
            event("wiki", "edit", 3, "c"),
        ];
        let mut blocking = KafkaSink::build("k", &mock_config(&mock, "")).unwrap();
        let err = blocking.write(&batch).unwrap_err().to_string();
        assert!(
            err.contains("1 of 3") && err.contains("not a valid Kafka topic name"),
            "{err}"
        );
        // The retry sends only what was not confirmed: the good records are not repeated.
        assert!(blocking.write(&batch).is_err());
        assert_eq!(blocking.counters().resent.load(Ordering::Relaxed), 1);
        assert_eq!(seqs(&read(&mock, "t-edit")), [1, 3]);
        // A different batch is sent whole.
        blocking.write(&[event("wiki", "edit", 4, "d")]).unwrap();

        let mut skipping =
            KafkaSink::build("k", &mock_config(&mock, "on_error = \"skip\"")).unwrap();
        skipping.write(&batch).unwrap();
        assert_eq!(skipping.counters().skipped.load(Ordering::Relaxed), 1);
        assert_eq!(seqs(&read(&mock, "t-edit")), [1, 3, 4, 1, 3]);
    }

    #[test]
    fn a_broker_down_holds_the_feed_back_until_it_returns() {
        let mock = mock();
        mock.create_topic("t-edit", 1, 1).unwrap();
        let sink = KafkaSink::build("k", &mock_config(&mock, "delivery_timeout = \"1s\"")).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let tracker = Arc::new(FeedTracker::new(Position {
                seq: 0,
                last_event_id: Arc::from(""),
            }));
            let give_up = tokio_util::sync::CancellationToken::new();
            let (handle, worker) = runner::spawn(
                "k",
                Box::new(sink),
                &BufferConfig::default(),
                give_up.clone(),
                None,
            )
            .unwrap();
            // Connected and delivering first.
            let first = events("wiki", 1..=10);
            tracker.register(first.iter().map(|e| (e.seq, &e.id, 1)));
            handle.send(first, &tracker).await;
            let deadline = Instant::now() + Duration::from_secs(10);
            while tracker.acked().seq < 10 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(tracker.acked().seq, 10);

            mock.broker_down(1).unwrap();
            let more = events("wiki", 11..=30);
            tracker.register(more.iter().map(|e| (e.seq, &e.id, 1)));
            handle.send(more, &tracker).await;
            // Past the delivery timeout: the batch failed at least once, nothing acknowledged.
            let deadline = Instant::now() + Duration::from_secs(15);
            while handle.health.errors.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(handle.health.errors.load(Ordering::Relaxed) >= 1);
            assert!(!handle.health.healthy.load(Ordering::Relaxed));
            let error = handle.health.last_error().unwrap_or_default();
            assert!(
                error.contains("timed out") && error.contains("(transient)"),
                "{error}"
            );
            assert_eq!(tracker.acked().seq, 10, "held back, not acknowledged");
            assert_eq!(handle.queued(), 20);

            mock.broker_up(1).unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while tracker.acked().seq < 30 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(tracker.acked().seq, 30, "delivered once the broker is back");
            assert!(handle.health.healthy.load(Ordering::Relaxed));
            drop(handle);
            worker.finished().await;
        });
        let got = seqs(&read(&mock, "t-edit"));
        let mut unique = got.clone();
        unique.dedup();
        assert_eq!(
            unique,
            (1..=30).collect::<Vec<_>>(),
            "every event, in order: {got:?}"
        );
    }
}
