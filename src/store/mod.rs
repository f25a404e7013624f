//! Storage formats, one module each: what is written and how it is read back, in one place.
//!
//! - [`jsonl`]: the JSON Lines codec of the `file` and `stdout` sinks and of `replay`, and the
//!   one time formatter every stored time is written with.
//! - [`sqlite`]: the SQLite `events` table (the `sqlite` sink writes it, `replay` and `serve`
//!   read it) and the monotonic checkpoint upsert (the state store and a sink sharing the
//!   state database).
//!
//! SSE framing, the third format events leave in, lives beside its parser
//! (`crate::sse::encode`).

pub mod jsonl;
pub mod sqlite;
