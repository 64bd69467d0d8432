//! The tower layer in front of every service: identity → policy (→ rate limit, audit: later
//! issues) → handler, and per-method metrics. Thin: decisions are in `policy`.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::{
    audit::{AuditLog, Call, Facts, FactsSlot},
    listener::ConnInfo,
    policy::{self, Principal},
    state::Shared,
    telemetry,
};

#[derive(Clone)]
pub struct GateLayer {
    state: Shared,
    audit: Option<AuditLog>,
}

impl GateLayer {
    pub fn new(state: Shared, audit: Option<AuditLog>) -> Self {
        Self { state, audit }
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            state: self.state.clone(),
            audit: self.audit.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    state: Shared,
    audit: Option<AuditLog>,
}

/// The `x-request-id` a caller sent (1–128 visible ASCII characters), or a fresh one.
fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| format!("{:032x}", rand::random::<u128>()), str::to_owned)
}

/// Admission and quota for an authorized call: the in-flight permit, or the refusal and its
/// audit detail.
fn limit(
    snapshot: &crate::state::Snapshot,
    principal: &Principal,
    path: &str,
) -> Result<Option<crate::limits::Admitted>, (tonic::Status, String)> {
    use crate::limits::{Bucket, Busy, Decision};
    let agency = &principal.agency;
    let permit = match snapshot.in_flight.admit(agency) {
        Ok(p) => p,
        Err(Busy::Overloaded) => {
            telemetry::load_shed("total");
            return Err((
                tonic::Status::unavailable("gateway overloaded; retry shortly"),
                "load_shed".into(),
            ));
        }
        Err(Busy::AgencyAtCap) => {
            telemetry::load_shed("agency");
            let status = rate_limited(agency, "in-flight calls", 1);
            return Err((status, "in_flight_cap".into()));
        }
    };
    if let Some(bucket) = Bucket::of_method(path) {
        match snapshot.quotas.check(agency, bucket) {
            Decision::Allow => {}
            Decision::Refuse { retry_after_secs } => {
                telemetry::rate_limited(agency.as_str(), bucket.as_str(), false);
                let status = rate_limited(agency, bucket.as_str(), retry_after_secs);
                return Err((status, format!("rate_limited:{}", bucket.as_str())));
            }
            Decision::WouldRefuse { retry_after_secs } => {
                telemetry::rate_limited(agency.as_str(), bucket.as_str(), true);
                tracing::info!(%agency, bucket = bucket.as_str(), retry_after_secs, "shadow mode: would refuse (over quota)");
            }
        }
    }
    Ok(Some(permit))
}

/// RESOURCE_EXHAUSTED with `retry-after` (whole seconds) and a `google.rpc.RetryInfo`.
fn rate_limited(
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

fn with_request_id<B>(mut resp: http::Response<B>, id: &str) -> http::Response<B> {
    if let Ok(v) = http::HeaderValue::from_str(id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Fail closed: the call's answer is replaced when its audit record cannot be made durable.
fn audit_unavailable(e: &crate::audit::AuditError) -> tonic::Status {
    tracing::error!(error = %e, "refusing a response whose audit record is not durable");
    tonic::Status::unavailable("audit log unavailable: the call was not completed")
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for Gate<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let start = Instant::now();
        let path = req.uri().path().to_owned();
        let method = policy::known_method(&path).unwrap_or("unknown");
        let rid = request_id(req.headers());
        let Some(conn) = req.extensions().get::<ConnInfo>().cloned() else {
            // Only connections from our own listener reach here; anything else is a bug.
            let status = tonic::Status::internal("connection identity missing");
            telemetry::rpc_finished(method, status.code(), start.elapsed());
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let audit = self.audit.clone();
        let snapshot = self.state.load_full();
        // Identity → policy → admission (in-flight caps) → quota.
        let admitted = policy::authorize(&snapshot.policy, &conn.peer, &path)
            .map_err(|denial| {
                tracing::warn!(remote = %conn.remote, method = path, reason = denial.reason(), "denied: {denial}");
                telemetry::rpc_denied(method, denial.reason());
                (denial.to_status(), denial.reason().to_owned(), None)
            })
            .and_then(|principal| match limit(&snapshot, &principal, &path) {
                Ok(permit) => Ok((principal, permit)),
                // Boxed: the refusal path is the rare one.
                Err((status, detail)) => Err((status, detail, Some(Box::new(principal)))),
            });
        match admitted {
            Err((mut status, detail, principal)) => Box::pin(async move {
                // A refusal returns no data: its record is appended without waiting for the
                // commit, so a flood of refusals cannot make others wait on the log.
                if let Some(log) = audit {
                    let call = Call {
                        peer: conn.peer,
                        principal: principal.map(|p| *p),
                        path,
                        request_id: rid.clone(),
                        started: start,
                    };
                    let rec = call.record(Facts::default(), status.code(), &detail);
                    if let Err(e) = log.append_deferred(rec).await {
                        status = audit_unavailable(&e);
                    }
                }
                telemetry::rpc_finished(method, status.code(), start.elapsed());
                Ok(with_request_id(status.into_http(), &rid))
            }),
            Ok((principal, permit)) => {
                let facts = FactsSlot::default();
                req.extensions_mut().insert(facts.clone());
                req.extensions_mut().insert(principal.clone());
                // With the audit on, the handler may commit the call's record itself,
                // together with its own write (Publish); it needs what the gate knows.
                let call = audit.is_some().then(|| {
                    let call = Arc::new(Call {
                        peer: conn.peer,
                        principal: Some(principal),
                        path,
                        request_id: rid.clone(),
                        started: start,
                    });
                    req.extensions_mut().insert(call.clone());
                    call
                });
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move {
                    let resp = inner.call(req).await?;
                    // In flight until the response head exists (streams do not hold a slot).
                    drop(permit);
                    // Trailers-only responses (errors) carry grpc-status in the headers; any
                    // other response is a success (unary) or an opened stream.
                    let code = grpc_status(resp.headers());
                    let facts = facts.take();
                    if let (Some(log), Some(call), None) = (audit, call, facts.recorded) {
                        let refusal = facts.refusal;
                        let rec = call.record(facts, code.unwrap_or(tonic::Code::Ok), refusal);
                        if let Err(e) = log.append(rec).await {
                            drop(resp);
                            let status = audit_unavailable(&e);
                            telemetry::rpc_finished(method, status.code(), start.elapsed());
                            return Ok(with_request_id(status.into_http(), &rid));
                        }
                    }
                    if let Some(code) = code {
                        telemetry::rpc_finished(method, code, start.elapsed());
                        return Ok(with_request_id(resp, &rid));
                    }
                    let resp = resp.map(|body| {
                        tonic::body::Body::new(MeteredBody {
                            inner: body,
                            method,
                            start,
                            done: false,
                        })
                    });
                    Ok(with_request_id(resp, &rid))
                })
            }
        }
    }
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

pin_project! {
    /// A response body that records the call's outcome when its trailers pass (or when it is
    /// dropped before that: the client went away).
    struct MeteredBody {
        #[pin]
        inner: tonic::body::Body,
        method: &'static str,
        start: Instant,
        done: bool,
    }

    impl PinnedDrop for MeteredBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.done {
                telemetry::rpc_finished(this.method, tonic::Code::Cancelled, this.start.elapsed());
            }
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if !*this.done {
            let code = match &frame {
                Some(Ok(f)) => f
                    .trailers_ref()
                    .map(|t| grpc_status(t).unwrap_or(tonic::Code::Ok)),
                Some(Err(s)) => Some(s.code()),
                None => Some(tonic::Code::Ok),
            };
            if let Some(code) = code {
                *this.done = true;
                telemetry::rpc_finished(this.method, code, this.start.elapsed());
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
