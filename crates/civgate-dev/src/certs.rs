//! `civgate certs init`: a development PKI. Real deployments use their government CA instead
//! (see `certs/README.md`); nothing here is used at run time except by the demo and tests.

use std::{
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::{Duration, OffsetDateTime};

use crate::domain::AgencyId;

/// The client certificates `certs init` writes under `clients/`, and the agency each names.
/// `revoked`, `expired`, `rogue`, `no-client-auth` and `no-digital-signature` name a
/// configured agency on purpose: only the CRL, the validity period, the issuer or the key's
/// permitted uses is what gets them refused.
pub(crate) const CLIENTS: &[(&str, &str, ClientKind)] = &[
    ("registry-hp", "registry-hp", ClientKind::Valid),
    ("registry-hn", "registry-hn", ClientKind::Valid),
    ("population", "population", ClientKind::Valid),
    ("auditor", "auditor", ClientKind::Valid),
    ("social-insurance", "social-insurance", ClientKind::Valid),
    ("revoked", "registry-hp", ClientKind::Revoked),
    ("expired", "registry-hp", ClientKind::Expired),
    ("rogue", "registry-hp", ClientKind::Rogue),
    ("no-client-auth", "registry-hp", ClientKind::NoClientAuth),
    (
        "no-digital-signature",
        "registry-hp",
        ClientKind::NoDigitalSignature,
    ),
    ("unknown", "unknown-agency", ClientKind::Valid),
    // The gateway's own client certificate for the population directory (outbound mTLS).
    ("gateway", "civgate-gateway", ClientKind::Valid),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientKind {
    Valid,
    Revoked,
    Expired,
    Rogue,
    /// No extended key usage extension (so no clientAuth).
    NoClientAuth,
    /// A key usage extension without digitalSignature.
    NoDigitalSignature,
}

/// The name of the development audit signing key (= the default checkpoint origin).
pub const AUDIT_KEY_NAME: &str = crate::audit::note::DEFAULT_KEY_NAME;

/// Every file `certs init` writes, relative to its directory.
pub fn files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "crl.pem",
        "audit.key",
        "audit.vkey",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    for (name, _, _) in CLIENTS {
        v.push(Path::new("clients").join(format!("{name}.pem")));
        v.push(Path::new("clients").join(format!("{name}.key")));
    }
    v
}

/// Writes the development PKI into `dir`. Refuses to overwrite any file unless `force`.
pub fn init(dir: &Path, force: bool) -> Result<Vec<PathBuf>> {
    if !force {
        let existing: Vec<_> = files()
            .into_iter()
            .map(|f| dir.join(f))
            .filter(|p| p.exists())
            .collect();
        if let Some(first) = existing.first() {
            bail!(
                "{} already exists ({} of the files would be overwritten); pass --force to replace them",
                first.display(),
                existing.len()
            );
        }
    }
    // Modes are set explicitly, whatever the umask: directories 0755, certificates 0644,
    // keys 0600.
    for d in [dir.to_owned(), dir.join("clients")] {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&d)
            .with_context(|| format!("creating {}", d.display()))?;
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting the mode of {}", d.display()))?;
    }

    let now = OffsetDateTime::now_utc();
    let (ca_params, ca_key) = ca("civgate development CA", now)?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let mut written = Vec::new();
    write_file(dir, "ca.pem", &ca_cert.pem(), false, &mut written)?;
    write_file(dir, "ca.key", &ca_key.serialize_pem(), true, &mut written)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let (rogue_params, rogue_key) = ca("civgate development CA", now)?;
    let rogue_issuer = Issuer::new(rogue_params, rogue_key);

    // Server: localhost and loopback addresses.
    let mut p = leaf_params("civgate gateway", now)?;
    p.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress([127, 0, 0, 1].into()),
        SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    write_file(dir, "server.pem", &cert.pem(), false, &mut written)?;
    write_file(dir, "server.key", &key.serialize_pem(), true, &mut written)?;

    let mut revoked = Vec::new();
    for (name, agency, kind) in CLIENTS {
        let agency: AgencyId = agency.parse()?;
        let mut p = leaf_params(name, now)?;
        p.subject_alt_names = vec![SanType::URI(agency.to_uri().try_into()?)];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        match kind {
            ClientKind::NoClientAuth => p.extended_key_usages = vec![],
            ClientKind::NoDigitalSignature => p.key_usages = vec![KeyUsagePurpose::KeyAgreement],
            _ => {}
        }
        if *kind == ClientKind::Expired {
            p.not_before = now - Duration::days(30);
            p.not_after = now - Duration::days(1);
        }
        let key = KeyPair::generate()?;
        let signer = if *kind == ClientKind::Rogue {
            &rogue_issuer
        } else {
            &issuer
        };
        let cert = p.signed_by(&key, signer)?;
        if *kind == ClientKind::Revoked
            && let Some(serial) = p.serial_number.clone()
        {
            revoked.push(serial);
        }
        let base = format!("clients/{name}");
        write_file(
            dir,
            &format!("{base}.pem"),
            &cert.pem(),
            false,
            &mut written,
        )?;
        write_file(
            dir,
            &format!("{base}.key"),
            &key.serialize_pem(),
            true,
            &mut written,
        )?;
    }

    let crl = sign_crl(&issuer, &revoked, now)?;
    write_file(dir, "crl.pem", &crl, false, &mut written)?;

    // The audit log's checkpoint signing key (C2SP signed-note encoding) and its verifier key.
    let signer = crate::audit::note::Signer::generate(AUDIT_KEY_NAME)?;
    write_file(
        dir,
        "audit.key",
        &format!("{}\n", signer.private_key_string()),
        true,
        &mut written,
    )?;
    write_file(
        dir,
        "audit.vkey",
        &format!("{}\n", signer.verifier_key_string()),
        false,
        &mut written,
    )?;
    Ok(written)
}

/// Adds the certificate `clients/<name>.pem` to `crl.pem`, re-signed with `ca.key`.
/// Used by operators' drills and by the reload tests.
pub fn revoke(dir: &Path, name: &str) -> Result<()> {
    let read = |f: &str| {
        fs::read_to_string(dir.join(f))
            .with_context(|| format!("reading {}", dir.join(f).display()))
    };
    let ca_key = KeyPair::from_pem(&read("ca.key")?)?;
    let issuer = Issuer::from_ca_cert_pem(&read("ca.pem")?, ca_key)?;

    let mut serials = Vec::new();
    let crl_pem_text = read("crl.pem")?;
    let (_, crl_pem) = x509_parser::pem::parse_x509_pem(crl_pem_text.as_bytes())
        .map_err(|e| anyhow::anyhow!("crl.pem: {e}"))?;
    for serial in revoked_serials(&crl_pem.contents)? {
        serials.push(serial);
    }

    let cert_pem_text = read(&format!("clients/{name}.pem"))?;
    let (_, cert_pem) = x509_parser::pem::parse_x509_pem(cert_pem_text.as_bytes())
        .map_err(|e| anyhow::anyhow!("clients/{name}.pem: {e}"))?;
    let cert = cert_pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("clients/{name}.pem: {e}"))?;
    let serial = SerialNumber::from_slice(cert.raw_serial());
    if !serials.contains(&serial) {
        serials.push(serial);
    }
    let crl = sign_crl(&issuer, &serials, OffsetDateTime::now_utc())?;
    let tmp = dir.join("crl.pem.tmp");
    fs::write(&tmp, crl)?;
    fs::rename(&tmp, dir.join("crl.pem"))?;
    Ok(())
}

/// The serial numbers a DER-encoded CRL lists.
fn revoked_serials(der: &[u8]) -> Result<Vec<SerialNumber>> {
    use x509_parser::prelude::FromDer;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
        .map_err(|e| anyhow::anyhow!("crl.pem: {e}"))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| SerialNumber::from_slice(r.raw_serial()))
        .collect())
}

fn sign_crl(
    issuer: &Issuer<'_, KeyPair>,
    serials: &[SerialNumber],
    now: OffsetDateTime,
) -> Result<String> {
    let params = CertificateRevocationListParams {
        this_update: now - Duration::minutes(5),
        next_update: now + Duration::days(365),
        crl_number: SerialNumber::from_slice(&(now.unix_timestamp() as u64).to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: s.clone(),
                revocation_time: now - Duration::minutes(1),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(issuer)?.pem()?)
}

fn ca(cn: &str, now: OffsetDateTime) -> Result<(CertificateParams, KeyPair)> {
    let mut p = CertificateParams::new(vec![])?;
    p.distinguished_name = dn(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(3650);
    p.serial_number = Some(random_serial()?);
    Ok((p, KeyPair::generate()?))
}

fn leaf_params(cn: &str, now: OffsetDateTime) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(vec![])?;
    p.distinguished_name = dn(cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(825);
    p.serial_number = Some(random_serial()?);
    Ok(p)
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "civgate development");
    dn.push(DnType::CommonName, cn);
    dn
}

/// 16 random bytes, positive (RFC 5280 §4.1.2.2).
fn random_serial() -> Result<SerialNumber> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("system random number generator failed"))?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

fn write_file(
    dir: &Path,
    rel: &str,
    contents: &str,
    secret: bool,
    written: &mut Vec<PathBuf>,
) -> Result<()> {
    let path = dir.join(rel);
    let mode = if secret { 0o600 } else { 0o644 };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true).mode(mode);
    let mut f = opts
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    // An existing file (--force) keeps its mode unless told.
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    written.push(path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_every_file_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let written = init(dir.path(), false).unwrap();
        assert_eq!(written.len(), files().len());
        for f in files() {
            assert!(dir.path().join(&f).exists(), "{}", f.display());
        }
        let err = init(dir.path(), false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert!(init(dir.path(), true).is_ok());
    }

    #[test]
    fn keys_are_private_to_the_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), false).unwrap();
        let mode = fs::metadata(dir.path().join("clients/population.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn revoke_adds_a_serial_and_keeps_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), false).unwrap();
        revoke(dir.path(), "population").unwrap();
        let text = fs::read_to_string(dir.path().join("crl.pem")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes()).unwrap();
        assert_eq!(revoked_serials(&pem.contents).unwrap().len(), 2);
    }
}
