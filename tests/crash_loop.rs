//! Crash loop: 1 000 000 events with ids from a local resumable SSE server, through the real
//! binary into every sink type there is (a JSON Lines file; SQLite both in the state database,
//! where events and checkpoints commit together, and in a database of its own), killed with
//! SIGKILL at random moments at least 20 times and restarted each time. Then:
//!
//! - zero events lost, in every sink;
//! - zero duplicates in SQLite, by (feed, id) and not only by its unique key;
//! - in the file, every duplicate is identifiable (same id => same seq, type and data) and the
//!   duplicates are exactly the events stored after the last committed checkpoint of each
//!   kill, each such window a commit interval or so of stream;
//! - after every kill, the committed checkpoint covers only events every sink holds, and every
//!   restart resumed from a committed checkpoint;
//! - every line of the file is whole.
//!
//! The figures (events, kills, duplicates per sink) are printed: `cargo test --test crash_loop
//! -- --nocapture`. `CRASH_LOOP_SEED=n` replays a sequence of kill moments;
//! `CRASH_LOOP_EVENTS` and `CRASH_LOOP_KILLS` scale it.
//!
//! The Kafka sink is not part of it: there is no Kafka sink in this tree yet.

mod support;

#[path = "support/bridge.rs"]
mod bridge;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bridge::{checkpoint, parse_line, Bridge, Tail};
use rand::{Rng, SeedableRng};
use support::{event_type, write_file, LogServer};

const FEED: &str = "wiki";
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn log_data(n: u64) -> String {
    format!("{{\"n\":{n},\"title\":\"Page {n}\",\"comment\":\"résumé ✓\"}}")
}

fn config(dir: &Path, url: &str) -> PathBuf {
    let text = format!(
        r#"
[state]
path = "{d}/state.db"
commit_interval = "{commit}ms"

[shutdown]
timeout = "60s"

[[feed]]
name = "{FEED}"
url = "{url}"
default_retry = "100ms"
idle_timeout = "10s"
backoff = {{ initial = "100ms", max = "500ms" }}

[sink.archive]
type = "file"
path = "{d}/events/{{feed}}.jsonl"
fsync = "never"

# Shares the state database: events and checkpoints commit in one transaction.
[sink.state_db]
type = "sqlite"
path = "{d}/state.db"
synchronous = "normal"

# A database of its own: checkpoints move after its commits.
[sink.own_db]
type = "sqlite"
path = "{d}/events.db"
synchronous = "normal"

[[route]]
event = "*"
sinks = ["archive", "state_db", "own_db"]
"#,
        d = dir.display(),
        commit = COMMIT_INTERVAL.as_millis(),
    );
    write_file(dir, "bridge.toml", &text)
}

/// What the file sink holds so far, read incrementally.
struct FileView {
    tail: Tail,
    /// `first_at[seq]`: when the first copy of the event was received (µs since the epoch;
    /// 0: not stored yet).
    first_at: Vec<i64>,
    /// Every seq in `1..=prefix` is stored.
    prefix: u64,
    lines: u64,
    duplicates: u64,
    /// Highest seq stored.
    max_seq: u64,
}

impl FileView {
    fn new(path: &Path, total: u64) -> FileView {
        FileView {
            tail: Tail::new(path),
            first_at: vec![0; total as usize + 1],
            prefix: 0,
            lines: 0,
            duplicates: 0,
            max_seq: 0,
        }
    }

    /// Reads the lines appended since the last call; every one must be a whole, valid event.
    fn update(&mut self, total: u64, when: &str) {
        for raw in self.tail.read_new() {
            self.lines += 1;
            let text = String::from_utf8(raw).unwrap_or_else(|e| {
                panic!("{when}: line {} of the file is not UTF-8: {e}", self.lines)
            });
            let e = parse_line(&text, &format!("{when}: line {} of the file", self.lines));
            assert_eq!(e.feed, FEED);
            let n: u64 = e.id.parse().unwrap_or_else(|_| panic!("id of {e:?}"));
            assert!((1..=total).contains(&n), "{when}: id out of range: {e:?}");
            // Every copy of an event is identifiable: its id comes with the same seq, type
            // and data as the first copy (the log's content for that id).
            assert_eq!(e.seq, n, "{when}: seq of id {n}: {e:?}");
            assert_eq!(e.event_type, event_type(n), "{when}: type of {n}");
            assert_eq!(e.data, log_data(n), "{when}: data of {n}");
            let i = n as usize;
            if self.first_at[i] != 0 {
                self.duplicates += 1;
            } else {
                // First copies arrive in order: nothing skipped, nothing reordered.
                assert_eq!(
                    n,
                    self.prefix + 1,
                    "{when}: event {n} stored first while {} was due",
                    self.prefix + 1
                );
                self.prefix = n;
                self.first_at[i] = micros(&e.received_at).max(1);
            }
            self.max_seq = self.max_seq.max(n);
        }
    }
}

/// Opens an SQLite database written by a killed bridge (recovering its WAL like a restart).
fn open_db(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).expect("open database");
    c.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
    c
}

/// Rows of the feed in an events database with `seq <= upto`.
fn db_count_upto(path: &Path, upto: u64) -> u64 {
    if !path.exists() {
        return 0;
    }
    let c = open_db(path);
    c.query_row(
        "SELECT COUNT(*) FROM events WHERE feed = ?1 AND seq <= ?2",
        rusqlite::params![FEED, upto as i64],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
    .unwrap_or(0)
}

/// Final check of an events database: every event exactly once, in order, with the right
/// content. Returns the number of rows.
fn check_db(path: &Path, total: u64, what: &str) -> u64 {
    let c = open_db(path);
    let (rows, ids, dup_ids): (i64, i64, i64) = c
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT id), \
             (SELECT COUNT(*) FROM (SELECT id FROM events WHERE feed = ?1 \
                                    GROUP BY id HAVING COUNT(*) > 1)) \
             FROM events WHERE feed = ?1",
            [FEED],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("count");
    assert_eq!(dup_ids, 0, "{what}: ids stored more than once");
    assert_eq!(rows as u64, total, "{what}: rows");
    assert_eq!(ids as u64, total, "{what}: distinct ids");
    let mut stmt = c
        .prepare("SELECT seq, id, type, data FROM events WHERE feed = ?1 ORDER BY pos")
        .expect("prepare");
    let mut rows_iter = stmt.query([FEED]).expect("query");
    let mut expect = 1u64;
    while let Some(r) = rows_iter.next().expect("row") {
        let seq: i64 = r.get(0).expect("seq");
        let id: String = r.get(1).expect("id");
        let ty: String = r.get(2).expect("type");
        let data: String = r.get(3).expect("data");
        assert_eq!(seq as u64, expect, "{what}: rows in insertion order");
        assert_eq!(id, expect.to_string(), "{what}: id of seq {seq}");
        assert_eq!(ty, event_type(expect), "{what}: type of {expect}");
        assert_eq!(data, log_data(expect), "{what}: data of {expect}");
        expect += 1;
    }
    rows as u64
}

fn micros(received_at: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(received_at)
        .expect("received_at")
        .timestamp_micros()
}

/// What each kill left behind.
#[derive(Debug)]
struct Kill {
    after: Duration,
    /// The committed checkpoint's seq (0: none yet).
    checkpoint: u64,
    /// The highest seq in the file.
    stored: u64,
    /// Bytes of a torn last line in the file (a write cut by the kill).
    torn: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_events_through_twenty_kill_9s_lose_nothing() {
    let total = env_u64("CRASH_LOOP_EVENTS", 1_000_000);
    let min_kills = env_u64("CRASH_LOOP_KILLS", 20) as usize;
    let seed = env_u64("CRASH_LOOP_SEED", rand::random());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();

    // 1 000 events every 25 ms: 40 000 events/s, 25 s of stream if nothing stopped it.
    let server = LogServer::start(total, 1000, Duration::from_millis(25)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let config = config(d, &server.url());
    let file = d.join(format!("events/{FEED}.jsonl"));
    let state = d.join("state.db");
    let own_db = d.join("events.db");

    let mut view = FileView::new(&file, total);
    let mut kills: Vec<Kill> = Vec::new();
    let mut checkpoints_seen: Vec<String> = Vec::new();
    while kills.len() < min_kills {
        let bridge = Bridge::spawn(&config);
        // A random moment: sometimes during the start, mostly while events stream.
        let after = if rng.gen_bool(0.15) {
            Duration::from_millis(rng.gen_range(0..100))
        } else {
            Duration::from_millis(rng.gen_range(100..1500))
        };
        tokio::time::sleep(after).await;
        let logs = bridge.kill9();
        assert!(
            !logs.iter().any(|l| l.message.contains("panicked")),
            "a panic before kill {}: {logs:#?}",
            kills.len() + 1
        );
        let when = format!("after kill {}", kills.len() + 1);
        view.update(total, &when);
        let torn = view.tail.partial().len();
        let cp = checkpoint(&state, FEED);
        let cp_seq = cp.as_ref().map_or(0, |c| c.1);
        if let Some((id, seq)) = &cp {
            assert_eq!(id, &seq.to_string(), "{when}: checkpoint id and seq");
            checkpoints_seen.push(id.clone());
        }
        // The committed checkpoint never covers an event a sink does not hold.
        assert!(
            view.prefix >= cp_seq,
            "{when}: checkpoint {cp_seq} but the file holds only 1..={}",
            view.prefix
        );
        for db in [&state, &own_db] {
            let n = db_count_upto(db, cp_seq);
            assert_eq!(
                n,
                cp_seq,
                "{when}: checkpoint {cp_seq} but {} holds {n} of those events",
                db.display()
            );
        }
        kills.push(Kill {
            after,
            checkpoint: cp_seq,
            stored: view.max_seq,
            torn,
        });
    }
    let kill_phase = started.elapsed();

    // The last run: no kill; everything arrives; SIGTERM drains.
    let bridge = Bridge::spawn(&config);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        view.update(total, "during the last run");
        if view.prefix == total && checkpoint(&state, FEED).is_some_and(|c| c.1 == total) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the last run stored 1..={} of {total} (checkpoint {:?}); log:\n{}",
            view.prefix,
            checkpoint(&state, FEED),
            bridge.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, logs) = bridge.terminate(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0), "exit after SIGTERM: {logs:#?}");
    view.update(total, "after the last run");
    assert!(
        view.tail.partial().is_empty(),
        "the file ends with a torn line after a clean stop"
    );
    assert_eq!(
        checkpoint(&state, FEED),
        Some((total.to_string(), total)),
        "final checkpoint"
    );

    // Zero lost, zero duplicated in SQLite.
    assert_eq!(view.prefix, total, "events in the file");
    let state_rows = check_db(&state, total, "the state database's events");
    let own_rows = check_db(&own_db, total, "events.db");

    // Every restart resumed from a committed checkpoint.
    let requests = server.requests();
    assert_eq!(requests[0].last_event_id, None);
    for r in &requests[1..] {
        let id = r.last_event_id.as_deref().unwrap_or("");
        assert!(
            id.is_empty() || checkpoints_seen.iter().any(|c| c == id) || id == total.to_string(),
            "a request resumed from {id:?}, which was never a committed checkpoint at a kill"
        );
    }

    // File duplicates: exactly the events stored after the committed checkpoint at each
    // kill, and each such window spans about a commit interval of stream.
    let expected_dups: u64 = kills.iter().map(|k| k.stored - k.checkpoint).sum();
    assert_eq!(
        view.duplicates, expected_dups,
        "duplicates in the file vs the uncommitted windows at the kills: {kills:?}"
    );
    let mut widest = Duration::ZERO;
    let mut largest = 0;
    for (i, k) in kills.iter().enumerate() {
        if k.stored <= k.checkpoint {
            continue;
        }
        largest = largest.max(k.stored - k.checkpoint);
        let first = view.first_at[k.checkpoint as usize + 1];
        let last = view.first_at[k.stored as usize];
        let span = Duration::from_micros((last - first).max(0) as u64);
        widest = widest.max(span);
        assert!(
            span <= COMMIT_INTERVAL * 10,
            "kill {}: {} uncommitted events received over {span:?}",
            i + 1,
            k.stored - k.checkpoint
        );
    }
    let torn = kills.iter().filter(|k| k.torn > 0).count();
    let early = kills
        .iter()
        .filter(|k| k.after < Duration::from_millis(100))
        .count();

    let mut per_type: HashMap<&str, u64> = HashMap::new();
    for n in 1..=total {
        *per_type.entry(event_type(n)).or_default() += 1;
    }
    eprintln!(
        "crash loop (seed {seed}): {total} events, {} kill -9 ({early} during start-up) in {:.1?}, \
         then a clean run; {:.1?} in all",
        kills.len(),
        kill_phase,
        started.elapsed()
    );
    eprintln!(
        "  file: {} lines, {} duplicates (largest window {largest} events, widest {widest:.0?} of stream), \
         {torn} kills left a torn last line",
        view.lines, view.duplicates
    );
    eprintln!("  sqlite (state db): {state_rows} rows, 0 duplicates");
    eprintln!("  sqlite (own db):   {own_rows} rows, 0 duplicates");
    eprintln!("  {} connections; kills: {:?}", requests.len(), kills
        .iter()
        .map(|k| (k.after.as_millis() as u64, k.checkpoint, k.stored))
        .collect::<Vec<_>>());
}
