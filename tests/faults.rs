//! Proof under fire: the real `sse-bridge` binary, a file sink, and a resumable SSE server on
//! 127.0.0.1 that sabotages chosen connections (`support/server.rs`). Each test injects one
//! fault and checks, from outside the process:
//!
//! - the feed's state and error message, as its JSON logs announce them (`connected to`:
//!   open; a failure with `reconnecting in`: connecting; `stopped until restarted`: stopped);
//! - the recovery: which requests the server saw, with which `Last-Event-ID`, how far apart;
//! - delivery: the JSON Lines file holds every event the server sent, before and after the
//!   fault, once and in order (plus exactly the events the standard makes of injected bytes),
//!   and the committed checkpoint never passed an event that was not stored (sampled all along
//!   the run).
//!
//! tests/eventsource.rs covers the same faults at the client level with exact timings; here the
//! point is end-to-end delivery through the sinks. Timings are short (100 ms retry, 500 ms idle
//! timeout) so the whole file runs in seconds; every wait is on a condition with a deadline (the
//! only fixed sleeps are windows in which something must NOT happen).

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::{Rng, SeedableRng};
use support::bridge;
use support::bridge::{checkpoint, line_count, read_jsonl, Bridge, LogLine, Seen, Stored};
use support::server::{Fault, Options, Record, Reply, Server};
use support::{archive_sink, event_type, state_section, wait_for, write_file};

const FEED: &str = "wiki";
/// Events in the server's log.
const N: u64 = 400;
/// Events served before the fault.
const K: u64 = 120;
/// Deadline for anything that should happen promptly.
const WAIT: Duration = Duration::from_secs(20);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The data of log event `n`, as `support::event_text` sends it.
fn log_data(n: u64) -> String {
    format!("{{\"n\":{n},\"title\":\"Page {n}\",\"comment\":\"résumé ✓\"}}")
}

/// A bridge configuration in a temporary directory.
struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    out: PathBuf,
    state: PathBuf,
}

/// The `[[feed]]` keys every test starts from; `overrides` replace or add keys (values are
/// TOML).
fn setup(url: &str, overrides: &[(&str, &str)]) -> Setup {
    let mut keys: BTreeMap<&str, String> = BTreeMap::new();
    keys.insert("default_retry", "\"100ms\"".into());
    keys.insert("idle_timeout", "\"500ms\"".into());
    keys.insert("connect_timeout", "\"300ms\"".into());
    keys.insert("response_timeout", "\"500ms\"".into());
    keys.insert("client_error_delay", "\"500ms\"".into());
    keys.insert("max_redirects", "3".into());
    keys.insert(
        "backoff",
        "{ initial = \"100ms\", max = \"300ms\", multiplier = 2.0, jitter = 0.2, reset_after = \"60s\" }".into(),
    );
    for (k, v) in overrides {
        keys.insert(k, v.to_string());
    }
    let feed_keys: String = keys.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    let text = format!(
        r#"
{state}

[shutdown]
timeout = "10s"

[[feed]]
name = "{FEED}"
url = "{url}"
{feed_keys}
{archive}

[[route]]
event = "*"
sinks = ["archive"]
"#,
        state = state_section(&d, "100ms"),
        archive = archive_sink(&d),
    );
    let config = write_file(&d, "bridge.toml", &text);
    Setup {
        out: d.join(format!("events/{FEED}.jsonl")),
        state: d.join("state.db"),
        config,
        _dir: dir,
    }
}

/// Samples, all along a run, that the committed checkpoint never covers an event the file
/// does not hold (seqs are contiguous from 1 in the file, so "stored" is a line count).
struct Monitor {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, Vec<String>)>,
}

impl Monitor {
    fn start(s: &Setup) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let (state, out, flag) = (s.state.clone(), s.out.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut samples = 0;
            let mut violations = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Some((id, seq)) = checkpoint(&state, FEED) {
                    let stored = line_count(&out) as u64;
                    samples += 1;
                    if seq > stored {
                        violations.push(format!(
                            "checkpoint seq {seq} (id {id}) with only {stored} events stored"
                        ));
                    }
                }
                std::thread::sleep(ms(20));
            }
            (samples, violations)
        });
        Monitor { stop, thread }
    }

    /// Stops sampling; panics if the checkpoint was ever ahead of storage.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let (samples, violations) = self.thread.join().expect("monitor");
        assert!(
            violations.is_empty(),
            "the checkpoint ran ahead of storage: {violations:?}"
        );
        samples
    }
}

/// Waits until the file holds `lines` events and the checkpoint reached `seq`.
async fn wait_stored(s: &Setup, bridge: &Bridge, lines: usize, seq: u64) {
    let ok = wait_for(WAIT, || {
        line_count(&s.out) >= lines && checkpoint(&s.state, FEED).is_some_and(|c| c.1 >= seq)
    })
    .await;
    assert!(
        ok,
        "stored {} of {lines} events, checkpoint {:?} (want seq {seq}); log:\n{}",
        line_count(&s.out),
        checkpoint(&s.state, FEED),
        bridge.log_text()
    );
}

/// Stops the bridge with SIGTERM: exit 0 within the deadline.
async fn stop(bridge: Bridge) -> Vec<LogLine> {
    let (status, logs) = bridge.terminate(Duration::from_secs(15)).await;
    let text: Vec<String> = logs.iter().map(LogLine::show).collect();
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM; log:\n{text:#?}"
    );
    assert!(
        !logs.iter().any(|l| l.message.contains("panicked")),
        "a panic in the log:\n{text:#?}"
    );
    logs
}

/// Checks the stored file: seqs `1..` contiguous in file order (nothing lost, duplicated or
/// reordered), every log event `1..=N` exactly once and in order with its id, type and data,
/// and returns the other events (what the standard makes of injected bytes).
fn assert_delivered(s: &Setup) -> Vec<Stored> {
    let stored = read_jsonl(&s.out);
    let mut extras = Vec::new();
    let mut next_log = 1u64;
    for (i, e) in stored.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "seq of line {}: {e:?}", i + 1);
        assert_eq!(e.feed, FEED);
        let is_log =
            e.id.parse::<u64>()
                .ok()
                .is_some_and(|n| e.data == log_data(n));
        if is_log {
            let n: u64 = e.id.parse().expect("numeric id");
            assert_eq!(
                n,
                next_log,
                "line {}: log event {n} where {next_log} was due (lost, duplicated or reordered)",
                i + 1
            );
            assert_eq!(e.event_type, event_type(n), "type of event {n}");
            next_log += 1;
        } else {
            extras.push(e.clone());
        }
    }
    assert_eq!(
        next_log,
        N + 1,
        "log events stored: {} of {N}",
        next_log - 1
    );
    extras
}

/// The final checkpoint: the last log event, at the last seq.
fn assert_final_checkpoint(s: &Setup, seq: u64) {
    assert_eq!(
        checkpoint(&s.state, FEED),
        Some((N.to_string(), seq)),
        "final checkpoint"
    );
}

fn ids(requests: &[Record]) -> Vec<Option<&str>> {
    requests
        .iter()
        .map(|r| r.last_event_id.as_deref())
        .collect()
}

/// The feed's failure lines (WARN/ERROR and the INFO of an EOF), in order.
fn failures(logs: &[LogLine]) -> Vec<LogLine> {
    logs.iter()
        .filter(|l| l.feed.as_deref() == Some(FEED) && Seen::of(l) == Some(Seen::Connecting))
        .cloned()
        .collect()
}

fn states(logs: &[LogLine]) -> Vec<Seen> {
    bridge::states(logs, FEED)
}

/// What [`run_to_completion`] saw.
struct Outcome {
    requests: Vec<Record>,
    logs: Vec<LogLine>,
    extras: Vec<Stored>,
    peak_rss: Option<u64>,
}

/// The common shape of a test: start the bridge on a server that sabotages some requests,
/// wait until all `N` log events (plus `extra` others) are stored and committed, stop with
/// SIGTERM (exit 0), and check delivery: every log event once and in order, exactly `extra`
/// other events, the checkpoint never ahead of the file and finally at the last event.
async fn run_to_completion(server: &Server, s: &Setup, extra: u64) -> Outcome {
    let monitor = Monitor::start(s);
    let bridge = Bridge::spawn(&s.config);
    wait_stored(s, &bridge, (N + extra) as usize, N + extra).await;
    let peak_rss = bridge.peak_rss();
    let requests = server.requests();
    let logs = stop(bridge).await;
    let samples = monitor.finish();
    assert!(samples > 0, "the checkpoint was never sampled");
    let extras = assert_delivered(s);
    assert_eq!(extras.len() as u64, extra, "extra events: {extras:?}");
    assert_final_checkpoint(s, N + extra);
    for l in failures(&logs) {
        eprintln!("  {}", l.show());
    }
    Outcome {
        requests,
        logs,
        extras,
        peak_rss,
    }
}

fn show(logs: &[LogLine]) -> String {
    logs.iter()
        .map(LogLine::show)
        .collect::<Vec<_>>()
        .join("\n")
}

/// One fault case: what the server's plan does, and what the bridge must make of it.
struct Case {
    /// The requests' `Last-Event-ID`s, in order (`None`: not checked).
    ids: Option<&'static [Option<&'static str>]>,
    /// The feed's states as its log announces them (`None`: not checked).
    states: Option<&'static [Seen]>,
    /// How many failures the feed logs.
    failures: usize,
    /// Every failure from this one on is logged at `level` and says each of `says`.
    from: usize,
    level: &'static str,
    says: &'static [&'static str],
}

const RESUMED: &[Option<&str>] = &[None, Some("120")];
const RETRIED: &[Option<&str>] = &[None, Some("120"), Some("120")];
const ONE_RECONNECT: &[Seen] = &[Seen::Open, Seen::Connecting, Seen::Open, Seen::Closed];

/// Runs the log through `server` to the end and checks `case`; returns what was seen for the
/// checks particular to the fault.
async fn run_case(server: &Server, case: Case) -> Outcome {
    let s = setup(&server.url(), &[]);
    let o = run_to_completion(server, &s, 0).await;
    if let Some(want) = case.ids {
        assert_eq!(ids(&o.requests), want, "{:?}", o.requests);
    }
    if let Some(want) = case.states {
        assert_eq!(states(&o.logs), want);
    }
    let f = failures(&o.logs);
    assert_eq!(f.len(), case.failures, "{}", show(&o.logs));
    for l in &f[case.from..] {
        assert_eq!(l.level, case.level, "{}", l.message);
        for said in case.says {
            assert!(l.message.contains(said), "{said:?} in {}", l.message);
        }
    }
    o
}

// ---------------------------------------------------------------------------------------------
// Broken connections.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_mid_event_resumes_after_the_last_whole_event() {
    let server = Server::scripted(N, vec![Fault::Reset { after: K }]).await;
    // The half event (whose `id: 121` line had arrived) was discarded: the resume is from 120.
    let case = Case {
        ids: Some(RESUMED),
        states: Some(ONE_RECONNECT),
        failures: 1,
        from: 0,
        level: "WARN",
        says: &["connection broken while reading the stream"],
    };
    let o = run_case(&server, case).await;
    let f = failures(&o.logs);
    assert!(f[0].message.starts_with(&format!("feed `{FEED}`: GET ")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_eof_mid_event_discards_the_half_event_and_resumes() {
    let server = Server::scripted(N, vec![Fault::Eof { after: K }]).await;
    // The end of a stream is routine for servers: reported at info, not as a problem.
    let case = Case {
        ids: Some(RESUMED),
        states: Some(ONE_RECONNECT),
        failures: 1,
        from: 0,
        level: "INFO",
        says: &["the server ended the stream (EOF)"],
    };
    let o = run_case(&server, case).await;
    assert!(o
        .logs
        .iter()
        .all(|l| l.level != "WARN" && l.level != "ERROR"));
}

// ---------------------------------------------------------------------------------------------
// Hostile bytes.

/// Bytes that are not an event stream, on an open stream between two events: a line of
/// control bytes without a colon, NULs in a comment, in a field name, in an `id:` (ignored),
/// in `data:` (kept), a bad `retry:`, seeded random binary lines, lone CRs.
fn garbage() -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut random = Vec::new();
    for _ in 0..20 {
        let len = rng.gen_range(1..200);
        // Any byte but CR and LF, and a first byte that cannot start a known field name.
        let mut line: Vec<u8> = (0..len)
            .map(|_| loop {
                let b: u8 = rng.gen();
                if b != b'\r' && b != b'\n' {
                    break b;
                }
            })
            .collect();
        line[0] = 0xFF;
        random.extend_from_slice(&line);
        random.push(b'\n');
    }
    random.extend_from_slice(b"\n");
    vec![
        b"\x01\x02\x7f\xff\xfe garbage without a colon\n".to_vec(),
        b":\x00 a comment with a NUL\n\x00\x00\x00\nretry: 12x\n".to_vec(),
        b"id: 99\x00bad\n".to_vec(),
        b"data: nul\x00inside\n\n".to_vec(),
        random,
        b"data: lone\rdata: crs\r\r".to_vec(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_nul_bytes_are_parsed_as_the_standard_says_without_a_reconnect() {
    let server = Server::scripted(
        N,
        vec![Fault::Inject {
            after: K,
            writes: garbage(),
        }],
    )
    .await;
    let s = setup(&server.url(), &[]);
    let o = run_to_completion(&server, &s, 2).await;

    // Nothing in there breaks the stream: one connection, no error.
    assert_eq!(o.requests.len(), 1, "{:?}", o.requests);
    assert_eq!(states(&o.logs), [Seen::Open, Seen::Closed]);
    assert!(
        o.logs
            .iter()
            .all(|l| l.level != "WARN" && l.level != "ERROR"),
        "{}",
        show(&o.logs)
    );
    // Exactly two events come out of the garbage, between log events 120 and 121, with the
    // last event ID unchanged (the `id:` with a NUL is ignored).
    let e = &o.extras;
    assert_eq!(
        (
            e[0].event_type.as_str(),
            e[0].data.as_str(),
            e[0].id.as_str(),
            e[0].seq
        ),
        ("message", "nul\u{0}inside", "120", K + 1)
    );
    assert_eq!(
        (
            e[1].event_type.as_str(),
            e[1].data.as_str(),
            e[1].id.as_str(),
            e[1].seq
        ),
        ("message", "lone\ncrs", "120", K + 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_is_replaced_even_when_split_across_reads() {
    // `é` is split across two writes (valid once joined); the rest is invalid for good.
    let writes: Vec<Vec<u8>> = vec![
        b": comment \xff\xfe\nevent: bad\xffutf\ndata: caf\xc3".to_vec(),
        b"\xa9 split".to_vec(),
        b" bad \xc3\x28 \xed\xa0\x80 end\nunknown\xff: x\n\n".to_vec(),
    ];
    let data_bytes = b"caf\xc3\xa9 split bad \xc3\x28 \xed\xa0\x80 end";
    let server = Server::scripted(N, vec![Fault::Inject { after: K, writes }]).await;
    let s = setup(&server.url(), &[]);
    let o = run_to_completion(&server, &s, 1).await;

    assert_eq!(o.requests.len(), 1, "{:?}", o.requests);
    assert!(
        o.logs
            .iter()
            .all(|l| l.level != "WARN" && l.level != "ERROR"),
        "{}",
        show(&o.logs)
    );
    let e = &o.extras[0];
    assert_eq!(e.event_type, "bad\u{FFFD}utf");
    assert_eq!(e.data, String::from_utf8_lossy(data_bytes));
    assert!(
        e.data.starts_with("café split bad \u{FFFD}( "),
        "{:?}",
        e.data
    );
    assert_eq!((e.id.as_str(), e.seq), ("120", K + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_line_is_refused_with_its_size_and_memory_stays_bounded() {
    const SIZE: usize = 100 * 1024 * 1024;
    let server = Server::scripted(
        N,
        vec![Fault::GiantLine {
            after: K,
            size: SIZE,
        }],
    )
    .await;
    // Refused once past max_event_size (1 MiB by default): the line is not read to its end.
    let case = Case {
        ids: Some(RESUMED),
        states: None,
        failures: 1,
        from: 0,
        level: "ERROR",
        says: &[
            "exceeds the limit of 1048576 bytes (max_event_size)",
            "resumes from last event ID `120`",
        ],
    };
    let o = run_case(&server, case).await;
    let f = failures(&o.logs);
    let m = &f[0].message;
    assert!(m.starts_with(&format!("feed `{FEED}`: GET ")), "{m}");
    let size: u64 = m
        .split("a line of at least ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in {m}"));
    assert!(size > 1_048_576, "{m}");
    assert!(
        o.requests[0].bytes_sent < SIZE as u64,
        "the server wrote the whole line ({} bytes): the bridge kept reading",
        o.requests[0].bytes_sent
    );
    let peak = o.peak_rss.expect("VmHWM of the bridge");
    assert!(
        peak < 64 * 1024 * 1024,
        "the bridge peaked at {} MiB",
        peak / 1024 / 1024
    );
    eprintln!(
        "100 MB line: refused at {size} bytes; the server got {} bytes out; bridge peak RSS {} MiB",
        o.requests[0].bytes_sent,
        peak / 1024 / 1024
    );
}

// ---------------------------------------------------------------------------------------------
// Slow and silent servers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drip_of_one_byte_per_second_never_trips_the_idle_timeout() {
    // 6 bytes at 1 byte/s: 6 s for one event, three times the idle timeout, yet every gap
    // between bytes is shorter than it.
    let server = Server::scripted(
        N,
        vec![Fault::Drip {
            after: K,
            bytes: 6,
            every: Duration::from_secs(1),
        }],
    )
    .await;
    let s = setup(&server.url(), &[("idle_timeout", "\"2s\"")]);
    let o = run_to_completion(&server, &s, 0).await;

    assert_eq!(o.requests.len(), 1, "{:?}", o.requests);
    assert_eq!(states(&o.logs), [Seen::Open, Seen::Closed]);
    assert!(
        o.logs
            .iter()
            .all(|l| l.level != "WARN" && l.level != "ERROR"),
        "{}",
        show(&o.logs)
    );
    let stored = read_jsonl(&s.out);
    let at = |i: usize| {
        chrono::DateTime::parse_from_rfc3339(&stored[i].received_at).expect("received_at")
    };
    let dripped = (at(K as usize) - at(K as usize - 1))
        .to_std()
        .expect("ordered");
    assert!(dripped >= ms(5500), "event 121 took only {dripped:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_then_silence_trips_the_idle_timeout_and_the_feed_resumes() {
    let server = Server::scripted(
        N,
        vec![Fault::Silence { after: 0 }, Fault::Silence { after: K }],
    )
    .await;
    let case = Case {
        ids: Some(&[None, None, Some("120")]),
        states: Some(&[
            Seen::Open,
            Seen::Connecting,
            Seen::Open,
            Seen::Connecting,
            Seen::Open,
            Seen::Closed,
        ]),
        failures: 2,
        from: 0,
        level: "WARN",
        says: &[
            "feed `wiki`",
            "idle timeout: no bytes for 500ms (idle_timeout)",
        ],
    };
    let o = run_case(&server, case).await;
    let r = &o.requests;
    // Silence for the idle timeout (500 ms), then at least the 100 ms retry.
    assert!(r[1].at - r[0].at >= ms(600), "{:?}", r[1].at - r[0].at);
    assert!(r[2].at - r[1].at >= ms(600), "{:?}", r[2].at - r[1].at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_accepts_and_never_answers_hits_the_header_timeout() {
    let server = Server::scripted(N, vec![Fault::Eof { after: K }, Fault::NeverAnswer]).await;
    let case = Case {
        ids: Some(RETRIED),
        states: Some(ONE_RECONNECT),
        failures: 2,
        from: 1,
        level: "WARN",
        says: &[
            "feed `wiki`",
            "timed out: no response headers within 800ms (connect_timeout 300ms + response_timeout 500ms)",
        ],
    };
    let o = run_case(&server, case).await;
    let r = &o.requests;
    // connect_timeout 300 ms + response_timeout 500 ms, then the backoff.
    assert!(r[2].at - r[1].at >= ms(800), "{:?}", r[2].at - r[1].at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_accepts_hits_the_connect_timeout() {
    // A listener whose accept queue is full: the kernel drops the bridge's SYNs, so the TCP
    // connection itself never completes.
    let server = Server::start(
        Options {
            accept_paused: true,
            ..Options::log(N)
        },
        |_| Fault::Normal,
    )
    .await;
    server.fill_accept_queue().await;
    let s = setup(&server.url(), &[]);
    let monitor = Monitor::start(&s);
    let bridge = Bridge::spawn(&s.config);
    // Two attempts in a row time out (the feed keeps trying, with backoff); then the server
    // starts accepting.
    bridge
        .wait_logs("two connect timeouts", WAIT, 2, |l| {
            l.feed.as_deref() == Some(FEED)
                && l.message
                    .contains("timed out connecting (connect_timeout 300ms)")
        })
        .await;
    server.start_accepting();
    wait_stored(&s, &bridge, N as usize, N).await;
    let logs = stop(bridge).await;
    monitor.finish();

    let f = failures(&logs);
    assert!(!f.is_empty(), "{}", show(&logs));
    for l in &f {
        assert_eq!(l.level, "WARN");
        assert!(
            l.message.starts_with(&format!("feed `{FEED}`: GET "))
                && l.message
                    .contains("timed out connecting (connect_timeout 300ms)"),
            "{}",
            l.message
        );
    }
    // No HTTP request got through before the server accepted; then one, from the start.
    assert_eq!(ids(&server.requests()), [None], "{:?}", server.requests());
    assert_eq!(states(&logs), [Seen::Connecting, Seen::Open, Seen::Closed]);
    assert!(assert_delivered(&s).is_empty());
    assert_final_checkpoint(&s, N);
    eprintln!("  {} connect timeouts: {}", f.len(), f[0].show());
}

// ---------------------------------------------------------------------------------------------
// Answers other than an event stream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_500s_backs_off_to_the_cap_without_a_hot_loop() {
    const STORM: usize = 8;
    let mut plan = vec![Fault::Eof { after: K }];
    plan.extend((0..STORM).map(|_| Fault::status(500, "Internal Server Error")));
    let server = Server::scripted(N, plan).await;
    let s = setup(&server.url(), &[]);
    let o = run_to_completion(&server, &s, 0).await;

    // Counted: the first connection, the storm, one successful reconnection. Nothing more.
    let r = &o.requests;
    assert_eq!(r.len(), STORM + 2, "{r:?}");
    assert!(
        r[1..]
            .iter()
            .all(|x| x.last_event_id.as_deref() == Some("120")),
        "{r:?}"
    );
    // Delays measured at the server: the reconnection time (100 ms) after the EOF, which ended a
    // stream that delivered events (a routine close: no failure, the count starts over), then
    // the storm backs off: at least 100, 200, then the 300 ms cap (jitter only adds).
    for i in 1..r.len() {
        let want = if i == 1 {
            ms(100)
        } else {
            ms((100u64 << (i - 2)).min(300))
        };
        let gap = r[i - 1].gap_to(&r[i]);
        assert!(gap >= want, "delay before request {i}: {gap:?} < {want:?}");
        if i >= 5 {
            // Uncapped, this one would wait 1.6 s or more.
            assert!(
                gap < ms(1100),
                "delay before request {i}: {gap:?}: not capped"
            );
        }
    }
    let storm = r[STORM + 1].at - r[1].at;
    assert!(
        storm >= ms(100 + 200 + 300 * 6),
        "{STORM} attempts in {storm:?}"
    );
    // The log tells each one, with the delay it chose: growing, capped at 300 ms + 20 % jitter.
    let f = failures(&o.logs);
    assert_eq!(f.len(), STORM + 1, "{}", show(&o.logs));
    let delays: Vec<u64> = f
        .iter()
        .map(|l| l.fields["delay_ms"].as_u64().expect("delay_ms"))
        .collect();
    for (i, l) in f[1..].iter().enumerate() {
        assert_eq!(l.level, "WARN");
        assert!(
            l.message
                .contains("HTTP 500 Internal Server Error; reconnecting in"),
            "{}",
            l.message
        );
        assert_eq!(l.fields["failures"].as_u64(), Some(i as u64 + 1));
    }
    assert_eq!(
        f[0].fields["failures"].as_u64(),
        Some(0),
        "the routine close"
    );
    assert!(delays.iter().all(|&d| d <= 360), "{delays:?}");
    assert!(delays[3..].iter().all(|&d| d >= 300), "{delays:?}");
    eprintln!(
        "500 storm: {} requests; delays chosen {delays:?} ms",
        r.len()
    );
}

/// A server rejecting the stored ID (410 Gone): the feed reconnects without it and `gaps`
/// names the rejected ID in its LAST-EVENT-ID column (and `last_event_id` with `--json`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_id_is_shown_in_the_gaps_last_event_id_column() {
    let server = Server::scripted(
        N,
        vec![
            Fault::Eof { after: K },
            Fault::status(410, "Gone"),
            Fault::Reply(Reply::sse().send("id: fresh-1\ndata: new\n\n").hang()),
        ],
    )
    .await;
    let s = setup(&server.url(), &[]);
    let bridge = Bridge::spawn(&s.config);
    wait_stored(&s, &bridge, K as usize + 1, K + 1).await;
    stop(bridge).await;
    assert_eq!(ids(&server.requests()), [None, Some("120"), None]);
    let gaps = |json: bool| {
        let mut cmd = std::process::Command::new(support::bin());
        cmd.args(["gaps", "-c"]).arg(&s.config);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().expect("run gaps");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = gaps(false);
    let row = table
        .lines()
        .find(|l| l.contains("id-rejected"))
        .unwrap_or_else(|| panic!("no id-rejected row:\n{table}"));
    let header = table.lines().next().unwrap_or_default();
    let column = header.find("LAST-EVENT-ID").expect("the column");
    assert_eq!(
        row.get(column..).and_then(|r| r.split_whitespace().next()),
        Some("120"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(gaps(true).lines().next().unwrap_or_default()).expect("json");
    assert_eq!(json["reason"], "id-rejected");
    assert_eq!(json["last_event_id"], "120");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_with_retry_after_seconds_is_honoured() {
    let server = Server::scripted(
        N,
        vec![
            Fault::Eof { after: K },
            Fault::status(429, "Too Many Requests").with_header("Retry-After", "1"),
        ],
    )
    .await;
    let case = Case {
        ids: Some(RETRIED),
        states: None,
        failures: 2,
        from: 1,
        level: "WARN",
        says: &["HTTP 429 Too Many Requests, Retry-After 1s; reconnecting in"],
    };
    let o = run_case(&server, case).await;
    let r = &o.requests;
    assert!(r[1].gap_to(&r[2]) >= ms(1000), "{:?}", r[1].gap_to(&r[2]));
    let f = failures(&o.logs);
    assert!(f[1].fields["delay_ms"].as_u64() >= Some(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_unavailable_with_a_retry_after_date_is_honoured() {
    let server = Server::start(Options::log(N), |r| match r.index {
        0 => Fault::Eof { after: K },
        1 => {
            let at = SystemTime::now() + Duration::from_secs(3);
            Fault::status(503, "Service Unavailable")
                .with_header("Retry-After", &httpdate::fmt_http_date(at))
        }
        _ => Fault::Normal,
    })
    .await;
    let case = Case {
        ids: Some(RETRIED),
        states: None,
        failures: 2,
        from: 2,
        level: "WARN",
        says: &[],
    };
    let o = run_case(&server, case).await;
    let r = &o.requests;
    // An HTTP date has whole seconds: "3 s from now" is 2 to 3 s away.
    assert!(r[1].gap_to(&r[2]) >= ms(1800), "{:?}", r[1].gap_to(&r[2]));
    let f = failures(&o.logs);
    // Shown to the millisecond: "Retry-After 1s 185ms", not nanoseconds.
    let m = &f[1].message;
    let shown = m
        .split("HTTP 503 Service Unavailable, Retry-After ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("{m}"));
    assert!(
        (shown.starts_with("1s 9") || shown.starts_with("2s"))
            && !shown.contains("us")
            && !shown.contains("ns"),
        "{m}"
    );
    assert!(f[1].fields["delay_ms"].as_u64() >= Some(1900));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_content_stops_the_feed_until_a_restart_resumes_it() {
    let server = Server::scripted(
        N,
        vec![Fault::Eof { after: K }, Fault::status(204, "No Content")],
    )
    .await;
    let s = setup(&server.url(), &[]);
    let monitor = Monitor::start(&s);
    let bridge = Bridge::spawn(&s.config);
    let stopped = bridge
        .wait_log("the feed stopped", WAIT, |l| {
            l.message.ends_with("the feed is stopped until restarted")
        })
        .await;
    assert_eq!(stopped.level, "ERROR");
    assert!(
        stopped.message.contains(&format!("feed `{FEED}`"))
            && stopped
                .message
                .contains("HTTP 204 No Content: the server asks the client to stop reconnecting"),
        "{}",
        stopped.message
    );
    wait_stored(&s, &bridge, K as usize, K).await;
    // Stopped means stopped: no request for ten reconnection delays.
    tokio::time::sleep(ms(1000)).await;
    assert_eq!(server.requests().len(), 2, "{:?}", server.requests());
    let logs = stop(bridge).await;
    assert_eq!(
        states(&logs),
        [Seen::Open, Seen::Connecting, Seen::Stopped, Seen::Closed]
    );
    assert_eq!(checkpoint(&s.state, FEED), Some((K.to_string(), K)));

    // A restart (the operator's reset) resumes from the checkpoint.
    let bridge = Bridge::spawn(&s.config);
    wait_stored(&s, &bridge, N as usize, N).await;
    let logs = stop(bridge).await;
    monitor.finish();
    assert_eq!(states(&logs), [Seen::Open, Seen::Closed]);
    assert_eq!(
        ids(&server.requests()),
        [None, Some("120"), Some("120")],
        "{:?}",
        server.requests()
    );
    assert!(assert_delivered(&s).is_empty());
    assert_final_checkpoint(&s, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_content_type_is_retried_slowly_and_loudly() {
    let server = Server::scripted(
        N,
        vec![
            Fault::Eof { after: K },
            Fault::response(
                200,
                "OK",
                &[("Content-Type", "text/html; charset=utf-8")],
                "<html><body>data: not an event\n\n</body></html>",
            ),
        ],
    )
    .await;
    let case = Case {
        ids: Some(RETRIED),
        states: Some(ONE_RECONNECT),
        failures: 2,
        from: 1,
        level: "ERROR",
        says: &[
            "feed `wiki`",
            "HTTP 200 OK with Content-Type `text/html; charset=utf-8`, not text/event-stream",
            "(on_client_error = \"retry\")",
        ],
    };
    let o = run_case(&server, case).await;
    let r = &o.requests;
    // client_error_delay (500 ms), not the 100 ms retry.
    assert!(r[1].gap_to(&r[2]) >= ms(500), "{:?}", r[1].gap_to(&r[2]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_loop_is_refused_and_retried_slowly() {
    // /stream: first served (then EOF), then two attempts redirected into a loop, then fixed.
    // /loop redirects to itself, for ever.
    let server = Server::start(Options::log(N), |r| {
        let to_loop = Fault::status(302, "Found").with_header("Location", "/loop");
        match (r.path.as_str(), r.nth_on_path) {
            ("/stream", 0) => Fault::Eof { after: K },
            ("/stream", 1 | 2) => to_loop,
            ("/stream", _) => Fault::Normal,
            _ => to_loop,
        }
    })
    .await;
    let case = Case {
        ids: None,
        states: None,
        failures: 3,
        from: 1,
        level: "ERROR",
        says: &[
            "feed `wiki`",
            "redirect refused: ",
            "too many redirects (more than max_redirects = 3; a redirect loop?)",
        ],
    };
    let o = run_case(&server, case).await;
    let r = &o.requests;
    let attempts: Vec<&Record> = r.iter().filter(|x| x.path == "/stream").collect();
    assert_eq!(attempts.len(), 4, "{r:?}");
    assert_eq!(attempts[3].last_event_id.as_deref(), Some("120"));
    // Each looping attempt followed at most max_redirects (3) redirects, then gave up; the
    // next attempt came after client_error_delay (500 ms).
    let hops = r.iter().filter(|x| x.path == "/loop").count();
    assert_eq!(hops, 2 * 3, "{r:?}");
    assert!(
        attempts[2].at - attempts[1].at >= ms(500),
        "{:?}",
        attempts[2].at - attempts[1].at
    );
}

// ---------------------------------------------------------------------------------------------
// TLS.

/// A server that sends the whole log over TLS, with a fresh self-signed certificate.
async fn tls_server() -> Server {
    Server::start(
        Options {
            tls: true,
            ..Options::log(N)
        },
        |_| Fault::Normal,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_tls_certificate_is_a_clear_error_and_never_a_fallback() {
    let server = tls_server().await;
    let url = format!("https://127.0.0.1:{}/stream", server.addr.port());

    // The server is sound: a client that trusts its certificate gets the stream.
    let der = server.cert_der.clone().expect("certificate");
    let trusting = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_der(&der).expect("DER"))
        .build()
        .expect("client");
    let mut resp = trusting
        .get(&url)
        .send()
        .await
        .expect("trusted TLS request");
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.expect("body").expect("a chunk");
    assert!(
        String::from_utf8_lossy(&first).contains("id: 1\n"),
        "{first:?}"
    );
    drop(resp);
    let trusted = server
        .wait_tls("the trusted handshake", WAIT, |t| t.completed == 1)
        .await;
    assert_eq!(trusted.failed, 0);
    let before = server.requests().len();
    assert_eq!(before, 1);

    // The bridge does not trust it: a TLS error naming the certificate problem, retried with
    // backoff, and no request ever made without TLS or without verification.
    let s = setup(&url, &[]);
    let bridge = Bridge::spawn(&s.config);
    let stats = server
        .wait_tls("three refused handshakes", WAIT, |t| t.failed >= 3)
        .await;
    let logs = stop(bridge).await;
    assert_eq!(stats.completed, 1, "only the trusting client got through");
    assert_eq!(
        server.requests().len(),
        before,
        "no HTTP request from the bridge"
    );
    // The bridge itself refused: it aborted the handshakes with a TLS alert (a handshake cut
    // by the connect timeout under load would show as an EOF instead, hence "some").
    assert!(
        stats
            .errors
            .iter()
            .any(|e| e.contains("received fatal alert")),
        "{:?}",
        stats.errors
    );
    let f = failures(&logs);
    assert!(f.len() >= 3, "{}", show(&logs));
    for l in &f {
        assert_eq!(l.level, "WARN");
        assert!(
            l.message
                .contains(&format!("feed `{FEED}`: GET https://127.0.0.1:"))
                && l.message.contains(
                    "TLS handshake failed (the connection is not retried without TLS verification)"
                )
                && l.message.contains("certificate"),
            "{}",
            l.message
        );
    }
    assert_eq!(states(&logs), [Seen::Connecting, Seen::Closed]);
    assert!(!s.out.exists(), "nothing stored");
    assert!(!logs.iter().any(|l| l.message.starts_with("connected to")));
    eprintln!("untrusted TLS: {}", f[0].message);
}

/// The same server, trusted through the feed's `ca_file` (a private CA's certificate in PEM):
/// the stream is delivered in full over TLS; `validate` names a `ca_file` that is not PEM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_in_ca_file_is_trusted_and_a_bad_one_is_named() {
    let server = tls_server().await;
    let url = format!("https://127.0.0.1:{}/stream", server.addr.port());
    let der = server.cert_der.clone().expect("certificate");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("private-ca.pem");
    let pem = pem_certificate(&der);
    std::fs::write(&ca, &pem).expect("write the PEM file");
    let ca_value = format!("\"{}\"", ca.display());
    let s = setup(&url, &[("ca_file", &ca_value)]);
    let o = run_to_completion(&server, &s, 0).await;
    assert_eq!(ids(&o.requests), [None], "{:?}", o.requests);
    let tls = server
        .wait_tls("the handshake", WAIT, |t| t.completed >= 1)
        .await;
    assert_eq!(tls.failed, 0, "{:?}", tls.errors);

    // Not PEM: `validate` names the key and the file, and exits 2.
    std::fs::write(&ca, "not a certificate\n").expect("write");
    let out = std::process::Command::new(support::bin())
        .args(["validate", "-c"])
        .arg(&s.config)
        .output()
        .expect("run validate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("ca_file") && stderr.contains("holds no certificate"),
        "{stderr}"
    );
}

/// An https:// feed through an HTTP proxy (`HTTPS_PROXY`): one `CONNECT` tunnel to the
/// server, TLS inside it, verified with the feed's `ca_file`, and every event delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_feed_goes_through_a_connect_proxy() {
    let server = tls_server().await;
    let target = format!("127.0.0.1:{}", server.addr.port());
    let proxy = ConnectProxy::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("private-ca.pem");
    std::fs::write(
        &ca,
        pem_certificate(&server.cert_der.clone().expect("cert")),
    )
    .expect("write");
    let ca_value = format!("\"{}\"", ca.display());
    let s = setup(
        &format!("https://{target}/stream"),
        &[("ca_file", &ca_value)],
    );
    let proxy_url = format!("http://{}", proxy.addr);
    let bridge = Bridge::spawn_with_env(&s.config, "info", &[("HTTPS_PROXY", &proxy_url)]);
    wait_stored(&s, &bridge, N as usize, N).await;
    let logs = stop(bridge).await;
    assert_delivered(&s);
    assert_eq!(
        proxy.tunnels(),
        [target],
        "one CONNECT to the feed's host and port; logs:\n{}",
        show(&logs)
    );
    let tls = server
        .wait_tls("the handshake", WAIT, |t| t.completed >= 1)
        .await;
    assert_eq!((tls.completed, tls.failed), (1, 0), "{:?}", tls.errors);
}

/// A minimal HTTP proxy that only tunnels (`CONNECT host:port`), recording each target.
struct ConnectProxy {
    addr: std::net::SocketAddr,
    tunnels: Arc<std::sync::Mutex<Vec<String>>>,
}

impl ConnectProxy {
    async fn start() -> ConnectProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let tunnels: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let seen = tunnels.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match client.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let Some(target) = head
                        .strip_prefix("CONNECT ")
                        .and_then(|rest| rest.split(' ').next())
                        .map(str::to_string)
                    else {
                        let _ = client
                            .write_all(
                                b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n",
                            )
                            .await;
                        return;
                    };
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                        return;
                    };
                    seen.lock().expect("tunnels").push(target);
                    if client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_ok()
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        ConnectProxy { addr, tunnels }
    }

    fn tunnels(&self) -> Vec<String> {
        self.tunnels.lock().expect("tunnels").clone()
    }
}

/// `der` as a PEM `CERTIFICATE` block.
fn pem_certificate(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

// ---------------------------------------------------------------------------------------------
// What a crash leaves behind.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_line_left_by_a_crash_is_cut_before_the_next_event() {
    // kill -9 can cut one of the file sink's writes short (Linux stops a large write at a page
    // boundary when a fatal signal arrives), and a power loss can lose the end of a file: the
    // file then ends inside a line. That batch was never acknowledged, so the checkpoint is
    // before it and its events come again; the fragment must not be glued to the first of
    // them. (Simulated here: the crash loop's kills rarely land inside a write.)
    let server = Server::scripted(N, vec![Fault::Silence { after: K }]).await;
    let s = setup(&server.url(), &[("idle_timeout", "\"30s\"")]);
    let bridge = Bridge::spawn(&s.config);
    wait_stored(&s, &bridge, K as usize, K).await;
    stop(bridge).await;
    assert_eq!(checkpoint(&s.state, FEED), Some((K.to_string(), K)));
    let fragment = format!(
        "{{\"feed\":\"{FEED}\",\"type\":\"{}\",\"id\":\"{}\",\"data\":\"{{\\\"n\\\":1",
        event_type(K + 1),
        K + 1
    );
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&s.out)
        .expect("open the file");
    std::io::Write::write_all(&mut f, fragment.as_bytes()).expect("append");
    drop(f);

    let monitor = Monitor::start(&s);
    let bridge = Bridge::spawn(&s.config);
    wait_stored(&s, &bridge, N as usize, N).await;
    let logs = stop(bridge).await;
    monitor.finish();
    assert_eq!(
        ids(&server.requests()),
        [None, Some("120")],
        "{:?}",
        server.requests()
    );
    // Every line whole, every event once and in order.
    assert!(assert_delivered(&s).is_empty());
    assert_final_checkpoint(&s, N);
    eprintln!(
        "torn line: {}",
        logs.iter()
            .filter(|l| l.level == "WARN")
            .map(LogLine::show)
            .collect::<Vec<_>>()
            .join("; ")
    );
}
