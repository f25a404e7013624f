//! `replay --follow`: after the stored history, keeps reading what the bridge appends, the way
//! `tail -F` follows a file that is renamed away.
//!
//! Every uncompressed file of the history stays open where its reading stopped (at its last
//! complete line). Each round (at most every [`POLL`]) first checks whether each followed path
//! still names the open file: a rotation renames it (and compression later deletes it), and
//! the sink rotates only a closed file, so once the path names another file (or none), reading
//! the open one to its end gets all it will ever hold. Then every open file is read on, the
//! files that appeared since are looked at, and the new events of the round are written in the
//! merge order of the history (receive time, then feed and `seq`).
//!
//! A file that appears is new data unless it is what became of a followed file: the same file
//! under its rotated name (the device and inode of a file held open), or a rotated or
//! compressed copy of a followed path (`X.STAMP.ext`, `X.gz`), whose events were read through
//! the open file. A compressed file is read once.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::series::{decode_complete, open_lines, original_of, Key, SeriesLog};
use crate::event::Event;

/// The floor between two looks at the files.
pub const POLL: Duration = Duration::from_millis(200);
/// At most this much is read from one file per round (the rest in the next round, at once).
const ROUND_BYTES: usize = 4 * 1024 * 1024;

/// One followed uncompressed file.
struct Tail {
    path: PathBuf,
    file: File,
    dev_ino: (u64, u64),
    /// Bytes consumed (complete lines).
    pos: u64,
    /// A line still being written.
    partial: Vec<u8>,
}

/// The state of `--follow`.
pub struct Follow {
    tails: Vec<Tail>,
    /// Compressed files already read (or part of the history).
    known: HashSet<PathBuf>,
    /// Every path whose events were read through an open file: copies of them are skipped.
    followed: HashSet<PathBuf>,
    discover: Box<dyn Fn() -> anyhow::Result<Vec<PathBuf>>>,
    count: Arc<AtomicU64>,
}

impl Follow {
    /// Continues after `log`'s history; `discover` lists the files of the log as they are now.
    pub fn new(
        log: &mut SeriesLog,
        discover: Box<dyn Fn() -> anyhow::Result<Vec<PathBuf>>>,
    ) -> Follow {
        let mut follow = Follow {
            tails: Vec::new(),
            known: HashSet::new(),
            followed: HashSet::new(),
            discover,
            count: log.read_bytes.clone(),
        };
        for (path, file, dev_ino, pos) in log.take_tails() {
            follow.add_tail(path, file, dev_ino, pos);
        }
        for f in &log.files {
            // The compressed files of the history (the others are followed).
            if !follow.followed.contains(&f.path) {
                follow.known.insert(f.path.clone());
            }
            // A compressed file of the history: its original (if it reappears) was read.
            if let Some(o) = original_of(&f.path) {
                follow.followed.insert(o);
            }
        }
        follow
    }

    fn add_tail(&mut self, path: PathBuf, file: File, dev_ino: (u64, u64), pos: u64) {
        self.followed.insert(path.clone());
        self.tails.push(Tail {
            path,
            file,
            dev_ino,
            pos,
            partial: Vec::new(),
        });
    }

    /// Whether `path` is a rotated or compressed copy of a followed path.
    fn is_copy(&self, path: &Path) -> bool {
        // The path itself may well be followed before: a new file there is new data.
        let logical = match original_of(path) {
            Some(original) if self.followed.contains(&original) => return true,
            Some(original) => original,
            None => path.to_path_buf(),
        };
        let Some(s) = logical.to_str() else {
            return false;
        };
        self.followed
            .iter()
            .any(|f| f.to_str().is_some_and(|f| rotated_from(s, f)))
    }

    /// One round: the new events, in order; `true` when a file had more than a round's worth.
    pub fn round(&mut self) -> anyhow::Result<(Vec<Event>, bool)> {
        let mut events: Vec<(Key, Event)> = Vec::new();
        // Files that appeared. An uncompressed one is followed from its start (and read in
        // this round with the others, so that the end of a rotated file and the start of the
        // new one come out in order); a compressed one is read whole.
        let base = usize::MAX / 2;
        for (j, path) in (self.discover)()?.into_iter().enumerate() {
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            // Identity by device and inode only against the files held open: a deleted
            // file's inode number is soon given to a new file.
            let dev_ino = (meta.dev(), meta.ino());
            if let Some(t) = self.tails.iter().find(|t| t.dev_ino == dev_ino) {
                if t.path != path {
                    // A followed file under its rotated name: its compressed copy is a copy.
                    self.followed.insert(path);
                }
                continue;
            }
            if self.known.contains(&path) || self.is_copy(&path) {
                continue;
            }
            let mut lines = open_lines(&path, self.count.clone())?;
            if lines.is_plain() {
                let file =
                    File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
                self.add_tail(path, file, dev_ino, 0);
                continue;
            }
            while let Some(e) = lines.next_event()? {
                events.push((Key::of(&e, base + j), e));
            }
            self.known.insert(path);
        }
        let mut more = false;
        let mut done = Vec::new();
        let mut buf = Vec::new();
        for (i, t) in self.tails.iter_mut().enumerate() {
            // Checked before reading: once the path names another file (or none), the open
            // one was closed by the sink, and reading it to its end gets everything.
            let finishing = std::fs::symlink_metadata(&t.path)
                .map(|m| (m.dev(), m.ino()) != t.dev_ino)
                .unwrap_or(true);
            if finishing {
                done.push(i);
            }
            let shown = t.path.display().to_string();
            loop {
                let len = t
                    .file
                    .metadata()
                    .with_context(|| format!("cannot read {shown}"))?
                    .len();
                let have = t.pos + t.partial.len() as u64;
                if len < have {
                    // Cut back (copy-and-truncate): start again from the top.
                    t.pos = 0;
                    t.partial.clear();
                    continue;
                }
                let want = usize::try_from(len - have)
                    .unwrap_or(ROUND_BYTES)
                    .min(ROUND_BYTES);
                if want == 0 {
                    break;
                }
                buf.resize(want, 0);
                let n = t
                    .file
                    .read_at(&mut buf, have)
                    .with_context(|| format!("cannot read {shown}"))?;
                if n == 0 {
                    break;
                }
                self.count.fetch_add(n as u64, Ordering::Relaxed);
                t.partial.extend_from_slice(&buf[..n]);
                let (new, used) = decode_complete(&shown, &t.partial)?;
                t.partial.drain(..used);
                t.pos += used as u64;
                events.extend(new.into_iter().map(|e| (Key::of(&e, i), e)));
                if !finishing {
                    more |= want == ROUND_BYTES;
                    break;
                }
            }
        }
        for i in done.into_iter().rev() {
            self.tails.remove(i);
        }
        events.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((events.into_iter().map(|(_, e)| e).collect(), more))
    }

    /// Rounds until `stop` is set, handing each round's events to `emit`, which returns false
    /// to end (the output went away).
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        emit: &mut dyn FnMut(Vec<Event>) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        while !stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            let (events, more) = self.round()?;
            if !emit(events)? {
                return Ok(());
            }
            if more {
                continue;
            }
            while started.elapsed() < POLL && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

/// Whether `name` is `followed` rotated: `STEM.STAMP.EXT` for `STEM.EXT` (the stamp being 24
/// characters, as the file sink writes it: `2026-11-24T08-30-00.123Z`).
fn rotated_from(name: &str, followed: &str) -> bool {
    let (dir, file) = followed.rsplit_once('/').unwrap_or(("", followed));
    let (stem, ext) = match file.rfind('.') {
        Some(i) if i > 0 => file.split_at(i),
        _ => (file, ""),
    };
    let prefix = if dir.is_empty() {
        format!("{stem}.")
    } else {
        format!("{dir}/{stem}.")
    };
    name.strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix(ext))
        .is_some_and(|middle| {
            middle.len() == 24 && middle.ends_with('Z') && middle.as_bytes()[0].is_ascii_digit()
        })
}

#[cfg(test)]
mod tests {
    use super::rotated_from;

    #[test]
    fn rotated_names_are_recognised() {
        let f = "/d/events.jsonl";
        assert!(rotated_from("/d/events.2026-11-24T08-30-00.123Z.jsonl", f));
        assert!(!rotated_from("/d/events.jsonl", f));
        assert!(!rotated_from("/d/other.jsonl", f));
        assert!(!rotated_from("/d/events.x.jsonl", f));
        assert!(rotated_from("/d/x.2026-11-24T08-30-00.123Z", "/d/x"));
    }
}
