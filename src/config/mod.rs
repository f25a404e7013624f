//! Config.
pub mod feed;
pub mod units;
