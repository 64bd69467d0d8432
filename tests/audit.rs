//! The audit log end to end: records per RPC, fail closed, tamper detection by `verify`.

mod common;

use std::time::{Duration, Instant};

use civgate::{
    audit::{
        auditor::{self, Online},
        note::Verifier,
    },
    client,
    config::DEFAULT_CONFIG,
    pb::v1::{
        AuditRecord, GetCheckpointRequest, GetCitizenRequest, GetEntriesRequest,
        SearchEntriesRequest, audit_client::AuditClient, citizens_client::CitizensClient,
    },
};
use common::{Env, audit_online, http_get};
use prost::Message;
use sqlx::Connection;
use tonic::Code;

/// Test config: checkpoints every 50 ms, commits give up after 300 ms.
fn config(directory_port: u16) -> String {
    common::with_upstream_port(DEFAULT_CONFIG, directory_port)
        .replace(
            "checkpoint_interval_ms = 1000",
            "checkpoint_interval_ms = 50",
        )
        .replace("commit_timeout_ms = 2000", "commit_timeout_ms = 300")
}

fn get(id: &str) -> GetCitizenRequest {
    GetCitizenRequest {
        case_reference: String::new(),
        personal_id: id.into(),
        purpose: "BIRTH_REGISTRATION".into(),
    }
}

fn verifier(env: &Env) -> Verifier {
    Verifier::parse(&std::fs::read_to_string(env.certs().join("audit.vkey")).unwrap()).unwrap()
}

/// An auditor's client of the gateway at `addr`.
async fn auditor_of(
    env: &Env,
    addr: std::net::SocketAddr,
) -> AuditClient<tonic::transport::Channel> {
    AuditClient::new(
        client::connect(addr, &env.certs(), Some("auditor"))
            .await
            .unwrap(),
    )
}

/// The records naming citizen `id` (the auditor's own searches among them).
async fn records_about(
    audit: &mut AuditClient<tonic::transport::Channel>,
    id: &str,
) -> Vec<AuditRecord> {
    common::search_records(
        audit,
        SearchEntriesRequest {
            subject_personal_id: id.into(),
            ..Default::default()
        },
    )
    .await
}

/// Waits until the signed checkpoint covers at least `n` entries.
async fn checkpoint_at_least(online: &mut Online, v: &Verifier, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, cp) = online.checkpoint(v).await.unwrap();
        if cp.size >= n {
            return;
        }
        assert!(Instant::now() < deadline, "no checkpoint reached size {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn every_call_is_audited_with_identifiers_and_field_names_only(env: Env) {
    let stack = env.start_directory().await;
    let gw = env.start_with(&config(stack.directory.addr.port())).await;
    let mut reg = CitizensClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    );
    let looked_up: Vec<_> = stack.people.iter().take(5).cloned().collect();
    for p in &looked_up {
        let mut req = tonic::Request::new(get(p.personal_id.as_str()));
        req.metadata_mut()
            .insert("x-request-id", "req-42".parse().unwrap());
        let resp = reg.get_citizen(req).await.unwrap();
        assert_eq!(resp.metadata().get("x-request-id").unwrap(), "req-42");
    }
    let bad = reg.get_citizen(get("03120300012X")).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let mut wrong_role = CitizensClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("auditor"))
            .await
            .unwrap(),
    );
    assert_eq!(
        wrong_role
            .get_citizen(get(looked_up[0].personal_id.as_str()))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // "Who read citizen X?"
    let mut audit = AuditClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("auditor"))
            .await
            .unwrap(),
    );
    let x = looked_up[0].personal_id.to_string();
    let records = common::search_records(
        &mut audit,
        SearchEntriesRequest {
            subject_personal_id: x.clone(),
            page_size: 100,
            ..Default::default()
        },
    )
    .await;
    let read = records
        .iter()
        .find(|r| r.agency_id == "registry-hp")
        .expect("registry-hp's read is recorded");
    assert_eq!(read.method, "/civgate.v1.Citizens/GetCitizen");
    assert_eq!(read.purpose, "BIRTH_REGISTRATION");
    assert_eq!(read.outcome, "OK");
    assert_eq!(read.request_id, "req-42");
    assert_eq!(read.role, "civil_registry");
    assert_eq!(read.subject_personal_ids, vec![x.clone()]);
    assert!(read.fields_returned.contains(&"full_name".to_owned()));
    assert!(!read.fields_returned.contains(&"blood_type".to_owned()));
    assert_eq!(read.cert_fingerprint.len(), 64);

    // Denied and invalid calls are there too.
    // 5 reads, 1 invalid, 1 denied, 1 search so far.
    let size = signed_size_at_least(&mut audit, 8).await;
    let all = entries(&mut audit, size).await;
    let decoded: Vec<AuditRecord> = all
        .iter()
        .map(|l| AuditRecord::decode(l.as_slice()).unwrap())
        .collect();
    assert!(decoded.iter().any(|r| r.agency_id == "auditor"
        && r.outcome == "PERMISSION_DENIED"
        && r.detail == "method_not_granted"));
    assert!(decoded.iter().any(|r| r.agency_id == "registry-hp"
        && r.outcome == "INVALID_ARGUMENT"
        && r.subject_personal_ids.is_empty()));
    for (i, r) in decoded.iter().enumerate() {
        assert_eq!(r.index, i as u64);
    }
    // No personal data values in any leaf: no names, no dates of birth.
    let bytes: Vec<u8> = all.concat();
    for p in &looked_up {
        for needle in [
            p.full_name.clone(),
            civgate::domain::format_date(p.date_of_birth),
            p.permanent_address.clone(),
        ] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "audit log contains {needle:?}"
            );
        }
    }
}

/// The size of the signed checkpoint once it covers at least `n` entries.
async fn signed_size_at_least(audit: &mut AuditClient<tonic::transport::Channel>, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let note = audit
            .get_checkpoint(GetCheckpointRequest {})
            .await
            .unwrap()
            .into_inner()
            .checkpoint;
        let size: u64 = note.lines().nth(1).unwrap().parse().unwrap();
        if size >= n {
            return size;
        }
        assert!(Instant::now() < deadline, "checkpoint stuck at {size}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn entries(audit: &mut AuditClient<tonic::transport::Channel>, size: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let start = out.len() as u64;
        out.extend(
            audit
                .get_entries(GetEntriesRequest { start, end: size })
                .await
                .unwrap()
                .into_inner()
                .entries,
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_audit_store_fails_closed() {
    let env = Env::new();
    let stack = env.start_directory().await;
    let gw = env.start_with(&config(stack.directory.addr.port())).await;
    let mut reg = CitizensClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    );
    let id = stack.people[2].personal_id.to_string();
    reg.get_citizen(get(&id)).await.unwrap();

    // Another process holds the database's write lock: no audit commit can complete.
    let mut blocker = env.sqlite().await;
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut blocker)
        .await
        .unwrap();
    let started = Instant::now();
    let mut stalled = tonic::Request::new(get(&id));
    stalled
        .metadata_mut()
        .insert("x-request-id", "read-while-stalled".parse().unwrap());
    let err = reg.get_citizen(stalled).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("audit"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let (code, body) = http_get(gw.admin_addr, "/healthz");
    assert_eq!((code, body.trim()), (503, "NOT_SERVING"));
    // Every service is down with the store: nothing completes without its audit record.
    let (code, body) = http_get(gw.admin_addr, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("civgate.v1.Exchange NOT_SERVING"), "{body}");

    // A refusal meanwhile is answered at once; its record waits for the store.
    let mut denied = tonic::Request::new(GetCheckpointRequest {});
    denied
        .metadata_mut()
        .insert("x-request-id", "refused-while-stalled".parse().unwrap());
    let err = AuditClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    )
    .get_checkpoint(denied)
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Released: the gateway recovers by itself.
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut blocker)
        .await
        .unwrap();
    let resp = reg.get_citizen(get(&id)).await.unwrap().into_inner();
    assert!(resp.citizen.is_some());
    assert_eq!(http_get(gw.admin_addr, "/healthz").0, 200);

    // Every call is in the log: the withheld answer says so (nothing returned), once; the
    // refusal made during the stall is there too.
    let mut audit = auditor_of(&env, gw.api_addr).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reads: Vec<_> = records_about(&mut audit, &id)
            .await
            .into_iter()
            .filter(|r| r.method == "/civgate.v1.Citizens/GetCitizen")
            .collect();
        let refused = common::search_records(
            &mut audit,
            SearchEntriesRequest {
                agency_id: "registry-hp".into(),
                outcome: "PERMISSION_DENIED".into(),
                ..Default::default()
            },
        )
        .await;
        let withheld: Vec<_> = reads
            .iter()
            .filter(|r| r.outcome == "UNAVAILABLE")
            .collect();
        let found = refused
            .iter()
            .any(|r| r.request_id == "refused-while-stalled");
        if withheld.len() == 1 && found {
            let w = withheld[0];
            assert_eq!(w.request_id, "read-while-stalled", "{w:?}");
            assert_eq!(w.detail, "audit_unavailable", "{w:?}");
            assert!(w.fields_returned.is_empty(), "{w:?}");
            assert_eq!(w.purpose, "BIRTH_REGISTRATION");
            // The reads served before and after, one record each. (The stalled read's first
            // record is normally not committed; only if its commit was under way when the
            // caller gave up, and completed late, is it there too, before the one above.)
            let served: Vec<_> = reads
                .iter()
                .filter(|r| r.request_id != "read-while-stalled")
                .collect();
            assert_eq!(served.len(), 2, "{reads:?}");
            assert!(served.iter().all(|r| r.outcome == "OK"), "{reads:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "records missing after the stall: {reads:?} {refused:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A call whose client goes away before the answer — here while the directory does not
/// answer — is recorded as CANCELLED, with nothing returned.
#[tokio::test]
async fn a_call_its_client_abandons_is_recorded_as_cancelled() {
    let env = Env::new();
    // A directory that accepts connections and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let _held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    let gw = env.start_with(&config(port)).await;
    let mut reg = CitizensClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    );
    let id = "031200000042";
    let mut req = tonic::Request::new(get(id));
    req.metadata_mut()
        .insert("x-request-id", "abandoned-1".parse().unwrap());
    // The client gives up after 300 ms: its future is dropped, the stream reset.
    let gave_up = tokio::time::timeout(Duration::from_millis(300), reg.get_citizen(req)).await;
    assert!(
        gave_up.is_err(),
        "the silent directory answered? {gave_up:?}"
    );

    let mut audit = auditor_of(&env, gw.api_addr).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let recs = records_about(&mut audit, id).await;
        if let Some(r) = recs.iter().find(|r| r.request_id == "abandoned-1") {
            // One record of the read (the auditor's own searches name the citizen too).
            let reads = recs
                .iter()
                .filter(|r| r.method == "/civgate.v1.Citizens/GetCitizen");
            assert_eq!(reads.count(), 1, "{recs:?}");
            assert_eq!(
                (r.outcome.as_str(), r.detail.as_str()),
                ("CANCELLED", "client_cancelled")
            );
            assert!(r.fields_returned.is_empty(), "{r:?}");
            assert_eq!(r.method, "/civgate.v1.Citizens/GetCitizen");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no record of the abandoned call: {recs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await.unwrap();
}

enum Tamper {
    Edit,
    Delete,
    Reorder,
    Truncate,
}

/// The edits, on the stored log of either backend (`$db` a SQLite or PostgreSQL connection).
macro_rules! tamper {
    ($db:ident, $kind:expr) => {
    let leaf = |i: i64| {
        sqlx::query_scalar::<_, Vec<u8>>("SELECT leaf FROM audit_leaves WHERE idx = $1").bind(i)
    };
    match $kind {
        Tamper::Edit => {
            let mut rec =
                AuditRecord::decode(leaf(7).fetch_one(&mut $db).await.unwrap().as_slice()).unwrap();
            rec.agency_id = "someone-else".into();
            sqlx::query("UPDATE audit_leaves SET leaf = $1 WHERE idx = 7")
                .bind(rec.encode_to_vec())
                .execute(&mut $db)
                .await
                .unwrap();
        }
        Tamper::Delete => {
            sqlx::query("DELETE FROM audit_leaves WHERE idx = 7")
                .execute(&mut $db)
                .await
                .unwrap();
        }
        Tamper::Reorder => {
            // Swap two entries and fix up their index fields so each still looks in place.
            let mut a =
                AuditRecord::decode(leaf(5).fetch_one(&mut $db).await.unwrap().as_slice()).unwrap();
            let mut b =
                AuditRecord::decode(leaf(9).fetch_one(&mut $db).await.unwrap().as_slice()).unwrap();
            std::mem::swap(&mut a.index, &mut b.index);
            sqlx::query("UPDATE audit_leaves SET leaf = $1 WHERE idx = 9")
                .bind(a.encode_to_vec())
                .execute(&mut $db)
                .await
                .unwrap();
            sqlx::query("UPDATE audit_leaves SET leaf = $1 WHERE idx = 5")
                .bind(b.encode_to_vec())
                .execute(&mut $db)
                .await
                .unwrap();
        }
        Tamper::Truncate => {
            sqlx::raw_sql(
                "DELETE FROM audit_leaves WHERE idx >= 20; DELETE FROM audit_checkpoints WHERE size > 20; \
                 UPDATE audit_meta SET value = 20 WHERE key = 'size';",
            )
            .execute(&mut $db)
            .await
            .unwrap();
        }
    }
    };
}

/// Runs traffic, verifies (saving state), stops, tampers with the stored log, restarts and
/// verifies again: returns the failure.
async fn tampered(env: Env, kind: Tamper) -> String {
    let stack = env.start_directory().await;
    let text = config(stack.directory.addr.port());
    let gw = env.start_with(&text).await;
    let v = verifier(&env);
    let state = env.dir.path().join("verify-state.json");
    let mut reg = CitizensClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    );
    for p in stack.people.iter().take(30) {
        reg.get_citizen(get(p.personal_id.as_str())).await.unwrap();
    }
    let mut online = audit_online(&env, gw.api_addr).await;
    checkpoint_at_least(&mut online, &v, 30).await;
    auditor::verify_online(&mut online, &v, &state)
        .await
        .expect("untouched log verifies");
    gw.shutdown().await.unwrap();

    match &env.store_url {
        None => {
            let mut db = env.sqlite().await;
            tamper!(db, kind);
            db.close().await.unwrap();
        }
        Some(url) => {
            let mut db = sqlx::PgConnection::connect(url).await.unwrap();
            tamper!(db, kind);
            db.close().await.unwrap();
        }
    }

    let gw = env.start_with(&text).await;
    let mut online = audit_online(&env, gw.api_addr).await;
    let err = auditor::verify_online(&mut online, &v, &state)
        .await
        .expect_err("tampering must be detected");
    format!("{err:#}")
}

async fn verify_names_an_edited_entry(env: Env) {
    let e = tampered(env, Tamper::Edit).await;
    assert!(e.contains("entry 7 has been altered"), "{e}");
}

async fn verify_names_a_deleted_entry(env: Env) {
    let e = tampered(env, Tamper::Delete).await;
    assert!(e.contains("entry 7 is missing"), "{e}");
}

async fn verify_names_the_first_of_two_reordered_entries(env: Env) {
    let e = tampered(env, Tamper::Reorder).await;
    assert!(e.contains("entry 5 has been altered"), "{e}");
}

async fn verify_detects_a_truncated_log(env: Env) {
    let e = tampered(env, Tamper::Truncate).await;
    assert!(e.contains("truncated") && e.contains("now says 20"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewritten_history_with_a_freshly_signed_checkpoint_is_caught() {
    let env = Env::new();
    let stack = env.start_directory().await;
    let text = config(stack.directory.addr.port());
    let v = verifier(&env);
    let state = env.dir.path().join("verify-state.json");
    {
        let gw = env.start_with(&text).await;
        let mut reg = CitizensClient::new(
            client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
                .await
                .unwrap(),
        );
        for p in stack.people.iter().take(10) {
            reg.get_citizen(get(p.personal_id.as_str())).await.unwrap();
        }
        let mut online = audit_online(&env, gw.api_addr).await;
        checkpoint_at_least(&mut online, &v, 10).await;
        auditor::verify_online(&mut online, &v, &state)
            .await
            .unwrap();
        gw.shutdown().await.unwrap();
    }
    // The operator throws the log away and builds another history, signed with the real key.
    std::fs::remove_dir_all(env.dir.path().join("data")).unwrap();
    let gw = env.start_with(&text).await;
    let mut reg = CitizensClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    );
    for p in stack.people.iter().skip(100).take(40) {
        reg.get_citizen(get(p.personal_id.as_str())).await.unwrap();
    }
    let mut online = audit_online(&env, gw.api_addr).await;
    checkpoint_at_least(&mut online, &v, 40).await;
    // Taken alone, the new log is self-consistent...
    let fresh_state = env.dir.path().join("fresh-state.json");
    auditor::verify_online(&mut online, &v, &fresh_state)
        .await
        .unwrap();
    // ...but not with what this auditor verified before.
    let err = auditor::verify_online(&mut online, &v, &state)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("history rewritten"), "{err:#}");
}

async fn offline_verify_of_an_export_matches_online(env: Env) {
    let stack = env.start_directory().await;
    let gw = env.start_with(&config(stack.directory.addr.port())).await;
    let v = verifier(&env);
    let mut reg = CitizensClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    );
    for p in stack.people.iter().take(12) {
        reg.get_citizen(get(p.personal_id.as_str())).await.unwrap();
    }
    let mut online = audit_online(&env, gw.api_addr).await;
    checkpoint_at_least(&mut online, &v, 12).await;
    let path = env.dir.path().join("export.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    let n = auditor::export(&mut online, &v, &mut f, false)
        .await
        .unwrap();
    drop(f);
    let report = auditor::verify_export(&path, &v, &env.dir.path().join("s.json"))
        .await
        .unwrap();
    assert_eq!(report.size, n);
    // One flipped byte in one entry of the export.
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut line: serde_json::Value = serde_json::from_str(&lines[4]).unwrap();
    let mut leaf = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        line["leaf"].as_str().unwrap(),
    )
    .unwrap();
    let last = leaf.len() - 1;
    leaf[last] ^= 1;
    line["leaf"] = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &leaf).into();
    lines[4] = line.to_string();
    std::fs::write(&path, lines.join("\n")).unwrap();
    let err = auditor::verify_export(&path, &v, &env.dir.path().join("s2.json"))
        .await
        .unwrap_err();
    let e = format!("{err:#}");
    assert!(e.contains("do not hash") || e.contains("entry 3"), "{e}");
}

on_both_backends!(
    verify_names_an_edited_entry,
    verify_names_a_deleted_entry,
    verify_names_the_first_of_two_reordered_entries,
    verify_detects_a_truncated_log,
    every_call_is_audited_with_identifiers_and_field_names_only,
    offline_verify_of_an_export_matches_online,
);

/// A read names its case and the record keeps it; a purpose that requires a case refuses a
/// read without one, and a malformed one is refused; a published event's case is its
/// record's.
#[tokio::test]
async fn a_case_reference_is_in_the_record_and_required_where_the_purpose_says() {
    let env = Env::new();
    let stack = env.start_directory().await;
    let text = config(stack.directory.addr.port()).replace(
        "[purposes.DEATH_REGISTRATION]\n",
        "[purposes.DEATH_REGISTRATION]\nrequires_case_reference = true\n",
    );
    assert!(text.contains("requires_case_reference = true"));
    let gw = env.start_with(&text).await;
    let mut reg = CitizensClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    );
    let id = stack.people[3].personal_id.to_string();
    let case = "000.00.01.H31-261207-0001";
    let read = |purpose: &str, case: &str| GetCitizenRequest {
        personal_id: id.clone(),
        purpose: purpose.into(),
        case_reference: case.into(),
    };
    reg.get_citizen(read("BIRTH_REGISTRATION", case))
        .await
        .unwrap();
    for (purpose, given, field) in [
        ("DEATH_REGISTRATION", "", "case_reference"),
        ("BIRTH_REGISTRATION", "hồ sơ 7", "case_reference"),
    ] {
        let err = reg.get_citizen(read(purpose, given)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{purpose} {given:?}");
        assert!(err.message().contains(field), "{err:?}");
    }
    reg.get_citizen(read("DEATH_REGISTRATION", "HS-2"))
        .await
        .unwrap();

    let mut hp = common::as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut birth = common::birth("HP-LECHAN", "Lê An");
    birth.case_reference = case.into();
    let asked = common::publish(&mut hp, "case-1", birth).await;
    // An answer belongs to the case of the event it answers.
    let mut pop = common::as_agency(&env, gw.api_addr, "population").await;
    let answer = |case: &str| civgate::pb::v1::PublishRequest {
        idempotency_key: format!("answer-{case}"),
        event: Some(civgate::pb::v1::Event {
            occurred_at_unix_ms: 0,
            in_reply_to: asked.event_id.clone(),
            case_reference: case.into(),
            payload: Some(civgate::pb::v1::event::Payload::PersonalIdAssigned(
                civgate::pb::v1::PersonalIdAssigned {
                    personal_id: "031326000001".into(),
                    ..Default::default()
                },
            )),
        }),
    };
    let err = pop.publish(answer("CASE-B")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("case_reference"), "{err:?}");

    let mut audit = auditor_of(&env, gw.api_addr).await;
    let reads: Vec<_> = records_about(&mut audit, &id)
        .await
        .into_iter()
        .filter(|r| r.method == "/civgate.v1.Citizens/GetCitizen")
        .map(|r| (r.outcome, r.case_reference))
        .collect();
    // The refused reads name their citizen too (a search by citizen finds the attempts), but
    // not the case they could not name.
    assert_eq!(
        reads,
        [
            ("OK".to_owned(), case.to_owned()),
            ("INVALID_ARGUMENT".to_owned(), String::new()),
            ("INVALID_ARGUMENT".to_owned(), String::new()),
            ("OK".to_owned(), "HS-2".to_owned()),
        ]
    );
    let published = common::search_records(
        &mut audit,
        SearchEntriesRequest {
            method: "/civgate.v1.Exchange/Publish".into(),
            agency_id: "registry-hp".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(published.len(), 1, "{published:?}");
    assert_eq!(published[0].case_reference, case);
    gw.shutdown().await.unwrap();
}
