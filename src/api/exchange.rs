//! `civgate.v1.Exchange`: two-way event sync (issue #4).

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::pb::v1::{
    AckRequest, AckResponse, GetEventStatusRequest, GetEventStatusResponse, PublishReceipt,
    PublishRequest, RejectRequest, RejectResponse, SubscribeRequest, SubscribedEvent,
    exchange_server::Exchange,
};

use super::{not_yet, principal};

#[derive(Clone, Default)]
pub struct ExchangeService;

type EventStream = Pin<Box<dyn Stream<Item = Result<SubscribedEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Exchange for ExchangeService {
    async fn publish(
        &self,
        req: Request<PublishRequest>,
    ) -> Result<Response<PublishReceipt>, Status> {
        principal(&req)?;
        Err(not_yet("Exchange.Publish", 4))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        principal(&req)?;
        Err(not_yet("Exchange.Subscribe", 4))
    }

    async fn ack(&self, req: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        principal(&req)?;
        Err(not_yet("Exchange.Ack", 4))
    }

    async fn reject(
        &self,
        req: Request<RejectRequest>,
    ) -> Result<Response<RejectResponse>, Status> {
        principal(&req)?;
        Err(not_yet("Exchange.Reject", 4))
    }

    async fn get_event_status(
        &self,
        req: Request<GetEventStatusRequest>,
    ) -> Result<Response<GetEventStatusResponse>, Status> {
        principal(&req)?;
        Err(not_yet("Exchange.GetEventStatus", 4))
    }
}
