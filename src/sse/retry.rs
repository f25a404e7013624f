//! Retry policy (stub, owned by the client helper).
