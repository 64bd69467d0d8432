//! Logs, metrics and the admin listener (`/metrics`, `/livez`, `/readyz`, gRPC health). Metric names live here and
//! nowhere else.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{Router, http::StatusCode, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::{net::TcpListener, sync::watch};

pub(crate) const RPC_REQUESTS: &str = "civgate_rpc_requests_total";
pub(crate) const RPC_DURATION: &str = "civgate_rpc_duration_seconds";
pub(crate) const RPC_DENIED: &str = "civgate_rpc_denied_total";
pub(crate) const TLS_HANDSHAKE_FAILURES: &str = "civgate_tls_handshake_failures_total";
pub(crate) const CONFIG_RELOADS: &str = "civgate_config_reloads_total";
pub(crate) const RATE_LIMITED: &str = "civgate_rate_limited_total";
pub(crate) const LOAD_SHED: &str = "civgate_load_shed_total";
pub(crate) const HARVEST: &str = "civgate_harvest_guard_total";
pub use civgate_audit::{AUDIT_LOG_SIZE, STORE_STALLED, code_name};
pub use civgate_store::{STORE_COMMIT, STORE_COMMIT_ROWS, store_commit};
pub(crate) const EXCHANGE_BACKLOG: &str = "civgate_exchange_backlog_events";
pub(crate) const EXCHANGE_BACKLOG_AGE: &str = "civgate_exchange_backlog_oldest_seconds";
pub(crate) const EXCHANGE_DEAD_LETTERS: &str = "civgate_exchange_dead_letters";
pub(crate) const HTTP_REFUSED: &str = "civgate_http_refused_total";
pub(crate) const REFUSALS_UNRECORDED: &str = "civgate_refusals_unrecorded_total";
/// Admitted calls whose client went away before the answer (recorded as CANCELLED).
pub(crate) const RPC_ABANDONED: &str = "civgate_rpc_abandoned_total";
pub(crate) const REQUEST_BODIES_REFUSED: &str = "civgate_request_bodies_refused_total";
pub(crate) const CONNECTIONS_REFUSED: &str = "civgate_connections_refused_total";
pub(crate) const CONNECTIONS_OPEN: &str = "civgate_connections_open";
pub(crate) const CRL_NEXT_UPDATE: &str = "civgate_crl_next_update_timestamp_seconds";
pub(crate) const SHARED_LIMITS_UP: &str = "civgate_shared_limits_up";
pub(crate) const SHARED_LIMITS_FALLBACKS: &str = "civgate_shared_limits_fallbacks_total";

/// Runs before `/metrics` renders (at most 2 s): gauges measured on demand.
pub(crate) type ScrapeHook =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

/// Where the server puts its [`ScrapeHook`] once the stores are open.
pub(crate) type ScrapeSlot = Arc<OnceLock<ScrapeHook>>;

/// A consumer group's backlog: events addressed to it after its acknowledgement, and the age
/// of the oldest (0 when there is none).
pub(crate) fn exchange_backlog(
    topic: &str,
    agency: &str,
    group: &str,
    events: u64,
    oldest_secs: f64,
) {
    let labels = [
        ("topic", topic.to_owned()),
        ("agency", agency.to_owned()),
        ("group", group.to_owned()),
    ];
    metrics::gauge!(EXCHANGE_BACKLOG, &labels).set(events as f64);
    metrics::gauge!(EXCHANGE_BACKLOG_AGE, &labels).set(oldest_secs);
}

/// Dead letters (rejected events) of a topic.
pub fn dead_letters(topic: &str, n: u64) {
    metrics::gauge!(EXCHANGE_DEAD_LETTERS, "topic" => topic.to_owned()).set(n as f64);
}

/// Installs the tracing subscriber: human-readable or JSON lines, to stderr.
pub fn init_logging(json: bool) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: files, pipes and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// The process-wide Prometheus recorder, once [`prometheus`] installed it.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder (installed on first use).
pub fn prometheus() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_seconds".into()),
                &[
                    0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0,
                ],
            )
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        handle
    })
}

pub(crate) fn handshake_failed(reason: &'static str) {
    metrics::counter!(TLS_HANDSHAKE_FAILURES, "reason" => reason).increment(1);
}

pub(crate) fn rpc_finished(method: &'static str, code: tonic::Code, elapsed: Duration) {
    type Handles = (metrics::Counter, metrics::Histogram);
    thread_local! {
        /// Each thread's handles per (method, code): a call then updates its two metrics
        /// without building their labelled keys and looking them up in the registry (~2,800
        /// instructions per call). Methods and codes are fixed sets, so this stays small.
        static RPC: std::cell::RefCell<std::collections::HashMap<(&'static str, &'static str), Handles>> =
            std::cell::RefCell::default();
    }
    let code = code_name(code);
    let handles = || -> Handles {
        (
            metrics::counter!(RPC_REQUESTS, "method" => method, "code" => code),
            metrics::histogram!(RPC_DURATION, "method" => method, "code" => code),
        )
    };
    let record = |(n, d): &Handles| {
        n.increment(1);
        d.record(elapsed.as_secs_f64());
    };
    if HANDLE.get().is_none() {
        // Our recorder is not installed yet: handles taken now would record nowhere for good.
        record(&handles());
        return;
    }
    RPC.with(|c| record(c.borrow_mut().entry((method, code)).or_insert_with(handles)));
}

/// A request that is not gRPC (not POST, or not `application/grpc*`), by HTTP status.
pub(crate) fn http_refused(status: u16) {
    let status = match status {
        405 => "405",
        415 => "415",
        _ => "other",
    };
    metrics::counter!(HTTP_REFUSED, "status" => status).increment(1);
}

/// An admitted call abandoned by its client before its answer.
pub(crate) fn rpc_abandoned() {
    metrics::counter!(RPC_ABANDONED).increment(1);
}

/// A refusal past its certificate's meter: answered, not recorded or logged on its own.
pub(crate) fn refusal_unrecorded(method: &'static str) {
    metrics::counter!(REFUSALS_UNRECORDED, "method" => method).increment(1);
}

/// A request body cut off: `timeout` (not complete in time) or `budget` (the gateway holds
/// too many unfinished bodies).
pub(crate) fn body_refused(reason: &'static str) {
    metrics::counter!(REQUEST_BODIES_REFUSED, "reason" => reason).increment(1);
}

/// A connection closed before serving: `per_source` (too many handshakes from its address),
/// `pending` (too many handshakes in all), `agency` (its agency is at its connection cap).
pub(crate) fn connection_refused(reason: &'static str) {
    metrics::counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

pub(crate) fn connections_open(n: usize) {
    metrics::gauge!(CONNECTIONS_OPEN).set(n as f64);
}

pub(crate) fn rpc_denied(method: &'static str, reason: &'static str) {
    metrics::counter!(RPC_DENIED, "method" => method, "reason" => reason).increment(1);
}

/// A call over quota (`shadow`: counted, not refused).
pub(crate) fn rate_limited(agency: &str, bucket: &'static str, shadow: bool) {
    let mode = if shadow { "shadow" } else { "enforced" };
    metrics::counter!(RATE_LIMITED, "agency" => agency.to_owned(), "bucket" => bucket, "mode" => mode).increment(1);
}

pub(crate) fn load_shed(scope: &'static str) {
    metrics::counter!(LOAD_SHED, "scope" => scope).increment(1);
}

/// Harvesting guard events: `warn`, `deny`, `would_deny`.
pub fn harvest(agency: &str, event: &'static str) {
    metrics::counter!(HARVEST, "agency" => agency.to_owned(), "event" => event).increment(1);
}

pub(crate) fn config_reloaded(ok: bool) {
    let outcome = if ok { "ok" } else { "refused" };
    metrics::counter!(CONFIG_RELOADS, "outcome" => outcome).increment(1);
}

/// Serves the admin port until `shutdown` turns true: `/metrics` (first running the hook in
/// `scrape`, once there is one); `/livez` (the process answers); `/readyz` and `/healthz` (200
/// while the gateway serves, 503 otherwise; `/readyz` lists each service); the gRPC health
/// service over plain HTTP/2 (what an orchestrator's gRPC probe speaks: no certificate, not
/// audited — the API port's health service stays behind mTLS and in the audit log).
pub(crate) fn spawn_admin<H>(
    listener: TcpListener,
    health: watch::Receiver<crate::health::Conditions>,
    grpc_health: H,
    scrape: ScrapeSlot,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()>
where
    H: tower::Service<
            axum::extract::Request,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    H::Future: Send + 'static,
{
    use crate::health::{serving, statuses};
    let handle = prometheus();
    let (ready, verbose) = (health.clone(), health);
    let app = Router::new()
        .route(
            "/metrics",
            get(move || async move {
                if let Some(hook) = scrape.get() {
                    let _ = tokio::time::timeout(Duration::from_secs(2), hook()).await;
                }
                handle.render()
            }),
        )
        .route("/livez", get(|| async { "alive\n" }))
        .route(
            "/healthz",
            get(move || async move {
                if serving(*ready.borrow(), "") {
                    (StatusCode::OK, "SERVING\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n")
                }
            }),
        )
        .route(
            "/readyz",
            get(move || async move {
                let c = *verbose.borrow();
                let word = |up: bool| if up { "SERVING" } else { "NOT_SERVING" };
                let mut body = String::new();
                for (service, up) in statuses(c) {
                    if service.is_empty() {
                        body.push_str(word(up));
                    } else {
                        body.push_str(&format!("{service} {}", word(up)));
                    }
                    body.push('\n');
                }
                let code = if serving(c, "") {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, body)
            }),
        )
        .route_service("/grpc.health.v1.Health/Check", grpc_health.clone())
        .route_service("/grpc.health.v1.Health/Watch", grpc_health);
    tokio::spawn(async move {
        let signal = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(signal)
            .await
        {
            tracing::error!(error = %e, "admin listener failed");
        }
    })
}

/// Binds an address, naming it in the error.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({what}): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls count through the cached handles: every call, on every thread, shows in /metrics.
    #[test]
    fn finished_calls_are_counted_through_cached_handles() {
        let method = "/civgate.test.Telemetry/Count";
        let line = |code: &str| format!("{RPC_REQUESTS}{{method=\"{method}\",code=\"{code}\"}}");
        let count = |code: &str| -> Option<u64> {
            let text = prometheus().render();
            let wanted = line(code);
            text.lines()
                .find_map(|l| l.strip_prefix(wanted.as_str()))
                .and_then(|v| v.trim().parse().ok())
        };
        let _ = prometheus();
        for _ in 0..3 {
            rpc_finished(method, tonic::Code::Ok, Duration::from_micros(5));
        }
        std::thread::spawn(move || rpc_finished(method, tonic::Code::Ok, Duration::ZERO))
            .join()
            .unwrap();
        rpc_finished(method, tonic::Code::NotFound, Duration::ZERO);
        assert_eq!(count("OK"), Some(4));
        assert_eq!(count("NOT_FOUND"), Some(1));
    }
}
