//! Two-way sync (`civgate-exchange`: validation, addressing, the journal), and the consumer
//! lag the gateway reports from it ([`lag`]).

pub mod lag;

pub use civgate_exchange::*;
