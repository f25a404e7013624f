//! What happened to each record of a batch: delivery reports handed from librdkafka's thread,
//! which errors are permanent, and the batch kept to send again only what was not confirmed.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rdkafka::error::RDKafkaErrorCode;

use crate::event::Event;

/// A delivery report as the sink thread sees it.
pub(super) struct Report {
    pub(super) tag: usize,
    pub(super) result: Result<(), RDKafkaErrorCode>,
}

/// Delivery reports handed from librdkafka's polling thread to the sink thread.
#[derive(Default)]
pub(super) struct Reports {
    pub(super) list: Mutex<Vec<Report>>,
    pub(super) ready: Condvar,
}

impl Reports {
    pub(super) fn lock(&self) -> MutexGuard<'_, Vec<Report>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether a delivery error will not go away by itself.
pub(super) fn is_permanent(code: RDKafkaErrorCode) -> bool {
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
pub(super) fn needs_new_producer(code: RDKafkaErrorCode) -> bool {
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
pub(super) enum Failure {
    /// librdkafka's error code.
    Code(RDKafkaErrorCode),
    /// The rendered topic name breaks Kafka's rules: never sent.
    InvalidTopic,
    /// No delivery report arrived in time.
    NoReport,
}

impl Failure {
    pub(super) fn is_permanent(&self) -> bool {
        match self {
            Failure::Code(c) => is_permanent(*c),
            Failure::InvalidTopic => true,
            Failure::NoReport => false,
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            Failure::Code(c) => format!("{c}"),
            Failure::InvalidTopic => "the rendered name is not a valid Kafka topic name".into(),
            Failure::NoReport => "no delivery report in time".into(),
        }
    }
}

/// State of one record of the batch being written.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Slot {
    /// Confirmed by the broker (or skipped): not sent again on a retry.
    Done,
    /// Enqueued, waiting for its delivery report.
    InFlight,
    /// Failed in this attempt.
    Failed(Failure),
}

/// The last batch that failed: when the runner retries it, only the records not confirmed
/// are sent again.
pub(super) struct Retry {
    pub(super) events: Vec<Arc<Event>>,
    pub(super) done: Vec<bool>,
}

impl Retry {
    pub(super) fn matches(&self, events: &[Arc<Event>]) -> bool {
        self.events.len() == events.len()
            && self
                .events
                .iter()
                .zip(events)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}
