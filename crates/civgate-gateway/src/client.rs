//! A gRPC client over mutual TLS, as agencies use it: for the demo, `civgate audit` and
//! `civgate bench`, and the integration tests.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Connects to `addr` (server name `localhost`), trusting `ca.pem` from `certs_dir` and
/// presenting `clients/<name>.{pem,key}` if `client` is given.
pub async fn connect(addr: SocketAddr, certs_dir: &Path, client: Option<&str>) -> Result<Channel> {
    let (ca, identity) = pem_files(certs_dir, client)?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    Ok(endpoint.connect().await?)
}

/// A channel to `authority` (`host:port`, a name or an address) over mutual TLS with explicit
/// PEM material: the server's certificate must chain to `ca` and name `server_name`.
pub async fn connect_to(
    authority: &str,
    server_name: &str,
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
) -> Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(server_name)
        .identity(Identity::from_pem(cert, key));
    let endpoint = Endpoint::from_shared(format!("https://{authority}"))
        .with_context(|| format!("{authority:?} is not host:port"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {authority} (TLS server name {server_name})"))
}

/// Like [`connect`], as a [`Link`](crate::link::Link): calls go to the HTTP/2 connection
/// directly, without a tonic `Channel`'s buffer task (for load generators). Dials before
/// returning, so an unreachable server is an error here.
pub async fn link(
    addr: SocketAddr,
    certs_dir: &Path,
    client: Option<&str>,
) -> Result<crate::link::Link> {
    let link = dialer(crate::link::Link::new, addr, certs_dir, client)?;
    link.connect().await?;
    Ok(link)
}

/// Like [`link`], as a [`UnaryLink`](crate::link::UnaryLink): unary calls straight on the
/// HTTP/2 connection, with none of tonic's client layers (for load generators, whose own CPU
/// shares the machine with the server they measure). Dials before returning.
pub async fn unary_link(
    addr: SocketAddr,
    certs_dir: &Path,
    client: Option<&str>,
) -> Result<crate::link::UnaryLink> {
    let link = dialer(crate::link::UnaryLink::new, addr, certs_dir, client)?;
    link.connect().await?;
    Ok(link)
}

/// The constructor shared by [`crate::link::Link`] and [`crate::link::UnaryLink`]: CA,
/// identity, server name, host, port, connect timeout.
type NewLink<T> = fn(&[u8], Option<(&[u8], &[u8])>, &str, &str, u16, Duration) -> Result<T>;

/// A link of kind `T` to `addr` (server name `localhost`), not dialled yet.
fn dialer<T>(
    new: NewLink<T>,
    addr: SocketAddr,
    certs_dir: &Path,
    client: Option<&str>,
) -> Result<T> {
    let (ca, identity) = pem_files(certs_dir, client)?;
    new(
        &ca,
        identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
        "localhost",
        &addr.ip().to_string(),
        addr.port(),
        Duration::from_secs(5),
    )
}

/// `ca.pem` from `certs_dir`, and `clients/<name>.{pem,key}` if `client` is given.
type PemFiles = (Vec<u8>, Option<(Vec<u8>, Vec<u8>)>);
fn pem_files(certs_dir: &Path, client: Option<&str>) -> Result<PemFiles> {
    let read = |rel: &str| {
        let p = certs_dir.join(rel);
        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
    };
    let identity = match client {
        Some(name) => Some((
            read(&format!("clients/{name}.pem"))?,
            read(&format!("clients/{name}.key"))?,
        )),
        None => None,
    };
    Ok((read("ca.pem")?, identity))
}

/// Performs only the TLS handshake as `client` and waits for the server's first bytes (the
/// HTTP/2 SETTINGS frame of an accepted connection). Returns the TLS error if the server
/// refused: with TLS 1.3 a refused client certificate shows up as an alert after the
/// client's side of the handshake is done, so reading is what reveals it.
pub async fn probe_handshake(
    addr: SocketAddr,
    certs_dir: &Path,
    client: Option<&str>,
) -> Result<(), String> {
    use std::sync::Arc;

    use rustls_pki_types::ServerName;
    use tokio::io::AsyncReadExt;

    let err = |e: &dyn std::fmt::Display| e.to_string();
    let (ca, identity) = pem_files(certs_dir, client).map_err(|e| format!("{e:#}"))?;
    let cfg = crate::tls::client_config(
        &ca,
        identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
    )
    .map_err(|e| format!("{e:#}"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| err(&e))?;
    let name = ServerName::try_from("localhost").map_err(|e| err(&e))?;
    let attempt = async {
        let mut tls = connector.connect(name, tcp).await.map_err(|e| err(&e))?;
        let mut buf = [0u8; 9];
        match tls.read(&mut buf).await {
            Ok(0) => Err("connection closed by the server".to_owned()),
            Ok(_) => Ok(()),
            Err(e) => Err(err(&e)),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}
