//! `type = "kafka"`: every event becomes one Kafka record, produced with librdkafka (through
//! rdkafka, with the bundled library).
//!
//! - **Acknowledged after the broker confirmed.** `write` enqueues the whole batch, then waits
//!   for the delivery report of every record before it returns `Ok`; only then does the runner
//!   acknowledge the events and may the checkpoint move past them (ARCHITECTURE.md §4). So the
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
//! - **Names built from event data are checked** (ARCHITECTURE.md §7): a topic rendered from
//!   `{type}` is 1 to 249 characters of `A-Z a-z 0-9 . _ -`; other types are refused at
//!   routing time ([`KafkaSinkConfig::accepts_type`]; the names in [`naming::topic`](crate::sink::naming::topic)) and never sent.
//! - **Secrets** in `options` can come from the environment or a file; option values never
//!   appear in logs or error messages for keys that look secret, nor for values read from the
//!   environment or a file.

mod config;
mod delivery;
mod producer;

pub use crate::sink::naming::topic::{is_valid_topic, MAX_TOPIC_LEN};
pub use config::{
    Acks, Compression, KafkaSinkConfig, KeySource, OnError, OptionError, OptionValue,
};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::SecondsFormat;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use super::SinkError;
use crate::event::Event;
use crate::sink::naming::topic::TopicTemplate;
use delivery::{needs_new_producer, Failure, Report, Reports, Retry, Slot};
use producer::{create_producer, redact_all, Context, Settings};

/// How long `write` waits for delivery reports beyond `delivery_timeout` before it gives up
/// on a batch (librdkafka reports every record within `delivery_timeout`; this is a backstop).
const REPORT_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for the broker's view of a topic whose records timed out.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);
/// A sink that skips records logs at most this often.
const SKIP_LOG_EVERY: Duration = Duration::from_secs(30);

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
mod tests;
