//! A fleet of bridges on PostgreSQL (ARCHITECTURE.md §9): the same configuration on several
//! machines, each feed read by exactly one of them. Leases live in the fleet's database and
//! are judged by its clock; the coordinator ([`lease`]) claims, renews, hands over and
//! releases them and tells the supervisor which feeds to start and stop; every write of a
//! checkpoint ([`store`]) or a `postgres` sink batch names the lease's epoch ([`fence`]) and
//! checks it in its own transaction.

pub mod config;
pub mod db;
pub mod fence;
pub mod lease;
pub mod store;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::ClusterConfig;

use db::Db;
use fence::Fence;
use store::FleetStore;

/// Whether two connection strings reach the same database: the same hosts, port and
/// database name (the user may differ).
pub fn same_database(a: &tokio_postgres::Config, b: &tokio_postgres::Config) -> bool {
    let key = |c: &tokio_postgres::Config| {
        let shown = crate::sink::postgres::config::shown(c);
        // user@hosts:port/db: everything after the user.
        shown
            .split_once('@')
            .map(|(_, rest)| rest.to_string())
            .unwrap_or(shown)
    };
    key(a) == key(b)
}

/// The `application_name` of every session of `instance` (the coordinator's, the checkpoint
/// store's, a fenced `postgres` sink's): pg_stat_activity names the instance, and the others
/// find a frozen instance's sessions by it (`lease::END_STUCK_SQL`). PostgreSQL keeps 63 bytes
/// of printable ASCII and rewrites any other byte (as `?` up to version 15, as `\xNN` from
/// 16), so a name that would not survive that is shown as its first characters, `#`, and a
/// hash of the whole name: two instances never share an `application_name` by truncation or
/// by their non-ASCII letters.
pub fn application_name(instance: &str) -> String {
    let plain = format!("sse-bridge {instance}");
    if plain.len() <= 63 && plain.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return plain;
    }
    let hash = fnv1a64(instance.as_bytes());
    let prefix: String = instance
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .take(35)
        .collect();
    format!("sse-bridge {prefix}#{hash:016x}")
}

/// FNV-1a, 64 bits: stable across builds and versions, which a fleet of mixed versions needs
/// (std's hasher promises neither).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Bounds what a session of an instance can hold on the server: a transaction whose client
/// stopped in the middle (a frozen process: SIGSTOP, a long GC-like pause) keeps lease rows
/// `FOR KEY SHARE`, which no other instance could claim, and the sink's table lock. The server
/// ends such a session after half a lease (`idle_in_transaction_session_timeout`), and a
/// statement that runs too long after a whole lease but never under 10 s, so that a large
/// batch on a slow server still fits (`statement_timeout`). A `COPY` whose client stopped
/// sending is neither: the server does not act on a timeout while it waits for the client's
/// data, so the other instances end such sessions themselves once the frozen instance's
/// leases have ended (`lease::STUCK_SQL`, ARCHITECTURE.md §9). Options already in the
/// connection string are kept before these.
pub fn bound_sessions(connection: &mut tokio_postgres::Config, lease_ttl: std::time::Duration) {
    let idle = (lease_ttl / 2).as_millis().max(500);
    let statement = lease_ttl.as_millis().max(10_000);
    let existing = connection.get_options().unwrap_or("").trim().to_string();
    let ours =
        format!("-c idle_in_transaction_session_timeout={idle} -c statement_timeout={statement}");
    connection.options(format!("{existing} {ours}").trim());
}

/// What the coordinator asks of the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// This instance now holds the feed's lease, at `epoch`: start it from its checkpoint.
    Start { feed: String, epoch: i64 },
    /// Stop the feed's run under `epoch`; say so with [`Fleet::stopped`] once it is stopped.
    Stop {
        feed: String,
        epoch: i64,
        why: StopReason,
    },
}

/// What the supervisor tells the coordinator about a run: the feed, the epoch it ran under,
/// and whether it ended because it could not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    pub feed: String,
    pub epoch: i64,
    pub failed: bool,
}

/// Why a feed stops here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The lease is gone (expired, or claimed by another instance): stop at once; nothing it
    /// still writes can pass the fence.
    Lost,
    /// Handing over: drain, commit, then the lease is released.
    HandOver,
}

/// One lease as last read from the fleet's database.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeaseView {
    pub feed: String,
    /// The instance holding it, if any holds it now (an expired lease has no owner here).
    pub owner: Option<String>,
    pub epoch: i64,
}

/// What `/metrics` and `status` show of the fleet.
#[derive(Debug, Default)]
pub struct FleetStats {
    pub instance: String,
    /// Leases this instance holds now.
    pub held: AtomicU64,
    /// Leases this instance claimed, lost (expired or taken while it held them) and handed
    /// over (released on purpose: a rebalance, a removed feed, shutdown).
    pub claimed: AtomicU64,
    pub lost: AtomicU64,
    pub handed_over: AtomicU64,
    /// Live instances as of the last round.
    pub live_instances: AtomicU64,
    /// Whether the last round reached the database.
    connected: std::sync::atomic::AtomicBool,
    leases: RwLock<Vec<LeaseView>>,
}

impl FleetStats {
    /// Whether the last round of the coordinator reached the fleet's database.
    pub fn connected(&self) -> bool {
        self.connected.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set_connected(&self, connected: bool) {
        self.connected
            .store(connected, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every configured feed's lease as of the last round.
    pub fn leases(&self) -> Vec<LeaseView> {
        self.leases.read().map(|l| l.clone()).unwrap_or_default()
    }

    fn set_leases(&self, leases: Vec<LeaseView>) {
        if let Ok(mut l) = self.leases.write() {
            *l = leases;
        }
    }
}

/// This instance's part in a fleet, held by the supervisor.
pub struct Fleet {
    pub instance: String,
    pub fence: Arc<Fence>,
    pub store: Arc<FleetStore>,
    pub stats: Arc<FleetStats>,
    commands: Option<mpsc::UnboundedReceiver<Command>>,
    stopped: mpsc::UnboundedSender<Stopped>,
    feeds: watch::Sender<Vec<String>>,
    stop_claiming: CancellationToken,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Fleet {
    /// Connects to the fleet's database, brings its tables up to date and starts the
    /// coordinator for the configured (enabled) `feeds`. A database that cannot be reached
    /// fails the start, naming it.
    pub async fn start(config: &ClusterConfig, feeds: Vec<String>) -> anyhow::Result<Fleet> {
        let instance = config
            .instance_name()
            .map_err(|e| anyhow::anyhow!("cluster.instance: {e}"))?;
        let mut connection = config
            .connection()
            .map_err(|e| anyhow::anyhow!("cluster.url: {e}"))?;
        connection.application_name(application_name(&instance));
        bound_sessions(&mut connection, config.lease_ttl);
        let tls = crate::sink::postgres::tls_connector(config.ca_file.as_deref())
            .map_err(|e| anyhow::anyhow!("cluster.{e}"))?;
        let timeout = config.renew_every().max(std::time::Duration::from_secs(1));
        let coordinator_db = Db::new(connection.clone(), tls.clone(), timeout);
        coordinator_db
            .migrate()
            .await
            .map_err(anyhow::Error::msg)
            .context("starting the fleet")?;
        // State writes (checkpoints, gaps) go through a connection of their own, so that a
        // slow commit never delays a lease renewal.
        let store_db = Db::new(connection.clone(), tls, config.lease_ttl);
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        let fence = Arc::new(Fence::new(
            instance.clone(),
            connection,
            config.lease_ttl,
            lost_tx,
        ));
        let store = Arc::new(FleetStore::new(store_db, fence.clone()));
        let stats = Arc::new(FleetStats {
            instance: instance.clone(),
            ..FleetStats::default()
        });
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let (stopped_tx, stopped_rx) = mpsc::unbounded_channel();
        let (feeds_tx, feeds_rx) = watch::channel(feeds);
        let stop_claiming = CancellationToken::new();
        let shutdown = CancellationToken::new();
        tracing::info!(instance = %instance, database = %coordinator_db.shown, lease_ttl = ?config.lease_ttl, "joining the fleet");
        let coordinator = lease::Coordinator::new(
            coordinator_db,
            instance.clone(),
            config.lease_ttl,
            fence.clone(),
            stats.clone(),
            commands_tx,
            stop_claiming.clone(),
        );
        let task = tokio::spawn(coordinator.run(feeds_rx, stopped_rx, lost_rx, shutdown.clone()));
        Ok(Fleet {
            instance,
            fence,
            store,
            stats,
            commands: Some(commands_rx),
            stopped: stopped_tx,
            feeds: feeds_tx,
            stop_claiming,
            shutdown,
            task: Some(task),
        })
    }

    /// The coordinator's requests (taken once, by the supervisor's loop).
    pub fn take_commands(&mut self) -> Option<mpsc::UnboundedReceiver<Command>> {
        self.commands.take()
    }

    /// The feed's run under `epoch` no longer runs here (after a [`Command::Stop`], or a
    /// reload that removed the feed); `failed`: it could not start.
    pub fn stopped(&self, feed: &str, epoch: i64, failed: bool) {
        let _ = self.stopped.send(Stopped {
            feed: feed.to_string(),
            epoch,
            failed,
        });
    }

    /// A sender for [`Fleet::stopped`], for a task that outlives the borrow.
    pub fn stopped_sender(&self) -> mpsc::UnboundedSender<Stopped> {
        self.stopped.clone()
    }

    /// The configured feeds changed (a reload).
    pub fn set_feeds(&self, feeds: Vec<String>) {
        self.feeds.send_replace(feeds);
    }

    /// No more claims: the instance is shutting down (its feeds drain while their leases are
    /// still renewed).
    pub fn stop_claiming(&self) {
        self.stop_claiming.cancel();
    }

    /// After the drain: releases every lease held (the others take the feeds over at once)
    /// and leaves the fleet.
    pub async fn leave(mut self) {
        self.stop_claiming.cancel();
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(text: &str) -> tokio_postgres::Config {
        text.parse().expect("a connection string")
    }

    #[test]
    fn the_same_database_is_host_port_and_name_whoever_connects() {
        let fleet = conn("postgresql://bridge@db.example.org/fleet");
        assert!(same_database(
            &fleet,
            &conn("postgresql://writer:secret@db.example.org:5432/fleet?sslmode=require")
        ));
        assert!(!same_database(
            &fleet,
            &conn("postgresql://bridge@db.example.org/other")
        ));
        assert!(!same_database(
            &fleet,
            &conn("postgresql://bridge@db.example.org:6432/fleet")
        ));
        assert!(!same_database(
            &fleet,
            &conn("postgresql://bridge@replica.example.org/fleet")
        ));
    }

    #[test]
    fn application_names_keep_what_postgresql_keeps() {
        assert_eq!(application_name("node-a"), "sse-bridge node-a");
        let long = "n".repeat(52);
        assert_eq!(application_name(&long), format!("sse-bridge {long}"));
        // Longer, or not ASCII: a prefix and a hash, at most 63 bytes of printable ASCII,
        // different for names PostgreSQL would have made the same.
        for (a, b) in [
            (format!("{long}a"), format!("{long}b")),
            ("nœud-a".to_string(), "nöud-a".to_string()),
        ] {
            let (x, y) = (application_name(&a), application_name(&b));
            for n in [&x, &y] {
                assert!(n.len() <= 63, "{n}");
                assert!(n.bytes().all(|b| (0x20..0x7f).contains(&b)), "{n}");
            }
            assert_ne!(x, y);
        }
        // The hash is part of what other instances, of other builds, look for: pinned.
        assert_eq!(
            application_name("nœud-a"),
            format!("sse-bridge n?ud-a#{:016x}", fnv1a64("nœud-a".as_bytes()))
        );
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    }

    #[test]
    fn sessions_are_bounded_after_the_operators_own_options() {
        let mut c = conn("host=db user=bridge dbname=fleet options='-c search_path=bridge'");
        bound_sessions(&mut c, std::time::Duration::from_secs(10));
        assert_eq!(
            c.get_options(),
            Some(
                "-c search_path=bridge -c idle_in_transaction_session_timeout=5000 \
                 -c statement_timeout=10000"
            )
        );
        let mut short = conn("host=db user=bridge dbname=fleet");
        bound_sessions(&mut short, std::time::Duration::from_secs(1));
        assert_eq!(
            short.get_options(),
            Some("-c idle_in_transaction_session_timeout=500 -c statement_timeout=10000")
        );
    }
}
