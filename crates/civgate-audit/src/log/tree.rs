//! Where each store keeps the tree's subtree hashes, and the two queries both stores run on
//! them (as macros: the same SQL on a SQLite or a PostgreSQL connection).

use crate::merkle::NodeId;

/// How a backend stores the subtree hashes. PostgreSQL: `audit_tree`, keyed by `(leaf_end,
/// level)`. SQLite: `audit_subtrees`, a rowid table keyed by `node = leaf_end << 6 | level`
/// (levels stay below 64; leaf ends below 2^57), so that the hashes each append completes go at
/// the end of the table's B-tree, which SQLite appends to without rebalancing (a key of two
/// columns makes an index B-tree, which rebalanced three leaves in most commits).
pub(super) struct TreeSql {
    /// Selects `(level, leaf_end, hash)` of `n` nodes bound as `(leaf_end, level)` pairs.
    pub(super) select: fn(n: usize) -> String,
    /// Deletes the nodes of leaves from `$1` on (a leaf end past the log's size `$1`).
    pub(super) delete_after: &'static str,
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
pub(super) fn tree_sql<C: sqlx::Connection>(_: &C) -> &'static TreeSql
where
    C::Database: HasTree,
{
    <C::Database as HasTree>::TREE
}

pub(super) trait HasTree {
    const TREE: &'static TreeSql;
}

impl HasTree for sqlx::Sqlite {
    const TREE: &'static TreeSql = &SQLITE_TREE;
}

impl HasTree for sqlx::Postgres {
    const TREE: &'static TreeSql = &PG_TREE;
}

/// The SQLite key of a subtree hash (see [`TreeSql`]).
pub(super) fn node_key(id: &NodeId) -> i64 {
    ((id.leaf_end() << 6) | u64::from(id.level)) as i64
}

/// Hashes of the given nodes, in the given order; a missing node is an error. `$conn` is a
/// SQLite or PostgreSQL connection (a pool connection or a transaction).
macro_rules! fetch_nodes {
    ($conn:expr, $ids:expr) => {
        async {
            let ids: &[$crate::merkle::NodeId] = $ids;
            let mut out: Vec<$crate::merkle::Hash> = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(400) {
                let sql = ($crate::log::tree::tree_sql(&*$conn).select)(chunk.len());
                // Built only from constants and numbered placeholders.
                let mut q = sqlx::query_as::<_, (i64, i64, Vec<u8>)>(sqlx::AssertSqlSafe(sql));
                for id in chunk {
                    q = q.bind(id.leaf_end() as i64).bind(i64::from(id.level));
                }
                let rows = q.fetch_all(&mut *$conn).await?;
                let mut found = std::collections::HashMap::with_capacity(rows.len());
                for (level, leaf_end, hash) in rows {
                    let hash: $crate::merkle::Hash = hash.try_into().map_err(|_| {
                        anyhow::anyhow!("node (level {level}, leaf end {leaf_end}) is not 32 bytes")
                    })?;
                    found.insert((level as u32, leaf_end as u64), hash);
                }
                for id in chunk {
                    match found.get(&(id.level, id.leaf_end())) {
                        Some(h) => out.push(*h),
                        None => anyhow::bail!(
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
            let stale = sqlx::query($crate::log::tree::tree_sql(&*$conn).delete_after)
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
                .bind($crate::subjects::BLOCK as i64)
                .bind(size as i64)
                .execute(&mut *$conn)
                .await?;
            // So does a group's.
            let groups = size / ($crate::subjects::BLOCK * $crate::groups::GROUP_BLOCKS);
            sqlx::query("DELETE FROM audit_block_groups WHERE grp >= $1")
                .bind(groups as i64)
                .execute(&mut *$conn)
                .await?;
            sqlx::query("DELETE FROM audit_group_postings WHERE key >= $1")
                .bind($crate::groups::row_key(groups, 0))
                .execute(&mut *$conn)
                .await?;
            if stale > 0 {
                tracing::warn!(
                    size,
                    stale,
                    "audit store held rows beyond its recorded size; removed them"
                );
            }
            Ok::<_, anyhow::Error>(())
        }
    };
}
pub(super) use {fetch_nodes, remove_stale};
