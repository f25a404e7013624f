//! `type = "file"`: JSON Lines files (format in [`jsonl`](super::jsonl)), one line per event,
//! with paths templated by feed and event type.
//!
//! Durability follows `fsync`: with `always` a batch is acknowledged (and the checkpoint may
//! move past it) only after every file it touched, and the directory entry of every file or
//! directory it created, is fsynced. A failed batch is rolled back: each file it touched is
//! truncated to its length before the batch, so the runner's retry never leaves a torn line
//! or a duplicate.
//!
//! Names built from event data are confined (DESIGN.md §7): `{feed}` and `{type}` expand only
//! to 1 to 200 characters of `A-Z a-z 0-9 . _ -` not starting with `.`, and every rendered path
//! is checked to stay under the template's base directory.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{jsonl, BufferConfig, SinkError};
use crate::event::Event;

/// Open file handles kept per sink; when more are needed, all are closed first.
const MAX_OPEN_FILES: usize = 256;
/// Longest value a placeholder expands to.
const MAX_VALUE_LEN: usize = 200;
/// Longest feed name (the config loader enforces it); used to bound rendered file names.
const MAX_FEED_LEN: usize = 100;
/// Longest file name (one path component) on common filesystems, in bytes.
const MAX_COMPONENT_LEN: usize = 255;

/// `[sink.NAME]` with `type = "file"`: appends each event as one JSON line to a file whose
/// path is built from the feed and the event type.
///
/// ```toml
/// [sink.archive]
/// type = "file"
/// path = "data/events/{feed}/{type}.jsonl"
/// fsync = "always"
/// ```
///
/// Each line is a JSON object with the keys `feed`, `type`, `id`, `data` (a string, exactly as
/// the stream sent it), `received_at` (RFC 3339 UTC with microseconds) and `seq` (the bridge's
/// per-feed sequence number), in that order. Files are opened in append mode and held open;
/// to rotate them, use copy-and-truncate (logrotate's `copytruncate`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Where events go: a path template in which `{feed}` is replaced by the feed name and
    /// `{type}` by the event type, e.g. `data/events/{feed}.jsonl`. Relative paths are
    /// relative to the working directory. Directories are created as needed.
    ///
    /// The leading directories without a placeholder are the base directory
    /// (`data/events` here; `.` for `{feed}/events.jsonl`), and every file stays under it:
    /// the template may not contain `.` or `..` components, must end with a file name, and
    /// braces are only allowed around `feed` and `type`. An absolute path must start with at
    /// least one fixed directory before any placeholder.
    ///
    /// With `{type}`, event types that are not 1 to 200 characters of `A-Z a-z 0-9 . _ -`
    /// (not starting with `.`), or that would make a file name longer than 255 bytes, cannot
    /// be stored here: such events go to the default route (`[routing] default`) and are
    /// counted as misfits.
    pub path: String,
    /// When written data is forced to disk:
    /// `always` (default): every file a batch wrote is fsynced before the batch is
    /// acknowledged and the checkpoint may move past it; survives a power loss.
    /// `interval`: a batch is acknowledged once handed to the operating system, and files are
    /// fsynced every `fsync_interval`; survives a crash of the bridge, but a power loss may
    /// lose up to `fsync_interval` of events (they are not fetched again).
    /// `never`: acknowledged once handed to the operating system, which decides when to write
    /// (files are still fsynced at shutdown).
    #[serde(default)]
    pub fsync: FsyncPolicy,
    /// With `fsync = "interval"`: how often written files are fsynced. Default `1s`.
    #[serde(default = "default_fsync_interval", with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// The in-memory queue in front of the sink (`max_events`, `when_full`).
    #[serde(default)]
    pub buffer: BufferConfig,
}

fn default_fsync_interval() -> Duration {
    Duration::from_secs(1)
}

/// See [`FileSinkConfig::fsync`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    #[default]
    Always,
    Interval,
    Never,
}

impl FileSinkConfig {
    /// Offline checks; keys are relative to `[sink.NAME]`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        if let Err(errors) = Template::parse(&self.path) {
            issues.extend(errors.into_iter().map(|m| ("path".to_string(), m)));
        }
        if self.fsync_interval.is_zero() {
            issues.push((
                "fsync_interval".to_string(),
                "must be greater than zero".to_string(),
            ));
        }
        issues
    }

    /// Whether events of this type can be stored: always, unless the path uses `{type}` and
    /// the type would not make a safe file name.
    pub fn accepts_type(&self, t: &str) -> bool {
        if !self.path.contains("{type}") {
            return true;
        }
        Template::parse(&self.path).is_ok_and(|tpl| tpl.accepts_type(t))
    }
}

/// Whether `v` may replace a placeholder: 1 to 200 characters of `A-Z a-z 0-9 . _ -`, not
/// starting with `.` (so never `.` or `..`, and never a separator).
fn is_safe_value(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_VALUE_LEN
        && !v.starts_with('.')
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Feed,
    Type,
}

/// A parsed `path` template.
#[derive(Debug, Clone)]
struct Template {
    /// The leading directories without placeholders (`.` when there are none).
    base: PathBuf,
    /// `base` as it starts a rendered path: with a trailing `/`, or empty for `.`.
    prefix: String,
    /// The components after the base; the last one is the file name.
    components: Vec<Vec<Piece>>,
    uses_type: bool,
}

impl Template {
    /// Parses and checks a template; the errors are complete sentences for `path`.
    fn parse(s: &str) -> Result<Template, Vec<String>> {
        if s.is_empty() {
            return Err(vec![
                "must not be empty; for example `data/events/{feed}.jsonl`".into(),
            ]);
        }
        if s.contains('\0') {
            return Err(vec!["must not contain a NUL character".into()]);
        }
        let mut errors = Vec::new();
        let absolute = s.starts_with('/');
        if s.ends_with('/') {
            errors.push("must end with a file name, not `/`".to_string());
        }
        let mut components = Vec::new();
        for raw in s.split('/').filter(|c| !c.is_empty()) {
            if raw == "." || raw == ".." {
                errors.push(format!(
                    "must not contain `{raw}` components: files must stay under the template's \
                     base directory"
                ));
                continue;
            }
            if raw.len() > MAX_COMPONENT_LEN {
                errors.push(format!(
                    "`{raw}` is longer than {MAX_COMPONENT_LEN} bytes, too long for a file name"
                ));
            }
            match parse_component(raw) {
                Ok(pieces) => components.push(pieces),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let has_placeholder = |c: &Vec<Piece>| c.iter().any(|p| !matches!(p, Piece::Lit(_)));
        // The base: the placeholder-free leading directories (never the file name).
        let dirs = components.len().saturating_sub(1);
        let base_len = components[..dirs]
            .iter()
            .position(has_placeholder)
            .unwrap_or(dirs);
        let base_parts: Vec<String> = components[..base_len]
            .iter()
            .map(|c| literal_text(c))
            .collect();
        let any_placeholder = components.iter().any(has_placeholder);
        if absolute && base_len == 0 && any_placeholder {
            return Err(vec![format!(
                "`{s}` puts a placeholder directly under `/`, so event data would choose a \
                 top-level directory or file; start the path with a fixed directory, such as \
                 `/var/lib/sse-bridge/{{feed}}.jsonl`"
            )]);
        }
        let root = if absolute { "/" } else { "" };
        let (base, prefix) = if base_parts.is_empty() {
            let base = if absolute { "/" } else { "." };
            (PathBuf::from(base), root.to_string())
        } else {
            let joined = format!("{root}{}", base_parts.join("/"));
            (PathBuf::from(&joined), format!("{joined}/"))
        };
        let uses_type = components.iter().flatten().any(|p| *p == Piece::Type);
        Ok(Template {
            base,
            prefix,
            components: components.split_off(base_len),
            uses_type,
        })
    }

    /// Whether `t` can be rendered into this template: see [`FileSinkConfig::accepts_type`].
    fn accepts_type(&self, t: &str) -> bool {
        if !self.uses_type {
            return true;
        }
        is_safe_value(t)
            && self.components.iter().all(|c| {
                let len: usize = c
                    .iter()
                    .map(|p| match p {
                        Piece::Lit(l) => l.len(),
                        Piece::Feed => MAX_FEED_LEN,
                        Piece::Type => t.len(),
                    })
                    .sum();
                len <= MAX_COMPONENT_LEN
            })
    }

    /// Renders the path for (`feed`, `event_type`) into `out`.
    fn render(&self, feed: &str, event_type: &str, out: &mut String) -> Result<(), String> {
        out.clear();
        out.push_str(&self.prefix);
        for (i, component) in self.components.iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            let start = out.len();
            for piece in component {
                match piece {
                    Piece::Lit(l) => out.push_str(l),
                    Piece::Feed if is_safe_value(feed) => out.push_str(feed),
                    Piece::Type if is_safe_value(event_type) => out.push_str(event_type),
                    Piece::Feed => {
                        return Err(format!("feed name {feed:?} is not usable in a path"))
                    }
                    Piece::Type => {
                        return Err(format!("event type {event_type:?} is not usable in a path"))
                    }
                }
            }
            if out.len() - start > MAX_COMPONENT_LEN {
                return Err(format!(
                    "the file name for feed `{feed}` and type `{event_type}` would be longer \
                     than {MAX_COMPONENT_LEN} bytes"
                ));
            }
        }
        Ok(())
    }

    /// Defense in depth: whether a rendered path is exactly the base followed by as many
    /// plain components as the template has.
    fn is_confined(&self, rendered: &Path) -> bool {
        let rest = if self.base == Path::new(".") {
            rendered
        } else {
            match rendered.strip_prefix(&self.base) {
                Ok(rest) => rest,
                Err(_) => return false,
            }
        };
        let mut count = 0;
        for c in rest.components() {
            if !matches!(c, Component::Normal(_)) {
                return false;
            }
            count += 1;
        }
        count == self.components.len()
    }
}

fn literal_text(component: &[Piece]) -> String {
    component
        .iter()
        .map(|p| match p {
            Piece::Lit(l) => l.as_str(),
            Piece::Feed => "{feed}",
            Piece::Type => "{type}",
        })
        .collect()
}

/// Splits one path component into literal text and placeholders.
fn parse_component(raw: &str) -> Result<Vec<Piece>, String> {
    let unbalanced = |brace: &str| {
        format!(
            "unbalanced `{brace}` in `{raw}`: braces are only allowed around the placeholders \
             {{feed}} and {{type}}"
        )
    };
    let mut pieces = Vec::new();
    let mut rest = raw;
    loop {
        let Some(open) = rest.find(['{', '}']) else {
            if !rest.is_empty() {
                pieces.push(Piece::Lit(rest.to_string()));
            }
            return Ok(pieces);
        };
        if rest[open..].starts_with('}') {
            return Err(unbalanced("}"));
        }
        if open > 0 {
            pieces.push(Piece::Lit(rest[..open].to_string()));
        }
        let after = &rest[open + 1..];
        let close = match after.find(['{', '}']) {
            Some(close) if after[close..].starts_with('}') => close,
            _ => return Err(unbalanced("{")),
        };
        match &after[..close] {
            "feed" => pieces.push(Piece::Feed),
            "type" => pieces.push(Piece::Type),
            other => {
                return Err(format!(
                    "unknown placeholder `{{{other}}}`: only {{feed}} and {{type}} are allowed"
                ))
            }
        }
        rest = &after[close + 1..];
    }
}

/// One open output file.
struct OpenFile {
    writer: BufWriter<File>,
    /// Written to since the last fsync.
    unsynced: bool,
}

/// A built file sink.
pub struct FileSink {
    name: String,
    template: Template,
    policy: FsyncPolicy,
    interval: Duration,
    /// Open handles by rendered path. Between batches every buffer is empty.
    files: HashMap<String, OpenFile>,
    /// Directories whose entries changed (a file or directory was created in them) and that
    /// are not yet fsynced.
    dirs_to_sync: HashSet<PathBuf>,
    /// Files a failed batch could not be truncated back yet: retried before the next write.
    pending_truncate: Vec<(PathBuf, u64)>,
    last_sync: Instant,
    /// Reused buffers.
    rendered: String,
    line: Vec<u8>,
}

impl FileSink {
    pub fn build(name: &str, c: &FileSinkConfig) -> Result<Self, SinkError> {
        let template = Template::parse(&c.path).map_err(|errors| SinkError::Config {
            sink: name.to_string(),
            message: format!("path `{}`: {}", c.path, errors.join("; ")),
        })?;
        Ok(FileSink {
            name: name.to_string(),
            template,
            policy: c.fsync,
            interval: c.fsync_interval,
            files: HashMap::new(),
            dirs_to_sync: HashSet::new(),
            pending_truncate: Vec::new(),
            last_sync: Instant::now(),
            rendered: String::new(),
            line: Vec::new(),
        })
    }

    fn io(&self, context: String, source: std::io::Error) -> SinkError {
        SinkError::Io {
            sink: self.name.clone(),
            context,
            source,
        }
    }

    fn config(&self, message: String) -> SinkError {
        SinkError::Config {
            sink: self.name.clone(),
            message,
        }
    }

    /// Finishes truncations left over from a failed rollback.
    fn apply_pending_truncations(&mut self) -> Result<(), SinkError> {
        while let Some((path, len)) = self.pending_truncate.last() {
            truncate_path(path, *len, self.policy != FsyncPolicy::Never).map_err(|e| {
                self.io(
                    format!(
                        "cannot undo a failed write to {} (truncate to {len} bytes)",
                        path.display()
                    ),
                    e,
                )
            })?;
            self.pending_truncate.pop();
        }
        Ok(())
    }

    /// Flushes, fsyncs if needed, and closes every handle. Stops at the first error, keeping
    /// the handles not yet closed.
    fn close_all(&mut self) -> Result<(), SinkError> {
        let keys: Vec<String> = self.files.keys().cloned().collect();
        let sync = self.policy != FsyncPolicy::Never;
        for key in keys {
            if let Some(f) = self.files.get_mut(&key) {
                let result = f.writer.flush().and_then(|()| {
                    if sync && f.unsynced {
                        f.writer.get_ref().sync_data()?;
                        f.unsynced = false;
                    }
                    Ok(())
                });
                if let Err(e) = result {
                    return Err(self.io(format!("cannot write {key}"), e));
                }
            }
            self.files.remove(&key);
        }
        Ok(())
    }

    /// Opens (creating it and its directories if needed) the file at `key` for appending.
    fn open(&mut self, key: &str) -> Result<OpenFile, SinkError> {
        let path = Path::new(key);
        if !self.template.is_confined(path) {
            return Err(self.config(format!(
                "refusing to write {key}: it is not under the base directory {}",
                self.template.base.display()
            )));
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !parent.is_dir() {
            let mut missing = Vec::new();
            let mut dir = Some(parent);
            while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
                missing.push(d.to_path_buf());
                dir = d.parent();
            }
            std::fs::create_dir_all(parent).map_err(|e| {
                self.io(
                    format!("cannot create the directory {}", parent.display()),
                    e,
                )
            })?;
            for d in missing {
                let up = match d.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                self.dirs_to_sync.insert(up);
            }
        }
        if let Ok(meta) = std::fs::metadata(path) {
            if !meta.is_file() {
                return Err(self.io(
                    format!("cannot open {key}"),
                    std::io::Error::other("it exists and is not a regular file"),
                ));
            }
        }
        let file = match OpenOptions::new().append(true).create_new(true).open(path) {
            Ok(f) => {
                self.dirs_to_sync.insert(parent.to_path_buf());
                f
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(|e| self.io(format!("cannot open {key}"), e))?,
            Err(e) => return Err(self.io(format!("cannot create {key}"), e)),
        };
        Ok(OpenFile {
            writer: BufWriter::with_capacity(64 * 1024, file),
            unsynced: false,
        })
    }

    /// Writes the batch; `touched` collects each file's length before its first write.
    fn write_batch(
        &mut self,
        events: &[Arc<Event>],
        touched: &mut HashMap<String, u64>,
    ) -> Result<(), SinkError> {
        for event in events {
            self.template
                .render(&event.feed, &event.event_type, &mut self.rendered)
                .map_err(|m| self.config(m))?;
            if !self.files.contains_key(self.rendered.as_str()) {
                if self.files.len() >= MAX_OPEN_FILES {
                    self.close_all()?;
                }
                let key = self.rendered.clone();
                let file = self.open(&key)?;
                self.files.insert(key, file);
            }
            let key = self.rendered.as_str();
            let Some(file) = self.files.get_mut(key) else {
                return Err(self.config(format!("internal error: {key} is not open")));
            };
            if !touched.contains_key(key) {
                // Buffers are empty between batches, so this is where the batch starts.
                match file.writer.get_ref().metadata() {
                    Ok(meta) => {
                        touched.insert(key.to_string(), meta.len());
                    }
                    Err(e) => {
                        let context = format!("cannot read the length of {key}");
                        return Err(self.io(context, e));
                    }
                }
            }
            self.line.clear();
            jsonl::encode(event, &mut self.line);
            file.unsynced = true;
            if let Err(e) = file.writer.write_all(&self.line) {
                let context = format!("cannot write {key}");
                return Err(self.io(context, e));
            }
        }
        for key in touched.keys() {
            let Some(file) = self.files.get_mut(key) else {
                continue; // closed (flushed and synced) when the handle cap was reached
            };
            if let Err(e) = file.writer.flush() {
                return Err(self.io(format!("cannot write {key}"), e));
            }
            if self.policy == FsyncPolicy::Always {
                if let Err(e) = file.writer.get_ref().sync_data() {
                    return Err(self.io(format!("cannot fsync {key}"), e));
                }
                file.unsynced = false;
            }
        }
        if self.policy == FsyncPolicy::Always {
            self.sync_dirs()?;
        }
        Ok(())
    }

    /// Undoes a failed batch: drops the unwritten buffers and truncates each touched file to
    /// its length before the batch. Files that cannot be truncated now are retried before
    /// the next write.
    fn rollback(&mut self, touched: HashMap<String, u64>) {
        let sync = self.policy != FsyncPolicy::Never;
        for (key, len) in touched {
            let result = match self.files.remove(&key) {
                Some(f) => {
                    let (file, _unwritten) = f.writer.into_parts();
                    file.set_len(len)
                        .and_then(|()| if sync { file.sync_data() } else { Ok(()) })
                }
                None => truncate_path(Path::new(&key), len, sync),
            };
            if let Err(e) = result {
                tracing::error!(
                    sink = %self.name,
                    path = %key,
                    error = %e,
                    "cannot truncate after a failed write; will retry before the next write"
                );
                self.pending_truncate.push((PathBuf::from(key), len));
            }
        }
    }

    /// Fsyncs every file written since its last fsync, and the changed directories.
    fn sync_all(&mut self) -> Result<(), SinkError> {
        for (key, f) in &mut self.files {
            if let Err(e) = f.writer.flush() {
                return Err(SinkError::Io {
                    sink: self.name.clone(),
                    context: format!("cannot write {key}"),
                    source: e,
                });
            }
            if f.unsynced {
                if let Err(e) = f.writer.get_ref().sync_data() {
                    return Err(SinkError::Io {
                        sink: self.name.clone(),
                        context: format!("cannot fsync {key}"),
                        source: e,
                    });
                }
                f.unsynced = false;
            }
        }
        self.sync_dirs()
    }

    fn sync_dirs(&mut self) -> Result<(), SinkError> {
        let dirs: Vec<PathBuf> = self.dirs_to_sync.iter().cloned().collect();
        for dir in dirs {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| self.io(format!("cannot fsync the directory {}", dir.display()), e))?;
            self.dirs_to_sync.remove(&dir);
        }
        Ok(())
    }
}

/// Truncates the file at `path` to `len` bytes (a missing file is fine).
fn truncate_path(path: &Path, len: u64, sync: bool) -> std::io::Result<()> {
    match OpenOptions::new().write(true).open(path) {
        Ok(f) => {
            f.set_len(len)?;
            if sync {
                f.sync_data()?;
            }
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl super::Sink for FileSink {
    fn write(&mut self, events: &[Arc<Event>]) -> Result<(), SinkError> {
        self.apply_pending_truncations()?;
        let mut touched = HashMap::new();
        let result = self.write_batch(events, &mut touched);
        if result.is_err() {
            self.rollback(touched);
        }
        result
    }

    fn tick(&mut self) -> Result<(), SinkError> {
        if self.policy == FsyncPolicy::Interval && self.last_sync.elapsed() >= self.interval {
            self.sync_all()?;
            self.last_sync = Instant::now();
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.apply_pending_truncations()?;
        self.sync_all()?;
        self.last_sync = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{Sink, SinkConfig};
    use chrono::Utc;

    fn event(feed: &str, event_type: &str, seq: u64, data: &str) -> Arc<Event> {
        Arc::new(Event {
            feed: Arc::from(feed),
            event_type: event_type.into(),
            data: data.into(),
            id: format!("id-{seq}"),
            received_at: Utc::now(),
            seq,
        })
    }

    fn config(path: &str, fsync: FsyncPolicy) -> FileSinkConfig {
        FileSinkConfig {
            path: path.into(),
            fsync,
            fsync_interval: Duration::from_secs(1),
            buffer: BufferConfig::default(),
        }
    }

    fn sink_in(dir: &Path, template: &str, fsync: FsyncPolicy) -> FileSink {
        let path = format!("{}/{template}", dir.display());
        let cfg = config(&path, fsync);
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        FileSink::build("archive", &cfg).unwrap()
    }

    fn read_events(path: &Path) -> Vec<Event> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| jsonl::decode(l).unwrap())
            .collect()
    }

    fn seqs(path: &Path) -> Vec<u64> {
        read_events(path).iter().map(|e| e.seq).collect()
    }

    fn errors(path: &str) -> Vec<String> {
        config(path, FsyncPolicy::Always)
            .validate()
            .into_iter()
            .map(|(k, m)| {
                assert_eq!(k, "path");
                m
            })
            .collect()
    }

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c: SinkConfig =
            toml::from_str("type = \"file\"\npath = \"data/{feed}.jsonl\"").unwrap();
        let SinkConfig::File(f) = &c else {
            panic!("not a file sink: {c:?}")
        };
        assert_eq!(f.fsync, FsyncPolicy::Always);
        assert_eq!(f.fsync_interval, Duration::from_secs(1));
        assert_eq!(f.buffer, BufferConfig::default());
        let c: SinkConfig = toml::from_str(
            "type = \"file\"\npath = \"x\"\nfsync = \"interval\"\nfsync_interval = \"250ms\"",
        )
        .unwrap();
        let SinkConfig::File(f) = &c else {
            panic!("not a file sink: {c:?}")
        };
        assert_eq!(f.fsync, FsyncPolicy::Interval);
        assert_eq!(f.fsync_interval, Duration::from_millis(250));
        assert!(
            toml::from_str::<SinkConfig>("type = \"file\"\npath = \"x\"\nfsnyc = \"never\"")
                .is_err()
        );
        assert!(toml::from_str::<SinkConfig>(
            "type = \"file\"\npath = \"x\"\nfsync = \"sometimes\""
        )
        .is_err());
    }

    #[test]
    fn valid_templates_and_their_base() {
        for (t, base, parts) in [
            ("data/events/{feed}.jsonl", "data/events", 1),
            ("{feed}/x.jsonl", ".", 2),
            ("x.jsonl", ".", 1),
            ("data/x.jsonl", "data", 1),
            ("data//{feed}/events/{type}.jsonl", "data", 3),
            ("/var/lib/b/{feed}-{type}.jsonl", "/var/lib/b", 1),
            ("/var/{feed}/x.jsonl", "/var", 2),
            ("/x.jsonl", "/", 1),
            ("d/.hidden-{feed}", "d", 1),
        ] {
            assert!(errors(t).is_empty(), "{t}: {:?}", errors(t));
            let tpl = Template::parse(t).unwrap();
            assert_eq!(tpl.base, Path::new(base), "{t}");
            assert_eq!(tpl.components.len(), parts, "{t}");
        }
    }

    #[test]
    fn invalid_templates() {
        for (t, expect) in [
            ("", "must not be empty"),
            ("../x", "`..`"),
            ("data/../../etc/x", "`..`"),
            ("/abs/../x", "`..`"),
            ("./x.jsonl", "`.`"),
            ("a/./b", "`.`"),
            ("data/{foo}.jsonl", "unknown placeholder `{foo}`"),
            ("data/{Feed}.jsonl", "unknown placeholder `{Feed}`"),
            ("data/{}.jsonl", "unknown placeholder `{}`"),
            ("data/{feed.jsonl", "unbalanced `{`"),
            ("data/{fe{feed}}.jsonl", "unbalanced `{`"),
            ("data/feed}.jsonl", "unbalanced `}`"),
            ("data/{fe/ed}.jsonl", "unbalanced"),
            ("data/", "must end with a file name"),
            ("/{type}/x.jsonl", "directly under `/`"),
            ("/{feed}.jsonl", "directly under `/`"),
        ] {
            let errs = errors(t);
            assert!(
                errs.iter().any(|e| e.contains(expect)),
                "{t}: expected {expect:?} in {errs:?}"
            );
        }
        let mut c = config("x", FsyncPolicy::Interval);
        c.fsync_interval = Duration::ZERO;
        assert_eq!(
            c.validate(),
            [(
                "fsync_interval".to_string(),
                "must be greater than zero".to_string()
            )]
        );
        assert!(FileSink::build("s", &config("../x", FsyncPolicy::Always)).is_err());
    }

    #[test]
    fn accepted_types() {
        let typed = config("data/{feed}/{type}.jsonl", FsyncPolicy::Always);
        for ok in ["message", "edit", "log.v2", "a-b_c", "A9", &"x".repeat(200)] {
            assert!(typed.accepts_type(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a\\b",
            "sp ace",
            "caf\u{e9}",
            "a\0",
            "{feed}",
            &"x".repeat(201),
        ] {
            assert!(!typed.accepts_type(bad), "{bad:?}");
        }
        // A file name over 255 bytes (with the longest feed name) is refused.
        let long = config("data/{feed}-{type}.jsonl", FsyncPolicy::Always);
        assert!(long.accepts_type(&"x".repeat(140)));
        assert!(!long.accepts_type(&"x".repeat(160)));
        // Without {type}, every type fits.
        let untyped = config("data/{feed}.jsonl", FsyncPolicy::Always);
        assert!(untyped.accepts_type("../../etc/passwd"));
        assert!(SinkConfig::File(typed).accepts_type("edit"));
    }

    #[test]
    fn events_go_to_files_by_feed_and_type() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink_in(dir.path(), "out/{feed}/{type}.jsonl", FsyncPolicy::Always);
        sink.write(&[
            event("a", "edit", 1, "one"),
            event("b", "edit", 1, "two\nlines"),
            event("a", "log", 2, "{\"json\":true}"),
            event("a", "edit", 3, ""),
        ])
        .unwrap();
        sink.write(&[event("a", "edit", 4, "four")]).unwrap();
        let out = dir.path().join("out");
        assert_eq!(seqs(&out.join("a/edit.jsonl")), [1, 3, 4]);
        assert_eq!(seqs(&out.join("a/log.jsonl")), [2]);
        assert_eq!(seqs(&out.join("b/edit.jsonl")), [1]);
        let b = read_events(&out.join("b/edit.jsonl"));
        assert_eq!(b[0].data, "two\nlines");
        assert_eq!(&*b[0].feed, "b");
        assert_eq!(b[0].event_type, "edit");
        assert_eq!(b[0].id, "id-1");
        sink.flush().unwrap();
        drop(sink);

        // A new sink appends; it never truncates.
        let mut sink = sink_in(dir.path(), "out/{feed}/{type}.jsonl", FsyncPolicy::Never);
        sink.write(&[event("a", "edit", 5, "five")]).unwrap();
        drop(sink); // dropped without flush: the data was already handed to the OS
        assert_eq!(seqs(&out.join("a/edit.jsonl")), [1, 3, 4, 5]);
    }

    #[test]
    fn one_file_for_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink_in(dir.path(), "all.jsonl", FsyncPolicy::Interval);
        sink.write(&[event("a", "x", 1, "1"), event("b", "../y", 1, "2")])
            .unwrap();
        sink.tick().unwrap();
        assert_eq!(seqs(&dir.path().join("all.jsonl")), [1, 1]);
    }

    #[test]
    fn unsafe_names_are_refused_at_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink_in(dir.path(), "out/{feed}/{type}.jsonl", FsyncPolicy::Always);
        for (feed, event_type) in [
            ("a", "../../escape"),
            ("a", ".."),
            ("a", "x/y"),
            ("..", "t"),
            ("a/b", "t"),
            ("", "t"),
        ] {
            let err = sink
                .write(&[event("ok", "fine", 1, "x"), event(feed, event_type, 2, "y")])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("sink `archive`") && err.contains("not usable"),
                "{err}"
            );
        }
        // The good event before the bad one was rolled back each time, buffered or not.
        sink.write(&[event("ok", "fine", 9, "z")]).unwrap();
        assert_eq!(seqs(&dir.path().join("out/ok/fine.jsonl")), [9]);
        let entries: Vec<_> = std::fs::read_dir(dir.path().join("out"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, ["ok"]);
        assert!(!dir.path().join("escape").exists());
    }

    #[test]
    fn rendered_paths_are_confined() {
        let tpl = Template::parse("/srv/data/{feed}/{type}.jsonl").unwrap();
        assert!(tpl.is_confined(Path::new("/srv/data/a/b.jsonl")));
        assert!(!tpl.is_confined(Path::new("/srv/data/../b.jsonl")));
        assert!(!tpl.is_confined(Path::new("/srv/data/a/../../b.jsonl")));
        assert!(!tpl.is_confined(Path::new("/srv/other/a/b.jsonl")));
        assert!(!tpl.is_confined(Path::new("/srv/data/a/b/c.jsonl")));
        let rel = Template::parse("{feed}/{type}.jsonl").unwrap();
        assert!(rel.is_confined(Path::new("a/b.jsonl")));
        assert!(!rel.is_confined(Path::new("/a/b.jsonl")));
        assert!(!rel.is_confined(Path::new("../b.jsonl")));
        let mut out = String::new();
        rel.render("f", "t", &mut out).unwrap();
        assert_eq!(out, "f/t.jsonl");
        tpl.render("f", "t", &mut out).unwrap();
        assert_eq!(out, "/srv/data/f/t.jsonl");
    }

    #[test]
    fn failed_write_rolls_back_and_retry_leaves_no_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink_in(dir.path(), "{feed}/{type}.jsonl", FsyncPolicy::Always);
        sink.write(&[event("f", "a", 1, "first")]).unwrap();
        let a = dir.path().join("f/a.jsonl");
        let before = std::fs::read(&a).unwrap();

        // A directory where the sink wants the file `f/b.jsonl`: opening it fails, for root too.
        let in_the_way = dir.path().join("f/b.jsonl");
        std::fs::create_dir(&in_the_way).unwrap();
        // Larger than the write buffer, so part of it reaches the file before the failure.
        let big = "x".repeat(200 * 1024);
        let batch = [
            event("f", "a", 2, &big),
            event("f", "b", 3, "blocked"),
            event("f", "a", 4, "after"),
        ];
        let err = sink.write(&batch).unwrap_err().to_string();
        assert!(
            err.contains("sink `archive`") && err.contains(&in_the_way.display().to_string()),
            "{err}"
        );
        assert_eq!(
            std::fs::read(&a).unwrap(),
            before,
            "rolled back to the old length"
        );
        // Retrying fails the same way, still without leaving anything behind.
        assert!(sink.write(&batch).is_err());
        assert_eq!(std::fs::read(&a).unwrap(), before);

        // Once the obstacle is gone, the retry stores the batch exactly once.
        std::fs::remove_dir(&in_the_way).unwrap();
        sink.write(&batch).unwrap();
        assert_eq!(seqs(&a), [1, 2, 4]);
        assert_eq!(read_events(&a)[1].data, big);
        assert_eq!(seqs(&in_the_way), [3]);
    }

    #[test]
    fn a_directory_in_the_way_of_a_parent_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink_in(dir.path(), "{feed}/{type}.jsonl", FsyncPolicy::Always);
        std::fs::write(dir.path().join("f"), "a file, not a directory").unwrap();
        let err = sink
            .write(&[event("f", "a", 1, "x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot create the directory"), "{err}");
    }

    #[test]
    fn many_files_stay_under_the_handle_cap() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink_in(dir.path(), "{feed}/{type}.jsonl", FsyncPolicy::Interval);
        let n = MAX_OPEN_FILES as u64 + 44;
        let batch: Vec<_> = (1..=n)
            .map(|i| event("f", &format!("t{i}"), i, "x"))
            .collect();
        sink.write(&batch).unwrap();
        assert!(sink.files.len() <= MAX_OPEN_FILES, "{}", sink.files.len());
        sink.write(&batch[..10]).unwrap();
        for i in 1..=n {
            let expected: Vec<u64> = if i <= 10 { vec![i, i] } else { vec![i] };
            assert_eq!(seqs(&dir.path().join(format!("f/t{i}.jsonl"))), expected);
        }
        sink.flush().unwrap();
        assert!(sink.files.values().all(|f| !f.unsynced));
    }

    #[test]
    fn fsync_policies_track_unsynced_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut always = sink_in(dir.path(), "a/{feed}.jsonl", FsyncPolicy::Always);
        always.write(&[event("f", "t", 1, "x")]).unwrap();
        assert!(always.files.values().all(|f| !f.unsynced));
        assert!(always.dirs_to_sync.is_empty(), "new directories synced too");

        let path = format!("{}/i/{{feed}}.jsonl", dir.path().display());
        let mut cfg = config(&path, FsyncPolicy::Interval);
        cfg.fsync_interval = Duration::from_millis(20);
        let mut interval = FileSink::build("i", &cfg).unwrap();
        interval.write(&[event("f", "t", 1, "x")]).unwrap();
        assert!(interval.files.values().all(|f| f.unsynced));
        assert!(!interval.dirs_to_sync.is_empty());
        // Flushed to the OS already: readable before any fsync.
        assert_eq!(seqs(&dir.path().join("i/f.jsonl")), [1]);
        std::thread::sleep(Duration::from_millis(30));
        interval.tick().unwrap();
        assert!(interval.files.values().all(|f| !f.unsynced));
        assert!(interval.dirs_to_sync.is_empty());

        let mut never = sink_in(dir.path(), "n/{feed}.jsonl", FsyncPolicy::Never);
        never.write(&[event("f", "t", 1, "x")]).unwrap();
        never.tick().unwrap();
        assert!(never.files.values().all(|f| f.unsynced));
        never.flush().unwrap();
        assert!(never.files.values().all(|f| !f.unsynced));
    }

    #[test]
    fn a_non_regular_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink_in(dir.path(), "{feed}.jsonl", FsyncPolicy::Always);
        std::fs::create_dir(dir.path().join("f.jsonl")).unwrap();
        let err = sink
            .write(&[event("f", "t", 1, "x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
