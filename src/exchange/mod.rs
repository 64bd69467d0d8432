//! Two-way sync: event validation, who receives which event, the journal, and consumer lag.

pub mod address;
pub mod journal;
pub mod lag;
pub mod validate;

/// Unacknowledged events a subscription may have outstanding before delivery pauses (the
/// default of `[exchange] max_unacked`).
pub const WINDOW: u64 = 1_024;
