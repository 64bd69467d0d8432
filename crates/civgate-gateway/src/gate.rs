//! The tower layer in front of every service: identity → policy (→ rate limit, audit: later
//! issues) → handler, and per-method metrics. Thin: decisions are in `policy`.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
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
    bodies: BodyLimits,
}

impl GateLayer {
    pub fn new(state: Shared, audit: Option<AuditLog>, bodies: BodyLimits) -> Self {
        Self {
            state,
            audit,
            bodies,
        }
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            state: self.state.clone(),
            audit: self.audit.clone(),
            bodies: self.bodies.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    state: Shared,
    audit: Option<AuditLog>,
    bodies: BodyLimits,
}

/// Bounds on request bodies: how long one may take to arrive, and how many bytes of
/// unfinished bodies the gateway holds in all.
#[derive(Clone, Debug)]
pub struct BodyLimits {
    pub timeout: Duration,
    pub budget: Arc<ByteBudget>,
    /// The largest message decoded (a larger announced length is refused by the decoder).
    pub max_message: usize,
}

impl BodyLimits {
    pub fn new(limits: &crate::config::LimitsSection) -> Self {
        Self {
            timeout: Duration::from_millis(limits.request_body_timeout_ms.max(1)),
            budget: Arc::new(ByteBudget::new(limits.max_buffered_request_bytes)),
            max_message: limits.max_message_bytes,
        }
    }
}

/// Request bytes held for bodies not yet complete, against a fixed budget. One owner (agency)
/// holds at most half of it, and once more than half is held, each owner holding bytes at
/// most an equal share: one agency cannot take the budget from the others.
#[derive(Debug)]
pub struct ByteBudget {
    max: usize,
    held: std::sync::Mutex<BudgetHeld>,
}

#[derive(Debug, Default)]
struct BudgetHeld {
    total: usize,
    by_owner: std::collections::HashMap<String, usize>,
}

impl ByteBudget {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            held: Default::default(),
        }
    }

    /// Takes `n` bytes for `owner`, or nothing if that would pass the budget or, past half
    /// of it, the owner's equal share.
    pub fn take(&self, owner: &str, n: usize) -> bool {
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let total = h.total.saturating_add(n);
        if total > self.max {
            return false;
        }
        let mine = h.by_owner.get(owner).copied().unwrap_or(0);
        // Never more than half for one owner: the other half stays for everyone else.
        if (mine + n) * 2 > self.max {
            return false;
        }
        if total * 2 > self.max {
            let owners = h.by_owner.len() + usize::from(mine == 0);
            if mine + n > self.max.div_ceil(owners.max(1)) {
                return false;
            }
        }
        h.total = total;
        *h.by_owner.entry(owner.to_owned()).or_insert(0) += n;
        true
    }

    pub fn give_back(&self, owner: &str, n: usize) {
        if n == 0 {
            return;
        }
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        h.total = h.total.saturating_sub(n);
        if let Some(m) = h.by_owner.get_mut(owner) {
            *m = m.saturating_sub(n);
            if *m == 0 {
                h.by_owner.remove(owner);
            }
        }
    }

    pub fn held(&self) -> usize {
        self.held.lock().map(|h| h.total).unwrap_or(0)
    }
}

/// Whose share of the byte budget a body counts in: its agency, or its certificate.
fn budget_owner(peer: &crate::identity::PeerIdentity) -> String {
    match &peer.agency {
        Ok(a) => a.as_str().to_owned(),
        Err(_) => peer.fingerprint.to_hex(),
    }
}

/// What a body is read against besides its own bounds: the connection's certificate under
/// the policy in force (a reload may revoke it while the body arrives), and, for a
/// bidirectional stream, the quota its further messages draw from.
struct BodyWatch {
    state: Shared,
    peer: Arc<crate::identity::PeerIdentity>,
    owner: String,
    bucket: Option<crate::limits::Bucket>,
}

impl BodyWatch {
    /// Refuses the rest of the body once the certificate no longer stands.
    fn standing(&self) -> Result<(), tonic::Status> {
        policy::standing(&self.state.load().policy, &self.peer, policy::unix_now())
            .map_err(|d| d.to_status())
    }

    /// A further message of a stream: one more unit of its quota.
    fn another_message(&self) -> Result<(), tonic::Status> {
        let (Some(bucket), Ok(agency)) = (self.bucket, &self.peer.agency) else {
            return Ok(());
        };
        match self.state.load().quotas.check(agency, bucket) {
            crate::limits::Decision::Refuse { retry_after_secs } => {
                telemetry::rate_limited(agency.as_str(), bucket.as_str(), false);
                Err(rate_limited(agency, bucket.as_str(), retry_after_secs))
            }
            _ => Ok(()),
        }
    }
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

/// gRPC is POST with an `application/grpc*` content type; anything else is answered with the
/// HTTP status gRPC servers use (405, 415) before identity or policy is looked at.
pub fn http_refusal(method: &http::Method, headers: &http::HeaderMap) -> Option<http::StatusCode> {
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

/// The `x-request-id` a caller sent (1–128 visible ASCII characters), or a fresh one.
fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| format!("{:032x}", rand::random::<u128>()), str::to_owned)
}

/// What an admitted call holds until its response head exists: its places under the
/// in-flight caps (this replica's, and its agency's across replicas when they share limits).
pub struct Held {
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

/// RESOURCE_EXHAUSTED with `retry-after` (whole seconds) and a `google.rpc.RetryInfo`.
pub fn rate_limited(
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

impl<S> Service<http::Request<tonic::body::Body>> for Gate<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let start = Instant::now();
        if let Some(refused) = http_refusal(req.method(), req.headers()) {
            telemetry::http_refused(refused.as_u16());
            let mut resp = http::Response::new(tonic::body::Body::empty());
            *resp.status_mut() = refused;
            if refused == http::StatusCode::METHOD_NOT_ALLOWED {
                resp.headers_mut()
                    .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            }
            return Box::pin(async move { Ok(resp) });
        }
        let path = bounded_path(req.uri().path());
        let method = policy::known_method(&path).unwrap_or("unknown");
        let rid = request_id(req.headers());
        let Some(conn) = req.extensions().get::<ConnInfo>().cloned() else {
            // Only connections from our own listener reach here; anything else is a bug.
            let status = tonic::Status::internal("connection identity missing");
            telemetry::rpc_finished(method, status.code(), start.elapsed());
            return Box::pin(async move { Ok(status.into_http()) });
        };
        // Every request body is bounded in time, counted against the byte budget (with a fair
        // share per agency), and read only while the connection's certificate stays good.
        let deadline = (method != REFLECTION).then(|| start + self.bodies.timeout);
        let budget = self.bodies.budget.clone();
        let max_message = self.bodies.max_message;
        let watch = BodyWatch {
            state: self.state.clone(),
            peer: conn.peer.clone(),
            owner: budget_owner(&conn.peer),
            // A bidirectional stream's further messages each cost a unit of its quota.
            bucket: crate::limits::Bucket::of_method(&path).filter(|_| method == REFLECTION),
        };
        let mut req = req.map(|inner| {
            tonic::body::Body::new(LimitedBody {
                inner,
                budget,
                held: 0,
                framing: Framing::default(),
                messages: 0,
                max_message,
                watch,
                deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d.into()))),
            })
        });
        let audit = self.audit.clone();
        let snapshot = self.state.load_full();
        // Identity → policy, here; admission (in-flight caps) → quota, in the future (a
        // shared decision asks Redis).
        let principal = match policy::authorize(&snapshot.policy, &conn.peer, &path) {
            Ok(p) => p,
            Err(denial) => {
                telemetry::rpc_denied(method, denial.reason());
                let refusal = Refusal {
                    status: denial.to_status(),
                    detail: denial.reason().to_owned(),
                    principal: None,
                };
                return Box::pin(refuse(refusal, snapshot, audit, conn, path, rid, start));
            }
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let permit = match limit(&snapshot, &principal, &path).await {
                Ok(p) => p,
                Err((status, detail)) => {
                    let refusal = Refusal {
                        status,
                        detail,
                        principal: Some(principal),
                    };
                    return refuse(refusal, snapshot, audit, conn, path, rid, start).await;
                }
            };
            let facts = FactsSlot::default();
            req.extensions_mut().insert(facts.clone());
            req.extensions_mut().insert(principal.clone());
            // With the audit on, the handler may commit the call's record itself, together
            // with its own write (Publish); it needs what the gate knows.
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
            let mut resp = inner.call(req).await?;
            // In flight until the response head exists (streams do not hold a slot).
            drop(permit);
            // Trailers-only responses (errors) carry grpc-status in the headers; any other
            // response is a success (unary) or an opened stream.
            let mut code = grpc_status(resp.headers());
            if code == Some(tonic::Code::OutOfRange) {
                // tonic's "decoded message length too large": by gRPC's convention a message
                // over the limit is RESOURCE_EXHAUSTED (no handler of ours answers
                // OUT_OF_RANGE).
                resp.headers_mut()
                    .insert("grpc-status", http::HeaderValue::from_static("8"));
                code = Some(tonic::Code::ResourceExhausted);
            }
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

/// A call refused before its handler: the answer, the audit detail, and who (once known).
struct Refusal {
    status: tonic::Status,
    detail: String,
    principal: Option<Principal>,
}

/// Answers a refused call. Refusals are metered per certificate: past the meter they get the
/// same answer, counted, without a record or a log line each (a flood of them would
/// otherwise fill the audit log and the logs).
async fn refuse<E>(
    refusal: Refusal,
    snapshot: Arc<crate::state::Snapshot>,
    audit: Option<AuditLog>,
    conn: ConnInfo,
    path: String,
    rid: String,
    start: Instant,
) -> Result<http::Response<tonic::body::Body>, E> {
    let Refusal {
        mut status,
        detail,
        principal,
    } = refusal;
    let method = policy::known_method(&path).unwrap_or("unknown");
    if !snapshot.refusals.record(&conn.peer.fingerprint) {
        telemetry::refusal_unrecorded(method);
        telemetry::rpc_finished(method, status.code(), start.elapsed());
        return Ok(with_request_id(status.into_http(), &rid));
    }
    tracing::warn!(
        remote = %conn.remote,
        method = path,
        agency = principal.as_ref().map(|p| p.agency.as_str()),
        "refused: {}: {}",
        detail,
        status.message()
    );
    // A refusal returns no data: its record is appended without waiting for the commit, so
    // a flood of refusals cannot make others wait on the log.
    if let Some(log) = audit {
        let call = Call {
            peer: conn.peer,
            principal,
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

/// The reflection stream is bidirectional and long-lived: its body has no overall deadline.
const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";

/// Where a request body stands in gRPC's framing (a 5-byte prefix, then that many bytes).
#[derive(Debug, Default)]
struct Framing {
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
}

impl Framing {
    /// Reads `data`; returns the length each message prefix completed in it announces.
    fn read(&mut self, mut data: &[u8]) -> Vec<usize> {
        let mut announced = Vec::new();
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            data = &data[n..];
            if self.prefix_len == 5 {
                self.prefix_len = 0;
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]) as usize;
                self.remaining = len;
                announced.push(len);
            }
        }
        announced
    }
}

pin_project! {
    /// A request body that must end by its deadline and whose messages count against the
    /// gateway's byte budget by the length their prefix announces (the decoder makes room
    /// for that much at once), until the next message starts or the body ends.
    struct LimitedBody {
        #[pin]
        inner: tonic::body::Body,
        budget: Arc<ByteBudget>,
        held: usize,
        framing: Framing,
        // Messages whose prefix has arrived.
        messages: u64,
        max_message: usize,
        watch: BodyWatch,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    impl PinnedDrop for LimitedBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.budget.give_back(&this.watch.owner, std::mem::take(this.held));
        }
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let frame = match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if let Some(d) = this.deadline.as_mut()
                    && d.as_mut().poll(cx).is_ready()
                {
                    telemetry::body_refused("timeout");
                    this.budget
                        .give_back(&this.watch.owner, std::mem::take(this.held));
                    return Poll::Ready(Some(Err(tonic::Status::deadline_exceeded(
                        "the request body did not arrive in time",
                    ))));
                }
                return Poll::Pending;
            }
        };
        let owner = this.watch.owner.as_str();
        if let Some(Ok(f)) = &frame
            && let Some(data) = f.data_ref()
        {
            // Read only while the certificate stands: a reload that revokes it stops calls
            // whose body was still arriving.
            if let Err(status) = this.watch.standing() {
                this.budget.give_back(owner, std::mem::take(this.held));
                return Poll::Ready(Some(Err(status)));
            }
            for len in this.framing.read(data) {
                *this.messages += 1;
                if *this.messages > 1
                    && let Err(status) = this.watch.another_message()
                {
                    this.budget.give_back(owner, std::mem::take(this.held));
                    return Poll::Ready(Some(Err(status)));
                }
                // The message before this one has been decoded: its bytes are free.
                this.budget.give_back(owner, std::mem::take(this.held));
                // A length over the limit is refused by the decoder at once.
                let charge = len.min(*this.max_message) + 5;
                if !this.budget.take(owner, charge) {
                    telemetry::body_refused("budget");
                    return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(
                        "the gateway is holding too many unfinished requests; retry shortly",
                    ))));
                }
                *this.held = charge;
            }
        }
        // The body is over: tonic decodes it now, the bytes are no longer ours to count.
        if frame.is_none() || matches!(frame, Some(Err(_))) || this.inner.is_end_stream() {
            this.budget.give_back(owner, std::mem::take(this.held));
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

#[cfg(test)]
mod tests;
