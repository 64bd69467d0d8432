//! What the audit log keeps of a call: `Refusals` (a refused call's record, appended at once)
//! and `Audit` (an admitted call's record, durable before its answer leaves: fail closed).

use std::sync::Arc;

use tower::Service;

use super::{CallContext, Refused, Request, Response, Step, out_of_order, outcome};
use crate::{
    audit::{AuditLog, Call, Facts, FactsSlot},
    policy::Principal,
    telemetry,
};

/// Answers refused by the steps inside it ([`Refused`]) leave a log line and a record, up to
/// a meter per certificate: past it they get the same answer, counted, without a record or a
/// line each (a flood of refusals would otherwise fill the audit log and the logs). A
/// refusal returns no data: its record is appended without waiting for the commit, so a
/// flood of refusals cannot make others wait on the log.
#[derive(Clone)]
pub struct Refusals {
    /// `None` with the audit off: the refusals are still metered and logged. (In an `Arc`:
    /// a layer's state is cloned for every call, by each layer outside it too.)
    audit: Option<Arc<AuditLog>>,
}

impl Refusals {
    pub fn new(audit: Option<AuditLog>) -> Self {
        Self {
            audit: audit.map(Arc::new),
        }
    }
}

impl Step for Refusals {
    async fn run<S>(self, req: Request, mut next: S) -> Result<Response, S::Error>
    where
        S: Service<Request, Response = Response> + Send + 'static,
        S::Future: Send,
        S::Error: Send,
    {
        let Some(ctx) = CallContext::of(&req) else {
            return Ok(out_of_order("the call's context"));
        };
        let mut resp = next.call(req).await?;
        let Some(Refused { detail, principal }) = resp.extensions_mut().remove::<Refused>() else {
            return Ok(resp);
        };
        if !ctx.snapshot.refusals.record(&ctx.conn.peer.fingerprint) {
            telemetry::refusal_unrecorded(ctx.method);
            return Ok(resp);
        }
        let status = tonic::Status::from_header_map(resp.headers())
            .unwrap_or_else(|| tonic::Status::unknown("refused"));
        tracing::warn!(
            remote = %ctx.conn.remote,
            method = ctx.path,
            agency = principal.as_ref().map(|p| p.agency.as_str()),
            "refused: {}: {}",
            detail,
            status.message()
        );
        if let Some(log) = self.audit {
            let call = Call {
                peer: ctx.conn.peer.clone(),
                principal,
                path: ctx.path.clone(),
                request_id: ctx.request_id.clone(),
                started: ctx.started,
            };
            let rec = call.record(Facts::default(), status.code(), &detail);
            if let Err(e) = log.append_deferred(rec).await {
                return Ok(audit_unavailable(&e).into_http());
            }
        }
        Ok(resp)
    }
}

/// The admitted call's record: the handler tells it its facts ([`FactsSlot`]) and may commit
/// it itself, in the same transaction as its own write (`Publish`: it finds the [`Call`] on
/// the request); otherwise it is appended here and the answer waits until it is durable. A
/// record that cannot be made durable replaces the answer with UNAVAILABLE. With the audit
/// off this layer is not in the stack.
#[derive(Clone)]
pub struct Audit {
    log: Arc<AuditLog>,
}

impl Audit {
    pub fn new(log: AuditLog) -> Self {
        Self { log: Arc::new(log) }
    }
}

impl Step for Audit {
    async fn run<S>(self, mut req: Request, mut next: S) -> Result<Response, S::Error>
    where
        S: Service<Request, Response = Response> + Send + 'static,
        S::Future: Send,
        S::Error: Send,
    {
        let Some(ctx) = CallContext::of(&req) else {
            return Ok(out_of_order("the call's context"));
        };
        let principal = req.extensions().get::<Principal>().cloned();
        let facts = FactsSlot::default();
        req.extensions_mut().insert(facts.clone());
        let call = Arc::new(Call {
            peer: ctx.conn.peer.clone(),
            principal,
            path: ctx.path.clone(),
            request_id: ctx.request_id.clone(),
            started: ctx.started,
        });
        req.extensions_mut().insert(call.clone());
        let mut resp = next.call(req).await?;
        let code = outcome(&mut resp).unwrap_or(tonic::Code::Ok);
        let facts = facts.take();
        if facts.recorded.is_none() {
            let refusal = facts.refusal;
            let rec = call.record(facts, code, refusal);
            if let Err(e) = self.log.append(rec).await {
                drop(resp);
                return Ok(audit_unavailable(&e).into_http());
            }
        }
        Ok(resp)
    }
}

/// Fail closed: the call's answer is replaced when its audit record cannot be made durable.
fn audit_unavailable(e: &crate::audit::AuditError) -> tonic::Status {
    tracing::error!(error = %e, "refusing a response whose audit record is not durable");
    tonic::Status::unavailable("audit log unavailable: the call was not completed")
}
