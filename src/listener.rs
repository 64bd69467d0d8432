//! The API port's accept loop: TCP accept, then each TLS handshake in its own task with a
//! timeout and a cap on handshakes in flight, so a client that connects and sends nothing
//! delays nobody. A finished handshake becomes a [`TlsConn`] carrying the caller's
//! [`PeerIdentity`], read once from the verified certificate.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::{coalesce::Coalesced, identity::PeerIdentity, state::Shared, telemetry};

/// Per-connection facts, available to every request as a request extension.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub peer: Arc<PeerIdentity>,
}

pin_project! {
    /// A TLS connection whose client certificate has been verified.
    pub struct TlsConn {
        #[pin]
        inner: Coalesced<TlsStream<TcpStream>>,
        info: ConnInfo,
    }
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What the accept loop needs, read afresh for every connection (so reloads apply).
pub struct AcceptSettings {
    pub tls: Arc<rustls::ServerConfig>,
    pub handshake_timeout: Duration,
    pub max_pending: usize,
}

impl AcceptSettings {
    /// The gateway's current settings.
    pub fn of(state: &Shared) -> Self {
        let snapshot = state.load();
        let server = &snapshot.config.file.server;
        Self {
            tls: snapshot.tls.clone(),
            handshake_timeout: Duration::from_millis(server.handshake_timeout_ms),
            max_pending: server.max_pending_handshakes,
        }
    }
}

/// Accepts until `shutdown` turns true; verified connections go to the returned channel.
pub fn spawn(
    listener: TcpListener,
    settings: impl Fn() -> AcceptSettings + Send + 'static,
    mut shutdown: watch::Receiver<bool>,
) -> mpsc::Receiver<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        // Resized (replaced) when a reload changes max_pending_handshakes.
        let mut pending: Option<(usize, Arc<Semaphore>)> = None;
        loop {
            let (tcp, remote) = tokio::select! {
                () = wait_true(&mut shutdown) => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let AcceptSettings {
                tls,
                handshake_timeout: timeout,
                max_pending,
            } = settings();
            let size = max_pending.max(1);
            let limit = match &pending {
                Some((n, s)) if *n == size => s.clone(),
                _ => {
                    let s = Arc::new(Semaphore::new(size));
                    pending = Some((size, s.clone()));
                    s
                }
            };
            let Ok(permit) = limit.try_acquire_owned() else {
                telemetry::handshake_failed("too_many_pending");
                continue; // dropping `tcp` closes it
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls);
            let tx = tx.clone();
            tokio::spawn(async move {
                let result = tokio::time::timeout(timeout, acceptor.accept(tcp)).await;
                drop(permit);
                let stream = match result {
                    Err(_) => {
                        telemetry::handshake_failed("timeout");
                        debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                    Ok(Err(e)) => {
                        let reason = crate::tls::failure_reason(&e);
                        telemetry::handshake_failed(reason);
                        debug!(%remote, reason, error = %e, "TLS handshake failed");
                        return;
                    }
                    Ok(Ok(s)) => s,
                };
                let Some(leaf) = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                else {
                    // The verifier requires a certificate; this cannot happen, but never serve
                    // a connection without one.
                    telemetry::handshake_failed("no_client_certificate");
                    return;
                };
                let info = ConnInfo {
                    remote,
                    peer: Arc::new(PeerIdentity::from_der(leaf)),
                };
                let _ = tx
                    .send(Ok(TlsConn {
                        inner: Coalesced::new(stream),
                        info,
                    }))
                    .await;
            });
        }
    });
    rx
}

/// Resolves once the watch holds `true` (or its sender is gone).
pub async fn wait_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
