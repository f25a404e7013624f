//! Rotation by renaming: the stamp in a rotated file's name, how a file name is recognised as
//! a member of a series (active, rotated, of an earlier period, compressed), and the
//! time-based roll-over of open files.

use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDateTime, Utc};

use super::{parent_dir, Compress, FileSink, FsyncPolicy};
use crate::sink::naming::path::Series;
use crate::sink::naming::template::format_time;
use crate::sink::SinkError;

/// The rotation stamp inserted into rotated file names: UTC, fixed width, sorts by time.
const STAMP_FORMAT: &str = "%Y-%m-%dT%H-%M-%S%.3fZ";
const STAMP_LEN: usize = 24;
/// Room a file name keeps for `.STAMP` when files are rotated by renaming.
pub(super) const ROTATION_RESERVE: usize = 1 + STAMP_LEN;

/// A file of a series, as recognised from its name.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Member {
    /// The name without a compression suffix.
    pub(super) logical: String,
    pub(super) compressed: Option<Compress>,
    /// With strftime fields: the start of the period in the name.
    pub(super) period: Option<NaiveDateTime>,
    /// The rotation stamp (milliseconds since the epoch), for a rotated file.
    pub(super) stamp: Option<i64>,
}

/// How the file sink reads the names of a series' files: the series (`naming::path`) knows
/// the name's fields; the rotation stamp and the compression suffix are the file sink's.
pub(super) trait Members {
    /// Recognises a file name of this series.
    fn classify(&self, name: &str) -> Option<Member>;
}

impl Members for Series {
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
pub(super) fn rotated_name(key: &str, ext: &str, stamp: &str) -> String {
    let stem = key.strip_suffix(ext).unwrap_or(key);
    format!("{stem}.{stamp}{ext}")
}

/// The number of the `every`-second interval (since the epoch) that `t` falls in.
pub(super) fn period_index(t: DateTime<Utc>, every: i64) -> i64 {
    t.timestamp().div_euclid(every.max(1))
}

impl FileSink {
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
    pub(super) fn rotate(&mut self, key: &str, now: DateTime<Utc>) -> Result<PathBuf, SinkError> {
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
    pub(super) fn roll_over(&mut self, now: DateTime<Utc>) -> Result<(), SinkError> {
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
