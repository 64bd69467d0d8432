//! The tower layer in front of every service: identity → policy (→ rate limit, audit: later
//! issues) → handler, and per-method metrics. Thin: decisions are in `policy`.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::{listener::ConnInfo, policy, state::Shared, telemetry};

#[derive(Clone)]
pub struct GateLayer {
    state: Shared,
}

impl GateLayer {
    pub fn new(state: Shared) -> Self {
        Self { state }
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    state: Shared,
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
        let path = req.uri().path();
        let method = policy::known_method(path).unwrap_or("unknown");
        let decision = match req.extensions().get::<ConnInfo>() {
            Some(conn) => policy::authorize(&self.state.load().policy, &conn.peer, path)
                .map_err(|d| (d, conn.remote)),
            None => {
                // Only connections from our own listener reach here; anything else is a bug.
                let status = tonic::Status::internal("connection identity missing");
                telemetry::rpc_finished(method, status.code(), start.elapsed());
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        match decision {
            Err((denial, remote)) => {
                tracing::warn!(%remote, method = path, reason = denial.reason(), "denied: {denial}");
                telemetry::rpc_denied(method, denial.reason());
                let status = denial.to_status();
                telemetry::rpc_finished(method, status.code(), start.elapsed());
                Box::pin(async move { Ok(status.into_http()) })
            }
            Ok(principal) => {
                req.extensions_mut().insert(principal);
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move {
                    let resp = inner.call(req).await?;
                    // Trailers-only responses (errors) carry grpc-status in the headers.
                    if let Some(code) = grpc_status(resp.headers()) {
                        telemetry::rpc_finished(method, code, start.elapsed());
                        return Ok(resp);
                    }
                    Ok(resp.map(|body| {
                        tonic::body::Body::new(MeteredBody {
                            inner: body,
                            method,
                            start,
                            done: false,
                        })
                    }))
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
