//! Limits shared by replicas: each agency's quotas (GCRA), its in-flight cap and its
//! harvesting window kept in Redis, so that N replicas enforce one agency's limits once, not
//! N times. Each decision is one Lua script, run atomically by Redis on Redis's clock (the
//! replicas' clocks never meet). Redis was chosen over PostgreSQL by measurement
//! (docs/PERFORMANCE.md, "What sharing costs").
//!
//! When Redis does not answer within `timeout_ms`, the replica falls back to its own limits
//! (the embedded ones, as on a single node), says so once in the log and in
//! `civgate_shared_limits_up`, and pings Redis every 250 ms (calls do not wait on it), going
//! back to the shared limits as soon as it answers.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::{Script, aio::ConnectionManager};
use serde::Deserialize;

use crate::{
    domain::AgencyId,
    limits::{Bucket, Decision, Harvest, HarvestSection, Rate},
};

/// `[shared_limits]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SharedLimitsSection {
    /// `redis://host:port[/db]`; empty: every replica enforces its own limits (one node).
    pub url: String,
    /// A file holding the URL (with its password), relative to the config file; one line.
    /// Instead of `url`.
    pub url_file: Option<std::path::PathBuf>,
    /// Keys are `<prefix>:…`: one prefix per deployment sharing a Redis.
    pub prefix: String,
    /// A shared decision slower than this is taken by the replica alone, from its own limits.
    pub timeout_ms: u64,
    /// How long a call counts against its agency's in-flight cap at most, should the replica
    /// that admitted it die before it ends.
    pub in_flight_lease_ms: u64,
}

impl Default for SharedLimitsSection {
    fn default() -> Self {
        Self {
            url: String::new(),
            url_file: None,
            prefix: "civgate".into(),
            timeout_ms: 50,
            in_flight_lease_ms: 30_000,
        }
    }
}

/// While Redis is down, it is pinged this often (calls do not wait on it meanwhile).
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// GCRA over Redis time. KEYS[1] the bucket; ARGV emission interval (µs), burst, cost,
/// shadow (1/0). Returns {1, 0} allowed, {0, wait µs} refused, {3, wait µs} would refuse
/// (shadow: taken anyway). A cost above the burst is refused with the time a full bucket
/// takes to come back.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
if n > burst then return {0, T * burst} end
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + T * n
local allow_at = new_tat - T * burst
local code = 1
local wait = 0
if allow_at > now then
  if ARGV[4] ~= '1' then return {0, allow_at - now} end
  code = 3
  wait = allow_at - now
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.floor((new_tat - now) / 1000) + 1000)
return {code, wait}
";

/// In-flight admission, then the quota. KEYS[1] the agency's calls in flight (a sorted set
/// of call ids scored by lease expiry, ms), KEYS[2] the quota bucket or '' for none. ARGV cap,
/// lease (ms), call id, then GCRA's four. Returns {2, 0} at the cap, else GCRA's answer
/// ({1|3, …} admitted: the call is in the set).
const ADMIT: &str = r"
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return {2, 0} end
local code = 1
local wait = 0
if KEYS[2] ~= '' then
  local T = tonumber(ARGV[4])
  local burst = tonumber(ARGV[5])
  local n = tonumber(ARGV[6])
  local tat = tonumber(redis.call('GET', KEYS[2]) or now_us)
  if tat < now_us then tat = now_us end
  local new_tat = tat + T * n
  local allow_at = new_tat - T * burst
  if n > burst or allow_at > now_us then
    if ARGV[7] ~= '1' then return {0, math.max(allow_at - now_us, 1)} end
    code = 3
    wait = allow_at - now_us
  end
  redis.call('SET', KEYS[2], new_tat, 'PX', math.floor((new_tat - now_us) / 1000) + 1000)
end
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now_ms + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[1], lease)
return {code, wait}
";

/// The harvesting window. KEYS[1] the agency's citizens (keyed hashes scored by last read,
/// ms), KEYS[2] its "warned" flag. ARGV window (ms), warn, deny, cap, mode ('check' or
/// 'note'), shadow (1/0), then the citizens. Returns {kind, distinct}: 0 allow, 1 warn,
/// 2 deny (nothing recorded), 3 would deny.
const HARVEST: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local warn = tonumber(ARGV[2])
local deny = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local size = redis.call('ZCARD', KEYS[1])
local new = 0
for i = 7, #ARGV do
  if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then new = new + 1 end
end
local distinct = size + new
local kind = 0
if deny > 0 and distinct > deny and new > 0 then
  if ARGV[5] == 'check' and ARGV[6] ~= '1' then return {2, distinct} end
  kind = 3
end
for i = 7, #ARGV do
  if size < cap or redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then size = size + 1 end
    redis.call('ZADD', KEYS[1], now, ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], window)
if kind == 0 and distinct > warn then
  if redis.call('SET', KEYS[2], '1', 'NX', 'PX', window) then kind = 1 end
end
return {kind, distinct}
";

/// The connection to the shared store and whether it is answering.
pub struct SharedLimits {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    lease: Duration,
    /// Keys the citizens in the harvesting window (the same key on every replica: derived from
    /// the audit signing key they share), so Redis holds no personal IDs.
    hash_key: [u8; 32],
    /// False from a failed decision until a probe gets an answer again.
    up: AtomicBool,
    gcra: Script,
    admit: Script,
    harvest: Script,
}

/// A shared decision could not be had: use the replica's own limits.
#[derive(Debug)]
pub struct Unavailable;

/// A call's place under its agency's shared in-flight cap, given back when dropped.
pub struct Lease {
    shared: Arc<SharedLimits>,
    key: String,
    call: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (shared, key, call) = (
            self.shared.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.call),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut conn = shared.conn.clone();
                let done = tokio::time::timeout(
                    shared.timeout * 4,
                    redis::cmd("ZREM")
                        .arg(&key)
                        .arg(&call)
                        .query_async::<i64>(&mut conn),
                )
                .await;
                // Not given back: the lease expires by itself.
                if !matches!(done, Ok(Ok(_))) {
                    tracing::debug!(key, "in-flight lease not released; it expires by itself");
                }
            });
        }
    }
}

/// What the shared admission decided.
pub enum Admission {
    /// Admitted (the lease holds its place), with the quota's decision (`Allow` or
    /// `WouldRefuse` in shadow mode).
    Admitted(Lease, Decision),
    /// The agency is at its in-flight cap across replicas.
    AtCap,
    /// Over quota across replicas.
    Refused(Decision),
}

impl SharedLimits {
    /// Connects lazily (the first decision dials): a Redis that is down at start means the
    /// replica starts on its own limits.
    pub fn new(section: &SharedLimitsSection, hash_key: [u8; 32]) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        let client = redis::Client::open(section.url.as_str())
            .with_context(|| format!("shared_limits.url {:?}", section.url))?;
        let timeout = Duration::from_millis(section.timeout_ms.max(1));
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout * 4))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .context("shared_limits: connection manager")?;
        metrics::gauge!(crate::telemetry::SHARED_LIMITS_UP).set(1.0);
        metrics::counter!(crate::telemetry::SHARED_LIMITS_FALLBACKS).increment(0);
        Ok(Arc::new(Self {
            conn,
            prefix: section.prefix.clone(),
            timeout,
            lease: Duration::from_millis(section.in_flight_lease_ms.max(1)),
            hash_key,
            up: AtomicBool::new(true),
            gcra: Script::new(GCRA),
            admit: Script::new(ADMIT),
            harvest: Script::new(HARVEST),
        }))
    }

    /// Whether the last shared decision was had (for tests and the metric).
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn went_down(self: &Arc<Self>, why: &str) {
        metrics::counter!(crate::telemetry::SHARED_LIMITS_FALLBACKS).increment(1);
        if !self.up.swap(false, Ordering::AcqRel) {
            return;
        }
        tracing::error!(
            error = why,
            "shared limits unavailable: this replica now enforces its own quotas, in-flight caps and harvesting window until Redis answers again"
        );
        metrics::gauge!(crate::telemetry::SHARED_LIMITS_UP).set(0.0);
        // Calls go to the replica's own limits at once; a probe finds out when Redis is back.
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let mut conn = me.conn.clone();
                let ping = redis::cmd("PING");
                let answer =
                    tokio::time::timeout(me.timeout * 4, ping.query_async::<String>(&mut conn));
                if matches!(answer.await, Ok(Ok(_))) {
                    me.came_back();
                    return;
                }
            }
        });
    }

    fn came_back(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            tracing::info!(
                "shared limits restored: quotas, in-flight caps and harvesting windows are shared by the replicas again"
            );
            metrics::gauge!(crate::telemetry::SHARED_LIMITS_UP).set(1.0);
        }
    }

    /// Runs `inv` unless Redis is resting; a failure or a timeout puts it to rest.
    async fn run<T: redis::FromRedisValue>(
        self: &Arc<Self>,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        if !self.is_up() {
            return Err(Unavailable);
        }
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, inv.invoke_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => {
                self.came_back();
                Ok(v)
            }
            Ok(Err(e)) => {
                self.went_down(&e.to_string());
                Err(Unavailable)
            }
            Err(_) => {
                self.went_down("no answer within shared_limits.timeout_ms");
                Err(Unavailable)
            }
        }
    }

    fn quota_key(&self, agency: &AgencyId, bucket: Bucket) -> String {
        format!("{}:quota:{}:{}", self.prefix, agency, bucket.as_str())
    }

    /// GCRA arguments for `rate`: emission interval (µs) and burst.
    fn gcra_args(rate: Rate) -> (u64, u64) {
        (
            1_000_000 / u64::from(rate.per_second.get()).max(1),
            u64::from(rate.burst.get()),
        )
    }

    fn decision(code: i64, wait_us: i64) -> Decision {
        let wait = Duration::from_micros(wait_us.max(0) as u64);
        let retry_after_secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        match code {
            1 => Decision::Allow,
            3 => Decision::WouldRefuse { retry_after_secs },
            _ => Decision::Refuse { retry_after_secs },
        }
    }

    /// Takes `n` units of `agency`'s `bucket` across replicas.
    pub async fn quota(
        self: &Arc<Self>,
        agency: &AgencyId,
        bucket: Bucket,
        rate: Rate,
        n: u32,
        shadow: bool,
    ) -> Result<Decision, Unavailable> {
        let (t, burst) = Self::gcra_args(rate);
        let mut inv = self.gcra.key(self.quota_key(agency, bucket));
        inv.arg(t).arg(burst).arg(n).arg(u8::from(shadow));
        let (code, wait): (i64, i64) = self.run(inv).await?;
        Ok(Self::decision(code, wait))
    }

    /// Admits a call of `agency` under its in-flight `cap` across replicas, then takes one
    /// unit of `quota` (bucket, rate, shadow) if the call draws from one.
    pub async fn admit(
        self: &Arc<Self>,
        agency: &AgencyId,
        cap: u32,
        quota: Option<(Bucket, Rate, bool)>,
    ) -> Result<Admission, Unavailable> {
        let key = format!("{}:in-flight:{}", self.prefix, agency);
        let call = format!("{:032x}", rand::random::<u128>());
        let mut inv = self.admit.key(&key);
        match quota {
            Some((bucket, rate, shadow)) => {
                let (t, burst) = Self::gcra_args(rate);
                inv.key(self.quota_key(agency, bucket))
                    .arg(cap)
                    .arg(self.lease.as_millis() as u64)
                    .arg(&call)
                    .arg(t)
                    .arg(burst)
                    .arg(1)
                    .arg(u8::from(shadow));
            }
            None => {
                inv.key("")
                    .arg(cap)
                    .arg(self.lease.as_millis() as u64)
                    .arg(&call);
            }
        }
        let (code, wait): (i64, i64) = self.run(inv).await?;
        Ok(match code {
            2 => Admission::AtCap,
            0 => Admission::Refused(Self::decision(0, wait)),
            c => Admission::Admitted(
                Lease {
                    shared: self.clone(),
                    key,
                    call,
                },
                Self::decision(c, wait),
            ),
        })
    }

    /// The harvesting guard across replicas: `check` for reads (may deny), `note` for
    /// deliveries (never denied).
    pub async fn harvest(
        self: &Arc<Self>,
        s: &HarvestSection,
        agency: &AgencyId,
        ids: &[String],
        deliveries: bool,
    ) -> Result<Harvest, Unavailable> {
        let cap = s.warn_distinct.max(s.deny_distinct).max(1) * 2;
        let mut inv = self
            .harvest
            .key(format!("{}:harvest:{}", self.prefix, agency));
        inv.key(format!("{}:harvest-warned:{}", self.prefix, agency))
            .arg(s.window_secs.max(1) * 1000)
            .arg(s.warn_distinct)
            .arg(s.deny_distinct)
            .arg(cap)
            .arg(if deliveries { "note" } else { "check" })
            .arg(u8::from(s.shadow));
        for id in ids {
            inv.arg(self.citizen_key(id));
        }
        let (kind, distinct): (i64, i64) = self.run(inv).await?;
        let distinct = distinct.max(0) as u64;
        Ok(match kind {
            1 => Harvest::Warn { distinct },
            2 => Harvest::Deny { distinct },
            3 => Harvest::WouldDeny { distinct },
            _ => Harvest::Allow { distinct },
        })
    }

    /// A citizen as the window stores it: HMAC-SHA-256 under the shared key, 16 bytes hex.
    fn citizen_key(&self, id: &str) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.hash_key);
        let tag = ring::hmac::sign(&key, id.as_bytes());
        hex::encode(&tag.as_ref()[..16])
    }
}

/// The key the harvesting windows' citizens are hashed under: derived from the audit signing
/// key every replica of one log shares (so every replica hashes a citizen alike, and Redis
/// holds no ID), or random when there is none (windows then do not meet across replicas).
pub fn hash_key(signing_key: Option<&[u8]>) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    match signing_key {
        Some(k) => {
            let mut h = Sha256::new();
            h.update(b"civgate shared harvesting window\0");
            h.update(k);
            h.finalize().into()
        }
        None => rand::random(),
    }
}
