//! The state store (stub, owned by the state helper): checkpoints and gaps in SQLite.

pub mod migrate;

use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Why a feed could not resume faithfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GapReason {
    /// The feed reconnected while its last event ID was empty: the stream carries no ids,
    /// so events sent while it was away are lost.
    ReconnectWithoutId,
    /// The bridge restarted and the feed's checkpoint has no ID (events were stored, but the
    /// stream carried no ids).
    RestartWithoutId,
    /// The server rejected the stored Last-Event-ID; the feed reconnected without it.
    IdRejected,
    /// The feed's URL changed, so its old checkpoint is not used.
    UrlChanged,
    /// The operator reset or set the checkpoint by hand.
    ManualChange,
}

impl GapReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::ReconnectWithoutId => "reconnect-without-id",
            GapReason::RestartWithoutId => "restart-without-id",
            GapReason::IdRejected => "id-rejected",
            GapReason::UrlChanged => "url-changed",
            GapReason::ManualChange => "manual-change",
        }
    }
}

/// A feed's durable cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    pub feed: String,
    pub url: String,
    /// The Last-Event-ID to send after a restart (may be empty).
    pub last_event_id: String,
    /// The bridge's sequence number of the event the checkpoint points at (0: none yet).
    pub seq: u64,
    pub updated_at: DateTime<Utc>,
}

/// A recorded gap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    pub feed: String,
    pub url: String,
    pub reason: GapReason,
    pub detail: String,
    /// The last event ID at the moment of the gap.
    pub last_event_id: String,
    /// The last sequence number assigned before the gap.
    pub seq: u64,
    pub at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {message}")]
    Db { path: String, message: String },
}

pub struct StateStore;

impl StateStore {
    pub fn open(_path: &Path) -> Result<Self, StateError> {
        todo!()
    }
    pub fn checkpoint(&self, _feed: &str, _url: &str) -> Result<Option<Checkpoint>, StateError> {
        todo!()
    }
    pub fn has_checkpoint_for_other_url(&self, _feed: &str, _url: &str) -> Result<bool, StateError> {
        todo!()
    }
    pub fn save_checkpoints(&mut self, _cps: &[Checkpoint]) -> Result<(), StateError> {
        todo!()
    }
    pub fn list_checkpoints(&self) -> Result<Vec<Checkpoint>, StateError> {
        todo!()
    }
    pub fn set_checkpoint(&mut self, _feed: &str, _url: &str, _id: &str) -> Result<(), StateError> {
        todo!()
    }
    pub fn reset_checkpoint(&mut self, _feed: &str) -> Result<usize, StateError> {
        todo!()
    }
    pub fn record_gap(&mut self, _gap: &Gap) -> Result<(), StateError> {
        todo!()
    }
    pub fn list_gaps(&self, _feed: Option<&str>) -> Result<Vec<Gap>, StateError> {
        todo!()
    }
}
