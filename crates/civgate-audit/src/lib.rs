//! The tamper-evident audit log: one record per RPC, the leaves of an RFC 9162 Merkle tree,
//! with C2SP signed checkpoints.

//!
//! The gateway's side of the log: [`Call`] and [`Facts`] (what a handler tells its call's
//! record), [`log`] (storage, the writers, proofs, searches) and [`subjects`] (per-block
//! summaries that searches skip by). The arithmetic an auditor needs is `civgate-tlog`.

pub mod groups;
pub mod log;
pub mod subjects;

pub use civgate_tlog::{merkle, note};

use civgate_policy::{self as policy, identity};
use civgate_proto as pb;
use civgate_store::{self as store, sqlite};

/// The audit log's size, a gauge.
pub const AUDIT_LOG_SIZE: &str = "civgate_audit_log_size";
/// Blocks of the audit log, from the first, that have their search summary, a gauge.
pub const AUDIT_BLOCKS_SUMMARISED: &str = "civgate_audit_blocks_summarised";
/// Groups of blocks, from the first, that have their search summary, a gauge.
pub const AUDIT_GROUPS_SUMMARISED: &str = "civgate_audit_groups_summarised";
/// Audit records dropped because the store did not take them for too long, a counter.
pub const AUDIT_RECORDS_LOST: &str = "civgate_audit_records_lost_total";
/// 1 while the store does not commit within its timeout, a gauge.
pub const STORE_STALLED: &str = "civgate_store_stalled";

pub use log::{AuditError, AuditLog, AuditTail, Filter};

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use crate::{identity::PeerIdentity, pb::v1::AuditRecord, policy::Principal};

/// What a handler tells the audit record about its call: the declared purpose, the citizens
/// concerned and the names of the fields it returned. Identifiers and names only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub purpose: String,
    pub subjects: Vec<String>,
    pub fields: Vec<String>,
    /// The index of the call's record when the handler's own write already committed it, in
    /// the same transaction as its data (`Publish`): the gate then appends nothing.
    pub recorded: Option<u64>,
    /// Why the handler refused the call, as a short machine reason (e.g. `topic_not_granted`):
    /// the record's detail.
    pub refusal: &'static str,
    /// The case the call served (a request's or a published event's `case_reference`).
    pub case_reference: String,
    /// The record's detail when there is no `refusal` reason: what was refused (e.g.
    /// `invalid:personal_id,purpose`) or noticed (`no_match:date_of_birth`). Names only.
    pub detail: String,
}

/// What the gate knows of a call when it arrives: who (the verified peer and, once
/// authorized, the principal), which method, the request id and the arrival time. With the
/// handler's [`Facts`] and the outcome it makes the call's audit record. The gate hands an
/// authorized call's `Arc<Call>` to the handler (request extension), so a handler that commits
/// the record together with its own write builds exactly the record the gate would have.
#[derive(Debug)]
pub struct Call {
    pub peer: Arc<PeerIdentity>,
    pub principal: Option<Principal>,
    pub path: String,
    pub request_id: String,
    pub started: Instant,
    /// Set by a journal writer once it has committed this call's record with its own write,
    /// before it lets go of the call: the gate, finding the call abandoned by its client,
    /// then knows there is nothing left to record.
    recorded: std::sync::atomic::AtomicBool,
}

impl Call {
    pub fn new(
        peer: Arc<PeerIdentity>,
        principal: Option<Principal>,
        path: String,
        request_id: String,
        started: Instant,
    ) -> Self {
        Self {
            peer,
            principal,
            path,
            request_id,
            started,
            recorded: Default::default(),
        }
    }

    /// A journal writer committed this call's record (see [`Call::is_recorded`]).
    pub fn mark_recorded(&self) {
        self.recorded
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether a journal writer committed this call's record. Read it once no writer holds
    /// the call any more (`Arc::strong_count` 1, after an acquire fence).
    pub fn is_recorded(&self) -> bool {
        self.recorded.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The audit record of this call: identifiers and field names only. `time` is now,
    /// `latency` runs from the call's arrival to now.
    pub fn record(&self, facts: Facts, code: tonic::Code, detail: &str) -> AuditRecord {
        AuditRecord {
            index: 0,
            time_unix_ms: log::now_ms(),
            agency_id: self
                .peer
                .agency
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            role: self
                .principal
                .as_ref()
                .map(|p| p.role.as_str().to_owned())
                .unwrap_or_default(),
            cert_fingerprint: self.peer.fingerprint.to_hex(),
            // Client-controlled for unknown paths: bounded.
            method: first_chars(&self.path, 200).to_owned(),
            purpose: facts.purpose,
            subject_personal_ids: facts.subjects,
            fields_returned: facts.fields,
            outcome: code_name(code).to_owned(),
            request_id: self.request_id.clone(),
            latency_us: self.started.elapsed().as_micros() as u64,
            detail: detail.to_owned(),
            case_reference: facts.case_reference,
        }
    }

    /// The call of a request (`None` if the gate did not pass one: audit off, or a test
    /// calling a handler directly).
    pub fn of<T>(req: &tonic::Request<T>) -> Option<Arc<Call>> {
        req.extensions().get::<Arc<Call>>().cloned()
    }
}

/// The first `n` characters of `s` (all of it if shorter), without copying character by
/// character: every call's record takes its method name through here.
fn first_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

/// A call whose audit record a store writer finishes once it knows the outcome, and commits in
/// the same transaction as the call's own data.
#[derive(Debug)]
pub struct Draft {
    pub call: Arc<Call>,
    pub facts: Facts,
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

/// gRPC code names as in the gRPC spec (`PERMISSION_DENIED`): a record's outcome, and the
/// label of metrics and logs.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::first_chars;

    #[test]
    fn first_chars_counts_characters_not_bytes() {
        assert_eq!(
            first_chars("/civgate.v1.Citizens/GetCitizen", 200),
            "/civgate.v1.Citizens/GetCitizen"
        );
        assert_eq!(first_chars("abc", 3), "abc");
        assert_eq!(first_chars("abcd", 3), "abc");
        assert_eq!(first_chars("", 3), "");
        let vi = "Nguyễn Văn Ánh";
        assert_eq!(first_chars(vi, 8), "Nguyễn V");
        let long = "ệ".repeat(250);
        assert_eq!(first_chars(&long, 200), "ệ".repeat(200));
        assert_eq!(
            first_chars(&long, 200),
            long.chars().take(200).collect::<String>()
        );
    }
}
