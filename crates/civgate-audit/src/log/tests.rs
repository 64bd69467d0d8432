//! The audit log on both stores: searches against full scans, upgrades of earlier layouts,
//! filters rebuilt after damage.

use crate::subjects::may_contain;
use std::path::Path;

use prost::Message;
use sqlx::{Connection, SqliteConnection};

use super::*;
use crate::store::with_reader;

async fn open(dir: &Path) -> AuditLog {
    open_store(&Store::Sqlite(dir.to_path_buf())).await
}

async fn open_store(store: &Store) -> AuditLog {
    let (healthy, _) = watch::channel(true);
    AuditLog::open(Options {
        store,
        signer: Signer::generate("civgate.test/audit").unwrap(),
        origin: "civgate.test/audit".into(),
        checkpoint_interval: Duration::from_secs(3600),
        commit_timeout: Duration::from_secs(10),
        healthy,
    })
    .await
    .unwrap()
}

/// A connection of its own to the store file at `path`.
async fn store_conn(path: &Path) -> SqliteConnection {
    SqliteConnection::connect_with(&crate::sqlite::options(path, Duration::from_secs(10)).unwrap())
        .await
        .unwrap()
}

/// Waits until the first `blocks` blocks have their subject filter.
async fn filters_built(log: &AuditLog, blocks: u64) {
    let mut built = log.filtered_blocks();
    tokio::time::timeout(Duration::from_secs(30), built.wait_for(|b| *b >= blocks))
        .await
        .expect("complete blocks get their filter")
        .unwrap();
}

/// Waits until the first `groups` groups of blocks have their summary.
async fn groups_built(log: &AuditLog, groups: u64) {
    let mut built = log.grouped();
    tokio::time::timeout(Duration::from_secs(60), built.wait_for(|g| *g >= groups))
        .await
        .expect("complete groups get their summary")
        .unwrap();
}

/// Appends `records` concurrently (group commits of many), in whatever order they arrive.
async fn append_all(log: &AuditLog, records: impl IntoIterator<Item = AuditRecord>) {
    let mut set = tokio::task::JoinSet::new();
    for r in records {
        let log = log.clone();
        set.spawn(async move { log.append(r).await.unwrap() });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

/// Every entry of the log, decoded: the ground truth searches are checked against.
async fn all_records(log: &AuditLog) -> Vec<AuditRecord> {
    let mut out = Vec::new();
    while (out.len() as u64) < log.size() {
        let start = out.len() as u64;
        for leaf in log.entries(start, log.size()).await.unwrap() {
            out.push(AuditRecord::decode(leaf.as_slice()).unwrap());
        }
    }
    out
}

/// Pages through a search by subject (and optionally agency) the way the API does.
async fn search_all(log: &AuditLog, id: &str, agency: Option<&str>, page: u32) -> Vec<u64> {
    let mut found = Vec::new();
    let mut after = 0;
    loop {
        let f = Filter {
            subject: Some(id.into()),
            agency: agency.map(Into::into),
            after,
            limit: page,
            ..Default::default()
        };
        let rows = log.search(&f).await.unwrap();
        found.extend(rows.iter().map(|(i, _)| *i));
        match rows.last() {
            Some((i, _)) if rows.len() == page as usize => after = i + 1,
            _ => return found,
        }
    }
}

/// Subject searches find exactly the entries that name the citizen — across block
/// boundaries, in the open block, with and without the block filters built, with another
/// filter combined and through pages — on both stores.
async fn subject_searches_match_a_full_scan(store: Store) {
    let log = open_store(&store).await;
    let n = 2 * BLOCK + 300;
    // Citizen 031000000000+k for k < 700; every seventh record names two; a few name the
    // rare citizen 099…, one of them in each block and in the open block.
    let rare = "099000000001";
    append_all(
        &log,
        (0..n).map(|i| {
            let mut r = record(i % 700);
            if i % 7 == 0 {
                r.subject_personal_ids
                    .push(format!("031{:09}", (i + 1) % 700));
            }
            if i % 2_000 == 1_999 {
                r.subject_personal_ids.push(rare.into());
            }
            if i % 3 == 0 {
                r.agency_id = "registry-hn".into();
            }
            r
        }),
    )
    .await;
    let truth = all_records(&log).await;
    assert_eq!(truth.len() as u64, n);
    let expect = |id: &str, agency: Option<&str>| -> Vec<u64> {
        truth
            .iter()
            .filter(|r| r.subject_personal_ids.iter().any(|s| s == id))
            .filter(|r| agency.is_none_or(|a| r.agency_id == a))
            .map(|r| r.index)
            .collect()
    };
    let check = |label: &'static str| {
        let log = log.clone();
        let expect = &expect;
        async move {
            for (id, agency, page) in [
                (rare, None, 1),
                (rare, None, 1_000),
                ("031000000005", None, 7),
                ("031000000699", Some("registry-hn"), 5),
                ("031000000700", None, 10), // nobody
            ] {
                assert_eq!(
                    search_all(&log, id, agency, page).await,
                    expect(id, agency),
                    "{label}: {id} {agency:?} page {page}"
                );
            }
        }
    };
    assert_eq!(expect(rare, None).len(), 4);
    // The filters may or may not be there yet: the answers are the same.
    check("while filters are built").await;
    filters_built(&log, 2).await;
    check("with filters").await;
    groups_built(&log, 1).await;
    check("with the first group's summary").await;
    let groups: Vec<(i64, i32)> = with_reader!(&log.reader, |pool| {
        sqlx::query_as("SELECT grp, indexed FROM audit_block_groups ORDER BY grp")
            .fetch_all(pool)
            .await
    })
    .unwrap();
    assert_eq!(groups, [(0, 1)]);
    // A complete block's filter holds each of its subjects and rules out most others.
    let filters: Vec<Vec<u8>> = with_reader!(&log.reader, |pool| {
        sqlx::query_scalar("SELECT filter FROM audit_subject_blocks ORDER BY block")
            .fetch_all(pool)
            .await
    })
    .unwrap();
    assert_eq!(filters.len(), 2);
    for (b, f) in filters.iter().enumerate() {
        let block = &truth[b * BLOCK as usize..(b + 1) * BLOCK as usize];
        assert!(
            block
                .iter()
                .flat_map(|r| &r.subject_personal_ids)
                .all(|s| may_contain(f, s))
        );
        let strangers = (0..1_000)
            .filter(|k| may_contain(f, &format!("088{k:09}")))
            .count();
        assert!(
            strangers < 20,
            "block {b}: {strangers} of 1,000 strangers match"
        );
    }
    log.assert_every_entry_proves(n).await;
}

#[tokio::test]
async fn subject_searches_match_a_full_scan_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    subject_searches_match_a_full_scan(Store::Sqlite(dir.path().to_path_buf())).await;
}

#[tokio::test]
async fn subject_searches_match_a_full_scan_on_postgres() {
    crate::store::with_test_postgres("audit_subjects", subject_searches_match_a_full_scan).await;
}

/// Searches by agency and by time find exactly what a full scan finds — with the block
/// summaries built or not, through pages, combined with each other and with a method.
async fn agency_and_time_searches_match_a_full_scan(store: Store) {
    let log = open_store(&store).await;
    let n = 4 * BLOCK + 200;
    const T0: i64 = 1_700_000_000_000;
    append_all(
        &log,
        (0..n).map(|i| {
            let mut r = record(i % 500);
            // Times grow with the index, except a few stamped far earlier (a slow call).
            r.time_unix_ms = T0 + i as i64 * 10 - if i % 1_000 == 999 { 25_000 } else { 0 };
            if i % 5 == 0 {
                r.agency_id = "registry-hn".into();
            }
            // A rare agency: a few calls in block 1 and in the open block only (so the
            // second group, blocks 2 and 3 in this crate's tests, has none).
            if i % 1_500 == 7 && (i / BLOCK == 1 || i / BLOCK == 4) {
                r.agency_id = "registry-rare".into();
                r.method = "/civgate.v1.Exchange/Publish".into();
            }
            r
        }),
    )
    .await;
    let truth = all_records(&log).await;
    let check = |label: &'static str| {
        let (log, truth) = (log.clone(), &truth);
        async move {
            let t = |k: u64| T0 + k as i64 * 10;
            for (agency, from_ms, to_ms, method, page) in [
                (Some("registry-rare"), None, None, None, 1),
                (Some("registry-rare"), None, None, None, 1_000),
                (Some("nobody"), None, None, None, 10),
                (None, Some(t(BLOCK + 10)), Some(t(BLOCK + 20)), None, 3),
                (
                    None,
                    Some(t(2 * BLOCK - 5)),
                    Some(t(2 * BLOCK + 5)),
                    None,
                    1_000,
                ),
                (None, Some(t(3 * BLOCK + 150)), None, None, 7),
                // Entry 4,999 (block 1) was stamped with the time of entry 2,499.
                (None, Some(t(2_499)), Some(t(2_500)), None, 1),
                (None, None, Some(t(40)), None, 1_000),
                (
                    Some("registry-hn"),
                    Some(t(BLOCK)),
                    Some(t(2 * BLOCK)),
                    None,
                    1_000,
                ),
                (
                    Some("registry-rare"),
                    None,
                    None,
                    Some("/civgate.v1.Exchange/Publish"),
                    2,
                ),
            ] {
                let expect: Vec<u64> = truth
                    .iter()
                    .filter(|r| agency.is_none_or(|a| r.agency_id == a))
                    .filter(|r| from_ms.is_none_or(|f| r.time_unix_ms >= f))
                    .filter(|r| to_ms.is_none_or(|e| r.time_unix_ms < e))
                    .filter(|r| method.is_none_or(|m| r.method == m))
                    .map(|r| r.index)
                    .collect();
                let mut found = Vec::new();
                let mut after = 0;
                loop {
                    let f = Filter {
                        agency: agency.map(Into::into),
                        method: method.map(Into::into),
                        from_ms,
                        to_ms,
                        after,
                        limit: page,
                        ..Default::default()
                    };
                    let rows = log.search(&f).await.unwrap();
                    found.extend(rows.iter().map(|(i, _)| *i));
                    match rows.last() {
                        Some((i, _)) if rows.len() == page as usize => after = i + 1,
                        _ => break,
                    }
                }
                assert_eq!(
                    found, expect,
                    "{label}: {agency:?} [{from_ms:?}, {to_ms:?}) {method:?} page {page}"
                );
            }
        }
    };
    check("while summaries are built").await;
    filters_built(&log, 4).await;
    check("with summaries").await;
    groups_built(&log, 2).await;
    check("with group summaries").await;
    // Each complete group's summary holds its agencies and its time range.
    type GroupRow = (i64, Option<String>, Option<i64>, Option<i64>);
    let groups: Vec<GroupRow> = with_reader!(&log.reader, |pool| {
        sqlx::query_as(
            "SELECT grp, agencies, first_time_ms, last_time_ms FROM audit_block_groups ORDER BY grp",
        )
        .fetch_all(pool)
        .await
    })
    .unwrap();
    assert_eq!(groups.len(), 2);
    let per_group = (BLOCK * crate::groups::GROUP_BLOCKS) as usize;
    for (g, agencies, first, last) in groups {
        let entries = &truth[g as usize * per_group..(g as usize + 1) * per_group];
        let mut names: Vec<&str> = entries.iter().map(|r| r.agency_id.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let stored: Vec<String> = serde_json::from_str(&agencies.unwrap()).unwrap();
        assert_eq!(stored, names, "group {g}");
        assert_eq!(first, entries.iter().map(|r| r.time_unix_ms).min());
        assert_eq!(last, entries.iter().map(|r| r.time_unix_ms).max());
    }
    // Each complete block's summary holds its agencies and its time range.
    type Row = (i64, Option<String>, Option<i64>, Option<i64>);
    let rows: Vec<Row> = with_reader!(&log.reader, |pool| {
        sqlx::query_as(
            "SELECT block, agencies, first_time_ms, last_time_ms \
                 FROM audit_subject_blocks ORDER BY block",
        )
        .fetch_all(pool)
        .await
    })
    .unwrap();
    assert_eq!(rows.len(), 4);
    for (b, agencies, first, last) in rows {
        let block = &truth[b as usize * BLOCK as usize..(b as usize + 1) * BLOCK as usize];
        let mut names: Vec<&str> = block.iter().map(|r| r.agency_id.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let stored: Vec<String> = serde_json::from_str(&agencies.unwrap()).unwrap();
        assert_eq!(stored, names, "block {b}");
        assert_eq!(first, block.iter().map(|r| r.time_unix_ms).min());
        assert_eq!(last, block.iter().map(|r| r.time_unix_ms).max());
    }
}

#[tokio::test]
async fn agency_and_time_searches_match_a_full_scan_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    agency_and_time_searches_match_a_full_scan(Store::Sqlite(dir.path().to_path_buf())).await;
}

#[tokio::test]
async fn agency_and_time_searches_match_a_full_scan_on_postgres() {
    crate::store::with_test_postgres(
        "audit_summaries",
        agency_and_time_searches_match_a_full_scan,
    )
    .await;
}

/// A store of an earlier release — the agency and time indexes, block summaries with a
/// subjects filter only — loses the indexes when it opens, and its summaries are completed
/// from the leaves in the background; searches answer the same throughout.
#[tokio::test]
async fn summaries_of_an_earlier_release_are_completed() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    append_all(
        &log,
        (0..2 * BLOCK + 10).map(|i| {
            let mut r = record(i);
            if i == BLOCK + 3 {
                r.agency_id = "registry-rare".into();
            }
            r
        }),
    )
    .await;
    filters_built(&log, 2).await;
    drop(log);

    let path = crate::sqlite::store_path(dir.path());
    let mut c = store_conn(&path).await;
    sqlx::raw_sql(
        "BEGIN IMMEDIATE;
         CREATE INDEX audit_leaves_agency ON audit_leaves (agency, idx);
         CREATE INDEX audit_leaves_time ON audit_leaves (time_ms);
         CREATE TABLE old_blocks (block INTEGER PRIMARY KEY, filter BLOB NOT NULL);
         INSERT INTO old_blocks SELECT block, filter FROM audit_subject_blocks;
         DROP TABLE audit_subject_blocks;
         ALTER TABLE old_blocks RENAME TO audit_subject_blocks;
         COMMIT;",
    )
    .execute(&mut c)
    .await
    .unwrap();

    let log = open(dir.path()).await;
    let rare = Filter {
        agency: Some("registry-rare".into()),
        limit: 10,
        ..Default::default()
    };
    let found = |rows: Vec<(u64, Vec<u8>)>| rows.into_iter().map(|(i, _)| i).collect::<Vec<_>>();
    assert_eq!(found(log.search(&rare).await.unwrap()), vec![BLOCK + 3]);
    let indexes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE name LIKE 'audit_leaves_%'")
            .fetch_one(&mut c)
            .await
            .unwrap();
    assert_eq!(indexes, 0);
    // Completed in the background: wait until no summary lacks its agencies.
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let missing: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM audit_subject_blocks WHERE agencies IS NULL",
            )
            .fetch_one(&mut c)
            .await
            .unwrap();
            if missing == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the summaries of an earlier release are completed");
    let agencies: Vec<String> =
        sqlx::query_scalar("SELECT agencies FROM audit_subject_blocks ORDER BY block")
            .fetch_all(&mut c)
            .await
            .unwrap();
    assert_eq!(
        agencies,
        [r#"["registry-hp"]"#, r#"["registry-hp","registry-rare"]"#]
    );
    assert_eq!(found(log.search(&rare).await.unwrap()), vec![BLOCK + 3]);
}

/// A block with a leaf that does not decode gets a filter that matches everyone (searches
/// scan it rather than miss an entry); a store of an earlier build loses its subjects index
/// and its filters are built from the leaves when it opens.
#[tokio::test]
async fn filters_are_rebuilt_from_leaves_and_damage_means_scanning() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    append_all(&log, (0..BLOCK * 2).map(record)).await;
    filters_built(&log, 2).await;
    let truth = all_records(&log).await;
    drop(log);

    // What an earlier build left: an index, no filters; and one damaged leaf in block 1.
    let path = crate::sqlite::store_path(dir.path());
    let mut c = store_conn(&path).await;
    sqlx::raw_sql(
        "BEGIN IMMEDIATE;
         DELETE FROM audit_subject_blocks;
         CREATE TABLE audit_subjects (personal_id TEXT NOT NULL, idx INTEGER NOT NULL,
             PRIMARY KEY (personal_id, idx)) WITHOUT ROWID;
         UPDATE audit_leaves SET leaf = x'ffff' WHERE idx = 5000;
         COMMIT;",
    )
    .execute(&mut c)
    .await
    .unwrap();

    let log = open(dir.path()).await;
    filters_built(&log, 2).await;
    let old: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE name = 'audit_subjects'")
            .fetch_one(&mut c)
            .await
            .unwrap();
    assert_eq!(old, 0);
    let filters: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT filter FROM audit_subject_blocks ORDER BY block")
            .fetch_all(&mut c)
            .await
            .unwrap();
    assert_eq!(filters.len(), 2);
    assert!(!may_contain(&filters[0], "088000000001"));
    assert_eq!(filters[1], super::super::subjects::MATCH_ALL);
    // Searches over the rebuilt filters still find each citizen's entries (the damaged
    // entry names nobody).
    for k in [100, 4_999, 5_000, BLOCK + 1] {
        let id = format!("031{k:09}");
        let expect: Vec<u64> = truth
            .iter()
            .filter(|r| r.index != 5_000 && r.subject_personal_ids.contains(&id))
            .map(|r| r.index)
            .collect();
        assert_eq!(search_all(&log, &id, None, 1_000).await, expect, "{id}");
    }
}

/// Group summaries of a store that has none (an earlier release's, or this one's behind) are
/// built from the leaves, the same as from the writers' notes; searches find every entry
/// meanwhile; a damaged or missing postings row makes its group searched block by block.
#[tokio::test]
async fn group_summaries_are_rebuilt_from_leaves_and_damage_means_scanning() {
    use crate::groups::{GROUP_BLOCKS, SHARDS, row_key, shard_key};
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    let group = BLOCK * GROUP_BLOCKS;
    // Citizen k < 900 in most entries; citizen 099… in one entry of each group.
    let rare = "099000000001";
    append_all(
        &log,
        (0..2 * group + 100).map(|i| {
            let mut r = record(i % 900);
            if i % group == 77 {
                r.subject_personal_ids.push(rare.into());
            }
            r
        }),
    )
    .await;
    filters_built(&log, 2 * GROUP_BLOCKS).await;
    groups_built(&log, 2).await;
    let truth = all_records(&log).await;
    let expect = |id: &str| -> Vec<u64> {
        truth
            .iter()
            .filter(|r| r.subject_personal_ids.iter().any(|s| s == id))
            .map(|r| r.index)
            .collect()
    };
    let ids = [rare, "031000000005", "031000000899", "031000000900"];
    for id in ids {
        assert_eq!(search_all(&log, id, None, 100).await, expect(id), "{id}");
    }
    assert_eq!(expect(rare).len(), 3);
    let path = crate::sqlite::store_path(dir.path());
    let mut c = store_conn(&path).await;
    let from_notes: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT key, postings FROM audit_group_postings ORDER BY key")
            .fetch_all(&mut c)
            .await
            .unwrap();
    assert_eq!(from_notes.len() as u64, 2 * SHARDS);
    drop(log);

    // An earlier release's store: no group summaries.
    sqlx::raw_sql("DELETE FROM audit_block_groups; DELETE FROM audit_group_postings;")
        .execute(&mut c)
        .await
        .unwrap();
    let log = open(dir.path()).await;
    for id in ids {
        assert_eq!(
            search_all(&log, id, None, 100).await,
            expect(id),
            "behind: {id}"
        );
    }
    groups_built(&log, 2).await;
    let from_leaves: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT key, postings FROM audit_group_postings ORDER BY key")
            .fetch_all(&mut c)
            .await
            .unwrap();
    assert!(
        from_leaves == from_notes,
        "built from the leaves as from the notes"
    );
    for id in ids {
        assert_eq!(
            search_all(&log, id, None, 100).await,
            expect(id),
            "rebuilt: {id}"
        );
    }

    // The rare citizen's row of group 0 damaged, of group 1 missing: still found.
    let (shard, _) = shard_key(crate::subjects::hashes(rare).0);
    sqlx::query("UPDATE audit_group_postings SET postings = x'02' WHERE key = $1")
        .bind(row_key(0, shard))
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit_group_postings WHERE key = $1")
        .bind(row_key(1, shard))
        .execute(&mut c)
        .await
        .unwrap();
    assert_eq!(search_all(&log, rare, None, 100).await, expect(rare));
    // And the postings do decide: a row that leaves the citizen out hides group 1's entry
    // (which is why a row is never written without every ID of its shard).
    sqlx::query("UPDATE audit_group_postings SET postings = x'01' WHERE key = $1")
        .bind(row_key(0, shard))
        .execute(&mut c)
        .await
        .unwrap();
    let found = search_all(&log, rare, None, 100).await;
    assert_eq!(
        found,
        expect(rare)[1..],
        "group 0 ruled out by its (emptied) row"
    );
}

fn record(n: u64) -> AuditRecord {
    AuditRecord {
        time_unix_ms: now_ms(),
        agency_id: "registry-hp".into(),
        method: "/civgate.v1.Citizens/GetCitizen".into(),
        subject_personal_ids: vec![format!("031{n:09}")],
        outcome: "OK".into(),
        ..Default::default()
    }
}

/// A log written with an old layout of its subtree hashes (`audit_nodes` in the old
/// `audit.sqlite` file, or `audit_tree` keyed by two columns) opens, moves its hashes to
/// `audit_subtrees`, keeps growing, and proves every entry against the root recomputed
/// from its leaves.
async fn a_log_in_an_old_node_layout_is_migrated_and_still_proves(old: &str) {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path()).await;
    for n in 0..37 {
        log.append(record(n)).await.unwrap();
    }
    drop(log);

    // Rewrite the store the way builds before the migration left it.
    let path = crate::sqlite::store_path(dir.path());
    let mut c = store_conn(&path).await;
    let layout = match old {
        "audit_nodes" => {
            "CREATE TABLE audit_nodes (level INTEGER NOT NULL, idx INTEGER NOT NULL,
                 hash BLOB NOT NULL, PRIMARY KEY (level, idx)) WITHOUT ROWID;
             INSERT INTO audit_nodes
                 SELECT node & 63, ((node >> 6) >> (node & 63)) - 1, hash FROM audit_subtrees;"
        }
        _ => {
            "CREATE TABLE audit_tree (leaf_end INTEGER NOT NULL, level INTEGER NOT NULL,
                 hash BLOB NOT NULL, PRIMARY KEY (leaf_end, level)) WITHOUT ROWID;
             INSERT INTO audit_tree SELECT node >> 6, node & 63, hash FROM audit_subtrees;"
        }
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN IMMEDIATE; {layout} DROP TABLE audit_subtrees; COMMIT;"
    )))
    .execute(&mut c)
    .await
    .unwrap();
    c.close().await.unwrap();
    if old == "audit_nodes" {
        // …and in the file builds before the shared store file used.
        crate::sqlite::settle(&path).await.unwrap();
        std::fs::rename(&path, dir.path().join("audit.sqlite")).unwrap();
    }

    let log = open(dir.path()).await;
    assert!(path.exists() && !dir.path().join("audit.sqlite").exists());
    assert_eq!(log.size(), 37);
    for n in 37..42 {
        log.append(record(n)).await.unwrap();
    }
    log.assert_every_entry_proves(42).await;
    let mut c = store_conn(&path).await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE name = $1")
        .bind(old)
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn a_log_with_audit_nodes_is_migrated_and_still_proves() {
    a_log_in_an_old_node_layout_is_migrated_and_still_proves("audit_nodes").await;
}

#[tokio::test]
async fn a_log_with_a_two_column_audit_tree_is_migrated_and_still_proves() {
    a_log_in_an_old_node_layout_is_migrated_and_still_proves("audit_tree").await;
}
