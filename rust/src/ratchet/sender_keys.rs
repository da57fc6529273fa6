//! Sender keys for groups (in progress).
