//! Two-way sync over real mTLS: publish (validation, idempotency, producer rights), subscribe
//! (order, resume, back-pressure), ack.

mod common;

use std::time::Duration;

use civgate::{
    api::exchange::WINDOW,
    client,
    pb::v1::{
        AckRequest, DeathRecorded, DeliveryState, Event, GetEventStatusRequest, PublishRequest,
        RejectRequest, SubscribeRequest, event::Payload, exchange_client::ExchangeClient,
    },
};
use common::{Env, as_agency, birth, birth_to};
use tonic::{Code, transport::Channel};

/// Runs `sql` on the env's store: the SQLite file, or the PostgreSQL schema.
async fn on_store(env: &Env, sqlite: &str, postgres: &str) {
    use sqlx::Connection;
    match &env.store_url {
        None => {
            let mut c = env.sqlite().await;
            sqlx::raw_sql(sqlx::AssertSqlSafe(sqlite))
                .execute(&mut c)
                .await
                .unwrap();
        }
        Some(url) => {
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(postgres))
                .execute(&mut c)
                .await
                .unwrap();
        }
    }
}

fn publish(key: &str, event: Event) -> PublishRequest {
    PublishRequest {
        idempotency_key: key.into(),
        event: Some(event),
    }
}

/// The civil-status stream of a consumer group, from after its last ack.
async fn civil_status(
    client: &mut ExchangeClient<Channel>,
    group: &str,
) -> tonic::Streaming<civgate::pb::v1::SubscribedEvent> {
    client
        .subscribe(SubscribeRequest {
            topic: "civil-status".into(),
            consumer_group: group.into(),
            from_sequence: None,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn auditor(
    env: &Env,
    addr: std::net::SocketAddr,
) -> civgate::pb::v1::audit_client::AuditClient<Channel> {
    civgate::pb::v1::audit_client::AuditClient::new(
        client::connect(addr, &env.certs(), Some("auditor"))
            .await
            .unwrap(),
    )
}

async fn publish_is_idempotent_and_conflicting_reuse_is_already_exists(env: Env) {
    let gw = env.start().await;
    let mut reg = as_agency(&env, gw.api_addr, "registry-hp").await;
    let a = reg
        .publish(publish("b-1", birth("HP-LECHAN", "Nguyễn Thị An")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((a.topic.as_str(), a.sequence), ("civil-status", 1));
    let again = reg
        .publish(publish("b-1", birth("HP-LECHAN", "Nguyễn Thị An")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, a);
    let err = reg
        .publish(publish("b-1", birth("HP-LECHAN", "Nguyễn Thị Bình")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let b = reg
        .publish(publish("b-2", birth("HP-LECHAN", "Nguyễn Thị Bình")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.sequence, 2);
}

async fn producers_publish_only_their_side_and_offices_and_bad_events_are_named(env: Env) {
    let gw = env.start().await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    let err = pop
        .publish(publish("x", birth("HP-LECHAN", "Nguyễn Thị An")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut reg = as_agency(&env, gw.api_addr, "registry-hp").await;
    let err = reg
        .publish(publish("x", birth("HN-BADINH", "Nguyễn Thị An")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let death = Event {
        case_reference: String::new(),
        occurred_at_unix_ms: 0,
        in_reply_to: String::new(),
        payload: Some(Payload::DeathRecorded(DeathRecorded {
            personal_id: "031095000001".into(),
            date_of_death: "2026-01-01".into(),
            recording_unit: "Công an phường Lê Chân".into(),
        })),
    };
    let err = reg.publish(publish("y", death.clone())).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(
        pop.publish(publish("y", death))
            .await
            .unwrap()
            .into_inner()
            .topic,
        "population"
    );
    let err = reg
        .publish(publish("z", birth("HP-LECHAN", "Robert'); DROP TABLE")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("event.birth.full_name"), "{err:?}");
}

async fn next(stream: &mut tonic::Streaming<civgate::pb::v1::SubscribedEvent>) -> u64 {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("event within 10 s")
        .unwrap()
        .unwrap()
        .sequence
}

async fn subscribe_delivers_in_order_resumes_after_ack_and_applies_back_pressure(env: Env) {
    let gw = env.start().await;
    let mut reg = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    let sub = |group: &str, from: Option<u64>| SubscribeRequest {
        topic: "civil-status".into(),
        consumer_group: group.into(),
        from_sequence: from,
    };

    // Pushed as they commit: subscribe first, then publish.
    let mut s = pop
        .subscribe(sub("population-db", None))
        .await
        .unwrap()
        .into_inner();
    for i in 0..5 {
        reg.publish(publish(
            &format!("k{i}"),
            birth("HP-LECHAN", "Nguyễn Thị An"),
        ))
        .await
        .unwrap();
        assert_eq!(next(&mut s).await, i + 1);
    }
    pop.ack(AckRequest {
        topic: "civil-status".into(),
        consumer_group: "population-db".into(),
        sequence: 3,
    })
    .await
    .unwrap();
    drop(s);
    // Reconnect: resumes after the last ack.
    let mut s = pop
        .subscribe(sub("population-db", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut s).await, 4);
    assert_eq!(next(&mut s).await, 5);
    drop(s);
    // Or from a given sequence.
    let mut s = pop
        .subscribe(sub("population-db", Some(2)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut s).await, 2);
    drop(s);

    // Back-pressure: a group that never acks gets WINDOW events past its start, then nothing;
    // another group keeps receiving.
    for i in 5..(WINDOW + 10) {
        reg.publish(publish(
            &format!("k{i}"),
            birth("HP-LECHAN", "Nguyễn Thị An"),
        ))
        .await
        .unwrap();
    }
    let mut slow = pop.subscribe(sub("slow", None)).await.unwrap().into_inner();
    for want in 1..=WINDOW {
        assert_eq!(next(&mut slow).await, want);
    }
    let mut other = pop
        .subscribe(sub("other", Some(WINDOW + 1)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut other).await, WINDOW + 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), slow.message())
            .await
            .is_err(),
        "window exceeded"
    );
    pop.ack(AckRequest {
        topic: "civil-status".into(),
        consumer_group: "slow".into(),
        sequence: 10,
    })
    .await
    .unwrap();
    assert_eq!(next(&mut slow).await, WINDOW + 1);

    // Acks beyond the head, bad topics and groups are refused.
    let err = pop
        .ack(AckRequest {
            topic: "civil-status".into(),
            consumer_group: "slow".into(),
            sequence: 10_000,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = pop.subscribe(sub("bad group!", None)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

async fn a_rejected_event_and_its_reason_are_visible_to_the_producer(env: Env) {
    let gw = env.start().await;
    let mut reg = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    let a = reg
        .publish(publish("r-1", birth("HP-LECHAN", "Nguyễn Thị An")))
        .await
        .unwrap()
        .into_inner();
    let b = reg
        .publish(publish("r-2", birth("HP-LECHAN", "Nguyễn Thị Bình")))
        .await
        .unwrap()
        .into_inner();
    let status = |id: String| GetEventStatusRequest { event_id: id };
    let st = reg
        .get_event_status(status(a.event_id.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(st.groups.is_empty(), "accepted, no consumer yet: {st:?}");

    let mut s = civil_status(&mut pop, "population-db").await;
    assert_eq!(next(&mut s).await, a.sequence);
    assert_eq!(next(&mut s).await, b.sequence);
    let st = reg
        .get_event_status(status(a.event_id.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.groups[0].state,
        DeliveryState::Delivered as i32,
        "{st:?}"
    );

    pop.reject(RejectRequest {
        topic: "civil-status".into(),
        consumer_group: "population-db".into(),
        sequence: b.sequence,
        reason: "mother 031195000002 is not in the population database".into(),
    })
    .await
    .unwrap();
    pop.ack(AckRequest {
        topic: "civil-status".into(),
        consumer_group: "population-db".into(),
        sequence: b.sequence,
    })
    .await
    .unwrap();
    let st = reg
        .get_event_status(status(a.event_id.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.groups[0].state, DeliveryState::Acknowledged as i32);
    let st = reg
        .get_event_status(status(b.event_id.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.groups[0].state, DeliveryState::Rejected as i32);
    assert!(
        st.groups[0]
            .reason
            .contains("not in the population database")
    );

    // Another producer does not learn the event exists; an auditor does.
    let err = pop
        .get_event_status(status(b.event_id.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let mut aud = as_agency(&env, gw.api_addr, "auditor").await;
    aud.get_event_status(status(b.event_id)).await.unwrap();
    let err = pop
        .reject(RejectRequest {
            topic: "civil-status".into(),
            consumer_group: "population-db".into(),
            sequence: 1,
            reason: " ".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Each Ack and Reject call has exactly one record: the accepted ones committed with the
    // journal's write, the refused one by the gate.
    let mut audit = auditor(&env, gw.api_addr).await;
    let mut outcomes = Vec::new();
    for method in ["/civgate.v1.Exchange/Reject", "/civgate.v1.Exchange/Ack"] {
        let found = common::search_records(
            &mut audit,
            civgate::pb::v1::SearchEntriesRequest {
                method: method.into(),
                page_size: 100,
                ..Default::default()
            },
        )
        .await;
        for r in found {
            assert_eq!(r.agency_id, "population");
            outcomes.push((method.rsplit('/').next().unwrap().to_owned(), r.outcome));
        }
    }
    assert_eq!(
        outcomes,
        [
            ("Reject".to_owned(), "OK".to_owned()),
            ("Reject".to_owned(), "INVALID_ARGUMENT".to_owned()),
            ("Ack".to_owned(), "OK".to_owned()),
        ]
    );
}

async fn graceful_shutdown_ends_subscriptions_with_unavailable(env: Env) {
    let gw = env.start().await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    let mut s = civil_status(&mut pop, "g").await;
    let stopping = tokio::spawn(gw.shutdown());
    let end = tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("the stream ends promptly");
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    stopping.await.unwrap().unwrap();
}

/// What a subscriber receives is a read of the citizens it concerns: each batch a stream
/// delivers has its audit record (the consumer's agency, the citizens, the event types, the
/// sequences), durable before the events leave, so an auditor asking "who read citizen X"
/// finds the consumer too — even when it asks the moment the event arrives.
async fn deliveries_are_audited_as_reads_before_they_are_sent(env: Env) {
    let gw = env.start().await;
    let mut reg = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    let mut audit = auditor(&env, gw.api_addr).await;
    let mother = "031195000002";
    let reads_of = |subject: &str| civgate::pb::v1::SearchEntriesRequest {
        subject_personal_id: subject.into(),
        method: "/civgate.v1.Exchange/Subscribe".into(),
        page_size: 100,
        ..Default::default()
    };
    reg.publish(publish("d-1", birth("HP-LECHAN", "Nguyễn Thị An")))
        .await
        .unwrap();
    // Opening the stream is one record; nothing was delivered yet, so it names no citizen.
    let mut s = civil_status(&mut pop, "population-db").await;
    let first = s.message().await.unwrap().unwrap();
    assert_eq!(first.sequence, 1);
    let found = common::search_records(&mut audit, reads_of(mother)).await;
    assert_eq!(found.len(), 1, "{found:?}");
    let r = &found[0];
    assert_eq!(r.agency_id, "population");
    assert_eq!(r.role, "population_db");
    assert_eq!(r.outcome, "OK");
    assert_eq!(r.subject_personal_ids, [mother]);
    assert_eq!(r.fields_returned, ["event:birth"]);
    assert_eq!(r.detail, "delivered:civil-status:population-db:1-1");

    // A later event, delivered on the open stream, has its own record.
    reg.publish(publish("d-2", birth_to("031190000004", "Nguyễn Văn Bình")))
        .await
        .unwrap();
    assert_eq!(s.message().await.unwrap().unwrap().sequence, 2);
    let found = common::search_records(&mut audit, reads_of("031190000004")).await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].detail, "delivered:civil-status:population-db:2-2");
    // The first mother was not read again.
    assert_eq!(
        common::search_records(&mut audit, reads_of(mother))
            .await
            .len(),
        1
    );
    // The stream's opening: one record, no citizens.
    let opened = common::search_records(
        &mut audit,
        civgate::pb::v1::SearchEntriesRequest {
            method: "/civgate.v1.Exchange/Subscribe".into(),
            page_size: 100,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(opened.len(), 3, "{opened:?}");
    assert_eq!(
        opened.iter().filter(|r| r.detail.is_empty()).count(),
        1,
        "{opened:?}"
    );
}

/// Fail closed: when a batch's audit record cannot be committed, the batch does not leave; the
/// stream ends with UNAVAILABLE and, once the store accepts records again, a new stream
/// delivers the batch with its record.
async fn a_delivery_whose_record_cannot_commit_is_not_sent(env: Env) {
    let gw = env.start().await;
    let mut reg = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    let mut audit = auditor(&env, gw.api_addr).await;
    reg.publish(publish("f-1", birth("HP-LECHAN", "Nguyễn Thị An")))
        .await
        .unwrap();
    let mut s = civil_status(&mut pop, "population-db").await;
    assert_eq!(s.message().await.unwrap().unwrap().sequence, 1);

    // From now on the store refuses every audit record of the population agency (a real
    // failed commit, injected with a trigger); the registry's publishes still commit.
    on_store(
        &env,
        "CREATE TRIGGER refuse_population BEFORE INSERT ON audit_leaves \
         WHEN NEW.agency = 'population' BEGIN SELECT RAISE(ABORT, 'injected'); END;",
        "CREATE FUNCTION refuse_population() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.agency = 'population' THEN RAISE EXCEPTION 'injected'; END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER refuse_population BEFORE INSERT ON audit_leaves \
         FOR EACH ROW EXECUTE FUNCTION refuse_population();",
    )
    .await;
    let mother = "031190000004";
    reg.publish(publish("f-2", birth_to(mother, "Nguyễn Văn Bình")))
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("the stream ends instead of waiting");
    let err = end.expect_err("event 2 must not leave without its record");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("audit"), "{err:?}");
    let reads = civgate::pb::v1::SearchEntriesRequest {
        subject_personal_id: mother.into(),
        method: "/civgate.v1.Exchange/Subscribe".into(),
        page_size: 100,
        ..Default::default()
    };
    assert!(
        common::search_records(&mut audit, reads.clone())
            .await
            .is_empty()
    );

    on_store(
        &env,
        "DROP TRIGGER refuse_population;",
        "DROP TRIGGER refuse_population ON audit_leaves; DROP FUNCTION refuse_population();",
    )
    .await;
    // The group never acknowledged: a new stream starts again at 1.
    let mut s = civil_status(&mut pop, "population-db").await;
    assert_eq!(s.message().await.unwrap().unwrap().sequence, 1);
    assert_eq!(s.message().await.unwrap().unwrap().sequence, 2);
    let found = common::search_records(&mut audit, reads).await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].agency_id, "population");
}

fn list(overdue_only: bool, case_reference: &str) -> civgate::pb::v1::ListOpenRequestsRequest {
    civgate::pb::v1::ListOpenRequestsRequest {
        overdue_only,
        case_reference: case_reference.into(),
        ..Default::default()
    }
}

async fn listed(
    c: &mut ExchangeClient<Channel>,
    req: civgate::pb::v1::ListOpenRequestsRequest,
) -> Vec<civgate::pb::v1::OpenRequest> {
    c.list_open_requests(req)
        .await
        .unwrap()
        .into_inner()
        .requests
}

/// Requests with deadlines: a birth opens what the flow table asks (the linked-only flow only
/// for a birth with a case reference); a registry lists its own requests only, an auditor
/// everyone's, the population database none; an answer closes its request, after the due time
/// as late; the requests are still there after a restart (and on another replica sharing the
/// store); `/metrics` counts them.
async fn requests_with_deadlines_open_close_and_show_who_is_late(env: Env) {
    let config = common::with_flows(
        "[[cases.flows]]\nname = \"birth-personal-id\"\nrequest = \"birth\"\nanswer = \"personal_id_assigned\"\nworking_days = 1\n\n[[cases.flows]]\nname = \"birth-residence\"\nrequest = \"birth\"\nanswer = \"residence_changed\"\nseconds = 1\nlinked_only = true\n",
    );
    let gw = env.start_with(&config).await;
    let mut hp = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut linked = birth("HP-LECHAN", "Nguyễn Thị An");
    linked.case_reference = "HP-2026-0001".into();
    let b1 = hp
        .publish(publish("case-b1", linked))
        .await
        .unwrap()
        .into_inner();
    let b2 = hp
        .publish(publish("case-b2", birth_to("031195000003", "Trần Văn Bảo")))
        .await
        .unwrap()
        .into_inner();
    let open = listed(&mut hp, list(false, "")).await;
    let mut got: Vec<(String, String)> = open
        .iter()
        .map(|r| (r.event_id.clone(), r.answer_kind.clone()))
        .collect();
    got.sort();
    let mut want = vec![
        (b1.event_id.clone(), "personal_id_assigned".to_owned()),
        (b1.event_id.clone(), "residence_changed".to_owned()),
        (b2.event_id.clone(), "personal_id_assigned".to_owned()),
    ];
    want.sort();
    assert_eq!(got, want);
    for r in &open {
        assert_eq!(r.producer_agency_id, "registry-hp");
        assert_eq!(r.awaiting_agency_ids, ["population"]);
        assert_eq!(r.kind, "birth");
        assert!(r.due_at_unix_ms > r.opened_at_unix_ms, "{r:?}");
        assert!(r.answered_at_unix_ms == 0 && !r.late);
    }
    // Paged: one at a time, in order, nothing twice.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = hp
            .list_open_requests(civgate::pb::v1::ListOpenRequestsRequest {
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(
            page.requests
                .iter()
                .map(|r| (r.event_id.clone(), r.answer_kind.clone())),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    seen.sort();
    assert_eq!(seen, want);
    // Who sees what.
    let mut hn = as_agency(&env, gw.api_addr, "registry-hn").await;
    assert!(
        listed(&mut hn, list(false, "")).await.is_empty(),
        "another registry's"
    );
    assert!(
        listed(&mut hn, list(false, "HP-2026-0001"))
            .await
            .is_empty()
    );
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    assert_eq!(
        pop.list_open_requests(list(false, ""))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let mut audit = as_agency(&env, gw.api_addr, "auditor").await;
    assert_eq!(listed(&mut audit, list(false, "")).await.len(), 3);
    // The ID answers in time: its request closes.
    let id = civgate::pb::v1::PersonalIdAssigned {
        personal_id: "031326000001".into(),
        registry_office_code: "HP-LECHAN".into(),
        book_number: "01/2026".into(),
        entry_number: "7".into(),
        ..Default::default()
    };
    pop.publish(publish(
        "case-a1",
        Event {
            in_reply_to: b1.event_id.clone(),
            case_reference: "HP-2026-0001".into(),
            payload: Some(Payload::PersonalIdAssigned(id)),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    assert_eq!(listed(&mut hp, list(false, "")).await.len(), 2);
    // The residence, due a second after the birth, becomes overdue.
    let overdue = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let v = listed(&mut hp, list(true, "")).await;
            if !v.is_empty() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("overdue within 10 s");
    assert_eq!(overdue.len(), 1, "{overdue:?}");
    assert_eq!(overdue[0].answer_kind, "residence_changed");
    assert!(overdue[0].overdue);
    // The command line says the same, naming the late agency.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_civgate"))
        .args([
            "cases",
            "overdue",
            "--addr",
            &gw.api_addr.to_string(),
            "--certs",
        ])
        .arg(env.certs())
        .args(["--client", "auditor"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = text
        .lines()
        .find(|l| l.starts_with(&b1.event_id))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        row.contains("HP-2026-0001") && row.contains("population") && row.contains("OVERDUE by"),
        "{row}"
    );
    assert!(text.contains("1 request(s)"), "{text}");
    let (_, metrics) = common::http_get(gw.admin_addr, "/metrics");
    assert!(
        metrics
            .contains("civgate_requests_overdue{awaiting_agency=\"population\",kind=\"birth\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("civgate_requests_open{awaiting_agency=\"population\",kind=\"birth\"} 2"),
        "{metrics}"
    );
    // Answered late: closed, and recorded as late.
    pop.publish(publish(
        "case-a2",
        Event {
            in_reply_to: b1.event_id.clone(),
            case_reference: "HP-2026-0001".into(),
            payload: Some(Payload::ResidenceChanged(
                civgate::pb::v1::ResidenceChanged {
                    personal_id: "031195000002".into(),
                    new_residence: Some(civgate::pb::v1::Residence {
                        province_code: "031".into(),
                        address: "12 Trần Nguyên Hãn, Phường Lê Chân".into(),
                    }),
                    effective_date: "2026-03-05".into(),
                },
            )),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    assert!(listed(&mut hp, list(true, "")).await.is_empty());
    let case = listed(&mut hp, list(false, "HP-2026-0001")).await;
    assert_eq!(case.len(), 2, "a case shows its answered steps: {case:?}");
    for r in &case {
        assert!(r.answered_at_unix_ms > 0);
        assert_eq!(r.answered_by_agency_id, "population");
        assert_eq!(r.late, r.answer_kind == "residence_changed", "{r:?}");
    }
    // The same on another replica of the store, and after a restart.
    if env.store_url.is_some() {
        let other = env.start_with(&config).await;
        let mut c = as_agency(&env, other.api_addr, "registry-hp").await;
        let v = listed(&mut c, list(false, "")).await;
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].event_id, b2.event_id);
        other.shutdown().await.unwrap();
    }
    drop((hp, hn, pop, audit));
    gw.shutdown().await.unwrap();
    let gw = env.start_with(&config).await;
    let mut hp = as_agency(&env, gw.api_addr, "registry-hp").await;
    let v = listed(&mut hp, list(false, "")).await;
    assert_eq!(v.len(), 1, "after a restart: {v:?}");
    assert_eq!(v[0].event_id, b2.event_id);
    assert_eq!(listed(&mut hp, list(false, "HP-2026-0001")).await, case);
}

fn answer_to(asked: &str, case: &str, payload: Payload) -> Event {
    Event {
        in_reply_to: asked.into(),
        case_reference: case.into(),
        payload: Some(payload),
        ..Default::default()
    }
}

/// The linked birth of Decree 63/2024 across three agencies: the social-insurance agency
/// receives the linked birth (not an unlinked one, nor a marriage), answers its card; the
/// population database answers the ID and the residence; the registry receives both answers
/// and its case is closed. Each answer fits its request: its kind, its citizen; the
/// social-insurance agency publishes its own topic only and reads no population events.
async fn a_linked_birth_is_answered_by_three_agencies(env: Env) {
    let gw = env.start().await;
    let mut hp = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    let mut si = as_agency(&env, gw.api_addr, "social-insurance").await;
    const CASE: &str = "HP-2026-0042";
    let mut linked = birth("HP-LECHAN", "Phạm Minh Khôi");
    linked.case_reference = CASE.into();
    let b = hp
        .publish(publish("lb-1", linked))
        .await
        .unwrap()
        .into_inner();
    hp.publish(publish("lb-2", birth_to("031195000003", "Vũ Thị Lan")))
        .await
        .unwrap();
    // What the case waits for: the shipped flows.
    let mut open: Vec<String> = listed(&mut hp, list(false, CASE))
        .await
        .into_iter()
        .map(|r| format!("{}:{}", r.answer_kind, r.awaiting_agency_ids.join(",")))
        .collect();
    open.sort();
    assert_eq!(
        open,
        [
            "health_insurance_card_issued:social-insurance",
            "permanent_residence_registered:population",
            "personal_id_assigned:population",
        ]
    );
    // The social-insurance agency receives the linked birth only.
    let mut s = common::stream(&mut si, "civil-status", "social-insurance", None).await;
    let got = common::take(&mut s, 1).await;
    assert_eq!(got[0].event_id, b.event_id);
    drop(s);
    for (topic, code) in [("population", Code::PermissionDenied)] {
        let e = si
            .subscribe(SubscribeRequest {
                topic: topic.into(),
                consumer_group: "social-insurance".into(),
                from_sequence: None,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{topic}");
    }
    // It publishes on its own topic only.
    let e = si
        .publish(publish("si-x", birth("HP-LECHAN", "X")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // The card before the ID: it names no child yet, and may leave the ID out.
    use civgate::pb::v1::{
        FuneralAllowanceDecided, HealthInsuranceCardIssued, PermanentResidenceRegistered,
        PersonalIdAssigned, Residence,
    };
    let card = |id: &str| {
        Payload::HealthInsuranceCardIssued(HealthInsuranceCardIssued {
            personal_id: id.into(),
            card_number: "TE1313126000001".into(),
            valid_from: "2026-03-02".into(),
            valid_until: "2032-02-26".into(),
        })
    };
    let e = si
        .publish(publish(
            "si-1",
            answer_to(&b.event_id, CASE, card("031326000001")),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message()
            .contains("is not the citizen of the event it answers"),
        "{}",
        e.message()
    );
    // A funeral allowance does not answer a birth.
    let e = si
        .publish(publish(
            "si-2",
            answer_to(
                &b.event_id,
                CASE,
                Payload::FuneralAllowanceDecided(FuneralAllowanceDecided {
                    personal_id: "031195000002".into(),
                    decision_number: "12/QĐ-BHXH".into(),
                    decided_on: "2026-03-03".into(),
                    granted: true,
                }),
            ),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // The population database answers the ID, then the residence of that child only.
    pop.publish(publish(
        "pop-1",
        answer_to(
            &b.event_id,
            CASE,
            Payload::PersonalIdAssigned(PersonalIdAssigned {
                personal_id: "031326000001".into(),
                registry_office_code: "HP-LECHAN".into(),
                book_number: "01/2026".into(),
                entry_number: "7".into(),
                ..Default::default()
            }),
        ),
    ))
    .await
    .unwrap();
    let residence = |id: &str| {
        Payload::PermanentResidenceRegistered(PermanentResidenceRegistered {
            personal_id: id.into(),
            residence: Some(Residence {
                province_code: "031".into(),
                address: "12 Trần Nguyên Hãn, Phường Lê Chân".into(),
            }),
            effective_date: "2026-03-03".into(),
        })
    };
    let e = pop
        .publish(publish(
            "pop-2",
            answer_to(&b.event_id, CASE, residence("031195000002")),
        ))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("is not the citizen") && !e.message().contains("031326000001"),
        "the message names no ID: {}",
        e.message()
    );
    pop.publish(publish(
        "pop-3",
        answer_to(&b.event_id, CASE, residence("031326000001")),
    ))
    .await
    .unwrap();
    si.publish(publish(
        "si-3",
        answer_to(&b.event_id, CASE, card("031326000001")),
    ))
    .await
    .unwrap();
    // The registry receives the card; another registry does not.
    let mut s = common::stream(&mut hp, "social-insurance", "registry-hp", None).await;
    let got = common::take(&mut s, 1).await;
    assert_eq!(got[0].producer_agency_id, "social-insurance");
    assert_eq!(got[0].event.as_ref().unwrap().in_reply_to, b.event_id);
    let mut hn = as_agency(&env, gw.api_addr, "registry-hn").await;
    let mut other = common::stream(&mut hn, "social-insurance", "registry-hn", None).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), other.message())
            .await
            .is_err(),
        "another registry receives nothing"
    );
    // Every step of the case is answered.
    let case = listed(&mut hp, list(false, CASE)).await;
    assert_eq!(case.len(), 3);
    for r in &case {
        assert!(r.answered_at_unix_ms > 0 && !r.late, "{r:?}");
    }
}

/// A store of the release that kept a row per step of a request (`journal_requests` of schema
/// version 8) is converted at start: every step listed as before, answered or not, and a new
/// answer closes a converted request. The old shape is written here from what the listing
/// showed before the stop (the steps' own values), after the new table is dropped.
async fn requests_of_the_per_step_release_are_converted(env: Env) {
    let config = common::with_flows(
        "[[cases.flows]]\nname = \"birth-personal-id\"\nrequest = \"birth\"\nanswer = \"personal_id_assigned\"\nworking_days = 1\n\n[[cases.flows]]\nname = \"birth-residence\"\nrequest = \"birth\"\nanswer = \"residence_changed\"\nhours = 4\nlinked_only = true\n",
    );
    let gw = env.start_with(&config).await;
    let mut hp = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    let mut audit = as_agency(&env, gw.api_addr, "auditor").await;
    let mut linked = birth("HP-LECHAN", "Nguyễn Thị An");
    linked.case_reference = "HP-2026-0007".into();
    let b1 = hp
        .publish(publish("conv-b1", linked))
        .await
        .unwrap()
        .into_inner();
    hp.publish(publish("conv-b2", birth_to("031195000003", "Trần Văn Bảo")))
        .await
        .unwrap();
    let id = civgate::pb::v1::PersonalIdAssigned {
        personal_id: "031326000001".into(),
        registry_office_code: "HP-LECHAN".into(),
        book_number: "01/2026".into(),
        entry_number: "7".into(),
        ..Default::default()
    };
    pop.publish(publish(
        "conv-a1",
        answer_to(
            &b1.event_id,
            "HP-2026-0007",
            Payload::PersonalIdAssigned(id),
        ),
    ))
    .await
    .unwrap();
    let all = civgate::pb::v1::ListOpenRequestsRequest {
        include_answered: true,
        ..Default::default()
    };
    let before = listed(&mut audit, all.clone()).await;
    assert_eq!(before.len(), 3, "{before:?}");
    assert_eq!(
        before.iter().filter(|r| r.answered_at_unix_ms > 0).count(),
        1
    );
    drop((hp, pop, audit));
    gw.shutdown().await.unwrap();

    // The per-step table of schema version 8, holding the same steps.
    // (Neither had the requests' cases apart: those tables go too.)
    let mut script = String::from(
        "DROP TABLE journal_requests;\nDROP TABLE journal_request_cases;\nDROP TABLE journal_request_cases_pending;\n",
    );
    script.push_str(include_str!(
        "../crates/civgate-store/migrations/postgres/0008_open_requests.sql"
    ));
    let text = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let null_or = |v: i64, t: String| if v == 0 { "NULL".to_owned() } else { t };
    for r in &before {
        script.push_str(&format!(
            "INSERT INTO journal_requests (event_id, answer, flow, producer, kind, case_reference, awaiting, \
             opened_at_ms, due_at_ms, answered_at_ms, answer_event, answered_by, late) \
             VALUES ({}, {}, {}, {}, {}, {}, 'population', {}, {}, {}, {}, {}, {});\n",
            text(&r.event_id),
            text(&r.answer_kind),
            text(&r.flow),
            text(&r.producer_agency_id),
            text(&r.kind),
            text(&r.case_reference),
            r.opened_at_unix_ms,
            r.due_at_unix_ms,
            null_or(r.answered_at_unix_ms, r.answered_at_unix_ms.to_string()),
            null_or(r.answered_at_unix_ms, text(&r.answer_event_id)),
            null_or(r.answered_at_unix_ms, text(&r.answered_by_agency_id)),
            i64::from(r.late),
        ));
    }
    // PostgreSQL also loses what versions 9 to 11 added and forgets that they were applied,
    // so that the next start applies them (a store of version 8).
    let postgres = format!(
        "{script}DROP FUNCTION journal_requests_case_pending();\n\
         DROP TABLE audit_block_groups;\nDROP TABLE audit_group_postings;\n\
         ALTER TABLE audit_subject_blocks DROP COLUMN chunks;\n\
         DELETE FROM _sqlx_migrations WHERE version >= 9;\nDELETE FROM civgate_schema WHERE version >= 9;\n"
    );
    on_store(&env, &script, &postgres).await;

    let gw = env.start_with(&config).await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    let mut audit = as_agency(&env, gw.api_addr, "auditor").await;
    assert_eq!(listed(&mut audit, all.clone()).await, before);
    // A converted request closes like any other.
    pop.publish(publish(
        "conv-a2",
        answer_to(
            &b1.event_id,
            "HP-2026-0007",
            Payload::ResidenceChanged(civgate::pb::v1::ResidenceChanged {
                personal_id: "031195000002".into(),
                new_residence: Some(civgate::pb::v1::Residence {
                    province_code: "031".into(),
                    address: "12 Trần Nguyên Hãn, Phường Lê Chân".into(),
                }),
                effective_date: "2026-03-05".into(),
            }),
        ),
    ))
    .await
    .unwrap();
    let case = listed(&mut audit, list(false, "HP-2026-0007")).await;
    assert_eq!(case.len(), 2, "{case:?}");
    assert!(
        case.iter().all(|r| r.answered_at_unix_ms > 0 && !r.late),
        "{case:?}"
    );
    let open = listed(&mut audit, list(false, "")).await;
    assert_eq!(open.len(), 1, "the unlinked birth's ID only: {open:?}");
    // A request of a new case after the upgrade is found by its case.
    let mut hp = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut next = birth("HP-LECHAN", "Nguyễn Văn Bình");
    next.case_reference = "HP-2026-0008".into();
    let b3 = hp
        .publish(publish("conv-b3", next))
        .await
        .unwrap()
        .into_inner();
    let case = listed(&mut audit, list(false, "HP-2026-0008")).await;
    assert_eq!(case.len(), 2, "{case:?}");
    assert!(case.iter().all(|r| r.event_id == b3.event_id), "{case:?}");
}

on_both_backends!(
    requests_of_the_per_step_release_are_converted,
    publish_is_idempotent_and_conflicting_reuse_is_already_exists,
    a_linked_birth_is_answered_by_three_agencies,
    requests_with_deadlines_open_close_and_show_who_is_late,
    producers_publish_only_their_side_and_offices_and_bad_events_are_named,
    subscribe_delivers_in_order_resumes_after_ack_and_applies_back_pressure,
    a_rejected_event_and_its_reason_are_visible_to_the_producer,
    graceful_shutdown_ends_subscriptions_with_unavailable,
    deliveries_are_audited_as_reads_before_they_are_sent,
    a_delivery_whose_record_cannot_commit_is_not_sent,
);
