//! The tamper-evident audit log: one record per RPC, the leaves of an RFC 9162 Merkle tree,
//! with C2SP signed checkpoints.

pub mod merkle;
pub mod note;
