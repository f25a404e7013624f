//! The benchmark: `cargo bench --bench bridge [-- SCENARIO...]` (not part of CI).
//!
//! A fast SSE generator (in this process, release build) feeds the real `sse-bridge` binary,
//! run as a child process; every figure of the bridge is printed beside the raw limit measured
//! in the same run, on the same machine, with the same bytes. Scenarios (default: all, in
//! this order):
//!
//! - `raw`: the raw limits. The same stream read over loopback and discarded; a bare
//!   [`Parser::push`] over it in memory; the same JSON Lines written to a file with an
//!   `fdatasync` every 8192 lines (the file sink's `fsync = "always"`).
//! - `file`: one feed into the file sink, until the file holds every event; with
//!   `fsync = "always"` (the default) and `fsync = "interval"`.
//! - `sqlite`: one feed into the SQLite sink (in the state database), beside a raw rusqlite
//!   batched insert of the same rows.
//! - `kafka`: one feed into the Kafka sink, beside a bare rdkafka producer sending the same
//!   records to the same local broker (tansu, started by the scenario).
//! - `postgres`: one feed into the PostgreSQL sink, beside a raw binary `COPY` of the same rows
//!   into a table of the same shape in the same database (the machine's PostgreSQL on
//!   127.0.0.1:5432; a database of its own, dropped at the end); then the same feed into the
//!   same sink as a fleet of one (`[cluster]` in that database), the cost of the fencing.
//! - `idle`: 10 000 feeds of heartbeat comments only: time to open them all, peak RSS, CPU.
//! - `reconnect`: 1 000 feeds, the server restarts: when the reconnections arrive.
//! - `http2`: HTTP/2 beside HTTP/1.1 in the same run: one busy feed into the file sink
//!   (`fsync = "interval"`) from the generator, and the same bytes from an HTTP/2 server
//!   (`tests/support/h2.rs`, h2c, in this process) with `http_version = "2"`; then
//!   `BENCH_IDLE_FEEDS` idle feeds over HTTP/2 to one origin (an HTTP/2 server of heartbeats,
//!   `tests/support/h2.rs`, 100 streams per connection): time until all are open, connections,
//!   and the bridge's peak RSS (goal: at most 64 MiB).
//!
//! Sizes can be changed with environment variables: `BENCH_EVENTS` (file, default 2 000 000),
//! `BENCH_SQLITE_EVENTS` (default 500 000), `BENCH_KAFKA_EVENTS` (500 000), `BENCH_PG_EVENTS`
//! (500 000), `BENCH_IDLE_FEEDS`
//! (10 000), `BENCH_IDLE_SECS` (30), `BENCH_RECONNECT_FEEDS` (1 000). Each scenario is a
//! function; a new sink adds one.
//! `BENCH_WRAP="perf record -o bridge.perf --"` runs the bridge under a profiler.
//!
//! The bridge needs one file descriptor per feed: this process raises its soft
//! `RLIMIT_NOFILE` to the hard limit, and the bridge inherits it.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{TimeZone, Utc};

use sse_bridge::event::Event;
use sse_bridge::sink::jsonl;
use sse_bridge::sse::parser::{Item, Limits, Parser};

#[path = "../tests/support/kafka.rs"]
mod kafka;
#[path = "../tests/support/postgres.rs"]
mod postgres;
#[path = "../tests/support/mod.rs"]
mod support;
use kafka::Broker;
use support::bridge::{self, cpu_seconds, Bridge};
use support::server::{self, Reply, Server};

const SCENARIOS: &[&str] = &[
    "raw",
    "file",
    "sqlite",
    "kafka",
    "postgres",
    "idle",
    "reconnect",
    "http2",
];
const FEED: &str = "bench";
const EVENT_TYPE: &str = "price-update";
/// Bytes per chunk of the generator's chunked response (and per bare-parse push).
const CHUNK: usize = server::CHUNK;
/// Lines per fdatasync in the raw file write (the runner's largest batch).
const FILE_BATCH: usize = 8192;
/// Rows per transaction in the raw rusqlite insert (the runner's largest batch).
const SQLITE_BATCH: usize = 8192;
/// The goal for idle feeds (README, "Benchmark": at most 256 MiB).
const IDLE_RSS_BUDGET: u64 = 256 * 1024 * 1024;
/// The goal for idle feeds over HTTP/2 (README, "Benchmark": at most 64 MiB).
const IDLE_H2_RSS_BUDGET: u64 = 64 * 1024 * 1024;

fn main() {
    // `cargo bench` passes `--bench`; everything else names scenarios.
    let mut chosen: Vec<&str> = Vec::new();
    for arg in std::env::args().skip(1).filter(|a| !a.starts_with("--")) {
        match SCENARIOS.iter().find(|s| **s == arg) {
            Some(s) => chosen.push(s),
            None => {
                eprintln!("unknown scenario `{arg}`; choose from {SCENARIOS:?}");
                std::process::exit(2);
            }
        }
    }
    if chosen.is_empty() {
        chosen = SCENARIOS.to_vec();
    }
    let nofile = raise_nofile_limit();
    let ctx = Ctx {
        rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime"),
        dir: tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir"),
        events: env_usize("BENCH_EVENTS", 2_000_000),
        stream: OnceLock::new(),
        limits: Mutex::new(RawLimits::default()),
        report: Mutex::new(Vec::new()),
        notes: Mutex::new(Vec::new()),
    };
    println!(
        "sse-bridge benchmark, {} ({} cores, RLIMIT_NOFILE {nofile}); scenarios: {}",
        Utc::now().format("%Y-%m-%d %H:%M UTC"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        chosen.join(" ")
    );
    for scenario in chosen {
        println!("\n== {scenario}");
        match scenario {
            "raw" => scenario_raw(&ctx),
            "file" => scenario_file(&ctx),
            "sqlite" => scenario_sqlite(&ctx),
            "kafka" => scenario_kafka(&ctx),
            "postgres" => scenario_postgres(&ctx),
            "idle" => scenario_idle(&ctx),
            "reconnect" => scenario_reconnect(&ctx),
            "http2" => scenario_http2(&ctx),
            _ => unreachable!("checked above"),
        }
    }
    print_report(&ctx);
}

// ---- context and results --------------------------------------------------------------------

struct Ctx {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    events: usize,
    stream: OnceLock<Stream>,
    limits: Mutex<RawLimits>,
    report: Mutex<Vec<Row>>,
    notes: Mutex<Vec<String>>,
}

/// One line of the results table.
#[derive(Debug, Clone)]
struct Row {
    what: String,
    events: Option<u64>,
    events_per_s: Option<f64>,
    mb_per_s: Option<f64>,
    cpu_s: Option<f64>,
    peak_rss: Option<u64>,
    /// `(ratio, what it is a ratio to)`.
    ratios: Vec<(f64, String)>,
}

impl Row {
    fn new(what: impl Into<String>) -> Row {
        Row {
            what: what.into(),
            events: None,
            events_per_s: None,
            mb_per_s: None,
            cpu_s: None,
            peak_rss: None,
            ratios: Vec::new(),
        }
    }
}

/// A throughput figure measured once per run and reused by every scenario that compares with it.
#[derive(Debug, Clone, Copy)]
struct Rate {
    events_per_s: f64,
    mb_per_s: f64,
    cpu_s: f64,
}

#[derive(Default)]
struct RawLimits {
    loopback: Option<Rate>,
    parse: Option<Rate>,
    file: Option<Rate>,
    pipeline: Option<Rate>,
}

impl Ctx {
    fn stream(&self) -> &Stream {
        self.stream.get_or_init(|| Stream::build(self.events))
    }

    fn add(&self, row: Row) {
        print_row(&row);
        self.report.lock().expect("report").push(row);
    }

    fn note(&self, note: String) {
        println!("{note}");
        self.notes.lock().expect("notes").push(note);
    }

    fn loopback(&self) -> Rate {
        self.limit(|l| &mut l.loopback, raw_loopback)
    }

    fn parse(&self) -> Rate {
        self.limit(|l| &mut l.parse, raw_parse)
    }

    fn pipeline(&self) -> Rate {
        self.limit(|l| &mut l.pipeline, raw_pipeline)
    }

    fn file(&self) -> Rate {
        self.limit(|l| &mut l.file, raw_file)
    }

    /// A raw limit, measured once per run by `measure`.
    fn limit(
        &self,
        slot: fn(&mut RawLimits) -> &mut Option<Rate>,
        measure: fn(&Ctx) -> Rate,
    ) -> Rate {
        if let Some(r) = *slot(&mut self.limits.lock().expect("limits")) {
            return r;
        }
        let r = measure(self);
        *slot(&mut self.limits.lock().expect("limits")) = Some(r);
        r
    }

    /// A fresh directory for one scenario, removed when dropped.
    fn scratch(&self) -> tempfile::TempDir {
        tempfile::tempdir_in(self.dir.path()).expect("scratch dir")
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

// ---- the stream -----------------------------------------------------------------------------

/// The event stream every throughput scenario uses: `events` events of about 230 bytes with
/// ids `1..=events`, one type, JSON data.
struct Stream {
    events: usize,
    /// The `text/event-stream` body.
    sse: Bytes,
}

fn event_text(n: usize, out: &mut Vec<u8>) {
    let _ = write!(
        out,
        "id: {n}\nevent: {EVENT_TYPE}\ndata: {{\"symbol\":\"ACME\",\"seq\":{n},\"price\":123.45,\"volume\":100000,\
\"ts\":\"2026-11-24T08:00:00.000Z\",\"exchange\":\"XNAS\",\"flags\":[\"a\",\"b\",\"c\"],\"note\":\"lorem ipsum dolor sit amet, consectetur adipiscing\"}}\n\n"
    );
}

/// The event as the bridge stores it (the received time is a placeholder of the same length).
fn event_of(n: usize) -> Event {
    let mut text = Vec::new();
    event_text(n, &mut text);
    let text = String::from_utf8(text).expect("ASCII");
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("data line")
        .to_string();
    Event {
        feed: Arc::from(FEED),
        event_type: EVENT_TYPE.into(),
        data,
        id: n.to_string().into(),
        received_at: Utc
            .with_ymd_and_hms(2026, 11, 24, 8, 0, 0)
            .single()
            .expect("time"),
        seq: n as u64,
    }
}

impl Stream {
    fn build(events: usize) -> Stream {
        let started = Instant::now();
        let mut sse = Vec::with_capacity(events * 240);
        for n in 1..=events {
            event_text(n, &mut sse);
        }
        println!(
            "stream: {events} events, {:.1} MB, {:.0} bytes per event (built in {:.1} s)",
            sse.len() as f64 / 1e6,
            sse.len() as f64 / events as f64,
            started.elapsed().as_secs_f64()
        );
        Stream {
            events,
            sse: Bytes::from(sse),
        }
    }

    fn mb(&self) -> f64 {
        self.sse.len() as f64 / 1e6
    }
}

// ---- the generator ---------------------------------------------------------------------------

/// What the generator answers every request with, after the response head.
enum Body {
    /// The stream (in `CHUNK`-byte chunks), then heartbeats.
    Stream(Bytes),
    /// Heartbeat comments only.
    Idle,
}

/// The tests' SSE server (`tests/support/server.rs`) as an HTTP/1.1 SSE generator on
/// 127.0.0.1, in this process: every request, on any path, gets `body` as a chunked response,
/// then a heartbeat comment every `heartbeat` (each connection at its own random phase, so
/// that 10 000 of them do not beat together).
fn generator(ctx: &Ctx, body: Body, heartbeat: Duration) -> Server {
    let reply = sse_reply();
    let reply = match body {
        Body::Stream(sse) => reply.send_bytes(sse),
        Body::Idle => reply.send(": connected\n\n"),
    };
    let reply = reply.heartbeat_at_random_phase(heartbeat);
    ctx.rt.block_on(Server::answer(move |_| reply.clone()))
}

/// The generator's response before its body.
fn sse_reply() -> Reply {
    Reply::sse().header("Cache-Control", "no-cache").chunked()
}

/// When the first response started (`None`: no request yet).
fn first_request(generator: &Server) -> Option<Instant> {
    generator.requests().first().map(|r| r.at)
}

/// Closes every connection and the listening socket (a server going away), and waits until
/// every response is over.
fn stop_generator(generator: &mut Server) {
    generator.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while generator.open_connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---- the bridge as a child process ----------------------------------------------------------

/// One feed's `[[feed]]` table.
fn feed_toml(name: &str, url: &str) -> String {
    format!("[[feed]]\nname = {name:?}\nurl = {url:?}\n\n")
}

/// Starts `sse-bridge run` in `dir` with `config` (TOML), through the tests' process harness.
fn start_bridge(dir: &Path, config: &str) -> Bridge {
    let config_path = dir.join("bridge.toml");
    std::fs::write(&config_path, config).expect("write config");
    // BENCH_WRAP="perf record -g -o bridge.perf --" (or valgrind ...) runs the bridge under
    // a profiler; CPU and RSS figures are then the wrapper's.
    let wrap = std::env::var("BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(bridge::bin());
            c
        }
        None => Command::new(bridge::bin()),
    };
    command
        .args(["run", "--log-format", "json", "-c"])
        .arg(&config_path)
        .current_dir(dir);
    Bridge::spawn_command(command, &config_path)
}

/// SIGTERM, then waits (at most 60 s) for the drain; returns how long it took.
fn stop_bridge(ctx: &Ctx, mut bridge: Bridge) -> Duration {
    let started = Instant::now();
    let status = ctx.rt.block_on(bridge.stop(Duration::from_secs(60)));
    if !status.success() {
        eprintln!(
            "warning: sse-bridge exited with {status}; log tail:\n{}",
            tail(&bridge.raw_log(), 20)
        );
    }
    started.elapsed()
}

/// Warnings and errors the bridge logged.
fn complaints(bridge: &Bridge) -> Vec<String> {
    bridge
        .logs()
        .into_iter()
        .filter(|l| l.level == "WARN" || l.level == "ERROR")
        .map(|l| l.raw)
        .collect()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// CPU time of the calling thread.
fn thread_cpu() -> f64 {
    // SAFETY: getrusage writes only into the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Raises the soft limit on open files to the hard limit; returns the new soft limit.
fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct they are given.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
        lim.rlim_cur as u64
    }
}

/// Polls `done` every `every` until it holds, the bridge dies, or `timeout` passes.
fn wait_until(
    bridge: &mut Bridge,
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        bridge.check_alive();
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

// ---- raw limits -----------------------------------------------------------------------------

fn scenario_raw(ctx: &Ctx) {
    ctx.loopback();
    ctx.parse();
    ctx.pipeline();
    ctx.file();
}

/// The stream read over loopback (from the same generator) and discarded.
fn raw_loopback(ctx: &Ctx) -> Rate {
    let stream = ctx.stream();
    let mut generator = generator(
        ctx,
        Body::Stream(stream.sse.clone()),
        Duration::from_secs(1),
    );
    let addr = generator.addr;
    let framed: usize = stream
        .sse
        .chunks(CHUNK)
        .map(|c| format!("{:x}\r\n\r\n", c.len()).len() + c.len())
        .sum();
    let expected = sse_reply().head().len() + framed;
    let (secs, cpu) = std::thread::spawn(move || {
        let cpu0 = thread_cpu();
        let started = Instant::now();
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        conn.write_all(b"GET /stream HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n")
            .expect("request");
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        while got < expected {
            let n = conn.read(&mut buf).expect("read");
            assert!(n > 0, "the generator closed early");
            got += n;
        }
        (started.elapsed().as_secs_f64(), thread_cpu() - cpu0)
    })
    .join()
    .expect("reader thread");
    stop_generator(&mut generator);
    limit_row(ctx, "raw: loopback read, discard", secs, cpu)
}

/// A bare parse of the stream in memory, in `CHUNK`-byte pushes.
fn raw_parse(ctx: &Ctx) -> Rate {
    let stream = ctx.stream();
    let mut best: Option<(f64, f64)> = None;
    // The best of three: the figure the bridge is compared against should not be low by luck.
    for _ in 0..3 {
        let mut parser = Parser::new(Limits::default());
        let mut out = Vec::with_capacity(1024);
        let mut count = 0usize;
        let cpu0 = thread_cpu();
        let started = Instant::now();
        for chunk in stream.sse.chunks(CHUNK) {
            parser.push(chunk, &mut out).expect("valid stream");
            count += out.iter().filter(|i| matches!(i, Item::Event(_))).count();
            out.clear();
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = thread_cpu() - cpu0;
        assert_eq!(count, stream.events);
        if best.is_none_or(|(s, _)| secs < s) {
            best = Some((secs, cpu));
        }
    }
    let (secs, cpu) = best.expect("three runs");
    limit_row(ctx, "raw: bare parse (Parser::push)", secs, cpu)
}

/// Reports a raw limit measured over the whole stream: `secs` of wall time and `cpu` seconds
/// of the measuring thread.
fn limit_row(ctx: &Ctx, what: &str, secs: f64, cpu: f64) -> Rate {
    let stream = ctx.stream();
    let rate = Rate {
        events_per_s: stream.events as f64 / secs,
        mb_per_s: stream.mb() / secs,
        cpu_s: cpu,
    };
    let mut row = Row::new(what);
    row.events = Some(stream.events as u64);
    row.events_per_s = Some(rate.events_per_s);
    row.mb_per_s = Some(rate.mb_per_s);
    row.cpu_s = Some(cpu);
    ctx.add(row);
    rate
}

/// The file sink's own work per event, on one thread and with nothing around it: parse the
/// stream in memory, stamp each event as the bridge does (an `Arc<Event>` with the feed name,
/// the time and a sequence number), encode its JSON line and write it to a file through a
/// 64 KiB buffer, without fsync. This is the cost no daemon can avoid; the bridge adds the
/// network, the hand-over between its feed task and the sink thread, acknowledgements and
/// checkpoints, and can use a second core for part of the work.
fn raw_pipeline(ctx: &Ctx) -> Rate {
    let stream = ctx.stream();
    let dir = ctx.scratch();
    let path = dir.path().join("pipeline.jsonl");
    let mut best: Option<(f64, f64)> = None;
    for _ in 0..3 {
        let file = std::fs::File::create(&path).expect("create");
        let mut out = std::io::BufWriter::with_capacity(64 * 1024, file);
        let mut parser = Parser::new(Limits::default());
        let mut items = Vec::with_capacity(1024);
        let mut line = Vec::with_capacity(1024);
        let mut encoder = jsonl::Encoder::default();
        let feed: Arc<str> = Arc::from(FEED);
        let mut seq = 0u64;
        let cpu0 = thread_cpu();
        let started = Instant::now();
        for chunk in stream.sse.chunks(CHUNK) {
            parser.push(chunk, &mut items).expect("valid stream");
            let received_at = Utc::now();
            for item in items.drain(..) {
                if let Item::Event(e) = item {
                    seq += 1;
                    let event = Arc::new(Event {
                        feed: feed.clone(),
                        event_type: e.event_type,
                        data: e.data,
                        id: e.id,
                        received_at,
                        seq,
                    });
                    line.clear();
                    encoder.encode(&event, &mut line);
                    out.write_all(&line).expect("write");
                }
            }
        }
        out.flush().expect("flush");
        let secs = started.elapsed().as_secs_f64();
        let cpu = thread_cpu() - cpu0;
        assert_eq!(seq as usize, stream.events);
        if best.is_none_or(|(s, _)| secs < s) {
            best = Some((secs, cpu));
        }
    }
    let (secs, cpu) = best.expect("three runs");
    limit_row(
        ctx,
        "raw: parse + encode + write, one thread, no fsync",
        secs,
        cpu,
    )
}

/// The bytes the file sink writes for the stream, per event (for the expected file size).
fn jsonl_size(events: usize) -> u64 {
    let mut line = Vec::new();
    (1..=events)
        .map(|n| {
            line.clear();
            jsonl::encode(&event_of(n), &mut line);
            line.len() as u64
        })
        .sum()
}

/// The same JSON Lines written to a file, `FILE_BATCH` lines per write + fdatasync. Only the
/// writes and syncs are timed (encoding is the sink's work, not the disk's).
fn raw_file(ctx: &Ctx) -> Rate {
    let stream = ctx.stream();
    let dir = ctx.scratch();
    let path = dir.path().join("raw.jsonl");
    let mut file = std::fs::File::create(&path).expect("create");
    let mut buf = Vec::with_capacity(FILE_BATCH * 400);
    let (mut secs, mut cpu, mut bytes) = (0.0, 0.0, 0u64);
    let mut n = 1;
    while n <= stream.events {
        buf.clear();
        let end = (n + FILE_BATCH).min(stream.events + 1);
        for i in n..end {
            jsonl::encode(&event_of(i), &mut buf);
        }
        n = end;
        let cpu0 = thread_cpu();
        let started = Instant::now();
        file.write_all(&buf).expect("write");
        file.sync_data().expect("fdatasync");
        secs += started.elapsed().as_secs_f64();
        cpu += thread_cpu() - cpu0;
        bytes += buf.len() as u64;
    }
    let rate = Rate {
        events_per_s: stream.events as f64 / secs,
        mb_per_s: stream.mb() / secs,
        cpu_s: cpu,
    };
    let mut row = Row::new(format!("raw: JSONL file write, fdatasync per {FILE_BATCH}"));
    row.events = Some(stream.events as u64);
    row.events_per_s = Some(rate.events_per_s);
    row.mb_per_s = Some(rate.mb_per_s);
    row.cpu_s = Some(cpu);
    ctx.add(row);
    ctx.note(format!(
        "raw file write: {:.1} MB of JSON Lines ({:.0} MB/s of file data); MB/s columns count the SSE input bytes",
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs
    ));
    rate
}

// ---- one feed through the bridge ------------------------------------------------------------

/// What one single-feed throughput run measured.
struct Run {
    secs: f64,
    cpu_s: f64,
    peak_rss: u64,
}

/// Runs the bridge with `sink_toml` (a `[sink.out]` table) on one feed of `events` events,
/// until `stored()` reaches `events`.
fn run_one_feed(
    ctx: &Ctx,
    dir: &Path,
    events: usize,
    sse: Bytes,
    sink_toml: &str,
    stored: impl FnMut() -> u64,
) -> Run {
    run_one_feed_over(ctx, dir, events, sse, sink_toml, false, stored)
}

/// [`run_one_feed`], over HTTP/2 through an h2c front when `http2`.
fn run_one_feed_over(
    ctx: &Ctx,
    dir: &Path,
    events: usize,
    sse: Bytes,
    sink_toml: &str,
    http2: bool,
    mut stored: impl FnMut() -> u64,
) -> Run {
    // HTTP/1.1: the generator; HTTP/2: an HTTP/2 server sending the same bytes (in this
    // process, like the generator).
    let (mut generator, h2) = if http2 {
        let server = ctx
            .rt
            .block_on(support::h2::H2Server::start(support::h2::Options {
                body: Some(sse),
                ..support::h2::Options::default()
            }));
        (None, Some(server))
    } else {
        (
            Some(generator(ctx, Body::Stream(sse), Duration::from_secs(1))),
            None,
        )
    };
    let feed = match (&generator, &h2) {
        (_, Some(server)) => format!(
            "[[feed]]\nname = {FEED:?}\nurl = {:?}\nhttp_version = \"2\"\n\n",
            server.url("stream")
        ),
        (Some(g), _) => feed_toml(FEED, &g.url()),
        (None, None) => unreachable!("one server or the other"),
    };
    let first = |generator: &Option<Server>| match (generator, &h2) {
        (Some(g), _) => first_request(g),
        (_, Some(server)) => server.requests().first().map(|r| r.at),
        _ => None,
    };
    let config = format!(
        "[state]\npath = {:?}\n\n[log]\nlevel = \"warn\"\n\n{feed}{sink_toml}\n[routing]\ndefault = [\"out\"]\n",
        dir.join("state.db"),
    );
    let mut bridge = start_bridge(dir, &config);
    assert!(
        wait_until(
            &mut bridge,
            Duration::from_secs(30),
            Duration::from_millis(1),
            || first(&generator).is_some()
        ),
        "the bridge did not connect"
    );
    let started = first(&generator).expect("started");
    let cpu0 = bridge.cpu_seconds();
    let target = events as u64;
    let done = wait_until(
        &mut bridge,
        Duration::from_secs(600),
        Duration::from_millis(2),
        || stored() >= target,
    );
    let secs = started.elapsed().as_secs_f64();
    let cpu_s = bridge.cpu_seconds() - cpu0;
    let peak_rss = bridge.peak_rss().unwrap_or(0);
    assert!(
        done,
        "the bridge stored {} of {events} events in 600 s",
        stored()
    );
    let complaints = complaints(&bridge);
    stop_bridge(ctx, bridge);
    if let Some(generator) = generator.as_mut() {
        stop_generator(generator);
    }
    drop(h2);
    if !complaints.is_empty() {
        println!(
            "the bridge logged {} warnings/errors, first: {}",
            complaints.len(),
            complaints[0]
        );
    }
    Run {
        secs,
        cpu_s,
        peak_rss,
    }
}

/// The row of a raw limit measured over `events` events.
fn raw_row(what: String, events: usize, rate: &Rate) -> Row {
    let mut row = Row::new(what);
    row.events = Some(events as u64);
    row.events_per_s = Some(rate.events_per_s);
    row.mb_per_s = Some(rate.mb_per_s);
    row.cpu_s = Some(rate.cpu_s);
    row
}

fn bridge_row(what: &str, events: usize, mb: f64, run: &Run, against: &[(Rate, &str)]) -> Row {
    let events_per_s = events as f64 / run.secs;
    let mut row = Row::new(what);
    row.events = Some(events as u64);
    row.events_per_s = Some(events_per_s);
    row.mb_per_s = Some(mb / run.secs);
    row.cpu_s = Some(run.cpu_s);
    row.peak_rss = Some(run.peak_rss);
    for (rate, name) in against {
        row.ratios
            .push((events_per_s / rate.events_per_s, name.to_string()));
    }
    row
}

/// One feed into the file sink twice: `fsync = "always"` (the default: an fdatasync per batch
/// before it is acknowledged, so the disk's sync latency is the limit) and `fsync = "interval"`
/// (acknowledged once written, synced every second: the bridge's own CPU is the limit).
fn scenario_file(ctx: &Ctx) {
    let loopback = ctx.loopback();
    let parse = ctx.parse();
    let pipeline = ctx.pipeline();
    let raw_file = ctx.file();
    for fsync in ["always", "interval"] {
        let run = file_run(ctx, fsync);
        let mut against = vec![
            (parse, "bare parse"),
            (pipeline, "one-thread parse+encode+write"),
            (loopback, "loopback read"),
        ];
        if fsync == "always" {
            against.push((raw_file, "raw file write"));
        }
        let stream = ctx.stream();
        ctx.add(bridge_row(
            &format!("bridge -> file sink (fsync {fsync})"),
            stream.events,
            stream.mb(),
            &run,
            &against,
        ));
        ctx.note(format!(
            "file sink, fsync {fsync}: CPU {:.2} s = {:.1}x the bare parse's {:.2} s ({:.0} ns per event)",
            run.cpu_s,
            run.cpu_s / parse.cpu_s,
            parse.cpu_s,
            run.cpu_s * 1e9 / stream.events as f64
        ));
    }
}

fn file_run(ctx: &Ctx, fsync: &str) -> Run {
    file_run_over(ctx, fsync, false)
}

fn file_run_over(ctx: &Ctx, fsync: &str, http2: bool) -> Run {
    let stream = ctx.stream();
    let dir = ctx.scratch();
    let expected = jsonl_size(stream.events);
    let out = dir.path().join("events").join(format!("{FEED}.jsonl"));
    let sink = format!(
        "[sink.out]\ntype = \"file\"\npath = {:?}\nfsync = {fsync:?}\n",
        dir.path().join("events").join("{feed}.jsonl")
    );
    let run = run_one_feed_over(
        ctx,
        dir.path(),
        stream.events,
        stream.sse.clone(),
        &sink,
        http2,
        || {
            // Whole lines only: the file is complete when it has the exact expected size.
            match std::fs::metadata(&out) {
                Ok(m) if m.len() >= expected => stream.events as u64,
                _ => 0,
            }
        },
    );
    // Spot-check the output: its size and its last line.
    let text = std::fs::read(&out).expect("read output");
    assert_eq!(text.len() as u64, expected, "output size");
    let last_start = text[..text.len() - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let last =
        jsonl::decode(std::str::from_utf8(&text[last_start..]).expect("UTF-8")).expect("last line");
    assert_eq!(last.seq, stream.events as u64);
    assert_eq!(&*last.id, stream.events.to_string());
    run
}

fn scenario_sqlite(ctx: &Ctx) {
    let events = env_usize("BENCH_SQLITE_EVENTS", 500_000);
    let parse = ctx.parse();
    let mut sse = Vec::new();
    for n in 1..=events {
        event_text(n, &mut sse);
    }
    let mb = sse.len() as f64 / 1e6;

    // Raw: rusqlite, the same schema, pragmas, statement and rows, SQLITE_BATCH per transaction.
    let raw_dir = ctx.scratch();
    let raw_path = raw_dir.path().join("raw.db");
    let rows: Vec<(Event, String)> = (1..=events)
        .map(|n| {
            let e = event_of(n);
            let t = sse_bridge::sink::sqlite::format_time(e.received_at);
            (e, t)
        })
        .collect();
    let mut conn = support::raw_events_db(&raw_path);
    let cpu0 = thread_cpu();
    let started = Instant::now();
    for chunk in rows.chunks(SQLITE_BATCH) {
        support::insert_events(&mut conn, chunk.iter().map(|(e, t)| (e, t.as_str())));
    }
    let secs = started.elapsed().as_secs_f64();
    let raw = Rate {
        events_per_s: events as f64 / secs,
        mb_per_s: mb / secs,
        cpu_s: thread_cpu() - cpu0,
    };
    drop(conn);
    drop(rows);
    drop(raw_dir);
    ctx.add(raw_row(
        format!("raw: rusqlite insert, {SQLITE_BATCH} per transaction"),
        events,
        &raw,
    ));

    // The bridge, the sink in the state database (events and checkpoints in one transaction).
    let dir = ctx.scratch();
    let db = dir.path().join("state.db");
    let sink = format!("[sink.out]\ntype = \"sqlite\"\npath = {db:?}\n");
    let mut reader: Option<rusqlite::Connection> = None;
    let run = run_one_feed(ctx, dir.path(), events, Bytes::from(sse), &sink, || {
        if reader.is_none() {
            reader = rusqlite::Connection::open_with_flags(
                &db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .ok();
        }
        reader
            .as_ref()
            .and_then(|c| {
                // By feed: answered from the (feed, seq) index, not a scan of every row.
                c.query_row(
                    "SELECT coalesce(max(seq), 0) FROM events WHERE feed = ?1",
                    [FEED],
                    |r| r.get::<_, i64>(0),
                )
                .ok()
            })
            .unwrap_or(0) as u64
    });
    ctx.add(bridge_row(
        "bridge -> SQLite sink (state db, synchronous full)",
        events,
        mb,
        &run,
        &[(raw, "raw rusqlite"), (parse, "bare parse")],
    ));
}

/// A connection to the benchmark's database and a runtime to drive it.
struct Pg {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Pg {
    fn connect(url: &str) -> Pg {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("connect to PostgreSQL");
            tokio::spawn(connection);
            client
        });
        Pg { runtime, client }
    }
}

/// One feed into the PostgreSQL sink, beside a raw binary `COPY` of the same rows (the sink's
/// columns and types, `SQLITE_BATCH` rows per transaction) into a table of the same shape and
/// indexes in the same database (the goal: at least 60 % of the raw rate). `BENCH_PG_EVENTS`
/// (default 500 000) sets the size.
fn scenario_postgres(ctx: &Ctx) {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;

    let Some(db) = postgres::TestDb::create("bench") else {
        ctx.note("postgres: skipped, no server on 127.0.0.1:5432".into());
        return;
    };
    let events = env_usize("BENCH_PG_EVENTS", 500_000);
    let parse = ctx.parse();
    let mut sse = Vec::new();
    for n in 1..=events {
        event_text(n, &mut sse);
    }
    let mb = sse.len() as f64 / 1e6;

    // Raw: the same rows by binary COPY, one transaction per batch.
    let url = format!("host=127.0.0.1 port=5432 user=postgres dbname={}", db.name);
    let mut pg = Pg::connect(&url);
    let rows: Vec<Event> = (1..=events).map(event_of).collect();
    let cpu0 = thread_cpu();
    let started = Instant::now();
    pg.runtime.block_on(async {
        pg.client
            .batch_execute(
                "CREATE TABLE raw (pos bigserial PRIMARY KEY, feed text NOT NULL, \
                 seq bigint NOT NULL, id text NOT NULL, type text NOT NULL, data text NOT NULL, \
                 data_json jsonb, received_at timestamptz NOT NULL); \
                 CREATE INDEX ON raw (feed, seq); CREATE INDEX ON raw (feed, id); \
                 CREATE INDEX ON raw (received_at);",
            )
            .await
            .expect("raw table");
        let types = sse_bridge::sink::postgres::COPY_TYPES;
        for chunk in rows.chunks(SQLITE_BATCH) {
            let tx = pg.client.transaction().await.expect("begin");
            let sink = tx
                .copy_in(
                    "COPY raw (feed, seq, id, type, data, data_json, received_at) \
                     FROM STDIN (FORMAT binary)",
                )
                .await
                .expect("copy");
            let writer = BinaryCopyInWriter::new(sink, &types);
            futures_util::pin_mut!(writer);
            let none: Option<serde_json::Value> = None;
            for e in chunk {
                writer
                    .as_mut()
                    .write(&[
                        &&*e.feed,
                        &(e.seq as i64),
                        &&*e.id,
                        &&*e.event_type,
                        &e.data.as_str(),
                        &none,
                        &e.received_at,
                    ])
                    .await
                    .expect("row");
            }
            writer.finish().await.expect("finish");
            tx.commit().await.expect("commit");
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let raw = Rate {
        events_per_s: events as f64 / secs,
        mb_per_s: mb / secs,
        cpu_s: thread_cpu() - cpu0,
    };
    drop(rows);
    ctx.add(raw_row(
        format!("raw: PostgreSQL binary COPY, {SQLITE_BATCH} per transaction"),
        events,
        &raw,
    ));

    // The bridge into the sink's own table, then the same as a fleet of one (`[cluster]` in
    // the same database): every batch and checkpoint commit also reads its lease row, and the
    // coordinator runs a round every `lease_ttl / 3`.
    let sse = Bytes::from(sse);
    let run = pg_bridge_run(ctx, &mut pg, &db, events, sse.clone(), "bench_events", "");
    ctx.add(bridge_row(
        "bridge -> PostgreSQL sink (binary COPY, cursor per batch)",
        events,
        mb,
        &run,
        &[(raw, "raw COPY"), (parse, "bare parse")],
    ));
    let cluster = format!(
        "\n[cluster]\nurl = \"{}\"\ninstance = \"bench\"\n",
        db.url()
    );
    let fleet = pg_bridge_run(ctx, &mut pg, &db, events, sse, "bench_fleet", &cluster);
    let single = Rate {
        events_per_s: events as f64 / run.secs,
        mb_per_s: mb / run.secs,
        cpu_s: run.cpu_s,
    };
    ctx.add(bridge_row(
        "bridge -> PostgreSQL sink in a fleet of one (fenced)",
        events,
        mb,
        &fleet,
        &[(raw, "raw COPY"), (single, "the same without [cluster]")],
    ));
    drop(pg);
    drop(db);
}

/// One run of the bridge into the `postgres` sink's `table` of `db`, with `extra` TOML after
/// the sink (a `[cluster]`), timed until the table holds every event.
fn pg_bridge_run(
    ctx: &Ctx,
    pg: &mut Pg,
    db: &postgres::TestDb,
    events: usize,
    sse: Bytes,
    table: &str,
    extra: &str,
) -> Run {
    let dir = ctx.scratch();
    let sink = format!(
        "[sink.out]\ntype = \"postgres\"\nurl = \"{}\"\ntable = \"{table}\"\n{extra}",
        db.url()
    );
    let query = format!("SELECT coalesce(max(seq), 0) FROM {table} WHERE feed = $1");
    let mut last_read = Instant::now() - Duration::from_secs(1);
    let mut seen = 0u64;
    run_one_feed(ctx, dir.path(), events, sse, &sink, || {
        // A query every 20 ms at most, on one connection: the figure is within 20 ms.
        if last_read.elapsed() >= Duration::from_millis(20) {
            last_read = Instant::now();
            seen = pg.runtime.block_on(async {
                pg.client
                    .query_one(&query, &[&FEED])
                    .await
                    .map(|r| r.get::<_, i64>(0) as u64)
                    .unwrap_or(0)
            });
        }
        seen
    })
}

/// One feed into the Kafka sink against a local broker, beside a bare rdkafka producer sending
/// the same records (value, key, the five headers, timestamp) with the sink's settings (lz4,
/// idempotent, `acks=all`) to the same broker in the same run (the goal: at least 50 % of
/// the raw rate). The broker is tansu (as in `tests/kafka.rs`), started here on a free port
/// with in-memory storage, one partition per topic; without tansu the row says so.
/// `BENCH_KAFKA_EVENTS` (default 500 000) sets the size.
fn scenario_kafka(ctx: &Ctx) {
    use rdkafka::config::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

    let events = env_usize("BENCH_KAFKA_EVENTS", 500_000);
    let Some(broker) = ctx.rt.block_on(Broker::start()) else {
        let mut row = Row::new("bridge -> Kafka sink");
        row.ratios.push((
            f64::NAN,
            "not measured: tansu is not installed (`cargo install tansu --version 0.6.0 \
             --locked --features dynostore`, or run `.ci/run` once)"
                .to_string(),
        ));
        ctx.add(row);
        return;
    };
    let parse = ctx.parse();
    let mut sse = Vec::new();
    for n in 1..=events {
        event_text(n, &mut sse);
    }
    let mb = sse.len() as f64 / 1e6;

    // The broker's topics.
    let addr = broker.addr.clone();
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &addr);
    ctx.rt
        .block_on(broker.create_topics(&[("bench-raw", 1), ("bench-sink", 1)]));

    // Raw: the same records as the sink sends, with its producer settings.
    let records: Vec<Event> = (1..=events).map(event_of).collect();
    let cpu0 = cpu_seconds(std::process::id());
    let started = Instant::now();
    let producer: ThreadedProducer<DefaultProducerContext> = client
        .clone()
        .set("compression.type", "lz4")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .set("client.id", "sse-bridge")
        .create()
        .expect("producer");
    for e in &records {
        let seq = e.seq.to_string();
        let at = e
            .received_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let headers = OwnedHeaders::new_with_capacity(5)
            .insert(Header {
                key: "sse-feed",
                value: Some(&*e.feed),
            })
            .insert(Header {
                key: "sse-type",
                value: Some(&*e.event_type),
            })
            .insert(Header {
                key: "sse-id",
                value: Some(&*e.id),
            })
            .insert(Header {
                key: "sse-seq",
                value: Some(seq.as_str()),
            })
            .insert(Header {
                key: "received-at",
                value: Some(at.as_str()),
            });
        let mut record = BaseRecord::to("bench-raw")
            .payload(e.data.as_bytes())
            .key(FEED)
            .headers(headers)
            .timestamp(e.received_at.timestamp_millis());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                // The queue is full: wait for delivery reports to make room.
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .expect("every record delivered");
    let secs = started.elapsed().as_secs_f64();
    let raw = Rate {
        events_per_s: events as f64 / secs,
        mb_per_s: mb / secs,
        cpu_s: cpu_seconds(std::process::id()) - cpu0,
    };
    drop(producer);
    drop(records);
    let mut row = Row::new("raw: bare rdkafka producer, same records and settings");
    row.events = Some(events as u64);
    row.events_per_s = Some(raw.events_per_s);
    row.mb_per_s = Some(raw.mb_per_s);
    row.cpu_s = Some(raw.cpu_s);
    ctx.add(row);

    // The bridge. An event is stored once Kafka confirmed it and the checkpoint passed it:
    // the checkpoint, committed every 10 ms here, tells when the last one is.
    let bridge_dir = ctx.scratch();
    let state = bridge_dir.path().join("state.db");
    let sink =
        format!("[sink.out]\ntype = \"kafka\"\nbrokers = {addr:?}\ntopic = \"bench-sink\"\n");
    std::env::set_var("SSE_BRIDGE_STATE__COMMIT_INTERVAL", "10ms");
    let mut reader: Option<rusqlite::Connection> = None;
    let run = run_one_feed(
        ctx,
        bridge_dir.path(),
        events,
        Bytes::from(sse),
        &sink,
        || {
            if reader.is_none() {
                reader = rusqlite::Connection::open_with_flags(
                    &state,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .ok();
            }
            reader
                .as_ref()
                .and_then(|c| {
                    c.query_row("SELECT seq FROM checkpoints WHERE feed = ?1", [FEED], |r| {
                        r.get::<_, i64>(0)
                    })
                    .ok()
                })
                .unwrap_or(0) as u64
        },
    );
    std::env::remove_var("SSE_BRIDGE_STATE__COMMIT_INTERVAL");
    drop(broker);
    let row = bridge_row(
        "bridge -> Kafka sink (lz4, idempotent, acks=all)",
        events,
        mb,
        &run,
        &[(raw, "bare rdkafka"), (parse, "bare parse")],
    );
    let ratio = row.events_per_s.unwrap_or(0.0) / raw.events_per_s;
    ctx.add(row);
    ctx.note(format!(
        "Kafka sink: {:.0} % of a bare rdkafka producer's rate to the same broker (goal: at least \
         50 %); tansu on 127.0.0.1, one partition",
        100.0 * ratio
    ));
}

// ---- many feeds -----------------------------------------------------------------------------

/// A config with `n` feeds to `generator`, all routed to one file sink (which idle feeds never
/// write to).
fn many_feeds_config(dir: &Path, generator: &Server, n: usize) -> String {
    many_feeds_config_at(dir, &generator.url_for(""), "", n)
}

/// [`many_feeds_config`] to `base` (`http://HOST:PORT`), each feed with `extra` TOML lines.
fn many_feeds_config_at(dir: &Path, base: &str, extra: &str, n: usize) -> String {
    let mut config = format!(
        "[state]\npath = {:?}\n\n[log]\nlevel = \"warn\"\n\n",
        dir.join("state.db")
    );
    for i in 0..n {
        config.push_str(&feed_toml(&format!("f{i:05}"), &format!("{base}/f{i}")));
        config.push_str(extra);
    }
    let _ = write!(
        config,
        "[sink.out]\ntype = \"file\"\npath = {:?}\n\n[routing]\ndefault = [\"out\"]\n",
        dir.join("events").join("{feed}.jsonl")
    );
    config
}

fn scenario_idle(ctx: &Ctx) {
    let feeds = env_usize("BENCH_IDLE_FEEDS", 10_000);
    let idle = Duration::from_secs(env_usize("BENCH_IDLE_SECS", 30) as u64);
    let dir = ctx.scratch();
    let mut generator = generator(ctx, Body::Idle, Duration::from_secs(10));
    let mut bridge = start_bridge(
        dir.path(),
        &many_feeds_config(dir.path(), &generator, feeds),
    );
    let started = Instant::now();
    let all_open = wait_until(
        &mut bridge,
        Duration::from_secs(300),
        Duration::from_millis(20),
        || generator.open_connections() >= feeds,
    );
    let open_secs = started.elapsed().as_secs_f64();
    let startup_cpu = bridge.cpu_seconds();
    let startup_rss = bridge.peak_rss().unwrap_or(0);
    assert!(
        all_open,
        "only {} of {feeds} feeds opened in 300 s",
        generator.open_connections()
    );
    println!(
        "{feeds} feeds open after {open_secs:.1} s; CPU {startup_cpu:.2} s; peak RSS {} so far",
        mib(startup_rss)
    );
    std::thread::sleep(idle);
    let idle_cpu = bridge.cpu_seconds() - startup_cpu;
    let peak = bridge.peak_rss().unwrap_or(0);
    let rss = bridge.rss().unwrap_or(0);
    let still_open = generator.open_connections();
    let complaints = complaints(&bridge);
    let drain = stop_bridge(ctx, bridge);
    stop_generator(&mut generator);
    ctx.add(idle_row(
        format!("{feeds} idle feeds: start + {} s idle", idle.as_secs()),
        startup_cpu + idle_cpu,
        peak,
        (IDLE_RSS_BUDGET, "256 MiB budget"),
    ));
    ctx.note(format!(
        "idle: all {feeds} open after {open_secs:.1} s (CPU {startup_cpu:.2} s); idle {} s: CPU {idle_cpu:.2} s \
         ({:.1} % of one core), RSS {} (peak {}, {:.0} KiB per feed); {still_open} still open at the end; \
         SIGTERM drain {:.1} s; {} warnings/errors logged",
        idle.as_secs(),
        100.0 * idle_cpu / idle.as_secs_f64(),
        mib(rss),
        mib(peak),
        peak as f64 / 1024.0 / feeds as f64,
        drain.as_secs_f64(),
        complaints.len()
    ));
}

/// The row of an idle scenario: CPU, peak RSS and its ratio to `budget`.
fn idle_row(what: String, cpu_s: f64, peak: u64, budget: (u64, &str)) -> Row {
    let mut row = Row::new(what);
    row.cpu_s = Some(cpu_s);
    row.peak_rss = Some(peak);
    row.ratios
        .push((peak as f64 / budget.0 as f64, budget.1.to_string()));
    row
}

fn scenario_http2(ctx: &Ctx) {
    // One busy feed: HTTP/1.1 and HTTP/2 in the same run.
    let stream = ctx.stream();
    let h1 = file_run_over(ctx, "interval", false);
    let h2 = file_run_over(ctx, "interval", true);
    let h1_rate = Rate {
        events_per_s: stream.events as f64 / h1.secs,
        mb_per_s: stream.mb() / h1.secs,
        cpu_s: h1.cpu_s,
    };
    for (what, run) in [("HTTP/1.1", &h1), ("HTTP/2", &h2)] {
        ctx.add(bridge_row(
            &format!("bridge -> file sink (fsync interval) over {what}"),
            stream.events,
            stream.mb(),
            run,
            &[(h1_rate, "the same over HTTP/1.1")],
        ));
    }

    // Idle feeds over HTTP/2, all to one origin: an HTTP/2 server of heartbeats only
    // (`tests/support/h2.rs`, in this process; 100 streams per connection, as nginx's default).
    let feeds = env_usize("BENCH_IDLE_FEEDS", 10_000);
    let idle = Duration::from_secs(env_usize("BENCH_IDLE_SECS", 30) as u64);
    let dir = ctx.scratch();
    let server = ctx
        .rt
        .block_on(support::h2::H2Server::start(support::h2::Options {
            heartbeat: Some(Duration::from_secs(10)),
            max_streams: 100,
            ..support::h2::Options::default()
        }));
    let mut bridge = start_bridge(
        dir.path(),
        &many_feeds_config_at(
            dir.path(),
            &format!("http://{}", server.addr),
            "http_version = \"2\"\n\n",
            feeds,
        ),
    );
    let started = Instant::now();
    let all_open = wait_until(
        &mut bridge,
        Duration::from_secs(300),
        Duration::from_millis(20),
        || server.request_count() >= feeds,
    );
    let open_secs = started.elapsed().as_secs_f64();
    let startup_cpu = bridge.cpu_seconds();
    assert!(
        all_open,
        "only {} of {feeds} HTTP/2 feeds opened in 300 s; the bridge logged: {:#?}",
        server.request_count(),
        complaints(&bridge).iter().take(10).collect::<Vec<_>>()
    );
    std::thread::sleep(idle);
    let idle_cpu = bridge.cpu_seconds() - startup_cpu;
    let peak = bridge.peak_rss().unwrap_or(0);
    let rss = bridge.rss().unwrap_or(0);
    let connections = connections_of(&bridge);
    let complaints = complaints(&bridge);
    stop_bridge(ctx, bridge);
    drop(server);
    ctx.add(idle_row(
        format!(
            "{feeds} idle feeds over HTTP/2: start + {} s idle",
            idle.as_secs()
        ),
        startup_cpu + idle_cpu,
        peak,
        (IDLE_H2_RSS_BUDGET, "64 MiB goal"),
    ));
    ctx.note(format!(
        "idle over HTTP/2: all {feeds} open after {open_secs:.1} s (CPU {startup_cpu:.2} s) on \
         {connections} TCP connections; idle {} s: CPU {idle_cpu:.2} s; RSS {} (peak {}, {:.1} KiB \
         per feed); {} warnings/errors logged",
        idle.as_secs(),
        mib(rss),
        mib(peak),
        peak as f64 / 1024.0 / feeds as f64,
        complaints.len()
    ));
}

/// The bridge's TCP sockets (from `/proc/PID/fd`).
fn connections_of(bridge: &Bridge) -> usize {
    let pid = bridge.pid();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn scenario_reconnect(ctx: &Ctx) {
    let feeds = env_usize("BENCH_RECONNECT_FEEDS", 1_000);
    let down = Duration::from_secs(1);
    let dir = ctx.scratch();
    let mut generator = generator(ctx, Body::Idle, Duration::from_secs(10));
    let mut bridge = start_bridge(
        dir.path(),
        &many_feeds_config(dir.path(), &generator, feeds),
    );
    assert!(
        wait_until(
            &mut bridge,
            Duration::from_secs(120),
            Duration::from_millis(20),
            || { generator.open_connections() >= feeds }
        ),
        "only {} of {feeds} feeds opened",
        generator.open_connections()
    );
    std::thread::sleep(Duration::from_secs(2));
    // The restart: every connection and the listener go away; the server is back after `down`.
    let restart = Instant::now();
    let cpu0 = bridge.cpu_seconds();
    stop_generator(&mut generator);
    std::thread::sleep(down.saturating_sub(restart.elapsed()));
    let before = generator.count();
    ctx.rt.block_on(generator.restart());
    let back = restart.elapsed();
    let all = wait_until(
        &mut bridge,
        Duration::from_secs(120),
        Duration::from_millis(20),
        || generator.open_connections() >= feeds,
    );
    let cpu = bridge.cpu_seconds() - cpu0;
    let mut offsets: Vec<f64> = generator.requests()[before..]
        .iter()
        .map(|r| r.at.duration_since(restart).as_secs_f64())
        .collect();
    offsets.sort_by(f64::total_cmp);
    stop_bridge(ctx, bridge);
    stop_generator(&mut generator);
    assert!(
        all,
        "only {} of {feeds} feeds reconnected in 120 s",
        offsets.len()
    );

    let q = |p: f64| offsets[((offsets.len() - 1) as f64 * p).round() as usize];
    const BUCKET: f64 = 0.1;
    let first = (offsets[0] / BUCKET).floor() as i64;
    let last = (offsets[offsets.len() - 1] / BUCKET).floor() as i64;
    let mut buckets = vec![0usize; (last - first + 1) as usize];
    for o in &offsets {
        buckets[((o / BUCKET).floor() as i64 - first) as usize] += 1;
    }
    let peak = buckets.iter().copied().max().unwrap_or(0);
    println!(
        "reconnections after the restart (server back after {:.1} s), per 100 ms:",
        back.as_secs_f64()
    );
    for (i, count) in buckets.iter().enumerate() {
        let at = (first + i as i64) as f64 * BUCKET;
        println!(
            "  {at:5.1} s {count:5} {}",
            "#".repeat((count * 60).div_ceil(peak.max(1)))
        );
    }
    let mut row = Row::new(format!("{feeds} feeds reconnecting after a server restart"));
    row.events = Some(offsets.len() as u64);
    row.cpu_s = Some(cpu);
    row.ratios.push((
        peak as f64 / offsets.len() as f64,
        "of the feeds in the busiest 100 ms (1.00 = synchronised)".into(),
    ));
    ctx.add(row);
    ctx.note(format!(
        "reconnect: {} requests from {feeds} feeds; first {:.2} s, p10 {:.2} s, p50 {:.2} s, p90 {:.2} s, last {:.2} s \
         after the restart (spread p10-p90 {:.2} s, first-last {:.2} s); busiest 100 ms: {peak}; bridge CPU {cpu:.2} s",
        offsets.len(),
        q(0.0),
        q(0.1),
        q(0.5),
        q(0.9),
        q(1.0),
        q(0.9) - q(0.1),
        q(1.0) - q(0.0),
    ));
}

// ---- output ---------------------------------------------------------------------------------

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / 1024.0 / 1024.0)
}

fn cell<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

fn format_row(row: &Row) -> String {
    let ratios: Vec<String> = row
        .ratios
        .iter()
        .map(|(r, name)| {
            if r.is_nan() {
                name.clone()
            } else if name.starts_with("of the") {
                format!("{r:.2} {name}")
            } else {
                format!("{:.0} % of {name}", 100.0 * r)
            }
        })
        .collect();
    format!(
        "| {} | {} | {} | {} | {} | {} | {} |",
        row.what,
        cell(row.events, |v| v.to_string()),
        cell(row.events_per_s, |v| format!("{:.0}", v)),
        cell(row.mb_per_s, |v| format!("{v:.0}")),
        cell(row.cpu_s, |v| format!("{v:.2}")),
        cell(row.peak_rss, mib),
        ratios.join("; ")
    )
}

fn print_row(row: &Row) {
    println!("{}", format_row(row));
}

fn print_report(ctx: &Ctx) {
    println!("\n## Results\n");
    println!("| scenario | events | events/s | MB/s (SSE in) | CPU s | peak RSS | ratio to the raw limit |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    for row in ctx.report.lock().expect("report").iter() {
        print_row(row);
    }
    println!();
    for note in ctx.notes.lock().expect("notes").iter() {
        println!("- {note}");
    }
}
