//! Checkpoints (ARCHITECTURE.md §4): where a feed's checkpoint may move ([`tracker`]: the
//! acknowledged prefix of the feed) and how it reaches the state database ([`committer`]:
//! every `commit_interval` and at shutdown, in one transaction).

pub mod committer;
pub mod tracker;

use std::sync::{Arc, Mutex};

use crate::state::StateStore;

pub use committer::{commit, commit_loop, CommitError, Committable};
pub use tracker::{EventId, FeedTracker, Position};

/// The state database, shared by the committer, the feeds (gaps, start positions) and the
/// supervisor; every use is a short blocking call on a blocking thread.
pub type SharedState = Arc<Mutex<StateStore>>;
