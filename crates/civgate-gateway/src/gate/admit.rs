//! `Authorize` (identity → policy) and `Admit` (in-flight caps → quota): the decisions are
//! `policy::authorize` and the `limits` / `shared` admissions; these steps apply them.

use tower::Service;

use super::{CallContext, Request, Response, Step, out_of_order, rate_limited, refused};
use crate::{
    policy::{self, Principal},
    telemetry,
};

/// Identity → policy, default deny: the call's [`Principal`] goes on the request, or the call
/// is refused here.
#[derive(Clone, Copy)]
pub struct Authorize;

impl Step for Authorize {
    async fn run<S>(self, mut req: Request, mut next: S) -> Result<Response, S::Error>
    where
        S: Service<Request, Response = Response> + Send + 'static,
        S::Future: Send,
        S::Error: Send,
    {
        let Some(ctx) = CallContext::of(&req) else {
            return Ok(out_of_order("the call's context"));
        };
        match policy::authorize(&ctx.snapshot.policy, &ctx.conn.peer, &ctx.path) {
            Ok(principal) => {
                req.extensions_mut().insert(principal);
                next.call(req).await
            }
            Err(denial) => {
                telemetry::rpc_denied(ctx.method, denial.reason());
                Ok(refused(
                    denial.to_status(),
                    denial.reason().to_owned(),
                    None,
                ))
            }
        }
    }
}

/// The in-flight caps (this replica's, and the agency's across replicas when they share
/// limits) and the agency's quota for the method. An admitted call holds its places until
/// its answer's head exists: a stream does not hold one while it runs.
#[derive(Clone, Copy)]
pub struct Admit;

impl Step for Admit {
    async fn run<S>(self, req: Request, mut next: S) -> Result<Response, S::Error>
    where
        S: Service<Request, Response = Response> + Send + 'static,
        S::Future: Send,
        S::Error: Send,
    {
        let Some(ctx) = CallContext::of(&req) else {
            return Ok(out_of_order("the call's context"));
        };
        let Some(principal) = req.extensions().get::<Principal>().cloned() else {
            return Ok(out_of_order("the principal"));
        };
        match limit(&ctx.snapshot, &principal, &ctx.path).await {
            Ok(held) => {
                let resp = next.call(req).await;
                drop(held);
                resp
            }
            Err((status, detail)) => Ok(refused(status, detail, Some(principal))),
        }
    }
}

/// What an admitted call holds until its response head exists: its places under the
/// in-flight caps (this replica's, and its agency's across replicas when they share limits).
struct Held {
    _local: crate::limits::Admitted,
    _shared: Option<crate::shared::Lease>,
}

/// Admission and quota for an authorized call: its places under the caps, or the refusal
/// and its audit detail. With shared limits the agency's cap and quota are decided across
/// replicas; when Redis cannot decide in time, by this replica alone.
async fn limit(
    snapshot: &crate::state::Snapshot,
    principal: &Principal,
    path: &str,
) -> Result<Held, (tonic::Status, String)> {
    use crate::{
        limits::{Bucket, Busy, Decision},
        shared::Admission,
    };
    let agency = &principal.agency;
    let quotas = &snapshot.config.file.quotas;
    let bucket = Bucket::of_method(path);
    let at_cap = || {
        telemetry::load_shed("agency");
        let status = rate_limited(agency, "in-flight calls", 1);
        (status, "in_flight_cap".to_owned())
    };
    let over = |bucket: Bucket, d: Decision| -> Result<(), (tonic::Status, String)> {
        match d {
            Decision::Allow => Ok(()),
            Decision::Refuse { retry_after_secs } => {
                telemetry::rate_limited(agency.as_str(), bucket.as_str(), false);
                let status = rate_limited(agency, bucket.as_str(), retry_after_secs);
                Err((status, format!("rate_limited:{}", bucket.as_str())))
            }
            Decision::WouldRefuse { retry_after_secs } => {
                telemetry::rate_limited(agency.as_str(), bucket.as_str(), true);
                tracing::info!(%agency, bucket = bucket.as_str(), retry_after_secs, "shadow mode: would refuse (over quota)");
                Ok(())
            }
        }
    };
    // The process's own cap protects the process: always this replica's.
    let total = snapshot.in_flight.admit_total().map_err(|_| {
        telemetry::load_shed("total");
        (
            tonic::Status::unavailable("gateway overloaded; retry shortly"),
            "load_shed".to_owned(),
        )
    })?;
    if let Some(shared) = &snapshot.shared {
        let quota = bucket.map(|b| (b, quotas.rate(agency, principal.role, b), quotas.shadow));
        match shared
            .admit(agency, quotas.max_in_flight_per_agency.max(1), quota)
            .await
        {
            Ok(Admission::Admitted(lease, d)) => {
                if let Some(b) = bucket {
                    over(b, d)?;
                }
                return Ok(Held {
                    _local: total,
                    _shared: Some(lease),
                });
            }
            Ok(Admission::AtCap) => return Err(at_cap()),
            Ok(Admission::Refused(d)) => {
                over(bucket.unwrap_or(Bucket::Reads), d)?;
            }
            // Redis did not decide: this replica's own limits do.
            Err(crate::shared::Unavailable) => {}
        }
    }
    let local = snapshot
        .in_flight
        .admit(agency, total)
        .map_err(|busy| match busy {
            Busy::AgencyAtCap | Busy::Overloaded => at_cap(),
        })?;
    if let Some(b) = bucket {
        over(b, snapshot.quotas.check(agency, b))?;
    }
    Ok(Held {
        _local: local,
        _shared: None,
    })
}
