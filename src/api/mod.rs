//! The gRPC services. Only this module (and `pb`) knows prost types.

pub mod audit;
pub mod citizens;
pub mod convert;
pub mod exchange;
pub mod wire;

use crate::policy::Principal;

/// The caller, as the gate decided it. Every handler starts here.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<Principal, tonic::Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| tonic::Status::internal("request reached a handler without a principal"))
}
