//! `civgate audit …`: the auditor's commands.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use prost::Message;

use crate::{
    auditor::{self, Online},
    client,
    note::{Signer, Verifier},
    pb::v1::{AuditRecord, SearchEntriesRequest},
};

/// How to reach the gateway (with an auditor's, or another agency's, certificate).
#[derive(Args, Clone, Debug)]
pub struct Gateway {
    /// The gateway's API address, host:port (a name or an IP address).
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub addr: String,
    /// The name the gateway's certificate must carry (default: the host of --addr; for an IP
    /// address, "localhost", as in the development PKI).
    #[arg(long)]
    pub server_name: Option<String>,
    /// CA bundle (PEM) the gateway's certificate chains to. With --cert and --key, instead of
    /// --certs and --client.
    #[arg(long, requires_all = ["cert", "key"])]
    pub ca: Option<PathBuf>,
    /// The client certificate (PEM): an auditor's (for `cases`, a registry's lists its own).
    #[arg(long, requires_all = ["ca", "key"])]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires_all = ["ca", "cert"])]
    pub key: Option<PathBuf>,
    /// The development PKI's directory (ca.pem, clients/NAME.pem): used without --ca.
    #[arg(long, default_value = "certs")]
    pub certs: PathBuf,
    /// Client certificate under --certs/clients (an auditor's; for `cases`, a registry's
    /// lists its own requests).
    #[arg(long, default_value = "auditor")]
    pub client: String,
}

/// How to reach the gateway and check what it serves.
#[derive(Args, Clone, Debug)]
pub struct Conn {
    #[command(flatten)]
    pub gateway: Gateway,
    /// The log's verifier key file (`name+id+key`).
    #[arg(long, default_value = "certs/audit.vkey")]
    pub verifier_key: PathBuf,
    /// Where `verify` remembers the last checkpoint it verified.
    #[arg(long, default_value = "audit-verify-state.json")]
    pub state: PathBuf,
}

/// How `export` writes entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// Each entry's leaf (base64 protobuf): what `verify --export` checks.
    Raw,
    /// The leaf and, next to it, the record decoded as a JSON object (identifiers only), for
    /// log tools; `verify --export` still checks the leaves.
    JsonlDecoded,
}

#[derive(Subcommand, Clone, Debug)]
pub enum Command {
    /// Print the latest signed checkpoint after checking its signature.
    Checkpoint {
        #[command(flatten)]
        conn: Conn,
    },
    /// Recompute the root from every entry, check the signature and consistency with the
    /// last verified checkpoint; name the first bad index on failure.
    Verify {
        #[command(flatten)]
        conn: Conn,
        /// Verify an export file offline instead of the live log.
        #[arg(long)]
        export: Option<PathBuf>,
    },
    /// Prove that entry INDEX is in the signed tree.
    Prove {
        #[command(flatten)]
        conn: Conn,
        index: u64,
    },
    /// Who did what: filter entries, print a table.
    Search {
        #[command(flatten)]
        conn: Conn,
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
        /// From (inclusive): RFC 3339 (2026-12-07T08:00:00+07:00), a date (2026-12-07: its
        /// start in Vietnam), or Unix milliseconds.
        #[arg(long, value_parser = parse_time)]
        from: Option<i64>,
        /// To (exclusive), as --from; a date means its end (the next day's start) in Vietnam.
        #[arg(long, value_parser = parse_time_end)]
        to: Option<i64>,
        /// Also prove each shown entry's inclusion.
        #[arg(long)]
        prove: bool,
    },
    /// The signed checkpoint and every entry as JSON Lines.
    Export {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        format: ExportFormat,
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

/// A time as Unix milliseconds: RFC 3339, `YYYY-MM-DD` (its start in Vietnam), or digits.
pub fn parse_time(s: &str) -> Result<i64, String> {
    time_of(s, false)
}

/// As [`parse_time`], a date meaning its end (the next day's start in Vietnam).
pub fn parse_time_end(s: &str) -> Result<i64, String> {
    time_of(s, true)
}

fn time_of(s: &str, end_of_day: bool) -> Result<i64, String> {
    use time::format_description::well_known::Rfc3339;
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|e| format!("{s:?}: {e}"));
    }
    let ms = |t: time::OffsetDateTime| (t.unix_timestamp_nanos() / 1_000_000) as i64;
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(ms(t));
    }
    if let Ok(d) = crate::domain::parse_date(s) {
        let d = if end_of_day {
            d.next_day().unwrap_or(d)
        } else {
            d
        };
        return Ok(ms(d.midnight().assume_offset(crate::domain::VIETNAM)));
    }
    Err(format!(
        "{s:?}: give an RFC 3339 time (2026-12-07T08:00:00+07:00), a date (2026-12-07, Vietnam time) or Unix milliseconds"
    ))
}

fn verifier(conn: &Conn) -> Result<Verifier> {
    let text = std::fs::read_to_string(&conn.verifier_key)
        .with_context(|| format!("reading {}", conn.verifier_key.display()))?;
    Ok(Verifier::parse(&text)?)
}

/// The TLS name to check: --server-name, else the host of --addr (for an IP address,
/// "localhost", as the development PKI's server certificate says).
fn server_name(conn: &Gateway) -> String {
    if let Some(n) = &conn.server_name {
        return n.clone();
    }
    let host = conn
        .addr
        .rsplit_once(':')
        .map_or(conn.addr.as_str(), |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.parse::<std::net::IpAddr>().is_ok() {
        "localhost".to_owned()
    } else {
        host.to_owned()
    }
}

async fn online(conn: &Conn) -> Result<Online> {
    Ok(Online::new(channel(&conn.gateway).await?))
}

/// A connection to the gateway over mutual TLS with the certificate `conn` names.
pub async fn channel(conn: &Gateway) -> Result<tonic::transport::Channel> {
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let (ca, cert, key) = match (&conn.ca, &conn.cert, &conn.key) {
        (Some(ca), Some(cert), Some(key)) => (read(ca)?, read(cert)?, read(key)?),
        _ => (
            read(&conn.certs.join("ca.pem"))?,
            read(&conn.certs.join(format!("clients/{}.pem", conn.client)))?,
            read(&conn.certs.join(format!("clients/{}.key", conn.client)))?,
        ),
    };
    client::connect_to(&conn.addr, &server_name(conn), ca, cert, key).await
}

pub async fn run(cmd: Command) -> Result<()> {
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
        Command::Checkpoint { conn } => {
            let v = verifier(&conn)?;
            let (note, cp) = online(&conn).await?.checkpoint(&v).await?;
            print!("{note}");
            println!("signature OK ({}); size {}", v.name(), cp.size);
            Ok(())
        }
        Command::Verify { conn, export } => {
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
        Command::Prove { conn, index } => {
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
            conn,
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
        Command::Export { conn, out, format } => {
            let v = verifier(&conn)?;
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(&out)
                    .with_context(|| format!("creating {}", out.display()))?,
            );
            let decoded = format == ExportFormat::JsonlDecoded;
            let n = auditor::export(&mut online(&conn).await?, &v, &mut f, decoded).await?;
            std::io::Write::flush(&mut f)?;
            println!("exported {n} entries to {}", out.display());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc_3339_vietnam_dates_or_milliseconds() {
        // 2026-12-07T00:00:00+07:00 = 2026-12-06T17:00:00Z
        let start = 1_796_576_400_000;
        let rows: &[(&str, bool, Option<i64>)] = &[
            ("1796576400000", false, Some(start)),
            ("2026-12-06T17:00:00Z", false, Some(start)),
            ("2026-12-07T00:00:00+07:00", false, Some(start)),
            ("2026-12-07", false, Some(start)),
            ("2026-12-07", true, Some(start + 86_400_000)),
            ("7/12/2026", false, None),
            ("yesterday", false, None),
        ];
        for (s, end, want) in rows {
            let got = if *end {
                parse_time_end(s)
            } else {
                parse_time(s)
            };
            assert_eq!(got.ok(), *want, "{s}");
        }
    }

    #[test]
    fn the_server_name_is_the_host_unless_an_address() {
        let conn = |addr: &str, name: Option<&str>| Gateway {
            addr: addr.into(),
            server_name: name.map(Into::into),
            ca: None,
            cert: None,
            key: None,
            certs: "certs".into(),
            client: "auditor".into(),
        };
        assert_eq!(
            server_name(&conn("gw.moj.gov.vn:7443", None)),
            "gw.moj.gov.vn"
        );
        assert_eq!(server_name(&conn("127.0.0.1:7443", None)), "localhost");
        assert_eq!(server_name(&conn("[::1]:7443", None)), "localhost");
        assert_eq!(
            server_name(&conn("10.0.0.5:7443", Some("gw.internal"))),
            "gw.internal"
        );
    }
}
