//! The audit log on SQLite: its tables in the store file `civgate.sqlite` (beside the
//! journal), one writer connection, a read-only pool, and the upgrades of earlier layouts.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use sqlx::{Connection, SqliteConnection, sqlite::SqlitePoolOptions};
use tracing::info;

use super::tree::{fetch_nodes, node_key, remove_stale};
use super::writer::{CHECKPOINT_SQL, Dialect, LeafRow, assign, now_ms};
use super::{AuditLog, Options};
use crate::pb::v1::AuditRecord;
use crate::store::Reader;
use crate::{
    merkle::{CompactRange, decompose},
    subjects::FilterWriter,
};

/// The writer's end: the one connection that writes the store file.
pub(super) struct Sqlite {
    pub(super) conn: SqliteConnection,
}

impl Dialect for Sqlite {
    async fn append(&mut self, range: &mut CompactRange, records: Vec<AuditRecord>) -> Result<u64> {
        let mut b = crate::sqlite::Batch::new();
        let first = stage_sqlite(&mut b, range, records)?;
        b.commit(&mut self.conn).await?;
        Ok(first)
    }

    async fn catch_up(&mut self, _: &mut CompactRange) -> Result<()> {
        Ok(())
    }

    async fn store_checkpoint(&mut self, size: u64, note: &str) -> Result<()> {
        sqlx::query(CHECKPOINT_SQL)
            .bind(size as i64)
            .bind(note)
            .bind(now_ms())
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS audit_leaves (
    idx INTEGER PRIMARY KEY,
    leaf BLOB NOT NULL,
    time_ms INTEGER NOT NULL,
    agency TEXT NOT NULL,
    method TEXT NOT NULL,
    outcome TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_subject_blocks (
    block INTEGER PRIMARY KEY,
    filter BLOB NOT NULL,
    agencies TEXT,
    first_time_ms INTEGER,
    last_time_ms INTEGER,
    chunks BLOB
);
CREATE TABLE IF NOT EXISTS audit_block_groups (
    grp INTEGER PRIMARY KEY,
    indexed INTEGER NOT NULL,
    agencies TEXT,
    first_time_ms INTEGER,
    last_time_ms INTEGER
);
CREATE TABLE IF NOT EXISTS audit_group_postings (key INTEGER PRIMARY KEY, postings BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS audit_subtrees (node INTEGER PRIMARY KEY, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    size INTEGER PRIMARY KEY,
    note TEXT NOT NULL,
    time_ms INTEGER NOT NULL
);
";
/// Opens the log in `dir/civgate.sqlite` (see [`AuditLog::open`]).
pub(super) async fn open(dir: &Path, o: Options<'_>) -> Result<AuditLog> {
    crate::sqlite::adopt_legacy_audit(dir).await?;
    crate::sqlite::prepare_dir(dir)?;
    let path = crate::sqlite::store_path(dir);
    let mut conn =
        SqliteConnection::connect_with(&crate::sqlite::options(&path, o.commit_timeout)?)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
    sqlx::raw_sql(SCHEMA).execute(&mut conn).await?;
    migrate_sqlite_nodes(&mut conn).await?;
    drop_subjects_index(&mut conn).await?;
    summarise_blocks(&mut conn).await?;
    let reader = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(crate::sqlite::options(&path, Duration::from_secs(5))?.read_only(true))
        .await?;

    let size: i64 = sqlx::query_scalar("SELECT value FROM audit_meta WHERE key = 'size'")
        .fetch_optional(&mut conn)
        .await?
        .unwrap_or(0);
    let size = u64::try_from(size).context("negative audit size")?;
    // Rows beyond the recorded size belong to no committed log (only a manual edit leaves
    // them); they would collide with the next appends.
    remove_stale!((&mut conn), size).await?;
    let parts = fetch_nodes!((&mut conn), &decompose(0, size)).await?;
    let range =
        CompactRange::from_parts(size, parts).context("audit right edge is inconsistent")?;
    let latest: Option<(i64, String)> =
        sqlx::query_as("SELECT size, note FROM audit_checkpoints ORDER BY size DESC LIMIT 1")
            .fetch_optional(&mut conn)
            .await?;
    let filters = SqliteConnection::connect_with(&crate::sqlite::options(&path, o.commit_timeout)?)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    AuditLog::start(
        Reader::Sqlite(reader),
        Sqlite { conn },
        FilterWriter::Sqlite(filters),
        range,
        latest,
        o,
    )
    .await
}

/// Logs written before 2026-11-26 kept subtree hashes in `audit_nodes`, keyed by `(level,
/// idx)`: each append dirtied the last page of every level. Later ones kept them in
/// `audit_tree`, keyed by `(leaf_end, level)`: adjacent, but in an index B-tree. Both move, in
/// one transaction, to `audit_subtrees` (see [`TreeSql`]).
async fn migrate_sqlite_nodes(conn: &mut SqliteConnection) -> Result<()> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' \
         AND name IN ('audit_nodes', 'audit_tree')",
    )
    .fetch_all(&mut *conn)
    .await?;
    if tables.is_empty() {
        return Ok(());
    }
    let mut b = crate::sqlite::Batch::new();
    for t in &tables {
        let (copy, drop) = match t.as_str() {
            "audit_nodes" => (
                "INSERT INTO audit_subtrees (node, hash) \
                 SELECT (((idx + 1) << level) << 6) | level, hash FROM audit_nodes",
                "DROP TABLE audit_nodes",
            ),
            _ => (
                "INSERT INTO audit_subtrees (node, hash) \
                 SELECT (leaf_end << 6) | level, hash FROM audit_tree",
                "DROP TABLE audit_tree",
            ),
        };
        b.statement(copy).statement(drop);
    }
    b.commit(conn).await?;
    info!(from = ?tables, "audit store: subtree hashes moved to audit_subtrees");
    Ok(())
}

/// Logs of earlier releases kept an index `audit_subjects (personal_id, idx)`, one row
/// per subject of every record. Block filters (`subjects.rs`) replace it; they are built from
/// the leaves in the background, and searches scan the blocks that have none yet.
async fn drop_subjects_index(conn: &mut SqliteConnection) -> Result<()> {
    let old: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'audit_subjects'",
    )
    .fetch_one(&mut *conn)
    .await?;
    if old > 0 {
        sqlx::raw_sql("DROP TABLE audit_subjects")
            .execute(&mut *conn)
            .await?;
        info!("audit store: subjects index dropped; block filters are built from the leaves");
    }
    Ok(())
}

/// SQLite, a store of an earlier release: the indexes `(agency, idx)` and `(time_ms)` give way
/// to the agencies and time range of each block's summary (the summaries of blocks already
/// built are completed in the background, `Indexer::backfill`).
async fn summarise_blocks(conn: &mut SqliteConnection) -> Result<()> {
    let columns: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pragma_table_info('audit_subject_blocks') WHERE name = 'agencies'",
    )
    .fetch_one(&mut *conn)
    .await?;
    if columns == 0 {
        sqlx::raw_sql(
            "ALTER TABLE audit_subject_blocks ADD COLUMN agencies TEXT; \
             ALTER TABLE audit_subject_blocks ADD COLUMN first_time_ms INTEGER; \
             ALTER TABLE audit_subject_blocks ADD COLUMN last_time_ms INTEGER;",
        )
        .execute(&mut *conn)
        .await?;
    }
    // And, from a later release, each block's chunks (completed in the background too).
    let chunks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pragma_table_info('audit_subject_blocks') WHERE name = 'chunks'",
    )
    .fetch_one(&mut *conn)
    .await?;
    if chunks == 0 {
        sqlx::raw_sql("ALTER TABLE audit_subject_blocks ADD COLUMN chunks BLOB")
            .execute(&mut *conn)
            .await?;
    }
    let indexes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master WHERE type = 'index' \
         AND name IN ('audit_leaves_agency', 'audit_leaves_time')",
    )
    .fetch_one(&mut *conn)
    .await?;
    if indexes > 0 {
        sqlx::raw_sql(
            "DROP INDEX IF EXISTS audit_leaves_agency; DROP INDEX IF EXISTS audit_leaves_time;",
        )
        .execute(&mut *conn)
        .await?;
        info!("audit store: agency and time indexes dropped; block summaries replace them");
    }
    Ok(())
}

/// SQLite: gives `records` the next indexes, extends `range`, and adds to `b` their leaves,
/// the subtree hashes they complete and the new size — committed with whatever
/// else `b` holds, in one transaction. Returns the first index.
pub fn stage_sqlite(
    b: &mut crate::sqlite::Batch,
    range: &mut CompactRange,
    records: Vec<AuditRecord>,
) -> Result<u64> {
    let first = range.size();
    let rows = assign(range, records);
    stage_rows(b, &rows, range.size())?;
    Ok(first)
}

fn stage_rows(b: &mut crate::sqlite::Batch, rows: &[LeafRow], new_size: u64) -> Result<()> {
    b.insert_rows(
        "audit_leaves (idx, leaf, time_ms, agency, method, outcome)",
        6,
        rows,
        |b, r| {
            b.bind(r.index as i64)?
                .bind(r.leaf.as_slice())?
                .bind(r.record.time_unix_ms)?
                .bind(r.record.agency_id.as_str())?
                .bind(r.record.method.as_str())?
                .bind(r.record.outcome.as_str())?;
            Ok(())
        },
    )?;
    let nodes: Vec<_> = rows.iter().flat_map(|r| r.nodes.iter()).collect();
    b.insert_rows("audit_subtrees (node, hash)", 2, &nodes, |b, (id, hash)| {
        b.bind(node_key(id))?.bind(hash.as_slice())?;
        Ok(())
    })?;
    b.statement(
        "INSERT INTO audit_meta (key, value) VALUES ('size', ?) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    );
    b.bind(new_size as i64)?;
    Ok(())
}
