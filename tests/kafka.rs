//! The Kafka sink against a real Kafka-protocol broker: the real binary, a real SSE server on
//! 127.0.0.1, and tansu (<https://crates.io/crates/tansu>) started by each test on a free port
//! with in-memory storage, so tests never share a broker.
//!
//! tansu is found on `PATH` or in `~/.cargo/bin` (`.ci/run` installs it). Without it these
//! tests print a loud note and pass, unless a broker is expected: with `CI` or
//! `SSE_BRIDGE_REQUIRE_KAFKA=1` in the environment they fail.
//!
//! The error paths of the sink (produce errors, timeouts, a broker down) are tested in
//! `src/sink/kafka.rs` against librdkafka's mock cluster, in every `cargo test`.
//!
//! The benchmark of the sink against a bare rdkafka producer is `cargo bench --bench bridge --
//! kafka` (benches/bridge.rs).

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use support::{bin, event_type, wait_for, write_file, LogServer};

// ---------------------------------------------------------------------------------------------
// The broker.

/// Where the tansu binary is, if anywhere: `PATH`, then `$CARGO_HOME/bin`, `~/.cargo/bin`.
fn find_tansu() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("tansu")));
    }
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        candidates.push(PathBuf::from(home).join("bin/tansu"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/tansu"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Prints a note that the harness does not capture (`eprintln!` output of a passing test is
/// hidden), so a skipped Kafka test is seen.
fn skip_note(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {message} ***\n");
}

/// Whether a missing broker fails the test instead of skipping it.
fn broker_required() -> bool {
    let set = |v: &str| {
        std::env::var(v)
            .is_ok_and(|s| !s.is_empty() && s != "0" && !s.eq_ignore_ascii_case("false"))
    };
    set("CI") || set("SSE_BRIDGE_REQUIRE_KAFKA")
}

/// A tansu broker on 127.0.0.1 with in-memory storage, killed when dropped.
struct Broker {
    child: Child,
    /// `127.0.0.1:PORT`.
    addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// Starts a broker, or returns `None` (after a loud note) when tansu is not installed
    /// and no broker is required. Panics when one is required and cannot be started.
    async fn start() -> Option<Broker> {
        let Some(tansu) = find_tansu() else {
            let message = "tansu (a Kafka-protocol broker) is not installed: not on PATH, not \
                           in ~/.cargo/bin. Install it with `cargo install tansu --version 0.6.0 \
                           --locked --features dynostore`, or run `.ci/run`";
            if broker_required() {
                panic!(
                    "{message} (a broker is required here: CI or SSE_BRIDGE_REQUIRE_KAFKA is set)"
                );
            }
            skip_note(message);
            return None;
        };
        let help = Command::new(&tansu).arg("--help").output();
        let usable = help
            .as_ref()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("dynostore"));
        if !usable {
            let message = format!(
                "{} has no storage engine (`tansu --help` does not list dynostore); reinstall \
                 it with `cargo install tansu --version 0.6.0 --locked --features dynostore`",
                tansu.display()
            );
            if broker_required() {
                panic!("{message}");
            }
            skip_note(&message);
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("tansu.log");
        // A free port: bound, noted, released; tansu binds it right after.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let url = format!("tcp://{addr}");
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(&tansu)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", tansu.display()));
        let mut broker = Broker {
            child,
            addr,
            log,
            _dir: dir,
        };
        let ready = wait_for(Duration::from_secs(20), || {
            std::net::TcpStream::connect(&broker.addr).is_ok()
        })
        .await;
        if !ready || broker.child.try_wait().ok().flatten().is_some() {
            panic!(
                "tansu did not start on {}: {}",
                broker.addr,
                std::fs::read_to_string(&broker.log).unwrap_or_default()
            );
        }
        Some(broker)
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is answered.
    fn freeze(&self) {
        signal("-STOP", &self.pid());
    }

    fn thaw(&self) {
        signal("-CONT", &self.pid());
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.addr);
        c
    }

    /// Creates topics (tansu creates none by itself).
    async fn create_topics(&self, topics: &[(&str, i32)]) {
        let admin: AdminClient<DefaultClientContext> =
            self.client_config().create().expect("admin client");
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
            .collect();
        let results = admin
            .create_topics(
                &new,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .expect("create topics");
        for r in results {
            if let Err((name, e)) = r {
                panic!("cannot create topic {name}: {e}");
            }
        }
    }

    /// Every record of `topic` up to its current end, partition by partition in offset order.
    fn read_topic(&self, topic: &str) -> Vec<Record> {
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", "sse-bridge-tests")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "50")
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().len())
            .unwrap_or(0) as i32;
        assert!(partitions > 0, "topic {topic} has no partitions");
        let mut list = TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition_offset(topic, p, Offset::Beginning)
                .expect("assign");
        }
        consumer.assign(&list).expect("assign");
        // Read until nothing new arrives for a while. (tansu's high watermarks can lag behind
        // the last records, so they cannot tell where a partition ends.)
        let mut records = Vec::new();
        let started = Instant::now();
        let mut last_record = Instant::now();
        while last_record.elapsed() < Duration::from_secs(2) {
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "reading {topic} took too long: {} records so far",
                records.len()
            );
            let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = m.expect("consume");
            last_record = Instant::now();
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            records.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
        records.sort_by_key(|r| (r.partition, r.offset));
        if std::env::var_os("KAFKA_TEST_DEBUG").is_some() {
            let mut per: BTreeMap<i32, (usize, i64, i64)> = BTreeMap::new();
            for r in &records {
                let e = per.entry(r.partition).or_insert((0, i64::MAX, 0));
                e.0 += 1;
                e.1 = e.1.min(r.offset);
                e.2 = e.2.max(r.offset);
            }
            eprintln!("{topic}: read (count, min, max) {per:?}");
        }
        records
    }

    /// Records in `topic` now (sum of the high watermarks).
    fn count(&self, topic: &str, partitions: i32) -> i64 {
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", "sse-bridge-tests")
            .create()
            .expect("consumer");
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(5))
                    .map(|(_, high)| high)
                    .unwrap_or(0)
            })
            .sum()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(sig: &str, pid: &str) {
    let status = Command::new("kill")
        .args([sig, pid])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pid}");
}

/// One consumed record.
#[derive(Debug, Clone)]
struct Record {
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// The event number, from the `sse-id` header.
    fn id(&self) -> u64 {
        self.header("sse-id")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("record without a numeric sse-id: {self:?}"))
    }

    /// Checks everything the bridge puts in a record of event `n` of feed `wiki`.
    fn assert_event(&self, n: u64) {
        assert_eq!(
            self.payload,
            expected_data(n).into_bytes(),
            "data of event {n}, byte for byte"
        );
        assert_eq!(self.header("sse-feed").as_deref(), Some("wiki"));
        assert_eq!(self.header("sse-type").as_deref(), Some(event_type(n)));
        assert_eq!(self.header("sse-id"), Some(n.to_string()));
        assert_eq!(self.header("sse-seq"), Some(n.to_string()));
        let at = self.header("received-at").expect("received-at header");
        assert!(
            at.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(&at).is_ok(),
            "received-at {at:?}"
        );
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            ["sse-feed", "sse-type", "sse-id", "sse-seq", "received-at"]
        );
    }
}

/// The data of event `n` as the test server sends it.
fn expected_data(n: u64) -> String {
    format!("{{\"n\":{n},\"title\":\"Page {n}\",\"comment\":\"résumé ✓\"}}")
}

// ---------------------------------------------------------------------------------------------
// The bridge.

struct Bridge {
    child: Child,
    log: PathBuf,
}

impl Bridge {
    fn start(config: &Path, log: PathBuf) -> Bridge {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin())
            .args(["run", "--log-format", "json", "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn sse-bridge");
        Bridge { child, log }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The bridge's resident memory in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn kill_9(&mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit code (within `within`).
    async fn terminate(&mut self, within: Duration) -> Option<i32> {
        signal("-TERM", &self.child.id().to_string());
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(
                started.elapsed() < within,
                "no exit within {within:?} after SIGTERM; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The committed checkpoint of feed `wiki`: `(last event id, seq)`.
fn checkpoint(state: &Path) -> Option<(String, u64)> {
    let conn = rusqlite::Connection::open(state).ok()?;
    conn.query_row(
        "SELECT last_event_id, seq FROM checkpoints WHERE feed = 'wiki'",
        [],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)),
    )
    .ok()
}

fn checkpoint_seq(state: &Path) -> u64 {
    checkpoint(state).map(|(_, s)| s).unwrap_or(0)
}

/// A config with one feed `wiki` from `url`; `sinks_and_routes` is appended.
fn config(dir: &Path, url: &str, sinks_and_routes: &str) -> PathBuf {
    let text = format!(
        r#"
[state]
path = "{dir}/state.db"
commit_interval = "200ms"

[shutdown]
timeout = "30s"

[[feed]]
name = "wiki"
url = "{url}"
default_retry = "100ms"

{sinks_and_routes}
"#,
        dir = dir.display()
    );
    write_file(dir, "bridge.toml", &text)
}

// ---------------------------------------------------------------------------------------------
// End to end.

const TOTAL: u64 = 100_000;

/// 100 000 events routed by type into two topics (`edit` into `wiki-edits` keyed by event ID
/// over 3 partitions; `log` and `new` into `wiki-rest` keyed by a JSON pointer over 2), read
/// back: count, order per partition, keys, headers and the bytes of `data`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_end_to_end_100k_events_routed_by_type_into_two_topics() {
    let Some(broker) = Broker::start().await else {
        return;
    };
    broker
        .create_topics(&[("wiki-edits", 3), ("wiki-rest", 2)])
        .await;
    let server = LogServer::start(TOTAL, 1000, Duration::from_millis(1)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(
        dir.path(),
        &server.url(),
        &format!(
            r#"
[sink.edits]
type = "kafka"
brokers = "{addr}"
topic = "{{feed}}-edits"
key = "id"
compression = "zstd"

[sink.rest]
type = "kafka"
brokers = "{addr}"
topic = "{{feed}}-rest"
key = "/n"

[[route]]
event = "edit"
sinks = ["edits"]

[[route]]
event = "*"
sinks = ["rest"]
"#,
            addr = broker.addr
        ),
    );
    let state = dir.path().join("state.db");
    let started = Instant::now();
    let mut bridge = Bridge::start(&config, dir.path().join("bridge.log"));
    assert!(
        wait_for(Duration::from_secs(120), || checkpoint_seq(&state) == TOTAL).await,
        "checkpoint {:?} after {:?}; logs:\n{}",
        checkpoint(&state),
        started.elapsed(),
        bridge.logs()
    );
    let elapsed = started.elapsed();
    assert_eq!(bridge.terminate(Duration::from_secs(30)).await, Some(0));
    assert_eq!(checkpoint(&state), Some((TOTAL.to_string(), TOTAL)));

    let read_started = Instant::now();
    let edits = broker.read_topic("wiki-edits");
    let rest = broker.read_topic("wiki-rest");
    eprintln!(
        "100 000 events through the bridge into Kafka in {elapsed:?}; read back in {:?}",
        read_started.elapsed()
    );
    let expected_edits = (1..=TOTAL).filter(|n| event_type(*n) == "edit").count();
    assert_eq!(edits.len(), expected_edits, "records in wiki-edits");
    assert_eq!(
        rest.len(),
        TOTAL as usize - expected_edits,
        "records in wiki-rest"
    );

    let mut seen = vec![false; TOTAL as usize + 1];
    for (records, partitions, types) in
        [(&edits, 3, &["edit"][..]), (&rest, 2, &["log", "new"][..])]
    {
        let mut last: BTreeMap<i32, u64> = BTreeMap::new();
        for r in records {
            let n = r.id();
            assert!((1..=TOTAL).contains(&n), "id {n}");
            assert!(!seen[n as usize], "event {n} stored twice");
            seen[n as usize] = true;
            assert!(
                types.contains(&event_type(n)),
                "event {n} in the wrong topic"
            );
            r.assert_event(n);
            assert_eq!(r.key, Some(n.to_string().into_bytes()), "key of event {n}");
            let previous = last.insert(r.partition, n);
            assert!(
                previous.is_none_or(|p| p < n),
                "partition {} has {n} after {previous:?}: out of order",
                r.partition
            );
        }
        assert_eq!(
            last.len(),
            partitions,
            "keys spread the events over every partition"
        );
    }
    assert!(seen[1..].iter().all(|s| *s), "every event arrived");
    let logs = bridge.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(logs.contains("kafka sink closed"), "{logs}");
}

// ---------------------------------------------------------------------------------------------
// Outage: the broker frozen for 20 s mid-stream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_frozen_20s_holds_the_feed_back_and_loses_nothing() {
    const N: u64 = 40_000;
    let Some(broker) = Broker::start().await else {
        return;
    };
    broker.create_topics(&[("wiki", 1)]).await;
    // About 10 000 events/s for 4 s: the freeze comes in the middle of the stream.
    let server = LogServer::start(N, 200, Duration::from_millis(20)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(
        dir.path(),
        &server.url(),
        &format!(
            r#"
[sink.kafka]
type = "kafka"
brokers = "{addr}"
topic = "wiki"

[[route]]
sinks = ["kafka"]
"#,
            addr = broker.addr
        ),
    );
    let state = dir.path().join("state.db");
    let mut bridge = Bridge::start(&config, dir.path().join("bridge.log"));
    assert!(
        wait_for(Duration::from_secs(60), || checkpoint_seq(&state) >= 5_000).await,
        "no progress before the freeze; logs:\n{}",
        bridge.logs()
    );

    broker.freeze();
    let frozen_at = Instant::now();
    // Let what the broker answered before it stopped reach the checkpoint.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = checkpoint_seq(&state);
    let rss_start = bridge.rss_kib();
    let mut rss_max = rss_start;
    while frozen_at.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            checkpoint_seq(&state),
            held,
            "the checkpoint moved while the broker could not confirm anything"
        );
        rss_max = rss_max.max(bridge.rss_kib());
    }
    assert!(held < N, "the stream was not over when the broker froze");
    broker.thaw();
    eprintln!(
        "frozen 20 s with the checkpoint held at {held}; bridge memory {rss_start} KiB -> at \
         most {rss_max} KiB while frozen"
    );
    assert!(
        rss_max < 200 * 1024 && rss_max < rss_start + 50 * 1024,
        "memory grew while the broker was frozen: {rss_start} KiB -> {rss_max} KiB"
    );

    assert!(
        wait_for(Duration::from_secs(90), || checkpoint_seq(&state) == N).await,
        "checkpoint {:?} after the broker came back; logs:\n{}",
        checkpoint(&state),
        bridge.logs()
    );
    assert_eq!(bridge.terminate(Duration::from_secs(30)).await, Some(0));

    let records = broker.read_topic("wiki");
    let mut next = 1u64;
    let mut duplicates = 0;
    let mut first: HashMap<u64, &Record> = HashMap::new();
    for r in &records {
        let n = r.id();
        r.assert_event(n);
        if n == next {
            next += 1;
            first.insert(n, r);
        } else {
            // Only a record sent again after a failed delivery can repeat, with the same
            // headers and data.
            assert!(n < next, "event {n} arrived before event {next}");
            let original = first[&n];
            assert_eq!(r.headers[..4], original.headers[..4]);
            duplicates += 1;
        }
    }
    assert_eq!(next, N + 1, "every event arrived, in order");
    eprintln!("{} records, {duplicates} duplicates", records.len());
    assert!(!bridge.logs().contains("panicked"));
}

// ---------------------------------------------------------------------------------------------
// kill -9 of the bridge mid-stream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_kill_9_then_restart_loses_nothing_and_duplicates_carry_the_same_id() {
    use rand::Rng;
    let Some(broker) = Broker::start().await else {
        return;
    };
    broker.create_topics(&[("wiki", 1)]).await;
    // About 25 000 events/s for 4 s.
    let server = LogServer::start(TOTAL, 500, Duration::from_millis(20)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(
        dir.path(),
        &server.url(),
        &format!(
            r#"
[sink.kafka]
type = "kafka"
brokers = "{addr}"
topic = "wiki"

[[route]]
sinks = ["kafka"]
"#,
            addr = broker.addr
        ),
    );
    let state = dir.path().join("state.db");
    let mut bridge = Bridge::start(&config, dir.path().join("run1.log"));
    let kill_after = rand::thread_rng().gen_range(5_000..60_000);
    assert!(
        wait_for(Duration::from_secs(60), || broker.count("wiki", 1)
            >= kill_after)
        .await,
        "{} records in the topic, wanted {kill_after}; logs:\n{}",
        broker.count("wiki", 1),
        bridge.logs()
    );
    bridge.kill_9();
    let (cp_id, cp_seq) = checkpoint(&state).expect("a checkpoint was committed before the kill");
    let committed: u64 = cp_id.parse().expect("numeric checkpoint");
    assert_eq!(committed, cp_seq);

    let mut bridge = Bridge::start(&config, dir.path().join("run2.log"));
    assert!(
        wait_for(Duration::from_secs(120), || checkpoint_seq(&state) == TOTAL).await,
        "checkpoint {:?} after the restart; logs:\n{}",
        checkpoint(&state),
        bridge.logs()
    );
    assert_eq!(bridge.terminate(Duration::from_secs(30)).await, Some(0));
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[1].last_event_id.as_deref(), Some(cp_id.as_str()));

    // One partition, one producer at a time: the topic holds run 1's records 1..=L, then
    // run 2's from the committed checkpoint on: (committed+1)..=TOTAL.
    let records = broker.read_topic("wiki");
    let ids: Vec<u64> = records.iter().map(Record::id).collect();
    let restart = ids
        .windows(2)
        .position(|w| w[1] <= w[0])
        .map(|i| i + 1)
        // No repeat at all: run 1 stopped exactly at the checkpoint.
        .unwrap_or(committed as usize);
    let run1 = &ids[..restart];
    let run2 = &ids[restart..];
    let stored_before_kill = run1.len() as u64;
    assert!(
        run1.iter().copied().eq(1..=stored_before_kill),
        "run 1 stored a gapless prefix"
    );
    assert!(
        committed <= stored_before_kill,
        "the checkpoint {committed} ran ahead of the topic ({stored_before_kill} records)"
    );
    assert!(
        run2.iter().copied().eq(committed + 1..=TOTAL),
        "run 2 resumed right after the checkpoint {committed} and sent every later event once \
         (it starts at {:?})",
        run2.first()
    );
    let duplicates = stored_before_kill - committed;
    assert_eq!(ids.len() as u64, TOTAL + duplicates);
    // Each duplicate carries the same sse-id (and seq, type, data) as its first copy.
    for (i, r) in records[restart..].iter().enumerate() {
        let n = committed + 1 + i as u64;
        r.assert_event(n);
        if n <= stored_before_kill {
            let original = &records[(n - 1) as usize];
            assert_eq!(original.header("sse-id"), r.header("sse-id"));
            assert_eq!(original.header("sse-seq"), r.header("sse-seq"));
            assert_eq!(original.payload, r.payload);
        }
    }
    // The commit interval is 200 ms at about 25 000 events/s; the window also holds what
    // was in flight: a few commit intervals' worth at most.
    assert!(duplicates <= 20_000, "{duplicates} duplicates");
    eprintln!(
        "kill -9 with {stored_before_kill} records in the topic and the checkpoint at \
         {committed}: {duplicates} duplicates"
    );
}

// ---------------------------------------------------------------------------------------------
// A missing topic: a permanent error the operator decides about.

/// With `on_error = "block"` (the default) a missing topic holds the feed back, with an error
/// that names the topic, until the topic exists; with `on_error = "skip"` the events are
/// counted and the checkpoint moves past them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_missing_topic_blocks_until_created_or_is_skipped_and_counted() {
    const N: u64 = 300;
    let Some(broker) = Broker::start().await else {
        return;
    };
    let server = LogServer::start(N, 100, Duration::from_millis(10)).await;
    let sink = |topic: &str, on_error: &str| {
        format!(
            r#"
[sink.kafka]
type = "kafka"
brokers = "{addr}"
topic = "{topic}"
delivery_timeout = "1s"
on_error = "{on_error}"

[[route]]
sinks = ["kafka"]
"#,
            addr = broker.addr
        )
    };

    // Blocked.
    let dir = tempfile::tempdir().expect("tempdir");
    let blocking = config(dir.path(), &server.url(), &sink("late", "block"));
    let state = dir.path().join("state.db");
    let mut bridge = Bridge::start(&blocking, dir.path().join("block.log"));
    assert!(
        wait_for(Duration::from_secs(30), || bridge
            .logs()
            .contains("to topic `late`: the topic does not exist"))
        .await,
        "no clear error; logs:\n{}",
        bridge.logs()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(checkpoint_seq(&state), 0, "nothing acknowledged");
    // The operator creates the topic: the held-back events go through.
    broker.create_topics(&[("late", 1)]).await;
    assert!(
        wait_for(Duration::from_secs(60), || checkpoint_seq(&state) == N).await,
        "checkpoint {:?} after the topic was created; logs:\n{}",
        checkpoint(&state),
        bridge.logs()
    );
    assert_eq!(bridge.terminate(Duration::from_secs(30)).await, Some(0));
    let records = broker.read_topic("late");
    let mut ids: Vec<u64> = records.iter().map(Record::id).collect();
    ids.dedup();
    assert_eq!(ids, (1..=N).collect::<Vec<_>>());
    assert!(bridge
        .logs()
        .contains("\"message\":\"sink recovered; held-back events stored\""));

    // Skipped and counted.
    let dir = tempfile::tempdir().expect("tempdir");
    let skipping = config(dir.path(), &server.url(), &sink("never", "skip"));
    let state = dir.path().join("state.db");
    let mut bridge = Bridge::start(&skipping, dir.path().join("skip.log"));
    assert!(
        wait_for(Duration::from_secs(60), || checkpoint_seq(&state) == N).await,
        "checkpoint {:?}; logs:\n{}",
        checkpoint(&state),
        bridge.logs()
    );
    assert_eq!(bridge.terminate(Duration::from_secs(30)).await, Some(0));
    let logs = bridge.logs();
    assert!(
        logs.contains("on_error = \\\"skip\\\": records dropped after a permanent delivery error"),
        "{logs}"
    );
    let closed = logs
        .lines()
        .find(|l| l.contains("kafka sink closed"))
        .unwrap_or_else(|| panic!("no closing figures: {logs}"));
    let v: serde_json::Value = serde_json::from_str(closed).expect("JSON log line");
    assert_eq!(v["fields"]["skipped"], N, "{closed}");
    assert_eq!(v["fields"]["delivered"], 0, "{closed}");
}
