//! `type = "sqlite"`: events in an SQLite database that can be queried with plain SQL, stored
//! exactly once, and read back by `sse-bridge replay` and `sse-bridge serve`.
//!
//! The schema comes from `migrations/` (the same runner and numbered sequence as the state
//! store): one `events` table, see `migrations/0002_events.sql`. Rows are written, and the
//! checkpoint upserted, by `crate::store::sqlite`, the one place that knows the table.
//!
//! - **Batched transactions.** Each `write` is one transaction (`BEGIN IMMEDIATE`, so the write
//!   lock is taken up front and waits for `busy_timeout`), through one prepared, cached
//!   `INSERT OR IGNORE` statement. The runner hands the sink every queued event at once, up to
//!   `batch_max_events`, waiting up to `batch_max_wait` for more.
//! - **Acknowledged after commit.** `write` returns only once the transaction committed (with
//!   `synchronous = "full"`, once it is on disk), so the checkpoint never runs ahead of it.
//! - **Exactly once.** Duplicates are ignored by the table's unique key (`events_identity`):
//!   a re-fetched event, or a log replayed twice, is stored once.
//! - **Co-located checkpoints.** When the database is the state database (`path` names the
//!   same file as `state.path`), the sink also upserts each feed's checkpoint, as it will be
//!   once the batch is acknowledged, in the same transaction as the events (ARCHITECTURE.md §4).
//!   After `kill -9` a feed then resumes exactly after the last stored event.
//! - **Busy or locked.** SQLite waits up to `busy_timeout` for a lock; past that the write
//!   fails and the runner retries it with backoff, holding the feeds back: nothing is dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};
use serde::{Deserialize, Serialize};

use super::{BufferConfig, SinkError, WriteOptions};
use crate::event::Event;
use crate::state::{migrate, Checkpoint};
use crate::store::sqlite as store;

/// Largest `batch_max_events` accepted.
const MAX_BATCH_EVENTS: usize = 1_000_000;
/// Largest `batch_max_wait` accepted.
const MAX_BATCH_WAIT: Duration = Duration::from_secs(10);

/// `[sink.NAME]` with `type = "sqlite"`: stores every event as one row of the `events` table
/// of an SQLite database.
///
/// ```toml
/// [sink.db]
/// type = "sqlite"
/// path = "data/state.db"     # the state database: events and checkpoints commit together
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteSinkConfig {
    /// The database file; created with its directory if missing, and brought to the current
    /// schema. When it names the same file as `state.path`, events and each feed's checkpoint
    /// are committed in one transaction; otherwise the checkpoint moves only after the sink's
    /// commit (and after a crash the events since the last checkpoint commit are fetched
    /// again and ignored as duplicates).
    pub path: PathBuf,
    /// `full` (default): a commit is on disk before the batch is acknowledged; survives a
    /// power loss. `normal`: a commit survives a crash of the bridge but a power loss may undo
    /// the last commits (SQLite syncs the WAL only at checkpoints); faster on slow disks.
    #[serde(default)]
    pub synchronous: Synchronous,
    /// How long to wait for a lock held by another connection (a `sqlite3` shell, a backup)
    /// before the write fails; a failed write is retried with backoff, never dropped.
    #[serde(default = "default_busy_timeout", with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// Most events per transaction. Default 8192.
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: usize,
    /// How long to wait for more events before committing a batch smaller than
    /// `batch_max_events`. Default `0s`: commit as soon as the queue is empty (at high rates
    /// batches grow by themselves while a commit is in progress). A few milliseconds make
    /// fewer, larger transactions at moderate rates, at the cost of that much latency.
    #[serde(default, with = "humantime_serde")]
    pub batch_max_wait: Duration,
    /// The in-memory queue in front of the sink (`max_events`, `when_full`).
    #[serde(default)]
    pub buffer: BufferConfig,
}

fn default_busy_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_batch_max_events() -> usize {
    8192
}

/// See [`SqliteSinkConfig::synchronous`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Full,
    Normal,
}

impl SqliteSinkConfig {
    /// Offline checks; keys are relative to `[sink.NAME]`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        if self.path.as_os_str().is_empty() {
            issues.push(("path".into(), "must not be empty".into()));
        } else if self.path.is_dir() {
            issues.push((
                "path".into(),
                format!(
                    "{} is a directory; name a database file",
                    self.path.display()
                ),
            ));
        }
        if self.busy_timeout.is_zero() {
            issues.push(("busy_timeout".into(), "must be greater than zero".into()));
        }
        if !(1..=MAX_BATCH_EVENTS).contains(&self.batch_max_events) {
            issues.push((
                "batch_max_events".into(),
                format!("must be between 1 and {MAX_BATCH_EVENTS}"),
            ));
        }
        if self.batch_max_wait > MAX_BATCH_WAIT {
            issues.push((
                "batch_max_wait".into(),
                "must be at most 10s: events wait this long before they are acknowledged".into(),
            ));
        }
        issues
    }
}

/// A built SQLite sink.
pub struct SqliteSink {
    name: String,
    /// The path as shown in messages.
    shown: String,
    conn: Connection,
    /// Whether this is the state database: checkpoints are written with the events.
    co_located: bool,
    options: WriteOptions,
    duplicates: Arc<super::DuplicateCounter>,
    /// `synchronous = "normal"`: a power loss can undo the last commits.
    can_lose_commits: bool,
}

impl SqliteSink {
    /// Opens (creating it if missing) and migrates the database. `state_path` is the state
    /// database of the running bridge, if any: when it is the same file, checkpoints are
    /// committed with the events.
    pub fn build(
        name: &str,
        c: &SqliteSinkConfig,
        state_path: Option<&Path>,
    ) -> Result<Self, SinkError> {
        let shown = c.path.display().to_string();
        let fail = |message: String| SinkError::Db {
            sink: name.to_string(),
            message: format!("database {shown}: {message}"),
        };
        if c.path.as_os_str().is_empty() {
            return Err(fail("the path is empty".into()));
        }
        if let Some(parent) = c.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                fail(format!(
                    "cannot create the directory {}: {e}",
                    parent.display()
                ))
            })?;
        }
        if c.path.is_dir() {
            return Err(fail("is a directory; name a database file".into()));
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let sql = |context: &str, e: rusqlite::Error| SinkError::Db {
            sink: name.to_string(),
            message: db_message(&shown, context, &e),
        };
        let mut conn =
            Connection::open_with_flags(&c.path, flags).map_err(|e| sql("cannot open", e))?;
        conn.busy_timeout(c.busy_timeout)
            .map_err(|e| sql("cannot set the busy timeout", e))?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(|e| sql("cannot switch to WAL mode", e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(sink = name, database = %shown, journal_mode = %mode,
                "the database could not use WAL mode (network filesystem?); continuing, slower");
        }
        let sync = match c.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(|e| sql("cannot set synchronous", e))?;
        migrate::migrate(&mut conn, &shown).map_err(|e| fail(e.detail()))?;
        let co_located = match state_path {
            Some(state) => same_file(&c.path, state),
            None => false,
        };
        if co_located {
            tracing::info!(sink = name, database = %shown,
                "the sink shares the state database: events and checkpoints commit together");
        }
        Ok(SqliteSink {
            name: name.to_string(),
            shown,
            conn,
            co_located,
            options: WriteOptions {
                max_batch_events: c.batch_max_events.clamp(1, MAX_BATCH_EVENTS),
                max_batch_wait: c.batch_max_wait.min(MAX_BATCH_WAIT),
                checkpoints: co_located,
            },
            duplicates: Arc::default(),
            can_lose_commits: c.synchronous == Synchronous::Normal,
        })
    }

    /// Whether checkpoints are committed with the events.
    pub fn is_co_located(&self) -> bool {
        self.co_located
    }

    fn error(&self, context: &str, e: &rusqlite::Error) -> SinkError {
        SinkError::Db {
            sink: self.name.clone(),
            message: db_message(&self.shown, context, e),
        }
    }

    /// One transaction: the events, then (when co-located) the checkpoints.
    fn store(
        &mut self,
        events: &[Arc<Event>],
        checkpoints: &[Checkpoint],
    ) -> Result<(), SinkError> {
        // Checked before anything is written: SQLite integers are signed.
        for e in events {
            if let Err(e) = store::seq_to_sql(&e.feed, e.seq) {
                return Err(SinkError::Db {
                    sink: self.name.clone(),
                    message: e.to_string(),
                });
            }
        }
        let Self {
            conn,
            shown,
            name,
            co_located,
            duplicates,
            ..
        } = self;
        let err = |context: String, e: rusqlite::Error| SinkError::Db {
            sink: name.clone(),
            message: db_message(shown, &context, &e),
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| err("cannot start a transaction".into(), e))?;
        let mut ignored = 0usize;
        {
            let mut insert = store::EventInserter::new(&tx)
                .map_err(|e| err("cannot prepare the insert".into(), e))?;
            for e in events {
                let stored = insert.insert(e).map_err(|x| {
                    err(
                        format!("cannot store event seq {} of feed `{}`", e.seq, e.feed),
                        x,
                    )
                })?;
                if !stored {
                    ignored += 1;
                }
            }
        }
        if *co_located {
            for cp in checkpoints {
                if store::seq_to_sql(&cp.feed, cp.seq).is_err() {
                    continue; // cannot happen after the check above; the committer reports it
                }
                store::upsert_checkpoint(&tx, cp).map_err(|e| {
                    err(
                        format!("cannot save the checkpoint of feed `{}`", cp.feed),
                        e,
                    )
                })?;
            }
        }
        tx.commit()
            .map_err(|e| err(format!("cannot commit {} events", events.len()), e))?;
        if ignored > 0 {
            tracing::debug!(sink = %name, ignored, "events already stored were not stored again");
            duplicates.add(ignored as u64);
        }
        Ok(())
    }
}

impl super::Sink for SqliteSink {
    fn write(&mut self, events: &[Arc<Event>]) -> Result<(), SinkError> {
        self.store(events, &[])
    }

    fn options(&self) -> WriteOptions {
        self.options
    }

    fn write_with_checkpoints(
        &mut self,
        events: &[Arc<Event>],
        checkpoints: &[Checkpoint],
    ) -> Result<(), SinkError> {
        self.store(events, checkpoints)
    }

    fn counters(&self) -> Option<Arc<dyn super::SinkCounters>> {
        Some(self.duplicates.clone())
    }

    /// The feed's last stored row: in a database of its own, a commit that a power loss undid
    /// (`synchronous = "normal"`) can leave it behind the checkpoint, and the feed must
    /// resume from it. It is read from the events themselves, so it moves in the same
    /// transaction as they do. In the state database the checkpoint commits with the events
    /// and is never ahead of them.
    fn cursor(&mut self, feed: &str) -> Result<Option<super::Cursor>, SinkError> {
        if self.co_located || !self.can_lose_commits {
            return Ok(None);
        }
        let last = store::last_of_feed(&self.conn, feed)
            .map_err(|e| self.error(&format!("cannot read the last event of feed `{feed}`"), &e))?;
        Ok(last.map(|(seq, id)| super::Cursor {
            seq,
            id: Arc::from(id.as_str()),
        }))
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        // Every commit is already as durable as `synchronous` promises; fold the WAL back
        // into the database so the file is self-contained while the bridge is stopped.
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .map_err(|e| self.error("cannot checkpoint the WAL", &e))
    }
}

/// An SQLite error as a sentence naming the database, with a hint for the common cases.
fn db_message(path: &str, context: &str, e: &rusqlite::Error) -> String {
    let hint = match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => {
            " (the file is not an SQLite database: point the sink's path at another file)"
        }
        Some(ErrorCode::DatabaseCorrupt) => " (the database is corrupt: restore a backup)",
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => {
            " (another connection holds the lock past busy_timeout; retrying)"
        }
        Some(ErrorCode::ReadOnly) | Some(ErrorCode::PermissionDenied) => {
            " (check that the file and its directory are writable by this user)"
        }
        Some(ErrorCode::DiskFull) => " (the disk is full: free some space)",
        Some(ErrorCode::SystemIoFailure) => " (an I/O error: check the disk and the kernel log)",
        _ => "",
    };
    format!("database {path}: {context}: {e}{hint}")
}

/// Whether `a` and `b` name the same file (either may not exist yet: then its directory is
/// resolved and the file names compared).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (canonical(a), canonical(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

fn canonical(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Some(c);
    }
    let name = p.file_name()?;
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Some(parent.canonicalize().ok()?.join(name))
}

/// The stored-time formatter, at its old path (`crate::store::jsonl` is its home).
pub use crate::store::jsonl::{format_time, push_time};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{FeedTracker, Position};
    use crate::sink::Sink;
    use chrono::{TimeZone, Utc};

    fn config(path: &Path) -> SqliteSinkConfig {
        toml::from_str(&format!("path = {:?}", path.display().to_string())).unwrap()
    }

    fn event(feed: &str, seq: u64, id: &str, data: &str) -> Arc<Event> {
        Arc::new(Event {
            received_at: Utc.with_ymd_and_hms(2026, 11, 24, 8, 0, 0).unwrap()
                + chrono::Duration::microseconds(seq as i64),
            ..Event::new(feed, "edit", id, data, seq)
        })
    }

    fn rows(path: &Path) -> Vec<(String, i64, String, String)> {
        let conn = Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare("SELECT feed, seq, id, data FROM events ORDER BY pos")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn config_defaults_and_validation() {
        let c = config(Path::new("x.db"));
        assert_eq!(c.synchronous, Synchronous::Full);
        assert_eq!(c.batch_max_events, 8192);
        assert_eq!(c.batch_max_wait, Duration::ZERO);
        assert_eq!(c.busy_timeout, Duration::from_secs(5));
        assert!(c.validate().is_empty());
        let bad: SqliteSinkConfig = toml::from_str(
            "path = \"\"\nbatch_max_events = 0\nbatch_max_wait = \"1m\"\nbusy_timeout = \"0s\"",
        )
        .unwrap();
        let keys: Vec<String> = bad.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            ["path", "busy_timeout", "batch_max_events", "batch_max_wait"]
        );
        assert!(toml::from_str::<SqliteSinkConfig>("path = \"x\"\nsync = \"full\"").is_err());
    }

    #[test]
    fn duplicates_are_ignored_and_shared_ids_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/events.db");
        let mut sink = SqliteSink::build("db", &config(&path), None).unwrap();
        assert!(!sink.is_co_located());
        let batch = [
            event("f", 1, "a", "one"),
            // No `id:` field: the event keeps the previous id, and is still a distinct event.
            event("f", 2, "a", "two"),
            event("f", 3, "", "no id"),
            event("g", 1, "a", "other feed"),
        ];
        sink.write(&batch).unwrap();
        // The same events again (a re-fetch or a second replay): nothing new.
        sink.write(&batch).unwrap();
        sink.write(&batch[1..2]).unwrap();
        let got = rows(&path);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[1], ("f".into(), 2, "a".into(), "two".into()));
        // An id-less event with a reused seq but another receive time is a new event (the
        // sequence restarted after a checkpoint reset).
        let mut later = (*batch[2]).clone();
        later.received_at += chrono::Duration::seconds(5);
        sink.write(&[Arc::new(later)]).unwrap();
        assert_eq!(rows(&path).len(), 5);
        sink.flush().unwrap();
    }

    #[test]
    fn received_at_is_stored_like_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.db");
        let mut sink = SqliteSink::build("db", &config(&path), None).unwrap();
        sink.write(&[event("f", 7, "x", "d")]).unwrap();
        let conn = Connection::open(&path).unwrap();
        let at: String = conn
            .query_row("SELECT received_at FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(at, "2026-11-24T08:00:00.000007Z");
    }

    #[test]
    fn co_located_sink_commits_checkpoints_with_events() {
        let dir = tempfile::tempdir().unwrap();
        let state_path = dir.path().join("state.db");
        let store = crate::state::StateStore::open(&state_path).unwrap();
        drop(store);
        // A different spelling of the same file.
        let spelled = dir.path().join("./state.db");
        let mut sink = SqliteSink::build("db", &config(&spelled), Some(&state_path)).unwrap();
        assert!(sink.is_co_located());
        assert!(sink.options().checkpoints);
        let tracker = FeedTracker::for_feed(
            "f",
            "http://x/s",
            Position {
                seq: 0,
                last_event_id: Arc::from(""),
            },
        );
        tracker.register([(1, "a", 1), (2, "b", 1)]);
        let p = tracker.position_if_acked(&[1, 2]);
        let cp = Checkpoint {
            feed: "f".into(),
            url: "http://x/s".into(),
            last_event_id: p.last_event_id.to_string(),
            seq: p.seq,
            updated_at: Utc::now(),
        };
        sink.write_with_checkpoints(&[event("f", 1, "a", "1"), event("f", 2, "b", "2")], &[cp])
            .unwrap();
        let store = crate::state::StateStore::open(&state_path).unwrap();
        let saved = store.checkpoint("f", "http://x/s").unwrap().unwrap();
        assert_eq!((saved.last_event_id.as_str(), saved.seq), ("b", 2));
        assert_eq!(rows(&state_path).len(), 2);

        // A sink elsewhere does not write checkpoints.
        let other =
            SqliteSink::build("o", &config(&dir.path().join("o.db")), Some(&state_path)).unwrap();
        assert!(!other.is_co_located());
    }

    #[test]
    fn a_failed_transaction_leaves_nothing_and_a_locked_database_is_an_error_to_retry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.db");
        let mut c = config(&path);
        c.busy_timeout = Duration::from_millis(50);
        let mut sink = SqliteSink::build("db", &c, None).unwrap();
        let mut other = Connection::open(&path).unwrap();
        let tx = other
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        let err = sink
            .write(&[event("f", 1, "a", "x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sink `db`") && err.contains("locked"), "{err}");
        drop(tx);
        sink.write(&[event("f", 1, "a", "x")]).unwrap();
        assert_eq!(rows(&path).len(), 1);
        // A sequence number SQLite cannot hold fails the whole batch before writing.
        let err = sink
            .write(&[event("f", 2, "b", "y"), event("f", u64::MAX, "c", "z")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("too large") && err.contains("`f`"), "{err}");
        assert_eq!(rows(&path).len(), 1);
    }

    #[test]
    fn a_foreign_database_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, "not a database at all\n".repeat(100)).unwrap();
        let err = SqliteSink::build("db", &config(&path), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("not an SQLite database"), "{err}");
        // An application's own `events` table is not taken over.
        let path = dir.path().join("app.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE events (x INTEGER);")
            .unwrap();
        let err = SqliteSink::build("db", &config(&path), None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("0002_events") && err.contains("already exists"),
            "{err}"
        );
    }
}
