//! Secrets and terminals; what the bridge cannot read. A server that echoes the feed's
//! credentials back (in its Content-Type, a 4xx status line and body) must not get them into
//! anything the bridge prints; a cross-origin redirect does not receive the feed's headers; ids
//! carrying terminal escape sequences are printed escaped; an unrequested content or transfer
//! coding fails the response naming the coding; a failed redirect names its target.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::support::bridge::{bin, checkpoint, write_file, Bridge};
use crate::support::server::{Fault, Options, Record, Server};
use crate::support::{archive_sink, free_port, state_section};

const PASSWORD: &str = "s3cretpw";
const TOKEN: &str = "tok-abcdef-987654";
const API_KEY: &str = "key-123456";

fn basic() -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("user:{PASSWORD}"))
}

/// A server that records every request and writes what `answer` returns for it (the whole
/// response), then closes the connection.
async fn scripted(answer: impl Fn(usize, &Record) -> Vec<u8> + Send + Sync + 'static) -> Server {
    Server::start(Options::log(0), move |r| Fault::Raw(answer(r.index, r))).await
}

/// Feed keys that make failures retry fast.
const FAST: &str = r#"default_retry = "100ms"
client_error_delay = "200ms"
connect_timeout = "500ms"
response_timeout = "1s"
backoff = { initial = "100ms", max = "300ms", multiplier = 2.0, jitter = 0.1, reset_after = "60s" }
"#;

/// A config with `[admin]` on `port`, a file sink for every event, and `feeds` (TOML of
/// `[[feed]]` tables).
fn config(dir: &Path, port: u16, feeds: &str) -> PathBuf {
    let archive = archive_sink(dir);
    let state = state_section(dir, "100ms");
    write_file(
        dir,
        "bridge.toml",
        &format!(
            r#"
{state}

[shutdown]
timeout = "10s"

[admin]
listen = "127.0.0.1:{port}"

{feeds}

{archive}

[[route]]
event = "*"
sinks = ["archive"]
"#
        ),
    )
}

async fn get(url: &str) -> Option<String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    client.get(url).send().await.ok()?.text().await.ok()
}

/// Polls `/feeds` until `pred` holds for it (at most `within`); returns the body.
async fn wait_feeds(
    port: u16,
    within: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> String {
    let end = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < end {
        if let Some(body) = get(&format!("http://127.0.0.1:{port}/feeds")).await {
            if serde_json::from_str(&body).is_ok_and(|v| pred(&v)) {
                return body;
            }
            last = body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("waited {within:?} on /feeds; the last answer: {last}");
}

fn feed<'a>(feeds: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    feeds
        .as_array()
        .and_then(|a| a.iter().find(|f| f["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

/// `sse-bridge ARGS`, its standard output (it must succeed).
fn run_cli(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().expect("run cli");
    assert!(
        out.status.success(),
        "sse-bridge {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[tokio::test]
async fn echoed_credentials_never_reach_logs_feeds_metrics_or_status() {
    let echoed_basic = basic();
    // Even requests: 200 with the credentials echoed into a wrong Content-Type; odd ones: 401
    // with them in the reason phrase, the Content-Type and the body.
    let server = scripted(move |i, req| {
        let auth = req
            .head()
            .lines()
            .find_map(|l| l.strip_prefix("authorization: "))
            .unwrap_or_default()
            .trim()
            .to_string();
        let echo = format!("Basic {echoed_basic}; auth={auth}; key={API_KEY}; pw={PASSWORD}; tok={TOKEN}");
        if i % 2 == 0 {
            format!("HTTP/1.1 200 OK\r\nContent-Type: text/html; {echo}\r\nConnection: close\r\n\r\n<html>{echo}</html>")
        } else {
            format!("HTTP/1.1 401 {echo}\r\nContent-Type: text/plain; {echo}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{echo}", echo.len())
        }
        .into_bytes()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token = write_file(dir.path(), "token", &format!("{TOKEN}\n"));
    let port = free_port();
    let cfg = config(
        dir.path(),
        port,
        &format!(
            "[[feed]]\nname = \"sec\"\nurl = \"http://user:{PASSWORD}@{}/stream?apikey={API_KEY}\"\nbearer_token_file = \"{}\"\nheaders = {{ \"X-Api-Key\" = \"{API_KEY}\" }}\n{FAST}",
            server.addr,
            token.display()
        ),
    );
    let bridge = Bridge::spawn_with_log_level(&cfg, "debug");
    let seen = server.wait_for_requests(4, Duration::from_secs(20)).await;
    // The credentials were sent (so the echo holds them), the token replacing the Basic form.
    assert!(
        seen[0]
            .head()
            .contains(&format!("authorization: bearer {TOKEN}")),
        "{:?}",
        seen[0]
    );
    assert!(
        seen[0].head().contains(&format!("x-api-key: {API_KEY}")),
        "{:?}",
        seen[0]
    );
    // The failure of a request after those four (the fifth, a 200 with the echo in its
    // Content-Type), so that the status below is taken in the backoff before the next one.
    let feeds = wait_feeds(port, Duration::from_secs(20), |v| {
        let f = feed(v, "sec");
        f["errors"]["client"].as_u64() >= Some(5)
            && f["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("Content-Type"))
    })
    .await;
    let metrics = get(&format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("metrics");
    let admin = format!("http://127.0.0.1:{port}");
    let status_json = run_cli(&["status", "--admin", &admin, "--json"]);
    let status_text = run_cli(&["status", "--admin", &admin]);
    let (_, logs) = bridge.terminate(Duration::from_secs(15)).await;
    let log_text: String = logs
        .iter()
        .map(|l| format!("{} {}\n", l.message, l.fields))
        .collect();

    let secrets = [PASSWORD, basic().as_str(), TOKEN, API_KEY].map(str::to_string);
    for (what, text) in [
        ("logs", &log_text),
        ("/feeds", &feeds),
        ("/metrics", &metrics),
        ("status --json", &status_json),
        ("status", &status_text),
    ] {
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{secret} in {what}:\n{text}"
            );
        }
    }
    // Not vacuous: the echoed text is there, scrubbed.
    for (what, text) in [
        ("logs", &log_text),
        ("/feeds", &feeds),
        ("status --json", &status_json),
    ] {
        assert!(
            text.contains("[redacted]"),
            "no redaction marker in {what}:\n{text}"
        );
    }
    assert!(log_text.contains("Content-Type"), "{log_text}");
}

#[tokio::test]
async fn a_cross_origin_redirect_gets_the_feeds_headers_only_when_allowed() {
    let b = scripted(|_, _| {
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\nid: 1\ndata: x\n\n".to_vec()
    })
    .await;
    let b_addr = b.addr;
    let a = scripted(move |_, req| {
        format!(
            "HTTP/1.1 302 Found\r\nLocation: http://{b_addr}{}\r\nContent-Length: 0\r\n\r\n",
            req.path
        )
        .into_bytes()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token = write_file(dir.path(), "token", TOKEN);
    let feed = |name: &str, forward: bool| {
        format!(
            "[[feed]]\nname = \"{name}\"\nurl = \"http://{}/{name}\"\nbearer_token_file = \"{}\"\nheaders = {{ \"X-Api-Key\" = \"{API_KEY}\", \"X-Trace\" = \"t-1\" }}\nforward_headers_on_redirect = {forward}\n{FAST}",
            a.addr,
            token.display()
        )
    };
    let cfg = config(
        dir.path(),
        free_port(),
        &format!("{}\n{}", feed("dropped", false), feed("forwarded", true)),
    );
    let bridge = Bridge::spawn(&cfg);
    let end = Instant::now() + Duration::from_secs(20);
    let (dropped, forwarded) = loop {
        let seen = b.requests();
        let on = |p: &str| seen.iter().find(|s| s.path == p).cloned();
        if let (Some(d), Some(f)) = (on("/dropped"), on("/forwarded")) {
            break (d, f);
        }
        assert!(
            Instant::now() < end,
            "B saw {seen:?}; log:\n{}",
            bridge.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A saw the credentials; B, another origin, sees none of the configured headers.
    assert!(a
        .requests()
        .iter()
        .all(|s| s.head().contains(&format!("x-api-key: {API_KEY}"))));
    for header in ["x-api-key", "authorization", "x-trace"] {
        assert!(
            !dropped.head().contains(header),
            "{header} reached B: {}",
            dropped.head()
        );
    }
    assert!(
        forwarded.head().contains(&format!("x-api-key: {API_KEY}")),
        "{}",
        forwarded.head()
    );
    assert!(
        forwarded
            .head()
            .contains(&format!("authorization: bearer {TOKEN}")),
        "{}",
        forwarded.head()
    );
    assert!(
        forwarded.head().contains("x-trace: t-1"),
        "{}",
        forwarded.head()
    );
    bridge.terminate(Duration::from_secs(15)).await;
}

#[tokio::test]
async fn escape_sequences_in_ids_are_escaped_in_logs_and_checkpoints_list() {
    let id = "evil\x1b[31mred\x07end";
    let server = scripted(move |_, _| {
        format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\nid: {id}\nevent: t\x1b[2J\ndata: hello\n\n").into_bytes()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        dir.path(),
        free_port(),
        &format!(
            "[[feed]]\nname = \"esc\"\nurl = \"http://{}/stream\"\n{FAST}",
            server.addr
        ),
    );
    // Human logs to a file (not a terminal: no colours, so any ESC would come from the stream).
    let log_path = dir.path().join("bridge.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(bin())
        .args(["run", "--log-format", "human", "-c"])
        .arg(&cfg)
        .env("RUST_LOG", "debug")
        .env_remove("SSE_BRIDGE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let state = dir.path().join("state.db");
    let end = Instant::now() + Duration::from_secs(20);
    while checkpoint(&state, "esc").is_none_or(|(got, _)| got != id) {
        if Instant::now() > end {
            let _ = child.kill();
            panic!(
                "no checkpoint; log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SAFETY: kill(2) with the pid of our own child, which has not been reaped yet.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let end = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < end, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logged = std::fs::read(&log_path).expect("log");
    let text = String::from_utf8_lossy(&logged);
    assert!(
        !logged.iter().any(|&b| b == 0x1b || b == 0x07),
        "raw control bytes in the log:\n{text}"
    );
    let escaped = "evil\\x1b[31mred\\x07end";
    let closed = text
        .lines()
        .find(|l| l.contains("feed closed"))
        .unwrap_or_else(|| panic!("no `feed closed` line:\n{text}"));
    assert!(closed.contains(escaped), "{closed}");

    let listed = run_cli(&["checkpoints", "list", "-c", cfg.to_str().expect("path")]);
    assert!(
        !listed.bytes().any(|b| b == 0x1b || b == 0x07),
        "{listed:?}"
    );
    assert!(listed.contains(escaped), "{listed}");
    // JSON output keeps the id exact (serde_json escapes it).
    let json = run_cli(&[
        "checkpoints",
        "list",
        "--json",
        "-c",
        cfg.to_str().expect("path"),
    ]);
    let row: serde_json::Value = serde_json::from_str(json.trim()).expect("json");
    assert_eq!(row["last_event_id"], id);
}

#[tokio::test]
async fn unrequested_codings_fail_naming_them_and_store_nothing() {
    let gzip = scripted(|_, _| {
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n\r\nid: 1\ndata: garbage\n\n".to_vec()
    })
    .await;
    let te = scripted(|_, _| {
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: gzip, chunked\r\n\r\n15\r\nid: 1\ndata: garbage\n\n\r\n0\r\n\r\n".to_vec()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cfg = config(
        dir.path(),
        port,
        &format!(
            "[[feed]]\nname = \"ce\"\nurl = \"http://{}/s\"\n{FAST}\n[[feed]]\nname = \"te\"\nurl = \"http://{}/s\"\n{FAST}",
            gzip.addr, te.addr
        ),
    );
    let bridge = Bridge::spawn(&cfg);
    gzip.wait_for_requests(3, Duration::from_secs(20)).await;
    te.wait_for_requests(3, Duration::from_secs(20)).await;
    let body = wait_feeds(port, Duration::from_secs(10), |v| {
        ["ce", "te"].iter().all(|f| {
            feed(v, f)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("gzip"))
        })
    })
    .await;
    let feeds: serde_json::Value = serde_json::from_str(&body).expect("json");
    for (name, coding) in [
        ("ce", "Content-Encoding `gzip`"),
        ("te", "Transfer-Encoding `gzip`"),
    ] {
        let f = feed(&feeds, name);
        assert_ne!(f["state"], "open", "{f}");
        assert!(
            f["last_error"].as_str().is_some_and(|e| e.contains(coding)),
            "{f}"
        );
        assert!(
            bridge
                .logs()
                .iter()
                .any(|l| l.feed.as_deref() == Some(name) && l.message.contains(coding)),
            "no log line for {name}:\n{}",
            bridge.log_text()
        );
    }
    let ready = get(&format!("http://127.0.0.1:{port}/readyz"))
        .await
        .expect("readyz");
    assert!(ready.contains("\"ready\":false"), "{ready}");
    let (_, logs) = bridge.terminate(Duration::from_secs(15)).await;
    assert!(
        !logs.iter().any(|l| l.message.contains("connected to")),
        "a feed was opened"
    );
    for name in ["ce", "te"] {
        let out = dir.path().join(format!("events/{name}.jsonl"));
        let stored = std::fs::read_to_string(&out).unwrap_or_default();
        assert!(stored.is_empty(), "{name} stored {stored}");
    }
}

#[tokio::test]
async fn a_redirect_to_a_dead_port_names_the_target() {
    let dead = free_port();
    let a = scripted(move |_, _| {
        format!("HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{dead}/moved\r\nContent-Length: 0\r\n\r\n").into_bytes()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cfg = config(
        dir.path(),
        port,
        &format!(
            "[[feed]]\nname = \"r\"\nurl = \"http://{}/s\"\n{FAST}",
            a.addr
        ),
    );
    let bridge = Bridge::spawn(&cfg);
    let target = format!("http://127.0.0.1:{dead}/moved");
    let t = target.clone();
    wait_feeds(port, Duration::from_secs(20), move |v| {
        feed(v, "r")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("redirected to {t}: connection failed")))
    })
    .await;
    let t = target.clone();
    bridge
        .wait_log(
            "the failure names the target",
            Duration::from_secs(5),
            move |l| l.message.contains(&t),
        )
        .await;
    bridge.terminate(Duration::from_secs(15)).await;
}
