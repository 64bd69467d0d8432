//! The audit log's writer: one task per log, the only one to append on this replica. It
//! group-commits the records waiting (lingering under load, flushing records nobody waits for
//! at least every 50 ms) through its store's [`Dialect`], and signs checkpoints.

use std::{
    sync::{Arc, RwLock, atomic::Ordering},
    time::Duration,
};

use anyhow::Result;
use prost::Message;
use tokio::sync::mpsc;
use tracing::{error, warn};

use super::{AuditError, AuditTail, DEFERRED_FLUSH, MAX_BATCH, Pending};
use crate::pb::v1::AuditRecord;
use crate::store::{drain, linger};
use crate::{
    merkle::{CompactRange, Hash, NodeId, leaf_hash},
    note::{Checkpoint, Signer},
    subjects::BlockEntry,
};

/// What the writer needs of a store, one implementation per dialect (`sqlite.rs`,
/// `postgres.rs`).
pub(super) trait Dialect: Send + 'static {
    /// Appends `records` at the end of the log in one transaction: gives them the next
    /// indexes, extending `range` (which the caller restores if this fails), and stores their
    /// leaves, the subtree hashes they complete and the new size. Returns the first index.
    fn append(
        &mut self,
        range: &mut CompactRange,
        records: Vec<AuditRecord>,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Brings `range` up to what other writers of the store committed (PostgreSQL replicas;
    /// on SQLite this writer is the only one).
    fn catch_up(&mut self, range: &mut CompactRange) -> impl Future<Output = Result<()>> + Send;

    /// Stores a signed checkpoint of the tree at `size` (replacing one of that size).
    fn store_checkpoint(
        &mut self,
        size: u64,
        note: &str,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// Records nobody waits for that a failing store has not taken, kept to try again: at most
/// this many (the oldest go first), so that a batch with them stays within [`MAX_BATCH`].
const MAX_KEPT: usize = MAX_BATCH / 2;

/// The statement that stores a checkpoint, on either store.
pub(super) const CHECKPOINT_SQL: &str = "INSERT INTO audit_checkpoints (size, note, time_ms) VALUES ($1, $2, $3) \
     ON CONFLICT (size) DO UPDATE SET note = excluded.note, time_ms = excluded.time_ms";

pub(super) struct Writer<D> {
    pub(super) conn: D,
    pub(super) tail: AuditTail,
    pub(super) signer: Signer,
    pub(super) origin: String,
    pub(super) checkpointed: i64,
    pub(super) latest: Arc<RwLock<String>>,
}

pub(super) struct LeafRow {
    pub(super) index: u64,
    pub(super) leaf: Vec<u8>,
    pub(super) record: AuditRecord,
    pub(super) nodes: Vec<(NodeId, Hash)>,
}

impl<D: Dialect> Writer<D> {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Pending>, interval: Duration) {
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
                        pending = self.commit(std::mem::take(&mut pending)).await;
                    }
                }
                _ = flush.tick() => {
                    if !pending.is_empty() {
                        pending = self.commit(std::mem::take(&mut pending)).await;
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
            let kept = self.commit(pending).await;
            if !kept.is_empty() {
                error!(
                    entries = kept.len(),
                    "stopping with audit records the store did not take"
                );
                metrics::counter!(crate::AUDIT_RECORDS_LOST).increment(kept.len() as u64);
            }
        }
        let _ = self.checkpoint().await;
    }

    /// Commits `batch` and answers its waiters; returns the records to try again with the next
    /// batch. A record whose caller stopped waiting (its commit timed out, or its client went
    /// away) is not committed: the gate appends one in its place, saying what the caller was
    /// answered. When the commit fails, its waiters are answered (the gate then records the
    /// withheld answers) and the records nobody waits for — refusals, and those records in
    /// place of others — are kept to try again, up to [`MAX_KEPT`]; past it the oldest are
    /// dropped, counted in `civgate_audit_records_lost_total` and logged.
    async fn commit(&mut self, mut batch: Vec<Pending>) -> Vec<Pending> {
        batch.retain(|p| !p.done.as_ref().is_some_and(|d| d.is_closed()));
        if batch.is_empty() {
            return batch;
        }
        let tail = self.tail.clone();
        let mut range = tail.lock().await;
        let before = range.clone();
        // Nobody waits for these: a failed commit must not lose them. (Rare: refusals are
        // metered per certificate.)
        let unwaited: Vec<AuditRecord> = batch
            .iter()
            .filter(|p| p.done.is_none())
            .map(|p| p.record.clone())
            .collect();
        let (records, waiters): (Vec<AuditRecord>, Vec<_>) =
            batch.into_iter().map(|p| (p.record, p.done)).unzip();
        let entries: Vec<BlockEntry> = records.iter().map(BlockEntry::of).collect();
        let n = records.len();
        let started = std::time::Instant::now();
        let result = self.conn.append(&mut range, records).await;
        crate::store::store_commit("audit", n, started.elapsed());
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
                Vec::new()
            }
            Err(e) => {
                *range = before;
                drop(range);
                error!(error = %e, entries = n, kept = unwaited.len(), "audit commit failed; calls answer UNAVAILABLE");
                tail.failed();
                for done in waiters.into_iter().flatten() {
                    let _ = done.send(Err(AuditError::NotDurable(e.to_string())));
                }
                let mut kept: Vec<Pending> = unwaited
                    .into_iter()
                    .map(|record| Pending { record, done: None })
                    .collect();
                if kept.len() > MAX_KEPT {
                    let lost = kept.len() - MAX_KEPT;
                    error!(
                        entries = lost,
                        "audit records dropped: the store has not taken them for too long"
                    );
                    metrics::counter!(crate::AUDIT_RECORDS_LOST).increment(lost as u64);
                    kept.drain(..lost);
                }
                kept
            }
        }
    }

    /// Signs and stores a checkpoint if the log grew since the last one. With PostgreSQL the
    /// tree is first brought up to what other replicas committed, so every replica's
    /// checkpoints are recent — and all of them describe the one tree.
    pub(super) async fn checkpoint(&mut self) -> Result<()> {
        let tail = self.tail.clone();
        // Held until the checkpoint is stored: on SQLite this writes the shared store file.
        let mut range = tail.lock().await;
        self.conn.catch_up(&mut range).await?;
        tail.size.fetch_max(range.size(), Ordering::AcqRel);
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
        self.conn.store_checkpoint(size, &note).await?;
        self.checkpointed = size as i64;
        if let Ok(mut l) = self.latest.write() {
            *l = note;
        }
        Ok(())
    }
}

/// Gives each record the next index, encodes it, and extends the tree; the rows to store.
pub(super) fn assign(range: &mut CompactRange, records: Vec<AuditRecord>) -> Vec<LeafRow> {
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

/// Milliseconds since the Unix epoch (0 before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
