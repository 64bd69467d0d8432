//! What a reload replaces: the TLS config, the policy and the config they came from, as one
//! immutable snapshot behind an `ArcSwap`. Readers take a snapshot per connection (TLS) or per
//! request (policy) and never see a half-applied reload.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;

use crate::{
    config::{Config, ConfigErrors},
    policy::Policy,
    tls,
};

pub struct Snapshot {
    pub config: Arc<Config>,
    pub tls: Arc<ServerConfig>,
    pub policy: Arc<Policy>,
}

impl Snapshot {
    /// Validates everything a config refers to (files, PEM, keys) before it can go live.
    pub fn build(config: Config) -> Result<Self, ConfigErrors> {
        let tls = tls::server_config(&config)?;
        let policy = Arc::new(config.policy());
        Ok(Self {
            config: Arc::new(config),
            tls,
            policy,
        })
    }
}

pub type Shared = Arc<ArcSwap<Snapshot>>;
