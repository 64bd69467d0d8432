//! `bench lookup`: look-ups through the gateway, or straight to the directory.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::{MEASURE, STOP, WARMUP, clock_ticks_per_second, cpu_ticks};
use crate::{
    client,
    link::Link,
    pb::{
        upstream::v1::{
            GetCitizensRequest, population_directory_client::PopulationDirectoryClient,
        },
        v1::{GetCitizenRequest, citizens_client::CitizensClient},
    },
    synth::Population,
};

#[derive(Clone, Copy, Debug, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// `civgate serve`: Citizens.GetCitizen (mTLS in, policy, purpose filter, mTLS out).
    Gateway,
    /// `civgate refdb serve` directly: PopulationDirectory.GetCitizens with one ID.
    Directory,
}

#[derive(Args, Clone, Debug)]
pub struct LookupArgs {
    #[arg(long, value_enum, default_value = "gateway")]
    pub target: Target,
    /// Address of the target (defaults: gateway 127.0.0.1:7443, directory 127.0.0.1:7444);
    /// repeat for replicas: connections are spread over them.
    #[arg(long = "addr")]
    pub addrs: Vec<SocketAddr>,
    #[arg(long, default_value = "certs")]
    pub certs: PathBuf,
    /// Client certificate name under certs/clients (defaults: registry-hp / gateway).
    #[arg(long)]
    pub client: Option<String>,
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Calls in flight per connection.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 8.0)]
    pub duration: f64,
    /// Warm-up seconds (not measured).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// The directory's synthetic population (to draw existing IDs from).
    #[arg(long, default_value_t = 100_000)]
    pub citizens: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The purpose declared (one bound to GetCitizen: a death registration confirming the
    /// identity of the deceased).
    #[arg(long, default_value = "DEATH_REGISTRATION")]
    pub purpose: String,
    /// Fields asked of the directory in `directory` mode (the purpose's fields).
    #[arg(
        long,
        default_value = "full_name,date_of_birth,sex,permanent_residence,date_of_death",
        value_delimiter = ','
    )]
    pub fields: Vec<String>,
    /// Server processes whose CPU time to attribute per request (repeatable).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct LookupReport {
    pub target: Target,
    pub connections: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub requests: u64,
    pub errors: u64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Per server PID: CPU microseconds per successful request over the measured window.
    pub server_cpu_us_per_request: Vec<(u32, f64)>,
    pub first_error: Option<String>,
}

enum Caller {
    Gateway(CitizensClient<Link>),
    Directory(PopulationDirectoryClient<Link>),
}

pub async fn lookup(args: &LookupArgs) -> Result<LookupReport> {
    let addrs = if args.addrs.is_empty() {
        vec![match args.target {
            Target::Gateway => SocketAddr::from(([127, 0, 0, 1], 7443)),
            Target::Directory => SocketAddr::from(([127, 0, 0, 1], 7444)),
        }]
    } else {
        args.addrs.clone()
    };
    let client_name = args.client.clone().unwrap_or_else(|| {
        match args.target {
            Target::Gateway => "registry-hp",
            Target::Directory => "gateway",
        }
        .to_owned()
    });
    let ids: Arc<Vec<String>> = Arc::new(
        Population::new(args.seed, args.citizens)
            .map(|c| c.personal_id.to_string())
            .collect(),
    );
    anyhow::ensure!(!ids.is_empty(), "--citizens must be at least 1");
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let mut tasks = Vec::new();
    for c in 0..args.connections.max(1) {
        let addr = addrs[c % addrs.len()];
        let link = client::link(addr, &args.certs, Some(&client_name))
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        for t in 0..args.concurrency.max(1) {
            let (l, origin) = (link.clone(), link.origin());
            let caller = match args.target {
                Target::Gateway => Caller::Gateway(CitizensClient::with_origin(l, origin)),
                Target::Directory => {
                    Caller::Directory(PopulationDirectoryClient::with_origin(l, origin))
                }
            };
            let (ids, phase) = (ids.clone(), phase.clone());
            let (purpose, fields) = (args.purpose.clone(), args.fields.clone());
            let seed = (c * 10_000 + t) as u64;
            tasks.push(tokio::spawn(async move {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let (mut errors, mut first_error) = (0u64, None);
                let mut caller = caller;
                loop {
                    let p = phase.load(Ordering::Relaxed);
                    if p == STOP {
                        break;
                    }
                    let id = ids[rng.random_range(0..ids.len())].clone();
                    let started = Instant::now();
                    let result = match &mut caller {
                        Caller::Gateway(g) => g
                            .get_citizen(GetCitizenRequest {
                                case_reference: String::new(),
                                personal_id: id,
                                purpose: purpose.clone(),
                            })
                            .await
                            .map(|_| ()),
                        Caller::Directory(d) => d
                            .get_citizens(GetCitizensRequest {
                                personal_ids: vec![id],
                                fields: fields.clone(),
                            })
                            .await
                            .map(|_| ()),
                    };
                    if p == MEASURE && phase.load(Ordering::Relaxed) == MEASURE {
                        match result {
                            Ok(()) => {
                                let us = started.elapsed().as_micros().max(1) as u64;
                                let _ = hist.record(us.min(60_000_000));
                            }
                            Err(s) => {
                                errors += 1;
                                first_error.get_or_insert_with(|| {
                                    format!("{:?}: {}", s.code(), s.message())
                                });
                            }
                        }
                    }
                }
                Ok::<_, anyhow::Error>((hist, errors, first_error))
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let cpu_before: Vec<_> = args
        .server_pids
        .iter()
        .map(|p| (*p, cpu_ticks(*p)))
        .collect();
    let window = Instant::now();
    phase.store(MEASURE, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    phase.store(STOP, Ordering::Relaxed);
    let seconds = window.elapsed().as_secs_f64();
    let cpu_after: Vec<_> = args
        .server_pids
        .iter()
        .map(|p| (*p, cpu_ticks(*p)))
        .collect();

    let mut total =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut errors, mut first_error) = (0, None);
    for t in tasks {
        let (h, e, f) = t.await??;
        total.add(&h).map_err(|e| anyhow::anyhow!("{e}"))?;
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let requests = total.len();
    let hz = clock_ticks_per_second();
    let server_cpu_us_per_request = cpu_before
        .iter()
        .zip(&cpu_after)
        .map(|((pid, b), (_, a))| {
            let secs = a.saturating_sub(*b) as f64 / hz;
            (
                *pid,
                if requests > 0 {
                    secs * 1e6 / requests as f64
                } else {
                    0.0
                },
            )
        })
        .collect();
    let ms = |q: f64| total.value_at_quantile(q) as f64 / 1000.0;
    Ok(LookupReport {
        target: args.target,
        connections: args.connections,
        concurrency: args.concurrency,
        seconds,
        requests,
        errors,
        requests_per_second: requests as f64 / seconds,
        p50_ms: ms(0.50),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        server_cpu_us_per_request,
        first_error,
    })
}

pub fn print_table(r: &LookupReport) {
    println!(
        "{:<10} {:>5}x{:<4} {:>10} {:>9} {:>9} {:>9} {:>8}  server CPU µs/req",
        "target", "conn", "infl", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "errors"
    );
    let cpu = r
        .server_cpu_us_per_request
        .iter()
        .map(|(pid, us)| format!("pid {pid}: {us:.1}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "{:<10} {:>5}x{:<4} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>8}  {}",
        format!("{:?}", r.target).to_lowercase(),
        r.connections,
        r.concurrency,
        r.requests_per_second,
        r.p50_ms,
        r.p99_ms,
        r.p999_ms,
        r.errors,
        cpu
    );
    if let Some(e) = &r.first_error {
        println!("first error: {e}");
    }
}
