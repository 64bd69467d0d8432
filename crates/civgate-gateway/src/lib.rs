//! The gateway: what runs between the registries and the population database. The request
//! path reads straight through — [`listener`] (connections, handshakes) → [`tls`] (mutual
//! TLS, revocation) → [`gate`] (identity, policy, limits, the call's audit record) → [`api`]
//! (the services) → [`upstream`] (the population directory) — and [`server`] assembles it
//! from a [`config`], reloadable while it runs ([`state`]).

pub mod api;
pub mod client;
pub mod coalesce;
pub mod config;
pub mod convert;
pub mod exchange;
pub mod gate;
pub(crate) mod health;
pub mod link;
pub mod listener;
pub mod otel;
pub mod server;
pub mod shared;
pub mod state;
pub mod telemetry;
pub mod tls;
pub(crate) mod trace;
pub mod upstream;

use civgate_audit as audit;
use civgate_domain as domain;
use civgate_policy::{self as policy, identity, limits};
use civgate_proto as pb;
use civgate_store::{self as store, sqlite};
