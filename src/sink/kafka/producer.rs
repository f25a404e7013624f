//! The librdkafka producer: its settings (checked by librdkafka without connecting), its
//! context (delivery reports to the sink thread, librdkafka's log lines through tracing) and
//! the scrubbing of secret option values from anything librdkafka says.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryResult, ProducerContext, ThreadedProducer};

use super::delivery::{Report, Reports};
use crate::secret::Secret;
use crate::sink::SinkError;

/// librdkafka's own errors (connection refused, ...) are logged at most this often.
const CLIENT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Resolved librdkafka settings: `(key, value, secret, config key)`.
#[derive(Default)]
pub(super) struct Settings {
    pub(super) entries: Vec<(String, String, bool, Option<String>)>,
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
    pub(super) fn check(&self) -> Result<(), (String, String)> {
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
    pub(super) fn describe(&self, e: &KafkaError) -> (String, String) {
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
pub(super) fn redact_all(message: &str, settings: &Settings) -> String {
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
    pub(super) fn secret_values(&self) -> Vec<Secret> {
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

/// The producer's context: receives delivery reports, logs librdkafka through tracing.
pub(super) struct Context {
    pub(super) sink: String,
    pub(super) reports: Arc<Reports>,
    pub(super) last_error_log: Mutex<Option<Instant>>,
    /// Secret option values: librdkafka's own lines quote settings (`debug=all` prints the
    /// whole configuration), so every line is scrubbed of them before it is logged.
    pub(super) secrets: Vec<Secret>,
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

/// Starts a producer for `settings` whose reports go to `reports`.
pub(super) fn create_producer(
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
