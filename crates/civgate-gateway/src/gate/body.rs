//! `Bodies`: every request body is bounded in time, counted against the gateway's byte
//! budget (with a fair share per agency), and read only while the connection's certificate
//! stands under the policy in force.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::Service;

use super::{CallContext, REFLECTION, Request, Response, Step, out_of_order, rate_limited};
use crate::{policy, state::Shared, telemetry};

/// Wraps each request body in its bounds.
#[derive(Clone)]
pub struct Bodies {
    state: Shared,
    limits: BodyLimits,
}

impl Bodies {
    pub fn new(state: Shared, limits: BodyLimits) -> Self {
        Self { state, limits }
    }
}

impl Step for Bodies {
    async fn run<S>(self, req: Request, mut next: S) -> Result<Response, S::Error>
    where
        S: Service<Request, Response = Response> + Send + 'static,
        S::Future: Send,
        S::Error: Send,
    {
        let Some(ctx) = CallContext::of(&req) else {
            return Ok(out_of_order("the call's context"));
        };
        let reflection = ctx.method == REFLECTION;
        let deadline = (!reflection).then(|| ctx.started + self.limits.timeout);
        let watch = BodyWatch {
            state: self.state,
            peer: ctx.conn.peer.clone(),
            owner: budget_owner(&ctx.conn.peer),
            // A bidirectional stream's further messages each cost a unit of its quota.
            bucket: crate::limits::Bucket::of_method(&ctx.path).filter(|_| reflection),
        };
        let budget = self.limits.budget;
        let max_message = self.limits.max_message;
        let req = req.map(|inner| {
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
        next.call(req).await
    }
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

    pub(crate) fn give_back(&self, owner: &str, n: usize) {
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

/// Where a request body stands in gRPC's framing (a 5-byte prefix, then that many bytes).
#[derive(Debug, Default)]
pub(super) struct Framing {
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
}

impl Framing {
    /// Reads `data`; returns the length each message prefix completed in it announces.
    pub(super) fn read(&mut self, mut data: &[u8]) -> Vec<usize> {
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
