//! The JSON Lines format now lives in [`crate::store::jsonl`], the storage module of that
//! format; this path keeps the sinks and tools that name `sink::jsonl` compiling.

pub use crate::store::jsonl::*;
