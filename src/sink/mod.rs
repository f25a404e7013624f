//! Sinks: where routed events are stored. Each sink is a module with its own config struct
//! (the doc comments are the user docs), a `validate` step that runs offline, and a `build`
//! step that opens it. A built sink is driven by [`runner`] on its own thread.

pub mod file;
pub mod jsonl;
pub mod kafka;
pub mod naming;
pub mod postgres;
pub mod runner;
pub mod sqlite;
pub mod stdout;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::units::ByteSize;
use crate::event::Event;
use crate::state::Checkpoint;

/// `[sink.NAME]`: one sink, chosen by `type`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    /// JSON Lines files, one object per event, paths templated by feed and type.
    File(file::FileSinkConfig),
    /// JSON Lines on the bridge's standard output.
    Stdout(stdout::StdoutSinkConfig),
    /// Rows of an SQLite database, stored exactly once.
    Sqlite(sqlite::SqliteSinkConfig),
    /// Kafka records, confirmed by the broker before they are acknowledged.
    Kafka(kafka::KafkaSinkConfig),
    /// Rows of a PostgreSQL table, stored exactly once.
    Postgres(postgres::PostgresSinkConfig),
}

impl SinkConfig {
    /// The sink's type as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::File(_) => "file",
            SinkConfig::Stdout(_) => "stdout",
            SinkConfig::Sqlite(_) => "sqlite",
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::Postgres(_) => "postgres",
        }
    }

    /// Checks what can be checked without touching the outside world. Each problem is
    /// `(key relative to [sink.NAME], message)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        match self {
            SinkConfig::File(c) => c.validate(),
            SinkConfig::Stdout(c) => c.validate(),
            SinkConfig::Sqlite(c) => c.validate(),
            SinkConfig::Kafka(c) => c.validate(),
            SinkConfig::Postgres(c) => c.validate(),
        }
    }

    /// Opens the sink outside a running bridge (no state database: `replay --to`).
    pub fn build(&self, name: &str) -> Result<Box<dyn Sink>, SinkError> {
        self.build_with_state(name, None)
    }

    /// Opens the sink of a bridge whose state database is `state_path`: an SQLite sink that
    /// writes to that same file commits the checkpoints with its events.
    pub fn build_with_state(
        &self,
        name: &str,
        state_path: Option<&Path>,
    ) -> Result<Box<dyn Sink>, SinkError> {
        match self {
            SinkConfig::File(c) => Ok(Box::new(file::FileSink::build_with_state(
                name, c, state_path,
            )?)),
            SinkConfig::Stdout(c) => Ok(Box::new(stdout::StdoutSink::build(name, c)?)),
            SinkConfig::Sqlite(c) => Ok(Box::new(sqlite::SqliteSink::build(name, c, state_path)?)),
            SinkConfig::Kafka(c) => Ok(Box::new(kafka::KafkaSink::build(name, c)?)),
            SinkConfig::Postgres(c) => Ok(Box::new(postgres::PostgresSink::build(
                name, c, state_path,
            )?)),
        }
    }

    /// Opens the sink of a running bridge: [`SinkConfig::build_with_state`], and in a fleet
    /// the lease fence a `postgres` sink checks in every transaction (ARCHITECTURE.md §9).
    pub fn build_for_bridge(
        &self,
        name: &str,
        state_path: Option<&Path>,
        fence: Option<Arc<crate::cluster::fence::Fence>>,
    ) -> Result<Box<dyn Sink>, SinkError> {
        match (self, fence) {
            (SinkConfig::Postgres(c), Some(fence)) => Ok(Box::new(
                postgres::PostgresSink::build_fenced(name, c, state_path, Some(fence))?,
            )),
            _ => self.build_with_state(name, state_path),
        }
    }

    /// The in-memory buffer in front of the sink.
    pub fn buffer(&self) -> &BufferConfig {
        match self {
            SinkConfig::File(c) => &c.buffer,
            SinkConfig::Stdout(c) => &c.buffer,
            SinkConfig::Sqlite(c) => &c.buffer,
            SinkConfig::Kafka(c) => &c.buffer,
            SinkConfig::Postgres(c) => &c.buffer,
        }
    }

    /// Whether events of this type can be stored by this sink. A file sink writes any type
    /// into its paths through a reversible encoding ([`naming`]) and refuses only a type whose
    /// encoded name would be too long; a Kafka sink refuses a type that is not a valid topic
    /// name. The router sends refused events to the default route and counts them as misfits
    /// (ARCHITECTURE.md §7).
    pub fn accepts_type(&self, event_type: &str) -> bool {
        match self {
            SinkConfig::File(c) => c.accepts_type(event_type),
            SinkConfig::Kafka(c) => c.accepts_type(event_type),
            SinkConfig::Stdout(_) | SinkConfig::Sqlite(_) | SinkConfig::Postgres(_) => true,
        }
    }
}

/// `buffer`: the bounded queue between the feeds and a sink.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Events held in memory for this sink before `when_full` applies.
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// Bytes of event data held in memory for this sink before `when_full` applies, as bytes
    /// or `"64 MiB"` (the default; at most `"4 GiB"`). Whichever of `max_events` and
    /// `max_bytes` is reached first applies, so a stalled sink holds at most this much
    /// whatever the size of the events. An event larger than the whole buffer still goes
    /// through, alone. Each event counts its data plus 128 bytes of bookkeeping.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// `block` (default): the feeds routed here stop reading their sockets until the sink
    /// catches up, so nothing is lost. `drop_newest`: events that do not fit are dropped,
    /// counted, and treated as acknowledged (the checkpoint moves past them).
    #[serde(default)]
    pub when_full: WhenFull,
}

fn default_max_events() -> usize {
    10_000
}

fn default_max_bytes() -> ByteSize {
    ByteSize::mib(64)
}

/// The largest `buffer.max_bytes` (the buffer counts bytes with 32-bit permits).
pub const MAX_BUFFER_BYTES: u64 = u32::MAX as u64;

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_events: default_max_events(),
            max_bytes: default_max_bytes(),
            when_full: WhenFull::Block,
        }
    }
}

/// See `BufferConfig::when_full`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    #[default]
    Block,
    DropNewest,
}

/// A sink failure. The runner retries the same batch with backoff; nothing is acknowledged
/// until a write succeeds.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink `{sink}`: {message}")]
    Config { sink: String, message: String },
    #[error("sink `{sink}`: {context}: {source}")]
    Io {
        sink: String,
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sink `{sink}`: {message}")]
    Db { sink: String, message: String },
    /// A path or topic the sink cannot build from a feed name and event type
    /// (ARCHITECTURE.md §7).
    #[error("sink `{sink}`: {source}")]
    Name {
        sink: String,
        #[source]
        source: naming::path::RenderError,
    },
    /// Records a broker did not confirm (Kafka).
    #[error("sink `{sink}`: {message}")]
    Delivery { sink: String, message: String },
}

/// Where a sink's own durable storage says a feed has got to: the last event of the feed it
/// stored, written atomically with the events themselves. A sink that keeps one can resume a
/// feed from it when the state database's checkpoint is older (the checkpoint is committed
/// every `commit_interval`, the sink's cursor with every batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The `seq` of the last event of the feed the sink stored.
    pub seq: u64,
    /// That event's `id`: the stream's last event ID as of the event (may be empty).
    pub id: Arc<str>,
}

/// How the runner drives a sink. The defaults suit most sinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// Most events handed to one `write` call (queued batches are merged up to this).
    pub max_batch_events: usize,
    /// How long the runner waits for more events before writing a smaller batch.
    pub max_batch_wait: Duration,
    /// Whether the sink wants [`Sink::write_with_checkpoints`]: it stores each feed's
    /// checkpoint in the same transaction as the events (an SQLite sink in the state
    /// database). Only such sinks pay for computing them.
    pub checkpoints: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            max_batch_events: 8192,
            max_batch_wait: Duration::ZERO,
            checkpoints: false,
        }
    }
}

/// Counters particular to one kind of sink (Kafka: records delivered, skipped...), exported by
/// the admin endpoint beside the counters every sink has.
pub trait SinkCounters: Send + Sync {
    /// `(metric name, help, value)`. Names end in `_total` and are the same for every sink of
    /// a kind; the endpoint labels each sample with the sink's name.
    fn counters(&self) -> Vec<(&'static str, &'static str, u64)>;
}

/// After a restart the server sent `found` as event `seq` of `feed` where sink `sink` holds
/// `stored` (`holds` says where, for the message): it did not send the same stream again.
/// Says so, and records a `replay-mismatch` gap in the state database at `state_path`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_replay_mismatch(
    sink: &str,
    state_path: Option<&Path>,
    feed: &str,
    url: &str,
    seq: u64,
    stored: &str,
    found: &str,
    holds: &str,
) {
    let detail = format!(
        "sink `{sink}`: after the restart the server sent id {found:?} as event {seq} where \
         {holds} id {stored:?}: it did not send the same stream again, so re-fetched events \
         before it may not have been the stored ones"
    );
    tracing::warn!(sink, feed, "{}", crate::text::escape_controls(&detail));
    let Some(path) = state_path else {
        return;
    };
    let gap = crate::state::Gap::once(
        feed,
        url,
        crate::state::GapReason::ReplayMismatch,
        detail,
        stored,
        seq,
        chrono::Utc::now(),
    );
    if let Err(e) = crate::state::StateStore::open(path).and_then(|mut s| s.record_gap(&gap)) {
        tracing::error!(sink, feed, "cannot record the gap: {e}");
    }
}

/// Re-fetched events a sink dropped because its own storage already held them
/// (`sse_bridge_sink_duplicates_skipped_total`; ARCHITECTURE.md §4).
#[derive(Debug, Default)]
pub struct DuplicateCounter(std::sync::atomic::AtomicU64);

impl DuplicateCounter {
    pub fn add(&self, n: u64) {
        if n > 0 {
            self.0.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl SinkCounters for DuplicateCounter {
    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![(
            "sink_duplicates_skipped_total",
            "Re-fetched events a sink dropped because its own storage already held them.",
            self.get(),
        )]
    }
}

/// The one small trait every sink implements. Calls come from one thread, in order.
pub trait Sink: Send {
    /// Stores a batch of events, which may mix feeds. Returning `Ok` means the events are
    /// stored as durably as the sink's policy promises; the runner then acknowledges them.
    /// On `Err` the runner retries the same batch, so a write must be safe to repeat.
    fn write(&mut self, events: &[Arc<Event>]) -> Result<(), SinkError>;

    /// Batching and checkpoint needs; asked once, when the runner starts.
    fn options(&self) -> WriteOptions {
        WriteOptions::default()
    }

    /// Called instead of `write` when `options().checkpoints` is set. `checkpoints` holds,
    /// for each feed in the batch, the checkpoint that holds once this batch is acknowledged
    /// (every earlier event of the feed is stored by every sink it was routed to); the sink
    /// stores them atomically with the events.
    fn write_with_checkpoints(
        &mut self,
        events: &[Arc<Event>],
        checkpoints: &[Checkpoint],
    ) -> Result<(), SinkError> {
        let _ = checkpoints;
        self.write(events)
    }

    /// Called about once a second, and when no events are arriving: time-based work such as
    /// an `fsync` interval.
    fn tick(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    /// The sink's own counters, if it keeps any for the admin endpoint; asked once, when the
    /// runner starts.
    fn counters(&self) -> Option<Arc<dyn SinkCounters>> {
        None
    }

    /// Where the sink's own storage says `feed` has got to, when that may be behind the
    /// state database's checkpoint (ARCHITECTURE.md §4): the feed resumes from the lower of
    /// the two. Asked once per feed when the bridge starts, before the sink writes anything.
    /// The default, `Ok(None)`, is for sinks whose stored events never fall behind an
    /// acknowledged checkpoint (they acknowledge only what is durable).
    fn cursor(&mut self, feed: &str) -> Result<Option<Cursor>, SinkError> {
        let _ = feed;
        Ok(None)
    }

    /// A run of `feed` (from `url`) starts after the event (`start_seq`, `start_id`): its
    /// events are numbered from `start_seq + 1`, and those up to what the sink already holds
    /// are re-fetched copies (ARCHITECTURE.md §4). A sink that drops them uses this to know
    /// where the re-fetched part starts, and checks that what it holds continues this
    /// numbering: it must hold `start_id` at `start_seq` (a reset checkpoint, a new URL or a
    /// stream without ids never opens a window). Called by the runner before the first write
    /// holding events of that run.
    /// In a fleet, the lease epoch the run just announced by [`Sink::feed_started`] reads
    /// under: a sink that fences its writes (`postgres`) writes the run's events under it,
    /// never under the epoch the feed may hold later (ARCHITECTURE.md §9).
    fn feed_epoch(&mut self, feed: &str, epoch: Option<i64>) {
        let _ = (feed, epoch);
    }

    fn feed_started(&mut self, feed: &str, url: &str, start_seq: u64, start_id: &str) {
        let _ = (feed, url, start_seq, start_id);
    }

    /// Makes everything written so far durable; called at shutdown.
    fn flush(&mut self) -> Result<(), SinkError>;

    /// Closes and reopens what the sink writes to, between writes (SIGHUP), so that files
    /// renamed away by an external tool such as logrotate are left alone and new ones are
    /// started at the configured paths. Everything written so far stays stored.
    fn reopen(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// The event the sinks' unit tests write: id `id-SEQ`, received now.
#[cfg(test)]
pub(crate) fn test_event(feed: &str, event_type: &str, seq: u64, data: &str) -> Arc<Event> {
    Arc::new(Event::new(
        feed,
        event_type,
        &format!("id-{seq}"),
        data,
        seq,
    ))
}
