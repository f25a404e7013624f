//! JSON Lines logs made of many files: the files a file sink's path template, rotation and
//! compression can have produced (or every file under a directory), each opened through its
//! compression (recognised by its first bytes), merged back into the order they were stored.
//!
//! Order: every file holds its events in the order the sink wrote them, which for one feed is
//! `seq` order. Files are merged by receive time, then feed and `seq`: a feed's events were
//! received in `seq` order, so this keeps each feed in `seq` order, interleaves several feeds
//! (a `{feed}` or `{type}` template spreads them over files) the way they arrived, and needs
//! nothing but the next event of each file. Files are opened only when their first event is
//! next, so at any time only the files whose events overlap are open (one per series), and
//! memory holds one event per open file.
//!
//! Exactly once: a file caught mid-compression exists twice (`X` and `X.gz`, or a partial
//! `X.gz.tmp`): `.tmp` files are never read, and when both `X` and its compressed copy exist
//! the uncompressed original is read (it is complete; the copy was made from it). An event
//! stored twice (the same feed and `seq`, as after a crash the bridge fetches a few events
//! again) comes out once.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, Utc};

use crate::event::Event;
use crate::sink::file::FileSinkConfig;
use crate::sink::naming::path::{absolute, Template};
use crate::store::jsonl;

/// Directory levels a directory given on the command line is searched to (`{feed}/{type}/…`).
const MAX_DEPTH: usize = 8;
/// Read buffer per open file.
const READ_BUFFER: usize = 64 * 1024;
/// Bytes read from the end of an uncompressed file to find its last line (`--since`).
const TAIL_PEEK: u64 = 256 * 1024;

/// How a file is stored, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn of(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Compression::None => "plain",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// The files to read, found from paths or from a file sink's configuration.
pub fn discover_paths(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        let shown = path.display();
        let meta = std::fs::metadata(path).with_context(|| format!("cannot read {shown}"))?;
        if meta.is_dir() {
            walk(path, MAX_DEPTH, &mut out, &|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.') && !n.ends_with(".tmp"))
            })
            .with_context(|| format!("cannot list {shown}"))?;
        } else if meta.is_file() {
            out.push(path.clone());
        } else {
            bail!("{shown} is neither a regular file nor a directory");
        }
    }
    Ok(keep_originals(out))
}

/// Every file the sink's path template, rotation and compression can have produced, for any
/// feed, type or time (`.tmp` leftovers excepted).
pub fn discover_sink(name: &str, config: &FileSinkConfig) -> anyhow::Result<Vec<PathBuf>> {
    // The reserve only limits how long a rendered name may be; recognising names needs none.
    let template = Template::parse(&config.path, 0).map_err(|errors| {
        anyhow!(
            "sink `{name}`: path `{}`: {}",
            config.path,
            errors.join("; ")
        )
    })?;
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let base = absolute(&template.base, &cwd);
    let mut out = Vec::new();
    if base.is_dir() {
        let depth = template.components.len().saturating_sub(1);
        walk_exact(&base, depth, &mut out)
            .with_context(|| format!("sink `{name}`: cannot list {}", base.display()))?;
    }
    out.retain(|p| {
        !p.to_string_lossy().ends_with(".tmp") && template.matches(&base, &absolute(p, &cwd))
    });
    Ok(keep_originals(out))
}

/// Regular files down to `depth` levels, never through a symbolic link.
fn walk(
    dir: &Path,
    depth: usize,
    out: &mut Vec<PathBuf>,
    keep: &dyn Fn(&Path) -> bool,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if !keep(&path) {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() && depth > 0 {
            walk(&path, depth - 1, out, keep)?;
        } else if kind.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// Regular files exactly `depth` directories below `dir`, never through a symbolic link.
fn walk_exact(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if depth == 0 && kind.is_file() {
            out.push(entry.path());
        } else if depth > 0 && kind.is_dir() {
            walk_exact(&entry.path(), depth - 1, out)?;
        }
    }
    Ok(())
}

/// Sorted, without the compressed copy of a file whose original is still there.
fn keep_originals(mut paths: Vec<PathBuf>) -> Vec<PathBuf> {
    paths.sort();
    paths.dedup();
    let all: HashSet<PathBuf> = paths.iter().cloned().collect();
    paths.retain(|p| original_of(p).is_none_or(|o| !all.contains(&o)));
    paths
}

/// `X` for `X.gz` and `X.zst`.
pub(super) fn original_of(path: &Path) -> Option<PathBuf> {
    let s = path.to_str()?;
    let o = s.strip_suffix(".gz").or_else(|| s.strip_suffix(".zst"))?;
    Some(PathBuf::from(o))
}

/// Counts the bytes read from a file (before decompression), for the progress report.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// One file of the log.
pub struct LogFile {
    pub path: PathBuf,
    /// Its size when found (what the progress report counts).
    pub size: u64,
    /// An uncompressed file stays open from the first scan on: the bridge may rename it
    /// (rotation) or delete it (after compressing it) meanwhile, and what was read must stay
    /// readable. Compressed files are never changed, only deleted by retention.
    handle: Option<File>,
    pub dev_ino: (u64, u64),
    /// Complete lines found by the first scan: later scans stop there.
    pub lines: Option<u64>,
    /// Bytes of those lines (uncompressed files: where following continues).
    pub bytes: u64,
    /// The first event, when the file has one (found by the first scan).
    first: Option<Key>,
    /// The first scan found a last line without a line end (a file still being written).
    pub torn: bool,
    /// Left out whole by `--since`.
    pub skipped: bool,
}

/// The merge order: receive time, then feed and `seq`, then the file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Key {
    at: DateTime<Utc>,
    feed: Arc<str>,
    seq: u64,
    file: usize,
}

impl Key {
    pub(super) fn of(e: &Event, file: usize) -> Key {
        Key {
            at: e.received_at,
            feed: e.feed.clone(),
            seq: e.seq,
            file,
        }
    }
}

/// Lines of one file, decompressed.
pub(super) struct Lines {
    shown: String,
    reader: Box<dyn BufRead>,
    compression: Compression,
    line: Vec<u8>,
    pub(super) number: u64,
    pub(super) bytes: u64,
    limit: Option<u64>,
    /// Whether a torn last line is an error (a file named on the command line, a compressed
    /// file) or a line still being written.
    strict: bool,
    pub(super) torn: bool,
}

impl Lines {
    fn open(
        file: File,
        shown: String,
        count: Arc<AtomicU64>,
        strict: bool,
    ) -> anyhow::Result<Lines> {
        let mut raw = BufReader::with_capacity(READ_BUFFER, Counting { inner: file, count });
        let head = raw
            .fill_buf()
            .with_context(|| format!("cannot read {shown}"))?;
        let compression = Compression::of(head);
        let reader: Box<dyn BufRead> = match compression {
            Compression::None => Box::new(raw),
            Compression::Gzip => Box::new(BufReader::with_capacity(
                READ_BUFFER,
                flate2::bufread::MultiGzDecoder::new(raw),
            )),
            Compression::Zstd => Box::new(BufReader::with_capacity(
                READ_BUFFER,
                zstd::stream::read::Decoder::with_buffer(raw)
                    .with_context(|| format!("{shown}: cannot start zstd decompression"))?,
            )),
        };
        Ok(Lines {
            shown,
            reader,
            compression,
            line: Vec::with_capacity(4096),
            number: 0,
            bytes: 0,
            limit: None,
            strict: strict || compression != Compression::None,
            torn: false,
        })
    }

    pub(super) fn is_plain(&self) -> bool {
        self.compression == Compression::None
    }

    /// The next event, `None` at the end (or at the limit, or before a torn last line that
    /// is not an error).
    pub(super) fn next_event(&mut self) -> anyhow::Result<Option<Event>> {
        if self.limit.is_some_and(|l| self.number >= l) {
            return Ok(None);
        }
        self.line.clear();
        let n = self.reader.read_until(b'\n', &mut self.line).map_err(|e| {
            if self.compression == Compression::None {
                anyhow!("cannot read {}: {e}", self.shown)
            } else {
                anyhow!(
                    "{}: cannot decompress ({}) after {} lines: {e}: the file is corrupt or \
                     cut short",
                    self.shown,
                    self.compression.name(),
                    self.number
                )
            }
        })?;
        if n == 0 {
            return Ok(None);
        }
        let number = self.number + 1;
        let at = || format!("{}: line {number}", self.shown);
        if self.line.last() != Some(&b'\n') {
            if self.strict {
                bail!(
                    "{}: the last line is incomplete (no line end): was the file cut short?",
                    at()
                );
            }
            // Still being written: left for a later look (--follow reads it when complete).
            self.torn = true;
            return Ok(None);
        }
        let text = std::str::from_utf8(&self.line)
            .map_err(|e| anyhow!("{}: not valid UTF-8 ({e})", at()))?;
        if text.trim().is_empty() {
            bail!("{}: the line is empty; a file sink never writes one", at());
        }
        let event = jsonl::decode(text).map_err(|e| match self.compression {
            Compression::None => anyhow!("{}: {e}", at()),
            c => anyhow!(
                "{}: {e} (decompressed from {}: is the file corrupt?)",
                at(),
                c.name()
            ),
        })?;
        self.number = number;
        self.bytes += n as u64;
        Ok(Some(event))
    }
}

/// A log of JSON Lines files.
pub struct SeriesLog {
    pub files: Vec<LogFile>,
    /// Whether the files were named one by one on the command line (a torn last line is then
    /// an error, as for any file cut short).
    strict: bool,
    /// Bytes read from the files, across scans.
    pub read_bytes: Arc<AtomicU64>,
    /// Events dropped as stored twice, by the last scan.
    pub duplicates: u64,
    /// Files opened by the last scan, in order.
    pub opened: Vec<usize>,
}

/// What one scan hands on: an event, and the index of the file it came from.
pub type Visit<'a> = dyn FnMut(Event) -> anyhow::Result<()> + 'a;

impl SeriesLog {
    /// Opens every file (reads its first bytes: the compression, and nothing is written if
    /// one cannot be read).
    pub fn open(paths: Vec<PathBuf>, strict: bool) -> anyhow::Result<SeriesLog> {
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let shown = path.display().to_string();
            let file = File::open(&path).with_context(|| format!("cannot open {shown}"))?;
            let meta = file
                .metadata()
                .with_context(|| format!("cannot read {shown}"))?;
            let mut head = [0u8; 4];
            let n = (&file)
                .take(4)
                .read(&mut head)
                .with_context(|| format!("cannot read {shown}"))?;
            let compression = Compression::of(&head[..n]);
            if n == 4 && head == *b"SQLi" {
                bail!(
                    "{shown} looks like an SQLite database: replay a database on its own, not \
                     in a series of JSON Lines files"
                );
            }
            files.push(LogFile {
                path,
                size: meta.len(),
                handle: (compression == Compression::None).then_some(file),
                dev_ino: (meta.dev(), meta.ino()),
                lines: None,
                bytes: 0,
                first: None,
                torn: false,
                skipped: false,
            });
        }
        Ok(SeriesLog {
            files,
            strict,
            read_bytes: Arc::new(AtomicU64::new(0)),
            duplicates: 0,
            opened: Vec::new(),
        })
    }

    /// The bytes of all files (compressed sizes where compressed).
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// If every event of file `i` was received before `since`: where its complete lines end
    /// (0 for a compressed file). Known from a rotation stamp in the name without reading the
    /// file, or from the last line of an uncompressed file.
    fn ends_before(&self, i: usize, since: DateTime<Utc>) -> anyhow::Result<Option<u64>> {
        let f = &self.files[i];
        if rotation_stamp(&f.path).is_some_and(|t| t < since) && f.handle.is_none() {
            return Ok(Some(0));
        }
        let Some(h) = &f.handle else {
            return Ok(None);
        };
        let shown = f.path.display();
        let len = h
            .metadata()
            .with_context(|| format!("cannot read {shown}"))?
            .len();
        // The last complete line (lines are far shorter than this, but a line longer
        // than what is read is simply not decided here).
        let start = len.saturating_sub(TAIL_PEEK);
        let mut buf = vec![0u8; usize::try_from(len - start).unwrap_or(0)];
        h.read_exact_at(&mut buf, start)
            .with_context(|| format!("cannot read {shown}"))?;
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            return Ok(None);
        };
        let begin = buf[..end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        if begin == 0 && start > 0 {
            return Ok(None);
        }
        let last = std::str::from_utf8(&buf[begin..=end])
            .ok()
            .and_then(|t| jsonl::decode(t).ok());
        Ok(last
            .filter(|e| e.received_at < since)
            .map(|_| start + end as u64 + 1))
    }

    fn lines_of(&self, i: usize) -> anyhow::Result<Lines> {
        let f = &self.files[i];
        let shown = f.path.display().to_string();
        let file = match &f.handle {
            Some(h) => {
                let mut h = h
                    .try_clone()
                    .with_context(|| format!("cannot read {shown}"))?;
                h.seek(SeekFrom::Start(0))
                    .with_context(|| format!("cannot read {shown}"))?;
                h
            }
            None => File::open(&f.path).with_context(|| format!("cannot open {shown}"))?,
        };
        let mut lines = Lines::open(file, shown, self.read_bytes.clone(), self.strict)?;
        lines.limit = f.lines;
        Ok(lines)
    }

    /// Calls `visit` for every event `keep` accepts, in the merge order, each stored event
    /// once; returns the events read. The first scan reads every file to its end (checking
    /// every line) and fixes where later scans stop. `until`: files whose first event is at
    /// or after it are not opened again. `since`: files whose events were all received
    /// before it, by their rotation stamp or (uncompressed) their last line, are not opened.
    pub fn scan(
        &mut self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        visit: &mut Visit<'_>,
    ) -> anyhow::Result<u64> {
        let first_scan = self.files.iter().all(|f| f.lines.is_none());
        self.read_bytes.store(0, Ordering::Relaxed);
        self.duplicates = 0;
        self.opened.clear();
        let mut open: HashMap<usize, (Lines, Option<Event>)> = HashMap::new();
        let mut heap: BinaryHeap<Reverse<Key>> = BinaryHeap::new();
        let mut unknown = Vec::new();
        for (i, f) in self.files.iter().enumerate() {
            match &f.first {
                Some(k) if until.is_some_and(|u| k.at >= u) => {}
                Some(k) => heap.push(Reverse(k.clone())),
                None if first_scan => unknown.push(i),
                None => {}
            }
        }
        // The first scan learns each file's first event, one file open at a time.
        for i in unknown {
            if let Some(since) = since {
                if let Some(end) = self.ends_before(i, since)? {
                    let f = &mut self.files[i];
                    f.lines = Some(0);
                    f.bytes = end;
                    f.skipped = true;
                    continue;
                }
            }
            let mut lines = self.lines_of(i)?;
            if let Some(e) = lines.next_event()? {
                let key = Key::of(&e, i);
                self.files[i].first = Some(key.clone());
                if until.is_none_or(|u| key.at < u) {
                    heap.push(Reverse(key));
                }
            } else {
                self.files[i].lines = Some(0);
                self.files[i].torn = lines.torn;
            }
        }
        let mut last: HashMap<Arc<str>, u64> = HashMap::new();
        let mut read = 0u64;
        while let Some(Reverse(key)) = heap.pop() {
            let i = key.file;
            if let Entry::Vacant(slot) = open.entry(i) {
                // Its first event is next: open it now.
                let mut lines = self.lines_of(i)?;
                self.opened.push(i);
                let Some(e) = lines.next_event()? else {
                    continue;
                };
                if Key::of(&e, i) != key {
                    bail!(
                        "{} changed while it was read (its first line is not what it was)",
                        self.files[i].path.display()
                    );
                }
                slot.insert((lines, Some(e)));
            }
            let Some((lines, head)) = open.get_mut(&i) else {
                continue;
            };
            let Some(event) = head.take() else {
                continue;
            };
            read += 1;
            // Advance the file past this event.
            match lines.next_event()? {
                Some(next) => {
                    heap.push(Reverse(Key::of(&next, i)));
                    *head = Some(next);
                }
                None => {
                    if first_scan {
                        let f = &mut self.files[i];
                        f.lines = Some(lines.number);
                        f.bytes = lines.bytes;
                        f.torn = lines.torn;
                    }
                    open.remove(&i);
                }
            }
            match last.get_mut(&event.feed) {
                Some(seq) if *seq == event.seq => {
                    self.duplicates += 1;
                    continue;
                }
                Some(seq) => *seq = event.seq,
                None => {
                    last.insert(event.feed.clone(), event.seq);
                }
            }
            visit(event)?;
        }
        Ok(read)
    }

    /// The uncompressed files, each with where reading stopped: what `--follow` continues.
    pub(super) fn take_tails(&mut self) -> Vec<(PathBuf, File, (u64, u64), u64)> {
        self.files
            .iter_mut()
            .filter_map(|f| {
                let h = f.handle.take()?;
                Some((f.path.clone(), h, f.dev_ino, f.bytes))
            })
            .collect()
    }
}

/// The rotation stamp in a rotated file's name (`NAME.2026-11-24T08-30-00.123Z.EXT`, with or
/// without `.gz`/`.zst`): the sink closed the file then, after every event in it was received.
fn rotation_stamp(path: &Path) -> Option<DateTime<Utc>> {
    let name = path.file_name()?.to_str()?;
    let name = name
        .strip_suffix(".gz")
        .or_else(|| name.strip_suffix(".zst"))
        .unwrap_or(name);
    let before_ext = name.rfind('.').map_or(name, |i| &name[..i]);
    [before_ext, name].iter().find_map(|n| {
        let stamp = n.get(n.len().checked_sub(24)?..)?;
        n[..n.len() - 24].ends_with('.').then_some(())?;
        chrono::NaiveDateTime::parse_from_str(stamp, "%Y-%m-%dT%H-%M-%S%.3fZ")
            .ok()
            .map(|t| t.and_utc())
    })
}

/// Decodes the complete lines of `buf` (a chunk read from an uncompressed file), returning
/// the events and how many bytes they took; a torn last line is left.
pub(super) fn decode_complete(shown: &str, buf: &[u8]) -> anyhow::Result<(Vec<Event>, usize)> {
    let mut events = Vec::new();
    let mut used = 0;
    while let Some(end) = buf[used..].iter().position(|&b| b == b'\n') {
        let line = &buf[used..used + end + 1];
        let text = std::str::from_utf8(line)
            .map_err(|e| anyhow!("{shown}: a line is not valid UTF-8 ({e})"))?;
        let event = jsonl::decode(text).map_err(|e| anyhow!("{shown}: {e}"))?;
        events.push(event);
        used += end + 1;
    }
    Ok((events, used))
}

/// Opens `path` for reading as a compressed or plain file (follow mode: a file that appeared).
pub(super) fn open_lines(path: &Path, count: Arc<AtomicU64>) -> anyhow::Result<Lines> {
    let shown = path.display().to_string();
    let file = File::open(path).with_context(|| format!("cannot open {shown}"))?;
    Lines::open(file, shown, count, false)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn event(feed: &str, seq: u64, second: i64) -> Event {
        Event {
            feed: feed.into(),
            event_type: "message".into(),
            data: format!("{feed} {seq}"),
            id: seq.to_string().into(),
            received_at: DateTime::from_timestamp(1_800_000_000 + second, 0).expect("time"),
            seq,
        }
    }

    fn lines(events: &[Event]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            jsonl::encode(e, &mut out);
        }
        out
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).expect("gzip");
        enc.finish().expect("gzip")
    }

    #[test]
    fn files_merge_by_receive_time_each_event_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        // Feed a in a plain file still being written (torn last line), feed b compressed
        // under a name that says nothing, feed c caught mid-compression.
        let mut a = lines(&[event("a", 1, 1), event("a", 2, 3), event("a", 3, 5)]);
        a.extend_from_slice(b"{\"feed\":\"a\",\"ty");
        std::fs::write(d.join("a.jsonl"), &a).expect("write");
        let b = lines(&[event("b", 7, 2), event("b", 8, 4)]);
        std::fs::write(d.join("b.log"), gzip(&b)).expect("write");
        let c = lines(&[event("c", 1, 0), event("c", 2, 6)]);
        std::fs::write(d.join("c.jsonl"), &c).expect("write");
        std::fs::write(d.join("c.jsonl.gz"), gzip(&c)).expect("write");
        std::fs::write(d.join("c.jsonl.gz.tmp"), &gzip(&c)[..10]).expect("write");
        // An event stored twice (fetched again after a crash) in the next file of a.
        let a2 = lines(&[event("a", 3, 5), event("a", 4, 7)]);
        std::fs::write(d.join("a.2.jsonl"), &a2).expect("write");

        let paths = discover_paths(&[d.to_path_buf()]).expect("discover");
        let names: Vec<String> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.2.jsonl", "a.jsonl", "b.log", "c.jsonl"]);
        let mut log = SeriesLog::open(paths, false).expect("open");
        for _pass in 0..2 {
            let mut got = Vec::new();
            let read = log
                .scan(None, None, &mut |e| {
                    got.push(format!("{}{}", e.feed, e.seq));
                    Ok(())
                })
                .expect("scan");
            assert_eq!(got, ["c1", "a1", "b7", "a2", "b8", "a3", "c2", "a4"]);
            assert_eq!(read, 9);
            assert_eq!(log.duplicates, 1);
        }
        assert!(log.files.iter().any(|f| f.torn), "the torn line is noticed");
        // Files starting at or after --until are not opened.
        let until = DateTime::from_timestamp(1_800_000_006, 0);
        let mut got = 0;
        log.scan(None, until, &mut |_| {
            got += 1;
            Ok(())
        })
        .expect("scan");
        assert_eq!(got, 8, "a.2.jsonl starts at 5: still read");

        // Rotated files stamped before --since, and uncompressed files whose last line is,
        // are not opened.
        let stamped = d.join("b.2030-01-01T00-00-00.000Z.log.gz");
        assert_eq!(
            rotation_stamp(&stamped).map(|t| t.to_rfc3339()),
            Some("2030-01-01T00:00:00+00:00".to_string())
        );
        assert_eq!(rotation_stamp(&d.join("b.log.gz")), None);
        let paths = discover_paths(&[d.to_path_buf()]).expect("discover");
        let mut log = SeriesLog::open(paths, false).expect("open");
        let since = DateTime::from_timestamp(1_800_000_006, 0);
        let mut got = Vec::new();
        log.scan(since, None, &mut |e| {
            got.push(format!("{}{}", e.feed, e.seq));
            Ok(())
        })
        .expect("scan");
        // c.jsonl ends at 6 and a.2.jsonl at 7: read; a.jsonl ends at 5: left out (b.log has
        // no stamp and is compressed: read).
        assert_eq!(got, ["c1", "b7", "b8", "a3", "c2", "a4"]);
        assert!(log
            .files
            .iter()
            .any(|f| f.skipped && f.path.ends_with("a.jsonl")));

        // The same torn line in a file named on its own is an error naming it.
        let strict = SeriesLog::open(vec![d.join("a.jsonl")], true)
            .expect("open")
            .scan(None, None, &mut |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            strict.contains("a.jsonl: line 4") && strict.contains("incomplete"),
            "{strict}"
        );
        // A corrupt compressed file names itself.
        let mut bad = gzip(&b);
        let n = bad.len();
        bad.truncate(n - 12);
        std::fs::write(d.join("b.log"), bad).expect("write");
        let err = SeriesLog::open(vec![d.join("b.log")], false)
            .expect("open")
            .scan(None, None, &mut |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("b.log") && err.contains("gzip"), "{err}");
    }
}
