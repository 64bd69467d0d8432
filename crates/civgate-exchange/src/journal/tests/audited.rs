//! Publishes and the audit records of their calls commit together, and a journal of an
//! earlier layout moves into the store file.

use super::*;
use crate::pb::v1::AuditRecord;
use sha2::{Digest, Sha256};

/// A publish carrying its call's audit draft commits the event and the record in one
/// transaction: the record holds the outcome (a retry: OK again; the same key with another
/// payload: ALREADY_EXISTS), and records appended meanwhile by the audit log's own writer
/// interleave in one tree that proves every entry. Then both stores reopen where they were.
async fn publishes_and_their_records_commit_together(store: Store) {
    use crate::audit::{AuditLog, Call, Draft, Facts, note::Signer};
    use prost::Message;

    let open_log = || async {
        AuditLog::open(crate::audit::log::Options {
            store: &store,
            signer: Signer::generate("civgate.test/audit").unwrap(),
            origin: "civgate.test/audit".into(),
            checkpoint_interval: Duration::from_secs(3600),
            commit_timeout: Duration::from_secs(10),
            healthy: watch::channel(true).0,
        })
        .await
        .unwrap()
    };
    let log = open_log().await;
    let journal = Journal::open(&store, None, Some(log.tail()), &Policy::default())
        .await
        .unwrap();
    let agency: crate::domain::AgencyId = "population".parse().unwrap();
    let fingerprint = crate::domain::CertFingerprint([7; 32]);
    let draft_at = |rid: &str, path: &str| Draft {
        call: Arc::new(Call::new(
            Arc::new(civgate_policy::identity::PeerIdentity::of(
                Ok(agency.clone()),
                fingerprint,
            )),
            Some(crate::policy::Principal {
                agency: agency.clone(),
                role: crate::domain::Role::PopulationDb,
                fingerprint,
                registry_offices: Arc::from([]),
                provinces: Arc::from([]),
                countries: Arc::from([]),
            }),
            path.into(),
            rid.into(),
            std::time::Instant::now(),
        )),
        facts: Facts {
            subjects: vec!["031200000001".into()],
            fields: vec!["event:personal_id_assigned".into()],
            ..Facts::default()
        },
    };
    let draft = |rid: &str| draft_at(rid, "/civgate.v1.Exchange/Publish");
    let record_at = |log: &AuditLog, i: u64| {
        let log = log.clone();
        async move {
            let leaf = log.entries(i, i + 1).await.unwrap().remove(0);
            AuditRecord::decode(leaf.as_slice()).unwrap()
        }
    };

    let start = log.size();
    let d1 = draft("r1");
    let call = d1.call.clone();
    assert!(!call.is_recorded());
    let first = journal
        .publish_audited(
            "population",
            "k1",
            POPULATION,
            vec![1],
            None,
            None,
            Some(d1),
        )
        .await;
    // The writer marks the call before it answers, and so before it lets go of it (the gate
    // relies on that when the client went away meanwhile); it lets go just after answering.
    assert!(call.is_recorded());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while Arc::strong_count(&call) > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer kept the draft"
        );
        tokio::task::yield_now().await;
    }
    let receipt = first.result.unwrap();
    assert_eq!(first.audit_index, Some(start));
    assert_eq!(
        log.size(),
        start + 1,
        "the record is durable with the receipt"
    );
    let rec = record_at(&log, start).await;
    assert_eq!(
        (rec.index, rec.outcome.as_str(), rec.request_id.as_str()),
        (start, "OK", "r1")
    );
    assert_eq!(rec.method, "/civgate.v1.Exchange/Publish");
    assert_eq!(rec.role, "population_db");
    assert_eq!(rec.subject_personal_ids, ["031200000001"]);
    assert_eq!(rec.fields_returned, ["event:personal_id_assigned"]);

    let retry = journal
        .publish_audited(
            "population",
            "k1",
            POPULATION,
            vec![1],
            None,
            None,
            Some(draft("r2")),
        )
        .await;
    assert_eq!(retry.result.unwrap(), receipt);
    assert_eq!(
        record_at(&log, retry.audit_index.unwrap()).await.outcome,
        "OK"
    );
    let clash = journal
        .publish_audited(
            "population",
            "k1",
            POPULATION,
            vec![2],
            None,
            None,
            Some(draft("r3")),
        )
        .await;
    assert!(matches!(clash.result, Err(JournalError::Conflict(_))));
    let rec = record_at(&log, clash.audit_index.unwrap()).await;
    assert_eq!(
        (rec.outcome.as_str(), rec.request_id.as_str()),
        ("ALREADY_EXISTS", "r3")
    );
    // Without a draft nothing is recorded by the journal.
    let plain = journal
        .publish_audited("population", "k2", POPULATION, vec![3], None, None, None)
        .await;
    assert_eq!(plain.audit_index, None);
    assert_eq!(plain.result.unwrap().sequence, receipt.sequence + 1);

    // An acknowledgement and a rejection commit their calls' records with them too.
    let bare = |rid: &str, path: &str| Draft {
        facts: Facts::default(),
        ..draft_at(rid, path)
    };
    let acked = journal
        .ack_audited(
            POPULATION,
            &Group::new("a", "g"),
            receipt.sequence,
            Some(bare("r4", "/civgate.v1.Exchange/Ack")),
        )
        .await
        .unwrap();
    assert_eq!(acked, Some(start + 3));
    let rejected = journal
        .reject_audited(
            POPULATION,
            &Group::new("a", "g"),
            receipt.sequence + 1,
            "no such citizen",
            Some(bare("r5", "/civgate.v1.Exchange/Reject")),
        )
        .await
        .unwrap();
    assert_eq!(rejected, Some(start + 4));
    assert_eq!(log.size(), start + 5);
    for (i, rid, method) in [
        (start + 3, "r4", "/civgate.v1.Exchange/Ack"),
        (start + 4, "r5", "/civgate.v1.Exchange/Reject"),
    ] {
        let rec = record_at(&log, i).await;
        assert_eq!(
            (
                rec.request_id.as_str(),
                rec.method.as_str(),
                rec.outcome.as_str()
            ),
            (rid, method, "OK")
        );
        assert!(rec.subject_personal_ids.is_empty());
    }
    // A record alone (a subscription's delivery) commits with its detail, and nothing of
    // the journal changes.
    let heads = journal.head(POPULATION).map(|h| *h.borrow());
    let delivered = journal
        .record(
            draft_at("r6", "/civgate.v1.Exchange/Subscribe"),
            "delivered:population:g:1-2".into(),
        )
        .await
        .unwrap();
    assert_eq!(delivered, Some(start + 5));
    let rec = record_at(&log, start + 5).await;
    assert_eq!(
        (
            rec.method.as_str(),
            rec.outcome.as_str(),
            rec.detail.as_str()
        ),
        (
            "/civgate.v1.Exchange/Subscribe",
            "OK",
            "delivered:population:g:1-2"
        )
    );
    assert_eq!(rec.subject_personal_ids, ["031200000001"]);
    assert_eq!(journal.head(POPULATION).map(|h| *h.borrow()), heads);
    let groups = journal
        .status(&receipt.event_id)
        .await
        .unwrap()
        .unwrap()
        .groups;
    assert!(
        groups.contains(&(Group::new("a", "g"), GroupState::Acknowledged)),
        "{groups:?}"
    );
    // Without a draft, nothing.
    journal
        .ack(POPULATION, &Group::new("a", "g"), receipt.sequence)
        .await
        .unwrap();
    assert_eq!(log.size(), start + 6);

    // Both writers at once: every index once, one tree.
    let mut tasks = Vec::new();
    for t in 0..4u8 {
        let (journal, log) = (journal.clone(), log.clone());
        let drafts: Vec<Draft> = (0..25).map(|i| draft(&format!("t{t}-{i}"))).collect();
        tasks.push(tokio::spawn(async move {
            let mut indexes = Vec::new();
            for (i, d) in drafts.into_iter().enumerate() {
                let key = format!("c{t}-{i}");
                let p = journal
                    .publish_audited(
                        "population",
                        &key,
                        POPULATION,
                        vec![t, i as u8],
                        None,
                        None,
                        Some(d),
                    )
                    .await;
                p.result.unwrap();
                indexes.push(p.audit_index.unwrap());
                let rec = AuditRecord {
                    method: "/civgate.v1.Citizens/GetCitizen".into(),
                    outcome: "OK".into(),
                    ..AuditRecord::default()
                };
                indexes.push(log.append(rec).await.unwrap());
            }
            indexes
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    let size = log.size();
    assert_eq!(all, (start + 6..size).collect::<Vec<u64>>());
    log.assert_every_entry_proves(size).await;
    for i in 0..size {
        assert_eq!(
            record_at(&log, i).await.index,
            i,
            "leaf {i} names its own index"
        );
    }
    drop((journal, log));

    // Reopened: the same log, the same heads.
    let log = open_log().await;
    assert_eq!(log.size(), size);
    let journal = Journal::open(&store, None, Some(log.tail()), &Policy::default())
        .await
        .unwrap();
    assert_eq!(
        *journal.head(POPULATION).unwrap().borrow(),
        receipt.sequence + 101
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_and_their_records_commit_together_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    publishes_and_their_records_commit_together(Store::Sqlite(dir.path().into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_and_their_records_commit_together_on_postgres() {
    crate::store::with_test_postgres(
        "journal_audited",
        publishes_and_their_records_commit_together,
    )
    .await;
}

/// A data directory of an earlier release — the journal in `journal.sqlite` — opens with its
/// events, heads, acknowledgements and rejections in the store file, and keeps counting.
#[tokio::test]
async fn a_journal_in_its_own_file_moves_into_the_store_file() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("journal.sqlite");
    let mut c = SqliteConnection::connect_with(
        &crate::sqlite::options(&old, Duration::from_secs(5)).unwrap(),
    )
    .await
    .unwrap();
    // That release's tables: groups without owners, events without audiences.
    sqlx::raw_sql(
        "CREATE TABLE journal_events (topic TEXT NOT NULL, seq INTEGER NOT NULL, \
           event_id TEXT NOT NULL UNIQUE, producer TEXT NOT NULL, idempotency_key TEXT NOT NULL, \
           payload BLOB NOT NULL, payload_hash BLOB NOT NULL, recorded_at_ms INTEGER NOT NULL, \
           PRIMARY KEY (topic, seq)) WITHOUT ROWID;
         CREATE TABLE journal_rejections (topic TEXT NOT NULL, grp TEXT NOT NULL, seq INTEGER NOT NULL, \
           reason TEXT NOT NULL, at_ms INTEGER NOT NULL, PRIMARY KEY (topic, seq, grp)) WITHOUT ROWID;
         CREATE TABLE journal_heads (topic TEXT PRIMARY KEY, head INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TABLE journal_groups (topic TEXT NOT NULL, grp TEXT NOT NULL, acked INTEGER NOT NULL, \
           PRIMARY KEY (topic, grp)) WITHOUT ROWID;",
    )
    .execute(&mut c)
    .await
    .unwrap();
    for seq in 1..=3i64 {
        sqlx::query(
            "INSERT INTO journal_events (topic, seq, event_id, producer, idempotency_key, \
             payload, payload_hash, recorded_at_ms) VALUES ($1, $2, $3, 'population', $4, $5, $6, 1)",
        )
        .bind(POPULATION)
        .bind(seq)
        .bind(format!("e{seq}"))
        .bind(format!("k{seq}"))
        .bind(vec![seq as u8])
        .bind(Sha256::digest([seq as u8]).to_vec())
        .execute(&mut c)
        .await
        .unwrap();
    }
    sqlx::raw_sql(
        "INSERT INTO journal_heads VALUES ('population', 3);
         INSERT INTO journal_groups VALUES ('population', 'g', 2);
         INSERT INTO journal_rejections VALUES ('population', 'g', 3, 'no such citizen', 1);",
    )
    .execute(&mut c)
    .await
    .unwrap();
    c.close().await.unwrap();

    let mut policy = Policy::default();
    policy.agencies.insert(
        "registry-hp".parse().unwrap(),
        crate::policy::Agency {
            consumer_groups: Arc::from(["g".to_owned()]),
            ..crate::policy::Agency::of_role(crate::domain::Role::CivilRegistry)
        },
    );
    let j = Journal::open(&Store::Sqlite(dir.path().into()), None, None, &policy)
        .await
        .unwrap();
    assert!(!old.exists() && dir.path().join("journal.sqlite.migrated").exists());
    let events = j.read(POPULATION, 1, 3, 10, None).await.unwrap().events;
    assert_eq!(
        events
            .iter()
            .map(|e| e.event_id.as_str())
            .collect::<Vec<_>>(),
        ["e1", "e2", "e3"]
    );
    assert_eq!(
        *j.acked(POPULATION, &Group::new("registry-hp", "g"))
            .await
            .unwrap()
            .borrow(),
        2
    );
    let status = j.status("e3").await.unwrap().unwrap();
    assert_eq!(
        status.groups,
        [(
            Group::new("registry-hp", "g"),
            GroupState::Rejected("no such citizen".into())
        )]
    );
    // A retry of an old key still finds its receipt; a new event continues the sequence.
    let again = j
        .publish("population", "k2", POPULATION, vec![2])
        .await
        .unwrap();
    assert_eq!((again.event_id.as_str(), again.sequence), ("e2", 2));
    let next = j
        .publish("population", "k4", POPULATION, vec![4])
        .await
        .unwrap();
    assert_eq!(next.sequence, 4);
}
