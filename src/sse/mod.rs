//! The EventSource client: a spec-exact stream parser, a retry policy, and the HTTP transport,
//! each a small module testable alone, tied together by [`client::EventSource`].

pub mod client;
pub mod connection;
pub mod encode;
pub mod http1;
pub mod parser;
pub mod retry;
pub mod status;
