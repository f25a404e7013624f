//! The JSON Lines format shared by the file and stdout sinks (stub, owned by the sinks helper).
