//! The state store: each feed's checkpoint and the recorded gaps, in an SQLite database
//! (`[state] path`, default `data/state.db`).
//!
//! The database is opened in WAL mode with `synchronous = FULL`, so a committed checkpoint
//! survives a power loss, and with a 5 s busy timeout. Its schema is managed by
//! [`migrate`]. Timestamps are stored as RFC 3339 UTC text with microseconds
//! (`2026-11-24T08:00:00.123456Z`); sequence numbers as SQLite integers (at most `i64::MAX`).
//! The tables can be inspected with the `sqlite3` shell while the bridge runs:
//!
//! ```sql
//! SELECT feed, url, last_event_id, seq, updated_at FROM checkpoints;
//! SELECT feed, reason, detail, last_event_id, seq, at FROM gaps ORDER BY id;
//! ```

pub mod lock;
pub mod migrate;

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row};
use serde::Serialize;

/// Why a feed could not resume faithfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GapReason {
    /// The feed reconnected while its last event ID was empty: the stream carries no ids,
    /// so events sent while it was away are lost.
    ReconnectWithoutId,
    /// The bridge restarted and the feed's checkpoint has no ID (events were stored, but the
    /// stream carried no ids).
    RestartWithoutId,
    /// The server rejected the stored Last-Event-ID; the feed reconnected without it.
    IdRejected,
    /// The feed's URL changed, so its old checkpoint is not used.
    UrlChanged,
    /// The operator reset or set the checkpoint by hand.
    ManualChange,
    /// After a restart the server did not send the same events again: where a sink holds an
    /// event, the re-fetched stream had another id (ARCHITECTURE.md §4).
    ReplayMismatch,
}

/// The EventSource client's own gap kinds, as the state store records them.
impl From<crate::sse::client::GapKind> for GapReason {
    fn from(kind: crate::sse::client::GapKind) -> Self {
        match kind {
            crate::sse::client::GapKind::ReconnectWithoutId => GapReason::ReconnectWithoutId,
            crate::sse::client::GapKind::IdRejected => GapReason::IdRejected,
        }
    }
}

impl GapReason {
    /// Every reason, for parsing and listing.
    pub const ALL: [GapReason; 6] = [
        GapReason::ReconnectWithoutId,
        GapReason::RestartWithoutId,
        GapReason::IdRejected,
        GapReason::UrlChanged,
        GapReason::ManualChange,
        GapReason::ReplayMismatch,
    ];

    /// Parses the text stored in the database (the inverse of [`GapReason::as_str`]).
    pub fn parse(s: &str) -> Option<GapReason> {
        GapReason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The text stored in the database and shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::ReconnectWithoutId => "reconnect-without-id",
            GapReason::RestartWithoutId => "restart-without-id",
            GapReason::IdRejected => "id-rejected",
            GapReason::UrlChanged => "url-changed",
            GapReason::ManualChange => "manual-change",
            GapReason::ReplayMismatch => "replay-mismatch",
        }
    }
}

/// A feed's durable cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    pub feed: String,
    pub url: String,
    /// The Last-Event-ID to send after a restart (may be empty).
    pub last_event_id: String,
    /// The bridge's sequence number of the event the checkpoint points at (0: none yet).
    pub seq: u64,
    pub updated_at: DateTime<Utc>,
}

/// A recorded gap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    pub feed: String,
    pub url: String,
    pub reason: GapReason,
    pub detail: String,
    /// The last event ID at the moment of the gap.
    pub last_event_id: String,
    /// The last sequence number assigned before the gap (of the newest occurrence).
    pub seq: u64,
    /// When the gap happened (the first occurrence).
    pub at: DateTime<Utc>,
    /// How many identical gaps, recorded one after another, this row stands for (see
    /// [`StateStore::record_gap`]); 1 for a gap that happened once.
    pub repeats: u64,
    /// The newest occurrence (equal to `at` when `repeats` is 1).
    pub last_at: DateTime<Utc>,
}

impl Gap {
    /// A gap that happened once, at `at`.
    pub fn once(
        feed: &str,
        url: &str,
        reason: GapReason,
        detail: String,
        last_event_id: &str,
        seq: u64,
        at: DateTime<Utc>,
    ) -> Gap {
        Gap {
            feed: feed.to_string(),
            url: url.to_string(),
            reason,
            detail,
            last_event_id: last_event_id.to_string(),
            seq,
            at,
            repeats: 1,
            last_at: at,
        }
    }
}

/// What [`StateStore::record_gap`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A new row.
    New,
    /// Folded into the feed's previous gap, which now stands for this many occurrences.
    Repeat(u64),
}

/// Why the state database cannot be used. Each names the database; the SQLite and I/O errors
/// are part of the sentence (every caller prints it whole) and held, not chained as
/// `source()`, so `{:#}` does not print them twice: [`StateError::sqlite_code`] gives
/// programs the SQLite error code.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An SQLite call failed; `hint` says what to do for the common causes.
    #[error("state database {path}: {context}: {error}{hint}")]
    Sql {
        path: String,
        context: String,
        /// Boxed: the error travels through every state call's `Result`.
        error: Box<rusqlite::Error>,
        hint: &'static str,
    },
    /// The directory of the database could not be created.
    #[error("state database {path}: cannot create the directory {dir}: {error}")]
    CreateDir {
        path: String,
        dir: String,
        error: std::io::Error,
    },
    /// A sequence number SQLite cannot hold; nothing was written.
    #[error("state database {path}: {error}")]
    SeqTooLarge {
        path: String,
        error: crate::store::sqlite::SeqTooLarge,
    },
    /// Anything else: a path that is not a database file, a schema from a newer sse-bridge, a
    /// stored row this one cannot read.
    #[error("state database {path}: {message}")]
    Db { path: String, message: String },
}

impl StateError {
    /// The database as named in the message.
    pub fn path(&self) -> &str {
        match self {
            StateError::Sql { path, .. }
            | StateError::CreateDir { path, .. }
            | StateError::SeqTooLarge { path, .. }
            | StateError::Db { path, .. } => path,
        }
    }

    /// The message without its `state database PATH: ` prefix (for a caller that names the
    /// database its own way, as the SQLite sink does).
    pub fn detail(&self) -> String {
        let whole = self.to_string();
        let prefix = format!("state database {}: ", self.path());
        match whole.strip_prefix(&prefix) {
            Some(rest) => rest.to_string(),
            None => whole,
        }
    }

    /// The SQLite error code, when an SQLite call failed.
    pub fn sqlite_code(&self) -> Option<rusqlite::ErrorCode> {
        match self {
            StateError::Sql { error, .. } => error.sqlite_error_code(),
            _ => None,
        }
    }
}

/// The open state database. Not shared between threads: one owner commits checkpoints and
/// records gaps (SQLite's own locking protects against a second process).
pub struct StateStore {
    conn: Connection,
    /// The path as shown in errors.
    path: String,
}

/// Raw checkpoint row, converted after the query so conversion errors can name the row.
type CheckpointRow = (String, String, String, i64, String);
/// Raw gap row.
type GapRow = (
    String,
    String,
    String,
    String,
    String,
    i64,
    String,
    i64,
    String,
);

use crate::store::sqlite::CHECKPOINT_COLUMNS;
const GAP_COLUMNS: &str = "feed, url, reason, detail, last_event_id, seq, at, repeats, last_at";

impl StateStore {
    /// Opens (creating it and its parent directories if missing) the database at `path`,
    /// and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let shown = path.display().to_string();
        let fail = |message: String| StateError::Db {
            path: shown.clone(),
            message,
        };
        if path.as_os_str().is_empty() {
            return Err(fail("the path is empty; set state.path".into()));
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|error| StateError::CreateDir {
                path: shown.clone(),
                dir: parent.display().to_string(),
                error,
            })?;
        }
        if path.is_dir() {
            return Err(fail(
                "is a directory; state.path must name a database file".into(),
            ));
        }
        // No SQLITE_OPEN_URI: a path is a path, even if it starts with `file:`.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(path, flags)
            .map_err(|e| migrate::db_error(&shown, "cannot open", e))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| migrate::db_error(&shown, "cannot set the busy timeout", e))?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(|e| migrate::db_error(&shown, "cannot switch to WAL mode", e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            // Still correct (synchronous=FULL commits are durable in any journal mode),
            // just slower and blocking readers during commits.
            tracing::warn!(
                database = %shown,
                journal_mode = %mode,
                "the state database could not use WAL mode (network filesystem?); continuing"
            );
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| migrate::db_error(&shown, "cannot set synchronous=FULL", e))?;
        migrate::migrate(&mut conn, &shown)?;
        Ok(StateStore { conn, path: shown })
    }

    /// The database path as shown in messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn fail(&self, message: String) -> StateError {
        StateError::Db {
            path: self.path.clone(),
            message,
        }
    }

    fn sql_error(&self, context: &str, e: rusqlite::Error) -> StateError {
        migrate::db_error(&self.path, context, e)
    }

    /// The checkpoint of `feed` for the stream at `url`, if one was committed.
    pub fn checkpoint(&self, feed: &str, url: &str) -> Result<Option<Checkpoint>, StateError> {
        let context = || format!("cannot read the checkpoint of feed `{feed}`");
        let row = self
            .conn
            .prepare_cached(&format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE feed = ?1 AND url = ?2"
            ))
            .and_then(|mut stmt| stmt.query_row((feed, url), checkpoint_row).optional())
            .map_err(|e| self.sql_error(&context(), e))?;
        row.map(|r| self.checkpoint_from(r)).transpose()
    }

    /// Whether `feed` has a checkpoint for a URL other than `url` (its URL changed: the old
    /// checkpoint's ID belongs to another stream and is not used).
    pub fn has_checkpoint_for_other_url(&self, feed: &str, url: &str) -> Result<bool, StateError> {
        self.conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM checkpoints WHERE feed = ?1 AND url <> ?2)",
            )
            .and_then(|mut stmt| stmt.query_row((feed, url), |row| row.get(0)))
            .map_err(|e| {
                self.sql_error(&format!("cannot read the checkpoints of feed `{feed}`"), e)
            })
    }

    /// Inserts or replaces each checkpoint (keyed by feed and URL), all in one transaction:
    /// either all are committed or none is. A checkpoint never moves back: one with a lower
    /// seq than the stored one is ignored. (Two writers commit checkpoints when an SQLite sink
    /// shares the state database, the committer and the sink; each only writes positions that
    /// are stored, and whichever commits last must not undo the other's progress.)
    pub fn save_checkpoints(&mut self, cps: &[Checkpoint]) -> Result<(), StateError> {
        // Checked first, so that a bad value fails before anything is written.
        for cp in cps {
            self.seq_to_sql(cp.seq, &cp.feed)?;
        }
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction()
            .map_err(|e| migrate::db_error(&path, "cannot start a transaction", e))?;
        for cp in cps {
            crate::store::sqlite::upsert_checkpoint(&tx, cp).map_err(|e| {
                migrate::db_error(
                    &path,
                    &format!("cannot save the checkpoint of feed `{}`", cp.feed),
                    e,
                )
            })?;
        }
        tx.commit()
            .map_err(|e| migrate::db_error(&path, "cannot commit checkpoints", e))
    }

    /// Sets the last event ID of `feed` at `url` by hand (operator command), keeping the
    /// stored sequence number (0 if the feed had no checkpoint).
    pub fn set_checkpoint(&mut self, feed: &str, url: &str, id: &str) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT INTO checkpoints (feed, url, last_event_id, seq, updated_at)
                 VALUES (?1, ?2, ?3, 0, ?4)
                 ON CONFLICT (feed, url) DO UPDATE SET
                     last_event_id = excluded.last_event_id,
                     updated_at = excluded.updated_at",
                (feed, url, id, timestamp(Utc::now())),
            )
            .map(|_| ())
            .map_err(|e| self.sql_error(&format!("cannot set the checkpoint of feed `{feed}`"), e))
    }

    /// Every checkpoint, ordered by feed and URL.
    pub fn list_checkpoints(&self) -> Result<Vec<Checkpoint>, StateError> {
        let rows = self
            .conn
            .prepare_cached(&format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY feed, url"
            ))
            .and_then(|mut stmt| {
                stmt.query_map([], checkpoint_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| self.sql_error("cannot list checkpoints", e))?;
        rows.into_iter().map(|r| self.checkpoint_from(r)).collect()
    }

    /// Deletes every checkpoint of `feed` (for all URLs); returns how many were deleted. The
    /// feed then starts from the live stream. The caller records the gap.
    pub fn reset_checkpoint(&mut self, feed: &str) -> Result<usize, StateError> {
        self.conn
            .execute("DELETE FROM checkpoints WHERE feed = ?1", [feed])
            .map_err(|e| {
                self.sql_error(&format!("cannot reset the checkpoint of feed `{feed}`"), e)
            })
    }

    /// Records a gap (committed immediately).
    ///
    /// A gap identical to the feed's newest one (same URL, reason and last event ID) is folded
    /// into that row: its `repeats` grows, `last_at` and `seq` move to this occurrence. A
    /// server that closes every stream at once without ids thus leaves one row with a count,
    /// not a row per reconnection. Changes made by an operator are always rows of their own.
    pub fn record_gap(&mut self, gap: &Gap) -> Result<Recorded, StateError> {
        let seq = self.seq_to_sql(gap.seq, &gap.feed)?;
        let context = format!("cannot record a gap of feed `{}`", gap.feed);
        let foldable = !matches!(gap.reason, GapReason::ManualChange);
        let result = (|| -> rusqlite::Result<Recorded> {
            let tx = self.conn.transaction()?;
            let newest: Option<(i64, String, String, String, i64)> = if foldable {
                tx.prepare_cached(
                    "SELECT id, url, reason, last_event_id, repeats FROM gaps \
                     WHERE feed = ?1 ORDER BY id DESC LIMIT 1",
                )?
                .query_row([&gap.feed], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .optional()?
            } else {
                None
            };
            let recorded = match newest {
                Some((id, url, reason, last_event_id, repeats))
                    if url == gap.url
                        && reason == gap.reason.as_str()
                        && last_event_id == gap.last_event_id =>
                {
                    tx.prepare_cached(
                        "UPDATE gaps SET repeats = repeats + 1, last_at = ?2, \
                         seq = max(seq, ?3) WHERE id = ?1",
                    )?
                    .execute((id, timestamp(gap.last_at.max(gap.at)), seq))?;
                    Recorded::Repeat(u64::try_from(repeats).unwrap_or(0).saturating_add(1))
                }
                _ => {
                    tx.prepare_cached(&format!(
                        "INSERT INTO gaps ({GAP_COLUMNS}) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, ?7)"
                    ))?
                    .execute((
                        &gap.feed,
                        &gap.url,
                        gap.reason.as_str(),
                        &gap.detail,
                        &gap.last_event_id,
                        seq,
                        timestamp(gap.at),
                    ))?;
                    Recorded::New
                }
            };
            tx.commit()?;
            Ok(recorded)
        })();
        result.map_err(|e| self.sql_error(&context, e))
    }

    /// The recorded gaps, of one feed or of all, in the order they were recorded.
    pub fn list_gaps(&self, feed: Option<&str>) -> Result<Vec<Gap>, StateError> {
        let rows = match feed {
            Some(feed) => self
                .conn
                .prepare_cached(&format!(
                    "SELECT {GAP_COLUMNS} FROM gaps WHERE feed = ?1 ORDER BY id"
                ))
                .and_then(|mut stmt| {
                    stmt.query_map([feed], gap_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()
                }),
            None => self
                .conn
                .prepare_cached(&format!("SELECT {GAP_COLUMNS} FROM gaps ORDER BY id"))
                .and_then(|mut stmt| {
                    stmt.query_map([], gap_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()
                }),
        }
        .map_err(|e| self.sql_error("cannot list gaps", e))?;
        rows.into_iter().map(|r| self.gap_from(r)).collect()
    }

    fn seq_to_sql(&self, seq: u64, feed: &str) -> Result<i64, StateError> {
        crate::store::sqlite::seq_to_sql(feed, seq).map_err(|error| StateError::SeqTooLarge {
            path: self.path.clone(),
            error,
        })
    }

    fn seq_from_sql(&self, seq: i64, what: &str) -> Result<u64, StateError> {
        u64::try_from(seq)
            .map_err(|_| self.fail(format!("{what} has a negative sequence number {seq}")))
    }

    fn time_from_sql(&self, text: &str, what: &str) -> Result<DateTime<Utc>, StateError> {
        DateTime::parse_from_rfc3339(text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| self.fail(format!("{what} has an invalid timestamp `{text}`: {e}")))
    }

    fn checkpoint_from(&self, row: CheckpointRow) -> Result<Checkpoint, StateError> {
        let (feed, url, last_event_id, seq, updated_at) = row;
        let what = format!("the checkpoint of feed `{feed}`");
        Ok(Checkpoint {
            seq: self.seq_from_sql(seq, &what)?,
            updated_at: self.time_from_sql(&updated_at, &what)?,
            feed,
            url,
            last_event_id,
        })
    }

    fn gap_from(&self, row: GapRow) -> Result<Gap, StateError> {
        let (feed, url, reason, detail, last_event_id, seq, at, repeats, last_at) = row;
        let what = format!("a gap of feed `{feed}`");
        let reason = GapReason::parse(&reason).ok_or_else(|| {
            self.fail(format!(
                "{what} has an unknown reason `{reason}` (written by a newer sse-bridge?)"
            ))
        })?;
        let at = self.time_from_sql(&at, &what)?;
        Ok(Gap {
            seq: self.seq_from_sql(seq, &what)?,
            repeats: u64::try_from(repeats).unwrap_or(1).max(1),
            last_at: if last_at.is_empty() {
                at
            } else {
                self.time_from_sql(&last_at, &what)?
            },
            at,
            feed,
            url,
            reason,
            detail,
            last_event_id,
        })
    }
}

fn checkpoint_row(row: &Row<'_>) -> rusqlite::Result<CheckpointRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

fn gap_row(row: &Row<'_>) -> rusqlite::Result<GapRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
        row.get(8)?,
    ))
}

/// The stored form of a timestamp: the one stored-time format (`store::jsonl::push_time`).
fn timestamp(t: DateTime<Utc>) -> String {
    crate::store::jsonl::format_time(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::path::PathBuf;

    /// A timestamp with microsecond precision (what the database stores).
    fn at(secs: i64, micros: u32) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, micros * 1000).unwrap()
    }

    fn cp(feed: &str, url: &str, id: &str, seq: u64) -> Checkpoint {
        Checkpoint {
            feed: feed.into(),
            url: url.into(),
            last_event_id: id.into(),
            seq,
            updated_at: at(1_790_000_000, 123_456),
        }
    }

    fn gap(feed: &str, reason: GapReason, secs: i64) -> Gap {
        Gap::once(
            feed,
            "https://example.org/s",
            reason,
            format!("detail of {feed}"),
            "id-7",
            7,
            at(secs, 1),
        )
    }

    fn store() -> (tempfile::TempDir, PathBuf, StateStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dirs/state.db");
        let store = StateStore::open(&path).unwrap();
        (dir, path, store)
    }

    #[test]
    fn open_creates_directories_and_uses_wal_and_full_sync() {
        let (_dir, path, store) = store();
        assert!(path.is_file());
        let mode: String = store
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = store
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
        assert_eq!(store.path(), path.display().to_string());
        drop(store);
        // Reopening an existing store works.
        StateStore::open(&path).unwrap();
    }

    #[test]
    fn open_refuses_a_directory_and_a_garbage_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = StateStore::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("is a directory"), "{err}");

        let garbage = dir.path().join("state.db");
        std::fs::write(&garbage, vec![0xA5u8; 8192]).unwrap();
        let err = StateStore::open(&garbage).err().unwrap().to_string();
        assert!(err.contains(&garbage.display().to_string()), "{err}");
        assert!(err.contains("not an SQLite database"), "{err}");
    }

    #[test]
    fn open_reports_a_parent_that_is_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = StateStore::open(&file.join("state.db"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("cannot create the directory"), "{err}");
    }

    #[test]
    fn checkpoint_round_trips_and_is_keyed_by_feed_and_url() {
        let (_dir, path, mut store) = store();
        assert_eq!(store.checkpoint("a", "u1").unwrap(), None);
        let a = cp("a", "u1", "id-1", 1);
        store.save_checkpoints(std::slice::from_ref(&a)).unwrap();
        assert_eq!(store.checkpoint("a", "u1").unwrap(), Some(a.clone()));
        assert_eq!(store.checkpoint("a", "u2").unwrap(), None);
        assert_eq!(store.checkpoint("b", "u1").unwrap(), None);
        drop(store);
        let store = StateStore::open(&path).unwrap();
        assert_eq!(store.checkpoint("a", "u1").unwrap(), Some(a));
    }

    #[test]
    fn has_checkpoint_for_other_url() {
        let (_dir, _path, mut store) = store();
        assert!(!store.has_checkpoint_for_other_url("a", "u1").unwrap());
        store.save_checkpoints(&[cp("a", "u1", "x", 1)]).unwrap();
        assert!(!store.has_checkpoint_for_other_url("a", "u1").unwrap());
        assert!(store.has_checkpoint_for_other_url("a", "u2").unwrap());
        assert!(!store.has_checkpoint_for_other_url("b", "u2").unwrap());
    }

    #[test]
    fn save_checkpoints_upserts_all() {
        let (_dir, _path, mut store) = store();
        store
            .save_checkpoints(&[cp("a", "u", "1", 1), cp("b", "u", "", 0)])
            .unwrap();
        let mut a2 = cp("a", "u", "2", 2);
        a2.updated_at = at(1_790_000_100, 999_999);
        store
            .save_checkpoints(&[
                a2.clone(),
                cp("c", "u", "9", u64::try_from(i64::MAX).unwrap()),
            ])
            .unwrap();
        store.save_checkpoints(&[]).unwrap();
        let all = store.list_checkpoints().unwrap();
        assert_eq!(
            all,
            vec![
                a2,
                cp("b", "u", "", 0),
                cp("c", "u", "9", u64::try_from(i64::MAX).unwrap())
            ]
        );
    }

    #[test]
    fn save_checkpoints_never_moves_a_checkpoint_back() {
        let (_dir, _path, mut store) = store();
        store.save_checkpoints(&[cp("a", "u", "10", 10)]).unwrap();
        // A writer that computed its checkpoint earlier commits it later: ignored.
        store.save_checkpoints(&[cp("a", "u", "7", 7)]).unwrap();
        assert_eq!(
            store.list_checkpoints().unwrap(),
            vec![cp("a", "u", "10", 10)]
        );
        // The same seq with another ID (an ID-only dispatch) still moves it.
        store.save_checkpoints(&[cp("a", "u", "10b", 10)]).unwrap();
        assert_eq!(
            store.list_checkpoints().unwrap(),
            vec![cp("a", "u", "10b", 10)]
        );
        store.save_checkpoints(&[cp("a", "u", "12", 12)]).unwrap();
        assert_eq!(
            store.list_checkpoints().unwrap(),
            vec![cp("a", "u", "12", 12)]
        );
    }

    #[test]
    fn save_checkpoints_with_out_of_range_seq_writes_nothing() {
        let (_dir, _path, mut store) = store();
        store.save_checkpoints(&[cp("a", "u", "1", 1)]).unwrap();
        let err = store
            .save_checkpoints(&[cp("a", "u", "2", 2), cp("b", "u", "x", u64::MAX)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("too large") && err.contains("`b`"), "{err}");
        assert_eq!(
            store.list_checkpoints().unwrap(),
            vec![cp("a", "u", "1", 1)]
        );
    }

    #[test]
    fn save_checkpoints_is_one_transaction() {
        let (_dir, _path, mut store) = store();
        store.save_checkpoints(&[cp("a", "u", "1", 1)]).unwrap();
        // A trigger makes the second row fail inside the transaction.
        store
            .conn
            .execute_batch(
                "CREATE TEMP TRIGGER refuse BEFORE INSERT ON checkpoints
                 WHEN NEW.feed = 'bad' BEGIN SELECT RAISE(ABORT, 'refused by test'); END;",
            )
            .unwrap();
        let err = store
            .save_checkpoints(&[cp("a", "u", "2", 2), cp("bad", "u", "x", 1)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refused by test") && err.contains("`bad`"),
            "{err}"
        );
        assert_eq!(
            store.list_checkpoints().unwrap(),
            vec![cp("a", "u", "1", 1)]
        );
    }

    #[test]
    fn set_checkpoint_keeps_seq() {
        let (_dir, _path, mut store) = store();
        store.set_checkpoint("a", "u", "manual").unwrap();
        let got = store.checkpoint("a", "u").unwrap().unwrap();
        assert_eq!((got.last_event_id.as_str(), got.seq), ("manual", 0));
        assert!((Utc::now() - got.updated_at).num_seconds().abs() < 60);

        store.save_checkpoints(&[cp("a", "u", "5", 5)]).unwrap();
        store.set_checkpoint("a", "u", "").unwrap();
        let got = store.checkpoint("a", "u").unwrap().unwrap();
        assert_eq!((got.last_event_id.as_str(), got.seq), ("", 5));
    }

    #[test]
    fn list_checkpoints_is_sorted() {
        let (_dir, _path, mut store) = store();
        assert!(store.list_checkpoints().unwrap().is_empty());
        store
            .save_checkpoints(&[
                cp("b", "u", "1", 1),
                cp("a", "v", "2", 2),
                cp("a", "u", "3", 3),
            ])
            .unwrap();
        let keys: Vec<(String, String)> = store
            .list_checkpoints()
            .unwrap()
            .into_iter()
            .map(|c| (c.feed, c.url))
            .collect();
        assert_eq!(
            keys,
            [("a", "u"), ("a", "v"), ("b", "u")].map(|(f, u)| (f.to_string(), u.to_string()))
        );
    }

    #[test]
    fn reset_checkpoint_deletes_all_urls_of_the_feed() {
        let (_dir, _path, mut store) = store();
        store
            .save_checkpoints(&[
                cp("a", "u", "1", 1),
                cp("a", "v", "2", 2),
                cp("b", "u", "3", 3),
            ])
            .unwrap();
        assert_eq!(store.reset_checkpoint("a").unwrap(), 2);
        assert_eq!(store.reset_checkpoint("a").unwrap(), 0);
        assert_eq!(store.reset_checkpoint("nope").unwrap(), 0);
        assert_eq!(
            store.list_checkpoints().unwrap(),
            vec![cp("b", "u", "3", 3)]
        );
    }

    #[test]
    fn gaps_are_recorded_and_listed_in_order() {
        let (_dir, path, mut store) = store();
        assert!(store.list_gaps(None).unwrap().is_empty());
        let gaps: Vec<Gap> = GapReason::ALL
            .iter()
            .enumerate()
            .map(|(i, r)| {
                gap(
                    if i % 2 == 0 { "a" } else { "b" },
                    *r,
                    1_800_000_000 - i as i64,
                )
            })
            .collect();
        for g in &gaps {
            store.record_gap(g).unwrap();
        }
        drop(store);
        let store = StateStore::open(&path).unwrap();
        assert_eq!(store.list_gaps(None).unwrap(), gaps);
        let a: Vec<Gap> = gaps.iter().filter(|g| g.feed == "a").cloned().collect();
        assert_eq!(store.list_gaps(Some("a")).unwrap(), a);
        assert!(store.list_gaps(Some("zzz")).unwrap().is_empty());
    }

    #[test]
    fn identical_gaps_in_a_row_are_one_row_with_a_count() {
        let (_dir, _path, mut store) = store();
        let first = gap("a", GapReason::ReconnectWithoutId, 100);
        assert_eq!(store.record_gap(&first).unwrap(), Recorded::New);
        for i in 1..=999u64 {
            let mut again = gap("a", GapReason::ReconnectWithoutId, 100 + i as i64);
            again.seq = 7 + i;
            again.detail = format!("after {i} more events");
            assert_eq!(store.record_gap(&again).unwrap(), Recorded::Repeat(i + 1));
        }
        // Another feed's gap does not break the run of feed `a`.
        store
            .record_gap(&gap("b", GapReason::ReconnectWithoutId, 2000))
            .unwrap();
        let mut last = gap("a", GapReason::ReconnectWithoutId, 3000);
        last.seq = 5000;
        assert_eq!(store.record_gap(&last).unwrap(), Recorded::Repeat(1001));
        let rows = store.list_gaps(Some("a")).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].repeats, 1001);
        assert_eq!(rows[0].at, first.at, "the first occurrence stays");
        assert_eq!(rows[0].last_at, last.at);
        assert_eq!(rows[0].seq, 5000);
        assert_eq!(rows[0].detail, first.detail);
        // A different reason, id or URL starts a new row; an operator's change always does.
        let mut other_id = gap("a", GapReason::ReconnectWithoutId, 3001);
        other_id.last_event_id = "id-8".into();
        assert_eq!(store.record_gap(&other_id).unwrap(), Recorded::New);
        assert_eq!(
            store
                .record_gap(&gap("a", GapReason::IdRejected, 3002))
                .unwrap(),
            Recorded::New
        );
        for s in [3003, 3004] {
            assert_eq!(
                store
                    .record_gap(&gap("a", GapReason::ManualChange, s))
                    .unwrap(),
                Recorded::New
            );
        }
        assert_eq!(store.list_gaps(Some("a")).unwrap().len(), 5);
    }

    #[test]
    fn record_gap_refuses_out_of_range_seq() {
        let (_dir, _path, mut store) = store();
        let mut g = gap("a", GapReason::IdRejected, 1);
        g.seq = u64::MAX;
        assert!(store.record_gap(&g).is_err());
        assert!(store.list_gaps(None).unwrap().is_empty());
    }

    #[test]
    fn bad_rows_give_errors_not_panics() {
        let (_dir, _path, store) = store();
        store
            .conn
            .execute_batch(
                "INSERT INTO checkpoints VALUES ('a', 'u', 'x', 1, 'yesterday');
                 INSERT INTO gaps (feed, url, reason, detail, last_event_id, seq, at)
                 VALUES ('a', 'u', 'cosmic-ray', '', '', 0, '2026-01-01T00:00:00Z');",
            )
            .unwrap();
        let err = store.list_checkpoints().unwrap_err().to_string();
        assert!(err.contains("invalid timestamp `yesterday`"), "{err}");
        let err = store.list_gaps(None).unwrap_err().to_string();
        assert!(err.contains("unknown reason `cosmic-ray`"), "{err}");
    }

    #[test]
    fn gap_reason_text_round_trips() {
        for r in GapReason::ALL {
            assert_eq!(GapReason::parse(r.as_str()), Some(r));
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
        assert_eq!(GapReason::parse("nope"), None);
    }
}
