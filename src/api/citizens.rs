//! `civgate.v1.Citizens`: look-ups, verification and search (issue #3).

use tonic::{Request, Response, Status};

use crate::pb::v1::{
    BatchGetCitizensRequest, BatchGetCitizensResponse, GetCitizenRequest, GetCitizenResponse,
    SearchCitizensRequest, SearchCitizensResponse, VerifyCitizenRequest, VerifyCitizenResponse,
    citizens_server::Citizens,
};

use super::{not_yet, principal};

#[derive(Clone, Default)]
pub struct CitizensService;

#[tonic::async_trait]
impl Citizens for CitizensService {
    async fn get_citizen(
        &self,
        req: Request<GetCitizenRequest>,
    ) -> Result<Response<GetCitizenResponse>, Status> {
        principal(&req)?;
        Err(not_yet("Citizens.GetCitizen", 3))
    }

    async fn batch_get_citizens(
        &self,
        req: Request<BatchGetCitizensRequest>,
    ) -> Result<Response<BatchGetCitizensResponse>, Status> {
        principal(&req)?;
        Err(not_yet("Citizens.BatchGetCitizens", 3))
    }

    async fn verify_citizen(
        &self,
        req: Request<VerifyCitizenRequest>,
    ) -> Result<Response<VerifyCitizenResponse>, Status> {
        principal(&req)?;
        Err(not_yet("Citizens.VerifyCitizen", 3))
    }

    async fn search_citizens(
        &self,
        req: Request<SearchCitizensRequest>,
    ) -> Result<Response<SearchCitizensResponse>, Status> {
        principal(&req)?;
        Err(not_yet("Citizens.SearchCitizens", 3))
    }
}
