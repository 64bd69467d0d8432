//! civgate: the gRPC gateway between Vietnam's civil-status database and the National
//! Population Database. See ARCHITECTURE.md for the map.

pub mod api;
pub mod audit;
pub mod bench;
pub use civgate_dev::certs;
pub mod client;
pub mod coalesce;
pub mod config;
pub mod convert;
pub mod demo;
pub use civgate_domain as domain;
pub mod exchange;
pub mod gate;
pub use civgate_policy::identity;
pub use civgate_policy::limits;
pub mod link;
pub mod listener;
pub use civgate_policy as policy;
pub use civgate_proto as pb;
pub mod refdb;
pub mod server;
pub mod shared;
pub use civgate_store::sqlite;
pub mod state;
pub use civgate_dev::synth;
pub use civgate_store as store;
pub mod telemetry;
pub mod tls;
pub mod upstream;
