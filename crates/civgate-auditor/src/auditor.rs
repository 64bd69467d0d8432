//! The auditor's side (`civgate audit …`): fetch and check checkpoints, entries and proofs
//! without trusting the gateway. `verify` recomputes the root from every entry, checks the
//! signature, checks consistency with the last checkpoint this auditor verified (kept in a
//! local state file), and names the first bad index when something is wrong.

use std::path::Path;

use anyhow::{Context, Result};
use base64::{Engine, engine::general_purpose::STANDARD};
use prost::Message;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::pb::v1::{
    AuditRecord, GetCheckpointRequest, GetConsistencyProofRequest, GetEntriesRequest,
    GetInclusionProofRequest, SearchEntriesRequest, audit_client::AuditClient,
};
use crate::{
    merkle::{CompactRange, Hash, leaf_hash, verify_consistency_bytes, verify_inclusion_bytes},
    note::{Checkpoint, Verifier},
};

/// What an auditor remembers between runs: the last checkpoint it verified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub origin: String,
    pub size: u64,
    /// Base64 root hash.
    pub root: String,
    pub verified_at_unix_ms: i64,
}

impl SavedState {
    pub fn load(path: &Path) -> Result<Option<Self>> {
        match std::fs::read_to_string(path) {
            Ok(s) => Ok(Some(serde_json::from_str(&s).with_context(|| {
                format!("{} is not a verify state file", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    fn root_hash(&self) -> Vec<u8> {
        STANDARD.decode(&self.root).unwrap_or_default()
    }
}

/// Why a log failed verification; each names where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Finding {
    #[error("checkpoint signature: {0}")]
    BadCheckpoint(String),
    #[error("entry {index} is missing")]
    Missing { index: u64 },
    #[error("entry {index} does not decode as an audit record")]
    Undecodable { index: u64 },
    #[error("entry {index} is out of place: it says it is entry {claims} (deleted or reordered)")]
    OutOfPlace { index: u64, claims: u64 },
    #[error(
        "entry {index} has been altered: the entries do not hash to the signed checkpoint's root"
    )]
    Altered { index: u64 },
    #[error(
        "the entries do not hash to the signed checkpoint's root (run online to locate the first bad entry)"
    )]
    RootMismatch,
    #[error(
        "the log was truncated: {had} entries were verified before, the checkpoint now says {now}"
    )]
    Truncated { had: u64, now: u64 },
    #[error("history rewritten: {0}")]
    Rewritten(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub size: u64,
    pub root: Hash,
    pub previous: Option<u64>,
}

fn prefix_root(hashes: &[Hash], n: usize) -> Hash {
    let mut r = CompactRange::default();
    for h in &hashes[..n] {
        r.push(*h);
    }
    r.root()
}

/// Source of consistency proofs (the gateway, online); offline there is none.
pub struct Online {
    pub client: AuditClient<Channel>,
}

impl Online {
    pub fn new(channel: Channel) -> Self {
        Self {
            client: AuditClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
        }
    }

    pub async fn checkpoint(
        &mut self,
        verifier: &Verifier,
    ) -> Result<(String, Checkpoint), Finding> {
        let note = self
            .client
            .get_checkpoint(GetCheckpointRequest {})
            .await
            .map_err(|e| Finding::BadCheckpoint(format!("could not fetch: {}", e.message())))?
            .into_inner()
            .checkpoint;
        let cp = open_checkpoint(&note, verifier)?;
        Ok((note, cp))
    }

    /// Entries `[0, size)` page by page, in order: `each(start, page)`. Only one page is held
    /// at a time, so a log of any length can be read.
    pub async fn pages(
        &mut self,
        size: u64,
        mut each: impl FnMut(u64, Vec<Vec<u8>>) -> Result<()>,
    ) -> Result<()> {
        let mut start = 0u64;
        while start < size {
            let r = self
                .client
                .get_entries(GetEntriesRequest { start, end: size })
                .await;
            match r {
                Ok(r) => {
                    let page = r.into_inner().entries;
                    if page.is_empty() {
                        return Err(Finding::Missing { index: start }.into());
                    }
                    let n = page.len() as u64;
                    each(start, page)?;
                    start += n;
                }
                Err(s) if s.code() == tonic::Code::DataLoss => {
                    let index = s
                        .message()
                        .split_whitespace()
                        .find_map(|w| w.parse::<u64>().ok())
                        .unwrap_or(start);
                    return Err(Finding::Missing { index }.into());
                }
                Err(s) => return Err(anyhow::anyhow!("GetEntries: {}", s.message())),
            }
        }
        Ok(())
    }

    /// The leaf hashes of entries `[0, size)`, each entry checked on the way (it decodes and
    /// names its own index); the entries themselves are not kept.
    pub(crate) async fn leaf_hashes(&mut self, size: u64) -> Result<Vec<Hash>> {
        let mut hashes = Vec::with_capacity(size as usize);
        self.pages(size, |start, page| {
            for (k, leaf) in page.iter().enumerate() {
                hashes.push(checked_leaf(start + k as u64, leaf)?);
            }
            Ok(())
        })
        .await?;
        Ok(hashes)
    }

    async fn consistency(&mut self, first: u64, second: u64) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .client
            .get_consistency_proof(GetConsistencyProofRequest { first, second })
            .await
            .map_err(|s| anyhow::anyhow!("GetConsistencyProof: {}", s.message()))?
            .into_inner()
            .hashes)
    }

    pub async fn inclusion(&mut self, index: u64, tree_size: u64) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .client
            .get_inclusion_proof(GetInclusionProofRequest { index, tree_size })
            .await
            .map_err(|s| anyhow::anyhow!("GetInclusionProof: {}", s.message()))?
            .into_inner()
            .hashes)
    }

    pub async fn search(&mut self, req: SearchEntriesRequest) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut req = req;
        let mut out = Vec::new();
        loop {
            let r = self
                .client
                .search_entries(req.clone())
                .await
                .map_err(|s| anyhow::anyhow!("SearchEntries: {}", s.message()))?
                .into_inner();
            out.extend(r.entries.into_iter().map(|e| (e.index, e.leaf)));
            if r.next_page_token.is_empty() || out.len() >= 10_000 {
                return Ok(out);
            }
            req.page_token = r.next_page_token;
        }
    }
}

pub fn open_checkpoint(note: &str, verifier: &Verifier) -> Result<Checkpoint, Finding> {
    let text = verifier
        .open(note)
        .map_err(|e| Finding::BadCheckpoint(e.to_string()))?;
    Checkpoint::parse(text).map_err(|e| Finding::BadCheckpoint(e.to_string()))
}

/// The leaf hash of entry `index`, after checking that it decodes and names that index.
fn checked_leaf(index: u64, leaf: &[u8]) -> Result<Hash> {
    let rec = AuditRecord::decode(leaf).map_err(|_| Finding::Undecodable { index })?;
    if rec.index != index {
        return Err(Finding::OutOfPlace {
            index,
            claims: rec.index,
        }
        .into());
    }
    Ok(leaf_hash(leaf))
}

/// Checks the entries' leaf hashes (each entry already checked by [`checked_leaf`]) against a
/// verified checkpoint and the saved state. With `online`, an altered entry is located by
/// asking for consistency proofs (a binary search over prefixes). Holding 32 bytes per entry
/// rather than the entries keeps a long log's verification within memory.
pub async fn check(
    cp: &Checkpoint,
    hashes: &[Hash],
    saved: Option<&SavedState>,
    mut online: Option<&mut Online>,
) -> Result<Report> {
    if (hashes.len() as u64) < cp.size {
        return Err(Finding::Missing {
            index: hashes.len() as u64,
        }
        .into());
    }
    let hashes = &hashes[..cp.size as usize];
    let root = prefix_root(hashes, hashes.len());
    if root != cp.root {
        let Some(online) = online.as_deref_mut() else {
            return Err(Finding::RootMismatch.into());
        };
        // ok(s): the first s entries are a prefix of the signed tree. True up to the first
        // altered entry, false after it.
        let (mut lo, mut hi) = (0u64, cp.size);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let proof = online.consistency(mid, cp.size).await?;
            let ok = verify_consistency_bytes(
                mid,
                cp.size,
                &prefix_root(hashes, mid as usize),
                &cp.root,
                &proof,
            )
            .is_ok();
            if ok {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        return Err(Finding::Altered { index: lo }.into());
    }
    if let Some(saved) = saved {
        if saved.size > cp.size {
            return Err(Finding::Truncated {
                had: saved.size,
                now: cp.size,
            }
            .into());
        }
        if saved.size > 0 {
            if prefix_root(hashes, saved.size as usize).as_slice() != saved.root_hash().as_slice() {
                return Err(Finding::Rewritten(format!(
                    "the first {} entries no longer hash to the root verified before",
                    saved.size
                ))
                .into());
            }
            if let Some(online) = online {
                let proof = if saved.size == cp.size {
                    Vec::new()
                } else {
                    online.consistency(saved.size, cp.size).await?
                };
                verify_consistency_bytes(saved.size, cp.size, &saved.root_hash(), &cp.root, &proof).map_err(|e| {
                    Finding::Rewritten(format!(
                        "the new checkpoint (size {}) is not consistent with the one verified before (size {}): {e}",
                        cp.size, saved.size
                    ))
                })?;
            }
        }
    }
    Ok(Report {
        size: cp.size,
        root,
        previous: saved.map(|s| s.size),
    })
}

/// `civgate audit verify`, online.
pub async fn verify_online(
    online: &mut Online,
    verifier: &Verifier,
    state: &Path,
) -> Result<Report> {
    let (_, cp) = online.checkpoint(verifier).await?;
    let saved = SavedState::load(state)?;
    if let Some(s) = &saved
        && s.origin != cp.origin
    {
        anyhow::bail!(
            "{} holds state for log {:?}, not {:?}",
            state.display(),
            s.origin,
            cp.origin
        );
    }
    let hashes = online.leaf_hashes(cp.size).await?;
    let report = check(&cp, &hashes, saved.as_ref(), Some(online)).await?;
    save(state, &cp)?;
    Ok(report)
}

fn save(state: &Path, cp: &Checkpoint) -> Result<()> {
    SavedState {
        origin: cp.origin.clone(),
        size: cp.size,
        root: STANDARD.encode(cp.root),
        verified_at_unix_ms: crate::now_ms(),
    }
    .save(state)
}

/// One line of an export file.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum ExportLine {
    Checkpoint {
        checkpoint: String,
    },
    Entry {
        index: u64,
        leaf: String,
        /// The leaf decoded, for log tools (`--format jsonl-decoded`); never what is verified.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        record: Option<serde_json::Value>,
    },
}

/// An audit record as a JSON object: its fields (identifiers and names only), the time also
/// in RFC 3339.
pub(crate) fn record_json(index: u64, leaf: &[u8]) -> Option<serde_json::Value> {
    let r = AuditRecord::decode(leaf).ok()?;
    let time =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.time_unix_ms) * 1_000_000)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
    Some(serde_json::json!({
        "index": index,
        "time": time,
        "time_unix_ms": r.time_unix_ms,
        "agency_id": r.agency_id,
        "role": r.role,
        "cert_fingerprint": r.cert_fingerprint,
        "method": r.method,
        "purpose": r.purpose,
        "case_reference": r.case_reference,
        "subject_personal_ids": r.subject_personal_ids,
        "fields_returned": r.fields_returned,
        "outcome": r.outcome,
        "detail": r.detail,
        "request_id": r.request_id,
        "latency_us": r.latency_us,
    }))
}

/// `civgate audit export`: the signed checkpoint, then every entry, as JSON Lines.
pub async fn export(
    online: &mut Online,
    verifier: &Verifier,
    out: &mut dyn std::io::Write,
    decoded: bool,
) -> Result<u64> {
    let (note, cp) = online.checkpoint(verifier).await?;
    writeln!(
        out,
        "{}",
        serde_json::to_string(&ExportLine::Checkpoint { checkpoint: note })?
    )?;
    online
        .pages(cp.size, |start, page| {
            for (k, l) in page.iter().enumerate() {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(&ExportLine::Entry {
                        index: start + k as u64,
                        leaf: STANDARD.encode(l),
                        record: decoded.then(|| record_json(start + k as u64, l)).flatten(),
                    })?
                )?;
            }
            Ok(())
        })
        .await?;
    Ok(cp.size)
}

/// `civgate audit verify --export FILE`: offline.
pub async fn verify_export(path: &Path, verifier: &Verifier, state: &Path) -> Result<Report> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let read =
        |l: std::io::Result<String>| l.with_context(|| format!("reading {}", path.display()));
    let mut lines = std::io::BufReader::new(file).lines();
    let first = lines.next().map(read).transpose()?;
    let Some(Ok(ExportLine::Checkpoint { checkpoint })) =
        first.map(|l| serde_json::from_str::<ExportLine>(&l))
    else {
        anyhow::bail!("{}: the first line must be the checkpoint", path.display());
    };
    let cp = open_checkpoint(&checkpoint, verifier)?;
    // Entries past the checkpoint's size are not part of the signed tree and are not read.
    let mut hashes = Vec::new();
    for (n, line) in lines.take(cp.size as usize).enumerate() {
        match serde_json::from_str::<ExportLine>(&read(line)?) {
            Ok(ExportLine::Entry { index, leaf, .. }) => {
                if index != n as u64 {
                    return Err(Finding::Missing { index: n as u64 }.into());
                }
                let leaf = STANDARD
                    .decode(leaf)
                    .map_err(|_| Finding::Undecodable { index })?;
                hashes.push(checked_leaf(index, &leaf)?);
            }
            _ => anyhow::bail!("{}: line {} is not an entry", path.display(), n + 2),
        }
    }
    let saved = SavedState::load(state)?;
    let report = check(&cp, &hashes, saved.as_ref(), None).await?;
    save(state, &cp)?;
    Ok(report)
}

/// Checks that entry `index` is in the signed tree; returns the decoded record.
pub async fn prove(
    online: &mut Online,
    verifier: &Verifier,
    index: u64,
) -> Result<(Checkpoint, AuditRecord)> {
    let (_, cp) = online.checkpoint(verifier).await?;
    anyhow::ensure!(
        index < cp.size,
        "index {index} is not in the log (size {})",
        cp.size
    );
    let leaf = online
        .client
        .get_entries(GetEntriesRequest {
            start: index,
            end: index + 1,
        })
        .await
        .map_err(|s| anyhow::anyhow!("GetEntries: {}", s.message()))?
        .into_inner()
        .entries
        .pop()
        .context("no entry returned")?;
    let proof = online.inclusion(index, cp.size).await?;
    verify_inclusion_bytes(index, cp.size, &leaf_hash(&leaf), &proof, &cp.root)
        .map_err(|e| anyhow::anyhow!("entry {index} is NOT proven in the signed tree: {e}"))?;
    let rec = AuditRecord::decode(leaf.as_slice()).map_err(|_| Finding::Undecodable { index })?;
    anyhow::ensure!(
        rec.index == index,
        Finding::OutOfPlace {
            index,
            claims: rec.index
        }
    );
    Ok((cp, rec))
}

/// A readable table of audit records. The detail (why a call was refused; which events of
/// which consumer group a delivery record covers) ends the line, in brackets, when there is one.
pub fn table(records: &[AuditRecord]) -> String {
    let mut out = format!(
        "{:>7}  {:<24} {:<14} {:<36} {:<22} {:<18} {}\n",
        "index", "time (UTC)", "agency", "method", "purpose", "outcome", "fields [detail]"
    );
    for r in records {
        let t =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.time_unix_ms) * 1_000_000)
                .map(|t| {
                    format!(
                        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                        t.year(),
                        u8::from(t.month()),
                        t.day(),
                        t.hour(),
                        t.minute(),
                        t.second()
                    )
                })
                .unwrap_or_default();
        let method = r
            .method
            .rsplit('/')
            .take(2)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("/");
        let method = method.trim_start_matches("civgate.v1.");
        let detail = if r.detail.is_empty() {
            String::new()
        } else {
            format!(" [{}]", r.detail)
        };
        out.push_str(&format!(
            "{:>7}  {:<24} {:<14} {:<36} {:<22} {:<18} {}{}\n",
            r.index,
            t,
            r.agency_id,
            method,
            r.purpose,
            r.outcome,
            r.fields_returned.join(","),
            detail
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_a_records_detail_when_it_has_one() {
        let delivery = AuditRecord {
            index: 12,
            time_unix_ms: 1_795_000_000_000,
            agency_id: "population".into(),
            method: "/civgate.v1.Exchange/Subscribe".into(),
            outcome: "OK".into(),
            fields_returned: vec!["event:birth".into(), "event:death".into()],
            detail: "delivered:civil-status:population-db:1-2".into(),
            ..AuditRecord::default()
        };
        let read = AuditRecord {
            index: 13,
            method: "/civgate.v1.Citizens/GetCitizen".into(),
            fields_returned: vec!["full_name".into()],
            ..AuditRecord::default()
        };
        let t = table(&[delivery, read]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].ends_with("fields [detail]"), "{t}");
        assert!(lines[1].contains("Exchange/Subscribe"), "{t}");
        assert!(
            lines[1]
                .ends_with("event:birth,event:death [delivered:civil-status:population-db:1-2]"),
            "{t}"
        );
        assert!(lines[2].ends_with("full_name"), "{t}");
    }
}
