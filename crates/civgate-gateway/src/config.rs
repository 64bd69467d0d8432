//! The configuration file (`civgate.toml`): its model, parsing, and errors that name the key
//! and the line. Relative paths in the file are resolved against the file's directory.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;
use toml::Spanned;

use crate::{
    domain::{
        AgencyId, CitizenField, CountryCode, ProvinceCode, PurposeCode, RegistryOfficeCode, Role,
    },
    policy::{Agency, Policy},
};

/// The repository's `civgate.toml`, also the embedded default used by `civgate demo`.
pub const DEFAULT_CONFIG: &str = include_str!("../../../civgate.toml");

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub server: ServerSection,
    pub tls: TlsSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub agencies: BTreeMap<AgencyId, AgencySection>,
    #[serde(default)]
    pub purposes: BTreeMap<PurposeCode, PurposeSection>,
    /// The population directory the gateway forwards look-ups to.
    #[serde(default)]
    pub upstream: Option<UpstreamSection>,
    #[serde(default)]
    pub lookups: LookupsSection,
    /// The reference population directory's section (`civgate refdb serve`, the demo), kept
    /// as written: the gateway does not use it, `civgate-refdb` reads and checks it.
    #[serde(default)]
    pub refdb: Option<toml::Table>,
    #[serde(default)]
    pub audit: AuditSection,
    #[serde(default)]
    pub quotas: crate::limits::QuotasSection,
    #[serde(default)]
    pub harvest: crate::limits::HarvestSection,
    #[serde(default)]
    pub exchange: ExchangeSection,
    /// Where the journal and the audit log live: SQLite files under `server.data_dir` unless
    /// `url` names a PostgreSQL database (shared by several replicas).
    #[serde(default)]
    pub store: StoreSection,
    /// Quotas, in-flight caps and harvesting windows shared by replicas (Redis).
    #[serde(default)]
    pub shared_limits: crate::shared::SharedLimitsSection,
    /// OpenTelemetry spans exported over OTLP.
    #[serde(default)]
    pub telemetry: TelemetrySection,
    /// Requests with statutory deadlines: the flow table and the working calendar.
    #[serde(default)]
    pub cases: CasesSection,
}

/// `[cases]`: which requests must be answered with what, by when (`[[cases.flows]]`), in
/// which working calendar.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CasesSection {
    /// `date<TAB>holiday|working<TAB>what` lines (see the shipped `calendar_vn.tsv`); empty:
    /// the calendar built in. Re-read on reload.
    pub calendar: Option<PathBuf>,
    pub flows: Vec<FlowSection>,
}

/// One `[[cases.flows]]` row: a `request` event must be answered with an `answer` event
/// within `working_days`, `hours` or `seconds` (exactly one); `linked_only`: only requests
/// with a case reference.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowSection {
    pub name: String,
    pub request: String,
    pub answer: String,
    pub working_days: Option<u32>,
    pub hours: Option<u32>,
    pub seconds: Option<u32>,
    #[serde(default)]
    pub linked_only: bool,
}

impl FlowSection {
    pub fn spec(&self) -> crate::exchange::cases::FlowSpec {
        crate::exchange::cases::FlowSpec {
            name: self.name.clone(),
            request: self.request.clone(),
            answer: self.answer.clone(),
            working_days: self.working_days,
            hours: self.hours,
            seconds: self.seconds,
            linked_only: self.linked_only,
        }
    }
}

/// The flow table and the calendar in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cases {
    pub flows: crate::exchange::cases::Flows,
    pub calendar: crate::exchange::cases::Calendar,
}

/// What is wrong with a `[telemetry]` section, by key.
fn telemetry_problems(t: &TelemetrySection) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    let e = t.otlp_endpoint.as_str();
    if !e.is_empty() {
        let scheme_ok = e.starts_with("http://") || e.starts_with("https://");
        if !scheme_ok || e.parse::<http::Uri>().map_or(true, |u| u.host().is_none()) {
            out.push((
                "otlp_endpoint",
                "must be http://host:port or https://host:port (OTLP over gRPC), or empty",
            ));
        }
        if t.otlp_ca.is_some() && e.starts_with("http://") {
            out.push(("otlp_ca", "applies to an https:// endpoint only"));
        }
    }
    if !(0.0..=1.0).contains(&t.sample_ratio) {
        out.push(("sample_ratio", "must be between 0 and 1"));
    }
    if t.service_name.trim().is_empty() {
        out.push(("service_name", "must not be empty"));
    }
    if t.otlp_timeout_ms == 0 {
        out.push(("otlp_timeout_ms", "must be at least 1"));
    }
    out
}

/// Where the gateway's spans go (OTLP over gRPC): one server span per call, whose parent is
/// the caller's `traceparent`, and one client span per call to the population directory.
/// Read at start (a change needs a restart).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySection {
    /// `http://host:4317` or `https://host:4317` (an OpenTelemetry collector, Jaeger, Tempo);
    /// empty = no spans exported.
    pub otlp_endpoint: String,
    /// CA bundle for an `https://` endpoint whose certificate a private CA issued (else the
    /// system's roots are not used: name one).
    pub otlp_ca: Option<PathBuf>,
    /// The `service.name` of the exported spans (`OTEL_SERVICE_NAME` and
    /// `OTEL_RESOURCE_ATTRIBUTES` add to the resource).
    pub service_name: String,
    /// The share of traces started here (calls without a `traceparent`) that are exported; a
    /// caller's sampling decision is kept.
    pub sample_ratio: f64,
    /// One export may take this long; spans that cannot be sent are dropped, never the call.
    pub otlp_timeout_ms: u64,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            otlp_ca: None,
            service_name: "civgate".into(),
            sample_ratio: 1.0,
            otlp_timeout_ms: 5_000,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// `postgres://user@host:port/database[?options=-c%20search_path%3Dschema]`; empty = SQLite.
    pub url: String,
    /// A file holding the URL (with its password): a secret kept out of this file and of the
    /// command line. Relative to the config file; one line. Instead of `url`.
    pub url_file: Option<PathBuf>,
    /// Connections per pool (the journal and the audit log each have one).
    pub pool_max: u32,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            url: String::new(),
            url_file: None,
            pool_max: 8,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExchangeSection {
    /// Delete events every consumer group has acknowledged once older than this (0 = keep
    /// everything). Keep it longer than any producer retries: a deleted event's idempotency
    /// key is forgotten.
    pub retention_secs: u64,
    /// Events a subscription may have sent and not had acknowledged (back-pressure).
    pub max_unacked: u64,
}

impl Default for ExchangeSection {
    fn default() -> Self {
        Self {
            retention_secs: 0,
            max_unacked: crate::exchange::WINDOW,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// Off only for benchmarks that measure the audit's own cost.
    pub enabled: bool,
    /// The checkpoint origin line (a schema-less URL naming this log).
    pub origin: String,
    /// `PRIVATE+KEY+…` file (written by `civgate certs init` or `civgate audit keygen`).
    pub signing_key: Option<Spanned<PathBuf>>,
    /// A checkpoint is signed at least this often while the log grows.
    pub checkpoint_interval_ms: u64,
    /// A commit that cannot complete in this time fails the call (UNAVAILABLE).
    pub commit_timeout_ms: u64,
}

impl Default for AuditSection {
    fn default() -> Self {
        Self {
            enabled: true,
            origin: "civgate.local/audit".into(),
            signing_key: None,
            checkpoint_interval_ms: 1_000,
            commit_timeout_ms: 2_000,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// `https://host:port`; the host is the name checked in the directory's certificate.
    pub url: Spanned<String>,
    /// Other instances of the directory, tried in this order when `url` does not answer (the
    /// same CA and client certificate). Calls go to the first that answered its last probe.
    #[serde(default)]
    pub fallback_urls: Vec<Spanned<String>>,
    /// CA bundle the directory's server certificate must chain to.
    pub ca: Spanned<PathBuf>,
    /// The gateway's own client certificate and key for the directory.
    pub cert: Spanned<PathBuf>,
    pub key: Spanned<PathBuf>,
    /// Upper bound on one upstream call; the caller's deadline applies if shorter.
    #[serde(default = "default_upstream_timeout")]
    pub timeout_ms: u64,
    /// HTTP/2 connections to spread calls over; 0 = one per thread serving calls
    /// ([`UpstreamSection::links`]).
    #[serde(default)]
    pub connections: usize,
    /// The client: `h2` (the gateway's own, on `h2` with write coalescing) or `tonic`
    /// (tonic's `Channel`, for comparison: `bench/compare.sh` measures both).
    #[serde(default)]
    pub client: UpstreamClient,
}

/// Which HTTP/2 client calls the directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamClient {
    #[default]
    H2,
    Tonic,
}

impl UpstreamSection {
    /// The connections to open when `serving_threads` threads serve calls. Automatic (0):
    /// one per thread. One thread keeps one connection busy; a second connection only splits
    /// its frames into smaller writes (measured single-threaded on 2 cores: 58–68 against
    /// 66–72 µs of gateway CPU per look-up with two).
    pub fn links(&self, serving_threads: usize) -> usize {
        match self.connections {
            0 => serving_threads.max(1),
            n => n,
        }
    }
}

fn default_upstream_timeout() -> u64 {
    2_000
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LookupsSection {
    /// Cap on `SearchCitizens` results.
    pub max_search_results: u32,
    /// `VerifyCitizen` answers that did not match, per agency and citizen, after which that
    /// agency's verifications of that citizen are refused for the rest of the window (guessing
    /// a date of birth day by day); 0 = no limit.
    pub max_failed_verifications: u32,
    pub failed_verifications_window_secs: u64,
}

impl Default for LookupsSection {
    fn default() -> Self {
        Self {
            max_search_results: 20,
            max_failed_verifications: 5,
            failed_verifications_window_secs: 86_400,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// API port: gRPC over mutual TLS only.
    pub listen: SocketAddr,
    /// Admin port: `/metrics` and `/healthz`, plain HTTP; keep it on loopback.
    pub admin_listen: SocketAddr,
    pub data_dir: PathBuf,
    /// A client that has not finished its TLS handshake by then is dropped.
    pub handshake_timeout_ms: u64,
    /// A client that has sent nothing by then is dropped (it holds a pending place).
    pub first_bytes_timeout_ms: u64,
    /// At most this many handshakes in progress; further connections are closed at once.
    pub max_pending_handshakes: usize,
    /// At most this many of them from one source address (an IPv6 /64 counts as one), so one
    /// host cannot take the whole pool.
    pub max_pending_handshakes_per_source: usize,
    /// New connections per second one source address may open (twice that at once); past it
    /// they are closed before their handshake costs anything. 0 = no limit. Needs a restart.
    pub new_connections_per_source_per_second: u32,
    /// Open connections in all (handshaking or serving). At the cap the gateway stops
    /// accepting until one closes: new clients wait in the kernel's queue instead of failing.
    pub max_connections: usize,
    /// Open connections per agency (per certificate for one that names no known agency);
    /// a further one is closed right after its handshake.
    pub max_connections_per_agency: usize,
    /// How long SIGTERM waits for in-flight calls before closing anyway.
    pub shutdown_grace_ms: u64,
    /// Threads that serve calls: 0 = automatic ([`ServerSection::serving_threads`]); 1 = a
    /// single-threaded runtime, which spends less CPU per call (no wake-ups across threads) but
    /// serves at most one core's worth; N = N work-stealing threads. Needs a restart.
    pub worker_threads: usize,
}

impl ServerSection {
    /// The threads that serve calls on a machine with `cores` cores. `worker_threads = 0`
    /// picks: one (a single-threaded runtime) on up to two cores, where the gateway's own
    /// store threads and whatever shares the machine use the other core, and a thread on a
    /// second core mostly adds wake-ups and stealing across threads (`bench/compare.sh` on 2
    /// cores: less gateway CPU per look-up single-threaded for about the same look-ups/s,
    /// docs/PERFORMANCE.md); one per core above that.
    pub fn serving_threads(&self, cores: usize) -> usize {
        match self.worker_threads {
            0 if cores <= 2 => 1,
            0 => cores,
            n => n,
        }
    }
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9095)),
            data_dir: PathBuf::from("./data"),
            handshake_timeout_ms: 5_000,
            first_bytes_timeout_ms: 1_000,
            max_pending_handshakes: 1_024,
            max_pending_handshakes_per_source: 64,
            new_connections_per_source_per_second: 200,
            max_connections: 8_192,
            max_connections_per_agency: 1_024,
            shutdown_grace_ms: 10_000,
            worker_threads: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Server certificate chain (PEM).
    pub cert: Spanned<PathBuf>,
    /// Server private key (PEM).
    pub key: Spanned<PathBuf>,
    /// CA bundle that client certificates must chain to (PEM, one or more certificates).
    pub client_ca: Spanned<PathBuf>,
    /// Certificate revocation lists (PEM), enforced for client certificates.
    #[serde(default)]
    pub crls: Vec<Spanned<PathBuf>>,
    /// Lowest TLS version accepted: "1.2" (default) or "1.3".
    #[serde(default)]
    pub min_version: TlsVersion,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// HTTP/2 and message limits of the API port (not reloadable: they shape the listener).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
    pub max_frame_size: u32,
    /// Largest decoded request message.
    pub max_message_bytes: usize,
    /// A request whose body has not fully arrived this long after its headers is answered
    /// DEADLINE_EXCEEDED and its bytes released.
    pub request_body_timeout_ms: u64,
    /// Request bytes the gateway holds, in all, for messages not yet complete; past it a call
    /// is answered RESOURCE_EXHAUSTED (the bound on memory an unfinished body can take).
    pub max_buffered_request_bytes: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 256,
            max_header_list_size: 16 * 1024,
            max_frame_size: 16 * 1024,
            max_message_bytes: 4 * 1024 * 1024,
            request_body_timeout_ms: 10_000,
            max_buffered_request_bytes: 256 * 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgencySection {
    pub role: Role,
    /// Human-readable name, for logs and the audit trail's readers.
    #[serde(default)]
    pub name: String,
    /// Registry offices a civil registry may publish events for.
    #[serde(default)]
    pub registry_offices: Option<Spanned<Vec<RegistryOfficeCode>>>,
    /// A civil registry's jurisdiction: the population events about citizens registered at
    /// birth, or residing, in these provinces are delivered to it.
    #[serde(default)]
    pub provinces: Option<Spanned<Vec<ProvinceCode>>>,
    /// A civil registry that publishes what Việt Nam's representative missions abroad register
    /// (Law 60/2014 art. 3(3)): the countries (ISO 3166-1 alpha-2) whose missions it speaks
    /// for. Its events then carry `registration.country`.
    #[serde(default)]
    pub countries: Option<Spanned<Vec<CountryCode>>>,
    /// The consumer groups this agency uses. A group belongs to the agency that uses it; this
    /// list assigns the groups of a store written by an earlier release (which did not record
    /// owners) to their agency when the store is opened.
    #[serde(default)]
    pub consumer_groups: Option<Spanned<Vec<String>>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurposeSection {
    #[serde(default)]
    pub description: String,
    /// The `Citizen` fields this purpose may receive (`GetCitizen`, `BatchGetCitizens`,
    /// `SearchCitizens`), and check with `VerifyCitizen`.
    #[serde(default)]
    pub fields: Vec<CitizenField>,
    /// Further attributes `VerifyCitizen` may check for this purpose (match / no match, never
    /// the value): "is A married to B" for a birth registration, which needs no spouse ID.
    #[serde(default)]
    pub verifies: Vec<CitizenField>,
    /// The `Citizens` methods this purpose may be declared with (required).
    pub methods: Vec<crate::policy::purposes::CitizensMethod>,
    /// The roles that may declare it (required).
    pub roles: Vec<crate::domain::Role>,
    /// Whether a read for this purpose must name its case (`case_reference`, the portal's
    /// dossier code), so that every such read in the audit log ties to a registration.
    #[serde(default)]
    pub requires_case_reference: bool,
}

impl PurposeSection {
    /// The fields `VerifyCitizen` may check: those released and those only verified.
    pub fn verifiable(&self) -> std::collections::BTreeSet<CitizenField> {
        self.fields.iter().chain(&self.verifies).copied().collect()
    }

    /// How this purpose's binding is used.
    pub fn binding(&self) -> crate::policy::purposes::PurposeUse<'_> {
        crate::policy::purposes::PurposeUse {
            methods: &self.methods,
            roles: &self.roles,
        }
    }

    /// What is wrong with it: (key under the purpose, message).
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.methods.is_empty() {
            out.push((
                "methods",
                "name the Citizens methods this purpose may be declared with, e.g. [\"VerifyCitizen\"]".into(),
            ));
        }
        if self.roles.is_empty() {
            out.push((
                "roles",
                "name the roles that may declare this purpose, e.g. [\"civil_registry\"]".into(),
            ));
        }
        let releases = self.methods.iter().any(|m| m.releases_values());
        if releases && self.fields.is_empty() {
            out.push((
                "fields",
                "a purpose used with a look-up or search must release at least one field".into(),
            ));
        }
        if !releases && !self.methods.is_empty() && self.verifiable().is_empty() {
            out.push((
                "verifies",
                "a verification purpose must allow at least one attribute to be checked".into(),
            ));
        }
        let verifies = self
            .methods
            .contains(&crate::policy::purposes::CitizensMethod::VerifyCitizen);
        if !verifies && !self.verifies.is_empty() {
            out.push((
                "verifies",
                "only VerifyCitizen checks attributes: add it to methods or leave verifies out"
                    .into(),
            ));
        }
        out
    }
}

/// A parsed configuration and where it came from.
#[derive(Clone, Debug)]
pub struct Config {
    pub file: ConfigFile,
    /// The file's path (for messages), or `<embedded>`.
    pub origin: PathBuf,
    /// Directory that relative paths in the file are resolved against.
    pub base_dir: PathBuf,
    source: Arc<str>,
}

/// One problem in a config file, located by key and line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All problems found in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let source = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_owned(),
                line: None,
                key: String::new(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_owned);
        match with_env_overrides(&source, std::env::vars()) {
            Ok(None) => Self::parse(&source, path.to_owned(), base_dir),
            // Errors then name the file with the overrides applied (its lines are the file's
            // keys in order, the overridden ones included).
            Ok(Some(text)) => Self::parse(
                &text,
                PathBuf::from(format!("{} (with CIVGATE_… overrides)", path.display())),
                base_dir,
            ),
            Err(e) => Err(ConfigErrors(vec![ConfigError {
                file: path.to_owned(),
                line: None,
                key: String::new(),
                message: e,
            }])),
        }
    }

    /// Parses config text; `origin` names it in errors, `base_dir` anchors relative paths.
    pub fn parse(source: &str, origin: PathBuf, base_dir: PathBuf) -> Result<Self, ConfigErrors> {
        let file: ConfigFile = toml::from_str(source).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            ConfigErrors(vec![ConfigError {
                file: origin.clone(),
                line: offset.map(|o| line_of(source, o)),
                key: offset.map(|o| key_at(source, o)).unwrap_or_default(),
                message: e.message().trim().to_owned(),
            }])
        })?;
        let mut config = Self {
            file,
            origin,
            base_dir,
            source: Arc::from(source),
        };
        config.read_secret_files()?;
        config.check_semantics()?;
        Ok(config)
    }

    /// `[store] url_file` and `[shared_limits] url_file`: each URL read from its file (one line,
    /// surrounding whitespace dropped), at every load and reload.
    fn read_secret_files(&mut self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let store = (
            "store",
            self.file.store.url_file.clone(),
            !self.file.store.url.is_empty(),
        );
        let shared = (
            "shared_limits",
            self.file.shared_limits.url_file.clone(),
            !self.file.shared_limits.url.is_empty(),
        );
        for (section, file, has_url) in [store, shared] {
            let Some(file) = file else { continue };
            let key = format!("{section}.url_file");
            let at = |message: String| ConfigError {
                file: self.origin.clone(),
                line: None,
                key: key.clone(),
                message,
            };
            if has_url {
                errors.push(at(format!(
                    "give {section}.url or {section}.url_file, not both"
                )));
                continue;
            }
            let path = self.resolve(&file);
            match std::fs::read_to_string(&path) {
                Ok(text) if text.trim().lines().count() == 1 => {
                    let url = text.trim().to_owned();
                    match section {
                        "store" => self.file.store.url = url,
                        _ => self.file.shared_limits.url = url,
                    }
                }
                Ok(_) => errors.push(at(format!(
                    "{} must hold the URL on one line",
                    path.display()
                ))),
                Err(e) => errors.push(at(format!("cannot read {}: {e}", path.display()))),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Rules serde cannot express, each reported with its line.
    fn check_semantics(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        for (id, agency) in &self.file.agencies {
            if let Some(offices) = &agency.registry_offices
                && agency.role != Role::CivilRegistry
                && !offices.get_ref().is_empty()
            {
                errors.push(self.error_at(
                    offices.span().start,
                    format!("agencies.{id}.registry_offices"),
                    format!(
                        "only a civil_registry publishes for registry offices; {id} is {}",
                        agency.role
                    ),
                ));
            }
            if let Some(provinces) = &agency.provinces
                && agency.role != Role::CivilRegistry
                && !provinces.get_ref().is_empty()
            {
                errors.push(self.error_at(
                    provinces.span().start,
                    format!("agencies.{id}.provinces"),
                    format!(
                        "only a civil_registry has a jurisdiction of provinces; {id} is {}",
                        agency.role
                    ),
                ));
            }
            if let Some(countries) = &agency.countries
                && agency.role != Role::CivilRegistry
                && !countries.get_ref().is_empty()
            {
                errors.push(self.error_at(
                    countries.span().start,
                    format!("agencies.{id}.countries"),
                    format!(
                        "only a civil_registry publishes registrations made abroad; {id} is {}",
                        agency.role
                    ),
                ));
            }
            if let Some(groups) = &agency.consumer_groups {
                for g in groups.get_ref() {
                    if !crate::policy::is_group_name(g) {
                        errors.push(self.error_at(
                            groups.span().start,
                            format!("agencies.{id}.consumer_groups"),
                            format!(
                                "{g:?} is not a consumer group name: 1-64 characters of A-Z, a-z, 0-9, '-', '_', '.'"
                            ),
                        ));
                    }
                }
            }
        }
        for (code, purpose) in &self.file.purposes {
            for m in purpose.problems() {
                errors.push(ConfigError {
                    file: self.origin.clone(),
                    line: None,
                    key: format!("purposes.{}.{}", code.as_str(), m.0),
                    message: m.1,
                });
            }
        }
        let url = &self.file.store.url;
        if !url.is_empty() && !crate::store::is_postgres_url(url) {
            errors.push(ConfigError {
                file: self.origin.clone(),
                line: None,
                key: "store.url".into(),
                message: "must be a postgres:// (or postgresql://) URL, or empty for SQLite".into(),
            });
        }
        let shared = &self.file.shared_limits;
        if !shared.url.is_empty()
            && (!shared.url.starts_with("redis://")
                || redis::Client::open(shared.url.as_str()).is_err())
        {
            errors.push(ConfigError {
                file: self.origin.clone(),
                line: None,
                key: "shared_limits.url".into(),
                message: "must be a redis://host:port[/db] URL, or empty for limits of this replica alone".into(),
            });
        }
        if self.file.store.pool_max == 0 {
            errors.push(ConfigError {
                file: self.origin.clone(),
                line: None,
                key: "store.pool_max".into(),
                message: "must be at least 1".into(),
            });
        }
        if let Err(problems) = self.flows() {
            for (i, key, message) in problems {
                errors.push(ConfigError {
                    file: self.origin.clone(),
                    line: None,
                    key: format!("cases.flows[{i}].{key}"),
                    message,
                });
            }
        }
        let t = &self.file.telemetry;
        for (key, problem) in telemetry_problems(t) {
            errors.push(ConfigError {
                file: self.origin.clone(),
                line: None,
                key: format!("telemetry.{key}"),
                message: problem.into(),
            });
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// What `serve` would refuse at start beyond the TLS files (checked by `config check`,
    /// `serve` and every reload alike): the audit signing key, the upstream, the two ports,
    /// and private keys others can read.
    pub fn check_runtime(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let f = &self.file;
        let plain = |key: &str, message: String| ConfigError {
            file: self.origin.clone(),
            line: None,
            key: key.into(),
            message,
        };
        if let Err(e) = self.calendar() {
            errors.push(e);
        }
        if f.server.listen == f.server.admin_listen && f.server.listen.port() != 0 {
            errors.push(plain(
                "server.admin_listen",
                format!("is the API's address too ({})", f.server.listen),
            ));
        }
        // Private keys: owner-only, like ssh and PostgreSQL require.
        let mut keys: Vec<(&str, &Spanned<PathBuf>)> = vec![("tls.key", &f.tls.key)];
        if f.audit.enabled {
            match &f.audit.signing_key {
                None => errors.push(plain(
                    "audit.signing_key",
                    "is required when the audit log is enabled".into(),
                )),
                Some(k) => {
                    keys.push(("audit.signing_key", k));
                    let path = self.resolve(k.get_ref());
                    let parsed = std::fs::read_to_string(&path)
                        .map_err(|e| e.to_string())
                        .and_then(|t| {
                            crate::audit::note::Signer::parse(&t)
                                .map(|_| ())
                                .map_err(|e| format!("not a signing key: {e}"))
                        });
                    if let Err(e) = parsed {
                        errors.push(self.error_at(
                            k.span().start,
                            "audit.signing_key".into(),
                            format!("{}: {e}", path.display()),
                        ));
                    }
                }
            }
        }
        if let Some(u) = &f.upstream {
            keys.push(("upstream.key", &u.key));
            for (key, url) in std::iter::once(("upstream.url", &u.url)).chain(
                u.fallback_urls
                    .iter()
                    .map(|x| ("upstream.fallback_urls", x)),
            ) {
                let https = url.get_ref().parse::<http::Uri>().ok().filter(|o| {
                    o.scheme_str() == Some("https") && o.host().is_some_and(|h| !h.is_empty())
                });
                if https.is_none() {
                    errors.push(self.error_at(
                        url.span().start,
                        key.into(),
                        format!(
                            "{:?} must be https://host:port (the directory is reached over mutual TLS only)",
                            url.get_ref()
                        ),
                    ));
                }
            }
            if u.timeout_ms == 0 {
                errors.push(plain("upstream.timeout_ms", "must be at least 1".into()));
            }
            let read = |p: &Spanned<PathBuf>| std::fs::read(self.resolve(p.get_ref()));
            match (read(&u.ca), read(&u.cert), read(&u.key)) {
                (Ok(ca), Ok(cert), Ok(key)) => {
                    if let Err(e) = crate::tls::client_config(&ca, Some((&cert, &key))) {
                        errors.push(self.error_at(
                            u.cert.span().start,
                            "upstream.ca, upstream.cert, upstream.key".into(),
                            format!("{e:#}"),
                        ));
                    }
                }
                (ca, cert, key) => {
                    for (name, span, r) in [
                        ("upstream.ca", &u.ca, ca),
                        ("upstream.cert", &u.cert, cert),
                        ("upstream.key", &u.key, key),
                    ] {
                        if let Err(e) = r {
                            errors.push(self.error_at(
                                span.span().start,
                                name.into(),
                                format!("{}: {e}", self.resolve(span.get_ref()).display()),
                            ));
                        }
                    }
                }
            }
        }
        for (name, key) in keys {
            use std::os::unix::fs::PermissionsExt;
            let path = self.resolve(key.get_ref());
            if let Ok(m) = std::fs::metadata(&path)
                && m.permissions().mode() & 0o077 != 0
            {
                errors.push(self.error_at(
                    key.span().start,
                    name.into(),
                    format!(
                        "{} is readable by other users (mode {:o}); chmod 600 it",
                        path.display(),
                        m.permissions().mode() & 0o777
                    ),
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// An error located at a byte offset of the source.
    pub fn error_at(&self, offset: usize, key: String, message: String) -> ConfigError {
        ConfigError {
            file: self.origin.clone(),
            line: Some(line_of(&self.source, offset)),
            key,
            message,
        }
    }

    /// Where the journal and the audit log live.
    pub fn store(&self) -> crate::store::Store {
        let s = &self.file.store;
        if s.url.is_empty() {
            crate::store::Store::Sqlite(self.resolve(&self.file.server.data_dir))
        } else {
            crate::store::Store::Postgres {
                url: s.url.clone(),
                pool_max: s.pool_max,
            }
        }
    }

    /// A path from the file, resolved against the file's directory.
    /// The flow table, checked.
    pub fn flows(
        &self,
    ) -> Result<crate::exchange::cases::Flows, Vec<(usize, &'static str, String)>> {
        let specs: Vec<_> = self
            .file
            .cases
            .flows
            .iter()
            .map(FlowSection::spec)
            .collect();
        crate::exchange::cases::Flows::new(&specs)
    }

    /// The working calendar: `[cases] calendar`, read now, or the one built in.
    pub fn calendar(&self) -> Result<crate::exchange::cases::Calendar, ConfigError> {
        let Some(p) = &self.file.cases.calendar else {
            return Ok(crate::exchange::cases::Calendar::embedded());
        };
        let path = self.resolve(p);
        let plain = |message: String| ConfigError {
            file: self.origin.clone(),
            line: None,
            key: "cases.calendar".into(),
            message: format!("{}: {message}", path.display()),
        };
        let text = std::fs::read_to_string(&path).map_err(|e| plain(e.to_string()))?;
        crate::exchange::cases::Calendar::parse(&text).map_err(plain)
    }

    /// The flow table and the calendar.
    pub fn cases(&self) -> Result<Cases, ConfigError> {
        let calendar = self.calendar()?;
        let flows = self.flows().map_err(|p| ConfigError {
            file: self.origin.clone(),
            line: None,
            key: "cases.flows".into(),
            message: p
                .into_iter()
                .map(|(i, k, m)| format!("[{i}].{k}: {m}"))
                .collect::<Vec<_>>()
                .join("; "),
        })?;
        Ok(Cases { flows, calendar })
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The agencies and their roles, as the policy engine sees them.
    pub fn policy(&self) -> Policy {
        let agencies = self
            .file
            .agencies
            .iter()
            .map(|(id, a)| {
                let offices = a
                    .registry_offices
                    .as_ref()
                    .map(|o| o.get_ref().clone())
                    .unwrap_or_default();
                let provinces = a
                    .provinces
                    .as_ref()
                    .map(|o| o.get_ref().clone())
                    .unwrap_or_default();
                let countries = a
                    .countries
                    .as_ref()
                    .map(|o| o.get_ref().clone())
                    .unwrap_or_default();
                let groups = a
                    .consumer_groups
                    .as_ref()
                    .map(|o| o.get_ref().clone())
                    .unwrap_or_default();
                (
                    id.clone(),
                    Agency {
                        role: a.role,
                        registry_offices: Arc::from(offices),
                        provinces: Arc::from(provinces),
                        countries: Arc::from(countries),
                        consumer_groups: Arc::from(groups),
                    },
                )
            })
            .collect();
        Policy {
            agencies,
            ..Default::default()
        }
    }
}

/// 1-based line number of a byte offset.
fn line_of(source: &str, offset: usize) -> usize {
    let end = offset.min(source.len());
    source.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The dotted key at a byte offset: the enclosing `[table]` header plus the `key =` on that line.
fn key_at(source: &str, offset: usize) -> String {
    let end = offset.min(source.len());
    let line_start = source[..end].rfind('\n').map_or(0, |i| i + 1);
    let line = source[line_start..].lines().next().unwrap_or("").trim();
    if let Some(header) = table_header(line) {
        return header.to_owned();
    }
    let key = line.split('=').next().unwrap_or("").trim();
    let table = source[..line_start]
        .lines()
        .rev()
        .find_map(|l| table_header(l.trim()));
    match (table, key.is_empty()) {
        (Some(t), false) => format!("{t}.{key}"),
        (Some(t), true) => t.to_owned(),
        (None, _) => key.to_owned(),
    }
}

fn table_header(line: &str) -> Option<&str> {
    let inner = line.strip_prefix('[')?;
    let inner = inner.strip_prefix('[').unwrap_or(inner);
    let end = inner.find(']')?;
    Some(inner[..end].trim())
}

#[cfg(test)]
mod tests;

/// The config text with `CIVGATE_<SECTION>__<KEY>=value` variables applied (`None`: there are
/// none). Levels are separated by a double underscore and named in lower case
/// (`CIVGATE_AUDIT__COMMIT_TIMEOUT_MS=2000`, `CIVGATE_UPSTREAM__URL=https://dir:7444`). A value
/// takes the type of the key it replaces (a string stays a string: `"031"` is not a number);
/// for a key the file does not have, a TOML value (`2000`, `true`, `["a", "b"]`) or else a
/// string. The variables without `__` (`CIVGATE_LISTEN`, …) are the command line's.
pub fn with_env_overrides(
    source: &str,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Option<String>, String> {
    let mut overrides: Vec<(Vec<String>, String, String)> = vars
        .into_iter()
        .filter_map(|(k, v)| {
            let path = k.strip_prefix("CIVGATE_")?;
            let keys: Vec<String> = path.split("__").map(str::to_lowercase).collect();
            (keys.len() > 1).then_some((keys, v, k))
        })
        .collect();
    if overrides.is_empty() {
        return Ok(None);
    }
    overrides.sort();
    let mut doc: toml::Table = toml::from_str(source).map_err(|e| e.message().to_owned())?;
    for (keys, value, var) in overrides {
        if keys.iter().any(String::is_empty) {
            return Err(format!(
                "{var}: an empty key between the double underscores"
            ));
        }
        let (last, sections) = keys.split_last().ok_or_else(|| format!("{var}: no key"))?;
        let mut table = &mut doc;
        for k in sections {
            let entry = table
                .entry(k.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry
                .as_table_mut()
                .ok_or_else(|| format!("{var}: {k} is not a section of the config"))?;
        }
        let parsed = |v: &str| {
            toml::from_str::<toml::Table>(&format!("v = {v}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
        };
        let typed = match table.get(last) {
            Some(toml::Value::String(_)) | None if parsed(&value).is_none() => {
                toml::Value::String(value)
            }
            Some(toml::Value::String(_)) => toml::Value::String(value),
            Some(old) => match parsed(&value) {
                Some(v) if v.same_type(old) => v,
                _ => {
                    return Err(format!(
                        "{var}: {value:?} is not a {} like the value it replaces",
                        old.type_str()
                    ));
                }
            },
            None => parsed(&value).unwrap_or(toml::Value::String(value)),
        };
        table.insert(last.clone(), typed);
    }
    toml::to_string(&doc).map(Some).map_err(|e| e.to_string())
}
