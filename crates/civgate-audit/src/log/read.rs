//! The log's reads, on a reader pool of either store with the same SQL: entries, the subtree
//! hashes of proofs, and searches (over the group and block summaries, scanning what has none).

use anyhow::Result;

use super::tree::fetch_nodes;
use super::{AuditError, AuditLog, Filter, MAX_ENTRIES, UPPER_LEVEL};
use crate::store::{Reader, with_reader};
use crate::{
    groups::{CHUNK, GROUP_BLOCKS, offsets_in, row_key, shard_key},
    merkle::{Hash, NodeId, consistency_ranges, decompose, fold_range, inclusion_ranges},
    subjects::{BLOCK, MATCH_ALL, Summary, Wanted, hashes, leaf_names},
};

/// Groups whose summaries a search reads per query (4,096 blocks, 16.7 million entries).
const GROUP_WINDOW: u64 = 64;

impl AuditLog {
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

    /// The hashes of `ids`, in order: those of [`UPPER_LEVEL`] and above from memory where
    /// they are there (and kept once read), the rest from the store.
    async fn nodes(&self, ids: &[NodeId]) -> Result<Vec<Hash>, AuditError> {
        let mut out: Vec<Option<Hash>> = {
            let upper = self.upper.read().unwrap_or_else(|p| p.into_inner());
            ids.iter()
                .map(|id| upper.get(&(id.level, id.index)).copied())
                .collect()
        };
        let missing: Vec<NodeId> = ids
            .iter()
            .zip(&out)
            .filter(|(_, h)| h.is_none())
            .map(|(id, _)| *id)
            .collect();
        if missing.is_empty() {
            return Ok(out.into_iter().flatten().collect());
        }
        let fetched = with_reader!(&self.reader, |pool| {
            let mut conn = pool
                .acquire()
                .await
                .map_err(|e| AuditError::Read(e.to_string()))?;
            fetch_nodes!(conn, &missing)
                .await
                .map_err(|e| AuditError::Damaged(e.to_string()))?
        });
        let mut upper = self.upper.write().unwrap_or_else(|p| p.into_inner());
        let mut fetched = missing.iter().zip(fetched);
        for slot in out.iter_mut().filter(|h| h.is_none()) {
            if let Some((id, h)) = fetched.next() {
                if id.level >= UPPER_LEVEL {
                    upper.insert((id.level, id.index), h);
                }
                *slot = Some(h);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Reads the subtree hashes of [`UPPER_LEVEL`] and above of a tree of `size` leaves into
    /// memory.
    pub(super) async fn load_upper(&self, size: u64) -> Result<(), AuditError> {
        let mut ids = Vec::new();
        let mut level = UPPER_LEVEL;
        while size >> level > 0 {
            ids.extend((0..size >> level).map(|index| NodeId { level, index }));
            level += 1;
        }
        for chunk in ids.chunks(4_096) {
            self.nodes(chunk).await?;
        }
        Ok(())
    }

    async fn hashes_of(&self, ranges: &[(u64, u64)]) -> Result<Vec<Hash>, AuditError> {
        let ids: Vec<Vec<NodeId>> = ranges.iter().map(|(s, e)| decompose(*s, *e)).collect();
        let flat: Vec<NodeId> = ids.iter().flatten().copied().collect();
        let hashes = self.nodes(&flat).await?;
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

    /// Entries matching `f`, from `f.after`, a window of groups at a time: the blocks the
    /// group summaries and the block summaries leave ([`AuditLog::candidates`]) are scanned.
    async fn search_blocks(
        &self,
        f: &Filter,
        w: &Wanted<'_>,
        size: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        let mut out = Vec::new();
        let mut block = f.after / BLOCK;
        let blocks = size.div_ceil(BLOCK);
        // Groups per window: for an agency or a time, one first (a common answer is near),
        // growing to GROUP_WINDOW; a citizen's entries are anywhere: the widest at once.
        let mut window = if w.subject.is_some() { GROUP_WINDOW } else { 1 };
        while block < blocks {
            let end = ((block / GROUP_BLOCKS + window) * GROUP_BLOCKS).min(blocks);
            window = (window * 4).min(GROUP_WINDOW);
            for (start, stop) in self.candidates(w, block, end).await? {
                let (from, to) = (start.max(f.after), stop.min(size));
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
                for (i, leaf) in self
                    .scan(f, from, to, (to - from) as usize, Some(id))
                    .await?
                {
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

    /// The index ranges, within blocks `[from, to)`, that may hold an entry `w` wants, in
    /// order. A group with a summary that rules `w` out is skipped whole; in an indexed group,
    /// a subject's ranges are the chunks its postings name; every other block (groups
    /// without a summary, the agencies and times of a group that may match) is decided by its
    /// own summary, and a block without one (the open block, or one not summarised yet) is
    /// kept whole.
    async fn candidates(
        &self,
        w: &Wanted<'_>,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, u64)>, AuditError> {
        let (g0, g1) = (from / GROUP_BLOCKS, to.div_ceil(GROUP_BLOCKS));
        let groups = self.group_summaries(g0, g1).await?;
        let probe = w.subject.map(|id| shard_key(hashes(id).0));
        let postings = match probe {
            Some((shard, _)) => {
                let keys: Vec<i64> = groups
                    .iter()
                    .filter(|(_, (indexed, s))| *indexed && s.may_match(w))
                    .map(|(g, _)| row_key(*g, shard))
                    .collect();
                self.postings(&keys).await?
            }
            None => std::collections::HashMap::new(),
        };
        let mut out = Vec::new();
        let mut by_block = Vec::new();
        for g in g0..g1 {
            let blocks = (g * GROUP_BLOCKS).max(from)..((g + 1) * GROUP_BLOCKS).min(to);
            match (groups.get(&g), probe) {
                (Some((_, s)), _) if !s.may_match(w) => {}
                (Some((true, _)), Some((shard, key))) => {
                    // Every shard has a row: one missing is damage, searched block by block.
                    let Some(row) = postings.get(&row_key(g, shard)) else {
                        by_block.extend(blocks);
                        continue;
                    };
                    match offsets_in(row, key) {
                        Some(chunks) => out.extend(
                            chunks
                                .into_iter()
                                .map(|c| g * GROUP_BLOCKS * BLOCK + u64::from(c) * CHUNK)
                                .filter(|start| blocks.contains(&(start / BLOCK)))
                                .map(|start| (start, start + CHUNK)),
                        ),
                        None => by_block.extend(blocks),
                    }
                }
                _ => by_block.extend(blocks),
            }
        }
        // Summaries read per query: ~6 KiB each with a full block's subject filter, which is
        // read only when searching by subject.
        let window: usize = if w.subject.is_some() { 256 } else { 4_096 };
        for chunk in by_block.chunks(window) {
            let (first, last) = (chunk[0], chunk[chunk.len() - 1]);
            let summaries = self.summaries(first, last + 1, w.subject.is_some()).await?;
            for &b in chunk {
                match summaries.get(&b) {
                    None => out.push((b * BLOCK, (b + 1) * BLOCK)),
                    Some(s) if !s.may_match(w) => {}
                    // A subject's blocks are scanned whole (chunks do not say who).
                    Some(_) if w.subject.is_some() => out.push((b * BLOCK, (b + 1) * BLOCK)),
                    Some(s) => out.extend(s.ranges(b, w)),
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The stored summaries of groups `[from, to)`: whether the group has postings, and its
    /// agencies and times (as a block summary that rules out no subject).
    async fn group_summaries(
        &self,
        from: u64,
        to: u64,
    ) -> Result<std::collections::HashMap<u64, (bool, Summary)>, AuditError> {
        type Row = (i64, i32, Option<String>, Option<i64>, Option<i64>);
        let rows: Vec<Row> = with_reader!(&self.reader, |pool| {
            sqlx::query_as(
                "SELECT grp, indexed, agencies, first_time_ms, last_time_ms \
                 FROM audit_block_groups WHERE grp >= $1 AND grp < $2",
            )
            .bind(from as i64)
            .bind(to as i64)
            .fetch_all(pool)
            .await
        })
        .map_err(|e| AuditError::Read(e.to_string()))?;
        Ok(rows
            .into_iter()
            .map(|(g, indexed, agencies, first, last)| {
                let s = Summary::from_columns(
                    MATCH_ALL.to_vec(),
                    agencies.as_deref(),
                    first,
                    last,
                    None,
                );
                (g as u64, (indexed == 1, s))
            })
            .collect())
    }

    /// The stored postings rows of these keys.
    async fn postings(
        &self,
        keys: &[i64],
    ) -> Result<std::collections::HashMap<i64, Vec<u8>>, AuditError> {
        let mut out = std::collections::HashMap::new();
        for chunk in keys.chunks(256) {
            let list: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT key, postings FROM audit_group_postings WHERE key IN ({})",
                list.join(", ")
            );
            let rows: Vec<(i64, Vec<u8>)> = with_reader!(&self.reader, |pool| {
                // Built only from constants and numbered placeholders.
                let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()));
                for k in chunk {
                    q = q.bind(*k);
                }
                q.fetch_all(pool).await
            })
            .map_err(|e| AuditError::Read(e.to_string()))?;
            out.extend(rows);
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
            Option<Vec<u8>>,
        );
        // The subject filter for a subject search; the chunks for the others.
        let sql = if filters {
            "SELECT block, filter, agencies, first_time_ms, last_time_ms, NULL \
             FROM audit_subject_blocks WHERE block >= $1 AND block < $2"
        } else {
            "SELECT block, NULL, agencies, first_time_ms, last_time_ms, chunks \
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
            .map(|(b, filter, agencies, first, last, chunks)| {
                (
                    b as u64,
                    Summary::from_columns(
                        filter.unwrap_or_default(),
                        agencies.as_deref(),
                        first,
                        last,
                        chunks.as_deref(),
                    ),
                )
            })
            .collect())
    }
}
