//! Crash loop: 1 000 000 events with ids from a local resumable SSE server, through the real
//! binary into every storage sink type there is (a JSON Lines file; SQLite both in the state
//! database, where events and checkpoints commit together, and in a database of its own; a
//! Kafka topic on a tansu broker), killed with SIGKILL at random moments at least 20 times and
//! restarted each time. Then:
//!
//! - zero events lost, in every sink;
//! - zero duplicates in SQLite, by (feed, id) and not only by its unique key, and zero in the
//!   file: each run of the bridge appended consecutive events starting right after what the
//!   file held (the file sink drops the re-fetched events its own data shows it has);
//! - in Kafka, every duplicate is identifiable (same id => same seq, type and data), each run
//!   wrote consecutive events starting right after a committed checkpoint, and the duplicates
//!   are the re-fetched parts of the uncommitted windows, each bounded by what one commit
//!   interval (plus a second) of stream can hold;
//! - after every kill, the committed checkpoint covers only events the file and both SQLite
//!   databases hold (Kafka is read once, at the end: a checkpoint ahead of it would show there
//!   as a lost event), and every restart resumed from a committed checkpoint;
//! - every line of the file is whole.
//!
//! The figures (events, kills, duplicates per sink) are printed: `cargo test --test crash_loop
//! -- --nocapture`. `CRASH_LOOP_SEED=n` replays a sequence of kill moments;
//! `CRASH_LOOP_EVENTS` and `CRASH_LOOP_KILLS` scale it. Without tansu (see
//! `support/kafka.rs`) the Kafka sink is left out with a loud note, unless a broker is
//! required (CI).

mod support;

#[path = "support/kafka.rs"]
mod kafka;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use support::bridge::{checkpoint, parse_line, Bridge, Tail};
use support::server::Server;
use support::{archive_sink, event_type, state_section, write_file};

const FEED: &str = "wiki";
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// The server's pace: `CHUNK` events every `PAUSE`, i.e. `RATE` events/s at most.
const CHUNK: u64 = 1000;
const PAUSE: Duration = Duration::from_millis(25);
const RATE: u64 = 40_000;
/// The Kafka topic (one partition: the feed's records in one order).
const TOPIC: &str = "wiki-events";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn log_data(n: u64) -> String {
    format!("{{\"n\":{n},\"title\":\"Page {n}\",\"comment\":\"résumé ✓\"}}")
}

fn config(dir: &Path, url: &str, brokers: Option<&str>) -> PathBuf {
    let kafka = match brokers {
        Some(b) => {
            format!("[sink.stream]\ntype = \"kafka\"\nbrokers = \"{b}\"\ntopic = \"{TOPIC}\"\n")
        }
        None => String::new(),
    };
    let sinks = if brokers.is_some() {
        r#""archive", "state_db", "own_db", "stream""#
    } else {
        r#""archive", "state_db", "own_db""#
    };
    let text = format!(
        r#"
{state}

[shutdown]
timeout = "60s"

[[feed]]
name = "{FEED}"
url = "{url}"
default_retry = "100ms"
idle_timeout = "10s"
backoff = {{ initial = "100ms", max = "500ms" }}

{archive}

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

{kafka}
[[route]]
event = "*"
sinks = [{sinks}]
"#,
        d = dir.display(),
        state = state_section(dir, &format!("{}ms", COMMIT_INTERVAL.as_millis())),
        archive = archive_sink(dir),
    );
    write_file(dir, "bridge.toml", &text)
}

/// What the file sink holds so far, read incrementally.
struct FileView {
    tail: Tail,
    /// `seen[seq]`: the event is stored.
    seen: Vec<bool>,
    /// Every seq in `1..=prefix` is stored.
    prefix: u64,
    lines: u64,
    duplicates: u64,
    /// Highest seq stored.
    max_seq: u64,
    /// The lines of the current run: first seq, last seq, count (each run of the bridge
    /// appends consecutive seqs from its checkpoint on).
    run: Option<(u64, u64, u64)>,
}

impl FileView {
    fn new(path: &Path, total: u64) -> FileView {
        FileView {
            tail: Tail::new(path),
            seen: vec![false; total as usize + 1],
            prefix: 0,
            lines: 0,
            duplicates: 0,
            max_seq: 0,
            run: None,
        }
    }

    /// A new run of the bridge starts appending.
    fn begin_run(&mut self) {
        self.run = None;
    }

    /// Reads the lines appended since the last call; every one must be a whole, valid event.
    /// Called only while no bridge runs. A torn last line read before is read again from its
    /// start: the bridge must have cut it before appending (or left it alone).
    fn update(&mut self, total: u64, when: &str) {
        self.tail.rewind_partial();
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
            if self.seen[i] {
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
                self.seen[i] = true;
            }
            self.max_seq = self.max_seq.max(n);
            self.run = match self.run {
                None => Some((n, n, 1)),
                Some((first, last, count)) => {
                    assert_eq!(n, last + 1, "{when}: seq {n} written after {last}");
                    Some((first, n, count + 1))
                }
            };
        }
    }
}

/// Opens an SQLite database written by a killed bridge (recovering its WAL like a restart).
fn open_db(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).expect("open database");
    c.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    c
}

/// `(rows, highest seq)` of the feed in an events database.
fn db_extent(path: &Path) -> (u64, u64) {
    if !path.exists() {
        return (0, 0);
    }
    let c = open_db(path);
    c.query_row(
        "SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM events WHERE feed = ?1",
        [FEED],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .unwrap_or((0, 0))
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

/// Checks the lines one run appended: consecutive seqs, starting right after what the file
/// already held (the run resumed from its committed checkpoint, and the file sink dropped the
/// re-fetched events it held: its cursor is its own data). Returns the duplicates it made:
/// none.
fn run_duplicates(view: &FileView, resume_at: u64, stored_before: u64, when: &str) -> u64 {
    match view.run {
        None => 0,
        Some((first, last, count)) => {
            assert_eq!(
                first,
                resume_at.max(stored_before) + 1,
                "{when}: the run resumed after the committed checkpoint {resume_at} with the file \
                 holding 1..={stored_before}, and first appended seq {first}"
            );
            assert_eq!(count, last - first + 1);
            0
        }
    }
}

/// Reads the whole topic back: every copy carries the content of its id, the records are runs
/// of consecutive seqs (one per bridge run that got records out), each starting right after a
/// committed checkpoint and re-sending at most `bound` events already there, and no run skips
/// an event. Returns (records, duplicates, largest re-sent window).
fn check_kafka(
    broker: &kafka::Broker,
    total: u64,
    checkpoints: &[String],
    bound: u64,
) -> (u64, u64, u64) {
    let records = broker.read_topic(TOPIC, total as usize, Duration::from_secs(2));
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for r in &records {
        let id = r.header("sse-id").expect("sse-id");
        let n: u64 = id.parse().unwrap_or_else(|_| panic!("sse-id {id:?}"));
        assert!((1..=total).contains(&n), "kafka: id out of range: {r:?}");
        assert_eq!(r.header("sse-seq"), Some(id.clone()), "kafka: seq of {n}");
        assert_eq!(r.header("sse-feed").as_deref(), Some(FEED));
        assert_eq!(
            r.header("sse-type").as_deref(),
            Some(event_type(n)),
            "kafka: type of {n}"
        );
        assert_eq!(r.payload, log_data(n).into_bytes(), "kafka: data of {n}");
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == n => *last = n,
            _ => runs.push((n, n)),
        }
    }
    let starts: std::collections::HashSet<u64> = std::iter::once(0)
        .chain(
            checkpoints
                .iter()
                .map(|c| c.parse::<u64>().expect("numeric checkpoint")),
        )
        .collect();
    let mut stored = 0u64;
    let mut largest = 0u64;
    for &(first, last) in &runs {
        assert!(
            starts.contains(&(first - 1)),
            "kafka: records resume at {first}, but {} was never a committed checkpoint",
            first - 1
        );
        assert!(
            first <= stored + 1,
            "kafka: events {}..{first} are missing",
            stored + 1
        );
        largest = largest.max(last.min(stored).saturating_sub(first - 1));
        stored = stored.max(last);
    }
    assert_eq!(stored, total, "kafka: events present");
    assert!(
        largest <= bound,
        "kafka: a restart re-sent {largest} events (bound {bound})"
    );
    let n = records.len() as u64;
    (n, n - total, largest)
}

/// What each kill left behind.
#[derive(Debug)]
struct Kill {
    after: Duration,
    /// The committed checkpoint's seq (0: none yet).
    checkpoint: u64,
    /// The highest seq every sink held.
    everywhere: u64,
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
    let server = Server::log(total, CHUNK, PAUSE).await;
    let broker = kafka::Broker::start().await;
    if let Some(b) = &broker {
        b.create_topics(&[(TOPIC, 1)]).await;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let config = config(d, &server.url(), broker.as_ref().map(|b| b.addr.as_str()));
    let file = d.join(format!("events/{FEED}.jsonl"));
    let state = d.join("state.db");
    let own_db = d.join("events.db");

    let mut view = FileView::new(&file, total);
    let mut kills: Vec<Kill> = Vec::new();
    let mut checkpoints_seen: Vec<String> = Vec::new();
    // Where the next run resumes (the committed checkpoint) and what the file held then.
    let mut resume_at = 0u64;
    let mut stored_before = 0u64;
    let mut expected_dups = 0u64;
    let mut problems: Vec<String> = Vec::new();
    // Where in the stream the kills land: random points spread over it (so that kills hit
    // a small and a large state alike), each kill a random moment after the run stored that
    // far; and now and then a kill during the start-up instead.
    let mut targets: Vec<u64> = (0..min_kills)
        .map(|_| rng.gen_range(1..total.max(2) * 9 / 10 + 1))
        .collect();
    targets.sort_unstable();
    while kills.len() < min_kills {
        view.begin_run();
        let bridge = Bridge::spawn(&config);
        let spawned = Instant::now();
        if rng.gen_bool(0.15) {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..100))).await;
        } else {
            let target = targets[kills.len()];
            let deadline = Instant::now() + Duration::from_secs(180);
            // Progress as events.db sees it: the file is read only between runs.
            while db_extent(&own_db).1 < target {
                assert!(
                    Instant::now() < deadline,
                    "run {} did not get to event {target} (events.db holds up to {}); log:\n{}",
                    kills.len() + 1,
                    db_extent(&own_db).1,
                    bridge.log_text()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
        }
        let after = spawned.elapsed();
        let logs = bridge.kill9();
        problems.extend(
            logs.iter()
                .filter(|l| l.level == "WARN" || l.level == "ERROR")
                .map(|l| l.show()),
        );
        assert!(
            !logs.iter().any(|l| l.message.contains("panicked")),
            "a panic before kill {}: {logs:#?}",
            kills.len() + 1
        );
        let when = format!("after kill {}", kills.len() + 1);
        view.update(total, &when);
        expected_dups += run_duplicates(&view, resume_at, stored_before, &when);
        let torn = view.tail.partial().len();
        let cp = checkpoint(&state, FEED);
        let cp_seq = cp.as_ref().map_or(0, |c| c.1);
        if let Some((id, seq)) = cp.as_ref().filter(|c| c.1 > 0) {
            assert_eq!(id, &seq.to_string(), "{when}: checkpoint id and seq");
            checkpoints_seen.push(id.clone());
        }
        assert!(cp_seq >= resume_at, "{when}: the checkpoint went back");
        // The committed checkpoint never covers an event a sink does not hold.
        assert!(
            view.prefix >= cp_seq,
            "{when}: checkpoint {cp_seq} but the file holds only 1..={}",
            view.prefix
        );
        let mut everywhere = view.prefix;
        for db in [&state, &own_db] {
            let n = db_count_upto(db, cp_seq);
            assert_eq!(
                n,
                cp_seq,
                "{when}: checkpoint {cp_seq} but {} holds {n} of those events",
                db.display()
            );
            // Each database holds a prefix of the stream, once.
            let (rows, max) = db_extent(db);
            assert_eq!(
                rows,
                max,
                "{when}: {} holds {rows} rows up to seq {max}",
                db.display()
            );
            everywhere = everywhere.min(max);
        }
        kills.push(Kill {
            after,
            checkpoint: cp_seq,
            everywhere,
            stored: view.max_seq,
            torn,
        });
        resume_at = cp_seq;
        stored_before = view.max_seq;
    }
    let kill_phase = started.elapsed();

    // The last run: no kill; everything arrives; SIGTERM drains.
    view.begin_run();
    let bridge = Bridge::spawn(&config);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if checkpoint(&state, FEED).is_some_and(|c| c.1 == total) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the last run did not get to {total} (checkpoint {:?}); log:\n{}",
            checkpoint(&state, FEED),
            bridge.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, logs) = bridge.terminate(Duration::from_secs(60)).await;
    problems.extend(
        logs.iter()
            .filter(|l| l.level == "WARN" || l.level == "ERROR")
            .map(|l| l.show()),
    );
    for p in &problems {
        eprintln!("  logged: {p}");
    }
    assert_eq!(status.code(), Some(0), "exit after SIGTERM: {logs:#?}");
    view.update(total, "after the last run");
    expected_dups += run_duplicates(&view, resume_at, stored_before, "the last run");
    assert!(
        view.tail.partial().is_empty(),
        "the file ends with a torn line after a clean stop"
    );
    assert_eq!(
        checkpoint(&state, FEED),
        Some((total.to_string(), total)),
        "final checkpoint"
    );

    // The stream always carries ids: no restart may have been recorded as a gap.
    let gaps: i64 = open_db(&state)
        .query_row("SELECT COUNT(*) FROM gaps", [], |r| r.get(0))
        .expect("gaps");
    assert_eq!(gaps, 0, "gaps recorded");

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
            id.is_empty() || checkpoints_seen.iter().any(|c| c == id),
            "a request resumed from {id:?}, which was never a committed checkpoint at a kill"
        );
    }

    // File duplicates: none. The re-fetched parts of the uncommitted windows (the events
    // stored after the committed checkpoint at each kill) were dropped by the file sink.
    assert_eq!(expected_dups, 0);
    assert_eq!(view.duplicates, 0, "duplicates in the file: {kills:?}");
    // The uncommitted window at a kill is (checkpoint, stored]: what the file held beyond the
    // committed checkpoint. It is bounded by the commit interval: at most what the server
    // streams (RATE events/s at most) in one interval plus a second for the batch in flight
    // and the commit itself. Within it, the file can run ahead of the slowest sink by at most
    // that sink's buffer (`buffer.max_events`, 10 000) and the batch it is writing (8192).
    let bound = (RATE as f64 * (COMMIT_INTERVAL + Duration::from_secs(1)).as_secs_f64()) as u64;
    let mut largest = 0;
    let mut uncommitted_everywhere = 0;
    let mut ahead = 0;
    for (i, k) in kills.iter().enumerate() {
        let window = k.stored - k.checkpoint;
        largest = largest.max(window);
        ahead = ahead.max(k.stored - k.everywhere);
        uncommitted_everywhere =
            uncommitted_everywhere.max(k.everywhere.saturating_sub(k.checkpoint));
        assert!(
            window <= bound,
            "kill {}: {window} events stored beyond the committed checkpoint (bound {bound})",
            i + 1
        );
        assert!(
            k.stored - k.everywhere <= 10_000 + 8192,
            "kill {}: the file ran {} events ahead of the slowest sink",
            i + 1,
            k.stored - k.everywhere
        );
    }
    let kafka_dups = broker
        .as_ref()
        .map(|b| check_kafka(b, total, &checkpoints_seen, bound));
    let torn = kills.iter().filter(|k| k.torn > 0).count();
    let early = kills
        .iter()
        .filter(|k| k.after < Duration::from_millis(100))
        .count();

    eprintln!(
        "crash loop (seed {seed}): {total} events, {} kill -9 ({early} during start-up) in {:.1?}, \
         then a clean run; {:.1?} in all",
        kills.len(),
        kill_phase,
        started.elapsed()
    );
    eprintln!(
        "  file: {} lines, {} duplicates, all identified by id (largest uncommitted window at a \
         kill: {largest} events, bound {bound}; of which stored by every sink: at most \
         {uncommitted_everywhere}; file ahead of the slowest sink: at most {ahead}); {torn} \
         kills left a torn last line",
        view.lines, view.duplicates
    );
    eprintln!("  sqlite (state db): {state_rows} rows, 0 duplicates");
    eprintln!("  sqlite (own db):   {own_rows} rows, 0 duplicates");
    match kafka_dups {
        Some((records, dups, largest)) => eprintln!(
            "  kafka: {records} records, {dups} duplicates, all identified by id (largest \
             re-fetched window {largest} events, bound {bound})"
        ),
        None => eprintln!("  kafka: not run (no tansu broker)"),
    }
    eprintln!(
        "  {} connections; kills (ms after start, checkpoint, stored by every sink, in the file): \
         {:?}",
        requests.len(),
        kills
            .iter()
            .map(|k| (
                k.after.as_millis() as u64,
                k.checkpoint,
                k.everywhere,
                k.stored
            ))
            .collect::<Vec<_>>()
    );
}
