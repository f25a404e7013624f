//! A Kafka-protocol broker for process-level tests: tansu (<https://crates.io/crates/tansu>)
//! on a free port of 127.0.0.1 with in-memory storage, one per test, and a consumer that reads
//! a topic back. Used by tests/kafka.rs and tests/crash_loop.rs.
//!
//! tansu is found on `PATH` or in `~/.cargo/bin` (`.ci/run` installs it). Without it
//! [`Broker::start`] prints a loud note and returns `None`, unless a broker is required (`CI`
//! or `SSE_BRIDGE_REQUIRE_KAFKA=1` in the environment): then it panics.
//!
//! Included with `#[path = "support/kafka.rs"] mod kafka;` next to `mod support;`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::support::wait_for;

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

/// Whether a missing broker fails the test instead of skipping its Kafka part.
pub fn broker_required() -> bool {
    let set = |v: &str| {
        std::env::var(v)
            .is_ok_and(|s| !s.is_empty() && s != "0" && !s.eq_ignore_ascii_case("false"))
    };
    set("CI") || set("SSE_BRIDGE_REQUIRE_KAFKA")
}

/// A tansu broker on 127.0.0.1 with in-memory storage, killed when dropped.
pub struct Broker {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

impl Broker {
    /// Starts a broker, or returns `None` (after a loud note) when tansu is not installed
    /// and no broker is required. Panics when one is required and cannot be started.
    pub async fn start() -> Option<Broker> {
        let Some(tansu) = find_tansu() else {
            let message = "tansu (a Kafka-protocol broker) is not installed: not on PATH, not \
                           in ~/.cargo/bin. Install it with `cargo install tansu --version 0.6.0 \
                           --locked --features dynostore`, or run `.ci/run`";
            if broker_required() {
                panic!(
                    "{message} (a broker is required here: CI or SSE_BRIDGE_REQUIRE_KAFKA is set)"
                );
            }
            eprintln!("\n*** SKIPPED (Kafka): {message} ***\n");
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
            eprintln!("\n*** SKIPPED (Kafka): {message} ***\n");
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

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is answered.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Resumes a frozen broker (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {}", self.pid());
    }

    /// Records in `topic` now (sum of the high watermarks, which tansu may report late).
    pub fn count(&self, topic: &str, partitions: i32) -> i64 {
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

    /// The broker's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.addr);
        c
    }

    /// Creates topics (tansu creates none by itself).
    pub async fn create_topics(&self, topics: &[(&str, i32)]) {
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

    /// Every record of `topic` up to its end, partition by partition in offset order. Reads
    /// until at least `at_least` records arrived and then nothing new for `quiet` (tansu's
    /// high watermarks can lag behind the last records, so they cannot tell where it ends).
    pub fn read_topic(&self, topic: &str, at_least: usize, quiet: Duration) -> Vec<Record> {
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
        let mut records = Vec::new();
        let started = Instant::now();
        let mut last_record = Instant::now();
        while records.len() < at_least || last_record.elapsed() < quiet {
            assert!(
                started.elapsed() < Duration::from_secs(300),
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
        records
    }
}
