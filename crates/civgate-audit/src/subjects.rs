//! Block summaries: finding entries in the audit log without an index written per record.
//!
//! The log is cut into blocks of [`BLOCK`] consecutive entries. When a block is complete, a
//! background task stores its [`Summary`] in `audit_subject_blocks`: a Bloom filter of the
//! personal IDs its entries name, the agencies they name and the range of their times. It is
//! built from what the writers noted as they committed ([`Notes`]), or, where their notes do
//! not cover the whole block, from the block's leaves read back. A search (by subject, agency
//! or time) reads the summaries and scans only the blocks that may hold a match, plus the
//! blocks that have no summary yet (the open block at the end, or blocks the task has not
//! reached). Summaries are derived from the leaves and can always be rebuilt from them; a
//! search never depends on one being there, and an unknown part of a summary (a block
//! summarised by an older build has no agencies or times) means "scan".
//!
//! Why not indexes `(personal_id, idx)`, `(agency, idx)`, `(time_ms)` written with each
//! record: every commit then rewrites pages of each of them — on SQLite, index B-trees that
//! grow at their right edge rebalance three leaves at a time, and the two indexes on agency
//! and time alone were ~5 of the ~30 write-ahead-log pages of a 25-publish commit (a
//! subjects index was worse: a random page per record). A summary is written once per 4,096
//! records, appended.
use std::time::Duration;

use anyhow::Result;
use prost::Message;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, SqliteConnection};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{info, warn};

use super::log::AuditTail;
use crate::groups::{GROUP_BLOCKS, GroupBuilder, GroupSummary};
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
pub(crate) const MATCH_ALL: &[u8] = &[FORMAT, 0];

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
    /// The open block's summary so far.
    open: Accumulator,
    /// Summaries of complete blocks, waiting for the indexer (a few; older ones are dropped
    /// and their blocks read back instead).
    ready: std::collections::VecDeque<(u64, Summary)>,
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

    /// Entries committed from `first` on, in order.
    pub fn note(&mut self, first: u64, entries: &[BlockEntry]) {
        for (k, e) in entries.iter().enumerate() {
            let index = first + k as u64;
            if index.is_multiple_of(BLOCK) {
                self.whole = true;
                self.open.clear();
            } else if index != self.next {
                self.whole = false;
            }
            self.next = index + 1;
            if !self.whole {
                continue;
            }
            self.open.add(&e.subjects, &e.agency, e.time_ms);
            if self.next.is_multiple_of(BLOCK) {
                let summary = self.open.finish();
                if self.ready.len() == 8 {
                    self.ready.pop_front();
                }
                self.ready.push_back((index / BLOCK, summary));
            }
        }
    }

    /// The summary of `block` if it was built from notes.
    pub fn take(&mut self, block: u64) -> Option<Summary> {
        self.ready.retain(|(b, _)| *b >= block);
        match self.ready.front() {
            Some((b, _)) if *b == block => self.ready.pop_front().map(|(_, f)| f),
            _ => None,
        }
    }
}

/// One committed entry, as its block's summary sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockEntry {
    pub subjects: Vec<String>,
    pub agency: String,
    pub time_ms: i64,
}

impl BlockEntry {
    pub fn of(r: &AuditRecord) -> Self {
        Self {
            subjects: r.subject_personal_ids.clone(),
            agency: r.agency_id.clone(),
            time_ms: r.time_unix_ms,
        }
    }
}

/// What a complete block holds, as far as a search needs to know to skip it.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Bloom filter of the personal IDs its entries name ([`may_contain`]).
    pub filter: Vec<u8>,
    /// The agencies its entries name, sorted and distinct; `None`: unknown.
    pub agencies: Option<Vec<String>>,
    /// The earliest and the latest time of its entries (ms since the epoch); `None`: unknown.
    pub time: Option<(i64, i64)>,
    /// The first [`hashes`] of the distinct IDs, each with the chunk of the block
    /// ([`crate::groups::CHUNK`] entries) that names it, sorted and distinct, when built here
    /// (for the group's postings, [`crate::groups`]); empty when read from the store.
    pub ids: Vec<(u64, u8)>,
    /// Per chunk of [`crate::groups::CHUNK`] entries, in order: its time range and which of
    /// `agencies` its entries name; `None`: unknown (the whole block is scanned).
    pub chunks: Option<Vec<Chunk>>,
}

/// What a chunk of a block holds: its entries' earliest and latest time, and a bit per agency
/// of the block's (sorted) list that it names — all bits when the block names more than 64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub first_ms: i64,
    pub last_ms: i64,
    pub agencies: u64,
}

/// The `chunks` column's format tag, and bytes per chunk in it.
const CHUNKS_FORMAT: u8 = 1;
const CHUNK_BYTES: usize = 24;

/// A stored `agencies` column (of a block's or a group's summary): a JSON array, or NULL
/// when unknown. [`Summary::from_columns`] reads it back.
pub(crate) fn agencies_column(agencies: Option<&[String]>) -> Option<String> {
    agencies.and_then(|a| serde_json::to_string(a).ok())
}

/// The stored `chunks` column: `[format, (first_ms, last_ms, agencies) LE …]`.
pub(crate) fn encode_chunks(chunks: &[Chunk]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + CHUNK_BYTES * chunks.len());
    out.push(CHUNKS_FORMAT);
    for c in chunks {
        out.extend_from_slice(&c.first_ms.to_le_bytes());
        out.extend_from_slice(&c.last_ms.to_le_bytes());
        out.extend_from_slice(&c.agencies.to_le_bytes());
    }
    out
}

/// The chunks of a stored column; `None` (unknown) for anything this build cannot read.
pub(crate) fn decode_chunks(bytes: &[u8]) -> Option<Vec<Chunk>> {
    let [CHUNKS_FORMAT, rest @ ..] = bytes else {
        return None;
    };
    if !rest.len().is_multiple_of(CHUNK_BYTES) {
        return None;
    }
    let int = |b: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        a
    };
    Some(
        rest.chunks(CHUNK_BYTES)
            .map(|c| Chunk {
                first_ms: i64::from_le_bytes(int(&c[0..8])),
                last_ms: i64::from_le_bytes(int(&c[8..16])),
                agencies: u64::from_le_bytes(int(&c[16..24])),
            })
            .collect(),
    )
}

/// What a search asks of a block's entries (`None`: anything).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Wanted<'a> {
    pub subject: Option<&'a str>,
    pub agency: Option<&'a str>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

impl Wanted<'_> {
    /// Whether a summary can rule a block out at all (else every block is scanned).
    pub(crate) fn selective(&self) -> bool {
        self.subject.is_some()
            || self.agency.is_some()
            || self.from_ms.is_some()
            || self.to_ms.is_some()
    }
}

impl Summary {
    /// For a block whose entries could not all be read (a leaf that does not decode, a
    /// missing leaf): matches everything, so that a search scans it rather than miss an entry.
    pub fn unknown() -> Self {
        Self {
            filter: MATCH_ALL.to_vec(),
            agencies: None,
            time: None,
            ids: Vec::new(),
            chunks: None,
        }
    }

    /// The summary of a block of these entries.
    pub fn of<'a>(entries: impl IntoIterator<Item = &'a AuditRecord>) -> Self {
        let mut acc = Accumulator::default();
        for r in entries {
            acc.add(&r.subject_personal_ids, &r.agency_id, r.time_unix_ms);
        }
        acc.finish()
    }

    /// Whether the block may hold an entry `w` wants: false only when it certainly does not.
    pub(crate) fn may_match(&self, w: &Wanted<'_>) -> bool {
        if let Some(id) = w.subject
            && !may_contain(&self.filter, id)
        {
            return false;
        }
        if let (Some(a), Some(agencies)) = (w.agency, &self.agencies)
            && agencies.binary_search_by(|x| x.as_str().cmp(a)).is_err()
        {
            return false;
        }
        if let Some((first, last)) = self.time
            && (w.from_ms.is_some_and(|from| last < from) || w.to_ms.is_some_and(|to| first >= to))
        {
            return false;
        }
        true
    }

    /// The index ranges, within block `block`, that may hold an entry `w` wants (its agency
    /// and time; the caller has checked the block as a whole): the chunks that may, or the
    /// whole block when its chunks are unknown.
    pub(crate) fn ranges(&self, block: u64, w: &Wanted<'_>) -> Vec<(u64, u64)> {
        let start = block * BLOCK;
        let (Some(chunks), Some(agencies)) = (&self.chunks, &self.agencies) else {
            return vec![(start, start + BLOCK)];
        };
        let bit = match w.agency {
            None => u64::MAX,
            Some(a) => match agencies.binary_search_by(|x| x.as_str().cmp(a)) {
                Ok(_) if agencies.len() > 64 => u64::MAX,
                Ok(i) => 1 << i,
                Err(_) => 0,
            },
        };
        let size = crate::groups::CHUNK;
        chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                c.agencies & bit != 0
                    && w.from_ms.is_none_or(|from| c.last_ms >= from)
                    && w.to_ms.is_none_or(|to| c.first_ms < to)
            })
            .map(|(i, _)| (start + i as u64 * size, start + (i as u64 + 1) * size))
            .collect()
    }

    /// The stored `agencies` column: a JSON array, or NULL when unknown.
    pub(crate) fn agencies_column(&self) -> Option<String> {
        agencies_column(self.agencies.as_deref())
    }

    /// A summary from its stored columns; a column that does not parse is unknown.
    pub(crate) fn from_columns(
        filter: Vec<u8>,
        agencies: Option<&str>,
        first_ms: Option<i64>,
        last_ms: Option<i64>,
        chunks: Option<&[u8]>,
    ) -> Self {
        let agencies = agencies
            .and_then(|a| serde_json::from_str::<Vec<String>>(a).ok())
            .map(|mut a| {
                a.sort_unstable();
                a.dedup();
                a
            });
        Self {
            filter,
            agencies,
            time: first_ms.zip(last_ms),
            ids: Vec::new(),
            chunks: chunks.and_then(decode_chunks),
        }
    }
}

/// A block's summary as its entries are added, one by one: from the writers' notes
/// ([`Notes`]) or from the leaves read back ([`Summary::of`]), the same way.
#[derive(Default)]
struct Accumulator {
    hashes: Vec<(u64, u64)>,
    /// Entries added: the next one's position in the block.
    added: u64,
    ids: Vec<(u64, u8)>,
    agencies: std::collections::BTreeSet<String>,
    time: Option<(i64, i64)>,
    /// Per chunk so far: its time range and the agencies it names.
    chunks: Vec<((i64, i64), std::collections::BTreeSet<String>)>,
}

impl Accumulator {
    fn add(&mut self, subjects: &[String], agency: &str, time_ms: i64) {
        let chunk = (self.added / crate::groups::CHUNK) as u8;
        self.added += 1;
        for id in subjects {
            let h = hashes(id);
            self.hashes.push(h);
            self.ids.push((h.0, chunk));
        }
        if !self.agencies.contains(agency) {
            self.agencies.insert(agency.to_owned());
        }
        self.time = Some(self.time.map_or((time_ms, time_ms), |(a, b)| {
            (a.min(time_ms), b.max(time_ms))
        }));
        if self.chunks.len() <= usize::from(chunk) {
            self.chunks
                .push(((time_ms, time_ms), std::collections::BTreeSet::new()));
        }
        if let Some(((first, last), names)) = self.chunks.last_mut() {
            *first = (*first).min(time_ms);
            *last = (*last).max(time_ms);
            if !names.contains(agency) {
                names.insert(agency.to_owned());
            }
        }
    }

    /// The summary of what was added; starts over empty.
    fn finish(&mut self) -> Summary {
        let filter = filter_of_hashes(&mut self.hashes);
        let mut ids = std::mem::take(&mut self.ids);
        ids.sort_unstable();
        ids.dedup();
        let agencies: Vec<String> = std::mem::take(&mut self.agencies).into_iter().collect();
        let chunks = std::mem::take(&mut self.chunks)
            .into_iter()
            .map(|((first_ms, last_ms), names)| Chunk {
                first_ms,
                last_ms,
                agencies: if agencies.len() > 64 {
                    u64::MAX
                } else {
                    agencies
                        .iter()
                        .enumerate()
                        .filter(|(_, a)| names.contains(*a))
                        .fold(0, |m, (i, _)| m | 1 << i)
                },
            })
            .collect();
        let summary = Summary {
            filter,
            agencies: Some(agencies),
            time: self.time,
            ids,
            chunks: Some(chunks),
        };
        self.clear();
        summary
    }

    fn clear(&mut self) {
        self.hashes.clear();
        self.ids.clear();
        self.chunks.clear();
        self.added = 0;
        self.agencies.clear();
        self.time = None;
    }
}

/// Two 64-bit hashes of `id` (double hashing gives the filter's `k` positions). SHA-256, so
/// the stored filters do not depend on a hasher's version.
pub(crate) fn hashes(id: &str) -> (u64, u64) {
    let d = Sha256::digest(id.as_bytes());
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&d[..8]);
    b.copy_from_slice(&d[8..16]);
    (u64::from_le_bytes(a), u64::from_le_bytes(b) | 1)
}

/// The Bloom filter of `ids` (duplicates allowed): `[FORMAT, k, bits…]`.
#[cfg(test)]
fn filter_of<'a>(ids: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
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
pub(crate) fn may_contain(filter: &[u8], id: &str) -> bool {
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
pub(crate) fn leaf_names(leaf: &[u8], id: &str) -> bool {
    AuditRecord::decode(leaf).is_ok_and(|r| r.subject_personal_ids.iter().any(|s| s == id))
}

/// The summary of complete block `block` from its leaves; a block that is missing leaves or
/// holds one that does not decode gets [`Summary::unknown`] (searches scan it whole).
fn summarise(block: u64, leaves: &[Vec<u8>]) -> Summary {
    let records: Result<Vec<AuditRecord>, _> = leaves
        .iter()
        .map(|l| AuditRecord::decode(l.as_slice()))
        .collect();
    match records {
        Ok(records) if records.len() as u64 == BLOCK => Summary::of(&records),
        Ok(records) => {
            warn!(
                block,
                found = records.len(),
                "audit block is missing leaves; searches will scan it whole"
            );
            Summary::unknown()
        }
        Err(e) => {
            warn!(block, error = %e, "an audit leaf does not decode; searches will scan its block whole");
            Summary::unknown()
        }
    }
}

/// The connection the indexer stores summaries through.
pub(super) enum FilterWriter {
    /// Its own connection to the store file; it writes only under the tail's lock, so it never
    /// makes the log's or the journal's writer wait inside SQLite.
    Sqlite(SqliteConnection),
    Pg(PgPool),
}

/// Builds the summaries of complete blocks, in block order.
pub(super) struct Indexer {
    pub reader: Reader,
    pub writer: FilterWriter,
    pub tail: AuditTail,
    /// Blocks `[0, n)` have their summary.
    pub built: watch::Sender<u64>,
    /// Groups `[0, n)` have their summary ([`crate::groups`]).
    pub grouped: watch::Sender<u64>,
    /// The group whose blocks' summaries this task is building now, as they come.
    pub group: Option<GroupBuilder>,
    /// The first group without a summary, being built from its leaves a few blocks per pass.
    pub rebuilding: Option<GroupBuilder>,
}

impl Indexer {
    /// The first block without a summary.
    async fn next_block(&self) -> Result<u64> {
        let next: Option<i64> = with_reader!(&self.reader, |pool| {
            sqlx::query_scalar("SELECT max(block) + 1 FROM audit_subject_blocks")
                .fetch_one(pool)
                .await
        })?;
        Ok(next.map_or(0, |n| n.max(0) as u64))
    }

    /// Builds and stores the summary of every complete block that has none yet, up to the
    /// committed size; returns how many it stored.
    pub async fn catch_up(&mut self) -> Result<u64> {
        let mut built = 0;
        let mut block = self.next_block().await?;
        self.built_up_to(block);
        while (block + 1) * BLOCK <= self.tail.size() {
            let summary = match self.tail.noted_summary(block) {
                Some(s) => s,
                None => self.build(block).await?,
            };
            self.store(block, &summary).await?;
            built += 1;
            block += 1;
            self.built_up_to(block);
            self.feed_group(block - 1, &summary).await?;
        }
        Ok(built)
    }

    /// Blocks `[0, n)` have their summary: watched, and shown in `/metrics`.
    fn built_up_to(&self, n: u64) {
        self.built.send_replace(n);
        metrics::gauge!(crate::AUDIT_BLOCKS_SUMMARISED).set(n as f64);
    }

    /// Groups `[0, n)` have their summary: watched, and shown in `/metrics`.
    fn grouped_up_to(&self, n: u64) {
        self.grouped.send_replace(n);
        metrics::gauge!(crate::AUDIT_GROUPS_SUMMARISED).set(n as f64);
    }

    /// Adds the summary of `block`, just built, to its group's; stores the group's when it is
    /// complete (a group whose first blocks this task did not build is left to
    /// [`Indexer::rebuild_groups`]).
    async fn feed_group(&mut self, block: u64, summary: &Summary) -> Result<()> {
        let g = block / GROUP_BLOCKS;
        let mut b = match self.group.take() {
            Some(b) if b.group == g => b,
            _ => GroupBuilder::new(g),
        };
        if b.add(block, summary) && b.complete() {
            self.store_group(&b.finish()).await?;
            let missing = self.first_missing_group().await?;
            self.grouped_up_to(missing);
        } else {
            self.group = Some(b);
        }
        Ok(())
    }

    /// The first group without a stored summary.
    async fn first_missing_group(&self) -> Result<u64> {
        let g: Option<i64> = with_reader!(&self.reader, |pool| {
            sqlx::query_scalar(
                "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM audit_block_groups WHERE grp = 0) THEN 0 \
                 ELSE (SELECT min(g.grp) + 1 FROM audit_block_groups g WHERE NOT EXISTS \
                 (SELECT 1 FROM audit_block_groups h WHERE h.grp = g.grp + 1)) END",
            )
            .fetch_one(pool)
            .await
        })?;
        Ok(g.map_or(0, |g| g.max(0) as u64))
    }

    /// Builds the first group without a summary, whose blocks are all summarised, from its
    /// leaves, [`REBUILD_BLOCKS`] blocks per call; returns whether work is left.
    pub(crate) async fn rebuild_groups(&mut self) -> Result<bool> {
        let missing = self.first_missing_group().await?;
        self.grouped_up_to(missing);
        if (missing + 1) * GROUP_BLOCKS > *self.built.borrow() {
            self.rebuilding = None;
            return Ok(false);
        }
        let mut b = match self.rebuilding.take() {
            Some(b) if b.group == missing => b,
            _ => GroupBuilder::new(missing),
        };
        for _ in 0..REBUILD_BLOCKS {
            let block = b.next_block();
            let summary = self.build(block).await?;
            b.add(block, &summary);
            if b.complete() {
                self.store_group(&b.finish()).await?;
                let missing = self.first_missing_group().await?;
                self.grouped_up_to(missing);
                return Ok(true);
            }
        }
        self.rebuilding = Some(b);
        Ok(true)
    }

    /// Stores a group's summary and postings in one transaction (replicas may race for a
    /// group; the rows are the same either way).
    async fn store_group(&mut self, g: &GroupSummary) -> Result<()> {
        let (first, last) = (g.time.map(|t| t.0), g.time.map(|t| t.1));
        let agencies = g.agencies_column();
        let group_sql = "INSERT INTO audit_block_groups \
                         (grp, indexed, agencies, first_time_ms, last_time_ms) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (grp) DO NOTHING";
        // Postings rows per statement (two parameters each).
        const ROWS: usize = 256;
        let postings_sql = |n: usize| {
            let values: Vec<String> = (0..n)
                .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
                .collect();
            format!(
                "INSERT INTO audit_group_postings (key, postings) VALUES {} \
                 ON CONFLICT (key) DO NOTHING",
                values.join(", ")
            )
        };
        macro_rules! write_group {
            ($tx:expr) => {{
                for chunk in g.postings.chunks(ROWS) {
                    // Built only from constants and numbered placeholders.
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(postings_sql(chunk.len())));
                    for (key, row) in chunk {
                        q = q.bind(*key).bind(row.as_slice());
                    }
                    q.execute(&mut *$tx).await?;
                }
                sqlx::query(group_sql)
                    .bind(g.group as i64)
                    .bind(i32::from(g.indexed))
                    .bind(agencies.as_deref())
                    .bind(first)
                    .bind(last)
                    .execute(&mut *$tx)
                    .await?;
            }};
        }
        match &mut self.writer {
            FilterWriter::Sqlite(conn) => {
                let _turn = self.tail.lock().await;
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                write_group!(tx);
                tx.commit().await?;
            }
            FilterWriter::Pg(pool) => {
                let mut tx = pool.begin().await?;
                write_group!(tx);
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Completes the summaries of blocks summarised by an older build (a subjects filter
    /// only, or no chunks), from their leaves, four blocks per call, from block `from` on; returns the
    /// number of blocks it completed and the block to go on from, or `None` when none is left.
    pub(crate) async fn backfill(&mut self, from: u64) -> Result<(u64, Option<u64>)> {
        let blocks: Vec<i64> = with_reader!(&self.reader, |pool| {
            sqlx::query_scalar(
                "SELECT block FROM audit_subject_blocks \
                 WHERE block >= $1 AND (agencies IS NULL OR chunks IS NULL) ORDER BY block LIMIT 4",
            )
            .bind(from as i64)
            .fetch_all(pool)
            .await
        })?;
        let Some(last) = blocks.last().map(|b| *b as u64) else {
            return Ok((0, None));
        };
        let mut completed = 0;
        for block in blocks {
            let summary = self.build(block as u64).await?;
            if summary.agencies.is_some() {
                self.update(block as u64, &summary).await?;
                completed += 1;
            }
        }
        Ok((completed, Some(last + 1)))
    }

    /// The summary of `block` (complete), from its leaves.
    async fn build(&self, block: u64) -> Result<Summary> {
        let (start, end) = (block * BLOCK, (block + 1) * BLOCK);
        // In index order: a chunk of the summary is the entries at its positions.
        let leaves: Vec<Vec<u8>> = with_reader!(&self.reader, |pool| {
            sqlx::query_scalar(
                "SELECT leaf FROM audit_leaves WHERE idx >= $1 AND idx < $2 ORDER BY idx",
            )
            .bind(start as i64)
            .bind(end as i64)
            .fetch_all(pool)
            .await
        })?;
        // Decoding 4,096 records takes milliseconds: off the serving thread (with replicas,
        // every block is built this way).
        tokio::task::spawn_blocking(move || summarise(block, &leaves))
            .await
            .map_err(Into::into)
    }

    async fn store(&mut self, block: u64, s: &Summary) -> Result<()> {
        let sql = "INSERT INTO audit_subject_blocks \
                   (block, filter, agencies, first_time_ms, last_time_ms, chunks) \
                   VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (block) DO NOTHING";
        self.write(sql, block, s).await
    }

    async fn update(&mut self, block: u64, s: &Summary) -> Result<()> {
        let sql = "UPDATE audit_subject_blocks \
                   SET filter = $2, agencies = $3, first_time_ms = $4, last_time_ms = $5, \
                   chunks = $6 WHERE block = $1 AND (agencies IS NULL OR chunks IS NULL)";
        self.write(sql, block, s).await
    }

    /// Runs `sql` with the block's number and summary as `$1`…`$6`.
    async fn write(&mut self, sql: &'static str, block: u64, s: &Summary) -> Result<()> {
        let (first, last) = (s.time.map(|t| t.0), s.time.map(|t| t.1));
        let agencies = s.agencies_column();
        let chunks = s.chunks.as_deref().map(encode_chunks);
        // One statement, bound for either backend.
        macro_rules! bound {
            () => {
                sqlx::query(sql)
                    .bind(block as i64)
                    .bind(s.filter.as_slice())
                    .bind(agencies.as_deref())
                    .bind(first)
                    .bind(last)
                    .bind(chunks.as_deref())
            };
        }
        match &mut self.writer {
            FilterWriter::Sqlite(conn) => {
                let _turn = self.tail.lock().await;
                bound!().execute(&mut *conn).await?;
            }
            // Replicas may race for a block; the summary is the same either way.
            FilterWriter::Pg(pool) => {
                bound!().execute(&*pool).await?;
            }
        }
        Ok(())
    }

    /// Runs until the log is dropped: catches up when a commit completes a block (`wake`), and
    /// every 10 s (blocks other replicas completed; a failed attempt). Completing an earlier
    /// release's summaries ([`Indexer::backfill`]) goes on in between, paced by
    /// [`backfill_pause`] so that it never takes more than a share of the store's time.
    pub async fn run<T>(mut self, wake: std::sync::Arc<Notify>, alive: mpsc::WeakSender<T>) {
        let mut first = true;
        // Where completing older builds' summaries goes on from (`None`: done), when it may
        // go on next, and how many blocks it has completed.
        let mut backfill = Some(0);
        let mut backfill_at = tokio::time::Instant::now();
        let mut backfilled = 0u64;
        // Whether a group is left to build from its leaves.
        let mut rebuilding = true;
        while alive.upgrade().is_some() {
            match self.catch_up().await {
                Ok(n) if first && n > 0 => {
                    info!(
                        blocks = n,
                        "audit block summaries built for earlier entries"
                    );
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "could not build audit block summaries; retrying"),
            }
            first = false;
            if tokio::time::Instant::now() >= backfill_at {
                let started = tokio::time::Instant::now();
                if let Some(from) = backfill {
                    match self.backfill(from).await {
                        Ok((completed, next)) => {
                            backfilled += completed;
                            backfill = next;
                            if next.is_none() && backfilled > 0 {
                                info!(
                                    blocks = backfilled,
                                    "audit block summaries of an earlier release completed"
                                );
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "could not complete older audit block summaries; retrying")
                        }
                    }
                } else {
                    // Then the groups no summary task saw whole, from their leaves.
                    rebuilding = self.rebuild_groups().await.unwrap_or_else(|e| {
                        warn!(error = %e, "could not build an audit group summary; retrying");
                        true
                    });
                }
                backfill_at = tokio::time::Instant::now() + backfill_pause(started.elapsed());
            }
            let wait = if backfill.is_some() || rebuilding {
                backfill_at
                    .saturating_duration_since(tokio::time::Instant::now())
                    .min(IDLE_WAKE)
            } else {
                IDLE_WAKE
            };

            let _ = tokio::time::timeout(wait, wake.notified()).await;
        }
    }
}

/// Blocks of a group built from their leaves per pass of [`Indexer::rebuild_groups`].
const REBUILD_BLOCKS: usize = 4;

/// How often the summary task looks for work when nothing wakes it.
const IDLE_WAKE: Duration = Duration::from_secs(10);

/// The share of its time the background completion of an earlier release's summaries may
/// take: it reads every old block's 4,096 leaves back (on a log of 100 million entries, ~25 GB)
/// and decodes them, so back to back it would compete with the live traffic for the disk, the
/// store and a core for as long as that takes.
pub(crate) const BACKFILL_SHARE: u32 = 4;

/// The pause after a backfill pass that took `worked`: `BACKFILL_SHARE - 1` times as long, so
/// the passes take at most 1 / `BACKFILL_SHARE` of the time, and at most a second, so a slow
/// pass (a store under load) does not stall the completion for long.
pub(crate) fn backfill_pause(worked: Duration) -> Duration {
    (worked * (BACKFILL_SHARE - 1)).min(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u64) -> String {
        format!("031{n:09}")
    }

    #[test]
    fn backfill_passes_take_at_most_their_share_of_the_time() {
        let ms = Duration::from_millis;
        assert_eq!(backfill_pause(Duration::ZERO), Duration::ZERO);
        assert_eq!(backfill_pause(ms(10)), ms(30));
        let share = |worked: Duration| {
            worked.as_secs_f64() / (worked + backfill_pause(worked)).as_secs_f64()
        };
        assert!((share(ms(40)) - 1.0 / f64::from(BACKFILL_SHARE)).abs() < 1e-9);
        // A slow pass still leaves the store most of the time, and waits no more than a second.
        assert_eq!(backfill_pause(ms(900)), Duration::from_secs(1));
        assert!(share(ms(900)) < 0.5);
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

    /// Notes give the same summary as reading the block back — only for blocks every entry
    /// of which they saw, in order.
    #[test]
    fn notes_build_a_blocks_summary_only_when_they_saw_all_of_it() {
        let records = |range: std::ops::Range<u64>| -> Vec<AuditRecord> {
            range
                .map(|i| AuditRecord {
                    subject_personal_ids: vec![id(i % 1_000), id(7)],
                    agency_id: format!("agency-{}", i % 3 + i / BLOCK),
                    time_unix_ms: 1_000_000 + ((i * 7919) % 10_007) as i64,
                    ..Default::default()
                })
                .collect()
        };
        let entries =
            |range| -> Vec<BlockEntry> { records(range).iter().map(BlockEntry::of).collect() };
        let expected = |block: u64| Summary::of(&records(block * BLOCK..(block + 1) * BLOCK));
        // A log that opened at 100 entries: block 0 began before, so it is read back.
        let mut n = Notes::at(100);
        n.note(100, &entries(100..BLOCK));
        assert_eq!(n.take(0), None);
        // Block 1 in uneven batches: built from the notes.
        n.note(BLOCK, &entries(BLOCK..BLOCK + 5));
        n.note(BLOCK + 5, &entries(BLOCK + 5..2 * BLOCK));
        // Block 2 with an entry noted by nobody (another replica's): read back.
        n.note(2 * BLOCK, &entries(2 * BLOCK..2 * BLOCK + 10));
        n.note(2 * BLOCK + 11, &entries(2 * BLOCK + 11..3 * BLOCK));
        // Block 3 whole again.
        n.note(3 * BLOCK, &entries(3 * BLOCK..4 * BLOCK));
        let one = n.take(1).unwrap();
        assert_eq!(one, expected(1));
        assert_eq!(
            one.agencies.as_deref(),
            Some(&["agency-1".to_string(), "agency-2".into(), "agency-3".into()][..])
        );
        assert_eq!(n.take(2), None);
        assert_eq!(n.take(3), Some(expected(3)));
        assert_eq!(n.take(3), None, "taken once");
        // A log that opened at a block boundary notes its first block.
        let mut n = Notes::at(BLOCK);
        n.note(BLOCK, &entries(BLOCK..2 * BLOCK));
        assert_eq!(n.take(1), Some(expected(1)));
    }

    /// A summary rules a block out only when it knows: an unknown part, or an unknown
    /// summary, always matches.
    #[test]
    fn agency_and_time_searches_scan_only_the_chunks_that_may_match() {
        use crate::groups::CHUNK;
        // 600 entries: three chunks (256, 256, 88); agency "x" in the second only; times grow.
        let records: Vec<AuditRecord> = (0..600u64)
            .map(|i| AuditRecord {
                agency_id: if i == 300 { "x".into() } else { "a".into() },
                time_unix_ms: 1_000 + i as i64,
                subject_personal_ids: vec![id(i)],
                ..Default::default()
            })
            .collect();
        let s = Summary::of(&records);
        let w = |agency, from_ms, to_ms| Wanted {
            subject: None,
            agency,
            from_ms,
            to_ms,
        };
        let at = 5 * BLOCK;
        assert_eq!(
            s.ranges(5, &w(Some("x"), None, None)),
            [(at + CHUNK, at + 2 * CHUNK)]
        );
        assert!(s.ranges(5, &w(Some("y"), None, None)).is_empty());
        assert_eq!(
            s.ranges(5, &w(Some("a"), None, None)).len(),
            3,
            "every chunk names a"
        );
        assert_eq!(
            s.ranges(5, &w(None, Some(1_000 + 520), Some(1_000 + 521))),
            [(at + 2 * CHUNK, at + 3 * CHUNK)]
        );
        // A window across a chunk boundary takes both.
        assert_eq!(
            s.ranges(5, &w(None, Some(1_000 + 250), Some(1_000 + 260))),
            [(at, at + CHUNK), (at + CHUNK, at + 2 * CHUNK)]
        );
        // More than 64 agencies in a block: the bits cannot tell them apart, every chunk is kept.
        let many: Vec<AuditRecord> = (0..300u64)
            .map(|i| AuditRecord {
                agency_id: format!("agency-{:03}", i % 100),
                ..Default::default()
            })
            .collect();
        let s = Summary::of(&many);
        assert_eq!(s.ranges(0, &w(Some("agency-007"), None, None)).len(), 2);
        // One the block does not name at all: none.
        assert!(s.ranges(0, &w(Some("agency-999"), None, None)).is_empty());
    }

    #[test]
    fn summaries_rule_out_only_what_they_know() {
        let rec = |agency: &str, t: i64, who: u64| AuditRecord {
            agency_id: agency.into(),
            time_unix_ms: t,
            subject_personal_ids: vec![id(who)],
            ..Default::default()
        };
        let s = Summary::of(&[rec("b", 200, 1), rec("a", 100, 2), rec("b", 300, 3)]);
        assert_eq!(
            s.agencies.as_deref(),
            Some(&["a".to_string(), "b".into()][..])
        );
        assert_eq!(s.time, Some((100, 300)));
        let w = |agency, from_ms, to_ms, subject| Wanted {
            subject,
            agency,
            from_ms,
            to_ms,
        };
        let one = id(1);
        let nobody = id(999);
        for (wanted, expect) in [
            (w(Some("a"), None, None, None), true),
            (w(Some("c"), None, None, None), false),
            (w(None, Some(300), None, None), true),
            (w(None, Some(301), None, None), false),
            (w(None, None, Some(100), None), false), // [from, to): 100 is not before 100
            (w(None, None, Some(101), None), true),
            (w(None, Some(150), Some(160), None), true), // inside the range: may be there
            (w(Some("b"), Some(0), Some(1_000), Some(&one)), true),
            (w(Some("b"), Some(0), Some(1_000), Some(&nobody)), false),
        ] {
            assert_eq!(s.may_match(&wanted), expect, "{wanted:?}");
        }
        // Stored and read back, it says the same (the IDs' hashes are not stored: they go to
        // the group's postings); unreadable or missing columns are unknown.
        let back = Summary::from_columns(
            s.filter.clone(),
            s.agencies_column().as_deref(),
            Some(100),
            Some(300),
            s.chunks.as_deref().map(encode_chunks).as_deref(),
        );
        assert_eq!(s.ids.len(), 3);
        // Three entries: one chunk, times 100–300, both agencies.
        assert_eq!(
            s.chunks,
            Some(vec![Chunk {
                first_ms: 100,
                last_ms: 300,
                agencies: 0b11
            }])
        );
        assert_eq!(
            back,
            Summary {
                ids: Vec::new(),
                ..s.clone()
            }
        );
        for unknown in [
            Summary::unknown(),
            Summary::from_columns(s.filter.clone(), None, None, None, None),
            Summary::from_columns(s.filter.clone(), Some("not json"), Some(100), None, None),
        ] {
            assert!(unknown.may_match(&w(Some("c"), Some(301), None, None)));
            assert_eq!(
                unknown.ranges(2, &w(Some("c"), None, None, None)),
                [(2 * BLOCK, 3 * BLOCK)]
            );
        }
        assert_eq!(decode_chunks(&[2]), None);
        assert_eq!(decode_chunks(&[CHUNKS_FORMAT, 0]), None);
        assert!(!w(None, None, None, None).selective());
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
