//! sse-bridge: pipes Server-Sent Events feeds into durable sinks.
//!
//! Data flows one way:
//! socket -> [`sse::parser`] -> [`event::Event`] -> [`route`] -> [`sink`] -> acknowledgements
//! -> [`checkpoint`] -> [`state`].
//! Nothing downstream reaches back upstream except the acknowledgement.

pub mod admin;
pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod event;
pub mod http_server;
pub mod logging;
pub mod notify;
pub mod open_files;
pub mod pipeline;
pub mod replay;
pub mod route;
pub mod secret;
pub mod serve;
pub mod sink;
pub mod sse;
pub mod state;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod text;
