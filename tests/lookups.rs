//! Citizen look-ups through the gateway to the reference directory, over real mTLS both ways.

mod common;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use civgate::{
    client,
    config::{Config, DEFAULT_CONFIG},
    convert::{mask, record_to_pb},
    domain::{fold, format_date},
    pb::v1::{
        BatchGetCitizensRequest, GetCitizenRequest, Match, SearchCitizensRequest, Sex,
        VerifyCitizenRequest, batch_get_citizens_result, citizens_client::CitizensClient,
    },
};
use civgate::{domain::CitizenField, policy::purposes::CitizensMethod};
use common::{Directory, Env};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
    health_client::HealthClient,
};
use tonic_types::StatusExt;
use unicode_normalization::UnicodeNormalization;

async fn registry(env: &Env, addr: std::net::SocketAddr) -> CitizensClient<Channel> {
    citizens_as(env, addr, "registry-hp").await
}

async fn citizens_as(
    env: &Env,
    addr: std::net::SocketAddr,
    agency: &str,
) -> CitizensClient<Channel> {
    CitizensClient::new(
        client::connect(addr, &env.certs(), Some(agency))
            .await
            .unwrap(),
    )
}

fn get(id: &str, purpose: &str) -> GetCitizenRequest {
    GetCitizenRequest {
        case_reference: String::new(),
        personal_id: id.into(),
        purpose: purpose.into(),
    }
}

/// The field named in the BadRequest detail of an INVALID_ARGUMENT.
fn violated_fields(s: &tonic::Status) -> Vec<String> {
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    s.get_details_bad_request()
        .expect("BadRequest detail")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect()
}

#[tokio::test]
async fn each_purpose_returns_exactly_its_fields() {
    let env = Env::new();
    let stack = env.start_stack().await;
    let mut c = registry(&env, stack.gateway.api_addr).await;
    // The social-insurance agency declares its own purposes (within a case).
    let mut si = citizens_as(&env, stack.gateway.api_addr, "social-insurance").await;
    let cfg = Config::parse(DEFAULT_CONFIG, "t".into(), ".".into()).unwrap();
    // A married parent: has spouse, residence, everything but parents.
    let p = stack.people.iter().find(|p| p.spouse.is_some()).unwrap();
    for (code, purpose) in &cfg.file.purposes {
        if !purpose.methods.contains(&CitizensMethod::GetCitizen) {
            continue; // each_purpose_is_declared_only_with_its_methods
        }
        let allowed: BTreeSet<_> = purpose.fields.iter().copied().collect();
        let mut expected = record_to_pb(p);
        mask(&mut expected, &allowed);
        let by_registry = purpose
            .roles
            .contains(&civgate::domain::Role::CivilRegistry);
        let caller = if by_registry { &mut c } else { &mut si };
        let mut req = get(p.personal_id.as_str(), code.as_str());
        if purpose.requires_case_reference {
            req.case_reference = "HP-2026-0001".into();
        }
        let r = caller.get_citizen(req).await.unwrap().into_inner();
        assert_eq!(r.citizen.unwrap(), expected, "purpose {}", code.as_str());
        let withheld: BTreeSet<_> = r.withheld_fields.iter().map(String::as_str).collect();
        for f in civgate::domain::CitizenField::ALL {
            assert_eq!(
                withheld.contains(f.name()),
                !allowed.contains(&f),
                "{}: {f:?}",
                code.as_str()
            );
        }
    }
    // Marriage registration sees marital status and spouse, not blood type or religion.
    let r = c
        .get_citizen(get(p.personal_id.as_str(), "MARRIAGE_REGISTRATION"))
        .await
        .unwrap()
        .into_inner();
    let citizen = r.citizen.unwrap();
    assert!(citizen.marital_status != 0 && !citizen.spouse_personal_ids.is_empty());
    assert!(citizen.blood_type.is_none() && citizen.religion.is_none());
    // A birth registration sees the parent's year of birth, not the date, and one residence.
    let citizen = c
        .get_citizen(get(p.personal_id.as_str(), "BIRTH_REGISTRATION"))
        .await
        .unwrap()
        .into_inner()
        .citizen
        .unwrap();
    assert_eq!(
        citizen.year_of_birth,
        u32::try_from(p.date_of_birth.year()).ok()
    );
    assert!(citizen.date_of_birth.is_none() && citizen.current_residence.is_none());
    assert!(citizen.spouse_personal_ids.is_empty() && citizen.marital_status == 0);
}

/// Every purpose of the shipped config against every `Citizens` method: a purpose declared
/// with a method it is not bound to is PERMISSION_DENIED, before the directory is asked, and the
/// refusal is in the audit log; one it is bound to is served. Then a purpose bound to another
/// role.
#[tokio::test]
async fn each_purpose_is_declared_only_with_its_methods() {
    let env = Env::new();
    let Directory { directory, people } = env.start_directory().await;
    // One extra purpose that only an auditor may declare.
    let text = format!(
        "{}\n[purposes.INSPECTION]\nfields = [\"full_name\"]\nmethods = [\"GetCitizen\"]\nroles = [\"auditor\"]\n",
        common::with_upstream_port(DEFAULT_CONFIG, directory.addr.port())
    );
    let gw = env.start_with(&text).await;
    let mut c = registry(&env, gw.api_addr).await;
    let cfg = Config::parse(&text, "t".into(), ".".into()).unwrap();
    let p = people.iter().find(|p| p.spouse.is_some()).unwrap();
    let id = p.personal_id.to_string();
    let dob = format_date(p.date_of_birth);
    let mut refused = 0;
    for (code, purpose) in &cfg.file.purposes {
        for method in CitizensMethod::ALL {
            let purpose_name = code.as_str().to_owned();
            let r: Result<(), tonic::Status> = match method {
                CitizensMethod::GetCitizen => {
                    c.get_citizen(get(&id, &purpose_name)).await.map(drop)
                }
                CitizensMethod::BatchGetCitizens => c
                    .batch_get_citizens(BatchGetCitizensRequest {
                        personal_ids: vec![id.clone()],
                        purpose: purpose_name.clone(),
                        case_reference: String::new(),
                    })
                    .await
                    .map(drop),
                CitizensMethod::VerifyCitizen => {
                    // Claim one attribute the purpose may check.
                    let verifiable = purpose.verifiable();
                    let mut req = VerifyCitizenRequest {
                        personal_id: id.clone(),
                        purpose: purpose_name.clone(),
                        ..Default::default()
                    };
                    if verifiable.contains(&CitizenField::FullName) {
                        req.full_name = Some(p.full_name.clone());
                    } else if verifiable.contains(&CitizenField::SpousePersonalIds) {
                        req.spouse_personal_id = p.spouse.as_ref().map(ToString::to_string);
                    } else {
                        req.sex = Sex::Male as i32;
                    }
                    c.verify_citizen(req).await.map(drop)
                }
                CitizensMethod::SearchCitizens => c
                    .search_citizens(SearchCitizensRequest {
                        full_name: p.full_name.clone(),
                        date_of_birth: dob.clone(),
                        purpose: purpose_name.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            };
            let bound = purpose.methods.contains(&method)
                && purpose
                    .roles
                    .contains(&civgate::domain::Role::CivilRegistry);
            match r {
                Ok(()) => assert!(bound, "{purpose_name} with {method} was served"),
                Err(e) => {
                    assert!(!bound, "{purpose_name} with {method}: {e:?}");
                    assert_eq!(e.code(), Code::PermissionDenied, "{purpose_name} {method}");
                    assert!(
                        e.message().contains(&purpose_name),
                        "{purpose_name} {method}: {}",
                        e.message()
                    );
                    refused += 1;
                }
            }
        }
    }
    assert!(
        refused >= 10,
        "the shipped purposes bind methods: {refused}"
    );
    // The look-up dressed as a verification, in the audit log as refused.
    let mut audit = civgate::pb::v1::audit_client::AuditClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("auditor"))
            .await
            .unwrap(),
    );
    // Each record is committed before its answer is sent: it is there now.
    let records: Vec<_> = common::search_records(
        &mut audit,
        civgate::pb::v1::SearchEntriesRequest {
            method: "/civgate.v1.Citizens/GetCitizen".into(),
            outcome: "PERMISSION_DENIED".into(),
            page_size: 1000,
            ..Default::default()
        },
    )
    .await
    .into_iter()
    .filter(|r| r.purpose == "IDENTITY_VERIFICATION")
    .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].outcome, "PERMISSION_DENIED", "{records:?}");
    assert_eq!(records[0].detail, "purpose_not_for_method", "{records:?}");
    assert!(records[0].fields_returned.is_empty());
    // Whom it was about: a search by citizen finds the attempt.
    assert_eq!(
        records[0].subject_personal_ids,
        std::slice::from_ref(&id),
        "{records:?}"
    );
}

#[tokio::test]
async fn search_finds_nfc_records_from_nfd_and_accent_free_names() {
    let env = Env::new();
    let stack = env.start_stack().await;
    let mut c = registry(&env, stack.gateway.api_addr).await;
    let p = &stack.people[17];
    let dob = format_date(p.date_of_birth);
    for name in [
        p.full_name.nfd().collect::<String>(),
        fold(&p.full_name),
        p.full_name.to_uppercase(),
    ] {
        let r = c
            .search_citizens(SearchCitizensRequest {
                case_reference: String::new(),
                full_name: name.clone(),
                date_of_birth: dob.clone(),
                purpose: "DEATH_REGISTRATION".into(),
                province_code: Some(p.personal_id.province_code().into()),
                max_results: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let hit = r
            .citizens
            .iter()
            .find(|x| x.personal_id == p.personal_id.as_str());
        let hit = hit.unwrap_or_else(|| panic!("{name:?} did not find {}", p.full_name));
        assert_eq!(hit.full_name.as_deref(), Some(p.full_name.as_str()));
        // Minimal fields only.
        assert!(hit.permanent_residence.is_none() && hit.ethnicity.is_none());
    }
    let err = c
        .search_citizens(SearchCitizensRequest {
            case_reference: String::new(),
            full_name: "Nguyễn Văn An".into(),
            date_of_birth: "1990-02-30".into(),
            purpose: "DEATH_REGISTRATION".into(),
            province_code: Some("003".into()),
            max_results: 5,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["date_of_birth", "province_code"]);
}

#[tokio::test]
async fn every_malformed_id_class_is_invalid_argument_naming_the_field() {
    let env = Env::new();
    let stack = env.start_stack().await;
    let mut c = registry(&env, stack.gateway.api_addr).await;
    for bad in [
        "03120300012",
        "0312030001234",
        "03120300012a",
        "003203000123",
        "",
    ] {
        let err = c
            .get_citizen(get(bad, "DEATH_REGISTRATION"))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), ["personal_id"], "{bad:?}");
    }
    // Sex and century/year digits inconsistent with the claim.
    let p = stack
        .people
        .iter()
        .find(|p| p.sex == civgate::domain::Sex::Male)
        .unwrap();
    let wrong_sex = VerifyCitizenRequest {
        personal_id: p.personal_id.to_string(),
        purpose: "IDENTITY_VERIFICATION".into(),
        sex: Sex::Female as i32,
        ..Default::default()
    };
    let err = c.verify_citizen(wrong_sex).await.unwrap_err();
    assert_eq!(violated_fields(&err), ["personal_id"]);
    let wrong_century = VerifyCitizenRequest {
        personal_id: p.personal_id.to_string(),
        purpose: "IDENTITY_VERIFICATION".into(),
        date_of_birth: Some(format!("{}-01-01", p.date_of_birth.year() + 100)),
        ..Default::default()
    };
    let err = c.verify_citizen(wrong_century).await.unwrap_err();
    assert_eq!(violated_fields(&err), ["personal_id"]);

    // Unknown or missing purpose.
    let err = c
        .get_citizen(get(p.personal_id.as_str(), "CURIOSITY"))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["purpose"]);
    let err = c
        .get_citizen(get(p.personal_id.as_str(), ""))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["purpose"]);

    // Well-formed but not in the directory.
    let absent =
        civgate::domain::PersonalId::compose("031", civgate::domain::Sex::Male, 2399, 1).unwrap();
    let err = c
        .get_citizen(get(absent.as_str(), "DEATH_REGISTRATION"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn verify_discloses_only_match_flags() {
    let env = Env::new();
    let stack = env.start_stack().await;
    let mut c = registry(&env, stack.gateway.api_addr).await;
    let p = stack.people.iter().find(|p| p.spouse.is_some()).unwrap();
    let r = c
        .verify_citizen(VerifyCitizenRequest {
            personal_id: p.personal_id.to_string(),
            purpose: "MARRIAGE_REGISTRATION".into(),
            full_name: Some(fold(&p.full_name)),
            date_of_birth: Some(format_date(p.date_of_birth)),
            spouse_personal_id: p.spouse.as_ref().map(ToString::to_string),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = r
        .matches
        .iter()
        .map(|m| (m.attribute.as_str(), m.r#match))
        .collect();
    // Accent-free name is not the recorded name: verification compares exactly (up to case).
    assert_eq!(
        got,
        [
            ("full_name", Match::No as i32),
            ("date_of_birth", Match::Yes as i32),
            ("spouse_personal_id", Match::Yes as i32)
        ]
    );
    // The old and the new placement of a tone mark are one name (Thủy / Thuỷ).
    if let Some(t) = stack.people.iter().find(|t| t.full_name.contains("Thủy")) {
        let r = c
            .verify_citizen(VerifyCitizenRequest {
                personal_id: t.personal_id.to_string(),
                purpose: "IDENTITY_VERIFICATION".into(),
                full_name: Some(t.full_name.replace("Thủy", "Thuỷ")),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.matches[0].r#match, Match::Yes as i32, "{}", t.full_name);
    } else {
        panic!("the synthetic population has a Thủy");
    }
    // An attribute outside the purpose is refused, not answered.
    let err = c
        .verify_citizen(VerifyCitizenRequest {
            personal_id: p.personal_id.to_string(),
            purpose: "IDENTITY_VERIFICATION".into(),
            spouse_personal_id: p.spouse.as_ref().map(ToString::to_string),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["spouse_personal_id"]);
}

#[tokio::test]
async fn batch_mixes_results_and_per_id_errors() {
    let env = Env::new();
    let stack = env.start_stack().await;
    let mut c = registry(&env, stack.gateway.api_addr).await;
    let good = stack.people[3].personal_id.to_string();
    let absent = civgate::domain::PersonalId::compose("031", civgate::domain::Sex::Female, 2398, 7)
        .unwrap()
        .to_string();
    let ids = vec![good.clone(), "12345".into(), absent.clone(), good.clone()];
    let r = c
        .batch_get_citizens(BatchGetCitizensRequest {
            case_reference: String::new(),
            personal_ids: ids.clone(),
            purpose: "DEATH_REGISTRATION".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.results
            .iter()
            .map(|x| x.personal_id.clone())
            .collect::<Vec<_>>(),
        ids
    );
    let kinds: Vec<_> = r
        .results
        .iter()
        .map(|x| match x.result.as_ref().unwrap() {
            batch_get_citizens_result::Result::Citizen(c) => {
                assert!(c.blood_type.is_none());
                "citizen".to_owned()
            }
            batch_get_citizens_result::Result::Error(e) => format!("{:?}", Code::from_i32(e.code)),
        })
        .collect();
    assert_eq!(kinds, ["citizen", "InvalidArgument", "NotFound", "citizen"]);

    let err = c
        .batch_get_citizens(BatchGetCitizensRequest {
            case_reference: String::new(),
            personal_ids: vec![],
            purpose: "DEATH_REGISTRATION".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["personal_ids"]);
    let err = c
        .batch_get_citizens(BatchGetCitizensRequest {
            case_reference: String::new(),
            personal_ids: vec![good; 101],
            purpose: "DEATH_REGISTRATION".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["personal_ids"]);
}

#[tokio::test]
async fn random_bytes_as_ids_and_names_never_panic() {
    use rand::{Rng, SeedableRng};
    let env = Env::new();
    let stack = env.start_directory().await;
    // 20,000 calls in a few seconds: far above the default read quota.
    let text = common::with_upstream_port(DEFAULT_CONFIG, stack.directory.addr.port()).replace(
        "reads = { per_second = 500, burst = 1000 }",
        "reads = { per_second = 100000, burst = 100000 }",
    );
    let gw = env.start_with(&text).await;
    let c = registry(&env, gw.api_addr).await;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(t);
            for _ in 0..1_250 {
                let len = rng.random_range(0..40);
                let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                let s = String::from_utf8_lossy(&bytes).into_owned();
                let e = c
                    .get_citizen(get(&s, "DEATH_REGISTRATION"))
                    .await
                    .unwrap_err();
                assert!(
                    matches!(e.code(), Code::InvalidArgument | Code::NotFound),
                    "{e:?}"
                );
                let r = c
                    .search_citizens(SearchCitizensRequest {
                        full_name: s,
                        date_of_birth: "1990-01-01".into(),
                        purpose: "DEATH_REGISTRATION".into(),
                        ..Default::default()
                    })
                    .await;
                assert!(r.is_ok() || r.unwrap_err().code() == Code::InvalidArgument);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Still serving.
    let mut c = c;
    let p = &stack.people[0];
    c.get_citizen(get(p.personal_id.as_str(), "DEATH_REGISTRATION"))
        .await
        .unwrap();
}

#[tokio::test]
async fn hanging_upstream_gives_deadline_exceeded_within_the_callers_deadline() {
    let env = Env::new();
    // Accepts TCP and never answers.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hang.local_addr().unwrap().port();
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let gw = env
        .start_with(&common::with_upstream_port(DEFAULT_CONFIG, port))
        .await;
    let mut c = registry(&env, gw.api_addr).await;
    let mut req = tonic::Request::new(get("031203000123", "DEATH_REGISTRATION"));
    req.set_timeout(Duration::from_millis(400));
    let started = Instant::now();
    let err = c.get_citizen(req).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Unavailable),
        "{err:?}"
    );
    assert!(took < Duration::from_millis(1_500), "took {took:?}");
}

/// The next status a health Watch stream reports (within 10 s).
async fn next_status(s: &mut tonic::Streaming<HealthCheckResponse>) -> ServingStatus {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a health change within 10 s")
        .unwrap()
        .unwrap()
        .status()
}

/// The reference directory as its own process (2,000 citizens, seed 5) on 127.0.0.1:`port`, its
/// store in `data` under the test's directory; returns once it says it is serving.
fn directory_process(env: &Env, port: u16, data: &str) -> std::process::Child {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_civgate"))
        .args(["--log-format", "json", "refdb", "serve", "--config"])
        .arg(env.config_path())
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--citizens",
            "2000",
            "--seed",
            "5",
        ])
        .arg("--data-dir")
        .arg(env.dir.path().join(data))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let served = std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("directory serving"));
    assert!(served, "directory {data} did not start");
    child
}

// Two threads: the admin port is read with a blocking HTTP client while the gateway serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_load_gives_unavailable_then_recovers() {
    let env = Env::new();
    // The directory as its own process, on a fixed port so it can come back there.
    let port = common::free_port();
    let mut dir = directory_process(&env, port, "refdb");
    let gw = env
        .start_with(&common::with_upstream_port(DEFAULT_CONFIG, port))
        .await;
    let people: Vec<_> = civgate::synth::Population::new(5, 2000).collect();
    let c = registry(&env, gw.api_addr).await;
    let id = people[1].personal_id.to_string();
    // An orchestrator's view: gRPC health on the admin port, plain HTTP/2, no certificate.
    let admin = tonic::transport::Endpoint::from_shared(format!("http://{}", gw.admin_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut probe = HealthClient::new(admin);
    let watch = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let mut citizens = probe
        .watch(watch("civgate.v1.Citizens"))
        .await
        .unwrap()
        .into_inner();
    // Serving once the directory has answered a probe.
    let mut status = next_status(&mut citizens).await;
    if status != ServingStatus::Serving {
        status = next_status(&mut citizens).await;
    }
    assert_eq!(status, ServingStatus::Serving);

    let call = |mut c: CitizensClient<Channel>, id: String| async move {
        let mut req = tonic::Request::new(get(&id, "DEATH_REGISTRATION"));
        req.set_timeout(Duration::from_millis(800));
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(3), c.get_citizen(req))
            .await
            .expect("a call must never hang past its deadline");
        (r.map(|_| ()), started.elapsed())
    };
    // Load while healthy.
    for _ in 0..20 {
        call(c.clone(), id.clone()).await.0.unwrap();
    }
    // Kill -9 mid-load: 16 callers in flight.
    let mut load = Vec::new();
    for _ in 0..16 {
        let (c, id) = (c.clone(), id.clone());
        load.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..10 {
                outcomes.push(call(c.clone(), id.clone()).await);
            }
            outcomes
        }));
    }
    dir.kill().unwrap();
    dir.wait().unwrap();
    // Look-ups are not served; the rest of the gateway is.
    assert_eq!(next_status(&mut citizens).await, ServingStatus::NotServing);
    let overall = probe.check(watch("")).await.unwrap().into_inner();
    assert_eq!(overall.status(), ServingStatus::Serving);
    let (code, body) = common::http_get(gw.admin_addr, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("civgate.v1.Citizens NOT_SERVING"), "{body}");
    assert!(body.contains("civgate.v1.Exchange SERVING"), "{body}");
    assert_eq!(common::http_get(gw.admin_addr, "/livez").0, 200);
    let mut failures = 0;
    for l in load {
        for (r, took) in l.await.unwrap() {
            if let Err(e) = r {
                failures += 1;
                assert!(
                    matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
                    "{e:?}"
                );
                assert!(took < Duration::from_millis(1_500), "failed after {took:?}");
            }
        }
    }
    assert!(failures > 0, "killing the directory must be visible");
    // ... and in /metrics: the directory's failed calls, by outcome.
    let (_, text) = common::http_get(gw.admin_addr, "/metrics");
    let failed = common::metric(
        &text,
        "civgate_upstream_calls_total{method=\"GetCitizens\",outcome=\"UNAVAILABLE\"}",
    ) + common::metric(
        &text,
        "civgate_upstream_calls_total{method=\"GetCitizens\",outcome=\"DEADLINE_EXCEEDED\"}",
    );
    assert!(failed >= 1.0, "{text}");
    let (r, took) = call(c.clone(), id.clone()).await;
    assert_eq!(r.unwrap_err().code(), Code::Unavailable);
    assert!(took < Duration::from_secs(1));

    // It comes back: the gateway reconnects by itself, and says so.
    let mut dir = directory_process(&env, port, "refdb");
    assert_eq!(next_status(&mut citizens).await, ServingStatus::Serving);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if call(c.clone(), id.clone()).await.0.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "gateway did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dir.kill().unwrap();
    let _ = dir.wait();
    // The admin port's health checks are not in the audit log (the API port's are).
    let mut audit = civgate::pb::v1::audit_client::AuditClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("auditor"))
            .await
            .unwrap(),
    );
    let probes = common::search_records(
        &mut audit,
        civgate::pb::v1::SearchEntriesRequest {
            method: "/grpc.health.v1.Health/Check".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(probes.is_empty(), "{probes:?}");
}

/// The buffer-less client (`client::link`, what `civgate bench` drives load with) speaks to
/// the gateway over mTLS like a `Channel` does, carries many calls at once on its one
/// connection, and refuses to start against an address where nothing listens.
#[tokio::test]
async fn a_link_client_carries_concurrent_calls_and_reports_an_unreachable_server() {
    let env = Env::new();
    let stack = env.start_stack().await;
    let link = client::link(stack.gateway.api_addr, &env.certs(), Some("registry-hp"))
        .await
        .unwrap();
    let mut set = tokio::task::JoinSet::new();
    for p in stack.people.iter().take(64) {
        let mut c = CitizensClient::with_origin(link.clone(), link.origin());
        let id = p.personal_id.to_string();
        set.spawn(async move {
            let r = c
                .get_citizen(get(&id, "DEATH_REGISTRATION"))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.citizen.unwrap().personal_id, id);
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    // A port nothing listens on: UNAVAILABLE, named, at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let err = client::link(addr, &env.certs(), Some("registry-hp"))
        .await
        .err()
        .expect("nothing listens there");
    assert!(format!("{err:#}").contains("unreachable"), "{err:#}");
}

/// Guessing a date of birth day by day through VerifyCitizen stops at the limit of
/// non-matching answers per agency and citizen; the audit log shows the guesses and the
/// refusal, and refused reads name the purpose, the citizen and the fields refused.
#[tokio::test]
async fn guessing_through_verification_is_cut_off_and_audited() {
    let env = Env::new();
    let stack = env.start_stack().await;
    let mut c = registry(&env, stack.gateway.api_addr).await;
    let p = &stack.people[5];
    let id = p.personal_id.to_string();
    let verify = |date: time::Date| VerifyCitizenRequest {
        personal_id: id.clone(),
        purpose: "IDENTITY_VERIFICATION".into(),
        date_of_birth: Some(format_date(date)),
        ..Default::default()
    };
    // Five wrong days of the right year.
    let year_start = time::Date::from_ordinal_date(p.date_of_birth.year(), 1).unwrap();
    let wrong = (0..366)
        .map(|d| year_start + time::Duration::days(d))
        .filter(|d| *d != p.date_of_birth)
        .take(5);
    for d in wrong {
        let r = c.verify_citizen(verify(d)).await.unwrap().into_inner();
        assert_eq!(r.matches[0].r#match, Match::No as i32);
    }
    // Even the right day is refused now.
    let err = c.verify_citizen(verify(p.date_of_birth)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("did not match"), "{}", err.message());
    // Another citizen is not affected.
    let other = &stack.people[6];
    let r = c
        .verify_citizen(VerifyCitizenRequest {
            personal_id: other.personal_id.to_string(),
            purpose: "IDENTITY_VERIFICATION".into(),
            date_of_birth: Some(format_date(other.date_of_birth)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.matches[0].r#match, Match::Yes as i32);
    // A refused read names what it can.
    let err = c
        .verify_citizen(VerifyCitizenRequest {
            personal_id: other.personal_id.to_string(),
            purpose: "BIRTH_REGISTRATION".into(),
            date_of_birth: Some(format_date(other.date_of_birth)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["date_of_birth"]);

    let mut audit = civgate::pb::v1::audit_client::AuditClient::new(
        client::connect(stack.gateway.api_addr, &env.certs(), Some("auditor"))
            .await
            .unwrap(),
    );
    let of = |who: &str| civgate::pb::v1::SearchEntriesRequest {
        subject_personal_id: who.into(),
        method: "/civgate.v1.Citizens/VerifyCitizen".into(),
        page_size: 100,
        ..Default::default()
    };
    let records = common::search_records(&mut audit, of(&id)).await;
    let details: Vec<&str> = records.iter().map(|r| r.detail.as_str()).collect();
    assert_eq!(
        details
            .iter()
            .filter(|d| **d == "no_match:date_of_birth")
            .count(),
        5,
        "{details:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r.outcome == "PERMISSION_DENIED" && r.detail == "verification_guessing"),
        "{records:?}"
    );
    let refused = common::search_records(&mut audit, of(other.personal_id.as_str())).await;
    let invalid = refused
        .iter()
        .find(|r| r.outcome == "INVALID_ARGUMENT")
        .expect("the refused read is found by its citizen");
    assert_eq!(invalid.purpose, "BIRTH_REGISTRATION");
    assert_eq!(invalid.detail, "invalid:date_of_birth");
}

/// Two instances of the directory (`url`, `fallback_urls`): the first killed under load, every
/// look-up still succeeds (a call the first fails is tried on the second), health stays
/// SERVING, and the endpoint's state is in /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_directory_takes_over_without_failed_calls() {
    let env = Env::new();
    let (first, second) = (common::free_port(), common::free_port());
    let mut dir1 = directory_process(&env, first, "refdb-1");
    let mut dir2 = directory_process(&env, second, "refdb-2");
    let config = common::with_upstream_port(DEFAULT_CONFIG, first).replace(
        &format!("url = \"https://localhost:{first}\""),
        &format!(
            "url = \"https://localhost:{first}\"\nfallback_urls = [\"https://localhost:{second}\"]"
        ),
    );
    assert!(
        config.contains("fallback_urls"),
        "the config names the fallback"
    );
    let gw = env.start_with(&config).await;
    let people: Vec<_> = civgate::synth::Population::new(5, 2000).collect();
    let c = registry(&env, gw.api_addr).await;
    let call = |mut c: CitizensClient<Channel>, id: String| async move {
        let mut req = tonic::Request::new(get(&id, "DEATH_REGISTRATION"));
        req.set_timeout(Duration::from_millis(2_000));
        c.get_citizen(req).await.map(drop)
    };
    for p in people.iter().take(20) {
        call(c.clone(), p.personal_id.to_string()).await.unwrap();
    }
    let mut load = Vec::new();
    for k in 0..16 {
        let (c, ids) = (
            c.clone(),
            people
                .iter()
                .skip(k * 10)
                .take(10)
                .map(|p| p.personal_id.to_string())
                .collect::<Vec<_>>(),
        );
        load.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            for id in ids {
                if let Err(e) = call(c.clone(), id).await {
                    failed.push(e);
                }
            }
            failed
        }));
    }
    dir1.kill().unwrap();
    dir1.wait().unwrap();
    for l in load {
        let failed = l.await.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
    }
    for p in people.iter().skip(200).take(20) {
        call(c.clone(), p.personal_id.to_string()).await.unwrap();
    }
    let (_, text) = common::http_get(gw.admin_addr, "/metrics");
    assert!(
        text.contains(&format!(
            "civgate_upstream_endpoint_up{{url=\"https://localhost:{second}\"}} 1"
        )),
        "{text}"
    );
    let (code, body) = common::http_get(gw.admin_addr, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("civgate.v1.Citizens SERVING"), "{body}");
    dir2.kill().unwrap();
    dir2.wait().unwrap();
}

/// The social-insurance agency looks up one citizen at a time, for its own purposes only and
/// within a case: the fields its purpose releases, nothing of a registry's purposes, no batch
/// or search; a registry cannot declare its purposes.
#[tokio::test]
async fn the_social_insurance_agency_reads_for_its_own_purposes_only() {
    let env = Env::new();
    let stack = env.start_stack().await;
    let si = citizens_as(&env, stack.gateway.api_addr, "social-insurance").await;
    let id = stack.people[5].personal_id.to_string();
    let in_case = |purpose: &str| GetCitizenRequest {
        case_reference: "HP-2026-0042".into(),
        ..get(&id, purpose)
    };
    let got = si
        .clone()
        .get_citizen(in_case("HEALTH_INSURANCE_CARD"))
        .await
        .unwrap()
        .into_inner();
    let c = got.citizen.unwrap();
    assert!(c.full_name.is_some() && c.date_of_birth.is_some());
    assert!(c.ethnicity.is_none() && c.nationality.is_none(), "{c:?}");
    assert!(
        got.withheld_fields.iter().any(|f| f == "marital_status"),
        "{:?}",
        got.withheld_fields
    );
    // (request, code) — one row per rule.
    let rows = [
        (get(&id, "HEALTH_INSURANCE_CARD"), Code::InvalidArgument), // a case is required
        (in_case("DEATH_REGISTRATION"), Code::PermissionDenied),    // a registry's purpose
        (in_case("FUNERAL_ALLOWANCE"), Code::Ok),
    ];
    for (i, (req, code)) in rows.into_iter().enumerate() {
        let r = si.clone().get_citizen(req).await;
        assert_eq!(r.err().map_or(Code::Ok, |e| e.code()), code, "row {i}");
    }
    let batch = si
        .clone()
        .batch_get_citizens(civgate::pb::v1::BatchGetCitizensRequest {
            personal_ids: vec![id.clone()],
            purpose: "HEALTH_INSURANCE_CARD".into(),
            case_reference: "HP-2026-0042".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(batch.code(), Code::PermissionDenied, "no batches");
    let mut hp = registry(&env, stack.gateway.api_addr).await;
    let e = hp
        .get_citizen(in_case("HEALTH_INSURANCE_CARD"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
}

/// The caller's W3C trace reaches the directory: the same trace id, a span of the gateway's
/// own; a call without one starts a trace the directory sees too.
#[tokio::test]
async fn the_callers_trace_reaches_the_directory() {
    let env = Env::new();
    let stack = env.start_stack().await;
    let mut c = registry(&env, stack.gateway.api_addr).await;
    let id = stack.people[2].personal_id.to_string();
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut req = tonic::Request::new(get(&id, "DEATH_REGISTRATION"));
    req.metadata_mut()
        .insert("traceparent", given.parse().unwrap());
    c.get_citizen(req).await.unwrap();
    let seen = stack.directory.traces.recent();
    let last = seen.last().expect("the directory saw a traceparent");
    let parts: Vec<&str> = last.split('-').collect();
    assert_eq!(parts.len(), 4, "{last}");
    assert_eq!(
        parts[1], "4bf92f3577b34da6a3ce929d0e0e4736",
        "the caller's trace"
    );
    assert_ne!(parts[2], "00f067aa0ba902b7", "the gateway's own span");
    assert_eq!(parts[3], "01");
    // Without one: a new trace, still carried.
    c.get_citizen(get(&id, "DEATH_REGISTRATION")).await.unwrap();
    let seen = stack.directory.traces.recent();
    let last = seen.last().unwrap();
    assert!(!last.contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{last}");
    assert_eq!(last.split('-').nth(1).map(str::len), Some(32), "{last}");
}

/// With `[telemetry] otlp_endpoint`, a call's spans reach a collector: the gateway's server
/// span is the child of the caller's span, the directory call's client span is the child of
/// that and is the very span the directory's `traceparent` names; no citizen value is an
/// attribute; a caller that did not sample its trace gets no spans exported (its decision is
/// kept) and the directory still sees the trace. Spans still queued are sent at shutdown.
#[tokio::test]
async fn spans_reach_an_otlp_collector_as_one_tree() {
    use opentelemetry_proto::tonic::{common::v1::any_value::Value, trace::v1::span::SpanKind};
    let env = Env::new();
    let collector = common::Collector::start().await;
    let common::Directory { directory, people } = env.start_directory().await;
    let with_endpoint = |endpoint: String| {
        let text = common::with_upstream_port(DEFAULT_CONFIG, directory.addr.port());
        assert!(text.contains("otlp_endpoint = \"\"\n"));
        text.replace(
            "otlp_endpoint = \"\"\n",
            &format!("otlp_endpoint = \"{endpoint}\"\n"),
        )
    };
    let config = with_endpoint(format!("http://{}", collector.addr));
    let gw = env.start_with(&config).await;
    let mut c = registry(&env, gw.api_addr).await;
    let id = people[3].personal_id.to_string();
    let given_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(get(&id, "DEATH_REGISTRATION"));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{given_trace}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    c.get_citizen(req).await.unwrap();
    let sent = directory.traces.recent().last().cloned().unwrap();
    // A caller that does not sample.
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    let mut req = tonic::Request::new(get(&id, "DEATH_REGISTRATION"));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{unsampled}-b7ad6b7169203331-00")
            .parse()
            .unwrap(),
    );
    c.get_citizen(req).await.unwrap();
    let sent_unsampled = directory.traces.recent().last().cloned().unwrap();
    assert!(
        sent_unsampled.starts_with(&format!("00-{unsampled}-")) && sent_unsampled.ends_with("-00"),
        "{sent_unsampled}"
    );
    drop(c);
    gw.shutdown().await.unwrap();

    let spans = collector.spans();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32 && hex(&s.trace_id) == given_trace)
        .unwrap_or_else(|| panic!("no server span of the caller's trace in {spans:#?}"));
    assert_eq!(server.name, "civgate.v1.Citizens/GetCitizen");
    assert_eq!(
        hex(&server.parent_span_id),
        "00f067aa0ba902b7",
        "the caller's span"
    );
    let client = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32 && s.parent_span_id == server.span_id)
        .unwrap_or_else(|| panic!("no directory span under the call's in {spans:#?}"));
    assert_eq!(hex(&client.trace_id), given_trace);
    assert_eq!(
        sent,
        format!("00-{given_trace}-{}-01", hex(&client.span_id)),
        "the directory's traceparent names the exported client span"
    );
    assert_eq!(
        client.name,
        "civgate.upstream.v1.PopulationDirectory/GetCitizens"
    );
    let attr = |s: &opentelemetry_proto::tonic::trace::v1::Span, k: &str| {
        s.attributes
            .iter()
            .find(|a| a.key == k)
            .and_then(|a| a.value.as_ref()?.value.clone())
    };
    assert_eq!(
        attr(server, "civgate.agency"),
        Some(Value::StringValue("registry-hp".into()))
    );
    assert_eq!(
        attr(server, "rpc.grpc.status_code"),
        Some(Value::IntValue(0))
    );
    assert!(attr(server, "civgate.request_id").is_some());
    for s in &spans {
        let text = format!("{s:?}");
        assert!(!text.contains(&id), "a citizen's ID in a span: {text}");
        assert_ne!(
            hex(&s.trace_id),
            unsampled,
            "an unsampled trace was exported"
        );
    }

    // A collector that is not there costs spans, never a call, and does not hold up a
    // shutdown beyond the export timeout.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap();
    drop(closed);
    let config = with_endpoint(format!("http://{nowhere}"))
        .replace("otlp_timeout_ms = 5000", "otlp_timeout_ms = 300");
    assert!(config.contains("otlp_timeout_ms = 300"));
    let gw = env.start_with(&config).await;
    let mut c = registry(&env, gw.api_addr).await;
    for _ in 0..3 {
        c.get_citizen(get(&id, "DEATH_REGISTRATION")).await.unwrap();
    }
    drop(c);
    let stopping = std::time::Instant::now();
    gw.shutdown().await.unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "shutdown waited {:?} on a missing collector",
        stopping.elapsed()
    );
}

/// `[upstream] client = "tonic"` (tonic's Channel, kept for comparison) answers look-ups like
/// the gateway's own client, and carries the trace too.
#[tokio::test]
async fn the_tonic_directory_client_answers_the_same() {
    let env = Env::new();
    let common::Directory { directory, people } = env.start_directory().await;
    let config = common::with_upstream_port(DEFAULT_CONFIG, directory.addr.port())
        .replace("[upstream]\n", "[upstream]\nclient = \"tonic\"\n");
    assert!(config.contains("client = \"tonic\""));
    let gw = env.start_with(&config).await;
    let mut c = registry(&env, gw.api_addr).await;
    let p = &people[4];
    let mut req = tonic::Request::new(get(&p.personal_id.to_string(), "DEATH_REGISTRATION"));
    req.metadata_mut().insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            .parse()
            .unwrap(),
    );
    let got = c.get_citizen(req).await.unwrap().into_inner();
    assert_eq!(
        got.citizen.map(|x| x.full_name),
        Some(Some(p.full_name.clone()))
    );
    let seen = directory.traces.recent();
    assert!(
        seen.iter()
            .any(|t| t.contains("0af7651916cd43dd8448eb211c80319c")),
        "{seen:?}"
    );
}
