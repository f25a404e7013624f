//! The one integration-test harness: the SSE test server ([`server`]), the real binary as a
//! child process ([`bridge`]) and the event fixture ([`server::event_text`]).
//!
//! Every test binary includes it with `mod support;` (`tests/hostile/` with `#[path]`).
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

pub mod bridge;
pub mod gateway;
pub mod h2;
pub mod server;

#[allow(unused_imports)]
pub use bridge::{bin, write_file};
#[allow(unused_imports)]
pub use server::{event_text, event_type};

/// `[state]`: the state database `DIR/state.db`, committing every `commit_interval`.
pub fn state_section(dir: &Path, commit_interval: &str) -> String {
    format!(
        "[state]\npath = \"{}/state.db\"\ncommit_interval = \"{commit_interval}\"",
        dir.display()
    )
}

/// `[sink.archive]`: a file sink writing `DIR/events/{feed}.jsonl` without fsync.
pub fn archive_sink(dir: &Path) -> String {
    format!(
        "[sink.archive]\ntype = \"file\"\npath = \"{}/events/{{feed}}.jsonl\"\nfsync = \"never\"",
        dir.display()
    )
}

/// `sse-bridge ARGS`, without `SSE_BRIDGE_CONFIG` from the test's environment.
pub fn command<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
) -> std::process::Command {
    let mut command = std::process::Command::new(bin());
    command.args(args).env_remove("SSE_BRIDGE_CONFIG");
    command
}

/// Runs `command` to its end; panics with its standard error unless it succeeds; returns its
/// standard output.
pub fn succeeds(command: &mut std::process::Command) -> String {
    let out = command.output().expect("run sse-bridge");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// [`succeeds`] for `sse-bridge ARGS`.
pub fn run_ok<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> String {
    succeeds(&mut command(args))
}

/// `sse-bridge replay ARGS`, without the test's `SSE_BRIDGE_CONFIG` and `RUST_LOG`.
pub fn replay(args: &[&str]) -> std::process::Output {
    command(["replay"])
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run sse-bridge replay")
}

/// `out`, after checking that its command succeeded (else panics with its exit and stderr).
pub fn ok(out: &std::process::Output) -> &std::process::Output {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// A database with the events schema and the SQLite sink's pragmas (WAL, `synchronous =
/// FULL`): where the raw rusqlite insert the sink is compared with runs.
pub fn raw_events_db(path: &Path) -> rusqlite::Connection {
    let mut conn = rusqlite::Connection::open(path).expect("open");
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
        .expect("WAL");
    conn.pragma_update(None, "synchronous", "FULL")
        .expect("synchronous");
    sse_bridge::state::migrate::migrate(&mut conn, "raw.db").expect("schema");
    conn
}

/// One transaction inserting `rows` (each event with its received time as stored) with the
/// SQLite sink's statement.
pub fn insert_events<'a>(
    conn: &mut rusqlite::Connection,
    rows: impl IntoIterator<Item = (&'a sse_bridge::event::Event, &'a str)>,
) {
    let tx = conn.transaction().expect("begin");
    {
        let mut stmt = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO events (feed, seq, id, type, data, received_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .expect("prepare");
        for (e, t) in rows {
            stmt.execute((&*e.feed, e.seq as i64, &e.id, &e.event_type, &e.data, t))
                .expect("insert");
        }
    }
    tx.commit().expect("commit");
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}
