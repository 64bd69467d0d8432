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
        _open: Place,
        _agency: Counted,
        // Until the client's first bytes after the handshake (its HTTP/2 preface): a
        // connection that sends nothing is closed then.
        first_data: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

/// A place under `server.max_connections`, given back (and counted) when dropped.
pub(crate) struct Place {
    _permit: OwnedSemaphorePermit,
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl Place {
    fn new(permit: OwnedSemaphorePermit, open: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        let n = open.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        telemetry::connections_open(n);
        Self {
            _permit: permit,
            open,
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let n = self.open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) - 1;
        telemetry::connections_open(n);
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
        let this = self.project();
        let before = buf.filled().len();
        let read = this.inner.poll_read(cx, buf);
        if this.first_data.is_some() {
            match &read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => *this.first_data = None,
                Poll::Pending => {
                    if let Some(d) = this.first_data.as_mut()
                        && d.as_mut().poll(cx).is_ready()
                    {
                        telemetry::connection_refused("silent");
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no request after the handshake",
                        )));
                    }
                }
                _ => {}
            }
        }
        read
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
    pub first_bytes_timeout: Duration,
    pub max_pending: usize,
    pub max_pending_per_source: usize,
    pub max_per_agency: usize,
}

/// Counts by key (a source address, an agency) under a cap; a [`Counted`] holds one place.
#[derive(Clone, Default)]
pub(crate) struct Counter {
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl Counter {
    /// A place for `key` if fewer than `cap` are held.
    pub(crate) fn try_hold(&self, key: String, cap: usize) -> Option<Counted> {
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

    #[cfg(test)]
    pub fn held(&self, key: &str) -> usize {
        let map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).copied().unwrap_or(0)
    }
}

/// One place held in a [`Counter`], given back on drop.
pub(crate) struct Counted {
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
pub(crate) fn source_key(ip: IpAddr) -> String {
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
            first_bytes_timeout: Duration::from_millis(server.first_bytes_timeout_ms.max(1)),
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
    new_per_source_per_second: u32,
    mut shutdown: watch::Receiver<bool>,
) -> mpsc::Receiver<Result<TlsConn, io::Error>> {
    // New connections per source address: a host opening and closing verified connections
    // in a loop makes the gateway pay a handshake each time; this caps it before that cost.
    let churn = std::num::NonZeroU32::new(new_per_source_per_second).map(|rate| {
        let burst = rate.saturating_mul(std::num::NonZeroU32::new(2).unwrap_or(rate));
        Arc::new(governor::DefaultKeyedRateLimiter::<String>::keyed(
            governor::Quota::per_second(rate).allow_burst(burst),
        ))
    });
    let mut churn_pruned = Instant::now();
    let (tx, rx) = mpsc::channel(64);
    let open = Arc::new(Semaphore::new(max_connections.max(1)));
    let open_count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sources = Counter::default();
    let evictable = Evictable::default();
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
                    Ok(p) => Place::new(p, open_count.clone()),
                    Err(_) => break,
                },
            };
            let (tcp, remote) = tokio::select! {
                () = wait_true(&mut shutdown) => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: pause accepting (clients wait in the kernel's
                        // queue) until a connection closes or a moment has passed.
                        if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            warn!(error = %e, open = open_count.load(std::sync::atomic::Ordering::Acquire).saturating_sub(1),
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
                first_bytes_timeout,
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
            let source = source_key(remote.ip());
            if let Some(limiter) = &churn {
                if churn_pruned.elapsed() >= Duration::from_secs(10) {
                    limiter.retain_recent();
                    churn_pruned = Instant::now();
                }
                if limiter.check_key(&source).is_err() {
                    telemetry::connection_refused("rate");
                    continue; // dropping `tcp` closes it
                }
            }
            // One source may hold only its share of the pending handshakes.
            let Some(from_source) = sources.try_hold(source, max_pending_per_source) else {
                telemetry::connection_refused("per_source");
                continue; // dropping `tcp` closes it
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls);
            let tx = tx.clone();
            let agencies = agencies.clone();
            let evictable = evictable.clone();
            tokio::spawn(async move {
                // A full pool makes room: the oldest pending handshake is closed (a real
                // client's takes milliseconds; the oldest is the one most likely stalling).
                let permit = match limit.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        evictable.evict_oldest();
                        match tokio::time::timeout(EVICTION_WAIT, limit.acquire_owned()).await {
                            Ok(Ok(p)) => p,
                            _ => {
                                telemetry::handshake_failed("too_many_pending");
                                telemetry::connection_refused("pending");
                                return;
                            }
                        }
                    }
                };
                let (id, mut evicted) = evictable.enter();
                let _leave = Leave(&evictable, id);
                let handshake = async {
                    // A client that sends nothing gives its pending place back early.
                    if tokio::time::timeout(first_bytes_timeout, tcp.readable())
                        .await
                        .is_err()
                    {
                        return Err("no_first_bytes");
                    }
                    Ok(tokio::time::timeout(timeout, acceptor.accept(tcp)).await)
                };
                let result = tokio::select! {
                    r = handshake => r,
                    _ = &mut evicted => Err("evicted"),
                };
                let result = match result {
                    Ok(r) => r,
                    Err(reason) => {
                        drop(permit);
                        telemetry::handshake_failed(reason);
                        return;
                    }
                };
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
                        first_data: Some(Box::pin(tokio::time::sleep(first_bytes_timeout))),
                    }))
                    .await;
            });
        }
    });
    rx
}

/// How long a newcomer waits for the place of the pending handshake it had closed.
const EVICTION_WAIT: Duration = Duration::from_millis(250);

/// The pending handshakes, oldest first (by a counter), each with the means to close it.
#[derive(Clone, Default)]
struct Evictable(Arc<Mutex<PendingSet>>);

#[derive(Default)]
struct PendingSet {
    last: u64,
    closers: std::collections::BTreeMap<u64, tokio::sync::oneshot::Sender<()>>,
}

impl Evictable {
    fn enter(&self) -> (u64, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.last += 1;
        let id = g.last;
        g.closers.insert(id, tx);
        (id, rx)
    }

    fn evict_oldest(&self) {
        let oldest = {
            let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
            g.closers.pop_first()
        };
        if let Some((_, close)) = oldest {
            telemetry::connection_refused("evicted");
            let _ = close.send(());
        }
    }
}

/// Leaves the pending set when the handshake ends, however it ends.
struct Leave<'a>(&'a Evictable, u64);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut g = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        g.closers.remove(&self.1);
    }
}

/// File descriptors kept free for everything but client connections (stores, pools, the
/// directory's connections, the admin port).
pub(crate) const FD_RESERVE: usize = 256;

/// The connection cap to enforce: `configured`, lowered to the process's open-file limit less
/// [`FD_RESERVE`] (read from `/proc/self/limits`) so that accepting never fails for lack of a
/// descriptor. Returns the cap and, when lowered, the limit that lowered it.
pub(crate) fn connection_cap(configured: usize) -> (usize, Option<usize>) {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| open_files_limit(&t));
    match soft {
        Some(limit) if configured + FD_RESERVE > limit => {
            (limit.saturating_sub(FD_RESERVE).max(16), Some(limit))
        }
        _ => (configured, None),
    }
}

/// The soft "Max open files" of a `/proc/<pid>/limits` text.
fn open_files_limit(text: &str) -> Option<usize> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
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

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn the_open_file_limit_is_read_and_lowers_the_cap() {
        let text = "Limit                     Soft Limit           Hard Limit           Units\n\
                    Max cpu time              unlimited            unlimited            seconds\n\
                    Max open files            1024                 524288               files\n";
        assert_eq!(open_files_limit(text), Some(1024));
        assert_eq!(
            open_files_limit("Max open files unlimited unlimited files"),
            None
        );
        let (cap, lowered) = connection_cap(usize::MAX / 4);
        assert!(lowered.is_some() && cap < usize::MAX / 4);
    }
}
