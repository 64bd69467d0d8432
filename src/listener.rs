//! The API port's accept loop: TCP accept (paused while the gateway is at its connection cap
//! or out of file descriptors), then each TLS handshake in its own task with a timeout and
//! caps on handshakes in flight, in all and per source address, so neither a client that
//! connects and sends nothing nor one host opening many connections delays anybody else. A
//! finished handshake becomes a [`TlsConn`] carrying the caller's [`PeerIdentity`], read
//! once from the verified certificate, and holding its places under the connection caps.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use pin_project_lite::pin_project;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
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
        // Places under the caps, given back when the connection closes.
        _open: OwnedSemaphorePermit,
        _agency: Counted,
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
    pub max_pending_per_source: usize,
    pub max_per_agency: usize,
}

/// Counts by key (a source address, an agency) under a cap; a [`Counted`] holds one place.
#[derive(Clone, Default)]
pub struct Counter {
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl Counter {
    /// A place for `key` if fewer than `cap` are held.
    pub fn try_hold(&self, key: String, cap: usize) -> Option<Counted> {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.clone()).or_insert(0);
        if *n >= cap.max(1) {
            return None;
        }
        *n += 1;
        Some(Counted {
            counter: self.clone(),
            key,
        })
    }

    pub fn held(&self, key: &str) -> usize {
        let map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).copied().unwrap_or(0)
    }
}

/// One place held in a [`Counter`], given back on drop.
pub struct Counted {
    counter: Counter,
    key: String,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut map = self
            .counter
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// The key a source address is counted under: the address, or its /64 for IPv6 (one host
/// gets a whole /64).
pub fn source_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// The key a verified connection is counted under: its agency, or its certificate when it
/// names none.
fn agency_key(peer: &PeerIdentity) -> String {
    match &peer.agency {
        Ok(a) => format!("agency:{a}"),
        Err(_) => format!("cert:{}", peer.fingerprint.to_hex()),
    }
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
            max_pending_per_source: server.max_pending_handshakes_per_source,
            max_per_agency: server.max_connections_per_agency,
        }
    }
}

/// Accepts until `shutdown` turns true; verified connections go to the returned channel.
/// At most `max_connections` are open at once (read at start: it needs a restart).
pub fn spawn(
    listener: TcpListener,
    settings: impl Fn() -> AcceptSettings + Send + 'static,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) -> mpsc::Receiver<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let open = Arc::new(Semaphore::new(max_connections.max(1)));
    let sources = Counter::default();
    let agencies = Counter::default();
    tokio::spawn(async move {
        // Resized (replaced) when a reload changes max_pending_handshakes.
        let mut pending: Option<(usize, Arc<Semaphore>)> = None;
        let mut last_warned: Option<Instant> = None;
        loop {
            // At the connection cap: stop accepting until a connection closes.
            let place = tokio::select! {
                () = wait_true(&mut shutdown) => break,
                p = open.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            telemetry::connections_open(max_connections - open.available_permits());
            let (tcp, remote) = tokio::select! {
                () = wait_true(&mut shutdown) => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: pause accepting (clients wait in the kernel's
                        // queue) until a connection closes or a moment has passed.
                        if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            warn!(error = %e, open = max_connections - open.available_permits() - 1,
                                "accept failed; pausing accepts until a connection closes (raise the file limit or lower server.max_connections)");
                            last_warned = Some(Instant::now());
                        }
                        drop(place);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let AcceptSettings {
                tls,
                handshake_timeout: timeout,
                max_pending,
                max_pending_per_source,
                max_per_agency,
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
            // One source may hold only its share of the pending handshakes.
            let Some(from_source) =
                sources.try_hold(source_key(remote.ip()), max_pending_per_source)
            else {
                telemetry::connection_refused("per_source");
                continue; // dropping `tcp` closes it
            };
            let Ok(permit) = limit.try_acquire_owned() else {
                telemetry::handshake_failed("too_many_pending");
                telemetry::connection_refused("pending");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls);
            let tx = tx.clone();
            let agencies = agencies.clone();
            tokio::spawn(async move {
                let result = tokio::time::timeout(timeout, acceptor.accept(tcp)).await;
                drop(permit);
                drop(from_source);
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
                let peer = PeerIdentity::from_der(leaf);
                let Some(counted) = agencies.try_hold(agency_key(&peer), max_per_agency) else {
                    telemetry::connection_refused("agency");
                    debug!(%remote, "connection cap of the agency reached; closing");
                    return;
                };
                let info = ConnInfo {
                    remote,
                    peer: Arc::new(peer),
                };
                let _ = tx
                    .send(Ok(TlsConn {
                        inner: Coalesced::new(stream),
                        info,
                        _open: place,
                        _agency: counted,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_addresses_and_ipv6_slash_64s() {
        assert_eq!(source_key("10.0.0.1".parse().unwrap()), "10.0.0.1");
        assert_eq!(source_key("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1");
        assert_eq!(
            source_key("2001:db8:1:2:3:4:5:6".parse().unwrap()),
            source_key("2001:db8:1:2:ffff::1".parse().unwrap())
        );
        assert_ne!(
            source_key("2001:db8:1:2::1".parse().unwrap()),
            source_key("2001:db8:1:3::1".parse().unwrap())
        );
    }

    #[test]
    fn a_counter_holds_at_most_its_cap_per_key_and_gives_places_back() {
        let c = Counter::default();
        let a = c.try_hold("a".into(), 2).unwrap();
        let _b = c.try_hold("a".into(), 2).unwrap();
        assert!(c.try_hold("a".into(), 2).is_none());
        assert!(c.try_hold("b".into(), 2).is_some());
        drop(a);
        assert_eq!(c.held("a"), 1);
        assert!(c.try_hold("a".into(), 2).is_some());
    }
}
