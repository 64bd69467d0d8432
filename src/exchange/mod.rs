//! Two-way sync: event validation, who receives which event, the journal, and consumer lag.

pub mod address;
pub mod journal;
pub mod lag;
pub mod validate;
