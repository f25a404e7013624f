//! The lease coordinator (ARCHITECTURE.md §9): one task per instance that, every
//! `lease_ttl / 3`, renews its heartbeat and the leases it holds, claims free or expired
//! leases up to its fair share, and hands over what it holds beyond it. Every judgement of
//! time is the database's (`now()`); the instance's own clock only decides when it must stop
//! feeds whose renewal it could not confirm (before the database would let them expire).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::db::{Db, LEASES_CHANNEL};
use super::fence::Fence;
use super::{Command, FleetStats, LeaseView, StopReason, Stopped};
use crate::sink::postgres::describe;

/// The soonest two rounds run one after another when notifications ask for more.
const MIN_ROUND_GAP: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// The feed runs here.
    Running,
    /// Handing over: the feed drains and commits; the lease is still renewed until then.
    Draining,
    /// Lost: the feed is stopping; the lease is not ours any more.
    Stopping,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    epoch: i64,
    held: Held,
}

/// What one round learned from the database.
#[derive(Debug, Default)]
struct Round {
    /// Leases this instance renewed (feed names).
    renewed: Vec<String>,
    /// Leases claimed: (feed, epoch, previous owner).
    claimed: Vec<(String, i64, Option<String>)>,
    /// How many running feeds to hand over.
    hand_over: usize,
    leases: Vec<LeaseView>,
    live: u64,
    /// Instances presumed frozen inside a transaction: see [`STUCK_SQL`].
    stuck: Vec<String>,
}

/// SQL: instance `$owner` holds no live lease and has no live heartbeat. One definition for
/// finding a frozen instance and for checking again as its sessions are ended.
macro_rules! gone {
    ($owner:literal) => {
        concat!(
            "NOT EXISTS (SELECT 1 FROM sse_bridge_leases h \
             WHERE h.owner = ",
            $owner,
            " AND h.expires_at > now()) \
             AND NOT EXISTS (SELECT 1 FROM sse_bridge_instances i \
             WHERE i.instance = ",
            $owner,
            " AND i.expires_at > now())"
        )
    };
}

/// The owners of leases that ended more than `$3` ms ago and that nobody has claimed (a claim
/// skips a row another transaction holds), while the owner holds no live lease and has no
/// live heartbeat. Such an owner is frozen inside a transaction: a client stopped in the
/// middle of a `COPY` keeps its transaction, and its row and table locks, open for as long as
/// it is stopped, since PostgreSQL neither cancels (`statement_timeout`) nor counts as idle a
/// backend waiting for `COPY` data. ARCHITECTURE.md §9.
const STUCK_SQL: &str = concat!(
    "SELECT DISTINCT l.owner FROM sse_bridge_leases l \
     WHERE l.feed = ANY($1) AND l.owner IS NOT NULL AND l.owner <> $2 \
       AND l.expires_at <= now() - $3::bigint * interval '1 millisecond' AND ",
    gone!("l.owner"),
    " ORDER BY l.owner"
);

/// Ends the sessions of instance `$2` (`application_name` `$1`) that are inside a transaction
/// begun before its last lease ended, checked again at that moment: it still holds no live
/// lease and has no live heartbeat. A process that came back (or a new one under the same
/// name) has only transactions begun since, and idle sessions are left alone. Sessions of
/// another role show no `state` without `pg_read_all_stats`, and are not touched.
const END_STUCK_SQL: &str = concat!(
    "SELECT count(*) FILTER (WHERE pg_terminate_backend(a.pid)) \
     FROM pg_stat_activity a \
     WHERE a.datname = current_database() AND a.application_name = $1 \
       AND a.pid <> pg_backend_pid() \
       AND a.state IN ('active', 'idle in transaction', 'idle in transaction (aborted)') \
       AND a.xact_start < (SELECT max(l.expires_at) FROM sse_bridge_leases l WHERE l.owner = $2) \
       AND ",
    gone!("$2")
);

/// A subquery `r` of the lease rows (feed, epoch) `$1`, `$2` that instance `$3` still holds
/// unexpired, each locked for the update that follows; one another transaction is updating is
/// skipped, not waited for (ARCHITECTURE.md §9: rounds never wait). The renewal and the release
/// update through it.
macro_rules! ours_unlocked {
    () => {
        "(SELECT h.feed FROM sse_bridge_leases h \
          JOIN unnest($1::text[], $2::bigint[]) AS w(feed, epoch) \
            ON h.feed = w.feed AND h.epoch = w.epoch \
          WHERE h.owner = $3 AND h.expires_at > now() \
          FOR NO KEY UPDATE OF h SKIP LOCKED) r"
    };
}

pub(super) struct Coordinator {
    db: Db,
    instance: String,
    ttl: Duration,
    fence: Arc<Fence>,
    stats: Arc<FleetStats>,
    commands: mpsc::UnboundedSender<Command>,
    stop_claiming: CancellationToken,
    leases: BTreeMap<String, Lease>,
    /// When the leases renewed last end at the earliest, by this instance's clock: the send
    /// time of that renewal plus the TTL, less a margin.
    deadline: Option<Instant>,
    /// Whether ending a frozen instance's sessions was refused once (warned once).
    end_stuck_refused: bool,
    /// Whether the last round failed (to log a recovery once).
    failing: bool,
    notified: Option<mpsc::Receiver<String>>,
    /// Feeds that failed to start here, and until when they are not claimed here again.
    cooling: BTreeMap<String, Instant>,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// This instance's fair share: `feeds / live`, the remainder going one each to the first
/// instances by name, so the shares add up to the number of feeds.
fn fair_share(feeds: usize, live: &[String], instance: &str) -> usize {
    let n = live.len().max(1);
    let rank = live.iter().position(|i| i == instance).unwrap_or(n - 1);
    feeds / n + usize::from(rank < feeds % n)
}

impl Coordinator {
    pub(super) fn new(
        db: Db,
        instance: String,
        ttl: Duration,
        fence: Arc<Fence>,
        stats: Arc<FleetStats>,
        commands: mpsc::UnboundedSender<Command>,
        stop_claiming: CancellationToken,
    ) -> Coordinator {
        let (notify_tx, notify_rx) = mpsc::channel(4);
        Coordinator {
            db: db.listening(notify_tx),
            instance,
            ttl,
            fence,
            stats,
            commands,
            stop_claiming,
            leases: BTreeMap::new(),
            deadline: None,
            end_stuck_refused: false,
            failing: false,
            notified: Some(notify_rx),
            cooling: BTreeMap::new(),
        }
    }

    fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Runs until `shutdown`, then releases every lease still held and leaves the fleet.
    pub(super) async fn run(
        mut self,
        mut feeds: watch::Receiver<Vec<String>>,
        mut stopped: mpsc::UnboundedReceiver<Stopped>,
        mut lost: mpsc::UnboundedReceiver<(String, i64)>,
        shutdown: CancellationToken,
    ) {
        let mut notified = self.notified.take();
        let mut ticker = tokio::time::interval(self.renew_every());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_round = Instant::now() - MIN_ROUND_GAP;
        loop {
            let deadline = self
                .deadline
                .filter(|_| self.holds_any())
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let soonest = last_round + MIN_ROUND_GAP;
            // Biased: an overdue renewal stops feeds before anything else runs (a process
            // that wakes from a pause finds its deadline passed and its ticker due at once).
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(deadline) => {
                    let held: Vec<String> = self.held_names();
                    self.lose(&held, "the leases could not be renewed before they end (the fleet's database did not answer in time)");
                    continue;
                }
                Some(feed) = lost.recv() => {
                    let (feed, epoch) = feed;
                    if self.leases.get(&feed).is_some_and(|l| l.epoch == epoch) {
                        self.lose(&[feed], "a write found that this instance no longer holds the lease");
                    }
                    continue;
                }
                Some(run) = stopped.recv() => {
                    self.on_stopped(run).await;
                    continue;
                }
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
                Some(from) = async {
                    match notified.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    // Another instance released leases: a round now, not at the next tick
                    // (this instance's own releases are no news to it).
                    if from == self.instance {
                        continue;
                    }
                    tokio::time::sleep_until(soonest).await;
                    if let Some(rx) = notified.as_mut() {
                        while rx.try_recv().is_ok() {}
                    }
                }
                Ok(()) = feeds.changed() => {}
            }
            let configured = feeds.borrow_and_update().clone();
            self.round(&configured).await;
            last_round = Instant::now();
        }
        self.leave().await;
    }

    /// The leases this instance holds (running or draining), with their epochs.
    fn held(&self) -> Vec<(String, i64)> {
        self.leases
            .iter()
            .filter(|(_, l)| matches!(l.held, Held::Running | Held::Draining))
            .map(|(f, l)| (f.clone(), l.epoch))
            .collect()
    }

    fn holds_any(&self) -> bool {
        self.leases
            .values()
            .any(|l| matches!(l.held, Held::Running | Held::Draining))
    }

    fn held_names(&self) -> Vec<String> {
        self.held().into_iter().map(|(f, _)| f).collect()
    }

    fn update_held_gauge(&self) {
        self.stats
            .held
            .store(self.held().len() as u64, Ordering::Relaxed);
    }

    /// Stops the feeds whose leases are gone, at once.
    fn lose(&mut self, feeds: &[String], why: &str) {
        for feed in feeds {
            let Some(lease) = self.leases.get_mut(feed) else {
                continue;
            };
            let was = lease.held;
            if was == Held::Stopping {
                continue;
            }
            lease.held = Held::Stopping;
            self.fence.forget(feed);
            self.fence.cancel_run(feed);
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(feed = %feed, instance = %self.instance, epoch = lease.epoch, "lost the lease: {why}; stopping the feed here");
            // A draining feed is already stopping; its `stopped` comes back once.
            if was == Held::Running {
                let _ = self.commands.send(Command::Stop {
                    feed: feed.clone(),
                    epoch: lease.epoch,
                    why: StopReason::Lost,
                });
            }
        }
        self.update_held_gauge();
    }

    /// A feed stopped here: its lease, if still ours, is released so that another instance
    /// takes it over now rather than after it expires.
    async fn on_stopped(&mut self, run: Stopped) {
        let feed = run.feed.as_str();
        // A run under another epoch than the lease held now is old news.
        if self.leases.get(feed).is_none_or(|l| l.epoch != run.epoch) {
            return;
        }
        let Some(lease) = self.leases.remove(feed) else {
            return;
        };
        self.update_held_gauge();
        if run.failed {
            // Not claimed here again for a lease: another instance may do better.
            self.cooling
                .insert(feed.to_string(), Instant::now() + self.ttl);
        }
        if lease.held == Held::Stopping {
            return;
        }
        // Never past the renewal deadline of the leases still held: the loop must get there.
        let limit = self
            .deadline
            .filter(|_| self.holds_any())
            .unwrap_or_else(|| Instant::now() + self.ttl);
        let released =
            tokio::time::timeout_at(limit, self.release(&[(feed.to_string(), lease.epoch)]))
                .await
                .unwrap_or_else(|_| {
                    Err("no answer before the other leases' renewal deadline".into())
                });
        match released {
            Ok(()) => {
                self.stats.handed_over.fetch_add(1, Ordering::Relaxed);
                tracing::info!(feed = %feed, instance = %self.instance, epoch = lease.epoch, "handed the feed over: released its lease");
            }
            Err(e) => {
                tracing::warn!(feed = %feed, instance = %self.instance, "could not release the lease (it ends by itself within lease_ttl): {e}");
            }
        }
        self.fence.forget(feed);
    }

    /// Releases `leases` (feed, epoch) if still ours and unexpired, and tells the others. An
    /// expired one is free already, and may be in another round's claim: touching it would
    /// wait for that round (ARCHITECTURE.md §9, rounds never wait for each other). A row
    /// another transaction is updating is skipped as the renewal skips it: it ends by itself
    /// within a lease, and the others' leases are released meanwhile.
    async fn release(&self, leases: &[(String, i64)]) -> Result<(), String> {
        if leases.is_empty() {
            return Ok(());
        }
        let feeds: Vec<&str> = leases.iter().map(|(f, _)| f.as_str()).collect();
        let epochs: Vec<i64> = leases.iter().map(|(_, e)| *e).collect();
        let mut held = self.db.client().await?;
        let Some(client) = held.as_mut() else {
            return Err("not connected".into());
        };
        let result = tokio::time::timeout(self.db.timeout, async {
            client
                .execute(
                    concat!(
                        "UPDATE sse_bridge_leases l SET owner = NULL, expires_at = now() FROM ",
                        ours_unlocked!(),
                        " WHERE l.feed = r.feed"
                    ),
                    &[&feeds, &epochs, &self.instance],
                )
                .await?;
            client
                .execute(
                    "SELECT pg_notify($1, $2)",
                    &[&LEASES_CHANNEL, &self.instance],
                )
                .await
        })
        .await;
        self.db
            .settle(&mut held, result, "releasing leases")
            .map(|_| ())
    }

    /// One round: heartbeat, renewals, claims, hand-overs.
    async fn round(&mut self, configured: &[String]) {
        let sent = Instant::now();
        let renew = self.held();
        // Never claimed here: a feed with a run here in any state (a lost one is claimed again
        // only once its run has stopped), or one that just failed to start here.
        let now = Instant::now();
        self.cooling.retain(|_, until| *until > now);
        let stopping: Vec<String> = self
            .leases
            .keys()
            .chain(self.cooling.keys())
            .cloned()
            .collect();
        let running = self
            .leases
            .values()
            .filter(|l| l.held == Held::Running)
            .count();
        let claiming = !self.stop_claiming.is_cancelled();
        // A slow round may take until the renewal deadline (the next tick waits for it), but
        // never past it: then the feeds stop (in `run`).
        let limit = match self.deadline.filter(|_| !renew.is_empty()) {
            Some(deadline) => deadline,
            None => sent + self.ttl - self.ttl / 10,
        };
        let result = tokio::time::timeout_at(
            limit,
            self.exchange(configured, &renew, &stopping, running, claiming),
        )
        .await;
        let round = match result {
            Ok(Ok(round)) => round,
            Ok(Err(e)) => {
                self.fail(&e);
                return;
            }
            Err(_) => {
                self.db.reset().await;
                self.fail(&format!(
                    "no answer before the leases would end (the round began {:?} ago)",
                    sent.elapsed()
                ));
                return;
            }
        };
        if self.failing {
            self.failing = false;
            tracing::info!(instance = %self.instance, database = %self.db.shown, "the fleet's database answers again");
        }
        // The renewals were sent at `sent`; the database set their end to its `now()` plus
        // the TTL, which is no earlier. A tenth of the TTL keeps the stop ahead of it.
        self.deadline = Some(sent + self.ttl - self.ttl / 10);
        self.stats
            .live_instances
            .store(round.live, Ordering::Relaxed);
        self.stats.set_connected(true);
        self.stats.set_leases(round.leases);
        let gone: Vec<String> = renew
            .iter()
            .filter(|(f, _)| !round.renewed.contains(f))
            .map(|(f, _)| f.clone())
            .collect();
        self.lose(
            &gone,
            "its renewal found it expired, claimed by another instance, or held by another transaction",
        );
        for (feed, epoch, previous) in round.claimed {
            self.leases.insert(
                feed.clone(),
                Lease {
                    epoch,
                    held: Held::Running,
                },
            );
            self.fence.hold(&feed, epoch);
            self.stats.claimed.fetch_add(1, Ordering::Relaxed);
            match previous {
                Some(previous) if previous != self.instance => {
                    tracing::info!(feed = %feed, instance = %self.instance, epoch, from = %crate::text::escape_controls(&previous), "claimed the feed's lease (its previous holder's lease had ended)")
                }
                _ => {
                    tracing::info!(feed = %feed, instance = %self.instance, epoch, "claimed the feed's lease")
                }
            }
            let _ = self.commands.send(Command::Start { feed, epoch });
        }
        // Feeds no longer configured, then the excess over the fair share, are handed over.
        let mut hand_over: Vec<String> = self
            .leases
            .iter()
            .filter(|(f, l)| l.held == Held::Running && !configured.contains(f))
            .map(|(f, _)| f.clone())
            .collect();
        let excess: Vec<String> = self
            .leases
            .iter()
            .rev()
            .filter(|(f, l)| l.held == Held::Running && !hand_over.contains(f))
            .map(|(f, _)| f.clone())
            .take(round.hand_over)
            .collect();
        hand_over.extend(excess);
        for feed in hand_over {
            if let Some(lease) = self.leases.get_mut(&feed) {
                lease.held = Held::Draining;
                tracing::info!(feed = %feed, instance = %self.instance, epoch = lease.epoch, "handing the feed over to another instance (fair share)");
                let _ = self.commands.send(Command::Stop {
                    feed,
                    epoch: lease.epoch,
                    why: StopReason::HandOver,
                });
            }
        }
        self.update_held_gauge();
        if !round.stuck.is_empty() {
            self.end_stuck(&round.stuck).await;
        }
    }

    fn fail(&mut self, e: &str) {
        self.stats.set_connected(false);
        if !self.failing {
            let until = self
                .deadline
                .map(|d| d.saturating_duration_since(Instant::now()));
            tracing::warn!(instance = %self.instance, "cannot renew the leases: {e}; retrying every lease_ttl / 3 (the feeds held stop in {until:?} unless a renewal succeeds)");
        } else {
            tracing::debug!(instance = %self.instance, "cannot renew the leases: {e}");
        }
        self.failing = true;
    }

    /// The database side of a round, on one connection.
    async fn exchange(
        &self,
        configured: &[String],
        renew: &[(String, i64)],
        stopping: &[String],
        running: usize,
        claiming: bool,
    ) -> Result<Round, String> {
        let mut held = self.db.client().await?;
        let Some(client) = held.as_mut() else {
            return Err("not connected".into());
        };
        let result = self
            .exchange_on(client, configured, renew, stopping, running, claiming)
            .await;
        if let Err(e) = &result {
            Db::failed(&mut held, e);
        }
        result.map_err(|e| describe(&format!("fleet database {}", self.db.shown), &e))
    }

    /// Ends the sessions that `stuck` instances left inside a transaction, each only if it
    /// still qualifies ([`END_STUCK_SQL`]). Apart from the round, after its commit and under
    /// a bound of its own: a refusal (another role) or a slow answer costs no round.
    async fn end_stuck(&mut self, stuck: &[String]) {
        let refused_before = self.end_stuck_refused;
        let mut refused = false;
        let work = async {
            let mut held = self.db.client().await?;
            for owner in stuck {
                let Some(client) = held.as_mut() else { break };
                // Owners come from the table, which any user of the database may write.
                let shown = crate::text::escape_controls(owner);
                let application = super::application_name(owner);
                match client
                    .query_one(END_STUCK_SQL, &[&application, owner])
                    .await
                {
                    Ok(row) => {
                        let ended: i64 = row.get(0);
                        if ended > 0 {
                            tracing::warn!(instance = %self.instance, owner = %shown, sessions = ended, "ended the database sessions a frozen instance left inside a transaction: its leases had ended and nobody could claim them");
                        } else {
                            tracing::debug!(instance = %self.instance, owner = %shown, "an instance's ended leases are still unclaimed, and none of its sessions is inside a transaction begun under them (or none this role may see)");
                        }
                    }
                    Err(e) => {
                        Db::failed(&mut held, &e);
                        let message = describe("cannot end the sessions of a frozen instance", &e);
                        // Once per process at warn: it would repeat every round.
                        if refused_before {
                            tracing::debug!(instance = %self.instance, owner = %shown, "{message}");
                        } else {
                            tracing::warn!(instance = %self.instance, owner = %shown, "{message} (run every instance as one role, or grant this one pg_signal_backend and pg_read_all_stats, so that a frozen instance's transactions can be ended)");
                        }
                        refused = true;
                    }
                }
            }
            Ok::<(), String>(())
        };
        // Never past the renewal deadline the round just set: the loop must get there.
        let limit = match self.deadline {
            Some(deadline) => deadline.min(Instant::now() + self.renew_every()),
            None => Instant::now() + self.renew_every(),
        };
        let outcome = tokio::time::timeout_at(limit, work).await;
        self.end_stuck_refused |= refused;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(instance = %self.instance, "cannot end a frozen instance's sessions: {e}")
            }
            Err(_) => {
                self.db.reset().await;
                tracing::debug!(instance = %self.instance, "no answer in time while ending a frozen instance's sessions");
            }
        }
    }

    /// One transaction (after the missing lease rows): a round that fails part-way leaves
    /// nothing behind (a claim whose round failed would be a lease held by nobody who knows
    /// it). ARCHITECTURE.md §9: rounds never wait for each other.
    async fn exchange_on(
        &self,
        client: &mut tokio_postgres::Client,
        configured: &[String],
        renew: &[(String, i64)],
        stopping: &[String],
        running: usize,
        claiming: bool,
    ) -> Result<Round, tokio_postgres::Error> {
        let ttl = millis(self.ttl);
        let me = &self.instance;
        let mut round = Round::default();
        // A lease row for each configured feed that has none, before the round's transaction
        // and only for the missing ones: a unique check on an existing row waits for any
        // transaction updating it, so inserting every feed inside the round made each round
        // wait for the others' renewals, and two rounds renewing then inserting deadlocked
        // (a one-second stall, PostgreSQL's deadlock_timeout, that could cost the leases).
        // An unowned row left by a round that then fails is harmless.
        client
            .execute(
                "INSERT INTO sse_bridge_leases (feed) SELECT f FROM unnest($1::text[]) AS f \
                 WHERE NOT EXISTS (SELECT 1 FROM sse_bridge_leases l WHERE l.feed = f) \
                 ON CONFLICT (feed) DO NOTHING",
                &[&configured],
            )
            .await?;
        let client = client.transaction().await?;
        client
            .execute(
                "INSERT INTO sse_bridge_instances (instance, expires_at) \
                 VALUES ($1, now() + $2::bigint * interval '1 millisecond') \
                 ON CONFLICT (instance) DO UPDATE SET seen_at = now(), \
                     expires_at = excluded.expires_at",
                // An instance that is shutting down no longer counts as live: the others'
                // shares grow to cover its feeds as it releases them.
                &[me, &if claiming { ttl } else { 0 }],
            )
            .await?;
        if !renew.is_empty() {
            let feeds: Vec<&str> = renew.iter().map(|(f, _)| f.as_str()).collect();
            let epochs: Vec<i64> = renew.iter().map(|(_, e)| *e).collect();
            round.renewed = client
                .query(
                    // A row another transaction is updating (none of the fleet's: it is
                    // ours and unexpired) is skipped, not waited for: that one lease is
                    // lost, not the round and every lease with it. Writers' `FOR KEY SHARE`
                    // does not conflict with this lock.
                    concat!(
                        "UPDATE sse_bridge_leases l \
                         SET expires_at = now() + $4::bigint * interval '1 millisecond' FROM ",
                        ours_unlocked!(),
                        " WHERE l.feed = r.feed RETURNING l.feed"
                    ),
                    &[&feeds, &epochs, me, &ttl],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
        }
        let live: Vec<String> = client
            .query(
                "SELECT instance FROM sse_bridge_instances WHERE expires_at > now() \
                 ORDER BY instance",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        round.live = live.len() as u64;
        let share = fair_share(configured.len(), &live, me);
        let holding = round.renewed.len();
        if claiming && holding < share {
            let want = i64::try_from(share - holding).unwrap_or(0);
            round.claimed = client
                .query(
                    "WITH free AS ( \
                         SELECT feed, CASE WHEN expires_at > now() THEN NULL ELSE owner END AS previous \
                         FROM sse_bridge_leases \
                         WHERE feed = ANY($2) AND NOT (feed = ANY($3)) \
                           AND (owner IS NULL OR expires_at <= now()) \
                         ORDER BY feed LIMIT $4 FOR UPDATE SKIP LOCKED) \
                     UPDATE sse_bridge_leases l SET owner = $1, epoch = l.epoch + 1, \
                         expires_at = now() + $5::bigint * interval '1 millisecond', \
                         claimed_at = now() \
                     FROM free WHERE l.feed = free.feed \
                     RETURNING l.feed, l.epoch, free.previous",
                    &[me, &configured, &stopping, &want, &ttl],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
        }
        if running > share {
            // Hand over only what others can take: the instances below their share, less
            // the free leases they will claim first.
            let counts: BTreeMap<String, usize> = client
                .query(
                    "SELECT owner, count(*) FROM sse_bridge_leases \
                     WHERE owner IS NOT NULL AND expires_at > now() AND feed = ANY($1) \
                     GROUP BY owner",
                    &[&configured],
                )
                .await?
                .iter()
                .map(|r| {
                    (
                        r.get::<_, String>(0),
                        usize::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                    )
                })
                .collect();
            let owned: usize = counts.values().sum();
            let free = configured.len().saturating_sub(owned);
            let deficit: usize = live
                .iter()
                .filter(|i| *i != me)
                .map(|i| {
                    fair_share(configured.len(), &live, i)
                        .saturating_sub(counts.get(i).copied().unwrap_or(0))
                })
                .sum();
            round.hand_over = (running - share).min(deficit.saturating_sub(free));
        }
        if claiming {
            round.stuck = client
                .query(STUCK_SQL, &[&configured, me, &(ttl / 2)])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
        }
        round.leases = client
            .query(
                "SELECT feed, CASE WHEN expires_at > now() THEN owner END, epoch \
                 FROM sse_bridge_leases WHERE feed = ANY($1) ORDER BY feed",
                &[&configured],
            )
            .await?
            .iter()
            .map(|r| LeaseView {
                feed: r.get(0),
                owner: r.get(1),
                epoch: r.get(2),
            })
            .collect();
        client.commit().await?;
        Ok(round)
    }

    /// At shutdown, after the drain: releases what is still held and removes the heartbeat.
    async fn leave(&mut self) {
        let held = self.held();
        match self.release(&held).await {
            Ok(()) => {
                if !held.is_empty() {
                    self.stats
                        .handed_over
                        .fetch_add(held.len() as u64, Ordering::Relaxed);
                    tracing::info!(instance = %self.instance, leases = held.len(), "released every lease held: the other instances take the feeds over now");
                }
            }
            Err(e) => {
                tracing::warn!(instance = %self.instance, "could not release the leases at shutdown (they end within lease_ttl): {e}")
            }
        }
        for (feed, _) in &held {
            self.fence.forget(feed);
        }
        self.leases.clear();
        self.update_held_gauge();
        if let Ok(mut held) = self.db.client().await {
            if let Some(client) = held.as_mut() {
                let _ = tokio::time::timeout(
                    self.db.timeout,
                    client.execute(
                        "DELETE FROM sse_bridge_instances WHERE instance = $1",
                        &[&self.instance],
                    ),
                )
                .await;
            }
        }
        tracing::info!(instance = %self.instance, "left the fleet");
    }
}

#[cfg(test)]
mod tests {
    use super::fair_share;

    #[test]
    fn fair_shares_add_up_to_the_feeds() {
        let live: Vec<String> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for feeds in [0, 1, 4, 12, 13, 100] {
            for n in 1..=live.len() {
                let live = &live[..n];
                let total: usize = live.iter().map(|i| fair_share(feeds, live, i)).sum();
                assert_eq!(total, feeds, "{feeds} feeds on {n} instances");
                let shares: Vec<usize> = live.iter().map(|i| fair_share(feeds, live, i)).collect();
                let spread = shares.iter().max().unwrap_or(&0) - shares.iter().min().unwrap_or(&0);
                assert!(spread <= 1, "{shares:?}");
            }
        }
        // Not yet in the list (its heartbeat is not seen): counted as the last.
        assert_eq!(fair_share(12, &["a".into(), "b".into()], "z"), 6);
    }
}
