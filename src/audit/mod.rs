//! The audit log (`civgate-audit`), and the auditor's tools built on it: [`auditor`] checks a
//! gateway's log (online or from an export) against signed checkpoints, [`cli`] is
//! `civgate audit …`.

pub mod auditor;
pub mod cli;

pub use civgate_audit::*;
