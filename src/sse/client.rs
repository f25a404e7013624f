//! EventSource loop (stub, owned by the client helper).
