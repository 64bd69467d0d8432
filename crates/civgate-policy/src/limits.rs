//! Per-agency limits: request quotas (governor, one GCRA bucket per agency and bucket kind),
//! in-flight caps, a global load-shedding cap, and the harvesting guard (distinct citizens per
//! agency over a sliding window). Plain decisions over a clock; the gate only calls them.
//! Buckets survive reloads unless their own rate changed.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    middleware::NoOpMiddleware,
    state::{InMemoryState, NotKeyed},
};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::Policy;
use civgate_domain::{AgencyId, CertFingerprint, Role};

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Which quota a call draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// `Citizens.*`
    Reads,
    /// `Exchange.Publish`
    Publishes,
    /// Health checks and reflection: cheap, but each is audited.
    Probes,
}

impl Bucket {
    /// The bucket the gate takes one unit from for a call to `path`, if any (the method
    /// table's; none for a method whose handler takes its quota itself).
    pub fn of_method(path: &str) -> Option<Self> {
        crate::methods::find(path).and_then(|m| m.bucket)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Reads => "reads",
            Bucket::Publishes => "publishes",
            Bucket::Probes => "probes",
        }
    }
}

/// Calls per second and burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSet {
    pub reads: Option<Rate>,
    pub publishes: Option<Rate>,
    pub probes: Option<Rate>,
}

/// `[quotas]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotasSection {
    /// Count and log what would be refused, refuse nothing.
    pub shadow: bool,
    /// Citizens read per second: a batch costs one per distinct valid ID it asks for.
    pub reads: Rate,
    pub publishes: Rate,
    /// Health checks and reflection calls.
    pub probes: Rate,
    /// Per-role defaults.
    pub roles: HashMap<Role, RateSet>,
    /// Per-agency overrides.
    pub agencies: HashMap<AgencyId, RateSet>,
    /// Calls one agency may have in flight; beyond it RESOURCE_EXHAUSTED.
    pub max_in_flight_per_agency: u32,
    /// Calls in flight in all; beyond it UNAVAILABLE at once (load shedding).
    pub max_in_flight_total: u32,
    /// Refusals before any quota applies (a certificate naming no agency or an unknown one,
    /// a method not granted), per client certificate. Past it a refusal is answered
    /// RESOURCE_EXHAUSTED without an audit record or a log line of its own, and counted.
    pub refusals: Rate,
}

impl Default for QuotasSection {
    fn default() -> Self {
        let rate = |per_second, burst| Rate {
            per_second: NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
        };
        Self {
            shadow: false,
            reads: rate(500, 1_000),
            publishes: rate(500, 1_000),
            probes: rate(20, 40),
            roles: HashMap::new(),
            agencies: HashMap::new(),
            max_in_flight_per_agency: 256,
            max_in_flight_total: 4_096,
            refusals: rate(5, 20),
        }
    }
}

impl QuotasSection {
    /// The rate an agency gets: its override, else its role's default, else the default.
    pub fn rate(&self, agency: &AgencyId, role: Role, bucket: Bucket) -> Rate {
        let pick = |s: &RateSet| match bucket {
            Bucket::Reads => s.reads,
            Bucket::Publishes => s.publishes,
            Bucket::Probes => s.probes,
        };
        self.agencies
            .get(agency)
            .and_then(pick)
            .or_else(|| self.roles.get(&role).and_then(pick))
            .unwrap_or(match bucket {
                Bucket::Reads => self.reads,
                Bucket::Publishes => self.publishes,
                Bucket::Probes => self.probes,
            })
    }
}

/// The outcome of a quota check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Over quota: retry after this many whole seconds (≥ 1).
    Refuse {
        retry_after_secs: u64,
    },
    /// Shadow mode: would have been refused.
    WouldRefuse {
        retry_after_secs: u64,
    },
}

/// Quota buckets for every configured agency.
pub struct Quotas<C: Clock = DefaultClock> {
    clock: C,
    shadow: bool,
    buckets: HashMap<(AgencyId, Bucket), RatedLimiter<C>>,
}

/// A bucket and the rate it was built with (to keep it across reloads that do not change it).
type RatedLimiter<C> = (Rate, Arc<Limiter<C>>);

impl<C: Clock + Clone> Quotas<C> {
    /// Buckets for `policy`'s agencies; those whose rate is unchanged in `previous` are kept
    /// (with their state), so a reload does not hand everyone a fresh burst.
    pub fn build(
        clock: C,
        section: &QuotasSection,
        policy: &Policy,
        previous: Option<&Self>,
    ) -> Self {
        let mut buckets = HashMap::new();
        for (id, agency) in &policy.agencies {
            for bucket in [Bucket::Reads, Bucket::Publishes, Bucket::Probes] {
                let rate = section.rate(id, agency.role, bucket);
                let key = (id.clone(), bucket);
                let limiter = previous
                    .and_then(|p| p.buckets.get(&key))
                    .filter(|(r, _)| *r == rate)
                    .map(|(_, l)| l.clone())
                    .unwrap_or_else(|| {
                        let quota = Quota::per_second(rate.per_second).allow_burst(rate.burst);
                        Arc::new(RateLimiter::direct_with_clock(quota, clock.clone()))
                    });
                buckets.insert(key, (rate, limiter));
            }
        }
        Self {
            clock,
            shadow: section.shadow,
            buckets,
        }
    }

    /// Takes one call from the agency's bucket.
    pub fn check(&self, agency: &AgencyId, bucket: Bucket) -> Decision {
        self.check_n(agency, bucket, NonZeroU32::MIN)
    }

    /// Takes `n` units at once (a batch asking for `n` citizens): all or none. A batch
    /// larger than the bucket's burst can never pass and is refused as over quota.
    pub fn check_n(&self, agency: &AgencyId, bucket: Bucket, n: NonZeroU32) -> Decision {
        let Some((rate, limiter)) = self.buckets.get(&(agency.clone(), bucket)) else {
            // Unknown agencies never get here (policy denies them first).
            return Decision::Allow;
        };
        let wait = match limiter.check_n(n) {
            Ok(Ok(())) => return Decision::Allow,
            Ok(Err(not_until)) => not_until.wait_time_from(self.clock.now()),
            // More than the burst: say when a full bucket is back, the best the caller can do.
            Err(_) => Duration::from_secs_f64(
                f64::from(rate.burst.get()) / f64::from(rate.per_second.get()),
            ),
        };
        let retry_after_secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        if self.shadow {
            Decision::WouldRefuse { retry_after_secs }
        } else {
            Decision::Refuse { retry_after_secs }
        }
    }
}

/// Meters refusals per client certificate (see [`QuotasSection::refusals`]).
pub struct RefusalMeter {
    rate: Rate,
    limiter: governor::DefaultKeyedRateLimiter<CertFingerprint>,
}

impl RefusalMeter {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            limiter: RateLimiter::keyed(Quota::per_second(rate.per_second).allow_burst(rate.burst)),
        }
    }

    /// The meter for `rate`: `previous` when its rate is the same (a reload keeps the state).
    pub fn rebuild(rate: Rate, previous: Option<&Arc<Self>>) -> Arc<Self> {
        match previous {
            Some(p) if p.rate == rate => p.clone(),
            _ => Arc::new(Self::new(rate)),
        }
    }

    /// May this refusal be recorded and logged on its own?
    pub fn record(&self, peer: &CertFingerprint) -> bool {
        self.limiter.check_key(peer).is_ok()
    }

    /// Forgets certificates whose bucket is full again (bounded memory).
    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

/// In-flight caps: per agency and in all. Once the gateway is more than half full, each
/// agency with calls in flight may hold at most an equal share of the total (its fair share
/// of the serving capacity), whatever its own cap.
pub struct InFlight {
    total: Arc<Semaphore>,
    total_cap: usize,
    per_agency: Mutex<HashMap<AgencyId, Arc<Semaphore>>>,
    per_agency_cap: u32,
}

/// Why a call was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The gateway as a whole is at its cap: UNAVAILABLE.
    Overloaded,
    /// This agency is at its cap: RESOURCE_EXHAUSTED.
    AgencyAtCap,
}

/// Held while a call is in flight.
pub struct Admitted {
    _total: OwnedSemaphorePermit,
    _agency: Option<OwnedSemaphorePermit>,
}

impl InFlight {
    pub fn new(section: &QuotasSection) -> Self {
        let total_cap = section.max_in_flight_total.max(1) as usize;
        Self {
            total: Arc::new(Semaphore::new(total_cap)),
            total_cap,
            per_agency: Mutex::new(HashMap::new()),
            per_agency_cap: section.max_in_flight_per_agency.max(1),
        }
    }

    /// A place under the process's total cap only (the agency's is decided elsewhere).
    pub fn admit_total(&self) -> Result<Admitted, Busy> {
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Busy::Overloaded)?;
        Ok(Admitted {
            _total: total,
            _agency: None,
        })
    }

    /// Adds a place under the agency's cap to one under the total cap.
    pub fn admit(&self, agency: &AgencyId, total: Admitted) -> Result<Admitted, Busy> {
        let cap = self.per_agency_cap as usize;
        let sem = {
            let mut map = self.per_agency.lock().unwrap_or_else(|p| p.into_inner());
            let sem = map
                .entry(agency.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(cap)))
                .clone();
            // Over half full: an equal share each for the agencies with calls in flight.
            let busy = self.total_cap - self.total.available_permits();
            if busy * 2 > self.total_cap {
                let held = |s: &Semaphore| cap - s.available_permits();
                let active = map.values().filter(|s| held(s) > 0).count().max(1)
                    + usize::from(held(&sem) == 0);
                if held(&sem) >= self.total_cap.div_ceil(active) {
                    return Err(Busy::AgencyAtCap);
                }
            }
            sem
        };
        let agency = sem.try_acquire_owned().map_err(|_| Busy::AgencyAtCap)?;
        Ok(Admitted {
            _total: total._total,
            _agency: Some(agency),
        })
    }
}

/// `[harvest]`: the harvesting guard.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HarvestSection {
    /// Sliding window over which distinct citizens are counted.
    pub window_secs: u64,
    /// Past this many distinct citizens in the window: a metric and a log line.
    pub warn_distinct: u64,
    /// Past this many: PERMISSION_DENIED for reads of further citizens (0 = never deny).
    pub deny_distinct: u64,
    /// Count and log, never deny.
    pub shadow: bool,
}

impl Default for HarvestSection {
    fn default() -> Self {
        Self {
            window_secs: 3_600,
            warn_distinct: 10_000,
            deny_distinct: 0,
            shadow: false,
        }
    }
}

/// Outcome of a harvesting check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Harvest {
    Allow {
        distinct: u64,
    },
    /// Crossed the warning threshold with this call.
    Warn {
        distinct: u64,
    },
    Deny {
        distinct: u64,
    },
    /// Shadow mode: would have denied.
    WouldDeny {
        distinct: u64,
    },
}

/// Distinct citizens read per agency in a sliding window. Memory is bounded: an agency's
/// set never holds more than max(warn, deny) × 2 entries, expired ones are dropped.
#[derive(Default)]
pub struct HarvestGuard {
    agencies: Mutex<HashMap<AgencyId, Window>>,
}

#[derive(Default)]
struct Window {
    seen: HashMap<u64, Instant>,
    last_prune: Option<Instant>,
    warned: bool,
}

fn citizen_key(id: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // A process-wide random key: the set stores no IDs, only keyed hashes.
    static STATE: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let mut h = STATE.get_or_init(Default::default).build_hasher();
    h.write(id.as_bytes());
    h.finish()
}

impl HarvestGuard {
    /// Records that `agency` is about to read `ids` at `now`, unless that is refused.
    pub fn check(
        &self,
        s: &HarvestSection,
        agency: &AgencyId,
        ids: &[String],
        now: Instant,
    ) -> Harvest {
        let window = Duration::from_secs(s.window_secs.max(1));
        let cap = (s.warn_distinct.max(s.deny_distinct).max(1) * 2) as usize;
        let mut map = self.agencies.lock().unwrap_or_else(|p| p.into_inner());
        let w = map.entry(agency.clone()).or_default();
        if w.last_prune
            .is_none_or(|t| now.duration_since(t) >= window / 64)
        {
            w.seen.retain(|_, t| now.duration_since(*t) < window);
            w.last_prune = Some(now);
            if (w.seen.len() as u64) < s.warn_distinct {
                w.warned = false;
            }
        }
        let keys: Vec<u64> = ids.iter().map(|i| citizen_key(i)).collect();
        let new = keys.iter().filter(|k| !w.seen.contains_key(k)).count() as u64;
        let distinct = w.seen.len() as u64 + new;
        if s.deny_distinct > 0 && distinct > s.deny_distinct && new > 0 {
            if !s.shadow {
                return Harvest::Deny { distinct };
            }
            record(w, &keys, now, cap);
            return Harvest::WouldDeny { distinct };
        }
        record(w, &keys, now, cap);
        if distinct > s.warn_distinct && !w.warned {
            w.warned = true;
            return Harvest::Warn { distinct };
        }
        Harvest::Allow { distinct }
    }

    /// Records that `agency` received `ids` at `now` through a subscription: they count in its
    /// window like reads, but a delivery addressed to it is never refused (the look-ups of
    /// further citizens that follow are). `WouldDeny` says the window is past the threshold.
    pub fn note(
        &self,
        s: &HarvestSection,
        agency: &AgencyId,
        ids: &[String],
        now: Instant,
    ) -> Harvest {
        let never_deny = HarvestSection {
            shadow: true,
            ..s.clone()
        };
        self.check(&never_deny, agency, ids, now)
    }

    /// Agencies tracked (for the memory metric).
    pub fn agencies(&self) -> usize {
        self.agencies.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Drops agencies with nothing left in their window.
    pub fn retain_recent(&self, s: &HarvestSection, now: Instant) {
        let window = Duration::from_secs(s.window_secs.max(1));
        let mut map = self.agencies.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| {
            w.seen.retain(|_, t| now.duration_since(*t) < window);
            !w.seen.is_empty()
        });
        map.shrink_to_fit();
    }
}

fn record(w: &mut Window, keys: &[u64], now: Instant, cap: usize) {
    for k in keys {
        if w.seen.len() < cap || w.seen.contains_key(k) {
            w.seen.insert(*k, now);
        }
    }
}

#[cfg(test)]
mod tests;
