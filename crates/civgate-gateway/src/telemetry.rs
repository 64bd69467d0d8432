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
pub(crate) const REQUESTS_OPEN: &str = "civgate_requests_open";
pub(crate) const REQUESTS_OVERDUE: &str = "civgate_requests_overdue";
pub(crate) const REQUEST_ANSWER: &str = "civgate_request_answer_seconds";
pub(crate) const REQUESTS_LATE: &str = "civgate_requests_answered_late";
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
pub(crate) const HARVEST_TRACKED: &str = "civgate_harvest_tracked_agencies";
pub(crate) const BUILD_INFO: &str = "civgate_build_info";
pub(crate) const UPSTREAM_CALLS: &str = "civgate_upstream_calls_total";
pub(crate) const UPSTREAM_DURATION: &str = "civgate_upstream_duration_seconds";
pub(crate) const UPSTREAM_UP: &str = "civgate_upstream_up";
pub(crate) const UPSTREAM_ENDPOINT_UP: &str = "civgate_upstream_endpoint_up";
pub(crate) const CERT_NOT_AFTER: &str = "civgate_certificate_not_after_timestamp_seconds";
pub(crate) const EXCHANGE_HEAD: &str = "civgate_exchange_head_sequence";

/// Every metric the gateway exports, with its unit and what it counts: the `# HELP` lines of
/// `/metrics`. A metric missing here renders without help (a test checks there is none).
fn describe_all() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels say which build of civgate is running (version)"
    );
    describe_counter!(
        RPC_REQUESTS,
        "gRPC calls finished, by method and status code (refusals included)"
    );
    describe_histogram!(
        RPC_DURATION,
        Unit::Seconds,
        "Time from a call's headers to its answer, by method and status code"
    );
    describe_counter!(
        RPC_DENIED,
        "Calls refused before any work (identity, policy, purpose), by method and reason"
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes refused, by reason (revoked, expired, no client certificate, ...)"
    );
    describe_counter!(
        CONFIG_RELOADS,
        "Configuration reloads (SIGHUP), by outcome: ok or refused"
    );
    describe_counter!(
        RATE_LIMITED,
        "Calls over an agency's quota, by agency, bucket and mode (enforce or shadow)"
    );
    describe_counter!(
        LOAD_SHED,
        "Calls refused because the gateway was at its concurrency limit, by scope"
    );
    describe_counter!(
        HARVEST,
        "Harvesting guard events (warnings, refusals), by agency and event"
    );
    describe_gauge!(
        HARVEST_TRACKED,
        "Agencies with an open harvesting window (distinct citizens looked up)"
    );
    describe_gauge!(
        AUDIT_LOG_SIZE,
        "Entries in the audit log (the size of its Merkle tree)"
    );
    describe_gauge!(
        civgate_audit::AUDIT_BLOCKS_SUMMARISED,
        "Blocks of 4,096 audit entries, from the first, whose search summary is built (behind the log's size / 4,096 while the background task catches up)"
    );
    describe_gauge!(
        civgate_audit::AUDIT_GROUPS_SUMMARISED,
        "Groups of 262,144 audit entries, from the first, whose search summary is built (after an upgrade they are built from the leaves, paced)"
    );
    describe_counter!(
        civgate_audit::AUDIT_RECORDS_LOST,
        "Audit records dropped because the store could not commit them (the calls were refused)"
    );
    describe_gauge!(
        STORE_STALLED,
        "1 while the store does not commit within its timeout (calls then fail closed), else 0"
    );
    describe_histogram!(
        STORE_COMMIT,
        Unit::Seconds,
        "Time of one store commit (a batch), by writer: audit or journal"
    );
    describe_histogram!(
        STORE_COMMIT_ROWS,
        "Rows (records or events) per store commit, by writer"
    );
    describe_gauge!(
        EXCHANGE_BACKLOG,
        "Events addressed to a consumer group after its last acknowledgement"
    );
    describe_gauge!(
        EXCHANGE_BACKLOG_AGE,
        Unit::Seconds,
        "Age of the oldest event in a consumer group's backlog (0 when it has none)"
    );
    describe_gauge!(
        REQUESTS_OPEN,
        "Requests the flow table gives a deadline that are not answered yet, by the agency awaited and the request's kind"
    );
    describe_gauge!(
        REQUESTS_OVERDUE,
        "Unanswered requests past their due time, by the agency awaited and the request's kind"
    );
    describe_gauge!(
        REQUEST_ANSWER,
        Unit::Seconds,
        "Time from a request to its answer (quantile 0.5 and 0.99 of the last 7 days' answers), by answering agency and answer kind"
    );
    describe_gauge!(
        REQUESTS_LATE,
        "Answers of the last 7 days that came after their due time, by answering agency and answer kind"
    );
    describe_gauge!(
        EXCHANGE_DEAD_LETTERS,
        "Events rejected by a consumer (dead letters), by topic"
    );
    describe_gauge!(
        EXCHANGE_HEAD,
        "The last sequence committed on a topic (this replica's view)"
    );
    describe_counter!(
        HTTP_REFUSED,
        "Requests refused below gRPC (not HTTP/2 POST, wrong content type), by HTTP status"
    );
    describe_counter!(
        REFUSALS_UNRECORDED,
        "Refusals whose audit record could not be committed, by method"
    );
    describe_counter!(
        RPC_ABANDONED,
        "Admitted calls whose client went away before the answer (recorded as CANCELLED)"
    );
    describe_counter!(
        REQUEST_BODIES_REFUSED,
        "Request bodies refused before decoding (too large, too slow), by reason"
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed before TLS (over the limit, handshake too slow), by reason"
    );
    describe_gauge!(CONNECTIONS_OPEN, "Client connections open now");
    describe_gauge!(
        CRL_NEXT_UPDATE,
        Unit::Seconds,
        "Unix time of each loaded CRL's nextUpdate: refresh the CRL before it"
    );
    describe_gauge!(
        CERT_NOT_AFTER,
        Unit::Seconds,
        "Unix time the gateway's certificates expire (server: tls.cert; upstream: upstream.cert)"
    );
    describe_gauge!(
        SHARED_LIMITS_UP,
        "1 while the shared limits store (Redis) answers, else 0 (limits then fall back to this replica)"
    );
    describe_counter!(
        SHARED_LIMITS_FALLBACKS,
        "Decisions taken by this replica alone because the shared limits store did not answer"
    );
    describe_counter!(
        UPSTREAM_CALLS,
        "Calls to the population directory, by method and outcome (status code)"
    );
    describe_histogram!(
        UPSTREAM_DURATION,
        Unit::Seconds,
        "Time of calls to the population directory, by method"
    );
    describe_gauge!(
        UPSTREAM_ENDPOINT_UP,
        "1 if this directory endpoint (url, fallback_urls) answered its last probe, else 0"
    );
    describe_gauge!(
        UPSTREAM_UP,
        "1 if the population directory answered the last probe (every second), else 0"
    );
}

/// A call to the population directory: its outcome and time.
pub(crate) fn upstream_call(method: &'static str, code: tonic::Code, elapsed: Duration) {
    metrics::counter!(UPSTREAM_CALLS, "method" => method, "outcome" => code_name(code))
        .increment(1);
    metrics::histogram!(UPSTREAM_DURATION, "method" => method).record(elapsed.as_secs_f64());
}

/// When a certificate the gateway presents expires (`which`: server, upstream; `der`: the
/// leaf).
pub(crate) fn certificate_expires(which: &'static str, der: &[u8]) {
    if let Ok((_, c)) = x509_parser::parse_x509_certificate(der) {
        let t = c.validity().not_after.timestamp();
        metrics::gauge!(CERT_NOT_AFTER, "cert" => which).set(t as f64);
    }
}

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

/// The target of the access lines (one per call, `gate::observe`).
pub const ACCESS_TARGET: &str = "civgate::access";

/// Access lines waiting to be written, in order (see [`LogWriter`]).
static GATHERED: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Access lines are written when this much is waiting, or at the next tick.
const GATHER_BYTES: usize = 64 * 1024;
/// How long an access line waits at most before it is written.
const GATHER_TICK: Duration = Duration::from_millis(100);

/// Where log lines go: stderr. The access lines ([`ACCESS_TARGET`]) are gathered and written
/// together, every [`GATHER_TICK`] or per [`GATHER_BYTES`]; any other line is written at once,
/// after the access lines before it (the order of lines is kept). One `write` per access line
/// cost every call a system call (~3% of a look-up's CPU). A crash loses at most the last
/// tick's access lines; the audit log, not this log, is the record of calls.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

/// One line's writer ([`LogWriter`]).
pub enum LogLine {
    /// Written at once, after what is gathered.
    Now,
    /// Gathered.
    Gathered,
}

fn gathered() -> std::sync::MutexGuard<'static, Vec<u8>> {
    // A panic while holding it leaves whole lines or a partial one: still worth writing.
    GATHERED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes the gathered access lines (the ticker does every [`GATHER_TICK`]; `main` at exit).
pub fn flush_logs() {
    use std::io::Write;
    let mut g = gathered();
    if !g.is_empty() {
        let _ = std::io::stderr().write_all(&g);
        g.clear();
    }
}

/// Adds `line` to what is gathered, and writes it all to `out` when the line is not to be
/// gathered or enough is waiting.
fn put(
    gathered: &mut Vec<u8>,
    line: &[u8],
    now: bool,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    gathered.extend_from_slice(line);
    if now || gathered.len() >= GATHER_BYTES {
        let r = out.write_all(gathered);
        gathered.clear();
        r?;
    }
    Ok(())
}

impl std::io::Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        put(
            &mut gathered(),
            buf,
            matches!(self, LogLine::Now),
            &mut std::io::stderr(),
        )?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine::Now
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LogLine {
        if meta.target() == ACCESS_TARGET {
            LogLine::Gathered
        } else {
            LogLine::Now
        }
    }
}

/// Installs the tracing subscriber: human-readable or JSON lines, to stderr ([`LogWriter`]),
/// filtered by `RUST_LOG` or else by `default_filter` (e.g. `info`), and the ticker that
/// writes the gathered access lines.
pub fn init_logging(json: bool, default_filter: &str) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only on a terminal: files, pipes and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(LogWriter)
        .with_ansi(ansi);
    let _ = std::thread::Builder::new()
        .name("civgate-log".into())
        .spawn(|| {
            loop {
                std::thread::sleep(GATHER_TICK);
                flush_logs();
            }
        });
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
        describe_all();
        metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        metrics_process::Collector::default().describe();
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
                // CPU, memory, open files, threads, start time (process_*).
                metrics_process::Collector::default().collect();
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
    /// Access lines wait; another line writes them first, then itself; enough waiting is
    /// written without another line.
    #[test]
    fn access_lines_are_gathered_and_keep_their_order() {
        let (mut g, mut out) = (Vec::new(), Vec::new());
        super::put(&mut g, b"a1\n", false, &mut out).unwrap();
        super::put(&mut g, b"a2\n", false, &mut out).unwrap();
        assert!(out.is_empty());
        super::put(&mut g, b"warn\n", true, &mut out).unwrap();
        assert_eq!(out, b"a1\na2\nwarn\n");
        assert!(g.is_empty());
        let big = vec![b'x'; super::GATHER_BYTES];
        super::put(&mut g, &big, false, &mut out).unwrap();
        assert!(g.is_empty() && out.len() == 11 + super::GATHER_BYTES);
    }

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
