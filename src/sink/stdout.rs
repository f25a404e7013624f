//! Stdout sink (stub, owned by the sinks helper).
use serde::{Deserialize, Serialize};

use super::{BufferConfig, SinkError};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {
    #[serde(default)]
    pub buffer: BufferConfig,
}

impl StdoutSinkConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

pub struct StdoutSink;

impl StdoutSink {
    pub fn build(_name: &str, _c: &StdoutSinkConfig) -> Result<Self, SinkError> {
        todo!()
    }
}

impl super::Sink for StdoutSink {
    fn write(&mut self, _e: &[std::sync::Arc<crate::event::Event>]) -> Result<(), SinkError> {
        todo!()
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        todo!()
    }
}
