//! `civgate demo`: the embedded default. Creates dev certificates if missing, starts the
//! gateway on loopback with real mTLS, and walks through what exists so far — today the
//! look-ups of SPEC §6 steps 1 and 3 and the identity and policy cases of step 6. Exits non-zero if any case comes out wrong.

use std::path::Path;

use anyhow::{Context, Result, bail};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    api::convert::present_fields,
    certs, client,
    config::{Config, DEFAULT_CONFIG},
    domain::{Sex, fold, format_date},
    pb::v1::{
        GetCitizenRequest, MaritalStatus as PbMarital, Match, SearchCitizensRequest,
        VerifyCitizenRequest, citizens_client::CitizensClient,
    },
    refdb::{self, RefdbOverrides},
    server::{self, ConfigSource, Overrides},
    synth::Population,
};

const DEMO_CITIZENS: usize = 20_000;
const DEMO_SEED: u64 = 1;

pub async fn run(certs_dir: &Path) -> Result<()> {
    if certs_dir.join("ca.pem").exists() {
        println!(
            "• using development certificates in {}",
            certs_dir.display()
        );
    } else {
        certs::init(certs_dir, false)?;
        println!(
            "• created development certificates in {}",
            certs_dir.display()
        );
    }
    let base_dir = certs_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let certs_name = certs_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("certs");
    if !certs_dir.join("audit.key").exists() {
        // Certificates from before the audit log existed: add its signing key.
        let signer = crate::audit::note::Signer::generate(certs::AUDIT_KEY_NAME)?;
        std::fs::write(
            certs_dir.join("audit.key"),
            format!("{}\n", signer.private_key_string()),
        )?;
        std::fs::write(
            certs_dir.join("audit.vkey"),
            format!("{}\n", signer.verifier_key_string()),
        )?;
        println!("• created the audit signing key in {}", certs_dir.display());
    }
    let mut text = DEFAULT_CONFIG
        .replace("\"certs/", &format!("\"{certs_name}/"))
        .replace(
            "checkpoint_interval_ms = 1000",
            "checkpoint_interval_ms = 100",
        );
    let data = tempfile_dir()?;

    // The embedded reference population directory (upstream for look-ups).
    let cfg = Config::parse(&text, "<embedded civgate.toml>".into(), base_dir.clone())?;
    let directory = refdb::start(
        &cfg,
        RefdbOverrides {
            listen: Some("127.0.0.1:0".parse()?),
            data_dir: Some(data.join("refdb")),
            citizens: Some(DEMO_CITIZENS),
            seed: Some(DEMO_SEED),
        },
    )
    .await?;
    println!(
        "• reference population directory on {} (mTLS), {DEMO_CITIZENS} synthetic citizens",
        directory.addr
    );
    text = text.replace(
        "https://localhost:7444",
        &format!("https://localhost:{}", directory.addr.port()),
    );
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".parse()?),
        admin_listen: Some("127.0.0.1:0".parse()?),
        data_dir: Some(data.clone()),
    };
    let gw = server::start(
        ConfigSource::Text {
            text: text.into(),
            base_dir,
        },
        overrides,
    )
    .await?;
    println!(
        "• gateway listening on {} (mTLS), admin on http://{}",
        gw.api_addr, gw.admin_addr
    );
    println!();

    let addr = gw.api_addr;
    let mut failures = 0;
    let mut check = |ok: bool, what: &str, got: String| {
        let mark = if ok { "✔" } else { "✘" };
        println!("  {mark} {what:<58} {got}");
        if !ok {
            failures += 1;
        }
    };

    // A married couple of the synthetic population: the parents of a newborn.
    let people: Vec<_> = Population::new(DEMO_SEED, DEMO_CITIZENS).take(50).collect();
    let father = people
        .iter()
        .find(|p| p.spouse.is_some() && p.sex == Sex::Male && p.date_of_death.is_none())
        .context("synthetic population has no married couple")?;
    let mother_id = father.spouse.clone().context("spouse")?;

    println!("Look-ups by a civil registry (SPEC §6 steps 1 and 3):");
    match client::connect(addr, certs_dir, Some("registry-hp")).await {
        Ok(ch) => {
            let r = HealthClient::new(ch.clone())
                .check(HealthCheckRequest {
                    service: "civgate.v1.Citizens".into(),
                })
                .await;
            let serving =
                matches!(&r, Ok(resp) if resp.get_ref().status() == ServingStatus::Serving);
            check(
                serving,
                "registry-hp (civil registry) → Health.Check",
                describe_health(&r),
            );
            let mut citizens = CitizensClient::new(ch);
            for (id, who) in [
                (father.personal_id.to_string(), "father"),
                (mother_id.to_string(), "mother"),
            ] {
                let r = citizens
                    .get_citizen(GetCitizenRequest {
                        personal_id: id.clone(),
                        purpose: "BIRTH_REGISTRATION".into(),
                    })
                    .await;
                match &r {
                    Ok(resp) => {
                        let resp = resp.get_ref();
                        let c = resp.citizen.clone().unwrap_or_default();
                        let shown = present_fields(&c).len();
                        let minimised =
                            c.blood_type.is_none() && c.religion.is_none() && c.full_name.is_some();
                        check(
                            minimised,
                            &format!("GetCitizen {who} {id} (BIRTH_REGISTRATION)"),
                            format!(
                                "{} — {shown} fields, withheld {}",
                                c.full_name.unwrap_or_default(),
                                resp.withheld_fields.len()
                            ),
                        );
                    }
                    Err(s) => check(
                        false,
                        &format!("GetCitizen {who}"),
                        describe::<()>(&Err(s.clone())),
                    ),
                }
            }
            let folded = fold(&father.full_name);
            let r = citizens
                .search_citizens(SearchCitizensRequest {
                    full_name: folded.clone(),
                    date_of_birth: format_date(father.date_of_birth),
                    purpose: "BIRTH_REGISTRATION".into(),
                    ..Default::default()
                })
                .await;
            let found = matches!(&r, Ok(resp) if resp.get_ref().citizens.iter().any(|c| c.personal_id == father.personal_id.as_str()));
            check(
                found,
                &format!("SearchCitizens \"{folded}\" (accent-free)"),
                match &r {
                    Ok(resp) => format!(
                        "{} match(es), minimal fields",
                        resp.get_ref().citizens.len()
                    ),
                    Err(s) => describe::<()>(&Err(s.clone())),
                },
            );
            let r = citizens
                .verify_citizen(VerifyCitizenRequest {
                    personal_id: father.personal_id.to_string(),
                    purpose: "MARRIAGE_REGISTRATION".into(),
                    marital_status: PbMarital::Single as i32,
                    spouse_personal_id: Some(mother_id.to_string()),
                    ..Default::default()
                })
                .await;
            let got: Vec<i32> = r
                .as_ref()
                .map(|resp| resp.get_ref().matches.iter().map(|m| m.r#match).collect())
                .unwrap_or_default();
            check(
                got == vec![Match::No as i32, Match::Yes as i32],
                "VerifyCitizen father: single? spouse = mother? (MARRIAGE)",
                match &r {
                    Ok(resp) => resp
                        .get_ref()
                        .matches
                        .iter()
                        .map(|m| {
                            format!(
                                "{}: {}",
                                m.attribute,
                                if m.r#match == Match::Yes as i32 {
                                    "match"
                                } else {
                                    "no match"
                                }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    Err(s) => describe::<()>(&Err(s.clone())),
                },
            );
            let r = citizens
                .get_citizen(GetCitizenRequest {
                    personal_id: "03120300012X".into(),
                    purpose: "BIRTH_REGISTRATION".into(),
                })
                .await;
            let bad = matches!(&r, Err(s) if s.code() == tonic::Code::InvalidArgument);
            check(
                bad,
                "GetCitizen \"03120300012X\"",
                match &r {
                    Err(s) => format!("INVALID_ARGUMENT {}", s.message()),
                    Ok(_) => "OK".into(),
                },
            );
        }
        Err(e) => check(false, "registry-hp connects", format!("{e:#}")),
    }
    println!();
    println!("Identity and policy (SPEC §6 step 6):");
    for (name, what) in [
        ("auditor", "auditor → Citizens.GetCitizen (wrong role)"),
        (
            "population",
            "population → Citizens.GetCitizen (wrong role)",
        ),
        ("unknown", "unknown agency → Citizens.GetCitizen"),
    ] {
        let r = match client::connect(addr, certs_dir, Some(name)).await {
            Ok(ch) => CitizensClient::new(ch)
                .get_citizen(GetCitizenRequest {
                    personal_id: "031203000123".into(),
                    purpose: "BIRTH_REGISTRATION".into(),
                })
                .await
                .map(|_| ()),
            Err(e) => Err(tonic::Status::unavailable(format!("{e:#}"))),
        };
        let denied = matches!(&r, Err(s) if s.code() == tonic::Code::PermissionDenied);
        check(denied, what, describe(&r));
    }
    for (name, what) in [
        (Some("revoked"), "revoked certificate (listed in crl.pem)"),
        (Some("expired"), "expired certificate"),
        (Some("rogue"), "certificate from another CA"),
        (None, "no client certificate"),
    ] {
        match client::probe_handshake(addr, certs_dir, name).await {
            Ok(()) => check(false, what, "NOT REFUSED".into()),
            Err(e) => check(true, what, format!("refused at the TLS handshake: {e}")),
        }
    }

    println!();
    println!(
        "An auditor asks: who read citizen {} ? (SPEC §6 step 7)",
        father.personal_id
    );
    match audit_step(addr, certs_dir, &father.personal_id.to_string(), &data).await {
        Ok(lines) => {
            for (ok, what, got) in lines {
                check(ok, &what, got);
            }
        }
        Err(e) => check(false, "auditor", format!("{e:#}")),
    }

    gw.shutdown().await?;
    directory.shutdown().await?;
    let _ = std::fs::remove_dir_all(&data);
    println!();
    if failures > 0 {
        bail!("{failures} demo case(s) did not behave as expected");
    }
    println!("demo finished: every case behaved as expected");
    Ok(())
}

/// Search by subject, prove an entry, verify the whole log.
async fn audit_step(
    addr: std::net::SocketAddr,
    certs_dir: &Path,
    subject: &str,
    data: &Path,
) -> Result<Vec<(bool, String, String)>> {
    use crate::{
        audit::{
            auditor::{self, Online},
            note::Verifier,
        },
        pb::v1::{AuditRecord, SearchEntriesRequest},
    };
    use prost::Message;

    let verifier = Verifier::parse(&std::fs::read_to_string(certs_dir.join("audit.vkey"))?)?;
    let mut online = Online::new(client::connect(addr, certs_dir, Some("auditor")).await?);
    let mut out = Vec::new();
    let found = online
        .search(SearchEntriesRequest {
            subject_personal_id: subject.to_owned(),
            page_size: 100,
            ..Default::default()
        })
        .await?;
    let records: Vec<AuditRecord> = found
        .iter()
        .filter_map(|(_, l)| AuditRecord::decode(l.as_slice()).ok())
        .collect();
    for line in auditor::table(&records).lines() {
        println!("      {line}");
    }
    let by_registry = records
        .iter()
        .filter(|r| r.agency_id == "registry-hp")
        .count();
    out.push((
        by_registry >= 2,
        "Audit.SearchEntries by subject".to_owned(),
        format!(
            "{} entries, {by_registry} by registry-hp; identifiers and field names only",
            records.len()
        ),
    ));
    // Wait for a checkpoint that covers the entry (one is signed every 100 ms here).
    let Some((index, _)) = found.first() else {
        out.push((false, "inclusion proof".into(), "nothing to prove".into()));
        return Ok(out);
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while online.checkpoint(&verifier).await?.1.size <= *index {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no checkpoint covers entry {index}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (cp, _) = auditor::prove(&mut online, &verifier, *index).await?;
    out.push((
        true,
        format!("inclusion proof of entry {index}"),
        format!("in the signed tree of size {}", cp.size),
    ));
    let report =
        auditor::verify_online(&mut online, &verifier, &data.join("verify-state.json")).await;
    out.push(match report {
        Ok(r) => (
            true,
            "civgate audit verify".to_owned(),
            format!(
                "{} entries recomputed, root {}…, signature OK",
                r.size,
                &hex::encode(r.root)[..16]
            ),
        ),
        Err(e) => (false, "civgate audit verify".to_owned(), format!("{e:#}")),
    });
    Ok(out)
}

fn describe<T>(r: &Result<T, tonic::Status>) -> String {
    match r {
        Ok(_) => "OK".into(),
        Err(s) => crate::telemetry::code_name(s.code()).to_owned(),
    }
}

fn describe_health(
    r: &Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status>,
) -> String {
    match r {
        Ok(resp) => format!("{:?}", resp.get_ref().status()).to_uppercase(),
        Err(s) => describe::<()>(&Err(s.clone())),
    }
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("civgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
