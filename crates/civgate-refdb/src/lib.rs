//! `civgate refdb serve`: the reference population directory — an upstream gRPC server over
//! mutual TLS implementing `civgate.upstream.v1.PopulationDirectory` on an embedded store
//! with a deterministic synthetic population. For tests, staging, benchmarks and the demo.

pub mod social;
pub mod store;
pub mod sync;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Result;
use tokio::{sync::watch, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::info;

use civgate_audit as audit;
use civgate_dev::synth;
use civgate_domain as domain;
use civgate_gateway::{
    client,
    config::Config,
    convert::{self, fields_from_names, mask, record_to_pb},
    listener::{self, AcceptSettings, ConnInfo},
    server, telemetry, tls,
};
use civgate_proto as pb;
use civgate_store::sqlite;
use serde::Deserialize;

use crate::{
    domain::{AgencyId, PersonalId, parse_date},
    pb::upstream::v1::{
        GetCitizensRequest, GetCitizensResponse, SearchCitizensRequest, SearchCitizensResponse,
        population_directory_server::{PopulationDirectory, PopulationDirectoryServer},
    },
};

pub use store::DirectoryStore;

/// The `[refdb]` section of the configuration file (the gateway's file: the directory shares
/// its PKI and server settings).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RefdbSection {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub citizens: usize,
    pub seed: u64,
    /// Agencies (client certificate URI SANs) allowed to query the directory.
    pub allowed_agencies: Vec<AgencyId>,
}

impl Default for RefdbSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7444)),
            data_dir: PathBuf::from("./data/refdb"),
            citizens: 100_000,
            seed: 1,
            allowed_agencies: Vec::new(),
        }
    }
}

impl RefdbSection {
    /// The section of `config`, its defaults where absent; a mistake is named by key.
    pub fn of(config: &Config) -> Result<Self> {
        let Some(table) = &config.file.refdb else {
            return Ok(Self::default());
        };
        Self::deserialize(table.clone())
            .map_err(|e| anyhow::anyhow!("{}: [refdb]: {}", config.origin.display(), e.message()))
    }
}

/// Largest batch / search answer the directory gives.
pub const MAX_BATCH: usize = 100;

#[derive(Clone)]
pub(crate) struct DirectoryService {
    store: DirectoryStore,
    traces: Traces,
}

/// The `traceparent` of the directory's latest calls (at most [`TRACES_KEPT`]): what a
/// directory operator correlates with the gateway's access log.
#[derive(Clone, Default)]
pub struct Traces(Arc<std::sync::Mutex<std::collections::VecDeque<String>>>);

const TRACES_KEPT: usize = 256;

impl Traces {
    fn note<T>(&self, req: &Request<T>) {
        let Some(t) = req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        tracing::debug!(traceparent = t, "directory call");
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == TRACES_KEPT {
            q.pop_front();
        }
        q.push_back(t.to_owned());
    }

    /// The `traceparent` headers received, oldest first.
    pub fn recent(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

impl DirectoryService {
    pub fn new(store: DirectoryStore, traces: Traces) -> Self {
        Self { store, traces }
    }
}

fn internal(e: anyhow::Error) -> Status {
    tracing::error!(error = %e, "directory store failed");
    Status::unavailable("directory store failed")
}

#[tonic::async_trait]
impl PopulationDirectory for DirectoryService {
    async fn get_citizens(
        &self,
        req: Request<GetCitizensRequest>,
    ) -> Result<Response<GetCitizensResponse>, Status> {
        self.traces.note(&req);
        let req = req.into_inner();
        if req.personal_ids.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "personal_ids: at most {MAX_BATCH}"
            )));
        }
        let ids = req
            .personal_ids
            .iter()
            .map(|s| {
                PersonalId::parse(s)
                    .map_err(|e| Status::invalid_argument(format!("personal_ids: {s:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let fields = fields_from_names(&req.fields);
        let records = self.store.get_many(&ids).await.map_err(internal)?;
        let citizens = masked(&records, &fields);
        Ok(Response::new(GetCitizensResponse { citizens }))
    }

    async fn search_citizens(
        &self,
        req: Request<SearchCitizensRequest>,
    ) -> Result<Response<SearchCitizensResponse>, Status> {
        self.traces.note(&req);
        let req = req.into_inner();
        parse_date(&req.date_of_birth)
            .map_err(|e| Status::invalid_argument(format!("date_of_birth: {e}")))?;
        let limit = req.limit.clamp(1, MAX_BATCH as u32);
        let province = (!req.province_code.is_empty()).then_some(req.province_code.as_str());
        let fields = fields_from_names(&req.fields);
        let records = self
            .store
            .search(&req.folded_name, &req.date_of_birth, province, limit)
            .await
            .map_err(internal)?;
        let citizens = masked(&records, &fields);
        Ok(Response::new(SearchCitizensResponse { citizens }))
    }
}

/// Records as wire citizens, each limited to `fields`.
fn masked(
    records: &[crate::synth::CitizenRecord],
    fields: &std::collections::BTreeSet<crate::domain::CitizenField>,
) -> Vec<crate::pb::v1::Citizen> {
    records
        .iter()
        .map(|r| {
            let mut c = record_to_pb(r);
            mask(&mut c, fields);
            c
        })
        .collect()
}

/// Only the agencies in `[refdb] allowed_agencies` (the gateway) may query the directory.
#[derive(Clone)]
struct OnlyAllowed(Arc<Vec<AgencyId>>);

impl tonic::service::Interceptor for OnlyAllowed {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let agency = req
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.peer.agency.as_ref().ok());
        match agency {
            Some(a) if self.0.contains(a) => Ok(req),
            Some(a) => Err(Status::permission_denied(format!(
                "agency {a} may not query the directory"
            ))),
            None => Err(Status::unauthenticated(
                "client certificate names no agency",
            )),
        }
    }
}

/// Overrides of `[refdb]` from the command line.
#[derive(Clone, Debug, Default)]
pub struct RefdbOverrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub citizens: Option<usize>,
    pub seed: Option<u64>,
}

pub struct RunningRefdb {
    pub addr: SocketAddr,
    pub store: DirectoryStore,
    /// The `traceparent` of its latest calls.
    pub traces: Traces,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
}

/// Loads (or reuses) the population and serves the directory over mTLS.
pub async fn start(config: &Config, o: RefdbOverrides) -> Result<RunningRefdb> {
    let section = &RefdbSection::of(config)?;
    let listen = o.listen.unwrap_or(section.listen);
    let data_dir = o
        .data_dir
        .unwrap_or_else(|| config.resolve(&section.data_dir));
    let citizens = o.citizens.unwrap_or(section.citizens);
    let seed = o.seed.unwrap_or(section.seed);
    let tls_config = tls::server_config(config)?;
    let handshake_timeout = Duration::from_millis(config.file.server.handshake_timeout_ms);
    let max_pending = config.file.server.max_pending_handshakes;

    let store = DirectoryStore::open(&data_dir).await?;
    store.ensure_population(seed, citizens).await?;

    let tcp = telemetry::bind(listen, "refdb").await?;
    let addr = tcp.local_addr()?;
    let (shutdown, rx) = watch::channel(false);
    let incoming = listener::spawn(
        tcp,
        move || AcceptSettings {
            tls: tls_config.clone(),
            handshake_timeout,
            first_bytes_timeout: handshake_timeout,
            max_pending,
            max_pending_per_source: max_pending,
            max_per_agency: usize::MAX,
        },
        usize::MAX >> 4,
        0,
        rx.clone(),
    );
    let allowed = OnlyAllowed(Arc::new(section.allowed_agencies.clone()));
    let traces = Traces::default();
    let svc = PopulationDirectoryServer::with_interceptor(
        DirectoryService::new(store.clone(), traces.clone()),
        allowed,
    );
    let mut signal = rx;
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(ReceiverStream::new(incoming), async move {
                listener::wait_true(&mut signal).await;
            })
            .await?;
        Ok(())
    });
    info!(%addr, citizens, seed, "reference population directory serving");
    Ok(RunningRefdb {
        addr,
        store,
        traces,
        shutdown,
        task,
    })
}

impl RunningRefdb {
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        self.task.await?
    }

    /// Runs until SIGTERM or SIGINT; `signals` installed before the process said it was up.
    pub async fn run_until_signalled(self, mut signals: crate::server::Signals) -> Result<()> {
        signals.stopped().await;
        self.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use civgate_gateway::config::DEFAULT_CONFIG;

    fn config(text: &str) -> Config {
        Config::parse(text, "civgate.toml".into(), ".".into()).expect("the gateway's checks pass")
    }

    #[test]
    fn the_refdb_section_is_read_here_and_its_mistakes_named() {
        let shipped = RefdbSection::of(&config(DEFAULT_CONFIG)).unwrap();
        assert_eq!(shipped.listen, SocketAddr::from(([127, 0, 0, 1], 7444)));
        assert_eq!(shipped.allowed_agencies.len(), 1);

        // Absent: the defaults.
        let start = DEFAULT_CONFIG.find("[refdb]").unwrap();
        let end = start + DEFAULT_CONFIG[start..].find("\n\n").unwrap();
        let without = format!("{}{}", &DEFAULT_CONFIG[..start], &DEFAULT_CONFIG[end..]);
        let absent = RefdbSection::of(&config(&without)).unwrap();
        assert!(absent.allowed_agencies.is_empty());

        // A misspelt key passes the gateway (which does not read the section) and is named
        // by the directory, with the file.
        let typo = DEFAULT_CONFIG.replace("citizens = 100000", "citizen = 100000");
        assert_ne!(typo, DEFAULT_CONFIG);
        let err = RefdbSection::of(&config(&typo)).unwrap_err().to_string();
        assert!(
            err.contains("civgate.toml: [refdb]") && err.contains("citizen"),
            "{err}"
        );
        let bad = DEFAULT_CONFIG.replace("seed = 1\n", "seed = \"one\"\n");
        assert_ne!(bad, DEFAULT_CONFIG);
        assert!(RefdbSection::of(&config(&bad)).is_err());
    }
}
