//! A gRPC client over mutual TLS, as agencies use it: for the demo, `civgate audit` and
//! `civgate bench`, and the integration tests.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Connects to `addr` (server name `localhost`), trusting `ca.pem` from `certs_dir` and
/// presenting `clients/<name>.{pem,key}` if `client` is given.
pub async fn connect(addr: SocketAddr, certs_dir: &Path, client: Option<&str>) -> Result<Channel> {
    let read = |rel: &str| {
        let p = certs_dir.join(rel);
        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .domain_name("localhost");
    if let Some(name) = client {
        tls = tls.identity(Identity::from_pem(
            read(&format!("clients/{name}.pem"))?,
            read(&format!("clients/{name}.key"))?,
        ));
    }
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    Ok(endpoint.connect().await?)
}
