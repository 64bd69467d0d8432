//! The gateway's client for the population directory: outbound mutual TLS with the gateway's
//! own certificate, calls spread over a few HTTP/2 connections, the caller's deadline
//! forwarded and capped, so a directory that hangs or dies costs the caller at most its
//! deadline and yields `UNAVAILABLE` or `DEADLINE_EXCEEDED`, never a hang.

use std::{
    collections::BTreeSet,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use tonic::{Code, Status};

use crate::{
    config::{Config, UpstreamSection},
    convert::field_names,
    domain::{CitizenField, PersonalId},
    link::UnaryLink,
    pb::{
        upstream::v1::{
            GetCitizensRequest, GetCitizensResponse, SearchCitizensRequest, SearchCitizensResponse,
        },
        v1::Citizen,
    },
};

const GET_CITIZENS: &str = "/civgate.upstream.v1.PopulationDirectory/GetCitizens";
const SEARCH_CITIZENS: &str = "/civgate.upstream.v1.PopulationDirectory/SearchCitizens";

/// One instance of the directory: its connections, and whether it answered its last probe.
struct Endpoint {
    url: String,
    transport: Transport,
    up: AtomicBool,
}

/// The HTTP/2 client of an endpoint (`[upstream] client`).
enum Transport {
    /// The gateway's own: calls spread over these connections.
    Links(Vec<UnaryLink>),
    /// tonic's `Channel` (one connection, multiplexed).
    Tonic(tonic::transport::Channel),
}

impl Transport {
    /// One call with `budget` (sent to the directory as `grpc-timeout`), on connection `n`
    /// (modulo their number).
    async fn call(
        &self,
        n: usize,
        path: &'static str,
        req: &(impl prost::Message + Clone + 'static),
        budget: Duration,
        traceparent: Option<&str>,
    ) -> Result<Bytes, Status> {
        match self {
            Transport::Links(links) => {
                links[n % links.len()]
                    .call_traced(path, req, budget, traceparent)
                    .await
            }
            Transport::Tonic(channel) => {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc.ready()
                    .await
                    .map_err(|e| Status::unavailable(format!("connecting: {e}")))?;
                let mut request = tonic::Request::new(req.clone());
                request.set_timeout(budget);
                if let Some(v) = traceparent.and_then(|t| t.parse().ok()) {
                    request.metadata_mut().insert("traceparent", v);
                }
                let answer = grpc
                    .unary(
                        request,
                        http::uri::PathAndQuery::from_static(path),
                        RawCodec::<_>::default(),
                    )
                    .await?;
                Ok(answer.into_inner())
            }
        }
    }
}

/// Encodes a prost message; decodes the answer to its bytes (forwarded as they are, like the
/// `h2` client's answers).
struct RawCodec<M>(std::marker::PhantomData<M>);

impl<M> Default for RawCodec<M> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

struct MessageEncoder<M>(std::marker::PhantomData<M>);

impl<M: prost::Message> tonic::codec::Encoder for MessageEncoder<M> {
    type Item = M;
    type Error = Status;
    fn encode(&mut self, item: M, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding: {e}")))
    }
}

struct BytesDecoder;

impl tonic::codec::Decoder for BytesDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl<M: prost::Message + Send + 'static> tonic::codec::Codec for RawCodec<M> {
    type Encode = M;
    type Decode = Bytes;
    type Encoder = MessageEncoder<M>;
    type Decoder = BytesDecoder;
    fn encoder(&mut self) -> Self::Encoder {
        MessageEncoder(std::marker::PhantomData)
    }
    fn decoder(&mut self) -> Self::Decoder {
        BytesDecoder
    }
}

pub(crate) struct Upstream {
    /// `[upstream] url` first, then `fallback_urls`, in order.
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    timeout: Duration,
}

impl Upstream {
    /// Prepares lazily-connected channels: the gateway starts even if the directory is down,
    /// and reconnects by itself when it comes back.
    pub fn new(config: &Config, section: &UpstreamSection) -> Result<Self> {
        let read = |p: &toml::Spanned<std::path::PathBuf>| {
            let path = config.resolve(p.get_ref());
            std::fs::read(&path).with_context(|| format!("upstream: reading {}", path.display()))
        };
        let (ca, cert, key) = (
            read(&section.ca)?,
            read(&section.cert)?,
            read(&section.key)?,
        );
        if let Some(Ok(leaf)) =
            <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::pem_slice_iter(
                &cert,
            )
            .next()
        {
            crate::telemetry::certificate_expires("upstream", &leaf);
        }
        let timeout = Duration::from_millis(section.timeout_ms);
        // One per thread of the runtime actually serving (main.rs chose it from the config).
        let serving =
            tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers());
        let mut endpoints = Vec::new();
        for url in std::iter::once(&section.url).chain(&section.fallback_urls) {
            let url = url.get_ref();
            let must = || format!("upstream url {url:?} must be https://host:port");
            let origin: http::Uri = url.parse().with_context(must)?;
            let host = origin
                .host()
                .filter(|h| !h.is_empty() && origin.scheme_str() == Some("https"))
                .with_context(must)?;
            let port = origin.port_u16().unwrap_or(443);
            let transport = match section.client {
                crate::config::UpstreamClient::H2 => Transport::Links(
                    (0..section.links(serving))
                        .map(|_| {
                            UnaryLink::new(&ca, Some((&cert, &key)), host, host, port, timeout)
                                .context("upstream.ca, upstream.cert, upstream.key")
                        })
                        .collect::<Result<_>>()?,
                ),
                crate::config::UpstreamClient::Tonic => {
                    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
                    let tls = ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(&ca))
                        .identity(Identity::from_pem(&cert, &key))
                        .domain_name(host);
                    Transport::Tonic(
                        tonic::transport::Endpoint::from_shared(url.clone())
                            .context("upstream url")?
                            .tls_config(tls)
                            .context("upstream.ca, upstream.cert, upstream.key")?
                            .connect_timeout(timeout)
                            .connect_lazy(),
                    )
                }
            };
            endpoints.push(Endpoint {
                url: url.clone(),
                transport,
                // Until a probe says otherwise.
                up: AtomicBool::new(true),
            });
        }
        Ok(Self {
            endpoints,
            next: AtomicUsize::new(0),
            timeout,
        })
    }

    /// The endpoints in the order a call tries them: those that answered their last probe
    /// first (in configuration order), then the others.
    fn order(&self) -> impl Iterator<Item = &Endpoint> {
        let up = |e: &&Endpoint| e.up.load(Ordering::Relaxed);
        self.endpoints
            .iter()
            .filter(up)
            .chain(self.endpoints.iter().filter(move |e| !up(e)))
    }

    /// One call, to the first endpoint in [`Self::order`]; when it answers UNAVAILABLE (down,
    /// refused, reset) the next is tried within what is left of `budget`. Every directory call
    /// is a read, so trying it again elsewhere is safe.
    async fn call(
        &self,
        method: &'static str,
        path: &'static str,
        req: &(impl prost::Message + Clone + 'static),
        budget: Duration,
        caller: &Caller,
    ) -> Result<Bytes, Status> {
        let started = std::time::Instant::now();
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let tries = self.endpoints.len();
        let traceparent = caller.traceparent.as_deref();
        let mut last = Status::unavailable("population directory unavailable: no endpoint");
        let mut tried = "";
        for (i, e) in self.order().enumerate() {
            let left = budget.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            tried = e.url.as_str();
            match within(
                method,
                left,
                e.transport.call(n, path, req, left, traceparent),
            )
            .await
            {
                Err(s) if s.code() == Code::Unavailable && i + 1 < tries => {
                    if e.up.swap(false, Ordering::Relaxed) {
                        tracing::warn!(
                            endpoint = e.url.as_str(),
                            "population directory endpoint failed a call: trying the next"
                        );
                    }
                    last = s;
                }
                r => {
                    if let Some(span) = &caller.span {
                        let code = r.as_ref().map_or_else(Status::code, |_| Code::Ok);
                        span.finish(method, tried, code);
                    }
                    return r;
                }
            }
        }
        if let Some(span) = &caller.span {
            span.finish(method, tried, last.code());
        }
        Err(last)
    }

    /// The time this call may take: the caller's remaining deadline less a margin (so the
    /// caller receives our DEADLINE_EXCEEDED rather than its own timer firing), capped by
    /// the config.
    fn budget(&self, caller: Option<Duration>) -> Duration {
        caller.map_or(self.timeout, |c| {
            let margin = (c / 10).min(Duration::from_millis(50));
            c.saturating_sub(margin).min(self.timeout)
        })
    }

    /// Records for `ids` with only `fields` filled (absent IDs are missing from the result).
    pub async fn get(
        &self,
        ids: &[PersonalId],
        fields: &BTreeSet<CitizenField>,
        caller: &Caller,
    ) -> Result<Vec<Citizen>, Status> {
        let raw = self.get_encoded(ids, fields, caller).await?;
        decode::<GetCitizensResponse>(raw).map(|r| r.citizens)
    }

    /// As [`Upstream::get`], the directory's `GetCitizensResponse` as it was encoded.
    pub(crate) async fn get_encoded(
        &self,
        ids: &[PersonalId],
        fields: &BTreeSet<CitizenField>,
        caller: &Caller,
    ) -> Result<Bytes, Status> {
        let budget = self.budget(caller.deadline);
        let req = GetCitizensRequest {
            personal_ids: ids.iter().map(ToString::to_string).collect(),
            fields: field_names(fields),
        };
        self.call("GetCitizens", GET_CITIZENS, &req, budget, caller)
            .await
    }

    /// Does the directory answer? An empty `GetCitizens` to every endpoint at once, within
    /// `timeout` (the contract's reachability probe); each endpoint's answer decides whether
    /// calls go to it first. True if any answered.
    pub(crate) async fn probe(self: &std::sync::Arc<Self>, timeout: Duration) -> bool {
        let budget = timeout.min(self.timeout);
        let mut probes = tokio::task::JoinSet::new();
        for i in 0..self.endpoints.len() {
            let me = self.clone();
            probes.spawn(async move { me.probe_one(i, budget).await });
        }
        let mut any = false;
        while let Some(answered) = probes.join_next().await {
            any |= answered.unwrap_or(false);
        }
        any
    }

    async fn probe_one(&self, i: usize, budget: Duration) -> bool {
        let e = &self.endpoints[i];
        let req = GetCitizensRequest::default();
        let ok = within(
            "probe",
            budget,
            e.transport.call(0, GET_CITIZENS, &req, budget, None),
        )
        .await
        .is_ok();
        let was = e.up.swap(ok, Ordering::Relaxed);
        if was != ok && self.endpoints.len() > 1 {
            if ok {
                tracing::info!(
                    endpoint = e.url.as_str(),
                    "population directory endpoint answers again"
                );
            } else {
                tracing::warn!(
                    endpoint = e.url.as_str(),
                    "population directory endpoint does not answer"
                );
            }
        }
        metrics::gauge!(crate::telemetry::UPSTREAM_ENDPOINT_UP, "url" => e.url.clone())
            .set(if ok { 1.0 } else { 0.0 });
        ok
    }

    pub async fn search(
        &self,
        folded_name: &str,
        date_of_birth: &str,
        province: Option<&str>,
        limit: u32,
        fields: &BTreeSet<CitizenField>,
        caller: &Caller,
    ) -> Result<Vec<Citizen>, Status> {
        let budget = self.budget(caller.deadline);
        let req = SearchCitizensRequest {
            folded_name: folded_name.to_owned(),
            date_of_birth: date_of_birth.to_owned(),
            province_code: province.unwrap_or_default().to_owned(),
            limit,
            fields: field_names(fields),
        };
        let raw = self
            .call("SearchCitizens", SEARCH_CITIZENS, &req, budget, caller)
            .await?;
        decode::<SearchCitizensResponse>(raw).map(|r| r.citizens)
    }
}

/// One upstream call bounded by `budget`; failures mapped for the caller; its outcome and time
/// counted under `method` (`probe` for the health probe).
async fn within(
    method: &'static str,
    budget: Duration,
    call: impl Future<Output = Result<Bytes, Status>>,
) -> Result<Bytes, Status> {
    let started = std::time::Instant::now();
    let (code, result) = match tokio::time::timeout(budget, call).await {
        Err(_) => (
            Code::DeadlineExceeded,
            Err(Status::deadline_exceeded(
                "population directory did not answer in time",
            )),
        ),
        Ok(Ok(b)) => (Code::Ok, Ok(b)),
        Ok(Err(s)) => (s.code(), Err(map_upstream_error(s))),
    };
    crate::telemetry::upstream_call(method, code, started.elapsed());
    result
}

/// An answer of the directory, decoded (`INTERNAL` if it cannot be).
pub fn decode<T: prost::Message + Default>(raw: Bytes) -> Result<T, Status> {
    T::decode(raw).map_err(|e| {
        tracing::error!(error = %e, "population directory sent an undecodable answer");
        Status::internal("population directory sent an undecodable answer")
    })
}

/// What the caller sees when the directory fails: its availability problems pass through,
/// anything else is our fault towards the directory.
fn map_upstream_error(s: Status) -> Status {
    match s.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled => {
            Status::unavailable(format!("population directory unavailable: {}", s.message()))
        }
        Code::DeadlineExceeded => {
            Status::deadline_exceeded("population directory did not answer in time")
        }
        Code::ResourceExhausted => Status::unavailable("population directory is overloaded"),
        other => {
            tracing::error!(code = ?other, message = s.message(), "population directory refused a gateway call");
            Status::internal("population directory refused the gateway's request")
        }
    }
}

/// The caller's deadline from its `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
/// What a call to the directory takes from the call that causes it: the caller's deadline
/// (`grpc-timeout`) and its trace (a child `traceparent`).
#[derive(Clone, Debug, Default)]
pub struct Caller {
    pub deadline: Option<Duration>,
    pub traceparent: Option<String>,
    /// The directory call's exported span (when spans are exported), ended by the call.
    pub span: Option<std::sync::Arc<crate::otel::ClientSpan>>,
}

impl Caller {
    pub(crate) fn of<T>(req: &tonic::Request<T>) -> Self {
        let (traceparent, span) = req
            .extensions()
            .get::<std::sync::Arc<crate::gate::CallContext>>()
            .map(|c| c.trace.child())
            .unzip();
        Self {
            deadline: caller_deadline(req.metadata()),
            traceparent,
            span: span.flatten().map(std::sync::Arc::new),
        }
    }
}

pub(crate) fn caller_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)
}

pub(crate) fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_parses() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("-1m"), None);
        assert_eq!(parse_grpc_timeout("1234567890m"), None);
    }

    #[test]
    fn upstream_errors_map_to_availability_codes() {
        assert_eq!(
            map_upstream_error(Status::unavailable("x")).code(),
            Code::Unavailable
        );
        assert_eq!(
            map_upstream_error(Status::deadline_exceeded("x")).code(),
            Code::DeadlineExceeded
        );
        assert_eq!(
            map_upstream_error(Status::invalid_argument("x")).code(),
            Code::Internal
        );
    }
}
