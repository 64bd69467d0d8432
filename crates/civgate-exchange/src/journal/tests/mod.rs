//! The journal's tests on both stores (PostgreSQL ones skip without a test database, unless
//! `CIVGATE_REQUIRE_POSTGRES` is set).

mod audited;

#[test]
fn store_errors_are_logged_not_sent() {
    let inner = "permission denied for table journal_events";
    for e in [
        JournalError::NotDurable(inner.into()),
        JournalError::Read(inner.into()),
    ] {
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(!status.message().contains("journal_events"), "{status:?}");
    }
    let conflict = tonic::Status::from(JournalError::Conflict("e-1".into()));
    assert!(conflict.message().contains("e-1"));
}
use std::path::Path;

use sqlx::{Connection, SqliteConnection};

use super::sqlite::parse_page;
use super::writer::Dialect;
use super::*;

/// A journal in `dir` without an audit log, policy or retention.
async fn open_sqlite_at(dir: &Path) -> Journal {
    Journal::open(&Store::Sqlite(dir.into()), None, None, &Policy::default())
        .await
        .unwrap()
}

/// Three journals on one PostgreSQL schema — three replicas — publishing concurrently:
/// each topic's sequences are gap-free, every receipt is readable, a subscriber-side head
/// on one replica follows what the others commit, and retries return the original receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_postgres_keep_one_gap_free_order() {
    let Some(url) = crate::store::test_schema("journal_replicas").await else {
        return;
    };
    let store = Store::Postgres { url, pool_max: 4 };
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(
            Journal::open(&store, None, None, &Policy::default())
                .await
                .unwrap(),
        );
    }
    let mut head_on_c = replicas[2].head(POPULATION).unwrap();
    let mut tasks = Vec::new();
    for (r, j) in replicas.iter().take(2).enumerate() {
        for p in 0..4 {
            let j = j.clone();
            tasks.push(tokio::spawn(async move {
                let mut receipts = Vec::new();
                for i in 0..50u8 {
                    let key = format!("r{r}-p{p}-{i}");
                    receipts.push(
                        j.publish("population", &key, POPULATION, vec![r as u8, p, i])
                            .await
                            .unwrap(),
                    );
                }
                receipts
            }));
        }
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.extend(t.await.unwrap().into_iter().map(|r| r.sequence));
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=400).collect::<Vec<u64>>(),
        "gap-free, no duplicates"
    );
    // Replica C published nothing, yet its head reaches 400 (NOTIFY, or the 1 s re-read).
    tokio::time::timeout(Duration::from_secs(5), head_on_c.wait_for(|h| *h >= 400))
        .await
        .expect("head on the third replica within 5 s")
        .unwrap();
    let read = replicas[2]
        .read(POPULATION, 1, 400, 1000, None)
        .await
        .unwrap()
        .events;
    assert_eq!(read.len(), 400);
    assert!(read.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    // A retry through another replica gets the original receipt; another payload conflicts.
    let first = &read[0];
    let key = format!(
        "r{}-p{}-{}",
        first.payload[0], first.payload[1], first.payload[2]
    );
    let again = replicas[2]
        .publish("population", &key, POPULATION, first.payload.clone())
        .await
        .unwrap();
    assert_eq!(
        (again.sequence, again.event_id.as_str()),
        (1, first.event_id.as_str())
    );
    assert!(matches!(
        replicas[1]
            .publish("population", &key, POPULATION, vec![9, 9])
            .await,
        Err(JournalError::Conflict(_))
    ));
    // Acks through one replica reach another's watchers.
    let mut acked_on_a = replicas[0]
        .acked(POPULATION, &Group::new("a", "g"))
        .await
        .unwrap();
    replicas[1]
        .ack(POPULATION, &Group::new("a", "g"), 17)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), acked_on_a.wait_for(|a| *a >= 17))
        .await
        .expect("ack seen on the other replica")
        .unwrap();
    let status = replicas[0]
        .status(&read[5].event_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status.groups,
        vec![(Group::new("a", "g"), GroupState::Acknowledged)]
    );
    drop(replicas);
    if let Store::Postgres { url, .. } = &store {
        crate::store::drop_test_schema(url).await;
    }
}

/// Pages come back from SQLite as one JSON row: every payload byte survives, pages hold
/// the range asked for in sequence order and no more than the limit, and an empty range
/// is an empty page.
/// A subscriber's scope selects the events whose audience holds one of its tokens; a page
/// says how far it looked, also when it found nothing or filled up.
async fn scoped_pages_select_by_audience(store: Store) {
    let j = Journal::open(&store, None, None, &Policy::default())
        .await
        .unwrap();
    let audiences = [
        Some(" p:031 "),
        Some(" a:registry-hn "),
        Some(" p:001 p:031 "),
        Some(" p:001 "),
        None,
        Some(" a:registry-hp "),
        Some(" p:048 "),
    ];
    for (i, a) in audiences.iter().enumerate() {
        j.publish_audited(
            "population",
            &format!("k{i}"),
            POPULATION,
            vec![i as u8],
            a.map(str::to_owned),
            None,
            None,
        )
        .await
        .result
        .unwrap();
    }
    let hp: Vec<String> = vec![" a:registry-hp ".into(), " p:031 ".into()];
    let hn: Vec<String> = vec![" a:registry-hn ".into(), " p:001 ".into()];
    let seqs = |p: &Page| p.events.iter().map(|e| e.seq).collect::<Vec<_>>();
    let all = j.read(POPULATION, 1, 7, 256, Some(&hp)).await.unwrap();
    assert_eq!((seqs(&all), all.scanned_to), (vec![1, 3, 6], 7));
    let all = j.read(POPULATION, 1, 7, 256, Some(&hn)).await.unwrap();
    assert_eq!((seqs(&all), all.scanned_to), (vec![2, 3, 4], 7));
    // Full at two: looked as far as the second.
    let two = j.read(POPULATION, 1, 7, 2, Some(&hp)).await.unwrap();
    assert_eq!((seqs(&two), two.scanned_to), (vec![1, 3], 3));
    let rest = j.read(POPULATION, 4, 7, 2, Some(&hp)).await.unwrap();
    assert_eq!((seqs(&rest), rest.scanned_to), (vec![6], 7));
    let none = j.read(POPULATION, 7, 7, 2, Some(&hp)).await.unwrap();
    assert_eq!((seqs(&none), none.scanned_to), (vec![], 7));
    // The backlog counts what the scope selects after the acknowledged sequence.
    assert_eq!(j.backlog(POPULATION, 1, Some(&hp)).await.unwrap().0, 2);
    assert_eq!(j.backlog(POPULATION, 0, None).await.unwrap().0, 7);
    // Stored audiences come back with the event.
    let id = &all.events[0].event_id;
    let found = j.find(id).await.unwrap().unwrap();
    assert_eq!(found.audience.as_deref(), Some(" a:registry-hn "));
    assert_eq!(j.audience_at(POPULATION, 5).await.unwrap(), Some(None));
    assert_eq!(j.audience_at(POPULATION, 9).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_pages_select_by_audience_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    scoped_pages_select_by_audience(Store::Sqlite(dir.path().into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_pages_select_by_audience_on_postgres() {
    crate::store::with_test_postgres("scoped_pages", scoped_pages_select_by_audience).await;
}

/// Retention deletes an event only once every holder it is addressed to acknowledged it:
/// a holder that never acknowledged keeps what is addressed to it, another's ack does not
/// stand in for it, and an event addressed to no holder is kept.
async fn retention_waits_for_every_holder_an_event_is_addressed_to(store: Store) {
    let j = Journal::open(&store, None, None, &Policy::default())
        .await
        .unwrap();
    for (i, a) in [
        " p:031 ",
        " p:001 ",
        " a:registry-hp ",
        " p:001 p:031 ",
        " p:048 ",
    ]
    .iter()
    .enumerate()
    {
        j.publish_audited(
            "population",
            &format!("k{i}"),
            POPULATION,
            vec![i as u8],
            Some((*a).to_owned()),
            None,
            None,
        )
        .await
        .result
        .unwrap();
    }
    let holder = |agency: &str, province: &str| Holder {
        topic: POPULATION,
        group: Group::new(agency, agency),
        scope: Some(vec![format!(" a:{agency} "), format!(" p:{province} ")]),
    };
    let holders = [holder("registry-hp", "031"), holder("registry-hn", "001")];
    j.ack(POPULATION, &Group::new("registry-hp", "registry-hp"), 4)
        .await
        .unwrap();
    // Another agency's group of the same name holds nothing back.
    j.ack(POPULATION, &Group::new("registry-hp", "registry-hn"), 5)
        .await
        .unwrap();
    let prune = async |holders: &[Holder]| -> u64 {
        match &store {
            Store::Sqlite(dir) => {
                let conn = SqliteConnection::connect(&format!(
                    "sqlite://{}",
                    crate::sqlite::store_path(dir).display()
                ))
                .await
                .unwrap();
                let mut w = super::sqlite::Sqlite { conn };
                w.prune(i64::MAX, holders).await.unwrap()
            }
            Store::Postgres { url, .. } => {
                let pool = crate::store::pg_pool(url, 1, Duration::from_secs(5))
                    .await
                    .unwrap();
                let mut w = super::postgres::Pg { pool };
                w.prune(i64::MAX, holders).await.unwrap()
            }
        }
    };
    let stored = async || -> Vec<u64> {
        let mut v = Vec::new();
        for seq in 1..=5 {
            if j.audience_at(POPULATION, seq).await.unwrap().is_some() {
                v.push(seq);
            }
        }
        v
    };
    assert_eq!(prune(&holders).await, 2);
    assert_eq!(
        stored().await,
        [2, 4, 5],
        "registry-hn never acknowledged; nobody covers 048"
    );
    j.ack(POPULATION, &Group::new("registry-hn", "registry-hn"), 2)
        .await
        .unwrap();
    assert_eq!(prune(&holders).await, 1);
    assert_eq!(stored().await, [4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_waits_for_every_holder_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    retention_waits_for_every_holder_an_event_is_addressed_to(Store::Sqlite(dir.path().into()))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_waits_for_every_holder_on_postgres() {
    crate::store::with_test_postgres(
        "retention_holders",
        retention_waits_for_every_holder_an_event_is_addressed_to,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_pages_return_exact_payloads_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let j = open_sqlite_at(dir.path()).await;
    // Every byte value, an empty-ish and a 64 KiB payload among them.
    let payloads: Vec<Vec<u8>> = (0..300u32)
        .map(|i| match i {
            0 => (0..=255).collect(),
            1 => vec![0],
            2 => vec![0xab; 64 << 10],
            _ => i.to_be_bytes().to_vec(),
        })
        .collect();
    let mut receipts = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        receipts.push(
            j.publish("population", &format!("k{i}"), POPULATION, p.clone())
                .await
                .unwrap(),
        );
    }
    let page = j.read(POPULATION, 1, 300, 256, None).await.unwrap();
    assert_eq!((page.events.len(), page.scanned_to), (256, 256));
    for (e, (p, r)) in page.events.iter().zip(payloads.iter().zip(&receipts)) {
        assert_eq!(
            (e.seq, &e.event_id, &e.payload),
            (r.sequence, &r.event_id, p)
        );
        assert_eq!(
            (e.producer.as_str(), e.recorded_at_ms),
            ("population", r.recorded_at_ms)
        );
    }
    let rest = j.read(POPULATION, 257, 280, 256, None).await.unwrap();
    assert_eq!(
        rest.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (257..=280).collect::<Vec<_>>()
    );
    assert_eq!(rest.scanned_to, 280);
    let none = j.read(POPULATION, 301, 400, 256, None).await.unwrap();
    assert!(none.events.is_empty() && none.scanned_to == 400);
    assert!(
        j.read(CIVIL_STATUS, 1, 10, 256, None)
            .await
            .unwrap()
            .events
            .is_empty()
    );
}

/// A page stops before the event that would start past `PAGE_BYTES` of payloads — the
/// first event always comes, however large — and the next read goes on from there.
async fn pages_are_bounded_by_bytes(store: Store) {
    let j = Journal::open(&store, None, None, &Policy::default())
        .await
        .unwrap();
    let mib = 1 << 20;
    // Sizes in MiB; sequences 1..=7.
    let sizes = [1, 2, 1, 5, 0, 3, 2];
    for (i, n) in sizes.iter().enumerate() {
        let payload = vec![i as u8; n * mib + 1];
        j.publish("population", &format!("big{i}"), POPULATION, payload)
            .await
            .unwrap();
    }
    let mut pages = Vec::new();
    let mut next = 1;
    while next <= 7 {
        let page = j.read(POPULATION, next, 7, 256, None).await.unwrap();
        for (e, want) in page.events.iter().zip(next..) {
            assert_eq!(e.seq, want);
            let i = (want - 1) as usize;
            let want = vec![i as u8; sizes[i] * mib + 1];
            // Not assert_eq!: a failure would print megabytes.
            assert!(
                e.payload == want,
                "event {}: {} bytes",
                e.seq,
                e.payload.len()
            );
        }
        next += page.events.len() as u64;
        pages.push(page.events.iter().map(|e| e.seq).collect::<Vec<_>>());
    }
    // 1+2+1 MiB (and 3 bytes) pass 4 MiB only with the third; 5 MiB alone; 0+3 MiB, then 2.
    assert_eq!(pages, [vec![1, 2, 3], vec![4], vec![5, 6, 7]]);
    // The event count still limits.
    assert_eq!(
        j.read(POPULATION, 5, 7, 2, None)
            .await
            .unwrap()
            .events
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_bounded_by_bytes_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    pages_are_bounded_by_bytes(Store::Sqlite(dir.path().into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_bounded_by_bytes_on_postgres() {
    crate::store::with_test_postgres("journal_page_bytes", pages_are_bounded_by_bytes).await;
}

#[test]
fn a_page_is_put_back_in_sequence_order_and_bad_pages_are_errors() {
    let rows = parse_page(
        r#"[[3,"c","p","0aff",30],[1,"a","p","",10],[4,"d","p",null,40],[2,"b","q","00",20]]"#,
    )
    .unwrap();
    assert_eq!(
        rows,
        [
            (1, "a".into(), "p".into(), Some(vec![]), 10),
            (2, "b".into(), "q".into(), Some(vec![0]), 20),
            (3, "c".into(), "p".into(), Some(vec![0x0a, 0xff]), 30),
            // Too large to come with the page.
            (4, "d".into(), "p".into(), None, 40),
        ]
    );
    assert!(parse_page("[]").unwrap().is_empty());
    for bad in [
        r#"[[1,"a","p","0g",1]]"#,
        r#"[[1,"a","p"]]"#,
        "{",
        r#"[[1,"a","p","abc",1]]"#,
    ] {
        assert!(
            matches!(parse_page(bad), Err(JournalError::Read(_))),
            "{bad}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_ack_and_retention_keep_what_a_group_still_needs() {
    let dir = tempfile::tempdir().unwrap();
    let j = open_sqlite_at(dir.path()).await;
    for i in 0..5 {
        let r = j
            .publish("population", &format!("k{i}"), POPULATION, vec![i])
            .await
            .unwrap();
        assert_eq!(r.sequence, u64::from(i) + 1);
    }
    j.ack(POPULATION, &Group::new("a", "a"), 4).await.unwrap();
    j.ack(POPULATION, &Group::new("a", "b"), 2).await.unwrap();
    let mut w = super::sqlite::Sqlite {
        conn: SqliteConnection::connect(&format!(
            "sqlite://{}",
            crate::sqlite::store_path(dir.path()).display()
        ))
        .await
        .unwrap(),
    };
    // Both groups read every event of the topic; retention waits for both.
    let holders: Vec<Holder> = ["a", "b"]
        .iter()
        .map(|g| Holder {
            topic: POPULATION,
            group: Group::new("a", g),
            scope: None,
        })
        .collect();
    // Without holders, a topic keeps everything.
    assert_eq!(w.prune(i64::MAX, &[]).await.unwrap(), 0);
    // Everything is old enough; only what both groups acknowledged goes.
    let deleted = w.prune(i64::MAX, &holders).await.unwrap();
    assert_eq!(deleted, 2);
    let left: Vec<i64> = sqlx::query_scalar("SELECT seq FROM journal_events ORDER BY seq")
        .fetch_all(&mut w.conn)
        .await
        .unwrap();
    assert_eq!(left, vec![3, 4, 5]);
    // Nothing is deleted before it is old enough.
    assert_eq!(w.prune(0, &holders).await.unwrap(), 0);
    // New events continue the sequence.
    assert_eq!(
        j.publish("population", "k9", POPULATION, vec![9])
            .await
            .unwrap()
            .sequence,
        6
    );
    // ...also after retention removed every event and a restart.
    j.ack(POPULATION, &Group::new("a", "a"), 6).await.unwrap();
    j.ack(POPULATION, &Group::new("a", "b"), 6).await.unwrap();
    assert_eq!(w.prune(i64::MAX, &holders).await.unwrap(), 4);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM journal_events")
        .fetch_one(&mut w.conn)
        .await
        .unwrap();
    assert_eq!(left, 0);
    drop(j);
    let j = open_sqlite_at(dir.path()).await;
    let r = j
        .publish("population", "k10", POPULATION, vec![10])
        .await
        .unwrap();
    assert_eq!(r.sequence, 7);
}

/// An answer as a stored event would carry it: `in_reply_to` the asked event.
fn answer_payload(asked: &str, id: &str) -> Vec<u8> {
    use prost::Message;
    crate::pb::v1::Event {
        in_reply_to: asked.to_owned(),
        payload: Some(crate::pb::v1::event::Payload::PersonalIdAssigned(
            crate::pb::v1::PersonalIdAssigned {
                personal_id: id.to_owned(),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
    .encode_to_vec()
}

fn assigned(asked: &str) -> Option<Answer> {
    Some(Answer {
        asked: asked.to_owned(),
        kind: "personal_id_assigned",
    })
}

async fn answer(j: &Journal, key: &str, asked: &str, id: &str) -> Result<Receipt, JournalError> {
    j.publish_audited(
        "population",
        key,
        POPULATION,
        answer_payload(asked, id),
        None,
        assigned(asked),
        None,
    )
    .await
    .result
}

/// One answer of each kind per request: a second `personal_id_assigned` for the same birth is
/// refused with the first one's event id, whatever its key and whoever sends it; a retry of the
/// first still gets its receipt; another kind of answer, or an answer to another request, is
/// accepted; of two sent at once exactly one commits; and the rule holds after a reopen
/// (another replica, on PostgreSQL).
async fn one_answer_of_each_kind_per_request(store: Store) {
    let j = Journal::open(&store, None, None, &Policy::default())
        .await
        .unwrap();
    let birth = j
        .publish("registry-hp", "b1", CIVIL_STATUS, vec![1])
        .await
        .unwrap();
    let first = answer(&j, "a1", &birth.event_id, "031225000001")
        .await
        .unwrap();
    match answer(&j, "a2", &birth.event_id, "031225000002").await {
        Err(JournalError::Answered { asked, kind, by }) => {
            assert_eq!(
                (asked.as_str(), kind, by.as_str()),
                (
                    birth.event_id.as_str(),
                    "personal_id_assigned",
                    first.event_id.as_str()
                )
            );
        }
        other => panic!("a second answer: {other:?}"),
    }
    assert_eq!(
        answer(&j, "a1", &birth.event_id, "031225000001")
            .await
            .unwrap(),
        first,
        "a retry gets its receipt"
    );
    let other_kind = j
        .publish_audited(
            "population",
            "r1",
            POPULATION,
            vec![7],
            None,
            Some(Answer {
                asked: birth.event_id.clone(),
                kind: "citizen_data_corrected",
            }),
            None,
        )
        .await
        .result;
    assert!(other_kind.is_ok(), "{other_kind:?}");
    // Two answers to one new request at once: one commits, one is refused.
    let second = j
        .publish("registry-hp", "b2", CIVIL_STATUS, vec![2])
        .await
        .unwrap();
    let (x, y) = tokio::join!(
        answer(&j, "x", &second.event_id, "031225000003"),
        answer(&j, "y", &second.event_id, "031225000004")
    );
    assert_eq!(
        [&x, &y].iter().filter(|r| r.is_ok()).count(),
        1,
        "{x:?} {y:?}"
    );
    assert!(
        [&x, &y]
            .iter()
            .any(|r| matches!(r, Err(JournalError::Answered { .. })))
    );
    // Another journal on the same store (a restart, or another replica) keeps the rule.
    let again = Journal::open(&store, None, None, &Policy::default())
        .await
        .unwrap();
    assert!(matches!(
        answer(&again, "a3", &birth.event_id, "031225000005").await,
        Err(JournalError::Answered { .. })
    ));
    let status = tonic::Status::from(JournalError::Answered {
        asked: birth.event_id.clone(),
        kind: "personal_id_assigned",
        by: first.event_id.clone(),
    });
    assert_eq!(status.code(), tonic::Code::AlreadyExists);
    assert!(status.message().contains(&first.event_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_answer_of_each_kind_per_request_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    one_answer_of_each_kind_per_request(Store::Sqlite(dir.path().into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_answer_of_each_kind_per_request_on_postgres() {
    crate::store::with_test_postgres("one_answer", one_answer_of_each_kind_per_request).await;
}

/// A store written before answers were recorded: the open records the answers it holds, so a
/// request answered before the upgrade is not answered again after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_stored_before_the_upgrade_count() {
    let dir = tempfile::tempdir().unwrap();
    let birth;
    {
        let j = open_sqlite_at(dir.path()).await;
        birth = j
            .publish("registry-hp", "b1", CIVIL_STATUS, vec![1])
            .await
            .unwrap();
        // As the earlier release stored it: the event only.
        j.publish(
            "population",
            "a1",
            POPULATION,
            answer_payload(&birth.event_id, "031225000001"),
        )
        .await
        .unwrap();
    }
    let path = crate::sqlite::store_path(dir.path());
    let mut conn = SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::raw_sql("DROP TABLE journal_answers; DROP TABLE journal_backfills")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let j = open_sqlite_at(dir.path()).await;
    assert!(matches!(
        answer(&j, "a2", &birth.event_id, "031225000002").await,
        Err(JournalError::Answered { .. })
    ));
    // Recorded once: the marker is gone, a later open does not scan again.
    drop(j);
    let mut conn = SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM journal_backfills")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(pending, 0);
}

/// A request's row altered by hand so that its steps no longer decode: the answer to it is
/// published all the same (the request stays as it was, with an error logged), a listing that
/// reaches the row says which request it is instead of leaving it out, the other request's
/// answer closes it, and `/metrics` counts the rows that decode.
async fn a_corrupted_request_row_loses_no_answer(store: Store) {
    let j = Journal::open(&store, None, None, &Policy::default())
        .await
        .unwrap();
    let opens = |answer: &'static str| Opens {
        kind: "birth",
        case_reference: String::new(),
        list: vec![crate::cases::Opening {
            flow: "birth-personal-id".into(),
            answer,
            awaiting: POPULATION,
            due_at_ms: 1,
        }],
    };
    let mut births = Vec::new();
    for key in ["b1", "b2"] {
        let r = j
            .publish_tracked(
                "registry-hp",
                key,
                CIVIL_STATUS,
                vec![1],
                None,
                None,
                Some(opens("personal_id_assigned")),
                None,
            )
            .await
            .result
            .unwrap();
        births.push(r.event_id);
    }
    let open = RequestFilter {
        open_only: true,
        limit: 10,
        ..RequestFilter::default()
    };
    assert_eq!(j.requests(&open).await.unwrap().len(), 2);
    behind_the_back(
        &store,
        &format!(
            "UPDATE journal_requests SET steps = '[[\"birth-personal-id\"' WHERE event_id = '{}'",
            births[0]
        ),
    )
    .await;
    answer(&j, "a1", &births[0], "031225000001")
        .await
        .expect("the answer to the corrupted request is published");
    answer(&j, "a2", &births[1], "031225000002").await.unwrap();
    assert!(
        j.answer_of(&births[0], "personal_id_assigned")
            .await
            .unwrap()
            .is_some()
    );
    match j.requests(&open).await {
        Err(JournalError::Read(e)) => assert!(e.contains(&births[0]), "{e}"),
        other => panic!("a listing over the corrupted row: {other:?}"),
    }
    // `/metrics` counts what decodes: the other request, answered.
    let stats = j.request_stats(i64::MAX, 0).await.unwrap();
    assert!(stats.open.is_empty(), "{stats:?}");
    let key = ("population".to_owned(), "personal_id_assigned".to_owned());
    assert_eq!(stats.answer_ms[&key].len(), 1, "{stats:?}");
    assert_eq!(stats.late[&key], 1, "due at 1 ms: late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_request_row_loses_no_answer_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    a_corrupted_request_row_loses_no_answer(Store::Sqlite(dir.path().into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_request_row_loses_no_answer_on_postgres() {
    crate::store::with_test_postgres("corrupt_request", a_corrupted_request_row_loses_no_answer)
        .await;
}

/// Runs `sql` on the store behind the journal's back.
async fn behind_the_back(store: &Store, sql: &str) {
    match store {
        Store::Sqlite(dir) => {
            let mut c = SqliteConnection::connect(&format!(
                "sqlite://{}",
                crate::sqlite::store_path(dir).display()
            ))
            .await
            .unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(&mut c)
                .await
                .unwrap();
        }
        Store::Postgres { url, .. } => {
            let pool = crate::store::pg_pool(url, 1, Duration::from_secs(5))
                .await
                .unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(&pool)
                .await
                .unwrap();
        }
    }
}

/// A request is found by its case while its case is queued and once the writer has indexed
/// it, after a restart too; a request in neither table is not (the listing reads them).
async fn requests_are_found_by_case_queued_or_indexed(store: Store) {
    let j = Journal::open(&store, None, None, &Policy::default())
        .await
        .unwrap();
    let publish = |j: Journal, key: &'static str, case: &'static str| async move {
        j.publish_tracked(
            "registry-hp",
            key,
            CIVIL_STATUS,
            vec![1],
            None,
            None,
            Some(Opens {
                kind: "birth",
                case_reference: case.into(),
                list: vec![crate::cases::Opening {
                    flow: "birth-personal-id".into(),
                    answer: "personal_id_assigned",
                    awaiting: POPULATION,
                    due_at_ms: i64::MAX,
                }],
            }),
            None,
        )
        .await
        .result
        .unwrap()
        .event_id
    };
    let b1 = publish(j.clone(), "b1", "HP-2").await;
    let b2 = publish(j.clone(), "b2", "HP-1").await;
    let b3 = publish(j.clone(), "b3", "HP-2").await;
    publish(j.clone(), "b4", "").await;
    let by_case = |case: &str| RequestFilter {
        case_reference: Some(case.into()),
        limit: 10,
        ..RequestFilter::default()
    };
    let events = |rs: Vec<OpenRequest>| rs.into_iter().map(|r| r.event_id).collect::<Vec<_>>();
    // Queued or already indexed by the writer's timer: found either way.
    assert_eq!(
        events(j.requests(&by_case("HP-2")).await.unwrap()),
        [b1.clone(), b3.clone()]
    );
    j.index_cases().await.unwrap();
    assert_eq!(j.index_cases().await.unwrap(), 0, "nothing left queued");
    assert_eq!(
        events(j.requests(&by_case("HP-2")).await.unwrap()),
        [b1.clone(), b3.clone()]
    );
    assert_eq!(
        events(j.requests(&by_case("HP-1")).await.unwrap()),
        vec![b2.clone()]
    );
    assert!(j.requests(&by_case("HP-3")).await.unwrap().is_empty());
    // Paged one at a time.
    let mut f = by_case("HP-2");
    f.limit = 1;
    let first = j.requests(&f).await.unwrap();
    assert_eq!(events(first.clone()), vec![b1.clone()]);
    f.after = Some((first[0].event_id.clone(), first[0].answer.clone()));
    assert_eq!(events(j.requests(&f).await.unwrap()), vec![b3.clone()]);
    // b3 put back in the queue (as a new request is): found from there.
    behind_the_back(
        &store,
        &format!(
            "DELETE FROM journal_request_cases WHERE event_id = '{b3}';\n\
             INSERT INTO journal_request_cases_pending (event_id, case_reference) VALUES ('{b3}', 'HP-2');"
        ),
    )
    .await;
    assert_eq!(
        events(j.requests(&by_case("HP-2")).await.unwrap()),
        [b1.clone(), b3.clone()]
    );
    // In neither: not found — the listing reads the two tables, not the requests' column.
    behind_the_back(
        &store,
        &format!(
            "DELETE FROM journal_request_cases WHERE event_id = '{b3}';\n\
             DELETE FROM journal_request_cases_pending WHERE event_id = '{b3}';"
        ),
    )
    .await;
    assert_eq!(
        events(j.requests(&by_case("HP-2")).await.unwrap()),
        vec![b1.clone()]
    );
    // A new request of a known case, and a restart.
    let b5 = publish(j.clone(), "b5", "HP-1").await;
    drop(j);
    let j = Journal::open(&store, None, None, &Policy::default())
        .await
        .unwrap();
    assert_eq!(
        events(j.requests(&by_case("HP-1")).await.unwrap()),
        [b2.clone(), b5.clone()]
    );
    j.index_cases().await.unwrap();
    assert_eq!(
        events(j.requests(&by_case("HP-1")).await.unwrap()),
        [b2, b5]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_found_by_case_queued_or_indexed_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    requests_are_found_by_case_queued_or_indexed(Store::Sqlite(dir.path().into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_found_by_case_queued_or_indexed_on_postgres() {
    crate::store::with_test_postgres(
        "cases_indexed",
        requests_are_found_by_case_queued_or_indexed,
    )
    .await;
}

/// Two replicas publish requests of the same cases while both move the queued cases into the
/// index at the same time: every request is found by its case, once, from either replica, and
/// nothing is left queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_postgres_index_cases_without_losing_one() {
    let Some(url) = crate::store::test_schema("journal_replica_cases").await else {
        return;
    };
    let store = Store::Postgres { url, pool_max: 4 };
    let a = Journal::open(&store, None, None, &Policy::default())
        .await
        .unwrap();
    let b = Journal::open(&store, None, None, &Policy::default())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for (r, j) in [a.clone(), b.clone()].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..120u32 {
                let r = j
                    .publish_tracked(
                        "registry-hp",
                        &format!("r{r}-{i}"),
                        CIVIL_STATUS,
                        vec![1],
                        None,
                        None,
                        Some(Opens {
                            kind: "birth",
                            case_reference: format!("HP-{}", i % 7),
                            list: vec![crate::cases::Opening {
                                flow: "birth-personal-id".into(),
                                answer: "personal_id_assigned",
                                awaiting: POPULATION,
                                due_at_ms: i64::MAX,
                            }],
                        }),
                        None,
                    )
                    .await
                    .result
                    .unwrap();
                ids.push((format!("HP-{}", i % 7), r.event_id));
                if i % 20 == 0 {
                    j.index_cases().await.unwrap();
                }
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    a.index_cases().await.unwrap();
    b.index_cases().await.unwrap();
    for case in 0..7 {
        let case = format!("HP-{case}");
        let mut expect: Vec<String> = all
            .iter()
            .filter(|(c, _)| *c == case)
            .map(|(_, e)| e.clone())
            .collect();
        expect.sort_unstable();
        for j in [&a, &b] {
            let f = RequestFilter {
                case_reference: Some(case.clone()),
                limit: 1_000,
                ..RequestFilter::default()
            };
            let found: Vec<String> = j
                .requests(&f)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.event_id)
                .collect();
            assert_eq!(found, expect, "{case}");
        }
    }
    assert_eq!(a.index_cases().await.unwrap(), 0, "nothing left queued");
    drop((a, b));
    if let Store::Postgres { url, .. } = &store {
        crate::store::drop_test_schema(url).await;
    }
}
