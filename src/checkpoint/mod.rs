//! Checkpoints (ARCHITECTURE.md §4): where a feed's checkpoint may move ([`tracker`]: the
//! acknowledged prefix of the feed) and how it reaches the state database ([`committer`]:
//! every `commit_interval` and at shutdown, in one transaction).

pub mod committer;
pub mod tracker;

use std::sync::{Arc, Mutex};

use crate::state::StateStore;

pub use committer::{commit, commit_loop, Committable};
pub use tracker::{EventId, FeedTracker, Position};

use crate::state::StateError;

/// The state database, shared by the committer, the feeds (gaps, start positions) and the
/// supervisor; every use is a short blocking call on a blocking thread ([`with_store`]).
pub type SharedState = Arc<Mutex<StateStore>>;

/// Why a call on the shared state database failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the state store's lock is poisoned (a thread panicked while holding it)")]
    Poisoned,
    #[error("the state store's blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs `f` on the state database on a blocking thread (SQLite calls block).
pub async fn with_store<T, F>(state: &SharedState, f: F) -> Result<T, StoreError>
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
