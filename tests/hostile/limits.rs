//! Bounded resources against the real binary: memory in bytes under a stalled sink, the
//! reconnection floor, the id length limit, and one bridge per state database.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::bridge::{bin, checkpoint, line_count, rss, Bridge, LogLine};
use crate::support::server::{Reply, Server};
use crate::support::{run_ok, state_section, wait_for, write_file};

/// The heartbeat of a stream that stays open.
const HOLD: Duration = Duration::from_millis(500);

/// A config with feed `f` from `feed_url` (plus `feed_extra` keys) into the file sink `out`
/// writing `DIR/out/f.jsonl` (plus `sink_extra` keys).
fn config(dir: &Path, feed_url: &str, feed_extra: &str, sink_extra: &str) -> PathBuf {
    let text = format!(
        r#"
{state}

[[feed]]
name = "f"
url = "{feed_url}"
default_retry = "100ms"
{feed_extra}

[sink.out]
type = "file"
path = "{dir}/out/f.jsonl"
{sink_extra}

[routing]
default = ["out"]
"#,
        state = state_section(dir, "100ms"),
        dir = dir.display(),
    );
    write_file(dir, "bridge.toml", &text)
}

const MIB: u64 = 1024 * 1024;

/// A file sink that cannot write (its directory is a regular file: a full or broken disk, as
/// far as the bridge can tell) under a feed of 1000 KiB events: the sink's buffer holds at
/// most `buffer.max_bytes`, the feed stops reading, RSS stays bounded, the checkpoint does not
/// move; once the disk is back every event is stored, and the memory of the large events is
/// given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sink_holds_large_events_within_its_byte_bound() {
    const EVENTS: usize = 150;
    const SIZE: usize = 1000 * 1024;
    let server = Server::answer(|r| {
        // One pass of the log; a reconnection (not expected) would resume nowhere.
        let reply = Reply::sse().heartbeat(HOLD);
        if r.index > 0 {
            return reply;
        }
        reply.pieces(|| {
            (1..=EVENTS).map(|n| {
                let mut e = format!("id: {n}\ndata: ").into_bytes();
                e.resize(e.len() + SIZE, b'a' + (n % 26) as u8);
                e.extend_from_slice(b"\n\n");
                e
            })
        })
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let blocked = dir.path().join("out");
    std::fs::write(&blocked, "not a directory").expect("block");
    let cfg = config(
        dir.path(),
        &server.url(),
        r#"max_event_size = "2 MiB"
idle_timeout = "0s""#,
        "fsync = \"never\"\nbuffer.max_bytes = \"16 MiB\"",
    );
    let bridge = Bridge::spawn(&cfg);
    bridge
        .wait_message(Duration::from_secs(30), "write failed")
        .await;
    // Let the feed run into the bound: it reads until the buffer is full, then stops.
    let mut last = 0;
    let mut stable = 0;
    while stable < 10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = bridge.peak_rss().expect("VmHWM");
        if now == last {
            stable += 1;
        } else {
            stable = 0;
            last = now;
        }
    }
    let peak = bridge.peak_rss().expect("VmHWM");
    eprintln!(
        "stalled sink, {EVENTS} events of {} KiB, buffer.max_bytes 16 MiB: peak RSS {} MiB",
        SIZE / 1024,
        peak / MIB
    );
    // 16 MiB of buffer, a 2 MiB event being parsed, the kernel's socket buffers are not ours;
    // the process itself is about 20 MiB. Without the byte bound the 10 000-event buffer took
    // all 150 MiB.
    assert!(peak < 96 * MIB, "peak RSS {} MiB", peak / MIB);
    assert_eq!(checkpoint(&dir.path().join("state.db"), "f"), None);

    // The disk comes back: everything held back is stored, nothing was dropped.
    std::fs::remove_file(&blocked).expect("unblock");
    std::fs::create_dir(&blocked).expect("mkdir");
    let file = blocked.join("f.jsonl");
    // Sizes first: counting lines of 150 MiB at every poll would be the slow part.
    let full = (EVENTS * SIZE) as u64;
    assert!(
        wait_for(Duration::from_secs(120), || std::fs::metadata(&file)
            .is_ok_and(|m| m.len() >= full))
        .await,
        "stored {} of {EVENTS}",
        line_count(&file)
    );
    assert!(
        wait_for(Duration::from_secs(10), || checkpoint(
            &dir.path().join("state.db"),
            "f"
        )
        .is_some_and(|(id, _)| id == EVENTS.to_string()))
        .await
    );
    eprintln!(
        "after storing them: RSS {} MiB, peak {} MiB",
        rss(bridge.pid()).unwrap_or(0) / MIB,
        bridge.peak_rss().unwrap_or(0) / MIB
    );
    let (status, _) = bridge.terminate(Duration::from_secs(20)).await;
    assert!(status.success());
    assert_eq!(line_count(&file), EVENTS, "each event once");
    assert_eq!(server.count(), 1);
}

/// One 200 MiB event (under a `max_event_size` that allows it), then small ones: once it is
/// stored, the parser's and the sink's buffers give its memory back instead of keeping it for
/// the feed's lifetime (it was 469 MB of RSS after the event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_of_a_huge_event_is_given_back_once_it_is_stored() {
    const SIZE: usize = 200 * 1024 * 1024;
    let server = Server::answer(|r| {
        let reply = Reply::sse().heartbeat(HOLD);
        if r.index > 0 {
            return reply;
        }
        reply.pieces(|| {
            let mut big = b"id: big\ndata: ".to_vec();
            big.resize(big.len() + SIZE, b'z');
            big.extend_from_slice(b"\n\n");
            let small = (1..=100).map(|n| format!("id: {n}\ndata: small {n}\n\n").into_bytes());
            std::iter::once(big).chain(small)
        })
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        dir.path(),
        &server.url(),
        r#"max_event_size = "256 MiB""#,
        "fsync = \"never\"",
    );
    let bridge = Bridge::spawn(&cfg);
    let state = dir.path().join("state.db");
    assert!(
        wait_for(Duration::from_secs(120), || checkpoint(&state, "f")
            .is_some_and(|(id, _)| id == "100"))
        .await,
        "{}",
        bridge.log_text()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak = bridge.peak_rss().expect("VmHWM");
    let after = rss(bridge.pid()).expect("VmRSS");
    eprintln!(
        "one {} MiB event: peak RSS {} MiB, RSS once stored {} MiB",
        SIZE as u64 / MIB,
        peak / MIB,
        after / MIB
    );
    assert!(after < 96 * MIB, "RSS once stored {} MiB", after / MIB);
    let (status, _) = bridge.terminate(Duration::from_secs(20)).await;
    assert!(status.success());
    assert_eq!(line_count(&dir.path().join("out/f.jsonl")), 101);
}

/// `policy = "browser"` against a server that sends `retry: 0` and an event without an id and
/// closes at once: the reconnection floor (100 ms) keeps the feed under ten requests a second,
/// the gaps fold into one row with a count, and the log stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_zero_and_an_immediate_close_stay_under_the_floor() {
    let server = Server::answer(|_| Reply::sse().send("retry: 0\ndata: x\n\n")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        dir.path(),
        &server.url(),
        r#"policy = "browser""#,
        "fsync = \"never\"",
    );
    let bridge = Bridge::spawn(&cfg);
    assert!(wait_for(Duration::from_secs(20), || server.count() >= 2).await);
    let start = Instant::now();
    let first = server.count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let made = server.count() - first;
    let per_second = made as f64 / start.elapsed().as_secs_f64();
    let (status, logs) = bridge.terminate(Duration::from_secs(20)).await;
    assert!(status.success());
    let log_bytes: usize = logs.iter().map(|l| l.fields.to_string().len() + 1).sum();
    eprintln!("retry: 0 + close: {per_second:.1} requests/s, {log_bytes} bytes of log");
    // 100 ms floor: at most 10 a second (each attempt also takes a moment).
    assert!(per_second <= 10.5, "{per_second:.1} requests/s");
    assert!(
        per_second >= 3.0,
        "the feed should keep reconnecting: {per_second:.1}/s"
    );

    let rows: Vec<serde_json::Value> = run_ok([
        OsStr::new("gaps"),
        "--json".as_ref(),
        "-c".as_ref(),
        cfg.as_os_str(),
    ])
    .lines()
    .map(|l| serde_json::from_str(l).expect("json"))
    .collect();
    assert_eq!(rows.len(), 1, "one folded gap row: {rows:?}");
    assert_eq!(rows[0]["reason"], "reconnect-without-id");
    let repeats = rows[0]["repeats"].as_u64().expect("repeats");
    assert!(
        repeats as usize + 5 >= made,
        "{repeats} repeats for {made} requests"
    );
    // Each reconnection logs a line or two at INFO; no per-gap WARN flood.
    let gap_lines = logs.iter().filter(|l| l.message.contains("gap")).count();
    assert!(
        gap_lines <= 8,
        "{gap_lines} gap log lines for {repeats} gaps"
    );
}

/// One 900 KiB `id:` followed by tiny events: refused as an error on that event (the id would
/// be stored with every later event), the feed reconnects, and what is stored stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_id_is_refused_not_repeated_on_every_event() {
    let server = Server::answer(|r| {
        let mut body = Vec::new();
        if r.index == 0 {
            body.extend_from_slice(b"id: ");
            body.resize(body.len() + 900 * 1024, b'i');
            body.extend_from_slice(b"\ndata: big-id\n\n");
        }
        for n in 1..=300 {
            body.extend_from_slice(format!("id: {n}\ndata: {n}\n\n").as_bytes());
        }
        Reply::sse().send(body).heartbeat(HOLD)
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), &server.url(), "", "fsync = \"never\"");
    let bridge = Bridge::spawn(&cfg);
    let file = dir.path().join("out/f.jsonl");
    assert!(
        wait_for(Duration::from_secs(30), || line_count(&file) >= 300).await,
        "stored {}\n{}",
        line_count(&file),
        bridge.log_text()
    );
    let refused: Vec<LogLine> = bridge
        .logs()
        .into_iter()
        .filter(|l| l.message.contains("max_id_size"))
        .collect();
    let (status, _) = bridge.terminate(Duration::from_secs(20)).await;
    assert!(status.success());
    assert!(!refused.is_empty(), "the refusal names max_id_size");
    assert!(
        refused[0].message.contains("feed `f`"),
        "{}",
        refused[0].message
    );
    let bytes = std::fs::metadata(&file).expect("file").len();
    eprintln!("huge id + 300 events: {bytes} bytes stored");
    // 300 small lines; with the id repeated on each it was 277 MB.
    assert!(bytes < 200 * 1024, "{bytes} bytes stored");
    assert_eq!(line_count(&file), 300);
    assert_eq!(server.count(), 2);
}

/// A second `run` on the same state database exits 1 naming the first one's PID, and
/// `checkpoints set|reset` refuse while the bridge runs; `checkpoints list` still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bridge_per_state_database() {
    let server = Server::answer(|_| Reply::sse().send("id: 1\ndata: x\n\n").heartbeat(HOLD)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), &server.url(), "", "");
    let first = Bridge::spawn(&cfg);
    first
        .wait_message(Duration::from_secs(20), "connected to")
        .await;
    let second = Command::new(bin())
        .args(["run", "-c"])
        .arg(&cfg)
        .output()
        .expect("second run");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("PID {}", first.pid())),
        "names the holder: {stderr}"
    );
    assert!(stderr.contains("state.db"), "{stderr}");
    for args in [
        &["checkpoints", "set", "f", "7"][..],
        &["checkpoints", "reset", "f"],
    ] {
        let out = Command::new(bin())
            .args(args)
            .arg("-c")
            .arg(&cfg)
            .output()
            .expect("checkpoints");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("already using"), "{stderr}");
    }
    run_ok([
        OsStr::new("checkpoints"),
        "list".as_ref(),
        "-c".as_ref(),
        cfg.as_os_str(),
    ]);
    assert_eq!(server.count(), 1, "the second bridge never connected");
    let (status, _) = first.terminate(Duration::from_secs(20)).await;
    assert!(status.success());
    // Free again once the first is gone (kill -9 frees it too: the kernel drops the lock).
    run_ok([
        OsStr::new("checkpoints"),
        "set".as_ref(),
        "f".as_ref(),
        "7".as_ref(),
        "-c".as_ref(),
        cfg.as_os_str(),
    ]);
    let again = Bridge::spawn(&cfg);
    again
        .wait_message(Duration::from_secs(20), "connected to")
        .await;
    let logs = again.kill9();
    assert!(!logs.is_empty());
    let after_kill = Bridge::spawn(&cfg);
    after_kill
        .wait_message(Duration::from_secs(20), "connected to")
        .await;
    let (status, _) = after_kill.terminate(Duration::from_secs(20)).await;
    assert!(status.success());
}
