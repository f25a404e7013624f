//! Migration runner (stub, owned by the state helper).
