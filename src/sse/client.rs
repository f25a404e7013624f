//! EventSource loop (TEMPORARY STUB so the crate compiles; the client helper replaces this whole file).
#![allow(dead_code, unused_variables)]
use std::sync::Arc;

use crate::config::FeedConfig;
use crate::sse::parser::Item;
use crate::sse::status::StatusHandle;
use crate::state::GapReason;

pub enum Next {
    Items,
    Gap { reason: GapReason, detail: String },
    Stopped { reason: String },
}
pub struct EventSource;
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct ClientError;
impl EventSource {
    pub fn new(feed: Arc<FeedConfig>, start: String, status: StatusHandle) -> Result<Self, ClientError> {
        todo!()
    }
    pub async fn next(&mut self, out: &mut Vec<Item>) -> Next {
        todo!()
    }
    pub fn last_event_id(&self) -> &str {
        todo!()
    }
}
