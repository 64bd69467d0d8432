//! The API port's TLS: a rustls `ServerConfig` built from the config (server certificate,
//! client CA bundle, CRLs, minimum version, ALPN h2), and the classification of handshake
//! failures for metrics. Rebuilt whole on reload; connections keep the config they began with.

use std::{path::Path, sync::Arc};

use rustls::{
    RootCertStore, ServerConfig,
    server::WebPkiClientVerifier,
    version::{TLS12, TLS13},
};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject,
};
use toml::Spanned;

use crate::config::{Config, ConfigError, ConfigErrors, TlsVersion};

/// The crypto provider: ring, the only one compiled in.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide rustls provider. Idempotent; call first in `main`
/// and in test helpers.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client config for HTTP/2 over mutual TLS (ALPN `h2`): trusts the PEM certificates in
/// `ca_pem` and, when given, presents the PEM `(chain, key)`. Used for the gateway's
/// connections to the directory and for the handshake probe.
pub fn client_config(
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> anyhow::Result<rustls::ClientConfig> {
    use anyhow::Context;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(c.context("CA: not a PEM certificate")?)
            .context("CA: unusable certificate")?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .context("certificate: not a PEM certificate chain")?;
            let key = PrivateKeyDer::from_pem_slice(key_pem).context("key: not a PEM key")?;
            builder
                .with_client_auth_cert(chain, key)
                .context("the certificate does not match the key")?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Builds the API port's TLS config, reporting every unreadable or invalid file.
pub fn server_config(config: &Config) -> Result<Arc<ServerConfig>, ConfigErrors> {
    let tls = &config.file.tls;
    let mut errors = Vec::new();

    let chain = load(config, "tls.cert", &tls.cert, &mut errors, |p| {
        let certs = CertificateDer::pem_file_iter(p)
            .map_err(|e| e.to_string())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        if certs.is_empty() {
            return Err("no CERTIFICATE block".into());
        }
        Ok(certs)
    });
    let key = load(config, "tls.key", &tls.key, &mut errors, |p| {
        PrivateKeyDer::from_pem_file(p).map_err(|e| e.to_string())
    });
    let roots = load(config, "tls.client_ca", &tls.client_ca, &mut errors, |p| {
        let mut roots = RootCertStore::empty();
        let mut n = 0;
        for cert in CertificateDer::pem_file_iter(p).map_err(|e| e.to_string())? {
            roots
                .add(cert.map_err(|e| e.to_string())?)
                .map_err(|e| format!("not a usable CA certificate: {e}"))?;
            n += 1;
        }
        if n == 0 {
            return Err("no CERTIFICATE block".into());
        }
        Ok(roots)
    });
    let mut crls = Vec::new();
    for (i, crl) in tls.crls.iter().enumerate() {
        let key = format!("tls.crls[{i}]");
        if let Some(mut list) = load(config, &key, crl, &mut errors, |p| {
            let list = CertificateRevocationListDer::pem_file_iter(p)
                .map_err(|e| e.to_string())?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            if list.is_empty() {
                return Err("no X509 CRL block".into());
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            for der in &list {
                match crl_next_update(der) {
                    Some(next) if next <= now => {
                        return Err(format!(
                            "this CRL's nextUpdate ({}) has passed: every client certificate it covers would be refused; publish a fresh CRL",
                            time::OffsetDateTime::from_unix_timestamp(next)
                                .map_or_else(|_| next.to_string(), |t| t.to_string())
                        ));
                    }
                    _ => {}
                }
            }
            Ok(list)
        }) {
            crls.append(&mut list);
        }
    }

    let chain_leaf = chain.as_ref().and_then(|c| c.first()).map(|c| c.to_vec());
    let (Some(chain), Some(key), Some(roots)) = (chain, key, roots) else {
        return Err(ConfigErrors(errors));
    };
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let at = |span: &Spanned<std::path::PathBuf>, key: &str, message: String| {
        ConfigErrors(vec![config.error_at(
            span.span().start,
            key.into(),
            message,
        )])
    };

    let crl_dates = crls
        .iter()
        .zip(crl_paths(config))
        .filter_map(|(der, path)| Some((path, crl_next_update(der)?)))
        .collect::<Vec<_>>();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        // A CRL past its nextUpdate no longer says who is revoked: refuse rather than trust it.
        .enforce_revocation_expiration()
        .build()
        .map_err(|e| {
            at(
                &tls.client_ca,
                "tls.client_ca",
                format!("client verifier: {e}"),
            )
        })?;
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&TLS13, &TLS12],
        TlsVersion::Tls13 => &[&TLS13],
    };
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| at(&tls.cert, "tls.min_version", e.to_string()))?
        .with_client_cert_verifier(Arc::new(ClientUse(verifier)))
        .with_single_cert(chain, key)
        .map_err(|e| at(&tls.key, "tls.key", format!("does not match tls.cert: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    if let Some(leaf) = chain_leaf {
        crate::telemetry::certificate_expires("server", &leaf);
    }
    for (path, next) in crl_dates {
        metrics::gauge!(crate::telemetry::CRL_NEXT_UPDATE, "crl" => path).set(next as f64);
    }
    Ok(Arc::new(cfg))
}

/// The configured CRL files, one label per CRL they hold (a file may hold several).
fn crl_paths(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for crl in &config.file.tls.crls {
        let path = config.resolve(crl.get_ref());
        let n = CertificateRevocationListDer::pem_file_iter(&path)
            .map(|i| i.count())
            .unwrap_or(0);
        out.extend(std::iter::repeat_n(path.display().to_string(), n));
    }
    out
}

/// The certificates the configured CRLs revoke (files `server_config` has already checked;
/// one that cannot be read now contributes nothing).
pub fn revoked(config: &Config) -> std::collections::HashSet<crate::identity::CertKey> {
    use x509_parser::prelude::FromDer;
    let mut out = std::collections::HashSet::new();
    for crl in &config.file.tls.crls {
        let path = config.resolve(crl.get_ref());
        let Ok(iter) = CertificateRevocationListDer::pem_file_iter(&path) else {
            continue;
        };
        for der in iter.flatten() {
            if let Ok((_, list)) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
            {
                let issuer = list.issuer().as_raw();
                for r in list.iter_revoked_certificates() {
                    out.insert(crate::identity::CertKey::new(issuer, r.raw_serial()));
                }
            }
        }
    }
    out
}

/// A CRL's nextUpdate, in Unix seconds.
pub(crate) fn crl_next_update(der: &[u8]) -> Option<i64> {
    use x509_parser::prelude::FromDer;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der).ok()?;
    Some(crl.next_update()?.timestamp())
}

/// Why a verified client certificate may still not be used to authenticate a client: what
/// its extensions permit. webpki accepts a certificate with no extended key usage at all and
/// does not look at the key usage; civgate requires clientAuth and, when a key usage is
/// present, digitalSignature (RFC 5280 §4.2.1.3, §4.2.1.12).
pub(crate) fn client_use_error(der: &[u8]) -> Option<&'static str> {
    use x509_parser::prelude::FromDer;
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else {
        return Some("the certificate cannot be parsed");
    };
    match cert.extended_key_usage() {
        Ok(Some(eku)) if eku.value.client_auth => {}
        Ok(_) => return Some("the certificate's extended key usage does not include clientAuth"),
        Err(_) => return Some("the certificate's extended key usage cannot be parsed"),
    }
    match cert.key_usage() {
        Ok(None) => None,
        Ok(Some(ku)) if ku.value.digital_signature() => None,
        Ok(Some(_)) => Some("the certificate's key usage does not include digitalSignature"),
        Err(_) => Some("the certificate's key usage cannot be parsed"),
    }
}

/// webpki's client verifier, then [`client_use_error`].
#[derive(Debug)]
struct ClientUse(Arc<dyn rustls::server::danger::ClientCertVerifier>);

impl rustls::server::danger::ClientCertVerifier for ClientUse {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        match client_use_error(end_entity) {
            None => Ok(verified),
            Some(_) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::InvalidPurpose,
            )),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

fn load<T>(
    config: &Config,
    key: &str,
    path: &Spanned<std::path::PathBuf>,
    errors: &mut Vec<ConfigError>,
    read: impl FnOnce(&Path) -> Result<T, String>,
) -> Option<T> {
    let resolved = config.resolve(path.get_ref());
    match read(&resolved) {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(config.error_at(
                path.span().start,
                key.into(),
                format!("{}: {e}", resolved.display()),
            ));
            None
        }
    }
}

/// A bounded label for a failed handshake, for metrics and logs.
pub(crate) fn failure_reason(err: &std::io::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E};
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<E>()) else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    match tls {
        E::NoCertificatesPresented => "no_client_certificate",
        E::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "not_yet_valid",
            C::Revoked => "revoked",
            C::UnknownIssuer => "unknown_issuer",
            C::BadSignature => "bad_signature",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => "wrong_key_usage",
            C::UnknownRevocationStatus => "unknown_revocation_status",
            C::ExpiredRevocationList | C::ExpiredRevocationListContext { .. } => "crl_expired",
            _ => "invalid_certificate",
        },
        E::NoApplicationProtocol => "no_alpn_h2",
        E::PeerIncompatible(_) => "incompatible",
        E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            "protocol_violation"
        }
        E::InvalidMessage(_) | E::DecryptError => "malformed",
        E::AlertReceived(_) => "client_alert",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn io_err(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn handshake_failures_are_classified() {
        use rustls::{CertificateError as C, Error as E};
        assert_eq!(
            failure_reason(&io_err(E::InvalidCertificate(C::Revoked))),
            "revoked"
        );
        assert_eq!(
            failure_reason(&io_err(E::InvalidCertificate(C::Expired))),
            "expired"
        );
        assert_eq!(
            failure_reason(&io_err(E::InvalidCertificate(C::UnknownIssuer))),
            "unknown_issuer"
        );
        assert_eq!(
            failure_reason(&io_err(E::NoCertificatesPresented)),
            "no_client_certificate"
        );
        assert_eq!(
            failure_reason(&io::Error::from(io::ErrorKind::UnexpectedEof)),
            "eof"
        );
    }

    #[test]
    fn repository_config_builds_with_dev_certificates() {
        install_provider();
        let dir = tempfile::tempdir().unwrap();
        civgate_dev::certs::init(&dir.path().join("certs"), false).unwrap();
        let cfg = Config::parse(
            crate::config::DEFAULT_CONFIG,
            "civgate.toml".into(),
            dir.path().to_owned(),
        )
        .unwrap();
        let tls = server_config(&cfg).unwrap();
        assert_eq!(tls.alpn_protocols, vec![b"h2".to_vec()]);
    }

    #[test]
    fn a_revoked_certificate_is_named_alike_by_itself_and_by_the_crl() {
        install_provider();
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        civgate_dev::certs::init(&certs, false).unwrap();
        let cfg = Config::parse(
            crate::config::DEFAULT_CONFIG,
            "civgate.toml".into(),
            dir.path().to_owned(),
        )
        .unwrap();
        let key_of = |name: &str| {
            let pem = std::fs::read(certs.join(format!("clients/{name}.pem"))).unwrap();
            let der = CertificateDer::pem_slice_iter(&pem)
                .next()
                .unwrap()
                .unwrap();
            crate::identity::PeerIdentity::from_der(&der).cert.unwrap()
        };
        let revoked = revoked(&cfg);
        assert!(revoked.contains(&key_of("revoked")));
        assert!(!revoked.contains(&key_of("registry-hp")));
        civgate_dev::certs::revoke(&certs, "registry-hp").unwrap();
        assert!(super::revoked(&cfg).contains(&key_of("registry-hp")));
    }

    #[test]
    fn missing_and_broken_files_are_each_reported_with_their_line() {
        install_provider();
        let dir = tempfile::tempdir().unwrap();
        civgate_dev::certs::init(&dir.path().join("certs"), false).unwrap();
        std::fs::write(dir.path().join("certs/server.key"), "not a key").unwrap();
        std::fs::remove_file(dir.path().join("certs/crl.pem")).unwrap();
        let cfg = Config::parse(
            crate::config::DEFAULT_CONFIG,
            "civgate.toml".into(),
            dir.path().to_owned(),
        )
        .unwrap();
        let errs = server_config(&cfg).unwrap_err();
        let keys: Vec<_> = errs.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["tls.key", "tls.crls[0]"], "{errs}");
        assert!(errs.0.iter().all(|e| e.line.is_some()));
    }
}
