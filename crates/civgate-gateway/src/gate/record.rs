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
        let status = log_refusal(&ctx, principal.as_ref(), &detail, &resp);
        if let Some(log) = self.audit {
            let call = Call::new(
                ctx.conn.peer.clone(),
                principal,
                ctx.path.clone(),
                ctx.request_id.clone(),
                ctx.started,
            );
            let rec = call.record(Facts::default(), status.code(), &detail);
            if let Err(e) = log.append_deferred(rec).await {
                return Ok(audit_unavailable(&e).into_http());
            }
        }
        Ok(resp)
    }
}

/// The `refused: <reason>: <message>` log line of a refusal (the gate's or a handler's), with the
/// request id and the agency; returns the refusal's status, read from the answer.
fn log_refusal(
    ctx: &CallContext,
    principal: Option<&Principal>,
    reason: &str,
    resp: &Response,
) -> tonic::Status {
    let status = tonic::Status::from_header_map(resp.headers())
        .unwrap_or_else(|| tonic::Status::unknown("refused"));
    tracing::warn!(
        request_id = ctx.request_id.as_str(),
        remote = %ctx.conn.remote,
        method = ctx.path,
        agency = principal.map(|p| p.agency.as_str()),
        "refused: {}: {}",
        reason,
        status.message()
    );
    status
}

/// The admitted call's record: the handler tells it its facts ([`FactsSlot`]) and may commit
/// it itself, in the same transaction as its own write (`Publish`: it finds the [`Call`] on
/// the request); otherwise it is appended here and the answer waits until it is durable. A
/// record that cannot be made durable replaces the answer with UNAVAILABLE, and a record
/// saying so (`audit_unavailable`, nothing returned) is appended for when the store recovers.
/// A call its client abandons before its record is appended (a reset stream, a closed
/// connection) is recorded as CANCELLED (`client_cancelled`). With the audit off this layer is
/// not in the stack.
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
        let call = Arc::new(Call::new(
            ctx.conn.peer.clone(),
            principal,
            ctx.path.clone(),
            ctx.request_id.clone(),
            ctx.started,
        ));
        req.extensions_mut().insert(call.clone());
        let mut pending = Abandoned {
            log: self.log.clone(),
            call: Some(call.clone()),
            facts: facts.clone(),
            known: None,
        };
        let answered = next.call(req).await;
        let mut resp = match answered {
            Ok(resp) => resp,
            Err(e) => {
                pending.call = None;
                return Err(e);
            }
        };
        let code = outcome(&mut resp).unwrap_or(tonic::Code::Ok);
        let mut facts = facts.take();
        if code == tonic::Code::InvalidArgument && facts.detail.is_empty() {
            facts.detail = invalid_fields(resp.headers()).unwrap_or_default();
        }
        // A request that is not a valid protobuf message (gRPC answers INTERNAL, as its status
        // code guide says for a request that cannot be parsed): the client's doing, and the
        // record says so.
        if code == tonic::Code::Internal && facts.detail.is_empty() && undecodable(resp.headers()) {
            facts.detail = "undecodable_request".into();
        }
        if facts.recorded.is_some() {
            pending.call = None;
            return Ok(resp);
        }
        // What a record of the call says when its answer is withheld: whom it concerned, not
        // what was returned.
        pending.known = Some(Facts {
            purpose: facts.purpose.clone(),
            subjects: facts.subjects.clone(),
            ..Facts::default()
        });
        let detail = if facts.refusal.is_empty() {
            facts.detail.clone()
        } else {
            // A refusal the handler decided (purpose, publish rules, guessing) is logged like
            // those of the gate.
            log_refusal(&ctx, call.principal.as_ref(), facts.refusal, &resp);
            facts.refusal.to_owned()
        };
        let appended = self.log.append(call.record(facts, code, &detail)).await;
        let withheld = pending.known.take().unwrap_or_default();
        pending.call = None;
        if let Err(e) = appended {
            drop(resp);
            let status = audit_unavailable(&e);
            // The writer does not commit a record whose caller stopped waiting; this one takes
            // its place, committed with the next batch once the store answers again (the
            // writer keeps records nobody waits for until then). Only if the first record was
            // already being committed when its caller gave up are both in the log.
            let rec = call.record(withheld, status.code(), "audit_unavailable");
            let _ = self.log.append_deferred(rec).await;
            return Ok(status.into_http());
        }
        Ok(resp)
    }
}

/// An admitted call between its arrival at the handler and its answer. Dropped armed — its
/// client reset the stream or went away, and the handler with it — it has the call recorded
/// as CANCELLED, nothing returned, unless a journal writer that held the call's draft
/// committed its record (it marks the call before letting go of it: [`Call::is_recorded`]).
struct Abandoned {
    log: Arc<AuditLog>,
    call: Option<Arc<Call>>,
    /// What the handler tells the record, until the answer.
    facts: FactsSlot,
    /// Once the answer exists: whom the call concerned, while its record is appended.
    known: Option<Facts>,
}

/// How long a call abandoned by its client waits for a journal writer still holding its
/// draft (a commit is bounded by the commit timeout; this is far above it).
const ABANDONED_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl Drop for Abandoned {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else {
            return;
        };
        let facts = self.known.take().unwrap_or_else(|| self.facts.take());
        if facts.recorded.is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let log = self.log.clone();
        runtime.spawn(async move {
            let since = tokio::time::Instant::now();
            while Arc::strong_count(&call) > 1 && since.elapsed() < ABANDONED_WAIT {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            // Pairs with the release of the writer's last reference (after its mark).
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            if call.is_recorded() || Arc::strong_count(&call) > 1 {
                return;
            }
            telemetry::rpc_abandoned();
            let nothing_returned = Facts {
                purpose: facts.purpose,
                subjects: facts.subjects,
                ..Facts::default()
            };
            let rec = call.record(nothing_returned, tonic::Code::Cancelled, "client_cancelled");
            let _ = log.append_deferred(rec).await;
        });
    }
}

/// Fail closed: the call's answer is replaced when its audit record cannot be made durable.
fn audit_unavailable(e: &crate::audit::AuditError) -> tonic::Status {
    tracing::error!(error = %e, "refusing a response whose audit record is not durable");
    tonic::Status::unavailable("audit log unavailable: the call was not completed")
}

/// The fields an INVALID_ARGUMENT answer names in its `google.rpc.BadRequest` detail, as the
/// audit record's detail (`invalid:personal_id,purpose`).
fn invalid_fields(headers: &http::HeaderMap) -> Option<String> {
    use tonic_types::StatusExt;
    let status = tonic::Status::from_header_map(headers)?;
    let bad = status.get_details_bad_request()?;
    Some(crate::api::invalid_detail(&bad.field_violations))
}

/// Is this an answer to a request body that did not decode (tonic's protobuf codec)?
fn undecodable(headers: &http::HeaderMap) -> bool {
    headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| m.starts_with("failed%20to%20decode") || m.starts_with("failed to decode"))
}
