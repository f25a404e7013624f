//! Local clients against `serve` and the admin endpoint: a flood of clients that never read
//! leaves `serve`'s memory bounded and a fresh client served at once; a flood of half-sent
//! requests to the admin endpoint never takes the descriptors a feed needs to reconnect.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::support::bridge::Bridge;
use crate::support::server::{Fault, Options, Server};
use crate::support::{archive_sink, bin, free_port, state_section, write_file};

/// Raises this test process's soft open-file limit to `want` (or the hard limit): the floods
/// below hold thousands of sockets.
fn raise_open_file_limit(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write only the struct they are given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < want {
            limit.rlim_cur = want.min(limit.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
    assert!(
        limit.rlim_cur >= want,
        "this test needs an open-file limit of {want} (the hard limit is {})",
        limit.rlim_max
    );
}

/// An SQLite sink database holding `n` events of feed `f`, each with `size` bytes of data.
fn write_event_db(path: &Path, n: u64, size: usize) {
    let mut conn = rusqlite::Connection::open(path).expect("open");
    conn.execute_batch("PRAGMA journal_mode = WAL;")
        .expect("wal");
    sse_bridge::state::migrate::migrate(&mut conn, "events.db").expect("schema");
    let tx = conn.transaction().expect("tx");
    {
        let mut stmt = tx
            .prepare(
                "INSERT INTO events (feed, seq, id, type, data, received_at) \
                 VALUES ('f', ?1, ?2, 'page', ?3, '2026-01-01T00:00:00.000000Z')",
            )
            .expect("prepare");
        let pad = "x".repeat(size);
        for seq in 1..=n {
            let data = format!("{seq} {pad}");
            stmt.execute((seq as i64, seq.to_string(), &data[..size]))
                .expect("insert");
        }
    }
    tx.commit().expect("commit");
}

const EVENTS_REQUEST: &[u8] =
    b"GET /feeds/f/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n";

#[test]
fn clients_that_never_read_leave_serve_bounded_and_a_fresh_client_served_at_once() {
    const CLIENTS: usize = 2000;
    raise_open_file_limit(CLIENTS as u64 + 1000);
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("events.db");
    // 20 000 events of 4 KiB: 80 MB that every client asks for from the start.
    write_event_db(&db, 20_000, 4096);
    let mut command = Command::new(bin());
    command
        .arg("serve")
        .arg(&db)
        .args(["--listen", "127.0.0.1:0", "--max-clients", "4096"])
        .env("RUST_LOG", "info");
    let serve = Bridge::spawn_command(command, &db);
    let line = serve
        .wait_log_blocking("serve listening", Duration::from_secs(30), |l| {
            l.message.contains("listening on http://")
        })
        .raw;
    let addr: SocketAddr = line
        .split("listening on http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));

    // Every client sends its request and never reads a byte.
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {i}: {e}"));
        s.write_all(EVENTS_REQUEST).expect("request");
        clients.push(s);
    }
    // The flood does its worst: memory must not climb past the bound meanwhile.
    let mut peak_rss = 0;
    let watch_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < watch_until {
        peak_rss = peak_rss.max(serve.rss().expect("VmRSS") / 1024);
        std::thread::sleep(Duration::from_millis(100));
    }

    // A fresh client gets its first event at once.
    let started = Instant::now();
    let mut fresh = TcpStream::connect(addr).expect("connect");
    fresh.write_all(EVENTS_REQUEST).expect("request");
    fresh
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let first_event = loop {
        let text = String::from_utf8_lossy(&got);
        if let Some(i) = text.find("\nid: 1\n") {
            if text[i..].contains("\n\n") {
                break Some(started.elapsed());
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            break None;
        }
        match fresh.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    };
    let hwm = serve.peak_rss().expect("VmHWM") / 1024;
    let fds = serve.fds();
    println!(
        "serve under {CLIENTS} clients that never read: peak VmRSS {} MiB, VmHWM {} MiB, {fds} \
         open descriptors; a fresh client's first event after {first_event:?}",
        peak_rss / 1024,
        hwm / 1024
    );
    let first_event = first_event.unwrap_or_else(|| {
        panic!(
            "the fresh client got no event; it got {:?}; the log:\n{}",
            String::from_utf8_lossy(&got[..got.len().min(400)]),
            serve.raw_log()
        )
    });
    assert!(
        first_event < Duration::from_secs(1),
        "the fresh client waited {first_event:?} for its first event"
    );
    assert!(
        hwm < 300 * 1024,
        "serve's memory grew to {} MiB under clients that never read",
        hwm / 1024
    );
    assert!(!serve.raw_log().contains("panicked"), "{}", serve.raw_log());
    drop(clients);
}

/// An SSE server whose streams the test closes at will ([`Server::close_all`]): each
/// connection gets `retry: 100` and an event every 20 ms (ids counting on from the request's
/// `Last-Event-ID`).
async fn closable_feed() -> Server {
    let options = Options {
        chunk: 1,
        pause: Duration::from_millis(20),
        preamble: "retry: 100\n\n",
        events: |n| format!("id: {n}\nevent: tick\ndata: {n}\n\n"),
        ..Options::log(u64::MAX - 1)
    };
    Server::start(options, |_| Fault::Normal).await
}

/// `GET /healthz` on a fresh connection: the status code, or `None` when there was no
/// answer within `within`.
fn healthz(addr: SocketAddr, within: Duration) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, within).ok()?;
    s.set_read_timeout(Some(within)).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(2).any(|w| w == b"\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got)
        .strip_prefix("HTTP/1.1 ")?
        .get(..3)?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_admin_requests_never_take_the_descriptors_a_feed_needs() {
    const STALLED: usize = 1100;
    const NOFILE: u64 = 512;
    raise_open_file_limit(STALLED as u64 + 1000);
    let feed = closable_feed().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let admin: SocketAddr = ([127, 0, 0, 1], port).into();
    let out = dir.path().join("events/ticks.jsonl");
    let text = format!(
        r#"
{state}

[[feed]]
name = "ticks"
url = "{url}"

{archive}

[routing]
default = ["archive"]

[admin]
listen = "127.0.0.1:{port}"
header_timeout = "2s"
"#,
        state = state_section(dir.path(), "100ms"),
        archive = archive_sink(dir.path()),
        url = feed.url(),
    );
    let config = write_file(dir.path(), "bridge.toml", &text);
    // A low open-file limit (soft and hard), so that the flood below would exhaust it.
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("ulimit -n {NOFILE} && exec \"$0\" \"$@\""))
        .arg(bin())
        .args(["run", "--log-format", "json", "-c"])
        .arg(&config)
        .env("RUST_LOG", "info");
    let bridge = Bridge::spawn_command(command, &config);
    let stored = |p: &Path| crate::support::bridge::line_count(p);
    let end = Instant::now() + Duration::from_secs(30);
    while stored(&out) < 10 {
        assert!(
            Instant::now() < end,
            "no events stored within 30 s; the log:\n{}",
            bridge.raw_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(healthz(admin, Duration::from_secs(2)), Some(200));
    let fds_before = bridge.fds();

    // 1 100 connections that send half a request and stall.
    let mut stalled = Vec::with_capacity(STALLED);
    for i in 0..STALLED {
        let mut s = tokio::net::TcpStream::connect(admin)
            .await
            .unwrap_or_else(|e| panic!("connect {i}: {e}"));
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
        stalled.push(s);
    }
    let mut peak_fds = bridge.fds();

    // Meanwhile the feed's stream ends: it must reconnect and go on.
    let requests = feed.requests().len();
    let before = stored(&out);
    feed.close_all();
    let end = Instant::now() + Duration::from_secs(10);
    while feed.requests().len() <= requests || stored(&out) < before + 50 {
        peak_fds = peak_fds.max(bridge.fds());
        assert!(
            Instant::now() < end,
            "the feed did not reconnect and go on ({} requests, {} events stored); the log:\n{}",
            feed.requests().len(),
            stored(&out),
            bridge.raw_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = feed.requests().last().and_then(|r| r.last_event_id.clone());
    assert!(
        resumed.is_some(),
        "the feed reconnected without Last-Event-ID"
    );

    // A fresh health probe is answered once the stalled requests time out (2 s).
    let flood_done = Instant::now();
    let answered = loop {
        peak_fds = peak_fds.max(bridge.fds());
        if healthz(admin, Duration::from_secs(1)) == Some(200) {
            break flood_done.elapsed();
        }
        assert!(
            flood_done.elapsed() < Duration::from_secs(6),
            "/healthz not answered 200 within 6 s of the flood; the log:\n{}",
            bridge.raw_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "admin flood of {STALLED} half-sent requests, open-file limit {NOFILE}: bridge \
         descriptors {fds_before} before, at most {peak_fds} during; the feed reconnected; \
         /healthz answered 200 after {answered:?}"
    );
    let log = bridge.raw_log();
    assert!(
        !log.contains("Too many open files") && !log.contains("os error 24"),
        "{log}"
    );
    assert!(
        peak_fds < NOFILE as usize / 2,
        "the bridge held {peak_fds} descriptors of {NOFILE}"
    );
    assert!(
        log.contains("refusing connections over the cap"),
        "the refusals were not logged:\n{log}"
    );
    drop(stalled);
}
