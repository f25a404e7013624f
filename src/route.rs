//! Router (stub, owned by the sinks helper): (feed, event type) -> sinks.
