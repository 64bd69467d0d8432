//! The gate: the tower layers every API request passes, in this order (`server` composes them
//! with `ServiceBuilder`):
//!
//! ```text
//! GrpcOnly    405 / 415 for anything that is not a gRPC request
//! Observe     the call's context (arrival, method, request id, policy snapshot), per-method
//!             metrics, `x-request-id` on the answer
//! Bodies      request bodies bounded in time and bytes, read while the certificate stands
//! Refusals    what a refused call leaves: a metered log line and a record appended at once
//! Authorize   identity → policy: the `Principal`, or a refusal           (policy::authorize)
//! Admit       in-flight caps → quota, local or shared across replicas    (limits, shared)
//! Audit       the call's record, durable before the answer leaves (absent with the audit off)
//! handler
//! ```
//!
//! Each layer is one [`Step`]: an async function of the request and the rest of the stack. The
//! decisions they apply are plain functions elsewhere (`policy`, `limits`); the steps only wire
//! them to HTTP. A step that refuses answers with a trailers-only gRPC status and a [`Refused`]
//! extension, which `Refusals` turns into the refusal's log line and audit record.

mod admit;
mod body;
mod observe;
mod record;

pub use admit::{Admit, Authorize};
pub use body::{Bodies, BodyLimits, ByteBudget};
pub use observe::{GrpcOnly, Observe};
pub use record::{Audit, Refusals};

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use tower::{Layer, Service};

use crate::{listener::ConnInfo, policy::Principal, state::Snapshot};

pub type Request = http::Request<tonic::body::Body>;
pub type Response = http::Response<tonic::body::Body>;

/// One layer of the gate, as an async function: `next` is the rest of the stack, ready to be
/// called once (or dropped, when the step answers itself).
pub(crate) trait Step: Clone + Send + Sync + 'static {
    fn run<S>(
        self,
        req: Request,
        next: S,
    ) -> impl Future<Output = Result<Response, S::Error>> + Send
    where
        S: Service<Request, Response = Response> + Send + 'static,
        S::Future: Send,
        S::Error: Send;
}

/// A [`Step`] as a tower layer.
#[derive(Clone)]
pub(crate) struct StepLayer<T>(pub T);

impl<T: Clone, S> Layer<S> for StepLayer<T> {
    type Service = Stepped<T, S>;
    fn layer(&self, inner: S) -> Stepped<T, S> {
        Stepped {
            step: self.0.clone(),
            inner,
        }
    }
}

/// A [`Step`] in front of the service `S`.
#[derive(Clone)]
pub(crate) struct Stepped<T, S> {
    step: T,
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<T, S> Service<Request> for Stepped<T, S>
where
    T: Step,
    S: Service<Request, Response = Response> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The service polled ready goes with this call; its clone waits for the next one.
        let clone = self.inner.clone();
        let next = std::mem::replace(&mut self.inner, clone);
        Box::pin(self.step.clone().run(req, next))
    }
}

/// What `Observe` learns of a call when it arrives, for the layers inside it (a request
/// extension, shared). One policy snapshot serves the whole call: a reload in the middle of it does
/// not judge it by two configurations.
pub(crate) struct CallContext {
    pub started: Instant,
    /// The request path, cut to [`MAX_PATH`] bytes.
    pub path: String,
    /// The method's name in the method table, or `unknown` (a metric label).
    pub method: &'static str,
    pub request_id: String,
    /// The W3C trace the call belongs to (the caller's `traceparent`, or a new one).
    pub trace: crate::trace::TraceContext,
    pub conn: ConnInfo,
    pub snapshot: Arc<Snapshot>,
}

impl CallContext {
    /// The context `Observe` put on the request.
    fn of(req: &Request) -> Option<Arc<Self>> {
        req.extensions().get::<Arc<CallContext>>().cloned()
    }
}

/// The answer when a layer misses what an outer one puts on the request: a bug in the
/// stack's order, never a client's doing.
fn out_of_order(what: &str) -> Response {
    tracing::error!("the gate's layers are out of order: {what} missing");
    tonic::Status::internal("gateway misconfigured").into_http()
}

/// The mark a refusing step leaves on its answer: why (the audit record's detail) and who,
/// once known.
#[derive(Clone)]
pub struct Refused {
    pub detail: String,
    pub principal: Option<Principal>,
}

/// A refusal's answer: its status, with the [`Refused`] mark for `Refusals`.
fn refused(status: tonic::Status, detail: String, principal: Option<Principal>) -> Response {
    let mut resp = status.into_http();
    resp.extensions_mut().insert(Refused { detail, principal });
    resp
}

/// Longest method path kept in logs, audit records and messages; a longer one is cut.
const MAX_PATH: usize = 200;

/// The request path, cut to [`MAX_PATH`] bytes (paths are ASCII: `http::Uri` allows no more).
fn bounded_path(path: &str) -> String {
    if path.len() <= MAX_PATH {
        return path.to_owned();
    }
    let mut end = MAX_PATH;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &path[..end])
}

/// The reflection stream is bidirectional and long-lived: its body has no overall deadline,
/// and each further message costs a unit of quota.
const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";

/// The gRPC status of a trailers-only answer (errors), `None` for a success or an opened
/// stream. tonic's "decoded message length too large" (OUT_OF_RANGE) is rewritten to
/// RESOURCE_EXHAUSTED, gRPC's convention for a message over the limit (no handler of ours
/// answers OUT_OF_RANGE); the rewrite is idempotent, so every layer sees the same code.
fn outcome(resp: &mut Response) -> Option<tonic::Code> {
    let code = grpc_status(resp.headers())?;
    if code == tonic::Code::OutOfRange {
        resp.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("8"));
        return Some(tonic::Code::ResourceExhausted);
    }
    Some(code)
}

fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let v = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(v))
}

/// RESOURCE_EXHAUSTED with `retry-after` (whole seconds) and a `google.rpc.RetryInfo`.
pub(crate) fn rate_limited(
    agency: &crate::domain::AgencyId,
    what: &str,
    retry_after_secs: u64,
) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let mut status = tonic::Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!("agency {agency} is over its {what} quota; retry after {retry_after_secs} s"),
        ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(retry_after_secs))),
    );
    if let Ok(v) = retry_after_secs.to_string().parse() {
        status.metadata_mut().insert("retry-after", v);
    }
    status
}

#[cfg(test)]
mod tests;
