//! The log's reads, on a reader pool of either store with the same SQL: entries, the subtree
//! hashes of proofs, and searches (block by block over the summaries, scanning what has none).

use anyhow::Result;

use super::tree::fetch_nodes;
use super::{AuditError, AuditLog, Filter, MAX_ENTRIES};
use crate::store::{Reader, with_reader};
use crate::{
    merkle::{Hash, NodeId, consistency_ranges, decompose, fold_range, inclusion_ranges},
    subjects::{BLOCK, Summary, Wanted, leaf_names},
};

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
