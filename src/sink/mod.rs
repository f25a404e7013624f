//! Sinks: where routed events are stored. Each sink is a module with its own config struct
//! (the doc comments are the user docs), a `validate` step that runs offline, and a `build`
//! step that opens it. A built sink is driven by [`runner`] on its own thread.

pub mod file;
pub mod jsonl;
pub mod runner;
pub mod stdout;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::event::Event;

/// `[sink.NAME]`: one sink, chosen by `type`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    /// JSON Lines files, one object per event, paths templated by feed and type.
    File(file::FileSinkConfig),
    /// JSON Lines on the bridge's standard output.
    Stdout(stdout::StdoutSinkConfig),
}

impl SinkConfig {
    /// The sink's type as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::File(_) => "file",
            SinkConfig::Stdout(_) => "stdout",
        }
    }

    /// Checks what can be checked without touching the outside world. Each problem is
    /// `(key relative to [sink.NAME], message)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        match self {
            SinkConfig::File(c) => c.validate(),
            SinkConfig::Stdout(c) => c.validate(),
        }
    }

    /// Opens the sink.
    pub fn build(&self, name: &str) -> Result<Box<dyn Sink>, SinkError> {
        match self {
            SinkConfig::File(c) => Ok(Box::new(file::FileSink::build(name, c)?)),
            SinkConfig::Stdout(c) => Ok(Box::new(stdout::StdoutSink::build(name, c)?)),
        }
    }

    /// The in-memory buffer in front of the sink.
    pub fn buffer(&self) -> &BufferConfig {
        match self {
            SinkConfig::File(c) => &c.buffer,
            SinkConfig::Stdout(c) => &c.buffer,
        }
    }

    /// Whether events of this type can be stored by this sink. A sink that builds names from
    /// the event type (`{type}` in a path) refuses types that would not make a safe name;
    /// the router then sends such events to the default route and counts them (DESIGN.md §7).
    pub fn accepts_type(&self, event_type: &str) -> bool {
        match self {
            SinkConfig::File(c) => c.accepts_type(event_type),
            SinkConfig::Stdout(_) => true,
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
    /// `block` (default): the feeds routed here stop reading their sockets until the sink
    /// catches up, so nothing is lost. `drop_newest`: events that do not fit are dropped,
    /// counted, and treated as acknowledged (the checkpoint moves past them).
    #[serde(default)]
    pub when_full: WhenFull,
}

fn default_max_events() -> usize {
    10_000
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_events: default_max_events(),
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
}

/// The one small trait every sink implements. Calls come from one thread, in order.
pub trait Sink: Send {
    /// Stores a batch of events, which may mix feeds. Returning `Ok` means the events are
    /// stored as durably as the sink's policy promises; the runner then acknowledges them.
    /// On `Err` the runner retries the same batch, so a write must be safe to repeat.
    fn write(&mut self, events: &[Arc<Event>]) -> Result<(), SinkError>;

    /// Called about once a second, and when no events are arriving: time-based work such as
    /// an `fsync` interval.
    fn tick(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Makes everything written so far durable; called at shutdown.
    fn flush(&mut self) -> Result<(), SinkError>;
}
