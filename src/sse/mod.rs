//! The EventSource client: a spec-exact stream parser, a retry policy, a transport trait with
//! the lean HTTP/1.1 transport behind it, and the reconnecting state machine tying them
//! together ([`client::EventSource`]). It depends on nothing else in the crate: it takes its own
//! [`options::ClientOptions`] and reports gaps through its own [`client::GapKind`].

pub mod client;
pub mod connection;
pub mod encode;
pub mod options;
pub mod parser;
pub mod response;
pub mod retry;
pub mod secret;
pub mod status;
pub mod token_command;
pub mod transport;
