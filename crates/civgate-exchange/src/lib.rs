//! Two-way sync between the civil-status registries and the population database: every
//! event is validated ([`validate`]: topic, producer, every field), addressed ([`address`]: the
//! agencies that receive it) and journaled ([`journal`]: per-topic gap-free sequences in commit
//! order, idempotent publishes, consumer groups owned by agencies, retention), with the audit
//! record of the call that wrote it committed in the same transaction.

pub mod address;
pub mod cases;
pub mod journal;
pub mod validate;

use civgate_audit as audit;
use civgate_domain as domain;
use civgate_policy as policy;
use civgate_proto as pb;
use civgate_store::{self as store, sqlite};

/// Unacknowledged events a subscription may have outstanding before delivery pauses (the
/// default of `[exchange] max_unacked`).
pub const WINDOW: u64 = 1_024;
