//! `civgate refdb serve`: the reference population directory — an upstream gRPC server over
//! mutual TLS implementing `civgate.upstream.v1.PopulationDirectory` on an embedded store
//! with a deterministic synthetic population. For tests, staging, benchmarks and the demo.

pub mod store;
pub mod sync;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Result;
use tokio::{sync::watch, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::{
    config::Config,
    convert::{fields_from_names, mask, record_to_pb},
    domain::{AgencyId, PersonalId, parse_date},
    listener::{self, AcceptSettings, ConnInfo},
    pb::upstream::v1::{
        GetCitizensRequest, GetCitizensResponse, SearchCitizensRequest, SearchCitizensResponse,
        population_directory_server::{PopulationDirectory, PopulationDirectoryServer},
    },
    telemetry, tls,
};

pub use store::DirectoryStore;

/// Largest batch / search answer the directory gives.
pub const MAX_BATCH: usize = 100;

#[derive(Clone)]
pub struct DirectoryService {
    store: DirectoryStore,
}

impl DirectoryService {
    pub fn new(store: DirectoryStore) -> Self {
        Self { store }
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
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
}

/// Loads (or reuses) the population and serves the directory over mTLS.
pub async fn start(config: &Config, o: RefdbOverrides) -> Result<RunningRefdb> {
    let section = &config.file.refdb;
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
    let svc =
        PopulationDirectoryServer::with_interceptor(DirectoryService::new(store.clone()), allowed);
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
