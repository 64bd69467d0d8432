//! Who is calling: the agency named by the client certificate, derived once per connection
//! right after the TLS handshake. Handlers never see the certificate itself.

use x509_parser::{extensions::GeneralName, prelude::FromDer};

use civgate_domain::{AgencyId, CertFingerprint};

/// What the verified client certificate says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The agency named by the `urn:civgate:agency:<id>` URI SAN, or why there is none.
    pub agency: Result<AgencyId, IdentityError>,
    pub fingerprint: CertFingerprint,
    /// How a CRL names the certificate (issuer and serial), for calls on a connection that
    /// outlives a reload revoking it.
    pub cert: Option<CertKey>,
    /// The end of the certificate's validity (Unix seconds): a connection may outlive it.
    pub not_after: Option<i64>,
}

/// A certificate as a CRL names it: its issuer's distinguished name (DER) and its serial
/// number (big-endian, without leading zero bytes).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CertKey {
    pub issuer: Vec<u8>,
    pub serial: Vec<u8>,
}

impl CertKey {
    pub fn new(issuer: &[u8], serial: &[u8]) -> Self {
        let start = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
        Self {
            issuer: issuer.to_vec(),
            serial: serial[start..].to_vec(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("client certificate could not be parsed")]
    Unparseable,
    #[error("client certificate has no urn:civgate:agency:<id> URI SAN")]
    NoAgencyUri,
    #[error("client certificate names more than one agency")]
    SeveralAgencies,
    #[error("{0}")]
    InvalidAgency(String),
}

impl PeerIdentity {
    /// Reads the agency identity from a client certificate that TLS has already verified.
    pub fn from_der(der: &[u8]) -> Self {
        let parsed = x509_parser::certificate::X509Certificate::from_der(der)
            .ok()
            .map(|(_, c)| {
                (
                    CertKey::new(c.issuer().as_raw(), c.raw_serial()),
                    c.validity().not_after.timestamp(),
                )
            });
        Self {
            agency: agency_of(der),
            fingerprint: CertFingerprint::of_der(der),
            cert: parsed.as_ref().map(|(k, _)| k.clone()),
            not_after: parsed.map(|(_, t)| t),
        }
    }

    /// A peer known only by its agency and fingerprint (tests, tools).
    pub fn of(agency: Result<AgencyId, IdentityError>, fingerprint: CertFingerprint) -> Self {
        Self {
            agency,
            fingerprint,
            cert: None,
            not_after: None,
        }
    }
}

fn agency_of(der: &[u8]) -> Result<AgencyId, IdentityError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|_| IdentityError::Unparseable)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::Unparseable)?
        .ok_or(IdentityError::NoAgencyUri)?;
    let mut found: Option<AgencyId> = None;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name
            && let Some(parsed) = AgencyId::from_uri(uri)
        {
            let id = parsed.map_err(|e| IdentityError::InvalidAgency(e.to_string()))?;
            if found.replace(id).is_some() {
                return Err(IdentityError::SeveralAgencies);
            }
        }
    }
    found.ok_or(IdentityError::NoAgencyUri)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert_with_sans(sans: Vec<SanType>) -> Vec<u8> {
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn agency_uri_san_names_the_agency() {
        let der = cert_with_sans(vec![
            SanType::DnsName("x.example".try_into().unwrap()),
            uri("urn:civgate:agency:registry-hp"),
        ]);
        let id = PeerIdentity::from_der(&der);
        assert_eq!(id.agency, Ok("registry-hp".parse().unwrap()));
        assert_eq!(id.fingerprint, CertFingerprint::of_der(&der));
    }

    #[test]
    fn certificate_without_agency_uri_has_no_agency() {
        let der = cert_with_sans(vec![uri("https://example.org/")]);
        assert_eq!(
            PeerIdentity::from_der(&der).agency,
            Err(IdentityError::NoAgencyUri)
        );
        let der = cert_with_sans(vec![]);
        assert_eq!(
            PeerIdentity::from_der(&der).agency,
            Err(IdentityError::NoAgencyUri)
        );
    }

    #[test]
    fn two_agencies_in_one_certificate_are_refused() {
        let der = cert_with_sans(vec![
            uri("urn:civgate:agency:a"),
            uri("urn:civgate:agency:b"),
        ]);
        assert_eq!(
            PeerIdentity::from_der(&der).agency,
            Err(IdentityError::SeveralAgencies)
        );
    }

    #[test]
    fn malformed_agency_id_is_refused() {
        let der = cert_with_sans(vec![uri("urn:civgate:agency:Not_Valid")]);
        assert!(matches!(
            PeerIdentity::from_der(&der).agency,
            Err(IdentityError::InvalidAgency(_))
        ));
    }

    #[test]
    fn garbage_is_unparseable() {
        assert_eq!(
            PeerIdentity::from_der(b"not a certificate").agency,
            Err(IdentityError::Unparseable)
        );
    }
}
