//! File sink (stub, owned by the sinks helper).
use serde::{Deserialize, Serialize};

use super::{BufferConfig, SinkError};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    pub path: String,
    #[serde(default)]
    pub buffer: BufferConfig,
}

impl FileSinkConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    pub fn accepts_type(&self, _t: &str) -> bool {
        true
    }
}

pub struct FileSink;

impl FileSink {
    pub fn build(_name: &str, _c: &FileSinkConfig) -> Result<Self, SinkError> {
        todo!()
    }
}

impl super::Sink for FileSink {
    fn write(&mut self, _e: &[std::sync::Arc<crate::event::Event>]) -> Result<(), SinkError> {
        todo!()
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        todo!()
    }
}
