//! RFC 9162 Merkle tree arithmetic: hashing (SHA-256, leaf prefix 0x00, node prefix 0x01),
//! which subtrees make up inclusion and consistency proofs, their verification, and the
//! compact range the writer keeps to append in O(log n). No I/O: the store supplies the
//! hashes of perfect subtrees by (level, index).

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

pub(crate) fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree: SHA-256 of nothing.
pub(crate) fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Largest power of two strictly less than `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// A perfect subtree: leaves `[index << level, (index + 1) << level)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId {
    pub level: u32,
    pub index: u64,
}

impl NodeId {
    /// One past the last leaf this subtree covers: the log size at which it became complete.
    /// Stores key subtree hashes by `(leaf_end, level)`, so the hashes one append completes sit
    /// together at the end of the key space instead of at the end of every level.
    pub fn leaf_end(&self) -> u64 {
        (self.index + 1) << self.level
    }
}

/// The perfect subtrees covering `[start, end)` left to right, for a range that starts at a
/// multiple of its largest power-of-two part (every range inside an RFC 9162 proof does).
pub fn decompose(start: u64, end: u64) -> Vec<NodeId> {
    let mut out = Vec::new();
    let mut s = start;
    while s < end {
        let remaining = end - s;
        let mut level = 63 - remaining.leading_zeros();
        // Alignment: a subtree at level L must start at a multiple of 2^L.
        while level > 0 && !s.is_multiple_of(1u64 << level) {
            level -= 1;
        }
        out.push(NodeId {
            level,
            index: s >> level,
        });
        s += 1 << level;
    }
    out
}

/// MTH of a range from the hashes of its `decompose` parts (in that order).
pub fn fold_range(parts: &[Hash]) -> Option<Hash> {
    let (last, rest) = parts.split_last()?;
    Some(rest.iter().rev().fold(*last, |acc, h| node_hash(h, &acc)))
}

/// The ranges whose MTHs form the inclusion proof of leaf `index` in a tree of `size`
/// (RFC 9162 §2.1.3.1), in proof order.
pub fn inclusion_ranges(index: u64, size: u64) -> Vec<(u64, u64)> {
    fn path(m: u64, start: u64, n: u64, out: &mut Vec<(u64, u64)>) {
        if n <= 1 {
            return;
        }
        let k = split(n);
        if m < k {
            path(m, start, k, out);
            out.push((start + k, start + n));
        } else {
            path(m - k, start + k, n - k, out);
            out.push((start, start + k));
        }
    }
    let mut out = Vec::new();
    if index < size {
        path(index, 0, size, &mut out);
    }
    out
}

/// The ranges whose MTHs form the consistency proof between sizes `first` < `second`
/// (RFC 9162 §2.1.4.1), in proof order.
pub fn consistency_ranges(first: u64, second: u64) -> Vec<(u64, u64)> {
    fn sub(m: u64, start: u64, n: u64, complete: bool, out: &mut Vec<(u64, u64)>) {
        if m == n {
            if !complete {
                out.push((start, start + n));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            sub(m, start, k, complete, out);
            out.push((start + k, start + n));
        } else {
            sub(m - k, start + k, n - k, false, out);
            out.push((start, start + k));
        }
    }
    let mut out = Vec::new();
    if 0 < first && first < second {
        sub(first, 0, second, true, &mut out);
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("index {index} is not below tree size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("sizes {first} and {second} cannot be proven consistent")]
    BadSizes { first: u64, second: u64 },
    #[error("proof has the wrong length")]
    WrongLength,
    #[error("proof does not lead to the expected root")]
    RootMismatch,
    #[error("a hash is not 32 bytes")]
    BadHashLength,
}

/// RFC 9162 §2.1.3.2.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(ProofError::WrongLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::WrongLength);
    }
    if &r != root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// RFC 9162 §2.1.4.2. A proof from size 0 is always refused.
pub(crate) fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if first == 0 || first > second {
        return Err(ProofError::BadSizes { first, second });
    }
    if first == second {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        return if first_root == second_root {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    if proof.is_empty() {
        return Err(ProofError::WrongLength);
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let (mut fn_, mut sn) = (first - 1, second - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return Err(ProofError::WrongLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::WrongLength);
    }
    if &fr != first_root || &sr != second_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

fn as_hash(b: &[u8]) -> Option<Hash> {
    b.try_into().ok()
}

fn as_hashes(proof: &[Vec<u8>]) -> Result<Vec<Hash>, ProofError> {
    proof
        .iter()
        .map(|p| as_hash(p).ok_or(ProofError::BadHashLength))
        .collect()
}

/// [`verify_inclusion`] on bytes from the wire: every hash must be 32 bytes.
pub fn verify_inclusion_bytes(
    index: u64,
    size: u64,
    leaf: &[u8],
    proof: &[Vec<u8>],
    root: &[u8],
) -> Result<(), ProofError> {
    let leaf = as_hash(leaf).ok_or(ProofError::BadHashLength)?;
    let root = as_hash(root).ok_or(ProofError::BadHashLength)?;
    verify_inclusion(index, size, &leaf, &as_hashes(proof)?, &root)
}

/// [`verify_consistency`] on bytes from the wire. For equal sizes only byte equality of the
/// roots matters; otherwise every hash must be 32 bytes.
pub fn verify_consistency_bytes(
    first: u64,
    second: u64,
    first_root: &[u8],
    second_root: &[u8],
    proof: &[Vec<u8>],
) -> Result<(), ProofError> {
    if first != 0 && first == second {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        return if first_root == second_root {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    let a = as_hash(first_root).ok_or(ProofError::BadHashLength)?;
    let b = as_hash(second_root).ok_or(ProofError::BadHashLength)?;
    verify_consistency(first, second, &a, &b, &as_hashes(proof)?)
}

/// The right edge of a growing tree: one perfect-subtree hash per set bit of `size`, largest
/// first. Appending a leaf returns the perfect subtrees it completes (to be stored).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    stack: Vec<Hash>,
}

impl CompactRange {
    /// From the hashes of `decompose(0, size)`.
    pub fn from_parts(size: u64, parts: Vec<Hash>) -> Option<Self> {
        (parts.len() == size.count_ones() as usize).then_some(Self { size, stack: parts })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash; returns every perfect subtree completed, leaf first.
    pub fn push(&mut self, leaf: Hash) -> Vec<(NodeId, Hash)> {
        let index = self.size;
        let mut done = vec![(NodeId { level: 0, index }, leaf)];
        let mut hash = leaf;
        let mut level = 0;
        let mut n = index;
        while n & 1 == 1 {
            // The sibling on the left is the top of the stack.
            let Some(left) = self.stack.pop() else { break };
            hash = node_hash(&left, &hash);
            level += 1;
            n >>= 1;
            done.push((
                NodeId {
                    level,
                    index: index >> level,
                },
                hash,
            ));
        }
        self.stack.push(hash);
        self.size += 1;
        done
    }

    pub fn root(&self) -> Hash {
        fold_range(&self.stack).unwrap_or_else(empty_root)
    }
}

/// The root of a list of leaf hashes (for auditors recomputing from entries).
pub fn root_of(leaves: &[Hash]) -> Hash {
    let mut r = CompactRange::default();
    for l in leaves {
        r.push(*l);
    }
    r.root()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::{Engine, engine::general_purpose::STANDARD};
    use proptest::prelude::*;
    use std::path::Path;

    /// RFC 6962 reference leaves.
    fn reference_leaves() -> Vec<Vec<u8>> {
        [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ]
        .iter()
        .map(|h| hex::decode(h).unwrap())
        .collect()
    }

    /// Reference MTH by the RFC's recursive definition.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    fn range_hash(l: &[Hash], (s, e): (u64, u64)) -> Hash {
        mth(&l[s as usize..e as usize])
    }

    #[test]
    fn reference_roots() {
        let want = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let l: Vec<Hash> = reference_leaves().iter().map(|d| leaf_hash(d)).collect();
        for (i, w) in want.iter().enumerate() {
            assert_eq!(hex::encode(root_of(&l[..=i])), *w, "size {}", i + 1);
        }
        assert_eq!(
            hex::encode(root_of(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    fn bytes(v: &serde_json::Value) -> Vec<u8> {
        STANDARD
            .decode(v.as_str().unwrap_or(""))
            .unwrap_or_default()
    }

    fn b64(v: &serde_json::Value) -> Hash {
        bytes(v).try_into().unwrap()
    }

    fn proof_bytes(v: &serde_json::Value) -> Vec<Vec<u8>> {
        v.as_array()
            .map(|a| a.iter().map(bytes).collect())
            .unwrap_or_default()
    }

    fn proof(v: &serde_json::Value) -> Vec<Hash> {
        v.as_array()
            .map(|a| a.iter().map(b64).collect())
            .unwrap_or_default()
    }

    fn fixtures(kind: &str) -> Vec<(String, serde_json::Value)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/merkle/testdata")
            .join(kind);
        let mut out = Vec::new();
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "json") {
                    let v = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                    out.push((p.display().to_string(), v));
                }
            }
        }
        assert!(!out.is_empty());
        out
    }

    #[test]
    fn inclusion_vectors() {
        let (mut ok, mut refused) = (0, 0);
        for (name, v) in fixtures("inclusion") {
            let want_err = v["wantErr"].as_bool().unwrap();
            let result = verify_inclusion_bytes(
                v["leafIdx"].as_u64().unwrap_or(u64::MAX),
                v["treeSize"].as_u64().unwrap_or(0),
                &bytes(&v["leafHash"]),
                &proof_bytes(&v["proof"]),
                &bytes(&v["root"]),
            );
            assert_eq!(result.is_err(), want_err, "{name}: {result:?}");
            if want_err { refused += 1 } else { ok += 1 }
        }
        assert!(ok >= 5 && refused >= 50, "{ok} {refused}");
    }

    #[test]
    fn consistency_vectors() {
        let (mut ok, mut refused) = (0, 0);
        for (name, v) in fixtures("consistency") {
            let want_err = v["wantErr"].as_bool().unwrap();
            let result = verify_consistency_bytes(
                v["size1"].as_u64().unwrap_or(0),
                v["size2"].as_u64().unwrap_or(0),
                &bytes(&v["root1"]),
                &bytes(&v["root2"]),
                &proof_bytes(&v["proof"]),
            );
            assert_eq!(result.is_err(), want_err, "{name}: {result:?}");
            if want_err { refused += 1 } else { ok += 1 }
        }
        assert!(ok >= 5 && refused >= 50, "{ok} {refused}");
    }

    #[test]
    fn proofs_we_build_match_the_reference_vectors() {
        // Happy-path vectors: our ranges over the reference tree give the same hashes.
        let l: Vec<Hash> = reference_leaves().iter().map(|d| leaf_hash(d)).collect();
        for (name, v) in fixtures("inclusion") {
            if v["wantErr"].as_bool() != Some(false)
                || v["treeSize"].as_u64().unwrap_or(0) > 8
                || v["proof"].is_null()
            {
                continue;
            }
            let (i, n) = (
                v["leafIdx"].as_u64().unwrap(),
                v["treeSize"].as_u64().unwrap(),
            );
            if bytes(&v["leafHash"]) != l[i as usize] {
                continue;
            }
            let ours: Vec<Hash> = inclusion_ranges(i, n)
                .into_iter()
                .map(|r| range_hash(&l, r))
                .collect();
            assert_eq!(ours, proof(&v["proof"]), "{name}");
        }
    }

    proptest! {
        #[test]
        fn built_proofs_verify_and_parts_fold_to_range_hashes(n in 1u64..300, a in 0u64..300, b in 0u64..300) {
            let l = leaves(n);
            let mut cr = CompactRange::default();
            let mut nodes = std::collections::HashMap::new();
            for h in &l {
                for (id, hash) in cr.push(*h) {
                    nodes.insert(id, hash);
                }
            }
            let root = mth(&l);
            prop_assert_eq!(cr.root(), root);
            let from_store = |(s, e): (u64, u64)| {
                let parts: Vec<Hash> = decompose(s, e).iter().map(|id| nodes[id]).collect();
                fold_range(&parts).unwrap()
            };
            let i = a % n;
            let p: Vec<Hash> = inclusion_ranges(i, n).into_iter().map(from_store).collect();
            prop_assert!(verify_inclusion(i, n, &l[i as usize], &p, &root).is_ok());
            // Any other leaf fails.
            let wrong = leaf_hash(b"not in the log");
            prop_assert!(verify_inclusion(i, n, &wrong, &p, &root).is_err());
            let m = 1 + b % n;
            let c: Vec<Hash> = consistency_ranges(m, n).into_iter().map(from_store).collect();
            prop_assert!(verify_consistency(m, n, &mth(&l[..m as usize]), &root, &c).is_ok());
            if m < n {
                let mut forged = l.clone();
                forged[(m - 1) as usize] = wrong;
                prop_assert!(verify_consistency(m, n, &mth(&forged[..m as usize]), &root, &c).is_err());
            }
            // The compact range rebuilt from stored parts continues identically.
            let parts: Vec<Hash> = decompose(0, n).iter().map(|id| nodes[id]).collect();
            prop_assert_eq!(CompactRange::from_parts(n, parts).unwrap(), cr);
        }
    }
}
