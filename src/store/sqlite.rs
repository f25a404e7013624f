//! SQLite storage: the `events` table and the `checkpoints` upsert, in one place. The `sqlite`
//! sink writes events through [`EventInserter`]; the sink (when it shares the state database)
//! and the state store write checkpoints through [`upsert_checkpoint`]; `replay` and `serve`
//! read events with [`EVENT_COLUMNS`] and decode them with [`RowView`]. The tables themselves
//! are created by the numbered files in `migrations/` (`crate::state::migrate`).
//!
//! Stored values: text as UTF-8 text; sequence numbers as SQLite integers, so at most
//! `i64::MAX` ([`seq_to_sql`]); times as [`format_time`] writes them (RFC 3339, UTC,
//! microseconds, fixed width, so they compare as text in time order).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row};

pub use super::jsonl::{format_time, push_time};
use crate::event::Event;
use crate::state::Checkpoint;

/// The columns of a stored event as read, in this order ([`RowView`] reads them by position).
pub const EVENT_COLUMNS: &str = "pos, feed, seq, id, type, data, received_at";

/// The names in [`EVENT_COLUMNS`]: a database whose `events` table lacks one was not written
/// by a `sqlite` sink.
pub const EVENT_COLUMN_NAMES: [&str; 7] =
    ["pos", "feed", "seq", "id", "type", "data", "received_at"];

const POS: usize = 0;
const FEED: usize = 1;
const SEQ: usize = 2;
const ID: usize = 3;
const TYPE: usize = 4;
const DATA: usize = 5;
const RECEIVED_AT: usize = 6;

/// The insert of one event: a duplicate (by the `events_identity` unique key on feed, id, seq
/// and, for an event without an id, its receive time) is ignored, so storage is exactly once.
const INSERT_EVENT: &str = "INSERT OR IGNORE INTO events (feed, seq, id, type, data, received_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// The columns of a checkpoint as read, in this order.
pub const CHECKPOINT_COLUMNS: &str = "feed, url, last_event_id, seq, updated_at";

/// The checkpoint upsert. A checkpoint never moves back: two writers commit checkpoints when
/// an SQLite sink shares the state database (the committer and the sink), each only positions
/// that are stored, and whichever commits last must not undo the other's progress
/// (ARCHITECTURE.md §4). The same seq with another ID (an ID-only dispatch) still moves it.
const UPSERT_CHECKPOINT: &str =
    "INSERT INTO checkpoints (feed, url, last_event_id, seq, updated_at)
     VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT (feed, url) DO UPDATE SET
         last_event_id = excluded.last_event_id,
         seq = excluded.seq,
         updated_at = excluded.updated_at
     WHERE excluded.seq >= checkpoints.seq";

/// A sequence number SQLite cannot hold (its integers are signed 64-bit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "sequence number {seq} of feed `{feed}` is too large to store (SQLite holds at most {max})",
    max = i64::MAX
)]
pub struct SeqTooLarge {
    pub feed: String,
    pub seq: u64,
}

/// `seq` as stored, or why it cannot be.
pub fn seq_to_sql(feed: &str, seq: u64) -> Result<i64, SeqTooLarge> {
    i64::try_from(seq).map_err(|_| SeqTooLarge {
        feed: feed.to_string(),
        seq,
    })
}

/// Inserts events inside the caller's transaction, through one prepared (and cached)
/// statement for the whole batch: the SQLite sink's hot path.
pub struct EventInserter<'c> {
    stmt: rusqlite::CachedStatement<'c>,
    /// The receive time's text, reused.
    time: Vec<u8>,
}

impl<'c> EventInserter<'c> {
    pub fn new(conn: &'c Connection) -> rusqlite::Result<Self> {
        Ok(EventInserter {
            stmt: conn.prepare_cached(INSERT_EVENT)?,
            time: Vec::with_capacity(32),
        })
    }

    /// Inserts `event`; `Ok(false)` when it was already stored. A sequence number beyond
    /// [`seq_to_sql`] is an error without anything written (callers check a whole batch
    /// first, so that a batch fails before any of it is written).
    pub fn insert(&mut self, event: &Event) -> rusqlite::Result<bool> {
        let seq = seq_to_sql(&event.feed, event.seq)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        self.time.clear();
        push_time(&mut self.time, event.received_at);
        let at = time_text(&self.time, event.received_at);
        let n = self.stmt.execute((
            &*event.feed,
            seq,
            &*event.id,
            &*event.event_type,
            &event.data,
            &*at,
        ))?;
        Ok(n > 0)
    }
}

/// [`push_time`] only writes ASCII, so this is always the buffer itself.
fn time_text(time: &[u8], t: DateTime<Utc>) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(time) {
        Ok(s) => s.into(),
        Err(_) => format_time(t).into(),
    }
}

/// Upserts one checkpoint (see [`UPSERT_CHECKPOINT`]: it never moves back) inside the
/// caller's transaction. A sequence number beyond [`seq_to_sql`] is an error without anything
/// written.
pub fn upsert_checkpoint(conn: &Connection, cp: &Checkpoint) -> rusqlite::Result<()> {
    let seq = seq_to_sql(&cp.feed, cp.seq)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    conn.prepare_cached(UPSERT_CHECKPOINT)?.execute((
        &cp.feed,
        &cp.url,
        &cp.last_event_id,
        seq,
        format_time(cp.updated_at),
    ))?;
    Ok(())
}

/// Why a database cannot be read as an event log. Each names the file; the message says what
/// is wrong and, for a foreign database, what it holds instead.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// An SQLite call failed. (The SQLite error is part of the sentence and held, not chained
    /// as `source()`, so `{:#}` does not print it twice.)
    #[error("{path}: {context}: {error}")]
    Sql {
        path: String,
        context: &'static str,
        error: rusqlite::Error,
    },
    #[error(
        "{path}: no `events` table, so this is not a database written by a sqlite sink \
         (its tables: {tables})"
    )]
    NoEventsTable { path: String, tables: String },
    #[error(
        "{path}: table `events` has no column `{column}`, so it was not written by a sqlite \
         sink (its columns: {columns})"
    )]
    MissingColumn {
        path: String,
        column: &'static str,
        columns: String,
    },
}

/// Opens an SQLite database read-only and checks that it has the sink's `events` table with
/// every column of [`EVENT_COLUMNS`].
pub fn open_read_only(path: &Path) -> Result<Connection, OpenError> {
    let shown = || path.display().to_string();
    let sql = |context: &'static str| {
        move |error: rusqlite::Error| OpenError::Sql {
            path: shown(),
            context,
            error,
        }
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(sql("cannot open the database"))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(sql("cannot set the busy timeout"))?;
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql("cannot read the database schema"))?;
    if !tables.iter().any(|t| t == "events") {
        return Err(OpenError::NoEventsTable {
            path: shown(),
            tables: if tables.is_empty() {
                "none".to_string()
            } else {
                tables.join(", ")
            },
        });
    }
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('events')")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql("cannot read the schema of `events`"))?;
    if let Some(column) = EVENT_COLUMN_NAMES
        .into_iter()
        .find(|needed| !columns.iter().any(|c| c == needed))
    {
        return Err(OpenError::MissingColumn {
            path: shown(),
            column,
            columns: columns.join(", "),
        });
    }
    Ok(conn)
}

/// The `pos` of the newest stored event (0 when there is none).
pub fn last_pos(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT COALESCE(MAX(pos), 0) FROM events", [], |r| r.get(0))
}

/// The `pos` of the first event of `feed` with this id, at or before `up_to`, if any: where a
/// server resuming after `Last-Event-ID` continues from.
pub fn pos_of_id(
    conn: &Connection,
    feed: &str,
    id: &str,
    up_to: i64,
) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT MIN(pos) FROM events WHERE feed = ?1 AND id = ?2 AND pos <= ?3")?
        .query_row((feed, id, up_to), |r| r.get::<_, Option<i64>>(0))
        .optional()
        .map(Option::flatten)
}

/// `(seq, id)` of the stored event of `feed` with the highest `seq` (from the feed index).
pub fn last_of_feed(conn: &Connection, feed: &str) -> rusqlite::Result<Option<(u64, String)>> {
    conn.prepare_cached("SELECT seq, id FROM events WHERE feed = ?1 ORDER BY seq DESC LIMIT 1")?
        .query_row([feed], |r| {
            Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get(1)?))
        })
        .optional()
}

/// Whether any event of `feed` is stored (answered from the feed index).
pub fn feed_has_events(conn: &Connection, feed: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM events WHERE feed = ?1)")?
        .query_row([feed], |r| r.get(0))
}

/// Whether the event at `pos` belongs to `feed`.
pub fn pos_is_of_feed(conn: &Connection, feed: &str, pos: i64) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM events WHERE pos = ?1 AND feed = ?2)")?
        .query_row((pos, feed), |r| r.get(0))
}

/// Calls `visit` with the rows after `after` (of `feed`, or of every feed), in `pos` order, at
/// most `limit` of them, until `visit` returns `Ok(false)`.
pub fn for_each_after<E: From<rusqlite::Error>>(
    conn: &Connection,
    feed: Option<&str>,
    after: i64,
    limit: usize,
    mut visit: impl FnMut(RowView<'_, '_>) -> Result<bool, E>,
) -> Result<(), E> {
    // `+feed` keeps SQLite walking the table in `pos` order from the cursor rather than
    // answering through the feed index and sorting what is left, for every page.
    let sql = match feed {
        Some(_) => const_format_after(true),
        None => const_format_after(false),
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut rows = match feed {
        Some(f) => stmt.query((after, limit, f))?,
        None => stmt.query((after, limit))?,
    };
    while let Some(row) = rows.next()? {
        if !visit(RowView::new(row).map_err(|e| e.into_sql())?)? {
            break;
        }
    }
    Ok(())
}

fn const_format_after(by_feed: bool) -> &'static str {
    // Spelled out: the column list is EVENT_COLUMNS (checked by a test).
    if by_feed {
        "SELECT pos, feed, seq, id, type, data, received_at FROM events \
         WHERE pos > ?1 AND +feed = ?3 ORDER BY pos LIMIT ?2"
    } else {
        "SELECT pos, feed, seq, id, type, data, received_at FROM events \
         WHERE pos > ?1 ORDER BY pos LIMIT ?2"
    }
}

/// A row selected with [`EVENT_COLUMNS`], decoded column by column: text is borrowed from the
/// row, and each accessor's error names the row and column.
pub struct RowView<'a, 'stmt> {
    row: &'a Row<'stmt>,
    pub pos: i64,
}

/// A stored row that is not an event as the sink writes it.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("a row with a bad `pos`: {0}")]
    Pos(rusqlite::Error),
    #[error("row pos={pos}: column `{column}`: {error}")]
    Sql {
        pos: i64,
        column: &'static str,
        error: rusqlite::Error,
    },
    #[error("row pos={pos}: column `{column}` is not valid UTF-8")]
    Utf8 { pos: i64, column: &'static str },
    #[error("row pos={pos}: column `{column}` holds {found} where {expected} was expected")]
    Type {
        pos: i64,
        column: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("row pos={pos}: column `received_at` is not an RFC 3339 time ({text:?}): {error}")]
    Time {
        pos: i64,
        text: String,
        error: chrono::ParseError,
    },
}

impl RowError {
    /// As an SQLite error, for a query loop whose error type is `rusqlite::Error`.
    fn into_sql(self) -> rusqlite::Error {
        match self {
            RowError::Pos(e) | RowError::Sql { error: e, .. } => e,
            other => rusqlite::Error::FromSqlConversionFailure(
                0,
                rusqlite::types::Type::Text,
                Box::new(other),
            ),
        }
    }
}

impl<'a, 'stmt> RowView<'a, 'stmt> {
    pub fn new(row: &'a Row<'stmt>) -> Result<Self, RowError> {
        let pos = row.get(POS).map_err(RowError::Pos)?;
        Ok(RowView { row, pos })
    }

    fn text(&self, i: usize, column: &'static str) -> Result<&'a str, RowError> {
        let pos = self.pos;
        match self.row.get_ref(i) {
            Ok(ValueRef::Text(b)) => {
                std::str::from_utf8(b).map_err(|_| RowError::Utf8 { pos, column })
            }
            Ok(other) => Err(RowError::Type {
                pos,
                column,
                found: format!("{:?}", other.data_type()),
                expected: "text",
            }),
            Err(error) => Err(RowError::Sql { pos, column, error }),
        }
    }

    pub fn feed(&self) -> Result<&'a str, RowError> {
        self.text(FEED, "feed")
    }

    pub fn id(&self) -> Result<&'a str, RowError> {
        self.text(ID, "id")
    }

    pub fn event_type(&self) -> Result<&'a str, RowError> {
        self.text(TYPE, "type")
    }

    pub fn data(&self) -> Result<&'a str, RowError> {
        self.text(DATA, "data")
    }

    pub fn seq(&self) -> Result<u64, RowError> {
        let pos = self.pos;
        match self.row.get_ref(SEQ) {
            Ok(ValueRef::Integer(n)) if n >= 0 => Ok(n as u64),
            Ok(other) => Err(RowError::Type {
                pos,
                column: "seq",
                found: match other {
                    ValueRef::Integer(n) => n.to_string(),
                    other => format!("{:?}", other.data_type()),
                },
                expected: "a sequence number",
            }),
            Err(error) => Err(RowError::Sql {
                pos,
                column: "seq",
                error,
            }),
        }
    }

    pub fn received_at(&self) -> Result<DateTime<Utc>, RowError> {
        let text = self.text(RECEIVED_AT, "received_at")?;
        DateTime::parse_from_rfc3339(text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|error| RowError::Time {
                pos: self.pos,
                text: text.to_string(),
                error,
            })
    }

    /// The whole event, every column checked.
    pub fn event(&self) -> Result<Event, RowError> {
        let seq = self.seq()?;
        Ok(Event {
            feed: Arc::from(self.feed()?),
            id: self.id()?.into(),
            event_type: self.event_type()?.into(),
            data: self.data()?.to_string(),
            received_at: self.received_at()?,
            seq,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn db() -> (tempfile::TempDir, std::path::PathBuf, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.db");
        let mut conn = Connection::open(&path).unwrap();
        crate::state::migrate::migrate(&mut conn, "e.db").unwrap();
        (dir, path, conn)
    }

    fn event(feed: &str, seq: u64, id: &str) -> Event {
        Event {
            received_at: Utc.with_ymd_and_hms(2026, 11, 24, 8, 0, 0).unwrap()
                + chrono::Duration::microseconds(seq as i64),
            ..Event::new(feed, "edit", id, format!("data {seq}\nline 2"), seq)
        }
    }

    fn all(conn: &Connection, feed: Option<&str>) -> Vec<(i64, Event)> {
        let mut out = Vec::new();
        for_each_after(conn, feed, 0, 100, |row| {
            out.push((row.pos, row.event().expect("event")));
            Ok::<_, rusqlite::Error>(true)
        })
        .unwrap();
        out
    }

    #[test]
    fn the_column_list_is_spelled_once() {
        assert_eq!(EVENT_COLUMNS, EVENT_COLUMN_NAMES.join(", "));
        for sql in [const_format_after(true), const_format_after(false)] {
            assert!(sql.starts_with(&format!("SELECT {EVENT_COLUMNS} FROM events ")));
        }
    }

    #[test]
    fn events_round_trip_once_and_are_read_by_feed_and_position() {
        let (_dir, path, conn) = db();
        let events = [event("f", 1, "a"), event("g", 1, "a"), event("f", 2, "")];
        let mut insert = EventInserter::new(&conn).unwrap();
        for e in &events {
            assert!(insert.insert(e).unwrap());
        }
        // Stored once: the same events again are ignored.
        for e in &events {
            assert!(!insert.insert(e).unwrap());
        }
        drop(insert);
        let got = all(&conn, None);
        assert_eq!(
            got.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
            events
        );
        let f = all(&conn, Some("f"));
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].1, events[2]);
        assert_eq!(last_pos(&conn).unwrap(), got[2].0);
        assert_eq!(
            pos_of_id(&conn, "f", "a", i64::MAX).unwrap(),
            Some(got[0].0)
        );
        assert_eq!(pos_of_id(&conn, "f", "a", got[0].0 - 1).unwrap(), None);
        assert_eq!(pos_of_id(&conn, "f", "zz", i64::MAX).unwrap(), None);
        assert!(pos_is_of_feed(&conn, "g", got[1].0).unwrap());
        assert!(!pos_is_of_feed(&conn, "f", got[1].0).unwrap());
        // The time as every other stored time is written.
        let at: String = conn
            .query_row("SELECT received_at FROM events WHERE seq = 2", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(at, "2026-11-24T08:00:00.000002Z");
        // A read-only reader sees the same.
        let ro = open_read_only(&path).unwrap();
        assert_eq!(all(&ro, None), got);
        // A visit that stops early stops the walk.
        let mut seen = 0;
        for_each_after(&ro, None, 0, 100, |_| {
            seen += 1;
            Ok::<_, rusqlite::Error>(false)
        })
        .unwrap();
        assert_eq!(seen, 1);
    }

    #[test]
    fn a_sequence_number_sqlite_cannot_hold_is_refused_before_writing() {
        let (_dir, _path, conn) = db();
        let err = EventInserter::new(&conn)
            .unwrap()
            .insert(&event("f", u64::MAX, "x"))
            .unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
        assert_eq!(last_pos(&conn).unwrap(), 0);
        assert_eq!(seq_to_sql("f", 7), Ok(7));
        let e = seq_to_sql("b", u64::MAX).unwrap_err();
        assert!(e.to_string().contains("`b`"), "{e}");
    }

    #[test]
    fn checkpoints_never_move_back() {
        let (_dir, _path, conn) = db();
        let cp = |id: &str, seq: u64| Checkpoint {
            feed: "f".into(),
            url: "u".into(),
            last_event_id: id.into(),
            seq,
            updated_at: Utc.with_ymd_and_hms(2026, 11, 24, 8, 0, 0).unwrap(),
        };
        let read = || -> (String, i64, String) {
            conn.query_row(
                "SELECT last_event_id, seq, updated_at FROM checkpoints",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
        };
        upsert_checkpoint(&conn, &cp("10", 10)).unwrap();
        upsert_checkpoint(&conn, &cp("7", 7)).unwrap();
        assert_eq!(
            read(),
            ("10".into(), 10, "2026-11-24T08:00:00.000000Z".into())
        );
        upsert_checkpoint(&conn, &cp("10b", 10)).unwrap();
        assert_eq!(read().0, "10b");
        assert!(upsert_checkpoint(&conn, &cp("x", u64::MAX)).is_err());
        assert_eq!(read().0, "10b");
    }

    #[test]
    fn foreign_databases_and_bad_rows_are_named() {
        let (dir, path, conn) = db();
        let none = dir.path().join("none.db");
        Connection::open(&none)
            .unwrap()
            .execute_batch("CREATE TABLE orders (x); CREATE TABLE users (y);")
            .unwrap();
        let err = open_read_only(&none).unwrap_err().to_string();
        assert!(
            err.contains("no `events` table") && err.contains("orders, users"),
            "{err}"
        );
        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE events (pos, feed);")
            .unwrap();
        let err = open_read_only(&other).unwrap_err();
        assert!(
            matches!(err, OpenError::MissingColumn { column: "seq", .. }),
            "{err}"
        );
        let err = open_read_only(&dir.path().join("missing.db")).unwrap_err();
        assert!(matches!(err, OpenError::Sql { .. }), "{err}");

        conn.execute_batch(
            "INSERT INTO events (feed, seq, id, type, data, received_at)
             VALUES ('f', 'x', 'a', 't', 'd', '2026-01-01T00:00:00Z'),
                    ('f', 2, 'b', 't', 'd', 'yesterday'),
                    ('f', 3, 'c', 't', x'ff', '2026-01-01T00:00:00Z'),
                    ('f', 4, 'd', x'61', 'd', '2026-01-01T00:00:00Z');",
        )
        .unwrap();
        let ro = open_read_only(&path).unwrap();
        let mut errors = Vec::new();
        for_each_after(&ro, None, 0, 10, |row| {
            errors.push(row.event().unwrap_err().to_string());
            Ok::<_, rusqlite::Error>(true)
        })
        .unwrap();
        assert!(
            errors[0].contains("column `seq` holds Text where a sequence number"),
            "{errors:?}"
        );
        assert!(
            errors[1].contains("`received_at` is not an RFC 3339 time (\"yesterday\")"),
            "{errors:?}"
        );
        assert!(
            errors[2].contains("column `data` holds Blob where text"),
            "{errors:?}"
        );
        assert!(
            errors[3].contains("column `type` holds Blob where text"),
            "{errors:?}"
        );
        assert!(
            errors.iter().all(|e| e.starts_with("row pos=")),
            "{errors:?}"
        );
    }
}
