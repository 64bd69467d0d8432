//! The development kit: [`certs`], a throw-away PKI for the demo and tests (never for
//! production: `civgate certs` says so), and [`synth`], a deterministic synthetic population
//! for the reference directory, tests and benchmarks. Nothing here is on a request's path.

pub mod certs;
pub mod synth;

use civgate_domain as domain;

/// `audit::note`, as the PKI's audit signing key uses it.
mod audit {
    pub use civgate_tlog::note;
}
