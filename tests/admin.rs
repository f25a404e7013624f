//! The admin endpoint of the real binary against real SSE servers on 127.0.0.1: `/metrics`
//! parses as Prometheus text and counts exactly the events sent, `/readyz` follows a feed's
//! server going down and coming back, `/feeds` and `/sinks` as JSON, and the `status` and
//! `tap` commands.

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::bridge::Bridge;
use support::server::{Fault, Options, Server};
use support::{archive_sink, bin, free_port, write_file};

// ---------------------------------------------------------------------------------------------
// Helpers

/// GET, returning the status and body; `None` while the endpoint does not answer.
async fn get(url: &str) -> Option<(u16, String)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let resp = client.get(url).send().await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A metric, its labels and its value.
type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Writes a config of `feeds_and_routes` with the state database (committing every 100 ms when `fast_commit`), the `archive` file sink and the
/// admin endpoint on a free port, and starts the bridge; returns it and the admin URL.
fn start_bridge(dir: &Path, fast_commit: bool, feeds_and_routes: &str) -> (Bridge, String) {
    let port = free_port();
    let commit = if fast_commit {
        "commit_interval = \"100ms\"\n"
    } else {
        ""
    };
    let text = format!(
        r#"
[state]
path = "{dir}/state.db"
{commit}
{feeds_and_routes}

{archive}

[admin]
listen = "127.0.0.1:{port}"
"#,
        dir = dir.display(),
        archive = archive_sink(dir),
    );
    let config = write_file(dir, "bridge.toml", &text);
    (
        Bridge::spawn_plain(&config),
        format!("http://127.0.0.1:{port}"),
    )
}

// ---------------------------------------------------------------------------------------------
// `/metrics` read with a real parser (the `prometheus-parse` crate), flattened into samples.

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default, Clone)]
struct Metrics {
    samples: Vec<Sample>,
}

/// Parses the page; a line the parser would skip (neither a comment nor a sample) is an error,
/// and each histogram's buckets must be cumulative and end in `+Inf`.
fn parse_prometheus(text: &str) -> Result<Metrics, String> {
    for (n, line) in text.lines().enumerate() {
        if prometheus_parse::LineInfo::parse(line) == prometheus_parse::LineInfo::Ignored {
            return Err(format!("line {}: not Prometheus text: {line:?}", n + 1));
        }
    }
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .map_err(|e| e.to_string())?;
    let mut m = Metrics::default();
    for s in scrape.samples {
        let labels: BTreeMap<String, String> = s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut push = |name: String, labels: BTreeMap<String, String>, value: f64| {
            m.samples.push(Sample {
                name,
                labels,
                value,
            })
        };
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => push(s.metric, labels, v),
            prometheus_parse::Value::Histogram(buckets) => {
                let cumulative = buckets
                    .windows(2)
                    .all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count);
                if !cumulative || buckets.last().map(|b| b.less_than) != Some(f64::INFINITY) {
                    return Err(format!("{}{labels:?}: bad buckets {buckets:?}", s.metric));
                }
                for b in buckets {
                    let mut with_le = labels.clone();
                    with_le.insert("le".to_string(), b.less_than.to_string());
                    push(format!("{}_bucket", s.metric), with_le, b.count);
                }
            }
            prometheus_parse::Value::Summary(_) => {
                return Err(format!("{}: unexpected summary", s.metric))
            }
        }
    }
    Ok(m)
}

impl Metrics {
    /// The value of the one sample of `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        match matching.as_slice() {
            [one] => Some(one.value),
            _ => None,
        }
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no single sample {name} {labels:?}"))
    }

    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }
}

async fn scrape(admin: &str) -> Option<Metrics> {
    let (status, text) = get(&format!("{admin}/metrics")).await?;
    assert_eq!(status, 200);
    Some(parse_prometheus(&text).unwrap_or_else(|e| panic!("{e}\n{text}")))
}

/// An SSE server the test controls: pushes what it is told to every client, can be stopped
/// (listener closed, connections dropped) and started again on the same port.
async fn push_server() -> Server {
    Server::start(Options::paced(0, 1, Duration::ZERO), |_| Fault::Push).await
}

/// Answers every request with 204 No Content: "stop reconnecting".
async fn no_content_server() -> Server {
    Server::start(Options::log(0), |_| Fault::status(204, "No Content")).await
}

// ---------------------------------------------------------------------------------------------
// The tests

/// The data of `support::event_text(n)`.
fn event_data(n: u64) -> String {
    format!("{{\"n\":{n},\"title\":\"Page {n}\",\"comment\":\"résumé ✓\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_the_events_sent() {
    const N: u64 = 300;
    let server = Server::log(N, 100, Duration::from_millis(10)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // edit -> stored, log -> dropped by a route, new -> unrouted (no default route).
    let (mut bridge, admin) = start_bridge(
        dir.path(),
        true,
        &format!(
            r#"
[[feed]]
name = "wiki"
url = "{url}"

[[route]]
event = "edit"
sinks = ["archive"]

[[route]]
event = "log"
drop = true
"#,
            url = server.url(),
        ),
    );

    // Everything received, stored and committed.
    let deadline = Instant::now() + Duration::from_secs(20);
    let m = loop {
        let m = scrape(&admin).await;
        if let Some(m) = &m {
            if m.sum("sse_bridge_events_received_total", &[("feed", "wiki")]) == N as f64
                && m.get("sse_bridge_checkpoint_lag_events", &[("feed", "wiki")]) == Some(0.0)
                && m.get(
                    "sse_bridge_sink_events_stored_total",
                    &[("sink", "archive")],
                ) == Some((N / 3) as f64)
            {
                break m.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "metrics never settled: {m:?}\n{}",
            bridge.raw_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let feed = |ty: &'static str| [("feed", "wiki"), ("type", ty)];
    // event_type(n): n % 3 == 0 edit, 1 log, 2 new; 100 of each.
    for ty in ["edit", "log", "new"] {
        assert_eq!(
            m.value("sse_bridge_events_received_total", &feed(ty)),
            100.0
        );
    }
    let archive = [("sink", "archive")];
    let data_bytes: usize = (1..=N).map(|n| event_data(n).len()).sum();
    let edit_bytes: usize = (1..=N)
        .filter(|n| n % 3 == 0)
        .map(|n| event_data(n).len())
        .sum();
    let exact: &[Expected] = &[
        ("sse_bridge_events_routed_total", &feed("edit"), 100.0),
        ("sse_bridge_events_routed_total", &feed("log"), 0.0),
        ("sse_bridge_events_dropped_total", &feed("log"), 100.0),
        ("sse_bridge_events_unrouted_total", &feed("new"), 100.0),
        ("sse_bridge_events_unrouted_total", &feed("edit"), 0.0),
        (
            "sse_bridge_event_data_bytes_total",
            &feed("edit"),
            edit_bytes as f64,
        ),
        ("sse_bridge_sink_events_stored_total", &archive, 100.0),
        ("sse_bridge_sink_events_dropped_total", &archive, 0.0),
        ("sse_bridge_sink_write_errors_total", &archive, 0.0),
        ("sse_bridge_sink_healthy", &archive, 1.0),
        ("sse_bridge_sink_queue_events", &archive, 0.0),
        (
            "sse_bridge_sink_info",
            &[("sink", "archive"), ("kind", "file")],
            1.0,
        ),
        ("sse_bridge_feed_reconnects_total", &[("feed", "wiki")], 0.0),
        ("sse_bridge_feed_backoff_seconds", &[("feed", "wiki")], 0.0),
        ("sse_bridge_feed_pending_events", &[("feed", "wiki")], 0.0),
        (
            "sse_bridge_checkpoint_lag_seconds",
            &[("feed", "wiki")],
            0.0,
        ),
        ("sse_bridge_tap_clients", &[], 0.0),
    ];
    for (name, labels, want) in exact {
        assert_eq!(m.value(name, labels), *want, "{name} {labels:?}");
    }
    assert_eq!(m.sum("sse_bridge_events_misfit_total", &[]), 0.0);
    assert_eq!(
        m.sum("sse_bridge_event_data_bytes_total", &[("feed", "wiki")]),
        data_bytes as f64
    );
    assert!(
        m.value("sse_bridge_feed_received_bytes_total", &[("feed", "wiki")]) > data_bytes as f64,
        "the wire carries the data and the field names"
    );
    let writes = m.value(
        "sse_bridge_sink_write_duration_seconds_count",
        &[("sink", "archive")],
    );
    assert!(writes >= 1.0, "at least one write observed");
    for (state, v) in [
        ("open", 1.0),
        ("connecting", 0.0),
        ("closed", 0.0),
        ("stopped", 0.0),
    ] {
        assert_eq!(
            m.value(
                "sse_bridge_feed_state",
                &[("feed", "wiki"), ("state", state)]
            ),
            v,
            "state {state}"
        );
    }
    assert_eq!(
        m.sum("sse_bridge_feed_errors_total", &[("feed", "wiki")]),
        0.0
    );
    assert!(m
        .get(
            "sse_bridge_feed_errors_total",
            &[("feed", "wiki"), ("class", "network")]
        )
        .is_some());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let last_event = m.value(
        "sse_bridge_feed_last_event_timestamp_seconds",
        &[("feed", "wiki")],
    );
    assert!((now - last_event).abs() < 60.0, "{now} vs {last_event}");
    assert!(m.get("sse_bridge_build_info", &[]).is_some());

    // /feeds
    let (status, body) = get(&format!("{admin}/feeds")).await.expect("feeds");
    assert_eq!(status, 200);
    let feeds: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let f = &feeds[0];
    assert_eq!(feeds.as_array().map(Vec::len), Some(1), "{feeds}");
    assert_eq!(f["name"], "wiki");
    assert_eq!(f["url"], server.url());
    assert_eq!(f["state"], "open");
    assert_eq!(f["last_event_id"], N.to_string());
    assert!(f["last_event_age_seconds"]
        .as_f64()
        .is_some_and(|a| (0.0..60.0).contains(&a)));
    assert!(f["last_event_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert_eq!(f["reconnects"], 0);
    assert!(f["current_backoff_seconds"].is_null());
    assert!(f["last_error"].is_null());
    assert!(f["open_since"].is_string());
    assert_eq!(f["protocol"], "HTTP/1.1");
    assert!(f["connection"].is_u64(), "{f}");
    assert_eq!(f["events"]["received"], N);
    assert_eq!(f["events"]["routed"], N / 3);
    assert_eq!(f["events"]["dropped"], N / 3);
    assert_eq!(f["events"]["unrouted"], N / 3);
    assert_eq!(f["seq"], N);
    assert_eq!(f["checkpoint"]["seq"], N);
    assert_eq!(f["checkpoint"]["lag_events"], 0);

    // /sinks, /healthz, /readyz, an unknown path.
    let (status, body) = get(&format!("{admin}/sinks")).await.expect("sinks");
    assert_eq!(status, 200);
    let sinks: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(sinks[0]["name"], "archive");
    assert_eq!(sinks[0]["type"], "file");
    assert_eq!(sinks[0]["healthy"], true);
    assert_eq!(sinks[0]["stored"], N / 3);
    assert_eq!(
        get(&format!("{admin}/healthz")).await,
        Some((200, "ok\n".to_string()))
    );
    let (status, body) = get(&format!("{admin}/readyz")).await.expect("readyz");
    assert_eq!((status, body.trim()), (200, r#"{"ready":true}"#));
    assert_eq!(get(&format!("{admin}/nope")).await.map(|r| r.0), Some(404));

    // `sse-bridge status -c` finds the endpoint in the configuration.
    let out = Command::new(bin())
        .args(["status", "-c"])
        .arg(&bridge.config)
        .output()
        .expect("status");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("wiki "))
        .unwrap_or_else(|| panic!("no row for the feed:\n{stdout}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..3], ["wiki", "open", "HTTP/1.1"], "{stdout}");
    assert!(cells[3].starts_with('#'), "the connection's id: {stdout}");
    assert_eq!(cells[4], "300", "{stdout}");
    assert!(row.contains(" ago "), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("archive ") && l.contains(" file ")),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("ready"), "{stdout}");

    assert_eq!(bridge.exit_code(Duration::from_secs(15)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_not_ready_while_a_feeds_server_is_down() {
    let mut server = push_server().await;
    let no_content = no_content_server().await;
    let gone = no_content.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut bridge, admin) = start_bridge(
        dir.path(),
        true,
        &format!(
            r#"
[[feed]]
name = "flaky"
url = "{url}"
default_retry = "100ms"
backoff = {{ initial = "100ms", max = "200ms", jitter = 0.0 }}

[[feed]]
name = "retired"
url = "{gone}"

[routing]
default = ["archive"]
"#,
            url = server.url(),
        ),
    );
    let readyz = format!("{}/readyz", admin);

    // Open, and the feed whose server said 204 is stopped on purpose: ready.
    assert!(
        eventually(Duration::from_secs(15), || async {
            get(&readyz).await.is_some_and(|(s, _)| s == 200)
        })
        .await,
        "never ready: {:?}\n{}",
        get(&readyz).await,
        bridge.raw_log()
    );
    let m = scrape(&admin).await.expect("metrics");
    assert_eq!(
        m.value(
            "sse_bridge_feed_state",
            &[("feed", "retired"), ("state", "stopped")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "sse_bridge_feed_errors_total",
            &[("feed", "retired"), ("class", "no_content")]
        ),
        1.0
    );

    // The server goes away: the feed reconnects, is refused, and the bridge is not ready.
    server.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        if let Some((503, body)) = get(&readyz).await {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "still ready with the server down\n{}",
            bridge.raw_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["ready"], false);
    let reasons = v["reasons"].as_array().expect("reasons");
    assert_eq!(reasons.len(), 1, "{v}");
    let reason = reasons[0].as_str().unwrap_or_default();
    assert!(reason.contains("feed `flaky` is connecting"), "{reason}");
    assert!(!reason.contains("retired"), "{reason}");

    // It keeps failing while down; failures are counted by class.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let Some(m) = scrape(&admin).await else {
                return false;
            };
            m.value(
                "sse_bridge_feed_state",
                &[("feed", "flaky"), ("state", "connecting")],
            ) == 1.0
                && m.value(
                    "sse_bridge_feed_errors_total",
                    &[("feed", "flaky"), ("class", "eof")],
                ) >= 1.0
                && m.value(
                    "sse_bridge_feed_errors_total",
                    &[("feed", "flaky"), ("class", "network")],
                ) >= 1.0
                && m.value("sse_bridge_feed_reconnects_total", &[("feed", "flaky")]) >= 2.0
        })
        .await,
        "{:?}",
        get(&format!("{}/feeds", admin)).await
    );
    let (_, feeds) = get(&format!("{}/feeds", admin)).await.expect("feeds");
    let feeds: serde_json::Value = serde_json::from_str(&feeds).expect("JSON");
    let flaky = feeds
        .as_array()
        .and_then(|a| a.iter().find(|f| f["name"] == "flaky"))
        .expect("flaky");
    assert_eq!(flaky["state"], "connecting");
    assert!(flaky["last_error"].is_string(), "{flaky}");

    // Back up: ready again.
    server.restart().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(&readyz).await.is_some_and(|(s, _)| s == 200)
        })
        .await,
        "not ready again after the server came back: {:?}\n{}",
        get(&readyz).await,
        bridge.raw_log()
    );
    assert_eq!(bridge.exit_code(Duration::from_secs(15)).await, Some(0));
}

/// Reads a child's stdout lines into a shared vector.
fn collect_lines(child: &mut Child) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let out = child.stdout.take().expect("stdout");
    let sink = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            match line {
                Ok(l) => sink.lock().expect("lock").push(l),
                Err(_) => return,
            }
        }
    });
    lines
}

async fn wait_child(child: &mut Child, within: Duration) -> Option<i32> {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Some(s) = child.try_wait().expect("wait") {
            return s.code();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_prints_events_live_and_status_lists_the_feeds() {
    let server = push_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut bridge, admin) = start_bridge(
        dir.path(),
        false,
        &format!(
            r#"
[[feed]]
name = "live"
url = "{url}"

[routing]
default = ["archive"]
"#,
            url = server.url(),
        ),
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            server.clients() == 1
                && get(&format!("{admin}/readyz"))
                    .await
                    .is_some_and(|(s, _)| s == 200)
        })
        .await,
        "{}",
        bridge.raw_log()
    );

    // `status --admin URL` lists the feed without a configuration.
    let out = Command::new(bin())
        .args(["status", "--admin", admin.trim_start_matches("http://")])
        .env_remove("SSE_BRIDGE_CONFIG")
        .output()
        .expect("status");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.lines().next().is_some_and(|h| h.starts_with("FEED")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("live ") && l.contains(" open ")),
        "{stdout}"
    );

    // Two taps: JSON Lines of `edit` events by --admin, everything pretty by -c.
    let spawn_tap = |args: &[&str]| {
        Command::new(bin())
            .arg("tap")
            .args(args)
            .env_remove("SSE_BRIDGE_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tap")
    };
    let mut jsonl_tap = spawn_tap(&["--admin", &admin, "--feed", "l*", "--type", "edit"]);
    let config_arg = bridge.config.display().to_string();
    let mut pretty_tap = spawn_tap(&["-c", &config_arg, "--pretty"]);
    let jsonl = collect_lines(&mut jsonl_tap);
    let pretty = collect_lines(&mut pretty_tap);
    assert!(
        eventually(Duration::from_secs(10), || async {
            scrape(&admin)
                .await
                .is_some_and(|m| m.value("sse_bridge_tap_clients", &[]) == 2.0)
        })
        .await,
        "the taps did not connect"
    );

    server.push("event: edit\nid: 1\ndata: one\n\n");
    server.push("event: log\nid: 2\ndata: two\n\n");
    server.push("event: edit\nid: 3\ndata: {\"x\":3}\n\n");
    let stored = dir.path().join("events/live.jsonl");
    assert!(
        eventually(Duration::from_secs(10), || async {
            jsonl.lock().expect("lock").len() >= 2
                && pretty
                    .lock()
                    .expect("lock")
                    .iter()
                    .any(|l| l.contains("id=3"))
                && std::fs::read_to_string(&stored).is_ok_and(|s| s.lines().count() == 3)
        })
        .await,
        "jsonl: {:?}\npretty: {:?}\n{}",
        jsonl.lock().expect("lock"),
        pretty.lock().expect("lock"),
        bridge.raw_log()
    );

    // The JSONL tap prints exactly the file sink's lines for the matching events.
    let file = std::fs::read_to_string(&stored).expect("stored");
    let file_edits: Vec<&str> = file
        .lines()
        .filter(|l| l.contains("\"type\":\"edit\""))
        .collect();
    let tapped = jsonl.lock().expect("lock").clone();
    assert_eq!(tapped, file_edits);
    let first: serde_json::Value = serde_json::from_str(&tapped[0]).expect("JSON line");
    assert_eq!(
        (
            &first["feed"],
            &first["type"],
            &first["id"],
            &first["data"],
            &first["seq"]
        ),
        (
            &serde_json::json!("live"),
            &serde_json::json!("edit"),
            &serde_json::json!("1"),
            &serde_json::json!("one"),
            &serde_json::json!(1)
        )
    );
    let pretty_text = pretty.lock().expect("lock").join("\n");
    assert!(
        pretty_text.contains("  live  edit  id=1  seq=1"),
        "{pretty_text}"
    );
    assert!(
        pretty_text.contains("  live  log  id=2  seq=2"),
        "{pretty_text}"
    );
    assert!(pretty_text.contains("    \"x\": 3"), "{pretty_text}");

    // The bridge stops: the taps end cleanly.
    assert_eq!(bridge.exit_code(Duration::from_secs(15)).await, Some(0));
    for tap in [&mut jsonl_tap, &mut pretty_tap] {
        let code = wait_child(tap, Duration::from_secs(10)).await;
        let mut stderr = String::new();
        if let Some(mut e) = tap.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut stderr);
        }
        assert_eq!(code, Some(0), "tap exit; stderr: {stderr}");
        assert!(stderr.contains("closed"), "{stderr}");
    }
}
