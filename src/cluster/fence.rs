//! The leases this instance holds, as the writers see them (ARCHITECTURE.md §9): every
//! checkpoint write and every `postgres` sink transaction names the feed's epoch from here
//! and checks it against the lease row in the same transaction.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The fence itself, run first in a writer's transaction: of the (feed, epoch) pairs `$1`,
/// `$2`, the feeds whose lease `$3` still owns under that epoch, unexpired by the database's
/// clock, each row held `FOR KEY SHARE` until the transaction ends (a claim, `FOR UPDATE`,
/// cannot take it meanwhile; a renewal changes no key and goes on). Unexpired now, not at
/// the transaction's start (`now()`): a sink batch may have waited for the table's write
/// lock since.
pub const HOLDING_SQL: &str =
    "SELECT l.feed FROM unnest($1::text[], $2::bigint[]) AS w(feed, epoch) \
     JOIN sse_bridge_leases l ON l.feed = w.feed AND l.epoch = w.epoch \
     WHERE l.owner = $3 AND l.expires_at > clock_timestamp() FOR KEY SHARE OF l";

/// The epochs of the leases held, and the way back to the coordinator for a writer that found
/// a lease gone.
pub struct Fence {
    instance: String,
    database: tokio_postgres::Config,
    lease_ttl: std::time::Duration,
    held: RwLock<HashMap<String, i64>>,
    lost: mpsc::UnboundedSender<(String, i64)>,
    /// Each running feed's stop token, so that a lost lease stops reading at once, without
    /// waiting for the supervisor's loop.
    runs: Mutex<HashMap<String, CancellationToken>>,
}

impl Fence {
    /// A fence for `instance`; feeds a writer finds fenced out are sent to `lost`.
    pub fn new(
        instance: String,
        database: tokio_postgres::Config,
        lease_ttl: std::time::Duration,
        lost: mpsc::UnboundedSender<(String, i64)>,
    ) -> Fence {
        Fence {
            instance,
            database,
            lease_ttl,
            held: RwLock::default(),
            lost,
            runs: Mutex::default(),
        }
    }

    /// This instance's name (the lease owner it writes as).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The fleet's database (where a fenced writer must write).
    pub fn database(&self) -> &tokio_postgres::Config {
        &self.database
    }

    /// The fleet's `lease_ttl`.
    pub fn lease_ttl(&self) -> std::time::Duration {
        self.lease_ttl
    }

    /// The epoch of `feed`'s lease, if this instance holds it.
    pub fn epoch(&self, feed: &str) -> Option<i64> {
        self.held.read().ok().and_then(|m| m.get(feed).copied())
    }

    pub(super) fn hold(&self, feed: &str, epoch: i64) {
        if let Ok(mut m) = self.held.write() {
            m.insert(feed.to_string(), epoch);
        }
    }

    pub(super) fn forget(&self, feed: &str) {
        if let Ok(mut m) = self.held.write() {
            m.remove(feed);
        }
    }

    /// A writer found that this instance no longer holds `feed`'s lease at `epoch` (the
    /// database said so inside its transaction): the coordinator stops that run.
    pub fn report_lost(&self, feed: &str, epoch: i64) {
        let _ = self.lost.send((feed.to_string(), epoch));
    }

    /// The stop token of the feed's run here, under `epoch`. A lease lost before the run
    /// was registered stops it at once: the token is in place before the epoch is checked,
    /// and a loss forgets the epoch before it cancels, so one of the two sees the other.
    pub fn register_run(&self, feed: &str, epoch: i64, stop: CancellationToken) {
        if let Ok(mut runs) = self.runs.lock() {
            runs.insert(feed.to_string(), stop.clone());
            if self.epoch(feed) != Some(epoch) {
                runs.remove(feed);
                stop.cancel();
            }
        }
    }

    /// Stops reading the feed now (its lease is lost).
    pub(super) fn cancel_run(&self, feed: &str) {
        if let Ok(mut runs) = self.runs.lock() {
            if let Some(stop) = runs.remove(feed) {
                stop.cancel();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence() -> (Fence, mpsc::UnboundedReceiver<(String, i64)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let db = "host=db user=bridge dbname=fleet".parse().expect("config");
        (
            Fence::new("node-a".into(), db, std::time::Duration::from_secs(3), tx),
            rx,
        )
    }

    #[test]
    fn a_run_registered_after_its_lease_was_lost_stops_at_once() {
        let (fence, _rx) = fence();
        fence.hold("f", 7);
        let held = CancellationToken::new();
        fence.register_run("f", 7, held.clone());
        assert!(!held.is_cancelled(), "the lease is held under that epoch");
        fence.forget("f");
        fence.cancel_run("f");
        assert!(held.is_cancelled(), "a loss cancels the registered run");
        // Lost before the run registers (its Start was queued behind the loss), or claimed
        // again under a newer epoch since: the run stops as it registers.
        let late = CancellationToken::new();
        fence.register_run("f", 7, late.clone());
        assert!(late.is_cancelled());
        fence.hold("f", 8);
        let stale = CancellationToken::new();
        fence.register_run("f", 7, stale.clone());
        assert!(stale.is_cancelled());
    }

    #[test]
    fn lost_reports_carry_the_run_epoch() {
        let (fence, mut rx) = fence();
        fence.report_lost("f", 3);
        assert_eq!(rx.try_recv().ok(), Some(("f".to_string(), 3)));
    }
}
