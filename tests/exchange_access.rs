//! Who may consume which topic, whose consumer group is whose, and who receives which event:
//! over real mTLS, on both stores.

mod common;

use std::time::Duration;

use civgate::{
    client,
    pb::v1::{
        AckRequest, Birth, DeathRecorded, Event, GetEventStatusRequest, Parent, PersonalIdAssigned,
        PublishReceipt, PublishRequest, Registration, RejectRequest, Residence, ResidenceChanged,
        Sex, SubscribeRequest, SubscribedEvent, event::Payload, exchange_client::ExchangeClient,
    },
};
use common::{Env, as_agency, publish};
use tonic::{Code, transport::Channel};

const CS: &str = "civil-status";
const POP: &str = "population";

/// A birth registered by `office` in `province`, to a mother with ID `mother`.
fn birth(office: &str, province: &str, mother: &str) -> Event {
    Event {
        case_reference: String::new(),
        occurred_at_unix_ms: 0,
        in_reply_to: String::new(),
        payload: Some(Payload::Birth(Birth {
            registration: Some(Registration {
                registry_office_code: office.into(),
                book_number: "01/2026".into(),
                entry_number: "7".into(),
                registration_date: "2026-03-02".into(),
                registering_official: "Trần Văn Bình".into(),
                country: String::new(),
            }),
            full_name: "Nguyễn Thị An".into(),
            sex: Sex::Female as i32,
            date_of_birth: "2026-02-27".into(),
            place_of_birth: "Bệnh viện".into(),
            hometown: "Việt Nam".into(),
            ethnicity: "Kinh".into(),
            nationality: "Việt Nam".into(),
            birth_registration_province_code: province.into(),
            father: None,
            mother: Some(Parent {
                personal_id: Some(mother.into()),
                full_name: "Lê Thị Hoa".into(),
                ..Default::default()
            }),
            foundling: false,
            personal_id: None,
        })),
    }
}

fn population(payload: Payload, in_reply_to: &str) -> Event {
    Event {
        case_reference: String::new(),
        occurred_at_unix_ms: 0,
        in_reply_to: in_reply_to.into(),
        payload: Some(payload),
    }
}

fn death(id: &str) -> Event {
    population(
        Payload::DeathRecorded(DeathRecorded {
            personal_id: id.into(),
            date_of_death: "2026-03-01".into(),
            recording_unit: "Công an".into(),
        }),
        "",
    )
}

fn assigned(child: &str, birth: &PublishReceipt) -> Event {
    population(
        Payload::PersonalIdAssigned(PersonalIdAssigned {
            personal_id: child.into(),
            registry_office_code: "HP-LECHAN".into(),
            book_number: "01/2026".into(),
            entry_number: "7".into(),
            ..Default::default()
        }),
        &birth.event_id,
    )
}

async fn subscribe(
    c: &mut ExchangeClient<Channel>,
    topic: &str,
    group: &str,
    from: Option<u64>,
) -> Result<tonic::Streaming<SubscribedEvent>, tonic::Status> {
    c.subscribe(SubscribeRequest {
        topic: topic.into(),
        consumer_group: group.into(),
        from_sequence: from,
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn next(s: &mut tonic::Streaming<SubscribedEvent>) -> SubscribedEvent {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .expect("the stream goes on")
}

/// The sequences of the next `n` events of a stream.
async fn take(s: &mut tonic::Streaming<SubscribedEvent>, n: usize) -> Vec<u64> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(next(s).await.sequence);
    }
    v
}

async fn ack(c: &mut ExchangeClient<Channel>, topic: &str, group: &str, seq: u64) -> Code {
    match c
        .ack(AckRequest {
            topic: topic.into(),
            consumer_group: group.into(),
            sequence: seq,
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    }
}

async fn reject(c: &mut ExchangeClient<Channel>, topic: &str, group: &str, seq: u64) -> Code {
    match c
        .reject(RejectRequest {
            topic: topic.into(),
            consumer_group: group.into(),
            sequence: seq,
            reason: format!("rejected by {group}"),
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    }
}

/// (agency, group name, state name) of each group an event's status lists.
async fn groups(c: &mut ExchangeClient<Channel>, event_id: &str) -> Result<Vec<String>, Code> {
    let st = c
        .get_event_status(GetEventStatusRequest {
            event_id: event_id.into(),
        })
        .await
        .map_err(|e| e.code())?
        .into_inner();
    let mut v: Vec<String> = st
        .groups
        .iter()
        .map(|g| {
            let state = civgate::pb::v1::DeliveryState::try_from(g.state)
                .map(|s| {
                    s.as_str_name()
                        .trim_start_matches("DELIVERY_STATE_")
                        .to_owned()
                })
                .unwrap_or_default();
            format!("{}/{}:{state}", g.consumer_agency_id, g.consumer_group)
        })
        .collect();
    v.sort();
    Ok(v)
}

#[derive(Clone, Copy, Debug)]
enum Method {
    Subscribe,
    Ack,
    Reject,
}

/// Every (role × topic × own/another agency's group name × Subscribe/Ack/Reject), then every
/// (role × event) GetEventStatus. A consumer group is the caller's own whatever its name: the
/// rows that use another agency's group name succeed only where the caller consumes the topic,
/// and touch only the caller's group (checked after the table through the auditor).
async fn every_role_topic_and_group_is_decided_by_the_policy(env: Env) {
    use Method::*;
    let gw = env.start().await;
    let mut hp = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut hn = as_agency(&env, gw.api_addr, "registry-hn").await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    let mut aud = as_agency(&env, gw.api_addr, "auditor").await;
    // civil-status #1; population #1 (a Hải Phòng citizen: registry-hp's), #2 (Hà Nội's).
    let b = publish(&mut hp, "b1", birth("HP-LECHAN", "031", "031195000002")).await;
    let d_hp = publish(&mut pop, "d1", death("031095000001")).await;
    let d_hn = publish(&mut pop, "d2", death("001095000003")).await;
    assert_eq!((b.sequence, d_hp.sequence, d_hn.sequence), (1, 1, 2));

    // (caller, topic, group name, method, expected). Group names: the caller's own, or one
    // another agency uses on that topic ("population-db" is the population database's on
    // civil-status, "registry-hp" registry-hp's on population).
    #[rustfmt::skip]
    let table: &[(&str, &str, &str, Method, Code)] = &[
        ("registry-hp", CS,  "registry-hp",   Subscribe, Code::PermissionDenied),
        ("registry-hp", CS,  "registry-hp",   Ack,       Code::PermissionDenied),
        ("registry-hp", CS,  "registry-hp",   Reject,    Code::PermissionDenied),
        ("registry-hp", CS,  "population-db", Subscribe, Code::PermissionDenied),
        ("registry-hp", CS,  "population-db", Ack,       Code::PermissionDenied),
        ("registry-hp", CS,  "population-db", Reject,    Code::PermissionDenied),
        ("registry-hp", POP, "registry-hp",   Subscribe, Code::Ok),
        ("registry-hp", POP, "registry-hp",   Ack,       Code::Ok),
        ("registry-hp", POP, "registry-hp",   Reject,    Code::Ok),
        ("registry-hp", POP, "registry-hn",   Subscribe, Code::Ok),
        ("registry-hp", POP, "registry-hn",   Ack,       Code::Ok),
        ("registry-hp", POP, "registry-hn",   Reject,    Code::Ok),
        ("registry-hn", CS,  "registry-hn",   Subscribe, Code::PermissionDenied),
        ("registry-hn", CS,  "registry-hn",   Ack,       Code::PermissionDenied),
        ("registry-hn", CS,  "registry-hn",   Reject,    Code::PermissionDenied),
        ("registry-hn", CS,  "population-db", Subscribe, Code::PermissionDenied),
        ("registry-hn", CS,  "population-db", Ack,       Code::PermissionDenied),
        ("registry-hn", CS,  "population-db", Reject,    Code::PermissionDenied),
        ("registry-hn", POP, "registry-hn",   Subscribe, Code::Ok),
        ("registry-hn", POP, "registry-hn",   Ack,       Code::Ok),
        ("registry-hn", POP, "registry-hn",   Reject,    Code::Ok),
        ("registry-hn", POP, "registry-hp",   Subscribe, Code::Ok),
        ("registry-hn", POP, "registry-hp",   Ack,       Code::Ok),
        ("registry-hn", POP, "registry-hp",   Reject,    Code::Ok),
        ("population",  CS,  "population-db", Subscribe, Code::Ok),
        ("population",  CS,  "population-db", Ack,       Code::Ok),
        ("population",  CS,  "population-db", Reject,    Code::Ok),
        ("population",  CS,  "registry-hp",   Subscribe, Code::Ok),
        ("population",  CS,  "registry-hp",   Ack,       Code::Ok),
        ("population",  CS,  "registry-hp",   Reject,    Code::Ok),
        ("population",  POP, "population-db", Subscribe, Code::PermissionDenied),
        ("population",  POP, "population-db", Ack,       Code::PermissionDenied),
        ("population",  POP, "population-db", Reject,    Code::PermissionDenied),
        ("population",  POP, "registry-hp",   Subscribe, Code::PermissionDenied),
        ("population",  POP, "registry-hp",   Ack,       Code::PermissionDenied),
        ("population",  POP, "registry-hp",   Reject,    Code::PermissionDenied),
        // The auditor's role grants none of these methods: refused in the gate.
        ("auditor",     CS,  "auditor",       Subscribe, Code::PermissionDenied),
        ("auditor",     CS,  "auditor",       Ack,       Code::PermissionDenied),
        ("auditor",     CS,  "auditor",       Reject,    Code::PermissionDenied),
        ("auditor",     CS,  "population-db", Subscribe, Code::PermissionDenied),
        ("auditor",     CS,  "population-db", Ack,       Code::PermissionDenied),
        ("auditor",     CS,  "population-db", Reject,    Code::PermissionDenied),
        ("auditor",     POP, "auditor",       Subscribe, Code::PermissionDenied),
        ("auditor",     POP, "auditor",       Ack,       Code::PermissionDenied),
        ("auditor",     POP, "auditor",       Reject,    Code::PermissionDenied),
        ("auditor",     POP, "registry-hp",   Subscribe, Code::PermissionDenied),
        ("auditor",     POP, "registry-hp",   Ack,       Code::PermissionDenied),
        ("auditor",     POP, "registry-hp",   Reject,    Code::PermissionDenied),
    ];
    for &(who, topic, group, method, want) in table {
        let c = match who {
            "registry-hp" => &mut hp,
            "registry-hn" => &mut hn,
            "population" => &mut pop,
            _ => &mut aud,
        };
        // The event each consumer may act on: the one addressed to it.
        let mine = match (topic, who) {
            (POP, "registry-hn") => d_hn.sequence,
            _ => 1,
        };
        let got = match method {
            Subscribe => match subscribe(c, topic, group, Some(1)).await {
                // Whatever the group's name, the stream holds what is addressed to the caller.
                Ok(mut s) => {
                    assert_eq!(next(&mut s).await.sequence, mine, "{who} {topic} {group}");
                    Code::Ok
                }
                Err(e) => e.code(),
            },
            Ack => ack(c, topic, group, mine).await,
            Reject => reject(c, topic, group, mine).await,
        };
        assert_eq!(got, want, "{who} {method:?} {topic} group {group}");
    }

    // Each group is its agency's: every action landed on the caller's own group, none on the
    // group of the agency whose name it used, none on a topic the caller does not consume.
    assert_eq!(
        groups(&mut aud, &b.event_id).await.unwrap(),
        [
            "population/population-db:REJECTED",
            "population/registry-hp:REJECTED"
        ]
    );
    assert_eq!(
        groups(&mut aud, &d_hp.event_id).await.unwrap(),
        [
            "registry-hp/registry-hn:REJECTED",
            "registry-hp/registry-hp:REJECTED"
        ]
    );
    assert_eq!(
        groups(&mut aud, &d_hn.event_id).await.unwrap(),
        [
            "registry-hn/registry-hn:REJECTED",
            "registry-hn/registry-hp:REJECTED"
        ]
    );

    // GetEventStatus: (caller, event, expected). The producer sees the groups its event is
    // addressed to, without other agencies' group names; auditors see the names; nobody else
    // learns the event exists.
    let withheld_cs = ["population/:REJECTED", "population/:REJECTED"];
    let withheld_pop = ["registry-hp/:REJECTED", "registry-hp/:REJECTED"];
    type Row<'a> = (&'a str, &'a PublishReceipt, Result<&'a [&'a str], Code>);
    #[rustfmt::skip]
    let status_table: &[Row] = &[
        ("registry-hp", &b,    Ok(&withheld_cs)),
        ("registry-hn", &b,    Err(Code::NotFound)),
        ("population",  &b,    Err(Code::NotFound)),
        ("auditor",     &b,    Ok(&["population/population-db:REJECTED", "population/registry-hp:REJECTED"])),
        ("registry-hp", &d_hp, Err(Code::NotFound)),
        ("registry-hn", &d_hp, Err(Code::NotFound)),
        ("population",  &d_hp, Ok(&withheld_pop)),
        ("auditor",     &d_hp, Ok(&["registry-hp/registry-hn:REJECTED", "registry-hp/registry-hp:REJECTED"])),
    ];
    for &(who, event, want) in status_table {
        let c = match who {
            "registry-hp" => &mut hp,
            "registry-hn" => &mut hn,
            "population" => &mut pop,
            _ => &mut aud,
        };
        let got = groups(c, &event.event_id).await;
        let want = want.map(|w| w.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(got, want, "{who} GetEventStatus #{}", event.sequence);
    }

    // Refusals are audited like every refusal, with their reason.
    let mut audit = civgate::pb::v1::audit_client::AuditClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("auditor"))
            .await
            .unwrap(),
    );
    let denied = common::search_records(
        &mut audit,
        civgate::pb::v1::SearchEntriesRequest {
            agency_id: "registry-hn".into(),
            outcome: "PERMISSION_DENIED".into(),
            page_size: 100,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(denied.len(), 6, "{denied:?}");
    assert!(
        denied.iter().all(|r| r.detail == "topic_not_granted"),
        "{denied:?}"
    );
}

/// The attack this rule answers: a second registry subscribes to civil-status with the
/// population database's group, then acknowledges and rejects for it. Every attempt fails, and
/// the population database then receives every event, in order.
async fn a_registry_can_neither_read_nor_skip_the_population_databases_events(env: Env) {
    let gw = env.start().await;
    let mut hp = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut hn = as_agency(&env, gw.api_addr, "registry-hn").await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    let mut births = Vec::new();
    for i in 0..3 {
        births.push(
            publish(
                &mut hp,
                &format!("b{i}"),
                birth("HP-LECHAN", "031", "031195000002"),
            )
            .await,
        );
    }
    let err = subscribe(&mut hn, CS, "population-db", None)
        .await
        .expect_err("registry-hn must not read civil-status");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("civil-status"), "{err:?}");
    assert_eq!(
        ack(&mut hn, CS, "population-db", 3).await,
        Code::PermissionDenied
    );
    assert_eq!(
        reject(&mut hn, CS, "population-db", 2).await,
        Code::PermissionDenied
    );
    // Nor does the population database read its own topic.
    let err = subscribe(&mut pop, POP, "anything", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The producer sees its events untouched.
    for b in &births {
        let st = groups(&mut hp, &b.event_id).await.unwrap();
        assert!(st.is_empty(), "no consumer yet: {st:?}");
    }
    let mut s = subscribe(&mut pop, CS, "population-db", None)
        .await
        .unwrap();
    assert_eq!(take(&mut s, 3).await, [1, 2, 3]);
    assert_eq!(ack(&mut pop, CS, "population-db", 3).await, Code::Ok);
    assert_eq!(
        groups(&mut hp, &births[2].event_id).await.unwrap(),
        ["population/:ACKNOWLEDGED"]
    );
}

/// Two registries in different provinces: each receives the answers to its own events and the
/// events about citizens of its province, nothing else, in sequence order; a stream resumes
/// after the group's ack; events addressed to others do not count against the window.
async fn each_registry_receives_what_is_addressed_to_it(env: Env) {
    let gw = env.start().await;
    let mut hp = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut hn = as_agency(&env, gw.api_addr, "registry-hn").await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    let b_hp = publish(&mut hp, "b-hp", birth("HP-LECHAN", "031", "031195000002")).await;
    let b_hn = publish(&mut hn, "b-hn", birth("HN-BADINH", "001", "001195000004")).await;
    // A second Hải Phòng birth, to a mother from Hà Nội (her ID is of 001): its answer goes to
    // registry-hp only. (A birth registered in Hải Phòng is of province 031, and so is the ID
    // assigned to the child: the gateway refuses any other.)
    let b_hp_2 = publish(&mut hp, "b-hp-2", birth("HP-LECHAN", "031", "001195000006")).await;
    // #1: answer to registry-hp.  #2: answer to registry-hn.  #3: answer to registry-hp, though
    // the mother is of 001 (registry-hn's province).  #4: a 031 death.  #5: a 001 death.
    // #6: a move from 001 to 031: both.  #7: a reissue in 048 (Đà Nẵng): neither.
    let mut expected_hp = vec![];
    let mut expected_hn = vec![];
    let r = publish(&mut pop, "a1", assigned("031326000001", &b_hp)).await;
    expected_hp.push(r.sequence);
    let r = publish(&mut pop, "a2", assigned("001326000002", &b_hn)).await;
    expected_hn.push(r.sequence);
    let r = publish(&mut pop, "a3", assigned("031326000003", &b_hp_2)).await;
    expected_hp.push(r.sequence);
    let r = publish(&mut pop, "d3", death("031095000001")).await;
    expected_hp.push(r.sequence);
    let r = publish(&mut pop, "d4", death("001095000003")).await;
    expected_hn.push(r.sequence);
    let moved = population(
        Payload::ResidenceChanged(ResidenceChanged {
            personal_id: "001195000007".into(),
            new_residence: Some(Residence {
                province_code: "031".into(),
                address: "12 Lạch Tray".into(),
            }),
            effective_date: "2026-03-01".into(),
        }),
        "",
    );
    let r = publish(&mut pop, "m5", moved).await;
    expected_hp.push(r.sequence);
    expected_hn.push(r.sequence);
    publish(
        &mut pop,
        "x6",
        population(
            Payload::PersonalIdReissued(civgate::pb::v1::PersonalIdReissued {
                old_personal_id: "048095000001".into(),
                new_personal_id: "048095000002".into(),
                reason: "cấp lại".into(),
            }),
            "",
        ),
    )
    .await;
    let mut s_hp = subscribe(&mut hp, POP, "registry-hp", None).await.unwrap();
    let mut s_hn = subscribe(&mut hn, POP, "registry-hn", None).await.unwrap();
    assert_eq!(take(&mut s_hp, 4).await, expected_hp);
    assert_eq!(take(&mut s_hn, 3).await, expected_hn);
    // Then one for each, pushed as it commits; nothing in between leaks.
    let r_hn = publish(&mut pop, "d7", death("001095000009")).await;
    let r_hp = publish(&mut pop, "d8", death("031095000009")).await;
    assert_eq!(next(&mut s_hp).await.sequence, r_hp.sequence);
    assert_eq!(next(&mut s_hn).await.sequence, r_hn.sequence);

    // Resume after an ack: from the next addressed event.
    assert_eq!(
        ack(&mut hp, POP, "registry-hp", expected_hp[2]).await,
        Code::Ok
    );
    drop(s_hp);
    let mut s_hp = subscribe(&mut hp, POP, "registry-hp", None).await.unwrap();
    assert_eq!(take(&mut s_hp, 2).await, [expected_hp[3], r_hp.sequence]);
    // A registry can reject only what is addressed to it; another's event is not found, as
    // one that does not exist.
    assert_eq!(
        reject(&mut hp, POP, "registry-hp", expected_hn[0]).await,
        Code::NotFound
    );
    assert_eq!(
        reject(&mut hp, POP, "registry-hp", expected_hp[0]).await,
        Code::Ok
    );

    // The window counts events, not sequences: more than a window of events for Hà Nội,
    // then one for Hải Phòng, which its (never acknowledging) stream still receives.
    let window = civgate::api::exchange::WINDOW;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..8u64 {
        let mut c = pop.clone();
        tasks.spawn(async move {
            for i in (w..window + 8).step_by(8) {
                publish(&mut c, &format!("w{i}"), death(&format!("001094{i:06}"))).await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let last = publish(&mut pop, "last", death("031093000001")).await;
    let mut s_new = subscribe(&mut hp, POP, "late-hp", Some(r_hp.sequence + 1))
        .await
        .unwrap();
    assert_eq!(next(&mut s_new).await.sequence, last.sequence);
    assert_eq!(next(&mut s_hp).await.sequence, last.sequence);
}

/// `in_reply_to`: an answer must answer an event that exists, on the other topic, addressed to
/// the answering side; a personal_id_assigned must answer a birth, and says so only through
/// `in_reply_to`.
async fn answers_are_checked_against_what_they_answer(env: Env) {
    let gw = env.start().await;
    let mut hp = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut hn = as_agency(&env, gw.api_addr, "registry-hn").await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    let b = publish(&mut hp, "b", birth("HP-LECHAN", "031", "031195000002")).await;
    let d = publish(&mut pop, "d", death("031095000001")).await;
    let bad = |e: tonic::Status| {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        e.message().to_owned()
    };
    let refuse = async |c: &mut ExchangeClient<Channel>, key: &str, event: Event| {
        c.publish(PublishRequest {
            idempotency_key: key.into(),
            event: Some(event),
        })
        .await
        .expect_err(key)
    };
    // An event that does not exist, and one of the same topic.
    let mut ghost = b.clone();
    ghost.event_id = "0190f0a0b0c0d0e0f000000000000000".into();
    let m = bad(refuse(&mut pop, "x1", assigned("031326000001", &ghost)).await);
    assert!(m.contains("event.in_reply_to"), "{m}");
    bad(refuse(&mut pop, "x2", assigned("031326000001", &d)).await);
    // A personal ID answers a birth, not a death registration; and not through birth_event_id.
    let registered_death = publish(
        &mut hp,
        "death-reg",
        Event {
            case_reference: String::new(),
            occurred_at_unix_ms: 0,
            in_reply_to: String::new(),
            payload: Some(Payload::Death(civgate::pb::v1::Death {
                registration: Some(Registration {
                    registry_office_code: "HP-LECHAN".into(),
                    book_number: "01/2026".into(),
                    entry_number: "8".into(),
                    registration_date: "2026-03-02".into(),
                    registering_official: "Trần Văn Bình".into(),
                    country: String::new(),
                }),
                personal_id: "031095000002".into(),
                date_of_death: "2026-03-01".into(),
                place_of_death: "Hải Phòng".into(),
                ..Default::default()
            })),
        },
    )
    .await;
    let m = bad(refuse(&mut pop, "x5", assigned("031326000001", &registered_death)).await);
    assert!(m.contains("answers a birth"), "{m}");
    let mut via_old_field = assigned("031326000001", &b);
    via_old_field.in_reply_to.clear();
    if let Some(Payload::PersonalIdAssigned(a)) = &mut via_old_field.payload {
        #[allow(deprecated)]
        {
            a.birth_event_id = b.event_id.clone();
        }
    }
    let m = bad(refuse(&mut pop, "x3", via_old_field).await);
    assert!(
        m.contains("in_reply_to") && m.contains("birth_event_id"),
        "{m}"
    );
    // The ID must fit the birth: its province, the child's sex and year.
    for (id, why) in [
        ("001326000001", "province 001 differs"),
        ("031226000001", "says male"),
        ("031190000001", "1990"),
    ] {
        let m = bad(refuse(&mut pop, id, assigned(id, &b)).await);
        assert!(m.contains(why), "{id}: {m}");
    }
    // A registry answers only a population event addressed to it.
    let mut reply = birth("HN-BADINH", "001", "001195000004");
    reply.in_reply_to = d.event_id.clone();
    bad(refuse(&mut hn, "x4", reply.clone()).await);
    let mut reply_hp = birth("HP-LECHAN", "031", "031195000002");
    reply_hp.in_reply_to = d.event_id.clone();
    publish(&mut hp, "ok-hp", reply_hp).await;
    // The right answer is delivered to the birth's producer only.
    let a = publish(&mut pop, "ok", assigned("031326000001", &b)).await;
    let mut s = subscribe(&mut hp, POP, "registry-hp", None).await.unwrap();
    let got: Vec<u64> = take(&mut s, 2).await;
    assert_eq!(got, [d.sequence, a.sequence]);
    // One answer per request: a second personal ID for the same birth is refused, naming the
    // answer that stands; a retry of that answer gets its receipt again.
    let e = refuse(&mut pop, "ok-2", assigned("031326000002", &b)).await;
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains(&a.event_id), "{e:?}");
    assert_eq!(
        publish(&mut pop, "ok", assigned("031326000001", &b)).await,
        a
    );
    let mut audit = civgate::pb::v1::audit_client::AuditClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("auditor"))
            .await
            .unwrap(),
    );
    let refused = common::search_records(
        &mut audit,
        civgate::pb::v1::SearchEntriesRequest {
            agency_id: "population".into(),
            outcome: "ALREADY_EXISTS".into(),
            page_size: 100,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].detail, "already_answered");

    // A re-issued number answers a change of sex or date of birth, and must fit it.
    let reissued = |new: &str, asked: &PublishReceipt| {
        population(
            Payload::PersonalIdReissued(civgate::pb::v1::PersonalIdReissued {
                old_personal_id: "031195000002".into(),
                new_personal_id: new.into(),
                reason: "xác định lại giới tính".into(),
            }),
            &asked.event_id,
        )
    };
    let m = bad(refuse(&mut pop, "r1", reissued("031095000009", &b)).await);
    assert!(m.contains("answers a civil_status_change"), "{m}");
    let gender = publish(
        &mut hp,
        "gender",
        Event {
            case_reference: String::new(),
            occurred_at_unix_ms: 0,
            in_reply_to: String::new(),
            payload: Some(Payload::CivilStatusChange(
                civgate::pb::v1::CivilStatusChange {
                    registration: Some(Registration {
                        registry_office_code: "HP-LECHAN".into(),
                        book_number: "01/2026".into(),
                        entry_number: "9".into(),
                        registration_date: "2026-03-02".into(),
                        registering_official: "Trần Văn Bình".into(),
                        country: String::new(),
                    }),
                    personal_id: "031195000002".into(),
                    field: "sex".into(),
                    old_value: "female".into(),
                    new_value: "male".into(),
                    reason: "xác định lại giới tính".into(),
                    kind: civgate::pb::v1::ChangeKind::Gender as i32,
                },
            )),
        },
    )
    .await;
    // Still the old sex: the number does not fit the change.
    let m = bad(refuse(&mut pop, "r2", reissued("031195000009", &gender)).await);
    assert!(m.contains("the change answered"), "{m}");
    publish(&mut pop, "r3", reissued("031095000009", &gender)).await;

    // A fact sent as an answer concerns a citizen the answered event names, and also reaches
    // the registry covering that citizen.
    let hanoi_mother = publish(&mut hp, "b-hn", birth("HP-LECHAN", "031", "001195000004")).await;
    let m = bad(refuse(
        &mut pop,
        "x6",
        population(
            Payload::DeathRecorded(DeathRecorded {
                personal_id: "001065125751".into(),
                date_of_death: "2026-03-01".into(),
                recording_unit: "Công an".into(),
            }),
            &hanoi_mother.event_id,
        ),
    )
    .await);
    assert!(m.contains("does not name citizen 001065125751"), "{m}");
    let died = publish(
        &mut pop,
        "d-hn",
        population(
            Payload::DeathRecorded(DeathRecorded {
                personal_id: "001195000004".into(),
                date_of_death: "2026-03-01".into(),
                recording_unit: "Công an".into(),
            }),
            &hanoi_mother.event_id,
        ),
    )
    .await;
    let mut s_hn = subscribe(&mut hn, POP, "registry-hn", None).await.unwrap();
    assert_eq!(next(&mut s_hn).await.sequence, died.sequence);
}

/// What a registry receives through its subscription counts in its harvesting window: past the
/// threshold, look-ups of further citizens are refused; deliveries never are.
async fn deliveries_count_as_reads(env: Env) {
    let config = civgate::config::DEFAULT_CONFIG.replace("deny_distinct = 0", "deny_distinct = 2");
    assert_ne!(config, civgate::config::DEFAULT_CONFIG);
    let gw = env.start_with(&config).await;
    let mut hp = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    for i in 1..=3 {
        publish(
            &mut pop,
            &format!("d{i}"),
            death(&format!("03109500000{i}")),
        )
        .await;
    }
    let mut s = subscribe(&mut hp, POP, "registry-hp", None).await.unwrap();
    assert_eq!(take(&mut s, 3).await, [1, 2, 3]);
    let mut citizens = civgate::pb::v1::citizens_client::CitizensClient::new(
        client::connect(gw.api_addr, &env.certs(), Some("registry-hp"))
            .await
            .unwrap(),
    );
    let err = citizens
        .get_citizen(civgate::pb::v1::GetCitizenRequest {
            case_reference: String::new(),
            personal_id: "031195000005".into(),
            purpose: "DEATH_REGISTRATION".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("harvesting guard"), "{err:?}");
    // One it received is not a further citizen (no directory here: UNAVAILABLE, not refused).
    let err = citizens
        .get_citizen(civgate::pb::v1::GetCitizenRequest {
            case_reference: String::new(),
            personal_id: "031095000001".into(),
            purpose: "DEATH_REGISTRATION".into(),
        })
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::PermissionDenied, "{err:?}");
}

/// `/metrics` shows each group's backlog (events addressed to it after its ack) and the age of
/// the oldest, and dead letters per topic.
async fn consumer_lag_is_visible(env: Env) {
    let gw = env.start().await;
    let mut hp = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    // Unique names: the metrics registry is shared by the tests of this process.
    let group = format!("lag-{}", rand_group());
    for (i, id) in [
        "031095000001",
        "001095000003",
        "031095000004",
        "031095000005",
    ]
    .iter()
    .enumerate()
    {
        publish(&mut pop, &format!("d{i}"), death(id)).await;
    }
    assert_eq!(ack(&mut hp, POP, &group, 1).await, Code::Ok);
    assert_eq!(reject(&mut hp, POP, &group, 3).await, Code::Ok);
    let (status, text) = common::http_get(gw.admin_addr, "/metrics");
    assert_eq!(status, 200);
    let labels = format!("{{topic=\"population\",agency=\"registry-hp\",group=\"{group}\"}}");
    let value = |name: &str| -> f64 {
        let prefix = format!("{name}{labels} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("{prefix} in /metrics"))
            .trim()
            .parse()
            .unwrap()
    };
    // After #1: #3 and #4 are Hải Phòng's (#2 is Hà Nội's).
    assert_eq!(value("civgate_exchange_backlog_events"), 2.0);
    assert!(value("civgate_exchange_backlog_oldest_seconds") >= 0.0);
    assert!(
        text.lines()
            .any(|l| l.starts_with("civgate_exchange_dead_letters{topic=\"population\"}")),
        "dead letters"
    );
}

/// A reload applies to open streams: a registry given a province receives its events from
/// then on; an agency whose right to the topic is gone is cut off with PERMISSION_DENIED, even
/// while its stream is idle.
async fn a_reload_applies_to_open_streams(env: Env) {
    use civgate::config::DEFAULT_CONFIG;
    env.write_config(DEFAULT_CONFIG);
    let gw = civgate::server::start(
        civgate::server::ConfigSource::File(env.config_path()),
        env.overrides(),
    )
    .await
    .unwrap();
    let mut hp = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut hn = as_agency(&env, gw.api_addr, "registry-hn").await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    let mut s_hn = subscribe(&mut hn, POP, "registry-hn", None).await.unwrap();
    let mut s_hp = subscribe(&mut hp, POP, "registry-hp", None).await.unwrap();
    let d1 = publish(&mut pop, "d1", death("001095000001")).await;
    let d2 = publish(&mut pop, "d2", death("031095000002")).await;
    assert_eq!(next(&mut s_hn).await.sequence, d1.sequence);
    assert_eq!(next(&mut s_hp).await.sequence, d2.sequence);

    let hp_section = DEFAULT_CONFIG
        .split("[agencies.registry-hp]")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .unwrap();
    let reloaded = DEFAULT_CONFIG
        .replace(&format!("[agencies.registry-hp]{hp_section}\n\n"), "")
        .replace("provinces = [\"001\"]", "provinces = [\"001\", \"048\"]");
    assert!(!reloaded.contains("[agencies.registry-hp]") && reloaded.contains("\"048\"]"));
    env.write_config(&reloaded);
    gw.reload().unwrap();

    // registry-hp's idle stream ends without waiting for an event.
    let end = tokio::time::timeout(Duration::from_secs(10), s_hp.message())
        .await
        .expect("the stream ends");
    assert_eq!(end.unwrap_err().code(), Code::PermissionDenied);
    let d3 = publish(&mut pop, "d3", death("048095000003")).await;
    assert_eq!(next(&mut s_hn).await.sequence, d3.sequence);
}

fn rand_group() -> String {
    format!("{:08x}", rand::random::<u32>())
}

on_both_backends!(
    every_role_topic_and_group_is_decided_by_the_policy,
    a_registry_can_neither_read_nor_skip_the_population_databases_events,
    each_registry_receives_what_is_addressed_to_it,
    answers_are_checked_against_what_they_answer,
    deliveries_count_as_reads,
    consumer_lag_is_visible,
    a_reload_applies_to_open_streams,
);

/// Through the real gateway: a birth registered late is accepted and its receipt says so; a
/// birth whose mother's ID says male is refused before anything is stored.
#[tokio::test]
async fn a_late_registration_is_noticed_and_a_broken_rule_refused() {
    use civgate::pb::v1::event::Payload;
    let env = Env::new();
    let gw = env.start().await;
    let mut hp = as_agency(&env, gw.api_addr, "registry-hp").await;
    let on_time = publish(&mut hp, "n1", common::birth("HP-LECHAN", "Lê An")).await;
    assert!(on_time.notices.is_empty(), "{on_time:?}");
    let mut late = common::birth("HP-LECHAN", "Lê Bình");
    if let Some(Payload::Birth(b)) = &mut late.payload {
        b.date_of_birth = "2025-06-01".into();
    }
    let receipt = publish(&mut hp, "n2", late).await;
    assert_eq!(receipt.notices, ["late_birth_registration"]);
    assert_eq!(receipt.sequence, on_time.sequence + 1);

    let mut wrong = common::birth("HP-LECHAN", "Lê Chi");
    if let Some(Payload::Birth(b)) = &mut wrong.payload
        && let Some(m) = &mut b.mother
    {
        m.personal_id = Some("031095000001".into());
    }
    let err = hp
        .publish(civgate::pb::v1::PublishRequest {
            idempotency_key: "n3".into(),
            event: Some(wrong),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let next = publish(&mut hp, "n4", common::birth("HP-LECHAN", "Lê Dung")).await;
    assert_eq!(
        next.sequence,
        receipt.sequence + 1,
        "the refused event took no sequence"
    );
    gw.shutdown().await.unwrap();
}
