//! `civgate audit …`: the auditor's commands.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use prost::Message;

use crate::{
    auditor::{self, Online},
    client,
    note::{Signer, Verifier},
    pb::v1::{AuditRecord, SearchEntriesRequest},
};

#[derive(Args, Clone, Debug)]
pub struct Conn {
    /// The gateway's API address.
    #[arg(long, global = true, default_value = "127.0.0.1:7443")]
    pub addr: SocketAddr,
    #[arg(long, global = true, default_value = "certs")]
    pub certs: PathBuf,
    /// Client certificate under certs/clients (an auditor's).
    #[arg(long, global = true, default_value = "auditor")]
    pub client: String,
    /// The log's verifier key file (`name+id+key`).
    #[arg(long, global = true, default_value = "certs/audit.vkey")]
    pub verifier_key: PathBuf,
    /// Where `verify` remembers the last checkpoint it verified.
    #[arg(long, global = true, default_value = "audit-verify-state.json")]
    pub state: PathBuf,
}

#[derive(Subcommand, Clone, Debug)]
pub enum Command {
    /// Print the latest signed checkpoint after checking its signature.
    Checkpoint,
    /// Recompute the root from every entry, check the signature and consistency with the
    /// last verified checkpoint; name the first bad index on failure.
    Verify {
        /// Verify an export file offline instead of the live log.
        #[arg(long)]
        export: Option<PathBuf>,
    },
    /// Prove that entry INDEX is in the signed tree.
    Prove { index: u64 },
    /// Who did what: filter entries, print a table.
    Search {
        /// Personal ID of the citizen concerned.
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        agency: Option<String>,
        /// Full method path, e.g. /civgate.v1.Citizens/GetCitizen.
        #[arg(long)]
        method: Option<String>,
        /// gRPC code name, e.g. PERMISSION_DENIED.
        #[arg(long)]
        outcome: Option<String>,
        /// Unix milliseconds, inclusive.
        #[arg(long)]
        from: Option<i64>,
        /// Unix milliseconds, exclusive.
        #[arg(long)]
        to: Option<i64>,
        /// Also prove each shown entry's inclusion.
        #[arg(long)]
        prove: bool,
    },
    /// The signed checkpoint and every entry as JSON Lines.
    Export {
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate a checkpoint signing key (and print its verifier key).
    Keygen {
        /// Key name (conventionally the log's origin).
        #[arg(long, default_value = crate::note::DEFAULT_KEY_NAME)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn verifier(conn: &Conn) -> Result<Verifier> {
    let text = std::fs::read_to_string(&conn.verifier_key)
        .with_context(|| format!("reading {}", conn.verifier_key.display()))?;
    Ok(Verifier::parse(&text)?)
}

async fn online(conn: &Conn) -> Result<Online> {
    Ok(Online::new(
        client::connect(conn.addr, &conn.certs, Some(&conn.client)).await?,
    ))
}

pub async fn run(conn: Conn, cmd: Command) -> Result<()> {
    match cmd {
        Command::Keygen { name, out } => {
            anyhow::ensure!(
                !out.exists(),
                "{} exists; refusing to overwrite a signing key",
                out.display()
            );
            let s = Signer::generate(&name)?;
            use std::{io::Write, os::unix::fs::OpenOptionsExt};
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)?;
            writeln!(f, "{}", s.private_key_string())?;
            println!("{}", s.verifier_key_string());
            Ok(())
        }
        Command::Checkpoint => {
            let v = verifier(&conn)?;
            let (note, cp) = online(&conn).await?.checkpoint(&v).await?;
            print!("{note}");
            println!("signature OK ({}); size {}", v.name(), cp.size);
            Ok(())
        }
        Command::Verify { export } => {
            let v = verifier(&conn)?;
            let started = std::time::Instant::now();
            let report = match export {
                Some(path) => auditor::verify_export(&path, &v, &conn.state).await?,
                None => auditor::verify_online(&mut online(&conn).await?, &v, &conn.state).await?,
            };
            println!(
                "audit log verified: {} entries, root {}, signature OK ({}), {} ({:.2} s)",
                report.size,
                hex::encode(report.root),
                v.name(),
                match report.previous {
                    Some(p) => format!("consistent with the checkpoint verified before (size {p})"),
                    None => "first verification: state saved".to_owned(),
                },
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Prove { index } => {
            let v = verifier(&conn)?;
            let (cp, rec) = auditor::prove(&mut online(&conn).await?, &v, index).await?;
            println!(
                "entry {index} is included in the signed tree of size {} (root {})",
                cp.size,
                hex::encode(cp.root)
            );
            print!("{}", auditor::table(&[rec]));
            Ok(())
        }
        Command::Search {
            subject,
            agency,
            method,
            outcome,
            from,
            to,
            prove,
        } => {
            let v = verifier(&conn)?;
            let mut on = online(&conn).await?;
            let found = on
                .search(SearchEntriesRequest {
                    subject_personal_id: subject.unwrap_or_default(),
                    agency_id: agency.unwrap_or_default(),
                    method: method.unwrap_or_default(),
                    outcome: outcome.unwrap_or_default(),
                    from_unix_ms: from.unwrap_or(0),
                    to_unix_ms: to.unwrap_or(0),
                    page_token: String::new(),
                    page_size: 1_000,
                })
                .await?;
            let records: Vec<AuditRecord> = found
                .iter()
                .filter_map(|(_, leaf)| AuditRecord::decode(leaf.as_slice()).ok())
                .collect();
            print!("{}", auditor::table(&records));
            println!("{} entries", records.len());
            if prove {
                for (i, _) in &found {
                    auditor::prove(&mut on, &v, *i).await?;
                }
                println!("every entry shown is proven included in the signed tree");
            }
            Ok(())
        }
        Command::Export { out } => {
            let v = verifier(&conn)?;
            let mut f = std::io::BufWriter::new(std::fs::File::create(&out)?);
            let n = auditor::export(&mut online(&conn).await?, &v, &mut f).await?;
            std::io::Write::flush(&mut f)?;
            println!("exported {n} entries to {}", out.display());
            Ok(())
        }
    }
}
