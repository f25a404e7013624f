//! The counters moved to [`crate::telemetry`]; this path stays so that code written against it
//! (the sink runner's write histogram) keeps compiling.

pub use crate::telemetry::{
    Histogram, HistogramSnapshot, TypeCache, TypeStats, TypeTable, LATENCY_BUCKETS, MAX_TYPES,
    MAX_TYPE_LEN, OTHER_TYPE,
};
