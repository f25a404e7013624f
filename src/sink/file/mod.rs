//! `type = "file"`: JSON Lines files (format in [`jsonl`]), one line per event,
//! with paths templated by feed and event type.
//!
//! Durability follows `fsync`: with `always` a batch is acknowledged (and the checkpoint may
//! move past it) only after every file it touched, and the directory entry of every file or
//! directory it created, is fsynced. A failed batch is rolled back: each file it touched is
//! truncated to its length before the batch, so the runner's retry never leaves a torn line
//! or a duplicate.
//!
//! Names built from event data are confined (ARCHITECTURE.md, "Hostile input and bounded
//! resources"): `{feed}` and `{type}` expand to their safe names ([`naming`](crate::sink::naming): percent-encoded,
//! at most 200 bytes, never `.`, `..` or a separator), every rendered path is checked to stay
//! under the template's base directory, and a templated file name always ends with the sink's
//! own extension. Strftime fields are allowed only in the file name and may not render a `/`.
//!
//! The sink writes only files it owns: below the base directory, directories and files are
//! opened relative to their parent with `O_NOFOLLOW` (never through a symbolic link), every
//! other open of a sink file (undo, compression, comparison) refuses a link too, and a torn
//! last line is only cut from a file whose last complete line is one of the sink's JSON lines.
//!
//! Rotation (`rotate_size`, `rotate_interval`, strftime fields in the file name), retention
//! (`max_files`, `max_age`) and compression of closed files:
//! - A file is rotated only between events: it is flushed (and fsynced unless `fsync =
//!   "never"`), closed, and renamed to `STEM.STAMP.EXT`, STAMP being the UTC time of the
//!   rotation (`2026-11-24T08-30-00.123Z`), strictly increasing per file so that names sort
//!   by age. A size rotation in the middle of a batch belongs to the batch: if the batch
//!   fails, the renames are undone (newest first) before the truncations.
//! - Retention and compression run on a helper thread (`sink-NAME-files`), so the sink thread
//!   never waits for them. The sink registers every path it has open, or may still rename
//!   back, in `Claims::in_use`; the helper only deletes or compresses a file after claiming
//!   it in `Claims::claimed`, which fails for a path in use, and the sink refuses to open a
//!   claimed path. Compression writes `X.gz.tmp`, fsyncs it, renames it to `X.gz`, fsyncs the
//!   directory and only then deletes `X`: a crash never loses the uncompressed data, and the
//!   next sweep removes a leftover `.tmp` and, when `X` and a complete `X.gz` both exist,
//!   deletes `X` only if their contents are equal.

mod config;
mod cursor;
mod retention;
mod rotation;
mod writer;

pub use config::{Compress, FileSinkConfig, FsyncPolicy};

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::{jsonl, SinkError};
use crate::event::Event;
use crate::sink::naming::path::{RenderError, Series, Template};
use retention::{Claims, Maintenance, Worker};
use writer::{Batch, OpenFile, Undo};

/// The directory holding `path` (`.` for a bare name): the one to fsync when its entry changes.
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `path` with `suffix` appended to its file name (`x.jsonl` -> `x.jsonl.gz`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// The wall clock, replaceable in tests.
type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// A built file sink.
pub struct FileSink {
    name: String,
    template: Template,
    policy: FsyncPolicy,
    interval: Duration,
    rotate_size: Option<u64>,
    /// `rotate_interval` in seconds.
    rotate_every: Option<i64>,
    /// Open handles by rendered path. Between batches every buffer is empty.
    files: HashMap<String, OpenFile>,
    /// Directories whose entries changed (a file or directory was created, renamed or
    /// removed in them) and that are not yet fsynced.
    dirs_to_sync: HashSet<PathBuf>,
    /// Steps of undoing a failed batch not done yet: retried before the next write.
    pending_undo: VecDeque<Undo>,
    /// Paths kept in use until `pending_undo` is done.
    undo_held: Vec<PathBuf>,
    last_sync: Instant,
    clock: Clock,
    /// The strftime texts of the file name as of the last write or tick.
    times: Vec<String>,
    /// Every series written since the sink started.
    series: HashMap<String, Arc<Series>>,
    /// The newest rotation stamp per series.
    last_stamp: HashMap<String, i64>,
    /// The helper thread, when there is anything to compress or delete.
    maintenance: Option<Maintenance>,
    /// With `max_age`: when every series is checked next (Unix seconds).
    next_age_sweep: i64,
    /// Feeds inside their re-fetched window (see `cursor`).
    windows: HashMap<Arc<str>, cursor::Window>,
    /// Feeds that started from the beginning, until their first event is seen (feed → URL).
    first_event_pending: HashMap<Arc<str>, String>,
    /// The state database, where a gap found by `cursor` is recorded.
    state_path: Option<PathBuf>,
    counters: Arc<super::DuplicateCounter>,
    /// Reused buffers.
    rendered: String,
    line: Vec<u8>,
    encoder: jsonl::Encoder,
}

impl FileSink {
    pub fn build(name: &str, c: &FileSinkConfig) -> Result<Self, SinkError> {
        Self::build_with_clock(name, c, Arc::new(Utc::now))
    }

    /// [`FileSink::build`], recording the gaps its cursor finds in the state database at
    /// `state_path`.
    pub fn build_with_state(
        name: &str,
        c: &FileSinkConfig,
        state_path: Option<&Path>,
    ) -> Result<Self, SinkError> {
        let mut sink = Self::build(name, c)?;
        sink.state_path = state_path.map(Path::to_path_buf);
        Ok(sink)
    }

    fn build_with_clock(name: &str, c: &FileSinkConfig, clock: Clock) -> Result<Self, SinkError> {
        let config_error = |message: String| SinkError::Config {
            sink: name.to_string(),
            message,
        };
        let template = Template::parse(&c.path, c.name_reserve())
            .map_err(|errors| config_error(format!("path `{}`: {}", c.path, errors.join("; "))))?;
        let issues = c.validate();
        if !issues.is_empty() {
            let text: Vec<String> = issues.iter().map(|(k, m)| format!("{k}: {m}")).collect();
            return Err(config_error(text.join("; ")));
        }
        let maintenance = if c.compress != Compress::None
            || c.max_files.is_some()
            || c.max_age.is_some()
        {
            let worker = Worker {
                name: name.to_string(),
                compress: c.compress,
                max_files: c.max_files,
                max_age: c.max_age,
                clock: clock.clone(),
                stop: Arc::new(AtomicBool::new(false)),
                claims: Arc::new(Mutex::new(Claims::default())),
            };
            Some(Maintenance::start(worker).map_err(|e| SinkError::Io {
                sink: name.to_string(),
                context:
                    "cannot start the thread that compresses and deletes rotated files".to_string(),
                source: e,
            })?)
        } else {
            None
        };
        Ok(FileSink {
            name: name.to_string(),
            template,
            policy: c.fsync,
            interval: c.fsync_interval,
            rotate_size: c.rotate_size.map(|s| s.0),
            rotate_every: c
                .rotate_interval
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            files: HashMap::new(),
            dirs_to_sync: HashSet::new(),
            pending_undo: VecDeque::new(),
            undo_held: Vec::new(),
            last_sync: Instant::now(),
            clock,
            times: Vec::new(),
            series: HashMap::new(),
            last_stamp: HashMap::new(),
            maintenance,
            next_age_sweep: i64::MIN,
            windows: HashMap::new(),
            first_event_pending: HashMap::new(),
            state_path: None,
            counters: Arc::default(),
            rendered: String::new(),
            line: Vec::new(),
            encoder: jsonl::Encoder::default(),
        })
    }

    fn io(&self, context: String, source: std::io::Error) -> SinkError {
        SinkError::Io {
            sink: self.name.clone(),
            context,
            source,
        }
    }

    fn name_error(&self, source: RenderError) -> SinkError {
        SinkError::Name {
            sink: self.name.clone(),
            source,
        }
    }

    fn config(&self, message: String) -> SinkError {
        SinkError::Config {
            sink: self.name.clone(),
            message,
        }
    }
}

impl super::Sink for FileSink {
    fn write(&mut self, events: &[Arc<Event>]) -> Result<(), SinkError> {
        self.apply_pending_undo()?;
        // Inside a re-fetched window, the copies of what the files hold are left out.
        self.resolve_first_events(events);
        let filtered = if self.windows.is_empty() {
            None
        } else {
            Some(self.filter_stored(events)?)
        };
        let events = filtered.as_ref().map_or(events, |f| &f.kept[..]);
        let now = (self.clock)();
        self.roll_over(now)?;
        let mut batch = Batch::default();
        let result = self.write_batch(events, now, &mut batch);
        match result {
            Ok(()) => {
                self.commit(batch);
                if let Some(filtered) = filtered {
                    self.apply_filtered(filtered);
                }
            }
            Err(_) => self.rollback(batch),
        }
        result
    }

    fn cursor(&mut self, feed: &str) -> Result<Option<super::Cursor>, SinkError> {
        self.feed_cursor(feed)
    }

    fn feed_started(&mut self, feed: &str, url: &str, start_seq: u64, start_id: &str) {
        self.start_window(feed, url, start_seq, start_id);
    }

    fn counters(&self) -> Option<Arc<dyn super::SinkCounters>> {
        Some(self.counters.clone())
    }

    fn tick(&mut self) -> Result<(), SinkError> {
        let now = (self.clock)();
        let rolled = if self.pending_undo.is_empty() {
            self.roll_over(now)
        } else {
            Ok(())
        };
        if self.policy == FsyncPolicy::Interval && self.last_sync.elapsed() >= self.interval {
            self.sync_all()?;
            self.last_sync = Instant::now();
        }
        self.sweep_for_age(now);
        rolled
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.apply_pending_undo()?;
        self.sync_all()?;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Closes every file (flushed, and fsynced unless `fsync = "never"`); the next write
    /// opens the path again, creating the file if it was renamed away.
    fn reopen(&mut self) -> Result<(), SinkError> {
        self.close_all()?;
        if self.policy != FsyncPolicy::Never {
            self.sync_dirs()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
