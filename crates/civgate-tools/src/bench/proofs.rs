//! `bench audit-proofs`: appends through the real writer, then times proofs and searches.

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};

#[derive(Args, Clone, Debug)]
pub struct AuditProofArgs {
    /// Entries the log must hold (appended through the real group-commit writer).
    #[arg(long, default_value_t = 1_000_000)]
    pub entries: u64,
    /// The gateway data directory (its `civgate.sqlite` holds the audit log).
    #[arg(long)]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "certs/audit.key")]
    pub signing_key: PathBuf,
    /// Proofs of each kind to time.
    #[arg(long, default_value_t = 10_000)]
    pub queries: u32,
}

pub(super) async fn audit_proofs(a: &AuditProofArgs) -> Result<()> {
    use crate::audit::{AuditLog, log::Options, note::Signer};
    let key = std::fs::read_to_string(&a.signing_key)
        .with_context(|| format!("reading {}", a.signing_key.display()))?;
    let (healthy, _) = tokio::sync::watch::channel(true);
    let log = AuditLog::open(Options {
        store: &crate::store::Store::Sqlite(a.data_dir.clone()),
        signer: Signer::parse(&key)?,
        origin: crate::certs::AUDIT_KEY_NAME.into(),
        checkpoint_interval: Duration::from_secs(1),
        commit_timeout: Duration::from_secs(30),
        healthy,
    })
    .await?;
    let have = log.size();
    if have < a.entries {
        let started = Instant::now();
        let todo = a.entries - have;
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for t in 0..256u64 {
            let (log, next) = (log.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= todo {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let rec = crate::pb::v1::AuditRecord {
                        time_unix_ms: crate::audit::log::now_ms(),
                        // One entry in 1,000 from a rare agency (searched for below).
                        agency_id: if n % 1_000 == 0 {
                            "registry-rare".into()
                        } else {
                            "registry-hp".into()
                        },
                        role: "civil_registry".into(),
                        cert_fingerprint: "ab".repeat(32),
                        method: "/civgate.v1.Citizens/GetCitizen".into(),
                        purpose: "IDENTITY_VERIFICATION".into(),
                        subject_personal_ids: vec![format!(
                            "031{:09}",
                            (n * 7919 + t) % 1_000_000_000
                        )],
                        fields_returned: vec!["personal_id".into(), "full_name".into()],
                        outcome: "OK".into(),
                        request_id: format!("{n:032x}"),
                        latency_us: 500,
                        ..Default::default()
                    };
                    log.append(rec).await?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "appended {todo} entries in {secs:.1} s ({:.0} durable appends/s, 256 in flight)",
            todo as f64 / secs
        );
    }
    let size = log.size();
    println!("log size {size}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let mut inc =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut con = inc.clone();
    for _ in 0..a.queries {
        let i = rng.random_range(0..size);
        let t = Instant::now();
        let p = log.inclusion_proof(i, size).await?;
        let _ = inc.record(t.elapsed().as_micros().max(1) as u64);
        anyhow::ensure!(!p.is_empty() || size == 1);
        let first = rng.random_range(1..=size);
        let t = Instant::now();
        log.consistency_proof(first, size).await?;
        let _ = con.record(t.elapsed().as_micros().max(1) as u64);
    }
    // Searches by subject: the subject filters of every complete block first (built in the
    // background), then citizens who are in the log and citizens who are not.
    let blocks = size / crate::audit::subjects::BLOCK;
    let started = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(600),
        log.filtered_blocks().wait_for(|b| *b >= blocks),
    )
    .await
    .context("subject filters not built within 10 minutes")??;
    println!(
        "subject filters of {blocks} blocks ready {:.1} s after open",
        started.elapsed().as_secs_f64()
    );
    // And the summaries of every complete group of blocks (built from the leaves where this
    // process did not append the whole group: allow for reading them back).
    let groups = blocks / crate::audit::groups::GROUP_BLOCKS;
    tokio::time::timeout(
        Duration::from_secs(3_600),
        log.grouped().wait_for(|g| *g >= groups),
    )
    .await
    .context("group summaries not built within an hour")??;
    println!(
        "group summaries of {groups} groups ready {:.1} s after open",
        started.elapsed().as_secs_f64()
    );
    let mut found =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut absent = found.clone();
    for q in 0..(a.queries / 20).max(10) {
        let present = q % 2 == 0;
        let id = if present {
            // An entry's own subject (as appended above, or by any earlier run).
            let i = rng.random_range(0..size);
            let leaf = log.entries(i, i + 1).await?;
            let rec = <crate::pb::v1::AuditRecord as prost::Message>::decode(leaf[0].as_slice())?;
            let Some(id) = rec.subject_personal_ids.first().cloned() else {
                continue;
            };
            id
        } else {
            format!("09{:010}", rng.random_range(0..10_000_000_000u64))
        };
        let t = Instant::now();
        let rows = log
            .search(&crate::audit::Filter {
                subject: Some(id),
                limit: 100,
                ..Default::default()
            })
            .await?;
        let h = if present { &mut found } else { &mut absent };
        let _ = h.record(t.elapsed().as_micros().max(1) as u64);
        anyhow::ensure!(
            rows.is_empty() != present,
            "search for {present:?} subject wrong"
        );
    }
    // Searches by agency and by time, from a random entry on: the next 10 entries of the rare
    // agency, an agency that never called, and the entries of one millisecond.
    let mut rare = found.clone();
    rare.reset();
    let (mut nobody, mut moment) = (rare.clone(), rare.clone());
    for _ in 0..(a.queries / 20).max(10) {
        let after = rng.random_range(0..size);
        let leaf = log.entries(after, after + 1).await?;
        let time = <crate::pb::v1::AuditRecord as prost::Message>::decode(leaf[0].as_slice())?
            .time_unix_ms;
        for (h, agency, window) in [
            (&mut rare, Some("registry-rare"), None),
            (&mut nobody, Some("registry-none"), None),
            (&mut moment, None, Some((time, time + 1))),
        ] {
            let t = Instant::now();
            let rows = log
                .search(&crate::audit::Filter {
                    agency: agency.map(Into::into),
                    from_ms: window.map(|w| w.0),
                    to_ms: window.map(|w| w.1),
                    after: if window.is_some() { 0 } else { after },
                    limit: 10,
                    ..Default::default()
                })
                .await?;
            let _ = h.record(t.elapsed().as_micros().max(1) as u64);
            anyhow::ensure!(
                window.is_none() || !rows.is_empty(),
                "search by time missed entry {after}"
            );
        }
    }
    for (name, h) in [
        ("subject found", &found),
        ("subject absent", &absent),
        ("agency rare", &rare),
        ("agency absent", &nobody),
        ("one ms", &moment),
    ] {
        println!(
            "{name:<14} searches on {size} entries: p50 {} µs, p99 {} µs, max {} µs ({} queries)",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max(),
            h.len()
        );
    }
    for (name, h) in [("inclusion", &inc), ("consistency", &con)] {
        println!(
            "{name:<12} proofs on {size} entries: p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs ({} queries)",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max(),
            h.len()
        );
    }
    Ok(())
}
