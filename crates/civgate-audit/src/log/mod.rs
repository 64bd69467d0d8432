//! The audit log's storage and its single writer. Appends are group-committed: one task
//! drains every pending record into one SQLite transaction (WAL, synchronous FULL), then
//! answers each caller with its index — a caller hears "durable" only after the commit.
//! Perfect-subtree hashes are stored as they complete, so proofs need O(log n) reads.
//!
//! Code map: this file holds the log's handle ([`AuditLog`]: append, checkpoints) and its
//! right edge ([`AuditTail`], which another writer locks to commit records in its own
//! transaction: see "Staging" below); `read.rs` the reads (entries, proofs, searches);
//! `tree.rs` how each store keeps the subtree hashes; `writer.rs` the group-commit writer and
//! the [`writer::Dialect`] trait; `sqlite.rs` and `postgres.rs` one dialect each, with
//! opening and the upgrades of earlier layouts.
//!
//! # Staging records in another writer's transaction
//! The journal commits the audit records of its calls in its own transaction, on the same
//! store, instead of taking turns with this log's writer. The one way to do that:
//! 1. take the right edge, [`AuditTail::lock`] (before any database lock), and keep it until
//!    the commit is over;
//! 2. stage the records with [`stage_sqlite`] (into the SQLite batch being committed) or
//!    [`append_pg`] (inside the PostgreSQL transaction), which give them their indexes and
//!    extend the locked range;
//! 3. after the commit, [`AuditTail::note`] the entries and [`AuditTail::committed`] the range;
//!    if the commit failed, put back the range as it was before staging.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info};

use super::{
    merkle::CompactRange,
    note::Signer,
    subjects::{BLOCK, BlockEntry, FilterWriter, Indexer, Notes, Summary},
};
use crate::pb::v1::AuditRecord;
use crate::store::{Reader, Store};
use writer::{Dialect, Writer};

mod postgres;
mod read;
mod sqlite;
#[cfg(test)]
mod tests;
mod tree;
mod writer;

pub use postgres::append_pg;
pub use sqlite::stage_sqlite;
pub use writer::now_ms;
/// Largest `GetEntries` page.
pub(crate) const MAX_ENTRIES: u64 = 1_000;
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
    /// Groups `[0, n)` have their summary (`groups`).
    grouped: watch::Receiver<u64>,
    /// The subtree hashes of [`UPPER_LEVEL`] and above, once read (loaded at open).
    upper: Arc<RwLock<HashMap<(u32, u64), crate::merkle::Hash>>>,
}

/// Subtree hashes at this level (subtrees of 1,024 leaves) and above are kept in memory: a
/// proof then reads from the store only the few hashes below it, near its leaf. Two per
/// 1,024 entries: ~20,000 hashes (under 2 MB) at 10 million entries. A complete subtree's
/// hash never changes, so a kept hash is never stale.
pub(crate) const UPPER_LEVEL: u32 = 10;

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
        metrics::gauge!(crate::AUDIT_LOG_SIZE).set(range.size() as f64);
        metrics::gauge!(crate::STORE_STALLED).set(0.0);
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
    /// completes again. A record whose caller gave up is not committed by the writer if it has
    /// not started on it (the gate appends one saying the answer was withheld); a commit under
    /// way may still complete later, and then both are in the log.
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
                metrics::gauge!(crate::STORE_STALLED).set(1.0);
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
            Store::Sqlite(dir) => sqlite::open(dir, o).await,
            Store::Postgres { url, pool_max } => postgres::open(url, *pool_max, o).await,
        }
    }

    async fn start<D: Dialect>(
        reader: Reader,
        conn: D,
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
            grouped: watch::channel(0).1,
            upper: Arc::new(RwLock::new(HashMap::new())),
        };
        // Before the first proof is asked for.
        log.load_upper(size).await?;
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
        let (grouped_tx, grouped) = watch::channel(0);
        let indexer = Indexer {
            reader: log.reader.clone(),
            writer: filters,
            tail: log.tail.clone(),
            built,
            grouped: grouped_tx,
            group: None,
            rebuilding: None,
        };
        tokio::spawn(indexer.run(log.tail.blocks.clone(), tx.downgrade()));
        Ok(Self {
            tx,
            filtered,
            grouped,
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

    /// Groups `[0, n)` of blocks have their summary and postings (`groups`), watched.
    pub fn grouped(&self) -> watch::Receiver<u64> {
        self.grouped.clone()
    }

    /// The latest signed checkpoint (a C2SP signed note).
    pub fn latest_checkpoint(&self) -> String {
        self.latest.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Test check: every entry of the first `size` proves its inclusion against the root
    /// recomputed from the leaves themselves.
    #[cfg(any(test, feature = "test-utils"))]
    pub async fn assert_every_entry_proves(&self, size: u64) {
        use super::merkle::{Hash, leaf_hash, root_of, verify_inclusion};
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
}
