//! A real browser on another origin reads a stream from `run`'s `[serve]`: Debian's headless
//! Chromium, driven through playwright-core (`driver.mjs` beside this file), opens a page on an
//! origin of its own and runs `new EventSource(url + "?access_token=…")`, as a dashboard would.
//! It must receive every event once, in order, named types included, across a restart of the
//! bridge; without a token, and from an origin the bridge does not list, its EventSource must
//! be refused (readyState CLOSED).
//!
//! Needs `node`, Debian's `chromium` and `npm ci` in this folder (`.ci/run` does all three).
//! Without them the test says so loudly and passes, unless a browser is required (`CI` or
//! `SSE_BRIDGE_REQUIRE_BROWSER=1`): then it fails.

#[path = "../support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::bridge::{write_file, Bridge};
use support::server::{event_type, Server};

const TOKEN: &str = "browser-token-0123456789abcdef0123";
const TOTAL: u64 = 3_000;

fn required() -> bool {
    let set = |v: &str| {
        std::env::var(v)
            .is_ok_and(|s| !s.is_empty() && s != "0" && !s.eq_ignore_ascii_case("false"))
    };
    set("CI") || set("SSE_BRIDGE_REQUIRE_BROWSER")
}

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// `driver.mjs` running, one JSON line per command and per answer.
struct Driver {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Driver {
    /// Starts the driver, or says why it cannot (and fails when a browser is required).
    fn start() -> Option<(Driver, Value)> {
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let missing = if !Path::new(&chromium).exists() {
            Some(format!("{chromium} (apt-get install chromium)"))
        } else if !here().join("node_modules/playwright-core").exists() {
            Some("playwright-core (npm ci --prefix tests/browser)".to_string())
        } else if Command::new("node").arg("--version").output().is_err() {
            Some("node".to_string())
        } else {
            None
        };
        if let Some(missing) = missing {
            assert!(
                !required(),
                "a browser is required (CI or SSE_BRIDGE_REQUIRE_BROWSER) but {missing} is missing"
            );
            eprintln!("\n*** SKIPPED the browser test: {missing} is missing ***\n");
            return None;
        }
        let mut child = Command::new("node")
            .arg(here().join("driver.mjs"))
            .current_dir(here())
            .env("CHROMIUM", &chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node driver.mjs");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut driver = Driver {
            child,
            stdin,
            lines,
        };
        let origins = driver.read();
        Some((driver, origins))
    }

    fn read(&mut self) -> Value {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(90))
            .expect("an answer from the browser driver");
        let value: Value = serde_json::from_str(&line).expect("JSON from the driver");
        assert!(value.get("error").is_none(), "driver: {value}");
        value
    }

    fn ask(&mut self, command: Value) -> Value {
        writeln!(self.stdin, "{command}").expect("write to the driver");
        self.stdin.flush().expect("flush");
        self.read()
    }

    /// Opens a tab on `page` (`listed` or `unlisted`) running `new EventSource(url)`.
    fn open(&mut self, page: &str, url: &str) -> u64 {
        let answer = self.ask(json!({"cmd": "open", "page": page, "url": url}));
        answer["opened"].as_u64().expect("tab id")
    }

    fn state(&mut self, tab: u64) -> Value {
        self.ask(json!({"cmd": "state", "id": tab}))
    }

    /// Polls the tab until `done` holds for its state or `within` passes; the last state.
    fn wait(&mut self, tab: u64, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + within;
        loop {
            let state = self.state(tab);
            if done(&state) || Instant::now() >= end {
                return state;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"cmd": "quit"}));
        let _ = self.stdin.flush();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(dir: &Path, upstream: &str, port: u16, origin: &str) -> PathBuf {
    let tokens = write_file(dir, "tokens", &format!("{TOKEN}\n"));
    let text = format!(
        r#"[state]
path = {state:?}
commit_interval = "200ms"

[[feed]]
name = "wiki"
url = "{upstream}"
default_retry = "100ms"

[sink.db]
type = "sqlite"
path = {db:?}

[routing]
default = ["db"]

[serve]
listen = "127.0.0.1:{port}"
cors_origins = ["{origin}"]
token_file = {tokens:?}
retry = "300ms"
poll_interval = "20ms"
"#,
        state = dir.join("state.db").display().to_string(),
        db = dir.join("events.db").display().to_string(),
        tokens = tokens.display().to_string(),
    );
    write_file(dir, "bridge.toml", &text)
}

async fn start_bridge(config: &Path) -> Bridge {
    let bridge = Bridge::spawn(config);
    bridge
        .wait_log("serve listening", Duration::from_secs(30), |l| {
            l.message.contains("serve: listening on http://")
        })
        .await;
    bridge
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_on_another_origin_reads_every_event_once_across_a_restart() {
    let Some((mut driver, origins)) = Driver::start() else {
        return;
    };
    let listed = origins["listed"]
        .as_str()
        .expect("listed origin")
        .to_string();
    // 3 000 events, 20 every 100 ms: the stream is still arriving when the bridge restarts.
    let upstream = Server::log(TOTAL, 20, Duration::from_millis(100)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = support::free_port();
    let config = config(dir.path(), &upstream.url(), port, &listed);
    let bridge = start_bridge(&config).await;
    let base = format!("http://127.0.0.1:{port}/feeds/wiki/events");
    let with_token = format!("{base}?access_token={TOKEN}");

    let tab = tokio::task::block_in_place(|| driver.open("listed", &with_token));
    let before = tokio::task::block_in_place(|| {
        driver.wait(tab, Duration::from_secs(60), |s| {
            s["events"].as_u64() >= Some(600)
        })
    });
    assert!(before["events"].as_u64() >= Some(600), "{before}");

    // Restart the bridge under the page's feet: its EventSource reconnects with Last-Event-ID.
    let (status, _) = bridge.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    let bridge = start_bridge(&config).await;
    let after = tokio::task::block_in_place(|| {
        driver.wait(tab, Duration::from_secs(120), |s| {
            s["events"].as_u64() >= Some(TOTAL)
        })
    });
    // Nothing more arrives: no duplicate trails behind.
    std::thread::sleep(Duration::from_secs(1));
    let last = tokio::task::block_in_place(|| driver.state(tab));
    let seen = tokio::task::block_in_place(|| driver.ask(json!({"cmd": "events", "id": tab})));
    let events = seen["events"].as_array().expect("events").clone();
    assert_eq!(events.len() as u64, TOTAL, "{after} {last}");
    for (i, e) in events.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(
            e[0].as_str(),
            Some(n.to_string().as_str()),
            "event {i}: {e}"
        );
        assert_eq!(e[1].as_str(), Some(event_type(n)), "event {i}: {e}");
        assert!(
            e[2].as_str()
                .is_some_and(|d| d.contains(&format!("\"n\":{n},"))),
            "event {i}: {e}"
        );
    }
    let opens = last["opens"].as_u64().unwrap_or(0);
    let errors = last["errors"].as_u64().unwrap_or(0);
    assert!(opens >= 2, "reconnected after the restart: {last}");
    assert_eq!(last["readyState"].as_u64(), Some(1), "still open: {last}");

    // Refused: no token (401), and a page from an origin the bridge does not list (403).
    let no_token = tokio::task::block_in_place(|| driver.open("listed", &base));
    let unlisted = tokio::task::block_in_place(|| driver.open("unlisted", &with_token));
    let closed = |s: &Value| s["readyState"].as_u64() == Some(2);
    let refused_401 =
        tokio::task::block_in_place(|| driver.wait(no_token, Duration::from_secs(20), closed));
    let refused_cors =
        tokio::task::block_in_place(|| driver.wait(unlisted, Duration::from_secs(20), closed));
    assert!(closed(&refused_401), "without a token: {refused_401}");
    assert_eq!(refused_401["events"].as_u64(), Some(0));
    assert!(
        closed(&refused_cors),
        "from an unlisted origin: {refused_cors}"
    );
    assert_eq!(refused_cors["events"].as_u64(), Some(0));

    let (status, logs) = bridge.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    let resumed = logs.iter().find(|l| {
        l.message == "client connected"
            && l.fields["resume_after"].as_str().is_some_and(|r| r != "-")
    });
    assert!(resumed.is_some(), "the page resumed with its Last-Event-ID");
    let refusals: Vec<&str> = logs
        .iter()
        .filter(|l| l.message.starts_with("serve: refused a request"))
        .map(|l| l.message.as_str())
        .collect();
    assert!(
        refusals.iter().any(|m| m.contains("no token"))
            && refusals.iter().any(|m| m.contains("origin")),
        "{refusals:?}"
    );
    eprintln!(
        "browser: {} events received once and in order across a restart; opens {opens}, \
         errors {errors}; before the restart {}; resumed after {:?}; refused: no token \
         (readyState {}), unlisted origin (readyState {})",
        events.len(),
        before["events"],
        resumed.and_then(|l| l.fields["resume_after"].as_str()),
        refused_401["readyState"],
        refused_cors["readyState"],
    );
}
