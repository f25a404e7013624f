//! `type = "stdout"`: JSON Lines on the bridge's standard output.
//!
//! Each batch is encoded in the [`jsonl`](super::jsonl) format and written to the locked
//! standard output in one go, then flushed, so lines from different batches never
//! interleave. Standard output cannot be rolled back: if a write fails half way (a closed
//! pipe, say), the retried batch may repeat lines that were already written.

use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{jsonl, BufferConfig, SinkError};
use crate::event::Event;

/// `[sink.NAME]` with `type = "stdout"`: every event routed here is printed as one JSON line
/// (see the file sink for the format). Logs go to standard error, so standard output carries
/// only events and can be piped into another program.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {
    /// The in-memory queue in front of the sink (`max_events`, `when_full`).
    #[serde(default)]
    pub buffer: BufferConfig,
}

impl StdoutSinkConfig {
    /// Nothing to check beyond the buffer (checked by the config loader).
    pub fn validate(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// A built stdout sink.
pub struct StdoutSink {
    name: String,
    /// Reused encoding buffer.
    buf: Vec<u8>,
    encoder: jsonl::Encoder,
}

impl StdoutSink {
    pub fn build(name: &str, _c: &StdoutSinkConfig) -> Result<Self, SinkError> {
        Ok(StdoutSink {
            name: name.to_string(),
            buf: Vec::new(),
            encoder: jsonl::Encoder::default(),
        })
    }

    /// Encodes `events` and writes them to `out` in one `write_all`, then flushes it.
    fn write_to(&mut self, events: &[Arc<Event>], out: &mut impl Write) -> Result<(), SinkError> {
        self.buf.clear();
        for e in events {
            self.encoder.encode(e, &mut self.buf);
        }
        let result = out.write_all(&self.buf).and_then(|()| out.flush());
        // Do not keep a huge buffer around after an unusually large batch.
        if self.buf.capacity() > 4 << 20 {
            self.buf = Vec::new();
        }
        result.map_err(|e| self.io_error(e))
    }

    fn io_error(&self, source: std::io::Error) -> SinkError {
        SinkError::Io {
            sink: self.name.clone(),
            context: "cannot write to standard output".into(),
            source,
        }
    }
}

impl super::Sink for StdoutSink {
    fn write(&mut self, events: &[Arc<Event>]) -> Result<(), SinkError> {
        self.write_to(events, &mut std::io::stdout().lock())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        std::io::stdout()
            .lock()
            .flush()
            .map_err(|e| self.io_error(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{Sink, SinkConfig};

    #[test]
    fn config_parses_with_defaults_and_refuses_unknown_keys() {
        let c: SinkConfig = toml::from_str("type = \"stdout\"").unwrap();
        assert_eq!(
            c,
            SinkConfig::Stdout(StdoutSinkConfig {
                buffer: BufferConfig::default()
            })
        );
        assert!(c.validate().is_empty());
        assert!(c.accepts_type("anything / at all"));
        assert!(toml::from_str::<SinkConfig>("type = \"stdout\"\npath = \"x\"").is_err());
    }

    fn event(seq: u64) -> Arc<Event> {
        Arc::new(Event::new("f", "t", "i", "two\nlines", seq))
    }

    #[test]
    fn writes_jsonl_lines() {
        let cfg = StdoutSinkConfig {
            buffer: BufferConfig::default(),
        };
        let mut sink = StdoutSink::build("out", &cfg).unwrap();
        let mut out = Vec::new();
        sink.write_to(&[event(1), event(2)], &mut out).unwrap();
        sink.write_to(&[event(3)], &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let seqs: Vec<u64> = text
            .lines()
            .map(|l| jsonl::decode(l).unwrap().seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        // The real standard output (an empty batch writes nothing).
        sink.write(&[]).unwrap();
        sink.flush().unwrap();
    }

    #[test]
    fn write_errors_name_the_sink() {
        // A real file opened read-only: writing to it fails for every user, root included.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        std::fs::write(&path, "").unwrap();
        let mut read_only = std::fs::File::open(&path).unwrap();
        let cfg = StdoutSinkConfig {
            buffer: BufferConfig::default(),
        };
        let mut sink = StdoutSink::build("out", &cfg).unwrap();
        let err = sink
            .write_to(&[event(1)], &mut read_only)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sink `out`") && err.contains("standard output"),
            "{err}"
        );
    }
}
