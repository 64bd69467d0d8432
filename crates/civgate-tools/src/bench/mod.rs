//! `civgate bench`: closed-loop load generators. `lookup` drives `Citizens.GetCitizen` through
//! the gateway, or the equivalent `GetCitizens` directly against the population directory, so
//! one run on one machine gives the ratio between the two paths.
//!
//! `lookup` ([`lookup`]), `publish` and `subscribe` ([`sync`]), `audit-proofs` ([`proofs`]).

mod lookup;
mod proofs;
mod sync;

pub use lookup::{LookupArgs, LookupReport, Target, lookup, print_table};
pub use proofs::AuditProofArgs;
pub use sync::SyncArgs;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Look-ups per second and latency, through the gateway or directly to the directory.
    Lookup(LookupArgs),
    /// Build (or reuse) an audit log of N entries, then time inclusion and consistency proofs.
    AuditProofs(AuditProofArgs),
    /// Durable publishes per second (closed loop), as the population database.
    Publish(SyncArgs),
    /// Publish→delivery latency at a fixed rate, and the catch-up speed of a consumer.
    Subscribe(SyncArgs),
}

pub async fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::AuditProofs(a) => proofs::audit_proofs(&a).await,
        BenchCommand::Publish(a) => sync::publish_bench(&a).await,
        BenchCommand::Subscribe(a) => sync::subscribe_bench(&a).await,
        BenchCommand::Lookup(args) => {
            let report = lookup(&args).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_table(&report);
            }
            Ok(())
        }
    }
}

pub(crate) const WARMUP: u8 = 0;
pub(crate) const MEASURE: u8 = 1;
pub(crate) const STOP: u8 = 2;

/// utime + stime of a process, in clock ticks (0 if unreadable).
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    num(11) + num(12)
}

pub(crate) fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
