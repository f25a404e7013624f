//! The leases this instance holds, as the writers see them (ARCHITECTURE.md §9): every
//! checkpoint write and every `postgres` sink transaction names the feed's epoch from here
//! and checks it against the lease row in the same transaction.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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

    /// The stop token of the feed's run here.
    pub fn register_run(&self, feed: &str, stop: CancellationToken) {
        if let Ok(mut runs) = self.runs.lock() {
            runs.insert(feed.to_string(), stop);
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
