//! Client connections without a task per call: TCP (no delay), mutual TLS, ALPN `h2`,
//! [`Coalesced`] writes, and one HTTP/2 connection whose handle each call uses directly.
//!
//! - [`Link`] carries tonic's generated clients over hyper: `civgate bench` drives its
//!   targets through it, so the load generator takes as little of a shared machine as it can.
//! - [`UnaryLink`] makes unary gRPC calls straight on an `h2` connection: the gateway calls
//!   the population directory through it. A call is one `HEADERS` and one `DATA` frame queued
//!   from the caller's own task and an await on the answer in that same task.
//!
//! Why not a tonic `Channel`: it passes every call through a tower buffer task first — a
//! channel send and a task wake-up per call, on both ends of a proxy's forwarded call. Why
//! not hyper's client for the gateway's forwarded calls: it hands every request to its
//! connection task through a channel and spawns one task per request to await the answer and
//! usually a second one to send the body (callgrind: two `tokio::spawn` per forwarded
//! look-up).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use arc_swap::ArcSwapOption;
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderValue, Method, Uri, Version, header, uri::PathAndQuery};
use hyper::client::conn::http2;
use rustls_pki_types::ServerName;
use tonic::Status;

use crate::coalesce::Coalesced;

type Tls = Coalesced<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Sender = http2::SendRequest<tonic::body::Body>;

/// How often an idle connection is pinged, and how long the answer may take before the
/// connection is given up (the next call dials again).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Dials: TCP (no delay), TLS (with a client certificate if given), ALPN `h2`, coalesced writes.
#[derive(Clone)]
struct Connector {
    tls: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl Connector {
    async fn dial(&self, host: &str, port: u16) -> std::io::Result<Tls> {
        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let tls = self.tls.connect(self.name.clone(), tcp).await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(std::io::Error::other(
                "the server did not agree to HTTP/2 (ALPN h2)",
            ));
        }
        Ok(Coalesced::new(tls))
    }
}

/// The handle calls take from a live HTTP/2 connection; `handshake` spawns the task that
/// drives the connection.
trait Handle: Clone + Send + Sync + Sized + 'static {
    fn handshake(io: Tls) -> impl Future<Output = Result<Self, String>> + Send;
    fn is_closed(&self) -> bool;
}

impl Handle for Sender {
    async fn handshake(io: Tls) -> Result<Self, String> {
        let (send, conn) = http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP/2 connection ended");
            }
        });
        Ok(send)
    }

    fn is_closed(&self) -> bool {
        http2::SendRequest::is_closed(self)
    }
}

/// One HTTP/2 connection, dialled on first use and again once it has closed (a client built
/// while its server is down follows it when it comes back).
struct Dialer<H> {
    connector: Connector,
    host: String,
    port: u16,
    connect_timeout: Duration,
    current: ArcSwapOption<H>,
    /// One dial at a time; calls arriving meanwhile wait for its connection.
    dialing: tokio::sync::Mutex<()>,
}

impl<H: Handle> Dialer<H> {
    /// A dialer for `host:port` whose certificate must name `server_name` and chain to
    /// `ca_pem`; it presents `identity` (PEM certificate and key) if given. Nothing is
    /// dialled yet.
    fn new(
        ca_pem: &[u8],
        identity: Option<(&[u8], &[u8])>,
        server_name: &str,
        host: &str,
        port: u16,
        connect_timeout: Duration,
    ) -> Result<Self> {
        let cfg = crate::tls::client_config(ca_pem, identity)?;
        let connector = Connector {
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            name: ServerName::try_from(server_name.to_owned())
                .with_context(|| format!("{server_name:?} is not a server name"))?,
        };
        Ok(Self {
            connector,
            host: host.to_owned(),
            port,
            connect_timeout,
            current: ArcSwapOption::empty(),
            dialing: tokio::sync::Mutex::new(()),
        })
    }

    /// `https://host:port`.
    fn origin(&self) -> Uri {
        Uri::builder()
            .scheme("https")
            .authority(format!("{}:{}", self.host, self.port))
            .path_and_query("/")
            .build()
            .unwrap_or_default()
    }

    fn open(&self) -> Option<H> {
        self.current
            .load()
            .as_deref()
            .filter(|s| !s.is_closed())
            .cloned()
    }

    /// The live connection's handle, dialling one if there is none (`UNAVAILABLE` if that
    /// fails).
    async fn handle(&self) -> Result<H, Status> {
        if let Some(s) = self.open() {
            return Ok(s);
        }
        let _turn = self.dialing.lock().await;
        if let Some(s) = self.open() {
            return Ok(s);
        }
        let unreachable = |e: &dyn std::fmt::Display| {
            Status::unavailable(format!("{}:{} unreachable: {e}", self.host, self.port))
        };
        let io = tokio::time::timeout(
            self.connect_timeout,
            self.connector.dial(&self.host, self.port),
        )
        .await
        .map_err(|_| unreachable(&"connect timed out"))?
        .map_err(|e| unreachable(&e))?;
        let handle = H::handshake(io).await.map_err(|e| unreachable(&e))?;
        self.current.store(Some(Arc::new(handle.clone())));
        Ok(handle)
    }
}

/// A connection for tonic's generated clients (over hyper). Cheap to clone; clones share the
/// connection.
#[derive(Clone)]
pub struct Link(Arc<Dialer<Sender>>);

impl Link {
    /// A link to `host:port` whose certificate must name `server_name` and chain to
    /// `ca_pem`; it presents `identity` (PEM certificate and key) if given. Nothing is
    /// dialled yet.
    pub fn new(
        ca_pem: &[u8],
        identity: Option<(&[u8], &[u8])>,
        server_name: &str,
        host: &str,
        port: u16,
        connect_timeout: Duration,
    ) -> Result<Self> {
        Dialer::new(ca_pem, identity, server_name, host, port, connect_timeout)
            .map(|d| Self(Arc::new(d)))
    }

    /// `https://host:port`: the origin generated clients put on requests (`with_origin`).
    pub fn origin(&self) -> Uri {
        self.0.origin()
    }

    /// Dials now if there is no live connection (`UNAVAILABLE` if that fails).
    pub async fn connect(&self) -> Result<(), Status> {
        self.0.handle().await.map(drop)
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Link {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send + 'static>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let mut send = this.0.handle().await?;
            Ok(send.send_request(req).await?)
        })
    }
}

/// The handle of a bare `h2` connection and whether its task has ended.
#[derive(Clone)]
struct H2 {
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl Handle for H2 {
    async fn handshake(io: Tls) -> Result<Self, String> {
        // hyper's client defaults: answers of any size the gateway asks for arrive without
        // waiting for window updates.
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(2 << 20)
            .initial_connection_window_size(5 << 20)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| e.to_string())?;
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let pings = conn.ping_pong();
        tokio::spawn(async move {
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "HTTP/2 connection ended");
                    }
                }
                () = keep_alive(pings) => {
                    tracing::warn!("population directory connection: keep-alive ping unanswered; closing it");
                }
            }
            flag.store(true, Ordering::Release);
        });
        Ok(Self { send, closed })
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Pings every [`KEEP_ALIVE_INTERVAL`]; returns when a ping goes unanswered for
/// [`KEEP_ALIVE_TIMEOUT`] (never, if the connection gave no ping handle).
async fn keep_alive(pings: Option<h2::PingPong>) {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEP_ALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEP_ALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "keep-alive ping failed");
                return;
            }
            Err(_) => return,
        }
    }
}

/// Largest answer a [`UnaryLink`] call accepts (tonic's default decoding limit).
pub(crate) const MAX_ANSWER: usize = 4 << 20;

/// Unary gRPC calls on one bare HTTP/2 connection. Cheap to clone; clones share the
/// connection.
#[derive(Clone)]
pub struct UnaryLink {
    dialer: Arc<Dialer<H2>>,
    authority: http::uri::Authority,
}

impl UnaryLink {
    /// As [`Link::new`].
    pub fn new(
        ca_pem: &[u8],
        identity: Option<(&[u8], &[u8])>,
        server_name: &str,
        host: &str,
        port: u16,
        connect_timeout: Duration,
    ) -> Result<Self> {
        let dialer = Dialer::new(ca_pem, identity, server_name, host, port, connect_timeout)?;
        let authority = dialer
            .origin()
            .authority()
            .cloned()
            .with_context(|| format!("{host}:{port} is not a host and port"))?;
        Ok(Self {
            dialer: Arc::new(dialer),
            authority,
        })
    }

    /// Dials now if there is no live connection (`UNAVAILABLE` if that fails).
    pub async fn connect(&self) -> Result<(), Status> {
        self.dialer.handle().await.map(drop)
    }

    /// Calls `path` (`/package.Service/Method`) with `request`, telling the server it has
    /// `timeout` (`grpc-timeout`); returns the answer's message bytes. The caller bounds the
    /// wait; dropping the returned future resets the stream. Transport failures are
    /// `UNAVAILABLE`; the server's own status comes back as it sent it.
    pub async fn call(
        &self,
        path: &'static str,
        request: &impl prost::Message,
        timeout: Duration,
    ) -> Result<Bytes, Status> {
        self.call_traced(path, request, timeout, None).await
    }

    /// [`call`](Self::call), with a W3C `traceparent` header when given.
    pub async fn call_traced(
        &self,
        path: &'static str,
        request: &impl prost::Message,
        timeout: Duration,
        traceparent: Option<&str>,
    ) -> Result<Bytes, Status> {
        let handle = self.dialer.handle().await?;
        let mut send = handle.send.ready().await.map_err(transport)?;
        let mut head = self.request(path, timeout)?;
        if let Some(v) = traceparent.and_then(|t| HeaderValue::from_str(t).ok()) {
            head.headers_mut().insert("traceparent", v);
        }
        let (answer, mut body) = send.send_request(head, false).map_err(transport)?;
        body.send_data(frame(request), true).map_err(transport)?;
        let (head, mut stream) = answer.await.map_err(transport)?.into_parts();
        if head.status != http::StatusCode::OK {
            return Err(http_status(head.status));
        }
        // Trailers-only: an error (or an OK without a message, which is malformed).
        if let Some(status) = Status::from_header_map(&head.headers) {
            return Err(status_or_missing(status));
        }
        let mut message = Answer::default();
        while let Some(chunk) = stream.data().await {
            let chunk = chunk.map_err(transport)?;
            let _ = stream.flow_control().release_capacity(chunk.len());
            message.push(chunk)?;
        }
        let trailers = stream.trailers().await.map_err(transport)?;
        match trailers.as_ref().and_then(Status::from_header_map) {
            Some(s) if s.code() == tonic::Code::Ok => message.finish(),
            Some(s) => Err(s),
            None => Err(Status::internal(
                "the answer ended without a grpc-status trailer",
            )),
        }
    }

    fn request(&self, path: &'static str, timeout: Duration) -> Result<http::Request<()>, Status> {
        let uri = Uri::builder()
            .scheme("https")
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::from_static(path))
            .build()
            .map_err(|e| Status::internal(format!("request URI: {e}")))?;
        let mut req = http::Request::new(());
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_2;
        let h = req.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("grpc-timeout", grpc_timeout(timeout));
        Ok(req)
    }
}

/// `grpc-timeout` in whole milliseconds (at least 1; 8 digits at most, as the spec allows).
fn grpc_timeout(t: Duration) -> HeaderValue {
    let ms = t.as_millis().clamp(1, 99_999_999);
    HeaderValue::from_str(&format!("{ms}m")).unwrap_or_else(|_| HeaderValue::from_static("1m"))
}

/// One length-prefixed, uncompressed gRPC message.
fn frame(m: &impl prost::Message) -> Bytes {
    let len = m.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(0);
    b.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    m.encode_raw(&mut b);
    b.freeze()
}

/// The body of an answer, as it arrives: exactly one uncompressed message, at most
/// [`MAX_ANSWER`] bytes.
#[derive(Default)]
struct Answer {
    /// The first chunk as it came (usually the whole body), later ones appended to a copy.
    first: Option<Bytes>,
    rest: Option<BytesMut>,
}

impl Answer {
    fn len(&self) -> usize {
        self.rest
            .as_ref()
            .map_or_else(|| self.first.as_ref().map_or(0, Bytes::len), BytesMut::len)
    }

    fn push(&mut self, chunk: Bytes) -> Result<(), Status> {
        if self.len() + chunk.len() > MAX_ANSWER + 5 {
            return Err(Status::resource_exhausted(format!(
                "answer larger than {MAX_ANSWER} bytes"
            )));
        }
        match (&mut self.first, &mut self.rest) {
            (None, _) => self.first = Some(chunk),
            (Some(_), Some(rest)) => rest.extend_from_slice(&chunk),
            (Some(first), None) => {
                let mut rest = BytesMut::with_capacity(first.len() + chunk.len());
                rest.extend_from_slice(first);
                rest.extend_from_slice(&chunk);
                self.rest = Some(rest);
            }
        }
        Ok(())
    }

    /// The message bytes, without the 5-byte prefix.
    fn finish(self) -> Result<Bytes, Status> {
        let body = match (self.first, self.rest) {
            (_, Some(rest)) => rest.freeze(),
            (Some(first), None) => first,
            (None, None) => return Err(Status::internal("the answer carried no message")),
        };
        unframe(body)
    }
}

fn unframe(body: Bytes) -> Result<Bytes, Status> {
    let Some((&[flag, a, b, c, d], _)) = body.split_first_chunk::<5>() else {
        return Err(Status::internal("the answer's message prefix is cut short"));
    };
    if flag != 0 {
        return Err(Status::internal(
            "the answer is compressed, which the gateway did not ask for",
        ));
    }
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if body.len() - 5 != len {
        return Err(Status::internal(format!(
            "the answer must be exactly one message of {len} bytes; its body holds {}",
            body.len() - 5
        )));
    }
    Ok(body.slice(5..))
}

fn transport(e: h2::Error) -> Status {
    Status::unavailable(format!("connection failed: {e}"))
}

/// A non-200 HTTP status, as gRPC maps it.
fn http_status(s: http::StatusCode) -> Status {
    let code = match s.as_u16() {
        400 => tonic::Code::Internal,
        401 => tonic::Code::Unauthenticated,
        403 => tonic::Code::PermissionDenied,
        404 => tonic::Code::Unimplemented,
        429 | 502..=504 => tonic::Code::Unavailable,
        _ => tonic::Code::Unknown,
    };
    Status::new(code, format!("HTTP status {s}"))
}

fn status_or_missing(s: Status) -> Status {
    if s.code() == tonic::Code::Ok {
        Status::internal("the answer carried no message")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(flag: u8, len: u32, payload: &[u8]) -> Bytes {
        let mut b = vec![flag];
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        Bytes::from(b)
    }

    #[test]
    fn one_message_is_unframed() {
        assert_eq!(
            unframe(framed(0, 3, b"abc")).ok(),
            Some(Bytes::from_static(b"abc"))
        );
        assert_eq!(unframe(framed(0, 0, b"")).ok(), Some(Bytes::new()));
    }

    #[test]
    fn bad_frames_are_internal_errors() {
        for body in [
            framed(1, 3, b"abc"),
            framed(0, 4, b"abc"),
            framed(0, 2, b"abc"),
            framed(0, 1, b"a").slice(..3),
        ] {
            assert_eq!(
                unframe(body).map_err(|s| s.code()),
                Err(tonic::Code::Internal)
            );
        }
    }

    #[test]
    fn an_answer_in_chunks_is_joined() {
        let whole = framed(0, 5, b"hello");
        let mut a = Answer::default();
        for part in [whole.slice(..2), whole.slice(2..7), whole.slice(7..)] {
            a.push(part).ok();
        }
        assert_eq!(a.finish().ok(), Some(Bytes::from_static(b"hello")));
        let mut single = Answer::default();
        single.push(whole.clone()).ok();
        assert_eq!(single.finish().ok(), Some(Bytes::from_static(b"hello")));
        assert_eq!(
            Answer::default().finish().map_err(|s| s.code()),
            Err(tonic::Code::Internal)
        );
    }

    #[test]
    fn an_oversized_answer_is_refused() {
        let mut a = Answer::default();
        let big = Bytes::from(vec![0u8; MAX_ANSWER]);
        assert!(a.push(big.clone()).is_ok());
        assert_eq!(
            a.push(big).map_err(|s| s.code()),
            Err(tonic::Code::ResourceExhausted)
        );
    }

    #[test]
    fn frames_and_timeouts_are_encoded() {
        let m = crate::pb::upstream::v1::GetCitizensRequest {
            personal_ids: vec!["001200000001".into()],
            fields: vec![],
        };
        let f = frame(&m);
        assert_eq!(f[0], 0);
        assert_eq!(
            unframe(f).ok(),
            Some(Bytes::from(prost::Message::encode_to_vec(&m)))
        );
        assert_eq!(grpc_timeout(Duration::from_millis(250)), "250m");
        assert_eq!(grpc_timeout(Duration::ZERO), "1m");
        assert_eq!(grpc_timeout(Duration::from_secs(1_000_000)), "99999999m");
    }

    #[test]
    fn http_errors_map_as_grpc_says() {
        assert_eq!(
            http_status(http::StatusCode::SERVICE_UNAVAILABLE).code(),
            tonic::Code::Unavailable
        );
        assert_eq!(
            http_status(http::StatusCode::NOT_FOUND).code(),
            tonic::Code::Unimplemented
        );
        assert_eq!(
            http_status(http::StatusCode::IM_A_TEAPOT).code(),
            tonic::Code::Unknown
        );
    }
}
