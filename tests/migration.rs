//! A store written by the previous release (`tests/fixtures/previous-release`: consumer groups
//! without owners, population events without audiences) opens on both stores: its groups go
//! to the agencies the config names for them, its events to the registries they concern, and
//! a store whose groups cannot be assigned is refused at start with what to add to the config.

mod common;

use civgate::{
    config::DEFAULT_CONFIG,
    pb::v1::{DeathRecorded, Event, GetEventStatusRequest, PublishRequest, event::Payload},
    server::{self, ConfigSource},
};
use common::{Env, as_agency, seqs, stream, take};

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/previous-release"
);

/// Puts the previous release's store where the env's gateway will open it.
async fn restore(env: &Env) {
    env.restore(
        &format!("{FIXTURES}/civgate.sqlite"),
        &format!("{FIXTURES}/postgres.sql"),
    )
    .await
}

async fn a_store_of_the_previous_release_is_adopted(env: Env) {
    restore(&env).await;
    let gw = env.start().await;
    let mut hp = as_agency(&env, gw.api_addr, "registry-hp").await;
    let mut hn = as_agency(&env, gw.api_addr, "registry-hn").await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;

    // The population database's group resumes after its acknowledgement (2).
    let mut s = stream(&mut pop, "civil-status", "population-db", None).await;
    let third = take(&mut s, 1).await.remove(0);
    assert_eq!(third.sequence, 3);
    // Its rejection of 3 is its own, and the producer still sees it.
    let st = hp
        .get_event_status(GetEventStatusRequest {
            event_id: third.event_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.groups.len(), 1, "{st:?}");
    assert_eq!(st.groups[0].consumer_agency_id, "population");
    assert_eq!(st.groups[0].reason, "mother not found");

    // registry-hp's group resumes after 1 with what concerns Hải Phòng: the death of
    // 031095000001 (#2) and the move of 001195000007 to 031 (#4).
    let mut s = stream(&mut hp, "population", "registry-hp", None).await;
    assert_eq!(seqs(&take(&mut s, 2).await), [2, 4]);
    // From the start it also has #1, the answer to its birth (linked by the old field).
    let mut s = stream(&mut hp, "population", "again", Some(1)).await;
    assert_eq!(seqs(&take(&mut s, 3).await), [1, 2, 4]);
    // registry-hn gets Hà Nội's: the death of 001095000003 (#3) and the move from 001 (#4).
    let mut s = stream(&mut hn, "population", "registry-hn", Some(1)).await;
    assert_eq!(seqs(&take(&mut s, 2).await), [3, 4]);

    // The journal continues where it was.
    let r = pop
        .publish(PublishRequest {
            idempotency_key: "after-upgrade".into(),
            event: Some(Event {
                case_reference: String::new(),
                occurred_at_unix_ms: 0,
                in_reply_to: String::new(),
                payload: Some(Payload::DeathRecorded(DeathRecorded {
                    personal_id: "001095000011".into(),
                    date_of_death: "2026-03-01".into(),
                    recording_unit: "Công an".into(),
                })),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.sequence, 5);
    assert_eq!(seqs(&take(&mut s, 1).await), [5]);
}

async fn groups_the_config_does_not_assign_are_refused_at_start(env: Env) {
    restore(&env).await;
    let config = DEFAULT_CONFIG.replace("consumer_groups = [\"population-db\"]\n", "");
    assert_ne!(config, DEFAULT_CONFIG);
    let started = server::start(
        ConfigSource::Text {
            text: config.into(),
            base_dir: env.dir.path().to_owned(),
        },
        env.overrides(),
    )
    .await;
    let err = format!(
        "{:#}",
        started.err().expect("the gateway must refuse the store")
    );
    assert!(
        err.contains("\"population-db\" of topic civil-status")
            && err.contains("consumer_groups = [\"population-db\"]")
            && err.contains("population_db agency"),
        "{err}"
    );
    // Nothing was changed: with the config that names the group, the store opens.
    let gw = env.start().await;
    let mut pop = as_agency(&env, gw.api_addr, "population").await;
    let mut s = stream(&mut pop, "civil-status", "population-db", None).await;
    assert_eq!(seqs(&take(&mut s, 1).await), [3]);
}

on_both_backends!(
    a_store_of_the_previous_release_is_adopted,
    groups_the_config_does_not_assign_are_refused_at_start,
);
