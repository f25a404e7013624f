//! `type = "file"`: JSON Lines files (format in [`jsonl`](super::jsonl)), one line per event,
//! with paths templated by feed and event type.
//!
//! Durability follows `fsync`: with `always` a batch is acknowledged (and the checkpoint may
//! move past it) only after every file it touched, and the directory entry of every file or
//! directory it created, is fsynced. A failed batch is rolled back: each file it touched is
//! truncated to its length before the batch, so the runner's retry never leaves a torn line
//! or a duplicate.
//!
//! Names built from event data are confined (ARCHITECTURE.md, "Hostile input and bounded
//! resources"): `{feed}` and `{type}` expand to their safe names ([`naming`]: percent-encoded,
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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, ErrorKind, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use chrono::format::{Item, Parsed, StrftimeItems};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc, Weekday};
use serde::{Deserialize, Serialize};

use super::{jsonl, naming, BufferConfig, SinkError};
use crate::config::units::ByteSize;
use crate::event::Event;

/// Open file handles kept per sink; when more are needed, all are closed first.
const MAX_OPEN_FILES: usize = 256;
/// Longest value a placeholder expands to, encoded.
const MAX_VALUE_LEN: usize = 200;
/// Longest feed name (the config loader enforces it); used to bound rendered file names.
const MAX_FEED_LEN: usize = 100;
/// Longest file name (one path component) on common filesystems, in bytes.
const MAX_COMPONENT_LEN: usize = 255;
/// The rotation stamp inserted into rotated file names: UTC, fixed width, sorts by time.
const STAMP_FORMAT: &str = "%Y-%m-%dT%H-%M-%S%.3fZ";
const STAMP_LEN: usize = 24;
/// Room a file name keeps for `.STAMP` when files are rotated by renaming.
const ROTATION_RESERVE: usize = 1 + STAMP_LEN;
/// Room a file name keeps for `.zst.tmp` when closed files are compressed.
const COMPRESS_RESERVE: usize = 8;
/// The encoded-line buffer keeps at most this capacity between batches (see `write_batch`).
const RETAINED_LINE_CAPACITY: usize = 1024 * 1024;
/// With `max_age`, how often every known file is checked, in seconds.
const AGE_SWEEP_SECS: i64 = 60;

/// `[sink.NAME]` with `type = "file"`: appends each event as one JSON line to a file whose
/// path is built from the feed and the event type.
///
/// ```toml
/// [sink.archive]
/// type = "file"
/// path = "data/events/{feed}/{type}.jsonl"
/// fsync = "always"
/// rotate_size = "100 MiB"
/// max_files = 20
/// compress = "zstd"
/// ```
///
/// Each line is a JSON object with the keys `feed`, `type`, `id`, `data` (a string, exactly as
/// the stream sent it), `received_at` (RFC 3339 UTC with microseconds) and `seq` (the bridge's
/// per-feed sequence number), in that order. Files are opened in append mode and held open.
/// They can be rotated by the bridge (`rotate_size`, `rotate_interval`, strftime fields in
/// `path`), or by an external tool: rename them away and have the bridge reopen its files
/// (SIGHUP; logrotate's `create` mode with a `postrotate` that sends it), or use
/// copy-and-truncate (logrotate's `copytruncate`).
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
    /// `{feed}` and `{type}` are written as safe names: every byte outside
    /// `A-Z a-z 0-9 . _ -` becomes `%XX` (uppercase hex of the UTF-8 byte), and so does a
    /// leading `.` (`été` -> `%C3%A9t%C3%A9`, `a/b` -> `a%2Fb`, `..` -> `%2E.`, `%` -> `%25`).
    /// The encoding is reversible, so every type has a file of its own. Only a type whose safe
    /// name is longer than 200 bytes, or would make a file name longer than 255 bytes, cannot
    /// be stored here: such events go to the default route (`[routing] default`) and are
    /// counted as misfits.
    ///
    /// A file name built from placeholders or strftime fields must end with a fixed
    /// extension (`{type}.jsonl`, not `{type}` or `{type}.{feed}`), so that no event type can
    /// name a file of another kind. `validate` also refuses a path that can name the state
    /// database, its `-wal`, `-shm` or `-journal` file, or the configuration file (for any
    /// feed, type or time, rotated and compressed names included).
    ///
    /// Below the base directory nothing is reached through a symbolic link: a link (or a
    /// FIFO, or anything but a regular file or directory) where the sink would write is an
    /// error naming it, and the feeds routed here are held back until it is moved away. A file
    /// ending inside a line is cut back to its last complete line only when that line is one
    /// of this sink's JSON lines; otherwise the sink refuses the file and cuts nothing.
    ///
    /// The file name (the last component only) may contain strftime fields, rendered in UTC
    /// when the events are written: `data/{feed}-%Y-%m-%d.jsonl` starts a new file every day
    /// at midnight UTC. The previous file is then closed, and treated as a rotated file
    /// (`compress`, `max_files`, `max_age`). The fields must name a date, and optionally a
    /// time, so that old files can be ordered: `%Y-%m-%d`, `%Y-%m-%dT%H`, `%G-W%V`, `%j`,
    /// `%s`… Fields that render a `/` or a control character (`%D`, `%x`, `%n`, `%t`) are
    /// refused; `%%` is a literal `%`.
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
    /// Rotate a file before it would grow past this size, e.g. `"100 MiB"`. Rotation happens
    /// only between events: the file is flushed (and fsynced unless `fsync = "never"`),
    /// closed and renamed with the UTC time of the rotation inserted before its extension
    /// (`events.jsonl` becomes `events.2026-11-24T08-30-00.123Z.jsonl`; a name without an
    /// extension gets the time appended), and the next event starts a new file at the path.
    /// The times increase strictly per file, so rotated files sort by age. A rotated file holds
    /// at most `rotate_size` bytes, or a single event larger than that. Default: no limit.
    #[serde(default)]
    pub rotate_size: Option<ByteSize>,
    /// Rotate files (as with `rotate_size`) when a multiple of this interval since the Unix
    /// epoch is crossed, in UTC: `"1h"` rotates at the top of each hour, `"1d"` at midnight
    /// UTC. A whole number of seconds. The rotation happens at the first write or check
    /// (about once a second) after the boundary, so the time in a rotated file's name is just
    /// past the end of the interval it holds; an empty file is not rotated. A file found at
    /// start is rotated first if it was last written in an earlier interval. Default: none.
    #[serde(default, with = "humantime_serde")]
    pub rotate_interval: Option<Duration>,
    /// Keep at most this many rotated files (compressed or not) per file: when there are
    /// more, the oldest are deleted. With strftime fields in `path`, the files of earlier
    /// periods count as rotated files of the current one. Files whose names do not follow the
    /// rotation scheme (such as `events.jsonl.1` from logrotate) are never deleted.
    /// Default: keep all.
    #[serde(default)]
    pub max_files: Option<usize>,
    /// Delete rotated files last modified longer ago than this, e.g. `"30d"` (a compressed
    /// file keeps the modification time of the file it was made from). Checked after every
    /// rotation and once a minute. Default: keep all.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Compress rotated files in the background: `none` (default), `gzip` (adds `.gz`) or
    /// `zstd` (adds `.zst`). The compressed file is written as `NAME.gz.tmp`, fsynced and
    /// renamed before the original is deleted, so a crash never loses data; files left
    /// uncompressed by a restart are compressed when the bridge next writes to that path.
    #[serde(default)]
    pub compress: Compress,
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

/// See [`FileSinkConfig::compress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    #[default]
    None,
    Gzip,
    Zstd,
}

impl Compress {
    /// The suffix a compressed file gets.
    fn suffix(self) -> &'static str {
        match self {
            Compress::None => "",
            Compress::Gzip => ".gz",
            Compress::Zstd => ".zst",
        }
    }
}

impl FileSinkConfig {
    /// A configuration with every optional key at its default.
    pub fn new(path: impl Into<String>) -> Self {
        FileSinkConfig {
            path: path.into(),
            fsync: FsyncPolicy::default(),
            fsync_interval: default_fsync_interval(),
            rotate_size: None,
            rotate_interval: None,
            max_files: None,
            max_age: None,
            compress: Compress::None,
            buffer: BufferConfig::default(),
        }
    }

    /// Offline checks; keys are relative to `[sink.NAME]`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        let mut issue = |key: &str, message: String| issues.push((key.to_string(), message));
        let timed = match Template::parse(&self.path, self.name_reserve()) {
            Ok(t) => {
                if let Some(m) = t.check_suffix() {
                    issue("path", m);
                }
                Some(!t.formats.is_empty())
            }
            Err(errors) => {
                for m in errors {
                    issue("path", m);
                }
                None
            }
        };
        if self.fsync_interval.is_zero() {
            issue("fsync_interval", "must be greater than zero".to_string());
        }
        if self.rotate_size == Some(ByteSize(0)) {
            issue(
                "rotate_size",
                "must be greater than zero; leave it out to never rotate by size".to_string(),
            );
        }
        if let Some(every) = self.rotate_interval {
            if every.as_secs() == 0 || every.subsec_nanos() != 0 {
                issue(
                    "rotate_interval",
                    "must be a whole number of seconds, at least 1s (such as \"1h\" or \"1d\")"
                        .to_string(),
                );
            }
        }
        if self.max_files == Some(0) {
            issue("max_files", "must be at least 1".to_string());
        }
        if self.max_age.is_some_and(|a| a.is_zero()) {
            issue("max_age", "must be greater than zero".to_string());
        }
        if timed == Some(false) && !self.rotates() {
            for (key, set) in [
                ("max_files", self.max_files.is_some()),
                ("max_age", self.max_age.is_some()),
                ("compress", self.compress != Compress::None),
            ] {
                if set {
                    issue(
                        key,
                        "has no effect: no file is ever rotated; set rotate_size or \
                         rotate_interval, or put strftime fields such as %Y-%m-%d in the file \
                         name of `path`"
                            .to_string(),
                    );
                }
            }
        }
        issues
    }

    /// Whether events of this type can be stored: always, unless the path uses `{type}` and
    /// the type would not make a safe file name.
    pub fn accepts_type(&self, t: &str) -> bool {
        if !self.path.contains("{type}") {
            return true;
        }
        Template::parse(&self.path, self.name_reserve()).is_ok_and(|tpl| tpl.accepts_type(t))
    }

    /// Whether some feed, event type and time could make this sink write `target` (made
    /// absolute against `cwd`), or rotate or compress a file to it: placeholders and strftime
    /// fields stand for anything within one path component, and rotated (`STEM.STAMP.EXT`),
    /// compressed (`.gz`, `.zst`) and temporary (`.tmp`) names count. Paths are compared
    /// after lexical normalisation, and also with the existing directories resolved.
    pub fn can_write_to(&self, target: &Path, cwd: &Path) -> bool {
        let Ok(template) = Template::parse(&self.path, self.name_reserve()) else {
            return false;
        };
        let target = absolute(target, cwd);
        let mut targets = vec![target.clone()];
        if let (Some(parent), Some(name)) = (target.parent(), target.file_name()) {
            if let Ok(real) = parent.canonicalize() {
                targets.push(real.join(name));
            }
        }
        let base = absolute(&template.base, cwd);
        let mut bases = vec![base.clone()];
        if let Ok(real) = base.canonicalize() {
            bases.push(real);
        }
        targets
            .iter()
            .any(|t| bases.iter().any(|b| template.matches(b, t)))
    }

    /// Whether files are rotated by renaming.
    fn rotates(&self) -> bool {
        self.rotate_size.is_some() || self.rotate_interval.is_some()
    }

    /// Bytes a rendered file name keeps free for what rotation and compression add.
    fn name_reserve(&self) -> usize {
        let mut reserve = 0;
        if self.rotates() {
            reserve += ROTATION_RESERVE;
        }
        if self.compress != Compress::None {
            reserve += COMPRESS_RESERVE;
        }
        reserve
    }
}

/// Whether `v` may replace a placeholder: not empty, and at most 200 bytes once encoded
/// into a safe name ([`naming`]: never `.` or `..`, never a separator).
fn is_encodable(v: &str) -> bool {
    !v.is_empty() && naming::encoded_len(v) <= MAX_VALUE_LEN
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Feed,
    Type,
    /// Strftime text: an index into [`Template::formats`].
    Time(usize),
}

/// A parsed `path` template.
#[derive(Debug, Clone)]
struct Template {
    /// The leading directories without placeholders (`.` when there are none).
    base: PathBuf,
    /// `base` as it starts a rendered path: with a trailing `/`, or empty for `.`.
    prefix: String,
    /// The components after the base; the last one is the file name, which ends with
    /// `Lit(ext)` when `ext` is not empty.
    components: Vec<Vec<Piece>>,
    uses_type: bool,
    /// The strftime texts of the file name, in order.
    formats: Arc<[String]>,
    /// The longest each format renders to.
    format_len: Vec<usize>,
    /// The file name's extension (from its last `.`, when what follows is plain text), kept
    /// last when a stamp is inserted: `.jsonl`, or empty.
    ext: String,
    /// Bytes the file name keeps free for rotation and compression suffixes.
    reserve: usize,
}

/// Times the strftime fields are tried with when a template is checked: a long month and
/// weekday name, single-digit fields, another year.
fn sample_times() -> Vec<DateTime<Utc>> {
    [
        (2026, 9, 30, 23, 59, 59, 999_999_999),
        (2026, 1, 2, 3, 4, 5, 6_000_000),
        (2031, 12, 31, 12, 0, 0, 0),
    ]
    .into_iter()
    .filter_map(|(y, mo, d, h, mi, s, n)| {
        NaiveDate::from_ymd_opt(y, mo, d)?
            .and_hms_nano_opt(h, mi, s, n)
            .map(|t| t.and_utc())
    })
    .collect()
}

/// Renders `format` at `t`; `None` when chrono cannot.
fn format_time(t: DateTime<Utc>, format: &str) -> Option<String> {
    let mut out = String::new();
    write!(out, "{}", t.format(format)).ok()?;
    Some(out)
}

/// Splits a file name into the part that may hold placeholders and strftime fields, and its
/// extension: from the last `.` (not the first character) when only plain text follows.
fn split_ext(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(i) if i > 0 && !name[i..].contains(['%', '{', '}']) => name.split_at(i),
        _ => (name, ""),
    }
}

impl Template {
    /// Parses and checks a template; the errors are complete sentences for `path`. `reserve`:
    /// bytes the rendered file name must keep free (rotation and compression suffixes).
    fn parse(s: &str, reserve: usize) -> Result<Template, Vec<String>> {
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
        let raws: Vec<&str> = s.split('/').filter(|c| !c.is_empty()).collect();
        let mut components = Vec::new();
        let mut formats = Vec::new();
        let mut ext = String::new();
        for (i, &raw) in raws.iter().enumerate() {
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
            let is_name = i + 1 == raws.len() && !s.ends_with('/');
            let parsed = if is_name {
                let (head, e) = split_ext(raw);
                ext = e.to_string();
                parse_component(head, Some(&mut formats)).map(|mut pieces| {
                    if !e.is_empty() {
                        pieces.push(Piece::Lit(e.to_string()));
                    }
                    pieces
                })
            } else {
                parse_component(raw, None)
            };
            match parsed {
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
        let samples = sample_times();
        let format_len = formats
            .iter()
            .map(|f| {
                samples
                    .iter()
                    .filter_map(|t| format_time(*t, f))
                    .map(|r| r.len())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let template = Template {
            base,
            prefix,
            components: components.split_off(base_len),
            uses_type,
            formats: formats.into(),
            format_len,
            ext,
            reserve,
        };
        template.check_lengths()?;
        template.check_time_order(raws.last().copied().unwrap_or(""))?;
        Ok(template)
    }

    /// The longest a component can render to, given the length of the event type.
    fn max_len(&self, component: &[Piece], type_len: usize) -> usize {
        component
            .iter()
            .map(|p| match p {
                Piece::Lit(l) => l.len(),
                Piece::Feed => MAX_FEED_LEN,
                Piece::Type => type_len,
                Piece::Time(i) => self.format_len.get(*i).copied().unwrap_or(0),
            })
            .sum()
    }

    /// The byte limit of component `i` once rendered.
    fn limit(&self, i: usize) -> usize {
        if i + 1 == self.components.len() {
            MAX_COMPONENT_LEN.saturating_sub(self.reserve)
        } else {
            MAX_COMPONENT_LEN
        }
    }

    /// Components without `{type}` must fit whatever the feed name and the time.
    fn check_lengths(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        for (i, c) in self.components.iter().enumerate() {
            if c.contains(&Piece::Type) {
                continue; // checked per event type by `accepts_type`
            }
            let len = self.max_len(c, 0);
            if len > self.limit(i) {
                let room = if self.reserve > 0 && i + 1 == self.components.len() {
                    format!(
                        ", leaving {} bytes for the rotation and compression suffixes",
                        self.reserve
                    )
                } else {
                    String::new()
                };
                errors.push(format!(
                    "`{}` can render to {len} bytes (with a feed name of {MAX_FEED_LEN} \
                     characters), over the {MAX_COMPONENT_LEN}-byte limit of a file name{room}",
                    literal_text(c)
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// With strftime fields, the file names of different periods must be told apart and
    /// ordered: each sample time must render to a name that parses back to a period start.
    fn check_time_order(&self, raw_name: &str) -> Result<(), Vec<String>> {
        if self.formats.is_empty() {
            return Ok(());
        }
        let series = self.series("feed", "type").map_err(|e| vec![e])?;
        for t in sample_times() {
            let t = t.naive_utc();
            let ok = series.head_at(t).is_some_and(
                |name| matches!(series.parse_head(&name), Some(Some(key)) if key <= t),
            );
            if !ok {
                return Err(vec![format!(
                    "the strftime fields of `{raw_name}` must name a date (and optionally a \
                     time) so that the files of different periods can be ordered, such as \
                     %Y-%m-%d, %Y-%m-%dT%H or %G-W%V; a weekday, a month name or an hour alone \
                     cannot be ordered"
                )]);
            }
        }
        Ok(())
    }

    /// A file name built from placeholders or strftime fields must end with the sink's own
    /// extension, so that no event type can name a file of another kind (a database, a
    /// config, `x.db-wal`).
    fn check_suffix(&self) -> Option<String> {
        let name = self.components.last()?;
        let templated = name.iter().any(|p| !matches!(p, Piece::Lit(_)));
        if !templated || self.ext.len() > 1 {
            return None;
        }
        Some(format!(
            "the file name `{}` is built from placeholders or strftime fields but does not end \
             with a fixed extension, so an event type could name any file (such as a database \
             beside it); end it with plain text after a `.`, such as `{}.jsonl`",
            self.name(),
            self.name().trim_end_matches('.')
        ))
    }

    /// Whether `target` (absolute, normalised) is a file this template can write, rotate or
    /// compress to, with the base directory at `base` (absolute).
    fn matches(&self, base: &Path, target: &Path) -> bool {
        let Ok(rest) = target.strip_prefix(base) else {
            return false;
        };
        let parts: Vec<String> = rest
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        let Some((name, dirs)) = parts.split_last() else {
            return false;
        };
        let Some((file, template_dirs)) = self.components.split_last() else {
            return false;
        };
        if dirs.len() != template_dirs.len()
            || !dirs
                .iter()
                .zip(template_dirs)
                .all(|(d, pieces)| glob_match(pieces, d))
        {
            return false;
        }
        // The name, or the name of a rotated file: the stem, `.STAMP`, the extension.
        let head: &[Piece] = match file.split_last() {
            Some((_ext, head)) if !self.ext.is_empty() => head,
            _ => file,
        };
        let mut rotated = head.to_vec();
        rotated.push(Piece::Lit(".".to_string()));
        rotated.push(Piece::Feed); // stands for the stamp: anything
        rotated.push(Piece::Lit(self.ext.clone()));
        let mut names = vec![name.as_str()];
        for suffix in [".tmp", ".gz", ".zst", ".gz.tmp", ".zst.tmp"] {
            if let Some(n) = name.strip_suffix(suffix) {
                names.push(n);
            }
        }
        names
            .iter()
            .any(|n| glob_match(file, n) || glob_match(&rotated, n))
    }

    /// Whether `t` can be rendered into this template: see [`FileSinkConfig::accepts_type`].
    fn accepts_type(&self, t: &str) -> bool {
        if !self.uses_type {
            return true;
        }
        is_encodable(t)
            && self
                .components
                .iter()
                .enumerate()
                .all(|(i, c)| self.max_len(c, naming::encoded_len(t)) <= self.limit(i))
    }

    /// Appends one rendered piece to `out`.
    fn push_piece(
        &self,
        piece: &Piece,
        feed: &str,
        event_type: &str,
        times: &[String],
        out: &mut String,
    ) -> Result<(), String> {
        match piece {
            Piece::Lit(l) => out.push_str(l),
            Piece::Feed if is_encodable(feed) => naming::encode_into(feed, out),
            Piece::Type if is_encodable(event_type) => naming::encode_into(event_type, out),
            Piece::Feed => return Err(format!("feed name {feed:?} is not usable in a path")),
            Piece::Type => {
                return Err(format!("event type {event_type:?} is not usable in a path"))
            }
            Piece::Time(i) => match times.get(*i) {
                Some(t) if !t.contains('/') => out.push_str(t),
                _ => {
                    return Err(format!(
                        "the time fields of `{}` cannot be rendered",
                        self.name()
                    ))
                }
            },
        }
        Ok(())
    }

    /// The file name part of the template, as written.
    fn name(&self) -> String {
        self.components
            .last()
            .map(|c| literal_text_with(c, &self.formats))
            .unwrap_or_default()
    }

    /// Renders the path for (`feed`, `event_type`) into `out`; `times` are the rendered
    /// strftime texts.
    fn render(
        &self,
        feed: &str,
        event_type: &str,
        times: &[String],
        out: &mut String,
    ) -> Result<(), String> {
        out.clear();
        out.push_str(&self.prefix);
        for (i, component) in self.components.iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            let start = out.len();
            for piece in component {
                self.push_piece(piece, feed, event_type, times, out)?;
            }
            if out.len() - start > self.limit(i) {
                return Err(format!(
                    "the file name for feed `{feed}` and type `{event_type}` would be longer \
                     than {} bytes",
                    self.limit(i)
                ));
            }
        }
        Ok(())
    }

    /// The family of files that (`feed`, `event_type`) writes to: its directory, and the file
    /// name with the strftime fields left open.
    fn series(&self, feed: &str, event_type: &str) -> Result<Series, String> {
        let Some((name, dirs)) = self.components.split_last() else {
            return Err("the path has no file name".to_string());
        };
        let mut dir_prefix = self.prefix.clone();
        for component in dirs {
            for piece in component {
                self.push_piece(piece, feed, event_type, &[], &mut dir_prefix)?;
            }
            dir_prefix.push('/');
        }
        let dir = match dir_prefix.strip_suffix('/') {
            Some("") => PathBuf::from("/"),
            Some(d) => PathBuf::from(d),
            None => PathBuf::from("."),
        };
        let name: &[Piece] = match name.split_last() {
            Some((_ext, head)) if !self.ext.is_empty() => head,
            _ => name,
        };
        let mut head: Vec<NamePiece> = Vec::new();
        for piece in name {
            if let Piece::Time(i) = piece {
                head.push(NamePiece::Time(*i));
                continue;
            }
            let mut text = String::new();
            self.push_piece(piece, feed, event_type, &[], &mut text)?;
            match head.last_mut() {
                Some(NamePiece::Lit(l)) => l.push_str(&text),
                _ => head.push(NamePiece::Lit(text)),
            }
        }
        let mut key = dir_prefix.clone();
        for piece in &head {
            match piece {
                NamePiece::Lit(l) => key.push_str(l),
                NamePiece::Time(i) => {
                    let _ = write!(key, "\u{1}{i}\u{1}");
                }
            }
        }
        key.push_str(&self.ext);
        Ok(Series {
            key,
            dir,
            dir_prefix,
            head,
            ext: self.ext.clone(),
            formats: self.formats.clone(),
        })
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

/// Whether `text` is what `pieces` can render to, a placeholder or strftime field standing
/// for any text.
fn glob_match(pieces: &[Piece], text: &str) -> bool {
    match pieces.split_first() {
        None => text.is_empty(),
        Some((Piece::Lit(l), rest)) => text
            .strip_prefix(l.as_str())
            .is_some_and(|t| glob_match(rest, t)),
        Some((_, rest)) => text
            .char_indices()
            .map(|(i, _)| i)
            .chain(std::iter::once(text.len()))
            .any(|i| glob_match(rest, &text[i..])),
    }
}

/// `path` made absolute against `cwd`, with `.` and `..` resolved lexically.
fn absolute(path: &Path, cwd: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn literal_text(component: &[Piece]) -> String {
    literal_text_with(component, &[])
}

/// A component as written in the template.
fn literal_text_with(component: &[Piece], formats: &[String]) -> String {
    component
        .iter()
        .map(|p| match p {
            Piece::Lit(l) => l.as_str(),
            Piece::Feed => "{feed}",
            Piece::Type => "{type}",
            Piece::Time(i) => formats.get(*i).map_or("%", String::as_str),
        })
        .collect()
}

/// Splits one path component into literal text and placeholders. `formats`: where the
/// strftime texts of the file name go; `None` for a directory, where `%` is refused.
fn parse_component(raw: &str, mut formats: Option<&mut Vec<String>>) -> Result<Vec<Piece>, String> {
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
                push_text(&mut pieces, rest, raw, formats.as_deref_mut())?;
            }
            return Ok(pieces);
        };
        if rest[open..].starts_with('}') {
            return Err(unbalanced("}"));
        }
        if open > 0 {
            push_text(&mut pieces, &rest[..open], raw, formats.as_deref_mut())?;
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

/// Adds literal template text, which may hold strftime fields.
fn push_text(
    pieces: &mut Vec<Piece>,
    text: &str,
    raw: &str,
    formats: Option<&mut Vec<String>>,
) -> Result<(), String> {
    if !text.contains('%') {
        pieces.push(Piece::Lit(text.to_string()));
        return Ok(());
    }
    let Some(formats) = formats else {
        return Err(format!(
            "`{raw}`: strftime fields (`%`) are only allowed in the file name, not in a \
             directory"
        ));
    };
    let items: Vec<Item> = StrftimeItems::new(text).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(format!(
            "`{raw}`: `{text}` is not a valid strftime format (write `%%` for a literal `%`)"
        ));
    }
    let mut rendered = None;
    for t in sample_times() {
        let Some(r) = format_time(t, text) else {
            return Err(format!(
                "`{raw}`: the strftime fields in `{text}` cannot be rendered"
            ));
        };
        if r.contains('/') || r.chars().any(char::is_control) {
            return Err(format!(
                "`{raw}`: the strftime fields in `{text}` would put `/` or a control character \
                 in the file name (as %D, %x, %n and %t do); use fields such as %Y-%m-%d"
            ));
        }
        rendered = Some(r);
    }
    let has_fields = items
        .iter()
        .any(|i| matches!(i, Item::Numeric(..) | Item::Fixed(..)));
    if has_fields {
        formats.push(text.to_string());
        pieces.push(Piece::Time(formats.len() - 1));
    } else {
        // Only `%%` and the like: constant text.
        pieces.push(Piece::Lit(rendered.unwrap_or_default()));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum NamePiece {
    Lit(String),
    Time(usize),
}

/// The files one rendered path stands for: the active file at the path, the files it was
/// rotated to (`HEAD.STAMP.EXT`), with strftime fields the files of other periods
/// (`HEAD'.EXT`, `HEAD'.STAMP.EXT`), and their compressed copies (`.gz`, `.zst`).
#[derive(Debug)]
struct Series {
    /// Identifies the series: the directory and the file name with its fields left open.
    key: String,
    /// The directory, for listing (`.` for the working directory).
    dir: PathBuf,
    /// What a file name in it is prefixed with to make a path, as rendered paths are.
    dir_prefix: String,
    /// The file name without its extension.
    head: Vec<NamePiece>,
    ext: String,
    formats: Arc<[String]>,
}

/// A file of a series, as recognised from its name.
#[derive(Debug, PartialEq, Eq)]
struct Member {
    /// The name without a compression suffix.
    logical: String,
    compressed: Option<Compress>,
    /// With strftime fields: the start of the period in the name.
    period: Option<NaiveDateTime>,
    /// The rotation stamp (milliseconds since the epoch), for a rotated file.
    stamp: Option<i64>,
}

impl Series {
    fn has_time(&self) -> bool {
        self.head.iter().any(|p| matches!(p, NamePiece::Time(_)))
    }

    fn path_of(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{}{name}", self.dir_prefix))
    }

    /// The active path for the rendered strftime texts `times`.
    fn active_path(&self, times: &[String]) -> String {
        let mut out = self.dir_prefix.clone();
        for piece in &self.head {
            match piece {
                NamePiece::Lit(l) => out.push_str(l),
                NamePiece::Time(i) => out.push_str(times.get(*i).map_or("", String::as_str)),
            }
        }
        out.push_str(&self.ext);
        out
    }

    /// The file name head for time `t`.
    fn head_at(&self, t: NaiveDateTime) -> Option<String> {
        let mut out = String::new();
        for piece in &self.head {
            match piece {
                NamePiece::Lit(l) => out.push_str(l),
                NamePiece::Time(i) => {
                    out.push_str(&format_time(t.and_utc(), self.formats.get(*i)?)?)
                }
            }
        }
        Some(out)
    }

    /// Whether `head` is this series' file name head: `Some(period)` if so, the period being
    /// `None` without strftime fields.
    fn parse_head(&self, head: &str) -> Option<Option<NaiveDateTime>> {
        if !self.has_time() {
            let mut rest = head;
            for piece in &self.head {
                if let NamePiece::Lit(l) = piece {
                    rest = rest.strip_prefix(l.as_str())?;
                }
            }
            return rest.is_empty().then_some(None);
        }
        let mut items = Vec::new();
        for piece in &self.head {
            match piece {
                NamePiece::Lit(l) => items.push(Item::Literal(l.as_str())),
                NamePiece::Time(i) => items.extend(StrftimeItems::new(self.formats.get(*i)?)),
            }
        }
        let mut parsed = Parsed::new();
        chrono::format::parse(&mut parsed, head, items.iter()).ok()?;
        let period = period_start(&parsed)?;
        // Only names this series would write: no other spelling of the same time.
        (self.head_at(period)? == head).then_some(Some(period))
    }

    /// The period of time `now`, with strftime fields.
    fn period_at(&self, now: DateTime<Utc>) -> Option<NaiveDateTime> {
        self.parse_head(&self.head_at(now.naive_utc())?).flatten()
    }

    /// Recognises a file name of this series.
    fn classify(&self, name: &str) -> Option<Member> {
        let (logical, compressed) = if let Some(n) = name.strip_suffix(".gz") {
            (n, Some(Compress::Gzip))
        } else if let Some(n) = name.strip_suffix(".zst") {
            (n, Some(Compress::Zstd))
        } else {
            (name, None)
        };
        let rest = logical.strip_suffix(self.ext.as_str())?;
        if rest.len() > ROTATION_RESERVE {
            let split = rest.len() - ROTATION_RESERVE;
            if rest.is_char_boundary(split) {
                let (head, tail) = rest.split_at(split);
                if let Some(stamp) = tail.strip_prefix('.').and_then(parse_stamp) {
                    if let Some(period) = self.parse_head(head) {
                        return Some(Member {
                            logical: logical.to_string(),
                            compressed,
                            period,
                            stamp: Some(stamp),
                        });
                    }
                }
            }
        }
        let period = self.parse_head(rest)?;
        Some(Member {
            logical: logical.to_string(),
            compressed,
            period,
            stamp: None,
        })
    }
}

/// The start of the period a parsed file name names: unset fields below the ones given
/// default to their lowest value (`%Y-%m` is the 1st at 00:00).
fn period_start(parsed: &Parsed) -> Option<NaiveDateTime> {
    if parsed.timestamp().is_some() {
        return parsed.to_naive_datetime_with_offset(0).ok();
    }
    let mut p = parsed.clone();
    if p.isoweek().is_some() || p.week_from_mon().is_some() || p.week_from_sun().is_some() {
        if p.weekday().is_none() {
            let first = if p.week_from_sun().is_some() {
                Weekday::Sun
            } else {
                Weekday::Mon
            };
            p.set_weekday(first).ok()?;
        }
    } else if p.ordinal().is_none() {
        if p.month().is_none() {
            p.set_month(1).ok()?;
        }
        if p.day().is_none() {
            p.set_day(1).ok()?;
        }
    }
    if p.hour_div_12().is_none() && p.hour_mod_12().is_none() {
        p.set_hour(0).ok()?;
    }
    if p.minute().is_none() {
        p.set_minute(0).ok()?;
    }
    if p.second().is_none() {
        p.set_second(0).ok()?;
    }
    if p.nanosecond().is_none() {
        p.set_nanosecond(0).ok()?;
    }
    Some(p.to_naive_date().ok()?.and_time(p.to_naive_time().ok()?))
}

/// The rotation stamp for `ms` milliseconds since the epoch.
fn format_stamp(ms: i64) -> Option<String> {
    let s = format_time(DateTime::<Utc>::from_timestamp_millis(ms)?, STAMP_FORMAT)?;
    (s.len() == STAMP_LEN).then_some(s)
}

fn parse_stamp(s: &str) -> Option<i64> {
    if s.len() != STAMP_LEN {
        return None;
    }
    let ms = NaiveDateTime::parse_from_str(s, STAMP_FORMAT)
        .ok()?
        .and_utc()
        .timestamp_millis();
    (format_stamp(ms)? == s).then_some(ms)
}

/// The path `key` (which ends with `ext`) is rotated to.
fn rotated_name(key: &str, ext: &str, stamp: &str) -> String {
    let stem = key.strip_suffix(ext).unwrap_or(key);
    format!("{stem}.{stamp}{ext}")
}

/// The number of the `every`-second interval (since the epoch) that `t` falls in.
fn period_index(t: DateTime<Utc>, every: i64) -> i64 {
    t.timestamp().div_euclid(every.max(1))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// The wall clock, replaceable in tests.
type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// One open output file.
struct OpenFile {
    writer: BufWriter<File>,
    /// Written to since the last fsync.
    unsynced: bool,
    /// Length including buffered bytes.
    len: u64,
    /// With `rotate_interval`: the interval the data in the file belongs to (`None` while
    /// the file is empty).
    period: Option<i64>,
    series: Arc<Series>,
}

/// A rotation done by the batch in progress.
struct Rotated {
    key: String,
    rotated: PathBuf,
    series: Arc<Series>,
}

/// What a batch did, to commit or undo it.
#[derive(Default)]
struct Batch {
    /// Each file's length before the batch's first write to it.
    touched: HashMap<String, u64>,
    rotations: Vec<Rotated>,
}

/// A step of undoing a failed batch; retried before the next write until it succeeds.
#[derive(Debug)]
enum Undo {
    Rename { from: PathBuf, to: PathBuf },
    Truncate { path: PathBuf, len: u64 },
}

/// Who may touch which file: the sink thread and the helper thread.
#[derive(Debug, Default)]
struct Claims {
    /// Paths the sink has open, is rotating, or may rename back.
    in_use: HashSet<PathBuf>,
    /// Paths the helper is compressing or deleting.
    claimed: HashSet<PathBuf>,
}

fn lock(claims: &Mutex<Claims>) -> MutexGuard<'_, Claims> {
    claims
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

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
    /// Reused buffers.
    rendered: String,
    line: Vec<u8>,
    encoder: jsonl::Encoder,
}

impl FileSink {
    pub fn build(name: &str, c: &FileSinkConfig) -> Result<Self, SinkError> {
        Self::build_with_clock(name, c, Arc::new(Utc::now))
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

    fn config(&self, message: String) -> SinkError {
        SinkError::Config {
            sink: self.name.clone(),
            message,
        }
    }

    /// Marks `path` as in use by the sink, so the helper leaves it alone.
    fn hold(&self, path: &Path) {
        if let Some(m) = &self.maintenance {
            lock(&m.claims).in_use.insert(path.to_path_buf());
        }
    }

    /// Like [`hold`](Self::hold), but fails while the helper is working on `path`.
    fn hold_to_write(&self, path: &Path) -> Result<(), SinkError> {
        if let Some(m) = &self.maintenance {
            let mut claims = lock(&m.claims);
            if claims.claimed.contains(path) {
                return Err(self.io(
                    format!("cannot open {}", path.display()),
                    std::io::Error::other(
                        "it is being compressed or deleted as an old file (did the clock go \
                         back?); retrying",
                    ),
                ));
            }
            claims.in_use.insert(path.to_path_buf());
        }
        Ok(())
    }

    fn release(&self, path: &Path) {
        if let Some(m) = &self.maintenance {
            lock(&m.claims).in_use.remove(path);
        }
    }

    fn request_sweep(&self, series: &Arc<Series>) {
        if let Some(m) = &self.maintenance {
            m.sweep(series.clone());
        }
    }

    /// Finishes the undo of a failed batch.
    fn apply_pending_undo(&mut self) -> Result<(), SinkError> {
        let sync = self.policy != FsyncPolicy::Never;
        while let Some(step) = self.pending_undo.front() {
            let result = match step {
                Undo::Rename { from, to } => std::fs::rename(from, to).map(|()| {
                    self.dirs_to_sync.insert(parent_dir(to));
                }),
                Undo::Truncate { path, len } => truncate_path(path, *len, sync),
            };
            if let Err(e) = result {
                let context = match step {
                    Undo::Rename { from, to } => format!(
                        "cannot undo a rotation of a failed write (rename {} back to {})",
                        from.display(),
                        to.display()
                    ),
                    Undo::Truncate { path, len } => format!(
                        "cannot undo a failed write to {} (truncate to {len} bytes)",
                        path.display()
                    ),
                };
                return Err(self.io(context, e));
            }
            self.pending_undo.pop_front();
        }
        for path in std::mem::take(&mut self.undo_held) {
            self.release(&path);
        }
        Ok(())
    }

    /// Flushes, fsyncs (unless `fsync = "never"`) and closes the handle of `key`, keeping it
    /// in use when `keep_held`. On failure the handle stays open.
    fn close_file(&mut self, key: &str, keep_held: bool) -> Result<Option<Arc<Series>>, SinkError> {
        let Some(mut f) = self.files.remove(key) else {
            return Ok(None);
        };
        let sync = self.policy != FsyncPolicy::Never;
        let result = f.writer.flush().and_then(|()| {
            if sync && f.unsynced {
                f.writer.get_ref().sync_data()?;
                f.unsynced = false;
            }
            Ok(())
        });
        if let Err(e) = result {
            self.files.insert(key.to_string(), f);
            return Err(self.io(format!("cannot write {key}"), e));
        }
        if !keep_held {
            self.release(Path::new(key));
        }
        Ok(Some(f.series))
    }

    /// Flushes, fsyncs if needed, and closes every handle. Stops at the first error, keeping
    /// the handles not yet closed.
    fn close_all(&mut self) -> Result<(), SinkError> {
        let keys: Vec<String> = self.files.keys().cloned().collect();
        for key in keys {
            self.close_file(&key, false)?;
        }
        Ok(())
    }

    /// The series of (`feed`, `event_type`); the first time one is seen, the helper is asked
    /// to look at its old files (compression or retention left over from an earlier run).
    fn series_for(&mut self, feed: &str, event_type: &str) -> Result<Arc<Series>, SinkError> {
        let series = self
            .template
            .series(feed, event_type)
            .map_err(|m| self.config(m))?;
        if let Some(known) = self.series.get(&series.key) {
            return Ok(known.clone());
        }
        let series = Arc::new(series);
        self.series.insert(series.key.clone(), series.clone());
        self.request_sweep(&series);
        Ok(series)
    }

    /// Opens (creating it and its directories if needed) the file at `key` for appending.
    fn open(&mut self, key: &str, feed: &str, event_type: &str) -> Result<OpenFile, SinkError> {
        let series = self.series_for(feed, event_type)?;
        let path = Path::new(key);
        if !self.template.is_confined(path) {
            return Err(self.config(format!(
                "refusing to write {key}: it is not under the base directory {}",
                self.template.base.display()
            )));
        }
        self.hold_to_write(path)?;
        let opened = self.open_file(key).and_then(|file| {
            let meta = file
                .metadata()
                .map_err(|e| self.io(format!("cannot read the length of {key}"), e))?;
            Ok((file, meta))
        });
        let (file, meta) = match opened {
            Ok(f) => f,
            Err(e) => {
                self.release(path);
                return Err(e);
            }
        };
        let len = meta.len();
        let period = match (self.rotate_every, meta.modified()) {
            (Some(every), Ok(modified)) if len > 0 => {
                Some(period_index(DateTime::<Utc>::from(modified), every))
            }
            _ => None,
        };
        Ok(OpenFile {
            writer: BufWriter::with_capacity(64 * 1024, file),
            unsynced: false,
            len,
            period,
            series,
        })
    }

    /// Opens `key` for appending, creating it and its directories when missing. Below the
    /// template's base directory (which the operator chose, and which may be a symbolic link)
    /// nothing is followed: each directory is opened relative to its parent with
    /// `O_NOFOLLOW`, and so is the file, so a link planted in the sink's tree can neither
    /// redirect a write nor a truncation (ARCHITECTURE.md, "Hostile input and bounded
    /// resources"). `O_NONBLOCK` keeps a FIFO planted at the path from hanging the sink.
    fn open_file(&mut self, key: &str) -> Result<File, SinkError> {
        use rustix::fs::{Mode, OFlags};
        use rustix::io::Errno;
        let path = Path::new(key);
        let base = self.template.base.clone();
        let rest = if base == Path::new(".") {
            path
        } else {
            path.strip_prefix(&base).map_err(|_| {
                self.config(format!(
                    "refusing to write {key}: it is not under the base directory {}",
                    base.display()
                ))
            })?
        };
        let parts: Vec<&std::ffi::OsStr> = rest.iter().collect();
        let Some((name, dirs)) = parts.split_last() else {
            return Err(self.config(format!("refusing to write {key}: it has no file name")));
        };
        if !base.is_dir() {
            let mut missing = Vec::new();
            let mut dir = Some(base.as_path());
            while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
                missing.push(d.to_path_buf());
                dir = d.parent();
            }
            std::fs::create_dir_all(&base).map_err(|e| {
                self.io(format!("cannot create the directory {}", base.display()), e)
            })?;
            for d in missing {
                self.dirs_to_sync.insert(parent_dir(&d));
            }
        }
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let mut dir = rustix::fs::open(&base, dir_flags, Mode::empty()).map_err(|e| {
            self.io(
                format!("cannot open the directory {}", base.display()),
                e.into(),
            )
        })?;
        let mut dir_path = base.clone();
        for &component in dirs {
            let child = dir_path.join(component);
            let flags = dir_flags | OFlags::NOFOLLOW;
            let opened = match rustix::fs::openat(&dir, component, flags, Mode::empty()) {
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(&dir, component, Mode::from_raw_mode(0o777)) {
                        Ok(()) => {
                            self.dirs_to_sync.insert(dir_path.clone());
                        }
                        Err(Errno::EXIST) => {}
                        Err(e) => {
                            return Err(self.io(
                                format!("cannot create the directory {}", child.display()),
                                e.into(),
                            ))
                        }
                    }
                    rustix::fs::openat(&dir, component, flags, Mode::empty())
                }
                other => other,
            };
            dir = match opened {
                Ok(fd) => fd,
                Err(e @ (Errno::LOOP | Errno::NOTDIR)) => {
                    return Err(if is_symlink_at(&dir, component) {
                        self.symlink_error(&child)
                    } else {
                        self.io(
                            format!("cannot create the directory {}", child.display()),
                            std::io::Error::other(format!(
                                "it exists and is not a directory ({e})"
                            )),
                        )
                    });
                }
                Err(e) => {
                    return Err(self.io(
                        format!("cannot open the directory {}", child.display()),
                        e.into(),
                    ))
                }
            };
            dir_path = child;
        }
        let no_follow = OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let create = OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::EXCL | no_follow;
        match rustix::fs::openat(&dir, *name, create, Mode::from_raw_mode(0o666)) {
            Ok(fd) => {
                self.dirs_to_sync.insert(dir_path);
                Ok(File::from(fd))
            }
            Err(Errno::EXIST) => {
                let opened = rustix::fs::openat(
                    &dir,
                    *name,
                    OFlags::RDWR | OFlags::APPEND | no_follow,
                    Mode::empty(),
                );
                let file = match opened {
                    Ok(fd) => File::from(fd),
                    Err(Errno::LOOP) => return Err(self.symlink_error(path)),
                    Err(Errno::ISDIR | Errno::NXIO) => return Err(self.not_regular(key)),
                    Err(e) => return Err(self.io(format!("cannot open {key}"), e.into())),
                };
                let meta = file
                    .metadata()
                    .map_err(|e| self.io(format!("cannot open {key}"), e))?;
                if !meta.is_file() {
                    return Err(self.not_regular(key));
                }
                self.cut_torn_tail(&file, key)?;
                Ok(file)
            }
            Err(Errno::LOOP) => Err(self.symlink_error(path)),
            Err(e) => Err(self.io(format!("cannot create {key}"), e.into())),
        }
    }

    fn symlink_error(&self, path: &Path) -> SinkError {
        self.io(
            format!("refusing to write {}", path.display()),
            std::io::Error::other("it is a symbolic link; the file sink never follows links"),
        )
    }

    fn not_regular(&self, key: &str) -> SinkError {
        self.io(
            format!("cannot open {key}"),
            std::io::Error::other("it exists and is not a regular file"),
        )
    }

    /// A crash can leave a file ending inside a line: kill -9 can cut a large write short
    /// (Linux stops copying at a page boundary when a fatal signal arrives), a power loss can
    /// lose the end of what was written. That batch was never acknowledged (a batch is
    /// acknowledged only once written whole), so its events are fetched again after the
    /// restart; the unfinished line is cut off here, before anything is appended to it.
    fn cut_torn_tail(&self, file: &File, key: &str) -> Result<(), SinkError> {
        use std::os::unix::fs::FileExt;
        let len = file
            .metadata()
            .map_err(|e| self.io(format!("cannot read the length of {key}"), e))?
            .len();
        let mut block = vec![0u8; 64 * 1024];
        let mut end = len;
        let keep = loop {
            if end == 0 {
                break 0;
            }
            let start = end.saturating_sub(block.len() as u64);
            let buf = &mut block[..(end - start) as usize];
            file.read_exact_at(buf, start)
                .map_err(|e| self.io(format!("cannot read {key}"), e))?;
            if end == len && buf.last() == Some(&b'\n') {
                return Ok(());
            }
            if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
                break start + i as u64 + 1;
            }
            end = start;
        };
        if !self.is_own_tail(file, key, keep, len)? {
            return Err(self.io(
                format!("refusing to append to {key}"),
                std::io::Error::other(
                    "its last line is not a JSON line written by this sink; nothing was cut. \
                     Move the file away (or fix its end) and the sink goes on",
                ),
            ));
        }
        file.set_len(keep)
            .and_then(|()| {
                if self.policy != FsyncPolicy::Never {
                    file.sync_data()
                } else {
                    Ok(())
                }
            })
            .map_err(|e| self.io(format!("cannot cut the unfinished last line of {key}"), e))?;
        tracing::warn!(
            sink = %self.name,
            path = %key,
            bytes = len - keep,
            "the file ended inside a line (a write cut short by a crash); cut that unfinished line, whose events are fetched again"
        );
        Ok(())
    }

    /// Whether the file ending with the unfinished line at `keep..len` is this sink's own, so
    /// that cutting that line cannot destroy anything else: its last complete line decodes
    /// as one of the sink's JSON lines, or, with no complete line, what is there is the start
    /// of one. A last line too long to decode in memory is judged by its start and end.
    fn is_own_tail(&self, file: &File, key: &str, keep: u64, len: u64) -> Result<bool, SinkError> {
        use std::os::unix::fs::FileExt;
        const START: &[u8] = b"{\"feed\":";
        const MAX_DECODED: u64 = 64 * 1024 * 1024;
        let read = |buf: &mut [u8], at: u64| {
            file.read_exact_at(buf, at)
                .map_err(|e| self.io(format!("cannot read {key}"), e))
        };
        if keep == 0 {
            let mut head = vec![0u8; START.len().min(len as usize)];
            read(&mut head, 0)?;
            return Ok(START.starts_with(&head));
        }
        // The start of the last complete line: just after the newline before it.
        let line_end = keep - 1;
        let mut block = vec![0u8; 64 * 1024];
        let mut end = line_end;
        let line_start = loop {
            if end == 0 {
                break 0;
            }
            let start = end.saturating_sub(block.len() as u64);
            let buf = &mut block[..(end - start) as usize];
            read(buf, start)?;
            if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
                break start + i as u64 + 1;
            }
            end = start;
        };
        let line_len = line_end - line_start;
        if line_len > MAX_DECODED {
            let mut head = vec![0u8; START.len()];
            read(&mut head, line_start)?;
            let mut last = [0u8; 1];
            read(&mut last, line_end - 1)?;
            return Ok(head == START && last == *b"}");
        }
        let mut line = vec![0u8; line_len as usize];
        read(&mut line, line_start)?;
        Ok(std::str::from_utf8(&line).is_ok_and(|l| jsonl::decode(l).is_ok()))
    }

    /// A free name to rotate `key` to: its stamp is now, or just after the newest stamp of
    /// the series if the clock is behind it, so names always sort by age.
    fn rotation_target(
        &mut self,
        key: &str,
        series: &Series,
        now: DateTime<Utc>,
    ) -> Result<PathBuf, SinkError> {
        let newest = match self.last_stamp.get(&series.key) {
            Some(&ms) => ms,
            None => newest_stamp(series),
        };
        let first = now.timestamp_millis().max(newest.saturating_add(1));
        for ms in first..first.saturating_add(10_000) {
            let Some(stamp) = format_stamp(ms) else { break };
            let target = rotated_name(key, &series.ext, &stamp);
            let taken = ["", ".gz", ".zst", ".gz.tmp", ".zst.tmp"].iter().any(|s| {
                Path::new(&format!("{target}{s}"))
                    .symlink_metadata()
                    .is_ok()
            });
            if !taken {
                self.last_stamp.insert(series.key.clone(), ms);
                return Ok(PathBuf::from(target));
            }
        }
        Err(self.config(format!("cannot find a free name to rotate {key} to")))
    }

    /// Rotates the open file `key`: flush, fsync per policy, close, rename. The new name
    /// stays in use (the caller releases it); the next write to `key` starts a new file.
    fn rotate(&mut self, key: &str, now: DateTime<Utc>) -> Result<PathBuf, SinkError> {
        let Some(series) = self.files.get(key).map(|f| f.series.clone()) else {
            return Err(self.config(format!("internal error: {key} is not open")));
        };
        // Still in use until renamed: the helper must not take it meanwhile.
        self.close_file(key, true)?;
        let target = self.rotation_target(key, &series, now);
        let result = target.and_then(|target| {
            self.hold(&target);
            match std::fs::rename(key, &target) {
                Ok(()) => Ok(target),
                Err(e) => {
                    self.release(&target);
                    Err(self.io(format!("cannot rotate {key} to {}", target.display()), e))
                }
            }
        });
        self.release(Path::new(key));
        let target = result?;
        self.dirs_to_sync.insert(parent_dir(Path::new(key)));
        tracing::debug!(sink = %self.name, from = key, to = %target.display(), "file rotated");
        Ok(target)
    }

    /// Renders the strftime texts for `now`; true when they changed.
    fn refresh_times(&mut self, now: DateTime<Utc>) -> Result<bool, SinkError> {
        if self.template.formats.is_empty() {
            return Ok(false);
        }
        let mut fresh = Vec::with_capacity(self.template.formats.len());
        for f in self.template.formats.iter() {
            match format_time(now, f) {
                Some(t) if !t.contains('/') => fresh.push(t),
                _ => return Err(self.config(format!("cannot render the time fields `{f}`"))),
            }
        }
        if fresh == self.times {
            return Ok(false);
        }
        self.times = fresh;
        Ok(true)
    }

    /// Time-based rotation of the open files: files of a period whose strftime name is no
    /// longer current are closed, and files whose `rotate_interval` ended are rotated.
    fn roll_over(&mut self, now: DateTime<Utc>) -> Result<(), SinkError> {
        if self.refresh_times(now)? {
            let stale: Vec<String> = self
                .files
                .iter()
                .filter(|(k, f)| f.series.has_time() && f.series.active_path(&self.times) != **k)
                .map(|(k, _)| k.clone())
                .collect();
            for key in stale {
                if let Some(series) = self.close_file(&key, false)? {
                    tracing::debug!(sink = %self.name, file = %key, "period over, file closed");
                    self.request_sweep(&series);
                }
            }
        }
        if let Some(every) = self.rotate_every {
            let period = period_index(now, every);
            let due: Vec<String> = self
                .files
                .iter()
                .filter(|(_, f)| f.len > 0 && f.period.is_some_and(|p| p < period))
                .map(|(k, _)| k.clone())
                .collect();
            for key in &due {
                let Some(series) = self.files.get(key).map(|f| f.series.clone()) else {
                    continue;
                };
                let rotated = self.rotate(key, now)?;
                self.release(&rotated);
                self.request_sweep(&series);
            }
            if !due.is_empty() && self.policy == FsyncPolicy::Always {
                self.sync_dirs()?;
            }
        }
        Ok(())
    }

    /// Writes the batch, recording in `batch` what to undo if it fails.
    fn write_batch(
        &mut self,
        events: &[Arc<Event>],
        now: DateTime<Utc>,
        batch: &mut Batch,
    ) -> Result<(), SinkError> {
        let period = self.rotate_every.map(|every| period_index(now, every));
        // Within a batch the time fields are fixed, so an event with the previous event's feed
        // and type renders the same path, which is then open and in `batch.touched` already
        // (rotation reopens the same path): skip the render and those lookups, and look the file
        // up once per run of such events. Streams mostly repeat a type; per-event path lookups
        // were 8 % of the sink thread, and then 5 % (README, "Benchmark").
        let same_path = |a: &Event, b: &Event| a.feed == b.feed && a.event_type == b.event_type;
        let mut i = 0;
        while i < events.len() {
            let event = &events[i];
            if i == 0 || !same_path(&events[i - 1], event) {
                self.template
                    .render(
                        &event.feed,
                        &event.event_type,
                        &self.times,
                        &mut self.rendered,
                    )
                    .map_err(|m| self.config(m))?;
                if !self.files.contains_key(self.rendered.as_str()) {
                    if self.files.len() >= MAX_OPEN_FILES {
                        self.close_all()?;
                    }
                    let key = self.rendered.clone();
                    let file = self.open(&key, &event.feed, &event.event_type)?;
                    self.files.insert(key, file);
                }
                if !batch.touched.contains_key(self.rendered.as_str()) {
                    // Buffers are empty between batches, so this is where the batch starts. The
                    // length is read from the file, in case it was truncated from outside.
                    let key = self.rendered.clone();
                    let Some(file) = self.files.get_mut(&key) else {
                        return Err(self.config(format!("internal error: {key} is not open")));
                    };
                    match file.writer.get_ref().metadata() {
                        Ok(meta) => {
                            file.len = meta.len();
                            batch.touched.insert(key, meta.len());
                        }
                        Err(e) => {
                            return Err(self.io(format!("cannot read the length of {key}"), e));
                        }
                    }
                }
            }
            // The run of events with this path, written with one lookup of the file: until a
            // rotation is due (then the file is rotated and the run goes on in the new one).
            let key = self.rendered.as_str();
            let Some(file) = self.files.get_mut(key) else {
                return Err(self.config(format!("internal error: {key} is not open")));
            };
            let mut rotate = false;
            let mut failed = None;
            loop {
                self.line.clear();
                self.encoder.encode(&events[i], &mut self.line);
                let n = self.line.len() as u64;
                if file.len > 0
                    && (self
                        .rotate_size
                        .is_some_and(|max| file.len.saturating_add(n) > max)
                        || matches!((file.period, period), (Some(was), Some(now)) if was < now))
                {
                    rotate = true;
                    break;
                }
                file.unsynced = true;
                if let Err(e) = file.writer.write_all(&self.line) {
                    failed = Some(e);
                    break;
                }
                file.len += n;
                if file.period.is_none() {
                    file.period = period;
                }
                i += 1;
                if i == events.len() || !same_path(&events[i - 1], &events[i]) {
                    break;
                }
            }
            if let Some(e) = failed {
                let context = format!("cannot write {}", self.rendered);
                return Err(self.io(context, e));
            }
            if rotate {
                let event = &events[i];
                let key = self.rendered.clone();
                let Some(series) = self.files.get(&key).map(|f| f.series.clone()) else {
                    return Err(self.config(format!("internal error: {key} is not open")));
                };
                let rotated = self.rotate(&key, now)?;
                // Kept in use until the batch is committed: a rollback renames it back.
                batch.rotations.push(Rotated {
                    key: key.clone(),
                    rotated,
                    series,
                });
                let file = self.open(&key, &event.feed, &event.event_type)?;
                self.files.insert(key, file);
            }
        }
        // One huge event must not leave its encoded line allocated for the sink's lifetime.
        if self.line.capacity() > RETAINED_LINE_CAPACITY {
            self.line = Vec::new();
        }
        for key in batch.touched.keys() {
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

    /// A batch is stored: its rotated files are handed to the helper.
    fn commit(&mut self, batch: Batch) {
        let mut swept = HashSet::new();
        for r in batch.rotations {
            self.release(&r.rotated);
            if swept.insert(r.series.key.clone()) {
                self.request_sweep(&r.series);
            }
        }
    }

    /// Undoes a failed batch: drops the unwritten buffers, renames the files it rotated back
    /// (newest first), and truncates each touched file to its length before the batch. What
    /// cannot be done now is retried before the next write; meanwhile those paths stay in
    /// use.
    fn rollback(&mut self, batch: Batch) {
        for key in batch.touched.keys() {
            if let Some(f) = self.files.remove(key) {
                let (_file, _unwritten) = f.writer.into_parts();
            }
            let path = PathBuf::from(key);
            self.hold(&path);
            self.undo_held.push(path);
        }
        for r in batch.rotations.into_iter().rev() {
            self.undo_held.push(r.rotated.clone());
            self.pending_undo.push_back(Undo::Rename {
                from: r.rotated,
                to: PathBuf::from(r.key),
            });
        }
        for (key, len) in batch.touched {
            self.pending_undo.push_back(Undo::Truncate {
                path: PathBuf::from(key),
                len,
            });
        }
        if let Err(e) = self.apply_pending_undo() {
            tracing::error!(
                sink = %self.name,
                error = %e,
                "cannot undo a failed write; will retry before the next write"
            );
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

    /// With `max_age`, asks the helper to look at every series once a minute.
    fn sweep_for_age(&mut self, now: DateTime<Utc>) {
        let Some(m) = &self.maintenance else { return };
        if m.max_age.is_none() || now.timestamp() < self.next_age_sweep {
            return;
        }
        for series in self.series.values() {
            m.sweep(series.clone());
        }
        self.next_age_sweep = now.timestamp().saturating_add(AGE_SWEEP_SECS);
    }

    /// Waits until the helper has done everything asked of it so far.
    #[cfg(test)]
    fn wait_for_maintenance(&self) {
        let Some(m) = &self.maintenance else { return };
        let (tx, rx) = mpsc::channel();
        if let Some(jobs) = &m.jobs {
            jobs.send(Job::Barrier(tx))
                .expect("the helper thread is running");
        }
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the helper thread answers");
    }
}

/// The newest rotation stamp among the files of `series` (`i64::MIN` if none).
fn newest_stamp(series: &Series) -> i64 {
    let Ok(entries) = std::fs::read_dir(&series.dir) else {
        return i64::MIN;
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            series.classify(name.to_str()?)?.stamp
        })
        .max()
        .unwrap_or(i64::MIN)
}

/// Whether `name` in the directory `dir` is a symbolic link.
fn is_symlink_at(dir: &rustix::fd::OwnedFd, name: &std::ffi::OsStr) -> bool {
    rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Symlink
    })
}

/// Opens a sink file that already exists, without following a symbolic link in its last
/// component and without blocking on a FIFO; anything but a regular file is refused.
fn open_existing(path: &Path, write: bool) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                std::io::Error::other(format!(
                    "{} is a symbolic link; the file sink never follows links",
                    path.display()
                ))
            } else {
                e
            }
        })?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(file)
}

/// Truncates the file at `path` to `len` bytes (a missing file is fine).
fn truncate_path(path: &Path, len: u64, sync: bool) -> std::io::Result<()> {
    match open_existing(path, true) {
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
        self.apply_pending_undo()?;
        let now = (self.clock)();
        self.roll_over(now)?;
        let mut batch = Batch::default();
        let result = self.write_batch(events, now, &mut batch);
        match result {
            Ok(()) => self.commit(batch),
            Err(_) => self.rollback(batch),
        }
        result
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

/// Work for the helper thread.
enum Job {
    /// Look at the closed files of a series: delete what retention no longer keeps, then
    /// compress the rest.
    Sweep(Arc<Series>),
    #[cfg(test)]
    Barrier(mpsc::Sender<()>),
}

/// The helper thread that compresses and deletes closed files. Dropping it stops the thread
/// after at most one chunk of the file being compressed (whose original stays untouched)
/// and waits for it: a later instance of the sink never races with it.
struct Maintenance {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    claims: Arc<Mutex<Claims>>,
    max_age: Option<Duration>,
}

impl Maintenance {
    fn start(worker: Worker) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let stop = worker.stop.clone();
        let claims = worker.claims.clone();
        let max_age = worker.max_age;
        let thread = std::thread::Builder::new()
            .name(format!("sink-{}-files", worker.name))
            .spawn(move || worker.run(rx))?;
        Ok(Maintenance {
            jobs: Some(tx),
            thread: Some(thread),
            stop,
            claims,
            max_age,
        })
    }

    fn sweep(&self, series: Arc<Series>) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Job::Sweep(series));
        }
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A closed file of a series, compressed or not (or both, after a crash).
struct Closed {
    name: String,
    period: Option<NaiveDateTime>,
    stamp: Option<i64>,
    plain: bool,
    compressed: Vec<Compress>,
    modified: Option<SystemTime>,
}

struct Worker {
    name: String,
    compress: Compress,
    max_files: Option<usize>,
    max_age: Option<Duration>,
    clock: Clock,
    stop: Arc<AtomicBool>,
    claims: Arc<Mutex<Claims>>,
}

impl Worker {
    fn run(self, jobs: mpsc::Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            batch.extend(jobs.try_iter());
            let mut done = HashSet::new();
            for job in batch {
                if self.stopped() {
                    return;
                }
                match job {
                    Job::Sweep(series) => {
                        if done.insert(series.key.clone()) {
                            self.sweep(&series);
                        }
                    }
                    #[cfg(test)]
                    Job::Barrier(reply) => {
                        let _ = reply.send(());
                    }
                }
            }
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Takes `path` for this thread, unless the sink uses it.
    fn claim(&self, path: &Path) -> bool {
        let mut claims = lock(&self.claims);
        if claims.in_use.contains(path) {
            return false;
        }
        claims.claimed.insert(path.to_path_buf());
        true
    }

    fn unclaim(&self, path: &Path) {
        lock(&self.claims).claimed.remove(path);
    }

    /// The closed files of `series`, oldest first; removes leftover `.tmp` files.
    fn closed_files(&self, series: &Series, now: DateTime<Utc>) -> Vec<Closed> {
        let current = if series.has_time() {
            match series.period_at(now) {
                Some(p) => Some(p),
                None => return Vec::new(),
            }
        } else {
            None
        };
        let entries = match std::fs::read_dir(&series.dir) {
            Ok(entries) => entries,
            Err(e) => {
                if e.kind() != ErrorKind::NotFound {
                    tracing::warn!(sink = %self.name, dir = %series.dir.display(), "cannot list rotated files: {e}");
                }
                return Vec::new();
            }
        };
        let mut closed: BTreeMap<String, Closed> = BTreeMap::new();
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                continue;
            };
            if let Some(inner) = name.strip_suffix(".tmp") {
                // Only this thread writes `.gz.tmp`/`.zst.tmp`: one left over is from a crash
                // or a stop, and its original is still there.
                if series
                    .classify(inner)
                    .is_some_and(|m| m.compressed.is_some())
                {
                    let path = series.path_of(name);
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(sink = %self.name, file = %path.display(), "cannot remove a leftover temporary file: {e}");
                    }
                }
                continue;
            }
            let Some(member) = series.classify(name) else {
                continue;
            };
            let is_closed = member.stamp.is_some()
                || matches!((member.period, current), (Some(p), Some(c)) if p < c);
            if !is_closed {
                continue; // the active file, or one of a period not over yet
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let c = closed.entry(member.logical.clone()).or_insert(Closed {
                name: member.logical,
                period: member.period,
                stamp: member.stamp,
                plain: false,
                compressed: Vec::new(),
                modified: None,
            });
            match member.compressed {
                None => {
                    c.plain = true;
                    c.modified = meta.modified().ok().or(c.modified);
                }
                Some(codec) => {
                    c.compressed.push(codec);
                    if c.modified.is_none() {
                        c.modified = meta.modified().ok();
                    }
                }
            }
        }
        let mut files: Vec<Closed> = closed.into_values().collect();
        // Within a period, the unstamped file was the last one active.
        files.sort_by(|a, b| {
            (a.period, a.stamp.unwrap_or(i64::MAX), &a.name).cmp(&(
                b.period,
                b.stamp.unwrap_or(i64::MAX),
                &b.name,
            ))
        });
        files
    }

    fn sweep(&self, series: &Series) {
        let now = (self.clock)();
        let files = self.closed_files(series, now);
        let excess = self
            .max_files
            .map_or(0, |keep| files.len().saturating_sub(keep));
        let mut kept = Vec::new();
        for (i, file) in files.into_iter().enumerate() {
            let too_old = self.max_age.is_some_and(|max| {
                file.modified.is_some_and(|m| {
                    now.signed_duration_since(DateTime::<Utc>::from(m))
                        .to_std()
                        .is_ok_and(|age| age > max)
                })
            });
            if i < excess || too_old {
                self.delete(series, &file);
            } else {
                kept.push(file);
            }
        }
        if self.compress == Compress::None {
            return;
        }
        for file in kept {
            if self.stopped() {
                return;
            }
            if file.plain {
                self.compress(series, &file);
            }
        }
    }

    fn delete(&self, series: &Series, file: &Closed) {
        let mut paths = Vec::new();
        if file.plain {
            paths.push(series.path_of(&file.name));
        }
        for codec in &file.compressed {
            paths.push(series.path_of(&format!("{}{}", file.name, codec.suffix())));
        }
        for path in paths {
            if !self.claim(&path) {
                continue;
            }
            let result = std::fs::remove_file(&path);
            self.unclaim(&path);
            match result {
                Ok(()) => {
                    tracing::debug!(sink = %self.name, file = %path.display(), "old file deleted");
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(sink = %self.name, file = %path.display(), "cannot delete an old file: {e}");
                }
            }
        }
    }

    fn compress(&self, series: &Series, file: &Closed) {
        let src = series.path_of(&file.name);
        if !self.claim(&src) {
            return;
        }
        let result = self.compress_claimed(&series.dir, &src, &file.compressed);
        self.unclaim(&src);
        if let Err(e) = result {
            tracing::warn!(
                sink = %self.name,
                file = %src.display(),
                "cannot compress: {e}; the file stays uncompressed and is tried again later"
            );
        }
    }

    /// Compresses `src` (claimed). `existing`: compressed copies already there, from a crash
    /// between the rename and the delete.
    fn compress_claimed(
        &self,
        dir: &Path,
        src: &Path,
        existing: &[Compress],
    ) -> std::io::Result<()> {
        if let Some(&have) = existing.first() {
            let done = with_suffix(src, have.suffix());
            if same_content(src, &done, have)? {
                std::fs::remove_file(src)?;
                return sync_dir(dir);
            }
            tracing::warn!(
                sink = %self.name,
                file = %src.display(),
                other = %done.display(),
                "a compressed file of the same name holds something else; leaving this file \
                 uncompressed"
            );
            return Ok(());
        }
        let dst = with_suffix(src, self.compress.suffix());
        let tmp = with_suffix(&dst, ".tmp");
        match compress_to(src, &tmp, self.compress, &self.stop) {
            Ok(true) => {}
            Ok(false) => {
                let _ = std::fs::remove_file(&tmp);
                return Ok(());
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
        std::fs::rename(&tmp, &dst)?;
        sync_dir(dir)?;
        std::fs::remove_file(src)?;
        sync_dir(dir)?;
        tracing::debug!(sink = %self.name, file = %dst.display(), "rotated file compressed");
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `src` compressed to `tmp`, fsynced, with the modification time of `src`. False
/// when stopped before the end.
fn compress_to(
    src: &Path,
    tmp: &Path,
    codec: Compress,
    stop: &AtomicBool,
) -> std::io::Result<bool> {
    let mut input = open_existing(src, false)?;
    let modified = input.metadata()?.modified()?;
    // A fresh file: never through a link or onto another file planted at the name.
    match std::fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let out = OpenOptions::new().write(true).create_new(true).open(tmp)?;
    let out = match codec {
        Compress::Gzip => {
            let mut encoder = flate2::write::GzEncoder::new(out, flate2::Compression::default());
            if !pump(&mut input, &mut encoder, stop)? {
                return Ok(false);
            }
            encoder.finish()?
        }
        Compress::Zstd => {
            let mut encoder = zstd::stream::write::Encoder::new(out, 0)?;
            if !pump(&mut input, &mut encoder, stop)? {
                return Ok(false);
            }
            encoder.finish()?
        }
        Compress::None => return Err(std::io::Error::other("no compression configured")),
    };
    out.set_modified(modified)?;
    out.sync_all()?;
    Ok(true)
}

/// Copies `input` to `output` in chunks; false if `stop` was set first.
fn pump(input: &mut File, output: &mut impl Write, stop: &AtomicBool) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        output.write_all(&buf[..n])?;
    }
}

/// Whether the compressed file `done` decompresses to exactly the contents of `src`.
fn same_content(src: &Path, done: &Path, codec: Compress) -> std::io::Result<bool> {
    let plain = open_existing(src, false)?;
    let packed = open_existing(done, false)?;
    match codec {
        Compress::Gzip => streams_equal(plain, flate2::read::MultiGzDecoder::new(packed)),
        Compress::Zstd => streams_equal(plain, zstd::stream::read::Decoder::new(packed)?),
        Compress::None => Ok(false),
    }
}

fn streams_equal(a: impl Read, b: impl Read) -> std::io::Result<bool> {
    let mut a = BufReader::new(a);
    let mut b = BufReader::new(b);
    loop {
        let x = a.fill_buf()?;
        let y = b.fill_buf()?;
        if x.is_empty() || y.is_empty() {
            return Ok(x.is_empty() && y.is_empty());
        }
        let n = x.len().min(y.len());
        if x[..n] != y[..n] {
            return Ok(false);
        }
        a.consume(n);
        b.consume(n);
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
            id: format!("id-{seq}").into(),
            received_at: Utc::now(),
            seq,
        })
    }

    fn config(path: &str, fsync: FsyncPolicy) -> FileSinkConfig {
        FileSinkConfig {
            fsync,
            ..FileSinkConfig::new(path)
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
            ("d/.hidden-{feed}.log", "d", 1),
            ("d/{type}.{feed}.x", "d", 1),
        ] {
            assert!(errors(t).is_empty(), "{t}: {:?}", errors(t));
            let tpl = Template::parse(t, 0).unwrap();
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
            ("data/{type}", "does not end with a fixed extension"),
            ("data/{type}.{feed}", "such as `{type}.{feed}.jsonl`"),
            ("data/{feed}-{type}.", "does not end with a fixed extension"),
            ("data/events-%Y-%m-%d", "such as `events-%Y-%m-%d.jsonl`"),
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
        // Any type is encoded into a safe name, as long as the name fits.
        for ok in [
            "message",
            "edit",
            "log.v2",
            "a-b_c",
            "A9",
            &"x".repeat(200),
            ".",
            "..",
            ".hidden",
            "a/b",
            "a\\b",
            "sp ace",
            "caf\u{e9}",
            "a\0",
            "{feed}",
            &"\u{e9}".repeat(33),
        ] {
            assert!(typed.accepts_type(ok), "{ok:?}");
        }
        for bad in ["", &"x".repeat(201), &"/".repeat(67), &"\u{e9}".repeat(34)] {
            assert!(!typed.accepts_type(bad), "{bad:?}");
        }
        // A file name over 255 bytes (with the longest feed name) is refused.
        let long = config("data/{feed}-{type}.jsonl", FsyncPolicy::Always);
        assert!(long.accepts_type(&"x".repeat(140)));
        assert!(!long.accepts_type(&"x".repeat(160)));
        assert!(!long.accepts_type(&" ".repeat(50)));
        // Without {type}, every type fits.
        let untyped = config("data/{feed}.jsonl", FsyncPolicy::Always);
        assert!(untyped.accepts_type("../../etc/passwd"));
        assert!(SinkConfig::File(typed).accepts_type("edit"));
    }

    #[test]
    fn any_type_is_stored_under_its_encoded_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink_in(dir.path(), "out/{feed}/{type}.jsonl", FsyncPolicy::Always);
        let types = [
            "../../escape",
            "..",
            ".",
            "x/y",
            "\u{e9}t\u{e9}",
            "a b",
            "%41",
            "A",
            "state.db",
        ];
        let events: Vec<Arc<Event>> = types
            .iter()
            .enumerate()
            .map(|(i, t)| event("ok", t, i as u64 + 1, "x"))
            .collect();
        sink.write(&events).unwrap();
        let mut stored = Vec::new();
        for entry in std::fs::read_dir(dir.path().join("out/ok")).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let stem = name.strip_suffix(".jsonl").expect("the sink's own suffix");
            let decoded = naming::decode(stem).expect("a name the encoder wrote");
            for e in read_events(&dir.path().join("out/ok").join(&name)) {
                assert_eq!(e.event_type.as_ref(), decoded, "{name}");
                stored.push(e.seq);
            }
        }
        stored.sort_unstable();
        assert_eq!(stored, (1..=types.len() as u64).collect::<Vec<_>>());
        let top: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(top, ["out"]);
        // An empty feed name (the config loader refuses it) cannot make a name; the good
        // event before it is rolled back.
        let err = sink
            .write(&[event("ok", "fine", 20, "x"), event("", "t", 21, "y")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sink `archive`") && err.contains("not usable"),
            "{err}"
        );
        sink.write(&[event("ok", "fine", 22, "z")]).unwrap();
        assert_eq!(seqs(&dir.path().join("out/ok/fine.jsonl")), [22]);
    }

    #[test]
    fn rendered_paths_are_confined() {
        let tpl = Template::parse("/srv/data/{feed}/{type}.jsonl", 0).unwrap();
        assert!(tpl.is_confined(Path::new("/srv/data/a/b.jsonl")));
        assert!(!tpl.is_confined(Path::new("/srv/data/../b.jsonl")));
        assert!(!tpl.is_confined(Path::new("/srv/data/a/../../b.jsonl")));
        assert!(!tpl.is_confined(Path::new("/srv/other/a/b.jsonl")));
        assert!(!tpl.is_confined(Path::new("/srv/data/a/b/c.jsonl")));
        let rel = Template::parse("{feed}/{type}.jsonl", 0).unwrap();
        assert!(rel.is_confined(Path::new("a/b.jsonl")));
        assert!(!rel.is_confined(Path::new("/a/b.jsonl")));
        assert!(!rel.is_confined(Path::new("../b.jsonl")));
        let mut out = String::new();
        rel.render("f", "t", &[], &mut out).unwrap();
        assert_eq!(out, "f/t.jsonl");
        tpl.render("f", "t", &[], &mut out).unwrap();
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
    fn links_below_the_base_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("target");
        std::fs::write(&target, "precious\n").unwrap();
        std::fs::create_dir(outside.path().join("dir")).unwrap();
        std::fs::create_dir_all(dir.path().join("out/f")).unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("out/f/message.jsonl")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("dir"), dir.path().join("out/g")).unwrap();
        // A FIFO does not hang the sink.
        let fifo = dir.path().join("out/f/fifo.jsonl");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut sink = sink_in(dir.path(), "out/{feed}/{type}.jsonl", FsyncPolicy::Always);
        for (feed, t, expect) in [
            ("f", "message", "out/f/message.jsonl"),
            ("g", "message", "out/g"),
            ("f", "fifo", "out/f/fifo.jsonl"),
        ] {
            let err = sink
                .write(&[event(feed, t, 1, "x")])
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{err}");
            if expect != "out/f/fifo.jsonl" {
                assert!(err.contains("symbolic link"), "{err}");
            } else {
                assert!(err.contains("not a regular file"), "{err}");
            }
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"precious\n");
        assert_eq!(
            std::fs::read_dir(outside.path().join("dir"))
                .unwrap()
                .count(),
            0
        );
        // The undo of a failed batch does not truncate through a link planted meanwhile.
        sink.write(&[event("f", "t", 1, "x")]).unwrap();
        let own = dir.path().join("out/f/t.jsonl");
        std::fs::remove_file(&own).unwrap();
        std::os::unix::fs::symlink(&target, &own).unwrap();
        assert!(truncate_path(&own, 0, false)
            .unwrap_err()
            .to_string()
            .contains("symbolic link"));
        assert_eq!(std::fs::read(&target).unwrap(), b"precious\n");
    }

    #[test]
    fn only_the_sinks_own_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink_in(dir.path(), "{feed}.jsonl", FsyncPolicy::Always);
        let line = encoded(&[event("a", "t", 1, "x")]);
        for (name, content, cut_to) in [
            // Foreign: not cut, refused.
            ("b", b"SQLite format 3\0\x01\x02".to_vec(), None),
            ("c", b"key = 1\nname = \"x\"".to_vec(), None),
            ("d", [b"not json\n".as_slice(), &line[..10]].concat(), None),
            (
                "e",
                b"{\"feed\":\"x\",\"type\":\"t\"}\n{\"fe".to_vec(),
                None,
            ),
            // The sink's own: the unfinished line is cut.
            ("f", line[..10].to_vec(), Some(0)),
            ("g", b"{\"fe".to_vec(), Some(0)),
            (
                "h",
                [line.as_slice(), &line[..20]].concat(),
                Some(line.len()),
            ),
        ] {
            let path = dir.path().join(format!("{name}.jsonl"));
            std::fs::write(&path, &content).unwrap();
            let result = sink.write(&[event(name, "t", 2, "y")]);
            match cut_to {
                None => {
                    let err = result.unwrap_err().to_string();
                    assert!(
                        err.contains(&format!("refusing to append to {}", path.display()))
                            && err.contains("not a JSON line written by this sink"),
                        "{name}: {err}"
                    );
                    assert_eq!(std::fs::read(&path).unwrap(), content, "{name}");
                }
                Some(keep) => {
                    result.unwrap();
                    let after = std::fs::read(&path).unwrap();
                    assert_eq!(after[..keep], content[..keep], "{name}");
                    assert_eq!(decode_all(&after[keep..], name).len(), 1, "{name}");
                }
            }
        }
    }

    #[test]
    fn paths_that_can_reach_a_file_are_found() {
        let cwd = Path::new("/srv/b");
        for (template, target, hit) in [
            ("data/{type}.db", "data/state.db", true),
            ("data/{type}.db", "/srv/b/data/./x/../state.db", true),
            ("data/state.db", "data/state.db", true),
            ("/srv/b/data/{type}.jsonl", "data/state.db", false),
            ("data/{type}.jsonl", "data/state.db-wal", false),
            ("data/{feed}-{type}.jsonl", "data/config.jsonl", false),
            ("data/{feed}-{type}.jsonl", "data/a-config.jsonl", true),
            ("data/{feed}/{type}.jsonl", "data/a/b.jsonl", true),
            ("data/{feed}/{type}.jsonl", "data/b.jsonl", false),
            // Rotated, compressed and temporary names.
            ("data/s.db", "data/s.2026-11-24T08-30-00.123Z.db", true),
            ("data/{type}.toml", "data/config.toml.gz.tmp", true),
            ("conf/%Y.toml", "conf/sse-bridge.toml", true),
            ("data/s.db", "data/s.db-wal", false),
            ("other/{type}.db", "data/state.db", false),
        ] {
            let c = FileSinkConfig::new(template);
            assert_eq!(
                c.can_write_to(Path::new(target), cwd),
                hit,
                "{template} -> {target}"
            );
        }
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

    // ---- rotation, retention, compression, reopen ----

    type Now = Arc<Mutex<DateTime<Utc>>>;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// A clock the test moves by hand.
    fn manual_clock(start: &str) -> (Clock, Now) {
        let now = Arc::new(Mutex::new(at(start)));
        let read = now.clone();
        (Arc::new(move || *read.lock().unwrap()), now)
    }

    fn set(now: &Now, s: &str) {
        *now.lock().unwrap() = at(s);
    }

    fn rotating_sink(
        dir: &Path,
        template: &str,
        clock: Clock,
        configure: impl FnOnce(&mut FileSinkConfig),
    ) -> FileSink {
        let mut cfg = FileSinkConfig::new(format!("{}/{template}", dir.display()));
        configure(&mut cfg);
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        FileSink::build_with_clock("archive", &cfg, clock).unwrap()
    }

    /// File names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// A file's content, decompressed according to its suffix.
    fn content(path: &Path) -> Vec<u8> {
        let raw = std::fs::read(path).unwrap();
        let name = path.to_str().unwrap();
        let mut out = Vec::new();
        if name.ends_with(".gz") {
            flate2::read::MultiGzDecoder::new(&raw[..])
                .read_to_end(&mut out)
                .unwrap();
        } else if name.ends_with(".zst") {
            zstd::stream::read::Decoder::new(&raw[..])
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
        } else {
            out = raw;
        }
        out
    }

    /// The events of a JSON Lines file: whole lines only, each one a valid event.
    fn decode_all(bytes: &[u8], what: &str) -> Vec<Event> {
        if bytes.is_empty() {
            return Vec::new();
        }
        assert_eq!(bytes.last(), Some(&b'\n'), "{what} ends in a partial line");
        std::str::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| jsonl::decode(l).unwrap_or_else(|e| panic!("{what}: {e}: {l}")))
            .collect()
    }

    fn encoded(events: &[Arc<Event>]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            jsonl::encode(e, &mut out);
        }
        out
    }

    #[test]
    fn rotation_keys_in_the_config() {
        let c: SinkConfig = toml::from_str(
            "type = \"file\"\npath = \"data/{feed}.jsonl\"\nrotate_size = \"100 MiB\"\n\
             rotate_interval = \"1h\"\nmax_files = 7\nmax_age = \"30d\"\ncompress = \"zstd\"",
        )
        .unwrap();
        let SinkConfig::File(f) = &c else {
            panic!("not a file sink: {c:?}")
        };
        assert_eq!(f.rotate_size, Some(ByteSize::mib(100)));
        assert_eq!(f.rotate_interval, Some(Duration::from_secs(3600)));
        assert_eq!(f.max_files, Some(7));
        assert_eq!(f.max_age, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(f.compress, Compress::Zstd);
        assert!(c.validate().is_empty(), "{:?}", c.validate());

        let c: SinkConfig = toml::from_str("type = \"file\"\npath = \"x.jsonl\"").unwrap();
        assert_eq!(c, SinkConfig::File(FileSinkConfig::new("x.jsonl")));
        for bad in [
            "compress = \"bzip2\"",
            "rotate_size = \"1 parsec\"",
            "rotate_interval = \"soon\"",
            "max_files = -1",
            "rotate_files = 3",
        ] {
            assert!(
                toml::from_str::<SinkConfig>(&format!("type = \"file\"\npath = \"x\"\n{bad}"))
                    .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn rotation_keys_are_validated() {
        let issues = |f: &dyn Fn(&mut FileSinkConfig)| {
            let mut c = FileSinkConfig::new("data/{feed}.jsonl");
            f(&mut c);
            c.validate()
        };
        let has = |issues: Vec<(String, String)>, key: &str, text: &str| {
            assert!(
                issues.iter().any(|(k, m)| k == key && m.contains(text)),
                "{key}: {text:?} not in {issues:?}"
            );
        };
        has(
            issues(&|c| c.rotate_size = Some(ByteSize(0))),
            "rotate_size",
            "greater than zero",
        );
        for d in [Duration::ZERO, Duration::from_millis(1500)] {
            has(
                issues(&|c| c.rotate_interval = Some(d)),
                "rotate_interval",
                "whole number of seconds",
            );
        }
        has(
            issues(&|c| {
                c.rotate_size = Some(ByteSize(1));
                c.max_files = Some(0);
            }),
            "max_files",
            "at least 1",
        );
        has(
            issues(&|c| {
                c.rotate_size = Some(ByteSize(1));
                c.max_age = Some(Duration::ZERO);
            }),
            "max_age",
            "greater than zero",
        );
        // Retention and compression need something that closes files.
        has(issues(&|c| c.max_files = Some(3)), "max_files", "no effect");
        has(
            issues(&|c| c.compress = Compress::Gzip),
            "compress",
            "no effect",
        );
        has(
            issues(&|c| c.max_age = Some(Duration::from_secs(1))),
            "max_age",
            "no effect",
        );
        let mut c = FileSinkConfig::new("data/{feed}-%Y-%m-%d.jsonl");
        c.max_files = Some(3);
        c.compress = Compress::Gzip;
        assert!(c.validate().is_empty(), "{:?}", c.validate());

        for good in [
            "data/{feed}-%Y-%m-%d.jsonl",
            "data/%Y%m%dT%H%M.jsonl",
            "data/{feed}/{type}.%G-W%V.jsonl",
            "data/x-%Y-%j.log",
            "data/x-%s.jsonl",
            "data/x-%Y-%m.jsonl",
            "data/%F-{feed}.jsonl",
            "data/100%%-{feed}-%Y-%m-%d.jsonl",
            "data/%Y-%m-%dT%H-%M-%S%.3f.jsonl",
        ] {
            assert!(errors(good).is_empty(), "{good}: {:?}", errors(good));
        }
        for (bad, expect) in [
            ("data/%Y/{feed}.jsonl", "only allowed in the file name"),
            ("%Y/x.jsonl", "only allowed in the file name"),
            ("data/x-%Q.jsonl", "not a valid strftime format"),
            ("data/x-100%.jsonl", "not a valid strftime format"),
            ("data/x-%D.jsonl", "`/`"),
            ("data/x-%Y%n.jsonl", "control character"),
            ("data/x-%a.jsonl", "cannot be ordered"),
            ("data/x-%H.jsonl", "cannot be ordered"),
            ("data/x-%m-%d.jsonl", "cannot be ordered"),
            ("data/x-%Y-%j", "does not end with a fixed extension"),
        ] {
            let errs = errors(bad);
            assert!(
                errs.iter().any(|e| e.contains(expect)),
                "{bad}: expected {expect:?} in {errs:?}"
            );
        }
        // The rotation suffixes need room in the file name.
        let long = format!("data/{}-{{feed}}.jsonl", "x".repeat(140));
        assert!(FileSinkConfig::new(long.as_str()).validate().is_empty());
        let mut c = FileSinkConfig::new(long.as_str());
        c.rotate_size = Some(ByteSize(1000));
        c.compress = Compress::Zstd;
        assert!(
            c.validate()
                .iter()
                .any(|(k, m)| k == "path" && m.contains("rotation and compression suffixes")),
            "{:?}",
            c.validate()
        );
        let mut typed = FileSinkConfig::new("data/{feed}-{type}.jsonl");
        assert!(typed.accepts_type(&"t".repeat(140)));
        typed.rotate_size = Some(ByteSize(1000));
        assert!(!typed.accepts_type(&"t".repeat(140)));
        assert!(typed.accepts_type(&"t".repeat(100)));
    }

    #[test]
    fn file_names_of_a_series() {
        let plain = Template::parse("d/{feed}.jsonl", 0).unwrap();
        let a = plain.series("a", "t").unwrap();
        assert_eq!(a.dir, Path::new("d"));
        assert_eq!(a.path_of("x"), Path::new("d/x"));
        let m = a.classify("a.2026-11-24T08-30-00.123Z.jsonl.gz").unwrap();
        assert_eq!(m.logical, "a.2026-11-24T08-30-00.123Z.jsonl");
        assert_eq!(m.compressed, Some(Compress::Gzip));
        assert_eq!(
            m.stamp,
            Some(at("2026-11-24T08:30:00.123Z").timestamp_millis())
        );
        assert_eq!(m.period, None);
        assert_eq!(a.classify("a.jsonl").unwrap().stamp, None);
        assert!(a.classify("a.jsonl.zst").is_some());
        for other in [
            "b.2026-11-24T08-30-00.123Z.jsonl",
            "a.jsonl.1",
            "a.2026-11-24T08-30-00.123Z.jsonl.1",
            "a.2026-11-24T08-30-00Z.jsonl",
            "a.2026-11-24T08-30-00.123Z.txt",
            "a.2026-13-24T08-30-00.123Z.jsonl",
            "xa.jsonl",
            "a.jsonl.gz.tmp",
        ] {
            assert_eq!(a.classify(other), None, "{other}");
        }
        assert_eq!(
            rotated_name("d/a.jsonl", ".jsonl", "2026-11-24T08-30-00.123Z"),
            "d/a.2026-11-24T08-30-00.123Z.jsonl"
        );
        // Without an extension the stamp goes at the end.
        let bare = Template::parse("events", 0).unwrap();
        let s = bare.series("a", "t").unwrap();
        assert_eq!(s.dir, Path::new("."));
        assert_eq!(s.path_of("events"), Path::new("events"));
        assert!(s
            .classify("events.2026-11-24T08-30-00.123Z")
            .is_some_and(|m| m.stamp.is_some()));
        let abs = Template::parse("/srv/x.jsonl", 0).unwrap();
        assert_eq!(
            abs.series("a", "t").unwrap().path_of("y"),
            Path::new("/srv/y")
        );

        let daily = Template::parse("d/{feed}-%Y-%m-%d.jsonl", 0).unwrap();
        let s = daily.series("a", "t").unwrap();
        let day = |d: &str| Some(at(&format!("{d}T00:00:00Z")).naive_utc());
        assert_eq!(
            s.classify("a-2026-11-24.jsonl").unwrap().period,
            day("2026-11-24")
        );
        let m = s
            .classify("a-2026-11-24.2026-11-24T08-30-00.123Z.jsonl.zst")
            .unwrap();
        assert_eq!(m.period, day("2026-11-24"));
        assert!(m.stamp.is_some());
        for other in [
            "a-2026-11-4.jsonl",
            "a-2026-11-24x.jsonl",
            "b-2026-11-24.jsonl",
        ] {
            assert_eq!(s.classify(other), None, "{other}");
        }
        assert_eq!(s.period_at(at("2026-11-24T13:14:15Z")), day("2026-11-24"));
        let mut times = Vec::new();
        let now = at("2026-11-24T13:14:15Z");
        for f in daily.formats.iter() {
            times.push(format_time(now, f).unwrap());
        }
        assert_eq!(s.active_path(&times), "d/a-2026-11-24.jsonl");

        assert_eq!(period_index(at("2026-11-24T23:59:59Z"), 86400) + 1, {
            period_index(at("2026-11-25T00:00:00Z"), 86400)
        });
        assert_eq!(
            period_index(at("2026-11-24T08:00:00Z"), 3600),
            period_index(at("2026-11-24T08:59:59.999Z"), 3600)
        );
    }

    /// The test the issue asks for: a steady stream through size rotation loses no event and
    /// splits none between files, and every closed file respects the bound.
    #[test]
    fn size_rotation_under_a_steady_stream() {
        const MAX: u64 = 2000;
        let root = tempfile::tempdir().unwrap();
        for policy in [FsyncPolicy::Always, FsyncPolicy::Never] {
            let dir = root.path().join(format!("{policy:?}"));
            // A clock that stands still: rotations in the same millisecond still get
            // distinct names that sort in order.
            let (clock, _now) = manual_clock("2026-11-24T08:30:00Z");
            let mut sink = rotating_sink(&dir, "{feed}.jsonl", clock, |c| {
                c.fsync = policy;
                c.rotate_size = Some(ByteSize(MAX));
            });
            let mut next = HashMap::from([("a", 0u64), ("b", 0u64)]);
            let mut sent = 0;
            let mut round = 0u64;
            while sent < 3000 {
                round += 1;
                let size = (round * 7 % 23 + 1) as usize;
                let batch: Vec<_> = (0..size)
                    .map(|i| {
                        let feed = if (round + i as u64) % 3 == 0 {
                            "b"
                        } else {
                            "a"
                        };
                        let seq = next.get_mut(feed).unwrap();
                        *seq += 1;
                        // One event larger than a whole file.
                        let len = if *seq == 500 {
                            5000
                        } else {
                            (*seq * 37 % 300) as usize
                        };
                        event(feed, "t", *seq, &"x".repeat(len))
                    })
                    .collect();
                sent += batch.len();
                sink.write(&batch).unwrap();
                if round % 10 == 0 {
                    sink.tick().unwrap();
                }
            }
            sink.flush().unwrap();
            for (feed, last) in next {
                let series = sink.template.series(feed, "t").unwrap();
                let mut rotated: Vec<String> = names(&dir)
                    .into_iter()
                    .filter(|n| series.classify(n).is_some_and(|m| m.stamp.is_some()))
                    .collect();
                rotated.sort();
                assert!(
                    rotated.len() > 20,
                    "{feed}: only {} rotations",
                    rotated.len()
                );
                let mut seqs = Vec::new();
                for name in &rotated {
                    let bytes = content(&dir.join(name));
                    let events = decode_all(&bytes, name);
                    assert!(
                        bytes.len() as u64 <= MAX || events.len() == 1,
                        "{name}: {} bytes in {} events",
                        bytes.len(),
                        events.len()
                    );
                    seqs.extend(events.iter().map(|e| e.seq));
                }
                let active = format!("{feed}.jsonl");
                let bytes = content(&dir.join(&active));
                assert!(bytes.len() as u64 <= MAX);
                seqs.extend(decode_all(&bytes, &active).iter().map(|e| e.seq));
                assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "{policy:?} {feed}");
            }
        }
    }

    #[test]
    fn retention_deletes_only_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        std::fs::create_dir_all(dir).unwrap();
        // Files that are not rotated files of `a.jsonl` are never touched.
        let bystanders = [
            "a.jsonl.1",
            "a.2020-01-01T00-00-00.000Z.txt",
            "b.2020-01-01T00-00-00.000Z.jsonl",
            "other.jsonl",
            "notes",
        ];
        for name in bystanders {
            std::fs::write(dir.join(name), "keep me\n").unwrap();
        }
        let (clock, now) = manual_clock("2026-11-24T08:30:00Z");
        let mut sink = rotating_sink(dir, "{feed}.jsonl", clock.clone(), |c| {
            c.fsync = FsyncPolicy::Never;
            c.rotate_size = Some(ByteSize(1000));
            c.max_files = Some(3);
        });
        let all: Vec<_> = (1..=300)
            .map(|i| event("a", "t", i, "0123456789"))
            .collect();
        for (i, batch) in all.chunks(10).enumerate() {
            set(&now, &format!("2026-11-24T08:{:02}:00Z", 30 + i));
            sink.write(batch).unwrap();
        }
        sink.wait_for_maintenance();
        let series = sink.template.series("a", "t").unwrap();
        let rotated: Vec<String> = names(dir)
            .into_iter()
            .filter(|n| series.classify(n).is_some_and(|m| m.stamp.is_some()))
            .collect();
        assert_eq!(rotated.len(), 3, "{:?}", names(dir));
        // What is left is the newest part of the stream, without a hole.
        let mut seqs = Vec::new();
        for name in rotated.iter().chain([&"a.jsonl".to_string()]) {
            seqs.extend(seqs_of(&dir.join(name)));
        }
        let first = seqs[0];
        assert!(first > 1);
        assert_eq!(seqs, (first..=300).collect::<Vec<_>>());
        for name in bystanders {
            assert_eq!(
                std::fs::read(dir.join(name)).unwrap(),
                b"keep me\n",
                "{name}"
            );
        }
        drop(sink);

        // max_age: files last modified longer ago than that go, whatever their number.
        let (clock, now) = manual_clock("2026-11-24T08:30:00Z");
        *now.lock().unwrap() = Utc::now() + chrono::TimeDelta::hours(2);
        let mut sink = rotating_sink(dir, "{feed}.jsonl", clock, |c| {
            c.rotate_size = Some(ByteSize(1000));
            c.max_age = Some(Duration::from_secs(3600));
        });
        sink.write(&[event("a", "t", 301, "x")]).unwrap();
        sink.wait_for_maintenance();
        let mut expected: Vec<String> = bystanders.iter().map(|s| s.to_string()).collect();
        expected.push("a.jsonl".into());
        expected.sort();
        assert_eq!(names(dir), expected);
        assert_eq!(seqs_of(&dir.join("a.jsonl")).last(), Some(&301));

        // A file rotated now is young: it stays, and the minute check runs from `tick`.
        *now.lock().unwrap() = Utc::now();
        let big = "y".repeat(1000);
        sink.write(&[event("a", "t", 302, &big)]).unwrap();
        sink.tick().unwrap();
        sink.wait_for_maintenance();
        assert_eq!(names(dir).len(), expected.len() + 1);
        *now.lock().unwrap() = Utc::now() + chrono::TimeDelta::hours(2);
        sink.tick().unwrap();
        sink.wait_for_maintenance();
        assert_eq!(names(dir), expected);
    }

    fn seqs_of(path: &Path) -> Vec<u64> {
        decode_all(&content(path), &path.display().to_string())
            .iter()
            .map(|e| e.seq)
            .collect()
    }

    #[test]
    fn interval_rotation_at_utc_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let (clock, now) = manual_clock("2026-11-24T08:59:59.500Z");
        let mut sink = rotating_sink(dir, "events.jsonl", clock, |c| {
            c.rotate_interval = Some(Duration::from_secs(3600));
        });
        sink.write(&[event("f", "t", 1, "a")]).unwrap();
        // The first write after the boundary rotates first.
        set(&now, "2026-11-24T09:00:00.250Z");
        sink.write(&[event("f", "t", 2, "b")]).unwrap();
        set(&now, "2026-11-24T09:59:59Z");
        sink.write(&[event("f", "t", 3, "c")]).unwrap();
        sink.tick().unwrap();
        assert_eq!(
            names(dir),
            ["events.2026-11-24T09-00-00.250Z.jsonl", "events.jsonl"]
        );
        assert_eq!(
            seqs(&dir.join("events.2026-11-24T09-00-00.250Z.jsonl")),
            [1]
        );
        // Without writes, the check about once a second rotates.
        set(&now, "2026-11-24T10:00:00.100Z");
        sink.tick().unwrap();
        assert_eq!(
            names(dir),
            [
                "events.2026-11-24T09-00-00.250Z.jsonl",
                "events.2026-11-24T10-00-00.100Z.jsonl"
            ]
        );
        assert_eq!(
            seqs(&dir.join("events.2026-11-24T10-00-00.100Z.jsonl")),
            [2, 3]
        );
        set(&now, "2026-11-24T11:30:00Z");
        sink.tick().unwrap(); // nothing open, nothing to do
        sink.write(&[event("f", "t", 4, "d")]).unwrap();
        assert_eq!(seqs(&dir.join("events.jsonl")), [4]);
        assert_eq!(names(dir).len(), 3);
        drop(sink);

        // A file last written in an earlier interval is rotated before the first write.
        let old = at("2026-11-24T11:30:00Z");
        File::options()
            .write(true)
            .open(dir.join("events.jsonl"))
            .unwrap()
            .set_modified(old.into())
            .unwrap();
        let (clock, _now) = manual_clock("2026-11-24T12:00:05Z");
        let mut sink = rotating_sink(dir, "events.jsonl", clock, |c| {
            c.rotate_interval = Some(Duration::from_secs(3600));
        });
        sink.write(&[event("f", "t", 5, "e")]).unwrap();
        assert_eq!(
            seqs(&dir.join("events.2026-11-24T12-00-05.000Z.jsonl")),
            [4]
        );
        assert_eq!(seqs(&dir.join("events.jsonl")), [5]);
    }

    #[test]
    fn strftime_paths_start_a_file_per_period() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let (clock, now) = manual_clock("2026-11-24T23:59:59Z");
        let mut sink = rotating_sink(dir, "{feed}-%Y-%m-%d.jsonl", clock, |c| {
            c.compress = Compress::Zstd;
            c.max_files = Some(2);
        });
        let first = [event("f", "t", 1, "one"), event("f", "t", 2, "two")];
        sink.write(&first).unwrap();
        sink.wait_for_maintenance();
        assert_eq!(names(dir), ["f-2026-11-24.jsonl"]);
        // Past midnight the check closes the day's file and the helper compresses it.
        set(&now, "2026-11-25T00:00:01Z");
        sink.tick().unwrap();
        sink.wait_for_maintenance();
        assert_eq!(names(dir), ["f-2026-11-24.jsonl.zst"]);
        assert_eq!(
            content(&dir.join("f-2026-11-24.jsonl.zst")),
            encoded(&first)
        );
        for (seq, day) in [(3, 25), (4, 26), (5, 27), (6, 28)] {
            set(&now, &format!("2026-11-{day}T12:00:00Z"));
            sink.write(&[event("f", "t", seq, "x")]).unwrap();
        }
        sink.wait_for_maintenance();
        assert_eq!(
            names(dir),
            [
                "f-2026-11-26.jsonl.zst",
                "f-2026-11-27.jsonl.zst",
                "f-2026-11-28.jsonl"
            ]
        );
        assert_eq!(seqs_of(&dir.join("f-2026-11-27.jsonl.zst")), [5]);
    }

    #[test]
    fn strftime_and_size_rotation_together() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let (clock, now) = manual_clock("2026-11-24T10:00:00Z");
        let mut sink = rotating_sink(dir, "e-%Y-%m-%d.jsonl", clock, |c| {
            c.rotate_size = Some(ByteSize(300));
            c.max_files = Some(5);
        });
        let mut seq = 0;
        for day in [24, 25] {
            set(&now, &format!("2026-11-{day}T10:00:00Z"));
            for _ in 0..4 {
                seq += 1;
                sink.write(&[event("f", "t", seq, &"z".repeat(150))])
                    .unwrap();
            }
        }
        sink.wait_for_maintenance();
        // Each event fills a file: per day three rotated files and the day's file. Of the
        // seven closed files the five newest stay; within a day, the day's file (the last
        // one written) is the newest.
        assert_eq!(names(dir).len(), 6, "{:?}", names(dir));
        assert!(names(dir).contains(&"e-2026-11-24.jsonl".to_string()));
        assert!(names(dir).contains(&"e-2026-11-25.jsonl".to_string()));
        let series = sink.template.series("f", "t").unwrap();
        let mut kept: Vec<(Option<NaiveDateTime>, i64, String)> = names(dir)
            .into_iter()
            .map(|n| {
                let m = series.classify(&n).unwrap();
                (m.period, m.stamp.unwrap_or(i64::MAX), n)
            })
            .collect();
        kept.sort();
        let seqs: Vec<u64> = kept
            .iter()
            .flat_map(|(_, _, n)| seqs_of(&dir.join(n)))
            .collect();
        assert_eq!(seqs, [3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn compressed_files_hold_exactly_the_original() {
        for codec in [Compress::Gzip, Compress::Zstd] {
            let dir = tempfile::tempdir().unwrap();
            let dir = dir.path();
            let (clock, now) = manual_clock("2026-11-24T08:00:00Z");
            let mut sink = rotating_sink(dir, "{feed}.jsonl", clock, |c| {
                c.rotate_size = Some(ByteSize(64 * 1024));
                c.compress = codec;
            });
            let all: Vec<_> = (1..=2000)
                .map(|i| event("a", "t", i, &format!("{i:0>90}")))
                .collect();
            for (i, batch) in all.chunks(100).enumerate() {
                set(&now, &format!("2026-11-24T08:00:{i:02}Z"));
                sink.write(batch).unwrap();
            }
            sink.wait_for_maintenance();
            let listing = names(dir);
            let (packed, plain): (Vec<_>, Vec<_>) =
                listing.iter().partition(|n| n.ends_with(codec.suffix()));
            assert!(packed.len() >= 3, "{listing:?}");
            assert_eq!(plain, ["a.jsonl"], "{listing:?}");
            let mut restored = Vec::new();
            for name in packed.iter().chain(plain.iter()) {
                restored.extend(content(&dir.join(name)));
            }
            assert_eq!(restored, encoded(&all), "{codec:?}");

            // Directly: the copy keeps the original's modification time, and a stop leaves
            // no copy.
            let src = dir.join("a.jsonl");
            let modified = at("2026-01-02T03:04:05Z");
            File::options()
                .write(true)
                .open(&src)
                .unwrap()
                .set_modified(modified.into())
                .unwrap();
            let tmp = dir.join("copy.tmp");
            assert!(compress_to(&src, &tmp, codec, &AtomicBool::new(false)).unwrap());
            assert!(same_content(&src, &tmp, codec).unwrap());
            let copy_time: DateTime<Utc> =
                std::fs::metadata(&tmp).unwrap().modified().unwrap().into();
            assert_eq!(copy_time, modified);
            assert!(!compress_to(&src, &tmp, codec, &AtomicBool::new(true)).unwrap());
            std::fs::write(&tmp, b"not compressed").unwrap();
            assert!(!same_content(&src, &tmp, codec).unwrap_or(false));
        }
    }

    #[test]
    fn leftovers_of_a_crash_are_cleaned_up_without_losing_data() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        std::fs::create_dir_all(dir).unwrap();
        let line = |seq| encoded(&[event("e", "t", seq, "payload")]);
        let stop = AtomicBool::new(false);
        // Crashed between the rename and the delete: a complete copy and the original.
        let done = dir.join("e.2026-11-24T08-00-00.000Z.jsonl");
        std::fs::write(&done, line(1)).unwrap();
        assert!(compress_to(&done, &with_suffix(&done, ".gz"), Compress::Gzip, &stop).unwrap());
        // A name clash with different contents: both stay.
        let clash = dir.join("e.2026-11-24T09-00-00.000Z.jsonl");
        std::fs::write(&clash, line(2)).unwrap();
        let other = dir.join("elsewhere");
        std::fs::write(&other, line(99)).unwrap();
        assert!(compress_to(&other, &with_suffix(&clash, ".gz"), Compress::Gzip, &stop).unwrap());
        std::fs::remove_file(&other).unwrap();
        // Crashed while compressing: a partial temporary file.
        let partial = dir.join("e.2026-11-24T10-00-00.000Z.jsonl");
        std::fs::write(&partial, line(3)).unwrap();
        std::fs::write(with_suffix(&partial, ".gz.tmp"), b"\x1f\x8b partial").unwrap();

        let (clock, _now) = manual_clock("2026-11-24T11:00:00Z");
        let mut sink = rotating_sink(dir, "e.jsonl", clock, |c| {
            c.rotate_size = Some(ByteSize(1 << 20));
            c.compress = Compress::Gzip;
        });
        sink.write(&[event("e", "t", 4, "payload")]).unwrap();
        sink.wait_for_maintenance();
        assert_eq!(
            names(dir),
            [
                "e.2026-11-24T08-00-00.000Z.jsonl.gz",
                "e.2026-11-24T09-00-00.000Z.jsonl",
                "e.2026-11-24T09-00-00.000Z.jsonl.gz",
                "e.2026-11-24T10-00-00.000Z.jsonl.gz",
                "e.jsonl",
            ]
        );
        assert_eq!(seqs_of(&with_suffix(&done, ".gz")), [1]);
        assert_eq!(seqs_of(&clash), [2]);
        assert_eq!(seqs_of(&with_suffix(&partial, ".gz")), [3]);
    }

    #[test]
    fn the_helper_leaves_files_in_use_alone() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let (clock, _now) = manual_clock("2026-11-24T11:00:00Z");
        let template = Template::parse(&format!("{}/e.jsonl", dir.display()), 0).unwrap();
        let series = template.series("f", "t").unwrap();
        let rotated = series.path_of("e.2026-11-24T08-00-00.000Z.jsonl");
        std::fs::write(&rotated, encoded(&[event("f", "t", 1, "x")])).unwrap();
        let worker = Worker {
            name: "archive".into(),
            compress: Compress::Zstd,
            max_files: None,
            max_age: None,
            clock,
            stop: Arc::new(AtomicBool::new(false)),
            claims: Arc::new(Mutex::new(Claims::default())),
        };
        lock(&worker.claims).in_use.insert(rotated.clone());
        worker.sweep(&series);
        assert_eq!(names(dir), ["e.2026-11-24T08-00-00.000Z.jsonl"]);
        lock(&worker.claims).in_use.clear();
        worker.sweep(&series);
        assert_eq!(names(dir), ["e.2026-11-24T08-00-00.000Z.jsonl.zst"]);
        assert!(lock(&worker.claims).claimed.is_empty());

        // And the sink does not open a file the helper has claimed.
        let path = format!("{}/e.jsonl", dir.display());
        let mut cfg = FileSinkConfig::new(path.as_str());
        cfg.rotate_size = Some(ByteSize(1000));
        cfg.compress = Compress::Gzip;
        let mut sink = FileSink::build("archive", &cfg).unwrap();
        let claims = sink.maintenance.as_ref().unwrap().claims.clone();
        lock(&claims).claimed.insert(PathBuf::from(&path));
        let err = sink
            .write(&[event("f", "t", 2, "y")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("being compressed or deleted"), "{err}");
        lock(&claims).claimed.clear();
        sink.write(&[event("f", "t", 2, "y")]).unwrap();
        assert_eq!(seqs(Path::new(&path)), [2]);
    }

    #[test]
    fn reopen_after_an_external_rename_starts_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let mut sink = sink_in(dir, "events.jsonl", FsyncPolicy::Never);
        sink.write(&[event("f", "t", 1, "a"), event("f", "t", 2, "b")])
            .unwrap();
        // logrotate's `create` mode renames the file away...
        std::fs::rename(dir.join("events.jsonl"), dir.join("events.jsonl.1")).unwrap();
        // ...while the sink still writes to it, until told to reopen.
        sink.write(&[event("f", "t", 3, "c")]).unwrap();
        sink.reopen().unwrap();
        sink.write(&[event("f", "t", 4, "d")]).unwrap();
        assert_eq!(seqs(&dir.join("events.jsonl.1")), [1, 2, 3]);
        assert_eq!(seqs(&dir.join("events.jsonl")), [4]);
        // Reopening without a rename continues the same file.
        sink.reopen().unwrap();
        sink.write(&[event("f", "t", 5, "e")]).unwrap();
        assert_eq!(seqs(&dir.join("events.jsonl")), [4, 5]);
        assert!(sink.files.values().all(|f| f.len > 0));
    }

    #[test]
    fn a_failed_batch_undoes_its_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let (clock, _now) = manual_clock("2026-11-24T08:00:00Z");
        let mut sink = rotating_sink(dir, "{feed}/{type}.jsonl", clock, |c| {
            c.rotate_size = Some(ByteSize(300));
            c.max_files = Some(100);
        });
        sink.write(&[event("f", "a", 1, &"1".repeat(100))]).unwrap();
        let a = dir.join("f/a.jsonl");
        let before = std::fs::read(&a).unwrap();
        let in_the_way = dir.join("f/b.jsonl");
        std::fs::create_dir(&in_the_way).unwrap();
        let mut batch: Vec<_> = (2..=10)
            .map(|i| event("f", "a", i, &"1".repeat(100)))
            .collect();
        batch.push(event("f", "b", 11, "blocked"));
        for _ in 0..2 {
            let err = sink.write(&batch).unwrap_err().to_string();
            assert!(err.contains(&in_the_way.display().to_string()), "{err}");
            assert_eq!(names(&dir.join("f")), ["a.jsonl", "b.jsonl"]);
            assert_eq!(std::fs::read(&a).unwrap(), before);
        }
        std::fs::remove_dir(&in_the_way).unwrap();
        sink.write(&batch).unwrap();
        sink.wait_for_maintenance();
        let mut seqs_a = Vec::new();
        let listing = names(&dir.join("f"));
        assert!(listing.len() > 4, "{listing:?}");
        for name in listing.iter().filter(|n| n.starts_with("a.")) {
            let path = dir.join("f").join(name);
            assert!(std::fs::metadata(&path).unwrap().len() <= 300);
            seqs_a.extend(seqs(&path));
        }
        assert_eq!(seqs_a, (1..=10).collect::<Vec<_>>());
        assert_eq!(seqs(&dir.join("f/b.jsonl")), [11]);
        let m = sink.maintenance.as_ref().unwrap();
        assert!(lock(&m.claims)
            .in_use
            .iter()
            .all(|p| !p.to_string_lossy().contains("T08")));
    }

    #[test]
    fn rotated_names_sort_by_age_when_the_clock_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let (clock, now) = manual_clock("2026-11-24T10:00:00Z");
        let configure = |c: &mut FileSinkConfig| c.rotate_size = Some(ByteSize(10));
        let mut sink = rotating_sink(dir, "e.jsonl", clock.clone(), configure);
        sink.write(&[event("f", "t", 1, "a")]).unwrap();
        sink.write(&[event("f", "t", 2, "b")]).unwrap();
        set(&now, "2026-11-24T09:00:00Z");
        sink.write(&[event("f", "t", 3, "c")]).unwrap();
        drop(sink);
        // A restart with the clock behind: the names on disk are taken into account.
        let mut sink = rotating_sink(dir, "e.jsonl", clock, configure);
        sink.write(&[event("f", "t", 4, "d")]).unwrap();
        assert_eq!(
            names(dir),
            [
                "e.2026-11-24T10-00-00.000Z.jsonl",
                "e.2026-11-24T10-00-00.001Z.jsonl",
                "e.2026-11-24T10-00-00.002Z.jsonl",
                "e.jsonl"
            ]
        );
        let order: Vec<u64> = names(dir).iter().flat_map(|n| seqs(&dir.join(n))).collect();
        assert_eq!(order, [1, 2, 3, 4]);
    }
}
