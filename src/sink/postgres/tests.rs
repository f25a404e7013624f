//! The postgres sink against the machine's real PostgreSQL (127.0.0.1:5432, user `postgres`):
//! each test makes its own database and drops it. Without a server the tests say so and pass,
//! unless one is required (`CI` or `SSE_BRIDGE_REQUIRE_POSTGRES=1`).

use super::*;
use crate::sink::Sink;

#[path = "../../../tests/support/postgres.rs"]
mod support;

use support::{query as sql, TestDb};

fn config(db: &TestDb, extra: &str) -> PostgresSinkConfig {
    toml::from_str(&format!("url = \"{}\"\n{extra}", db.url())).unwrap()
}

fn events(range: std::ops::RangeInclusive<u64>) -> Vec<Arc<Event>> {
    range
        .map(|n| {
            Arc::new(Event::new(
                "f",
                "edit",
                &format!("id-{n}"),
                format!("{{\"n\":{n}}}"),
                n,
            ))
        })
        .collect()
}

fn column(db: &TestDb, query: &str) -> Vec<String> {
    db.column(query)
}

#[test]
fn rows_and_the_cursor_commit_together() {
    let Some(db) = TestDb::create("rows") else {
        return;
    };
    let mut sink = PostgresSink::build("pg", &config(&db, "data_json = true"), None).unwrap();
    sink.write(&events(1..=100)).unwrap();
    let mut odd = events(101..=101);
    odd.push(Arc::new(Event::new("f", "log", "id-102", "not json", 102)));
    sink.write(&odd).unwrap();
    assert_eq!(column(&db, "SELECT count(*) FROM sse_events"), ["102"]);
    assert_eq!(
        column(&db, "SELECT data_json->>'n' FROM sse_events WHERE seq = 42"),
        ["42"]
    );
    assert_eq!(
        column(
            &db,
            "SELECT data_json IS NULL FROM sse_events WHERE seq = 102"
        ),
        ["t"]
    );
    assert_eq!(
        column(
            &db,
            "SELECT seq || ' ' || id FROM sse_bridge_cursors WHERE feed = 'f'"
        ),
        ["102 id-102"]
    );
    // In insertion order, as serve and replay read them.
    let seqs = column(&db, "SELECT seq FROM sse_events ORDER BY pos");
    assert_eq!(seqs.len(), 102);
    assert!(seqs
        .windows(2)
        .all(|w| w[0].parse::<u64>().unwrap() < w[1].parse().unwrap()));
    // The schema is recorded, and applying it again changes nothing.
    drop(sink);
    let mut again = PostgresSink::build("pg", &config(&db, ""), None).unwrap();
    again.write(&events(103..=103)).unwrap();
    assert_eq!(
        column(&db, "SELECT count(*) FROM sse_bridge_schema_migrations"),
        ["1"]
    );
}

#[test]
fn re_fetched_events_are_dropped_and_a_mismatch_is_a_gap() {
    let Some(db) = TestDb::create("refetch") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    crate::state::StateStore::open(&state).unwrap();
    let c = config(&db, "");
    let mut sink = PostgresSink::build("pg", &c, Some(&state)).unwrap();
    sink.write(&events(1..=10)).unwrap();
    drop(sink);

    // Resumed from a checkpoint at 5: 6..=10 are copies.
    let mut sink = PostgresSink::build("pg", &c, Some(&state)).unwrap();
    sink.feed_started("f", "http://x/", 5, "id-5");
    sink.write(&events(6..=8)).unwrap();
    sink.write(&events(9..=15)).unwrap();
    assert_eq!(sink.duplicates.get(), 5);
    assert_eq!(
        column(
            &db,
            "SELECT count(*) || ' ' || count(DISTINCT seq) FROM sse_events"
        ),
        ["15 15"]
    );
    drop(sink);

    // Resumed at 12, but the server's event 15 is another one.
    let mut sink = PostgresSink::build("pg", &c, Some(&state)).unwrap();
    sink.feed_started("f", "http://x/", 12, "id-12");
    let other: Vec<Arc<Event>> = (13..=16)
        .map(|n| Arc::new(Event::new("f", "edit", &format!("other-{n}"), "o", n)))
        .collect();
    sink.write(&other).unwrap();
    assert_eq!(
        column(
            &db,
            "SELECT id FROM sse_events WHERE seq >= 15 ORDER BY pos"
        ),
        ["id-15", "other-15", "other-16"]
    );
    let gaps = crate::state::StateStore::open(&state)
        .unwrap()
        .list_gaps(None)
        .unwrap();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(gaps[0].reason, crate::state::GapReason::ReplayMismatch);
    assert!(gaps[0].detail.contains("other-15") && gaps[0].detail.contains("the table holds"));
}

#[test]
fn a_run_from_the_beginning_is_judged_by_its_first_event() {
    let Some(db) = TestDb::create("first") else {
        return;
    };
    let c = config(&db, "");
    let mut sink = PostgresSink::build("pg", &c, None).unwrap();
    sink.feed_started("f", "http://x/", 0, "");
    sink.write(&events(1..=10)).unwrap();
    drop(sink);

    // A crash before the first checkpoint: the run starts over and the server sends the same
    // stream; batches that do not reach the cursor are copies too.
    let mut sink = PostgresSink::build("pg", &c, None).unwrap();
    sink.feed_started("f", "http://x/", 0, "");
    sink.write(&events(1..=3)).unwrap();
    sink.write(&events(4..=6)).unwrap();
    sink.write(&events(7..=12)).unwrap();
    assert_eq!(sink.duplicates.get(), 10);
    assert_eq!(
        column(
            &db,
            "SELECT count(*) || ' ' || count(DISTINCT seq) FROM sse_events"
        ),
        ["12 12"]
    );
    drop(sink);

    // A reset checkpoint and a server with new events under the same ids: all stored.
    let mut sink = PostgresSink::build("pg", &c, None).unwrap();
    sink.feed_started("f", "http://x/", 0, "");
    let other: Vec<Arc<Event>> = (1..=3)
        .map(|n| Arc::new(Event::new("f", "edit", &format!("id-{n}"), "new", n)))
        .collect();
    sink.write(&other).unwrap();
    assert_eq!(sink.duplicates.get(), 0);
    assert_eq!(column(&db, "SELECT count(*) FROM sse_events"), ["15"]);
}

#[test]
fn a_terminated_connection_loses_nothing_and_stores_nothing_twice() {
    let Some(db) = TestDb::create("terminate") else {
        return;
    };
    let mut sink = PostgresSink::build("pg", &config(&db, ""), None).unwrap();
    sink.feed_started("f", "http://x/", 0, "");
    let mut failures = 0;
    for chunk in 0..20u64 {
        let batch = events(chunk * 100 + 1..=chunk * 100 + 100);
        if chunk % 5 == 2 {
            sql(
                "postgres",
                &format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = '{}' AND application_name = 'sse-bridge'",
                    db.name
                ),
            );
        }
        // The runner retries a failed batch until it is stored.
        let mut attempts = 0;
        while let Err(e) = sink.write(&batch) {
            failures += 1;
            attempts += 1;
            assert!(attempts < 10, "{e}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(failures >= 1, "the terminated connection was noticed");
    assert_eq!(
        column(
            &db,
            "SELECT count(*) || ' ' || count(DISTINCT seq) FROM sse_events"
        ),
        ["2000 2000"]
    );
}

#[test]
fn a_missing_permission_is_reported_clearly() {
    let Some(db) = TestDb::create("perm") else {
        return;
    };
    let role = format!("{}_ro", db.name);
    sql(&db.name, &format!("DROP ROLE IF EXISTS {role}"));
    sql(&db.name, &format!("CREATE ROLE {role} LOGIN"));
    sql(&db.name, "REVOKE CREATE ON SCHEMA public FROM PUBLIC");
    let c: PostgresSinkConfig = toml::from_str(&format!(
        "url = \"postgresql://{role}@127.0.0.1:5432/{}?sslmode=disable\"",
        db.name
    ))
    .unwrap();
    let mut sink = PostgresSink::build("pg", &c, None).unwrap();
    let err = sink.write(&events(1..=1)).unwrap_err().to_string();
    assert!(
        err.contains("sse_events") && err.contains("permission denied") && err.contains("42501"),
        "{err}"
    );
    drop(sink);
    sql(&db.name, &format!("DROP OWNED BY {role}"));
    sql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", db.name),
    );
    sql("postgres", &format!("DROP ROLE IF EXISTS {role}"));
}

#[test]
fn a_retry_after_a_lost_commit_answer_stores_nothing_twice() {
    let Some(db) = TestDb::create("lost") else {
        return;
    };
    let c = config(&db, "");
    let mut sink = PostgresSink::build("pg", &c, None).unwrap();
    sink.feed_started("f", "http://x/", 0, "");
    sink.write(&events(1..=10)).unwrap();
    // The answer to that commit was lost: the runner sends the batch again (here with more
    // behind it). The batch holds the event at the cursor: what precedes it is stored.
    sink.write(&events(6..=12)).unwrap();
    assert_eq!(
        column(
            &db,
            "SELECT count(*) || ' ' || count(DISTINCT seq) FROM sse_events"
        ),
        ["12 12"]
    );
    // A new numbering (a reset checkpoint) below the cursor is stored, not dropped.
    sink.feed_started("f", "http://x/", 0, "");
    let reset: Vec<Arc<Event>> = (1..=3)
        .map(|n| Arc::new(Event::new("f", "edit", &format!("new-{n}"), "n", n)))
        .collect();
    sink.write(&reset).unwrap();
    assert_eq!(column(&db, "SELECT count(*) FROM sse_events"), ["15"]);
}

#[test]
fn a_nul_from_the_stream_is_stored_not_refused_for_ever() {
    let Some(db) = TestDb::create("nul") else {
        return;
    };
    let mut sink = PostgresSink::build("pg", &config(&db, "data_json = true"), None).unwrap();
    let odd = vec![
        Arc::new(Event::new("f", "t\0y", "i\0d", "a\0b", 1)),
        Arc::new(Event::new("f", "t", "id-2", "{\"k\":\"\\u0000\"}", 2)),
    ];
    sink.write(&odd).unwrap();
    assert_eq!(
        column(&db, "SELECT data FROM sse_events ORDER BY pos"),
        ["a\u{FFFD}b", "{\"k\":\"\\u0000\"}"]
    );
    assert_eq!(
        column(
            &db,
            "SELECT count(*) FROM sse_events WHERE data_json IS NULL"
        ),
        ["2"]
    );
}
