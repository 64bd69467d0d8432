//! `civgate.v1.Audit`: the tamper-evident audit log for auditors (issue #5).

use tonic::{Request, Response, Status};

use crate::pb::v1::{
    GetCheckpointRequest, GetCheckpointResponse, GetConsistencyProofRequest,
    GetConsistencyProofResponse, GetEntriesRequest, GetEntriesResponse, GetInclusionProofRequest,
    GetInclusionProofResponse, SearchEntriesRequest, SearchEntriesResponse, audit_server::Audit,
};

use super::{not_yet, principal};

#[derive(Clone, Default)]
pub struct AuditService;

#[tonic::async_trait]
impl Audit for AuditService {
    async fn get_checkpoint(
        &self,
        req: Request<GetCheckpointRequest>,
    ) -> Result<Response<GetCheckpointResponse>, Status> {
        principal(&req)?;
        Err(not_yet("Audit.GetCheckpoint", 5))
    }

    async fn get_entries(
        &self,
        req: Request<GetEntriesRequest>,
    ) -> Result<Response<GetEntriesResponse>, Status> {
        principal(&req)?;
        Err(not_yet("Audit.GetEntries", 5))
    }

    async fn get_inclusion_proof(
        &self,
        req: Request<GetInclusionProofRequest>,
    ) -> Result<Response<GetInclusionProofResponse>, Status> {
        principal(&req)?;
        Err(not_yet("Audit.GetInclusionProof", 5))
    }

    async fn get_consistency_proof(
        &self,
        req: Request<GetConsistencyProofRequest>,
    ) -> Result<Response<GetConsistencyProofResponse>, Status> {
        principal(&req)?;
        Err(not_yet("Audit.GetConsistencyProof", 5))
    }

    async fn search_entries(
        &self,
        req: Request<SearchEntriesRequest>,
    ) -> Result<Response<SearchEntriesResponse>, Status> {
        principal(&req)?;
        Err(not_yet("Audit.SearchEntries", 5))
    }
}
