//! A gRPC client connection without a buffer task: TCP (no delay), mutual TLS, ALPN `h2`,
//! [`Coalesced`] writes, and one HTTP/2 connection whose handle each call uses directly. The
//! gateway calls the population directory through it; `civgate bench` drives its targets
//! through it, so the load generator takes as little of a shared machine as it can.
//!
//! Why not a tonic `Channel`: it passes every call through a tower buffer task first — a
//! channel send and a task wake-up per call, on both ends of a proxy's forwarded call.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use arc_swap::ArcSwapOption;
use hyper::client::conn::http2;
use rustls_pki_types::ServerName;
use tonic::Status;

use crate::coalesce::Coalesced;

type Io =
    hyper_util::rt::TokioIo<Coalesced<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Sender = http2::SendRequest<tonic::body::Body>;

/// Dials: TCP (no delay), TLS (with a client certificate if given), ALPN `h2`, coalesced writes.
#[derive(Clone)]
struct Connector {
    tls: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl Connector {
    async fn dial(&self, host: &str, port: u16) -> std::io::Result<Io> {
        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let tls = self.tls.connect(self.name.clone(), tcp).await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(std::io::Error::other(
                "the server did not agree to HTTP/2 (ALPN h2)",
            ));
        }
        Ok(hyper_util::rt::TokioIo::new(Coalesced::new(tls)))
    }
}

/// One HTTP/2 connection, dialled on first use and again once it has closed (a client built
/// while its server is down follows it when it comes back). Cheap to clone; clones share the
/// connection.
#[derive(Clone)]
pub struct Link(Arc<Inner>);

struct Inner {
    connector: Connector,
    host: String,
    port: u16,
    connect_timeout: Duration,
    current: ArcSwapOption<Sender>,
    /// One dial at a time; calls arriving meanwhile wait for its connection.
    dialing: tokio::sync::Mutex<()>,
}

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
        let cfg = crate::tls::client_config(ca_pem, identity)?;
        let connector = Connector {
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            name: ServerName::try_from(server_name.to_owned())
                .with_context(|| format!("{server_name:?} is not a server name"))?,
        };
        Ok(Self(Arc::new(Inner {
            connector,
            host: host.to_owned(),
            port,
            connect_timeout,
            current: ArcSwapOption::empty(),
            dialing: tokio::sync::Mutex::new(()),
        })))
    }

    /// `https://host:port`: the origin generated clients put on requests (`with_origin`).
    pub fn origin(&self) -> http::Uri {
        http::Uri::builder()
            .scheme("https")
            .authority(format!("{}:{}", self.0.host, self.0.port))
            .path_and_query("/")
            .build()
            .unwrap_or_default()
    }

    /// Dials now if there is no live connection (`UNAVAILABLE` if that fails).
    pub async fn connect(&self) -> Result<(), Status> {
        self.sender().await.map(drop)
    }

    fn open(&self) -> Option<Sender> {
        self.0
            .current
            .load()
            .as_deref()
            .filter(|s| !s.is_closed())
            .cloned()
    }

    /// The live connection's handle, dialling one if there is none.
    async fn sender(&self) -> Result<Sender, Status> {
        if let Some(s) = self.open() {
            return Ok(s);
        }
        let _turn = self.0.dialing.lock().await;
        if let Some(s) = self.open() {
            return Ok(s);
        }
        let l = &self.0;
        let unreachable = |e: &dyn std::fmt::Display| {
            Status::unavailable(format!("{}:{} unreachable: {e}", l.host, l.port))
        };
        let io = tokio::time::timeout(l.connect_timeout, l.connector.dial(&l.host, l.port))
            .await
            .map_err(|_| unreachable(&"connect timed out"))?
            .map_err(|e| unreachable(&e))?;
        let (send, conn) = http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(5))
            .handshake(io)
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP/2 connection ended");
            }
        });
        l.current.store(Some(Arc::new(send.clone())));
        Ok(send)
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
            let mut send = this.sender().await?;
            Ok(send.send_request(req).await?)
        })
    }
}
