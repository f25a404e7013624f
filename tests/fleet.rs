//! A fleet of bridges on the machine's real PostgreSQL (ARCHITECTURE.md §9): three or four real
//! processes with the same feeds, a real SSE server, a `postgres` sink in the fleet's database.
//! Each test kills, freezes, adds, stops or cuts off one instance and checks that its feeds
//! move to the others in time and that the table ends with every event exactly once.
//!
//! The tests run one at a time (a lock): each runs several bridges, and on two cores a
//! renewal starved by another test's processes would be a false failure.

mod support;

#[path = "support/postgres.rs"]
mod postgres;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::TestDb;
use support::bridge::{write_file, Bridge};
use support::server::Server;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One test at a time (see the module comment).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const FEEDS: usize = 12;
/// Events per feed: 20 every 100 ms, about 12 s of stream per feed.
const TOTAL: u64 = 2_400;
const TTL: Duration = Duration::from_secs(3);

fn feed_name(i: usize) -> String {
    format!("f{i:02}")
}

/// A free port on 127.0.0.1 (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The fleet under test: the database, the stream server, and the instances by name.
struct Fleet {
    db: TestDb,
    server: Server,
    dir: tempfile::TempDir,
    nodes: BTreeMap<String, Node>,
}

struct Node {
    bridge: Option<Bridge>,
    admin: u16,
}

impl Fleet {
    async fn new(tag: &str) -> Option<Fleet> {
        let db = TestDb::create(tag)?;
        let server = Server::log(TOTAL, 20, Duration::from_millis(100)).await;
        Some(Fleet {
            db,
            server,
            dir: tempfile::tempdir().expect("tempdir"),
            nodes: BTreeMap::new(),
        })
    }

    /// The configuration of instance `name`, with the fleet's database at `db_url` (the
    /// cluster and the sink: a postgres sink in a fleet writes to the fleet's database).
    fn config(&self, name: &str, db_url: &str, admin: u16) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("instance dir");
        let mut text = format!(
            r#"[state]
path = "{d}/state.db"
commit_interval = "200ms"

[shutdown]
timeout = "20s"

[cluster]
url = "{db_url}"
lease_ttl = "{ttl}s"

[admin]
listen = "127.0.0.1:{admin}"

[sink.pg]
type = "postgres"
url = "{db_url}"
table = "events"

[routing]
default = ["pg"]
"#,
            d = dir.display(),
            ttl = TTL.as_secs(),
        );
        for i in 0..FEEDS {
            text.push_str(&format!(
                "\n[[feed]]\nname = \"{}\"\nurl = \"{}\"\ndefault_retry = \"100ms\"\n",
                feed_name(i),
                self.server.url_for(&format!("/{}", feed_name(i)))
            ));
        }
        write_file(&dir, "bridge.toml", &text)
    }

    /// Starts instance `name` (named through the environment, as an operator would).
    fn start(&mut self, name: &str) {
        let url = self.db.url();
        self.start_via(name, &url);
    }

    fn start_via(&mut self, name: &str, db_url: &str) {
        let admin = free_port();
        let config = self.config(name, db_url, admin);
        let bridge = Bridge::spawn_with_env(
            &config,
            "info,sse_bridge::cluster=debug",
            &[("SSE_BRIDGE_CLUSTER__INSTANCE", name)],
        );
        self.nodes.insert(
            name.to_string(),
            Node {
                bridge: Some(bridge),
                admin,
            },
        );
    }

    fn bridge(&self, name: &str) -> &Bridge {
        self.nodes[name].bridge.as_ref().expect("running")
    }

    fn take(&mut self, name: &str) -> Bridge {
        self.nodes
            .get_mut(name)
            .and_then(|n| n.bridge.take())
            .expect("running")
    }

    /// Each feed's live owner (`None`: free or expired), by the database's clock.
    fn owners(&self) -> BTreeMap<String, Option<String>> {
        postgres::try_query(
            &self.db.name,
            "SELECT feed, CASE WHEN expires_at > now() THEN owner END FROM sse_bridge_leases",
        )
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| {
            let mut r = r.into_iter();
            Some((r.next()??, r.next()?))
        })
        .collect()
    }

    /// How many feeds each live owner holds.
    fn shares(&self) -> BTreeMap<String, usize> {
        let mut shares = BTreeMap::new();
        for owner in self.owners().into_values().flatten() {
            *shares.entry(owner).or_insert(0) += 1;
        }
        shares
    }

    fn held_by(&self, name: &str) -> Vec<String> {
        self.owners()
            .into_iter()
            .filter(|(_, o)| o.as_deref() == Some(name))
            .map(|(f, _)| f)
            .collect()
    }

    /// Waits until the live owners hold exactly `want` feeds each.
    async fn wait_shares(&self, want: &[(&str, usize)], within: Duration) {
        let want: BTreeMap<String, usize> = want.iter().map(|(n, c)| (n.to_string(), *c)).collect();
        let reached = support::wait_for(within, || self.shares() == want).await;
        assert!(
            reached,
            "shares {:?}, wanted {want:?}; logs:\n{}",
            self.shares(),
            self.logs()
        );
    }

    /// Waits (30 s at most) until node-a, node-b and node-c hold four feeds each.
    async fn wait_balanced(&self) {
        self.wait_shares(
            &[("node-a", 4), ("node-b", 4), ("node-c", 4)],
            Duration::from_secs(30),
        )
        .await;
    }

    /// Waits until none of `feeds` is owned by `name` and all have a live owner; returns when.
    async fn wait_moved(&self, feeds: &[String], name: &str, within: Duration) -> Instant {
        let moved = support::wait_for(within, || {
            let owners = self.owners();
            feeds.iter().all(|f| {
                owners
                    .get(f)
                    .and_then(|o| o.as_deref())
                    .is_some_and(|o| o != name)
            })
        })
        .await;
        assert!(
            moved,
            "the feeds of {name} did not move within {within:?}: {:?}; logs:\n{}",
            self.owners(),
            self.logs()
        );
        Instant::now()
    }

    /// A session of the test's own on the fleet's database, with `options` added to its
    /// connection string (its connection runs in a task of its own).
    async fn session(&self, options: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port=5432 user=postgres dbname={} {options}",
                self.db.name
            ),
            tokio_postgres::NoTls,
        )
        .await
        .expect("connect to PostgreSQL");
        tokio::spawn(connection);
        client
    }

    fn rows(&self) -> u64 {
        self.db.count("events")
    }

    /// Waits for every event of every feed, then checks each is in the table exactly once.
    async fn assert_every_event_once(&self) {
        let all = FEEDS as u64 * TOTAL;
        let done = support::wait_for(Duration::from_secs(120), || self.rows() >= all).await;
        assert!(
            done,
            "rows {} of {all}; logs:\n{}",
            self.rows(),
            self.logs()
        );
        // A moment for anything late (a zombie's batch) to show up, were it let through.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let complete = self.db.column(&format!(
            "SELECT count(*) FROM (SELECT feed FROM events GROUP BY feed \
             HAVING count(*) = {TOTAL} AND count(DISTINCT seq) = {TOTAL} \
                AND count(DISTINCT id) = {TOTAL} AND min(seq) = 1 AND max(seq) = {TOTAL}) s"
        ));
        assert_eq!(
            complete,
            [FEEDS.to_string()],
            "feeds with every event once; per feed (rows, distinct ids): {:?}",
            self.db.column(
                "SELECT feed || ' ' || count(*) || ' ' || count(DISTINCT id) FROM events GROUP BY feed ORDER BY feed"
            )
        );
        assert_eq!(self.rows(), all, "no event twice");
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .filter_map(|(n, node)| {
                node.bridge
                    .as_ref()
                    .map(|b| format!("--- {n} ---\n{}", tail(&b.log_text(), 60)))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn stop_all(&mut self) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            if let Some(mut bridge) = self.nodes.get_mut(&name).and_then(|n| n.bridge.take()) {
                let status = bridge.stop(Duration::from_secs(60)).await;
                assert!(
                    status.success(),
                    "{name}: {status:?}\n{}",
                    bridge.log_text()
                );
            }
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Three instances, twelve feeds: four each once they have all joined.
async fn three_balanced(tag: &str) -> Option<Fleet> {
    let mut fleet = Fleet::new(tag).await?;
    for name in ["node-a", "node-b", "node-c"] {
        fleet.start(name);
    }
    fleet.wait_balanced().await;
    // Some of the stream stored, most of it still to come.
    let started = support::wait_for(Duration::from_secs(30), || fleet.rows() >= 3_000).await;
    assert!(started, "rows {}; logs:\n{}", fleet.rows(), fleet.logs());
    Some(fleet)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_moves_the_feeds_within_two_leases_from_the_committed_id() {
    let _serial = SERIAL.lock().await;
    let Some(mut fleet) = three_balanced("fleet_kill").await else {
        return;
    };
    let victim = "node-b";
    let feeds = fleet.held_by(victim);
    assert_eq!(feeds.len(), 4, "{:?}", fleet.owners());
    let killed_at = Instant::now();
    let _ = fleet.take(victim).kill9();
    // Nothing moves the dead instance's checkpoints any more: where its feeds resume.
    let committed: BTreeMap<String, String> = postgres::query(
        &fleet.db.name,
        "SELECT feed, last_event_id FROM sse_bridge_checkpoints",
    )
    .into_iter()
    .filter_map(|r| {
        let mut r = r.into_iter();
        Some((r.next()??, r.next()??))
    })
    .filter(|(f, _)| feeds.contains(f))
    .collect();
    assert_eq!(committed.len(), 4, "a checkpoint per feed: {committed:?}");
    let moved_at = fleet
        .wait_moved(&feeds, victim, 2 * TTL + Duration::from_secs(5))
        .await;
    let failover = moved_at - killed_at;
    eprintln!("kill -9: the feeds of {victim} moved in {failover:?} (lease_ttl {TTL:?})");
    assert!(failover <= 2 * TTL, "failover took {failover:?}");
    // Each resumed with the committed id: the first request for it after the kill.
    for feed in &feeds {
        let path = format!("/{feed}");
        let resumed = support::wait_for(Duration::from_secs(10), || {
            fleet
                .server
                .requests()
                .iter()
                .any(|r| r.path == path && r.at > killed_at)
        })
        .await;
        assert!(resumed, "{feed} was not requested again");
        let first = fleet
            .server
            .requests()
            .into_iter()
            .find(|r| r.path == path && r.at > killed_at)
            .expect("a request");
        assert_eq!(
            first.last_event_id.as_deref(),
            Some(committed[feed].as_str()),
            "{feed} resumed from the committed id"
        );
    }
    fleet.assert_every_event_once().await;
    fleet.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_writes_nothing_after_waking_and_logs_the_lost_lease() {
    let _serial = SERIAL.lock().await;
    let Some(mut fleet) = three_balanced("fleet_sigstop").await else {
        return;
    };
    // Every checkpoint write, with the lease it was made under and when.
    postgres::query(
        &fleet.db.name,
        "CREATE TABLE audit (at timestamptz NOT NULL DEFAULT clock_timestamp(), feed text, \
             owner text, epoch bigint, seq bigint);
         CREATE FUNCTION audit_checkpoint() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO audit (feed, owner, epoch, seq)
                 VALUES (NEW.feed, NEW.owner, NEW.epoch, NEW.seq);
             RETURN NEW;
         END $$;
         CREATE TRIGGER audit AFTER INSERT OR UPDATE ON sse_bridge_checkpoints
             FOR EACH ROW EXECUTE FUNCTION audit_checkpoint();",
    );
    let victim = "node-a";
    let leases: Vec<(String, String)> = postgres::query(
        &fleet.db.name,
        "SELECT feed, epoch::text FROM sse_bridge_leases WHERE owner = 'node-a' \
         AND expires_at > now()",
    )
    .into_iter()
    .filter_map(|r| {
        let mut r = r.into_iter();
        Some((r.next()??, r.next()??))
    })
    .collect();
    assert_eq!(leases.len(), 4, "{leases:?}");
    let feeds: Vec<String> = leases.iter().map(|(f, _)| f.clone()).collect();
    // Frozen in the middle of a sink batch, as a SIGSTOP can catch it: a session of node-a
    // holding its lease rows `FOR KEY SHARE` inside a `COPY` that never gets its data. The
    // server applies no timeout to it (it waits for the client), so the others must end it
    // to claim the feeds.
    // Every session of node-a carries its name, the sink's too: the coordinator's, the
    // checkpoint store's and the sink's make three.
    let named = support::wait_for(Duration::from_secs(10), || {
        fleet.db.column(&format!(
            "SELECT count(*) >= 3 FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'sse-bridge {victim}'"
        )) == ["t"]
    })
    .await;
    assert!(
        named,
        "sessions named for {victim}: {:?}",
        fleet.db.column(
            "SELECT application_name || ': ' || left(query, 60) FROM pg_stat_activity \
             WHERE datname = current_database()"
        )
    );
    postgres::query(&fleet.db.name, "CREATE TABLE stuck (v int)");
    let mut frozen_session = fleet
        .session(&format!("application_name='sse-bridge {victim}'"))
        .await;
    let tx = frozen_session.transaction().await.expect("begin");
    let locked = tx
        .query(
            "SELECT feed FROM sse_bridge_leases WHERE owner = $1 FOR KEY SHARE",
            &[&victim],
        )
        .await
        .expect("lock the lease rows");
    assert_eq!(locked.len(), 4);
    let copy = tx.copy_in::<_, bytes::Bytes>("COPY stuck FROM STDIN").await;
    assert!(copy.is_ok(), "COPY started: {:?}", copy.err());
    let frozen_at = Instant::now();
    fleet.bridge(victim).signal(libc::SIGSTOP);
    // A transaction under the same name begun after the leases ended (a process of that name
    // back, or started again) is not the frozen one's, and is left alone.
    let expired = support::wait_for(2 * TTL, || {
        fleet.db.column(&format!(
            "SELECT count(*) FROM sse_bridge_leases WHERE owner = '{victim}' AND expires_at > now()"
        )) == ["0"]
    })
    .await;
    assert!(expired, "the leases of {victim} ended");
    let mut later_session = fleet
        .session(&format!("application_name='sse-bridge {victim}'"))
        .await;
    let later = later_session.transaction().await.expect("begin");
    later.execute("SELECT 1", &[]).await.expect("a statement");
    let moved_at = fleet
        .wait_moved(&feeds, victim, 2 * TTL + Duration::from_secs(5))
        .await;
    drop(copy);
    drop(tx);
    assert!(
        later.execute("SELECT 1", &[]).await.is_ok(),
        "a transaction begun after the leases ended survives"
    );
    later.rollback().await.expect("rollback");
    let ended = ["node-b", "node-c"].iter().any(|n| {
        fleet.bridge(n).logs().iter().any(|l| {
            l.message
                .contains("ended the database sessions a frozen instance left")
        })
    });
    assert!(
        ended,
        "the stuck session was ended; logs:\n{}",
        fleet.logs()
    );
    eprintln!(
        "SIGSTOP: the feeds of {victim} moved in {:?} (lease_ttl {TTL:?})",
        moved_at - frozen_at
    );
    // The others write under their new leases for a while, then the frozen one wakes up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let woke = fleet.db.column("SELECT now()::text");
    fleet.bridge(victim).signal(libc::SIGCONT);
    fleet
        .bridge(victim)
        .wait_message(Duration::from_secs(15), "lost the lease")
        .await;
    fleet.assert_every_event_once().await;
    let old: Vec<String> = leases
        .iter()
        .map(|(f, e)| format!("('{f}', {e})"))
        .collect();
    let zombie_writes = fleet.db.column(&format!(
        "SELECT count(*) FROM audit WHERE owner = '{victim}' AND at > '{}' \
         AND (feed, epoch) IN ({})",
        woke[0],
        old.join(", ")
    ));
    assert_eq!(
        zombie_writes,
        ["0"],
        "checkpoint writes under the lost leases"
    );
    fleet.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_instance_joins_and_the_feeds_spread_out() {
    let _serial = SERIAL.lock().await;
    let Some(mut fleet) = three_balanced("fleet_join").await else {
        return;
    };
    // Any database user can NOTIFY the instances' channel: 20 000 notifications of 8 000
    // bytes (160 MB) cost them a round at most every 100 ms, no memory, and no lease.
    let before = fleet.bridge("node-a").peak_rss().expect("VmHWM");
    postgres::query(
        &fleet.db.name,
        "SELECT count(pg_notify('sse_bridge_leases', repeat('x', 7999))) \
         FROM generate_series(1, 20000)",
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = fleet
        .bridge("node-a")
        .peak_rss()
        .expect("VmHWM")
        .saturating_sub(before);
    eprintln!(
        "NOTIFY flood: node-a's peak RSS grew by {} KiB",
        grown / 1024
    );
    assert!(grown < 32 << 20, "peak RSS grew by {grown} bytes");
    assert_eq!(fleet.held_by("node-a").len(), 4, "{:?}", fleet.owners());
    let joined_at = Instant::now();
    fleet.start("node-d");
    fleet
        .wait_shares(
            &[("node-a", 3), ("node-b", 3), ("node-c", 3), ("node-d", 3)],
            Duration::from_secs(20),
        )
        .await;
    let rebalance = joined_at.elapsed();
    eprintln!("join: 12 feeds spread over 4 instances {rebalance:?} after the fourth started");
    // `status` names each feed's owner and epoch (as of the instance's last round: read
    // until it agrees with the database, which moves on its own).
    let admin = fleet.nodes["node-d"].admin;
    let status = || {
        let out = Bridge::command(&["status", "--admin", &format!("127.0.0.1:{admin}")])
            .output()
            .expect("status");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let agrees = |text: &str| {
        text.contains("OWNER")
            && text.contains("EPOCH")
            && fleet.owners().iter().all(|(feed, owner)| {
                owner.as_ref().is_some_and(|owner| {
                    text.lines()
                        .any(|l| l.starts_with(feed.as_str()) && l.contains(owner.as_str()))
                })
            })
    };
    let agreed = support::wait_for(Duration::from_secs(10), || agrees(&status())).await;
    assert!(agreed, "status: {}\nowners: {:?}", status(), fleet.owners());
    let metrics = reqwest::get(format!(
        "http://127.0.0.1:{}/metrics",
        fleet.nodes["node-a"].admin
    ))
    .await
    .expect("metrics")
    .text()
    .await
    .expect("metrics body");
    assert!(
        metrics.contains("sse_bridge_cluster_leases_held{instance=\"node-a\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sse_bridge_cluster_leases_handed_over_total{instance=\"node-a\"}"),
        "{metrics}"
    );
    fleet.assert_every_event_once().await;
    fleet.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_feeds_over_at_once() {
    let _serial = SERIAL.lock().await;
    let Some(mut fleet) = three_balanced("fleet_term").await else {
        return;
    };
    let victim = "node-c";
    let feeds = fleet.held_by(victim);
    assert_eq!(feeds.len(), 4);
    let mut bridge = fleet.take(victim);
    let signalled = Instant::now();
    bridge.signal(libc::SIGTERM);
    let moved_at = fleet.wait_moved(&feeds, victim, 2 * TTL).await;
    let handover = moved_at - signalled;
    eprintln!("SIGTERM: the feeds of {victim} moved in {handover:?} (lease_ttl {TTL:?})");
    assert!(handover < TTL / 2, "hand-over took {handover:?}");
    let status = bridge.stop(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    assert!(
        bridge
            .logs()
            .iter()
            .any(|l| l.message.contains("released every lease")),
        "{}",
        bridge.log_text()
    );
    fleet.assert_every_event_once().await;
    fleet.stop_all().await;
}

/// A TCP relay to PostgreSQL that can cut its connections and refuse new ones: a network
/// partition of one instance.
struct Relay {
    port: u16,
    open: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let open = Arc::new(AtomicBool::new(true));
        let (cut, _) = watch::channel(0u64);
        let (accepting, cuts) = (open.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Relay { port, open, cut }
    }

    fn partition(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    fn heal(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_connection_reconnects_or_its_feeds_stop_and_move() {
    let _serial = SERIAL.lock().await;
    let Some(mut fleet) = Fleet::new("fleet_conn").await else {
        return;
    };
    let relay = Relay::start("127.0.0.1:5432".parse().expect("addr")).await;
    let via_relay = fleet
        .db
        .url()
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port));
    fleet.start_via("node-a", &via_relay);
    fleet.start("node-b");
    fleet.start("node-c");
    fleet.wait_balanced().await;
    // Every feed started and storing (a start that fails on a terminated connection releases
    // its lease, as it should, and is not what this part is about).
    let feeds_storing = || {
        fleet.db.column(
            "SELECT count(*) FROM (SELECT feed FROM events GROUP BY feed HAVING count(*) >= 200) s",
        ) == [FEEDS.to_string()]
    };
    let started = support::wait_for(Duration::from_secs(30), feeds_storing).await;
    assert!(started, "rows {}; logs:\n{}", fleet.rows(), fleet.logs());
    fleet.wait_balanced().await;
    let epochs = || {
        fleet.db.column(
            "SELECT string_agg(feed || ':' || epoch, ',' ORDER BY feed) FROM sse_bridge_leases \
             WHERE owner = 'node-a' AND expires_at > now()",
        )
    };
    let before = epochs();
    let said = |name: &str, what: &str| {
        fleet
            .bridge(name)
            .logs()
            .iter()
            .filter(|l| l.message.contains(what))
            .count()
    };
    let lost_before = said("node-a", "lost the lease");
    // The server ends the instance's connection: it connects again at the next round and
    // keeps its leases.
    let terminated = fleet.db.column(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = 'sse-bridge node-a'",
    );
    assert_ne!(terminated, ["0"], "node-a's fleet connections");
    tokio::time::sleep(2 * TTL).await;
    assert_eq!(
        epochs(),
        before,
        "the same leases, renewed; logs:\n{}",
        fleet.logs()
    );
    assert_eq!(
        said("node-a", "lost the lease"),
        lost_before,
        "no lease lost to the terminated connection: {}",
        fleet.bridge("node-a").log_text()
    );
    // Another session updating a lease row (as a round renewing it does) costs its owner
    // that one lease, and nobody anything else: the other instances renew through it (a
    // round used to wait for every lease row being updated, and two rounds could deadlock),
    // and the owner's renewal skips the held row.
    let row = fleet
        .held_by("node-b")
        .into_iter()
        .next()
        .expect("a feed of node-b");
    let holder = fleet.session("").await;
    let quiet_before = [
        said("node-a", "cannot renew"),
        said("node-c", "cannot renew"),
    ];
    let epochs_of = |name: &str| {
        fleet.db.column(&format!(
            "SELECT string_agg(feed || ':' || epoch, ',' ORDER BY feed) FROM sse_bridge_leases \
             WHERE owner = '{name}' AND expires_at > now() AND feed <> '{row}'"
        ))
    };
    let others_of_b = epochs_of("node-b");
    holder
        .batch_execute(&format!(
            "BEGIN; UPDATE sse_bridge_leases SET claimed_at = claimed_at WHERE feed = '{row}'"
        ))
        .await
        .expect("hold a lease row");
    tokio::time::sleep(2 * TTL).await;
    let quiet_after = [
        said("node-a", "cannot renew"),
        said("node-c", "cannot renew"),
    ];
    let others_of_b_after = epochs_of("node-b");
    holder.batch_execute("ROLLBACK").await.expect("rollback");
    drop(holder);
    assert_eq!(
        quiet_after,
        quiet_before,
        "node-a and node-c renew while a row of node-b is held; logs:\n{}",
        fleet.logs()
    );
    // node-b loses that one lease only: its renewal skips the held row.
    assert_eq!(
        others_of_b_after,
        others_of_b,
        "node-b keeps its other leases; logs:\n{}",
        fleet.bridge("node-b").log_text()
    );
    fleet.wait_balanced().await;
    // A partition: no renewal can reach the database, so the feeds stop before their leases
    // end, and the others take them.
    let feeds = fleet.held_by("node-a");
    let cut_at = Instant::now();
    relay.partition();
    fleet
        .bridge("node-a")
        .wait_message(2 * TTL, "lost the lease")
        .await;
    let moved_at = fleet.wait_moved(&feeds, "node-a", 3 * TTL).await;
    eprintln!(
        "partition: the feeds of node-a moved in {:?} (lease_ttl {TTL:?})",
        moved_at - cut_at
    );
    relay.heal();
    // Back in the fleet: it takes its share again.
    fleet.wait_balanced().await;
    fleet.assert_every_event_once().await;
    fleet.stop_all().await;
}
