//! The keys of a file sink (their doc comments are the user reference) and their offline
//! checks.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::rotation::ROTATION_RESERVE;
use crate::config::units::ByteSize;
use crate::sink::naming::path::{absolute, Template};
use crate::sink::BufferConfig;

/// Room a file name keeps for `.zst.tmp` when closed files are compressed.
const COMPRESS_RESERVE: usize = 8;

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
    pub(super) fn suffix(self) -> &'static str {
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
    pub(super) fn rotates(&self) -> bool {
        self.rotate_size.is_some() || self.rotate_interval.is_some()
    }

    /// Bytes a rendered file name keeps free for what rotation and compression add.
    pub(super) fn name_reserve(&self) -> usize {
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
