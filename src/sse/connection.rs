//! HTTP transport (stub, owned by the client helper).
