//! Checkpoint tracking.
