//! Checkpoints (ARCHITECTURE.md §4): where a feed's checkpoint may move ([`tracker`]: the
//! acknowledged prefix of the feed) and how it reaches the state database ([`committer`]:
//! every `commit_interval` and at shutdown, in one transaction).

pub mod committer;
pub mod tracker;

use std::sync::{Arc, Mutex};

use crate::cluster::store::FleetStore;
use crate::state::{Checkpoint, Gap, Recorded, StateStore};

pub use committer::{commit, commit_loop, Committable};
pub use tracker::{EventId, FeedTracker, Position};

use crate::state::StateError;

/// Where checkpoints and gaps live, shared by the committer, the feeds (gaps, start
/// positions) and the supervisor: the SQLite state database of a single bridge (every use a
/// short blocking call on a blocking thread, [`with_store`]), or a fleet's PostgreSQL tables
/// (ARCHITECTURE.md §9).
#[derive(Clone)]
pub enum SharedState {
    Local(Arc<Mutex<StateStore>>),
    Fleet(Arc<FleetStore>),
}

impl SharedState {
    /// The SQLite state database of a single bridge.
    pub fn local(store: StateStore) -> SharedState {
        SharedState::Local(Arc::new(Mutex::new(store)))
    }

    /// Commits every checkpoint in `cps` in one transaction (in a fleet: those whose run's
    /// lease epoch, in `epochs`, this instance still holds; the others are reported lost and
    /// left out).
    pub async fn save_checkpoints(
        &self,
        cps: Vec<Checkpoint>,
        epochs: Vec<Option<i64>>,
    ) -> Result<(), StoreError> {
        match self {
            SharedState::Local(store) => with_store(store, move |s| s.save_checkpoints(&cps)).await,
            SharedState::Fleet(fleet) => fleet
                .save_checkpoints(&cps, &epochs)
                .await
                .map(|_| ())
                .map_err(StoreError::Fleet),
        }
    }

    /// Records a gap.
    pub async fn record_gap(&self, gap: Gap) -> Result<Recorded, StoreError> {
        match self {
            SharedState::Local(store) => with_store(store, move |s| s.record_gap(&gap)).await,
            SharedState::Fleet(fleet) => fleet.record_gap(&gap).await.map_err(StoreError::Fleet),
        }
    }

    /// The checkpoint of `feed` at `url`, and whether the feed has one for another URL.
    pub async fn checkpoint(
        &self,
        feed: &str,
        url: &str,
    ) -> Result<(Option<Checkpoint>, bool), StoreError> {
        match self {
            SharedState::Local(store) => {
                let (feed, url) = (feed.to_string(), url.to_string());
                with_store(store, move |s| {
                    Ok((
                        s.checkpoint(&feed, &url)?,
                        s.has_checkpoint_for_other_url(&feed, &url)?,
                    ))
                })
                .await
            }
            SharedState::Fleet(fleet) => {
                fleet.checkpoint(feed, url).await.map_err(StoreError::Fleet)
            }
        }
    }
}

/// Why a call on the shared state database failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Fleet(String),
    #[error("the state store's lock is poisoned (a thread panicked while holding it)")]
    Poisoned,
    #[error("the state store's blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs `f` on the state database on a blocking thread (SQLite calls block).
pub async fn with_store<T, F>(state: &Arc<Mutex<StateStore>>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&mut StateStore) -> Result<T, StateError> + Send + 'static,
{
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let mut store = state.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(f(&mut store)?)
    })
    .await?
}
