//! What a reload replaces: the TLS config, the policy and the config they came from, as one
//! immutable snapshot behind an `ArcSwap`. Readers take a snapshot per connection (TLS) or per
//! request (policy) and never see a half-applied reload.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;

use governor::clock::DefaultClock;

use crate::{
    config::{Config, ConfigErrors},
    limits::{HarvestGuard, InFlight, Quotas},
    policy::Policy,
    tls,
};

pub struct Snapshot {
    pub config: Arc<Config>,
    pub tls: Arc<ServerConfig>,
    pub policy: Arc<Policy>,
    pub quotas: Arc<Quotas>,
    pub in_flight: Arc<InFlight>,
    /// Carried over across reloads: the window of citizens read is not forgotten.
    pub harvest: Arc<HarvestGuard>,
    /// Refusals recorded per client certificate; carried over while its rate is unchanged.
    pub refusals: Arc<crate::limits::RefusalMeter>,
    /// Limits shared by replicas (`[shared_limits]`), set once by `serve` and kept across
    /// reloads; `None`: this replica's own limits only.
    pub shared: Option<Arc<crate::shared::SharedLimits>>,
    /// The flow table and the working calendar (`[cases]`).
    pub cases: Arc<crate::config::Cases>,
}

impl Snapshot {
    /// Validates everything a config refers to (files, PEM, keys) before it can go live.
    /// Quota buckets and the harvesting window carry over from `previous`.
    pub fn build(config: Config, previous: Option<&Snapshot>) -> Result<Self, ConfigErrors> {
        // Every problem at once: the TLS files and what else serve would refuse.
        let tls = tls::server_config(&config);
        let runtime = config.check_runtime();
        let tls = match (tls, runtime) {
            (Ok(t), Ok(())) => t,
            (Err(mut a), Err(b)) => {
                a.0.extend(b.0);
                return Err(a);
            }
            (Err(e), Ok(())) | (Ok(_), Err(e)) => return Err(e),
        };
        let cases = Arc::new(config.cases().map_err(|e| ConfigErrors(vec![e]))?);
        let mut policy = config.policy();
        policy.revoked = Arc::new(tls::revoked(&config));
        let policy = Arc::new(policy);
        let quotas = Arc::new(Quotas::build(
            DefaultClock::default(),
            &config.file.quotas,
            &policy,
            previous.map(|p| p.quotas.as_ref()),
        ));
        let in_flight = match previous {
            Some(p) if same_caps(&p.config.file.quotas, &config.file.quotas) => p.in_flight.clone(),
            _ => Arc::new(InFlight::new(&config.file.quotas)),
        };
        let harvest = previous.map_or_else(Default::default, |p| p.harvest.clone());
        let refusals = crate::limits::RefusalMeter::rebuild(
            config.file.quotas.refusals,
            previous.map(|p| &p.refusals),
        );
        Ok(Self {
            config: Arc::new(config),
            tls,
            policy,
            quotas,
            in_flight,
            harvest,
            refusals,
            shared: previous.and_then(|p| p.shared.clone()),
            cases,
        })
    }
}

fn same_caps(a: &crate::limits::QuotasSection, b: &crate::limits::QuotasSection) -> bool {
    a.max_in_flight_per_agency == b.max_in_flight_per_agency
        && a.max_in_flight_total == b.max_in_flight_total
}

pub type Shared = Arc<ArcSwap<Snapshot>>;
