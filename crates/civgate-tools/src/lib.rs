//! civgate's developer tools, subcommands of the one binary but never on a request's path:
//! [`demo`] (`civgate demo`: the gateway, the reference directory and a walk through the
//! cases, on loopback) and [`bench`] (`civgate bench …`: the load generators).

pub mod bench;
pub mod demo;

/// The audit log and the auditor's checks, as the demo uses both.
mod audit {
    pub use civgate_audit::*;
    pub use civgate_auditor::{auditor, cases};
}
use civgate_dev::{certs, synth};
use civgate_domain as domain;
use civgate_gateway::{client, config, convert, link, server, telemetry};
use civgate_proto as pb;
use civgate_refdb as refdb;
use civgate_store as store;
