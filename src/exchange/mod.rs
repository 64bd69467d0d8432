//! Two-way sync: event validation and (as issue #4 lands) the journal and delivery.

pub mod journal;
pub mod validate;
