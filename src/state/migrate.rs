//! The migration runner: brings an SQLite database to the schema this sse-bridge knows.
//!
//! Migrations are the numbered files in `migrations/` (`0001_state.sql`, …), embedded in the
//! binary. They are shared by the state store and the SQLite sink, so a database used
//! by both has one schema history. The runner:
//!
//! - creates `schema_migrations(version, name, applied_at)` if missing;
//! - refuses a database whose highest recorded version is above the highest this binary
//!   knows (it was written by a newer sse-bridge, whose data this one could corrupt);
//! - applies every pending migration and records it, all in ONE transaction taken with the
//!   write lock (`BEGIN IMMEDIATE`): either every pending migration is applied or none is,
//!   and two processes starting at once cannot both apply the same migration;
//! - refuses a file that is not an SQLite database with an error naming the file.

use chrono::Utc;
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use super::StateError;

/// One schema change, applied once per database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Strictly increasing from 1; the number in the file name.
    pub version: u32,
    /// The rest of the file name, without the number and `.sql`.
    pub name: &'static str,
    /// The statements, run as one batch inside the migration transaction.
    pub sql: &'static str,
}

/// Every migration this sse-bridge knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "state",
        sql: include_str!("../../migrations/0001_state.sql"),
    },
    Migration {
        version: 2,
        name: "events",
        sql: include_str!("../../migrations/0002_events.sql"),
    },
    Migration {
        version: 3,
        name: "gap_repeats",
        sql: include_str!("../../migrations/0003_gap_repeats.sql"),
    },
];

/// The highest schema version this sse-bridge knows.
pub fn latest_version() -> u32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Brings the database to the latest known schema and returns its schema version.
/// `path_for_errors` names the database in error messages.
pub fn migrate(conn: &mut Connection, path_for_errors: &str) -> Result<u32, StateError> {
    run(conn, path_for_errors, MIGRATIONS)
}

/// [`migrate`] with an explicit migration list (tests use failing lists).
pub(crate) fn run(
    conn: &mut Connection,
    path: &str,
    migrations: &[Migration],
) -> Result<u32, StateError> {
    if let Some(pair) = migrations.windows(2).find(|w| w[0].version >= w[1].version) {
        // A programming error, but reported rather than panicking.
        return Err(StateError::Db {
            path: path.to_string(),
            message: format!(
                "internal error: migrations out of order ({} before {})",
                pair[0].version, pair[1].version
            ),
        });
    }
    let known = migrations.last().map_or(0, |m| m.version);

    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| db_error(path, "cannot start the schema migration", e))?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT    NOT NULL,
             applied_at TEXT    NOT NULL
         );",
    )
    .map_err(|e| db_error(path, "cannot create the schema_migrations table", e))?;
    let current: i64 = tx
        .query_row("SELECT MAX(version) FROM schema_migrations", [], |row| {
            row.get::<_, Option<i64>>(0)
        })
        .optional()
        .map_err(|e| db_error(path, "cannot read the schema version", e))?
        .flatten()
        .unwrap_or(0);
    if current > i64::from(known) {
        return Err(StateError::Db {
            path: path.to_string(),
            message: format!(
                "has schema version {current}, but this sse-bridge knows up to {known}; \
                 upgrade sse-bridge or point state.path elsewhere"
            ),
        });
    }

    let now = crate::store::jsonl::format_time(Utc::now());
    let mut version = u32::try_from(current).unwrap_or(0);
    for m in migrations.iter().filter(|m| i64::from(m.version) > current) {
        let label = format!("{:04}_{}", m.version, m.name);
        tx.execute_batch(m.sql).map_err(|e| {
            db_error(
                path,
                &format!("migration {label} failed, nothing was changed"),
                e,
            )
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            (m.version, m.name, &now),
        )
        .map_err(|e| db_error(path, &format!("cannot record migration {label}"), e))?;
        tracing::info!(database = path, migration = %label, "applied schema migration");
        version = m.version;
    }
    tx.commit()
        .map_err(|e| db_error(path, "cannot commit the schema migration", e))?;
    Ok(version)
}

/// Turns an SQLite error into a [`StateError`] whose message says what happened and, for the
/// common cases, what to do about it. `context` says what the store was doing.
pub(crate) fn db_error(path: &str, context: &str, e: rusqlite::Error) -> StateError {
    let hint = match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => {
            " (the file is not an SQLite database: point state.path at another file, or move \
             this one away if it is safe to start without checkpoints)"
        }
        Some(ErrorCode::DatabaseCorrupt) => {
            " (the database is corrupt: restore a backup, or move it away to start without \
             checkpoints; feeds then resume from the live stream)"
        }
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => {
            " (the database stayed locked for 5 s: is another sse-bridge or a tool holding \
             it open with the same state.path?)"
        }
        Some(ErrorCode::ReadOnly) | Some(ErrorCode::PermissionDenied) => {
            " (check that the file and its directory are writable by this user)"
        }
        Some(ErrorCode::CannotOpen) => {
            " (check that the directory exists, is writable, and that the path is not a \
             directory)"
        }
        Some(ErrorCode::DiskFull) => " (the disk is full: free some space)",
        Some(ErrorCode::SystemIoFailure) => " (an I/O error: check the disk and the kernel log)",
        _ => "",
    };
    StateError::Sql {
        path: path.to_string(),
        context: context.to_string(),
        error: Box::new(e),
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> Connection {
        Connection::open(path).unwrap()
    }

    fn tables(conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_master WHERE type IN ('table','index') ORDER BY name")
            .unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
        rows.map(Result::unwrap)
            .filter(|n| !n.starts_with("sqlite_"))
            .collect()
    }

    #[test]
    fn migrations_are_ordered_and_match_their_files() {
        let mut prev = 0;
        for m in MIGRATIONS {
            assert!(m.version > prev, "versions must increase");
            prev = m.version;
            assert!(!m.sql.trim().is_empty());
            assert!(
                m.sql.contains(&format!("{:04}_{}", m.version, m.name)),
                "the file should name itself in its header comment"
            );
        }
        assert_eq!(latest_version(), prev);
    }

    #[test]
    fn fresh_database_gets_the_latest_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut conn = open(&path);
        assert_eq!(migrate(&mut conn, "s.db").unwrap(), latest_version());
        assert_eq!(
            tables(&conn),
            [
                "checkpoints",
                "events",
                "events_feed_seq",
                "events_feed_type",
                "events_identity",
                "events_received_at",
                "gaps",
                "gaps_feed_at",
                "schema_migrations"
            ]
        );
        let (v, name, at): (u32, String, String) = conn
            .query_row(
                "SELECT version, name, applied_at FROM schema_migrations ORDER BY version",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((v, name.as_str()), (1, "state"));
        assert!(at.ends_with('Z'), "{at}");
        assert!(chrono::DateTime::parse_from_rfc3339(&at).is_ok());
    }

    #[test]
    fn reopening_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let mut conn = open(&path);
            migrate(&mut conn, "s.db").unwrap();
            conn.execute(
                "INSERT INTO checkpoints VALUES ('f', 'u', 'id', 1, 't')",
                [],
            )
            .unwrap();
        }
        let mut conn = open(&path);
        assert_eq!(migrate(&mut conn, "s.db").unwrap(), latest_version());
        assert_eq!(migrate(&mut conn, "s.db").unwrap(), latest_version());
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, MIGRATIONS.len() as i64);
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM checkpoints", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1, "data survives reopening");
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut conn = open(&path);
        migrate(&mut conn, "data/s.db").unwrap();
        conn.execute(
            "INSERT INTO schema_migrations VALUES (99, 'future', '2030-01-01T00:00:00Z')",
            [],
        )
        .unwrap();
        let err = migrate(&mut conn, "data/s.db").unwrap_err().to_string();
        assert!(
            err.contains("database data/s.db: has schema version 99")
                && err.contains(&format!("knows up to {}", latest_version()))
                && err.contains("upgrade sse-bridge or point state.path elsewhere"),
            "{err}"
        );
    }

    #[test]
    fn failing_migration_rolls_back_everything() {
        const LIST: &[Migration] = &[
            Migration {
                version: 1,
                name: "one",
                sql: "CREATE TABLE one (x INTEGER);",
            },
            Migration {
                version: 2,
                name: "two",
                sql: "CREATE TABLE two (x INTEGER); INSERT INTO nowhere VALUES (1);",
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut conn = open(&path);
        let err = run(&mut conn, "s.db", LIST).unwrap_err().to_string();
        assert!(err.contains("migration 0002_two failed"), "{err}");
        assert!(err.contains("nowhere"), "{err}");
        assert!(
            tables(&conn).is_empty(),
            "nothing may remain, not even schema_migrations: {:?}",
            tables(&conn)
        );

        // With the first migration applied earlier, a failing second one leaves version 1.
        assert_eq!(run(&mut conn, "s.db", &LIST[..1]).unwrap(), 1);
        assert!(run(&mut conn, "s.db", LIST).is_err());
        assert_eq!(tables(&conn), ["one", "schema_migrations"]);
        let max: u32 = conn
            .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(max, 1);
    }

    #[test]
    fn migrations_out_of_order_are_refused() {
        const LIST: &[Migration] = &[
            Migration {
                version: 2,
                name: "b",
                sql: "SELECT 1;",
            },
            Migration {
                version: 1,
                name: "a",
                sql: "SELECT 1;",
            },
        ];
        let mut conn = Connection::open_in_memory().unwrap();
        assert!(run(&mut conn, "mem", LIST).is_err());
    }

    #[test]
    fn garbage_file_is_refused_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(
            &path,
            "this is not a database, just some text\n".repeat(200),
        )
        .unwrap();
        let mut conn = open(&path);
        let shown = path.display().to_string();
        let err = migrate(&mut conn, &shown).unwrap_err().to_string();
        assert!(err.contains(&shown), "{err}");
        assert!(err.contains("not an SQLite database"), "{err}");
        // The file is left alone.
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .starts_with("this is not a database"));
    }
}
