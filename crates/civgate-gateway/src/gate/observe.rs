//! The outer layers: `GrpcOnly` (HTTP-level refusals) and `Observe` (the call's context,
//! per-method metrics, the request id).

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::Service;

use super::{CallContext, Request, Response, Step, bounded_path, grpc_status, outcome};
use crate::{listener::ConnInfo, policy, state::Shared, telemetry};

/// gRPC is POST with an `application/grpc*` content type; anything else is answered with the
/// HTTP status gRPC servers use (405, 415) before identity or policy is looked at.
#[derive(Clone, Copy)]
pub struct GrpcOnly;

impl Step for GrpcOnly {
    async fn run<S>(self, req: Request, mut next: S) -> Result<Response, S::Error>
    where
        S: Service<Request, Response = Response> + Send + 'static,
        S::Future: Send,
        S::Error: Send,
    {
        let Some(refused) = http_refusal(req.method(), req.headers()) else {
            return next.call(req).await;
        };
        telemetry::http_refused(refused.as_u16());
        let mut resp = http::Response::new(tonic::body::Body::empty());
        *resp.status_mut() = refused;
        if refused == http::StatusCode::METHOD_NOT_ALLOWED {
            resp.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
        }
        Ok(resp)
    }
}

/// The HTTP status a request that is not gRPC gets, if it is not.
pub(super) fn http_refusal(
    method: &http::Method,
    headers: &http::HeaderMap,
) -> Option<http::StatusCode> {
    if method != http::Method::POST {
        return Some(http::StatusCode::METHOD_NOT_ALLOWED);
    }
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v == "application/grpc"
                || v.starts_with("application/grpc+")
                || v.starts_with("application/grpc;")
        });
    (!grpc).then_some(http::StatusCode::UNSUPPORTED_MEDIA_TYPE)
}

/// Puts the [`CallContext`] on the request, and meters the call by method and outcome when
/// its answer ends (a stream's trailers, or its drop: the client went away). The answer carries
/// the request id.
#[derive(Clone)]
pub struct Observe {
    state: Shared,
    /// Each call's span, when spans are exported.
    spans: Option<crate::otel::Spans>,
}

impl Observe {
    pub fn new(state: Shared, spans: Option<crate::otel::Spans>) -> Self {
        Self { state, spans }
    }
}

impl Step for Observe {
    async fn run<S>(self, mut req: Request, mut next: S) -> Result<Response, S::Error>
    where
        S: Service<Request, Response = Response> + Send + 'static,
        S::Future: Send,
        S::Error: Send,
    {
        let started = Instant::now();
        let path = bounded_path(req.uri().path());
        let method = policy::known_method(&path).unwrap_or("unknown");
        let request_id = request_id(req.headers());
        let Some(conn) = req.extensions().get::<ConnInfo>().cloned() else {
            // Only connections from our own listener reach here; anything else is a bug.
            let status = tonic::Status::internal("connection identity missing");
            telemetry::rpc_finished(method, status.code(), started.elapsed());
            return Ok(status.into_http());
        };
        let trace =
            crate::trace::TraceContext::from_headers(req.headers(), self.spans.as_ref(), &path);
        let ctx = std::sync::Arc::new(CallContext {
            started,
            path,
            method,
            request_id: request_id.clone(),
            trace,
            conn,
            snapshot: self.state.load_full(),
        });
        req.extensions_mut().insert(ctx.clone());
        let mut resp = next.call(req).await?;
        let resp = match outcome(&mut resp) {
            Some(code) => {
                finished(&ctx, code);
                resp
            }
            None => resp.map(|inner| {
                tonic::body::Body::new(MeteredBody {
                    inner,
                    ctx,
                    done: false,
                })
            }),
        };
        Ok(with_request_id(resp, &request_id))
    }
}

/// A call ended with `code`: its metrics, and one access log line (target `civgate::access`,
/// level info: `RUST_LOG=info,civgate::access=off` turns it off) with the request id, the
/// trace id, the agency its certificate names, the method, the outcome and the time.
fn finished(ctx: &CallContext, code: tonic::Code) {
    let elapsed = ctx.started.elapsed();
    telemetry::rpc_finished(ctx.method, code, elapsed);
    let agency = ctx.conn.peer.agency.as_ref().map_or("", |a| a.as_str());
    ctx.trace
        .finish(code, agency, &ctx.request_id, ctx.conn.remote);
    tracing::info!(
        target: crate::telemetry::ACCESS_TARGET,
        request_id = ctx.request_id.as_str(),
        trace_id = ctx.trace.trace_id(),
        remote = %ctx.conn.remote,
        agency,
        method = ctx.path.as_str(),
        code = telemetry::code_name(code),
        ms = elapsed.as_secs_f64() * 1e3,
        "call"
    );
}

/// The `x-request-id` a caller sent (1–128 visible ASCII characters), or a fresh one.
fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| format!("{:032x}", rand::random::<u128>()), str::to_owned)
}

fn with_request_id(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = http::HeaderValue::from_str(id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

pin_project! {
    /// A response body that records the call's outcome when its trailers pass (or when it is
    /// dropped before that: the client went away).
    struct MeteredBody {
        #[pin]
        inner: tonic::body::Body,
        ctx: std::sync::Arc<CallContext>,
        done: bool,
    }

    impl PinnedDrop for MeteredBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.done {
                finished(this.ctx, tonic::Code::Cancelled);
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
                finished(this.ctx, code);
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
