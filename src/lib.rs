//! civgate: the gRPC gateway between Vietnam's civil-status database and the National
//! Population Database. See ARCHITECTURE.md for the map.
//!
//! This package is the `civgate` binary: `main` dispatches its subcommands. The library
//! re-exports the workspace's crates under one name, for the binary, the integration tests and
//! the benchmarks.

/// The audit log (`civgate-audit`) and the auditor's tools built on it (`civgate-auditor`).
pub mod audit {
    pub use civgate_audit::*;
    pub use civgate_auditor::{auditor, cases, cli};
}

pub use civgate_dev::{certs, synth};
pub use civgate_domain as domain;
pub use civgate_gateway::{
    api, client, coalesce, config, convert, exchange, gate, link, listener, server, shared, state,
    telemetry, tls, upstream,
};
pub use civgate_policy::{self as policy, identity, limits};
pub use civgate_proto as pb;
pub use civgate_refdb as refdb;
pub use civgate_store::{self as store, sqlite};
pub use civgate_tools::{bench, demo};
