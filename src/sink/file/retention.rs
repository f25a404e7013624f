//! Retention (`max_files`, `max_age`) and compression of closed files, on a helper thread
//! (`sink-NAME-files`) so that the sink thread never waits for them, and the claims that keep
//! the two threads off each other's files.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, NaiveDateTime, Utc};

use super::rotation::Members;
use super::writer::open_existing;
use super::{with_suffix, Clock, Compress, FileSink};
use crate::sink::naming::path::Series;
use crate::sink::SinkError;

/// With `max_age`, how often every known file is checked, in seconds.
const AGE_SWEEP_SECS: i64 = 60;

/// Who may touch which file: the sink thread and the helper thread.
#[derive(Debug, Default)]
pub(super) struct Claims {
    /// Paths the sink has open, is rotating, or may rename back.
    pub(super) in_use: HashSet<PathBuf>,
    /// Paths the helper is compressing or deleting.
    pub(super) claimed: HashSet<PathBuf>,
}

pub(super) fn lock(claims: &Mutex<Claims>) -> MutexGuard<'_, Claims> {
    claims
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FileSink {
    /// Marks `path` as in use by the sink, so the helper leaves it alone.
    pub(super) fn hold(&self, path: &Path) {
        if let Some(m) = &self.maintenance {
            lock(&m.claims).in_use.insert(path.to_path_buf());
        }
    }

    /// Like [`hold`](Self::hold), but fails while the helper is working on `path`.
    pub(super) fn hold_to_write(&self, path: &Path) -> Result<(), SinkError> {
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

    pub(super) fn release(&self, path: &Path) {
        if let Some(m) = &self.maintenance {
            lock(&m.claims).in_use.remove(path);
        }
    }

    pub(super) fn request_sweep(&self, series: &Arc<Series>) {
        if let Some(m) = &self.maintenance {
            m.sweep(series.clone());
        }
    }

    /// With `max_age`, asks the helper to look at every series once a minute.
    pub(super) fn sweep_for_age(&mut self, now: DateTime<Utc>) {
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
    pub(super) fn wait_for_maintenance(&self) {
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
pub(super) struct Maintenance {
    jobs: Option<mpsc::Sender<Job>>,
    pub(super) thread: Option<JoinHandle<()>>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) claims: Arc<Mutex<Claims>>,
    pub(super) max_age: Option<Duration>,
}

impl Maintenance {
    pub(super) fn start(worker: Worker) -> std::io::Result<Self> {
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

    pub(super) fn sweep(&self, series: Arc<Series>) {
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
    pub(super) name: String,
    pub(super) period: Option<NaiveDateTime>,
    pub(super) stamp: Option<i64>,
    pub(super) plain: bool,
    pub(super) compressed: Vec<Compress>,
    pub(super) modified: Option<SystemTime>,
}

pub(super) struct Worker {
    pub(super) name: String,
    pub(super) compress: Compress,
    pub(super) max_files: Option<usize>,
    pub(super) max_age: Option<Duration>,
    pub(super) clock: Clock,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) claims: Arc<Mutex<Claims>>,
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

    pub(super) fn sweep(&self, series: &Series) {
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
pub(super) fn compress_to(
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
pub(super) fn same_content(src: &Path, done: &Path, codec: Compress) -> std::io::Result<bool> {
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
