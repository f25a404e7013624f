//! The real binary as a subprocess: configuration errors, and end-to-end delivery across
//! kill -9 and SIGTERM against a real SSE server on 127.0.0.1.

mod support;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rand::Rng;
use support::bridge::{checkpoint, line_count, Bridge};
use support::server::Server;
use support::{archive_sink, bin, command, run_ok, state_section, succeeds, wait_for, write_file};

fn validate(config: &Path) -> Output {
    Command::new(bin())
        .args(["validate", "-c"])
        .arg(config)
        .env_remove("RUST_LOG")
        .output()
        .expect("run sse-bridge validate")
}

const GOOD: &str = r#"
[state]
path = "STATE"

[[feed]]
name = "recent"
url = "http://127.0.0.1:9/stream"

[sink.archive]
type = "file"
path = "DIR/events/{feed}.jsonl"

[[route]]
event = "*"
sinks = ["archive"]
"#;

fn assert_config_error(text: &str, key: &str, words: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(dir.path(), "bad.toml", text);
    let out = validate(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {stderr}");
    assert!(
        stderr.contains(&path.display().to_string()),
        "error names the file: {stderr}"
    );
    assert!(
        stderr.contains(&format!("`{key}`")),
        "error names key `{key}`: {stderr}"
    );
    assert!(stderr.contains(words), "error says `{words}`: {stderr}");
}

#[test]
fn a_good_config_validates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(dir.path(), "good.toml", GOOD);
    let out = validate(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK (1 feed(s), 1 sink(s), 1 route(s))"));
}

#[test]
fn the_built_in_default_config_validates() {
    assert!(run_ok(["validate"]).contains("built-in default config"));
}

#[test]
fn unknown_key_is_named() {
    let text = GOOD.replace("url = ", "urll = \"x\"\nurl = ");
    assert_config_error(&text, "feed[0].urll", "unknown key `urll`");
}

#[test]
fn bad_url_is_named() {
    let text = GOOD.replace("http://127.0.0.1:9/stream", "not a url");
    assert_config_error(&text, "feed[0].url", "not a valid URL");
    let text = GOOD.replace("http://127.0.0.1:9/stream", "ftp://example.org/x");
    assert_config_error(&text, "feed[0].url", "http:// or https://");
}

#[test]
fn route_to_a_missing_sink_is_named() {
    let text = GOOD.replace("sinks = [\"archive\"]", "sinks = [\"archiv\"]");
    assert_config_error(&text, "route[0].sinks[0]", "archiv");
}

#[test]
fn a_path_escaping_its_directory_is_named() {
    let text = GOOD.replace("DIR/events/{feed}.jsonl", "DIR/events/../../{feed}.jsonl");
    assert_config_error(&text, "sink.archive.path", "..");
}

#[test]
fn http_version_takes_a_string_or_the_number_an_operator_types() {
    for value in ["\"auto\"", "\"1.1\"", "\"2\"", "2", "1.1"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = GOOD.replace("url = ", &format!("http_version = {value}\nurl = "));
        let path = write_file(dir.path(), "good.toml", &text);
        let out = validate(&path);
        assert!(
            out.status.success(),
            "{value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for value in ["\"3\"", "3", "1.0"] {
        let text = GOOD.replace("url = ", &format!("http_version = {value}\nurl = "));
        assert_config_error(
            &text,
            "feed[0].http_version",
            "expected one of `auto`, `1.1`, `2`",
        );
    }
}

#[test]
fn a_wrong_type_is_named() {
    let text = GOOD.replace("[state]", "[state]\ncommit_interval = 5");
    assert_config_error(&text, "state.commit_interval", "");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = validate(Path::new("/nonexistent/sse-bridge.toml"));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/sse-bridge.toml") && stderr.contains("cannot read"),
        "{stderr}"
    );
}

#[test]
fn an_environment_override_is_applied_and_named_when_bad() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(dir.path(), "good.toml", GOOD);
    let out = Command::new(bin())
        .args(["validate", "-c"])
        .arg(&path)
        .env("SSE_BRIDGE_STATE__COMMIT_INTERVAL", "soon")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("SSE_BRIDGE_STATE__COMMIT_INTERVAL"),
        "{stderr}"
    );
    // Unrelated SSE_BRIDGE_* variables (a token, say) are not config keys.
    succeeds(
        command([OsStr::new("validate"), "-c".as_ref(), path.as_os_str()])
            .env("SSE_BRIDGE_TOKEN", "secret"),
    );
}

#[test]
fn a_missing_token_variable_is_named_without_leaking_anything() {
    let text = GOOD.replace(
        "url = \"http://127.0.0.1:9/stream\"",
        "url = \"http://127.0.0.1:9/stream\"\nbearer_token_env = \"SSE_BRIDGE_TEST_NO_SUCH_TOKEN\"",
    );
    assert_config_error(
        &text,
        "feed[0].bearer_token_env",
        "SSE_BRIDGE_TEST_NO_SUCH_TOKEN",
    );
}

// ---------------------------------------------------------------------------------------------
// End to end: 100 000 events, kill -9 at a random moment, restart, SIGTERM.

const TOTAL: u64 = 100_000;

fn e2e_config(dir: &Path, url: &str) -> std::path::PathBuf {
    let text = format!(
        r#"
{state}

[shutdown]
timeout = "20s"

[[feed]]
name = "wiki"
url = "{url}"
default_retry = "100ms"

{archive}

[[route]]
event = "*"
sinks = ["archive"]
"#,
        state = state_section(dir, "200ms"),
        archive = archive_sink(dir),
    );
    write_file(dir, "bridge.toml", &text)
}

fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSONL line {l:?}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_then_restart_loses_nothing_and_sigterm_commits_the_last_id() {
    // 100 000 events in chunks of 500 every 20 ms: about 4 s of stream.
    let server = Server::log(TOTAL, 500, Duration::from_millis(20)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = e2e_config(dir.path(), &server.url());
    let out = dir.path().join("events/wiki.jsonl");
    let state = dir.path().join("state.db");

    // Run 1: kill -9 at a random point in the stream.
    let mut bridge = Bridge::spawn(&config);
    let kill_after = rand::thread_rng().gen_range(5_000..60_000);
    assert!(
        wait_for(Duration::from_secs(60), || line_count(&out) >= kill_after).await,
        "the bridge stored {} events, wanted {kill_after}",
        line_count(&out)
    );
    bridge.kill();
    let stored_before = read_lines(&out);
    let (cp_id, cp_seq) =
        checkpoint(&state, "wiki").expect("a checkpoint was committed before the kill");
    let last_stored: u64 = stored_before
        .last()
        .and_then(|v| v["id"].as_str())
        .and_then(|s| s.parse().ok())
        .expect("last id");
    let cp_n: u64 = cp_id.parse().expect("numeric checkpoint");
    assert!(
        cp_n <= last_stored,
        "checkpoint {cp_n} ran ahead of storage {last_stored}"
    );
    assert_eq!(cp_seq, cp_n, "seq and id advance together in this stream");

    // Run 2: resumes from the committed checkpoint; the file sink drops the re-fetched events
    // between it and the last one stored (its cursor is its own data), so each is stored once.
    let bridge = Bridge::spawn(&config);
    let expected_lines = TOTAL as usize;
    assert!(
        wait_for(Duration::from_secs(120), || line_count(&out)
            >= expected_lines)
        .await,
        "stored {} lines, expected {expected_lines}",
        line_count(&out)
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "one connection per run: {requests:?}");
    assert_eq!(requests[0].last_event_id, None, "first start has no cursor");
    assert_eq!(
        requests[1].last_event_id.as_deref(),
        Some(cp_id.as_str()),
        "the restart resumed from the committed checkpoint"
    );

    // SIGTERM: drain, commit, exit 0.
    let (exit, _) = bridge.terminate(Duration::from_secs(25)).await;
    assert_eq!(exit.code(), Some(0), "exit status after SIGTERM");
    assert_eq!(
        checkpoint(&state, "wiki"),
        Some((TOTAL.to_string(), TOTAL)),
        "final checkpoint is the last stored id"
    );

    // Every event is there, once, in order.
    let lines = read_lines(&out);
    assert_eq!(lines.len(), expected_lines);
    let mut seen = HashSet::new();
    let mut next_new = 1u64;
    let mut duplicates = 0u64;
    for v in &lines {
        let id: u64 = v["id"].as_str().and_then(|s| s.parse().ok()).expect("id");
        assert_eq!(
            v["seq"].as_u64(),
            Some(id),
            "a re-fetched event keeps its seq"
        );
        assert_eq!(v["feed"], "wiki");
        assert_eq!(v["type"], support::event_type(id));
        assert_eq!(
            v["data"].as_str(),
            Some(
                format!("{{\"n\":{id},\"title\":\"Page {id}\",\"comment\":\"résumé ✓\"}}").as_str()
            )
        );
        if seen.insert(id) {
            assert_eq!(id, next_new, "events are in order per feed");
            next_new += 1;
        } else {
            duplicates += 1;
            assert!(
                id > cp_n && id <= last_stored,
                "duplicate {id} outside the uncommitted window"
            );
        }
    }
    assert_eq!(seen.len() as u64, TOTAL, "no event lost");
    // The uncommitted window (checkpoint, last stored] was fetched again and dropped.
    assert_eq!(duplicates, 0, "re-fetched window {cp_n}..={last_stored}");
    eprintln!(
        "kill -9 after {} stored events; checkpoint {cp_n}; {duplicates} duplicates; {} lines in all",
        stored_before.len(),
        lines.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Isolation and accounting: a broken feed beside a good one; drop and unrouted events counted.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_feed_does_not_affect_a_good_one_and_every_event_is_accounted_for() {
    const N: u64 = 3000;
    let server = Server::log(N, 300, Duration::from_millis(5)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Port 9 (discard) on loopback: nothing listens, every attempt is refused.
    let text = format!(
        r#"
{state}

[[feed]]
name = "good"
url = "{url}"

[[feed]]
name = "bad"
url = "http://127.0.0.1:9/stream"
default_retry = "100ms"

[sink.archive]
type = "file"
path = "{dir}/events/{{feed}}-{{type}}.jsonl"

[sink.out]
type = "stdout"

[[route]]
feed = "good"
event = "edit"
sinks = ["archive", "out"]

[[route]]
feed = "good"
event = "log"
drop = true
"#,
        dir = dir.path().display(),
        state = state_section(dir.path(), "100ms"),
        url = server.url()
    );
    let config = write_file(dir.path(), "bridge.toml", &text);
    let mut child = Command::new(bin())
        .args(["run", "--log-format", "json", "-c"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let out_reader =
        std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let err_reader =
        std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());

    let edits = dir.path().join("events/good-edit.jsonl");
    assert!(
        wait_for(Duration::from_secs(60), || line_count(&edits)
            >= (N / 3) as usize)
        .await,
        "the good feed delivered {} of {} edits while the bad feed failed",
        line_count(&edits),
        N / 3
    );
    // Let the committer see the trailing dropped/unrouted events too.
    let state = dir.path().join("state.db");
    assert!(
        wait_for(Duration::from_secs(10), || {
            let conn = rusqlite::Connection::open(&state).ok();
            conn.and_then(|c| {
                c.query_row("SELECT seq FROM checkpoints WHERE feed='good'", [], |r| {
                    r.get::<_, i64>(0)
                })
                .ok()
            }) == Some(N as i64)
        })
        .await,
        "checkpoint reaches the last event: dropped and unrouted events count as acknowledged"
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    let stdout = out_reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");

    // stdout carries exactly the routed edits, the same lines as the file.
    let file_text = std::fs::read_to_string(&edits).expect("edits file");
    assert_eq!(
        stdout, file_text,
        "stdout and file sinks got the same JSONL"
    );
    assert_eq!(stdout.lines().count() as u64, N / 3);
    for line in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSONL");
        assert_eq!(v["type"], "edit");
    }
    assert!(
        !dir.path().join("events/good-log.jsonl").exists(),
        "dropped events are not stored"
    );

    // Logs are JSON lines; the closing summary counts every event of the good feed.
    let mut summary = None;
    let mut bad_errors = 0;
    for line in stderr.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        let fields = &v["fields"];
        if fields["message"] == "feed closed" && fields["feed"] == "good" {
            summary = Some(fields.clone());
        }
        if fields["feed"] == "bad" && v["level"] == "WARN" {
            bad_errors += 1;
        }
    }
    let s = summary.unwrap_or_else(|| panic!("no summary for feed `good` in logs:\n{stderr}"));
    assert_eq!(s["received"], N);
    assert_eq!(s["routed"], N / 3);
    assert_eq!(s["dropped"], N / 3);
    assert_eq!(s["unrouted"], N / 3);
    assert_eq!(s["checkpoint"], N.to_string());
    assert!(
        bad_errors >= 1,
        "the bad feed's failures are logged as warnings:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `(soft, hard)` "Max open files" of a process, from `/proc/PID/limits`.
fn open_file_limits(pid: u32) -> Option<(String, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    Some((fields.next()?.to_string(), fields.next()?.to_string()))
}

/// The bridge raises its soft open-file limit to the hard limit at start (a socket per feed),
/// so many feeds work under a shell's low default soft limit.
#[tokio::test]
async fn run_raises_the_soft_open_file_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing listens on port 1: the feed keeps retrying, which is all this test needs.
    let config = e2e_config(dir.path(), "http://127.0.0.1:1/stream");
    let log = dir.path().join("bridge.log");
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(r#"ulimit -S -n 200 && exec "$0" run -c "$1""#)
        .arg(bin())
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let raised = wait_for(Duration::from_secs(20), || {
        open_file_limits(pid).is_some_and(|(soft, hard)| soft == hard && soft != "200")
    })
    .await;
    let limits = open_file_limits(pid);
    // Stopped only once running (its signal handlers installed): the feed has failed once.
    let running = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("127.0.0.1:1"))
    })
    .await;
    assert!(
        running,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = child.wait().expect("wait");
    assert!(
        raised,
        "limits {limits:?}; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(status.code(), Some(0));
}

/// `[cluster]` mistakes name the key and the file before anything starts; the commands that
/// read the SQLite state refuse a fleet's configuration, saying where its state is.
#[test]
fn a_fleet_configuration_names_its_mistakes() {
    let fleet = |extra: &str| {
        format!("{GOOD}\n[cluster]\nurl = \"postgresql://bridge@db.example.org/fleet\"\n{extra}")
    };
    assert_config_error(
        &fleet("lease_ttl = \"100ms\""),
        "cluster.lease_ttl",
        "between 1s and 10m",
    );
    assert_config_error(
        &fleet("instance = \"node a\""),
        "cluster.instance",
        "spaces",
    );
    assert_config_error(
        &fleet(
            "[sink.pg]\ntype = \"postgres\"\nurl = \"postgresql://bridge@db.example.org/other\"\n",
        ),
        "sink.pg.url",
        "the fleet's database",
    );
    assert_config_error(
        &format!("{GOOD}\n[cluster]\nlease_ttl = \"5s\"\n"),
        "cluster.url",
        "set one of",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let text = fleet("").replace("STATE", &dir.path().join("state.db").display().to_string());
    let path = write_file(dir.path(), "fleet.toml", &text);
    for args in [["checkpoints", "list"], ["gaps", "--json"]] {
        let out = Command::new(bin())
            .args(args)
            .arg("-c")
            .arg(&path)
            .env_remove("RUST_LOG")
            .output()
            .expect("run sse-bridge");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("[cluster]") && stderr.contains("sse_bridge_checkpoints"),
            "{args:?}: {stderr}"
        );
    }
}
