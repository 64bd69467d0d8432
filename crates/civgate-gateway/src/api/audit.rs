//! `civgate.v1.Audit`: checkpoints, entries, proofs and search, for auditors.

use tonic::{Request, Response, Status};
use tonic_types::FieldViolation;

use crate::{
    api::invalid,
    audit::{AuditLog, FactsSlot, Filter},
    domain::PersonalId,
    pb::v1::{
        AuditEntry, GetCheckpointRequest, GetCheckpointResponse, GetConsistencyProofRequest,
        GetConsistencyProofResponse, GetEntriesRequest, GetEntriesResponse,
        GetInclusionProofRequest, GetInclusionProofResponse, SearchEntriesRequest,
        SearchEntriesResponse, audit_server::Audit,
    },
};

use super::principal;

#[derive(Clone)]
pub(crate) struct AuditService {
    log: Option<AuditLog>,
}

impl AuditService {
    pub fn new(log: Option<AuditLog>) -> Self {
        Self { log }
    }

    fn log(&self) -> Result<&AuditLog, Status> {
        self.log
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("the audit log is disabled on this gateway"))
    }
}

#[tonic::async_trait]
impl Audit for AuditService {
    async fn get_checkpoint(
        &self,
        req: Request<GetCheckpointRequest>,
    ) -> Result<Response<GetCheckpointResponse>, Status> {
        principal(&req)?;
        Ok(Response::new(GetCheckpointResponse {
            checkpoint: self.log()?.latest_checkpoint(),
        }))
    }

    async fn get_entries(
        &self,
        req: Request<GetEntriesRequest>,
    ) -> Result<Response<GetEntriesResponse>, Status> {
        principal(&req)?;
        let r = req.into_inner();
        let entries = self.log()?.entries(r.start, r.end).await?;
        Ok(Response::new(GetEntriesResponse { entries }))
    }

    async fn get_inclusion_proof(
        &self,
        req: Request<GetInclusionProofRequest>,
    ) -> Result<Response<GetInclusionProofResponse>, Status> {
        principal(&req)?;
        let r = req.into_inner();
        let hashes = self.log()?.inclusion_proof(r.index, r.tree_size).await?;
        Ok(Response::new(GetInclusionProofResponse {
            hashes: hashes.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    async fn get_consistency_proof(
        &self,
        req: Request<GetConsistencyProofRequest>,
    ) -> Result<Response<GetConsistencyProofResponse>, Status> {
        principal(&req)?;
        let r = req.into_inner();
        let hashes = self.log()?.consistency_proof(r.first, r.second).await?;
        Ok(Response::new(GetConsistencyProofResponse {
            hashes: hashes.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    async fn search_entries(
        &self,
        req: Request<SearchEntriesRequest>,
    ) -> Result<Response<SearchEntriesResponse>, Status> {
        principal(&req)?;
        let facts = FactsSlot::of(&req);
        let r = req.into_inner();
        let mut violations = Vec::new();
        let subject = (!r.subject_personal_id.is_empty())
            .then(|| PersonalId::parse(&r.subject_personal_id))
            .transpose()
            .map_err(|e| violations.push(FieldViolation::new("subject_personal_id", e.to_string())))
            .ok()
            .flatten();
        let after = if r.page_token.is_empty() {
            Some(0)
        } else {
            r.page_token.parse::<u64>().ok()
        };
        if after.is_none() {
            violations.push(FieldViolation::new(
                "page_token",
                "not a token this service issued",
            ));
        }
        if !violations.is_empty() {
            return Err(invalid(violations));
        }
        // Who searched for which citizen is itself on the record.
        if let Some(s) = &subject {
            facts.update(|f| f.subjects = vec![s.to_string()]);
        }
        let limit = if r.page_size == 0 {
            100
        } else {
            r.page_size.min(1_000)
        };
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        let filter = Filter {
            subject: subject.map(|s| s.to_string()),
            agency: nonempty(r.agency_id),
            method: nonempty(r.method),
            outcome: nonempty(r.outcome),
            from_ms: (r.from_unix_ms > 0).then_some(r.from_unix_ms),
            to_ms: (r.to_unix_ms > 0).then_some(r.to_unix_ms),
            after: after.unwrap_or(0),
            limit: limit + 1,
        };
        let mut found = self.log()?.search(&filter).await?;
        let next_page_token = if found.len() > limit as usize {
            found.truncate(limit as usize);
            found
                .last()
                .map(|(i, _)| (i + 1).to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(SearchEntriesResponse {
            entries: found
                .into_iter()
                .map(|(index, leaf)| AuditEntry { index, leaf })
                .collect(),
            next_page_token,
        }))
    }
}
