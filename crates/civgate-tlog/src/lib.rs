//! The transparency log's arithmetic, with no I/O: RFC 9162 Merkle trees (leaf and node
//! hashes, inclusion and consistency proofs, the compact range a writer keeps of the tree's
//! right edge) and C2SP signed notes (checkpoints, Ed25519 signing and verification).
//!
//! This is what an auditor's own tool needs to check the gateway's audit log without trusting
//! its operator; the gateway depends on it, never the other way round.

pub mod merkle;
pub mod note;
