//! Finding a citizen's entries in the audit log without an index written per record.
//!
//! The log is cut into blocks of [`BLOCK`] consecutive entries. When a block is complete, a
//! background task stores a Bloom filter of the personal IDs its entries name
//! (`audit_subject_blocks`), built from what the writers noted as they committed ([`Notes`]),
//! or, where their notes do not cover the whole block, from the block's leaves read back. A search by subject reads the filters and scans only the
//! blocks whose filter may hold the ID, plus the blocks that have none yet (the open block at
//! the end, or blocks the task has not reached). The filters are derived from the leaves and
//! can always be rebuilt from them; a search never depends on one being there.
//!
//! Why not an index `(personal_id, idx)` written with each record: every commit then writes a
//! random page of that index per record — on SQLite the largest share of the write-ahead log's
//! pages and of the audit commit's CPU, and at hundreds of millions of records a random read
//! per record as well. A filter is written once per 4,096 records, appended.

use std::time::Duration;

use anyhow::Result;
use prost::Message;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, SqliteConnection};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{info, warn};

use super::log::AuditTail;
use crate::pb::v1::AuditRecord;
use crate::store::{Reader, with_reader};

/// Entries per block. Block `b` covers indexes `[b * BLOCK, (b + 1) * BLOCK)`. Stored filters
/// depend on it: changing it needs the filters dropped and rebuilt.
pub const BLOCK: u64 = 4_096;

/// Filter format tag (first byte).
const FORMAT: u8 = 1;
/// Bits per distinct personal ID, and hash functions: about 0.3% false positives.
const BITS_PER_ID: usize = 12;
const HASHES: u8 = 8;

/// A filter that matches every ID: for a block whose subjects could not all be read (a leaf
/// that does not decode), so that a search scans it rather than miss an entry.
pub const MATCH_ALL: &[u8] = &[FORMAT, 0];

/// What this process's writers committed into the open block, so that its filter is built
/// from memory when the block completes instead of by reading its leaves back. Valid only if
/// the block's every entry was noted here, in order: after a restart (the block began before
/// it) or with replicas (they append entries this process does not see), the block's leaves
/// are read instead.
#[derive(Default)]
pub struct Notes {
    /// The index the next noted entry must have for the open block's notes to stay whole.
    next: u64,
    /// Whether every entry of the open block so far was noted.
    whole: bool,
    hashes: Vec<(u64, u64)>,
    /// Filters of complete blocks, waiting for the indexer (a few; older ones are dropped and
    /// their blocks read back instead).
    ready: std::collections::VecDeque<(u64, Vec<u8>)>,
}

impl Notes {
    /// Notes for a log of `size` entries: whole from the next block on (or from this one if
    /// it has not begun).
    pub fn at(size: u64) -> Self {
        Self {
            next: size,
            whole: size.is_multiple_of(BLOCK),
            ..Self::default()
        }
    }

    /// Entries committed from `first` on, in order, each with its subjects.
    pub fn note<'a, I>(&mut self, first: u64, subjects: impl IntoIterator<Item = I>)
    where
        I: IntoIterator<Item = &'a String>,
    {
        for (k, ids) in subjects.into_iter().enumerate() {
            let index = first + k as u64;
            if index.is_multiple_of(BLOCK) {
                self.whole = true;
                self.hashes.clear();
            } else if index != self.next {
                self.whole = false;
            }
            self.next = index + 1;
            if !self.whole {
                continue;
            }
            self.hashes.extend(ids.into_iter().map(|id| hashes(id)));
            if self.next.is_multiple_of(BLOCK) {
                let filter = filter_of_hashes(&mut self.hashes);
                if self.ready.len() == 8 {
                    self.ready.pop_front();
                }
                self.ready.push_back((index / BLOCK, filter));
                self.hashes.clear();
            }
        }
    }

    /// The filter of `block` if it was built from notes.
    pub fn take(&mut self, block: u64) -> Option<Vec<u8>> {
        self.ready.retain(|(b, _)| *b >= block);
        match self.ready.front() {
            Some((b, _)) if *b == block => self.ready.pop_front().map(|(_, f)| f),
            _ => None,
        }
    }
}

/// Two 64-bit hashes of `id` (double hashing gives the filter's `k` positions). SHA-256, so
/// the stored filters do not depend on a hasher's version.
fn hashes(id: &str) -> (u64, u64) {
    let d = Sha256::digest(id.as_bytes());
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&d[..8]);
    b.copy_from_slice(&d[8..16]);
    (u64::from_le_bytes(a), u64::from_le_bytes(b) | 1)
}

/// The Bloom filter of `ids` (duplicates allowed): `[FORMAT, k, bits…]`.
pub fn filter_of<'a>(ids: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut hashed: Vec<(u64, u64)> = ids.into_iter().map(hashes).collect();
    filter_of_hashes(&mut hashed)
}

/// The Bloom filter of the IDs whose [`hashes`] these are (sorted and deduplicated here, so
/// the filter's size counts distinct IDs).
fn filter_of_hashes(hashed: &mut Vec<(u64, u64)>) -> Vec<u8> {
    hashed.sort_unstable();
    hashed.dedup();
    let bytes = (hashed.len() * BITS_PER_ID).div_ceil(8).max(8);
    let bits = (bytes * 8) as u64;
    let mut out = vec![0u8; 2 + bytes];
    out[0] = FORMAT;
    out[1] = HASHES;
    for &h in hashed.iter() {
        for bit in positions(h, HASHES, bits) {
            out[2 + (bit / 8) as usize] |= 1 << (bit % 8);
        }
    }
    out
}

/// The `k` bit positions, among `m`, of the ID whose [`hashes`] are `(h1, h2)` (double
/// hashing). Building and probing a filter both go through here, so they always agree.
fn positions((h1, h2): (u64, u64), k: u8, m: u64) -> impl Iterator<Item = u64> {
    (0..u64::from(k)).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % m)
}

/// Whether the block whose filter is `filter` may name `id`. False only when it certainly
/// does not; a filter this build cannot read answers true (the block is scanned).
pub fn may_contain(filter: &[u8], id: &str) -> bool {
    let [FORMAT, k, bits @ ..] = filter else {
        return true;
    };
    if *k == 0 {
        return true;
    }
    if bits.is_empty() {
        return false;
    }
    positions(hashes(id), *k, (bits.len() * 8) as u64)
        .all(|bit| bits[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
}

/// Whether a leaf's record names `id` among its subjects. A leaf that does not decode names
/// nobody (it cannot be shown to; `audit verify` reports such damage). Searches ask only about
/// leaves the store found to contain the ID's bytes.
pub fn leaf_names(leaf: &[u8], id: &str) -> bool {
    AuditRecord::decode(leaf).is_ok_and(|r| r.subject_personal_ids.iter().any(|s| s == id))
}

/// The connection the indexer stores filters through.
pub(super) enum FilterWriter {
    /// Its own connection to the store file; it writes only under the tail's lock, so it never
    /// makes the log's or the journal's writer wait inside SQLite.
    Sqlite(SqliteConnection),
    Pg(PgPool),
}

/// Builds the filters of complete blocks, in block order.
pub(super) struct Indexer {
    pub reader: Reader,
    pub writer: FilterWriter,
    pub tail: AuditTail,
    /// Blocks `[0, n)` have their filter.
    pub built: watch::Sender<u64>,
}

impl Indexer {
    /// The first block without a filter.
    async fn next_block(&self) -> Result<u64> {
        let next: Option<i64> = with_reader!(&self.reader, |pool| {
            sqlx::query_scalar("SELECT max(block) + 1 FROM audit_subject_blocks")
                .fetch_one(pool)
                .await
        })?;
        Ok(next.map_or(0, |n| n.max(0) as u64))
    }

    /// Builds and stores the filter of every complete block that has none yet, up to the
    /// committed size; returns how many it stored.
    pub async fn catch_up(&mut self) -> Result<u64> {
        let mut built = 0;
        let mut block = self.next_block().await?;
        self.built.send_replace(block);
        while (block + 1) * BLOCK <= self.tail.size() {
            let filter = match self.tail.noted_filter(block) {
                Some(f) => f,
                None => self.build(block).await?,
            };
            self.store(block, &filter).await?;
            built += 1;
            block += 1;
            self.built.send_replace(block);
        }
        Ok(built)
    }

    /// The filter of `block` (complete), from its leaves.
    async fn build(&self, block: u64) -> Result<Vec<u8>> {
        let (start, end) = (block * BLOCK, (block + 1) * BLOCK);
        let leaves: Vec<Vec<u8>> = with_reader!(&self.reader, |pool| {
            sqlx::query_scalar("SELECT leaf FROM audit_leaves WHERE idx >= $1 AND idx < $2")
                .bind(start as i64)
                .bind(end as i64)
                .fetch_all(pool)
                .await
        })?;
        let records: Result<Vec<AuditRecord>, _> = leaves
            .iter()
            .map(|l| AuditRecord::decode(l.as_slice()))
            .collect();
        match records {
            Ok(records) if records.len() as u64 == BLOCK => {
                Ok(filter_of(records.iter().flat_map(|r| {
                    r.subject_personal_ids.iter().map(String::as_str)
                })))
            }
            Ok(records) => {
                warn!(
                    block,
                    found = records.len(),
                    "audit block is missing leaves; searches will scan it whole"
                );
                Ok(MATCH_ALL.to_vec())
            }
            Err(e) => {
                warn!(block, error = %e, "an audit leaf does not decode; searches will scan its block whole");
                Ok(MATCH_ALL.to_vec())
            }
        }
    }

    async fn store(&mut self, block: u64, filter: &[u8]) -> Result<()> {
        let sql = "INSERT INTO audit_subject_blocks (block, filter) VALUES ($1, $2) \
                   ON CONFLICT (block) DO NOTHING";
        match &mut self.writer {
            FilterWriter::Sqlite(conn) => {
                let _turn = self.tail.lock().await;
                sqlx::query(sql)
                    .bind(block as i64)
                    .bind(filter)
                    .execute(&mut *conn)
                    .await?;
            }
            FilterWriter::Pg(pool) => {
                // Replicas may race for a block; the filter is the same either way.
                sqlx::query(sql)
                    .bind(block as i64)
                    .bind(filter)
                    .execute(&*pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// Runs until the log is dropped: catches up when a commit completes a block (`wake`), and
    /// every 10 s (blocks other replicas completed; a failed attempt).
    pub async fn run<T>(mut self, wake: std::sync::Arc<Notify>, alive: mpsc::WeakSender<T>) {
        let mut backfill = true;
        while alive.upgrade().is_some() {
            match self.catch_up().await {
                Ok(n) if backfill && n > 0 => {
                    info!(
                        blocks = n,
                        "audit subject filters built for earlier entries"
                    );
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "could not build audit subject filters; retrying"),
            }
            backfill = false;
            let _ = tokio::time::timeout(Duration::from_secs(10), wake.notified()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u64) -> String {
        format!("031{n:09}")
    }

    #[test]
    fn an_empty_filter_holds_nothing_and_match_all_holds_everything() {
        let empty = filter_of([]);
        assert!(!may_contain(&empty, &id(1)));
        assert!(may_contain(MATCH_ALL, &id(1)));
        // A format this build does not know: scan, never skip.
        assert!(may_contain(&[9, 8, 0xff], &id(1)));
        assert!(may_contain(&[], &id(1)));
    }

    #[test]
    fn false_positives_stay_rare_at_a_full_block() {
        let ids: Vec<String> = (0..BLOCK).map(id).collect();
        let f = filter_of(ids.iter().map(String::as_str));
        assert!(ids.iter().all(|i| may_contain(&f, i)));
        let others = (BLOCK..BLOCK + 100_000)
            .filter(|n| may_contain(&f, &id(*n)))
            .count();
        // Expected ~0.3%; 1% leaves room for the hash's luck but not for a broken filter.
        assert!(others < 1_000, "{others} false positives in 100,000");
    }

    #[test]
    fn a_leaf_names_only_its_own_subjects() {
        let r = AuditRecord {
            subject_personal_ids: vec![id(7), id(8)],
            agency_id: id(9), // the bytes of an ID elsewhere in the leaf are not a subject
            ..Default::default()
        };
        let leaf = r.encode_to_vec();
        assert!(leaf_names(&leaf, &id(7)) && leaf_names(&leaf, &id(8)));
        assert!(!leaf_names(&leaf, &id(9)) && !leaf_names(&leaf, &id(10)));
        assert!(!leaf_names(b"\xff\xff not a record 031000000007", &id(7)));
    }

    /// Notes give the same filter as reading the block back — only for blocks every entry of
    /// which they saw, in order.
    #[test]
    fn notes_build_a_blocks_filter_only_when_they_saw_all_of_it() {
        let subjects = |range: std::ops::Range<u64>| -> Vec<Vec<String>> {
            range.map(|i| vec![id(i % 1_000), id(7)]).collect()
        };
        let expected = |block: u64| {
            let ids = subjects(block * BLOCK..(block + 1) * BLOCK);
            filter_of(ids.iter().flatten().map(String::as_str))
        };
        // A log that opened at 100 entries: block 0 began before, so it is read back.
        let mut n = Notes::at(100);
        n.note(100, &subjects(100..BLOCK));
        assert_eq!(n.take(0), None);
        // Block 1 in uneven batches: built from the notes.
        n.note(BLOCK, &subjects(BLOCK..BLOCK + 5));
        n.note(BLOCK + 5, &subjects(BLOCK + 5..2 * BLOCK));
        // Block 2 with an entry noted by nobody (another replica's): read back.
        n.note(2 * BLOCK, &subjects(2 * BLOCK..2 * BLOCK + 10));
        n.note(2 * BLOCK + 11, &subjects(2 * BLOCK + 11..3 * BLOCK));
        // Block 3 whole again.
        n.note(3 * BLOCK, &subjects(3 * BLOCK..4 * BLOCK));
        assert_eq!(n.take(1), Some(expected(1)));
        assert_eq!(n.take(2), None);
        assert_eq!(n.take(3), Some(expected(3)));
        assert_eq!(n.take(3), None, "taken once");
        // A log that opened at a block boundary notes its first block.
        let mut n = Notes::at(BLOCK);
        n.note(BLOCK, &subjects(BLOCK..2 * BLOCK));
        assert_eq!(n.take(1), Some(expected(1)));
    }

    proptest! {
        /// No false negatives: every ID put in is found, whatever the set.
        #[test]
        fn every_id_put_in_is_found(ids in proptest::collection::vec("[0-9]{12}", 0..600)) {
            let f = filter_of(ids.iter().map(String::as_str));
            for i in &ids {
                prop_assert!(may_contain(&f, i));
            }
        }
    }
}
