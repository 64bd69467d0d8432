//! `civgate serve`: assembles the gateway — listener (TLS, identity), gate (policy, metrics),
//! services, health, reflection, admin — and owns reload and graceful shutdown.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Result;
use arc_swap::ArcSwap;
use tokio::{sync::watch, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{error, info, warn};

use crate::{
    api,
    audit::{AuditLog, note::Signer},
    config::{Config, ConfigErrors},
    health::{Directory, Health},
    listener,
    pb::{
        self,
        v1::{
            audit_server::AuditServer, citizens_server::CitizensServer,
            exchange_server::ExchangeServer,
        },
    },
    state::{Shared, Snapshot},
    telemetry,
    upstream::Upstream,
};

/// Command-line overrides of `[server]`, kept across reloads.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    /// Overrides `[store] url`.
    pub store_url: Option<String>,
}

impl Overrides {
    pub fn apply(&self, config: &mut Config) {
        let s = &mut config.file.server;
        if let Some(a) = self.listen {
            s.listen = a;
        }
        if let Some(a) = self.admin_listen {
            s.admin_listen = a;
        }
        if let Some(d) = &self.data_dir {
            // Relative to the working directory, like any command-line path.
            s.data_dir = std::env::current_dir().map_or_else(|_| d.clone(), |cwd| cwd.join(d));
        }
        if let Some(u) = &self.store_url {
            config.file.store.url = u.clone();
        }
    }
}

/// Where the config comes from, so a reload reads it again.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    File(PathBuf),
    /// Fixed text (the demo); reloading re-validates the files it names.
    Text {
        text: Arc<str>,
        base_dir: PathBuf,
    },
}

impl ConfigSource {
    pub fn read(&self, overrides: &Overrides) -> Result<Config, ConfigErrors> {
        let mut config = match self {
            ConfigSource::File(p) => Config::load(p)?,
            ConfigSource::Text { text, base_dir } => Config::parse(
                text,
                PathBuf::from("<embedded civgate.toml>"),
                base_dir.clone(),
            )?,
        };
        overrides.apply(&mut config);
        Ok(config)
    }
}

/// Opens the audit log under `data_dir` (unless `[audit] enabled = false`).
async fn open_audit(config: &Config, healthy: watch::Sender<bool>) -> Result<Option<AuditLog>> {
    let a = &config.file.audit;
    if !a.enabled {
        warn!("[audit] enabled = false: calls are NOT audited (benchmarks only)");
        return Ok(None);
    }
    let key_path = a
        .signing_key
        .as_ref()
        .map(|k| config.resolve(k.get_ref()))
        .ok_or_else(|| {
            anyhow::anyhow!("[audit] signing_key is required when the audit log is enabled")
        })?;
    let key = std::fs::read_to_string(&key_path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", key_path.display()))?;
    let signer = Signer::parse(&key).map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?;
    let log = AuditLog::open(crate::audit::log::Options {
        store: &config.store(),
        signer,
        origin: a.origin.clone(),
        checkpoint_interval: Duration::from_millis(a.checkpoint_interval_ms.max(10)),
        commit_timeout: Duration::from_millis(a.commit_timeout_ms.max(1)),
        healthy,
    })
    .await?;
    Ok(Some(log))
}

fn snapshot_upstream(state: &Shared) -> Option<crate::config::UpstreamSection> {
    state.load().config.file.upstream.clone()
}

/// The settings a reload does not apply (they shape listeners, pools or open stores), named
/// when a reload changes them.
pub(crate) fn restart_only_changes(
    o: &crate::config::ConfigFile,
    n: &crate::config::ConfigFile,
) -> Vec<&'static str> {
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let (os, ns) = (&o.server, &n.server);
    let mut out = Vec::new();
    for (name, changed) in [
        ("server.listen", os.listen != ns.listen),
        ("server.admin_listen", os.admin_listen != ns.admin_listen),
        ("server.data_dir", os.data_dir != ns.data_dir),
        (
            "server.worker_threads",
            os.worker_threads != ns.worker_threads,
        ),
        (
            "server.max_connections",
            os.max_connections != ns.max_connections,
        ),
        ("[limits]", differs(&o.limits, &n.limits)),
        (
            "[upstream]",
            differs(&upstream_values(o), &upstream_values(n)),
        ),
        ("[audit]", differs(&audit_values(o), &audit_values(n))),
        ("[store]", differs(&o.store, &n.store)),
        ("[exchange]", differs(&o.exchange, &n.exchange)),
        ("[shared_limits]", o.shared_limits != n.shared_limits),
        ("[telemetry]", o.telemetry != n.telemetry),
    ] {
        if changed {
            out.push(name);
        }
    }
    out
}

/// `[upstream]`'s values without their places in the file (a moved line is no change).
fn upstream_values(
    f: &crate::config::ConfigFile,
) -> Option<(String, PathBuf, PathBuf, PathBuf, u64, usize)> {
    f.upstream.as_ref().map(|u| {
        (
            u.url.get_ref().clone(),
            u.ca.get_ref().clone(),
            u.cert.get_ref().clone(),
            u.key.get_ref().clone(),
            u.timeout_ms,
            u.connections,
        )
    })
}

fn audit_values(f: &crate::config::ConfigFile) -> (bool, String, Option<PathBuf>, u64, u64) {
    let a = &f.audit;
    (
        a.enabled,
        a.origin.clone(),
        a.signing_key.as_ref().map(|k| k.get_ref().clone()),
        a.checkpoint_interval_ms,
        a.commit_timeout_ms,
    )
}

/// `[shared_limits]`: the connection to Redis (dialled at the first decision), or `None`.
fn shared_limits(config: &Config) -> Result<Option<Arc<crate::shared::SharedLimits>>> {
    let section = &config.file.shared_limits;
    if section.url.is_empty() {
        return Ok(None);
    }
    let a = &config.file.audit;
    let signing_key = a
        .signing_key
        .as_ref()
        .filter(|_| a.enabled)
        .and_then(|k| std::fs::read(config.resolve(k.get_ref())).ok());
    if signing_key.is_none() {
        warn!(
            "[shared_limits] without an audit signing key: harvesting windows are not shared (each replica hashes citizens under its own key)"
        );
    }
    let shared =
        crate::shared::SharedLimits::new(section, crate::shared::hash_key(signing_key.as_deref()))?;
    info!(
        prefix = section.prefix,
        "quotas, in-flight caps and harvesting windows are shared by replicas (Redis)"
    );
    Ok(Some(shared))
}

/// The largest health or reflection request read.
const SMALL_MESSAGE: usize = 16 * 1024;

/// A running gateway.
pub struct Running {
    pub api_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    state: Shared,
    source: ConfigSource,
    overrides: Overrides,
    shutdown: watch::Sender<bool>,
    health: Health,
    task: JoinHandle<Result<()>>,
    admin: JoinHandle<()>,
    /// Spans still queued are sent at shutdown.
    spans: Option<crate::otel::Exporter>,
    /// The data directory's lock (SQLite store), released when the gateway is dropped.
    _dir_lock: Option<crate::sqlite::DirLock>,
}

/// Validates the config and everything it names, binds both ports and starts serving.
pub async fn start(source: ConfigSource, overrides: Overrides) -> Result<Running> {
    // The metrics recorder first: building the snapshot already sets gauges (CRLs' next
    // update, shared limits).
    let _ = telemetry::prometheus();
    let config = source.read(&overrides)?;
    let mut snapshot = Snapshot::build(config, None)?;
    snapshot.shared = shared_limits(&snapshot.config)?;
    let server_cfg = snapshot.config.file.server.clone();
    let limits = snapshot.config.file.limits.clone();
    let state: Shared = Arc::new(ArcSwap::from_pointee(snapshot));
    // One gateway per SQLite store: a second one on the same directory is refused here, before
    // it opens or writes anything.
    let dir_lock = match state.load().config.store() {
        crate::store::Store::Sqlite(dir) => Some(crate::sqlite::lock_dir(&dir)?),
        crate::store::Store::Postgres { .. } => None,
    };

    let api_listener = telemetry::bind(server_cfg.listen, "API").await?;
    let admin_listener = telemetry::bind(server_cfg.admin_listen, "admin").await?;
    let api_addr = api_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let shutdown_rx_for_tasks = shutdown_rx.clone();
    let scrape = telemetry::ScrapeSlot::default();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health::new(
        reporter,
        if snapshot_upstream(&state).is_some() {
            Directory::Unknown
        } else {
            Directory::NotConfigured
        },
    );
    let admin = telemetry::spawn_admin(
        admin_listener,
        health.watch(),
        health_service.clone(),
        scrape.clone(),
        shutdown_rx.clone(),
    );
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // v1, and v1alpha for the clients that speak only it (grpcio-reflection, older grpcurl).
    let (reflection, reflection_alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);

    let upstream = match &snapshot_upstream(&state) {
        Some(section) => Some(Arc::new(Upstream::new(&state.load().config, section)?)),
        None => {
            warn!("no [upstream] configured: Citizens look-ups will answer UNAVAILABLE");
            None
        }
    };
    let probe_target = upstream.clone();
    let (spans, exporter) = crate::otel::start(&state.load().config)?.unzip();
    let (audit_ok, mut audit_ok_rx) = watch::channel(true);
    let audit = open_audit(&state.load().config, audit_ok).await?;
    let retention = state.load().config.file.exchange.retention_secs;
    let journal = crate::exchange::journal::Journal::open(
        &state.load().config.store(),
        (retention > 0).then(|| Duration::from_secs(retention)),
        audit.as_ref().map(AuditLog::tail),
        &state.load().policy,
    )
    .await?;
    // Retention waits for the groups the configuration in force declares (read at each pass).
    {
        let state = state.clone();
        journal.retain_for(Arc::new(move || {
            crate::exchange::address::holders(&state.load().policy)
        }));
    }
    let _ = scrape.set(crate::exchange::lag::scrape_hook(
        journal.clone(),
        state.clone(),
    ));
    let max_msg = limits.max_message_bytes;
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_header_list_size(limits.max_header_list_size)
        .max_frame_size(limits.max_frame_size)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // The request path: the gate's layers, outermost first (see `gate`).
        .layer({
            use crate::gate::{self, StepLayer};
            tower::ServiceBuilder::new()
                .layer(StepLayer(gate::GrpcOnly))
                .layer(StepLayer(gate::Observe::new(state.clone(), spans.clone())))
                .layer(StepLayer(gate::Bodies::new(
                    state.clone(),
                    gate::BodyLimits::new(&limits),
                )))
                .layer(StepLayer(gate::Refusals::new(audit.clone())))
                .layer(StepLayer(gate::Authorize))
                .layer(StepLayer(gate::Admit))
                .option_layer(audit.clone().map(|log| StepLayer(gate::Audit::new(log))))
        })
        // Health and reflection requests are a few bytes; nothing larger is read.
        .add_service(health_service.max_decoding_message_size(SMALL_MESSAGE))
        .add_service(reflection.max_decoding_message_size(SMALL_MESSAGE))
        .add_service(reflection_alpha.max_decoding_message_size(SMALL_MESSAGE))
        .add_service(
            CitizensServer::new(api::citizens::CitizensService::new(state.clone(), upstream))
                .max_decoding_message_size(max_msg),
        )
        .add_service(
            ExchangeServer::new(api::exchange::ExchangeService::new(
                Some(journal),
                shutdown_rx.clone(),
                state.load().config.file.exchange.max_unacked,
                state.clone(),
            ))
            .max_decoding_message_size(max_msg),
        )
        .add_service(
            AuditServer::new(api::audit::AuditService::new(audit.clone()))
                .max_decoding_message_size(max_msg),
        );

    let (max_connections, lowered_by) = listener::connection_cap(server_cfg.max_connections);
    if let Some(limit) = lowered_by {
        warn!(
            configured = server_cfg.max_connections,
            enforced = max_connections,
            open_files_limit = limit,
            "server.max_connections lowered to the open-file limit less {} descriptors for the stores: raise the limit (ulimit -n, LimitNOFILE=) to allow more",
            listener::FD_RESERVE
        );
    }
    let accept_state = state.clone();
    let incoming = listener::spawn(
        api_listener,
        move || listener::AcceptSettings::of(&accept_state),
        max_connections,
        server_cfg.new_connections_per_source_per_second,
        shutdown_rx.clone(),
    );
    let grace = Duration::from_millis(server_cfg.shutdown_grace_ms);
    let mut signal_rx = shutdown_rx.clone();
    let mut grace_rx = shutdown_rx;
    let task = tokio::spawn(async move {
        let serve = router
            .serve_with_incoming_shutdown(ReceiverStream::new(incoming), async move {
                listener::wait_true(&mut signal_rx).await
            });
        tokio::select! {
            r = serve => r.map_err(anyhow::Error::from),
            () = async {
                listener::wait_true(&mut grace_rx).await;
                tokio::time::sleep(grace).await;
            } => {
                warn!(grace_ms = grace.as_millis() as u64, "shutdown grace expired; closing remaining calls");
                Ok(())
            }
        }
    });
    // Health follows the audit log: calls cannot complete while it cannot commit.
    {
        let health = health.clone();
        tokio::spawn(async move {
            while audit_ok_rx.changed().await.is_ok() {
                health.set_store(*audit_ok_rx.borrow_and_update());
            }
        });
    }
    // ... and look-ups the directory, probed now (so that "serving" is true from the first
    // health check) and every second.
    if let Some(upstream) = &probe_target {
        let up = upstream.probe(crate::health::PROBE_TIMEOUT).await;
        health.set_directory(Directory::probed(up));
        if !up {
            warn!(
                "the population directory does not answer: look-ups are NOT_SERVING until it does"
            );
        }
    }
    if let Some(upstream) = probe_target {
        let health = health.clone();
        let mut stop = shutdown_rx_for_tasks.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::health::PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let up = upstream.probe(crate::health::PROBE_TIMEOUT).await;
                        health.set_directory(Directory::probed(up));
                    }
                    () = listener::wait_true(&mut stop) => break,
                }
            }
        });
    }
    health.spawn_reporting();
    // Forget harvesting windows that have expired (bounded memory).
    {
        let state = state.clone();
        let mut stop = shutdown_rx_for_tasks.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let snap = state.load();
                        snap.harvest.retain_recent(&snap.config.file.harvest, std::time::Instant::now());
                        snap.refusals.retain_recent();
                        metrics::gauge!(crate::telemetry::HARVEST_TRACKED).set(snap.harvest.agencies() as f64);
                    }
                    () = listener::wait_true(&mut stop) => break,
                }
            }
        });
    }
    let runtime = match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => "single-threaded",
        _ => "work-stealing",
    };
    info!(api = %api_addr, admin = %admin_addr, runtime, max_connections, "civgate serving");
    Ok(Running {
        api_addr,
        admin_addr,
        state,
        source,
        overrides,
        shutdown,
        health,
        task,
        admin,
        spans: exporter,
        _dir_lock: dir_lock,
    })
}

impl Running {
    /// Re-reads the config and swaps in new TLS material and policy. On any error the old
    /// config keeps serving. Established connections are untouched either way.
    pub fn reload(&self) -> Result<(), ConfigErrors> {
        let previous = self.state.load_full();
        let result = self
            .source
            .read(&self.overrides)
            .and_then(|c| Snapshot::build(c, Some(&previous)));
        match result {
            Ok(new) => {
                let old = self.state.load();
                let pending = restart_only_changes(&old.config.file, &new.config.file);
                if !pending.is_empty() {
                    warn!(
                        sections = pending.join(", "),
                        "these settings changed but take effect only after a restart; the running values stay in force"
                    );
                }
                self.state.store(Arc::new(new));
                telemetry::config_reloaded(true);
                info!(
                    agencies = self.state.load().policy.agencies.len(),
                    "configuration reloaded"
                );
                Ok(())
            }
            Err(errors) => {
                telemetry::config_reloaded(false);
                let one_line = errors.to_string().replace('\n', "; ");
                error!(
                    "configuration reload refused, previous configuration still serving: {one_line}"
                );
                Err(errors)
            }
        }
    }

    /// Whether limits are shared with other replicas right now (`None`: not configured).
    pub fn shared_limits_up(&self) -> Option<bool> {
        self.state.load().shared.as_ref().map(|s| s.is_up())
    }

    /// Stops accepting, reports NOT_SERVING, drains in-flight calls (up to the grace period).
    pub async fn shutdown(self) -> Result<()> {
        info!("shutting down: draining in-flight calls");
        self.health.drain().await;
        let _ = self.shutdown.send(true);
        let result = self.task.await?;
        let _ = self.admin.await;
        if let Some(exporter) = self.spans {
            exporter.shutdown().await;
        }
        info!("stopped");
        result
    }

    /// Runs until SIGTERM or SIGINT, reloading on SIGHUP. `signals` must have been installed
    /// before [`start`] logged "civgate serving": a supervisor that signals as soon as it reads
    /// that line must never meet the default action (SIGHUP's is to terminate).
    pub async fn run_until_signalled(self, mut signals: Signals) -> Result<()> {
        loop {
            tokio::select! {
                _ = signals.hup.recv() => {
                    info!("SIGHUP: reloading configuration");
                    let _ = self.reload();
                }
                _ = signals.term.recv() => break,
                _ = signals.int.recv() => break,
            }
        }
        self.shutdown().await
    }
}

/// The process's SIGHUP, SIGTERM and SIGINT, taken over from their default actions. Install
/// them first thing, before anything announces that the process is up.
pub struct Signals {
    pub hup: tokio::signal::unix::Signal,
    pub term: tokio::signal::unix::Signal,
    pub int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for SIGTERM or SIGINT (SIGHUP is taken and ignored).
    pub async fn stopped(&mut self) {
        loop {
            tokio::select! {
                _ = self.hup.recv() => {}
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
            }
        }
    }
}

/// `civgate migrate`: applies the PostgreSQL schema of the store `config` names (or
/// `store_url`) and returns its version, without serving. A SQLite store has nothing to apply:
/// its schema is made when the gateway starts.
pub async fn migrate(config: &std::path::Path, store_url: Option<String>) -> Result<i64> {
    let mut cfg = Config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(u) = store_url {
        cfg.file.store.url = u;
    }
    match cfg.store() {
        crate::store::Store::Postgres { url, pool_max } => {
            let pool = crate::store::pg_pool(&url, pool_max, Duration::from_secs(10)).await?;
            crate::store::migrate(&pool).await
        }
        crate::store::Store::Sqlite(dir) => anyhow::bail!(
            "[store] url is empty: the SQLite stores in {} create their schema when the gateway starts",
            dir.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_names_each_section_it_cannot_apply() {
        let base = Config::parse(
            crate::config::DEFAULT_CONFIG,
            "civgate.toml".into(),
            ".".into(),
        )
        .unwrap();
        assert!(restart_only_changes(&base.file, &base.file).is_empty());
        let changed = crate::config::DEFAULT_CONFIG
            .replace(
                "url = \"https://localhost:7444\"",
                "url = \"https://directory:7444\"",
            )
            .replace(
                "checkpoint_interval_ms = 1000",
                "checkpoint_interval_ms = 500",
            )
            .replace("max_message_bytes = 4194304", "max_message_bytes = 1048576")
            .replace("[quotas]\nshadow = false", "[quotas]\nshadow = true");
        let new = Config::parse(&changed, "civgate.toml".into(), ".".into()).unwrap();
        assert_eq!(
            restart_only_changes(&base.file, &new.file),
            ["[limits]", "[upstream]", "[audit]"]
        );
        // A section moved in the file, same values: no change.
        let moved = format!("\n\n{}", crate::config::DEFAULT_CONFIG);
        let moved = Config::parse(&moved, "civgate.toml".into(), ".".into()).unwrap();
        assert!(restart_only_changes(&base.file, &moved.file).is_empty());
    }
}
