//! Exactly once into files: the file sink's cursor is its own data (ARCHITECTURE.md §4).
//!
//! After a crash the feed resumes from its checkpoint, which may be behind what the files
//! hold (it is committed every `commit_interval`): the server sends those events again. The
//! file sink drops them instead of appending them twice. What it holds is read from the files
//! themselves, so it is always exactly what survived:
//!
//! - When a run of a feed starts after a checkpoint (`feed_started` with `start_seq > 0`), the
//!   sink finds the feed's files (every file the path template can have rendered: rotated and
//!   earlier-period files included, compressed ones left out) and reads, from the end of each,
//!   the last complete line of the feed. Per series (the files one `{feed}`/`{type}` rendering
//!   rotates through) the newest such line is its **floor**: `(seq, id)` of the last event of
//!   the feed stored there.
//! - While the feed is inside the re-fetched window (up to the highest floor), an event whose
//!   `seq` is below its series' floor is a copy and is dropped; the event *at* the floor must
//!   carry the floor's id. If it does, it is dropped too and the series is past its floor. If it
//!   does not, the server did not send the same stream again: a gap (`replay-mismatch`) is
//!   recorded, the event is written, and nothing more is dropped for that series.
//! - Every dropped copy is counted (`sink_duplicates_skipped_total`).
//!
//! Floors are per series, not per feed, because one batch writes several files one after the
//! other: a crash can leave a later event in one file and an earlier one missing from another.
//!
//! The files must continue the feed's numbering: they must hold the event the feed resumes
//! after (`start_seq` with `start_id`), and only series whose last line was received after it
//! count. A feed that starts from the beginning (no checkpoint: the previous run crashed before
//! its first commit, or the checkpoint was reset) is judged by its first event instead: the
//! files must hold that very event (seq, id, type and data). A stream without ids, or files
//! left from another numbering or stream, open no window: nothing is dropped then.
//!
//! With `fsync = "never"` or `"interval"` the files can also lose an acknowledged tail (a
//! power loss): then the checkpoint is ahead of what survived, and [`FileSink::feed_cursor`]
//! tells the supervisor to resume from the highest event the files hold instead (see
//! [`crate::sink::Sink::cursor`]).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{FileSink, SinkError};
use crate::event::Event;
use crate::sink::Cursor;

/// At most this many bytes are read back from the end of a file looking for a feed's last
/// line (a file shared by several feeds may hold none of it near its end).
const SCAN_BUDGET: u64 = 64 * 1024 * 1024;

/// The last event of a feed stored in one series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Floor {
    pub(super) seq: u64,
    pub(super) id: Arc<str>,
}

/// Per series key: its floor and when that event was received.
type SeriesFloors = HashMap<String, (Floor, DateTime<Utc>)>;

/// A feed inside its re-fetched window.
#[derive(Debug)]
pub(super) struct Window {
    url: String,
    /// The highest floor: events above it are all new.
    end: u64,
    /// Floors by series key; a series whose floor was reached (or found wrong) is removed.
    floors: HashMap<String, Floor>,
}

/// A series whose floor a batch reached (or passed).
#[derive(Debug)]
struct Reached {
    feed: Arc<str>,
    series: String,
    floor: Floor,
    /// The id the re-fetched stream had at the floor, when it is not the floor's.
    wrong: Option<Arc<str>>,
}

/// What filtering a batch found, applied once the batch is stored.
#[derive(Debug, Default)]
pub(super) struct Filtered {
    pub(super) kept: Vec<Arc<Event>>,
    skipped: u64,
    /// Series whose floor the batch reached.
    reached: Vec<Reached>,
    /// Feeds the batch took past their window.
    passed: Vec<Arc<str>>,
}

/// The feed's lines at the end of `file`: the last complete line whose feed is `feed`,
/// decoded, if one is found within [`SCAN_BUDGET`] bytes of the end.
#[cfg(test)]
fn last_event_of(file: &File, feed: &str) -> std::io::Result<Option<Event>> {
    Ok(scan_feed(file, feed, None)?.0)
}

/// Reads `file` back from its end: the last complete line of `feed`, and, with `anchor`, the
/// line of `feed` at that `seq` (the scan goes on until a line of the feed at or below it),
/// all within [`SCAN_BUDGET`] bytes of the end.
fn scan_feed(
    file: &File,
    feed: &str,
    anchor: Option<u64>,
) -> std::io::Result<(Option<Event>, Option<Event>)> {
    let mut last: Option<Event> = None;
    let mut found: Option<Event> = None;
    let done = |last: &Option<Event>, found: &Option<Event>, seq: Option<u64>| match anchor {
        None => last.is_some(),
        Some(a) => found.is_some() || seq.is_some_and(|s| s <= a),
    };
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    // Lines of this feed start with this (the encoder writes `feed` first).
    let start = format!(
        "{{\"feed\":{},",
        serde_json::to_string(feed).unwrap_or_default()
    );
    let floor = len.saturating_sub(SCAN_BUDGET);
    let mut end = len;
    // Bytes after the last newline seen so far (a line cut short by a crash, then the
    // start of a line that continues in the next block back).
    let mut carry: Vec<u8> = Vec::new();
    let mut first_block = true;
    while end > floor {
        let begin = end.saturating_sub(64 * 1024).max(floor);
        let mut block = vec![0u8; (end - begin) as usize];
        file.read_exact_at(&mut block, begin)?;
        block.extend_from_slice(&carry);
        // Everything after the last newline of the file is an unfinished line: never a
        // stored event.
        let mut text: &[u8] = &block;
        if first_block {
            match text.iter().rposition(|&b| b == b'\n') {
                Some(i) => text = &text[..=i],
                None => {
                    carry = block;
                    end = begin;
                    continue;
                }
            }
            first_block = false;
        }
        // Complete lines from the end; what precedes the first newline may continue in the
        // block before this one (unless this block starts the file).
        let mut lines_end = text.len();
        loop {
            let line_end = lines_end;
            let before = text[..line_end.saturating_sub(1)]
                .iter()
                .rposition(|&b| b == b'\n');
            let line_start = match before {
                Some(i) => i + 1,
                None if begin == 0 => 0,
                None => break,
            };
            let line = &text[line_start..line_end];
            if line.starts_with(start.as_bytes()) {
                if let Ok(event) = std::str::from_utf8(line)
                    .map_err(|_| ())
                    .and_then(|l| crate::store::jsonl::decode(l).map_err(|_| ()))
                {
                    if &*event.feed == feed {
                        let seq = event.seq;
                        if anchor == Some(seq) && found.is_none() {
                            found = Some(event.clone());
                        }
                        if last.is_none() {
                            last = Some(event);
                        }
                        if done(&last, &found, Some(seq)) {
                            return Ok((last, found));
                        }
                    }
                }
            }
            if line_start == 0 {
                return Ok((last, found));
            }
            lines_end = line_start;
        }
        carry = text[..lines_end].to_vec();
        end = begin;
    }
    Ok((last, found))
}

/// Regular files down to `depth` directory levels below `dir`, never through a symbolic link.
fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        if kind.is_dir() && depth > 0 {
            walk(&path, depth - 1, out);
        } else if kind.is_file() && depth == 0 {
            out.push(path);
        }
    }
}

impl FileSink {
    /// Per series, the last event of `feed` its files hold (with when it was received): read
    /// from the end of every uncompressed file the template can have rendered. With `anchor`,
    /// also the line of the feed at that `seq`, if some file holds it.
    fn stored_floors(
        &mut self,
        feed: &str,
        anchor: Option<u64>,
    ) -> Result<(SeriesFloors, Option<Event>), SinkError> {
        let mut files = Vec::new();
        let depth = self.template.components.len().saturating_sub(1);
        walk(&self.template.base, depth, &mut files);
        let mut floors: SeriesFloors = HashMap::new();
        let mut anchored: Option<Event> = None;
        for path in files {
            let shown = path.display().to_string();
            if shown.ends_with(".gz") || shown.ends_with(".zst") || shown.ends_with(".tmp") {
                continue;
            }
            if !self.template.matches(&self.template.base, &path) {
                continue;
            }
            let Ok(file) = super::writer::open_existing(&path, false) else {
                continue;
            };
            let wanted = anchor.filter(|_| anchored.is_none());
            let (event, at_anchor) = scan_feed(&file, feed, wanted)
                .map_err(|e| self.io(format!("cannot read {shown}"), e))?;
            if anchored.is_none() {
                anchored = at_anchor;
            }
            let Some(event) = event else { continue };
            let Ok(series) = self.template.series(feed, &event.event_type) else {
                continue;
            };
            // A line in a file that is not one of its series' files is another sink's, or an
            // older layout's: not this sink's floor.
            let in_series = path.parent() == Some(series.dir.as_path())
                || (series.dir == Path::new(".")
                    && path
                        .parent()
                        .is_some_and(|p| p == Path::new("") || p == Path::new(".")));
            let named = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| super::rotation::Members::classify(&series, n).is_some());
            if !in_series || !named {
                continue;
            }
            let floor = Floor {
                seq: event.seq,
                id: event.id.clone(),
            };
            match floors.get(&series.key) {
                Some((known, _)) if known.seq >= floor.seq => {}
                _ => {
                    floors.insert(series.key, (floor, event.received_at));
                }
            }
        }
        Ok((floors, anchored))
    }

    /// The highest event of `feed` the files hold, when they can have lost an acknowledged
    /// tail (`fsync` other than `always`): the supervisor resumes the feed from it when it is
    /// behind the checkpoint. The highest, not the lowest of the series: a type not written for
    /// a long time must not pull the feed back to it.
    pub(super) fn feed_cursor(&mut self, feed: &str) -> Result<Option<Cursor>, SinkError> {
        if self.policy == super::FsyncPolicy::Always {
            return Ok(None);
        }
        let (floors, _) = self.stored_floors(feed, None)?;
        Ok(floors
            .into_values()
            .max_by_key(|(f, _)| f.seq)
            .map(|(f, _)| Cursor {
                seq: f.seq,
                id: f.id,
            }))
    }

    /// A run of `feed` starts after (`start_seq`, `start_id`): the events up to what the files
    /// hold are copies, provided the files continue this numbering. They must hold `start_id`
    /// at `start_seq`; only series whose last line was received after that event count. A
    /// feed that resumes without an id opens no window: then nothing can tell a copy from a
    /// new event, and nothing is dropped. A feed that starts from the beginning (no checkpoint
    /// yet: a crash before the first commit, or a reset) is judged by its first event instead,
    /// see [`FileSink::resolve_first_events`].
    pub(super) fn start_window(&mut self, feed: &str, url: &str, start_seq: u64, start_id: &str) {
        self.windows.remove(feed);
        self.first_event_pending.remove(feed);
        if start_seq == 0 {
            self.first_event_pending
                .insert(Arc::from(feed), url.to_string());
            return;
        }
        if start_id.is_empty() {
            return;
        }
        self.open_window(feed, url, start_seq, false, |stored| {
            &*stored.id == start_id
        });
    }

    /// Opens the window of `feed` when the files hold, at `anchor_seq`, an event `is_anchor`
    /// accepts. `inclusive`: the anchor event itself is fetched again (and so is a copy).
    fn open_window(
        &mut self,
        feed: &str,
        url: &str,
        anchor_seq: u64,
        inclusive: bool,
        is_anchor: impl Fn(&Event) -> bool,
    ) {
        let (floors, anchor) = match self.stored_floors(feed, Some(anchor_seq)) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(sink = %self.name, feed, "cannot read what the files hold, so re-fetched events may be stored twice: {e}");
                return;
            }
        };
        let Some(anchor) = anchor.filter(|a| is_anchor(a)) else {
            // The files do not hold the event the feed resumes after: they are not this
            // numbering (a reset checkpoint, another stream) or it went to other sinks.
            return;
        };
        let floors: HashMap<String, Floor> = floors
            .into_iter()
            .filter(|(_, (f, at))| {
                (f.seq > anchor_seq || (inclusive && f.seq == anchor_seq))
                    && *at >= anchor.received_at
            })
            .map(|(k, (f, _))| (k, f))
            .collect();
        let Some(end) = floors.values().map(|f| f.seq).max() else {
            return;
        };
        tracing::info!(
            sink = %self.name,
            feed,
            resumes_after = anchor_seq - u64::from(inclusive),
            stored_up_to = end,
            "the files already hold events the feed fetches again; those are dropped, not stored twice"
        );
        self.windows.insert(
            Arc::from(feed),
            Window {
                url: url.to_string(),
                end,
                floors,
            },
        );
    }

    /// Feeds that started from the beginning are judged by the first event this sink gets of
    /// them: when the files hold that very event (same `seq`, id, type and data, received
    /// after which the series' last lines were), the server is sending the stream the files
    /// hold again (the previous run crashed before its first checkpoint), and the window opens
    /// as after a checkpoint. Otherwise (new events, a stream without ids, files of another
    /// numbering) nothing is dropped. Called before a batch is filtered; a failed batch finds
    /// the same window when retried.
    pub(super) fn resolve_first_events(&mut self, events: &[Arc<Event>]) {
        if self.first_event_pending.is_empty() {
            return;
        }
        for event in events {
            let Some(url) = self.first_event_pending.remove(&event.feed) else {
                continue;
            };
            if event.id.is_empty() {
                continue;
            }
            let first = event.clone();
            self.open_window(&event.feed, &url, event.seq, true, |stored| {
                stored.id == first.id
                    && stored.event_type == first.event_type
                    && stored.data == first.data
            });
            if self.first_event_pending.is_empty() {
                return;
            }
        }
    }

    /// `events` without the copies of stored events (nothing is changed until
    /// [`FileSink::apply_filtered`] after the batch is stored).
    pub(super) fn filter_stored(&mut self, events: &[Arc<Event>]) -> Result<Filtered, SinkError> {
        let mut out = Filtered {
            kept: Vec::with_capacity(events.len()),
            ..Filtered::default()
        };
        let mut key: Option<(Arc<str>, Arc<str>, String)> = None;
        for event in events {
            let Some(window) = self.windows.get(&event.feed) else {
                out.kept.push(event.clone());
                continue;
            };
            if event.seq > window.end {
                if !out.passed.iter().any(|f| *f == event.feed) {
                    out.passed.push(event.feed.clone());
                }
                out.kept.push(event.clone());
                continue;
            }
            let same = key.as_ref().is_some_and(|(f, t, _)| {
                Arc::ptr_eq(f, &event.feed) && Arc::ptr_eq(t, &event.event_type)
            });
            if !same {
                let series = self
                    .template
                    .series(&event.feed, &event.event_type)
                    .map_err(|e| self.name_error(e))?;
                key = Some((event.feed.clone(), event.event_type.clone(), series.key));
            }
            let Some((_, _, series_key)) = &key else {
                continue;
            };
            let floor = window.floors.get(series_key).filter(|_| {
                !out.reached
                    .iter()
                    .any(|r| r.feed == event.feed && r.series == *series_key)
            });
            match floor {
                Some(floor) if event.seq < floor.seq => out.skipped += 1,
                Some(floor) if event.seq == floor.seq => {
                    let wrong = (event.id != floor.id).then(|| event.id.clone());
                    if wrong.is_some() {
                        out.kept.push(event.clone());
                    } else {
                        out.skipped += 1;
                    }
                    out.reached.push(Reached {
                        feed: event.feed.clone(),
                        series: series_key.clone(),
                        floor: floor.clone(),
                        wrong,
                    });
                }
                Some(floor) => {
                    // Past the floor without meeting it (that event went elsewhere).
                    out.reached.push(Reached {
                        feed: event.feed.clone(),
                        series: series_key.clone(),
                        floor: floor.clone(),
                        wrong: None,
                    });
                    out.kept.push(event.clone());
                }
                None => out.kept.push(event.clone()),
            }
        }
        Ok(out)
    }

    /// The batch `filtered` came from is stored: count the copies, close the floors reached,
    /// record a gap for each floor the server did not send again.
    pub(super) fn apply_filtered(&mut self, filtered: Filtered) {
        self.counters.add(filtered.skipped);
        for r in filtered.reached {
            let Some(window) = self.windows.get_mut(&r.feed) else {
                continue;
            };
            window.floors.remove(&r.series);
            if let Some(found) = r.wrong {
                let url = window.url.clone();
                self.record_mismatch(&r.feed, &url, &r.floor, &found);
            }
        }
        for feed in filtered.passed {
            self.windows.remove(&feed);
        }
        self.windows.retain(|_, w| !w.floors.is_empty());
    }

    /// The server sent another event where the files hold `floor`.
    fn record_mismatch(&self, feed: &str, url: &str, floor: &Floor, found: &str) {
        crate::sink::record_replay_mismatch(
            &self.name,
            self.state_path.as_deref(),
            feed,
            url,
            floor.seq,
            &floor.id,
            found,
            "the files hold",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn line(feed: &str, seq: u64) -> String {
        let mut out = Vec::new();
        let event = Event::new(feed, "t", &format!("id-{seq}"), format!("data {seq}"), seq);
        crate::store::jsonl::Encoder::default().encode(&event, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_last_line_of_a_feed_is_found_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        let mut f = File::create(&path).unwrap();
        for seq in 1..=3000 {
            let feed = if seq % 3 == 0 { "b" } else { "a" };
            f.write_all(line(feed, seq).as_bytes()).unwrap();
        }
        // A line cut short by a crash is not a stored event.
        f.write_all(&line("a", 3001).as_bytes()[..20]).unwrap();
        drop(f);
        let f = File::open(&path).unwrap();
        assert_eq!(last_event_of(&f, "a").unwrap().unwrap().seq, 2999);
        assert_eq!(last_event_of(&f, "b").unwrap().unwrap().seq, 3000);
        assert!(last_event_of(&f, "c").unwrap().is_none());
        // A feed whose last line is far back (many blocks) is found too.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"\n").unwrap();
        for seq in 3002..=5000 {
            f.write_all(line("a", seq).as_bytes()).unwrap();
        }
        drop(f);
        let f = File::open(&path).unwrap();
        assert_eq!(last_event_of(&f, "b").unwrap().unwrap().seq, 3000);
        assert_eq!(last_event_of(&f, "a").unwrap().unwrap().seq, 5000);
        let empty = tempfile::tempfile().unwrap();
        assert!(last_event_of(&empty, "a").unwrap().is_none());
    }
}
