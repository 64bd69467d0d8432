//! The gRPC services: each handler validates its request, does the work, and tells the gate
//! what the call's audit record must say.

pub mod audit;
pub mod cases;
pub mod citizens;
pub mod exchange;
pub mod wire;

use crate::policy::Principal;
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// The caller, as the gate decided it. Every handler starts here.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<Principal, tonic::Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| tonic::Status::internal("request reached a handler without a principal"))
}

/// `INVALID_ARGUMENT` with a `google.rpc.BadRequest` naming each bad field.
/// The audit detail of an invalid call: `invalid:` and the fields refused (at most 200 bytes).
pub(crate) fn invalid_detail(violations: &[FieldViolation]) -> String {
    let mut d = String::from("invalid:");
    for (i, v) in violations.iter().enumerate() {
        if d.len() + v.field.len() + 1 > 200 {
            d.push_str(",...");
            break;
        }
        if i > 0 {
            d.push(',');
        }
        d.push_str(&v.field);
    }
    d
}

pub fn invalid(violations: Vec<FieldViolation>) -> tonic::Status {
    let summary = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    tonic::Status::with_error_details(
        tonic::Code::InvalidArgument,
        summary,
        ErrorDetails::with_bad_request(violations),
    )
}
