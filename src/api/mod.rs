//! The gRPC services. Only this module (and `pb`) knows prost types.

pub mod audit;
pub mod citizens;
pub mod convert;
pub mod exchange;

use crate::policy::Principal;

/// The caller, as the gate decided it. Every handler starts here.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<Principal, tonic::Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| tonic::Status::internal("request reached a handler without a principal"))
}

/// The answer of a method whose issue has not landed yet: honest, never fake data.
pub(crate) fn not_yet(method: &str, issue: u32) -> tonic::Status {
    tonic::Status::unimplemented(format!(
        "{method} is not implemented yet (tracked in issue #{issue})"
    ))
}
