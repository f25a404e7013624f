//! The file sink's writing side: the open-file cache, a batch and the undo of a failed one,
//! opening below the base directory without following links, and the torn-tail repair
//! (ARCHITECTURE.md, "Hostile input and bounded resources").

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::rotation::period_index;
use super::{parent_dir, FileSink, FsyncPolicy};
use crate::event::Event;
use crate::sink::naming::path::Series;
use crate::sink::{jsonl, SinkError};

/// Open file handles kept per sink; when more are needed, all are closed first.
pub(super) const MAX_OPEN_FILES: usize = 256;
/// The encoded-line buffer keeps at most this capacity between batches (see `write_batch`).
const RETAINED_LINE_CAPACITY: usize = 1024 * 1024;

/// One open output file.
pub(super) struct OpenFile {
    pub(super) writer: BufWriter<File>,
    /// Written to since the last fsync.
    pub(super) unsynced: bool,
    /// Length including buffered bytes.
    pub(super) len: u64,
    /// With `rotate_interval`: the interval the data in the file belongs to (`None` while
    /// the file is empty).
    pub(super) period: Option<i64>,
    pub(super) series: Arc<Series>,
}

/// A rotation done by the batch in progress.
pub(super) struct Rotated {
    pub(super) key: String,
    pub(super) rotated: PathBuf,
    pub(super) series: Arc<Series>,
}

/// What a batch did, to commit or undo it.
#[derive(Default)]
pub(super) struct Batch {
    /// Each file's length before the batch's first write to it.
    pub(super) touched: HashMap<String, u64>,
    pub(super) rotations: Vec<Rotated>,
}

/// A step of undoing a failed batch; retried before the next write until it succeeds.
#[derive(Debug)]
pub(super) enum Undo {
    Rename { from: PathBuf, to: PathBuf },
    Truncate { path: PathBuf, len: u64 },
}

impl FileSink {
    /// Finishes the undo of a failed batch.
    pub(super) fn apply_pending_undo(&mut self) -> Result<(), SinkError> {
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
    pub(super) fn close_file(
        &mut self,
        key: &str,
        keep_held: bool,
    ) -> Result<Option<Arc<Series>>, SinkError> {
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
    pub(super) fn close_all(&mut self) -> Result<(), SinkError> {
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
            .map_err(|e| self.name_error(e))?;
        if let Some(known) = self.series.get(&series.key) {
            return Ok(known.clone());
        }
        let series = Arc::new(series);
        self.series.insert(series.key.clone(), series.clone());
        self.request_sweep(&series);
        Ok(series)
    }

    /// Opens (creating it and its directories if needed) the file at `key` for appending.
    pub(super) fn open(
        &mut self,
        key: &str,
        feed: &str,
        event_type: &str,
    ) -> Result<OpenFile, SinkError> {
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

    /// Writes the batch, recording in `batch` what to undo if it fails.
    pub(super) fn write_batch(
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
                    .map_err(|e| self.name_error(e))?;
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
    pub(super) fn commit(&mut self, batch: Batch) {
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
    pub(super) fn rollback(&mut self, batch: Batch) {
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
    pub(super) fn sync_all(&mut self) -> Result<(), SinkError> {
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

    pub(super) fn sync_dirs(&mut self) -> Result<(), SinkError> {
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

/// Whether `name` in the directory `dir` is a symbolic link.
fn is_symlink_at(dir: &rustix::fd::OwnedFd, name: &std::ffi::OsStr) -> bool {
    rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Symlink
    })
}

/// Opens a sink file that already exists, without following a symbolic link in its last
/// component and without blocking on a FIFO; anything but a regular file is refused.
pub(super) fn open_existing(path: &Path, write: bool) -> std::io::Result<File> {
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
pub(super) fn truncate_path(path: &Path, len: u64, sync: bool) -> std::io::Result<()> {
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
