//! Hostile streams, hostile local clients and careless configs, each driven against the real
//! binary or the real sink: nothing outside a sink's own files is touched, no event is lost
//! for its type's spelling, memory stays bounded in bytes, two bridges never share a state
//! database, no input makes the bridge spin, and no secret is ever printed. See
//! ARCHITECTURE.md ("Hostile input and bounded resources").

#[path = "../support/mod.rs"]
mod support;

mod file_sink;
mod limits;
mod secrets;
mod serve_admin;
