//! The postgres sink through the real binary and the machine's real PostgreSQL: a kill -9 loop
//! with the feed routed to a file and a PostgreSQL table at once (the file often ahead of the
//! table at a kill), and both end with every event exactly once, in seq order.

mod support;

#[path = "support/postgres.rs"]
mod postgres;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::Rng;
use support::bridge::{line_count, read_jsonl, write_file, Bridge};
use support::server::Server;

fn config(dir: &Path, url: &str, db_url: &str) -> PathBuf {
    let text = format!(
        r#"[state]
path = "{d}/state.db"
commit_interval = "200ms"

[shutdown]
timeout = "60s"

[[feed]]
name = "wiki"
url = "{url}"
default_retry = "100ms"

[sink.archive]
type = "file"
path = "{d}/out/{{feed}}.jsonl"

[sink.pg]
type = "postgres"
url = "{db_url}"
table = "events.sse"
data_json = true

[routing]
default = ["archive", "pg"]
"#,
        d = dir.display(),
    );
    write_file(dir, "bridge.toml", &text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_into_a_file_and_postgres_stores_every_event_once() {
    let Some(db) = postgres::TestDb::create("kill9") else {
        return;
    };
    const TOTAL: u64 = 100_000;
    // 500 events every 20 ms: about 4 s of stream when nobody waits.
    let server = Server::log(TOTAL, 500, Duration::from_millis(20)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), &server.url(), &db.url());
    let file = dir.path().join("out/wiki.jsonl");
    let rows = || db.count("events.sse");
    let mut rng = rand::thread_rng();
    let started = Instant::now();
    let mut kills = Vec::new();
    // Six kills at random points, each after at least 5 000 more events reached the file.
    for i in 0..6u64 {
        let target = 5_000 + i * 14_000 + rng.gen_range(0..9_000);
        let bridge = Bridge::spawn(&config);
        assert!(
            support::wait_for(Duration::from_secs(120), || line_count(&file) as u64
                >= target)
            .await,
            "kill {i}: the file did not reach {target}: {}",
            bridge.log_text()
        );
        let logs = bridge.kill9();
        assert!(
            !logs.iter().any(|l| l.message.contains("panicked")),
            "{logs:#?}"
        );
        kills.push((target, line_count(&file) as u64, rows()));
    }
    let bridge = Bridge::spawn(&config);
    assert!(
        support::wait_for(Duration::from_secs(180), || line_count(&file) as u64
            >= TOTAL
            && rows() >= TOTAL)
        .await,
        "file {} rows {}: {}",
        line_count(&file),
        rows(),
        bridge.log_text()
    );
    let (status, _) = bridge.terminate(Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}");

    let stored: Vec<u64> = read_jsonl(&file).iter().map(|e| e.seq).collect();
    assert_eq!(stored.len() as u64, TOTAL, "lines in the file");
    assert!(
        stored.iter().zip(1..).all(|(s, n)| *s == n),
        "the file in seq order, once each"
    );
    let summary = db.column(
        "SELECT count(*) || ' ' || count(DISTINCT seq) || ' ' || min(seq) || ' ' || max(seq) \
         FROM events.sse",
    );
    assert_eq!(summary, [format!("{TOTAL} {TOTAL} 1 {TOTAL}")]);
    // In insertion order the seqs only grow: every batch went in whole, in order.
    let out_of_order = db.column(
        "SELECT count(*) FROM (SELECT seq, lag(seq) OVER (ORDER BY pos) AS prev FROM events.sse) s \
         WHERE prev IS NOT NULL AND seq <= prev",
    );
    assert_eq!(out_of_order, ["0"]);
    assert_eq!(
        db.column("SELECT (data_json->>'n')::bigint FROM events.sse WHERE seq = 777"),
        ["777"]
    );
    let gaps = rusqlite::Connection::open(dir.path().join("state.db"))
        .expect("state")
        .query_row("SELECT COUNT(*) FROM gaps", [], |r| r.get::<_, i64>(0))
        .expect("gaps");
    assert_eq!(gaps, 0);
    eprintln!(
        "postgres kill -9 loop: {TOTAL} events, {} kills in {:.1?}; file {} lines, table {} rows, \
         0 duplicates in either; at each kill (target, file lines, table rows): {kills:?}",
        kills.len(),
        started.elapsed(),
        stored.len(),
        TOTAL
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reads_a_postgres_table_and_follows_its_commits() {
    use std::io::BufRead;
    let Some(db) = postgres::TestDb::create("replay") else {
        return;
    };
    const TOTAL: u64 = 3_000;
    // 100 events every 50 ms: the stream is still arriving while replay follows it.
    let server = Server::log(TOTAL, 100, Duration::from_millis(50)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), &server.url(), &db.url());
    let bridge = Bridge::spawn(&config);
    let rows = || db.count("events.sse");
    assert!(support::wait_for(Duration::from_secs(60), || rows() >= 300).await);

    // The history: what is stored when replay starts, in order.
    let url = db.url();
    let out = support::replay(&[&url, "--table", "events.sse", "--feed", "wiki"]);
    support::ok(&out);
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert!(lines.len() >= 300, "{} lines", lines.len());
    let seqs: Vec<u64> = lines
        .iter()
        .map(|l| support::bridge::parse_line(l, "replay").seq)
        .collect();
    assert!(
        seqs.iter().zip(1..).all(|(s, n)| *s == n),
        "in order from 1"
    );

    // --follow: the history, then each commit as the sink's NOTIFY wakes it.
    let mut child = support::command(["replay", url.as_str(), "--table", "events.sse", "--follow"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("replay --follow");
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut seqs = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            seqs.push(support::bridge::parse_line(&line, "follow").seq);
            if seqs.len() as u64 == TOTAL {
                break;
            }
        }
        seqs
    });
    let end = Instant::now() + Duration::from_secs(90);
    while !reader.is_finished() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let followed = reader.join().expect("reader");
    let _ = child.wait();
    assert_eq!(
        followed,
        (1..=TOTAL).collect::<Vec<_>>(),
        "every event once, in order"
    );
    let (status, _) = bridge.terminate(Duration::from_secs(30)).await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_streams_a_postgres_table_with_resume_and_a_live_tail() {
    use sse_bridge::sse::parser::{Item, Limits, Parser};
    let Some(db) = postgres::TestDb::create("serve") else {
        return;
    };
    const TOTAL: u64 = 2_000;
    // 100 events every 50 ms: a live tail of about a second after the client connects.
    let server = Server::log(TOTAL, 100, Duration::from_millis(50)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = support::free_port();
    let mut text =
        std::fs::read_to_string(config(dir.path(), &server.url(), &db.url())).expect("config");
    text.push_str(&format!(
        "\n[serve]\nlisten = \"127.0.0.1:{port}\"\nsink = \"pg\"\nretry = \"200ms\"\n"
    ));
    let config = write_file(dir.path(), "serve.toml", &text);
    let bridge = Bridge::spawn(&config);
    bridge
        .wait_log("serve listening", Duration::from_secs(30), |l| {
            l.message.contains("serve: listening on http://")
        })
        .await;
    assert!(support::wait_for(Duration::from_secs(60), || db.count("events.sse") >= 200).await);

    // From the start, resuming after an id, and every event up to the last: stored ones
    // first, then the ones committed while the client listens (woken by NOTIFY).
    let url = format!("http://127.0.0.1:{port}/feeds/wiki/events");
    let read = |response: reqwest::Response, n: usize| async move {
        let mut parser = Parser::new(Limits::default());
        let mut ids = Vec::new();
        let mut items = Vec::new();
        let mut response = response;
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        while ids.len() < n {
            let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(end, response.chunk()).await else {
                break;
            };
            items.clear();
            parser.push(&chunk, &mut items).expect("parse");
            for item in items.drain(..) {
                if let Item::Event(e) = item {
                    ids.push(e.id.to_string());
                }
            }
        }
        ids
    };
    let client = reqwest::Client::new();
    let all = read(client.get(&url).send().await.expect("GET"), TOTAL as usize).await;
    assert_eq!(
        all,
        (1..=TOTAL).map(|n| n.to_string()).collect::<Vec<_>>(),
        "every event once, in order, stored and live"
    );
    let resumed = client
        .get(&url)
        .header("Last-Event-ID", "1500")
        .send()
        .await
        .expect("GET");
    let rest = read(resumed, 500).await;
    assert_eq!(
        rest,
        (1501..=TOTAL).map(|n| n.to_string()).collect::<Vec<_>>()
    );
    let unknown = client
        .get(format!("http://127.0.0.1:{port}/feeds/nope/events"))
        .send()
        .await
        .expect("GET");
    assert_eq!(unknown.status().as_u16(), 404);
    let (status, _) = bridge.terminate(Duration::from_secs(30)).await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_connection_mid_stream_loses_nothing_and_stores_nothing_twice() {
    let Some(db) = postgres::TestDb::create("terminate") else {
        return;
    };
    const TOTAL: u64 = 30_000;
    // 300 events every 20 ms: about 2 s of stream, during which the sink's backend is
    // terminated three times.
    let server = Server::log(TOTAL, 300, Duration::from_millis(20)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), &server.url(), &db.url());
    let bridge = Bridge::spawn(&config);
    let mut terminated = 0;
    for at in [3_000u64, 10_000, 18_000] {
        assert!(
            support::wait_for(Duration::from_secs(60), || db.count("events.sse") >= at).await,
            "{}",
            bridge.log_text()
        );
        let killed = postgres::query(
            "postgres",
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = '{}' AND application_name = 'sse-bridge'",
                db.name
            ),
        );
        terminated += killed[0][0]
            .as_deref()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    assert!(
        terminated >= 3,
        "the sink's connection was terminated {terminated} times"
    );
    assert!(
        support::wait_for(Duration::from_secs(120), || db.count("events.sse") >= TOTAL).await,
        "{}",
        bridge.log_text()
    );
    let (status, logs) = bridge.terminate(Duration::from_secs(60)).await;
    assert!(status.success());
    assert_eq!(
        db.column(
            "SELECT count(*) || ' ' || count(DISTINCT seq) || ' ' || max(seq) FROM events.sse"
        ),
        [format!("{TOTAL} {TOTAL} {TOTAL}")]
    );
    // The feed went on: the failures were the sink's, retried on a new connection.
    assert!(
        logs.iter().any(|l| l.message.contains("sink recovered")),
        "{}",
        logs.iter().map(|l| l.show()).collect::<Vec<_>>().join("\n")
    );
}
