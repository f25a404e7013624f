//! The SQLite sink, `replay` and `serve`, end to end: the real binary with real signals, real
//! SQLite files, real HTTP over 127.0.0.1.
//!
//! - kill -9 loop with the sink in the state database: every event stored exactly once;
//! - a sink in its own database: duplicates after a crash are ignored;
//! - round trip: bridge -> SQLite -> `serve` -> second bridge -> SQLite, identical; resuming
//!   in the middle gives exactly the rest; a slow client is cut off without holding others;
//! - replay to stdout (JSON Lines, SSE) with each filter, `--to` a file sink byte for byte,
//!   `--to` an SQLite sink twice, pacing, and errors that name the file and row or line while
//!   writing nothing;
//! - the benchmark (ignored): the sink against a raw rusqlite batched insert.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use rand::Rng;
use rusqlite::Connection;
use sse_bridge::event::Event;
use sse_bridge::sink::file::{FileSink, FileSinkConfig};
use sse_bridge::sink::sqlite::{SqliteSink, SqliteSinkConfig};
use sse_bridge::sink::{jsonl, BufferConfig, Sink};
use sse_bridge::sse::parser::{Item, Limits, Parser};
use support::bridge::{checkpoint, Bridge};
use support::server::{Fault, Options, Server};
use support::{ok, replay, wait_for, write_file};

// ---------------------------------------------------------------------------------------------
// Helpers

fn sqlite_config(path: &Path) -> SqliteSinkConfig {
    toml::from_str(&format!("path = {:?}", path.display().to_string())).expect("sqlite config")
}

/// `SELECT COUNT(*) FROM events`, or 0 when the database is not there yet.
fn count(db: &Path) -> u64 {
    let Ok(conn) = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
        .unwrap_or(0)
}

/// (feed, seq, id, type, data) of every row, in insertion order.
fn rows(db: &Path) -> Vec<(String, u64, String, String, String)> {
    let conn = Connection::open(db).expect("open");
    let mut stmt = conn
        .prepare("SELECT feed, seq, id, type, data FROM events ORDER BY pos")
        .expect("prepare");
    stmt.query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get::<_, i64>(1)? as u64,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
        ))
    })
    .expect("query")
    .map(|r| r.expect("row"))
    .collect()
}

fn parse_sse(bytes: &[u8]) -> Vec<(String, String, String)> {
    let mut parser = Parser::new(Limits {
        max_line_bytes: 1 << 20,
        max_event_bytes: 1 << 20,
        ..Limits::default()
    });
    let mut items = Vec::new();
    parser.push(bytes, &mut items).expect("parse");
    items
        .into_iter()
        .filter_map(|i| match i {
            Item::Event(e) => Some((e.id.to_string(), e.event_type.to_string(), e.data)),
            Item::LastEventId(_) => None,
        })
        .collect()
}

/// A running `sse-bridge serve` and its address.
struct Served {
    process: Bridge,
    addr: SocketAddr,
}

impl Served {
    async fn start(db: &Path, extra: &[&str]) -> Served {
        let mut command = Bridge::command(&["serve"]);
        command
            .arg(db)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info,sse_bridge::serve=debug");
        let process = Bridge::spawn_command(command, db);
        let line = process
            .wait_log("serve listening", Duration::from_secs(30), |l| {
                l.message.contains("listening on http://")
            })
            .await;
        let addr = line
            .message
            .split("listening on http://")
            .nth(1)
            .unwrap_or_default();
        let addr = addr.split_whitespace().next().unwrap_or_default();
        Served {
            addr: addr.parse().expect("address"),
            process,
        }
    }

    fn url(&self, feed: &str) -> String {
        format!("http://{}/feeds/{feed}/events", self.addr)
    }

    fn log(&self) -> String {
        self.process.raw_log()
    }
}

/// Reads an SSE response until `n` events arrived (or `within` passed); returns the events and
/// the raw text.
async fn read_events(
    response: reqwest::Response,
    n: usize,
    within: Duration,
) -> (Vec<(String, String, String)>, String) {
    let mut parser = Parser::new(Limits {
        max_line_bytes: 1 << 20,
        max_event_bytes: 1 << 20,
        ..Limits::default()
    });
    let mut events = Vec::new();
    let mut raw = String::new();
    let mut items = Vec::new();
    let mut response = response;
    let end = tokio::time::Instant::now() + within;
    while events.len() < n {
        let chunk = match tokio::time::timeout_at(end, response.chunk()).await {
            Ok(Ok(Some(c))) => c,
            _ => break,
        };
        raw.push_str(&String::from_utf8_lossy(&chunk));
        items.clear();
        parser.push(&chunk, &mut items).expect("parse");
        for item in items.drain(..) {
            if let Item::Event(e) = item {
                events.push((e.id.to_string(), e.event_type.to_string(), e.data));
            }
        }
    }
    (events, raw)
}

// ---------------------------------------------------------------------------------------------
// A resumable upstream with awkward events: multi-line data, events without `id:` (they keep
// the previous id), unicode.

fn rich_type(n: u64) -> &'static str {
    ["edit", "log", "new"][(n % 3) as usize]
}

fn rich_data(n: u64) -> String {
    if n % 7 == 0 {
        format!("line one of {n}\nline two\n  indented: {{\"x\":1}}")
    } else {
        format!("{{\"n\":{n},\"title\":\"Page {n}\",\"comment\":\"résumé ✓\"}}")
    }
}

/// The id the stream gives event `n`: its own, except every 10th event has no `id:` field.
fn rich_id(n: u64) -> u64 {
    if n % 10 == 0 {
        n - 1
    } else {
        n
    }
}

fn rich_text(n: u64) -> String {
    let mut s = format!("event: {}\n", rich_type(n));
    if n % 10 != 0 {
        s.push_str(&format!("id: {n}\n"));
    }
    for line in rich_data(n).split('\n') {
        s.push_str(&format!("data: {line}\n"));
    }
    s.push('\n');
    s
}

/// The upstream: `total` rich events, 200 per write, 5 ms apart, then heartbeats.
async fn start_rich(total: u64) -> Server {
    let options = Options {
        chunk: 200,
        pause: Duration::from_millis(5),
        heartbeat: Duration::from_millis(200),
        events: rich_text,
        ..Options::log(total)
    };
    Server::start(options, |_| Fault::Normal).await
}

fn bridge_config(
    dir: &Path,
    name: &str,
    state: &Path,
    feeds: &[(&str, &str)],
    db: &Path,
) -> PathBuf {
    let mut text = format!(
        "[state]\npath = {:?}\ncommit_interval = \"200ms\"\n\n[shutdown]\ntimeout = \"20s\"\n\n",
        state.display().to_string()
    );
    for (feed, url) in feeds {
        text.push_str(&format!(
            "[[feed]]\nname = \"{feed}\"\nurl = \"{url}\"\ndefault_retry = \"100ms\"\n\n"
        ));
    }
    text.push_str(&format!(
        "[sink.db]\ntype = \"sqlite\"\npath = {:?}\n\n[routing]\ndefault = [\"db\"]\n",
        db.display().to_string()
    ));
    write_file(dir, name, &text)
}

// ---------------------------------------------------------------------------------------------
// Exactly once across kill -9

const TOTAL: u64 = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_with_the_sink_in_the_state_database_stores_every_event_exactly_once() {
    // 100 000 events with ids, 500 every 20 ms: about 4 s of stream when nobody waits.
    let server = Server::log(TOTAL, 500, Duration::from_millis(20)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.db");
    // The same file, spelled differently: the sink must still recognise the state database.
    let same = dir.path().join(".").join("state.db");
    let config = bridge_config(
        dir.path(),
        "bridge.toml",
        &state,
        &[("wiki", &server.url())],
        &same,
    );

    // Six kills at random points, at least 2 000 events apart.
    let mut rng = rand::thread_rng();
    let kills: Vec<u64> = (0..6u64)
        .map(|i| 3_000 + i * 15_000 + rng.gen_range(0..13_000))
        .collect();
    let mut last_count = 0;
    for (run, kill_at) in kills.iter().enumerate() {
        let mut child = Bridge::spawn_plain(&config);
        // Kill only once this run has connected and stored something of its own, even when
        // a slow poll let the previous run overshoot this kill point.
        let kill_at = (*kill_at).max(last_count + 500);
        let reached = wait_for(Duration::from_secs(90), || {
            server.requests().len() > run && count(&state) >= kill_at
        })
        .await;
        assert!(
            reached,
            "run {run}: stored {} events, wanted {kill_at}\n{}",
            count(&state),
            child.raw_log()
        );
        child.kill();
        let stored = count(&state);
        assert!(stored >= last_count, "rows never disappear");
        last_count = stored;
        let (id, seq) = checkpoint(&state, "wiki").expect("a checkpoint");
        let max_seq = rows(&state).iter().map(|r| r.1).max().unwrap_or(0);
        assert!(
            seq <= max_seq,
            "checkpoint {seq} ran ahead of storage {max_seq}"
        );
        assert_eq!(
            id,
            seq.to_string(),
            "ids and seqs advance together in this stream"
        );
    }
    let mut child = Bridge::spawn_plain(&config);
    assert!(
        wait_for(Duration::from_secs(120), || count(&state) >= TOTAL).await,
        "stored {} of {TOTAL}\n{}",
        count(&state),
        child.raw_log()
    );
    assert_eq!(child.exit_code(Duration::from_secs(25)).await, Some(0));

    let requests = server.requests();
    assert_eq!(requests.len(), kills.len() + 1, "one connection per run");
    assert_eq!(requests[0].last_event_id, None);
    for r in &requests[1..] {
        assert!(
            r.last_event_id.is_some(),
            "every restart resumed with an id: {requests:?}"
        );
    }
    let all = rows(&state);
    assert_eq!(all.len() as u64, TOTAL, "every event stored exactly once");
    for (i, (feed, seq, id, ty, data)) in all.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(feed, "wiki");
        assert_eq!(*seq, n, "in order of seq");
        assert_eq!(id, &n.to_string());
        assert_eq!(ty, support::event_type(n));
        assert_eq!(
            data,
            &format!("{{\"n\":{n},\"title\":\"Page {n}\",\"comment\":\"résumé ✓\"}}")
        );
    }
    assert_eq!(checkpoint(&state, "wiki"), Some((TOTAL.to_string(), TOTAL)));
    eprintln!("killed at {kills:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_in_its_own_database_ignores_what_is_fetched_again_after_kill_9() {
    const N: u64 = 20_000;
    let server = Server::log(N, 500, Duration::from_millis(20)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.db");
    let db = dir.path().join("events.db");
    let config = bridge_config(
        dir.path(),
        "bridge.toml",
        &state,
        &[("wiki", &server.url())],
        &db,
    );
    let mut child = Bridge::spawn_plain(&config);
    let kill_at = rand::thread_rng().gen_range(2_000..15_000);
    assert!(wait_for(Duration::from_secs(60), || count(&db) >= kill_at).await);
    child.kill();
    let stored = count(&db);
    let (_, cp) = checkpoint(&state, "wiki").unwrap_or_default();
    assert!(
        cp <= stored,
        "checkpoint {cp} ran ahead of the sink's {stored}"
    );
    assert!(
        !child.raw_log().contains("share"),
        "a separate database does not take checkpoints"
    );

    let mut child = Bridge::spawn_plain(&config);
    assert!(
        wait_for(Duration::from_secs(60), || checkpoint(&state, "wiki")
            .is_some_and(|c| c.1 == N))
        .await,
        "{}",
        child.raw_log()
    );
    assert_eq!(child.exit_code(Duration::from_secs(25)).await, Some(0));
    let all = rows(&db);
    let ids: Vec<u64> = all.iter().map(|r| r.2.parse().expect("id")).collect();
    assert_eq!(
        ids,
        (1..=N).collect::<Vec<_>>(),
        "re-fetched events were not stored twice"
    );
    eprintln!(
        "killed after {stored} stored, checkpoint {cp}: {} re-fetched and ignored",
        stored - cp
    );
}

// ---------------------------------------------------------------------------------------------
// serve

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_round_trip_into_a_second_bridge_and_resume_in_the_middle() {
    const N: u64 = 3_000;
    let rich = start_rich(N).await;
    let upstream = rich.url_for("/rich");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();

    // Bridge A: upstream -> a.db (its state database).
    let a_db = d.join("a.db");
    let a_config = bridge_config(d, "a.toml", &a_db, &[("rich", &upstream)], &a_db);
    let mut a = Bridge::spawn_plain(&a_config);
    assert!(
        wait_for(Duration::from_secs(30), || a_db.exists()
            && count(&a_db) > 0)
        .await,
        "{}",
        a.raw_log()
    );

    // serve a.db; bridge B subscribes to it and stores into b.db.
    let served = Served::start(&a_db, &["--heartbeat", "200ms", "--max-lag", "100000"]).await;
    let b_db = d.join("b.db");
    let b_config = bridge_config(
        d,
        "b.toml",
        &d.join("b-state.db"),
        &[("mirror", &served.url("rich"))],
        &b_db,
    );
    let mut b = Bridge::spawn_plain(&b_config);
    assert!(
        wait_for(Duration::from_secs(60), || count(&b_db) >= N).await,
        "B stored {} of {N}\nA: {}\nB: {}\nserve: {}",
        count(&b_db),
        a.raw_log(),
        b.raw_log(),
        served.log()
    );
    // A little longer: nothing more may arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a_rows = rows(&a_db);
    let b_rows = rows(&b_db);
    assert_eq!(a_rows.len() as u64, N);
    let strip = |r: &[(String, u64, String, String, String)]| -> Vec<(String, String, String)> {
        r.iter()
            .map(|(_, _, id, t, d)| (t.clone(), id.clone(), d.clone()))
            .collect()
    };
    assert_eq!(
        strip(&b_rows),
        strip(&a_rows),
        "B holds exactly what A stored"
    );
    // And what A stored is what the upstream sent.
    for (i, (_, seq, id, t, data)) in a_rows.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(
            (*seq, id.as_str(), t.as_str()),
            (n, rich_id(n).to_string().as_str(), rich_type(n))
        );
        assert_eq!(data, &rich_data(n));
    }
    let expected: Vec<(String, String, String)> = a_rows
        .iter()
        .map(|(_, _, id, t, d)| (id.clone(), t.clone(), d.clone()))
        .collect();

    // Resume in the middle, by header: exactly the rest.
    let http = reqwest::Client::new();
    let mid = 1234u64;
    let response = http
        .get(served.url("rich"))
        .header("Last-Event-ID", mid.to_string())
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    let rest = (N - mid) as usize;
    let (got, raw) = read_events(response, rest + 1, Duration::from_secs(3)).await;
    assert_eq!(
        got,
        expected[mid as usize..],
        "exactly the events after {mid}"
    );
    assert!(
        raw.starts_with(": sse-bridge serve"),
        "{}",
        &raw[..80.min(raw.len())]
    );
    assert!(raw.contains("\nretry: 3000\n"), "retry is set");
    assert!(
        raw.contains(": heartbeat\n"),
        "heartbeat comments while idle"
    );

    // By query parameter, with a type filter.
    let response = http
        .get(format!(
            "{}?last_event_id={mid}&type=edit",
            served.url("rich")
        ))
        .send()
        .await
        .expect("GET");
    let edits: Vec<_> = expected[mid as usize..]
        .iter()
        .filter(|e| e.1 == "edit")
        .cloned()
        .collect();
    let (got, _) = read_events(response, edits.len() + 1, Duration::from_secs(2)).await;
    assert_eq!(got, edits);

    // An event without an `id:` field keeps the previous id; resuming after that id gives
    // everything after the first event carrying it, as the upstream does.
    let response = http
        .get(served.url("rich"))
        .header("Last-Event-ID", "2009")
        .send()
        .await
        .expect("GET");
    let (got, _) = read_events(response, 3, Duration::from_secs(2)).await;
    assert_eq!(got, expected[2009..2012]);

    // An unknown id is refused, so the client does not silently start elsewhere.
    let response = http
        .get(served.url("rich"))
        .header("Last-Event-ID", "no-such-id")
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 410);

    // Live: the upstream has nothing more, so add events to A's database as another writer,
    // one without an id: served with `@POS`, and a client can resume after it.
    let mut writer = SqliteSink::build("t", &sqlite_config(&a_db), None).expect("sink");
    // The last upstream event has no `id:` of its own: resuming after the id it carries
    // (that of the event before) gives it again, then the new ones.
    let response = http
        .get(served.url("rich"))
        .header("Last-Event-ID", rich_id(N).to_string())
        .send()
        .await
        .expect("GET");
    let late = |seq: u64, id: &str| {
        Arc::new(Event {
            feed: Arc::from("rich"),
            event_type: "late".into(),
            data: format!("late {seq}"),
            id: id.into(),
            received_at: Utc::now(),
            seq,
        })
    };
    writer
        .write(&[late(N + 1, ""), late(N + 2, "x")])
        .expect("write");
    let (got, _) = read_events(response, 3, Duration::from_secs(5)).await;
    assert_eq!(got.first(), expected.last());
    let got = &got[1..];
    let pos: i64 = Connection::open(&a_db)
        .expect("open")
        .query_row("SELECT pos FROM events WHERE seq = ?1", [N + 1], |r| {
            r.get(0)
        })
        .expect("pos");
    assert_eq!(
        got,
        [
            (format!("@{pos}"), "late".into(), format!("late {}", N + 1)),
            ("x".into(), "late".into(), format!("late {}", N + 2)),
        ]
    );
    let response = http
        .get(served.url("rich"))
        .header("Last-Event-ID", format!("@{pos}"))
        .send()
        .await
        .expect("GET");
    let (got, _) = read_events(response, 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].0, "x");

    assert_eq!(b.exit_code(Duration::from_secs(25)).await, Some(0));
    assert_eq!(a.exit_code(Duration::from_secs(25)).await, Some(0));
    let mut served = served;
    assert_eq!(
        served.process.exit_code(Duration::from_secs(10)).await,
        Some(0)
    );
    assert!(!served.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off_without_holding_back_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("events.db");
    let mut sink = SqliteSink::build("t", &sqlite_config(&db), None).expect("sink");
    let served = Served::start(
        &db,
        &["--max-lag", "5000", "--client-buffer", "64", "--feed", "f"],
    )
    .await;

    // A client that sends its request and then never reads.
    let mut slow = std::net::TcpStream::connect(served.addr).expect("connect");
    // A small receive buffer (no autotuning up to tens of MB), as a stuck client would have.
    {
        use std::os::fd::AsRawFd;
        let size: libc::c_int = 64 * 1024;
        // SAFETY: a valid socket, a c_int option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                slow.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt");
    }
    write!(
        slow,
        "GET /feeds/f/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("request");
    // A client that reads.
    let fast = reqwest::Client::new()
        .get(served.url("f"))
        .send()
        .await
        .expect("GET");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 30 000 events of 1 KiB: far more than the slow client's socket buffers hold.
    const N: u64 = 30_000;
    let big = "x".repeat(1000);
    let start = Instant::now();
    let reader = tokio::spawn(read_events(fast, N as usize, Duration::from_secs(60)));
    let mut slow_reader: Option<std::thread::JoinHandle<Vec<u8>>> = None;
    for chunk in 0..(N / 1000) {
        let batch: Vec<Arc<Event>> = (1..=1000)
            .map(|i| {
                let seq = chunk * 1000 + i;
                Arc::new(Event {
                    feed: Arc::from("f"),
                    event_type: "t".into(),
                    data: format!("{seq} {big}"),
                    id: seq.to_string().into(),
                    received_at: Utc::now(),
                    seq,
                })
            })
            .collect();
        sink.write(&batch).expect("write");
        tokio::time::sleep(Duration::from_millis(40)).await;
        // Once cut off, the slow client reads what it was sent at once: the server gives a
        // client it hangs up on a short grace to read, whatever else the machine is doing.
        if slow_reader.is_none() && served.log().contains("fell too far behind") {
            slow_reader = Some(read_to_end_of_body(slow.try_clone().expect("clone")));
        }
    }
    let writing = start.elapsed();
    let (got, _) = reader.await.expect("reader");
    assert_eq!(got.len() as u64, N, "the reading client got everything");
    assert_eq!(got.last().map(|e| e.0.clone()), Some(N.to_string()));

    // The slow client was disconnected: reading it now gives what was buffered, then the end.
    assert!(
        wait_for(Duration::from_secs(10), || served
            .log()
            .contains("fell too far behind"))
        .await,
        "{}",
        served.log()
    );
    let slow_reader = slow_reader.unwrap_or_else(|| read_to_end_of_body(slow));
    let received = slow_reader.join().expect("slow reader");
    assert!(received.ends_with(b"\r\n0\r\n\r\n"), "the stream was ended");
    let text = String::from_utf8_lossy(&received);
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert!(
        (ids.len() as u64) < N,
        "the slow client did not get everything"
    );
    let last = ids.last().copied().unwrap_or("");
    // It resumes with its Last-Event-ID and gets exactly the rest.
    let response = reqwest::Client::new()
        .get(served.url("f"))
        .header("Last-Event-ID", last)
        .send()
        .await
        .expect("GET");
    let rest = N as usize - ids.len();
    let (got, _) = read_events(response, rest, Duration::from_secs(30)).await;
    assert_eq!(got.len(), rest);
    assert_eq!(got[0].0, (ids.len() as u64 + 1).to_string());
    eprintln!(
        "wrote {N} events in {writing:?}; the slow client took {} before it was cut off",
        ids.len()
    );
}

/// Reads `socket` on a thread until the end of a chunked body (or EOF, or 10 s of silence).
fn read_to_end_of_body(mut socket: std::net::TcpStream) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let _ = socket.set_read_timeout(Some(Duration::from_secs(10)));
        let mut received = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while !received.ends_with(b"\r\n0\r\n\r\n") {
            match socket.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
        received
    })
}

// ---------------------------------------------------------------------------------------------
// replay

/// A log of two interleaved feeds with awkward events, written by the real file and SQLite
/// sinks: `dir/log.jsonl` and `dir/log.db`.
struct Fixture {
    dir: tempfile::TempDir,
    events: Vec<Event>,
    t0: DateTime<Utc>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let t0 = Utc.with_ymd_and_hms(2026, 11, 24, 8, 0, 0).unwrap();
        let mut events = Vec::new();
        let (mut wiki_seq, mut news_seq) = (0u64, 0u64);
        let mut wiki_id = String::new();
        for n in 1..=1500u64 {
            let news = n % 3 == 0;
            let (feed, seq) = if news {
                news_seq += 1;
                ("news", news_seq)
            } else {
                wiki_seq += 1;
                ("wiki", wiki_seq)
            };
            let id = if news {
                // The first news events carry no id at all.
                if news_seq <= 3 {
                    String::new()
                } else {
                    format!("n{news_seq}")
                }
            } else {
                if wiki_seq % 10 != 0 {
                    wiki_id = format!("w{wiki_seq}");
                }
                wiki_id.clone()
            };
            let event_type = match n % 5 {
                0 => "edit",
                1 => "log",
                2 => "new",
                3 => "page.move",
                _ => "edit",
            };
            let data = match n % 11 {
                0 => format!("multi\nline {n}\n"),
                1 => String::new(),
                2 => format!(" leading space, \"quotes\", caf\u{e9} \u{1F600} {n}"),
                _ => format!("{{\"n\":{n}}}"),
            };
            events.push(Event {
                feed: Arc::from(feed),
                event_type: event_type.into(),
                data,
                id: id.into(),
                received_at: t0 + chrono::Duration::milliseconds(n as i64 * 10),
                seq,
            });
        }
        let batch: Vec<Arc<Event>> = events.iter().cloned().map(Arc::new).collect();
        let file: FileSinkConfig = toml::from_str(&format!(
            "path = {:?}\nfsync = \"never\"",
            dir.path().join("log.jsonl").display().to_string()
        ))
        .expect("file sink config");
        let mut sink = FileSink::build("log", &file).expect("file sink");
        for part in batch.chunks(400) {
            sink.write(part).expect("write");
        }
        sink.flush().expect("flush");
        let mut db = SqliteSink::build("db", &sqlite_config(&dir.path().join("log.db")), None)
            .expect("sqlite sink");
        for part in batch.chunks(400) {
            db.write(part).expect("write");
        }
        db.flush().expect("flush");
        Fixture { dir, events, t0 }
    }

    fn jsonl(&self) -> PathBuf {
        self.dir.path().join("log.jsonl")
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("log.db")
    }

    fn encode(events: &[&Event]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            jsonl::encode(e, &mut out);
        }
        out
    }
}

#[test]
fn replay_to_stdout_in_both_formats_from_both_sources() {
    let fx = Fixture::new();
    let original = std::fs::read(fx.jsonl()).expect("jsonl");
    let all: Vec<&Event> = fx.events.iter().collect();
    assert_eq!(
        Fixture::encode(&all),
        original,
        "the fixture is what the file sink wrote"
    );
    for source in [fx.db(), fx.jsonl()] {
        let src = source.to_str().expect("path");
        let out = replay(&[src]);
        assert_eq!(ok(&out).stdout, original, "JSONL from {src}, byte for byte");
        let summary = String::from_utf8_lossy(&out.stderr);
        assert!(
            summary.contains("1500 events read, 1500 written, 0 skipped"),
            "{summary}"
        );
        let out = replay(&[src, "--format", "sse"]);
        let parsed = parse_sse(&ok(&out).stdout);
        let want: Vec<(String, String, String)> = fx
            .events
            .iter()
            .map(|e| (e.id.to_string(), e.event_type.to_string(), e.data.clone()))
            .collect();
        assert_eq!(
            parsed, want,
            "SSE from {src} parses back to the same events"
        );
    }
}

#[test]
fn replay_filters_select_the_same_events_from_both_sources() {
    let fx = Fixture::new();
    let t = |ms: i64| (fx.t0 + chrono::Duration::milliseconds(ms)).to_rfc3339();
    let (since, until) = (t(3000), t(9000));
    let first_w501 = fx
        .events
        .iter()
        .position(|e| &*e.feed == "wiki" && &*e.id == "w501")
        .expect("w501");
    // The 10th wiki events carry the previous id: after-id takes the first event with it.
    let first_w9 = fx
        .events
        .iter()
        .position(|e| &*e.feed == "wiki" && &*e.id == "w9")
        .expect("w9");
    type Pick = Box<dyn Fn(usize, &Event) -> bool>;
    let cases: Vec<(Vec<String>, Pick)> = vec![
        (
            vec!["--feed".into(), "news".into()],
            Box::new(|_, e| &*e.feed == "news"),
        ),
        (
            vec!["--type".into(), "e*".into()],
            Box::new(|_, e| &*e.event_type == "edit"),
        ),
        (
            vec!["--type".into(), "{log,page.*}".into()],
            Box::new(|_, e| &*e.event_type == "log" || &*e.event_type == "page.move"),
        ),
        (
            vec![
                "--feed".into(),
                "wiki".into(),
                "--after-id".into(),
                "w501".into(),
            ],
            Box::new(move |i, e| &*e.feed == "wiki" && i > first_w501),
        ),
        (
            vec![
                "--feed".into(),
                "wiki".into(),
                "--after-id".into(),
                "w9".into(),
            ],
            Box::new(move |i, e| &*e.feed == "wiki" && i > first_w9),
        ),
        (
            vec!["--after-seq".into(), "400".into()],
            Box::new(|_, e| e.seq > 400),
        ),
        (
            vec![
                "--since".into(),
                since.clone(),
                "--until".into(),
                until.clone(),
            ],
            Box::new(|i, _| (300..900).contains(&(i + 1))),
        ),
        (
            vec![
                "--feed".into(),
                "wiki".into(),
                "--type".into(),
                "edit".into(),
                "--since".into(),
                since.clone(),
            ],
            Box::new(|i, e| &*e.feed == "wiki" && &*e.event_type == "edit" && i + 1 >= 300),
        ),
    ];
    for (args, pick) in &cases {
        let want: Vec<&Event> = fx
            .events
            .iter()
            .enumerate()
            .filter(|(i, e)| pick(*i, e))
            .map(|(_, e)| e)
            .collect();
        assert!(!want.is_empty() && want.len() < fx.events.len(), "{args:?}");
        let expected = Fixture::encode(&want);
        for source in [fx.db(), fx.jsonl()] {
            let mut full: Vec<&str> = vec![source.to_str().expect("path")];
            full.extend(args.iter().map(String::as_str));
            let out = replay(&full);
            assert_eq!(
                String::from_utf8_lossy(&ok(&out).stdout),
                String::from_utf8_lossy(&expected),
                "replay {full:?}"
            );
            let summary = String::from_utf8_lossy(&out.stderr);
            assert!(
                summary.contains(&format!(
                    "1500 events read, {} written, {} skipped",
                    want.len(),
                    1500 - want.len()
                )),
                "{full:?}: {summary}"
            );
        }
    }
    // An id that is not there is an error, and nothing is written.
    for source in [fx.db(), fx.jsonl()] {
        let out = replay(&[
            source.to_str().expect("path"),
            "--feed",
            "wiki",
            "--after-id",
            "nope",
        ]);
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty());
        assert!(String::from_utf8_lossy(&out.stderr).contains("no event with id \"nope\""));
    }
    // --after-id needs --feed.
    let out = replay(&[fx.db().to_str().expect("path"), "--after-id", "w1"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn replay_to_a_file_sink_reproduces_the_original_and_to_sqlite_stores_once() {
    let fx = Fixture::new();
    let d = fx.dir.path();
    let copy = d.join("copy");
    let config = write_file(
        d,
        "backfill.toml",
        &format!(
            r#"
[state]
path = "{d}/unused-state.db"

[[feed]]
name = "wiki"
url = "http://127.0.0.1:9/unused"

[sink.copy]
type = "file"
path = "{copy}/{{feed}}.jsonl"

[sink.all]
type = "file"
path = "{copy}/all.jsonl"

[sink.db]
type = "sqlite"
path = "{d}/backfill.db"

[routing]
default = ["copy"]
"#,
            d = d.display(),
            copy = copy.display()
        ),
    );
    let cfg = config.to_str().expect("path");
    let db = fx.db();
    let src = db.to_str().expect("path");
    // Everything through one file: the original, byte for byte.
    ok(&replay(&[src, "-c", cfg, "--to", "all"]));
    assert_eq!(
        std::fs::read(copy.join("all.jsonl")).expect("copy"),
        std::fs::read(fx.jsonl()).expect("original")
    );
    // Split by feed: each file holds exactly that feed's lines of the original.
    let jsonl = fx.jsonl();
    ok(&replay(&[
        jsonl.to_str().expect("path"),
        "-c",
        cfg,
        "--to",
        "copy",
    ]));
    for feed in ["wiki", "news"] {
        let want: Vec<&Event> = fx.events.iter().filter(|e| &*e.feed == feed).collect();
        assert_eq!(
            std::fs::read(copy.join(format!("{feed}.jsonl"))).expect("copy"),
            Fixture::encode(&want),
            "{feed}"
        );
    }
    // Into an SQLite sink, twice: stored once.
    for _ in 0..2 {
        let out = replay(&[jsonl.to_str().expect("path"), "-c", cfg, "--to", "db"]);
        assert!(String::from_utf8_lossy(&ok(&out).stderr).contains("1500 written"));
    }
    assert_eq!(rows(&d.join("backfill.db")), rows(&fx.db()));
    // A sink that is not in the configuration is named.
    let out = replay(&[src, "-c", cfg, "--to", "kafka"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[sink.kafka]") && err.contains("all, copy, db"),
        "{err}"
    );
}

#[test]
fn replay_paces_with_rate_and_reports_plain_progress_off_a_terminal() {
    let fx = Fixture::new();
    let src = fx.db();
    let started = Instant::now();
    let out = replay(&[
        src.to_str().expect("path"),
        "--feed",
        "news",
        "--after-seq",
        "480",
        "--rate",
        "100/s",
    ]);
    let took = started.elapsed();
    let lines = ok(&out).stdout.iter().filter(|&&b| b == b'\n').count();
    assert_eq!(lines, 20);
    assert!(
        took >= Duration::from_millis(180),
        "20 events at 100/s took {took:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains('\r'),
        "no progress bar when stderr is not a terminal: {err}"
    );
    assert!(err.contains("20 written"), "{err}");
}

#[test]
fn replay_errors_name_the_file_and_row_or_line_and_write_nothing() {
    let fx = Fixture::new();
    let d = fx.dir.path();
    let target = d.join("target");
    let config = write_file(
        d,
        "to.toml",
        &format!(
            "[[feed]]\nname = \"x\"\nurl = \"http://127.0.0.1:9/\"\n[state]\npath = \"{d}/s.db\"\n\
             [sink.out]\ntype = \"file\"\npath = \"{t}/{{feed}}.jsonl\"\n[sink.db]\ntype = \"sqlite\"\n\
             path = \"{t}/db/e.db\"\n[routing]\ndefault = [\"out\"]\n",
            d = d.display(),
            t = target.display()
        ),
    );
    let cfg = config.to_str().expect("path");
    let check = |source: &Path, words: &[&str]| {
        let src = source.to_str().expect("path");
        for to in [None, Some("out"), Some("db")] {
            let mut args = vec![src];
            if let Some(to) = to {
                args.extend(["-c", cfg, "--to", to]);
            }
            let out = replay(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
            assert!(err.contains(src), "names the file: {err}");
            for w in words {
                assert!(err.contains(w), "says {w:?}: {err}");
            }
            assert!(out.stdout.is_empty(), "nothing on stdout");
            assert!(!target.exists(), "nothing written to the target ({args:?})");
        }
    };

    // A JSON Lines file with a broken line in the middle.
    let original = std::fs::read_to_string(fx.jsonl()).expect("jsonl");
    let mut lines: Vec<&str> = original.lines().collect();
    lines[776] = "{\"feed\":\"wiki\",\"type\":";
    let broken = write_file(d, "broken.jsonl", &(lines.join("\n") + "\n"));
    check(&broken, &["line 777"]);
    // A torn last line.
    let torn = write_file(d, "torn.jsonl", &original[..original.len() - 10]);
    check(&torn, &["line 1500", "incomplete"]);

    // A corrupt database: a valid header, garbage after it.
    let mut bytes = std::fs::read(fx.db()).expect("db");
    for b in bytes.iter_mut().skip(100) {
        *b = 0x5a;
    }
    let corrupt = d.join("corrupt.db");
    std::fs::write(&corrupt, &bytes).expect("write");
    check(&corrupt, &["malformed"]);

    // A foreign database: no events table.
    let foreign = d.join("foreign.db");
    Connection::open(&foreign)
        .expect("open")
        .execute_batch("CREATE TABLE orders (id INTEGER); CREATE TABLE users (name TEXT);")
        .expect("create");
    check(&foreign, &["no `events` table", "orders, users"]);

    // An `events` table that is not the sink's.
    let other = d.join("other.db");
    Connection::open(&other)
        .expect("open")
        .execute_batch("CREATE TABLE events (pos INTEGER PRIMARY KEY, feed TEXT, body TEXT);")
        .expect("create");
    check(&other, &["no column `seq`"]);

    // A bad row in the sink's table, well after the first.
    let bad_row = d.join("bad-row.db");
    std::fs::copy(fx.db(), &bad_row).expect("copy");
    Connection::open(&bad_row)
        .expect("open")
        .execute(
            "UPDATE events SET received_at = 'yesterday' WHERE pos = 1200",
            [],
        )
        .expect("update");
    check(&bad_row, &["row pos=1200", "received_at", "yesterday"]);

    // A missing source.
    let out = replay(&[d.join("nope.db").to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.db"));
}

// ---------------------------------------------------------------------------------------------
// Batching: the runner waits up to batch_max_wait for more events, and never hands over more
// than batch_max_events at once.

struct Recorder {
    sizes: Arc<Mutex<Vec<usize>>>,
    options: sse_bridge::sink::WriteOptions,
}

impl Sink for Recorder {
    fn write(&mut self, events: &[Arc<Event>]) -> Result<(), sse_bridge::sink::SinkError> {
        self.sizes.lock().expect("lock").push(events.len());
        Ok(())
    }
    fn options(&self) -> sse_bridge::sink::WriteOptions {
        self.options
    }
    fn flush(&mut self) -> Result<(), sse_bridge::sink::SinkError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_batches_by_time_and_size() {
    use sse_bridge::checkpoint::{FeedTracker, Position};
    use sse_bridge::sink::runner;

    let sizes = Arc::new(Mutex::new(Vec::new()));
    let sink = Recorder {
        sizes: sizes.clone(),
        options: sse_bridge::sink::WriteOptions {
            max_batch_events: 25,
            max_batch_wait: Duration::from_millis(300),
            checkpoints: false,
        },
    };
    let tracker = Arc::new(FeedTracker::new(Position {
        seq: 0,
        last_event_id: Arc::from(""),
    }));
    let (handle, worker) = runner::spawn(
        "rec",
        Box::new(sink),
        &BufferConfig::default(),
        tokio_util::sync::CancellationToken::new(),
        None,
    )
    .expect("spawn");
    let event = |seq: u64| {
        Arc::new(Event {
            feed: Arc::from("f"),
            event_type: "t".into(),
            data: String::new(),
            id: seq.to_string().into(),
            received_at: Utc::now(),
            seq,
        })
    };
    // Three small sends 30 ms apart: one write of all of them (waited for), then the rest.
    let mut seq = 0;
    for _ in 0..3 {
        let batch: Vec<Arc<Event>> = (0..6)
            .map(|_| {
                seq += 1;
                event(seq)
            })
            .collect();
        tracker.register(batch.iter().map(|e| (e.seq, &e.id, 1)));
        let _ = handle.send(batch, &tracker).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(wait_for(Duration::from_secs(5), || tracker.acked().seq == 18).await);
    assert_eq!(
        *sizes.lock().expect("lock"),
        [18],
        "one transaction for the three sends"
    );
    // 60 events at once: at most 25 per write.
    let batch: Vec<Arc<Event>> = (19..=78).map(event).collect();
    tracker.register(batch.iter().map(|e| (e.seq, &e.id, 1)));
    let _ = handle.send(batch, &tracker).await;
    assert!(wait_for(Duration::from_secs(5), || tracker.acked().seq == 78).await);
    drop(handle);
    worker.finished().await;
    let sizes = sizes.lock().expect("lock").clone();
    assert!(sizes[1..].iter().all(|&n| n <= 25), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 78);
}

// ---------------------------------------------------------------------------------------------
// Benchmark: `cargo test --release --test sqlite -- --ignored --nocapture bench`

#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn bench_sqlite_sink_vs_raw_batched_insert() {
    use sse_bridge::checkpoint::{FeedTracker, Position};
    use sse_bridge::sink::runner;

    const N: u64 = 300_000;
    const FEED_BATCH: usize = 500;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let t0 = Utc::now();
    let events: Vec<Arc<Event>> = (1..=N)
        .map(|n| {
            Arc::new(Event {
                feed: Arc::from("wiki"),
                event_type: support::event_type(n).into(),
                data: format!(
                    "{{\"$schema\":\"/mediawiki/recentchange/1.0.0\",\"n\":{n},\"title\":\"Page {n}\",\"comment\":\"résumé ✓\"}}"
                ),
                id: format!("[{{\"topic\":\"eqiad.mediawiki.recentchange\",\"partition\":0,\"offset\":{}}}]", 5_371_062_829u64 + n).into(),
                received_at: t0 + chrono::Duration::microseconds(n as i64),
                seq: n,
            })
        })
        .collect();

    // 1. The sink, driven by its runner thread as a feed drives it, in the state database
    //    (events and checkpoints in one transaction).
    let state = dir.path().join("state.db");
    drop(sse_bridge::state::StateStore::open(&state).expect("state"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let sink_rate = runtime.block_on(async {
        let sink = SqliteSink::build("db", &sqlite_config(&state), Some(&state)).expect("sink");
        assert!(sink.is_co_located());
        let tracker = Arc::new(FeedTracker::for_feed(
            "wiki",
            "http://x/stream",
            Position {
                seq: 0,
                last_event_id: Arc::from(""),
            },
        ));
        let give_up = tokio_util::sync::CancellationToken::new();
        let (handle, worker) = runner::spawn(
            "db",
            Box::new(sink),
            &BufferConfig::default(),
            give_up,
            None,
        )
        .expect("spawn");
        let start = Instant::now();
        for chunk in events.chunks(FEED_BATCH) {
            tracker.register(chunk.iter().map(|e| (e.seq, &e.id, 1)));
            let _ = handle.send(chunk.to_vec(), &tracker).await;
        }
        while tracker.acked().seq < N {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let took = start.elapsed();
        drop(handle);
        worker.finished().await;
        N as f64 / took.as_secs_f64()
    });
    assert_eq!(count(&state), N);

    // 2. Raw rusqlite: the same rows, the same schema, pragmas and statement, prebuilt
    //    values, in transactions of the runner's largest batch.
    let raw = dir.path().join("raw.db");
    let mut conn = support::raw_events_db(&raw);
    let times: Vec<String> = events
        .iter()
        .map(|e| sse_bridge::sink::sqlite::format_time(e.received_at))
        .collect();
    let start = Instant::now();
    for (chunk, times) in events.chunks(8192).zip(times.chunks(8192)) {
        support::insert_events(
            &mut conn,
            chunk
                .iter()
                .map(|e| &**e)
                .zip(times.iter().map(String::as_str)),
        );
    }
    let raw_rate = N as f64 / start.elapsed().as_secs_f64();
    assert_eq!(count(&raw), N);
    println!(
        "sqlite sink (runner, co-located checkpoints): {sink_rate:.0} events/s\n\
         raw rusqlite batched insert (same rows):      {raw_rate:.0} events/s\n\
         ratio: {:.0} %",
        100.0 * sink_rate / raw_rate
    );
}
