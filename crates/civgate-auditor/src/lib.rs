//! The auditor's tools: [`auditor`] checks a gateway's audit log (online, or from an export)
//! against the gateway's signed checkpoints, trusting nothing but the verifier key; [`cli`] is
//! `civgate audit …`, [`cases`] is `civgate cases …` (who is late). The arithmetic is `civgate-tlog`'s; nothing here reads a store.

pub mod auditor;
pub mod cases;
pub mod cli;

use civgate_domain as domain;
use civgate_gateway::client;
use civgate_proto as pb;
use civgate_tlog::{merkle, note};

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
