//! A store written by the last release opens on both stores as it was left, whatever this
//! release changed in how the code is cut: `tests/fixtures/release-2026-12-03` holds an
//! exchange made by that release's own code (`write_release_fixture`, below, run on its
//! commit: see the fixture's README). After the upgrade
//! - an auditor who verified the old log's checkpoint verifies the new one against it
//!   (`civgate audit verify` with the old state: consistency, every entry), and searches find
//!   the old look-ups by subject;
//! - consumer groups resume after their acknowledgements, a rejection is still the group's,
//!   a retried publish gets its original receipt (and a changed one is refused), and new
//!   events continue the sequences.

mod common;

use std::time::Duration;

use civgate::{
    audit::{
        auditor::{self, SavedState},
        note::{Checkpoint, Verifier},
    },
    client,
    pb::v1::{
        DeathRecorded, Event, GetCitizenRequest, GetEventStatusRequest, PersonalIdAssigned,
        PublishRequest, SearchEntriesRequest, citizens_client::CitizensClient, event::Payload,
    },
};
use common::{Env, as_agency, audit_online, birth_to, publish, seqs, stream, take};
use serde::{Deserialize, Serialize};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/release-2026-12-03"
);

/// What the fixture's exchange returned, per store (event ids differ between the two runs).
#[derive(Debug, Serialize, Deserialize)]
struct Expected {
    /// (idempotency key, event id, sequence) of registry-hp's births.
    births: Vec<(String, String, u64)>,
    /// (idempotency key, event id, sequence) of population's events.
    population: Vec<(String, String, u64)>,
    /// The personal IDs registry-hp looked up, each once.
    looked_up: Vec<String>,
    /// The audit log's size and latest signed checkpoint when the gateway stopped.
    audit_size: u64,
    checkpoint: String,
}

fn births() -> Vec<(&'static str, Event)> {
    vec![
        ("b1", birth_to("031195000002", "Nguyễn Thị An")),
        ("b2", birth_to("031195000004", "Nguyễn Thị Bình")),
        ("b3", birth_to("031195000006", "Nguyễn Thị Chi")),
    ]
}

fn population_events(first_birth: &str) -> Vec<(&'static str, Event)> {
    vec![
        (
            "p1",
            Event {
                case_reference: String::new(),
                occurred_at_unix_ms: 0,
                in_reply_to: first_birth.into(),
                payload: Some(Payload::PersonalIdAssigned(PersonalIdAssigned {
                    personal_id: "031326000001".into(),
                    registry_office_code: "HP-LECHAN".into(),
                    book_number: "01/2026".into(),
                    entry_number: "7".into(),
                    ..Default::default()
                })),
            },
        ),
        (
            "p2",
            Event {
                case_reference: String::new(),
                occurred_at_unix_ms: 0,
                in_reply_to: String::new(),
                payload: Some(Payload::DeathRecorded(DeathRecorded {
                    personal_id: "031095000001".into(),
                    date_of_death: "2026-03-01".into(),
                    recording_unit: "Công an".into(),
                })),
            },
        ),
    ]
}

fn fixture_file(store: &str, name: &str) -> String {
    format!("{FIXTURE}/{store}/{name}")
}

fn store_name(env: &Env) -> &'static str {
    if env.store_url.is_some() {
        "postgres"
    } else {
        "sqlite"
    }
}

/// Puts the fixture's store where the env's gateway will open it.
async fn restore(env: &Env) {
    env.restore(
        &fixture_file("sqlite", "civgate.sqlite"),
        &fixture_file("postgres", "postgres.sql"),
    )
    .await
}

async fn the_last_releases_store_opens_as_it_was(env: Env) {
    let store = store_name(&env);
    let expected: Expected = serde_json::from_str(
        &std::fs::read_to_string(fixture_file(store, "expected.json")).unwrap(),
    )
    .unwrap();
    restore(&env).await;
    let gw = env.start().await;

    // The auditor: the old checkpoint is genuine (the old key signed it), and the upgraded log
    // verifies against it, as `civgate audit verify` does with the state of its last run.
    let old_key =
        Verifier::parse(&std::fs::read_to_string(fixture_file(store, "audit.vkey")).unwrap())
            .unwrap();
    let old: Checkpoint = auditor::open_checkpoint(&expected.checkpoint, &old_key).unwrap();
    assert_eq!(old.size, expected.audit_size);
    let state = env.dir.path().join("verify-state.json");
    SavedState {
        origin: old.origin.clone(),
        size: old.size,
        root: {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(old.root)
        },
        verified_at_unix_ms: 0,
    }
    .save(&state)
    .unwrap();
    let new_key =
        Verifier::parse(&std::fs::read_to_string(env.certs().join("audit.vkey")).unwrap()).unwrap();
    let mut online = audit_online(&env, gw.api_addr).await;
    // This env signs with a key of its own (the fixture's signing key is not kept): the
    // gateway serves the stored checkpoint until the log grows (each call here is audited)
    // and it signs the next one — a key rotation across the upgrade, which the auditor's
    // state survives.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while online.checkpoint(&new_key).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint by the new key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = auditor::verify_online(&mut online, &new_key, &state)
        .await
        .expect("the upgraded log is consistent with the last release's checkpoint");
    assert!(report.size >= old.size, "{report:?}");
    assert_eq!(report.previous, Some(old.size));
    // Each old look-up is found by its subject.
    for id in &expected.looked_up {
        let found = online
            .search(SearchEntriesRequest {
                subject_personal_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(
            found.iter().any(|(i, _)| *i < old.size),
            "the look-up of {id} is not found: {found:?}"
        );
    }

    let mut hp = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    // The population database's group resumes after its acknowledgement (2).
    let mut s = stream(&mut pop, "civil-status", "population-db", None).await;
    assert_eq!(seqs(&take(&mut s, 1).await), [3]);
    // Its rejection of the third birth is still its own, and the producer sees it.
    let st = hp
        .get_event_status(GetEventStatusRequest {
            event_id: expected.births[2].1.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.groups.len(), 1, "{st:?}");
    assert_eq!(st.groups[0].consumer_agency_id, "population");
    assert_eq!(st.groups[0].reason, "mother not found");
    // registry-hp's group resumes after the answer it acknowledged (1): the death (2).
    let mut s = stream(&mut hp, "population", "registry-hp", None).await;
    assert_eq!(seqs(&take(&mut s, 1).await), [2]);

    // A retried publish gets its original receipt; the same key with another event is refused.
    let (key, event) = births().remove(0);
    let again = publish(&mut hp, key, event).await;
    assert_eq!(
        (again.event_id.as_str(), again.sequence),
        (expected.births[0].1.as_str(), expected.births[0].2)
    );
    let changed = hp
        .publish(PublishRequest {
            idempotency_key: key.into(),
            event: Some(birth_to("031195000002", "Someone Else")),
        })
        .await
        .unwrap_err();
    assert_eq!(changed.code(), tonic::Code::AlreadyExists, "{changed:?}");
    // New events continue the sequences.
    let next = publish(&mut hp, "b4", birth_to("031195000008", "Nguyễn Thị Dung")).await;
    assert_eq!(next.sequence, 4);
    let next = publish(&mut pop, "p3", population_events("").remove(1).1).await;
    // The same death under a new key is a new event.
    assert_eq!(next.sequence, 3);
}

on_both_backends!(the_last_releases_store_opens_as_it_was);

/// Makes the fixture: an exchange on each store, then the store as the gateway left it.
/// `CIVGATE_WRITE_FIXTURE=DIR cargo test --test release_store -- --ignored` (on the release
/// the fixture is to stand for; needs PostgreSQL and `pg_dump`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes a fixture; run by hand on the release it stands for"]
async fn write_release_fixture() {
    let out = std::path::PathBuf::from(
        std::env::var("CIVGATE_WRITE_FIXTURE").expect("CIVGATE_WRITE_FIXTURE=DIR"),
    );
    let sqlite = Env::new();
    let pg = Env::postgres("release_fixture")
        .await
        .expect("PostgreSQL for the fixture");
    for (env, store) in [(&sqlite, "sqlite"), (&pg, "postgres")] {
        let dir = out.join(store);
        std::fs::create_dir_all(&dir).unwrap();
        let expected = run_exchange(env).await;
        match &env.store_url {
            None => {
                use sqlx::Connection;
                let path = env.dir.path().join("data/civgate.sqlite");
                let mut c =
                    sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
                        .await
                        .unwrap();
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(&mut c)
                    .await
                    .unwrap();
                drop(c);
                std::fs::copy(&path, dir.join("civgate.sqlite")).unwrap();
            }
            Some(url) => {
                let schema = url.rsplit("search_path%3D").next().unwrap();
                let base = url.split('?').next().unwrap();
                let dump = std::process::Command::new("pg_dump")
                    .args([
                        "--inserts",
                        "--no-owner",
                        "--no-privileges",
                        "--schema",
                        schema,
                    ])
                    .arg(base)
                    .output()
                    .unwrap();
                assert!(dump.status.success(), "{dump:?}");
                let text = String::from_utf8(dump.stdout).unwrap();
                let kept: Vec<String> = text
                    .lines()
                    .filter(|l| {
                        !(l.starts_with("--")
                            || l.starts_with("SET ")
                            || l.starts_with("SELECT pg_catalog.set_config")
                            || l.starts_with("CREATE SCHEMA")
                            || l.starts_with("\\restrict")
                            || l.starts_with("\\unrestrict")
                            || l.is_empty())
                    })
                    .map(|l| l.replace(&format!("{schema}."), "__SCHEMA__."))
                    .collect();
                std::fs::write(dir.join("postgres.sql"), kept.join("\n") + "\n").unwrap();
            }
        }
        std::fs::write(
            dir.join("expected.json"),
            serde_json::to_string_pretty(&expected).unwrap() + "\n",
        )
        .unwrap();
    }
    // Each run's checkpoints are checked with its own key, kept beside them (public keys
    // only: the signing keys are not kept).
    std::fs::copy(
        sqlite.certs().join("audit.vkey"),
        out.join("sqlite/audit.vkey"),
    )
    .unwrap();
    std::fs::copy(
        pg.certs().join("audit.vkey"),
        out.join("postgres/audit.vkey"),
    )
    .unwrap();
}

/// The exchange the fixture holds: look-ups, births acknowledged and rejected, answers and a
/// death acknowledged; every call audited. Stops the gateway and returns what it answered.
async fn run_exchange(env: &Env) -> Expected {
    let stack = env.start_stack().await;
    let addr = stack.gateway.api_addr;
    let mut citizens = CitizensClient::new(
        client::connect(addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    );
    let looked_up: Vec<String> = stack
        .people
        .iter()
        .take(3)
        .map(|p| p.personal_id.to_string())
        .collect();
    for id in &looked_up {
        citizens
            .get_citizen(GetCitizenRequest {
                case_reference: String::new(),
                personal_id: id.clone(),
                purpose: "BIRTH_REGISTRATION".into(),
            })
            .await
            .unwrap();
    }
    let mut hp = as_agency(env, addr, "registry-hp").await;
    let mut pop = as_agency(env, addr, "population").await;
    let mut births_out = Vec::new();
    for (key, event) in births() {
        let r = publish(&mut hp, key, event).await;
        births_out.push((key.to_owned(), r.event_id, r.sequence));
    }
    let mut s = stream(&mut pop, "civil-status", "population-db", None).await;
    assert_eq!(seqs(&take(&mut s, 3).await), [1, 2, 3]);
    drop(s);
    pop.ack(civgate::pb::v1::AckRequest {
        topic: "civil-status".into(),
        consumer_group: "population-db".into(),
        sequence: 2,
    })
    .await
    .unwrap();
    pop.reject(civgate::pb::v1::RejectRequest {
        topic: "civil-status".into(),
        consumer_group: "population-db".into(),
        sequence: 3,
        reason: "mother not found".into(),
    })
    .await
    .unwrap();
    let mut population_out = Vec::new();
    for (key, event) in population_events(&births_out[0].1) {
        let r = publish(&mut pop, key, event).await;
        population_out.push((key.to_owned(), r.event_id, r.sequence));
    }
    let mut s = stream(&mut hp, "population", "registry-hp", None).await;
    assert_eq!(seqs(&take(&mut s, 2).await), [1, 2]);
    drop(s);
    hp.ack(civgate::pb::v1::AckRequest {
        topic: "population".into(),
        consumer_group: "registry-hp".into(),
        sequence: 1,
    })
    .await
    .unwrap();
    drop((hp, pop, citizens));
    // A signed checkpoint covers every call of the exchange before the gateway stops.
    let verifier =
        Verifier::parse(&std::fs::read_to_string(env.certs().join("audit.vkey")).unwrap()).unwrap();
    let mut online = audit_online(env, addr).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, cp) = online.checkpoint(&verifier).await.unwrap();
        // Look-ups, publishes, subscriptions' deliveries, acks and rejections: at least 12.
        if cp.size >= 12 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint of the exchange"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(online);
    stack.gateway.shutdown().await.unwrap();

    // The stopped gateway's writer signs a last checkpoint of everything; wait for it.
    const LAST: &str = "SELECT m.value, c.size, c.note FROM audit_meta m, audit_checkpoints c \
                        WHERE m.key = 'size' ORDER BY c.size DESC LIMIT 1";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (audit_size, checkpoint) = loop {
        let (size, covered, note): (i64, i64, String) = match &env.store_url {
            None => {
                let mut c = env.sqlite().await;
                sqlx::query_as(LAST).fetch_one(&mut c).await.unwrap()
            }
            Some(url) => {
                use sqlx::Connection;
                let mut c = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::query_as(LAST).fetch_one(&mut c).await.unwrap()
            }
        };
        if covered == size {
            break (size as u64, note);
        }
        assert!(std::time::Instant::now() < deadline, "no last checkpoint");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Expected {
        births: births_out,
        population: population_out,
        looked_up,
        audit_size,
        checkpoint,
    }
}
