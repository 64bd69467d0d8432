//! Group summaries: the second level of the audit log's search index, over groups of
//! [`GROUP_BLOCKS`] complete blocks (262,144 entries).
//!
//! A block's summary ([`crate::subjects`]) lets a search skip a block, but a search still
//! reads every block's summary — and a subject search every block's 6 KiB Bloom filter — so
//! its cost grew with the log (74 ms at 10⁷ entries). A group's summary holds, for the group's
//! entries: the agencies they name, the range of their times, and **postings**: for each
//! personal ID, 32 bits of its hash and the blocks of the group that name it, split into
//! [`SHARDS`] rows by the hash's top bits. A subject search reads one small row per group (the
//! shard of the ID's hash), and only the blocks the postings name; an agency or time search
//! reads one row per group and the block summaries of the groups that may match.
//!
//! Built by the block summaries' task when a group's last block is summarised, from the
//! summaries it has just built (which carry the hashes of their blocks' IDs); a group it did
//! not see whole (a restart, an upgrade, another replica's blocks) is built from its leaves,
//! paced like the other background work. Written once per group, appended: nothing on the
//! commit path. Derived from the leaves: a group without a summary is searched block by block
//! as before, and a 32-bit hash that two IDs share only makes a search scan a block that does
//! not name the ID (its leaves are checked), never miss one that does.

use std::collections::BTreeSet;

use crate::subjects::{MATCH_ALL, Summary};

/// Blocks per group. Stored summaries depend on it (and on [`SHARDS`]): changing either needs
/// the group tables emptied (they are rebuilt from the leaves). This crate's unit tests use
/// groups of two blocks, so that a few thousand entries make several groups.
#[cfg(not(test))]
pub const GROUP_BLOCKS: u64 = 64;
#[cfg(test)]
pub const GROUP_BLOCKS: u64 = 2;

/// Postings rows per group, by the top bits of an ID's first hash.
pub const SHARDS: u64 = 1_024;

/// Entries per chunk, what a posting points at: a search by ID scans the chunks its postings
/// name, not whole blocks.
pub const CHUNK: u64 = 256;

/// Chunks per block.
pub const BLOCK_CHUNKS: u64 = crate::subjects::BLOCK / CHUNK;

/// Postings format tag (first byte of a row).
const FORMAT: u8 = 1;

/// Bytes per posting: 32 bits of the hash, the chunk's offset in its group (both
/// little-endian).
const POSTING: usize = 6;

/// The shard and the 32-bit key of an ID whose first hash is `h1` (disjoint bits).
pub(crate) fn shard_key(h1: u64) -> (u64, u32) {
    (h1 >> 54, (h1 >> 22) as u32)
}

/// The stored key of a group's shard.
pub(crate) fn row_key(group: u64, shard: u64) -> i64 {
    (group * SHARDS + shard) as i64
}

/// A group's summary, as stored: `indexed` only when every block of it was summarised exactly
/// (a block with a leaf that does not decode makes the group searched block by block).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupSummary {
    pub group: u64,
    pub indexed: bool,
    /// Sorted and distinct; `None`: unknown (a block summarised by an older build).
    pub agencies: Option<Vec<String>>,
    pub time: Option<(i64, i64)>,
    /// (stored key, postings row) of each shard, in key order; none when not `indexed`.
    pub postings: Vec<(i64, Vec<u8>)>,
}

impl GroupSummary {
    /// The stored `agencies` column: a JSON array, or NULL when unknown.
    pub(crate) fn agencies_column(&self) -> Option<String> {
        crate::subjects::agencies_column(self.agencies.as_deref())
    }
}

/// A group's summary as its blocks' summaries come, in block order.
pub(crate) struct GroupBuilder {
    pub group: u64,
    /// The offset of the next block this builder needs.
    next: u64,
    /// (ID hash, chunk offset in the group) of every block so far.
    pairs: Vec<(u64, u16)>,
    agencies: Option<BTreeSet<String>>,
    time: Option<(i64, i64)>,
    exact: bool,
}

impl GroupBuilder {
    pub fn new(group: u64) -> Self {
        Self {
            group,
            next: 0,
            pairs: Vec::new(),
            agencies: Some(BTreeSet::new()),
            time: None,
            exact: true,
        }
    }

    /// Adds the summary of `block`; false (nothing added) when it is not the group's next.
    pub fn add(&mut self, block: u64, s: &Summary) -> bool {
        if self.complete() || block != self.group * GROUP_BLOCKS + self.next {
            return false;
        }
        let offset = self.next;
        self.next += 1;
        if s.filter == MATCH_ALL {
            self.exact = false;
        }
        let first = (offset * BLOCK_CHUNKS) as u16;
        self.pairs.extend(
            s.ids
                .iter()
                .map(|(h, chunk)| (*h, first + u16::from(*chunk))),
        );
        match (&mut self.agencies, &s.agencies) {
            (Some(all), Some(these)) => all.extend(these.iter().cloned()),
            _ => self.agencies = None,
        }
        // A block of unknown times makes the group's unknown too.
        self.time = match (self.time, s.time) {
            (_, t) if offset == 0 => t,
            (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
            _ => None,
        };
        true
    }

    /// The block this builder needs next.
    pub fn next_block(&self) -> u64 {
        self.group * GROUP_BLOCKS + self.next
    }

    /// Whether every block of the group has been added.
    pub fn complete(&self) -> bool {
        self.next == GROUP_BLOCKS
    }

    pub fn finish(mut self) -> GroupSummary {
        let mut postings = Vec::new();
        if self.exact {
            self.pairs
                .sort_unstable_by_key(|(h, off)| (shard_key(*h), *off));
            self.pairs.dedup_by_key(|(h, off)| (shard_key(*h), *off));
            let mut at = 0;
            // Every shard has its row, empty ones too: a missing row means "unknown" (the
            // group's blocks are searched one by one), never "nobody".
            for shard in 0..SHARDS {
                let mut row = vec![FORMAT];
                while at < self.pairs.len() && shard_key(self.pairs[at].0).0 == shard {
                    let (h, off) = self.pairs[at];
                    row.extend_from_slice(&shard_key(h).1.to_le_bytes());
                    row.extend_from_slice(&off.to_le_bytes());
                    at += 1;
                }
                postings.push((row_key(self.group, shard), row));
            }
        }
        GroupSummary {
            group: self.group,
            indexed: self.exact,
            agencies: self.agencies.map(|a| a.into_iter().collect()),
            time: self.time,
            postings,
        }
    }
}

/// The offsets, within its group, of the chunks a postings row says may name the ID with
/// hash key `key` (sorted, distinct); `None` when the row's format is unknown (every block
/// of the group is to be searched).
pub(crate) fn offsets_in(row: &[u8], key: u32) -> Option<Vec<u16>> {
    let [FORMAT, postings @ ..] = row else {
        return None;
    };
    if !postings.len().is_multiple_of(POSTING) {
        return None;
    }
    let n = postings.len() / POSTING;
    let key_at = |i: usize| {
        let p = &postings[i * POSTING..i * POSTING + 4];
        u32::from_le_bytes([p[0], p[1], p[2], p[3]])
    };
    // The first posting of `key` (postings are sorted by key, then offset).
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if key_at(mid) < key {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let mut out = Vec::new();
    while lo < n && key_at(lo) == key {
        let p = &postings[lo * POSTING + 4..lo * POSTING + 6];
        out.push(u16::from_le_bytes([p[0], p[1]]));
        lo += 1;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subjects::{BLOCK, hashes};

    fn block_of(ids: &[&str], agency: &str, t: i64) -> Summary {
        let mut s = Summary::unknown();
        s.filter = vec![1, 8, 0];
        // Each in the block's chunk 3 (a chunk's offset in its group is the block's times
        // the chunks per block, plus 3).
        s.ids = ids.iter().map(|id| (hashes(id).0, 3)).collect();
        s.agencies = Some(vec![agency.to_owned()]);
        s.time = Some((t, t + 1));
        s
    }

    /// The blocks (offsets in the group) a group's postings name for `id`.
    fn lookup(g: &GroupSummary, id: &str) -> Vec<u8> {
        let (shard, key) = shard_key(hashes(id).0);
        let k = row_key(g.group, shard);
        let chunks = g
            .postings
            .iter()
            .find(|(rk, _)| *rk == k)
            .map(|(_, row)| offsets_in(row, key).unwrap())
            .unwrap_or_default();
        assert!(chunks.iter().all(|c| u64::from(*c) % BLOCK_CHUNKS == 3));
        chunks
            .into_iter()
            .map(|c| (u64::from(c) / BLOCK_CHUNKS) as u8)
            .collect()
    }

    #[test]
    fn postings_name_exactly_the_blocks_of_each_id() {
        let mut b = GroupBuilder::new(3);
        for off in 0..GROUP_BLOCKS {
            let block = 3 * GROUP_BLOCKS + off;
            let ids: Vec<String> = (0..50)
                .map(|i| format!("0311{:08}", i * 97 + off))
                .collect();
            let mut refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            if off % 2 == 0 {
                refs.push("031200000001");
            }
            assert!(b.add(
                block,
                &block_of(&refs, "registry-hp", (block * BLOCK) as i64)
            ));
        }
        assert!(b.complete());
        assert!(
            !b.add(4 * GROUP_BLOCKS, &block_of(&[], "x", 0)),
            "past the group"
        );
        let g = b.finish();
        assert!(g.indexed);
        assert_eq!(g.agencies.as_deref(), Some(&["registry-hp".to_owned()][..]));
        assert_eq!(
            g.time,
            Some((
                (3 * GROUP_BLOCKS * BLOCK) as i64,
                (4 * GROUP_BLOCKS - 1) as i64 * BLOCK as i64 + 1
            ))
        );
        let even: Vec<u8> = (0..GROUP_BLOCKS as u8).filter(|o| o % 2 == 0).collect();
        assert_eq!(lookup(&g, "031200000001"), even);
        let last = GROUP_BLOCKS - 1;
        assert_eq!(
            lookup(&g, &format!("0311{:08}", 5 * 97 + last)),
            vec![last as u8]
        );
        assert!(lookup(&g, "099999999999").is_empty());
        // Every shard's row, the group's keys, in order.
        assert_eq!(g.postings.len() as u64, SHARDS);
        assert!(g.postings.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(g.postings.iter().all(|(k, _)| *k as u64 / SHARDS == 3));
    }

    #[test]
    fn a_group_not_seen_whole_or_with_an_unreadable_block_is_not_indexed() {
        let mut b = GroupBuilder::new(0);
        assert!(
            !b.add(1, &block_of(&["a"], "x", 0)),
            "starts at its first block"
        );
        for block in 0..GROUP_BLOCKS {
            let mut s = block_of(&["031200000001"], "x", 0);
            if block == GROUP_BLOCKS - 1 {
                s = Summary::unknown();
            }
            assert!(b.add(block, &s));
        }
        let g = b.finish();
        assert!(!g.indexed);
        assert!(g.postings.is_empty());
        assert_eq!(g.agencies, None, "a block of unknown agencies");
        assert_eq!(g.time, None);
    }

    #[test]
    fn rows_of_an_unknown_format_search_everything() {
        assert_eq!(offsets_in(&[2, 0, 0, 0, 0, 1, 0], 0), None);
        assert_eq!(offsets_in(&[FORMAT, 0, 0], 0), None);
        assert_eq!(offsets_in(&[FORMAT], 7), Some(vec![]));
    }

    proptest::proptest! {
        #[test]
        fn every_id_put_in_is_found_in_its_blocks(
            blocks in proptest::collection::vec(proptest::collection::vec("[0-9]{12}", 0..400), GROUP_BLOCKS as usize)
        ) {
            let mut b = GroupBuilder::new(1);
            for (off, ids) in blocks.iter().enumerate() {
                let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
                proptest::prop_assert!(b.add(GROUP_BLOCKS + off as u64, &block_of(&refs, "a", 0)));
            }
            let g = b.finish();
            for (off, ids) in blocks.iter().enumerate() {
                for id in ids {
                    proptest::prop_assert!(lookup(&g, id).contains(&(off as u8)));
                }
            }
        }
    }
}
