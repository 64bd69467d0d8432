//! The audit log's storage and its single writer. Appends are group-committed: one task
//! drains every pending record into one SQLite transaction (WAL, synchronous FULL), then
//! answers each caller with its index — a caller hears "durable" only after the commit.
//! Perfect-subtree hashes are stored as they complete, so proofs need O(log n) reads.

use std::{
    path::Path,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use prost::Message;
use sqlx::{Connection, PgPool, SqliteConnection, sqlite::SqlitePoolOptions};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use super::{
    merkle::{
        CompactRange, Hash, NodeId, consistency_ranges, decompose, fold_range, inclusion_ranges,
        leaf_hash,
    },
    note::{Checkpoint, Signer},
    subjects::{BLOCK, BlockEntry, FilterWriter, Indexer, Notes, Summary, Wanted, leaf_names},
};
use crate::pb::v1::AuditRecord;
use crate::store::{AUDIT_CHANNEL, Reader, Store, drain, linger, with_reader};

/// How a backend stores the subtree hashes. PostgreSQL: `audit_tree`, keyed by `(leaf_end,
/// level)`. SQLite: `audit_subtrees`, a rowid table keyed by `node = leaf_end << 6 | level`
/// (levels stay below 64; leaf ends below 2^57), so that the hashes each append completes go at
/// the end of the table's B-tree, which SQLite appends to without rebalancing (a key of two
/// columns makes an index B-tree, which rebalanced three leaves in most commits).
struct TreeSql {
    /// Selects `(level, leaf_end, hash)` of `n` nodes bound as `(leaf_end, level)` pairs.
    select: fn(n: usize) -> String,
    /// Deletes the nodes of leaves from `$1` on (a leaf end past the log's size `$1`).
    delete_after: &'static str,
}

/// `n` pairs of numbered placeholders, each written by `pair` from its two numbers.
fn pairs(n: usize, pair: fn(usize, usize) -> String) -> String {
    (0..n)
        .map(|i| pair(2 * i + 1, 2 * i + 2))
        .collect::<Vec<_>>()
        .join(",")
}

const PG_TREE: TreeSql = TreeSql {
    select: |n| {
        format!(
            "SELECT level, leaf_end, hash FROM audit_tree WHERE (leaf_end, level) IN (VALUES {})",
            pairs(n, |a, b| format!("(${a}, ${b})"))
        )
    },
    delete_after: "DELETE FROM audit_tree WHERE leaf_end > $1",
};

const SQLITE_TREE: TreeSql = TreeSql {
    select: |n| {
        format!(
            "SELECT node & 63, node >> 6, hash FROM audit_subtrees WHERE node IN ({})",
            pairs(n, |a, b| format!("((${a} << 6) | ${b})"))
        )
    },
    delete_after: "DELETE FROM audit_subtrees WHERE node >= (($1 + 1) << 6)",
};

/// The subtree SQL of the backend whose connection this is.
fn tree_sql<C: sqlx::Connection>(_: &C) -> &'static TreeSql
where
    C::Database: HasTree,
{
    <C::Database as HasTree>::TREE
}

trait HasTree {
    const TREE: &'static TreeSql;
}

impl HasTree for sqlx::Sqlite {
    const TREE: &'static TreeSql = &SQLITE_TREE;
}

impl HasTree for sqlx::Postgres {
    const TREE: &'static TreeSql = &PG_TREE;
}

/// The SQLite key of a subtree hash (see [`TreeSql`]).
fn node_key(id: &NodeId) -> i64 {
    ((id.leaf_end() << 6) | u64::from(id.level)) as i64
}

/// Hashes of the given nodes, in the given order; a missing node is an error. `$conn` is a
/// SQLite or PostgreSQL connection (a pool connection or a transaction).
macro_rules! fetch_nodes {
    ($conn:expr, $ids:expr) => {
        async {
            let ids: &[NodeId] = $ids;
            let mut out: Vec<Hash> = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(400) {
                let sql = (tree_sql(&*$conn).select)(chunk.len());
                // Built only from constants and numbered placeholders.
                let mut q = sqlx::query_as::<_, (i64, i64, Vec<u8>)>(sqlx::AssertSqlSafe(sql));
                for id in chunk {
                    q = q.bind(id.leaf_end() as i64).bind(i64::from(id.level));
                }
                let rows = q.fetch_all(&mut *$conn).await?;
                let mut found = std::collections::HashMap::with_capacity(rows.len());
                for (level, leaf_end, hash) in rows {
                    let hash: Hash = hash.try_into().map_err(|_| {
                        anyhow::anyhow!("node (level {level}, leaf end {leaf_end}) is not 32 bytes")
                    })?;
                    found.insert((level as u32, leaf_end as u64), hash);
                }
                for id in chunk {
                    match found.get(&(id.level, id.leaf_end())) {
                        Some(h) => out.push(*h),
                        None => bail!(
                            "tree node (level {}, index {}) is missing",
                            id.level,
                            id.index
                        ),
                    }
                }
            }
            Ok::<_, anyhow::Error>(out)
        }
    };
}

/// Rows beyond the recorded size belong to no committed log (only a manual edit leaves them:
/// every append commits rows and size together); they would collide with the next appends.
/// `$conn` is a SQLite or PostgreSQL connection.
macro_rules! remove_stale {
    ($conn:expr, $size:expr) => {
        async {
            let size: u64 = $size;
            let stale = sqlx::query(tree_sql(&*$conn).delete_after)
                .bind(size as i64)
                .execute(&mut *$conn)
                .await?
                .rows_affected()
                + sqlx::query("DELETE FROM audit_leaves WHERE idx >= $1")
                    .bind(size as i64)
                    .execute(&mut *$conn)
                    .await?
                    .rows_affected();
            // A block's filter stands only for a complete block.
            sqlx::query("DELETE FROM audit_subject_blocks WHERE (block + 1) * $1 > $2")
                .bind(BLOCK as i64)
                .bind(size as i64)
                .execute(&mut *$conn)
                .await?;
            if stale > 0 {
                warn!(
                    size,
                    stale, "audit store held rows beyond its recorded size; removed them"
                );
            }
            Ok::<_, anyhow::Error>(())
        }
    };
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
    last_time_ms INTEGER
);
CREATE TABLE IF NOT EXISTS audit_subtrees (node INTEGER PRIMARY KEY, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    size INTEGER PRIMARY KEY,
    note TEXT NOT NULL,
    time_ms INTEGER NOT NULL
);
";

/// Largest `GetEntries` page.
pub const MAX_ENTRIES: u64 = 1_000;
/// Largest group-commit batch.
const MAX_BATCH: usize = 2_048;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log cannot commit: {0}")]
    NotDurable(String),
    #[error("{0}")]
    BadRange(String),
    #[error("audit log is damaged: {0}")]
    Damaged(String),
    #[error("audit store read failed: {0}")]
    Read(String),
}

impl From<AuditError> for tonic::Status {
    /// A store's own words are logged, never sent: the caller learns what happened, not how
    /// the store is laid out.
    fn from(e: AuditError) -> Self {
        let status = match &e {
            AuditError::BadRange(_) => return tonic::Status::invalid_argument(e.to_string()),
            AuditError::NotDurable(_) => {
                tonic::Status::unavailable("the audit log cannot commit now; retry")
            }
            AuditError::Read(_) => {
                tonic::Status::unavailable("the audit log cannot be read now; retry")
            }
            // Our own words (which entry is missing or altered): what an auditor must hear.
            AuditError::Damaged(_) => tonic::Status::data_loss(e.to_string()),
        };
        tracing::error!(error = %e, "audit log error answered {:?}", status.code());
        status
    }
}

struct Pending {
    record: AuditRecord,
    /// `None`: nobody waits (a refusal); it rides along with the next commit.
    done: Option<oneshot::Sender<Result<u64, AuditError>>>,
}

/// Records nobody waits for are committed with the next waited-for batch, or at the latest
/// after this long.
const DEFERRED_FLUSH: Duration = Duration::from_millis(50);

/// What `SearchEntries` filters on.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub subject: Option<String>,
    pub agency: Option<String>,
    pub method: Option<String>,
    pub outcome: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Entries with index ≥ this.
    pub after: u64,
    pub limit: u32,
}

/// A handle to the audit log (cheap to clone).
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Pending>,
    reader: Reader,
    tail: AuditTail,
    latest: Arc<RwLock<String>>,
    /// Blocks `[0, n)` have their subject filter.
    filtered: watch::Receiver<u64>,
}

/// The tree's right edge and the log's committed size, shared by the two writers that append
/// to the log: the audit log's own, and the journal's, which commits a publish's record in the
/// same transaction as its event. Whoever appends holds the lock from assigning indexes until
/// its commit has ended, so the log has one order. On SQLite, where both write the one store
/// file, each holds it for every write it makes, so their transactions never wait for each
/// other inside SQLite (whose busy handler sleeps). Take it before any database lock.
#[derive(Clone)]
pub struct AuditTail {
    range: Arc<tokio::sync::Mutex<CompactRange>>,
    /// Entries durably committed.
    size: Arc<AtomicU64>,
    /// Turns false while commits fail, true again when they succeed.
    healthy: watch::Sender<bool>,
    /// Woken when a commit completes a block of the log (its summary can be built).
    blocks: Arc<tokio::sync::Notify>,
    /// What this process committed into the open block, for its summary.
    notes: Arc<std::sync::Mutex<Notes>>,
    /// How long a caller waits for a commit before the store counts as stalled.
    commit_timeout: Duration,
}

impl AuditTail {
    /// Entries durably committed (as far as this process knows).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The right to append (and, on SQLite, to write the store file) until the guard drops.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, CompactRange> {
        self.range.lock().await
    }

    /// [`lock`](Self::lock) for a writer that may run without an audit log (nothing to take).
    pub async fn lock_if(
        tail: Option<&AuditTail>,
    ) -> Option<tokio::sync::MutexGuard<'_, CompactRange>> {
        match tail {
            Some(t) => Some(t.lock().await),
            None => None,
        }
    }

    /// After a commit that extended the log to `range`: the new size is visible, the log
    /// healthy.
    pub fn committed(&self, range: &CompactRange) {
        let before = self.size.fetch_max(range.size(), Ordering::AcqRel);
        if before / BLOCK != range.size() / BLOCK {
            self.blocks.notify_one();
        }
        metrics::gauge!(crate::telemetry::AUDIT_LOG_SIZE).set(range.size() as f64);
        metrics::gauge!(crate::telemetry::STORE_STALLED).set(0.0);
        self.healthy
            .send_if_modified(|h| !std::mem::replace(h, true));
    }

    /// After a commit of entries from `first` on, in order: notes them for the open block's
    /// summary. Call before [`committed`](Self::committed), under the lock.
    pub fn note(&self, first: u64, entries: &[BlockEntry]) {
        self.notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .note(first, entries);
    }

    /// The summary of `block`, if this process noted all of its entries.
    pub(super) fn noted_summary(&self, block: u64) -> Option<Summary> {
        self.notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(block)
    }

    fn failed(&self) {
        self.healthy
            .send_if_modified(|h| std::mem::replace(h, false));
    }

    /// Waits for a commit's answer at most the commit timeout, on either store (SQLite's own
    /// timeout covers only waiting for its lock, not a disk that stops answering). Past it the
    /// caller is answered UNAVAILABLE and the gateway reports NOT_SERVING until a commit
    /// completes again. The commit itself may still complete later: the call's record then
    /// says it was served although its caller was told to retry (never the reverse).
    pub async fn bounded<T>(&self, answer: impl Future<Output = T>) -> Result<T, AuditError> {
        match tokio::time::timeout(self.commit_timeout, answer).await {
            Ok(v) => Ok(v),
            Err(_) => {
                if *self.healthy.borrow() {
                    error!(
                        timeout_ms = self.commit_timeout.as_millis() as u64,
                        "the store did not complete a commit in time: stalled; calls answer UNAVAILABLE and health is NOT_SERVING until it does"
                    );
                }
                metrics::gauge!(crate::telemetry::STORE_STALLED).set(1.0);
                self.failed();
                Err(AuditError::NotDurable(format!(
                    "the store did not complete a commit within {} ms",
                    self.commit_timeout.as_millis()
                )))
            }
        }
    }
}

pub struct Options<'a> {
    pub store: &'a Store,
    pub signer: Signer,
    pub origin: String,
    pub checkpoint_interval: Duration,
    pub commit_timeout: Duration,
    /// Turns false while commits fail, true again when they succeed.
    pub healthy: watch::Sender<bool>,
}

impl AuditLog {
    /// Opens the store (`civgate.sqlite` in a directory, or the shared PostgreSQL database),
    /// checks the stored tree's right edge, and starts the writer.
    pub async fn open(o: Options<'_>) -> Result<Self> {
        match o.store {
            Store::Sqlite(dir) => Self::open_sqlite(dir, o).await,
            Store::Postgres { url, pool_max } => {
                let pool = crate::store::pg_pool(url, *pool_max, o.commit_timeout).await?;
                crate::store::migrate(&pool).await?;
                // Under the size row's lock: no replica is appending meanwhile.
                let mut tx = pool.begin().await?;
                let size: Option<i64> = sqlx::query_scalar(
                    "SELECT value FROM audit_meta WHERE key = 'size' FOR UPDATE",
                )
                .fetch_optional(&mut *tx)
                .await?;
                let size = u64::try_from(size.unwrap_or(0)).context("negative audit size")?;
                remove_stale!(tx, size).await?;
                let parts = fetch_nodes!(tx, &decompose(0, size)).await?;
                tx.commit().await?;
                let range = CompactRange::from_parts(size, parts)
                    .context("audit right edge is inconsistent")?;
                let latest: Option<(i64, String)> = sqlx::query_as(
                    "SELECT size, note FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
                )
                .fetch_optional(&pool)
                .await?;
                let log = Self::start(
                    Reader::Pg(pool.clone()),
                    WriterConn::Pg(pool.clone()),
                    FilterWriter::Pg(pool.clone()),
                    range,
                    latest,
                    o,
                )
                .await?;
                tokio::spawn(follow(pool, log.tail.size.clone(), log.tx.downgrade()));
                Ok(log)
            }
        }
    }

    async fn open_sqlite(dir: &Path, o: Options<'_>) -> Result<Self> {
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
        let filters =
            SqliteConnection::connect_with(&crate::sqlite::options(&path, o.commit_timeout)?)
                .await
                .with_context(|| format!("opening {}", path.display()))?;
        Self::start(
            Reader::Sqlite(reader),
            WriterConn::Sqlite(conn),
            FilterWriter::Sqlite(filters),
            range,
            latest,
            o,
        )
        .await
    }

    async fn start(
        reader: Reader,
        conn: WriterConn,
        filters: FilterWriter,
        range: CompactRange,
        latest: Option<(i64, String)>,
        o: Options<'_>,
    ) -> Result<Self> {
        let size = range.size();
        let log = Self {
            tx: mpsc::channel(16_384).0,
            reader,
            tail: AuditTail {
                range: Arc::new(tokio::sync::Mutex::new(range)),
                size: Arc::new(AtomicU64::new(size)),
                healthy: o.healthy,
                blocks: Arc::new(tokio::sync::Notify::new()),
                notes: Arc::new(std::sync::Mutex::new(Notes::at(size))),
                commit_timeout: o.commit_timeout,
            },
            latest: Arc::new(RwLock::new(
                latest.as_ref().map(|(_, n)| n.clone()).unwrap_or_default(),
            )),
            filtered: watch::channel(0).1,
        };
        let (tx, rx) = mpsc::channel(16_384);
        let mut writer = Writer {
            conn,
            tail: log.tail.clone(),
            signer: o.signer,
            origin: o.origin,
            checkpointed: latest.map_or(-1, |(s, _)| s),
            latest: log.latest.clone(),
        };
        // Every start begins with a checkpoint of what is there.
        writer.checkpoint().await?;
        info!(size, "audit log open");
        tokio::spawn(writer.run(rx, o.checkpoint_interval));
        let (built, filtered) = watch::channel(0);
        let indexer = Indexer {
            reader: log.reader.clone(),
            writer: filters,
            tail: log.tail.clone(),
            built,
        };
        tokio::spawn(indexer.run(log.tail.blocks.clone(), tx.downgrade()));
        Ok(Self {
            tx,
            filtered,
            ..log
        })
    }

    /// Appends one record; returns its index once it is durable.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let (done, wait) = oneshot::channel();
        self.tail
            .bounded(async {
                self.tx
                    .send(Pending {
                        record,
                        done: Some(done),
                    })
                    .await
                    .map_err(|_| AuditError::NotDurable("audit writer stopped".into()))?;
                wait.await
                    .map_err(|_| AuditError::NotDurable("audit writer stopped".into()))?
            })
            .await?
    }

    /// Appends the record of a refused call (no data left, nothing to fail closed on) without
    /// waiting: it is committed with the next batch someone waits for, or within 50 ms. A
    /// caller flooding refusals therefore cannot make the log commit on its behalf.
    pub async fn append_deferred(&self, record: AuditRecord) -> Result<(), AuditError> {
        self.tail
            .bounded(self.tx.send(Pending { record, done: None }))
            .await?
            .map_err(|_| AuditError::NotDurable("audit writer stopped".into()))
    }

    pub fn size(&self) -> u64 {
        self.tail.size.load(Ordering::Acquire)
    }

    /// The right edge, for the journal's writer (see [`AuditTail`]).
    pub fn tail(&self) -> AuditTail {
        self.tail.clone()
    }

    /// How many blocks, from the first, have their subject filter (it follows the log in the
    /// background; searches do not need it).
    pub fn filtered_blocks(&self) -> watch::Receiver<u64> {
        self.filtered.clone()
    }

    /// The latest signed checkpoint (a C2SP signed note).
    pub fn latest_checkpoint(&self) -> String {
        self.latest.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Test check: every entry of the first `size` proves its inclusion against the root
    /// recomputed from the leaves themselves.
    #[cfg(test)]
    pub(crate) async fn assert_every_entry_proves(&self, size: u64) {
        use super::merkle::{root_of, verify_inclusion};
        let mut leaves: Vec<Hash> = Vec::new();
        while (leaves.len() as u64) < size {
            let page = self
                .entries(leaves.len() as u64, size)
                .await
                .expect("entries");
            leaves.extend(page.iter().map(|l| leaf_hash(l)));
        }
        let root = root_of(&leaves);
        for (i, leaf) in leaves.iter().enumerate() {
            let proof = self.inclusion_proof(i as u64, size).await.expect("proof");
            verify_inclusion(i as u64, size, leaf, &proof, &root).expect("entry proves");
        }
    }

    /// Leaf bytes for `[start, end)` (at most [`MAX_ENTRIES`]).
    pub async fn entries(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>, AuditError> {
        let size = self.size();
        if start >= end || end > size {
            return Err(AuditError::BadRange(format!(
                "need start < end <= {size} (the log's size), got [{start}, {end})"
            )));
        }
        let end = end.min(start + MAX_ENTRIES);
        let rows: Vec<(i64, Vec<u8>)> = with_reader!(&self.reader, |pool| {
            sqlx::query_as(
                "SELECT idx, leaf FROM audit_leaves WHERE idx >= $1 AND idx < $2 ORDER BY idx",
            )
            .bind(start as i64)
            .bind(end as i64)
            .fetch_all(pool)
            .await
        })
        .map_err(|e| AuditError::Read(e.to_string()))?;
        let mut out = Vec::with_capacity(rows.len());
        for (expected, (idx, leaf)) in (start..end).zip(rows) {
            if idx as u64 != expected {
                return Err(AuditError::Damaged(format!("entry {expected} is missing")));
            }
            out.push(leaf);
        }
        if (out.len() as u64) < end - start {
            return Err(AuditError::Damaged(format!(
                "entry {} is missing",
                start + out.len() as u64
            )));
        }
        Ok(out)
    }

    async fn hashes_of(&self, ranges: &[(u64, u64)]) -> Result<Vec<Hash>, AuditError> {
        let ids: Vec<Vec<NodeId>> = ranges.iter().map(|(s, e)| decompose(*s, *e)).collect();
        let flat: Vec<NodeId> = ids.iter().flatten().copied().collect();
        let hashes = with_reader!(&self.reader, |pool| {
            let mut conn = pool
                .acquire()
                .await
                .map_err(|e| AuditError::Read(e.to_string()))?;
            fetch_nodes!(conn, &flat)
                .await
                .map_err(|e| AuditError::Damaged(e.to_string()))?
        });
        let mut it = hashes.into_iter();
        Ok(ids
            .iter()
            .map(|parts| {
                let hs: Vec<Hash> = it.by_ref().take(parts.len()).collect();
                fold_range(&hs).unwrap_or_default()
            })
            .collect())
    }

    /// RFC 9162 inclusion proof of `index` in the tree of `tree_size`.
    pub async fn inclusion_proof(
        &self,
        index: u64,
        tree_size: u64,
    ) -> Result<Vec<Hash>, AuditError> {
        let size = self.size();
        if index >= tree_size || tree_size > size {
            return Err(AuditError::BadRange(format!(
                "need index < tree_size <= {size}, got index {index}, tree_size {tree_size}"
            )));
        }
        self.hashes_of(&inclusion_ranges(index, tree_size)).await
    }

    /// RFC 9162 consistency proof between tree sizes `first` and `second`.
    pub async fn consistency_proof(
        &self,
        first: u64,
        second: u64,
    ) -> Result<Vec<Hash>, AuditError> {
        let size = self.size();
        if first == 0 || first > second || second > size {
            return Err(AuditError::BadRange(format!(
                "need 0 < first <= second <= {size}, got {first}, {second}"
            )));
        }
        self.hashes_of(&consistency_ranges(first, second)).await
    }

    /// Entries matching `f`, in index order; `(index, leaf)`.
    pub async fn search(&self, f: &Filter) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        let size = self.size();
        let limit = f.limit.clamp(1, 1_000) as usize;
        let wanted = Wanted {
            subject: f.subject.as_deref(),
            agency: f.agency.as_deref(),
            from_ms: f.from_ms,
            to_ms: f.to_ms,
        };
        if wanted.selective() {
            self.search_blocks(f, &wanted, size, limit).await
        } else {
            self.scan(f, f.after, size, limit, None).await
        }
    }

    /// Entries in `[from, to)` matching `f` (all but its subject), in index order, at most
    /// `limit`; with `needle`, only leaves whose bytes contain it (the store compares the
    /// bytes, so the leaves of a scanned block that cannot match never leave it).
    async fn scan(
        &self,
        f: &Filter,
        from: u64,
        to: u64,
        limit: usize,
        needle: Option<&str>,
    ) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        let mut n = 2;
        let mut sql =
            String::from("SELECT idx, leaf FROM audit_leaves WHERE idx >= $1 AND idx < $2");
        if needle.is_some() {
            n += 1;
            sql.push_str(&match self.reader {
                Reader::Sqlite(_) => format!(" AND instr(leaf, ${n}) > 0"),
                Reader::Pg(_) => format!(" AND position(${n} IN leaf) > 0"),
            });
        }
        for (cond, on) in [
            (" AND agency = $", f.agency.is_some()),
            (" AND method = $", f.method.is_some()),
            (" AND outcome = $", f.outcome.is_some()),
            (" AND time_ms >= $", f.from_ms.is_some()),
            (" AND time_ms < $", f.to_ms.is_some()),
        ] {
            if on {
                n += 1;
                sql.push_str(&format!("{cond}{n}"));
            }
        }
        sql.push_str(&format!(" ORDER BY idx LIMIT ${}", n + 1));
        let rows: Vec<(i64, Vec<u8>)> = with_reader!(&self.reader, |pool| {
            // Built only from constants and numbered placeholders.
            let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql));
            q = q.bind(from as i64).bind(to as i64);
            if let Some(needle) = needle {
                q = q.bind(needle.as_bytes());
            }
            for v in [&f.agency, &f.method, &f.outcome].into_iter().flatten() {
                q = q.bind(v);
            }
            for v in [f.from_ms, f.to_ms].into_iter().flatten() {
                q = q.bind(v);
            }
            q.bind(limit as i64).fetch_all(pool).await
        })
        .map_err(|e| AuditError::Read(e.to_string()))?;
        Ok(rows.into_iter().map(|(i, l)| (i as u64, l)).collect())
    }

    /// Entries matching `f`, from `f.after`: blocks whose summary rules out what `w` wants are
    /// skipped; the others, and blocks without a summary yet, are scanned.
    async fn search_blocks(
        &self,
        f: &Filter,
        w: &Wanted<'_>,
        size: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        // Summaries read per query: ~6 KiB each with a full block's subject filter, which is
        // read only when searching by subject.
        let window: u64 = if w.subject.is_some() { 256 } else { 4_096 };
        let mut out = Vec::new();
        let mut block = f.after / BLOCK;
        let blocks = size.div_ceil(BLOCK);
        while block < blocks {
            let end = (block + window).min(blocks);
            let summaries = self.summaries(block, end, w.subject.is_some()).await?;
            for b in block..end {
                if summaries.get(&b).is_some_and(|s| !s.may_match(w)) {
                    continue;
                }
                let (from, to) = ((b * BLOCK).max(f.after), ((b + 1) * BLOCK).min(size));
                if from >= to {
                    continue;
                }
                let Some(id) = w.subject else {
                    out.extend(self.scan(f, from, to, limit - out.len(), None).await?);
                    if out.len() == limit {
                        return Ok(out);
                    }
                    continue;
                };
                for (i, leaf) in self.scan(f, from, to, BLOCK as usize, Some(id)).await? {
                    if leaf_names(&leaf, id) {
                        out.push((i, leaf));
                        if out.len() == limit {
                            return Ok(out);
                        }
                    }
                }
            }
            block = end;
        }
        Ok(out)
    }

    /// The stored summaries of blocks `[from, to)`, with their subject filters if `filters`
    /// (else an empty filter, which a search that names no subject never looks at).
    async fn summaries(
        &self,
        from: u64,
        to: u64,
        filters: bool,
    ) -> Result<std::collections::HashMap<u64, Summary>, AuditError> {
        type Row = (
            i64,
            Option<Vec<u8>>,
            Option<String>,
            Option<i64>,
            Option<i64>,
        );
        let sql = if filters {
            "SELECT block, filter, agencies, first_time_ms, last_time_ms \
             FROM audit_subject_blocks WHERE block >= $1 AND block < $2"
        } else {
            "SELECT block, NULL, agencies, first_time_ms, last_time_ms \
             FROM audit_subject_blocks WHERE block >= $1 AND block < $2"
        };
        let rows: Vec<Row> = with_reader!(&self.reader, |pool| {
            sqlx::query_as(sql)
                .bind(from as i64)
                .bind(to as i64)
                .fetch_all(pool)
                .await
        })
        .map_err(|e| AuditError::Read(e.to_string()))?;
        Ok(rows
            .into_iter()
            .map(|(b, filter, agencies, first, last)| {
                (
                    b as u64,
                    Summary::from_columns(
                        filter.unwrap_or_default(),
                        agencies.as_deref(),
                        first,
                        last,
                    ),
                )
            })
            .collect())
    }
}

/// The writer's connection: the only SQLite connection that writes the file, or a pool of the
/// shared PostgreSQL database (replicas append too; an advisory lock orders them).
enum WriterConn {
    Sqlite(SqliteConnection),
    Pg(PgPool),
}

struct Writer {
    conn: WriterConn,
    tail: AuditTail,
    signer: Signer,
    origin: String,
    checkpointed: i64,
    latest: Arc<RwLock<String>>,
}

struct LeafRow {
    index: u64,
    leaf: Vec<u8>,
    record: AuditRecord,
    nodes: Vec<(NodeId, Hash)>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Pending>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(DEFERRED_FLUSH);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Records received and not yet committed, in arrival order. Committed as soon as one
        // has a waiting caller (or the batch is full), else at the next flush tick.
        let mut pending: Vec<Pending> = Vec::new();
        let mut last_batch = 0;
        loop {
            tokio::select! {
                first = rx.recv() => {
                    let Some(first) = first else { break };
                    pending.push(first);
                    drain(&mut rx, &mut pending, MAX_BATCH);
                    let waited_for = pending.iter().any(|p| p.done.is_some());
                    if waited_for && pending.len() < MAX_BATCH && let Some(wait) = linger(last_batch) {
                        // Under load: gather the calls about to arrive too (group commit).
                        tokio::time::sleep(wait).await;
                        drain(&mut rx, &mut pending, MAX_BATCH);
                    }
                    if pending.len() >= MAX_BATCH || waited_for {
                        last_batch = pending.len();
                        self.commit(std::mem::take(&mut pending)).await;
                    }
                }
                _ = flush.tick() => {
                    if !pending.is_empty() {
                        self.commit(std::mem::take(&mut pending)).await;
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = self.checkpoint().await {
                        warn!(error = %e, "could not store a checkpoint");
                    }
                }
            }
        }
        if !pending.is_empty() {
            self.commit(pending).await;
        }
        let _ = self.checkpoint().await;
    }

    async fn commit(&mut self, batch: Vec<Pending>) {
        let tail = self.tail.clone();
        let mut range = tail.lock().await;
        let before = range.clone();
        let (records, waiters): (Vec<AuditRecord>, Vec<_>) =
            batch.into_iter().map(|p| (p.record, p.done)).unzip();
        let entries: Vec<BlockEntry> = records.iter().map(BlockEntry::of).collect();
        let n = records.len();
        let started = std::time::Instant::now();
        let result = match &mut self.conn {
            WriterConn::Sqlite(conn) => {
                let mut b = crate::sqlite::Batch::new();
                match stage_sqlite(&mut b, &mut range, records) {
                    Ok(first) => b.commit(conn).await.map(|()| first).map_err(Into::into),
                    Err(e) => Err(e),
                }
            }
            WriterConn::Pg(pool) => {
                let pool = pool.clone();
                write_pg(&pool, &mut range, records).await
            }
        };
        crate::telemetry::store_commit("audit", n, started.elapsed());
        match result {
            Ok(first) => {
                tail.note(first, &entries);
                tail.committed(&range);
                drop(range);
                for (i, done) in waiters.into_iter().enumerate() {
                    if let Some(done) = done {
                        let _ = done.send(Ok(first + i as u64));
                    }
                }
            }
            Err(e) => {
                *range = before;
                drop(range);
                error!(error = %e, entries = n, "audit commit failed; calls answer UNAVAILABLE");
                tail.failed();
                for done in waiters.into_iter().flatten() {
                    let _ = done.send(Err(AuditError::NotDurable(e.to_string())));
                }
            }
        }
    }

    /// Signs and stores a checkpoint if the log grew since the last one. With PostgreSQL the
    /// tree is first brought up to what other replicas committed, so every replica's
    /// checkpoints are recent — and all of them describe the one tree.
    async fn checkpoint(&mut self) -> Result<()> {
        let tail = self.tail.clone();
        // Held until the checkpoint is stored: on SQLite this writes the shared store file.
        let mut range = tail.lock().await;
        if let WriterConn::Pg(pool) = &self.conn {
            let pool = pool.clone();
            let mut tx = pool.begin().await?;
            catch_up(&mut tx, &mut range).await?;
            tx.commit().await?;
            tail.size.fetch_max(range.size(), Ordering::AcqRel);
        }
        let size = range.size();
        if size as i64 == self.checkpointed {
            return Ok(());
        }
        let cp = Checkpoint {
            origin: self.origin.clone(),
            size,
            root: range.root(),
        };
        let note = self.signer.sign(&cp.to_text())?;
        let sql = "INSERT INTO audit_checkpoints (size, note, time_ms) VALUES ($1, $2, $3) \
                   ON CONFLICT (size) DO UPDATE SET note = excluded.note, time_ms = excluded.time_ms";
        match &mut self.conn {
            WriterConn::Sqlite(conn) => {
                sqlx::query(sql)
                    .bind(size as i64)
                    .bind(&note)
                    .bind(now_ms())
                    .execute(conn)
                    .await?;
            }
            WriterConn::Pg(pool) => {
                sqlx::query(sql)
                    .bind(size as i64)
                    .bind(&note)
                    .bind(now_ms())
                    .execute(&*pool)
                    .await?;
            }
        }
        self.checkpointed = size as i64;
        if let Ok(mut l) = self.latest.write() {
            *l = note;
        }
        Ok(())
    }
}

/// Gives each record the next index, encodes it, and extends the tree; the rows to store.
fn assign(range: &mut CompactRange, records: Vec<AuditRecord>) -> Vec<LeafRow> {
    records
        .into_iter()
        .map(|mut record| {
            let index = range.size();
            record.index = index;
            let leaf = record.encode_to_vec();
            let nodes = range.push(leaf_hash(&leaf));
            LeafRow {
                index,
                leaf,
                record,
                nodes,
            }
        })
        .collect()
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

/// PostgreSQL: one batch appended at the end of the shared log. The size row, locked until the
/// commit, gives the log exactly one order across replicas; the right edge is reloaded when
/// another replica appended meanwhile. Everything is written in one statement. Returns the
/// first index of the batch.
async fn write_pg(
    pool: &PgPool,
    range: &mut CompactRange,
    records: Vec<AuditRecord>,
) -> Result<u64> {
    let mut tx = pool.begin().await?;
    let first = append_pg(&mut tx, range, records).await?;
    tx.commit().await?;
    Ok(first)
}

/// PostgreSQL, inside the caller's transaction (which the caller commits): locks the size row,
/// catches up with other replicas, gives `records` the next indexes and inserts them with
/// their subtree hashes, the new size and the NOTIFY. Returns the first index.
pub(crate) async fn append_pg(
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

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
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
pub(crate) fn stage_sqlite(
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

#[cfg(test)]
mod tests {
    use super::super::subjects::may_contain;
    use super::*;

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
        SqliteConnection::connect_with(
            &crate::sqlite::options(path, Duration::from_secs(10)).unwrap(),
        )
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
        crate::store::with_test_postgres("audit_subjects", subject_searches_match_a_full_scan)
            .await;
    }

    /// Searches by agency and by time find exactly what a full scan finds — with the block
    /// summaries built or not, through pages, combined with each other and with a method.
    async fn agency_and_time_searches_match_a_full_scan(store: Store) {
        let log = open_store(&store).await;
        let n = 3 * BLOCK + 200;
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
                // A rare agency: a few calls in block 1 and in the open block only.
                if i % 1_500 == 7 && (i / BLOCK == 1 || i / BLOCK == 3) {
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
        filters_built(&log, 3).await;
        check("with summaries").await;
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
        assert_eq!(rows.len(), 3);
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
        let found =
            |rows: Vec<(u64, Vec<u8>)>| rows.into_iter().map(|(i, _)| i).collect::<Vec<_>>();
        assert_eq!(found(log.search(&rare).await.unwrap()), vec![BLOCK + 3]);
        let indexes: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE name LIKE 'audit_leaves_%'",
        )
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
}
