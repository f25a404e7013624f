//! `[serve]` inside `run`, and the standalone `serve` command: who may read what (tokens,
//! CORS, unknown feeds), what is logged and counted, and HTTPS. Real parts: the bridge binary
//! reading a real SSE server over TCP into a real SQLite file, clients over real sockets,
//! real signals.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sse_bridge::sse::parser::{Item, Limits, Parser};
use support::bridge::{write_file, Bridge};
use support::server::Server;

/// A token that reads every feed.
const ALL: &str = "all-feeds-0123456789abcdef0123456789";
/// A token that reads `other-*` only.
const OTHER: &str = "other-feeds-0123456789abcdef01234567";
/// A token added by the test, then taken in on SIGHUP.
const LATER: &str = "later-token-0123456789abcdef0123456";

const PAGE: &str = "https://dashboard.example.org";

/// A bridge running `run` with `[serve]` and the admin endpoint.
struct Running {
    bridge: Bridge,
    serve: SocketAddr,
    admin: SocketAddr,
}

fn config(dir: &Path, upstream: &str, tokens: &Path, admin_port: u16) -> PathBuf {
    let text = format!(
        r#"[state]
path = {state:?}
commit_interval = "200ms"

[[feed]]
name = "wiki"
url = "{upstream}"
default_retry = "100ms"

[[feed]]
name = "quiet"
url = "http://127.0.0.1:9/never"
default_retry = "10s"

[sink.db]
type = "sqlite"
path = {db:?}

[routing]
default = ["db"]

[admin]
listen = "127.0.0.1:{admin_port}"

[serve]
listen = "127.0.0.1:0"
cors_origins = ["{PAGE}"]
token_file = {tokens:?}
retry = "200ms"
poll_interval = "20ms"
"#,
        state = dir.join("state.db").display().to_string(),
        db = dir.join("events.db").display().to_string(),
        tokens = tokens.display().to_string(),
    );
    write_file(dir, "bridge.toml", &text)
}

async fn start(dir: &Path, upstream: &str) -> Running {
    let tokens = write_file(
        dir,
        "tokens",
        &format!("# test tokens\n{ALL}\n{OTHER} other-*\n"),
    );
    let admin_port = support::free_port();
    let config = config(dir, upstream, &tokens, admin_port);
    let bridge = Bridge::spawn(&config);
    let line = bridge
        .wait_log("serve listening", Duration::from_secs(30), |l| {
            l.message.contains("serve: listening on http://")
        })
        .await;
    let serve = line
        .message
        .split("listening on http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("serve's address in the log");
    Running {
        bridge,
        serve,
        admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
    }
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.serve)
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// GETs `url` with `headers`; the status, the response headers and, for a non-stream
/// answer, the body.
async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, String) {
    let mut request = client().get(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let h = response.headers().clone();
    let is_stream = h
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let body = if is_stream {
        String::new()
    } else {
        response.text().await.unwrap_or_default()
    };
    (status, h, body)
}

/// Reads events from an SSE response until `n` arrived or `within` passed: (id, type, data).
async fn events(
    response: reqwest::Response,
    n: usize,
    within: Duration,
) -> Vec<(String, String, String)> {
    let mut parser = Parser::new(Limits::default());
    let mut out = Vec::new();
    let mut items = Vec::new();
    let mut response = response;
    let end = tokio::time::Instant::now() + within;
    while out.len() < n {
        let chunk = match tokio::time::timeout_at(end, response.chunk()).await {
            Ok(Ok(Some(c))) => c,
            _ => break,
        };
        items.clear();
        parser.push(&chunk, &mut items).expect("parse");
        for item in items.drain(..) {
            if let Item::Event(e) = item {
                out.push((e.id.to_string(), e.event_type.to_string(), e.data));
            }
        }
    }
    out
}

async fn stream(url: &str, headers: &[(&str, &str)], n: usize) -> Vec<(String, String, String)> {
    let mut request = client().get(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.expect("request");
    assert_eq!(response.status().as_u16(), 200, "{url}");
    events(response, n, Duration::from_secs(20)).await
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_feeds_and_origins_decide_who_reads_what() {
    let upstream = Server::log(30, 10, Duration::from_millis(10)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(dir.path(), &upstream.url()).await;
    let wiki = running.url("/feeds/wiki/events");
    let bearer = format!("Bearer {ALL}");

    // 401 without a token or with a wrong one, naming how to send one.
    let (status, h, body) = get(&wiki, &[]).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        header(&h, "www-authenticate"),
        Some("Bearer realm=\"sse-bridge serve\"")
    );
    assert!(body.contains("access_token"), "{body}");
    let (status, _, _) = get(&format!("{wiki}?access_token=wrong-token-0123456789"), &[]).await;
    assert_eq!(status, 401);
    let (status, _, _) = get(&wiki, &[("authorization", "Bearer wrong-token-0123456789")]).await;
    assert_eq!(status, 401);
    // 403 for a token that may not read the feed; the same token reads its own feeds (a
    // configured feed without events yet is served, not 404).
    let (status, _, body) = get(&wiki, &[("authorization", &format!("Bearer {OTHER}"))]).await;
    assert_eq!(status, 403, "{body}");
    // 404 for a feed that is neither configured nor stored, with a valid token.
    let (status, _, body) = get(
        &running.url("/feeds/wikii/events"),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("wikii"), "{body}");
    let (status, _, _) = get(&running.url("/nowhere"), &[]).await;
    assert_eq!(status, 404);
    // Under `run`, serve's counters are on the admin endpoint, not on serve's port.
    let (status, _, _) = get(&running.url("/metrics"), &[("authorization", &bearer)]).await;
    assert_eq!(status, 404);
    // A configured feed with nothing stored yet is a stream (it is quiet, not a typo).
    let quiet = client()
        .get(running.url("/feeds/quiet/events"))
        .header("authorization", &bearer)
        .send()
        .await
        .expect("request");
    assert_eq!(quiet.status().as_u16(), 200);
    drop(quiet);

    // Every event, in order, with the header token and with the query token.
    let all = stream(&wiki, &[("authorization", &bearer)], 30).await;
    let ids: Vec<String> = all.iter().map(|e| e.0.clone()).collect();
    assert_eq!(ids, (1..=30).map(|n| n.to_string()).collect::<Vec<_>>());
    assert_eq!(all[0].1, support::server::event_type(1));
    let by_query = stream(&format!("{wiki}?access_token={ALL}"), &[], 30).await;
    assert_eq!(by_query, all);
    // Resume after an id: the header, `last_event_id` and `lastEventId`.
    let after_20: Vec<_> = all[20..].to_vec();
    assert_eq!(
        stream(
            &wiki,
            &[("authorization", &bearer), ("last-event-id", "20")],
            10
        )
        .await,
        after_20
    );
    assert_eq!(
        stream(
            &format!("{wiki}?access_token={ALL}&lastEventId=20"),
            &[],
            10
        )
        .await,
        after_20
    );
    assert_eq!(
        stream(
            &format!("{wiki}?access_token={ALL}&last_event_id=20"),
            &[],
            10
        )
        .await,
        after_20
    );

    // CORS: a preflight from the listed origin, and from another; a GET from each.
    let preflight = client()
        .request(reqwest::Method::OPTIONS, &wiki)
        .header("origin", PAGE)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "last-event-id")
        .send()
        .await
        .expect("preflight");
    assert_eq!(preflight.status().as_u16(), 204);
    let h = preflight.headers();
    assert_eq!(header(h, "access-control-allow-origin"), Some(PAGE));
    assert!(header(h, "access-control-allow-headers")
        .unwrap_or_default()
        .contains("Last-Event-ID"));
    assert!(header(h, "vary").unwrap_or_default().contains("Origin"));
    let refused = client()
        .request(reqwest::Method::OPTIONS, &wiki)
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .expect("preflight");
    assert_eq!(refused.status().as_u16(), 403);
    assert!(refused
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    let (status, h, _) = get(&format!("{wiki}?access_token={ALL}"), &[("origin", PAGE)]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "access-control-allow-origin"), Some(PAGE));
    assert_eq!(header(&h, "vary"), Some("Origin"));
    let (status, h, _) = get(
        &format!("{wiki}?access_token={ALL}"),
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(status, 403);
    assert!(h.get("access-control-allow-origin").is_none());
    // A 401 to the listed origin still names it, so the page can see why.
    let (status, h, _) = get(&wiki, &[("origin", PAGE)]).await;
    assert_eq!(status, 401);
    assert_eq!(header(&h, "access-control-allow-origin"), Some(PAGE));

    // SIGHUP re-reads the token file: OTHER is revoked, LATER reads everything.
    write_file(dir.path(), "tokens", &format!("{ALL}\n{LATER}\n"));
    running.bridge.signal(libc::SIGHUP);
    running
        .bridge
        .wait_message(Duration::from_secs(20), "serve: token file read again")
        .await;
    let (status, _, _) = get(
        &format!(
            "{}?access_token={OTHER}",
            running.url("/feeds/other-x/events")
        ),
        &[],
    )
    .await;
    assert_eq!(status, 401, "a revoked token");
    assert_eq!(
        stream(
            &format!("{wiki}?access_token={LATER}&lastEventId=29"),
            &[],
            1
        )
        .await,
        all[29..].to_vec()
    );
    // A broken file keeps the tokens in force.
    write_file(dir.path(), "tokens", "short\n");
    running.bridge.signal(libc::SIGHUP);
    running
        .bridge
        .wait_message(Duration::from_secs(20), "the tokens in force stay")
        .await;
    assert_eq!(
        stream(
            &format!("{wiki}?access_token={LATER}&lastEventId=29"),
            &[],
            1
        )
        .await
        .len(),
        1
    );

    // Counted per feed on the admin endpoint's /metrics, refusals by reason.
    let open = client()
        .get(&wiki)
        .header("authorization", &bearer)
        .send()
        .await
        .expect("request");
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut m = metrics(running.admin).await;
    while !m.contains("sse_bridge_serve_clients{feed=\"wiki\"} 1")
        && tokio::time::Instant::now() < end
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = metrics(running.admin).await;
    }
    assert!(
        m.contains("sse_bridge_serve_clients{feed=\"wiki\"} 1"),
        "{m}"
    );
    drop(open);
    let served = sample(&m, "sse_bridge_serve_events_total{feed=\"wiki\"}");
    // 30 + 30 (header and query token), 3 × 10 (resumes), 2 × 1 (after the reloads).
    assert!(served >= 92.0, "{m}");
    assert!(
        sample(
            &m,
            "sse_bridge_serve_refused_total{reason=\"unauthenticated\"}"
        ) >= 4.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "sse_bridge_serve_refused_total{reason=\"forbidden\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "sse_bridge_serve_refused_total{reason=\"unknown_feed\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "sse_bridge_serve_refused_total{reason=\"origin\"}"),
        2.0,
        "{m}"
    );
    assert!(!m.contains("wikii"), "an unknown feed gets no label");

    // Logged per client at INFO: connect with the resume id and the token's line, the end;
    // no token anywhere in the log.
    let (status, logs) = running.bridge.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    let log: String = logs.iter().map(|l| l.raw.clone() + "\n").collect();
    let field = |l: &support::bridge::LogLine, k: &str| l.fields[k].as_str().map(str::to_string);
    assert!(
        logs.iter().any(|l| l.message == "client connected"
            && l.level == "INFO"
            && field(l, "resume_after").as_deref() == Some("\"20\"")
            && field(l, "token").as_deref() == Some("line 2")
            && field(l, "client").is_some_and(|c| c.starts_with("127.0.0.1:"))),
        "{log}"
    );
    assert!(
        logs.iter()
            .any(|l| l.message == "client disconnected" && l.level == "INFO"),
        "{log}"
    );
    assert!(log.contains("refused a request: no token"), "{log}");
    for token in [ALL, OTHER, LATER] {
        assert!(!log.contains(token), "a token was logged: {log}");
    }
}

async fn metrics(admin: SocketAddr) -> String {
    let response = client().get(format!("http://{admin}/metrics")).send().await;
    match response {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => format!("no /metrics: {e}"),
    }
}

/// PEM text of one DER item.
fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_command_serves_https_with_the_same_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("events.db");
    {
        let mut conn = support::raw_events_db(&db);
        let events: Vec<_> = (1..=5u64)
            .map(|n| {
                let data = format!("{{\"n\":{n}}}");
                sse_bridge::event::Event::new("wiki", "edit", &format!("é-{n}"), data, n)
            })
            .collect();
        support::insert_events(
            &mut conn,
            events.iter().map(|e| (e, "2026-12-03T08:00:00.000000Z")),
        );
    }
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("certificate");
    let cert_file = write_file(dir.path(), "cert.pem", &pem("CERTIFICATE", cert.der()));
    let key_file = write_file(
        dir.path(),
        "key.pem",
        &pem("PRIVATE KEY", &key_pair.serialize_der()),
    );
    let tokens = write_file(dir.path(), "tokens", &format!("{ALL}\n{OTHER} wiki\n"));
    let mut command = Bridge::command(&["serve"]);
    command
        .arg(&db)
        .args(["--listen", "127.0.0.1:0", "--feed", "later"])
        .args(["--header-timeout", "1s"])
        .arg("--tls-cert")
        .arg(&cert_file)
        .arg("--tls-key")
        .arg(&key_file)
        .arg("--token-file")
        .arg(&tokens);
    let served = Bridge::spawn_command(command, &db);
    let line = served
        .wait_log("serve listening", Duration::from_secs(30), |l| {
            l.message.contains("listening on https://")
        })
        .await;
    let addr: SocketAddr = line
        .message
        .split("listening on https://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("address");
    let trusted = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_der(cert.der()).expect("der"))
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let url = format!("https://localhost:{}/feeds/wiki/events", addr.port());
    let response = trusted
        .get(format!("{url}?access_token={ALL}"))
        .send()
        .await
        .expect("https request");
    assert_eq!(response.status().as_u16(), 200);
    let got = events(response, 5, Duration::from_secs(20)).await;
    assert_eq!(
        got.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        ["é-1", "é-2", "é-3", "é-4", "é-5"]
    );
    // The same rules as under `run`: 401, 403 (OTHER reads `wiki` only), 404; `later` is
    // declared with --feed, so it is served before it has events.
    let status = |path: String| {
        let trusted = trusted.clone();
        async move {
            trusted
                .get(path)
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(url.clone()).await, 401);
    let base = format!("https://localhost:{}", addr.port());
    assert_eq!(
        status(format!("{base}/feeds/later/events?access_token={OTHER}")).await,
        403
    );
    assert_eq!(
        status(format!("{base}/feeds/later/events?access_token={ALL}")).await,
        200
    );
    assert_eq!(
        status(format!("{base}/feeds/nope/events?access_token={ALL}")).await,
        404
    );
    // Hostile requests: a huge ?type= pattern, a huge feed name (never echoed whole).
    let long_type = "a".repeat(2_000);
    assert_eq!(
        status(format!(
            "{base}/feeds/wiki/events?access_token={ALL}&type={long_type}"
        ))
        .await,
        400
    );
    let long_feed = "f".repeat(5_000);
    let answer = trusted
        .get(format!(
            "{base}/feeds/{long_feed}/events?access_token={ALL}"
        ))
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status().as_u16(), 404);
    let body = answer.text().await.expect("body");
    assert!(body.len() < 400, "{} bytes echoed", body.len());
    // A peer that opens a connection and never starts the TLS handshake is closed after
    // the header timeout (1 s here), not held.
    let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        idle.read(&mut buf).await
    })
    .await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    // Plain HTTP to the TLS port gets no answer; /metrics needs a token too.
    let err = client()
        .get(format!("http://{addr}/feeds/wiki/events"))
        .send()
        .await
        .expect_err("plain HTTP to the HTTPS port");
    assert!(
        !err.is_connect(),
        "the port accepts, the request fails: {err}"
    );
    assert_eq!(status(format!("{base}/metrics")).await, 401);
    // /metrics names every feed: a token for some feeds only may not read it.
    assert_eq!(
        status(format!("{base}/metrics?access_token={OTHER}")).await,
        403
    );
    // A resume id is whatever the stream sent, UTF-8 included (browsers send it as such).
    let resumed = trusted
        .get(format!("{base}/feeds/wiki/events?access_token={ALL}"))
        .header(
            "last-event-id",
            reqwest::header::HeaderValue::from_bytes("é-3".as_bytes()).expect("header"),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(resumed.status().as_u16(), 200);
    let after: Vec<String> = events(resumed, 2, Duration::from_secs(20))
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(after, ["é-4", "é-5"]);
    let page = trusted
        .get(format!("{base}/metrics"))
        .bearer_auth(ALL)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        page.contains("sse_bridge_serve_events_total{feed=\"wiki\"} 7"),
        "{page}"
    );
}

#[test]
fn bad_serve_settings_name_the_key_and_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = r#"
[[feed]]
name = "wiki"
url = "http://127.0.0.1:9/"

[sink.files]
type = "file"
path = "out/{feed}.jsonl"

[serve]
cors_origins = ["https://a.example/"]
tls_cert = "cert.pem"
"#;
    let config = write_file(dir.path(), "bad.toml", text);
    let out = support::command(["validate", "-c", config.to_str().expect("utf-8")])
        .output()
        .expect("run");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    for expected in [
        "bad.toml",
        "serve.cors_origins[0]",
        "write \"https://a.example\"",
        "serve.tls_key",
        "serve.sink",
    ] {
        assert!(text.contains(expected), "{expected}: {text}");
    }
}
