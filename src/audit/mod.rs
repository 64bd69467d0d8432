//! The tamper-evident audit log: one record per RPC, the leaves of an RFC 9162 Merkle tree,
//! with C2SP signed checkpoints.

pub mod auditor;
pub mod cli;
pub mod log;
pub mod merkle;
pub mod note;

pub use log::{AuditError, AuditLog, Filter};

use std::sync::{Arc, Mutex};

/// What a handler tells the audit record about its call: the declared purpose, the citizens
/// concerned and the names of the fields it returned. Identifiers and names only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub purpose: String,
    pub subjects: Vec<String>,
    pub fields: Vec<String>,
}

/// Shared between the gate (which writes the record) and the handler (which knows the facts).
#[derive(Clone, Debug, Default)]
pub struct FactsSlot(Arc<Mutex<Facts>>);

impl FactsSlot {
    /// The slot of a request (a detached one if the gate did not insert any).
    pub fn of<T>(req: &tonic::Request<T>) -> Self {
        req.extensions()
            .get::<FactsSlot>()
            .cloned()
            .unwrap_or_default()
    }

    pub fn update(&self, f: impl FnOnce(&mut Facts)) {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard);
    }

    pub fn take(&self) -> Facts {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
