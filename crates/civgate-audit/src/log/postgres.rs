//! The audit log on PostgreSQL: one schema shared by every replica. The size row of
//! `audit_meta`, locked in each transaction, orders the replicas' appends into one tree, and
//! NOTIFY tells the other replicas the new size.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use anyhow::{Context, Result};
use sqlx::PgPool;
use tokio::sync::mpsc;

use super::tree::{fetch_nodes, remove_stale};
use super::writer::{CHECKPOINT_SQL, Dialect, LeafRow, assign, now_ms};
use super::{AuditLog, Options, Pending};
use crate::pb::v1::AuditRecord;
use crate::store::{AUDIT_CHANNEL, Reader};
use crate::{
    merkle::{CompactRange, decompose},
    subjects::FilterWriter,
};

/// The writer's end: the shared database's pool (other replicas append too).
pub(super) struct Pg {
    pub(super) pool: PgPool,
}

/// Opens the log in the PostgreSQL store at `url` (see [`AuditLog::open`]).
pub(super) async fn open(url: &str, pool_max: u32, o: Options<'_>) -> Result<AuditLog> {
    let pool = crate::store::pg_pool(url, pool_max, o.commit_timeout).await?;
    crate::store::migrate(&pool).await?;
    // Under the size row's lock: no replica is appending meanwhile.
    let mut tx = pool.begin().await?;
    let size: Option<i64> =
        sqlx::query_scalar("SELECT value FROM audit_meta WHERE key = 'size' FOR UPDATE")
            .fetch_optional(&mut *tx)
            .await?;
    let size = u64::try_from(size.unwrap_or(0)).context("negative audit size")?;
    remove_stale!(tx, size).await?;
    let parts = fetch_nodes!(tx, &decompose(0, size)).await?;
    tx.commit().await?;
    let range =
        CompactRange::from_parts(size, parts).context("audit right edge is inconsistent")?;
    let latest: Option<(i64, String)> =
        sqlx::query_as("SELECT size, note FROM audit_checkpoints ORDER BY size DESC LIMIT 1")
            .fetch_optional(&pool)
            .await?;
    let log = AuditLog::start(
        Reader::Pg(pool.clone()),
        Pg { pool: pool.clone() },
        FilterWriter::Pg(pool.clone()),
        range,
        latest,
        o,
    )
    .await?;
    tokio::spawn(follow(pool, log.tail.size.clone(), log.tx.downgrade()));
    Ok(log)
}

impl Dialect for Pg {
    /// One batch appended at the end of the shared log. The size row, locked until the
    /// commit, gives the log exactly one order across replicas; the right edge is reloaded
    /// when another replica appended meanwhile. Everything is written in one statement.
    async fn append(&mut self, range: &mut CompactRange, records: Vec<AuditRecord>) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let first = append_pg(&mut tx, range, records).await?;
        tx.commit().await?;
        Ok(first)
    }

    async fn catch_up(&mut self, range: &mut CompactRange) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        catch_up(&mut tx, range).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn store_checkpoint(&mut self, size: u64, note: &str) -> Result<()> {
        sqlx::query(CHECKPOINT_SQL)
            .bind(size as i64)
            .bind(note)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Locks the log's size row until the transaction ends (serialising the replicas' writers)
/// and, if other replicas appended since this one last looked, reloads the tree's right edge
/// from the stored subtree hashes. Under READ COMMITTED the locked row read is the latest
/// committed one, also after waiting for another replica's commit.
async fn catch_up(tx: &mut sqlx::PgConnection, range: &mut CompactRange) -> Result<()> {
    let size: Option<i64> =
        sqlx::query_scalar("SELECT value FROM audit_meta WHERE key = 'size' FOR UPDATE")
            .fetch_optional(&mut *tx)
            .await?;
    let size = u64::try_from(size.unwrap_or(0)).context("negative audit size")?;
    if size != range.size() {
        let parts = fetch_nodes!(tx, &decompose(0, size)).await?;
        *range =
            CompactRange::from_parts(size, parts).context("audit right edge is inconsistent")?;
    }
    Ok(())
}

/// PostgreSQL, inside the caller's transaction (which the caller commits): locks the size row,
/// catches up with other replicas, gives `records` the next indexes and inserts them with
/// their subtree hashes, the new size and the NOTIFY. Returns the first index.
pub async fn append_pg(
    tx: &mut sqlx::PgConnection,
    range: &mut CompactRange,
    records: Vec<AuditRecord>,
) -> Result<u64> {
    catch_up(&mut *tx, range).await?;
    let first = range.size();
    let rows = assign(range, records);
    // Statements of at most ~30,000 parameters (PostgreSQL allows 65,535); usually one.
    let mut groups: Vec<&[LeafRow]> = Vec::new();
    let (mut start, mut params) = (0, 0);
    for (i, r) in rows.iter().enumerate() {
        let p = 6 + 3 * r.nodes.len();
        if params + p > 30_000 && i > start {
            groups.push(&rows[start..i]);
            (start, params) = (i, 0);
        }
        params += p;
    }
    groups.push(&rows[start..]);
    let last = groups.len() - 1;
    for (g, group) in groups.into_iter().enumerate() {
        insert_pg(&mut *tx, group, (g == last).then_some(range.size())).await?;
    }
    Ok(first)
}

/// One statement: the leaves of `rows`, their subtree hashes, and — for the last
/// statement of a batch — the new size and the NOTIFY sent at commit.
async fn insert_pg(
    tx: &mut sqlx::PgConnection,
    rows: &[LeafRow],
    new_size: Option<u64>,
) -> Result<()> {
    let nodes: Vec<_> = rows.iter().flat_map(|r| r.nodes.iter()).collect();
    let mut next = 0;
    let mut values = |rows: usize, width: usize| {
        let v = numbered_from(next, rows, width);
        next += rows * width;
        v
    };
    let mut sql = format!(
        "WITH l AS (INSERT INTO audit_leaves (idx, leaf, time_ms, agency, method, outcome) VALUES {})",
        values(rows.len(), 6)
    );
    if !nodes.is_empty() {
        sql.push_str(&format!(
            ", n AS (INSERT INTO audit_tree (leaf_end, level, hash) VALUES {})",
            values(nodes.len(), 3)
        ));
    }
    if new_size.is_some() {
        let (size, channel, payload) = (next + 1, next + 2, next + 3);
        sql.push_str(&format!(
            ", m AS (UPDATE audit_meta SET value = ${size} WHERE key = 'size') \
             SELECT pg_notify(${channel}, current_schema() || ' ' || ${payload})"
        ));
    } else {
        sql.push_str(" SELECT 1");
    }
    // Built only from constants and numbered placeholders.
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for r in rows {
        q = q
            .bind(r.index as i64)
            .bind(r.leaf.as_slice())
            .bind(r.record.time_unix_ms)
            .bind(r.record.agency_id.as_str())
            .bind(r.record.method.as_str())
            .bind(r.record.outcome.as_str());
    }
    for (id, hash) in &nodes {
        q = q
            .bind(id.leaf_end() as i64)
            .bind(i64::from(id.level))
            .bind(hash.as_slice());
    }
    if let Some(size) = new_size {
        q = q
            .bind(size as i64)
            .bind(AUDIT_CHANNEL)
            .bind(size.to_string());
    }
    q.execute(&mut *tx).await?;
    Ok(())
}

/// `n` rows of `width` numbered placeholders after the first `from`: `($1, $2), ($3, $4)`.
fn numbered_from(from: usize, n: usize, width: usize) -> String {
    (0..n)
        .map(|r| {
            let cols: Vec<String> = (1..=width)
                .map(|c| format!("${}", from + r * width + c))
                .collect();
            format!("({})", cols.join(", "))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// PostgreSQL: raises this replica's view of the log size when others commit (LISTEN), and
/// re-reads it every second (notifications are lost while the connection is down).
async fn follow(pool: PgPool, size: Arc<AtomicU64>, alive: mpsc::WeakSender<Pending>) {
    let (p, s) = (pool.clone(), size.clone());
    crate::store::follow(
        pool,
        AUDIT_CHANNEL,
        || alive.upgrade().is_some(),
        |payload| {
            if let Ok(v) = payload.parse::<u64>() {
                size.fetch_max(v, Ordering::AcqRel);
            }
        },
        move || {
            let (pool, size) = (p.clone(), s.clone());
            async move {
                if let Ok(Some(v)) =
                    sqlx::query_scalar::<_, i64>("SELECT value FROM audit_meta WHERE key = 'size'")
                        .fetch_optional(&pool)
                        .await
                {
                    size.fetch_max(v as u64, Ordering::AcqRel);
                }
            }
        },
    )
    .await;
}
