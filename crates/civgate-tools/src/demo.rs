//! `civgate demo`: the embedded default. Creates dev certificates if missing, starts the
//! gateway on loopback with real mTLS, and walks through what exists so far — today the
//! look-ups, the identity and policy cases, the two-way sync, a linked birth and death with
//! their deadlines, and an auditor's question. Exits non-zero if any case comes out wrong.

use std::path::Path;

use anyhow::{Context, Result, bail};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    certs, client,
    config::{Config, DEFAULT_CONFIG},
    convert::present_fields,
    domain::{Sex, fold, format_date},
    pb::v1::{
        GetCitizenRequest, MaritalStatus as PbMarital, Match, SearchCitizensRequest,
        VerifyCitizenRequest, citizens_client::CitizensClient,
    },
    refdb::{self, RefdbOverrides},
    server::{self, ConfigSource, Overrides},
    synth::Population,
};

/// The demo's own flow (appended to the shipped flow table).
const DEMO_FLOW: &str = "
[[cases.flows]]
name = \"demo-death-record\"
request = \"death\"
answer = \"death_recorded\"
seconds = 2
linked_only = true
";

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
    // A flow made for the demo: a linked death must be confirmed by the police's death record
    // within 2 seconds — the reference directory never sends one, so it falls overdue.
    text.push_str(DEMO_FLOW);
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
        store_url: None,
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

    println!("Look-ups by a civil registry:");
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
                        case_reference: String::new(),
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
                    purpose: "MARRIAGE_REGISTRATION".into(),
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
            // A purpose is bound to its methods: a verification purpose is not a look-up.
            let r = citizens
                .get_citizen(GetCitizenRequest {
                    case_reference: String::new(),
                    personal_id: father.personal_id.to_string(),
                    purpose: "IDENTITY_VERIFICATION".into(),
                })
                .await;
            check(
                matches!(&r, Err(s) if s.code() == tonic::Code::PermissionDenied),
                "GetCitizen father (IDENTITY_VERIFICATION)",
                describe(&r.map(|_| ())),
            );
            let r = citizens
                .get_citizen(GetCitizenRequest {
                    case_reference: String::new(),
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
    println!("Identity and policy:");
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
                    case_reference: String::new(),
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
    println!("Two-way sync:");
    tokio::spawn({
        let (store, dir) = (directory.store.clone(), certs_dir.to_owned());
        async move {
            if let Err(e) = refdb::sync::consume(addr, &dir, store).await {
                tracing::warn!(error = %e, "directory consumer stopped");
            }
        }
    });
    match sync_steps(addr, certs_dir, father, &mother_id).await {
        Ok(lines) => {
            for (ok, what, got) in lines {
                check(ok, &what, got);
            }
        }
        Err(e) => check(false, "two-way sync", format!("{e:#}")),
    }

    println!();
    println!("Cases with deadlines (a linked birth and a linked death across three agencies):");
    if !certs_dir.join("clients/social-insurance.pem").exists() {
        // Certificates made before the social-insurance agency existed.
        println!(
            "  – skipped: {} has no social-insurance certificate (`civgate certs init --dir {} --force` makes one)",
            certs_dir.display(),
            certs_dir.display()
        );
    } else {
        tokio::spawn({
            let dir = certs_dir.to_owned();
            async move {
                if let Err(e) = refdb::social::consume(addr, &dir).await {
                    tracing::warn!(error = %e, "social-insurance consumer stopped");
                }
            }
        });
        let alive = people
            .iter()
            .rev()
            .find(|p| {
                p.date_of_death.is_none()
                    && p.personal_id != father.personal_id
                    && Some(&p.personal_id) != father.spouse.as_ref()
            })
            .context("a living citizen")?;
        match cases_steps(addr, certs_dir, alive).await {
            Ok((lines, table)) => {
                for (ok, what, got) in lines {
                    check(ok, &what, got);
                }
                for line in table.lines() {
                    println!("      {line}");
                }
            }
            Err(e) => check(false, "cases", format!("{e:#}")),
        }
    }

    println!();
    println!("An auditor asks: who read citizen {} ?", father.personal_id);
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

/// The two-way sync against the running gateway and directory consumer.
async fn sync_steps(
    addr: std::net::SocketAddr,
    certs_dir: &Path,
    father: &crate::synth::CitizenRecord,
    mother_id: &crate::domain::PersonalId,
) -> Result<Vec<(bool, String, String)>> {
    use crate::pb::v1::{
        AckRequest, Birth, Death, DeathRecorded, DeliveryState, Event, Marriage, Parent,
        PublishRequest, Sex as PbSex, SubscribeRequest, event::Payload,
        exchange_client::ExchangeClient,
    };
    use std::time::Duration;

    let mut out = Vec::new();
    let reg_ch = client::connect(addr, certs_dir, Some("registry-hp")).await?;
    let mut reg = ExchangeClient::new(reg_ch.clone());
    let mut citizens = CitizensClient::new(reg_ch);
    let mut pop = ExchangeClient::new(client::connect(addr, certs_dir, Some("population")).await?);
    let today = crate::domain::today();
    let registration = |entry: &str| registration_today(today, entry);
    // The registry listens to the population topic.
    let mut from_population = reg
        .subscribe(SubscribeRequest {
            topic: "population".into(),
            consumer_group: "registry-hp".into(),
            from_sequence: None,
        })
        .await?
        .into_inner();
    let mut next_population = async || -> Result<crate::pb::v1::SubscribedEvent> {
        let m = tokio::time::timeout(Duration::from_secs(10), from_population.message())
            .await
            .context("no population event within 10 s")??
            .context("stream ended")?;
        Ok(m)
    };

    // 1. Birth.
    let family = father.full_name.split(' ').next().unwrap_or("Nguyễn");
    let child = format!("{family} Thị Mai");
    let dob = today - time::Duration::days(2);
    let birth = Event {
        case_reference: String::new(),
        occurred_at_unix_ms: crate::audit::log::now_ms(),
        in_reply_to: String::new(),
        payload: Some(Payload::Birth(Birth {
            registration: Some(registration("101")),
            full_name: child.clone(),
            sex: PbSex::Female as i32,
            date_of_birth: format_date(dob),
            place_of_birth: "Bệnh viện Phụ sản Hải Phòng".into(),
            hometown: "Hải Phòng".into(),
            ethnicity: "Kinh".into(),
            nationality: "Việt Nam".into(),
            birth_registration_province_code: "031".into(),
            father: Some(Parent {
                personal_id: Some(father.personal_id.to_string()),
                full_name: father.full_name.clone(),
                ..Default::default()
            }),
            mother: Some(Parent {
                personal_id: Some(mother_id.to_string()),
                ..Default::default()
            }),
            foundling: false,
            personal_id: None,
        })),
    };
    let birth_again = birth.clone();
    let receipt = reg
        .publish(PublishRequest {
            idempotency_key: "demo-birth-101".into(),
            event: Some(birth),
        })
        .await?
        .into_inner();
    out.push((
        true,
        "registry-hp publishes birth (Exchange.Publish)".to_owned(),
        format!("{child}: {} #{}", receipt.topic, receipt.sequence),
    ));

    // 2. The directory answers with the new personal ID.
    let answer = next_population().await?;
    let new_id = match answer.event {
        Some(crate::pb::v1::Event {
            in_reply_to,
            payload: Some(Payload::PersonalIdAssigned(a)),
            ..
        }) if in_reply_to == receipt.event_id => a.personal_id,
        other => anyhow::bail!("expected personal_id_assigned answering the birth, got {other:?}"),
    };
    reg.ack(AckRequest {
        topic: "population".into(),
        consumer_group: "registry-hp".into(),
        sequence: answer.sequence,
    })
    .await?;
    let looked = citizens
        .get_citizen(GetCitizenRequest {
            case_reference: String::new(),
            personal_id: new_id.clone(),
            purpose: "BIRTH_REGISTRATION".into(),
        })
        .await?
        .into_inner()
        .citizen
        .unwrap_or_default();
    out.push((
        looked.full_name.as_deref() == Some(child.as_str()),
        "directory creates the citizen, answers personal_id_assigned".to_owned(),
        format!("{new_id} (registry consumed and acked)"),
    ));

    // 2b. The same birth registered again (đăng ký lại khai sinh: the book was lost), naming
    // the ID the child has: the directory keeps it instead of minting a second one.
    let mut again = birth_again.clone();
    if let Some(Payload::Birth(b)) = &mut again.payload {
        b.registration = Some(registration("102"));
        b.personal_id = Some(new_id.clone());
    }
    let receipt = reg
        .publish(PublishRequest {
            idempotency_key: "demo-birth-102".into(),
            event: Some(again),
        })
        .await?
        .into_inner();
    let answer = next_population().await?;
    let kept = match answer.event {
        Some(crate::pb::v1::Event {
            in_reply_to,
            payload: Some(Payload::PersonalIdAssigned(a)),
            ..
        }) if in_reply_to == receipt.event_id => a.personal_id,
        other => anyhow::bail!(
            "expected personal_id_assigned answering the re-registration, got {other:?}"
        ),
    };
    reg.ack(AckRequest {
        topic: "population".into(),
        consumer_group: "registry-hp".into(),
        sequence: answer.sequence,
    })
    .await?;
    out.push((
        kept == new_id,
        "a re-registered birth keeps the personal ID the person has".to_owned(),
        format!("answered {kept}"),
    ));

    // 3. Marriage of two single adults, checked first.
    let people: Vec<_> = Population::new(DEMO_SEED, DEMO_CITIZENS)
        .take(3_000)
        .collect();
    let single = |sex: Sex| {
        people.iter().find(|p| {
            p.sex == sex
                && p.marital_status == crate::synth::MaritalStatus::Single
                && p.date_of_death.is_none()
                && p.date_of_birth.year() < 2000
        })
    };
    let (Some(groom), Some(bride)) = (single(Sex::Male), single(Sex::Female)) else {
        anyhow::bail!("no two single adults in the synthetic population");
    };
    for p in [groom, bride] {
        let r = citizens
            .verify_citizen(VerifyCitizenRequest {
                personal_id: p.personal_id.to_string(),
                purpose: "MARRIAGE_REGISTRATION".into(),
                marital_status: PbMarital::Single as i32,
                ..Default::default()
            })
            .await?
            .into_inner();
        anyhow::ensure!(
            r.matches.first().map(|m| m.r#match) == Some(Match::Yes as i32),
            "{} is not single",
            p.personal_id
        );
    }
    let marriage = Event {
        case_reference: String::new(),
        occurred_at_unix_ms: crate::audit::log::now_ms(),
        in_reply_to: String::new(),
        payload: Some(Payload::Marriage(Marriage {
            registration: Some(registration("102")),
            spouse1_personal_id: groom.personal_id.to_string(),
            spouse1_full_name: groom.full_name.clone(),
            spouse2_personal_id: bride.personal_id.to_string(),
            spouse2_full_name: bride.full_name.clone(),
            date_of_marriage: format_date(today),
        })),
    };
    let m = reg
        .publish(PublishRequest {
            idempotency_key: "demo-marriage-102".into(),
            event: Some(marriage),
        })
        .await?
        .into_inner();
    let state = wait_state(&mut reg, &m.event_id).await?;
    let now = citizens
        .get_citizen(GetCitizenRequest {
            case_reference: String::new(),
            personal_id: groom.personal_id.to_string(),
            purpose: "MARITAL_STATUS_CONFIRMATION".into(),
        })
        .await?
        .into_inner()
        .citizen
        .unwrap_or_default();
    out.push((
        state.0 == DeliveryState::Acknowledged as i32
            && now.marital_status == PbMarital::Married as i32,
        "marriage: verified single, published, applied".to_owned(),
        format!(
            "{} now MARRIED to {}",
            groom.personal_id,
            now.spouse_personal_ids.join(",")
        ),
    ));

    // 4. A death recorded by the police reaches the civil-status side: the registry whose
    // province the citizen's ID names (registry-hp: 031, Hải Phòng).
    let deceased = people
        .iter()
        .filter(|p| p.date_of_death.is_none() && p.personal_id.province_code() == "031")
        .min_by_key(|p| p.date_of_birth)
        .unwrap_or(groom);
    let recorded = Event {
        case_reference: String::new(),
        occurred_at_unix_ms: crate::audit::log::now_ms(),
        in_reply_to: String::new(),
        payload: Some(Payload::DeathRecorded(DeathRecorded {
            personal_id: deceased.personal_id.to_string(),
            date_of_death: format_date(today - time::Duration::days(1)),
            recording_unit: "Công an phường Lê Chân".into(),
        })),
    };
    pop.publish(PublishRequest {
        idempotency_key: format!("demo-death-{}", deceased.personal_id),
        event: Some(recorded),
    })
    .await?;
    let got = next_population().await?;
    let ok = matches!(got.event.as_ref().and_then(|e| e.payload.as_ref()), Some(Payload::DeathRecorded(d)) if d.personal_id == deceased.personal_id.as_str());
    reg.ack(AckRequest {
        topic: "population".into(),
        consumer_group: "registry-hp".into(),
        sequence: got.sequence,
    })
    .await?;
    out.push((
        ok,
        "population side records a death; registry receives it".to_owned(),
        format!("{} (population #{})", deceased.personal_id, got.sequence),
    ));

    // 5. A conflicting event: the death of a citizen already dead.
    let dead = people
        .iter()
        .find(|p| p.date_of_death.is_some())
        .context("no dead citizen in the synthetic population")?;
    let death = Event {
        case_reference: String::new(),
        occurred_at_unix_ms: crate::audit::log::now_ms(),
        in_reply_to: String::new(),
        payload: Some(Payload::Death(Death {
            registration: Some(registration("103")),
            personal_id: dead.personal_id.to_string(),
            date_of_death: format_date(today),
            place_of_death: "Hải Phòng".into(),
            cause_category: "natural".into(),
            declarant_personal_id: String::new(),
        })),
    };
    let d = reg
        .publish(PublishRequest {
            idempotency_key: "demo-death-103".into(),
            event: Some(death),
        })
        .await?
        .into_inner();
    let (state, reason) = wait_state(&mut reg, &d.event_id).await?;
    out.push((
        state == DeliveryState::Rejected as i32,
        "death of an already-dead citizen is rejected".to_owned(),
        format!("GetEventStatus: REJECTED — {reason}"),
    ));

    // 6. Another registry can neither read the civil-status topic nor act for the
    // directory's consumer group (certificates made before registry-hn existed skip this).
    if certs_dir.join("clients/registry-hn.pem").exists() {
        let mut hn =
            ExchangeClient::new(client::connect(addr, certs_dir, Some("registry-hn")).await?);
        let denied = hn
            .subscribe(SubscribeRequest {
                topic: "civil-status".into(),
                consumer_group: refdb::sync::GROUP.into(),
                from_sequence: None,
            })
            .await
            .err()
            .map(|e| e.code());
        out.push((
            denied == Some(tonic::Code::PermissionDenied),
            "registry-hn → Subscribe civil-status as \"population-db\"".to_owned(),
            format!("{denied:?}: the topic is the population database's"),
        ));
    }
    Ok(out)
}

/// A linked birth answered by the population database (ID, residence) and the
/// social-insurance agency (card); a linked death whose demo flow nobody answers, shown
/// overdue as `civgate cases overdue` shows it.
async fn cases_steps(
    addr: std::net::SocketAddr,
    certs_dir: &Path,
    alive: &crate::synth::CitizenRecord,
) -> Result<(Vec<(bool, String, String)>, String)> {
    use crate::pb::v1::{
        Birth, Death, Event, ListOpenRequestsRequest, OpenRequest, Parent, PublishRequest,
        Sex as PbSex, event::Payload, exchange_client::ExchangeClient,
    };
    use std::time::Duration;
    let mut out = Vec::new();
    let mut reg = ExchangeClient::new(client::connect(addr, certs_dir, Some("registry-hp")).await?);
    let today = crate::domain::today();
    let registration = |entry: &str| registration_today(today, entry);
    const BIRTH_CASE: &str = "HP-DEMO-0001";
    const DEATH_CASE: &str = "HP-DEMO-0002";
    let birth = Event {
        case_reference: BIRTH_CASE.into(),
        occurred_at_unix_ms: crate::audit::log::now_ms(),
        in_reply_to: String::new(),
        payload: Some(Payload::Birth(Birth {
            registration: Some(registration("201")),
            full_name: "Đỗ Minh Khang".into(),
            sex: PbSex::Male as i32,
            date_of_birth: format_date(today - time::Duration::days(3)),
            place_of_birth: "Bệnh viện Phụ sản Hải Phòng".into(),
            hometown: "Hải Phòng".into(),
            ethnicity: "Kinh".into(),
            nationality: "Việt Nam".into(),
            birth_registration_province_code: "031".into(),
            mother: Some(Parent {
                full_name: "Đỗ Thị Hạnh".into(),
                residence: "15 Lạch Tray, Phường Ngô Quyền, Hải Phòng".into(),
                ..Default::default()
            }),
            ..Default::default()
        })),
    };
    reg.publish(PublishRequest {
        idempotency_key: "demo-linked-birth-201".into(),
        event: Some(birth),
    })
    .await?;
    let list = |case: &str, overdue_only: bool| ListOpenRequestsRequest {
        case_reference: case.into(),
        overdue_only,
        ..Default::default()
    };
    // Wait (at most 10 s) until every step of the birth's case is answered.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let steps: Vec<OpenRequest> = loop {
        let v = reg
            .list_open_requests(list(BIRTH_CASE, false))
            .await?
            .into_inner()
            .requests;
        if (!v.is_empty() && v.iter().all(|r| r.answered_at_unix_ms > 0))
            || std::time::Instant::now() > deadline
        {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let answered: Vec<String> = steps
        .iter()
        .filter(|r| r.answered_at_unix_ms > 0)
        .map(|r| format!("{} by {}", r.answer_kind, r.answered_by_agency_id))
        .collect();
    out.push((
        steps.len() == 3 && answered.len() == 3,
        format!("linked birth {BIRTH_CASE}: three steps, three agencies"),
        answered.join("; "),
    ));
    // A linked death: residence deleted and funeral allowance answered; the demo's 2-second
    // flow (the police's death record) is not.
    let death = Event {
        case_reference: DEATH_CASE.into(),
        occurred_at_unix_ms: crate::audit::log::now_ms(),
        in_reply_to: String::new(),
        payload: Some(Payload::Death(Death {
            registration: Some(registration("202")),
            personal_id: alive.personal_id.to_string(),
            date_of_death: format_date(today),
            place_of_death: "Hải Phòng".into(),
            cause_category: "natural".into(),
            declarant_personal_id: String::new(),
        })),
    };
    reg.publish(PublishRequest {
        idempotency_key: "demo-linked-death-202".into(),
        event: Some(death),
    })
    .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let overdue: Vec<OpenRequest> = loop {
        let v = reg
            .list_open_requests(list(DEATH_CASE, true))
            .await?
            .into_inner()
            .requests;
        if !v.is_empty() || std::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // What `civgate cases overdue` prints for it.
    let now = crate::audit::log::now_ms();
    let table = crate::audit::cases::table(&overdue, now);
    out.push((
        overdue.len() == 1
            && overdue[0].answer_kind == "death_recorded"
            && overdue[0].awaiting_agency_ids == ["population"],
        format!("linked death {DEATH_CASE}: one step left unanswered"),
        "civgate cases overdue:".to_owned(),
    ));
    Ok((out, table))
}

/// A registration made today at Lê Chân (Hải Phòng), entry `entry` of this year's book.
fn registration_today(today: time::Date, entry: &str) -> crate::pb::v1::Registration {
    crate::pb::v1::Registration {
        registry_office_code: "HP-LECHAN".into(),
        book_number: format!("{}/KS", today.year()),
        entry_number: entry.into(),
        registration_date: format_date(today),
        registering_official: "Phạm Thị Thu".into(),
        country: String::new(),
    }
}

/// Waits until the directory's consumer group has acknowledged or rejected an event.
async fn wait_state(
    ex: &mut crate::pb::v1::exchange_client::ExchangeClient<tonic::transport::Channel>,
    event_id: &str,
) -> Result<(i32, String)> {
    use crate::pb::v1::{DeliveryState, GetEventStatusRequest};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let st = ex
            .get_event_status(GetEventStatusRequest {
                event_id: event_id.into(),
            })
            .await?
            .into_inner();
        // Rejected events are acknowledged too; the rejection is what the producer must see.
        // The directory's group: the producer sees its agency, not its name.
        if let Some(g) = st.groups.iter().find(|g| {
            g.consumer_agency_id == "population"
                && (g.state == DeliveryState::Rejected as i32
                    || g.state == DeliveryState::Acknowledged as i32)
        }) {
            return Ok((g.state, g.reason.clone()));
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "event {event_id} not handled within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
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
